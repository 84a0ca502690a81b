//! `PATCH /vm`: pause and resume. The fake guest's agent (if any) is frozen with SIGSTOP while
//! paused and thawed with SIGCONT, so a paused fake guest answers nothing, like a real one.

use bytes::Bytes;
use serde::Deserialize;

use super::{parse, Reply};
use crate::vm::{Phase, Vm};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStatePatch {
    state: VmStateWanted,
}

#[derive(Debug, Deserialize)]
enum VmStateWanted {
    Paused,
    Resumed,
}

pub fn patch_vm(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let patch: VmStatePatch = parse(body)?;
    vm.post_boot()?;
    vm.phase = match patch.state {
        VmStateWanted::Paused => Phase::Paused,
        VmStateWanted::Resumed => Phase::Running,
    };
    vm.freeze_agent(vm.phase == Phase::Paused);
    vm.log(&format!("vm state: {} (fake)", vm.phase.as_str()));
    Ok(Reply::NoContent)
}
