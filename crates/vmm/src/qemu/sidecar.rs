//! The agent-channel sidecar (`wickd vsock-mux`, see [`super::mux`]): its socket, spawn, and
//! kill. Records of VMs started before it (the `vhost-device-vsock` sidecar, `vhu.sock`) are
//! killed the same way: by their recorded pid or the socket on their command line.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use wick_host::proc;
use wick_model::{Sidecar, VmmHandle};

use super::cmdline::sidecar_args;
use super::{Qemu, SIDECAR, SIDECAR_HOW};
use crate::common::{
    find_process, open_log, remove_vsock_sockets, trusted_start_time, vm_dir, with_tail,
};
use crate::{VmmConfig, VmmError};

impl Qemu {
    /// The sidecars of `handle`: the recorded ones, else the planned vsock sidecar (a record
    /// written before sidecars were recorded).
    pub(super) fn sidecars(&self, handle: &VmmHandle) -> Vec<Sidecar> {
        if handle.sidecars.is_empty() {
            vec![planned_sidecar(&handle.api_socket)]
        } else {
            handle.sidecars.clone()
        }
    }

    /// SIGKILLs every live sidecar of `handle` and waits (briefly) for each to go.
    pub(super) fn kill_sidecars(&self, handle: &VmmHandle) -> Result<(), VmmError> {
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

    /// Replaces the sidecar of a running QEMU (one that died, or any previous one): kills what
    /// is left of it, starts a new one and returns its record, for the caller to persist. The
    /// guest's agent sees the old host end close and serves the new sidecar's session.
    pub async fn respawn_sidecar(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Sidecar, VmmError> {
        self.kill_sidecars(handle)?;
        remove_vsock_sockets(&handle.vsock_socket);
        let (child, sidecar) = self
            .spawn_sidecar(handle, cfg, Instant::now() + timeout, timeout)
            .await?;
        // Dropping the Child leaves it running; tokio reaps it when it exits.
        drop(child);
        Ok(sidecar)
    }

    /// Spawns the sidecar (QEMU already serves the agent socket) and waits until it serves the
    /// VM's hybrid vsock socket.
    pub(super) async fn spawn_sidecar(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(tokio::process::Child, Sidecar), VmmError> {
        let socket = sidecar_socket(&handle.api_socket);
        let (out, err) = open_log(&handle.log_path)?;
        let (mut cmd, exe) = crate::confine::command(&self.sidecar_bin, cfg.jail.as_ref())?;
        cmd.args(sidecar_args(&socket, &handle.vsock_socket))
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
                        handle.vsock_socket.display()
                    ),
                    &handle.log_path,
                )));
            }
            if unix_listening(&handle.vsock_socket) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Timeout(
                    timeout,
                    with_tail(
                        format!("{SIDECAR} to listen on {}", handle.vsock_socket.display()),
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
}

/// QEMU's end of the agent channel, which the sidecar connects to: `agent.sock` in the VM dir.
pub(super) fn sidecar_socket(api_socket: &Path) -> PathBuf {
    vm_dir(api_socket).join("agent.sock")
}

pub(super) fn planned_sidecar(api_socket: &Path) -> Sidecar {
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
pub(super) fn unix_listening(path: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_seen_in_proc() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sock");
        assert!(!unix_listening(&p));
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(unix_listening(&p));
    }
}
