//! The work disk for real (no root needed: e2fsprogs work on plain files): empty and seeded,
//! content kept across seeding and growing, size grown, label `work`, shrinking refused.

mod common;

use std::path::Path;
use std::process::Command;

use wick_storage::work_disk;

fn skip() -> Option<String> {
    [
        "mkfs.ext4",
        "resize2fs",
        "e2fsck",
        "tune2fs",
        "debugfs",
        "dumpe2fs",
    ]
    .iter()
    .find(|t| common::which(t).is_none())
    .map(|t| format!("{t} is not installed (e2fsprogs)"))
}

/// (label, filesystem size in bytes) from `dumpe2fs -h`.
fn fs_info(img: &Path) -> (String, u64) {
    let out = common::run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let blocks: u64 = field("Block count:").parse().unwrap();
    let bs: u64 = field("Block size:").parse().unwrap();
    (field("Filesystem volume name:"), blocks * bs)
}

fn cat(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}"), img.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn empty_work_disk() {
    if let Some(why) = skip() {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("work.ext4");
    work_disk::create(&img, 64, None).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    assert_eq!(fs_info(&img), ("work".into(), 64 << 20));
    assert!(common::allocated(&img) < 16 << 20, "sparse");
    assert!(
        work_disk::create(&img, 64, None).is_err(),
        "never overwrites"
    );
    assert!(work_disk::create(&dir.path().join("z"), 0, None).is_err());
}

#[test]
fn seeded_work_disk_keeps_content_and_grows() {
    if let Some(why) = skip() {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join(".config")).unwrap();
    std::fs::write(root.join(".bashrc"), "export WICK=1\n").unwrap();
    std::fs::write(root.join(".config/tool.toml"), "x = 1\n").unwrap();
    let seed = dir.path().join("work-seed.ext4");
    let root_s = root.to_str().unwrap();
    common::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "seed",
            "-d",
            root_s,
            seed.to_str().unwrap(),
            "16M",
        ],
    );

    // Smaller than the seed: refused, nothing left behind.
    let small = dir.path().join("small.ext4");
    let e = work_disk::create(&small, 8, Some(&seed))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 16 MiB"), "{e}");
    assert!(!small.exists());

    let img = dir.path().join("work.ext4");
    work_disk::create(&img, 128, Some(&seed)).unwrap();
    assert_eq!(fs_info(&img), ("work".into(), 128 << 20));
    assert_eq!(cat(&img, "/.bashrc"), "export WICK=1\n");
    assert_eq!(cat(&img, "/.config/tool.toml"), "x = 1\n");
    assert_eq!(cat(&seed, "/.bashrc"), "export WICK=1\n", "seed untouched");
    assert_eq!(fs_info(&seed).0, "seed");

    // Grow (vm set --disk-size): content kept, same size is a no-op, shrinking refused.
    assert!(work_disk::grow(&img, 300).unwrap());
    assert_eq!(fs_info(&img), ("work".into(), 300 << 20));
    assert_eq!(cat(&img, "/.bashrc"), "export WICK=1\n");
    assert!(!work_disk::grow(&img, 300).unwrap());
    let e = work_disk::grow(&img, 200).unwrap_err().to_string();
    assert!(
        e.contains("cannot shrink") && e.contains("at least 300 MiB"),
        "{e}"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 300 << 20);
}

#[test]
fn grow_runs_fsck_when_resize2fs_demands_it() {
    if let Some(why) = skip() {
        wick_testkit::skip(format_args!("{why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("work.ext4");
    work_disk::create(&img, 32, None).unwrap();
    // Make it look mounted since its last check: resize2fs then insists on `e2fsck -f`.
    common::run(
        "debugfs",
        &["-w", "-R", "ssv mtime now", img.to_str().unwrap()],
    );
    common::run(
        "debugfs",
        &["-w", "-R", "ssv lastcheck 20000101", img.to_str().unwrap()],
    );
    let probe = dir.path().join("probe.ext4");
    std::fs::copy(&img, &probe).unwrap();
    let out = Command::new("resize2fs").arg(&probe).output().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && msg.contains("e2fsck -f"), "{msg}");
    assert!(work_disk::grow(&img, 64).unwrap());
    assert_eq!(fs_info(&img).1, 64 << 20);
}
