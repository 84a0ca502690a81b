//! Talking to a VM's wick-agent: waiting for it at boot, configuring the guest (its identity,
//! including SSH host keys made here), asking it to power off, and opening raw agent
//! connections for `POST /v1/vms/{vm}/agent`.
//!
//! The host side of vsock is the VMM's hybrid Unix socket (`CONNECT <port>\n` → `OK …\n`), the
//! same for Firecracker and for QEMU's agent-channel sidecar (`wickd vsock-mux`). wickd never opens AF_VSOCK.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use wick_agent_proto::{AgentClient, Configure, HostKey, NetworkConfig, Restored, AGENT_PORT};
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
        let mut s = wick_agent_proto::uds::connect_nofollow(vsock).await?;
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

/// A fresh SSH host key set for one VM: ed25519 only (sshd is told to use just that key; RSA
/// generation is slow and adds nothing for wick's clients). The comment names the VM.
pub(crate) fn new_host_keys(vm_name: &str) -> Result<Vec<HostKey>> {
    use ssh_key::rand_core::OsRng;
    use ssh_key::{Algorithm, LineEnding, PrivateKey};
    let fail = |e: ssh_key::Error| Error::internal(format!("generating SSH host keys: {e}"));
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(fail)?;
    key.set_comment(format!("root@{vm_name}"));
    let private = key.to_openssh(LineEnding::LF).map_err(fail)?;
    let public = key.public_key().to_openssh().map_err(fail)?;
    Ok(vec![HostKey {
        kind: "ed25519".into(),
        private: private.to_string(),
        public,
    }])
}

/// Whether every key in `pinned` is among the guest's `reported` keys (type and key material;
/// comments may differ).
fn reports_all(reported: &[String], pinned: &[String]) -> bool {
    let id = |line: &str| -> Option<(String, String)> {
        let mut w = line.split_whitespace();
        Some((w.next()?.to_string(), w.next()?.to_string()))
    };
    let have: Vec<_> = reported.iter().filter_map(|l| id(l)).collect();
    pinned
        .iter()
        .all(|p| id(p).is_some_and(|k| have.contains(&k)))
}

/// How much host entropy a restored guest gets (the kernel's CRNG key is 32 bytes).
const RESTORED_ENTROPY: usize = 64;

/// What a restored guest must not keep from its snapshot: with `new_identity` (a restore or a
/// fork) a fresh machine-id and `mac` too; always host entropy and the host's clock.
fn restored_identity(new_identity: bool, mac: Option<String>) -> Result<Restored> {
    use ssh_key::rand_core::{OsRng, RngCore};
    let mut entropy = vec![0u8; RESTORED_ENTROPY];
    OsRng
        .try_fill_bytes(&mut entropy)
        .map_err(|e| Error::internal(format!("reading the host's RNG: {e}")))?;
    let machine_id = match new_identity {
        true => {
            // A random (version 4) 128-bit id, as systemd makes them.
            let mut id = [0u8; 16];
            OsRng
                .try_fill_bytes(&mut id)
                .map_err(|e| Error::internal(format!("reading the host's RNG: {e}")))?;
            id[6] = (id[6] & 0x0f) | 0x40;
            id[8] = (id[8] & 0x3f) | 0x80;
            Some(id.iter().map(|b| format!("{b:02x}")).collect())
        }
        false => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::internal(format!("the host clock is before 1970: {e}")))?;
    Ok(Restored {
        machine_id,
        entropy,
        unix_time_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        mac: mac.filter(|_| new_identity).map(|m| m.to_ascii_lowercase()),
    })
}

/// What wickd says when a restored guest's agent did not apply `Configure::restored`.
const RESTORED_UNSUPPORTED: &str = "the guest's wick-agent cannot take a new identity after a \
                                    restore (rebuild or re-import the image)";

/// Fails when a `restored` Configure was sent and the agent did not apply it.
fn check_restored(sent: bool, reply: &wick_agent_proto::ConfigureReply) -> Result<()> {
    match sent && !reply.restored {
        true => Err(Error::precondition(RESTORED_UNSUPPORTED)),
        false => Ok(()),
    }
}

/// One Configure round trip; the guest's warnings go to the log.
async fn configure(
    vm: &VmRecord,
    client: &AgentClient,
    cfg: &Configure,
) -> Result<wick_agent_proto::ConfigureReply> {
    let reply = client
        .configure(cfg)
        .await
        .map_err(|e| Error::precondition(format!("configuring the guest failed: {e}")))?;
    for w in &reply.warnings {
        tracing::warn!(vm = %vm.name, warning = %w, "guest configuration");
    }
    Ok(reply)
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
        // Read with the owner's rights (see `filesync`), off the async workers. A builder VM
        // runs a build's steps for whoever asked: it gets none of root's files (nor a git
        // identity: its create request names none).
        let builder = crate::artifacts::build::is_builder_vm(self, vm.owner, &vm.name);
        let sync = match builder {
            true => Vec::new(),
            false => self.config.file_sync.clone(),
        };
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
            host_keys: None,
            restored: None,
        };
        (cfg, refused)
    }

    /// Configures this VM's guest identity now (hostname, network, keys, git, files, SSH host
    /// keys) over `client`, and records the host keys `wick vm ssh` pins.
    ///
    /// SSH host keys are made here, never by the guest: with `fresh_host_keys` (a new VM, or a
    /// pooled one being handed out) or when none are recorded yet, new ones are sent and pinned;
    /// otherwise the guest keeps its keys, and gets new ones only if it no longer reports the
    /// recorded ones. What the guest reports is a check, never what is pinned. Private keys are
    /// only in the Configure message: not stored, not logged.
    pub(crate) async fn configure_identity(
        &self,
        op: &OpEntry,
        vm: &mut VmRecord,
        client: &AgentClient,
        fresh_host_keys: bool,
    ) -> Result<()> {
        self.apply_identity(op, vm, client, fresh_host_keys, None)
            .await
    }

    /// Configures a guest that was just restored from a saved state (before the VM is
    /// `running`): everything `configure_identity` sends, after the agent has stepped the clock
    /// to the host's, reseeded the kernel RNG with host entropy and re-applied the network
    /// (dropping the addresses and neighbours the saved state held).
    ///
    /// `new_identity` (a restore from a snapshot, a fork): also a fresh machine-id, the MAC of
    /// the VM's IP (`wick_host::net::guest_mac`) and fresh SSH host keys, pinned. `false` (a
    /// suspended VM coming back as itself): the guest keeps its keys, machine-id and MAC.
    /// An agent that did not apply it (one older than `Configure::restored`) fails the step: a
    /// fork that kept its source's RNG state and identity must not run.
    pub(crate) async fn configure_restored(
        &self,
        op: &OpEntry,
        vm: &mut VmRecord,
        client: &AgentClient,
        new_identity: bool,
    ) -> Result<()> {
        let mac = vm
            .runtime
            .ip
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .map(wick_host::net::guest_mac);
        let restored = restored_identity(new_identity, mac)?;
        self.apply_identity(op, vm, client, new_identity, Some(restored))
            .await
    }

    /// The one configure flow of `configure_identity` and `configure_restored`.
    async fn apply_identity(
        &self,
        op: &OpEntry,
        vm: &mut VmRecord,
        client: &AgentClient,
        fresh_host_keys: bool,
        restored: Option<Restored>,
    ) -> Result<()> {
        let (mut cfg, refused) = self.guest_config(vm).await;
        for why in refused {
            op.stage(&format!("warning: {why}")); // the user sees what was not copied
        }
        cfg.restored = restored;
        let mut pinned = vm.runtime.host_keys.clone();
        if fresh_host_keys || pinned.is_empty() {
            let keys = new_host_keys(&vm.name)?;
            pinned = keys.iter().map(|k| k.public.clone()).collect();
            cfg.host_keys = Some(keys);
        }
        let mut reply = configure(vm, client, &cfg).await?;
        check_restored(cfg.restored.is_some(), &reply)?;
        if cfg.host_keys.is_none() && !reports_all(&reply.host_keys, &pinned) {
            // The guest lost (or replaced) the keys pinned for it: give it new ones.
            let keys = new_host_keys(&vm.name)?;
            pinned = keys.iter().map(|k| k.public.clone()).collect();
            let again = Configure {
                host_keys: Some(keys),
                ..Default::default()
            };
            reply = configure(vm, client, &again).await?;
        }
        if !reports_all(&reply.host_keys, &pinned) {
            let why = "the guest did not install the SSH host keys wickd made for it (is its \
                       wick-agent older than wickd? rebuild or re-import the image): `wick vm \
                       ssh` pins wickd's keys and will refuse the guest's";
            tracing::warn!(vm = %vm.name, "{why}");
            op.stage(&format!("warning: {why}"));
        }
        vm.runtime.host_keys = pinned;
        *vm = self.store.save_vm(vm)?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_are_fresh_valid_ed25519_pairs() {
        let a = new_host_keys("a1").unwrap();
        let b = new_host_keys("a1").unwrap();
        assert_eq!(a.len(), 1);
        let k = &a[0];
        assert_eq!(k.kind, "ed25519");
        assert!(k.public.starts_with("ssh-ed25519 ") && k.public.ends_with(" root@a1"));
        assert!(!k.public.contains('\n'));
        // The private key parses and is the public key's pair.
        let private = ssh_key::PrivateKey::from_openssh(&k.private).unwrap();
        assert!(!private.is_encrypted());
        let public = ssh_key::PublicKey::from_openssh(&k.public).unwrap();
        assert_eq!(private.public_key().key_data(), public.key_data());
        // Unique per call (per VM), and never in Debug output.
        assert_ne!(a[0].public, b[0].public);
        assert_ne!(a[0].private, b[0].private);
        assert!(!format!("{a:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_restored_identity_is_fresh_and_valid() {
        let mac = Some("06:00:AC:1E:00:07".to_string());
        let a = restored_identity(true, mac.clone()).unwrap();
        let b = restored_identity(true, mac.clone()).unwrap();
        assert_eq!(a.validate(), Ok(()));
        let id = a.machine_id.as_deref().unwrap();
        assert_eq!((id.len(), &id[12..13]), (32, "4"), "{id}");
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.entropy.len(), RESTORED_ENTROPY);
        assert_eq!(a.mac.as_deref(), Some("06:00:ac:1e:00:07"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(now.abs_diff(a.unix_time_ns) < 10_000_000_000);
        // A suspended VM coming back keeps its identity: only entropy and the clock.
        let same = restored_identity(false, mac).unwrap();
        assert_eq!((same.machine_id, same.mac), (None, None));
        assert_eq!(same.entropy.len(), RESTORED_ENTROPY);
    }

    #[test]
    fn an_agent_that_did_not_apply_restored_is_refused() {
        // An agent before `Configure::restored` replies without the field.
        let old: wick_agent_proto::ConfigureReply =
            serde_json::from_str(r#"{"changed":[],"warnings":[],"host_keys":[]}"#).unwrap();
        let e = check_restored(true, &old).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot take a new identity after a restore (rebuild or re-import"),
            "{e}"
        );
        assert!(check_restored(false, &old).is_ok());
        let new = wick_agent_proto::ConfigureReply {
            restored: true,
            ..Default::default()
        };
        assert!(check_restored(true, &new).is_ok());
    }

    #[test]
    fn reported_keys_are_compared_by_key_not_comment() {
        let pinned = vec!["ssh-ed25519 AAAA1 root@a1".to_string()];
        assert!(reports_all(
            &["ssh-rsa BBBB x".into(), "ssh-ed25519 AAAA1 other".into()],
            &pinned
        ));
        assert!(!reports_all(&["ssh-ed25519 AAAA2 root@a1".into()], &pinned));
        assert!(!reports_all(&[], &pinned));
        assert!(!reports_all(
            &["ssh-ed25519".into()],
            &["ssh-ed25519".into()]
        ));
    }
}
