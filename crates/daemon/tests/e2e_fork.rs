//! Issue 11 end to end on real guests (QEMU TCG, the golden image, this build's wick-agent): a
//! VM with a file and a background counter is snapshotted, restored (`vm create
//! --from-snapshot`) and forked three times (`vm fork --count 3`). Every copy has the file and a
//! counter that goes on from the snapshot's value (the process survived: a cold boot has no
//! counter), and its own identity: hostname, IP and MAC, machine-id, SSH host key, vsock CID,
//! TAP, and kernel RNG (`/dev/urandom` differs). Then pause → resume and suspend → start keep
//! the counter going (and a suspended VM has no VMM process), `vm exec` wakes a suspended VM,
//! and the copies outlive their source and the snapshot. Prints the timings. Skipped (with the
//! reason) where QEMU, the Debian mirror or root are missing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, counter, counts_on, exec, COUNTER};

const WAIT: Duration = Duration::from_secs(60);

/// What must differ between copies of one snapshot, as the guest and the record show it.
#[derive(Debug)]
struct Identity {
    name: String,
    hostname: String,
    ip: String,
    mac: String,
    machine_id: String,
    host_key: String,
    cid: u64,
    tap: String,
    random: String,
}

fn guest(env: &WickdEnv, name: &str, cmd: &str) -> String {
    let (code, out) = exec(env, name, &["sh", "-c", cmd]);
    assert_eq!(code, 0, "{name}: {cmd}: {out}");
    out.trim().to_string()
}

fn identity(env: &WickdEnv, name: &str) -> Identity {
    let vm: Value = env.wick_json(&["vm", "show", name]);
    assert_eq!(vm["state"], "running", "{vm}");
    let key = guest(env, name, "cat /etc/ssh/ssh_host_ed25519_key.pub");
    let blob = key
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let pinned = vm["runtime"]["host_keys"].to_string();
    assert!(
        pinned.contains(&blob),
        "{name}: the guest's host key is the one wickd pinned: {key} vs {pinned}"
    );
    let ip = vm["runtime"]["ip"].as_str().unwrap().to_string();
    let addrs = guest(
        env,
        name,
        "ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1",
    );
    assert_eq!(addrs, ip, "{name}: eth0 holds exactly its own address");
    Identity {
        name: name.into(),
        hostname: guest(env, name, "hostname"),
        mac: guest(env, name, "cat /sys/class/net/eth0/address"),
        machine_id: guest(env, name, "cat /etc/machine-id"),
        random: guest(
            env,
            name,
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        ),
        host_key: blob,
        cid: vm["runtime"]["guest_cid"].as_u64().unwrap(),
        tap: vm["runtime"]["tap"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        ip,
    }
}

/// One field of an [`Identity`], by name.
type Field = (&'static str, fn(&Identity) -> String);

/// Every field differs between every two of `ids`.
fn all_differ(ids: &[Identity]) {
    let fields: [Field; 8] = [
        ("hostname", |i| i.hostname.clone()),
        ("ip", |i| i.ip.clone()),
        ("mac", |i| i.mac.clone()),
        ("machine-id", |i| i.machine_id.clone()),
        ("ssh host key", |i| i.host_key.clone()),
        ("vsock cid", |i| i.cid.to_string()),
        ("tap", |i| i.tap.clone()),
        ("/dev/urandom", |i| i.random.clone()),
    ];
    for (what, get) in fields {
        let seen: BTreeSet<String> = ids.iter().map(get).collect();
        assert_eq!(seen.len(), ids.len(), "{what} must differ: {ids:#?}");
    }
}

/// The VMM and sidecar processes the record names, as (pid, start time) (empty when it names
/// none).
fn vmm_procs(env: &WickdEnv, name: &str) -> Vec<(u32, Option<u64>)> {
    let vm: Value = env.wick_json(&["vm", "show", name]);
    let h = &vm["runtime"]["vmm"];
    let mut pids: Vec<u32> = h["pid"].as_u64().into_iter().map(|p| p as u32).collect();
    if let Some(cars) = h["sidecars"].as_array() {
        pids.extend(
            cars.iter()
                .filter_map(|c| c["pid"].as_u64())
                .map(|p| p as u32),
        );
    }
    pids.into_iter()
        .map(|p| (p, wick_host::proc::start_time(p)))
        .collect()
}

/// Resident memory in KiB of the process `pid` started at `start` (0 when it is gone, also
/// when its pid now belongs to another process).
fn rss_kib((pid, start): (u32, Option<u64>)) -> u64 {
    if start.is_none() || wick_host::proc::start_time(pid) != start {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The copy `name` of the snapshot taken when the counter was at least `at_snapshot`: the
/// file is there, and the counter runs on from at least that value.
fn is_a_live_copy(env: &WickdEnv, name: &str, at_snapshot: u64) {
    assert_eq!(
        guest(env, name, "cat /root/f /etc/wick-e2e"),
        "kept\nroot-kept"
    );
    let first = counter(env, name);
    assert!(
        first >= at_snapshot,
        "{name}: counter {first} went on from the snapshot's value (≥ {at_snapshot})"
    );
    counts_on(env, name, first, WAIT);
}

#[test]
fn snapshot_restore_fork_pause_and_suspend_on_real_guests() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "f-src", "--memory", "1G"]);
    guest(
        &env,
        "f-src",
        "echo kept > /root/f && echo root-kept > /etc/wick-e2e && sync",
    );
    guest(&env, "f-src", COUNTER);
    let c0 = counts_on(&env, "f-src", 0, WAIT);

    let t = Instant::now();
    env.wick_ok(&["vm", "snapshot", "f-src", "--name", "f-snap"]);
    let snapshot_time = t.elapsed();

    let t = Instant::now();
    env.wick_ok(&["vm", "create", "--from-snapshot", "f-snap", "--name", "f-r"]);
    let restore_time = t.elapsed();
    let t = Instant::now();
    env.wick_ok(&["vm", "fork", "f-src", "--name", "f", "--count", "3"]);
    let fork_time = t.elapsed();
    let copies = ["f-r", "f-1", "f-2", "f-3"];
    for name in copies {
        is_a_live_copy(&env, name, c0);
    }
    // The source runs on, untouched by its copies.
    let c = counter(&env, "f-src");
    counts_on(&env, "f-src", c, WAIT);

    let mut ids = vec![identity(&env, "f-src")];
    ids.extend(copies.iter().map(|n| identity(&env, n)));
    for id in &ids {
        assert_eq!(id.hostname, id.name, "{id:?}");
    }
    all_differ(&ids);
    // Each copy's traffic, under its new MAC and address, passes its port guard: the copies
    // resolve each other's names through wickd's DNS.
    for w in copies.windows(2) {
        let ip = &ids.iter().find(|i| i.name == w[1]).unwrap().ip;
        let hosts = guest(&env, w[0], &format!("getent hosts {}.vm", w[1]));
        assert!(
            hosts.contains(ip.as_str()),
            "{} sees {}.vm: {hosts}",
            w[0],
            w[1]
        );
    }

    // Pause → resume: the counter goes on.
    env.wick_ok(&["vm", "pause", "f-1"]);
    std::thread::sleep(Duration::from_secs(1));
    env.wick_ok(&["vm", "resume", "f-1"]);
    let c = counter(&env, "f-1");
    counts_on(&env, "f-1", c, WAIT);

    // Suspend → start: no VMM process while suspended, the counter goes on after.
    let pids = vmm_procs(&env, "f-2");
    let rss_running: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let before = counter(&env, "f-2");
    let t = Instant::now();
    env.wick_ok(&["vm", "suspend", "f-2"]);
    let suspend_time = t.elapsed();
    let vm: Value = env.wick_json(&["vm", "show", "f-2"]);
    assert_eq!(vm["state"], "suspended", "{vm}");
    let rss_suspended: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    assert_eq!(
        rss_suspended, 0,
        "the VMM of a suspended VM is gone: {pids:?}"
    );
    let t = Instant::now();
    env.wick_ok(&["vm", "start", "f-2"]);
    let resume_time = t.elapsed();
    let after = counter(&env, "f-2");
    assert!(after >= before, "f-2's counter went on: {before} → {after}");
    counts_on(&env, "f-2", after, WAIT);
    assert_eq!(guest(&env, "f-2", "cat /root/f"), "kept");

    // Any use wakes a suspended VM: `vm exec`.
    env.wick_ok(&["vm", "suspend", "f-3"]);
    assert_eq!(guest(&env, "f-3", "cat /root/f"), "kept");
    let vm: Value = env.wick_json(&["vm", "show", "f-3"]);
    assert_eq!(vm["state"], "running", "{vm}");

    // The copies need neither their source nor the snapshot.
    env.wick_ok(&["vm", "delete", "f-src"]);
    env.wick_ok(&["snapshot", "delete", "f-snap"]);
    for name in copies {
        let c = counter(&env, name);
        counts_on(&env, name, c, WAIT);
    }
    eprintln!(
        "e2e fork timings (TCG, 1 GiB guests, debug build): snapshot {:.2}s, restore (create \
         --from-snapshot → running) {:.2}s, fork of 3 {:.2}s, suspend {:.2}s (VMM RSS {} MiB \
         → 0), start of the suspended VM {:.2}s",
        snapshot_time.as_secs_f64(),
        restore_time.as_secs_f64(),
        fork_time.as_secs_f64(),
        suspend_time.as_secs_f64(),
        rss_running >> 10,
        resume_time.as_secs_f64(),
    );
    for name in copies {
        env.wick_ok(&["vm", "delete", name]);
    }
}
