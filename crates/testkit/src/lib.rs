//! Test fakes and fixtures. Everything here is a stand-in, named as one.
//!
//! - `fake-firecracker` (a binary of this crate): an API-faithful fake of Firecracker v1.x.
//! - `hostile-agent` (a binary of this crate): a fake, hostile guest agent that answers each
//!   request as a script says (crafted tars, escape sequences, raw frames); see [`hostile`].
//! - [`agent`]: a test harness running the real `wick-agent` behind the fake vsock muxer.
//! - [`cargo_bin`]: the path of a workspace binary, for tests that spawn one.
//! - [`dns`]: a fake upstream DNS server (a fixed table of A records) and a tiny DNS client.
//! - [`wickd`]: a real `wickd` in an isolated `WICK_ROOT`, with the fake Firecracker as its VMM.
//! - [`inspect`]: file-tree snapshots, files owned by a uid, `/proc/<pid>/status` ids.
//! - [`skip`]: how a test that cannot run here says so (never a silent pass).

pub mod agent;
pub mod dns;
pub mod hostile;
pub mod inspect;
pub mod registry;
mod skip;
pub mod wickd;

pub use skip::{skip, SKIP_LOG_ENV};

use std::path::{Path, PathBuf};

/// Path of the workspace binary `name` in the cargo target dir of the running test.
///
/// Tests run from `target/<profile>/deps/`; binaries sit in `target/<profile>/`. `cargo test`
/// builds the binaries of the package under test, but not those of other packages (e.g.
/// `fake-firecracker` for `cargo test -p wick-vmm`): when the binary is missing and the test runs
/// under cargo (`CARGO` is set), it is built once with `cargo build --workspace --bin <name>`.
/// Panics with a clear message when it still cannot be found.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe of the test binary");
    let mut dir = exe
        .parent()
        .expect("test binary has a parent dir")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        build(name, &dir);
    }
    if path.is_file() {
        return path;
    }
    panic!(
        "workspace binary {name:?} not found at {}; build it first: `cargo build --workspace --bin {name}`",
        path.display()
    );
}

/// Best effort `cargo build` of one workspace binary into the profile dir `dir`.
fn build(name: &str, dir: &Path) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if dir.join(name).is_file() {
        return;
    }
    let (Some(cargo), Some(profile), Some(target_dir)) = (
        std::env::var_os("CARGO"),
        dir.file_name().and_then(|p| p.to_str()),
        dir.parent(),
    ) else {
        return;
    };
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--workspace", "--bin", name])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("wick-testkit: building missing binary {name} ...");
    let _ = cmd.status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_fake_firecracker() {
        let p = cargo_bin("fake-firecracker");
        assert!(p.is_file());
        assert!(p.parent().unwrap().join("deps").is_dir());
    }
}
pub mod guest;
