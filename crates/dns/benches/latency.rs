//! Query latency of the embedded DNS server on loopback, printed as a table:
//! `.vm` answers over UDP and TCP (a new connection per query, as most stub resolvers do), and
//! names forwarded to a fake upstream on 127.0.0.2. Run: `cargo bench -p wick-dns`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_server::proto::rr::RecordType;
use wick_dns::{DnsConfig, DnsServer, Records};

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

    server.shutdown().await.unwrap();
    upstream.stop().await;
}
