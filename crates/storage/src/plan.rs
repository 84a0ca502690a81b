//! The durable disk record. A [`DiskPlan`] is computed before anything is made and holds every
//! name needed to find and release the disk later (files, COW file, dm name); the daemon persists
//! it in the VM's runtime record *before* calling [`crate::CowBackend::create`]. [`RootDisk`] is
//! what `create`/`activate` report back: the path to hand the VMM plus the loop devices attached.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::BackendKind;

/// Prefix of every device-mapper device wick makes (`wk-<short id>`).
pub const DM_PREFIX: &str = "wk-";
/// File name of the cloned root disk in the VM dir (reflink, copy).
pub const ROOT_FILE: &str = "rootfs.ext4";
/// File name of the dm-snapshot COW store in the VM dir.
pub const COW_FILE: &str = "root.cow";

/// The device-mapper name of a VM: `wk-` + the first 12 characters of its id.
pub fn dm_name(vm_id: &str) -> String {
    format!("{DM_PREFIX}{}", wick_model::vm::short_id(vm_id))
}

/// Everything needed to make, re-activate and release one VM's root disk, known before anything
/// exists. Serialized with a `backend` tag: `{"backend":"dm-snapshot","image":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum DiskPlan {
    /// `file` is a FICLONE clone of `image`.
    Reflink {
        #[schema(value_type = String)]
        image: PathBuf,
        #[schema(value_type = String)]
        file: PathBuf,
    },
    /// `file` is a sparse copy of `image`.
    Copy {
        #[schema(value_type = String)]
        image: PathBuf,
        #[schema(value_type = String)]
        file: PathBuf,
    },
    /// `file` is a FICLONE clone of `base`, the copy of `image` in the XFS pool
    /// (`<state>/xfs-pool/mnt`); both live in the pool.
    XfsPool {
        #[schema(value_type = String)]
        image: PathBuf,
        #[schema(value_type = String)]
        base: PathBuf,
        #[schema(value_type = String)]
        file: PathBuf,
    },
    /// `/dev/mapper/<name>`: a persistent dm snapshot of a read-only loop over `image`, with
    /// its exceptions in the sparse file `cow` (attached through its own loop device).
    DmSnapshot {
        #[schema(value_type = String)]
        image: PathBuf,
        #[schema(value_type = String)]
        cow: PathBuf,
        /// Size the COW file is created with (sparse).
        cow_bytes: u64,
        /// Origin size in 512-byte sectors (the table's length).
        sectors: u64,
        /// Snapshot chunk size in sectors.
        chunk_sectors: u32,
        /// Device-mapper name, `wk-<short id>`.
        name: String,
    },
}

impl DiskPlan {
    /// Which backend made (or will make) this disk.
    pub fn kind(&self) -> BackendKind {
        match self {
            DiskPlan::Reflink { .. } => BackendKind::Reflink,
            DiskPlan::Copy { .. } => BackendKind::Copy,
            DiskPlan::DmSnapshot { .. } => BackendKind::DmSnapshot,
            DiskPlan::XfsPool { .. } => BackendKind::XfsPool,
        }
    }

    /// The image root filesystem the disk is a clone of.
    pub fn image(&self) -> &Path {
        match self {
            DiskPlan::Reflink { image, .. }
            | DiskPlan::Copy { image, .. }
            | DiskPlan::DmSnapshot { image, .. }
            | DiskPlan::XfsPool { image, .. } => image,
        }
    }

    /// The path the VMM opens as the root drive.
    pub fn disk_path(&self) -> PathBuf {
        match self {
            DiskPlan::Reflink { file, .. }
            | DiskPlan::Copy { file, .. }
            | DiskPlan::XfsPool { file, .. } => file.clone(),
            DiskPlan::DmSnapshot { name, .. } => Path::new("/dev/mapper").join(name),
        }
    }

    /// The device-mapper table of a dm-snapshot plan over the given origin and COW devices.
    pub fn dm_table(&self, origin: &str, cow: &str) -> Option<String> {
        match self {
            DiskPlan::DmSnapshot {
                sectors,
                chunk_sectors,
                ..
            } => Some(format!(
                "0 {sectors} snapshot {origin} {cow} P {chunk_sectors}"
            )),
            _ => None,
        }
    }
}

/// A loop device attached for a disk. Recorded for display and diagnosis only: release always
/// re-derives loop devices from their backing files, because loop numbers are reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: String,
    #[schema(value_type = String)]
    pub backing: PathBuf,
    pub read_only: bool,
}

/// A usable root disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RootDisk {
    /// What the VMM opens: a file, or `/dev/mapper/wk-<id>`.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Loop devices behind it (dm-snapshot: origin, then COW).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loops: Vec<LoopDevice>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_serde() {
        assert_eq!(
            dm_name("0123456789abcdef0123456789abcdef"),
            "wk-0123456789ab"
        );
        let p = DiskPlan::DmSnapshot {
            image: "/i/rootfs.ext4".into(),
            cow: "/v/root.cow".into(),
            cow_bytes: 1 << 20,
            sectors: 2048,
            chunk_sectors: 8,
            name: "wk-0123456789ab".into(),
        };
        let j = serde_json::to_string(&p).unwrap();
        assert!(j.starts_with(r#"{"backend":"dm-snapshot","image":"/i/rootfs.ext4""#));
        assert_eq!(serde_json::from_str::<DiskPlan>(&j).unwrap(), p);
        assert_eq!(p.disk_path(), PathBuf::from("/dev/mapper/wk-0123456789ab"));
        assert_eq!(
            p.dm_table("/dev/loop1", "/dev/loop2").unwrap(),
            "0 2048 snapshot /dev/loop1 /dev/loop2 P 8"
        );
        let r = DiskPlan::Reflink {
            image: "/i".into(),
            file: "/v/rootfs.ext4".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"backend":"reflink","image":"/i","file":"/v/rootfs.ext4"}"#
        );
        assert_eq!(r.kind(), BackendKind::Reflink);
    }
}
