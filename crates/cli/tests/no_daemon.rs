//! The `wick` binary without a daemon: commands that never autostart must fail (or succeed)
//! with a clear message, and bad input must be refused before any connection is attempted.

use std::path::Path;
use std::process::{Command, Output};

fn wick(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .env("WICK_ROOT", root)
        .env("WICK_SOCKET", root.join("run/missing.sock"))
        .output()
        .expect("run wick")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn daemon_status_without_daemon_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let o = wick(dir.path(), &["daemon", "status"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    let sock = dir.path().join("run/missing.sock");
    assert!(
        err.starts_with("error: wickd is not reachable at "),
        "{err}"
    );
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("sudo wickd --root"), "{err}");
    assert!(o.stdout.is_empty());
    // Nothing was started: no daemon log appeared.
    assert!(!dir.path().join("run/wickd.log").exists());
}

#[test]
fn daemon_stop_without_daemon_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let o = wick(dir.path(), &["daemon", "stop"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("wickd is not running"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn version_without_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let o = wick(dir.path(), &["version", "--json"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["client"], env!("CARGO_PKG_VERSION"));
    assert!(v["daemon"].is_null());
}

#[test]
fn bad_input_is_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    for (args, msg) in [
        (
            &["vm", "create", "--vcpu", "0"][..],
            "error: --vcpu must be at least 1 (got 0)",
        ),
        (
            &["vm", "create", "--memory", "lots"][..],
            "error: --memory: invalid size \"lots\"",
        ),
        (
            &["vm", "create", "--name", "-bad"][..],
            "error: VM name \"-bad\" must not start or end",
        ),
        (&["vm", "set", "a1"][..], "error: nothing to change"),
        (&["vm", "prune"][..], "pass -f/--force"),
    ] {
        let o = wick(dir.path(), args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(
            !err.contains("not reachable"),
            "{args:?} connected first: {err}"
        );
    }
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let o = wick(dir.path(), &["vm", "frobnicate"]);
    assert_eq!(o.status.code(), Some(1));
    let o = wick(dir.path(), &["vm", "create", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stdout).contains("[vm_defaults]"));
    let o = wick(dir.path(), &["completion", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stdout).contains("_wick"));
}
