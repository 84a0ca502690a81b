//! Create: the durable record first (`creating`, unique name, vsock CID), then the create
//! operation makes the disks (`stopped`) and, unless told not to, starts the VM.

use std::sync::Arc;

use wick_model::api::{CreateVmRequest, OpKind};
use wick_model::vm::VmAction;
use wick_model::{new_vm_id, validate_vm_name, VmRecord, VmRuntime, VmSpec, VmState};
use wick_store::{now, StoreError};

use super::checks::{check_disk, check_vcpu};
use super::release::plan_json;
use super::{Caller, Daemon};
use crate::error::{Error, Result};
use crate::ops::OpEntry;

impl Daemon {
    /// Validates the request into a spec (every check the CLI makes, again).
    pub fn resolve_spec(&self, req: &CreateVmRequest, caller: Caller) -> Result<VmSpec> {
        let vcpu = match req.vcpu {
            Some(v) => check_vcpu(v)?,
            None => self.defaults.vcpu.value as u32,
        };
        let memory_mib = match &req.memory {
            Some(m) => self.check_memory(m)?,
            None => self.defaults.memory_mib.value,
        };
        let disk_mib = match &req.disk_size {
            Some(d) => check_disk(d)?,
            None => self.defaults.disk_mib.value,
        };
        let image_name = req
            .image
            .clone()
            .unwrap_or_else(|| self.config.default_image_name().into());
        let mut spec = VmSpec {
            vcpu,
            memory_mib,
            disk_mib,
            image: image_name.clone(),
            vmm: self.vmm.name().to_string(),
            nat: req.nat,
            allow_hosts: super::set::check_allow_hosts(&req.allow_hosts, req.nat)?,
            ssh_keys: req.ssh_keys.clone(),
            git_name: req.git_name.clone(),
            git_email: req.git_email.clone(),
            publish: self.check_publish(&req.publish, None, caller)?,
            init: req.init.unwrap_or_default(),
            ..Default::default()
        };
        match self.boot_files(&image_name) {
            Ok(b) => b.apply(&mut spec),
            // The default pair is prepared by the create operation itself (first use); the
            // spec's boot files are filled in then.
            Err(_)
                if image_name == crate::artifacts::DEFAULT_IMAGE
                    && !self.config.images.contains_key(&image_name)
                    && !self.artifacts.default_ready() => {}
            Err(e) => return Err(e),
        }
        if let Some(k) = &req.kernel {
            if spec.kernel.as_os_str().is_empty() {
                return Err(Error::precondition(
                    "--kernel needs the image ready, and the default image is prepared on first \
                     use: create one VM without --kernel first",
                ));
            }
            let (kernel, initrd) = self.artifacts.kernel_boot(k, self.vmm.name() == "qemu")?;
            (spec.kernel, spec.initrd) = (kernel, initrd);
        }
        Ok(spec)
    }

    /// Registers the VM (durable record first) and starts the create operation. A started
    /// create whose spec matches the warm pool's takes a ready pool VM instead (never waiting
    /// for one: no match or an empty pool is the cold path).
    pub fn create(self: &Arc<Self>, req: CreateVmRequest, caller: Caller) -> Result<Arc<OpEntry>> {
        if let Some(name) = &req.name {
            validate_vm_name(name).map_err(|e| Error::invalid(e.to_string()))?;
        }
        if req.from_snapshot.is_some() {
            return self.create_from_snapshot(req, caller);
        }
        let spec = self.resolve_spec(&req, caller)?;
        // Checked and recorded under one lock: concurrent creates cannot both pass the limits.
        let quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        self.check_limits(caller.uid, None, &spec)?;
        let mut attempt = 0;
        let vm = loop {
            let name = match &req.name {
                Some(n) => n.clone(),
                None if attempt < 20 => wick_model::generate_name(),
                None => format!("{}-{}", wick_model::generate_name(), &new_vm_id()[..4]),
            };
            let pooled = match req.no_start {
                true => Ok(None), // a stopped VM: nothing to gain from a booted one
                false => self.take_pooled(&spec, &name, caller.uid),
            };
            let made = match pooled {
                Ok(Some(vm)) => Ok(vm),
                Ok(None) => self.store.create_vm(self.new_record(name, caller, &spec)),
                Err(e) => Err(e),
            };
            match made {
                Ok(vm) => break vm,
                Err(StoreError::NameTaken(_)) if req.name.is_none() => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        };
        drop(quota);
        if vm.runtime.pool.is_some() {
            return self.assign(vm);
        }
        let no_start = req.no_start;
        self.spawn_op(OpKind::Create, vm, move |d, op, vm| async move {
            d.create_flow(&op, vm, no_start).await.map(Some)
        })
    }

    /// A new VM's record: `creating`, its own directory.
    pub(super) fn new_record(&self, name: String, caller: Caller, spec: &VmSpec) -> VmRecord {
        let id = new_vm_id();
        let t = now();
        VmRecord {
            runtime: VmRuntime {
                dir: self.paths.vm_dir(&id),
                ..Default::default()
            },
            id,
            name,
            owner: caller.uid,
            state: VmState::Creating,
            spec: spec.clone(),
            created_at: t.clone(),
            updated_at: t.clone(),
            touched_at: t,
        }
    }

    /// The create operation: the disks (`stopped`), then the start unless `no_start`. A VM
    /// whose disks could not be made is removed again, leaving no trace.
    pub(super) async fn create_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
        no_start: bool,
    ) -> Result<VmRecord> {
        if let Err(e) = self.make_disks(op, &mut vm).await {
            let _ = self.release_disks(&vm);
            let _ = std::fs::remove_dir_all(&vm.runtime.dir);
            let _ = self.store.delete_vm(&vm.id);
            self.ops.forget_vm(&vm.id);
            return Err(e);
        }
        vm.apply(VmAction::Created)?;
        vm = self.store.save_vm(&vm)?;
        if no_start {
            return Ok(vm);
        }
        self.start_flow(op, vm).await
    }

    /// Boot files (the default pair prepared on first use), then the root disk's plan and the
    /// work disk's path recorded, then both disks made.
    async fn make_disks(&self, op: &OpEntry, vm: &mut VmRecord) -> Result<()> {
        if vm.spec.kernel.as_os_str().is_empty() {
            // First use: prepare the default kernel and golden image, once, visibly.
            op.stage("first use: prepare the default kernel and image");
            self.artifacts
                .ensure_default(|s| op.stage(&format!("first use: {s}")))
                .await?;
            self.boot_files(&vm.spec.image)?.apply(&mut vm.spec);
            *vm = self.store.save_vm(vm)?;
        }
        op.stage("prepare disks");
        let image = self.boot_files(&vm.spec.image)?;
        let dir = vm.runtime.dir.clone();
        let plan = self
            .storage
            .plan(&vm.id, &dir, &image.rootfs)
            .map_err(|e| Error::precondition(format!("image {} rootfs: {e}", vm.spec.image)))?;
        let work = dir.join("work.ext4");
        vm.runtime.root_disk = Some(plan.disk_path());
        vm.runtime.root_disk_plan = Some(plan_json(&plan)?);
        vm.runtime.work_disk = Some(work.clone());
        *vm = self.store.save_vm(vm)?; // identities recorded before anything is made
        if self.storage.kind() == wick_storage::BackendKind::XfsPool {
            tokio::task::block_in_place(|| self.establish_xfs_pool())?;
        }
        let storage = self.storage.clone();
        let size = vm.spec.disk_mib;
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::perms::make_dir(&dir, crate::perms::Access::Private)?;
            storage
                .create(&plan)
                .map_err(|e| Error::precondition(e.to_string()))?;
            wick_storage::work_disk::create(&work, size, image.work_seed.as_deref())
                .map_err(|e| Error::precondition(e.to_string()))
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        op.check()
    }
}
