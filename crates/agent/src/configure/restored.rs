//! `Configure::restored`: what a guest restored from a snapshot (a fork, a restore, a suspended
//! VM coming back) must not keep from the state it was saved in — its clock, its kernel RNG
//! state, its machine-id and its MAC. Applied before every other step of `Configure`; the
//! network step then also drops the source's addresses and neighbour entries.
//!
//! The clock, the RNG and the MAC are live-only (skipped with a warning under a test root); the
//! machine-id is a file, written below [`Ctx::root`].

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wick_agent_proto::{parse_mac, ConfigureReply};

use super::{err, first_interface, netlink, write_file};
use crate::server::Ctx;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` (linux/random.h).
const RNDADDENTROPY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>());
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (linux/random.h, Linux 4.17+).
const RNDRESEEDCRNG: nix::sys::ioctl::ioctl_num_type = nix::request_code_none!(b'R', 0x07);

/// Steps `CLOCK_REALTIME` to the host's wall clock (`unix_time_ns`).
pub(super) fn clock(ctx: &Ctx, unix_time_ns: u64, out: &mut ConfigureReply) -> Result<(), String> {
    if !ctx.live {
        out.warnings
            .push("clock: not live, the guest clock left alone".into());
        return Ok(());
    }
    let host = Duration::from_nanos(unix_time_ns);
    let ts = libc::timespec {
        tv_sec: host.as_secs() as libc::time_t,
        tv_nsec: host.subsec_nanos() as _,
    };
    let before = SystemTime::now();
    // SAFETY: a valid timespec; the call only reads it.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "clock_settime(CLOCK_REALTIME): {}",
            io::Error::last_os_error()
        ));
    }
    let was = before
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    out.changed.push(format!(
        "clock stepped by {:+.3} s to the host's time",
        host.as_secs_f64() - was
    ));
    Ok(())
}

/// Mixes `entropy` into the kernel's pool, credited (`RNDADDENTROPY`), then forces a CRNG
/// reseed (`RNDRESEEDCRNG`), so the guest's random numbers stop following its source's.
pub(super) fn reseed(ctx: &Ctx, entropy: &[u8], out: &mut ConfigureReply) -> Result<(), String> {
    if !ctx.live {
        out.warnings
            .push("entropy: not live, the kernel RNG left alone".into());
        return Ok(());
    }
    let dev = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = 2 + entropy.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a valid rand_pool_info of `buf_size` bytes; the kernel only reads it.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(format!("RNDADDENTROPY: {}", io::Error::last_os_error()));
    }
    // SAFETY: an argument-less ioctl on our own fd.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(format!("RNDRESEEDCRNG: {}", io::Error::last_os_error()));
    }
    out.changed.push(format!(
        "kernel RNG: {} bytes of host entropy added, CRNG reseeded",
        entropy.len()
    ));
    Ok(())
}

/// Writes `/etc/machine-id`, and `/var/lib/dbus/machine-id` when that is a regular file (on
/// Debian it is a link to the first).
pub(super) fn machine_id(ctx: &Ctx, id: &str, out: &mut ConfigureReply) -> Result<(), String> {
    let text = format!("{id}\n");
    fs::create_dir_all(ctx.path("/etc")).map_err(err("creating", &ctx.path("/etc")))?;
    let path = ctx.path("/etc/machine-id");
    if write_file(&path, text.as_bytes(), 0o444).map_err(err("writing", &path))? {
        out.changed.push(format!("machine-id set to {id}"));
    }
    let dbus = ctx.path("/var/lib/dbus/machine-id");
    if fs::symlink_metadata(&dbus).is_ok_and(|m| m.is_file())
        && write_file(&dbus, text.as_bytes(), 0o444).map_err(err("writing", &dbus))?
    {
        out.changed.push("/var/lib/dbus/machine-id set".into());
    }
    Ok(())
}

/// Gives the guest's NIC the MAC `mac`: link down, address, up (`ip`, or rtnetlink without it).
pub(super) fn mac(ctx: &Ctx, mac: &str, out: &mut ConfigureReply) -> Result<(), String> {
    let bytes = parse_mac(mac)?;
    let want = mac.to_ascii_lowercase();
    if !ctx.live {
        out.warnings.push(format!(
            "mac: not live, the NIC's address left alone (wanted {want})"
        ));
        return Ok(());
    }
    let iface = first_interface()?;
    let current = fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if current == want {
        return Ok(());
    }
    let steps: [&[&str]; 3] = [
        &["link", "set", "dev", &iface, "down"],
        &["link", "set", "dev", &iface, "address", &want],
        &["link", "set", "dev", &iface, "up"],
    ];
    for args in steps {
        let o = match Command::new("ip").args(args).output() {
            Ok(o) => o,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                netlink::set_mac(&iface, &bytes)?;
                break;
            }
            Err(e) => return Err(format!("cannot run ip: {e}")),
        };
        if !o.status.success() {
            return Err(format!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    out.changed
        .push(format!("{iface}: MAC {current} replaced by {want}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn ctx(root: &std::path::Path) -> Ctx {
        Ctx {
            root: root.to_path_buf(),
            live: false,
            poweroff: false,
        }
    }

    #[test]
    fn machine_id_is_written_under_the_root_and_dbus_only_as_a_file() {
        let d = tempfile::tempdir().unwrap();
        let ctx = ctx(d.path());
        fs::create_dir_all(d.path().join("var/lib/dbus")).unwrap();
        // Debian's layout: the dbus file links to /etc/machine-id (here: somewhere else, which
        // must not be written through).
        let elsewhere = d.path().join("elsewhere");
        fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.path().join("var/lib/dbus/machine-id")).unwrap();
        let id = "0123456789abcdef0123456789abcdef";
        let mut out = ConfigureReply::default();
        machine_id(&ctx, id, &mut out).unwrap();
        let etc = d.path().join("etc/machine-id");
        assert_eq!(fs::read_to_string(&etc).unwrap(), format!("{id}\n"));
        assert_eq!(
            fs::metadata(&etc).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "untouched");
        assert!(out.changed.iter().any(|c| c.contains(id)), "{out:?}");
        // A regular dbus copy is kept in step; the same id again changes nothing.
        fs::remove_file(d.path().join("var/lib/dbus/machine-id")).unwrap();
        fs::write(d.path().join("var/lib/dbus/machine-id"), "old\n").unwrap();
        let mut again = ConfigureReply::default();
        machine_id(&ctx, id, &mut again).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("var/lib/dbus/machine-id")).unwrap(),
            format!("{id}\n")
        );
        assert_eq!(again.changed, ["/var/lib/dbus/machine-id set"]);
        let mut same = ConfigureReply::default();
        machine_id(&ctx, id, &mut same).unwrap();
        assert!(same.changed.is_empty(), "{same:?}");
    }

    #[test]
    fn live_only_steps_are_skipped_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let ctx = ctx(d.path());
        let mut out = ConfigureReply::default();
        clock(&ctx, 1, &mut out).unwrap();
        reseed(&ctx, &[0; 32], &mut out).unwrap();
        mac(&ctx, "06:00:AC:1E:00:07", &mut out).unwrap();
        assert!(out.changed.is_empty(), "{out:?}");
        assert_eq!(out.warnings.len(), 3, "{out:?}");
        assert!(
            out.warnings.iter().all(|w| w.contains("not live")),
            "{out:?}"
        );
        assert!(out.warnings[2].contains("06:00:ac:1e:00:07"), "{out:?}");
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }
}
