//! [`crate::Vmm::save_state`] of each driver: the paused guest's memory and device state written
//! by the VMM process itself into files in a directory it may write (the VM dir), so no file is
//! ever opened by the VMM outside what it already owns. wickd's snapshot flow moves them into
//! the snapshot's root-only dir afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use wick_model::VmmHandle;

use crate::firecracker::{request, Firecracker};
use crate::qemu::Qemu;
use crate::VmmError;

/// Firecracker: `PUT /snapshot/create` (full) to `<dir>/<prefix>.vmstate` and `.mem`.
pub(crate) async fn firecracker_save(
    fc: &Firecracker,
    handle: &VmmHandle,
    dir: &Path,
    prefix: &str,
    timeout: Duration,
) -> Result<Vec<PathBuf>, VmmError> {
    if fc.jailed() {
        return Err(VmmError::Other(
            "snapshots of jailed Firecracker VMs are not supported yet (unset jailer_bin)".into(),
        ));
    }
    let state = dir.join(format!("{prefix}.vmstate"));
    let mem = dir.join(format!("{prefix}.mem"));
    let req = request::SnapshotCreate {
        snapshot_type: request::SnapshotType::Full,
        snapshot_path: state.clone(),
        mem_file_path: mem.clone(),
    };
    tokio::time::timeout(timeout, fc.create_snapshot(handle, req))
        .await
        .unwrap_or_else(|_| {
            Err(VmmError::Timeout(
                timeout,
                "Firecracker to answer PUT /snapshot/create".into(),
            ))
        })?;
    Ok(vec![state, mem])
}

/// QEMU: a migration to `<dir>/<prefix>.state` with `mapped-ram` (a restore sets it too).
pub(crate) async fn qemu_save(
    q: &Qemu,
    handle: &VmmHandle,
    dir: &Path,
    prefix: &str,
    timeout: Duration,
) -> Result<Vec<PathBuf>, VmmError> {
    let file = dir.join(format!("{prefix}.state"));
    q.save_state(handle, &file, true, timeout).await?;
    Ok(vec![file])
}
