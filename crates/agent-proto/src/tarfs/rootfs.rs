//! [`Layers`]: the unpacker of [`super`] building a root filesystem from image layers (root-built
//! VM images). Only what a root filesystem needs differs from `vm cp` (see [`RootfsOptions`]);
//! the walk is the same: every directory is opened from the destination with `O_NOFOLLOW`, and
//! nothing is ever opened, written, chowned, timed or removed through a symlink.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Uid, XattrFlags};
use rustix::io::Errno;

use super::{
    errno, open_dir, times, Create, Fail, Meta, UnpackError, Unpacked, Unpacker, DIR_FLAGS,
    MAX_LISTED_SKIPS,
};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// How [`Layers`] builds a root filesystem. Whatever these say, a root filesystem keeps
/// setuid/setgid/sticky bits, creates device nodes and fifos, applies `SCHILY.xattr.*` records
/// (a failure is a warning in [`Unpacked::warnings`]), takes the `./` entry's mode and time for
/// the destination, drops a leading `/` from names, lets an entry replace a directory of its
/// name and lets hard links point at any non-directory already in the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RootfsOptions {
    /// OCI whiteouts: `.wh.<name>` deletes `<name>` from the lower layers, `.wh..wh..opq`
    /// empties its directory of lower-layer content.
    pub whiteouts: bool,
    /// Restore owners (needs root); without, everything belongs to the caller.
    pub owners: bool,
}

/// Applies archives (image layers), in order, onto one existing destination directory as a
/// root filesystem; [`Layers::finish`] after the last one.
pub struct Layers {
    u: Unpacker,
}

impl Layers {
    /// Opens `dest` (the caller's choice: it may be reached through a symlink).
    pub fn new(dest: &Path, opts: RootfsOptions) -> Result<Layers, UnpackError> {
        Ok(Layers {
            u: Unpacker::open(dest, Some(opts))?,
        })
    }

    /// Applies one archive. Stops at the first refused entry; what was written before stays.
    pub fn apply<R: Read>(&mut self, archive: R) -> Result<(), UnpackError> {
        self.u.apply(archive)
    }

    /// Sets directory modes and times, deepest first; what all the archives did.
    pub fn finish(mut self) -> Result<Unpacked, UnpackError> {
        self.u
            .finish_dirs()
            .map_err(|f| UnpackError::Dest(f.reason))?;
        Ok(self.u.out)
    }
}

/// An extended attribute: name and value.
pub(super) type Xattr = (CString, Vec<u8>);

fn ids(meta: &Meta) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
}

impl Unpacker {
    /// Restoring owners.
    pub(super) fn owners(&self) -> bool {
        self.rootfs.is_some_and(|o| o.owners)
    }

    /// `rel` is an OCI whiteout to interpret.
    pub(super) fn is_whiteout(&self, rel: &Path) -> bool {
        self.rootfs.is_some_and(|o| o.whiteouts)
            && rel
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(WHITEOUT_PREFIX))
    }

    /// With `rootfs`: the entry's extended attributes.
    pub(super) fn xattrs_of<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Vec<Xattr> {
        if self.rootfs.is_none() {
            return Vec::new();
        }
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Vec::new();
        };
        exts.flatten()
            .filter_map(|ext| {
                let name = ext.key_bytes().strip_prefix(b"SCHILY.xattr.")?;
                Some((CString::new(name).ok()?, ext.value_bytes().to_vec()))
            })
            .collect()
    }

    /// With `rootfs`: the owner (first: chown clears set-id bits and capabilities) and the
    /// extended attributes of `rel`, open as `fd`.
    pub(super) fn restore(
        &mut self,
        fd: &impl AsFd,
        rel: &Path,
        meta: &Meta,
        xattrs: &[Xattr],
    ) -> Result<(), Fail> {
        if self.rootfs.is_none() {
            return Ok(());
        }
        if self.owners() {
            let (uid, gid) = ids(meta);
            rfs::fchown(fd, uid, gid).map_err(|e| errno("setting the owner", e))?;
        }
        for (name, value) in xattrs {
            if let Err(e) = rfs::fsetxattr(fd, name.as_c_str(), value, XattrFlags::empty()) {
                self.warn(format!(
                    "{}: cannot set the extended attribute {}: {}",
                    rel.display(),
                    name.to_string_lossy(),
                    io::Error::from(e)
                ));
            }
        }
        Ok(())
    }

    fn warn(&mut self, what: String) {
        if self.out.warnings.len() < MAX_LISTED_SKIPS {
            self.out.warnings.push(what);
        }
    }

    /// Owner (when restoring owners) and time of `name` in `dir`, never following a symlink.
    pub(super) fn restore_at(&self, dir: &OwnedFd, name: &OsStr, meta: &Meta) -> Result<(), Fail> {
        if self.owners() {
            let (uid, gid) = ids(meta);
            rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno("setting the owner", e))?;
        }
        rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno("setting the mtime", e))
    }

    /// The archive's `./`: a root filesystem's destination takes its owner, mode and time.
    pub(super) fn root_entry(&mut self, kind: tar::EntryType, meta: &Meta) -> Result<(), Fail> {
        if self.rootfs.is_none() || !kind.is_dir() {
            return Ok(());
        }
        if self.owners() {
            let (uid, gid) = ids(meta);
            rfs::fchown(&self.root, uid, gid).map_err(|e| errno("setting the owner", e))?;
        }
        self.dirs.insert(PathBuf::new(), (meta.mode, meta.mtime));
        Ok(())
    }

    /// `.wh.<name>` removes `<name>` (unless this layer wrote it); `.wh..wh..opq` removes what
    /// lower layers left in its directory.
    pub(super) fn whiteout(&mut self, rel: &Path) -> Result<(), Fail> {
        let name = rel.file_name().unwrap_or_default().as_bytes();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let Some(dir) = self.existing_dir(parent_rel)? else {
            return Ok(()); // nothing below a missing directory to hide
        };
        if name == OPAQUE {
            return self.clear_lower(&dir, parent_rel);
        }
        let victim = OsStr::from_bytes(&name[WHITEOUT_PREFIX.len()..]);
        if victim.is_empty() || victim == "." || victim == ".." {
            return Err("a whiteout of an invalid name".into());
        }
        let victim_rel = parent_rel.join(victim);
        if self.this_layer.contains(&victim_rel) {
            return Ok(());
        }
        self.remove_entry(&dir, victim, &victim_rel)
    }

    /// Removes everything under `dir` that the current layer did not write.
    fn clear_lower(&mut self, dir: &OwnedFd, dir_rel: &Path) -> Result<(), Fail> {
        for name in list_dir(dir).map_err(|e| errno("cannot list the directory", e))? {
            let child_rel = dir_rel.join(&name);
            if !self.this_layer.contains(&child_rel) {
                self.remove_entry(dir, &name, &child_rel)?;
            } else if let Ok(sub) = rfs::openat(dir, &name, DIR_FLAGS, Mode::empty()) {
                self.clear_lower(&sub, &child_rel)?;
            }
        }
        Ok(())
    }

    /// Removes `name` in `dir` (`rel` from the destination), a directory with its content;
    /// nothing to do when it is missing.
    pub(super) fn remove_entry(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &Path,
    ) -> Result<(), Fail> {
        match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => {
                self.files.remove(rel);
                Ok(())
            }
            Err(Errno::NOENT) => Ok(()),
            Err(Errno::ISDIR) => {
                // The cached parent may be inside; the removed directories get no metadata.
                self.cache = None;
                self.dirs.retain(|d, _| !d.starts_with(rel));
                self.files.retain(|f| !f.starts_with(rel));
                remove_tree(dir, name).map_err(|e| errno("cannot remove the directory", e))
            }
            Err(e) => Err(errno("cannot remove the existing entry", e)),
        }
    }

    /// The directory `rel`, opened without following symlinks; `None` when it is missing.
    fn existing_dir(&self, rel: &Path) -> Result<Option<OwnedFd>, Fail> {
        let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
        for c in rel.components() {
            cur = match open_dir(&cur, c.as_os_str(), Create::No) {
                Ok(fd) => fd,
                Err(f) if f.os == Some(Errno::NOENT) => return Ok(None),
                Err(f) => return Err(f.about(rel)),
            };
        }
        Ok(Some(cur))
    }

    /// A root filesystem's hard link may point at any non-directory already in the destination.
    pub(super) fn existing_link_target(&self, target: &Path) -> Result<(), Fail> {
        let name = target.file_name().ok_or("an empty name")?;
        let Some(dir) = self.existing_dir(target.parent().unwrap_or(Path::new("")))? else {
            return Err("the target does not exist".into());
        };
        match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Err("the target does not exist".into()),
            Err(e) => Err(errno("cannot inspect the target", e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                Err("the target is a directory".into())
            }
            Ok(_) => Ok(()),
        }
    }

    /// A device node or fifo, with its owner, mode and time.
    pub(super) fn node(&mut self, rel: &Path, h: &tar::Header, meta: &Meta) -> Result<(), Fail> {
        let ft = match h.entry_type() {
            tar::EntryType::Char => FileType::CharacterDevice,
            tar::EntryType::Block => FileType::BlockDevice,
            _ => FileType::Fifo,
        };
        let major = h.device_major().ok().flatten().unwrap_or(0);
        let minor = h.device_minor().ok().flatten().unwrap_or(0);
        let (parent, name) = self.parent(rel)?;
        self.clear(&parent, name, rel)?;
        let dev = rfs::makedev(major, minor);
        rfs::mknodat(&parent, name, ft, Mode::from_raw_mode(0o600), dev)
            .map_err(|e| errno("cannot create the node", e))?;
        self.restore_at(&parent, name, meta)?;
        chmod_node(&parent, name, ft, meta.mode)
    }
}

/// Sets the mode of the node `name` in `dir` just made: through an `O_PATH | O_NOFOLLOW`
/// descriptor checked to be that node (`fchmodat` cannot refuse to follow a symlink).
fn chmod_node(dir: &OwnedFd, name: &OsStr, ft: FileType, mode: u32) -> Result<(), Fail> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(dir, name, flags, Mode::empty())
        .map_err(|e| errno("cannot open the node", e))?;
    let st = rfs::fstat(&fd).map_err(|e| errno("cannot inspect the node", e))?;
    if FileType::from_raw_mode(st.st_mode) != ft {
        return Err("the node was replaced while it was made".into());
    }
    rfs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| errno("setting the mode", e))
}

/// The names in a directory (without `.` and `..`).
fn list_dir(dir: &impl AsFd) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for e in rfs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_owned());
        }
    }
    Ok(names)
}

/// Removes the directory `name` in `dir` and everything in it, walking with `O_NOFOLLOW`
/// descriptors (a symlink inside is removed, never followed).
fn remove_tree(dir: &impl AsFd, name: &OsStr) -> Result<(), Errno> {
    let sub = rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
    for child in list_dir(&sub)? {
        match rfs::unlinkat(&sub, &child, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => remove_tree(&sub, &child)?,
            Err(e) => return Err(e),
        }
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Copies file data, turning runs of whole zero blocks into holes.
pub(super) fn copy_sparse(r: &mut dyn Read, f: &mut File) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 1 << 16];
    let mut len: u64 = 0;
    loop {
        let n = read_full(r, &mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if n == buf.len() && chunk.iter().all(|&b| b == 0) {
            f.seek(SeekFrom::Current(n as i64))?;
        } else {
            f.write_all(chunk)?;
        }
        len += n as u64;
    }
    f.set_len(len)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::EntryType as T;

    /// One entry: name, type, data or link target, mode, uid.
    type E<'a> = (&'a str, T, &'a str, u32, u64);

    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, mode, uid) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_mtime(7);
            if kind.is_symlink() || kind.is_hard_link() {
                h.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
                h.set_size(0);
                h.set_cksum();
                b.append(&h, &b""[..]).unwrap();
            } else {
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn root() -> bool {
        fs::metadata("/proc/self").unwrap().uid() == 0
    }

    fn apply(dest: &Path, layers: &[Vec<u8>]) -> Result<Unpacked, UnpackError> {
        let opts = RootfsOptions {
            whiteouts: true,
            owners: root(),
        };
        let mut l = Layers::new(dest, opts)?;
        for a in layers {
            l.apply(&a[..])?;
        }
        l.finish()
    }

    /// A destination and a directory beside it that nothing may touch.
    fn world() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (dest, outside) = (d.path().join("dest"), d.path().join("outside"));
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"keep").unwrap();
        (d, dest, outside)
    }

    fn untouched(outside: &Path) {
        let names: Vec<_> = fs::read_dir(outside).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
    }

    #[test]
    fn a_root_filesystem_keeps_what_a_copy_drops() {
        let (_d, dest, _) = world();
        let l = layer(&[
            ("./", T::Directory, "", 0o755, 0),
            ("/tmp/", T::Directory, "", 0o1777, 0),
            ("usr/bin/su", T::Regular, "su", 0o4755, 0),
            ("home/u/", T::Directory, "", 0o750, 1000),
            ("home/u/f", T::Regular, "f", 0o640, 1000),
            ("home/u/l", T::Symlink, "f", 0o777, 1000),
            ("home/u/fifo", T::Fifo, "", 0o620, 1000),
        ]);
        let done = apply(&dest, &[l]).unwrap();
        assert_eq!(done.entries, 7);
        let m = |p: &str| dest.join(p).symlink_metadata().unwrap();
        assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(m("usr/bin/su").mode() & 0o7777, 0o4755);
        assert_eq!(m("usr").mode() & 0o7777, 0o755, "implicit parents are 0755");
        assert_eq!(m("home/u").mode() & 0o7777, 0o750);
        assert!(m("home/u/fifo").file_type().is_fifo());
        assert_eq!(m("home/u/fifo").mode() & 0o7777, 0o620);
        assert_eq!((m("home/u/l").mtime(), m("home/u/f").mtime()), (7, 7));
        assert_eq!(m("").mtime(), 7);
        if root() {
            for p in ["home/u", "home/u/f", "home/u/l", "home/u/fifo"] {
                assert_eq!((m(p).uid(), m(p).gid()), (1000, 1000), "{p}");
            }
            assert_eq!(m("usr/bin/su").uid(), 0);
        }
    }

    #[test]
    fn layers_replace_whiteout_and_link_to_lower_files() {
        let (_d, dest, _) = world();
        let lower = layer(&[
            ("etc/passwd", T::Regular, "lower", 0o644, 0),
            ("etc/gone", T::Regular, "gone", 0o644, 0),
            ("var/cache/", T::Directory, "", 0o755, 0),
            ("var/cache/a/b", T::Regular, "b", 0o644, 0),
            ("opt/x/", T::Directory, "", 0o755, 0),
            ("opt/x/old", T::Regular, "old", 0o644, 0),
            ("data", T::Regular, "file", 0o644, 0),
        ]);
        let upper = layer(&[
            ("etc/.wh.gone", T::Regular, "", 0o644, 0),
            ("etc/hard", T::Link, "etc/passwd", 0o644, 0),
            ("var/cache", T::Regular, "now a file", 0o600, 0),
            ("opt/x/new", T::Regular, "new", 0o644, 0),
            ("opt/x/.wh..wh..opq", T::Regular, "", 0o644, 0),
            ("data/", T::Directory, "", 0o700, 0),
            ("nothing/.wh.here", T::Regular, "", 0o644, 0),
        ]);
        apply(&dest, &[lower, upper]).unwrap();
        let r = |p: &str| fs::read_to_string(dest.join(p)).unwrap();
        assert!(!dest.join("etc/gone").exists());
        assert_eq!(r("etc/hard"), "lower");
        let ino = |p: &str| dest.join(p).metadata().unwrap().ino();
        assert_eq!(ino("etc/hard"), ino("etc/passwd"));
        assert_eq!(r("var/cache"), "now a file");
        assert_eq!(r("opt/x/new"), "new");
        assert!(!dest.join("opt/x/old").exists() && !dest.join("opt/x/.wh..wh..opq").exists());
        assert!(dest.join("data").symlink_metadata().unwrap().is_dir());
        assert!(!dest.join("nothing").exists(), "a whiteout creates nothing");
    }

    #[test]
    fn nothing_goes_through_a_symlink_whatever_the_layer() {
        let (_d, dest, outside) = world();
        let out = outside.to_str().unwrap();
        let lower = layer(&[
            ("link", T::Symlink, out, 0o777, 0),
            ("dir/", T::Directory, "", 0o755, 0),
            ("dir/inner", T::Symlink, out, 0o777, 0),
        ]);
        apply(&dest, &[lower]).unwrap();
        let refused = [
            ("link/planted", T::Regular, "x", 0o644, 0),
            ("link/.wh.keep", T::Regular, "", 0o644, 0),
            ("link/.wh..wh..opq", T::Regular, "", 0o644, 0),
            ("link/sub/", T::Directory, "", 0o755, 0),
            ("h", T::Link, "link/keep", 0o644, 0),
            ("../escape", T::Regular, "x", 0o644, 0),
        ];
        let before = fs::metadata(&outside).unwrap();
        for (i, e) in refused.iter().enumerate() {
            let err = apply(&dest, &[layer(&[*e])]).unwrap_err();
            assert!(
                matches!(&err, UnpackError::Entry { os: None, .. }),
                "case {i}: {err}"
            );
            untouched(&outside);
        }
        // Replacing entries remove links and directories holding links, never what they point at.
        let upper = layer(&[
            ("link", T::Regular, "a file now", 0o644, 0),
            ("dir", T::Regular, "a file now", 0o644, 0),
        ]);
        apply(&dest, &[upper]).unwrap();
        untouched(&outside);
        assert_eq!(fs::read(dest.join("dir")).unwrap(), b"a file now");
        let again = layer(&[
            ("l2", T::Symlink, out, 0o777, 0),
            ("l2", T::Fifo, "", 0o600, 0),
            ("l3", T::Symlink, out, 0o777, 0),
            ("l3/", T::Directory, "", 0o755, 0),
        ]);
        apply(&dest, &[again]).unwrap();
        untouched(&outside);
        assert!(dest
            .join("l2")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(dest.join("l3").symlink_metadata().unwrap().is_dir());
        let after = fs::metadata(&outside).unwrap();
        assert_eq!(
            (after.mode(), after.uid(), after.mtime()),
            (before.mode(), before.uid(), before.mtime())
        );
    }

    #[test]
    fn a_copy_is_unchanged_by_rootfs_support() {
        let (_d, dest, _) = world();
        let ar = layer(&[
            ("x/", T::Directory, "", 0o1777, 0),
            ("x/su", T::Regular, "su", 0o4755, 0),
            ("x/.wh.su", T::Regular, "", 0o644, 0),
            ("x/fifo", T::Fifo, "", 0o644, 0),
        ]);
        let done = super::super::unpack(&ar[..], &dest, &Default::default()).unwrap();
        assert_eq!(done.skipped, ["x/fifo (fifo)"]);
        let m = |p: &str| dest.join(p).symlink_metadata().unwrap();
        assert_eq!(m("x").mode() & 0o7777, 0o777);
        assert_eq!(m("x/su").mode() & 0o7777, 0o755);
        assert!(dest.join("x/.wh.su").exists() && dest.join("x/su").exists());
        let abs = layer(&[("/etc/x", T::Regular, "x", 0o644, 0)]);
        let e = super::super::unpack(&abs[..], &dest, &Default::default()).unwrap_err();
        assert!(e.contains("is absolute"), "{e}");
    }
}
