use super::*;
use wick_host::cmd::testing::RecordingRunner;

use crate::CowBackend;

#[test]
fn record_and_plan_are_pure() {
    let dir = tempfile::tempdir().unwrap();
    let state = std::fs::canonicalize(dir.path()).unwrap();
    let fake = Arc::new(RecordingRunner::new());
    let pool = XfsPool::new(fake.clone(), &state);
    let rec = pool.record();
    assert_eq!(rec.file, state.join("xfs-pool/pool.xfs"));
    assert_eq!(rec.mount, state.join("xfs-pool/mnt"));
    assert_eq!(
        serde_json::to_string(&rec).unwrap(),
        format!(
            r#"{{"file":"{}","mount":"{}"}}"#,
            rec.file.display(),
            rec.mount.display()
        )
    );
    let img = state.join("rootfs.ext4");
    std::fs::write(&img, b"image").unwrap();
    let id = "0123456789abcdef0123456789abcdef";
    let plan = pool.plan(id, &state.join("vms").join(id), &img).unwrap();
    let key = image_key(&img).unwrap();
    assert_eq!(key.len(), 16);
    assert_eq!(
        plan,
        crate::DiskPlan::XfsPool {
            image: img.clone(),
            base: rec.mount.join(format!("images/{key}.ext4")),
            file: rec.mount.join(format!("vms/{id}.ext4")),
        }
    );
    let j = serde_json::to_string(&plan).unwrap();
    assert!(j.starts_with(r#"{"backend":"xfs-pool","image":"#), "{j}");
    assert!(
        pool.plan("../x", &state, &img).is_err(),
        "ids stay file names"
    );
    assert!(fake.lines().is_empty(), "plan runs nothing");
    assert!(!rec.file.exists() && !state.join("xfs-pool").exists());
    // A rewritten image gets another key.
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(&img, b"image 2").unwrap();
    assert_ne!(image_key(&img).unwrap(), key);
    assert!(XfsPool::is_pool_file(&state, &rec.file));
    assert!(!XfsPool::is_pool_file(&state, &img));
}

/// The commands of a first use, golden: mkfs on a temporary file, then one `mount -o loop`;
/// the loop device is found by its backing file. The fake cannot really mount, so the test
/// stops at the check that what was mounted is ours.
#[test]
fn establish_golden_commands() {
    let dir = tempfile::tempdir().unwrap();
    let state = std::fs::canonicalize(dir.path()).unwrap();
    let fake = Arc::new(RecordingRunner::new());
    let pool = XfsPool::new(fake.clone(), &state).with_sizing(Sizing {
        initial: 1 << 30,
        min_free: 0,
        host_margin: 0,
    });
    assert_eq!(pool.establish(false).unwrap(), None, "no pool, no create");
    assert!(fake.lines().is_empty());
    let e = pool.establish(true).unwrap_err().to_string();
    assert!(e.contains("no loop device backed by"), "{e}");
    let (f, m) = (pool.file(), pool.mount_point());
    assert_eq!(
        fake.lines(),
        vec![
            format!(
                "mkfs.xfs -q -f -m reflink=1 -L wick-pool {}.new",
                f.display()
            ),
            format!(
                "mount -t xfs -o loop,nodev,nosuid,noexec {} {}",
                f.display(),
                m.display()
            ),
        ]
    );
    assert_eq!(
        std::fs::metadata(&f).unwrap().len(),
        1 << 30,
        "sparse file in place"
    );
    // Release (nothing mounted, no loops): removes the file and the dir.
    let done = pool.release_pool().unwrap();
    assert_eq!(done, vec![format!("XFS pool file {}", f.display())]);
    assert!(!state.join("xfs-pool").exists());
    assert!(pool.release_pool().unwrap().is_empty(), "idempotent");
}

#[test]
fn a_full_host_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(RecordingRunner::new());
    let pool = XfsPool::new(fake.clone(), dir.path()).with_sizing(Sizing {
        initial: 1 << 30,
        min_free: 0,
        host_margin: u64::MAX / 2,
    });
    let e = pool.establish(true).unwrap_err().to_string();
    assert!(
        e.contains("cannot create the XFS pool") && e.contains("copy"),
        "{e}"
    );
    assert!(fake.lines().is_empty(), "nothing run");
    assert!(!pool.file().exists());
}

#[test]
fn human_sizes() {
    assert_eq!(human(300 << 20), "300 MiB");
    assert_eq!(human(3 << 29), "1.5 GiB");
}
