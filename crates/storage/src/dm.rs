//! The `dm-snapshot` backend (banger's way): a read-only loop device over the image rootfs, a
//! sparse COW file per VM with its own loop device, and a persistent device-mapper snapshot
//! `wk-<short id>` = `0 <sectors> snapshot <origin-loop> <cow-loop> P 8`.
//!
//! **One origin loop per image, shared by all its VMs.** Every snapshot then reads the image
//! through the same block device, so the page cache holds one copy of the image's hot blocks
//! rather than one per VM, and a host with many VMs uses half the loop devices. The price is that
//! release must not detach an origin another snapshot still uses: it detaches it only when no
//! snapshot table on the host references it, and every create/activate/release/sweep holds an
//! exclusive `flock` on `<state>/dm-snapshot.lock`, so attaching and detaching never interleave.
//!
//! Nothing is remembered in memory: loop devices are always found again from their backing files
//! (`losetup --list --json`, matched by path or inode), the dm device by its deterministic name.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, StorageError};
use crate::file::{
    ensure_dir, image_path, lock_exclusive, remove_if_exists, vm_dir_path, wrong_backend,
};
use crate::plan::{dm_name, DiskPlan, LoopDevice, RootDisk, COW_FILE, DM_PREFIX};
use crate::runner::{command_error, run, run_ok, Runner};
use crate::{BackendKind, CowBackend};

/// Snapshot chunk size: 8 sectors = 4 KiB, the guest filesystem's block size.
pub const CHUNK_SECTORS: u32 = 8;
/// Name of the lock file in the state dir.
pub const LOCK_FILE: &str = "dm-snapshot.lock";

/// `dmsetup` flags for create and remove: udev runs no rules for our devices (no blkid/LVM
/// probing of guest-written data) and libdevmapper manages the `/dev/mapper` node itself.
const NO_UDEV: [&str; 2] = ["--noudevrules", "--noudevsync"];

/// Waits between `dmsetup remove` attempts while the device is busy (~6 s in all).
const REMOVE_BACKOFF_MS: [u64; 7] = [50, 100, 200, 400, 800, 1600, 3000];

/// The dm-snapshot backend. See the module docs.
pub struct DmSnapshotBackend {
    runner: Arc<dyn Runner>,
    state_dir: PathBuf,
    backoff: Vec<Duration>,
}

/// Something `create`/`activate` made, undone in reverse order when a later step fails.
#[derive(Debug)]
enum Made {
    CowFile(PathBuf),
    Loop(String),
    Dm(String),
}

struct DmParts<'a> {
    image: &'a Path,
    cow: &'a Path,
    cow_bytes: u64,
    name: &'a str,
}

impl DmSnapshotBackend {
    /// A backend whose lock file and sweep scope is `state_dir`.
    pub fn new(runner: Arc<dyn Runner>, state_dir: &Path) -> Self {
        Self {
            runner,
            state_dir: std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.into()),
            backoff: REMOVE_BACKOFF_MS
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
        }
    }

    /// Replaces the waits between busy `dmsetup remove` retries (tests use zero waits).
    pub fn with_backoff(mut self, backoff: Vec<Duration>) -> Self {
        self.backoff = backoff;
        self
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        lock_exclusive(&self.state_dir, LOCK_FILE)
    }

    fn parts<'a>(&self, plan: &'a DiskPlan) -> Result<DmParts<'a>> {
        match plan {
            DiskPlan::DmSnapshot {
                image,
                cow,
                cow_bytes,
                name,
                ..
            } => Ok(DmParts {
                image,
                cow,
                cow_bytes: *cow_bytes,
                name,
            }),
            _ => Err(wrong_backend(BackendKind::DmSnapshot, plan)),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run_ok(self.runner.as_ref(), program, args)
    }

    /// Attaches what is missing (origin loop, COW loop, dm device), recording each in `made`.
    /// `fresh`: the dm device cannot exist yet (create), so it is not looked up.
    fn assemble(&self, plan: &DiskPlan, made: &mut Vec<Made>, fresh: bool) -> Result<RootDisk> {
        let p = self.parts(plan)?;
        let loops = list_loops(self.runner.as_ref())?;
        let origin = match loops.iter().find(|l| l.read_only && l.backs(p.image)) {
            Some(l) => l.name.clone(),
            None => {
                let dev = self.attach(p.image, true)?;
                made.push(Made::Loop(dev.clone()));
                dev
            }
        };
        let cow = match loops.iter().find(|l| !l.read_only && l.backs(p.cow)) {
            Some(l) => l.name.clone(),
            None => {
                let dev = self.attach(p.cow, false)?;
                made.push(Made::Loop(dev.clone()));
                dev
            }
        };
        if fresh || !self.dm_exists(p.name)? {
            let table = plan.dm_table(&origin, &cow).expect("dm plan");
            // Guest-written data must not be probed by the host (LVM, partition tables,
            // filesystem signatures): no udev rules for this device, nodes made by libdevmapper.
            self.run(
                "dmsetup",
                &["create", NO_UDEV[0], NO_UDEV[1], p.name, "--table", &table],
            )?;
            made.push(Made::Dm(p.name.to_string()));
        }
        Ok(RootDisk {
            path: plan.disk_path(),
            loops: vec![
                LoopDevice {
                    device: origin,
                    backing: p.image.to_path_buf(),
                    read_only: true,
                },
                LoopDevice {
                    device: cow,
                    backing: p.cow.to_path_buf(),
                    read_only: false,
                },
            ],
        })
    }

    fn attach(&self, file: &Path, read_only: bool) -> Result<String> {
        let f = file.to_string_lossy();
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(&f);
        let out = self.run("losetup", &args)?;
        let dev = out.trim().to_string();
        if !dev.starts_with("/dev/") {
            return Err(StorageError::Invalid(format!(
                "losetup --find --show {f} printed {dev:?}, not a device path"
            )));
        }
        Ok(dev)
    }

    fn dm_exists(&self, name: &str) -> Result<bool> {
        let out = run(&*self.runner, "dmsetup", &["info", name])?;
        if out.status.success() {
            return Ok(true);
        }
        if is_absent(&String::from_utf8_lossy(&out.stderr)) {
            return Ok(false);
        }
        Err(command_error("dmsetup", &["info", name], &out, None))
    }

    /// `dmsetup remove NAME`, retried with backoff while busy; absent counts as removed.
    fn remove_dm(&self, name: &str) -> Result<()> {
        let mut attempt = 0;
        loop {
            let args = ["remove", NO_UDEV[0], NO_UDEV[1], name];
            let out = run(&*self.runner, "dmsetup", &args)?;
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
            if is_absent(&stderr) {
                return Ok(());
            }
            if stderr.contains("busy") && attempt < self.backoff.len() {
                std::thread::sleep(self.backoff[attempt]);
                attempt += 1;
                continue;
            }
            let hint = stderr.contains("busy").then(|| {
                format!(
                    "something still holds /dev/mapper/{name} open (a VMM process, a mount); \
                     stop it, then delete the VM again"
                )
            });
            return Err(command_error("dmsetup", &args, &out, hint));
        }
    }

    fn detach(&self, dev: &str) -> Result<()> {
        let out = run(&*self.runner, "losetup", &["--detach", dev])?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        if out.status.success() || stderr.contains("no such device") {
            Ok(())
        } else {
            Err(command_error("losetup", &["--detach", dev], &out, None))
        }
    }

    fn rollback(&self, made: Vec<Made>) {
        for m in made.into_iter().rev() {
            let res = match &m {
                Made::Dm(name) => self.remove_dm(name),
                Made::Loop(dev) => self.detach(dev),
                Made::CowFile(path) => remove_if_exists(path),
            };
            if let Err(e) = res {
                // The plan is persisted, so release (or the daemon's sweep) finishes the job.
                tracing::warn!("rollback of {m:?} failed: {e}");
            }
        }
    }

    /// Detaches read-only loops over `image` that no snapshot table references.
    fn detach_unused_origins(&self, image: &Path, loops: &[LoopInfo]) -> Result<()> {
        let origins: Vec<&LoopInfo> = loops
            .iter()
            .filter(|l| l.read_only && l.backs(image))
            .collect();
        if origins.is_empty() {
            return Ok(());
        }
        let tables = snapshot_tables(self.runner.as_ref())?;
        for l in origins {
            if !tables.iter().any(|t| t.uses(&l.majmin)) {
                self.detach(&l.name)?;
            }
        }
        Ok(())
    }

    /// A loop over a file under our state dir, other than the XFS pool's (its own sweep).
    fn under_state(&self, l: &LoopInfo) -> bool {
        let back = Path::new(l.back_path());
        back.starts_with(&self.state_dir)
            && !crate::xfs_pool::XfsPool::is_pool_file(&self.state_dir, back)
    }
}

impl CowBackend for DmSnapshotBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::DmSnapshot
    }

    fn plan(&self, vm_id: &str, vm_dir: &Path, image: &Path) -> Result<DiskPlan> {
        let image = image_path(image)?;
        let len = std::fs::metadata(&image)
            .map_err(|e| StorageError::io("cannot stat", &image, e))?
            .len();
        if len == 0 || len % 512 != 0 {
            return Err(StorageError::Invalid(format!(
                "image {} is {len} bytes, not a whole number of 512-byte sectors; it cannot be a \
                 dm-snapshot origin",
                image.display()
            )));
        }
        Ok(DiskPlan::DmSnapshot {
            image,
            cow: vm_dir_path(vm_dir)?.join(COW_FILE),
            cow_bytes: cow_bytes(len),
            sectors: len / 512,
            chunk_sectors: CHUNK_SECTORS,
            name: dm_name(vm_id),
        })
    }

    fn create(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let p = self.parts(plan)?;
        let _lock = self.lock()?;
        let mut made = Vec::new();
        let res = (|| {
            if let Some(dir) = p.cow.parent() {
                ensure_dir(dir)?;
            }
            let f = OpenOptions::new()
                .mode(0o600) // owner only (state dir files are private)
                .write(true)
                .create_new(true)
                .open(p.cow)
                .map_err(|e| StorageError::io("cannot create COW file", p.cow, e))?;
            made.push(Made::CowFile(p.cow.to_path_buf()));
            f.set_len(p.cow_bytes)
                .map_err(|e| StorageError::io("cannot size COW file", p.cow, e))?;
            drop(f);
            self.assemble(plan, &mut made, true)
        })();
        if res.is_err() {
            self.rollback(made);
        }
        res
    }

    fn activate(&self, plan: &DiskPlan) -> Result<RootDisk> {
        let p = self.parts(plan)?;
        if !p.cow.is_file() {
            return Err(StorageError::Invalid(format!(
                "COW file {} of {} is missing; delete the VM and create it again",
                p.cow.display(),
                p.name
            )));
        }
        let _lock = self.lock()?;
        let mut made = Vec::new();
        let res = self.assemble(plan, &mut made, false);
        if res.is_err() {
            self.rollback(made);
        }
        res
    }

    fn release(&self, plan: &DiskPlan) -> Result<()> {
        let p = self.parts(plan)?;
        let _lock = self.lock()?;
        self.remove_dm(p.name)?;
        let loops = list_loops(self.runner.as_ref())?;
        for l in loops.iter().filter(|l| !l.read_only && l.backs(p.cow)) {
            self.detach(&l.name)?;
        }
        self.detach_unused_origins(p.image, &loops)?;
        remove_if_exists(p.cow)
    }

    fn sweep(&self, known: &[DiskPlan]) -> Result<Vec<String>> {
        let _lock = self.lock()?;
        let keep: Vec<&str> = known
            .iter()
            .filter_map(|p| match p {
                DiskPlan::DmSnapshot { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let mut removed = Vec::new();
        let loops = list_loops(self.runner.as_ref())?;
        let mut tables = snapshot_tables(self.runner.as_ref())?;
        // 1. wk-* snapshots whose COW lives under our state dir but belong to no known VM.
        tables.retain(|t| {
            let ours = t.name.starts_with(DM_PREFIX)
                && !keep.contains(&t.name.as_str())
                && loops
                    .iter()
                    .any(|l| l.majmin == t.cow && self.under_state(l));
            if !ours {
                return true;
            }
            match self.remove_dm(&t.name) {
                Ok(()) => {
                    removed.push(format!("dm device {}", t.name));
                    false
                }
                Err(e) => {
                    tracing::warn!("sweep: {e}");
                    true
                }
            }
        });
        // 2. Loops over files under our state dir (COW files, images) that no snapshot uses.
        for l in &loops {
            if self.under_state(l) && !tables.iter().any(|t| t.uses(&l.majmin)) {
                self.detach(&l.name)?;
                removed.push(format!("loop device {} ({})", l.name, l.back_path()));
            }
        }
        Ok(removed)
    }
}

/// COW store size for an origin of `len` bytes: every chunk may be written once, plus the
/// exception metadata (16 bytes per 4 KiB chunk, in 4 KiB areas) and a header; sparse, so the
/// headroom costs nothing until used and the snapshot can never overflow.
pub fn cow_bytes(len: u64) -> u64 {
    let raw = len + len / 128 + (1 << 20);
    raw.div_ceil(4096) * 4096
}

fn is_absent(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("not found") || s.contains("does not exist") || s.contains("no such device")
}

/// One loop device from `losetup --list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoopInfo {
    pub name: String,
    pub majmin: String,
    pub read_only: bool,
    pub back_file: String,
    pub back_ino: Option<u64>,
    pub back_dev: Option<u64>,
}

impl LoopInfo {
    /// The backing path without the kernel's ` (deleted)` suffix.
    fn back_path(&self) -> &str {
        self.back_file
            .strip_suffix(" (deleted)")
            .unwrap_or(&self.back_file)
    }

    /// Whether this loop's backing file is `file`: same inode when the file exists, else the
    /// same path.
    pub(crate) fn backs(&self, file: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if Path::new(self.back_path()) == file {
            return true;
        }
        match (std::fs::metadata(file), self.back_ino, self.back_dev) {
            (Ok(m), Some(ino), Some(dev)) => m.ino() == ino && m.dev() == dev,
            _ => false,
        }
    }
}

pub(crate) const LOSETUP_LIST: [&str; 5] = [
    "--list",
    "--json",
    "--output",
    "NAME,MAJ:MIN,RO,BACK-FILE,BACK-INO,BACK-MAJ:MIN",
    "--noheadings",
];

pub(crate) fn list_loops(r: &dyn Runner) -> Result<Vec<LoopInfo>> {
    let out = run_ok(r, "losetup", &LOSETUP_LIST)?;
    parse_loops(&out)
}

pub(crate) fn parse_loops(json: &str) -> Result<Vec<LoopInfo>> {
    if json.trim().is_empty() {
        return Ok(Vec::new()); // no loop devices at all
    }
    let bad = |why: String| StorageError::Invalid(format!("cannot parse losetup --json: {why}"));
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let devs = v["loopdevices"]
        .as_array()
        .ok_or_else(|| bad("no loopdevices array".into()))?;
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.trim().to_string(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let num = |x: &serde_json::Value| x.as_u64().or_else(|| text(x).parse().ok());
    Ok(devs
        .iter()
        .map(|d| LoopInfo {
            name: text(&d["name"]),
            majmin: text(&d["maj:min"]),
            read_only: d["ro"].as_bool().unwrap_or_else(|| text(&d["ro"]) == "1"),
            back_file: text(&d["back-file"]),
            back_ino: num(&d["back-ino"]),
            back_dev: parse_majmin(&text(&d["back-maj:min"])).map(|(ma, mi)| libc::makedev(ma, mi)),
        })
        .collect())
}

fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// One line of `dmsetup table --target snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotTable {
    pub name: String,
    pub origin: String,
    pub cow: String,
}

impl SnapshotTable {
    fn uses(&self, majmin: &str) -> bool {
        self.origin == majmin || self.cow == majmin
    }
}

fn snapshot_tables(r: &dyn Runner) -> Result<Vec<SnapshotTable>> {
    let out = run_ok(r, "dmsetup", &["table", "--target", "snapshot"])?;
    Ok(parse_tables(&out))
}

/// Parses `NAME: 0 LEN snapshot ORIGIN COW P CHUNK` lines ("No devices found" yields none).
pub(crate) fn parse_tables(out: &str) -> Vec<SnapshotTable> {
    out.lines()
        .filter_map(|line| {
            let (name, table) = line.split_once(": ")?;
            let t: Vec<&str> = table.split_whitespace().collect();
            (t.len() >= 5 && t[2] == "snapshot").then(|| SnapshotTable {
                name: name.trim().to_string(),
                origin: t[3].to_string(),
                cow: t[4].to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_host::cmd::testing::RecordingRunner;

    const ID: &str = "0123456789abcdef0123456789abcdef";
    const LIST: &str = "losetup --list --json --output NAME,MAJ:MIN,RO,BACK-FILE,BACK-INO,BACK-MAJ:MIN --noheadings";

    struct Fixture {
        _dir: tempfile::TempDir,
        state: PathBuf,
        image: PathBuf,
        cow: PathBuf,
        fake: Arc<RecordingRunner>,
        backend: DmSnapshotBackend,
        plan: DiskPlan,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state = std::fs::canonicalize(dir.path()).unwrap();
        let image = state.join("images/rootfs.ext4");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        let f = File::create(&image).unwrap();
        f.set_len(64 << 20).unwrap();
        let fake = Arc::new(RecordingRunner::new());
        let backend = DmSnapshotBackend::new(fake.clone(), &state).with_backoff(vec![
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        ]);
        let vm_dir = state.join("vms").join(ID);
        let plan = backend.plan(ID, &vm_dir, &image).unwrap();
        Fixture {
            cow: vm_dir.join(COW_FILE),
            _dir: dir,
            state,
            image,
            fake,
            backend,
            plan,
        }
    }

    fn loops_json(entries: &[(&str, &str, bool, &Path)]) -> String {
        let items: Vec<String> = entries
            .iter()
            .map(|(name, mm, ro, file)| {
                format!(
                    r#"{{"name":"{name}","maj:min":"  {mm}  ","ro":{ro},"back-file":"{}","back-ino":1,"back-maj:min":"  0:1  "}}"#,
                    file.display()
                )
            })
            .collect();
        format!(r#"{{"loopdevices":[{}]}}"#, items.join(","))
    }

    fn golden(f: &Fixture, expected: &[String]) {
        let calls = f.fake.rendered();
        assert_eq!(calls, expected, "\nactual calls:\n{}", calls.join("\n"));
    }

    #[test]
    fn plan_is_deterministic_and_sized() {
        let f = fixture();
        let DiskPlan::DmSnapshot {
            cow,
            cow_bytes: cb,
            sectors,
            chunk_sectors,
            name,
            image,
        } = &f.plan
        else {
            panic!("{:?}", f.plan)
        };
        assert_eq!(name, "wk-0123456789ab");
        assert_eq!(*sectors, (64 << 20) / 512);
        assert_eq!(*chunk_sectors, 8);
        assert_eq!(*cb, cow_bytes(64 << 20));
        assert!(*cb > 64 << 20);
        assert_eq!(cow, &f.cow);
        assert_eq!(image, &f.image);
        assert!(f.fake.calls().is_empty(), "plan runs nothing");
        assert!(!f.cow.exists(), "plan makes nothing");
    }

    #[test]
    fn create_fresh_origin() {
        let f = fixture();
        f.fake
            .respond("losetup --find --show --read-only", 0, "/dev/loop7\n", "")
            .respond(
                &format!("losetup --find --show {}", f.cow.display()),
                0,
                "/dev/loop8\n",
                "",
            );
        let disk = f.backend.create(&f.plan).unwrap();
        golden(
            &f,
            &[
                LIST.to_string(),
                format!("losetup --find --show --read-only {}", f.image.display()),
                format!("losetup --find --show {}", f.cow.display()),
                "dmsetup create --noudevrules --noudevsync wk-0123456789ab --table \"0 131072 snapshot /dev/loop7 /dev/loop8 P 8\"".into(),
            ],
        );
        assert_eq!(disk.path, PathBuf::from("/dev/mapper/wk-0123456789ab"));
        assert_eq!(disk.loops[0].device, "/dev/loop7");
        assert!(disk.loops[0].read_only);
        assert_eq!(disk.loops[1].device, "/dev/loop8");
        let len = std::fs::metadata(&f.cow).unwrap().len();
        assert_eq!(len, cow_bytes(64 << 20));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&f.cow).unwrap().blocks(),
            0,
            "COW is sparse"
        );
    }

    #[test]
    fn create_shares_an_existing_origin() {
        let f = fixture();
        let other = f.state.join("other");
        f.fake
            .respond(
                LIST,
                0,
                &loops_json(&[
                    ("/dev/loop2", "7:2", false, &f.image), // rw: not an origin
                    ("/dev/loop3", "7:3", true, &other),
                    ("/dev/loop4", "7:4", true, &f.image),
                ]),
                "",
            )
            .respond("losetup --find --show", 0, "/dev/loop9\n", "");
        f.backend.create(&f.plan).unwrap();
        golden(
            &f,
            &[
                LIST.to_string(),
                format!("losetup --find --show {}", f.cow.display()),
                "dmsetup create --noudevrules --noudevsync wk-0123456789ab --table \"0 131072 snapshot /dev/loop4 /dev/loop9 P 8\"".into(),
            ],
        );
    }

    /// A failure at each step undoes exactly what the earlier steps made, in reverse.
    #[test]
    fn create_rolls_back_at_every_step() {
        let ro = |f: &Fixture| format!("losetup --find --show --read-only {}", f.image.display());
        let rw = |f: &Fixture| format!("losetup --find --show {}", f.cow.display());
        let dm = "dmsetup create --noudevrules --noudevsync wk-0123456789ab --table \"0 131072 snapshot /dev/loop7 /dev/loop8 P 8\"";
        // (failing call prefix, expected calls after the failing one)
        type Case = (fn(&Fixture) -> String, Vec<String>);
        let cases: Vec<Case> = vec![
            (|_| LIST.to_string(), vec![]),
            (ro, vec![]),
            (rw, vec!["losetup --detach /dev/loop7".into()]),
            (
                |_| "dmsetup create".into(),
                vec![
                    "losetup --detach /dev/loop8".into(),
                    "losetup --detach /dev/loop7".into(),
                ],
            ),
        ];
        for (i, (failing, undo)) in cases.into_iter().enumerate() {
            let f = fixture();
            f.fake
                .respond("losetup --find --show --read-only", 0, "/dev/loop7\n", "")
                .respond(&rw(&f), 0, "/dev/loop8\n", "")
                .respond(&failing(&f), 1, "", "boom");
            let err = f.backend.create(&f.plan).unwrap_err();
            assert!(err.to_string().contains("boom"), "case {i}: {err}");
            let all = [LIST.to_string(), ro(&f), rw(&f), dm.to_string()];
            let upto = all
                .iter()
                .position(|c| c.starts_with(&failing(&f)))
                .unwrap();
            let mut expected: Vec<String> = all[..=upto].to_vec();
            expected.extend(undo);
            golden(&f, &expected);
            assert!(!f.cow.exists(), "case {i}: COW file removed");
        }
    }

    #[test]
    fn create_refuses_an_existing_cow_file() {
        let f = fixture();
        std::fs::create_dir_all(f.cow.parent().unwrap()).unwrap();
        std::fs::write(&f.cow, b"x").unwrap();
        let e = f.backend.create(&f.plan).unwrap_err();
        assert!(e.to_string().contains("cannot create COW file"), "{e}");
        assert!(f.fake.calls().is_empty());
        assert_eq!(std::fs::read(&f.cow).unwrap(), b"x", "left alone");
    }

    #[test]
    fn release_removes_everything_and_is_idempotent() {
        let f = fixture();
        std::fs::create_dir_all(f.cow.parent().unwrap()).unwrap();
        std::fs::write(&f.cow, b"").unwrap();
        f.fake
            .respond_n(
                1,
                LIST,
                0,
                &loops_json(&[
                    ("/dev/loop7", "7:7", true, &f.image),
                    ("/dev/loop8", "7:8", false, &f.cow),
                ]),
                "",
            )
            .respond(
                "dmsetup table --target snapshot",
                0,
                "No devices found\n",
                "",
            );
        f.backend.release(&f.plan).unwrap();
        golden(
            &f,
            &[
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                LIST.into(),
                "losetup --detach /dev/loop8".into(),
                "dmsetup table --target snapshot".into(),
                "losetup --detach /dev/loop7".into(),
            ],
        );
        assert!(!f.cow.exists());
        // Second time: nothing is left; dm says absent, no loops listed.
        f.fake.clear();
        f.fake.respond(
            "dmsetup remove",
            1,
            "",
            "device-mapper: remove ioctl on wk-0123456789ab  failed: No such device or address\nCommand failed.\n",
        );
        f.backend.release(&f.plan).unwrap();
        golden(
            &f,
            &[
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                LIST.into(),
            ],
        );
    }

    #[test]
    fn release_keeps_an_origin_other_snapshots_use() {
        let f = fixture();
        f.fake
            .respond(
                LIST,
                0,
                &loops_json(&[
                    ("/dev/loop7", "7:7", true, &f.image),
                    ("/dev/loop8", "7:8", false, &f.cow),
                ]),
                "",
            )
            .respond(
                "dmsetup table --target snapshot",
                0,
                "wk-other: 0 131072 snapshot 7:7 7:12 P 8\n",
                "",
            );
        f.backend.release(&f.plan).unwrap();
        golden(
            &f,
            &[
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                LIST.into(),
                "losetup --detach /dev/loop8".into(),
                "dmsetup table --target snapshot".into(),
            ],
        );
    }

    #[test]
    fn release_retries_while_busy() {
        let f = fixture();
        let busy = "device-mapper: remove ioctl on wk-0123456789ab  failed: Device or resource busy\nCommand failed.\n";
        f.fake.respond_n(2, "dmsetup remove", 1, "", busy);
        f.backend.release(&f.plan).unwrap();
        golden(
            &f,
            &[
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                "dmsetup remove --noudevrules --noudevsync wk-0123456789ab".into(),
                LIST.into(),
            ],
        );
        // Busy for longer than the backoff: a clear error, nothing else touched.
        let f = fixture();
        f.fake.respond("dmsetup remove", 1, "", busy);
        let e = f.backend.release(&f.plan).unwrap_err().to_string();
        assert!(
            e.contains("still holds /dev/mapper/wk-0123456789ab open"),
            "{e}"
        );
        assert_eq!(f.fake.calls().len(), 4, "1 try + 3 retries");
    }

    #[test]
    fn activate_reassembles_only_what_is_missing() {
        let f = fixture();
        std::fs::create_dir_all(f.cow.parent().unwrap()).unwrap();
        std::fs::write(&f.cow, b"").unwrap();
        // After a reboot: nothing attached, no dm device.
        f.fake
            .respond("losetup --find --show --read-only", 0, "/dev/loop1\n", "")
            .respond(
                &format!("losetup --find --show {}", f.cow.display()),
                0,
                "/dev/loop2\n",
                "",
            )
            .respond(
                "dmsetup info",
                1,
                "",
                "Device does not exist.\nCommand failed.\n",
            );
        f.backend.activate(&f.plan).unwrap();
        golden(
            &f,
            &[
                LIST.into(),
                format!("losetup --find --show --read-only {}", f.image.display()),
                format!("losetup --find --show {}", f.cow.display()),
                "dmsetup info wk-0123456789ab".into(),
                "dmsetup create --noudevrules --noudevsync wk-0123456789ab --table \"0 131072 snapshot /dev/loop1 /dev/loop2 P 8\"".into(),
            ],
        );
        // Already up: only looks.
        let f2 = fixture();
        std::fs::create_dir_all(f2.cow.parent().unwrap()).unwrap();
        std::fs::write(&f2.cow, b"").unwrap();
        f2.fake.respond(
            LIST,
            0,
            &loops_json(&[
                ("/dev/loop1", "7:1", true, &f2.image),
                ("/dev/loop2", "7:2", false, &f2.cow),
            ]),
            "",
        );
        let d = f2.backend.activate(&f2.plan).unwrap();
        golden(&f2, &[LIST.into(), "dmsetup info wk-0123456789ab".into()]);
        assert_eq!(d.loops[1].device, "/dev/loop2");
    }

    #[test]
    fn sweep_removes_only_unknown_wick_devices_under_the_state_dir() {
        let f = fixture();
        let known_cow = f.state.join("vms/known/root.cow");
        let stray_cow = f.state.join("vms/stray/root.cow");
        let foreign = PathBuf::from("/elsewhere/root.cow");
        f.fake
            .respond(
                LIST,
                0,
                &loops_json(&[
                    ("/dev/loop1", "7:1", true, &f.image),
                    ("/dev/loop2", "7:2", false, &known_cow),
                    ("/dev/loop3", "7:3", false, &stray_cow),
                    ("/dev/loop4", "7:4", false, &foreign),
                    ("/dev/loop5", "7:5", false, &f.state.join("vms/x/root.cow")),
                ]),
                "",
            )
            .respond(
                "dmsetup table --target snapshot",
                0,
                "wk-known: 0 131072 snapshot 7:1 7:2 P 8\n\
                 wk-stray: 0 131072 snapshot 7:1 7:3 P 8\n\
                 wk-foreign: 0 131072 snapshot 7:1 7:4 P 8\n",
                "",
            );
        let known = DiskPlan::DmSnapshot {
            image: f.image.clone(),
            cow: known_cow,
            cow_bytes: 1,
            sectors: 1,
            chunk_sectors: 8,
            name: "wk-known".into(),
        };
        let removed = f.backend.sweep(&[known]).unwrap();
        golden(
            &f,
            &[
                LIST.into(),
                "dmsetup table --target snapshot".into(),
                "dmsetup remove --noudevrules --noudevsync wk-stray".into(),
                "losetup --detach /dev/loop3".into(),
                "losetup --detach /dev/loop5".into(),
            ],
        );
        assert_eq!(removed.len(), 3, "{removed:?}");
    }

    #[test]
    fn parses_losetup_and_dmsetup() {
        let json = r#"{"loopdevices":[{"name":"/dev/loop0","maj:min":"  7:0  ","ro":true,
            "back-file":"/a b/img (deleted)","back-ino":10,"back-maj:min":"     254:0  "}]}"#;
        let l = &parse_loops(json).unwrap()[0];
        assert_eq!(l.name, "/dev/loop0");
        assert_eq!(l.majmin, "7:0");
        assert!(l.read_only);
        assert_eq!(l.back_path(), "/a b/img");
        assert_eq!(l.back_ino, Some(10));
        assert_eq!(l.back_dev, Some(libc::makedev(254, 0)));
        assert!(l.backs(Path::new("/a b/img")));
        assert!(parse_loops("").unwrap().is_empty());
        assert!(parse_loops("junk").is_err());
        let t = parse_tables("wk-a: 0 8 snapshot 7:0 7:1 P 8\nother: 0 8 linear 7:0 0\n");
        assert_eq!(
            t,
            vec![SnapshotTable {
                name: "wk-a".into(),
                origin: "7:0".into(),
                cow: "7:1".into()
            }]
        );
        assert!(parse_tables("No devices found\n").is_empty());
    }
}
