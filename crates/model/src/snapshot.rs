//! Snapshots: a VM's whole state (memory, devices and both disks) kept as an artifact, and the
//! bodies of the snapshot API. No I/O.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::VmSpec;

/// Where a snapshot is. `creating` exists only inside the snapshot operation: after a crash,
/// reconcile removes such a snapshot with its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Creating,
    Ready,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotState> {
        match s {
            "creating" => Some(SnapshotState::Creating),
            "ready" => Some(SnapshotState::Ready),
            _ => None,
        }
    }
}

/// A snapshot's record. Its files live in `<state>/snapshots/<id>/` (root only): the VMM state
/// (`vm.state`, and with Firecracker `vm.mem`), `root.img` and, when the VM had one, `work.img`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRecord {
    /// 32 hex digits.
    pub id: String,
    /// Unique among snapshots (the VM name rules).
    pub name: String,
    /// uid of the socket user who made it (root: 0).
    pub owner: u32,
    pub source_vm_id: String,
    pub source_vm_name: String,
    /// The VMM driver that saved it (`firecracker`, `qemu`): only it can load the state.
    pub vmm: String,
    /// The source VM's spec when it was taken (vcpu, memory, image, kernel, initrd, boot args,
    /// disk size): a restore boots exactly this.
    pub spec: VmSpec,
    pub state: SnapshotState,
    /// The guest's filesystems were frozen through its agent while the disks were cloned
    /// (`false`: the agent did not answer in time or cannot freeze; the disks are crash
    /// consistent, like after a power cut).
    pub frozen: bool,
    /// The source VM was running (not paused) when the snapshot was taken.
    pub source_was_running: bool,
    /// Bytes the snapshot's files occupy on the host (allocated blocks); 0 while `creating`.
    pub size_bytes: u64,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// `POST /v1/vms/{vm}/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The new snapshot's name (1-63 characters a-z, 0-9 and '-'; not id-like).
    #[schema(min_length = 1, max_length = 63)]
    pub name: String,
}

/// `POST /v1/vms/{vm}/fork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkVmRequest {
    /// The fork's name (`count` = 1), else the prefix of `NAME-1` … `NAME-K`; default
    /// `<vm>-fork-<n>`.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
    /// How many forks (default 1, at most [`MAX_FORKS`]).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 64)]
    pub count: Option<u32>,
    /// SSH public keys for the forks (default: the source's).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

/// At most this many forks per request.
pub const MAX_FORKS: u32 = 64;

/// `202` answer of `POST /v1/vms/{vm}/fork`: the fork operation (on the source VM; it ends
/// when every fork is running or has failed) and the forks' names, recorded `creating`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    pub operation: crate::api::Operation,
    pub vms: Vec<String>,
}

/// `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotRecord>,
}

/// The directory of snapshot `id` under the state dir.
pub fn snapshot_dir(state: &std::path::Path, id: &str) -> std::path::PathBuf {
    state.join("snapshots").join(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_as_the_store_spells_them() {
        for s in [SnapshotState::Creating, SnapshotState::Ready] {
            assert_eq!(SnapshotState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert_eq!(SnapshotState::parse("gone"), None);
    }

    #[test]
    fn requests_deny_unknown_fields() {
        let e = serde_json::from_str::<CreateSnapshotRequest>(r#"{"name":"a","x":1}"#);
        assert!(e.is_err());
    }
}
