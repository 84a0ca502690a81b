//! `PUT /vsock`, and the host side of hybrid vsock it binds.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::{fault, parse, Reply};
use crate::agent::AGENT_PORT;
use crate::vm::{Shared, Vm};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
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

pub fn put_vsock(vm: &mut Vm, shared: &Shared, body: &Bytes) -> Result<Reply, Reply> {
    let cfg: Vsock = parse(body)?;
    vm.pre_boot()?;
    if cfg.guest_cid < 3 {
        return Err(fault(format!(
            "Vsock config error: Invalid guest CID {}: CIDs 0, 1 and 2 are reserved.",
            cfg.guest_cid
        )));
    }
    bind_vsock(vm, shared, cfg)
        .map(|()| Reply::NoContent)
        .map_err(|e| fault(format!("Vsock config error: {e}")))
}

/// Binds the host side of the vsock device at `cfg.uds_path` (an existing file there is an
/// error, `Address already in use`), replacing any previous device.
pub fn bind_vsock(vm: &mut Vm, shared: &Shared, cfg: Vsock) -> Result<(), String> {
    vm.remove_vsock();
    let listener = match std::os::unix::net::UnixListener::bind(&cfg.uds_path) {
        Ok(l) => l,
        Err(e) => {
            vm.vsock = None;
            return Err(format!(
                "Cannot create backend for vsock device: UnixBind({e})"
            ));
        }
    };
    let _ = listener.set_nonblocking(true);
    let listener = UnixListener::from_std(listener).map_err(|e| e.to_string())?;
    vm.vsock_task = Some(tokio::spawn(serve_vsock(listener, shared.clone())));
    vm.vsock = Some(cfg);
    Ok(())
}
