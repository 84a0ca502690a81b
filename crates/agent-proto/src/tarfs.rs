//! Tar helpers shared by both ends of a file transfer (the agent's put/get, `wick vm cp`):
//! building an archive of a tree without following symlinks, and the path checks that keep an
//! unpacked archive inside its destination.

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

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

/// Fails if `path` (which may not exist yet) resolves outside `root` (canonical): the longest
/// existing prefix is resolved, and what does not exist yet cannot be a symlink.
pub fn check_inside(root: &Path, path: &Path) -> Result<(), String> {
    let mut existing = path.to_path_buf();
    while existing.symlink_metadata().is_err() {
        if !existing.pop() {
            return Ok(());
        }
    }
    match existing.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(()),
        Ok(real) => Err(format!(
            "{} leads outside the destination (to {})",
            existing.display(),
            real.display()
        )),
        // A dangling symlink as a parent directory: nothing can be written through it safely.
        Err(e) => Err(format!("cannot resolve {}: {e}", existing.display())),
    }
}
