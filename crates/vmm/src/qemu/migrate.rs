//! Saving a VM's state (memory and devices, not its disks) to a file and loading it into a new
//! QEMU: the QMP steps a snapshot/restore flow is built from.
//!
//! Save: pause the guest (QMP `stop`), then [`save_to_file`]. Restore: start a QEMU with the
//! same command line plus `-incoming defer` ([`Qemu::spawn_incoming`]: paused, with a new
//! agent-channel sidecar), [`load_from_file`], then `cont` ([`crate::Vmm::boot`] does it). The
//! agent notices the new sidecar's session and serves it; the old one's streams are gone.
//!
//! With `mapped_ram` (QEMU ≥ 9.0) each RAM page has a fixed offset in the file: the file is
//! about the size of guest RAM (sparse where pages were never written) and is written and read
//! in parallel-friendly blocks; both ends must set it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wick_model::VmmHandle;

use super::qmp::Qmp;
use super::Qemu;
use crate::{Spawned, VmmConfig, VmmError};

/// What a finished migration reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// QEMU's `total-time` in milliseconds (save side; 0 when not reported).
    pub total_ms: u64,
    /// RAM bytes transferred (0 when not reported).
    pub ram_bytes: u64,
}

/// The `file:` URI of `file`, refused when QEMU would misread it (a comma starts URI options).
fn file_uri(file: &Path) -> Result<String, VmmError> {
    let s = file
        .to_str()
        .filter(|s| !s.contains(',') && file.is_absolute());
    s.map(|s| format!("file:{s}")).ok_or_else(|| {
        VmmError::Other(format!(
            "migration file {}: must be an absolute UTF-8 path without commas",
            file.display()
        ))
    })
}

/// Sets the `mapped-ram` capability (needed on both ends when used).
async fn set_mapped_ram(q: &mut Qmp, on: bool) -> Result<(), VmmError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "mapped-ram", "state": on}]})),
    )
    .await
    .map(drop)
}

/// Polls `query-migrate` until `completed`; a `failed`/`cancelled` migration is an error with
/// QEMU's reason. Bounded by `timeout`.
pub async fn wait_migration(q: &mut Qmp, timeout: Duration) -> Result<MigrationStats, VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = q.execute("query-migrate", None).await?;
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => {
                let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
                return Ok(MigrationStats {
                    total_ms: n(info.get("total-time")),
                    ram_bytes: n(info.pointer("/ram/transferred")),
                });
            }
            s @ ("failed" | "cancelled") => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or(s);
                return Err(VmmError::Api {
                    call: "QMP migrate".into(),
                    message: format!("migration {s}: {why}"),
                });
            }
            _ if Instant::now() >= deadline => {
                return Err(VmmError::Timeout(
                    timeout,
                    format!("the migration ({info})"),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Writes the VM's state to `file` (the guest should be paused: `stop`) and waits until done.
pub async fn save_to_file(
    q: &mut Qmp,
    file: &Path,
    mapped_ram: bool,
    timeout: Duration,
) -> Result<MigrationStats, VmmError> {
    let uri = file_uri(file)?;
    set_mapped_ram(q, mapped_ram).await?;
    q.execute("migrate", Some(json!({ "uri": uri }))).await?;
    wait_migration(q, timeout).await
}

/// Loads the VM's state from `file` into a QEMU started with `-incoming defer`; the guest stays
/// paused until `cont`.
pub async fn load_from_file(
    q: &mut Qmp,
    file: &Path,
    mapped_ram: bool,
    timeout: Duration,
) -> Result<MigrationStats, VmmError> {
    let uri = file_uri(file)?;
    set_mapped_ram(q, mapped_ram).await?;
    q.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    wait_migration(q, timeout).await
}

impl Qemu {
    /// Like [`crate::Vmm::spawn`], but QEMU waits for an incoming migration (`-incoming
    /// defer`): load one with [`Qemu::load_state`], then boot (`cont`).
    pub async fn spawn_incoming(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        self.spawn_with(handle, cfg, timeout, true).await
    }

    /// [`save_to_file`] on the VM's QMP socket.
    pub async fn save_state(
        &self,
        handle: &VmmHandle,
        file: &Path,
        mapped_ram: bool,
        timeout: Duration,
    ) -> Result<MigrationStats, VmmError> {
        let mut q = Qmp::connect(&handle.api_socket, timeout).await?;
        save_to_file(&mut q, file, mapped_ram, timeout).await
    }

    /// [`load_from_file`] on the VM's QMP socket.
    pub async fn load_state(
        &self,
        handle: &VmmHandle,
        file: &Path,
        mapped_ram: bool,
        timeout: Duration,
    ) -> Result<MigrationStats, VmmError> {
        let mut q = Qmp::connect(&handle.api_socket, timeout).await?;
        load_from_file(&mut q, file, mapped_ram, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_are_checked() {
        assert_eq!(
            file_uri(Path::new("/v/state.bin")).unwrap(),
            "file:/v/state.bin"
        );
        assert!(file_uri(Path::new("/v/a,b")).is_err());
        assert!(file_uri(Path::new("rel")).is_err());
    }
}
