//! wick-init-probe: a stand-in `/sbin/init` for boot tests of wick's initramfs.
//!
//! Put it at `/sbin/init` in a root filesystem: once the kernel (through wick-init) has switched
//! to that root it prints `WICK-ROOT-OK` plus what it sees (root mount, loaded modules) on the
//! console and powers the machine off. Reaching the marker proves the modules loaded, the root disk
//! mounted and `switch_root` worked. Build it static like wick-init.

use std::fs;
use std::time::Duration;

/// The line a boot test waits for on the serial console.
const MARKER: &str = "WICK-ROOT-OK";

fn main() {
    let root = fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.split_whitespace().nth(1) == Some("/"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown (is /proc mounted?)".to_string());
    let modules: Vec<String> = fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let initramfs_left = fs::metadata("/etc/wick-init/modules").is_ok();
    println!("wick-init-probe: pid {}", std::process::id());
    println!("wick-init-probe: root mount: {root}");
    println!("wick-init-probe: modules: {}", modules.join(" "));
    println!("wick-init-probe: initramfs files visible: {initramfs_left}");
    println!("{MARKER}");
    if std::process::id() == 1 {
        std::thread::sleep(Duration::from_millis(100));
        let err = wick_init::stop_machine(wick_init::FailAction::PowerOff);
        eprintln!("wick-init-probe: could not power off: {err}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
