//! Host plumbing for `wickd`, each concern behind a small API so the daemon's lifecycle code never
//! shells out or parses `/proc` itself.
//!
//! - [`cmd`]: the one runner of host commands (real, or recording behind the `testing` feature).
//! - [`proc`]: find, inspect and signal processes by pid + start time (never by name).
//! - [`mounts`]: `/proc/mounts` fields unescaped.
//! - [`cgroup`]: per-VM cgroups (cpu, memory, pids limits) on cgroup v1 or v2.
//! - [`net`]: bridge, per-VM TAPs, guest isolation, NAT (nft/iptables), ip_forward, leftover sweep.

pub mod cgroup;
pub mod cmd;
pub mod mounts;
pub mod net;
pub mod proc;
