//! Integration: a hostile guest. The fake Firecracker fronts `hostile-agent` (a test fake of
//! testkit that answers as a script says) instead of the real agent, and the real wickd and
//! `wick` talk to it: crafted archives for `vm cp VM:SRC DST` must not touch anything outside
//! DST nor keep setuid bits or device nodes, and escape sequences in guest text must never
//! reach the user's terminal raw. Needs root (the daemon is a root daemon); skipped otherwise.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use wick_testkit::cargo_bin;
use wick_testkit::hostile::{self, Answer, EntryKind, Script, TarEntry, SCRIPT_ENV};
use wick_testkit::inspect::{self, Snapshot};
use wick_testkit::wickd::WickdEnv;

const OSC_TITLE: &str = "\x1b]0;pwned\x07";
const CLEAR: &str = "\x1b[2J";

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!(
            "hostile_agent: needs root (wickd is a root daemon)"
        ));
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

fn snapshot(root: &Path) -> Snapshot {
    inspect::snapshot(root, None)
}

/// Every path below `dir` with its file type, for checking what an unpack created.
fn kinds(dir: &Path) -> Vec<(PathBuf, fs::FileType, u32)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, (mode, ..))| {
            let ft = p.symlink_metadata().unwrap().file_type();
            (p, ft, mode)
        })
        .collect()
}

#[test]
fn cp_from_a_hostile_guest_stays_inside_the_destination() {
    if !root() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("wkh")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    let script = t.join("script.json");
    let env = env_with_hostile_vm(&script);
    // The sentinel: a directory next to the destination that no archive may change.
    let sentinel = t.join("sentinel");
    fs::create_dir(&sentinel).unwrap();
    fs::write(sentinel.join("keep"), b"keep").unwrap();
    fs::set_permissions(sentinel.join("keep"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(&sentinel, fs::Permissions::from_mode(0o750)).unwrap();
    let s = |p: &Path| p.display().to_string();
    let sent = s(&sentinel);
    let keep = s(&sentinel.join("keep"));
    let before = snapshot(&sentinel);

    // (name, archive, must the copy be refused?)
    let cases: Vec<(&str, Vec<TarEntry>, bool)> = vec![
        (
            "symlink to a host dir, then a dir of that name (chmod through the link)",
            vec![
                TarEntry::symlink("x", &sent),
                TarEntry::dir("x").mode(0o777).mtime(12345),
            ],
            false,
        ),
        (
            "symlink to a host file, then a file of that name",
            vec![
                TarEntry::symlink("x", &keep),
                TarEntry::file("x", b"pwned").mode(0o777),
            ],
            false,
        ),
        (
            "a file below a symlink to a host dir",
            vec![
                TarEntry::dir("x"),
                TarEntry::symlink("x/l", &sent),
                TarEntry::file("x/l/planted", b"pwned"),
            ],
            true,
        ),
        (
            "`..` in a path",
            vec![
                TarEntry::dir("x"),
                TarEntry::file("x/../../sentinel/p", b"pwned"),
            ],
            true,
        ),
        (
            "an absolute path",
            vec![TarEntry::file(&format!("{sent}/planted"), b"pwned")],
            true,
        ),
        (
            "a hard link to an absolute host path",
            vec![TarEntry::dir("x"), TarEntry::hard_link("x/h", &keep)],
            true,
        ),
        (
            "a hard link with `..`",
            vec![
                TarEntry::dir("x"),
                TarEntry::hard_link("x/h", "x/../sentinel/keep"),
            ],
            true,
        ),
        (
            "a hard link to a host file inside DST that the archive did not create",
            vec![TarEntry::dir("x"), TarEntry::hard_link("x/h", "x/pre")],
            true,
        ),
    ];
    for (i, (what, entries, refused)) in cases.into_iter().enumerate() {
        let dst = t.join(format!("dst{i}"));
        fs::create_dir(&dst).unwrap();
        if what.contains("did not create") {
            fs::create_dir(dst.join("x")).unwrap();
            fs::write(dst.join("x/pre"), b"pre").unwrap();
        }
        Script::default()
            .on("get_files", Answer::Tar(entries))
            .write(&script)
            .unwrap();
        let out = env.wick(&["vm", "cp", "a1:/x", &format!("{}/", s(&dst))]);
        let err = text(&out.stderr);
        assert_eq!(
            snapshot(&sentinel),
            before,
            "{what}: the sentinel changed; {err}"
        );
        assert_no_raw_controls(what, &out);
        if refused {
            assert!(!out.status.success(), "{what}: accepted; {err}");
            assert!(err.contains("refusing"), "{what}: {err}");
        }
        if let Ok(m) = dst.join("x").symlink_metadata() {
            assert!(
                !m.file_type().is_symlink() || fs::read_link(dst.join("x")).unwrap() != sentinel,
                "{what}: x still links to the sentinel"
            );
        }
    }

    // Special bits are stripped (the rest of the mode kept); device nodes are not created.
    let dst = t.join("special");
    fs::create_dir(&dst).unwrap();
    Script::default()
        .on(
            "get_files",
            Answer::Tar(vec![
                TarEntry::dir("x").mode(0o2775),
                TarEntry::file("x/suid", b"#!/bin/sh\n").mode(0o4755),
                TarEntry::file("x/sgid", b"#!/bin/sh\n").mode(0o2711),
                TarEntry::dir("x/sticky").mode(0o1777),
                TarEntry::device("x/mem", EntryKind::CharDevice, 1, 1),
                TarEntry::device("x/disk", EntryKind::BlockDevice, 7, 0),
                TarEntry::device("x/fifo", EntryKind::Fifo, 0, 0),
            ]),
        )
        .write(&script)
        .unwrap();
    let out = env.wick(&["vm", "cp", "a1:/x", &format!("{}/", s(&dst))]);
    let err = text(&out.stderr);
    assert_no_raw_controls("special", &out);
    assert_eq!(snapshot(&sentinel), before, "special: the sentinel changed");
    let got = kinds(&dst.join("x"));
    for (p, ft, mode) in &got {
        use std::os::unix::fs::FileTypeExt;
        assert!(
            !(ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket()),
            "{} was created ({ft:?}); {err}",
            p.display()
        );
        assert_eq!(
            mode & 0o7000,
            0,
            "{} kept mode {mode:o}; {err}",
            p.display()
        );
    }
    assert!(out.status.success(), "{err}");
    let mode = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(
        [mode("x"), mode("x/suid"), mode("x/sgid"), mode("x/sticky")],
        [0o775, 0o755, 0o711, 0o777],
        "{err}"
    );
    assert!(
        err.contains("skipped"),
        "the skipped device nodes are named: {err}"
    );
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

    // The daemon's own errors carry guest text too (here: a failed boot-time configure).
    Script::default()
        .on(
            "configure",
            Answer::Error(format!("configure failed {evil}")),
        )
        .write(&script)
        .unwrap();
    let out = env.wick(&["vm", "create", "--name", "a2"]);
    assert_no_raw_controls("vm create", &out);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("configure failed \\x1b]0;pwned\\x07evil"),
        "{err}"
    );
}

/// `exec` started (`Reply Ok {pid}`), then `frames`, then the hostile agent closes.
fn exec_then(frames: Vec<hostile::RawFrame>) -> Answer {
    let started = hostile::RawFrame {
        kind: 2, // Reply
        payload: br#"{"Ok":{"pid":1}}"#.to_vec(),
        declared_len: None,
        repeat: 1,
    };
    Answer::Frames(std::iter::once(started).chain(frames).collect())
}

fn frame(kind: u8, payload: &[u8], declared_len: Option<u32>, repeat: u64) -> hostile::RawFrame {
    hostile::RawFrame {
        kind,
        payload: payload.to_vec(),
        declared_len,
        repeat,
    }
}

/// Broken frames (a length far over the limit, a frame cut short, an unknown kind) end `vm exec`
/// at once with an error naming the problem, and wickd keeps serving; endless output is streamed
/// through the CLI, whose memory stays flat.
#[test]
fn broken_and_endless_frames_end_in_clear_errors() {
    if !root() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("wkh")
        .tempdir_in("/tmp")
        .unwrap();
    let script = tmp.path().join("script.json");
    let env = env_with_hostile_vm(&script);
    let stdout_kind = 7;
    for (what, frames, want) in [
        (
            "oversized",
            vec![frame(stdout_kind, b"", Some(u32::MAX), 1)],
            "exceeds the limit",
        ),
        (
            "truncated",
            vec![frame(stdout_kind, b"0123456789", Some(100), 1)],
            "command's output",
        ),
        (
            "unknown kind",
            vec![frame(250, b"x", None, 1)],
            "unknown frame kind",
        ),
    ] {
        Script::default()
            .on("exec", exec_then(frames))
            .write(&script)
            .unwrap();
        let t = std::time::Instant::now();
        let out = env.wick(&["vm", "exec", "a1", "--", "true"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{what}: must fail: {err}");
        assert!(err.contains(want), "{what}: want {want:?} in: {err}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{what}: took {:?}",
            t.elapsed()
        );
        env.wick_ok(&["vm", "list"]);
    }

    // 64 MiB of output and no exit status: streamed to stdout as it comes, then an error.
    let chunk = vec![b'y'; 64 * 1024];
    Script::default()
        .on(
            "exec",
            exec_then(vec![frame(stdout_kind, &chunk, None, 1024)]),
        )
        .write(&script)
        .unwrap();
    let mut child = env
        .wick_cmd()
        .args(["vm", "exec", "a1", "--", "yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sampler = inspect::sample_peak_rss_kib(child.id());
    let mut stdout = child.stdout.take().unwrap();
    let copied = std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    let out = child.wait_with_output().unwrap();
    let peak_kib = sampler.join().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "no exit status, yet success: {err}");
    assert!(err.contains("exit status"), "{err}");
    assert_eq!(copied, 64 << 20, "every byte reaches stdout");
    assert!(
        peak_kib < 48 * 1024,
        "the CLI held {peak_kib} KiB for 64 MiB of streamed output"
    );
    eprintln!("endless output: 64 MiB streamed, CLI peak RSS {peak_kib} KiB");
}
