//! Tests of the fake Firecracker itself, over raw HTTP/1.1 on its Unix socket: the API details
//! the driver's contract tests do not reach (validation wording, routes, pause/resume, PATCH,
//! the hybrid-vsock listener, signals).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Fake {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Fake {
    fn start() -> Fake {
        Fake::start_in(tempfile::tempdir().unwrap())
    }

    /// A fake whose working directory (and socket dir) is `dir`, as the driver runs it.
    fn start_in(dir: tempfile::TempDir) -> Fake {
        let sock = dir.path().join("fc.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_fake-firecracker"))
            .current_dir(dir.path())
            .args(["--api-sock"])
            .arg(&sock)
            .args(["--id", "fake1", "--level", "Debug", "--no-seccomp"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "fake API socket never came up");
            std::thread::sleep(Duration::from_millis(2));
        }
        Fake { child, sock, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, b"").unwrap();
        p
    }

    /// One request; returns (status, parsed JSON body or Null).
    fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let payload = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        let v = if payload.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(payload).unwrap()
        };
        (status, v)
    }

    fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.req("PUT", path, Some(&body.to_string()))
    }

    fn fault(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let (status, v) = self.req(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {v}");
        v["fault_message"].as_str().unwrap().to_owned()
    }

    fn boot(&self) {
        let kernel = self.file("vmlinux");
        let root = self.file("rootfs.ext4");
        assert_eq!(
            self.put(
                "/boot-source",
                json!({ "kernel_image_path": kernel, "boot_args": "console=ttyS0" })
            )
            .0,
            204
        );
        assert_eq!(
            self.put("/drives/rootfs", json!({ "drive_id": "rootfs", "path_on_host": root, "is_root_device": true, "is_read_only": false })).0,
            204
        );
        assert_eq!(
            self.put("/actions", json!({ "action_type": "InstanceStart" }))
                .0,
            204
        );
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "fake did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn instance_info_and_version() {
    let f = Fake::start();
    let (s, v) = f.req("GET", "/", None);
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({ "id": "fake1", "state": "Not started", "vmm_version": "1.16.0-fake", "app_name": "Firecracker" })
    );
    assert_eq!(
        f.req("GET", "/version", None).1["firecracker_version"],
        "1.16.0-fake"
    );
    // Firecracker's defaults until configured.
    let (_, mc) = f.req("GET", "/machine-config", None);
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );
}

#[test]
fn validation_speaks_firecracker() {
    let f = Fake::start();
    let m = f.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "bogus": 1}"#),
    );
    assert!(m.starts_with("An error occurred when deserializing the json body of a request: unknown field `bogus`"), "{m}");
    let m = f.fault("PUT", "/machine-config", Some("{not json"));
    assert!(
        m.starts_with("An error occurred when deserializing the json body of a request"),
        "{m}"
    );
    assert!(f
        .fault(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 33, "mem_size_mib": 256}"#)
        )
        .contains("vCPU"));
    assert!(f
        .fault(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#)
        )
        .contains("memory"));
    assert_eq!(
        f.fault("PUT", "/nonsense", Some("{}")),
        "Invalid request method and/or path: PUT nonsense."
    );
    assert_eq!(
        f.fault("DELETE", "/drives/x", None),
        "Invalid request method and/or path: DELETE drives."
    );
    assert_eq!(f.fault("PUT", "/boot-source", None), "Empty PUT request.");
    let m = f.fault(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    );
    assert!(
        m.starts_with("Boot source error: The kernel file cannot be opened: "),
        "{m}"
    );
    let m = f.fault(
        "PUT",
        "/drives/rootfs",
        Some(r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": true}"#),
    );
    assert_eq!(
        m,
        "The id from the path does not match the id from the body!"
    );
    let m = f.fault(
        "PUT",
        "/drives/rootfs",
        Some(r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": true}"#),
    );
    assert!(m.contains("/nonexistent"), "{m}");
    let m = f.fault(
        "PUT",
        "/logger",
        Some(r#"{"log_path": "/nonexistent/dir/fc.log"}"#),
    );
    assert!(m.starts_with("Logger error"), "{m}");
    let m = f.fault(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/x"}"#),
    );
    assert!(m.contains("CID"), "{m}");
    let m = f.fault(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#),
    );
    assert!(m.contains("MAC"), "{m}");
    let m = f.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(
        m,
        "Start microvm error: Cannot start microvm without kernel configuration."
    );
    assert!(f
        .fault("PUT", "/actions", Some(r#"{"action_type": "Explode"}"#))
        .contains("unknown variant"));
    assert!(f
        .fault("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .contains("before starting"));
    assert!(f
        .fault(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#)
        )
        .contains("before starting"));
}

#[test]
fn lifecycle_pause_patch_and_post_boot_refusals() {
    let f = Fake::start();
    let log = f.file("firecracker.log");
    let metrics = f.file("metrics.json");
    assert_eq!(f.put("/logger", json!({ "log_path": log, "level": "Info", "show_level": true, "show_log_origin": false })).0, 204);
    assert_eq!(f.put("/metrics", json!({ "metrics_path": metrics })).0, 204);
    assert_eq!(
        f.put(
            "/machine-config",
            json!({ "vcpu_count": 2, "mem_size_mib": 512, "smt": false })
        )
        .0,
        204
    );
    assert_eq!(
        f.put("/network-interfaces/eth0", json!({ "iface_id": "eth0", "host_dev_name": "wk-0123", "guest_mac": "06:00:ac:1e:00:02" })).0,
        204
    );
    f.boot();
    assert_eq!(f.req("GET", "/", None).1["state"], "Running");
    assert!(std::fs::read_to_string(&metrics)
        .unwrap()
        .contains("utc_timestamp_ms"));
    assert!(!std::fs::read_to_string(&log).unwrap().is_empty());

    let post = "The requested operation is not supported after starting the microVM.";
    assert_eq!(
        f.fault(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#)
        ),
        post
    );
    assert_eq!(
        f.fault(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        post
    );

    assert_eq!(
        f.put("/actions", json!({ "action_type": "FlushMetrics" }))
            .0,
        204
    );
    assert_eq!(f.req("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert_eq!(f.req("GET", "/", None).1["state"], "Paused");
    assert_eq!(
        f.req("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    assert_eq!(f.req("GET", "/", None).1["state"], "Running");
    assert!(f
        .fault("PATCH", "/vm", Some(r#"{"state": "Sleeping"}"#))
        .contains("unknown variant"));

    let new_root = f.file("rootfs2.ext4");
    let body = json!({ "drive_id": "rootfs", "path_on_host": new_root }).to_string();
    assert_eq!(f.req("PATCH", "/drives/rootfs", Some(&body)).0, 204);
    assert!(f
        .fault("PATCH", "/drives/nope", Some(r#"{"drive_id": "nope"}"#))
        .contains("nope"));
    assert_eq!(
        f.req(
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0"}"#)
        )
        .0,
        204
    );

    let (_, cfg) = f.req("GET", "/vm/config", None);
    assert_eq!(cfg["drives"][0]["path_on_host"], json!(new_root));
    assert_eq!(
        cfg["network-interfaces"][0]["guest_mac"],
        "06:00:ac:1e:00:02"
    );
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 512);
}

#[test]
fn vsock_listener_reads_connect_and_closes() {
    let mut f = Fake::start();
    let uds = f.dir.path().join("vsock.sock");
    assert_eq!(
        f.put("/vsock", json!({ "guest_cid": 3, "uds_path": uds }))
            .0,
        204
    );
    assert!(uds.exists(), "bound at PUT /vsock, like Firecracker");
    f.boot();
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap();
    assert_eq!(n, 0, "no guest agent: closed without an OK");

    // Ctrl+Alt+Del: the fake guest powers off, the process exits 0 and removes its vsock UDS.
    assert_eq!(
        f.put("/actions", json!({ "action_type": "SendCtrlAltDel" }))
            .0,
        204
    );
    assert_eq!(f.wait_exit().code(), Some(0));
    assert!(!uds.exists());
    assert!(
        f.sock.exists(),
        "the API socket is left behind, like Firecracker"
    );
}

#[test]
fn existing_vsock_path_is_refused() {
    let f = Fake::start();
    let uds = f.file("vsock.sock");
    let m = f.fault(
        "PUT",
        "/vsock",
        Some(&json!({ "guest_cid": 3, "uds_path": uds }).to_string()),
    );
    assert!(m.starts_with("Vsock config error"), "{m}");
}

#[test]
fn sigterm_exits_cleanly_and_unlinks_the_socket() {
    let mut f = Fake::start();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(f.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(f.wait_exit().code(), Some(0));
    assert!(!f.sock.exists());
}

#[test]
fn cli_shape() {
    let bin = Path::new(env!("CARGO_BIN_EXE_fake-firecracker"));
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Firecracker v1.16.0-fake"));
    let out = Command::new(bin).arg("--id").arg("x").output().unwrap();
    assert!(!out.status.success(), "--api-sock is required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-sock"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fc.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = Command::new(bin)
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedToBindSocket"));
}

/// `/snapshot/load` opens the drives the state names, exactly as given at boot: a relative
/// path against the loading process's working directory (Firecracker cannot rename drives on
/// a load), so a restore into another VM dir opens that dir's disk, and fails without one.
#[test]
fn snapshot_load_opens_the_drives_relative_to_the_working_directory() {
    let src = Fake::start();
    let kernel = src.file("vmlinux");
    src.file("rootfs.ext4");
    assert_eq!(
        src.put(
            "/boot-source",
            json!({ "kernel_image_path": kernel, "boot_args": "x" })
        )
        .0,
        204
    );
    assert_eq!(
        src.put(
            "/drives/rootfs",
            json!({ "drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true })
        )
        .0,
        204
    );
    assert_eq!(
        src.put("/actions", json!({ "action_type": "InstanceStart" }))
            .0,
        204
    );
    assert_eq!(
        src.req("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let (state, mem) = (
        src.dir.path().join("s.vmstate"),
        src.dir.path().join("s.mem"),
    );
    assert_eq!(
        src.put(
            "/snapshot/create",
            json!({ "snapshot_path": state, "mem_file_path": mem })
        )
        .0,
        204
    );
    let load = json!({ "snapshot_path": state, "mem_backend": { "backend_type": "File", "backend_path": mem } }).to_string();

    let empty = Fake::start();
    let fault = empty.fault("PUT", "/snapshot/load", Some(&load));
    assert!(
        fault.contains("Unable to open the backing file rootfs.ext4"),
        "{fault}"
    );
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("rootfs.ext4"), b"").unwrap();
    let dst = Fake::start_in(other);
    assert_eq!(dst.req("PUT", "/snapshot/load", Some(&load)).0, 204);
    assert_eq!(dst.req("GET", "/", None).1["state"], "Paused");
}
