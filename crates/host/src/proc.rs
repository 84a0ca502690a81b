//! Processes by pid + start time, never by name.
//!
//! A pid alone is not an identity: pids are reused. Everything here takes the `/proc/<pid>/stat`
//! start time recorded when the process was spawned and refuses to act on a different process
//! that happens to wear the same pid. Zombies (exited, not yet reaped) count as dead.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

/// The fields of `/proc/<pid>/stat` that follow the command name, starting at field 3 (state).
/// The command name may contain spaces and parentheses, so parse after the **last** `)`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    parse_stat_fields(&stat)
}

fn parse_stat_fields(stat: &str) -> Option<Vec<String>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field 22 of a stat line (`starttime`, clock ticks since boot).
fn parse_start_time(stat: &str) -> Option<u64> {
    // Field 3 is index 0 after the ')', so field 22 is index 19.
    parse_stat_fields(stat)?.get(19)?.parse().ok()
}

/// Start time of `pid` (field 22 of `/proc/<pid>/stat`, clock ticks since boot), `None` when
/// there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    parse_start_time(&stat)
}

/// True when `pid` exists, is not a zombie (`Z`) or dead (`X`), and — when `start_time` is
/// given — started at that time (so it is the same process, not a reused pid).
pub fn is_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Some(fields) = stat_fields(pid) else {
        return false;
    };
    let state = fields.first().map(String::as_str).unwrap_or("");
    if matches!(state, "Z" | "X" | "x") {
        return false;
    }
    match start_time {
        None => true,
        Some(want) => fields.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(want),
    }
}

/// Pids whose command line contains `arg` as one whole argument (exact match of one
/// NUL-separated element of `/proc/<pid>/cmdline`). Sorted ascending; zombies are skipped.
pub fn find_by_arg(arg: &OsStr) -> Vec<u32> {
    let want = arg.as_bytes();
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(proc_path(pid, "cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == want) && is_alive(pid, None) {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

/// Sends `sig` to `pid` if it is alive and (when given) has the recorded start time.
/// `Ok(false)` when the process is gone or is not the same process; `Err` for other failures
/// (e.g. permission denied).
pub fn signal(pid: u32, start_time: Option<u64>, sig: Signal) -> io::Result<bool> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Ok(false);
    }
    if !is_alive(pid, start_time) {
        return Ok(false);
    }
    match nix::sys::signal::kill(Pid::from_raw(pid as i32), sig) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

/// Resident set size of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None` when the process
/// is gone or has no RSS line (kernel threads, zombies).
pub fn rss_kib(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    parse_rss_kib(&status)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Parses a signal given by a user: `KILL`, `SIGKILL`, `kill`, `sigterm`, `9`, ...
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty signal name: use a name like TERM or KILL, or a number like 9".into());
    }
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| {
            format!("unknown signal number {s:?}: use a number like 9 or a name like KILL")
        });
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| {
        format!("unknown signal {s:?}: use a name like TERM, KILL, INT, HUP or a number like 9")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn me() -> u32 {
        std::process::id()
    }

    fn spawn_sleep() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep")
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line =
            "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_stat_fields(line).unwrap()[0], "S");
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\tx\nVmPeak:\t 10 kB\nVmRSS:\t    4242 kB\nThreads: 1\n";
        assert_eq!(parse_rss_kib(status), Some(4242));
        assert_eq!(parse_rss_kib("Name: kthread\n"), None);
    }

    #[test]
    fn self_is_alive_with_its_start_time() {
        let st = start_time(me()).expect("own start time");
        assert!(is_alive(me(), None));
        assert!(is_alive(me(), Some(st)));
        assert!(!is_alive(me(), Some(st + 1)));
        assert!(rss_kib(me()).unwrap() > 0);
        // A mismatched start time means "not the same process": nothing is sent.
        assert!(!signal(me(), Some(st + 1), Signal::SIGKILL).unwrap());
    }

    #[test]
    fn missing_pids() {
        assert_eq!(start_time(0), None);
        assert!(!is_alive(0, None));
        // pid_max is at most 2^22; this pid cannot exist.
        let bogus = 4_194_305 + 7;
        assert_eq!(start_time(bogus), None);
        assert!(!is_alive(bogus, None));
        assert_eq!(rss_kib(bogus), None);
        assert!(!signal(bogus, None, Signal::SIGTERM).unwrap());
        assert!(!signal(0, None, Signal::SIGTERM).unwrap());
    }

    #[test]
    fn child_signal_zombie_and_reap() {
        let mut child = spawn_sleep();
        let pid = child.id();
        let st = start_time(pid).expect("child start time");
        assert!(is_alive(pid, Some(st)));

        // A wrong start time protects the process.
        assert!(!signal(pid, Some(st.wrapping_add(1)), Signal::SIGKILL).unwrap());
        assert!(is_alive(pid, Some(st)));

        assert!(signal(pid, Some(st), Signal::SIGTERM).unwrap());
        // Not reaped yet: the child becomes a zombie, which counts as dead.
        assert!(
            wait_until(|| !is_alive(pid, Some(st))),
            "zombie should count as dead"
        );
        assert!(start_time(pid).is_some(), "zombie still has a /proc entry");
        assert!(
            !signal(pid, Some(st), Signal::SIGKILL).unwrap(),
            "no signalling zombies"
        );
        assert_eq!(rss_kib(pid), None);

        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(!is_alive(pid, None));
    }

    #[test]
    fn find_by_exact_argument() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker-arg.sock");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("sleep 30; true") // `; true` keeps sh from exec-ing sleep
            .arg(&marker)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(wait_until(|| find_by_arg(marker.as_os_str()) == vec![pid]));
        // A prefix or a superstring is not a match.
        let prefix = dir.path().join("marker-arg");
        assert!(!find_by_arg(prefix.as_os_str()).contains(&pid));
        let longer = dir.path().join("marker-arg.sock.x");
        assert!(!find_by_arg(longer.as_os_str()).contains(&pid));

        assert!(signal(pid, None, Signal::SIGKILL).unwrap());
        // Zombies are not found.
        assert!(wait_until(|| find_by_arg(marker.as_os_str()).is_empty()));
        child.wait().unwrap();
    }

    #[test]
    fn parses_signals() {
        for s in ["KILL", "SIGKILL", "kill", "sigkill", "9", " Kill "] {
            assert_eq!(parse_signal(s).unwrap(), Signal::SIGKILL, "{s}");
        }
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("hup").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), Signal::SIGUSR1);
        let e = parse_signal("BOGUS").unwrap_err();
        assert!(e.contains("BOGUS"), "{e}");
        let e = parse_signal("999").unwrap_err();
        assert!(e.contains("999"), "{e}");
        assert!(parse_signal("").is_err());
        assert!(parse_signal("0").is_err());
    }
}
