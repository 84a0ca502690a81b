//! `PUT`/`PATCH /network-interfaces/{id}`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{checked_id, fault, parse, Reply};
use crate::vm::Vm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<Value>,
    #[serde(default)]
    pub tx_rate_limiter: Option<Value>,
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

pub fn put_net(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let cfg: NetIface = parse(body)?;
    if cfg.iface_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.pre_boot()?;
    if let Some(mac) = &cfg.guest_mac {
        if !valid_mac(mac) {
            return Err(fault(format!(
                "An error occurred when deserializing the json body of a request: invalid MAC address {mac:?}."
            )));
        }
    }
    if vm
        .nets
        .iter()
        .any(|n| n.host_dev_name == cfg.host_dev_name && n.iface_id != cfg.iface_id)
    {
        return Err(fault(format!(
            "Network config error: The host device name {} is already in use.",
            cfg.host_dev_name
        )));
    }
    match vm.nets.iter_mut().find(|n| n.iface_id == cfg.iface_id) {
        Some(n) => *n = cfg,
        None => vm.nets.push(cfg),
    }
    Ok(Reply::NoContent)
}

pub fn patch_net(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let upd: NetUpdate = parse(body)?;
    if upd.iface_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.post_boot()?;
    let Some(net) = vm.nets.iter_mut().find(|n| n.iface_id == upd.iface_id) else {
        return Err(fault(format!(
            "Network config error: Invalid interface ID - not found: {}",
            upd.iface_id
        )));
    };
    if upd.rx_rate_limiter.is_some() {
        net.rx_rate_limiter = upd.rx_rate_limiter;
    }
    if upd.tx_rate_limiter.is_some() {
        net.tx_rate_limiter = upd.tx_rate_limiter;
    }
    Ok(Reply::NoContent)
}
