//! Tar helpers shared by both ends of a file transfer (the agent's put/get, `wick vm cp`):
//! building an archive of a tree without following symlinks, and [`unpack`], the one unpacker
//! both directions use (the archive is attacker input either way: a hostile guest's for
//! `vm cp VM:SRC DST`, the host's for uploads).
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

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

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
            Component::ParentDir => return Err("contains `..`".into()),
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
}

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
    // The destination itself is the caller's choice and may be reached through a symlink.
    let root = rfs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        fail(format!(
            "cannot open the destination: {}",
            io::Error::from(e)
        ))
    })?;
    let mut u = Unpacker {
        root,
        rename: opts.rename_top.clone(),
        top: None,
        dirs: BTreeMap::new(),
        files: HashSet::new(),
        cache: None,
        out: Unpacked::default(),
    };
    let mut ar = tar::Archive::new(archive);
    for entry in ar.entries().map_err(|e| fail(e.to_string()))? {
        let entry = entry.map_err(|e| fail(format!("reading the archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| fail(format!("bad entry name: {e}")))?
            .into_owned();
        u.entry(entry, &raw)
            .map_err(|why| fail(format!("refusing entry {}: {why}", raw.display())))?;
    }
    if u.rename.is_some() && u.top.is_none() {
        return Err(fail("the archive is empty".into()));
    }
    u.finish_dirs().map_err(fail)?;
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
    /// Regular files unpacked so far: the only valid hard link targets.
    files: HashSet<PathBuf>,
    /// The last parent directory opened (directories are never removed, so it stays valid).
    cache: Option<(PathBuf, OwnedFd)>,
    out: Unpacked,
}

fn errno(what: &str, e: Errno) -> String {
    format!("{what}: {}", io::Error::from(e))
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

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, raw: &Path) -> Result<(), String> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if kind == T::XGlobalHeader {
            return Ok(()); // metadata for the whole archive: nothing to write
        }
        let rel = safe_relative(raw).map_err(|why| format!("its path {why}"))?;
        self.out.entries += 1;
        let Some(rel) = self.renamed(&rel)? else {
            return Ok(()); // `./`: the destination itself is left alone
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        match kind {
            T::Directory => self.dir(&rel, mode, mtime),
            T::Regular | T::Continuous | T::GNUSparse => {
                self.out.bytes += entry.size();
                self.file(&rel, &mut entry, mode, mtime)
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("bad link name: {e}"))?
                    .ok_or("a symlink without a target")?
                    .into_owned();
                self.symlink(&rel, &target)
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("bad link name: {e}"))?
                    .ok_or("a hard link without a target")?
                    .into_owned();
                self.hard_link(&rel, &target)
            }
            T::Char | T::Block | T::Fifo => {
                let what = match kind {
                    T::Char => "character device",
                    T::Block => "block device",
                    _ => "fifo",
                };
                self.out.skipped_total += 1;
                if self.out.skipped.len() < MAX_LISTED_SKIPS {
                    self.out.skipped.push(format!("{} ({what})", rel.display()));
                }
                Ok(())
            }
            other => Err(format!("unsupported entry type {other:?}")),
        }
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
    fn parent<'a>(&mut self, rel: &'a Path) -> Result<(OwnedFd, &'a OsStr), String> {
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
            cur = open_dir(&cur, c.as_os_str(), true)
                .map_err(|e| format!("{}: {e}", walked.display()))?;
        }
        self.cache = Some((
            parent.to_path_buf(),
            cur.try_clone().map_err(|e| e.to_string())?,
        ));
        Ok((cur, name))
    }

    /// Removes the non-directory `name` in `dir` if there is one; refuses a directory.
    fn clear(&mut self, dir: &OwnedFd, name: &OsStr, rel: &Path) -> Result<(), String> {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(errno("cannot inspect the existing entry", e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                Err(format!("{} exists and is a directory", rel.display()))
            }
            Ok(_) => {
                self.files.remove(rel);
                rfs::unlinkat(dir, name, AtFlags::empty())
                    .map_err(|e| errno("cannot replace the existing entry", e))
            }
        }
    }

    fn dir(&mut self, rel: &Path, mode: u32, mtime: u64) -> Result<(), String> {
        let (parent, name) = self.parent(rel)?;
        match rfs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                // Replace the link (never follow it), like `tar` does.
                rfs::unlinkat(&parent, name, AtFlags::empty())
                    .map_err(|e| errno("cannot replace the symlink", e))?;
                mkdir(&parent, name)?;
            }
            Ok(_) => return Err(format!("{} exists and is not a directory", rel.display())),
            Err(Errno::NOENT) => mkdir(&parent, name)?,
            Err(e) => return Err(errno("cannot inspect the existing entry", e)),
        }
        self.dirs.insert(rel.to_path_buf(), (mode, mtime));
        Ok(())
    }

    fn file(
        &mut self,
        rel: &Path,
        data: &mut dyn Read,
        mode: u32,
        mtime: u64,
    ) -> Result<(), String> {
        let (parent, name) = self.parent(rel)?;
        self.clear(&parent, name, rel)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&parent, name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| errno("cannot create the file", e))?;
        let mut f = fs::File::from(fd);
        io::copy(data, &mut f).map_err(|e| format!("writing: {e}"))?;
        rfs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(|e| errno("setting the mode", e))?;
        rfs::futimens(&f, &times(mtime)).map_err(|e| errno("setting the mtime", e))?;
        self.files.insert(rel.to_path_buf());
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), String> {
        let (parent, name) = self.parent(rel)?;
        self.clear(&parent, name, rel)?;
        rfs::symlinkat(target, &parent, name).map_err(|e| errno("cannot create the symlink", e))
    }

    fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), String> {
        let refuse = |why: &str| format!("hard link to {}: {why}", target.display());
        let t = safe_relative(target).map_err(|why| refuse(&format!("the target {why}")))?;
        let t = self
            .renamed(&t)
            .map_err(|e| refuse(&e))?
            .unwrap_or_default();
        if !self.files.contains(&t) {
            return Err(refuse(
                "the target is not a file unpacked earlier from this archive",
            ));
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
    fn finish_dirs(&mut self) -> Result<(), String> {
        self.cache = None;
        for (rel, (mode, mtime)) in std::mem::take(&mut self.dirs).into_iter().rev() {
            let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
            for c in rel.components() {
                cur = open_dir(&cur, c.as_os_str(), false)
                    .map_err(|e| format!("{}: {e}", rel.display()))?;
            }
            rfs::fchmod(&cur, Mode::from_raw_mode(mode))
                .map_err(|e| errno(&format!("setting the mode of {}", rel.display()), e))?;
            rfs::futimens(&cur, &times(mtime))
                .map_err(|e| errno(&format!("setting the mtime of {}", rel.display()), e))?;
        }
        Ok(())
    }
}

fn mkdir(parent: &OwnedFd, name: &OsStr) -> Result<(), String> {
    rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
        .map_err(|e| errno("cannot create the directory", e))
}

/// Opens directory `name` in `dir` without following a symlink; with `create`, makes it (0755)
/// when missing.
fn open_dir(dir: &impl AsFd, name: &OsStr, create: bool) -> Result<OwnedFd, String> {
    match rfs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) if create => {
            match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(errno("cannot create the directory", e)),
            }
            rfs::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| errno("cannot open", e))
        }
        Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
            Err("is a symlink or not a directory: refusing to write through it".into())
        }
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
