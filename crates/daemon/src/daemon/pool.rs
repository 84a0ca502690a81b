//! The warm pool (`[pool]`): wickd keeps `size` VMs booted to agent-ready, unassigned and
//! unconfigured, so a `vm create`/`vm run` whose spec matches skips disks, host setup and boot.
//!
//! Pool VMs are ordinary VM records (same resources, release and sweep) owned by root, named
//! `pool-<8 hex>`, marked by `runtime.pool` ([`PoolSlot`]): `filling` while the pool's own create
//! operation makes and boots them (the start waits for the agent and stops there: no hostname,
//! keys, network or files), `ready` once booted, `assigning` once taken. A take is one store
//! transaction (`Store::take_pooled`) that rewrites the record — name, owner, spec, created —
//! only if it is still `ready`, so two creates never get the same VM; then the create operation
//! applies the identity through the normal configure step (`configure_guest`) and the
//! post-start hooks (DNS name, published ports), and clears the marker. A taken VM never goes
//! back to the pool: a failure leaves it the user's VM in `error`.
//!
//! The manager (`run`) refills in the background (woken when an assignment ends), never faster than the backoff after
//! failures, within `max_memory`, and reaps pool VMs that are stale: booting ones from before a
//! restart, dead ones, ones whose spec no longer matches `[pool]`, and any beyond `size`.
//! Reconcile settles `assigning` VMs after a crash (`fail_assign`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use wick_agent_proto::{AgentClient, ExecRequest};
use wick_model::api::{Check, CheckStatus, OpKind};
use wick_model::vm::{LifecycleOp, VmAction};
use wick_model::{new_vm_id, PoolSlot, VmRecord, VmRuntime, VmSpec, VmState, VmmHandle};
use wick_store::{now, StoreError};

use super::{Caller, Daemon};
use crate::capability::HookCtx;
use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// Longest wait between fill attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the manager looks at the pool without being woken (dead VMs, backoff expiry).
const PASS_EVERY: Duration = Duration::from_secs(5);

/// The pool's in-memory state: fills in flight and the failure backoff (the VMs themselves are
/// in the store).
#[derive(Default)]
pub struct Pool {
    wake: Notify,
    filling: Mutex<HashSet<String>>,
    status: Mutex<FillStatus>,
}

/// Consecutive fill failures, the last one's reason, and when the next fill may start.
#[derive(Debug, Clone, Default)]
pub struct FillStatus {
    pub failures: u32,
    pub last_error: Option<String>,
    pub retry_at: Option<Instant>,
}

impl Pool {
    /// Asks the manager to look at the pool now (after a take, a fill or a failure).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn filling(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.filling.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> FillStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn failed(&self, why: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.failures += 1;
        let backoff = Duration::from_secs(1 << s.failures.min(9)).min(MAX_BACKOFF);
        tracing::warn!(error = %why, failures = s.failures, retry_in = ?backoff, "warm pool: fill failed");
        s.last_error = Some(why);
        s.retry_at = Some(Instant::now() + backoff);
    }

    fn succeeded(&self) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = FillStatus::default();
    }
}

/// The part of a spec a pool VM must share with a create to serve it: everything but the
/// identity the configure step applies (keys, git identity) and the workspace.
pub fn pool_key(spec: &VmSpec) -> VmSpec {
    VmSpec {
        ssh_keys: Vec::new(),
        git_name: None,
        git_email: None,
        workspace: None,
        ..spec.clone()
    }
}

/// The pool manager: runs until shutdown when `[pool] size > 0`.
pub async fn run(d: Arc<Daemon>) {
    let Some(cfg) = d.pool_config().cloned() else {
        return;
    };
    tracing::info!(size = cfg.size, "warm pool enabled");
    loop {
        let wait = d.pool_pass(&cfg).await;
        tokio::select! {
            _ = d.pool.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = d.shutdown.cancelled() => return,
        }
    }
}

impl Daemon {
    /// `[pool]` when it is on (`size > 0`).
    pub fn pool_config(&self) -> Option<&PoolConfig> {
        self.config.pool.as_ref().filter(|p| p.size > 0)
    }

    /// The spec pool VMs are made with: the `[pool]` request resolved like a root `vm create`.
    fn pool_spec(&self, cfg: &PoolConfig) -> Result<VmSpec> {
        self.resolve_spec(&cfg.request(), Caller { uid: 0 })
            .map_err(|e| Error::precondition(format!("[pool]: {}", e.message())))
    }

    /// One look at the pool: reap stale VMs, start fills up to `size` within `max_memory` and
    /// the backoff. Returns how long to sleep unless woken.
    async fn pool_pass(self: &Arc<Self>, cfg: &PoolConfig) -> Duration {
        let spec = match self.pool_spec(cfg) {
            Ok(s) => s,
            Err(e) => {
                self.pool.failed(e.message().to_string());
                return self.pool_wait();
            }
        };
        let Ok(vms) = self.store.list_vms(Some(0)) else {
            return PASS_EVERY;
        };
        let in_flight = self.pool.filling().clone();
        let key = pool_key(&spec);
        // The default kernel is filled in on first use: until then specs cannot be compared.
        let comparable = !spec.kernel.as_os_str().is_empty();
        let mut keep = 0u64;
        let mut held_mib = 0u64;
        for vm in vms.iter().filter(|v| v.is_pooled()) {
            if in_flight.contains(&vm.id) {
                keep += 1;
                held_mib += vm.spec.memory_mib;
                continue;
            }
            let live = vm.runtime.pool == Some(PoolSlot::Ready) && vm.state == VmState::Running;
            let matches = !comparable || pool_key(&vm.spec) == key;
            if live && matches && keep < cfg.size {
                keep += 1;
                held_mib += vm.spec.memory_mib;
            } else {
                self.reap(vm.clone());
            }
        }
        let status = self.pool.status();
        if status.retry_at.is_some_and(|t| t > Instant::now()) {
            return self.pool_wait();
        }
        let cap = cfg.max_memory_mib().unwrap_or(u64::MAX);
        while keep < cfg.size && held_mib.saturating_add(spec.memory_mib) <= cap {
            keep += 1;
            held_mib += spec.memory_mib;
            let d = self.clone();
            let spec = spec.clone();
            // In flight from now on, so the next pass counts it even before the task runs.
            let id = new_vm_id();
            self.pool.filling().insert(id.clone());
            tokio::spawn(async move {
                match d.fill_one(id, spec).await {
                    Ok(name) => {
                        tracing::info!(vm = %name, "warm pool: VM ready");
                        d.pool.succeeded();
                    }
                    Err(e) => d.pool.failed(e.message().to_string()),
                }
                d.pool.wake();
            });
        }
        PASS_EVERY
    }

    /// Until the backoff expires (at most [`PASS_EVERY`]).
    fn pool_wait(&self) -> Duration {
        self.pool
            .status()
            .retry_at
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(PASS_EVERY)
            .clamp(Duration::from_millis(100), PASS_EVERY)
    }

    /// Makes one pool VM: the record (`filling`, root's), the normal create operation (disks,
    /// host setup, VMM, boot, agent), then `ready`. A failed fill deletes what it made.
    async fn fill_one(self: &Arc<Self>, id: String, spec: VmSpec) -> Result<String> {
        let t = now();
        let record = VmRecord {
            runtime: VmRuntime {
                dir: self.paths.vm_dir(&id),
                pool: Some(PoolSlot::Filling),
                ..Default::default()
            },
            name: format!("pool-{}", &id[..8]),
            id: id.clone(),
            owner: 0,
            state: VmState::Creating,
            spec,
            created_at: t.clone(),
            updated_at: t.clone(),
            touched_at: t,
        };
        let out = self.fill_record(record).await;
        self.pool.filling().remove(&id);
        if out.is_err() {
            if let Ok(vm) = self.store.get_vm(&id) {
                self.reap(vm);
            }
        }
        out
    }

    async fn fill_record(self: &Arc<Self>, record: VmRecord) -> Result<String> {
        let vm = self.store.create_vm(record)?;
        let id = vm.id.clone();
        let op = self.spawn_op(OpKind::Create, vm, move |d, op, vm| async move {
            d.create_flow(&op, vm, false).await.map(Some)
        })?;
        if let Some(e) = op.wait().await.error {
            return Err(Error(e));
        }
        // The create operation has ended and released the lock: mark it ready under the lock.
        let _g = self.ops.lock_vm(&id).await;
        let mut vm = self.store.get_vm(&id)?;
        if vm.state != VmState::Running || vm.runtime.pool != Some(PoolSlot::Filling) {
            return Err(Error::precondition(format!(
                "pool VM {} is {} after its boot",
                vm.name, vm.state
            )));
        }
        vm.runtime.pool = Some(PoolSlot::Ready);
        Ok(self.store.save_vm(&vm)?.name)
    }

    /// The end of a pool VM's start (in place of configure and post-start): wait for its agent,
    /// give it no identity.
    pub(super) async fn pool_vm_ready(
        &self,
        op: &OpEntry,
        vm: &VmRecord,
        h: &VmmHandle,
    ) -> Result<()> {
        if !vm.spec.agent {
            return Err(Error::precondition(format!(
                "image {} does not run wick-agent; the warm pool needs an agent image",
                vm.spec.image
            )));
        }
        op.stage("wait for agent");
        let client = self.wait_agent(h, op).await?;
        op.stage("wait for the guest's boot to settle");
        settle(&client).await;
        Ok(())
    }

    /// Deletes a pool VM in the background: first made untakeable (if it was ready), then the
    /// normal delete operation.
    fn reap(self: &Arc<Self>, vm: VmRecord) {
        let id = vm.id.clone();
        if vm.runtime.pool == Some(PoolSlot::Ready) {
            let taken = self.store.take_pooled(
                |v| v.id == id,
                |mut v| {
                    v.runtime.pool = Some(PoolSlot::Filling);
                    v
                },
            );
            if !matches!(taken, Ok(Some(_))) {
                return; // taken by a create meanwhile, or the store failed: leave it
            }
        }
        tracing::info!(vm = %vm.name, state = %vm.state, "warm pool: reaping");
        match self.begin(LifecycleOp::Delete, vm) {
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "warm pool: reap deferred"),
        }
    }

    /// Takes a ready pool VM whose spec matches `spec` for `owner` under `name` (atomically;
    /// see `Store::take_pooled`). `Ok(None)`: the pool is off, empty or has no match.
    pub(super) fn take_pooled(
        &self,
        spec: &VmSpec,
        name: &str,
        owner: u32,
    ) -> std::result::Result<Option<VmRecord>, StoreError> {
        if self.pool_config().is_none() {
            return Ok(None);
        }
        let key = pool_key(spec);
        let taken = self.store.take_pooled(
            // pool_key keeps the kernel: a VM booted with another kernel never serves.
            |v| {
                v.state == VmState::Running
                    && v.spec.kernel == spec.kernel
                    && pool_key(&v.spec) == key
            },
            |mut v| {
                let t = now();
                v.name = name.to_string();
                v.owner = owner;
                v.spec = spec.clone();
                v.runtime.pool = Some(PoolSlot::Assigning);
                v.created_at = t.clone();
                v.touched_at = t;
                v
            },
        )?;
        if let Some(vm) = &taken {
            tracing::info!(vm = %vm.name, id = %vm.id, owner, "warm pool: taken");
        }
        Ok(taken)
    }

    /// Starts the create operation of a taken pool VM: its identity applied, then `running`
    /// as the user's. If the VM is busy (its VMM exiting right now), it is failed once free.
    pub(super) fn assign(self: &Arc<Self>, vm: VmRecord) -> Result<Arc<OpEntry>> {
        let id = vm.id.clone();
        let out = self.spawn_op(OpKind::Create, vm, move |d, op, vm| async move {
            d.assign_flow(&op, vm).await.map(Some)
        });
        if out.is_err() {
            let d = self.clone();
            tokio::spawn(async move {
                let _g = d.ops.lock_vm(&id).await;
                if let Ok(mut vm) = d.store.get_vm(&id) {
                    d.fail_assign(
                        &mut vm,
                        "the pooled VM was busy; delete it and create again",
                    )
                    .await;
                }
            });
        }
        out
    }

    /// A taken pool VM: identity through the normal configure step, post-start hooks (DNS
    /// name, published ports), then the marker cleared.
    async fn assign_flow(self: &Arc<Self>, op: &OpEntry, mut vm: VmRecord) -> Result<VmRecord> {
        op.stage("take a ready VM from the warm pool");
        crate::failpoint::hit("pool-assign");
        let out = self.assign_inner(op, &mut vm).await;
        // Refill once the guest is configured: on a small host a boot started now would take
        // the CPU the configure step needs.
        self.pool.wake();
        match out {
            Ok(()) => {
                vm.runtime.pool = None;
                Ok(self.store.save_vm(&vm)?)
            }
            Err(e) => {
                let why = format!("giving the pooled VM its identity failed: {}", e.message());
                self.fail_assign(&mut vm, &why).await;
                Err(Error::new(e.code(), why))
            }
        }
    }

    async fn assign_inner(&self, op: &OpEntry, vm: &mut VmRecord) -> Result<()> {
        let handle = vm
            .runtime
            .vmm
            .clone()
            .ok_or_else(|| Error::precondition("the pooled VM has no VMM"))?;
        self.configure_guest(op, vm, &handle).await?;
        op.stage("post start");
        for cap in &self.caps {
            cap.post_start(&mut HookCtx::new(vm, &self.store)).await?;
        }
        Ok(())
    }

    /// Ends a taken pool VM that could not be given its identity (or whose assignment a crash
    /// cut short): everything released, the user's VM in `error` saying why. Never back to
    /// the pool. The caller holds the VM's lock.
    pub(crate) async fn fail_assign(&self, vm: &mut VmRecord, why: &str) {
        tracing::warn!(vm = %vm.name, why, "warm pool: assignment failed");
        if let Err(e) = self.release(vm).await {
            tracing::error!(vm = %vm.name, error = %e, "release after failed assignment");
        }
        vm.runtime.pool = None;
        if vm.check(VmAction::Crashed).is_ok() {
            let _ = vm.apply(VmAction::Crashed);
        }
        vm.runtime.last_error = Some(why.to_string());
        if let Err(e) = self.store.save_vm(vm) {
            tracing::error!(vm = %vm.name, error = %e, "saving VM after failed assignment");
        }
    }

    /// `wick doctor`'s pool check: off, or how many are ready/booting, and fill failures.
    pub fn pool_check(&self) -> Check {
        let Some(cfg) = self.pool_config() else {
            return check(
                CheckStatus::Pass,
                "off (no [pool], or size = 0)".into(),
                None,
            );
        };
        let vms = self.store.list_vms(Some(0)).unwrap_or_default();
        let count = |slot| {
            vms.iter()
                .filter(|v| v.runtime.pool == Some(slot) && v.state == VmState::Running)
                .count()
        };
        let ready = count(PoolSlot::Ready);
        let booting = vms
            .iter()
            .filter(|v| v.runtime.pool == Some(PoolSlot::Filling))
            .count();
        let mut detail = format!("{ready} ready, {booting} booting, size {}", cfg.size);
        if let Some(m) = cfg.max_memory_mib() {
            detail.push_str(&format!(", max_memory {m} MiB"));
        }
        let status = self.pool.status();
        match status.last_error {
            Some(e) if status.failures > 0 => {
                let next = status
                    .retry_at
                    .map(|t| t.saturating_duration_since(Instant::now()).as_secs())
                    .unwrap_or(0);
                detail.push_str(&format!(
                    "; {} fill(s) failed in a row, next try in {next}s: {e}",
                    status.failures
                ));
                check(
                    CheckStatus::Warn,
                    detail,
                    Some("see wickd's log; fix the [pool] image or lower [pool] size"),
                )
            }
            _ => check(CheckStatus::Pass, detail, None),
        }
    }
}

/// How long a pool VM's boot may take to settle before it counts as ready anyway.
const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// Lets a pool VM's guest finish booting before it counts as ready, so a taken VM does not
/// share its first seconds with the rest of its own boot (units still starting after the
/// agent): `systemctl is-system-running --wait` through the agent, at most [`SETTLE_WAIT`]. A
/// guest without systemd, or one that does not settle, is ready all the same.
async fn settle(client: &AgentClient) {
    let req = ExecRequest::new(["systemctl", "is-system-running", "--wait"]);
    let wait = async { client.exec(req).await?.output_limited(4096).await };
    let _ = tokio::time::timeout(SETTLE_WAIT, wait).await;
}

fn check(status: CheckStatus, detail: String, hint: Option<&str>) -> Check {
    Check {
        area: "pool".into(),
        name: "warm pool".into(),
        status,
        detail,
        hint: hint.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_booting_another_kernel_never_matches() {
        let a = VmSpec {
            kernel: "/kernels/a/vmlinux".into(),
            ..Default::default()
        };
        let other_kernel = VmSpec {
            kernel: "/kernels/b/vmlinux".into(),
            ..a.clone()
        };
        assert_ne!(pool_key(&a), pool_key(&other_kernel));
        let other_identity = VmSpec {
            ssh_keys: vec!["ssh-ed25519 AAAA".into()],
            ..a.clone()
        };
        assert_eq!(pool_key(&a), pool_key(&other_identity));
    }
}
