//! `wick daemon status|stop|install|uninstall`: never start the daemon.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use wick_model::api::DaemonStatus;

use super::{out, out_json, outln, service, Ctx};
use crate::cli::DaemonCommand;
use crate::client::DaemonUnreachable;
use crate::render;

pub async fn run(ctx: &Ctx, cmd: DaemonCommand) -> Result<()> {
    match cmd {
        DaemonCommand::Status(args) => {
            let st: DaemonStatus = ctx.client_no_autostart().get("/v1/daemon/status").await?;
            if args.json {
                out_json(&st)
            } else {
                out(&render::daemon_status(&st))
            }
        }
        DaemonCommand::Stop => stop(ctx).await,
        DaemonCommand::Install(args) => {
            service::install(&service::Target::new(args.fs_root, &ctx.paths))
        }
        DaemonCommand::Uninstall(args) => {
            service::uninstall(&service::Target::new(args.fs_root, &ctx.paths))
        }
    }
}

async fn stop(ctx: &Ctx) -> Result<()> {
    let client = ctx.client_no_autostart();
    if let Err(e) = client.post_ignore("/v1/daemon/stop").await {
        if e.downcast_ref::<DaemonUnreachable>().is_some() {
            return outln(&format!(
                "wickd is not running (nothing listens on {})",
                ctx.socket.display()
            ));
        }
        return Err(e);
    }
    // The daemon answers before exiting: wait until the socket stops accepting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(&ctx.socket).await.is_ok() {
        if Instant::now() >= deadline {
            bail!(
                "wickd accepted the stop request but still answers on {} after 10 s",
                ctx.socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outln("wickd stopped (VMs keep running)")
}
