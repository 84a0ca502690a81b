//! Per-VM disks for `wickd`: the copy-on-write **root disk** cloned from an image's
//! `rootfs.ext4`, and the ext4 **work disk** mounted at `/root`.
//!
//! Root disks go through a [`CowBackend`]: `reflink` ([`FileBackend::reflink`], FICLONE),
//! `copy` ([`FileBackend::copy`], sparse copy), `dm-snapshot` ([`DmSnapshotBackend`], loop
//! devices + a device-mapper snapshot) or the XFS pool ([`XfsPool`], FICLONE inside a
//! loop-mounted XFS file under the state dir). [`select`] picks one (`auto` probes the state dir).
//!
//! The durability rule: [`CowBackend::plan`] computes a serializable [`DiskPlan`] holding every
//! name the disk will ever have, before anything exists. The daemon persists it, then calls
//! [`CowBackend::create`] (which rolls back what it made if a step fails). Later,
//! [`CowBackend::activate`] re-assembles the disk after a host reboot and [`CowBackend::release`]
//! (idempotent) removes it, both working from the plan alone; [`release`] picks the backend
//! from the plan, so a VM keeps the backend it was made with. [`CowBackend::sweep`] removes what a
//! crash left behind that no known plan owns.
//!
//! - [`plan`]: the record types and deterministic names;
//! - [`file`]: FICLONE and sparse copy, the file backends;
//! - [`dm`]: the dm-snapshot backend;
//! - [`xfs_pool`]: the XFS pool (its own durable record, made and swept by the daemon);
//! - [`work_disk`]: create, seed and grow the work disk;
//! - [`runner`]: how `losetup`/`dmsetup`/e2fsprogs are run.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use wick_model::api::{Check, CheckStatus};

pub mod dm;
mod error;
pub mod file;
pub mod plan;
pub mod runner;
pub mod work_disk;
pub mod xfs_pool;

pub use dm::DmSnapshotBackend;
pub use error::{Result, StorageError};
pub use file::FileBackend;
pub use plan::{dm_name, DiskPlan, LoopDevice, RootDisk};
pub use runner::{Runner, SystemRunner};
pub use xfs_pool::{PoolRecord, XfsPool};

/// A concrete root-disk backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Reflink,
    DmSnapshot,
    Copy,
    XfsPool,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Reflink => "reflink",
            BackendKind::DmSnapshot => "dm-snapshot",
            BackendKind::Copy => "copy",
            BackendKind::XfsPool => "xfs-pool",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `storage_backend` setting: a backend, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    #[default]
    Auto,
    Reflink,
    DmSnapshot,
    Copy,
    /// The XFS pool (config value `pool`).
    Pool,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => BackendChoice::Auto,
            "reflink" => BackendChoice::Reflink,
            "dm-snapshot" => BackendChoice::DmSnapshot,
            "copy" => BackendChoice::Copy,
            "pool" | "xfs-pool" => BackendChoice::Pool,
            other => {
                return Err(format!(
                    "unknown storage backend {other:?}: use auto, reflink, dm-snapshot, pool or \
                     copy"
                ))
            }
        })
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Reflink => "reflink",
            BackendChoice::DmSnapshot => "dm-snapshot",
            BackendChoice::Copy => "copy",
            BackendChoice::Pool => "pool",
        })
    }
}

/// A way to give each VM its own writable root disk over a shared, read-only image.
pub trait CowBackend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// `reflink`, `dm-snapshot`, `copy` or `xfs-pool`.
    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Computes the durable record of the disk for VM `vm_id`, whose files go in `vm_dir`.
    /// Makes nothing on the host (reads only the image's metadata).
    fn plan(&self, vm_id: &str, vm_dir: &Path, image: &Path) -> Result<DiskPlan>;

    /// Makes the disk. Never overwrites: fails if the plan's files exist. On failure, whatever
    /// this call made is removed again before it returns.
    fn create(&self, plan: &DiskPlan) -> Result<RootDisk>;

    /// Makes an existing disk usable again (dm-snapshot: re-attach loops and re-create the dm
    /// device after a host reboot; files: check they exist). Idempotent; call before each start.
    fn activate(&self, plan: &DiskPlan) -> Result<RootDisk>;

    /// Removes the disk and every host resource behind it. Idempotent, and works on a plan
    /// whose `create` never ran or was interrupted at any point.
    fn release(&self, plan: &DiskPlan) -> Result<()>;

    /// Removes host resources of this backend that a crash left behind and that belong to none
    /// of the `known` plans; returns a description of each. Files in VM dirs are the daemon's.
    fn sweep(&self, known: &[DiskPlan]) -> Result<Vec<String>>;
}

/// The backend of `kind`, without probing the host (use for plans already made).
pub fn backend(kind: BackendKind, state_dir: &Path) -> Box<dyn CowBackend> {
    match kind {
        BackendKind::Reflink => Box::new(FileBackend::reflink()),
        BackendKind::Copy => Box::new(FileBackend::copy()),
        BackendKind::DmSnapshot => Box::new(DmSnapshotBackend::new(
            Arc::new(SystemRunner::new()),
            state_dir,
        )),
        BackendKind::XfsPool => Box::new(XfsPool::system(state_dir)),
    }
}

/// Releases a recorded disk with the backend that made it.
pub fn release(plan: &DiskPlan, state_dir: &Path) -> Result<()> {
    backend(plan.kind(), state_dir).release(plan)
}

/// What this host's state dir supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `Ok` when a file in the state dir can be FICLONEd, else why not.
    pub reflink: Result<(), String>,
    /// `Ok` when `/dev/mapper/control` exists and `dmsetup version` works, else why not.
    pub dm_snapshot: Result<(), String>,
    /// `Ok` when an XFS pool can be made and mounted here (root, xfsprogs, XFS in the kernel,
    /// no Firecracker jailer), else why not.
    pub xfs_pool: Result<(), String>,
}

impl Probe {
    /// What `auto` resolves to.
    pub fn auto(&self) -> BackendKind {
        if self.reflink.is_ok() {
            BackendKind::Reflink
        } else if self.dm_snapshot.is_ok() {
            BackendKind::DmSnapshot
        } else if self.xfs_pool.is_ok() {
            BackendKind::XfsPool
        } else {
            BackendKind::Copy
        }
    }

    /// Resolves a choice, or says why the chosen backend cannot work here.
    pub fn resolve(&self, choice: BackendChoice, state_dir: &Path) -> Result<BackendKind> {
        let dir = state_dir.display();
        match choice {
            BackendChoice::Auto => Ok(self.auto()),
            BackendChoice::Copy => Ok(BackendKind::Copy),
            BackendChoice::Reflink => match &self.reflink {
                Ok(()) => Ok(BackendKind::Reflink),
                Err(why) => Err(StorageError::Unsupported(format!(
                    "storage_backend = \"reflink\", but the state dir {dir} cannot reflink ({why}); \
                     put it on XFS (mkfs.xfs -m reflink=1) or btrfs, or use \"auto\" or \"copy\""
                ))),
            },
            BackendChoice::DmSnapshot => match &self.dm_snapshot {
                Ok(()) => Ok(BackendKind::DmSnapshot),
                Err(why) => Err(StorageError::Unsupported(format!(
                    "storage_backend = \"dm-snapshot\", but device-mapper is not usable ({why}); \
                     load the dm_mod and dm_snapshot kernel modules and install dmsetup, or use \
                     \"auto\" or \"copy\""
                ))),
            },
            BackendChoice::Pool => match &self.xfs_pool {
                Ok(()) => Ok(BackendKind::XfsPool),
                Err(why) => Err(StorageError::Unsupported(format!(
                    "storage_backend = \"pool\", but an XFS pool cannot work here ({why}); use \
                     \"auto\" or \"copy\""
                ))),
            },
        }
    }
}

/// Probes reflink support in `state_dir` (clones a small temporary file), device-mapper and
/// the XFS pool. `jailer`: the Firecracker jailer is configured; it hard-links each VM's disks
/// into a chroot on the state dir's filesystem, which cannot reach files in the pool.
pub fn probe(state_dir: &Path, jailer: bool) -> Probe {
    Probe {
        reflink: probe_reflink(state_dir),
        dm_snapshot: probe_dm(&SystemRunner::new()),
        xfs_pool: if jailer {
            Err(
                "jailer_bin is set: the jailer hard-links disks into its chroot, and hard links \
                 cannot cross from the state dir into the pool's filesystem"
                    .into(),
            )
        } else {
            xfs_pool::probe()
        },
    }
}

fn probe_reflink(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tag = format!(".wick-reflink-probe.{}", std::process::id());
    let (a, b) = (dir.join(format!("{tag}.a")), dir.join(format!("{tag}.b")));
    let _ = std::fs::remove_file(&b);
    let res = std::fs::write(&a, [0x5au8; 4096])
        .map_err(|e| format!("cannot write {}: {e}", a.display()))
        .and_then(|()| file::reflink(&a, &b).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    res
}

fn probe_dm(r: &dyn Runner) -> Result<(), String> {
    if !Path::new("/dev/mapper/control").exists() {
        return Err("/dev/mapper/control does not exist: the kernel has no device-mapper".into());
    }
    runner::run_ok(r, "dmsetup", &["version"])
        .map(|_| ())
        .map_err(|e| e.to_string())?;
    runner::run_ok(r, "losetup", &["--version"])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Probes the host and returns the backend for `choice`; fails when an explicitly chosen
/// backend cannot work here.
pub fn select(
    choice: BackendChoice,
    state_dir: &Path,
    jailer: bool,
) -> Result<Box<dyn CowBackend>> {
    let kind = probe(state_dir, jailer).resolve(choice, state_dir)?;
    Ok(backend(kind, state_dir))
}

/// `wick doctor` lines for storage: the resolved backend, what each backend needs, and the
/// work-disk tools.
pub fn doctor(choice: BackendChoice, state_dir: &Path, jailer: bool) -> Vec<Check> {
    let p = probe(state_dir, jailer);
    let check = |name: &str, status, detail: String, hint: Option<&str>| Check {
        area: "storage".into(),
        name: name.into(),
        status,
        detail,
        hint: hint.map(str::to_string),
    };
    let mut out = Vec::new();
    out.push(match p.resolve(choice, state_dir) {
        Ok(kind) if choice == BackendChoice::Auto => check(
            "root disk backend",
            if kind == BackendKind::Copy {
                CheckStatus::Warn
            } else {
                CheckStatus::Pass
            },
            format!("auto → {kind}"),
            (kind == BackendKind::Copy).then_some(
                "copy works but every VM costs a full copy of the image; put the state dir on \
                 XFS (reflink=1) or btrfs, or make XFS available (xfsprogs) for the XFS pool",
            ),
        ),
        Ok(kind) => check(
            "root disk backend",
            CheckStatus::Pass,
            kind.to_string(),
            None,
        ),
        Err(e) => check(
            "root disk backend",
            CheckStatus::Fail,
            e.to_string(),
            Some("change storage_backend in the config"),
        ),
    });
    out.push(match &p.reflink {
        Ok(()) => check(
            "reflink",
            CheckStatus::Pass,
            format!("{} can reflink", state_dir.display()),
            None,
        ),
        Err(why) => check("reflink", CheckStatus::Warn, why.clone(), None),
    });
    out.push(match &p.dm_snapshot {
        Ok(()) => check(
            "dm-snapshot",
            CheckStatus::Pass,
            "device-mapper and dmsetup work".into(),
            None,
        ),
        Err(why) => check("dm-snapshot", CheckStatus::Warn, why.clone(), None),
    });
    out.push(xfs_pool::doctor(&p.xfs_pool, state_dir));
    let missing: Vec<&str> = work_disk::TOOLS
        .iter()
        .copied()
        .filter(|t| !in_path(t))
        .collect();
    out.push(if missing.is_empty() {
        check(
            "work disk tools",
            CheckStatus::Pass,
            work_disk::TOOLS.join(", "),
            None,
        )
    } else {
        check(
            "work disk tools",
            CheckStatus::Fail,
            format!("missing: {}", missing.join(", ")),
            Some("install e2fsprogs"),
        )
    });
    out
}

pub(crate) fn in_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .any(|d| d.join(program).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve() {
        for s in ["auto", "reflink", "dm-snapshot", "copy", "pool"] {
            assert_eq!(s.parse::<BackendChoice>().unwrap().to_string(), s);
        }
        assert!("zfs"
            .parse::<BackendChoice>()
            .unwrap_err()
            .contains("auto, reflink"));
        let none = Probe {
            reflink: Err("no".into()),
            dm_snapshot: Err("no dm".into()),
            xfs_pool: Err("no xfs".into()),
        };
        let dir = Path::new("/s");
        assert_eq!(
            none.resolve(BackendChoice::Auto, dir).unwrap(),
            BackendKind::Copy
        );
        let e = none.resolve(BackendChoice::DmSnapshot, dir).unwrap_err();
        assert!(e.to_string().contains("no dm"), "{e}");
        assert!(none.resolve(BackendChoice::Reflink, dir).is_err());
        let e = none.resolve(BackendChoice::Pool, dir).unwrap_err();
        assert!(e.to_string().contains("no xfs"), "{e}");
        let pool = Probe {
            xfs_pool: Ok(()),
            ..none.clone()
        };
        assert_eq!(pool.auto(), BackendKind::XfsPool, "pool before copy");
        let dm = Probe {
            dm_snapshot: Ok(()),
            ..pool.clone()
        };
        assert_eq!(
            dm.auto(),
            BackendKind::DmSnapshot,
            "dm-snapshot before the pool"
        );
        let all = Probe {
            reflink: Ok(()),
            ..dm
        };
        assert_eq!(all.auto(), BackendKind::Reflink);
    }

    #[test]
    fn probe_and_doctor_on_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), false);
        println!("probe of {}: {p:?}", dir.path().display());
        assert!(
            probe(dir.path(), true).xfs_pool.is_err(),
            "never with the jailer"
        );
        let checks = doctor(BackendChoice::Auto, dir.path(), false);
        assert_eq!(checks.len(), 5);
        assert!(checks.iter().all(|c| c.area == "storage"));
        assert!(checks[0].detail.starts_with("auto → "));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe leaves nothing behind"
        );
    }
}
