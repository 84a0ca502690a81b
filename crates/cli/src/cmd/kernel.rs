//! `wick kernel ...`: the daemon's managed guest kernels (list, show, import, pull, delete).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};

use super::image::{absolute, delete_all, stream_post, table, users, ListArgs, NameArg};
use super::{out, out_json, outln, Ctx};
use crate::client::encode_segment;
use crate::render;

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// List the managed kernels.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Print a kernel's record as JSON.
    Show(NameArg),
    /// Import an ELF vmlinux, a bzImage/vmlinuz or a distro kernel .deb (kernel + modules).
    ///
    /// Kernels whose virtio/vsock drivers are modules get an initramfs built from wick-init.
    /// Needs root.
    Import(KernelImportArgs),
    /// Download a published kernel file over HTTP(S), verify its sha256 and import it.
    Pull(KernelPullArgs),
    /// Delete kernels (refused while a VM boots them).
    #[command(visible_alias = "rm")]
    Delete(super::image::DeleteArgs),
}

#[derive(Debug, Args)]
pub struct KernelImportArgs {
    /// The kernel file (read by the daemon, so it must be readable by root).
    pub path: PathBuf,
    /// Name of the new kernel (a-z, 0-9, '-', '_', '.').
    #[arg(long)]
    pub name: String,
    /// Print the new kernel as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KernelPullArgs {
    /// http:// or https:// URL of a vmlinux, bzImage or kernel .deb.
    pub url: String,
    /// Expected sha256 of the file (64 hex digits); the download is discarded on mismatch.
    #[arg(long)]
    pub sha256: String,
    /// Name of the new kernel.
    #[arg(long)]
    pub name: String,
    /// Print the new kernel as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The fields of a kernel the table shows (the daemon sends more).
#[derive(Debug, Deserialize)]
struct KernelRow {
    name: String,
    version: String,
    source_format: String,
    needs_initramfs: bool,
    #[serde(default)]
    warnings: Vec<String>,
    imported_at: i64,
    #[serde(default)]
    used_by: Vec<String>,
}

pub async fn run(ctx: &Ctx, cmd: KernelCommand) -> Result<()> {
    match cmd {
        KernelCommand::List(a) => {
            let list: Value = ctx.client().get("/v1/kernels").await?;
            if a.json {
                return out_json(&list);
            }
            let rows: Vec<KernelRow> = serde_json::from_value(list["kernels"].clone())
                .context("wickd sent an unexpected kernel list")?;
            if rows.is_empty() {
                eprintln!("no kernels; `wick kernel import` adds one");
                return Ok(());
            }
            out(&kernel_table(&rows, render::now_unix()))
        }
        KernelCommand::Show(a) => {
            let v: Value = ctx.client().get(&kernel_path(&a.name)).await?;
            out_json(&v)
        }
        KernelCommand::Import(a) => {
            let body = json!({"path": absolute(&a.path)?, "name": a.name});
            let label = format!("import kernel {}", a.name);
            let v = stream_post(ctx, "/v1/kernels/import", &body, &label).await?;
            print_kernel(&v, a.json)
        }
        KernelCommand::Pull(a) => {
            let body = json!({"url": a.url, "sha256": a.sha256, "name": a.name});
            let label = format!("pull kernel {}", a.name);
            let v = stream_post(ctx, "/v1/kernels/pull", &body, &label).await?;
            print_kernel(&v, a.json)
        }
        KernelCommand::Delete(a) => delete_all(ctx, &a.names, a.json, kernel_path).await,
    }
}

fn kernel_path(name: &str) -> String {
    format!("/v1/kernels/{}", encode_segment(name))
}

fn print_kernel(v: &Value, json: bool) -> Result<()> {
    let k = &v["kernel"];
    if json {
        return out_json(k);
    }
    let row: KernelRow =
        serde_json::from_value(k.clone()).context("wickd sent an unexpected kernel")?;
    for w in &row.warnings {
        eprintln!("warning: {w}");
    }
    outln(&format!(
        "{}  {}  {}",
        row.name,
        row.version,
        if row.needs_initramfs {
            "initramfs"
        } else {
            "no initramfs"
        }
    ))
}

fn kernel_table(rows: &[KernelRow], now: i64) -> String {
    table(
        &[
            "NAME",
            "VERSION",
            "FROM",
            "INITRAMFS",
            "USED BY",
            "IMPORTED",
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.version.clone(),
                    r.source_format.clone(),
                    if r.needs_initramfs { "yes" } else { "no" }.into(),
                    users(&r.used_by),
                    render::relative_age(now - r.imported_at),
                ]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_columns() {
        let rows: Vec<KernelRow> = serde_json::from_value(json!([{
            "name": "default", "version": "6.1.0-28-cloud-amd64", "source_format": "deb",
            "needs_initramfs": true, "imported_at": 1000, "used_by": []
        }]))
        .unwrap();
        let t = kernel_table(&rows, 1000 + 7200);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .contains("default   6.1.0-28-cloud-amd64   deb    yes         -         2h ago"),
            "{t}"
        );
        assert_eq!(kernel_path("k"), "/v1/kernels/k");
    }
}
