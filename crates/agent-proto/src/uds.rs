//! Connecting to a Unix socket that lives in a directory someone else controls.
//!
//! wickd (root) talks to each VM's VMM and agent through sockets in the VM's dir, which belongs
//! to that VM's unprivileged uid while it runs. A VMM that escaped its guest could put a
//! symlink there in place of its socket, pointing at another VM's socket, and wickd would then
//! drive the other VM (pause it, save its memory, open its agent). [`connect_nofollow`] opens
//! the last path component without following a link and connects only to a real socket. The
//! directories above it are wickd's, so only the last component needs the check.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use tokio::net::UnixStream;

/// Connects to the socket at `path`, refusing a symlink (or anything but a socket) there.
pub async fn connect_nofollow(path: &Path) -> io::Result<UnixStream> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::Socket {
        return Err(io::Error::other(format!(
            "{} is not a socket ({kind:?}); refusing to follow it",
            path.display()
        )));
    }
    // The O_PATH descriptor names exactly this inode: connecting through its /proc link
    // cannot be redirected by a rename or a new link at `path`.
    UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_a_socket_and_refuses_a_link_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        connect_nofollow(&sock).await.unwrap();
        assert!(listener.accept().await.is_ok());

        let link = dir.path().join("l.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = connect_nofollow(&link).await.unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");

        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(connect_nofollow(&file).await.is_err());
        assert!(connect_nofollow(&dir.path().join("missing")).await.is_err());
    }
}
