//! `Freeze`/`Thaw`: the guest's filesystems frozen (FIFREEZE) while the host snapshots the VM,
//! so the cloned disks are clean on their own; thawed (FITHAW) after. Frozen filesystems are
//! remembered here, and a watchdog thaws them after [`FREEZE_MAX_SECS`] if the host never
//! says `Thaw` (it may have died mid-snapshot). Not live (tests, `--root-prefix`): refused,
//! nothing is frozen. Nothing here writes to a filesystem while it is frozen.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use wick_agent_proto::{RemoteError, Reply, FREEZE_MAX_MOUNTS, FREEZE_MAX_SECS};

// _IOWR('X', 119, int) and _IOWR('X', 120, int), from <linux/fs.h>.
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// What this agent froze, and a generation so a stale watchdog leaves a newer freeze alone.
static FROZEN: Mutex<(u64, Vec<String>)> = Mutex::new((0, Vec::new()));

fn check(mountpoints: &[String]) -> Result<(), RemoteError> {
    if mountpoints.len() > FREEZE_MAX_MOUNTS {
        return Err(RemoteError::new(format!(
            "at most {FREEZE_MAX_MOUNTS} mount points, got {}",
            mountpoints.len()
        )));
    }
    if let Some(bad) = mountpoints.iter().find(|m| !m.starts_with('/')) {
        return Err(RemoteError::new(format!("{bad:?} is not an absolute path")));
    }
    Ok(())
}

fn ioctl_on(path: &str, thaw: bool) -> nix::Result<()> {
    let dir = std::fs::File::open(path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: the fd is open; the kernel ignores the int argument of FIFREEZE/FITHAW.
    unsafe {
        if thaw {
            fithaw(dir.as_raw_fd(), &mut arg)
        } else {
            fifreeze(dir.as_raw_fd(), &mut arg)
        }
    }
    .map(drop)
}

/// Freezes each mount point (deepest first, so `/root` before `/`); a filesystem already frozen
/// (`EBUSY`, e.g. `/root` on the root filesystem) is skipped. On an error the ones frozen are
/// thawed again.
pub fn freeze(live: bool, mountpoints: &[String]) -> Reply<Vec<String>> {
    if !live {
        return Err(RemoteError::new("not live: filesystems are not frozen"));
    }
    check(mountpoints)?;
    let mut order: Vec<String> = mountpoints.to_vec();
    order.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let mut done = Vec::new();
    for m in order {
        match ioctl_on(&m, false) {
            Ok(()) => done.push(m),
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => {
                for f in done.iter().rev() {
                    let _ = ioctl_on(f, true);
                }
                return Err(RemoteError::new(format!("cannot freeze {m}: {e}")));
            }
        }
    }
    let generation = {
        let mut g = FROZEN.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        g.1.extend(done.iter().cloned());
        g.0
    };
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(FREEZE_MAX_SECS));
        let stale = {
            let g = FROZEN.lock().unwrap_or_else(|e| e.into_inner());
            g.0 == generation && !g.1.is_empty()
        };
        if stale {
            let all = FROZEN.lock().map(|g| g.1.clone()).unwrap_or_default();
            let _ = thaw(&all);
        }
    });
    Ok(done)
}

/// Thaws each mount point this agent froze (others are skipped, never thawed: a freeze the
/// agent did not make is not its to undo).
pub fn thaw(mountpoints: &[String]) -> Reply<Vec<String>> {
    check(mountpoints)?;
    let mut g = FROZEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut thawed = Vec::new();
    for m in mountpoints {
        if let Some(i) = g.1.iter().position(|f| f == m) {
            match ioctl_on(m, true) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {
                    g.1.remove(i);
                    thawed.push(m.clone());
                }
                Err(e) => return Err(RemoteError::new(format!("cannot thaw {m}: {e}"))),
            }
        }
    }
    g.0 += 1;
    Ok(thawed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_live_freezes_nothing_and_bad_requests_are_refused() {
        let e = freeze(false, &["/".into()]).unwrap_err();
        assert!(e.message.contains("not live"), "{e}");
        let many: Vec<String> = (0..9).map(|i| format!("/m{i}")).collect();
        assert!(thaw(&many).unwrap_err().message.contains("at most 8"));
        assert!(thaw(&["relative".into()]).is_err());
        // Nothing was frozen by this agent: nothing is thawed.
        assert_eq!(thaw(&["/".into()]).unwrap(), Vec::<String>::new());
    }
}
