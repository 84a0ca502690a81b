//! A **test fake** of an upstream DNS server, and a tiny DNS client for tests.
//!
//! [`FakeUpstream`] is a small authoritative server over UDP for a fixed table of A records
//! (name, address, TTL): a known name gets its A record (NODATA for other types), any other
//! name NXDOMAIN. It stands in for the internet's resolvers behind wickd (point the daemon's
//! `upstream_dns` at it) and serves from inside a test network namespace. It is not a real
//! resolver: no recursion, no TCP, no EDNS, one question per query.
//!
//! [`query_a`] asks a server for the A records of one name from inside a namespace, so tests
//! need no `dig`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::rdata::A;
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use wick_host::net::testns::TestNetns;

/// The fake upstream (a test fake: see the module docs). Stops when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Serves `records` (name, IPv4 address, TTL in seconds) on UDP `addr` inside `ns`.
    pub fn start(ns: &TestNetns, addr: SocketAddr, records: &[(&str, Ipv4Addr, u32)]) -> Self {
        let sock = ns
            .enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("fake upstream DNS: bind {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let table: Vec<(Name, Ipv4Addr, u32)> = records
            .iter()
            .map(|(n, ip, ttl)| (fqdn(n), *ip, *ttl))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(answer) = answer(&buf[..n], &table) {
                    let _ = sock.send_to(&answer, peer);
                }
            }
        });
        FakeUpstream {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("fake upstream: {name}: {e}"));
    n.set_fqdn(true);
    n.to_lowercase()
}

/// The authoritative answer to one wire-format query; `None` for what is not a query.
fn answer(query: &[u8], table: &[(Name, Ipv4Addr, u32)]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query || q.queries.len() != 1 {
        return None;
    }
    let question = q.queries[0].clone();
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.add_query(question.clone());
    let name = question.name().to_lowercase();
    let known: Vec<_> = table.iter().filter(|(n, _, _)| *n == name).collect();
    if known.is_empty() {
        m.metadata.response_code = ResponseCode::NXDomain;
    } else if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
        for (n, ip, ttl) in known {
            m.add_answer(Record::from_rdata(n.clone(), *ttl, RData::A(A(*ip))));
        }
    }
    m.to_vec().ok()
}

/// Asks `server` (UDP) for the A records of `name` from inside `ns`: the addresses, or the
/// response code when it is not NOERROR (an I/O error or timeout panics, naming it).
pub fn query_a(
    ns: &TestNetns,
    server: SocketAddr,
    name: &str,
) -> Result<Vec<Ipv4Addr>, ResponseCode> {
    let mut q = Message::query();
    q.metadata.id = rand_id();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(fqdn(name), RecordType::A));
    let bytes = q.to_vec().expect("encode query");
    let reply = ns.enter(|| -> std::io::Result<Vec<u8>> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.connect(server)?;
        sock.send(&bytes)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf)?;
            if n >= 2 && buf[..2] == bytes[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    });
    let reply = reply.unwrap_or_else(|e| panic!("DNS query for {name} to {server}: {e}"));
    let m = Message::from_vec(&reply).unwrap_or_else(|e| panic!("DNS answer for {name}: {e}"));
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(m.metadata.response_code);
    }
    Ok(m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ std::process::id()) as u16
}
