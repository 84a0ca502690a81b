//! Release: every host resource recorded in a VM's runtime, freed from that record alone
//! (idempotent), and the root disk from its recorded plan.

use std::time::Duration;

use wick_model::VmRecord;

use super::Daemon;
use crate::capability::HookCtx;
use crate::error::{Error, Result};

impl Daemon {
    /// Releases every host resource recorded in `vm.runtime`: the VMM (killed if alive), its
    /// sockets, then each capability's resources in reverse order. Idempotent; persists as it
    /// goes. The caller holds the VM lock and sets the final state.
    pub async fn release(&self, vm: &mut VmRecord) -> Result<()> {
        if let Some(h) = vm.runtime.vmm.clone() {
            if self.vmm.find(&h).is_some() {
                self.vmm.stop(&h, Duration::ZERO).await?;
            }
            if let Some(pid) = self.vmm.find(&h) {
                return Err(Error::internal(format!(
                    "VMM process {pid} of VM {} survived SIGKILL; it stays recorded",
                    vm.name
                )));
            }
            self.vmm.cleanup(&h);
            vm.runtime.vmm = None;
            vm.runtime.set_accel(None);
            *vm = self.store.save_vm(vm)?;
        }
        let mut first_err = None;
        for cap in self.caps.iter().rev() {
            if let Err(e) = cap.cleanup(&mut HookCtx::new(vm, &self.store)).await {
                tracing::error!(vm = %vm.name, cap = cap.name(), error = %e, "cleanup failed");
                first_err.get_or_insert(e);
            }
        }
        *vm = self.store.save_vm(vm)?;
        first_err.map_or(Ok(()), Err)
    }

    /// Releases the VM's root disk (loops, dm device, files) from its recorded plan. Idempotent.
    pub fn release_disks(&self, vm: &VmRecord) -> Result<()> {
        let Some(_) = &vm.runtime.root_disk_plan else {
            return Ok(());
        };
        let plan = disk_plan(vm)?;
        wick_storage::release(&plan, &self.paths.state)
            .map_err(|e| Error::internal(format!("releasing root disk of {}: {e}", vm.name)))
    }
}

/// The VM's recorded root disk plan.
pub fn disk_plan(vm: &VmRecord) -> Result<wick_storage::DiskPlan> {
    let v = vm.runtime.root_disk_plan.clone().ok_or_else(|| {
        Error::precondition(format!(
            "VM {} has no root disk record; delete it and create it again",
            vm.name
        ))
    })?;
    serde_json::from_value(v)
        .map_err(|e| Error::internal(format!("root disk record of {}: {e}", vm.name)))
}

pub(super) fn plan_json(plan: &wick_storage::DiskPlan) -> Result<serde_json::Value> {
    serde_json::to_value(plan).map_err(|e| Error::internal(e.to_string()))
}
