//! Helpers of the tests that run the real `wick-agent` behind the fake Firecracker (snapshot,
//! restore, suspend): the daemon, the CLI's output, the VM record, a working exec, and the fake
//! VMM's own view of its guest.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use wick_testkit::wickd::{http, WickdEnv, FAKE_AGENT_CONFIG};

/// Whether the test runs as root (the daemon is a root daemon); prints a SKIP line otherwise.
pub fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

/// A started daemon (socket group `nogroup`, for the socket-user checks) whose `default` image
/// runs the real agent in the fake guest; `failpoint` armed when given; `extra` config appended.
pub fn agent_env(failpoint: Option<&str>, extra: &str) -> WickdEnv {
    let mut env =
        WickdEnv::for_local_users(&format!("{FAKE_AGENT_CONFIG}\n{extra}"), "agent = true")
            .with_real_agent();
    if let Some(p) = failpoint {
        env.env.push(("WICK_FAILPOINTS".into(), p.into()));
    }
    env.start();
    env
}

pub fn text(o: &Output) -> String {
    wick_testkit::wickd::output_text(o)
}

pub fn vm(env: &WickdEnv, name: &str) -> Value {
    env.wick_json(&["vm", "show", name])
}

/// `wick vm exec NAME -- echo alive` succeeds and prints it.
pub fn exec_works(env: &WickdEnv, name: &str) {
    let out = env.wick(&["vm", "exec", name, "--", "echo", "alive"]);
    assert!(out.status.success(), "{name}: {}", text(&out));
    assert!(text(&out).contains("alive"), "{name}: {}", text(&out));
}

/// The fake Firecracker's own view: `GET /`'s `state`.
pub fn vmm_state(v: &Value) -> String {
    let sock = PathBuf::from(v["runtime"]["vmm"]["api_socket"].as_str().unwrap());
    let (code, body) = http(&sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    info["state"].as_str().unwrap().to_string()
}
