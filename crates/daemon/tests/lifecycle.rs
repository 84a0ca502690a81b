//! Integration: the real `wickd` and `wick` binaries in an isolated `WICK_ROOT`, with the fake
//! Firecracker as VMM. Needs root (the daemon is a root daemon); skipped otherwise.

use std::path::PathBuf;

use serde_json::Value;
use wick_testkit::wickd::{http, WickdEnv};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

fn vm(env: &WickdEnv, name: &str) -> Value {
    env.wick_json(&["vm", "show", name])
}

fn vmm_pid(v: &Value) -> Option<u32> {
    v["runtime"]["vmm"]["pid"].as_u64().map(|p| p as u32)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn lifecycle_create_stop_start_restart_kill_delete() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "running", "{a1}");
    let pid = vmm_pid(&a1).expect("pid recorded");
    assert!(alive(pid));
    let dir = PathBuf::from(a1["runtime"]["dir"].as_str().unwrap());
    assert!(dir.join("rootfs.ext4").exists());

    let list = env.wick_json(&["vm", "list"]);
    let names: Vec<&str> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1"]);
    // the table form too
    let table = env.wick_ok(&["vm", "ps"]);
    assert!(table.contains("a1") && table.contains("running"), "{table}");

    env.wick_ok(&["vm", "stop", "a1"]);
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "stopped");
    assert!(a1["runtime"]["vmm"].is_null(), "no stale runtime: {a1}");
    assert!(!alive(pid));
    assert!(env.vmm_processes().is_empty());

    env.wick_ok(&["vm", "start", "a1"]);
    let pid2 = vmm_pid(&vm(&env, "a1")).unwrap();
    env.wick_ok(&["vm", "restart", "a1"]);
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "running");
    let pid3 = vmm_pid(&a1).unwrap();
    assert_ne!(pid2, pid3);
    assert!(!alive(pid2));

    let logs = env.wick_ok(&["vm", "logs", "a1"]);
    assert!(logs.contains("fake"), "serial log reaches vm logs: {logs}");

    env.wick_ok(&["vm", "kill", "a1"]);
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "stopped");
    assert!(a1["runtime"]["vmm"].is_null());
    assert!(!alive(pid3));

    env.wick_ok(&["vm", "delete", "a1"]);
    assert!(!dir.exists(), "vm dir removed");
    let out = env.wick(&["vm", "show", "a1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a1"));
    assert!(env.vmm_processes().is_empty());
}

#[test]
fn crash_drill_dead_vmm_is_settled_live_vmm_readopted() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "create", "--name", "b1"]);
    let a_pid = vmm_pid(&vm(&env, "a1")).unwrap();
    let b_pid = vmm_pid(&vm(&env, "b1")).unwrap();

    env.kill9();
    assert!(alive(a_pid) && alive(b_pid), "VMMs outlive the daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));

    env.start();
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "stopped", "{a1}");
    assert!(
        a1["runtime"]["vmm"].is_null(),
        "no stale runtime field: {a1}"
    );
    let b1 = vm(&env, "b1");
    assert_eq!(b1["state"], "running", "re-adopted: {b1}");
    assert_eq!(vmm_pid(&b1), Some(b_pid));
    assert_eq!(env.vmm_processes(), vec![b_pid], "no orphan VMM");

    // An adopted VMM (not our child) is stopped and started like any other.
    env.wick_ok(&["vm", "stop", "b1"]);
    assert!(!alive(b_pid));
    env.wick_ok(&["vm", "start", "a1"]);
    assert_eq!(vm(&env, "a1")["state"], "running");

    // An adopted VMM that dies while wickd runs is noticed by the watcher.
    let a_pid = vmm_pid(&vm(&env, "a1")).unwrap();
    env.kill9();
    env.start();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut state = String::new();
    for _ in 0..100 {
        state = vm(&env, "a1")["state"].as_str().unwrap().to_string();
        if state != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(state, "error", "killed VMM settles the VM");
    assert!(vm(&env, "a1")["runtime"]["vmm"].is_null());
}

#[test]
fn crash_while_starting_leaves_no_orphan() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    // Simulate a crash mid-start: the record says `starting` with a live VMM.
    let pid = vmm_pid(&vm(&env, "a1")).unwrap();
    env.kill9();
    let db = env.root().join("state/wick.db");
    let c = rusqlite_free_update(&db, "UPDATE vms SET state = 'starting' WHERE name = 'a1'");
    assert!(c, "sqlite3 CLI available");
    env.start();
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "stopped", "{a1}");
    assert!(!alive(pid), "the half-started VMM was ended");
    assert!(env.vmm_processes().is_empty());
}

/// Edits the database with the `sqlite3` CLI (the test must not link a second SQLite).
fn rusqlite_free_update(db: &std::path::Path, sql: &str) -> bool {
    std::process::Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn unexpected_vmm_exit_marks_error_with_log_tail() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.env
        .push(("FAKE_FC_EXIT_AFTER_START_MS".into(), "300".into()));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let mut a1 = vm(&env, "a1");
    for _ in 0..100 {
        if a1["state"] != "running" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        a1 = vm(&env, "a1");
    }
    assert_eq!(a1["state"], "error", "{a1}");
    let why = a1["runtime"]["last_error"].as_str().unwrap();
    assert!(why.contains("exited unexpectedly"), "{why}");
    assert!(why.contains("last lines of the VMM log"), "{why}");
    assert!(a1["runtime"]["vmm"].is_null());
    assert!(env.vmm_processes().is_empty());
    // An errored VM can be started again.
    env.wick_ok(&["vm", "start", "a1"]);
}

#[test]
fn failed_start_reports_fault_and_releases() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.env.push((
        "FAKE_FC_FAIL_START".into(),
        "Kernel Loader: Invalid Elf magic number".into(),
    ));
    env.start();
    let out = env.wick(&["vm", "create", "--name", "a1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid Elf magic"), "{err}");
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "error");
    assert!(a1["runtime"]["vmm"].is_null());
    assert!(env.vmm_processes().is_empty());
}

#[test]
fn bad_input_is_refused_clearly() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    let long = "a".repeat(64);
    for (args, needle) in [
        (vec!["vm", "create", "--name", "-bad"], "-"),
        (vec!["vm", "create", "--name", "Ab"], "'A' at position 1"),
        (vec!["vm", "create", "--name", long.as_str()], "63"),
        (vec!["vm", "create", "--vcpu", "0"], "vcpu"),
        (vec!["vm", "create", "--memory", "0"], "greater than zero"),
        (vec!["vm", "create", "--memory", "lots"], "lots"),
        (vec!["vm", "create", "--image", "nope"], "nope"),
    ] {
        let out = env.wick(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Duplicate names.
    env.wick_ok(&["vm", "create", "--name", "dup", "--no-start"]);
    let out = env.wick(&["vm", "create", "--name", "dup"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // The daemon validates too, whatever the client.
    let sock = env.socket();
    for body in [
        r#"{"vcpu": 0}"#,
        r#"{"memory": "lots"}"#,
        r#"{"name": "Ab"}"#,
        r#"{"vcpu": -3}"#,
        r#"{"bogus": 1}"#,
    ] {
        let (status, text) = http(&sock, "POST", "/v1/vms", Some(body.as_bytes()));
        assert_eq!(status, 400, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["code"], "invalid_argument", "{text}");
    }
    let (status, text) = http(&sock, "POST", "/v1/vms", Some(b"{not json"));
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["code"],
        "invalid_argument"
    );
    // ... and keeps serving.
    let (status, _) = http(&sock, "GET", "/v1/vms", None);
    assert_eq!(status, 200);
    let (status, text) = http(&sock, "GET", "/v1/nope", None);
    assert_eq!(status, 404, "{text}");
}

#[test]
fn unknown_config_key_stops_the_daemon_with_its_name() {
    let env = WickdEnv::new("bogus_key = 1");
    let out = std::process::Command::new(wick_testkit::cargo_bin("wickd"))
        .arg("--root")
        .arg(env.root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus_key"), "{err}");
    assert!(err.contains("config.toml"), "{err}");
}

#[test]
fn fifty_concurrent_creates() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    let children: Vec<_> = (0..50)
        .map(|_| {
            env.wick_cmd()
                .args(["vm", "create"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = env.wick_json(&["vm", "list"]);
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 50);
    let names: std::collections::HashSet<_> =
        vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 50, "distinct names");
    let cids: std::collections::HashSet<_> = vms
        .iter()
        .map(|v| v["runtime"]["guest_cid"].as_u64().unwrap())
        .collect();
    assert_eq!(cids.len(), 50, "distinct vsock CIDs");
    assert!(vms.iter().all(|v| v["state"] == "running"));
    assert_eq!(env.vmm_processes().len(), 50);
}

#[test]
fn non_root_callers_see_only_their_own_vms() {
    if !root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "roots", "--no-start"]);
    // Let uid 65534 reach the socket (a deployment would use socket_group).
    std::fs::set_permissions(env.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    for d in [env.root(), &env.root().join("run")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Straight to the socket (no netns hop: `ip netns exec` needs root).
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(wick_testkit::cargo_bin("wick"))
            .args(args)
            .env("WICK_ROOT", env.root())
            .uid(65534)
            .gid(65534)
            .env("HOME", "/tmp")
            .output()
            .unwrap()
    };
    let out = as_nobody(&["vm", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["vms"].as_array().unwrap().len(),
        0,
        "nobody sees no VM of root"
    );
    let out = as_nobody(&["vm", "show", "roots"]);
    assert!(!out.status.success());
    let out = as_nobody(&["vm", "create", "--name", "mine", "--no-start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_nobody(&["vm", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["owner"], 65534);
    assert_eq!(
        env.wick_json(&["vm", "list"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "root sees all"
    );
}

#[test]
fn openapi_status_config_doctor() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("[vm_defaults]\nvcpu = 2\nmemory = \"1G\"");
    env.start();
    let (status, text) = http(&env.socket(), "GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["paths"]["/v1/vms"].is_object(), "{text}");
    assert!(doc["components"]["schemas"]["VmRecord"].is_object());

    let st = env.wick_json(&["daemon", "status"]);
    assert_eq!(st["vms"], 0);
    let cfg = env.wick_json(&["config", "show"]);
    assert_eq!(cfg["vm_defaults"]["vcpu"]["value"], 2);
    assert_eq!(cfg["vm_defaults"]["vcpu"]["source"], "config");
    assert_eq!(cfg["vm_defaults"]["disk_mib"]["source"], "built_in");
    let text = env.wick_ok(&["config", "show"]);
    assert!(text.contains("config"), "{text}");

    let out = env.wick(&["doctor", "--json"]);
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = rep["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"database"), "{names:?}");
    assert!(names.contains(&"default image"), "{names:?}");
    assert!(checks.iter().any(|c| c["area"] == "vmm"), "{names:?}");
    let any_fail = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(
        out.status.success(),
        !any_fail,
        "doctor exits non-zero exactly on fail"
    );
}

#[test]
fn daemon_stop_keeps_vms_and_cli_autostarts_it() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let pid = vmm_pid(&vm(&env, "a1")).unwrap();
    env.wick_ok(&["daemon", "stop"]);
    let mut d = env.daemon.take().unwrap();
    let st = d.wait().unwrap();
    assert!(st.success(), "wickd exits cleanly on daemon stop");
    assert!(alive(pid), "VMs keep running");
    // Root CLI starts the daemon on demand, which re-adopts a1.
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "running");
    assert_eq!(vmm_pid(&a1), Some(pid));
    env.wick_ok(&["daemon", "stop"]);
    // wait for the autostarted daemon to go, so Drop's sweep is clean
    for _ in 0..100 {
        if !env.socket().exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn prune_deletes_only_non_running() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "up"]);
    env.wick_ok(&["vm", "create", "--name", "down", "--no-start"]);
    env.wick_ok(&["vm", "prune", "-f"]);
    let list = env.wick_json(&["vm", "list"]);
    let names: Vec<&str> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["up"]);
}

#[test]
fn many_refs_run_concurrently_and_report_in_order() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    for n in ["m1", "m2", "m3"] {
        env.wick_ok(&["vm", "create", "--name", n, "--no-start"]);
    }
    let out = env.wick(&["vm", "start", "m3", "nope", "m1"]);
    assert!(!out.status.success(), "one ref failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (p3, p1) = (stdout.find("m3"), stdout.find("m1"));
    assert!(
        p3.is_some() && p3 < p1,
        "reported in the order given: {stdout} / {stderr}"
    );
    assert!(stderr.contains("nope"), "{stderr}");
    assert_eq!(vm(&env, "m1")["state"], "running");
    assert_eq!(vm(&env, "m3")["state"], "running");
    env.wick_ok(&["vm", "set", "m2", "--vcpu", "2", "--memory", "1G"]);
    let m2 = vm(&env, "m2");
    assert_eq!(m2["spec"]["vcpu"], 2);
    assert_eq!(m2["spec"]["memory_mib"], 1024);
}

#[test]
fn stats_and_auto_stop_of_untouched_vms() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("auto_stop_stale_after = \"2s\"\nstats_poll_interval = \"200ms\"");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let (st, body) = http(&env.socket(), "GET", "/v1/vms/a1/stats", None);
    assert_eq!(st, 200, "{body}");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert!(s["rss_kib"].as_u64().unwrap() > 0, "{s}");
    let mut state = String::new();
    for _ in 0..100 {
        state = vm(&env, "a1")["state"].as_str().unwrap().to_string();
        if state == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(state, "stopped", "auto-stopped after 2 s untouched");
    assert!(env.vmm_processes().is_empty());
}

// ------------------------------------------------------------------ local users (issue #9)

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every path under the state, runtime and cache dirs with group/other permission bits, except
/// the API socket (0660, group nogroup) and its directory (0710, group nogroup: traversable).
/// Paths under the state, run and cache dirs that a local user could reach and read, write or
/// traverse: group/other bits on an entry whose every parent directory (from the root) lets
/// group or others through. Inside a 0700 VM dir (owned by its VMM's uid) nothing is reachable.
fn exposed(env: &WickdEnv) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    fn walk(
        p: &std::path::Path,
        reachable: bool,
        out: &mut Vec<(PathBuf, bool, std::fs::Metadata)>,
    ) {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return;
        };
        let dir = m.is_dir();
        let through = reachable && m.mode() & 0o011 != 0;
        out.push((p.to_path_buf(), reachable, m));
        if dir {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                walk(&e.path(), through, out);
            }
        }
    }
    let mut all = Vec::new();
    for d in ["state", "run", "cache"] {
        walk(&env.root().join(d), true, &mut all);
    }
    assert!(all.len() > 5, "walked {} paths", all.len());
    let run = env.root().join("run");
    // Contained VMMs (their own uids) must reach their VM dirs: these two get the search bit for
    // others, never the read bit (nobody can list them).
    let traversed = [env.root().join("state"), env.root().join("state/vms")];
    all.into_iter()
        .filter(|(_, reachable, m)| *reachable && !m.file_type().is_symlink())
        .filter_map(|(p, _, m)| {
            let mode = m.mode() & 0o7777;
            let ok = if p == env.socket() {
                mode & 0o777 == 0o660 && m.gid() == 65534
            } else if p == run {
                mode & 0o777 == 0o710 && m.gid() == 65534
            } else if traversed.contains(&p) {
                mode & 0o077 == 0o001
            } else {
                mode & 0o077 == 0
            };
            (!ok).then(|| format!("{} {mode:o} gid {}", p.display(), m.gid()))
        })
        .collect()
}

#[test]
fn state_is_private_to_root() {
    if !root() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut env = WickdEnv::for_local_users("", "");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "p1"]);
    let bad = exposed(&env);
    assert!(bad.is_empty(), "after create:\n{}", bad.join("\n"));

    // An older install: everything group/world readable. The next start fixes it.
    env.stop();
    let out = std::process::Command::new("chmod")
        .args(["-R", "go+rX"])
        .args(["state", "run", "cache"].map(|d| env.root().join(d)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(!exposed(&env).is_empty(), "the old install is exposed");
    env.start();
    let bad = exposed(&env);
    assert!(bad.is_empty(), "after restart:\n{}", bad.join("\n"));

    // The socket group reaches the socket (and only that).
    let out = env.wick_as_user(&["vm", "list", "--json"]);
    assert!(out.status.success(), "{}", out_text(&out));
    let out = env.wick_as_user(&["vm", "create", "--name", "u1"]);
    assert!(out.status.success(), "{}", out_text(&out));
    for (what, path) in [
        ("state dir", env.root().join("state")),
        ("run dir listing", env.root().join("run")),
    ] {
        let ls = std::process::Command::new("ls")
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!ls.status.success(), "nobody can list the {what}");
    }
    env.wick_ok(&["vm", "stop", "p1"]);
    env.wick_ok(&["vm", "create", "--name", "p2", "--no-start"]);
    env.wick_ok(&["vm", "delete", "p1"]);
    let bad = exposed(&env);
    assert!(
        bad.is_empty(),
        "after stop/create/delete:\n{}",
        bad.join("\n")
    );
}

#[test]
fn users_cannot_publish_privileged_ports_or_other_addresses() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::for_local_users("", "");
    env.start();
    let refused = |args: &[&str], want: &str| {
        let out = env.wick_as_user(args);
        let text = out_text(&out);
        assert!(!out.status.success(), "{args:?} must fail: {text}");
        assert!(text.contains(want), "{args:?}: want {want:?} in: {text}");
    };
    let create = ["vm", "create", "--no-start", "--name", "u1", "--publish"];
    refused(&[&create[..], &["80:8000"]].concat(), "privileged");
    refused(&[&create[..], &["1023:8000"]].concat(), "privileged");
    refused(
        &[&create[..], &["0.0.0.0:18080:8000"]].concat(),
        "not loopback",
    );
    let out = env.wick_as_user(&[&create[..], &["127.0.0.1:18080:8000"]].concat());
    assert!(out.status.success(), "{}", out_text(&out));
    refused(&["vm", "set", "u1", "--publish", "443:8000"], "privileged");
    refused(&["vm", "port-forward", "u1", "22:22"], "privileged");
    refused(
        &["vm", "port-forward", "u1", "0.0.0.0:18081:22"],
        "not loopback",
    );
    let out = env.wick_as_user(&["vm", "port-forward", "u1", "18081:22"]);
    assert!(out.status.success(), "{}", out_text(&out));
    // Root may do both.
    env.wick_ok(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        "r1",
        "--publish",
        "0.0.0.0:80:8000",
    ]);
}

#[test]
fn user_addresses_are_a_config_setting() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::for_local_users("user_publish_addresses = [\"0.0.0.0\"]", "");
    env.start();
    let out = env.wick_as_user(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        "u1",
        "--publish",
        "0.0.0.0:18080:80",
    ]);
    assert!(out.status.success(), "{}", out_text(&out));
    let out = env.wick_as_user(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        "u2",
        "--publish",
        "10.1.2.3:18081:80",
    ]);
    assert!(!out.status.success(), "{}", out_text(&out));
    // Root takes the address back: the VM does not start with it any more.
    env.stop();
    let cfg = env.root().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("user_publish_addresses", "# was")).unwrap();
    env.start();
    let out = env.wick_as_user(&["vm", "start", "u1"]);
    let text = out_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not loopback") && text.contains("--unpublish 18080"),
        "{text}"
    );
    let out = env.wick_as_user(&["vm", "set", "u1", "--unpublish", "18080"]);
    assert!(out.status.success(), "{}", out_text(&out));
    let out = env.wick_as_user(&["vm", "start", "u1"]);
    assert!(out.status.success(), "{}", out_text(&out));
}

#[test]
fn names_cannot_shadow_ids() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::for_local_users("", "");
    env.start();
    env.wick_ok(&["vm", "create", "--no-start", "--name", "victim"]);
    let id = vm(&env, "victim")["id"].as_str().unwrap().to_string();
    for name in [id.as_str(), &id[..12], &id[..4], "deadbeef"] {
        let out = env.wick_as_user(&["vm", "create", "--no-start", "--name", name]);
        let text = out_text(&out);
        assert!(!out.status.success(), "name {name}: {text}");
        assert!(text.contains("id prefix"), "name {name}: {text}");
        // The daemon refuses it too (not only the CLI).
        let body = format!("{{\"name\":\"{name}\",\"no_start\":true}}");
        let (status, text) = http(&env.socket(), "POST", "/v1/vms", Some(body.as_bytes()));
        assert_eq!(status, 400, "name {name}: {text}");
        assert!(text.contains("id prefix"), "{text}");
    }
    assert_eq!(vm(&env, &id)["name"], "victim");
    assert_eq!(vm(&env, &id[..12])["name"], "victim");
    assert_eq!(
        env.wick_json(&["vm", "list"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn per_user_limits() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::for_local_users(
        "[limits]\nmax_vms = 2\nmax_vcpus = 3\nmax_memory = \"1G\"\nmax_disk = \"3G\"",
        "",
    );
    env.start();
    let user = |args: &[&str]| env.wick_as_user(args);
    let ok = |args: &[&str]| {
        let out = user(args);
        assert!(out.status.success(), "{args:?}: {}", out_text(&out));
    };
    let refused = |args: &[&str], want: &[&str]| {
        let out = user(args);
        let text = out_text(&out);
        assert!(!out.status.success(), "{args:?} must fail: {text}");
        for w in want {
            assert!(text.contains(w), "{args:?}: want {w:?} in: {text}");
        }
    };
    let base = ["vm", "create", "--no-start", "--disk-size", "1G"];
    refused(
        &[&base[..], &["--name", "big", "--memory", "2G"]].concat(),
        &["max_memory", "1024", "2048"],
    );
    ok(&[
        &base[..],
        &["--name", "u1", "--memory", "512M", "--vcpu", "2"],
    ]
    .concat());
    refused(
        &[
            &base[..],
            &["--name", "u2", "--memory", "512M", "--vcpu", "2"],
        ]
        .concat(),
        &["max_vcpus", "use 2"],
    );
    refused(
        &[
            &base[..],
            &["--name", "u2", "--memory", "768M", "--vcpu", "1"],
        ]
        .concat(),
        &["max_memory", "use 512"],
    );
    refused(
        &[
            "vm",
            "create",
            "--no-start",
            "--disk-size",
            "3G",
            "--name",
            "u2",
            "--memory",
            "256M",
            "--vcpu",
            "1",
        ],
        &["max_disk"],
    );
    ok(&[
        &base[..],
        &["--name", "u2", "--memory", "512M", "--vcpu", "1"],
    ]
    .concat());
    refused(
        &[
            &base[..],
            &["--name", "u3", "--memory", "64M", "--vcpu", "1"],
        ]
        .concat(),
        &["max_vms", "use 2"],
    );
    // Spec changes are checked too.
    refused(&["vm", "set", "u2", "--memory", "1G"], &["max_memory"]);
    refused(&["vm", "set", "u2", "--vcpu", "2"], &["max_vcpus"]);
    ok(&["vm", "set", "u2", "--vcpu", "1", "--memory", "256M"]);
    // Deleting frees the quota; root is not limited.
    ok(&["vm", "delete", "u1"]);
    ok(&[
        &base[..],
        &["--name", "u3", "--memory", "512M", "--vcpu", "2"],
    ]
    .concat());
    // A lower limit in the config: usage over it blocks growth only.
    env.stop();
    let cfg = env.root().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("max_memory = \"1G\"", "max_memory = \"512M\""),
    )
    .unwrap();
    env.start();
    let user = |args: &[&str]| env.wick_as_user(args);
    let ok = |args: &[&str]| {
        let out = user(args);
        assert!(out.status.success(), "{args:?}: {}", out_text(&out));
    };
    ok(&["vm", "set", "u2", "--vcpu", "1"]);
    ok(&["vm", "set", "u2", "--memory", "128M"]);
    let out = user(&["vm", "set", "u2", "--memory", "300M"]);
    assert!(!out.status.success(), "{}", out_text(&out));
    assert!(out_text(&out).contains("max_memory"), "{}", out_text(&out));
    for i in 0..3 {
        env.wick_ok(&[
            "vm",
            "create",
            "--no-start",
            "--name",
            &format!("r{i}"),
            "--memory",
            "2G",
        ]);
    }
}

/// `wick doctor`'s default image line: the managed `default` pair prepared on first use is not a
/// warning; a default image that exists nowhere is.
#[test]
fn doctor_knows_the_managed_default_image() {
    if !root() {
        return;
    }
    let line = |env: &WickdEnv| -> Value {
        let out = env.wick(&["doctor", "--json"]);
        let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
        rep["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "default image")
            .cloned()
            .unwrap()
    };
    let mut env = WickdEnv::new("");
    let config = env.root().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[images.default]", "[images.custom]")).unwrap();
    env.start();
    let c = line(&env);
    assert_eq!(c["status"], "pass", "{c}");
    assert!(
        c["detail"].as_str().unwrap().contains("not prepared yet"),
        "{c}"
    );

    let mut env = WickdEnv::new("default_image_name = \"elsewhere\"");
    env.start();
    let c = line(&env);
    assert_eq!(c["status"], "warn", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("neither"), "{c}");
}
