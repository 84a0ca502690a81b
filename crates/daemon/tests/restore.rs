//! Integration: `wick vm create --from-snapshot` and `wick vm fork` through the real `wickd` and
//! `wick`, with the fake Firecracker fronting the real `wick-agent` (its `/snapshot/load` opens
//! the drives the state names, relative to its working directory, as the real binary does, and
//! restarts the agent on the guest root kept in the memory file), and the crash drill: wickd
//! killed at each restore and fork failpoint leaves no VMM process, TAP, rule, disk, link,
//! transient snapshot or half-made VM. Needs root; skipped otherwise.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;

use serde_json::Value;
use wick_testkit::wickd::{http, WickdEnv};

mod fake_guest;
use fake_guest::{agent_env, exec_works, root, text, vm, vmm_state};

fn vm_names(env: &WickdEnv) -> Vec<String> {
    let list = env.wick_json(&["vm", "list"]);
    let mut names: Vec<String> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wick_links(env: &WickdEnv) -> Vec<String> {
    let j: Value = serde_json::from_str(&env.ns_run("ip", &["-j", "link", "show"])).unwrap();
    j.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("wk-"))
        .collect()
}

/// The `vm-<12 hex>` names in the firewall rules.
fn rule_vm_keys(env: &WickdEnv) -> HashSet<String> {
    let ns = env.netns.as_ref().unwrap();
    let all = ns.run("nft", &["list", "ruleset"]).unwrap_or_default();
    all.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter_map(|w| w.strip_prefix("vm-"))
        .map(|k| k.chars().take(12).collect())
        .collect()
}

/// The runtime facts every restored VM must have of its own.
fn identity(v: &Value) -> Vec<String> {
    let r = &v["runtime"];
    vec![
        v["id"].to_string(),
        r["guest_cid"].to_string(),
        r["tap"].to_string(),
        r["ip"].to_string(),
        r["host_keys"].to_string(),
        r["root_disk"].to_string(),
        r["vmm"]["api_socket"].to_string(),
    ]
}

fn assert_distinct(vms: &[&Value]) {
    for (i, a) in vms.iter().enumerate() {
        for b in &vms[i + 1..] {
            for (x, y) in identity(a).iter().zip(identity(b)) {
                assert!(x != &y || x == "null", "shared {x}: {a} / {b}");
            }
        }
    }
}

/// A restored VM is done loading: running, no `restore` left, no links in its dir.
fn assert_loaded(env: &WickdEnv, v: &Value) {
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["runtime"]["restore"].is_null(), "{v}");
    assert_eq!(vmm_state(v), "Running");
    let dir = env.root().join("state/vms").join(v["id"].as_str().unwrap());
    let links: Vec<String> = entries(&dir)
        .into_iter()
        .filter(|n| n.starts_with("restore."))
        .collect();
    assert!(links.is_empty(), "{links:?}");
}

#[test]
fn restore_and_fork_give_running_vms_with_their_own_identity() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    let s1 = env.wick_json(&["snapshot", "show", "s1"]);
    // The state files are root's and world-readable inside the root-only dir.
    let sdir = env
        .root()
        .join("state/snapshots")
        .join(s1["id"].as_str().unwrap());
    for f in ["vm.vmstate", "vm.mem"] {
        let m = std::fs::metadata(sdir.join(f)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777, m.nlink()), (0, 0o644, 1), "{f}");
    }

    let said = env.wick_ok(&["vm", "create", "--from-snapshot", "s1", "--name", "r1"]);
    assert!(said.contains("r1"), "{said}");
    let r1 = vm(&env, "r1");
    assert_loaded(&env, &r1);
    assert_eq!(r1["spec"]["memory_mib"], s1["spec"]["memory_mib"], "{r1}");
    exec_works(&env, "r1");
    // The links are gone again: the snapshot's files have one link each.
    for f in ["vm.vmstate", "vm.mem"] {
        assert_eq!(std::fs::metadata(sdir.join(f)).unwrap().nlink(), 1, "{f}");
    }

    // Forks: named NAME-1..K, each its own identity; the source runs on.
    let out = env.wick(&["vm", "fork", "a1", "--name", "f", "--count", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let (f1, f2) = (vm(&env, "f-1"), vm(&env, "f-2"));
    let a1 = vm(&env, "a1");
    for f in [&f1, &f2] {
        assert_loaded(&env, f);
    }
    assert_distinct(&[&a1, &r1, &f1, &f2]);
    for n in ["f-1", "f-2", "a1"] {
        exec_works(&env, n);
    }
    assert_eq!(a1["state"], "running", "{a1}");
    // A default name; the transient snapshot is gone once the forks loaded.
    env.wick_ok(&["vm", "fork", "a1"]);
    assert_loaded(&env, &vm(&env, "a1-fork-1"));
    let list = env.wick_json(&["snapshot", "list"]);
    let snaps: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(snaps, ["s1"], "{list}");

    // Deleting the source and the snapshot leaves the restored VMs working.
    env.wick_ok(&["vm", "delete", "a1"]);
    env.wick_ok(&["snapshot", "delete", "s1"]);
    for n in ["r1", "f-1", "f-2", "a1-fork-1"] {
        exec_works(&env, n);
    }
    // And they stop, start (a normal boot now) and delete like any VM.
    env.wick_ok(&["vm", "delete", "r1", "f-1", "f-2", "a1-fork-1"]);
    assert!(env.vmm_processes().is_empty());
    assert!(wick_links(&env).is_empty(), "{:?}", wick_links(&env));
}

#[test]
fn flags_the_snapshot_decides_are_refused() {
    if !root() {
        return;
    }
    let env = agent_env(None, "");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    for flag in [&["--vcpu", "2"][..], &["--memory", "1G"], &["--image", "x"]] {
        let mut args = vec!["vm", "create", "--from-snapshot", "s1"];
        args.extend_from_slice(flag);
        let out = env.wick(&args);
        assert!(!out.status.success(), "{flag:?}");
        assert!(
            text(&out).contains(&format!(
                "{} cannot be combined with --from-snapshot",
                flag[0]
            )),
            "{}",
            text(&out)
        );
    }
    // The daemon refuses them too (another client).
    let body = br#"{"from_snapshot": "s1", "disk_size": "4G", "no_start": true}"#;
    let (code, answer) = http(&env.socket(), "POST", "/v1/vms", Some(body));
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("--disk-size, --no-start cannot be combined"),
        "{answer}"
    );
    let out = env.wick(&["vm", "create", "--from-snapshot", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no snapshot matches"), "{}", text(&out));
    let out = env.wick(&["vm", "fork", "a1", "--count", "0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--count 0"), "{}", text(&out));
    assert_eq!(vm_names(&env), ["a1"]);
}

#[test]
fn socket_users_restore_and_fork_only_their_own_within_their_limits() {
    if !root() {
        return;
    }
    let env = agent_env(None, "[limits]\nmax_vms = 2\n");
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    for args in [
        &["vm", "create", "--from-snapshot", "s1"][..],
        &["vm", "fork", "a1"][..],
    ] {
        let out = env.wick_as_user(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out).contains("no "), "{args:?}: {}", text(&out));
    }
    let out = env.wick_as_user(&["vm", "create", "--name", "u1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "fork", "u1", "--count", "2"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("max_vms"), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "fork", "u1", "--name", "uf"]);
    assert!(out.status.success(), "{}", text(&out));
    let uf = vm(&env, "uf");
    assert_eq!(uf["owner"], 65534, "{uf}");
    assert_loaded(&env, &uf);
    assert_eq!(vm_names(&env), ["a1", "u1", "uf"]);
    // Their own snapshot, then no room for a restore.
    let out = env.wick_as_user(&["vm", "snapshot", "u1", "--name", "us1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.wick_as_user(&["vm", "create", "--from-snapshot", "us1"]);
    assert!(text(&out).contains("max_vms"), "{}", text(&out));
    // Root may restore anyone's.
    env.wick_ok(&["vm", "create", "--from-snapshot", "us1", "--name", "r1"]);
    assert_eq!(vm(&env, "r1")["owner"], 0);
}

/// `wick ARGS` that does not start a wickd itself when the daemon dies under it (the socket
/// is named through a symlink, which the CLI does not autostart for): the test restarts the
/// daemon, with its environment.
fn wick_no_autostart(env: &WickdEnv, args: &[&str]) -> Output {
    let link = env.root().join("wickd.sock.link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env.socket(), &link).unwrap();
    let out = env
        .wick_cmd()
        .env("WICK_SOCKET", &link)
        .args(args)
        .output()
        .expect("run wick");
    std::fs::remove_file(&link).unwrap();
    out
}

/// What the crash drill checks after the restart: only `keep`'s VMs, VMM processes, TAPs, rules
/// and VM dirs remain, no restore link and no snapshot but `snaps`.
fn assert_only(env: &WickdEnv, point: &str, keep: &[&str], snaps: &[&str]) {
    assert_eq!(vm_names(env), keep, "{point}");
    let kept: Vec<Value> = keep.iter().map(|n| vm(env, n)).collect();
    let ids: Vec<String> = kept
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        entries(&env.root().join("state/vms")),
        {
            let mut i = ids.clone();
            i.sort();
            i
        },
        "{point}: VM dirs"
    );
    assert_eq!(
        env.vmm_processes().len(),
        keep.len(),
        "{point}: VMM processes"
    );
    assert_eq!(
        wick_links(env).len(),
        keep.len(),
        "{point}: {:?}",
        wick_links(env)
    );
    let keys: HashSet<String> = ids.iter().map(|i| i[..12].to_string()).collect();
    let rules = rule_vm_keys(env);
    assert!(rules.is_subset(&keys), "{point}: rules of {rules:?}");
    let list = env.wick_json(&["snapshot", "list"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, snaps, "{point}: {list}");
    assert_eq!(
        entries(&env.root().join("state/snapshots")).len(),
        snaps.len(),
        "{point}"
    );
}

/// `kill -9 wickd` at each step of a restore and of a fork: after the restart no half-made VM,
/// VMM process, TAP, rule, disk, link or transient snapshot remains; the snapshot's files keep
/// their mode, and a restore works then.
#[test]
fn crash_drill_restore_and_fork() {
    if !root() {
        return;
    }
    for point in [
        "restore-recorded",
        "restore-linked",
        "restore-loaded",
        "fork-snapshotted",
    ] {
        eprintln!("crash drill: {point}");
        let mut env = agent_env(Some(point), "");
        env.wick_ok(&["vm", "create", "--name", "a1"]);
        env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
        let out = match point {
            "fork-snapshotted" => wick_no_autostart(&env, &["vm", "fork", "a1", "--count", "2"]),
            _ => wick_no_autostart(
                &env,
                &["vm", "create", "--from-snapshot", "s1", "--name", "r1"],
            ),
        };
        assert!(
            !out.status.success(),
            "{point}: the daemon died mid-restore"
        );
        env.kill9(); // reap the dead daemon
        env.env.retain(|(k, _)| k != "WICK_FAILPOINTS");
        env.start();
        assert_only(&env, point, &["a1"], &["s1"]);
        let s1 = env.wick_json(&["snapshot", "show", "s1"]);
        let sdir = env
            .root()
            .join("state/snapshots")
            .join(s1["id"].as_str().unwrap());
        let m = std::fs::metadata(sdir.join("vm.mem")).unwrap();
        assert_eq!((m.mode() & 0o777, m.nlink()), (0o644, 1), "{point}");
        exec_works(&env, "a1");
        let out = env.wick(&["vm", "create", "--from-snapshot", "s1", "--name", "r1"]);
        if !out.status.success() {
            let logs = env.wick(&["vm", "logs", "r1"]);
            panic!(
                "{point}: {}\n{}\n{}",
                text(&out),
                text(&logs),
                env.daemon_log()
            );
        }
        exec_works(&env, "r1");
        env.wick_ok(&["vm", "fork", "a1", "--name", "f"]);
        exec_works(&env, "f");
    }
}
