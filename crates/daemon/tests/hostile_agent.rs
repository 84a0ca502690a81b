//! Integration: a hostile guest. The fake Firecracker fronts `hostile-agent` (a test fake of
//! testkit that answers as a script says) instead of the real agent, and the real wickd and
//! `wick` talk to it: escape sequences in guest text must never reach the user's terminal raw. Needs root (the daemon is a root daemon); skipped otherwise.

use std::path::Path;
use std::process::Output;

use wick_testkit::cargo_bin;
use wick_testkit::hostile::{self, Answer, Script, SCRIPT_ENV};
use wick_testkit::wickd::WickdEnv;

const OSC_TITLE: &str = "\x1b]0;pwned\x07";
const CLEAR: &str = "\x1b[2J";

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIP: hostile_agent: needs root (wickd is a root daemon)");
        false
    }
}

/// A daemon whose VM `a1` runs the hostile agent, reading its script from `script`.
fn env_with_hostile_vm(script: &Path) -> WickdEnv {
    Script::default().write(script).unwrap();
    let mut env = WickdEnv::new_with_image_extra("", "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("hostile-agent").display().to_string(),
    ));
    env.env
        .push((SCRIPT_ENV.into(), script.display().to_string()));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails when raw control characters (ESC, BEL, CSI...) reach the terminal.
fn assert_no_raw_controls(what: &str, out: &Output) {
    for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let s = text(bytes);
        let bad = s
            .chars()
            .find(|c| c.is_control() && *c != '\n' && *c != '\t');
        assert!(
            bad.is_none(),
            "{what}: raw control character {bad:?} on {stream}: {s:?}"
        );
    }
}

#[test]
fn guest_text_reaches_the_terminal_escaped() {
    if !root() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("wkh")
        .tempdir_in("/tmp")
        .unwrap();
    let script = tmp.path().join("script.json");
    let env = env_with_hostile_vm(&script);
    let evil = format!("{OSC_TITLE}evil{CLEAR}\r\u{9b}2J");
    Script::default()
        .on("exec", Answer::Error(format!("no such command {evil}")))
        .on("get_files", Answer::Error(format!("cannot read {evil}")))
        .on("ports", Answer::Ok(hostile::ports(8080, &evil)))
        .on("health", Answer::Ok(hostile::health(&evil, &evil)))
        .write(&script)
        .unwrap();
    let dst = tmp.path().join("dst");
    let s = dst.display().to_string();
    for args in [
        vec!["vm", "exec", "a1", "--", "true"],
        vec!["vm", "cp", "a1:/x", &s],
        vec!["vm", "ports", "a1"],
        vec!["vm", "health", "a1"],
    ] {
        let out = env.wick(&args);
        assert_no_raw_controls(&args.join(" "), &out);
        let all = text(&out.stdout) + &text(&out.stderr);
        // The text is still shown, visibly escaped.
        assert!(all.contains("evil"), "{args:?}: {all}");
        assert!(all.contains("\\x1b]0;pwned\\x07"), "{args:?}: {all}");
    }
    // JSON output escapes by itself and keeps the exact guest string.
    let ports = env.wick_json(&["vm", "ports", "a1"]);
    assert_eq!(ports["ports"][0]["process"], evil.as_str());
}
