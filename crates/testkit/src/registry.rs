//! A real OCI registry for tests: the Debian `docker-registry` on 127.0.0.1 with its storage in
//! a temp dir, killed (by its pid) on drop. Tests push with their own client.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the Debian package installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Why a registry cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    (!Path::new(REGISTRY_BIN).is_file())
        .then(|| format!("{REGISTRY_BIN} is not installed (apt-get install docker-registry)"))
}

/// A running `docker-registry` on 127.0.0.1.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

/// Writes a registry config serving `data` on `addr` and returns its path.
fn write_config(dir: &Path, name: &str, data: &Path, addr: &str) -> std::path::PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            data.display()
        ),
    )
    .unwrap();
    config
}

/// `docker-registry serve CONFIG` through `cmd` (the registry binary, or a wrapper running it).
fn spawn(mut cmd: Command, config: &Path) -> Child {
    cmd.arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start docker-registry")
}

/// A second `docker-registry` serving a [`Registry`]'s storage inside another network namespace
/// (so a daemon there pulls what the test pushed), killed by its pid on drop.
pub struct Mirror {
    child: Child,
    /// `127.0.0.1:PORT`, inside that namespace.
    pub addr: String,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Serves this registry's storage on 127.0.0.1:`port` of another network namespace too:
    /// `wrap` turns a program into a command running there (e.g. `WickdEnv::in_netns`). Waits
    /// (up to 20 s, probing from inside the namespace with bash's `/dev/tcp`) until it listens.
    pub fn serve_in(&self, wrap: impl Fn(std::path::PathBuf) -> Command, port: u16) -> Mirror {
        let addr = format!("127.0.0.1:{port}");
        let config = write_config(
            self._dir.path(),
            &format!("mirror-{port}.yml"),
            &self._dir.path().join("data"),
            &addr,
        );
        let mirror = Mirror {
            child: spawn(wrap(REGISTRY_BIN.into()), &config),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        while Instant::now() < deadline {
            let up = wrap("/bin/bash".into())
                .args(["-c", &probe])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return mirror;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the docker-registry mirror on {} did not listen",
            mirror.addr
        );
    }

    /// Starts one and waits until `/v2/` answers 200.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = write_config(dir.path(), "config.yml", &dir.path().join("data"), &addr);
        let child = spawn(Command::new(REGISTRY_BIN), &config);
        let r = Registry {
            child,
            addr,
            _dir: dir,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.") && buf.contains(" 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry on {} did not become ready", self.addr);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Only the process this guard started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
