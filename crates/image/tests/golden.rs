//! The golden image, built for real from Debian packages with debootstrap (~1 minute; skipped
//! with a reason when root, debootstrap or the Debian mirror is unavailable). Publishes the build
//! to the shared test cache for other tests.

mod common;

use common::*;
use wick_image::{testcache, ImageSource, ImageStore};

#[test]
fn golden_build_from_debian_packages() {
    if let Some(reason) = testcache::golden_unavailable() {
        return skip("golden_build_from_debian_packages", &reason);
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = fake_agent(tmp.path());
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let opts = testcache::test_golden_options(Some(&agent));
    let mut stages = Vec::new();
    let start = std::time::Instant::now();
    let rec = store
        .build_golden(&opts, &mut |s| {
            eprintln!("golden: {s}");
            stages.push(s.to_string())
        })
        .unwrap();
    eprintln!("golden build took {:.1?}", start.elapsed());
    assert!(stages.iter().any(|s| s.starts_with("debootstrap:")));
    assert!(stages.iter().any(|s| s.contains("work-seed")));
    assert!(matches!(&rec.source, ImageSource::Build { suite, .. } if suite == "bookworm"));
    assert!(rec.agent_injected);

    let img = &rec.rootfs;
    assert!(exists(img, "/usr/sbin/sshd"));
    assert!(exists(img, "/usr/bin/git"));
    assert!(exists(img, "/usr/bin/curl"));
    assert!(exists(img, "/usr/sbin/ip") || exists(img, "/bin/ip"));
    // No SSH host keys: each VM makes its own, before sshd starts.
    let keys: Vec<_> = ls(img, "/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    assert!(keys.is_empty(), "host keys left in the image: {keys:?}");
    // sshd never makes keys itself: it waits for the one wick-agent installs.
    let dropin = cat(img, "/etc/systemd/system/ssh.service.d/wick-host-keys.conf");
    assert!(
        dropin.contains("ConditionPathExists=/etc/ssh/ssh_host_ed25519_key")
            && !dropin.contains("ssh-keygen"),
        "{dropin}"
    );
    assert!(exists(
        img,
        "/etc/systemd/system/multi-user.target.wants/ssh.service"
    ));
    assert!(
        cat(img, "/etc/ssh/sshd_config.d/wick.conf").contains("PermitRootLogin prohibit-password")
    );
    assert!(cat(img, "/etc/fstab").contains("/dev/vdb /root ext4"));
    assert_eq!(cat(img, "/etc/machine-id"), "");
    assert!(exists(
        img,
        "/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
    ));
    // The stand-in agent and its enabled unit.
    assert!(cat(img, "/usr/local/bin/wick-agent").contains("fake wick-agent"));
    let unit = cat(img, "/etc/systemd/system/wick-agent.service");
    assert!(unit.contains("root.mount") && unit.contains("Restart=always"));
    assert!(exists(
        img,
        "/etc/systemd/system/multi-user.target.wants/wick-agent.service"
    ));
    // Work-seed: /root's dotfiles.
    let seed = rec.work_seed.as_ref().expect("a work-seed");
    let names = ls(seed, "/");
    assert!(names.iter().any(|n| n == ".bashrc"), "{names:?}");
    assert_eq!(stat(seed, "/").0 & 0o7777, 0o700);

    let cached = testcache::publish(&opts, &rec).unwrap();
    assert!(cached.rootfs.is_file() && cached.work_seed.is_file());
}
