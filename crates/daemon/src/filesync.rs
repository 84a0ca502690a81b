//! `[[file_sync]]`: reading the host files copied into a guest, with its owner's rights.
//!
//! wickd is root, but a VM owned by a non-root user must receive only files that user could
//! read. The files are read in a dedicated thread that first takes the owner's filesystem
//! identity: `setgroups` (the owner's supplementary groups), `setfsgid` and `setfsuid`, all as
//! raw per-thread syscalls. The kernel then resolves every path component, symlinks included,
//! with the owner's permissions (and `fs.protected_symlinks`), and the change of fsuid from 0
//! drops the thread's CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH. So a symlink the owner could not
//! follow, a directory they cannot search or a file they cannot read is refused by the kernel,
//! not by a check that could race it. The thread ends after the reads: its credentials are never
//! reused, and the other threads of wickd never change theirs (glibc's `setgroups` would change
//! every thread's, hence the raw syscall).
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

/// Gives the calling thread (only) `uid`'s filesystem identity: supplementary groups, fsgid,
/// fsuid. Verified after the fact; any failure is an error and the thread must not read.
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
    // setfsgid/setfsuid are per-thread system calls; they return the previous value, so a
    // second call tells whether the first took effect.
    nix::unistd::setfsgid(user.gid);
    if nix::unistd::setfsgid(user.gid) != user.gid {
        return Err("setfsgid failed".into());
    }
    nix::unistd::setfsuid(user.uid);
    if nix::unistd::setfsuid(user.uid) != user.uid {
        return Err("setfsuid failed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

        let (got, refused) = read_files(&files, 0);
        assert_eq!(got.len(), 3, "root reads files and links: {refused:?}");
        assert_eq!(refused.len(), 1, "{refused:?}");
        // The daemon's own threads kept root's rights.
        assert!(std::fs::read(&secret).is_ok());
    }
}
