//! Resume by use: a command that needs a suspended VM's guest (`vm exec`, `vm ssh` and
//! `ssh NAME.vm`, `vm cp`, `vm workspace`, the MCP tools) starts it first, saying so on stderr
//! — the one implementation, called before a session and by the agent connector when wickd
//! refuses a suspended VM. The start is the ordinary start operation: it loads the suspend
//! image and the guest continues.

use anyhow::Result;
use wick_model::api::{ApiError, ErrorCode};
use wick_model::vm::LifecycleOp;
use wick_model::{VmRecord, VmState};

use crate::client::{vm_path, Client};
use crate::progress::{Interrupt, View};

/// `vm` itself unless it is suspended; then it is started (quietly, after one stderr line) and
/// its record after the start is returned.
pub(crate) async fn resume_if_suspended(client: &Client, vm: VmRecord) -> Result<VmRecord> {
    if vm.state != VmState::Suspended {
        return Ok(vm);
    }
    eprintln!("resuming suspended VM {}", vm.name);
    let interrupt = Interrupt::install();
    let op = super::vm::run_op(client, LifecycleOp::Start, &vm.id, View::Quiet, &interrupt).await;
    interrupt.disarm();
    let op = op?;
    Ok(match op.vm {
        Some(vm) => vm,
        None => client.get(&vm_path(&vm.id, "")).await?,
    })
}

/// After wickd refused an agent connection with `err`: if it was because VM `vm` is not
/// running and the VM is suspended, starts it. Whether a retry may now succeed (the VM runs).
pub(crate) async fn after_refusal(client: &Client, vm: &str, err: &anyhow::Error) -> bool {
    let not_running = err
        .chain()
        .find_map(|c| c.downcast_ref::<ApiError>())
        .is_some_and(|e| e.code == ErrorCode::NotRunning);
    if !not_running {
        return false;
    }
    let Ok(record) = client.get::<VmRecord>(&vm_path(vm, "")).await else {
        return false;
    };
    match resume_if_suspended(client, record).await {
        Ok(vm) => vm.state == VmState::Running,
        Err(e) => {
            eprintln!("{}", crate::render::error_line(&e));
            false
        }
    }
}
