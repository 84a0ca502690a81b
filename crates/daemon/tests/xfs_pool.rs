//! `storage_backend = "pool"` end to end with the fake Firecracker: the XFS pool is made on first
//! use, VM disks in it are reflink clones, it survives daemon restarts (each restart is also the
//! reboot case here: wickd runs in a private mount namespace, so its mount dies with it), it is
//! swept when its record is gone, and wickd killed at its failpoints leaves nothing behind.
//! Needs root, loop devices and xfsprogs; skipped otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use wick_testkit::wickd::WickdEnv;

const POOL: &str = "storage_backend = \"pool\"";
const MIB: u64 = 1 << 20;

fn usable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        wick_testkit::skip(format_args!("needs root"));
        return false;
    }
    for tool in ["mkfs.xfs", "xfs_growfs", "losetup"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            wick_testkit::skip(format_args!("{tool} is not installed"));
            return false;
        }
    }
    true
}

/// A daemon env whose pool's loop devices are detached (by backing file) when the test ends.
struct Env {
    env: WickdEnv,
}

impl Env {
    fn new(extra: &str) -> Env {
        Env::from(WickdEnv::new(extra))
    }

    /// With the real agent in the fake guest (restores and forks need one).
    fn with_agent(extra: &str) -> Env {
        let config = format!("{}\n{extra}", wick_testkit::wickd::FAKE_AGENT_CONFIG);
        Env::from(WickdEnv::new_with_image_extra(&config, "agent = true").with_real_agent())
    }

    fn from(env: WickdEnv) -> Env {
        // Give the test image real data, so a copy would cost what a clone does not.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(env.root().join("img/rootfs.ext4"))
            .unwrap();
        let block: Vec<u8> = (0..MIB).map(|i| (i * 7 + 3) as u8).collect();
        for _ in 0..24 {
            f.write_all(&block).unwrap();
        }
        Env { env }
    }

    fn pool_file(&self) -> PathBuf {
        self.env.root().join("state/xfs-pool/pool.xfs")
    }

    fn mount_point(&self) -> PathBuf {
        self.env.root().join("state/xfs-pool/mnt")
    }

    /// `path` as wickd sees it (its private mount namespace).
    fn in_daemon(&self, path: &Path) -> PathBuf {
        let pid = self.env.daemon.as_ref().expect("wickd runs").id();
        PathBuf::from(format!("/proc/{pid}/root{}", path.display()))
    }

    fn pool_mounted(&self) -> bool {
        let pid = self.env.daemon.as_ref().expect("wickd runs").id();
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_else(|e| panic!("wickd {pid}: {e}; log:\n{}", self.env.daemon_log()));
        let m = self.mount_point();
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()) && l.contains(" - xfs "))
    }

    fn loops(&self) -> Vec<String> {
        loops_of(&self.pool_file())
    }

    /// The loop devices once the kernel has cleared those of mounts that went away with an
    /// earlier daemon's mount namespace (autoclear runs asynchronously): waits up to 5 s for at
    /// most `n` of them.
    fn settled_loops(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let l = self.loops();
            if l.len() <= n || std::time::Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn meta(&self) -> Option<String> {
        let store = wick_store::Store::open(&self.env.root().join("state/wick.db")).unwrap();
        store.get_meta("xfs_pool").unwrap()
    }

    fn vm(&self, name: &str) -> Value {
        self.env.wick_json(&["vm", "show", name])
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for name in ["a1", "a2", "a3"] {
            let _ = self.env.wick(&["vm", "delete", name]);
        }
        self.env.stop();
        for dev in self.loops() {
            let _ = Command::new("losetup").args(["--detach", &dev]).status();
        }
    }
}

fn loops_of(file: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-j", file.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':').map(|(d, _)| d.to_string()))
        .collect()
}

/// The CLI (as root) starts wickd when its daemon died under it; end those, by pid, so the
/// restart below is the one the test makes.
fn end_autostarted_daemons(env: &WickdEnv) {
    let daemons = || -> Vec<u32> {
        env.processes()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains("/wickd\0"))
                    .unwrap_or(false)
            })
            .collect()
    };
    for pid in daemons() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The kernel releases a dead process's flock a moment after it is gone: wait for the
    // root lock to be free too.
    let lock = env.root().join("run/wickd.lock");
    let free = || {
        let Ok(f) = std::fs::File::open(&lock) else {
            return true;
        };
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(daemons().is_empty() && free()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn free_bytes(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_free() as u64 * st.fragment_size() as u64
}

#[test]
fn pool_made_on_first_use_cloned_restarted_and_swept() {
    if !usable() {
        return;
    }
    let mut e = Env::new(POOL);
    e.env.start();
    assert!(!e.pool_file().exists(), "no pool before the first VM");
    assert_eq!(e.meta(), None);

    e.env.wick_ok(&["vm", "create", "--name", "a1"]);
    let a1 = e.vm("a1");
    assert_eq!(a1["state"], "running", "{a1}");
    let disk = PathBuf::from(a1["runtime"]["root_disk"].as_str().unwrap());
    assert!(disk.starts_with(e.mount_point().join("vms")), "{a1}");
    assert_eq!(
        a1["runtime"]["root_disk_plan"]["backend"], "xfs-pool",
        "{a1}"
    );
    assert!(e.pool_file().is_file() && e.pool_mounted());
    assert_eq!(e.loops().len(), 1, "{:?}", e.loops());
    let rec: Value = serde_json::from_str(&e.meta().expect("pool recorded")).unwrap();
    assert_eq!(rec["file"], e.pool_file().to_str().unwrap());
    assert_eq!(rec["loop_device"], e.loops()[0].as_str());

    // A second VM's disk is a clone: (almost) nothing allocated in the pool.
    let mnt = e.in_daemon(&e.mount_point());
    let before = free_bytes(&mnt);
    e.env.wick_ok(&["vm", "create", "--name", "a2"]);
    let used = before.saturating_sub(free_bytes(&mnt));
    println!("second VM: {} KiB allocated in the pool", used / 1024);
    assert!(used < 16 * MIB, "a clone allocated {used} bytes");
    let doctor = e.env.wick_ok(&["doctor"]);
    assert!(
        doctor.contains("xfs pool") && doctor.contains("free"),
        "{doctor}"
    );

    // `contain`: the running VM's disk in the pool belongs to its VMM uid, and to root again
    // once it stopped.
    use std::os::unix::fs::MetadataExt;
    let uid = a1["runtime"]["jail"]["uid"]
        .as_u64()
        .expect("contained VMM") as u32;
    assert_eq!(std::fs::metadata(e.in_daemon(&disk)).unwrap().uid(), uid);

    // Restart: wickd's mount namespace (and with it the mount) is gone, as after a reboot; the
    // pool is mounted again and the VMs start.
    e.env.wick_ok(&["vm", "stop", "a1"]);
    assert_eq!(std::fs::metadata(e.in_daemon(&disk)).unwrap().uid(), 0);
    e.env.stop();
    e.env.start();
    assert!(e.pool_mounted(), "re-established at start");
    assert_eq!(e.settled_loops(1).len(), 1, "{:?}", e.loops());
    e.env.wick_ok(&["vm", "start", "a1"]);
    assert_eq!(e.vm("a1")["state"], "running");
    assert!(e.in_daemon(&disk).is_file());

    // Deleting frees the disks; the pool stays for the next VM.
    e.env.wick_ok(&["vm", "delete", "a1"]);
    e.env.wick_ok(&["vm", "delete", "a2"]);
    assert!(!e.in_daemon(&disk).exists());
    assert!(e.pool_file().exists() && e.meta().is_some());

    // Its record gone (no VM uses it): swept at start, nothing left.
    e.env.stop();
    wick_store::Store::open(&e.env.root().join("state/wick.db"))
        .unwrap()
        .set_meta("xfs_pool", None)
        .unwrap();
    e.env.start();
    assert!(!e.pool_file().exists(), "pool file swept");
    assert!(e.settled_loops(0).is_empty(), "{:?}", e.loops());
    assert!(!e.pool_mounted());
    assert!(
        e.env.daemon_log().contains("XFS pool file"),
        "sweep is logged"
    );

    // And made again on the next first use.
    e.env
        .wick_ok(&["vm", "create", "--name", "a3", "--no-start"]);
    assert!(e.pool_mounted() && e.meta().is_some());
}

#[test]
fn crash_drill_xfs_pool() {
    if !usable() {
        return;
    }
    for point in ["xfs-pool-recorded", "xfs-pool-made"] {
        let mut e = Env::new(POOL);
        e.env.env.push(("WICK_FAILPOINTS".into(), point.into()));
        e.env.start();
        let out = e.env.wick(&["vm", "create", "--name", "a1"]);
        assert!(!out.status.success(), "{point}: the daemon died");
        assert!(e.meta().is_some(), "{point}: recorded before made");
        e.env.kill9(); // reap the dead daemon
        end_autostarted_daemons(&e.env);
        e.env.env.clear();
        e.env.start();
        let a1 = e.vm("a1");
        assert!(
            a1["state"] == "error" || a1["state"] == "stopped",
            "{point}: {a1}"
        );
        assert!(e.settled_loops(1).len() <= 1, "{point}: {:?}", e.loops());
        if e.pool_file().exists() {
            assert!(e.pool_mounted(), "{point}: a made pool is mounted again");
        }
        // The interrupted VM goes; a new one works in the (re-)established pool.
        e.env.wick_ok(&["vm", "delete", "a1"]);
        e.env.wick_ok(&["vm", "create", "--name", "a2"]);
        assert!(e.pool_mounted(), "{point}");
        assert_eq!(e.settled_loops(1).len(), 1, "{point}: {:?}", e.loops());
        assert!(
            !e.pool_file().with_extension("xfs.new").exists(),
            "{point}: no half-made pool file"
        );
    }
}

/// Switching backends: VMs keep the backend their plan names; a pool in use by a VM stays
/// (mounted again at start) after the config moved away from it, and is released, record and
/// all, once nothing uses it.
#[test]
fn backend_switches_keep_vms_and_release_an_unused_pool() {
    if !usable() {
        return;
    }
    let mut e = Env::new("storage_backend = \"copy\"");
    let config = e.env.root().join("config.toml");
    let set_backend = |from: &str, to: &str| {
        let c = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, c.replace(from, to)).unwrap();
    };
    e.env.start();
    e.env
        .wick_ok(&["vm", "create", "--name", "a1", "--no-start"]);
    e.env.stop();
    set_backend("\"copy\"", "\"pool\"");
    e.env.start();
    e.env.wick_ok(&["vm", "start", "a1"]);
    assert_eq!(e.vm("a1")["runtime"]["root_disk_plan"]["backend"], "copy");
    e.env.wick_ok(&["vm", "create", "--name", "a2"]);
    let a2 = e.vm("a2");
    assert_eq!(a2["runtime"]["root_disk_plan"]["backend"], "xfs-pool");

    // Back to copy: a2's pool stays and is mounted again; a2 still starts.
    e.env.wick_ok(&["vm", "stop", "a2"]);
    e.env.stop();
    set_backend("\"pool\"", "\"copy\"");
    e.env.start();
    assert!(e.pool_mounted() && e.meta().is_some());
    e.env.wick_ok(&["vm", "start", "a2"]);
    e.env
        .wick_ok(&["vm", "create", "--name", "a3", "--no-start"]);
    assert_eq!(e.vm("a3")["runtime"]["root_disk_plan"]["backend"], "copy");

    // Once no VM uses it, the next start releases it and clears its record.
    e.env.wick_ok(&["vm", "delete", "a2"]);
    e.env.stop();
    e.env.start();
    assert!(!e.pool_file().exists(), "unused pool released");
    assert_eq!(e.meta(), None);
    assert!(e.settled_loops(0).is_empty(), "{:?}", e.loops());
    e.env.wick_ok(&["vm", "start", "a1"]);
}

/// Restores and forks on the pool: each restored VM's root disk is a clone inside the pool
/// (the snapshot's `root.img` copied in once as a base), recorded as an `xfs-pool` plan; the
/// VMs need nothing of the snapshot afterwards (stop, start and delete work once it is gone).
#[test]
fn restores_and_forks_clone_their_root_disk_in_the_pool() {
    if !usable() {
        return;
    }
    let mut e = Env::with_agent(POOL);
    e.env.start();
    e.env.wick_ok(&["vm", "create", "--name", "a1"]);
    e.env.wick_ok(&["vm", "snapshot", "a1", "--name", "s1"]);
    e.env
        .wick_ok(&["vm", "create", "--from-snapshot", "s1", "--name", "a2"]);
    e.env.wick_ok(&["vm", "fork", "a1", "--name", "a3"]);
    for n in ["a2", "a3"] {
        let v = e.vm(n);
        assert_eq!(v["state"], "running", "{v}");
        let disk = PathBuf::from(v["runtime"]["root_disk"].as_str().unwrap());
        assert!(disk.starts_with(e.mount_point().join("vms")), "{v}");
        assert_eq!(v["runtime"]["root_disk_plan"]["backend"], "xfs-pool", "{v}");
    }
    e.env.wick_ok(&["snapshot", "delete", "s1"]);
    e.env.wick_ok(&["vm", "stop", "a2"]);
    e.env.wick_ok(&["vm", "start", "a2"]);
    assert_eq!(e.vm("a2")["state"], "running");
    e.env.wick_ok(&["vm", "delete", "a2", "a3"]);
}
