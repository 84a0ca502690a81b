//! VMM watching: a task per VMM waits for its exit; an exit while the record still names that
//! VMM releases the VM and settles it (`stopped` on a clean exit, else `error` with the log's
//! tail).

use std::sync::Arc;
use std::time::Duration;

use wick_model::vm::VmAction;
use wick_model::VmmHandle;

use super::logs::with_tail;
use super::Daemon;

impl Daemon {
    /// Watches a VMM process until it exits, then settles the VM if the exit was unexpected.
    pub fn watch(
        self: &Arc<Self>,
        vm_id: String,
        handle: VmmHandle,
        child: Option<tokio::process::Child>,
    ) {
        let d = self.clone();
        tokio::spawn(async move {
            let status = match child {
                Some(mut c) => c.wait().await.ok().map(|s| s.to_string()),
                None => {
                    let pid = handle.pid.unwrap_or(0);
                    while wick_host::proc::is_alive(pid, handle.start_time) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None
                }
            };
            d.on_vmm_exit(&vm_id, &handle, status).await;
        });
    }

    async fn on_vmm_exit(&self, vm_id: &str, handle: &VmmHandle, status: Option<String>) {
        let _g = self.ops.lock_vm(vm_id).await;
        let Ok(mut vm) = self.store.get_vm(vm_id) else {
            return;
        };
        let ours = vm
            .runtime
            .vmm
            .as_ref()
            .is_some_and(|h| h.pid == handle.pid && h.pid.is_some());
        if !ours {
            return; // a lifecycle operation already settled it
        }
        let tail = self.log_tail(&vm, 15);
        let clean = status
            .as_deref()
            .is_some_and(|s| s.ends_with("exit status: 0"));
        tracing::warn!(vm = %vm.name, status = ?status, "VMM exited on its own");
        if let Err(e) = self.release(&mut vm).await {
            tracing::error!(vm = %vm.name, error = %e, "release after VMM exit");
        }
        let (action, last_error) = if clean {
            (VmAction::Released, None)
        } else {
            let why = format!(
                "VMM exited unexpectedly ({})",
                status.unwrap_or_else(|| "status unknown".into())
            );
            (VmAction::Crashed, Some(with_tail(&why, &tail)))
        };
        if let Err(e) = vm.apply(action) {
            tracing::error!(vm = %vm.name, error = %e, "settling VM after VMM exit");
            return;
        }
        vm.runtime.last_error = last_error;
        if let Err(e) = self.store.save_vm(&vm) {
            tracing::error!(vm = %vm.name, error = %e, "saving VM after VMM exit");
        }
    }
}
