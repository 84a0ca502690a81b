//! `wick vm ssh`: OpenSSH into a VM with wick's key and wick's own known_hosts, and the
//! known_hosts bookkeeping around it.
//!
//! The host keys wickd learned from the guest's agent at start (`runtime.host_keys`) are pinned
//! into wick's known_hosts under `<name>.vm` before ssh runs, replacing older entries of that
//! name (a recreated VM brings new keys), and ssh runs with `StrictHostKeyChecking=yes` and
//! `HostKeyAlias=<name>.vm` against the VM's IP — so even the first connection is verified and a
//! changed key is refused. Without recorded keys it falls back to trust on first use
//! (`accept-new`). `wick vm delete` forgets the name ([`forget_host`]).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wick_model::{Paths, VmRecord};

use super::ssh_config::{self, SshPaths};
use super::Ctx;
use crate::cli::{SshArgs, SshProxyArgs};
use crate::client::vm_path;

pub async fn run(ctx: &Ctx, a: SshArgs) -> Result<()> {
    let vm: VmRecord = ctx.client().get(&vm_path(&a.vm, "")).await?;
    let vm = super::wake::resume_if_suspended(&ctx.client(), vm).await?;
    let err = command(ctx, &vm, &a.command)?.exec();
    Err(ssh_error(err))
}

/// Runs ssh into `vm` as a child and waits for it (so the caller can act afterwards, e.g.
/// delete the VM); returns ssh's exit code (signal N → 128+N).
pub(super) fn session(ctx: &Ctx, vm: &VmRecord, remote: &[String]) -> Result<i32> {
    use std::os::unix::process::ExitStatusExt;
    let status = command(ctx, vm, remote)?.status().map_err(ssh_error)?;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

fn ssh_error(err: io::Error) -> anyhow::Error {
    if err.kind() == io::ErrorKind::NotFound {
        anyhow::anyhow!("ssh is not installed: install the OpenSSH client (openssh-client)")
    } else {
        anyhow::Error::new(err).context("cannot run ssh")
    }
}

/// `wick vm ssh-proxy HOST PORT`: ssh's `ProxyCommand`. Relays stdin/stdout to the VM's
/// `PORT` after pinning its host keys; the VM is looked up through wickd, so a socket user
/// reaches only their own VMs.
pub async fn proxy(ctx: &Ctx, a: SshProxyArgs) -> Result<()> {
    let name = a.host.strip_suffix(".vm").unwrap_or(&a.host);
    let vm: VmRecord = ctx.client().get(&vm_path(name, "")).await?;
    let vm = super::wake::resume_if_suspended(&ctx.client(), vm).await?;
    let target = Target::prepare(ctx, &vm)?;
    let ip: std::net::IpAddr = target
        .ip
        .parse()
        .with_context(|| format!("VM {} has a malformed IP {:?}", vm.name, target.ip))?;
    let addr = std::net::SocketAddr::new(ip, a.port);
    let stream = wait_for_port(addr, &vm.name)?;
    relay_stdio(stream).with_context(|| format!("relay to {addr}"))
}

/// How long `vm ssh` and `vm ssh-proxy` wait for a VM's port: sshd is started when the guest is
/// configured, without the create waiting for it, so right after a create it may not listen yet.
const SSHD_WAIT: Duration = Duration::from_secs(60);

/// Connects to `addr` in VM `vm`, retrying while nothing listens there yet (up to
/// [`SSHD_WAIT`]; says once on stderr that it waits).
fn wait_for_port(addr: SocketAddr, vm: &str) -> Result<TcpStream> {
    let deadline = Instant::now() + SSHD_WAIT;
    let mut said = false;
    loop {
        let err = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let retry = matches!(
            err.kind(),
            io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
        );
        if !retry || Instant::now() >= deadline {
            return Err(
                anyhow::Error::new(err).context(format!("cannot connect to {addr} (VM {vm})"))
            );
        }
        if !said {
            eprintln!(
                "waiting for VM {vm} to accept connections on port {}…",
                addr.port()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies stdin to `stream` (then half-closes it) and `stream` to stdout, until the server
/// closes. Blocking on purpose: the stdin thread must not keep the process alive at the end.
fn relay_stdio(stream: std::net::TcpStream) -> io::Result<()> {
    let up = stream.try_clone()?;
    std::thread::spawn(move || {
        let _ = pump(io::stdin().lock(), &up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    pump(&stream, io::stdout().lock())
}

/// Copies `from` to `to` chunk by chunk, flushing each: stdout is line-buffered, and an SSH
/// packet without a newline would otherwise wait there while both ends wait for each other.
fn pump(mut from: impl io::Read, mut to: impl io::Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// Where ssh goes for a VM, its host keys pinned.
struct Target {
    paths: SshPaths,
    alias: String,
    ip: String,
    strict: &'static str,
}

impl Target {
    /// Checks `vm` is running with an IP, makes sure wick's key exists and pins the VM's
    /// recorded host keys into wick's known_hosts.
    fn prepare(ctx: &Ctx, vm: &VmRecord) -> Result<Target> {
        super::workspace::ensure_running(vm)?;
        let Some(ip) = vm.runtime.ip.clone() else {
            bail!(
                "VM {} has no IP address, so ssh cannot reach it; use `wick vm exec {} -- …`",
                vm.name,
                vm.name
            );
        };
        let paths = SshPaths::resolve(&ctx.paths)?;
        if !paths.key.exists() {
            // Creates the key; a VM created before it existed does not know it.
            if ssh_config::public_key(&ctx.paths).is_some() {
                eprintln!(
                "warning: created wick's ssh key {}; VM {} was created without it, so ssh will \
                 likely be refused until the VM is recreated",
                paths.key.display(),
                vm.name
            );
            }
        }
        let alias = host_alias(&vm.name);
        let strict = if vm.runtime.host_keys.is_empty() {
            "accept-new"
        } else {
            pin_host_keys(&paths.known_hosts, &alias, &vm.runtime.host_keys)?;
            "yes"
        };
        Ok(Target {
            paths,
            alias,
            ip,
            strict,
        })
    }
}

/// The ssh command line into `vm` (running, with an IP), after pinning its host keys.
fn command(ctx: &Ctx, vm: &VmRecord, remote: &[String]) -> Result<Command> {
    let t = Target::prepare(ctx, vm)?;
    if let Ok(ip) = t.ip.parse::<IpAddr>() {
        // sshd may still be starting right after a create. When the port stays unreachable,
        // ssh itself runs and reports it (its exit code, 255, is the command's).
        let _ = wait_for_port(SocketAddr::new(ip, 22), &vm.name);
    }
    let args = ssh_args(&t.paths, &t.alias, &t.ip, t.strict, remote);
    let mut cmd = Command::new("ssh");
    cmd.args(&args);
    Ok(cmd)
}

/// The name wick's known_hosts knows a VM by.
pub fn host_alias(vm_name: &str) -> String {
    format!("{vm_name}.vm")
}

/// ssh's arguments (without `ssh` itself).
pub fn ssh_args(
    paths: &SshPaths,
    alias: &str,
    ip: &str,
    strict: &str,
    command: &[String],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-i".into(), paths.key.clone().into_os_string()];
    let opts = [
        "IdentitiesOnly=yes".to_string(),
        "User=root".to_string(),
        format!(
            "UserKnownHostsFile={}",
            ssh_config::ssh_arg(&paths.known_hosts)
        ),
        "GlobalKnownHostsFile=/dev/null".to_string(),
        format!("StrictHostKeyChecking={strict}"),
        format!("HostKeyAlias={alias}"),
        "CheckHostIP=no".to_string(),
        "HashKnownHosts=no".to_string(),
        "UpdateHostKeys=no".to_string(),
        "ConnectTimeout=10".to_string(),
        "LogLevel=ERROR".to_string(),
    ];
    for o in opts {
        args.push("-o".into());
        args.push(o.into());
    }
    args.push(format!("root@{ip}").into());
    if !command.is_empty() {
        // `--` keeps a command starting with `-` from being read as an ssh option.
        args.push("--".into());
        args.extend(command.iter().map(OsString::from));
    }
    args
}

/// `key` (`type base64 [comment]`) as a known_hosts line for `alias`; `None` if malformed.
fn known_hosts_line(alias: &str, key: &str) -> Option<String> {
    let mut it = key.split_whitespace();
    let (kind, blob) = (it.next()?, it.next()?);
    let plausible = (kind.starts_with("ssh-") || kind.starts_with("ecdsa-"))
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    plausible.then(|| format!("{alias} {kind} {blob}"))
}

/// Whether a known_hosts line is a plain (unhashed, unmarked) entry naming `alias`.
fn names_host(line: &str, alias: &str) -> bool {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('@') {
        return false;
    }
    t.split_whitespace()
        .next()
        .is_some_and(|hosts| hosts.split(',').any(|h| h == alias))
}

/// `existing` known_hosts text without the plain entries for `alias`.
pub fn remove_host_entries(existing: &str, alias: &str) -> String {
    existing
        .split_inclusive('\n')
        .filter(|l| !names_host(l, alias))
        .collect()
}

/// `existing` known_hosts text with `alias`'s entries replaced by `keys`.
pub fn replace_host_entries(existing: &str, alias: &str, keys: &[String]) -> String {
    let mut out = remove_host_entries(existing, alias);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for k in keys {
        if let Some(line) = known_hosts_line(alias, k) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Writes `keys` as `alias`'s only entries in `known_hosts` (created 0600 when missing).
fn pin_host_keys(known_hosts: &Path, alias: &str, keys: &[String]) -> Result<()> {
    if keys.iter().all(|k| known_hosts_line(alias, k).is_none()) {
        bail!("wickd recorded no usable host key for {alias}: {keys:?}");
    }
    let mut current = read_or_empty(known_hosts)?;
    if current.lines().any(|l| l.starts_with("|1|")) {
        // Hashed entries may name the alias too: let ssh-keygen drop those first.
        forget_with_ssh_keygen(known_hosts, alias);
        current = read_or_empty(known_hosts)?;
    }
    let new = replace_host_entries(&current, alias, keys);
    if new != current {
        if let Some(dir) = known_hosts.parent() {
            ssh_config::create_private_dir(dir)?;
        }
        ssh_config::write_atomic(known_hosts, &new, 0o600)?;
    }
    Ok(())
}

fn read_or_empty(path: &Path) -> Result<String> {
    match fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `ssh-keygen -R alias -f known_hosts`; false when it could not run or failed.
fn forget_with_ssh_keygen(known_hosts: &Path, alias: &str) -> bool {
    Command::new("ssh-keygen")
        .arg("-R")
        .arg(alias)
        .arg("-f")
        .arg(known_hosts)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes VM `vm_name`'s entries from wick's known_hosts after a delete (best effort: a
/// warning on failure). Uses `ssh-keygen -R` (which also finds hashed entries), else edits the
/// file directly.
pub fn forget_host(paths: &Paths, vm_name: &str) {
    let Ok(sp) = SshPaths::resolve(paths) else {
        return;
    };
    if !sp.known_hosts.exists() {
        return;
    }
    let alias = host_alias(vm_name);
    if forget_with_ssh_keygen(&sp.known_hosts, &alias) {
        return;
    }
    let result = read_or_empty(&sp.known_hosts).and_then(|cur| {
        let new = remove_host_entries(&cur, &alias);
        if new != cur {
            ssh_config::write_atomic(&sp.known_hosts, &new, 0o600)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!(
            "warning: could not remove {alias} from {}: {e:#}",
            sp.known_hosts.display()
        );
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn pump_flushes_every_chunk() {
        // A line-buffered writer (like stdout) must not hold a chunk without a newline.
        let mut out = std::io::LineWriter::new(Vec::new());
        struct Once(Option<&'static [u8]>);
        impl std::io::Read for Once {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                match self.0.take() {
                    Some(d) => {
                        buf[..d.len()].copy_from_slice(d);
                        Ok(d.len())
                    }
                    None => Err(std::io::Error::other("the peer is still waiting")),
                }
            }
        }
        assert!(pump(Once(Some(b"\x00\x01 kexinit, no newline")), &mut out).is_err());
        assert_eq!(out.get_ref().as_slice(), b"\x00\x01 kexinit, no newline");
    }
    use super::*;

    const K1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld root@a1";
    const K2: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAI+/= root@a1";

    #[test]
    fn replaces_only_the_alias() {
        let existing = "a1.vm ssh-ed25519 OLD\n\
                        b1.vm ssh-ed25519 KEEP\n\
                        # a1.vm comment stays\n\
                        a1.vm,10.0.0.1 ssh-rsa OLD2\n\
                        a1.vmx ssh-ed25519 KEEP2\n\
                        @revoked a1.vm ssh-ed25519 REV\n\
                        |1|abc=|def= ssh-ed25519 HASHED";
        let got = replace_host_entries(existing, "a1.vm", &[K1.into(), K2.into()]);
        assert_eq!(
            got,
            "b1.vm ssh-ed25519 KEEP\n\
             # a1.vm comment stays\n\
             a1.vmx ssh-ed25519 KEEP2\n\
             @revoked a1.vm ssh-ed25519 REV\n\
             |1|abc=|def= ssh-ed25519 HASHED\n\
             a1.vm ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld\n\
             a1.vm ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAI+/=\n"
        );
        // Idempotent, and removal undoes it.
        assert_eq!(
            replace_host_entries(&got, "a1.vm", &[K1.into(), K2.into()]),
            got
        );
        let removed = remove_host_entries(&got, "a1.vm");
        assert!(
            !removed.lines().any(|l| l.starts_with("a1.vm ")),
            "{removed}"
        );
        assert!(removed.contains("b1.vm ssh-ed25519 KEEP\n"));
    }

    #[test]
    fn malformed_keys_are_skipped() {
        assert_eq!(known_hosts_line("x.vm", "garbage"), None);
        assert_eq!(known_hosts_line("x.vm", "ssh-ed25519 bad!chars"), None);
        assert_eq!(
            replace_host_entries("", "x.vm", &["nope".into(), K1.into()]),
            "x.vm ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld\n"
        );
    }

    #[test]
    fn pins_into_a_new_file_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("wick/known_hosts");
        pin_host_keys(&kh, "a1.vm", &[K1.into()]).unwrap();
        assert_eq!(
            fs::read_to_string(&kh).unwrap(),
            "a1.vm ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&kh).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(pin_host_keys(&kh, "a1.vm", &["junk".into()]).is_err());
    }

    #[test]
    fn command_line() {
        let p = SshPaths::under(Path::new("/w"), Path::new("/home/u"));
        let args = ssh_args(&p, "a1.vm", "172.30.0.5", "yes", &[]);
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&s[..2], ["-i", "/w/id_ed25519"]);
        for want in [
            "UserKnownHostsFile=/w/known_hosts",
            "StrictHostKeyChecking=yes",
            "HostKeyAlias=a1.vm",
            "IdentitiesOnly=yes",
            "User=root",
        ] {
            let i = s
                .iter()
                .position(|a| a == want)
                .unwrap_or_else(|| panic!("{want}: {s:?}"));
            assert_eq!(s[i - 1], "-o");
        }
        assert_eq!(s.last().unwrap(), "root@172.30.0.5");
        let args = ssh_args(
            &p,
            "a1.vm",
            "172.30.0.5",
            "accept-new",
            &["-x".into(), "y z".into()],
        );
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(s.contains(&"StrictHostKeyChecking=accept-new".to_string()));
        let host = s.iter().position(|a| a == "root@172.30.0.5").unwrap();
        assert_eq!(&s[host + 1..], ["--", "-x", "y z"]);
        // A known_hosts path with a space is quoted for ssh's option parser.
        let p = SshPaths::under(Path::new("/a b"), Path::new("/home/u"));
        let s = ssh_args(&p, "a1.vm", "1.2.3.4", "yes", &[]);
        assert!(s.contains(&OsString::from("UserKnownHostsFile=\"/a b/known_hosts\"")));
    }
}
