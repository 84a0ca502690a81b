//! Shared helpers of wick-kernel's real tests and benchmark: the cached Debian kernel package,
//! static wick-init binaries (testkit's one static build, [`static_init_binaries`]), a tiny ext4
//! root holding wick-init-probe, and a QEMU TCG boot with a wall-clock timeout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use wick_testkit::guest::static_init_binaries;

/// The marker wick-init-probe prints once it runs as the root filesystem's init.
pub const MARKER: &str = "WICK-ROOT-OK";

/// `$WICK_TEST_CACHE` (default `/var/cache/wick-test`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WICK_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wick-test"))
}

/// The Debian cloud kernel .deb, downloaded once into the cache; `Err` says why not.
pub fn debian_kernel_deb() -> Result<PathBuf, String> {
    wick_kernel::debian::download_cloud_kernel(&cache_dir().join("debian-kernel"))
        .map_err(|e| e.to_string())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|c| c.is_file())
    })
}

/// A 16 MiB ext4 image whose `/sbin/init` is `probe`.
pub fn probe_rootfs(probe: &Path, dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("rootfs");
    for d in ["sbin", "dev", "proc", "sys", "etc"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(probe, root.join("sbin/init")).map_err(|e| e.to_string())?;
    let img = dir.join("rootfs.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .output()
        .map_err(|e| format!("cannot run mkfs.ext4 (apt-get install e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(img)
}

/// The host CPU's clock in kHz (`cpu MHz` of /proc/cpuinfo), which is the guest TSC rate under
/// QEMU TCG on an x86 host.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// What a QEMU boot produced.
pub struct Boot {
    /// Console lines.
    pub console: Vec<String>,
    /// Time from spawn to the line containing the wanted text (if seen).
    pub until_wanted: Option<Duration>,
    /// QEMU exited by itself (guest power-off/reboot) within the grace period.
    pub exited_by_itself: bool,
}

/// Boots `kernel` + `initrd` with `rootfs` as a virtio-mmio disk under QEMU microvm/TCG, reading
/// the serial console until `wanted` shows up or `timeout` passes; then waits up to 15 s for QEMU
/// to exit by itself, and kills it (by pid) otherwise.
pub fn qemu_boot(
    kernel: &Path,
    initrd: Option<&Path>,
    rootfs: &Path,
    extra_append: &str,
    wanted: &str,
    timeout: Duration,
) -> Result<Boot, String> {
    let qemu = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not installed")?;
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "512",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel);
    if let Some(i) = initrd {
        cmd.arg("-initrd").arg(i);
    }
    // Under TCG on a loaded host the guest's TSC calibration against the PIT fails often and the
    // kernel then hangs early ("Marking TSC unstable due to could not calculate TSC khz"); TCG's
    // guest TSC runs at the host's rate, so tell the kernel that rate.
    let tsc = host_tsc_khz()
        .map(|k| format!(" tsc_early_khz={k}"))
        .unwrap_or_default();
    cmd.arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 root=/dev/vda{tsc} {extra_append}"
        ))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start qemu: {e}"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&l).trim_end().to_string())
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let _ = tx2.send(format!(
                "[qemu stderr] {}",
                String::from_utf8_lossy(&l).trim_end()
            ));
        }
    });
    let mut console = Vec::new();
    let mut until_wanted = None;
    let deadline = start + timeout;
    while until_wanted.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(wanted) {
                    until_wanted = Some(start.elapsed());
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Give the guest time to power off by itself.
    let grace = Instant::now() + Duration::from_secs(15);
    let mut exited_by_itself = false;
    while Instant::now() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            exited_by_itself = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !exited_by_itself {
        // Only our own child, by pid.
        let _ = child.kill();
        let _ = child.wait();
    }
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        console.push(line);
    }
    Ok(Boot {
        console,
        until_wanted,
        exited_by_itself,
    })
}
