//! `[[file_sync]]`: reading the host files copied into a guest, with its owner's rights.
//!
//! wickd is root, but a VM owned by a non-root user must receive only files that user could
//! read. The files are read in a dedicated thread that first becomes the owner: `setgroups`
//! (the owner's supplementary groups), `setresgid` and `setresuid`, all as raw per-thread
//! syscalls (glibc's wrappers would change every thread of wickd). With no uid 0 left the kernel
//! drops all of the thread's capabilities, then resolves every path component, symlinks
//! included, with the owner's permissions (and `fs.protected_symlinks`), and applies the
//! owner's ptrace rules to `/proc` files. So a symlink the owner could not follow, a directory
//! they cannot search or a file they cannot read is refused by the kernel, not by a check that
//! could race it. The thread ends after the reads: its credentials are never reused.
//!
//! Only regular files are read (a FIFO or device is refused; opened non-blocking so it cannot
//! hang), each at most [`MAX_FILE`] bytes.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::unistd::{Gid, Uid, User};
use wick_agent_proto::SyncFile;

use crate::config::FileSync;

/// Largest file copied (all files travel in one configure frame of at most 1 MiB).
pub const MAX_FILE: u64 = 256 * 1024;

/// Reads every `[[file_sync]]` file as `owner` would. Returns the files to copy and one
/// message per file refused (naming the file, the owner and why).
pub fn read_files(files: &[FileSync], owner: u32) -> (Vec<SyncFile>, Vec<String>) {
    if files.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let files = files.to_vec();
    let worker = std::thread::Builder::new()
        .name("file-sync".into())
        .spawn(move || {
            if owner != 0 {
                if let Err(why) = become_owner(owner) {
                    let refused = files
                        .iter()
                        .map(|f| {
                            format!(
                                "file_sync {}: not copied: cannot read it as uid {owner}: {why}",
                                f.host.display()
                            )
                        })
                        .collect();
                    return (Vec::new(), refused);
                }
            }
            read_all(&files, owner)
        });
    match worker.map(|t| t.join()) {
        Ok(Ok(out)) => out,
        _ => (
            Vec::new(),
            vec!["file_sync: the reader thread failed; no file copied".into()],
        ),
    }
}

fn read_all(files: &[FileSync], owner: u32) -> (Vec<SyncFile>, Vec<String>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for f in files {
        match read_one(&f.host) {
            Ok(contents) => out.push(SyncFile {
                path: f.guest.clone(),
                mode: f
                    .mode
                    .as_deref()
                    .and_then(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8).ok())
                    .unwrap_or(0o600),
                contents,
            }),
            Err(why) => refused.push(format!(
                "file_sync {}: not copied: uid {owner} cannot read it: {why}",
                f.host.display()
            )),
        }
    }
    (out, refused)
}

fn read_one(path: &Path) -> Result<Vec<u8>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    // The reader is a thread of wickd: procfs would give it wickd's own `/proc/self` (its
    // environment, memory map, open files) whatever uid the thread took. Nothing there is a
    // file a user means to copy.
    let fs = nix::sys::statfs::fstatfs(&f).map_err(|e| e.to_string())?;
    if fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC {
        return Err("a /proc file".into());
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{} bytes; the limit is {MAX_FILE} bytes",
            meta.len()
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_FILE {
        return Err(format!("grew past the limit of {MAX_FILE} bytes"));
    }
    Ok(buf)
}

/// Makes the calling thread (only) `uid`: its supplementary groups, gid and uid (real,
/// effective, saved, and so fs ids), no capabilities. Verified after the fact; on any failure
/// the thread must not read.
fn become_owner(uid: u32) -> Result<(), String> {
    let user = User::from_uid(Uid::from_raw(uid))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the uid has no user entry".to_string())?;
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|e| e.to_string())?;
    let groups: Vec<libc::gid_t> = nix::unistd::getgrouplist(&name, user.gid)
        .map_err(|e| format!("groups of {}: {e}", user.name))?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    // SAFETY: the raw syscall reads `groups.len()` gids from a live buffer and changes only this
    // thread's credentials (unlike glibc's setgroups, which changes every thread's).
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
    }
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    // SAFETY: raw setresgid/setresuid change only this thread's ids (glibc's wrappers would
    // change every thread's). With every uid non-zero the kernel clears the thread's
    // capabilities, so no CAP_DAC_* or CAP_SYS_PTRACE is left to bypass the owner's rights.
    let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    if rc != 0 {
        return Err(format!("setresgid: {}", std::io::Error::last_os_error()));
    }
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    if rc != 0 {
        return Err(format!("setresuid: {}", std::io::Error::last_os_error()));
    }
    // getresuid/getresgid report this thread's ids: check the switch took.
    let ids = nix::unistd::getresuid().map_err(|e| e.to_string())?;
    let gids = nix::unistd::getresgid().map_err(|e| e.to_string())?;
    if [ids.real, ids.effective, ids.saved] != [user.uid; 3]
        || [gids.real, gids.effective, gids.saved] != [user.gid; 3]
    {
        return Err("the thread did not take the owner's ids".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn proc_files_are_refused() {
        for p in ["/proc/self/environ", "/proc/self/status", "/proc/version"] {
            let err = read_one(Path::new(p)).unwrap_err();
            assert!(err.contains("/proc"), "{p}: {err}");
        }
    }

    fn sync(host: &Path) -> FileSync {
        FileSync {
            host: host.to_path_buf(),
            guest: "/root/f".into(),
            mode: None,
        }
    }

    #[test]
    fn owner_rights_decide_and_root_reads_all() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: owner_rights_decide_and_root_reads_all: needs root");
            return;
        }
        let nobody = 65534;
        if User::from_uid(Uid::from_raw(nobody))
            .ok()
            .flatten()
            .is_none()
        {
            eprintln!("SKIP: owner_rights_decide_and_root_reads_all: no user 65534");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let public = d.path().join("public");
        std::fs::write(&public, b"pub").unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let files = [sync(&public), sync(&secret), sync(&link), sync(&fifo)];

        let (got, refused) = read_files(&files, nobody);
        assert_eq!(got.len(), 1, "{refused:?}");
        assert_eq!(got[0].contents, b"pub");
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused[0].contains("secret") && refused[0].contains("uid 65534"));
        assert!(refused[0].contains("Permission denied"), "{}", refused[0]);
        assert!(refused[2].contains("not a regular file"), "{}", refused[2]);

        // No capability is left either: root's /proc/1/maps needs ptrace rights (CAP_SYS_PTRACE
        // would pass them), though its mode is 0444.
        let init_is_root =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/1").unwrap()) == 0;
        if init_is_root {
            let (got, refused) = read_files(&[sync(Path::new("/proc/1/maps"))], nobody);
            assert!(got.is_empty(), "{refused:?}");
            assert!(refused[0].contains("ermission denied"), "{refused:?}");
        }

        let (got, refused) = read_files(&files, 0);
        assert_eq!(got.len(), 3, "root reads files and links: {refused:?}");
        assert_eq!(refused.len(), 1, "{refused:?}");
        // The daemon's own threads kept root's rights.
        assert!(std::fs::read(&secret).is_ok());
    }
}
