//! Test helpers (feature `testing`): a fake of the VMM's hybrid vsock muxer.
//!
//! [`FakeVsockMuxer`] stands where Firecracker (or QEMU's `wickd vsock-mux` sidecar) stands: it listens on a
//! VM's `vsock.sock`, answers `CONNECT <port>\n` with `OK <hostport>\n` and proxies the stream to
//! a Unix socket standing in for the guest port — typically `wick-agent --listen-unix PATH`. Like
//! the real muxers, it closes the connection when nothing listens on the requested port, so
//! [`crate::AgentClient::connect`] exercises its retry path. It never opens AF_VSOCK sockets.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// A fake hybrid vsock muxer; stops (and removes its socket) when dropped.
pub struct FakeVsockMuxer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl FakeVsockMuxer {
    /// Listens on `vsock_uds` (replacing a stale socket file) and routes each guest port in
    /// `routes` to a Unix socket path. Must be called inside a tokio runtime.
    pub fn start(vsock_uds: &Path, routes: &[(u32, PathBuf)]) -> io::Result<FakeVsockMuxer> {
        let _ = std::fs::remove_file(vsock_uds);
        let listener = UnixListener::bind(vsock_uds)?;
        let routes: Arc<HashMap<u32, PathBuf>> = Arc::new(routes.iter().cloned().collect());
        let next_port = Arc::new(AtomicU32::new(1 << 30));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let routes = routes.clone();
                let host_port = next_port.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = proxy(stream, &routes, host_port).await;
                });
            }
        });
        Ok(FakeVsockMuxer {
            path: vsock_uds.to_path_buf(),
            task,
        })
    }

    /// The socket the host connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FakeVsockMuxer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn proxy(
    mut host: UnixStream,
    routes: &HashMap<u32, PathBuf>,
    host_port: u32,
) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if host.read(&mut b).await? == 0 {
            return Ok(());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Ok(());
        }
    }
    let line = String::from_utf8_lossy(&line);
    let Some(port) = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return Ok(()); // the real muxers close on a malformed request too
    };
    let Some(target) = routes.get(&port) else {
        return Ok(());
    };
    // Nothing listening "in the guest": close, as Firecracker does.
    let Ok(mut guest) = UnixStream::connect(target).await else {
        return Ok(());
    };
    host.write_all(format!("OK {host_port}\n").as_bytes())
        .await?;
    tokio::io::copy_bidirectional(&mut host, &mut guest).await?;
    Ok(())
}

/// A **hostile** fake guest agent (tests only), standing for a guest whose root replaced
/// wick-agent: it answers `Hello` like the real agent and every `Exec` with `ExecStarted`, then
/// `stdout` bytes on stdout and `stderr` bytes on stderr (stderr first, in full-size frames),
/// then exit code `code`; anything else gets an error reply. Stops (and removes its socket)
/// when dropped.
pub struct FloodAgent {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl FloodAgent {
    /// Listens on the Unix socket `path` (route the agent port of a [`FakeVsockMuxer`] to it).
    /// Must be called inside a tokio runtime.
    pub fn start(path: &Path, stdout: u64, stderr: u64, code: i32) -> io::Result<FloodAgent> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = flood(stream, stdout, stderr, code).await;
                });
            }
        });
        Ok(FloodAgent {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for FloodAgent {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn flood(stream: UnixStream, stdout: u64, stderr: u64, code: i32) -> io::Result<()> {
    use crate::frame::{read_frame, write_frame, write_json, FrameKind, DATA_CHUNK};
    use crate::msg::{Envelope, ExecStarted, ExitStatus, HelloReply, RemoteError, Reply, Request};
    let (mut rd, mut wr) = stream.into_split();
    let Some(frame) = read_frame(&mut rd).await? else {
        return Ok(());
    };
    let env: Envelope = frame.json()?;
    // Whatever the host sends later (stdin, signals) is read and ignored.
    tokio::spawn(async move { while let Ok(Some(_)) = read_frame(&mut rd).await {} });
    match env.request {
        Request::Hello => {
            let hello = HelloReply {
                agent_version: "flood-agent (test fake)".into(),
                protocol_version: crate::PROTOCOL_VERSION,
                boot_id: "flood".into(),
                hostname: "flood".into(),
                kernel: "fake".into(),
            };
            write_json(&mut wr, FrameKind::Reply, &Reply::Ok(hello)).await
        }
        Request::Exec(_) => {
            write_json(
                &mut wr,
                FrameKind::Reply,
                &Reply::Ok(ExecStarted { pid: 4242 }),
            )
            .await?;
            let chunk = vec![b'x'; DATA_CHUNK];
            for (kind, mut left) in [(FrameKind::Stderr, stderr), (FrameKind::Stdout, stdout)] {
                while left > 0 {
                    let n = left.min(DATA_CHUNK as u64) as usize;
                    write_frame(&mut wr, kind, &chunk[..n]).await?;
                    left -= n as u64;
                }
            }
            let status = ExitStatus {
                code: Some(code),
                signal: None,
            };
            write_json(&mut wr, FrameKind::Exit, &status).await
        }
        _ => {
            let no: Reply<()> = Err(RemoteError::new("the flood agent only floods"));
            write_json(&mut wr, FrameKind::Reply, &no).await
        }
    }
}
