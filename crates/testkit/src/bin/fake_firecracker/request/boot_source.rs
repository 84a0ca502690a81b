//! `PUT /boot-source`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{fault, parse, Reply};
use crate::vm::Vm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

pub fn put_boot_source(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: BootSource = parse(body)?;
    vm.pre_boot()?;
    if let Err(e) = std::fs::File::open(&cfg.kernel_image_path) {
        return Err(fault(format!(
            "Boot source error: The kernel file cannot be opened: {e}"
        )));
    }
    if let Some(initrd) = &cfg.initrd_path {
        if let Err(e) = std::fs::File::open(initrd) {
            return Err(fault(format!(
                "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
            )));
        }
    }
    vm.boot = Some(cfg);
    Ok(Reply::NoContent)
}
