//! The tools. Each is a thin call into what the CLI commands do.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::ServerConfig;
use rmcp::{tool, tool_handler, tool_router, ErrorData as McpError, ServerHandler};
use tokio::io::{AsyncRead, AsyncReadExt};
use wick_agent_proto::{ExecEvent, ExecRequest, ExecSession};
use wick_model::vm::LifecycleOp;
use wick_model::VmRecord;

use super::types::*;
use super::{bad_input, mcp_error, refuse};
use crate::agent;
use crate::cli::{VmSpecArgs, WorkspaceFlags};
use crate::client::vm_path;
use crate::cmd::{vm, workspace, Ctx};
use crate::progress::{Interrupt, View};

const MIB: u64 = 1 << 20;
/// Default and largest output kept per stream, and file size read.
const DEFAULT_BYTES: u64 = MIB;
const MAX_BYTES: u64 = 16 * MIB;
const DEFAULT_TIMEOUT: u64 = 600;
const MAX_TIMEOUT: u64 = 86_400;
/// How long a killed command may take to report its exit before the call gives up on it.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The MCP server: the caller's context and the tool router.
#[derive(Clone)]
pub struct WickMcp {
    ctx: Arc<Ctx>,
    /// Ctrl-C on the server cancels the operations it follows (a second one exits).
    interrupt: Interrupt,
    tool_router: ToolRouter<Self>,
}

type ToolResult<T> = Result<Json<T>, McpError>;

fn reply<T>(r: Result<T>) -> ToolResult<T> {
    r.map(Json).map_err(mcp_error)
}

#[tool_router]
impl WickMcp {
    pub fn new(ctx: Arc<Ctx>) -> WickMcp {
        WickMcp {
            ctx,
            interrupt: Interrupt::install(),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Create a VM and boot it; returns once its agent is ready.")]
    async fn create_vm(&self, Parameters(spec): Parameters<VmSpec>) -> ToolResult<VmSummary> {
        reply(self.create(spec).await.map(|vm| VmSummary::from(&vm)))
    }

    #[tool(description = "List your VMs.")]
    async fn list_vms(&self) -> ToolResult<VmList> {
        reply(self.list().await)
    }

    #[tool(description = "Show one VM: state, IP, DNS name, size.")]
    async fn show_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.record(&r.vm).await.map(|vm| VmSummary::from(&vm)))
    }

    #[tool(
        description = "Run a command in a running VM and wait for it: exit code, stdout and \
                       stderr (capped), killed after timeout_secs."
    )]
    async fn exec(&self, Parameters(p): Parameters<ExecParams>) -> ToolResult<ExecResult> {
        reply(self.exec_in(&p.vm, p.command, p.options).await)
    }

    #[tool(
        description = "Like `wick vm run PATH -- COMMAND`: create a VM, copy the git repository \
                       at path into /root/repo and run the command there."
    )]
    async fn run_repository(&self, Parameters(p): Parameters<RunParams>) -> ToolResult<RunResult> {
        reply(self.run_repo(p).await)
    }

    #[tool(description = "Read a regular file of a running VM.")]
    async fn read_file(
        &self,
        Parameters(p): Parameters<ReadFileParams>,
    ) -> ToolResult<FileContent> {
        reply(self.read(p).await)
    }

    #[tool(description = "Write a file into a running VM (parent directories are created).")]
    async fn write_file(&self, Parameters(p): Parameters<WriteFileParams>) -> ToolResult<Written> {
        reply(self.write(p).await)
    }

    #[tool(description = "List a directory of a running VM.")]
    async fn list_files(&self, Parameters(p): Parameters<ListFilesParams>) -> ToolResult<FileList> {
        reply(self.list_dir(p).await)
    }

    #[tool(description = "The TCP ports listening in a running VM, with host endpoints.")]
    async fn ports(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<PortList> {
        reply(self.list_ports(&r.vm).await)
    }

    #[tool(
        description = "The changes made to a prepared repository in the VM, as a patch for \
                       `git apply` on the host."
    )]
    async fn export_workspace(&self, Parameters(p): Parameters<ExportParams>) -> ToolResult<Patch> {
        reply(self.export(p).await)
    }

    #[tool(description = "Stop a VM (its disks are kept; start it again with the CLI).")]
    async fn stop_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.op(LifecycleOp::Stop, &r.vm).await)
    }

    #[tool(
        description = "Pause a running VM: its vCPUs stop, memory and resources stay; nothing \
                       runs in it (exec and files are refused) until resume_vm."
    )]
    async fn pause_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.op(LifecycleOp::Pause, &r.vm).await)
    }

    #[tool(
        description = "Suspend a running or paused VM: its memory and device state are saved \
                       to disk and its VMM ends (RAM freed); exec, files and start_vm-like use \
                       resume it where it was."
    )]
    async fn suspend_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.op(LifecycleOp::Suspend, &r.vm).await)
    }

    #[tool(description = "Resume a paused VM.")]
    async fn resume_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.op(LifecycleOp::Resume, &r.vm).await)
    }

    #[tool(
        description = "Create a VM from a snapshot (`wick snapshot list`): it continues the \
                       snapshot's guest (memory, processes, files) with its own identity; \
                       returns once it runs."
    )]
    async fn restore_snapshot(
        &self,
        Parameters(p): Parameters<RestoreParams>,
    ) -> ToolResult<VmSummary> {
        reply(self.restore(p).await.map(|vm| VmSummary::from(&vm)))
    }

    #[tool(
        description = "Fork a running or paused VM into `count` new VMs (default 1) that \
                       continue its guest, each with its own identity; the VM keeps running."
    )]
    async fn fork_vm(&self, Parameters(p): Parameters<ForkParams>) -> ToolResult<VmList> {
        reply(self.fork(p).await)
    }

    #[tool(description = "Delete a VM and its disks.")]
    async fn delete_vm(&self, Parameters(r): Parameters<VmRef>) -> ToolResult<VmSummary> {
        reply(self.delete(&r.vm).await)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for WickMcp {
    fn get_info(&self) -> ServerConfig {
        super::server_info()
    }
}

impl WickMcp {
    async fn record(&self, vm: &str) -> Result<VmRecord> {
        self.ctx.client().get(&vm_path(vm, "")).await
    }

    async fn list(&self) -> Result<VmList> {
        let list: wick_model::api::VmList = self.ctx.client().get("/v1/vms").await?;
        Ok(VmList {
            vms: list.vms.iter().map(VmSummary::from).collect(),
        })
    }

    async fn create(&self, spec: VmSpec) -> Result<VmRecord> {
        let args = VmSpecArgs {
            name: spec.name,
            image: spec.image,
            kernel: None,
            vcpu: spec.vcpu,
            memory: spec.memory,
            disk_size: spec.disk,
            nat: spec.nat.unwrap_or(false),
            allow_host: spec.allow_hosts.unwrap_or_default(),
            publish: spec.publish.unwrap_or_default(),
            init: None,
        };
        let req = bad_input(vm::create_request(&self.ctx, &args, false))?;
        let client = self.ctx.client();
        let created = vm::create_vm(&client, &req, &self.interrupt).await?;
        vm::outcome_vm(&client, created).await
    }

    async fn restore(&self, p: RestoreParams) -> Result<VmRecord> {
        let args = VmSpecArgs {
            name: p.name,
            nat: p.nat.unwrap_or(false),
            ..Default::default()
        };
        let mut req = bad_input(vm::create_request(&self.ctx, &args, false))?;
        req.from_snapshot = Some(p.snapshot);
        let client = self.ctx.client();
        let created = vm::create_vm(&client, &req, &self.interrupt).await?;
        vm::outcome_vm(&client, created).await
    }

    async fn fork(&self, p: ForkParams) -> Result<VmList> {
        let client = self.ctx.client();
        let req = wick_model::snapshot::ForkVmRequest {
            name: p.name,
            count: p.count,
            ssh_keys: crate::cmd::ssh_config::public_key(&self.ctx.paths)
                .into_iter()
                .collect(),
        };
        let fork: wick_model::snapshot::ForkResponse =
            client.post(&vm_path(&p.vm, "/fork"), &req).await?;
        let op =
            crate::progress::follow(&client, fork.operation, View::Quiet, &self.interrupt).await?;
        crate::progress::outcome(op)?;
        let mut vms = Vec::new();
        for name in &fork.vms {
            vms.push(VmSummary::from(&self.record(name).await?));
        }
        Ok(VmList { vms })
    }

    async fn op(&self, kind: LifecycleOp, vm: &str) -> Result<VmSummary> {
        let client = self.ctx.client();
        let op = vm::run_op(&client, kind, vm, View::Quiet, &self.interrupt).await?;
        match op.vm {
            Some(vm) => Ok(VmSummary::from(&vm)),
            None => Ok(VmSummary::from(&self.record(&op.vm_id).await?)),
        }
    }

    async fn delete(&self, vm: &str) -> Result<VmSummary> {
        let record = self.record(vm).await?;
        vm::delete_vm(&self.ctx, &record.id).await?;
        let mut summary = VmSummary::from(&record);
        summary.state = "deleted".into();
        Ok(summary)
    }

    async fn exec_in(&self, vm: &str, argv: Vec<String>, o: ExecOptions) -> Result<ExecResult> {
        check_command(&argv)?;
        let timeout = o.timeout_secs.unwrap_or(DEFAULT_TIMEOUT);
        if timeout == 0 || timeout > MAX_TIMEOUT {
            refuse!("timeout_secs must be 1..={MAX_TIMEOUT}, not {timeout}");
        }
        let cap = bytes_limit("max_output_bytes", o.max_output_bytes)?;
        let req = ExecRequest {
            argv,
            env: o.env.unwrap_or_default().into_iter().collect(),
            cwd: o.cwd,
            user: o.user,
            tty: None,
            stdin: false,
        };
        let session = agent::channel(self.ctx.client(), vm)
            .exec(req)
            .await
            .map_err(agent::to_anyhow)?;
        collect(session, Duration::from_secs(timeout), cap).await
    }

    async fn run_repo(&self, p: RunParams) -> Result<RunResult> {
        check_command(&p.command)?;
        let options = WorkspaceFlags::default().to_options()?;
        let guest_path = p
            .guest_path
            .unwrap_or_else(|| wick_workspace::DEFAULT_GUEST_PATH.to_string());
        bad_input(workspace::check_guest_path(&guest_path))?;
        let plan = bad_input(workspace::inspect(Path::new(&p.path), options).await)?;
        let vm = self.create(p.spec).await?;
        let options = ExecOptions {
            cwd: Some(guest_path.clone()),
            timeout_secs: p.timeout_secs,
            max_output_bytes: p.max_output_bytes,
            ..Default::default()
        };
        let work = async {
            workspace::prepare_into(&self.ctx, &vm, &plan, &guest_path).await?;
            self.exec_in(&vm.id, p.command, options).await
        }
        .await;
        let deleted =
            p.delete_after.unwrap_or(false) && vm::delete_vm(&self.ctx, &vm.id).await.is_ok();
        Ok(RunResult {
            vm: VmSummary::from(&vm),
            guest_path,
            deleted,
            result: work?,
        })
    }

    async fn read(&self, p: ReadFileParams) -> Result<FileContent> {
        absolute(&p.path)?;
        let max = bytes_limit("max_bytes", p.max_bytes)?;
        let tar = agent::channel(self.ctx.client(), &p.vm)
            .get_tar(&p.path)
            .await
            .map_err(agent::to_anyhow)?;
        let data = read_single_file(tar, &p.path, max as u64).await?;
        let size = data.len() as u64;
        let (encoding, content) = match String::from_utf8(data) {
            Ok(s) => (Encoding::Utf8, s),
            Err(e) => (
                Encoding::Base64,
                base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            ),
        };
        Ok(FileContent {
            path: p.path,
            size,
            encoding,
            content,
        })
    }

    async fn write(&self, p: WriteFileParams) -> Result<Written> {
        absolute(&p.path)?;
        let path = Path::new(&p.path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            refuse!("path {} names no file", p.path);
        };
        let data = match p.encoding.unwrap_or(Encoding::Utf8) {
            Encoding::Utf8 => p.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| {
                    anyhow::Error::new(super::BadInput(format!("content is not valid base64: {e}")))
                })?,
        };
        let mode = bad_input(file_mode(p.mode.as_deref()))?;
        let archive = one_file_tar(Path::new(name), &data, mode)?;
        agent::channel(self.ctx.client(), &p.vm)
            .put_tar(&dir.to_string_lossy(), &archive[..])
            .await
            .map_err(agent::to_anyhow)?;
        Ok(Written {
            path: p.path,
            bytes: data.len() as u64,
        })
    }

    async fn list_dir(&self, p: ListFilesParams) -> Result<FileList> {
        absolute(&p.path)?;
        let argv = ["ls", "-1Ap", "--", &p.path].map(String::from).to_vec();
        let options = ExecOptions {
            cwd: Some("/".into()),
            timeout_secs: Some(60),
            max_output_bytes: Some(MAX_BYTES),
            ..Default::default()
        };
        let r = self.exec_in(&p.vm, argv, options).await?;
        if r.exit_code != 0 {
            bail!("cannot list {}: {}", p.path, r.stderr.trim());
        }
        let entries = r
            .stdout
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| match l.strip_suffix('/') {
                Some(d) => FileEntry {
                    name: d.into(),
                    dir: true,
                },
                None => FileEntry {
                    name: l.into(),
                    dir: false,
                },
            })
            .collect();
        Ok(FileList {
            path: p.path,
            entries,
        })
    }

    async fn list_ports(&self, vm: &str) -> Result<PortList> {
        let record = self.record(vm).await?;
        let list = agent::channel(self.ctx.client(), &record.id)
            .ports()
            .await
            .map_err(agent::to_anyhow)?;
        let ports = list
            .into_iter()
            .map(|p| Port {
                endpoint: match (&record.runtime.ip, p.address.is_loopback()) {
                    (Some(ip), false) => Some(format!("{ip}:{}", p.port)),
                    _ => None,
                },
                proto: p.proto,
                address: p.address.to_string(),
                port: p.port,
                process: p.process,
            })
            .collect();
        Ok(PortList {
            vm: record.name,
            ports,
        })
    }

    async fn export(&self, p: ExportParams) -> Result<Patch> {
        let guest_path = p
            .guest_path
            .unwrap_or_else(|| wick_workspace::DEFAULT_GUEST_PATH.to_string());
        workspace::check_guest_path(&guest_path)?;
        let record = self.record(&p.vm).await?;
        let record = crate::cmd::wake::resume_if_suspended(&self.ctx.client(), record).await?;
        workspace::ensure_running(&record)?;
        let client = workspace::agent_client(&self.ctx, &record).await?;
        let mut out = CappedBuf::new(MAX_BYTES as usize * 4);
        wick_workspace::export_to(&client, &guest_path, p.base_commit.as_deref(), &mut out).await?;
        let patch = String::from_utf8_lossy(&out.data).into_owned();
        Ok(Patch {
            bytes: out.data.len() as u64,
            patch,
        })
    }
}

/// Reads the command's events until it exits, keeping `cap` bytes per stream; SIGKILLs its
/// process group at `timeout`.
async fn collect(mut session: ExecSession, timeout: Duration, cap: usize) -> Result<ExecResult> {
    let control = session.control();
    let killed = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let killed = killed.clone();
        async move {
            tokio::time::sleep(timeout).await;
            killed.store(true, Ordering::SeqCst);
            let _ = control.signal(libc::SIGKILL).await;
        }
    });
    let give_up = tokio::time::Instant::now() + timeout + KILL_GRACE;
    let (mut out, mut err) = (CappedBuf::new(cap), CappedBuf::new(cap));
    let status = loop {
        let event = tokio::time::timeout_at(give_up, session.next_event())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the command did not end within {KILL_GRACE:?} of being killed at its timeout"
                )
            })?
            .map_err(agent::to_anyhow)?;
        match event {
            Some(ExecEvent::Stdout(b)) => out.push(&b),
            Some(ExecEvent::Stderr(b)) => err.push(&b),
            Some(ExecEvent::Exit(status)) => break status,
            None => bail!("the agent closed the connection before the command's exit status"),
        }
    };
    killer.abort();
    Ok(ExecResult {
        exit_code: status.shell_code(),
        stdout: String::from_utf8_lossy(&out.data).into_owned(),
        stderr: String::from_utf8_lossy(&err.data).into_owned(),
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        timed_out: killed.load(Ordering::SeqCst),
    })
}

/// A byte buffer that keeps its first `cap` bytes and notes whether more came.
struct CappedBuf {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl CappedBuf {
    fn new(cap: usize) -> CappedBuf {
        CappedBuf {
            data: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, b: &[u8]) {
        let room = self.cap.saturating_sub(self.data.len());
        self.data.extend_from_slice(&b[..b.len().min(room)]);
        self.truncated |= b.len() > room;
    }
}

impl tokio::io::AsyncWrite for CappedBuf {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.data.len() + buf.len() > me.cap {
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "the patch is larger than {} MiB; export it with the CLI",
                me.cap >> 20
            ))));
        }
        me.data.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The content of the single regular file in the guest's tar stream of `path`, refusing more
/// than `max` bytes (the stream is read only that far, plus room for headers).
async fn read_single_file(tar: impl AsyncRead + Unpin, path: &str, max: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    tar.take(max + 64 * 1024)
        .read_to_end(&mut buf)
        .await
        .with_context(|| format!("read {path} from the guest"))?;
    let mut archive = tar::Archive::new(&buf[..]);
    let mut entries = archive.entries().context("read the guest's archive")?;
    let mut entry = entries
        .next()
        .with_context(|| format!("the guest sent nothing for {path}"))?
        .context("read the guest's archive")?;
    if !entry.header().entry_type().is_file() {
        bail!("{path} is not a regular file (list a directory with list_files)");
    }
    let size = entry.header().size().context("read the guest's archive")?;
    if size > max {
        bail!("{path} is {size} bytes, more than max_bytes ({max})");
    }
    let mut data = Vec::with_capacity(size as usize);
    std::io::Read::read_to_end(&mut entry, &mut data).context("read the guest's archive")?;
    Ok(data)
}

/// A tar archive holding one regular file `name`.
fn one_file_tar(name: &Path, data: &[u8], mode: u32) -> Result<Vec<u8>> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_data(&mut header, name, data)?;
    Ok(builder.into_inner()?)
}

/// Refuses an empty command (before any VM is made for it).
fn check_command(argv: &[String]) -> Result<()> {
    if argv.first().is_none_or(String::is_empty) {
        refuse!("command is empty: give the program and its arguments, e.g. [\"make\", \"test\"]");
    }
    Ok(())
}

fn absolute(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        refuse!("path {path:?} must be absolute (e.g. /root/file.txt)");
    }
    Ok(())
}

/// `"0755"` → 0o755; default 0o644.
fn file_mode(mode: Option<&str>) -> Result<u32> {
    let Some(m) = mode else { return Ok(0o644) };
    u32::from_str_radix(m, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("mode {m:?} is not octal permission bits such as \"0644\""))
}

fn bytes_limit(what: &str, given: Option<u64>) -> Result<usize> {
    let n = given.unwrap_or(DEFAULT_BYTES);
    if n == 0 || n > MAX_BYTES {
        refuse!("{what} must be 1..={MAX_BYTES}, not {n}");
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_buffer_keeps_the_head_and_says_so() {
        let mut b = CappedBuf::new(4);
        b.push(b"ab");
        assert!(!b.truncated);
        b.push(b"cdef");
        assert_eq!(b.data, b"abcd");
        assert!(b.truncated);
    }

    #[test]
    fn modes_and_limits() {
        assert_eq!(file_mode(None).unwrap(), 0o644);
        assert_eq!(file_mode(Some("0755")).unwrap(), 0o755);
        assert!(file_mode(Some("4755")).is_err());
        assert!(file_mode(Some("rwx")).is_err());
        assert!(bytes_limit("max_bytes", Some(0)).is_err());
        assert!(bytes_limit("max_bytes", Some(MAX_BYTES + 1)).is_err());
        assert!(absolute("rel").is_err());
    }

    #[tokio::test]
    async fn reads_one_file_and_refuses_the_rest() {
        let tar = one_file_tar(Path::new("f"), b"hello", 0o644).unwrap();
        assert_eq!(
            read_single_file(&tar[..], "/f", 10).await.unwrap(),
            b"hello"
        );
        let e = read_single_file(&tar[..], "/f", 3).await.unwrap_err();
        assert!(e.to_string().contains("more than max_bytes"), "{e}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "d", &[][..]).unwrap();
        let dir = b.into_inner().unwrap();
        let e = read_single_file(&dir[..], "/d", 10).await.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
