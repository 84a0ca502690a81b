//! End to end: images without systemd boot under QEMU (TCG) with wick-init as PID 1. The test
//! builds its images itself from Debian packages (the machine's own apt sources and Debian
//! mirror; nothing else on the network), pushes them to a local `docker-registry` with an OCI
//! config (User, WorkingDir, Env, Cmd), pulls them into the daemon's image store with the agent
//! injected, and drives a real `wickd` through the real `wick`:
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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{json, Value};
use wick_testkit::guest::{qemu_unavailable, static_agent, static_wick_init};
use wick_testkit::registry::Registry;
use wick_testkit::wickd::WickdEnv;

fn cache() -> PathBuf {
    wick_image::testcache::cache_root().join("anyimage")
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `root` as an uncompressed tar at `out` (numeric owners), written atomically.
fn tar_root(root: &Path, out: &Path) -> Result<(), String> {
    let tmp = out.with_extension("part");
    sh(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-C"])
        .arg(root)
        .arg("-cf")
        .arg(&tmp)
        .arg("."))?;
    std::fs::rename(&tmp, out).map_err(|e| e.to_string())
}

/// Adds the unprivileged user `app` (1000:1000) with its home at `home`.
fn add_app_user(root: &Path, home: &str) -> Result<(), String> {
    use std::io::Write;
    let append = |rel: &str, line: &str| -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(rel))
            .map_err(|e| format!("{rel}: {e}"))?;
        f.write_all(line.as_bytes()).map_err(|e| e.to_string())
    };
    append(
        "etc/passwd",
        &format!("app:x:1000:1000:app:{home}:/bin/sh\n"),
    )?;
    append("etc/group", "app:x:1000:\n")?;
    let dir = root.join(home.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).map_err(|e| e.to_string())
}

/// The Alpine-style root: busybox-static from the Debian archive (through the machine's apt),
/// applets linked into /bin (all but `ip`: the agent must do without iproute2), `/sbin/init`
/// pointing at busybox as on Alpine, root and `app` users.
fn busybox_layer() -> Result<PathBuf, String> {
    let out = cache().join("busybox-root.tar");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache()).map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir_in(cache()).map_err(|e| e.to_string())?;
    sh(Command::new("apt-get")
        .args(["download", "busybox-static"])
        .current_dir(tmp.path()))
    .map_err(|e| format!("apt-get download busybox-static: {e}"))?;
    let deb = std::fs::read_dir(tmp.path())
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download left no .deb")?;
    let x = tmp.path().join("x");
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let root = tmp.path().join("root");
    for d in [
        "bin", "sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    let busybox = root.join("bin/busybox");
    std::fs::copy(x.join("bin/busybox"), &busybox).map_err(|e| e.to_string())?;
    let applets = sh(Command::new(&busybox).arg("--list"))?;
    for a in applets.lines().map(str::trim) {
        if a.is_empty() || matches!(a, "busybox" | "ip" | "init") {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init"))
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    add_app_user(&root, "/home/app")?;
    tar_root(&root, &out)?;
    Ok(out)
}

/// The Debian-slim/Python-style root: debootstrap minbase (which has no init) with
/// python3-minimal and git (which `vm run PATH` needs in the guest), docs and apt lists dropped
/// as slim images do, and the `app` user.
fn python_layer() -> Result<PathBuf, String> {
    let out = cache().join("minbase-python3-git.tar");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache()).map_err(|e| e.to_string())?;
    let mirror =
        wick_image::debian_mirror(None, wick_image::DEFAULT_SUITE).map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir_in(cache()).map_err(|e| e.to_string())?;
    let root = tmp.path().join("root");
    let debs = wick_image::testcache::cache_root().join("debootstrap");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    sh(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3-minimal,git"])
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(wick_image::DEFAULT_SUITE)
        .arg(&root)
        .arg(&mirror))?;
    for d in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "var/lib/apt/lists",
    ] {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
    if root.join("sbin/init").symlink_metadata().is_ok() {
        return Err("debootstrap minbase unexpectedly has /sbin/init".into());
    }
    add_app_user(&root, "/srv/app")?;
    tar_root(&root, &out)?;
    Ok(out)
}

/// Pushes one uncompressed layer with an OCI config carrying `process` (`User`, `Env`, ...).
async fn push(registry: &Registry, repo: &str, layer: &Path, process: Value) -> String {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.addr.clone()]),
        ..Default::default()
    });
    let reference = format!("{}/{repo}:1", registry.addr);
    let data = std::fs::read(layer).unwrap();
    let digest = sh(Command::new("sha256sum").arg(layer)).unwrap();
    let diff_id = format!("sha256:{}", digest.split_whitespace().next().unwrap());
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": process,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let image: Reference = reference.parse().unwrap();
    client
        .push(
            &image,
            &[ImageLayer::oci_v1(data, None)],
            Config::oci_v1(serde_json::to_vec(&config).unwrap(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .expect("push the test image");
    reference
}

fn config() -> String {
    r#"vmm = "qemu"
accel = "tcg"
boot_timeout = "180s"
stop_timeout = "60s"
dns_port = 10063
"#
    .into()
}

/// `wick vm exec NAME [FLAGS] -- ARGS`: (exit code, stdout).
fn exec(env: &WickdEnv, name: &str, flags: &[&str], args: &[&str]) -> (i32, String) {
    let mut a = vec!["vm", "exec", name];
    a.extend_from_slice(flags);
    a.push("--");
    a.extend_from_slice(args);
    let out = env.wick(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn create(env: &WickdEnv, name: &str, image: &str) -> Duration {
    let t = Instant::now();
    let out = env.wick(&[
        "vm",
        "create",
        "--name",
        name,
        "--image",
        image,
        "--memory",
        "512M",
        "--disk-size",
        "1G",
    ]);
    let took = t.elapsed();
    if !out.status.success() {
        let log = env.wick(&["vm", "logs", name]);
        panic!(
            "create {name} failed: {}\n--- vm log ---\n{}\n--- daemon ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&log.stdout),
            env.daemon_log()
        );
    }
    took
}

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
        log.contains("wick-init: shutting down"),
        "the guest powered off through wick-init; log tail:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    env.wick_ok(&["vm", "start", name]);
    let (code, proof) = exec(env, name, &["-u", "root"], &["cat", "/root/proof"]);
    assert_eq!(
        (code, proof.trim()),
        (0, "kept"),
        "/root survives stop/start"
    );
    stop
}

struct Setup {
    env: WickdEnv,
    _registry: Registry,
}

/// Everything the test needs, or why it cannot run here.
fn setup() -> Result<Setup, String> {
    if let Some(why) = qemu_unavailable() {
        return Err(why);
    }
    if let Some(why) = wick_testkit::registry::unavailable() {
        return Err(why);
    }
    let init = static_wick_init()?;
    let agent = static_agent()?;
    let busybox = busybox_layer().map_err(|e| format!("busybox image: {e}"))?;
    let python = python_layer().map_err(|e| format!("minbase + python3 image: {e}"))?;
    let deb = wick_kernel::debian::download_cloud_kernel(
        &wick_image::testcache::cache_root().join("debian-kernel"),
    )
    .map_err(|e| format!("Debian cloud kernel: {e}"))?;

    let registry = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bb_ref = rt.block_on(push(
        &registry,
        "wick/busybox",
        &busybox,
        json!({"User": "app", "WorkingDir": "/home/app",
               "Env": ["PATH=/bin:/sbin", "GREETING=hello from the image"]}),
    ));
    let py_ref = rt.block_on(push(
        &registry,
        "wick/python",
        &python,
        json!({"User": "app:app", "WorkingDir": "/srv/app",
               "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
               "Cmd": ["python3", "-c", "print(2)"]}),
    ));

    let env = WickdEnv::with_config(&config());
    let state = env.root().join("state");
    wick_kernel::store::KernelStore::new(state.join("kernels"))
        .map_err(|e| e.to_string())?
        .with_init_binary(init)
        .import(&deb, "default")
        .map_err(|e| format!("kernel import: {e}"))?;
    let images = wick_image::ImageStore::new(state.join("images")).map_err(|e| e.to_string())?;
    for (reference, name) in [(&bb_ref, "bb"), (&py_ref, "py")] {
        let opts = wick_image::oci::PullOptions {
            agent_bin: Some(agent.clone()),
            insecure_registries: vec![registry.addr.clone()],
            headroom_mib: Some(256),
            ..Default::default()
        };
        wick_image::oci::pull(&images, reference, name, &opts, &mut |_| {})
            .map_err(|e| format!("pull {reference}: {e}"))?;
    }
    Ok(Setup {
        env,
        _registry: registry,
    })
}

#[test]
fn images_without_systemd_boot_and_run() {
    let mut s = match setup() {
        Ok(s) => s,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let env = &mut s.env;
    env.start();

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
