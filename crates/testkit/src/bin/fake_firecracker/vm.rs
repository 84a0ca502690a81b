//! The microVM's state and its phases (`Not started` → `Running` ⇄ `Paused`, or `Not started`
//! → a loaded snapshot, `Paused` or `Running`), with the configuration each request module
//! fills in.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::request::boot_source::BootSource;
use crate::request::drive::Drive;
use crate::request::logger::Logger;
use crate::request::machine_configuration::MachineConfig;
use crate::request::metrics::Metrics;
use crate::request::net::NetIface;
use crate::request::vsock::Vsock;
use crate::request::{fault, Reply};
use crate::VERSION;

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    NotStarted,
    Running,
    Paused,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NotStarted => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        }
    }
}

pub struct Vm {
    pub id: String,
    pub api_sock: PathBuf,
    pub phase: Phase,
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetIface>,
    pub vsock: Option<Vsock>,
    pub vsock_task: Option<tokio::task::JoinHandle<()>>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    /// The agent process of the fake guest (`FAKE_FC_AGENT_BIN`), once started.
    pub agent: Option<std::process::Child>,
    /// Where that agent listens; `CONNECT 10700` is spliced there.
    pub agent_sock: Option<PathBuf>,
    /// The fake guest's root directory (`--root-prefix` of its agent).
    pub agent_root: Option<PathBuf>,
    /// A boot-specific resource was configured (boot source, machine config, drive, network,
    /// vsock): `/snapshot/load` is no longer allowed, as in Firecracker.
    pub boot_path: bool,
}

pub type Shared = Arc<Mutex<Vm>>;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Vm {
    /// A microVM not started yet, with Firecracker's default machine config.
    pub fn new(id: String, api_sock: PathBuf) -> Vm {
        Vm {
            id,
            api_sock,
            phase: Phase::NotStarted,
            machine: MachineConfig::default(),
            boot: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            vsock_task: None,
            logger: None,
            metrics: None,
            agent: None,
            agent_sock: None,
            agent_root: None,
            boot_path: false,
        }
    }

    pub fn pre_boot(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Ok(())
        } else {
            Err(fault(POST_BOOT))
        }
    }

    pub fn post_boot(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Err(fault(PRE_BOOT))
        } else {
            Ok(())
        }
    }

    pub fn log(&self, line: &str) {
        if let Some(path) = self.logger.as_ref().and_then(|l| l.log_path.as_deref()) {
            if let Ok(mut f) = open_append(path) {
                let _ = writeln!(f, "[{}:fake-firecracker] {line}", self.id);
            }
        }
    }

    pub fn write_metrics(&self) {
        if let Some(m) = &self.metrics {
            if let Ok(mut f) = open_append(&m.metrics_path) {
                let line = json!({
                    "utc_timestamp_ms": now_ms() as u64,
                    "fake": true,
                    "vmm": { "state": self.phase.as_str() },
                    "vcpu": { "count": self.machine.vcpu_count },
                });
                let _ = writeln!(f, "{line}");
            }
        }
    }

    pub fn instance_info(&self) -> Value {
        json!({
            "id": self.id,
            "state": self.phase.as_str(),
            "vmm_version": VERSION,
            "app_name": "Firecracker",
        })
    }

    pub fn full_config(&self) -> Value {
        json!({
            "balloon": null,
            "drives": self.drives,
            "boot-source": self.boot,
            "cpu-config": null,
            "logger": self.logger,
            "machine-config": self.machine,
            "metrics": self.metrics,
            "mmds-config": null,
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "entropy": null,
        })
    }

    /// The fake guest's root directory, when a real agent runs in it.
    pub fn guest_root(&self) -> Option<PathBuf> {
        self.agent_root.clone()
    }

    pub fn remove_vsock(&mut self) {
        if let Some(t) = self.vsock_task.take() {
            t.abort();
        }
        if let Some(v) = &self.vsock {
            let _ = std::fs::remove_file(&v.uds_path);
        }
    }
}

/// Stops the fake guest's agent and exits the process with `code`.
pub fn exit_with(vm: &Shared, code: i32) -> ! {
    let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
    vm.stop_agent();
    std::process::exit(code);
}

/// Opens an existing file for appending (logs and metrics, as Firecracker does).
pub fn open_append(path: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().append(true).open(path)
}
