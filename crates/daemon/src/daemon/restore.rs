//! Restore: `wick vm create --from-snapshot SNAP` (and each VM of a fork, `fork.rs`) makes a new
//! VM that continues a snapshot's guest with its own identity.
//!
//! A restore is a create: the record (`creating`, new name, vsock CID, owner = caller) is
//! inserted with `runtime.restore` already naming the snapshot (failpoint `restore-recorded`),
//! so the state files and disks it makes next are recorded before they exist. The operation
//! then records, and makes, hard links of the snapshot's state files in the new VM dir
//! (`restore.<ext>`: root-owned, 0644, never chowned or chmodded for the VMM; a copy across
//! filesystems) (`restore-linked`), the disk plan of the root disk cloned from the snapshot's
//! `root.img` (through the storage backend's `DiskPlan`, like an image) and the work disk cloned
//! from `work.img`, then starts it: `Vmm::spawn_restore` → `Vmm::load_state`
//! (`restore-loaded`) → links removed → `Vmm::resume` → the agent gets the VM's new identity →
//! post-start hooks → `runtime.restore` cleared with `running`. A restore that fails or is cut
//! short leaves nothing: the VM is removed like a failed create (reconcile removes a VM whose
//! `runtime.restore` names a snapshot and that is not running).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wick_model::api::{CreateVmRequest, OpKind};
use wick_model::snapshot::snapshot_dir;
use wick_model::vm::VmAction;
use wick_model::{
    new_vm_id, validate_vm_name, RestoreFrom, SnapshotRecord, SnapshotState, VmRecord, VmSpec,
};
use wick_store::StoreError;

use super::release::plan_json;
use super::{Caller, Daemon};
use crate::capability::HookCtx;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ops::OpEntry;

/// How long the VMM may take to load a saved state (a 1 GiB TCG guest: ~0.6 s measured).
const LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Prefix of a restore's state-file links in the VM dir.
pub(super) const LINK_PREFIX: &str = "restore";

impl Daemon {
    /// `POST /v1/vms` with `from_snapshot`: the caller's snapshot (root: any) into a new VM.
    pub(super) fn create_from_snapshot(
        self: &Arc<Self>,
        req: CreateVmRequest,
        caller: Caller,
    ) -> Result<Arc<OpEntry>> {
        refuse_snapshot_flags(&req)?;
        let reference = req.from_snapshot.clone().unwrap_or_default();
        let snap = self.find_snapshot(&reference, caller)?;
        self.check_restorable(&snap)?;
        let spec = self.restore_spec(&snap, &req, caller)?;
        let quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        self.check_limits(caller.uid, None, &spec)?;
        let restore = restore_from(&snap.id);
        let mut attempt = 0;
        let vm = loop {
            let name = match &req.name {
                Some(n) => n.clone(),
                None if attempt < 20 => wick_model::generate_name(),
                None => format!("{}-{}", wick_model::generate_name(), &new_vm_id()[..4]),
            };
            match self.insert_restore(name, caller, &spec, restore.clone()) {
                Ok(vm) => break vm,
                Err(StoreError::NameTaken(_)) if req.name.is_none() => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        };
        drop(quota);
        self.spawn_op(OpKind::Create, vm, move |d, op, vm| async move {
            d.restore_flow(&op, vm).await.map(Some)
        })
    }

    /// A snapshot this wickd can restore: `ready`, saved by this VMM driver, with its disks.
    pub(super) fn check_restorable(&self, snap: &SnapshotRecord) -> Result<()> {
        if snap.state != SnapshotState::Ready {
            return Err(Error::conflict(format!(
                "snapshot {} is still being created; wait for its operation to end",
                snap.name
            )));
        }
        if snap.vmm != self.vmm.name() {
            return Err(Error::precondition(format!(
                "snapshot {} was saved by the {} driver; this wickd runs {}, which cannot load it",
                snap.name,
                snap.vmm,
                self.vmm.name()
            )));
        }
        refuse_agentless(&snap.spec, &snap.name)
    }

    /// The new VM's spec: the snapshot's (vcpu, memory, disks, image, kernel, init, workspace),
    /// with the request's network, published ports, keys and git identity.
    fn restore_spec(
        &self,
        snap: &SnapshotRecord,
        req: &CreateVmRequest,
        caller: Caller,
    ) -> Result<VmSpec> {
        let mut spec = snap.spec.clone();
        spec.vmm = self.vmm.name().to_string();
        spec.nat = req.nat;
        spec.allow_hosts = super::set::check_allow_hosts(&req.allow_hosts, req.nat)?;
        spec.publish = self.check_publish(&req.publish, None, caller)?;
        if !req.ssh_keys.is_empty() {
            spec.ssh_keys = req.ssh_keys.clone();
        }
        if req.git_name.is_some() {
            spec.git_name = req.git_name.clone();
        }
        if req.git_email.is_some() {
            spec.git_email = req.git_email.clone();
        }
        Ok(spec)
    }

    /// Inserts a restore's record: `creating`, `runtime.restore` naming the snapshot.
    pub(super) fn insert_restore(
        &self,
        name: String,
        caller: Caller,
        spec: &VmSpec,
        restore: RestoreFrom,
    ) -> std::result::Result<VmRecord, StoreError> {
        validate_vm_name(&name).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut rec = self.new_record(name, caller, spec);
        rec.runtime.restore = Some(restore);
        self.store.create_vm(rec)
    }

    /// The restore operation: links and disks, then the start. Any failure removes the VM.
    pub(super) async fn restore_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
    ) -> Result<VmRecord> {
        failpoint::hit("restore-recorded");
        let out = match self.restore_files(op, &mut vm).await {
            Ok(()) => {
                vm.apply(VmAction::Created)?;
                vm = self.store.save_vm(&vm)?;
                self.start_flow(op, vm.clone()).await
            }
            Err(e) => Err(e),
        };
        if out.is_err() {
            self.remove_restored(&vm.id).await;
        }
        out
    }

    /// Removes a restore that failed (whatever it made, its dir, its record). Idempotent.
    pub(crate) async fn remove_restored(&self, vm_id: &str) {
        let Ok(mut vm) = self.store.get_vm(vm_id) else {
            return;
        };
        if let Err(e) = self.release(&mut vm).await {
            // What is still recorded stays recorded (the next reconcile retries).
            tracing::error!(vm = %vm.name, error = %e, "restore: release after failure");
            return;
        }
        if let Err(e) = self.release_disks(&vm) {
            tracing::error!(vm = %vm.name, error = %e, "restore: removing the disks");
        }
        let _ = std::fs::remove_dir_all(&vm.runtime.dir);
        if let Err(e) = self.store.delete_vm(&vm.id) {
            tracing::error!(vm = %vm.name, error = %e, "restore: removing the record");
        }
        self.ops.forget_vm(&vm.id);
    }

    /// The state-file links and both disks, each recorded before it is made.
    async fn restore_files(&self, op: &OpEntry, vm: &mut VmRecord) -> Result<()> {
        let snap_id = vm
            .runtime
            .restore
            .as_ref()
            .and_then(|r| r.snapshot_id.clone())
            .ok_or_else(|| Error::internal("a restore without a snapshot"))?;
        let snap = self.store.get_snapshot(&snap_id)?.ok_or_else(|| {
            Error::new(
                wick_model::api::ErrorCode::NotFound,
                format!("snapshot {snap_id} is gone; nothing to restore"),
            )
        })?;
        let src = snapshot_dir(&self.paths.state, &snap.id);
        let dir = vm.runtime.dir.clone();
        op.stage("link state files");
        let files = state_files(&src)?;
        let links: Vec<PathBuf> = files.iter().map(|f| link_name(f, &dir)).collect();
        if let Some(r) = vm.runtime.restore.as_mut() {
            r.files = links.clone();
        }
        *vm = self.store.save_vm(vm)?; // the links recorded before they exist
        crate::perms::make_dir(&dir, crate::perms::Access::Private)?;
        tokio::task::spawn_blocking(move || link_all(&files, &links))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        failpoint::hit("restore-linked");
        op.check()?;
        op.stage("clone disks");
        self.restore_disks(vm, &src).await?;
        op.check()
    }

    /// The root disk through the storage backend (its plan recorded first) from the snapshot's
    /// `root.img`, and the work disk from `work.img` when the snapshot has one.
    async fn restore_disks(&self, vm: &mut VmRecord, src: &Path) -> Result<()> {
        let dir = vm.runtime.dir.clone();
        let root_img = src.join("root.img");
        let plan = self
            .storage
            .plan(&vm.id, &dir, &root_img)
            .map_err(|e| Error::precondition(format!("snapshot root disk: {e}")))?;
        let work_img = src.join("work.img");
        let work = work_img.exists().then(|| dir.join("work.ext4"));
        vm.runtime.root_disk = Some(plan.disk_path());
        vm.runtime.root_disk_plan = Some(plan_json(&plan)?);
        vm.runtime.work_disk = work.clone();
        *vm = self.store.save_vm(vm)?; // identities recorded before anything is made
        if self.storage.kind() == wick_storage::BackendKind::XfsPool {
            tokio::task::block_in_place(|| self.establish_xfs_pool())?;
        }
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            storage
                .create(&plan)
                .map_err(|e| Error::precondition(e.to_string()))?;
            if let Some(w) = work {
                wick_storage::file::clone_file(&work_img, &w)
                    .map_err(|e| Error::precondition(format!("cloning the work disk: {e}")))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?
    }

    /// The start of a VM whose `runtime.restore` is set (after the capabilities' host setup):
    /// the VMM waits for the state, loads it, the links go, the guest resumes, the agent is
    /// given the identity, post-start hooks run, and `restore` is cleared (persisted with
    /// `running` by the caller).
    pub(super) async fn start_restored(
        self: &Arc<Self>,
        op: &OpEntry,
        vm: &mut VmRecord,
        cfg: &wick_vmm::VmmConfig,
        restore: RestoreFrom,
    ) -> Result<()> {
        op.stage("spawn vmm");
        let handle = self.spawn_vmm(vm, cfg, true).await?;
        op.check()?;
        op.stage("load state");
        tokio::select! {
            r = self.vmm.load_state(&handle, cfg, &restore.files, LOAD_TIMEOUT) => r?,
            _ = op.cancel.cancelled() => return Err(Error::cancelled()),
        }
        failpoint::hit("restore-loaded");
        remove_links(&restore.files);
        op.stage("resume");
        self.vmm.resume(&handle, super::PAUSE_TIMEOUT).await?;
        if vm.spec.agent {
            op.stage("wait for agent");
            let client = self.wait_agent(&handle, op).await?;
            if restore.snapshot_id.is_some() {
                thaw_restored(vm, &client).await;
            }
            op.stage("configure guest");
            // Clock, RNG and network always; a new identity unless it is a suspend image.
            self.configure_restored(op, vm, &client, restore.new_identity)
                .await?;
        }
        op.stage("post start");
        for cap in &self.caps {
            cap.post_start(&mut HookCtx::new(vm, &self.store)).await?;
        }
        vm.runtime.restore = None;
        Ok(())
    }
}

/// A snapshot's memory holds its guest's filesystems frozen (the snapshot froze them, and only
/// the source is thawed after): thaw them in the restored guest before anything writes, or
/// every write (the configure step's first) waits for the agent's own thaw after
/// `FREEZE_MAX_SECS`. Bounded; an agent that cannot thaw (nothing frozen) is fine.
async fn thaw_restored(vm: &VmRecord, client: &wick_agent_proto::AgentClient) {
    let thaw = client.thaw(super::snapshot::freeze_mounts());
    match tokio::time::timeout(super::snapshot::FREEZE_TIMEOUT, thaw).await {
        Ok(Ok(thawed)) => tracing::debug!(vm = %vm.name, ?thawed, "restore: filesystems thawed"),
        Ok(Err(e)) => tracing::info!(vm = %vm.name, error = %e, "restore: nothing thawed"),
        Err(_) => {
            tracing::warn!(vm = %vm.name, "restore: the agent did not answer the thaw in time")
        }
    }
}

/// The record of a restore from snapshot `id` (files filled in when they are linked).
pub(super) fn restore_from(id: &str) -> RestoreFrom {
    RestoreFrom {
        files: Vec::new(),
        snapshot_id: Some(id.to_string()),
        new_identity: true,
    }
}

/// A copy of a guest without wick-agent would keep its source's RNG state, machine-id, host
/// keys and MAC (nothing in it can take new ones): refused.
pub(super) fn refuse_agentless(spec: &wick_model::VmSpec, what: &str) -> Result<()> {
    match spec.agent {
        true => Ok(()),
        false => Err(Error::precondition(format!(
            "{what} has no wick-agent (its image sets agent = false), so a copy could not be \
             given its own identity (RNG, machine-id, SSH host keys, MAC); restore and fork \
             need an image with the agent"
        ))),
    }
}

/// Flags the snapshot decides, refused with `from_snapshot`.
fn refuse_snapshot_flags(req: &CreateVmRequest) -> Result<()> {
    let given = [
        ("--vcpu", req.vcpu.is_some()),
        ("--memory", req.memory.is_some()),
        ("--disk-size", req.disk_size.is_some()),
        ("--image", req.image.is_some()),
        ("--kernel", req.kernel.is_some()),
        ("--init", req.init.is_some()),
        ("--no-start", req.no_start),
    ];
    let bad: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} cannot be combined with --from-snapshot: a restored VM continues the snapshot's \
         guest, so the snapshot decides vcpu, memory, disk size, image, kernel and init, and \
         it starts at once",
        bad.join(", ")
    )))
}

/// The snapshot's state files (`vm.<ext>`), in `Vmm::save_state`'s order: the VMM state first,
/// the memory file (`vm.mem`) last.
fn state_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::internal(format!("reading {}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vm."))
        })
        .collect();
    files.sort_by_key(|p| (p.extension().is_some_and(|e| e == "mem"), p.clone()));
    if files.is_empty() {
        return Err(Error::internal(format!(
            "snapshot dir {} has no state file",
            dir.display()
        )));
    }
    Ok(files)
}

/// `dir/restore.<ext>` for the snapshot's `vm.<ext>`.
fn link_name(file: &Path, dir: &Path) -> PathBuf {
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("state");
    dir.join(format!("{LINK_PREFIX}.{ext}"))
}

/// Hard links `files` at `links` (replacing a leftover); across filesystems a root-owned 0644
/// copy. The files are never chowned for the VMM; a snapshot file is made 0644 first (one
/// taken by an older wickd is 0600), which its root-only dir keeps from everyone else.
fn link_all(files: &[PathBuf], links: &[PathBuf]) -> Result<()> {
    for (f, l) in files.iter().zip(links) {
        super::snapshot::shareable(f)?;
        let _ = std::fs::remove_file(l);
        match std::fs::hard_link(f, l) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                wick_storage::file::clone_file(f, l)
                    .map_err(|e| Error::internal(format!("copying {}: {e}", f.display())))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(l, std::fs::Permissions::from_mode(0o644))?;
            }
            Err(e) => {
                return Err(Error::internal(format!(
                    "linking {} to {}: {e}",
                    f.display(),
                    l.display()
                )))
            }
        }
    }
    Ok(())
}

/// Removes the links after a load (best effort: the VM dir's removal takes any left).
fn remove_links(links: &[PathBuf]) {
    for l in links {
        if let Err(e) = std::fs::remove_file(l) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %l.display(), error = %e, "cannot remove a restore link");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_put_the_memory_last_and_links_keep_the_extension() {
        let d = tempfile::tempdir().unwrap();
        for n in ["vm.mem", "vm.vmstate", "root.img", "work.img"] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        let f = state_files(d.path()).unwrap();
        assert_eq!(
            f,
            vec![d.path().join("vm.vmstate"), d.path().join("vm.mem")]
        );
        assert_eq!(
            link_name(&f[1], Path::new("/v")),
            PathBuf::from("/v/restore.mem")
        );
        let links: Vec<PathBuf> = f.iter().map(|x| link_name(x, d.path())).collect();
        link_all(&f, &links).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&links[0]).unwrap().nlink(), 2);
    }

    #[test]
    fn flags_the_snapshot_decides_are_refused_by_name() {
        let req = CreateVmRequest {
            from_snapshot: Some("s".into()),
            vcpu: Some(2),
            image: Some("x".into()),
            ..Default::default()
        };
        let e = refuse_snapshot_flags(&req).unwrap_err();
        assert!(e.message().contains("--vcpu, --image"), "{}", e.message());
        let ok = CreateVmRequest {
            from_snapshot: Some("s".into()),
            nat: true,
            ..Default::default()
        };
        refuse_snapshot_flags(&ok).unwrap();
    }

    #[test]
    fn a_guest_without_the_agent_is_not_copied() {
        let mut spec = wick_model::VmSpec {
            agent: true,
            ..Default::default()
        };
        refuse_agentless(&spec, "snapshot s").unwrap();
        spec.agent = false;
        let e = refuse_agentless(&spec, "snapshot s").unwrap_err();
        assert!(
            e.message().contains("snapshot s has no wick-agent"),
            "{}",
            e.message()
        );
    }
}
