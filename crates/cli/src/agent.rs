//! The guest agent through the daemon: a [`Connector`] whose every connection is an HTTP upgrade
//! of `POST /v1/vms/{vm}/agent` on wickd's socket (wickd splices it to the guest's wick-agent),
//! and the conversion of agent errors back into the CLI's errors. A connection wickd refuses
//! because the VM is suspended starts the VM first (`cmd::wake`) and is tried again.

use std::sync::Arc;

use std::time::Duration;

use wick_agent_proto::{
    AgentChannel, AgentClient, AgentError, BoxAgentStream, ConnectFuture, Connector,
};

use crate::client::Client;

/// Opens agent connections to one VM through wickd.
pub struct DaemonConnector {
    client: Arc<Client>,
    vm: String,
    /// One resume at a time: concurrent connections to a suspended VM start it once.
    wake: tokio::sync::Mutex<()>,
}

impl DaemonConnector {
    fn new(client: Client, vm: &str) -> DaemonConnector {
        DaemonConnector {
            client: Arc::new(client),
            vm: vm.to_string(),
            wake: tokio::sync::Mutex::new(()),
        }
    }
}

impl Connector for DaemonConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let mut res = self.client.agent_stream(&self.vm).await;
            if let Err(e) = &res {
                let _one = self.wake.lock().await;
                if crate::cmd::wake::after_refusal(&self.client, &self.vm, e).await {
                    res = self.client.agent_stream(&self.vm).await;
                }
            }
            match res {
                Ok(s) => Ok(Box::new(s) as BoxAgentStream),
                Err(e) => Err(AgentError::Transport(Box::new(DaemonError(e)))),
            }
        })
    }

    fn describe(&self) -> String {
        format!("VM {} through wickd", self.vm)
    }
}

/// A channel to VM `vm`'s agent (by name, id or unique id prefix). No I/O until the first call;
/// each call is its own upgraded connection, so calls may run concurrently.
pub fn channel(client: Client, vm: &str) -> AgentChannel {
    AgentChannel::new(Arc::new(DaemonConnector::new(client, vm)))
}

/// A client of VM `vm`'s agent whose protocol version was checked (`Hello`), retrying until it
/// answers or `timeout` passes. Check that the VM runs first: every refusal is retried.
pub async fn connect(client: Client, vm: &str, timeout: Duration) -> anyhow::Result<AgentClient> {
    let connector = Arc::new(DaemonConnector::new(client, vm));
    AgentClient::with_connector(connector, timeout)
        .await
        .map_err(to_anyhow)
}

/// The daemon's error (often an [`wick_model::api::ApiError`]) carried through
/// [`AgentError::Transport`], so [`to_anyhow`] can hand it back unchanged.
#[derive(Debug)]
struct DaemonError(anyhow::Error);

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for DaemonError {}

/// An agent error as the CLI reports it: the daemon's own error when wickd refused the
/// connection (so `error: VM a1 is not running` prints like any other API error), else the
/// agent error.
pub fn to_anyhow(e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Transport(inner) => match inner.downcast::<DaemonError>() {
            Ok(d) => d.0,
            Err(other) => anyhow::anyhow!(other),
        },
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_model::api::{ApiError, ErrorCode};

    #[test]
    fn daemon_errors_come_back_unchanged() {
        let api = ApiError::new(
            ErrorCode::NotRunning,
            "VM a1 is not running (state stopped)",
        );
        let e = AgentError::Transport(Box::new(DaemonError(api.clone().into())));
        let back = to_anyhow(e);
        assert_eq!(back.downcast_ref::<ApiError>(), Some(&api));
        let e = to_anyhow(AgentError::Timeout {
            what: "start the command",
            after: std::time::Duration::from_secs(1),
        });
        assert!(e.to_string().contains("start the command"), "{e}");
    }
}
