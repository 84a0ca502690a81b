//! Async file-descriptor streams: the AF_VSOCK listener (only used inside a guest) and
//! [`FdStream`], a tokio stream over any non-blocking fd (vsock connections, PTY masters).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listening AF_VSOCK stream socket on any CID.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(128)?)?;
        Ok(VsockListener { fd: register(fd)? })
    }

    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            }) {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 just returned this fd and nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    return FdStream::new(owned, false);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The guest's own CID, as the local address of an accepted connection.
pub fn local_cid(fd: RawFd) -> Option<u32> {
    nix::sys::socket::getsockname::<VsockAddr>(fd)
        .ok()
        .map(|a| a.cid())
}

/// Notices a restore on the vsock side: the guest's CID changed under a running agent (a fork
/// or restore gets its own CID; the transport was reset). Returns whether it did.
pub fn note_cid(last: &mut Option<u32>, now: Option<u32>) -> bool {
    let Some(now) = now else { return false };
    let changed = last.is_some_and(|l| l != now);
    if changed {
        tracing::info!(
            "this guest's vsock CID changed from {} to {now} (restored from a snapshot): \
             expecting wickd to reconfigure it",
            last.unwrap_or_default()
        );
    }
    *last = Some(now);
    changed
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and unchanged until the AsyncFd drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// A bidirectional byte stream over a non-blocking fd.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
    /// PTY masters report EIO once every slave fd is closed: that is their end of file.
    eio_is_eof: bool,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd, eio_is_eof: bool) -> io::Result<FdStream> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(FdStream {
            fd: register(fd)?,
            eio_is_eof,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sockets get a write shutdown; other fds (a PTY master) have no half-close.
        let r = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        match r {
            Ok(()) | Err(nix::errno::Errno::ENOTSOCK) | Err(nix::errno::Errno::ENOTCONN) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_changed_cid_is_noticed() {
        let mut last = None;
        assert!(!super::note_cid(&mut last, Some(3)));
        assert!(!super::note_cid(&mut last, None));
        assert!(!super::note_cid(&mut last, Some(3)));
        assert!(super::note_cid(&mut last, Some(7)));
        assert_eq!(last, Some(7));
    }
}
