//! `losetup`, `dmsetup` and the e2fsprogs tools through the one [`wick_host::cmd::Runner`], so
//! the device-mapper backend's call order is golden-tested with the recording fake. Every
//! command runs with stdin closed and `LC_ALL=C`, so messages are parseable.

use wick_host::cmd::{Cmd, CmdError, Output};
pub use wick_host::cmd::{Runner, SystemRunner};

use crate::error::{spawn_hint, Result, Status, StorageError};

/// The command `program args...` as this crate runs it.
fn storage_cmd(program: &str, args: &[&str]) -> Cmd {
    Cmd::new(program)
        .args(args.iter().copied())
        .env("LC_ALL", "C")
}

/// Runs the command and returns its output **whatever its exit status** (callers decide; see
/// [`run_ok`]). Errors only when it cannot be run at all.
pub(crate) fn run(runner: &dyn Runner, program: &str, args: &[&str]) -> Result<Output> {
    runner
        .run(&storage_cmd(program, args))
        .map_err(storage_error)
}

/// [`run`] of a filesystem tool on `img`, a filesystem a guest wrote: as `nobody`, the image
/// reached only through its stdin (`args` name it [`STDIN_PATH`]; see
/// [`wick_host::cmd::run_on_untrusted_image`]).
pub(crate) fn run_on_image(
    runner: &dyn Runner,
    img: &std::path::Path,
    program: &str,
    args: &[&str],
) -> Result<Output> {
    wick_host::cmd::run_on_untrusted_image(runner, img, storage_cmd(program, args))
        .map_err(storage_error)
}

pub(crate) use wick_host::cmd::STDIN_PATH;

fn storage_error(e: CmdError) -> StorageError {
    match e {
        CmdError::Spawn {
            program,
            command,
            source,
        } => StorageError::Spawn {
            hint: spawn_hint(&program),
            command,
            source,
        },
        CmdError::Failed {
            command,
            status,
            stderr,
            ..
        } => StorageError::Command {
            command,
            status,
            stderr,
            hint: None,
        },
    }
}

/// Runs the command; its stdout on success, else a [`StorageError::Command`] naming the command,
/// its status and its stderr.
pub fn run_ok(runner: &dyn Runner, program: &str, args: &[&str]) -> Result<String> {
    let out = run(runner, program, args)?;
    if out.success() {
        Ok(out.stdout_text())
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
    StorageError::Command {
        command: storage_cmd(program, args).line(),
        status: Status(&out.status).to_string(),
        stderr: out.complaint(),
        hint,
    }
}
