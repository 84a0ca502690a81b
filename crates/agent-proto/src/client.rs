//! The host side: [`AgentClient`] speaks to a guest's agent through the VMM's hybrid vsock socket.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Mutex};

use crate::frame::{read_frame, write_frame, write_json, FrameKind, DATA_CHUNK};
use crate::msg::*;
use crate::{AgentError, PROTOCOL_VERSION};

/// Pause between attempts while the guest boots.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Bound on the hybrid-vsock handshake of one connection once the agent is known to be up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for a request's (first) reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A client of one guest's agent. Cheap to clone; every call opens its own connection, so calls
/// may run concurrently.
#[derive(Debug, Clone)]
pub struct AgentClient {
    uds: PathBuf,
    port: u32,
    hello: HelloReply,
}

impl AgentClient {
    /// Connects to the agent behind the VM's hybrid vsock socket `vsock_uds` on `port`, retrying
    /// every ~50 ms (the socket may not exist yet, or nothing may listen in the guest yet) until
    /// the agent answers `Hello` or `timeout` passes. Fails at once if the agent speaks another
    /// protocol version.
    pub async fn connect(
        vsock_uds: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(remaining, async {
                let (mut rd, _wr) =
                    open(vsock_uds, port, remaining, Request::Hello, "say hello").await?;
                read_reply::<HelloReply>(&mut rd, "say hello", remaining).await
            })
            .await;
            let last = match attempt {
                Ok(Ok(hello)) => {
                    if hello.protocol_version != PROTOCOL_VERSION {
                        return Err(AgentError::VersionMismatch {
                            ours: PROTOCOL_VERSION,
                            agent: hello.protocol_version,
                            agent_version: hello.agent_version,
                        });
                    }
                    return Ok(AgentClient {
                        uds: vsock_uds.to_path_buf(),
                        port,
                        hello,
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the attempt in progress timed out".to_string(),
            };
            if Instant::now() + RETRY_INTERVAL >= deadline {
                return Err(AgentError::NotReady {
                    path: vsock_uds.to_path_buf(),
                    port,
                    waited: start.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// The agent's answer to the `Hello` made by [`AgentClient::connect`].
    pub fn agent_info(&self) -> &HelloReply {
        &self.hello
    }

    /// Asks `Hello` again (boot id, hostname, versions).
    pub async fn hello(&self) -> Result<HelloReply, AgentError> {
        self.call(Request::Hello, "say hello").await
    }

    /// Applies hostname, network, keys, git identity and files in the guest (idempotent).
    pub async fn configure(&self, config: &Configure) -> Result<ConfigureReply, AgentError> {
        self.call(
            Request::Configure(Box::new(config.clone())),
            "configure the guest",
        )
        .await
    }

    /// Starts a process in the guest.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecSession, AgentError> {
        let what = "start the command";
        let with_stdin = req.stdin;
        let (mut rd, wr) = self.open(Request::Exec(req), what).await?;
        let started: ExecStarted = read_reply(&mut rd, what, REPLY_TIMEOUT).await?;
        let wr = Arc::new(Mutex::new(wr));
        Ok(ExecSession {
            pid: started.pid,
            rd,
            stdin: with_stdin.then(|| ExecStdin { wr: wr.clone() }),
            wr,
            exited: None,
        })
    }

    /// Streams a tar archive from `archive` into the guest directory `dest` (created if missing).
    /// Entries escaping `dest` (`..`, absolute paths, writes through symlinks pointing outside,
    /// hard links to outside files) make the agent refuse the archive.
    pub async fn put_tar<R: AsyncRead + Unpin>(
        &self,
        dest: &str,
        mut archive: R,
    ) -> Result<PutDone, AgentError> {
        let what = "receive files";
        let (mut rd, mut wr) = self
            .open(
                Request::PutFiles {
                    dest_dir: dest.to_string(),
                },
                what,
            )
            .await?;
        read_reply::<()>(&mut rd, what, REPLY_TIMEOUT).await?;
        // The agent replies early if it refuses the archive midway; watch for that.
        let mut reply = tokio::spawn(async move {
            read_reply::<PutDone>(&mut rd, "unpack the files", Duration::MAX).await
        });
        let mut buf = vec![0u8; 5 + DATA_CHUNK];
        loop {
            if reply.is_finished() {
                return join_reply(reply).await;
            }
            let n = archive
                .read(&mut buf[5..])
                .await
                .map_err(|source| AgentError::Io {
                    what: "read the local archive",
                    source,
                })?;
            if n == 0 {
                break;
            }
            buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
            buf[4] = FrameKind::Data as u8;
            if wr.write_all(&buf[..5 + n]).await.is_err() {
                // The agent hung up: its reply says why.
                return join_reply(reply).await;
            }
        }
        let _ = write_frame(&mut wr, FrameKind::DataEnd, &[]).await;
        match tokio::time::timeout(REPLY_TIMEOUT, &mut reply).await {
            Ok(r) => r.map_err(|e| AgentError::Protocol {
                what,
                detail: e.to_string(),
            })?,
            Err(_) => {
                reply.abort();
                Err(AgentError::Timeout {
                    what: "finish unpacking the files",
                    after: REPLY_TIMEOUT,
                })
            }
        }
    }

    /// Streams a tar archive of the guest file or directory `path`; its single top-level entry is
    /// named after `path`'s last component.
    pub async fn get_tar(&self, path: &str) -> Result<TarReader, AgentError> {
        let what = "send files";
        let (mut rd, wr) = self
            .open(
                Request::GetFiles {
                    path: path.to_string(),
                },
                what,
            )
            .await?;
        read_reply::<()>(&mut rd, what, REPLY_TIMEOUT).await?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let _wr = wr; // keep the connection open while reading
            loop {
                let item = match read_frame(&mut rd).await {
                    Ok(Some(f)) if f.kind == FrameKind::Data => Ok(f.payload),
                    Ok(Some(f)) if f.kind == FrameKind::DataEnd => break,
                    Ok(Some(f)) if f.kind == FrameKind::Error => {
                        let msg = f
                            .json::<RemoteError>()
                            .map(|e| e.message)
                            .unwrap_or_else(|e| e.to_string());
                        Err(io::Error::other(format!(
                            "the guest agent failed to send files: {msg}"
                        )))
                    }
                    Ok(Some(f)) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected {:?} frame in a tar stream", f.kind),
                    )),
                    Ok(None) => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the guest agent closed the connection before the end of the tar stream",
                    )),
                    Err(e) => Err(e),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(TarReader {
            rx,
            cur: Bytes::new(),
        })
    }

    /// The guest's listening TCP ports.
    pub async fn ports(&self) -> Result<Vec<ListeningPort>, AgentError> {
        self.call(Request::Ports, "list listening ports").await
    }

    /// Uptime, boot id, load and memory of the guest.
    pub async fn health(&self) -> Result<Health, AgentError> {
        self.call(Request::Health, "report health").await
    }

    /// Asks the guest to sync and power off (`poweroff`) or reboot. The agent replies before
    /// acting, so the VM goes down shortly after this returns.
    pub async fn shutdown(&self, poweroff: bool) -> Result<ShutdownReply, AgentError> {
        self.call(Request::Shutdown { poweroff }, "shut down").await
    }

    async fn open(
        &self,
        request: Request,
        what: &'static str,
    ) -> Result<(OwnedReadHalf, OwnedWriteHalf), AgentError> {
        open(&self.uds, self.port, HANDSHAKE_TIMEOUT, request, what).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: Request,
        what: &'static str,
    ) -> Result<T, AgentError> {
        let (mut rd, _wr) = self.open(request, what).await?;
        read_reply(&mut rd, what, REPLY_TIMEOUT).await
    }
}

/// Opens one connection: hybrid vsock handshake, then the request frame.
async fn open(
    uds: &Path,
    port: u32,
    timeout: Duration,
    request: Request,
    what: &'static str,
) -> Result<(OwnedReadHalf, OwnedWriteHalf), AgentError> {
    let stream = tokio::time::timeout(timeout, handshake(uds, port))
        .await
        .map_err(|_| AgentError::Timeout {
            what: "accept the vsock connection",
            after: timeout,
        })??;
    let (rd, mut wr) = stream.into_split();
    let env = Envelope {
        protocol: PROTOCOL_VERSION,
        request,
    };
    write_json(&mut wr, FrameKind::Request, &env)
        .await
        .map_err(AgentError::io(what))?;
    Ok((rd, wr))
}

/// Firecracker's hybrid vsock handshake: `CONNECT <port>\n` → `OK <hostport>\n`.
async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let err = |detail: String| AgentError::Connect {
        path: uds.to_path_buf(),
        port,
        detail,
    };
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| err(format!("cannot connect to the vsock socket: {e}")))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| err(format!("cannot send CONNECT: {e}")))?;
    // Byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        let n = s
            .read(&mut b)
            .await
            .map_err(|e| err(format!("reading the CONNECT answer: {e}")))?;
        if n == 0 {
            return Err(err(
                "the VMM closed the connection after CONNECT (nothing listens on that port in \
                 the guest yet)"
                    .into(),
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(err(format!(
                "unexpected CONNECT answer {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
    }
    if line.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(err(format!(
            "unexpected CONNECT answer {:?}",
            String::from_utf8_lossy(&line)
        )))
    }
}

/// Reads a `Reply` frame and unwraps it.
async fn read_reply<T: DeserializeOwned>(
    rd: &mut OwnedReadHalf,
    what: &'static str,
    timeout: Duration,
) -> Result<T, AgentError> {
    let frame = match tokio::time::timeout(timeout, read_frame(rd)).await {
        Ok(r) => r.map_err(AgentError::io(what))?,
        Err(_) => {
            return Err(AgentError::Timeout {
                what,
                after: timeout,
            })
        }
    };
    let frame = frame.ok_or_else(|| AgentError::Protocol {
        what,
        detail: "the agent closed the connection without replying".into(),
    })?;
    if frame.kind != FrameKind::Reply {
        return Err(AgentError::Protocol {
            what,
            detail: format!("expected a reply, got a {:?} frame", frame.kind),
        });
    }
    let reply: Reply<T> = frame.json().map_err(|e| AgentError::Protocol {
        what,
        detail: e.to_string(),
    })?;
    reply.map_err(|e| AgentError::Remote {
        what,
        message: e.message,
    })
}

async fn join_reply(
    reply: tokio::task::JoinHandle<Result<PutDone, AgentError>>,
) -> Result<PutDone, AgentError> {
    let r = reply.await.map_err(|e| AgentError::Protocol {
        what: "receive files",
        detail: e.to_string(),
    })?;
    match r {
        // A success before the host finished sending means the agent stopped early.
        Ok(_) => Err(AgentError::Protocol {
            what: "receive files",
            detail: "the agent finished before the archive was sent".into(),
        }),
        Err(e) => Err(e),
    }
}

/// One output event of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event.
    Exit(ExitStatus),
}

/// Everything an exec printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A running process in the guest. Read its output with [`ExecSession::next_event`] (or
/// [`ExecSession::output`], [`ExecSession::pipe`], [`ExecSession::wait`]) while feeding stdin from
/// another task: like a local process, a session whose output is not read eventually stops
/// consuming stdin. Dropping the session before the exit kills the process group.
#[derive(Debug)]
pub struct ExecSession {
    pid: u32,
    rd: OwnedReadHalf,
    wr: Arc<Mutex<OwnedWriteHalf>>,
    stdin: Option<ExecStdin>,
    exited: Option<ExitStatus>,
}

impl ExecSession {
    /// The guest pid of the process (also its process group and session id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the stdin writer (only when the request set `stdin: true`). If it is never taken,
    /// [`wait`](Self::wait), [`output`](Self::output) and [`pipe`](Self::pipe) close stdin first.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// A handle to resize the terminal or send signals, usable from other tasks.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            wr: self.wr.clone(),
        }
    }

    /// The next output chunk or the exit; `None` after the exit was returned.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.exited.is_some() {
            return Ok(None);
        }
        let what = "stream the command's output";
        let frame = read_frame(&mut self.rd)
            .await
            .map_err(AgentError::io(what))?
            .ok_or_else(|| AgentError::Protocol {
                what,
                detail: "the agent closed the connection before the command's exit status".into(),
            })?;
        Ok(Some(match frame.kind {
            FrameKind::Stdout => ExecEvent::Stdout(frame.payload),
            FrameKind::Stderr => ExecEvent::Stderr(frame.payload),
            FrameKind::Exit => {
                let st: ExitStatus = frame.json().map_err(|e| AgentError::Protocol {
                    what,
                    detail: e.to_string(),
                })?;
                self.exited = Some(st);
                ExecEvent::Exit(st)
            }
            FrameKind::Error => {
                let e: RemoteError = frame.json().map_err(|e| AgentError::Protocol {
                    what,
                    detail: e.to_string(),
                })?;
                return Err(AgentError::Remote {
                    what: "run the command",
                    message: e.message,
                });
            }
            k => {
                return Err(AgentError::Protocol {
                    what,
                    detail: format!("unexpected {k:?} frame"),
                })
            }
        }))
    }

    /// Waits for the exit, discarding output.
    pub async fn wait(self) -> Result<ExitStatus, AgentError> {
        self.pipe(&mut tokio::io::sink(), &mut tokio::io::sink())
            .await
    }

    /// Waits for the exit, collecting stdout and stderr.
    pub async fn output(self) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.pipe(&mut stdout, &mut stderr).await?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }

    /// Copies output to `stdout` and `stderr` (flushing after each chunk) until the exit.
    pub async fn pipe<O, E>(
        mut self,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitStatus, AgentError>
    where
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        if let Some(stdin) = self.stdin.take() {
            stdin.close().await?;
        }
        let what = "write the command's output locally";
        while let Some(ev) = self.next_event().await? {
            match ev {
                ExecEvent::Stdout(b) => {
                    stdout.write_all(&b).await.map_err(AgentError::io(what))?;
                    stdout.flush().await.map_err(AgentError::io(what))?;
                }
                ExecEvent::Stderr(b) => {
                    stderr.write_all(&b).await.map_err(AgentError::io(what))?;
                    stderr.flush().await.map_err(AgentError::io(what))?;
                }
                ExecEvent::Exit(st) => return Ok(st),
            }
        }
        self.exited.ok_or_else(|| AgentError::Protocol {
            what: "stream the command's output",
            detail: "no exit status".into(),
        })
    }
}

/// Writes to a guest process's stdin. Dropping it without [`close`](Self::close) leaves the
/// process's stdin open.
#[derive(Debug)]
pub struct ExecStdin {
    wr: Arc<Mutex<OwnedWriteHalf>>,
}

impl ExecStdin {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        let mut wr = self.wr.lock().await;
        for chunk in data.chunks(DATA_CHUNK) {
            write_frame(&mut *wr, FrameKind::Stdin, chunk)
                .await
                .map_err(AgentError::io("send stdin"))?;
        }
        Ok(())
    }

    /// Closes the process's stdin (end of file). With a tty this is ignored by the agent: send
    /// the terminal's EOF character (`^D`) instead.
    pub async fn close(self) -> Result<(), AgentError> {
        let mut wr = self.wr.lock().await;
        write_frame(&mut *wr, FrameKind::StdinEof, &[])
            .await
            .map_err(AgentError::io("close stdin"))
    }

    /// Copies `input` to stdin until its end, then closes stdin. Returns the bytes copied.
    pub async fn copy_from<R: AsyncRead + Unpin>(
        mut self,
        mut input: R,
    ) -> Result<u64, AgentError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = input
                .read(&mut buf)
                .await
                .map_err(AgentError::io("read local stdin"))?;
            if n == 0 {
                break;
            }
            self.write(&buf[..n]).await?;
            total += n as u64;
        }
        self.close().await?;
        Ok(total)
    }
}

/// Resizes an exec's terminal or signals its process group.
#[derive(Debug, Clone)]
pub struct ExecControl {
    wr: Arc<Mutex<OwnedWriteHalf>>,
}

impl ExecControl {
    pub async fn resize(&self, size: WindowSize) -> Result<(), AgentError> {
        let mut wr = self.wr.lock().await;
        write_json(&mut *wr, FrameKind::Resize, &size)
            .await
            .map_err(AgentError::io("resize the terminal"))
    }

    /// Sends signal number `signal` to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let mut wr = self.wr.lock().await;
        write_json(&mut *wr, FrameKind::Signal, &SignalRequest { signal })
            .await
            .map_err(AgentError::io("send a signal"))
    }
}

/// A tar archive streamed from the guest. Reading fails if the agent reports an error midway or
/// the connection ends before the end of the archive.
#[derive(Debug)]
pub struct TarReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl AsyncRead for TarReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.cur.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.cur.len().min(buf.remaining());
        buf.put_slice(&self.cur.split_to(n));
        Poll::Ready(Ok(()))
    }
}
