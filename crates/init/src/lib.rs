//! wick-init's testable parts: kernel command line parsing, the module list format, and thin safe
//! wrappers over the few Linux syscalls PID 1 needs (mount, finit_module, chroot, reboot).
//!
//! The binary (`src/main.rs`) is the initramfs `/init`; it only strings these together. The crate
//! depends on `libc` alone so the static binary stays small.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::Duration;

pub mod pid1;
pub use pid1::InitMode;

/// The file in the initramfs listing the modules to load, one path per line, in load order.
pub const MODULE_LIST: &str = "/etc/wick-init/modules";

/// Where the root disk is mounted before `switch_root`.
pub const NEW_ROOT: &str = "/newroot";

/// What to do when booting fails: make the VMM exit rather than hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    /// `reboot(RB_POWER_OFF)` (falls back to a restart when power-off is refused).
    PowerOff,
    /// `reboot(RB_AUTOBOOT)`: with `reboot=k` Firecracker exits; QEMU exits under `-no-reboot`.
    Reboot,
}

/// What wick-init takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `root=`: the root block device, e.g. `/dev/vda`.
    pub root: Option<String>,
    /// `rootfstype=`: filesystem types to try, in order (comma separated); default `ext4`.
    pub rootfstype: Vec<String>,
    /// `rootflags=`: filesystem-specific mount data.
    pub rootflags: Option<String>,
    /// `ro` (default, as the kernel does) or `rw`.
    pub read_only: bool,
    /// `init=`: the real init to exec; default `/sbin/init`.
    pub init: String,
    /// Whether `init=` was given (then `wick.init=auto` uses it without looking).
    pub init_given: bool,
    /// `wick.init=auto|wick|image`: whether wick-init stays PID 1 (see [`pid1`]).
    pub init_mode: InitMode,
    /// `wick.initdebug`: print every step.
    pub debug: bool,
    /// `rootwait=SECONDS` / `wick.rootwait=SECONDS`: how long to wait for the root device (default 10 s).
    pub root_wait: Duration,
    /// `wick.onfail=poweroff|reboot`: how to stop on failure (default power off).
    pub on_fail: FailAction,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            root: None,
            rootfstype: vec!["ext4".to_string()],
            rootflags: None,
            read_only: true,
            init: "/sbin/init".to_string(),
            init_given: false,
            init_mode: InitMode::Auto,
            debug: false,
            root_wait: Duration::from_secs(10),
            on_fail: FailAction::PowerOff,
        }
    }
}

/// Splits a kernel command line into words the way the kernel does: whitespace separated,
/// double quotes group (and are removed).
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for ch in cmdline.chars() {
        match ch {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    words
}

/// Parses the kernel command line (the content of `/proc/cmdline`). Unknown words are ignored;
/// the last occurrence of a key wins, as in the kernel. Everything after a bare `--` belongs to
/// init and is ignored here.
pub fn parse_cmdline(cmdline: &str) -> BootConfig {
    let mut cfg = BootConfig::default();
    for word in split_cmdline(cmdline) {
        if word == "--" {
            break;
        }
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        match (key, value) {
            ("root", Some(v)) if !v.is_empty() => cfg.root = Some(v.to_string()),
            ("rootfstype", Some(v)) => {
                let types: Vec<String> = v
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                if !types.is_empty() {
                    cfg.rootfstype = types;
                }
            }
            ("rootflags", Some(v)) if !v.is_empty() => cfg.rootflags = Some(v.to_string()),
            ("ro", None) => cfg.read_only = true,
            ("rw", None) => cfg.read_only = false,
            ("init", Some(v)) if !v.is_empty() => {
                cfg.init = v.to_string();
                cfg.init_given = true;
            }
            ("wick.init", Some(v)) => {
                if let Some(m) = InitMode::parse(v) {
                    cfg.init_mode = m;
                }
            }
            ("wick.initdebug", None) => cfg.debug = true,
            ("wick.initdebug", Some(v)) => cfg.debug = !matches!(v, "0" | "off" | "no"),
            ("rootwait" | "wick.rootwait", Some(v)) => {
                if let Ok(secs) = v.parse::<u64>() {
                    cfg.root_wait = Duration::from_secs(secs);
                }
            }
            ("wick.onfail", Some("reboot")) => cfg.on_fail = FailAction::Reboot,
            ("wick.onfail", Some("poweroff")) => cfg.on_fail = FailAction::PowerOff,
            _ => {}
        }
    }
    cfg
}

/// One line of [`MODULE_LIST`]: a module file and optional parameters (`path param=value ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: String,
    pub params: String,
}

/// Parses the module list: one module path per line, optionally followed by its parameters; blank
/// lines and `#` comments are skipped. Order is load order.
pub fn parse_module_list(text: &str) -> Vec<ModuleEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((p, rest)) => ModuleEntry {
                path: p.to_string(),
                params: rest.trim().to_string(),
            },
            None => ModuleEntry {
                path: l.to_string(),
                params: String::new(),
            },
        })
        .collect()
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mount(2)`. `source`/`fstype`/`data` may be empty.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = cstr(fstype)?;
    let data = data.map(cstr).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr() as *const libc::c_void);
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data) for the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })
}

/// Loads a kernel module from an open file with `finit_module(2)`. Returns `Ok(false)` when the
/// module was already loaded (EEXIST).
pub fn finit_module(file: &std::fs::File, params: &str) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let params = cstr(params)?;
    // SAFETY: fd is open for the duration; params is a valid C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(true)
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid C string.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

/// Replaces this process with `program` (argv[0] = program, then `args`), keeping the environment.
/// Only returns on failure.
pub fn exec(program: &str, args: &[String]) -> io::Error {
    let prog = match cstr(program) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut argv_owned = vec![prog.clone()];
    for a in args {
        match cstr(a) {
            Ok(c) => argv_owned.push(c),
            Err(e) => return e,
        }
    }
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call.
    unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

/// Flushes filesystems and stops the machine the way `action` says. Returns only if the kernel
/// refused both power-off and restart (e.g. not PID 1).
pub fn stop_machine(action: FailAction) -> io::Error {
    // SAFETY: plain syscalls without pointers.
    unsafe {
        libc::sync();
        if action == FailAction::PowerOff {
            libc::reboot(libc::RB_POWER_OFF);
        }
        libc::reboot(libc::RB_AUTOBOOT);
    }
    io::Error::last_os_error()
}

/// Points stdin/stdout/stderr at `/dev/console` (used when the kernel started us without one).
pub fn attach_console() -> io::Result<()> {
    let path = cstr("/dev/console")?;
    // SAFETY: valid C string; fds are plain integers.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        for target in 0..3 {
            if fd != target {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
    Ok(())
}

/// Whether the process has usable stdout (fd 1 open).
pub fn stdout_is_open() -> bool {
    // SAFETY: fcntl on an integer fd.
    unsafe { libc::fcntl(1, libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_typical_command_line() {
        let c = parse_cmdline(
            "console=ttyS0 reboot=k panic=-1 root=/dev/vda rootfstype=ext4,xfs rootflags=discard rw init=/lib/systemd/systemd wick.initdebug",
        );
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.rootfstype, vec!["ext4", "xfs"]);
        assert_eq!(c.rootflags.as_deref(), Some("discard"));
        assert!(!c.read_only);
        assert_eq!(c.init, "/lib/systemd/systemd");
        assert!(c.debug);
        assert_eq!(c.on_fail, FailAction::PowerOff);
        assert!(c.init_given);
        assert_eq!(c.init_mode, InitMode::Auto);
        let w = parse_cmdline("root=/dev/vda wick.init=wick");
        assert_eq!((w.init_mode, w.init_given), (InitMode::Wick, false));
        assert_eq!(parse_cmdline("wick.init=bogus").init_mode, InitMode::Auto);
    }

    #[test]
    fn defaults_and_last_one_wins() {
        let c = parse_cmdline("root=/dev/vdb rw ro root=/dev/vda");
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert!(c.read_only);
        assert_eq!(c.rootfstype, vec!["ext4"]);
        assert_eq!(c.init, "/sbin/init");
        assert!(!c.debug);
        assert_eq!(c.root_wait, Duration::from_secs(10));
        let d = parse_cmdline("");
        assert_eq!(d, BootConfig::default());
    }

    #[test]
    fn quotes_options_and_init_args() {
        assert_eq!(
            split_cmdline(r#"a "b c" d="e f"  g"#),
            vec!["a", "b c", "d=e f", "g"]
        );
        let c = parse_cmdline("wick.rootwait=3 wick.onfail=reboot wick.initdebug=0 -- rw");
        assert_eq!(c.root_wait, Duration::from_secs(3));
        assert_eq!(c.on_fail, FailAction::Reboot);
        assert!(!c.debug);
        assert!(c.read_only, "words after -- belong to init");
    }

    #[test]
    fn module_list_format() {
        let l = parse_module_list(
            "# load order\n/lib/modules/virtio.ko\n\n  /lib/modules/virtio_blk.ko  queue_depth=64 x=1\n",
        );
        assert_eq!(
            l,
            vec![
                ModuleEntry {
                    path: "/lib/modules/virtio.ko".into(),
                    params: String::new()
                },
                ModuleEntry {
                    path: "/lib/modules/virtio_blk.ko".into(),
                    params: "queue_depth=64 x=1".into()
                },
            ]
        );
    }
}
