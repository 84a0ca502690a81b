//! Test fixtures shared by the integration tests and the benchmark: a filesystem made on a sparse
//! file, attached to a loop device and mounted in a temp dir. The guard unmounts and detaches
//! **only the loop device it created**, by name.

#![allow(dead_code)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a root + tool test cannot run here, or `None` when it can.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (loop devices, mount)".into());
    }
    for t in tools {
        if which(t).is_none() {
            return Some(format!("{t} is not installed"));
        }
    }
    None
}

/// Whether `program` is found in PATH or the sbin dirs.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mounted filesystem on a loop device over a sparse file in a temp dir.
pub struct LoopMount {
    pub mountpoint: PathBuf,
    pub device: String,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    /// `mkfs` (`xfs` with reflink, or `btrfs`) on a sparse file of `size_mib`, mounted.
    pub fn new(fs: &str, size_mib: u64) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join(format!("{fs}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let img_s = img.to_str().unwrap();
        match fs {
            "xfs" => run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", img_s]),
            "btrfs" => run("mkfs.btrfs", &["-q", "-f", img_s]),
            other => panic!("unknown fs {other}"),
        };
        let device = run("losetup", &["--find", "--show", img_s])
            .trim()
            .to_string();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut m = LoopMount {
            mountpoint,
            device,
            mounted: false,
            _dir: dir,
        };
        run("mount", &[&m.device, m.mountpoint.to_str().unwrap()]);
        m.mounted = true;
        m
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
        }
        let _ = Command::new("losetup")
            .args(["--detach", &self.device])
            .status();
    }
}

/// A sparse file of `size_mib` with `data_mib` of non-zero data spread over it in 4 MiB runs.
pub fn sparse_image(path: &Path, size_mib: u64, data_mib: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib << 20).unwrap();
    let runs = data_mib.div_ceil(4).max(1);
    let stride = (size_mib << 20) / runs;
    let mut buf = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..runs {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.seek(SeekFrom::Start((i * stride) & !4095)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Bytes allocated on disk for `path`.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Whether two files have the same bytes (compared 1 MiB at a time).
pub fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    fn fill(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n
    }
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fill(&mut fa, &mut ba);
        let nb = fill(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}
