//! Integration: `wick vm snapshot` and `wick snapshot list|show|delete` through the real `wickd`
//! and `wick`, with the fake Firecracker fronting the real `wick-agent` (its `PUT
//! /snapshot/create` writes a state file of its own format and a sparse memory file), and the
//! crash drill: wickd killed at each snapshot failpoint leaves no partial snapshot and a source
//! VM that runs as before. Needs root (the daemon is a root daemon); skipped otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use wick_testkit::cargo_bin;
use wick_testkit::wickd::{WickdEnv, FAKE_AGENT_CONFIG};

mod fake_guest;
use fake_guest::{agent_env, exec_works, root, text, vm, vmm_state};

fn snapshots_dir(env: &WickdEnv) -> PathBuf {
    env.root().join("state/snapshots")
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Files named `snapshot-*` left in the VM's dir (the VMM's staged state).
fn staged(env: &WickdEnv, v: &Value) -> Vec<String> {
    let dir = env.root().join("state/vms").join(v["id"].as_str().unwrap());
    entries(&dir)
        .into_iter()
        .filter(|n| n.starts_with("snapshot-"))
        .collect()
}

#[test]
fn snapshot_list_show_delete_and_what_socket_users_see() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    exec_works(&env, "a1");

    let said = env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    assert!(said.contains("s1: ready"), "{said}");
    let s1 = env.wick_json(&["snapshot", "show", "s1"]);
    assert_eq!(s1["state"], "ready", "{s1}");
    assert_eq!(s1["source_vm_name"], "a1", "{s1}");
    assert_eq!(s1["vmm"], "firecracker", "{s1}");
    assert_eq!(s1["source_was_running"], true, "{s1}");
    assert!(s1["size_bytes"].as_u64().unwrap() > 0, "{s1}");
    // The test agent is not live: it refuses to freeze, and the snapshot says so.
    assert_eq!(s1["frozen"], false, "{s1}");
    let a1 = vm(&env, "a1");
    assert_eq!(s1["spec"], a1["spec"], "the source's spec is kept");

    // Its files: the VMM's state and memory, the root disk; root's alone.
    let dir = snapshots_dir(&env).join(s1["id"].as_str().unwrap());
    let mut files = entries(&dir);
    files.sort();
    for want in ["root.img", "vm.mem", "vm.vmstate"] {
        assert!(files.iter().any(|f| f == want), "{want} in {files:?}");
    }
    let m = std::fs::metadata(&dir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700), "{}", dir.display());
    for f in &files {
        let m = std::fs::symlink_metadata(dir.join(f)).unwrap();
        assert!(m.is_file(), "{f}");
        // State files are world-readable (a restore's VMM reads them through a hard link) but
        // reachable only through the root-only dir; disks are root's alone.
        let mode = if f.starts_with("vm.") { 0o644 } else { 0o600 };
        assert_eq!((m.uid(), m.mode() & 0o777), (0, mode), "{f}");
    }
    assert!(staged(&env, &a1).is_empty(), "{:?}", staged(&env, &a1));

    // The source runs on, as before.
    assert_eq!(a1["state"], "running", "{a1}");
    assert_eq!(vmm_state(&a1), "Running");
    exec_works(&env, "a1");

    // Names are unique; bad names and stopped VMs are refused by name.
    let out = env.wick(&["vm", "snapshot", "a1", "--name", "s1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("snapshot named \"s1\" already exists"),
        "{}",
        text(&out)
    );
    let out = env.wick(&["vm", "snapshot", "a1", "--name", "Bad_Name"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("snapshot name"), "{}", text(&out));

    // A paused VM is snapshotted and stays paused.
    env.wick_ok(&["vm", "pause", "a1"]);
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s2"]);
    let s2 = env.wick_json(&["snapshot", "show", "s2"]);
    assert_eq!(s2["source_was_running"], false, "{s2}");
    let a1 = vm(&env, "a1");
    assert_eq!(
        (a1["state"].as_str(), vmm_state(&a1).as_str()),
        (Some("paused"), "Paused")
    );
    env.wick_ok(&["vm", "resume", "a1"]);

    // Socket users see and touch only their own.
    let out = env.wick_as_user(&["snapshot", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["snapshots"], serde_json::json!([]), "{list}");
    for args in [
        &["snapshot", "show", "s1"][..],
        &["snapshot", "delete", "s1"][..],
        &["vm", "snapshot", "a1", "--name", "u1"][..],
    ] {
        let out = env.wick_as_user(args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("no "), "{args:?}: {}", text(&out));
    }

    let listed = env.wick_ok(&["snapshot", "list"]);
    assert!(listed.contains("s1") && listed.contains("s2"), "{listed}");
    env.wick_ok(&["snapshot", "delete", "s1", "s2"]);
    assert!(!dir.exists(), "the files went with the record");
    assert!(entries(&snapshots_dir(&env)).is_empty());
    let out = env.wick(&["snapshot", "show", "s1"]);
    assert!(
        text(&out).contains("no snapshot matches \"s1\""),
        "{}",
        text(&out)
    );
    exec_works(&env, "a1");
}

/// `kill -9 wickd` at each step of a snapshot: after the restart no snapshot record, directory
/// or staged state file remains, and the source VM is running (resumed if the snapshot had
/// paused it) with its agent answering.
#[test]
fn crash_drill_snapshot() {
    if !root() {
        return;
    }
    for point in [
        "snapshot-recorded",
        "snapshot-paused",
        "snapshot-state-saved",
        "snapshot-disks-cloned",
    ] {
        let mut env = agent_env(Some(point), "");
        env.wick_ok(&["vm", "create", "--name", "a1"]);
        let out = env.wick(&["vm", "snapshot", "a1", "--name", "s1"]);
        assert!(
            !out.status.success(),
            "{point}: the daemon died mid-snapshot"
        );
        env.kill9(); // reap the dead daemon
        env.env.retain(|(k, _)| k != "WICK_FAILPOINTS");
        env.start();
        let list = env.wick_json(&["snapshot", "list"]);
        assert_eq!(list["snapshots"], serde_json::json!([]), "{point}: {list}");
        assert!(
            entries(&snapshots_dir(&env)).is_empty(),
            "{point}: {:?}",
            entries(&snapshots_dir(&env))
        );
        let a1 = vm(&env, "a1");
        assert!(
            staged(&env, &a1).is_empty(),
            "{point}: {:?}",
            staged(&env, &a1)
        );
        assert_eq!(a1["state"], "running", "{point}: {a1}");
        assert_eq!(vmm_state(&a1), "Running", "{point}");
        exec_works(&env, "a1");
        // And a snapshot works now.
        env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
        assert_eq!(entries(&snapshots_dir(&env)).len(), 1, "{point}");
    }
}

/// A directory under `snapshots/` that no record names (a crash inside `snapshot delete`,
/// between the record and the files) is swept at start.
#[test]
fn unrecorded_snapshot_dirs_are_swept() {
    if !root() {
        return;
    }
    let mut env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    let stray = snapshots_dir(&env).join("0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("vm.mem"), b"guest memory").unwrap();
    env.stop();
    env.start();
    assert!(!stray.exists(), "swept");
    let s1 = env.wick_json(&["snapshot", "show", "s1"]);
    assert_eq!(s1["state"], "ready", "the recorded one stays: {s1}");
    assert!(snapshots_dir(&env)
        .join(s1["id"].as_str().unwrap())
        .is_dir());
}

/// A socket user snapshots their own VM, holds at most `[limits] max_snapshots`, and root sees
/// the snapshot as theirs.
#[test]
fn socket_users_snapshot_their_own_vms_within_their_limit() {
    if !root() {
        return;
    }
    let env = agent_env(None, "[limits]\nmax_snapshots = 1\n");
    let out = env.wick_as_user(&["vm", "create", "--name", "u1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "snapshot", "u1", "--name", "us1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "snapshot", "u1", "--name", "us2"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("max_snapshots = 1"), "{}", text(&out));
    let us1 = env.wick_json(&["snapshot", "show", "us1"]);
    assert_eq!(us1["owner"], 65534, "{us1}");
    // Root is not limited.
    env.wick_ok(&["vm", "snapshot", "u1", "--name", "rs1"]);
    env.wick_ok(&["vm", "snapshot", "u1", "--name", "rs2"]);
    let out = env.wick_as_user(&["snapshot", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["us1"], "{list}");
    let out = env.wick_as_user(&["snapshot", "delete", "us1"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A hostile guest's answers to `Freeze`/`Thaw` (wrong shapes, raw garbage frames) only make the
/// snapshot unfrozen: it still succeeds and the VM runs on. A guest claiming it froze is
/// believed for the `frozen` flag only (its own disks' cleanliness is its business).
#[test]
fn a_hostile_agent_cannot_break_a_snapshot() {
    use wick_testkit::hostile::{Answer, RawFrame, Script, SCRIPT_ENV};
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.json");
    let garbage = Answer::Frames(vec![RawFrame {
        kind: 2,
        payload: b"\x1b]0;owned\x07 not json".to_vec(),
        declared_len: Some(u32::MAX),
        repeat: 1,
    }]);
    Script::default()
        .on("freeze", Answer::Ok(serde_json::json!("not a list")))
        .on("thaw", garbage.clone())
        .write(&script)
        .unwrap();
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("hostile-agent").display().to_string(),
    ));
    env.env
        .push((SCRIPT_ENV.into(), script.display().to_string()));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);

    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    let s1 = env.wick_json(&["snapshot", "show", "s1"]);
    assert_eq!(
        (s1["state"].as_str(), s1["frozen"].as_bool()),
        (Some("ready"), Some(false))
    );

    Script::default()
        .on("freeze", garbage)
        .write(&script)
        .unwrap();
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s2"]);
    assert_eq!(env.wick_json(&["snapshot", "show", "s2"])["frozen"], false);

    Script::default()
        .on("freeze", Answer::Ok(serde_json::json!(["/"])))
        .write(&script)
        .unwrap();
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s3"]);
    assert_eq!(env.wick_json(&["snapshot", "show", "s3"])["frozen"], true);
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "running", "{a1}");
    assert_eq!(vmm_state(&a1), "Running");
}

/// A snapshot that fails after the guest was paused and its state saved (here: the root disk
/// cannot be read for the clone) leaves nothing behind — no record, no snapshot dir, no staged
/// state file — and the VM running, as it was; the error names what failed.
#[test]
fn a_failed_snapshot_leaves_nothing_and_the_vm_as_it_was() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    let a1 = vm(&env, "a1");
    let disk = PathBuf::from(a1["runtime"]["root_disk"].as_str().unwrap());
    let aside = disk.with_extension("aside");
    std::fs::rename(&disk, &aside).unwrap();
    let out = env.wick(&["vm", "snapshot", "a1", "--name", "s1"]);
    std::fs::rename(&aside, &disk).unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("cloning"), "{}", text(&out));
    let list = env.wick_json(&["snapshot", "list"]);
    assert_eq!(list["snapshots"], serde_json::json!([]), "{list}");
    assert!(entries(&snapshots_dir(&env)).is_empty());
    assert!(staged(&env, &a1).is_empty(), "{:?}", staged(&env, &a1));
    let a1 = vm(&env, "a1");
    assert_eq!(a1["state"], "running", "{a1}");
    assert_eq!(vmm_state(&a1), "Running");
    exec_works(&env, "a1");
    // The name is free again.
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
}
