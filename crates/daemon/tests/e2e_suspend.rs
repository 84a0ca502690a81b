//! End to end on a real guest: `wick vm suspend` of a QEMU (TCG) VM booted from the golden image
//! with this build's wick-agent. A background counter runs in the guest; suspend writes QEMU's
//! state to the VM's suspend image and ends QEMU (no QEMU process of the VM is left: its RSS is
//! released); `vm start` loads the image and the counter continues from at least its value at
//! suspend; suspended again, `vm exec` resumes it by itself, and so does `vm ssh`. Prints the
//! timings. Skipped (with the reason) where QEMU, the Debian mirror or root are missing.

use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, counter, counts_on, exec};

/// Live QEMU processes of VM `v` (their command line names its VM dir).
fn qemu_of(env: &WickdEnv, v: &Value) -> Vec<u32> {
    let dir = env
        .root()
        .join("state/vms")
        .join(v["id"].as_str().unwrap())
        .display()
        .to_string();
    env.processes()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&dir)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn suspend_of_a_real_guest_frees_its_vmm_and_start_continues_it() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "sus", "--memory", "1G"]);
    let (code, out) = exec(
        &env,
        "sus",
        &[
            "sh",
            "-c",
            "setsid sh -c 'i=0; while :; do echo $i > /root/c; i=$((i+1)); sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0, "{out}");
    counts_on(&env, "sus", 0, Duration::from_secs(30));
    let v: Value = env.wick_json(&["vm", "show", "sus"]);
    assert_eq!(qemu_of(&env, &v).len(), 1, "one QEMU runs the guest");
    let rss_kib = env.wick_json(&["vm", "stats", "sus"])["rss_kib"]
        .as_u64()
        .unwrap_or(0);

    let c0 = counter(&env, "sus");
    let t = Instant::now();
    env.wick_ok(&["vm", "suspend", "sus"]);
    let suspend_time = t.elapsed();
    let v: Value = env.wick_json(&["vm", "show", "sus"]);
    assert_eq!(v["state"], "suspended", "{v}");
    assert!(v["runtime"]["vmm"].is_null(), "{v}");
    assert!(
        qemu_of(&env, &v).is_empty(),
        "no QEMU of the VM is left while it is suspended: its RSS is released"
    );
    let image = std::path::PathBuf::from(v["runtime"]["restore"]["files"][0].as_str().unwrap());
    let image_meta = std::fs::metadata(&image).unwrap();
    let (image_len, image_alloc) = {
        use std::os::unix::fs::MetadataExt;
        (image_meta.len(), image_meta.blocks() * 512)
    };

    let t = Instant::now();
    env.wick_ok(&["vm", "start", "sus"]);
    let start_time = t.elapsed();
    let v: Value = env.wick_json(&["vm", "show", "sus"]);
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["runtime"].get("restore").is_none(), "loaded: {v}");
    let c1 = counter(&env, "sus");
    assert!(
        c1 >= c0,
        "the counter continues from {c0}, not from 0: {c1}"
    );
    counts_on(&env, "sus", c1, Duration::from_secs(30));

    // Suspended again, a `vm exec` resumes it by itself.
    env.wick_ok(&["vm", "suspend", "sus"]);
    let t = Instant::now();
    let out = env.wick(&["vm", "exec", "sus", "--", "cat", "/root/c"]);
    let exec_time = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming suspended VM sus"), "{err}");
    let c2: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(c2 >= c1, "{c2} after {c1}");

    // And `vm ssh`: real OpenSSH over the guest's network (a new TAP, the same address).
    env.wick_ok(&["vm", "suspend", "sus"]);
    let t = Instant::now();
    let out = env.wick(&["vm", "ssh", "sus", "--", "cat", "/root/c"]);
    let ssh_time = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming suspended VM sus"), "{err}");
    let c3: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(c3 >= c2, "{c3} after {c2}");
    eprintln!(
        "e2e suspend timings (TCG, 1 GiB guest, debug build): VMM RSS before {} MiB; suspend \
         {:.2}s (image {} MiB long, {} MiB allocated); start from the image {:.2}s; exec on a suspended VM \
         (resume + exec) {:.2}s, ssh on a suspended VM (resume + ssh) {:.2}s",
        rss_kib >> 10,
        suspend_time.as_secs_f64(),
        image_len >> 20,
        image_alloc >> 20,
        start_time.as_secs_f64(),
        exec_time.as_secs_f64(),
        ssh_time.as_secs_f64()
    );
    env.wick_ok(&["vm", "delete", "sus"]);
}
