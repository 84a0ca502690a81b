//! Prints the time to make one VM root disk per backend from a 2 GiB sparse image holding
//! ~200 MiB of data: reflink on a loop-mounted XFS, sparse copy on the host filesystem and on XFS,
//! dm-snapshot where the kernel has device-mapper. Run as root: `cargo bench -p wick-storage`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wick_storage::{CowBackend, DmSnapshotBackend, FileBackend, SystemRunner};

const IMAGE_MIB: u64 = 2048;
const DATA_MIB: u64 = 200;
const ROUNDS: usize = 3;

/// Best-of-`ROUNDS` create time (the disk is released between rounds; the image stays cached).
fn time_backend(b: &dyn CowBackend, state: &Path) -> Duration {
    let image = state.join("images/rootfs.ext4");
    if !image.exists() {
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        common::sparse_image(&image, IMAGE_MIB, DATA_MIB);
    }
    let mut best = Duration::MAX;
    for i in 0..ROUNDS {
        let id = format!("{i:032x}");
        let plan = b.plan(&id, &state.join("vms").join(&id), &image).unwrap();
        let t = Instant::now();
        b.create(&plan).unwrap();
        best = best.min(t.elapsed());
        b.release(&plan).unwrap();
    }
    best
}

fn row(backend: &str, fs: &str, d: Option<Duration>, note: &str) {
    let t = d.map_or("-".to_string(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    });
    println!("{backend:<12} {fs:<14} {t:>12}  {note}");
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: skip the slow run there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("clone benchmark: run it with `cargo bench -p wick-storage` (as root)");
        return;
    }
    println!("CoW clone of a {IMAGE_MIB} MiB sparse image with ~{DATA_MIB} MiB of data, best of {ROUNDS}");
    println!(
        "{:<12} {:<14} {:>12}  note",
        "backend", "filesystem", "time"
    );
    let host = tempfile::tempdir().unwrap();
    row(
        "copy",
        "host (tmp)",
        Some(time_backend(&FileBackend::copy(), host.path())),
        "SEEK_DATA/SEEK_HOLE + copy_file_range",
    );
    drop(host);
    match common::missing(&["mkfs.xfs", "losetup", "mount"]) {
        Some(why) => {
            row("reflink", "xfs (loop)", None, &format!("skipped: {why}"));
            row("copy", "xfs (loop)", None, &format!("skipped: {why}"));
        }
        None => {
            let m = common::LoopMount::new("xfs", 4096);
            let state = m.mountpoint.join("state");
            row(
                "reflink",
                "xfs (loop)",
                Some(time_backend(&FileBackend::reflink(), &state)),
                "FICLONE",
            );
            row(
                "copy",
                "xfs (loop)",
                Some(time_backend(&FileBackend::copy(), &state)),
                "copy_file_range shares extents on XFS (kernel remap)",
            );
        }
    }
    if !Path::new("/dev/mapper/control").exists() {
        row(
            "dm-snapshot",
            "-",
            None,
            "skipped: no /dev/mapper/control (no device-mapper in this kernel)",
        );
    } else if let Some(why) = common::missing(&["dmsetup", "losetup"]) {
        row("dm-snapshot", "-", None, &format!("skipped: {why}"));
    } else {
        let host = tempfile::tempdir().unwrap();
        let b = DmSnapshotBackend::new(Arc::new(SystemRunner::new()), host.path());
        row(
            "dm-snapshot",
            "host (tmp)",
            Some(time_backend(&b, host.path())),
            "loops + dmsetup create",
        );
    }
}
