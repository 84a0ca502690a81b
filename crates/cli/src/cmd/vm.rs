//! `wick vm ...`.

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::{bail, Result};
use futures::future::join_all;
use serde::Serialize;
use wick_model::api::{
    ApiError, ConfigView, CreateVmRequest, KillRequest, OpState, Operation, PruneResult, VmList,
};
use wick_model::size::format_mib;
use wick_model::vm::LifecycleOp;
use wick_model::VmRecord;

use super::{out, out_json, outln, Ctx};
use crate::cli::{
    CreateArgs, KillArgs, LifecycleArgs, LogsArgs, PruneArgs, SetArgs, VmCommand, VmSpecArgs,
};
use crate::client::{vm_path, Client};
use crate::progress::{follow, outcome, Interrupt, View};
use crate::render;
use crate::Exit;

pub async fn run(ctx: &Ctx, cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Create(a) => create(ctx, a).await,
        VmCommand::Run(a) => super::run::run(ctx, *a).await,
        VmCommand::Workspace(c) => super::workspace::run(ctx, c).await,
        VmCommand::Start(a) => lifecycle(ctx, LifecycleOp::Start, a).await,
        VmCommand::Stop(a) => lifecycle(ctx, LifecycleOp::Stop, a).await,
        VmCommand::Restart(a) => lifecycle(ctx, LifecycleOp::Restart, a).await,
        VmCommand::Pause(a) => lifecycle(ctx, LifecycleOp::Pause, a).await,
        VmCommand::Snapshot(a) => super::snapshot::snapshot_vm(ctx, a).await,
        VmCommand::Fork(a) => super::snapshot::fork_vm(ctx, a).await,
        VmCommand::Resume(a) => lifecycle(ctx, LifecycleOp::Resume, a).await,
        VmCommand::Suspend(a) => lifecycle(ctx, LifecycleOp::Suspend, a).await,
        VmCommand::Delete(a) => lifecycle(ctx, LifecycleOp::Delete, a).await,
        VmCommand::Kill(a) => kill(ctx, a).await,
        VmCommand::Commit(a) => super::image::commit(ctx, a).await,
        VmCommand::List(a) => list(ctx, a.json, a.all).await,
        VmCommand::Show(a) => {
            let vm: VmRecord = ctx.client().get(&vm_path(&a.vm, "")).await?;
            if let Some(w) = &vm.runtime.isolation_warning {
                eprintln!("warning: {w}");
            }
            out_json(&vm)
        }
        VmCommand::Logs(a) => logs(ctx, a).await,
        VmCommand::Prune(a) => prune(ctx, a).await,
        VmCommand::Set(a) => set(ctx, a).await,
        VmCommand::PortForward(a) => {
            set(
                ctx,
                SetArgs {
                    vm: a.vm,
                    vcpu: None,
                    memory: None,
                    nat: None,
                    allow_host: Vec::new(),
                    deny_host: Vec::new(),
                    publish: a.mappings,
                    unpublish: a.remove,
                    json: a.json,
                },
            )
            .await
        }
        VmCommand::Exec(a) => super::exec::run(ctx, a).await,
        VmCommand::Ssh(a) => super::ssh::run(ctx, a).await,
        VmCommand::SshProxy(a) => super::ssh::proxy(ctx, a).await,
        VmCommand::Cp(a) => super::cp::run(ctx, a).await,
        VmCommand::Ports(a) => super::guest::ports(ctx, a).await,
        VmCommand::Health(a) => super::guest::health(ctx, a).await,
        VmCommand::Stats(a) => super::guest::stats(ctx, a).await,
    }
}

async fn create(ctx: &Ctx, mut args: CreateArgs) -> Result<()> {
    if let Some(snap) = args.from_snapshot.take() {
        return super::snapshot::create_from_snapshot(ctx, &args.vm, snap, args.json).await;
    }
    create_request(ctx, &args.vm, args.no_start)?;
    let client = ctx.client();
    if let Some(dir) = &args.from_dir {
        if !dir.is_dir() {
            anyhow::bail!("--from-dir {}: not a directory", dir.display());
        }
        if super::project::apply(&client, dir, false, true, &mut args.vm)
            .await?
            .is_none()
        {
            anyhow::bail!(
                "--from-dir {}: no wick.toml or devcontainer.json there",
                dir.display()
            );
        }
    }
    let req = create_request(ctx, &args.vm, args.no_start)?;
    let spec = spec_line(&client, &req).await?;
    if args.json {
        eprintln!("{spec}");
    } else {
        outln(&spec)?;
    }
    let interrupt = Interrupt::install();
    let vm = outcome_vm(&client, create_vm(&client, &req, &interrupt).await?).await?;
    if args.json {
        out_json(&vm)
    } else {
        outln(&render::vm_summary(&vm))
    }
}

/// The `POST /v1/vms` body for `args`: checked, plus who the guest should let in and commit
/// as (the caller's wick key and git identity).
pub(super) fn create_request(
    ctx: &Ctx,
    args: &VmSpecArgs,
    no_start: bool,
) -> Result<CreateVmRequest> {
    let mut req = args.to_request(no_start)?;
    req.ssh_keys
        .extend(super::ssh_config::public_key(&ctx.paths));
    (req.git_name, req.git_email) = super::ssh_config::git_identity();
    Ok(req)
}

/// The `spec:` line: what the user gave, the daemon's resolved defaults for the rest.
pub(super) async fn spec_line(client: &Client, req: &CreateVmRequest) -> Result<String> {
    let memory = req
        .memory
        .as_deref()
        .map(|m| crate::validate::size("--memory", m))
        .transpose()?;
    let disk = req
        .disk_size
        .as_deref()
        .map(|d| crate::validate::size("--disk-size", d))
        .transpose()?;
    let vcpu = req.vcpu.map(|v| v as u64);
    let (vcpu, memory, disk) = match (vcpu, memory, disk) {
        (Some(v), Some(m), Some(d)) => (v, m, d),
        _ => {
            let cfg: ConfigView = client.get("/v1/config").await?;
            let d = cfg.vm_defaults;
            (
                vcpu.unwrap_or(d.vcpu.value),
                memory.unwrap_or(d.memory_mib.value),
                disk.unwrap_or(d.disk_mib.value),
            )
        }
    };
    Ok(render::spec_line(vcpu, memory, disk))
}

/// Creates a VM and follows the operation with live progress. `Ok(Ok(op))`: it succeeded;
/// `Ok(Err(op))`: it failed or was cancelled (the terminal operation, for its error and the
/// stage it failed in). Ctrl-C cancels the operation and ends the command with status 130.
pub(super) async fn create_vm(
    client: &Client,
    req: &CreateVmRequest,
    interrupt: &Interrupt,
) -> Result<Result<Operation, Operation>> {
    let op: Operation = client.post("/v1/vms", req).await?;
    let op = follow(client, op, View::auto(), interrupt).await?;
    if interrupt.fired() {
        match outcome(op) {
            Ok(op) => eprintln!("interrupted, but {} had already finished", op.vm_name),
            Err(e) => eprintln!("error: {}", render::api_error(&e)),
        }
        return Err(Exit(130).into());
    }
    Ok(match op.state {
        OpState::Succeeded => Ok(op),
        _ => Err(op),
    })
}

/// The VM a finished create made, or the operation's error.
pub(crate) async fn outcome_vm(
    client: &Client,
    result: Result<Operation, Operation>,
) -> Result<VmRecord> {
    let op = result.or_else(outcome)?;
    Ok(match op.vm {
        Some(vm) => vm,
        None => client.get(&vm_path(&op.vm_id, "")).await?,
    })
}

/// Deletes VM `vm` (quietly; the result is one line on stderr) and forgets its host keys.
pub(super) async fn delete_vm(ctx: &Ctx, vm: &str) -> Result<()> {
    let client = ctx.client();
    let op: Operation = client.delete(&vm_path(vm, "")).await?;
    let op = follow(&client, op, View::Quiet, &Interrupt::install()).await?;
    let op = outcome(op)?;
    super::ssh::forget_host(&ctx.paths, &op.vm_name);
    Ok(())
}

fn op_request(kind: LifecycleOp, vm: &str) -> (hyper::Method, String) {
    match kind {
        LifecycleOp::Delete => (hyper::Method::DELETE, vm_path(vm, "")),
        LifecycleOp::Start => (hyper::Method::POST, vm_path(vm, "/start")),
        LifecycleOp::Stop => (hyper::Method::POST, vm_path(vm, "/stop")),
        LifecycleOp::Restart => (hyper::Method::POST, vm_path(vm, "/restart")),
        LifecycleOp::Pause => (hyper::Method::POST, vm_path(vm, "/pause")),
        LifecycleOp::Resume => (hyper::Method::POST, vm_path(vm, "/resume")),
        LifecycleOp::Suspend => (hyper::Method::POST, vm_path(vm, "/suspend")),
    }
}

/// One VM of `vm start|stop|restart|delete|pause|resume|suspend`: start the operation and follow it.
pub(super) async fn run_op(
    client: &Client,
    kind: LifecycleOp,
    vm: &str,
    view: View,
    interrupt: &Interrupt,
) -> Result<Operation> {
    let (method, path) = op_request(kind, vm);
    let op: Operation = if method == hyper::Method::DELETE {
        client.delete(&path).await?
    } else {
        client.post_empty(&path).await?
    };
    let op = follow(client, op, view, interrupt).await?;
    Ok(outcome(op)?)
}

/// The line reported for one VM of a multi-VM command.
fn result_line(vm: &str, kind: LifecycleOp, result: &Result<Operation>) -> String {
    match result {
        Ok(op) => {
            let state = match (&op.vm, kind) {
                (_, LifecycleOp::Delete) => "deleted".to_string(),
                (Some(vm), _) => vm.state.to_string(),
                (None, _) => "done".to_string(),
            };
            format!("{vm}: {state}")
        }
        Err(e) => error_line(vm, e),
    }
}

fn error_line(vm: &str, e: &anyhow::Error) -> String {
    let line = render::error_line(e);
    format!("{vm}: {line}")
}

/// A result as the JSON it came as: the API body, or the error body.
#[derive(Serialize)]
#[serde(untagged)]
enum JsonResult<T> {
    Ok(T),
    Err(ApiError),
}

fn json_result<T: Clone>(r: &Result<T>) -> JsonResult<T> {
    match r {
        Ok(v) => JsonResult::Ok(v.clone()),
        Err(e) => JsonResult::Err(
            e.chain()
                .find_map(|c| c.downcast_ref::<ApiError>())
                .cloned()
                .unwrap_or_else(|| {
                    ApiError::new(wick_model::api::ErrorCode::Internal, format!("{e:#}"))
                }),
        ),
    }
}

/// Prints results in the order given; exits 1 if any failed.
fn report<T: Clone + Serialize>(
    vms: &[String],
    results: Vec<Result<T>>,
    json: bool,
    line: impl Fn(&str, &Result<T>) -> String,
) -> Result<()> {
    let failed = results.iter().any(|r| r.is_err());
    if json {
        let bodies: Vec<JsonResult<T>> = results.iter().map(json_result).collect();
        if bodies.len() == 1 {
            out_json(&bodies[0])?;
        } else {
            out_json(&bodies)?;
        }
    } else {
        for (vm, r) in vms.iter().zip(&results) {
            let text = line(vm, r);
            if r.is_ok() {
                outln(&text)?;
            } else {
                eprintln!("{text}");
            }
        }
    }
    if failed {
        return Err(Exit(1).into());
    }
    Ok(())
}

async fn lifecycle(ctx: &Ctx, kind: LifecycleOp, args: LifecycleArgs) -> Result<()> {
    let client = ctx.client();
    let interrupt = Interrupt::install();
    let vms = args.vms;
    if let [vm] = vms.as_slice() {
        // One VM: live progress, and a failure is the command's error.
        let result = run_op(&client, kind, vm, View::auto(), &interrupt).await;
        if interrupt.fired() {
            eprintln!("{}", result_line(vm, kind, &result));
            return Err(Exit(130).into());
        }
        let op = result?;
        if kind == LifecycleOp::Delete {
            super::ssh::forget_host(&ctx.paths, &op.vm_name);
        }
        return if args.json {
            out_json(&op)
        } else {
            outln(&result_line(vm, kind, &Ok(op)))
        };
    }
    let results: Vec<Result<Operation>> = join_all(
        vms.iter()
            .map(|vm| run_op(&client, kind, vm, View::Quiet, &interrupt)),
    )
    .await;
    if kind == LifecycleOp::Delete {
        for op in results.iter().flatten() {
            super::ssh::forget_host(&ctx.paths, &op.vm_name);
        }
    }
    let reported = report(&vms, results, args.json, |vm, r| result_line(vm, kind, r));
    if interrupt.fired() {
        return Err(Exit(130).into());
    }
    reported
}

async fn kill(ctx: &Ctx, args: KillArgs) -> Result<()> {
    if args.signal.trim().is_empty() {
        bail!("--signal is empty; give a name like KILL or TERM, or a number");
    }
    let client = ctx.client();
    let req = KillRequest {
        signal: Some(args.signal.clone()),
    };
    let results: Vec<Result<VmRecord>> = join_all(args.vms.iter().map(|vm| {
        let (client, req) = (&client, &req);
        async move { client.post::<_, VmRecord>(&vm_path(vm, "/kill"), req).await }
    }))
    .await;
    if let ([_], [Err(_)]) = (args.vms.as_slice(), results.as_slice()) {
        return Err(results
            .into_iter()
            .next()
            .and_then(Result::err)
            .expect("one error"));
    }
    report(&args.vms, results, args.json, |vm, r| match r {
        Ok(rec) => format!("{vm}: {}", rec.state),
        Err(e) => error_line(vm, e),
    })
}

async fn list(ctx: &Ctx, json: bool, all: bool) -> Result<()> {
    let path = if all { "/v1/vms?all=true" } else { "/v1/vms" };
    let list: VmList = ctx.client().get(path).await?;
    if json {
        return out_json(&list);
    }
    if list.vms.is_empty() {
        eprintln!("no VMs");
        return Ok(());
    }
    out(&render::vm_table(&list.vms, render::now_unix()))
}

async fn logs(ctx: &Ctx, args: LogsArgs) -> Result<()> {
    let mut path = vm_path(&args.vm, "/logs");
    if let Some(n) = args.tail {
        path.push_str(&format!("?tail={n}"));
    }
    let text = ctx.client().get_text(&path).await?;
    out(&String::from_utf8_lossy(&text))
}

async fn prune(ctx: &Ctx, args: PruneArgs) -> Result<()> {
    let client = ctx.client();
    if !args.force {
        if !io::stdin().is_terminal() {
            bail!(
                "refusing to prune without confirmation: stdin is not a terminal; pass -f/--force"
            );
        }
        let list: VmList = client.get("/v1/vms").await?;
        let doomed: Vec<&VmRecord> = list
            .vms
            .iter()
            .filter(|vm| vm.check(wick_model::vm::VmAction::Prune).is_ok())
            .collect();
        if doomed.is_empty() {
            eprintln!("nothing to prune: every VM is running");
            return Ok(());
        }
        eprintln!("these VMs will be deleted:");
        for vm in &doomed {
            eprintln!("  {}  {}  {}", vm.name, vm.short_id(), vm.state);
        }
        if !confirm(&format!("delete {} VM(s)? [y/N] ", doomed.len()))? {
            eprintln!("aborted");
            return Ok(());
        }
    }
    let res: PruneResult = client.post_empty("/v1/vms/prune").await?;
    for name in &res.deleted {
        super::ssh::forget_host(&ctx.paths, name);
    }
    if args.json {
        out_json(&res)?;
    } else {
        if res.deleted.is_empty() && res.failed.is_empty() {
            eprintln!("nothing to prune");
        }
        for name in &res.deleted {
            outln(&format!("deleted {name}"))?;
        }
        for e in &res.failed {
            eprintln!("error: {}", render::api_error(e));
        }
    }
    if !res.failed.is_empty() {
        return Err(Exit(1).into());
    }
    Ok(())
}

/// Asks on stderr and reads one line from stdin; only `y`/`yes` confirms.
fn confirm(prompt: &str) -> Result<bool> {
    eprint!("{prompt}");
    io::stderr().flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

async fn set(ctx: &Ctx, args: SetArgs) -> Result<()> {
    let req = args.to_request()?;
    let vm: VmRecord = ctx.client().patch(&vm_path(&args.vm, ""), &req).await?;
    if args.json {
        return out_json(&vm);
    }
    let mut line = format!(
        "{}: {} vcpu · {} memory · nat {}",
        vm.name,
        vm.spec.vcpu,
        format_mib(vm.spec.memory_mib),
        if vm.spec.nat { "on" } else { "off" }
    );
    if !vm.spec.allow_hosts.is_empty() {
        line.push_str(&format!(" · allow {}", vm.spec.allow_hosts.join(", ")));
    }
    if !vm.spec.publish.is_empty() {
        let ports: Vec<String> = vm.spec.publish.iter().map(|m| m.to_string()).collect();
        line.push_str(&format!(" · publish {}", ports.join(", ")));
    }
    if (req.vcpu.is_some() || req.memory.is_some()) && vm.state.may_have_vmm() {
        line.push_str(" (vcpu and memory apply at the next start)");
    }
    outln(&line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::vm;
    use wick_model::api::ErrorCode;
    use wick_model::api::OpKind;
    use wick_model::VmState;

    fn op(kind: OpKind, vm_rec: Option<VmRecord>) -> Operation {
        Operation {
            id: "op1".into(),
            kind,
            vm_id: "abc".into(),
            vm_name: "a1".into(),
            state: OpState::Succeeded,
            stage: None,
            error: None,
            vm: vm_rec,
            started_at: String::new(),
            finished_at: None,
            artifact: None,
        }
    }

    #[test]
    fn result_lines() {
        let running = vm("a1", "abc", VmState::Running, None);
        assert_eq!(
            result_line(
                "a1",
                LifecycleOp::Start,
                &Ok(op(OpKind::Start, Some(running)))
            ),
            "a1: running"
        );
        assert_eq!(
            result_line("a1", LifecycleOp::Delete, &Ok(op(OpKind::Delete, None))),
            "a1: deleted"
        );
        let mut e = ApiError::new(ErrorCode::NotFound, "no VM matches \"zz\"");
        let err = anyhow::Error::new(e.clone());
        assert_eq!(
            result_line("zz", LifecycleOp::Stop, &Err(err)),
            "zz: error: no VM matches \"zz\""
        );
        e.op_id = Some("op2".into());
        let err = anyhow::Error::new(e);
        assert_eq!(
            result_line("zz", LifecycleOp::Stop, &Err(err)),
            "zz: error: no VM matches \"zz\" (operation op2)"
        );
    }

    #[test]
    fn json_results_are_api_bodies() {
        let ok: Result<u32> = Ok(7);
        assert_eq!(
            serde_json::to_value(json_result(&ok)).unwrap(),
            serde_json::json!(7)
        );
        let err: Result<u32> = Err(ApiError::new(ErrorCode::Conflict, "busy").into());
        assert_eq!(
            serde_json::to_value(json_result(&err)).unwrap(),
            serde_json::json!({"code": "conflict", "message": "busy"})
        );
    }

    #[test]
    fn op_routes() {
        assert_eq!(
            op_request(LifecycleOp::Start, "a1"),
            (hyper::Method::POST, "/v1/vms/a1/start".into())
        );
        assert_eq!(
            op_request(LifecycleOp::Delete, "a b"),
            (hyper::Method::DELETE, "/v1/vms/a%20b".into())
        );
    }
}
