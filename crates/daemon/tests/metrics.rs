//! `GET /metrics`: accepted by `promtool check metrics`, counters that move with creates and
//! deletes, and the optional `metrics_listen` TCP listener.

use std::io::Write;
use std::process::{Command, Stdio};

use wick_testkit::wickd::{http, WickdEnv};

fn scrape(env: &WickdEnv) -> String {
    let (status, body) = http(&env.socket(), "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series `name{labels}` (labels as printed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn promtool_accepts(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return wick_testkit::skip(
            "promtool (Debian package prometheus) is not installed: the format was not checked",
        );
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_are_valid_and_move_with_the_vms() {
    if !nix::unistd::geteuid().is_root() {
        return wick_testkit::skip("needs root");
    }
    let mut env = WickdEnv::new("metrics_listen = \"127.0.0.1:19464\"");
    env.start();

    let before = scrape(&env);
    promtool_accepts(&before);
    assert_eq!(
        value(&before, "wick_vms{state=\"running\"}"),
        Some(0.0),
        "{before}"
    );
    assert!(
        before.contains("wick_daemon_start_time_seconds "),
        "{before}"
    );

    env.wick_ok(&["vm", "create", "--name", "m1"]);
    let created = scrape(&env);
    promtool_accepts(&created);
    assert_eq!(
        value(&created, "wick_vms{state=\"running\"}"),
        Some(1.0),
        "{created}"
    );
    assert_eq!(
        value(
            &created,
            "wick_operations_total{kind=\"create\",result=\"succeeded\"}"
        ),
        Some(1.0),
        "{created}"
    );
    assert!(
        created.contains("wick_operation_stage_seconds_count{kind=\"create\",stage=\"boot\"}"),
        "{created}"
    );

    env.wick_ok(&["vm", "delete", "m1"]);
    let deleted = scrape(&env);
    assert_eq!(
        value(&deleted, "wick_vms{state=\"running\"}"),
        Some(0.0),
        "{deleted}"
    );
    assert_eq!(
        value(
            &deleted,
            "wick_operations_total{kind=\"delete\",result=\"succeeded\"}"
        ),
        Some(1.0),
        "{deleted}"
    );

    // The same text over plain HTTP on metrics_listen (inside the daemon's netns).
    let out = env
        .in_netns("python3".into())
        .args([
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:19464/metrics', timeout=10).read().decode())",
        ])
        .output()
        .unwrap();
    let tcp = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        value(
            &tcp,
            "wick_operations_total{kind=\"delete\",result=\"succeeded\"}"
        ),
        Some(1.0),
        "{tcp}"
    );
}
