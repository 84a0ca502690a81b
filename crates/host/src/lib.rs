//! Host plumbing for `wickd`, each concern behind a small API so the daemon's lifecycle code never
//! shells out or parses `/proc` itself.
//!
//! - [`proc`]: find, inspect and signal processes by pid + start time (never by name).

pub mod proc;
