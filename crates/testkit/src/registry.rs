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

impl Registry {
    /// Starts one and waits until `/v2/` answers 200.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start docker-registry");
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
