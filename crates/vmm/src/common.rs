//! Helpers shared by the VMM drivers: binaries on `PATH`, the VMM log (open, tail), stale
//! sockets, and processes found by pid + start time or by an argument on their command line.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use wick_host::proc;
use wick_model::api::{Check, CheckStatus};

use crate::VmmError;

/// How many lines of the VMM log an error carries.
pub(crate) const LOG_TAIL_LINES: usize = 20;

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn find_on_path(name: &OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// A binary to run: `configured` when given (a path must be executable; a bare name is looked up
/// on `PATH`), else `default_name` on `PATH`. `key` names the config setting and `how` says how to
/// install the binary; both go into the error.
pub(crate) fn resolve_bin(
    configured: Option<&Path>,
    default_name: &str,
    key: &str,
    how: &str,
) -> Result<PathBuf, VmmError> {
    match configured {
        Some(p) if p.as_os_str().is_empty() => resolve_bin(None, default_name, key, how),
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            if is_executable(p) {
                Ok(p.to_path_buf())
            } else {
                Err(VmmError::BinaryNotFound(format!(
                    "configured {key} {} is not an executable file; {how}",
                    p.display()
                )))
            }
        }
        Some(name) => find_on_path(name.as_os_str()).ok_or_else(|| {
            VmmError::BinaryNotFound(format!("configured {key} {name:?} is not on PATH; {how}"))
        }),
        None => find_on_path(OsStr::new(default_name)).ok_or_else(|| {
            VmmError::BinaryNotFound(format!("`{default_name}` is not on PATH; {how}"))
        }),
    }
}

/// One `wick doctor` line of the `vmm` area.
pub(crate) fn check(name: &str, status: CheckStatus, detail: String, hint: Option<&str>) -> Check {
    Check {
        area: "vmm".into(),
        name: name.into(),
        status,
        detail,
        hint: hint.map(str::to_owned),
    }
}

/// Doctor line for a binary: pass with its `--version`, or fail with `how` to install it.
pub(crate) fn binary_check(name: &str, bin: &Path, how: &str) -> Check {
    match bin_version(bin) {
        Ok(v) => check(
            name,
            CheckStatus::Pass,
            format!("{} ({v})", bin.display()),
            None,
        ),
        Err(e) => check(name, CheckStatus::Fail, e, Some(how)),
    }
}

/// `bin --version`, first non-empty line (bounded to a few seconds).
pub(crate) fn bin_version(bin: &Path) -> Result<String, String> {
    let mut child = std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {} --version: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not exit within 5 s",
                    bin.display()
                ));
            }
            Err(e) => return Err(format!("waiting for {} --version: {e}", bin.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    let first = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned();
    if !status.success() {
        return Err(format!("{} --version failed ({status})", bin.display()));
    }
    if first.is_empty() {
        return Err(format!("{} --version printed nothing", bin.display()));
    }
    Ok(first)
}

/// The directory holding the VM's sockets (the VM dir): the parent of `api_socket`.
pub(crate) fn vm_dir(api_socket: &Path) -> PathBuf {
    api_socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn remove_if_exists(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes `socket` and the listeners for guest-initiated hybrid-vsock connections next to it
/// (`<socket>_<port>`), logging what cannot be removed.
pub(crate) fn remove_vsock_sockets(socket: &Path) {
    if let Err(e) = remove_if_exists(socket) {
        tracing::warn!(path = %socket.display(), error = %e, "cannot remove vsock socket");
    }
    let (Some(dir), Some(base)) = (socket.parent(), socket.file_name()) else {
        return;
    };
    let prefix = format!("{}_", base.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(err) = remove_if_exists(&e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove vsock listener socket");
            }
        }
    }
}

/// Opens `path` for appending (creating it and its directory), twice: for a child's stdout and
/// stderr.
pub(crate) fn open_log(path: &Path) -> Result<(File, File), VmmError> {
    let err = |what: String, e: std::io::Error| VmmError::Spawn(format!("{what}: {e}"));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("creating {}", parent.display()), e))?;
    }
    let log = crate::log::open_regular(std::fs::OpenOptions::new().create(true).append(true), path)
        .map_err(|e| err(format!("opening {}", path.display()), e))?;
    let dup = log
        .try_clone()
        .map_err(|e| err("duplicating the log file handle".into(), e))?;
    Ok((log, dup))
}

/// The last `n` lines of the last 16 KiB of `path` (empty when unreadable).
pub(crate) fn tail_lines(path: &Path, n: usize) -> String {
    crate::log::read_tail(path, n, 16 * 1024)
}

/// The last [`LOG_TAIL_LINES`] lines of the VMM log, for error messages.
pub fn log_tail(path: &Path) -> String {
    tail_lines(path, LOG_TAIL_LINES)
}

/// `msg` followed by the tail of `log` (or a note that it is empty).
pub(crate) fn with_tail(msg: String, log: &Path) -> String {
    let tail = log_tail(log);
    if tail.trim().is_empty() {
        format!("{msg} (log {} is empty)", log.display())
    } else {
        format!("{msg}; last lines of {}:\n{tail}", log.display())
    }
}

/// Waits until `pid` (with `start_time`) is gone; `false` if it outlives `timeout`.
pub(crate) async fn wait_gone(pid: u32, start_time: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !proc::is_alive(pid, start_time) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The live process identified by a recorded `pid` + `start_time`, else the first process
/// whose command line carries `arg` as one whole argument. A pid recorded without a start time
/// is only trusted if it carries `arg`.
pub(crate) fn find_process(pid: Option<u32>, start_time: Option<u64>, arg: &OsStr) -> Option<u32> {
    if let Some(pid) = pid {
        let ours = match start_time {
            Some(st) => proc::is_alive(pid, Some(st)),
            None => proc::find_by_arg(arg).contains(&pid),
        };
        if ours {
            return Some(pid);
        }
    }
    proc::find_by_arg(arg).first().copied()
}

/// The start time to trust for `pid` (just returned by [`find_process`]): the recorded one if
/// `pid` is the recorded pid and still has it, else read now (a pid found by a `/proc` scan,
/// possibly equal to a stale recorded pid).
pub(crate) fn trusted_start_time(
    pid: u32,
    recorded_pid: Option<u32>,
    recorded: Option<u64>,
) -> Option<u64> {
    match recorded {
        Some(st) if Some(pid) == recorded_pid && proc::is_alive(pid, Some(st)) => Some(st),
        _ => proc::start_time(pid),
    }
}

/// SIGKILLs `pid` (if still the same process) and waits up to 2 s for it to go.
pub(crate) async fn sigkill_and_wait(
    pid: u32,
    start_time: Option<u64>,
    what: &str,
) -> Result<(), VmmError> {
    proc::signal(pid, start_time, nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| VmmError::Other(format!("cannot SIGKILL {what} pid {pid}: {e}")))?;
    if wait_gone(pid, start_time, Duration::from_secs(2)).await {
        Ok(())
    } else {
        Err(VmmError::Timeout(
            Duration::from_secs(2),
            format!("{what} pid {pid} to exit after SIGKILL"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let tail = log_tail(&p);
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
        assert!(tail.ends_with("line 99"));
        assert_eq!(log_tail(&dir.path().join("missing")), "");
    }

    #[test]
    fn vsock_listeners_are_removed_with_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("vsock.sock");
        for f in [
            "vsock.sock",
            "vsock.sock_52",
            "vsock.sock_1024",
            "other.sock",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        remove_vsock_sockets(&s);
        remove_vsock_sockets(&s);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["other.sock".to_string()]);
    }

    #[test]
    fn resolve_bin_explains_how_to_fix() {
        let e = resolve_bin(Some(Path::new("/nonexistent/x")), "x", "x_bin", "install x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x_bin") && e.contains("install x"), "{e}");
        let e = resolve_bin(None, "no-such-binary-wick", "k", "how")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-binary-wick"), "{e}");
        assert!(resolve_bin(Some(Path::new("sh")), "x", "k", "h")
            .unwrap()
            .is_absolute());
    }
}
