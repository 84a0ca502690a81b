//! Real-guest benchmark (QEMU TCG on this host; prints a table, asserts nothing):
//! create→agent-ready and create→ssh-ready, the same create broken down per stage (host side
//! vs the guest's boot), exec round trip over the agent, and tar upload throughput; then, side
//! by side, cold vs warm-pool create → agent configured and `wick vm run --rm REPO -- true`
//! wall time without and with a pool (`[pool] size = 1`, the next run waits for the refill).
//!
//! `cargo bench -p wick-daemon --bench guest` as root; skipped (with the reason) where QEMU
//! or the golden image's prerequisites are missing.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_agent_proto::{AgentClient, ExecRequest, AGENT_PORT};
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::{http, WickdEnv};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// `POST /v1/vms` (1 GiB, 2 GiB disk) and its events until the end; panics unless it succeeded.
fn create(env: &WickdEnv, name: &str) -> Vec<Value> {
    let body = format!(r#"{{"name": "{name}", "memory": "1G", "disk_size": "2G"}}"#);
    let (st, text) = http(&env.socket(), "POST", "/v1/vms", Some(body.as_bytes()));
    assert_eq!(st, 202, "{text}");
    let op: Value = serde_json::from_str(&text).unwrap();
    let (_, events) = http(
        &env.socket(),
        "GET",
        &format!("/v1/operations/{}/events", op["id"].as_str().unwrap()),
        None,
    );
    let evs: Vec<Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.is_object())
        .collect();
    assert_eq!(evs.last().unwrap()["state"], "succeeded", "{events}");
    evs
}

/// Waits until the warm pool holds one ready VM and boots no other.
fn wait_pool_ready(env: &WickdEnv) {
    let t = Instant::now();
    loop {
        let list = env.wick_json(&["vm", "list", "--all"]);
        let slots: Vec<&str> = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["runtime"]["pool"].as_str())
            .collect();
        if slots == ["ready"] {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "pool never ready: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `wick vm run --rm REPO -- true` (1 GiB, 2 GiB disk): its wall time.
fn vm_run_rm(env: &WickdEnv, repo: &std::path::Path) -> Duration {
    let t = Instant::now();
    let out = env
        .wick_cmd()
        .args(["vm", "run", "--rm", "--memory", "1G", "--disk-size", "2G"])
        .arg(repo)
        .args(["--", "true"])
        .output()
        .unwrap();
    let wall = t.elapsed();
    assert!(
        out.status.success(),
        "vm run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wall
}

/// Cold and pooled samples of one measure.
type Pair = (Vec<Duration>, Vec<Duration>);

/// Cold vs pooled, on one daemon each (the cold one has no `[pool]`): create → configured
/// and `vm run --rm` wall: ((cold, pooled) create, (cold, pooled) run).
fn cold_vs_pooled(config: &str, runs: usize) -> (Pair, Pair) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (mut cold_create, mut cold_run) = (Vec::new(), Vec::new());
    {
        let mut env = WickdEnv::with_config(config);
        env.start();
        for i in 0..runs {
            let t = Instant::now();
            create(&env, &format!("c{i}"));
            cold_create.push(t.elapsed());
            env.wick_ok(&["vm", "delete", &format!("c{i}")]);
            cold_run.push(vm_run_rm(&env, &repo));
        }
    }
    let (mut pool_create, mut pool_run) = (Vec::new(), Vec::new());
    let pooled = format!("{config}\n[pool]\nsize = 1\nmemory = \"1G\"\ndisk = \"2G\"\n");
    let mut env = WickdEnv::with_config(&pooled);
    env.start();
    for i in 0..runs {
        wait_pool_ready(&env);
        let t = Instant::now();
        let evs = create(&env, &format!("p{i}"));
        pool_create.push(t.elapsed());
        assert!(
            evs.iter()
                .any(|e| e["stage"].as_str().is_some_and(|s| s.contains("warm pool"))),
            "served from the pool: {evs:?}"
        );
        env.wick_ok(&["vm", "delete", &format!("p{i}")]);
        wait_pool_ready(&env);
        pool_run.push(vm_run_rm(&env, &repo));
    }
    ((cold_create, pool_create), (cold_run, pool_run))
}

/// `runs` cycles of `wick vm pause` and `wick vm resume` on `name`: the CLI's wall time for
/// each (the operation, QMP `stop`/`cont`, and the CLI's own start and event stream).
fn pause_resume(env: &WickdEnv, name: &str, runs: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        env.wick_ok(&["vm", "pause", name]);
        pause.push(t.elapsed());
        let t = Instant::now();
        env.wick_ok(&["vm", "resume", name]);
        resume.push(t.elapsed());
    }
    (pause, resume)
}

/// `runs` snapshots of the running VM `name` (freeze, pause, save, clone both disks, resume,
/// thaw): the CLI's wall time for each, and the last one's allocated size. Deleted after.
fn snapshots(env: &WickdEnv, name: &str, runs: usize) -> (Vec<Duration>, u64) {
    let (mut times, mut size) = (Vec::new(), 0);
    for i in 0..runs {
        let snap = format!("bench-snap-{i}");
        let t = Instant::now();
        let s = env.wick_json(&["vm", "snapshot", name, "--name", &snap]);
        times.push(t.elapsed());
        size = s["size_bytes"].as_u64().unwrap_or(0);
        env.wick_ok(&["snapshot", "delete", &snap]);
    }
    (times, size)
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = 3;
    let (mut ready, mut ssh) = (Vec::new(), Vec::new());
    let mut stages: Vec<(String, u64)> = Vec::new();
    for i in 0..runs {
        let name = format!("b{i}");
        let t = Instant::now();
        let evs = create(&env, &name);
        ready.push(t.elapsed());
        for w in evs.windows(2) {
            let d = w[1]["elapsed_ms"].as_u64().unwrap() - w[0]["elapsed_ms"].as_u64().unwrap();
            stages.push((w[0]["stage"].as_str().unwrap_or("?").to_string(), d));
        }
        // ssh-ready: sshd's banner on the guest's port 22, from the daemon's namespace.
        let vm = env.wick_json(&["vm", "show", &name]);
        let ip = vm["runtime"]["ip"].as_str().unwrap().to_string();
        let ns = env.netns.as_ref().unwrap();
        loop {
            if let Ok(mut s) = ns.connect(
                format!("{ip}:22").parse().unwrap(),
                Duration::from_millis(500),
            ) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).is_ok() && &b == b"SSH-" {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(240),
                "sshd never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ssh.push(t.elapsed());
    }

    let vm = env.wick_json(&["vm", "show", "b0"]);
    let sock = vm["runtime"]["vmm"]["vsock_socket"]
        .as_str()
        .unwrap()
        .to_string();
    let client = rt
        .block_on(AgentClient::connect(
            sock.as_ref(),
            AGENT_PORT,
            Duration::from_secs(10),
        ))
        .unwrap();
    let mut exec = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = rt
            .block_on(async {
                client
                    .exec(ExecRequest {
                        argv: vec!["true".into()],
                        ..Default::default()
                    })
                    .await?
                    .output()
                    .await
            })
            .unwrap();
        assert_eq!(out.status.code, Some(0));
        exec.push(t.elapsed());
    }
    // 64 MiB of incompressible data as one tar upload into /root.
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut tarball = Vec::new();
    {
        let mut t = tar::Builder::new(&mut tarball);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, "blob.bin", data.as_slice()).unwrap();
        t.finish().unwrap();
    }
    let t = Instant::now();
    rt.block_on(client.put_tar("/root", tarball.as_slice()))
        .unwrap();
    let put = t.elapsed();
    let (mut pause, mut resume) = pause_resume(&env, "b0", 10);
    let (mut snaps, snap_size) = snapshots(&env, "b0", 3);

    println!(
        "wick real-guest benchmark (QEMU TCG, {runs} VMs, 1 GiB, debug={})",
        cfg!(debug_assertions)
    );
    println!("{:<44} {:>10} {:>10}", "measure", "p50", "max");
    let row = |name: &str, v: &mut Vec<Duration>| {
        let max = *v.iter().max().unwrap();
        println!("{:<44} {:>10} {:>10}", name, ms(pct(v, 0.5)), ms(max));
    };
    row("create → agent ready + configured", &mut ready);
    row("create → ssh banner", &mut ssh);
    let mut names: Vec<String> = Vec::new();
    for (n, _) in &stages {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    for n in names {
        let mut v: Vec<Duration> = stages
            .iter()
            .filter(|(s, _)| *s == n)
            .map(|(_, d)| Duration::from_millis(*d))
            .collect();
        row(&format!("  stage: {n}"), &mut v);
    }
    row(
        "exec `true` round trip (agent over virtio-serial)",
        &mut exec,
    );
    row("wick vm pause (QMP stop; CLI wall)", &mut pause);
    row("wick vm resume (QMP cont; CLI wall)", &mut resume);
    row("wick vm snapshot, running 1 GiB (CLI wall)", &mut snaps);
    println!(
        "{:<44} {:>10}",
        "  snapshot size (allocated on the host)",
        format!("{} MiB", snap_size >> 20)
    );
    println!(
        "{:<44} {:>10}",
        "tar upload 64 MiB (agent over virtio-serial)",
        format!("{:.1} MiB/s", 64.0 / put.as_secs_f64())
    );
    drop(client);
    drop(env); // its VMs die with it: the next part measures on an idle host

    let ((mut cc, mut pc), (mut cr, mut pr)) = cold_vs_pooled(&config, runs);
    println!();
    println!("warm pool, side by side ({runs} runs each; the pool refilled before each)");
    println!("{:<44} {:>10} {:>10}", "measure (p50)", "cold", "pooled");
    println!(
        "{:<44} {:>10} {:>10}",
        "create → agent configured",
        ms(pct(&mut cc, 0.5)),
        ms(pct(&mut pc, 0.5))
    );
    println!(
        "{:<44} {:>10} {:>10}",
        "wick vm run --rm REPO -- true (wall)",
        ms(pct(&mut cr, 0.5)),
        ms(pct(&mut pr, 0.5))
    );
}
