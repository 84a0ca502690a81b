//! The managed kernel store: one content-addressed directory per imported kernel,
//! `DIR/<first 16 hex digits of the source's sha256>/`, holding
//!
//! - `vmlinux` — the ELF image (what Firecracker boots),
//! - `bzImage` — the original boot image when there was one (what QEMU `-kernel` prefers),
//! - `initrd.img` — wick's initramfs, when virtio/vsock drivers are modules,
//! - `modules/<version>/` — the kernel's modules (for the initramfs and the guest root),
//! - `manifest.json` — the [`KernelRecord`] (paths stored relative to the directory).
//!
//! Imports build everything in a hidden staging directory and rename it into place, so a crash
//! leaves no half-imported kernel (stale `.staging-*`/`.deb-*`/`.pull-*` entries are ignored and
//! can be deleted). Writers hold an exclusive `flock` on `DIR/.lock`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bzimage::{self, Compression};
use crate::{deb, detect, elf, initramfs, io_err, modules, KernelError, KernelFormat, Result};

const MANIFEST: &str = "manifest.json";
const LOCK: &str = ".lock";
/// Largest kernel file `pull` downloads.
pub const MAX_PULL_BYTES: u64 = 2 << 30;

/// One kernel in the store. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    /// Name chosen at import (unique in the store).
    pub name: String,
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64` (`unknown` if none could be found).
    pub version: String,
    /// sha256 of the imported file (the .deb, bzImage or vmlinux), lowercase hex.
    pub sha256: String,
    /// What was imported.
    pub source_format: KernelFormat,
    /// The ELF vmlinux (for Firecracker).
    pub vmlinux: PathBuf,
    /// The bzImage (for QEMU), when the source had one.
    pub bzimage: Option<PathBuf>,
    /// How the bzImage payload was compressed.
    pub compression: Option<Compression>,
    /// wick's initramfs, when the kernel needs one.
    pub initrd: Option<PathBuf>,
    /// The kernel's modules directory (`.../modules/<version>`), when known.
    pub modules_dir: Option<PathBuf>,
    /// The vmlinux carries the Xen PVH entry note (Firecracker x86_64 boots through it).
    pub has_pvh_note: bool,
    /// Some required driver is a module, so the kernel boots through `initrd`.
    pub needs_initramfs: bool,
    /// Modules in the initramfs, in load order.
    pub initrd_modules: Vec<String>,
    /// Required drivers built into the kernel.
    pub builtin_drivers: Vec<String>,
    /// Things the user should know (missing drivers, no PVH note, ...).
    pub warnings: Vec<String>,
    /// Import time, seconds since the Unix epoch.
    pub imported_at: u64,
    /// sha256 over what the initramfs was built from (the wick-init binary and the module
    /// list), so [`KernelStore::refresh_initramfs`] can tell when it is out of date. Absent
    /// in records from before it existed: those are rebuilt once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_inputs: Option<String>,
}

impl KernelRecord {
    /// The store directory holding this kernel's files.
    pub fn dir(&self) -> &Path {
        self.vmlinux.parent().unwrap_or(Path::new("/"))
    }
}

/// The kernel store rooted at a directory.
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
    init_bin: Option<PathBuf>,
}

fn validate_name(name: &str) -> Result<()> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 {
        return Err(KernelError::Invalid(format!(
            "kernel name {name:?} must be 1-64 characters"
        )));
    }
    if let Some((i, c)) = name.char_indices().find(|(_, c)| !ok_char(*c)) {
        return Err(KernelError::Invalid(format!(
            "kernel name {name:?} has invalid character {c:?} at position {}; use a-z, 0-9, '-', '_' and '.'",
            i + 1
        )));
    }
    if name.starts_with(['.', '-']) {
        return Err(KernelError::Invalid(format!(
            "kernel name {name:?} must start with a letter or digit"
        )));
    }
    Ok(())
}

/// Streams a file through sha256.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

struct StoreLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl KernelStore {
    /// Opens (creating if needed) the store at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<KernelStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err(format!(
            "cannot create kernel store {}",
            dir.display()
        )))?;
        Ok(KernelStore {
            dir,
            init_bin: None,
        })
    }

    /// Uses this static wick-init for initramfs builds (default: [`initramfs::locate_init_binary`]).
    pub fn with_init_binary(mut self, path: impl Into<PathBuf>) -> KernelStore {
        self.init_bin = Some(path.into());
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<StoreLock> {
        let path = self.dir.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(StoreLock)
            .map_err(|(_, e)| io_err(format!("cannot lock {}", path.display()))(e.into()))
    }

    /// Every kernel in the store, sorted by name.
    pub fn list(&self) -> Result<Vec<KernelRecord>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(io_err(format!("cannot list {}", self.dir.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            let manifest = e.path().join(MANIFEST);
            match std::fs::read(&manifest) {
                Ok(bytes) => out.push(load_manifest(&e.path(), &bytes)?),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err(format!("cannot read {}", manifest.display()))(err)),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The kernel named `name`.
    pub fn get(&self, name: &str) -> Result<KernelRecord> {
        self.list()?
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| {
                KernelError::NotFound(format!(
                    "no kernel named {name:?}; `wick kernel list` shows the imported ones, `wick kernel import` adds one"
                ))
            })
    }

    /// Removes the kernel named `name` and its files. (Callers check that no VM uses it.)
    pub fn delete(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        let rec = self.get(name)?;
        let dir = rec.dir().to_path_buf();
        // Rename first so a crash mid-delete never leaves a half kernel with a manifest.
        let trash = self.dir.join(format!(
            ".trash-{}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&trash);
        std::fs::rename(&dir, &trash)
            .map_err(io_err(format!("cannot remove {}", dir.display())))?;
        std::fs::remove_dir_all(&trash)
            .map_err(io_err(format!("cannot remove {}", trash.display())))
    }

    /// Imports a kernel file: an ELF vmlinux, a bzImage/vmlinuz or a kernel `.deb`, under `name`.
    pub fn import(&self, path: &Path, name: &str) -> Result<KernelRecord> {
        validate_name(name)?;
        let format = detect(path)?;
        let sha256 = sha256_file(path)?;
        let _lock = self.lock()?;
        self.check_free(name, &sha256)?;
        let final_dir = self.dir.join(&sha256[..16]);

        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&self.dir)
            .map_err(io_err(format!(
                "cannot create a staging dir in {}",
                self.dir.display()
            )))?;
        let st = staging.path();
        let mut staged = Staged::default();
        let bz_path = match format {
            KernelFormat::Elf => {
                std::fs::copy(path, st.join("vmlinux"))
                    .map_err(io_err("cannot copy the vmlinux"))?;
                None
            }
            KernelFormat::BzImage => Some(path.to_path_buf()),
            KernelFormat::Deb => Some(staged.unpack_deb(path, &self.dir)?),
        };
        if let Some(bz) = bz_path {
            staged.boot_image(&bz, st)?;
        }
        let has_pvh_note = staged.check_vmlinux(st)?;
        let version = staged
            .version
            .take()
            .unwrap_or_else(|| "unknown".to_string());
        let modules = match staged.modules_src.take() {
            Some(src) => self.stage_modules(st, &src, &version, &mut staged.warnings)?,
            None => {
                if format != KernelFormat::Deb {
                    staged.warnings.push(
                        "imported without modules: assuming virtio-mmio, virtio-blk, virtio-net, vsock and ext4 are built in"
                            .to_string(),
                    );
                }
                StagedModules::default()
            }
        };
        let needs = modules.needs_initramfs;

        let record = KernelRecord {
            name: name.to_string(),
            version,
            sha256,
            source_format: format,
            vmlinux: PathBuf::from("vmlinux"),
            bzimage: staged.bzimage.then(|| PathBuf::from("bzImage")),
            compression: staged.compression,
            initrd: needs.then(|| PathBuf::from("initrd.img")),
            modules_dir: modules.dir,
            has_pvh_note,
            needs_initramfs: needs,
            initrd_modules: modules.initrd_modules,
            builtin_drivers: modules.builtin_drivers,
            warnings: staged.warnings,
            initrd_inputs: modules.initrd_inputs,
            imported_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs(),
        };
        drop(staged.unpacked);
        install(staging, &final_dir, &record)
    }

    /// Moves the modules `src` into the staging dir `st` as `modules/<version>`, checks their
    /// drivers and builds the initramfs when virtio/vsock drivers are modules.
    fn stage_modules(
        &self,
        st: &Path,
        src: &Path,
        version: &str,
        warnings: &mut Vec<String>,
    ) -> Result<StagedModules> {
        let rel = PathBuf::from("modules").join(version);
        std::fs::create_dir_all(st.join("modules")).map_err(io_err("cannot create modules dir"))?;
        // Same filesystem (the scratch dir is inside the store): a rename.
        std::fs::rename(src, st.join(&rel))
            .map_err(io_err("cannot move the modules into the store"))?;
        let check = modules::needs_initramfs(&st.join(&rel))?;
        for m in &check.resolution.missing {
            warnings.push(format!(
                "driver {m} is neither built in nor a module: the guest will lack it"
            ));
        }
        let mut staged = StagedModules {
            builtin_drivers: check.resolution.builtin.clone(),
            ..StagedModules::default()
        };
        if check.needs_initramfs {
            let init = self.init_binary()?;
            let (modules, inputs) =
                build_initrd(&init, &check.resolution.load_order, &st.join("initrd.img"))?;
            staged.initrd_modules = modules;
            staged.needs_initramfs = true;
            staged.initrd_inputs = Some(inputs);
        }
        staged.dir = Some(rel);
        Ok(staged)
    }

    /// Rebuilds the initramfs of every kernel whose inputs changed since it was built: the
    /// wick-init binary, or the drivers wick needs (`virtio_console` joined them with QEMU's
    /// serial agent channel). The initramfs is derived from the kernel's modules and wick-init,
    /// so an upgraded wick must not boot the old one. Built atomically next to the old file,
    /// then the manifest is replaced; the kernel itself is untouched. Returns the names rebuilt.
    /// One entry per kernel it rebuilt or failed to: its name, or why.
    pub fn refresh_initramfs(&self) -> Result<Vec<std::result::Result<String, String>>> {
        let _lock = self.lock()?;
        let init = self.init_binary()?;
        let init_sha = sha256_file(&init)?;
        let mut rebuilt = Vec::new();
        for rec in self.list()? {
            if rec.modules_dir.is_none() || rec.initrd.is_none() {
                continue;
            }
            // One kernel that cannot be refreshed does not keep the others stale.
            match refresh_one(rec, &init, &init_sha) {
                Ok(Some(name)) => rebuilt.push(Ok(name)),
                Ok(None) => {}
                Err((name, e)) => rebuilt.push(Err(format!("kernel {name}: {e}"))),
            }
        }
        Ok(rebuilt)
    }

    /// The static wick-init initramfs builds use.
    fn init_binary(&self) -> Result<PathBuf> {
        match &self.init_bin {
            Some(p) => Ok(p.clone()),
            None => initramfs::locate_init_binary(),
        }
    }

    fn check_free(&self, name: &str, sha256: &str) -> Result<()> {
        for k in self.list()? {
            if k.name == name {
                return Err(KernelError::AlreadyExists(format!(
                    "a kernel named {name:?} already exists (version {}); delete it first or choose another name",
                    k.version
                )));
            }
            if k.sha256 == sha256 {
                return Err(KernelError::AlreadyExists(format!(
                    "this kernel is already imported as {:?}; use that name",
                    k.name
                )));
            }
        }
        let dir = self.dir.join(&sha256[..16]);
        if dir.exists() {
            return Err(KernelError::AlreadyExists(format!(
                "{} exists without a readable manifest; remove it and import again",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Downloads a kernel file (vmlinux, bzImage or .deb) over HTTP(S), verifies its sha256
    /// (mandatory) and imports it as `name`.
    pub fn pull(&self, url: &str, sha256: &str, name: &str) -> Result<KernelRecord> {
        validate_name(name)?;
        let want = sha256.trim().to_ascii_lowercase();
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KernelError::Invalid(format!(
                "--sha256 must be 64 hex digits, got {sha256:?}"
            )));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(KernelError::Invalid(format!(
                "only http:// and https:// URLs can be pulled, got {url:?}"
            )));
        }
        let tmp = tempfile::Builder::new()
            .prefix(".pull-")
            .tempfile_in(&self.dir)
            .map_err(io_err(format!(
                "cannot create a file in {}",
                self.dir.display()
            )))?;
        let got = download(url, tmp.as_file())?;
        if got != want {
            return Err(KernelError::Invalid(format!(
                "checksum mismatch for {url}: expected sha256 {want}, got {got}; the download was discarded"
            )));
        }
        self.import(tmp.path(), name)
    }
}

/// GETs `url` into `out`, returning the sha256 of what was written.
fn download(url: &str, mut out: &std::fs::File) -> Result<String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, r) => KernelError::Download(format!(
            "GET {url} answered {code} {}; check the URL",
            r.status_text()
        )),
        ureq::Error::Transport(t) => KernelError::Download(format!("GET {url} failed: {t}")),
    })?;
    let mut reader = resp.into_reader().take(MAX_PULL_BYTES + 1);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| KernelError::Download(format!("reading {url} failed: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_PULL_BYTES {
            return Err(KernelError::Download(format!(
                "{url} is larger than {MAX_PULL_BYTES} bytes; not a kernel?"
            )));
        }
        h.update(&buf[..n]);
        std::io::Write::write_all(&mut out, &buf[..n])
            .map_err(io_err("cannot write the download"))?;
    }
    out.sync_all()
        .map_err(io_err("cannot write the download"))?;
    Ok(hex::encode(h.finalize()))
}

fn load_manifest(dir: &Path, bytes: &[u8]) -> Result<KernelRecord> {
    let mut r: KernelRecord = serde_json::from_slice(bytes).map_err(|e| {
        KernelError::Invalid(format!(
            "{} is corrupt ({e}); delete that directory and import again",
            dir.join(MANIFEST).display()
        ))
    })?;
    r.vmlinux = dir.join(&r.vmlinux);
    r.bzimage = r.bzimage.map(|p| dir.join(p));
    r.initrd = r.initrd.map(|p| dir.join(p));
    r.modules_dir = r.modules_dir.map(|p| dir.join(p));
    Ok(r)
}

/// Rebuilds `rec`'s initramfs if its inputs changed (the name when it did). A temporary file a
/// crash left from an earlier build (initramfs::build writes `.tmp*` next to its output) goes
/// first.
fn refresh_one(
    mut rec: KernelRecord,
    init: &Path,
    init_sha: &str,
) -> std::result::Result<Option<String>, (String, KernelError)> {
    let (Some(modules), Some(initrd)) = (rec.modules_dir.clone(), rec.initrd.clone()) else {
        return Ok(None);
    };
    let mut run = || -> Result<bool> {
        remove_leftover_temps(rec.dir());
        let check = modules::needs_initramfs(&modules)?;
        let order = &check.resolution.load_order;
        if rec.initrd_inputs.as_deref() == Some(initrd_inputs(init_sha, order).as_str()) {
            return Ok(false);
        }
        let (names, inputs) = build_initrd(init, order, &initrd)?;
        rec.initrd_modules = names;
        rec.initrd_inputs = Some(inputs);
        rewrite_manifest(&rec)?;
        Ok(true)
    };
    match run() {
        Ok(true) => Ok(Some(rec.name)),
        Ok(false) => Ok(None),
        Err(e) => Err((rec.name, e)),
    }
}

/// Removes `.tmp*` files (an interrupted atomic write's) from a kernel's directory.
fn remove_leftover_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let leftover = e.file_name().to_string_lossy().starts_with(".tmp")
            && e.file_type().is_ok_and(|t| t.is_file());
        if leftover {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Builds the initramfs `out` from wick-init `init` and the modules in `load_order`; returns
/// the module names it holds and its [`initrd_inputs`].
fn build_initrd(
    init: &Path,
    load_order: &[modules::ModuleFile],
    out: &Path,
) -> Result<(Vec<String>, String)> {
    let paths: Vec<PathBuf> = load_order.iter().map(|m| m.path.clone()).collect();
    let built = initramfs::build(init, &paths, out)?;
    Ok((
        built.modules,
        initrd_inputs(&sha256_file(init)?, load_order),
    ))
}

/// sha256 over an initramfs's inputs: the wick-init binary's sha256 and the modules, in load
/// order.
fn initrd_inputs(init_sha256: &str, load_order: &[modules::ModuleFile]) -> String {
    let mut h = Sha256::new();
    h.update(init_sha256.as_bytes());
    for m in load_order {
        h.update(b"\0");
        h.update(m.name.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Replaces the manifest of a stored kernel (paths relative to its directory, as `install`
/// writes them), atomically.
fn rewrite_manifest(rec: &KernelRecord) -> Result<()> {
    let dir = rec.dir().to_path_buf();
    let rel = |p: &Path| {
        p.strip_prefix(&dir)
            .map(Path::to_path_buf)
            .unwrap_or(p.to_path_buf())
    };
    let mut out = rec.clone();
    out.vmlinux = rel(&rec.vmlinux);
    out.bzimage = rec.bzimage.as_deref().map(rel);
    out.initrd = rec.initrd.as_deref().map(rel);
    out.modules_dir = rec.modules_dir.as_deref().map(rel);
    let json = serde_json::to_vec_pretty(&out).expect("record serializes");
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    std::fs::write(&tmp, json).map_err(io_err("cannot write the manifest"))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io_err("cannot replace the manifest"))
}

/// Writes `record` as the staging dir's manifest and renames the dir to `final_dir` (removing
/// it when that fails); returns the record as loaded from there.
fn install(
    staging: tempfile::TempDir,
    final_dir: &Path,
    record: &KernelRecord,
) -> Result<KernelRecord> {
    let json = serde_json::to_vec_pretty(record).expect("record serializes");
    std::fs::write(staging.path().join(MANIFEST), json)
        .map_err(io_err("cannot write the manifest"))?;
    let staging_path = staging.keep();
    if let Err(e) = std::fs::rename(&staging_path, final_dir) {
        let _ = std::fs::remove_dir_all(&staging_path);
        return Err(io_err(format!(
            "cannot move the kernel into {}",
            final_dir.display()
        ))(e));
    }
    load_manifest(
        final_dir,
        &std::fs::read(final_dir.join(MANIFEST)).map_err(io_err("cannot read the manifest"))?,
    )
}

/// What an import learnt while staging the kernel image.
#[derive(Default)]
struct Staged {
    version: Option<String>,
    /// Whether the staging dir holds the original `bzImage`.
    bzimage: bool,
    compression: Option<Compression>,
    /// The unpacked package's modules directory, to move into the store.
    modules_src: Option<PathBuf>,
    warnings: Vec<String>,
    /// The unpacked `.deb` (its scratch dir is removed when dropped).
    unpacked: Option<deb::DebKernel>,
}

impl Staged {
    /// Unpacks a kernel `.deb` into a scratch dir in `store_dir`; returns its boot image.
    fn unpack_deb(&mut self, path: &Path, store_dir: &Path) -> Result<PathBuf> {
        let d = deb::unpack(path, store_dir)?;
        self.version = Some(d.version.clone());
        self.modules_src = d.modules_dir.clone();
        if self.modules_src.is_none() {
            self.warnings
                .push("the package ships no modules directory".to_string());
        }
        let k = d.kernel.clone();
        self.unpacked = Some(d);
        Ok(k)
    }

    /// Stages a boot image: an ELF as the vmlinux, a bzImage as itself plus its extracted
    /// vmlinux.
    fn boot_image(&mut self, bz: &Path, st: &Path) -> Result<()> {
        let bytes = std::fs::read(bz).map_err(io_err(format!("cannot read {}", bz.display())))?;
        if crate::detect_bytes(&bytes) == Some(KernelFormat::Elf) {
            // Some packages ship an ELF as vmlinux-<ver>.
            std::fs::write(st.join("vmlinux"), &bytes)
                .map_err(io_err("cannot write the vmlinux"))?;
            return Ok(());
        }
        let header = bzimage::parse_header(&bytes);
        if self.version.is_none() {
            self.version = header
                .and_then(|h| h.version)
                .and_then(|v| v.split_whitespace().next().map(str::to_string));
        }
        let ex = bzimage::extract_vmlinux(&bytes)?;
        std::fs::write(st.join("vmlinux"), &ex.vmlinux)
            .map_err(io_err("cannot write the vmlinux"))?;
        std::fs::write(st.join("bzImage"), &bytes).map_err(io_err("cannot write the bzImage"))?;
        self.bzimage = true;
        self.compression = Some(ex.compression);
        Ok(())
    }

    /// Checks the staged vmlinux (refusing a truncated one, warning about what will not boot)
    /// and takes its release if none is known yet. Returns whether it has a PVH entry note.
    fn check_vmlinux(&mut self, st: &Path) -> Result<bool> {
        let vmlinux =
            std::fs::read(st.join("vmlinux")).map_err(io_err("cannot read the vmlinux"))?;
        let info = elf::parse(&vmlinux)
            .map_err(|e| KernelError::Invalid(format!("the vmlinux is unusable: {e}")))?;
        if !info.segments_in_bounds {
            return Err(KernelError::Invalid(
                "the vmlinux is truncated (a segment lies past its end)".into(),
            ));
        }
        if info.machine != 62 {
            self.warnings.push(format!(
                "the vmlinux is for ELF machine {} (not x86_64)",
                info.machine
            ));
        }
        let has_pvh_note = info.pvh_entry.is_some();
        if !has_pvh_note {
            self.warnings.push(
                "the vmlinux has no Xen PVH entry note (CONFIG_PVH): Firecracker boots it through its ELF entry point instead, and QEMU boots the bzImage"
                    .to_string(),
            );
        }
        if self.version.is_none() {
            self.version = elf::linux_banner_release(&vmlinux);
        }
        Ok(has_pvh_note)
    }
}

/// The modules an import moved into the store.
#[derive(Default)]
struct StagedModules {
    /// `modules/<version>`, relative to the kernel's directory.
    dir: Option<PathBuf>,
    needs_initramfs: bool,
    initrd_modules: Vec<String>,
    builtin_drivers: Vec<String>,
    initrd_inputs: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bzimage::tests::compress;
    use crate::testutil::{fake_bzimage, fake_vmlinux};

    #[test]
    fn names_are_checked() {
        assert!(validate_name("debian-6.1.0_cloud").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(".hidden").is_err());
        let e = validate_name("Bad/name").unwrap_err().to_string();
        assert!(e.contains("'B'") && e.contains("position 1"), "{e}");
    }

    #[test]
    fn import_list_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = KernelStore::new(dir.path().join("kernels")).unwrap();
        let vm = fake_vmlinux(128 * 1024, true);
        let bz = fake_bzimage(&compress(&vm, Compression::Zstd), vm.len(), true);
        let src = dir.path().join("vmlinuz");
        std::fs::write(&src, &bz).unwrap();

        let rec = store.import(&src, "test-kernel").unwrap();
        assert_eq!(rec.version, "6.1.0-99-test-amd64");
        assert_eq!(rec.source_format, KernelFormat::BzImage);
        assert_eq!(rec.compression, Some(Compression::Zstd));
        assert!(rec.has_pvh_note && !rec.needs_initramfs && rec.initrd.is_none());
        assert_eq!(std::fs::read(&rec.vmlinux).unwrap(), vm);
        assert_eq!(std::fs::read(rec.bzimage.as_ref().unwrap()).unwrap(), bz);
        assert_eq!(rec.dir(), store.dir().join(&rec.sha256[..16]));
        assert!(rec.warnings.iter().any(|w| w.contains("without modules")));

        assert_eq!(store.get("test-kernel").unwrap(), rec);
        let e = store.import(&src, "other").unwrap_err();
        assert!(
            matches!(e, KernelError::AlreadyExists(_)) && e.to_string().contains("test-kernel")
        );

        // A plain ELF without PVH note: imported with a note that says what is true (Firecracker
        // boots it through the ELF entry point; it does not refuse it).
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, fake_vmlinux(64 * 1024, false)).unwrap();
        let e = store.import(&elf, "test-kernel").unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let r2 = store.import(&elf, "plain").unwrap();
        assert!(!r2.has_pvh_note && r2.bzimage.is_none());
        assert!(
            r2.warnings
                .iter()
                .any(|w| w.contains("PVH")
                    && w.contains("Firecracker boots it through its ELF entry"))
        );
        assert!(!r2.warnings.iter().any(|w| w.contains("cannot boot")));

        let names: Vec<String> = store.list().unwrap().into_iter().map(|k| k.name).collect();
        assert_eq!(names, vec!["plain", "test-kernel"]);
        store.delete("test-kernel").unwrap();
        assert!(matches!(
            store.get("test-kernel"),
            Err(KernelError::NotFound(_))
        ));
        assert!(!rec.dir().exists());
        assert!(matches!(
            store.delete("test-kernel"),
            Err(KernelError::NotFound(_))
        ));
        // Nothing left behind but the lock file and the remaining kernel.
        let left: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn a_bad_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = KernelStore::new(dir.path().join("k")).unwrap();
        let src = dir.path().join("junk");
        std::fs::write(&src, fake_bzimage(b"nothing here", 0, false)).unwrap();
        assert!(store.import(&src, "junk").is_err());
        let left: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != LOCK)
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A one-shot loopback HTTP server serving `body` with `status`, for `pull` tests.
    fn serve_once(status: &'static str, body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/kernel/vmlinuz", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            s.write_all(&body).unwrap();
        });
        (url, h)
    }

    #[test]
    fn pull_verifies_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = KernelStore::new(dir.path().join("k")).unwrap();
        let vm = fake_vmlinux(64 * 1024, true);
        let bz = fake_bzimage(&compress(&vm, Compression::Gzip), vm.len(), true);
        let good = hex::encode(Sha256::digest(&bz));

        let (url, h) = serve_once("200 OK", bz.clone());
        let e = store
            .pull(&url, &"0".repeat(64), "pulled")
            .unwrap_err()
            .to_string();
        h.join().unwrap();
        assert!(e.contains("checksum mismatch") && e.contains(&good), "{e}");
        assert!(store.list().unwrap().is_empty());

        let (url, h) = serve_once("200 OK", bz.clone());
        let rec = store.pull(&url, &good.to_uppercase(), "pulled").unwrap();
        h.join().unwrap();
        assert_eq!(rec.sha256, good);
        assert_eq!(std::fs::read(&rec.vmlinux).unwrap(), vm);

        let (url, h) = serve_once("404 Not Found", b"no".to_vec());
        let e = store.pull(&url, &good, "other").unwrap_err().to_string();
        h.join().unwrap();
        assert!(e.contains("404"), "{e}");
        assert!(store.pull("ftp://x/y", &good, "x").is_err());
        assert!(store
            .pull(&url, "abc", "x")
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        let left: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".pull-") || n.starts_with(".staging-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
