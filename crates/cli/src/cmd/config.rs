//! `wick config show`.

use anyhow::Result;
use wick_model::api::ConfigView;

use super::{out, out_json, Ctx};
use crate::cli::JsonArgs;
use crate::render;

pub async fn show(ctx: &Ctx, args: JsonArgs) -> Result<()> {
    let view: ConfigView = ctx.client().get("/v1/config").await?;
    if args.json {
        return out_json(&view);
    }
    out(&render::config_view(&view)?)
}
