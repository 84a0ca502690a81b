//! Networking commands through the one [`crate::cmd::Runner`]: every command runs with
//! `LC_ALL=C` (stable, parseable output whatever the daemon's environment says), and failures
//! become [`NetError`]s with a hint. Golden tests use `cmd::testing::RecordingRunner`; real runs
//! inside a network namespace use [`SystemRunner::in_netns`].

use crate::cmd::{Cmd, Output};
pub use crate::cmd::{Runner, SystemRunner};

use super::error::{hint_for, NetError};

/// The networking command `program args...`, fed `stdin` when given.
pub(crate) fn net_cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Cmd {
    let cmd = Cmd::new(program)
        .args(args.iter().copied())
        .env("LC_ALL", "C");
    match stdin {
        Some(input) => cmd.stdin(input),
        None => cmd,
    }
}

/// Runs the command and returns its output **whatever its exit status** (callers decide; see
/// [`run_ok`]). Errors only when it cannot be run at all.
pub(crate) fn run(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, NetError> {
    Ok(runner.run(&net_cmd(program, args, stdin))?)
}

/// Runs the command and returns its stdout, or a [`NetError::Command`] naming the command, its
/// status, its stderr and a hint when it exits non-zero.
pub fn run_ok(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let out = run(runner, program, args, stdin)?;
    if out.success() {
        Ok(out.stdout_text())
    } else {
        Err(command_error(program, args, &out))
    }
}

/// Builds the [`NetError::Command`] for a finished, failed command.
pub(crate) fn command_error(program: &str, args: &[&str], out: &Output) -> NetError {
    let stderr = out.complaint();
    NetError::Command {
        command: net_cmd(program, args, None).line(),
        status: out.status.to_string(),
        hint: hint_for(program, &stderr),
        stderr,
    }
}

/// Stderr of a finished command, lowercased (for "already exists" / "does not exist" checks).
pub(crate) fn stderr_lower(out: &Output) -> String {
    out.stderr_text().to_ascii_lowercase()
}
