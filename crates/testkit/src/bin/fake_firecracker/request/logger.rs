//! `PUT /logger`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{fault, parse, Reply};
use crate::vm::{open_append, Vm};
use crate::VERSION;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

pub fn put_logger(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Logger = parse(body)?;
    vm.pre_boot()?;
    if let Some(level) = &cfg.level {
        let ok = ["error", "warning", "warn", "info", "debug", "trace", "off"]
            .contains(&level.to_ascii_lowercase().as_str());
        if !ok {
            return Err(fault(format!(
                "An error occurred when deserializing the json body of a request: unknown log level {level:?}."
            )));
        }
    }
    if let Some(path) = &cfg.log_path {
        if let Err(e) = open_append(path) {
            return Err(fault(format!(
                "Logger error: Failed to open target file: {e}"
            )));
        }
    }
    vm.logger = Some(cfg);
    vm.log(&format!("Running Firecracker v{VERSION} (a fake)"));
    Ok(Reply::NoContent)
}
