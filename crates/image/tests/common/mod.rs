//! Test helpers shared by the integration tests and the benchmark: a real `docker-registry` on
//! loopback, tar/gzip layer builders (including hostile entries), pushing images with
//! oci-client, and reading ext4 images with debugfs (no mounting).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OciImageIndex, Platform, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// Says why a test is skipped ([`wick_testkit::skip`]). Tests return right after.
pub fn skip(_test: &str, reason: &str) {
    wick_testkit::skip(reason);
}

/// Why root-and-tools tests cannot run, if they cannot.
pub fn missing_prereq(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (image ownership is kept)".into());
    }
    for t in tools {
        let found = ["/usr/bin", "/usr/sbin", "/sbin", "/bin", "/usr/local/bin"]
            .iter()
            .any(|d| Path::new(d).join(t).is_file());
        if !found {
            return Some(format!("{t} is not installed"));
        }
    }
    None
}

/// A `docker-registry` process on 127.0.0.1, with storage in a temp dir; killed on drop.
pub use wick_testkit::registry::Registry;

/// An oci-client for a test [`Registry`] (plain HTTP to it).
pub trait RegistryClient {
    fn client(&self) -> Client;
}

impl RegistryClient for Registry {
    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![self.addr.clone()]),
            ..Default::default()
        })
    }
}

/// One tar entry for [`tar_layer`].
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32, u32, u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// An uncompressed tar of `entries`. Names are written raw into the header, so tests can express
/// hostile paths (`../x`) that tar builders refuse.
pub fn tar_layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (path, kind, data, mode, uid, gid, link): (&str, _, &[u8], u32, u32, u32, &str) =
            match *e {
                E::Dir(p, m) => (p, tar::EntryType::Directory, b"", m, 0, 0, ""),
                E::File(p, d, m, u, g) => (p, tar::EntryType::Regular, d, m, u, g, ""),
                E::Symlink(p, t) => (p, tar::EntryType::Symlink, b"", 0o777, 0, 0, t),
                E::Hardlink(p, t) => (p, tar::EntryType::Link, b"", 0o644, 0, 0, t),
            };
        h.set_entry_type(kind);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_mode(mode);
        h.set_uid(uid as u64);
        h.set_gid(gid as u64);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes an image of gzip layers (given uncompressed) with a config for `arch`; returns the
/// manifest digest.
pub async fn push(client: &Client, reference: &str, layers: &[Vec<u8>], arch: &str) -> String {
    let image: Reference = reference.parse().unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let layers: Vec<ImageLayer> = layers
        .iter()
        .map(|l| ImageLayer::oci_v1_gzip(gzip(l), None))
        .collect();
    let config = Config::oci_v1(serde_json::to_vec(&config).unwrap(), None);
    client
        .push(&image, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .expect("push the test image");
    client
        .fetch_manifest_digest(&image, &RegistryAuth::Anonymous)
        .await
        .unwrap()
}

/// Pushes an index at `reference` pointing at `entries` (reference, arch).
pub async fn push_index(client: &Client, reference: &str, entries: &[(&str, &str)]) {
    let mut manifests = Vec::new();
    for (r, arch) in entries {
        let image: Reference = r.parse().unwrap();
        let (raw, digest) = client
            .pull_manifest_raw(&image, &RegistryAuth::Anonymous, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .unwrap();
        let architecture = match *arch {
            "amd64" => oci_client::config::Architecture::Amd64,
            _ => oci_client::config::Architecture::ARM64,
        };
        manifests.push(ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.to_string(),
            digest,
            size: raw.len() as i64,
            platform: Some(Platform {
                architecture,
                os: oci_client::config::Os::Linux,
                os_version: None,
                os_features: None,
                variant: None,
                features: None,
            }),
            annotations: None,
            artifact_type: None,
        });
    }
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.to_string()),
        manifests,
        artifact_type: None,
        annotations: None,
    };
    client
        .push_manifest_list(&reference.parse().unwrap(), &RegistryAuth::Anonymous, index)
        .await
        .expect("push the index");
}

/// Output of `debugfs -R CMD IMG` (read-only, no mount).
pub fn debugfs(img: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Contents of a file inside an ext4 image.
pub fn cat(img: &Path, path: &str) -> String {
    debugfs(img, &format!("cat {path}"))
}

/// Whether `path` exists in the image.
pub fn exists(img: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).contains("Inode:")
}

/// (mode, uid, gid, inode) of `path` in the image, from `debugfs stat`.
pub fn stat(img: &Path, path: &str) -> (u32, u32, u32, u64) {
    let s = debugfs(img, &format!("stat {path}"));
    let field = |name: &str| -> String {
        let i = s.find(name).unwrap_or_else(|| panic!("{name} in {s}")) + name.len();
        s[i..].split_whitespace().next().unwrap().to_string()
    };
    (
        u32::from_str_radix(&field("Mode:"), 8).unwrap(),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
        field("Inode:").parse().unwrap(),
    )
}

/// Names in a directory of the image (`debugfs ls -l`).
pub fn ls(img: &Path, path: &str) -> Vec<String> {
    debugfs(img, &format!("ls -l {path}"))
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect()
}

/// Everything in `dir` (file names), sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A stand-in wick-agent for tests: a small shell script, named as the fake it is.
pub fn fake_agent(dir: &Path) -> PathBuf {
    let p = dir.join("fake-wick-agent");
    std::fs::write(
        &p,
        b"#!/bin/sh\n# fake wick-agent for tests\nexec sleep infinity\n",
    )
    .unwrap();
    p
}

/// The base, whiteout and opaque layers of the test image.
pub fn test_image_layers() -> Vec<Vec<u8>> {
    let base = tar_layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/os-release", b"NAME=wick-test\n", 0o644, 0, 0),
        E::File("etc/remove-me", b"gone soon\n", 0o644, 0, 0),
        E::Dir("opt/", 0o755),
        E::Dir("opt/app/", 0o750),
        E::File("opt/app/old.txt", b"old\n", 0o640, 0, 0),
        E::File("opt/app/keep-lower.txt", b"lower\n", 0o640, 0, 0),
        E::Dir("home/", 0o755),
        E::File("home/owned", b"dev\n", 0o600, 1000, 1000),
        E::File("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o4755, 0, 0),
        E::Symlink("usr/bin/alias", "tool"),
        E::Hardlink("usr/bin/tool-hard", "usr/bin/tool"),
    ]);
    let whiteouts = tar_layer(&[
        E::File("etc/.wh.remove-me", b"", 0o644, 0, 0),
        E::File("etc/added", b"added in layer 2\n", 0o644, 0, 0),
    ]);
    let opaque = tar_layer(&[
        E::Dir("opt/app/", 0o755),
        E::File("opt/app/.wh..wh..opq", b"", 0o644, 0, 0),
        E::File("opt/app/new.txt", b"new\n", 0o644, 0, 0),
    ]);
    vec![base, whiteouts, opaque]
}
