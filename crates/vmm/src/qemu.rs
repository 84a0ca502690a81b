//! The QEMU driver: `qemu-system-x86_64 -M microvm` with virtio-mmio disks and NIC (the same
//! guest-visible shape as Firecracker), the agent channel on a virtio-serial port (migratable,
//! unlike vhost-user vsock) whose sidecar ([`mux`], `wickd vsock-mux`) serves Firecracker's hybrid
//! vsock protocol on the VM's `vsock.sock`, and QMP for status, stop and migration ([`qmp`]).
//! For hosts without Firecracker or without a KVM that can boot guests (`accel = auto` probes,
//! see [`accel`]).
//!
//! Files inside the VM dir: `qmp.sock` (QMP; its `-qmp` argument identifies QEMU in `/proc`),
//! `agent.sock` (QEMU's end of the agent port; the sidecar's `--chardev` argument identifies the
//! sidecar), `vsock.sock` (hybrid vsock, served by the sidecar), `vmm.log` (QEMU's stderr, the
//! sidecar's output and the serial console) and `accel-probe.log` (the last KVM probe's console,
//! when this VM ran one).
//!
//! QEMU takes the whole machine on its command line, so [`Vmm::spawn`] (which gets the
//! [`VmmConfig`]) starts QEMU **paused** (`-S`), then the sidecar, and returns once both answer;
//! [`Vmm::boot`] resumes the guest (`cont`) and waits for `query-status` to say `running`.

pub mod accel;
mod cmdline;
mod doctor;
mod failure;
pub mod migrate;
pub mod mux;
pub mod qmp;
mod sidecar;
mod spawn;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use wick_host::proc;
use wick_model::api::Check;
use wick_model::VmmHandle;

use crate::common::{
    bin_version, find_process, is_executable, remove_if_exists, remove_vsock_sockets, resolve_bin,
    sigkill_and_wait, trusted_start_time, wait_gone, with_tail,
};
use crate::{RunState, Spawned, Vmm, VmmConfig, VmmError};
use accel::AccelVerdict;
use cmdline::{qemu_args, qmp_arg};
pub use failure::{console_failure, kvm_stall};
use qmp::Qmp;
use sidecar::{planned_sidecar, sidecar_socket};

/// Driver name as stored in VM specs.
pub const DRIVER: &str = "qemu";
/// Name of the agent-channel sidecar in [`VmmHandle::sidecars`].
pub const SIDECAR: &str = "vsock-mux";

const QEMU_HOW: &str = "install QEMU (Debian 12: `apt-get install -t bookworm-backports \
                        qemu-system-x86`), or set `qemu_bin` in wick's config.toml to its full path";
const SIDECAR_HOW: &str = "the sidecar is wickd itself (`wickd vsock-mux`): reinstall wickd";

/// How a VM's CPU is run, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot shows that it can run the guest, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How a VM's CPU is run, decided: hardware virtualization or QEMU's emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Kvm => "kvm",
            Engine::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Accel, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "accel {other:?}: expected \"auto\", \"kvm\" or \"tcg\""
            )),
        }
    }
}

/// How to build a [`Qemu`] driver.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// QEMU binary (a path, or a name looked up on `PATH`); default `qemu-system-x86_64`.
    pub bin: Option<PathBuf>,
    pub accel: Accel,
    /// The program run as the agent-channel sidecar (`<bin> vsock-mux …`): wickd; default the
    /// running executable.
    pub sidecar_bin: Option<PathBuf>,
    /// Where `accel = auto` caches its verdict (e.g. `<state>/accel-probe.json`); `None` keeps
    /// it in memory only (one probe per driver instance).
    pub accel_cache: Option<PathBuf>,
    /// Upper bound of the KVM probe boot.
    pub probe_timeout: Duration,
}

impl Default for QemuOptions {
    fn default() -> QemuOptions {
        QemuOptions {
            bin: None,
            accel: Accel::Auto,
            sidecar_bin: None,
            accel_cache: None,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// The QEMU driver.
#[derive(Debug)]
pub struct Qemu {
    bin: PathBuf,
    sidecar_bin: PathBuf,
    accel: Accel,
    accel_cache: Option<PathBuf>,
    probe_timeout: Duration,
    /// The `auto` verdict once known; the lock also serializes concurrent probes.
    verdict: tokio::sync::Mutex<Option<AccelVerdict>>,
}

/// The running executable (wickd), also when it was replaced on disk since it started.
fn own_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => exe,
    }
}

impl Qemu {
    /// A driver with `opts`. Binaries are resolved now when possible; a missing one is
    /// reported by [`Vmm::preflight`] and [`Vmm::doctor`] with what to install.
    pub fn new(opts: QemuOptions) -> Qemu {
        let bin = resolve_bin(
            opts.bin.as_deref(),
            "qemu-system-x86_64",
            "qemu_bin",
            QEMU_HOW,
        )
        .unwrap_or_else(|_| {
            opts.bin
                .clone()
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
        });
        let sidecar_bin = opts.sidecar_bin.clone().unwrap_or_else(own_exe);
        Qemu {
            bin,
            sidecar_bin,
            accel: opts.accel,
            accel_cache: opts.accel_cache,
            probe_timeout: opts.probe_timeout,
            verdict: tokio::sync::Mutex::new(None),
        }
    }

    /// The QEMU binary this driver runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The binary this driver runs as the agent-channel sidecar.
    pub fn sidecar_bin(&self) -> &Path {
        &self.sidecar_bin
    }

    /// `qemu --version`, first line.
    pub fn version(&self) -> Result<String, String> {
        bin_version(&self.bin)
    }

    /// The engine VMs run on: the configured one, or for `auto` the cached verdict, probing
    /// with `kernel` (console to `probe_log`) when there is none for this QEMU and host.
    pub async fn engine(&self, kernel: &Path, probe_log: &Path) -> Result<Engine, VmmError> {
        match self.accel {
            Accel::Kvm => return Ok(Engine::Kvm),
            Accel::Tcg => return Ok(Engine::Tcg),
            Accel::Auto => {}
        }
        let key = accel::cache_key(&self.bin);
        let mut cached = self.verdict.lock().await;
        if let Some(v) = cached.as_ref().filter(|v| v.key == key) {
            return Ok(v.engine);
        }
        if let Some(v) = self
            .accel_cache
            .as_deref()
            .and_then(|f| accel::load(f, &key))
        {
            let engine = v.engine;
            *cached = Some(v);
            return Ok(engine);
        }
        let started = Instant::now();
        let (engine, reason) =
            accel::probe(&self.bin, kernel, probe_log, self.probe_timeout).await?;
        let v = AccelVerdict {
            engine,
            reason,
            key,
            kernel: kernel.to_path_buf(),
            probe_ms: started.elapsed().as_millis() as u64,
            probed_at: accel::now_secs(),
        };
        tracing::info!(engine = %v.engine, reason = %v.reason, ms = v.probe_ms, "qemu accel probe");
        if let Some(f) = &self.accel_cache {
            if let Err(e) = accel::store(f, &v) {
                tracing::warn!(path = %f.display(), error = %e, "cannot cache the accel verdict");
            }
        }
        *cached = Some(v);
        Ok(engine)
    }

    /// The cached `auto` verdict for this QEMU and host, if any (from memory or the cache file).
    pub fn cached_verdict(&self) -> Option<AccelVerdict> {
        let key = accel::cache_key(&self.bin);
        if let Ok(guard) = self.verdict.try_lock() {
            if let Some(v) = guard.as_ref().filter(|v| v.key == key) {
                return Some(v.clone());
            }
        }
        self.accel_cache
            .as_deref()
            .and_then(|f| accel::load(f, &key))
    }

    /// QEMU's full command line (arguments after the binary) for `cfg` on `engine`.
    pub fn command_line(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        engine: Engine,
    ) -> Vec<std::ffi::OsString> {
        qemu_args(
            handle,
            cfg,
            engine,
            &sidecar_socket(&handle.api_socket),
            None,
        )
    }

    /// One QMP command on the VM's QMP socket (connect, negotiate, run), bounded by `timeout`.
    pub async fn qmp(
        &self,
        handle: &VmmHandle,
        command: &str,
        arguments: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value, VmmError> {
        let run = async {
            let mut q = Qmp::connect(&handle.api_socket, timeout).await?;
            q.execute(command, arguments).await
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(VmmError::Timeout(timeout, format!("QMP {command}"))))
    }

    /// `query-status` of the VM: `prelaunch`, `running`, `paused`, `internal-error`, …
    pub async fn status(&self, handle: &VmmHandle, timeout: Duration) -> Result<String, VmmError> {
        let run = async {
            Qmp::connect(&handle.api_socket, timeout)
                .await?
                .status()
                .await
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(VmmError::Timeout(timeout, "QMP query-status".into())))
    }

    /// Graceful stop of QEMU `pid`: ACPI power button when the guest runs (waiting up to
    /// `timeout`), then QMP `quit`, then SIGKILL.
    async fn stop_qemu(
        &self,
        handle: &VmmHandle,
        pid: u32,
        start_time: Option<u64>,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let ask = Duration::from_secs(2);
        let powerdown = async {
            let mut q = Qmp::connect(&handle.api_socket, ask).await?;
            if q.status().await? != "running" {
                return Ok(false); // paused or never resumed: nobody to press the button for
            }
            q.execute("system_powerdown", None).await.map(|_| true)
        };
        let asked = matches!(tokio::time::timeout(ask, powerdown).await, Ok(Ok(true)));
        if asked && wait_gone(pid, start_time, timeout).await {
            return Ok(());
        }
        // The guest ignored the button (or microvm without ACPI): QEMU exits on `quit`,
        // flushing its block layer.
        let quit = async {
            let mut q = Qmp::connect(&handle.api_socket, ask).await?;
            q.execute("quit", None).await
        };
        let _ = tokio::time::timeout(ask, quit).await;
        if wait_gone(pid, start_time, ask).await {
            return Ok(());
        }
        sigkill_and_wait(pid, start_time, "QEMU").await
    }
}

impl Qemu {
    /// Connects to QMP and runs `f` on the session, all within `timeout` (`what` names it in
    /// the timeout error).
    async fn qmp_then<T, F, Fut>(
        &self,
        handle: &VmmHandle,
        timeout: Duration,
        what: &str,
        f: F,
    ) -> Result<T, VmmError>
    where
        F: FnOnce(Qmp) -> Fut,
        Fut: std::future::Future<Output = Result<T, VmmError>>,
    {
        let run = async {
            let q = Qmp::connect(&handle.api_socket, timeout).await?;
            f(q).await
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(VmmError::Timeout(timeout, format!("QMP {what}"))))
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn plan(&self, vm_dir: &Path) -> VmmHandle {
        let api_socket = vm_dir.join("qmp.sock");
        VmmHandle {
            driver: DRIVER.into(),
            sidecars: vec![planned_sidecar(&api_socket)],
            api_socket,
            vsock_socket: vm_dir.join("vsock.sock"),
            log_path: vm_dir.join("vmm.log"),
            pid: None,
            start_time: None,
        }
    }

    /// Resolves the engine (probing KVM for `accel = auto`, outside `timeout`), starts the vsock
    /// sidecar, then QEMU paused; returns once QMP answers. On failure nothing is left running.
    async fn spawn(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        self.spawn_paused(handle, cfg, timeout).await
    }

    /// Resumes the paused guest and waits for QMP `running`; fails fast on a KVM internal error
    /// in the log or a fatal run state.
    async fn boot(
        &self,
        handle: &VmmHandle,
        _cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let run = async {
            let mut q = Qmp::connect(&handle.api_socket, timeout).await?;
            let status = q.status().await?;
            if matches!(status.as_str(), "prelaunch" | "paused") {
                q.execute("cont", None).await?;
            }
            loop {
                if let Some(msg) = console_failure(&handle.log_path) {
                    return Err(VmmError::Exited(msg));
                }
                let status = q.status().await?;
                match status.as_str() {
                    "running" => return Ok(()),
                    "internal-error" | "guest-panicked" | "shutdown" | "io-error" => {
                        return Err(VmmError::Exited(with_tail(
                            format!("the guest stopped during boot (QEMU run state {status})"),
                            &handle.log_path,
                        )))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(VmmError::Api { call, message })) => Err(VmmError::Api {
                call,
                message: with_tail(message, &handle.log_path),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(VmmError::Timeout(
                timeout,
                with_tail("QEMU to report the guest running".into(), &handle.log_path),
            )),
        }
    }

    async fn stop(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        if let Some(pid) = self.find(handle) {
            let start_time = trusted_start_time(pid, handle.pid, handle.start_time);
            self.stop_qemu(handle, pid, start_time, timeout).await?;
        }
        // Sidecars after QEMU: they serve it until it is gone.
        self.kill_sidecars(handle)
    }

    /// QMP `stop`; `query-status` then says `paused`.
    async fn pause(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        self.qmp_then(handle, timeout, "stop", |mut q| async move {
            q.stop_vcpus().await
        })
        .await
    }

    /// QMP `cont`; a guest QEMU already runs is left alone.
    async fn resume(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError> {
        self.qmp_then(
            handle,
            timeout,
            "cont",
            |mut q| async move { q.cont().await },
        )
        .await
    }

    async fn save_state(
        &self,
        handle: &VmmHandle,
        dir: &Path,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Vec<PathBuf>, VmmError> {
        crate::snapshot::qemu_save(self, handle, dir, prefix, timeout).await
    }

    /// QEMU with `-incoming defer` and a new agent-channel sidecar ([`Qemu::spawn_incoming`]).
    async fn spawn_restore(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        self.spawn_incoming(handle, cfg, timeout).await
    }

    /// `migrate-incoming` from the one state file (`mapped-ram`, as saved), read through the
    /// hard link in the VM dir; the guest stays paused.
    async fn load_state(
        &self,
        handle: &VmmHandle,
        _cfg: &VmmConfig,
        files: &[PathBuf],
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let [file] = files else {
            return Err(VmmError::Other(format!(
                "a QEMU snapshot has one state file, not {}",
                files.len()
            )));
        };
        Qemu::load_state(self, handle, file, true, timeout)
            .await
            .map(drop)
    }

    /// QMP `query-status`: `running`, `paused`, or another run state verbatim.
    async fn run_state(&self, handle: &VmmHandle, timeout: Duration) -> Result<RunState, VmmError> {
        let status = self
            .qmp_then(handle, timeout, "query-status", |mut q| async move {
                q.status().await
            })
            .await?;
        Ok(match status.as_str() {
            "running" => RunState::Running,
            // Stopped vCPUs that `cont` starts again: also after a migration to a file (a
            // snapshot's save) that finished or was cut short by a crash of wickd.
            "paused" | "postmigrate" | "finish-migrate" | "save-vm" => RunState::Paused,
            _ => RunState::Other(status),
        })
    }

    fn kill(&self, handle: &VmmHandle, signal: Signal) -> Result<(), VmmError> {
        let Some(pid) = handle.pid else {
            return Err(VmmError::Other("no VMM pid is recorded for this VM".into()));
        };
        proc::signal(pid, handle.start_time, signal)
            .map(drop)
            .map_err(|e| VmmError::Other(format!("cannot send {signal} to QEMU pid {pid}: {e}")))
    }

    fn find(&self, handle: &VmmHandle) -> Option<u32> {
        find_process(handle.pid, handle.start_time, &qmp_arg(&handle.api_socket))
    }

    /// Kills the sidecars (QEMU is gone by now) and removes every socket. Idempotent.
    fn cleanup(&self, handle: &VmmHandle) {
        if let Err(e) = self.kill_sidecars(handle) {
            tracing::warn!(error = %e, "cannot stop the vsock sidecar");
        }
        let mut sockets = vec![handle.api_socket.clone()];
        sockets.extend(self.sidecars(handle).into_iter().map(|s| s.socket));
        for p in &sockets {
            if let Err(e) = remove_if_exists(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove VMM socket");
            }
        }
        remove_vsock_sockets(&handle.vsock_socket);
    }

    fn doctor(&self) -> Vec<Check> {
        self.checks()
    }

    fn preflight(&self) -> Result<(), VmmError> {
        resolve_bin(Some(&self.bin), "qemu-system-x86_64", "qemu_bin", QEMU_HOW)?;
        if !is_executable(&self.sidecar_bin) {
            return Err(VmmError::BinaryNotFound(format!(
                "{}: not an executable file; {SIDECAR_HOW}",
                self.sidecar_bin.display()
            )));
        }
        Ok(())
    }

    /// A fatal console line, or a KVM boot that stays silent for the probe timeout.
    fn guest_failure(&self, handle: &VmmHandle) -> Option<String> {
        console_failure(&handle.log_path)
            .or_else(|| kvm_stall(&handle.log_path, self.probe_timeout))
    }
}

#[cfg(test)]
mod tests {
    use wick_model::Sidecar;

    use super::*;

    #[test]
    fn plan_is_inside_the_vm_dir() {
        let q = Qemu::new(QemuOptions::default());
        let h = q.plan(Path::new("/state/vms/abc"));
        assert_eq!(h.driver, "qemu");
        assert_eq!(h.api_socket, Path::new("/state/vms/abc/qmp.sock"));
        assert_eq!(h.vsock_socket, Path::new("/state/vms/abc/vsock.sock"));
        assert_eq!(h.log_path, Path::new("/state/vms/abc/vmm.log"));
        assert_eq!(
            h.sidecars,
            vec![Sidecar {
                name: "vsock-mux".into(),
                socket: "/state/vms/abc/agent.sock".into(),
                pid: None,
                start_time: None
            }]
        );
    }

    #[test]
    fn accel_parses() {
        assert_eq!("auto".parse::<Accel>(), Ok(Accel::Auto));
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().unwrap_err().contains("tcg"));
        assert_eq!(Engine::Kvm.to_string(), "kvm");
    }

    #[test]
    fn preflight_says_what_to_install() {
        let q = Qemu::new(QemuOptions {
            bin: Some("/nonexistent/qemu".into()),
            sidecar_bin: Some("/nonexistent/wickd".into()),
            ..QemuOptions::default()
        });
        let e = q.preflight().unwrap_err().to_string();
        assert!(
            e.contains("qemu_bin") && e.contains("/nonexistent/qemu"),
            "{e}"
        );
        let q = Qemu::new(QemuOptions {
            bin: Some("/bin/sh".into()),
            sidecar_bin: Some("/nonexistent/wickd".into()),
            ..QemuOptions::default()
        });
        let e = q.preflight().unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/wickd") && e.contains("wickd vsock-mux"),
            "{e}"
        );
    }
}
