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
    // Logs already warned about: a log the VMM replaced by a link fails at every check.
    let mut warned = std::collections::HashSet::new();
    let mut tick = 0u32;
    loop {
        if tick.is_multiple_of(REFRESH_EVERY) {
            logs = live_logs(&d);
            warned.retain(|p| logs.contains(p));
        }
        tick = tick.wrapping_add(1);
        if !logs.is_empty() {
            let batch = logs.clone();
            match tokio::task::spawn_blocking(move || rotate_all(&batch, limit)).await {
                Ok(failed) => {
                    for (log, e) in failed {
                        if warned.insert(log.clone()) {
                            tracing::warn!(log = %log.display(), error = %e, "cannot rotate the VMM log");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "VMM log rotation task failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LogLimit::check_interval()) => {}
            _ = d.shutdown.cancelled() => return,
        }
    }
}

/// Rotates every log that needs it; returns those that failed, with why.
fn rotate_all(logs: &[PathBuf], limit: LogLimit) -> Vec<(PathBuf, std::io::Error)> {
    let mut failed = Vec::new();
    for log in logs {
        match rotate(log, limit) {
            Ok(true) => tracing::debug!(log = %log.display(), "rotated the VMM log"),
            Ok(false) => {}
            Err(e) => failed.push((log.clone(), e)),
        }
    }
    failed
}
