//! `fake-firecracker`: a **fake** Firecracker v1.x for tests. It boots nothing.
//!
//! It serves the subset of Firecracker's HTTP API that wick uses, over a real Unix socket, with
//! Firecracker's status codes, validation and `{"fault_message": ...}` errors, so the real
//! driver's client code is exercised end to end without KVM or a guest kernel.
//!
//! Command line (Firecracker's shape): `--api-sock PATH` (required), `--id ID`; `--level`,
//! `--log-path`, `--no-seccomp` (and a few more) are accepted and ignored; `--version` prints a
//! version line. An existing socket path makes it exit 1 with `FailedToBindSocket`, as the real
//! binary does.
//!
//! Behaviour worth knowing:
//! - Pre-boot `PUT`s answer 204; after `InstanceStart` they answer 400 "The requested operation is
//!   not supported after starting the microVM.". Unknown fields, bad JSON and unknown routes are
//!   400 with Firecracker's wording. The machine config defaults to 1 vCPU / 128 MiB, as in
//!   Firecracker; `InstanceStart` needs a boot source.
//! - `PUT /vsock` binds the hybrid-vsock listener at `uds_path` (as Firecracker does; an existing
//!   file there is an error). Connections get `CONNECT <port>\n` read and are closed: there is no
//!   guest agent — unless `FAKE_FC_AGENT_BIN` is set (below).
//! - `InstanceStart` prints fake serial-console lines to stdout and writes a metrics line.
//! - `SendCtrlAltDel` makes the fake guest power off: the process exits 0 about 50 ms later,
//!   removing its vsock socket (the API socket is left behind, like Firecracker does).
//! - SIGTERM/SIGINT: exit 0, removing the API and vsock sockets.
//!
//! Failure knobs (environment variables):
//! - `FAKE_FC_EXIT_AFTER_START_MS=N`: N ms after `InstanceStart` the "guest crashes": a line on
//!   stderr and exit code 1.
//! - `FAKE_FC_FAIL_START=msg`: `InstanceStart` answers 400 with `msg` as fault message.
//! - `FAKE_FC_CONSOLE_SPAM_KIB_S=N`: after `InstanceStart` the "guest" prints numbered lines
//!   (`spam <n> ...`) to the serial console (stdout) at about N KiB/s until the process exits,
//!   like a guest stuck in a print loop (a real serial console is far slower than this can be).
//! - `FAKE_FC_IGNORE_CTRL_ALT_DEL=1`: `SendCtrlAltDel` is accepted but the guest never powers
//!   off, so a graceful stop has to fall back to SIGKILL.
//!
//! A real agent in the fake guest (test-only): `FAKE_FC_AGENT_BIN=/path/to/wick-agent` makes
//! `InstanceStart` spawn `wick-agent --listen-unix D/agent.sock --root-prefix D/guest-root
//! --no-poweroff`, where D is the directory of the vsock `uds_path`. A hybrid-vsock
//! `CONNECT 10700\n` is then answered with `OK <n>\n` and spliced to `D/agent.sock`, as
//! Firecracker splices to the guest's vsock port; other ports are still closed. The "guest" is
//! this host: exec runs host commands (as the fake's user), and `Configure` writes below
//! `D/guest-root` only (which starts with an empty `etc/ssh`, so host keys get generated). The agent dies with the fake (killed by pid and reaped on every exit
//! path, and `PR_SET_PDEATHSIG` covers a SIGKILL of the fake). `FAKE_FC_AGENT_BIN` may name
//! testkit's `hostile-agent` instead (a scripted hostile guest, see `wick_testkit::hostile`):
//! it takes the same arguments.

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const VERSION: &str = "1.16.0-fake";
const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
/// The guest port wick-agent listens on (`wick_agent_proto::AGENT_PORT`).
const AGENT_PORT: u32 = 10700;
/// Names the wick-agent binary to run as the fake guest's agent.
const AGENT_BIN_ENV: &str = "FAKE_FC_AGENT_BIN";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfig {
    vcpu_count: u8,
    mem_size_mib: usize,
    #[serde(default)]
    smt: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpu_template: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    huge_pages: Option<Value>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSource {
    kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_args: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drive {
    drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_on_host: Option<String>,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_type: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    io_engine: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveUpdate {
    drive_id: String,
    #[serde(default)]
    path_on_host: Option<String>,
    #[serde(default)]
    rate_limiter: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetIface {
    iface_id: String,
    host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rx_rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tx_rate_limiter: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetUpdate {
    iface_id: String,
    #[serde(default)]
    rx_rate_limiter: Option<Value>,
    #[serde(default)]
    tx_rate_limiter: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock_id: Option<String>,
    guest_cid: u32,
    uds_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    module: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metrics {
    metrics_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Paused,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::NotStarted => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        }
    }
}

struct Vm {
    id: String,
    api_sock: PathBuf,
    phase: Phase,
    machine: MachineConfig,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetIface>,
    vsock: Option<Vsock>,
    vsock_task: Option<tokio::task::JoinHandle<()>>,
    logger: Option<Logger>,
    metrics: Option<Metrics>,
    /// The agent process of the fake guest (`FAKE_FC_AGENT_BIN`), once started.
    agent: Option<std::process::Child>,
    /// Where that agent listens; `CONNECT 10700` is spliced there.
    agent_sock: Option<PathBuf>,
}

type Shared = Arc<Mutex<Vm>>;

/// Outcome of one API call.
enum Reply {
    NoContent,
    Json(Value),
    Fault(String),
}

fn fault(msg: impl Into<String>) -> Reply {
    Reply::Fault(msg.into())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        fault(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's `checked_id`.
fn checked_id(id: Option<&str>) -> Result<&str, Reply> {
    match id {
        None | Some("") => Err(fault("The ID cannot be empty.")),
        Some(id) if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) => Err(fault(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
        Some(id) => Ok(id),
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn open_append(path: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().append(true).open(path)
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Vm {
    fn pre_boot(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Ok(())
        } else {
            Err(fault(POST_BOOT))
        }
    }

    fn post_boot(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Err(fault(PRE_BOOT))
        } else {
            Ok(())
        }
    }

    fn log(&self, line: &str) {
        if let Some(path) = self.logger.as_ref().and_then(|l| l.log_path.as_deref()) {
            if let Ok(mut f) = open_append(path) {
                let _ = writeln!(f, "[{}:fake-firecracker] {line}", self.id);
            }
        }
    }

    fn write_metrics(&self) {
        if let Some(m) = &self.metrics {
            if let Ok(mut f) = open_append(&m.metrics_path) {
                let line = json!({
                    "utc_timestamp_ms": now_ms() as u64,
                    "fake": true,
                    "vmm": { "state": self.phase.as_str() },
                    "vcpu": { "count": self.machine.vcpu_count },
                });
                let _ = writeln!(f, "{line}");
            }
        }
    }

    fn instance_info(&self) -> Value {
        json!({
            "id": self.id,
            "state": self.phase.as_str(),
            "vmm_version": VERSION,
            "app_name": "Firecracker",
        })
    }

    fn full_config(&self) -> Value {
        json!({
            "balloon": null,
            "drives": self.drives,
            "boot-source": self.boot,
            "cpu-config": null,
            "logger": self.logger,
            "machine-config": self.machine,
            "metrics": self.metrics,
            "mmds-config": null,
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "entropy": null,
        })
    }

    fn remove_vsock(&mut self) {
        if let Some(t) = self.vsock_task.take() {
            t.abort();
        }
        if let Some(v) = &self.vsock {
            let _ = std::fs::remove_file(&v.uds_path);
        }
    }

    /// Starts the fake guest's agent when `FAKE_FC_AGENT_BIN` is set and a vsock exists.
    fn start_agent(&mut self) -> Result<(), Reply> {
        let Some(bin) = std::env::var_os(AGENT_BIN_ENV).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let Some(vsock) = &self.vsock else {
            println!("[fake-firecracker] {AGENT_BIN_ENV} set but no vsock device: no agent");
            return Ok(());
        };
        let dir = Path::new(&vsock.uds_path)
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let sock = dir.join("agent.sock");
        let root = dir.join("guest-root");
        // Like a wick image: openssh-server's /etc/ssh exists, so the agent makes host keys.
        std::fs::create_dir_all(root.join("etc/ssh")).map_err(|e| {
            fault(format!(
                "Start microvm error: (fake) cannot create {}: {e}",
                root.display()
            ))
        })?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--listen-unix")
            .arg(&sock)
            .arg("--root-prefix")
            .arg(&root)
            .arg("--no-poweroff")
            .stdin(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; the closure only calls it.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                // The agent dies with the fake, even when the fake is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            fault(format!(
                "Start microvm error: (fake) cannot run {AGENT_BIN_ENV}={}: {e}",
                Path::new(&bin).display()
            ))
        })?;
        println!(
            "[fake-firecracker] fake guest agent pid {} on {}",
            child.id(),
            sock.display()
        );
        self.agent = Some(child);
        self.agent_sock = Some(sock);
        Ok(())
    }

    /// Kills (by pid) and reaps the fake guest's agent, if any.
    fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = self.agent_sock.take() {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Stops the fake guest's agent and exits the process with `code`.
fn exit_with(vm: &Shared, code: i32) -> ! {
    let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
    vm.stop_agent();
    std::process::exit(code);
}

fn put_machine_config(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: MachineConfig = parse(body)?;
    vm.pre_boot()?;
    if cfg.vcpu_count == 0
        || cfg.vcpu_count > 32
        || (cfg.smt && cfg.vcpu_count > 1 && cfg.vcpu_count % 2 == 1)
    {
        return Err(fault(
            "Machine config error: The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
        ));
    }
    if cfg.mem_size_mib == 0 {
        return Err(fault(
            "Machine config error: The memory size (MiB) is invalid.",
        ));
    }
    vm.machine = cfg;
    Ok(Reply::NoContent)
}

fn put_boot_source(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: BootSource = parse(body)?;
    vm.pre_boot()?;
    if let Err(e) = std::fs::File::open(&cfg.kernel_image_path) {
        return Err(fault(format!(
            "Boot source error: The kernel file cannot be opened: {e}"
        )));
    }
    if let Some(initrd) = &cfg.initrd_path {
        if let Err(e) = std::fs::File::open(initrd) {
            return Err(fault(format!(
                "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
            )));
        }
    }
    vm.boot = Some(cfg);
    Ok(Reply::NoContent)
}

fn put_drive(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let cfg: Drive = parse(body)?;
    if cfg.drive_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.pre_boot()?;
    let Some(path) = &cfg.path_on_host else {
        return Err(fault(
            "Drive config error: Unable to create the virtio block device: path_on_host is required (the fake has no vhost-user)",
        ));
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(!cfg.is_read_only)
        .open(path)
    {
        return Err(fault(format!(
            "Drive config error: Unable to create the virtio block device: Unable to open the backing file {path}: {e}"
        )));
    }
    if cfg.is_root_device
        && vm
            .drives
            .iter()
            .any(|d| d.is_root_device && d.drive_id != cfg.drive_id)
    {
        return Err(fault(
            "Drive config error: A root block device already exists!",
        ));
    }
    match vm.drives.iter_mut().find(|d| d.drive_id == cfg.drive_id) {
        Some(d) => *d = cfg,
        None => vm.drives.push(cfg),
    }
    Ok(Reply::NoContent)
}

fn patch_drive(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let upd: DriveUpdate = parse(body)?;
    if upd.drive_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.post_boot()?;
    let Some(drive) = vm.drives.iter_mut().find(|d| d.drive_id == upd.drive_id) else {
        return Err(fault(format!(
            "Drive config error: Invalid block device ID: {}",
            upd.drive_id
        )));
    };
    if let Some(path) = upd.path_on_host {
        if let Err(e) = std::fs::File::open(&path) {
            return Err(fault(format!(
                "Drive config error: Unable to patch the block device: {path}: {e}"
            )));
        }
        drive.path_on_host = Some(path);
    }
    if upd.rate_limiter.is_some() {
        drive.rate_limiter = upd.rate_limiter;
    }
    Ok(Reply::NoContent)
}

fn put_net(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let cfg: NetIface = parse(body)?;
    if cfg.iface_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.pre_boot()?;
    if let Some(mac) = &cfg.guest_mac {
        if !valid_mac(mac) {
            return Err(fault(format!(
                "An error occurred when deserializing the json body of a request: invalid MAC address {mac:?}."
            )));
        }
    }
    if vm
        .nets
        .iter()
        .any(|n| n.host_dev_name == cfg.host_dev_name && n.iface_id != cfg.iface_id)
    {
        return Err(fault(format!(
            "Network config error: The host device name {} is already in use.",
            cfg.host_dev_name
        )));
    }
    match vm.nets.iter_mut().find(|n| n.iface_id == cfg.iface_id) {
        Some(n) => *n = cfg,
        None => vm.nets.push(cfg),
    }
    Ok(Reply::NoContent)
}

fn patch_net(vm: &mut Vm, id: Option<&str>, body: &Bytes) -> Result<Reply, Reply> {
    let id = checked_id(id)?;
    let upd: NetUpdate = parse(body)?;
    if upd.iface_id != id {
        return Err(fault(
            "The id from the path does not match the id from the body!",
        ));
    }
    vm.post_boot()?;
    let Some(net) = vm.nets.iter_mut().find(|n| n.iface_id == upd.iface_id) else {
        return Err(fault(format!(
            "Network config error: Invalid interface ID - not found: {}",
            upd.iface_id
        )));
    };
    if upd.rx_rate_limiter.is_some() {
        net.rx_rate_limiter = upd.rx_rate_limiter;
    }
    if upd.tx_rate_limiter.is_some() {
        net.tx_rate_limiter = upd.tx_rate_limiter;
    }
    Ok(Reply::NoContent)
}

/// Firecracker's host side of hybrid vsock: read `CONNECT <port>\n`; splice port 10700 to the
/// fake guest's agent when one runs, close every other connection (nobody listens there).
async fn serve_vsock(listener: UnixListener, vm: Shared) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            // Byte by byte: whatever follows the newline belongs to the guest connection.
            let mut line = Vec::with_capacity(32);
            let read = async {
                loop {
                    let mut b = [0u8; 1];
                    match stream.read(&mut b).await {
                        Ok(1) if b[0] == b'\n' => return true,
                        Ok(1) if line.len() < 64 => line.push(b[0]),
                        _ => return false,
                    }
                }
            };
            if !tokio::time::timeout(Duration::from_secs(2), read)
                .await
                .unwrap_or(false)
            {
                return;
            }
            let port = String::from_utf8_lossy(&line)
                .strip_prefix("CONNECT ")
                .and_then(|p| p.trim().parse::<u32>().ok());
            let target = match port {
                Some(AGENT_PORT) => vm
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .agent_sock
                    .clone(),
                _ => None,
            };
            let Some(target) = target else {
                return; // dropping the stream closes it: nobody listens on that guest port
            };
            let Ok(mut guest) = UnixStream::connect(&target).await else {
                return; // the agent is not listening (yet): close, as Firecracker does
            };
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1 << 30);
            let host_port = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if stream
                .write_all(format!("OK {host_port}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let _ = wick_agent_proto::relay(&mut stream, &mut guest).await;
        });
    }
}

fn put_vsock(vm: &mut Vm, shared: &Shared, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Vsock = parse(body)?;
    vm.pre_boot()?;
    if cfg.guest_cid < 3 {
        return Err(fault(format!(
            "Vsock config error: Invalid guest CID {}: CIDs 0, 1 and 2 are reserved.",
            cfg.guest_cid
        )));
    }
    // A new device replaces the old one, as in Firecracker.
    vm.remove_vsock();
    let listener = match std::os::unix::net::UnixListener::bind(&cfg.uds_path) {
        Ok(l) => l,
        Err(e) => {
            vm.vsock = None;
            return Err(fault(format!(
                "Vsock config error: Cannot create backend for vsock device: UnixBind({e})"
            )));
        }
    };
    let _ = listener.set_nonblocking(true);
    let listener =
        UnixListener::from_std(listener).map_err(|e| fault(format!("Vsock config error: {e}")))?;
    vm.vsock_task = Some(tokio::spawn(serve_vsock(listener, shared.clone())));
    vm.vsock = Some(cfg);
    Ok(Reply::NoContent)
}

fn put_logger(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Logger = parse(body)?;
    vm.pre_boot()?;
    if let Some(level) = &cfg.level {
        let ok = ["error", "warning", "warn", "info", "debug", "trace", "off"]
            .contains(&level.to_ascii_lowercase().as_str());
        if !ok {
            return Err(fault(format!(
                "An error occurred when deserializing the json body of a request: unknown log level {level:?}."
            )));
        }
    }
    if let Some(path) = &cfg.log_path {
        if let Err(e) = open_append(path) {
            return Err(fault(format!(
                "Logger error: Failed to open target file: {e}"
            )));
        }
    }
    vm.logger = Some(cfg);
    vm.log(&format!("Running Firecracker v{VERSION} (a fake)"));
    Ok(Reply::NoContent)
}

fn put_metrics(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Metrics = parse(body)?;
    vm.pre_boot()?;
    if let Err(e) = open_append(&cfg.metrics_path) {
        return Err(fault(format!(
            "Metrics error: Cannot initialize the metrics system due to errors: Failed to open target file: {e}"
        )));
    }
    vm.metrics = Some(cfg);
    Ok(Reply::NoContent)
}

/// Prints numbered console lines forever at about `kib_per_s` KiB/s (`FAKE_FC_CONSOLE_SPAM_KIB_S`).
fn spam_console(kib_per_s: u64) {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (kib_per_s * 1024 / 100).max(1);
    let mut n: u64 = 0;
    let start = std::time::Instant::now();
    let mut ticks: u32 = 0;
    loop {
        let mut chunk = String::new();
        while (chunk.len() as u64) < per_tick {
            chunk.push_str(&format!("spam {n} the guest prints without end\n"));
            n += 1;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(chunk.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
        drop(out);
        ticks += 1;
        // Paced against the start, so the rate holds however long each write takes.
        let due = start + TICK * ticks;
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    }
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

fn put_actions(vm: &mut Vm, shared: &Shared, body: &Bytes) -> Result<Reply, Reply> {
    let action: Action = parse(body)?;
    match action.action_type {
        ActionType::InstanceStart => {
            vm.pre_boot()?;
            let Some(boot) = vm.boot.clone() else {
                return Err(fault(
                    "Start microvm error: Cannot start microvm without kernel configuration.",
                ));
            };
            if let Ok(msg) = std::env::var("FAKE_FC_FAIL_START") {
                if !msg.is_empty() {
                    return Err(fault(msg));
                }
            }
            vm.start_agent()?;
            vm.phase = Phase::Running;
            println!(
                "[fake-firecracker] booting kernel {} with {} vcpus, {} MiB",
                boot.kernel_image_path, vm.machine.vcpu_count, vm.machine.mem_size_mib
            );
            println!(
                "[fake-firecracker] cmdline: {}",
                boot.boot_args.as_deref().unwrap_or("")
            );
            for d in &vm.drives {
                println!(
                    "[fake-firecracker] drive {}: {}{}",
                    d.drive_id,
                    d.path_on_host.as_deref().unwrap_or("-"),
                    if d.is_root_device { " (root)" } else { "" }
                );
            }
            println!("fake guest: reached init");
            if let Some(kib) = std::env::var("FAKE_FC_CONSOLE_SPAM_KIB_S")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::spawn(move || spam_console(kib));
            }
            vm.log("Successfully started microvm (fake)");
            vm.write_metrics();
            if let Some(ms) = std::env::var("FAKE_FC_EXIT_AFTER_START_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    eprintln!(
                        "[fake-firecracker] guest crashed (FAKE_FC_EXIT_AFTER_START_MS={ms}): exiting with code 1"
                    );
                    exit_with(&shared, 1);
                });
            }
            Ok(Reply::NoContent)
        }
        ActionType::SendCtrlAltDel => {
            vm.post_boot()?;
            if env_flag("FAKE_FC_IGNORE_CTRL_ALT_DEL") {
                println!("fake guest: ignoring Ctrl+Alt+Del (FAKE_FC_IGNORE_CTRL_ALT_DEL)");
                return Ok(Reply::NoContent);
            }
            println!("fake guest: Ctrl+Alt+Del received, powering off");
            let vsock = vm.vsock.as_ref().map(|v| v.uds_path.clone());
            vm.log("Vmm is stopping (fake guest powered off)");
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(p) = vsock {
                    let _ = std::fs::remove_file(p);
                }
                println!("[fake-firecracker] guest powered off, exiting");
                exit_with(&shared, 0);
            });
            Ok(Reply::NoContent)
        }
        ActionType::FlushMetrics => {
            vm.write_metrics();
            Ok(Reply::NoContent)
        }
    }
}

fn patch_vm(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let patch: VmStatePatch = parse(body)?;
    vm.post_boot()?;
    vm.phase = match patch.state {
        VmStateWanted::Paused => Phase::Paused,
        VmStateWanted::Resumed => Phase::Running,
    };
    Ok(Reply::NoContent)
}

fn route(vm: &mut Vm, shared: &Shared, method: &Method, path: &str, body: Option<Bytes>) -> Reply {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    let second = tokens.next();
    let res = match (method, first, body.as_ref()) {
        (&Method::GET, "", None) => Ok(Reply::Json(vm.instance_info())),
        (&Method::GET, "version", None) => {
            Ok(Reply::Json(json!({ "firecracker_version": VERSION })))
        }
        (&Method::GET, "vm", None) if second == Some("config") => Ok(Reply::Json(vm.full_config())),
        (&Method::GET, "machine-config", None) => Ok(Reply::Json(json!(vm.machine))),
        (&Method::GET, _, Some(_)) => Err(fault("GET request cannot have a body.")),
        (&Method::PUT, "actions", Some(b)) => put_actions(vm, shared, b),
        (&Method::PUT, "boot-source", Some(b)) => put_boot_source(vm, b),
        (&Method::PUT, "drives", Some(b)) => put_drive(vm, second, b),
        (&Method::PUT, "logger", Some(b)) => put_logger(vm, b),
        (&Method::PUT, "machine-config", Some(b)) => put_machine_config(vm, b),
        (&Method::PUT, "metrics", Some(b)) => put_metrics(vm, b),
        (&Method::PUT, "network-interfaces", Some(b)) => put_net(vm, second, b),
        (&Method::PUT, "vsock", Some(b)) => put_vsock(vm, shared, b),
        (&Method::PUT, _, None) => Err(fault("Empty PUT request.")),
        (&Method::PATCH, "drives", Some(b)) => patch_drive(vm, second, b),
        (&Method::PATCH, "network-interfaces", Some(b)) => patch_net(vm, second, b),
        (&Method::PATCH, "vm", Some(b)) => patch_vm(vm, b),
        (&Method::PATCH, _, None) => Err(fault("Empty PATCH request.")),
        (m, other, _) => Err(fault(format!(
            "Invalid request method and/or path: {} {other}.",
            m.as_str()
        ))),
    };
    match res {
        Ok(r) | Err(r) => r,
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let (status, body) = match reply {
        Reply::NoContent => (StatusCode::NO_CONTENT, None),
        Reply::Json(v) => (StatusCode::OK, Some(v)),
        Reply::Fault(msg) => (
            StatusCode::BAD_REQUEST,
            Some(json!({ "fault_message": msg })),
        ),
    };
    let mut b = Response::builder().status(status);
    let body = match body {
        Some(v) => {
            b = b.header("Content-Type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    b.body(body).expect("valid response")
}

async fn handle(req: Request<Incoming>, vm: Shared) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(respond(fault(format!(
                "could not read the request body: {e}"
            ))))
        }
    };
    let body = (!body.is_empty()).then_some(body);
    let reply = {
        let mut guard = vm.lock().unwrap_or_else(|p| p.into_inner());
        route(&mut guard, &vm, &method, &path, body)
    };
    Ok(respond(reply))
}

struct Args {
    api_sock: PathBuf,
    id: String,
}

fn usage_exit(msg: &str) -> ! {
    eprintln!("fake-firecracker: {msg}");
    eprintln!("usage: fake-firecracker --api-sock PATH [--id ID] [--level L] [--log-path P] [--no-seccomp]");
    std::process::exit(153);
}

fn parse_args() -> Args {
    let mut api_sock = None;
    let mut id = "anonymous-instance".to_string();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        match a.as_str() {
            "--version" | "-V" => {
                println!(
                    "Firecracker v{VERSION} (fake-firecracker: a test stand-in, boots nothing)"
                );
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("fake-firecracker: a fake Firecracker v1.x API server for tests");
                std::process::exit(0);
            }
            "--no-seccomp" | "--show-level" | "--show-log-origin" | "--boot-timer" | "--no-api" => {
            }
            "--api-sock" => {
                api_sock = Some(PathBuf::from(
                    it.next()
                        .unwrap_or_else(|| usage_exit("--api-sock needs a value")),
                ))
            }
            "--id" => {
                id = it
                    .next()
                    .unwrap_or_else(|| usage_exit("--id needs a value"))
                    .to_string_lossy()
                    .into_owned()
            }
            "--level"
            | "--log-path"
            | "--metrics-path"
            | "--seccomp-filter"
            | "--config-file"
            | "--http-api-max-payload-size"
            | "--mmds-size-limit"
            | "--module"
            | "--parent-cpu-time-us"
            | "--start-time-us"
            | "--start-time-cpu-us" => {
                if it.next().is_none() {
                    usage_exit(&format!("{a} needs a value"));
                }
            }
            other => usage_exit(&format!("Found argument '{other}' which wasn't expected")),
        }
    }
    let api_sock = api_sock.unwrap_or_else(|| {
        usage_exit("--api-sock PATH is required (the fake never uses a default path)")
    });
    Args { api_sock, id }
}

fn bind_api(path: &Path) -> std::os::unix::net::UnixListener {
    // Firecracker refuses to start when the socket path exists; so does the fake.
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "[fake-firecracker] Error: FailedToBindSocket: failed to bind the API socket {}: {e}",
                path.display()
            );
            std::process::exit(1);
        }
    }
}

/// SIGTERM and SIGINT, held pending from start-up until the handlers exist: a signal sent as
/// soon as the socket accepts must still mean a clean exit, not the default death.
fn termination_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set
}

fn main() {
    let args = parse_args();
    termination_signals()
        .thread_block()
        .expect("block SIGTERM/SIGINT");
    let std_listener = bind_api(&args.api_sock);
    std_listener
        .set_nonblocking(true)
        .expect("nonblocking API socket");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(args, std_listener));
}

async fn serve(args: Args, std_listener: std::os::unix::net::UnixListener) {
    use tokio::signal::unix::{signal, SignalKind};

    let listener = UnixListener::from_std(std_listener).expect("tokio API socket");
    let vm: Shared = Arc::new(Mutex::new(Vm {
        id: args.id,
        api_sock: args.api_sock,
        phase: Phase::NotStarted,
        machine: MachineConfig::default(),
        boot: None,
        drives: Vec::new(),
        nets: Vec::new(),
        vsock: None,
        vsock_task: None,
        logger: None,
        metrics: None,
        agent: None,
        agent_sock: None,
    }));
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    termination_signals()
        .thread_unblock()
        .expect("unblock SIGTERM/SIGINT");
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let vm = vm.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, vm.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
    vm.stop_agent();
    vm.remove_vsock();
    let _ = std::fs::remove_file(&vm.api_sock);
    println!("[fake-firecracker] terminated by signal, sockets removed");
    std::process::exit(0);
}
