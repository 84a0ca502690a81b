//! The Firecracker driver: spawns `firecracker --api-sock <vm_dir>/fc.sock`, configures and boots
//! the guest over the API socket, stops it with Ctrl+Alt+Del then SIGKILL, and finds it again by
//! pid + start time or by its socket on a command line.
//!
//! Files inside the VM dir: `fc.sock` (API), `vsock.sock` (hybrid vsock; guest-initiated
//! connections to port N show up as `vsock.sock_N`), `vmm.log` (the process's stdout/stderr,
//! i.e. the serial console), `firecracker.log` (Firecracker's own logger) and `metrics.json`.

mod api;
pub mod request;
mod restore;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper::Method;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use wick_host::proc;
use wick_model::api::{Check, CheckStatus};
use wick_model::VmmHandle;

use crate::common::{
    bin_version, binary_check, check, find_process, is_executable, open_log, remove_if_exists,
    remove_vsock_sockets, resolve_bin, sigkill_and_wait, trusted_start_time, vm_dir, wait_gone,
    with_tail,
};
use crate::{RunState, Spawned, Vmm, VmmConfig, VmmError};

/// Driver name as stored in VM specs.
pub const DRIVER: &str = "firecracker";

/// The Firecracker driver. Cheap to clone; holds only the binary path.
#[derive(Debug, Clone)]
pub struct Firecracker {
    bin: PathBuf,
    /// Firecracker's `jailer`: when set, each VM's Firecracker runs through it (chroot, cgroup,
    /// uid drop) per [`crate::jailer::plan`].
    jailer: Option<PathBuf>,
}

impl Firecracker {
    /// A driver running `bin` (see [`Firecracker::resolve`]).
    pub fn new(bin: impl Into<PathBuf>) -> Firecracker {
        Firecracker {
            bin: bin.into(),
            jailer: None,
        }
    }

    /// Runs every VM's Firecracker through the `jailer` binary (needs a [`crate::Jail`] in the
    /// VM config, i.e. `contain_vmm`).
    pub fn with_jailer(mut self, jailer: Option<PathBuf>) -> Firecracker {
        self.jailer = jailer;
        self
    }

    /// The path Firecracker's API is given for the host file `host` (named `name` in the
    /// chroot when jailed).
    fn api_path(&self, host: &Path, name: &str) -> PathBuf {
        match self.jailer {
            Some(_) => crate::jailer::in_jail(name),
            None => host.to_path_buf(),
        }
    }

    /// The path a drive is given: in the jail when jailed, else relative to the VM dir (the
    /// process's working directory), so a snapshot names it relative to whichever VM loads it
    /// (see [`restore`]).
    fn drive_path(&self, handle: &VmmHandle, disk: &Path, id: &str) -> Result<PathBuf, VmmError> {
        match self.jailer {
            Some(_) => Ok(self.api_path(disk, id)),
            None => restore::drive_path(handle, disk, id),
        }
    }

    /// Whether VMs run through the jailer.
    pub fn jailed(&self) -> bool {
        self.jailer.is_some()
    }

    /// The binary this driver runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The Firecracker binary to use: `configured` (config `firecracker_bin`) when given, else
    /// `firecracker` on `PATH`.
    pub fn resolve(configured: Option<&Path>) -> Result<PathBuf, VmmError> {
        const HOW: &str = "install a Firecracker v1.x release binary (firecracker-microvm/firecracker \
                           releases on GitHub) on PATH, or set `firecracker_bin` in wick's config.toml \
                           to its full path";
        resolve_bin(configured, "firecracker", "firecracker_bin", HOW)
    }

    /// One raw API call (`method` is `GET`, `PUT`, `PATCH`): the JSON answer, or `None` for 204.
    /// Non-2xx answers are [`VmmError::Api`] with Firecracker's fault message.
    pub async fn api(
        &self,
        handle: &VmmHandle,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, VmmError> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| VmmError::Other(format!("bad HTTP method {method:?}")))?;
        api::call(&handle.api_socket, method, path, body.as_ref()).await
    }

    /// The instance state reported by `GET /`: `Not started`, `Running` or `Paused`.
    pub async fn instance_state(&self, handle: &VmmHandle) -> Result<String, VmmError> {
        let info = api::call(&handle.api_socket, Method::GET, "/", None).await?;
        info.as_ref()
            .and_then(|v| v.get("state"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| VmmError::Api {
                call: "GET /".into(),
                message: format!("answer has no \"state\": {info:?}"),
            })
    }

    /// Sends one typed runtime request ([`request::Action`]: pause/resume, snapshot create and
    /// load) and waits for its answer.
    pub async fn send(&self, handle: &VmmHandle, action: &request::Action) -> Result<(), VmmError> {
        let (method, path, body) = action.http();
        api::call(&handle.api_socket, method, path, Some(&body))
            .await
            .map(drop)
    }

    /// `PUT /snapshot/create`: the paused microVM's state and memory into files (paths as
    /// Firecracker sees them).
    pub async fn create_snapshot(
        &self,
        handle: &VmmHandle,
        req: request::SnapshotCreate,
    ) -> Result<(), VmmError> {
        self.send(handle, &request::Action::CreateSnapshot(req))
            .await
    }

    /// `PUT /snapshot/load`: a fresh Firecracker process (no boot configuration yet) becomes
    /// the snapshot's microVM, paused unless `resume_vm`.
    pub async fn load_snapshot(
        &self,
        handle: &VmmHandle,
        req: request::SnapshotLoad,
    ) -> Result<(), VmmError> {
        self.send(handle, &request::Action::LoadSnapshot(req)).await
    }

    /// `PATCH /vm` to `state`, bounded by `timeout`.
    async fn set_state(
        &self,
        handle: &VmmHandle,
        state: request::VmState,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let action = request::Action::SetState(state);
        tokio::time::timeout(timeout, self.send(handle, &action))
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout(
                    timeout,
                    format!("Firecracker to answer PATCH /vm {state:?}"),
                ))
            })
    }

    /// `bin --version`, first line (bounded to a few seconds).
    pub fn version(&self) -> Result<String, String> {
        bin_version(&self.bin)
    }
}

/// Firecracker's `--id`: alphanumerics and `-`, at most 64 characters.
fn instance_id(handle: &VmmHandle) -> String {
    let raw = vm_dir(&handle.api_socket)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    if id.is_empty() {
        "wick".into()
    } else {
        id
    }
}

/// Creates `p` if missing (Firecracker's logger and metrics need an existing file), owned by
/// the VM's uid when the VMM is confined.
fn touch(p: &Path, cfg: &VmmConfig) -> Result<(), VmmError> {
    crate::log::open_regular(std::fs::OpenOptions::new().create(true).append(true), p)
        .map(drop)
        .map_err(|e| VmmError::Other(format!("cannot create {}: {e}", p.display())))?;
    match &cfg.jail {
        Some(jail) => crate::confine::chown_to(p, jail),
        None => Ok(()),
    }
}

/// The last lines of the VMM log, for error messages (see [`crate::common::log_tail`]).
pub use crate::common::log_tail;

impl Firecracker {
    /// Lays out the chroot of [`crate::jailer::plan`] (hard links of the boot files and disks,
    /// the log files, all reachable by the jail's uid) and returns the jailer's command. The
    /// jailer joins the cgroup and drops to the uid itself.
    fn jailer_command(
        &self,
        jailer: &Path,
        handle: &VmmHandle,
        cfg: &VmmConfig,
    ) -> Result<tokio::process::Command, VmmError> {
        let jail = cfg.jail.as_ref().ok_or_else(|| {
            VmmError::Spawn("jailer_bin needs contained VMMs (contain_vmm = true)".into())
        })?;
        let plan = crate::jailer::plan(&self.bin, &vm_dir(&handle.log_path), cfg, jail);
        let err = |what: String, e: std::io::Error| VmmError::Spawn(format!("{what}: {e}"));
        std::fs::create_dir_all(&plan.root)
            .map_err(|e| err(format!("creating {}", plan.root.display()), e))?;
        for f in &plan.files {
            let dst = plan.root.join(&f.name);
            remove_if_exists(&dst).map_err(|e| err(format!("removing {}", dst.display()), e))?;
            std::fs::hard_link(&f.src, &dst).map_err(|e| {
                err(
                    format!(
                        "linking {} into the jail (same filesystem needed)",
                        f.src.display()
                    ),
                    e,
                )
            })?;
        }
        for name in ["firecracker.log", "metrics.json"] {
            touch(&plan.root.join(name), cfg)?;
        }
        crate::confine::chown_to(&plan.root, jail)?;
        let mut cmd = tokio::process::Command::new(jailer);
        cmd.args(&plan.args);
        Ok(cmd)
    }

    /// Firecracker's command: under the jailer, or confined by wick itself. The second value
    /// keeps the executable open until the spawn (see [`crate::confine::command`]).
    fn command(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
    ) -> Result<(tokio::process::Command, Option<std::fs::File>), VmmError> {
        Ok(match &self.jailer {
            Some(jailer) => (self.jailer_command(jailer, handle, cfg)?, None),
            None => {
                let (mut cmd, exe) = crate::confine::command(&self.bin, cfg.jail.as_ref())?;
                cmd.arg("--api-sock")
                    .arg(&handle.api_socket)
                    .arg("--id")
                    .arg(instance_id(handle))
                    // Drive paths are relative to the VM dir (see `restore`).
                    .current_dir(vm_dir(&handle.api_socket));
                if let Some(jail) = &cfg.jail {
                    crate::confine::confine(&mut cmd, jail, &[])?;
                }
                (cmd, exe)
            }
        })
    }

    /// Waits until the API socket accepts a connection; kills Firecracker when it exits first
    /// or `timeout` passes.
    async fn wait_for_api(
        &self,
        child: &mut tokio::process::Child,
        handle: &VmmHandle,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmmError::Exited(with_tail(
                    format!(
                        "{} exited with {status} before its API socket was ready",
                        self.bin.display()
                    ),
                    &handle.log_path,
                )));
            }
            if tokio::net::UnixStream::connect(&handle.api_socket)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Timeout(
                    timeout,
                    with_tail(
                        format!("the Firecracker API socket {}", handle.api_socket.display()),
                        &handle.log_path,
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn put(&self, handle: &VmmHandle, path: &str, body: Value) -> Result<(), VmmError> {
        api::call(&handle.api_socket, Method::PUT, path, Some(&body))
            .await
            .map(drop)
    }

    /// Configures the machine through the API, in Firecracker's order, and starts it.
    async fn configure_and_start(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
    ) -> Result<(), VmmError> {
        self.configure_logging(handle, cfg).await?;
        self.configure_machine(handle, cfg).await?;
        self.configure_drives(handle, cfg).await?;
        self.configure_devices(handle, cfg).await?;
        self.put(
            handle,
            "/actions",
            json!({ "action_type": "InstanceStart" }),
        )
        .await
    }

    /// `/logger` and `/metrics`, into files in the VM dir.
    async fn configure_logging(&self, handle: &VmmHandle, cfg: &VmmConfig) -> Result<(), VmmError> {
        let dir = vm_dir(&handle.api_socket);
        let fc_log = dir.join("firecracker.log");
        touch(&fc_log, cfg)?;
        self.put(
            handle,
            "/logger",
            json!({ "log_path": self.api_path(&fc_log, "firecracker.log"), "level": "Info", "show_level": true, "show_log_origin": false }),
        )
        .await?;

        let metrics = dir.join("metrics.json");
        touch(&metrics, cfg)?;
        self.put(
            handle,
            "/metrics",
            json!({ "metrics_path": self.api_path(&metrics, "metrics.json") }),
        )
        .await?;
        Ok(())
    }

    /// `/machine-config` and `/boot-source`.
    async fn configure_machine(&self, handle: &VmmHandle, cfg: &VmmConfig) -> Result<(), VmmError> {
        self.put(
            handle,
            "/machine-config",
            json!({ "vcpu_count": cfg.vcpu, "mem_size_mib": cfg.memory_mib, "smt": false }),
        )
        .await?;

        let kernel = self.api_path(&cfg.kernel, "vmlinux");
        let mut boot = json!({ "kernel_image_path": kernel, "boot_args": cfg.boot_args });
        if let Some(initrd) = &cfg.initrd {
            boot["initrd_path"] = json!(self.api_path(initrd, "initrd"));
        }
        self.put(handle, "/boot-source", boot).await?;
        Ok(())
    }

    /// The root disk, then the extra disks as `disk1`, `disk2`, …
    async fn configure_drives(&self, handle: &VmmHandle, cfg: &VmmConfig) -> Result<(), VmmError> {
        self.put(
            handle,
            "/drives/rootfs",
            json!({ "drive_id": "rootfs", "path_on_host": self.drive_path(handle, &cfg.root_disk, "rootfs")?, "is_root_device": true, "is_read_only": false }),
        )
        .await?;
        for (i, disk) in cfg.extra_disks.iter().enumerate() {
            let id = format!("disk{}", i + 1);
            self.put(
                handle,
                &format!("/drives/{id}"),
                json!({ "drive_id": id, "path_on_host": self.drive_path(handle, disk, &id)?, "is_root_device": false, "is_read_only": false }),
            )
            .await?;
        }
        Ok(())
    }

    /// The network interface (when the VM has a TAP) and the vsock device.
    async fn configure_devices(&self, handle: &VmmHandle, cfg: &VmmConfig) -> Result<(), VmmError> {
        if let Some(tap) = &cfg.tap {
            let mut net = json!({ "iface_id": "eth0", "host_dev_name": tap });
            if let Some(mac) = &cfg.guest_mac {
                net["guest_mac"] = json!(mac);
            }
            self.put(handle, "/network-interfaces/eth0", net).await?;
        }

        // Firecracker binds the vsock UDS on this call and fails if the file exists.
        remove_if_exists(&handle.vsock_socket).map_err(|e| {
            VmmError::Other(format!(
                "cannot remove stale {}: {e}",
                handle.vsock_socket.display()
            ))
        })?;
        self.put(
            handle,
            "/vsock",
            json!({ "guest_cid": cfg.guest_cid, "uds_path": self.api_path(&handle.vsock_socket, "vsock.sock") }),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Vmm for Firecracker {
    fn name(&self) -> &'static str {
        DRIVER
    }

    /// Jailed, the sockets are in the chroot ([`crate::jailer::jail_dir`]); the log stays in
    /// the VM dir.
    fn plan(&self, vm_dir: &Path) -> VmmHandle {
        let sockets = match self.jailer {
            Some(_) => crate::jailer::jail_dir(vm_dir, &self.bin).join("root"),
            None => vm_dir.to_path_buf(),
        };
        VmmHandle {
            driver: DRIVER.into(),
            api_socket: sockets.join("fc.sock"),
            vsock_socket: sockets.join("vsock.sock"),
            log_path: vm_dir.join("vmm.log"),
            pid: None,
            start_time: None,
            sidecars: Vec::new(),
        }
    }

    /// Firecracker is configured through its API in [`Vmm::boot`]; from `cfg` only the jail
    /// matters here: with one, Firecracker starts in the VM's cgroup as the VM's uid.
    async fn spawn(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        let spawn_err = |what: &str, e: std::io::Error| VmmError::Spawn(format!("{what}: {e}"));
        for sock in [&handle.api_socket, &handle.vsock_socket] {
            remove_if_exists(sock)
                .map_err(|e| spawn_err(&format!("removing stale {}", sock.display()), e))?;
        }
        let (log, log_err) = open_log(&handle.log_path)?;
        let (mut cmd, exe) = self.command(handle, cfg)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Own process group: a signal to the daemon's group (Ctrl+C, a killed service)
            // must not take the VMs down with it.
            .process_group(0)
            .kill_on_drop(false);
        let spawned = cmd.spawn();
        drop(exe);
        let mut child = spawned.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VmmError::BinaryNotFound(format!(
                    "{}: {e}; install Firecracker or set `firecracker_bin` in config.toml",
                    self.bin.display()
                ))
            } else {
                spawn_err(&format!("running {}", self.bin.display()), e)
            }
        })?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Spawn("the VMM process has no pid".into()))?;
        // Our unreaped child: its pid cannot be reused yet, so this reads the right process.
        let Some(start_time) = proc::start_time(pid) else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(VmmError::Spawn(format!(
                "cannot read /proc/{pid}/stat of the new VMM"
            )));
        };
        // Into the cgroup while Firecracker starts (the jailer does it itself).
        let joining = match self.jailer {
            Some(_) => None,
            None => crate::confine::join_cgroup_in_background(pid, cfg.jail.as_ref()),
        };

        self.wait_for_api(&mut child, handle, timeout).await?;
        if let Err(e) = crate::confine::joined(joining).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        tracing::debug!(pid, start_time, socket = %handle.api_socket.display(), "firecracker ready");
        Ok(Spawned {
            pid,
            start_time,
            child: Some(child),
            sidecars: Vec::new(),
            accel: "kvm".into(),
        })
    }

    async fn boot(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        match tokio::time::timeout(timeout, self.configure_and_start(handle, cfg)).await {
            Ok(r) => r,
            Err(_) => Err(VmmError::Timeout(
                timeout,
                "the Firecracker API to configure and boot the guest".into(),
            )),
        }
    }

    async fn stop(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        let Some(pid) = self.find(handle) else {
            return Ok(());
        };
        let start_time = trusted_start_time(pid, handle.pid, handle.start_time);

        // Graceful: the guest sees Ctrl+Alt+Del and powers off; Firecracker then exits. Only
        // worth waiting for if Firecracker accepted the request (not before boot, not when the
        // socket is gone).
        let ctrl_alt_del = json!({ "action_type": "SendCtrlAltDel" });
        let ask = api::call(
            &handle.api_socket,
            Method::PUT,
            "/actions",
            Some(&ctrl_alt_del),
        );
        let asked = matches!(
            tokio::time::timeout(timeout.min(Duration::from_secs(2)), ask).await,
            Ok(Ok(_))
        );
        if asked && wait_gone(pid, start_time, timeout).await {
            return Ok(());
        }

        sigkill_and_wait(pid, start_time, "VMM").await
    }

    async fn pause(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        self.set_state(handle, request::VmState::Paused, timeout)
            .await
    }

    async fn resume(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        self.set_state(handle, request::VmState::Resumed, timeout)
            .await
    }

    async fn save_state(
        &self,
        handle: &VmmHandle,
        dir: &Path,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Vec<PathBuf>, VmmError> {
        crate::snapshot::firecracker_save(self, handle, dir, prefix, timeout).await
    }

    /// Firecracker's API up, nothing configured: a load must come first.
    async fn spawn_restore(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        self.spawn(handle, cfg, timeout).await
    }

    /// `PUT /snapshot/load` (see [`restore`]).
    async fn load_state(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        files: &[PathBuf],
        timeout: Duration,
    ) -> Result<(), VmmError> {
        self.load_files(handle, cfg, files, timeout).await
    }

    /// `GET /`'s `state`: `Running`, `Paused` (or `Not started`).
    async fn run_state(&self, handle: &VmmHandle, timeout: Duration) -> Result<RunState, VmmError> {
        let state = tokio::time::timeout(timeout, self.instance_state(handle))
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout(
                    timeout,
                    "Firecracker to answer GET /".into(),
                ))
            })?;
        Ok(match state.as_str() {
            "Running" => RunState::Running,
            "Paused" => RunState::Paused,
            _ => RunState::Other(state),
        })
    }

    fn kill(&self, handle: &VmmHandle, signal: Signal) -> Result<(), VmmError> {
        let Some(pid) = handle.pid else {
            return Err(VmmError::Other("no VMM pid is recorded for this VM".into()));
        };
        proc::signal(pid, handle.start_time, signal)
            .map(drop)
            .map_err(|e| VmmError::Other(format!("cannot send {signal} to VMM pid {pid}: {e}")))
    }

    fn find(&self, handle: &VmmHandle) -> Option<u32> {
        match self.jailer {
            // A jailed Firecracker's command line carries `--id vm-<12 hex>`, not host paths.
            Some(_) => {
                let id = crate::jailer::jail_id(&vm_dir(&handle.log_path));
                find_process(handle.pid, handle.start_time, std::ffi::OsStr::new(&id))
            }
            None => find_process(handle.pid, handle.start_time, handle.api_socket.as_os_str()),
        }
    }

    fn cleanup(&self, handle: &VmmHandle) {
        if let Err(e) = remove_if_exists(&handle.api_socket) {
            tracing::warn!(path = %handle.api_socket.display(), error = %e, "cannot remove VMM socket");
        }
        remove_vsock_sockets(&handle.vsock_socket);
        if self.jailer.is_some() {
            let dir = crate::jailer::jail_dir(&vm_dir(&handle.log_path), &self.bin);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove the jail")
                }
                _ => {}
            }
        }
    }

    /// The binary must be an executable file. `/dev/kvm` is left to [`Vmm::doctor`] and to
    /// Firecracker's own error: the fake Firecracker used in tests needs no KVM.
    fn preflight(&self) -> Result<(), VmmError> {
        if is_executable(&self.bin) {
            Ok(())
        } else {
            Err(VmmError::BinaryNotFound(format!(
                "{} is not an executable file; install a Firecracker v1.x release binary on PATH, \
                 or set `firecracker_bin` in config.toml",
                self.bin.display()
            )))
        }
    }

    fn doctor(&self) -> Vec<Check> {
        let mut checks = vec![binary_check(
            "firecracker",
            &self.bin,
            "install a Firecracker v1.x release binary on PATH, or set `firecracker_bin` in config.toml",
        )];
        let kvm = Path::new("/dev/kvm");
        if !kvm.exists() {
            checks.push(check(
                "kvm",
                CheckStatus::Fail,
                "/dev/kvm does not exist".into(),
                Some("enable virtualization (VT-x/AMD-V, or nested virtualization) and load kvm_intel or kvm_amd"),
            ));
        } else {
            match std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
                Ok(_) => checks.push(check(
                    "kvm",
                    CheckStatus::Pass,
                    "/dev/kvm is read-write".into(),
                    None,
                )),
                Err(e) => checks.push(check(
                    "kvm",
                    CheckStatus::Fail,
                    format!("cannot open /dev/kvm read-write: {e}"),
                    Some("run wickd as root, or give its user access to /dev/kvm (group kvm)"),
                )),
            }
        }
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_inside_the_vm_dir() {
        let fc = Firecracker::new("/nonexistent/firecracker");
        let h = fc.plan(Path::new("/state/vms/abc123"));
        assert_eq!(h.driver, "firecracker");
        assert_eq!(h.api_socket, Path::new("/state/vms/abc123/fc.sock"));
        assert_eq!(h.vsock_socket, Path::new("/state/vms/abc123/vsock.sock"));
        assert_eq!(h.log_path, Path::new("/state/vms/abc123/vmm.log"));
        assert_eq!(h.pid, None);
        assert_eq!(instance_id(&h), "abc123");
    }

    #[test]
    fn jailed_plan_puts_the_sockets_in_the_chroot_and_the_api_sees_jail_paths() {
        let fc =
            Firecracker::new("/usr/bin/firecracker").with_jailer(Some("/usr/bin/jailer".into()));
        let h = fc.plan(Path::new("/state/vms/0123456789abcdef"));
        let root = Path::new("/state/jail/firecracker/vm-0123456789ab/root");
        assert_eq!(h.api_socket, root.join("fc.sock"));
        assert_eq!(h.vsock_socket, root.join("vsock.sock"));
        assert_eq!(h.log_path, Path::new("/state/vms/0123456789abcdef/vmm.log"));
        assert_eq!(
            fc.api_path(Path::new("/state/vms/x/rootfs.ext4"), "rootfs"),
            Path::new("/rootfs")
        );
        assert_eq!(
            Firecracker::new("fc").api_path(Path::new("/a/b"), "b"),
            Path::new("/a/b"),
            "unjailed: host paths"
        );
    }

    #[test]
    fn instance_id_is_sanitized() {
        let fc = Firecracker::new("fc");
        let h = fc.plan(Path::new("/x/a.b_c d"));
        assert_eq!(instance_id(&h), "abcd");
        let h = fc.plan(Path::new("/"));
        assert_eq!(instance_id(&h), "wick");
    }

    #[test]
    fn resolve_explains_how_to_fix() {
        let e = Firecracker::resolve(Some(Path::new("/nonexistent/firecracker"))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("firecracker_bin"), "{msg}");
        assert!(msg.contains("/nonexistent/firecracker"), "{msg}");
        let sh = Firecracker::resolve(Some(Path::new("sh"))).unwrap();
        assert!(sh.is_absolute());
    }

    #[test]
    fn preflight_checks_the_binary() {
        let e = Firecracker::new("/nonexistent/firecracker")
            .preflight()
            .unwrap_err();
        assert!(e.to_string().contains("firecracker_bin"), "{e}");
        Firecracker::new("/bin/sh").preflight().unwrap();
    }
}
