//! Test harness shared by the integration tests and the benchmark: testkit's agent harness
//! ([`wick_testkit::agent`]: the real `wick-agent` behind the fake hybrid-vsock muxer, a real
//! `AgentClient`; the agent binary is found by [`wick_testkit::agent::agent_bin`]), and helpers
//! to build git repositories. The "guest" filesystem is this host, so guest paths are temporary
//! directories.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub use wick_testkit::agent::AgentHarness as Harness;

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
