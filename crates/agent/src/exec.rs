//! Exec: run a process as a user, with pipes or a PTY, streaming stdio over the connection.
//!
//! The process runs in its own session (`setsid`), so its pid is also its process group:
//! `Signal` frames and a vanished host (connection closed before the exit) signal the whole group.
//! After the process exits, output is drained until every writer closed it, or until no output
//! arrived for [`DRAIN_IDLE`] (a background child may hold stdout open forever).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use wick_agent_proto::{
    read_frame, write_frame, ExecRequest, ExecStarted, ExitStatus, FrameKind, RemoteError,
    SignalRequest, WindowSize,
};

use crate::server::reply;
use crate::vsock::FdStream;

/// After the exit, stop waiting for output once none arrived for this long.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// After sending the exit, how long to wait for the host to close the connection.
const LINGER: Duration = Duration::from_secs(5);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the process runs as.
struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    name: String,
    home: String,
    shell: String,
}

fn resolve_user(spec: Option<&str>) -> Result<Identity, RemoteError> {
    let spec = spec.unwrap_or("root");
    let numeric = spec.parse::<u32>().ok();
    let found = match numeric {
        Some(n) => User::from_uid(Uid::from_raw(n)),
        None => User::from_name(spec),
    }
    .map_err(|e| RemoteError::new(format!("looking up user {spec:?}: {e}")))?;
    match (found, numeric) {
        (Some(u), _) => {
            let cname = CString::new(u.name.clone())
                .map_err(|_| RemoteError::new(format!("bad user name {:?}", u.name)))?;
            let groups = nix::unistd::getgrouplist(&cname, u.gid)
                .map(|g| g.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_else(|_| vec![u.gid.as_raw()]);
            Ok(Identity {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups,
                name: u.name,
                home: u.dir.to_string_lossy().into_owned(),
                shell: u.shell.to_string_lossy().into_owned(),
            })
        }
        (None, n) => {
            let n = match (n, spec) {
                (Some(n), _) => n,
                (None, "root") => 0,
                (None, _) => {
                    return Err(RemoteError::new(format!(
                        "there is no user {spec:?} in the guest (pass a user that exists in \
                         /etc/passwd, or a numeric uid)"
                    )))
                }
            };
            Ok(Identity {
                uid: n,
                gid: n,
                groups: vec![n],
                name: if n == 0 { "root".into() } else { n.to_string() },
                home: if n == 0 { "/root".into() } else { "/".into() },
                shell: "/bin/sh".into(),
            })
        }
    }
}

/// Everything decided before forking.
struct Plan {
    id: Identity,
    cwd: String,
    env: Vec<(String, String)>,
    /// Whether to drop privileges in the child.
    switch_user: bool,
}

fn plan(req: &ExecRequest) -> Result<Plan, RemoteError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(RemoteError::new("exec needs a command (argv is empty)"));
    }
    let id = resolve_user(req.user.as_deref())?;
    let me = nix::unistd::geteuid().as_raw();
    let switch_user = id.uid != me || id.gid != nix::unistd::getegid().as_raw();
    if switch_user && me != 0 {
        return Err(RemoteError::new(format!(
            "the agent runs as uid {me} and cannot run commands as {} (uid {})",
            id.name, id.uid
        )));
    }
    let cwd = match &req.cwd {
        Some(c) => {
            if !Path::new(c).is_dir() {
                return Err(RemoteError::new(format!(
                    "the working directory {c} does not exist in the guest"
                )));
            }
            c.clone()
        }
        None if Path::new(&id.home).is_dir() => id.home.clone(),
        None => "/".into(),
    };
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), id.home.clone()),
        ("USER".into(), id.name.clone()),
        ("LOGNAME".into(), id.name.clone()),
        ("SHELL".into(), id.shell.clone()),
        ("PATH".into(), DEFAULT_PATH.into()),
    ];
    if req.tty.is_some() {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RemoteError::new(format!(
                "invalid environment variable {k:?} (names must be non-empty without '=')"
            )));
        }
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    Ok(Plan {
        id,
        cwd,
        env,
        switch_user,
    })
}

/// A PTY pair with both ends close-on-exec (the slave is dup'ed onto the child's stdio).
fn open_pty(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: posix_openpt/open returned these fds and nothing else owns them.
    let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_winsize(master.as_raw_fd(), size)?;
    Ok((master, slave))
}

fn set_winsize(fd: RawFd, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

type Sink = Box<dyn AsyncWrite + Send + Unpin>;
type Source = Box<dyn AsyncRead + Send + Unpin>;
type Sources = Vec<(FrameKind, Source)>;

/// Runs one exec conversation on a connection whose request was already read.
pub async fn run<R, W>(req: ExecRequest, rd: R, mut wr: W) -> io::Result<()>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let Some((mut child, master)) = start(&req, &mut wr).await? else {
        return Ok(()); // the error is sent
    };
    let pid = child.id().unwrap_or(0);
    reply(&mut wr, Ok(ExecStarted { pid })).await?;
    tracing::debug!("exec pid {pid}: {:?}", req.argv);

    let (sources, sink, tty_fd) = stdio(master, &mut child)?;

    let (tx, writer) = frame_writer(wr);
    let base = Instant::now();
    let last_output = Arc::new(AtomicU64::new(0));
    let mut pumps = JoinSet::new();
    for (kind, src) in sources {
        pumps.spawn(pump(src, kind, tx.clone(), base, last_output.clone()));
    }
    let mut input = tokio::spawn(input(rd, sink, tty_fd, pid as i32));

    let status = tokio::select! {
        st = child.wait() => st,
        _ = &mut input => {
            // The host went away before the exit: end the process group.
            tracing::info!("exec pid {pid}: host disconnected; killing its process group");
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let st = child.wait().await;
            pumps.abort_all();
            drop(tx);
            let _ = writer.await;
            return st.map(|_| ());
        }
    };

    drain(&mut pumps, base, &last_output).await;
    pumps.abort_all();
    let _ = tx.send(exit_frame(status, pid)?).await;
    drop(tx);
    let _ = writer.await;
    // The exit is sent and our side shut down. Keep reading until the host closes (it does once
    // it has the exit), bounded: closing a socket with unread frames in it (a late end of stdin)
    // resets the connection, and a reset may overtake the exit on its way to the host.
    if tokio::time::timeout(LINGER, &mut input).await.is_err() {
        input.abort();
    }
    Ok(())
}

/// Plans and spawns the process of `req`; returns it with the PTY's master, or `None` once the
/// reason it cannot run was sent to the host.
async fn start<W>(
    req: &ExecRequest,
    wr: &mut W,
) -> io::Result<Option<(tokio::process::Child, Option<OwnedFd>)>>
where
    W: AsyncWrite + Send + Unpin,
{
    let plan = match plan(req) {
        Ok(p) => p,
        Err(e) => return reply::<(), _>(wr, Err(e)).await.map(|_| None),
    };
    let pty = match req.tty.map(open_pty).transpose() {
        Ok(p) => p,
        Err(e) => {
            let e = RemoteError::new(format!("cannot allocate a pseudo-terminal: {e}"));
            return reply::<(), _>(wr, Err(e)).await.map(|_| None);
        }
    };
    let (mut cmd, master) = command(req, &plan, pty)?;
    let spawned = cmd.spawn();
    drop(cmd); // closes our copies of the PTY slave
    match spawned {
        Ok(child) => Ok(Some((child, master))),
        Err(e) => {
            let e = RemoteError::new(format!(
                "cannot run {:?} as {} in {}: {e}",
                req.argv[0], plan.id.name, plan.cwd
            ));
            reply::<(), _>(wr, Err(e)).await.map(|_| None)
        }
    }
}

/// One writer serializes all frames to the host; it shuts the connection's write side down
/// once every sender is gone.
fn frame_writer<W>(
    mut wr: W,
) -> (
    mpsc::Sender<(FrameKind, Bytes)>,
    tokio::task::JoinHandle<()>,
)
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(FrameKind, Bytes)>(16);
    let writer = tokio::spawn(async move {
        while let Some((kind, data)) = rx.recv().await {
            if write_frame(&mut wr, kind, &data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    (tx, writer)
}

/// The command of `req` as planned: its stdio (the PTY's slave, or pipes), and a child that
/// starts its own session with a login's umask, as the planned user. Returns the PTY's master.
fn command(
    req: &ExecRequest,
    plan: &Plan,
    pty: Option<(OwnedFd, OwnedFd)>,
) -> io::Result<(tokio::process::Command, Option<OwnedFd>)> {
    let mut cmd = tokio::process::Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd);
    let mut master = None;
    match pty {
        Some((m, slave)) => {
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            master = Some(m);
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
    }
    let switch = plan
        .switch_user
        .then(|| (plan.id.uid, plan.id.gid, plan.id.groups.clone()));
    let with_tty = req.tty.is_some();
    // SAFETY: the closure runs in the forked child and only makes async-signal-safe syscalls on
    // data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // A login's usual umask, whoever started the agent (in tests: wickd, with 077).
            libc::umask(0o022);
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &switch {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok((cmd, master))
}

/// The child's output sources, its input sink, and the PTY's fd (for window size changes).
fn stdio(
    master: Option<OwnedFd>,
    child: &mut tokio::process::Child,
) -> io::Result<(Sources, Option<Sink>, Option<RawFd>)> {
    let mut sources: Sources = Vec::new();
    Ok(match master {
        Some(m) => {
            let stream = FdStream::new(m, true)?;
            let tty_fd = Some(stream.raw_fd());
            let (r, w) = tokio::io::split(stream);
            sources.push((FrameKind::Stdout, Box::new(r)));
            (sources, Some(Box::new(w)), tty_fd)
        }
        None => {
            if let Some(o) = child.stdout.take() {
                sources.push((FrameKind::Stdout, Box::new(o)));
            }
            if let Some(e) = child.stderr.take() {
                sources.push((FrameKind::Stderr, Box::new(e)));
            }
            let sink = child.stdin.take().map(|s| Box::new(s) as Sink);
            (sources, sink, None)
        }
    })
}

/// After the exit, waits until every pump hit EOF, or output went quiet for [`DRAIN_IDLE`].
async fn drain(pumps: &mut JoinSet<()>, base: Instant, last_output: &AtomicU64) {
    loop {
        match tokio::time::timeout(DRAIN_IDLE, pumps.join_next()).await {
            Ok(None) => break,
            Ok(Some(_)) => continue,
            Err(_) => {
                let idle_ms =
                    base.elapsed().as_millis() as u64 - last_output.load(Ordering::Relaxed);
                if idle_ms >= DRAIN_IDLE.as_millis() as u64 {
                    break;
                }
            }
        }
    }
}

/// The frame that ends the conversation: the exit status, or why it is unknown.
fn exit_frame(
    status: io::Result<std::process::ExitStatus>,
    pid: u32,
) -> io::Result<(FrameKind, Bytes)> {
    Ok(match status {
        Ok(st) => {
            let exit = ExitStatus {
                code: st.code(),
                signal: st.signal(),
            };
            tracing::debug!("exec pid {pid}: {exit:?}");
            (FrameKind::Exit, serde_json::to_vec(&exit)?.into())
        }
        Err(e) => (
            FrameKind::Error,
            serde_json::to_vec(&RemoteError::new(format!("waiting for pid {pid}: {e}")))?.into(),
        ),
    })
}

/// Copies one output stream into frames.
async fn pump(
    mut src: Source,
    kind: FrameKind,
    tx: mpsc::Sender<(FrameKind, Bytes)>,
    base: Instant,
    last_output: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                last_output.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                if tx
                    .send((kind, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

/// Applies the host's frames (stdin, resize, signals) until the host closes the connection.
async fn input<R: AsyncRead + Unpin>(
    mut rd: R,
    mut sink: Option<Sink>,
    tty_fd: Option<RawFd>,
    pgid: i32,
) {
    loop {
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("exec pid {pgid}: reading from the host: {e}");
                return;
            }
        };
        match frame.kind {
            FrameKind::Stdin => {
                if let Some(s) = sink.as_mut() {
                    if s.write_all(&frame.payload).await.is_err() {
                        sink = None; // the process closed its stdin
                    }
                }
            }
            FrameKind::StdinEof => {
                // A PTY has no half-close: the terminal's EOF character is the user's to send.
                if tty_fd.is_none() {
                    if let Some(mut s) = sink.take() {
                        let _ = s.shutdown().await;
                    }
                }
            }
            FrameKind::Resize => match (frame.json::<WindowSize>(), tty_fd) {
                (Ok(size), Some(fd)) => {
                    if let Err(e) = set_winsize(fd, size) {
                        tracing::warn!("exec pid {pgid}: resize failed: {e}");
                    }
                }
                (Ok(_), None) => {}
                (Err(e), _) => tracing::warn!("exec pid {pgid}: {e}"),
            },
            FrameKind::Signal => match frame.json::<SignalRequest>() {
                Ok(SignalRequest { signal }) => match Signal::try_from(signal) {
                    Ok(sig) => {
                        let _ = killpg(Pid::from_raw(pgid), sig);
                    }
                    Err(_) => tracing::warn!("exec pid {pgid}: unknown signal {signal}"),
                },
                Err(e) => tracing::warn!("exec pid {pgid}: {e}"),
            },
            k => tracing::warn!("exec pid {pgid}: ignoring an unexpected {k:?} frame"),
        }
    }
}
