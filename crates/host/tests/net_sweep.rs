//! The leftover sweep, for real, inside a private network namespace: TAPs, port guards and NAT
//! entries (nft and, when available, iptables) for VMs "a" and "b"; sweeping while keeping "a"
//! removes exactly b's. Root only; skipped with a printed reason otherwise.

use std::sync::Arc;

use wick_host::net::testns::{skip_reason, tool_works, TestNetns};
use wick_host::net::{
    create_tap, guest_mac, keep_set, leftovers, list_wick_links, sweep, tap_name, Bridge,
    IptablesNat, NatBackend, NftNat, Runner,
};

#[test]
fn sweep_keeps_only_live_vms() {
    if let Some(why) = skip_reason() {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let w = TestNetns::create("sweep").unwrap();
    if !tool_works(&w, "nft", &["list", "tables"]) {
        wick_testkit::skip(format_args!("nft not usable"));
        return;
    }
    let r: Arc<dyn Runner> = Arc::new(w.runner());
    Bridge::new("wick0", "172.30.0.1/24")
        .unwrap()
        .ensure(&*r)
        .unwrap();
    let nft = NftNat::new(r.clone(), "wick0").unwrap();
    let mut backends: Vec<Box<dyn NatBackend>> = vec![Box::new(nft)];
    if tool_works(&w, "iptables", &["-w", "-t", "nat", "-S"]) {
        backends.push(Box::new(
            IptablesNat::new(r.clone(), "iptables", "wick0").unwrap(),
        ));
    } else {
        eprintln!("note: iptables not usable, sweeping nft only");
    }
    for (id, ip) in [("a", "172.30.0.5"), ("b", "172.30.0.6")] {
        let ipv4: std::net::Ipv4Addr = ip.parse().unwrap();
        backends[0]
            .guard_port(id, &tap_name(id), &guest_mac(ipv4), ipv4)
            .unwrap();
        create_tap(&*r, &tap_name(id), "wick0", true).unwrap();
        for b in &backends {
            b.enable(id, ip.parse().unwrap(), &tap_name(id), None)
                .unwrap();
        }
    }
    // A stray wick-named veth (e.g. from a crashed test harness) is a leftover too.
    w.run(
        "ip",
        &[
            "link", "add", "wk-stray", "type", "veth", "peer", "name", "stray1",
        ],
    )
    .unwrap();

    let refs: Vec<&dyn NatBackend> = backends.iter().map(|b| b.as_ref()).collect();
    let keep = keep_set(["a"]);
    let found = leftovers(&*r, &keep, &refs);
    assert!(found.errors.is_empty(), "{:?}", found.errors);
    assert_eq!(found.links, ["wk-b", "wk-stray"]);
    let want_nat: Vec<(String, String)> = refs
        .iter()
        .map(|b| (b.name().to_string(), "b".to_string()))
        .collect();
    assert_eq!(found.nat, want_nat);
    // Read-only: everything still there.
    assert_eq!(list_wick_links(&*r).unwrap().len(), 3);

    let removed = sweep(&*r, &keep, &refs);
    assert_eq!(removed, found);
    let names: Vec<_> = list_wick_links(&*r)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["wk-a"]);
    for b in &refs {
        assert_eq!(b.list_vm_keys().unwrap(), ["a"], "{}", b.name());
    }
    assert!(leftovers(&*r, &keep, &refs).is_empty());
    // The port guards went the same way: b's chain is gone, a's stays.
    let rules = w.run("nft", &["list", "table", "bridge", "wick"]).unwrap();
    assert!(rules.contains("vm-a-port"), "{rules}");
    assert!(!rules.contains("vm-b-port"), "{rules}");
    // The bridge is never swept.
    assert!(w.run("ip", &["link", "show", "wick0"]).is_ok());
}
