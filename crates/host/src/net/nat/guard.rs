//! Per-port anti-spoofing: what a guest may send into the bridge, in nftables' `bridge` family
//! (one `bridge wick` table), for both NAT backends.
//!
//! ```text
//! table bridge wick {
//!   map ports { type ifname : verdict }              # TAP name -> jump vm-<key>-port
//!   chain prerouting { type filter hook prerouting priority filter; iifname vmap @ports }
//!   chain vm-<key>-port {
//!     ether saddr != MAC drop                        # forged source MAC
//!     ether type != { ip, arp } drop                 # IPv6, VLAN tags, anything else
//!     arp htype != 1 drop; arp ptype != ip drop; arp hlen != 6 drop; arp plen != 4 drop
//!     arp saddr ether != MAC drop                    # forged ARP sender
//!     arp saddr ip != { IP, 0.0.0.0 } drop           # own address (or an RFC 5227 probe) only
//!     ip saddr != IP drop                            # forged source IP
//!   }
//! }
//! ```
//! The bridge's `prerouting` hook sees every frame a port sends, whether it is bridged to another
//! port or delivered/routed by the host, so a guest can only ever speak with its own MAC and
//! leased IP. wick has no DHCP (the agent configures the leased address) and no guest IPv6, so
//! nothing else is needed. The element is added for the TAP name before the TAP exists (an
//! `ifname` map does not need the device), so a TAP is never a bridge port without its guard.
//!
//! Why nft's bridge family for the iptables backend too, and not `ebtables`: Debian's `ebtables`
//! is ebtables-nft, i.e. this same bridge family behind another syntax, and a host with only
//! `ebtables-legacy` and no `nft` is not supported: the VM is refused with a clear message
//! ([`PortGuard::apply`]) rather than run unprotected.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;

use crate::net::error::NetError;
use crate::net::link::{validate_ifname, validate_key};
use crate::net::runner::Runner;

/// The table (family `bridge`).
pub const GUARD_TABLE: &str = "wick";

/// The per-VM port chain: `vm-<key>-port`.
pub fn port_chain(key: &str) -> String {
    format!("{}{key}-port", super::nft::VM_CHAIN_PREFIX)
}

/// The VM key of a port chain name.
pub fn key_of_port_chain(chain: &str) -> Option<&str> {
    chain
        .strip_prefix(super::nft::VM_CHAIN_PREFIX)?
        .strip_suffix("-port")
        .filter(|k| validate_key(k).is_ok())
}

/// What the `bridge wick` table holds right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardState {
    /// The table exists.
    pub exists: bool,
    /// All chain names.
    pub chains: Vec<String>,
    /// `ports` elements: (port name, jump target chain).
    pub ports: Vec<(String, String)>,
}

/// Table, map and the base chain (rewritten). Idempotent.
pub fn guard_base_script() -> String {
    let t = format!("bridge {GUARD_TABLE}");
    let mut s = String::new();
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(s, "add map {t} ports {{ type ifname : verdict; }}");
    let _ = writeln!(
        s,
        "add chain {t} prerouting {{ type filter hook prerouting priority -200; policy accept; }}"
    );
    let _ = writeln!(s, "flush chain {t} prerouting");
    let _ = writeln!(s, "add rule {t} prerouting iifname vmap @ports");
    s
}

/// Statements deleting the VM's element(s) and chain. Empty when it has none.
pub fn unguard_script(state: &GuardState, key: &str) -> String {
    let t = format!("bridge {GUARD_TABLE}");
    let chain = port_chain(key);
    let mut s = String::new();
    for (port, target) in &state.ports {
        if *target == chain {
            let _ = writeln!(s, "delete element {t} ports {{ \"{port}\" }}");
        }
    }
    if state.chains.contains(&chain) {
        let _ = writeln!(s, "delete chain {t} {chain}");
    }
    s
}

/// The whole transaction guarding `port` for the VM `key` (MAC `mac`, address `ip`): base, removal
/// of the VM's old chain and of a stale element for the same port, then the chain and element.
pub fn guard_script(state: &GuardState, key: &str, port: &str, mac: &str, ip: Ipv4Addr) -> String {
    let t = format!("bridge {GUARD_TABLE}");
    let chain = port_chain(key);
    let mac = mac.to_ascii_lowercase();
    let mut s = guard_base_script();
    for (p, target) in &state.ports {
        if p == port && *target != chain {
            let _ = writeln!(s, "delete element {t} ports {{ \"{p}\" }}");
        }
    }
    s.push_str(&unguard_script(state, key));
    let _ = writeln!(s, "add chain {t} {chain}");
    for rule in [
        format!("ether saddr != {mac} drop"),
        "ether type != { ip, arp } drop".to_string(),
        "arp htype != 1 drop".to_string(),
        "arp ptype != ip drop".to_string(),
        "arp hlen != 6 drop".to_string(),
        "arp plen != 4 drop".to_string(),
        format!("arp saddr ether != {mac} drop"),
        format!("arp saddr ip != {{ {ip}, 0.0.0.0 }} drop"),
        format!("ip saddr != {ip} drop"),
    ] {
        let _ = writeln!(s, "add rule {t} {chain} {rule}");
    }
    let _ = writeln!(s, "add element {t} ports {{ \"{port}\" : jump {chain} }}");
    s
}

/// Parses `nft -j list table bridge wick`.
pub fn parse_guard_state(json: &str) -> Result<GuardState, NetError> {
    let items = super::nft::nft_items(json, &format!("nft -j list table bridge {GUARD_TABLE}"))?;
    let mut st = GuardState::default();
    for item in &items {
        if item.get("table").is_some() {
            st.exists = true;
        }
        if let Some(name) = item.pointer("/chain/name").and_then(Value::as_str) {
            st.chains.push(name.to_string());
        }
        let Some(map) = item.get("map").filter(|m| m["name"] == "ports") else {
            continue;
        };
        for e in map["elem"].as_array().into_iter().flatten() {
            let port = e.get(0).and_then(Value::as_str);
            let target = e
                .get(1)
                .and_then(|d| d.pointer("/jump/target"))
                .and_then(Value::as_str);
            if let (Some(p), Some(t)) = (port, target) {
                st.ports.push((p.to_string(), t.to_string()));
            }
        }
    }
    Ok(st)
}

/// The anti-spoofing guard of VM bridge ports (used by both NAT backends).
pub struct PortGuard {
    runner: Arc<dyn Runner>,
}

impl PortGuard {
    /// A guard running `nft` through `runner`.
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        Self { runner }
    }

    /// Reads the table: empty when it does not exist or `nft` is not installed (then no guard
    /// can exist either).
    pub fn state(&self) -> Result<GuardState, NetError> {
        match super::nft::list_table(&*self.runner, "bridge", GUARD_TABLE) {
            Ok(Some(json)) => parse_guard_state(&json),
            Ok(None) => Ok(GuardState::default()),
            Err(NetError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(GuardState::default())
            }
            Err(e) => Err(e),
        }
    }

    fn apply_script(&self, script: &str) -> Result<(), NetError> {
        super::nft::apply_script(&*self.runner, script)
    }

    /// Lets `port` (the VM's TAP) send only frames from `mac` and `ip` (see the module doc).
    /// Idempotent; one atomic transaction. Fails, naming the cause, when nftables' bridge family
    /// is unusable: the caller must then not start the VM.
    pub fn apply(&self, key: &str, port: &str, mac: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        validate_key(key)?;
        validate_ifname(port)?;
        if mac.len() != 17
            || !mac.bytes().enumerate().all(|(i, b)| {
                if i % 3 == 2 {
                    b == b':'
                } else {
                    b.is_ascii_hexdigit()
                }
            })
        {
            return Err(NetError::Invalid(format!("MAC address {mac:?}")));
        }
        let state = self.state()?;
        self.apply_script(&guard_script(&state, key, port, mac, ip))
            .map_err(|e| {
                NetError::Unguarded(format!(
                    "it needs nftables' bridge family (install nftables): {e}"
                ))
            })
    }

    /// Removes the VM's guard; `Ok(false)` when it had none.
    pub fn remove(&self, key: &str) -> Result<bool, NetError> {
        validate_key(key)?;
        let script = unguard_script(&self.state()?, key);
        self.apply_script(&script)?;
        Ok(!script.is_empty())
    }

    /// Keys of the VMs that have a guard (chain or element).
    pub fn list_keys(&self) -> Result<Vec<String>, NetError> {
        let st = self.state()?;
        let mut keys: Vec<String> = st
            .chains
            .iter()
            .chain(st.ports.iter().map(|(_, t)| t))
            .filter_map(|c| key_of_port_chain(c))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Deletes the whole `bridge wick` table (nothing else).
    pub fn remove_all(&self) -> Result<(), NetError> {
        if !self.state()?.exists {
            return Ok(());
        }
        self.apply_script(&format!("delete table bridge {GUARD_TABLE}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    const NONE: &str = "Error: No such file or directory\nlist table bridge wick\n";

    #[test]
    fn golden_guard_on_empty_host() {
        let r = Arc::new(RecordingRunner::new());
        r.respond("nft -j list table bridge", 1, "", NONE);
        let g = PortGuard::new(r.clone());
        g.apply(
            "0123456789ab",
            "wk-0123456789ab",
            "06:00:AC:1E:00:05",
            "172.30.0.5".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(r.lines(), ["nft -j list table bridge wick", "nft -f -"]);
        assert_eq!(
            r.stdins(),
            [r#"add table bridge wick
add map bridge wick ports { type ifname : verdict; }
add chain bridge wick prerouting { type filter hook prerouting priority -200; policy accept; }
flush chain bridge wick prerouting
add rule bridge wick prerouting iifname vmap @ports
add chain bridge wick vm-0123456789ab-port
add rule bridge wick vm-0123456789ab-port ether saddr != 06:00:ac:1e:00:05 drop
add rule bridge wick vm-0123456789ab-port ether type != { ip, arp } drop
add rule bridge wick vm-0123456789ab-port arp htype != 1 drop
add rule bridge wick vm-0123456789ab-port arp ptype != ip drop
add rule bridge wick vm-0123456789ab-port arp hlen != 6 drop
add rule bridge wick vm-0123456789ab-port arp plen != 4 drop
add rule bridge wick vm-0123456789ab-port arp saddr ether != 06:00:ac:1e:00:05 drop
add rule bridge wick vm-0123456789ab-port arp saddr ip != { 172.30.0.5, 0.0.0.0 } drop
add rule bridge wick vm-0123456789ab-port ip saddr != 172.30.0.5 drop
add element bridge wick ports { "wk-0123456789ab" : jump vm-0123456789ab-port }
"#]
        );
    }

    const STATE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "bridge", "name": "wick", "handle": 1}},
      {"map": {"family": "bridge", "name": "ports", "table": "wick", "type": "ifname", "map": "verdict",
        "elem": [["wk-a", {"jump": {"target": "vm-a-port"}}], ["wk-c", {"jump": {"target": "vm-b-port"}}]]}},
      {"chain": {"family": "bridge", "table": "wick", "name": "prerouting", "handle": 2}},
      {"chain": {"family": "bridge", "table": "wick", "name": "vm-a-port", "handle": 4}},
      {"chain": {"family": "bridge", "table": "wick", "name": "vm-b-port", "handle": 5}}]}"#;

    #[test]
    fn golden_reguard_replaces_stale_and_remove_is_idempotent() {
        let r = Arc::new(RecordingRunner::new());
        r.respond("nft -j list table bridge", 0, STATE, "");
        let g = PortGuard::new(r.clone());
        assert_eq!(g.list_keys().unwrap(), ["a", "b"]);
        // VM "c" gets the port wk-c that a stale element still sends to vm-b-port.
        g.apply(
            "c",
            "wk-c",
            "06:00:ac:1e:00:07",
            "172.30.0.7".parse().unwrap(),
        )
        .unwrap();
        let s = r.stdins().pop().unwrap();
        assert!(
            s.contains("delete element bridge wick ports { \"wk-c\" }\nadd chain"),
            "{s}"
        );
        r.clear();
        assert!(g.remove("a").unwrap());
        assert_eq!(
            r.stdins(),
            ["delete element bridge wick ports { \"wk-a\" }\ndelete chain bridge wick vm-a-port\n"]
        );
        r.clear();
        assert!(!g.remove("zzz").unwrap());
        assert_eq!(r.lines(), ["nft -j list table bridge wick"]);
        // No table: nothing to remove.
        let r = Arc::new(RecordingRunner::new());
        r.respond("nft -j list table bridge", 1, "", NONE);
        let g = PortGuard::new(r.clone());
        assert!(!g.remove("a").unwrap());
        g.remove_all().unwrap();
        assert!(g.list_keys().unwrap().is_empty());
        assert!(r.stdins().is_empty());
    }

    #[test]
    fn rejects_bad_input_and_names_a_missing_bridge_family() {
        let r = Arc::new(RecordingRunner::new());
        let g = PortGuard::new(r.clone());
        let ip = "172.30.0.5".parse().unwrap();
        assert!(g.apply("a;b", "wk-a", "06:00:ac:1e:00:05", ip).is_err());
        assert!(g.apply("a", "wk a", "06:00:ac:1e:00:05", ip).is_err());
        assert!(g.apply("a", "wk-a", "06:00:ac:1e:00:5; drop", ip).is_err());
        assert!(r.lines().is_empty());
        r.respond("nft -j list table bridge", 1, "", NONE);
        r.respond(
            "nft -f",
            1,
            "",
            "Error: Could not process rule: Operation not supported",
        );
        let e = g
            .apply("a", "wk-a", "06:00:ac:1e:00:05", ip)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to start it unprotected"), "{e}");
        assert!(e.contains("install nftables"), "{e}");
    }
}
