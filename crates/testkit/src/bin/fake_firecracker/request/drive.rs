//! `PUT`/`PATCH /drives/{id}`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{checked_id, fault, parse, Reply};
use crate::vm::Vm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveUpdate {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<Value>,
}

pub fn put_drive(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let cfg: Drive = parse(body)?;
    if cfg.drive_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.pre_boot()?;
    let Some(path) = &cfg.path_on_host else {
        return Err(fault(
            "Drive config error: Unable to create the virtio block device: path_on_host is required (the fake has no vhost-user)",
        ));
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(!cfg.is_read_only)
        .open(path)
    {
        return Err(fault(format!(
            "Drive config error: Unable to create the virtio block device: Unable to open the backing file {path}: {e}"
        )));
    }
    if cfg.is_root_device
        && vm
            .drives
            .iter()
            .any(|d| d.is_root_device && d.drive_id != cfg.drive_id)
    {
        return Err(fault(
            "Drive config error: A root block device already exists!",
        ));
    }
    match vm.drives.iter_mut().find(|d| d.drive_id == cfg.drive_id) {
        Some(d) => *d = cfg,
        None => vm.drives.push(cfg),
    }
    Ok(Reply::NoContent)
}

pub fn patch_drive(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let upd: DriveUpdate = parse(body)?;
    if upd.drive_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.post_boot()?;
    let Some(drive) = vm.drives.iter_mut().find(|d| d.drive_id == upd.drive_id) else {
        return Err(fault(format!(
            "Drive config error: Invalid block device ID: {}",
            upd.drive_id
        )));
    };
    if let Some(path) = upd.path_on_host {
        if let Err(e) = std::fs::File::open(&path) {
            return Err(fault(format!(
                "Drive config error: Unable to patch the block device: {path}: {e}"
            )));
        }
        drive.path_on_host = Some(path);
    }
    if upd.rate_limiter.is_some() {
        drive.rate_limiter = upd.rate_limiter;
    }
    Ok(Reply::NoContent)
}
