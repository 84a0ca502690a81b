//! The DNS server on loopback: `.vm` answers following the record table over UDP and TCP,
//! forwarding to a fake upstream (UDP, and TCP after truncation), failures, binding errors, and
//! the real `dig` when it is installed. Every socket is on 127.0.0.0/8 with a kernel-chosen port.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{RData, RecordType};
use wick_dns::{DnsConfig, DnsServer, Records};

use common::{a_records, tcp, udp, FakeUpstream, BIG_COUNT, EXAMPLE_IP};

const VM_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);

async fn start(records: &Records, upstreams: Vec<SocketAddr>) -> (DnsServer, SocketAddr) {
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records.clone());
    cfg.upstreams = upstreams;
    cfg.upstream_timeout = Duration::from_secs(2);
    let server = DnsServer::start(cfg).await.unwrap();
    let addr = server.local_addrs()[0];
    (server, addr)
}

/// A loopback address where nothing listens (UDP port 9, discard, is never bound here).
fn dead_upstream() -> SocketAddr {
    "127.0.0.3:9".parse().unwrap()
}

#[tokio::test]
async fn vm_names_follow_the_records_over_udp_and_tcp() {
    let records = Records::new();
    let (server, addr) = start(&records, vec![dead_upstream()]).await;

    let m = udp(addr, "a1.vm.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let soa = m
        .authorities
        .iter()
        .find(|r| matches!(r.data, RData::SOA(_)));
    assert!(soa.is_some(), "NXDOMAIN carries the zone SOA: {m:?}");

    records.set("a1", VM_IP);
    for m in [
        udp(addr, "a1.vm.", RecordType::A, true).await,
        udp(addr, "A1.Vm.", RecordType::A, false).await,
        tcp(addr, "a1.vm.", RecordType::A).await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
        assert!(m.metadata.authoritative);
        assert_eq!(a_records(&m), [VM_IP]);
        assert_eq!(m.answers[0].ttl, wick_dns::DEFAULT_TTL);
    }
    // The owner name echoes the question's case.
    let m = udp(addr, "A1.Vm.", RecordType::A, false).await;
    assert_eq!(m.answers[0].name.to_ascii(), "A1.Vm.");

    // Known name, other type: NODATA.
    let m = udp(addr, "a1.vm.", RecordType::AAAA, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    // Deeper names do not exist; the apex has an SOA.
    let m = udp(addr, "x.a1.vm.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = tcp(addr, "vm.", RecordType::SOA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(m.answers[0].data, RData::SOA(_)));

    records.remove("a1");
    assert_eq!(
        udp(addr, "a1.vm.", RecordType::A, true)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        tcp(addr, "a1.vm.", RecordType::A)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn other_names_are_forwarded_to_the_upstream() {
    let upstream = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 2)).await;
    let records = Records::new();
    records.set("a1", VM_IP);
    // A dead upstream first: the server moves on to the next.
    let (server, addr) = start(&records, vec![dead_upstream(), upstream.addr]).await;

    let m = udp(addr, "example.test.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert_eq!(a_records(&m), [EXAMPLE_IP]);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);

    let m = tcp(addr, "EXAMPLE.test.", RecordType::A).await;
    assert_eq!(a_records(&m), [EXAMPLE_IP]);

    let m = udp(addr, "missing.test.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // .vm is never forwarded, even with an upstream.
    assert_eq!(
        a_records(&udp(addr, "a1.vm.", RecordType::A, true).await),
        [VM_IP]
    );

    // Too big for plain UDP: truncated there, complete over TCP (the server retries upstream
    // over TCP for a TCP client).
    let m = udp(addr, "big.test.", RecordType::A, false).await;
    assert!(m.metadata.truncation, "{m:?}");
    let m = tcp(addr, "big.test.", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(a_records(&m).len(), BIG_COUNT as usize);

    server.shutdown().await.unwrap();
    upstream.stop().await;
}

#[tokio::test]
async fn no_answering_upstream_is_servfail() {
    let records = Records::new();
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records);
    cfg.upstreams = vec![dead_upstream()];
    cfg.upstream_timeout = Duration::from_millis(300);
    let server = DnsServer::start(cfg).await.unwrap();
    let addr = server.local_addrs()[0];
    let m = udp(addr, "example.test.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn never_forwards_to_itself() {
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let own = free.local_addr().unwrap();
    drop(free);
    let mut cfg = DnsConfig::new(vec![own], Records::new());
    cfg.upstreams = vec![own];
    // Were the server to forward to itself, the answer would wait for this timeout, far beyond
    // the test client's 10 s patience.
    cfg.upstream_timeout = Duration::from_secs(120);
    let server = DnsServer::start(cfg).await.unwrap();
    let m = udp(own, "example.test.", RecordType::A, true).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn binding_errors_are_clear_and_all_or_nothing() {
    let records = Records::new();
    // 192.0.2.1 (TEST-NET-1) is on no interface here: like a bridge IP before the bridge exists.
    // Binding sends no traffic.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let first: SocketAddr = free.local_addr().unwrap();
    drop(free);
    let cfg = DnsConfig::new(
        vec![first, "192.0.2.1:5353".parse().unwrap()],
        records.clone(),
    );
    let err = DnsServer::start(cfg).await.unwrap_err();
    assert!(err.is_addr_not_available(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("192.0.2.1:5353") && msg.contains("create the bridge first"),
        "{msg}"
    );
    // Nothing stayed bound on the first address.
    std::net::UdpSocket::bind(first).expect("first address was released");

    // An address in use says so.
    let (server, addr) = start(&records, vec![dead_upstream()]).await;
    let err = DnsServer::start(DnsConfig::new(vec![addr], records.clone()))
        .await
        .unwrap_err();
    assert!(!err.is_addr_not_available());
    assert!(err.to_string().contains("already serves DNS"), "{err}");

    // After shutdown the address is free again.
    server.shutdown().await.unwrap();
    let again = DnsServer::start(DnsConfig::new(vec![addr], records))
        .await
        .unwrap();
    again.shutdown().await.unwrap();
}

#[tokio::test]
async fn serves_several_addresses_from_one_table() {
    let records = Records::new();
    records.set("b2", VM_IP);
    let cfg = DnsConfig::new(
        vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.4:0".parse().unwrap(),
        ],
        records,
    );
    let server = DnsServer::start(cfg).await.unwrap();
    assert_eq!(server.local_addrs().len(), 2);
    for addr in server.local_addrs().to_vec() {
        assert_eq!(
            a_records(&udp(addr, "b2.vm.", RecordType::A, true).await),
            [VM_IP]
        );
        assert_eq!(
            a_records(&tcp(addr, "b2.vm.", RecordType::A).await),
            [VM_IP]
        );
    }
    server.shutdown().await.unwrap();
}

fn dig(args: &[String]) -> Option<String> {
    match Command::new("dig").args(args).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "dig {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run dig: {e}"),
    }
}

#[tokio::test]
async fn real_dig_sees_the_records() {
    let records = Records::new();
    records.set("a1", VM_IP);
    let upstream = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 2)).await;
    let (server, addr) = start(&records, vec![upstream.addr]).await;
    let base = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("@{}", addr.ip()),
            "-p".into(),
            addr.port().to_string(),
            name.into(),
            "+time=5".into(),
            "+tries=1".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // dig blocks: run it off the runtime's worker threads.
    let run = |args: Vec<String>| tokio::task::spawn_blocking(move || dig(&args));

    let Some(out) = run(base("a1.vm", &["+short"])).await.unwrap() else {
        println!("skipped: `dig` is not installed (apt package dnsutils)");
        server.shutdown().await.unwrap();
        upstream.stop().await;
        return;
    };
    assert_eq!(out.trim(), VM_IP.to_string());
    let out = run(base("a1.vm", &["+short", "+tcp"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.trim(), VM_IP.to_string());
    let out = run(base("example.test", &["+short"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.trim(), EXAMPLE_IP.to_string());

    records.remove("a1");
    let out = run(base("a1.vm", &[])).await.unwrap().unwrap();
    assert!(out.contains("status: NXDOMAIN"), "{out}");

    server.shutdown().await.unwrap();
    upstream.stop().await;
}
