//! Benchmark of wick's own overhead with the fake Firecracker (prints a table; asserts nothing).
//!
//! `cargo bench -p wick-daemon --bench lifecycle` (as root); `WICK_BENCH_CONFIG` is appended to
//! the daemon's config (e.g. `contain_vmm = false` to measure what VMM containment costs).
//! Measures:
//! - create→running through the API (daemon-side op time and client wall time), p50/p95;
//! - the same through the `wick` CLI process;
//! - `GET /v1/vms` and `wick vm list --json` with 1,000 VMs;
//! - wickd RSS idle, and after 1,000 VMs.

use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::wickd::{http, WickdEnv};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Per-stage durations of the creates measured so far: (stage, ms).
static STAGES: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

/// Creates a VM through the API and follows its events; returns (wall, daemon-side op time).
fn api_create(env: &WickdEnv, body: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let (st, text) = http(&env.socket(), "POST", "/v1/vms", Some(body.as_bytes()));
    assert_eq!(st, 202, "{text}");
    let op: Value = serde_json::from_str(&text).unwrap();
    let id = op["id"].as_str().unwrap();
    let (_, events) = http(
        &env.socket(),
        "GET",
        &format!("/v1/operations/{id}/events"),
        None,
    );
    let wall = t.elapsed();
    let evs: Vec<Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.is_object())
        .collect();
    let mut stages = STAGES.lock().unwrap();
    for w in evs.windows(2) {
        let d = w[1]["elapsed_ms"].as_u64().unwrap() - w[0]["elapsed_ms"].as_u64().unwrap();
        stages.push((w[0]["stage"].as_str().unwrap_or("?").to_string(), d));
    }
    drop(stages);
    let last = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v.is_object())
        .unwrap_or_else(|| panic!("no events: {events}"));
    assert_eq!(last["state"], "succeeded", "{last}");
    (
        wall,
        Duration::from_millis(last["elapsed_ms"].as_u64().unwrap()),
    )
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benchmark skipped: wickd needs root");
        return;
    }
    let extra = std::env::var("WICK_BENCH_CONFIG").unwrap_or_default();
    let mut env = WickdEnv::new(&extra);
    env.start();
    let pid = env.daemon.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_kib(pid);

    // create → running, API
    let n = 40;
    let (mut wall, mut op) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (w, o) = api_create(&env, "{}");
        wall.push(w);
        op.push(o);
    }
    let stage_rows: Vec<(String, u64)> = std::mem::take(&mut *STAGES.lock().unwrap());
    // create → running, CLI
    let mut cli = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        env.wick_ok(&["vm", "create"]);
        cli.push(t.elapsed());
    }
    // stop them so 1,000 more don't need 1,000 VMM processes
    for v in env.wick_json(&["vm", "list"])["vms"].as_array().unwrap() {
        env.wick_ok(&["vm", "kill", v["name"].as_str().unwrap()]);
    }
    let running_rss = rss_kib(pid);

    // 1,000 VMs, list
    let have = env.wick_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .len();
    for _ in have..1000 {
        api_create(&env, r#"{"no_start": true, "disk_size": "256M"}"#);
    }
    let mut api_list = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (st, body) = http(&env.socket(), "GET", "/v1/vms", None);
        api_list.push(t.elapsed());
        assert_eq!(st, 200);
        assert!(body.len() > 1000);
    }
    let mut cli_list = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let out = env.wick(&["vm", "list", "--json"]);
        cli_list.push(t.elapsed());
        assert!(out.status.success());
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_1000 = rss_kib(pid);

    println!(
        "wick lifecycle benchmark (fake Firecracker, debug={}, extra config {extra:?})",
        cfg!(debug_assertions)
    );
    println!(
        "{:<46} {:>12} {:>12} {:>10}",
        "measure", "p50", "p95", "target"
    );
    let row = |name: &str, v: &mut Vec<Duration>, target: &str| {
        println!(
            "{:<46} {:>12} {:>12} {:>10}",
            name,
            ms(pct(v, 0.5)),
            ms(pct(v, 0.95)),
            target
        );
    };
    row("create→running, daemon op time (API)", &mut op, "≤ 50 ms");
    row("create→running, client wall (API)", &mut wall, "");
    row("create→running, `wick vm create` process", &mut cli, "");
    row("GET /v1/vms with 1,000 VMs", &mut api_list, "");
    row(
        "`wick vm list --json` with 1,000 VMs",
        &mut cli_list,
        "≤ 100 ms",
    );
    let mut names: Vec<String> = Vec::new();
    for (n, _) in &stage_rows {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    for n in names {
        let mut v: Vec<Duration> = stage_rows
            .iter()
            .filter(|(s, _)| *s == n)
            .map(|(_, ms)| Duration::from_millis(*ms))
            .collect();
        row(&format!("  create stage: {n}"), &mut v, "");
    }
    println!(
        "{:<46} {:>12}",
        "wickd RSS idle",
        format!("{:.1} MiB", idle_rss as f64 / 1024.0)
    );
    println!(
        "{:<46} {:>12}",
        "wickd RSS after 60 VMs ran",
        format!("{:.1} MiB", running_rss as f64 / 1024.0)
    );
    println!(
        "{:<46} {:>12} {:>23}",
        "wickd RSS with 1,000 VMs",
        format!("{:.1} MiB", rss_1000 as f64 / 1024.0),
        "idle ≤ 30 MiB"
    );
}
