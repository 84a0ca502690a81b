//! The image store: content-addressed image directories, the name index, import, delete, prune.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};
use crate::ext4;
use crate::extract::{open_tar, Applier};
use crate::record::{ImageRecord, ImageSource};
use crate::util::{self, fsync_dir, sha256_file, sparse_copy, write_atomic};

const INDEX: &str = "index.json";
const LOCK: &str = ".lock";
const MANIFEST: &str = "manifest.json";
const ROOTFS: &str = "rootfs.ext4";
const WORK_SEED: &str = "work-seed.ext4";
const STAGING_PREFIX: &str = ".tmp-";
const MIB: u64 = 1 << 20;

/// Default free space left in an imported or pulled root filesystem.
pub const DEFAULT_HEADROOM_MIB: u64 = 1024;

/// A directory of managed images. Cheap to construct; every call reads the disk.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// Options of [`ImageStore::import_with`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Inject this wick-agent binary and its unit (tarball imports only).
    pub agent_bin: Option<PathBuf>,
    /// An ext4 file to keep as the image's work-seed (initial `/root`).
    pub work_seed: Option<PathBuf>,
    /// Free space to leave in a root filesystem made from a tarball (default 1 GiB).
    pub headroom_mib: Option<u64>,
    /// Shrink the filesystem to its minimum with `resize2fs -M` (no free space left).
    pub shrink: bool,
}

/// Record fields and flags of [`ImageStore::commit_with`].
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitExtra {
    pub agent_injected: bool,
    pub default_kernel: Option<String>,
    pub build_key: Option<String>,
    /// Point an existing name at the new image (its old files go when no name is left).
    pub replace: bool,
}

/// What [`ImageStore::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// name -> id
    images: BTreeMap<String, String>,
}

/// A private directory inside the store where one image is assembled. Removed on drop unless
/// committed; holds a lock so `prune` leaves it alone while its builder is alive.
pub(crate) struct Staging {
    dir: Option<tempfile::TempDir>,
    _lock: Flock<File>,
    /// The OCI config to record with the image (pulls).
    pub(crate) config: Option<crate::record::ImageConfig>,
}

impl Staging {
    pub(crate) fn path(&self) -> &Path {
        self.dir.as_ref().expect("staging dir").path()
    }
    pub(crate) fn rootfs_img(&self) -> PathBuf {
        self.path().join(ROOTFS)
    }
    pub(crate) fn work_seed_img(&self) -> PathBuf {
        self.path().join(WORK_SEED)
    }
    /// A scratch directory that is deleted before the image is committed.
    pub(crate) fn scratch(&self, name: &str) -> Result<PathBuf> {
        let p = self.path().join("scratch").join(name);
        fs::create_dir_all(&p).ctx("create", &p)?;
        Ok(p)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // Never recurse into a mount (a killed debootstrap could leave /proc or /sys mounted
        // inside its target): detach them first, and keep the directory if any remain.
        for m in mounts_under(dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if !mounts_under(dir.path()).is_empty() {
            tracing::error!(path = %dir.path().display(), "staging directory still has mounts; leaving it");
            let _ = dir.keep();
        }
    }
}

/// Mount points at or below `path`, deepest first.
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(wick_host::mounts::unescape(m)))
        .filter(|m| m.starts_with(path))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

impl ImageStore {
    /// Opens (creating if needed) a store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<ImageStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir).ctx("create the image store", &dir)?;
        Ok(ImageStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where verified OCI layer blobs are cached: `DIR/../layers`.
    pub fn layers_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .map(|p| p.join("layers"))
            .unwrap_or_else(|| self.dir.join("layers"))
    }

    /// Every image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let index = self.read_index()?;
        index
            .images
            .iter()
            .map(|(name, id)| self.load(name, id))
            .collect()
    }

    /// The image called `name`.
    pub fn get(&self, name: &str) -> Result<ImageRecord> {
        let index = self.read_index()?;
        let id = index
            .images
            .get(name)
            .ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        self.load(name, id)
    }

    /// Whether an image called `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.read_index()?.images.contains_key(name))
    }

    /// Removes the name `name`, and the image's files when no other name points at them. This is
    /// the primitive: callers refuse first while VMs use the image.
    pub fn delete(&self, name: &str) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let id = index
            .images
            .remove(name)
            .ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        let record = self.load(name, &id)?;
        self.write_index(&index)?;
        if !index.images.values().any(|v| *v == id) {
            remove_dir_atomically(&self.dir, &self.dir.join(&id))?;
        }
        Ok(record)
    }

    /// The image whose record carries `build_key` (the first by name), if any.
    pub fn find_by_key(&self, build_key: &str) -> Result<Option<ImageRecord>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|r| r.build_key.as_deref() == Some(build_key)))
    }

    /// Gives image `existing` a second name `name` (the same files: no copy). With `replace`,
    /// an image already called `name` loses the name (and its files when no name is left).
    pub fn alias(&self, existing: &str, name: &str, replace: bool) -> Result<ImageRecord> {
        validate_image_name(name)?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let id = index
            .images
            .get(existing)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(existing.to_string()))?;
        let old = match index.images.get(name) {
            Some(old) if replace => Some(old.clone()),
            Some(_) => return Err(ImageError::Exists(name.to_string())),
            None => None,
        };
        index.images.insert(name.to_string(), id.clone());
        self.write_index(&index)?;
        if let Some(old) = old.filter(|old| *old != id) {
            if !index.images.values().any(|v| *v == old) {
                remove_dir_atomically(&self.dir, &self.dir.join(&old))?;
            }
        }
        self.load(name, &id)
    }

    /// Removes staging directories of builds that died (their lock is free), and nothing else:
    /// the start-up sweep (`prune` also drops unused images' files and cached layers).
    pub fn sweep_staging(&self) -> Result<Vec<PathBuf>> {
        let _lock = self.lock()?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).ctx("read", &self.dir)? {
            let entry = entry.ctx("read", &self.dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGING_PREFIX) && staging_is_abandoned(&entry.path()) {
                remove_any(&entry.path())?;
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    /// Sets (or clears) the image's default kernel name.
    pub fn set_default_kernel(&self, name: &str, kernel: Option<&str>) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        let mut record = self.get(name)?;
        record.default_kernel = kernel.map(str::to_string);
        let path = self.dir.join(&record.id).join(MANIFEST);
        write_atomic(&path, &manifest_bytes(&record)?)?;
        Ok(record)
    }

    /// Removes what no image references: image directories missing from the index, staging
    /// directories of builds that died, and cached OCI layers no image lists.
    pub fn prune(&self) -> Result<PruneReport> {
        let _lock = self.lock()?;
        let index = self.read_index()?;
        let ids: HashSet<&String> = index.images.values().collect();
        let mut report = PruneReport::default();
        for entry in fs::read_dir(&self.dir).ctx("read", &self.dir)? {
            let entry = entry.ctx("read", &self.dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let stale = if name == INDEX || name == LOCK {
                false
            } else if name.starts_with(".tmp-write-") {
                true // only written under the lock we hold
            } else if name.starts_with(STAGING_PREFIX) {
                staging_is_abandoned(&path)
            } else {
                is_id(&name) && !ids.contains(&name)
            };
            if stale {
                report.freed_bytes += disk_usage(&path);
                remove_any(&path)?;
                report.removed.push(path);
            }
        }
        let mut layers: HashSet<String> = HashSet::new();
        for (name, id) in &index.images {
            if let Ok(ImageRecord {
                source: ImageSource::Oci { layers: l, .. },
                ..
            }) = self.load(name, id)
            {
                layers.extend(l);
            }
        }
        let ldir = self.layers_dir();
        if let Ok(rd) = fs::read_dir(&ldir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !layers.contains(&name) {
                    report.freed_bytes += disk_usage(&entry.path());
                    remove_any(&entry.path())?;
                    report.removed.push(entry.path());
                }
            }
        }
        Ok(report)
    }

    /// Imports a rootfs tarball (`.tar`, `.tar.gz`, `.tar.zst`: detected by content) or an ext4
    /// file as image `name`.
    pub fn import(&self, path: &Path, name: &str) -> Result<ImageRecord> {
        self.import_with(path, name, &ImportOptions::default(), &mut |_| {})
    }

    /// [`ImageStore::import`] with options and progress.
    pub fn import_with(
        &self,
        path: &Path,
        name: &str,
        opts: &ImportOptions,
        progress: crate::Progress<'_>,
    ) -> Result<ImageRecord> {
        self.check_new_name(name)?;
        let meta = fs::metadata(path).ctx("open", path)?;
        if !meta.is_file() {
            return Err(ImageError::Invalid(format!(
                "{} is not a file; import takes a rootfs tarball or an ext4 image",
                path.display()
            )));
        }
        let staging = self.staging()?;
        let agent_injected;
        if ext4::is_ext4(path) {
            if opts.agent_bin.is_some() {
                return Err(ImageError::Unsupported(
                    "wick-agent can be injected into a tarball import, not into an ext4 image \
                     (which is never mounted); import the rootfs as a tarball instead"
                        .into(),
                ));
            }
            progress("checking the ext4 image");
            ext4::check_ext4(path)?;
            progress("copying the ext4 image");
            sparse_copy(path, &staging.rootfs_img())?;
            agent_injected = ext4_has_file(&staging.rootfs_img(), crate::inject::AGENT_PATH)?;
        } else {
            require_root("importing a rootfs tarball")?;
            let root = staging.scratch("rootfs")?;
            progress("extracting the tarball");
            let mut applier = Applier::new(&root, false, true);
            applier.apply(open_tar(path)?, &path.display().to_string())?;
            applier.finish()?;
            if let Some(agent) = &opts.agent_bin {
                progress("injecting wick-agent");
                crate::inject::inject_agent(&root, agent)?;
            }
            agent_injected = root.join(crate::inject::AGENT_PATH).is_file();
            progress("making the ext4 root filesystem");
            let headroom = opts.headroom_mib.unwrap_or(DEFAULT_HEADROOM_MIB) * MIB;
            dir_to_ext4(&root, &staging.rootfs_img(), "root", headroom)?;
        }
        if opts.shrink {
            progress("shrinking the root filesystem");
            ext4::shrink_ext4(&staging.rootfs_img())?;
        }
        if let Some(seed) = &opts.work_seed {
            ext4::check_ext4(seed)?;
            sparse_copy(seed, &staging.work_seed_img())?;
        }
        let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.commit(
            staging,
            name,
            ImageSource::Import { path: abs },
            agent_injected,
            progress,
        )
    }

    // ---- crate-internal building blocks ----

    /// Fails unless `name` is valid and unused (checked again at commit).
    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        validate_image_name(name)?;
        if self.exists(name)? {
            return Err(ImageError::Exists(name.to_string()));
        }
        Ok(())
    }

    /// A new staging directory inside the store (same filesystem, so commit is a rename).
    pub(crate) fn staging(&self) -> Result<Staging> {
        // 0700 from birth (tempfile's default is 0777 & umask): image content (device nodes,
        // setuid files) is unpacked in here and must be unreachable for other local users.
        let dir = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir_in(&self.dir)
            .ctx("create a staging directory in", &self.dir)?;
        let lock_path = dir.path().join(LOCK);
        let f = File::create(&lock_path).ctx("create", &lock_path)?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io(format!("lock {}", lock_path.display()), e.into()))?;
        Ok(Staging {
            dir: Some(dir),
            _lock: lock,
            config: None,
        })
    }

    /// Hashes the staged rootfs and moves the staging directory into place as image `name`.
    pub(crate) fn commit(
        &self,
        staging: Staging,
        name: &str,
        source: ImageSource,
        agent_injected: bool,
        progress: crate::Progress<'_>,
    ) -> Result<ImageRecord> {
        let extra = CommitExtra {
            agent_injected,
            ..CommitExtra::default()
        };
        self.commit_with(staging, name, source, extra, progress)
    }

    /// [`ImageStore::commit`] with the record's extra fields, optionally replacing the name.
    pub(crate) fn commit_with(
        &self,
        mut staging: Staging,
        name: &str,
        source: ImageSource,
        extra: CommitExtra,
        progress: crate::Progress<'_>,
    ) -> Result<ImageRecord> {
        let agent_injected = extra.agent_injected;
        let scratch = staging.path().join("scratch");
        if scratch.exists() {
            fs::remove_dir_all(&scratch).ctx("remove", &scratch)?;
        }
        progress("hashing the root filesystem");
        let rootfs = staging.rootfs_img();
        let id = sha256_file(&rootfs)?;
        let size = fs::metadata(&rootfs).ctx("stat", &rootfs)?.len();
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let replaced = match index.images.get(name) {
            Some(old) if extra.replace => Some(old.clone()),
            Some(_) => return Err(ImageError::Exists(name.to_string())),
            None => None,
        };
        let target = self.dir.join(&id);
        if !target.join(MANIFEST).is_file() {
            let work_seed = staging.work_seed_img();
            let record = ImageRecord {
                name: name.to_string(),
                id: id.clone(),
                created_at: util::now_rfc3339(),
                source,
                rootfs: target.join(ROOTFS),
                work_seed: work_seed.is_file().then(|| target.join(WORK_SEED)),
                size,
                default_kernel: extra.default_kernel,
                agent_injected,
                build_key: extra.build_key,
                config: staging.config.take(),
            };
            let spath = staging.path().to_path_buf();
            fs::write(spath.join(MANIFEST), manifest_bytes(&record)?)
                .ctx("write", &spath.join(MANIFEST))?;
            for f in [ROOTFS, WORK_SEED, MANIFEST] {
                if let Ok(file) = File::open(spath.join(f)) {
                    file.sync_all().ctx("sync", &spath.join(f))?;
                }
            }
            let _ = fs::remove_file(spath.join(LOCK));
            fs::set_permissions(&spath, fs::Permissions::from_mode(0o755)).ctx("chmod", &spath)?;
            if target.exists() {
                // An orphan without a manifest (a crash mid-commit): replace it.
                remove_any(&target)?;
            }
            fs::rename(&spath, &target).ctx("move the image into", &target)?;
            // Renamed away: the TempDir must not try to delete it.
            let _ = staging.dir.take().map(tempfile::TempDir::keep);
            fsync_dir(&self.dir)?;
        }
        index.images.insert(name.to_string(), id.clone());
        self.write_index(&index)?;
        if let Some(old) = replaced.filter(|old| *old != id) {
            if !index.images.values().any(|v| *v == old) {
                remove_dir_atomically(&self.dir, &self.dir.join(&old))?;
            }
        }
        progress("done");
        self.load(name, &id)
    }

    fn load(&self, name: &str, id: &str) -> Result<ImageRecord> {
        let dir = self.dir.join(id);
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| {
            ImageError::io(
                format!(
                    "read {} (image {name:?} is damaged; delete it and import or build it again)",
                    path.display()
                ),
                e,
            )
        })?;
        let mut r: ImageRecord = serde_json::from_slice(&bytes).map_err(|e| {
            ImageError::Invalid(format!(
                "{} is not a valid image manifest: {e}",
                path.display()
            ))
        })?;
        r.name = name.to_string();
        r.rootfs = dir.join(ROOTFS);
        r.work_seed = dir.join(WORK_SEED).is_file().then(|| dir.join(WORK_SEED));
        Ok(r)
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.dir.join(INDEX);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                ImageError::Invalid(format!(
                    "{} is corrupt ({e}); restore it or remove it and re-import the images",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(ImageError::io(format!("read {}", path.display()), e)),
        }
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(index).expect("index serializes");
        write_atomic(&self.dir.join(INDEX), &bytes)
    }

    /// The store-wide lock that serialises index changes (across processes, via flock).
    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io(format!("lock {}", path.display()), e.into()))
    }
}

/// Packs `root` into a new ext4 at `out` sized for its content plus `headroom` bytes.
pub(crate) fn dir_to_ext4(root: &Path, out: &Path, label: &str, headroom: u64) -> Result<u64> {
    let u = ext4::usage(root)?;
    ext4::make_ext4(root, out, label, ext4::size_for(u, headroom), u)
}

/// Image names: 1-128 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit.
pub fn validate_image_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(ImageError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("use 1-128 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return bad("start with a lowercase letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
    {
        return bad("use lowercase a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

pub(crate) fn require_root(what: &str) -> Result<()> {
    if util::is_root() {
        Ok(())
    } else {
        Err(ImageError::Unsupported(format!(
            "{what} needs root (file ownership inside the image is kept); run it through wickd \
             or as root"
        )))
    }
}

/// Whether the ext4 image contains `rel` (read with debugfs, no mount).
pub(crate) fn ext4_has_file(img: &Path, rel: &str) -> Result<bool> {
    let debugfs = util::require("debugfs", util::E2FS_HINT)?;
    let out = util::output(
        &util::tool(&debugfs)
            .arg("-R")
            .arg(format!("stat /{rel}"))
            .arg(util::arg(img)),
    )?;
    Ok(out.success() && out.stdout_text().contains("Inode:"))
}

fn manifest_bytes(r: &ImageRecord) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(r).map_err(|e| ImageError::Invalid(format!("serialize record: {e}")))
}

fn is_id(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn staging_is_abandoned(path: &Path) -> bool {
    match File::open(path.join(LOCK)) {
        // Its builder holds the lock while alive: if we can take it, nobody is building there.
        Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok(),
        Err(_) => true,
    }
}

fn disk_usage(path: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(rd) = fs::read_dir(path) {
            total += rd.flatten().map(|e| disk_usage(&e.path())).sum::<u64>();
        }
    }
    total
}

/// Removes a file or a tree; already gone is fine (a job may remove its own staging dir while
/// `prune` looks at it: the job's lock goes before its directory).
fn remove_any(path: &Path) -> Result<()> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let m = match fs::symlink_metadata(path) {
        Err(e) if gone(&e) => return Ok(()),
        m => m.ctx("stat", path)?,
    };
    let r = match m.is_dir() {
        true => fs::remove_dir_all(path),
        false => fs::remove_file(path),
    };
    match r {
        Err(e) if gone(&e) => Ok(()),
        r => r.ctx("remove", path),
    }
}

/// Renames `path` to a staging name first so a crash never leaves a half-deleted image that
/// looks complete, then deletes it.
fn remove_dir_atomically(store: &Path, path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let doomed = store.join(format!(
        "{STAGING_PREFIX}del-{}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    fs::rename(path, &doomed).ctx("rename", path)?;
    fs::remove_dir_all(&doomed).ctx("remove", &doomed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_image_name("debian-12").is_ok());
        assert!(validate_image_name("alpine-3.19").is_ok());
        assert!(validate_image_name("").is_err());
        assert!(validate_image_name("-x").is_err());
        assert!(validate_image_name("a/b").is_err());
        assert!(validate_image_name("..").is_err());
        assert!(validate_image_name("A").is_err());
    }

    #[test]
    fn empty_store_lists_nothing_and_prunes_orphans() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::new(d.path().join("images")).unwrap();
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(s.get("x"), Err(ImageError::NotFound(_))));
        assert!(matches!(s.delete("x"), Err(ImageError::NotFound(_))));
        let orphan = s.dir().join("a".repeat(64));
        fs::create_dir(&orphan).unwrap();
        fs::write(orphan.join(ROOTFS), b"x").unwrap();
        {
            let live = s.staging().unwrap();
            let dead = s.dir().join(".tmp-dead");
            fs::create_dir(&dead).unwrap();
            fs::create_dir_all(s.layers_dir()).unwrap();
            fs::write(s.layers_dir().join("sha256:00"), b"x").unwrap();
            let r = s.prune().unwrap();
            assert!(r.removed.contains(&orphan));
            assert!(r.removed.contains(&dead));
            assert!(live.path().exists(), "a live staging dir is kept");
            assert!(!s.layers_dir().join("sha256:00").exists());
        }
        assert!(fs::read_dir(s.dir())
            .unwrap()
            .flatten()
            .all(|e| e.file_name() == LOCK));
    }

    /// Image content (device nodes, setuid files) is unpacked into the staging dir: nobody but
    /// root may traverse it, whatever the umask.
    #[test]
    fn staging_is_private_before_anything_is_unpacked() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::new(d.path().join("images")).unwrap();
        let st = s.staging().unwrap();
        let mode = fs::metadata(st.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "staging dir mode {mode:o}");
        let scratch = st.scratch("rootfs").unwrap();
        let mode = fs::metadata(st.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode,
            0o700,
            "still private with scratch {}",
            scratch.display()
        );
    }
}
