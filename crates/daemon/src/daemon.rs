//! The daemon's state and the VM lifecycle.
//!
//! [`Daemon`] owns the store, the VMM driver, the capabilities and the operation registry. Every
//! lifecycle flow (create, start, stop, restart, kill, delete, set) runs under the VM's lock and
//! follows the durability rule: a host resource's identity is saved in the VM's runtime before the
//! resource exists, and [`Daemon::release`] frees everything from that record alone.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use wick_model::api::{
    CreateVmRequest, ErrorCode, KillRequest, OpKind, PruneResult, ResolvedDefaults, SetVmRequest,
};
use wick_model::vm::{LifecycleOp, Next, TransitionError, VmAction};
use wick_model::{
    new_vm_id, parse_size_mib, validate_vm_name, Paths, VmRecord, VmRuntime, VmSpec, VmState,
    VmmHandle,
};
use wick_store::{now, Store, StoreError};
use wick_vmm::{Vmm, VmmConfig};

use crate::capability::{Capability, HookCtx};
use crate::config::{Config, HostFacts, DEFAULT_BOOT_ARGS, MAX_DISK_MIB, MAX_VCPU};
use crate::error::{Error, Result};
use crate::ops::{OpEntry, Ops};

/// How long to wait for a VMM to die after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// The daemon: shared by every request handler and background task.
pub struct Daemon {
    pub paths: Paths,
    pub config: Config,
    pub host: HostFacts,
    pub defaults: ResolvedDefaults,
    pub store: Store,
    pub vmm: Arc<dyn Vmm>,
    /// Root disk backend for new VMs (existing VMs keep the one in their plan).
    pub storage: Arc<dyn wick_storage::CowBackend>,
    pub ops: Ops,
    /// Managed images and kernels.
    pub artifacts: crate::artifacts::Artifacts,
    /// Latest CPU/memory samples of running VMs.
    pub stats: crate::stats::Stats,
    pub caps: Vec<Arc<dyn Capability>>,
    pub started: Instant,
    /// Cancelled to shut the daemon down.
    pub shutdown: CancellationToken,
    /// Held while a `[limits]` check and the record it admits are saved.
    quota: std::sync::Mutex<()>,
}

/// What an image boots from.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub rootfs: std::path::PathBuf,
    pub work_seed: Option<std::path::PathBuf>,
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    pub boot_args: String,
    pub agent: bool,
}

impl BootFiles {
    fn apply(&self, spec: &mut VmSpec) {
        spec.kernel = self.kernel.clone();
        spec.initrd = self.initrd.clone();
        spec.boot_args = self.boot_args.clone();
        spec.agent = self.agent;
    }
}

/// Who is asking: the peer uid of the API connection.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
}

impl Caller {
    /// The owner filter for this caller: root sees everything.
    pub fn filter(self) -> Option<u32> {
        (self.uid != 0).then_some(self.uid)
    }
}

/// An action the lifecycle table refuses in the VM's state: `409 conflict`.
impl From<TransitionError> for Error {
    fn from(e: TransitionError) -> Error {
        Error::conflict(e.to_string())
    }
}

impl Daemon {
    /// Opens the store under `paths` (creating directories) and assembles the daemon.
    pub fn open(
        paths: Paths,
        config: Config,
        vmm: Arc<dyn Vmm>,
        caps: Vec<Arc<dyn Capability>>,
    ) -> anyhow::Result<Arc<Daemon>> {
        for d in [
            &paths.state,
            &paths.run,
            &paths.cache,
            &paths.state.join("vms"),
        ] {
            crate::perms::make_dir(d, crate::perms::Access::Private)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", d.display()))?;
        }
        // An older install left things group/world readable: fix them before serving.
        for d in [&paths.state, &paths.run, &paths.cache] {
            let fixed = crate::perms::harden_tree(d);
            if !fixed.is_empty() {
                tracing::info!(dir = %d.display(), count = fixed.len(), "made private");
            }
        }
        let store = Store::open(&paths.db())
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", paths.db().display()))?;
        let host = HostFacts::probe();
        let defaults = config.resolve_defaults(&host);
        let choice = config.storage_choice().map_err(|e| anyhow::anyhow!(e))?;
        let storage: Arc<dyn wick_storage::CowBackend> =
            Arc::from(wick_storage::select(choice, &paths.state)?);
        tracing::info!(backend = storage.name(), "root disk backend");
        let artifacts = crate::artifacts::Artifacts::new(&paths)?;
        Ok(Arc::new(Daemon {
            paths,
            config,
            host,
            defaults,
            store,
            vmm,
            storage,
            ops: Ops::default(),
            artifacts,
            stats: Default::default(),
            caps,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            quota: std::sync::Mutex::new(()),
        }))
    }

    fn boot_timeout(&self) -> Duration {
        self.config.boot_timeout()
    }

    /// A VM visible to the caller.
    pub fn find(&self, reference: &str, caller: Caller) -> Result<VmRecord> {
        Ok(self.store.find_vm(reference, caller.filter())?)
    }

    // ---------------------------------------------------------------- create

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
            ssh_keys: req.ssh_keys.clone(),
            git_name: req.git_name.clone(),
            git_email: req.git_email.clone(),
            publish: self.check_publish(&req.publish, None, caller)?,
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
        Ok(spec)
    }

    /// Root filesystem, work-seed and boot files of an image: a `[images.NAME]` table of the
    /// config first, else a managed image (with its kernel).
    pub fn boot_files(&self, image: &str) -> Result<BootFiles> {
        if let Some(i) = self.config.images.get(image) {
            return Ok(BootFiles {
                rootfs: i.rootfs.clone(),
                work_seed: i.work_seed.clone(),
                kernel: i.kernel.clone(),
                initrd: i.initrd.clone(),
                boot_args: i
                    .boot_args
                    .clone()
                    .unwrap_or_else(|| DEFAULT_BOOT_ARGS.into()),
                agent: i.agent.unwrap_or(false),
            });
        }
        let b = self.artifacts.resolve(image).map_err(|e| {
            let configured: Vec<_> = self.config.images.keys().cloned().collect();
            if e.code() == ErrorCode::NotFound && !configured.is_empty() {
                Error::new(
                    ErrorCode::NotFound,
                    format!("{e}; images in the config: {}", configured.join(", ")),
                )
            } else {
                e
            }
        })?;
        // QEMU boots the bzImage; Firecracker needs the ELF vmlinux.
        let kernel = match (self.vmm.name(), &b.kernel_bzimage) {
            ("qemu", Some(bz)) => bz.clone(),
            _ => b.kernel_vmlinux.clone(),
        };
        Ok(BootFiles {
            rootfs: b.rootfs,
            work_seed: b.work_seed,
            kernel,
            initrd: b.initrd,
            boot_args: DEFAULT_BOOT_ARGS.into(),
            agent: b.agent,
        })
    }

    /// Parses `--publish` values and refuses host ports already published by another VM (or
    /// twice in one request), and, for non-root callers, privileged ports and addresses other
    /// than loopback and `user_publish_addresses`.
    fn check_publish(
        &self,
        specs: &[String],
        vm_id: Option<&str>,
        caller: Caller,
    ) -> Result<Vec<wick_model::PortMapping>> {
        let mut out: Vec<wick_model::PortMapping> = Vec::new();
        let taken: Vec<(String, wick_model::PortMapping)> = self
            .store
            .list_vms(None)?
            .into_iter()
            .filter(|v| Some(v.id.as_str()) != vm_id)
            .flat_map(|v| v.spec.publish.into_iter().map(move |m| (v.name.clone(), m)))
            .collect();
        for s in specs {
            let m = wick_model::PortMapping::parse(s).map_err(Error::invalid)?;
            if caller.uid != 0 {
                self.check_user_publish(&m)?;
            }
            if let Some((name, _)) = taken.iter().find(|(_, t)| t.host_port == m.host_port) {
                return Err(Error::conflict(format!(
                    "host port {} is already published by VM {name}",
                    m.host_port
                )));
            }
            if out.iter().any(|o| o.host_port == m.host_port) {
                return Err(Error::invalid(format!(
                    "host port {} is published twice",
                    m.host_port
                )));
            }
            out.push(m);
        }
        Ok(out)
    }

    /// What a non-root owner may publish: ports a non-root process could bind itself, on
    /// loopback or an address root listed in `user_publish_addresses`.
    fn check_user_publish(&self, m: &wick_model::PortMapping) -> Result<()> {
        let denied = |msg: String| Error::new(ErrorCode::PermissionDenied, msg);
        let start = unprivileged_port_start();
        if u32::from(m.host_port) < start {
            return Err(denied(format!(
                "host port {} is privileged (below net.ipv4.ip_unprivileged_port_start = {start}); \
                 only root may publish it: use a port >= {start}",
                m.host_port
            )));
        }
        let ip: std::net::IpAddr = m
            .host_ip
            .parse()
            .map_err(|_| Error::invalid(format!("bad host IP {}", m.host_ip)))?;
        let listed = self
            .config
            .user_publish_addresses
            .iter()
            .any(|a| a.parse::<std::net::IpAddr>().ok() == Some(ip));
        if !ip.is_loopback() && !listed {
            return Err(denied(format!(
                "host address {ip} is not loopback; only root may publish on it (root can allow \
                 it for everyone in user_publish_addresses in the config)"
            )));
        }
        Ok(())
    }

    /// Refuses `spec` (a new VM, or `old` = the current spec of VM `vm_id`) when it would take
    /// a non-root `owner` past a `[limits]` total. A change that does not grow a resource is
    /// never refused for it (limits lowered in the config do not block shrinking or `--nat`).
    /// Callers hold [`Daemon::quota`] until the record is saved.
    fn check_limits(
        &self,
        owner: u32,
        current: Option<(&str, &VmSpec)>,
        spec: &VmSpec,
    ) -> Result<()> {
        if owner == 0 {
            return Ok(());
        }
        let vm_id = current.map(|(id, _)| id);
        let old = current.map(|(_, s)| s);
        let limits = self.config.limits.resolve(&self.host);
        let others: Vec<VmRecord> = self
            .store
            .list_vms(Some(owner))?
            .into_iter()
            .filter(|v| Some(v.id.as_str()) != vm_id)
            .collect();
        let sum = |f: fn(&VmSpec) -> u64| others.iter().map(|v| f(&v.spec)).sum::<u64>();
        let grows = |f: fn(&VmSpec) -> u64| old.is_none_or(|o| f(spec) > f(o));
        let checks = [
            (
                "max_vms",
                "VMs",
                others.len() as u64,
                1,
                limits.max_vms,
                old.is_none(),
            ),
            (
                "max_vcpus",
                "vCPUs",
                sum(|s| s.vcpu as u64),
                spec.vcpu as u64,
                limits.max_vcpus,
                grows(|s| s.vcpu as u64),
            ),
            (
                "max_memory",
                "MiB of memory",
                sum(|s| s.memory_mib),
                spec.memory_mib,
                limits.max_memory_mib,
                grows(|s| s.memory_mib),
            ),
            (
                "max_disk",
                "MiB of work disk",
                sum(|s| s.disk_mib),
                spec.disk_mib,
                limits.max_disk_mib,
                grows(|s| s.disk_mib),
            ),
        ];
        for (key, what, used, more, max, grows) in checks {
            if grows && used + more > max {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "limit [limits] {key} = {max} {what} per user: uid {owner}'s other VMs \
                         use {used}, this VM needs {more}; delete or shrink a VM, or ask root to \
                         raise the limit"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_memory(&self, m: &str) -> Result<u64> {
        let mib = parse_size_mib(m).map_err(|e| Error::invalid(format!("--memory: {e}")))?;
        if let Some(host) = self.host.memory_mib {
            if mib > host {
                return Err(Error::invalid(format!(
                    "--memory {m} is more than this host's {host} MiB of RAM"
                )));
            }
        }
        Ok(mib)
    }

    /// Registers the VM (durable record first) and starts the create operation.
    pub fn create(self: &Arc<Self>, req: CreateVmRequest, caller: Caller) -> Result<Arc<OpEntry>> {
        if let Some(name) = &req.name {
            validate_vm_name(name).map_err(|e| Error::invalid(e.to_string()))?;
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
            let id = new_vm_id();
            let t = now();
            let record = VmRecord {
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
            };
            match self.store.create_vm(record) {
                Ok(vm) => break vm,
                Err(StoreError::NameTaken(_)) if req.name.is_none() => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        };
        drop(quota);
        let no_start = req.no_start;
        self.spawn_op(OpKind::Create, vm, move |d, op, vm| async move {
            d.create_flow(&op, vm, no_start).await.map(Some)
        })
    }

    async fn create_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        mut vm: VmRecord,
        no_start: bool,
    ) -> Result<VmRecord> {
        let res: Result<()> = async {
            if vm.spec.kernel.as_os_str().is_empty() {
                // First use: prepare the default kernel and golden image, once, visibly.
                op.stage("first use: prepare the default kernel and image");
                self.artifacts
                    .ensure_default(|s| op.stage(&format!("first use: {s}")))
                    .await?;
                self.boot_files(&vm.spec.image)?.apply(&mut vm.spec);
                vm = self.store.save_vm(&vm)?;
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
            vm = self.store.save_vm(&vm)?; // identities recorded before anything is made
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
        .await;
        if let Err(e) = res {
            // Nothing usable was made: remove the VM again, leaving no trace.
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

    // ----------------------------------------------------------------- start

    /// The one spawner of VM operations: registers the `kind` operation on `vm`, takes the
    /// VM's lock (or fails the operation with the lock's conflict), then runs `flow` in a task
    /// and finishes the operation with its outcome once the lock is released.
    fn spawn_op<F, Fut>(
        self: &Arc<Self>,
        kind: OpKind,
        vm: VmRecord,
        flow: F,
    ) -> Result<Arc<OpEntry>>
    where
        F: FnOnce(Arc<Daemon>, Arc<OpEntry>, VmRecord) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<VmRecord>>> + Send + 'static,
    {
        let op = self.ops.begin(kind, &vm);
        let guard = match self.ops.try_lock_vm(&vm.id, &vm.name, Some(&op.id())) {
            Ok(g) => g,
            Err(e) => {
                op.finish(Err(e.clone()));
                return Err(e);
            }
        };
        let (d, op2) = (self.clone(), op.clone());
        tokio::spawn(async move {
            let out = flow(d, op2.clone(), vm).await;
            drop(guard);
            op2.finish(out);
        });
        Ok(op)
    }

    /// Starts a lifecycle operation (`start`, `stop`, `restart`, `delete`) on a VM.
    pub fn begin(self: &Arc<Self>, what: LifecycleOp, vm: VmRecord) -> Result<Arc<OpEntry>> {
        self.spawn_op(what.kind(), vm, move |d, op, vm| async move {
            d.lifecycle_flow(&op, what, &vm.id).await
        })
    }

    async fn lifecycle_flow(
        self: &Arc<Self>,
        op: &OpEntry,
        what: LifecycleOp,
        vm_id: &str,
    ) -> Result<Option<VmRecord>> {
        // Re-read under the lock: the record may have changed since the request resolved it.
        let mut vm = self.store.get_vm(vm_id)?;
        vm.touched_at = now();
        match what {
            LifecycleOp::Start => self.start_flow(op, vm).await.map(Some),
            LifecycleOp::Stop => self.stop_flow(op, vm).await.map(Some),
            LifecycleOp::Restart => {
                let vm = self.stop_flow(op, vm).await?;
                self.start_flow(op, vm).await.map(Some)
            }
            LifecycleOp::Delete => self.delete_flow(op, vm).await.map(|()| None),
        }
    }

    async fn start_flow(self: &Arc<Self>, op: &OpEntry, mut vm: VmRecord) -> Result<VmRecord> {
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
        Ok(Error(wick_model::api::ApiError::new(e.code(), why)))
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

    async fn start_inner(self: &Arc<Self>, op: &OpEntry, vm: &mut VmRecord) -> Result<()> {
        op.stage("prepare host");
        for cap in &self.caps {
            cap.prepare_host(&mut HookCtx::new(vm, &self.store)).await?;
            op.check()?;
        }

        let mut cfg = VmmConfig {
            vm_id: vm.id.clone(),
            vcpu: vm.spec.vcpu,
            memory_mib: vm.spec.memory_mib,
            kernel: vm.spec.kernel.clone(),
            initrd: vm.spec.initrd.clone(),
            boot_args: vm.spec.boot_args.clone(),
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
        op.stage("spawn vmm");
        let mut handle = self.vmm.plan(&vm.runtime.dir);
        vm.runtime.vmm = Some(handle.clone());
        *vm = self.store.save_vm(vm)?; // identity recorded before the process exists
        let spawned = self.vmm.spawn(&handle, &cfg, self.boot_timeout()).await?;
        handle.pid = Some(spawned.pid);
        handle.start_time = Some(spawned.start_time);
        handle.sidecars = spawned.sidecars;
        vm.runtime.vmm = Some(handle.clone());
        vm.runtime.set_accel(Some(spawned.accel));
        *vm = self.store.save_vm(vm)?;
        self.watch(vm.id.clone(), handle.clone(), spawned.child);
        crate::failpoint::hit("after-spawn");
        op.check()?;

        op.stage("boot");
        tokio::select! {
            r = self.vmm.boot(&handle, &cfg, self.boot_timeout()) => r?,
            _ = op.cancel.cancelled() => return Err(Error::cancelled()),
        }

        if vm.spec.agent {
            op.stage("wait for agent");
            let client = self.wait_agent(&handle, op).await?;
            op.stage("configure guest");
            let (cfg, refused) = self.guest_config(vm).await;
            for why in refused {
                op.stage(&format!("warning: {why}")); // the user sees what was not copied
            }
            let reply = client
                .configure(&cfg)
                .await
                .map_err(|e| Error::precondition(format!("configuring the guest failed: {e}")))?;
            for w in &reply.warnings {
                tracing::warn!(vm = %vm.name, warning = %w, "guest configuration");
            }
            vm.runtime.host_keys = reply.host_keys;
            *vm = self.store.save_vm(vm)?;
        }

        op.stage("post start");
        for cap in &self.caps {
            cap.post_start(&mut HookCtx::new(vm, &self.store)).await?;
        }
        Ok(())
    }

    // ----------------------------------------------------------- stop / kill

    async fn stop_flow(self: &Arc<Self>, op: &OpEntry, mut vm: VmRecord) -> Result<VmRecord> {
        if vm.state == VmState::Stopped && vm.runtime.vmm.is_none() {
            return Ok(vm);
        }
        vm.check(VmAction::Stop)?;
        op.stage("stop vmm");
        if let Some(h) = vm.runtime.vmm.clone() {
            vm.apply(VmAction::Stop)?;
            vm = self.store.save_vm(&vm)?;
            if self.vmm.find(&h).is_some() {
                self.shutdown_guest(&vm).await; // sync + poweroff inside first: data survives
            }
            self.vmm.stop(&h, self.config.stop_timeout()).await?;
        }
        op.stage("release host resources");
        self.release(&mut vm).await?;
        vm.apply(VmAction::Released)?;
        Ok(self.store.save_vm(&vm)?)
    }

    /// Sends a signal to the VM's VMM. If the VMM dies of it, the VM ends `stopped` with every
    /// resource released.
    pub async fn kill(
        self: &Arc<Self>,
        reference: &str,
        req: KillRequest,
        caller: Caller,
    ) -> Result<VmRecord> {
        let sig = match req.signal.as_deref() {
            None => Signal::SIGKILL,
            Some(s) => wick_host::proc::parse_signal(s).map_err(Error::invalid)?,
        };
        let vm = self.find(reference, caller)?;
        let _g = self.ops.try_lock_vm(&vm.id, &vm.name, None)?;
        let mut vm = self.store.get_vm(&vm.id)?;
        let handle = match &vm.runtime.vmm {
            Some(h) if self.vmm.find(h).is_some() => h.clone(),
            _ => {
                return Err(Error::new(
                    ErrorCode::NotRunning,
                    format!("VM {} is not running (state {})", vm.name, vm.state),
                ))
            }
        };
        vm.check(VmAction::Kill)?;
        vm.touched_at = now();
        self.vmm.kill(&handle, sig)?;
        let deadline = Instant::now() + KILL_GRACE;
        while self.vmm.find(&handle).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.vmm.find(&handle).is_some() {
            // Survived the signal (e.g. SIGUSR1): still running.
            return Ok(self.store.save_vm(&vm)?);
        }
        self.release(&mut vm).await?;
        vm.apply(VmAction::Released)?;
        Ok(self.store.save_vm(&vm)?)
    }

    /// Releases every host resource recorded in `vm.runtime`: the VMM (killed if alive), its
    /// sockets, then each capability's resources in reverse order. Idempotent; persists as it
    /// goes. The caller holds the VM lock and sets the final state.
    pub async fn release(&self, vm: &mut VmRecord) -> Result<()> {
        if let Some(h) = vm.runtime.vmm.clone() {
            if self.vmm.find(&h).is_some() {
                self.vmm.stop(&h, Duration::ZERO).await?;
            }
            if let Some(pid) = self.vmm.find(&h) {
                return Err(Error::internal(format!(
                    "VMM process {pid} of VM {} survived SIGKILL; it stays recorded",
                    vm.name
                )));
            }
            self.vmm.cleanup(&h);
            vm.runtime.vmm = None;
            vm.runtime.set_accel(None);
            *vm = self.store.save_vm(vm)?;
        }
        let mut first_err = None;
        for cap in self.caps.iter().rev() {
            if let Err(e) = cap.cleanup(&mut HookCtx::new(vm, &self.store)).await {
                tracing::error!(vm = %vm.name, cap = cap.name(), error = %e, "cleanup failed");
                first_err.get_or_insert(e);
            }
        }
        *vm = self.store.save_vm(vm)?;
        first_err.map_or(Ok(()), Err)
    }

    // ---------------------------------------------------------------- delete

    async fn delete_flow(self: &Arc<Self>, op: &OpEntry, mut vm: VmRecord) -> Result<()> {
        vm.check(VmAction::Delete)?;
        op.stage("release host resources");
        self.release(&mut vm).await?;
        for cap in self.caps.iter().rev() {
            cap.on_delete(&mut HookCtx::new(&mut vm, &self.store))
                .await?;
        }
        op.stage("remove files");
        self.release_disks(&vm)?;
        match std::fs::remove_dir_all(&vm.runtime.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(format!(
                    "cannot remove {}: {e}",
                    vm.runtime.dir.display()
                )))
            }
        }
        self.store.delete_vm(&vm.id)?;
        self.ops.forget_vm(&vm.id);
        Ok(())
    }

    /// Deletes every non-running VM of the caller, one after another.
    pub async fn prune(self: &Arc<Self>, caller: Caller) -> Result<PruneResult> {
        let mut out = PruneResult {
            deleted: Vec::new(),
            failed: Vec::new(),
        };
        for vm in self.store.list_vms(caller.filter())? {
            if vm.check(VmAction::Prune).is_err() {
                continue; // something may run it
            }
            let name = vm.name.clone();
            match self.begin(LifecycleOp::Delete, vm) {
                Ok(op) => {
                    let done = op.wait().await;
                    match done.error {
                        None => out.deleted.push(name),
                        Some(e) => out.failed.push(e),
                    }
                }
                Err(e) => out.failed.push(e.0),
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------------- set

    /// `vm set`: vcpu/memory take effect at the next start; capability changes (NAT) live.
    pub async fn set(
        self: &Arc<Self>,
        reference: &str,
        req: SetVmRequest,
        caller: Caller,
    ) -> Result<VmRecord> {
        if req.vcpu.is_none()
            && req.memory.is_none()
            && req.nat.is_none()
            && req.publish_add.is_empty()
            && req.publish_remove.is_empty()
            && req.workspace.is_none()
        {
            return Err(Error::invalid(
                "nothing to set: give --vcpu, --memory, --nat or ports to publish/unpublish",
            ));
        }
        let vcpu = req.vcpu.map(check_vcpu).transpose()?;
        let memory = req
            .memory
            .as_deref()
            .map(|m| self.check_memory(m))
            .transpose()?;
        let vm = self.find(reference, caller)?;
        let _g = self.ops.try_lock_vm(&vm.id, &vm.name, None)?;
        let mut vm = self.store.get_vm(&vm.id)?;
        let old = vm.spec.clone();
        if let Some(v) = vcpu {
            vm.spec.vcpu = v;
        }
        if let Some(m) = memory {
            vm.spec.memory_mib = m;
        }
        if let Some(n) = req.nat {
            vm.spec.nat = n;
        }
        if let Some(w) = &req.workspace {
            vm.spec.workspace = Some(w.clone());
        }
        for port in &req.publish_remove {
            if !vm.spec.publish.iter().any(|m| m.host_port == *port) {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("VM {} does not publish host port {port}", vm.name),
                ));
            }
            vm.spec.publish.retain(|m| m.host_port != *port);
        }
        let others: Vec<u16> = vm.spec.publish.iter().map(|m| m.host_port).collect();
        for m in self.check_publish(&req.publish_add, Some(&vm.id), caller)? {
            if others.contains(&m.host_port) {
                return Err(Error::conflict(format!(
                    "host port {} is already published by {}",
                    m.host_port, vm.name
                )));
            }
            vm.spec.publish.push(m);
        }
        vm.touched_at = now();
        {
            let _quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
            self.check_limits(vm.owner, Some((&vm.id, &old)), &vm.spec)?;
            vm = self.store.save_vm(&vm)?;
        }
        for cap in &self.caps {
            if let Err(e) = cap
                .apply_config_change(&mut HookCtx::new(&mut vm, &self.store), &old)
                .await
            {
                // Roll the spec back so the record matches the host.
                vm.spec = old.clone();
                self.store.save_vm(&vm)?;
                return Err(e);
            }
        }
        Ok(self.store.save_vm(&vm)?)
    }

    // --------------------------------------------------------- VMM watching

    /// Watches a VMM process until it exits, then settles the VM if the exit was unexpected.
    pub fn watch(
        self: &Arc<Self>,
        vm_id: String,
        handle: VmmHandle,
        child: Option<tokio::process::Child>,
    ) {
        let d = self.clone();
        tokio::spawn(async move {
            let status = match child {
                Some(mut c) => c.wait().await.ok().map(|s| s.to_string()),
                None => {
                    let pid = handle.pid.unwrap_or(0);
                    while wick_host::proc::is_alive(pid, handle.start_time) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None
                }
            };
            d.on_vmm_exit(&vm_id, &handle, status).await;
        });
    }

    async fn on_vmm_exit(&self, vm_id: &str, handle: &VmmHandle, status: Option<String>) {
        let _g = self.ops.lock_vm(vm_id).await;
        let Ok(mut vm) = self.store.get_vm(vm_id) else {
            return;
        };
        let ours = vm
            .runtime
            .vmm
            .as_ref()
            .is_some_and(|h| h.pid == handle.pid && h.pid.is_some());
        if !ours {
            return; // a lifecycle operation already settled it
        }
        let tail = self.log_tail(&vm, 15);
        let clean = status
            .as_deref()
            .is_some_and(|s| s.ends_with("exit status: 0"));
        tracing::warn!(vm = %vm.name, status = ?status, "VMM exited on its own");
        if let Err(e) = self.release(&mut vm).await {
            tracing::error!(vm = %vm.name, error = %e, "release after VMM exit");
        }
        let (action, last_error) = if clean {
            (VmAction::Released, None)
        } else {
            let why = format!(
                "VMM exited unexpectedly ({})",
                status.unwrap_or_else(|| "status unknown".into())
            );
            (VmAction::Crashed, Some(with_tail(&why, &tail)))
        };
        if let Err(e) = vm.apply(action) {
            tracing::error!(vm = %vm.name, error = %e, "settling VM after VMM exit");
            return;
        }
        vm.runtime.last_error = last_error;
        if let Err(e) = self.store.save_vm(&vm) {
            tracing::error!(vm = %vm.name, error = %e, "saving VM after VMM exit");
        }
    }

    // ------------------------------------------------------------------ logs

    /// Path of the VM's VMM log (serial console + VMM output).
    pub fn log_path(&self, vm: &VmRecord) -> std::path::PathBuf {
        vm.runtime
            .vmm
            .as_ref()
            .map(|h| h.log_path.clone())
            .unwrap_or_else(|| self.vmm.plan(&vm.runtime.dir).log_path)
    }

    /// The last `n` lines of the VM's log (`vmm.log`, continued into `vmm.log.1`), read from
    /// the end: never more than the configured log cap, whatever the file's size.
    pub fn log_tail(&self, vm: &VmRecord, n: usize) -> String {
        let max = self.config.vmm_log_limit().unwrap_or_default().max;
        wick_vmm::log::log_tail_lines(&self.log_path(vm), n, max)
    }

    /// The whole VM log: `vmm.log.1` then `vmm.log`, each at most the log cap (from its end).
    pub fn log_all(&self, vm: &VmRecord) -> String {
        let max = self.config.vmm_log_limit().unwrap_or_default().max;
        let log = self.log_path(vm);
        let read = |p: &std::path::Path| wick_vmm::log::read_tail(p, usize::MAX - 1, max);
        let (older, current) = (read(&wick_vmm::log::rotated_path(&log)), read(&log));
        match (older.is_empty(), current.is_empty()) {
            (true, _) => current + "\n",
            (false, true) => older + "\n",
            (false, false) => format!("{older}\n{current}\n"),
        }
    }
}

impl Daemon {
    /// Releases the VM's root disk (loops, dm device, files) from its recorded plan. Idempotent.
    pub fn release_disks(&self, vm: &VmRecord) -> Result<()> {
        let Some(_) = &vm.runtime.root_disk_plan else {
            return Ok(());
        };
        let plan = disk_plan(vm)?;
        wick_storage::release(&plan, &self.paths.state)
            .map_err(|e| Error::internal(format!("releasing root disk of {}: {e}", vm.name)))
    }
}

/// The VM's recorded root disk plan.
pub fn disk_plan(vm: &VmRecord) -> Result<wick_storage::DiskPlan> {
    let v = vm.runtime.root_disk_plan.clone().ok_or_else(|| {
        Error::precondition(format!(
            "VM {} has no root disk record; delete it and create it again",
            vm.name
        ))
    })?;
    serde_json::from_value(v)
        .map_err(|e| Error::internal(format!("root disk record of {}: {e}", vm.name)))
}

fn plan_json(plan: &wick_storage::DiskPlan) -> Result<serde_json::Value> {
    serde_json::to_value(plan).map_err(|e| Error::internal(e.to_string()))
}

fn with_tail(msg: &str, tail: &str) -> String {
    if tail.trim().is_empty() {
        msg.to_string()
    } else {
        format!("{msg}\n--- last lines of the VMM log ---\n{tail}")
    }
}

/// `net.ipv4.ip_unprivileged_port_start` of wickd's network namespace (where it listens);
/// 1024 when unreadable.
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn check_vcpu(v: i64) -> Result<u32> {
    if v < 1 || v as u64 > MAX_VCPU {
        return Err(Error::invalid(format!(
            "--vcpu {v}: must be between 1 and {MAX_VCPU}"
        )));
    }
    Ok(v as u32)
}

fn check_disk(d: &str) -> Result<u64> {
    let mib = parse_size_mib(d).map_err(|e| Error::invalid(format!("--disk-size: {e}")))?;
    if mib > MAX_DISK_MIB {
        return Err(Error::invalid(format!(
            "--disk-size {d} is larger than the 16 TiB limit"
        )));
    }
    Ok(mib)
}
