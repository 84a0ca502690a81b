//! ext4 images from directories, without mounting: `mkfs.ext4 -d`, sized from the content.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{ImageError, IoContext, Result};
use crate::util::{arg, output, require, run, run_quiet, tool, E2FS_HINT};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// What a directory tree needs on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// Walks `dir` (never following symlinks) and adds up blocks and inodes.
pub(crate) fn usage(dir: &Path) -> Result<Usage> {
    let mut u = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        u.inodes += 1;
        u.bytes += BLOCK;
        for entry in fs::read_dir(&d).ctx("read directory", &d)? {
            let entry = entry.ctx("read directory", &d)?;
            let meta = entry.metadata().ctx("stat", &entry.path())?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                u.inodes += 1;
                // Data rounded up to whole blocks; short symlinks live in the inode.
                let len = if meta.file_type().is_symlink() && meta.len() < 60 {
                    0
                } else if meta.nlink() > 1 {
                    // Hard links share blocks; count them once per link share.
                    meta.len().div_ceil(meta.nlink())
                } else {
                    meta.len()
                };
                u.bytes += len.div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(u)
}

/// A filesystem size for `u` plus `headroom` bytes of free space: metadata overhead (inode
/// tables, journal, group descriptors, reserved blocks) is added on top, rounded to MiB.
pub(crate) fn size_for(u: Usage, headroom: u64) -> u64 {
    let data = u.bytes + u.inodes * 256;
    let size = data + data / 6 + 64 * MIB + headroom;
    size.div_ceil(MIB) * MIB
}

/// Inode count for a filesystem of `size` bytes that must hold `u`: the default ratio (one per
/// 16 KiB), or more when the content has many small files.
fn inode_count(u: Usage, size: u64) -> u64 {
    (size / 16384).max(u.inodes + u.inodes / 4 + 1024)
}

/// Creates `out` (replaced if present) as an ext4 filesystem of `size` bytes filled with the
/// tree at `src` — owners, modes, times, xattrs, devices, hard links and holes included.
/// Retries once with twice the size if the content did not fit.
pub(crate) fn make_ext4(src: &Path, out: &Path, label: &str, size: u64, u: Usage) -> Result<u64> {
    let mkfs = require("mkfs.ext4", E2FS_HINT)?;
    let mut size = size;
    for attempt in 0..2 {
        let _ = fs::remove_file(out);
        let inodes = inode_count(u, size);
        let r = run(
            &tool(&mkfs)
                .args([
                    "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", label,
                ])
                .arg("-N")
                .arg(inodes.to_string())
                .arg("-d")
                .arg(arg(src))
                .arg(arg(out))
                .arg(format!("{}k", size / 1024)),
            &mut |_| {},
        );
        match r {
            Ok(()) => {
                copy_root_inode_meta(src, out)?;
                return Ok(size);
            }
            Err(ImageError::Command { output, .. })
                if attempt == 0
                    && (output.contains("No space left")
                        || output.contains("Could not allocate")
                        || output.contains("ould not allocate")) =>
            {
                size *= 2;
            }
            Err(e) => {
                let _ = fs::remove_file(out);
                return Err(e);
            }
        }
    }
    let _ = fs::remove_file(out);
    Err(ImageError::Invalid(format!(
        "the content of {} does not fit in a {} MiB ext4 filesystem",
        src.display(),
        size / MIB
    )))
}

/// `mkfs.ext4 -d` gives the filesystem's root directory mode 0755 and the caller's owner
/// whatever the source directory has; copy the source's mode and owner (e.g. 0700 for `/root`).
fn copy_root_inode_meta(src: &Path, img: &Path) -> Result<()> {
    let meta = fs::metadata(src).ctx("stat", src)?;
    let mode = meta.mode() & 0o7777;
    let mut cmds = Vec::new();
    if mode != 0o755 {
        cmds.push(format!("set_inode_field / mode 0{:o}", 0o40000 | mode));
    }
    if meta.uid() != 0 {
        cmds.push(format!("set_inode_field / uid {}", meta.uid()));
    }
    if meta.gid() != 0 {
        cmds.push(format!("set_inode_field / gid {}", meta.gid()));
    }
    if cmds.is_empty() {
        return Ok(());
    }
    let debugfs = require("debugfs", E2FS_HINT)?;
    for c in cmds {
        run(
            &tool(&debugfs).arg("-w").arg("-R").arg(c).arg(arg(img)),
            &mut |_| {},
        )?;
    }
    Ok(())
}

/// Shrinks the ext4 filesystem in `img` to its minimum size (`e2fsck -f` then `resize2fs -M`)
/// and truncates the file to match. Returns the new size in bytes.
pub fn shrink_ext4(img: &Path) -> Result<u64> {
    let e2fsck = require("e2fsck", E2FS_HINT)?;
    let resize2fs = require("resize2fs", E2FS_HINT)?;
    // e2fsck exits 1 when it fixed something harmless (e.g. timestamps): treat 0 and 1 as fine.
    let st = output(&tool(&e2fsck).arg("-fy").arg(arg(img)))?.status;
    if !matches!(st.code(), Some(0) | Some(1)) {
        return Err(ImageError::Invalid(format!(
            "e2fsck found errors it could not fix in {} ({st})",
            img.display()
        )));
    }
    run_quiet(&tool(&resize2fs).arg("-M").arg(arg(img)))?;
    let blocks = block_count(img)?;
    let size = blocks * BLOCK;
    fs::OpenOptions::new()
        .write(true)
        .open(img)
        .and_then(|f| f.set_len(size))
        .ctx("truncate", img)?;
    Ok(size)
}

/// Reads the ext4 superblock: checks the magic and returns the block count in 4 KiB units.
pub(crate) fn block_count(img: &Path) -> Result<u64> {
    let sb = read_superblock(img)?;
    let lo = u32::from_le_bytes(sb[4..8].try_into().unwrap()) as u64;
    let hi = u32::from_le_bytes(sb[0x150..0x154].try_into().unwrap()) as u64;
    let log_block = u32::from_le_bytes(sb[24..28].try_into().unwrap());
    let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().unwrap());
    let blocks = if incompat & 0x80 != 0 {
        (hi << 32) | lo
    } else {
        lo
    };
    let bs = 1024u64 << log_block;
    Ok(blocks * bs / BLOCK)
}

/// Whether `path` starts with an ext2/3/4 superblock.
pub(crate) fn is_ext4(path: &Path) -> bool {
    read_superblock(path).is_ok()
}

fn read_superblock(img: &Path) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(img).ctx("open", img)?;
    let mut sb = vec![0u8; 1024];
    f.seek(SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb))
        .ctx("read the ext4 superblock of", img)?;
    if sb[56..58] != [0x53, 0xEF] {
        return Err(ImageError::Invalid(format!(
            "{} is not an ext2/3/4 filesystem image (bad superblock magic)",
            img.display()
        )));
    }
    Ok(sb)
}

/// Checks a filesystem image read-only with `e2fsck -fn`.
pub(crate) fn check_ext4(img: &Path) -> Result<()> {
    let e2fsck = require("e2fsck", E2FS_HINT)?;
    run_quiet(&tool(&e2fsck).arg("-fn").arg(arg(img))).map_err(|e| match e {
        ImageError::Command { output, .. } => ImageError::Invalid(format!(
            "{} is not a clean ext4 filesystem; run `e2fsck -f` on it first:\n{output}",
            img.display()
        )),
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_includes_overhead_and_headroom() {
        let u = Usage {
            bytes: 300 * MIB,
            inodes: 12_000,
        };
        let s = size_for(u, 0);
        assert!(s > 300 * MIB + 64 * MIB);
        assert_eq!(s % MIB, 0);
        assert_eq!(size_for(u, 100 * MIB), s + 100 * MIB);
        assert!(inode_count(u, s) >= 15_000);
    }

    #[test]
    fn usage_counts_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("a")).unwrap();
        fs::write(d.path().join("a/f"), vec![1u8; 5000]).unwrap();
        std::os::unix::fs::symlink("f", d.path().join("a/l")).unwrap();
        let u = usage(d.path()).unwrap();
        assert_eq!(u.inodes, 4);
        assert_eq!(u.bytes, 2 * BLOCK + 2 * BLOCK);
    }
}
