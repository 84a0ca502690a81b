//! Prepare-disks cost per new VM, `copy` vs the XFS pool, side by side in one run: the root
//! disk's create time (p50, p90 over `VMS` VMs made one after another and kept, as a host
//! accumulates VMs) and the bytes each new VM actually allocates. The image is the golden rootfs
//! of the real-guest test cache (`$WICK_TEST_CACHE`, default `/var/cache/wick-test`) when there
//! is one, else a synthesized sparse 1.5 GiB file with ~360 MiB of data. The work disk (the same
//! for both backends, on the state dir) is timed on its own line. Run as root:
//! `cargo bench -p wick-storage --bench disks`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wick_storage::{CowBackend, FileBackend, XfsPool};

const VMS: usize = 9;
const MIB: f64 = (1 << 20) as f64;

/// The newest golden rootfs in the test cache.
fn cached_golden() -> Option<PathBuf> {
    let cache = std::env::var_os("WICK_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/wick-test".into());
    std::fs::read_dir(cache.join("golden"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("rootfs.ext4"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Free bytes (root's view) of the filesystem holding `p`.
fn fs_free(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_free() as u64 * st.fragment_size() as u64
}

struct Run {
    first: Duration,
    times: Vec<Duration>,
    /// Bytes the filesystem lost per VM (true allocation, shared extents counted once).
    fs_per_vm: f64,
    /// `st_blocks` of one VM disk (a reflink clone reports the extents it shares, too).
    st_blocks: u64,
}

fn pct(times: &[Duration], p: f64) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[((t.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Makes `VMS + 1` disks with `b` in `state`: the first on its own (the pool's first use: the
/// pool and the image copy), then `VMS` timed; then releases them all.
fn measure(b: &dyn CowBackend, state: &Path, image: &Path, disks_fs: impl Fn() -> PathBuf) -> Run {
    let plan = |i: usize| {
        let id = format!("{i:032x}");
        b.plan(&id, &state.join("vms").join(&id), image).unwrap()
    };
    let mut plans = vec![plan(0)];
    let t = Instant::now();
    b.create(&plans[0]).unwrap();
    let first = t.elapsed();
    let fs = disks_fs();
    let before = fs_free(&fs);
    let mut times = Vec::new();
    for i in 1..=VMS {
        let p = plan(i);
        let t = Instant::now();
        b.create(&p).unwrap();
        times.push(t.elapsed());
        plans.push(p);
    }
    let used = before.saturating_sub(fs_free(&fs));
    let st_blocks = std::fs::metadata(plans[1].disk_path()).unwrap().blocks() * 512;
    for p in &plans {
        b.release(p).unwrap();
    }
    Run {
        first,
        times,
        fs_per_vm: used as f64 / VMS as f64,
        st_blocks,
    }
}

fn row(name: &str, r: &Run) {
    println!(
        "{name:<10} {:>12} {:>10} {:>10} {:>14.1} {:>16.1}",
        ms(r.first),
        ms(pct(&r.times, 0.5)),
        ms(pct(&r.times, 0.9)),
        r.fs_per_vm / MIB,
        r.st_blocks as f64 / MIB
    );
}

/// Releases the bench's pool (unmount, loops by backing file, file) however the bench ends.
struct PoolGuard(PathBuf);

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Err(e) = XfsPool::system(&self.0).release_pool() {
            eprintln!("releasing the bench pool: {e}");
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("disks benchmark: run it with `cargo bench -p wick-storage --bench disks` (root)");
        return;
    }
    if let Some(why) = common::missing(&["mkfs.xfs", "xfs_growfs", "losetup", "mount"]) {
        println!("disks benchmark skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = std::fs::canonicalize(dir.path()).unwrap();
    let (image, what) = match cached_golden() {
        Some(p) => (p, "golden rootfs from the test cache"),
        None => {
            let p = state.join("rootfs.ext4");
            common::sparse_image(&p, 1536, 360);
            (p, "synthesized sparse image")
        }
    };
    let m = std::fs::metadata(&image).unwrap();
    println!(
        "root disk per new VM: {what} {} ({:.0} MiB, {:.0} MiB allocated); {VMS} VMs after the first",
        image.display(),
        m.len() as f64 / MIB,
        (m.blocks() * 512) as f64 / MIB
    );
    println!(
        "{:<10} {:>12} {:>10} {:>10} {:>14} {:>16}",
        "backend", "first VM", "p50", "p90", "alloc MiB/VM", "st_blocks MiB"
    );
    let copy_state = state.join("copy");
    std::fs::create_dir_all(&copy_state).unwrap();
    let copy = measure(&FileBackend::copy(), &copy_state, &image, || {
        copy_state.clone()
    });
    row("copy", &copy);
    let pool_state = state.join("pool");
    std::fs::create_dir_all(&pool_state).unwrap();
    let _guard = PoolGuard(pool_state.clone());
    let pool = XfsPool::system(&pool_state);
    let mnt = pool.mount_point();
    let xfs = measure(&pool, &pool_state, &image, || mnt.clone());
    row("xfs pool", &xfs);
    println!(
        "(first VM: the pool's first use makes the pool and copies the image in; alloc: bytes the \
         filesystem lost per VM; st_blocks of a reflink clone counts the extents it shares)"
    );
    let mut work = Vec::new();
    for i in 0..5 {
        let p = state.join(format!("work{i}.ext4"));
        let t = Instant::now();
        wick_storage::work_disk::create(&p, 8192, None).unwrap();
        work.push(t.elapsed());
    }
    println!(
        "work disk (8 GiB, mkfs.ext4 on the state dir, both backends): p50 {}",
        ms(pct(&work, 0.5))
    );
}
