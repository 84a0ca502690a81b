//! The VMM log (`vmm.log`: the VMM's stdout/stderr and the guest's serial console): bounded by
//! copy-and-truncate rotation, and read from the end.
//!
//! The guest writes the serial console, so the log's growth is attacker-controlled. Every writer
//! (Firecracker's stdout/stderr, QEMU's stderr and `-chardev file,append=on`, the vsock sidecar)
//! opens the file with `O_APPEND`, so wickd can truncate it in place at any time: the next write
//! lands at the new end, no writer ever blocks on wickd, and nothing changes for VMMs re-adopted
//! after a wickd restart. [`rotate`] moves the last part of `vmm.log` into `vmm.log.1` and empties
//! `vmm.log`; the daemon calls it for every live VMM a few times a second (see
//! [`LogLimit::check_interval`]), so the pair stays within the limit plus what the guest can print
//! between two checks. Bytes written between the copy and the truncation are lost (a log, not a
//! record). `vmm.log.1` is a deterministic name inside the VM dir and goes with it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How much of the log [`read_tail`] reads backwards per step.
const CHUNK: u64 = 64 * 1024;

/// The default cap of `vmm.log` + `vmm.log.1` (config `vmm_log_max`).
pub const DEFAULT_LOG_MAX: u64 = 8 << 20;
/// The smallest accepted cap.
pub const MIN_LOG_MAX: u64 = 64 << 10;

/// The bound on one VM's VMM log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimit {
    /// `vmm.log` + `vmm.log.1` stay below this (given checks at [`LogLimit::check_interval`]
    /// and a guest printing less than `max / 4` per interval).
    pub max: u64,
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit {
            max: DEFAULT_LOG_MAX,
        }
    }
}

impl LogLimit {
    /// `vmm.log` is rotated once it holds more than this: a quarter of the cap, leaving a quarter
    /// as headroom for what arrives between two checks.
    pub fn rotate_at(&self) -> u64 {
        self.max / 4
    }

    /// What `vmm.log.1` keeps: the last half of the cap at most.
    pub fn keep(&self) -> u64 {
        self.max / 2
    }

    /// How often the daemon checks every live VMM's log.
    pub fn check_interval() -> Duration {
        Duration::from_millis(100)
    }
}

/// Opens `path` with `opts` only if it is a regular file, never following a symlink at its last
/// component nor blocking on a FIFO. The VM dir belongs to its VMM's uid, which (after an escape)
/// may put anything there: wickd, as root, must never read or write through such an entry.
pub fn open_regular(opts: &mut std::fs::OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// The rotated companion of `log`: `vmm.log.1`.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Rotates `log` when it is larger than [`LogLimit::rotate_at`]: its last [`LogLimit::keep`]
/// bytes replace `vmm.log.1` and `log` is truncated to zero. `Ok(false)` when nothing was
/// needed (including a missing log). Idempotent and safe while writers append.
pub fn rotate(log: &Path, limit: LogLimit) -> io::Result<bool> {
    let mut f = match open_regular(std::fs::OpenOptions::new().read(true).write(true), log) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len <= limit.rotate_at() {
        return Ok(false);
    }
    let start = len.saturating_sub(limit.keep());
    f.seek(SeekFrom::Start(start))?;
    let mut kept = Vec::with_capacity((len - start) as usize);
    (&mut f).take(limit.keep()).read_to_end(&mut kept)?;
    // Truncate first, so as little as possible of what the VMM writes meanwhile is lost.
    f.set_len(0)?;
    drop(f);
    let rotated = rotated_path(log);
    let mut tmp = rotated.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut out = open_regular(
        std::fs::OpenOptions::new().write(true).create_new(true),
        &tmp,
    )?;
    out.write_all(&kept)?;
    drop(out);
    std::fs::rename(&tmp, &rotated)?;
    Ok(true)
}

/// The last `n` lines of `path`, read backwards from its end in chunks (never more than
/// `max_bytes`); empty when unreadable. A file of any size costs at most `max_bytes` of reading.
pub fn read_tail(path: &Path, n: usize, max_bytes: u64) -> String {
    let Ok(mut f) = open_regular(std::fs::OpenOptions::new().read(true), path) else {
        return String::new();
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return String::new();
    };
    let floor = len.saturating_sub(max_bytes);
    let mut start = len;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut newlines = 0usize;
    // One more newline than lines wanted: the text before it is cut off.
    while start > floor && newlines <= n {
        let next = start.saturating_sub(CHUNK).max(floor);
        let mut chunk = vec![0u8; (start - next) as usize];
        if f.seek(SeekFrom::Start(next)).is_err() || f.read_exact(&mut chunk).is_err() {
            break;
        }
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        chunks.push(chunk);
        start = next;
    }
    chunks.reverse();
    let buf = chunks.concat();
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of the VMM log, continuing into `vmm.log.1` when `vmm.log` has fewer
/// (right after a rotation); reads at most `max_bytes` of each file, from the end.
pub fn log_tail_lines(log: &Path, n: usize, max_bytes: u64) -> String {
    let current = read_tail(log, n, max_bytes);
    let have = current.lines().count();
    if have >= n {
        return current;
    }
    let older = read_tail(&rotated_path(log), n - have, max_bytes);
    match (older.is_empty(), current.is_empty()) {
        (true, _) => current,
        (false, true) => older,
        (false, false) => format!("{older}\n{current}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VM dir belongs to the VMM's uid: a log it replaced by a link is neither read nor
    /// written (wickd is root), and a FIFO does not block.
    #[test]
    fn links_and_fifos_in_place_of_the_log_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("root-only");
        std::fs::write(&target, vec![b'x'; 4096]).unwrap();
        let log = dir.path().join("vmm.log");
        std::os::unix::fs::symlink(&target, &log).unwrap();
        let limit = LogLimit { max: 1024 };
        assert!(rotate(&log, limit).is_err());
        assert_eq!(read_tail(&log, 10, 1 << 20), "");
        assert_eq!(std::fs::read(&target).unwrap(), vec![b'x'; 4096]);
        // The rotated file's temporary name as a link: replaced, never written through.
        std::fs::remove_file(&log).unwrap();
        std::fs::write(&log, vec![b'y'; 4096]).unwrap();
        let mut tmp = rotated_path(&log).into_os_string();
        tmp.push(".tmp");
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        assert!(rotate(&log, limit).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), vec![b'x'; 4096]);
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_tail(&fifo, 10, 1 << 20), "");
        assert!(rotate(&fifo, limit).is_err());
    }
    use std::time::Instant;

    #[test]
    fn tail_of_a_huge_sparse_file_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmm.log");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 30).unwrap(); // 64 GiB of hole: reading it all would take minutes
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        for i in 0..50 {
            writeln!(f, "line {i}").unwrap();
        }
        let t = Instant::now();
        let tail = read_tail(&p, 5, 8 << 20);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(tail, "line 45\nline 46\nline 47\nline 48\nline 49");
        // Many lines wanted: stops at max_bytes instead of reading the hole.
        let t = Instant::now();
        let tail = read_tail(&p, 1_000_000, 1 << 20);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(tail.ends_with("line 49"));
        assert!(tail.len() <= 1 << 20);
    }

    #[test]
    fn tail_spans_chunks_and_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let tail = read_tail(&p, 20_000, 64 << 20);
        assert_eq!(tail.lines().count(), 20_000);
        assert!(tail.starts_with("line 80000\n"));
        std::fs::write(&p, "one\ntwo").unwrap();
        assert_eq!(read_tail(&p, 5, 1024), "one\ntwo");
        assert_eq!(read_tail(&dir.path().join("missing"), 5, 1024), "");
    }

    #[test]
    fn rotation_keeps_the_newest_bytes_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmm.log");
        let limit = LogLimit { max: 64 << 10 };
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        for i in 0..20_000 {
            writeln!(w, "console line {i}").unwrap();
            if i % 500 == 0 {
                rotate(&p, limit).unwrap();
            }
            let total = std::fs::metadata(&p).unwrap().len()
                + std::fs::metadata(rotated_path(&p)).map_or(0, |m| m.len());
            assert!(total <= limit.max, "{total} bytes after line {i}");
        }
        // The writer kept appending at the (new) end: no hole at the start.
        let cur = std::fs::read(&p).unwrap();
        assert!(!cur.contains(&0), "a hole after truncation");
        assert_eq!(log_tail_lines(&p, 1, 1 << 20), "console line 19999");
        let many = log_tail_lines(&p, 1000, 1 << 20);
        assert_eq!(many.lines().count(), 1000, "continues into vmm.log.1");
        assert!(!rotate(&dir.path().join("missing"), limit).unwrap());
    }
}
