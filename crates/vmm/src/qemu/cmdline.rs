//! The command lines of QEMU (`-M microvm`, virtio-mmio devices like Firecracker's) and of its
//! agent-channel sidecar (`wickd vsock-mux`). Pure functions of the handle and the VM config, so
//! they are tested as goldens.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use wick_model::VmmHandle;

use super::Engine;
use crate::VmmConfig;

/// A value inside a QEMU `key=value,…` option: commas are doubled.
fn opt_value(v: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(v.len());
    for b in v.as_bytes() {
        out.push(*b);
        if *b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` + escaped `path` + `suffix`, as one argument.
pub(crate) fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(opt_value(path.as_os_str()));
    s.push(suffix);
    s
}

/// The `-qmp` argument for `socket`. It is a whole argument on QEMU's command line, so the
/// driver finds QEMU by scanning `/proc` for exactly this string.
pub(crate) fn qmp_arg(socket: &Path) -> OsString {
    opt("unix:", socket, ",server=on,wait=off")
}

/// Marker written to the log before each start; console failures are only looked for after the
/// last one.
pub(crate) const START_MARKER: &str = "=== wick: starting qemu";

/// QEMU's seccomp sandbox for a confined VMM. QEMU 10 kills itself (SIGSYS) when
/// `elevateprivileges=deny` meets `-run-with user=` (the filter is installed before the uid
/// change), so a confined QEMU never starts as root: it drops privileges before `exec` and gets
/// its TAP as an inherited descriptor.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's arguments (without the binary). The machine starts paused (`-S`); `boot` resumes it
/// over QMP. `agent_socket` is the Unix socket QEMU serves the agent's virtio-serial port on
/// (the sidecar connects to it). `tap_fd`: the TAP as an
/// inherited descriptor (confined QEMU), else QEMU opens `cfg.tap` by name. A confined VM
/// (`cfg.jail`) also gets QEMU's seccomp [`SANDBOX`].
pub(crate) fn qemu_args(
    handle: &VmmHandle,
    cfg: &VmmConfig,
    engine: Engine,
    agent_socket: &Path,
    tap_fd: Option<i32>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mem = cfg.memory_mib;
    push_all(&mut a, &[&"-M", &"microvm,memory-backend=mem"]);
    match engine {
        Engine::Kvm => push_all(&mut a, &[&"-accel", &"kvm", &"-cpu", &"host"]),
        Engine::Tcg => push_all(&mut a, &[&"-accel", &"tcg", &"-cpu", &"max"]),
    }
    push_all(
        &mut a,
        &[
            &"-smp",
            &cfg.vcpu.to_string(),
            &"-m",
            &mem.to_string(),
            &"-object",
            // Private anonymous RAM: migrates (snapshots), and a restore may swap in another
            // backend with the same id (e.g. a file mapped privately for forks).
            &format!("memory-backend-ram,id=mem,size={mem}M"),
            &"-nodefaults",
            &"-no-user-config",
            &"-display",
            &"none",
            &"-no-reboot",
            &"-S",
        ],
    );
    if cfg.jail.is_some() {
        push_all(&mut a, &[&"-sandbox", &SANDBOX]);
    }
    push_all(
        &mut a,
        &[
            // The serial console goes to the VMM log, after QEMU's own stderr lines.
            &"-chardev",
            &opt("file,id=con,append=on,path=", &handle.log_path, ""),
            &"-serial",
            &"chardev:con",
            &"-kernel",
            &cfg.kernel,
        ],
    );
    if let Some(initrd) = &cfg.initrd {
        push_all(&mut a, &[&"-initrd", initrd]);
    }
    push_all(&mut a, &[&"-append", &append_line(cfg, engine)]);
    push_devices(&mut a, cfg, tap_fd);
    push_all(
        &mut a,
        &[
            // The agent channel: a virtio-serial port (migratable, unlike vhost-user vsock)
            // whose host end is a Unix socket the sidecar connects to.
            &"-chardev",
            &opt("socket,id=agent,server=on,wait=off,path=", agent_socket, ""),
            &"-device",
            &"virtio-serial-device,max_ports=2",
            &"-device",
            &format!(
                "virtserialport,chardev=agent,nr=1,name={}",
                wick_agent_proto::mux::PORT_NAME
            ),
            &"-qmp",
            &qmp_arg(&handle.api_socket),
        ],
    );
    a
}

/// Appends `items` to the argument list `a`.
fn push_all(a: &mut Vec<OsString>, items: &[&dyn AsRef<OsStr>]) {
    for i in items {
        a.push(i.as_ref().to_owned());
    }
}

/// The kernel command line: the VM's boot arguments, plus the TSC rate under TCG.
fn append_line(cfg: &VmmConfig, engine: Engine) -> String {
    let mut append = cfg.boot_args.clone();
    if engine == Engine::Tcg && !append.contains("tsc_early_khz=") {
        // Under TCG the guest's TSC runs at the host's rate, but with no calibration source on
        // microvm a loaded host makes the guest hang at "Marking TSC unstable" (measured: 2 of
        // 3 boots on a busy 2-core host). Telling the kernel the rate fixes it.
        if let Some(khz) = host_cpu_khz() {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    append
}

/// The disks (root first, then `disk1`, `disk2`, …) and the NIC, as virtio-mmio devices.
fn push_devices(a: &mut Vec<OsString>, cfg: &VmmConfig, tap_fd: Option<i32>) {
    let disks = std::iter::once(("root".to_string(), &cfg.root_disk)).chain(
        cfg.extra_disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disk{}", i + 1), d)),
    );
    for (id, disk) in disks {
        push_all(
            a,
            &[
                &"-drive",
                &opt(&format!("id={id},format=raw,if=none,file="), disk, ""),
                &"-device",
                &format!("virtio-blk-device,drive={id}"),
            ],
        );
    }
    if let Some(tap) = &cfg.tap {
        let mut dev = "virtio-net-device,netdev=n0".to_string();
        if let Some(mac) = &cfg.guest_mac {
            dev.push_str(",mac=");
            dev.push_str(mac);
        }
        let netdev = match tap_fd {
            Some(fd) => OsString::from(format!("tap,id=n0,fd={fd}")),
            None => opt(
                "tap,id=n0,script=no,downscript=no,ifname=",
                Path::new(tap),
                "",
            ),
        };
        push_all(a, &[&"-netdev", &netdev, &"-device", &dev]);
    }
}

/// The sidecar's arguments (after its binary): it connects to QEMU's agent socket
/// `agent_socket` and serves the hybrid vsock UDS `uds` (Firecracker's `CONNECT <port>`
/// protocol). `agent_socket` is a whole argument, so the sidecar is found by scanning `/proc`
/// for it.
pub(crate) fn sidecar_args(agent_socket: &Path, uds: &Path) -> Vec<OsString> {
    vec![
        super::mux::SUBCOMMAND.into(),
        "--chardev".into(),
        agent_socket.into(),
        "--uds".into(),
        uds.into(),
    ]
}

/// The host CPU's nominal rate in kHz (`cpu MHz` of /proc/cpuinfo).
fn host_cpu_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn handle() -> VmmHandle {
        VmmHandle {
            driver: "qemu".into(),
            api_socket: "/s/vms/ab/qmp.sock".into(),
            vsock_socket: "/s/vms/ab/vsock.sock".into(),
            log_path: "/s/vms/ab/vmm.log".into(),
            pid: None,
            start_time: None,
            sidecars: Vec::new(),
        }
    }

    fn config() -> VmmConfig {
        VmmConfig {
            vm_id: "ab".into(),
            vcpu: 2,
            memory_mib: 1024,
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            boot_args: "console=ttyS0 reboot=k panic=-1 root=/dev/vda".into(),
            root_disk: "/s/vms/ab/root,1.ext4".into(),
            extra_disks: vec![PathBuf::from("/s/vms/ab/work.ext4")],
            guest_cid: 7,
            tap: Some("wk-ab".into()),
            guest_mac: Some("06:00:ac:1e:00:02".into()),
            jail: None,
            require_kvm: false,
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn golden_full_tcg() {
        // A given tsc_early_khz is kept (the host's rate is only added when absent).
        let mut cfg = config();
        cfg.boot_args.push_str(" tsc_early_khz=1000");
        let args = qemu_args(
            &handle(),
            &cfg,
            Engine::Tcg,
            Path::new("/s/vms/ab/agent.sock"),
            None,
        );
        assert_eq!(
            joined(&args),
            "-M microvm,memory-backend=mem -accel tcg -cpu max -smp 2 -m 1024 \
             -object memory-backend-ram,id=mem,size=1024M \
             -nodefaults -no-user-config -display none -no-reboot -S \
             -chardev file,id=con,append=on,path=/s/vms/ab/vmm.log -serial chardev:con \
             -kernel /k/vmlinuz -initrd /k/initrd.img \
             -append console=ttyS0 reboot=k panic=-1 root=/dev/vda tsc_early_khz=1000 \
             -drive id=root,format=raw,if=none,file=/s/vms/ab/root,,1.ext4 \
             -device virtio-blk-device,drive=root \
             -drive id=disk1,format=raw,if=none,file=/s/vms/ab/work.ext4 \
             -device virtio-blk-device,drive=disk1 \
             -netdev tap,id=n0,script=no,downscript=no,ifname=wk-ab \
             -device virtio-net-device,netdev=n0,mac=06:00:ac:1e:00:02 \
             -chardev socket,id=agent,server=on,wait=off,path=/s/vms/ab/agent.sock \
             -device virtio-serial-device,max_ports=2 \
             -device virtserialport,chardev=agent,nr=1,name=wick.agent \
             -qmp unix:/s/vms/ab/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn tcg_gets_the_host_tsc_rate() {
        let args = qemu_args(&handle(), &config(), Engine::Tcg, Path::new("/v"), None);
        let append = joined(&args);
        match host_cpu_khz() {
            Some(khz) => assert!(append.contains(&format!("tsc_early_khz={khz}")), "{append}"),
            None => assert!(!append.contains("tsc_early_khz"), "{append}"),
        }
        let kvm = joined(&qemu_args(
            &handle(),
            &config(),
            Engine::Kvm,
            Path::new("/v"),
            None,
        ));
        assert!(
            !kvm.contains("tsc_early_khz"),
            "KVM keeps the kernel's calibration"
        );
    }

    #[test]
    fn golden_minimal_kvm() {
        let mut cfg = config();
        cfg.initrd = None;
        cfg.extra_disks.clear();
        cfg.tap = None;
        cfg.vcpu = 1;
        cfg.memory_mib = 256;
        let args = qemu_args(&handle(), &cfg, Engine::Kvm, Path::new("/v.sock"), None);
        assert_eq!(
            joined(&args),
            "-M microvm,memory-backend=mem -accel kvm -cpu host -smp 1 -m 256 \
             -object memory-backend-ram,id=mem,size=256M \
             -nodefaults -no-user-config -display none -no-reboot -S \
             -chardev file,id=con,append=on,path=/s/vms/ab/vmm.log -serial chardev:con \
             -kernel /k/vmlinuz -append console=ttyS0 reboot=k panic=-1 root=/dev/vda \
             -drive id=root,format=raw,if=none,file=/s/vms/ab/root,,1.ext4 \
             -device virtio-blk-device,drive=root \
             -chardev socket,id=agent,server=on,wait=off,path=/v.sock \
             -device virtio-serial-device,max_ports=2 \
             -device virtserialport,chardev=agent,nr=1,name=wick.agent \
             -qmp unix:/s/vms/ab/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn the_qmp_argument_is_whole_and_findable() {
        let h = handle();
        let args = qemu_args(&h, &config(), Engine::Tcg, Path::new("/v"), None);
        assert!(args.contains(&qmp_arg(&h.api_socket)));
        assert_eq!(
            qmp_arg(Path::new("/a,b/qmp.sock")),
            OsString::from("unix:/a,,b/qmp.sock,server=on,wait=off")
        );
    }

    #[test]
    fn golden_confined_has_the_sandbox_and_an_inherited_tap() {
        let mut cfg = config();
        cfg.extra_disks.clear();
        cfg.jail = Some(crate::Jail {
            uid: 1_900_000_000,
            gid: 1_900_000_000,
            groups: Vec::new(),
            cgroup: "wick/vm-ab".into(),
            cgroup_procs: Vec::new(),
            limits: wick_host::cgroup::Limits::for_vm(2, 1024, 512, 512),
            cgroup_version: 1,
        });
        let args = qemu_args(&handle(), &cfg, Engine::Kvm, Path::new("/v.sock"), Some(5));
        assert_eq!(
            joined(&args),
            "-M microvm,memory-backend=mem -accel kvm -cpu host -smp 2 -m 1024 \
             -object memory-backend-ram,id=mem,size=1024M \
             -nodefaults -no-user-config -display none -no-reboot -S \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -chardev file,id=con,append=on,path=/s/vms/ab/vmm.log -serial chardev:con \
             -kernel /k/vmlinuz -initrd /k/initrd.img \
             -append console=ttyS0 reboot=k panic=-1 root=/dev/vda \
             -drive id=root,format=raw,if=none,file=/s/vms/ab/root,,1.ext4 \
             -device virtio-blk-device,drive=root \
             -netdev tap,id=n0,fd=5 -device virtio-net-device,netdev=n0,mac=06:00:ac:1e:00:02 \
             -chardev socket,id=agent,server=on,wait=off,path=/v.sock \
             -device virtio-serial-device,max_ports=2 \
             -device virtserialport,chardev=agent,nr=1,name=wick.agent \
             -qmp unix:/s/vms/ab/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn golden_sidecar() {
        let args = sidecar_args(Path::new("/d/agent.sock"), Path::new("/d/vsock.sock"));
        assert_eq!(
            joined(&args),
            "vsock-mux --chardev /d/agent.sock --uds /d/vsock.sock"
        );
    }
}
