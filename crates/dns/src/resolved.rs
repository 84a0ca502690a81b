//! systemd-resolved routing for `.vm`: tell resolved that the bridge link has a DNS server (our
//! server on the bridge IP) responsible for the routing-only domain `~vm`, so the host's own
//! lookups of `<name>.vm` (ssh, curl, browsers) go to wickd, and everything else is untouched.
//!
//! Every command goes through a [`Runner`], so tests use a recording fake and never touch the
//! host's resolver. The calls block (resolvectl talks D-Bus): from async code, run them in
//! `tokio::task::spawn_blocking`.

use std::net::Ipv4Addr;

use wick_host::cmd::{Cmd, CmdError};
pub use wick_host::cmd::{Runner, SystemRunner};

/// The program this module drives.
pub const RESOLVECTL: &str = "resolvectl";

/// A `resolvectl` call that failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {detail}; check that systemd-resolved is running (`systemctl status systemd-resolved`) and that wickd runs as root")]
pub struct ResolvedError {
    /// The command line that failed.
    pub command: String,
    /// Its error output, or why it could not start.
    pub detail: String,
}

/// systemd-resolved, driven through `resolvectl`.
#[derive(Debug, Clone, Default)]
pub struct Resolved<R: Runner = SystemRunner> {
    runner: R,
}

impl Resolved<SystemRunner> {
    /// The real thing.
    pub fn system() -> Resolved<SystemRunner> {
        Resolved {
            runner: SystemRunner::new(),
        }
    }
}

/// `resolvectl args...`, never paged.
fn resolvectl(args: &[&str]) -> Cmd {
    Cmd::new(RESOLVECTL)
        .args(args.iter().copied())
        .env("SYSTEMD_PAGER", "")
}

impl<R: Runner> Resolved<R> {
    /// Drives resolved through `runner`.
    pub fn new(runner: R) -> Resolved<R> {
        Resolved { runner }
    }

    /// The runner (tests inspect their fake through this).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// `resolvectl` is installed and systemd-resolved answers it.
    pub fn is_available(&self) -> bool {
        matches!(
            self.runner.run(&resolvectl(&["--no-pager", "status"])),
            Ok(out) if out.success()
        )
    }

    /// Routes `*.vm` to `dns` on `link`:
    /// `resolvectl dns <link> <dns>`, `resolvectl domain <link> ~vm`, and (best effort, older
    /// systemd lacks it) `resolvectl default-route <link> false`, so the link never receives
    /// queries for other names. Returns the warnings of best-effort steps.
    pub fn route_vm_domain(&self, link: &str, dns: Ipv4Addr) -> Result<Vec<String>, ResolvedError> {
        self.call(&["dns", link, &dns.to_string()])?;
        self.call(&["domain", link, "~vm"])?;
        let mut warnings = Vec::new();
        if let Err(e) = self.call(&["default-route", link, "false"]) {
            warnings.push(e.to_string());
        }
        Ok(warnings)
    }

    /// Drops every per-link setting wick made (`resolvectl revert <link>`). A link that no longer
    /// exists has nothing to revert: that is success.
    pub fn revert(&self, link: &str) -> Result<(), ResolvedError> {
        match self.call(&["revert", link]) {
            Err(e) if e.detail.contains("No such device") => Ok(()),
            other => other,
        }
    }

    fn call(&self, args: &[&str]) -> Result<(), ResolvedError> {
        let command = format!("{RESOLVECTL} {}", args.join(" "));
        match self.runner.run(&resolvectl(args)) {
            Ok(out) if out.success() => Ok(()),
            Ok(out) => {
                let stderr = out.stderr_text();
                let detail = if stderr.trim().is_empty() {
                    "it exited with an error and printed nothing".to_string()
                } else {
                    stderr.trim().to_string()
                };
                Err(ResolvedError { command, detail })
            }
            Err(e) if e.is_not_found() => Err(ResolvedError {
                command,
                detail: format!("{RESOLVECTL} is not installed"),
            }),
            Err(CmdError::Spawn { source, .. }) => Err(ResolvedError {
                command,
                detail: source.to_string(),
            }),
            Err(e) => Err(ResolvedError {
                command,
                detail: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_host::cmd::testing::RecordingRunner;

    /// A recording fake where calls starting with `prefix` fail with `stderr`.
    fn failing(prefix: &str, stderr: &str) -> RecordingRunner {
        let r = RecordingRunner::new();
        r.respond(prefix, 1, "", stderr);
        r
    }

    #[test]
    fn routes_vm_to_the_bridge() {
        let r = Resolved::new(RecordingRunner::new());
        let warnings = r
            .route_vm_domain("wick0", Ipv4Addr::new(172, 30, 0, 1))
            .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            r.runner().lines(),
            [
                "resolvectl dns wick0 172.30.0.1",
                "resolvectl domain wick0 ~vm",
                "resolvectl default-route wick0 false",
            ]
        );
    }

    #[test]
    fn default_route_failure_is_only_a_warning() {
        let r = Resolved::new(failing(
            "resolvectl default-route",
            "Unknown command verb default-route.",
        ));
        let w = r
            .route_vm_domain("wick0", Ipv4Addr::new(172, 30, 0, 1))
            .unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("Unknown command verb"), "{w:?}");
    }

    #[test]
    fn dns_failure_stops_and_explains() {
        let r = Resolved::new(failing(
            "resolvectl dns",
            "Failed to set DNS configuration: Access denied",
        ));
        let e = r
            .route_vm_domain("wick0", Ipv4Addr::new(172, 30, 0, 1))
            .unwrap_err();
        assert_eq!(e.command, "resolvectl dns wick0 172.30.0.1");
        let msg = e.to_string();
        assert!(
            msg.contains("Access denied") && msg.contains("systemd-resolved"),
            "{msg}"
        );
        assert_eq!(r.runner().lines().len(), 1, "nothing after the failure");
    }

    #[test]
    fn revert_is_idempotent_for_a_missing_link() {
        let r = Resolved::new(RecordingRunner::new());
        r.revert("wick0").unwrap();
        assert_eq!(r.runner().lines(), ["resolvectl revert wick0"]);
        let gone = Resolved::new(failing(
            "resolvectl revert",
            "Failed to resolve interface \"wick0\": No such device",
        ));
        gone.revert("wick0").unwrap();
        let denied = Resolved::new(failing("resolvectl revert", "Access denied"));
        assert!(denied.revert("wick0").is_err());
    }

    #[test]
    fn availability() {
        assert!(Resolved::new(RecordingRunner::new()).is_available());
        let down = failing(
            "resolvectl --no-pager status",
            "Failed to get global data: Unit dbus-org.freedesktop.resolve1.service not found.",
        );
        assert!(!Resolved::new(down).is_available());
        let missing = RecordingRunner::new();
        missing.unstartable("resolvectl", std::io::ErrorKind::NotFound);
        let r = Resolved::new(missing);
        assert!(!r.is_available());
        let e = r.revert("wick0").unwrap_err();
        assert!(e.detail.contains("not installed"), "{e}");
    }
}
