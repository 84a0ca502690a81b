//! End to end: images without systemd boot under QEMU (TCG) with wick-init as PID 1. The test
//! builds its images itself from Debian packages (the machine's own apt sources and Debian
//! mirror; nothing else on the network), pushes them to a local `docker-registry` with an OCI
//! config (User, WorkingDir, Env, Cmd), and has wickd pull them (`wick image pull`, from the
//! same registry storage served inside the daemon's network namespace; wickd injects the static
//! agent, as `./wick` builds it), then drives the real `wickd` through the real `wick`:
//!
//! - an Alpine-style image: a busybox-static root (`/bin/sh` and `/sbin/init` are busybox, no
//!   glibc, no systemd, no iproute2), with a static wick-agent;
//! - a Debian-slim/Python-style image: debootstrap minbase (no init at all) + python3-minimal.
//!
//! Both boot to agent-ready; `vm exec` runs as the image's User in its WorkingDir with its Env;
//! `vm run REPO -- python3 ...` runs in the repository as the image's user; zombies are reaped;
//! `vm stop` powers off through wick-init and `/root` persists. The built roots are cached in
//! `$WICK_TEST_CACHE/anyimage`, so a second run does not rebuild them. Skipped (with the reason)
//! where QEMU, the registry, debootstrap, the mirror or root are missing.
use std::process::Command;
use std::time::{Duration, Instant};

mod images_common;
use images_common::{create, exec, setup, sh};
use wick_testkit::wickd::WickdEnv;

/// No process in the guest is a zombie (retrying a little: a reap follows SIGCHLD).
fn assert_no_zombies(env: &WickdEnv, name: &str) {
    let script = "for f in /proc/[0-9]*/stat; do cat $f 2>/dev/null; echo; done";
    let mut zombies = Vec::new();
    for _ in 0..20 {
        let (code, stats) = exec(env, name, &["-u", "root"], &["sh", "-c", script]);
        assert_eq!(code, 0);
        zombies = stats
            .lines()
            .filter(|l| {
                l.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .map(str::to_string)
            .collect();
        if zombies.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("zombies left in {name}: {zombies:?}");
}

/// Stop (clean poweroff through wick-init, the VMM exiting by itself well before
/// `stop_timeout`), start, and `/root` kept.
fn stop_start_keeps_root(env: &WickdEnv, name: &str) -> Duration {
    let (code, _) = exec(
        env,
        name,
        &["-u", "root"],
        &["sh", "-c", "echo kept > /root/proof && sync"],
    );
    assert_eq!(code, 0);
    let t = Instant::now();
    env.wick_ok(&["vm", "stop", name]);
    let stop = t.elapsed();
    let vm = env.wick_json(&["vm", "show", name]);
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(
        stop < Duration::from_secs(45),
        "stop took {stop:?} (stop_timeout is 60 s)"
    );
    let log = String::from_utf8_lossy(&env.wick(&["vm", "logs", name]).stdout).to_string();
    assert!(
        log.contains("shutting down: stopping every process"),
        "the guest powered off through wick-init; log tail:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    for l in log
        .lines()
        .filter(|l| l.contains("wick-init: [") || l.contains("reboot:"))
    {
        eprintln!("{name} console: {l}");
    }
    env.wick_ok(&["vm", "start", name]);
    let (code, proof) = exec(env, name, &["-u", "root"], &["cat", "/root/proof"]);
    assert_eq!(
        (code, proof.trim()),
        (0, "kept"),
        "/root survives stop/start"
    );
    stop
}

#[test]
fn images_without_systemd_boot_and_run() {
    let mut s = match setup(false) {
        Ok(s) => s,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let env = &mut s.env;

    // The image config is on the image and copied into the VM's spec.
    let img = env.wick_json(&["image", "show", "bb"]);
    assert_eq!(img["config"]["user"], "app", "{img}");
    assert_eq!(img["config"]["working_dir"], "/home/app");

    // Alpine-style: busybox is /sbin/init, so wick-init stays PID 1.
    let bb_ready = create(env, "b1", "bb");
    eprintln!("bench: create → agent ready, busybox image (wick-init PID 1): {bb_ready:?}");
    let vm = env.wick_json(&["vm", "show", "b1"]);
    assert_eq!(vm["spec"]["image_config"]["user"], "app", "{vm}");
    assert_eq!(
        exec(env, "b1", &[], &["cat", "/proc/1/comm"]).1.trim(),
        "wick-init"
    );
    let (code, out) = exec(
        env,
        "b1",
        &[],
        &["sh", "-c", "id -u; pwd; echo \"$GREETING\""],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "1000\n/home/app\nhello from the image\n"),
        "User, WorkingDir and Env of the image"
    );
    let (_, out) = exec(
        env,
        "b1",
        &["-u", "root", "-w", "/", "-e", "GREETING=mine"],
        &["sh", "-c", "id -u; pwd; echo \"$GREETING\""],
    );
    assert_eq!(out, "0\n/\nmine\n", "the user's flags win");
    // Services and their commands start with no signal blocked (PID 1 blocks its own).
    let (_, status) = exec(env, "b1", &[], &["cat", "/proc/self/status"]);
    assert!(
        status.lines().any(|l| l == "SigBlk:\t0000000000000000"),
        "{status}"
    );
    // The network was configured without iproute2 (rtnetlink): address and default route.
    let ip = vm["runtime"]["ip"].as_str().unwrap().to_string();
    let (_, trie) = exec(env, "b1", &[], &["cat", "/proc/net/fib_trie"]);
    assert!(trie.contains(&ip), "guest address {ip} in {trie}");
    let (_, routes) = exec(env, "b1", &[], &["cat", "/proc/net/route"]);
    assert!(
        routes
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("00000000")),
        "default route: {routes}"
    );
    // A parent that never waits for its child: once it exits, PID 1 reaps the zombie.
    let (code, _) = exec(env, "b1", &[], &["sh", "-c", "sleep 0.2 & exec sleep 2"]);
    assert_eq!(code, 0);
    assert_no_zombies(env, "b1");
    let bb_stop = stop_start_keeps_root(env, "b1");
    eprintln!("bench: stop (wick-init poweroff), busybox image: {bb_stop:?}");
    assert_eq!(
        exec(env, "b1", &[], &["cat", "/proc/1/comm"]).1.trim(),
        "wick-init"
    );

    // Debian-slim/Python-style: no init at all; vm run copies a repository and runs python3
    // in it as the image's user.
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        sh(Command::new("git").args(args).current_dir(repo.path())).unwrap();
    };
    git(&["init", "-q"]);
    std::fs::write(repo.path().join("hello.txt"), "hello\n").unwrap();
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "init",
    ]);
    let t = Instant::now();
    let out = env.wick(&[
        "vm",
        "run",
        repo.path().to_str().unwrap(),
        "--name",
        "p1",
        "--image",
        "py",
        "--memory",
        "512M",
        "--disk-size",
        "1G",
        "--",
        "python3",
        "-c",
        "import os; print(1, os.getuid(), os.getcwd(), open('hello.txt').read().strip())",
    ]);
    eprintln!(
        "vm run (create + prepare + python3), minbase image: {:?}",
        t.elapsed()
    );
    assert!(
        out.status.success(),
        "vm run: {}\n--- vm log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&env.wick(&["vm", "logs", "p1"]).stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1 1000 /root/repo hello\n",
        "python3 runs in the repository as the image's user, which can read it"
    );
    let (code, out) = exec(
        env,
        "p1",
        &[],
        &["sh", "-c", "id -un; pwd; echo $LANG; cat /proc/1/comm"],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "app\n/srv/app\nC.UTF-8\nwick-init\n")
    );
    assert_no_zombies(env, "p1");
    let py_stop = stop_start_keeps_root(env, "p1");
    eprintln!("bench: stop (wick-init poweroff), minbase image: {py_stop:?}");

    // Without a command, vm run runs the image's Entrypoint + Cmd.
    let t = Instant::now();
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--image",
        "py",
        "--memory",
        "512M",
        "--disk-size",
        "1G",
    ]);
    let py_run = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2\n",
        "Cmd of the image"
    );
    eprintln!(
        "bench: vm run --rm (create → agent ready → Cmd → delete), minbase image: {py_run:?}"
    );
    env.wick_ok(&["vm", "delete", "b1", "p1"]);
}
