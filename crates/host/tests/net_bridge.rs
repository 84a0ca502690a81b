//! Real bridge, TAPs and port isolation, inside private network namespaces (root only; skipped
//! with a printed reason otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wick_host::net::testns::{skip_reason, tool_works, TestNetns};
use wick_host::net::{
    create_tap, delete_tap, get_link, list_wick_links, set_port_isolation, Bridge, NatBackend,
    NftNat,
};

const T: Duration = Duration::from_millis(1000);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An expected success: a few attempts, since the first packets after a topology change wait on
/// ARP and this machine is often loaded (a 1 s timeout alone is host luck).
fn connect_ok(ns: &TestNetns, addr: SocketAddr) {
    let mut last = None;
    for _ in 0..4 {
        match ns.connect(addr, T) {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
    }
    panic!("{} -> {addr}: {last:?}", ns.name());
}

macro_rules! skip_unless_netns {
    () => {
        if let Some(why) = skip_reason() {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
}

#[test]
fn bridge_ensure_is_idempotent_and_taps_are_isolated_ports() {
    skip_unless_netns!();
    let w = TestNetns::create("br").unwrap();
    let r = w.runner();
    let br = Bridge::new("wick0", "172.30.0.1/24").unwrap();
    br.ensure(&r).unwrap();
    br.ensure(&r).unwrap();
    let addrs = w
        .run("ip", &["-4", "-o", "addr", "show", "dev", "wick0"])
        .unwrap();
    assert_eq!(addrs.matches("172.30.0.1/24").count(), 1, "{addrs}");
    assert!(get_link(&r, "wick0").unwrap().unwrap().up);

    create_tap(&r, "wk-t1", "wick0", true).unwrap();
    // Someone turned isolation off and took it down: create_tap again repairs it.
    set_port_isolation(&r, "wk-t1", false).unwrap();
    w.run("ip", &["link", "set", "wk-t1", "down"]).unwrap();
    create_tap(&r, "wk-t1", "wick0", true).unwrap();
    let t = get_link(&r, "wk-t1").unwrap().unwrap();
    assert_eq!(t.kind.as_deref(), Some("tun"));
    assert_eq!(t.master.as_deref(), Some("wick0"));
    assert_eq!(t.isolated, Some(true));
    assert!(t.up);
    let names: Vec<_> = list_wick_links(&r)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["wk-t1"]);

    assert!(!br.delete_if_unused(&r).unwrap(), "bridge in use must stay");
    assert!(get_link(&r, "wick0").unwrap().is_some());
    delete_tap(&r, "wk-t1").unwrap();
    delete_tap(&r, "wk-t1").unwrap();
    assert!(get_link(&r, "wk-t1").unwrap().is_none());
    assert!(br.delete_if_unused(&r).unwrap());
    assert!(!br.delete_if_unused(&r).unwrap());
}

#[test]
fn guests_reach_bridge_but_not_each_other_until_opt_in() {
    skip_unless_netns!();
    let w = TestNetns::create("br").unwrap();
    let r = w.runner();
    let br = Bridge::new("wick0", "172.30.0.1/24").unwrap();
    br.ensure(&r).unwrap();
    let g1 = w
        .guest("g1", "wk-g1", "wick0", "172.30.0.5/24", "172.30.0.1")
        .unwrap();
    let g2 = w
        .guest("g2", "wk-g2", "wick0", "172.30.0.6/24", "172.30.0.1")
        .unwrap();
    let host_l = w.listen(sa("172.30.0.1:7000")).unwrap();
    let _g1_l = g1.listen(sa("172.30.0.5:7000")).unwrap();
    let _g2_l = g2.listen(sa("172.30.0.6:7000")).unwrap();

    // Each guest reaches the bridge (host) IP.
    connect_ok(&g1, sa("172.30.0.1:7000"));
    let (_, peer) = host_l.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "172.30.0.5");
    connect_ok(&g2, sa("172.30.0.1:7000"));
    // ... but not each other (isolated ports: not even ARP gets through).
    assert!(g1.connect(sa("172.30.0.6:7000"), T).is_err());
    assert!(g2.connect(sa("172.30.0.5:7000"), T).is_err());

    // With the nft host filter and base forward rules installed, the opt-in still works
    // (bridged guest<->guest frames cross FORWARD with in = out = the bridge, which the backend
    // lets pass only when built for allow_vm_to_vm, as the daemon does).
    if tool_works(&w, "nft", &["list", "tables"]) {
        let nft = NftNat::new(Arc::new(r.clone()), "wick0")
            .unwrap()
            .with_vm_to_vm(true);
        nft.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
    } else {
        eprintln!("note: nft not usable, opt-in checked without the host filter");
    }
    // Opt-in (allow_vm_to_vm): isolation off on both ports.
    set_port_isolation(&r, "wk-g1", false).unwrap();
    set_port_isolation(&r, "wk-g2", false).unwrap();
    connect_ok(&g1, sa("172.30.0.6:7000"));
    connect_ok(&g2, sa("172.30.0.5:7000"));
    // Isolated ports can talk to non-isolated ones: turning isolation off on ONE tap opens that
    // VM to every VM, not to one chosen peer.
    set_port_isolation(&r, "wk-g2", true).unwrap();
    connect_ok(&g1, sa("172.30.0.6:7000"));
    set_port_isolation(&r, "wk-g1", true).unwrap();
    assert!(g1.connect(sa("172.30.0.6:7000"), T).is_err());
}

#[test]
fn host_isolation_allows_only_dns_and_established_from_guests() {
    skip_unless_netns!();
    let w = TestNetns::create("iso").unwrap();
    if !tool_works(&w, "nft", &["list", "tables"]) {
        wick_testkit::skip(format_args!("nft not usable"));
        return;
    }
    let r = w.runner();
    Bridge::new("wick0", "172.30.0.1/24")
        .unwrap()
        .ensure(&r)
        .unwrap();
    let g = w
        .guest("g1", "wk-g1", "wick0", "172.30.0.5/24", "172.30.0.1")
        .unwrap();
    let _dns = w.listen(sa("172.30.0.1:53")).unwrap();
    let _other = w.listen(sa("172.30.0.1:8081")).unwrap();
    g.connect(sa("172.30.0.1:8081"), T).unwrap();

    let nft = NftNat::new(Arc::new(r.clone()), "wick0").unwrap();
    nft.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    nft.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    g.connect(sa("172.30.0.1:53"), T).unwrap();
    assert!(g.connect(sa("172.30.0.1:8081"), T).is_err());
    // The host's own connections to the guest still work (replies are established).
    let _gl = g.listen(sa("172.30.0.5:9000")).unwrap();
    w.connect(sa("172.30.0.5:9000"), T).unwrap();

    nft.remove_all_wick().unwrap();
    g.connect(sa("172.30.0.1:8081"), T).unwrap();
}
