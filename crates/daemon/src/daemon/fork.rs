//! Fork: `wick vm fork VM [--name N] [--count K]` (`POST /v1/vms/{vm}/fork`) — K new VMs that
//! continue the running (or paused) VM's guest, each with its own identity.
//!
//! The request records the K forks first (`creating`, owner = caller, each held to `[limits]`
//! like a create, their `runtime.restore` naming the snapshot id chosen now, before it exists).
//! The fork operation, under the source VM's lock, takes a transient snapshot of the VM (the
//! normal snapshot flow, never `ready`, not counted in `max_snapshots`) (failpoint
//! `fork-snapshotted`), then runs one restore operation (a `create`, `restore.rs`) per fork,
//! [`FORK_CONCURRENCY`] at a time, reporting each as a stage; then the snapshot is removed —
//! the loaded forks need nothing of it. A fork that fails is removed; after a crash, reconcile
//! removes the forks that were not running and the transient snapshot.

use std::sync::Arc;

use wick_model::api::OpKind;
use wick_model::snapshot::{ForkResponse, ForkVmRequest, MAX_FORKS};
use wick_model::{validate_vm_name, VmRecord};
use wick_store::StoreError;

use super::restore::restore_from;
use super::{Caller, Daemon};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ops::OpEntry;

/// Forks restored at once.
const FORK_CONCURRENCY: usize = 2;

impl Daemon {
    /// Records the forks and starts the fork operation on the caller's VM `vm_ref`.
    pub fn fork(
        self: &Arc<Self>,
        vm_ref: &str,
        req: ForkVmRequest,
        caller: Caller,
    ) -> Result<ForkResponse> {
        let count = req.count.unwrap_or(1);
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(Error::invalid(format!(
                "--count {count}: give 1 to {MAX_FORKS} forks"
            )));
        }
        if let Some(n) = &req.name {
            validate_vm_name(n).map_err(|e| Error::invalid(e.to_string()))?;
        }
        let src = self.find(vm_ref, caller)?;
        if !src.state.guest_up() {
            return Err(Error::conflict(format!(
                "VM {} is {}; only a running or paused VM can be forked",
                src.name, src.state
            )));
        }
        super::restore::refuse_agentless(&src.spec, &format!("VM {}", src.name))?;
        let mut spec = src.spec.clone();
        spec.publish.clear(); // host ports stay the source's
        if !req.ssh_keys.is_empty() {
            spec.ssh_keys = req.ssh_keys.clone();
        }
        let snap_id = wick_model::new_vm_id();
        let forks = self.record_forks(&src, &req, count, &spec, &snap_id, caller)?;
        let names: Vec<String> = forks.iter().map(|f| f.name.clone()).collect();
        let ids: Vec<String> = forks.iter().map(|f| f.id.clone()).collect();
        let op = self.spawn_op(OpKind::Fork, src, move |d, op, src| async move {
            d.fork_flow(&op, src, snap_id, forks, caller)
                .await
                .map(Some)
        });
        match op {
            Ok(op) => Ok(ForkResponse {
                operation: op.snapshot(),
                vms: names,
            }),
            Err(e) => {
                for id in ids {
                    let _ = self.store.delete_vm(&id);
                }
                Err(e)
            }
        }
    }

    /// Inserts the forks' records under the quota lock, each checked against `[limits]`; on
    /// any refusal, the ones already inserted are removed.
    fn record_forks(
        &self,
        src: &VmRecord,
        req: &ForkVmRequest,
        count: u32,
        spec: &wick_model::VmSpec,
        snap_id: &str,
        caller: Caller,
    ) -> Result<Vec<VmRecord>> {
        let _quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        let mut made: Vec<VmRecord> = Vec::new();
        let mut next = 1u32;
        let out = (|| -> Result<()> {
            for i in 1..=count {
                self.check_limits(caller.uid, None, spec)?;
                let vm = loop {
                    let (name, fixed) = match &req.name {
                        Some(n) if count == 1 => (n.clone(), true),
                        Some(n) => (format!("{n}-{i}"), true),
                        None => (fork_name(&src.name, next), false),
                    };
                    next += 1;
                    match self.insert_restore(name, caller, spec, restore_from(snap_id)) {
                        Ok(vm) => break vm,
                        Err(StoreError::NameTaken(_)) if !fixed && next < 1000 => {}
                        Err(StoreError::Corrupt(m)) => return Err(Error::invalid(m)),
                        Err(e) => return Err(e.into()),
                    }
                };
                made.push(vm);
            }
            Ok(())
        })();
        if let Err(e) = out {
            for vm in &made {
                let _ = self.store.delete_vm(&vm.id);
            }
            return Err(e);
        }
        Ok(made)
    }

    /// The fork operation: the transient snapshot, the restores, the snapshot removed.
    async fn fork_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        src: VmRecord,
        snap_id: String,
        forks: Vec<VmRecord>,
        caller: Caller,
    ) -> Result<VmRecord> {
        let src = self.store.get_vm(&src.id)?;
        let snap_name = format!("fork-{snap_id}");
        let taken = self
            .snapshot_flow(op, (snap_id.clone(), snap_name), src, caller, true)
            .await;
        let src = match taken {
            Ok(src) => src,
            Err(e) => {
                for f in &forks {
                    self.remove_restored(&f.id).await;
                }
                return Err(e);
            }
        };
        failpoint::hit("fork-snapshotted");
        let failed = self.restore_forks(op, forks).await;
        op.stage("remove the fork's snapshot");
        if let Ok(Some(snap)) = self.store.get_snapshot(&snap_id) {
            self.discard_snapshot(&snap).await;
        }
        if failed.is_empty() {
            return Ok(src);
        }
        Err(Error::precondition(format!(
            "{} fork(s) failed and were removed: {}",
            failed.len(),
            failed.join("; ")
        )))
    }

    /// One restore operation per fork, [`FORK_CONCURRENCY`] at a time; returns what failed.
    async fn restore_forks(self: &Arc<Self>, op: &OpEntry, forks: Vec<VmRecord>) -> Vec<String> {
        let total = forks.len();
        let gate = Arc::new(tokio::sync::Semaphore::new(FORK_CONCURRENCY));
        let mut running = Vec::new();
        let mut failed = Vec::new();
        for f in forks {
            let (name, id) = (f.name.clone(), f.id.clone());
            let gate = gate.clone();
            let started = self.spawn_op(OpKind::Create, f, move |d, op, vm| async move {
                let _turn = gate.acquire_owned().await;
                d.restore_flow(&op, vm).await.map(Some)
            });
            match started {
                Ok(cop) => running.push((name, cop)),
                Err(e) => {
                    self.remove_restored(&id).await;
                    failed.push(format!("{name}: {}", e.message()));
                }
            }
        }
        op.stage(&format!("restore {total} fork(s)"));
        for (i, (name, cop)) in running.into_iter().enumerate() {
            let done = cop.wait().await;
            match done.error {
                None => op.stage(&format!("fork {}/{total} {name} running", i + 1)),
                Some(e) => {
                    op.stage(&format!("fork {}/{total} {name} failed", i + 1));
                    failed.push(format!("{name}: {}", e.message));
                }
            }
        }
        failed
    }
}

/// `<vm>-fork-<n>`, shortened to fit a VM name.
fn fork_name(src: &str, n: u32) -> String {
    let tail = format!("-fork-{n}");
    let keep = 63usize.saturating_sub(tail.len()).min(src.len());
    format!("{}{tail}", src[..keep].trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_names_fit_and_stay_valid() {
        assert_eq!(fork_name("web", 2), "web-fork-2");
        let long = "a".repeat(63);
        let n = fork_name(&long, 12);
        assert_eq!(n.len(), 63);
        validate_vm_name(&n).unwrap();
    }
}
