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
        wick_testkit::skip(format_args!(
            "`dig` is not installed (apt package dnsutils)"
        ));
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

/// UDP sockets of this process's network namespace connected to `to` (per `/proc/net/udp`).
fn udp_sockets_to(to: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 only")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some(want.as_str()))
        .count()
}

/// One UDP query from a socket bound to `from`.
async fn udp_from(
    from: Ipv4Addr,
    server: SocketAddr,
    name: &str,
) -> hickory_server::proto::op::Message {
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::Name;
    let mut q = Message::query();
    q.metadata.id = 4242;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind((from, 0)).await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("UDP answer within 10 s")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

#[tokio::test]
async fn a_query_flood_from_one_source_is_capped_and_others_are_still_served() {
    // An upstream that never answers (nobody reads this socket), then a working one.
    let blackhole = std::net::UdpSocket::bind("127.0.0.4:0").unwrap();
    let hole = blackhole.local_addr().unwrap();
    let upstream = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 2)).await;
    let records = Records::new();
    records.set("a1", VM_IP);
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records);
    cfg.upstreams = vec![hole, upstream.addr];
    cfg.upstream_timeout = Duration::from_secs(1);
    cfg.limits.max_in_flight_per_source = 8;
    cfg.limits.max_in_flight = 64;
    let server = DnsServer::start(cfg).await.unwrap();
    let addr = server.local_addrs()[0];

    // 400 distinct queries from 127.0.0.1 as fast as possible.
    const FLOOD: u16 = 400;
    let flooder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..FLOOD {
        let mut q = hickory_server::proto::op::Message::query();
        q.metadata.id = i;
        q.add_query(hickory_server::proto::op::Query::query(
            hickory_server::proto::rr::Name::from_ascii(format!("f{i}.test.")).unwrap(),
            RecordType::A,
        ));
        flooder.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
    }
    // While the flood waits on the blackhole: bounded sockets, .vm and other sources served.
    let mut peak = 0;
    let watch = async {
        for _ in 0..40 {
            peak = peak.max(udp_sockets_to(hole));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (vm, other, ()) = tokio::join!(
        udp(addr, "a1.vm.", RecordType::A, true),
        udp_from(Ipv4Addr::new(127, 0, 0, 5), addr, "example.test."),
        watch
    );
    assert_eq!(a_records(&vm), [VM_IP], "{vm:?}");
    assert_eq!(
        other.metadata.response_code,
        ResponseCode::NoError,
        "{other:?}"
    );
    assert_eq!(a_records(&other), [EXAMPLE_IP]);
    assert!(peak >= 1, "the flood reached the blackholed upstream");
    assert!(
        peak <= 8 + 1,
        "{peak} sockets to the blackholed upstream (cap 8 per source, +1 for the other source)"
    );

    // The excess was refused at once (the kernel may drop some of a burst this size, so count
    // what came back: REFUSED, or forwarded within the cap).
    let (mut refused, mut forwarded) = (0, 0);
    let mut buf = vec![0u8; 65535];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(1500), flooder.recv_from(&mut buf)).await
    {
        let m = hickory_server::proto::op::Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.response_code == ResponseCode::Refused {
            refused += 1;
        } else {
            forwarded += 1;
        }
    }
    assert!(refused >= 100, "only {refused} REFUSED");
    // 8 slots, each busy ~1 s per query on the blackhole: a few rounds at most.
    assert!(forwarded <= 8 * 4, "{forwarded} flood queries forwarded");
    eprintln!(
        "flood of {FLOOD}: peak {peak} upstream sockets, {refused} REFUSED, {forwarded} forwarded"
    );
    server.shutdown().await.unwrap();
    upstream.stop().await;
}

#[tokio::test]
async fn tcp_connections_are_capped_per_source_and_idle_ones_closed() {
    use tokio::io::AsyncReadExt;
    let records = Records::new();
    records.set("a1", VM_IP);
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records);
    cfg.upstreams = vec![dead_upstream()];
    cfg.limits.max_tcp_per_source = 4;
    cfg.limits.tcp_idle = Duration::from_secs(2);
    let server = DnsServer::start(cfg).await.unwrap();
    let addr = server.local_addrs()[0];

    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Closed right away: everything beyond the first 4 of this source.
    let tasks: Vec<_> = conns
        .drain(..)
        .map(|mut c| {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let r = tokio::time::timeout(Duration::from_millis(1000), c.read(&mut b)).await;
                (c, r.map(|r| r.map_err(|e| e.kind())))
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        let (c, r) = t.await.unwrap();
        conns.push(c);
        results.push(r);
    }
    let closed = results
        .iter()
        .filter(|r| matches!(r, Ok(Ok(0)) | Ok(Err(_))))
        .count();
    let open = results.iter().filter(|r| r.is_err()).count();
    assert_eq!((closed, open), (6, 4), "{results:?}");

    // Another source still gets TCP answers meanwhile.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let m = tcp_query_on(&mut s, "a1.vm.").await;
    assert_eq!(a_records(&m), [VM_IP]);

    // The idle ones are closed after tcp_idle.
    for c in conns.iter_mut() {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "idle connection still open: {r:?}"
        );
    }
    server.shutdown().await.unwrap();
}

async fn tcp_query_on(
    s: &mut tokio::net::TcpStream,
    name: &str,
) -> hickory_server::proto::op::Message {
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::Name;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut q = Message::query();
    q.metadata.id = 99;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = q.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let len = s.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}
