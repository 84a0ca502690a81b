//! `wick vm snapshot VM --name SNAP` and `wick snapshot list|show|delete`: a VM's whole state
//! (memory, devices, disks) kept by the daemon as an artifact.

use anyhow::Result;
use clap::{Args, Subcommand};
use wick_model::api::Operation;
use wick_model::snapshot::{CreateSnapshotRequest, SnapshotList};
use wick_model::SnapshotRecord;

use super::image::{delete_all, out_json_sorted, DeleteArgs, ListArgs, NameArg};
use super::{out, outln, Ctx};
use crate::client::{encode_segment, vm_path};
use crate::progress::{follow, outcome, Interrupt, View};
use crate::render;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List your snapshots (root sees all).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Print a snapshot's record as JSON.
    Show(NameArg),
    /// Delete snapshots and their files.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
}

/// `wick vm snapshot` flags.
#[derive(Debug, Args)]
pub struct VmSnapshotArgs {
    /// The VM (running or paused; it is left as it was).
    pub vm: String,
    /// Name of the new snapshot (a-z, 0-9 and '-').
    #[arg(long)]
    pub name: String,
    /// Print the new snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `wick vm snapshot`: the operation, followed, then the new snapshot.
pub async fn snapshot_vm(ctx: &Ctx, a: VmSnapshotArgs) -> Result<()> {
    wick_model::validate_vm_name(&a.name)
        .map_err(|e| anyhow::anyhow!(e.to_string().replace("VM name", "snapshot name")))?;
    let client = ctx.client();
    let req = CreateSnapshotRequest { name: a.name };
    let op: Operation = client.post(&vm_path(&a.vm, "/snapshot"), &req).await?;
    let op = follow(&client, op, View::auto(), &Interrupt::install()).await?;
    outcome(op)?;
    let snap: SnapshotRecord = client.get(&snapshot_path(&req.name)).await?;
    if a.json {
        return out_json_sorted(&snap);
    }
    outln(&format!(
        "{}: {} ({}{})",
        snap.name,
        snap.state.as_str(),
        render::bytes(snap.size_bytes),
        if snap.frozen {
            ", filesystems frozen"
        } else {
            ""
        }
    ))
}

pub async fn run(ctx: &Ctx, cmd: SnapshotCommand) -> Result<()> {
    let client = ctx.client();
    match cmd {
        SnapshotCommand::List(a) => {
            let list: SnapshotList = client.get("/v1/snapshots").await?;
            if a.json {
                return out_json_sorted(&list);
            }
            if list.snapshots.is_empty() {
                return Ok(());
            }
            out(&table(&list.snapshots, render::now_unix()))
        }
        SnapshotCommand::Show(a) => {
            let s: SnapshotRecord = client.get(&snapshot_path(&a.name)).await?;
            out_json_sorted(&s)
        }
        SnapshotCommand::Delete(a) => {
            delete_all::<SnapshotRecord>(ctx, &a.names, a.json, snapshot_path).await
        }
    }
}

fn snapshot_path(name: &str) -> String {
    format!("/v1/snapshots/{}", encode_segment(name))
}

fn table(snaps: &[SnapshotRecord], now: i64) -> String {
    render::table(
        &["NAME", "STATE", "FROM VM", "VMM", "SIZE", "CREATED"],
        snaps
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.state.as_str().into(),
                    s.source_vm_name.clone(),
                    s.vmm.clone(),
                    render::bytes(s.size_bytes),
                    render::age(&s.created_at, now),
                ]
            })
            .collect(),
    )
}
