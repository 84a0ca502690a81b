//! Long operations: ids, stage events, streaming, cancellation, and the per-VM lock that allows
//! one lifecycle operation per VM at a time. Image and kernel jobs are operations too
//! ([`Ops::begin_artifact`], [`OpEntry::finish_artifact`]); they hold no VM lock.
//!
//! Operations live in memory only: they describe work in flight, not host resources. A crash
//! loses them; reconcile then settles every VM from its durable record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use wick_model::api::{ApiError, ArtifactOp, OpEvent, OpKind, OpState, Operation};
use wick_model::VmRecord;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long finished operations stay queryable.
const KEEP_FINISHED: Duration = Duration::from_secs(600);

/// One operation: its public view, its event log, and its cancel token.
pub struct OpEntry {
    started: Instant,
    metrics: Arc<Metrics>,
    /// The VM's owner (for image and kernel jobs, the caller): who may follow the operation
    /// (also after a delete removed the VM).
    pub owner: u32,
    inner: Mutex<OpInner>,
    seq_tx: watch::Sender<u64>,
    pub cancel: CancellationToken,
}

struct OpInner {
    op: Operation,
    events: Vec<OpEvent>,
    finished: Option<Instant>,
    /// When the current stage began (its duration goes to the metrics when it ends).
    stage_started: Instant,
}

impl OpEntry {
    pub fn id(&self) -> String {
        self.lock().op.id.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The public view of the operation.
    pub fn snapshot(&self) -> Operation {
        self.lock().op.clone()
    }

    fn push(&self, inner: &mut OpInner, ev_state: OpState, stage: Option<String>) {
        let ev = OpEvent {
            op_id: inner.op.id.clone(),
            seq: inner.events.len() as u64,
            state: ev_state,
            stage,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            error: inner.op.error.clone(),
            vm: if ev_state.is_terminal() {
                inner.op.vm.clone()
            } else {
                None
            },
            artifact: if ev_state.is_terminal() {
                inner.op.artifact.clone()
            } else {
                None
            },
        };
        inner.events.push(ev);
        let n = inner.events.len() as u64;
        self.seq_tx.send_replace(n);
    }

    /// Enters a new stage.
    pub fn stage(&self, name: &str) {
        let mut inner = self.lock();
        if inner.op.state.is_terminal() {
            return;
        }
        self.stage_ended(&mut inner);
        inner.op.stage = Some(name.to_string());
        self.push(&mut inner, OpState::Running, Some(name.to_string()));
        tracing::debug!(op = %inner.op.id, vm = %inner.op.vm_name, stage = name, "stage");
    }

    /// Shows a line of the operation's output (e.g. a build step's) as an event, without
    /// entering a stage: the metrics' stage labels stay a fixed set, whatever the line says.
    pub fn output(&self, line: &str) {
        let mut inner = self.lock();
        if inner.op.state.is_terminal() {
            return;
        }
        self.push(&mut inner, OpState::Running, Some(line.to_string()));
    }

    /// Records the duration of the stage that just ended, if any.
    fn stage_ended(&self, inner: &mut OpInner) {
        if let Some(stage) = &inner.op.stage {
            let secs = inner.stage_started.elapsed().as_secs_f64();
            self.metrics.stage_done(inner.op.kind, stage, secs);
        }
        inner.stage_started = Instant::now();
    }

    /// Errors with `cancelled` if cancel was requested.
    pub fn check(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::cancelled())
        } else {
            Ok(())
        }
    }

    /// Ends the operation. Idempotent: the first outcome wins.
    pub fn finish(&self, outcome: std::result::Result<Option<VmRecord>, Error>) {
        self.end(outcome.map(|vm| (vm, None)));
    }

    /// Ends an image or kernel operation with what it made. Idempotent like [`Self::finish`].
    pub fn finish_artifact(&self, outcome: std::result::Result<ArtifactOp, Error>) {
        self.end(outcome.map(|a| (None, Some(a))));
    }

    fn end(&self, outcome: std::result::Result<(Option<VmRecord>, Option<ArtifactOp>), Error>) {
        let mut inner = self.lock();
        if inner.op.state.is_terminal() {
            return;
        }
        let state = match &outcome {
            Ok(_) => OpState::Succeeded,
            Err(e) if e.code() == wick_model::api::ErrorCode::Cancelled => OpState::Cancelled,
            Err(_) => OpState::Failed,
        };
        match outcome {
            Ok((vm, artifact)) => {
                inner.op.vm = vm;
                if artifact.is_some() {
                    inner.op.artifact = artifact;
                }
            }
            Err(e) => {
                let mut err: ApiError = e.0;
                err.op_id = Some(inner.op.id.clone());
                inner.op.error = Some(err);
            }
        }
        self.stage_ended(&mut inner);
        self.metrics.operation_finished(inner.op.kind, state);
        inner.op.state = state;
        inner.op.finished_at = Some(wick_store::now());
        inner.finished = Some(Instant::now());
        let stage = inner.op.stage.clone();
        self.push(&mut inner, state, stage);
    }

    /// Events from `from` on, and whether the operation has ended.
    pub fn events_since(&self, from: usize) -> (Vec<OpEvent>, bool) {
        let inner = self.lock();
        let evs = inner
            .events
            .get(from..)
            .map(|s| s.to_vec())
            .unwrap_or_default();
        (evs, inner.op.state.is_terminal())
    }

    /// A receiver that changes whenever an event is pushed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.seq_tx.subscribe()
    }

    /// Waits for the end of the operation and returns it.
    pub async fn wait(&self) -> Operation {
        let mut rx = self.subscribe();
        loop {
            rx.borrow_and_update();
            let op = self.snapshot();
            if op.state.is_terminal() {
                return op;
            }
            if rx.changed().await.is_err() {
                return self.snapshot();
            }
        }
    }
}

/// A VM's lock and the id of the operation holding it, if any.
type VmLock = (Arc<tokio::sync::Mutex<()>>, Option<String>);

/// Registry of operations and of per-VM locks.
#[derive(Default)]
pub struct Ops {
    ops: Mutex<HashMap<String, Arc<OpEntry>>>,
    vm_locks: Mutex<HashMap<String, VmLock>>,
    /// Fed by every operation's stages and outcome.
    pub metrics: Arc<Metrics>,
}

/// Held while an operation owns a VM. Released on drop.
pub struct VmGuard {
    _guard: OwnedMutexGuard<()>,
}

impl Ops {
    fn lock_ops(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OpEntry>>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm_mutex(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks
            .entry(vm_id.to_string())
            .or_insert_with(|| (Default::default(), None))
            .0
            .clone()
    }

    /// Takes the VM for a lifecycle operation, or fails with `conflict` naming the operation
    /// that holds it.
    pub fn try_lock_vm(&self, vm_id: &str, vm_name: &str, op_id: Option<&str>) -> Result<VmGuard> {
        let m = self.vm_mutex(vm_id);
        match m.try_lock_owned() {
            Ok(g) => {
                let mut locks = self.vm_locks.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = locks.get_mut(vm_id) {
                    e.1 = op_id.map(str::to_string);
                }
                Ok(VmGuard { _guard: g })
            }
            Err(_) => {
                let holder = self
                    .vm_locks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(vm_id)
                    .and_then(|e| e.1.clone());
                let by = holder
                    .and_then(|id| self.get(&id).map(|o| o.snapshot()))
                    .map(|o| format!(" by operation {} ({:?})", o.id, o.kind).to_lowercase())
                    .unwrap_or_default();
                Err(Error::conflict(format!(
                    "VM {vm_name} is busy{by}; wait for it to finish or cancel it"
                )))
            }
        }
    }

    /// Waits for the VM (used by background work such as the exit monitor).
    pub async fn lock_vm(&self, vm_id: &str) -> VmGuard {
        let m = self.vm_mutex(vm_id);
        VmGuard {
            _guard: m.lock_owned().await,
        }
    }

    /// Forgets the lock of a deleted VM.
    pub fn forget_vm(&self, vm_id: &str) {
        self.vm_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id);
    }

    /// Registers a new running operation.
    pub fn begin(&self, kind: OpKind, vm: &VmRecord) -> Arc<OpEntry> {
        self.register(kind, vm.owner, (&vm.id, &vm.name), None)
    }

    /// Registers a new running operation of `owner` that makes image or kernel `name`.
    pub fn begin_artifact(&self, kind: OpKind, name: &str, owner: u32) -> Arc<OpEntry> {
        self.register(kind, owner, ("", ""), Some(ArtifactOp::named(name)))
    }

    fn register(
        &self,
        kind: OpKind,
        owner: u32,
        (vm_id, vm_name): (&str, &str),
        artifact: Option<ArtifactOp>,
    ) -> Arc<OpEntry> {
        let id = format!("op-{}", &wick_model::new_vm_id()[..16]);
        let (seq_tx, _) = watch::channel(0);
        let entry = Arc::new(OpEntry {
            started: Instant::now(),
            metrics: self.metrics.clone(),
            owner,
            inner: Mutex::new(OpInner {
                op: Operation {
                    id: id.clone(),
                    kind,
                    vm_id: vm_id.to_string(),
                    vm_name: vm_name.to_string(),
                    state: OpState::Running,
                    stage: None,
                    error: None,
                    vm: None,
                    started_at: wick_store::now(),
                    finished_at: None,
                    artifact,
                },
                events: Vec::new(),
                finished: None,
                stage_started: Instant::now(),
            }),
            seq_tx,
            cancel: CancellationToken::new(),
        });
        let mut ops = self.lock_ops();
        ops.retain(|_, e| {
            e.lock()
                .finished
                .is_none_or(|t| t.elapsed() < KEEP_FINISHED)
        });
        ops.insert(id, entry.clone());
        entry
    }

    pub fn get(&self, id: &str) -> Option<Arc<OpEntry>> {
        self.lock_ops().get(id).cloned()
    }

    /// Operations still running (for shutdown and status).
    pub fn running(&self) -> Vec<Arc<OpEntry>> {
        self.lock_ops()
            .values()
            .filter(|e| !e.lock().op.state.is_terminal())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "a1", "owner": 0, "state": "stopped",
            "spec": {"vcpu": 1, "memory_mib": 512, "disk_mib": 1024, "image": "i", "kernel": "/k",
                      "initrd": null, "boot_args": "", "vmm": "firecracker"},
            "runtime": {"dir": "/d", "root_disk": null, "guest_cid": 3, "vmm": null},
            "created_at": "t", "updated_at": "t", "touched_at": "t"
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn events_stream_in_order_and_end() {
        let ops = Ops::default();
        let op = ops.begin(OpKind::Start, &vm());
        op.stage("one");
        op.stage("two");
        op.finish(Ok(None));
        op.stage("ignored after finish");
        let (evs, done) = op.events_since(0);
        assert!(done);
        let stages: Vec<_> = evs
            .iter()
            .map(|e| (e.seq, e.state, e.stage.clone()))
            .collect();
        assert_eq!(
            stages,
            vec![
                (0, OpState::Running, Some("one".into())),
                (1, OpState::Running, Some("two".into())),
                (2, OpState::Succeeded, Some("two".into())),
            ]
        );
        assert_eq!(op.wait().await.state, OpState::Succeeded);
    }

    #[tokio::test]
    async fn cancel_and_failure_states() {
        let ops = Ops::default();
        let op = ops.begin(OpKind::Create, &vm());
        op.cancel.cancel();
        assert!(op.check().is_err());
        op.finish(Err(Error::cancelled()));
        assert_eq!(op.snapshot().state, OpState::Cancelled);
        let op2 = ops.begin(OpKind::Create, &vm());
        op2.finish(Err(Error::internal("boom")));
        let s = op2.snapshot();
        assert_eq!(s.state, OpState::Failed);
        assert_eq!(s.error.unwrap().op_id.as_deref(), Some(s.id.as_str()));
    }

    /// Output lines are events, not stages: the operation's stage (and so the metrics' stage
    /// labels, fed only by `stage`) stays what the code named, whatever a guest prints.
    #[test]
    fn output_lines_are_events_not_stages() {
        let ops = Ops::default();
        let op = ops.begin_artifact(OpKind::ImageBuild, "b", 0);
        op.stage("run a step");
        op.output("guest says \\x1b hi");
        let (evs, _) = op.events_since(0);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[1].stage.as_deref(), Some("guest says \\x1b hi"));
        assert_eq!(op.snapshot().stage.as_deref(), Some("run a step"));
        op.finish_artifact(Ok(ArtifactOp::named("b")));
        op.output("after the end: dropped");
        assert_eq!(op.events_since(0).0.len(), 3);
    }

    #[tokio::test]
    async fn artifact_operations_carry_their_result() {
        let ops = Ops::default();
        let op = ops.begin_artifact(OpKind::ImageImport, "base", 0);
        let snap = op.snapshot();
        assert_eq!((snap.vm_id.as_str(), snap.vm_name.as_str()), ("", ""));
        assert_eq!(snap.artifact, Some(ArtifactOp::named("base")));
        op.stage("copying");
        let made = ArtifactOp::named("base");
        op.finish_artifact(Ok(made.clone()));
        op.finish(Err(Error::internal("ignored: the first outcome wins")));
        let (evs, done) = op.events_since(0);
        assert!(done);
        assert_eq!(
            evs[0].artifact, None,
            "only terminal events carry the result"
        );
        assert_eq!(evs[1].artifact, Some(made));
        assert_eq!(op.wait().await.state, OpState::Succeeded);
        assert!(ops.get(&op.id()).is_some());
        let json = serde_json::to_value(ops.begin(OpKind::Start, &vm()).snapshot()).unwrap();
        assert!(
            json.get("artifact").is_none(),
            "VM operations are unchanged: {json}"
        );
    }

    #[tokio::test]
    async fn one_operation_per_vm() {
        let ops = Ops::default();
        let op = ops.begin(OpKind::Start, &vm());
        let g = ops.try_lock_vm("x", "a1", Some(&op.id())).unwrap();
        let e = ops.try_lock_vm("x", "a1", None).err().unwrap();
        assert!(e.message().contains("busy by operation op-"), "{e}");
        drop(g);
        ops.try_lock_vm("x", "a1", None).unwrap();
    }
}
