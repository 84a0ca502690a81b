//! The XFS pool for real (root, loop devices, xfsprogs): made on first use, VM disks that are
//! reflink clones, re-mounted after its mount went away behind wick's back (the reboot case),
//! grown before it fills, swept and released without leaving a mount, a loop device or a file.

mod common;

use std::path::{Path, PathBuf};

use common::{missing, run, same_content, sparse_image};
use wick_storage::xfs_pool::Sizing;
use wick_storage::{CowBackend, DiskPlan, XfsPool};

const MIB: u64 = 1 << 20;

/// A state dir whose pool is released (unmounted, loops detached by backing file) on drop.
struct PoolDir {
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl PoolDir {
    fn new() -> Option<PoolDir> {
        if let Some(why) = missing(&["mkfs.xfs", "xfs_growfs", "losetup", "mount"]) {
            wick_testkit::skip(why);
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = std::fs::canonicalize(dir.path()).unwrap().join("state");
        std::fs::create_dir_all(&state).unwrap();
        Some(PoolDir { _dir: dir, state })
    }

    fn pool(&self, sizing: Sizing) -> XfsPool {
        XfsPool::system(&self.state).with_sizing(sizing)
    }
}

impl Drop for PoolDir {
    fn drop(&mut self) {
        if let Err(e) = XfsPool::system(&self.state).release_pool() {
            eprintln!("cleanup of the test pool failed: {e}");
        }
    }
}

fn small() -> Sizing {
    Sizing {
        initial: 1024 * MIB,
        min_free: 64 * MIB,
        host_margin: 1024 * MIB,
    }
}

/// Free bytes of the filesystem holding `p`, counting what only root may use.
fn fs_free(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_free() as u64 * st.fragment_size() as u64
}

fn id(n: u32) -> String {
    format!("{n:032x}")
}

#[test]
fn pool_lifecycle_clones_remount_and_release() {
    let Some(d) = PoolDir::new() else { return };
    let image = d.state.join("rootfs.ext4");
    sparse_image(&image, 512, 128);
    let pool = d.pool(small());
    assert!(!pool.status().unwrap().exists, "nothing before first use");

    let plan = pool
        .plan(&id(1), &d.state.join("vms").join(id(1)), &image)
        .unwrap();
    let DiskPlan::XfsPool { base, file, .. } = plan.clone() else {
        panic!("{plan:?}")
    };
    let disk = pool.create(&plan).unwrap();
    assert_eq!(disk.path, file);
    let st = pool.status().unwrap();
    assert!(st.exists && st.mounted, "{st:?}");
    assert_eq!(st.loops.len(), 1, "one loop device: {st:?}");
    assert!(base.is_file(), "the image was copied into the pool once");
    assert!(same_content(&image, &file));

    // A second VM: a reflink clone of the same copy costs (almost) nothing.
    let before = fs_free(&pool.mount_point());
    let plan2 = pool.plan(&id(2), &d.state, &image).unwrap();
    let disk2 = pool.create(&plan2).unwrap();
    let used = before.saturating_sub(fs_free(&pool.mount_point()));
    println!("second VM disk allocated {} KiB in the pool", used / 1024);
    assert!(used < 16 * MIB, "a clone allocated {used} bytes");
    assert!(same_content(&image, &disk2.path));
    // Writing one clone leaves the image copy and the other clone alone.
    std::fs::write(&disk2.path, b"changed").unwrap();
    assert!(same_content(&image, &base) && same_content(&image, &file));
    assert!(pool.create(&plan2).is_err(), "never overwrites");

    // The mount disappears behind wick's back (a reboot, an admin's umount): activate mounts
    // the pool again and the disks are all there. (`mount -o loop` made an autoclear loop
    // device, which the kernel detaches after the unmount, asynchronously.)
    run("umount", &[pool.mount_point().to_str().unwrap()]);
    let st = pool.status().unwrap();
    assert!(!st.mounted && st.loops.len() <= 1, "{st:?}");
    assert_eq!(pool.activate(&plan).unwrap().path, file);
    let st = pool.status().unwrap();
    assert!(st.mounted && !st.loops.is_empty(), "{st:?}");
    assert!(same_content(&image, &file));

    // Release of one disk is idempotent; the sweep removes disks no plan names.
    pool.release(&plan2).unwrap();
    pool.release(&plan2).unwrap();
    assert!(!disk2.path.exists());
    std::fs::write(pool.mount_point().join("vms/stray.ext4"), b"x").unwrap();
    let swept = pool.sweep(std::slice::from_ref(&plan)).unwrap();
    assert_eq!(swept.len(), 1, "{swept:?}");
    assert!(
        file.exists() && base.exists(),
        "known disk and current image copy kept"
    );

    // A replaced image gets a new copy; the stale one goes once no plan uses it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    sparse_image(&image, 512, 8);
    let plan3 = pool.plan(&id(3), &d.state, &image).unwrap();
    let DiskPlan::XfsPool { base: base3, .. } = plan3.clone() else {
        panic!()
    };
    assert_ne!(base3, base, "a changed image is not reused stale");
    pool.create(&plan3).unwrap();
    pool.release(&plan).unwrap();
    let swept = pool.sweep(std::slice::from_ref(&plan3)).unwrap();
    assert!(!base.exists() && base3.exists(), "{swept:?}");

    // The whole pool: released idempotently, nothing left.
    pool.release(&plan3).unwrap();
    let done = pool.release_pool().unwrap();
    assert!(done.iter().any(|l| l.contains("mount")), "{done:?}");
    let st = pool.status().unwrap();
    assert!(!st.exists && !st.mounted && st.loops.is_empty(), "{st:?}");
    assert!(!pool.file().exists() && !pool.mount_point().exists());
    assert!(pool.release_pool().unwrap().is_empty());
    // With no pool, releasing a disk in it is a no-op.
    pool.release(&plan3).unwrap();
}

#[test]
fn pool_grows_before_it_fills() {
    let Some(d) = PoolDir::new() else { return };
    let image = d.state.join("rootfs.ext4");
    sparse_image(&image, 1024, 400);
    // 600 MiB pool, 256 MiB kept free: a 400 MiB image copy needs the pool to grow first.
    let pool = d.pool(Sizing {
        initial: 600 * MIB,
        min_free: 256 * MIB,
        host_margin: 1024 * MIB,
    });
    let plan = pool.plan(&id(1), &d.state, &image).unwrap();
    pool.create(&plan).unwrap();
    let st = pool.status().unwrap();
    let (total, free) = st.space.unwrap();
    println!(
        "pool grew to {} MiB file, {} MiB fs, {} MiB free",
        st.size / MIB,
        total / MIB,
        free / MIB
    );
    assert!(st.size > 600 * MIB, "file grew: {st:?}");
    assert!(total > 600 * MIB, "XFS grew: {st:?}");
    assert!(free >= 200 * MIB, "{st:?}");
    assert!(same_content(&image, &plan.disk_path()));

    // A host that cannot back more: a clear error naming the host's free space, no disk, and
    // the pool (and the disk in it) unharmed.
    let full = d.pool(Sizing {
        initial: 600 * MIB,
        min_free: 64 << 30,
        host_margin: u64::MAX / 4,
    });
    sparse_image(&image, 1024, 600); // a new image copy, bigger than the pool's free space
    let plan2 = full.plan(&id(2), &d.state, &image).unwrap();
    let e = full.create(&plan2).unwrap_err().to_string();
    assert!(e.contains("the host filesystem holding it has only"), "{e}");
    assert!(!plan2.disk_path().exists());
    let st = full.status().unwrap();
    assert!(st.mounted && st.space.unwrap().0 == total, "{st:?}");
    assert!(plan.disk_path().is_file());
}
