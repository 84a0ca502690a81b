//! OCI pull against a real registry on loopback (Debian's docker-registry): layers the test
//! builds and pushes itself, whiteouts, index selection, the layer cache, and refused hostile
//! images that leave nothing behind. Needs root, docker-registry and e2fsprogs; skips otherwise.

mod common;

use common::*;
use wick_image::oci::{pull, PullOptions};
use wick_image::{ImageError, ImageSource, ImageStore};

const TOOLS: &[&str] = &["docker-registry", "mkfs.ext4", "debugfs"];

fn opts(reg: &Registry) -> PullOptions {
    PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        headroom_mib: Some(16),
        ..Default::default()
    }
}

#[test]
fn pull_applies_layers_whiteouts_and_keeps_metadata() {
    if let Some(r) = missing_prereq(TOOLS) {
        return skip("pull_applies_layers_whiteouts_and_keeps_metadata", &r);
    }
    let reg = Registry::start();
    let client = reg.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reference = format!("{}/wick/test:v1", reg.addr);
    let digest = rt.block_on(push(&client, &reference, &test_image_layers(), "amd64"));

    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let agent = fake_agent(tmp.path());
    let mut stages = Vec::new();
    let rec = pull(
        &store,
        &reference,
        "test",
        &PullOptions {
            agent_bin: Some(agent),
            ..opts(&reg)
        },
        &mut |s| stages.push(s.to_string()),
    )
    .unwrap();
    assert!(
        stages.iter().any(|s| s.contains("applying layer 3/3")),
        "{stages:?}"
    );
    assert!(rec.agent_injected);
    let ImageSource::Oci {
        digest: d, layers, ..
    } = &rec.source
    else {
        panic!("{:?}", rec.source)
    };
    assert_eq!(*d, digest);
    assert_eq!(layers.len(), 3);
    assert_eq!(store.get("test").unwrap(), rec);

    let img = &rec.rootfs;
    assert_eq!(cat(img, "/etc/os-release"), "NAME=wick-test\n");
    // Whiteout: removed from the lower layer; the marker itself is not in the image.
    assert!(!exists(img, "/etc/remove-me"));
    assert!(!exists(img, "/etc/.wh.remove-me"));
    assert_eq!(cat(img, "/etc/added"), "added in layer 2\n");
    // Opaque directory: lower content hidden, this layer's content kept, new mode applied.
    assert_eq!(ls(img, "/opt/app"), vec!["new.txt".to_string()]);
    assert_eq!(stat(img, "/opt/app").0 & 0o7777, 0o755);
    // Ownership and modes (setuid included), symlinks and hard links.
    let (mode, uid, gid, _) = stat(img, "/home/owned");
    assert_eq!((mode & 0o7777, uid, gid), (0o600, 1000, 1000));
    assert_eq!(stat(img, "/usr/bin/tool").0 & 0o7777, 0o4755);
    assert!(debugfs(img, "stat /usr/bin/alias").contains("Fast link dest: \"tool\""));
    assert_eq!(
        stat(img, "/usr/bin/tool").3,
        stat(img, "/usr/bin/tool-hard").3
    );
    // wick-agent and its unit.
    assert!(cat(img, "/usr/local/bin/wick-agent").contains("fake wick-agent"));
    assert!(cat(img, "/etc/systemd/system/wick-agent.service").contains("Restart=always"));

    // Layers are cached: a second pull downloads nothing.
    let mut stages = Vec::new();
    let again = pull(&store, &reference, "test-again", &opts(&reg), &mut |s| {
        stages.push(s.to_string())
    })
    .unwrap();
    assert_eq!(
        stages.iter().filter(|s| s.ends_with(": cached")).count(),
        3,
        "{stages:?}"
    );
    assert!(!again.agent_injected);
    assert!(matches!(
        pull(&store, &reference, "test", &opts(&reg), &mut |_| {}),
        Err(ImageError::Exists(_))
    ));

    // Deleting both and pruning empties the store and the layer cache.
    store.delete("test").unwrap();
    store.delete("test-again").unwrap();
    let report = store.prune().unwrap();
    assert_eq!(report.removed.len(), 3, "{report:?}");
    assert!(dir_names(&store.layers_dir()).is_empty());
    assert_eq!(dir_names(store.dir()), vec![".lock", "index.json"]);
}

#[test]
fn pull_selects_linux_amd64_from_an_index() {
    if let Some(r) = missing_prereq(TOOLS) {
        return skip("pull_selects_linux_amd64_from_an_index", &r);
    }
    let reg = Registry::start();
    let client = reg.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let arm = format!("{}/wick/multi:arm64", reg.addr);
    let amd = format!("{}/wick/multi:amd64", reg.addr);
    let layer = |s: &'static [u8]| vec![tar_layer(&[E::File("arch", s, 0o644, 0, 0)])];
    rt.block_on(push(&client, &arm, &layer(b"arm64\n"), "arm64"));
    rt.block_on(push(&client, &amd, &layer(b"amd64\n"), "amd64"));
    let index = format!("{}/wick/multi:latest", reg.addr);
    rt.block_on(push_index(
        &client,
        &index,
        &[(&arm, "arm64"), (&amd, "amd64")],
    ));

    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("images")).unwrap();
    let rec = pull(&store, &index, "multi", &opts(&reg), &mut |_| {}).unwrap();
    assert_eq!(cat(&rec.rootfs, "/arch"), "amd64\n");

    // A single-platform image for another architecture is refused.
    let e = pull(&store, &arm, "arm", &opts(&reg), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("linux/arm64"), "{e}");
}

fn assert_refused(store: &ImageStore, reg: &Registry, reference: &str, name: &str, want: &str) {
    let e = pull(store, reference, name, &opts(reg), &mut |_| {}).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    assert!(e.to_string().contains(want), "{e}");
    assert!(matches!(store.get(name), Err(ImageError::NotFound(_))));
    // Nothing behind: no image dir, no staging dir, no cached layer.
    let left: Vec<_> = dir_names(store.dir())
        .into_iter()
        .filter(|n| n != ".lock" && n != "index.json")
        .collect();
    assert!(left.is_empty(), "left behind in the store: {left:?}");
    assert!(dir_names(&store.layers_dir()).is_empty());
}

#[test]
fn hostile_layers_are_refused_and_leave_nothing() {
    if let Some(r) = missing_prereq(TOOLS) {
        return skip("hostile_layers_are_refused_and_leave_nothing", &r);
    }
    let reg = Registry::start();
    let client = reg.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::new(tmp.path().join("state/images")).unwrap();

    // Path traversal.
    let traversal = format!("{}/evil/traversal:1", reg.addr);
    let escape_name = format!("../../../{}-escaped", std::process::id());
    rt.block_on(push(
        &client,
        &traversal,
        &[tar_layer(&[
            E::File("ok", b"fine\n", 0o644, 0, 0),
            E::File(&escape_name, b"escaped\n", 0o644, 0, 0),
        ])],
        "amd64",
    ));
    assert_refused(&store, &reg, &traversal, "traversal", "'..'");

    // Symlink escape: link -> /etc, then link/passwd; and split across two layers.
    let target = tmp.path().join("outside");
    std::fs::create_dir(&target).unwrap();
    let target_s = target.to_str().unwrap().to_string();
    let symlink = format!("{}/evil/symlink:1", reg.addr);
    rt.block_on(push(
        &client,
        &symlink,
        &[tar_layer(&[
            E::Symlink("link", "/etc"),
            E::File("link/passwd", b"root::0:0::/:/bin/sh\n", 0o644, 0, 0),
        ])],
        "amd64",
    ));
    assert_refused(&store, &reg, &symlink, "symlink", "symbolic link");
    let split = format!("{}/evil/split:1", reg.addr);
    rt.block_on(push(
        &client,
        &split,
        &[
            tar_layer(&[E::Symlink("out", &target_s)]),
            tar_layer(&[E::File("out/planted", b"x\n", 0o644, 0, 0)]),
        ],
        "amd64",
    ));
    assert_refused(&store, &reg, &split, "split", "symbolic link");
    assert!(dir_names(&target).is_empty(), "wrote outside the root");
    assert!(!tmp
        .path()
        .join("state")
        .join(format!("{}-escaped", std::process::id()))
        .exists());
}
