//! Integration: managed images and kernels through a real `wickd` and the real `wick` CLI
//! (import, list, show, delete refused while a VM uses them), and the first-use preparation of
//! the default image and kernel through `wick_daemon::artifacts` (a real golden build, only where
//! one can run). Needs root; parts skip with a printed reason when a tool or cache is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use wick_daemon::artifacts::{Artifacts, DEFAULT_IMAGE, DEFAULT_KERNEL};
use wick_testkit::wickd::{http, WickdEnv};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

/// A 32 MiB ext4 holding a tiny tree, made without mounting (`mkfs.ext4 -d`).
fn small_ext4(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("tree");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "tiny\n").unwrap();
    let img = dir.join("tiny.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("32M")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        wick_testkit::skip(format_args!("mkfs.ext4 -d failed or e2fsprogs is missing"));
        return None;
    }
    Some(img)
}

/// Points `WICK_INIT_BIN` (read by wickd and by `Artifacts` in this process) at a static
/// wick-init, building one if needed. Call before starting a daemon.
fn ensure_init_env() -> Result<(), String> {
    static INIT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let p = INIT
        .get_or_init(wick_testkit::guest::static_wick_init)
        .clone()?;
    // Same value from every test thread; set before any daemon is spawned.
    std::env::set_var("WICK_INIT_BIN", p);
    Ok(())
}

/// The Debian cloud kernel package from the test cache (downloaded once), or why not.
fn cloud_kernel_deb() -> Result<PathBuf, String> {
    ensure_init_env().map_err(|e| format!("no static wick-init for the initramfs: {e}"))?;
    let dir = wick_image::testcache::cache_root().join("debian-kernel");
    wick_kernel::debian::download_cloud_kernel(&dir)
        .map_err(|e| format!("the Debian cloud kernel package is unavailable: {e}"))
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {list}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn stderr_of(env: &WickdEnv, args: &[&str]) -> String {
    let out = env.wick(args);
    assert!(
        !out.status.success(),
        "wick {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn images_and_kernels_through_wickd() {
    if !root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let Some(img) = small_ext4(work.path()) else {
        return;
    };
    if let Err(why) = ensure_init_env() {
        eprintln!("note: {why}");
    }
    let mut env = WickdEnv::new("");
    env.start();
    let img_s = img.to_str().unwrap();

    let t = Instant::now();
    let line = env.wick_ok(&["image", "import", img_s, "--name", "tiny"]);
    eprintln!("bench: image import of a 32 MiB ext4: {:?}", t.elapsed());
    assert!(line.starts_with("tiny  "), "{line}");
    let list = env.wick_json(&["image", "list"]);
    assert_eq!(names(&list, "images"), ["tiny"]);
    let tiny = &list["images"][0];
    assert_eq!(tiny["source"]["kind"], "import", "{tiny}");
    assert_eq!(tiny["size"], 32 << 20);
    let rootfs = PathBuf::from(tiny["rootfs"].as_str().unwrap());
    assert!(
        rootfs.starts_with(env.root().join("state/images")),
        "{tiny}"
    );
    let table = env.wick_ok(&["image", "list"]);
    assert!(
        table.starts_with("NAME") && table.contains("tiny"),
        "{table}"
    );
    let shown = env.wick_json(&["image", "show", "tiny"]);
    assert_eq!(shown["id"], tiny["id"]);

    // Refusals with clear messages.
    let e = stderr_of(&env, &["image", "import", img_s, "--name", "tiny"]);
    assert!(e.contains("already exists"), "{e}");
    let e = stderr_of(
        &env,
        &["image", "import", "/nonexistent.tar", "--name", "x"],
    );
    assert!(e.contains("does not exist"), "{e}");
    let e = stderr_of(&env, &["image", "import", img_s, "--name", "Bad/Name"]);
    assert!(e.contains("invalid image name"), "{e}");
    let e = stderr_of(&env, &["image", "show", "nope"]);
    assert!(e.contains("not found"), "{e}");

    let kernel = match cloud_kernel_deb() {
        Ok(deb) => {
            let t = Instant::now();
            let line = env.wick_ok(&["kernel", "import", deb.to_str().unwrap(), "--name", "k1"]);
            eprintln!(
                "bench: kernel import of the Debian cloud .deb: {:?}",
                t.elapsed()
            );
            assert!(line.starts_with("k1  "), "{line}");
            let list = env.wick_json(&["kernel", "list"]);
            assert_eq!(names(&list, "kernels"), ["k1"]);
            let k = list["kernels"][0].clone();
            assert_eq!(k["source_format"], "deb", "{k}");
            assert!(
                k["version"].as_str().unwrap().contains("cloud-amd64"),
                "{k}"
            );
            let table = env.wick_ok(&["kernel", "list"]);
            assert!(table.contains("k1") && table.contains("deb"), "{table}");
            Some(k)
        }
        Err(why) => {
            wick_testkit::skip(format_args!("the kernel part: {why}"));
            None
        }
    };

    // A VM using the image (and the kernel): deletion is refused, naming it.
    let Some(k) = kernel else {
        env.wick_ok(&["image", "delete", "tiny"]);
        assert!(names(&env.wick_json(&["image", "list"]), "images").is_empty());
        return;
    };
    let vmlinux = k["vmlinux"].as_str().unwrap().to_string();
    set_default_kernel(&env, "tiny", "k1");
    if !env
        .wick(&[
            "vm",
            "create",
            "--name",
            "v1",
            "--image",
            "tiny",
            "--no-start",
        ])
        .status
        .success()
    {
        // The daemon resolves images from its config: register the managed files there.
        env.stop();
        let cfg = env.root().join("config.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "\n[images.tiny]\nrootfs = {:?}\nkernel = {vmlinux:?}\n",
            rootfs.display().to_string()
        ));
        std::fs::write(&cfg, text).unwrap();
        env.start();
        env.wick_ok(&[
            "vm",
            "create",
            "--name",
            "v1",
            "--image",
            "tiny",
            "--no-start",
        ]);
    }
    let e = stderr_of(&env, &["image", "delete", "tiny"]);
    assert!(e.contains("used by VM v1"), "{e}");
    let e = stderr_of(&env, &["kernel", "delete", "k1"]);
    assert!(e.contains("kernel \"k1\" is used by VM v1"), "{e}");
    let listed = env.wick_json(&["kernel", "list"]);
    assert_eq!(listed["kernels"][0]["used_by"][0], "v1", "{listed}");
    assert!(Path::new(&vmlinux).exists());

    env.wick_ok(&["vm", "delete", "v1"]);
    assert_eq!(env.wick_ok(&["kernel", "delete", "k1"]), "k1: deleted\n");
    env.wick_ok(&["image", "delete", "tiny"]);
    assert!(names(&env.wick_json(&["kernel", "list"]), "kernels").is_empty());
    assert!(names(&env.wick_json(&["image", "list"]), "images").is_empty());
    assert!(!Path::new(&vmlinux).exists() && !rootfs.exists());
    let pruned = env.wick_json(&["image", "prune"]);
    assert!(pruned["removed"].is_array(), "{pruned}");
}

/// Sets the image's default kernel directly in the store (no CLI verb does this yet).
fn set_default_kernel(env: &WickdEnv, image: &str, kernel: &str) {
    let store = wick_image::ImageStore::new(env.root().join("state/images")).unwrap();
    store.set_default_kernel(image, Some(kernel)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_use_prepares_the_default_pair_once() {
    if !root() {
        return;
    }
    if let Some(why) = wick_image::testcache::golden_unavailable() {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let deb = match cloud_kernel_deb() {
        Ok(d) => d,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let paths = wick_model::Paths::new(Some(dir.path()));
    // Seed the kernel download from the test cache (download_cloud_kernel reuses a .deb there).
    let kdir = paths.cache.join("debian-kernel");
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::copy(&deb, kdir.join(deb.file_name().unwrap())).unwrap();
    let agent = wick_testkit::cargo_bin("wick-agent");
    let a = Arc::new(
        Artifacts::new(&paths)
            .unwrap()
            .with_agent_binary(&agent)
            .with_golden_options(wick_image::testcache::test_golden_options(None)),
    );
    assert!(!a.default_ready());

    let seen: Vec<Arc<Mutex<Vec<String>>>> = (0..2).map(|_| Default::default()).collect();
    let t = Instant::now();
    let tasks: Vec<_> = seen
        .iter()
        .map(|s| {
            let (a, s) = (a.clone(), s.clone());
            tokio::spawn(async move {
                a.ensure_default(move |st| s.lock().unwrap().push(st.to_string()))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("first use prepares the defaults");
    }
    eprintln!(
        "bench: first use (kernel import + golden build): {:?}",
        t.elapsed()
    );
    let (s0, s1) = (
        seen[0].lock().unwrap().clone(),
        seen[1].lock().unwrap().clone(),
    );
    assert_eq!(s0, s1, "both callers see every stage");
    assert!(s0.iter().any(|s| s.starts_with("import kernel")), "{s0:?}");
    assert!(s0.iter().any(|s| s.contains("debootstrap")), "{s0:?}");
    assert_eq!(
        s0.iter()
            .filter(|s| s.starts_with("download kernel"))
            .count(),
        1,
        "prepared once: {s0:?}"
    );

    let boot = a.resolve(DEFAULT_IMAGE).unwrap();
    assert_eq!(boot.kernel_name, DEFAULT_KERNEL);
    assert!(boot.agent && boot.work_seed.is_some() && boot.rootfs.is_file());
    assert!(boot.kernel_vmlinux.is_file());
    assert_eq!(
        a.get_image(DEFAULT_IMAGE)
            .unwrap()
            .default_kernel
            .as_deref(),
        Some(DEFAULT_KERNEL)
    );
    // Ready now: a second first use does nothing.
    let mut again = Vec::new();
    a.ensure_default(|s| again.push(s.to_string()))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

/// A rootfs tarball of `files` small files: slow enough to import (extract, make an ext4,
/// hash it) that a cancel lands in the middle.
fn many_file_tarball(dir: &Path, files: usize) -> PathBuf {
    let path = dir.join("rootfs.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    for i in 0..files {
        let data = vec![b'x'; 1024];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, format!("usr/share/f{}/{i}", i % 50), &data[..])
            .unwrap();
    }
    b.finish().unwrap();
    path
}

/// Entries of the image store that are neither images nor the store's own files.
fn staging_left(env: &WickdEnv) -> Vec<String> {
    std::fs::read_dir(env.root().join("state/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

fn wait_op(env: &WickdEnv, id: &str) -> Value {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (status, text) = http(&env.socket(), "GET", &format!("/v1/operations/{id}"), None);
        assert_eq!(status, 200, "{text}");
        let op: Value = serde_json::from_str(&text).unwrap();
        if op["state"] != "running" {
            return op;
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} never ended: {op}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Import is an operation: `202`, the operation's events, the image in its result; cancel
/// (through the API, and Ctrl-C in `wick image import`) leaves no image and no staging, and
/// the store takes the same name afterwards.
#[test]
fn image_import_is_a_cancellable_operation() {
    if !root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tarball = many_file_tarball(work.path(), 4000);
    let mut env = WickdEnv::new("");
    env.start();
    let body = serde_json::json!({"path": tarball, "name": "big"}).to_string();

    // Through the API: cancel right after the operation began.
    let (status, text) = http(
        &env.socket(),
        "POST",
        "/v1/images/import",
        Some(body.as_bytes()),
    );
    assert_eq!(status, 202, "{text}");
    let op: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(op["kind"], "image_import", "{op}");
    assert_eq!(op["artifact"]["name"], "big", "{op}");
    let id = op["id"].as_str().unwrap();
    let (status, _) = http(
        &env.socket(),
        "POST",
        "/v1/images/import",
        Some(body.as_bytes()),
    );
    assert_eq!(status, 409, "a second job for the same name is refused");
    let (status, text) = http(
        &env.socket(),
        "POST",
        &format!("/v1/operations/{id}/cancel"),
        None,
    );
    assert_eq!(status, 200, "{text}");
    let done = wait_op(&env, id);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["error"]["code"], "cancelled", "{done}");
    assert!(names(&env.wick_json(&["image", "list"]), "images").is_empty());
    assert!(staging_left(&env).is_empty(), "{:?}", staging_left(&env));

    // Through the CLI: Ctrl-C once a stage is shown.
    use std::io::BufRead;
    let mut child = env
        .wick_cmd()
        .args([
            "image",
            "import",
            tarball.to_str().unwrap(),
            "--name",
            "big",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("[import image big] stage:") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    seen.push_str(&rest);
    assert_eq!(status.code(), Some(130), "stderr:\n{seen}");
    assert!(seen.contains("cancelled"), "{seen}");
    assert!(names(&env.wick_json(&["image", "list"]), "images").is_empty());
    assert!(staging_left(&env).is_empty(), "{:?}", staging_left(&env));

    // The store is consistent: the same import now runs to its end.
    let line = env.wick_ok(&[
        "image",
        "import",
        tarball.to_str().unwrap(),
        "--name",
        "big",
    ]);
    assert!(line.starts_with("big  "), "{line}");
    let list = env.wick_json(&["image", "list"]);
    assert_eq!(names(&list, "images"), ["big"]);
    assert_eq!(list["images"][0]["source"]["kind"], "import", "{list}");
    assert!(staging_left(&env).is_empty(), "{:?}", staging_left(&env));
}
