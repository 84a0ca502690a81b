//! The daemon's state and the VM lifecycle.
//!
//! [`Daemon`] owns the store, the VMM driver, the capabilities and the operation registry. Every
//! lifecycle flow (create, start, stop, restart, kill, delete, set) runs under the VM's lock,
//! moves the VM only along the lifecycle table of `wick_model::vm` ([`VmRecord::apply`]), and
//! follows the durability rule: a host resource's identity is saved in the VM's runtime before the
//! resource exists, and [`Daemon::release`] frees everything from that record alone.
//!
//! One module per flow: `create`, `start`, `stop` (and kill), `pause` (and resume), `delete`
//! (and prune), `set`, `snapshot` (snapshots of a VM, and their reconcile), `suspend` (the
//! VM's state to its suspend image, the VMM ended; and its reconcile),
//! `release`, with `boot_files`, the spec `checks`, VMM `watch`ing and `logs`. Every
//! operation is spawned by one spawner, `Daemon::spawn_op`. These modules use the domain and the
//! host crates, never the HTTP handlers (`crate::api`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wick_model::api::{OpKind, ResolvedDefaults};
use wick_model::vm::{LifecycleOp, TransitionError};
use wick_model::{Paths, VmRecord};
use wick_store::{now, Store};
use wick_vmm::Vmm;

use crate::capability::Capability;
use crate::config::{Config, HostFacts};
use crate::error::{Error, Result};
use crate::ops::{OpEntry, Ops};

mod boot_files;
mod checks;
mod create;
mod delete;
mod fork;
mod logs;
mod pause;
mod pool;
mod release;
mod restore;
mod set;
mod snapshot;
mod start;
mod stop;
mod suspend;
mod watch;
mod xfs_pool;

pub use boot_files::BootFiles;
pub use pause::PAUSE_TIMEOUT;
pub use pool::{pool_key, run as run_pool, Pool};
pub use release::disk_plan;
pub use snapshot::reconcile_snapshots;
pub use xfs_pool::reconcile_xfs_pool;

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
    /// The warm pool's fills in flight and backoff (`daemon/pool.rs`).
    pub pool: Pool,
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
        let readable = |p: &std::path::Path| shared_state_file(&paths.state, p);
        for d in [&paths.state, &paths.run, &paths.cache] {
            let fixed = crate::perms::harden_tree(d, &readable);
            if !fixed.is_empty() {
                tracing::info!(dir = %d.display(), count = fixed.len(), "made private");
            }
        }
        let store = Store::open(&paths.db())
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", paths.db().display()))?;
        let host = HostFacts::probe();
        let defaults = config.resolve_defaults(&host);
        let choice = config.storage_choice().map_err(|e| anyhow::anyhow!(e))?;
        let storage: Arc<dyn wick_storage::CowBackend> = Arc::from(wick_storage::select(
            choice,
            &paths.state,
            config.jailer_bin.is_some(),
        )?);
        tracing::info!(backend = storage.name(), "root disk backend");
        let artifacts = crate::artifacts::Artifacts::new(&paths)?;
        artifacts.refresh_initramfs();
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
            pool: Pool::default(),
        }))
    }

    fn boot_timeout(&self) -> Duration {
        self.config.boot_timeout()
    }

    /// A VM visible to the caller. Unassigned warm-pool VMs are wickd's: no lookup finds them.
    pub fn find(&self, reference: &str, caller: Caller) -> Result<VmRecord> {
        let vm = self.store.find_vm(reference, caller.filter())?;
        if vm.is_pooled() {
            return Err(wick_store::StoreError::NotFound(reference.to_string()).into());
        }
        Ok(vm)
    }

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

    /// Starts a lifecycle operation (`start`, `stop`, `restart`, `delete`, `pause`, `resume`,
    /// `suspend`) on a VM.
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
            LifecycleOp::Start => {
                let from_image = vm.state == wick_model::VmState::Suspended;
                let out = self.start_flow(op, vm).await;
                if from_image {
                    self.after_start(vm_id); // a used suspend image goes
                }
                out.map(Some)
            }
            LifecycleOp::Stop => self.stop_flow(op, vm).await.map(Some),
            LifecycleOp::Restart => {
                let vm = self.stop_flow(op, vm).await?;
                self.start_flow(op, vm).await.map(Some)
            }
            LifecycleOp::Delete => self.delete_flow(op, vm).await.map(|()| None),
            LifecycleOp::Pause => self.pause_flow(op, vm).await.map(Some),
            LifecycleOp::Resume => self.resume_flow(op, vm).await.map(Some),
            LifecycleOp::Suspend => self.suspend_flow(op, vm).await.map(Some),
        }
    }
}

/// The files under the state dir wickd keeps readable (root's, 0644) on purpose, for the VMM
/// uids that load them through a hard link or from their own dir, never writable: a snapshot's
/// state files (`snapshots/<id>/vm.*`, see `snapshot.rs`), a restore's hard links of them
/// (`vms/<id>/restore.*`, the same inodes: see `restore.rs`) and a suspend image
/// (`vms/<id>/suspend.*`, see `suspend.rs`). Start-up hardening leaves their read bits.
fn shared_state_file(state: &std::path::Path, p: &std::path::Path) -> bool {
    let Ok(rel) = p.strip_prefix(state) else {
        return false;
    };
    let parts: Vec<_> = rel.iter().filter_map(|c| c.to_str()).collect();
    match parts.as_slice() {
        ["snapshots", _, name] => name.starts_with("vm."),
        ["vms", _, name] => [suspend::IMAGE_PREFIX, restore::LINK_PREFIX]
            .iter()
            .any(|prefix| name.starts_with(&format!("{prefix}."))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use wick_model::api::ErrorCode;
    use wick_model::vm::VmAction;
    use wick_model::VmState;

    use super::*;

    #[test]
    fn only_state_files_vmms_load_stay_readable() {
        let st = std::path::Path::new("/s");
        for (p, readable) in [
            ("/s/snapshots/ab/vm.mem", true),
            ("/s/snapshots/ab/root.img", false),
            ("/s/vms/ab/restore.state", true),
            ("/s/vms/ab/suspend.vmstate", true),
            ("/s/vms/ab/work.ext4", false),
            ("/s/vms/ab/boot/vm.mem", false),
            ("/s/db.sqlite", false),
            ("/other/snapshots/ab/vm.mem", false),
        ] {
            assert_eq!(
                shared_state_file(st, std::path::Path::new(p)),
                readable,
                "{p}"
            );
        }
    }

    #[test]
    fn refused_transitions_are_conflicts_naming_vm_state_and_action() {
        let e = Error::from(TransitionError {
            vm: "a1".into(),
            state: VmState::Starting,
            action: VmAction::Start,
        });
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert_eq!(e.0.code.http_status(), 409);
        assert_eq!(e.message(), "VM a1 is starting; cannot start it now");
    }
}
