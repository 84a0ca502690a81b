//! `wick-agent`: the guest companion of wick.
//!
//! Runs inside every guest (a systemd unit in wick images), listens on AF_VSOCK port
//! [`wick_agent_proto::AGENT_PORT`] (Firecracker) and on the virtio-serial port `wick.agent`
//! when the VM has one (QEMU; streams multiplexed, see `serial`), and serves the protocol of `wick-agent-proto`: hello, boot-time
//! configuration, exec (pipes or a PTY), tar put/get, listening ports, health and poweroff. Each
//! connection carries one request; connections are served concurrently. Logs go to stderr
//! (journald collects them).
//!
//! For tests on a host without a guest, `--listen-unix PATH` serves on a Unix socket instead of
//! vsock, `--root-prefix DIR` makes `Configure` write below DIR and skip live system changes, and
//! `--no-poweroff` makes `Shutdown` reply without acting.

mod configure;
mod exec;
mod files;
mod freeze;
mod hostkeys;
mod serial;
mod server;
mod sysinfo;
mod vsock;
mod workdisk;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio::net::UnixListener;
use wick_agent_proto::AGENT_PORT;

#[derive(Parser, Debug)]
#[command(
    name = "wick-agent",
    version,
    about = "wick's guest agent (serves the host over vsock)"
)]
struct Args {
    /// vsock port to listen on.
    #[arg(long, default_value_t = AGENT_PORT)]
    port: u32,
    /// Listen on this Unix socket instead of vsock (tests and debugging).
    #[arg(long, value_name = "PATH")]
    listen_unix: Option<PathBuf>,
    /// Test option: apply `Configure` below DIR and skip live changes (hostname, network, sshd).
    #[arg(long, value_name = "DIR", hide = true)]
    root_prefix: Option<PathBuf>,
    /// Test option: answer `Shutdown` without syncing or powering off.
    #[arg(long, hide = true)]
    no_poweroff: bool,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
    let ctx = Arc::new(server::Ctx {
        root: args
            .root_prefix
            .clone()
            .unwrap_or_else(|| PathBuf::from("/")),
        live: args.root_prefix.is_none(),
        poweroff: !args.no_poweroff,
    });
    if ctx.live {
        // Before serving: Configure writes below /root.
        match workdisk::mount() {
            Ok(Some(done)) => tracing::info!("{done}"),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wick-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(args, ctx));
    if let Err(e) = result {
        eprintln!("wick-agent: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args, ctx: Arc<server::Ctx>) -> Result<(), String> {
    let version = wick_agent_proto::AGENT_VERSION;
    if let Some(path) = &args.listen_unix {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on the Unix socket {}: {e}", path.display()))?;
        tracing::info!("wick-agent {version} listening on {}", path.display());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(server::serve(ctx.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    // QEMU guests: the agent channel is a virtio-serial port (it may still be probing).
    let serial = serial::find_port(std::path::Path::new(serial::SYS_PORTS));
    {
        let (ctx, port) = (ctx.clone(), args.port);
        tokio::spawn(async move {
            let dev = serial::wait_for_port(std::path::Path::new(serial::SYS_PORTS)).await;
            serial::serve(dev, port, ctx).await
        });
    }
    let listener = match vsock::VsockListener::bind(args.port) {
        Ok(l) => l,
        Err(e) if serial.is_some() => {
            tracing::info!("wick-agent {version}: no vsock ({e}); serving the virtio-serial port");
            return std::future::pending().await;
        }
        Err(e) => {
            return Err(format!(
                "cannot listen on vsock port {}: {e} (is the vsock transport module loaded in \
                 the guest?), and there is no virtio-serial port named {}",
                args.port,
                wick_agent_proto::mux::PORT_NAME
            ))
        }
    };
    tracing::info!("wick-agent {version} listening on vsock port {}", args.port);
    let mut cid = None;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                vsock::note_cid(&mut cid, vsock::local_cid(stream.raw_fd()));
                tokio::spawn(server::serve(ctx.clone(), stream));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
