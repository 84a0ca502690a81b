//! Tar helpers shared by both ends of a file transfer (the agent's put/get, `wick vm cp`):
//! building an archive of a tree without following symlinks, and [`unpack`], the one unpacker
//! both directions use (the archive is attacker input either way: a hostile guest's for
//! `vm cp VM:SRC DST`, the host's for uploads). [`Layers`] is the same unpacker building a root
//! filesystem from image layers (owners, special bits, devices, xattrs, OCI whiteouts).
//!
//! # How `unpack` stays inside its destination
//!
//! - Entry names are relative without `..` ([`safe_relative`]); absolute names are refused.
//! - Every directory is opened from the destination's descriptor one component at a time with
//!   `O_NOFOLLOW | O_DIRECTORY` (`openat`), so no symlink is ever followed, whoever made it: an
//!   entry below a symlink is refused. Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`
//!   after removing whatever non-directory had that name (a symlink is replaced, never written
//!   through); modes and times are set on the open descriptor (`fchmod`, `futimens`).
//! - Directory modes and times are applied at the end (deepest first, so read-only directories
//!   do not block their contents), again by walking from the destination without following.
//! - Setuid, setgid and sticky bits are dropped (the unpacker owns what it writes: root on the
//!   host for `vm cp`); ownership is not restored.
//! - Hard links may only point at regular files this archive already unpacked.
//! - Device nodes and fifos are skipped and listed in [`Unpacked::skipped`]; other special
//!   entry types are refused.
//!
//! [`Layers`] walks the same way and differs only where a root filesystem needs it (see
//! [`RootfsOptions`]): leading `/` is dropped from names, special bits are kept, owners restored
//! (on request), device nodes and fifos created, `SCHILY.xattr.*` records applied, the archive's
//! `./` entry sets the destination's own metadata, an entry replaces a directory of its name
//! (removed without following symlinks), and hard links may point at any non-directory already
//! in the destination (a lower layer's).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

mod rootfs;

use rootfs::Xattr;
pub use rootfs::{Layers, RootfsOptions};

/// Appends `path` (file, symlink or directory, recursively, children sorted) to `b` as `name`.
/// Sockets are skipped; symlinks are stored as links, never followed.
pub fn append_tree<W: Write>(b: &mut tar::Builder<W>, path: &Path, name: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let ft = path.symlink_metadata()?.file_type();
    if ft.is_socket() {
        return Ok(());
    }
    if ft.is_dir() {
        b.append_dir(name, path)?;
        let mut children: Vec<_> = fs::read_dir(path)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for c in children {
            append_tree(b, &c.path(), &name.join(c.file_name()))?;
        }
        return Ok(());
    }
    b.append_path_with_name(path, name)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// An archive path checked to be relative without `..`, normalized (no `.` components).
pub fn safe_relative(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..' (path traversal)".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute".into()),
        }
    }
    Ok(out)
}

/// How [`unpack`] names what it writes.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Require exactly one top-level entry and write it under this name (`wick vm cp`, which
    /// names the copy after DST).
    pub rename_top: Option<String>,
}

/// What [`unpack`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Archive entries applied (or skipped).
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// The first [`MAX_LISTED_SKIPS`] entries skipped (device nodes, fifos), as `name (kind)`.
    pub skipped: Vec<String>,
    /// How many entries were skipped in all (an archive may hold any number).
    pub skipped_total: u64,
    /// The first [`MAX_LISTED_SKIPS`] extended attributes [`Layers`] could not set.
    pub warnings: Vec<String>,
}

/// How many skipped entries [`Unpacked::skipped`] names.
pub const MAX_LISTED_SKIPS: usize = 20;

impl Unpacked {
    /// The skipped entries for a message: the names kept, and how many more there were.
    pub fn skipped_summary(&self) -> String {
        let more = self.skipped_total - self.skipped.len() as u64;
        let mut s = self.skipped.join(", ");
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        s
    }

    fn skip(&mut self, what: String) {
        self.skipped_total += 1;
        if self.skipped.len() < MAX_LISTED_SKIPS {
            self.skipped.push(what);
        }
    }
}

/// Why an archive could not be (fully) unpacked.
#[derive(Debug)]
pub enum UnpackError {
    /// The archive itself could not be read (truncated, corrupt, the reader failed).
    Read(io::Error),
    /// An entry was refused, or writing it failed.
    Entry {
        /// The entry's name as the archive gives it.
        path: PathBuf,
        /// Why.
        reason: String,
        /// The OS error when a system call failed (disk full, ...); `None` for a refusal.
        os: Option<io::Error>,
    },
    /// The destination could not be opened or finished.
    Dest(String),
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpackError::Read(e) => write!(f, "reading the archive: {e}"),
            UnpackError::Entry { path, reason, .. } => {
                write!(f, "refusing entry {}: {reason}", path.display())
            }
            UnpackError::Dest(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for UnpackError {}

/// Unpacks `archive` into the existing directory `dest` without ever following a symlink below
/// it (see the module doc). Stops at the first refused entry with an error naming it; what was
/// written before stays.
pub fn unpack<R: Read>(archive: R, dest: &Path, opts: &UnpackOptions) -> Result<Unpacked, String> {
    let fail = |what: String| format!("unpacking into {}: {what}", dest.display());
    if let Some(name) = &opts.rename_top {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(fail(format!("invalid destination name {name:?}")));
        }
    }
    let mut u = Unpacker::open(dest, None).map_err(|e| fail(e.to_string()))?;
    u.rename = opts.rename_top.clone();
    u.apply(archive).map_err(|e| fail(e.to_string()))?;
    if u.rename.is_some() && u.top.is_none() {
        return Err(fail("the archive is empty".into()));
    }
    u.finish_dirs().map_err(|e| fail(e.reason))?;
    Ok(u.out)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

struct Unpacker {
    root: OwnedFd,
    rename: Option<String>,
    /// The archive's top-level name (with `rename`).
    top: Option<OsString>,
    /// Directories seen, with their mode and mtime, applied at the end.
    dirs: BTreeMap<PathBuf, (u32, u64)>,
    /// Regular files unpacked so far: the only valid hard link targets (without `rootfs`).
    files: HashSet<PathBuf>,
    /// The last parent directory opened (forgotten whenever a directory is removed).
    cache: Option<(PathBuf, OwnedFd)>,
    /// Building a root filesystem ([`Layers`]) rather than copying files.
    rootfs: Option<RootfsOptions>,
    /// With `rootfs`: what the current archive wrote (whiteouts only hide lower layers).
    this_layer: HashSet<PathBuf>,
    out: Unpacked,
}

/// Why an entry failed: a refusal, or a system call's error.
struct Fail {
    reason: String,
    os: Option<Errno>,
}

impl From<String> for Fail {
    fn from(reason: String) -> Self {
        Fail { reason, os: None }
    }
}

impl From<&str> for Fail {
    fn from(reason: &str) -> Self {
        Fail::from(reason.to_string())
    }
}

impl Fail {
    /// The same failure, said of `path`.
    fn about(self, path: &Path) -> Fail {
        Fail {
            reason: format!("{}: {}", path.display(), self.reason),
            os: self.os,
        }
    }
}

fn errno(what: &str, e: Errno) -> Fail {
    Fail {
        reason: format!("{what}: {}", io::Error::from(e)),
        os: Some(e),
    }
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// What an entry's header says about the file's metadata.
struct Meta {
    mode: u32,
    mtime: u64,
    uid: u32,
    gid: u32,
}

impl Unpacker {
    /// Opens `dest` (the caller's choice: it may be reached through a symlink).
    fn open(dest: &Path, rootfs: Option<RootfsOptions>) -> Result<Unpacker, UnpackError> {
        let root = rfs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            UnpackError::Dest(format!(
                "cannot open the destination: {}",
                io::Error::from(e)
            ))
        })?;
        Ok(Unpacker {
            root,
            rename: None,
            top: None,
            dirs: BTreeMap::new(),
            files: HashSet::new(),
            cache: None,
            rootfs,
            this_layer: HashSet::new(),
            out: Unpacked::default(),
        })
    }

    /// Applies every entry of one archive.
    fn apply<R: Read>(&mut self, archive: R) -> Result<(), UnpackError> {
        self.this_layer.clear();
        let mut ar = tar::Archive::new(archive);
        for entry in ar.entries().map_err(UnpackError::Read)? {
            let entry = entry.map_err(UnpackError::Read)?;
            let raw = entry
                .path()
                .map_err(|e| UnpackError::Dest(format!("bad entry name: {e}")))?
                .into_owned();
            self.entry(entry, &raw).map_err(|f| UnpackError::Entry {
                path: raw.clone(),
                reason: f.reason,
                os: f.os.map(io::Error::from),
            })?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, raw: &Path) -> Result<(), Fail> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if kind == T::XGlobalHeader {
            return Ok(()); // metadata for the whole archive: nothing to write
        }
        let rel = self
            .relative(raw)
            .map_err(|why| format!("its path {why}"))?;
        self.out.entries += 1;
        if self.is_whiteout(&rel) {
            return self.whiteout(&rel);
        }
        let meta = self.meta(entry.header())?;
        let Some(rel) = self.renamed(&rel)? else {
            // `./`: the destination itself is left alone, unless building a root filesystem.
            return self.root_entry(kind, &meta);
        };
        if self.rootfs.is_some() {
            self.this_layer.insert(rel.clone());
        }
        match kind {
            T::Directory => {
                let xattrs = self.xattrs_of(&mut entry);
                self.dir(&rel, &meta, &xattrs)
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.out.bytes += entry.size();
                let xattrs = self.xattrs_of(&mut entry);
                self.file(&rel, &mut entry, &meta, &xattrs)
            }
            T::Symlink => {
                let target = link_name(&entry, "a symlink without a target")?;
                self.symlink(&rel, &target, &meta)
            }
            T::Link => {
                let target = link_name(&entry, "a hard link without a target")?;
                self.hard_link(&rel, &target)
            }
            T::Char | T::Block | T::Fifo if self.rootfs.is_some() => {
                self.node(&rel, entry.header(), &meta)
            }
            T::Char | T::Block | T::Fifo => {
                let what = match kind {
                    T::Char => "character device",
                    T::Block => "block device",
                    _ => "fifo",
                };
                self.out.skip(format!("{} ({what})", rel.display()));
                Ok(())
            }
            other if self.rootfs.is_some() => {
                self.this_layer.remove(&rel);
                self.out.skip(format!("{} ({other:?})", rel.display()));
                Ok(())
            }
            other => Err(format!("unsupported entry type {other:?}").into()),
        }
    }

    /// The entry's path relative to the destination; a root filesystem's layers may name
    /// entries from `/`.
    fn relative(&self, raw: &Path) -> Result<PathBuf, String> {
        let raw = match self.rootfs {
            Some(_) => raw.strip_prefix("/").unwrap_or(raw),
            None => raw,
        };
        safe_relative(raw)
    }

    fn meta(&self, h: &tar::Header) -> Result<Meta, Fail> {
        let bits = if self.rootfs.is_some() { 0o7777 } else { 0o777 };
        let id = |v: io::Result<u64>| -> Result<u32, Fail> {
            match v.map(u32::try_from) {
                Ok(Ok(id)) if id != u32::MAX => Ok(id),
                _ if !self.owners() => Ok(0),
                _ => Err("an invalid owner or group id".into()),
            }
        };
        Ok(Meta {
            mode: h.mode().unwrap_or(0o644) & bits,
            mtime: h.mtime().unwrap_or(0),
            uid: id(h.uid())?,
            gid: id(h.gid())?,
        })
    }

    /// `rel` with its first component renamed (and checked to be the only top-level name);
    /// `None` for the archive's root itself.
    fn renamed(&mut self, rel: &Path) -> Result<Option<PathBuf>, String> {
        let mut it = rel.components();
        let Some(first) = it.next() else {
            return Ok(None);
        };
        let Some(name) = &self.rename else {
            return Ok(Some(rel.to_path_buf()));
        };
        match &self.top {
            None => self.top = Some(first.as_os_str().to_owned()),
            Some(t) if t != first.as_os_str() => {
                return Err("the archive has more than one top-level entry".into())
            }
            Some(_) => {}
        }
        let rest = it.as_path();
        if rest.as_os_str().is_empty() {
            Ok(Some(PathBuf::from(name))) // `join("")` would add a trailing slash
        } else {
            Ok(Some(Path::new(name).join(rest)))
        }
    }

    /// Opens the directory holding `rel` (creating missing ones, mode 0755) without following
    /// symlinks, and returns it with `rel`'s last component.
    fn parent<'a>(&mut self, rel: &'a Path) -> Result<(OwnedFd, &'a OsStr), Fail> {
        let name = rel.file_name().ok_or("an empty name")?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if let Some((p, fd)) = &self.cache {
            if p == parent {
                return Ok((fd.try_clone().map_err(|e| e.to_string())?, name));
            }
        }
        let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
        let mut walked = PathBuf::new();
        for c in parent.components() {
            walked.push(c);
            cur = open_dir(&cur, c.as_os_str(), Create::Yes(self.rootfs.is_some()))
                .map_err(|e| e.about(&walked))?;
        }
        self.cache = Some((
            parent.to_path_buf(),
            cur.try_clone().map_err(|e| e.to_string())?,
        ));
        Ok((cur, name))
    }

    /// Removes the non-directory `name` in `dir` if there is one; refuses a directory (which a
    /// root filesystem's entry replaces instead).
    fn clear(&mut self, dir: &OwnedFd, name: &OsStr, rel: &Path) -> Result<(), Fail> {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(errno("cannot inspect the existing entry", e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if self.rootfs.is_some() {
                    return self.remove_entry(dir, name, rel);
                }
                Err(format!("{} exists and is a directory", rel.display()).into())
            }
            Ok(_) => {
                self.files.remove(rel);
                rfs::unlinkat(dir, name, AtFlags::empty())
                    .map_err(|e| errno("cannot replace the existing entry", e))
            }
        }
    }

    fn dir(&mut self, rel: &Path, meta: &Meta, xattrs: &[Xattr]) -> Result<(), Fail> {
        let (parent, name) = self.parent(rel)?;
        match rfs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(st)
                if FileType::from_raw_mode(st.st_mode) == FileType::Symlink
                    || self.rootfs.is_some() =>
            {
                // Replace the link (never follow it), like `tar` does; a root filesystem's
                // directory replaces any lower non-directory.
                self.files.remove(rel);
                rfs::unlinkat(&parent, name, AtFlags::empty())
                    .map_err(|e| errno("cannot replace the existing entry", e))?;
                mkdir(&parent, name)?;
            }
            Ok(_) => return Err(format!("{} exists and is not a directory", rel.display()).into()),
            Err(Errno::NOENT) => mkdir(&parent, name)?,
            Err(e) => return Err(errno("cannot inspect the existing entry", e)),
        }
        if self.rootfs.is_some() {
            let fd = open_dir(&parent, name, Create::No)?;
            self.restore(&fd, rel, meta, xattrs)?;
        }
        self.dirs.insert(rel.to_path_buf(), (meta.mode, meta.mtime));
        Ok(())
    }

    fn file(
        &mut self,
        rel: &Path,
        data: &mut dyn Read,
        meta: &Meta,
        xattrs: &[Xattr],
    ) -> Result<(), Fail> {
        let (parent, name) = self.parent(rel)?;
        self.clear(&parent, name, rel)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&parent, name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| errno("cannot create the file", e))?;
        let mut f = fs::File::from(fd);
        let written = match self.rootfs {
            Some(_) => rootfs::copy_sparse(data, &mut f),
            None => io::copy(data, &mut f).map(drop),
        };
        written.map_err(|e| io_fail("writing", e))?;
        // Owner before mode: chown clears set-id bits.
        self.restore(&f, rel, meta, xattrs)?;
        rfs::fchmod(&f, Mode::from_raw_mode(meta.mode))
            .map_err(|e| errno("setting the mode", e))?;
        rfs::futimens(&f, &times(meta.mtime)).map_err(|e| errno("setting the mtime", e))?;
        self.files.insert(rel.to_path_buf());
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &Path, meta: &Meta) -> Result<(), Fail> {
        let (parent, name) = self.parent(rel)?;
        self.clear(&parent, name, rel)?;
        rfs::symlinkat(target, &parent, name).map_err(|e| errno("cannot create the symlink", e))?;
        if self.rootfs.is_some() {
            self.restore_at(&parent, name, meta)?;
        }
        Ok(())
    }

    fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), Fail> {
        let refuse = |why: &str| format!("hard link to {}: {why}", target.display());
        let t = self
            .relative(target)
            .map_err(|why| refuse(&format!("the target {why}")))?;
        let t = self
            .renamed(&t)
            .map_err(|e| refuse(&e))?
            .unwrap_or_default();
        if self.rootfs.is_some() {
            self.existing_link_target(&t)
                .map_err(|f| refuse(&f.reason))?;
        } else if !self.files.contains(&t) {
            return Err(
                refuse("the target is not a file unpacked earlier from this archive").into(),
            );
        }
        if t == rel {
            return Ok(()); // a link to itself: nothing to do
        }
        let (src_dir, src_name) = self.parent(&t)?;
        let (dir, name) = self.parent(rel)?;
        self.clear(&dir, name, rel)?;
        // Without AT_SYMLINK_FOLLOW: a symlink is never followed, only linked.
        rfs::linkat(&src_dir, src_name, &dir, name, AtFlags::empty())
            .map_err(|e| errno("cannot create the hard link", e))?;
        self.files.insert(rel.to_path_buf());
        Ok(())
    }

    /// Applies directory modes and times, deepest first, on descriptors opened without
    /// following symlinks.
    fn finish_dirs(&mut self) -> Result<(), Fail> {
        self.cache = None;
        for (rel, (mode, mtime)) in std::mem::take(&mut self.dirs).into_iter().rev() {
            let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
            for c in rel.components() {
                cur = open_dir(&cur, c.as_os_str(), Create::No).map_err(|e| e.about(&rel))?;
            }
            rfs::fchmod(&cur, Mode::from_raw_mode(mode))
                .map_err(|e| errno(&format!("setting the mode of {}", rel.display()), e))?;
            rfs::futimens(&cur, &times(mtime))
                .map_err(|e| errno(&format!("setting the mtime of {}", rel.display()), e))?;
        }
        Ok(())
    }
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, missing: &str) -> Result<PathBuf, Fail> {
    Ok(entry
        .link_name()
        .map_err(|e| format!("bad link name: {e}"))?
        .ok_or(missing)?
        .into_owned())
}

fn io_fail(what: &str, e: io::Error) -> Fail {
    Fail {
        reason: format!("{what}: {e}"),
        os: e.raw_os_error().map(Errno::from_raw_os_error),
    }
}

fn mkdir(parent: &OwnedFd, name: &OsStr) -> Result<(), Fail> {
    rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
        .map_err(|e| errno("cannot create the directory", e))
}

/// Whether [`open_dir`] makes a missing directory: `Yes(exact)` creates it 0755, with `exact`
/// whatever the umask.
#[derive(Clone, Copy)]
enum Create {
    No,
    Yes(bool),
}

/// Opens directory `name` in `dir` without following a symlink, creating it when asked.
fn open_dir(dir: &impl AsFd, name: &OsStr, create: Create) -> Result<OwnedFd, Fail> {
    match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) if matches!(create, Create::Yes(_)) => {
            match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(errno("cannot create the directory", e)),
            }
            let fd = rfs::openat(dir, name, DIR_FLAGS, Mode::empty())
                .map_err(|e| errno("cannot open", e))?;
            if let Create::Yes(true) = create {
                rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                    .map_err(|e| errno("setting the mode", e))?;
            }
            Ok(fd)
        }
        Err(Errno::LOOP) | Err(Errno::NOTDIR) => Err(
            "is a symbolic link or not a directory: refusing to write through it (possible symlink escape)"
                .into(),
        ),
        Err(e) => Err(errno("cannot open", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn raw_tar(entries: &[(&str, tar::EntryType, &str, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_mtime(5);
            h.set_size(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn a_symlink_then_a_directory_of_its_name_is_replaced_not_followed() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o750)).unwrap();
        let mtime = fs::metadata(&outside).unwrap().mtime();
        let dest = d.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let out = outside.to_str().unwrap();
        let ar = raw_tar(&[
            ("x", T::Symlink, out, 0o777),
            ("x", T::Directory, "", 0o4777),
        ]);
        let opts = UnpackOptions {
            rename_top: Some("y".into()),
        };
        unpack(&ar[..], &dest, &opts).unwrap();
        let m = fs::metadata(&outside).unwrap();
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0o750, mtime));
        let y = dest.join("y").symlink_metadata().unwrap();
        assert!(y.is_dir() && y.mode() & 0o7777 == 0o777 && y.mtime() == 5);
        // Writing below a symlink is refused, whoever made the link.
        std::os::unix::fs::symlink(&outside, dest.join("l")).unwrap();
        let ar = raw_tar(&[("l/f", T::Regular, "", 0o644)]);
        let e = unpack(&ar[..], &dest, &UnpackOptions::default()).unwrap_err();
        assert!(
            e.contains("refusing entry l/f") && e.contains("symlink"),
            "{e}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
