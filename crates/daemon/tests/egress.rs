//! Integration: the egress allowlist (`--allow-host`) of real `wickd`/`wick` binaries (fake
//! Firecracker), each daemon in its own private network namespace. A "guest" stand-in is a netns
//! on a veth in the bridge with the VM's address; the "upstream" netns behind a veth holds the
//! fake upstream DNS server (`wick_testkit::dns::FakeUpstream`, which wickd forwards to through
//! `upstream_dns`) and one TCP server per name, each at its own address.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use wick_host::net::testns::{self, TestNetns};
use wick_testkit::dns::{query_a, FakeUpstream};
use wick_testkit::wickd::WickdEnv;

const A_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const PORT: u16 = 8080;
/// A server that keeps a connection open and echoes every line (B_IP only).
const ECHO_PORT: u16 = 8081;
/// The guests' resolver: wickd on the bridge address.
const GUEST_DNS: &str = "172.30.0.1:53";

fn skip() -> bool {
    if let Some(why) = testns::skip_reason() {
        wick_testkit::skip(format_args!("{why}"));
        return true;
    }
    false
}

fn vm(env: &WickdEnv, name: &str) -> Value {
    env.wick_json(&["vm", "show", name])
}

/// Serves one accept at a time in `ns` on `addr`; each connection gets the peer address back.
fn echo_peer_server(ns: &TestNetns, addr: SocketAddr) {
    let l = ns.listen(addr).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let peer = s
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, peer.as_bytes());
        }
    });
}

/// Serves connections in `ns` on `addr`, each echoing what it receives until it is closed.
fn line_echo_server(ns: &TestNetns, addr: SocketAddr) {
    let l = ns.listen(addr).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(mut r) = s.try_clone() {
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                }
            });
        }
    });
}

/// Sends one line on `s` and whether it came back within two seconds.
fn echoes(s: &mut TcpStream, line: &str) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if std::io::Write::write_all(s, line.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf).is_ok() && buf == line.as_bytes()
}

/// Connects from `ns` to `ip:PORT` and returns what the server said (our address as it saw it).
fn reach(ns: &TestNetns, ip: Ipv4Addr) -> Option<String> {
    let addr = SocketAddr::from((ip, PORT));
    let mut s: TcpStream = ns.connect(addr, Duration::from_millis(700)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// [`reach`] for an expected success: a few attempts (ARP after a topology change, a loaded
/// machine).
fn reach_ok(ns: &TestNetns, ip: Ipv4Addr) -> Option<String> {
    (0..4).find_map(|_| reach(ns, ip))
}

fn resolve(g: &TestNetns, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    query_a(g, GUEST_DNS.parse().unwrap(), name).map_err(|c| format!("{c:?}"))
}

/// Every line of the daemon namespace's firewall that names a VM (chains, sets, tagged rules,
/// wick's ipsets).
fn vm_rule_lines(env: &WickdEnv) -> Vec<String> {
    let ns = env.netns.as_ref().unwrap();
    let mut all = ns.run("nft", &["list", "ruleset"]).unwrap_or_default();
    for bin in ["iptables-save", "iptables-legacy-save"] {
        all += &ns.run(bin, &[]).unwrap_or_default();
    }
    all.lines()
        .map(str::to_string)
        .chain(ipsets(env))
        .filter(|l| l.contains("vm-") || l.contains("wick:vm") || l.starts_with("wick-vm-"))
        .collect()
}

/// wick's ipsets in the daemon's namespace (none without ipset).
fn ipsets(env: &WickdEnv) -> Vec<String> {
    let ns = env.netns.as_ref().unwrap();
    let out = ns.run("ipset", &["list", "-n"]).unwrap_or_default();
    out.lines()
        .filter(|l| l.starts_with("wick-vm-"))
        .map(str::to_string)
        .collect()
}

/// Whether an allowlist set (nft set or ipset) exists.
fn has_allow_set(env: &WickdEnv) -> bool {
    vm_rule_lines(env)
        .iter()
        .any(|l| l.contains("-allow") || l.starts_with("wick-vm-"))
}

/// Whether VM `name`'s own allowlist set (nft) or ipset exists.
fn has_allow_set_of(env: &WickdEnv, name: &str) -> bool {
    let id = vm(env, name)["id"].as_str().unwrap().to_string();
    let key = &id[..12];
    vm_rule_lines(env)
        .iter()
        .any(|l| l.contains(&format!("vm-{key}-allow")) || l.starts_with(&format!("wick-vm-{key}")))
}

/// Whether `ipset` works in the daemon's namespace (the iptables backend needs it).
fn ipset_works(env: &WickdEnv) -> bool {
    testns::tool_works(env.netns.as_ref().unwrap(), "ipset", &["list", "-n"])
}

/// The upstream namespace: the fake DNS at 198.51.100.2 and a server for each name.
fn upstream(env: &WickdEnv) -> (TestNetns, FakeUpstream) {
    let up = env.upstream();
    for ip in [A_IP, B_IP] {
        up.run("ip", &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])
            .unwrap();
        echo_peer_server(&up, SocketAddr::from((ip, PORT)));
    }
    line_echo_server(&up, SocketAddr::from((B_IP, ECHO_PORT)));
    let dns = FakeUpstream::start(
        &up,
        "198.51.100.2:53".parse().unwrap(),
        &[("a.test", A_IP, 300), ("b.test", B_IP, 300)],
    );
    (up, dns)
}

fn guest(env: &WickdEnv, tag: &str, ip: &str) -> TestNetns {
    env.netns
        .as_ref()
        .unwrap()
        .guest(
            tag,
            &format!("gv{tag}"),
            "wick0",
            &format!("{ip}/24"),
            "172.30.0.1",
        )
        .unwrap()
}

#[test]
fn allowlist_resolves_and_reaches_only_allowed_hosts_live_and_leaves_nothing() {
    if skip() {
        return;
    }
    allowlist_scenario("nft");
}

#[test]
fn allowlist_with_iptables_and_ipset() {
    if skip() {
        return;
    }
    allowlist_scenario("iptables");
}

fn allowlist_scenario(backend: &str) {
    let mut env = WickdEnv::new(&format!(
        "upstream_dns = [\"198.51.100.2\"]\nnat_backend = \"{backend}\""
    ));
    env.start();
    if backend != "nft" && !ipset_works(&env) {
        wick_testkit::skip(format_args!(
            "ipset missing: the iptables backend refuses allowlists"
        ));
        return;
    }
    let (_up, _dns) = upstream(&env);

    env.wick_ok(&["vm", "create", "--name", "e1", "--allow-host", "A.test"]);
    env.wick_ok(&["vm", "create", "--name", "n1", "--nat"]);
    let e1 = vm(&env, "e1");
    assert_eq!(
        e1["spec"]["allow_hosts"],
        serde_json::json!(["a.test"]),
        "{e1}"
    );
    assert_eq!(e1["spec"]["nat"], false);
    let ip = e1["runtime"]["ip"].as_str().unwrap().to_string();
    let g = guest(&env, "e1", &ip);

    // Allowed: resolved through wick's resolver and reachable (masqueraded).
    assert_eq!(resolve(&g, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&g, A_IP).as_deref(), Some("198.51.100.1"));
    // Not allowed: NXDOMAIN, and a direct connection to its address is dropped.
    assert_eq!(resolve(&g, "b.test"), Err("NXDomain".into()));
    assert!(
        reach(&g, B_IP).is_none(),
        "b.test's address is not reachable"
    );
    // `.vm` names still resolve.
    assert_eq!(
        resolve(&g, "e1.vm"),
        Ok(vec![ip.parse::<Ipv4Addr>().unwrap()])
    );

    // Another VM is not restricted by e1's list: n1 (full NAT) resolves b.test and holds a
    // connection open to it.
    let n1_ip = vm(&env, "n1")["runtime"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let gn = guest(&env, "n1", &n1_ip);
    assert_eq!(resolve(&gn, "b.test"), Ok(vec![B_IP]));
    let mut tunnel = (0..4)
        .find_map(|_| {
            gn.connect(SocketAddr::from((B_IP, ECHO_PORT)), Duration::from_secs(2))
                .ok()
        })
        .expect("n1 (NAT) connects to b.test");
    assert!(echoes(&mut tunnel, "before\n"));
    // Switched live to an allowlist of a.test: the connection opened under NAT is cut, b.test
    // is closed, and a.test opens only once n1 itself resolves it.
    env.wick_ok(&["vm", "set", "n1", "--nat", "off", "--allow-host", "a.test"]);
    assert!(
        !echoes(&mut tunnel, "after\n"),
        "a connection opened under --nat must not survive the switch to an allowlist"
    );
    assert_eq!(resolve(&gn, "b.test"), Err("NXDomain".into()));
    assert!(reach(&gn, B_IP).is_none());
    assert!(reach(&gn, A_IP).is_none(), "n1 has not resolved a.test");
    assert_eq!(resolve(&gn, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&gn, A_IP).as_deref(), Some("198.51.100.1"));

    // Live: allow b.test.
    let out = env.wick_ok(&["vm", "set", "e1", "--allow-host", "b.test"]);
    assert!(out.contains("allow a.test, b.test"), "{out}");
    assert_eq!(resolve(&g, "b.test"), Ok(vec![B_IP]));
    assert_eq!(reach_ok(&g, B_IP).as_deref(), Some("198.51.100.1"));
    // e1's opened addresses are e1's alone: n1 (allowlist a.test) still cannot reach b.test.
    assert!(reach(&gn, B_IP).is_none(), "n1 does not use e1's set");

    // Live: deny it again; its address is closed at once.
    env.wick_ok(&["vm", "set", "e1", "--deny-host", "b.test"]);
    assert!(reach(&g, B_IP).is_none(), "denied live");
    assert_eq!(resolve(&g, "b.test"), Err("NXDomain".into()));
    assert_eq!(resolve(&g, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&g, A_IP).as_deref(), Some("198.51.100.1"));

    // Contradictions and bad entries are refused, naming the problem.
    let out = env.wick(&["vm", "set", "e1", "--nat", "on"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("contradict"), "{err}");
    let out = env.wick(&["vm", "set", "e1", "--allow-host", "bad name.test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad name.test"),
        "{err}"
    );
    let out = env.wick(&["vm", "set", "e1", "--deny-host", "c.test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("c.test"), "{err}");

    // Adopted after a daemon crash: still enforced, the resolver restricted again.
    env.kill9();
    env.start();
    assert_eq!(resolve(&g, "b.test"), Err("NXDomain".into()));
    assert!(reach(&g, B_IP).is_none());
    assert_eq!(resolve(&g, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&g, A_IP).as_deref(), Some("198.51.100.1"));

    // Stop removes the set with the chains; start brings it back (empty).
    env.wick_ok(&["vm", "stop", "e1"]);
    assert!(!has_allow_set_of(&env, "e1"), "{:?}", vm_rule_lines(&env));
    env.wick_ok(&["vm", "start", "e1"]);
    assert!(has_allow_set_of(&env, "e1"));
    assert!(
        reach(&g, A_IP).is_none(),
        "a fresh set is empty until resolved"
    );
    assert_eq!(resolve(&g, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&g, A_IP).as_deref(), Some("198.51.100.1"));

    env.wick_ok(&["vm", "delete", "e1", "n1"]);
    assert!(vm_rule_lines(&env).is_empty(), "{:?}", vm_rule_lines(&env));
    drop((g, gn));
}

#[test]
fn allowlist_leftovers_are_swept_after_a_crash() {
    if skip() {
        return;
    }
    let mut env = WickdEnv::new("upstream_dns = [\"198.51.100.2\"]");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "keep", "--allow-host", "*.test"]);
    env.kill9();
    // What a VM deleted while wickd was down leaves: its chains and its set, under a key of no
    // VM.
    let script = "add set inet wick vm-0000deadbeef-allow { type ipv4_addr; flags timeout; }
add chain inet wick vm-0000deadbeef-filter
add rule inet wick vm-0000deadbeef-filter ip daddr @vm-0000deadbeef-allow accept
add element inet wick vm-0000deadbeef-allow { 198.51.100.20 timeout 300s }
";
    let ns = env.netns.as_ref().unwrap();
    wick_host::net::run_ok(&ns.runner(), "nft", &["-f", "-"], Some(script)).unwrap();
    assert!(vm_rule_lines(&env)
        .iter()
        .any(|l| l.contains("0000deadbeef")));
    env.start();
    let lines = vm_rule_lines(&env);
    assert!(
        lines.iter().all(|l| !l.contains("0000deadbeef")),
        "swept: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("-allow")),
        "the live VM's set stays: {lines:?}"
    );
    env.wick_ok(&["vm", "delete", "keep"]);
    assert!(vm_rule_lines(&env).is_empty(), "{:?}", vm_rule_lines(&env));
}

#[test]
fn allowlist_is_checked_by_the_daemon_and_refused_without_address_sets() {
    if skip() {
        return;
    }
    let mut env = WickdEnv::new("nat_backend = \"iptables\"");
    // A fake `ipset` that always fails, first on the daemon's PATH: the host has no ipset.
    let fake = env.root().join("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    let script = fake.join("ipset");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'fake ipset: not installed' >&2\nexit 127\n",
    )
    .unwrap();
    let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&script, mode).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    env.env
        .push(("PATH".into(), format!("{}:{path}", fake.display())));
    env.start();
    let post = |body: &str| {
        wick_testkit::wickd::http(&env.socket(), "POST", "/v1/vms", Some(body.as_bytes()))
    };
    let (st, text) = post(r#"{"name": "x1", "nat": true, "allow_hosts": ["a.test"]}"#);
    assert!(st == 400 && text.contains("contradict"), "{st} {text}");
    let (st, text) = post(r#"{"name": "x1", "allow_hosts": ["10.0.0.1"]}"#);
    assert!(st == 400 && text.contains("10.0.0.1"), "{st} {text}");
    let many: Vec<String> = (0..65).map(|i| format!("\"h{i}.test\"")).collect();
    let (st, text) = post(&format!(r#"{{"allow_hosts": [{}]}}"#, many.join(",")));
    assert!(st == 400 && text.contains("at most 64"), "{st} {text}");

    // The iptables backend without ipset has no address sets: refused before anything is made
    // for it, saying why.
    let out = env.wick(&["vm", "create", "--name", "i1", "--allow-host", "a.test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ipset"), "{err}");
    let doctor = env.wick_json(&["doctor"]);
    let check = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "egress allowlist")
        .cloned()
        .unwrap_or_default();
    assert_eq!(check["status"], "warn", "{doctor}");
    let i1 = vm(&env, "i1");
    assert_ne!(i1["state"], "running", "{i1}");
    assert!(vm_rule_lines(&env).is_empty(), "{:?}", vm_rule_lines(&env));
    env.wick_ok(&["vm", "delete", "i1"]);
}

/// The crash drill for an allowlist VM: wickd killed at each failpoint of a start (after the
/// NAT rules and set, after the VMM) leaves, after a restart, no chain, set or rule, and the VM
/// starts again with its allowlist.
#[test]
fn crash_drill_allowlist() {
    if skip() {
        return;
    }
    crash_drill("nft");
}

#[test]
fn crash_drill_allowlist_iptables() {
    if skip() {
        return;
    }
    crash_drill("iptables");
}

fn crash_drill(backend: &str) {
    for point in ["after-tap", "after-nat", "after-spawn"] {
        let mut env = WickdEnv::new(&format!("nat_backend = \"{backend}\""));
        env.env.push(("WICK_FAILPOINTS".into(), point.into()));
        env.start();
        if backend != "nft" && !ipset_works(&env) {
            wick_testkit::skip(format_args!(
                "ipset missing: the iptables backend refuses allowlists"
            ));
            return;
        }
        let out = env.wick(&["vm", "create", "--name", "a1", "--allow-host", "a.test"]);
        assert!(!out.status.success(), "{point}: the daemon died mid-start");
        env.kill9(); // reap the dead daemon
        env.env.clear();
        env.start();
        let a1 = vm(&env, "a1");
        let state = a1["state"].as_str().unwrap();
        assert!(state == "stopped" || state == "error", "{point}: {a1}");
        assert!(a1["runtime"]["nat"].is_null(), "{point}: {a1}");
        assert!(
            vm_rule_lines(&env).is_empty(),
            "{point}: {:?}",
            vm_rule_lines(&env)
        );
        env.wick_ok(&["vm", "start", "a1"]);
        let lines = vm_rule_lines(&env);
        assert!(has_allow_set(&env), "{point}: {lines:?}");
        env.wick_ok(&["vm", "delete", "a1"]);
        assert!(vm_rule_lines(&env).is_empty(), "{point}");
    }
}

/// The iptables backend's ipsets are swept like nft sets: one of a VM deleted while wickd was
/// down goes at the next start, the live VM's stays.
#[test]
fn allowlist_ipset_leftovers_are_swept_after_a_crash() {
    if skip() {
        return;
    }
    let mut env = WickdEnv::new("nat_backend = \"iptables\"");
    env.start();
    if !ipset_works(&env) {
        wick_testkit::skip(format_args!(
            "ipset missing: the iptables backend refuses allowlists"
        ));
        return;
    }
    env.wick_ok(&["vm", "create", "--name", "keep", "--allow-host", "*.test"]);
    env.kill9();
    let ns = env.netns.as_ref().unwrap();
    ns.run(
        "ipset",
        &["create", "wick-0000deadbeef", "hash:ip", "timeout", "0"],
    )
    .unwrap();
    env.start();
    let sets = ipsets(&env);
    assert_eq!(sets.len(), 1, "only the live VM's ipset stays: {sets:?}");
    assert!(!sets[0].contains("0000deadbeef"), "{sets:?}");
    env.wick_ok(&["vm", "delete", "keep"]);
    assert!(vm_rule_lines(&env).is_empty(), "{:?}", vm_rule_lines(&env));
}

/// A `vm set` that a later capability refuses (its host port is taken) leaves the allowlist VM
/// as it was: not switched to full NAT with the record still saying allowlist.
#[test]
fn a_refused_vm_set_undoes_what_it_had_applied() {
    if skip() {
        return;
    }
    let mut env = WickdEnv::new("upstream_dns = [\"198.51.100.2\"]");
    env.start();
    let (_up, _dns) = upstream(&env);
    env.wick_ok(&["vm", "create", "--name", "e1", "--allow-host", "a.test"]);
    let ip = vm(&env, "e1")["runtime"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let g = guest(&env, "e1", &ip);
    // The host port the change wants to publish is held by someone else.
    let _taken = env
        .netns
        .as_ref()
        .unwrap()
        .listen("127.0.0.1:18080".parse().unwrap())
        .unwrap();
    let out = env.wick(&[
        "vm",
        "set",
        "e1",
        "--nat",
        "on",
        "--deny-host",
        "a.test",
        "--publish",
        "18080:80",
    ]);
    assert!(
        !out.status.success(),
        "the port bind must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let e1 = vm(&env, "e1");
    assert_eq!(
        e1["spec"]["allow_hosts"],
        serde_json::json!(["a.test"]),
        "{e1}"
    );
    assert_eq!(e1["spec"]["nat"], false, "{e1}");
    // The host matches the record: still the allowlist's set and resolver policy.
    assert!(has_allow_set_of(&env, "e1"), "{:?}", vm_rule_lines(&env));
    assert_eq!(resolve(&g, "b.test"), Err("NXDomain".into()));
    assert!(reach(&g, B_IP).is_none(), "no full NAT");
    assert_eq!(resolve(&g, "a.test"), Ok(vec![A_IP]));
    assert_eq!(reach_ok(&g, A_IP).as_deref(), Some("198.51.100.1"));
    env.wick_ok(&["vm", "delete", "e1"]);
    assert!(vm_rule_lines(&env).is_empty(), "{:?}", vm_rule_lines(&env));
}
