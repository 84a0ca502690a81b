//! Keeps every live VMM's log under `vmm_log_max`: a task that rotates `vmm.log` (see
//! [`wick_vmm::log`]) of each VM that has a VMM recorded, re-adopted ones included.

use std::path::PathBuf;
use std::sync::Arc;

use wick_vmm::log::{rotate, LogLimit};

use crate::daemon::Daemon;

/// How many checks pass between two reads of the VM list from the store.
const REFRESH_EVERY: u32 = 10;

/// The logs of the VMs that have a VMM recorded (starting, running, stopping).
fn live_logs(d: &Daemon) -> Vec<PathBuf> {
    let Ok(vms) = d.store.list_vms(None) else {
        return Vec::new();
    };
    vms.iter()
        .filter_map(|vm| vm.runtime.vmm.as_ref().map(|h| h.log_path.clone()))
        .collect()
}

/// Runs until the daemon shuts down.
pub async fn run_log_keeper(d: Arc<Daemon>) {
    let limit = d.config.vmm_log_limit().unwrap_or_default();
    let mut logs = Vec::new();
    let mut tick = 0u32;
    loop {
        if tick.is_multiple_of(REFRESH_EVERY) {
            logs = live_logs(&d);
        }
        tick = tick.wrapping_add(1);
        let batch = logs.clone();
        let rotated = tokio::task::spawn_blocking(move || rotate_all(&batch, limit)).await;
        if let Err(e) = rotated {
            tracing::error!(error = %e, "VMM log rotation task failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(LogLimit::check_interval()) => {}
            _ = d.shutdown.cancelled() => return,
        }
    }
}

fn rotate_all(logs: &[PathBuf], limit: LogLimit) {
    for log in logs {
        match rotate(log, limit) {
            Ok(true) => tracing::debug!(log = %log.display(), "rotated the VMM log"),
            Ok(false) => {}
            Err(e) => tracing::warn!(log = %log.display(), error = %e, "cannot rotate the VMM log"),
        }
    }
}
