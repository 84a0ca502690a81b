//! Start: preflight, then `starting`, the capabilities' host setup, the VMM (identity recorded
//! before it exists), boot, the guest agent, post-start hooks, `running`. A failed or cancelled
//! start releases what it made.

use std::sync::Arc;

use wick_model::api::{ApiError, ErrorCode};
use wick_model::vm::{Next, VmAction};
use wick_model::{VmRecord, VmmHandle};
use wick_vmm::VmmConfig;

use super::logs::with_tail;
use super::release::disk_plan;
use super::Daemon;
use crate::capability::HookCtx;
use crate::error::{Error, Result};
use crate::ops::OpEntry;

impl Daemon {
    /// The start operation (and create's and restart's last step): refused unless the VM is
    /// `stopped` or `error` (a `running` VM is left as it is), then preflight and the start.
    pub(super) async fn start_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
    ) -> Result<VmRecord> {
        if vm.check(VmAction::Start)? == Next::To(vm.state) {
            return Ok(vm); // already running
        }
        op.stage("preflight");
        self.preflight(&vm).await?;
        vm.apply(VmAction::Start)?;
        vm.runtime.last_error = None;
        vm = self.store.save_vm(&vm)?;
        match self.start_inner(op, &mut vm).await {
            Ok(()) => {
                vm.apply(VmAction::Started)?;
                Ok(self.store.save_vm(&vm)?)
            }
            Err(e) => Err(self.fail_start(&mut vm, e).await?),
        }
    }

    /// Releases what a failed (or cancelled) start made and settles the VM: `error` with the
    /// reason and the VMM log's tail, or `stopped` when cancelled. Returns the start's error
    /// (with that tail) for the operation.
    async fn fail_start(&self, vm: &mut VmRecord, e: Error) -> Result<Error> {
        tracing::warn!(vm = %vm.name, error = %e, "start failed; releasing resources");
        let tail = self.log_tail(vm, 15);
        if let Err(re) = self.release(vm).await {
            tracing::error!(vm = %vm.name, error = %re, "release after failed start");
        }
        let why = with_tail(e.message(), &tail);
        if e.code() == ErrorCode::Cancelled {
            vm.apply(VmAction::StartCancelled)?;
        } else {
            vm.apply(VmAction::StartFailed)?;
            vm.runtime.last_error = Some(why.clone());
        }
        self.store.save_vm(vm)?;
        Ok(Error(ApiError::new(e.code(), why)))
    }

    async fn preflight(&self, vm: &VmRecord) -> Result<()> {
        // Published before the rules (or the config) changed: checked again at every start.
        if vm.owner != 0 {
            for m in &vm.spec.publish {
                self.check_user_publish(m).map_err(|e| {
                    Error::new(
                        e.code(),
                        format!(
                            "VM {}: {}; unpublish it with `wick vm set {} --unpublish {}`",
                            vm.name,
                            e.message(),
                            vm.name,
                            m.host_port
                        ),
                    )
                })?;
            }
        }
        let plan = disk_plan(vm)?;
        let disk = tokio::task::block_in_place(|| {
            wick_storage::backend(plan.kind(), &self.paths.state).activate(&plan)
        })
        .map_err(|e| {
            Error::precondition(format!(
                "root disk of VM {} is not usable ({e}); delete the VM and create it again",
                vm.name
            ))
        })?;
        if vm.runtime.root_disk.as_deref() != Some(disk.path.as_path()) {
            return Err(Error::internal(format!(
                "root disk of VM {} moved to {}",
                vm.name,
                disk.path.display()
            )));
        }
        if !vm.spec.kernel.exists() {
            return Err(Error::precondition(format!(
                "kernel {} of image {} does not exist; fix [images.{}] in {}",
                vm.spec.kernel.display(),
                vm.spec.image,
                vm.spec.image,
                self.paths.config.display()
            )));
        }
        self.vmm.preflight()?;
        for cap in &self.caps {
            cap.preflight(vm).await?;
        }
        Ok(())
    }

    /// From `starting` to a booted, configured guest: host setup, the VMM, boot, the agent,
    /// post-start hooks. On error the caller releases whatever the runtime records.
    async fn start_inner(self: &Arc<Self>, op: &OpEntry, vm: &mut VmRecord) -> Result<()> {
        op.stage("prepare host");
        for cap in &self.caps {
            cap.prepare_host(&mut HookCtx::new(vm, &self.store)).await?;
            op.check()?;
        }
        let cfg = self.vmm_config(vm);
        if let Some(restore) = vm.runtime.restore.clone() {
            // A saved state to load instead of a boot (restore.rs).
            return self.start_restored(op, vm, &cfg, restore).await;
        }
        op.stage("spawn vmm");
        let handle = self.spawn_vmm(vm, &cfg, false).await?;
        op.check()?;

        op.stage("boot");
        tokio::select! {
            r = self.vmm.boot(&handle, &cfg, self.boot_timeout()) => r?,
            _ = op.cancel.cancelled() => return Err(Error::cancelled()),
        }
        if vm.runtime.pool == Some(wick_model::PoolSlot::Filling) {
            // A warm-pool VM stops at agent-ready: no identity until it is taken (pool.rs).
            return self.pool_vm_ready(op, vm, &handle).await;
        }
        if vm.spec.agent {
            self.configure_guest(op, vm, &handle).await?;
        }
        op.stage("post start");
        for cap in &self.caps {
            cap.post_start(&mut HookCtx::new(vm, &self.store)).await?;
        }
        Ok(())
    }

    /// The VMM's configuration: the spec, the recorded disks and TAP, then each capability's
    /// additions.
    fn vmm_config(&self, vm: &VmRecord) -> VmmConfig {
        let mut cfg = VmmConfig {
            vm_id: vm.id.clone(),
            vcpu: vm.spec.vcpu,
            memory_mib: vm.spec.memory_mib,
            kernel: vm.spec.kernel.clone(),
            initrd: vm.spec.initrd.clone(),
            boot_args: match vm.spec.init.boot_arg() {
                Some(arg) => format!("{} {arg}", vm.spec.boot_args),
                None => vm.spec.boot_args.clone(),
            },
            root_disk: vm.runtime.root_disk.clone().unwrap_or_default(),
            extra_disks: vm
                .runtime
                .work_disk
                .iter()
                .filter(|p| p.exists())
                .cloned()
                .collect(),
            guest_cid: vm.runtime.guest_cid,
            tap: vm.runtime.tap.clone(),
            guest_mac: None,
            jail: None,
            require_kvm: self.config.require_kvm.unwrap_or(false),
        };
        for cap in &self.caps {
            cap.vmm_config(vm, &mut cfg);
        }
        cfg
    }

    /// Spawns the VMM (`restore`: waiting for a saved state, `Vmm::spawn_restore`): its
    /// identity (sockets, log) recorded before the process exists, its pid, start time and
    /// sidecars right after; then watched.
    pub(super) async fn spawn_vmm(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        cfg: &VmmConfig,
        restore: bool,
    ) -> Result<VmmHandle> {
        let mut handle = self.vmm.plan(&vm.runtime.dir);
        vm.runtime.vmm = Some(handle.clone());
        *vm = self.store.save_vm(vm)?; // identity recorded before the process exists
        let spawned = match restore {
            true => self.vmm.spawn_restore(&handle, cfg, self.boot_timeout()),
            false => self.vmm.spawn(&handle, cfg, self.boot_timeout()),
        }
        .await?;
        handle.pid = Some(spawned.pid);
        handle.start_time = Some(spawned.start_time);
        handle.sidecars = spawned.sidecars;
        vm.runtime.vmm = Some(handle.clone());
        vm.runtime.set_accel(Some(spawned.accel));
        *vm = self.store.save_vm(vm)?;
        self.watch(vm.id.clone(), handle.clone(), spawned.child);
        crate::failpoint::hit("after-spawn");
        Ok(handle)
    }

    /// Waits for the guest's agent and configures the guest; records the SSH host keys wickd
    /// made for it (see `configure_identity`).
    pub(super) async fn configure_guest(
        &self,
        op: &OpEntry,
        vm: &mut VmRecord,
        handle: &VmmHandle,
    ) -> Result<()> {
        op.stage("wait for agent");
        let client = self.wait_agent(handle, op).await?;
        op.stage("configure guest");
        self.configure_identity(op, vm, &client, false).await
    }
}
