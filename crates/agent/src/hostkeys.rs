//! SSH host keys and sshd: the agent installs the host keys wickd made for this VM (it never
//! generates any), removes every other `ssh_host_*` file, and starts sshd once they are in place
//! (queued without waiting: `wick vm ssh` and `wick vm ssh-proxy` wait for its port instead).
//!
//! Files are written below [`Ctx::root`]; sshd is started only when [`Ctx::live`] is set.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use wick_agent_proto::{ConfigureReply, HostKey};

use crate::configure::write_file;
use crate::server::Ctx;

/// The host key types sshd knows (its file names are `ssh_host_<kind>_key`).
const KINDS: [&str; 4] = ["ed25519", "ecdsa", "rsa", "dsa"];

/// sshd drop-in naming exactly the installed keys, so sshd does not look for the others.
const DROPIN: &str = "/etc/ssh/sshd_config.d/wick-host-keys.conf";

/// Rejects host keys that would write anything but one sshd key pair each.
pub(crate) fn validate(keys: &[HostKey]) -> Result<(), String> {
    if keys.is_empty() {
        return Err("host keys: an empty set (sshd needs at least one)".into());
    }
    for (i, k) in keys.iter().enumerate() {
        if !KINDS.contains(&k.kind.as_str()) {
            return Err(format!(
                "host keys: unknown key type {:?} (expected one of {})",
                k.kind,
                KINDS.join(", ")
            ));
        }
        if keys[..i].iter().any(|o| o.kind == k.kind) {
            return Err(format!("host keys: two {} keys", k.kind));
        }
        if !k.private.starts_with("-----BEGIN ") || k.private.contains('\0') {
            return Err(format!(
                "host keys: the {} private key is not a PEM file",
                k.kind
            ));
        }
        let public = k.public.trim();
        if public.is_empty() || public.contains(['\n', '\r', '\0']) {
            return Err(format!(
                "host keys: the {} public key is not one line",
                k.kind
            ));
        }
    }
    Ok(())
}

fn key_path(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("ssh_host_{kind}_key"))
}

/// Applies the host-key part of `Configure`: installs `keys` when given, reports the public
/// keys now in `/etc/ssh`, and (live) queues sshd's start or restart without waiting for it:
/// sshd comes up while the guest is already in use (`wick vm ssh` and `wick vm ssh-proxy`
/// wait for its port), so no create pays for it.
pub(crate) fn apply(
    ctx: &Ctx,
    keys: Option<&[HostKey]>,
    out: &mut ConfigureReply,
) -> Result<(), String> {
    let dir = ctx.path("/etc/ssh");
    if !dir.is_dir() {
        out.warnings.push(
            "no /etc/ssh in the guest (openssh-server not installed): host keys skipped".into(),
        );
        return Ok(());
    }
    let changed = match keys {
        Some(keys) => install(ctx, &dir, keys, out)?,
        None => false,
    };
    out.host_keys = public_keys(&dir)?;
    if out.host_keys.is_empty() {
        out.warnings
            .push("the guest has no SSH host keys: sshd not started".into());
        return Ok(());
    }
    if ctx.live {
        start_sshd(changed, out);
    } else {
        out.warnings.push("ssh: not live, sshd not started".into());
    }
    Ok(())
}

/// Writes `keys` (private 0600, public 0644), removes every other `ssh_host_*` file and names
/// the keys in sshd's drop-in. Returns whether anything changed.
fn install(
    ctx: &Ctx,
    dir: &Path,
    keys: &[HostKey],
    out: &mut ConfigureReply,
) -> Result<bool, String> {
    let mut changed = false;
    let mut keep = Vec::new();
    for k in keys {
        let private = key_path(dir, &k.kind);
        let public = private.with_extension("pub");
        let text = format!("{}\n", k.public.trim());
        changed |= write_file(&private, k.private.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", private.display()))?;
        changed |= write_file(&public, text.as_bytes(), 0o644)
            .map_err(|e| format!("writing {}: {e}", public.display()))?;
        keep.extend([private, public]);
    }
    for entry in fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let path = entry.path();
        let stale =
            entry.file_name().to_string_lossy().starts_with("ssh_host_") && !keep.contains(&path);
        if stale {
            match fs::remove_file(&path) {
                Ok(()) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", path.display())),
            }
        }
    }
    let dropin_dir = ctx.path("/etc/ssh/sshd_config.d");
    if dropin_dir.is_dir() {
        let mut text = String::from("# wick: the host keys wickd made for this VM.\n");
        for k in keys {
            text.push_str(&format!("HostKey /etc/ssh/ssh_host_{}_key\n", k.kind));
        }
        let path = ctx.path(DROPIN);
        changed |= write_file(&path, text.as_bytes(), 0o644)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if changed {
        let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
        out.changed
            .push(format!("ssh host keys installed ({})", kinds.join(", ")));
    }
    Ok(changed)
}

/// The public keys in `dir` (`ssh_host_*_key.pub`), sorted by file name.
fn public_keys(dir: &Path) -> Result<Vec<String>, String> {
    let mut pubs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("ssh_host_") && n.ends_with("_key.pub")
        })
        .collect();
    pubs.sort();
    Ok(pubs
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Queues sshd's start (a restart when it runs and its keys changed) without waiting:
/// `--no-block` only queues the job.
fn start_sshd(keys_changed: bool, out: &mut ConfigureReply) {
    if !Path::new("/run/systemd/system").exists() && crate::server::pid1::is_wick_init() {
        // wick-init supervises sshd: it (re)starts it, so new keys are read.
        return match crate::server::pid1::request(crate::server::pid1::Request::Sshd) {
            Ok(()) => out
                .changed
                .push("sshd: start requested from wick-init".into()),
            Err(e) => out
                .warnings
                .push(format!("cannot ask wick-init to start sshd: {e}")),
        };
    }
    if !Path::new("/run/systemd/system").exists() {
        return out.warnings.push(
            "systemd is not running: start sshd yourself (its host keys are in /etc/ssh)".into(),
        );
    }
    for unit in ["ssh.service", "sshd.service"] {
        // A restart only when sshd already runs with other keys: a restart of a start job in
        // progress (the boot's own, whose condition the new key just met) kills its
        // `sshd -t` and starts over.
        let verb = match keys_changed && is_active(unit) {
            true => "restart",
            false => "start",
        };
        match Command::new("systemctl")
            .args([verb, "--no-block", unit])
            .output()
        {
            Ok(o) if o.status.success() => {
                return out.changed.push(format!("{unit}: {verb} queued"));
            }
            Ok(_) => continue,
            Err(e) => return out.warnings.push(format!("cannot run systemctl: {e}")),
        }
    }
    out.warnings
        .push("could not start sshd (neither ssh.service nor sshd.service)".into());
}

/// Whether systemd reports `unit` active.
fn is_active(unit: &str) -> bool {
    Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key(kind: &str, n: u8) -> HostKey {
        HostKey {
            kind: kind.into(),
            private: format!("-----BEGIN OPENSSH PRIVATE KEY-----\nprivate{n}\n-----END OPENSSH PRIVATE KEY-----\n"),
            public: format!("ssh-{kind} AAAA{n} wick"),
        }
    }

    fn ctx(root: &Path) -> Ctx {
        Ctx {
            root: root.to_path_buf(),
            live: false,
            poweroff: false,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn installs_exactly_the_given_keys_with_private_modes() {
        let d = tempfile::tempdir().unwrap();
        let ssh = d.path().join("etc/ssh");
        fs::create_dir_all(ssh.join("sshd_config.d")).unwrap();
        // What an image may ship: other key types, and a stale key of the same type.
        for f in [
            "ssh_host_rsa_key",
            "ssh_host_rsa_key.pub",
            "ssh_host_ed25519_key",
        ] {
            fs::write(ssh.join(f), "old").unwrap();
        }
        fs::write(ssh.join("sshd_config"), "keep me").unwrap();
        let ctx = ctx(d.path());
        let keys = [key("ed25519", 1)];
        let mut out = ConfigureReply::default();
        apply(&ctx, Some(&keys), &mut out).unwrap();
        let private = ssh.join("ssh_host_ed25519_key");
        assert_eq!(fs::read_to_string(&private).unwrap(), keys[0].private);
        assert_eq!(mode(&private), 0o600);
        let public = ssh.join("ssh_host_ed25519_key.pub");
        assert_eq!(
            fs::read_to_string(&public).unwrap(),
            "ssh-ed25519 AAAA1 wick\n"
        );
        assert_eq!(mode(&public), 0o644);
        assert!(!ssh.join("ssh_host_rsa_key").exists());
        assert!(!ssh.join("ssh_host_rsa_key.pub").exists());
        assert_eq!(
            fs::read_to_string(ssh.join("sshd_config")).unwrap(),
            "keep me"
        );
        let dropin = fs::read_to_string(ssh.join("sshd_config.d/wick-host-keys.conf")).unwrap();
        assert!(
            dropin.contains("HostKey /etc/ssh/ssh_host_ed25519_key\n"),
            "{dropin}"
        );
        assert!(!dropin.contains("rsa"));
        assert_eq!(out.host_keys, ["ssh-ed25519 AAAA1 wick"]);
        assert!(
            out.changed
                .iter()
                .any(|c| c.contains("host keys installed")),
            "{out:?}"
        );
        assert!(
            out.warnings.iter().any(|w| w.contains("not live")),
            "{out:?}"
        );

        // The same keys again: nothing changes. New keys replace the old ones.
        let mut again = ConfigureReply::default();
        apply(&ctx, Some(&keys), &mut again).unwrap();
        assert!(again.changed.is_empty(), "{again:?}");
        let mut next = ConfigureReply::default();
        apply(&ctx, Some(&[key("ed25519", 2)]), &mut next).unwrap();
        assert_eq!(next.host_keys, ["ssh-ed25519 AAAA2 wick"]);
        assert!(fs::read_to_string(&private).unwrap().contains("private2"));
    }

    #[test]
    fn none_keeps_the_guest_keys_and_reports_them() {
        let d = tempfile::tempdir().unwrap();
        let ssh = d.path().join("etc/ssh");
        fs::create_dir_all(&ssh).unwrap();
        fs::write(
            ssh.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAx old\n",
        )
        .unwrap();
        let mut out = ConfigureReply::default();
        apply(&ctx(d.path()), None, &mut out).unwrap();
        assert_eq!(out.host_keys, ["ssh-ed25519 AAAAx old"]);
        assert!(out.changed.is_empty());
    }

    #[test]
    fn a_symlinked_key_file_is_replaced_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let ssh = d.path().join("etc/ssh");
        fs::create_dir_all(&ssh).unwrap();
        let target = d.path().join("elsewhere");
        fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, ssh.join("ssh_host_ed25519_key")).unwrap();
        let mut out = ConfigureReply::default();
        apply(&ctx(d.path()), Some(&[key("ed25519", 1)]), &mut out).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(mode(&ssh.join("ssh_host_ed25519_key")), 0o600);
    }

    #[test]
    fn no_openssh_is_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let mut out = ConfigureReply::default();
        apply(&ctx(d.path()), Some(&[key("ed25519", 1)]), &mut out).unwrap();
        assert!(out.warnings.iter().any(|w| w.contains("openssh-server")));
    }

    #[test]
    fn validation() {
        assert!(validate(&[key("ed25519", 1)]).is_ok());
        assert!(validate(&[]).is_err());
        assert!(validate(&[key("../../etc/passwd", 1)]).is_err());
        assert!(validate(&[key("ed25519", 1), key("ed25519", 2)]).is_err());
        let mut k = key("ed25519", 1);
        k.public = "ssh-ed25519 AAAA\nPermitRootLogin yes".into();
        assert!(validate(&[k]).is_err());
        let mut k = key("ed25519", 1);
        k.private = "not a key".into();
        assert!(validate(&[k]).is_err());
    }
}
