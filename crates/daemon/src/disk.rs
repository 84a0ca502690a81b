//! Root disks: a sparse copy of the image's root filesystem (data extents only, holes kept).
//! The storage issue replaces this with pluggable copy-on-write backends.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

/// Copies `src` to `dst` (created, must not exist), copying only data extents so the clone is as
/// sparse as the source. Uses `copy_file_range`, which reflinks on filesystems that can.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    let s = File::open(src)?;
    let len = s.metadata()?.len();
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    d.set_len(len)?;
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        let data = match lseek(s.as_raw_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(s.as_raw_fd(), data, Whence::SeekHole).map_err(io::Error::from)?;
        copy_range(&s, &d, data, hole - data)?;
        pos = hole;
    }
    d.sync_all()?;
    Ok(len)
}

fn copy_range(s: &File, d: &File, off: i64, mut len: i64) -> io::Result<()> {
    let mut off_in = off;
    let mut off_out = off;
    while len > 0 {
        let n = nix::fcntl::copy_file_range(
            s.as_fd(),
            Some(&mut off_in),
            d.as_fd(),
            Some(&mut off_out),
            len as usize,
        )
        .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        len -= n as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        assert_eq!(sparse_copy(&src, &dst).unwrap(), (64 << 20) + 4);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // far fewer blocks than 64 MiB
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        assert!(sparse_copy(&src, &dst).is_err(), "refuses to overwrite");
    }
}
