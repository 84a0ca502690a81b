//! Typed runtime requests of the Firecracker API, after Firecracker's own `request` modules: one
//! module per API resource (`vm`: `PATCH /vm`; `snapshot`: `PUT /snapshot/create|load`), each
//! body a serde type, all of them one [`Action`] that knows its method, path and JSON.
//!
//! State rules the real binary enforces (v1.16, read from its source; the fake Firecracker
//! mirrors them): `PATCH /vm` and `/snapshot/create` only after `InstanceStart` or a load
//! ("The requested operation is not supported before starting the microVM."); create only
//! while paused ("Create snapshot error: Cannot save the microVM state: Operation not allowed:
//! save/restore unavailable while running"); `/snapshot/load` only in a fresh process — after
//! boot "The requested operation is not supported after starting the microVM.", after any
//! boot-specific configuration (boot source, machine config, drives, network, vsock) "Load
//! snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific
//! resources.". Vsock connections are reset on restore: the guest's listeners must re-listen.

use std::path::PathBuf;

use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `PATCH /vm` body: the state wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `snapshot_type` of `/snapshot/create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All guest memory.
    #[default]
    Full,
    /// Only pages dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create`: the microVM state and its memory, written by Firecracker (paths as
/// Firecracker sees them, i.e. in the jail when jailed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

/// How a loaded snapshot's memory is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// The memory file, mapped privately (copy on write: forks share its pages).
    File,
    /// A userfaultfd handler listening on `backend_path` serves page faults.
    Uffd,
}

/// `mem_backend` of `/snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// A network interface of the snapshot attached to another host TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// The vsock device's host socket, moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemBackend,
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Resume the guest right after loading (else it stays `Paused`).
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Step the guest's realtime clock to the host's on resume.
    #[serde(default)]
    pub clock_realtime: bool,
}

/// A runtime request the driver sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `PATCH /vm {"state": …}`.
    SetState(VmState),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoad),
}

impl Action {
    /// Method, path and body of the request.
    pub fn http(&self) -> (Method, &'static str, Value) {
        // Plain data: serializing cannot fail.
        let body = match self {
            Action::SetState(s) => serde_json::json!({ "state": s }),
            Action::CreateSnapshot(c) => serde_json::to_value(c).expect("plain data"),
            Action::LoadSnapshot(l) => serde_json::to_value(l).expect("plain data"),
        };
        match self {
            Action::SetState(_) => (Method::PATCH, "/vm", body),
            Action::CreateSnapshot(_) => (Method::PUT, "/snapshot/create", body),
            Action::LoadSnapshot(_) => (Method::PUT, "/snapshot/load", body),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_have_firecrackers_shape() {
        let (m, p, b) = Action::SetState(VmState::Paused).http();
        assert_eq!(
            (m, p, b),
            (Method::PATCH, "/vm", json!({"state": "Paused"}))
        );
        let create = SnapshotCreate {
            snapshot_type: SnapshotType::Diff,
            snapshot_path: "/d/vm.snap".into(),
            mem_file_path: "/d/vm.mem".into(),
        };
        let (m, p, b) = Action::CreateSnapshot(create).http();
        assert_eq!((m, p), (Method::PUT, "/snapshot/create"));
        assert_eq!(
            b,
            json!({"snapshot_type": "Diff", "snapshot_path": "/d/vm.snap", "mem_file_path": "/d/vm.mem"})
        );
        let load = SnapshotLoad {
            snapshot_path: "/d/vm.snap".into(),
            mem_backend: MemBackend {
                backend_type: MemBackendType::Uffd,
                backend_path: "/d/uffd.sock".into(),
            },
            track_dirty_pages: true,
            resume_vm: false,
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "wk-0123".into(),
            }],
            vsock_override: Some(VsockOverride {
                uds_path: "/e/vsock.sock".into(),
            }),
            clock_realtime: true,
        };
        let (m, p, b) = Action::LoadSnapshot(load).http();
        assert_eq!((m, p), (Method::PUT, "/snapshot/load"));
        assert_eq!(
            b,
            json!({"snapshot_path": "/d/vm.snap",
                   "mem_backend": {"backend_type": "Uffd", "backend_path": "/d/uffd.sock"},
                   "track_dirty_pages": true, "resume_vm": false,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "wk-0123"}],
                   "vsock_override": {"uds_path": "/e/vsock.sock"}, "clock_realtime": true})
        );
    }
}
