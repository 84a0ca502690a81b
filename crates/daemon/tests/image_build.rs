//! Integration: derived image builds (`wick image build --from`), `wick vm commit` and kernel
//! choice (`vm create --kernel`) through a real `wickd` and the real `wick` CLI. The builder
//! VM is the fake Firecracker fronting a real `wick-agent` (`FAKE_FC_AGENT_BIN`), so its
//! "guest" is this host inside the daemon's private netns: the steps here are harmless
//! commands (`echo`, `exit 7`, `sleep`), never `--packages` or a successful `--copy` (those
//! would change the host; the real-guest test in `e2e_qemu.rs` covers them). What is checked
//! is the daemon's side: records, files, the cache, and that nothing is left behind. Needs
//! root; skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::cargo_bin;
use wick_testkit::wickd::{http, WickdEnv, FAKE_AGENT_CONFIG};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

/// A 32 MiB ext4 base image with a (stand-in) wick-agent at its path, so wickd treats VMs of
/// it as agent VMs; made without mounting (`mkfs.ext4 -d`).
fn base_ext4(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("tree");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("usr/local/bin")).unwrap();
    std::fs::write(src.join("etc/hostname"), "base\n").unwrap();
    std::fs::write(src.join("usr/local/bin/wick-agent"), "stand-in\n").unwrap();
    let img = dir.join("base.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("32M")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        wick_testkit::skip(format_args!("mkfs.ext4 -d failed or e2fsprogs is missing"));
        return None;
    }
    Some(img)
}

/// A stand-in kernel: an ELF64 x86_64 header (the fake Firecracker boots nothing).
fn fake_vmlinux(path: &Path, salt: u8) {
    let mut d = vec![0u8; 4096];
    d[..4].copy_from_slice(b"\x7fELF");
    d[4] = 2;
    d[5] = 1;
    d[6] = 1;
    d[16..18].copy_from_slice(&2u16.to_le_bytes());
    d[18..20].copy_from_slice(&62u16.to_le_bytes());
    d[100] = salt;
    std::fs::write(path, d).unwrap();
}

/// A daemon whose VMs run the real agent, with managed image `base` and kernel `default`.
struct Env {
    env: WickdEnv,
    _work: tempfile::TempDir,
}

impl Env {
    fn new(local_users: bool, failpoint: Option<&str>) -> Option<Env> {
        Env::with_config(local_users, failpoint, FAKE_AGENT_CONFIG)
    }

    fn with_config(local_users: bool, failpoint: Option<&str>, config: &str) -> Option<Env> {
        let work = tempfile::tempdir().unwrap();
        let img = base_ext4(work.path())?;
        let mut env = match local_users {
            true => WickdEnv::for_local_users(config, "agent = true"),
            false => WickdEnv::new_with_image_extra(config, "agent = true"),
        };
        env.env.push((
            "FAKE_FC_AGENT_BIN".into(),
            cargo_bin("wick-agent").display().to_string(),
        ));
        if let Some(p) = failpoint {
            env.env.push(("WICK_FAILPOINTS".into(), p.into()));
        }
        env.start();
        let k = work.path().join("vmlinux");
        fake_vmlinux(&k, 1);
        env.wick_ok(&["kernel", "import", k.to_str().unwrap(), "--name", "default"]);
        env.wick_ok(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
        Some(Env { env, _work: work })
    }

    fn image(&self, name: &str) -> Value {
        self.env.wick_json(&["image", "show", name])
    }

    fn image_names(&self) -> Vec<String> {
        let list = self.env.wick_json(&["image", "list"]);
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn vm_names(&self) -> Vec<String> {
        let list = self.env.wick_json(&["vm", "list"]);
        let vms = list.get("vms").unwrap_or(&list);
        vms.as_array()
            .unwrap_or_else(|| panic!("{list}"))
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Nothing a build leaves: no builder VM (record, directory, VMM), no staging directory.
    fn assert_nothing_left(&self, what: &str) {
        let vms = self.vm_names();
        assert!(
            vms.iter().all(|v| !v.starts_with("build-")),
            "{what}: builder VM left: {vms:?}"
        );
        let vm_dirs: Vec<_> = std::fs::read_dir(self.env.root().join("state/vms"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(vm_dirs.len(), vms.len(), "{what}: VM dirs {vm_dirs:?}");
        let staging: Vec<_> = std::fs::read_dir(self.env.root().join("state/images"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(staging.is_empty(), "{what}: staging left: {staging:?}");
        assert!(
            self.env.vmm_processes().is_empty(),
            "{what}: VMM processes left: {:?}",
            self.env.vmm_processes()
        );
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_op(env: &WickdEnv, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = http(&env.socket(), "GET", &format!("/v1/operations/{id}"), None);
        assert_eq!(status, 200, "{body}");
        let op: Value = serde_json::from_str(&body).unwrap();
        if op["state"] != "running" {
            return op;
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} never ended: {op}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `--run` build makes an image recording its inputs; an identical build is a cache hit
/// (no VM, under a second), also under another name (same files); another build under a taken
/// name needs --force.
#[test]
fn run_build_then_cache_hit() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    let args = [
        "image",
        "build",
        "--from",
        "base",
        "--run",
        "echo built-$((6*7))",
        "--name",
        "b1",
    ];
    let out = e.env.wick(&args);
    let all = text(&out);
    assert!(out.status.success(), "{all}\n{}", e.env.daemon_log());
    assert!(all.contains("built-42"), "step output is shown: {all}");
    assert!(all.contains("builder VM"), "{all}");
    let b1 = e.image("b1");
    assert_eq!(b1["source"]["kind"], "derived", "{b1}");
    assert_eq!(b1["source"]["base"], "base", "{b1}");
    assert_eq!(b1["source"]["run"][0], "echo built-$((6*7))", "{b1}");
    assert_eq!(b1["build_key"].as_str().unwrap().len(), 64, "{b1}");
    assert_eq!(b1["agent_injected"], true, "{b1}");
    assert_eq!(b1["size"], e.image("base")["size"], "{b1}");
    assert!(Path::new(b1["rootfs"].as_str().unwrap()).is_file());
    e.assert_nothing_left("after a build");

    let t = Instant::now();
    let out = e.env.wick(&args);
    let took = t.elapsed();
    eprintln!("bench: identical image build (cache hit): {took:?}");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("cache hit"), "{}", text(&out));
    assert!(!text(&out).contains("builder VM"), "{}", text(&out));
    assert!(took < Duration::from_secs(1), "cache hit took {took:?}");

    // Same inputs, another name: the same files under a second name.
    let mut other = args;
    other[7] = "b2";
    let out = e.env.wick(&other);
    assert!(text(&out).contains("cache hit"), "{}", text(&out));
    assert_eq!(e.image("b2")["id"], b1["id"]);

    // Other inputs, a taken name: refused without --force, before any VM.
    let out = e.env.wick(&[
        "image", "build", "--from", "base", "--run", "true", "--name", "b1",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(e.image("b1")["id"], b1["id"]);
    e.assert_nothing_left("after a refused build");
}

/// A failing step fails the build with the step's exit code and leaves nothing; bad requests
/// are refused before any VM.
#[test]
fn a_failing_step_leaves_nothing() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    let out = e.env.wick(&[
        "image", "build", "--from", "base", "--run", "true", "--run", "exit 7", "--name", "bad",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("step 2 (`exit 7`) failed with exit code 7"),
        "{}",
        text(&out)
    );
    assert_eq!(e.image_names(), ["base"]);
    e.assert_nothing_left("after a failed step");

    for (args, want) in [
        (vec!["--from", "nope", "--name", "x"], "nope"),
        (
            vec!["--from", "base", "--name", "x", "--packages", "jq,Bad;x"],
            "package",
        ),
        (vec!["--from", "base", "--run", "true"], "--name"),
        (vec!["--run", "true", "--name", "x"], "--from"),
    ] {
        let mut a = vec!["image", "build"];
        a.extend(args);
        let out = e.env.wick(&a);
        assert!(!out.status.success(), "{a:?}");
        assert!(text(&out).contains(want), "{a:?}: {}", text(&out));
    }
    e.assert_nothing_left("after refused requests");
}

/// Cancel mid-build (while a step runs) ends the operation `cancelled` and leaves nothing.
#[test]
fn a_cancelled_build_leaves_nothing() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    let body = serde_json::json!({"from": "base", "name": "slow", "run": ["sleep 30"]});
    let (status, op) = http(
        &e.env.socket(),
        "POST",
        "/v1/images/build",
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(status, 202, "{op}");
    let op: Value = serde_json::from_str(&op).unwrap();
    let id = op["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, o) = http(
            &e.env.socket(),
            "GET",
            &format!("/v1/operations/{id}"),
            None,
        );
        let o: Value = serde_json::from_str(&o).unwrap();
        if o["stage"] == "run a step" {
            break;
        }
        assert_eq!(o["state"], "running", "{o}\n{}", e.env.daemon_log());
        assert!(Instant::now() < deadline, "never reached the step: {o}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let (status, body) = http(
        &e.env.socket(),
        "POST",
        &format!("/v1/operations/{id}/cancel"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let done = wait_op(&e.env, &id);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(e.image_names(), ["base"]);
    e.assert_nothing_left("after a cancel");
}

/// `kill -9` of wickd mid-build (at its failpoints): the restart sweeps the builder VM, its
/// disks and the build's record; the same build then runs.
#[test]
fn crash_drill_image_build() {
    if !root() {
        return;
    }
    for point in ["build-recorded", "build-vm-running", "build-committed"] {
        let Some(mut e) = Env::new(false, Some(point)) else {
            return;
        };
        // Through the API, not the CLI (which would start a new wickd when this one dies).
        let body = serde_json::json!({"from": "base", "name": "c1", "run": ["true"]});
        let (status, op) = http(
            &e.env.socket(),
            "POST",
            "/v1/images/build",
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(status, 202, "{point}: {op}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while e.env.daemon.as_mut().unwrap().try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{point}: wickd did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        e.env.kill9(); // reap the dead daemon
        e.env.env.retain(|(k, _)| k != "WICK_FAILPOINTS");
        e.env.start();
        assert!(
            e.env
                .daemon_log()
                .contains("interrupted image builds swept"),
            "{point}: {}",
            e.env.daemon_log()
        );
        // A build killed after its commit may keep its image (complete, recorded last); no
        // other outcome leaves one.
        let names = e.image_names();
        match point {
            "build-committed" => assert!(names.len() <= 2, "{point}: {names:?}"),
            _ => assert_eq!(names, ["base"], "{point}"),
        }
        e.assert_nothing_left(point);
        let args = [
            "image", "build", "--from", "base", "--run", "true", "--name", "c1", "--force",
        ];
        let out = e.env.wick(&args);
        assert!(out.status.success(), "{point}: {}", text(&out));
        e.assert_nothing_left(point);
    }
}

/// `vm commit` refuses a running VM with the reason, and makes an image of a stopped one.
#[test]
fn commit_a_stopped_vm() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    e.env
        .wick_ok(&["vm", "create", "--image", "base", "--name", "c1"]);
    let out = e.env.wick(&["vm", "commit", "c1", "--name", "snap"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("stop it first"), "{}", text(&out));
    e.env.wick_ok(&["vm", "stop", "c1"]);
    let line = e.env.wick_ok(&["vm", "commit", "c1", "--name", "snap"]);
    assert!(line.starts_with("snap  "), "{line}");
    let snap = e.image("snap");
    assert_eq!(snap["source"]["kind"], "commit", "{snap}");
    assert_eq!(snap["source"]["vm"], "c1", "{snap}");
    assert_eq!(snap["source"]["base"], "base", "{snap}");
    assert_eq!(snap["size"], e.image("base")["size"], "{snap}");
    assert_eq!(snap["agent_injected"], true, "{snap}");
    // The image boots like any other.
    e.env.wick_ok(&[
        "vm",
        "create",
        "--image",
        "snap",
        "--name",
        "c2",
        "--no-start",
    ]);
    let out = e.env.wick(&["vm", "commit", "c1", "--name", "snap"]);
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    let out = e.env.wick(&["vm", "commit", "nope", "--name", "x"]);
    assert!(!out.status.success() && text(&out).contains("nope"));
}

/// A socket user cannot make wickd read a file they cannot read through `--copy`: refused
/// before any VM, naming the file.
#[test]
fn a_socket_user_cannot_copy_a_root_only_file() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(true, None) else {
        return;
    };
    let secret = e.env.root().join("secret.txt");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Should the refusal ever fail, the fake guest (this host) writes only into the test root.
    let copy = format!("{}:{}/copied", secret.display(), e.env.root().display());
    let out = e.env.wick_as_user(&[
        "image", "build", "--from", "base", "--copy", &copy, "--name", "u1",
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("secret.txt") && t.contains("ermission denied"),
        "{t}"
    );
    assert_eq!(e.image_names(), ["base"]);
    e.assert_nothing_left("after a refused copy");
    // A socket user may build under a new name (the builder VM is root's, and goes).
    let out = e.env.wick_as_user(&[
        "image", "build", "--from", "base", "--run", "true", "--name", "u2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(e.image_names(), ["base", "u2"]);
    e.assert_nothing_left("after a user's build");
    // Replacing an image is root's.
    let out = e.env.wick_as_user(&[
        "image", "build", "--from", "base", "--run", "true", "--name", "base", "--force",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("only root"), "{}", text(&out));
}

/// `vm create --kernel K` boots K (the VMM plan names its file); an unknown kernel is refused
/// by name.
#[test]
fn kernel_choice() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    let k2 = e._work.path().join("k2");
    fake_vmlinux(&k2, 2);
    e.env
        .wick_ok(&["kernel", "import", k2.to_str().unwrap(), "--name", "k2"]);
    let out = e
        .env
        .wick(&["vm", "create", "--image", "base", "--kernel", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no kernel named \"nope\"") && text(&out).contains("k2"),
        "{}",
        text(&out)
    );
    e.env.wick_ok(&[
        "vm", "create", "--image", "base", "--kernel", "k2", "--name", "k",
    ]);
    let vm = e.env.wick_json(&["vm", "show", "k"]);
    let k2_rec = e.env.wick_json(&["kernel", "show", "k2"]);
    assert_eq!(vm["spec"]["kernel"], k2_rec["vmlinux"], "{vm}");
    // The VMM was given k2 (the fake Firecracker logs its boot source).
    let log = e.env.wick_ok(&["vm", "logs", "k"]);
    assert!(
        log.contains(k2_rec["vmlinux"].as_str().unwrap()),
        "the VMM boots k2: {log}"
    );
    let used = e.env.wick_json(&["kernel", "show", "k2"]);
    assert_eq!(used["used_by"][0], "k", "{used}");
    // Imported without modules: every driver is reported, as unknown (assumed built in).
    let features = used["features"].as_array().unwrap();
    assert!(features.iter().any(|f| f["feature"] == "vsock"), "{used}");
    assert!(features.iter().all(|f| f["state"] == "unknown"), "{used}");
    let table = e.env.wick_ok(&["kernel", "list"]);
    assert!(
        table.contains("ENTRY") && table.contains("vsock:?"),
        "{table}"
    );

    // The image's default kernel: validated, then used by new VMs, and cleared again.
    let out = e.env.wick(&["image", "set", "base", "--kernel", "nope"]);
    assert!(
        !out.status.success() && text(&out).contains("nope"),
        "{}",
        text(&out)
    );
    let line = e.env.wick_ok(&["image", "set", "base", "--kernel", "k2"]);
    assert!(line.contains("boots kernel k2"), "{line}");
    e.env.wick_ok(&[
        "vm",
        "create",
        "--image",
        "base",
        "--name",
        "k3",
        "--no-start",
    ]);
    let vm = e.env.wick_json(&["vm", "show", "k3"]);
    assert_eq!(vm["spec"]["kernel"], k2_rec["vmlinux"], "{vm}");
    e.env.wick_ok(&["image", "set", "base", "--default-kernel"]);
    assert!(e.image("base")["default_kernel"].is_null());
}

/// A one-commit git repository at `dir` holding `files`; `None` (skipped) without git.
fn git_repo(dir: &Path, files: &[(&str, &str)]) -> Option<()> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::create_dir_all(dir).unwrap();
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let ok =
        git(&["init", "-q", "-b", "main"]) && git(&["add", "-A"]) && git(&["commit", "-qm", "p"]);
    if !ok {
        wick_testkit::skip(format_args!("git is missing"));
        return None;
    }
    Some(())
}

/// A repository's setup steps (wick.toml `[setup]`, devcontainer.json `postCreateCommand`) are
/// baked into an image once; later runs use that image, and the run commands run every time.
#[test]
fn project_setup_runs_once_per_image() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(false, None) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("r");
    let toml = "image = \"base\"\n[setup]\ncommands = [\"echo setup-step-ran\"]\n";
    if git_repo(&repo, &[("wick.toml", toml)]).is_none() {
        return;
    }
    let g = tmp.path().join("g/repo");
    let run = |what: &str| {
        let out = e.env.wick(&[
            "vm",
            "run",
            "--rm",
            "--guest-path",
            g.to_str().unwrap(),
            repo.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert!(out.status.success(), "{what}: {}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = run("first run");
    assert!(first.contains("setup: image base-setup-"), "{first}");
    assert!(
        first.contains("setup-step-ran"),
        "the step's output is shown: {first}"
    );
    let built: Vec<_> = e
        .image_names()
        .into_iter()
        .filter(|n| n.starts_with("base-setup-"))
        .collect();
    assert_eq!(built.len(), 1, "{built:?}");
    assert!(e.image(&built[0])["build_key"].is_string());

    let second = run("second run");
    assert!(second.contains("cache hit"), "{second}");
    assert!(
        !second.contains("setup-step-ran"),
        "setup ran again: {second}"
    );

    // The name is public: an image made under it from other inputs is refused, never used.
    e.env.wick_ok(&["image", "delete", &built[0]]);
    e.env.wick_ok(&[
        "image",
        "build",
        "--from",
        "base",
        "--name",
        &built[0],
        "--run",
        "echo squatted",
    ]);
    let out = e.env.wick(&[
        "vm",
        "run",
        "--rm",
        "--guest-path",
        g.to_str().unwrap(),
        repo.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert!(
        !out.status.success(),
        "a squatted setup image was used: {}",
        text(&out)
    );
    e.env.wick_ok(&["image", "delete", &built[0]]);

    // devcontainer.json's postCreateCommand is the same kind of setup.
    let dc = tmp.path().join("d");
    let json = r#"{"image": "base", "postCreateCommand": ["echo", "dc setup"]}"#;
    git_repo(&dc, &[(".devcontainer/devcontainer.json", json)]).unwrap();
    let gd = tmp.path().join("gd/repo");
    let out = e.env.wick(&[
        "vm",
        "run",
        "--rm",
        "--guest-path",
        gd.to_str().unwrap(),
        dc.to_str().unwrap(),
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("setup: image base-setup-"), "{err}");
    assert!(err.contains("dc setup"), "{err}");
    e.assert_nothing_left("after the project runs");
}

/// A build runs its requester's steps in a root-owned builder VM: root's `[[file_sync]]` files
/// (and git identity) must never reach it, or any socket user could print them.
#[test]
fn a_builder_vm_gets_no_identity_files() {
    if !root() {
        return;
    }
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "root's token").unwrap();
    let config = format!(
        "{FAKE_AGENT_CONFIG}\n[[file_sync]]\nhost = {:?}\nguest = \"/root/token\"\n",
        secret.path()
    );
    let Some(e) = Env::with_config(true, None, &config) else {
        return;
    };
    // The fake VMM's guest is this host with the guest's files under the VM dir: the step
    // lists every VM's guest /root while the builder runs.
    let vms = e.env.root().join("state/vms");
    let step = format!("ls {}/*/guest-root/root/ 2>&1; true", vms.display());
    let out = e.env.wick_as_user(&[
        "image", "build", "--from", "base", "--name", "u-built", "--run", &step,
    ]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains("token"),
        "root's file_sync file reached the builder: {all}"
    );
    // A VM of root's own still gets it.
    e.env.wick_ok(&["vm", "create", "--name", "r1"]);
    let v = e.env.wick_json(&["vm", "show", "r1"]);
    let vsock = PathBuf::from(v["runtime"]["vmm"]["vsock_socket"].as_str().unwrap());
    assert!(vsock
        .parent()
        .unwrap()
        .join("guest-root/root/token")
        .exists());
}

/// A builder VM is root's, so `[limits]` does not count it: a socket user runs one build at a
/// time instead; a second is refused while the first runs, and allowed after.
#[test]
fn a_socket_user_runs_one_build_at_a_time() {
    if !root() {
        return;
    }
    let Some(e) = Env::new(true, None) else {
        return;
    };
    // The fake guest is this host: the first build's step waits for a file the test makes.
    let flag = e.env.root().join("go");
    let step = format!("while [ ! -e {} ]; do sleep 0.1; done", flag.display());
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            e.env.wick_as_user(&[
                "image", "build", "--from", "base", "--run", &step, "--name", "slow",
            ])
        });
        // Wait until the builder VM exists (its step is then running or about to).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !e.vm_names().iter().any(|v| v.starts_with("build-")) {
            assert!(
                std::time::Instant::now() < deadline,
                "no builder VM appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = e.env.wick_as_user(&[
            "image", "build", "--from", "base", "--run", "true", "--name", "second",
        ]);
        std::fs::write(&flag, "").unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("image build(s) running"),
            "{}",
            text(&out)
        );
        let first = first.join().unwrap();
        assert!(first.status.success(), "{}", text(&first));
    });
    let out = e.env.wick_as_user(&[
        "image", "build", "--from", "base", "--run", "true", "--name", "second",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}
