//! Images made from a VM's root disk: a derived build's builder VM (`wick image build --from`)
//! or a stopped VM (`wick vm commit`). The disk is cloned into a staging directory
//! (`copy_file_range`, which reflinks where the filesystem can and copies sparsely elsewhere),
//! checked and repaired with `e2fsck -fy` (a guest that did not unmount cleanly leaves a
//! journal to replay), then committed like every image: rename, record last.

use std::path::Path;

use wick_host::cmd::SystemRunner;

use crate::error::{ImageError, Result};
use crate::record::{ImageRecord, ImageSource};
use crate::store::{CommitExtra, ImageStore};
use crate::util::{self, sparse_copy};

/// What [`ImageStore::import_disk`] records, besides the disk.
#[derive(Debug, Clone)]
pub struct DiskImage {
    pub source: ImageSource,
    /// The derived build's cache key.
    pub build_key: Option<String>,
    /// The default kernel carried over from the base image.
    pub default_kernel: Option<String>,
    /// Whether wick-agent is in the disk (as in the base image).
    pub agent_injected: bool,
    /// Replace an image already called by the name.
    pub replace: bool,
}

/// One file a derived build copies in, as hashed into its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedFile<'a> {
    pub dst: &'a str,
    pub mode: u32,
    pub contents: &'a [u8],
}

/// The cache key of a derived build: sha256 over the base image's identity (its rootfs hash
/// and creation time), the package list (sorted, without duplicates: apt installs a set), each
/// run step in order, and each copied file's guest path, mode and content hash. Every field is
/// length-prefixed, so no two different input lists hash the same stream.
pub fn build_key(
    base: &ImageRecord,
    packages: &[String],
    run: &[String],
    files: &[KeyedFile<'_>],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut put = |tag: &str, v: &[u8]| {
        h.update(tag.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    };
    put("v", b"wick-derived-1");
    put("base", base.id.as_bytes());
    put("created", base.created_at.as_bytes());
    let mut pkgs: Vec<&String> = packages.iter().collect();
    pkgs.sort();
    pkgs.dedup();
    for p in pkgs {
        put("pkg", p.as_bytes());
    }
    for r in run {
        put("run", r.as_bytes());
    }
    for f in files {
        put("dst", f.dst.as_bytes());
        put("mode", &f.mode.to_le_bytes());
        put("sha", &Sha256::digest(f.contents));
    }
    hex::encode(h.finalize())
}

impl ImageStore {
    /// Makes image `name` from the ext4 root disk `disk` (a VM's, which must not run).
    pub fn import_disk(
        &self,
        disk: &Path,
        name: &str,
        what: DiskImage,
        progress: crate::Progress<'_>,
    ) -> Result<ImageRecord> {
        crate::store::validate_image_name(name)?;
        if !what.replace && self.exists(name)? {
            return Err(ImageError::Exists(name.to_string()));
        }
        let staging = self.staging()?;
        progress("cloning the root disk");
        sparse_copy(disk, &staging.rootfs_img())?;
        progress("checking the root filesystem");
        fsck_fix(&staging.rootfs_img())?;
        let extra = CommitExtra {
            agent_injected: what.agent_injected,
            default_kernel: what.default_kernel,
            build_key: what.build_key,
            replace: what.replace,
        };
        self.commit_with(staging, name, what.source, extra, progress)
    }
}

/// `e2fsck -fy`: replays the journal and fixes what it can. Exit codes 0-2 mean clean or
/// fixed; anything else is a disk not fit to be an image.
fn fsck_fix(img: &Path) -> Result<()> {
    let e2fsck = util::require("e2fsck", util::E2FS_HINT)?;
    // The filesystem is the guest's: e2fsck runs as `nobody`, on the file as its stdin.
    let cmd = util::tool(&e2fsck)
        .arg("-fy")
        .arg(wick_host::cmd::STDIN_PATH);
    let out = wick_host::cmd::run_on_untrusted_image(&SystemRunner::new(), img, cmd)
        .map_err(util::command_error)?;
    match out.status.code() {
        Some(0..=2) => Ok(()),
        _ => Err(ImageError::Invalid(format!(
            "the root disk has filesystem errors e2fsck could not fix ({}): {}",
            out.status,
            out.stdout_text().lines().last().unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn disk(dir: &Path, tag: &str) -> Option<std::path::PathBuf> {
        let src = dir.join(format!("src-{tag}"));
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/built"), tag).unwrap();
        let img = dir.join(format!("disk-{tag}.ext4"));
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("16M")
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(img)
    }

    fn what(key: &str, replace: bool) -> DiskImage {
        DiskImage {
            source: ImageSource::Commit {
                vm: "a1".into(),
                base: "default".into(),
            },
            build_key: Some(key.into()),
            default_kernel: Some("k".into()),
            agent_injected: true,
            replace,
        }
    }

    #[test]
    fn build_keys_change_with_every_input() {
        let base: ImageRecord = serde_json::from_value(serde_json::json!({
            "name": "b", "id": "ab", "created_at": "t", "source": {"kind": "import", "path": "/x"},
            "rootfs": "/r", "work_seed": null, "size": 1, "default_kernel": null,
            "agent_injected": true
        }))
        .unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let f = |c: &'static [u8], mode| KeyedFile {
            dst: "/etc/x",
            mode,
            contents: c,
        };
        let k = build_key(&base, &s(&["jq", "curl"]), &s(&["a"]), &[f(b"1", 0o644)]);
        assert_eq!(k.len(), 64);
        // Package order and duplicates do not matter; everything else does.
        let same = build_key(
            &base,
            &s(&["curl", "jq", "jq"]),
            &s(&["a"]),
            &[f(b"1", 0o644)],
        );
        assert_eq!(k, same);
        let others = [
            build_key(&base, &s(&["jq"]), &s(&["a"]), &[f(b"1", 0o644)]),
            build_key(
                &base,
                &s(&["jq", "curl"]),
                &s(&["a", ""]),
                &[f(b"1", 0o644)],
            ),
            build_key(&base, &s(&["jq", "curl"]), &s(&["a"]), &[f(b"2", 0o644)]),
            build_key(&base, &s(&["jq", "curl"]), &s(&["a"]), &[f(b"1", 0o600)]),
            build_key(&base, &s(&["jq", "curl"]), &s(&["a"]), &[]),
            build_key(&base, &s(&["jq", "curl"]), &s(&["ab"]), &[f(b"1", 0o644)]),
        ];
        let mut base2 = base.clone();
        base2.id = "cd".into();
        let moved = build_key(&base2, &s(&["jq", "curl"]), &s(&["a"]), &[f(b"1", 0o644)]);
        for o in others.iter().chain([&moved]) {
            assert_ne!(&k, o);
        }
    }

    #[test]
    fn a_disk_becomes_an_image_found_by_its_key_and_aliased() {
        let d = tempfile::tempdir().unwrap();
        let (Some(img), Some(img2)) = (disk(d.path(), "a"), disk(d.path(), "b")) else {
            eprintln!("SKIP: mkfs.ext4 (e2fsprogs) is not available");
            return;
        };
        let s = ImageStore::new(d.path().join("images")).unwrap();
        let r = s
            .import_disk(&img, "x", what("k1", false), &mut |_| {})
            .unwrap();
        assert_eq!(r.build_key.as_deref(), Some("k1"));
        assert_eq!(r.default_kernel.as_deref(), Some("k"));
        assert!(r.agent_injected && r.rootfs.is_file());
        assert_eq!(r.size, std::fs::metadata(&img).unwrap().len());
        assert_eq!(s.find_by_key("k1").unwrap().unwrap().name, "x");
        assert!(s.find_by_key("k2").unwrap().is_none());
        let e = s.import_disk(&img, "x", what("k2", false), &mut |_| {});
        assert!(matches!(e, Err(ImageError::Exists(_))), "{e:?}");
        // An alias shares the files; a replace moves the name.
        let y = s.alias("x", "y", false).unwrap();
        assert_eq!((y.id.as_str(), y.name.as_str()), (r.id.as_str(), "y"));
        assert!(matches!(
            s.alias("x", "y", false),
            Err(ImageError::Exists(_))
        ));
        s.delete("x").unwrap();
        assert!(y.rootfs.is_file(), "y still names the files");
        let z = s
            .import_disk(&img2, "y", what("k3", true), &mut |_| {})
            .unwrap();
        assert_eq!(z.build_key.as_deref(), Some("k3"));
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(s.sweep_staging().unwrap().is_empty());
    }
}
