//! Query latency of the embedded DNS server on loopback, printed as a table:
//! `.vm` answers over UDP and TCP (a new connection per query, as most stub resolvers do), and
//! names forwarded to a fake upstream on 127.0.0.2, and the same for a client restricted by an
//! egress allowlist (a second server whose sink opens nothing: it measures the resolver's own
//! cost, not nft's). Run: `cargo bench -p wick-dns`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::proto::rr::RecordType;
use wick_dns::{parse_allow_hosts, DnsConfig, DnsServer, Egress, EgressSink, Records};

/// A sink that opens nothing (the bench measures the resolver, not the firewall).
struct NoopSink;

#[async_trait::async_trait]
impl EgressSink for NoopSink {
    async fn allow(&self, _key: &str, _addrs: Vec<(Ipv4Addr, u32)>) -> Result<(), String> {
        Ok(())
    }

    async fn flush(&self, _key: &str) -> Result<(), String> {
        Ok(())
    }
}

const N: usize = 2000;

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{label:<34} {:>6} {:>9.1} {:>9.1} {:>9.1}",
        samples.len(),
        mean.as_secs_f64() * 1e6,
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
    );
}

async fn measure<F, Fut>(n: usize, f: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..50 {
        f().await;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let upstream = common::FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 2)).await;
    let records = Records::new();
    for i in 0..200u8 {
        records.set(
            &format!("vm{i}"),
            Ipv4Addr::new(172, 30, 0, i.wrapping_add(2)),
        );
    }
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], records);
    cfg.upstreams = vec![upstream.addr];
    let server = DnsServer::start(cfg).await.unwrap();
    let addr: SocketAddr = server.local_addrs()[0];

    println!(
        "{:<34} {:>6} {:>9} {:>9} {:>9}",
        "query (loopback)", "n", "mean µs", "p50 µs", "p99 µs"
    );
    let s = measure(N, || async {
        common::udp(addr, "vm7.vm.", RecordType::A, true).await;
    })
    .await;
    summary(".vm A over UDP", s);
    let s = measure(N, || async {
        common::tcp(addr, "vm7.vm.", RecordType::A).await;
    })
    .await;
    summary(".vm A over TCP (new connection)", s);
    let s = measure(N, || async {
        common::udp(addr, "example.test.", RecordType::A, true).await;
    })
    .await;
    summary("forwarded A over UDP", s);
    let s = measure(N / 4, || async {
        common::tcp(addr, "big.test.", RecordType::A).await;
    })
    .await;
    summary("forwarded, truncated, TCP retry", s);

    // The same client (127.0.0.1) restricted to `example.test` on a second server.
    let egress = Egress::new(Arc::new(NoopSink));
    egress.set(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "0123456789ab",
        parse_allow_hosts(&["example.test"]).unwrap(),
    );
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], Records::new());
    cfg.upstreams = vec![upstream.addr];
    cfg.egress = egress;
    let restricted = DnsServer::start(cfg).await.unwrap();
    let raddr: SocketAddr = restricted.local_addrs()[0];
    let s = measure(N, || async {
        common::udp(raddr, "example.test.", RecordType::A, true).await;
    })
    .await;
    summary("allowlisted, forwarded A over UDP", s);
    let s = measure(N, || async {
        common::udp(raddr, "big.test.", RecordType::A, true).await;
    })
    .await;
    summary("allowlisted, refused (NXDOMAIN)", s);
    restricted.shutdown().await.unwrap();

    server.shutdown().await.unwrap();
    upstream.stop().await;
}
