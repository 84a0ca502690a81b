//! A real `wickd` in an isolated `WICK_ROOT`, driven through the real `wick` binary, with the
//! fake Firecracker as its VMM. Used by integration tests and benchmarks.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cargo_bin;
use wick_host::net::testns::TestNetns;

/// The uid (and gid) [`WickdEnv::wick_as_user`] runs as: nobody/nogroup.
pub const USER_UID: u32 = 65534;
/// Config for daemons whose fake Firecracker fronts a real agent (`agent = true` images): the
/// fake runs the agent as its own child, standing in for the guest's root. A confined VMM
/// (the default) runs as the VM's unprivileged uid, which is not the guest's root (the agent's
/// `ssh-keygen -A` and chowns fail), so these daemons run their VMMs unconfined. Containment
/// itself is tested with the fake (without agent) and with real guests under QEMU.
pub const FAKE_AGENT_CONFIG: &str = "contain_vmm = false";

/// One isolated daemon: its root directory, config and process.
pub struct WickdEnv {
    pub dir: tempfile::TempDir,
    pub daemon: Option<Child>,
    /// Extra environment for the daemon (and so its VMMs), e.g. fake Firecracker knobs.
    pub env: Vec<(String, String)>,
    /// The private network namespace wickd and `wick` run in (as root): the daemon's bridge,
    /// TAPs and firewall rules live and die there, never in the host's namespace.
    pub netns: Option<TestNetns>,
}

impl WickdEnv {
    /// A fresh root with a config pointing at the fake Firecracker and a `default` image (a
    /// sparse 64 MiB rootfs file and a stand-in kernel file). `extra_config` is appended.
    pub fn new(extra_config: &str) -> WickdEnv {
        Self::new_with_image_extra(extra_config, "")
    }

    /// Like [`new`](Self::new), with `image_extra` (e.g. `agent = true`) appended to the
    /// `[images.default]` table.
    pub fn new_with_image_extra(extra_config: &str, image_extra: &str) -> WickdEnv {
        // Short paths: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("wk")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let img = dir.path().join("img");
        std::fs::create_dir_all(&img).unwrap();
        let rootfs = img.join("rootfs.ext4");
        let f = std::fs::File::create(&rootfs).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::write(img.join("vmlinux"), b"\x7fELF fake kernel for tests").unwrap();
        // Tests that choose no backend get `copy`: `auto` may pick the XFS pool, whose mount
        // lives in wickd's private mount namespace (`ip netns exec`), out of the test's sight.
        let storage = if extra_config.contains("storage_backend") {
            ""
        } else {
            "storage_backend = \"copy\"\n"
        };
        let config = format!(
            "vmm = \"firecracker\"\nfirecracker_bin = {fc:?}\nboot_timeout = \"10s\"\nstop_timeout = \"2s\"\n{storage}{extra_config}\n\n[images.default]\nrootfs = {rootfs:?}\nkernel = {kernel:?}\n{image_extra}\n",
            fc = cargo_bin("fake-firecracker"),
            rootfs = rootfs,
            kernel = img.join("vmlinux"),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let netns = nix::unistd::geteuid()
            .is_root()
            .then(|| TestNetns::create("d").expect("create the daemon's private netns"));
        WickdEnv {
            dir,
            daemon: None,
            env: Vec::new(),
            netns,
        }
    }

    /// Like [`new_with_image_extra`](Self::new_with_image_extra), for tests of local users:
    /// `socket_group = "nogroup"`, and the test's own root directory traversable, so
    /// [`wick_as_user`](Self::wick_as_user) (uid/gid 65534) reaches the socket the way a member
    /// of `socket_group` would.
    pub fn for_local_users(extra_config: &str, image_extra: &str) -> WickdEnv {
        use std::os::unix::fs::PermissionsExt;
        let env = Self::new_with_image_extra(
            &format!("socket_group = \"nogroup\"\n{extra_config}"),
            image_extra,
        );
        std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
        env
    }

    /// Has the fake Firecracker front the real `wick-agent` in each fake guest (for an image
    /// with `agent = true`, and [`FAKE_AGENT_CONFIG`] in the config).
    pub fn with_real_agent(mut self) -> WickdEnv {
        let agent = cargo_bin("wick-agent").display().to_string();
        self.env.push(("FAKE_FC_AGENT_BIN".into(), agent));
        self
    }

    /// Runs `wick ARGS` as the local user uid/gid 65534 (nobody/nogroup), straight to the
    /// socket (no netns hop: `ip netns exec` needs root).
    pub fn wick_as_user(&self, args: &[&str]) -> Output {
        Command::new(cargo_bin("wick"))
            .args(args)
            .env("WICK_ROOT", self.root())
            .env_remove("WICK_SOCKET")
            .env("HOME", "/tmp")
            .uid(USER_UID)
            .gid(USER_UID)
            .stdin(Stdio::null())
            .output()
            .expect("run wick as uid 65534")
    }

    /// A fresh root whose `config.toml` is exactly `config` (for real-guest tests that bring
    /// their own VMM and images).
    pub fn with_config(config: &str) -> WickdEnv {
        let env = WickdEnv::new("");
        std::fs::write(env.root().join("config.toml"), config).unwrap();
        env
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.root().join("run/wickd.sock")
    }

    /// Starts wickd and waits until its socket answers.
    pub fn start(&mut self) -> &mut Self {
        assert!(self.daemon.is_none(), "wickd already started");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root().join("wickd-test.log"))
            .unwrap();
        let child = self
            .in_netns(cargo_bin("wickd"))
            .arg("--root")
            .arg(self.root())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn wickd");
        self.daemon = Some(child);
        self.wait_ready();
        self
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(c) = self.daemon.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("wickd exited early ({st}); log:\n{}", self.daemon_log());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("wickd did not come up; log:\n{}", self.daemon_log());
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root().join("wickd-test.log")).unwrap_or_default()
    }

    /// `kill -9` the daemon (its VMMs live on in their own process groups).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// `program` as a command inside the private netns (plain when there is none).
    pub fn in_netns(&self, program: PathBuf) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// A fake "upstream" network: a new namespace at 198.51.100.2 behind a veth `uplink`
    /// (198.51.100.1) of the daemon's namespace, which routes everything there. NAT is proven
    /// when a server in it sees 198.51.100.1 as the guest's address.
    pub fn upstream(&self) -> TestNetns {
        let dn = self.netns.as_ref().expect("netns (root only)");
        let up = TestNetns::create("up").expect("upstream netns");
        let ok = |r: Result<String, wick_host::net::NetError>| {
            r.unwrap_or_else(|e| panic!("upstream setup: {e}"));
        };
        ok(dn.veth_to("uplink", &up, "eth0").map(|_| String::new()));
        ok(dn.run("ip", &["addr", "add", "198.51.100.1/24", "dev", "uplink"]));
        ok(dn.run("ip", &["link", "set", "uplink", "up"]));
        ok(dn.run(
            "ip",
            &["route", "replace", "default", "via", "198.51.100.2"],
        ));
        ok(up.run("ip", &["addr", "add", "198.51.100.2/24", "dev", "eth0"]));
        ok(up.run("ip", &["link", "set", "eth0", "up"]));
        up
    }

    /// Runs a command inside the daemon's netns and returns its stdout (panics on failure).
    pub fn ns_run(&self, program: &str, args: &[&str]) -> String {
        let ns = self.netns.as_ref().expect("netns (root only)");
        ns.run(program, args)
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
    }

    /// A `wick` command bound to this root (inside the daemon's netns, so a daemon the CLI
    /// autostarts lands there too).
    pub fn wick_cmd(&self) -> Command {
        let mut c = self.in_netns(cargo_bin("wick"));
        c.env("WICK_ROOT", self.root())
            .env_remove("WICK_SOCKET")
            .stdin(Stdio::null());
        c
    }

    /// Runs `wick ARGS` and returns its output.
    pub fn wick(&self, args: &[&str]) -> Output {
        self.wick_cmd().args(args).output().expect("run wick")
    }

    /// Runs `wick ARGS`, panicking with its output unless it succeeds; returns stdout.
    pub fn wick_ok(&self, args: &[&str]) -> String {
        let out = self.wick(args);
        if !out.status.success() {
            panic!(
                "wick {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.daemon_log()
            );
        }
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs `wick ARGS --json` and parses the output.
    pub fn wick_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let s = self.wick_ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("wick {a:?}: bad JSON ({e}): {s}"))
    }

    /// Pids of processes whose command line mentions this root (VMMs and the daemon).
    pub fn processes(&self) -> Vec<u32> {
        let root = self.root().to_string_lossy().to_string();
        let me = std::process::id();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie && String::from_utf8_lossy(&cmd).contains(&root) {
                out.push(pid);
            }
        }
        out
    }

    /// Pids of live fake-firecracker processes of this root.
    pub fn vmm_processes(&self) -> Vec<u32> {
        self.processes()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains("fake-firecracker"))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for WickdEnv {
    fn drop(&mut self) {
        self.kill9();
        // (the netns field drops after this body: processes first, then the namespace)
        // Everything left that names our root was started by this test (the daemon or its VMMs).
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The per-VM cgroups of VMs the test left running (under this root's own parent;
        // removing one kills what is left in it).
        if let Ok(cg) = wick_host::cgroup::Cgroups::detect() {
            let parent = wick_model::Paths::new(Some(self.root())).default_cgroup_parent();
            for name in cg.children(&parent) {
                let _ = cg.remove(&format!("{parent}/{name}"));
            }
            cg.remove_if_empty(&parent);
        }
    }
}

/// One HTTP/1.1 request over a Unix socket, for tests that bypass the CLI. Returns the status
/// code and the body.
/// A command's stdout and stderr, as text, one after the other (for assertion messages).
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn http(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: wickd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp).to_string();
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
