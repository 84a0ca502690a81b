//! The QEMU driver: `qemu-system-x86_64 -M microvm` with virtio-mmio disks and NIC (the same
//! guest-visible shape as Firecracker), vsock through a `vhost-device-vsock` sidecar that serves
//! Firecracker's hybrid vsock protocol on the VM's `vsock.sock`, and QMP for status and stop.
//! For hosts without Firecracker or without a KVM that can boot guests (`accel = auto` probes,
//! see [`accel`]).
//!
//! Files inside the VM dir: `qmp.sock` (QMP; its `-qmp` argument identifies QEMU in `/proc`),
//! `vhu.sock` (the sidecar's vhost-user socket; identifies the sidecar), `vsock.sock` (hybrid
//! vsock; guest-initiated connections to port N show up as `vsock.sock_N`), `vmm.log` (QEMU's
//! stderr, the sidecar's output and the serial console) and `accel-probe.log` (the last KVM
//! probe's console, when this VM ran one).
//!
//! QEMU takes the whole machine on its command line, so [`Vmm::spawn`] (which gets the
//! [`VmmConfig`]) starts the sidecar, then QEMU **paused** (`-S`), and returns once QMP answers;
//! [`Vmm::boot`] resumes the guest (`cont`) and waits for `query-status` to say `running`.

pub mod accel;
mod cmdline;
pub mod qmp;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use wick_host::proc;
use wick_model::api::{Check, CheckStatus};
use wick_model::{Sidecar, VmmHandle};

use crate::common::{
    bin_version, binary_check, check, find_process, is_executable, open_log, remove_if_exists,
    remove_vsock_sockets, resolve_bin, sigkill_and_wait, tail_lines, trusted_start_time, vm_dir,
    wait_gone, with_tail,
};
use crate::{Spawned, Vmm, VmmConfig, VmmError};
use accel::AccelVerdict;
use cmdline::{qemu_args, qmp_arg, sidecar_args, START_MARKER};
use qmp::Qmp;

/// Driver name as stored in VM specs.
pub const DRIVER: &str = "qemu";
/// Name of the vsock sidecar in [`VmmHandle::sidecars`].
pub const SIDECAR: &str = "vhost-device-vsock";

const QEMU_HOW: &str = "install QEMU (Debian 12: `apt-get install -t bookworm-backports \
                        qemu-system-x86`), or set `qemu_bin` in wick's config.toml to its full path";
const SIDECAR_HOW: &str = "install it with `cargo install --locked vhost-device-vsock`, or set \
                           `vhost_vsock_bin` in wick's config.toml to its full path";

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
    /// The vsock sidecar; default `vhost-device-vsock` on `PATH`, else in cargo's bin dir.
    pub vhost_vsock_bin: Option<PathBuf>,
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
            vhost_vsock_bin: None,
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

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h).join("bin"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cargo/bin"))
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
        let sidecar_bin = resolve_bin(
            opts.vhost_vsock_bin.as_deref(),
            SIDECAR,
            "vhost_vsock_bin",
            SIDECAR_HOW,
        )
        .ok()
        .or_else(|| {
            // Not on PATH (e.g. a root service's PATH): where `cargo install` put it.
            opts.vhost_vsock_bin
                .is_none()
                .then(|| cargo_bin_dir().map(|d| d.join(SIDECAR)))
                .flatten()
                .filter(|p| is_executable(p))
        })
        .unwrap_or_else(|| {
            opts.vhost_vsock_bin
                .clone()
                .unwrap_or_else(|| PathBuf::from(SIDECAR))
        });
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

    /// The vsock sidecar binary this driver runs.
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

    /// The sidecars of `handle`: the recorded ones, else the planned vsock sidecar (a record
    /// written before sidecars were recorded).
    fn sidecars(&self, handle: &VmmHandle) -> Vec<Sidecar> {
        if handle.sidecars.is_empty() {
            vec![planned_sidecar(&handle.api_socket)]
        } else {
            handle.sidecars.clone()
        }
    }

    /// SIGKILLs every live sidecar of `handle` and waits (briefly) for each to go.
    fn kill_sidecars(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        for s in self.sidecars(handle) {
            let Some(pid) = find_process(s.pid, s.start_time, s.socket.as_os_str()) else {
                continue;
            };
            let st = trusted_start_time(pid, s.pid, s.start_time);
            proc::signal(pid, st, Signal::SIGKILL).map_err(|e| {
                VmmError::Other(format!("cannot SIGKILL {} pid {pid}: {e}", s.name))
            })?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while proc::is_alive(pid, st) {
                if Instant::now() >= deadline {
                    return Err(VmmError::Timeout(
                        Duration::from_secs(2),
                        format!("{} pid {pid} to exit after SIGKILL", s.name),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// Spawns the sidecar and waits until its vhost-user socket listens.
    async fn spawn_sidecar(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(tokio::process::Child, Sidecar), VmmError> {
        let socket = sidecar_socket(&handle.api_socket);
        let (out, err) = open_log(&handle.log_path)?;
        let (mut cmd, exe) = crate::confine::command(&self.sidecar_bin, cfg.jail.as_ref())?;
        cmd.args(sidecar_args(&socket, &handle.vsock_socket, cfg.guest_cid))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Own process group: it must outlive a daemon crash like the VMM it serves.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(jail) = &cfg.jail {
            crate::confine::confine(&mut cmd, jail, &[])?;
        }
        let spawned = cmd.spawn();
        drop(exe);
        let mut child = spawned.map_err(|e| {
            VmmError::Spawn(format!(
                "running {}: {e}; {SIDECAR_HOW}",
                self.sidecar_bin.display()
            ))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Spawn(format!("{SIDECAR} has no pid")))?;
        let start_time = proc::start_time(pid);
        let joining = crate::confine::join_cgroup_in_background(pid, cfg.jail.as_ref());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmmError::Exited(with_tail(
                    format!(
                        "{SIDECAR} exited with {status} before listening on {}",
                        socket.display()
                    ),
                    &handle.log_path,
                )));
            }
            if unix_listening(&socket) && handle.vsock_socket.exists() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Timeout(
                    timeout,
                    with_tail(
                        format!("{SIDECAR} to listen on {}", socket.display()),
                        &handle.log_path,
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if let Err(e) = crate::confine::joined(joining).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok((
            child,
            Sidecar {
                name: SIDECAR.into(),
                socket,
                pid: Some(pid),
                start_time,
            },
        ))
    }

    /// Spawns QEMU (paused) and waits for its QMP handshake.
    async fn spawn_qemu(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        engine: Engine,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(tokio::process::Child, u32, u64), VmmError> {
        let (out, err) = open_log(&handle.log_path)?;
        // Confined, QEMU cannot open /dev/net/tun: it inherits the TAP (our copy closes when
        // `tap` drops, after the spawn).
        let tap = match (&cfg.jail, &cfg.tap) {
            (Some(_), Some(name)) => Some(crate::confine::open_tap(name)?),
            _ => None,
        };
        let tap_fd = tap.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let vhost = sidecar_socket(&handle.api_socket);
        let (mut cmd, exe) = crate::confine::command(&self.bin, cfg.jail.as_ref())?;
        cmd.args(qemu_args(handle, cfg, engine, &vhost, tap_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Own process group: a signal to the daemon's group (Ctrl+C, a killed service)
            // must not take the VMs down with it.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(jail) = &cfg.jail {
            crate::confine::confine(&mut cmd, jail, tap_fd.as_slice())?;
        }
        let spawned = cmd.spawn();
        drop((tap, exe));
        let mut child = spawned.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VmmError::BinaryNotFound(format!("{}: {e}; {QEMU_HOW}", self.bin.display()))
            } else {
                VmmError::Spawn(format!("running {}: {e}", self.bin.display()))
            }
        })?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Spawn("the QEMU process has no pid".into()))?;
        // Our unreaped child: its pid cannot be reused yet, so this reads the right process.
        let Some(start_time) = proc::start_time(pid) else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(VmmError::Spawn(format!(
                "cannot read /proc/{pid}/stat of the new QEMU"
            )));
        };
        let joining = crate::confine::join_cgroup_in_background(pid, cfg.jail.as_ref());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmmError::Exited(with_tail(
                    format!(
                        "{} exited with {status} before QMP was ready",
                        self.bin.display()
                    ),
                    &handle.log_path,
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::net::UnixStream::connect(&handle.api_socket)
                .await
                .is_ok()
            {
                match Qmp::connect(&handle.api_socket, left.max(Duration::from_millis(100))).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return Err(VmmError::Timeout(
                            timeout,
                            with_tail(format!("the QMP handshake ({e})"), &handle.log_path),
                        ));
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Timeout(
                    timeout,
                    with_tail(
                        format!("the QMP socket {}", handle.api_socket.display()),
                        &handle.log_path,
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if let Err(e) = crate::confine::joined(joining).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok((child, pid, start_time))
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
    /// The engine VMs will (likely) run on, if known without a probe.
    fn expected_engine(&self, kvm_exists: bool) -> Option<Engine> {
        match self.accel {
            Accel::Kvm => Some(Engine::Kvm),
            Accel::Tcg => Some(Engine::Tcg),
            Accel::Auto if !kvm_exists => Some(Engine::Tcg),
            Accel::Auto => self.cached_verdict().map(|v| v.engine),
        }
    }

    /// `wick doctor`'s isolation line: TCG is not a security boundary in QEMU's own security
    /// policy, so a guest under TCG is a warning.
    fn isolation_check(&self, kvm_exists: bool) -> Check {
        match self.expected_engine(kvm_exists) {
            Some(Engine::Tcg) => check(
                "isolation",
                CheckStatus::Warn,
                "guests run under TCG (emulation), which QEMU's security policy does not treat as \
                 a security boundary: a hostile guest exploiting a TCG bug gets the VMM's \
                 (unprivileged, confined) process"
                    .into(),
                Some(
                    "use hardware virtualization (KVM) for untrusted guests; `require_kvm = true` \
                      refuses to start a VM without it",
                ),
            ),
            Some(Engine::Kvm) => check(
                "isolation",
                CheckStatus::Pass,
                "guests run under KVM (hardware virtualization)".into(),
                None,
            ),
            None => check(
                "isolation",
                CheckStatus::Pass,
                "decided at the first start (KVM if the probe boots, else TCG, which is not a \
                 security boundary)"
                    .into(),
                None,
            ),
        }
    }
}

/// The sidecar's vhost-user socket: `vhu.sock` in the VM dir.
fn sidecar_socket(api_socket: &Path) -> PathBuf {
    vm_dir(api_socket).join("vhu.sock")
}

fn planned_sidecar(api_socket: &Path) -> Sidecar {
    Sidecar {
        name: SIDECAR.into(),
        socket: sidecar_socket(api_socket),
        pid: None,
        start_time: None,
    }
}

/// True when a listening Unix socket is bound at `path` (per `/proc/net/unix`: the `Flags`
/// column has `__SO_ACCEPTCON`). Unlike a test connection, this does not disturb a server that
/// takes one client at a time.
fn unix_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7..].join(" ") == want
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & ACCEPTCON != 0)
    })
}

/// A fatal line in the VMM log since the last start (`KVM internal error`, …), with the tail.
pub fn console_failure(log: &Path) -> Option<String> {
    let text = tail_lines(log, 4000);
    let since_start = match text.rfind(START_MARKER) {
        Some(i) => &text[i..],
        None => &text[..],
    };
    let line = since_start
        .lines()
        .find(|l| accel::KVM_FAILURES.iter().any(|f| l.contains(f)))?;
    Some(with_tail(
        format!(
            "the guest failed under KVM ({}); QEMU stays paused after this: use accel = \"tcg\" \
             (or \"auto\") on this host",
            line.trim()
        ),
        log,
    ))
}

/// A boot under KVM that shows no sign of the kernel (no `Linux version` since the last start
/// marker) and has not written to its console for `after`: on some hosts KVM neither fails nor
/// runs a stock guest (HOST-NOTES), so silence is the failure. A healthy KVM guest prints its
/// banner within milliseconds; an idle guest after boot is not judged (it printed the banner).
pub fn kvm_stall(log: &Path, after: Duration) -> Option<String> {
    let text = tail_lines(log, 4000);
    let since_start = &text[text.rfind(START_MARKER)?..];
    let marker = since_start.lines().next()?;
    if !marker.contains(&format!("(accel {})", Engine::Kvm))
        || since_start.contains("Linux version")
    {
        return None;
    }
    let idle = std::fs::metadata(log)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    (idle >= after).then(|| {
        with_tail(
            format!(
                "the guest made no progress under KVM in {}s (the kernel printed nothing): this \
                 host's KVM cannot run it; use accel = \"tcg\" (or \"auto\") on this host",
                idle.as_secs()
            ),
            log,
        )
    })
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
        self.preflight()?;
        let dir = vm_dir(&handle.api_socket);
        let engine = self
            .engine(&cfg.kernel, &dir.join("accel-probe.log"))
            .await?;
        if cfg.require_kvm && engine == Engine::Tcg {
            return Err(VmmError::Other(format!(
                "require_kvm = true, but this VM would run under TCG (accel {}: {}); TCG is not a \
                 security boundary in QEMU's security policy. Enable hardware virtualization \
                 (/dev/kvm) or set require_kvm = false in config.toml",
                self.accel,
                match self.cached_verdict() {
                    Some(v) => v.reason,
                    None => "configured".into(),
                }
            )));
        }

        let deadline = Instant::now() + timeout;
        let vhu = sidecar_socket(&handle.api_socket);
        for sock in [&handle.api_socket, &vhu] {
            remove_if_exists(sock)
                .map_err(|e| VmmError::Spawn(format!("removing stale {}: {e}", sock.display())))?;
        }
        remove_vsock_sockets(&handle.vsock_socket);
        // A previous sidecar for this VM (e.g. a crash before its pid was recorded) holds the
        // vsock socket names: it must go first.
        self.kill_sidecars(handle)?;

        let (mut log, _) = open_log(&handle.log_path)?;
        let _ = writeln!(log, "{START_MARKER} (accel {engine}) ===");
        if let Some(jail) = &cfg.jail {
            // QEMU appends the serial console to it itself.
            crate::confine::chown_to(&handle.log_path, jail)?;
        }

        let (mut sidecar_child, sidecar) =
            self.spawn_sidecar(handle, cfg, deadline, timeout).await?;
        match self
            .spawn_qemu(handle, cfg, engine, deadline, timeout)
            .await
        {
            Ok((child, pid, start_time)) => {
                tracing::debug!(pid, start_time, socket = %handle.api_socket.display(), %engine, "qemu ready");
                // Dropping the sidecar's Child leaves it running; tokio reaps it when it exits.
                drop(sidecar_child);
                Ok(Spawned {
                    pid,
                    start_time,
                    child: Some(child),
                    sidecars: vec![sidecar],
                    accel: engine.to_string(),
                })
            }
            Err(e) => {
                let _ = sidecar_child.start_kill();
                let _ = sidecar_child.wait().await;
                Err(e)
            }
        }
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
        let mut checks = vec![
            binary_check("qemu", &self.bin, QEMU_HOW),
            binary_check(SIDECAR, &self.sidecar_bin, SIDECAR_HOW),
        ];
        let kvm = Path::new("/dev/kvm");
        checks.push(if kvm.exists() {
            check("kvm", CheckStatus::Pass, "/dev/kvm exists".into(), None)
        } else {
            check(
                "kvm",
                if self.accel == Accel::Kvm {
                    CheckStatus::Fail
                } else {
                    CheckStatus::Warn
                },
                "/dev/kvm does not exist: guests run under TCG (emulation, several times slower)"
                    .into(),
                Some("enable virtualization (VT-x/AMD-V or nested) and load kvm_intel/kvm_amd"),
            )
        });
        checks.push(match self.accel {
            Accel::Kvm | Accel::Tcg => check(
                "accel",
                CheckStatus::Pass,
                format!("configured: {}", self.accel),
                None,
            ),
            Accel::Auto => match self.cached_verdict() {
                Some(v) => check(
                    "accel",
                    CheckStatus::Pass,
                    format!("auto → {} ({}; probed in {} ms)", v.engine, v.reason, v.probe_ms),
                    None,
                ),
                None => check(
                    "accel",
                    CheckStatus::Pass,
                    "auto: not probed yet (the first VM start boots its kernel under KVM to decide)"
                        .into(),
                    None,
                ),
            },
        });
        checks.push(self.isolation_check(kvm.exists()));
        checks
    }

    fn preflight(&self) -> Result<(), VmmError> {
        resolve_bin(Some(&self.bin), "qemu-system-x86_64", "qemu_bin", QEMU_HOW)?;
        resolve_bin(
            Some(&self.sidecar_bin),
            SIDECAR,
            "vhost_vsock_bin",
            SIDECAR_HOW,
        )?;
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
                name: "vhost-device-vsock".into(),
                socket: "/state/vms/abc/vhu.sock".into(),
                pid: None,
                start_time: None
            }]
        );
    }

    #[test]
    fn tcg_is_reported_as_no_security_boundary() {
        let q = Qemu::new(QemuOptions {
            accel: Accel::Tcg,
            ..QemuOptions::default()
        });
        let c = q.isolation_check(true);
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(
            c.detail.contains("not treat as a security boundary"),
            "{c:?}"
        );
        assert!(c.hint.unwrap().contains("require_kvm"));
        let doctor = q.doctor();
        assert!(doctor
            .iter()
            .any(|c| c.name == "isolation" && c.status == CheckStatus::Warn));
        let q = Qemu::new(QemuOptions {
            accel: Accel::Kvm,
            ..QemuOptions::default()
        });
        assert_eq!(q.isolation_check(true).status, CheckStatus::Pass);
        let auto = Qemu::new(QemuOptions::default());
        assert_eq!(
            auto.isolation_check(false).status,
            CheckStatus::Warn,
            "no /dev/kvm: TCG"
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
            vhost_vsock_bin: Some("/nonexistent/vdv".into()),
            ..QemuOptions::default()
        });
        let e = q.preflight().unwrap_err().to_string();
        assert!(
            e.contains("qemu_bin") && e.contains("/nonexistent/qemu"),
            "{e}"
        );
        let q = Qemu::new(QemuOptions {
            bin: Some("/bin/sh".into()),
            vhost_vsock_bin: Some("/nonexistent/vdv".into()),
            ..QemuOptions::default()
        });
        let e = q.preflight().unwrap_err().to_string();
        assert!(
            e.contains("cargo install --locked vhost-device-vsock"),
            "{e}"
        );
    }

    #[test]
    fn console_failures_count_only_since_the_last_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            format!("{START_MARKER} ===\nKVM internal error. Suberror: 1\nemulation failure\n"),
        )
        .unwrap();
        let msg = console_failure(&log).unwrap();
        assert!(
            msg.contains("KVM internal error") && msg.contains("tcg"),
            "{msg}"
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{START_MARKER} ===\n[    0.000000] Linux version 6.1").unwrap();
        assert_eq!(console_failure(&log), None);
        assert_eq!(console_failure(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_silent_kvm_boot_is_a_failure_a_silent_tcg_or_booted_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let now = Duration::ZERO;
        std::fs::write(&log, format!("{START_MARKER} (accel kvm) ===\n")).unwrap();
        let msg = kvm_stall(&log, now).unwrap();
        assert!(
            msg.contains("no progress under KVM") && msg.contains("tcg"),
            "{msg}"
        );
        // Not yet silent for long enough.
        assert_eq!(kvm_stall(&log, Duration::from_secs(3600)), None);
        std::fs::write(&log, format!("{START_MARKER} (accel tcg) ===\n")).unwrap();
        assert_eq!(kvm_stall(&log, now), None);
        std::fs::write(
            &log,
            format!("{START_MARKER} (accel kvm) ===\n[    0.000000] Linux version 6.1\n"),
        )
        .unwrap();
        assert_eq!(kvm_stall(&log, now), None);
        assert_eq!(kvm_stall(&dir.path().join("missing"), now), None);
    }

    #[test]
    fn listening_sockets_are_seen_in_proc() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sock");
        assert!(!unix_listening(&p));
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(unix_listening(&p));
    }
}
