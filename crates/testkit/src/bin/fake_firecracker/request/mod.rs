//! The API's requests, one module per resource as in Firecracker's `request` modules, and the
//! router that dispatches to them.

pub mod actions;
pub mod boot_source;
pub mod drive;
pub mod logger;
pub mod machine_configuration;
pub mod metrics;
pub mod net;
pub mod snapshot;
pub mod vm;
pub mod vsock;

use bytes::Bytes;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::vm::{Shared, Vm};
use crate::VERSION;
use actions::put_actions;
use boot_source::put_boot_source;
use drive::{patch_drive, put_drive};
use logger::put_logger;
use machine_configuration::put_machine_config;
use metrics::put_metrics;
use net::{patch_net, put_net};
use snapshot::put_snapshot;
use vm::patch_vm;
use vsock::put_vsock;

/// Outcome of one API call.
pub enum Reply {
    NoContent,
    Json(Value),
    Fault(String),
}

pub fn fault(msg: impl Into<String>) -> Reply {
    Reply::Fault(msg.into())
}

pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        fault(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's `checked_id`.
pub fn checked_id(id: Option<&str>) -> Result<&str, Reply> {
    match id {
        None | Some("") => Err(fault("The ID cannot be empty.")),
        Some(id) if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) => Err(fault(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
        Some(id) => Ok(id),
    }
}

pub fn route(
    vm: &mut Vm,
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Option<Bytes>,
) -> Reply {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    let second = tokens.next();
    // Firecracker's `boot_path`: set by the call, whatever its outcome.
    if method == Method::PUT
        && matches!(
            first,
            "boot-source" | "drives" | "machine-config" | "network-interfaces" | "vsock"
        )
    {
        vm.boot_path = true;
    }
    let res = match (method, first, body.as_ref()) {
        (&Method::GET, "", None) => Ok(Reply::Json(vm.instance_info())),
        (&Method::GET, "version", None) => {
            Ok(Reply::Json(json!({ "firecracker_version": VERSION })))
        }
        (&Method::GET, "vm", None) if second == Some("config") => Ok(Reply::Json(vm.full_config())),
        (&Method::GET, "machine-config", None) => Ok(Reply::Json(json!(vm.machine))),
        (&Method::GET, _, Some(_)) => Err(fault("GET request cannot have a body.")),
        (&Method::PUT, "actions", Some(b)) => put_actions(vm, shared, b),
        (&Method::PUT, "boot-source", Some(b)) => put_boot_source(vm, b),
        (&Method::PUT, "drives", Some(b)) => put_drive(vm, second, b),
        (&Method::PUT, "logger", Some(b)) => put_logger(vm, b),
        (&Method::PUT, "machine-config", Some(b)) => put_machine_config(vm, b),
        (&Method::PUT, "metrics", Some(b)) => put_metrics(vm, b),
        (&Method::PUT, "network-interfaces", Some(b)) => put_net(vm, second, b),
        (&Method::PUT, "vsock", Some(b)) => put_vsock(vm, shared, b),
        (&Method::PUT, "snapshot", Some(b)) => Ok(put_snapshot(vm, shared, second, b)),
        (&Method::PUT, _, None) => Err(fault("Empty PUT request.")),
        (&Method::PATCH, "drives", Some(b)) => patch_drive(vm, second, b),
        (&Method::PATCH, "network-interfaces", Some(b)) => patch_net(vm, second, b),
        (&Method::PATCH, "vm", Some(b)) => patch_vm(vm, b),
        (&Method::PATCH, _, None) => Err(fault("Empty PATCH request.")),
        (m, other, _) => Err(fault(format!(
            "Invalid request method and/or path: {} {other}.",
            m.as_str()
        ))),
    };
    match res {
        Ok(r) | Err(r) => r,
    }
}
