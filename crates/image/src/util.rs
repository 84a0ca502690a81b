//! Small helpers shared by the modules: running tools, hashing, sparse copies, fsync.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wick_host::cmd::{Cmd, CmdError, Output, Runner, SystemRunner};

use crate::error::{ImageError, IoContext, Result};

/// Finds `tool` in `PATH` plus the sbin directories (root's tools live there).
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Resolves `tool` or explains how to install it.
pub(crate) fn require(tool: &'static str, hint: &'static str) -> Result<PathBuf> {
    which(tool).ok_or(ImageError::MissingTool { tool, hint })
}

pub(crate) const E2FS_HINT: &str = "install e2fsprogs (apt-get install e2fsprogs)";

/// The command `tool args...` (a resolved tool path, see [`require`]).
pub(crate) fn tool(path: &Path) -> Cmd {
    Cmd::new(path.to_string_lossy())
}

/// A path as a command argument.
pub(crate) fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Runs `cmd`, feeding each output line (stdout and stderr) to `on_line` as it arrives. On
/// failure the error carries the last lines of output.
pub(crate) fn run(cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<()> {
    SystemRunner::new()
        .run_lines(cmd, on_line)
        .map_err(command_error)
}

/// Runs `cmd` and returns its output whatever its exit status.
pub(crate) fn output(cmd: &Cmd) -> Result<Output> {
    SystemRunner::new().run(cmd).map_err(command_error)
}

/// Runs a command quietly; output only appears in the error.
pub(crate) fn run_quiet(cmd: &Cmd) -> Result<()> {
    run(cmd, &mut |_| {})
}

pub(crate) fn command_error(e: CmdError) -> ImageError {
    match e {
        CmdError::Spawn {
            command, source, ..
        } => ImageError::io(format!("start `{command}`"), source),
        CmdError::Failed {
            command,
            status,
            stderr,
            ..
        } => ImageError::Command {
            cmd: command,
            status,
            output: stderr,
        },
    }
}

/// Hex sha256 of a file. Holes are hashed as the zeros they read as, without reading them (a
/// mostly empty filesystem image hashes at the speed of the hash, not of the disk).
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use nix::unistd::{lseek, Whence};
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).ctx("open", path)?;
    let len = f.metadata().ctx("stat", path)?.len() as i64;
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    let feed_zeros = |h: &mut Sha256, mut n: i64| {
        while n > 0 {
            let k = n.min(zeros.len() as i64) as usize;
            h.update(&zeros[..k]);
            n -= k as i64;
        }
    };
    while pos < len {
        let data = match lseek(f.as_raw_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(nix::errno::Errno::ENXIO) => len,
            // No SEEK_DATA support: read everything.
            Err(_) => pos,
        };
        feed_zeros(&mut h, data - pos);
        if data >= len {
            break;
        }
        let hole = lseek(f.as_raw_fd(), data, Whence::SeekHole)
            .unwrap_or(len as _)
            .min(len);
        f.seek(SeekFrom::Start(data as u64)).ctx("seek", path)?;
        let mut left = hole - data;
        while left > 0 {
            let want = left.min(buf.len() as i64) as usize;
            let n = f.read(&mut buf[..want]).ctx("read", path)?;
            if n == 0 {
                return Err(ImageError::io(
                    format!("read {}", path.display()),
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            h.update(&buf[..n]);
            left -= n as i64;
        }
        pos = hole;
    }
    Ok(hex::encode(h.finalize()))
}

/// Copies `src` to `dst` (created, must not exist) keeping holes: only data extents are copied.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> Result<u64> {
    use nix::unistd::{lseek, Whence};
    let s = File::open(src).ctx("open", src)?;
    let len = s.metadata().ctx("stat", src)?.len();
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .ctx("create", dst)?;
    d.set_len(len).ctx("size", dst)?;
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        let data = match lseek(s.as_raw_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(ImageError::io(format!("seek {}", src.display()), e.into())),
        };
        let hole = lseek(s.as_raw_fd(), data, Whence::SeekHole)
            .map_err(|e| ImageError::io(format!("seek {}", src.display()), e.into()))?;
        let (mut off_in, mut off_out, mut left) = (data, data, hole - data);
        while left > 0 {
            let n = match nix::fcntl::copy_file_range(
                s.as_fd(),
                Some(&mut off_in),
                d.as_fd(),
                Some(&mut off_out),
                left as usize,
            ) {
                // Across filesystems (e.g. out of the XFS pool) older kernels refuse:
                // copy the extent through a buffer instead.
                Err(nix::errno::Errno::EXDEV | nix::errno::Errno::EOPNOTSUPP) => {
                    let n = copy_range(&s, &d, off_in, left as usize)
                        .map_err(|e| ImageError::io(format!("copy {}", src.display()), e))?;
                    off_in += n as i64;
                    off_out += n as i64;
                    n
                }
                r => r.map_err(|e| ImageError::io(format!("copy {}", src.display()), e.into()))?,
            };
            if n == 0 {
                return Err(ImageError::io(
                    format!("copy {}", src.display()),
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            left -= n as i64;
        }
        pos = hole;
    }
    d.sync_all().ctx("sync", dst)?;
    Ok(len)
}

/// Copies up to `len` bytes at `off` from `s` to the same offset of `d` through a buffer;
/// returns how many (0 at the end of `s`).
fn copy_range(s: &File, d: &File, off: i64, len: usize) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20)];
    let n = s.read_at(&mut buf, off as u64)?;
    d.write_all_at(&buf[..n], off as u64)?;
    Ok(n)
}

/// fsyncs a directory so renames inside it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).ctx("sync", dir)
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-write-")
        .tempfile_in(dir)
        .ctx("create a temp file in", dir)?;
    tmp.write_all(bytes).ctx("write", tmp.path())?;
    tmp.as_file().sync_all().ctx("sync", tmp.path())?;
    tmp.persist(path)
        .map_err(|e| ImageError::io(format!("rename into {}", path.display()), e.error))?;
    fsync_dir(dir)
}

/// The current time as RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// Whether we run as root (ownership in images needs it).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Across filesystems (tmpfs to the temp dir's) the copy still keeps data and holes.
    #[test]
    fn sparse_copy_across_filesystems() {
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIP: sparse_copy_across_filesystems: no /dev/shm");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let src = shm.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"head", 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![7u8; 3 << 20], 4 << 20).unwrap();
        let dst = d.path().join("dst");
        assert_eq!(sparse_copy(&src, &dst).unwrap(), 8 << 20);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    /// Hex sha256 of everything `r` yields.
    fn sha256_reader(mut r: impl Read) -> io::Result<String> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    }

    #[test]
    fn sparse_hash_equals_plain_hash() {
        use std::io::{Seek, SeekFrom, Write};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"data in the middle").unwrap();
        f.set_len(9 << 20).unwrap();
        drop(f);
        let plain = sha256_reader(File::open(&p).unwrap()).unwrap();
        assert_eq!(sha256_file(&p).unwrap(), plain);
        let e = d.path().join("empty");
        File::create(&e).unwrap();
        assert_eq!(sha256_file(&e).unwrap(), sha256_reader(&b""[..]).unwrap());
    }
}
