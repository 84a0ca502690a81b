//! Integration: `wick vm workspace prepare|export` and `wick vm run` through a real wickd, the
//! fake Firecracker and a real `wick-agent` (`FAKE_FC_AGENT_BIN`). The "guest" is this host: the
//! agent's exec and tar calls act on the host's filesystem, so every guest path is under a temp
//! dir (`--guest-path`; `vm run` has it as a hidden option for exactly this) and guest-side
//! edits are plain shell commands run through `wick vm exec`. Needs root (the daemon is a root
//! daemon) and git; skipped otherwise.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use wick_testkit::cargo_bin;
use wick_testkit::wickd::{WickdEnv, FAKE_AGENT_CONFIG};

fn prerequisites() -> bool {
    if !nix::unistd::geteuid().is_root() {
        wick_testkit::skip(format_args!("needs root"));
        return false;
    }
    if !have("git") {
        wick_testkit::skip(format_args!("needs git"));
        return false;
    }
    true
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A started daemon whose `default` image runs the agent (no VM yet).
fn env() -> WickdEnv {
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();
    env
}

/// [`env`] plus a running VM `a1`.
fn env_with_vm() -> WickdEnv {
    let env = env();
    env.wick_ok(&["vm", "create", "--name", "a1"]);
    env
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.invalid",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

fn binary(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A repository `dir/proj` with two commits, a binary file, a symlink, an executable, an ignored
/// file, an untracked file and an uncommitted change to a tracked file. Returns its path.
fn make_repo(dir: &Path) -> std::path::PathBuf {
    let r = dir.join("proj");
    fs::create_dir_all(r.join("src")).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    fs::write(r.join("README.md"), "hello\n").unwrap();
    fs::write(r.join(".gitignore"), "*.log\n").unwrap();
    fs::write(r.join("src/lib.txt"), "one\ntwo\nthree\n").unwrap();
    fs::write(r.join("bin.dat"), binary(1, 4096)).unwrap();
    fs::write(r.join("gone.txt"), "to be deleted in the guest\n").unwrap();
    fs::write(r.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("README.md", r.join("link")).unwrap();
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "first"]);
    fs::write(r.join("README.md"), "hello\nworld\n").unwrap();
    git(&r, &["commit", "-q", "-am", "second"]);
    // Not committed: an edit, an ignored file and an untracked one.
    fs::write(r.join("src/lib.txt"), "one\ntwo (host edit)\nthree\n").unwrap();
    fs::write(r.join("build.log"), "ignored\n").unwrap();
    fs::write(r.join("notes.txt"), "untracked\n").unwrap();
    r
}

/// Every path below `root` except `.git`: kind, executable bit, content or link target.
fn snapshot(root: &Path) -> BTreeMap<String, (char, bool, Vec<u8>)> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, (char, bool, Vec<u8>)>) {
        for e in fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            if rel == ".git" {
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            if m.file_type().is_symlink() {
                let t = fs::read_link(&path).unwrap();
                out.insert(rel, ('l', false, t.as_os_str().as_encoded_bytes().to_vec()));
            } else if m.is_dir() {
                walk(base, &path, out);
            } else {
                let exec = m.permissions().mode() & 0o100 != 0;
                out.insert(rel, ('f', exec, fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// `wick vm exec a1 -- sh -c SCRIPT`, which must succeed; returns stdout.
fn guest_sh(env: &WickdEnv, script: &str) -> String {
    env.wick_ok(&["vm", "exec", "a1", "--", "sh", "-c", script])
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// Asserts `wick ARGS` fails with a message containing `want`.
fn fails_with(env: &WickdEnv, args: &[&str], want: &str) {
    let out = env.wick(args);
    assert_ne!(code(&out), Some(0), "{args:?} should fail");
    let err = text(&out.stderr);
    assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
}

#[test]
fn prepare_edit_export_reproduces_the_guest_tree() {
    if !prerequisites() {
        return;
    }
    let env = env_with_vm();
    let tmp = tempfile::tempdir().unwrap();
    let src = make_repo(tmp.path());
    let guest = tmp.path().join("guest/repo");
    let g = guest.to_str().unwrap();
    let head = git(&src, &["rev-parse", "HEAD"]);

    let out = env.wick_ok(&[
        "vm",
        "workspace",
        "prepare",
        "a1",
        src.to_str().unwrap(),
        "--guest-path",
        g,
        "--include-untracked",
    ]);
    assert!(out.starts_with("prepared "), "{out}");
    assert!(out.contains(&format!("a1:{g}")), "{out}");

    // The guest holds tracked files with the host's edit, the untracked file, not the ignored
    // one; the symlink and the executable bit survive; git works there.
    assert_eq!(
        fs::read_to_string(guest.join("src/lib.txt")).unwrap(),
        "one\ntwo (host edit)\nthree\n"
    );
    assert!(guest.join("notes.txt").exists());
    assert!(!guest.join("build.log").exists());
    assert_eq!(
        fs::read_link(guest.join("link")).unwrap(),
        Path::new("README.md")
    );
    assert_eq!(fs::read(guest.join("bin.dat")).unwrap(), binary(1, 4096));
    assert_ne!(
        fs::metadata(guest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o100,
        0
    );
    assert_eq!(git(&guest, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&guest, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");

    // Recorded on the VM, shown by show and list.
    let a1 = env.wick_json(&["vm", "show", "a1"]);
    let w = &a1["spec"]["workspace"];
    assert_eq!(w["head_commit"], head.as_str(), "{a1}");
    assert_eq!(w["guest_path"], g, "{a1}");
    assert_eq!(w["branch"], "main", "{a1}");
    assert_eq!(w["mode"], "shallow", "{a1}");
    let list = env.wick_ok(&["vm", "list"]);
    assert!(list.lines().next().unwrap().contains("WORKSPACE"), "{list}");
    assert!(list.contains(&format!("proj@{}", &head[..7])), "{list}");

    // Re-preparing unchanged sends nothing.
    let out = env.wick_ok(&[
        "vm",
        "workspace",
        "prepare",
        "a1",
        src.to_str().unwrap(),
        "--guest-path",
        g,
        "--include-untracked",
    ]);
    assert!(out.contains(": 0 files sent"), "{out}");

    // Work in the guest: text and binary edits, a new file, a deletion, a mode change; commit
    // part of it.
    guest_sh(
        &env,
        &format!(
            "set -e; cd '{g}'
             printf 'hello\\nguest world\\n' > README.md
             head -c 3000 /dev/urandom > bin.dat
             head -c 500 /dev/urandom > new.bin
             mkdir -p docs && echo 'new doc' > docs/new.md
             git -c user.name=G -c user.email=g@example.invalid add README.md new.bin
             git -c user.name=G -c user.email=g@example.invalid commit -q -m 'guest work'
             rm gone.txt
             chmod -x run.sh
             echo 'uncommitted' >> src/lib.txt"
        ),
    );
    let status_before = git(&guest, &["status", "--porcelain"]);
    let index = guest.join(".git/index");
    let index_before = fs::read(&index).unwrap();

    // Export against the host's HEAD, piped into `git apply` in a clean clone.
    let clone = tmp.path().join("clone");
    git(tmp.path(), &["clone", "-q", src.to_str().unwrap(), "clone"]);
    let mut wick = env
        .wick_cmd()
        .args([
            "vm",
            "workspace",
            "export",
            "a1",
            "--guest-path",
            g,
            "--base-commit",
            &head,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let apply = Command::new("git")
        .arg("-C")
        .arg(&clone)
        .arg("apply")
        .stdin(Stdio::from(wick.stdout.take().unwrap()))
        .output()
        .unwrap();
    let wick_out = wick.wait_with_output().unwrap();
    assert!(wick_out.status.success(), "{}", text(&wick_out.stderr));
    assert!(apply.status.success(), "git apply: {}", text(&apply.stderr));
    assert_eq!(
        snapshot(&clone),
        snapshot(&guest),
        "clone + patch == guest tree"
    );

    // The guest's index and status are untouched by the export.
    assert_eq!(git(&guest, &["status", "--porcelain"]), status_before);
    assert_eq!(fs::read(&index).unwrap(), index_before);

    // Against the guest HEAD (the default), to a file: only the uncommitted part.
    let patch = tmp.path().join("out.patch");
    let out = env.wick(&[
        "vm",
        "workspace",
        "export",
        "a1",
        "--guest-path",
        g,
        "--output",
        patch.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let p = fs::read_to_string(&patch).unwrap();
    assert!(p.contains("gone.txt") && p.contains("src/lib.txt"), "{p}");
    assert!(!p.contains("new.bin"), "committed in the guest: {p}");

    // An unknown base commit is refused and leaves no file behind.
    fs::remove_file(&patch).unwrap();
    let out = env.wick(&[
        "vm",
        "workspace",
        "export",
        "a1",
        "--guest-path",
        g,
        "--base-commit",
        "0123456789012345678901234567890123456789",
        "-o",
        patch.to_str().unwrap(),
    ]);
    assert_ne!(code(&out), Some(0));
    assert!(
        text(&out.stderr).contains("not in the guest repository"),
        "{}",
        text(&out.stderr)
    );
    assert!(!patch.exists());
}

#[test]
fn dry_run_branches_and_rejections() {
    if !prerequisites() {
        return;
    }
    let env = env_with_vm();
    let tmp = tempfile::tempdir().unwrap();
    let src = make_repo(tmp.path());
    let s = src.to_str().unwrap();
    let guest = tmp.path().join("guest/repo");
    let g = guest.to_str().unwrap();

    // --dry-run lists and copies nothing.
    let out = env.wick_ok(&[
        "vm",
        "workspace",
        "prepare",
        "a1",
        s,
        "--guest-path",
        g,
        "--dry-run",
    ]);
    for want in [
        "README.md",
        "bin.dat",
        "link",
        "src/lib.txt",
        "history: shallow",
    ] {
        assert!(out.lines().any(|l| l.starts_with(want)), "{want}: {out}");
    }
    assert!(
        !out.contains("notes.txt") && !out.contains("build.log"),
        "{out}"
    );
    let out = env.wick_ok(&[
        "vm",
        "workspace",
        "prepare",
        "a1",
        s,
        "--guest-path",
        g,
        "--dry-run",
        "--include-untracked",
    ]);
    assert!(out.contains("notes.txt (untracked)"), "{out}");
    assert!(
        !tmp.path().join("guest").exists(),
        "dry run touched the guest"
    );
    assert!(env.wick_json(&["vm", "show", "a1"])["spec"]["workspace"].is_null());

    // --branch/--from: the branch exists in the guest only.
    let first = git(&src, &["rev-parse", "HEAD~1"]);
    env.wick_ok(&[
        "vm",
        "workspace",
        "prepare",
        "a1",
        s,
        "--guest-path",
        g,
        "--branch",
        "wip",
        "--from",
        "HEAD~1",
    ]);
    assert_eq!(git(&guest, &["rev-parse", "--abbrev-ref", "HEAD"]), "wip");
    assert_eq!(git(&guest, &["rev-parse", "HEAD"]), first);
    assert_eq!(git(&src, &["branch", "--list", "wip"]), "");
    assert_eq!(git(&src, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");
    let a1 = env.wick_json(&["vm", "show", "a1"]);
    assert_eq!(a1["spec"]["workspace"]["branch"], "wip", "{a1}");

    // Rejections, each before any guest I/O.
    let g2 = tmp.path().join("guest2/repo");
    let g2s = g2.to_str().unwrap();
    let plain = tmp.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    let sub = tmp.path().join("withsub");
    fs::create_dir_all(&sub).unwrap();
    git(&sub, &["init", "-q", "-b", "main"]);
    fs::write(sub.join("a"), "a\n").unwrap();
    git(&sub, &["add", "a"]);
    let blob_commit = git(&src, &["rev-parse", "HEAD"]);
    git(
        &sub,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{blob_commit},vendor/lib"),
        ],
    );
    git(&sub, &["commit", "-q", "-m", "with a submodule"]);
    // Its checkout (a real repository would be cloned there; a file stands in).
    fs::create_dir_all(sub.join("vendor/lib")).unwrap();
    fs::write(sub.join("vendor/lib/x"), "x\n").unwrap();
    let prep = |path: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["vm", "workspace", "prepare", "a1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(path.display().to_string());
        v.extend(["--guest-path".to_string(), g2s.to_string()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (prep(&plain, &[]), "is not inside a git repository"),
        (prep(&tmp.path().join("missing"), &[]), "does not exist"),
        (prep(&sub, &[]), "--mode full_copy"),
        (prep(&src, &["--from", "HEAD~1"]), "--from needs --branch"),
        (
            prep(&src, &["--mode", "deep"]),
            "unknown workspace mode \"deep\"",
        ),
        (
            prep(&src, &["--branch", "a b"]),
            "is not a valid branch name",
        ),
        (
            prep(&src, &["--branch", "x", "--from", "nope"]),
            "does not name a commit",
        ),
    ];
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&env, &a, want);
    }
    fails_with(
        &env,
        &["vm", "workspace", "prepare", "zz", s, "--guest-path", g2s],
        "no VM matches \"zz\"",
    );
    // full_copy takes the submodule checkout as it is.
    let a: Vec<String> = prep(&sub, &["--mode", "full_copy", "--dry-run"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = env.wick_ok(&a);
    assert!(out.contains("full copy"), "{out}");

    env.wick_ok(&["vm", "stop", "a1"]);
    fails_with(
        &env,
        &["vm", "workspace", "prepare", "a1", s, "--guest-path", g2s],
        "VM a1 is not running",
    );
    fails_with(
        &env,
        &["vm", "workspace", "export", "a1", "--guest-path", g2s],
        "VM a1 is not running",
    );
    assert!(
        !tmp.path().join("guest2").exists(),
        "a rejection touched the guest"
    );
}

#[test]
fn run_passes_exit_codes_and_rm_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let tmp = tempfile::tempdir().unwrap();
    let src = make_repo(tmp.path());
    let s = src.to_str().unwrap();
    let head = git(&src, &["rev-parse", "HEAD"]);
    let gp = |n: &str| tmp.path().join(n).join("repo").display().to_string();

    // Checked before anything is created.
    fails_with(
        &env,
        &["vm", "run", "--branch", "x", "--", "true"],
        "--branch needs a repository",
    );
    fails_with(
        &env,
        &["vm", "run", s, "--from", "v1", "--", "true"],
        "--from needs --branch",
    );
    fails_with(
        &env,
        &["vm", "run", s, "--mode", "deep", "--", "true"],
        "unknown workspace mode",
    );
    fails_with(
        &env,
        &["vm", "run", "/nonexistent/dir", "--", "true"],
        "does not exist",
    );
    fails_with(
        &env,
        &["vm", "run", "--name", "Bad", "--", "true"],
        "'B' at position 1",
    );
    let out = env.wick(&["vm", "run", "--name", "d1", s, "--dry-run"]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("spec: "),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("README.md"),
        "{}",
        text(&out.stdout)
    );
    assert!(env.wick_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .is_empty());

    // --rm: the VM and its VMM are gone afterwards, whatever the command's outcome.
    let g = gp("rm1");
    let out = env.wick(&["vm", "run", "--rm", "--guest-path", &g, s, "--", "true"]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.starts_with("spec: "), "{err}");
    assert!(err.contains("prepared "), "{err}");
    assert!(err.contains("deleted VM "), "{err}");
    assert!(env.wick_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(env.vmm_processes().is_empty(), "a VMM survived --rm");
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--guest-path",
        &gp("rm2"),
        s,
        "--",
        "false",
    ]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    assert!(env.wick_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .is_empty());
    // Without PATH the command runs in /root.
    let out = env.wick(&["vm", "run", "--rm", "--", "pwd"]);
    assert_eq!(
        (code(&out), text(&out.stdout)),
        (Some(0), "/root\n".into()),
        "{}",
        text(&out.stderr)
    );
    assert!(env.vmm_processes().is_empty());

    // The command runs in the repository; its exit code becomes wick's; the VM stays and shows
    // its workspace.
    let g = gp("r1");
    let out = env.wick(&[
        "vm",
        "run",
        "--name",
        "r1",
        "--guest-path",
        &g,
        s,
        "--",
        "sh",
        "-c",
        "test -f bin.dat && test -f src/lib.txt && echo in-repo && exit 3",
    ]);
    assert_eq!(code(&out), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in-repo\n");
    let list = env.wick_ok(&["vm", "list"]);
    assert!(
        list.contains("r1") && list.contains(&format!("proj@{}", &head[..7])),
        "{list}"
    );
    let out = env.wick(&["vm", "run", "--name", "r2", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&out), Some(128 + 9), "{}", text(&out.stderr));

    // Interactive: ssh cannot reach a fake guest (255, passed through); with --rm the VM goes,
    // without it wick reminds that it still runs.
    if have("ssh") {
        let out = env.wick(&["vm", "run", "--name", "i1"]);
        assert_eq!(code(&out), Some(255), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr)
                .contains("VM i1 is still running: wick vm ssh i1 / wick vm delete i1"),
            "{}",
            text(&out.stderr)
        );
        let out = env.wick(&["vm", "run", "--rm", "--name", "i2"]);
        assert_eq!(code(&out), Some(255), "{}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("still running"));
        let names: Vec<String> = env.wick_json(&["vm", "list"])["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "i1"), "{names:?}");
        assert!(!names.iter().any(|n| n == "i2"), "{names:?}");
    } else {
        wick_testkit::skip(format_args!("interactive part skipped: needs ssh"));
    }
}

#[test]
fn rm_keeps_a_vm_whose_guest_never_came_up() {
    if !prerequisites() {
        return;
    }
    // No FAKE_FC_AGENT_BIN: the image expects an agent that never answers, so waiting for it
    // times out (the test config's boot_timeout, 10 s).
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.start();
    let out = env.wick(&["vm", "run", "--rm", "--name", "k1", "--", "true"]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("kept VM k1 for inspection: wick vm logs k1"),
        "{err}"
    );
    assert!(err.contains("agent"), "{err}");
    let list = env.wick_json(&["vm", "list"]);
    assert_eq!(list["vms"][0]["name"], "k1", "{list}");
    env.wick_ok(&["vm", "logs", "k1"]);
}

/// Busy threads that load every core while the guard lives. They are threads of the test
/// process, so they end with it whatever happens (a failed test, a killed run).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(n: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `vm run --rm` 56 times, 8 at a time, on a loaded machine: every exit code and every output is
/// the command's, and nothing is left behind.
#[test]
fn run_rm_exit_codes_hold_under_load() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let load = Load::start(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for worker in 0..8 {
            let (env, failures) = (&env, &failures);
            s.spawn(move || {
                for i in 0..7 {
                    let (args, want_code, want_out): (&[&str], i32, &str) = if i % 2 == 0 {
                        (&["true"], 0, "")
                    } else {
                        (&["sh", "-c", "echo out; exit 3"], 3, "out\n")
                    };
                    let mut argv = vec!["vm", "run", "--rm", "--"];
                    argv.extend_from_slice(args);
                    let out = env.wick(&argv);
                    if out.status.code() != Some(want_code) || text(&out.stdout) != want_out {
                        failures.lock().unwrap().push(format!(
                            "worker {worker} run {i} {args:?}: {} (want {want_code}), stdout \
                             {:?}, stderr:\n{}",
                            out.status,
                            text(&out.stdout),
                            text(&out.stderr)
                        ));
                    }
                }
            });
        }
    });
    drop(load);
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of 56 runs went wrong:\n{}\ndaemon log:\n{}",
        failures.len(),
        failures.join("\n"),
        env.daemon_log()
    );
    assert!(env.wick_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(env.vmm_processes().is_empty(), "a VMM survived --rm");
}

/// A one-commit repository `dir/NAME` holding `files` (path, content).
fn repo_with(dir: &Path, name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let r = dir.join(name);
    fs::create_dir_all(&r).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    for (path, content) in files {
        let p = r.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "project"]);
    r
}

#[test]
fn project_files_shape_the_vm_and_what_runs() {
    if !prerequisites() {
        return;
    }
    let env = env();
    let tmp = tempfile::tempdir().unwrap();
    let toml = r#"
vcpu = 2
memory = "300M"
ports = ["127.0.0.1:18089:80"]

[env]
GREETING = "hello from wick.toml"

[run]
commands = ["echo \"$GREETING\" >> runs.txt"]
default = "cat runs.txt"
"#;
    let src = repo_with(tmp.path(), "t", &[("wick.toml", toml)]);
    let s = src.to_str().unwrap();
    let g = tmp.path().join("gt").join("repo").display().to_string();

    // The file's spec, its run command, then its default command.
    let out = env.wick(&["vm", "run", "--name", "p1", "--guest-path", &g, s]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(0), "{err}");
    assert!(
        err.starts_with("project: wick.toml: publish 127.0.0.1:18089:80; 1 run command(s)"),
        "{err}"
    );
    assert_eq!(text(&out.stdout), "hello from wick.toml\n");
    let vm = env.wick_json(&["vm", "show", "p1"]);
    assert_eq!(vm["spec"]["vcpu"], 2, "{vm}");
    assert_eq!(vm["spec"]["memory_mib"], 300, "{vm}");
    env.wick_ok(&["vm", "delete", "p1"]);

    // Every run runs the run commands again (a new VM each time with --rm; here the same guest
    // dir keeps the file); the command line wins over the file's default and its flags.
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--vcpu",
        "1",
        "--guest-path",
        &g,
        s,
        "--",
        "wc",
        "-l",
        "runs.txt",
    ]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).split_whitespace().next(), Some("2"));

    // A failing run command ends the run with its status; --no-project skips the file.
    let bad = repo_with(
        tmp.path(),
        "b",
        &[("wick.toml", "[run]\ncommands = [\"exit 7\"]\n")],
    );
    let gb = tmp.path().join("gb").join("repo").display().to_string();
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--guest-path",
        &gb,
        bad.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), Some(7), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("run command `exit 7` failed with status 7"));
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--no-project",
        "--guest-path",
        &gb,
        bad.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("project:"));

    // Errors name the file, line and column, before any VM exists.
    let broken = repo_with(
        tmp.path(),
        "x",
        &[("wick.toml", "vcpu = 1\nmemory = \"lots\"\n")],
    );
    fails_with(
        &env,
        &["vm", "run", broken.to_str().unwrap(), "--", "true"],
        "wick.toml:2:10: memory",
    );

    // devcontainer.json: what maps is used, every other field is named.
    let dc = r#"{
  // comments are fine
  "name": "dc",
  "features": {},
  "remoteEnv": { "DC": "from devcontainer" },
}"#;
    let d = repo_with(tmp.path(), "d", &[(".devcontainer/devcontainer.json", dc)]);
    let gd = tmp.path().join("gd").join("repo").display().to_string();
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--guest-path",
        &gd,
        d.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo $DC",
    ]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(0), "{err}");
    assert_eq!(text(&out.stdout), "from devcontainer\n");
    assert!(
        err.contains("devcontainer.json:3:3: `name` is not supported"),
        "{err}"
    );
    assert!(
        err.contains("devcontainer.json:4:3: `features` is not supported"),
        "{err}"
    );

    // vm create --from-dir reads the same files.
    let out = env.wick(&["vm", "create", "--name", "p2", "--from-dir", s]);
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert_eq!(env.wick_json(&["vm", "show", "p2"])["spec"]["vcpu"], 2);
    fails_with(
        &env,
        &["vm", "create", "--from-dir", tmp.path().to_str().unwrap()],
        "no wick.toml or devcontainer.json",
    );
}
