//! `accel = auto`: decide between KVM and TCG by **measuring**, not guessing.
//!
//! `/dev/kvm` existing does not mean KVM can boot a guest: on some hosts (nested, paravirtual
//! KVM variants) QEMU aborts at once with `-cpu host` (`failed to set MSR …`), or the guest
//! crawls and dies with `KVM internal error`. So the probe boots the VM's own kernel under
//! `-accel kvm -cpu host` with no root device: a working KVM reaches the kernel's
//! `VFS: Unable to mount root fs` panic in well under a second and QEMU exits (`-no-reboot`). An
//! abort, an internal error or no panic within the probe timeout means TCG.
//!
//! The verdict is cached in a JSON file, keyed by the QEMU binary (path, size, mtime) and the
//! host kernel release, so only the first VM after an upgrade pays for the probe.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::common::{remove_if_exists, tail_lines};
use crate::VmmError;

/// Console lines that mean KVM cannot run this guest (QEMU stays alive, paused, after them).
pub(crate) const KVM_FAILURES: &[&str] = &["KVM internal error", "emulation failure"];

/// A cached decision of `accel = auto`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    /// What VMs use.
    pub engine: Engine,
    /// Why, for `wick doctor` (e.g. the line QEMU died with under KVM).
    pub reason: String,
    /// Identity of the QEMU binary and host kernel this holds for.
    pub key: String,
    /// The guest kernel the probe booted.
    pub kernel: PathBuf,
    /// How long the probe took.
    pub probe_ms: u64,
    /// When (seconds since the Unix epoch).
    pub probed_at: u64,
}

/// The cache key: QEMU binary path, size and mtime, `/dev/kvm` presence and the host kernel
/// release.
pub(crate) fn cache_key(qemu: &Path) -> String {
    let (size, mtime) = std::fs::metadata(qemu)
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            (m.len(), mtime)
        })
        .unwrap_or((0, 0));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "qemu={} size={size} mtime={mtime} kvm={} host={}",
        qemu.display(),
        Path::new("/dev/kvm").exists(),
        release.trim()
    )
}

/// The cached verdict in `file` if it holds for `key`.
pub(crate) fn load(file: &Path, key: &str) -> Option<AccelVerdict> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: AccelVerdict = serde_json::from_str(&text).ok()?;
    (v.key == key).then_some(v)
}

/// Writes `v` to `file` atomically (temp file + rename).
pub(crate) fn store(file: &Path, v: &AccelVerdict) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, file)
}

/// Boots `kernel` under KVM for at most `timeout`, the console and QEMU's stderr going to
/// `log` (overwritten). Returns the engine to use and why.
pub(crate) async fn probe(
    qemu: &Path,
    kernel: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(Engine, String), VmmError> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Ok((Engine::Tcg, "/dev/kvm does not exist".into()));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return Ok((Engine::Tcg, format!("cannot open /dev/kvm read-write: {e}")));
    }
    if !kernel.is_file() {
        return Err(VmmError::Spawn(format!(
            "cannot probe KVM: guest kernel {} is not a file; check the VM's kernel",
            kernel.display()
        )));
    }
    let mut child = spawn_probe(qemu, kernel, log)?;
    let verdict = watch_probe(&mut child, log, timeout).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(verdict)
}

/// QEMU booting `kernel` under KVM, its console and stderr in `log`.
fn spawn_probe(qemu: &Path, kernel: &Path, log: &Path) -> Result<tokio::process::Child, VmmError> {
    let _ = remove_if_exists(log);
    let file = std::fs::File::create(log)
        .map_err(|e| VmmError::Spawn(format!("creating {}: {e}", log.display())))?;
    let file2 = file
        .try_clone()
        .map_err(|e| VmmError::Spawn(format!("duplicating a file handle: {e}")))?;
    tokio::process::Command::new(qemu)
        .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
        .args(["-smp", "1", "-m", "256"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-chardev"])
        .arg(super::cmdline::opt("file,id=con,append=on,path=", log, ""))
        .args(["-serial", "chardev:con", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 reboot=k"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file2))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| VmmError::Spawn(format!("running {} for the KVM probe: {e}", qemu.display())))
}

/// Reads the probe's console until it shows a verdict: a KVM failure, a kernel run to its end,
/// QEMU's exit, or too little progress by `timeout`.
async fn watch_probe(
    child: &mut tokio::process::Child,
    log: &Path,
    timeout: Duration,
) -> (Engine, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let exited = child.try_wait().ok().flatten();
        let text = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| KVM_FAILURES.iter().any(|f| l.contains(f)))
        {
            return (
                Engine::Tcg,
                format!("the guest failed under KVM: {}", line.trim()),
            );
        }
        let booted = text.contains("Linux version") && text.contains("Kernel panic");
        if booted {
            return (
                Engine::Kvm,
                "a test boot under KVM ran the kernel to its end".into(),
            );
        }
        if let Some(status) = exited {
            let last = tail_lines(log, 3).replace('\n', " | ");
            return (
                Engine::Tcg,
                format!("QEMU under KVM exited with {status}: {}", last.trim()),
            );
        }
        if Instant::now() >= deadline {
            let progressed = if text.contains("Linux version") {
                "the kernel started but did not finish booting"
            } else {
                "the kernel printed nothing"
            };
            return (
                Engine::Tcg,
                format!(
                    "a test boot under KVM made too little progress in {timeout:?} ({progressed})"
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_is_keyed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/accel-probe.json");
        let v = AccelVerdict {
            engine: Engine::Tcg,
            reason: "because".into(),
            key: "k1".into(),
            kernel: "/k".into(),
            probe_ms: 5,
            probed_at: 1,
        };
        store(&f, &v).unwrap();
        assert_eq!(load(&f, "k1"), Some(v));
        assert_eq!(load(&f, "k2"), None);
        assert_eq!(load(&dir.path().join("missing"), "k1"), None);
        std::fs::write(&f, b"not json").unwrap();
        assert_eq!(load(&f, "k1"), None);
    }

    #[test]
    fn key_names_the_binary() {
        let k = cache_key(Path::new("/bin/sh"));
        assert!(k.contains("qemu=/bin/sh"), "{k}");
        assert_ne!(k, cache_key(Path::new("/nonexistent")));
    }
}
