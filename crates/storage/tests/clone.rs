//! Root-disk clones for real: reflink on loop-mounted XFS (and btrfs when mkfs.btrfs exists), the
//! sparse copy on the host filesystem and on XFS, and backend selection. Needs root for the loop
//! mounts; skipped with a printed reason otherwise.

mod common;

use std::path::Path;

use common::{allocated, missing, same_content, sparse_image, LoopMount};
use wick_storage::{
    probe, select, BackendChoice, BackendKind, CowBackend, DiskPlan, FileBackend, StorageError,
};

const ID: &str = "00112233445566778899aabbccddeeff";

/// Reflink-clones an image inside `state`, writes to the clone, checks the image is untouched.
fn reflink_roundtrip(state: &Path) {
    let image = state.join("images/rootfs.ext4");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    sparse_image(&image, 256, 16);
    let p = probe(state, false);
    assert_eq!(p.reflink, Ok(()), "{} should reflink", state.display());
    let b = select(BackendChoice::Auto, state, false).unwrap();
    assert_eq!(b.kind(), BackendKind::Reflink);
    let plan = b.plan(ID, &state.join("vms").join(ID), &image).unwrap();
    assert!(matches!(plan, DiskPlan::Reflink { .. }));
    let disk = b.create(&plan).unwrap();
    assert!(same_content(&image, &disk.path));
    // Writing the clone leaves the image alone.
    std::fs::write(&disk.path, b"changed").unwrap();
    assert!(!same_content(&image, &disk.path));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);
    assert!(b.create(&plan).is_err(), "never overwrites");
    b.release(&plan).unwrap();
    b.release(&plan).unwrap();
    assert!(!disk.path.exists());
    assert!(image.exists());
}

#[test]
fn reflink_on_xfs() {
    if let Some(why) = missing(&["mkfs.xfs", "losetup", "mount"]) {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let m = LoopMount::new("xfs", 512);
    reflink_roundtrip(&m.mountpoint.join("state"));
}

#[test]
fn reflink_on_btrfs() {
    if let Some(why) = missing(&["mkfs.btrfs", "losetup", "mount"]) {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let m = LoopMount::new("btrfs", 512);
    reflink_roundtrip(&m.mountpoint.join("state"));
}

#[test]
fn reflink_refused_clearly() {
    // The host filesystem here is ext4: no reflink.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    if probe(state, false).reflink.is_ok() {
        wick_testkit::skip(format_args!(
            "{} can reflink: no filesystem here to see the refusal on",
            state.display()
        ));
        return;
    }
    let e = select(BackendChoice::Reflink, state, false).err().unwrap();
    assert!(matches!(e, StorageError::Unsupported(_)));
    assert!(e.to_string().contains("cannot reflink"), "{e}");
    let image = state.join("rootfs.ext4");
    sparse_image(&image, 8, 4);
    let b = FileBackend::reflink();
    let plan = b.plan(ID, &state.join("vm"), &image).unwrap();
    let e = b.create(&plan).unwrap_err().to_string();
    assert!(
        e.contains("cannot reflink") && e.contains("storage_backend"),
        "{e}"
    );
    assert!(!state.join("vm/rootfs.ext4").exists(), "nothing left");

    // Across filesystems (image on ext4, VM dir on XFS): a clear EXDEV message.
    if missing(&["mkfs.xfs", "losetup", "mount"]).is_none() {
        let m = LoopMount::new("xfs", 512);
        let plan = b.plan(ID, &m.mountpoint.join("vm"), &image).unwrap();
        let e = b.create(&plan).unwrap_err().to_string();
        assert!(e.contains("different filesystems"), "{e}");
    }
}

fn copy_roundtrip(state: &Path) {
    let image = state.join("rootfs.ext4");
    std::fs::create_dir_all(state).unwrap();
    sparse_image(&image, 256, 16);
    let b = FileBackend::copy();
    let plan = b.plan(ID, &state.join("vm"), &image).unwrap();
    let disk = b.create(&plan).unwrap();
    assert!(same_content(&image, &disk.path));
    let (src, dst) = (allocated(&image), allocated(&disk.path));
    println!(
        "{}: image allocates {src} bytes, copy {dst}",
        state.display()
    );
    assert!(
        dst <= src + (1 << 20),
        "holes kept: copy allocates {dst}, image {src}"
    );
    assert!(dst < 32 << 20, "far less than the 256 MiB apparent size");
    b.release(&plan).unwrap();
    assert!(!disk.path.exists());
}

#[test]
fn copy_on_host_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    copy_roundtrip(dir.path());
}

#[test]
fn copy_on_xfs() {
    if let Some(why) = missing(&["mkfs.xfs", "losetup", "mount"]) {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let m = LoopMount::new("xfs", 512);
    copy_roundtrip(&m.mountpoint.join("state"));
}
