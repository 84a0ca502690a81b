//! Test harness shared by the integration tests and the benchmark: the real `wick-agent` binary
//! on a Unix socket behind the fake hybrid-vsock muxer (as in `crates/agent/tests/support`), a
//! real `AgentClient`, and helpers to build git repositories. The "guest" filesystem is this
//! host, so guest paths are temporary directories.
//!
//! The agent binary is `WICK_AGENT_BIN` if set, else `wick-agent` next to this test's profile
//! directory (built by `cargo test --workspace` / `cargo build -p wick-agent`), else it is built
//! once into its own target directory (a nested cargo on the shared target dir would wait for
//! the lock held by the cargo running this test).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wick_agent_proto::testing::FakeVsockMuxer;
use wick_agent_proto::{AgentClient, AGENT_PORT};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub client: AgentClient,
    agent: Child,
    _mux: FakeVsockMuxer,
}

impl Harness {
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vsock = dir.path().join("vsock.sock");
        let mux = FakeVsockMuxer::start(&vsock, &[(AGENT_PORT, agent_sock.clone())]).unwrap();
        let quiet = std::env::var_os("WICK_AGENT_TEST_LOG").is_none();
        let agent = Command::new(agent_bin())
            .arg("--listen-unix")
            .arg(&agent_sock)
            .arg("--root-prefix")
            .arg(&root)
            .arg("--no-poweroff")
            .stderr(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn wick-agent");
        let client = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(30))
            .await
            .expect("agent answers through the fake muxer");
        Harness {
            dir,
            client,
            agent,
            _mux: mux,
        }
    }

    /// A path in the test's temporary directory (used as a guest path).
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

/// The `wick-agent` binary to run (see the module docs).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WICK_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let sibling = profile_dir.join("wick-agent");
    if sibling.is_file() {
        return sibling;
    }
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let target_dir = profile_dir
        .parent()
        .expect("target dir")
        .join("wick-workspace-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "wick-agent", "--target-dir"])
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    eprintln!("building wick-agent into {}", target_dir.display());
    let st = cmd.status().expect("run cargo build -p wick-agent");
    assert!(st.success(), "cargo build -p wick-agent failed");
    target_dir
        .join(if release { "release" } else { "debug" })
        .join("wick-agent")
}

/// Runs git in `dir` with a fixed identity and no user/system configuration; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(dir).args(args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn git_cmd(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ]);
    c
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}
