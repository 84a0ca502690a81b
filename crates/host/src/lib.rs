//! Host plumbing for `wickd`, each concern behind a small API so the daemon's lifecycle code never
//! shells out or parses `/proc` itself.
//!
//! - [`proc`]: find, inspect and signal processes by pid + start time (never by name).
//! - [`net`]: bridge, per-VM TAPs, guest isolation, NAT (nft/iptables), ip_forward, leftover sweep.

pub mod net;
pub mod proc;
