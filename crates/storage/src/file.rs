//! File-level clones and the two file backends: `reflink` (FICLONE, instant on XFS/btrfs) and
//! `copy` (sparse copy: data extents only, holes kept; the portable fallback).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};
use crate::plan::{DiskPlan, RootDisk, ROOT_FILE};
use crate::{BackendKind, CowBackend};

/// How [`clone_file`] made its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    Reflink,
    SparseCopy,
}

/// Makes `dst` (must not exist) a FICLONE clone of `src`: the two share every extent until one
/// is written. Fails with [`StorageError::Unsupported`] when the filesystem cannot reflink or the
/// two paths are on different filesystems; `dst` is removed again on any failure.
pub fn reflink(src: &Path, dst: &Path) -> Result<()> {
    reflink_from(&open_source(src, true)?, src, dst)
}

fn reflink_from(s: &File, src: &Path, dst: &Path) -> Result<()> {
    let d = create_new(dst)?;
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    drop(d);
    let _ = std::fs::remove_file(dst);
    Err(reflink_error(src, dst, err))
}

fn reflink_error(src: &Path, dst: &Path, err: io::Error) -> StorageError {
    let dir = dst.parent().unwrap_or(dst).display();
    match err.raw_os_error() {
        Some(libc::EXDEV) => StorageError::Unsupported(format!(
            "cannot reflink {} into {dir}: they are on different filesystems; keep images and \
             VM dirs under the same state root, or set storage_backend = \"copy\"",
            src.display()
        )),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            StorageError::Unsupported(format!(
                "the filesystem holding {dir} cannot reflink ({err}); put the state dir on XFS \
                 (mkfs.xfs -m reflink=1) or btrfs, or set storage_backend = \"copy\" or \"auto\""
            ))
        }
        _ => StorageError::io("cannot reflink into", dst, err),
    }
}

/// Copies `src` to `dst` (must not exist) copying only data extents (SEEK_DATA/SEEK_HOLE +
/// `copy_file_range`), so the copy is as sparse as the source. Returns the length. The kernel may
/// share extents instead of copying on filesystems that can. `dst` is removed on failure.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<u64> {
    sparse_copy_from(&open_source(src, true)?, dst)
}

fn sparse_copy_from(s: &File, dst: &Path) -> Result<u64> {
    let d = create_new(dst)?;
    let res = copy_extents(s, &d).map_err(|e| StorageError::io("cannot copy into", dst, e));
    if res.is_err() {
        drop(d);
        let _ = std::fs::remove_file(dst);
    }
    res
}

/// Reflink when the filesystem can, else a sparse copy.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod> {
    clone_from(&open_source(src, true)?, src, dst)
}

/// [`clone_file`] of a file in a directory someone else controls (a running VM's dir, which
/// belongs to its VMM's uid): `src` itself must not be a symlink, nor a file with other links
/// (a hard link that uid planted to a file it cannot read), and the file read is the one
/// opened and checked, so it cannot be swapped for another between check and copy.
pub fn clone_untrusted(src: &Path, dst: &Path) -> Result<CloneMethod> {
    use std::os::unix::fs::MetadataExt;
    let f = open_source(src, false)?;
    let links = f
        .metadata()
        .map_err(|e| StorageError::io("cannot stat", src, e))?
        .nlink();
    if links != 1 {
        return Err(StorageError::io(
            "cannot clone",
            src,
            io::Error::new(io::ErrorKind::InvalidInput, "it has other hard links"),
        ));
    }
    clone_from(&f, src, dst)
}

fn clone_from(s: &File, src: &Path, dst: &Path) -> Result<CloneMethod> {
    match reflink_from(s, src, dst) {
        Ok(()) => Ok(CloneMethod::Reflink),
        Err(StorageError::Unsupported(_)) => {
            sparse_copy_from(s, dst).map(|_| CloneMethod::SparseCopy)
        }
        Err(e) => Err(e),
    }
}

/// Opens a clone's source without blocking (a FIFO never hangs the caller) and only if it is a
/// regular file; with `follow` false, a symlink as `src` is refused too.
fn open_source(src: &Path, follow: bool) -> Result<File> {
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(src)
        .map_err(|e| StorageError::io("cannot open", src, e))?;
    let meta = f
        .metadata()
        .map_err(|e| StorageError::io("cannot stat", src, e))?;
    if !meta.is_file() {
        return Err(StorageError::io(
            "cannot clone",
            src,
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    Ok(f)
}

fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .mode(0o600) // owner only (state dir files are private)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StorageError::io("cannot create", path, e))
}

fn copy_extents(s: &File, d: &File) -> io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    let len = s.metadata()?.len();
    d.set_len(len)?;
    let end = len as i64;
    let mut pos: i64 = 0;
    while pos < end {
        let data = match lseek(s.as_raw_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(s.as_raw_fd(), data, Whence::SeekHole)?;
        copy_range(s, d, data, hole - data)?;
        pos = hole;
    }
    d.sync_all()?;
    Ok(len)
}

fn copy_range(s: &File, d: &File, off: i64, mut len: i64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (off, off);
    while len > 0 {
        let n = match nix::fcntl::copy_file_range(
            s.as_fd(),
            Some(&mut off_in),
            d.as_fd(),
            Some(&mut off_out),
            len as usize,
        ) {
            Ok(n) => n,
            // Across filesystems of different types (host ext4 → XFS pool) newer kernels
            // refuse copy_file_range: copy through a buffer instead.
            Err(nix::errno::Errno::EXDEV)
            | Err(nix::errno::Errno::EINVAL)
            | Err(nix::errno::Errno::EOPNOTSUPP) => {
                return copy_buffered(s, d, off_in, len);
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        len -= n as i64;
    }
    Ok(())
}

fn copy_buffered(s: &File, d: &File, mut off: i64, mut len: i64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while len > 0 {
        let want = buf.len().min(len as usize);
        let n = s.read_at(&mut buf[..want], off as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        d.write_all_at(&buf[..n], off as u64)?;
        off += n as i64;
        len -= n as i64;
    }
    Ok(())
}

/// Absolute, symlink-free path of an existing image file.
pub(crate) fn image_path(image: &Path) -> Result<PathBuf> {
    let p = std::fs::canonicalize(image)
        .map_err(|e| StorageError::io("image root filesystem is not usable:", image, e))?;
    if !p.is_file() {
        return Err(StorageError::Invalid(format!(
            "image root filesystem {} is not a regular file",
            p.display()
        )));
    }
    Ok(p)
}

/// Absolute form of the VM dir (it need not exist yet).
pub(crate) fn vm_dir_path(vm_dir: &Path) -> Result<PathBuf> {
    std::path::absolute(vm_dir).map_err(|e| StorageError::io("bad VM dir", vm_dir, e))
}

/// Takes the exclusive lock file `dir/name` (created owner-only), held until the guard drops.
pub(crate) fn lock_exclusive(dir: &Path, name: &str) -> Result<nix::fcntl::Flock<File>> {
    ensure_dir(dir)?;
    let path = dir.join(name);
    let f = OpenOptions::new()
        .mode(0o600) // owner only (state dir files are private)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("cannot open lock file", &path, e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| StorageError::io("cannot lock", &path, e.into()))
}

pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("cannot create", dir, e))
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("cannot remove", path, e)),
    }
}

/// `reflink` or `copy`: the root disk is a file in the VM dir.
#[derive(Debug, Clone, Copy)]
pub struct FileBackend {
    kind: BackendKind,
}

impl FileBackend {
    /// The FICLONE backend.
    pub fn reflink() -> Self {
        Self {
            kind: BackendKind::Reflink,
        }
    }

    /// The sparse-copy backend.
    pub fn copy() -> Self {
        Self {
            kind: BackendKind::Copy,
        }
    }

    fn parts<'a>(&self, plan: &'a DiskPlan) -> Result<(&'a Path, &'a Path)> {
        match (self.kind, plan) {
            (BackendKind::Reflink, DiskPlan::Reflink { image, file })
            | (BackendKind::Copy, DiskPlan::Copy { image, file }) => Ok((image, file)),
            _ => Err(wrong_backend(self.kind, plan)),
        }
    }
}

pub(crate) fn wrong_backend(kind: BackendKind, plan: &DiskPlan) -> StorageError {
    StorageError::Invalid(format!(
        "disk plan of backend {} given to backend {}",
        plan.kind(),
        kind
    ))
}

impl CowBackend for FileBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn plan(&self, _vm_id: &str, vm_dir: &Path, image: &Path) -> Result<DiskPlan> {
        let image = image_path(image)?;
        let file = vm_dir_path(vm_dir)?.join(ROOT_FILE);
        Ok(match self.kind {
            BackendKind::Reflink => DiskPlan::Reflink { image, file },
            _ => DiskPlan::Copy { image, file },
        })
    }

    fn create(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let (image, file) = self.parts(plan)?;
        if let Some(dir) = file.parent() {
            ensure_dir(dir)?;
        }
        // Both helpers remove `file` again if they fail after creating it.
        match self.kind {
            BackendKind::Reflink => reflink(image, file)?,
            _ => {
                sparse_copy(image, file)?;
            }
        }
        Ok(RootDisk {
            path: file.to_path_buf(),
            loops: Vec::new(),
        })
    }

    fn activate(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let (_, file) = self.parts(plan)?;
        if !file.is_file() {
            return Err(StorageError::Invalid(format!(
                "root disk {} is missing; delete the VM and create it again",
                file.display()
            )));
        }
        Ok(RootDisk {
            path: file.to_path_buf(),
            loops: Vec::new(),
        })
    }

    fn release(&self, plan: &DiskPlan) -> Result<()> {
        let (_, file) = self.parts(plan)?;
        remove_if_exists(file)
    }

    fn sweep(&self, _known: &[DiskPlan]) -> Result<Vec<String>> {
        // Files live in VM dirs, which the daemon removes with their VMs.
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        assert_eq!(sparse_copy(&src, &dst).unwrap(), (64 << 20) + 4);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let (sb, db) = (
            std::fs::metadata(&src).unwrap().blocks(),
            std::fs::metadata(&dst).unwrap().blocks(),
        );
        assert!(db <= sb + 16, "copy allocated {db} blocks, source {sb}");
        assert!(sparse_copy(&src, &dst).is_err(), "refuses to overwrite");
    }

    #[test]
    fn copy_backend_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("rootfs.ext4");
        std::fs::write(&img, b"image").unwrap();
        let b = FileBackend::copy();
        let plan = b.plan("abc", &dir.path().join("vm"), &img).unwrap();
        assert!(matches!(plan, DiskPlan::Copy { .. }));
        let disk = b.create(&plan).unwrap();
        assert_eq!(std::fs::read(&disk.path).unwrap(), b"image");
        assert_eq!(b.activate(&plan).unwrap(), disk);
        assert!(b.create(&plan).is_err(), "create never overwrites");
        b.release(&plan).unwrap();
        b.release(&plan).unwrap();
        assert!(!disk.path.exists());
        assert!(b.activate(&plan).is_err());
        let wrong = FileBackend::reflink().create(&plan).unwrap_err();
        assert!(wrong
            .to_string()
            .contains("backend copy given to backend reflink"));
    }

    #[test]
    fn plan_needs_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let e = FileBackend::copy()
            .plan("abc", dir.path(), &dir.path().join("nope"))
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
