//! Snapshots: `wick vm snapshot VM --name SNAP` keeps a running or paused VM's whole state — the
//! VMM's memory and device state and clones of both disks — as an artifact in
//! `<state>/snapshots/<id>/` (root only: guest memory holds secrets), and `wick snapshot
//! list|show|delete`.
//!
//! The flow runs as an operation under the VM's lock, durable like every host resource: the
//! record is written `creating` before any file exists (failpoint `snapshot-recorded`); the
//! guest is paused (`snapshot-paused`); the VMM writes its state into the VM dir as
//! `snapshot-<id>.*` (a dir its own uid can write), which wickd moves into the snapshot dir and
//! makes root's (`snapshot-state-saved`); the disks are cloned while the guest is paused
//! (`snapshot-disks-cloned`); the guest is resumed if it was running; the record becomes
//! `ready` with its size. Any failure or cancel removes the files and the record and leaves the
//! VM as it was. After a crash, [`reconcile_snapshots`] removes every `creating` snapshot with
//! its files (and resumes the source VM if the snapshot had paused it), and sweeps directories
//! under `snapshots/` that no record names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wick_agent_proto::{AgentClient, AGENT_PORT};
use wick_model::api::OpKind;
use wick_model::snapshot::{snapshot_dir, CreateSnapshotRequest};
use wick_model::vm::VmAction;
use wick_model::{SnapshotRecord, SnapshotState, VmRecord, VmState};
use wick_store::now;

use super::{Caller, Daemon, PAUSE_TIMEOUT};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ops::OpEntry;
use crate::perms::{self, Access};

/// How long the VMM may take to write the guest's state (a 1 GiB TCG guest: ~1 s measured).
const SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a guest's agent may take to answer a freeze or thaw: a guest that does not answer
/// in time is snapshotted unfrozen (recorded as `frozen: false`).
pub(super) const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The guest mount points frozen for a snapshot: the root and work filesystems.
pub(super) fn freeze_mounts() -> Vec<String> {
    vec!["/".into(), "/root".into()]
}

/// Prefix of the VMM's state files while they are still in the VM dir.
fn staging_prefix(snap_id: &str) -> String {
    format!("snapshot-{snap_id}")
}

impl Daemon {
    /// Starts the snapshot operation of the caller's VM `vm_ref` (running or paused).
    pub fn snapshot(
        self: &Arc<Self>,
        vm_ref: &str,
        req: CreateSnapshotRequest,
        caller: Caller,
    ) -> Result<Arc<OpEntry>> {
        wick_model::validate_vm_name(&req.name)
            .map_err(|e| Error::invalid(e.to_string().replace("VM name", "snapshot name")))?;
        let vm = self.find(vm_ref, caller)?;
        if !vm.state.guest_up() {
            return Err(Error::conflict(format!(
                "VM {} is {}; only a running or paused VM can be snapshotted",
                vm.name, vm.state
            )));
        }
        // Early answer for the common case; the record's unique name is the real check.
        if self.store.find_snapshot(&req.name, None).is_ok() {
            return Err(wick_store::StoreError::SnapshotNameTaken(req.name).into());
        }
        let name = req.name;
        self.spawn_op(OpKind::Snapshot, vm, move |d, op, vm| async move {
            let vm = d.store.get_vm(&vm.id)?;
            let id = wick_model::new_vm_id();
            d.snapshot_flow(&op, (id, name), vm, caller, false)
                .await
                .map(Some)
        })
    }

    /// Takes snapshot `id` named `name` of `vm`. A `transient` snapshot (a fork's) is not held
    /// to `[limits] max_snapshots` and stays `creating`: its fork removes it once the forks
    /// have loaded, and after a crash reconcile removes it like any partial snapshot.
    pub(super) async fn snapshot_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        (id, name): (String, String),
        vm: VmRecord,
        caller: Caller,
        transient: bool,
    ) -> Result<VmRecord> {
        if !vm.state.guest_up() {
            return Err(Error::conflict(format!(
                "VM {} is {}; only a running or paused VM can be snapshotted",
                vm.name, vm.state
            )));
        }
        let mut snap = SnapshotRecord {
            id,
            name,
            owner: caller.uid,
            source_vm_id: vm.id.clone(),
            source_vm_name: vm.name.clone(),
            vmm: self.vmm.name().to_string(),
            spec: vm.spec.clone(),
            state: SnapshotState::Creating,
            frozen: false,
            source_was_running: vm.state == VmState::Running,
            size_bytes: 0,
            created_at: now(),
        };
        op.stage("record snapshot");
        {
            let _quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
            if !transient {
                self.check_snapshot_limit(caller.uid)?;
            }
            self.store.create_snapshot(&snap)?;
        }
        failpoint::hit("snapshot-recorded");
        let mut paused = false;
        let mut froze = false;
        let out = self
            .take_snapshot(op, &mut snap, &vm, &mut paused, &mut froze)
            .await;
        if paused {
            // Resumed on every path: the VM is left as it was.
            if let Err(e) = self.resume_source(&vm).await {
                tracing::error!(vm = %vm.name, error = %e, "snapshot: cannot resume the source VM");
                // The record follows the VMM: the VM stays paused (`wick vm resume` retries).
                let mut now_paused = self.store.get_vm(&vm.id)?;
                if now_paused.apply(VmAction::Pause).is_ok() {
                    self.store.save_vm(&now_paused)?;
                }
                if out.is_ok() {
                    self.discard_snapshot(&snap).await;
                    return Err(e);
                }
            }
        }
        if froze {
            self.thaw_guest(&vm).await;
        }
        match out {
            Ok(()) if transient => Ok(self.store.get_vm(&vm.id)?),
            Ok(()) => {
                op.stage("finish");
                self.store
                    .snapshot_ready(&snap.id, snap.frozen, snap.size_bytes)?;
                Ok(self.store.get_vm(&vm.id)?)
            }
            Err(e) => {
                self.discard_snapshot(&snap).await;
                Err(e)
            }
        }
    }

    /// The steps that make the files; `paused` is set once this flow paused the guest.
    async fn take_snapshot(
        self: &Arc<Self>,
        op: &OpEntry,
        snap: &mut SnapshotRecord,
        vm: &VmRecord,
        paused: &mut bool,
        froze: &mut bool,
    ) -> Result<()> {
        let handle = match &vm.runtime.vmm {
            Some(h) if self.vmm.find(h).is_some() => h.clone(),
            _ => return Err(Error::conflict(format!("VM {} has no live VMM", vm.name))),
        };
        let root_src = root_disk_file(vm)?;
        let dir = snapshot_dir(&self.paths.state, &snap.id);
        perms::make_dir(&dir, Access::Private)?;
        op.check()?;
        if snap.source_was_running && vm.spec.agent {
            op.stage("freeze filesystems");
            *froze = true; // a late answer may still freeze: always thaw after
            snap.frozen = self.freeze_guest(vm).await;
        }
        if snap.source_was_running {
            op.stage("pause vcpus");
            self.vmm.pause(&handle, PAUSE_TIMEOUT).await?;
            *paused = true;
        }
        failpoint::hit("snapshot-paused");
        op.stage("save vmm state");
        let prefix = staging_prefix(&snap.id);
        let files = self
            .vmm
            .save_state(&handle, &vm.runtime.dir, &prefix, SAVE_TIMEOUT)
            .await?;
        for f in files {
            adopt_state_file(&f, &prefix, &dir)?;
        }
        failpoint::hit("snapshot-state-saved");
        op.check()?;
        op.stage("clone disks");
        let work = vm
            .runtime
            .work_disk
            .clone()
            .filter(|p| p.symlink_metadata().is_ok());
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || clone_disks(&root_src, work.as_deref(), &dir2))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        failpoint::hit("snapshot-disks-cloned");
        snap.size_bytes = allocated_bytes(&dir);
        Ok(())
    }

    /// Asks the guest's agent to freeze its filesystems, bounded by [`FREEZE_TIMEOUT`]. Whether
    /// it did (an older agent's "cannot decode" error, a test agent that is not live, a
    /// timeout: not frozen). The answer is the guest's word: it only sets `frozen`.
    async fn freeze_guest(&self, vm: &VmRecord) -> bool {
        let Some(h) = &vm.runtime.vmm else {
            return false;
        };
        let res = tokio::time::timeout(FREEZE_TIMEOUT, async {
            let c = AgentClient::connect(&h.vsock_socket, AGENT_PORT, FREEZE_TIMEOUT).await?;
            c.freeze(freeze_mounts()).await
        })
        .await;
        match res {
            Ok(Ok(frozen)) => !frozen.is_empty(),
            Ok(Err(e)) => {
                tracing::info!(vm = %vm.name, error = %e, "snapshot: guest filesystems not frozen");
                false
            }
            Err(_) => {
                tracing::warn!(vm = %vm.name, "snapshot: the agent did not answer the freeze in time; snapshotting unfrozen");
                false
            }
        }
    }

    /// Thaws what [`Daemon::freeze_guest`] froze (best effort: the agent also thaws by itself
    /// after `FREEZE_MAX_SECS`).
    async fn thaw_guest(&self, vm: &VmRecord) {
        let Some(h) = &vm.runtime.vmm else { return };
        let res = tokio::time::timeout(FREEZE_TIMEOUT, async {
            let c = AgentClient::connect(&h.vsock_socket, AGENT_PORT, FREEZE_TIMEOUT).await?;
            c.thaw(freeze_mounts()).await
        })
        .await;
        if !matches!(res, Ok(Ok(_))) {
            tracing::warn!(vm = %vm.name, "snapshot: thaw not confirmed; the agent thaws by itself");
        }
    }

    async fn resume_source(&self, vm: &VmRecord) -> Result<()> {
        if let Some(h) = &vm.runtime.vmm {
            self.vmm.resume(h, PAUSE_TIMEOUT).await?;
        }
        Ok(())
    }

    /// Removes a snapshot's files (its dir and any staged state file in the source's VM dir),
    /// then its record. Idempotent; failures are logged (reconcile's sweep retries the dir).
    pub(super) async fn discard_snapshot(&self, snap: &SnapshotRecord) {
        remove_snapshot_files(&self.paths, snap).await;
        if let Err(e) = self.store.delete_snapshot(&snap.id) {
            tracing::error!(snapshot = %snap.name, error = %e, "cannot remove the snapshot record");
        }
    }

    /// A socket user holds at most `[limits] max_snapshots` snapshots (root: no limit).
    fn check_snapshot_limit(&self, owner: u32) -> Result<()> {
        if owner == 0 {
            return Ok(());
        }
        let max = self.config.limits.resolve(&self.host).max_snapshots;
        let used = self.store.list_snapshots(Some(owner))?.len() as u64;
        if used >= max {
            return Err(Error::new(
                wick_model::api::ErrorCode::PermissionDenied,
                format!(
                    "limit [limits] max_snapshots = {max} snapshots per user: uid {owner} has                      {used}; delete one (`wick snapshot delete NAME`), or ask root to raise the                      limit"
                ),
            ));
        }
        Ok(())
    }

    /// `wick snapshot list`: the caller's snapshots (root: all).
    pub fn list_snapshots(&self, caller: Caller) -> Result<Vec<SnapshotRecord>> {
        Ok(self.store.list_snapshots(caller.filter())?)
    }

    /// A snapshot visible to the caller.
    pub fn find_snapshot(&self, reference: &str, caller: Caller) -> Result<SnapshotRecord> {
        Ok(self.store.find_snapshot(reference, caller.filter())?)
    }

    /// `wick snapshot delete`: the record first, then the files (a crash between leaves a dir
    /// without a record, which the next start sweeps). A snapshot still being made is refused,
    /// and so is one a VM is being restored from (its `runtime.restore` names it); once loaded,
    /// a restored VM needs nothing of its snapshot.
    pub async fn delete_snapshot(&self, reference: &str, caller: Caller) -> Result<SnapshotRecord> {
        let snap = self.find_snapshot(reference, caller)?;
        if snap.state == SnapshotState::Creating {
            return Err(Error::conflict(format!(
                "snapshot {} is still being created; wait for its operation to end",
                snap.name
            )));
        }
        let loading = self.store.list_vms(None)?.into_iter().find(|v| {
            v.runtime
                .restore
                .as_ref()
                .and_then(|r| r.snapshot_id.as_deref())
                == Some(&snap.id)
        });
        if let Some(vm) = loading {
            return Err(Error::conflict(format!(
                "snapshot {} is being restored into VM {}; delete it once that VM runs",
                snap.name, vm.name
            )));
        }
        self.store.delete_snapshot(&snap.id)?;
        remove_snapshot_files(&self.paths, &snap).await;
        Ok(snap)
    }
}

/// The source VM's root disk as a file. A device-mapper disk has no file to clone.
fn root_disk_file(vm: &VmRecord) -> Result<PathBuf> {
    let plan = super::disk_plan(vm)?;
    if let wick_storage::DiskPlan::DmSnapshot { .. } = plan {
        return Err(Error::precondition(format!(
            "VM {} has a device-mapper root disk; snapshots need a file-backed one \
             (storage_backend reflink, xfs-pool or copy)",
            vm.name
        )));
    }
    Ok(plan.disk_path())
}

/// Copies a state file the VMM wrote (`<prefix>.<ext>` in the VM dir) to a new file
/// `dir/vm.<ext>` and removes the VMM's. A copy (a reflink where the filesystem can), never the
/// VMM's inode: a descriptor or shared mapping the running source VMM kept on its own file
/// would otherwise still write the snapshot every restore loads. The new file is root's, mode
/// 0644: only reachable through the root-only snapshot dir, or through the hard links a restore
/// puts in its VM dir, where the VMM's uid may read but never write it ([`shareable`]). The VM
/// dir belongs to the VMM's uid, so the source must be a regular file (not a link it planted).
fn adopt_state_file(file: &Path, prefix: &str, dir: &Path) -> Result<()> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(prefix))
        .ok_or_else(|| Error::internal(format!("unexpected state file {}", file.display())))?;
    let dst = dir.join(format!("vm{name}"));
    let copied = wick_storage::file::clone_untrusted(file, &dst).map_err(|e| {
        Error::internal(format!(
            "the VMM's state file {}: {e}; refusing it",
            file.display()
        ))
    });
    let _ = std::fs::remove_file(file);
    copied?;
    perms::apply(&dst, Access::Private)?;
    shareable(&dst)
}

/// A snapshot state file's mode: root's, 0644 (see [`adopt_state_file`]).
pub(super) fn shareable(file: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::internal(format!("chmod {}: {e}", file.display())))
}

/// Clones the root disk to `root.img` and the work disk (if any) to `work.img` (reflink when
/// the filesystem can, else a sparse copy).
fn clone_disks(root: &Path, work: Option<&Path>, dir: &Path) -> Result<()> {
    let mut pairs = vec![(root, dir.join("root.img"))];
    if let Some(w) = work {
        pairs.push((w, dir.join("work.img")));
    }
    for (src, dst) in pairs {
        // The VM dir is its VMM's (uid): what is there is not trusted to be our disk.
        wick_storage::file::clone_untrusted(src, &dst)
            .map_err(|e| Error::internal(format!("cloning {}: {e}", src.display())))?;
        perms::apply(&dst, Access::Private)?;
    }
    Ok(())
}

/// Bytes the files of `dir` occupy (allocated blocks).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the snapshot's dir and any `snapshot-<id>.*` file left in its source's VM dir.
async fn remove_snapshot_files(paths: &wick_model::Paths, snap: &SnapshotRecord) {
    let dir = snapshot_dir(&paths.state, &snap.id);
    let vm_dir = paths.vm_dir(&snap.source_vm_id);
    let prefix = format!("{}.", staging_prefix(&snap.id));
    let name = snap.name.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(snapshot = %name, error = %e, "cannot remove {}", dir.display());
            }
        }
        if let Ok(rd) = std::fs::read_dir(&vm_dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    })
    .await;
}

/// At start, before serving (after the VMs were settled): every `creating` snapshot was cut
/// short by a crash; its files and record go, and a source VM it had paused runs again. Then
/// directories under `snapshots/` without a record are swept. Returns what was done.
pub async fn reconcile_snapshots(d: &Arc<Daemon>) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for snap in d.store.list_snapshots(None)? {
        if snap.state != SnapshotState::Creating {
            continue;
        }
        if snap.source_was_running {
            resume_interrupted_source(d, &snap.source_vm_id).await;
        }
        d.discard_snapshot(&snap).await;
        done.push(format!("partial snapshot {} ({})", snap.name, snap.id));
    }
    let known: std::collections::HashSet<String> = d
        .store
        .list_snapshots(None)?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let top = d.paths.state.join("snapshots");
    if let Ok(rd) = std::fs::read_dir(&top) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !known.contains(&name) {
                let _ = std::fs::remove_dir_all(e.path());
                done.push(format!("snapshot directory {}", e.path().display()));
            }
        }
    }
    Ok(done)
}

/// The source of an interrupted snapshot was running before the snapshot paused it: resume it
/// (reconcile has already settled its record to the VMM's `paused`).
async fn resume_interrupted_source(d: &Arc<Daemon>, vm_id: &str) {
    let _g = d.ops.lock_vm(vm_id).await;
    let Ok(mut vm) = d.store.get_vm(vm_id) else {
        return;
    };
    if vm.state != VmState::Paused {
        return;
    }
    let Some(h) = vm.runtime.vmm.clone().filter(|h| d.vmm.find(h).is_some()) else {
        return;
    };
    match d.vmm.resume(&h, PAUSE_TIMEOUT).await {
        Ok(()) => {
            if vm.apply(VmAction::Resume).is_ok() {
                if let Err(e) = d.store.save_vm(&vm) {
                    tracing::error!(vm = %vm.name, error = %e, "reconcile: saving the resumed VM");
                }
            }
        }
        Err(e) => {
            tracing::error!(vm = %vm.name, error = %e, "reconcile: cannot resume the snapshot's source VM")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_state_file_is_copied_so_the_vmm_cannot_write_the_snapshot_after() {
        let vm_dir = tempfile::tempdir().unwrap();
        let snap = tempfile::tempdir().unwrap();
        let file = vm_dir.path().join("snapshot-x.state");
        std::fs::write(&file, b"clean").unwrap();
        // The VMM keeps a descriptor on the file it wrote.
        let mut kept = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        adopt_state_file(&file, "snapshot-x", snap.path()).unwrap();
        kept.write_all(b"POISON").unwrap();
        let dst = snap.path().join("vm.state");
        assert_eq!(std::fs::read(&dst).unwrap(), b"clean");
        assert!(!file.exists(), "the VMM's file is removed");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&dst).unwrap().mode() & 0o777, 0o644);

        // A hard link the VMM planted (to a file it could not read) is refused.
        let secret = snap.path().join("secret");
        std::fs::write(&secret, b"host file").unwrap();
        let planted = vm_dir.path().join("snapshot-y.mem");
        std::fs::hard_link(&secret, &planted).unwrap();
        assert!(adopt_state_file(&planted, "snapshot-y", snap.path()).is_err());
        assert!(!snap.path().join("vm.mem").exists());
    }
}
