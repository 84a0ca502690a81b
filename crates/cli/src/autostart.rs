//! Starting `wickd` for a root caller who found it not running.
//!
//! The daemon is detached (own session, stdin null, output appended to `Paths::daemon_log()`),
//! so it outlives this command. We then wait for its socket to accept connections; if it dies
//! first, the tail of what it wrote to the log is the error.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use wick_model::paths::ROOT_ENV;
use wick_model::Paths;

/// How long the daemon gets to open its socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `wickd` detached and waits until `socket` accepts connections.
pub async fn start_daemon(paths: &Paths, socket: &Path) -> Result<()> {
    let bin = find_wickd().context("wickd is not running")?;
    fs::create_dir_all(&paths.run)
        .with_context(|| format!("cannot create {}", paths.run.display()))?;
    let log_path = paths.daemon_log();
    let log = OpenOptions::new()
        .mode(0o600) // the daemon's log is root's
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the daemon log {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);

    let mut cmd = Command::new(&bin);
    if let Some(root) = std::env::var_os(ROOT_ENV).filter(|v| !v.is_empty()) {
        cmd.arg("--root").arg(root);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    eprintln!(
        "starting wickd ({}), log: {}",
        bin.display(),
        log_path.display()
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;

    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "wickd exited during startup ({status}); last lines of {}:\n{}",
                log_path.display(),
                log_tail(&log_path, log_start, 20)
            );
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "wickd (pid {}) did not open {} within {} s; see {}",
                child.id(),
                socket.display(),
                STARTUP_TIMEOUT.as_secs(),
                log_path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `wickd` next to this executable, else on `PATH`.
pub(crate) fn find_wickd() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("wickd")));
    if let Some(p) = &beside {
        if is_executable(p) {
            return Ok(p.clone());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("wickd");
            if is_executable(&p) {
                return Ok(p);
            }
        }
    }
    let where_ = beside
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| "this executable's directory".into());
    bail!(
        "wickd's binary was found neither in {where_} nor on PATH; install wickd beside wick or \
         start it by hand as root"
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `lines` lines written to `path` after byte offset `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if read.is_err() || text.trim().is_empty() {
        return "  (nothing)".into();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_only_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "old\nnew1\nnew2\nnew3\n").unwrap();
        assert_eq!(log_tail(&p, 4, 2), "  new2\n  new3");
        assert_eq!(log_tail(&p, 4, 10), "  new1\n  new2\n  new3");
        assert_eq!(log_tail(&dir.path().join("missing"), 0, 5), "  (nothing)");
    }
}
