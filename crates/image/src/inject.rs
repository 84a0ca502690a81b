//! Writing wick's own files into a root directory: the guest agent and its systemd unit, plus
//! the small file/symlink helpers the golden build uses. Writes never follow symlinks inside the
//! root (an image could point `/usr/local` anywhere on the host).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{ImageError, IoContext, Result};
use crate::extract::{relative, safe_path};

/// Where the agent lives in the guest.
pub const AGENT_PATH: &str = "usr/local/bin/wick-agent";
/// The agent's unit file in the guest.
pub const AGENT_UNIT_PATH: &str = "etc/systemd/system/wick-agent.service";

/// The agent's systemd unit: one definition, shared with the agent's own crate.
pub(crate) const AGENT_UNIT: &str = wick_agent_proto::SYSTEMD_UNIT;

/// Writes `bytes` to `root/rel` with `mode`, owned by root, replacing whatever was there.
pub(crate) fn write_file(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let path = safe_path(root, &relative(Path::new(rel))?, true)?;
    if fs::symlink_metadata(&path).is_ok() {
        remove(&path)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .ctx("create", &path)?;
    f.write_all(bytes).ctx("write", &path)?;
    if crate::util::is_root() {
        std::os::unix::fs::fchown(&f, Some(0), Some(0)).ctx("chown", &path)?;
    }
    f.set_permissions(fs::Permissions::from_mode(mode))
        .ctx("chmod", &path)
}

/// Creates the symlink `root/rel -> target`, replacing whatever was there.
pub(crate) fn symlink(root: &Path, rel: &str, target: &str) -> Result<()> {
    let path = safe_path(root, &relative(Path::new(rel))?, true)?;
    if fs::symlink_metadata(&path).is_ok() {
        remove(&path)?;
    }
    std::os::unix::fs::symlink(target, &path).ctx("create symlink", &path)
}

/// Removes `root/rel` if it exists (never following a symlink in its path).
pub(crate) fn remove_in(root: &Path, rel: &str) -> Result<()> {
    let path = safe_path(root, &relative(Path::new(rel))?, false)?;
    if fs::symlink_metadata(&path).is_ok() {
        remove(&path)?;
    }
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    let m = fs::symlink_metadata(path).ctx("stat", path)?;
    if m.is_dir() {
        fs::remove_dir_all(path).ctx("remove", path)
    } else {
        fs::remove_file(path).ctx("remove", path)
    }
}

/// Copies the agent binary to `/usr/local/bin/wick-agent` and installs and enables its unit.
pub(crate) fn inject_agent(root: &Path, agent_bin: &Path) -> Result<()> {
    let bytes = fs::read(agent_bin).map_err(|e| {
        ImageError::io(
            format!(
                "read the wick-agent binary {} (build it, or pass its path)",
                agent_bin.display()
            ),
            e,
        )
    })?;
    write_file(root, AGENT_PATH, &bytes, 0o755)?;
    write_file(root, AGENT_UNIT_PATH, AGENT_UNIT.as_bytes(), 0o644)?;
    symlink(
        root,
        "etc/systemd/system/multi-user.target.wants/wick-agent.service",
        "/etc/systemd/system/wick-agent.service",
    )?;
    add_work_disk_line(root)
}

/// The work disk's fstab line: wick-agent mounts `/dev/vdb` on `/root` itself when the line is
/// marked `x-wick-agent` (with or without systemd); `noauto` keeps systemd from mounting it too.
pub const WORK_DISK_FSTAB_LINE: &str =
    "/dev/vdb /root ext4 defaults,noauto,nofail,x-wick-agent 0 0";

/// Appends [`WORK_DISK_FSTAB_LINE`] to the image's `/etc/fstab` unless it already mounts
/// `/root`. A non-regular `/etc/fstab` (a symlink could point at the builder's own) is replaced.
fn add_work_disk_line(root: &Path) -> Result<()> {
    let path = safe_path(root, Path::new("etc/fstab"), true)?;
    let current = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => fs::read_to_string(&path).ctx("read", &path)?,
        _ => String::new(),
    };
    let mounts_root = current.lines().any(|l| {
        let l = l.trim();
        !l.starts_with('#') && l.split_whitespace().nth(1) == Some("/root")
    });
    if mounts_root {
        return Ok(());
    }
    let mut text = current;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# wick: the per-VM work disk, mounted on /root by wick-agent\n");
    text.push_str(WORK_DISK_FSTAB_LINE);
    text.push('\n');
    write_file(root, "etc/fstab", text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_is_installed_and_enabled() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("fake-wick-agent");
        fs::write(&agent, b"#!/bin/sh\n").unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        inject_agent(&root, &agent).unwrap();
        assert_eq!(fs::read(root.join(AGENT_PATH)).unwrap(), b"#!/bin/sh\n");
        let unit = fs::read_to_string(root.join(AGENT_UNIT_PATH)).unwrap();
        assert!(unit.contains("Restart=always") && unit.contains("root.mount"));
        assert!(root
            .join("etc/systemd/system/multi-user.target.wants/wick-agent.service")
            .symlink_metadata()
            .is_ok());
    }

    #[test]
    fn injects_into_images_without_systemd_usr_local_or_a_real_sbin() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        fs::write(&agent, b"agent").unwrap();
        let root = d.path().join("root");
        // busybox-style, usrmerge: /sbin -> usr/sbin, no /usr/local, no /etc/systemd.
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
        fs::write(root.join("etc/fstab"), "/dev/vda / ext4 defaults 0 1").unwrap();
        inject_agent(&root, &agent).unwrap();
        assert_eq!(fs::read(root.join(AGENT_PATH)).unwrap(), b"agent");
        let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
        assert!(
            fstab.starts_with("/dev/vda / ext4 defaults 0 1\n"),
            "{fstab}"
        );
        assert!(fstab.ends_with(&format!("{WORK_DISK_FSTAB_LINE}\n")));
        // Idempotent, and an image's own /root line is kept.
        inject_agent(&root, &agent).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/fstab")).unwrap(), fstab);
        fs::write(root.join("etc/fstab"), "LABEL=x /root xfs defaults 0 0\n").unwrap();
        inject_agent(&root, &agent).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/fstab")).unwrap(),
            "LABEL=x /root xfs defaults 0 0\n"
        );
        // An fstab symlink (to the builder's own) is replaced, never read.
        let host = d.path().join("host-fstab");
        fs::write(&host, "/dev/sda1 /root ext4 defaults 0 0\n").unwrap();
        fs::remove_file(root.join("etc/fstab")).unwrap();
        std::os::unix::fs::symlink(&host, root.join("etc/fstab")).unwrap();
        inject_agent(&root, &agent).unwrap();
        let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
        assert!(!fstab.contains("sda1") && fstab.contains(WORK_DISK_FSTAB_LINE));
        assert_eq!(
            fs::read_to_string(&host).unwrap(),
            "/dev/sda1 /root ext4 defaults 0 0\n"
        );
    }

    #[test]
    fn writes_never_follow_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        fs::create_dir_all(root.join("usr")).unwrap();
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("usr/local")).unwrap();
        assert!(write_file(&root, AGENT_PATH, b"x", 0o755).is_err());
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
    }
}
