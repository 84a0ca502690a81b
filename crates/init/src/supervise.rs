//! wick-init as the guest's PID 1 when the image has no usable init: mounts the API
//! filesystems that are missing, brings up `lo`, starts `wick-agent` (restarting it with a
//! bounded backoff), starts sshd when the agent asks (after it installed host keys), reaps every
//! zombie, forwards SIGTERM/SIGINT to its services, and powers off cleanly when the agent asks.
//! The pure parts (choices, tables, backoff) live in `wick_init::pid1`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wick_init::pid1::{self, Backoff};
use wick_init::FailAction;

use crate::Log;

/// One supervised process.
struct Service {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    pid: Option<i32>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Backoff,
}

impl Service {
    fn new(name: &'static str, program: &'static str, args: &'static [&'static str]) -> Self {
        Service {
            name,
            program,
            args,
            pid: None,
            started: Instant::now(),
            restart_at: Some(Instant::now()),
            backoff: Backoff::default(),
        }
    }

    fn start(&mut self, log: &Log) {
        self.restart_at = None;
        let mut cmd = Command::new(self.program);
        // SAFETY: between fork and exec only async-signal-safe calls on a local sigset.
        unsafe {
            cmd.pre_exec(|| {
                // The blocked signals of PID 1's loop would otherwise be inherited: a service
                // would then never die of SIGTERM.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            })
        };
        let spawned = cmd
            .args(self.args)
            .env_clear()
            .env("PATH", pid1::SERVICE_PATH)
            .env("HOME", "/root")
            .current_dir("/")
            .stdin(Stdio::null())
            .spawn();
        self.started = Instant::now();
        match spawned {
            // The handle is dropped without waiting: PID 1 reaps every child with waitpid(-1).
            Ok(child) => {
                self.pid = Some(child.id() as i32);
                log.debug(&format!("started {} (pid {})", self.name, child.id()));
            }
            Err(e) => {
                log.say(&format!(
                    "cannot start {} ({}): {e}",
                    self.name, self.program
                ));
                self.exited(log);
            }
        }
    }

    /// Schedules the next start after the process ended (or failed to start).
    fn exited(&mut self, log: &Log) {
        self.pid = None;
        let delay = self.backoff.after_exit(self.started.elapsed());
        log.say(&format!("{} exited; restarting in {delay:?}", self.name));
        self.restart_at = Some(Instant::now() + delay);
    }
}

/// Stays PID 1 for good. Returns only the reason it could not (never, in practice: a poweroff
/// stops the machine).
pub fn run(log: &Log) -> String {
    set_name();
    mount_api(log);
    let _ = fs::create_dir_all("/run/wick-init");
    let _ = fs::write(
        "/run/wick-init/pid1",
        format!(
            "wick-init: signal {} powers off, {} reboots, {} (re)starts sshd\n",
            pid1::poweroff_signal(),
            pid1::reboot_signal(),
            pid1::SSHD_SIGNAL
        ),
    );
    placeholder_hostname();
    if let Err(e) = lo_up() {
        log.say(&format!("cannot bring up lo: {e}"));
    }
    let set = match block_signals() {
        Ok(s) => s,
        Err(e) => return format!("cannot block signals: {e}"),
    };
    let Some(agent) = pid1::find_binary(Path::new("/"), pid1::AGENT_PATHS) else {
        return format!(
            "no wick-agent in the image (looked for {}); pull or import it with the agent injected",
            pid1::AGENT_PATHS.join(", ")
        );
    };
    let mut services = vec![Service::new("wick-agent", agent, &[])];
    let sshd = pid1::find_binary(Path::new("/"), pid1::SSHD_PATHS);
    loop {
        let now = Instant::now();
        for s in services.iter_mut() {
            if s.restart_at.is_some_and(|t| t <= now) {
                s.start(log);
            }
        }
        let wake = services
            .iter()
            .filter_map(|s| s.restart_at)
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5));
        match wait_signal(&set, wake) {
            None | Some(libc::SIGCHLD) => reap(log, &mut services),
            Some(sig @ (libc::SIGTERM | libc::SIGINT)) => forward(&services, sig),
            Some(pid1::SSHD_SIGNAL) => match sshd {
                Some(path) => start_sshd(log, &mut services, path),
                None => log.debug("sshd requested, but the image has none"),
            },
            Some(sig) if sig == pid1::poweroff_signal() || sig == libc::SIGUSR2 => {
                shutdown(log, FailAction::PowerOff)
            }
            Some(sig) if sig == pid1::reboot_signal() => shutdown(log, FailAction::Reboot),
            Some(_) => {}
        }
    }
}

fn set_name() {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"wick-init".as_ptr()) };
}

fn mount_api(log: &Log) {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for m in pid1::missing_mounts(&mounts) {
        let _ = fs::create_dir_all(m.target);
        if let Err(e) = wick_init::mount(m.source, m.target, m.fstype, m.flags, m.data) {
            log.say(&format!("cannot mount {} on {}: {e}", m.fstype, m.target));
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    log.debug("API filesystems mounted");
}

/// The kernel's hostname until the agent's Configure sets the VM's.
fn placeholder_hostname() {
    let current = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if matches!(current.trim(), "" | "(none)") {
        // SAFETY: valid buffer and length.
        unsafe { libc::sethostname(c"localhost".as_ptr(), 9) };
    }
}

/// `ip link set lo up`, with one ioctl.
fn lo_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed `ifreq` naming "lo"; the fd is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, then sigprocmask with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            pid1::SSHD_SIGNAL,
            libc::SIGUSR2,
            pid1::poweroff_signal(),
            pid1::reboot_signal(),
        ] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// The next blocked signal, or `None` after `timeout`.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; siginfo is not asked for.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Reaps every exited child (services and orphans alike) and schedules service restarts.
fn reap(log: &Log, services: &mut [Service]) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if let Some(s) = services.iter_mut().find(|s| s.pid == Some(pid)) {
            s.exited(log);
        }
    }
}

fn forward(services: &[Service], sig: libc::c_int) {
    for pid in services.iter().filter_map(|s| s.pid) {
        // SAFETY: kill on a child pid we started and have not reaped.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Starts sshd (`-D`, supervised like the agent), or restarts it so it reads new host keys.
fn start_sshd(log: &Log, services: &mut Vec<Service>, path: &'static str) {
    if !pid1::has_host_keys(Path::new("/")) {
        return log.say("sshd requested, but /etc/ssh has no host keys yet");
    }
    let _ = fs::create_dir_all("/run/sshd");
    match services.iter_mut().find(|s| s.name == "sshd") {
        Some(s) => {
            if let Some(pid) = s.pid {
                // SAFETY: kill on our own child; the reaper restarts it after the backoff.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                s.backoff = Backoff::default();
            } else {
                s.restart_at = Some(Instant::now());
            }
        }
        None => services.push(Service::new("sshd", path, &["-D", "-e"])),
    }
}

/// TERM then KILL everything, unmount, remount `/` read-only, sync, stop the machine.
fn shutdown(log: &Log, action: FailAction) -> ! {
    log.say(&format!(
        "[{}] shutting down: stopping every process",
        uptime()
    ));
    // SAFETY: kill(-1) signals every process but PID 1.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    if !reap_all(Duration::from_secs(5)) {
        log.say(&format!(
            "[{}] processes left after SIGTERM ({}): killing them",
            uptime(),
            survivors().join(", ")
        ));
        // SAFETY: as above.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        reap_all(Duration::from_secs(2));
    }
    log.say(&format!("[{}] every process stopped; unmounting", uptime()));
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for target in pid1::unmount_order(&mounts) {
        if let Ok(c) = std::ffi::CString::new(target.as_str()) {
            // SAFETY: valid C string.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                log.say(&format!(
                    "cannot unmount {target}: {}; detaching it",
                    std::io::Error::last_os_error()
                ));
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    if let Err(e) = wick_init::mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, None) {
        log.say(&format!("cannot remount / read-only: {e}"));
    }
    log.say(&format!("[{}] powering off", uptime()));
    let err = wick_init::stop_machine(action);
    log.say(&format!("could not stop the machine: {err}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `pid comm (blocked/ignored signal masks)` of every user process but PID 1.
fn survivors() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != 1)
        .filter_map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            // Kernel threads have no memory map.
            if field("VmSize:").is_empty() {
                return None;
            }
            Some(format!(
                "{pid} {} state {} blk {} ign {}",
                field("Name:"),
                field("State:"),
                field("SigBlk:"),
                field("SigIgn:")
            ))
        })
        .collect()
}

/// Seconds since boot, as the kernel's log prints them.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Reaps children until none is left (true) or `limit` passed (false).
fn reap_all(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return true; // ECHILD: no children left
        }
        if pid == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
