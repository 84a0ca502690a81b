//! Issue 11's numbers in one run on real guests (QEMU TCG on this host; prints tables,
//! asserts only that each step succeeded): pause and resume latency; snapshot time and size of
//! a running 1 GiB guest; restore (`create --from-snapshot`) → agent answering and → running
//! (configured with its new identity), against a cold create of the same guest; fork of 3;
//! suspend and the start that restores it; and the host memory (VmRSS of each VM's VMM and
//! sidecar) of 3 forks against 3 cold-booted VMs, side by side.
//!
//! `cargo bench -p wick-daemon --bench restore` as root; skipped (with the reason) where QEMU
//! or the golden image's prerequisites are missing.

use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::{http, WickdEnv};

const RUNS: usize = 5;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// `POST /v1/vms` with `body` and its events until the end; panics unless it succeeded.
/// Returns the wall time and the time until the stage after "wait for agent" began (the agent
/// answered).
fn create(env: &WickdEnv, body: &str) -> (Duration, Option<Duration>) {
    let t = Instant::now();
    let (st, text) = http(&env.socket(), "POST", "/v1/vms", Some(body.as_bytes()));
    assert_eq!(st, 202, "{text}");
    let op: Value = serde_json::from_str(&text).unwrap();
    let (_, events) = http(
        &env.socket(),
        "GET",
        &format!("/v1/operations/{}/events", op["id"].as_str().unwrap()),
        None,
    );
    let wall = t.elapsed();
    let evs: Vec<Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.is_object())
        .collect();
    assert_eq!(evs.last().unwrap()["state"], "succeeded", "{events}");
    let agent = evs
        .windows(2)
        .find(|w| w[0]["stage"] == "wait for agent")
        .and_then(|w| w[1]["elapsed_ms"].as_u64())
        .map(Duration::from_millis);
    (wall, agent)
}

/// Resident memory (KiB) of the VM's VMM and sidecars.
fn vm_rss_kib(env: &WickdEnv, name: &str) -> u64 {
    let vm: Value = env.wick_json(&["vm", "show", name]);
    let h = &vm["runtime"]["vmm"];
    let mut pids: Vec<u64> = h["pid"].as_u64().into_iter().collect();
    if let Some(cars) = h["sidecars"].as_array() {
        pids.extend(cars.iter().filter_map(|c| c["pid"].as_u64()));
    }
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

fn timed(env: &WickdEnv, args: &[&str]) -> Duration {
    let t = Instant::now();
    env.wick_ok(args);
    t.elapsed()
}

struct Results {
    pause: Vec<Duration>,
    resume: Vec<Duration>,
    snapshot: Vec<Duration>,
    snapshot_mib: u64,
    cold: Vec<Duration>,
    cold_agent: Vec<Duration>,
    restore: Vec<Duration>,
    restore_agent: Vec<Duration>,
    fork3: Vec<Duration>,
    suspend: Vec<Duration>,
    wake: Vec<Duration>,
    rss_forks_mib: u64,
    rss_cold_mib: u64,
}

/// Starts the counter the forks carry, so their memory is a busy guest's, not an idle one's.
fn busy_source(env: &WickdEnv) {
    let body = r#"{"name": "src", "memory": "1G", "disk_size": "2G"}"#;
    create(env, body);
    env.wick_ok(&[
        "vm",
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "setsid sh -c 'i=0; while :; do echo $i > /root/c; i=$((i+1)); sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 &",
    ]);
}

fn measure(env: &WickdEnv) -> Results {
    busy_source(env);
    let (mut pause, mut resume, mut snapshot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        pause.push(timed(env, &["vm", "pause", "src"]));
        resume.push(timed(env, &["vm", "resume", "src"]));
    }
    let mut snapshot_mib = 0;
    for i in 0..RUNS {
        let name = format!("snap-{i}");
        snapshot.push(timed(env, &["vm", "snapshot", "src", "--name", &name]));
        let s = env.wick_json(&["snapshot", "show", &name]);
        snapshot_mib = s["size_bytes"].as_u64().unwrap_or(0) >> 20;
        if i > 0 {
            env.wick_ok(&["snapshot", "delete", &name]);
        }
    }
    let (mut restore, mut restore_agent, mut cold, mut cold_agent) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let body = format!(r#"{{"name": "r{i}", "from_snapshot": "snap-0"}}"#);
        let (wall, agent) = create(env, &body);
        restore.push(wall);
        restore_agent.extend(agent);
        env.wick_ok(&["vm", "delete", &format!("r{i}")]);
        let body = format!(r#"{{"name": "c{i}", "memory": "1G", "disk_size": "2G"}}"#);
        let (wall, agent) = create(env, &body);
        cold.push(wall);
        cold_agent.extend(agent);
        if i >= 3 {
            env.wick_ok(&["vm", "delete", &format!("c{i}")]);
        }
    }
    let mut fork3 = Vec::new();
    for i in 0..3 {
        let name = format!("f{i}");
        fork3.push(timed(
            env,
            &["vm", "fork", "src", "--name", &name, "--count", "3"],
        ));
        if i < 2 {
            for k in 1..=3 {
                env.wick_ok(&["vm", "delete", &format!("{name}-{k}")]);
            }
        }
    }
    // Three forks (f2-1..3) and three cold VMs (c0..c2), all settled for a while.
    std::thread::sleep(Duration::from_secs(20));
    let forks = ["f2-1", "f2-2", "f2-3"];
    let rss_forks_mib = forks.iter().map(|n| vm_rss_kib(env, n)).sum::<u64>() >> 10;
    let rss_cold_mib = ["c0", "c1", "c2"]
        .iter()
        .map(|n| vm_rss_kib(env, n))
        .sum::<u64>()
        >> 10;
    let (mut suspend, mut wake) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        suspend.push(timed(env, &["vm", "suspend", "f2-1"]));
        wake.push(timed(env, &["vm", "start", "f2-1"]));
    }
    Results {
        pause,
        resume,
        snapshot,
        snapshot_mib,
        cold,
        cold_agent,
        restore,
        restore_agent,
        fork3,
        suspend,
        wake,
        rss_forks_mib,
        rss_cold_mib,
    }
}

fn print(r: &mut Results) {
    println!(
        "wick snapshot/restore benchmark (QEMU TCG, 1 GiB guests, {RUNS} runs, debug={})",
        cfg!(debug_assertions)
    );
    println!(
        "{:<52} {:>10} {:>10}",
        "measure (CLI or API wall time)", "p50", "max"
    );
    let row = |name: &str, v: &mut Vec<Duration>| {
        if v.is_empty() {
            return println!("{name:<52} {:>10}", "-");
        }
        let max = *v.iter().max().unwrap();
        println!("{:<52} {:>10} {:>10}", name, ms(pct(v, 0.5)), ms(max));
    };
    row("wick vm pause", &mut r.pause);
    row("wick vm resume", &mut r.resume);
    row("wick vm snapshot (running guest, 1 GiB)", &mut r.snapshot);
    println!(
        "{:<52} {:>10}",
        "  snapshot size (allocated on the host)",
        format!("{} MiB", r.snapshot_mib)
    );
    row("wick vm fork --count 3", &mut r.fork3);
    row("wick vm suspend", &mut r.suspend);
    row("wick vm start of a suspended VM", &mut r.wake);
    println!();
    println!(
        "{:<52} {:>10} {:>10}",
        "side by side (p50)", "cold", "restore"
    );
    let pair = |name: &str, a: &mut Vec<Duration>, b: &mut Vec<Duration>| {
        let f = |v: &mut Vec<Duration>| match v.is_empty() {
            true => "-".to_string(),
            false => ms(pct(v, 0.5)),
        };
        println!("{:<52} {:>10} {:>10}", name, f(a), f(b));
    };
    pair(
        "create → agent answers",
        &mut r.cold_agent,
        &mut r.restore_agent,
    );
    pair("create → running (configured)", &mut r.cold, &mut r.restore);
    println!(
        "{:<52} {:>10} {:>10}",
        "host RSS of 3 VMs (VMM + sidecar)",
        format!("{} MiB", r.rss_cold_mib),
        format!("{} MiB", r.rss_forks_mib)
    );
}

fn main() {
    let a = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("benchmark skipped: {why}");
            return;
        }
    };
    let config = a.qemu_config("");
    let mut env = WickdEnv::with_config(&config);
    env.start();
    let mut r = measure(&env);
    print(&mut r);
}
