//! Test harness shared by the integration tests and the benchmark: the real `wick-agent` binary
//! on a Unix socket, the fake hybrid-vsock muxer in front of it, and a real `AgentClient`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wick_agent_proto::testing::FakeVsockMuxer;
use wick_agent_proto::{AgentClient, AGENT_PORT};

pub struct Harness {
    pub dir: tempfile::TempDir,
    /// The `--root-prefix` given to the agent (Configure writes below it).
    pub root: PathBuf,
    pub vsock: PathBuf,
    pub client: AgentClient,
    agent: Child,
    _mux: FakeVsockMuxer,
}

impl Harness {
    /// Starts the agent and connects through the fake muxer (exercising the client's retries,
    /// since the agent may not listen yet when the first CONNECT arrives).
    pub async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vsock = dir.path().join("vsock.sock");
        let mux = FakeVsockMuxer::start(&vsock, &[(AGENT_PORT, agent_sock.clone())]).unwrap();
        let quiet = std::env::var_os("WICK_AGENT_TEST_LOG").is_none();
        let agent = Command::new(env!("CARGO_BIN_EXE_wick-agent"))
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
        let client = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(20))
            .await
            .expect("agent answers through the fake muxer");
        Harness {
            dir,
            root,
            vsock,
            client,
            agent,
            _mux: mux,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
        .unwrap_or(false)
}
