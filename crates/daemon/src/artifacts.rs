//! Managed boot artifacts in wickd: the image store (`state/images`) and the kernel store
//! (`state/kernels`), what a VM boots from them, first-use preparation of the `default` pair, and
//! their `/v1/images` and `/v1/kernels` API.
//!
//! - [`Artifacts`]: list/get/delete (refused while a VM uses the artifact), import, OCI pull,
//!   golden build and prune of images; import, pull, list/get/delete of kernels. Everything slow
//!   runs on the blocking pool.
//! - [`Artifacts::resolve`]: an image name to the files a VM boots ([`BootArtifacts`]): the
//!   image's rootfs and work-seed, and its default kernel (else the kernel named `default`).
//! - [`Artifacts::ensure_default`]: on first use, downloads the Debian cloud kernel package,
//!   imports it as kernel `default` and builds the golden image `default` (wick-agent injected).
//!   Concurrent callers share one preparation and all see its stages.
//! - [`routes`]: the HTTP handlers. Long requests (import, pull, build) answer with an NDJSON
//!   stream of [`ProgressLine`]s: `{"stage": ...}` lines, then one `{"image": ...}`,
//!   `{"kernel": ...}` or `{"error": ...}` line.
//!
//! A VM uses image `X` when its spec names `X`; it uses a kernel when its spec's kernel (or
//! initrd) path lies inside that kernel's store directory (kernel directories are
//! content-addressed, so the path identifies the kernel even if it is renamed).

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use wick_image::{oci, GoldenOptions, ImageError, ImageRecord, ImageStore, ImportOptions};
use wick_kernel::{KernelError, KernelRecord, KernelStore};
use wick_model::api::{ApiError, ErrorCode};
use wick_model::{Paths, VmRecord};

use crate::api::{Body, PeerCred};
use crate::daemon::Daemon;
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
    /// The ELF vmlinux (Firecracker).
    pub kernel_vmlinux: PathBuf,
    /// The original bzImage (QEMU), when the kernel came with one.
    pub kernel_bzimage: Option<PathBuf>,
    /// wick's initramfs, when the kernel's drivers are modules.
    pub initrd: Option<PathBuf>,
    /// The kernel's name in the store.
    pub kernel_name: String,
}

/// An image as the API shows it: the record plus the VMs (visible to the caller) using it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    #[serde(flatten)]
    pub image: ImageRecord,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// A kernel as the API shows it: the record plus the VMs (visible to the caller) using it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelView {
    #[serde(flatten)]
    pub kernel: KernelRecord,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

/// `GET /v1/kernels`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelList {
    pub kernels: Vec<KernelView>,
}

/// What `POST /v1/images/prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneImagesResult {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

/// `POST /v1/images/import` and `POST /v1/kernels/import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Absolute path on the daemon's host: a rootfs tarball or ext4 file (images), a vmlinux,
    /// bzImage or kernel `.deb` (kernels).
    pub path: PathBuf,
    pub name: String,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullImageRequest {
    /// `REGISTRY/REPOSITORY[:TAG|@DIGEST]`.
    pub reference: String,
    pub name: String,
    /// Speak plain HTTP to the reference's registry.
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/build`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildImageRequest {
    /// Image name (default `default`).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/kernels/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullKernelRequest {
    pub url: String,
    /// Expected sha256 of the downloaded file (64 hex digits).
    pub sha256: String,
    pub name: String,
}

/// One line of a progress stream: a stage, or the final result (exactly one of `image`,
/// `kernel`, `error`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Milliseconds since the request began.
    #[serde(default)]
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// The daemon's images and kernels. Cheap to share; every call reads the disk.
pub struct Artifacts {
    images: ImageStore,
    kernels: KernelStore,
    cache: PathBuf,
    agent_bin: Option<PathBuf>,
    golden: GoldenOptions,
    first_use: Mutex<Option<Arc<Prep>>>,
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

    /// The wick-agent binary to inject: `$WICK_AGENT_BIN`, else next to the running executable
    /// (and its parent directory, for test binaries in `target/*/deps`), else on `PATH`.
    pub fn agent_binary(&self) -> Result<PathBuf> {
        if let Some(p) = &self.agent_bin {
            return Ok(p.clone());
        }
        locate_agent()
    }

    // ------------------------------------------------------------------ images

    /// Every image, sorted by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.images.list()?)
    }

    /// The image called `name`.
    pub fn get_image(&self, name: &str) -> Result<ImageRecord> {
        Ok(self.images.get(name)?)
    }

    /// Deletes image `name`, refused with `conflict` while any VM of `in_use` uses it.
    pub async fn delete_image(&self, name: &str, in_use: &[VmRecord]) -> Result<ImageRecord> {
        let users = image_users(name, in_use);
        if !users.is_empty() {
            return Err(in_use_error("image", name, &users));
        }
        let store = self.images.clone();
        let name = name.to_string();
        blocking(move || Ok(store.delete(&name)?)).await
    }

    /// Imports a rootfs tarball or an ext4 file as image `name`. Tarballs get wick-agent
    /// injected when one is found; ext4 files are taken as they are (never mounted).
    pub async fn import_image(
        &self,
        path: PathBuf,
        name: String,
        mut progress: impl FnMut(&str) + Send + 'static,
    ) -> Result<ImageRecord> {
        check_reserved(&name)?;
        let store = self.images.clone();
        let agent = if is_ext4(&path) {
            None
        } else {
            match self.agent_binary() {
                Ok(a) => Some(a),
                Err(e) => {
                    progress(&format!("importing without wick-agent: {}", e.message()));
                    None
                }
            }
        };
        blocking(move || {
            let opts = ImportOptions {
                agent_bin: agent,
                ..ImportOptions::default()
            };
            Ok(store.import_with(&path, &name, &opts, &mut progress)?)
        })
        .await
    }

    /// Pulls an OCI image (linux/amd64) as image `name`, wick-agent injected when one is found.
    /// `insecure` speaks plain HTTP to the reference's registry.
    pub async fn pull_image(
        &self,
        reference: String,
        name: String,
        insecure: bool,
        mut progress: impl FnMut(&str) + Send + 'static,
    ) -> Result<ImageRecord> {
        check_reserved(&name)?;
        let agent = match self.agent_binary() {
            Ok(a) => Some(a),
            Err(e) => {
                progress(&format!("pulling without wick-agent: {}", e.message()));
                None
            }
        };
        let insecure_registries = match (insecure, registry_of(&reference)) {
            (false, _) => Vec::new(),
            (true, Some(r)) => vec![r],
            (true, None) => {
                return Err(Error::invalid(format!(
                    "--insecure needs a reference that names its registry \
                     (HOST[:PORT]/REPOSITORY[:TAG]), got {reference:?}"
                )))
            }
        };
        let opts = oci::PullOptions {
            agent_bin: agent,
            insecure_registries,
            ..oci::PullOptions::default()
        };
        let store = self.images.clone();
        blocking(move || Ok(oci::pull(&store, &reference, &name, &opts, &mut progress)?)).await
    }

    /// Builds the golden Debian image as `name` with wick-agent injected (which must be found).
    pub async fn build_image(
        &self,
        name: String,
        progress: impl FnMut(&str) + Send + 'static,
    ) -> Result<ImageRecord> {
        check_reserved(&name)?;
        let agent = self.agent_binary()?;
        let opts = GoldenOptions {
            name,
            agent_bin: Some(agent),
            ..self.golden.clone()
        };
        let store = self.images.clone();
        blocking(move || {
            let mut coarse = Coarse::new(progress);
            Ok(store.build_golden(&opts, &mut |s| coarse.emit(s))?)
        })
        .await
    }

    /// Removes image files no name points at, dead builds' staging directories and unused
    /// cached OCI layers.
    pub async fn prune_images(&self) -> Result<PruneImagesResult> {
        let store = self.images.clone();
        blocking(move || {
            let r = store.prune()?;
            Ok(PruneImagesResult {
                removed: r.removed,
                freed_bytes: r.freed_bytes,
            })
        })
        .await
    }

    // ----------------------------------------------------------------- kernels

    /// Every kernel, sorted by name.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>> {
        Ok(self.kernels.list()?)
    }

    /// The kernel called `name`.
    pub fn get_kernel(&self, name: &str) -> Result<KernelRecord> {
        Ok(self.kernels.get(name)?)
    }

    /// Deletes kernel `name`, refused with `conflict` while any VM of `in_use` boots it.
    pub async fn delete_kernel(&self, name: &str, in_use: &[VmRecord]) -> Result<KernelRecord> {
        let rec = self.get_kernel(name)?;
        let users = kernel_users(&rec, in_use);
        if !users.is_empty() {
            return Err(in_use_error("kernel", name, &users));
        }
        let store = self.kernels.clone();
        blocking(move || {
            store.delete(&rec.name)?;
            Ok(rec)
        })
        .await
    }

    /// Imports an ELF vmlinux, a bzImage/vmlinuz or a kernel `.deb` as kernel `name`.
    pub async fn import_kernel(&self, path: PathBuf, name: String) -> Result<KernelRecord> {
        check_reserved(&name)?;
        let store = self.kernels.clone();
        blocking(move || Ok(store.import(&path, &name)?)).await
    }

    /// Downloads a kernel file, verifies its sha256 and imports it as kernel `name`.
    pub async fn pull_kernel(
        &self,
        url: String,
        sha256: String,
        name: String,
    ) -> Result<KernelRecord> {
        check_reserved(&name)?;
        let store = self.kernels.clone();
        blocking(move || Ok(store.pull(&url, &sha256, &name)?)).await
    }

    // -------------------------------------------------------------- resolution

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

    /// First use: when the `default` image or its kernel is missing, prepares them once —
    /// downloads the Debian cloud kernel package into `cache/debian-kernel`, imports it as
    /// kernel `default`, builds the golden image `default` with wick-agent and makes that kernel
    /// its default. Concurrent callers wait for the same preparation, and every caller's
    /// `progress` sees all of its stages. The preparation runs to its end even if the callers
    /// go away.
    pub async fn ensure_default(&self, progress: impl FnMut(&str) + Send) -> Result<()> {
        if self.default_ready() {
            return Ok(());
        }
        let prep = {
            let mut slot = self.first_use.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(p) if !p.finished() => p.clone(),
                _ => {
                    let p = Arc::new(Prep::new());
                    *slot = Some(p.clone());
                    self.spawn_preparation(p.clone());
                    p
                }
            }
        };
        prep.follow(progress).await
    }

    fn spawn_preparation(&self, prep: Arc<Prep>) {
        let images = self.images.clone();
        let kernels = self.kernels.clone();
        let cache = self.cache.clone();
        let golden = self.golden.clone();
        let agent = self.agent_bin.clone();
        tokio::spawn(async move {
            let p = prep.clone();
            let out = blocking(move || {
                prepare_defaults(&images, &kernels, &cache, golden, agent, &mut |s| {
                    p.stage(s)
                })
            })
            .await;
            if let Err(e) = &out {
                tracing::error!(error = %e, "preparing the default image and kernel failed");
            }
            prep.finish(out);
        });
    }
}

/// The blocking body of [`Artifacts::ensure_default`].
fn prepare_defaults(
    images: &ImageStore,
    kernels: &KernelStore,
    cache: &Path,
    golden: GoldenOptions,
    agent: Option<PathBuf>,
    stage: &mut dyn FnMut(&str),
) -> Result<()> {
    let kernel_name = match kernels.get(DEFAULT_KERNEL) {
        Ok(k) => k.name,
        Err(KernelError::NotFound(_)) => {
            stage("download kernel: Debian cloud kernel package");
            let deb = wick_kernel::debian::download_cloud_kernel(&cache.join("debian-kernel"))?;
            stage(&format!(
                "import kernel: {}",
                deb.file_name().unwrap_or_default().to_string_lossy()
            ));
            match kernels.import(&deb, DEFAULT_KERNEL) {
                Ok(k) => k.name,
                Err(KernelError::AlreadyExists(msg)) => {
                    // The same package is already imported under another name: use it.
                    let sum = wick_kernel::store::sha256_file(&deb)?;
                    kernels
                        .list()?
                        .into_iter()
                        .find(|k| k.sha256 == sum)
                        .map(|k| k.name)
                        .ok_or_else(|| Error::conflict(msg))?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let built = if images.exists(DEFAULT_IMAGE)? {
        false
    } else {
        let agent = match agent {
            Some(a) => a,
            None => locate_agent()?,
        };
        let opts = GoldenOptions {
            name: DEFAULT_IMAGE.to_string(),
            agent_bin: Some(agent),
            ..golden
        };
        let mut coarse = Coarse::new(|s: &str| stage(s));
        images.build_golden(&opts, &mut |s| coarse.emit(s))?;
        true
    };
    let img = images.get(DEFAULT_IMAGE)?;
    if built || (img.default_kernel.is_none() && kernel_name != DEFAULT_KERNEL) {
        stage(&format!("set default kernel: {kernel_name}"));
        images.set_default_kernel(DEFAULT_IMAGE, Some(&kernel_name))?;
    }
    Ok(())
}

/// One first-use preparation: its stages so far and, once over, its outcome.
struct Prep {
    state: Mutex<PrepState>,
    tx: watch::Sender<usize>,
}

#[derive(Default)]
struct PrepState {
    stages: Vec<String>,
    outcome: Option<Result<()>>,
}

impl Prep {
    fn new() -> Prep {
        Prep {
            state: Mutex::new(PrepState::default()),
            tx: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrepState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stage(&self, s: &str) {
        let n = {
            let mut st = self.lock();
            st.stages.push(s.to_string());
            st.stages.len()
        };
        self.tx.send_replace(n);
    }

    fn finish(&self, out: Result<()>) {
        let n = {
            let mut st = self.lock();
            st.outcome = Some(out);
            st.stages.len() + 1
        };
        self.tx.send_replace(n);
    }

    fn finished(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Replays every stage to `progress`, then follows new ones until the outcome.
    async fn follow(&self, mut progress: impl FnMut(&str)) -> Result<()> {
        let mut rx = self.tx.subscribe();
        let mut seen = 0;
        loop {
            rx.borrow_and_update();
            let (new, outcome) = {
                let st = self.lock();
                (st.stages[seen..].to_vec(), st.outcome.clone())
            };
            seen += new.len();
            for s in &new {
                progress(s);
            }
            if let Some(out) = outcome {
                return out;
            }
            if rx.changed().await.is_err() {
                return Err(Error::internal("the first-use preparation vanished"));
            }
        }
    }
}

/// Turns the golden build's chatty progress (one debootstrap line per package and step) into
/// stages: `build image: debootstrap: retrieving packages`, ... emitted when they change.
struct Coarse<F: FnMut(&str)> {
    out: F,
    last: String,
}

impl<F: FnMut(&str)> Coarse<F> {
    fn new(out: F) -> Coarse<F> {
        Coarse {
            out,
            last: String::new(),
        }
    }

    fn emit(&mut self, msg: &str) {
        let stage = coarse_stage(msg);
        if stage != self.last {
            (self.out)(&stage);
            self.last = stage;
        }
    }
}

/// The stage a golden build progress message belongs to.
fn coarse_stage(msg: &str) -> String {
    const PER_PACKAGE: &[&str] = &[
        "Retrieving",
        "Validating",
        "Extracting",
        "Unpacking",
        "Configuring",
        "Installing",
    ];
    if let Some(rest) = msg.strip_prefix("debootstrap: ") {
        let verb = rest.split_whitespace().next().unwrap_or("");
        if PER_PACKAGE.contains(&verb) {
            return format!("build image: debootstrap: {} packages", verb.to_lowercase());
        }
    }
    format!("build image: {msg}")
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

/// Whether `path` carries the ext2/3/4 superblock magic.
fn is_ext4(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(1024 + 56))?;
            f.read_exact(&mut magic)
        })
        .is_ok()
        && magic == [0x53, 0xef]
}

/// The registry part (`host[:port]`) of an OCI reference that names one explicitly.
fn registry_of(reference: &str) -> Option<String> {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            Some(first.to_string())
        }
        _ => None,
    }
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
        candidates.push(dir.join("wick-agent"));
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(up) = dir.parent() {
                candidates.push(up.join("wick-agent"));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("wick-agent")));
    }
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
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

// ------------------------------------------------------------------------- API

type D = State<Arc<Daemon>>;

/// The `/v1/images` and `/v1/kernels` routes, to merge into the daemon's router.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/prune", post(prune_images))
        .route("/v1/images/{name}", get(show_image).delete(delete_image))
        .route("/v1/kernels", get(list_kernels))
        .route("/v1/kernels/import", post(import_kernel))
        .route("/v1/kernels/pull", post(pull_kernel))
        .route("/v1/kernels/{name}", get(show_kernel).delete(delete_kernel))
}

fn require_root(c: &ConnectInfo<PeerCred>, what: &str) -> Result<()> {
    if c.0.uid == 0 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("only root can {what}; run it with sudo"),
        ))
    }
}

/// The VMs the caller may see (root: all).
fn visible_vms(d: &Daemon, c: &ConnectInfo<PeerCred>) -> Result<Vec<VmRecord>> {
    Ok(d.store.list_vms((c.0.uid != 0).then_some(c.0.uid))?)
}

fn image_view(image: ImageRecord, vms: &[VmRecord]) -> ImageView {
    ImageView {
        used_by: image_users(&image.name, vms),
        image,
    }
}

fn kernel_view(kernel: KernelRecord, vms: &[VmRecord]) -> KernelView {
    KernelView {
        used_by: kernel_users(&kernel, vms),
        kernel,
    }
}

async fn list_images(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Json<ImageList>> {
    let vms = visible_vms(&d, &c)?;
    let images = d.artifacts.list_images()?;
    Ok(Json(ImageList {
        images: images.into_iter().map(|i| image_view(i, &vms)).collect(),
    }))
}

async fn show_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ImageView>> {
    let vms = visible_vms(&d, &c)?;
    Ok(Json(image_view(d.artifacts.get_image(&name)?, &vms)))
}

async fn delete_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ImageView>> {
    require_root(&c, "delete images")?;
    let vms = d.store.list_vms(None)?;
    let rec = d.artifacts.delete_image(&name, &vms).await?;
    Ok(Json(image_view(rec, &[])))
}

async fn prune_images(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Json<PruneImagesResult>> {
    require_root(&c, "prune images")?;
    Ok(Json(d.artifacts.prune_images().await?))
}

/// Checks that an image name is usable and free before a stream starts, so those errors get
/// their own HTTP status.
fn check_new_image(d: &Daemon, name: &str) -> Result<()> {
    wick_image::validate_image_name(name)?;
    check_reserved(name)?;
    if d.artifacts.images.exists(name)? {
        return Err(Error::conflict(format!(
            "an image named {name:?} already exists; delete it first or choose another name"
        )));
    }
    Ok(())
}

fn check_new_kernel(d: &Daemon, name: &str) -> Result<()> {
    check_reserved(name)?;
    match d.artifacts.kernels.get(name) {
        Ok(k) => Err(Error::conflict(format!(
            "a kernel named {name:?} already exists (version {}); delete it first or choose \
             another name",
            k.version
        ))),
        Err(KernelError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn check_source(path: &Path) -> Result<()> {
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

async fn import_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<ImportRequest>,
) -> Result<Response> {
    require_root(&c, "import images")?;
    check_new_image(&d, &req.name)?;
    check_source(&req.path)?;
    Ok(progress_stream(move |p| async move {
        let rec = d.artifacts.import_image(req.path, req.name, p).await?;
        Ok(Final::Image(image_view(rec, &[])))
    }))
}

async fn pull_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<PullImageRequest>,
) -> Result<Response> {
    require_root(&c, "pull images")?;
    check_new_image(&d, &req.name)?;
    Ok(progress_stream(move |p| async move {
        let rec = d
            .artifacts
            .pull_image(req.reference, req.name, req.insecure, p)
            .await?;
        Ok(Final::Image(image_view(rec, &[])))
    }))
}

async fn build_image(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<BuildImageRequest>,
) -> Result<Response> {
    require_root(&c, "build images")?;
    let name = req.name.unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    check_new_image(&d, &name)?;
    d.artifacts.agent_binary()?;
    Ok(progress_stream(move |p| async move {
        let rec = d.artifacts.build_image(name, p).await?;
        Ok(Final::Image(image_view(rec, &[])))
    }))
}

async fn list_kernels(State(d): D, c: ConnectInfo<PeerCred>) -> Result<Json<KernelList>> {
    let vms = visible_vms(&d, &c)?;
    let kernels = d.artifacts.list_kernels()?;
    Ok(Json(KernelList {
        kernels: kernels.into_iter().map(|k| kernel_view(k, &vms)).collect(),
    }))
}

async fn show_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<KernelView>> {
    let vms = visible_vms(&d, &c)?;
    Ok(Json(kernel_view(d.artifacts.get_kernel(&name)?, &vms)))
}

async fn delete_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<KernelView>> {
    require_root(&c, "delete kernels")?;
    let vms = d.store.list_vms(None)?;
    let rec = d.artifacts.delete_kernel(&name, &vms).await?;
    Ok(Json(kernel_view(rec, &[])))
}

async fn import_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<ImportRequest>,
) -> Result<Response> {
    require_root(&c, "import kernels")?;
    check_new_kernel(&d, &req.name)?;
    check_source(&req.path)?;
    Ok(progress_stream(move |mut p| async move {
        p(&format!("import kernel from {}", req.path.display()));
        let rec = d.artifacts.import_kernel(req.path, req.name).await?;
        Ok(Final::Kernel(kernel_view(rec, &[])))
    }))
}

async fn pull_kernel(
    State(d): D,
    c: ConnectInfo<PeerCred>,
    Body(req): Body<PullKernelRequest>,
) -> Result<Response> {
    require_root(&c, "pull kernels")?;
    check_new_kernel(&d, &req.name)?;
    Ok(progress_stream(move |mut p| async move {
        p(&format!("download and import {}", req.url));
        let rec = d
            .artifacts
            .pull_kernel(req.url, req.sha256, req.name)
            .await?;
        Ok(Final::Kernel(kernel_view(rec, &[])))
    }))
}

/// The result line of a progress stream.
enum Final {
    Image(ImageView),
    Kernel(KernelView),
}

/// A progress callback that sends `{"stage": ...}` lines down a stream.
type Sink = Box<dyn FnMut(&str) + Send + 'static>;

/// Runs `work` in its own task (it finishes even if the client goes away) and answers with its
/// NDJSON progress: stage lines, then the final line.
fn progress_stream<F, Fut>(work: F) -> Response
where
    F: FnOnce(Sink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Final>> + Send + 'static,
{
    let started = Instant::now();
    let (tx, rx) = mpsc::unbounded_channel::<ProgressLine>();
    let stage_tx = tx.clone();
    let sink: Sink = Box::new(move |s: &str| {
        let _ = stage_tx.send(ProgressLine {
            stage: Some(s.to_string()),
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..ProgressLine::default()
        });
    });
    tokio::spawn(async move {
        let out = work(sink).await;
        let mut line = ProgressLine {
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..ProgressLine::default()
        };
        match out {
            Ok(Final::Image(i)) => line.image = Some(i),
            Ok(Final::Kernel(k)) => line.kernel = Some(k),
            Err(e) => line.error = Some(e.0),
        }
        let _ = tx.send(line);
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut buf = serde_json::to_vec(&line).expect("progress lines serialize");
        buf.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(buf)), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn vm(name: &str, image: &str, kernel: &Path) -> VmRecord {
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
    fn fake_vmlinux(path: &Path, salt: u8) {
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
    fn small_ext4(dir: &Path) -> Option<PathBuf> {
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

    fn artifacts(dir: &Path) -> Artifacts {
        Artifacts::new(&Paths::new(Some(&dir.join("root")))).unwrap()
    }

    #[tokio::test]
    async fn image_deletion_is_refused_while_in_use() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = small_ext4(d.path()) else {
            return;
        };
        let a = artifacts(d.path());
        let rec = a
            .import_image(img, "base".into(), |_| {})
            .await
            .expect("import an ext4 file");
        assert_eq!(a.list_images().unwrap(), vec![rec.clone()]);
        let vms = [
            vm("a1", "base", Path::new("/k")),
            vm("b22", "base", Path::new("/k")),
            vm("c333", "other", Path::new("/k")),
        ];
        let e = a.delete_image("base", &vms).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(e.message().contains("VMs a1, b22"), "{e}");
        assert!(!e.message().contains("c333"), "{e}");
        assert!(rec.rootfs.exists(), "nothing deleted");
        a.delete_image("base", &vms[2..]).await.unwrap();
        assert!(!rec.rootfs.exists());
        let e = a.delete_image("base", &[]).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn kernel_deletion_is_refused_while_a_vm_boots_it() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let src = d.path().join("vmlinux");
        fake_vmlinux(&src, 1);
        let k = a.import_kernel(src, "k1".into()).await.unwrap();
        let vms = [
            vm("a1", "x", &k.vmlinux),
            vm("b2", "x", Path::new("/elsewhere/vmlinux")),
        ];
        assert_eq!(kernel_users(&k, &vms), ["a1"]);
        let e = a.delete_kernel("k1", &vms).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(
            e.message().contains("kernel \"k1\" is used by VM a1;"),
            "{e}"
        );
        assert!(a.get_kernel("k1").is_ok());
        a.delete_kernel("k1", &vms[1..]).await.unwrap();
        assert_eq!(a.get_kernel("k1").unwrap_err().code(), ErrorCode::NotFound);
    }

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
    async fn concurrent_first_uses_share_one_preparation() {
        let p = Arc::new(Prep::new());
        let seen_a = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen_b = Arc::new(Mutex::new(Vec::<String>::new()));
        p.stage("download kernel");
        let (pa, sa) = (p.clone(), seen_a.clone());
        let a = tokio::spawn(async move {
            pa.follow(move |s| sa.lock().unwrap().push(s.to_string()))
                .await
        });
        tokio::task::yield_now().await;
        p.stage("import kernel");
        let (pb, sb) = (p.clone(), seen_b.clone());
        let b = tokio::spawn(async move {
            pb.follow(move |s| sb.lock().unwrap().push(s.to_string()))
                .await
        });
        p.stage("build image: debootstrap");
        p.finish(Err(Error::precondition("no mirror")));
        assert_eq!(a.await.unwrap().unwrap_err().message(), "no mirror");
        assert_eq!(b.await.unwrap().unwrap_err().message(), "no mirror");
        let want = [
            "download kernel",
            "import kernel",
            "build image: debootstrap",
        ];
        assert_eq!(*seen_a.lock().unwrap(), want);
        assert_eq!(*seen_b.lock().unwrap(), want);
        assert!(p.finished());
    }

    #[test]
    fn golden_progress_is_coalesced() {
        let mut got = Vec::new();
        let mut c = Coarse::new(|s: &str| got.push(s.to_string()));
        for m in [
            "debootstrap: Debian bookworm with 10 extra packages",
            "debootstrap: Retrieving InRelease",
            "debootstrap: Retrieving adduser 3.134",
            "debootstrap: Retrieving apt 2.6.1",
            "debootstrap: Validating adduser 3.134",
            "debootstrap: Validating apt 2.6.1",
            "injecting wick-agent",
        ] {
            c.emit(m);
        }
        assert_eq!(
            got,
            [
                "build image: debootstrap: Debian bookworm with 10 extra packages",
                "build image: debootstrap: retrieving packages",
                "build image: debootstrap: validating packages",
                "build image: injecting wick-agent",
            ]
        );
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            registry_of("127.0.0.1:5000/t/img:1").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(registry_of("localhost/x").as_deref(), Some("localhost"));
        assert_eq!(registry_of("library/debian"), None);
        assert!(check_reserved("prune").is_err() && check_reserved("p").is_ok());
        let e = in_use_error("image", "x", &["a".into()]);
        assert_eq!(
            e.message(),
            "image \"x\" is used by VM a; delete it first (`wick vm delete a`)"
        );
        let line = ProgressLine {
            stage: Some("s".into()),
            elapsed_ms: 3,
            ..ProgressLine::default()
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"stage":"s","elapsed_ms":3}"#
        );
    }
}
