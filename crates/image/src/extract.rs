//! Safe application of tar layers onto a root directory.
//!
//! Every entry path is made relative to the root; `..` components are refused, and so is any
//! entry whose path goes through a symbolic link (`link -> /etc` then `link/passwd`), including
//! hard-link targets. Nothing is ever opened through a symlink: existing files are unlinked and
//! recreated with `O_EXCL | O_NOFOLLOW`. Ownership, modes, times, xattrs, devices, FIFOs, hard links
//! and symlinks are kept. With whiteouts on (OCI layers), `.wh.<name>` deletes `<name>` from the
//! lower layers and `.wh..wh..opq` empties its directory of lower-layer content.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{ImageError, IoContext, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Opens a possibly compressed tar stream: gzip and zstd are recognised by their magic bytes.
pub(crate) fn open_tar(path: &Path) -> Result<Box<dyn Read>> {
    let f = File::open(path).ctx("open", path)?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let magic = r.fill_buf().ctx("read", path)?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).ctx("start zstd decoding of", path)?)
    } else {
        Box::new(r)
    })
}

/// Applies tar streams, in order, onto one root directory.
pub(crate) struct Applier {
    root: PathBuf,
    whiteouts: bool,
    owners: bool,
    /// Directories to fix up at the end (mode and mtime are set after their content is written).
    dirs: Vec<(PathBuf, u32, i64)>,
    /// Paths written by the current layer (opaque whiteouts only hide lower layers).
    this_layer: HashSet<PathBuf>,
    pub entries: u64,
}

impl Applier {
    /// `whiteouts`: interpret OCI whiteout files. `owners`: chown entries (needs root).
    pub(crate) fn new(root: &Path, whiteouts: bool, owners: bool) -> Applier {
        Applier {
            root: root.to_path_buf(),
            whiteouts,
            owners,
            dirs: Vec::new(),
            this_layer: HashSet::new(),
            entries: 0,
        }
    }

    /// Applies one tar stream. `what` names it in errors.
    pub(crate) fn apply(&mut self, reader: impl Read, what: &str) -> Result<()> {
        self.this_layer.clear();
        let mut ar = tar::Archive::new(reader);
        let entries = ar
            .entries()
            .map_err(|e| ImageError::io(format!("read the tar stream of {what}"), e))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| ImageError::io(format!("read an entry of {what}"), e))?;
            self.entry(&mut entry)
                .map_err(|e| annotate(e, what, &entry))?;
            self.entries += 1;
        }
        Ok(())
    }

    /// Sets directory modes and times, deepest first. Call once after the last layer.
    pub(crate) fn finish(mut self) -> Result<u64> {
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
        for (path, mode, mtime) in &self.dirs {
            let meta = match fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => m,
                _ => continue, // replaced or deleted by a later layer
            };
            if meta.mode() & 0o7777 != *mode {
                fs::set_permissions(path, fs::Permissions::from_mode(*mode)).ctx("chmod", path)?;
            }
            set_mtime(path, *mtime)?;
        }
        Ok(self.entries)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<()> {
        let raw = entry
            .path()
            .map_err(|e| ImageError::io("decode an entry path", e))?
            .into_owned();
        let rel = relative(&raw)?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            // The archive's "./": the root directory itself.
            if kind.is_dir() {
                let (mode, uid, gid, mtime) = meta_of(entry.header())?;
                self.chown(&self.root.clone(), uid, gid)?;
                self.dirs.push((self.root.clone(), mode, mtime));
            }
            return Ok(());
        }
        let file_name = rel.file_name().unwrap_or_default().to_string_lossy();
        if self.whiteouts && file_name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&rel, &file_name);
        }
        let path = self.prepare_parent(&rel)?;
        self.this_layer.insert(rel.clone());
        let header = entry.header();
        let (mode, uid, gid, mtime) = meta_of(header)?;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path)?;
                        fs::create_dir(&path).ctx("create directory", &path)?;
                    }
                    Err(_) => fs::create_dir(&path).ctx("create directory", &path)?,
                }
                self.chown(&path, uid, gid)?;
                self.xattrs(entry, &path)?;
                self.dirs.push((path, mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_if_exists(&path)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .ctx("create", &path)?;
                copy_sparse(entry, &mut f).ctx("write", &path)?;
                if self.owners {
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).ctx("chown", &path)?;
                }
                // After chown, which clears set-id bits.
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .ctx("chmod", &path)?;
                drop(f);
                self.xattrs(entry, &path)?;
                set_mtime(&path, mtime)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| ImageError::io("decode a symlink target", e))?
                    .ok_or_else(|| unsafe_entry(&rel, "symlink without a target"))?;
                remove_if_exists(&path)?;
                std::os::unix::fs::symlink(&target, &path).ctx("create symlink", &path)?;
                self.chown(&path, uid, gid)?;
                set_mtime(&path, mtime)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| ImageError::io("decode a hard link target", e))?
                    .ok_or_else(|| unsafe_entry(&rel, "hard link without a target"))?;
                let target_rel = relative(&target)?;
                let target_path = self.check_parents(&target_rel)?;
                let tmeta = fs::symlink_metadata(&target_path).map_err(|_| {
                    unsafe_entry(
                        &rel,
                        &format!("hard link to {target_rel:?}, which does not exist"),
                    )
                })?;
                if tmeta.is_dir() {
                    return Err(unsafe_entry(&rel, "hard link to a directory"));
                }
                if target_path != path {
                    remove_if_exists(&path)?;
                    // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
                    fs::hard_link(&target_path, &path).ctx("create hard link", &path)?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let sflag = match kind {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                remove_if_exists(&path)?;
                nix::sys::stat::mknod(
                    &path,
                    sflag,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    nix::sys::stat::makedev(major as u64, minor as u64),
                )
                .map_err(|e| ImageError::io(format!("mknod {}", path.display()), e.into()))?;
                self.chown(&path, uid, gid)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx("chmod", &path)?;
                set_mtime(&path, mtime)?;
            }
            // pax/GNU metadata records are folded into entries by the tar crate; anything else
            // (sockets never appear in tars) is skipped.
            other => {
                self.this_layer.remove(&rel);
                tracing::debug!(?rel, ?other, "skipping tar entry of unsupported type");
            }
        }
        Ok(())
    }

    /// `.wh.<name>` removes `<name>`; `.wh..wh..opq` hides lower content of its directory.
    fn whiteout(&mut self, rel: &Path, file_name: &str) -> Result<()> {
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let parent = self.check_parents(rel)?;
        let parent = parent.parent().unwrap_or(&self.root).to_path_buf();
        if file_name == OPAQUE {
            match fs::symlink_metadata(&parent) {
                Ok(m) if m.is_dir() => self.clear_lower(&parent, &parent_rel),
                _ => Ok(()),
            }
        } else {
            let name = &file_name[WHITEOUT_PREFIX.len()..];
            if name.is_empty() || name == "." || name == ".." {
                return Err(unsafe_entry(rel, "whiteout of an invalid name"));
            }
            let victim_rel = parent_rel.join(name);
            if self.this_layer.contains(&victim_rel) {
                return Ok(());
            }
            let victim = parent.join(name);
            if fs::symlink_metadata(&victim).is_ok() {
                remove_any(&victim)?;
            }
            Ok(())
        }
    }

    /// Removes everything under `dir` that the current layer did not write.
    fn clear_lower(&self, dir: &Path, dir_rel: &Path) -> Result<()> {
        for child in fs::read_dir(dir).ctx("read directory", dir)? {
            let child = child.ctx("read directory", dir)?;
            let child_rel = dir_rel.join(child.file_name());
            let path = child.path();
            if self.this_layer.contains(&child_rel) {
                if child.file_type().ctx("stat", &path)?.is_dir() {
                    self.clear_lower(&path, &child_rel)?;
                }
            } else {
                remove_any(&path)?;
            }
        }
        Ok(())
    }

    fn prepare_parent(&self, rel: &Path) -> Result<PathBuf> {
        safe_path(&self.root, rel, true)
    }

    fn check_parents(&self, rel: &Path) -> Result<PathBuf> {
        safe_path(&self.root, rel, false)
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        if self.owners {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).ctx("chown", path)?;
        }
        Ok(())
    }

    /// Extended attributes from pax `SCHILY.xattr.*` records (e.g. file capabilities).
    fn xattrs<R: Read>(&self, entry: &mut tar::Entry<R>, path: &Path) -> Result<()> {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Ok(());
        };
        for ext in exts.flatten() {
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            let (Ok(cname), Ok(cpath)) = (
                CString::new(name),
                CString::new(path.as_os_str().as_bytes()),
            ) else {
                continue;
            };
            let value = ext.value_bytes();
            // SAFETY: both strings are NUL-terminated and live across the call.
            let rc = unsafe {
                libc::lsetxattr(
                    cpath.as_ptr(),
                    cname.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                tracing::warn!(
                    path = %path.display(),
                    name = %String::from_utf8_lossy(name),
                    error = %io::Error::last_os_error(),
                    "could not set an extended attribute"
                );
            }
        }
        Ok(())
    }
}

/// Returns `root/rel` after checking that no ancestor of `rel` inside `root` is a symbolic link
/// or a non-directory. With `create`, missing ancestors are created (0755); without, they are
/// only checked where they exist.
pub(crate) fn safe_path(root: &Path, rel: &Path, create: bool) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => return Err(through_symlink(rel, &cur, root)),
            Ok(_) => {
                return Err(unsafe_entry(
                    rel,
                    &format!(
                        "its parent {:?} is not a directory",
                        cur.strip_prefix(root).unwrap_or(&cur)
                    ),
                ));
            }
            Err(_) if create => {
                fs::create_dir(&cur).ctx("create directory", &cur)?;
                // 0755 in the guest whatever the builder's umask (wickd runs with 077).
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).ctx("chmod", &cur)?;
            }
            Err(_) => {}
        }
    }
    Ok(root.join(rel))
}

/// The path of an archive entry relative to the root: leading `/` and `.` are dropped, `..`
/// is refused.
pub(crate) fn relative(raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(unsafe_entry(raw, "the path contains '..' (path traversal)"));
            }
            Component::Prefix(_) => return Err(unsafe_entry(raw, "unexpected path prefix")),
        }
    }
    Ok(out)
}

fn meta_of(h: &tar::Header) -> Result<(u32, u32, u32, i64)> {
    let bad = |e: io::Error| ImageError::io("decode a tar header", e);
    Ok((
        h.mode().map_err(bad)? & 0o7777,
        h.uid().map_err(bad)? as u32,
        h.gid().map_err(bad)? as u32,
        h.mtime().map_err(bad)? as i64,
    ))
}

/// Copies file data, turning runs of whole zero blocks into holes.
fn copy_sparse(r: &mut impl Read, f: &mut File) -> io::Result<()> {
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

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
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

fn set_mtime(path: &Path, mtime: i64) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(mtime, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| ImageError::io(format!("set times of {}", path.display()), e.into()))
}

fn remove_any(path: &Path) -> Result<()> {
    let m = fs::symlink_metadata(path).ctx("stat", path)?;
    if m.is_dir() {
        fs::remove_dir_all(path).ctx("remove", path)
    } else {
        fs::remove_file(path).ctx("remove", path)
    }
}

/// Removes a non-directory (or a whole directory a file now replaces) if present.
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => remove_any(path),
        Err(_) => Ok(()),
    }
}

fn unsafe_entry(path: &Path, reason: &str) -> ImageError {
    ImageError::UnsafeEntry {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn through_symlink(rel: &Path, link: &Path, root: &Path) -> ImageError {
    let link_rel = link.strip_prefix(root).unwrap_or(link);
    unsafe_entry(
        rel,
        &format!(
            "the path goes through the symbolic link {:?} (possible symlink escape)",
            link_rel
        ),
    )
}

fn annotate<R: Read>(e: ImageError, what: &str, entry: &tar::Entry<R>) -> ImageError {
    match e {
        ImageError::UnsafeEntry { path, reason } => ImageError::UnsafeEntry {
            path,
            reason: format!("{reason} (in {what}); the image is refused"),
        },
        ImageError::Io { context, source } => {
            let p = entry
                .path_bytes()
                .iter()
                .map(|&b| b as char)
                .collect::<String>();
            ImageError::Io {
                context: format!("{context} (entry {p:?} of {what})"),
                source,
            }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            // Write the name bytes raw so tests can express hostile paths.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<()> {
        let mut a = Applier::new(root, true, is_root());
        for (i, l) in layers.iter().enumerate() {
            a.apply(&l[..], &format!("layer {i}"))?;
        }
        a.finish().map(|_| ())
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    use tar::EntryType as T;

    #[test]
    fn relative_drops_root_and_refuses_dotdot() {
        assert_eq!(relative(Path::new("/etc/x")).unwrap(), Path::new("etc/x"));
        assert_eq!(relative(Path::new("./a/./b")).unwrap(), Path::new("a/b"));
        assert!(relative(Path::new("a/../../b")).is_err());
        assert!(relative(Path::new("../x")).is_err());
    }

    #[test]
    fn files_dirs_links_and_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let l1 = tar_of(&[
            ("etc/", T::Directory, b"", None),
            ("etc/keep", T::Regular, b"keep", None),
            ("etc/gone", T::Regular, b"gone", None),
            ("opq/", T::Directory, b"", None),
            ("opq/old", T::Regular, b"old", None),
            ("etc/hard", T::Link, b"", Some("etc/keep")),
            ("etc/sym", T::Symlink, b"", Some("/etc/keep")),
        ]);
        let l2 = tar_of(&[
            ("etc/.wh.gone", T::Regular, b"", None),
            ("opq/new", T::Regular, b"new", None),
            ("opq/.wh..wh..opq", T::Regular, b"", None),
        ]);
        apply(d.path(), &[l1, l2]).unwrap();
        let r = d.path();
        assert_eq!(fs::read(r.join("etc/keep")).unwrap(), b"keep");
        assert!(!r.join("etc/gone").exists());
        assert!(!r.join("etc/.wh.gone").exists());
        assert_eq!(fs::read(r.join("opq/new")).unwrap(), b"new");
        assert!(!r.join("opq/old").exists());
        assert!(!r.join("opq/.wh..wh..opq").exists());
        assert_eq!(
            fs::read_link(r.join("etc/sym")).unwrap(),
            Path::new("/etc/keep")
        );
        let a = fs::metadata(r.join("etc/keep")).unwrap();
        let b = fs::metadata(r.join("etc/hard")).unwrap();
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn traversal_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        let l = tar_of(&[("../evil", T::Regular, b"x", None)]);
        let e = apply(&root, &[l]).unwrap_err();
        assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
        assert!(!d.path().join("evil").exists());
    }

    #[test]
    fn symlink_escape_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        let target = outside.to_str().unwrap().to_string();
        let l = tar_of(&[
            ("link", T::Symlink, b"", Some(&target)),
            ("link/passwd", T::Regular, b"owned", None),
        ]);
        let e = apply(&root, &[l]).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!outside.join("passwd").exists());
        // A hard link through a symlink is refused too.
        let root2 = d.path().join("root2");
        fs::create_dir(&root2).unwrap();
        let l = tar_of(&[
            ("link", T::Symlink, b"", Some(&target)),
            ("h", T::Link, b"", Some("link/secret")),
        ]);
        assert!(apply(&root2, &[l]).is_err());
    }
}
