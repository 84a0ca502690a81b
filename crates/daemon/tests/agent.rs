//! Integration: the guest agent through wickd. The fake Firecracker runs a real `wick-agent`
//! (`FAKE_FC_AGENT_BIN`; the "guest" is this host inside the daemon's private netns, running
//! only harmless commands in temp dirs), so `wick vm exec|cp|ports|health|stats|ssh` exercise
//! the whole path: CLI → `POST /v1/vms/{vm}/agent` upgrade → wickd's hybrid vsock CONNECT →
//! agent. Needs root (the daemon is a root daemon); skipped otherwise.
//!
//! `agent_bench` (ignored; run with `-- --ignored --nocapture agent_bench`) prints exec round
//! trips and `vm cp` throughput through the daemon.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::cargo_bin;
use wick_testkit::wickd::{WickdEnv, FAKE_AGENT_CONFIG};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A daemon whose `default` image runs the agent, and a running VM `a1`. Returns the env and
/// the `vm create` output.
fn env_with_vm() -> (WickdEnv, Output) {
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();
    let out = env.wick(&["vm", "create", "--name", "a1"]);
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    (env, out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// `wick ARGS` with `input` on stdin.
fn wick_stdin(env: &WickdEnv, args: &[&str], input: &[u8]) -> Output {
    let mut child = env
        .wick_cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wick");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn create_waits_for_and_configures_the_agent() {
    if !root() {
        return;
    }
    let (env, out) = env_with_vm();
    let stderr = text(&out.stderr);
    for stage in ["stage: wait for agent", "stage: configure guest"] {
        assert!(stderr.contains(stage), "{stage}: {stderr}");
    }
    let a1 = env.wick_json(&["vm", "show", "a1"]);
    assert_eq!(a1["state"], "running", "{a1}");
    let vsock = PathBuf::from(a1["runtime"]["vmm"]["vsock_socket"].as_str().unwrap());
    let guest_root = vsock.parent().unwrap().join("guest-root");
    let hostname = fs::read_to_string(guest_root.join("etc/hostname")).unwrap();
    assert_eq!(hostname.trim(), "a1");
    if have("ssh-keygen") {
        let pubkey = fs::read_to_string(env.root().join("id_ed25519.pub")).unwrap();
        let keys = fs::read_to_string(guest_root.join("root/.ssh/authorized_keys")).unwrap();
        assert!(keys.contains(pubkey.trim()), "{keys}");
        let host_keys = a1["runtime"]["host_keys"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!host_keys.is_empty(), "host keys recorded: {a1}");
    }

    // `vm ssh` pins the recorded host keys before running OpenSSH (which cannot reach a fake
    // guest: its failure, 255, is passed through).
    let kh = env.root().join("known_hosts");
    fs::write(
        &kh,
        "a1.vm ssh-ed25519 AAAAstale\nother.vm ssh-ed25519 AAAAkeep\n",
    )
    .unwrap();
    if have("ssh") && have("ssh-keygen") {
        let out = env.wick(&["vm", "ssh", "a1", "--", "true"]);
        assert_eq!(code(&out), Some(255), "{}", text(&out.stderr));
        let pinned = fs::read_to_string(&kh).unwrap();
        assert!(!pinned.contains("AAAAstale"), "{pinned}");
        assert!(pinned.contains("other.vm ssh-ed25519 AAAAkeep"), "{pinned}");
        assert!(pinned.contains("a1.vm ssh-ed25519 AAAA"), "{pinned}");
    }

    // Delete forgets the VM's known_hosts entries, and only those.
    env.wick_ok(&["vm", "delete", "a1"]);
    let left = fs::read_to_string(&kh).unwrap();
    assert!(!left.contains("a1.vm"), "{left}");
    assert!(left.contains("other.vm"), "{left}");
    assert!(env.vmm_processes().is_empty());
    assert!(
        !env.processes()
            .iter()
            .any(|p| fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| text(&c).contains("wick-agent"))
                .unwrap_or(false)),
        "the fake guest's agent died with its VMM"
    );
}

#[test]
fn exec_codes_streams_stdin_and_tty() {
    if !root() {
        return;
    }
    let (env, _) = env_with_vm();
    let out = env.wick(&["vm", "exec", "a1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&out), Some(7), "{}", text(&out.stderr));

    let out = env.wick(&[
        "vm",
        "exec",
        "a1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2",
    ]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let out = env.wick(&["vm", "exec", "a1", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&out), Some(128 + 9));

    let out = wick_stdin(
        &env,
        &["vm", "exec", "-i", "a1", "--", "sh", "-c", "cat; echo done"],
        b"hello\n",
    );
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\ndone\n");
    // Without -i the command's stdin is empty.
    let out = wick_stdin(&env, &["vm", "exec", "a1", "--", "cat"], b"ignored");
    assert_eq!((code(&out), text(&out.stdout)), (Some(0), String::new()));

    let out = env.wick(&[
        "vm",
        "exec",
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp",
        "a1",
        "--",
        "sh",
        "-c",
        "echo \"$FOO\"; pwd",
    ]);
    assert_eq!(
        text(&out.stdout),
        "bar baz\n/tmp\n",
        "{}",
        text(&out.stderr)
    );

    let out = env.wick(&[
        "vm",
        "exec",
        "-t",
        "a1",
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo tty",
    ]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim_end(), "tty");

    // Usage errors: no command, or a command without `--`.
    for args in [&["vm", "exec", "a1"][..], &["vm", "exec", "a1", "ls"]] {
        let out = env.wick(args);
        assert_eq!(code(&out), Some(1), "{args:?}");
        assert!(text(&out.stderr).contains("Usage"), "{}", text(&out.stderr));
    }
    // Daemon errors print like any API error.
    let out = env.wick(&["vm", "exec", "nosuch", "--", "true"]);
    assert_eq!(code(&out), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("nosuch"),
        "{err}"
    );
    env.wick_ok(&["vm", "stop", "a1"]);
    let out = env.wick(&["vm", "exec", "a1", "--", "true"]);
    assert_eq!(code(&out), Some(1));
    assert!(
        text(&out.stderr).contains("not running"),
        "{}",
        text(&out.stderr)
    );
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/empty")).unwrap();
    fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    let bin: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("sub/blob.bin"), bin).unwrap();
    fs::write(root.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    symlink("../a.txt", root.join("sub/link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
}

/// Path → (kind, mode, contents or link target) for every entry below `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            let m = path.symlink_metadata().unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = fs::read_link(&path).unwrap();
                out.insert(rel, ('l', 0, t.display().to_string().into_bytes()));
            } else if m.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                walk(base, &path, out);
            } else {
                out.insert(rel, ('f', mode, fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn cp_round_trips_a_directory() {
    if !root() {
        return;
    }
    let (env, _) = env_with_vm();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let guest = tmp.path().join("guest");
    let back = tmp.path().join("back");
    fs::create_dir(&back).unwrap();
    let s = |p: &Path| p.display().to_string();

    // Host → guest into a directory that does not exist yet (trailing slash): guest/src.
    let out = env.wick(&["vm", "cp", &s(&src), &format!("a1:{}/", s(&guest))]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(snapshot(&guest.join("src")), snapshot(&src));
    // Guest → host into an existing directory: back/src.
    let out = env.wick(&[
        "vm",
        "cp",
        &format!("a1:{}", s(&guest.join("src"))),
        &s(&back),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(snapshot(&back.join("src")), snapshot(&src));
    // As a new name, both ways.
    env.wick_ok(&[
        "vm",
        "cp",
        &s(&src),
        &format!("a1:{}", s(&guest.join("copy2"))),
    ]);
    assert_eq!(snapshot(&guest.join("copy2")), snapshot(&src));
    env.wick_ok(&[
        "vm",
        "cp",
        &format!("a1:{}", s(&src.join("sub/blob.bin"))),
        &s(&back.join("blob2")),
    ]);
    assert_eq!(
        fs::read(back.join("blob2")).unwrap(),
        fs::read(src.join("sub/blob.bin")).unwrap()
    );

    // Errors: VM:PATH on both sides or neither; a missing guest path; a missing host path.
    let out = env.wick(&["vm", "cp", "a1:/x", "a1:/y"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("both"),
        "{}",
        text(&out.stderr)
    );
    let out = env.wick(&["vm", "cp", "/x", "/y"]);
    assert!(
        text(&out.stderr).contains("VM:PATH"),
        "{}",
        text(&out.stderr)
    );
    let out = env.wick(&["vm", "cp", "a1:/nonexistent/wick-test", &s(&back)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/wick-test"),
        "{}",
        text(&out.stderr)
    );
    let out = env.wick(&["vm", "cp", &s(&tmp.path().join("nope")), "a1:/tmp"]);
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ports_health_and_stats() {
    if !root() {
        return;
    }
    let (env, _) = env_with_vm();
    let health = env.wick_json(&["vm", "health", "a1"]);
    assert_eq!(
        health["boot_id"].as_str().map(str::len),
        Some(36),
        "{health}"
    );
    assert!(health["uptime_secs"].as_f64().unwrap() > 0.0);
    assert!(health["mem_total_bytes"].as_u64().unwrap() > 0);
    let human = env.wick_ok(&["vm", "health", "a1"]);
    assert!(
        human.contains("boot id") && human.contains("uptime"),
        "{human}"
    );

    let stats = env.wick_json(&["vm", "stats", "a1"]);
    assert_eq!(stats["name"], "a1", "{stats}");
    assert_eq!(stats["state"], "running", "{stats}");
    assert!(stats["vcpu"].as_u64().unwrap() >= 1);
    assert!(env.wick_ok(&["vm", "stats", "a1"]).contains("vcpu"));

    let ports = env.wick_json(&["vm", "ports", "a1"]);
    assert_eq!(ports["vm"], "a1");
    assert!(ports["ports"].is_array(), "{ports}");
    if !have("python3") {
        wick_testkit::skip(format_args!(
            "python3 missing: listener part of ports_health_and_stats skipped"
        ));
        return;
    }
    // A listener in the fake guest, through a background exec (the daemon's netns is empty,
    // so any port is free there).
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut server = env
        .wick_cmd()
        .args([
            "vm",
            "exec",
            "a1",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
        ])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let find = |ports: &Value| {
        ports["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == port)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        if let Some(r) = find(&env.wick_json(&["vm", "ports", "a1"])) {
            break r;
        }
        assert!(Instant::now() < deadline, "port {port} never showed up");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["endpoint"], format!("a1.vm:{port}"), "{row}");
    assert_eq!(row["address"], "0.0.0.0", "{row}");
    assert!(
        row["process"].as_str().unwrap_or("").contains("python"),
        "{row}"
    );
    let table = env.wick_ok(&["vm", "ports", "a1"]);
    assert!(table.contains(&format!("a1.vm:{port}")), "{table}");
    // Killing the exec client closes its agent connection, which kills the guest process.
    let _ = server.kill();
    let _ = server.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while find(&env.wick_json(&["vm", "ports", "a1"])).is_some() {
        assert!(
            Instant::now() < deadline,
            "the server outlived its exec session"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints exec round-trip latency and `vm cp` throughput through the daemon (numbers for the
/// report, never asserted).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn agent_bench() {
    if !root() {
        return;
    }
    let (env, _) = env_with_vm();
    let n = 30;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        env.wick_ok(&["vm", "exec", "a1", "--", "true"]);
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "wick vm exec -- true (whole CLI process, via ip netns exec): p50 {:.1} ms, p90 {:.1} ms, min {:.1} ms",
        ms(times[n / 2]),
        ms(times[n * 9 / 10]),
        ms(times[0])
    );
    let mut base = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        env.wick_ok(&["vm", "show", "a1"]);
        base.push(t.elapsed());
    }
    base.sort();
    println!(
        "baseline wick vm show (one plain API call, same process overhead): p50 {:.1} ms",
        ms(base[n / 2])
    );

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    fs::create_dir(&src).unwrap();
    let chunk: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for i in 0..25 {
        fs::write(src.join(format!("f{i:02}.bin")), &chunk).unwrap();
    }
    let mib = 100.0;
    let guest = tmp.path().join("guest");
    let t = Instant::now();
    env.wick_ok(&[
        "vm",
        "cp",
        &src.display().to_string(),
        &format!("a1:{}/", guest.display()),
    ]);
    let up = t.elapsed();
    let back = tmp.path().join("back");
    fs::create_dir(&back).unwrap();
    let t = Instant::now();
    env.wick_ok(&[
        "vm",
        "cp",
        &format!("a1:{}", guest.join("data").display()),
        &back.display().to_string(),
    ]);
    let down = t.elapsed();
    println!(
        "vm cp 100 MiB dir (25 x 4 MiB) host->guest: {:.2} s ({:.0} MiB/s); guest->host: {:.2} s ({:.0} MiB/s)",
        up.as_secs_f64(),
        mib / up.as_secs_f64(),
        down.as_secs_f64(),
        mib / down.as_secs_f64()
    );
}

/// `[[file_sync]]` files reach a VM only as far as its owner may read them: a non-root user's
/// VM gets the world-readable file, not root's secret (directly or through a symlink).
#[test]
fn file_sync_reads_with_the_owners_rights() {
    if !root() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("wksync")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let public = dir.path().join("public");
    fs::write(&public, b"for everyone").unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
    let secret = dir.path().join("secret");
    fs::write(&secret, b"root only").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link");
    symlink(&secret, &link).unwrap();
    let sync = [("public", &public), ("secret", &secret), ("link", &link)]
        .iter()
        .map(|(g, h)| format!("[[file_sync]]\nhost = {h:?}\nguest = \"/root/{g}\"\n"))
        .collect::<String>();
    let mut env =
        WickdEnv::for_local_users(&format!("{FAKE_AGENT_CONFIG}\n{sync}"), "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();
    let guest_root = |name: &str| {
        let v = env.wick_json(&["vm", "show", name]);
        let vsock = PathBuf::from(v["runtime"]["vmm"]["vsock_socket"].as_str().unwrap());
        vsock.parent().unwrap().join("guest-root/root")
    };

    let out = env.wick_as_user(&["vm", "create", "--name", "u1"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", env.daemon_log());
    let g = guest_root("u1");
    assert_eq!(fs::read(g.join("public")).unwrap(), b"for everyone");
    for f in ["secret", "link"] {
        assert!(!g.join(f).exists(), "{f} must not reach the user's VM");
        assert!(
            stderr.contains(&format!("file_sync {}", dir.path().join(f).display())),
            "the user is told about {f}: {stderr}"
        );
    }
    assert!(stderr.contains("uid 65534 cannot read it"), "{stderr}");

    // Root's VM gets everything, as before.
    env.wick_ok(&["vm", "create", "--name", "r1"]);
    let g = guest_root("r1");
    for f in ["public", "secret", "link"] {
        assert!(g.join(f).exists(), "{f} in root's VM");
    }
    assert_eq!(fs::read(g.join("link")).unwrap(), b"root only");
}
