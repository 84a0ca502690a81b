//! The agent channel over virtio-serial (QEMU guests, whose vsock device would block
//! migration): the port named [`PORT_NAME`] carries many agent connections, multiplexed by
//! `wick_agent_proto::mux`. Each stream names a port in its header; streams for the agent's
//! port go to the same handler as a vsock connection.
//!
//! The host side (wick's mux sidecar) may go away and come back — a restarted sidecar, or a new
//! QEMU and sidecar after a snapshot restore. While nobody is connected the port reads end of
//! file (and polls `POLLHUP`): the session is dropped and the agent waits for the next host,
//! which starts a new session with a fresh nonce (see the mux module for why that also works when
//! no disconnect is ever seen).
//!
//! A new host after the first one — another attachment, or a new session within one — is how a
//! restore (or a restarted sidecar) looks from here: the agent logs it, and wickd follows with
//! the `Configure` that gives a restored guest its new identity.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use wick_agent_proto::mux::session::{guest_link, MuxStream};
use wick_agent_proto::mux::{read_port, ACCEPTED, PORT_NAME, REFUSED};

use crate::server::Ctx;
use crate::vsock::FdStream;

/// Where the kernel lists virtio-serial ports (`vportNpM/name`).
pub const SYS_PORTS: &str = "/sys/class/virtio-ports";

/// How long a new stream may take to name its port.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The device of the port named [`PORT_NAME`] under `sys` (`/dev/vportNpM`), if there is one.
/// Read from sysfs, so no udev rule (`/dev/virtio-ports/NAME`) is needed.
pub fn find_port(sys: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys).ok()?;
    for e in entries.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim_end_matches('\n') == PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Waits until the port appears (its driver may still be probing when the agent starts; a
/// Firecracker guest never has one, so the search slows down after a minute).
pub async fn wait_for_port(sys: &Path) -> PathBuf {
    let start = std::time::Instant::now();
    loop {
        if let Some(p) = find_port(sys) {
            return p;
        }
        let every = if start.elapsed() < Duration::from_secs(60) {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        tokio::time::sleep(every).await;
    }
}

/// Serves the agent on the port at `dev` forever: one host session after another.
pub async fn serve(dev: PathBuf, agent_port: u32, ctx: Arc<Ctx>) {
    let fd = loop {
        match open(&dev) {
            Ok(fd) => break fd,
            Err(e) => {
                tracing::warn!("cannot open {}: {e}; retrying", dev.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!("serving the agent on virtio-serial port {}", dev.display());
    let sessions = Arc::new(Sessions::default());
    for attachment in 0u64.. {
        wait_for_host(&fd).await;
        if attachment > 0 {
            tracing::info!(
                "a new host on the virtio-serial port (a restore, or a restarted sidecar): \
                 expecting wickd to reconfigure this guest"
            );
        }
        if let Err(e) = attach(&fd, agent_port, ctx.clone(), sessions.clone()).await {
            tracing::warn!("virtio-serial link failed: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else {
            tracing::info!("the host left the virtio-serial port; waiting for the next one");
        }
    }
}

fn open(dev: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(dev)?;
    Ok(f.into())
}

/// Waits while no host is connected (the port polls `POLLHUP` then, and reads end of file).
async fn wait_for_host(fd: &OwnedFd) {
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n >= 0 && p.revents & libc::POLLHUP == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host session the last stream came from: each session is its own yamux connection,
/// whose id shows in its streams' names, `(Stream <connection>/<stream>)`.
#[derive(Default)]
struct Sessions(Mutex<Option<String>>);

impl Sessions {
    /// Logs a stream from a session other than the previous stream's (a restore without a
    /// disconnect the guest could see).
    fn saw(&self, name: &str) -> bool {
        let Some((conn, _)) = name
            .strip_prefix("(Stream ")
            .and_then(|r| r.split_once('/'))
        else {
            return false;
        };
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let new = last.as_deref().is_some_and(|l| l != conn);
        if new {
            tracing::info!(
                "a new host session on the virtio-serial port (a restore, or a restarted \
                 sidecar): expecting wickd to reconfigure this guest"
            );
        }
        *last = Some(conn.to_string());
        new
    }
}

/// One host attachment: the link until the host goes away (end of file).
async fn attach(
    fd: &OwnedFd,
    agent_port: u32,
    ctx: Arc<Ctx>,
    sessions: Arc<Sessions>,
) -> std::io::Result<()> {
    let mut rd = FdStream::new(fd.try_clone()?, false)?;
    let wr = FdStream::new(fd.try_clone()?, false)?;
    let handler = move |s: MuxStream| {
        sessions.saw(&s.get_ref().to_string());
        tokio::spawn(stream(s, agent_port, ctx.clone()));
    };
    guest_link(&mut rd, wr, handler).await
}

/// One multiplexed stream: its port header, then the agent's handler for the agent port.
async fn stream(mut s: MuxStream, agent_port: u32, ctx: Arc<Ctx>) {
    match tokio::time::timeout(HEADER_TIMEOUT, read_port(&mut s)).await {
        Ok(Ok(p)) if p == agent_port => {
            if s.write_all(&[ACCEPTED]).await.is_ok() {
                crate::server::serve(ctx, s).await;
            }
        }
        Ok(Ok(p)) => {
            tracing::debug!("stream for port {p}: nothing listens there");
            let _ = s.write_all(&[REFUSED]).await;
        }
        Ok(Err(_)) | Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_is_noticed() {
        let s = Sessions::default();
        assert!(!s.saw("(Stream 0a1b2c3d/1)"), "the first session");
        assert!(!s.saw("(Stream 0a1b2c3d/3)"));
        assert!(s.saw("(Stream 99887766/1)"), "a restore's new session");
        assert!(!s.saw("something else"));
        assert!(!s.saw("(Stream 99887766/5)"));
    }

    #[test]
    fn the_port_is_found_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_port(dir.path()), None);
        for (dev, name) in [("vport0p0", ""), ("vport0p1", "org.qemu.guest_agent.0\n")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), name).unwrap();
        }
        assert_eq!(find_port(dir.path()), None);
        std::fs::create_dir(dir.path().join("vport1p3")).unwrap();
        std::fs::write(dir.path().join("vport1p3/name"), "wick.agent\n").unwrap();
        assert_eq!(find_port(dir.path()), Some(PathBuf::from("/dev/vport1p3")));
    }
}
