//! The per-port anti-spoofing guard, for real, inside private network namespaces: two guest
//! stand-ins behind real TAPs (`wk-a` 172.30.0.5 with NAT, `wk-b` 172.30.0.6 without), each
//! port guarded through a NAT backend (nft and iptables: both use nftables' bridge family).
//! Forged source IPs, ARP and MACs from `b` must not reach anything. Root only; skipped with a
//! printed reason otherwise.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use wick_host::net::testns::{skip_reason, tool_works, TapGuest, TestNetns};
use wick_host::net::{
    create_tap, guest_mac, Bridge, ForwardGuard, IptablesNat, NatBackend, NftNat, Runner,
};

const T: Duration = Duration::from_millis(1000);
const UPSTREAM: &str = "198.51.100.1:9999";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An expected success: a few attempts (first packets wait on ARP; this machine is often loaded).
fn connect_ok(ns: &TestNetns, addr: SocketAddr, what: &str) -> std::net::TcpStream {
    let mut last = None;
    for _ in 0..4 {
        match ns.connect(addr, T) {
            Ok(s) => return s,
            Err(e) => last = Some(e),
        }
    }
    panic!("{what}: {last:?}");
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An ARP frame (Ethernet broadcast): `op` 1 = request, 2 = reply.
fn arp(eth_src: [u8; 6], op: u8, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(eth_src);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
    f.extend(sha);
    f.extend(spa.octets());
    f.extend([0xff; 6]);
    f.extend(tpa.octets());
    f
}

struct World {
    // Field order = drop order: stand-ins (their pumps) first, then the namespaces.
    ga: TapGuest,
    gb: TapGuest,
    upstream: TestNetns,
    wick: TestNetns,
}

/// wick netns with bridge wick0, uplink to an upstream netns (198.51.100.1) and two guarded TAPs
/// with stand-ins behind them; `a` has NAT.
fn world(make: impl FnOnce(Arc<dyn Runner>) -> Box<dyn NatBackend>) -> World {
    let wick = TestNetns::create("grd").unwrap();
    let upstream = TestNetns::create("gup").unwrap();
    wick.veth_to("up0", &upstream, "eth0").unwrap();
    for (ns, cidr) in [(&wick, "198.51.100.2/24"), (&upstream, "198.51.100.1/24")] {
        let dev = if cidr.ends_with(".2/24") {
            "up0"
        } else {
            "eth0"
        };
        ns.run("ip", &["addr", "add", cidr, "dev", dev]).unwrap();
        ns.run("ip", &["link", "set", dev, "up"]).unwrap();
    }
    wick.run("ip", &["route", "add", "default", "via", "198.51.100.1"])
        .unwrap();
    let r: Arc<dyn Runner> = Arc::new(wick.runner());
    Bridge::new("wick0", "172.30.0.1/24")
        .unwrap()
        .ensure(&*r)
        .unwrap();
    ForwardGuard::ensure_enabled(&*r).unwrap();
    let nat = make(r.clone());
    let mut guests = Vec::new();
    for (key, ip) in [("a", "172.30.0.5"), ("b", "172.30.0.6")] {
        let tap = format!("wk-{key}");
        let ip: Ipv4Addr = ip.parse().unwrap();
        nat.guard_port(key, &tap, &guest_mac(ip), ip).unwrap();
        nat.guard_port(key, &tap, &guest_mac(ip), ip).unwrap(); // idempotent
        create_tap(&*r, &tap, "wick0", true).unwrap();
        let g = wick
            .guest_on_tap(key, &tap, &guest_mac(ip), &format!("{ip}/24"), "172.30.0.1")
            .unwrap();
        guests.push(g);
    }
    nat.enable("a", "172.30.0.5".parse().unwrap(), "wk-a", None)
        .unwrap();
    assert_eq!(nat.list_vm_keys().unwrap(), ["a", "b"]);
    let gb = guests.pop().unwrap();
    let ga = guests.pop().unwrap();
    World {
        ga,
        gb,
        upstream,
        wick,
    }
}

/// Sends a few datagrams from `ns`, bound to `src`, to the upstream.
fn send_udp(ns: &TestNetns, src: &str, tag: &str) {
    ns.enter(|| {
        let s = UdpSocket::bind(sa(&format!("{src}:0"))).unwrap();
        for _ in 0..3 {
            let _ = s.send_to(tag.as_bytes(), sa(UPSTREAM));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// What the upstream received within a second.
fn received(sock: &UdpSocket) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    sock.set_read_timeout(Some(T)).unwrap();
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

fn neigh(w: &TestNetns, ip: &str) -> String {
    w.run("ip", &["neigh", "show", ip, "dev", "wick0"])
        .unwrap()
        .to_lowercase()
}

fn guard_drops_forged_sources(make: impl FnOnce(Arc<dyn Runner>) -> Box<dyn NatBackend>) {
    let w = world(make);
    let (ip_a, ip_b): (Ipv4Addr, Ipv4Addr) =
        ("172.30.0.5".parse().unwrap(), "172.30.0.6".parse().unwrap());
    let (mac_a, mac_b) = (
        guest_mac(ip_a).to_lowercase(),
        guest_mac(ip_b).to_lowercase(),
    );
    let up = w.upstream.enter(|| UdpSocket::bind(sa(UPSTREAM))).unwrap();
    let _host = w.wick.listen(sa("172.30.0.1:7000")).unwrap();
    let _a_srv = w.ga.listen(sa("172.30.0.5:7001")).unwrap();

    // Legitimate traffic through the guarded ports works (and fills the neighbour tables).
    connect_ok(&w.ga, sa("172.30.0.1:7000"), "a -> host");
    connect_ok(&w.gb, sa("172.30.0.1:7000"), "b -> host");
    connect_ok(&w.wick, sa("172.30.0.5:7001"), "host -> a");
    send_udp(&w.ga, "172.30.0.5", "from-a");
    assert!(
        received(&up).contains(&"from-a".to_string()),
        "a (NAT) reaches the upstream"
    );

    // b (no NAT) sends with a's address: no egress.
    w.gb.run("ip", &["addr", "add", "172.30.0.5/32", "dev", "eth0"])
        .unwrap();
    send_udp(&w.gb, "172.30.0.5", "forged-ip");
    let got = received(&up);
    assert!(got.is_empty(), "b with a's source IP got egress: {got:?}");

    // Forged ARP for a's address (gratuitous reply, and a request to the gateway) does not
    // redirect the host's traffic for a. (Linux ignores ARP updates within `locktime`, 1 s.)
    std::thread::sleep(Duration::from_millis(1100));
    let gw: Ipv4Addr = "172.30.0.1".parse().unwrap();
    let mb = mac_bytes(&mac_b);
    w.gb.inject(&arp(mb, 2, mb, ip_a, ip_a)).unwrap();
    w.gb.inject(&arp(mb, 1, mb, ip_a, gw)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let n = neigh(&w.wick, "172.30.0.5");
    assert!(!n.contains(&mac_b), "forged ARP took over a's address: {n}");
    // Only a listens on 7001 (b, which also holds a's address now, would refuse).
    connect_ok(&w.wick, sa("172.30.0.5:7001"), "host -> a after forged ARP");

    // A forged source MAC (a's, and an invented one) is dropped before the bridge learns it.
    let invented = mac_bytes("02:de:ad:be:ef:01");
    for forged in [mac_bytes(&mac_a), invented] {
        w.gb.inject(&arp(forged, 1, forged, ip_b, gw)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let fdb = w
        .wick
        .run("bridge", &["fdb", "show", "dev", "wk-b"])
        .unwrap()
        .to_lowercase();
    assert!(
        !fdb.contains(&mac_a) && !fdb.contains("02:de:ad:be:ef:01"),
        "bridge learned a forged MAC on b's port: {fdb}"
    );
    let n = neigh(&w.wick, "172.30.0.6");
    assert!(!n.contains("02:de:ad:be:ef:01"), "{n}");
    connect_ok(&w.wick, sa("172.30.0.5:7001"), "host -> a after forged MAC");

    // IPv6 from a guest goes nowhere (wick gives guests none).
    let _h6 = w.wick.listen(sa("[::]:7006")).unwrap();
    let ll = bridge_link_local(&w.wick);
    let idx = w.gb.enter(|| {
        let name = std::ffi::CString::new("eth0").unwrap();
        // SAFETY: a valid NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    let dst = SocketAddr::V6(std::net::SocketAddrV6::new(ll, 7006, 0, idx));
    assert!(
        w.gb.connect(dst, T).is_err(),
        "guest reached the host over IPv6 ({dst})"
    );
}

/// The bridge's IPv6 link-local address, once DAD is done (a few seconds at most).
pub fn bridge_link_local(w: &TestNetns) -> std::net::Ipv6Addr {
    for _ in 0..100 {
        let out = w
            .run(
                "ip",
                &["-6", "-j", "addr", "show", "dev", "wick0", "scope", "link"],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let info = &v[0]["addr_info"][0];
        if let (Some(a), None) = (info["local"].as_str(), info["tentative"].as_bool()) {
            return a.parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("wick0 got no usable IPv6 link-local address");
}

fn ready(tool: &str, args: &[&str]) -> bool {
    if let Some(why) = skip_reason() {
        wick_testkit::skip(format_args!("guard test: {why}"));
        return false;
    }
    let probe = TestNetns::create("probe").unwrap();
    if !tool_works(&probe, tool, args) {
        wick_testkit::skip(format_args!(
            "guard test: `{tool}` does not work here (install it)"
        ));
        return false;
    }
    true
}

#[test]
fn guard_nft_drops_forged_ip_arp_mac_and_ipv6() {
    if !ready("nft", &["list", "tables"]) {
        return;
    }
    guard_drops_forged_sources(|r| Box::new(NftNat::new(r, "wick0").unwrap()));
}

#[test]
fn guard_iptables_drops_forged_ip_arp_mac_and_ipv6() {
    if !ready("iptables", &["-w", "-t", "nat", "-S"]) || !ready("nft", &["list", "tables"]) {
        return;
    }
    guard_drops_forged_sources(|r| Box::new(IptablesNat::new(r, "iptables", "wick0").unwrap()));
}

#[test]
fn guard_is_removed_with_the_vm_and_by_remove_all() {
    if !ready("nft", &["list", "tables"]) {
        return;
    }
    let w = TestNetns::create("grm").unwrap();
    let r: Arc<dyn Runner> = Arc::new(w.runner());
    let nft = NftNat::new(r.clone(), "wick0").unwrap();
    let ip: Ipv4Addr = "172.30.0.5".parse().unwrap();
    nft.guard_port("a", "wk-a", &guest_mac(ip), ip).unwrap();
    nft.guard_port("b", "wk-b", &guest_mac(ip), ip).unwrap();
    // NAT off keeps the guard; the VM's removal (cleanup, sweep) takes it.
    nft.enable("a", ip, "wk-a", None).unwrap();
    nft.disable("a", ip, "wk-a").unwrap();
    assert_eq!(nft.list_vm_keys().unwrap(), ["a", "b"]);
    assert!(nft.unguard_port("a").unwrap());
    assert!(!nft.unguard_port("a").unwrap());
    assert!(nft.remove_vm("b").unwrap());
    assert!(nft.list_vm_keys().unwrap().is_empty());
    nft.guard_port("c", "wk-c", &guest_mac(ip), ip).unwrap();
    nft.remove_all_wick().unwrap();
    let rules = w.run("nft", &["list", "ruleset"]).unwrap();
    assert!(!rules.contains("wick"), "{rules}");
}
