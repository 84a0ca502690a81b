//! Benchmark of workspace prepare on this host (no VM): the real `wick-agent` behind the fake
//! hybrid-vsock muxer. Generates two repositories of 10,000 files / 200 MiB (`WICK_BENCH_FILES`,
//! `WICK_BENCH_MIB` override): source-like text (compresses like code) and incompressible bytes
//! (the worst case for the history pack, which then doubles the bytes sent). For each it prints
//! prepare time and throughput next to a raw tar stream of the same files through `put_tar` over
//! the same channel, and the time of re-prepares. `WICK_BENCH_STAGES=1` prints prepare's stages.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wick_workspace::{inspect, prepare, PrepareOptions, PrepareReport};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: fast incompressible bytes.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        let v = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Fills `buf` with source-like text (identifiers, numbers, punctuation): compresses about 3-4×
/// like real code.
fn fill_text(buf: &mut [u8], seed: &mut u64) {
    const WORDS: &[&str] = &[
        "let", "fn", "return", "match", "self", "value", "result", "error", "config", "buffer",
        "index", "count", "for", "in", "if", "else", "struct", "impl", "pub", "use", "async",
        "await", "Some", "None", "Ok", "Err", "string", "vector", "map", "iter", "collect",
    ];
    let mut line = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        line.clear();
        let mut r = [0u8; 8];
        fill(&mut r, seed);
        let indent = (r[0] % 4) as usize * 4;
        line.extend(std::iter::repeat_n(b' ', indent));
        for k in 1..(3 + r[1] % 6) as usize {
            line.extend_from_slice(WORDS[(r[k % 8] as usize) % WORDS.len()].as_bytes());
            line.push(if k % 3 == 0 { b'_' } else { b' ' });
        }
        line.extend_from_slice(format!("{};\n", u16::from_le_bytes([r[6], r[7]])).as_bytes());
        let n = line.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&line[..n]);
        i += n;
    }
}

fn generate(repo: &Path, files: u64, total: u64, text: bool) -> Vec<PathBuf> {
    std::fs::create_dir_all(repo).unwrap();
    support::git(repo, &["init", "-q"]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let avg = total / files;
    let mut paths = Vec::new();
    let mut buf = vec![0u8; (avg * 2) as usize];
    for i in 0..files {
        // Sizes between 0.5× and 1.5× the average, summing to about `total`.
        let size = (avg / 2 + (i * 7919) % avg.max(1)) as usize;
        if text {
            fill_text(&mut buf[..size], &mut seed);
        } else {
            fill(&mut buf[..size], &mut seed);
        }
        let rel = PathBuf::from(format!(
            "src/m{:02}/d{:02}/file{i}.dat",
            i % 50,
            (i / 50) % 20
        ));
        support::write(&repo.join(&rel), &buf[..size]);
        paths.push(rel);
    }
    support::git(repo, &["add", "-A"]);
    support::git(repo, &["commit", "-qm", "generated"]);
    // A cloned repository's objects are packed: prepare then reuses them as they are.
    support::git(repo, &["repack", "-adq"]);
    paths
}

/// The raw baseline: a tar of `paths` streamed by a blocking thread through a socket pair into
/// `put_tar`, exactly like prepare's files but without git.
async fn raw_put(h: &support::Harness, repo: &Path, paths: &[PathBuf], dest: &Path) -> Duration {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (repo, paths) = (repo.to_path_buf(), paths.to_vec());
    let t = Instant::now();
    let job = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, a);
        let mut tb = tar::Builder::new(&mut w);
        tb.follow_symlinks(false);
        for p in &paths {
            tb.append_path_with_name(repo.join(p), p).unwrap();
        }
        tb.finish().unwrap();
        drop(tb);
        w.flush().unwrap();
    });
    b.set_nonblocking(true).unwrap();
    let r = tokio::net::UnixStream::from_std(b).unwrap();
    h.client.put_tar(dest.to_str().unwrap(), r).await.unwrap();
    let d = t.elapsed();
    job.join().unwrap();
    d
}

fn row(name: &str, d: Duration, mib: f64, raw: Option<Duration>) {
    let ratio = raw
        .map(|r| format!("{:.2}×", d.as_secs_f64() / r.as_secs_f64()))
        .unwrap_or_default();
    let tp = if mib > 0.0 {
        format!("{:.0} MiB/s", mib / d.as_secs_f64())
    } else {
        String::new()
    };
    println!("{name:<50} {:>8.3} s {tp:>12} {ratio:>8}", d.as_secs_f64());
}

fn detail(r: &PrepareReport) -> String {
    format!(
        "sent {} files / {:.1} MiB, {} objects / {:.1} MiB pack, {} unchanged, {} deleted",
        r.files_sent,
        r.file_bytes as f64 / 1048576.0,
        r.objects_sent,
        r.pack_bytes as f64 / 1048576.0,
        r.files_unchanged,
        r.files_deleted
    )
}

struct Results {
    label: &'static str,
    mib: f64,
    raw: Duration,
    fresh: Duration,
    fresh_report: PrepareReport,
    same: Duration,
    same_report: PrepareReport,
    one: Duration,
    one_report: PrepareReport,
}

async fn run(
    h: &support::Harness,
    label: &'static str,
    files: u64,
    mib: u64,
    text: bool,
) -> Results {
    let repo = h.path(label);
    let t = Instant::now();
    let paths = generate(&repo, files, mib * 1024 * 1024, text);
    let total: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(repo.join(p)).unwrap().len())
        .sum();
    eprintln!(
        "{label}: generated {files} files / {:.0} MiB in {:.1} s",
        total as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let opts = PrepareOptions::default();
    let guest = h.path(&format!("{label}-guest"));
    let gp = guest.to_str().unwrap().to_string();
    let stages = std::env::var_os("WICK_BENCH_STAGES").is_some();
    // Interleaved rounds, best of each: this host is shared and noisy.
    let (mut raw, mut fresh) = (Duration::MAX, Duration::MAX);
    let mut fresh_report = None;
    for round in 0..2 {
        let dest = h.path(&format!("{label}-raw"));
        raw = raw.min(raw_put(h, &repo, &paths, &dest).await);
        std::fs::remove_dir_all(&dest).unwrap();
        if round == 1 {
            std::fs::remove_dir_all(&guest).unwrap();
        }
        let t = Instant::now();
        let plan = inspect(&repo, &opts).unwrap();
        let r = prepare(&h.client, &plan, &gp, |s| {
            if stages {
                eprintln!("{:>8.3} s  {s}", t.elapsed().as_secs_f64())
            }
        })
        .await
        .unwrap();
        fresh = fresh.min(t.elapsed());
        fresh_report = Some(r);
    }

    let t = Instant::now();
    let plan = inspect(&repo, &opts).unwrap();
    let same_report = prepare(&h.client, &plan, &gp, |_| {}).await.unwrap();
    let same = t.elapsed();

    let changed = repo.join(&paths[paths.len() / 2]);
    let mut data = std::fs::read(&changed).unwrap();
    data.extend_from_slice(b"one more line\n");
    std::fs::write(&changed, &data).unwrap();
    let t = Instant::now();
    let plan = inspect(&repo, &opts).unwrap();
    let one_report = prepare(&h.client, &plan, &gp, |_| {}).await.unwrap();
    let one = t.elapsed();
    assert_eq!(one_report.files_sent, 1);
    std::fs::remove_dir_all(&guest).unwrap();
    std::fs::remove_dir_all(&repo).unwrap();
    Results {
        label,
        mib: total as f64 / 1048576.0,
        raw,
        fresh,
        fresh_report: fresh_report.unwrap(),
        same,
        same_report,
        one,
        one_report,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let files = env_num("WICK_BENCH_FILES", if quick { 200 } else { 10_000 });
    let mib = env_num("WICK_BENCH_MIB", if quick { 4 } else { 200 });

    let h = support::Harness::start().await;
    let results = [
        run(&h, "text", files, mib, true).await,
        run(&h, "random", files, mib, false).await,
    ];

    println!(
        "\nwick-workspace prepare over wick-agent + fake hybrid-vsock muxer (no VM), {files} files, \
         host objects packed; best of 2 interleaved rounds for raw and fresh"
    );
    println!(
        "{:<50} {:>10} {:>12} {:>8}",
        "measure", "time", "throughput", "vs raw"
    );
    for r in &results {
        let name = |what: &str| format!("[{} {:.0} MiB] {what}", r.label, r.mib);
        row(
            &name("raw tar of the same files via put_tar"),
            r.raw,
            r.mib,
            None,
        );
        row(
            &name("prepare, fresh (incl. inspect)"),
            r.fresh,
            r.mib,
            Some(r.raw),
        );
        row(&name("re-prepare, nothing changed"), r.same, 0.0, None);
        row(&name("re-prepare, one file changed"), r.one, 0.0, None);
    }
    println!();
    for r in &results {
        println!("[{}] fresh:       {}", r.label, detail(&r.fresh_report));
        println!("[{}] unchanged:   {}", r.label, detail(&r.same_report));
        println!("[{}] one changed: {}", r.label, detail(&r.one_report));
    }
}
