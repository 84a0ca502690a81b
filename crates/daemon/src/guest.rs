//! Talking to a VM's wick-agent: waiting for it at boot, configuring the guest, asking it to
//! power off, and opening raw agent connections for `POST /v1/vms/{vm}/agent`.
//!
//! The host side of vsock is the VMM's hybrid Unix socket (`CONNECT <port>\n` → `OK …\n`), the
//! same for Firecracker and for QEMU's vhost-device-vsock sidecar. wickd never opens AF_VSOCK.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use wick_agent_proto::{AgentClient, Configure, NetworkConfig, AGENT_PORT};
use wick_model::{VmRecord, VmmHandle};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// Opens a raw stream to `port` in the guest through the hybrid vsock socket.
pub async fn hybrid_connect(
    vsock: &std::path::Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream> {
    let fut = async {
        let mut s = UnixStream::connect(vsock).await?;
        s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
        // Read the reply byte by byte: nothing after the newline may be consumed.
        let mut line = Vec::new();
        let mut r = BufReader::with_capacity(1, &mut s);
        r.read_until(b'\n', &mut line).await?;
        Ok::<_, std::io::Error>((s, line))
    };
    let (s, line) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| {
            Error::new(
                wick_model::api::ErrorCode::NotRunning,
                "the guest agent did not answer in time",
            )
        })?
        .map_err(|e| {
            Error::new(
                wick_model::api::ErrorCode::NotRunning,
                format!("cannot reach the guest agent: {e}"),
            )
        })?;
    if !line.starts_with(b"OK ") {
        return Err(Error::new(
            wick_model::api::ErrorCode::NotRunning,
            "the guest agent is not listening (is wick-agent running in the guest?)",
        ));
    }
    Ok(s)
}

impl Daemon {
    /// Waits until the guest's agent answers, failing fast when the VMM reports a guest failure
    /// (e.g. QEMU's "KVM internal error") or exits, or the operation is cancelled.
    pub(crate) async fn wait_agent(&self, handle: &VmmHandle, op: &OpEntry) -> Result<AgentClient> {
        let deadline = Instant::now() + self.config.boot_timeout();
        let vsock = handle.vsock_socket.clone();
        let connect = AgentClient::connect(&vsock, AGENT_PORT, self.config.boot_timeout());
        tokio::pin!(connect);
        loop {
            tokio::select! {
                r = &mut connect => {
                    return r.map_err(|e| Error::precondition(format!(
                        "the guest agent did not come up within {:?}: {e}", self.config.boot_timeout()
                    )));
                }
                _ = op.cancel.cancelled() => return Err(Error::cancelled()),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Some(why) = self.vmm.guest_failure(handle) {
                        return Err(Error::precondition(format!("the guest failed to boot: {why}")));
                    }
                    if self.vmm.find(handle).is_none() {
                        return Err(Error::precondition("the VMM exited while the guest was booting"));
                    }
                    if Instant::now() > deadline {
                        return Err(Error::precondition("timed out waiting for the guest agent"));
                    }
                }
            }
        }
    }

    /// The boot-time configuration the agent applies: identity, network, keys, git, files;
    /// and one message per `[[file_sync]]` file refused.
    pub(crate) async fn guest_config(&self, vm: &VmRecord) -> (Configure, Vec<String>) {
        let network = match (vm.runtime.ip.as_deref(), self.config.network_settings()) {
            (Some(ip), Ok(n)) => {
                let prefix = n.bridge_cidr.rsplit('/').next().unwrap_or("24");
                Some(NetworkConfig {
                    ip_cidr: format!("{ip}/{prefix}"),
                    gateway: Some(n.bridge_ip.into()),
                    dns: vec![n.bridge_ip.into()],
                })
            }
            _ => None,
        };
        // Read with the owner's rights (see `filesync`), off the async workers.
        let sync = self.config.file_sync.clone();
        let owner = vm.owner;
        let (files, refused) =
            tokio::task::spawn_blocking(move || crate::filesync::read_files(&sync, owner))
                .await
                .unwrap_or_else(|e| (Vec::new(), vec![format!("file_sync: {e}")]));
        for why in &refused {
            tracing::warn!(vm = %vm.name, "{why}");
        }
        let cfg = Configure {
            hostname: Some(vm.name.clone()),
            network,
            authorized_keys: Some(vm.spec.ssh_keys.clone()),
            git_name: vm.spec.git_name.clone(),
            git_email: vm.spec.git_email.clone(),
            files,
            regenerate_host_keys: false,
        };
        (cfg, refused)
    }

    /// Asks the guest to sync and power off (best effort: the caller still stops the VMM).
    pub(crate) async fn shutdown_guest(&self, vm: &VmRecord) {
        let Some(h) = &vm.runtime.vmm else { return };
        if !vm.spec.agent {
            return;
        }
        let res = tokio::time::timeout(Duration::from_secs(5), async {
            let c =
                AgentClient::connect(&h.vsock_socket, AGENT_PORT, Duration::from_secs(2)).await?;
            c.shutdown(true).await
        })
        .await;
        match res {
            Ok(Ok(_)) => tracing::info!(vm = %vm.name, "guest powering off"),
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name, error = %e, "guest shutdown request failed")
            }
            Err(_) => tracing::warn!(vm = %vm.name, "guest shutdown request timed out"),
        }
    }
}
