//! Kernel benchmark (`cargo bench -p wick-kernel`): prints the time to import the Debian cloud
//! kernel `.deb` (unpack, vmlinux extraction, module resolution, initramfs), to build the
//! initramfs alone, to extract the vmlinux alone, and to boot to the root filesystem's init under
//! QEMU TCG. Needs the cached package (downloaded on first run) and, for the boot, QEMU and
//! mkfs.ext4; missing pieces are reported, not faked.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use wick_kernel::KernelStore;

fn row(what: &str, d: Duration, note: &str) {
    println!("{what:<44} {:>10.1} ms  {note}", d.as_secs_f64() * 1000.0);
}

fn main() {
    // cargo passes --bench; ignore arguments.
    let deb = match debian_kernel_deb() {
        Ok(d) => d,
        Err(e) => {
            println!("kernel bench skipped: no Debian kernel package: {e}");
            return;
        }
    };
    let (init, probe) = match static_init_binaries() {
        Ok(b) => b,
        Err(e) => {
            println!("kernel bench skipped: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    println!("{:<44} {:>13}", "wick-kernel benchmark", "time");

    let store = KernelStore::new(dir.path().join("kernels"))
        .unwrap()
        .with_init_binary(&init);
    let t = Instant::now();
    let rec = store.import(&deb, "debian-cloud").expect("import");
    row(
        "import .deb (unpack+extract+modules+initrd)",
        t.elapsed(),
        &format!(
            "{} ({} MB deb)",
            rec.version,
            std::fs::metadata(&deb).unwrap().len() >> 20
        ),
    );

    let bz = std::fs::read(rec.bzimage.as_ref().unwrap()).unwrap();
    let t = Instant::now();
    let ex = wick_kernel::extract_vmlinux(&bz).unwrap();
    row(
        "extract vmlinux from bzImage",
        t.elapsed(),
        &format!("{}, {} MB ELF", ex.compression, ex.vmlinux.len() >> 20),
    );

    let index = wick_kernel::ModuleIndex::load(rec.modules_dir.as_ref().unwrap()).unwrap();
    let t = Instant::now();
    let res = index.resolve(wick_kernel::REQUIRED_DRIVERS).unwrap();
    row(
        "resolve module load order (.modinfo)",
        t.elapsed(),
        &format!("{} modules", res.load_order.len()),
    );
    let paths: Vec<_> = res.load_order.iter().map(|m| m.path.clone()).collect();
    let out = dir.path().join("initrd.img");
    let t = Instant::now();
    let info = wick_kernel::initramfs::build(&init, &paths, &out).unwrap();
    row(
        "build initramfs",
        t.elapsed(),
        &format!("{} KiB gzip", info.size >> 10),
    );

    if which("qemu-system-x86_64").is_none() {
        println!("boot skipped: qemu-system-x86_64 not installed");
        return;
    }
    let rootfs = match probe_rootfs(&probe, dir.path()) {
        Ok(r) => r,
        Err(e) => {
            println!("boot skipped: {e}");
            return;
        }
    };
    for run in 1..=2 {
        let boot = qemu_boot(
            rec.bzimage.as_ref().unwrap(),
            rec.initrd.as_deref(),
            &rootfs,
            "rw quiet",
            MARKER,
            Duration::from_secs(90),
        )
        .unwrap();
        match boot.until_wanted {
            Some(d) => row(
                &format!("QEMU TCG boot to {MARKER} (run {run})"),
                d,
                &format!("powered off by itself: {}", boot.exited_by_itself),
            ),
            None => println!(
                "boot run {run}: no marker within 90 s; console:\n{}",
                boot.console.join("\n")
            ),
        }
    }
}
