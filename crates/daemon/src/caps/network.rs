//! The `network` capability: bridge, per-VM IP lease, TAP, guest isolation, opt-in NAT and the
//! leftover sweep, through `wick_host::net`.
//!
//! Durability: the IP lease lives in the store (`ip_leases`, unique per address) and in
//! `runtime.ip`; the TAP name (deterministic, `wk-<12 hex>`) is written to `runtime.tap` before
//! the TAP is created; the NAT backend name is written to `runtime.nat` before rules are added;
//! and the fact that wick turned `ip_forward` on is a `meta` row written before the sysctl.
//! Cleanup derives everything from those records (and the deterministic TAP name).
//!
//! Egress: `spec.nat` is NAT to anywhere; a non-empty `spec.allow_hosts` is NAT restricted to
//! the VM's allowlist set (same chains, same `runtime.nat` record, plus the set
//! `vm-<key>-allow`, or ipset `wick-vm-<key>` with iptables, so cleanup and the sweep remove it
//! with them), which the `vm dns`
//! capability's resolver fills through [`Network::egress_sink`]. The two are exclusive
//! (`vm create`/`vm set` refuse both).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use wick_dns::EgressSink;
use wick_host::net::{
    self, guest_ip_range, guest_mac, tap_name, vm_key, Bridge, ForwardGuard, IptablesNat,
    NatBackend, NetError, NftNat, Runner,
};
use wick_model::api::{Check, CheckStatus};
use wick_model::{VmRecord, VmSpec};
use wick_vmm::VmmConfig;

use crate::capability::{Capability, HookCtx};
use crate::config::NetworkSettings;
use crate::error::{Error, Result};
use crate::failpoint;

/// `meta` key recording that wick turned `net.ipv4.ip_forward` on (and may turn it off).
const FORWARD_META: &str = "ip_forward_enabled_by_wick";

/// Bridge/TAP/NAT for every VM.
pub struct Network {
    runner: Arc<dyn Runner>,
    settings: NetworkSettings,
    bridge: Bridge,
    backend: OnceLock<std::result::Result<Arc<dyn NatBackend>, String>>,
    /// Whether the bridge and the isolation rules were set up by this process. The steps are
    /// idempotent but not atomic (two `ip addr add` of one address race), so the mutex also
    /// serialises them; a failed TAP attach resets it so the next start re-checks the host.
    setup_done: std::sync::Mutex<bool>,
}

fn net_err(what: &str, e: NetError) -> Error {
    Error::precondition(format!("{what}: {e}"))
}

impl Network {
    pub fn new(runner: Arc<dyn Runner>, settings: NetworkSettings) -> anyhow::Result<Network> {
        let bridge = Bridge::new(&settings.bridge_name, &settings.bridge_cidr)?;
        Ok(Network {
            runner,
            settings,
            bridge,
            backend: OnceLock::new(),
            setup_done: Default::default(),
        })
    }

    /// The configured NAT/isolation backend, detected once.
    fn backend(&self) -> Result<Arc<dyn NatBackend>> {
        self.backend
            .get_or_init(|| {
                let b: std::result::Result<Box<dyn NatBackend>, NetError> =
                    match self.settings.nat_backend.as_str() {
                        "auto" => net::detect_backend(
                            self.runner.clone(),
                            &self.bridge.name,
                            self.settings.allow_vm_to_vm,
                        ),
                        name => self.backend_named(name),
                    };
                b.map(Arc::from).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| {
                Error::precondition(format!(
                    "no usable firewall backend for guest isolation/NAT ({e}); install nftables or iptables"
                ))
            })
    }

    fn backend_named(&self, name: &str) -> std::result::Result<Box<dyn NatBackend>, NetError> {
        match name {
            "nft" => Ok(Box::new(
                NftNat::new(self.runner.clone(), &self.bridge.name)?
                    .with_vm_to_vm(self.settings.allow_vm_to_vm),
            )),
            bin => Ok(Box::new(
                IptablesNat::new(self.runner.clone(), bin, &self.bridge.name)?
                    .with_vm_to_vm(self.settings.allow_vm_to_vm),
            )),
        }
    }

    /// The backend that holds a VM's rules (the recorded one, even if the config changed since).
    fn backend_for(&self, recorded: &str) -> Result<Arc<dyn NatBackend>> {
        let current = self.backend()?;
        if current.name() == recorded {
            return Ok(current);
        }
        self.backend_named(recorded)
            .map(Arc::from)
            .map_err(|e| net_err("NAT backend of this VM", e))
    }

    fn guest_ip(vm: &VmRecord) -> Option<Ipv4Addr> {
        vm.runtime.ip.as_deref().and_then(|s| s.parse().ok())
    }

    /// Opens the firewall for a VM's allowed DNS answers (the `vm dns` resolver's hook).
    pub fn egress_sink(self: &Arc<Self>) -> Arc<dyn EgressSink> {
        Arc::new(AllowSink(self.clone()))
    }

    fn enable_nat(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        let (Some(ip), Some(tap)) = (Self::guest_ip(cx.vm), cx.vm.runtime.tap.clone()) else {
            return Err(Error::internal("NAT needs the VM's IP and TAP"));
        };
        if !ForwardGuard::is_enabled(&*self.runner).map_err(|e| net_err("ip_forward", e))? {
            cx.store().set_meta(FORWARD_META, Some("1"))?; // recorded before the sysctl
            ForwardGuard::ensure_enabled(&*self.runner).map_err(|e| net_err("ip_forward", e))?;
        }
        let backend = self.backend()?;
        cx.vm.runtime.nat = Some(backend.name().to_string());
        cx.persist()?;
        let key = vm_key(&cx.vm.id);
        match egress(&cx.vm.spec) {
            Egress::Allowlist => backend
                .enable_allowlist(&key, ip, &tap, None)
                .map_err(|e| net_err("enable the egress allowlist", e))?,
            _ => backend
                .enable(&key, ip, &tap, None)
                .map_err(|e| net_err("enable NAT", e))?,
        }
        failpoint::hit("after-nat");
        Ok(())
    }

    fn disable_nat(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        let Some(recorded) = cx.vm.runtime.nat.clone() else {
            return Ok(());
        };
        let backend = self.backend_for(&recorded)?;
        let key = vm_key(&cx.vm.id);
        match (Self::guest_ip(cx.vm), cx.vm.runtime.tap.clone()) {
            (Some(ip), Some(tap)) => backend.disable(&key, ip, &tap).map(|_| ()),
            _ => backend.remove_vm(&key).map(|_| ()),
        }
        .map_err(|e| net_err("disable NAT", e))?;
        cx.vm.runtime.nat = None;
        cx.persist()?;
        self.release_forwarding(cx.store(), &cx.vm.id)
    }

    /// Turns ip_forward off again if wick turned it on and no other VM has NAT.
    fn release_forwarding(&self, store: &wick_store::Store, except: &str) -> Result<()> {
        if store.get_meta(FORWARD_META)?.is_none() {
            return Ok(());
        }
        let in_use = store
            .list_vms(None)?
            .iter()
            .any(|v| v.id != except && v.runtime.nat.is_some());
        if !in_use {
            ForwardGuard::release(&*self.runner, true, false)
                .map_err(|e| net_err("ip_forward", e))?;
            store.set_meta(FORWARD_META, None)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Capability for Network {
    fn name(&self) -> &'static str {
        "network"
    }

    async fn preflight(&self, vm: &VmRecord) -> Result<()> {
        // Guest isolation needs a firewall backend even for VMs without NAT.
        let backend = self.backend()?;
        check_allowlist_support(&*backend, &vm.spec)
    }

    async fn prepare_host(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        {
            let mut done = self.setup_done.lock().unwrap_or_else(|e| e.into_inner());
            if !*done {
                self.bridge
                    .ensure(&*self.runner)
                    .map_err(|e| net_err("bridge", e))?;
                self.backend()?
                    .apply_host_isolation(self.bridge.ip())
                    .map_err(|e| net_err("guest isolation rules", e))?;
                *done = true;
            }
        }

        if Self::guest_ip(cx.vm).is_none() {
            let ip = cx
                .store()
                .lease_ip(&cx.vm.id, guest_ip_range(&self.bridge.cidr))?
                .ok_or_else(|| {
                    Error::precondition(format!(
                        "no free guest address left in {}; delete unused VMs or widen `cidr`",
                        self.bridge.cidr.network_cidr()
                    ))
                })?;
            cx.vm.runtime.ip = Some(ip.to_string());
            cx.persist()?;
        }

        let tap = tap_name(&cx.vm.id);
        cx.vm.runtime.tap = Some(tap.clone());
        cx.persist()?; // recorded before it exists

        // The anti-spoofing guard goes on before the port exists, so the TAP is never a bridge
        // port without it (its rules derive from the VM key: cleanup and sweep find them).
        let ip = Self::guest_ip(cx.vm).ok_or_else(|| Error::internal("guest IP"))?;
        self.backend()?
            .guard_port(&vm_key(&cx.vm.id), &tap, &guest_mac(ip), ip)
            .map_err(|e| net_err("guest port guard", e))?;
        failpoint::hit("after-guard");
        // A contained VMM (its uid recorded by the contain capability, which runs first) owns
        // its TAP, so an unprivileged Firecracker can attach to it.
        let owner = cx.vm.runtime.jail.as_ref().map(|j| (j.uid, j.gid));
        let tap_res = net::create_tap_owned(
            &*self.runner,
            &tap,
            &self.bridge.name,
            !self.settings.allow_vm_to_vm,
            owner,
        );
        if let Err(e) = tap_res {
            // Perhaps the bridge went away under us: re-check it at the next start.
            *self.setup_done.lock().unwrap_or_else(|e| e.into_inner()) = false;
            return Err(net_err("TAP", e));
        }
        failpoint::hit("after-tap");

        if egress(&cx.vm.spec) != Egress::None {
            self.enable_nat(cx)?;
        }
        Ok(())
    }

    fn vmm_config(&self, vm: &VmRecord, cfg: &mut VmmConfig) {
        cfg.tap = vm.runtime.tap.clone();
        cfg.guest_mac = Self::guest_ip(vm).map(guest_mac);
    }

    async fn cleanup(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        self.disable_nat(cx)?;
        // The name is deterministic: delete it even if a crash lost the record's field.
        net::delete_tap(&*self.runner, &tap_name(&cx.vm.id)).map_err(|e| net_err("TAP", e))?;
        // Then its guard (after the TAP: never a port without one). Without a backend no guard
        // can have been installed.
        if let Ok(b) = self.backend() {
            b.unguard_port(&vm_key(&cx.vm.id))
                .map_err(|e| net_err("guest port guard", e))?;
        }
        if cx.vm.runtime.tap.take().is_some() {
            cx.persist()?;
        }
        Ok(())
    }

    async fn on_delete(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        cx.store().release_ip(&cx.vm.id)?;
        if cx.vm.runtime.ip.take().is_some() {
            cx.persist()?;
        }
        Ok(())
    }

    async fn apply_config_change(&self, cx: &mut HookCtx<'_>, old: &VmSpec) -> Result<()> {
        let live = cx.vm.state.guest_up() && cx.vm.runtime.tap.is_some();
        let (was, now) = (egress(old), egress(&cx.vm.spec));
        if now == Egress::Allowlist {
            check_allowlist_support(&*self.backend()?, &cx.vm.spec)?;
        }
        if !live {
            return Ok(()); // applied at next start
        }
        match (was, now) {
            // Same rules; a shrunk list has its set flushed by the resolver (`vm dns`), which
            // serialises that with the answers it opens.
            (a, b) if a == b => Ok(()),
            (_, Egress::None) => self.disable_nat(cx),
            _ => self.enable_nat(cx),
        }
    }

    async fn doctor(&self, vms: &[VmRecord]) -> Vec<Check> {
        let mut out = Vec::new();
        let check = |name: &str, status, detail: String, hint: Option<&str>| Check {
            area: "network".into(),
            name: name.into(),
            status,
            detail,
            hint: hint.map(str::to_string),
        };
        match net::list_links(&*self.runner) {
            Ok(links) => match links.iter().find(|l| l.name == self.bridge.name) {
                Some(_) => out.push(check(
                    "bridge",
                    CheckStatus::Pass,
                    format!("{} ({})", self.bridge.name, self.settings.bridge_cidr),
                    None,
                )),
                None => out.push(check(
                    "bridge",
                    CheckStatus::Pass,
                    format!("{} absent; created at the first VM start", self.bridge.name),
                    None,
                )),
            },
            Err(e) => out.push(check(
                "bridge",
                CheckStatus::Fail,
                e.to_string(),
                Some("install iproute2; wickd needs CAP_NET_ADMIN"),
            )),
        }
        let backend = self.backend();
        match &backend {
            Ok(b) => out.push(check(
                "nat backend",
                CheckStatus::Pass,
                b.name().to_string(),
                None,
            )),
            Err(e) => out.push(check(
                "nat backend",
                CheckStatus::Fail,
                e.to_string(),
                Some("apt-get install nftables"),
            )),
        }
        if let Ok(b) = &backend {
            out.push(allowlist_check(&**b));
        }
        // The per-port anti-spoofing guard needs nftables' bridge family, whatever the backend.
        match net::run_ok(&*self.runner, "nft", &["list", "tables", "bridge"], None) {
            Ok(_) => out.push(check(
                "port guard",
                CheckStatus::Pass,
                "nftables bridge family (anti-spoofing on every guest port)".into(),
                None,
            )),
            Err(e) => out.push(check(
                "port guard",
                CheckStatus::Fail,
                format!("VMs are refused without it: {e}"),
                Some("apt-get install nftables"),
            )),
        }
        match ForwardGuard::is_enabled(&*self.runner) {
            Ok(on) => out.push(check(
                "ip_forward",
                CheckStatus::Pass,
                if on {
                    "on".into()
                } else {
                    "off (turned on when a VM needs NAT)".into()
                },
                None,
            )),
            Err(e) => out.push(check("ip_forward", CheckStatus::Warn, e.to_string(), None)),
        }
        let keep: HashSet<String> = vms.iter().filter_map(|v| v.runtime.tap.clone()).collect();
        let backends: Vec<&dyn NatBackend> = backend.iter().map(|b| &**b).collect();
        let rep = net::leftovers(&*self.runner, &keep, &backends);
        if rep.links.is_empty() && rep.nat.is_empty() {
            out.push(check("leftovers", CheckStatus::Pass, "none".into(), None));
        } else {
            let mut items = rep.links.clone();
            items.extend(rep.nat.iter().map(|(b, k)| format!("{b} rules of vm {k}")));
            out.push(check(
                "leftovers",
                CheckStatus::Warn,
                items.join(", "),
                Some("restart wickd: its start-up sweep removes them"),
            ));
        }
        out
    }

    /// Re-applies the host filter and every live VM's port guard (both idempotent): VMs adopted
    /// from a wickd that predates them (or whose rules someone flushed) are covered again.
    async fn started(&self, vms: &[VmRecord]) -> Result<()> {
        let live: Vec<(&VmRecord, Ipv4Addr, String)> = vms
            .iter()
            .filter_map(|v| Some((v, Self::guest_ip(v)?, v.runtime.tap.clone()?)))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let backend = self.backend()?;
        backend
            .apply_host_isolation(self.bridge.ip())
            .map_err(|e| net_err("guest isolation rules", e))?;
        for (vm, ip, tap) in live {
            if let Err(e) = backend.guard_port(&vm_key(&vm.id), &tap, &guest_mac(ip), ip) {
                tracing::error!(vm = %vm.name, error = %e, "guest port guard not restored");
            }
        }
        Ok(())
    }

    async fn sweep(&self, vms: &[VmRecord]) -> Result<Vec<String>> {
        // (Allowlist sets are named after the VM key like its chains: swept with them.)
        let keep: HashSet<String> = vms.iter().filter_map(|v| v.runtime.tap.clone()).collect();
        let backend = self.backend().ok();
        let backends: Vec<&dyn NatBackend> = backend.iter().map(|b| &**b).collect();
        let rep = net::sweep(&*self.runner, &keep, &backends);
        for e in &rep.errors {
            tracing::warn!(error = %e, "network sweep");
        }
        let mut lines: Vec<String> = rep.links.iter().map(|l| format!("link {l}")).collect();
        lines.extend(
            rep.nat
                .iter()
                .map(|(b, k)| format!("{b} NAT rules of vm {k}")),
        );
        Ok(lines)
    }
}

/// What a VM may reach outside the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Egress {
    /// Nothing (no NAT).
    None,
    /// Everything (`--nat`).
    All,
    /// Only the resolved addresses of its allowlist (`--allow-host`).
    Allowlist,
}

fn egress(spec: &VmSpec) -> Egress {
    if !spec.allow_hosts.is_empty() {
        Egress::Allowlist
    } else if spec.nat {
        Egress::All
    } else {
        Egress::None
    }
}

/// Refuses an allowlist on a backend without address sets, saying why.
fn check_allowlist_support(backend: &dyn NatBackend, spec: &VmSpec) -> Result<()> {
    if egress(spec) == Egress::Allowlist && !backend.supports_allowlist() {
        return Err(Error::precondition(format!(
            "--allow-host needs per-VM address sets (nftables, or ipset with iptables); this \
             daemon's firewall backend is {} and `ipset` does not work here (install ipset, or \
             nftables with nat_backend = \"nft\" or \"auto\")",
            backend.name()
        )));
    }
    Ok(())
}

/// Doctor: whether `--allow-host` works with this backend.
fn allowlist_check(b: &dyn NatBackend) -> Check {
    let (status, detail, hint) = if b.supports_allowlist() {
        (
            CheckStatus::Pass,
            format!(
                "available (--allow-host: per-VM address sets, {})",
                set_kind(b)
            ),
            None,
        )
    } else {
        (
            CheckStatus::Warn,
            format!(
                "not available with the {} backend without a working ipset: VMs with \
                 --allow-host are refused",
                b.name()
            ),
            Some("apt-get install ipset (or nftables, with nat_backend = \"auto\")".to_string()),
        )
    };
    Check {
        area: "network".into(),
        name: "egress allowlist".into(),
        status,
        detail,
        hint,
    }
}

fn set_kind(b: &dyn NatBackend) -> &'static str {
    if b.name() == "nft" {
        "nftables sets"
    } else {
        "ipsets"
    }
}

/// [`Network::egress_sink`]: adds allowed answers to the VM's nft set.
struct AllowSink(Arc<Network>);

#[async_trait]
impl EgressSink for AllowSink {
    async fn allow(
        &self,
        key: &str,
        addrs: Vec<(Ipv4Addr, u32)>,
    ) -> std::result::Result<(), String> {
        let backend = self.0.backend().map_err(|e| e.to_string())?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || backend.allow_addrs(&key, &addrs))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn flush(&self, key: &str) -> std::result::Result<(), String> {
        let backend = self.0.backend().map_err(|e| e.to_string())?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || backend.flush_allowed(&key))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
