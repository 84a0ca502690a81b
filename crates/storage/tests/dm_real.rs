//! dm-snapshot for real. Runs only where the kernel has device-mapper (`/dev/mapper/control`)
//! and we are root; elsewhere it prints why it was skipped. The call order and tables are covered
//! by the golden tests in `src/dm.rs`.

mod common;

use std::sync::Arc;

use wick_storage::{CowBackend, DmSnapshotBackend, SystemRunner};

#[test]
fn dm_snapshot_for_real() {
    if !std::path::Path::new("/dev/mapper/control").exists() {
        wick_testkit::skip(format_args!(
            "/dev/mapper/control does not exist (no device-mapper in this kernel)"
        ));
        return;
    }
    if let Some(why) = common::missing(&["dmsetup", "losetup", "mkfs.ext4"]) {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let image = state.join("rootfs.ext4");
    common::sparse_image(&image, 64, 8);
    let before = std::fs::read(&image).unwrap();
    let id = format!("{:032x}", std::process::id() as u128 * 0x1000_0001);
    let b = DmSnapshotBackend::new(Arc::new(SystemRunner::new()), state);
    let plan = b.plan(&id, &state.join("vm"), &image).unwrap();
    let disk = b.create(&plan).unwrap();
    assert_eq!(disk.path, plan.disk_path());
    // Write through the snapshot: the origin must not change.
    std::fs::write(&disk.path, vec![0xabu8; 1 << 20]).unwrap();
    let through = std::fs::read(&disk.path).unwrap();
    assert_eq!(&through[..1 << 20], &vec![0xabu8; 1 << 20][..]);
    assert_eq!(std::fs::read(&image).unwrap(), before, "origin untouched");
    // Activate is a no-op on a live disk, and release is idempotent.
    assert_eq!(b.activate(&plan).unwrap().path, disk.path);
    b.release(&plan).unwrap();
    b.release(&plan).unwrap();
    assert!(!disk.path.exists());
    let loops = common::run("losetup", &["--associated", image.to_str().unwrap()]);
    assert!(loops.trim().is_empty(), "origin loop detached: {loops}");
}
