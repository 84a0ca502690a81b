//! wick-init: PID 1 of wick's initramfs, for guest kernels whose virtio drivers are modules.
//!
//! Mounts proc, sys and devtmpfs; loads the modules listed in `/etc/wick-init/modules` (in order,
//! with `finit_module`); waits for the `root=` block device; mounts it at `/newroot`; moves
//! /dev, /proc and /sys into it; frees the initramfs and `switch_root`s to `init=` (default
//! `/sbin/init`). Any failure prints `wick-init: ...` on the console and stops the machine so the
//! VMM exits instead of hanging. Must be built static (see the wick-kernel crate docs).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use wick_init::pid1::{choose_init, InitChoice};
use wick_init::{BootConfig, FailAction, MODULE_LIST, NEW_ROOT};

mod supervise;

pub(crate) struct Log {
    start: Instant,
    debug: bool,
}

impl Log {
    pub(crate) fn say(&self, msg: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "wick-init: {msg}");
    }
    pub(crate) fn debug(&self, msg: &str) {
        if self.debug {
            let t = self.start.elapsed().as_secs_f64();
            self.say(&format!("[{t:.3}s] {msg}"));
        }
    }
}

fn main() {
    let mut log = Log {
        start: Instant::now(),
        debug: false,
    };
    if std::process::id() != 1 {
        log.say(
            "refusing to run: wick-init is the initramfs PID 1 of a wick guest, not a host program",
        );
        std::process::exit(2);
    }
    let on_fail = match run(&mut log) {
        Ok(never) => match never {},
        Err((action, msg)) => {
            log.say(&format!("boot failed: {msg}"));
            action
        }
    };
    log.say("stopping the machine in 1 s");
    std::thread::sleep(Duration::from_secs(1));
    let err = wick_init::stop_machine(on_fail);
    log.say(&format!("could not stop the machine: {err}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

enum Never {}

type Fail = (FailAction, String);

fn run(log: &mut Log) -> Result<Never, Fail> {
    let early = |msg: String| (FailAction::PowerOff, msg);
    mount_early(log).map_err(early)?;
    let cmdline = fs::read_to_string("/proc/cmdline")
        .map_err(|e| early(format!("cannot read /proc/cmdline: {e}")))?;
    let cfg = wick_init::parse_cmdline(&cmdline);
    log.debug = cfg.debug;
    log.debug(&format!("command line: {}", cmdline.trim()));
    let fail = |msg: String| (cfg.on_fail, msg);

    load_modules(log).map_err(fail)?;
    let root = wait_for_root(log, &cfg).map_err(fail)?;
    mount_root(log, &cfg, &root).map_err(fail)?;
    let choice = choose_init(
        Path::new(NEW_ROOT),
        cfg.init_mode,
        &cfg.init,
        cfg.init_given,
    );
    let err = match choice {
        InitChoice::Image(init) => {
            let cfg = BootConfig {
                init,
                ..cfg.clone()
            };
            switch_root(log, &cfg)
        }
        InitChoice::Wick(why) => {
            log.say(&format!("staying PID 1 ({why}); starting wick-agent"));
            match enter_new_root(log) {
                Ok(()) => supervise::run(log),
                Err(e) => e,
            }
        }
    };
    Err(fail(err))
}

/// Mounts proc, sysfs and devtmpfs, and makes sure we have a console.
fn mount_early(log: &Log) -> Result<(), String> {
    for (src, target, fstype) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        let _ = fs::create_dir_all(target);
        let flags = libc::MS_NOSUID
            | if fstype == "devtmpfs" {
                0
            } else {
                libc::MS_NOEXEC | libc::MS_NODEV
            };
        match wick_init::mount(src, target, fstype, flags, None) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(format!("cannot mount {fstype} on {target}: {e}")),
        }
        if target == "/dev" && !wick_init::stdout_is_open() {
            let _ = wick_init::attach_console();
        }
    }
    log.debug("mounted /dev, /proc, /sys");
    Ok(())
}

fn load_modules(log: &Log) -> Result<(), String> {
    let text = match fs::read_to_string(MODULE_LIST) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log.debug(&format!("no {MODULE_LIST}; loading no modules"));
            return Ok(());
        }
        Err(e) => return Err(format!("cannot read {MODULE_LIST}: {e}")),
    };
    for entry in wick_init::parse_module_list(&text) {
        let file = fs::File::open(&entry.path)
            .map_err(|e| format!("cannot open module {}: {e}", entry.path))?;
        match wick_init::finit_module(&file, &entry.params) {
            Ok(true) => log.debug(&format!("loaded {}", entry.path)),
            Ok(false) => log.debug(&format!("{} already loaded", entry.path)),
            Err(e) => {
                return Err(format!(
                    "cannot load module {}: {e} (is it built for this kernel? `dmesg` lines above may say why)",
                    entry.path
                ))
            }
        }
    }
    Ok(())
}

fn wait_for_root(log: &Log, cfg: &BootConfig) -> Result<String, String> {
    let root = cfg.root.clone().ok_or_else(|| {
        "no root= on the kernel command line; pass e.g. root=/dev/vda".to_string()
    })?;
    if !root.starts_with('/') {
        return Err(format!(
            "root={root} is not supported by wick-init (no udev here); use a device path such as /dev/vda"
        ));
    }
    let deadline = Instant::now() + cfg.root_wait;
    loop {
        match fs::metadata(&root) {
            Ok(m) if m.file_type().is_block_device() => {
                log.debug(&format!("root device {root} is present"));
                return Ok(root);
            }
            Ok(_) => return Err(format!("root={root} exists but is not a block device")),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => {
                let present: Vec<String> = fs::read_dir("/sys/class/block")
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(format!(
                    "root device {root} did not appear within {} s (block devices present: {}); \
                     check that the disk is attached and its driver module (virtio_blk, virtio_mmio) is in the initramfs",
                    cfg.root_wait.as_secs(),
                    if present.is_empty() { "none".to_string() } else { present.join(", ") }
                ));
            }
        }
    }
}

fn mount_root(log: &Log, cfg: &BootConfig, root: &str) -> Result<(), String> {
    let _ = fs::create_dir_all(NEW_ROOT);
    let flags = if cfg.read_only { libc::MS_RDONLY } else { 0 };
    let mut errors = Vec::new();
    for fstype in &cfg.rootfstype {
        match wick_init::mount(root, NEW_ROOT, fstype, flags, cfg.rootflags.as_deref()) {
            Ok(()) => {
                log.debug(&format!(
                    "mounted {root} ({fstype}, {}) on {NEW_ROOT}",
                    if cfg.read_only { "ro" } else { "rw" }
                ));
                return Ok(());
            }
            Err(e) => errors.push(format!("{fstype}: {e}")),
        }
    }
    Err(format!(
        "cannot mount {root} on {NEW_ROOT} ({}); is rootfstype= right and its driver built in or listed in the initramfs?",
        errors.join("; ")
    ))
}

/// Moves the API filesystems into the new root, frees the initramfs and execs the real init.
/// Only returns with the reason it failed.
fn switch_root(log: &Log, cfg: &BootConfig) -> String {
    if let Err(e) = check_init(cfg) {
        return e;
    }
    if let Err(e) = enter_new_root(log) {
        return e;
    }
    log.debug(&format!("switching root; exec {}", cfg.init));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let err = wick_init::exec(&cfg.init, &args);
    format!("cannot exec {}: {err}", cfg.init)
}

fn check_init(cfg: &BootConfig) -> Result<(), String> {
    let new_root = Path::new(NEW_ROOT);
    let init_rel = cfg.init.trim_start_matches('/');
    match fs::metadata(new_root.join(init_rel)) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => {
            return Err(format!(
                "init={} in the root filesystem is not an executable file",
                cfg.init
            ))
        }
        // A dangling absolute symlink (e.g. /sbin/init -> /lib/systemd/systemd) resolves only
        // after chroot; let execv decide then.
        Err(_) if fs::symlink_metadata(new_root.join(init_rel)).is_ok() => {}
        Err(e) => {
            return Err(format!(
                "init={} not found in the root filesystem ({e}); pass init=PATH or install an init",
                cfg.init
            ))
        }
    }
    Ok(())
}

/// Moves /dev, /proc and /sys into the new root, frees the initramfs and makes the new root
/// `/` (chroot). Returns the reason it failed.
fn enter_new_root(log: &Log) -> Result<(), String> {
    let new_root = Path::new(NEW_ROOT);
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        if Path::new(&target).is_dir() {
            if let Err(e) = wick_init::mount(dir, &target, "", libc::MS_MOVE, None) {
                return Err(format!("cannot move {dir} to {target}: {e}"));
            }
        } else {
            log.say(&format!(
                "{target} is missing in the root filesystem; leaving {dir} unmounted"
            ));
            // SAFETY: valid C string literal-derived path.
            let c = std::ffi::CString::new(dir).expect("no NUL");
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    std::env::set_current_dir(new_root).map_err(|e| format!("cannot chdir to {NEW_ROOT}: {e}"))?;
    free_initramfs(log);
    wick_init::mount(".", "/", "", libc::MS_MOVE, None)
        .map_err(|e| format!("cannot move {NEW_ROOT} to /: {e}"))?;
    wick_init::chroot(Path::new("."))
        .map_err(|e| format!("cannot chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot chdir to / in the new root: {e}"))
}

/// Deletes the initramfs contents (everything on the same filesystem as `/`) to give its memory
/// back; mount points such as /newroot are on other filesystems and are left alone.
fn free_initramfs(log: &Log) {
    if !root_is_ramfs() {
        log.say("/ is not an initramfs (ramfs/tmpfs); not freeing it");
        return;
    }
    let root_dev = match fs::symlink_metadata("/") {
        Ok(m) => m.dev(),
        Err(_) => return,
    };
    fn walk(dir: &Path, dev: u64) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                walk(&path, dev);
                let _ = fs::remove_dir(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
    walk(Path::new("/"), root_dev);
    log.debug("freed the initramfs");
}

fn root_is_ramfs() -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: "/" is a valid C string and st a valid out pointer.
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } != 0 {
        return false;
    }
    let magic = st.f_type as i64;
    magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
}
