//! `wick vm snapshot VM --name SNAP` and `wick snapshot list|show|delete`: a VM's whole state
//! (memory, devices, disks) kept by the daemon as an artifact; `wick vm create --from-snapshot`
//! and `wick vm fork` restore one into new VMs.

use anyhow::Result;
use clap::{Args, Subcommand};
use wick_model::api::Operation;
use wick_model::snapshot::{
    CreateSnapshotRequest, ForkResponse, ForkVmRequest, SnapshotList, MAX_FORKS,
};
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

/// `wick vm fork` flags.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The VM to fork (running or paused; it keeps running as it was).
    pub vm: String,
    /// The fork's name; with --count K the forks are NAME-1 … NAME-K [default: VM-fork-N].
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    pub name: Option<String>,
    /// How many forks to make (1-64).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub count: u32,
    /// Print the forks as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `wick vm create --from-snapshot SNAP`: a create whose spec is the snapshot's; the flags the
/// snapshot decides are refused here already.
pub async fn create_from_snapshot(
    ctx: &Ctx,
    args: &crate::cli::VmSpecArgs,
    snap: String,
    json: bool,
) -> Result<()> {
    let decided = [
        ("--vcpu", args.vcpu.is_some()),
        ("--memory", args.memory.is_some()),
        ("--disk-size", args.disk_size.is_some()),
        ("--image", args.image.is_some()),
        ("--kernel", args.kernel.is_some()),
        ("--init", args.init.is_some()),
    ];
    let bad: Vec<&str> = decided
        .iter()
        .filter(|(_, g)| *g)
        .map(|(f, _)| *f)
        .collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "{} cannot be combined with --from-snapshot: the snapshot decides vcpu, memory,              disk size, image, kernel and init",
            bad.join(", ")
        );
    }
    let mut req = super::vm::create_request(ctx, args, false)?;
    req.from_snapshot = Some(snap);
    let client = ctx.client();
    let interrupt = Interrupt::install();
    let done = super::vm::create_vm(&client, &req, &interrupt).await?;
    let vm = super::vm::outcome_vm(&client, done).await?;
    if json {
        out_json_sorted(&vm)
    } else {
        outln(&render::vm_summary(&vm))
    }
}

/// `wick vm fork`: the fork operation, followed (a stage per fork), then the forks.
pub async fn fork_vm(ctx: &Ctx, a: ForkArgs) -> Result<()> {
    if let Some(n) = &a.name {
        wick_model::validate_vm_name(n).map_err(|e| anyhow::anyhow!(e.to_string()))?;
    }
    if !(1..=MAX_FORKS).contains(&a.count) {
        anyhow::bail!("--count {}: give 1 to {MAX_FORKS} forks", a.count);
    }
    let client = ctx.client();
    let req = ForkVmRequest {
        name: a.name,
        count: Some(a.count),
        ssh_keys: super::ssh_config::public_key(&ctx.paths)
            .into_iter()
            .collect(),
    };
    let fork: ForkResponse = client.post(&vm_path(&a.vm, "/fork"), &req).await?;
    let op = follow(&client, fork.operation, View::auto(), &Interrupt::install()).await?;
    let failed = outcome(op).err();
    let mut vms = Vec::new();
    for name in &fork.vms {
        if let Ok(vm) = client.get::<wick_model::VmRecord>(&vm_path(name, "")).await {
            vms.push(vm);
        }
    }
    if a.json {
        out_json_sorted(&vms)?;
    } else {
        for vm in &vms {
            outln(&render::vm_summary(vm))?;
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
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
