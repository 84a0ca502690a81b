//! `GET`/`PUT /machine-config`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{fault, parse, Reply};
use crate::vm::Vm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<Value>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

pub fn put_machine_config(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: MachineConfig = parse(body)?;
    vm.pre_boot()?;
    if cfg.vcpu_count == 0
        || cfg.vcpu_count > 32
        || (cfg.smt && cfg.vcpu_count > 1 && cfg.vcpu_count % 2 == 1)
    {
        return Err(fault(
            "Machine config error: The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
        ));
    }
    if cfg.mem_size_mib == 0 {
        return Err(fault(
            "Machine config error: The memory size (MiB) is invalid.",
        ));
    }
    vm.machine = cfg;
    Ok(Reply::NoContent)
}
