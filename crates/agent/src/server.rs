//! One connection = one request: read the envelope, check the protocol version, dispatch.

pub(crate) mod pid1;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use wick_agent_proto::{
    read_frame, write_json, Envelope, FrameKind, RemoteError, Reply, Request, ShutdownReply,
    PROTOCOL_VERSION,
};

/// What a connection handler needs to know about this agent.
#[derive(Debug)]
pub struct Ctx {
    /// Filesystem root for `Configure` (`/` in a guest, a temp dir in tests).
    pub root: PathBuf,
    /// Whether `Configure` changes the running system (hostname, network, sshd).
    pub live: bool,
    /// Whether `Shutdown` really syncs and powers off.
    pub poweroff: bool,
}

impl Ctx {
    /// `guest_path` (absolute) below the configured root.
    pub fn path(&self, guest_path: &str) -> PathBuf {
        self.root.join(guest_path.trim_start_matches('/'))
    }
}

/// How long a client may take to send its request after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one connection.
pub async fn serve<S>(ctx: Arc<Ctx>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let frame = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut rd)).await {
        Ok(Ok(Some(f))) if f.kind == FrameKind::Request => f,
        Ok(Ok(Some(f))) => {
            tracing::warn!(
                "connection started with a {:?} frame, not a request",
                f.kind
            );
            return;
        }
        Ok(Ok(None)) => return, // a probe that connected and left
        Ok(Err(e)) => {
            tracing::warn!("reading a request failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("no request within {REQUEST_TIMEOUT:?}; closing the connection");
            return;
        }
    };
    let env: Envelope = match frame.json() {
        Ok(env) => env,
        Err(e) => {
            let _ = reply::<(), _>(
                &mut wr,
                Err(RemoteError::new(format!(
                "cannot decode the request (is the host's wick newer than this agent, {}?): {e}",
                wick_agent_proto::AGENT_VERSION
            ))),
            )
            .await;
            return;
        }
    };
    // Hello is always answered so the host can see the version mismatch and say so.
    if env.protocol != PROTOCOL_VERSION && !matches!(env.request, Request::Hello) {
        let _ = reply::<(), _>(
            &mut wr,
            Err(RemoteError::new(format!(
                "this agent ({}) speaks protocol version {PROTOCOL_VERSION}, the host sent \
                 version {}: rebuild the image with a matching wick-agent",
                wick_agent_proto::AGENT_VERSION,
                env.protocol
            ))),
        )
        .await;
        return;
    }
    let op = op_name(&env.request);
    tracing::debug!("request: {op}");
    let result = match env.request {
        Request::Hello => reply(&mut wr, Ok(crate::sysinfo::hello())).await,
        Request::Health => reply(&mut wr, crate::sysinfo::health()).await,
        Request::Ports => reply(&mut wr, crate::sysinfo::ports()).await,
        Request::Configure(cfg) => {
            let ctx2 = ctx.clone();
            let r = tokio::task::spawn_blocking(move || crate::configure::apply(&ctx2, &cfg))
                .await
                .unwrap_or_else(|e| Err(RemoteError::new(format!("configure panicked: {e}"))));
            reply(&mut wr, r).await
        }
        Request::Exec(req) => crate::exec::run(req, rd, wr).await,
        Request::PutFiles { dest_dir } => crate::files::put(&dest_dir, rd, wr).await,
        Request::GetFiles { path } => crate::files::get(&path, wr).await,
        Request::Shutdown { poweroff } => shutdown(&ctx, poweroff, &mut wr).await,
        Request::Freeze { mountpoints } => {
            let live = ctx.live;
            let r = tokio::task::spawn_blocking(move || crate::freeze::freeze(live, &mountpoints))
                .await
                .unwrap_or_else(|e| Err(RemoteError::new(format!("freeze panicked: {e}"))));
            reply(&mut wr, r).await
        }
        Request::Thaw { mountpoints } => {
            let r = tokio::task::spawn_blocking(move || crate::freeze::thaw(&mountpoints))
                .await
                .unwrap_or_else(|e| Err(RemoteError::new(format!("thaw panicked: {e}"))));
            reply(&mut wr, r).await
        }
    };
    if let Err(e) = result {
        tracing::warn!("{op}: connection failed: {e}");
    }
}

fn op_name(r: &Request) -> &'static str {
    match r {
        Request::Hello => "hello",
        Request::Configure(_) => "configure",
        Request::Exec(_) => "exec",
        Request::PutFiles { .. } => "put_files",
        Request::GetFiles { .. } => "get_files",
        Request::Ports => "ports",
        Request::Health => "health",
        Request::Shutdown { .. } => "shutdown",
        Request::Freeze { .. } => "freeze",
        Request::Thaw { .. } => "thaw",
    }
}

/// Writes a `Reply` frame.
pub async fn reply<T: Serialize, W: AsyncWrite + Unpin>(
    wr: &mut W,
    r: Reply<T>,
) -> std::io::Result<()> {
    if let Err(e) = &r {
        tracing::info!("replying with an error: {e}");
    }
    write_json(wr, FrameKind::Reply, &r).await
}

/// Replies first, then syncs and powers off (or reboots).
async fn shutdown<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    poweroff: bool,
    wr: &mut W,
) -> std::io::Result<()> {
    let action = match (ctx.poweroff, poweroff) {
        (false, _) => "none",
        (true, true) => "poweroff",
        (true, false) => "reboot",
    };
    reply(
        wr,
        Ok(ShutdownReply {
            action: action.into(),
        }),
    )
    .await?;
    let _ = wr.shutdown().await;
    if !ctx.poweroff {
        tracing::info!("shutdown requested (poweroff={poweroff}); disabled by --no-poweroff");
        return Ok(());
    }
    tracing::info!("shutdown requested: syncing, then {action}");
    // Let the reply reach the host before the guest goes away.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::spawn_blocking(move || power_off(poweroff));
    Ok(())
}

fn power_off(poweroff: bool) {
    nix::unistd::sync();
    let systemd = std::fs::read_to_string("/proc/1/comm")
        .map(|c| c.trim() == "systemd")
        .unwrap_or(false);
    if !systemd && crate::server::pid1::is_wick_init() {
        // wick-init is PID 1 (an image without systemd): it stops every process, unmounts and
        // powers off; its signals are systemd's numbers for the same requests.
        match crate::server::pid1::request(if poweroff {
            crate::server::pid1::Request::PowerOff
        } else {
            crate::server::pid1::Request::Reboot
        }) {
            Ok(()) => return,
            Err(e) => tracing::warn!("cannot signal wick-init: {e}; forcing"),
        }
    }
    if systemd {
        let verb = if poweroff { "poweroff" } else { "reboot" };
        match std::process::Command::new("systemctl").arg(verb).status() {
            Ok(s) if s.success() => return,
            Ok(s) => tracing::warn!("systemctl {verb} failed ({s}); forcing"),
            Err(e) => tracing::warn!("cannot run systemctl {verb}: {e}; forcing"),
        }
        nix::unistd::sync();
    }
    let mode = if poweroff {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    } else {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    };
    let Err(e) = nix::sys::reboot::reboot(mode);
    tracing::error!("reboot({mode:?}) failed: {e}");
}
