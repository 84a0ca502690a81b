//! A **test harness**, not production code: the real `wick-agent` binary on a Unix socket behind
//! the fake hybrid-vsock muxer ([`FakeVsockMuxer`]), and a real [`AgentClient`] connected
//! through it, as the host would reach a guest's agent. The "guest" filesystem is this host:
//! the agent writes below its `--root-prefix` (`root`), and guest paths are temporary
//! directories. Shared by the agent's and the workspace's tests and benchmarks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wick_agent_proto::testing::FakeVsockMuxer;
use wick_agent_proto::{AgentClient, AGENT_PORT};

/// How long [`AgentHarness::start`] waits for the agent to answer through the muxer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `wick-agent` and a client connected to it; the agent is killed (by pid) and
/// reaped on drop.
pub struct AgentHarness {
    pub dir: tempfile::TempDir,
    /// The `--root-prefix` given to the agent (Configure writes below it).
    pub root: PathBuf,
    /// The muxer's hybrid-vsock socket.
    pub vsock: PathBuf,
    pub client: AgentClient,
    agent: Child,
    _mux: FakeVsockMuxer,
}

impl AgentHarness {
    /// Starts the agent found by [`agent_bin`]; see [`AgentHarness::start_with`].
    pub async fn start() -> AgentHarness {
        AgentHarness::start_with(&agent_bin()).await
    }

    /// Starts the agent binary `bin` and connects through the fake muxer (exercising the
    /// client's retries, since the agent may not listen yet when the first CONNECT arrives).
    /// Its stderr is shown when `WICK_AGENT_TEST_LOG` is set.
    pub async fn start_with(bin: &Path) -> AgentHarness {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vsock = dir.path().join("vsock.sock");
        let mux = FakeVsockMuxer::start(&vsock, &[(AGENT_PORT, agent_sock.clone())]).unwrap();
        let quiet = std::env::var_os("WICK_AGENT_TEST_LOG").is_none();
        let agent = Command::new(bin)
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
        let client = AgentClient::connect(&vsock, AGENT_PORT, CONNECT_TIMEOUT)
            .await
            .expect("agent answers through the fake muxer");
        AgentHarness {
            dir,
            root,
            vsock,
            client,
            agent,
            _mux: mux,
        }
    }

    /// A path in the test's temporary directory (used as a guest path).
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }
}

impl Drop for AgentHarness {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

/// The `wick-agent` binary to run: `WICK_AGENT_BIN` if set, else `wick-agent` next to the
/// running test's profile directory (built by `cargo test --workspace` / `cargo build -p
/// wick-agent`), else it is built once into its own target directory (a nested cargo on the
/// shared target dir would wait for the lock held by the cargo running this test).
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

/// Whether the test runs as root (some agent features need it: other users, chown).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `tool` is an executable file on `PATH`.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
        .unwrap_or(false)
}
