//! The iptables backend's egress allowlist: one ipset per VM, `wick-vm-<key>` (`hash:ip`, elements
//! with timeouts), matched by the VM's forward accept (`-m set --match-set wick-vm-<key> dst`).
//! Like the nft set it is named after the VM key, so `remove_vm`, `list_vm_keys` and hence the
//! sweep cover it. Without a working `ipset` binary the backend refuses allowlists.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::net::error::NetError;
use crate::net::link::validate_key;
use crate::net::runner::{run, run_ok, Runner};

use super::egress::{ALLOWED_CT_MARK, ALLOW_TIMEOUT_MAX, ALLOW_TIMEOUT_MIN};
use super::iptables::vm_rules;

/// Prefix of wick's ipsets.
pub const IPSET_PREFIX: &str = "wick-vm-";

/// The allowlist ipset of a VM: `wick-vm-<key>` (at most 31 characters, as ipset requires).
pub fn ipset_name(key: &str) -> String {
    format!("{IPSET_PREFIX}{key}")
}

/// The VM key of one of wick's ipsets.
pub fn key_of_ipset(name: &str) -> Option<&str> {
    name.strip_prefix(IPSET_PREFIX)
        .filter(|k| validate_key(k).is_ok())
}

/// The per-VM rules of an allowlist VM: [`vm_rules`], with the guest's forward accept limited
/// to destinations in its ipset (and marking the connection with [`ALLOWED_CT_MARK`]), plus an
/// accept of its established connections carrying that mark (so they outlive the element that
/// opened them, while connections opened before the allowlist applied do not pass).
pub fn allowlist_rules(
    bridge: &str,
    key: &str,
    guest_ip: Ipv4Addr,
    out_iface: Option<&str>,
) -> Vec<Vec<String>> {
    let mut rules = vm_rules(bridge, key, guest_ip, out_iface);
    let from = rules[1].clone();
    let at = from.iter().position(|a| a == "-m").unwrap_or(from.len());
    let with = |extra: &[&str]| -> Vec<String> {
        let mut r = from[..at].to_vec();
        r.extend(extra.iter().map(|s| s.to_string()));
        r.extend(from[at..].iter().cloned());
        r
    };
    let set = ipset_name(key);
    let mark = format!("{ALLOWED_CT_MARK:#x}/{ALLOWED_CT_MARK:#x}");
    rules[1] = with(&["-m", "set", "--match-set", &set, "dst"]);
    // Inserted at the top after the accept, so it runs first: marks the connection as opened
    // through the set (the established accept below requires the mark).
    let mut marking = rules[1].clone();
    let target = marking.len() - 2;
    marking.splice(
        target..,
        [
            "-j",
            "CONNMARK",
            "--or-mark",
            &format!("{ALLOWED_CT_MARK:#x}"),
        ]
        .map(String::from),
    );
    rules.insert(2, marking);
    rules.push(with(&[
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-m",
        "connmark",
        "--mark",
        &mark,
    ]));
    rules
}

/// The `ipset restore -exist` input adding (or re-timing) `addrs`.
pub fn add_script(key: &str, addrs: &[(Ipv4Addr, u32)]) -> String {
    let set = ipset_name(key);
    let mut s = String::new();
    for (ip, secs) in addrs {
        let secs = (*secs).clamp(ALLOW_TIMEOUT_MIN, ALLOW_TIMEOUT_MAX);
        let _ = writeln!(s, "add {set} {ip} timeout {secs}");
    }
    s
}

/// Whether `ipset` works here.
pub(super) fn available(runner: &dyn Runner) -> bool {
    run(runner, "ipset", &["list", "-n"], None).is_ok_and(|o| o.success())
}

/// Names of wick's ipsets: none when `ipset` does not work here (not installed, or no kernel
/// support), since then none can have been made either — and a host without ipset must not
/// fail its sweep or `remove_vm` over it.
pub(super) fn list(runner: &dyn Runner) -> Result<Vec<String>, NetError> {
    let out = match run(runner, "ipset", &["list", "-n"], None) {
        Ok(out) if out.success() => out,
        _ => return Ok(Vec::new()),
    };
    Ok(out
        .stdout_text()
        .lines()
        .map(str::trim)
        .filter(|n| key_of_ipset(n).is_some())
        .map(str::to_string)
        .collect())
}

/// Creates the VM's (empty) ipset.
pub(super) fn create(runner: &dyn Runner, key: &str) -> Result<(), NetError> {
    let set = ipset_name(key);
    let args = [
        "create", &set, "hash:ip", "family", "inet", "timeout", "0", "-exist",
    ];
    run_ok(runner, "ipset", &args, None)?;
    run_ok(runner, "ipset", &["flush", &set], None).map(|_| ())
}

/// Destroys the VM's ipset; `Ok(false)` when it has none.
pub(super) fn destroy(runner: &dyn Runner, key: &str) -> Result<bool, NetError> {
    let set = ipset_name(key);
    if !list(runner)?.contains(&set) {
        return Ok(false);
    }
    run_ok(runner, "ipset", &["destroy", &set], None).map(|_| true)
}

/// Adds (or re-times) `addrs` in the VM's ipset, in one `ipset restore`.
pub(super) fn add(
    runner: &dyn Runner,
    key: &str,
    addrs: &[(Ipv4Addr, u32)],
) -> Result<(), NetError> {
    let script = add_script(key, addrs);
    if script.is_empty() {
        return Ok(());
    }
    run_ok(runner, "ipset", &["restore", "-exist"], Some(&script)).map(|_| ())
}

/// Empties the VM's ipset (nothing when it has none).
pub(super) fn flush(runner: &dyn Runner, key: &str) -> Result<(), NetError> {
    let set = ipset_name(key);
    if !list(runner)?.contains(&set) {
        return Ok(());
    }
    run_ok(runner, "ipset", &["flush", &set], None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::testing::RecordingRunner;

    #[test]
    fn golden_rules_and_scripts() {
        let rules: Vec<String> =
            allowlist_rules("wick0", "ab", "172.30.0.5".parse().unwrap(), None)
                .iter()
                .map(|r| r.join(" "))
                .collect();
        assert_eq!(
            rules,
            [
                "-w -t nat -A WICK-POSTROUTING -s 172.30.0.5/32 ! -o wick0 -m comment --comment wick:vm-ab -j MASQUERADE",
                "-w -t filter -I WICK-FORWARD 1 -i wick0 -s 172.30.0.5/32 ! -o wick0 -m set --match-set wick-vm-ab dst -m comment --comment wick:vm-ab -j ACCEPT",
                "-w -t filter -I WICK-FORWARD 1 -i wick0 -s 172.30.0.5/32 ! -o wick0 -m set --match-set wick-vm-ab dst -m comment --comment wick:vm-ab -j CONNMARK --or-mark 0x1000000",
                "-w -t filter -I WICK-FORWARD 1 -o wick0 -d 172.30.0.5/32 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment wick:vm-ab -j ACCEPT",
                "-w -t filter -I WICK-FORWARD 1 -i wick0 -s 172.30.0.5/32 ! -o wick0 -m conntrack --ctstate RELATED,ESTABLISHED -m connmark --mark 0x1000000/0x1000000 -m comment --comment wick:vm-ab -j ACCEPT",
            ]
        );
        assert_eq!(
            add_script(
                "ab",
                &[
                    ("198.51.100.10".parse().unwrap(), 0),
                    ("198.51.100.11".parse().unwrap(), 600)
                ]
            ),
            "add wick-vm-ab 198.51.100.10 timeout 30\nadd wick-vm-ab 198.51.100.11 timeout 600\n"
        );
        assert_eq!(key_of_ipset("wick-vm-0123456789ab"), Some("0123456789ab"));
        assert_eq!(key_of_ipset("wick-vm-a;b"), None);
        assert_eq!(key_of_ipset("other"), None);
    }

    #[test]
    fn golden_lifecycle() {
        let r = RecordingRunner::new();
        r.respond("ipset list -n", 0, "other\nwick-ab\nwick-vm-ab\n", "");
        create(&r, "ab").unwrap();
        add(&r, "ab", &[("198.51.100.10".parse().unwrap(), 60)]).unwrap();
        add(&r, "ab", &[]).unwrap();
        flush(&r, "ab").unwrap();
        assert!(destroy(&r, "ab").unwrap());
        assert!(!destroy(&r, "cd").unwrap());
        assert_eq!(
            r.lines(),
            [
                "ipset create wick-vm-ab hash:ip family inet timeout 0 -exist",
                "ipset flush wick-vm-ab",
                "ipset restore -exist",
                "ipset list -n",
                "ipset flush wick-vm-ab",
                "ipset list -n",
                "ipset destroy wick-vm-ab",
                "ipset list -n",
            ]
        );
        assert_eq!(list(&r).unwrap(), ["wick-vm-ab"]);
        let broken = RecordingRunner::new();
        broken.respond(
            "ipset",
            1,
            "",
            "Kernel error received: Operation not supported",
        );
        assert!(list(&broken).unwrap().is_empty());
        assert!(!destroy(&broken, "ab").unwrap());
    }
}
