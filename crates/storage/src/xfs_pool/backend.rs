//! The pool as a [`CowBackend`]: a VM's root disk is a FICLONE clone of its image's copy in the
//! pool. Plans name the pool paths; release and activate re-mount the pool when needed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::XfsPool;
use crate::error::{Result, StorageError};
use crate::file::{image_path, reflink, remove_if_exists, sparse_copy, wrong_backend};
use crate::plan::{DiskPlan, RootDisk};
use crate::{BackendKind, CowBackend};

const IMAGES: &str = "images";
const VMS: &str = "vms";
const TMP_PREFIX: &str = ".tmp-";

/// The key of an image file's current content: 16 hex digits of FNV-1a over its canonical path,
/// device, inode, size and mtime. A rewritten or replaced image gets a new key, so its stale copy
/// in the pool is never used for a new VM.
pub fn image_key(image: &Path) -> Result<String> {
    let path = image_path(image)?;
    let m = std::fs::metadata(&path).map_err(|e| StorageError::io("cannot stat", &path, e))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(path.as_os_str().as_encoded_bytes());
    for n in [
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
    ] {
        feed(&n.to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

fn parts(plan: &DiskPlan) -> Result<(&Path, &Path, &Path)> {
    match plan {
        DiskPlan::XfsPool { image, base, file } => Ok((image, base, file)),
        _ => Err(wrong_backend(BackendKind::XfsPool, plan)),
    }
}

fn check_id(vm_id: &str) -> Result<()> {
    let ok = !vm_id.is_empty()
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "VM id {vm_id:?} cannot name a disk in the XFS pool"
        )))
    }
}

fn missing_pool(pool: &XfsPool) -> StorageError {
    StorageError::Invalid(format!(
        "the XFS pool {} is missing; delete the VM and create it again",
        pool.file().display()
    ))
}

impl XfsPool {
    /// Copies `image` into the pool as `base` once (under a temporary name, then renamed), after
    /// growing the pool for it. The image must still have the key the plan was made with.
    fn ensure_base(&self, image: &Path, base: &Path, dev: &str) -> Result<()> {
        if base.exists() {
            return Ok(());
        }
        let key = image_key(image)?;
        if base.file_stem().and_then(|s| s.to_str()) != Some(key.as_str()) {
            return Err(StorageError::Invalid(format!(
                "image {} changed after the VM's disk was planned; create the VM again",
                image.display()
            )));
        }
        let m = std::fs::metadata(image).map_err(|e| StorageError::io("cannot stat", image, e))?;
        self.grow_for(m.blocks() * 512, dev)?;
        let dir = self.mount_point().join(IMAGES);
        let tmp = dir.join(format!("{TMP_PREFIX}{key}"));
        remove_if_exists(&tmp)?;
        sparse_copy(image, &tmp)?;
        let src = dir.join(format!("{key}.src"));
        std::fs::write(&src, image.as_os_str().as_encoded_bytes())
            .map_err(|e| StorageError::io("cannot write", &src, e))?;
        std::fs::rename(&tmp, base).map_err(|e| StorageError::io("cannot rename", &tmp, e))
    }

    /// Whether the image copy `key` in the pool is still the current copy of its source image.
    fn is_current(&self, key: &str) -> bool {
        let src = self.mount_point().join(IMAGES).join(format!("{key}.src"));
        std::fs::read(&src)
            .ok()
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()))
            .and_then(|p| image_key(&p).ok())
            .is_some_and(|k| k == key)
    }

    fn sweep_images(&self, bases: &HashSet<&Path>, out: &mut Vec<String>) -> Result<()> {
        let dir = self.mount_point().join(IMAGES);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.split('.').next().unwrap_or_default().to_string();
            let stale = if name.starts_with(TMP_PREFIX) {
                true
            } else if let Some(k) = name.strip_suffix(".ext4") {
                !bases.contains(path.as_path()) && !self.is_current(k)
            } else if let Some(k) = name.strip_suffix(".src") {
                !dir.join(format!("{k}.ext4")).exists()
            } else {
                false
            };
            if stale {
                remove_if_exists(&path)?;
                if !name.ends_with(".src") {
                    out.push(format!("XFS pool image copy {} ({key})", path.display()));
                }
            }
        }
        Ok(())
    }
}

impl CowBackend for XfsPool {
    fn kind(&self) -> BackendKind {
        BackendKind::XfsPool
    }

    fn plan(&self, vm_id: &str, _vm_dir: &Path, image: &Path) -> Result<DiskPlan> {
        check_id(vm_id)?;
        let image = image_path(image)?;
        let mnt = self.mount_point();
        Ok(DiskPlan::XfsPool {
            base: mnt
                .join(IMAGES)
                .join(format!("{}.ext4", image_key(&image)?)),
            file: mnt.join(VMS).join(format!("{vm_id}.ext4")),
            image,
        })
    }

    fn create(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let (image, base, file) = parts(plan)?;
        let _l = self.lock()?;
        let rec = self
            .establish_locked(true)?
            .ok_or_else(|| missing_pool(self))?;
        let dev = rec.loop_device.unwrap_or_default();
        self.ensure_base(image, base, &dev)?;
        self.grow_for(0, &dev)?;
        reflink(base, file)?; // removes `file` again if it fails after creating it
        Ok(RootDisk {
            path: file.to_path_buf(),
            loops: Vec::new(),
        })
    }

    fn activate(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let (_, _, file) = parts(plan)?;
        let _l = self.lock()?;
        self.establish_locked(false)?
            .ok_or_else(|| missing_pool(self))?;
        if !file.is_file() {
            return Err(StorageError::Invalid(format!(
                "root disk {} is missing from the XFS pool; delete the VM and create it again",
                file.display()
            )));
        }
        Ok(RootDisk {
            path: file.to_path_buf(),
            loops: Vec::new(),
        })
    }

    fn release(&self, plan: &DiskPlan) -> Result<()> {
        let (_, _, file) = parts(plan)?;
        let _l = self.lock()?;
        if self.establish_locked(false)?.is_none() {
            return Ok(()); // no pool, so no disk in it
        }
        remove_if_exists(file)
    }

    /// Removes VM disks in the pool that no known plan names, half-made image copies, and image
    /// copies that no plan uses and that are no longer their image's current copy. Touches
    /// nothing when the pool is not mounted (the daemon establishes or releases the pool itself).
    fn sweep(&self, known: &[DiskPlan]) -> Result<Vec<String>> {
        let _l = self.lock()?;
        let mut out = Vec::new();
        if self.mounted_device()?.is_none() {
            return Ok(out);
        }
        let (mut files, mut bases) = (HashSet::new(), HashSet::new());
        for p in known {
            if let Ok((_, base, file)) = parts(p) {
                files.insert(file);
                bases.insert(base);
            }
        }
        let vms = self.mount_point().join(VMS);
        if let Ok(rd) = std::fs::read_dir(&vms) {
            for e in rd.flatten() {
                let path = e.path();
                if !files.contains(path.as_path()) {
                    remove_if_exists(&path)?;
                    out.push(format!("XFS pool disk {}", path.display()));
                }
            }
        }
        self.sweep_images(&bases, &mut out)?;
        Ok(out)
    }
}
