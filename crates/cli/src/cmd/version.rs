//! `wick version`: never starts the daemon.

use anyhow::Result;
use serde::Serialize;
use wick_model::api::DaemonStatus;

use super::{out, out_json, Ctx};
use crate::cli::JsonArgs;

#[derive(Serialize)]
struct Versions {
    client: &'static str,
    /// `None` when the daemon is not reachable.
    daemon: Option<String>,
}

pub async fn run(ctx: &Ctx, args: JsonArgs) -> Result<()> {
    let daemon = ctx
        .client_no_autostart()
        .get::<DaemonStatus>("/v1/daemon/status")
        .await
        .map(|s| s.version);
    let v = Versions {
        client: env!("CARGO_PKG_VERSION"),
        daemon: daemon.as_ref().ok().cloned(),
    };
    if args.json {
        return out_json(&v);
    }
    let daemon_line = match &daemon {
        Ok(ver) => format!("wickd {ver}"),
        Err(e) => format!("wickd: not reachable ({e:#})"),
    };
    out(&format!("wick {}\n{daemon_line}\n", v.client))
}
