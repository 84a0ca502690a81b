//! The builder VM of a derived build: created through the normal create path (root's, NAT on,
//! named `build-<hex>`), files copied, packages installed, steps run with their output as
//! progress lines (escaped and bounded: it is guest output), powered off, its root disk made
//! into the image, and deleted in every outcome.

use std::sync::Arc;
use std::time::Duration;

use wick_agent_proto::{AgentClient, ExecEvent, ExecRequest, AGENT_PORT};
use wick_image::{DiskImage, ImageSource};
use wick_model::api::{ArtifactOp, CreateVmRequest, ErrorCode};
use wick_model::vm::LifecycleOp;
use wick_model::{VmRecord, VmState};

use super::build::{check, delete_builder, forget, new_build_id, record, BuildPlan, BuildRecord};
use super::image_view;
use crate::daemon::{Caller, Daemon};
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// Most output lines of one build shown as progress (the rest are counted, not kept).
const MAX_LINES: usize = 2000;
/// Longest output line shown (longer lines are cut).
const MAX_LINE: usize = 400;

/// Runs the build of `plan` under `op`; the builder VM and the build's record are gone when it
/// returns, whatever the outcome.
pub(super) async fn run(d: &Arc<Daemon>, op: &Arc<OpEntry>, plan: BuildPlan) -> Result<ArtifactOp> {
    let id = new_build_id();
    let rec = BuildRecord {
        id: id.clone(),
        name: plan.name.clone(),
        vm_name: format!("build-{id}"),
    };
    record(d, &rec)?; // before the VM exists: a crash from here on is swept at restart
    crate::failpoint::hit("build-recorded");
    let out = build(d, op, &plan, &rec.vm_name).await;
    op.stage("delete the builder VM");
    let cleanup = delete_builder(d, &rec.vm_name)
        .await
        .and_then(|()| forget(d, &id));
    let out = match (out, cleanup) {
        (Ok(out), Ok(())) => Ok(out),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
    };
    if op.cancel.is_cancelled() || out.is_err() {
        // Whatever the cancelled build still committed goes too (never another job's: the
        // name is reserved).
        let store = d.artifacts.images().clone();
        let name = plan.name.clone();
        let key = plan.key.clone();
        let _ = tokio::task::spawn_blocking(move || match store.get(&name) {
            Ok(r) if r.build_key.as_deref() == Some(key.as_str()) => {
                store.delete(&name).map(|_| ())
            }
            _ => Ok(()),
        })
        .await;
        if op.cancel.is_cancelled() {
            return Err(Error::cancelled());
        }
    }
    out
}

async fn build(
    d: &Arc<Daemon>,
    op: &Arc<OpEntry>,
    plan: &BuildPlan,
    vm_name: &str,
) -> Result<ArtifactOp> {
    let vm = create_builder(d, op, plan, vm_name).await?;
    crate::failpoint::hit("build-vm-running");
    let client = connect(&vm).await?;
    let mut out = Output::default();
    // Files first: they may configure apt (sources, proxies, keys) for the packages.
    for (i, c) in plan.copies.iter().enumerate() {
        check(op)?;
        op.stage("copy files");
        op.output(&format!("copy {}/{}: {}", i + 1, plan.copies.len(), c.dst));
        put_file(&client, &c.dst, c.mode, &c.contents).await?;
    }
    if !plan.packages.is_empty() {
        install_packages(op, &client, plan, &mut out).await?;
    }
    for (i, step) in plan.run.iter().enumerate() {
        check(op)?;
        let label = format!("run {}/{}", i + 1, plan.run.len());
        op.stage("run a step");
        op.output(&format!("{label}: {}", escape(step)));
        let argv = vec!["sh".to_string(), "-c".to_string(), step.clone()];
        let code = exec_streamed(op, &client, ExecRequest::new(argv), &label, &mut out).await?;
        if code != 0 {
            return Err(Error::precondition(format!(
                "build step {} (`{}`) failed with exit code {code}",
                i + 1,
                escape(step)
            )));
        }
    }
    drop(client);
    check(op)?;
    let vm = stop_builder(d, op, vm).await?;
    check(op)?;
    commit_disk(d, op, plan, &vm).await
}

/// Creates and starts the builder VM, showing its create stages.
async fn create_builder(
    d: &Arc<Daemon>,
    op: &Arc<OpEntry>,
    plan: &BuildPlan,
    vm_name: &str,
) -> Result<VmRecord> {
    op.stage("create the builder VM");
    op.output(&format!(
        "builder VM {vm_name} from image {}",
        plan.base.name
    ));
    let req = CreateVmRequest {
        name: Some(vm_name.to_string()),
        image: Some(plan.base.name.clone()),
        nat: true,
        ..Default::default()
    };
    let cop = d.create(req, Caller { uid: 0 })?;
    follow(op, &cop, "builder VM").await;
    let done = cop.wait().await;
    if let Some(e) = done.error {
        return Err(Error::new(
            e.code,
            format!("the builder VM did not start: {}", e.message),
        ));
    }
    check(op)?;
    let vm = d.store.find_vm(vm_name, Some(0))?;
    if !vm.spec.agent {
        return Err(Error::precondition(format!(
            "image {} has no wick-agent, so a build cannot run steps in it",
            plan.base.name
        )));
    }
    Ok(vm)
}

/// Mirrors `cop`'s stages into `op` (prefixed) until `cop` ends; a cancel of `op` cancels it.
async fn follow(op: &OpEntry, cop: &OpEntry, prefix: &str) {
    let mut rx = cop.subscribe();
    let mut seen = 0;
    loop {
        let (evs, ended) = cop.events_since(seen);
        seen += evs.len();
        for e in evs.iter().filter(|e| !e.state.is_terminal()) {
            if let Some(s) = &e.stage {
                op.stage(&format!("{prefix}: {s}"));
            }
        }
        if ended {
            return;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = op.cancel.cancelled() => cop.cancel.cancel(),
        }
    }
}

async fn connect(vm: &VmRecord) -> Result<AgentClient> {
    let h = vm
        .runtime
        .vmm
        .as_ref()
        .ok_or_else(|| Error::precondition("the builder VM is not running"))?;
    AgentClient::connect(&h.vsock_socket, AGENT_PORT, Duration::from_secs(30))
        .await
        .map_err(|e| Error::precondition(format!("cannot reach the builder VM's agent: {e}")))
}

async fn install_packages(
    op: &Arc<OpEntry>,
    client: &AgentClient,
    plan: &BuildPlan,
    out: &mut Output,
) -> Result<()> {
    check(op)?;
    op.stage("packages: look for apt-get");
    let probe = ExecRequest::new(["sh", "-c", "command -v apt-get"]);
    if exec_streamed(op, client, probe, "packages", &mut Output::quiet()).await? != 0 {
        return Err(Error::precondition(format!(
            "image {} has no apt-get, so --packages cannot install {}; use a Debian-based \
             image or install them with --run",
            plan.base.name,
            plan.packages.join(", ")
        )));
    }
    op.stage("packages: install");
    op.output(&format!(
        "packages: apt-get install {}",
        plan.packages.join(" ")
    ));
    let script = "apt-get update -q && apt-get install -y -q --no-install-recommends -- \"$@\"";
    let mut argv = vec!["sh".into(), "-c".into(), script.into(), "sh".into()];
    argv.extend(plan.packages.iter().cloned());
    let mut req = ExecRequest::new(argv);
    req.env = vec![("DEBIAN_FRONTEND".into(), "noninteractive".into())];
    let code = exec_streamed(op, client, req, "packages", out).await?;
    if code != 0 {
        return Err(Error::precondition(format!(
            "installing packages ({}) failed with exit code {code}",
            plan.packages.join(", ")
        )));
    }
    Ok(())
}

/// Writes `contents` to the guest file `dst` with `mode` (parents created).
async fn put_file(client: &AgentClient, dst: &str, mode: u32, contents: &[u8]) -> Result<()> {
    let script = "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\" && chmod \"$2\" \"$1\"";
    let mut req = ExecRequest::new(["sh", "-c", script, "sh", dst, &format!("{mode:o}")]);
    req.stdin = true;
    let fail = |e: wick_agent_proto::AgentError| {
        Error::precondition(format!("copying {dst} into the builder VM failed: {e}"))
    };
    let mut s = client.exec(req).await.map_err(fail)?;
    if let Some(mut stdin) = s.take_stdin() {
        stdin.write(contents).await.map_err(fail)?;
        stdin.close().await.map_err(fail)?;
    }
    let done = s.output_limited(64 * 1024).await.map_err(fail)?;
    if done.status.shell_code() != 0 {
        return Err(Error::precondition(format!(
            "copying {dst} into the builder VM failed (exit code {}): {}",
            done.status.shell_code(),
            escape(&String::from_utf8_lossy(&done.stderr))
        )));
    }
    Ok(())
}

/// Output lines shown so far, and whether to show them at all.
#[derive(Default)]
struct Output {
    lines: usize,
    quiet: bool,
}

impl Output {
    fn quiet() -> Output {
        Output {
            lines: 0,
            quiet: true,
        }
    }

    fn show(&mut self, op: &OpEntry, label: &str, line: &[u8]) {
        if self.quiet {
            return;
        }
        self.lines += 1;
        if self.lines <= MAX_LINES {
            let text = String::from_utf8_lossy(line);
            let cut: String = text.chars().take(MAX_LINE).collect();
            op.output(&format!("{label}: {}", escape(&cut)));
        } else if self.lines == MAX_LINES + 1 {
            op.output(&format!("{label}: (more output not shown)"));
        }
    }
}

/// Runs `req`, showing each output line as a stage; returns the shell exit code. A cancel of
/// `op` ends the wait (the VM is deleted after).
async fn exec_streamed(
    op: &OpEntry,
    client: &AgentClient,
    req: ExecRequest,
    label: &str,
    out: &mut Output,
) -> Result<i32> {
    let fail = |e: wick_agent_proto::AgentError| {
        Error::precondition(format!("running a build step failed: {e}"))
    };
    let mut s = client.exec(req).await.map_err(fail)?;
    let (mut o, mut e) = (Vec::new(), Vec::new());
    loop {
        let ev = tokio::select! {
            ev = s.next_event() => ev.map_err(fail)?,
            _ = op.cancel.cancelled() => return Err(Error::cancelled()),
        };
        match ev {
            Some(ExecEvent::Stdout(b)) => lines(&mut o, &b, |l| out.show(op, label, l)),
            Some(ExecEvent::Stderr(b)) => lines(&mut e, &b, |l| out.show(op, label, l)),
            Some(ExecEvent::Exit(st)) => {
                for rest in [o, e] {
                    if !rest.is_empty() {
                        out.show(op, label, &rest);
                    }
                }
                return Ok(st.shell_code());
            }
            None => {
                return Err(Error::precondition(
                    "the builder VM's agent closed the step without an exit status",
                ))
            }
        }
    }
}

/// Appends `data` to `buf` and calls `each` for every complete line (a buffer that grows past
/// a line's limit is shown as is).
fn lines(buf: &mut Vec<u8>, data: &[u8], mut each: impl FnMut(&[u8])) {
    buf.extend_from_slice(data);
    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        each(&line[..line.len() - 1]);
    }
    if buf.len() > 4 * MAX_LINE {
        each(buf);
        buf.clear();
    }
}

/// Guest text made safe for a terminal: control characters become escapes.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            c if c.is_control() => c.escape_default().collect::<Vec<_>>(),
            c => vec![c],
        })
        .collect()
}

/// Powers the builder VM off (the guest syncs first) and checks it stopped.
async fn stop_builder(d: &Arc<Daemon>, op: &OpEntry, vm: VmRecord) -> Result<VmRecord> {
    op.stage("power off the builder VM");
    let sop = d.begin(LifecycleOp::Stop, vm.clone())?;
    let done = sop.wait().await;
    if let Some(e) = done.error {
        return Err(Error::new(
            e.code,
            format!("stopping the builder VM failed: {}", e.message),
        ));
    }
    let vm = d.store.get_vm(&vm.id)?;
    if vm.state != VmState::Stopped {
        return Err(Error::new(
            ErrorCode::Internal,
            format!("the builder VM ended {} instead of stopped", vm.state),
        ));
    }
    Ok(vm)
}

/// The stopped builder's root disk becomes image `plan.name`.
async fn commit_disk(
    d: &Arc<Daemon>,
    op: &Arc<OpEntry>,
    plan: &BuildPlan,
    vm: &VmRecord,
) -> Result<ArtifactOp> {
    let disk = vm
        .runtime
        .root_disk
        .clone()
        .ok_or_else(|| Error::internal("the builder VM has no root disk recorded"))?;
    let what = DiskImage {
        source: ImageSource::Derived {
            base: plan.base.name.clone(),
            base_id: plan.base.id.clone(),
            packages: plan.packages.clone(),
            run: plan.run.clone(),
            copied: plan.copies.iter().map(|c| c.dst.clone()).collect(),
        },
        build_key: Some(plan.key.clone()),
        default_kernel: plan.base.default_kernel.clone(),
        agent_injected: plan.base.agent_injected,
        replace: plan.force,
    };
    let (store, name, op2) = (d.artifacts.images().clone(), plan.name.clone(), op.clone());
    let img = tokio::task::spawn_blocking(move || {
        let mut progress = |s: &str| op2.stage(s);
        store.import_disk(&disk, &name, what, &mut progress)
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))??;
    crate::failpoint::hit("build-committed");
    op.output(&format!("image {} made: {} bytes", img.name, img.size));
    let mut out = ArtifactOp::named(plan.name.clone());
    out.image = Some(image_view(img, &[]));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_split_into_lines_and_escaped() {
        let mut buf = Vec::new();
        let mut got = Vec::new();
        lines(&mut buf, b"a\nb", |l| got.push(l.to_vec()));
        lines(&mut buf, b"c\n\x1b[2J\n", |l| got.push(l.to_vec()));
        assert_eq!(
            got,
            vec![b"a".to_vec(), b"bc".to_vec(), b"\x1b[2J".to_vec()]
        );
        assert_eq!(escape("\x1b[2Jx\r"), "\\u{1b}[2Jx\\r");
        let mut long = Vec::new();
        let mut n = 0;
        lines(&mut long, &vec![b'x'; 5 * MAX_LINE], |_| n += 1);
        assert_eq!((n, long.len()), (1, 0));
    }
}
