//! Tests of the QEMU driver.
//!
//! - QMP handling and the stop/cleanup logic against a **fake QMP server** (in this file) and
//!   stand-in processes (`sleep` carrying the socket arguments): always run.
//! - The real thing: QEMU under TCG boots Debian's cloud kernel (from the test cache) with the
//!   agent-channel sidecar (`wickd vsock-mux`). Skipped, with the reason on stderr, when QEMU or
//!   the kernel is unavailable. Without an initramfs that kernel cannot mount a virtio root, which
//!   is fine here: the driver's job ends at "the kernel runs".
//! - With the golden image and the real agent (`real_agent_survives_a_migration_to_a_file`):
//!   exec over the virtio-serial channel, save the VM to a file, restore it into a new QEMU and
//!   sidecar, exec again.

mod qemu_support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use wick_host::proc;
use wick_model::VmmHandle;
use wick_vmm::qemu::qmp::Qmp;
use wick_vmm::qemu::{Accel, Engine, Qemu, QemuOptions};
use wick_vmm::{Vmm, VmmConfig, VmmError};

const SPAWN_TIMEOUT: Duration = Duration::from_secs(20);
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

fn skip(_test: &str, why: &str) {
    wick_testkit::skip(why);
}

// ------------------------------------------------------------------ fake QMP server

/// A fake QMP server: greets, requires `qmp_capabilities` first, answers a few commands with the
/// request's `id`, emits an event before every answer, and records what it was asked.
struct FakeQmp {
    asked: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeQmp {
    /// `on_command` may act on a command (e.g. end a stand-in process) and return the answer,
    /// or `None` for the default answer.
    fn start(
        socket: &Path,
        status: &'static str,
        on_command: impl Fn(&str) -> Option<Value> + Send + Sync + 'static,
    ) -> FakeQmp {
        let listener = UnixListener::bind(socket).unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let on_command = Arc::new(on_command);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let on_command = on_command.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": ["oob"]}});
                    let _ = w.write_all(format!("{greeting}\r\n").as_bytes()).await;
                    let mut negotiated = false;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let req: Value = serde_json::from_str(&line).unwrap();
                        let cmd = req["execute"].as_str().unwrap_or("").to_string();
                        log.lock().unwrap().push(cmd.clone());
                        let id = req.get("id").cloned().unwrap_or(Value::Null);
                        let answer = if !negotiated && cmd != "qmp_capabilities" {
                            json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": id})
                        } else if let Some(a) = on_command(&cmd) {
                            let mut a = a;
                            a["id"] = id;
                            a
                        } else {
                            match cmd.as_str() {
                                "qmp_capabilities" => {
                                    negotiated = true;
                                    json!({"return": {}, "id": id})
                                }
                                "query-status" => {
                                    json!({"return": {"status": status, "running": status == "running"}, "id": id})
                                }
                                "cont" | "system_powerdown" | "quit" => {
                                    json!({"return": {}, "id": id})
                                }
                                other => {
                                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                                }
                            }
                        };
                        // An event first, and a stray answer to someone else's id: the client
                        // must skip both.
                        let ev = json!({"event": "FAKE_TICK", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}});
                        let stray = json!({"return": {"status": "bogus"}, "id": "not-yours"});
                        let _ = w
                            .write_all(format!("{ev}\r\n{stray}\r\n{answer}\r\n").as_bytes())
                            .await;
                        if cmd == "quit" {
                            return;
                        }
                    }
                });
            }
        });
        FakeQmp { asked, task }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn qmp_client_against_the_fake() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let fake = FakeQmp::start(&sock, "prelaunch", |_| None);

    let mut q = Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap();
    assert_eq!(q.greeting()["QMP"]["version"]["qemu"]["major"], 10);
    assert_eq!(q.status().await.unwrap(), "prelaunch");
    assert_eq!(q.execute("cont", None).await.unwrap(), json!({}));
    let err = q.execute("no-such-command", None).await.unwrap_err();
    match &err {
        VmmError::Api { call, message } => {
            assert_eq!(call, "QMP no-such-command");
            assert!(message.starts_with("CommandNotFound:"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Events were set aside, not taken for answers.
    assert!(q.events().len() >= 3);
    assert!(q.events().iter().all(|e| e["event"] == "FAKE_TICK"));
    assert_eq!(
        fake.asked(),
        [
            "qmp_capabilities",
            "query-status",
            "cont",
            "no-such-command"
        ]
    );

    // The driver's one-shot helpers.
    let qemu = Qemu::new(QemuOptions::default());
    let h = qemu.plan(dir.path());
    assert_eq!(
        qemu.status(&h, Duration::from_secs(5)).await.unwrap(),
        "prelaunch"
    );
    assert_eq!(
        qemu.qmp(&h, "quit", None, Duration::from_secs(5))
            .await
            .unwrap(),
        json!({})
    );
}

#[tokio::test]
async fn qmp_client_reports_a_silent_or_wrong_peer() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listening.
    let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");

    // A peer that never greets: bounded by the timeout.
    let silent = dir.path().join("silent.sock");
    let l = UnixListener::bind(&silent).unwrap();
    let hold = tokio::spawn(async move {
        let _s = l.accept().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let t = Instant::now();
    let err = Qmp::connect(&silent, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::Timeout(..)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    hold.abort();

    // A peer that is not QMP.
    let http = dir.path().join("http.sock");
    let l = UnixListener::bind(&http).unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"{\"hello\": 1}\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let err = Qmp::connect(&http, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("QMP greeting"), "{err}");
}

/// A stand-in process whose command line carries `args` (as QEMU's and the sidecar's do), so
/// the driver finds it by scanning `/proc`. A thread reaps it when it exits; dropping the guard
/// SIGKILLs it if it still runs (also when the test fails), so no stand-in outlives its test.
struct StandIn {
    pid: u32,
    start_time: Option<u64>,
    reaper: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn spawn(args: &[OsString]) -> StandIn {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            // The shell itself keeps `args` on its command line (an `exec` would drop them).
            .arg("while :; do sleep 0.2; done")
            .args(args)
            .spawn()
            .unwrap();
        let pid = child.id();
        let start_time = proc::start_time(pid);
        let reaper = std::thread::spawn(move || {
            let _ = child.wait();
        });
        let stand_in = StandIn {
            pid,
            start_time,
            reaper: Some(reaper),
        };
        // `spawn` returns once the child has exec'ed, but the kernel publishes the new command
        // line (`/proc/<pid>/cmdline`) a moment later: on a loaded host a scan right away can
        // miss the process. Wait (bounded) until it is visible, as QEMU's own QMP socket would
        // make the driver wait.
        let want = args.last().expect("a stand-in carries an argument");
        let t = Instant::now();
        while !proc::find_by_arg(want).contains(&pid) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "stand-in pid {pid} never showed {want:?} in /proc"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stand_in
    }

    /// Waits until the stand-in has exited and was reaped.
    fn join(mut self) {
        if let Some(r) = self.reaper.take() {
            r.join().unwrap();
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = proc::signal(self.pid, self.start_time, Signal::SIGKILL);
        if let Some(r) = self.reaper.take() {
            let _ = r.join();
        }
    }
}

fn qmp_arg(socket: &Path) -> OsString {
    format!("unix:{},server=on,wait=off", socket.display()).into()
}

/// Stop against the fake: the guest "ignores" the power button (status running, process stays),
/// so the driver falls back to `quit`, on which the stand-in QEMU exits; then the stand-in
/// sidecar is killed. Cleanup removes every socket.
#[tokio::test]
async fn stop_tries_powerdown_then_quit_then_kills_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = Qemu::new(QemuOptions::default());
    let mut h = qemu.plan(dir.path());

    let fake_qemu = StandIn::spawn(&[qmp_arg(&h.api_socket)]);
    let qemu_pid = fake_qemu.pid;
    let fake_sidecar = StandIn::spawn(&["--socket".into(), h.sidecars[0].socket.clone().into()]);
    let sidecar_pid = fake_sidecar.pid;
    std::fs::write(&h.sidecars[0].socket, b"").unwrap();
    std::fs::write(&h.vsock_socket, b"").unwrap();
    std::fs::write(dir.path().join("vsock.sock_52"), b"").unwrap();

    let quitter = Arc::new(Mutex::new(Some(qemu_pid)));
    let q2 = quitter.clone();
    let fake = FakeQmp::start(&h.api_socket, "running", move |cmd| {
        if cmd == "quit" {
            if let Some(pid) = q2.lock().unwrap().take() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        None
    });
    // Found by the /proc scan (nothing recorded), then by the recorded pid.
    assert_eq!(qemu.find(&h), Some(qemu_pid));
    h.pid = Some(qemu_pid);
    h.start_time = proc::start_time(qemu_pid);
    assert_eq!(qemu.find(&h), Some(qemu_pid));

    qemu.stop(&h, Duration::from_millis(300)).await.unwrap();
    fake_qemu.join();
    fake_sidecar.join();
    let asked = fake.asked();
    let pd = asked.iter().position(|c| c == "system_powerdown").unwrap();
    let quit = asked.iter().position(|c| c == "quit").unwrap();
    assert!(pd < quit, "{asked:?}");
    assert!(!proc::is_alive(qemu_pid, None));
    assert!(!proc::is_alive(sidecar_pid, None));
    assert_eq!(qemu.find(&h), None);
    // Idempotent.
    qemu.stop(&h, Duration::from_millis(100)).await.unwrap();

    drop(fake);
    qemu.cleanup(&h);
    qemu.cleanup(&h);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A stand-in that ignores QMP entirely (no socket) is SIGKILLed; a recorded pid with the wrong
/// start time is not trusted.
#[tokio::test]
async fn stop_kills_what_does_not_answer_and_trusts_no_reused_pid() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = Qemu::new(QemuOptions::default());
    let mut h = qemu.plan(dir.path());
    let fake_qemu = StandIn::spawn(&[qmp_arg(&h.api_socket)]);
    let pid = fake_qemu.pid;
    h.pid = Some(pid);
    // A different process's start time: the recorded identity is wrong, but the scan still
    // finds the process serving the socket.
    h.start_time = Some(fake_qemu.start_time.unwrap() + 1);
    assert_eq!(qemu.find(&h), Some(pid));
    qemu.stop(&h, Duration::from_millis(100)).await.unwrap();
    fake_qemu.join();
    assert_eq!(qemu.find(&h), None);
}

// ------------------------------------------------------------------ real QEMU

/// Everything a real-QEMU test needs, or the reason to skip.
fn real_setup(test: &str) -> Option<PathBuf> {
    if let Some(why) = qemu_support::qemu_unavailable() {
        skip(test, &why);
        return None;
    }
    match qemu_support::debian_kernel() {
        Ok(k) => Some(k),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

/// One real VM under test. Dropping it kills whatever is left (by the handle).
struct RealVm {
    qemu: Qemu,
    handle: VmmHandle,
    cfg: VmmConfig,
    child: Option<tokio::process::Child>,
    _dir: TempDir,
}

impl RealVm {
    fn new(kernel: &Path, opts: QemuOptions) -> RealVm {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let root = dir.path().join("root.ext4");
        std::fs::File::create(&root)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let qemu = Qemu::new(QemuOptions {
            // The agent-channel sidecar is a hidden mode of wickd.
            sidecar_bin: opts
                .sidecar_bin
                .clone()
                .or_else(|| Some(wick_testkit::cargo_bin("wickd"))),
            ..opts
        });
        let handle = qemu.plan(&vm_dir);
        let cfg = VmmConfig {
            vm_id: "qemutest".into(),
            vcpu: 2,
            memory_mib: 512,
            kernel: kernel.to_path_buf(),
            initrd: None,
            boot_args: "console=ttyS0 reboot=k panic=-1 root=/dev/vda".into(),
            root_disk: root,
            extra_disks: Vec::new(),
            guest_cid: 42,
            tap: None,
            guest_mac: None,
            jail: None,
            require_kvm: false,
        };
        RealVm {
            qemu,
            handle,
            cfg,
            child: None,
            _dir: dir,
        }
    }

    fn tcg(kernel: &Path) -> RealVm {
        RealVm::new(
            kernel,
            QemuOptions {
                accel: Accel::Tcg,
                ..QemuOptions::default()
            },
        )
    }

    async fn spawn(&mut self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        let s = self
            .qemu
            .spawn(&self.handle, &self.cfg, SPAWN_TIMEOUT)
            .await?;
        let took = t.elapsed();
        self.handle.pid = Some(s.pid);
        self.handle.start_time = Some(s.start_time);
        self.handle.sidecars = s.sidecars;
        self.child = s.child;
        Ok(took)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.handle.log_path).unwrap_or_default()
    }

    /// Waits (bounded) until the console shows `what`.
    async fn wait_console(&self, what: &str, timeout: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.console().contains(what) {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn sidecar_pid(&self) -> u32 {
        self.handle.sidecars[0].pid.unwrap()
    }

    fn sockets_left(&self) -> Vec<String> {
        let dir = self.handle.api_socket.parent().unwrap();
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".sock"))
            .collect()
    }
}

impl Drop for RealVm {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu.find(&self.handle) {
            let _ = proc::signal(pid, proc::start_time(pid), Signal::SIGKILL);
        }
        self.qemu.cleanup(&self.handle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_boot_console_vsock_stop_cleanup() {
    let Some(kernel) = real_setup("real_boot_console_vsock_stop_cleanup") else {
        return;
    };
    let mut vm = RealVm::tcg(&kernel);
    let ready = vm.spawn().await.expect("spawn");
    let pid = vm.handle.pid.unwrap();
    assert!(proc::is_alive(pid, vm.handle.start_time));
    assert!(proc::is_alive(
        vm.sidecar_pid(),
        vm.handle.sidecars[0].start_time
    ));
    assert!(
        vm.handle.vsock_socket.exists(),
        "the sidecar serves vsock.sock"
    );
    assert_eq!(
        vm.handle.sidecars[0].socket,
        vm.handle.api_socket.with_file_name("agent.sock")
    );
    // Paused until boot.
    assert_eq!(
        vm.qemu
            .status(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap(),
        "prelaunch"
    );

    let t = Instant::now();
    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot");
    let running = t.elapsed();
    assert_eq!(
        vm.qemu
            .status(&vm.handle, Duration::from_secs(5))
            .await
            .unwrap(),
        "running"
    );
    let linux = vm
        .wait_console("Linux version", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no 'Linux version' on the console:\n{}", vm.console()));
    assert!(vm.qemu.guest_failure(&vm.handle).is_none());
    eprintln!(
        "qemu tcg: spawn->QMP ready {ready:?}, cont->running {running:?}, boot->'Linux version' {:?}",
        running + linux
    );

    // Without an initramfs the kernel panics at the root mount (panic=-1, -no-reboot): QEMU may
    // be gone already by the time we stop; either way nothing may be left.
    vm.qemu
        .stop(&vm.handle, Duration::from_secs(3))
        .await
        .expect("stop");
    if let Some(mut c) = vm.child.take() {
        let _ = c.wait().await;
    }
    assert_eq!(vm.qemu.find(&vm.handle), None);
    assert!(!proc::is_alive(
        vm.sidecar_pid(),
        vm.handle.sidecars[0].start_time
    ));
    vm.qemu.cleanup(&vm.handle);
    assert_eq!(vm.sockets_left(), Vec::<String>::new());
    vm.qemu
        .stop(&vm.handle, Duration::from_secs(1))
        .await
        .unwrap();
    vm.qemu.cleanup(&vm.handle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sigterm_and_find_by_scan() {
    let Some(kernel) = real_setup("real_sigterm_and_find_by_scan") else {
        return;
    };
    let mut vm = RealVm::tcg(&kernel);
    // A long-lived guest: no panic at the root mount (it waits for the root device).
    vm.cfg.boot_args = "console=ttyS0 root=/dev/vdz rootwait".into();
    vm.spawn().await.expect("spawn");
    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot");
    let pid = vm.handle.pid.unwrap();

    // A wrong recorded pid (a daemon that lost track): found by the /proc scan.
    let mut wrong = vm.handle.clone();
    wrong.pid = Some(1);
    wrong.start_time = Some(12345);
    assert_eq!(vm.qemu.find(&wrong), Some(pid));
    wrong.pid = None;
    wrong.start_time = None;
    assert_eq!(vm.qemu.find(&wrong), Some(pid));

    vm.qemu.kill(&vm.handle, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), vm.child.as_mut().unwrap().wait())
        .await
        .expect("QEMU exits on SIGTERM")
        .unwrap();
    eprintln!("qemu after SIGTERM: {status}");
    assert_eq!(vm.qemu.find(&vm.handle), None);
    // The sidecar survives QEMU; cleanup reaps it.
    vm.qemu.cleanup(&vm.handle);
    assert!(!proc::is_alive(
        vm.sidecar_pid(),
        vm.handle.sidecars[0].start_time
    ));
    assert_eq!(vm.sockets_left(), Vec::<String>::new());
}

/// A daemon crash: QEMU SIGKILLed, the pids never recorded. Cleanup from the planned handle
/// alone still finds and reaps the sidecar by its socket argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_crash_then_cleanup_from_the_plan_alone() {
    let Some(kernel) = real_setup("real_crash_then_cleanup_from_the_plan_alone") else {
        return;
    };
    let mut vm = RealVm::tcg(&kernel);
    vm.cfg.boot_args = "console=ttyS0 root=/dev/vdz rootwait".into();
    vm.spawn().await.expect("spawn");
    let sidecar = vm.sidecar_pid();
    let sidecar_st = vm.handle.sidecars[0].start_time;
    let pid = vm.handle.pid.unwrap();
    proc::signal(pid, vm.handle.start_time, Signal::SIGKILL).unwrap();
    let _ = vm.child.as_mut().unwrap().wait().await;

    let planned = vm.qemu.plan(vm.handle.api_socket.parent().unwrap());
    assert_eq!(vm.qemu.find(&planned), None);
    // The mux sidecar ends by itself once QEMU's chardev closes, but not at once: either way
    // (still running, or already gone) cleanup from the plan must leave none.
    vm.qemu
        .stop(&planned, Duration::from_secs(1))
        .await
        .unwrap();
    vm.qemu.cleanup(&planned);
    assert!(!proc::is_alive(sidecar, sidecar_st));
    assert_eq!(vm.sockets_left(), Vec::<String>::new());
}

/// `accel = auto` measures: the verdict is cached (a second driver does not probe again), and
/// a KVM verdict must actually boot. Under a KVM that cannot boot the guest, it ends on TCG and
/// forcing `kvm` fails with the reason in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_accel_auto_probes_once_and_tells_the_truth() {
    let Some(kernel) = real_setup("real_accel_auto_probes_once_and_tells_the_truth") else {
        return;
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("accel-probe.json");
    let auto = || QemuOptions {
        accel: Accel::Auto,
        accel_cache: Some(cache.clone()),
        ..QemuOptions::default()
    };
    let mut vm = RealVm::new(&kernel, auto());
    vm.spawn().await.expect("spawn with accel auto");
    let verdict = vm
        .qemu
        .cached_verdict()
        .expect("a verdict after the first spawn");
    eprintln!(
        "accel auto: {} ({}), probe took {} ms",
        verdict.engine, verdict.reason, verdict.probe_ms
    );
    let written = std::fs::read_to_string(&cache).unwrap();
    assert!(written.contains(&verdict.reason));
    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot on the probed engine");
    assert!(
        vm.wait_console("Linux version", Duration::from_secs(60))
            .await
            .is_some(),
        "the probed engine ({}) must boot the kernel:\n{}",
        verdict.engine,
        vm.console()
    );
    assert!(vm.qemu.guest_failure(&vm.handle).is_none());
    vm.qemu
        .stop(&vm.handle, Duration::from_secs(1))
        .await
        .unwrap();

    // A second driver reads the cache instead of probing.
    let second = Qemu::new(auto());
    assert_eq!(second.cached_verdict(), Some(verdict.clone()));
    let t = Instant::now();
    assert_eq!(
        second
            .engine(&kernel, &cache_dir.path().join("unused.log"))
            .await
            .unwrap(),
        verdict.engine
    );
    assert!(
        !cache_dir.path().join("unused.log").exists(),
        "no second probe"
    );
    eprintln!("accel auto from cache: {:?}", t.elapsed());

    if verdict.engine == Engine::Tcg && Path::new("/dev/kvm").exists() {
        // This host's KVM cannot run the guest: forcing it must fail, with QEMU's reason.
        let mut forced = RealVm::new(
            &kernel,
            QemuOptions {
                accel: Accel::Kvm,
                ..QemuOptions::default()
            },
        );
        let spawned = forced.spawn().await;
        let err = match spawned {
            Err(e) => e.to_string(),
            Ok(_) => {
                let booted = forced
                    .qemu
                    .boot(&forced.handle, &forced.cfg, BOOT_TIMEOUT)
                    .await;
                let t = Instant::now();
                let mut failure = booted.err().map(|e| e.to_string());
                while failure.is_none() && t.elapsed() < Duration::from_secs(60) {
                    failure = forced.qemu.guest_failure(&forced.handle);
                    if forced.qemu.find(&forced.handle).is_none() {
                        failure = Some(format!("QEMU exited:\n{}", forced.console()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                failure.unwrap_or_else(|| "no failure seen within 60 s".into())
            }
        };
        eprintln!("accel kvm forced on this host: {err}");
        assert!(
            err.contains("MSR") || err.contains("KVM") || err.contains("QEMU exited"),
            "{err}"
        );
        forced
            .qemu
            .stop(&forced.handle, Duration::from_secs(1))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn spawn_failure_leaves_nothing_running() {
    let Some(kernel) = real_setup("spawn_failure_leaves_nothing_running") else {
        return;
    };
    let mut vm = RealVm::tcg(&kernel);
    vm.cfg.root_disk = PathBuf::from("/nonexistent/root.ext4");
    let err = vm.spawn().await.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/root.ext4"), "{err}");
    let planned = vm.qemu.plan(vm.handle.api_socket.parent().unwrap());
    assert_eq!(vm.qemu.find(&planned), None);
    assert!(proc::find_by_arg(planned.sidecars[0].socket.as_os_str()).is_empty());
}

/// Removes a test cgroup (killing what is left in it) on drop.
struct CgroupGuard(wick_host::cgroup::Cgroups, String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = self.0.remove(&self.1);
        if let Some(parent) = self.1.split('/').next() {
            self.0.remove_if_empty(parent);
        }
    }
}

/// Uid/gid lines of `/proc/<pid>/status` (real, effective, saved, fs) and its seccomp mode.
fn proc_ids(pid: u32) -> (Vec<u32>, Vec<u32>, String) {
    let st = wick_testkit::inspect::ProcStatus::of(pid);
    (
        st.ids("Uid:"),
        st.ids("Gid:"),
        st.line("Seccomp:").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_confined_qemu_and_sidecar_never_run_as_root() {
    use std::os::unix::fs::PermissionsExt;
    use wick_host::cgroup::{Cgroups, Limits};
    let t = "real_confined_qemu_and_sidecar_never_run_as_root";
    let Some(kernel) = real_setup(t) else {
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        return skip(t, "needs root (cgroups, uid change)");
    }
    let cg = match Cgroups::detect() {
        Ok(c) => c,
        Err(e) => return skip(t, &e.to_string()),
    };
    let mut vm = RealVm::tcg(&kernel);
    // The files a confined VMM needs, as the daemon's `contain` capability sets them up.
    let uid = 1_900_065_000 + std::process::id() % 500;
    let top = vm
        .handle
        .api_socket
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o711)).unwrap();
    let vm_dir = vm.handle.api_socket.parent().unwrap().to_path_buf();
    let own = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    own(&vm_dir);
    own(&vm.cfg.root_disk);
    let k = top.join("vmlinuz");
    std::fs::copy(&kernel, &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o444)).unwrap();
    vm.cfg.kernel = k;
    let rel = format!("wick-qtest-{}/vm-real", std::process::id());
    let _guard = CgroupGuard(cg.clone(), rel.clone());
    let limits = Limits::for_vm(vm.cfg.vcpu, vm.cfg.memory_mib, 512, 1024);
    cg.create(&rel, &limits).unwrap();
    vm.cfg.jail = Some(wick_vmm::Jail {
        uid,
        gid: uid,
        groups: Vec::new(),
        cgroup: rel.clone(),
        cgroup_procs: cg.procs_files(&rel),
        limits,
        cgroup_version: if cg.version() == "v1" { 1 } else { 2 },
    });

    vm.spawn().await.expect("confined spawn");
    let qemu_pid = vm.handle.pid.unwrap();
    let sidecar = vm.sidecar_pid();
    for (what, pid) in [("qemu", qemu_pid), ("sidecar", sidecar)] {
        let (u, g, _) = proc_ids(pid);
        assert_eq!(u, vec![uid; 4], "{what} uids");
        assert_eq!(g, vec![uid; 4], "{what} gids");
    }
    assert_eq!(
        proc_ids(qemu_pid).2,
        "Seccomp:\t2",
        "QEMU's sandbox (seccomp filter)"
    );
    let members = cg.pids(&rel);
    assert!(
        members.contains(&qemu_pid) && members.contains(&sidecar),
        "{members:?}"
    );
    assert_eq!(cg.read_limits(&rel).unwrap(), limits);

    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot");
    vm.wait_console("Linux version", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no 'Linux version' on the console:\n{}", vm.console()));
    vm.qemu
        .stop(&vm.handle, Duration::from_secs(3))
        .await
        .expect("stop");
    if let Some(mut c) = vm.child.take() {
        let _ = c.wait().await;
    }
    vm.qemu.cleanup(&vm.handle);
    assert_eq!(vm.qemu.find(&vm.handle), None);
    assert!(cg.pids(&rel).is_empty(), "nothing left in the cgroup");
}

// ------------------------------------------------------------------ agent channel + migration

/// A sparse copy of `src` at `dst` (the golden disks are shared by every test).
fn sparse_copy(src: &Path, dst: &Path) {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", src.display(), dst.display());
}

/// Runs `argv` in the guest: (exit code, stdout).
async fn guest_exec(
    client: &wick_agent_proto::AgentClient,
    argv: &[&str],
) -> (Option<i32>, String) {
    let out = client
        .exec(wick_agent_proto::ExecRequest::new(argv.iter().copied()))
        .await
        .expect("exec")
        .output()
        .await
        .expect("exec output");
    (
        out.status.code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Median of `n` exec round trips of `true`.
async fn exec_rtt(client: &wick_agent_proto::AgentClient, n: usize) -> Duration {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(guest_exec(client, &["true"]).await.0, Some(0));
        v.push(t.elapsed());
    }
    v.sort();
    v[n / 2]
}

/// The proof that QEMU VMs can be snapshotted with the agent channel: a real guest (golden
/// image, real agent) answers an exec over virtio-serial; `stop` + `migrate` to a file; QEMU
/// is killed; a new QEMU (`-incoming defer`, new sidecar) loads the file and continues; the
/// agent answers over the new session and the guest's RAM (a tmpfs file) came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_survives_a_migration_to_a_file() {
    let t = "real_agent_survives_a_migration_to_a_file";
    if let Some(why) = qemu_support::qemu_unavailable() {
        return skip(t, &why);
    }
    let assets = match wick_testkit::guest::guest_assets() {
        Ok(a) => a,
        Err(why) => return skip(t, &why),
    };
    let mut vm = RealVm::tcg(&assets.kernel);
    let dir = vm
        .handle
        .api_socket
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let (root, work) = (dir.join("root.img"), dir.join("work.img"));
    sparse_copy(&assets.rootfs, &root);
    sparse_copy(&assets.work_seed, &work);
    vm.cfg.root_disk = root;
    vm.cfg.extra_disks = vec![work];
    vm.cfg.initrd = Some(assets.initrd.clone());
    vm.cfg.memory_mib = 1024;
    vm.cfg.boot_args = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw".into();
    let agent_timeout = Duration::from_secs(240);

    let t0 = Instant::now();
    vm.spawn().await.expect("spawn");
    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot");
    let client = wick_agent_proto::AgentClient::connect(
        &vm.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        agent_timeout,
    )
    .await
    .unwrap_or_else(|e| panic!("agent: {e}\n{}", vm.console()));
    let cold = t0.elapsed();
    let rtt = exec_rtt(&client, 9).await;
    let marker = format!("{}", std::process::id());
    let (code, _) = guest_exec(
        &client,
        &["sh", "-c", &format!("echo {marker} > /dev/shm/wick-marker")],
    )
    .await;
    assert_eq!(code, Some(0));

    // Save: pause, migrate to a file (mapped-ram: fixed page offsets, sparse file).
    let state = dir.join("state.bin");
    vm.qemu
        .qmp(&vm.handle, "stop", None, Duration::from_secs(10))
        .await
        .expect("stop");
    let ts = Instant::now();
    let saved = vm
        .qemu
        .save_state(&vm.handle, &state, true, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}\n{}", vm.console()));
    let save_time = ts.elapsed();
    let meta = std::fs::metadata(&state).unwrap();
    let (len, allocated) = (
        meta.len(),
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
    );

    // The old QEMU and sidecar go away entirely.
    let old_pid = vm.handle.pid.unwrap();
    let _ = proc::signal(old_pid, vm.handle.start_time, Signal::SIGKILL);
    if let Some(mut c) = vm.child.take() {
        let _ = c.wait().await;
    }
    vm.qemu.cleanup(&vm.handle);
    drop(client);

    // Restore: same command line plus -incoming defer, a new sidecar; load, cont.
    let tr = Instant::now();
    let s = vm
        .qemu
        .spawn_incoming(&vm.handle, &vm.cfg, SPAWN_TIMEOUT)
        .await
        .expect("spawn -incoming");
    vm.handle.pid = Some(s.pid);
    vm.handle.start_time = Some(s.start_time);
    vm.handle.sidecars = s.sidecars;
    vm.child = s.child;
    assert_ne!(vm.handle.pid, Some(old_pid));
    vm.qemu
        .load_state(&vm.handle, &state, true, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("migrate-incoming: {e}\n{}", vm.console()));
    let loaded = tr.elapsed();
    vm.qemu
        .boot(&vm.handle, &vm.cfg, BOOT_TIMEOUT)
        .await
        .expect("cont after restore");
    let client = wick_agent_proto::AgentClient::connect(
        &vm.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("agent after restore: {e}\n{}", vm.console()));
    let restored = tr.elapsed();
    let (code, out) = guest_exec(&client, &["cat", "/dev/shm/wick-marker"]).await;
    assert_eq!(
        (code, out.trim()),
        (Some(0), marker.as_str()),
        "RAM came back"
    );
    let rtt_after = exec_rtt(&client, 9).await;
    drop(client);

    // The sidecar dies and a new one takes over: the agent sees its host end close (EOF) and
    // serves the next session.
    let old_sidecar = vm.sidecar_pid();
    let _ = proc::signal(
        old_sidecar,
        vm.handle.sidecars[0].start_time,
        Signal::SIGKILL,
    );
    let tn = Instant::now();
    let sidecar = vm
        .qemu
        .respawn_sidecar(&vm.handle, &vm.cfg, SPAWN_TIMEOUT)
        .await
        .expect("respawn the sidecar");
    assert_ne!(sidecar.pid, Some(old_sidecar));
    vm.handle.sidecars = vec![sidecar];
    let client = wick_agent_proto::AgentClient::connect(
        &vm.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("agent after a new sidecar: {e}\n{}", vm.console()));
    let (code, out) = guest_exec(&client, &["cat", "/dev/shm/wick-marker"]).await;
    assert_eq!((code, out.trim()), (Some(0), marker.as_str()));
    let new_sidecar = tn.elapsed();
    eprintln!(
        "serial agent channel (TCG, 1 GiB guest): spawn->agent ready {cold:?}; exec rtt p50 \
         {rtt:?} before, {rtt_after:?} after restore; save (mapped-ram) {save_time:?} \
         (QEMU total {} ms, {} MiB RAM sent); file {} MiB long, {} MiB allocated; restore \
         spawn+load {loaded:?}, ->agent answers {restored:?}; new sidecar -> exec {new_sidecar:?}",
        saved.total_ms,
        saved.ram_bytes >> 20,
        len >> 20,
        allocated >> 20
    );
    vm.qemu
        .stop(&vm.handle, Duration::from_secs(10))
        .await
        .expect("stop");
}

/// A restore through the driver's `Vmm` seam into *another* VM: a real guest (golden image,
/// real agent) is saved with `Vmm::save_state`; the state file is made root's and read-only
/// (as a snapshot's is) and handed to a second VM dir with its own disk clones and sockets
/// through a hard link; `spawn_restore` → `load_state` → `resume` there, and the agent answers
/// over the new VM's channel with the guest's RAM (a tmpfs file) intact, while the source,
/// still paused, is untouched and continues when resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_restores_into_another_vm_dir() {
    let t = "real_guest_restores_into_another_vm_dir";
    if let Some(why) = qemu_support::qemu_unavailable() {
        return skip(t, &why);
    }
    let assets = match wick_testkit::guest::guest_assets() {
        Ok(a) => a,
        Err(why) => return skip(t, &why),
    };
    let setup = |vm: &mut RealVm| {
        let dir = vm.handle.api_socket.parent().unwrap().to_path_buf();
        let (root, work) = (dir.join("rootfs.ext4"), dir.join("work.ext4"));
        sparse_copy(&assets.rootfs, &root);
        sparse_copy(&assets.work_seed, &work);
        vm.cfg.root_disk = root;
        vm.cfg.extra_disks = vec![work];
        vm.cfg.initrd = Some(assets.initrd.clone());
        vm.cfg.memory_mib = 1024;
        vm.cfg.boot_args = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw".into();
    };
    let mut src = RealVm::tcg(&assets.kernel);
    setup(&mut src);
    src.spawn().await.expect("spawn");
    src.qemu
        .boot(&src.handle, &src.cfg, BOOT_TIMEOUT)
        .await
        .expect("boot");
    let client = wick_agent_proto::AgentClient::connect(
        &src.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(240),
    )
    .await
    .unwrap_or_else(|e| panic!("agent: {e}\n{}", src.console()));
    let marker = format!("restored-{}", std::process::id());
    let (code, _) = guest_exec(
        &client,
        &["sh", "-c", &format!("echo {marker} > /dev/shm/wick-marker")],
    )
    .await;
    assert_eq!(code, Some(0));
    drop(client);
    src.qemu
        .pause(&src.handle, Duration::from_secs(10))
        .await
        .expect("pause");
    let src_dir = src.handle.api_socket.parent().unwrap().to_path_buf();
    let files = Vmm::save_state(
        &src.qemu,
        &src.handle,
        &src_dir,
        "snap",
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("save: {e}\n{}", src.console()));
    assert_eq!(files.len(), 1, "{files:?}");
    // As a snapshot keeps it: root's, read-only for everyone else.
    std::fs::set_permissions(
        &files[0],
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
    )
    .unwrap();

    let mut dst = RealVm::tcg(&assets.kernel);
    setup(&mut dst);
    dst.cfg.guest_cid = 43;
    let dst_dir = dst.handle.api_socket.parent().unwrap().to_path_buf();
    let link = dst_dir.join("restore.state");
    // Another tempdir: the same filesystem here, so a hard link, as wickd makes it.
    std::fs::hard_link(&files[0], &link).unwrap();
    let tr = Instant::now();
    let s = dst
        .qemu
        .spawn_restore(&dst.handle, &dst.cfg, SPAWN_TIMEOUT)
        .await
        .expect("spawn_restore");
    dst.handle.pid = Some(s.pid);
    dst.handle.start_time = Some(s.start_time);
    dst.handle.sidecars = s.sidecars;
    dst.child = s.child;
    Vmm::load_state(
        &dst.qemu,
        &dst.handle,
        &dst.cfg,
        std::slice::from_ref(&link),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("load: {e}\n{}", dst.console()));
    let loaded = tr.elapsed();
    std::fs::remove_file(&link).unwrap();
    dst.qemu
        .resume(&dst.handle, Duration::from_secs(10))
        .await
        .expect("resume");
    let client = wick_agent_proto::AgentClient::connect(
        &dst.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("agent after restore: {e}\n{}", dst.console()));
    let ready = tr.elapsed();
    let (code, out) = guest_exec(&client, &["cat", "/dev/shm/wick-marker"]).await;
    assert_eq!(
        (code, out.trim()),
        (Some(0), marker.as_str()),
        "RAM came back"
    );
    // The restored guest writes to its own disks, not the source's.
    let (code, _) = guest_exec(
        &client,
        &["sh", "-c", "echo fork > /root/only-in-dst; sync"],
    )
    .await;
    assert_eq!(code, Some(0));
    drop(client);
    // The source continues where it was.
    src.qemu
        .resume(&src.handle, Duration::from_secs(10))
        .await
        .expect("resume the source");
    let client = wick_agent_proto::AgentClient::connect(
        &src.handle.vsock_socket,
        wick_agent_proto::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("source agent: {e}\n{}", src.console()));
    let (code, out) = guest_exec(&client, &["cat", "/dev/shm/wick-marker"]).await;
    assert_eq!((code, out.trim()), (Some(0), marker.as_str()));
    let (code, _) = guest_exec(&client, &["test", "-e", "/root/only-in-dst"]).await;
    assert_eq!(
        code,
        Some(1),
        "the source does not see the restored VM's writes"
    );
    eprintln!("restore into another VM dir (TCG, 1 GiB): spawn+load {loaded:?}, -> agent answers {ready:?}");
    for vm in [&src, &dst] {
        vm.qemu
            .stop(&vm.handle, Duration::from_secs(10))
            .await
            .expect("stop");
    }
}
