//! [`Runner`]: the one place this crate executes `losetup`, `dmsetup` and the e2fsprogs tools, so
//! the device-mapper backend's call order can be golden-tested with a recording fake.

use std::process::{Command, Output, Stdio};

use crate::error::{spawn_hint, Result, Status, StorageError};

/// Runs a program with arguments and returns its output **whatever its exit status** (callers
/// decide; see [`run_ok`]). Errors only when it cannot be run at all.
pub trait Runner: Send + Sync {
    /// Run `program args...` with stdin closed.
    fn run(&self, program: &str, args: &[&str]) -> Result<Output>;
}

/// The real runner: `std::process::Command` with `LC_ALL=C` so messages are parseable.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| StorageError::Spawn {
                command: render(program, args),
                source,
                hint: spawn_hint(program),
            })
    }
}

/// Runs the command; its stdout on success, else a [`StorageError::Command`] naming the command,
/// its status and its stderr.
pub fn run_ok(runner: &dyn Runner, program: &str, args: &[&str]) -> Result<String> {
    let out = runner.run(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_error(program, args, &out, None))
    }
}

/// The [`StorageError::Command`] for a finished, failed command.
pub(crate) fn command_error(
    program: &str,
    args: &[&str],
    out: &Output,
    hint: Option<String>,
) -> StorageError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    StorageError::Command {
        command: render(program, args),
        status: Status(&out.status).to_string(),
        stderr,
        hint,
    }
}

/// `program arg...`, quoting arguments that contain spaces.
pub(crate) fn render(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push('"');
            s.push_str(a);
            s.push('"');
        } else {
            s.push_str(a);
        }
    }
    s
}
