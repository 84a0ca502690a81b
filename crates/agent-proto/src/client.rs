//! The host side: [`AgentChannel`] and [`AgentClient`] speak to a guest's agent over any
//! [`Connector`] — the VMM's hybrid vsock socket ([`HybridVsockConnector`]) or, in the CLI, an
//! upgraded connection through `wickd`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Mutex};

use crate::frame::{read_frame, write_frame, write_json, FrameKind, DATA_CHUNK};
use crate::msg::*;
use crate::{AgentError, PROTOCOL_VERSION};

/// Pause between attempts while the guest boots.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// The first `Hello` attempt of [`AgentClient::connect`] is bounded by this; each one that times
/// out doubles the bound, up to [`MAX_ATTEMPT_TIMEOUT`].
const FIRST_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(16);
/// Bound on the hybrid-vsock handshake of one connection once the agent is known to be up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes [`ExecSession::output`] collects per stream.
pub const OUTPUT_LIMIT: usize = 64 << 20;
/// Bound on waiting for a request's (first) reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A byte stream connected to the agent (after any transport handshake).
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentStream for T {}

/// A boxed [`AgentStream`], as returned by a [`Connector`].
pub type BoxAgentStream = Box<dyn AgentStream>;

/// The future returned by [`Connector::connect`].
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<BoxAgentStream, AgentError>> + Send + 'a>>;

/// How to open a fresh connection to one guest's agent. Every request uses its own connection,
/// so `connect` is called once per request (possibly concurrently).
pub trait Connector: Send + Sync {
    /// A new stream on which the agent protocol starts right away (no handshake left to do).
    fn connect(&self) -> ConnectFuture<'_>;

    /// What this connects to, for messages (e.g. `vsock port 10700 through /run/vm/vsock.sock`).
    fn describe(&self) -> String;
}

/// The VMM's hybrid vsock socket: connect to the Unix socket, `CONNECT <port>\n` → `OK …\n`.
#[derive(Debug, Clone)]
pub struct HybridVsockConnector {
    uds: PathBuf,
    port: u32,
}

impl HybridVsockConnector {
    /// Connects through the VM's hybrid vsock socket `vsock_uds` to guest port `port`.
    pub fn new(vsock_uds: &Path, port: u32) -> HybridVsockConnector {
        HybridVsockConnector {
            uds: vsock_uds.to_path_buf(),
            port,
        }
    }
}

impl Connector for HybridVsockConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&self.uds, self.port))
                .await
                .map_err(|_| AgentError::Timeout {
                    what: "accept the vsock connection",
                    after: HANDSHAKE_TIMEOUT,
                })??;
            Ok(Box::new(s) as BoxAgentStream)
        })
    }

    fn describe(&self) -> String {
        format!("vsock port {} through {}", self.port, self.uds.display())
    }
}

/// A way to talk to one guest's agent, without any I/O until the first call. Cheap to clone;
/// every call opens its own connection through the [`Connector`], so calls may run
/// concurrently. Use [`AgentClient`] to also wait for the agent and check its protocol version
/// first; a channel learns of a version mismatch from the agent's refusal of the first request.
#[derive(Clone)]
pub struct AgentChannel {
    connector: Arc<dyn Connector>,
}

impl std::fmt::Debug for AgentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentChannel")
            .field("connector", &self.connector.describe())
            .finish()
    }
}

/// A client of one guest's agent whose `Hello` succeeded with a matching protocol version.
/// Dereferences to its [`AgentChannel`] for the calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    channel: AgentChannel,
    hello: HelloReply,
}

impl std::ops::Deref for AgentClient {
    type Target = AgentChannel;

    fn deref(&self) -> &AgentChannel {
        &self.channel
    }
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
        Self::with_connector(
            Arc::new(HybridVsockConnector::new(vsock_uds, port)),
            timeout,
        )
        .await
    }

    /// Like [`connect`](Self::connect), over any [`Connector`]: retries `Hello` until the agent
    /// answers or `timeout` passes; fails at once on a protocol version mismatch.
    pub async fn with_connector(
        connector: Arc<dyn Connector>,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let channel = AgentChannel::new(connector);
        let start = Instant::now();
        let deadline = start + timeout;
        // A connection made while the guest's vsock driver is still coming up can hang rather
        // than fail: bound each attempt, and give a slow guest longer on every timed-out one.
        let mut attempt_timeout = FIRST_ATTEMPT_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let this_attempt = remaining.min(attempt_timeout);
            let attempt = tokio::time::timeout(this_attempt, async {
                let (mut rd, _wr) = channel.open(Request::Hello, "say hello").await?;
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
                    return Ok(AgentClient { channel, hello });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    attempt_timeout = (attempt_timeout * 2).min(MAX_ATTEMPT_TIMEOUT);
                    format!("an attempt got no answer within {this_attempt:?}")
                }
            };
            if Instant::now() + RETRY_INTERVAL >= deadline {
                return Err(AgentError::NotReady {
                    target: channel.connector.describe(),
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

    /// The channel the calls go through.
    pub fn channel(&self) -> &AgentChannel {
        &self.channel
    }
}

impl AgentChannel {
    /// A channel opening each connection through `connector`. Does no I/O.
    pub fn new(connector: Arc<dyn Connector>) -> AgentChannel {
        AgentChannel { connector }
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
        Ok(TarReader::new(rx))
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

    /// Freezes the guest filesystems at `mountpoints` (FIFREEZE); returns those frozen.
    pub async fn freeze(&self, mountpoints: Vec<String>) -> Result<Vec<String>, AgentError> {
        self.call(Request::Freeze { mountpoints }, "freeze filesystems")
            .await
    }

    /// Thaws filesystems frozen by [`AgentClient::freeze`]; returns those thawed.
    pub async fn thaw(&self, mountpoints: Vec<String>) -> Result<Vec<String>, AgentError> {
        self.call(Request::Thaw { mountpoints }, "thaw filesystems")
            .await
    }

    /// Opens one connection and sends the request frame.
    async fn open(&self, request: Request, what: &'static str) -> Result<(Rd, Wr), AgentError> {
        let stream = self.connector.connect().await?;
        let (rd, mut wr) = tokio::io::split(stream);
        let env = Envelope {
            protocol: PROTOCOL_VERSION,
            request,
        };
        write_json(&mut wr, FrameKind::Request, &env)
            .await
            .map_err(AgentError::io(what))?;
        Ok((rd, wr))
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

type Rd = ReadHalf<BoxAgentStream>;
type Wr = WriteHalf<BoxAgentStream>;

/// Firecracker's hybrid vsock handshake: `CONNECT <port>\n` → `OK <hostport>\n`.
async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let err = |detail: String| AgentError::Connect {
        path: uds.to_path_buf(),
        port,
        detail,
    };
    let mut s = crate::uds::connect_nofollow(uds)
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
    rd: &mut Rd,
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
pub struct ExecSession {
    pid: u32,
    rd: Rd,
    wr: Arc<Mutex<Wr>>,
    stdin: Option<ExecStdin>,
    exited: Option<ExitStatus>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession")
            .field("pid", &self.pid)
            .field("stdin", &self.stdin.is_some())
            .field("exited", &self.exited)
            .finish_non_exhaustive()
    }
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

    /// Waits for the exit, collecting stdout and stderr, each up to [`OUTPUT_LIMIT`] bytes (see
    /// [`output_limited`](Self::output_limited)).
    pub async fn output(self) -> Result<ExecOutput, AgentError> {
        self.output_limited(OUTPUT_LIMIT).await
    }

    /// Waits for the exit, collecting stdout and stderr. The guest decides how much it prints,
    /// so more than `max` bytes on either stream is an error (and dropping the session kills
    /// the process) rather than unbounded memory on the host.
    pub async fn output_limited(mut self, max: usize) -> Result<ExecOutput, AgentError> {
        if let Some(stdin) = self.stdin.take() {
            stdin.close().await?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(ev) = self.next_event().await? {
            let (buf, name, chunk) = match ev {
                ExecEvent::Stdout(b) => (&mut stdout, "stdout", b),
                ExecEvent::Stderr(b) => (&mut stderr, "stderr", b),
                ExecEvent::Exit(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            };
            if buf.len() + chunk.len() > max {
                return Err(AgentError::Protocol {
                    what: "collect the command's output",
                    detail: format!(
                        "the command printed more than {max} bytes on {name}; not buffering more"
                    ),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Err(AgentError::Protocol {
            what: "stream the command's output",
            detail: "no exit status".into(),
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
pub struct ExecStdin {
    wr: Arc<Mutex<Wr>>,
}

impl std::fmt::Debug for ExecStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStdin").finish_non_exhaustive()
    }
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
#[derive(Clone)]
pub struct ExecControl {
    wr: Arc<Mutex<Wr>>,
}

impl std::fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecControl").finish_non_exhaustive()
    }
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
pub type TarReader = crate::pipe::ChunkReader;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connector over in-memory pipes; the "agent" answers `Hello` and `Health`, refuses
    /// the first `refuse` connections by closing them, and leaves the next `hang` unanswered.
    struct Pipes {
        refuse: usize,
        hang: usize,
        opened: AtomicUsize,
    }

    impl Connector for Pipes {
        fn connect(&self) -> ConnectFuture<'_> {
            Box::pin(async move {
                let n = self.opened.fetch_add(1, Ordering::SeqCst);
                let (host, mut agent) = tokio::io::duplex(64 * 1024);
                if n < self.refuse {
                    drop(agent);
                    return Ok(Box::new(host) as BoxAgentStream);
                }
                if n < self.refuse + self.hang {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(agent);
                    });
                    return Ok(Box::new(host) as BoxAgentStream);
                }
                tokio::spawn(async move {
                    let f = read_frame(&mut agent).await.unwrap().unwrap();
                    let env: Envelope = f.json().unwrap();
                    match env.request {
                        Request::Hello => {
                            let r: Reply<HelloReply> = Ok(HelloReply {
                                agent_version: "test".into(),
                                protocol_version: PROTOCOL_VERSION,
                                boot_id: "b".into(),
                                hostname: "h".into(),
                                kernel: "k".into(),
                            });
                            write_json(&mut agent, FrameKind::Reply, &r).await.unwrap();
                        }
                        _ => {
                            let r: Reply<()> = Err(RemoteError::new("unsupported here"));
                            write_json(&mut agent, FrameKind::Reply, &r).await.unwrap();
                        }
                    }
                });
                Ok(Box::new(host) as BoxAgentStream)
            })
        }

        fn describe(&self) -> String {
            "in-memory pipes".into()
        }
    }

    #[tokio::test]
    async fn any_stream_works_and_connect_retries() {
        let c = Arc::new(Pipes {
            refuse: 2,
            hang: 0,
            opened: AtomicUsize::new(0),
        });
        let client = AgentClient::with_connector(c.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.agent_info().hostname, "h");
        assert_eq!(
            c.opened.load(Ordering::SeqCst),
            3,
            "two refusals, then hello"
        );
        // Calls go through the channel, one connection each.
        assert_eq!(client.hello().await.unwrap().boot_id, "b");
        let e = client.channel().health().await.unwrap_err();
        assert!(e.to_string().contains("unsupported here"), "{e}");
        assert_eq!(c.opened.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn not_ready_names_the_connector() {
        let c = Arc::new(Pipes {
            refuse: usize::MAX,
            hang: 0,
            opened: AtomicUsize::new(0),
        });
        let e = AgentClient::with_connector(c, Duration::from_millis(120))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::NotReady { .. }), "{e}");
        assert!(e.to_string().contains("in-memory pipes"), "{e}");
        // A channel does no I/O until used.
        let ch = AgentChannel::new(Arc::new(HybridVsockConnector::new(
            Path::new("/nonexistent/vsock.sock"),
            10700,
        )));
        let e = ch.ports().await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vsock.sock"), "{e}");
    }

    #[tokio::test]
    async fn a_hung_attempt_is_abandoned_and_retried() {
        // A connection made while the guest's vsock comes up may never be answered.
        let c = Arc::new(Pipes {
            refuse: 0,
            hang: 1,
            opened: AtomicUsize::new(0),
        });
        let t = Instant::now();
        let client = AgentClient::with_connector(c.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(client.agent_info().hostname, "h");
        assert_eq!(c.opened.load(Ordering::SeqCst), 2);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }
}
