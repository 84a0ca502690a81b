//! The **XFS pool** (also "reflink pool"; config value `storage_backend = "pool"`): instant root
//! disks on a state dir that cannot reflink itself (e.g. ext4) and a host without device-mapper.
//!
//! On first use wickd makes a sparse file `<state>/xfs-pool/pool.xfs`, formats it XFS with
//! `reflink=1` and mounts it (`mount -o loop`, so the loop device clears itself when the mount
//! goes) at `<state>/xfs-pool/mnt`. Each image's rootfs is copied in once
//! (`mnt/images/<key>.ext4`, the key derived from the image file's path, inode, size and mtime,
//! so a replaced image is never reused stale) and every VM's root disk is a FICLONE clone of it
//! (`mnt/vms/<vm id>.ext4`): milliseconds, and only the blocks the VM writes are its own.
//!
//! Durability: [`XfsPool::record`] is pure; the daemon persists it before [`XfsPool::establish`]
//! creates anything. `establish` is idempotent and re-attaches and re-mounts after a reboot (or a
//! mount removed behind wickd's back); [`XfsPool::release_pool`] (idempotent) unmounts, detaches the
//! loop devices backed by the pool file (found by their backing file, never by number) and
//! removes the file; the daemon calls it to sweep a pool without a record. The pool grows before
//! it fills ([`Sizing`]): before an image copy or a clone, when its free space is below
//! `min_free`, the file is extended (capped by the host filesystem's free space minus a margin),
//! `losetup -c`, `xfs_growfs`.

mod backend;
mod mounts;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wick_model::api::{Check, CheckStatus};

use crate::dm::list_loops;
use crate::error::{Result, StorageError};
use crate::file::{ensure_dir, lock_exclusive, remove_if_exists};
use crate::runner::{run, run_ok, Runner, SystemRunner};

pub use backend::image_key;

/// Directory of the pool under the state dir.
pub const POOL_DIR: &str = "xfs-pool";
/// The pool's backing file (sparse, XFS inside).
pub const POOL_FILE: &str = "pool.xfs";
/// Where the pool is mounted, under [`POOL_DIR`].
pub const MOUNT_DIR: &str = "mnt";
const NEW_SUFFIX: &str = ".new";
const LOCK_FILE: &str = ".xfs-pool.lock";
const LABEL: &str = "wick-pool";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// XFS needs about 300 MiB; smaller pools are refused.
const MIN_POOL: u64 = 512 * MIB;

/// The pool's durable identity: what the daemon records before the pool exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// The backing file.
    pub file: PathBuf,
    /// The mount point.
    pub mount: PathBuf,
    /// The loop device last seen backing the mount, for display: release and sweep always find
    /// loop devices again by their backing file (`losetup -j`), as numbers are reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<String>,
}

/// How big the pool starts and when it grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Size of a new pool file (sparse: costs nothing until written). Capped by the host's free
    /// space minus `host_margin`.
    pub initial: u64,
    /// Free space the pool keeps before a disk is placed; below it the pool grows first.
    pub min_free: u64,
    /// Free space always left to the host filesystem holding the pool file.
    pub host_margin: u64,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing {
            initial: 32 * GIB,
            min_free: 4 * GIB,
            host_margin: 2 * GIB,
        }
    }
}

/// What [`XfsPool::status`] found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The backing file exists.
    pub exists: bool,
    /// Its apparent size (the pool's size).
    pub size: u64,
    /// Loop devices backed by it.
    pub loops: Vec<String>,
    /// Mounted at the mount point (the XFS from one of `loops`).
    pub mounted: bool,
    /// `(total, available)` bytes of the mounted filesystem.
    pub space: Option<(u64, u64)>,
}

/// The pool of one state dir. Cheap to make; every operation takes the pool's file lock.
pub struct XfsPool {
    runner: Arc<dyn Runner>,
    dir: PathBuf,
    sizing: Sizing,
}

impl XfsPool {
    /// The pool under `state_dir`, run through the system runner.
    pub fn system(state_dir: &Path) -> Self {
        Self::new(Arc::new(SystemRunner::new()), state_dir)
    }

    /// The pool under `state_dir`; host commands go through `runner`.
    pub fn new(runner: Arc<dyn Runner>, state_dir: &Path) -> Self {
        let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.into());
        XfsPool {
            runner,
            dir: state.join(POOL_DIR),
            sizing: Sizing::default(),
        }
    }

    /// Replaces the default [`Sizing`].
    pub fn with_sizing(mut self, sizing: Sizing) -> Self {
        self.sizing = sizing;
        self
    }

    /// The backing file.
    pub fn file(&self) -> PathBuf {
        self.dir.join(POOL_FILE)
    }

    /// The mount point.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.join(MOUNT_DIR)
    }

    /// The durable record of this pool (pure: nothing is made).
    pub fn record(&self) -> PoolRecord {
        PoolRecord {
            file: self.file(),
            mount: self.mount_point(),
            loop_device: None,
        }
    }

    /// Whether `path` is this pool's backing file (the dm-snapshot sweep leaves it alone).
    pub fn is_pool_file(state_dir: &Path, path: &Path) -> bool {
        path.ends_with(Path::new(POOL_DIR).join(POOL_FILE)) && path.starts_with(state_dir)
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        lock_exclusive(self.dir.parent().unwrap_or(&self.dir), LOCK_FILE)
    }

    /// Makes the pool usable: creates it when missing (only if `create`), attaches and mounts
    /// it when it is not mounted. Idempotent. Returns the record with its loop device, or
    /// `None` when the pool does not exist and `create` is false.
    pub fn establish(&self, create: bool) -> Result<Option<PoolRecord>> {
        let _l = self.lock()?;
        self.establish_locked(create)
    }

    fn establish_locked(&self, create: bool) -> Result<Option<PoolRecord>> {
        let file = self.file();
        if !file.exists() {
            if !create {
                return Ok(None);
            }
            self.make_file()?;
        }
        search_only(&self.dir)?;
        let mnt = self.mount_point();
        let dev = match self.mounted_device()? {
            Some(dev) => dev,
            None => {
                ensure_dir(&mnt)?;
                if let Some(other) = mounts::mount_at(&mnt) {
                    return Err(StorageError::Invalid(format!(
                        "{} is already a mount point of {} ({}); unmount it so wick can mount its \
                         XFS pool there",
                        mnt.display(),
                        other.source,
                        other.fstype
                    )));
                }
                let (f, m) = (file.to_string_lossy(), mnt.to_string_lossy());
                let opts = "loop,nodev,nosuid,noexec";
                self.mount_retrying(&["-t", "xfs", "-o", opts, &f, &m])
                    .map_err(|e| {
                        StorageError::Unsupported(format!(
                            "cannot mount the XFS pool {f} at {m}: {e}; if the pool file is \
                             damaged, delete every VM made with storage_backend = \"pool\" and \
                             remove {f}"
                        ))
                    })?;
                self.mounted_device()?.ok_or_else(|| {
                    StorageError::Invalid(format!(
                        "mounted the XFS pool at {m}, but no loop device backed by {f} is mounted \
                         there"
                    ))
                })?
            }
        };
        for d in [mnt.clone(), mnt.join("images"), mnt.join("vms")] {
            ensure_dir(&d)?;
            search_only(&d)?;
        }
        Ok(Some(PoolRecord {
            loop_device: Some(dev),
            ..self.record()
        }))
    }

    /// Creates the sparse file and its XFS under a temporary name, then renames it into place,
    /// so a crash never leaves a half-formatted pool behind the real name.
    fn make_file(&self) -> Result<()> {
        ensure_dir(&self.dir)?;
        let new = self.dir.join(format!("{POOL_FILE}{NEW_SUFFIX}"));
        remove_if_exists(&new)?;
        let host_free = avail(&self.dir)?;
        let room = host_free.saturating_sub(self.sizing.host_margin);
        let size = self.sizing.initial.min(room) / MIB * MIB;
        if size < MIN_POOL {
            return Err(StorageError::Unsupported(format!(
                "cannot create the XFS pool in {}: the host filesystem has {} free and wick \
                 keeps {} spare, leaving less than the {} a pool needs; free space there or \
                 set storage_backend = \"copy\"",
                self.dir.display(),
                human(host_free),
                human(self.sizing.host_margin),
                human(MIN_POOL)
            )));
        }
        let res = (|| {
            let f = OpenOptions::new()
                .mode(0o600)
                .write(true)
                .create_new(true)
                .open(&new)
                .map_err(|e| StorageError::io("cannot create", &new, e))?;
            f.set_len(size)
                .map_err(|e| StorageError::io("cannot size", &new, e))?;
            drop(f);
            let n = new.to_string_lossy();
            let args = ["-q", "-f", "-m", "reflink=1", "-L", LABEL, &n];
            run_ok(&*self.runner, "mkfs.xfs", &args)?;
            std::fs::rename(&new, self.file())
                .map_err(|e| StorageError::io("cannot rename into place", &new, e))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&new);
        }
        res
    }

    /// `mount ARGS`, tried again (up to 3 times, 200 ms apart) while it fails: the loop device
    /// of a mount that just went away is cleared by the kernel asynchronously, and `mount -o
    /// loop` may pick it up meanwhile.
    fn mount_retrying(&self, args: &[&str]) -> Result<String> {
        let mut attempt = 0;
        loop {
            match run_ok(&*self.runner, "mount", args) {
                Ok(out) => return Ok(out),
                Err(e) if attempt >= 2 => return Err(e),
                Err(e) => {
                    tracing::info!(error = %e, "mounting the XFS pool failed; trying again");
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
    }

    /// The loop device (backed by the pool file) mounted at the mount point, if any.
    fn mounted_device(&self) -> Result<Option<String>> {
        let Some(m) = mounts::mount_at(&self.mount_point()) else {
            return Ok(None);
        };
        let loops = self.loops()?;
        Ok(loops.into_iter().find(|l| *l == m.source))
    }

    /// Loop devices backed by the pool file.
    pub fn loops(&self) -> Result<Vec<String>> {
        let file = self.file();
        Ok(list_loops(&*self.runner)?
            .into_iter()
            .filter(|l| l.backs(&file))
            .map(|l| l.name)
            .collect())
    }

    /// What exists of the pool on the host (read-only).
    pub fn status(&self) -> Result<PoolStatus> {
        let file = self.file();
        let size = std::fs::metadata(&file).map(|m| m.len()).ok();
        let mounted = self.mounted_device()?.is_some();
        let space = if mounted {
            let st = nix::sys::statvfs::statvfs(&self.mount_point())
                .map_err(|e| StorageError::io("cannot statvfs", &self.mount_point(), e.into()))?;
            let frsize = st.fragment_size() as u64;
            Some((
                st.blocks() as u64 * frsize,
                st.blocks_available() as u64 * frsize,
            ))
        } else {
            None
        };
        Ok(PoolStatus {
            exists: size.is_some(),
            size: size.unwrap_or(0),
            loops: self.loops()?,
            mounted,
            space,
        })
    }

    /// Makes sure the mounted pool (on `dev`) has `need` bytes plus `min_free` available,
    /// growing the file, the loop device and the XFS first when it has not. Errors clearly when
    /// the host filesystem cannot back even `need`.
    fn grow_for(&self, need: u64, dev: &str) -> Result<()> {
        let mnt = self.mount_point();
        let pool_free = avail(&mnt)?;
        let want = need + self.sizing.min_free;
        if pool_free >= want {
            return Ok(());
        }
        let file = self.file();
        let size = std::fs::metadata(&file)
            .map_err(|e| StorageError::io("cannot stat", &file, e))?
            .len();
        let host_free = avail(&self.dir)?;
        let room = host_free.saturating_sub(self.sizing.host_margin);
        let add = ((want - pool_free).max(size / 2).min(room)) / MIB * MIB;
        if pool_free + add < need {
            return Err(StorageError::Unsupported(format!(
                "the XFS pool {} has {} free and needs {}, and the host filesystem holding it \
                 has only {} free (wick keeps {} spare): free space there, delete VMs, or set \
                 storage_backend = \"copy\"",
                file.display(),
                human(pool_free),
                human(need),
                human(host_free),
                human(self.sizing.host_margin)
            )));
        }
        if add == 0 {
            return Ok(()); // enough for `need`, just not the headroom; the host has no more
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|e| StorageError::io("cannot open", &file, e))?;
        f.set_len(size + add)
            .map_err(|e| StorageError::io("cannot grow", &file, e))?;
        drop(f);
        run_ok(&*self.runner, "losetup", &["--set-capacity", dev])?;
        run_ok(&*self.runner, "xfs_growfs", &["-d", &mnt.to_string_lossy()])?;
        tracing::info!(
            pool = %file.display(),
            from = size,
            to = size + add,
            "grew the XFS pool"
        );
        Ok(())
    }

    /// Removes the whole pool: unmounts it, detaches every loop device backed by its file,
    /// removes the file (and a half-made one) and its directory. Idempotent; returns what it
    /// removed. Fails (leaving the pool usable) when the mount is busy.
    pub fn release_pool(&self) -> Result<Vec<String>> {
        let _l = self.lock()?;
        let mut done = Vec::new();
        let mnt = self.mount_point();
        let m = mnt.to_string_lossy();
        while mounts::mount_at(&mnt).is_some() {
            run_ok(&*self.runner, "umount", &[&m]).map_err(|e| {
                StorageError::Invalid(format!(
                    "cannot unmount the XFS pool at {m} ({e}); a VM disk in it is still open"
                ))
            })?;
            done.push(format!("XFS pool mount {m}"));
        }
        for dev in self.loops()? {
            let out = run(&*self.runner, "losetup", &["--detach", &dev])?;
            let err = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
            if !out.status.success() && !err.contains("no such device") {
                return Err(crate::runner::command_error(
                    "losetup",
                    &["--detach", &dev],
                    &out,
                    None,
                ));
            }
            done.push(format!("XFS pool loop device {dev}"));
        }
        for f in [
            self.file(),
            self.dir.join(format!("{POOL_FILE}{NEW_SUFFIX}")),
        ] {
            if f.exists() {
                remove_if_exists(&f)?;
                done.push(format!("XFS pool file {}", f.display()));
            }
        }
        for d in [&mnt, &self.dir] {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("cannot remove", d, e)),
            }
        }
        Ok(done)
    }
}

/// `rwx--x--x`: a contained VMM (its own uid) may pass through to its disk, not list the pool.
fn search_only(dir: &Path) -> Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| StorageError::io("cannot chmod", dir, e))
}

/// Bytes available on the filesystem holding `path`, as `df` shows them (`f_bavail`).
fn avail(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| StorageError::io("cannot statvfs", path, e.into()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// `1.5 GiB`, `300 MiB`.
pub fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// The `wick doctor` line of the pool: where it is, its size and free space, or whether one
/// can be made here (`probe`).
pub fn doctor(probe: &std::result::Result<(), String>, state_dir: &Path) -> Check {
    let pool = XfsPool::system(state_dir);
    let (status, detail) = match pool.status() {
        Ok(st) if st.exists => {
            let mount = pool.mount_point();
            let space = match st.space {
                Some((total, free)) => format!(
                    "mounted at {} ({}), {} of {} free",
                    mount.display(),
                    st.loops.join(", "),
                    human(free),
                    human(total)
                ),
                None => format!(
                    "not mounted at {} (wickd mounts it again at start and before each use)",
                    mount.display()
                ),
            };
            let status = if st.space.is_some() {
                CheckStatus::Pass
            } else {
                CheckStatus::Warn
            };
            let file = pool.file();
            (
                status,
                format!("{}: {} file, {space}", file.display(), human(st.size)),
            )
        }
        Ok(_) => match probe {
            Ok(()) => (
                CheckStatus::Pass,
                format!("none yet; made at {} on first use", pool.file().display()),
            ),
            Err(why) => (CheckStatus::Warn, why.clone()),
        },
        Err(e) => (CheckStatus::Warn, format!("cannot inspect the pool: {e}")),
    };
    Check {
        area: "storage".into(),
        name: "xfs pool".into(),
        status,
        detail,
        hint: None,
    }
}

/// Why this host cannot run an XFS pool, or `Ok`.
pub fn probe() -> std::result::Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the XFS pool needs root (loop devices, mount)".into());
    }
    for (tool, pkg) in [
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
        ("losetup", "util-linux"),
        ("mount", "mount"),
    ] {
        if !crate::in_path(tool) {
            return Err(format!("{tool} is not installed (install {pkg})"));
        }
    }
    let loaded = std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("xfs"))
        })
        .unwrap_or(false);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let module = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/fs/xfs");
    if !loaded && !module.is_dir() {
        return Err("the kernel has no XFS (not in /proc/filesystems, no xfs module)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
