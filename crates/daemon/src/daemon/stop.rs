//! Stop (guest poweroff first — a paused guest is resumed for it —, then the VMM, then every
//! resource; a suspended VM's suspend image is discarded) and kill (a signal to the VMM; the VM
//! is released once the VMM dies of it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use wick_model::api::{ErrorCode, KillRequest};
use wick_model::vm::VmAction;
use wick_model::{VmRecord, VmState};
use wick_store::now;

use super::{Caller, Daemon};
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// How long to wait for a VMM to die after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);

impl Daemon {
    /// The stop operation (and restart's first half): `stopping` while a VMM is recorded, the
    /// guest asked to power off, the VMM stopped, everything released, `stopped`.
    pub(super) async fn stop_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
    ) -> Result<VmRecord> {
        if vm.state == VmState::Stopped && vm.runtime.vmm.is_none() {
            return Ok(vm); // nothing runs and nothing is recorded: already stopped
        }
        vm.check(VmAction::Stop)?;
        op.stage("stop vmm");
        if let Some(h) = vm.runtime.vmm.clone() {
            self.resume_for_stop(&vm).await; // a paused guest cannot power off
            vm.apply(VmAction::Stop)?;
            vm = self.store.save_vm(&vm)?;
            if self.vmm.find(&h).is_some() {
                self.shutdown_guest(&vm).await; // sync + poweroff inside first: data survives
            }
            self.vmm.stop(&h, self.config.stop_timeout()).await?;
        }
        op.stage("release host resources");
        self.release(&mut vm).await?;
        // A suspended VM's image (or one a failed start from it left) is not kept by a stop.
        if vm.runtime.restore.is_some() {
            op.stage("discard suspend image");
            self.discard_suspend_image(&mut vm)?;
        }
        vm.apply(VmAction::Released)?;
        Ok(self.store.save_vm(&vm)?)
    }

    /// Sends a signal to the VM's VMM. If the VMM dies of it, the VM ends `stopped` with every
    /// resource released.
    pub async fn kill(
        self: &Arc<Self>,
        reference: &str,
        req: KillRequest,
        caller: Caller,
    ) -> Result<VmRecord> {
        let sig = match req.signal.as_deref() {
            None => Signal::SIGKILL,
            Some(s) => wick_host::proc::parse_signal(s).map_err(Error::invalid)?,
        };
        let vm = self.find(reference, caller)?;
        let _g = self.ops.try_lock_vm(&vm.id, &vm.name, None)?;
        let mut vm = self.store.get_vm(&vm.id)?;
        let handle = match &vm.runtime.vmm {
            Some(h) if self.vmm.find(h).is_some() => h.clone(),
            _ => {
                return Err(Error::new(
                    ErrorCode::NotRunning,
                    format!("VM {} is not running (state {})", vm.name, vm.state),
                ))
            }
        };
        vm.check(VmAction::Kill)?;
        vm.touched_at = now();
        self.vmm.kill(&handle, sig)?;
        let deadline = Instant::now() + KILL_GRACE;
        while self.vmm.find(&handle).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.vmm.find(&handle).is_some() {
            // Survived the signal (e.g. SIGUSR1): still running.
            return Ok(self.store.save_vm(&vm)?);
        }
        self.release(&mut vm).await?;
        vm.apply(VmAction::Released)?;
        Ok(self.store.save_vm(&vm)?)
    }
}
