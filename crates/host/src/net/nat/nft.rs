//! The nftables backend: one `inet wick` table.
//!
//! ```text
//! table inet wick {
//!   map nat_vms { type ipv4_addr : verdict }   # guest ip -> jump vm-<key>-nat
//!   map fwd_vms { type ipv4_addr : verdict }   # guest ip -> jump vm-<key>-filter
//!   chain postrouting { type nat hook postrouting priority srcnat; ip saddr vmap @nat_vms }
//!   chain forward { type filter hook forward priority filter;
//!     iifname BR oifname BR drop                    # routed guest->guest, unless allow_vm_to_vm
//!     iifname BR ip saddr vmap @fwd_vms; oifname BR ip daddr vmap @fwd_vms
//!     iifname BR oifname != BR drop; oifname BR iifname != BR drop }
//!   chain input { ... host isolation, see apply_host_isolation ... }
//!   chain vm-<key>-nat { ip saddr GUEST oifname != BR masquerade }
//!   chain vm-<key>-filter { iifname BR ip saddr GUEST oifname != BR accept;
//!     oifname BR ip daddr GUEST ct state established,related accept }
//! }
//! ```
//! An allowlist VM's filter chain accepts only destinations in its set `vm-<key>-allow` (see
//! [`super::egress`]).
//! The per-VM chains are reached through verdict maps, so adding or removing a VM is one
//! transaction of `add`/`delete element` + chain, with no rule handles involved. Every change is
//! a single `nft -f -` script: it applies entirely or not at all. The table is `inet`, so the
//! input and forward drops cover IPv6 as well. The port guard lives in `bridge wick`
//! ([`super::PortGuard`]).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;

use crate::net::error::NetError;
use crate::net::link::{validate_ifname, validate_key};
use crate::net::runner::{command_error, run, run_ok, stderr_lower, Runner};

use super::egress::{allow_addrs_script, allow_set, allowable, allowlist_rules, flush_script};
use super::{NatBackend, PortGuard};

/// The table (family `inet`).
pub const TABLE: &str = "wick";
/// Prefix of per-VM chains.
pub const VM_CHAIN_PREFIX: &str = "vm-";

/// nftables NAT backend.
pub struct NftNat {
    runner: Arc<dyn Runner>,
    bridge: String,
    allow_vm_to_vm: bool,
    guard: PortGuard,
}

/// What wick's table holds right now (from `nft -j list table inet wick`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftState {
    /// The table exists.
    pub exists: bool,
    /// All chain names in the table.
    pub chains: Vec<String>,
    /// `nat_vms` elements: (guest ip, jump target chain).
    pub nat_elems: Vec<(String, String)>,
    /// `fwd_vms` elements: (guest ip, jump target chain).
    pub fwd_elems: Vec<(String, String)>,
    /// All set names in the table (the allowlist sets `vm-<key>-allow`).
    pub sets: Vec<String>,
}

/// The per-VM chain names: (`vm-<key>-nat`, `vm-<key>-filter`).
pub fn vm_chains(key: &str) -> (String, String) {
    (
        format!("{VM_CHAIN_PREFIX}{key}-nat"),
        format!("{VM_CHAIN_PREFIX}{key}-filter"),
    )
}

/// The VM key of a per-VM chain name.
pub fn key_of_chain(chain: &str) -> Option<&str> {
    let rest = chain.strip_prefix(VM_CHAIN_PREFIX)?;
    rest.strip_suffix("-nat")
        .or_else(|| rest.strip_suffix("-filter"))
        .or_else(|| rest.strip_suffix("-allow"))
        .filter(|k| validate_key(k).is_ok())
}

/// Statements that create the table, maps and base chains and (re)write the base chains' rules.
/// Idempotent, and safe to prepend to any transaction. Unless `vm_to_vm`, traffic routed from
/// the bridge back into it (guest -> gateway -> guest) is dropped first.
pub fn base_script(bridge: &str, vm_to_vm: bool) -> String {
    let t = format!("inet {TABLE}");
    let mut s = String::new();
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(s, "add map {t} nat_vms {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(s, "add map {t} fwd_vms {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(
        s,
        "add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}"
    );
    let _ = writeln!(s, "flush chain {t} postrouting");
    let _ = writeln!(s, "add rule {t} postrouting ip saddr vmap @nat_vms");
    let _ = writeln!(s, "flush chain {t} forward");
    if !vm_to_vm {
        let _ = writeln!(
            s,
            "add rule {t} forward iifname \"{bridge}\" oifname \"{bridge}\" drop"
        );
    }
    let _ = writeln!(
        s,
        "add rule {t} forward iifname \"{bridge}\" ip saddr vmap @fwd_vms"
    );
    let _ = writeln!(
        s,
        "add rule {t} forward oifname \"{bridge}\" ip daddr vmap @fwd_vms"
    );
    let _ = writeln!(
        s,
        "add rule {t} forward iifname \"{bridge}\" oifname != \"{bridge}\" drop"
    );
    let _ = writeln!(
        s,
        "add rule {t} forward oifname \"{bridge}\" iifname != \"{bridge}\" drop"
    );
    s
}

/// Statements deleting everything that belongs to `key` in `state` (map elements pointing at its
/// chains, then the chains). Empty when it has nothing.
pub fn remove_vm_script(state: &NftState, key: &str) -> String {
    let t = format!("inet {TABLE}");
    let (nat, filter) = vm_chains(key);
    let mut s = String::new();
    for (map, elems) in [("nat_vms", &state.nat_elems), ("fwd_vms", &state.fwd_elems)] {
        for (ip, target) in elems {
            if *target == nat || *target == filter {
                let _ = writeln!(s, "delete element {t} {map} {{ {ip} }}");
            }
        }
    }
    for c in [&nat, &filter] {
        if state.chains.contains(c) {
            let _ = writeln!(s, "delete chain {t} {c}");
        }
    }
    // After the chains: their rules reference it.
    let set = allow_set(key);
    if state.sets.contains(&set) {
        let _ = writeln!(s, "delete set {t} {set}");
    }
    s
}

/// The whole transaction enabling NAT for one VM, given the table's current state: base, removal
/// of the VM's old entries and of stale entries for the same guest IP, then the VM's chains and
/// map elements. With `allowlist`, the filter chain accepts only destinations in the VM's
/// (new, empty) allowlist set.
pub fn enable_script(
    bridge: &str,
    vm_to_vm: bool,
    state: &NftState,
    key: &str,
    guest_ip: Ipv4Addr,
    out_iface: Option<&str>,
    allowlist: bool,
) -> String {
    let t = format!("inet {TABLE}");
    let (nat, filter) = vm_chains(key);
    let ip = guest_ip.to_string();
    let mut s = base_script(bridge, vm_to_vm);
    // Elements for this IP that point elsewhere (a stale VM that had the IP) must go first, or
    // `add element` fails with "File exists". Then drop this VM's own old entries.
    for (map, elems) in [("nat_vms", &state.nat_elems), ("fwd_vms", &state.fwd_elems)] {
        for (eip, target) in elems {
            if *eip == ip && *target != nat && *target != filter {
                let _ = writeln!(s, "delete element {t} {map} {{ {eip} }}");
            }
        }
    }
    s.push_str(&remove_vm_script(state, key));
    let out = match out_iface {
        Some(o) => format!("oifname \"{o}\""),
        None => format!("oifname != \"{bridge}\""),
    };
    let _ = writeln!(s, "add chain {t} {nat}");
    let _ = writeln!(s, "add rule {t} {nat} ip saddr {ip} {out} masquerade");
    if allowlist {
        s.push_str(&allowlist_rules(bridge, key, guest_ip, &out));
    } else {
        let _ = writeln!(s, "add chain {t} {filter}");
        let _ = writeln!(
            s,
            "add rule {t} {filter} iifname \"{bridge}\" ip saddr {ip} {out} accept"
        );
    }
    let _ = writeln!(
        s,
        "add rule {t} {filter} oifname \"{bridge}\" ip daddr {ip} ct state established,related accept"
    );
    let _ = writeln!(s, "add element {t} nat_vms {{ {ip} : jump {nat} }}");
    let _ = writeln!(s, "add element {t} fwd_vms {{ {ip} : jump {filter} }}");
    s
}

/// The transaction installing the host input filter (plus the base chains). The final drop
/// covers IPv6 too (`inet`); only neighbour discovery is let through.
pub fn isolation_script(bridge: &str, vm_to_vm: bool, bridge_ip: Ipv4Addr) -> String {
    let t = format!("inet {TABLE}");
    let b = format!("iifname \"{bridge}\"");
    let mut s = base_script(bridge, vm_to_vm);
    let _ = writeln!(
        s,
        "add chain {t} input {{ type filter hook input priority filter; policy accept; }}"
    );
    let _ = writeln!(s, "flush chain {t} input");
    let _ = writeln!(
        s,
        "add rule {t} input {b} ct state established,related accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} input {b} ip daddr {bridge_ip} udp dport 53 accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} input {b} ip daddr {bridge_ip} tcp dport 53 accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} input {b} ip daddr {bridge_ip} icmp type echo-request accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} input {b} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept"
    );
    let _ = writeln!(s, "add rule {t} input {b} drop");
    s
}

/// The items of `nft -j list …` output (`command` names it in errors).
pub(crate) fn nft_items(json: &str, command: &str) -> Result<Vec<Value>, NetError> {
    let bad = |detail: String| NetError::Parse {
        command: command.to_string(),
        detail,
    };
    let mut v: Value = serde_json::from_str(json.trim()).map_err(|e| bad(e.to_string()))?;
    match v.get_mut("nftables").map(Value::take) {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(bad("no \"nftables\" array".into())),
    }
}

/// Parses `nft -j list table inet wick`.
pub fn parse_state(json: &str) -> Result<NftState, NetError> {
    let items = nft_items(json, &format!("nft -j list table inet {TABLE}"))?;
    let mut st = NftState::default();
    for item in &items {
        if item.get("table").is_some() {
            st.exists = true;
        }
        if let Some(name) = item.pointer("/chain/name").and_then(Value::as_str) {
            st.chains.push(name.to_string());
        }
        if let Some(name) = item.pointer("/set/name").and_then(Value::as_str) {
            st.sets.push(name.to_string());
        }
        let Some(map) = item.get("map") else { continue };
        let list = match map.get("name").and_then(Value::as_str) {
            Some("nat_vms") => &mut st.nat_elems,
            Some("fwd_vms") => &mut st.fwd_elems,
            _ => continue,
        };
        for e in map
            .get("elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // [key, verdict]; the key may be wrapped ({"elem": {"val": ...}}) when it has options.
            let key = e
                .get(0)
                .and_then(|k| k.as_str().or_else(|| k.pointer("/elem/val")?.as_str()));
            let target = e
                .get(1)
                .and_then(|d| {
                    d.pointer("/jump/target")
                        .or_else(|| d.pointer("/goto/target"))
                })
                .and_then(Value::as_str);
            if let (Some(k), Some(t)) = (key, target) {
                list.push((k.to_string(), t.to_string()));
            }
        }
    }
    Ok(st)
}

impl NftNat {
    /// A backend for the bridge `bridge`, running `nft` through `runner`.
    pub fn new(runner: Arc<dyn Runner>, bridge: &str) -> Result<Self, NetError> {
        validate_ifname(bridge)?;
        Ok(Self {
            guard: PortGuard::new(runner.clone()),
            runner,
            bridge: bridge.to_string(),
            allow_vm_to_vm: false,
        })
    }

    /// Lets traffic routed from one guest to another through the host pass (the daemon's
    /// `allow_vm_to_vm`); dropped by default.
    pub fn with_vm_to_vm(mut self, allow: bool) -> Self {
        self.allow_vm_to_vm = allow;
        self
    }

    /// Reads wick's table (an empty state when it does not exist).
    pub fn state(&self) -> Result<NftState, NetError> {
        match list_table(&*self.runner, "inet", TABLE)? {
            Some(json) => parse_state(&json),
            None => Ok(NftState::default()),
        }
    }

    /// Removes the VM's NAT chains and elements (not its port guard).
    fn remove_nat(&self, vm_key: &str) -> Result<bool, NetError> {
        validate_key(vm_key)?;
        let script = remove_vm_script(&self.state()?, vm_key);
        self.apply(&script)?;
        Ok(!script.is_empty())
    }

    /// Enables the VM's rules, open or restricted to its allowlist set.
    fn enable_with(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        out_iface: Option<&str>,
        allowlist: bool,
    ) -> Result<(), NetError> {
        validate_key(vm_key)?;
        if let Some(o) = out_iface {
            validate_ifname(o)?;
        }
        let st = self.state()?;
        self.apply(&enable_script(
            &self.bridge,
            self.allow_vm_to_vm,
            &st,
            vm_key,
            guest_ip,
            out_iface,
            allowlist,
        ))
    }

    /// Applies one transaction.
    fn apply(&self, script: &str) -> Result<(), NetError> {
        apply_script(&*self.runner, script)
    }
}

/// The output of `nft -j list table FAMILY TABLE`; `None` when the table does not exist.
pub(crate) fn list_table(
    runner: &dyn Runner,
    family: &str,
    table: &str,
) -> Result<Option<String>, NetError> {
    let args = ["-j", "list", "table", family, table];
    let out = run(runner, "nft", &args, None)?;
    if !out.status.success() {
        if stderr_lower(&out).contains("no such file or directory") {
            return Ok(None);
        }
        return Err(command_error("nft", &args, &out));
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Runs `script` as one `nft -f -` transaction (nothing for an empty script).
pub(crate) fn apply_script(runner: &dyn Runner, script: &str) -> Result<(), NetError> {
    if script.is_empty() {
        return Ok(());
    }
    run_ok(runner, "nft", &["-f", "-"], Some(script)).map(|_| ())
}

impl NatBackend for NftNat {
    fn name(&self) -> &str {
        "nft"
    }

    fn enable(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        _tap: &str,
        out_iface: Option<&str>,
    ) -> Result<(), NetError> {
        self.enable_with(vm_key, guest_ip, out_iface, false)
    }

    fn supports_allowlist(&self) -> bool {
        true
    }

    fn enable_allowlist(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        _tap: &str,
        out_iface: Option<&str>,
    ) -> Result<(), NetError> {
        self.enable_with(vm_key, guest_ip, out_iface, true)
    }

    fn allow_addrs(&self, vm_key: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), NetError> {
        validate_key(vm_key)?;
        let addrs: Vec<(Ipv4Addr, u32)> = addrs
            .iter()
            .copied()
            .filter(|(ip, _)| allowable(*ip))
            .collect();
        self.apply(&allow_addrs_script(vm_key, &addrs))
    }

    fn flush_allowed(&self, vm_key: &str) -> Result<(), NetError> {
        validate_key(vm_key)?;
        if !self.state()?.sets.contains(&allow_set(vm_key)) {
            return Ok(());
        }
        self.apply(&flush_script(vm_key))
    }

    fn disable(&self, vm_key: &str, _guest_ip: Ipv4Addr, _tap: &str) -> Result<(), NetError> {
        self.remove_nat(vm_key).map(|_| ())
    }

    fn guard_port(&self, key: &str, tap: &str, mac: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        self.guard.apply(key, tap, mac, ip)
    }

    fn unguard_port(&self, vm_key: &str) -> Result<bool, NetError> {
        self.guard.remove(vm_key)
    }

    fn remove_vm(&self, vm_key: &str) -> Result<bool, NetError> {
        let nat = self.remove_nat(vm_key)?;
        let guarded = self.guard.remove(vm_key)?;
        Ok(nat || guarded)
    }

    fn list_vm_keys(&self) -> Result<Vec<String>, NetError> {
        let st = self.state()?;
        let mut keys: Vec<String> = self.guard.list_keys()?;
        keys.extend(
            st.chains
                .iter()
                .map(String::as_str)
                .chain(st.nat_elems.iter().map(|(_, t)| t.as_str()))
                .chain(st.fwd_elems.iter().map(|(_, t)| t.as_str()))
                .chain(st.sets.iter().map(String::as_str))
                .filter_map(key_of_chain)
                .map(str::to_string),
        );
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn apply_host_isolation(&self, bridge_ip: Ipv4Addr) -> Result<(), NetError> {
        self.apply(&isolation_script(
            &self.bridge,
            self.allow_vm_to_vm,
            bridge_ip,
        ))
    }

    fn remove_all_wick(&self) -> Result<(), NetError> {
        self.guard.remove_all()?;
        if !self.state()?.exists {
            return Ok(());
        }
        self.apply(&format!("delete table inet {TABLE}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    const BASE: &str = r#"add table inet wick
add map inet wick nat_vms { type ipv4_addr : verdict; }
add map inet wick fwd_vms { type ipv4_addr : verdict; }
add chain inet wick postrouting { type nat hook postrouting priority srcnat; policy accept; }
add chain inet wick forward { type filter hook forward priority filter; policy accept; }
flush chain inet wick postrouting
add rule inet wick postrouting ip saddr vmap @nat_vms
flush chain inet wick forward
add rule inet wick forward iifname "wick0" oifname "wick0" drop
add rule inet wick forward iifname "wick0" ip saddr vmap @fwd_vms
add rule inet wick forward oifname "wick0" ip daddr vmap @fwd_vms
add rule inet wick forward iifname "wick0" oifname != "wick0" drop
add rule inet wick forward oifname "wick0" iifname != "wick0" drop
"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn fake() -> (Arc<RecordingRunner>, NftNat) {
        let r = Arc::new(RecordingRunner::new());
        let n = NftNat::new(r.clone(), "wick0").unwrap();
        (r, n)
    }

    #[test]
    fn golden_enable_on_empty_host() {
        let (r, n) = fake();
        r.respond(
            "nft -j list table",
            1,
            "",
            "Error: No such file or directory\nlist table inet wick\n",
        );
        n.enable("0123456789ab", ip("172.30.0.5"), "wk-0123456789ab", None)
            .unwrap();
        assert_eq!(r.lines(), ["nft -j list table inet wick", "nft -f -"]);
        let want = format!(
            "{BASE}{}",
            r#"add chain inet wick vm-0123456789ab-nat
add rule inet wick vm-0123456789ab-nat ip saddr 172.30.0.5 oifname != "wick0" masquerade
add chain inet wick vm-0123456789ab-filter
add rule inet wick vm-0123456789ab-filter iifname "wick0" ip saddr 172.30.0.5 oifname != "wick0" accept
add rule inet wick vm-0123456789ab-filter oifname "wick0" ip daddr 172.30.0.5 ct state established,related accept
add element inet wick nat_vms { 172.30.0.5 : jump vm-0123456789ab-nat }
add element inet wick fwd_vms { 172.30.0.5 : jump vm-0123456789ab-filter }
"#
        );
        assert_eq!(r.stdins(), [want]);
    }

    const STATE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "inet", "name": "wick", "handle": 1}},
      {"map": {"family": "inet", "name": "nat_vms", "table": "wick", "type": "ipv4_addr", "map": "verdict",
        "elem": [["172.30.0.5", {"jump": {"target": "vm-a-nat"}}], ["172.30.0.6", {"jump": {"target": "vm-b-nat"}}]]}},
      {"map": {"family": "inet", "name": "fwd_vms", "table": "wick", "type": "ipv4_addr", "map": "verdict",
        "elem": [["172.30.0.5", {"jump": {"target": "vm-a-filter"}}]]}},
      {"chain": {"family": "inet", "table": "wick", "name": "postrouting", "handle": 1, "type": "nat"}},
      {"chain": {"family": "inet", "table": "wick", "name": "forward", "handle": 2}},
      {"chain": {"family": "inet", "table": "wick", "name": "vm-a-nat", "handle": 5}},
      {"chain": {"family": "inet", "table": "wick", "name": "vm-a-filter", "handle": 6}},
      {"chain": {"family": "inet", "table": "wick", "name": "vm-b-nat", "handle": 7}},
      {"chain": {"family": "inet", "table": "wick", "name": "vm-c-filter", "handle": 8}},
      {"rule": {"family": "inet", "table": "wick", "chain": "vm-a-nat", "handle": 9, "expr": []}}]}"#;

    #[test]
    fn parses_state_and_lists_keys() {
        let st = parse_state(STATE).unwrap();
        assert!(st.exists);
        assert_eq!(st.chains.len(), 6);
        assert_eq!(
            st.nat_elems,
            [
                ("172.30.0.5".to_string(), "vm-a-nat".to_string()),
                ("172.30.0.6".to_string(), "vm-b-nat".to_string())
            ]
        );
        let (r, n) = fake();
        r.respond("nft -j list table", 0, STATE, "");
        assert_eq!(n.list_vm_keys().unwrap(), ["a", "b", "c"]);
        assert_eq!(key_of_chain("vm-a-b-nat"), None);
        assert_eq!(key_of_chain("postrouting"), None);
    }

    #[test]
    fn golden_disable_and_idempotence() {
        let (r, n) = fake();
        r.respond("nft -j list table", 0, STATE, "");
        n.disable("a", ip("172.30.0.5"), "wk-a").unwrap();
        assert_eq!(
            r.stdins(),
            ["delete element inet wick nat_vms { 172.30.0.5 }
delete element inet wick fwd_vms { 172.30.0.5 }
delete chain inet wick vm-a-nat
delete chain inet wick vm-a-filter
"]
        );
        // Nothing for this VM: no transaction at all.
        r.clear();
        n.disable("zzz", ip("172.30.0.9"), "wk-zzz").unwrap();
        assert_eq!(r.lines(), ["nft -j list table inet wick"]);
        // No table: nothing either.
        let (r, n) = fake();
        r.respond(
            "nft -j list table",
            1,
            "",
            "Error: No such file or directory",
        );
        assert!(!n.remove_vm("a").unwrap());
        n.remove_all_wick().unwrap();
        // inet + bridge table listed by each, nothing applied.
        assert_eq!(r.lines().len(), 4);
        assert!(r.stdins().is_empty());
    }

    #[test]
    fn golden_reenable_replaces_own_and_stale_entries() {
        let (r, n) = fake();
        r.respond("nft -j list table", 0, STATE, "");
        // VM "c" takes over 172.30.0.6 (stale element of "b") and has a leftover filter chain.
        n.enable("c", ip("172.30.0.6"), "wk-c", Some("eth0"))
            .unwrap();
        let want = format!(
            "{BASE}{}",
            r#"delete element inet wick nat_vms { 172.30.0.6 }
delete chain inet wick vm-c-filter
add chain inet wick vm-c-nat
add rule inet wick vm-c-nat ip saddr 172.30.0.6 oifname "eth0" masquerade
add chain inet wick vm-c-filter
add rule inet wick vm-c-filter iifname "wick0" ip saddr 172.30.0.6 oifname "eth0" accept
add rule inet wick vm-c-filter oifname "wick0" ip daddr 172.30.0.6 ct state established,related accept
add element inet wick nat_vms { 172.30.0.6 : jump vm-c-nat }
add element inet wick fwd_vms { 172.30.0.6 : jump vm-c-filter }
"#
        );
        assert_eq!(r.stdins(), [want]);
    }

    #[test]
    fn golden_isolation_and_remove_all() {
        let (r, n) = fake();
        n.apply_host_isolation(ip("172.30.0.1")).unwrap();
        let want = format!(
            "{BASE}{}",
            r#"add chain inet wick input { type filter hook input priority filter; policy accept; }
flush chain inet wick input
add rule inet wick input iifname "wick0" ct state established,related accept
add rule inet wick input iifname "wick0" ip daddr 172.30.0.1 udp dport 53 accept
add rule inet wick input iifname "wick0" ip daddr 172.30.0.1 tcp dport 53 accept
add rule inet wick input iifname "wick0" ip daddr 172.30.0.1 icmp type echo-request accept
add rule inet wick input iifname "wick0" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
add rule inet wick input iifname "wick0" drop
"#
        );
        assert_eq!(r.stdins(), [want]);
        r.clear();
        r.respond("nft -j list table", 0, STATE, "");
        n.remove_all_wick().unwrap();
        assert_eq!(
            r.stdins(),
            ["delete table bridge wick\n", "delete table inet wick\n"]
        );
    }

    #[test]
    fn golden_allowlist_enable_fill_and_remove() {
        let (r, n) = fake();
        r.respond(
            "nft -j list table",
            1,
            "",
            "Error: No such file or directory",
        );
        n.enable_allowlist("0123456789ab", ip("172.30.0.5"), "wk-0123456789ab", None)
            .unwrap();
        let want = format!(
            "{BASE}{}",
            r#"add chain inet wick vm-0123456789ab-nat
add rule inet wick vm-0123456789ab-nat ip saddr 172.30.0.5 oifname != "wick0" masquerade
add set inet wick vm-0123456789ab-allow { type ipv4_addr; flags timeout; }
add chain inet wick vm-0123456789ab-filter
add rule inet wick vm-0123456789ab-filter iifname "wick0" ip saddr 172.30.0.5 oifname != "wick0" ip daddr @vm-0123456789ab-allow ct mark set ct mark | 0x01000000 accept
add rule inet wick vm-0123456789ab-filter iifname "wick0" ip saddr 172.30.0.5 oifname != "wick0" ct state established,related ct mark & 0x01000000 == 0x01000000 accept
add rule inet wick vm-0123456789ab-filter oifname "wick0" ip daddr 172.30.0.5 ct state established,related accept
add element inet wick nat_vms { 172.30.0.5 : jump vm-0123456789ab-nat }
add element inet wick fwd_vms { 172.30.0.5 : jump vm-0123456789ab-filter }
"#
        );
        assert_eq!(r.stdins(), [want]);

        // Filling: loopback/multicast answers never reach the set; nothing left, no transaction.
        r.clear();
        n.allow_addrs(
            "0123456789ab",
            &[(ip("127.0.0.1"), 60), (ip("198.51.100.10"), 60)],
        )
        .unwrap();
        assert_eq!(r.lines(), ["nft -f -"]);
        assert!(r.stdins()[0].contains("{ 198.51.100.10 timeout 60s }"));
        assert!(!r.stdins()[0].contains("127.0.0.1"));
        r.clear();
        n.allow_addrs("0123456789ab", &[(ip("224.0.0.1"), 60)])
            .unwrap();
        assert!(r.lines().is_empty());
        assert!(n.allow_addrs("a;b", &[(ip("198.51.100.10"), 60)]).is_err());

        // The set belongs to the VM: listed by key, removed (after its chains) with it.
        let state = r#"{"nftables": [{"table": {"family": "inet", "name": "wick", "handle": 1}},
          {"set": {"family": "inet", "name": "vm-d-allow", "table": "wick", "type": "ipv4_addr",
            "flags": ["timeout"], "elem": [{"elem": {"val": "198.51.100.10", "timeout": 60, "expires": 59}}]}},
          {"chain": {"family": "inet", "table": "wick", "name": "vm-d-filter", "handle": 2}}]}"#;
        let (r, n) = fake();
        r.respond("nft -j list table", 0, state, "");
        assert_eq!(n.list_vm_keys().unwrap(), ["d"]);
        n.flush_allowed("d").unwrap();
        n.flush_allowed("e").unwrap(); // no set: nothing to do
        assert!(n.remove_vm("d").unwrap());
        assert_eq!(
            r.stdins(),
            [
                "flush set inet wick vm-d-allow\n",
                "delete chain inet wick vm-d-filter\ndelete set inet wick vm-d-allow\n"
            ]
        );
    }

    #[test]
    fn rejects_bad_input_before_running_anything() {
        let (r, n) = fake();
        assert!(n.enable("a;b", ip("172.30.0.5"), "wk-a", None).is_err());
        assert!(n
            .enable("a", ip("172.30.0.5"), "wk-a", Some("x\" drop"))
            .is_err());
        assert!(r.lines().is_empty());
    }
}
