//! Shared vocabulary of wick.
//!
//! Every other crate speaks in these types: validated VM [`name`]s, human [`size`]s, the
//! durable [`vm`] record (spec + runtime), and the [`api`] request/response bodies that cross the
//! `wickd` Unix socket. Nothing here does I/O; everything here is cheap to unit-test.

pub mod api;
pub mod name;
pub mod paths;
pub mod size;
pub mod snapshot;
pub mod vm;

pub use name::{generate_name, validate_name, validate_vm_name, NameError};
pub use paths::Paths;
pub use size::{parse_size_mib, SizeError};
pub use snapshot::{SnapshotRecord, SnapshotState};
pub use vm::{
    new_vm_id, Grant, ImageConfig, InitMode, PoolSlot, PortMapping, RestoreFrom, Sidecar, VmRecord,
    VmRuntime, VmSpec, VmState, VmmHandle, VmmJail, WorkspaceInfo,
};
