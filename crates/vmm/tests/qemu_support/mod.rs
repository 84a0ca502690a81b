//! Shared by the QEMU driver tests and benchmark: the Debian cloud kernel from the test cache
//! (`$WICK_TEST_CACHE`, default `/var/cache/wick-test`), and whether QEMU and its vsock sidecar
//! are installed (a reason to print when they are not).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use wick_vmm::qemu::{Qemu, QemuOptions};
use wick_vmm::Vmm;

/// The test cache directory.
pub fn cache_root() -> PathBuf {
    std::env::var_os("WICK_TEST_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wick-test"))
}

/// Why the real-QEMU tests cannot run here, or `None`.
pub fn qemu_unavailable() -> Option<String> {
    Qemu::new(QemuOptions::default())
        .preflight()
        .err()
        .map(|e| e.to_string())
}

/// The Debian cloud kernel's bzImage (`boot/vmlinuz-*`), downloaded into the test cache (shared
/// with other tests under its download lock) and unpacked once under our own lock. `Err` is a
/// reason to skip.
pub fn debian_kernel() -> Result<PathBuf, String> {
    let root = cache_root();
    let deb = wick_kernel::debian::download_cloud_kernel(&root).map_err(|e| {
        format!(
            "cannot get the Debian cloud kernel into {}: {e}",
            root.display()
        )
    })?;
    let stem = deb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = root.join("qemu-driver").join(&stem);
    std::fs::create_dir_all(root.join("qemu-driver")).map_err(|e| e.to_string())?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("qemu-driver/.lock"))
        .map_err(|e| e.to_string())?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock the kernel cache: {e}"))?;
    if let Some(k) = find_vmlinuz(&dir) {
        return Ok(k);
    }
    let tmp = root.join("qemu-driver").join(format!(".x-{stem}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tmp)
        .status()
        .map_err(|e| format!("cannot run dpkg-deb: {e}"))?;
    if !st.success() {
        return Err(format!("dpkg-deb -x {} failed: {st}", deb.display()));
    }
    std::fs::rename(&tmp, &dir).map_err(|e| e.to_string())?;
    find_vmlinuz(&dir).ok_or_else(|| format!("{} has no boot/vmlinuz-*", deb.display()))
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}
