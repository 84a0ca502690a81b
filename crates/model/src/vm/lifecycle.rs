//! The VM lifecycle as one table: which action is allowed in which [`VmState`] and the state it
//! leads to. Every flow of the daemon moves a VM only through [`VmRecord::apply`], so a state
//! change the table does not allow is a typed [`TransitionError`] (the API's `409 conflict`),
//! never a silent overwrite.
//!
//! In the spirit of Firecracker's pre-boot and runtime API controllers: a request is checked
//! against the state before any work starts (`start` refuses a VM that is `starting`), and the
//! work's outcomes (`started`, `start failed`, `released`, …) are transitions of the same table.
//! `vm set` is not in it: it edits the spec in any state and moves no state.
//!
//! `paused` (the VMM alive, its vCPUs stopped): `pause`/`resume` move between it and `running`
//! (each a no-op in its own target state); `stop` and `restart` resume the guest first so it
//! powers off cleanly; `kill`, `delete` and a VMM exit work as from `running`; `start` and
//! `prune` are refused, and guest sessions (exec, ssh, cp, agent upgrade) are refused by the
//! daemon with the way out, `wick vm resume`. `vm set` applies to a paused VM live, as to a
//! running one (its DNS name, published ports and network rules stay while it is paused).
//!
//! `suspended` (no VMM; the guest's state in its suspend image, `runtime.restore`): `suspend`
//! leads there from `running` or `paused` (a no-op when suspended) and is applied only once the
//! image is complete and the VMM gone; `start` loads the image; `stop` discards it (→
//! `stopped`); `delete` removes it with the VM; `prune` refuses (the guest's state is kept on
//! purpose), and so do `pause`/`resume`. Guest sessions resume it first (the CLI starts it).

use std::fmt;

use super::{VmRecord, VmState};
use crate::api::OpKind;

impl VmState {
    /// Every state, in lifecycle order.
    pub const ALL: [VmState; 8] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Suspended,
        VmState::Stopping,
        VmState::Error,
    ];

    /// The lifecycle table: where `action` leads from this state, `None` if it is not allowed.
    pub fn next(self, action: VmAction) -> Option<Next> {
        use VmAction as A;
        use VmState as S;
        let to = match (action, self) {
            (A::Created, S::Creating) => S::Stopped,
            (A::Start, S::Stopped | S::Error | S::Suspended) => S::Starting,
            // Already running: start has nothing to do.
            (A::Start, S::Running) => S::Running,
            (A::Started, S::Starting) => S::Running,
            (A::StartFailed, S::Starting) => S::Error,
            (A::StartCancelled, S::Starting) => S::Stopped,
            // Pause and resume: each a no-op in its own target state.
            (A::Pause, S::Running | S::Paused) => S::Paused,
            (A::Resume, S::Paused | S::Running) => S::Running,
            // Suspend: applied once the image is complete and the VMM gone.
            (A::Suspend, S::Running | S::Paused | S::Suspended) => S::Suspended,
            // A record names no VMM while it is being created: nothing to stop, kill or release.
            (A::Stop | A::Kill | A::Released | A::Crashed, S::Creating) => return None,
            (A::Stop, _) => S::Stopping,
            // The VMM may survive the signal: kill moves the VM only once it is `released`.
            (A::Kill, s) => s,
            (A::Released, _) => S::Stopped,
            (A::Crashed, _) => S::Error,
            (A::Interrupted, S::Creating | S::Error) => S::Error,
            (A::Interrupted, _) => S::Stopped,
            (A::Delete, _) | (A::Prune, S::Stopped | S::Error) => return Some(Next::Removed),
            _ => return None,
        };
        Some(Next::To(to))
    }
}

/// Something that happens to a VM: a lifecycle request (checked before any work starts) or an
/// outcome of the daemon's work on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmAction {
    /// The create operation made the VM's disks.
    Created,
    /// Request: boot the VM (`start`, the second half of `restart`).
    Start,
    /// The guest is up: VMM booted, agent configured, capabilities started.
    Started,
    /// The start failed; what it made is released.
    StartFailed,
    /// The start was cancelled; what it made is released.
    StartCancelled,
    /// Request: shut the VMM down (`stop`, the first half of `restart`, auto-stop).
    Stop,
    /// Request: signal the VMM (`kill`).
    Kill,
    /// The VMM is gone (stopped, killed, or exited cleanly) and every resource released.
    Released,
    /// The VMM exited on its own with a failure.
    Crashed,
    /// At wickd's start: the VM's VMM is dead or an operation on it was cut short by the
    /// restart; everything recorded was released.
    Interrupted,
    /// Request: release everything and remove the record (`delete`).
    Delete,
    /// Request: delete the VM only if nothing runs it (`prune`).
    Prune,
    /// Request: stop the guest's vCPUs, keeping the VMM and every resource (`pause`).
    Pause,
    /// Request: let a paused guest run again (`resume`).
    Resume,
    /// Request: save the guest's state to its suspend image and end the VMM (`suspend`); the
    /// same action marks the VM suspended once the image is complete.
    Suspend,
}

impl VmAction {
    /// Every action.
    pub const ALL: [VmAction; 15] = [
        VmAction::Created,
        VmAction::Start,
        VmAction::Started,
        VmAction::StartFailed,
        VmAction::StartCancelled,
        VmAction::Stop,
        VmAction::Kill,
        VmAction::Released,
        VmAction::Crashed,
        VmAction::Interrupted,
        VmAction::Delete,
        VmAction::Prune,
        VmAction::Pause,
        VmAction::Resume,
        VmAction::Suspend,
    ];

    /// What the action does to a VM, completing "cannot … now".
    pub fn describe(self) -> &'static str {
        match self {
            VmAction::Created => "mark it created",
            VmAction::Start => "start it",
            VmAction::Started => "mark it running",
            VmAction::StartFailed => "mark its start failed",
            VmAction::StartCancelled => "mark its start cancelled",
            VmAction::Stop => "stop it",
            VmAction::Kill => "kill it",
            VmAction::Released => "mark it released",
            VmAction::Crashed => "mark its VMM crashed",
            VmAction::Interrupted => "settle it after a restart",
            VmAction::Delete => "delete it",
            VmAction::Prune => "prune it",
            VmAction::Pause => "pause it",
            VmAction::Resume => "resume it",
            VmAction::Suspend => "suspend it",
        }
    }
}

/// Where an allowed action leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The VM's new state (possibly the one it is in).
    To(VmState),
    /// The record is removed.
    Removed,
}

impl fmt::Display for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Next::To(s) => s.fmt(f),
            Next::Removed => f.write_str("(removed)"),
        }
    }
}

/// An action the lifecycle table does not allow in the VM's state.
/// A paused VM's refusal names the way out (`wick vm resume`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM {vm} is {state}; cannot {} now{}", .action.describe(), resume_hint(.vm, *.state))]
pub struct TransitionError {
    /// The VM's name.
    pub vm: String,
    pub state: VmState,
    pub action: VmAction,
}

/// `; resume it first: wick vm resume NAME` for a paused VM, `; start it to resume it: wick vm
/// start NAME` for a suspended one, else nothing.
pub fn resume_hint(vm: &str, state: VmState) -> String {
    match state {
        VmState::Paused => format!("; resume it first: wick vm resume {vm}"),
        VmState::Suspended => format!("; start it to resume it: wick vm start {vm}"),
        _ => String::new(),
    }
}

impl VmRecord {
    /// Where `action` would lead this VM, or why it is not allowed now.
    pub fn check(&self, action: VmAction) -> Result<Next, TransitionError> {
        self.state.next(action).ok_or_else(|| TransitionError {
            vm: self.name.clone(),
            state: self.state,
            action,
        })
    }

    /// Moves the VM along the lifecycle table (a `Removed` outcome leaves the state to the
    /// caller, who removes the record).
    pub fn apply(&mut self, action: VmAction) -> Result<Next, TransitionError> {
        let next = self.check(action)?;
        if let Next::To(s) = next {
            self.state = s;
        }
        Ok(next)
    }
}

/// A lifecycle operation started on an existing VM (create has its own request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleOp {
    Start,
    Stop,
    Restart,
    Delete,
    Pause,
    Resume,
    Suspend,
}

impl LifecycleOp {
    /// The operation's kind as the API reports it.
    pub fn kind(self) -> OpKind {
        match self {
            LifecycleOp::Start => OpKind::Start,
            LifecycleOp::Stop => OpKind::Stop,
            LifecycleOp::Restart => OpKind::Restart,
            LifecycleOp::Delete => OpKind::Delete,
            LifecycleOp::Pause => OpKind::Pause,
            LifecycleOp::Resume => OpKind::Resume,
            LifecycleOp::Suspend => OpKind::Suspend,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (state, action) pair: the table as a reader checks it.
    const GOLDEN: &str = "\
creating: created -> stopped | start -> refused | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> refused | kill -> refused | released -> refused | crashed -> refused | interrupted -> error | delete -> (removed) | prune -> refused | pause -> refused | resume -> refused | suspend -> refused
stopped: created -> refused | start -> starting | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> stopped | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> (removed) | pause -> refused | resume -> refused | suspend -> refused
starting: created -> refused | start -> refused | started -> running | start_failed -> error | start_cancelled -> stopped | stop -> stopping | kill -> starting | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> refused | pause -> refused | resume -> refused | suspend -> refused
running: created -> refused | start -> running | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> running | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> refused | pause -> paused | resume -> running | suspend -> suspended
paused: created -> refused | start -> refused | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> paused | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> refused | pause -> paused | resume -> running | suspend -> suspended
suspended: created -> refused | start -> starting | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> suspended | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> refused | pause -> refused | resume -> refused | suspend -> suspended
stopping: created -> refused | start -> refused | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> stopping | released -> stopped | crashed -> error | interrupted -> stopped | delete -> (removed) | prune -> refused | pause -> refused | resume -> refused | suspend -> refused
error: created -> refused | start -> starting | started -> refused | start_failed -> refused | start_cancelled -> refused | stop -> stopping | kill -> error | released -> stopped | crashed -> error | interrupted -> error | delete -> (removed) | prune -> (removed) | pause -> refused | resume -> refused | suspend -> refused
";

    fn action_name(a: VmAction) -> String {
        let debug = format!("{a:?}");
        let mut out = String::new();
        for (i, c) in debug.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    #[test]
    fn every_pair_matches_the_golden_table() {
        let mut table = String::new();
        for s in VmState::ALL {
            let row: Vec<String> = VmAction::ALL
                .iter()
                .map(|&a| {
                    let to = s.next(a).map_or("refused".into(), |n| n.to_string());
                    format!("{} -> {to}", action_name(a))
                })
                .collect();
            table += &format!("{s}: {}\n", row.join(" | "));
        }
        assert_eq!(table, GOLDEN, "lifecycle table changed:\n{table}");
    }

    #[test]
    fn every_state_is_reachable_from_creating() {
        let mut seen = vec![VmState::Creating];
        let mut i = 0;
        while let Some(&s) = seen.get(i) {
            for a in VmAction::ALL {
                if let Some(Next::To(t)) = s.next(a) {
                    if !seen.contains(&t) {
                        seen.push(t);
                    }
                }
            }
            i += 1;
        }
        assert_eq!(seen.len(), VmState::ALL.len(), "{seen:?}");
    }

    #[test]
    fn a_vm_that_may_hold_a_vmm_is_never_removed_by_prune_and_start_waits_for_it() {
        for s in VmState::ALL.into_iter().filter(|s| s.may_have_vmm()) {
            assert_eq!(s.next(VmAction::Prune), None, "{s}");
            assert_ne!(s.next(VmAction::Start), Some(Next::To(VmState::Starting)));
        }
        // Whatever the state, delete is a way out.
        for s in VmState::ALL {
            assert_eq!(s.next(VmAction::Delete), Some(Next::Removed), "{s}");
        }
    }

    fn vm(state: VmState) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "a1", "owner": 0, "state": state,
            "spec": {"vcpu": 1, "memory_mib": 512, "disk_mib": 1024, "image": "i", "kernel": "/k",
                      "initrd": null, "boot_args": "", "vmm": "firecracker"},
            "runtime": {"dir": "/d", "root_disk": null, "guest_cid": 3, "vmm": null},
            "created_at": "t", "updated_at": "t", "touched_at": "t"
        }))
        .unwrap()
    }

    #[test]
    fn apply_moves_the_record_or_names_its_state_and_the_action() {
        let mut v = vm(VmState::Stopped);
        assert_eq!(v.apply(VmAction::Start), Ok(Next::To(VmState::Starting)));
        assert_eq!(v.state, VmState::Starting);
        let e = v.apply(VmAction::Start).unwrap_err();
        assert_eq!((e.state, e.action), (VmState::Starting, VmAction::Start));
        assert_eq!(e.to_string(), "VM a1 is starting; cannot start it now");
        assert_eq!(
            v.state,
            VmState::Starting,
            "a refused action leaves the state"
        );
        assert_eq!(v.apply(VmAction::Delete), Ok(Next::Removed));
        assert_eq!(v.state, VmState::Starting);
    }

    #[test]
    fn lifecycle_ops_report_their_kind() {
        assert_eq!(LifecycleOp::Start.kind(), OpKind::Start);
        assert_eq!(LifecycleOp::Stop.kind(), OpKind::Stop);
        assert_eq!(LifecycleOp::Restart.kind(), OpKind::Restart);
        assert_eq!(LifecycleOp::Delete.kind(), OpKind::Delete);
        assert_eq!(LifecycleOp::Pause.kind(), OpKind::Pause);
        assert_eq!(LifecycleOp::Resume.kind(), OpKind::Resume);
        assert_eq!(LifecycleOp::Suspend.kind(), OpKind::Suspend);
    }

    #[test]
    fn a_paused_vm_refuses_with_the_way_out() {
        let mut v = vm(VmState::Paused);
        let e = v.apply(VmAction::Start).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM a1 is paused; cannot start it now; resume it first: wick vm resume a1"
        );
        assert_eq!(v.apply(VmAction::Resume), Ok(Next::To(VmState::Running)));
        assert_eq!(v.apply(VmAction::Pause), Ok(Next::To(VmState::Paused)));
        let e = vm(VmState::Stopped).apply(VmAction::Pause).unwrap_err();
        assert_eq!(e.to_string(), "VM a1 is stopped; cannot pause it now");
    }

    #[test]
    fn a_suspended_vm_has_no_vmm_starts_from_its_image_and_stops_to_discard_it() {
        let s = VmState::Suspended;
        assert!(!s.may_have_vmm() && !s.guest_up());
        assert_eq!(s.next(VmAction::Start), Some(Next::To(VmState::Starting)));
        assert_eq!(s.next(VmAction::Stop), Some(Next::To(VmState::Stopping)));
        assert_eq!(s.next(VmAction::Released), Some(Next::To(VmState::Stopped)));
        assert_eq!(
            s.next(VmAction::Prune),
            None,
            "its state is kept on purpose"
        );
        for from in [VmState::Running, VmState::Paused, VmState::Suspended] {
            assert_eq!(from.next(VmAction::Suspend), Some(Next::To(s)), "{from}");
        }
        let e = vm(s).apply(VmAction::Resume).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM a1 is suspended; cannot resume it now; start it to resume it: wick vm start a1"
        );
        let e = vm(VmState::Stopped).apply(VmAction::Suspend).unwrap_err();
        assert_eq!(e.to_string(), "VM a1 is stopped; cannot suspend it now");
    }
}
