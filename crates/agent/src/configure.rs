//! `Configure`: hostname, network, resolvers, authorized keys, git identity, synced files and SSH
//! host keys (`hostkeys`), applied idempotently (unchanged things are left untouched and not
//! reported); after a restore, first the new clock, RNG seed, machine-id and MAC (`restored`).
//!
//! Files are written below [`Ctx::root`] (`/` in a guest). Changes to the running system —
//! `sethostname`, `ip` commands, starting sshd — happen only when [`Ctx::live`] is set; tests
//! run with a temporary root and `live = false`, so they never touch the host.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use wick_agent_proto::{Configure, ConfigureReply, NetworkConfig, RemoteError, Reply, SyncFile};

use crate::server::Ctx;

mod netlink;
mod restored;

const KEYS_BEGIN: &str = "# wick: managed keys begin (edit outside this block)";
const KEYS_END: &str = "# wick: managed keys end";

/// Applies `cfg`. Every step runs even if an earlier one failed; failures are reported together.
pub fn apply(ctx: &Ctx, cfg: &Configure) -> Reply<ConfigureReply> {
    validate(cfg).map_err(RemoteError::new)?;
    let mut out = ConfigureReply::default();
    let mut failures = Vec::new();
    let mut step = |name: &str, r: Result<(), String>| {
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    };
    if let Some(r) = &cfg.restored {
        // Before anything else: nothing below may run on the source's clock or RNG state.
        step("clock", restored::clock(ctx, r.unix_time_ns, &mut out));
        step("entropy", restored::reseed(ctx, &r.entropy, &mut out));
        if let Some(id) = &r.machine_id {
            step("machine-id", restored::machine_id(ctx, id, &mut out));
        }
        if let Some(mac) = &r.mac {
            step("mac", restored::mac(ctx, mac, &mut out));
        }
        out.restored = true;
    }
    // sshd's start is only queued: it comes up while the other steps and the user's work run.
    step(
        "ssh host keys",
        crate::hostkeys::apply(ctx, cfg.host_keys.as_deref(), &mut out),
    );
    if let Some(h) = &cfg.hostname {
        step("hostname", hostname(ctx, h, &mut out));
    }
    if let Some(net) = &cfg.network {
        let flush_old = cfg.restored.is_some();
        step("network", network(ctx, net, flush_old, &mut out));
    }
    for f in &cfg.files {
        step(&format!("file {}", f.path), sync_file(ctx, f, &mut out));
    }
    if let Some(keys) = &cfg.authorized_keys {
        step("authorized keys", authorized_keys(ctx, keys, &mut out));
    }
    if cfg.git_name.is_some() || cfg.git_email.is_some() {
        step(
            "git identity",
            git_identity(
                ctx,
                cfg.git_name.as_deref(),
                cfg.git_email.as_deref(),
                &mut out,
            ),
        );
    }
    for c in &out.changed {
        tracing::info!("configure: {c}");
    }
    for w in &out.warnings {
        tracing::warn!("configure: {w}");
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(RemoteError::new(failures.join("; ")))
    }
}

/// Rejects malformed input before anything is changed.
fn validate(cfg: &Configure) -> Result<(), String> {
    if let Some(h) = &cfg.hostname {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(format!(
                "invalid hostname {h:?} (letters, digits and '-' in dot-separated labels)"
            ));
        }
    }
    if let Some(net) = &cfg.network {
        parse_cidr(&net.ip_cidr)?;
    }
    for f in &cfg.files {
        root_relative(&f.path)?;
        if f.mode > 0o7777 {
            return Err(format!("file {}: invalid mode {:o}", f.path, f.mode));
        }
    }
    for k in cfg.authorized_keys.iter().flatten() {
        if k.contains('\n') || k.contains('\r') {
            return Err("an authorized key spans several lines".into());
        }
    }
    for v in [&cfg.git_name, &cfg.git_email].into_iter().flatten() {
        if v.contains('\n') {
            return Err(format!("git identity {v:?} spans several lines"));
        }
    }
    if let Some(keys) = &cfg.host_keys {
        crate::hostkeys::validate(keys)?;
    }
    if let Some(r) = &cfg.restored {
        r.validate()?;
    }
    Ok(())
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("invalid address {s:?} (expected ADDRESS/PREFIX, e.g. 172.30.0.5/24)");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// A synced file's path relative to `/root`, refusing anything else.
fn root_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    let rest = p
        .strip_prefix("/root")
        .map_err(|_| format!("{path} is not under /root (file_sync only writes there)"))?;
    let mut out = PathBuf::new();
    for c in rest.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(format!("{path} must not contain `..`")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{path} names /root itself, not a file"));
    }
    Ok(out)
}

/// Writes `contents` with `mode` unless the file already is exactly that. Replaces (never
/// writes through) an existing symlink. Returns whether anything changed.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.is_file()
            && meta.permissions().mode() & 0o7777 == mode
            && fs::read(path)? == contents
        {
            return Ok(false);
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = path.with_file_name(format!(".{}.wick-tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)?;
    Ok(true)
}

fn err(what: impl std::fmt::Display, path: &Path) -> impl FnOnce(io::Error) -> String {
    let p = path.display().to_string();
    move |e| format!("{what} {p}: {e}")
}

fn hostname(ctx: &Ctx, h: &str, out: &mut ConfigureReply) -> Result<(), String> {
    let path = ctx.path("/etc/hostname");
    fs::create_dir_all(ctx.path("/etc")).map_err(err("creating", &ctx.path("/etc")))?;
    if write_file(&path, format!("{h}\n").as_bytes(), 0o644).map_err(err("writing", &path))? {
        out.changed.push(format!("hostname file set to {h}"));
    }
    let hosts_path = ctx.path("/etc/hosts");
    let hosts = fs::read_to_string(&hosts_path).unwrap_or_else(|_| {
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string()
    });
    let new_hosts = set_hosts_line(&hosts, h);
    if new_hosts != hosts || !hosts_path.exists() {
        write_file(&hosts_path, new_hosts.as_bytes(), 0o644)
            .map_err(err("writing", &hosts_path))?;
        out.changed
            .push(format!("/etc/hosts maps {h} to 127.0.1.1"));
    }
    if ctx.live {
        let current = nix::unistd::gethostname()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if current != h {
            nix::unistd::sethostname(h).map_err(|e| format!("sethostname({h}): {e}"))?;
            out.changed.push(format!("kernel hostname set to {h}"));
        }
    } else {
        out.warnings
            .push("hostname: not live, kernel hostname left alone".into());
    }
    Ok(())
}

/// Replaces (or adds) the `127.0.1.1` line of an `/etc/hosts` text.
fn set_hosts_line(hosts: &str, h: &str) -> String {
    let line = format!("127.0.1.1\t{h}");
    let mut found = false;
    let mut out: Vec<String> = hosts
        .lines()
        .map(|l| {
            if l.split_whitespace().next() == Some("127.0.1.1") {
                found = true;
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// The `ip` invocations that configure `iface` (all idempotent). With `flush_old` (a restored
/// guest, still holding its source's address and neighbours) they first drop those.
fn network_commands(iface: &str, net: &NetworkConfig, flush_old: bool) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut cmds = vec![v(&["link", "set", "lo", "up"])];
    if flush_old {
        cmds.push(v(&["addr", "flush", "dev", iface, "scope", "global"]));
        cmds.push(v(&["neigh", "flush", "dev", iface]));
    }
    cmds.extend([
        v(&["addr", "replace", &net.ip_cidr, "dev", iface]),
        v(&["link", "set", iface, "up"]),
    ]);
    if let Some(gw) = net.gateway {
        cmds.push(v(&[
            "route",
            "replace",
            "default",
            "via",
            &gw.to_string(),
            "dev",
            iface,
        ]));
    }
    cmds
}

/// The first non-loopback interface, preferring `eth0`.
fn first_interface() -> Result<String, String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .map_err(|e| format!("listing /sys/class/net: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    if names.iter().any(|n| n == "eth0") {
        return Ok("eth0".into());
    }
    names.into_iter().next().ok_or_else(|| {
        "the guest has no network interface besides lo (is virtio_net loaded?)".into()
    })
}

fn network(
    ctx: &Ctx,
    net: &NetworkConfig,
    flush_old: bool,
    out: &mut ConfigureReply,
) -> Result<(), String> {
    let mut resolv = String::from("# written by wick-agent\n");
    for d in &net.dns {
        resolv.push_str(&format!("nameserver {d}\n"));
    }
    if !net.dns.is_empty() {
        let path = ctx.path("/etc/resolv.conf");
        fs::create_dir_all(ctx.path("/etc")).map_err(err("creating", &ctx.path("/etc")))?;
        if write_file(&path, resolv.as_bytes(), 0o644).map_err(err("writing", &path))? {
            out.changed.push("resolv.conf written".into());
        }
    }
    if !ctx.live {
        out.warnings
            .push("network: not live, interfaces left alone".into());
        return Ok(());
    }
    let iface = first_interface()?;
    for args in network_commands(&iface, net, flush_old) {
        let o = match Command::new("ip").args(&args).output() {
            Ok(o) => o,
            // No iproute2 (most container images): the same changes over rtnetlink.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                netlink::configure(&iface, &net.ip_cidr, net.gateway, flush_old)?;
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
    out.changed.push(format!(
        "{iface}: {} via {}",
        net.ip_cidr,
        net.gateway
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into())
    ));
    Ok(())
}

/// Fails if `path` (which may not exist yet) resolves outside `root`.
fn check_inside(root: &Path, path: &Path) -> Result<(), String> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", root.display()))?;
    let mut existing = path.to_path_buf();
    while existing.symlink_metadata().is_err() {
        if !existing.pop() {
            return Ok(());
        }
    }
    let real = existing
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", existing.display()))?;
    if real.starts_with(&root) {
        Ok(())
    } else {
        Err(format!(
            "{} leads outside /root (to {})",
            existing.display(),
            real.display()
        ))
    }
}

fn sync_file(ctx: &Ctx, f: &SyncFile, out: &mut ConfigureReply) -> Result<(), String> {
    let home = ctx.path("/root");
    let rel = root_relative(&f.path)?;
    let path = home.join(&rel);
    let parent = path.parent().unwrap_or(&home).to_path_buf();
    fs::create_dir_all(&home).map_err(err("creating", &home))?;
    check_inside(&home, &parent)?;
    fs::create_dir_all(&parent).map_err(err("creating", &parent))?;
    check_inside(&home, &parent)?;
    if write_file(&path, &f.contents, f.mode).map_err(err("writing", &path))? {
        out.changed.push(format!("{} written", f.path));
    }
    Ok(())
}

/// Replaces the wick-managed block of an authorized_keys text, keeping other lines.
fn managed_keys(existing: &str, keys: &[String]) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for l in existing.lines() {
        if l == KEYS_BEGIN {
            inside = true;
        } else if l == KEYS_END {
            inside = false;
        } else if !inside {
            out.push(l.to_string());
        }
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.push(KEYS_BEGIN.to_string());
    out.extend(
        keys.iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty()),
    );
    out.push(KEYS_END.to_string());
    out.join("\n") + "\n"
}

fn authorized_keys(ctx: &Ctx, keys: &[String], out: &mut ConfigureReply) -> Result<(), String> {
    let home = ctx.path("/root");
    let dir = home.join(".ssh");
    fs::create_dir_all(&home).map_err(err("creating", &home))?;
    check_inside(&home, &dir)?;
    if !dir.exists() {
        fs::create_dir(&dir).map_err(err("creating", &dir))?;
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(err("chmod", &dir))?;
    let path = dir.join("authorized_keys");
    check_inside(&home, &path)?;
    let existing = fs::read_to_string(&path).unwrap_or_default();
    let text = managed_keys(&existing, keys);
    if write_file(&path, text.as_bytes(), 0o600).map_err(err("writing", &path))? {
        out.changed
            .push(format!("authorized_keys: {} managed key(s)", keys.len()));
    }
    Ok(())
}

fn git_identity(
    ctx: &Ctx,
    name: Option<&str>,
    email: Option<&str>,
    out: &mut ConfigureReply,
) -> Result<(), String> {
    let file = ctx.path("/etc/gitconfig");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("config")
            .arg("--file")
            .arg(&file)
            .args(args)
            .output()
    };
    for (key, value) in [("user.name", name), ("user.email", email)] {
        let Some(value) = value else { continue };
        let current = match git(&["--get", key]) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim_end().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                out.warnings
                    .push("git is not installed in the guest: git identity skipped".into());
                return Ok(());
            }
            Err(e) => return Err(format!("cannot run git: {e}")),
        };
        if current == value {
            continue;
        }
        let o = git(&[key, value]).map_err(|e| format!("cannot run git: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "git config {key} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        out.changed.push(format!("git {key} set"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_commands_are_idempotent_forms() {
        let net = NetworkConfig {
            ip_cidr: "172.30.0.5/24".into(),
            gateway: Some("172.30.0.1".parse().unwrap()),
            dns: vec![],
        };
        let cmds = |flush| -> Vec<String> {
            network_commands("eth0", &net, flush)
                .into_iter()
                .map(|c| c.join(" "))
                .collect()
        };
        assert_eq!(
            cmds(false),
            [
                "link set lo up",
                "addr replace 172.30.0.5/24 dev eth0",
                "link set eth0 up",
                "route replace default via 172.30.0.1 dev eth0"
            ]
        );
        // A restored guest first drops its source's addresses and neighbours.
        assert_eq!(
            cmds(true)[..4],
            [
                "link set lo up",
                "addr flush dev eth0 scope global",
                "neigh flush dev eth0",
                "addr replace 172.30.0.5/24 dev eth0",
            ]
        );
    }

    #[test]
    fn validation() {
        assert!(parse_cidr("10.0.0.2/24").is_ok());
        assert!(parse_cidr("10.0.0.2").is_err());
        assert!(parse_cidr("10.0.0.2/33").is_err());
        assert!(root_relative("/root/.config/x").is_ok());
        assert!(root_relative("/etc/passwd").is_err());
        assert!(root_relative("/root/../etc/passwd").is_err());
        assert!(root_relative("/rootkit/x").is_err());
        assert!(root_relative("/root").is_err());
        let bad = Configure {
            hostname: Some("-bad".into()),
            ..Default::default()
        };
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn restored_is_validated_first_and_applied_under_the_root() {
        let d = tempfile::tempdir().unwrap();
        let ctx = Ctx {
            root: d.path().to_path_buf(),
            live: false,
            poweroff: false,
        };
        let good = wick_agent_proto::Restored {
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            entropy: vec![7; 32],
            unix_time_ns: 1_780_000_000_000_000_000,
            mac: Some("06:00:AC:1E:00:07".into()),
        };
        // Any bad field refuses the whole message: nothing is written.
        for bad in [
            wick_agent_proto::Restored {
                machine_id: Some("not-hex".into()),
                ..good.clone()
            },
            wick_agent_proto::Restored {
                entropy: vec![7; 8],
                ..good.clone()
            },
            wick_agent_proto::Restored {
                mac: Some("06:00:ac".into()),
                ..good.clone()
            },
        ] {
            let cfg = Configure {
                hostname: Some("fork-1".into()),
                restored: Some(bad),
                ..Default::default()
            };
            let e = apply(&ctx, &cfg).unwrap_err();
            assert!(e.message.starts_with("restored: "), "{e}");
            assert!(!d.path().join("etc").exists());
        }
        let cfg = Configure {
            hostname: Some("fork-1".into()),
            restored: Some(good),
            ..Default::default()
        };
        let out = apply(&ctx, &cfg).unwrap();
        assert!(out.restored, "{out:?}");
        assert_eq!(
            fs::read_to_string(d.path().join("etc/machine-id")).unwrap(),
            "0123456789abcdef0123456789abcdef\n"
        );
        for step in ["clock", "entropy", "mac"] {
            assert!(
                out.warnings
                    .iter()
                    .any(|w| w.starts_with(step) && w.contains("not live")),
                "{step}: {out:?}"
            );
        }
        // Without `restored`, the reply says so.
        let plain = Configure {
            hostname: Some("fork-1".into()),
            ..Default::default()
        };
        assert!(!apply(&ctx, &plain).unwrap().restored);
    }

    #[test]
    fn hosts_and_keys_blocks() {
        let h = set_hosts_line("127.0.0.1\tlocalhost\n127.0.1.1\told\n", "new");
        assert_eq!(h, "127.0.0.1\tlocalhost\n127.0.1.1\tnew\n");
        let k1 = managed_keys("ssh-ed25519 AAA mine\n", &["ssh-ed25519 BBB wick".into()]);
        let k2 = managed_keys(&k1, &["ssh-ed25519 CCC wick".into()]);
        assert!(k2.starts_with("ssh-ed25519 AAA mine\n"));
        assert!(k2.contains("CCC") && !k2.contains("BBB"));
        assert_eq!(managed_keys(&k2, &["ssh-ed25519 CCC wick".into()]), k2);
    }
}
