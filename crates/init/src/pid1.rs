//! The testable parts of wick-init staying PID 1 (images without a usable init): choosing
//! between the image's init and ours, the API filesystems to mount, restart backoff, the
//! signals the agent sends, and the poweroff's unmount order.
//!
//! An image's `/sbin/init` is used only when it resolves (inside the new root) to an executable
//! named `systemd`: the agent is started by a systemd unit, so any other init (busybox,
//! sysvinit, tini, none at all as in debootstrap minbase) would boot a guest without an agent.
//! `wick.init=image` forces the image's init, `wick.init=wick` ours.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// `wick.init=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitMode {
    /// Use the image's init when it is systemd, else stay PID 1 (the default).
    #[default]
    Auto,
    /// Always stay PID 1 and supervise the agent.
    Wick,
    /// Always exec the image's init (`init=`, default `/sbin/init`).
    Image,
}

impl InitMode {
    pub fn parse(s: &str) -> Option<InitMode> {
        match s {
            "auto" => Some(InitMode::Auto),
            "wick" => Some(InitMode::Wick),
            "image" => Some(InitMode::Image),
            _ => None,
        }
    }
}

/// What wick-init does after mounting the root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitChoice {
    /// `switch_root` and exec this path (inside the new root).
    Image(String),
    /// Stay PID 1; the string says why (for the console).
    Wick(String),
}

/// Resolves `path` (absolute, as seen inside `root`) following symlinks the way the guest will
/// after `switch_root`: absolute targets are taken relative to `root`, `..` never climbs above
/// it. Returns the host path of the final non-link, or `None` when it does not exist or the
/// chain is longer than 40 links.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_string)
        .collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let host = cur
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&comp);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            let target = target.to_str()?.to_string();
            if target.starts_with('/') {
                cur.clear();
            }
            pending.extend(
                target
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                    .map(str::to_string),
            );
        } else {
            cur.push(comp);
        }
    }
    Some(cur.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Decides which init runs, looking at the mounted new root.
pub fn choose_init(root: &Path, mode: InitMode, init: &str, init_given: bool) -> InitChoice {
    use std::os::unix::fs::PermissionsExt;
    match mode {
        InitMode::Wick => return InitChoice::Wick("wick.init=wick".into()),
        InitMode::Image => return InitChoice::Image(init.to_string()),
        InitMode::Auto if init_given => return InitChoice::Image(init.to_string()),
        InitMode::Auto => {}
    }
    let Some(real) = resolve_in_root(root, init) else {
        return InitChoice::Wick(format!("the image has no {init}"));
    };
    let executable = std::fs::metadata(&real)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return InitChoice::Wick(format!("{init} in the image is not an executable file"));
    }
    if real.file_name().is_some_and(|n| n == "systemd") {
        InitChoice::Image(init.to_string())
    } else {
        InitChoice::Wick(format!(
            "{init} in the image is {}, not systemd (which starts wick-agent)",
            real.strip_prefix(root).unwrap_or(&real).display()
        ))
    }
}

/// One filesystem wick-init mounts when it stays PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiMount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: libc::c_ulong,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// The API filesystems, in mount order (parents first).
pub const API_MOUNTS: &[ApiMount] = &[
    ApiMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    ApiMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    ApiMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some("mode=0755"),
    },
    ApiMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some("mode=0620,ptmxmode=0666,gid=5"),
    },
    ApiMount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    ApiMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    ApiMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
];

/// Mount points listed in `/proc/mounts` text (octal escapes such as `\040` decoded).
pub fn mount_points(proc_mounts: &str) -> Vec<String> {
    proc_mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount)
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API mounts not yet mounted, given `/proc/mounts` (empty text: all of them).
pub fn missing_mounts(proc_mounts: &str) -> Vec<ApiMount> {
    let have = mount_points(proc_mounts);
    API_MOUNTS
        .iter()
        .filter(|m| !have.iter().any(|h| h == m.target))
        .copied()
        .collect()
}

/// What to unmount at poweroff, deepest first: everything but `/` and the kernel's API
/// filesystems (which hold no data).
pub fn unmount_order(proc_mounts: &str) -> Vec<String> {
    let keep = ["/", "/proc", "/sys", "/dev", "/dev/pts"];
    let mut pts: Vec<String> = mount_points(proc_mounts)
        .into_iter()
        .filter(|p| !keep.contains(&p.as_str()))
        .collect();
    // Later mounts may sit on earlier ones: undo in reverse order.
    pts.reverse();
    pts.dedup();
    pts
}

/// Restart delays of a supervised service: 200 ms doubling to 10 s; a run that lasted 30 s or
/// more starts over from 200 ms.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);
    pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

    /// The delay before the next start, after a run that lasted `ran`.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= Self::HEALTHY_RUN {
            self.failures = 0;
        }
        let d = Self::FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        d
    }
}

/// Signals PID 1 understands from the agent (systemd's numbers for the same requests).
pub fn poweroff_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}
/// Reboot request.
pub fn reboot_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}
/// "(Re)start sshd": the agent sends it after installing the host keys.
pub const SSHD_SIGNAL: libc::c_int = libc::SIGUSR1;

/// The environment wick-init gives the agent and sshd.
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the agent is, in order of preference (the image injection puts it at the first).
pub const AGENT_PATHS: &[&str] = &["/usr/local/bin/wick-agent", "/usr/bin/wick-agent"];

/// Where sshd may be.
pub const SSHD_PATHS: &[&str] = &["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"];

/// The first of `candidates` that resolves (inside `root`) to a file.
pub fn find_binary(root: &Path, candidates: &[&'static str]) -> Option<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|c| resolve_in_root(root, c).is_some_and(|p| p.is_file()))
}

/// Whether sshd has at least one host key to serve (`/etc/ssh/ssh_host_*_key`).
pub fn has_host_keys(root: &Path) -> bool {
    std::fs::read_dir(root.join("etc/ssh"))
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("ssh_host_") && n.ends_with("_key")
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn exe(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"\x7fELF").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        exe(&r.join("usr/lib/systemd/systemd"));
        std::fs::create_dir_all(r.join("usr/sbin")).unwrap();
        symlink("usr/sbin", r.join("sbin")).unwrap(); // usrmerge
        symlink("/lib/systemd/systemd", r.join("usr/sbin/init")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/sbin/init"),
            Some(r.join("usr/lib/systemd/systemd"))
        );
        // `..` and absolute links never leave the root.
        symlink("../../../../../../etc/passwd", r.join("usr/sbin/up")).unwrap();
        assert_eq!(resolve_in_root(r, "/sbin/up"), None);
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in_root(r, "/loop"), None);
    }

    #[test]
    fn chooses_the_image_init_only_for_systemd() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let auto = |r: &Path| choose_init(r, InitMode::Auto, "/sbin/init", false);
        assert!(matches!(auto(r), InitChoice::Wick(why) if why.contains("no /sbin/init")));
        exe(&r.join("bin/busybox"));
        std::fs::create_dir_all(r.join("sbin")).unwrap();
        symlink("/bin/busybox", r.join("sbin/init")).unwrap();
        assert!(matches!(auto(r), InitChoice::Wick(why) if why.contains("bin/busybox")));
        assert_eq!(
            choose_init(r, InitMode::Image, "/sbin/init", false),
            InitChoice::Image("/sbin/init".into())
        );
        assert_eq!(
            choose_init(r, InitMode::Auto, "/bin/busybox", true),
            InitChoice::Image("/bin/busybox".into())
        );
        exe(&r.join("lib/systemd/systemd"));
        std::fs::remove_file(r.join("sbin/init")).unwrap();
        symlink("/lib/systemd/systemd", r.join("sbin/init")).unwrap();
        assert_eq!(auto(r), InitChoice::Image("/sbin/init".into()));
        assert!(matches!(
            choose_init(r, InitMode::Wick, "/sbin/init", false),
            InitChoice::Wick(_)
        ));
        std::fs::set_permissions(
            r.join("lib/systemd/systemd"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(auto(r), InitChoice::Wick(why) if why.contains("not an executable")));
    }

    #[test]
    fn mounts_only_what_is_missing_and_unmounts_deepest_first() {
        let all = missing_mounts("");
        assert_eq!(all.len(), API_MOUNTS.len());
        let mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n\
                      devtmpfs /dev devtmpfs rw 0 0\n/dev/vdb /root ext4 rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n/dev/vdc /root/my\\040dir ext4 rw 0 0\n";
        let targets: Vec<_> = missing_mounts(mounts).iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/dev/pts", "/dev/shm", "/run"]);
        assert_eq!(unmount_order(mounts), ["/root/my dir", "/tmp", "/root"]);
    }

    #[test]
    fn backoff_is_bounded_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let short = Duration::from_millis(10);
        let d: Vec<_> = (0..10).map(|_| b.after_exit(short)).collect();
        assert_eq!(d[0], Duration::from_millis(200));
        assert_eq!(d[1], Duration::from_millis(400));
        assert!(d.iter().all(|x| *x <= Backoff::MAX));
        assert_eq!(d[9], Backoff::MAX);
        assert_eq!(b.after_exit(Duration::from_secs(31)), Backoff::FIRST);
    }

    #[test]
    fn parses_modes_and_finds_binaries() {
        assert_eq!(InitMode::parse("wick"), Some(InitMode::Wick));
        assert_eq!(InitMode::parse("image"), Some(InitMode::Image));
        assert_eq!(InitMode::parse("auto"), Some(InitMode::Auto));
        assert_eq!(InitMode::parse("systemd"), None);
        let d = tempfile::tempdir().unwrap();
        assert_eq!(find_binary(d.path(), SSHD_PATHS), None);
        exe(&d.path().join("usr/sbin/sshd"));
        assert_eq!(find_binary(d.path(), SSHD_PATHS), Some("/usr/sbin/sshd"));
        assert!(!has_host_keys(d.path()));
        std::fs::create_dir_all(d.path().join("etc/ssh")).unwrap();
        std::fs::write(d.path().join("etc/ssh/ssh_host_ed25519_key"), b"k").unwrap();
        assert!(has_host_keys(d.path()));
        assert_ne!(poweroff_signal(), reboot_signal());
    }
}
