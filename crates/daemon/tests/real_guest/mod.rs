//! Helpers of the real-guest end-to-end tests (QEMU TCG, the golden image): the daemon's
//! config, `vm exec`, and the background counter the pause and snapshot tests watch.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use wick_testkit::wickd::WickdEnv;

/// The background counter the pause, snapshot and fork tests watch: `/root/c` rewritten every
/// 0.2 s by a process that outlives the exec that started it.
pub const COUNTER: &str = "setsid sh -c 'i=0; while :; do echo $i > /root/c; i=$((i+1)); \
                           sleep 0.2; done' </dev/null >/dev/null 2>&1 &";

/// A QEMU (TCG) daemon config whose `default` image is the cached golden image `a`.
pub fn config(a: &wick_testkit::guest::GuestAssets) -> String {
    a.qemu_config("stop_timeout = \"30s\"\ndns_port = 10053")
}

/// `wick vm exec NAME -- ARGS`: (exit code, stdout).
pub fn exec(env: &WickdEnv, name: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec!["vm", "exec", name, "--"];
    a.extend_from_slice(args);
    let out = env.wick(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// `/root/c` of the guest: the counter's last value.
pub fn counter(env: &WickdEnv, name: &str) -> u64 {
    // The loop rewrites the file (`echo $i > /root/c`): a read can land between the truncate
    // and the write, so an empty answer is read again.
    for _ in 0..20 {
        let (code, out) = exec(env, name, &["cat", "/root/c"]);
        assert_eq!(code, 0, "{out}");
        if let Ok(n) = out.trim().parse() {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the counter file of {name} never held a number");
}

/// Waits until the counter of `name` is past `from` (within `within`; its file may not exist
/// yet when the counter has only just been started) and returns its value.
pub fn counts_on(env: &WickdEnv, name: &str, from: u64, within: Duration) -> u64 {
    let end = Instant::now() + within;
    loop {
        let (code, out) = exec(env, name, &["cat", "/root/c"]);
        let now = match code {
            0 => out.trim().parse::<u64>().ok(),
            _ => None,
        };
        if let Some(now) = now.filter(|n| *n > from) {
            return now;
        }
        assert!(
            Instant::now() < end,
            "the counter of {name} stayed at {now:?} (from {from}): {out}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
