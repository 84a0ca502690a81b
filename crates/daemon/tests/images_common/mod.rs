//! Shared by `tests/e2e_images.rs` and `benches/images.rs`: images without systemd built from
//! Debian packages (cached in `$WICK_TEST_CACHE/anyimage`), pushed to a local `docker-registry`
//! with an OCI config and pulled into a test daemon's store with the agent injected, next to the
//! kernel imported with the current wick-init (and, for the benchmark, the golden image).
#![allow(dead_code)]

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

pub fn cache() -> PathBuf {
    wick_image::testcache::cache_root().join("anyimage")
}

pub fn sh(cmd: &mut Command) -> Result<String, String> {
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
pub fn tar_root(root: &Path, out: &Path) -> Result<(), String> {
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
pub fn add_app_user(root: &Path, home: &str) -> Result<(), String> {
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
pub fn busybox_layer() -> Result<PathBuf, String> {
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
pub fn python_layer() -> Result<PathBuf, String> {
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
pub async fn push(registry: &Registry, repo: &str, layer: &Path, process: Value) -> String {
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

pub fn config() -> String {
    r#"vmm = "qemu"
accel = "tcg"
boot_timeout = "180s"
stop_timeout = "60s"
dns_port = 10063
"#
    .into()
}

/// `wick vm exec NAME [FLAGS] -- ARGS`: (exit code, stdout).
pub fn exec(env: &WickdEnv, name: &str, flags: &[&str], args: &[&str]) -> (i32, String) {
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

/// `wick vm create` (512 MiB, 1 GiB disk) of `image`: its wall time (create → agent ready and
/// configured); panics with the VM log when it fails.
pub fn create(env: &WickdEnv, name: &str, image: &str) -> Duration {
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

pub struct Setup {
    pub env: WickdEnv,
    _mirror: wick_testkit::registry::Mirror,
    _registry: Registry,
}

/// Everything the test needs, or why it cannot run here, with the daemon started. With
/// `golden`, the cached golden image (systemd) is there too, as `golden`, booting the same
/// kernel and initramfs.
pub fn setup(golden: bool) -> Result<Setup, String> {
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
    let kernel = wick_kernel::store::KernelStore::new(state.join("kernels"))
        .map_err(|e| e.to_string())?
        .with_init_binary(init)
        .import(&deb, "default")
        .map_err(|e| format!("kernel import: {e}"))?;
    if golden {
        let agent = wick_testkit::cargo_bin("wick-agent");
        let g = wick_image::testcache::golden(Some(&agent), &mut |s| eprintln!("golden: {s}"))
            .map_err(|e| format!("golden image: {e}"))?;
        let table = format!(
            "\n[images.golden]\nrootfs = {:?}\nwork_seed = {:?}\nkernel = {:?}\ninitrd = {:?}\nagent = true\n",
            g.rootfs,
            g.work_seed,
            kernel.bzimage.clone().ok_or("the kernel has no bzImage")?,
            kernel.initrd.clone().ok_or("the kernel has no initramfs")?,
        );
        std::fs::write(env.root().join("config.toml"), config() + &table)
            .map_err(|e| e.to_string())?;
    }
    // wickd pulls them itself (`wick image pull`), from the same registry storage served
    // inside its network namespace, injecting the static agent (as `./wick` builds it).
    let mut env = env;
    env.env
        .push(("WICK_AGENT_BIN".into(), agent.display().to_string()));
    env.start();
    let mirror = registry.serve_in(|p| env.in_netns(p), 5000);
    for (reference, name) in [(&bb_ref, "bb"), (&py_ref, "py")] {
        let local = reference.replacen(&registry.addr, &mirror.addr, 1);
        let out = env.wick(&["image", "pull", &local, "--name", name, "--insecure"]);
        if !out.status.success() {
            return Err(format!(
                "wick image pull {local}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(Setup {
        env,
        _mirror: mirror,
        _registry: registry,
    })
}
