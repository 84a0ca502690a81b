//! Suspend: `wick vm suspend VM` writes a running or paused guest's memory and device state to
//! its *suspend image* in the VM dir, ends the VMM (its RAM freed) and releases every host
//! resource a stopped VM does not hold (TAP, cgroup, uid, DNS name, published ports); the disks,
//! the IP lease and the image stay. The VM is then `suspended`; the next start loads the image
//! (`runtime.restore`, the restore path of `start.rs`) and the guest continues where it was.
//!
//! Durable like every host resource. The image is named before it exists: `runtime.restore`
//! (the VM's own image: `snapshot_id: None`, `new_identity: false`) with `runtime.suspending`
//! set, saved first (failpoint `suspend-recorded`); its files are `suspend.*` in the VM dir
//! (the VMM writes them there: a dir its uid may write), recorded once `save_state` names them
//! (`suspend-saved`). The VMM is stopped and the VM released (`suspend-vmm-stopped`); only then,
//! with nothing of the VMM's uid left, the files are made root's, mode 0644 (the next VMM's uid
//! reads them, never writes), `suspending` is cleared and the VM is `suspended`, in one save.
//! Any failure before the VMM is gone removes the files, clears `restore` and resumes the
//! guest: the VM is as it was. After a crash, [`Daemon::reconcile_suspend`] settles it:
//! an incomplete image with a live VMM → the guest resumed, the files dropped, `running`;
//! incomplete without a VMM → files dropped, released, `stopped`; a complete one → `suspended`
//! (any VMM still there killed).
//!
//! Guest consistency: nothing is copied. The guest's disks are the same files before and after
//! (no clone, as a snapshot makes), and the image holds the guest's page cache and block-device
//! state exactly as they were when its vCPUs stopped, so the resumed guest continues against
//! the same disks it was writing — no filesystem freeze is needed (a snapshot needs one because
//! its disk *copies* must be consistent on their own).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wick_model::vm::{Next, VmAction};
use wick_model::{RestoreFrom, VmRecord, VmState, VmmHandle};

use super::{Daemon, PAUSE_TIMEOUT};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ops::OpEntry;
use crate::perms::{self, Access};

/// How long the VMM may take to write the guest's state (a 1 GiB TCG guest: ~1 s measured).
const SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Prefix of the suspend image's files in the VM dir (`suspend.vmstate`, `suspend.mem`,
/// `suspend.state`, as the driver names them).
pub const IMAGE_PREFIX: &str = "suspend";

impl Daemon {
    /// The suspend operation: `running`/`paused` → `suspended` (a suspended VM stays so).
    pub(super) async fn suspend_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
    ) -> Result<VmRecord> {
        if vm.check(VmAction::Suspend)? == Next::To(vm.state) {
            return Ok(self.store.save_vm(&vm)?); // already suspended
        }
        if vm.is_pooled() || vm.runtime.restore.is_some() {
            return Err(Error::conflict(format!(
                "VM {} cannot be suspended now (a warm-pool VM, or a saved state is pending)",
                vm.name
            )));
        }
        let handle = match &vm.runtime.vmm {
            Some(h) if self.vmm.find(h).is_some() => h.clone(),
            _ => {
                return Err(Error::internal(format!(
                    "VM {} is {} but its VMM is gone; it is being settled",
                    vm.name, vm.state
                )))
            }
        };
        let was_running = vm.state == VmState::Running;
        op.stage("record suspend image");
        vm.runtime.restore = Some(RestoreFrom {
            files: Vec::new(), // named by `save_state`; until then every `suspend.*` is ours
            snapshot_id: None,
            new_identity: false,
        });
        vm.runtime.suspending = true;
        vm = self.store.save_vm(&vm)?;
        failpoint::hit("suspend-recorded");
        match self.write_image(op, &vm, &handle).await {
            Ok(files) => {
                if let Some(r) = &mut vm.runtime.restore {
                    r.files = files;
                }
                vm = self.store.save_vm(&vm)?;
            }
            Err(e) => return Err(self.undo_suspend(vm, &handle, was_running, e).await),
        }
        failpoint::hit("suspend-saved");
        op.stage("stop vmm");
        let released = self.release(&mut vm).await;
        if vm.runtime.vmm.is_some() {
            // The VMM survived: the guest is still there, paused. Back to where it was.
            let e = released
                .err()
                .unwrap_or_else(|| Error::internal("VMM still recorded"));
            return Err(self.undo_suspend(vm, &handle, was_running, e).await);
        }
        failpoint::hit("suspend-vmm-stopped");
        op.stage("seal suspend image");
        self.seal_image(&mut vm)?;
        vm.apply(VmAction::Suspend)?;
        vm = self.store.save_vm(&vm)?;
        // A capability that failed to release stays recorded (the next release retries it).
        released?;
        Ok(vm)
    }

    /// Pauses the guest and has the VMM write its state as `suspend.*` in the VM dir; checks
    /// every file is a plain single-link file there. Returns the files in the VMM's order.
    async fn write_image(
        &self,
        op: &OpEntry,
        vm: &VmRecord,
        handle: &VmmHandle,
    ) -> Result<Vec<PathBuf>> {
        op.check()?;
        op.stage("pause vcpus");
        self.vmm.pause(handle, PAUSE_TIMEOUT).await?;
        op.stage("save vmm state");
        let files = self
            .vmm
            .save_state(handle, &vm.runtime.dir, IMAGE_PREFIX, SAVE_TIMEOUT)
            .await?;
        for f in &files {
            check_image_file(&vm.runtime.dir, f)?;
        }
        op.check()?;
        Ok(files)
    }

    /// A suspend failed before its VMM was stopped: the image's files go, `restore` is
    /// cleared and a guest that was running runs again. Returns the suspend's error.
    async fn undo_suspend(
        &self,
        mut vm: VmRecord,
        handle: &VmmHandle,
        was_running: bool,
        e: Error,
    ) -> Error {
        tracing::warn!(vm = %vm.name, error = %e, "suspend failed; the VM stays as it was");
        remove_image_files(&vm);
        vm.runtime.restore = None;
        vm.runtime.suspending = false;
        if let Err(se) = self.store.save_vm(&vm) {
            tracing::error!(vm = %vm.name, error = %se, "saving the VM after a failed suspend");
        }
        if was_running && self.vmm.find(handle).is_some() {
            if let Err(re) = self.vmm.resume(handle, PAUSE_TIMEOUT).await {
                tracing::error!(vm = %vm.name, error = %re, "cannot resume the guest after a failed suspend");
                // The record follows the VMM: paused (`wick vm resume` retries).
                if vm.apply(VmAction::Pause).is_ok() {
                    let _ = self.store.save_vm(&vm);
                }
            }
        }
        e
    }

    /// With the VMM gone: checks each image file again and makes it root's, 0644 (the next
    /// VMM's uid reads it, never writes it); the image is complete.
    fn seal_image(&self, vm: &mut VmRecord) -> Result<()> {
        let Some(r) = &vm.runtime.restore else {
            return Err(Error::internal(format!(
                "VM {} has no suspend image",
                vm.name
            )));
        };
        if r.files.is_empty() {
            return Err(Error::internal(format!(
                "the suspend image of VM {} names no file",
                vm.name
            )));
        }
        for f in &r.files {
            check_image_file(&vm.runtime.dir, f)?;
            // On a descriptor: even a VMM uid that outlived its release cannot swap the file.
            perms::apply_plain_file(f, Access::Readable)?;
        }
        vm.runtime.suspending = false;
        Ok(())
    }

    /// Drops the VM's suspend image (a stop of a suspended VM, a failed or interrupted
    /// suspend): its files, then `restore`, persisted. Idempotent; a snapshot's restore record
    /// is not a suspend image and is left alone.
    pub(super) fn discard_suspend_image(&self, vm: &mut VmRecord) -> Result<()> {
        if vm.runtime.restore.is_some() && own_image(vm).is_none() {
            return Ok(()); // a snapshot's restore
        }
        remove_image_files(vm);
        if vm.runtime.restore.is_some() || vm.runtime.suspending {
            vm.runtime.restore = None;
            vm.runtime.suspending = false;
            *vm = self.store.save_vm(vm)?;
        }
        Ok(())
    }

    /// After a start from a suspend image, under the VM's lock: a running VM loaded it (its
    /// files go, if the load left any); a failed start that consumed it (a file missing) drops
    /// the record, so the next start boots instead of failing to load. A failed start that
    /// left the image whole keeps it: the next start tries again. Failures are logged.
    pub(super) fn after_start(&self, vm_id: &str) {
        let Ok(mut vm) = self.store.get_vm(vm_id) else {
            return;
        };
        let consumed = vm.state == VmState::Running
            || own_image(&vm).is_some_and(|r| r.files.iter().any(|f| !f.exists()));
        if consumed && vm.state != VmState::Suspended {
            if let Err(e) = self.discard_suspend_image(&mut vm) {
                tracing::error!(vm = %vm.name, error = %e, "dropping a used suspend image");
            }
        }
    }

    /// For reconcile, under the VM's lock: settles a VM a crash caught during a suspend, or a
    /// suspended one. Returns what was done, `None` when the VM is none of these (the normal
    /// reconcile follows).
    pub async fn reconcile_suspend(&self, vm: &mut VmRecord) -> Result<Option<String>> {
        let live = vm.runtime.vmm.as_ref().and_then(|h| self.vmm.find(h));
        if vm.state == VmState::Suspended {
            // Complete. A VMM still recorded (a crash inside release) is killed; the image is
            // checked and sealed again (idempotent).
            self.release(vm).await?;
            self.seal_image(vm)?;
            *vm = self.store.save_vm(vm)?;
            return Ok(Some(format!("{} (suspended)", vm.name)));
        }
        if !vm.runtime.suspending {
            if own_image(vm).is_some() {
                // A start that was loading it, cut short: the guest may have run from it, so
                // it is not loaded twice. The normal reconcile settles the VM (`stopped`).
                self.discard_suspend_image(vm)?;
            }
            return Ok(None);
        }
        let was = vm.state;
        match (live, vm.runtime.vmm.clone()) {
            (Some(_), Some(h)) => {
                // Incomplete with a live VMM: the guest runs on, the image goes.
                self.discard_suspend_image(vm)?;
                self.vmm.resume(&h, PAUSE_TIMEOUT).await?;
                if vm.state == VmState::Paused {
                    vm.apply(VmAction::Resume)?;
                }
                *vm = self.store.save_vm(vm)?;
                Ok(None) // re-adopted as a running VM by the normal reconcile
            }
            _ => {
                // Incomplete and the VMM gone: nothing to load; released, stopped.
                self.discard_suspend_image(vm)?;
                self.release(vm).await?;
                vm.apply(VmAction::Interrupted)?;
                *vm = self.store.save_vm(vm)?;
                Ok(Some(format!(
                    "{} ({was} -> {}, interrupted suspend)",
                    vm.name, vm.state
                )))
            }
        }
    }
}

/// The VM's own suspend image record (not a snapshot's restore).
fn own_image(vm: &VmRecord) -> Option<&RestoreFrom> {
    vm.runtime
        .restore
        .as_ref()
        .filter(|r| r.snapshot_id.is_none())
}

/// An image file must be `suspend.*` directly in the VM dir and a plain file with one link
/// (the VM dir is the VMM's uid's: not a link it planted to something else).
fn check_image_file(dir: &Path, f: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let named = f.parent() == Some(dir)
        && f.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{IMAGE_PREFIX}.")));
    let meta = std::fs::symlink_metadata(f)
        .map_err(|e| Error::internal(format!("suspend image file {}: {e}", f.display())))?;
    if !named || !meta.is_file() || meta.nlink() != 1 {
        return Err(Error::internal(format!(
            "the VMM's suspend image file {} is not a plain file in the VM dir; refusing it",
            f.display()
        )));
    }
    Ok(())
}

/// Removes every `suspend.*` file of the VM dir and every file `restore` names there.
/// Unlinking never follows a link. Failures are logged.
fn remove_image_files(vm: &VmRecord) {
    let dir = &vm.runtime.dir;
    let mut files: Vec<PathBuf> = vm
        .runtime
        .restore
        .iter()
        .flat_map(|r| r.files.iter().filter(|f| f.parent() == Some(dir)).cloned())
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let prefix = format!("{IMAGE_PREFIX}.");
        files.extend(
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path()),
        );
    }
    for f in files {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::error!(vm = %vm.name, error = %e, "cannot remove {}", f.display())
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hostile VMM could leave in its VM dir instead of its image is refused.
    #[test]
    fn only_plain_single_link_suspend_files_in_the_vm_dir_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let outside = d.path().join("host-file");
        std::fs::write(&outside, b"host").unwrap();
        let ok = dir.join("suspend.mem");
        std::fs::write(&ok, b"mem").unwrap();
        assert!(check_image_file(&dir, &ok).is_ok());

        let link = dir.join("suspend.vmstate");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let hard = dir.join("suspend.state");
        std::fs::hard_link(&outside, &hard).unwrap();
        let fifo = dir.join("suspend.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let misnamed = dir.join("vm.mem");
        std::fs::write(&misnamed, b"mem").unwrap();
        for bad in [
            &link,
            &hard,
            &fifo,
            &misnamed,
            &outside,
            &dir.join("suspend.none"),
        ] {
            let e = check_image_file(&dir, bad).unwrap_err();
            assert!(e.message().contains("suspend image file"), "{bad:?}: {e}");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"host", "never written");
    }
}
