//! The `ports` capability: `--publish [HOST_IP:]HOST_PORT:GUEST_PORT`. wickd itself listens on
//! the host address and forwards each TCP connection to the guest's port (no firewall rules:
//! nothing outlives the daemon process, and the listeners are rebuilt from the VM specs at
//! start, so there is nothing to leak or sweep).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wick_model::api::{Check, CheckStatus};
use wick_model::{PortMapping, VmRecord, VmSpec};

use crate::capability::{Capability, HookCtx};
use crate::error::{Error, Result};

/// Live forwarders by (VM id, host port).
#[derive(Default)]
pub struct Ports {
    live: Mutex<HashMap<(String, u16), CancellationToken>>,
}

impl Ports {
    fn guest_ip(vm: &VmRecord) -> Option<IpAddr> {
        vm.runtime.ip.as_deref().and_then(|s| s.parse().ok())
    }

    async fn open(&self, vm: &VmRecord, m: &PortMapping) -> Result<()> {
        let key = (vm.id.clone(), m.host_port);
        if self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key)
        {
            return Ok(());
        }
        let guest = Self::guest_ip(vm).ok_or_else(|| {
            Error::precondition(format!("VM {} has no address to publish ports to", vm.name))
        })?;
        let ip: IpAddr = m
            .host_ip
            .parse()
            .map_err(|_| Error::invalid(format!("bad host IP {}", m.host_ip)))?;
        let listener = TcpListener::bind(SocketAddr::new(ip, m.host_port))
            .await
            .map_err(|e| {
                Error::conflict(format!(
                    "cannot listen on {}:{} for VM {}: {e}",
                    m.host_ip, m.host_port, vm.name
                ))
            })?;
        let token = CancellationToken::new();
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, token.clone());
        let target = SocketAddr::new(guest, m.guest_port);
        let name = vm.name.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    // Cancellation first: a connection queued before this task ran again must
                    // not be served once the mapping is gone (`select!` picks randomly).
                    biased;
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(vm = %name, error = %e, "publish: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(Ok(mut guest)) =
                        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
                            .await
                    else {
                        return; // the client sees the connection close
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut guest) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        tracing::info!(vm = %vm.name, mapping = %m, "publishing port");
        Ok(())
    }

    fn close(&self, vm_id: &str, host_port: Option<u16>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(id, port), token| {
            let hit = id == vm_id && host_port.is_none_or(|p| p == *port);
            if hit {
                token.cancel();
            }
            !hit
        });
    }
}

#[async_trait]
impl Capability for Ports {
    fn name(&self) -> &'static str {
        "ports"
    }

    async fn post_start(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        for m in cx.vm.spec.publish.clone() {
            self.open(cx.vm, &m).await?;
        }
        Ok(())
    }

    async fn cleanup(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        self.close(&cx.vm.id, None);
        Ok(())
    }

    async fn apply_config_change(&self, cx: &mut HookCtx<'_>, old: &VmSpec) -> Result<()> {
        if !cx.vm.state.guest_up() {
            return Ok(());
        }
        for m in &old.publish {
            if !cx.vm.spec.publish.contains(m) {
                self.close(&cx.vm.id, Some(m.host_port));
            }
        }
        for m in cx.vm.spec.publish.clone() {
            if !old.publish.contains(&m) {
                self.open(cx.vm, &m).await?;
            }
        }
        Ok(())
    }

    async fn started(&self, vms: &[VmRecord]) -> Result<()> {
        for vm in vms.iter().filter(|v| v.state.guest_up()) {
            for m in &vm.spec.publish {
                if let Err(e) = self.open(vm, m).await {
                    tracing::error!(vm = %vm.name, error = %e, "publish not restored");
                }
            }
        }
        Ok(())
    }

    async fn doctor(&self, vms: &[VmRecord]) -> Vec<Check> {
        let want: usize = vms
            .iter()
            .filter(|v| v.state.guest_up())
            .map(|v| v.spec.publish.len())
            .sum();
        let have = self.live.lock().unwrap_or_else(|e| e.into_inner()).len();
        vec![Check {
            area: "ports".into(),
            name: "published ports".into(),
            status: if have >= want {
                CheckStatus::Pass
            } else {
                CheckStatus::Warn
            },
            detail: format!("{have} of {want} listening"),
            hint: (have < want).then(|| "see wickd's log for bind errors; restart wickd".into()),
        }]
    }
}
