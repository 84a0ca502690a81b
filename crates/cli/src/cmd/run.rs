//! `wick vm run [PATH] [-- CMD...]`: the main job in one command. Create and boot a VM (the
//! `spec:` line, then `vm create`'s live progress), copy the repository at PATH into
//! `/root/repo` (as `vm workspace prepare`), then run CMD there through the agent (its exit code
//! becomes wick's) or, without CMD, open an interactive ssh session.
//!
//! Everything that can be checked on the host is checked before the VM is created: flag
//! combinations, sizes and names, and the repository itself. With `--rm` the VM is deleted when
//! the command or session ends, whatever its outcome — but not when the guest never came up
//! (booting, waiting for its agent, configuring it): that VM is kept for its logs.

use anyhow::{bail, Result};
use wick_model::api::Operation;
use wick_model::{VmRecord, VmState};
use wick_workspace::RepoPlan;

use super::{project, vm, workspace, Ctx};
use crate::cli::RunArgs;
use crate::client::vm_path;
use crate::progress::{outcome, Interrupt};
use crate::project::Project;
use crate::{agent, render, Exit};

/// Create stages in which a failure means the guest did not come up: its VM is kept, even with
/// `--rm`, so its log can be read.
const GUEST_STAGES: [&str; 3] = ["boot", "wait for agent", "configure guest"];

/// Where a command runs without a repository.
const HOME: &str = "/root";

pub async fn run(ctx: &Ctx, mut a: RunArgs) -> Result<()> {
    // 1. Everything checkable on the host, before the VM exists.
    check_flags(&a)?;
    let opts = a.workspace.to_options()?;
    let guest_path = a
        .guest_path
        .clone()
        .unwrap_or_else(|| wick_workspace::DEFAULT_GUEST_PATH.to_string());
    workspace::check_guest_path(&guest_path)?;
    vm::create_request(ctx, &a.vm, false)?;
    let plan = match &a.path {
        Some(p) => Some(workspace::inspect(p, opts).await?),
        None => None,
    };
    let client = ctx.client();
    let project = match &plan {
        Some(plan) => {
            project::apply(&client, plan.root(), a.no_project, !a.dry_run, &mut a.vm).await?
        }
        None => None,
    };
    let req = vm::create_request(ctx, &a.vm, false)?;
    let job = Job::new(plan, guest_path, a.command, project);

    // 2. The spec, then (for real) the VM.
    eprintln!("{}", vm::spec_line(&client, &req).await?);
    if a.dry_run {
        let name = req.name.as_deref().unwrap_or("<new VM>");
        return match &job.plan {
            Some(plan) => workspace::print_dry_run(plan, name, &job.guest_path),
            None => {
                eprintln!("dry run: would create {name}; no repository to copy");
                Ok(())
            }
        };
    }
    let interrupt = Interrupt::install();
    let vm = match vm::create_vm(&client, &req, &interrupt).await? {
        Ok(op) => vm::outcome_vm(&client, Ok(op)).await?,
        Err(op) => return Err(create_failed(ctx, op, a.rm).await),
    };
    // From here on the command (or ssh) handles signals; Ctrl-C must not skip `--rm`.
    interrupt.disarm();

    // 3. The work, then the clean-up.
    let result = job.work(ctx, &vm).await;
    if a.rm {
        match vm::delete_vm(ctx, &vm.id).await {
            Ok(()) => eprintln!("deleted VM {}", vm.name),
            Err(e) => eprintln!(
                "{}",
                render::escape(&format!(
                    "warning: could not delete VM {}: {e:#}; delete it with `wick vm delete {}`",
                    vm.name, vm.name
                ))
            ),
        }
    } else if job.command.is_empty() {
        let now: Result<VmRecord> = client.get(&vm_path(&vm.id, "")).await;
        if now.is_ok_and(|v| v.state == VmState::Running) {
            eprintln!(
                "VM {n} is still running: wick vm ssh {n} / wick vm delete {n}",
                n = vm.name
            );
        }
    }
    match result? {
        0 => Ok(()),
        code => Err(Exit(code.clamp(1, 255) as u8).into()),
    }
}

/// Workspace flags need a repository; the command must not be empty.
fn check_flags(a: &RunArgs) -> Result<()> {
    if a.path.is_none() {
        let w = &a.workspace;
        for (given, flag) in [
            (w.branch.is_some(), "--branch"),
            (w.from.is_some(), "--from"),
            (w.include_untracked, "--include-untracked"),
            (w.mode.is_some(), "--mode"),
            (a.guest_path.is_some(), "--guest-path"),
            (a.no_project, "--no-project"),
        ] {
            if given {
                bail!(
                    "{flag} needs a repository: pass its PATH, e.g. `wick vm run ./repo {flag} ...`"
                );
            }
        }
    }
    if a.command.first().is_some_and(String::is_empty) {
        bail!("the command after `--` is empty");
    }
    Ok(())
}

/// What runs in the new VM: the repository copied in, the project's run commands, then the
/// command (or the project's default one, or an ssh session).
struct Job {
    plan: Option<RepoPlan>,
    guest_path: String,
    command: Vec<String>,
    /// The project's `run` commands (shell lines), before the command.
    before: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<String>,
}

impl Job {
    fn new(
        plan: Option<RepoPlan>,
        guest_path: String,
        mut command: Vec<String>,
        project: Option<Project>,
    ) -> Job {
        let project = project.unwrap_or_default();
        if command.is_empty() {
            if let Some(c) = project.default_command {
                command = vec!["sh".into(), "-c".into(), c];
            }
        }
        Job {
            plan,
            guest_path,
            command,
            before: project.run,
            env: project.env,
            user: project.user,
        }
    }

    /// Prepare (with PATH), then the run commands and the command or the ssh session; returns
    /// the exit code (a failing run command's, which ends the job).
    async fn work(&self, ctx: &Ctx, vm: &VmRecord) -> Result<i32> {
        if let Some(plan) = &self.plan {
            let report = workspace::prepare_into(ctx, vm, plan, &self.guest_path).await?;
            eprintln!("{}", workspace::summary(&report, &vm.name));
        }
        for line in &self.before {
            eprintln!("{}", render::escape(&format!("run: {line}")));
            let argv = vec!["sh".into(), "-c".into(), line.clone()];
            let code = self.exec(ctx, vm, argv, false).await?;
            if code != 0 {
                eprintln!(
                    "{}",
                    render::escape(&format!("run command `{line}` failed with status {code}"))
                );
                return Ok(code);
            }
        }
        // The command line's, else the project's default, else the image's Entrypoint + Cmd.
        let command = match self.command.is_empty() {
            true => image_config(vm).default_command(),
            false => self.command.clone(),
        };
        if command.is_empty() {
            if self.plan.is_some() {
                eprintln!("the repository is in {}", self.guest_path);
            }
            return tokio::task::block_in_place(|| super::ssh::session(ctx, vm, &[]));
        }
        self.exec(ctx, vm, command, true).await
    }

    /// Runs `argv` in the repository (without one: the image's WorkingDir, else /root) as the
    /// project's user with its env, the image's config filling what the project leaves open.
    async fn exec(&self, ctx: &Ctx, vm: &VmRecord, argv: Vec<String>, stdin: bool) -> Result<i32> {
        let image = image_config(vm);
        let cwd = match (&self.plan, &image.working_dir) {
            (Some(_), _) => self.guest_path.clone(),
            (None, Some(w)) if !w.is_empty() => w.clone(),
            (None, _) => HOME.to_string(),
        };
        // Like `ssh host CMD`: stdin is forwarded, no terminal is allocated.
        let mut req =
            super::exec::request(argv, &[], Some(cwd), self.user.clone(), stdin, false, |k| {
                std::env::var(k).ok()
            })?;
        req.env.extend(self.env.iter().cloned());
        super::exec::image_defaults(&mut req, &image, false);
        let chan = agent::channel(ctx.client(), &vm.id);
        super::exec::stream(&chan, req).await
    }
}

/// A create that did not succeed: its error, after deleting the VM with `--rm` unless the guest
/// never came up (then the VM is kept for its log, and wick says so).
async fn create_failed(ctx: &Ctx, op: Operation, rm: bool) -> anyhow::Error {
    let (name, id) = (op.vm_name.clone(), op.vm_id.clone());
    let stage = op.stage.clone().unwrap_or_default();
    let err = match outcome(op) {
        Ok(_) => unreachable!("create_failed is only called for failed operations"),
        Err(e) => anyhow::Error::new(e),
    };
    let exists = ctx
        .client()
        .get::<VmRecord>(&vm_path(&id, ""))
        .await
        .is_ok();
    if !exists || !rm {
        return err;
    }
    if GUEST_STAGES.contains(&stage.as_str()) {
        eprintln!("kept VM {name} for inspection: wick vm logs {name}");
    } else {
        if let Err(e) = vm::delete_vm(ctx, &id).await {
            eprintln!(
                "{}",
                render::escape(&format!("warning: could not delete VM {name}: {e:#}"))
            );
        }
    }
    err
}

/// The process defaults of the VM's image (pulled OCI images), recorded in its spec.
fn image_config(vm: &VmRecord) -> wick_model::ImageConfig {
    vm.spec.image_config.clone().unwrap_or_default()
}
