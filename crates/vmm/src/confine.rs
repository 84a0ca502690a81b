//! Running a VMM process confined: it drops to the VM's uid (and sets `no_new_privs`) between
//! `fork` and `exec`, so not one instruction of the VMM binary runs as root; the daemon moves
//! it into the VM's cgroup right after the spawn ([`join_cgroup`]), concurrently with the VMM's
//! start-up and always before the driver's `spawn` returns, i.e. before any guest code runs (an
//! attach on cgroup v1 waits for an RCU grace period, 5–12 ms here: done before `exec` it
//! delayed every start by that much). The TAP the VMM needs is opened by the daemon and
//! inherited as a file descriptor (`/dev/net/tun` is root-only).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::{Jail, VmmError};

/// A command for `bin`, to be [`confine`]d when `jail` is given: the binary is then opened by the
/// daemon and executed through `/proc/self/fd/N`, so it need not be reachable by the VMM uid
/// (e.g. a binary in root's home). Keep the returned file until the
/// command has been spawned.
pub fn command(
    bin: &Path,
    jail: Option<&Jail>,
) -> Result<(tokio::process::Command, Option<File>), VmmError> {
    let Some(_) = jail else {
        return Ok((tokio::process::Command::new(bin), None));
    };
    let exe = File::open(bin)
        .map_err(|e| VmmError::BinaryNotFound(format!("cannot open {}: {e}", bin.display())))?;
    let mut cmd = tokio::process::Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    cmd.arg0(bin);
    Ok((cmd, Some(exe)))
}

/// Makes `cmd`'s process set `PR_SET_NO_NEW_PRIVS` and drop every uid and gid to the jail's
/// (supplementary groups: the jail's `groups` only) before `exec`. The caller then moves it into
/// the cgroup with [`join_cgroup`] before the guest runs.
/// `keep_fds` lose their close-on-exec flag in the child (and only there), so the VMM inherits
/// them under the same numbers.
pub fn confine(
    cmd: &mut tokio::process::Command,
    jail: &Jail,
    keep_fds: &[RawFd],
) -> Result<(), VmmError> {
    if jail.uid == 0 || jail.gid == 0 {
        return Err(VmmError::Spawn(
            "refusing to confine a VMM to uid or gid 0".into(),
        ));
    }
    let uid = Uid::from_raw(jail.uid);
    let gid = Gid::from_raw(jail.gid);
    let mut groups: Vec<Gid> = vec![gid];
    groups.extend(jail.groups.iter().map(|g| Gid::from_raw(*g)));
    let keep: Vec<RawFd> = keep_fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes system calls on
    // memory prepared here (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            for fd in &keep {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setresgid(gid, gid, gid)?;
            nix::unistd::setresuid(uid, uid, uid)?;
            Ok(())
        });
    }
    Ok(())
}

/// Moves process `pid` (all its threads) into `jail`'s cgroup. Blocking (an RCU grace period on
/// cgroup v1): run it off the async threads, concurrently with the VMM's start-up.
pub fn join_cgroup(pid: u32, jail: &Jail) -> Result<(), VmmError> {
    for p in &jail.cgroup_procs {
        std::fs::write(p, pid.to_string()).map_err(|e| {
            VmmError::Spawn(format!(
                "cannot move pid {pid} into the VM's cgroup ({}): {e}",
                p.display()
            ))
        })?;
    }
    Ok(())
}

/// [`join_cgroup`] on a blocking thread; `None` without a jail. Await it with [`joined`] before
/// the guest may run.
pub fn join_cgroup_in_background(
    pid: u32,
    jail: Option<&Jail>,
) -> Option<tokio::task::JoinHandle<Result<(), VmmError>>> {
    let jail = jail?.clone();
    Some(tokio::task::spawn_blocking(move || join_cgroup(pid, &jail)))
}

/// Waits for a [`join_cgroup_in_background`].
pub async fn joined(
    handle: Option<tokio::task::JoinHandle<Result<(), VmmError>>>,
) -> Result<(), VmmError> {
    match handle {
        None => Ok(()),
        Some(h) => h
            .await
            .map_err(|e| VmmError::Spawn(format!("joining the VM's cgroup: {e}")))?,
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (40 bytes in all).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` attached to the existing TAP `name` (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`), close-on-exec: an unprivileged VMM gets it by inheritance.
pub fn open_tap(name: &str) -> Result<OwnedFd, VmmError> {
    let err = |what: String| VmmError::Spawn(format!("TAP {name}: {what}"));
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(err("not a valid interface name".into()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/net/tun"))
        .map_err(|e| err(format!("cannot open /dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write) one `struct ifreq`, which `req` is.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc != 0 {
        return Err(err(format!(
            "TUNSETIFF: {} (does the TAP exist?)",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: we own `f`'s descriptor and hand it over.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) })
}

/// Gives `path` to the jail's uid (`lchown`, never following a link). For files the daemon
/// creates for the VMM (logs it must append to).
pub fn chown_to(path: &Path, jail: &Jail) -> Result<(), VmmError> {
    std::os::unix::fs::lchown(path, Some(jail.uid), Some(jail.gid)).map_err(|e| {
        VmmError::Spawn(format!(
            "cannot give {} to uid {}: {e}",
            path.display(),
            jail.uid
        ))
    })
}
