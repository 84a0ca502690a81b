//! Integration: `wick vm pause|resume` through the real `wickd` and `wick`, with the fake
//! Firecracker (which freezes its fake guest's real `wick-agent` with SIGSTOP while paused, and
//! answers `GET /` with its state). Needs root (the daemon is a root daemon); skipped otherwise.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use wick_testkit::cargo_bin;
use wick_testkit::wickd::{http, WickdEnv, FAKE_AGENT_CONFIG};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

/// A daemon whose `default` image runs the real agent in the fake guest.
fn agent_env() -> WickdEnv {
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();
    env
}

fn vm(env: &WickdEnv, name: &str) -> Value {
    env.wick_json(&["vm", "show", name])
}

fn vmm_pid(v: &Value) -> u32 {
    v["runtime"]["vmm"]["pid"].as_u64().expect("a VMM pid") as u32
}

fn api_socket(v: &Value) -> PathBuf {
    PathBuf::from(v["runtime"]["vmm"]["api_socket"].as_str().unwrap())
}

/// The fake Firecracker's own view: `GET /`'s `state`.
fn vmm_state(v: &Value) -> String {
    let (code, body) = http(&api_socket(v), "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    info["state"].as_str().unwrap().to_string()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The raw answer to `POST /v1/vms/{name}/agent` with the upgrade headers.
fn agent_upgrade(env: &WickdEnv, name: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
    let req = format!(
        "POST /v1/vms/{name}/agent HTTP/1.1\r\nHost: wickd\r\nConnection: Upgrade\r\nUpgrade: wick-agent\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn exec_echo(env: &WickdEnv, name: &str, word: &str) -> Output {
    env.wick(&["vm", "exec", name, "--", "echo", word])
}

#[test]
fn a_paused_vm_refuses_guest_sessions_until_resumed() {
    if !root() {
        return;
    }
    let env = agent_env();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let out = exec_echo(&env, "a1", "before");
    assert!(out.status.success(), "{}", text(&out));

    let said = env.wick_ok(&["vm", "pause", "a1"]);
    assert!(said.contains("a1: paused"), "{said}");
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "paused", "{a1}");
    assert_eq!(vmm_state(&a1), "Paused", "the VMM was asked");
    assert!(env.wick_ok(&["vm", "list"]).contains("paused"));
    let stats = env.wick_json(&["vm", "stats", "a1"]);
    assert_eq!(stats["state"], "paused", "{stats}");

    // Guest sessions: a 409 naming the state and the way out.
    let out = exec_echo(&env, "a1", "during");
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("a1 is paused") && msg.contains("wick vm resume a1"),
        "{msg}"
    );
    let answer = agent_upgrade(&env, "a1");
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(answer.contains("wick vm resume a1"), "{answer}");
    // Start is refused with the way out; pause again changes nothing.
    let out = env.wick(&["vm", "start", "a1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("wick vm resume a1"), "{}", text(&out));
    env.wick_ok(&["vm", "pause", "a1"]);
    assert_eq!(vm(&env, "a1")["state"], "paused");

    let said = env.wick_ok(&["vm", "resume", "a1"]);
    assert!(said.contains("a1: running"), "{said}");
    let a1 = vm(&env, "a1");
    assert_eq!(
        (a1["state"].as_str(), vmm_state(&a1).as_str()),
        (Some("running"), "Running")
    );
    let out = exec_echo(&env, "a1", "after");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after");
    // Resuming a running VM is a no-op; pausing a stopped one is refused.
    env.wick_ok(&["vm", "resume", "a1"]);
    env.wick_ok(&["vm", "create", "--name", "s1", "--no-start"]);
    let out = env.wick(&["vm", "pause", "s1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("s1 is stopped; cannot pause it now"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_paused_vm_survives_a_daemon_crash_and_reconcile_follows_the_vmm() {
    if !root() {
        return;
    }
    let mut env = agent_env();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "create", "--name", "b1"]);
    env.wick_ok(&["vm", "pause", "a1"]);
    let (a1, b1) = (vm(&env, "a1"), vm(&env, "b1"));

    env.kill9();
    // While wickd is down the VMMs change under it (as after a crash between a VMM call and
    // the save): b1's guest gets paused, so its record is one step behind.
    let (code, body) = http(
        &api_socket(&b1),
        "PATCH",
        "/vm",
        Some(br#"{"state":"Paused"}"#),
    );
    assert_eq!(code, 204, "{body}");
    env.start();

    let a1_now = vm(&env, "a1");
    assert_eq!(a1_now["state"], "paused", "re-adopted as paused: {a1_now}");
    assert_eq!(vmm_pid(&a1_now), vmm_pid(&a1));
    let b1_now = vm(&env, "b1");
    assert_eq!(
        b1_now["state"], "paused",
        "settled to the VMM's truth: {b1_now}"
    );
    assert!(
        env.daemon_log().contains("disagrees with the record"),
        "{}",
        env.daemon_log()
    );

    for name in ["a1", "b1"] {
        env.wick_ok(&["vm", "resume", name]);
        let out = exec_echo(&env, name, "back");
        assert!(
            out.status.success(),
            "{name}: {}\nVMM log:\n{}\ndaemon log:\n{}",
            text(&out),
            env.wick_ok(&["vm", "logs", name]),
            env.daemon_log()
        );
    }
}

#[test]
fn stop_and_delete_of_a_paused_vm_release_everything() {
    if !root() {
        return;
    }
    let env = agent_env();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "create", "--name", "b1"]);
    let (a1, b1) = (vm(&env, "a1"), vm(&env, "b1"));
    let (a_pid, b_pid) = (vmm_pid(&a1), vmm_pid(&b1));
    env.wick_ok(&["vm", "pause", "a1"]);
    env.wick_ok(&["vm", "pause", "b1"]);

    // Stop: resumed first, so the guest powers off cleanly (the fake acts on Ctrl+Alt+Del
    // only while running).
    env.wick_ok(&["vm", "stop", "a1"]);
    let a1_now = vm(&env, "a1");
    assert_eq!(a1_now["state"], "stopped", "{a1_now}");
    assert!(a1_now["runtime"]["vmm"].is_null(), "{a1_now}");
    assert!(a1_now["runtime"]["tap"].is_null(), "{a1_now}");
    assert!(!alive(a_pid));
    let log = env.wick_ok(&["vm", "logs", "a1"]);
    assert!(log.contains("Ctrl+Alt+Del received, powering off"), "{log}");

    // Delete: everything goes, the VMM process included.
    let dir = PathBuf::from(b1["runtime"]["dir"].as_str().unwrap());
    env.wick_ok(&["vm", "delete", "b1"]);
    assert!(!dir.exists(), "vm dir removed");
    assert!(!alive(b_pid));
    assert!(env.vmm_processes().is_empty(), "{:?}", env.vmm_processes());
    let links = env.ns_run("ip", &["-o", "link"]);
    assert!(!links.contains("wk-"), "no TAP left: {links}");
    env.wick_ok(&["vm", "delete", "a1"]);
}

#[test]
fn a_socket_user_pauses_only_their_own_vms() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::for_local_users("", "");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "roots"]);
    let out = env.wick_as_user(&["vm", "create", "--name", "mine"]);
    assert!(out.status.success(), "{}", text(&out));

    for verb in ["pause", "resume"] {
        let out = env.wick_as_user(&["vm", verb, "roots"]);
        assert!(!out.status.success(), "{verb}: {}", text(&out));
        assert!(text(&out).contains("roots"), "{}", text(&out));
    }
    assert_eq!(vm(&env, "roots")["state"], "running");

    let out = env.wick_as_user(&["vm", "pause", "mine"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(vm(&env, "mine")["state"], "paused");
    let out = env.wick_as_user(&["vm", "resume", "mine"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(vm(&env, "mine")["state"], "running");
}

#[test]
fn auto_stop_stops_an_untouched_paused_vm_cleanly() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new_with_image_extra(
        &format!(
            "{FAKE_AGENT_CONFIG}\nauto_stop_stale_after = \"3s\"\nstats_poll_interval = \"200ms\""
        ),
        "agent = true",
    );
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "pause", "a1"]);
    // Sampled while paused: the VMM still holds its memory.
    let stats = env.wick_json(&["vm", "stats", "a1"]);
    assert_eq!(stats["state"], "paused", "{stats}");
    assert!(stats["rss_kib"].as_u64().unwrap_or(0) > 0, "{stats}");
    let mut state = String::new();
    for _ in 0..150 {
        state = vm(&env, "a1")["state"].as_str().unwrap().to_string();
        if state == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(state, "stopped", "auto-stopped after 3 s untouched");
    assert!(env.vmm_processes().is_empty());
    let log = env.wick_ok(&["vm", "logs", "a1"]);
    assert!(
        log.contains("Ctrl+Alt+Del received, powering off"),
        "resumed, then a clean poweroff: {log}"
    );
}
