//! `wick vm workspace prepare|export`: a host git repository into a running VM through its agent
//! (no SSH), and the guest's changes back out as a patch. The work is `wick_workspace`'s; this
//! module checks everything it can before any guest I/O, draws progress, and records the prepared
//! workspace on the VM (`PATCH /v1/vms/{vm}`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use wick_agent_proto::AgentClient;
use wick_model::api::SetVmRequest;
use wick_model::{VmRecord, VmState, WorkspaceInfo};
use wick_workspace::{PrepareOptions, PrepareReport, RepoPlan, WorkspaceRecord};

use super::{out, outln, Ctx};
use crate::cli::{WorkspaceCommand, WorkspaceExportArgs, WorkspacePrepareArgs};
use crate::client::vm_path;
use crate::progress::{Stages, View};
use crate::{agent, render};

/// How long to wait for the agent of a VM the daemon says is running.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(ctx: &Ctx, cmd: WorkspaceCommand) -> Result<()> {
    match cmd {
        WorkspaceCommand::Prepare(a) => prepare(ctx, a).await,
        WorkspaceCommand::Export(a) => export(ctx, a).await,
    }
}

async fn prepare(ctx: &Ctx, a: WorkspacePrepareArgs) -> Result<()> {
    let opts = a.workspace.to_options()?;
    check_guest_path(&a.guest_path)?;
    let vm: VmRecord = ctx.client().get(&vm_path(&a.vm, "")).await?;
    let plan = inspect(&a.path, opts).await?;
    if a.dry_run {
        return print_dry_run(&plan, &vm.name, &a.guest_path);
    }
    let vm = super::wake::resume_if_suspended(&ctx.client(), vm).await?;
    ensure_running(&vm)?;
    let report = prepare_into(ctx, &vm, &plan, &a.guest_path).await?;
    outln(&summary(&report, &vm.name))
}

/// Refuses a relative guest path before anything else.
pub(super) fn check_guest_path(guest_path: &str) -> Result<()> {
    if !guest_path.starts_with('/') {
        return Err(
            wick_workspace::WorkspaceError::GuestPathNotAbsolute(guest_path.to_string()).into(),
        );
    }
    Ok(())
}

/// [`wick_workspace::inspect`] off the async threads (it runs git).
pub(super) async fn inspect(path: &Path, opts: PrepareOptions) -> Result<RepoPlan> {
    let path: PathBuf = path.to_path_buf();
    Ok(
        tokio::task::spawn_blocking(move || wick_workspace::inspect(&path, &opts))
            .await
            .context("repository inspection panicked")??,
    )
}

/// `--dry-run`: what would be copied, one line per path, then the history part.
pub(super) fn print_dry_run(plan: &RepoPlan, vm: &str, guest_path: &str) -> Result<()> {
    let lines = wick_workspace::dry_run(plan);
    let files = plan.files().count();
    let mut text = format!(
        "dry run: would copy {} ({files} files) into {vm}:{guest_path}\n",
        plan.root().display()
    );
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    out(&text)
}

/// `VM a1 is not running` unless it is, with the way out: `wick vm resume` for a paused VM,
/// else `wick vm start`.
pub(super) fn ensure_running(vm: &VmRecord) -> Result<()> {
    if vm.state == VmState::Paused {
        bail!(
            "VM {} is paused: its guest runs nothing until resumed; resume it first: wick vm resume {}",
            vm.name,
            vm.name
        );
    }
    if vm.state != VmState::Running {
        bail!(
            "VM {} is not running (state {}): start it with `wick vm start {}`",
            vm.name,
            vm.state,
            vm.name
        );
    }
    Ok(())
}

/// A checked agent client of a running VM, through wickd.
pub(super) async fn agent_client(ctx: &Ctx, vm: &VmRecord) -> Result<AgentClient> {
    agent::connect(ctx.client(), &vm.id, AGENT_TIMEOUT).await
}

/// Copies `plan` into `vm` at `guest_path` with live progress, then records the workspace on
/// the VM.
pub(super) async fn prepare_into(
    ctx: &Ctx,
    vm: &VmRecord,
    plan: &RepoPlan,
    guest_path: &str,
) -> Result<PrepareReport> {
    let mut stages = Stages::new(View::auto(), format!("prepare {}", vm.name));
    stages.enter("connect to the agent");
    let result = async {
        let client = agent_client(ctx, vm).await?;
        let report = wick_workspace::prepare(&client, plan, guest_path, |s| stages.enter(s))
            .await
            .map_err(anyhow::Error::from)?;
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            stages.finish(false);
            return Err(e);
        }
    };
    stages.enter("record the workspace");
    let req = SetVmRequest {
        workspace: Some(workspace_info(&report.record)),
        ..Default::default()
    };
    let recorded: Result<VmRecord> = ctx.client().patch(&vm_path(&vm.id, ""), &req).await;
    stages.finish(recorded.is_ok());
    recorded.context("the workspace was prepared, but recording it on the VM failed")?;
    Ok(report)
}

/// The daemon's record of a prepared workspace.
fn workspace_info(r: &WorkspaceRecord) -> WorkspaceInfo {
    WorkspaceInfo {
        source_path: r.source_path.clone(),
        guest_path: r.guest_path.clone(),
        head_commit: r.head_commit.clone(),
        branch: r.branch.clone(),
        mode: r.mode.as_str().to_string(),
        prepared_at: r.prepared_at.clone(),
    }
}

/// `prepared /src/repo into a1:/root/repo (main@3f2a9c1): 12 files sent (3.4 MiB), 0 unchanged,
/// 0 deleted; history: 40 objects (1.2 MiB) in 420 ms`.
pub(super) fn summary(r: &PrepareReport, vm: &str) -> String {
    let w = &r.record;
    let head: String = w.head_commit.chars().take(7).collect();
    let at = match &w.branch {
        Some(b) => format!("{b}@{head}"),
        None => head,
    };
    let history = if r.objects_sent == 0 {
        "history up to date".to_string()
    } else {
        format!(
            "history: {} objects ({})",
            r.objects_sent,
            render::bytes(r.pack_bytes)
        )
    };
    format!(
        "prepared {} into {vm}:{} ({at}): {} file{} sent ({}), {} unchanged, {} deleted; {history} \
         in {}",
        w.source_path,
        w.guest_path,
        r.files_sent,
        if r.files_sent == 1 { "" } else { "s" },
        render::bytes(r.file_bytes),
        r.files_unchanged,
        r.files_deleted,
        render::duration_ms(r.elapsed.as_millis() as u64)
    )
}

async fn export(ctx: &Ctx, a: WorkspaceExportArgs) -> Result<()> {
    check_guest_path(&a.guest_path)?;
    let vm: VmRecord = ctx.client().get(&vm_path(&a.vm, "")).await?;
    let vm = super::wake::resume_if_suspended(&ctx.client(), vm).await?;
    ensure_running(&vm)?;
    let client = agent_client(ctx, &vm).await?;
    let base = a.base_commit.as_deref();
    match &a.output {
        None => {
            let mut stdout = tokio::io::stdout();
            wick_workspace::export_to(&client, &a.guest_path, base, &mut stdout).await?;
            stdout.flush().await?;
        }
        Some(path) => {
            let mut file = tokio::fs::File::create(path)
                .await
                .with_context(|| format!("cannot create {}", path.display()))?;
            let written = async {
                let n = wick_workspace::export_to(&client, &a.guest_path, base, &mut file).await?;
                file.sync_all().await?;
                Ok::<_, anyhow::Error>(n)
            }
            .await;
            match written {
                Ok(n) => eprintln!(
                    "wrote the patch of {}:{} ({}) to {}",
                    vm.name,
                    a.guest_path,
                    render::bytes(n),
                    path.display()
                ),
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_workspace::Mode;

    fn report(files_sent: u64, objects_sent: u64) -> PrepareReport {
        PrepareReport {
            record: WorkspaceRecord {
                source_path: "/src/repo".into(),
                guest_path: "/root/repo".into(),
                head_commit: "3f2a9c1b0d4e5f".into(),
                branch: Some("main".into()),
                mode: Mode::Shallow,
                prepared_at: "2024-05-01T12:00:00.000Z".into(),
            },
            fresh: objects_sent > 0,
            files_sent,
            file_bytes: 3 * 1024 * 1024,
            files_unchanged: 5,
            files_deleted: 1,
            objects_sent,
            pack_bytes: 2048,
            archive_bytes: 4 * 1024 * 1024,
            elapsed: Duration::from_millis(420),
        }
    }

    #[test]
    fn summary_lines() {
        assert_eq!(
            summary(&report(12, 40), "a1"),
            "prepared /src/repo into a1:/root/repo (main@3f2a9c1): 12 files sent (3.0 MiB), 5 \
             unchanged, 1 deleted; history: 40 objects (2.0 KiB) in 420 ms"
        );
        let s = summary(&report(1, 0), "a1");
        assert!(
            s.contains("1 file sent") && s.contains("history up to date"),
            "{s}"
        );
        let info = workspace_info(&report(1, 0).record);
        assert_eq!(info.mode, "shallow");
        assert_eq!(info.head_commit, "3f2a9c1b0d4e5f");
    }

    #[test]
    fn relative_guest_paths_are_refused() {
        let e = check_guest_path("repo").unwrap_err().to_string();
        assert!(e.contains("must be absolute"), "{e}");
        assert!(check_guest_path("/root/repo").is_ok());
    }
}
