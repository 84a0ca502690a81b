//! `wick doctor`.

use anyhow::Result;
use wick_model::api::{CheckStatus, DoctorReport};

use super::{out, out_json, Ctx};
use crate::cli::JsonArgs;
use crate::render;
use crate::Exit;

pub async fn run(ctx: &Ctx, args: JsonArgs) -> Result<()> {
    let report: DoctorReport = ctx.client().get("/v1/doctor").await?;
    if args.json {
        out_json(&report)?;
    } else {
        out(&render::doctor(&report))?;
    }
    if report.worst() == CheckStatus::Fail {
        return Err(Exit(1).into());
    }
    Ok(())
}
