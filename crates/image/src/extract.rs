//! Safe application of tar layers onto a root directory, through the one hardened unpacker
//! ([`wick_agent_proto::tarfs::Layers`]): every directory is opened from the root without
//! following symlinks, so an entry below a symlink (`link -> /etc` then `link/passwd`, also
//! across layers, also as a hard-link target) is refused, `..` is refused, and nothing is ever
//! opened, written or removed through a symlink. Ownership, modes (special bits included),
//! times, xattrs, devices, FIFOs, hard links and symlinks are kept. With whiteouts on (OCI
//! layers), `.wh.<name>` deletes `<name>` from the lower layers and `.wh..wh..opq` empties its
//! directory of lower-layer content.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use wick_agent_proto::tarfs::{Layers, RootfsOptions, UnpackError};

use crate::error::{ImageError, IoContext, Result};

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
    opts: RootfsOptions,
    /// Opened at the first layer.
    layers: Option<Layers>,
}

impl Applier {
    /// `whiteouts`: interpret OCI whiteout files. `owners`: chown entries (needs root).
    pub(crate) fn new(root: &Path, whiteouts: bool, owners: bool) -> Applier {
        Applier {
            root: root.to_path_buf(),
            opts: RootfsOptions { whiteouts, owners },
            layers: None,
        }
    }

    /// Applies one tar stream. `what` names it in errors.
    pub(crate) fn apply(&mut self, reader: impl Read, what: &str) -> Result<()> {
        let layers = match &mut self.layers {
            Some(l) => l,
            None => self
                .layers
                .insert(Layers::new(&self.root, self.opts).map_err(|e| image_error(e, what))?),
        };
        layers.apply(reader).map_err(|e| image_error(e, what))
    }

    /// Sets directory modes and times, deepest first. Call once after the last layer. Returns
    /// how many entries the layers held.
    pub(crate) fn finish(self) -> Result<u64> {
        let Some(layers) = self.layers else {
            return Ok(0);
        };
        let done = layers.finish().map_err(|e| image_error(e, "the layers"))?;
        for w in &done.warnings {
            tracing::warn!("{w}");
        }
        Ok(done.entries)
    }
}

/// A refused entry is an [`ImageError::UnsafeEntry`]; a failed system call or read an
/// [`ImageError::Io`].
fn image_error(e: UnpackError, what: &str) -> ImageError {
    match e {
        UnpackError::Read(source) => {
            ImageError::io(format!("read the tar stream of {what}"), source)
        }
        UnpackError::Entry {
            path,
            reason,
            os: Some(source),
        } => ImageError::io(format!("{reason} (entry {path:?} of {what})"), source),
        UnpackError::Entry {
            path,
            reason,
            os: None,
        } => ImageError::UnsafeEntry {
            path: path.display().to_string(),
            reason: format!("{reason} (in {what}); the image is refused"),
        },
        UnpackError::Dest(why) => ImageError::Invalid(format!("applying {what}: {why}")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
