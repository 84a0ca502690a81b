//! `wick kernel ...`: the daemon's managed guest kernels (list, show, import, pull, delete).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use wick_model::api::{
    ConfigView, DriverState, ImportRequest, KernelFeature, KernelFormat, KernelList, KernelView,
    PullKernelRequest,
};

use super::image::{absolute, delete_all, out_json_sorted, ListArgs, NameArg};
use super::{out, outln, Ctx};
use crate::client::encode_segment;
use crate::progress::run_artifact_job;
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

pub async fn run(ctx: &Ctx, cmd: KernelCommand) -> Result<()> {
    let client = ctx.client();
    match cmd {
        KernelCommand::List(a) => {
            let list: KernelList = client.get("/v1/kernels").await?;
            if a.json {
                return out_json_sorted(&list);
            }
            let names: Vec<&str> = list.kernels.iter().map(|x| x.name.as_str()).collect();
            let config: ConfigView = client.get("/v1/config").await?;
            if let Some(note) = render::first_use_note("kernel", &names, &config.config) {
                eprintln!("{note}");
            }
            if list.kernels.is_empty() {
                return Ok(());
            }
            out(&kernel_table(&list.kernels, render::now_unix()))
        }
        KernelCommand::Show(a) => {
            let kernel: KernelView = client.get(&kernel_path(&a.name)).await?;
            out_json_sorted(&kernel)
        }
        KernelCommand::Import(a) => {
            let req = ImportRequest {
                path: absolute(&a.path)?,
                name: a.name,
            };
            let made = run_artifact_job(&client, "/v1/kernels/import", &req).await?;
            print_kernel(made.kernel, a.json)
        }
        KernelCommand::Pull(a) => {
            let req = PullKernelRequest {
                url: a.url,
                sha256: a.sha256,
                name: a.name,
            };
            let made = run_artifact_job(&client, "/v1/kernels/pull", &req).await?;
            print_kernel(made.kernel, a.json)
        }
        KernelCommand::Delete(a) => {
            delete_all::<KernelView>(ctx, &a.names, a.json, kernel_path).await
        }
    }
}

fn kernel_path(name: &str) -> String {
    format!("/v1/kernels/{}", encode_segment(name))
}

fn print_kernel(kernel: Option<KernelView>, json: bool) -> Result<()> {
    let k = kernel.context("wickd's import/pull operation reported no kernel")?;
    if json {
        return out_json_sorted(&k);
    }
    for w in &k.warnings {
        eprintln!("warning: {w}");
    }
    outln(&format!(
        "{}  {}  {}",
        k.name,
        k.version,
        if k.needs_initramfs {
            "initramfs"
        } else {
            "no initramfs"
        }
    ))
}

/// `elf`, `bzimage`, `deb`: the format as the API spells it.
fn format_text(f: KernelFormat) -> &'static str {
    match f {
        KernelFormat::Elf => "elf",
        KernelFormat::BzImage => "bzimage",
        KernelFormat::Deb => "deb",
    }
}

fn kernel_table(kernels: &[KernelView], now: i64) -> String {
    render::table(
        &[
            "NAME",
            "VERSION",
            "FROM",
            "INITRAMFS",
            "ENTRY",
            "DRIVERS",
            "USED BY",
            "IMPORTED",
        ],
        kernels
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.version.clone(),
                    format_text(r.source_format).into(),
                    if r.needs_initramfs { "yes" } else { "no" }.into(),
                    if r.has_pvh_note { "pvh" } else { "elf" }.into(),
                    drivers_text(&r.features),
                    render::names_or_dash(&r.used_by),
                    render::relative_age(now - r.imported_at as i64),
                ]
            })
            .collect(),
    )
}

/// `blk:M net:M vsock:M console:B …`: B built in, M module, - missing, ? unknown (a kernel
/// imported without modules, assumed built in).
fn drivers_text(features: &[KernelFeature]) -> String {
    if features.is_empty() {
        return "-".into();
    }
    features
        .iter()
        .map(|f| {
            let short = f.feature.trim_start_matches("virtio-");
            let mark = match f.state {
                DriverState::Builtin => "B",
                DriverState::Module => "M",
                DriverState::Missing => "-",
                DriverState::Unknown => "?",
            };
            format!("{short}:{mark}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_columns() {
        let rows: Vec<KernelView> = serde_json::from_value(serde_json::json!([{
            "name": "default", "version": "6.1.0-28-cloud-amd64", "sha256": "ab",
            "source_format": "deb", "vmlinux": "/k/vmlinux", "bzimage": null,
            "compression": null, "initrd": null, "modules_dir": null, "has_pvh_note": true,
            "needs_initramfs": true, "initrd_modules": [], "builtin_drivers": [],
            "warnings": [], "imported_at": 1000, "used_by": [],
            "features": [{"feature": "virtio-blk", "driver": "virtio_blk", "state": "module"},
                         {"feature": "vsock", "driver": "v", "state": "builtin"}]
        }]))
        .unwrap();
        let t = kernel_table(&rows, 1000 + 7200);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .contains("default   6.1.0-28-cloud-amd64   deb    yes         pvh     blk:M vsock:B   -         2h ago"),
            "{t}"
        );
        assert_eq!(kernel_path("k"), "/v1/kernels/k");
        // The table spells formats as the JSON does.
        for f in [KernelFormat::Elf, KernelFormat::BzImage, KernelFormat::Deb] {
            assert_eq!(
                serde_json::to_value(f).unwrap(),
                serde_json::json!(format_text(f))
            );
        }
    }
}
