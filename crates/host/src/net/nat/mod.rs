//! NAT for opted-in VMs, plus the host-side isolation filter, behind [`NatBackend`].
//!
//! Two backends: [`NftNat`] (preferred: one `inet wick` table, per-VM chains, every change one
//! atomic `nft -f -` transaction) and [`IptablesNat`] (fallback, `iptables` = iptables-nft or
//! `iptables-legacy`: wick's own `WICK-*` chains, per-VM rules tagged `wick:vm-<key>`).
//! [`detect_backend`] picks one. Both only ever touch wick's own table/chains.
//!
//! What a NAT'd VM gets (both backends):
//! - MASQUERADE for `guest_ip/32` going out of anything but the bridge (or only `out_iface`);
//! - FORWARD accept from the guest (in via the bridge) and established/related back to it.
//!
//! What every guest gets (the base rules, installed with the first VM or by
//! [`NatBackend::apply_host_isolation`]): forwarded traffic between the bridge and any other
//! interface is dropped unless a VM's NAT rules accept it, so a non-NAT VM cannot reach (or be
//! reached from) the outside even when the host forwards for other reasons. Routed packets from a
//! guest arrive on the **bridge** (not on its TAP), so per-VM rules match the guest IP. Unless the
//! backend was built `with_vm_to_vm(true)` (the daemon's `allow_vm_to_vm`), traffic routed from
//! the bridge back into the bridge (guest -> gateway -> other guest) is dropped too: port isolation
//! only stops *bridged* guest-to-guest frames. IPv6 from the bridge is dropped at input and in
//! forward (guests get no IPv6; `inet` table for nft, `ip6tables` for the iptables backend).
//!
//! An **egress allowlist** VM (see [`NatBackend::enable_allowlist`]) gets the same rules, but its
//! forward accept matches only destinations in its own address set (nft set `vm-<key>-allow`,
//! elements with timeouts), which wickd's DNS resolver fills with the answers to allowed names
//! ([`NatBackend::allow_addrs`]). The iptables backend does the same with an ipset per VM
//! (`wick-vm-<key>`) when `ipset` works, and refuses otherwise ([`NetError::Unsupported`]).
//!
//! Every VM port also gets an anti-spoofing guard ([`PortGuard`], nftables' `bridge` family, for
//! both backends): the guest may send only from its own MAC and leased IP. Its state is derived
//! from the VM key like the NAT rules, and [`NatBackend::remove_vm`] / [`NatBackend::list_vm_keys`]
//! cover it, so the sweep removes a crashed VM's guard too.

mod egress;
mod guard;
mod ipset;
mod iptables;
mod nft;

use std::net::Ipv4Addr;
use std::sync::Arc;

pub use egress::{allow_set, ALLOW_TIMEOUT_MAX, ALLOW_TIMEOUT_MIN};
pub use guard::{guard_script, key_of_port_chain, port_chain, GuardState, PortGuard};
pub use ipset::{ipset_name, key_of_ipset};
pub use iptables::IptablesNat;
pub use nft::NftNat;

use super::error::NetError;
use super::link::validate_ifname;
use super::runner::Runner;

/// A NAT (and host isolation) backend. All operations are idempotent.
pub trait NatBackend: Send + Sync {
    /// `nft`, `iptables` or `iptables-legacy`.
    fn name(&self) -> &str;

    /// Enables NAT for one VM (replacing whatever rules that VM had).
    fn enable(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        tap: &str,
        out_iface: Option<&str>,
    ) -> Result<(), NetError>;

    /// Whether [`enable_allowlist`](Self::enable_allowlist) and the set operations work here.
    fn supports_allowlist(&self) -> bool {
        false
    }

    /// Enables NAT for one VM restricted to its allowlist set (replacing whatever rules the VM
    /// had; the set starts empty): forwarded traffic from the guest is accepted only towards
    /// addresses in the set `vm-<key>-allow` (plus replies and connections already established).
    /// Backends without address sets refuse with [`NetError::Unsupported`].
    fn enable_allowlist(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        tap: &str,
        out_iface: Option<&str>,
    ) -> Result<(), NetError> {
        let _ = (vm_key, guest_ip, tap, out_iface);
        Err(unsupported(self.name()))
    }

    /// Adds (or refreshes) addresses in the VM's allowlist set, each with its timeout in
    /// seconds (clamped to [`ALLOW_TIMEOUT_MIN`]..=[`ALLOW_TIMEOUT_MAX`]). One transaction.
    fn allow_addrs(&self, vm_key: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), NetError> {
        let _ = (vm_key, addrs);
        Err(unsupported(self.name()))
    }

    /// Empties the VM's allowlist set (after names were removed from its allowlist); `Ok` when
    /// it has none.
    fn flush_allowed(&self, vm_key: &str) -> Result<(), NetError> {
        let _ = vm_key;
        Err(unsupported(self.name()))
    }

    /// Disables NAT for one VM; `Ok` when it had none.
    fn disable(&self, vm_key: &str, guest_ip: Ipv4Addr, tap: &str) -> Result<(), NetError>;

    /// Installs (or replaces) the anti-spoofing guard of the VM's bridge port `tap`: only frames
    /// from `mac` and `ip` (see [`PortGuard`]). Call it before the TAP joins the bridge; an error
    /// means the VM must not start.
    fn guard_port(
        &self,
        vm_key: &str,
        tap: &str,
        mac: &str,
        guest_ip: Ipv4Addr,
    ) -> Result<(), NetError>;

    /// Removes the VM's port guard; `Ok(false)` when it had none.
    fn unguard_port(&self, vm_key: &str) -> Result<bool, NetError>;

    /// Removes every rule of the VM with this key (NAT rules and port guard; what
    /// [`disable`](Self::disable) and [`unguard_port`](Self::unguard_port) do, for the sweep,
    /// which knows only keys). Returns whether anything was removed.
    fn remove_vm(&self, vm_key: &str) -> Result<bool, NetError>;

    /// Keys of the VMs that currently have NAT rules or a port guard (sorted, unique).
    fn list_vm_keys(&self) -> Result<Vec<String>, NetError>;

    /// Installs (or refreshes) the host input filter on the bridge: guests may reach the host only
    /// for DNS (udp/tcp 53 to `bridge_ip`), ICMP echo to `bridge_ip` and established traffic;
    /// everything else arriving from the bridge is dropped (IPv6 too, but neighbour discovery).
    /// Also installs the base forward rules.
    fn apply_host_isolation(&self, bridge_ip: Ipv4Addr) -> Result<(), NetError>;

    /// Removes wick's own tables/chains entirely, the port guard's included (nothing else).
    fn remove_all_wick(&self) -> Result<(), NetError>;
}

pub(crate) fn unsupported(backend: &str) -> NetError {
    NetError::Unsupported(format!(
        "the egress allowlist needs per-VM address sets (nftables, or ipset with iptables); \
         this daemon uses the {backend} backend and `ipset list -n` does not work here \
         (install ipset, or nftables with nat_backend = \"nft\" or \"auto\")"
    ))
}

/// Picks the backend: `nft` if `nft list tables` works, else `iptables` if it works, else
/// `iptables-legacy`; [`NetError::NoBackend`] (listing every failure) when none does.
/// `allow_vm_to_vm` is passed on to the backend's `with_vm_to_vm`.
pub fn detect_backend(
    runner: Arc<dyn Runner>,
    bridge: &str,
    allow_vm_to_vm: bool,
) -> Result<Box<dyn NatBackend>, NetError> {
    validate_ifname(bridge)?;
    let mut why = Vec::new();
    match super::runner::run_ok(&*runner, "nft", &["list", "tables"], None) {
        Ok(_) => {
            return Ok(Box::new(
                NftNat::new(runner, bridge)?.with_vm_to_vm(allow_vm_to_vm),
            ))
        }
        Err(e) => why.push(e.to_string()),
    }
    for bin in ["iptables", "iptables-legacy"] {
        match super::runner::run_ok(
            &*runner,
            bin,
            &["-w", "-t", "nat", "-S", "POSTROUTING"],
            None,
        ) {
            Ok(_) => {
                return Ok(Box::new(
                    IptablesNat::new(runner, bin, bridge)?.with_vm_to_vm(allow_vm_to_vm),
                ))
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(NetError::NoBackend(why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    #[test]
    fn detect_prefers_nft_then_iptables_then_legacy() {
        let r = Arc::new(RecordingRunner::new());
        assert_eq!(
            detect_backend(r.clone(), "wick0", false).unwrap().name(),
            "nft"
        );

        let r = Arc::new(RecordingRunner::new());
        r.respond(
            "nft",
            1,
            "",
            "Error: Could not process rule: Operation not supported",
        );
        assert_eq!(
            detect_backend(r.clone(), "wick0", false).unwrap().name(),
            "iptables"
        );

        let r = Arc::new(RecordingRunner::new());
        r.respond("nft", 1, "", "nope");
        r.respond(
            "iptables ",
            3,
            "",
            "iptables v1.8.9 (nf_tables): table nat missing",
        );
        let b = detect_backend(r.clone(), "wick0", false).unwrap();
        assert_eq!(b.name(), "iptables-legacy");

        let r = Arc::new(RecordingRunner::new());
        r.respond("", 1, "", "broken");
        let e = detect_backend(r.clone(), "wick0", false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nft list tables"), "{e}");
        assert!(
            e.contains("iptables-legacy -w -t nat -S POSTROUTING"),
            "{e}"
        );
    }
}
