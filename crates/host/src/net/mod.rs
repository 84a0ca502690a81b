//! Host network plumbing for VMs: the bridge, one TAP per VM, guest isolation, NAT, ip_forward and
//! the leftover sweep — every command executed through a [`Runner`] so the generated commands and
//! rules are golden-tested with the recording fake (`cmd::testing::RecordingRunner`) and
//! exercised for real inside private network namespaces (`testns`, feature `testing`).
//!
//! # Layout on the host
//! - Bridge [`DEFAULT_BRIDGE`] (`wick0`, configurable) with address [`DEFAULT_BRIDGE_CIDR`]
//!   (`172.30.0.1/24`): the guests' gateway and DNS server.
//! - One persistent TAP per VM named [`tap_name`]`(vm_id)` = `wk-<first 12 chars of the id>`,
//!   created, enslaved, isolated and up **before** the VMM starts. Every wick-made VM interface
//!   starts with `wk-`, which is what the [`sweep`](sweep()) looks for.
//! - NAT (opt-in per VM) and host isolation through a [`NatBackend`]: nftables table `inet wick`
//!   or iptables chains `WICK-*`.
//!
//! # Isolation, and opting in to VM-to-VM traffic
//! Guests cannot talk to each other: every TAP is a bridge port with **port isolation** on
//! (isolated ports can only reach non-isolated ports, i.e. the bridge/host). Guests reach the host
//! only for DNS (udp/tcp 53 to the bridge IP), ICMP echo to the bridge IP and replies to
//! connections the host opened ([`NatBackend::apply_host_isolation`]), and reach the outside only
//! through NAT, when the VM has it.
//!
//! To let VMs talk to each other, set `allow_vm_to_vm = true` in the daemon config: the daemon
//! then creates TAPs with `isolated = false` ([`create_tap`]). By hand, on a live host:
//! `bridge link set dev wk-<key> isolated off` ([`set_port_isolation`]). Note the kernel's rule:
//! an isolated port can still talk to any **non-isolated** port, so turning isolation off on one
//! VM's TAP opens that VM to every VM on the bridge, not to one chosen peer (tested in
//! `tests/net_bridge.rs`). Bridged guest-to-guest frames cross FORWARD (with `br_netfilter`) with
//! in = out = the bridge, like traffic a guest *routes* to another through the gateway: the NAT
//! backends drop that unless built `with_vm_to_vm(true)` (the daemon's `allow_vm_to_vm`), so
//! without the opt-in neither path works, and with it both do.
//!
//! # Anti-spoofing
//! Every VM's port also gets a [`PortGuard`] (nftables `bridge` family): only frames from the
//! VM's own MAC and leased IPv4 address, ARP for that address only, no IPv6 or other ethertypes.
//!
//! # Durability
//! Nothing here keeps state in memory: names derive from the VM id ([`vm_key`], [`tap_name`]),
//! every operation is idempotent, and [`sweep()`] / [`leftovers`] find whatever a crash left.
//! The caller persists the TAP name and NAT state before calling in, and the bool returned by
//! [`ForwardGuard::ensure_enabled`].

mod addr;
mod error;
mod forward;
mod link;
pub mod nat;
mod runner;
mod sweep;
#[cfg(any(test, feature = "testing"))]
pub mod testns;

pub use addr::{guest_ip_range, guest_mac, nth_host, Ipv4Cidr};
pub use error::NetError;
pub use forward::{ForwardGuard, IP_FORWARD};
pub use link::{
    attach_port, create_tap, create_tap_owned, delete_link, delete_tap, get_link, key_of_link,
    list_links, list_wick_links, parse_links, set_port_isolation, tap_name, validate_ifname,
    validate_key, vm_key, Bridge, Link, DEFAULT_BRIDGE, DEFAULT_BRIDGE_CIDR, IFNAME_MAX, KEY_LEN,
    LINK_PREFIX,
};
pub use nat::{detect_backend, IptablesNat, NatBackend, NftNat, PortGuard};
pub use runner::{run_ok, Runner, SystemRunner};
pub use sweep::{keep_set, leftovers, sweep, SweepReport};
