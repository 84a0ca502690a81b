//! The protocol between `wickd` (host) and `wick-agent` (inside every guest), and the host-side
//! client.
//!
//! # Transport
//!
//! The agent listens on AF_VSOCK port [`AGENT_PORT`]. The host reaches it through the VMM's
//! *hybrid vsock* Unix socket (Firecracker's protocol, also spoken by QEMU's agent-channel
//! sidecar, which carries the connections over a virtio-serial port: see [`mux`]): connect to
//! the VM's vsock socket, write `CONNECT <port>\n`, read `OK <hostport>\n`; from then on the
//! stream is the guest connection. When nothing listens on the port in the guest (the
//! agent has not started yet), the VMM closes the connection instead, and [`AgentClient::connect`]
//! retries.
//!
//! The client is transport-agnostic: a [`Connector`] hands it fresh streams already connected to
//! the agent. [`HybridVsockConnector`] does the handshake above (wickd); the CLI's connector asks
//! wickd for an HTTP upgrade (`POST /v1/vms/{vm}/agent`), after which the connection is a raw
//! stream to the agent — wickd did the `CONNECT`.
//!
//! # One request per connection
//!
//! Every connection carries exactly one request: the host sends a [`Request`] frame, the agent
//! answers with a [`Reply`] frame, and some requests continue with a stream (below). Many
//! connections may be open at once: concurrent execs are simply concurrent connections.
//!
//! # Framing
//!
//! Both directions are a sequence of frames:
//!
//! ```text
//! +----------------+----------+---------------------+
//! | length: u32 BE | kind: u8 | payload: length B   |
//! +----------------+----------+---------------------+
//! ```
//!
//! `length` counts the payload only (not the kind byte) and is at most [`MAX_FRAME_LEN`].
//! Control frames carry JSON; data frames carry raw bytes (at most [`DATA_CHUNK`] each when
//! written by this crate). The kinds ([`FrameKind`]):
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | `Request` | host → guest | JSON [`Envelope`] (protocol version + [`Request`]) |
//! | 2 | `Reply` | guest → host | JSON `{"Ok": T}` or `{"Err": RemoteError}` |
//! | 3 | `Stdin` | host → guest | raw bytes for the process's stdin |
//! | 4 | `StdinEof` | host → guest | empty: close the process's stdin |
//! | 5 | `Resize` | host → guest | JSON [`WindowSize`] |
//! | 6 | `Signal` | host → guest | JSON [`SignalRequest`]: signal the process group |
//! | 7 | `Stdout` | guest → host | raw bytes |
//! | 8 | `Stderr` | guest → host | raw bytes |
//! | 9 | `Exit` | guest → host | JSON [`ExitStatus`]; the last frame of an exec |
//! | 10 | `Data` | both | raw tar bytes |
//! | 11 | `DataEnd` | both | empty: end of the tar stream |
//! | 12 | `Error` | guest → host | JSON [`RemoteError`]: a stream failed midway |
//!
//! # Conversations
//!
//! - `Hello`, `Configure`, `Ports`, `Health`, `Shutdown`: request → reply.
//! - `Exec`: request → reply `ExecStarted { pid }` (or an error such as "no such command"), then
//!   the host may send `Stdin`/`StdinEof`/`Resize`/`Signal` while the guest sends
//!   `Stdout`/`Stderr` and finally one `Exit`. Closing the connection before `Exit` kills the
//!   process group.
//! - `PutFiles { dest_dir }`: request → reply `()` (destination ready), then the host sends
//!   `Data`… `DataEnd` (a tar archive), then the guest replies [`PutDone`] or an error.
//! - `GetFiles { path }`: request → reply `()` (path exists), then the guest sends `Data`…
//!   `DataEnd` (a tar archive with one top-level entry named after the path's last component), or
//!   `Error` if reading fails midway.
//!
//! # Versioning
//!
//! Every request carries [`PROTOCOL_VERSION`]; an agent speaking another version refuses the
//! request with an error naming both versions, and `Hello` reports the agent's version so the host
//! can tell the user to rebuild the image.

mod client;
mod frame;
mod msg;
pub mod mux;
pub mod pipe;
mod relay;
pub mod tarfs;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uds;

pub use client::{
    AgentChannel, AgentClient, AgentStream, BoxAgentStream, ConnectFuture, Connector, ExecControl,
    ExecEvent, ExecOutput, ExecSession, ExecStdin, HybridVsockConnector, TarReader, OUTPUT_LIMIT,
};
pub use frame::{read_frame, write_frame, write_json, Frame, FrameKind, DATA_CHUNK, MAX_FRAME_LEN};
pub use msg::*;
pub use relay::relay;

use std::path::PathBuf;
use std::time::Duration;

/// The vsock port `wick-agent` listens on inside the guest.
pub const AGENT_PORT: u32 = 10700;

/// The protocol version spoken by this crate. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The version of this crate (and of the agent built with it).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where image builders install the agent binary in the guest.
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/wick-agent";

/// The systemd unit image builders install as `wick-agent.service` (enabled through
/// `multi-user.target.wants`). It starts early, without waiting for the network (the agent
/// configures it), loads the virtio vsock transport if it is a module, and restarts forever.
pub const SYSTEMD_UNIT: &str = "\
[Unit]
Description=wick guest agent (vsock)
DefaultDependencies=no
# Configure writes below /root, so /root must be mounted first. An image whose fstab marks the
# /root line `x-wick-agent` (the golden image: `noauto`) has the agent mount it at start, with
# no wait for udev. Any other /root mount (even `nofail`) is ordered before the agent by
# `After=root.mount`, a tmpfs /tmp by `After=tmp.mount` (ordering only: nothing more is
# started). Not after local-fs.target: that waits for sysusers and tmpfiles-setup-dev, which
# the agent does not need (~0.5 s of a TCG boot).
After=systemd-remount-fs.service root.mount tmp.mount
Before=shutdown.target
Conflicts=shutdown.target
StartLimitIntervalSec=0

[Service]
ExecStartPre=-/sbin/modprobe -q vmw_vsock_virtio_transport
ExecStart=/usr/local/bin/wick-agent
Restart=always
RestartSec=200ms

[Install]
WantedBy=multi-user.target
";

/// Errors of the host-side client. Each names what failed and, where it helps, what to check.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent on vsock port {port} through {path}: {detail}")]
    Connect {
        path: PathBuf,
        port: u32,
        detail: String,
    },
    #[error(
        "the guest agent did not answer on {target} within {waited:?} (last error: {last}); \
         check the VM's console log for wick-agent and vsock errors"
    )]
    NotReady {
        /// What was tried, from [`Connector::describe`].
        target: String,
        waited: Duration,
        last: String,
    },
    /// A [`Connector`] other than the hybrid vsock one failed to open a connection (e.g. wickd
    /// refused the upgrade); its error is kept as is.
    #[error(transparent)]
    Transport(Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "the guest agent speaks protocol version {agent} (agent {agent_version}) but this wick \
         speaks version {ours}: rebuild the image with a matching wick-agent"
    )]
    VersionMismatch {
        ours: u32,
        agent: u32,
        agent_version: String,
    },
    #[error("timed out after {after:?} waiting for the guest agent to {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("connection to the guest agent failed while trying to {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent broke the protocol while trying to {what}: {detail}")]
    Protocol { what: &'static str, detail: String },
    #[error("the guest agent could not {what}: {message}")]
    Remote { what: &'static str, message: String },
}

impl AgentError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
        move |source| AgentError::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_runs_the_installed_binary() {
        let exec = format!("\nExecStart={}\n", super::AGENT_GUEST_PATH);
        assert!(super::SYSTEMD_UNIT.contains(&exec));
        assert!(super::SYSTEMD_UNIT.starts_with("[Unit]\n"));
    }
}
