//! Firecracker's `jailer` as a plan: its command line and the chroot layout, as pure functions
//! of the VM dir, the VM config and its [`Jail`], so both are golden-tested without a jailer
//! binary (there is none on the development hosts; see `ARCHITECTURE.md`).
//!
//! Layout (the jailer's own convention): `<state>/jail/<exec name>/<id>/root` is the chroot,
//! with `<id>` = `vm-<12 hex>`, the leaf of the VM's cgroup, so the jailer's cgroup
//! `<parent>/<id>` is the very cgroup wickd recorded and made. Inside the chroot, at its top:
//! `fc.sock` (API), `vsock.sock`, `firecracker.log`, `metrics.json`, and hard links of the boot
//! files and disks under fixed names (`vmlinux`, `initrd`, `rootfs`, `disk1`, …). The chroot base
//! sits next to `vms/` (not inside a VM dir) to keep the socket paths short (108 bytes).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{Jail, VmmConfig};

/// One file the chroot needs: `src` on the host, linked at `name` in the chroot's top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    pub src: PathBuf,
    pub name: String,
}

/// Everything about one jailed Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerPlan {
    /// `<state>/jail/firecracker/<id>`: removed as a whole at cleanup.
    pub dir: PathBuf,
    /// The chroot (`dir/root`), as the host sees it.
    pub root: PathBuf,
    /// The jailer's arguments (after the binary).
    pub args: Vec<OsString>,
    /// Files hard-linked into the chroot before the jailer runs.
    pub files: Vec<JailFile>,
}

/// The jail id of the VM dir `vm_dir` (`vm-` + the first 12 characters of its name).
pub fn jail_id(vm_dir: &Path) -> String {
    let name = vm_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("vm-{short}")
}

/// The jail dir of the VM in `vm_dir` (`<state>/vms/<id>` → `<state>/jail/<exec name>/vm-<12>`;
/// the jailer names the middle component after its `--exec-file`).
pub fn jail_dir(vm_dir: &Path, firecracker: &Path) -> PathBuf {
    let state = vm_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new("/"));
    let exec = firecracker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into());
    state.join("jail").join(exec).join(jail_id(vm_dir))
}

/// The path inside the chroot that Firecracker's API is given for `name`.
pub fn in_jail(name: &str) -> PathBuf {
    Path::new("/").join(name)
}

/// The plan for `cfg` in `vm_dir`, confined by `jail`, running `firecracker`.
pub fn plan(firecracker: &Path, vm_dir: &Path, cfg: &VmmConfig, jail: &Jail) -> JailerPlan {
    let dir = jail_dir(vm_dir, firecracker);
    let base = dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let parent_cgroup = jail
        .cgroup
        .rsplit_once('/')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    let mut files = vec![JailFile {
        src: cfg.kernel.clone(),
        name: "vmlinux".into(),
    }];
    if let Some(i) = &cfg.initrd {
        files.push(JailFile {
            src: i.clone(),
            name: "initrd".into(),
        });
    }
    files.push(JailFile {
        src: cfg.root_disk.clone(),
        name: "rootfs".into(),
    });
    for (i, d) in cfg.extra_disks.iter().enumerate() {
        files.push(JailFile {
            src: d.clone(),
            name: format!("disk{}", i + 1),
        });
    }
    let l = &jail.limits;
    let cgroups: Vec<String> = match jail.cgroup_version {
        2 => vec![
            format!(
                "cpu.max={} {}",
                l.cpu_quota_us,
                wick_host::cgroup::CPU_PERIOD_US
            ),
            format!("memory.max={}", l.memory_bytes),
            format!("pids.max={}", l.pids_max),
        ],
        _ => vec![
            format!("cpu.cfs_period_us={}", wick_host::cgroup::CPU_PERIOD_US),
            format!("cpu.cfs_quota_us={}", l.cpu_quota_us),
            format!("memory.limit_in_bytes={}", l.memory_bytes),
            format!("pids.max={}", l.pids_max),
        ],
    };
    let mut args: Vec<OsString> = vec![
        "--id".into(),
        jail_id(vm_dir).into(),
        "--exec-file".into(),
        firecracker.into(),
        "--uid".into(),
        jail.uid.to_string().into(),
        "--gid".into(),
        jail.gid.to_string().into(),
        "--chroot-base-dir".into(),
        base.into(),
        "--cgroup-version".into(),
        jail.cgroup_version.to_string().into(),
        "--parent-cgroup".into(),
        parent_cgroup.into(),
    ];
    for c in cgroups {
        args.push("--cgroup".into());
        args.push(c.into());
    }
    // No `--new-pid-ns`: the jailer would fork and exit, and wickd tracks the pid it spawned
    // (without it the jailer execs Firecracker in place, keeping the pid).
    args.extend(["--".into(), "--api-sock".into(), in_jail("fc.sock").into()]);
    JailerPlan {
        root: dir.join("root"),
        dir,
        args,
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_host::cgroup::Limits;

    fn cfg() -> VmmConfig {
        VmmConfig {
            vm_id: "0123456789abcdef".into(),
            vcpu: 2,
            memory_mib: 1024,
            kernel: "/var/lib/wick/vms/0123456789abcdef/boot/vmlinux".into(),
            initrd: Some("/var/lib/wick/vms/0123456789abcdef/boot/initrd.img".into()),
            boot_args: "console=ttyS0".into(),
            root_disk: "/var/lib/wick/vms/0123456789abcdef/rootfs.ext4".into(),
            extra_disks: vec!["/var/lib/wick/vms/0123456789abcdef/work.ext4".into()],
            guest_cid: 3,
            tap: Some("wk-0123456789ab".into()),
            guest_mac: None,
            jail: None,
            require_kvm: false,
        }
    }

    fn jail(version: u8) -> Jail {
        Jail {
            uid: 1_900_000_007,
            gid: 1_900_000_007,
            groups: Vec::new(),
            cgroup: "wick/vm-0123456789ab".into(),
            cgroup_procs: Vec::new(),
            limits: Limits::for_vm(2, 1024, 512, 1024),
            cgroup_version: version,
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn golden_jailer_command_line_v1() {
        let vm_dir = Path::new("/var/lib/wick/vms/0123456789abcdef");
        let p = plan(
            Path::new("/usr/local/bin/firecracker"),
            vm_dir,
            &cfg(),
            &jail(1),
        );
        assert_eq!(
            joined(&p.args),
            "--id vm-0123456789ab --exec-file /usr/local/bin/firecracker \
             --uid 1900000007 --gid 1900000007 --chroot-base-dir /var/lib/wick/jail \
             --cgroup-version 1 --parent-cgroup wick \
             --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=200000 \
             --cgroup memory.limit_in_bytes=1610612736 --cgroup pids.max=1024 \
             -- --api-sock /fc.sock"
        );
    }

    #[test]
    fn golden_jailer_cgroup_v2() {
        let vm_dir = Path::new("/var/lib/wick/vms/0123456789abcdef");
        let p = plan(Path::new("/fc"), vm_dir, &cfg(), &jail(2));
        let a = joined(&p.args);
        assert!(
            a.contains(
                "--cgroup-version 2 --parent-cgroup wick --cgroup cpu.max=200000 100000 \
                 --cgroup memory.max=1610612736 --cgroup pids.max=1024"
            ),
            "{a}"
        );
    }

    #[test]
    fn golden_chroot_layout() {
        let vm_dir = Path::new("/var/lib/wick/vms/0123456789abcdef");
        let p = plan(Path::new("/bin/firecracker"), vm_dir, &cfg(), &jail(1));
        assert_eq!(
            p.dir,
            Path::new("/var/lib/wick/jail/firecracker/vm-0123456789ab")
        );
        assert_eq!(
            p.root,
            Path::new("/var/lib/wick/jail/firecracker/vm-0123456789ab/root")
        );
        let files: Vec<(String, String)> = p
            .files
            .iter()
            .map(|f| (f.src.display().to_string(), f.name.clone()))
            .collect();
        let d = "/var/lib/wick/vms/0123456789abcdef";
        assert_eq!(
            files,
            vec![
                (format!("{d}/boot/vmlinux"), "vmlinux".to_string()),
                (format!("{d}/boot/initrd.img"), "initrd".to_string()),
                (format!("{d}/rootfs.ext4"), "rootfs".to_string()),
                (format!("{d}/work.ext4"), "disk1".to_string()),
            ]
        );
        assert_eq!(in_jail("fc.sock"), Path::new("/fc.sock"));
        // The host-side API socket stays well under the 108-byte limit with the system layout.
        assert!(p.root.join("vsock.sock").as_os_str().len() < 100);
    }

    #[test]
    fn jail_ids_are_sanitized() {
        assert_eq!(jail_id(Path::new("/s/vms/ab.c/")), "vm-abc");
        assert_eq!(
            jail_dir(
                Path::new("/s/vms/0123456789abcdefff"),
                Path::new("/b/firecracker-v1")
            ),
            Path::new("/s/jail/firecracker-v1/vm-0123456789ab")
        );
    }
}
