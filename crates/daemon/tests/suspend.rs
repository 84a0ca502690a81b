//! Integration: `wick vm suspend` through the real `wickd` and `wick`, with the fake Firecracker
//! fronting the real `wick-agent` (its `PUT /snapshot/create` writes a state file of its own
//! format and a sparse memory file; `PUT /snapshot/load` loads them): a suspended VM has no
//! VMM process, no TAP, and its suspend image root's and read-only; start loads the image and
//! `vm exec` resumes a suspended VM by itself; stop discards the image; socket users suspend only their own
//! VMs; auto-stop can suspend; and the crash drill at each suspend failpoint. Needs root (the
//! daemon is a root daemon); skipped otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde_json::Value;
use wick_testkit::wickd::WickdEnv;

mod fake_guest;
use fake_guest::{agent_env, exec_works, root, text, vm};

fn vm_dir(env: &WickdEnv, v: &Value) -> PathBuf {
    env.root().join("state/vms").join(v["id"].as_str().unwrap())
}

/// The `suspend.*` files in the VM's dir.
fn image_files(env: &WickdEnv, v: &Value) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(vm_dir(env, v))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("suspend."))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The `wk-*` links (TAPs) in the daemon's network namespace.
fn taps(env: &WickdEnv) -> Vec<String> {
    let j: Value = serde_json::from_str(&env.ns_run("ip", &["-j", "link", "show"])).unwrap();
    j.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("wk-"))
        .map(str::to_string)
        .collect()
}

/// What a suspended VM holds: its state, no VMM (record or process), no TAP, and a sealed
/// image that `runtime.restore` names.
fn assert_suspended(env: &WickdEnv, name: &str) -> Value {
    let v = vm(env, name);
    assert_eq!(v["state"], "suspended", "{v}");
    assert!(v["runtime"]["vmm"].is_null(), "{v}");
    assert!(v["runtime"]["tap"].is_null(), "{v}");
    assert!(v["runtime"].get("suspending").is_none(), "complete: {v}");
    assert!(env.vmm_processes().is_empty(), "{:?}", env.vmm_processes());
    assert!(taps(env).is_empty(), "{:?}", taps(env));
    let r = &v["runtime"]["restore"];
    assert_eq!(r["new_identity"], false, "{v}");
    assert!(r.get("snapshot_id").is_none(), "{v}");
    let files: Vec<PathBuf> = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f.as_str().unwrap()))
        .collect();
    assert_eq!(
        image_files(env, &v),
        ["suspend.mem", "suspend.vmstate"],
        "Firecracker's state and memory"
    );
    assert_eq!(files.len(), 2, "{v}");
    for f in &files {
        assert_eq!(f.parent(), Some(vm_dir(env, &v).as_path()), "{v}");
        let m = std::fs::symlink_metadata(f).unwrap();
        assert!(m.is_file() && m.nlink() == 1, "{}", f.display());
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (0, 0, 0o644),
            "root's, read-only for the next VMM: {}",
            f.display()
        );
    }
    v
}

#[test]
fn suspend_frees_the_vmm_and_stop_discards_the_image() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    exec_works(&env, "a1");
    assert_eq!(taps(&env).len(), 1);
    let before = vm(&env, "a1");

    let said = env.wick_ok(&["vm", "suspend", "a1"]);
    assert!(said.contains("a1: suspended"), "{said}");
    let v = assert_suspended(&env, "a1");
    assert_eq!(
        v["runtime"]["ip"], before["runtime"]["ip"],
        "the IP lease stays"
    );
    assert_eq!(
        v["runtime"]["root_disk"], before["runtime"]["root_disk"],
        "the disks stay"
    );
    let listed = env.wick_ok(&["vm", "list"]);
    assert!(listed.contains("suspended"), "{listed}");

    // Suspending a suspended VM is a no-op; pause, resume, kill and prune refuse it.
    let said = env.wick_ok(&["vm", "suspend", "a1"]);
    assert!(said.contains("a1: suspended"), "{said}");
    for (args, want) in [
        (&["vm", "resume", "a1"][..], "wick vm start a1"),
        (&["vm", "pause", "a1"][..], "cannot pause it now"),
        (&["vm", "kill", "a1"][..], "not running"),
        (&["vm", "set", "a1", "--memory", "1G"][..], "saved state"),
    ] {
        let out = env.wick(args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    let out = env.wick(&["vm", "prune", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_suspended(&env, "a1");

    // Start loads the image: the guest continues (the fake's state file names its guest).
    let out = env.wick(&["vm", "start", "a1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("load state"), "{}", text(&out));
    let v = vm(&env, "a1");
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["runtime"].get("restore").is_none(), "{v}");
    assert!(
        image_files(&env, &v).is_empty(),
        "{:?}",
        image_files(&env, &v)
    );
    assert_eq!(
        v["runtime"]["ip"], before["runtime"]["ip"],
        "its own identity"
    );
    assert_eq!(taps(&env).len(), 1);
    exec_works(&env, "a1");

    // Any use resumes it: `vm exec` on a suspended VM starts it first and says so.
    env.wick_ok(&["vm", "suspend", "a1"]);
    assert_suspended(&env, "a1");
    let out = env.wick(&["vm", "exec", "a1", "--", "echo", "alive"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming suspended VM a1"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
    assert_eq!(vm(&env, "a1")["state"], "running");
    // `vm cp` too.
    env.wick_ok(&["vm", "suspend", "a1"]);
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("f"), b"copied").unwrap();
    let src = host.path().join("f").display().to_string();
    let out = env.wick(&["vm", "cp", &src, "a1:/root/f"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resuming suspended VM a1"),
        "{}",
        text(&out)
    );
    let out = env.wick(&["vm", "exec", "a1", "--", "cat", "/root/f"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "copied",
        "{}",
        text(&out)
    );

    // Stop discards the image: `stopped`, no file, no record of it.
    env.wick_ok(&["vm", "suspend", "a1"]);
    assert_suspended(&env, "a1");
    let said = env.wick_ok(&["vm", "stop", "a1"]);
    assert!(said.contains("a1: stopped"), "{said}");
    let v = vm(&env, "a1");
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(v["runtime"].get("restore").is_none(), "{v}");
    assert!(
        image_files(&env, &v).is_empty(),
        "{:?}",
        image_files(&env, &v)
    );
    // And a start boots it afresh.
    env.wick_ok(&["vm", "start", "a1"]);
    exec_works(&env, "a1");

    // A paused VM suspends too; delete removes a suspended VM with its image.
    env.wick_ok(&["vm", "pause", "a1"]);
    env.wick_ok(&["vm", "suspend", "a1"]);
    let v = assert_suspended(&env, "a1");
    env.wick_ok(&["vm", "delete", "a1"]);
    assert!(!vm_dir(&env, &v).exists());
    // A stopped VM cannot be suspended.
    env.wick_ok(&["vm", "create", "--name", "b1"]);
    env.wick_ok(&["vm", "stop", "b1"]);
    let out = env.wick(&["vm", "suspend", "b1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("VM b1 is stopped; cannot suspend it now"),
        "{}",
        text(&out)
    );
}

/// A suspend the VMM cannot finish (here: the VM dir refuses the image, so `PUT
/// /snapshot/create` fails) leaves the VM running as it was, with no image and no record of one.
#[test]
fn a_failed_suspend_leaves_the_vm_running() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let v = vm(&env, "a1");
    // A directory where the memory file goes: the VMM cannot create it.
    let blocker = vm_dir(&env, &v).join("suspend.mem");
    std::fs::create_dir(&blocker).unwrap();
    let out = env.wick(&["vm", "suspend", "a1"]);
    assert!(!out.status.success(), "{}", text(&out));
    let v = vm(&env, "a1");
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["runtime"].get("restore").is_none(), "{v}");
    assert!(v["runtime"].get("suspending").is_none(), "{v}");
    assert_eq!(
        image_files(&env, &v),
        ["suspend.mem"],
        "every file of the image was dropped (the blocking directory is the test's)"
    );
    std::fs::remove_dir(&blocker).unwrap();
    exec_works(&env, "a1");
    // And it suspends now.
    env.wick_ok(&["vm", "suspend", "a1"]);
    assert_suspended(&env, "a1");
}

/// A socket user suspends their own VMs and cannot see root's.
#[test]
fn socket_users_suspend_only_their_own_vms() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "theirs"]);
    let out = env.wick_as_user(&["vm", "create", "--name", "mine"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "suspend", "theirs"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no VM"), "{}", text(&out));
    assert_eq!(vm(&env, "theirs")["state"], "running");
    let out = env.wick_as_user(&["vm", "suspend", "mine"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(vm(&env, "mine")["state"], "suspended");
    exec_works(&env, "theirs");
}

/// `auto_stop_action = "suspend"`: an untouched VM is suspended, not stopped.
#[test]
fn auto_stop_can_suspend() {
    if !root() {
        return;
    }
    let env = agent_env(
        None,
        "auto_stop_stale_after = \"3s\"\nauto_stop_action = \"suspend\"\nstats_poll_interval = \"200ms\"",
    );
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let mut state = String::new();
    for _ in 0..150 {
        state = vm(&env, "a1")["state"].as_str().unwrap().to_string();
        if state == "suspended" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(state, "suspended", "auto-suspended after 3 s untouched");
    assert_suspended(&env, "a1");
    // And the next use resumes it.
    let out = env.wick(&["vm", "exec", "a1", "--", "echo", "alive"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resuming suspended VM a1"),
        "{}",
        text(&out)
    );
}

/// `kill -9 wickd` at each step of a suspend. Before the VMM is stopped the restart resumes the
/// guest and drops the image (`running`); once the VMM is stopped but the image not sealed, the
/// image is dropped and the VM released (`stopped`). Either way no image file, VMM or TAP is
/// left over, and the VM works.
#[test]
fn crash_drill_suspend() {
    if !root() {
        return;
    }
    for (point, after) in [
        ("suspend-recorded", "running"),
        ("suspend-saved", "running"),
        ("suspend-vmm-stopped", "stopped"),
    ] {
        let mut env = agent_env(Some(point), "");
        // As a socket user: root's CLI would autostart a daemon (without this test's fake
        // agent) once the killed one is gone.
        let out = env.wick_as_user(&["vm", "create", "--name", "a1"]);
        assert!(out.status.success(), "{}", text(&out));
        let out = env.wick_as_user(&["vm", "suspend", "a1"]);
        assert!(
            !out.status.success(),
            "{point}: the daemon died mid-suspend"
        );
        env.kill9(); // reap the dead daemon
        env.env.retain(|(k, _)| k != "WICK_FAILPOINTS");
        env.start();
        let v = vm(&env, "a1");
        assert_eq!(v["state"], after, "{point}: {v}");
        assert!(v["runtime"].get("restore").is_none(), "{point}: {v}");
        assert!(v["runtime"].get("suspending").is_none(), "{point}: {v}");
        assert!(
            image_files(&env, &v).is_empty(),
            "{point}: {:?}",
            image_files(&env, &v)
        );
        if after == "stopped" {
            assert!(env.vmm_processes().is_empty(), "{point}");
            assert!(taps(&env).is_empty(), "{point}: {:?}", taps(&env));
            env.wick_ok(&["vm", "start", "a1"]);
        } else {
            assert_eq!(env.vmm_processes().len(), 1, "{point}");
        }
        exec_works(&env, "a1");
        // And a suspend works now.
        env.wick_ok(&["vm", "suspend", "a1"]);
        assert_suspended(&env, "a1");
    }
}

/// With `contain_vmm` (the default): the VMM writes the image as its own uid; once suspended,
/// the image is root's 0644, nothing in the VM dir belongs to that uid any more, the uid
/// lease and the cgroup are gone, and the next VMM (a new uid) loads the image.
#[test]
fn a_contained_vmm_suspends_and_the_next_uid_loads_the_image() {
    if !root() {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "c1"]);
    let v = vm(&env, "c1");
    let uid = v["runtime"]["jail"]["uid"].as_u64().unwrap() as u32;
    env.wick_ok(&["vm", "suspend", "c1"]);
    let v = assert_suspended(&env, "c1");
    assert!(
        v["runtime"]["jail"].is_null(),
        "uid and cgroup released: {v}"
    );
    let left = wick_testkit::inspect::owned_by(&vm_dir(&env, &v), uid);
    assert!(left.is_empty(), "owned by the old VMM uid: {left:?}");
    let out = env.wick(&["vm", "start", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("load state"), "{}", text(&out));
    let v = vm(&env, "c1");
    assert_eq!(v["state"], "running", "{v}");
    assert!(
        image_files(&env, &v).is_empty(),
        "{:?}",
        image_files(&env, &v)
    );
    env.wick_ok(&["vm", "delete", "c1"]);
}

/// A wickd restart keeps a suspended VM suspended, its image readable for the next VMM (the
/// start-up hardening strips every group/other bit; reconcile seals the image again), and a
/// start after it loads the image.
#[test]
fn a_restart_keeps_a_suspended_vm_and_its_image() {
    if !root() {
        return;
    }
    let mut env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "suspend", "a1"]);
    assert_suspended(&env, "a1");
    env.stop();
    env.start();
    assert_suspended(&env, "a1");
    let out = env.wick(&["vm", "start", "a1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("load state"), "{}", text(&out));
    exec_works(&env, "a1");
}
