//! Reading the host state a test asserts on: file trees (to prove nothing outside a
//! destination changed, or that no file is left to a VMM uid) and `/proc/<pid>/status`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Path → (mode, mtime in ns, link count, contents or link target).
pub type Snapshot = BTreeMap<PathBuf, (u32, i128, u64, Vec<u8>)>;

/// Every path from `root` down (links not followed), except the subtree at `skip`.
pub fn snapshot(root: &Path, skip: Option<&Path>) -> Snapshot {
    fn walk(p: &Path, skip: Option<&Path>, out: &mut Snapshot) {
        if Some(p) == skip {
            return;
        }
        let m = p.symlink_metadata().unwrap();
        let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        let body = if m.file_type().is_symlink() {
            std::fs::read_link(p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if m.is_file() {
            std::fs::read(p).unwrap()
        } else {
            Vec::new()
        };
        out.insert(p.to_path_buf(), (m.mode(), mtime, m.nlink(), body));
        if m.is_dir() {
            for c in std::fs::read_dir(p).unwrap() {
                walk(&c.unwrap().path(), skip, out);
            }
        }
    }
    let mut out = Snapshot::new();
    walk(root, skip, &mut out);
    out
}

/// Every path from `dir` down owned by `uid` (links not followed).
pub fn owned_by(dir: &Path, uid: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(m) = std::fs::symlink_metadata(dir) else {
        return out;
    };
    if m.uid() == uid {
        out.push(dir.to_path_buf());
    }
    if m.is_dir() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.extend(owned_by(&e.path(), uid));
        }
    }
    out
}

/// `/proc/<pid>/status` as read once.
pub struct ProcStatus(String);

impl ProcStatus {
    /// Panics when the process is gone.
    pub fn of(pid: u32) -> ProcStatus {
        ProcStatus(std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap())
    }

    /// The whole line starting with `key` (e.g. `"Seccomp:"`), or `""`.
    pub fn line(&self, key: &str) -> &str {
        self.0
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_default()
    }

    /// The numbers of the line `key`: for `"Uid:"`/`"Gid:"` real, effective, saved and fs ids.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.line(key)
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}

impl ProcStatus {
    /// `VmHWM` (peak resident set) in KiB; `None` for a zombie or a kernel thread.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.line("VmHWM:")
            .strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }
}

/// Samples `pid`'s own peak RSS (`VmHWM`, KiB) every 5 ms until it exits; join for the peak.
/// (Not wait4's rusage: a forked child's max RSS starts from its parent's, the test.)
pub fn sample_peak_rss_kib(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(hwm) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| ProcStatus(s).peak_rss_kib())
        {
            peak = peak.max(hwm);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        peak
    })
}
