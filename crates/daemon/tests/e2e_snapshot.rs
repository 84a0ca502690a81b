//! End to end on a real guest: `wick vm snapshot` of a QEMU (TCG) VM booted from the golden
//! image with this build's wick-agent. The guest's filesystems are frozen through the agent
//! and thawed after, QEMU writes its state with a `mapped-ram` migration, both disks are
//! cloned, and the guest runs on (a background counter keeps counting, files stay writable).
//! Prints the timings. Skipped (with the reason) where QEMU, the Debian mirror or root are
//! missing. Restore and fork are exercised in `e2e_restore.rs`.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, counter, counts_on, exec, COUNTER};

#[test]
fn snapshot_of_a_real_guest_freezes_saves_and_runs_on() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    let t = Instant::now();
    env.wick_ok(&["vm", "create", "--name", "s-src", "--memory", "1G"]);
    let boot = t.elapsed();

    let (code, out) = exec(&env, "s-src", &["sh", "-c", "echo kept > /root/f"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = exec(&env, "s-src", &["sh", "-c", COUNTER]);
    assert_eq!(code, 0, "{out}");
    let c0 = counts_on(&env, "s-src", 0, Duration::from_secs(30));

    let t = Instant::now();
    let s1 = env.wick_json(&["vm", "snapshot", "s-src", "--name", "s1"]);
    let snap_time = t.elapsed();
    assert_eq!(s1["state"], "ready", "{s1}");
    assert_eq!(s1["vmm"], "qemu", "{s1}");
    assert_eq!(
        s1["frozen"], true,
        "this build's agent froze / and /root: {s1}"
    );
    let dir = env
        .root()
        .join("state/snapshots")
        .join(s1["id"].as_str().unwrap());
    for f in ["vm.state", "root.img", "work.img"] {
        let m = std::fs::symlink_metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(m.is_file(), "{f}");
        // The state file is readable through a restore's hard link; disks are root's alone.
        let mode = if f == "vm.state" { 0o644 } else { 0o600 };
        assert_eq!((m.uid(), m.mode() & 0o777), (0, mode), "{f}");
    }
    let state_len = std::fs::metadata(dir.join("vm.state")).unwrap().len();

    // The source runs on, thawed: the counter moves and both filesystems take writes.
    let vm: Value = env.wick_json(&["vm", "show", "s-src"]);
    assert_eq!(vm["state"], "running", "{vm}");
    counts_on(&env, "s-src", c0, Duration::from_secs(30));
    let (code, out) = exec(
        &env,
        "s-src",
        &["sh", "-c", "timeout 20 touch /root/t /t && cat /root/f"],
    );
    assert_eq!((code, out.trim()), (0, "kept"), "thawed and intact");

    // A paused VM: snapshotted as it is (its agent cannot answer, so not frozen), left paused.
    env.wick_ok(&["vm", "pause", "s-src"]);
    let s2 = env.wick_json(&["vm", "snapshot", "s-src", "--name", "s2"]);
    assert_eq!(
        (s2["state"].as_str(), s2["frozen"].as_bool()),
        (Some("ready"), Some(false))
    );
    let vm: Value = env.wick_json(&["vm", "show", "s-src"]);
    assert_eq!(vm["state"], "paused", "{vm}");
    env.wick_ok(&["vm", "resume", "s-src"]);
    let c2 = counter(&env, "s-src");
    counts_on(&env, "s-src", c2, Duration::from_secs(30));

    env.wick_ok(&["snapshot", "delete", "s1", "s2"]);
    assert!(!dir.exists());
    eprintln!(
        "e2e snapshot timings (TCG, 1 GiB guest, debug build): boot+create {:.1}s, snapshot \
         of a running guest {:.2}s (freeze, pause, save, clone, resume, thaw), state file {} MiB \
         long, snapshot {} MiB allocated",
        boot.as_secs_f64(),
        snap_time.as_secs_f64(),
        state_len >> 20,
        s1["size_bytes"].as_u64().unwrap_or(0) >> 20
    );
    env.wick_ok(&["vm", "delete", "s-src"]);
}
