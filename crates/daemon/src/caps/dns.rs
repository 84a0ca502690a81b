//! The `vm dns` capability: `<name>.vm` for running VMs, through the embedded `wick-dns`
//! server on `127.0.0.1:<dns_port>` (host) and `<bridge_ip>:53` (guests; other names are
//! forwarded upstream), plus systemd-resolved routing of `.vm` when resolved runs.
//!
//! Records are derived from the store (rebuilt at start from running VMs), never the only copy.
//!
//! Egress allowlists: a VM with `spec.allow_hosts` is a restricted client of the guests' server
//! (by its guest address, which its port guard pins): names outside its list get NXDOMAIN, and
//! allowed answers are opened in its nft set through the network capability's sink. Set in
//! `prepare_host` (after the network capability made the rules), changed by `vm set`, lifted at
//! cleanup, and rebuilt from the store at start like the records.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;
use wick_dns::resolved::Resolved;
use wick_dns::{DnsConfig, DnsServer, Egress, EgressSink, HostPattern, Records};
use wick_host::net::vm_key;
use wick_model::api::{Check, CheckStatus};
use wick_model::{VmRecord, VmSpec};

use crate::capability::{Capability, HookCtx};
use crate::config::{Config, NetworkSettings};
use crate::error::Result;

/// DNS for VMs.
pub struct VmDns {
    records: Records,
    /// The allowlist VMs, by guest address.
    egress: Egress,
    settings: NetworkSettings,
    upstreams: Vec<SocketAddr>,
    resolved_integration: bool,
    host: Mutex<Option<DnsServer>>,
    /// The guests' server; absent until the bridge has its address.
    bridge: Mutex<Option<DnsServer>>,
    /// Why the host listener is not running, for doctor.
    host_error: std::sync::Mutex<Option<String>>,
    /// Whether resolvectl routing was installed (reverted at shutdown).
    routed: std::sync::Mutex<bool>,
}

impl VmDns {
    pub fn new(
        settings: NetworkSettings,
        config: &Config,
        sink: Arc<dyn EgressSink>,
    ) -> anyhow::Result<VmDns> {
        let upstreams = config
            .upstream_dns
            .iter()
            .flatten()
            .map(|s| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmDns {
            records: Records::new(),
            egress: Egress::new(sink),
            settings,
            upstreams,
            resolved_integration: config.resolved_integration.unwrap_or(true),
            host: Mutex::new(None),
            bridge: Mutex::new(None),
            host_error: Default::default(),
            routed: Default::default(),
        })
    }

    fn config(&self, listen: SocketAddr) -> DnsConfig {
        let mut c = DnsConfig::new(vec![listen], self.records.clone());
        c.upstreams = self.upstreams.clone();
        c.egress = self.egress.clone();
        c
    }

    /// Restricts (or frees) the VM's guest address according to its spec.
    fn apply_egress(&self, vm: &VmRecord) {
        let Some(ip) = Self::record_of(vm) else {
            return;
        };
        match Self::patterns(vm) {
            Some(p) => {
                self.egress.set(ip.into(), &vm_key(&vm.id), p);
            }
            None => self.egress.remove(ip.into()),
        }
    }

    /// The VM's allowlist patterns; `None` without one.
    fn patterns(vm: &VmRecord) -> Option<Vec<HostPattern>> {
        if vm.spec.allow_hosts.is_empty() {
            return None;
        }
        Some(match wick_dns::parse_allow_hosts(&vm.spec.allow_hosts) {
            Ok(p) => p,
            Err(e) => {
                // Checked at create/set; a damaged record resolves nothing (fails closed).
                tracing::error!(vm = %vm.name, error = %e, "egress allowlist unreadable");
                Vec::new()
            }
        })
    }

    fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.settings.dns_port)
    }

    /// Starts the guests' server once the bridge has its address (idempotent).
    async fn ensure_bridge_server(&self) {
        let mut slot = self.bridge.lock().await;
        if slot.is_some() {
            return;
        }
        let addr = SocketAddr::new(self.settings.bridge_ip.into(), 53);
        match DnsServer::start(self.config(addr)).await {
            Ok(s) => {
                tracing::info!(%addr, "guest DNS serving");
                *slot = Some(s);
                drop(slot);
                self.route_resolved().await;
            }
            Err(e) if e.is_addr_not_available() => {} // no bridge yet
            Err(e) => tracing::warn!(%addr, error = %e, "guest DNS server not started"),
        }
    }

    async fn route_resolved(&self) {
        if !self.resolved_integration {
            return;
        }
        let (bridge, ip) = (self.settings.bridge_name.clone(), self.settings.bridge_ip);
        let res = tokio::task::spawn_blocking(move || {
            let r = Resolved::system();
            if !r.is_available() {
                return Ok(false);
            }
            r.route_vm_domain(&bridge, ip).map(|_| true)
        })
        .await;
        match res {
            Ok(Ok(true)) => {
                *self.routed.lock().unwrap_or_else(|e| e.into_inner()) = true;
                tracing::info!("systemd-resolved routes .vm to the bridge DNS server");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "resolvectl routing failed"),
            Err(e) => tracing::warn!(error = %e, "resolvectl routing panicked"),
        }
    }

    fn record_of(vm: &VmRecord) -> Option<Ipv4Addr> {
        vm.runtime.ip.as_deref().and_then(|s| s.parse().ok())
    }
}

#[async_trait]
impl Capability for VmDns {
    fn name(&self) -> &'static str {
        "vm dns"
    }

    async fn prepare_host(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        // The network capability (earlier in order) has made the bridge and the VM's firewall
        // rules (its allowlist set included) by now.
        self.apply_egress(cx.vm);
        self.ensure_bridge_server().await;
        Ok(())
    }

    /// A live allowlist change; a shrunk list also has its opened addresses closed.
    async fn apply_config_change(&self, cx: &mut HookCtx<'_>, old: &VmSpec) -> Result<()> {
        let (Some(ip), true) = (Self::record_of(cx.vm), cx.vm.runtime.tap.is_some()) else {
            return Ok(());
        };
        if old.allow_hosts == cx.vm.spec.allow_hosts {
            return Ok(());
        }
        let Some(patterns) = Self::patterns(cx.vm) else {
            self.egress.remove(ip.into());
            return Ok(());
        };
        let key = vm_key(&cx.vm.id);
        if let Err(e) = self.egress.replace(ip.into(), &key, patterns).await {
            // The spec is rolled back: so is the resolver.
            let mut was = cx.vm.clone();
            was.spec = old.clone();
            self.apply_egress(&was);
            return Err(crate::error::Error::precondition(format!(
                "cannot close the addresses removed from the egress allowlist: {e}"
            )));
        }
        Ok(())
    }

    async fn post_start(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        if let Some(ip) = Self::record_of(cx.vm) {
            self.records.set(&cx.vm.name, ip);
        }
        Ok(())
    }

    async fn cleanup(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        self.records.remove(&cx.vm.name);
        if let Some(ip) = Self::record_of(cx.vm) {
            self.egress.remove(ip.into());
        }
        Ok(())
    }

    async fn started(&self, vms: &[VmRecord]) -> Result<()> {
        self.records.replace_all(
            vms.iter()
                // Unassigned warm-pool VMs have no identity yet: no `<name>.vm`.
                .filter(|v| v.state.guest_up() && !v.is_pooled())
                .filter_map(|v| Self::record_of(v).map(|ip| (v.name.clone(), ip))),
        );
        for vm in vms.iter().filter(|v| v.runtime.tap.is_some()) {
            self.apply_egress(vm);
        }
        match DnsServer::start(self.config(self.host_addr())).await {
            Ok(s) => *self.host.lock().await = Some(s),
            Err(e) => {
                tracing::error!(error = %e, "host DNS server not started");
                *self.host_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        self.ensure_bridge_server().await;
        Ok(())
    }

    async fn shutdown(&self) {
        if std::mem::take(&mut *self.routed.lock().unwrap_or_else(|e| e.into_inner())) {
            let bridge = self.settings.bridge_name.clone();
            let _ = tokio::task::spawn_blocking(move || Resolved::system().revert(&bridge)).await;
        }
        for slot in [&self.host, &self.bridge] {
            if let Some(s) = slot.lock().await.take() {
                let _ = s.shutdown().await;
            }
        }
    }

    async fn doctor(&self, _vms: &[VmRecord]) -> Vec<Check> {
        let check = |name: &str, status, detail: String, hint: Option<&str>| Check {
            area: "vm dns".into(),
            name: name.into(),
            status,
            detail,
            hint: hint.map(str::to_string),
        };
        let mut out = Vec::new();
        match self
            .host_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            None => out.push(check(
                "host listener",
                CheckStatus::Pass,
                format!("{} ({} records)", self.host_addr(), self.records.len()),
                None,
            )),
            Some(e) => out.push(check(
                "host listener",
                CheckStatus::Fail,
                e,
                Some("pick a free dns_port in the config and restart wickd"),
            )),
        }
        let bridge = self.bridge.lock().await.is_some();
        out.push(check(
            "guest listener",
            CheckStatus::Pass,
            if bridge {
                format!("{}:53", self.settings.bridge_ip)
            } else {
                "starts with the bridge (first VM start)".into()
            },
            None,
        ));
        let routed = *self.routed.lock().unwrap_or_else(|e| e.into_inner());
        out.push(if routed {
            check("systemd-resolved", CheckStatus::Pass, "routes .vm to wick".into(), None)
        } else {
            check(
                "systemd-resolved",
                CheckStatus::Warn,
                "not routing .vm (resolved absent, disabled, or the bridge is not up yet)".into(),
                Some("without it, `ssh <name>.vm` needs an /etc/hosts entry; dig @127.0.0.1 -p <dns_port> still answers"),
            )
        });
        out
    }
}
