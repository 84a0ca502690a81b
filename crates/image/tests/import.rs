//! Import of rootfs tarballs (plain, gzip, zstd) and of ext4 files; names, dedup by content,
//! delete. Needs root and e2fsprogs; skips otherwise.

mod common;

use std::process::Command;

use common::*;
use wick_image::{ImageError, ImageSource, ImageStore, ImportOptions};

const TOOLS: &[&str] = &["mkfs.ext4", "debugfs", "e2fsck"];

fn rootfs_tar() -> Vec<u8> {
    tar_layer(&[
        E::Dir("./", 0o755),
        E::Dir("etc/", 0o755),
        E::File("etc/hostname", b"imported\n", 0o644, 0, 0),
        E::Dir("root/", 0o700),
        E::File("root/.profile", b"# profile\n", 0o644, 0, 0),
        E::File("srv/data", b"data\n", 0o640, 33, 33),
        E::Symlink("bin", "usr/bin"),
    ])
}

#[test]
fn import_tarballs_in_every_compression() {
    if let Some(r) = missing_prereq(TOOLS) {
        return skip("import_tarballs_in_every_compression", &r);
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let tar = rootfs_tar();
    let plain = tmp.path().join("rootfs.tar");
    std::fs::write(&plain, &tar).unwrap();
    let gz = tmp.path().join("rootfs.tar.gz");
    std::fs::write(&gz, gzip(&tar)).unwrap();
    let zst = tmp.path().join("rootfs.tar.zst");
    std::fs::write(&zst, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();

    let small = ImportOptions {
        headroom_mib: Some(16),
        ..Default::default()
    };
    for (path, name) in [(&plain, "plain"), (&gz, "gz"), (&zst, "zst")] {
        let rec = store.import_with(path, name, &small, &mut |_| {}).unwrap();
        assert_eq!(rec.name, name);
        assert!(!rec.agent_injected);
        assert!(rec.work_seed.is_none());
        assert!(
            matches!(&rec.source, ImageSource::Import { path: p } if p.ends_with(path.file_name().unwrap()))
        );
        let img = &rec.rootfs;
        assert_eq!(cat(img, "/etc/hostname"), "imported\n");
        let (mode, uid, gid, _) = stat(img, "/srv/data");
        assert_eq!((mode & 0o7777, uid, gid), (0o640, 33, 33));
        assert_eq!(stat(img, "/root").0 & 0o7777, 0o700);
        assert!(debugfs(img, "stat /bin").contains("Fast link dest: \"usr/bin\""));
    }
    let names: Vec<_> = store.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["gz", "plain", "zst"]);

    // With an agent and shrunk to minimum size.
    let agent = fake_agent(tmp.path());
    let rec = store
        .import_with(
            &gz,
            "with-agent",
            &ImportOptions {
                agent_bin: Some(agent),
                shrink: true,
                ..small.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(rec.agent_injected);
    assert!(rec.size < 64 << 20, "shrunk to {} bytes", rec.size);
    assert!(exists(&rec.rootfs, "/usr/local/bin/wick-agent"));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&rec.rootfs)
        .status()
        .unwrap();
    assert!(fsck.success());

    assert!(matches!(
        store.import(&gz, "gz"),
        Err(ImageError::Exists(_))
    ));
    assert!(matches!(
        store.import(&gz, "Bad/Name"),
        Err(ImageError::InvalidName { .. })
    ));
    // A hostile tarball is refused and leaves nothing.
    let evil = tmp.path().join("evil.tar");
    std::fs::write(&evil, tar_layer(&[E::File("../../x", b"x", 0o644, 0, 0)])).unwrap();
    assert!(matches!(
        store.import(&evil, "evil"),
        Err(ImageError::UnsafeEntry { .. })
    ));
    assert!(!dir_names(store.dir())
        .iter()
        .any(|n| n.starts_with(".tmp-")));
}

#[test]
fn import_an_ext4_file_and_share_identical_content() {
    if let Some(r) = missing_prereq(TOOLS) {
        return skip("import_an_ext4_file_and_share_identical_content", &r);
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "from-ext4\n").unwrap();
    let img = tmp.path().join("disk.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("32M")
        .status()
        .unwrap();
    assert!(st.success());
    let seed = tmp.path().join("seed.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&seed)
        .arg("8M")
        .status()
        .unwrap();
    assert!(st.success());

    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let a = store
        .import_with(
            &img,
            "a",
            &ImportOptions {
                work_seed: Some(seed),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(a.size, 32 << 20);
    assert_eq!(cat(&a.rootfs, "/etc/hostname"), "from-ext4\n");
    assert!(a.work_seed.as_ref().unwrap().is_file());
    assert!(!a.agent_injected);
    // The id is the sha256 of the rootfs; the same content under another name shares files.
    let b = store.import(&img, "b").unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(a.rootfs, b.rootfs);
    store.delete("a").unwrap();
    assert!(b.rootfs.is_file(), "still used by b");
    store.delete("b").unwrap();
    assert!(!b.rootfs.exists());

    // Not an ext4 and not a tar.
    let junk = tmp.path().join("junk.bin");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert!(store.import(&junk, "junk").is_err());
    assert_eq!(dir_names(store.dir()), vec![".lock", "index.json"]);
}
