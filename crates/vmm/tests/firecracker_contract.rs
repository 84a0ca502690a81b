//! Contract tests of the Firecracker driver: the real driver code against the fake Firecracker
//! (always), and against a real Firecracker binary when `WICK_TEST_FIRECRACKER_BIN` names one
//! (otherwise a line on stderr says the real variant was skipped — it is never reported as run).
//!
//! A real guest cannot boot on the development host (KVM limitation), so with the real binary the
//! boot contract stops at "all configuration accepted, InstanceStart reached"; set
//! `WICK_TEST_FIRECRACKER_KERNEL` to an ELF vmlinux to require a Running instance instead.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;
use wick_host::proc;
use wick_model::VmmHandle;
use wick_vmm::firecracker::Firecracker;
use wick_vmm::{Vmm, VmmConfig, VmmError};

const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";

#[derive(Clone)]
struct Target {
    label: &'static str,
    bin: PathBuf,
    fake: bool,
}

fn fake_bin() -> PathBuf {
    wick_testkit::cargo_bin("fake-firecracker")
}

/// The fake, plus the real binary when configured.
fn targets() -> Vec<Target> {
    let mut v = vec![Target {
        label: "fake",
        bin: fake_bin(),
        fake: true,
    }];
    match std::env::var_os("WICK_TEST_FIRECRACKER_BIN") {
        Some(p) if !p.is_empty() => v.push(Target {
            label: "real",
            bin: PathBuf::from(p),
            fake: false,
        }),
        _ => {
            static ONCE: Once = Once::new();
            ONCE.call_once(|| {
                wick_testkit::skip(
                    "the real-Firecracker variants of the contract tests \
                     (WICK_TEST_FIRECRACKER_BIN is not set); only the fake was tested",
                );
            });
        }
    }
    v
}

/// Writes an executable script without ever holding a writable fd in this (multi-threaded)
/// process, so a concurrent fork cannot make its exec fail with ETXTBSY.
fn write_script(path: &Path, body: &str) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"printf '%s' "$1" > "$2" && chmod 755 "$2""#)
        .arg("sh")
        .arg(format!("#!/bin/sh\n{body}\n"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A wrapper that runs the fake with extra environment (the fake's failure knobs).
fn fake_with_env(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    let script = dir.join("fake-firecracker-wrapper");
    let mut body = String::new();
    for (k, v) in env {
        body.push_str(&format!("export {k}='{v}'\n"));
    }
    body.push_str(&format!("exec '{}' \"$@\"", fake_bin().display()));
    write_script(&script, &body);
    script
}

/// One VMM under test. Dropping it SIGKILLs the process if still alive (pid + start time).
struct Vm {
    label: &'static str,
    fc: Firecracker,
    handle: VmmHandle,
    child: Option<tokio::process::Child>,
    dir: TempDir,
}

impl Vm {
    fn new(label: &'static str, bin: &Path) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("0123456789abcdef");
        std::fs::create_dir(&vm_dir).unwrap();
        let fc = Firecracker::new(bin);
        let handle = fc.plan(&vm_dir);
        Vm {
            label,
            fc,
            handle,
            child: None,
            dir,
        }
    }

    async fn spawned(label: &'static str, bin: &Path) -> Vm {
        let mut vm = Vm::new(label, bin);
        vm.spawn()
            .await
            .unwrap_or_else(|e| panic!("[{label}] spawn: {e}"));
        vm
    }

    async fn spawn(&mut self) -> Result<(), VmmError> {
        let s = self
            .fc
            .spawn(&self.handle, &self.config(), SPAWN_TIMEOUT)
            .await?;
        self.handle.pid = Some(s.pid);
        self.handle.start_time = Some(s.start_time);
        self.child = s.child;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.handle.pid.unwrap()
    }

    fn alive(&self) -> bool {
        proc::is_alive(self.pid(), self.handle.start_time)
    }

    /// A kernel (a real one from `WICK_TEST_FIRECRACKER_KERNEL` if set), a root disk and one
    /// extra disk, all inside the temp dir.
    fn config(&self) -> VmmConfig {
        let kernel = match std::env::var_os("WICK_TEST_FIRECRACKER_KERNEL") {
            Some(k) if !k.is_empty() => PathBuf::from(k),
            _ => {
                let k = self.dir.path().join("vmlinux");
                std::fs::write(&k, b"not really a kernel").unwrap();
                k
            }
        };
        let root = self.dir.path().join("rootfs.ext4");
        let work = self.dir.path().join("work.ext4");
        for d in [&root, &work] {
            std::fs::File::create(d).unwrap().set_len(1 << 20).unwrap();
        }
        VmmConfig {
            vm_id: "0123456789abcdef".into(),
            vcpu: 2,
            memory_mib: 256,
            kernel,
            initrd: None,
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            root_disk: root,
            extra_disks: vec![work],
            guest_cid: 3,
            tap: None,
            guest_mac: None,
            jail: None,
            require_kvm: false,
        }
    }

    fn real_kernel() -> bool {
        std::env::var_os("WICK_TEST_FIRECRACKER_KERNEL").is_some_and(|k| !k.is_empty())
    }

    /// Boots; for a real binary without a real kernel, accepts InstanceStart's refusal of the
    /// dummy kernel (everything before it was accepted). Returns whether the guest is running.
    async fn boot(&self, fake: bool) -> bool {
        let cfg = self.config();
        let r = self.fc.boot(&self.handle, &cfg, BOOT_TIMEOUT).await;
        if fake || Self::real_kernel() {
            r.unwrap_or_else(|e| panic!("[{}] boot: {e}", self.label));
            true
        } else {
            match r {
                Err(VmmError::Api { call, message }) if call == "PUT /actions" => {
                    eprintln!(
                        "[real] InstanceStart refused the dummy kernel as expected: {message}"
                    );
                    false
                }
                other => {
                    panic!("[real] expected InstanceStart to refuse a dummy kernel, got {other:?}")
                }
            }
        }
    }

    async fn reap(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("child to reap");
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("child exits")
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.handle.log_path).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(pid) = self.handle.pid {
            let _ = proc::signal(pid, self.handle.start_time, Signal::SIGKILL);
        }
        // A still-held tokio Child is reaped by tokio's orphan queue.
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn spawn_makes_the_api_ready() {
    for t in targets() {
        let mut vm = Vm::spawned(t.label, &t.bin).await;
        assert!(vm.handle.api_socket.exists(), "[{}] api socket", t.label);
        assert!(vm.alive());
        assert_eq!(proc::start_time(vm.pid()), vm.handle.start_time);
        assert_eq!(
            vm.fc.instance_state(&vm.handle).await.unwrap(),
            "Not started",
            "[{}]",
            t.label
        );
        let info = vm
            .fc
            .api(&vm.handle, "GET", "/", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info["app_name"], "Firecracker", "[{}]", t.label);
        assert_eq!(
            info["id"], "0123456789abcdef",
            "[{}] --id is the VM dir name",
            t.label
        );
        assert_eq!(vm.fc.find(&vm.handle), Some(vm.pid()));

        // Stopping a VMM that never booted: the Ctrl+Alt+Del is refused, so straight to SIGKILL.
        let started = Instant::now();
        vm.fc
            .stop(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "[{}] no pointless wait",
            t.label
        );
        assert!(!vm.alive());
        assert_eq!(vm.fc.find(&vm.handle), None);
        vm.reap().await;
        vm.fc.cleanup(&vm.handle);
        assert!(!vm.handle.api_socket.exists());
    }
}

#[tokio::test]
async fn boot_reaches_running() {
    for t in targets() {
        let mut vm = Vm::spawned(t.label, &t.bin).await;
        let running = vm.boot(t.fake).await;
        let dir = vm.handle.api_socket.parent().unwrap().to_path_buf();
        assert!(
            dir.join("firecracker.log").exists(),
            "[{}] logger file created",
            t.label
        );
        assert!(
            dir.join("metrics.json").exists(),
            "[{}] metrics file created",
            t.label
        );
        assert!(
            vm.handle.vsock_socket.exists(),
            "[{}] vsock UDS bound",
            t.label
        );

        let config = vm
            .fc
            .api(&vm.handle, "GET", "/vm/config", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            config["machine-config"]["vcpu_count"], 2,
            "[{}] {config}",
            t.label
        );
        assert_eq!(
            config["machine-config"]["mem_size_mib"], 256,
            "[{}] {config}",
            t.label
        );
        let drives = config["drives"].as_array().unwrap();
        let ids: Vec<&str> = drives
            .iter()
            .map(|d| d["drive_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["rootfs", "disk1"], "[{}]", t.label);
        assert_eq!(drives[0]["is_root_device"], true);
        assert_eq!(drives[1]["is_root_device"], false);
        assert_eq!(config["vsock"]["guest_cid"], 3);

        if running {
            assert_eq!(vm.fc.instance_state(&vm.handle).await.unwrap(), "Running");
            // Pre-boot configuration is refused once started, with Firecracker's words.
            let err = vm
                .fc
                .api(
                    &vm.handle,
                    "PUT",
                    "/machine-config",
                    Some(serde_json::json!({ "vcpu_count": 1, "mem_size_mib": 128 })),
                )
                .await
                .unwrap_err();
            match err {
                VmmError::Api { call, message } => {
                    assert_eq!(call, "PUT /machine-config");
                    assert_eq!(message, POST_BOOT, "[{}]", t.label);
                }
                other => panic!("[{}] unexpected {other:?}", t.label),
            }
            let err = vm
                .fc
                .boot(&vm.handle, &vm.config(), BOOT_TIMEOUT)
                .await
                .unwrap_err();
            assert!(err.to_string().contains(POST_BOOT), "[{}] {err}", t.label);
        }
        if t.fake {
            let log = vm.log();
            assert!(
                log.contains("fake guest: reached init"),
                "serial console in vmm.log: {log}"
            );
        }
        vm.fc
            .stop(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap();
        vm.reap().await;
        vm.fc.cleanup(&vm.handle);
    }
}

#[tokio::test]
async fn missing_kernel_is_an_api_error_naming_the_kernel() {
    for t in targets() {
        let mut vm = Vm::spawned(t.label, &t.bin).await;
        let mut cfg = vm.config();
        cfg.kernel = vm.dir.path().join("no-such-vmlinux");
        let err = vm
            .fc
            .boot(&vm.handle, &cfg, BOOT_TIMEOUT)
            .await
            .unwrap_err();
        match &err {
            VmmError::Api { call, message } => {
                assert_eq!(call, "PUT /boot-source", "[{}]", t.label);
                assert!(message.contains("kernel"), "[{}] {message}", t.label);
            }
            other => panic!("[{}] unexpected {other:?}", t.label),
        }
        assert!(err.to_string().contains("kernel"));
        assert_eq!(
            vm.fc.instance_state(&vm.handle).await.unwrap(),
            "Not started"
        );
        vm.fc
            .stop(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap();
        vm.reap().await;
        vm.fc.cleanup(&vm.handle);
    }
}

#[tokio::test]
async fn stale_sockets_are_unlinked_before_spawn() {
    for t in targets() {
        let mut vm = Vm::new(t.label, &t.bin);
        // Leftovers of a crashed VMM: a dead socket file and a plain file.
        drop(std::os::unix::net::UnixListener::bind(&vm.handle.api_socket).unwrap());
        std::fs::write(&vm.handle.vsock_socket, b"stale").unwrap();
        assert!(vm.handle.api_socket.exists());

        vm.spawn()
            .await
            .unwrap_or_else(|e| panic!("[{}] spawn over stale socket: {e}", t.label));
        assert!(
            !vm.handle.vsock_socket.exists(),
            "[{}] stale vsock removed",
            t.label
        );
        let running = vm.boot(t.fake).await;
        if running {
            assert!(vm.handle.vsock_socket.exists());
        }
        vm.fc
            .stop(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap();
        vm.reap().await;
        vm.fc.cleanup(&vm.handle);
    }
}

#[tokio::test]
async fn graceful_stop_then_cleanup() {
    let mut vm = Vm::spawned("fake", &fake_bin()).await;
    vm.boot(true).await;
    // A guest-initiated vsock listener the daemon would have created.
    let port_sock = PathBuf::from(format!("{}_1024", vm.handle.vsock_socket.display()));
    drop(std::os::unix::net::UnixListener::bind(&port_sock).unwrap());

    vm.fc
        .stop(&vm.handle, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!vm.alive());
    let status = vm.reap().await;
    assert_eq!(
        status.code(),
        Some(0),
        "the guest powered off, no SIGKILL needed"
    );
    assert!(vm.log().contains("Ctrl+Alt+Del"));

    vm.fc.cleanup(&vm.handle);
    for p in [&vm.handle.api_socket, &vm.handle.vsock_socket, &port_sock] {
        assert!(!p.exists(), "{} removed", p.display());
    }
    // Both are idempotent.
    vm.fc.cleanup(&vm.handle);
    vm.fc
        .stop(&vm.handle, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn stop_falls_back_to_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_with_env(tmp.path(), &[("FAKE_FC_IGNORE_CTRL_ALT_DEL", "1")]);
    let mut vm = Vm::spawned("fake", &bin).await;
    vm.boot(true).await;
    let started = Instant::now();
    vm.fc
        .stop(&vm.handle, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the guest first"
    );
    assert!(!vm.alive());
    let status = vm.reap().await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status}");
    assert!(vm.log().contains("ignoring Ctrl+Alt+Del"));
    vm.fc.cleanup(&vm.handle);
}

#[tokio::test]
async fn kill_sends_the_signal_to_the_recorded_process_only() {
    for t in targets() {
        let mut vm = Vm::spawned(t.label, &t.bin).await;

        // A wrong start time (pid reused by someone else): nothing is sent.
        let mut other = vm.handle.clone();
        other.start_time = other.start_time.map(|s| s + 1);
        vm.fc.kill(&other, Signal::SIGKILL).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            vm.alive(),
            "[{}] a mismatched start time must protect the process",
            t.label
        );

        vm.fc.kill(&vm.handle, Signal::SIGTERM).unwrap();
        wait_until("exit after SIGTERM", Duration::from_secs(5), || !vm.alive()).await;
        let status = vm.reap().await;
        if t.fake {
            assert_eq!(status.code(), Some(0), "the fake exits cleanly on SIGTERM");
            assert!(
                !vm.handle.api_socket.exists(),
                "the fake unlinks its socket on SIGTERM"
            );
        }
        // Gone: killing again is a no-op, not an error.
        vm.fc.kill(&vm.handle, Signal::SIGKILL).unwrap();
        vm.fc.cleanup(&vm.handle);
        assert!(!vm.handle.api_socket.exists());
    }
}

#[tokio::test]
async fn find_scans_proc_when_the_recorded_pid_is_wrong() {
    for t in targets() {
        let mut vm = Vm::spawned(t.label, &t.bin).await;
        let real_pid = vm.pid();

        // Recorded pid is some other live process (this test) with a wrong start time.
        let mut wrong = vm.handle.clone();
        wrong.pid = Some(std::process::id());
        wrong.start_time = Some(1);
        assert_eq!(vm.fc.find(&wrong), Some(real_pid), "[{}]", t.label);
        // Nothing recorded at all (crash between spawn and persisting the pid).
        wrong.pid = None;
        wrong.start_time = None;
        assert_eq!(vm.fc.find(&wrong), Some(real_pid), "[{}]", t.label);
        // A pid without start time is trusted only if it serves this socket.
        wrong.pid = Some(std::process::id());
        assert_eq!(vm.fc.find(&wrong), Some(real_pid), "[{}]", t.label);

        // stop() goes through find(), so it stops the right process even with a wrong record.
        wrong.pid = Some(std::process::id());
        wrong.start_time = Some(1);
        vm.fc.stop(&wrong, Duration::from_secs(2)).await.unwrap();
        assert!(!vm.alive());
        assert!(
            proc::is_alive(std::process::id(), None),
            "the test process survived"
        );
        assert_eq!(vm.fc.find(&wrong), None);
        vm.reap().await;
        vm.fc.cleanup(&vm.handle);
    }
}

#[tokio::test]
async fn unexpected_exit_is_observable() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_with_env(tmp.path(), &[("FAKE_FC_EXIT_AFTER_START_MS", "150")]);
    let mut vm = Vm::spawned("fake", &bin).await;
    vm.boot(true).await;
    assert!(vm.alive());
    // Not reaped yet: a zombie, which must count as dead.
    wait_until("the fake guest to crash", Duration::from_secs(5), || {
        !vm.alive()
    })
    .await;
    assert_eq!(vm.fc.find(&vm.handle), None);
    let status = vm.reap().await;
    assert_eq!(status.code(), Some(1));
    assert!(vm.log().contains("guest crashed"), "{}", vm.log());
    // Stop of a dead VMM is success; cleanup removes what it left.
    vm.fc
        .stop(&vm.handle, Duration::from_secs(1))
        .await
        .unwrap();
    vm.fc.cleanup(&vm.handle);
    assert!(!vm.handle.api_socket.exists());
}

#[tokio::test]
async fn start_failure_is_reported_with_the_fault_message() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_with_env(
        tmp.path(),
        &[(
            "FAKE_FC_FAIL_START",
            "Kernel Loader: Invalid Elf magic number",
        )],
    );
    let mut vm = Vm::spawned("fake", &bin).await;
    let err = vm
        .fc
        .boot(&vm.handle, &vm.config(), BOOT_TIMEOUT)
        .await
        .unwrap_err();
    match err {
        VmmError::Api { call, message } => {
            assert_eq!(call, "PUT /actions");
            assert_eq!(message, "Kernel Loader: Invalid Elf magic number");
        }
        other => panic!("unexpected {other:?}"),
    }
    vm.fc
        .stop(&vm.handle, Duration::from_secs(5))
        .await
        .unwrap();
    vm.reap().await;
    vm.fc.cleanup(&vm.handle);
}

#[tokio::test]
async fn early_exit_during_spawn_carries_the_log_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("broken-firecracker");
    write_script(&bin, "echo 'Error: something is badly wrong' >&2\nexit 3");
    let mut vm = Vm::new("broken", &bin);
    let err = vm.spawn().await.unwrap_err();
    match &err {
        VmmError::Exited(msg) => assert!(msg.contains("something is badly wrong"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn existing_socket_makes_the_fake_exit_like_firecracker() {
    // Bypasses the driver (which unlinks first) to pin the fake's FailedToBindSocket behaviour.
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("fc.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = tokio::process::Command::new(fake_bin())
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedToBindSocket"));
}

#[tokio::test]
async fn missing_binary_is_reported() {
    let mut vm = Vm::new("missing", Path::new("/nonexistent/firecracker"));
    let err = vm.spawn().await.unwrap_err();
    assert!(matches!(err, VmmError::BinaryNotFound(_)), "{err:?}");
    assert!(err.to_string().contains("firecracker_bin"), "{err}");
}

#[test]
fn doctor_reports_binary_and_kvm() {
    for t in targets() {
        let checks = Firecracker::new(&t.bin).doctor();
        assert!(checks.iter().all(|c| c.area == "vmm"));
        let bin = checks.iter().find(|c| c.name == "firecracker").unwrap();
        assert_eq!(
            bin.status,
            wick_model::api::CheckStatus::Pass,
            "[{}] {bin:?}",
            t.label
        );
        assert!(
            bin.detail.contains("Firecracker v"),
            "[{}] {}",
            t.label,
            bin.detail
        );
        let kvm = checks.iter().find(|c| c.name == "kvm").unwrap();
        if kvm.status != wick_model::api::CheckStatus::Pass {
            assert!(kvm.hint.is_some());
        }
    }
    let checks = Firecracker::new("/nonexistent/firecracker").doctor();
    let bin = checks.iter().find(|c| c.name == "firecracker").unwrap();
    assert_eq!(bin.status, wick_model::api::CheckStatus::Fail);
    assert!(bin.hint.as_deref().unwrap().contains("firecracker_bin"));
}

mod snapshot {
    //! The snapshot API: boot → pause → create → a new process → load with overrides →
    //! resume, and the refusals, with Firecracker's state rules and words.

    use super::*;
    use wick_vmm::firecracker::request::{
        Action, MemBackend, MemBackendType, NetworkOverride, SnapshotCreate, SnapshotLoad,
        SnapshotType, VsockOverride,
    };
    use wick_vmm::RunState;

    const T: Duration = Duration::from_secs(5);
    const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
    const WHILE_RUNNING: &str = "save/restore unavailable while running";
    const NOT_FRESH: &str =
        "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

    fn create(dir: &Path) -> Action {
        Action::CreateSnapshot(SnapshotCreate {
            snapshot_type: SnapshotType::Full,
            snapshot_path: dir.join("vm.snap"),
            mem_file_path: dir.join("vm.mem"),
        })
    }

    fn load(dir: &Path, vsock: &Path, tap: &str) -> Action {
        Action::LoadSnapshot(SnapshotLoad {
            snapshot_path: dir.join("vm.snap"),
            mem_backend: MemBackend {
                backend_type: MemBackendType::File,
                backend_path: dir.join("vm.mem"),
            },
            track_dirty_pages: false,
            resume_vm: false,
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: tap.into(),
            }],
            vsock_override: Some(VsockOverride {
                uds_path: vsock.to_path_buf(),
            }),
            clock_realtime: true,
        })
    }

    fn refused(r: Result<(), VmmError>, words: &str, what: &str) {
        match r {
            Err(VmmError::Api { message, .. }) => {
                assert!(message.contains(words), "{what}: {message}")
            }
            other => panic!("{what}: expected a refusal with {words:?}, got {other:?}"),
        }
    }

    /// Before `InstanceStart`: no pause and no create; after boot-specific configuration: no
    /// load. What the real binary shows without a bootable guest.
    #[tokio::test]
    async fn refusals_before_boot_and_after_configuration() {
        for t in targets() {
            let vm = Vm::spawned(t.label, &t.bin).await;
            let dir = vm.dir.path().to_path_buf();
            refused(vm.fc.pause(&vm.handle, T).await, PRE_BOOT, t.label);
            refused(
                vm.fc.send(&vm.handle, &create(&dir)).await,
                PRE_BOOT,
                t.label,
            );
            let machine = serde_json::json!({ "vcpu_count": 1, "mem_size_mib": 128 });
            vm.fc
                .api(&vm.handle, "PUT", "/machine-config", Some(machine))
                .await
                .unwrap();
            let vsock = dir.join("other.vsock");
            let r = vm.fc.send(&vm.handle, &load(&dir, &vsock, "wk-none")).await;
            refused(r, NOT_FRESH, t.label);
            assert_eq!(
                vm.fc.instance_state(&vm.handle).await.unwrap(),
                "Not started",
                "[{}]",
                t.label
            );
        }
    }

    /// The whole sequence, on the fake fronting the real agent (a real guest cannot boot here):
    /// a command runs in the restored guest.
    #[tokio::test]
    async fn pause_create_load_in_a_new_process_resume() {
        if std::env::var_os("WICK_TEST_FIRECRACKER_BIN").is_some_and(|b| !b.is_empty()) {
            wick_testkit::skip(
                "the real-Firecracker variant of the snapshot sequence: it needs a booted \
                 guest, which this host's KVM cannot run (the refusals are tested against it)",
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let agent = wick_testkit::cargo_bin("wick-agent");
        let bin = fake_with_env(
            tmp.path(),
            &[("FAKE_FC_AGENT_BIN", &agent.to_string_lossy())],
        );
        let vm = Vm::spawned("fake", &bin).await;
        let mut cfg = vm.config();
        cfg.tap = Some("wk-src".into());
        vm.fc.boot(&vm.handle, &cfg, BOOT_TIMEOUT).await.unwrap();
        let snap = vm.dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();

        refused(
            vm.fc.send(&vm.handle, &create(&snap)).await,
            WHILE_RUNNING,
            "create while running",
        );
        vm.fc.pause(&vm.handle, T).await.unwrap();
        assert_eq!(
            vm.fc.run_state(&vm.handle, T).await.unwrap(),
            RunState::Paused
        );
        let Action::CreateSnapshot(req) = create(&snap) else {
            unreachable!()
        };
        vm.fc.create_snapshot(&vm.handle, req).await.unwrap();
        let mem = std::fs::metadata(snap.join("vm.mem")).unwrap();
        assert_eq!(mem.len(), 256 << 20, "memory file of mem_size_mib");
        assert!(snap.join("vm.snap").exists());

        // A fresh process elsewhere: the snapshot with the new TAP and vsock socket. The state
        // names the disks relative to the VM dir (`drive-rootfs`, `drive-disk1`: the driver's
        // links for disks kept outside it): the new VM dir has its own.
        let new = Vm::spawned("fake", &bin).await;
        let new_dir = new.handle.api_socket.parent().unwrap().to_path_buf();
        std::fs::copy(&cfg.root_disk, new_dir.join("drive-rootfs")).unwrap();
        for (i, d) in cfg.extra_disks.iter().enumerate() {
            std::fs::copy(d, new_dir.join(format!("drive-disk{}", i + 1))).unwrap();
        }
        let vsock = new.handle.vsock_socket.clone();
        let Action::LoadSnapshot(req) = load(&snap, &vsock, "wk-dst") else {
            unreachable!()
        };
        new.fc.load_snapshot(&new.handle, req).await.unwrap();
        assert_eq!(
            new.fc.run_state(&new.handle, T).await.unwrap(),
            RunState::Paused
        );
        let config = new
            .fc
            .api(&new.handle, "GET", "/vm/config", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(config["machine-config"]["mem_size_mib"], 256, "{config}");
        assert_eq!(config["network-interfaces"][0]["host_dev_name"], "wk-dst");
        assert_eq!(
            config["vsock"]["uds_path"],
            vsock.to_string_lossy().as_ref()
        );
        assert!(vsock.exists(), "vsock bound at the override");
        // Loaded means started: a second load is refused like any pre-boot request.
        refused(
            new.fc
                .send(&new.handle, &load(&snap, &vsock, "wk-dst"))
                .await,
            POST_BOOT,
            "load after load",
        );

        new.fc.resume(&new.handle, T).await.unwrap();
        assert_eq!(
            new.fc.run_state(&new.handle, T).await.unwrap(),
            RunState::Running
        );
        let client = wick_agent_proto::AgentClient::connect(&vsock, 10700, Duration::from_secs(10))
            .await
            .expect("the restored guest's agent answers");
        let out = client
            .channel()
            .exec(wick_agent_proto::ExecRequest::new(["echo", "restored"]))
            .await
            .unwrap()
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "restored");
        assert_eq!(out.status.code, Some(0));
    }

    /// A load names what is wrong with its memory backend.
    #[tokio::test]
    async fn load_checks_the_memory_backend() {
        let vm = Vm::spawned("fake", &fake_bin()).await;
        vm.boot(true).await;
        vm.fc.pause(&vm.handle, T).await.unwrap();
        let dir = vm.dir.path().to_path_buf();
        vm.fc.send(&vm.handle, &create(&dir)).await.unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.join("vm.mem"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let new = Vm::spawned("fake", &fake_bin()).await;
        let Action::LoadSnapshot(mut req) = load(&dir, &new.handle.vsock_socket, "wk-x") else {
            unreachable!()
        };
        req.network_overrides.clear();
        let r = new
            .fc
            .send(&new.handle, &Action::LoadSnapshot(req.clone()))
            .await;
        refused(r, "the memory file", "short memory file");
        req.mem_backend = MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: dir.join("no-handler.sock"),
        };
        let r = new.fc.send(&new.handle, &Action::LoadSnapshot(req)).await;
        refused(r, "UFFD handler socket", "no UFFD handler");
    }
}
