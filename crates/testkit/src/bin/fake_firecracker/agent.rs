//! The fake guest's agent (`FAKE_FC_AGENT_BIN`): started with the instance, killed and reaped
//! on every exit path.

use std::path::Path;

use crate::request::{fault, Reply};
use crate::vm::Vm;

/// The guest port wick-agent listens on (`wick_agent_proto::AGENT_PORT`).
pub const AGENT_PORT: u32 = 10700;
/// Names the wick-agent binary to run as the fake guest's agent.
const AGENT_BIN_ENV: &str = "FAKE_FC_AGENT_BIN";

impl Vm {
    /// Starts the fake guest's agent when `FAKE_FC_AGENT_BIN` is set and a vsock exists.
    pub fn start_agent(&mut self) -> Result<(), Reply> {
        self.start_agent_in(None)
    }

    /// [`Vm::start_agent`] on the guest root `root` (a restored snapshot's), else on
    /// `guest-root` beside the vsock socket.
    pub fn start_agent_in(&mut self, root: Option<&Path>) -> Result<(), Reply> {
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
        let root = root.map_or_else(|| dir.join("guest-root"), Path::to_path_buf);
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
                // Its own process group: while it is stopped (a paused guest), the fake's group
                // must not count as an orphaned group with a stopped member when wickd dies
                // (the kernel would SIGHUP it).
                if libc::setpgid(0, 0) != 0 {
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
        self.agent_root = Some(root);
        Ok(())
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the fake guest's agent, by pid: a paused guest
    /// runs nothing.
    pub fn freeze_agent(&self, frozen: bool) {
        if let Some(c) = &self.agent {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our own child's pid (not reaped while `self.agent` holds it).
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Kills (by pid) and reaps the fake guest's agent, if any.
    pub fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = self.agent_sock.take() {
            let _ = std::fs::remove_file(s);
        }
    }
}
