//! Managed boot artifacts in wickd: the image store (`state/images`) and the kernel store
//! (`state/kernels`), what a VM boots from them, and first-use preparation of the `default`
//! pair. The domain only: the `/v1/images` and `/v1/kernels` handlers are in `api::images` and
//! `api::kernels`, and the wire types in [`wick_model::api`].
//!
//! - [`Artifacts`]: list/get/delete (refused while a VM uses the artifact), import, OCI pull,
//!   golden build and prune of images ([`images`]); import, pull, list/get/delete of kernels
//!   ([`kernels`]). Everything slow runs on the blocking pool.
//! - [`jobs`]: import, pull and build as operations (the same records, event streams and
//!   cancel as VM operations), removing what a cancelled or failed job left behind.
//! - [`build`]: derived builds (`image build --from`: a builder VM, a cache keyed by the
//!   inputs) and `vm commit`, as operations.
//! - [`Artifacts::resolve`]: an image name to the files a VM boots ([`BootArtifacts`]): the
//!   image's rootfs and work-seed, and its default kernel (else the kernel named `default`).
//! - [`Artifacts::ensure_default`] ([`first_use`]): on first use, downloads the Debian cloud
//!   kernel package, imports it as kernel `default` and builds the golden image `default`
//!   (wick-agent injected). Concurrent callers share one preparation and all see its stages.
//!
//! A VM uses image `X` when its spec names `X`; it uses a kernel when its spec's kernel (or
//! initrd) path lies inside that kernel's store directory (kernel directories are
//! content-addressed, so the path identifies the kernel even if it is renamed).

pub mod build;
mod builder;
pub mod first_use;
pub mod images;
pub mod jobs;
pub mod kernels;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use wick_image::{GoldenOptions, ImageError, ImageRecord, ImageStore};
use wick_kernel::{KernelError, KernelRecord, KernelStore};
use wick_model::api::{ErrorCode, ImageView, KernelView};
use wick_model::{Paths, VmRecord};

use crate::error::{Error, Result};

/// The image `vm create` uses when none is named, and the one first use prepares.
pub const DEFAULT_IMAGE: &str = "default";
/// The kernel an image without a default kernel boots with, and the one first use imports.
pub const DEFAULT_KERNEL: &str = "default";
/// Environment variable naming the wick-agent binary to inject (overrides the search).
pub const AGENT_ENV: &str = "WICK_AGENT_BIN";

/// Names that would collide with the API's fixed routes (`/v1/images/import`, ...).
const RESERVED: &[&str] = &["import", "pull", "build", "prune"];

/// What a VM boots: resolved from an image name by [`Artifacts::resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootArtifacts {
    /// The image name.
    pub image: String,
    /// The image's root filesystem (clone it, never write it).
    pub rootfs: PathBuf,
    /// Initial contents of the work disk (`/root`), when the image has one.
    pub work_seed: Option<PathBuf>,
    /// Whether wick-agent is installed in the image.
    pub agent: bool,
    /// The image's OCI process config (pulled images).
    pub config: Option<wick_model::ImageConfig>,
    /// The ELF vmlinux (Firecracker).
    pub kernel_vmlinux: PathBuf,
    /// The original bzImage (QEMU), when the kernel came with one.
    pub kernel_bzimage: Option<PathBuf>,
    /// wick's initramfs, when the kernel's drivers are modules.
    pub initrd: Option<PathBuf>,
    /// The kernel's name in the store.
    pub kernel_name: String,
}

/// The daemon's images and kernels. Cheap to share; every call reads the disk.
pub struct Artifacts {
    images: ImageStore,
    kernels: KernelStore,
    cache: PathBuf,
    agent_bin: Option<PathBuf>,
    golden: GoldenOptions,
    first_use: Mutex<Option<Arc<first_use::Prep>>>,
    /// Names an image or kernel job is making (`image:NAME`, `kernel:NAME`).
    jobs: jobs::Names,
}

impl Artifacts {
    /// The stores under the daemon's layout: `state/images`, `state/kernels`, downloads and
    /// package caches in `cache/`.
    pub fn new(paths: &Paths) -> Result<Artifacts> {
        let images = ImageStore::new(paths.state.join("images"))?;
        let kernels = KernelStore::new(paths.state.join("kernels"))?;
        let golden = GoldenOptions {
            cache_dir: Some(paths.cache.join("debootstrap")),
            ..GoldenOptions::default()
        };
        Ok(Artifacts {
            images,
            kernels,
            cache: paths.cache.clone(),
            agent_bin: None,
            golden,
            first_use: Mutex::new(None),
            jobs: jobs::Names::default(),
        })
    }

    /// Injects this wick-agent instead of searching for one.
    pub fn with_agent_binary(mut self, path: impl Into<PathBuf>) -> Artifacts {
        self.agent_bin = Some(path.into());
        self
    }

    /// Uses this static wick-init for initramfs builds (default: searched by wick-kernel).
    pub fn with_init_binary(mut self, path: impl Into<PathBuf>) -> Artifacts {
        self.kernels = self.kernels.clone().with_init_binary(path);
        self
    }

    /// Rebuilds the initramfs of kernels imported by an older wick (a changed wick-init or
    /// driver list), so they boot this wick's guests; logged, never fatal (a kernel that cannot
    /// be refreshed fails its own boots with the reason).
    pub fn refresh_initramfs(&self) {
        match self.kernels.refresh_initramfs() {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => tracing::info!(kernel = %name, "rebuilt out-of-date initramfs"),
                        Err(why) => tracing::warn!("could not refresh an initramfs: {why}"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check the kernels' initramfs"),
        }
    }

    /// Options of golden builds (suite, mirror, sizes, package cache); the name and the agent
    /// are set per build.
    pub fn with_golden_options(mut self, opts: GoldenOptions) -> Artifacts {
        self.golden = opts;
        self
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The kernel store.
    pub fn kernels(&self) -> &KernelStore {
        &self.kernels
    }

    /// The wick-agent binary to inject: `$WICK_AGENT_BIN`, else the first static one of: the
    /// `x86_64-unknown-linux-gnu` build of the running executable's profile, next to it (for
    /// test binaries in `target/*/deps`, their parent), on `PATH`; else the first of those.
    pub fn agent_binary(&self) -> Result<PathBuf> {
        if let Some(p) = &self.agent_bin {
            return Ok(p.clone());
        }
        locate_agent()
    }

    /// What a VM created from image `image` boots: the image's files and its default kernel
    /// (else the kernel named `default`). Reads a few small JSON files.
    pub fn resolve(&self, image: &str) -> Result<BootArtifacts> {
        let img = self.images.get(image)?;
        let kernel_name = img
            .default_kernel
            .clone()
            .unwrap_or_else(|| DEFAULT_KERNEL.to_string());
        let k = self.kernels.get(&kernel_name).map_err(|e| match e {
            KernelError::NotFound(_) => Error::precondition(format!(
                "image {image:?} boots with kernel {kernel_name:?}, which is not imported; add it \
                 with `wick kernel import PATH --name {kernel_name}` (`wick kernel list` shows \
                 the kernels there are)"
            )),
            e => Error::from(e),
        })?;
        Ok(BootArtifacts {
            image: img.name,
            rootfs: img.rootfs,
            work_seed: img.work_seed,
            agent: img.agent_injected,
            config: img.config.map(model_config),
            kernel_vmlinux: k.vmlinux,
            kernel_bzimage: k.bzimage,
            initrd: k.initrd,
            kernel_name: k.name,
        })
    }

    /// Whether the `default` image resolves (it exists and so does its kernel).
    pub fn default_ready(&self) -> bool {
        self.resolve(DEFAULT_IMAGE).is_ok()
    }
}

// ---------------------------------------------------------------------- views

/// An image record as the API shows it, with the VMs of `vms` using it.
pub fn image_view(image: ImageRecord, vms: &[VmRecord]) -> ImageView {
    use wick_image::ImageSource as S;
    use wick_model::api::ImageSource as V;
    let used_by = image_users(&image.name, vms);
    ImageView {
        source: match image.source {
            S::Build {
                suite,
                mirror,
                packages,
            } => V::Build {
                suite,
                mirror,
                packages,
            },
            S::Import { path } => V::Import { path },
            S::Oci {
                reference,
                digest,
                layers,
            } => V::Oci {
                reference,
                digest,
                layers,
            },
            S::Derived {
                base,
                base_id,
                packages,
                run,
                copied,
            } => V::Derived {
                base,
                base_id,
                packages,
                run,
                copied,
            },
            S::Commit { vm, base } => V::Commit { vm, base },
        },
        name: image.name,
        id: image.id,
        created_at: image.created_at,
        rootfs: image.rootfs,
        work_seed: image.work_seed,
        size: image.size,
        default_kernel: image.default_kernel,
        agent_injected: image.agent_injected,
        build_key: image.build_key,
        config: image.config.map(model_config),
        used_by,
    }
}

/// An image's OCI process config in the model's words.
pub fn model_config(c: wick_image::ImageConfig) -> wick_model::ImageConfig {
    wick_model::ImageConfig {
        env: c.env,
        working_dir: c.working_dir,
        user: c.user,
        entrypoint: c.entrypoint,
        cmd: c.cmd,
    }
}

/// A kernel record as the API shows it, with the VMs of `vms` booting it.
pub fn kernel_view(kernel: KernelRecord, vms: &[VmRecord]) -> KernelView {
    use wick_kernel::bzimage::Compression as C;
    use wick_kernel::KernelFormat as F;
    use wick_model::api::{KernelCompression as VC, KernelFormat as VF};
    let used_by = kernel_users(&kernel, vms);
    let features = wick_kernel::caps::features(&kernel)
        .into_iter()
        .map(|f| wick_model::api::KernelFeature {
            feature: f.feature,
            driver: f.driver,
            state: match f.state {
                wick_kernel::caps::DriverState::Builtin => wick_model::api::DriverState::Builtin,
                wick_kernel::caps::DriverState::Module => wick_model::api::DriverState::Module,
                wick_kernel::caps::DriverState::Missing => wick_model::api::DriverState::Missing,
                wick_kernel::caps::DriverState::Unknown => wick_model::api::DriverState::Unknown,
            },
        })
        .collect();
    KernelView {
        source_format: match kernel.source_format {
            F::Elf => VF::Elf,
            F::BzImage => VF::BzImage,
            F::Deb => VF::Deb,
        },
        compression: kernel.compression.map(|c| match c {
            C::Gzip => VC::Gzip,
            C::Xz => VC::Xz,
            C::Lzma => VC::Lzma,
            C::Lz4 => VC::Lz4,
            C::Zstd => VC::Zstd,
            C::Bzip2 => VC::Bzip2,
        }),
        name: kernel.name,
        version: kernel.version,
        sha256: kernel.sha256,
        vmlinux: kernel.vmlinux,
        bzimage: kernel.bzimage,
        initrd: kernel.initrd,
        modules_dir: kernel.modules_dir,
        has_pvh_note: kernel.has_pvh_note,
        needs_initramfs: kernel.needs_initramfs,
        initrd_modules: kernel.initrd_modules,
        builtin_drivers: kernel.builtin_drivers,
        warnings: kernel.warnings,
        imported_at: kernel.imported_at,
        features,
        used_by,
    }
}

// ---------------------------------------------------------------------- helpers

/// Names of the VMs whose spec names image `name`.
pub fn image_users(name: &str, vms: &[VmRecord]) -> Vec<String> {
    vms.iter()
        .filter(|v| v.spec.image == name)
        .map(|v| v.name.clone())
        .collect()
}

/// Names of the VMs whose kernel or initrd lies inside kernel `k`'s directory.
pub fn kernel_users(k: &KernelRecord, vms: &[VmRecord]) -> Vec<String> {
    let dir = k.dir();
    vms.iter()
        .filter(|v| {
            v.spec.kernel.starts_with(dir)
                || v.spec.initrd.as_deref().is_some_and(|i| i.starts_with(dir))
        })
        .map(|v| v.name.clone())
        .collect()
}

fn in_use_error(what: &str, name: &str, users: &[String]) -> Error {
    Error::conflict(format!(
        "{what} {name:?} is used by VM{} {}; delete {} first (`wick vm delete {}`)",
        if users.len() == 1 { "" } else { "s" },
        users.join(", "),
        if users.len() == 1 { "it" } else { "them" },
        users.join(" ")
    ))
}

fn check_reserved(name: &str) -> Result<()> {
    if RESERVED.contains(&name) {
        return Err(Error::invalid(format!(
            "{name:?} is reserved (it is an API verb); choose another name"
        )));
    }
    Ok(())
}

/// Checks that the file an import reads exists on the daemon's host.
pub fn check_source(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "{} is not an absolute path (the daemon has another working directory)",
            path.display()
        )));
    }
    if !path.is_file() {
        return Err(Error::invalid(format!(
            "{} does not exist or is not a file",
            path.display()
        )));
    }
    Ok(())
}

/// See [`Artifacts::agent_binary`].
fn locate_agent() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(AGENT_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(Error::precondition(format!(
            "{AGENT_ENV}={} does not exist; point it at a wick-agent binary",
            p.display()
        )));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let dir = match dir.file_name().is_some_and(|n| n == "deps") {
            true => dir.parent().map(Path::to_path_buf).unwrap_or(dir),
            false => dir,
        };
        // `./wick` builds the agent static (`+crt-static` for x86_64-unknown-linux-gnu), as
        // images without glibc (busybox, musl) need.
        if let (Some(target), Some(profile)) = (dir.parent(), dir.file_name()) {
            candidates.push(
                target
                    .join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("wick-agent"),
            );
        }
        candidates.push(dir.join("wick-agent"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("wick-agent")));
    }
    candidates.retain(|c| c.is_file());
    // A static agent runs in every image; a dynamic one only in images with a matching glibc.
    let static_first = candidates
        .iter()
        .position(|c| wick_kernel::initramfs::is_static_elf(c))
        .unwrap_or(0);
    candidates.into_iter().nth(static_first).ok_or_else(|| {
        Error::precondition(
            "wick-agent was not found next to wickd or on PATH, and images need it; install \
             it next to wickd (`cargo build --release -p wick-agent`), or set WICK_AGENT_BIN",
        )
    })
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("a blocking task failed: {e}")))?
}

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Error {
        let code = match &e {
            ImageError::NotFound(_) => ErrorCode::NotFound,
            ImageError::Exists(_) => ErrorCode::Conflict,
            ImageError::InvalidName { .. }
            | ImageError::Invalid(_)
            | ImageError::UnsafeEntry { .. }
            | ImageError::Digest { .. } => ErrorCode::InvalidArgument,
            ImageError::MissingTool { .. }
            | ImageError::Unsupported(_)
            | ImageError::Registry(_) => ErrorCode::FailedPrecondition,
            _ => ErrorCode::Internal,
        };
        Error::new(code, e.to_string())
    }
}

impl From<KernelError> for Error {
    fn from(e: KernelError) -> Error {
        let code = match &e {
            KernelError::NotFound(_) => ErrorCode::NotFound,
            KernelError::AlreadyExists(_) => ErrorCode::Conflict,
            KernelError::Invalid(_) => ErrorCode::InvalidArgument,
            KernelError::Tool(_) | KernelError::Download(_) => ErrorCode::FailedPrecondition,
            _ => ErrorCode::Internal,
        };
        Error::new(code, e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use wick_model::{Paths, VmRecord};

    use super::Artifacts;

    pub fn vm(name: &str, image: &str, kernel: &Path) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "id": format!("{:0>32}", name.len()), "name": name, "owner": 0, "state": "stopped",
            "spec": {"vcpu": 1, "memory_mib": 512, "disk_mib": 1024, "image": image,
                     "kernel": kernel, "initrd": null, "boot_args": "", "vmm": "firecracker"},
            "runtime": {"dir": "/d", "root_disk": null, "guest_cid": 3, "vmm": null},
            "created_at": "t", "updated_at": "t", "touched_at": "t"
        }))
        .unwrap()
    }

    /// A fake kernel: an ELF64 x86_64 header and nothing else (no PVH note, no modules).
    pub fn fake_vmlinux(path: &Path, salt: u8) {
        let mut d = vec![0u8; 4096];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[6] = 1;
        d[16..18].copy_from_slice(&2u16.to_le_bytes());
        d[18..20].copy_from_slice(&62u16.to_le_bytes());
        d[100] = salt;
        std::fs::write(path, d).unwrap();
    }

    /// A small ext4 made with `mkfs.ext4 -d`, or `None` (with the reason printed) without it.
    pub fn small_ext4(dir: &Path) -> Option<PathBuf> {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hostname"), "t\n").unwrap();
        let img = dir.join("root.ext4");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("16M")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: mkfs.ext4 (e2fsprogs) is not available");
            return None;
        }
        Some(img)
    }

    pub fn artifacts(dir: &Path) -> Artifacts {
        Artifacts::new(&Paths::new(Some(&dir.join("root")))).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[tokio::test]
    async fn resolution_uses_the_images_kernel_else_default() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = small_ext4(d.path()) else {
            return;
        };
        let a = artifacts(d.path());
        a.import_image(img, "base".into(), |_| {}).await.unwrap();
        let e = a.resolve("base").unwrap_err();
        assert_eq!(e.code(), ErrorCode::FailedPrecondition);
        assert!(e.message().contains("kernel \"default\""), "{e}");
        assert_eq!(a.resolve("nope").unwrap_err().code(), ErrorCode::NotFound);
        assert!(!a.default_ready());

        let (k1, k2) = (d.path().join("k1"), d.path().join("k2"));
        fake_vmlinux(&k1, 1);
        fake_vmlinux(&k2, 2);
        let def = a.import_kernel(k1, "default".into()).await.unwrap();
        let other = a.import_kernel(k2, "other".into()).await.unwrap();
        let b = a.resolve("base").unwrap();
        assert_eq!(b.kernel_name, "default");
        assert_eq!(b.kernel_vmlinux, def.vmlinux);
        assert_eq!(b.image, "base");
        assert!(b.rootfs.is_file() && b.work_seed.is_none() && !b.agent);
        assert!(b.initrd.is_none() && b.kernel_bzimage.is_none());

        a.images()
            .set_default_kernel("base", Some("other"))
            .unwrap();
        let b = a.resolve("base").unwrap();
        assert_eq!(
            (b.kernel_name.as_str(), &b.kernel_vmlinux),
            ("other", &other.vmlinux)
        );
    }

    #[tokio::test]
    async fn views_carry_every_record_field() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let src = d.path().join("vmlinux");
        fake_vmlinux(&src, 1);
        let k = a.import_kernel(src, "k1".into()).await.unwrap();
        let vms = [vm("a1", "x", &k.vmlinux)];
        // The wire type is the record's JSON plus `used_by`, field for field.
        let mut want = serde_json::to_value(&k).unwrap();
        want["used_by"] = serde_json::json!(["a1"]);
        // Plus what it can do: no modules, so every driver is assumed built in.
        let features: Vec<_> = wick_kernel::caps::FEATURES
            .iter()
            .map(|(f, d)| serde_json::json!({"feature": f, "driver": d, "state": "unknown"}))
            .collect();
        want["features"] = serde_json::json!(features);
        let got = serde_json::to_value(kernel_view(k, &vms)).unwrap();
        assert_eq!(got, want);

        let rec: ImageRecord = serde_json::from_value(serde_json::json!({
            "name": "i", "id": "ab", "created_at": "2024-05-01T12:00:00Z",
            "source": {"kind": "oci", "reference": "r/x:1", "digest": "sha256:1", "layers": ["l"]},
            "rootfs": "/r", "work_seed": null, "size": 5, "default_kernel": null,
            "agent_injected": true
        }))
        .unwrap();
        let mut want = serde_json::to_value(&rec).unwrap();
        want["used_by"] = serde_json::json!([]);
        assert_eq!(serde_json::to_value(image_view(rec, &vms)).unwrap(), want);
    }

    #[test]
    fn small_helpers() {
        assert!(check_reserved("prune").is_err() && check_reserved("p").is_ok());
        let e = in_use_error("image", "x", &["a".into()]);
        assert_eq!(
            e.message(),
            "image \"x\" is used by VM a; delete it first (`wick vm delete a`)"
        );
        assert!(check_source(Path::new("rel/x")).is_err());
        assert!(check_source(Path::new("/nonexistent/x")).is_err());
    }
}
