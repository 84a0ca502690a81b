//! Delete (release, capabilities' `on_delete`, files, record) and prune.

use std::sync::Arc;

use wick_model::api::PruneResult;
use wick_model::vm::{LifecycleOp, VmAction};
use wick_model::VmRecord;

use super::{Caller, Daemon};
use crate::capability::HookCtx;
use crate::error::{Error, Result};
use crate::ops::OpEntry;

impl Daemon {
    /// The delete operation: in any state, everything released, then the files and the record.
    pub(super) async fn delete_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
    ) -> Result<()> {
        vm.check(VmAction::Delete)?;
        op.stage("release host resources");
        self.release(&mut vm).await?;
        for cap in self.caps.iter().rev() {
            cap.on_delete(&mut HookCtx::new(&mut vm, &self.store))
                .await?;
        }
        op.stage("remove files");
        self.release_disks(&vm)?;
        match std::fs::remove_dir_all(&vm.runtime.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot remove {}: {e}",
                    vm.runtime.dir.display()
                )))
            }
        }
        self.store.delete_vm(&vm.id)?;
        self.ops.forget_vm(&vm.id);
        Ok(())
    }

    /// Deletes every non-running VM of the caller, one after another.
    pub async fn prune(self: &Arc<Self>, caller: Caller) -> Result<PruneResult> {
        let mut out = PruneResult {
            deleted: Vec::new(),
            failed: Vec::new(),
        };
        for vm in self.store.list_vms(caller.filter())? {
            if vm.is_pooled() || vm.check(VmAction::Prune).is_err() {
                continue; // something may run it
            }
            let name = vm.name.clone();
            match self.begin(LifecycleOp::Delete, vm) {
                Ok(op) => {
                    let done = op.wait().await;
                    match done.error {
                        None => out.deleted.push(name),
                        Some(e) => out.failed.push(e),
                    }
                }
                Err(e) => out.failed.push(e.0),
            }
        }
        Ok(out)
    }
}
