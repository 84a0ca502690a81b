//! The stats poller and auto-stop: every `stats_poll_interval` it samples CPU time and RSS of
//! each running or paused VM's VMM (and sidecars) from `/proc`, and stops VMs (paused ones
//! included) untouched for `auto_stop_stale_after` through the ordinary stop operation — or,
//! with `auto_stop_action = "suspend"`, the suspend operation (a failed suspend falls back to
//! a stop).
//!
//! Samples are observations, not host resources: they live in memory and start empty after a
//! restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wick_model::api::VmStats;
use wick_model::vm::LifecycleOp;
use wick_model::VmRecord;

use crate::daemon::Daemon;

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    at_rfc: String,
    cpu_ticks: u64,
    cpu_percent: Option<f64>,
    rss_kib: u64,
}

/// Latest samples by VM id.
#[derive(Default)]
pub struct Stats {
    samples: Mutex<HashMap<String, Sample>>,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ')': state is field 3; utime 14, stime 15 → indices 11, 12
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pids(vm: &VmRecord) -> Vec<u32> {
    let Some(h) = &vm.runtime.vmm else {
        return Vec::new();
    };
    h.pid
        .into_iter()
        .chain(h.sidecars.iter().filter_map(|s| s.pid))
        .collect()
}

impl Stats {
    /// Takes a sample of `vm` now.
    pub fn sample(&self, vm: &VmRecord) {
        let ps = pids(vm);
        if ps.is_empty() {
            self.samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&vm.id);
            return;
        }
        let ticks: u64 = ps.iter().filter_map(|p| cpu_ticks(*p)).sum();
        let rss: u64 = ps.iter().filter_map(|p| wick_host::proc::rss_kib(*p)).sum();
        let now = Instant::now();
        let mut map = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let cpu_percent = map.get(&vm.id).and_then(|prev| {
            let dt = now.duration_since(prev.at).as_secs_f64();
            (dt > 0.0 && ticks >= prev.cpu_ticks)
                .then(|| (ticks - prev.cpu_ticks) as f64 / ticks_per_sec() / dt * 100.0)
        });
        map.insert(
            vm.id.clone(),
            Sample {
                at: now,
                at_rfc: wick_store::now(),
                cpu_ticks: ticks,
                cpu_percent,
                rss_kib: rss,
            },
        );
    }

    /// The VM's stats as of the last sample (sampling now if there is none yet).
    pub fn get(&self, vm: &VmRecord) -> VmStats {
        if vm.state.guest_up()
            && !self
                .samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&vm.id)
        {
            self.sample(vm);
        }
        let s = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vm.id)
            .cloned();
        VmStats {
            name: vm.name.clone(),
            state: vm.state.to_string(),
            vcpu: vm.spec.vcpu,
            memory_mib: vm.spec.memory_mib,
            cpu_percent: s.as_ref().and_then(|s| s.cpu_percent),
            rss_kib: s.as_ref().map(|s| s.rss_kib),
            sampled_at: s.map(|s| s.at_rfc),
            touched_at: vm.touched_at.clone(),
        }
    }
}

/// Seconds since an RFC 3339 timestamp written by `wick_store::now`.
fn age(ts: &str) -> Option<Duration> {
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    let d = time::OffsetDateTime::now_utc() - t;
    d.try_into().ok()
}

/// Runs the poller until the daemon shuts down.
pub async fn run_poller(d: Arc<Daemon>) {
    let interval = d
        .config
        .stats_poll_interval
        .as_deref()
        .and_then(|s| crate::config::parse_duration(s).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(10));
    let stale_after = d
        .config
        .auto_stop_stale_after
        .as_deref()
        .and_then(|s| crate::config::parse_duration(s).ok())
        .filter(|d| !d.is_zero());
    let action = d.config.auto_stop_action().unwrap_or(LifecycleOp::Stop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = d.shutdown.cancelled() => return,
        }
        let Ok(vms) = d.store.list_vms(None) else {
            continue;
        };
        // Paused VMs too: their VMM holds memory, and auto-stop stops a paused VM left
        // untouched as it stops an idle running one (stop resumes it for a clean poweroff).
        for vm in vms.into_iter().filter(|v| v.state.guest_up()) {
            d.stats.sample(&vm);
            if vm.is_pooled() {
                continue; // the warm pool's: kept running on purpose
            }
            if let (Some(limit), Some(idle)) = (stale_after, age(&vm.touched_at)) {
                if idle > limit {
                    tracing::info!(vm = %vm.name, idle = ?idle, ?action, "auto-stop: untouched for too long");
                    auto_stop(&d, vm, action);
                }
            }
        }
    }
}

/// Starts auto-stop's `action` on an untouched VM. A suspend that fails (a driver that cannot
/// save the state, a full disk) leaves the VM running, so it is stopped instead.
fn auto_stop(d: &Arc<Daemon>, vm: VmRecord, action: LifecycleOp) {
    let (name, id) = (vm.name.clone(), vm.id.clone());
    let op = match d.begin(action, vm) {
        Ok(op) => op,
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "auto-stop skipped");
            return;
        }
    };
    if action != LifecycleOp::Suspend {
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        let Some(e) = op.wait().await.error else {
            return;
        };
        tracing::warn!(vm = %name, error = %e.message, "auto-stop: suspend failed; stopping instead");
        match d.store.get_vm(&id) {
            Ok(vm) if vm.state.guest_up() => {
                if let Err(e) = d.begin(LifecycleOp::Stop, vm) {
                    tracing::warn!(vm = %name, error = %e, "auto-stop skipped");
                }
            }
            _ => {}
        }
    });
}
