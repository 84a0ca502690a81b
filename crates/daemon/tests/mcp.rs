//! `wick mcp` driven by a real MCP client no one here wrote: the official Python SDK (PyPI `mcp`,
//! installed by `scripts/install-host-deps` into a venv) runs `mcp_client.py` against a test
//! daemon (fake Firecracker fronting the real agent): tools and their schemas, create → exec →
//! files → run a repository → export its patch → errors → delete.

use std::path::{Path, PathBuf};
use std::process::Command;

use wick_testkit::cargo_bin;
use wick_testkit::wickd::{WickdEnv, FAKE_AGENT_CONFIG};

/// The Python with the MCP SDK: `WICK_TEST_PYTHON`, else install-host-deps' venv.
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("WICK_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/wick-test/venv/bin/python3"));
    let ok = Command::new(&p)
        .args(["-c", "import mcp, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(p)
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_python_sdk_drives_wick_mcp() {
    if !nix::unistd::geteuid().is_root() {
        return wick_testkit::skip("needs root");
    }
    let Some(python) = python() else {
        return wick_testkit::skip(
            "no Python with the MCP SDK (run scripts/install-host-deps or set WICK_TEST_PYTHON)",
        );
    };
    let mut env = WickdEnv::new_with_image_extra(FAKE_AGENT_CONFIG, "agent = true");
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env.start();

    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);

    // The client starts `wick mcp` itself, inside the daemon's network namespace.
    let server = env.wick_cmd();
    let mut argv: Vec<String> = vec![server.get_program().to_string_lossy().into()];
    argv.extend(server.get_args().map(|a| a.to_string_lossy().into_owned()));
    argv.push("mcp".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(work.path())
        .arg(&repo)
        .args(&argv)
        .env("WICK_ROOT", env.root())
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "MCP client failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- daemon ---\n{}",
        env.daemon_log()
    );
    assert!(stdout.contains("ok: no VM left"), "{stdout}");
    assert!(env.vmm_processes().is_empty());
}
