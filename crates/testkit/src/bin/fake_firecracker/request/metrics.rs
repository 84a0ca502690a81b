//! `PUT /metrics`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{fault, parse, Reply};
use crate::vm::{open_append, Vm};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

pub fn put_metrics(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Metrics = parse(body)?;
    vm.pre_boot()?;
    if let Err(e) = open_append(&cfg.metrics_path) {
        return Err(fault(format!(
            "Metrics error: Cannot initialize the metrics system due to errors: Failed to open target file: {e}"
        )));
    }
    vm.metrics = Some(cfg);
    Ok(Reply::NoContent)
}
