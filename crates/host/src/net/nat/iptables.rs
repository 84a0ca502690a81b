//! The iptables backend (`iptables` = iptables-nft, or `iptables-legacy`), for hosts where `nft`
//! does not work.
//!
//! wick owns three chains, each jumped to from the top of its built-in chain:
//! `WICK-POSTROUTING` (nat, from POSTROUTING), `WICK-FORWARD` (filter, from FORWARD) and
//! `WICK-INPUT` (filter, from INPUT; host isolation). Per-VM rules carry
//! `-m comment --comment wick:vm-<key>` and are removed by listing the chain (`-S`) and deleting
//! exactly the tagged rules. Base rules carry `wick:base`. Every call uses `-w` (xtables lock).
//! Unlike nft, changes are not atomic: a re-enable removes the old rules, then adds the new ones.

use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::net::error::NetError;
use crate::net::link::validate_ifname;
use crate::net::link::validate_key;
use crate::net::runner::{command_error, run_ok, stderr_lower, Runner};

use super::NatBackend;

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

/// iptables NAT backend.
pub struct IptablesNat {
    runner: Arc<dyn Runner>,
    binary: String,
    bridge: String,
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
            runner,
            binary: binary.to_string(),
            bridge: bridge.to_string(),
        })
    }

    fn ipt(&self, args: &[&str]) -> Result<String, NetError> {
        run_ok(&*self.runner, &self.binary, args, None)
    }

    /// Runs; `Ok(false)` instead of an error when it exits non-zero (checks, `-C`).
    fn ipt_check(&self, args: &[&str]) -> Result<bool, NetError> {
        Ok(self.runner.run(&self.binary, args, None)?.status.success())
    }

    /// The `-A CHAIN ...` lines of `chain` as argument lists, `None` when the chain does not
    /// exist. Lists the whole table (`-S` without a chain): iptables-nft 1.8.9 reports a missing
    /// chain as "incompatible, use 'nft' tool" rather than "no chain", so existence comes from
    /// the table's `-N` lines instead of an error message.
    fn rules(&self, table: &str, chain: &str) -> Result<Option<Vec<Vec<String>>>, NetError> {
        let out = self.ipt(&["-w", "-t", table, "-S"])?;
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
        let args = ["-w", "-t", table, "-N", chain];
        let out = self.runner.run(&self.binary, &args, None)?;
        if !out.status.success() && !stderr_lower(&out).contains("exists") {
            return Err(command_error(&self.binary, &args, &out));
        }
        if !self.ipt_check(&["-w", "-t", table, "-C", parent, "-j", chain])? {
            self.ipt(&["-w", "-t", table, "-I", parent, "1", "-j", chain])?;
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
        validate_key(vm_key)?;
        if let Some(o) = out_iface {
            validate_ifname(o)?;
        }
        self.ensure_base()?;
        self.remove_vm(vm_key)?;
        for rule in vm_rules(&self.bridge, vm_key, guest_ip, out_iface) {
            let r: Vec<&str> = rule.iter().map(String::as_str).collect();
            self.ipt(&r)?;
        }
        Ok(())
    }

    fn disable(&self, vm_key: &str, _guest_ip: Ipv4Addr, _tap: &str) -> Result<(), NetError> {
        self.remove_vm(vm_key).map(|_| ())
    }

    fn remove_vm(&self, vm_key: &str) -> Result<bool, NetError> {
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
        Ok(removed)
    }

    fn list_vm_keys(&self) -> Result<Vec<String>, NetError> {
        let mut keys = Vec::new();
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
        Ok(())
    }

    fn remove_all_wick(&self) -> Result<(), NetError> {
        for (table, chain, parent) in CHAINS {
            // Every jump (there should be one; a crash mid-way could in theory leave more).
            for _ in 0..16 {
                if !self.ipt_check(&["-w", "-t", table, "-D", parent, "-j", chain])? {
                    break;
                }
            }
            if self.rules(table, chain)?.is_some() {
                self.ipt(&["-w", "-t", table, "-F", chain])?;
                self.ipt(&["-w", "-t", table, "-X", chain])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::fake::RecordingRunner;

    fn fake(bin: &str) -> (Arc<RecordingRunner>, IptablesNat) {
        let r = Arc::new(RecordingRunner::new());
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
                "iptables -w -t nat -S",
                "iptables -w -t filter -S",
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
        assert_eq!(l.len() - flush - 1, 5);
        assert_eq!(
            l.last().unwrap(),
            "iptables -w -t filter -A WICK-INPUT -i wick0 -m comment --comment wick:base -j DROP"
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
