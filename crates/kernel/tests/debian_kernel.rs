//! Real tests with Debian's cloud kernel: download (cached in `$WICK_TEST_CACHE`), import into a
//! kernel store, check the extracted vmlinux and the wick-init initramfs, and boot it under QEMU
//! TCG with a tiny ext4 root to prove modules load and `switch_root` works. Each test prints why
//! it skips when apt, the network, QEMU or mkfs.ext4 are not available.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use wick_kernel::{initramfs, KernelFormat, KernelRecord, KernelStore};

fn import_debian_kernel(store_dir: &std::path::Path) -> Option<KernelRecord> {
    let deb = match debian_kernel_deb() {
        Ok(d) => d,
        Err(e) => {
            wick_testkit::skip(format_args!(
                "cannot get the Debian cloud kernel package: {e}"
            ));
            return None;
        }
    };
    let (init, _) = static_init_binaries().expect("static wick-init");
    let store = KernelStore::new(store_dir).unwrap().with_init_binary(init);
    Some(
        store
            .import(&deb, "debian-cloud")
            .expect("import the Debian kernel"),
    )
}

#[test]
fn debian_cloud_kernel_imports_with_initramfs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rec) = import_debian_kernel(&dir.path().join("kernels")) else {
        return;
    };
    eprintln!("imported: {rec:#?}");
    assert_eq!(rec.source_format, KernelFormat::Deb);
    assert!(rec.version.ends_with("-cloud-amd64"), "{}", rec.version);
    assert!(
        rec.has_pvh_note,
        "the Debian cloud vmlinux should carry the PVH note"
    );
    assert!(rec.needs_initramfs);
    let vmlinux = std::fs::read(&rec.vmlinux).unwrap();
    let info = wick_kernel::elf::parse(&vmlinux).unwrap();
    assert!(info.segments_in_bounds && info.pvh_entry.is_some());
    assert_eq!(
        wick_kernel::elf::linux_banner_release(&vmlinux).as_deref(),
        Some(rec.version.as_str())
    );
    assert!(rec.bzimage.as_ref().unwrap().is_file());
    assert!(rec
        .modules_dir
        .as_ref()
        .unwrap()
        .join("modules.builtin")
        .is_file());
    assert!(
        rec.builtin_drivers.contains(&"ext4".to_string()),
        "{:?}",
        rec.builtin_drivers
    );
    for m in [
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "virtio_console",
    ] {
        assert!(
            rec.initrd_modules.contains(&m.to_string()),
            "{m} not in {:?}",
            rec.initrd_modules
        );
    }
    let pos = |n: &str| {
        rec.initrd_modules
            .iter()
            .position(|m| m == n)
            .unwrap_or(usize::MAX)
    };
    assert!(pos("virtio") < pos("virtio_blk") && pos("virtio_ring") < pos("virtio_mmio"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    assert!(pos("virtio_ring") < pos("virtio_console"));

    // The initrd reads back: a static /init, every module, the list in the same order.
    let gz = std::fs::read(rec.initrd.as_ref().unwrap()).unwrap();
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .unwrap();
    let entries = initramfs::read_cpio(&cpio).unwrap();
    let init = entries.iter().find(|e| e.name == "init").expect("/init");
    assert!(!wick_kernel::elf::parse(&init.data).unwrap().has_interp);
    let list = entries
        .iter()
        .find(|e| e.name == "etc/wick-init/modules")
        .unwrap();
    let listed: Vec<String> = String::from_utf8_lossy(&list.data)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches("/lib/modules/")
                .trim_end_matches(".ko")
                .to_string()
        })
        .collect();
    assert_eq!(listed, rec.initrd_modules);
    for m in &rec.initrd_modules {
        let e = entries
            .iter()
            .find(|e| e.name == format!("lib/modules/{m}.ko"))
            .unwrap_or_else(|| panic!("{m}.ko missing"));
        assert!(
            e.data.starts_with(b"\x7fELF"),
            "{m} is not a plain ELF module"
        );
    }
    // Re-reading the store gives the same record.
    let store = KernelStore::new(dir.path().join("kernels")).unwrap();
    assert_eq!(store.get("debian-cloud").unwrap(), rec);
}

/// An initramfs built by an older wick (no record of its inputs, or another wick-init) is
/// rebuilt once by `refresh_initramfs`; an up-to-date one is left alone.
#[test]
fn out_of_date_initramfs_is_rebuilt_once() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("kernels");
    let Some(rec) = import_debian_kernel(&store_dir) else {
        return;
    };
    let (init, other_static) = static_init_binaries().expect("static wick-init");
    let store = KernelStore::new(&store_dir)
        .unwrap()
        .with_init_binary(&init);
    assert!(
        store.refresh_initramfs().unwrap().is_empty(),
        "fresh import"
    );

    // A manifest as an older wick wrote it: no `initrd_inputs`.
    let manifest = rec.dir().join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("initrd_inputs");
    std::fs::write(&manifest, serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(
        store.refresh_initramfs().unwrap(),
        [Ok("debian-cloud".to_string())]
    );
    assert!(
        store.refresh_initramfs().unwrap().is_empty(),
        "rebuilt only once"
    );
    assert_eq!(
        store.get("debian-cloud").unwrap().initrd_modules,
        rec.initrd_modules
    );

    // Another wick-init (here: any other static binary) means a new /init.
    let store = KernelStore::new(&store_dir)
        .unwrap()
        .with_init_binary(&other_static);
    assert_eq!(
        store.refresh_initramfs().unwrap(),
        [Ok("debian-cloud".to_string())]
    );
    let gz = std::fs::read(rec.initrd.as_ref().unwrap()).unwrap();
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .unwrap();
    let entries = initramfs::read_cpio(&cpio).unwrap();
    let new_init = entries.iter().find(|e| e.name == "init").unwrap();
    assert_eq!(new_init.data, std::fs::read(&other_static).unwrap());
}

#[test]
fn debian_cloud_kernel_boots_through_wick_init_under_qemu_tcg() {
    if which("qemu-system-x86_64").is_none() {
        wick_testkit::skip(format_args!("qemu-system-x86_64 is not installed (apt-get install -t bookworm-backports qemu-system-x86)"));
        return;
    }
    if which("mkfs.ext4").is_none() && !std::path::Path::new("/usr/sbin/mkfs.ext4").exists() {
        wick_testkit::skip(format_args!(
            "mkfs.ext4 is not installed (apt-get install e2fsprogs)"
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(rec) = import_debian_kernel(&dir.path().join("kernels")) else {
        return;
    };
    let (_, probe) = static_init_binaries().unwrap();
    let rootfs = probe_rootfs(&probe, dir.path()).unwrap();
    let boot = qemu_boot(
        rec.bzimage.as_ref().unwrap(),
        rec.initrd.as_deref(),
        &rootfs,
        "rw wick.initdebug wick.init=image",
        MARKER,
        Duration::from_secs(90),
    )
    .unwrap();
    let log = boot.console.join("\n");
    for l in boot.console.iter().filter(|l| l.contains("wick-init")) {
        eprintln!("console: {l}");
    }
    assert!(
        boot.until_wanted.is_some(),
        "no {MARKER} on the console:\n{log}"
    );
    eprintln!(
        "{MARKER} after {:?}; qemu exited by itself: {}",
        boot.until_wanted.unwrap(),
        boot.exited_by_itself
    );
    assert!(
        log.contains("wick-init: ") && log.contains("loaded /lib/modules/virtio_blk.ko"),
        "{log}"
    );
    let modules_line = boot
        .console
        .iter()
        .find(|l| l.contains("wick-init-probe: modules:"))
        .expect("probe module line");
    for m in [
        "virtio_blk",
        "virtio_mmio",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "virtio_console",
    ] {
        assert!(modules_line.contains(m), "{m} not loaded: {modules_line}");
    }
    let root_line = boot
        .console
        .iter()
        .find(|l| l.contains("root mount:"))
        .unwrap();
    assert!(root_line.contains("/dev/vda / ext4 rw"), "{root_line}");
    assert!(
        log.contains("initramfs files visible: false"),
        "initramfs not switched away:\n{log}"
    );

    // The failure path: a missing root device makes wick-init say so and stop the machine.
    let boot = qemu_boot(
        rec.bzimage.as_ref().unwrap(),
        rec.initrd.as_deref(),
        &rootfs,
        "root=/dev/vdz wick.rootwait=2",
        "wick-init: boot failed",
        Duration::from_secs(90),
    )
    .unwrap();
    let log = boot.console.join("\n");
    assert!(
        log.contains("root device /dev/vdz did not appear within 2 s"),
        "{log}"
    );
    assert!(
        boot.exited_by_itself,
        "qemu kept running after wick-init gave up:\n{log}"
    );
}
