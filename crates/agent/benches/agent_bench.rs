//! Benchmark of the agent channel on this host (no VM): the real `wick-agent` behind the fake
//! hybrid-vsock muxer, driven by the real `AgentClient`. Prints exec round-trip latency (`true`)
//! and put/get tar throughput. `WICK_BENCH_MIB` sets the transfer size (default 200).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use wick_agent_proto::ExecRequest;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("WICK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 8 } else { 200 });
    let iterations = if quick { 20 } else { 200 };

    let t = Instant::now();
    let h = support::start().await;
    let connect = t.elapsed();

    // Hello round trip.
    let mut hello = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        h.client.hello().await.unwrap();
        hello.push(t.elapsed());
    }
    hello.sort();

    // Exec round trip of `true`.
    let mut exec = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let st = h
            .client
            .exec(ExecRequest::new(["true"]))
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert!(st.success());
        exec.push(t.elapsed());
    }
    exec.sort();

    // put_tar: one file of `mib` MiB, streamed (header, data, end-of-archive).
    let size = mib * 1024 * 1024;
    let mut header = tar::Header::new_gnu();
    header.set_path("big.bin").unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    let archive = (&header.as_bytes()[..])
        .chain(tokio::io::repeat(0xa5).take(size))
        .chain(&[0u8; 1024][..]);
    let dest = h.path("put");
    let t = Instant::now();
    h.client
        .put_tar(dest.to_str().unwrap(), archive)
        .await
        .unwrap();
    let put = t.elapsed();
    assert_eq!(std::fs::metadata(dest.join("big.bin")).unwrap().len(), size);

    // get_tar of the same file.
    let t = Instant::now();
    let mut r = h
        .client
        .get_tar(dest.join("big.bin").to_str().unwrap())
        .await
        .unwrap();
    let got = tokio::io::copy(&mut r, &mut tokio::io::sink())
        .await
        .unwrap();
    let get = t.elapsed();
    assert!(got > size);

    let mibs = |d: Duration| format!("{:.0} MiB/s", mib as f64 / d.as_secs_f64());
    println!("wick-agent over the fake hybrid-vsock muxer (Unix sockets, no VM)");
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "measure", "p50", "p90", "max"
    );
    println!(
        "{:<34} {:>12}",
        "connect (spawn + retries + hello)",
        ms(connect)
    );
    for (name, v) in [
        ("hello round trip", &hello),
        ("exec `true` round trip", &exec),
    ] {
        println!(
            "{:<34} {:>12} {:>12} {:>12}",
            format!("{name} (n={})", v.len()),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.9)),
            ms(*v.last().unwrap())
        );
    }
    println!(
        "{:<34} {:>12} ({:.2} s)",
        format!("put_tar {mib} MiB"),
        mibs(put),
        put.as_secs_f64()
    );
    println!(
        "{:<34} {:>12} ({:.2} s)",
        format!("get_tar {mib} MiB"),
        mibs(get),
        get.as_secs_f64()
    );
}
