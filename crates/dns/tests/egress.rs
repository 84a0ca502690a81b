//! The resolver's egress allowlist on loopback: a restricted source (127.0.0.1) gets NXDOMAIN
//! outside its patterns, allowed answers are opened through the sink before the client sees
//! them (once per half TTL, SERVFAIL when the sink fails), and other sources (127.0.0.2) are
//! not affected. The upstream is the fake of `common`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};
use wick_dns::{parse_allow_hosts, DnsConfig, DnsServer, Egress, EgressSink, Records};

use common::{a_records, FakeUpstream, BIG_COUNT, EXAMPLE_IP};

const GUEST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// One call of the sink: the VM key and the addresses (with TTLs) to open.
type Call = (String, Vec<(Ipv4Addr, u32)>);

/// A sink that records what it was asked to open (a test fake), or fails when told to.
#[derive(Default)]
struct RecordingSink {
    calls: Mutex<Vec<Call>>,
    flushed: Mutex<Vec<String>>,
    fail: AtomicBool,
}

#[async_trait::async_trait]
impl EgressSink for RecordingSink {
    async fn allow(&self, key: &str, addrs: Vec<(Ipv4Addr, u32)>) -> Result<(), String> {
        if self.fail.load(Ordering::Relaxed) {
            return Err("firewall refused".into());
        }
        self.calls.lock().unwrap().push((key.to_string(), addrs));
        Ok(())
    }

    async fn flush(&self, key: &str) -> Result<(), String> {
        self.flushed.lock().unwrap().push(key.to_string());
        Ok(())
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

async fn query(from: Ipv4Addr, server: SocketAddr, name: &str) -> Message {
    let mut q = Message::query();
    q.metadata.id = rand::random();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind((from, 0)).await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("UDP answer within 10 s")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

#[tokio::test]
async fn allowlisted_source_resolves_only_its_names_and_opens_their_addresses() {
    let up = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 4)).await;
    let sink = Arc::new(RecordingSink::default());
    let egress = Egress::new(sink.clone());
    egress.set(
        IpAddr::V4(GUEST),
        "0123456789ab",
        parse_allow_hosts(&["example.test"]).unwrap(),
    );
    let records = Records::new();
    records.set("a1", Ipv4Addr::new(172, 30, 0, 2));
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records);
    cfg.upstreams = vec![up.addr];
    cfg.egress = egress.clone();
    let server = DnsServer::start(cfg).await.unwrap();
    let addr = server.local_addrs()[0];

    // Allowed: forwarded, and opened (for twice its TTL) before the answer arrived.
    let m = query(GUEST, addr, "EXAMPLE.test.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&m), [EXAMPLE_IP]);
    assert_eq!(
        sink.take(),
        [("0123456789ab".to_string(), vec![(EXAMPLE_IP, 120)])]
    );
    // Asked again while the opening still covers a new TTL: answered, not re-opened.
    let m = query(GUEST, addr, "example.test.").await;
    assert_eq!(a_records(&m), [EXAMPLE_IP]);
    assert!(sink.take().is_empty());

    // Not allowed: NXDOMAIN, nothing opened; `.vm` names still answer.
    let m = query(GUEST, addr, "big.test.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert!(sink.take().is_empty());
    let m = query(GUEST, addr, "a1.vm.").await;
    assert_eq!(a_records(&m), [Ipv4Addr::new(172, 30, 0, 2)]);

    // Another source is not restricted and opens nothing.
    // (Without EDNS the upstream's UDP answer is truncated to what fits in 512 bytes.)
    let m = query(OTHER, addr, "big.test.").await;
    assert!(!a_records(&m).is_empty());
    assert!(sink.take().is_empty());

    // A wider list (live): every address of the answer the client gets is opened at once.
    egress.set(
        IpAddr::V4(GUEST),
        "0123456789ab",
        parse_allow_hosts(&["example.test", "*.test"]).unwrap(),
    );
    let m = query(GUEST, addr, "big.test.").await;
    let got = a_records(&m);
    assert!(!got.is_empty() && got.len() <= BIG_COUNT as usize);
    let calls = sink.take();
    assert_eq!(calls.len(), 1);
    let opened: Vec<Ipv4Addr> = calls[0].1.iter().map(|(ip, _)| *ip).collect();
    assert_eq!(opened, got);

    // Shrinking the list live flushes the client's addresses (growing it did not).
    assert!(sink.flushed.lock().unwrap().is_empty());
    egress
        .replace(
            IpAddr::V4(GUEST),
            "0123456789ab",
            parse_allow_hosts(&["example.test"]).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(*sink.flushed.lock().unwrap(), ["0123456789ab"]);
    let m = query(GUEST, addr, "big.test.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // When the firewall cannot be opened the client gets SERVFAIL, not an unusable answer; the
    // address is not remembered as open.
    sink.fail.store(true, Ordering::Relaxed);
    let m = query(GUEST, addr, "example.test.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    sink.fail.store(false, Ordering::Relaxed);
    let m = query(GUEST, addr, "example.test.").await;
    assert_eq!(a_records(&m), [EXAMPLE_IP]);
    assert_eq!(sink.take().len(), 1);

    // Lifted: forwarded as for anyone, nothing opened.
    egress.remove(IpAddr::V4(GUEST));
    let m = query(GUEST, addr, "big.test.").await;
    assert!(!a_records(&m).is_empty());
    assert!(sink.take().is_empty());

    server.shutdown().await.unwrap();
    up.stop().await;
}
