//! Real guest assets for end-to-end tests: the golden Debian image with the real `wick-agent`
//! injected, and the Debian cloud kernel imported with its initramfs (built around a static
//! `wick-init`). Both are cached under `$WICK_TEST_CACHE` (default `/var/cache/wick-test`), so
//! only the first run pays for debootstrap (~45 s) and the kernel download.
//!
//! Every function returns `Err(reason)` when the host cannot provide the assets; tests print the
//! reason and skip — they never pretend to pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cargo_bin;

/// What a QEMU guest boots from.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub rootfs: PathBuf,
    pub work_seed: PathBuf,
    /// bzImage (QEMU's `-kernel`).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestAssets {
    /// A QEMU (TCG) daemon config whose `default` image is these assets (the golden image
    /// with this build's agent), with `extra` top-level settings.
    pub fn qemu_config(&self, extra: &str) -> String {
        format!(
            r#"vmm = "qemu"
accel = "tcg"
boot_timeout = "180s"
{extra}

[images.default]
rootfs = {rootfs:?}
work_seed = {seed:?}
kernel = {kernel:?}
initrd = {initrd:?}
agent = true
boot_args = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw"
"#,
            rootfs = self.rootfs,
            seed = self.work_seed,
            kernel = self.kernel,
            initrd = self.initrd,
        )
    }
}

fn cache() -> PathBuf {
    wick_image::testcache::cache_root()
}

fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// A static `wick-init`: `$WICK_INIT_BIN` / the usual build when it is static, else the one
/// [`static_init_binaries`] builds.
pub fn static_wick_init() -> Result<PathBuf, String> {
    if let Ok(p) = wick_kernel::initramfs::locate_init_binary() {
        return Ok(p);
    }
    build_static_init().map(|(init, _)| init)
}

/// Static `wick-init` and `wick-init-probe` (an init that prints a marker, for boot tests):
/// `$WICK_INIT_BIN` / the usual build when both are static, else both built into
/// `target/wick-init-static` with `+crt-static` (a separate target dir, so this nested cargo
/// never waits for the outer one's lock).
pub fn static_init_binaries() -> Result<(PathBuf, PathBuf), String> {
    if let Ok(init) = wick_kernel::initramfs::locate_init_binary() {
        let probe = init.with_file_name("wick-init-probe");
        if wick_kernel::initramfs::is_static_elf(&probe) {
            return Ok((init, probe));
        }
    }
    build_static_init()
}

/// The one static build of the `wick-init` package (both its binaries).
fn build_static_init() -> Result<(PathBuf, PathBuf), String> {
    let rel = static_build("wick-init")?;
    let (init, probe) = (rel.join("wick-init"), rel.join("wick-init-probe"));
    for b in [&init, &probe] {
        if !wick_kernel::initramfs::is_static_elf(b) {
            return Err(format!("{} is not a static binary", b.display()));
        }
    }
    Ok((init, probe))
}

/// Builds `package` with `+crt-static` for x86_64-unknown-linux-gnu into
/// `target/wick-init-static` (a separate target dir, so this nested cargo never waits on the
/// outer build's lock) and returns the directory holding its binaries.
fn static_build(package: &str) -> Result<PathBuf, String> {
    let dir = target_dir().join("wick-init-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map_err(|e| format!("cannot run cargo to build {package}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building static {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir.join("x86_64-unknown-linux-gnu/release"))
}

/// 32-bit FNV-1a of `s` (a short, stable name suffix).
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A static `wick-agent` (`+crt-static`, in `target/wick-init-static` like wick-init), for
/// images without glibc (busybox, musl): the agent that image injection puts in such images.
pub fn static_agent() -> Result<PathBuf, String> {
    let agent = static_build("wick-agent")?.join("wick-agent");
    if !wick_kernel::initramfs::is_static_elf(&agent) {
        return Err(format!("{} is not a static binary", agent.display()));
    }
    Ok(agent)
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Why a QEMU guest cannot run here, if it cannot.
pub fn qemu_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed (scripts/install-host-deps)".into());
    }
    wick_image::testcache::golden_unavailable()
}

/// The golden image (with the real agent) and the imported Debian kernel, from the cache or
/// made now.
pub fn guest_assets() -> Result<GuestAssets, String> {
    if let Some(why) = qemu_unavailable() {
        return Err(why);
    }
    let agent = cargo_bin("wick-agent");
    let golden =
        wick_image::testcache::golden(Some(&agent), &mut |s| eprintln!("golden image: {s}"))
            .map_err(|e| format!("golden image: {e}"))?;
    let init = static_wick_init()?;
    let deb = wick_kernel::debian::download_cloud_kernel(&cache().join("debian-kernel"))
        .map_err(|e| format!("Debian cloud kernel: {e}"))?;
    // One store per initramfs driver list: a kernel imported before a driver was added (say
    // virtio_console, QEMU's agent channel) is not reused, nor removed under another worktree's
    // running test.
    let drivers = fnv1a(&wick_kernel::REQUIRED_DRIVERS.join(","));
    let store =
        wick_kernel::store::KernelStore::new(cache().join(format!("e2e-kernels-{drivers:08x}")))
            .map_err(|e| e.to_string())?
            .with_init_binary(init);
    let rec = match store.get("debian") {
        Ok(r) => r,
        Err(_) => store
            .import(&deb, "debian")
            .map_err(|e| format!("kernel import: {e}"))?,
    };
    Ok(GuestAssets {
        rootfs: golden.rootfs,
        work_seed: golden.work_seed,
        kernel: rec
            .bzimage
            .clone()
            .ok_or("the Debian kernel has no bzImage")?,
        initrd: rec
            .initrd
            .clone()
            .ok_or("the Debian kernel has no initramfs")?,
    })
}
