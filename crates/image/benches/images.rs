//! Benchmark: golden build time (debootstrap with a warm package cache, configure, work-seed,
//! ext4, hash) and OCI pull+convert time for the test image, against a real docker-registry on
//! loopback. Prints a table; needs root, debootstrap, docker-registry and e2fsprogs (rows whose
//! tools are missing print the reason instead).
//!
//! `cargo bench -p wick-image --bench images`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use wick_image::oci::{pull, PullOptions};
use wick_image::{testcache, ImageStore};

/// Times each stage reported through a progress callback.
struct Stages {
    last: Instant,
    current: String,
    spans: Vec<(String, Duration)>,
}

impl Stages {
    fn new() -> Stages {
        Stages {
            last: Instant::now(),
            current: "start".into(),
            spans: Vec::new(),
        }
    }
    fn on(&mut self, stage: &str) {
        let group = match stage {
            s if s.starts_with("layer ") => "download",
            s if s.starts_with("applying layer") => "apply layers",
            s if s.starts_with("resolving") => "resolve",
            s => s.split(':').next().unwrap_or(s),
        };
        if group != self.current {
            self.close();
            self.current = group.to_string();
        }
    }
    fn close(&mut self) {
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        match self.spans.iter_mut().find(|(n, _)| *n == self.current) {
            Some((_, t)) => *t += d,
            None => self.spans.push((self.current.clone(), d)),
        }
    }
}

fn row(what: &str, d: Duration, note: &str) {
    println!("{what:<58} {:>9.3} s  {note}", d.as_secs_f64());
}

fn main() {
    println!("{:<58} {:>11}", "wick-image benchmark", "time");
    bench_oci();
    bench_golden();
}

fn bench_oci() {
    if let Some(r) = missing_prereq(&["docker-registry", "mkfs.ext4"]) {
        println!("OCI pull+convert: skipped ({r})");
        return;
    }
    let reg = Registry::start();
    let client = reg.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let small = format!("{}/bench/test:v1", reg.addr);
    rt.block_on(push(&client, &small, &test_image_layers(), "amd64"));
    // A bigger image: 2,000 files of 32 KiB (64 MiB) in one layer, plus the test layers.
    let blob: Vec<u8> = (0..32 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let names: Vec<String> = (0..2000)
        .map(|i| format!("data/d{}/f{i}", i % 40))
        .collect();
    let entries: Vec<E> = names
        .iter()
        .map(|n| E::File(n, &blob, 0o644, 0, 0))
        .collect();
    let mut layers = vec![tar_layer(&entries)];
    layers.extend(test_image_layers());
    let big = format!("{}/bench/big:v1", reg.addr);
    rt.block_on(push(&client, &big, &layers, "amd64"));

    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let opts = PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let small_opts = PullOptions {
        headroom_mib: Some(16),
        ..opts.clone()
    };
    for (label, reference, name, o) in [
        (
            "OCI pull+convert, test image, 16 MiB free, cold",
            &small,
            "s1",
            &small_opts,
        ),
        (
            "OCI pull+convert, test image, 16 MiB free, cached layers",
            &small,
            "s2",
            &small_opts,
        ),
        (
            "OCI pull+convert, test image, default 1 GiB free",
            &small,
            "s3",
            &opts,
        ),
        (
            "OCI pull+convert, 64 MiB/2,000-file image, 1 GiB free",
            &big,
            "b1",
            &opts,
        ),
    ] {
        let mut st = Stages::new();
        let t = Instant::now();
        let rec = pull(&store, reference, name, o, &mut |s| st.on(s)).unwrap();
        let d = t.elapsed();
        st.close();
        let detail: Vec<String> = st
            .spans
            .iter()
            .filter(|(n, _)| n != "start" && n != "done")
            .map(|(n, t)| format!("{n} {:.2}", t.as_secs_f64()))
            .collect();
        row(
            label,
            d,
            &format!("[{} MiB ext4] {}", rec.size >> 20, detail.join(", ")),
        );
    }
}

fn bench_golden() {
    if let Some(r) = testcache::golden_unavailable() {
        println!("golden build: skipped ({r})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = fake_agent(tmp.path());
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let mut opts = testcache::test_golden_options(Some(&agent));
    opts.headroom_mib = None; // production default: 1 GiB free
    let mut st = Stages::new();
    let t = Instant::now();
    let rec = store.build_golden(&opts, &mut |s| st.on(s)).unwrap();
    let d = t.elapsed();
    st.close();
    row(
        "golden build (debootstrap, warm .deb cache, 1 GiB free)",
        d,
        &format!("[{} MiB ext4]", rec.size >> 20),
    );
    for (n, t) in st.spans.iter().filter(|(n, _)| n != "start" && n != "done") {
        row(&format!("  {n}"), *t, "");
    }
}
