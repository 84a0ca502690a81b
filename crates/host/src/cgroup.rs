//! Per-VM cgroups with CPU, memory and pids limits, on cgroup v1 (one hierarchy per
//! controller) or v2 (one unified hierarchy).
//!
//! The controllers are found from `/proc/mounts`, never by assuming `/sys/fs/cgroup/<name>`: on a
//! hybrid host `/sys/fs/cgroup` is a tmpfs where a `mkdir` "succeeds" and means nothing. A cgroup
//! is named by a path relative to every controller's root (`wick/vm-<12 hex>`), so its identity
//! is a string that can be recorded before it exists.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The controllers every VM cgroup needs.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// CFS period used for CPU quotas (100 ms, the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors of cgroup handling; messages name the file or the missing controller.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unsupported(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {0} still has processes after SIGKILL: {1:?}")]
    Busy(String, Vec<u32>),
    #[error("bad cgroup name {0:?}: use relative path components without `..`")]
    BadName(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per [`CPU_PERIOD_US`], in µs (`vcpu × period`).
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
    pub pids_max: u64,
}

impl Limits {
    /// `vcpu` CPUs of quota, `memory_mib + overhead_mib` of memory, `pids_max` tasks.
    pub fn for_vm(vcpu: u32, memory_mib: u64, overhead_mib: u64, pids_max: u64) -> Limits {
        Limits {
            cpu_quota_us: u64::from(vcpu.max(1)) * CPU_PERIOD_US,
            memory_bytes: (memory_mib + overhead_mib) << 20,
            pids_max,
        }
    }
}

/// Where the controllers live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v1: the mount point of each of [`CONTROLLERS`], in that order.
    V1 { mounts: [PathBuf; 3] },
    /// cgroup v2: the unified mount point.
    V2 { root: PathBuf },
}

impl Cgroups {
    /// The host's hierarchy, from `/proc/mounts`.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        let mounts =
            std::fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
        Cgroups::from_mounts(&mounts, |p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    /// The hierarchy described by a `/proc/mounts` text. v1 wins when it has every controller
    /// (a hybrid host's v2 mount then has none); else a v2 mount whose `cgroup.controllers`
    /// (read through `v2_controllers`) lists them all.
    pub fn from_mounts(
        mounts: &str,
        v2_controllers: impl Fn(&Path) -> String,
    ) -> Result<Cgroups, CgroupError> {
        let mut v1: [Option<PathBuf>; 3] = Default::default();
        let mut v2 = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let (point, fstype, opts) = (PathBuf::from(crate::mounts::unescape(f[1])), f[2], f[3]);
            match fstype {
                "cgroup" => {
                    for (slot, c) in v1.iter_mut().zip(CONTROLLERS) {
                        if slot.is_none() && opts.split(',').any(|o| o == c) {
                            *slot = Some(point.clone());
                        }
                    }
                }
                "cgroup2" => v2.push(point),
                _ => {}
            }
        }
        if let [Some(cpu), Some(memory), Some(pids)] = v1.clone() {
            return Ok(Cgroups::V1 {
                mounts: [cpu, memory, pids],
            });
        }
        for root in &v2 {
            let have = v2_controllers(root);
            if CONTROLLERS
                .iter()
                .all(|c| have.split_whitespace().any(|h| h == *c))
            {
                return Ok(Cgroups::V2 { root: root.clone() });
            }
        }
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .zip(&v1)
            .filter(|(_, m)| m.is_none())
            .map(|(c, _)| *c)
            .collect();
        Err(CgroupError::Unsupported(format!(
            "cgroup v1 lacks {} and no cgroup v2 mount ({}) has cpu, memory and pids",
            missing.join(", "),
            if v2.is_empty() {
                "none mounted".to_string()
            } else {
                v2.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )))
    }

    /// Like [`Cgroups::detect`]; when this mount namespace shows **no** cgroup mount at all
    /// (e.g. a process started by `ip netns exec`, which remounts `/sys`), mounts the
    /// hierarchies this process belongs to (per `/proc/self/cgroup`) under `dir` first — the
    /// same hierarchies, seen through a mount private to this namespace.
    pub fn detect_or_mount(dir: &Path) -> Result<Cgroups, CgroupError> {
        let mounts =
            std::fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
        let any = mounts
            .lines()
            .any(|l| matches!(l.split_whitespace().nth(2), Some("cgroup" | "cgroup2")));
        if any {
            return Cgroups::detect();
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io_err(Path::new("/proc/self/cgroup")))?;
        for (fstype, opts) in hierarchies_to_mount(&own) {
            let at = dir.join(if fstype == "cgroup2" {
                "unified"
            } else {
                &opts
            });
            std::fs::create_dir_all(&at).map_err(io_err(&at))?;
            mount_cgroup(fstype, &opts, &at)?;
        }
        Cgroups::detect()
    }

    /// `v1` or `v2`, for messages.
    pub fn version(&self) -> &'static str {
        match self {
            Cgroups::V1 { .. } => "v1",
            Cgroups::V2 { .. } => "v2",
        }
    }

    fn check_name(rel: &str) -> Result<(), CgroupError> {
        let ok = !rel.is_empty()
            && !rel.starts_with('/')
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(())
        } else {
            Err(CgroupError::BadName(rel.to_string()))
        }
    }

    /// The directories of cgroup `rel`: one per controller on v1, one on v2.
    pub fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = match self {
            Cgroups::V1 { mounts } => mounts.iter().map(|m| m.join(rel)).collect(),
            Cgroups::V2 { root } => vec![root.join(rel)],
        };
        out.dedup();
        out
    }

    /// The `cgroup.procs` files a process writes itself into to join `rel`.
    pub fn procs_files(&self, rel: &str) -> Vec<PathBuf> {
        self.dirs(rel)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates cgroup `rel` (and its parents) with `limits`. Idempotent.
    pub fn create(&self, rel: &str, limits: &Limits) -> Result<(), CgroupError> {
        Self::check_name(rel)?;
        let write = |p: PathBuf, v: String| std::fs::write(&p, v).map_err(io_err(&p));
        match self {
            Cgroups::V1 { mounts } => {
                for m in mounts {
                    let d = m.join(rel);
                    std::fs::create_dir_all(&d).map_err(io_err(&d))?;
                }
                let [cpu, memory, pids] = mounts;
                let (cpu, memory, pids) = (cpu.join(rel), memory.join(rel), pids.join(rel));
                write(cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                write(
                    cpu.join("cpu.cfs_quota_us"),
                    limits.cpu_quota_us.to_string(),
                )?;
                write(
                    memory.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                write(pids.join("pids.max"), limits.pids_max.to_string())?;
            }
            Cgroups::V2 { root } => {
                // Every ancestor must delegate the controllers to its children.
                let mut dir = root.clone();
                for comp in rel.split('/') {
                    write(
                        dir.join("cgroup.subtree_control"),
                        "+cpu +memory +pids".into(),
                    )?;
                    dir = dir.join(comp);
                    match std::fs::create_dir(&dir) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(io_err(&dir)(e))
                        }
                        _ => {}
                    }
                }
                write(
                    dir.join("cpu.max"),
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                write(dir.join("pids.max"), limits.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    /// The limits of `rel` as the kernel reports them.
    pub fn read_limits(&self, rel: &str) -> Result<Limits, CgroupError> {
        let read = |p: PathBuf| -> Result<String, CgroupError> {
            std::fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .map_err(io_err(&p))
        };
        let num = |s: String, what: &Path| -> Result<u64, CgroupError> {
            s.parse().map_err(|_| CgroupError::Io {
                path: what.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {s:?}")),
            })
        };
        match self {
            Cgroups::V1 { mounts } => {
                let [cpu, memory, pids] = mounts;
                let q = cpu.join(rel).join("cpu.cfs_quota_us");
                let m = memory.join(rel).join("memory.limit_in_bytes");
                let p = pids.join(rel).join("pids.max");
                Ok(Limits {
                    cpu_quota_us: num(read(q.clone())?, &q)?,
                    memory_bytes: num(read(m.clone())?, &m)?,
                    pids_max: num(read(p.clone())?, &p)?,
                })
            }
            Cgroups::V2 { root } => {
                let d = root.join(rel);
                let c = d.join("cpu.max");
                let quota = read(c.clone())?
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let m = d.join("memory.max");
                let p = d.join("pids.max");
                Ok(Limits {
                    cpu_quota_us: num(quota, &c)?,
                    memory_bytes: num(read(m.clone())?, &m)?,
                    pids_max: num(read(p.clone())?, &p)?,
                })
            }
        }
    }

    /// The processes in cgroup `rel` (in any of its controllers).
    pub fn pids(&self, rel: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .procs_files(rel)
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes cgroup `rel`: SIGKILLs any process still in it (every member is a VMM or sidecar
    /// of that VM), waits up to 2 s for it to empty, then removes its directories. Idempotent;
    /// returns whether anything existed.
    pub fn remove(&self, rel: &str) -> Result<bool, CgroupError> {
        Self::check_name(rel)?;
        let dirs: Vec<PathBuf> = self.dirs(rel).into_iter().filter(|d| d.exists()).collect();
        if dirs.is_empty() {
            return Ok(false);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = self.pids(rel);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(rel.to_string(), left));
            }
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for d in dirs {
            // Emptied cgroups can take a moment to become removable (EBUSY right after the last
            // task exits).
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(io_err(&d)(e)),
                }
            }
        }
        Ok(true)
    }

    /// Removes cgroup `rel` if it has no child cgroups and no processes (best effort).
    pub fn remove_if_empty(&self, rel: &str) {
        if Self::check_name(rel).is_err() {
            return;
        }
        for d in self.dirs(rel) {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Names of the cgroups directly under `parent` (in any controller), sorted.
    pub fn children(&self, parent: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .dirs(parent)
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The hierarchies of a `/proc/<pid>/cgroup` text that carry a needed controller, as
/// `(fstype, mount options)`: each v1 hierarchy with its exact controller set, else v2.
fn hierarchies_to_mount(own: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut v2 = false;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls)) = (f.next(), f.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = true;
        } else if ctrls.split(',').any(|c| CONTROLLERS.contains(&c)) {
            out.push(("cgroup", ctrls.to_string()));
        }
    }
    if out.is_empty() && v2 {
        out.push(("cgroup2", String::new()));
    }
    out
}

fn mount_cgroup(fstype: &str, opts: &str, at: &Path) -> Result<(), CgroupError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &[u8]| CString::new(s).map_err(|e| io_err(at)(io::Error::other(e)));
    let (src, ty, target, data) = (
        c(b"cgroup")?,
        c(fstype.as_bytes())?,
        c(at.as_os_str().as_bytes())?,
        c(opts.as_bytes())?,
    );
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            ty.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io_err(at)(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn hybrid_hosts_use_the_v1_mounts_from_proc_mounts() {
        let c = Cgroups::from_mounts(HYBRID, |_| String::new()).unwrap();
        assert_eq!(
            c,
            Cgroups::V1 {
                mounts: [
                    "/sys/fs/cgroup/cpu".into(),
                    "/sys/fs/cgroup/memory".into(),
                    "/sys/fs/cgroup/pids".into()
                ]
            }
        );
        assert_eq!(
            c.procs_files("wick/vm-abc"),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/wick/vm-abc/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/memory/wick/vm-abc/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/pids/wick/vm-abc/cgroup.procs"),
            ]
        );
    }

    #[test]
    fn combined_v1_mounts_and_escaped_paths() {
        let m = "cgroup /c/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                 cgroup /c/mem\\040x cgroup rw,memory 0 0\ncgroup /c/pids cgroup rw,pids 0 0\n";
        let Cgroups::V1 { mounts } = Cgroups::from_mounts(m, |_| String::new()).unwrap() else {
            panic!("v1 expected")
        };
        assert_eq!(mounts[0], PathBuf::from("/c/cpu,cpuacct"));
        assert_eq!(mounts[1], PathBuf::from("/c/mem x"));
    }

    #[test]
    fn pure_v2_needs_the_controllers() {
        let m = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        let c = Cgroups::from_mounts(m, |_| "cpuset cpu io memory pids".into()).unwrap();
        assert_eq!(
            c,
            Cgroups::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        let e = Cgroups::from_mounts(m, |_| "cpu io".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cpu, memory and pids") && e.contains("/sys/fs/cgroup"),
            "{e}"
        );
    }

    #[test]
    fn hierarchies_to_mount_follow_proc_self_cgroup() {
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/x\n2:cpu,cpuacct:/\n1:devices:/\n0::/\n";
        assert_eq!(
            hierarchies_to_mount(own),
            vec![
                ("cgroup", "pids".to_string()),
                ("cgroup", "memory".to_string()),
                ("cgroup", "cpu,cpuacct".to_string())
            ]
        );
        assert_eq!(
            hierarchies_to_mount("0::/user.slice\n"),
            vec![("cgroup2", String::new())]
        );
    }

    #[test]
    fn v2_layout_delegates_and_writes_limits() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cgroups::V2 {
            root: dir.path().to_path_buf(),
        };
        let l = Limits::for_vm(2, 1024, 512, 512);
        c.create("wick/vm-0123456789ab", &l).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("wick/cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("wick/vm-0123456789ab/cpu.max"), "200000 100000");
        assert_eq!(
            read("wick/vm-0123456789ab/memory.max"),
            (1536u64 << 20).to_string()
        );
        assert_eq!(read("wick/vm-0123456789ab/pids.max"), "512");
        assert_eq!(c.read_limits("wick/vm-0123456789ab").unwrap(), l);
        assert_eq!(c.children("wick"), vec!["vm-0123456789ab".to_string()]);
    }

    #[test]
    fn v1_layout_writes_each_controller() {
        let dir = tempfile::tempdir().unwrap();
        let m = |c: &str| dir.path().join(c);
        let c = Cgroups::V1 {
            mounts: [m("cpu"), m("memory"), m("pids")],
        };
        let l = Limits::for_vm(1, 256, 512, 512);
        c.create("w/vm-1", &l).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("cpu/w/vm-1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu/w/vm-1/cpu.cfs_quota_us"), "100000");
        assert_eq!(
            read("memory/w/vm-1/memory.limit_in_bytes"),
            (768u64 << 20).to_string()
        );
        assert_eq!(read("pids/w/vm-1/pids.max"), "512");
        assert_eq!(c.read_limits("w/vm-1").unwrap(), l);
    }

    #[test]
    fn names_cannot_escape_the_hierarchy() {
        let c = Cgroups::V2 {
            root: "/nonexistent".into(),
        };
        for bad in ["", "/abs", "a/../b", "a//b", "."] {
            assert!(
                matches!(c.remove(bad), Err(CgroupError::BadName(_))),
                "{bad}"
            );
        }
    }

    /// Real kernel: limits read back, a member process is killed by `remove`, and the cgroup
    /// is gone afterwards.
    #[test]
    fn real_cgroup_limits_join_and_remove() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: real_cgroup_limits_join_and_remove: needs root");
            return;
        }
        let c = match Cgroups::detect() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIP: real_cgroup_limits_join_and_remove: {e}");
                return;
            }
        };
        let rel = format!("wick-test-{}/vm-test", std::process::id());
        let parent = rel.split('/').next().unwrap().to_string();
        struct Cleanup<'a>(&'a Cgroups, String, String);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = self.0.remove(&self.1);
                let _ = self.0.remove(&self.2);
            }
        }
        let _g = Cleanup(&c, rel.clone(), parent);
        let l = Limits::for_vm(1, 64, 64, 32);
        c.create(&rel, &l).unwrap();
        assert_eq!(c.read_limits(&rel).unwrap(), l);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        for f in c.procs_files(&rel) {
            std::fs::write(&f, child.id().to_string()).unwrap();
        }
        assert_eq!(c.pids(&rel), vec![child.id()]);
        assert!(c.remove(&rel).unwrap());
        let status = child.wait().unwrap();
        assert!(!status.success(), "the member was killed");
        assert!(c.dirs(&rel).iter().all(|d| !d.exists()));
        assert!(!c.remove(&rel).unwrap(), "idempotent");
    }
}
