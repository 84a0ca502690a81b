//! [`Runner`]: the one place host networking commands are executed, so everything above it can be
//! golden-tested with the [`crate::net::fake::RecordingRunner`] and run for real inside a network
//! namespace with [`SystemRunner::in_netns`].

use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::error::{hint_for, render_command, spawn_hint, NetError, Status};

/// Runs a program with arguments and optional stdin; returns its output **whatever its exit
/// status** (callers decide; see [`run_ok`]). Errors only when it cannot be run at all.
pub trait Runner: Send + Sync {
    /// Run `program args...`, feeding `stdin` when given.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, NetError>;
}

/// The real runner: `std::process::Command`, optionally inside a named network namespace
/// (`ip netns exec NS program args...`), which is how the tests keep the host untouched.
#[derive(Debug, Clone, Default)]
pub struct SystemRunner {
    /// Named network namespace (`/run/netns/NAME`) to run every command in; `None` = current.
    pub netns: Option<String>,
}

impl SystemRunner {
    /// Runs commands in the caller's network namespace.
    pub fn new() -> Self {
        Self { netns: None }
    }

    /// Runs every command through `ip netns exec NS`.
    pub fn in_netns(ns: impl Into<String>) -> Self {
        Self {
            netns: Some(ns.into()),
        }
    }
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, NetError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Stable, parseable output whatever the daemon's environment says.
            .env("LC_ALL", "C");
        let spawn_err = |source: std::io::Error| NetError::Spawn {
            command: self.describe(program, args),
            source,
            hint: spawn_hint(program),
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let Some(input) = stdin else {
            return child.wait_with_output().map_err(spawn_err);
        };
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // Feed stdin from another thread so a program that writes before it has read everything
        // cannot deadlock us; one that exits without reading it all is reported by its status.
        std::thread::scope(|s| {
            s.spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            });
            child.wait_with_output().map_err(spawn_err)
        })
    }
}

impl SystemRunner {
    fn describe(&self, program: &str, args: &[&str]) -> String {
        match &self.netns {
            Some(ns) => format!("ip netns exec {ns} {}", render_command(program, args)),
            None => render_command(program, args),
        }
    }
}

/// Runs the command and returns its stdout, or a [`NetError::Command`] naming the command, its
/// status, its stderr and a hint when it exits non-zero.
pub fn run_ok(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let out = runner.run(program, args, stdin)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_error(program, args, &out))
    }
}

/// Builds the [`NetError::Command`] for a finished, failed command.
pub(crate) fn command_error(program: &str, args: &[&str], out: &Output) -> NetError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    NetError::Command {
        command: render_command(program, args),
        status: Status(&out.status).to_string(),
        hint: hint_for(program, &stderr),
        stderr,
    }
}

/// Stderr of a finished command, lowercased (for "already exists" / "does not exist" checks).
pub(crate) fn stderr_lower(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_ascii_lowercase()
}
