//! `net.ipv4.ip_forward`, managed without breaking a host that already relies on it.
//!
//! [`ForwardGuard::ensure_enabled`] turns forwarding on only when it is off and reports whether
//! **wick** did so; the daemon persists that bool (durability rule) and later calls
//! [`ForwardGuard::release`], which turns forwarding off again only if wick turned it on and no VM
//! needs NAT any more. A host that had forwarding on before wick is never touched. Values are read
//! and written with `sysctl` through the [`Runner`], so tests do it inside their own netns.

use super::error::NetError;
use super::runner::{run_ok, Runner};

/// The sysctl key.
pub const IP_FORWARD: &str = "net.ipv4.ip_forward";

/// Namespace for the ip_forward operations (no state: the caller persists what
/// [`ensure_enabled`](Self::ensure_enabled) returns).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardGuard;

impl ForwardGuard {
    /// Whether forwarding is on (`sysctl -n net.ipv4.ip_forward`).
    pub fn is_enabled(runner: &dyn Runner) -> Result<bool, NetError> {
        let out = run_ok(runner, "sysctl", &["-n", IP_FORWARD], None)?;
        match out.trim() {
            "0" => Ok(false),
            "1" => Ok(true),
            other => Err(NetError::Parse {
                command: format!("sysctl -n {IP_FORWARD}"),
                detail: format!("expected 0 or 1, got {other:?}"),
            }),
        }
    }

    /// Turns forwarding on if it is off. Returns `true` when wick turned it on (persist this!),
    /// `false` when it already was on.
    pub fn ensure_enabled(runner: &dyn Runner) -> Result<bool, NetError> {
        if Self::is_enabled(runner)? {
            return Ok(false);
        }
        run_ok(
            runner,
            "sysctl",
            &["-q", "-w", &format!("{IP_FORWARD}=1")],
            None,
        )?;
        Ok(true)
    }

    /// Turns forwarding off again only when `wick_enabled` (what
    /// [`ensure_enabled`](Self::ensure_enabled) returned, persisted) and `!nat_in_use`. Returns
    /// whether it turned it off.
    pub fn release(
        runner: &dyn Runner,
        wick_enabled: bool,
        nat_in_use: bool,
    ) -> Result<bool, NetError> {
        if !wick_enabled || nat_in_use || !Self::is_enabled(runner)? {
            return Ok(false);
        }
        run_ok(
            runner,
            "sysctl",
            &["-q", "-w", &format!("{IP_FORWARD}=0")],
            None,
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    #[test]
    fn enables_only_when_off_and_reports_it() {
        let r = RecordingRunner::new();
        r.respond("sysctl -n", 0, "0\n", "");
        assert!(ForwardGuard::ensure_enabled(&r).unwrap());
        assert_eq!(
            r.lines(),
            [
                "sysctl -n net.ipv4.ip_forward",
                "sysctl -q -w net.ipv4.ip_forward=1"
            ]
        );
        let r = RecordingRunner::new();
        r.respond("sysctl -n", 0, "1\n", "");
        assert!(!ForwardGuard::ensure_enabled(&r).unwrap());
        assert_eq!(r.lines().len(), 1);
    }

    #[test]
    fn releases_only_what_wick_turned_on() {
        let r = RecordingRunner::new();
        r.respond("sysctl -n", 0, "1\n", "");
        assert!(!ForwardGuard::release(&r, false, false).unwrap());
        assert!(!ForwardGuard::release(&r, true, true).unwrap());
        assert!(r.lines().is_empty());
        assert!(ForwardGuard::release(&r, true, false).unwrap());
        assert_eq!(
            r.lines().last().unwrap(),
            "sysctl -q -w net.ipv4.ip_forward=0"
        );
        let r = RecordingRunner::new();
        r.respond("sysctl -n", 0, "garbage", "");
        assert!(ForwardGuard::is_enabled(&r).is_err());
    }
}
