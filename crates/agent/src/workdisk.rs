//! The work disk on `/root`, mounted by the agent itself when the image asks for it: an
//! `/etc/fstab` line for `/root` carrying the `x-wick-agent` option (the golden image's, with
//! `noauto` so systemd leaves it alone). The agent needs `/root` before it serves Configure
//! (authorized_keys, synced files), and mounting the device node here — present as soon as the
//! kernel's virtio-blk driver has probed it — does not wait for udev to announce the device,
//! which under TCG was most of the boot. systemd still sees the mount (`root.mount`) and
//! unmounts it at shutdown.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// The fstab option that asks the agent to mount an entry.
pub const OPTION: &str = "x-wick-agent";

/// How long the agent waits for the work disk's device node.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// An fstab entry the agent mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub device: String,
    pub fstype: String,
    /// `MS_*` flags from the options.
    pub flags: libc::c_ulong,
    /// Filesystem-specific options, comma separated.
    pub data: String,
}

/// The `/root` entry of `fstab` that carries [`OPTION`], if any.
pub fn root_entry(fstab: &str) -> Option<Entry> {
    fstab
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (device, target, fstype, opts) = (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?);
            if *target != "/root" || !opts.split(',').any(|o| o == OPTION) {
                return None;
            }
            if !device.starts_with("/dev/") || device.contains("..") {
                return None;
            }
            let (flags, data) = mount_options(opts);
            Some(Entry {
                device: device.to_string(),
                fstype: fstype.to_string(),
                flags,
                data,
            })
        })
}

/// Splits fstab options into `MS_*` flags and filesystem data; mount(8)'s and systemd's own
/// options (`defaults`, `noauto`, `nofail`, `x-*`, …) are dropped.
fn mount_options(opts: &str) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for o in opts.split(',') {
        match o {
            "ro" => flags |= libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "" | "defaults" | "rw" | "auto" | "noauto" | "nofail" | "user" | "nouser" | "exec"
            | "suid" | "dev" | "atime" => {}
            o if o.starts_with("x-") || o.starts_with("comment=") => {}
            o => data.push(o),
        }
    }
    (flags, data.join(","))
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Mounts the work disk on `/root` if the image's fstab asks the agent to and it is not mounted
/// yet. Returns what it did, for the log.
pub fn mount() -> Result<Option<String>, String> {
    let fstab = match fs::read_to_string("/etc/fstab") {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let Some(e) = root_entry(&fstab) else {
        return Ok(None);
    };
    let target = Path::new("/root");
    if is_mount_point(target) {
        return Ok(None);
    }
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        match fs::metadata(&e.device) {
            Ok(m) if m.file_type().is_block_device() => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                return Err(format!(
                    "the work disk {} did not appear within {DEVICE_WAIT:?}: /root stays on the root disk",
                    e.device
                ))
            }
        }
    }
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains NUL"));
    let (src, dst, fstype, data) = (c(&e.device)?, c("/root")?, c(&e.fstype)?, c(&e.data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            e.flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(format!(
            "mounting {} ({}) on /root: {}",
            e.device,
            e.fstype,
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some(format!("mounted the work disk {} on /root", e.device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_the_opted_in_root_entry() {
        let fstab = "# comment\n/dev/vda / ext4 defaults 0 1\n\
                     /dev/vdb /root ext4 defaults,noauto,nofail,x-wick-agent,noatime,discard 0 0\n";
        assert_eq!(
            root_entry(fstab),
            Some(Entry {
                device: "/dev/vdb".into(),
                fstype: "ext4".into(),
                flags: libc::MS_NOATIME,
                data: "discard".into(),
            })
        );
        // A plain /root line is systemd's business; other targets and odd devices are ignored.
        assert_eq!(
            root_entry("/dev/vdb /root ext4 defaults,nofail 0 2\n"),
            None
        );
        assert_eq!(root_entry("/dev/vdb /srv ext4 x-wick-agent 0 0\n"), None);
        assert_eq!(root_entry("LABEL=work /root ext4 x-wick-agent 0 0\n"), None);
        assert_eq!(root_entry("/dev/vdb /root ext4\n"), None);
    }
}
