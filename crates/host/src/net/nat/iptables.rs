//! The iptables backend (`iptables` = iptables-nft, or `iptables-legacy`), for hosts where `nft`
//! does not work.
//!
//! wick owns three chains, each jumped to from the top of its built-in chain:
//! `WICK-POSTROUTING` (nat, from POSTROUTING), `WICK-FORWARD` (filter, from FORWARD) and
//! `WICK-INPUT` (filter, from INPUT; host isolation). Per-VM rules carry
//! `-m comment --comment wick:vm-<key>` and are removed by listing the chain (`-S`) and deleting
//! exactly the tagged rules. Base rules carry `wick:base`. Every call uses `-w` (xtables lock).
//! Unlike nft, changes are not atomic: a re-enable removes the old rules, then adds the new ones.
//!
//! IPv6 (guests get none): `ip6tables` (`ip6tables-legacy` with `iptables-legacy`) gets its own
//! `WICK-INPUT` (established, neighbour discovery, then drop everything from the bridge) and
//! `WICK-FORWARD` (drop everything to or from the bridge). Without them a guest reaches host
//! services listening on `[::]` through the bridge's link-local address.
//!
//! Egress allowlist VMs: their forward accept matches an ipset `wick-vm-<key>` (see
//! [`super::ipset`]), created after their old rules are gone and destroyed with them.
//!
//! The port guard (anti-spoofing) uses nftables' bridge family ([`super::PortGuard`]); without a
//! usable `nft` a VM is refused rather than started unprotected.

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use crate::net::error::NetError;
use crate::net::link::validate_ifname;
use crate::net::link::validate_key;
use crate::net::runner::{command_error, run, run_ok, stderr_lower, Runner};

use super::egress::allowable;
use super::{ipset, NatBackend, PortGuard};

/// wick's nat chain.
pub const CHAIN_POSTROUTING: &str = "WICK-POSTROUTING";
/// wick's forward chain.
pub const CHAIN_FORWARD: &str = "WICK-FORWARD";
/// wick's host isolation chain.
pub const CHAIN_INPUT: &str = "WICK-INPUT";
/// Comment tag of per-VM rules: `wick:vm-<key>`.
pub const TAG_PREFIX: &str = "wick:vm-";
/// Comment tag of base rules.
pub const TAG_BASE: &str = "wick:base";

/// (table, wick chain, built-in parent chain).
const CHAINS: [(&str, &str, &str); 3] = [
    ("nat", CHAIN_POSTROUTING, "POSTROUTING"),
    ("filter", CHAIN_FORWARD, "FORWARD"),
    ("filter", CHAIN_INPUT, "INPUT"),
];

/// The IPv6 chains (table filter): (wick chain, built-in parent chain).
const CHAINS6: [(&str, &str); 2] = [(CHAIN_FORWARD, "FORWARD"), (CHAIN_INPUT, "INPUT")];

/// iptables NAT backend.
pub struct IptablesNat {
    runner: Arc<dyn Runner>,
    binary: String,
    /// The matching `ip6tables` binary.
    binary6: String,
    bridge: String,
    allow_vm_to_vm: bool,
    guard: PortGuard,
    /// Whether `ipset` works (probed once, at the first allowlist question).
    ipset_ok: OnceLock<bool>,
}

fn own(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The per-VM rules (each a full argument list after the binary, `-w` included), in the order
/// they are applied. The forward accepts are inserted at the top of `WICK-FORWARD`, ahead of the
/// base drops.
pub fn vm_rules(
    bridge: &str,
    key: &str,
    guest_ip: Ipv4Addr,
    out_iface: Option<&str>,
) -> Vec<Vec<String>> {
    let src = format!("{guest_ip}/32");
    let tag = format!("{TAG_PREFIX}{key}");
    let out: Vec<&str> = match out_iface {
        Some(o) => vec!["-o", o],
        None => vec!["!", "-o", bridge],
    };
    let mut masq = own(&["-w", "-t", "nat", "-A", CHAIN_POSTROUTING, "-s", &src]);
    masq.extend(own(&out));
    masq.extend(own(&[
        "-m",
        "comment",
        "--comment",
        &tag,
        "-j",
        "MASQUERADE",
    ]));
    let mut from = own(&["-w", "-t", "filter", "-I", CHAIN_FORWARD, "1", "-i", bridge]);
    from.extend(own(&["-s", &src]));
    from.extend(own(&out));
    from.extend(own(&["-m", "comment", "--comment", &tag, "-j", "ACCEPT"]));
    let back = own(&[
        "-w",
        "-t",
        "filter",
        "-I",
        CHAIN_FORWARD,
        "1",
        "-o",
        bridge,
        "-d",
        &src,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-m",
        "comment",
        "--comment",
        &tag,
        "-j",
        "ACCEPT",
    ]);
    vec![masq, from, back]
}

/// The base forward rules appended to `WICK-FORWARD` (arguments after `-A WICK-FORWARD`).
pub fn base_forward_rules(bridge: &str) -> Vec<Vec<String>> {
    vec![
        own(&[
            "-i",
            bridge,
            "!",
            "-o",
            bridge,
            "-m",
            "comment",
            "--comment",
            TAG_BASE,
            "-j",
            "DROP",
        ]),
        own(&[
            "-o",
            bridge,
            "!",
            "-i",
            bridge,
            "-m",
            "comment",
            "--comment",
            TAG_BASE,
            "-j",
            "DROP",
        ]),
    ]
}

/// The rule dropping traffic routed from the bridge back into it (guest -> gateway -> guest),
/// appended to `WICK-FORWARD` unless `allow_vm_to_vm`.
pub fn vm_to_vm_rule(bridge: &str) -> Vec<String> {
    own(&[
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        TAG_BASE,
        "-j",
        "DROP",
    ])
}

/// The IPv6 host isolation rules appended to a flushed ip6tables `WICK-INPUT`.
pub fn isolation6_rules(bridge: &str) -> Vec<Vec<String>> {
    let c = ["-m", "comment", "--comment", TAG_BASE];
    let mut rules = vec![own(&[
        "-i",
        bridge,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
    ])];
    for t in ["neighbour-solicitation", "neighbour-advertisement"] {
        rules.push(own(&["-i", bridge, "-p", "ipv6-icmp", "--icmpv6-type", t]));
    }
    for r in &mut rules {
        r.extend(own(&c));
        r.extend(own(&["-j", "ACCEPT"]));
    }
    let mut drop = own(&["-i", bridge]);
    drop.extend(own(&c));
    drop.extend(own(&["-j", "DROP"]));
    rules.push(drop);
    rules
}

/// The IPv6 forward rules appended to a flushed ip6tables `WICK-FORWARD`: nothing is forwarded
/// to or from the bridge.
pub fn forward6_rules(bridge: &str) -> Vec<Vec<String>> {
    ["-i", "-o"]
        .iter()
        .map(|dir| {
            own(&[
                dir,
                bridge,
                "-m",
                "comment",
                "--comment",
                TAG_BASE,
                "-j",
                "DROP",
            ])
        })
        .collect()
}

/// The host isolation rules appended to a flushed `WICK-INPUT` (arguments after
/// `-A WICK-INPUT`).
pub fn isolation_rules(bridge: &str, bridge_ip: Ipv4Addr) -> Vec<Vec<String>> {
    let dst = format!("{bridge_ip}/32");
    let c = ["-m", "comment", "--comment", TAG_BASE];
    let mut rules = vec![own(&[
        "-i",
        bridge,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
    ])];
    for p in ["udp", "tcp"] {
        rules.push(own(&["-i", bridge, "-d", &dst, "-p", p, "--dport", "53"]));
    }
    rules.push(own(&[
        "-i",
        bridge,
        "-d",
        &dst,
        "-p",
        "icmp",
        "--icmp-type",
        "echo-request",
    ]));
    for r in &mut rules {
        r.extend(own(&c));
        r.extend(own(&["-j", "ACCEPT"]));
    }
    let mut drop = own(&["-i", bridge]);
    drop.extend(own(&c));
    drop.extend(own(&["-j", "DROP"]));
    rules.push(drop);
    rules
}

/// Splits one `iptables -S` line into arguments (double-quoted words are unquoted; wick's own
/// rules never contain spaces inside words).
pub fn split_rule(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The VM key of a rule's `wick:vm-<key>` comment, if it has one.
pub fn rule_key(args: &[String]) -> Option<&str> {
    args.windows(2)
        .find(|w| w[0] == "--comment")
        .and_then(|w| w[1].strip_prefix(TAG_PREFIX))
}

impl IptablesNat {
    /// A backend using `binary` (`iptables` or `iptables-legacy`) for the bridge `bridge`.
    pub fn new(runner: Arc<dyn Runner>, binary: &str, bridge: &str) -> Result<Self, NetError> {
        if !matches!(binary, "iptables" | "iptables-legacy" | "iptables-nft") {
            return Err(NetError::Invalid(format!(
                "unsupported iptables binary {binary:?}"
            )));
        }
        validate_ifname(bridge)?;
        Ok(Self {
            guard: PortGuard::new(runner.clone()),
            runner,
            binary: binary.to_string(),
            binary6: binary.replacen("iptables", "ip6tables", 1),
            bridge: bridge.to_string(),
            allow_vm_to_vm: false,
            ipset_ok: OnceLock::new(),
        })
    }

    /// Lets traffic routed from one guest to another through the host pass (the daemon's
    /// `allow_vm_to_vm`); dropped by default.
    pub fn with_vm_to_vm(mut self, allow: bool) -> Self {
        self.allow_vm_to_vm = allow;
        self
    }

    fn ipt(&self, args: &[&str]) -> Result<String, NetError> {
        run_ok(&*self.runner, &self.binary, args, None)
    }

    fn ipt6(&self, args: &[&str]) -> Result<String, NetError> {
        run_ok(&*self.runner, &self.binary6, args, None)
    }

    /// Runs; `Ok(false)` instead of an error when it exits non-zero (checks, `-C`).
    fn ipt_check(&self, args: &[&str]) -> Result<bool, NetError> {
        Ok(run(&*self.runner, &self.binary, args, None)?
            .status
            .success())
    }

    /// The `-A CHAIN ...` lines of `chain` as argument lists, `None` when the chain does not
    /// exist. Lists the whole table (`-S` without a chain): iptables-nft 1.8.9 reports a missing
    /// chain as "incompatible, use 'nft' tool" rather than "no chain", so existence comes from
    /// the table's `-N` lines instead of an error message.
    fn rules(&self, table: &str, chain: &str) -> Result<Option<Vec<Vec<String>>>, NetError> {
        self.rules_of(&self.binary, table, chain)
    }

    /// [`rules`](Self::rules) with another binary (`ip6tables`).
    fn rules_of(
        &self,
        bin: &str,
        table: &str,
        chain: &str,
    ) -> Result<Option<Vec<Vec<String>>>, NetError> {
        let out = run_ok(&*self.runner, bin, &["-w", "-t", table, "-S"], None)?;
        let mut exists = false;
        let mut rules = Vec::new();
        for args in out.lines().map(split_rule) {
            match (args.first().map(String::as_str), args.get(1)) {
                (Some("-N"), Some(c)) if c == chain => exists = true,
                (Some("-A"), Some(c)) if c == chain => rules.push(args),
                _ => {}
            }
        }
        Ok(exists.then_some(rules))
    }

    /// Creates wick's chain (if missing) and its jump from the top of the parent (if missing).
    fn ensure_chain(&self, table: &str, chain: &str, parent: &str) -> Result<(), NetError> {
        self.ensure_chain_of(&self.binary, table, chain, parent)
    }

    /// [`ensure_chain`](Self::ensure_chain) with another binary (`ip6tables`).
    fn ensure_chain_of(
        &self,
        bin: &str,
        table: &str,
        chain: &str,
        parent: &str,
    ) -> Result<(), NetError> {
        let r = &*self.runner;
        let args = ["-w", "-t", table, "-N", chain];
        let out = run(r, bin, &args, None)?;
        if !out.status.success() && !stderr_lower(&out).contains("exists") {
            return Err(command_error(bin, &args, &out));
        }
        let check = ["-w", "-t", table, "-C", parent, "-j", chain];
        if !run(r, bin, &check, None)?.status.success() {
            run_ok(
                r,
                bin,
                &["-w", "-t", table, "-I", parent, "1", "-j", chain],
                None,
            )?;
        }
        Ok(())
    }

    /// Replaces the rules of ip6tables' `chain` (created and jumped to if missing).
    fn set_chain6(
        &self,
        chain: &str,
        parent: &str,
        rules: Vec<Vec<String>>,
    ) -> Result<(), NetError> {
        let bin = self.binary6.clone();
        self.ensure_chain_of(&bin, "filter", chain, parent)?;
        self.ipt6(&["-w", "-t", "filter", "-F", chain])?;
        for rule in rules {
            let mut args = vec!["-w", "-t", "filter", "-A", chain];
            args.extend(rule.iter().map(String::as_str));
            self.ipt6(&args)?;
        }
        Ok(())
    }

    /// Removes the VM's NAT rules (not its port guard), then its ipset if they used one.
    fn remove_nat(&self, vm_key: &str) -> Result<bool, NetError> {
        validate_key(vm_key)?;
        let mut removed = false;
        for (table, chain) in [("nat", CHAIN_POSTROUTING), ("filter", CHAIN_FORWARD)] {
            for rule in self.rules(table, chain)?.unwrap_or_default() {
                if rule_key(&rule) != Some(vm_key) {
                    continue;
                }
                // "-A CHAIN rest..." -> "-D CHAIN rest..."
                let mut args = vec!["-w", "-t", table, "-D"];
                args.extend(rule.iter().skip(1).map(String::as_str));
                self.ipt(&args)?;
                removed = true;
            }
        }
        // Whether or not a rule still used it: a crash between the rules' removal and the
        // destroy must not leave the set behind (a no-op where ipset does not work).
        ipset::destroy(&*self.runner, vm_key)?;
        Ok(removed)
    }

    /// Removes one built-in -> wick jump (all copies) and the chain, when present.
    fn remove_chain_of(
        &self,
        bin: &str,
        table: &str,
        chain: &str,
        parent: &str,
    ) -> Result<(), NetError> {
        let r = &*self.runner;
        // Every jump (there should be one; a crash mid-way could in theory leave more).
        for _ in 0..16 {
            let del = ["-w", "-t", table, "-D", parent, "-j", chain];
            if !run(r, bin, &del, None)?.status.success() {
                break;
            }
        }
        if self.rules_of(bin, table, chain)?.is_some() {
            run_ok(r, bin, &["-w", "-t", table, "-F", chain], None)?;
            run_ok(r, bin, &["-w", "-t", table, "-X", chain], None)?;
        }
        Ok(())
    }

    fn ensure_base(&self) -> Result<(), NetError> {
        self.ensure_chain("nat", CHAIN_POSTROUTING, "POSTROUTING")?;
        self.ensure_chain("filter", CHAIN_FORWARD, "FORWARD")?;
        for rule in base_forward_rules(&self.bridge) {
            let r: Vec<&str> = rule.iter().map(String::as_str).collect();
            let mut check = vec!["-w", "-t", "filter", "-C", CHAIN_FORWARD];
            check.extend(&r);
            if !self.ipt_check(&check)? {
                let mut add = vec!["-w", "-t", "filter", "-A", CHAIN_FORWARD];
                add.extend(&r);
                self.ipt(&add)?;
            }
        }
        let rule = vm_to_vm_rule(&self.bridge);
        let r: Vec<&str> = rule.iter().map(String::as_str).collect();
        let mut check = vec!["-w", "-t", "filter", "-C", CHAIN_FORWARD];
        check.extend(&r);
        let present = self.ipt_check(&check)?;
        if present == self.allow_vm_to_vm {
            let op = if present { "-D" } else { "-A" };
            let mut args = vec!["-w", "-t", "filter", op, CHAIN_FORWARD];
            args.extend(&r);
            self.ipt(&args)?;
        }
        Ok(())
    }
}

impl IptablesNat {
    /// `enable` (all destinations) or `enable_allowlist` (only the VM's ipset): the VM's old
    /// rules go first, so switching between the two is one call.
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
        self.ensure_base()?;
        self.remove_nat(vm_key)?;
        let rules = if allowlist {
            ipset::create(&*self.runner, vm_key)?;
            ipset::allowlist_rules(&self.bridge, vm_key, guest_ip, out_iface)
        } else {
            vm_rules(&self.bridge, vm_key, guest_ip, out_iface)
        };
        for rule in rules {
            let r: Vec<&str> = rule.iter().map(String::as_str).collect();
            self.ipt(&r)?;
        }
        Ok(())
    }
}

impl NatBackend for IptablesNat {
    fn name(&self) -> &str {
        &self.binary
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
        *self
            .ipset_ok
            .get_or_init(|| ipset::available(&*self.runner))
    }

    fn enable_allowlist(
        &self,
        vm_key: &str,
        guest_ip: Ipv4Addr,
        _tap: &str,
        out_iface: Option<&str>,
    ) -> Result<(), NetError> {
        if !self.supports_allowlist() {
            return Err(super::unsupported(self.name()));
        }
        self.enable_with(vm_key, guest_ip, out_iface, true)
    }

    fn allow_addrs(&self, vm_key: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), NetError> {
        validate_key(vm_key)?;
        let addrs: Vec<(Ipv4Addr, u32)> = addrs
            .iter()
            .copied()
            .filter(|(ip, _)| allowable(*ip))
            .collect();
        ipset::add(&*self.runner, vm_key, &addrs)
    }

    fn flush_allowed(&self, vm_key: &str) -> Result<(), NetError> {
        validate_key(vm_key)?;
        ipset::flush(&*self.runner, vm_key)
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
        // Also a set whose rules never got added (a crash in between).
        let set = ipset::destroy(&*self.runner, vm_key)?;
        let guarded = self.guard.remove(vm_key)?;
        Ok(nat || set || guarded)
    }

    fn list_vm_keys(&self) -> Result<Vec<String>, NetError> {
        let mut keys = self.guard.list_keys()?;
        for name in ipset::list(&*self.runner)? {
            keys.extend(ipset::key_of_ipset(&name).map(str::to_string));
        }
        for (table, chain) in [("nat", CHAIN_POSTROUTING), ("filter", CHAIN_FORWARD)] {
            for rule in self.rules(table, chain)?.unwrap_or_default() {
                if let Some(k) = rule_key(&rule) {
                    keys.push(k.to_string());
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn apply_host_isolation(&self, bridge_ip: Ipv4Addr) -> Result<(), NetError> {
        self.ensure_base()?;
        self.ensure_chain("filter", CHAIN_INPUT, "INPUT")?;
        self.ipt(&["-w", "-t", "filter", "-F", CHAIN_INPUT])?;
        for rule in isolation_rules(&self.bridge, bridge_ip) {
            let mut args = vec!["-w", "-t", "filter", "-A", CHAIN_INPUT];
            args.extend(rule.iter().map(String::as_str));
            self.ipt(&args)?;
        }
        self.set_chain6(CHAIN_INPUT, "INPUT", isolation6_rules(&self.bridge))?;
        self.set_chain6(CHAIN_FORWARD, "FORWARD", forward6_rules(&self.bridge))?;
        Ok(())
    }

    fn remove_all_wick(&self) -> Result<(), NetError> {
        for (table, chain, parent) in CHAINS {
            self.remove_chain_of(&self.binary, table, chain, parent)?;
        }
        for (chain, parent) in CHAINS6 {
            self.remove_chain_of(&self.binary6, "filter", chain, parent)?;
        }
        for name in ipset::list(&*self.runner)? {
            run_ok(&*self.runner, "ipset", &["destroy", &name], None)?;
        }
        self.guard.remove_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    fn fake(bin: &str) -> (Arc<RecordingRunner>, IptablesNat) {
        let r = Arc::new(RecordingRunner::new());
        // No port guard table (nft answers "no such table").
        r.respond(
            "nft -j list table bridge",
            1,
            "",
            "Error: No such file or directory",
        );
        let n = IptablesNat::new(r.clone(), bin, "wick0").unwrap();
        (r, n)
    }

    #[test]
    fn golden_enable_fresh() {
        let (r, n) = fake("iptables");
        // Chains missing (the fake's `-S` prints nothing), jumps missing, base rules missing.
        r.respond("iptables -w -t nat -C", 1, "", "");
        r.respond("iptables -w -t filter -C", 1, "", "");
        n.enable(
            "0123456789ab",
            "172.30.0.5".parse().unwrap(),
            "wk-0123456789ab",
            None,
        )
        .unwrap();
        assert_eq!(
            r.lines(),
            [
                "iptables -w -t nat -N WICK-POSTROUTING",
                "iptables -w -t nat -C POSTROUTING -j WICK-POSTROUTING",
                "iptables -w -t nat -I POSTROUTING 1 -j WICK-POSTROUTING",
                "iptables -w -t filter -N WICK-FORWARD",
                "iptables -w -t filter -C FORWARD -j WICK-FORWARD",
                "iptables -w -t filter -I FORWARD 1 -j WICK-FORWARD",
                "iptables -w -t filter -C WICK-FORWARD -i wick0 ! -o wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t filter -A WICK-FORWARD -i wick0 ! -o wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t filter -C WICK-FORWARD -o wick0 ! -i wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t filter -A WICK-FORWARD -o wick0 ! -i wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t filter -C WICK-FORWARD -i wick0 -o wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t filter -A WICK-FORWARD -i wick0 -o wick0 -m comment --comment wick:base -j DROP",
                "iptables -w -t nat -S",
                "iptables -w -t filter -S",
                "ipset list -n",
                "iptables -w -t nat -A WICK-POSTROUTING -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-0123456789ab -j MASQUERADE",
                "iptables -w -t filter -I WICK-FORWARD 1 -i wick0 -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-0123456789ab -j ACCEPT",
                "iptables -w -t filter -I WICK-FORWARD 1 -o wick0 -d 172.30.0.5/32 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:vm-0123456789ab -j ACCEPT",
            ]
        );
    }

    #[test]
    fn golden_enable_existing_base_with_out_iface() {
        let (r, n) = fake("iptables-legacy");
        r.respond(
            "iptables-legacy -w -t nat -N",
            1,
            "",
            "iptables: Chain already exists.",
        );
        r.respond(
            "iptables-legacy -w -t filter -N",
            1,
            "",
            "iptables: Chain already exists.",
        );
        n.enable("b", "172.30.0.7".parse().unwrap(), "wk-b", Some("eth0"))
            .unwrap();
        let lines = r.lines();
        assert!(!lines
            .iter()
            .any(|l| l.contains(" -I POSTROUTING") || l.contains(" -A WICK-FORWARD")));
        assert_eq!(
            &lines[lines.len() - 3..],
            [
                "iptables-legacy -w -t nat -A WICK-POSTROUTING -s 172.30.0.7/32 -o eth0 -m comment --comment wick:vm-b -j MASQUERADE",
                "iptables-legacy -w -t filter -I WICK-FORWARD 1 -i wick0 -s 172.30.0.7/32 -o eth0 -m comment --comment wick:vm-b -j ACCEPT",
                "iptables-legacy -w -t filter -I WICK-FORWARD 1 -o wick0 -d 172.30.0.7/32 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:vm-b -j ACCEPT",
            ]
        );
    }

    const NAT_S: &str = "-P PREROUTING ACCEPT
-P POSTROUTING ACCEPT
-N WICK-POSTROUTING
-A POSTROUTING -j WICK-POSTROUTING
-A WICK-POSTROUTING -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-a -j MASQUERADE
-A WICK-POSTROUTING -s 172.30.0.6/32 ! -o wick0 -m comment --comment \"wick:vm-b\" -j MASQUERADE
# Warning: iptables-legacy tables present, use iptables-legacy to see them
";
    const FWD_S: &str = "-P FORWARD ACCEPT
-N WICK-FORWARD
-N WICK-INPUT
-A FORWARD -j WICK-FORWARD
-A INPUT -j WICK-INPUT
-A WICK-INPUT -i wick0 -m comment --comment wick:vm-zz -j DROP
-A WICK-FORWARD -o wick0 -d 172.30.0.5/32 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:vm-a -j ACCEPT
-A WICK-FORWARD -i wick0 -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-a -j ACCEPT
-A WICK-FORWARD -i wick0 ! -o wick0 -m comment --comment wick:base -j DROP
";

    #[test]
    fn golden_disable_deletes_only_tagged_rules() {
        let (r, n) = fake("iptables");
        r.respond("iptables -w -t nat -S", 0, NAT_S, "");
        r.respond("iptables -w -t filter -S", 0, FWD_S, "");
        assert_eq!(n.list_vm_keys().unwrap(), ["a", "b"]);
        r.clear();
        n.disable("a", "172.30.0.5".parse().unwrap(), "wk-a")
            .unwrap();
        assert_eq!(
            r.lines(),
            [
                "iptables -w -t nat -S",
                "iptables -w -t nat -D WICK-POSTROUTING -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-a -j MASQUERADE",
                "iptables -w -t filter -S",
                "iptables -w -t filter -D WICK-FORWARD -o wick0 -d 172.30.0.5/32 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:vm-a -j ACCEPT",
                "iptables -w -t filter -D WICK-FORWARD -i wick0 -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-a -j ACCEPT",
                "ipset list -n",
            ]
        );
        r.clear();
        assert!(n.remove_vm("b").unwrap());
        assert_eq!(
            r.lines()[1],
            "iptables -w -t nat -D WICK-POSTROUTING -s 172.30.0.6/32 ! -o wick0 -m comment --comment wick:vm-b -j MASQUERADE"
        );
        // Missing chains: nothing to do.
        let (r, n) = fake("iptables");
        r.respond(
            "iptables -w -t",
            0,
            "-P POSTROUTING ACCEPT\n-P FORWARD ACCEPT\n",
            "",
        );
        assert!(!n.remove_vm("a").unwrap());
        assert!(n.list_vm_keys().unwrap().is_empty());
    }

    #[test]
    fn golden_isolation() {
        let rules = isolation_rules("wick0", "172.30.0.1".parse().unwrap());
        let lines: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "-i wick0 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:base -j ACCEPT",
                "-i wick0 -d 172.30.0.1/32 -p udp --dport 53 -m comment --comment wick:base -j ACCEPT",
                "-i wick0 -d 172.30.0.1/32 -p tcp --dport 53 -m comment --comment wick:base -j ACCEPT",
                "-i wick0 -d 172.30.0.1/32 -p icmp --icmp-type echo-request -m comment --comment wick:base -j ACCEPT",
                "-i wick0 -m comment --comment wick:base -j DROP",
            ]
        );
        let (r, n) = fake("iptables");
        n.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
        let l = r.lines();
        let flush = l
            .iter()
            .position(|x| x == "iptables -w -t filter -F WICK-INPUT")
            .unwrap();
        let v4_end = l.iter().position(|x| x.starts_with("ip6tables")).unwrap();
        assert_eq!(v4_end - flush - 1, 5);
        assert_eq!(
            l[v4_end - 1],
            "iptables -w -t filter -A WICK-INPUT -i wick0 -m comment --comment wick:base -j DROP"
        );
        // IPv6: the same shape with ip6tables (neighbour discovery only), and no forwarding.
        assert_eq!(
            &l[v4_end..],
            [
                "ip6tables -w -t filter -N WICK-INPUT",
                "ip6tables -w -t filter -C INPUT -j WICK-INPUT",
                "ip6tables -w -t filter -F WICK-INPUT",
                "ip6tables -w -t filter -A WICK-INPUT -i wick0 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:base -j ACCEPT",
                "ip6tables -w -t filter -A WICK-INPUT -i wick0 -p ipv6-icmp --icmpv6-type neighbour-solicitation -m comment --comment wick:base -j ACCEPT",
                "ip6tables -w -t filter -A WICK-INPUT -i wick0 -p ipv6-icmp --icmpv6-type neighbour-advertisement -m comment --comment wick:base -j ACCEPT",
                "ip6tables -w -t filter -A WICK-INPUT -i wick0 -m comment --comment wick:base -j DROP",
                "ip6tables -w -t filter -N WICK-FORWARD",
                "ip6tables -w -t filter -C FORWARD -j WICK-FORWARD",
                "ip6tables -w -t filter -F WICK-FORWARD",
                "ip6tables -w -t filter -A WICK-FORWARD -i wick0 -m comment --comment wick:base -j DROP",
                "ip6tables -w -t filter -A WICK-FORWARD -o wick0 -m comment --comment wick:base -j DROP",
            ]
        );
        // The legacy backend pairs with ip6tables-legacy.
        let (r, n) = fake("iptables-legacy");
        n.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
        assert!(r
            .lines()
            .iter()
            .any(|x| x.starts_with("ip6tables-legacy -w")));
        assert!(!r.lines().iter().any(|x| x.starts_with("ip6tables -w")));
    }

    #[test]
    fn golden_vm_to_vm_opt_in_removes_the_routed_drop() {
        let (r, n) = fake("iptables");
        let n = n.with_vm_to_vm(true);
        // The drop is there from an earlier run with allow_vm_to_vm = false: it goes.
        n.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
        assert!(r.lines().contains(
            &"iptables -w -t filter -D WICK-FORWARD -i wick0 -o wick0 -m comment --comment wick:base -j DROP"
                .to_string()
        ));
        r.clear();
        r.respond(
            "iptables -w -t filter -C WICK-FORWARD -i wick0 -o wick0",
            1,
            "",
            "",
        );
        n.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
        assert!(
            !r.lines()
                .iter()
                .any(|l| l.contains("-i wick0 -o wick0")
                    && (l.contains(" -A ") || l.contains(" -D ")))
        );
    }

    #[test]
    fn golden_remove_all() {
        let (r, n) = fake("iptables");
        r.respond("iptables -w -t nat -D POSTROUTING", 1, "", "Bad rule");
        r.respond_once("iptables -w -t nat -D POSTROUTING", 0, "", "");
        r.respond("iptables -w -t filter -D", 1, "", "Bad rule");
        r.respond("iptables -w -t nat -S", 0, "-N WICK-POSTROUTING\n", "");
        r.respond("iptables -w -t filter -S", 0, "-N WICK-FORWARD\n", "");
        r.respond("ip6tables -w -t filter -D", 1, "", "Bad rule");
        r.respond("ip6tables -w -t filter -S", 0, "-N WICK-INPUT\n", "");
        r.respond(
            "nft -j list table bridge",
            1,
            "",
            "Error: No such file or directory",
        );
        n.remove_all_wick().unwrap();
        assert_eq!(
            r.lines(),
            [
                "iptables -w -t nat -D POSTROUTING -j WICK-POSTROUTING",
                "iptables -w -t nat -D POSTROUTING -j WICK-POSTROUTING",
                "iptables -w -t nat -S",
                "iptables -w -t nat -F WICK-POSTROUTING",
                "iptables -w -t nat -X WICK-POSTROUTING",
                "iptables -w -t filter -D FORWARD -j WICK-FORWARD",
                "iptables -w -t filter -S",
                "iptables -w -t filter -F WICK-FORWARD",
                "iptables -w -t filter -X WICK-FORWARD",
                "iptables -w -t filter -D INPUT -j WICK-INPUT",
                "iptables -w -t filter -S",
                "ip6tables -w -t filter -D FORWARD -j WICK-FORWARD",
                "ip6tables -w -t filter -S",
                "ip6tables -w -t filter -D INPUT -j WICK-INPUT",
                "ip6tables -w -t filter -S",
                "ip6tables -w -t filter -F WICK-INPUT",
                "ip6tables -w -t filter -X WICK-INPUT",
                "ipset list -n",
                "nft -j list table bridge wick",
            ]
        );
    }

    #[test]
    fn splits_quoted() {
        assert_eq!(
            split_rule("-A X -m comment --comment \"wick:vm-a\" -j ACCEPT"),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "wick:vm-a",
                "-j",
                "ACCEPT"
            ]
        );
        assert_eq!(split_rule("  "), Vec::<String>::new());
    }
}
