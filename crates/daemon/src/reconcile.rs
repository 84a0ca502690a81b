//! Reconcile and sweep, run once at daemon start before the API accepts requests.
//!
//! From the durable records alone: VMs whose VMM is alive are re-adopted (watched again;
//! `running` and `paused` ones are settled to the run state their VMM reports);
//! VMs whose VMM died, and VMs caught mid-operation by a crash, are released and settled;
//! a VM caught being handed out of the warm pool ends as its new owner's, in `error`;
//! a suspended VM stays so, and one caught mid-suspend is settled (`Daemon::reconcile_suspend`);
//! then leftovers that belong to no VM (VMM processes serving a socket in our state dir, VM
//! directories without a record, capability resources) are swept.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use wick_model::vm::VmAction;
use wick_model::VmState;

use crate::daemon::Daemon;

/// What reconcile did, for the log.
#[derive(Debug, Default)]
pub struct Report {
    pub adopted: Vec<String>,
    pub settled: Vec<String>,
    pub swept: Vec<String>,
}

/// Settles every VM and sweeps leftovers. Errors on one VM are logged and do not stop the rest.
pub async fn reconcile(d: &Arc<Daemon>) -> anyhow::Result<Report> {
    let mut report = Report::default();
    for vm in d.store.list_vms(None)? {
        let _g = d.ops.lock_vm(&vm.id).await;
        let mut vm = d.store.get_vm(&vm.id)?;
        if vm.runtime.pool == Some(wick_model::PoolSlot::Assigning) {
            // Taken from the warm pool, identity half applied: the user's VM, never the pool's.
            d.fail_assign(&mut vm, "being given its identity (taken from the warm pool) was interrupted by a wickd restart; delete this VM and create it again").await;
            report
                .settled
                .push(format!("{} (pool assignment -> {})", vm.name, vm.state));
            continue;
        }
        if vm
            .runtime
            .restore
            .as_ref()
            .is_some_and(|r| r.snapshot_id.is_some())
        {
            // A restore or fork cut short (it is cleared with `running`): removed like a
            // failed create (daemon/restore.rs).
            d.remove_restored(&vm.id).await;
            report
                .swept
                .push(format!("unfinished restore {} ({})", vm.name, vm.id));
            continue;
        }
        match d.reconcile_suspend(&mut vm).await {
            Ok(Some(line)) => {
                report.settled.push(line);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(vm = %vm.name, error = %e, "reconcile: settling a suspend failed");
                continue;
            }
        }
        let live = vm.runtime.vmm.as_ref().and_then(|h| d.vmm.find(h));
        match (vm.state, live) {
            (VmState::Running | VmState::Paused, Some(pid)) => {
                let mut h = vm.runtime.vmm.clone().expect("live implies a handle");
                if h.pid != Some(pid) {
                    h.pid = Some(pid);
                    h.start_time = wick_host::proc::start_time(pid);
                    vm.runtime.vmm = Some(h.clone());
                    vm = d.store.save_vm(&vm)?;
                }
                if let Err(e) = d.settle_run_state(&mut vm).await {
                    tracing::error!(vm = %vm.name, error = %e, "reconcile: settling the run state");
                }
                d.watch(vm.id.clone(), h, None);
                report.adopted.push(format!("{} ({})", vm.name, vm.state));
            }
            (VmState::Stopped, None) if vm.runtime.vmm.is_none() => {}
            (VmState::Error, None) if vm.runtime.vmm.is_none() => {}
            (state, _) => {
                // Dead VMM, or an operation cut short by the crash: release everything recorded.
                if let Err(e) = d.release(&mut vm).await {
                    tracing::error!(vm = %vm.name, error = %e, "reconcile: release failed");
                    continue;
                }
                if state == VmState::Creating {
                    vm.runtime.last_error = Some(
                        "creation was interrupted by a wickd restart; delete this VM and create it again"
                            .into(),
                    );
                }
                vm.apply(VmAction::Interrupted)?;
                d.store.save_vm(&vm)?;
                report
                    .settled
                    .push(format!("{} ({state} -> {})", vm.name, vm.state));
            }
        }
    }
    report
        .swept
        .extend(crate::daemon::reconcile_snapshots(d).await?);
    sweep(d, &mut report).await?;
    Ok(report)
}

async fn sweep(d: &Arc<Daemon>, report: &mut Report) -> anyhow::Result<()> {
    let vms = d.store.list_vms(None)?;
    let known: HashSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
    let vms_dir = d.paths.state.join("vms");

    for (pid, id) in orphan_vmms(&vms_dir, &known) {
        tracing::warn!(pid, vm_id = %id, "killing VMM of unknown VM");
        if let Some(st) = wick_host::proc::start_time(pid) {
            let _ = wick_host::proc::signal(pid, Some(st), nix::sys::signal::Signal::SIGKILL);
        }
        report
            .swept
            .push(format!("VMM process {pid} (vm dir {id})"));
    }
    if let Ok(rd) = std::fs::read_dir(&vms_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !known.contains(name.as_str()) {
                let _ = std::fs::remove_dir_all(e.path());
                report
                    .swept
                    .push(format!("directory {}", e.path().display()));
            }
        }
    }
    let plans: Vec<wick_storage::DiskPlan> = vms
        .iter()
        .filter_map(|v| crate::daemon::disk_plan(v).ok())
        .collect();
    let (d2, p2) = (d.clone(), plans.clone());
    match tokio::task::spawn_blocking(move || crate::daemon::reconcile_xfs_pool(&d2, &p2)).await? {
        Ok(lines) => report.swept.extend(lines),
        Err(e) => tracing::error!(error = %e, "XFS pool reconcile failed"),
    }
    let storage = d.storage.clone();
    match tokio::task::spawn_blocking(move || storage.sweep(&plans)).await? {
        Ok(lines) => report.swept.extend(lines),
        Err(e) => tracing::error!(error = %e, "storage sweep failed"),
    }
    for cap in &d.caps {
        match cap.sweep(&vms).await {
            Ok(lines) => report.swept.extend(lines),
            Err(e) => tracing::error!(cap = cap.name(), error = %e, "sweep failed"),
        }
    }
    Ok(())
}

/// VMM processes whose command line names a socket in a directory of `vms_dir` that belongs to
/// no known VM: `(pid, vm dir name)`.
pub fn orphan_vmms(vms_dir: &Path, known: &HashSet<&str>) -> Vec<(u32, String)> {
    let prefix = format!("{}/", vms_dir.display());
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        for arg in cmdline.split(|b| *b == 0) {
            let arg = String::from_utf8_lossy(arg);
            if let Some(rest) = arg.strip_prefix(&prefix) {
                if let Some((id, _)) = rest.split_once('/') {
                    if !known.contains(id) && wick_host::proc::is_alive(pid, None) {
                        out.push((pid, id.to_string()));
                    }
                }
                break;
            }
        }
    }
    out
}
