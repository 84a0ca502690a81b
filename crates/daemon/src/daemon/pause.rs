//! Pause and resume: the guest's vCPUs stopped and started by the VMM (Firecracker `PATCH /vm`,
//! QEMU QMP `stop`/`cont`); the VMM process and every host resource stay, so a paused VM keeps
//! its TAP, DNS name and published ports (connections to it wait until `resume`).
//!
//! Order: the VMM call, then the state is persisted. A crash between the two leaves the record
//! one step behind the VMM; reconcile asks the VMM ([`Daemon::settle_run_state`]) and settles
//! the record to what the VMM reports.

use std::sync::Arc;
use std::time::Duration;

use wick_model::vm::{Next, VmAction};
use wick_model::{VmRecord, VmState};
use wick_vmm::RunState;

use super::Daemon;
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// How long a VMM may take to answer a pause, resume or status request.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Daemon {
    /// The pause operation: `running` → `paused` (a paused VM is left as it is).
    pub(super) async fn pause_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        vm: VmRecord,
    ) -> Result<VmRecord> {
        self.run_state_flow(op, vm, VmAction::Pause).await
    }

    /// The resume operation: `paused` → `running` (a running VM is left as it is).
    pub(super) async fn resume_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        vm: VmRecord,
    ) -> Result<VmRecord> {
        self.run_state_flow(op, vm, VmAction::Resume).await
    }

    async fn run_state_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
        action: VmAction,
    ) -> Result<VmRecord> {
        if vm.check(action)? == Next::To(vm.state) {
            return Ok(self.store.save_vm(&vm)?); // already there; the request still touched it
        }
        let handle = match &vm.runtime.vmm {
            Some(h) if self.vmm.find(h).is_some() => h.clone(),
            _ => {
                return Err(Error::internal(format!(
                    "VM {} is {} but its VMM is gone; it is being settled",
                    vm.name, vm.state
                )))
            }
        };
        if action == VmAction::Pause {
            op.stage("pause vcpus");
            self.vmm.pause(&handle, PAUSE_TIMEOUT).await?;
        } else {
            op.stage("resume vcpus");
            self.vmm.resume(&handle, PAUSE_TIMEOUT).await?;
        }
        vm.apply(action)?;
        Ok(self.store.save_vm(&vm)?)
    }

    /// For reconcile: asks a live VMM whether its guest runs or is paused and moves a record
    /// that disagrees (a crash between the VMM call and the save) to the VMM's truth. A VMM
    /// that cannot tell leaves the record as it is.
    pub async fn settle_run_state(&self, vm: &mut VmRecord) -> Result<()> {
        let Some(h) = vm.runtime.vmm.clone() else {
            return Ok(());
        };
        let action = match self.vmm.run_state(&h, PAUSE_TIMEOUT).await {
            Ok(RunState::Paused) if vm.state == VmState::Running => VmAction::Pause,
            Ok(RunState::Running) if vm.state == VmState::Paused => VmAction::Resume,
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "reconcile: cannot ask the VMM's run state");
                return Ok(());
            }
        };
        tracing::warn!(vm = %vm.name, state = %vm.state, ?action, "reconcile: the VMM disagrees with the record; settling to the VMM");
        vm.apply(action)?;
        *vm = self.store.save_vm(vm)?;
        Ok(())
    }

    /// Before a stop: a paused guest is resumed so it can power off cleanly (sync, poweroff).
    /// A failure is only logged: the stop falls back to the VMM's kill.
    pub(super) async fn resume_for_stop(&self, vm: &VmRecord) {
        if vm.state != VmState::Paused {
            return;
        }
        if let Some(h) = &vm.runtime.vmm {
            if let Err(e) = self.vmm.resume(h, PAUSE_TIMEOUT).await {
                tracing::warn!(vm = %vm.name, error = %e, "cannot resume the paused guest before its stop; it will be killed");
            }
        }
    }
}
