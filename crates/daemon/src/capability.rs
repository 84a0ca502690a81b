//! Capabilities: host-integrated features plugged into the VM lifecycle through hooks, so
//! networking, DNS, NAT or a work disk never touch the lifecycle code itself.
//!
//! Hook order on start: `preflight` (nothing created yet; refuse early) → `prepare_host` (create
//! host resources) → `vmm_config` (amend the VMM config, e.g. attach a TAP) → VMM boots →
//! `post_start`. Teardown (stop, kill, failed start, VMM exit, reconcile) calls `cleanup` in
//! reverse order; delete then calls `on_delete`. `apply_config_change` runs on `vm set`,
//! live if the VM runs. `sweep` runs once at daemon start, after reconcile, then `started`;
//! `shutdown` when the daemon exits.
//!
//! **Durability rule**: `prepare_host` records a resource's identity in `cx.vm.runtime` and calls
//! [`HookCtx::persist`] *before* creating it; `cleanup` derives everything from the runtime (plus
//! deterministic names), is idempotent, and clears the fields it released.

use async_trait::async_trait;
use wick_model::api::Check;
use wick_model::{VmRecord, VmSpec};
use wick_store::Store;
use wick_vmm::VmmConfig;

use crate::error::Result;

/// The VM a hook works on, and the means to persist it.
pub struct HookCtx<'a> {
    pub vm: &'a mut VmRecord,
    store: &'a Store,
}

impl<'a> HookCtx<'a> {
    pub fn new(vm: &'a mut VmRecord, store: &'a Store) -> Self {
        HookCtx { vm, store }
    }

    /// The store, for capabilities that keep their own durable records (e.g. IP leases).
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Writes the VM record (with its runtime) to the store. Call before creating a resource
    /// whose identity you just recorded.
    pub fn persist(&mut self) -> Result<()> {
        *self.vm = self.store.save_vm(self.vm)?;
        Ok(())
    }
}

/// A host-integrated feature. Every hook has a no-op default.
#[async_trait]
pub trait Capability: Send + Sync {
    /// Short name shown by `doctor` and in logs (`vm dns`, `nat`, …).
    fn name(&self) -> &'static str;

    /// Checks before anything is created for a start. Refuse with `failed_precondition`.
    async fn preflight(&self, _vm: &VmRecord) -> Result<()> {
        Ok(())
    }

    /// Creates the host resources the VM needs (record first, then create).
    async fn prepare_host(&self, _cx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Amends the VMM configuration (after `prepare_host`, before boot).
    fn vmm_config(&self, _vm: &VmRecord, _cfg: &mut VmmConfig) {}

    /// After the guest booted.
    async fn post_start(&self, _cx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Releases what `prepare_host` created, from the durable runtime only. Idempotent.
    async fn cleanup(&self, _cx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// The VM is being deleted (after `cleanup`): release what outlives a stop (leases, …).
    async fn on_delete(&self, _cx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// `vm set` changed the spec; `cx.vm.spec` is the new one. Runs live on a running VM.
    async fn apply_config_change(&self, _cx: &mut HookCtx<'_>, _old: &VmSpec) -> Result<()> {
        Ok(())
    }

    /// Read-only checks for `wick doctor`.
    async fn doctor(&self, _vms: &[VmRecord]) -> Vec<Check> {
        Vec::new()
    }

    /// At daemon start, after reconcile: remove wick-named leftovers that belong to none of
    /// `vms`. Returns a line per thing removed.
    async fn sweep(&self, _vms: &[VmRecord]) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// At daemon start, after reconcile and sweep, before the API serves: start services
    /// (e.g. the DNS server) for the settled `vms`.
    async fn started(&self, _vms: &[VmRecord]) -> Result<()> {
        Ok(())
    }

    /// At daemon shutdown (VMs keep running): stop services, revert host integrations.
    async fn shutdown(&self) {}
}
