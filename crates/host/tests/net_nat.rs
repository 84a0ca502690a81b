//! NAT through each backend (nft, iptables, iptables-legacy), for real, inside private network
//! namespaces: wick netns (bridge + guest stand-in) -> veth -> "upstream" netns with a listener.
//! Root only; skipped with a printed reason otherwise (and per backend when its tool is missing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wick_host::net::testns::{skip_reason, tool_works, TestNetns};
use wick_host::net::{Bridge, ForwardGuard, IptablesNat, NatBackend, NftNat, Runner};

const T: Duration = Duration::from_millis(1000);
const UPSTREAM: &str = "198.51.100.1:8080";
const WICK_UPLINK_IP: &str = "198.51.100.2";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct World {
    // Field order = drop order: guest and upstream first, then the wick netns.
    guest: TestNetns,
    upstream: TestNetns,
    wick: TestNetns,
}

/// wick netns: bridge wick0 172.30.0.1/24, uplink `up0` 198.51.100.2/24 with the default route
/// via the upstream; upstream netns: 198.51.100.1/24 (no route back to the guests' network);
/// guest stand-in 172.30.0.5 behind `wk-g1`.
fn world() -> World {
    let wick = TestNetns::create("nat").unwrap();
    let upstream = TestNetns::create("up").unwrap();
    wick.veth_to("up0", &upstream, "eth0").unwrap();
    wick.run("ip", &["addr", "add", "198.51.100.2/24", "dev", "up0"])
        .unwrap();
    wick.run("ip", &["link", "set", "up0", "up"]).unwrap();
    wick.run("ip", &["route", "add", "default", "via", "198.51.100.1"])
        .unwrap();
    upstream
        .run("ip", &["addr", "add", "198.51.100.1/24", "dev", "eth0"])
        .unwrap();
    upstream.run("ip", &["link", "set", "eth0", "up"]).unwrap();
    Bridge::new("wick0", "172.30.0.1/24")
        .unwrap()
        .ensure(&wick.runner())
        .unwrap();
    let guest = wick
        .guest("g1", "wk-g1", "wick0", "172.30.0.5/24", "172.30.0.1")
        .unwrap();
    World {
        guest,
        upstream,
        wick,
    }
}

fn nat_roundtrip(make: impl FnOnce(Arc<dyn Runner>) -> Box<dyn NatBackend>) {
    let w = world();
    let runner: Arc<dyn Runner> = Arc::new(w.wick.runner());
    let nat = make(runner.clone());
    let listener = w.upstream.listen(sa(UPSTREAM)).unwrap();
    let guest_ip = "172.30.0.5".parse().unwrap();

    // A fresh netns does not forward; wick turns it on and says so.
    assert!(ForwardGuard::ensure_enabled(&*runner).unwrap());
    assert!(!ForwardGuard::ensure_enabled(&*runner).unwrap());

    // No NAT: the guest cannot reach the upstream.
    assert!(
        w.guest.connect(sa(UPSTREAM), T).is_err(),
        "reached upstream without NAT"
    );

    nat.enable("g1", guest_ip, "wk-g1", None).unwrap();
    nat.enable("g1", guest_ip, "wk-g1", None).unwrap(); // idempotent
    assert_eq!(nat.list_vm_keys().unwrap(), ["g1"]);
    let _conn = w
        .guest
        .connect(sa(UPSTREAM), T)
        .expect("NAT on: guest -> upstream");
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        WICK_UPLINK_IP,
        "upstream must see the masqueraded address, not the guest's"
    );
    // Host isolation on top does not break NAT'd traffic.
    nat.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    w.guest.connect(sa(UPSTREAM), T).expect("NAT + isolation");

    // `vm set --nat off` on the live VM cuts it.
    nat.disable("g1", guest_ip, "wk-g1").unwrap();
    nat.disable("g1", guest_ip, "wk-g1").unwrap();
    assert!(nat.list_vm_keys().unwrap().is_empty());
    assert!(
        w.guest.connect(sa(UPSTREAM), T).is_err(),
        "NAT off still reaches upstream"
    );

    // Only wick's objects go, and all of them.
    nat.enable("g1", guest_ip, "wk-g1", Some("up0")).unwrap();
    w.guest
        .connect(sa(UPSTREAM), T)
        .expect("NAT via explicit out_iface");
    nat.remove_all_wick().unwrap();
    nat.remove_all_wick().unwrap();
    assert!(nat.list_vm_keys().unwrap().is_empty());

    assert!(ForwardGuard::release(&*runner, true, false).unwrap());
    assert!(!ForwardGuard::is_enabled(&*runner).unwrap());
}

macro_rules! require {
    ($tool:expr, $args:expr) => {{
        if let Some(why) = skip_reason() {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
        let probe = TestNetns::create("probe").unwrap();
        if !tool_works(&probe, $tool, $args) {
            wick_testkit::skip(format_args!("`{}` does not work here (install it)", $tool));
            return;
        }
    }};
}

#[test]
fn nat_nft() {
    require!("nft", &["list", "tables"]);
    nat_roundtrip(|r| Box::new(NftNat::new(r, "wick0").unwrap()));
    // And nothing is left in the table-less namespace: checked inside nat_roundtrip via keys.
}

#[test]
fn nat_iptables() {
    require!("iptables", &["-w", "-t", "nat", "-S"]);
    nat_roundtrip(|r| Box::new(IptablesNat::new(r, "iptables", "wick0").unwrap()));
}

#[test]
fn nat_iptables_legacy() {
    require!("iptables-legacy", &["-w", "-t", "nat", "-S"]);
    nat_roundtrip(|r| Box::new(IptablesNat::new(r, "iptables-legacy", "wick0").unwrap()));
}

#[test]
fn remove_all_leaves_nothing_wick_named() {
    require!("nft", &["list", "tables"]);
    let w = world();
    let r: Arc<dyn Runner> = Arc::new(w.wick.runner());
    let ip = "172.30.0.5".parse().unwrap();
    let nft = NftNat::new(r.clone(), "wick0").unwrap();
    nft.enable("g1", ip, "wk-g1", None).unwrap();
    nft.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    let before = w.wick.run("nft", &["list", "ruleset"]).unwrap();
    assert!(before.contains("table inet wick"), "{before}");
    nft.remove_all_wick().unwrap();
    let after = w.wick.run("nft", &["list", "ruleset"]).unwrap();
    assert!(!after.contains("wick"), "{after}");
    // The port guard's `bridge wick` table goes too.
    nft.guard_port("g1", "wk-g1", "06:00:ac:1e:00:05", ip)
        .unwrap();
    nft.remove_all_wick().unwrap();
    let after = w.wick.run("nft", &["list", "ruleset"]).unwrap();
    assert!(!after.contains("wick"), "{after}");

    if tool_works(&w.wick, "iptables", &["-w", "-S"]) {
        let ipt = IptablesNat::new(r.clone(), "iptables", "wick0").unwrap();
        ipt.enable("g1", ip, "wk-g1", None).unwrap();
        ipt.apply_host_isolation("172.30.0.1".parse().unwrap())
            .unwrap();
        ipt.remove_all_wick().unwrap();
        for table in ["nat", "filter"] {
            let rules = w.wick.run("iptables", &["-w", "-t", table, "-S"]).unwrap();
            assert!(!rules.to_lowercase().contains("wick"), "{table}: {rules}");
        }
        let rules6 = w.wick.run("ip6tables", &["-w", "-S"]).unwrap();
        assert!(!rules6.to_lowercase().contains("wick"), "{rules6}");
    }
}

/// An interface's IPv6 link-local address in `ns`, once DAD is done, and its index.
fn link_local(ns: &TestNetns, dev: &str) -> (std::net::Ipv6Addr, u32) {
    for _ in 0..100 {
        let out = ns
            .run(
                "ip",
                &["-6", "-j", "addr", "show", "dev", dev, "scope", "link"],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let info = &v[0]["addr_info"][0];
        if let (Some(a), None) = (info["local"].as_str(), info["tentative"].as_bool()) {
            let idx = v[0]["ifindex"].as_u64().unwrap() as u32;
            return (a.parse().unwrap(), idx);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{dev} got no usable IPv6 link-local address");
}

/// Issue #9 defect 7: a guest reached host services listening on `[::]` through the bridge's
/// link-local address (the iptables backend filtered IPv4 only).
fn ipv6_from_the_bridge_is_dropped(make: impl FnOnce(Arc<dyn Runner>) -> Box<dyn NatBackend>) {
    let w = world();
    let nat = make(Arc::new(w.wick.runner()));
    let _l = w.wick.listen(sa("[::]:8086")).unwrap();
    let (bridge_ll, _) = link_local(&w.wick, "wick0");
    let (_, idx) = link_local(&w.guest, "eth0");
    let dst = SocketAddr::V6(std::net::SocketAddrV6::new(bridge_ll, 8086, 0, idx));
    // Reachable without the filter (so the test can see a difference)...
    let open = (0..4).any(|_| w.guest.connect(dst, T).is_ok());
    assert!(open, "guest cannot reach {dst} even without wick's filter");
    nat.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    assert!(
        w.guest.connect(dst, T).is_err(),
        "{}: guest reached a host service over IPv6 ({dst})",
        nat.name()
    );
    assert!(w.guest.connect(sa("172.30.0.1:8086"), T).is_err());
    // ... and reachable again once wick's rules are gone (it was the filter).
    nat.remove_all_wick().unwrap();
    assert!((0..4).any(|_| w.guest.connect(dst, T).is_ok()));
}

#[test]
fn ipv6_from_bridge_dropped_nft() {
    require!("nft", &["list", "tables"]);
    ipv6_from_the_bridge_is_dropped(|r| Box::new(NftNat::new(r, "wick0").unwrap()));
}

#[test]
fn ipv6_from_bridge_dropped_iptables() {
    require!("ip6tables", &["-w", "-S"]);
    ipv6_from_the_bridge_is_dropped(|r| {
        Box::new(IptablesNat::new(r, "iptables", "wick0").unwrap())
    });
}

#[test]
fn ipv6_from_bridge_dropped_iptables_legacy() {
    require!("ip6tables-legacy", &["-w", "-S"]);
    ipv6_from_the_bridge_is_dropped(|r| {
        Box::new(IptablesNat::new(r, "iptables-legacy", "wick0").unwrap())
    });
}

/// Issue #9 defect 8: guest -> gateway -> other guest (a /32 route via the host) was forwarded
/// although guests must not reach each other (`allow_vm_to_vm = false`); with `true` it passes.
fn routed_guest_to_guest(make: impl Fn(Arc<dyn Runner>, bool) -> Box<dyn NatBackend>) {
    let w = world();
    let r: Arc<dyn Runner> = Arc::new(w.wick.runner());
    let g2 = w
        .wick
        .guest("g2", "wk-g2", "wick0", "172.30.0.6/24", "172.30.0.1")
        .unwrap();
    for (g, peer) in [(&w.guest, "172.30.0.6/32"), (&g2, "172.30.0.5/32")] {
        for key in ["all", "eth0"] {
            let k = format!("net.ipv4.conf.{key}.accept_redirects=0");
            g.run("sysctl", &["-qw", &k]).unwrap();
        }
        g.run("ip", &["route", "add", peer, "via", "172.30.0.1"])
            .unwrap();
    }
    ForwardGuard::ensure_enabled(&*r).unwrap();
    let _srv = g2.listen(sa("172.30.0.6:9000")).unwrap();
    let to_g2 = sa("172.30.0.6:9000");
    assert!(
        (0..4).any(|_| w.guest.connect(to_g2, T).is_ok()),
        "routed guest -> guest does not work even without wick's rules"
    );
    let strict = make(r.clone(), false);
    strict
        .apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    strict
        .enable("g1", "172.30.0.5".parse().unwrap(), "wk-g1", None)
        .unwrap();
    assert!(
        w.guest.connect(to_g2, T).is_err(),
        "{}: guest reached another guest through the gateway",
        strict.name()
    );
    let open = make(r.clone(), true);
    open.apply_host_isolation("172.30.0.1".parse().unwrap())
        .unwrap();
    assert!(
        (0..4).any(|_| w.guest.connect(to_g2, T).is_ok()),
        "{}: allow_vm_to_vm = true must let routed guest traffic pass",
        open.name()
    );
    open.remove_all_wick().unwrap();
}

#[test]
fn routed_guest_to_guest_nft() {
    require!("nft", &["list", "tables"]);
    routed_guest_to_guest(|r, allow| {
        Box::new(NftNat::new(r, "wick0").unwrap().with_vm_to_vm(allow))
    });
}

#[test]
fn routed_guest_to_guest_iptables() {
    require!("iptables", &["-w", "-t", "nat", "-S"]);
    routed_guest_to_guest(|r, allow| {
        Box::new(
            IptablesNat::new(r, "iptables", "wick0")
                .unwrap()
                .with_vm_to_vm(allow),
        )
    });
}

#[test]
fn routed_guest_to_guest_iptables_legacy() {
    require!("iptables-legacy", &["-w", "-t", "nat", "-S"]);
    routed_guest_to_guest(|r, allow| {
        Box::new(
            IptablesNat::new(r, "iptables-legacy", "wick0")
                .unwrap()
                .with_vm_to_vm(allow),
        )
    });
}
