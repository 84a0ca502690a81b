//! Starting a VM: QEMU paused, ready once QMP answers, then the agent-channel sidecar.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use wick_host::proc;
use wick_model::VmmHandle;

use super::cmdline::{qemu_args, START_MARKER};
use super::qmp::Qmp;
use super::sidecar::sidecar_socket;
use super::{Engine, Qemu, QEMU_HOW};
use crate::common::{open_log, remove_if_exists, remove_vsock_sockets, vm_dir, with_tail};
use crate::{Spawned, Vmm, VmmConfig, VmmError};

impl Qemu {
    /// [`Vmm::spawn`]: resolves the engine (probing KVM for `accel = auto`, outside `timeout`),
    /// starts QEMU paused, then the sidecar (which connects to QEMU's agent socket); returns once
    /// QMP answers and the sidecar serves `vsock.sock`. On failure nothing is left running.
    pub(super) async fn spawn_paused(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        self.spawn_with(handle, cfg, timeout, false).await
    }

    /// [`Qemu::spawn_paused`], with `-incoming defer` when `incoming` (a restore).
    pub(super) async fn spawn_with(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
        incoming: bool,
    ) -> Result<Spawned, VmmError> {
        self.preflight()?;
        let engine = self.checked_engine(handle, cfg).await?;
        let deadline = Instant::now() + timeout;
        self.clear_stale(handle)?;

        let (mut log, _) = open_log(&handle.log_path)?;
        let _ = writeln!(log, "{START_MARKER} (accel {engine}) ===");
        if let Some(jail) = &cfg.jail {
            // QEMU appends the serial console to it itself.
            crate::confine::chown_to(&handle.log_path, jail)?;
        }

        let (mut child, pid, start_time) = self
            .spawn_qemu(handle, cfg, engine, incoming, deadline, timeout)
            .await?;
        match self.spawn_sidecar(handle, cfg, deadline, timeout).await {
            Ok((sidecar_child, sidecar)) => {
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
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
        }
    }

    /// The engine this VM runs on, refused when `require_kvm` and it is TCG.
    async fn checked_engine(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
    ) -> Result<Engine, VmmError> {
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
        Ok(engine)
    }

    /// Removes stale sockets and any previous sidecar of this VM.
    fn clear_stale(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        let agent = sidecar_socket(&handle.api_socket);
        for sock in [&handle.api_socket, &agent] {
            remove_if_exists(sock)
                .map_err(|e| VmmError::Spawn(format!("removing stale {}: {e}", sock.display())))?;
        }
        remove_vsock_sockets(&handle.vsock_socket);
        // A previous sidecar for this VM (e.g. a crash before its pid was recorded) holds the
        // vsock socket names: it must go first.
        self.kill_sidecars(handle)
    }

    /// Spawns QEMU (paused) and waits for its QMP handshake.
    async fn spawn_qemu(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        engine: Engine,
        incoming: bool,
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
        let agent = sidecar_socket(&handle.api_socket);
        let (mut cmd, exe) = crate::confine::command(&self.bin, cfg.jail.as_ref())?;
        cmd.args(qemu_args(handle, cfg, engine, &agent, tap_fd));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.stdin(Stdio::null())
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
        self.wait_for_qmp(&mut child, handle, deadline, timeout)
            .await?;
        if let Err(e) = crate::confine::joined(joining).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok((child, pid, start_time))
    }

    /// Waits until QEMU's QMP socket completes a handshake; kills it when it exits first or
    /// `deadline` passes.
    async fn wait_for_qmp(
        &self,
        child: &mut tokio::process::Child,
        handle: &VmmHandle,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), VmmError> {
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
                    Ok(_) => return Ok(()),
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
    }
}
