//! File modes of everything wickd keeps: private to root, except the API socket.
//!
//! VM disks, consoles, the database and image content are other users' data, so wickd runs with
//! umask 077 ([`set_umask`]), creates its directories 0700, and at every start strips group and
//! other bits from whatever an older install left behind ([`harden_tree`]). The only exceptions
//! are the API socket (0660, group `socket_group`) and its directory, which that group may
//! traverse (0710) but not list.
//!
//! [`apply`] is the one place a mode and owner are set, so a later per-VM VMM uid is one more
//! [`Access`] variant (the VM dir owned by that uid), not a new scheme.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Gid, Uid};

/// Who may reach a path besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Root only: directories 0700, files 0600.
    Private,
    /// A directory members of `gid` may traverse (not list): 0710, group `gid`. For the API
    /// socket's directory.
    Traverse(Gid),
    /// A socket (or file) members of `gid` may read and write: 0660, group `gid`.
    Group(Gid),
    /// Owned by `uid` alone (0700/0600): for a VM dir whose VMM runs as its own uid.
    User(Uid),
    /// Root's, readable by all, writable by none but root (0755/0644): a VMM's input inside
    /// its own (private) VM dir, such as a suspend image the next VMM's uid loads.
    Readable,
}

/// Sets wickd's umask: nothing it creates (directly or through its VMMs and tools) is group or
/// world accessible unless [`apply`] says so.
pub fn set_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Gives `path` the mode and owner of `access` (never following a final symlink).
pub fn apply(path: &Path, access: Access) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other(format!(
            "{} is a symlink; refusing to change its target's mode",
            path.display()
        )));
    }
    let dir = meta.is_dir();
    let (mode, uid, gid) = match access {
        Access::Private => (if dir { 0o700 } else { 0o600 }, Uid::from_raw(0), None),
        Access::Traverse(g) => (0o710, Uid::from_raw(0), Some(g)),
        Access::Group(g) => (0o660, Uid::from_raw(0), Some(g)),
        Access::User(u) => (if dir { 0o700 } else { 0o600 }, u, None),
        Access::Readable => (if dir { 0o755 } else { 0o644 }, Uid::from_raw(0), None),
    };
    // Owner first, then mode: chown may clear setuid/setgid bits, never adds access.
    let want_uid = (meta.uid() != uid.as_raw()).then_some(uid);
    let want_gid = gid.filter(|g| meta.gid() != g.as_raw());
    if (want_uid.is_some() || want_gid.is_some()) && nix::unistd::geteuid().is_root() {
        nix::unistd::fchownat(
            None,
            path,
            want_uid,
            want_gid,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)?;
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// [`apply`] to a file a less trusted uid could still swap (a VMM's output in its VM dir):
/// opened without following a link (nor blocking on a FIFO), refused unless it is a regular
/// file with one link, then owner and mode set on that descriptor, never on a path.
pub fn apply_plain_file(path: &Path, access: Access) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{} is not a plain file with one link; refusing it",
            path.display()
        )));
    }
    let (mode, uid, gid) = match access {
        Access::Private => (0o600, 0, 0),
        Access::Readable => (0o644, 0, 0),
        Access::Group(g) => (0o660, 0, g.as_raw()),
        Access::User(u) => (0o600, u.as_raw(), meta.gid()),
        Access::Traverse(_) => return Err(io::Error::other("Traverse is for directories")),
    };
    if (meta.uid(), meta.gid()) != (uid, gid) && nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?; // owner first, then mode
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Creates `dir` (and missing parents, which get the umask's 0700) and applies `access`.
pub fn make_dir(dir: &Path, access: Access) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    apply(dir, access)
}

/// Removes group and other permission bits from `top` and everything below it
/// on the same filesystem, without following symlinks or entering mounts, except the read bits
/// of root-owned regular files `readable` names (files wickd keeps readable on purpose, see
/// [`Access::Readable`]). Returns the paths it changed; errors on single entries are logged
/// and skipped.
pub fn harden_tree(top: &Path, readable: &dyn Fn(&Path) -> bool) -> Vec<std::path::PathBuf> {
    let mut fixed = Vec::new();
    let Ok(meta) = std::fs::symlink_metadata(top) else {
        return fixed;
    };
    walk(top, meta.dev(), readable, &mut fixed);
    fixed
}

fn walk(
    path: &Path,
    dev: u64,
    readable: &dyn Fn(&Path) -> bool,
    fixed: &mut Vec<std::path::PathBuf>,
) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_symlink() || meta.dev() != dev {
        return;
    }
    let mode = meta.mode() & 0o7777;
    let keep = match meta.is_file() && meta.uid() == 0 && readable(path) {
        true => 0o044,
        false => 0,
    };
    let strip = 0o077 & !keep;
    if mode & strip != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !strip)) {
            Ok(()) => fixed.push(path.to_path_buf()),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot make private"),
        }
    }
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for e in entries.flatten() {
            walk(&e.path(), dev, readable, fixed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harden_strips_group_and_other_bits_but_not_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("state");
        std::fs::create_dir_all(top.join("vms/x")).unwrap();
        std::fs::write(top.join("vms/x/rootfs.ext4"), b"disk").unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"o").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        for (p, m) in [
            (top.clone(), 0o755),
            (top.join("vms"), 0o755),
            (top.join("vms/x"), 0o2775),
            (top.join("vms/x/rootfs.ext4"), 0o4644),
            (outside.clone(), 0o644),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::fs::write(top.join("vms/x/shared"), b"s").unwrap();
        std::fs::set_permissions(
            top.join("vms/x/shared"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let readable = |p: &Path| p.ends_with("vms/x/shared");
        let fixed = harden_tree(&top, &readable);
        assert_eq!(fixed.len(), 5, "{fixed:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&top), 0o700);
        assert_eq!(mode(&top.join("vms/x")), 0o2700, "special bits kept");
        assert_eq!(mode(&top.join("vms/x/rootfs.ext4")), 0o4600);
        assert_eq!(mode(&outside), 0o644, "a symlink's target is left alone");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(
                mode(&top.join("vms/x/shared")),
                0o644,
                "readable kept, write stripped"
            );
        }
        assert!(harden_tree(&top, &readable).is_empty(), "idempotent");
    }

    #[test]
    fn apply_sets_modes_per_access() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        make_dir(&dir, Access::Private).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        let gid = nix::unistd::getegid();
        apply(&dir, Access::Traverse(gid)).unwrap();
        assert_eq!(mode(&dir), 0o710);
        let f = dir.join("f");
        std::fs::write(&f, b"").unwrap();
        apply(&f, Access::Group(gid)).unwrap();
        assert_eq!(mode(&f), 0o660);
        apply(&f, Access::Private).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::os::unix::fs::symlink(&f, dir.join("l")).unwrap();
        assert!(apply(&dir.join("l"), Access::Private).is_err());
        assert!(apply_plain_file(&dir.join("l"), Access::Readable).is_err());
        apply_plain_file(&f, Access::Readable).unwrap();
        assert_eq!(mode(&f), 0o644);
        std::fs::hard_link(&f, dir.join("h")).unwrap();
        assert!(apply_plain_file(&f, Access::Private).is_err(), "two links");
        assert_eq!(mode(&f), 0o644, "a refused file is left alone");
    }
}
