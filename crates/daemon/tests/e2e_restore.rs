//! End to end on a real guest: `wick vm create --from-snapshot` and `wick vm fork` of a QEMU
//! (TCG) VM booted from the golden image with this build's wick-agent. The restored VMs hold
//! the snapshot's files and continue its background counter, have their own name, address and
//! host keys, and keep working once the source and the snapshot are deleted. Prints the
//! timings. Skipped (with the reason) where QEMU, the Debian mirror or root are missing. (The
//! full fork end to end — identities, urandom, three forks, suspend — is `e2e_fork.rs`.)

use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, counter, exec};

/// The counter of `name` reaches past `from` within `within`.
fn counts_past(env: &WickdEnv, name: &str, from: u64, within: Duration) -> u64 {
    let end = Instant::now() + within;
    loop {
        let now = counter(env, name);
        if now > from {
            return now;
        }
        assert!(
            Instant::now() < end,
            "{name}: the counter stayed at {now} (from {from})"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Runs `wick ARGS` (which must succeed), printing each progress line with its time.
fn timed_stages(env: &WickdEnv, args: &[&str]) {
    use std::io::BufRead;
    let t = Instant::now();
    let mut child = env
        .wick_cmd()
        .args(args)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        eprintln!("{:>7.2}s {}", t.elapsed().as_secs_f64(), line.unwrap());
    }
    assert!(child.wait().unwrap().success(), "{args:?}");
}

#[test]
fn restore_and_fork_of_a_real_guest_continue_it_with_their_own_identity() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "r-src", "--memory", "1G"]);
    let (code, out) = exec(&env, "r-src", &["sh", "-c", "echo kept > /root/f"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = exec(
        &env,
        "r-src",
        &[
            "sh",
            "-c",
            "setsid sh -c 'i=0; while :; do echo $i > /root/c; i=$((i+1)); sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let c0 = counts_past(&env, "r-src", 0, Duration::from_secs(30));
    env.wick_ok(&["vm", "snapshot", "r-src", "--name", "s1"]);
    let c_snap = counter(&env, "r-src");

    let t = Instant::now();
    timed_stages(
        &env,
        &["vm", "create", "--from-snapshot", "s1", "--name", "r1"],
    );
    let restore_time = t.elapsed();

    let t = Instant::now();
    timed_stages(&env, &["vm", "fork", "r-src", "--name", "f1"]);
    let fork_time = t.elapsed();

    let vms: Vec<Value> = ["r-src", "r1", "f1"]
        .iter()
        .map(|n| env.wick_json(&["vm", "show", n]))
        .collect();
    for v in &vms {
        assert_eq!(v["state"], "running", "{v}");
        assert!(v["runtime"]["restore"].is_null(), "{v}");
    }
    for key in ["ip", "tap", "guest_cid", "host_keys"] {
        let vals: Vec<String> = vms.iter().map(|v| v["runtime"][key].to_string()).collect();
        assert!(
            vals[0] != vals[1] && vals[0] != vals[2] && vals[1] != vals[2],
            "{key}: {vals:?}"
        );
    }
    for n in ["r1", "f1"] {
        let (code, out) = exec(&env, n, &["cat", "/root/f"]);
        assert_eq!((code, out.trim()), (0, "kept"), "{n}: the snapshot's files");
        // The counter continues from the snapshot's value (not from 0).
        let c = counts_past(&env, n, c0, Duration::from_secs(60));
        assert!(
            c >= c_snap.saturating_sub(5),
            "{n}: counter {c}, snapshot ~{c_snap}"
        );
        let (code, out) = exec(&env, n, &["hostname"]);
        assert_eq!((code, out.trim()), (0, n), "{n}: its own hostname");
    }

    // The source and the snapshot go; the restored VMs need neither.
    env.wick_ok(&["vm", "delete", "r-src"]);
    env.wick_ok(&["snapshot", "delete", "s1"]);
    for n in ["r1", "f1"] {
        let c = counter(&env, n);
        counts_past(&env, n, c, Duration::from_secs(30));
        let (code, _) = exec(&env, n, &["sh", "-c", "echo more >> /root/f && sync"]);
        assert_eq!(code, 0, "{n}: its disks take writes");
    }
    eprintln!(
        "e2e restore timings (TCG, 1 GiB guest, debug build): create --from-snapshot {:.2}s, \
         fork of 1 (snapshot + restore) {:.2}s",
        restore_time.as_secs_f64(),
        fork_time.as_secs_f64()
    );
    env.wick_ok(&["vm", "delete", "r1", "f1"]);
}
