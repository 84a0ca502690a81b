//! The egress allowlist's nft pieces: a per-VM address set `vm-<key>-allow` in `inet wick`,
//! created with the VM's NAT chains (so `remove_vm`, `list_vm_keys` and hence the sweep cover
//! it), and the transactions that fill and flush it.
//!
//! ```text
//! set vm-<key>-allow { type ipv4_addr; flags timeout; }
//! chain vm-<key>-filter {
//!   iifname BR ip saddr GUEST OUT ip daddr @vm-<key>-allow ct mark set ct mark | MARK accept
//!   iifname BR ip saddr GUEST OUT ct state established,related ct mark & MARK == MARK accept
//!   oifname BR ip daddr GUEST ct state established,related accept }
//! ```
//! Everything else the guest sends out falls through to the base chain's drop. The guest's
//! established connections pass only when they were opened through the set ([`ALLOWED_CT_MARK`]
//! on their conntrack entry): a connection opened while the VM had `--nat` (or before a live
//! switch) does not survive the switch to an allowlist. Elements carry
//! the timeout the resolver asks for (twice the DNS record's TTL, clamped here to
//! [`ALLOW_TIMEOUT_MIN`]..=[`ALLOW_TIMEOUT_MAX`]), so the kernel forgets them by itself.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::nft::{vm_chains, TABLE, VM_CHAIN_PREFIX};

/// Shortest element timeout, in seconds: a record with a TTL of 0 or a few seconds still gives
/// the guest time to connect after resolving.
pub const ALLOW_TIMEOUT_MIN: u32 = 30;
/// Longest element timeout, in seconds (one day), whatever TTL the upstream gave.
pub const ALLOW_TIMEOUT_MAX: u32 = 86_400;

/// The conntrack mark bit set on connections a guest opened to an address of its allowlist set;
/// only such connections' later packets are accepted as established (one bit, kept with `|` so
/// other users of the conntrack mark keep theirs).
pub const ALLOWED_CT_MARK: u32 = 0x0100_0000;

/// The allowlist set of a VM: `vm-<key>-allow`.
pub fn allow_set(key: &str) -> String {
    format!("{VM_CHAIN_PREFIX}{key}-allow")
}

/// The statements creating the (empty) set and the allowlist filter chain's rules; the caller
/// has deleted the VM's old chains and set in the same transaction.
pub(super) fn allowlist_rules(bridge: &str, key: &str, ip: Ipv4Addr, out: &str) -> String {
    let t = format!("inet {TABLE}");
    let (_, filter) = vm_chains(key);
    let set = allow_set(key);
    let mut s = String::new();
    let _ = writeln!(s, "add set {t} {set} {{ type ipv4_addr; flags timeout; }}");
    let _ = writeln!(s, "add chain {t} {filter}");
    let _ = writeln!(
        s,
        "add rule {t} {filter} iifname \"{bridge}\" ip saddr {ip} {out} ip daddr @{set} \
         ct mark set ct mark | {ALLOWED_CT_MARK:#010x} accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} {filter} iifname \"{bridge}\" ip saddr {ip} {out} ct state established,related \
         ct mark & {ALLOWED_CT_MARK:#010x} == {ALLOWED_CT_MARK:#010x} accept"
    );
    s
}

/// The transaction adding (or refreshing the timeout of) `addrs` in the VM's set. An existing
/// element keeps its old timeout on `add`, so each address is first made to exist, deleted,
/// then added with its new timeout: one atomic transaction, correct whether it existed or not.
pub fn allow_addrs_script(key: &str, addrs: &[(Ipv4Addr, u32)]) -> String {
    let t = format!("inet {TABLE}");
    let set = allow_set(key);
    let mut s = String::new();
    for (ip, ttl) in addrs {
        let secs = (*ttl).clamp(ALLOW_TIMEOUT_MIN, ALLOW_TIMEOUT_MAX);
        let _ = writeln!(s, "add element {t} {set} {{ {ip} timeout 1s }}");
        let _ = writeln!(s, "delete element {t} {set} {{ {ip} }}");
        let _ = writeln!(s, "add element {t} {set} {{ {ip} timeout {secs}s }}");
    }
    s
}

/// The transaction emptying the VM's set.
pub fn flush_script(key: &str) -> String {
    format!("flush set inet {TABLE} {}\n", allow_set(key))
}

/// Whether `ip` may go into an allowlist set: a unicast address outside loopback, "this
/// network", multicast and broadcast (never a legitimate destination to forward to) and
/// link-local 169.254/16 (cloud metadata services hand out the host's credentials there; an
/// allowed name whose zone encodes addresses, such as `*.nip.io`, must not open it).
pub fn allowable(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_allow_and_flush() {
        let s = allow_addrs_script(
            "0123456789ab",
            &[
                ("198.51.100.10".parse().unwrap(), 300),
                ("198.51.100.11".parse().unwrap(), 0),
                ("198.51.100.12".parse().unwrap(), u32::MAX),
            ],
        );
        assert_eq!(
            s,
            "add element inet wick vm-0123456789ab-allow { 198.51.100.10 timeout 1s }
delete element inet wick vm-0123456789ab-allow { 198.51.100.10 }
add element inet wick vm-0123456789ab-allow { 198.51.100.10 timeout 300s }
add element inet wick vm-0123456789ab-allow { 198.51.100.11 timeout 1s }
delete element inet wick vm-0123456789ab-allow { 198.51.100.11 }
add element inet wick vm-0123456789ab-allow { 198.51.100.11 timeout 30s }
add element inet wick vm-0123456789ab-allow { 198.51.100.12 timeout 1s }
delete element inet wick vm-0123456789ab-allow { 198.51.100.12 }
add element inet wick vm-0123456789ab-allow { 198.51.100.12 timeout 86400s }
"
        );
        assert_eq!(flush_script("ab"), "flush set inet wick vm-ab-allow\n");
    }

    #[test]
    fn only_unicast_destinations_are_allowable() {
        for bad in [
            "169.254.169.254",
            "127.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!allowable(bad.parse().unwrap()), "{bad}");
        }
        assert!(allowable("198.51.100.10".parse().unwrap()));
    }
}
