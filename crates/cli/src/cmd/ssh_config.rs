//! `wick ssh-config [--install|--uninstall]`: make `ssh <name>.vm` log into a VM.
//!
//! wick keeps its own ssh client settings in one file (see [`SshPaths`]) holding a `Host *.vm`
//! block: user root, wick's key, wick's own known_hosts, trust on first use
//! (`StrictHostKeyChecking accept-new`: a changed host key is refused by OpenSSH). `--install`
//! writes that file, creates the key with `ssh-keygen` if missing, and puts a marker-fenced
//! `Include` of it at the very top of `~/.ssh/config` (an `Include` only applies to every host
//! when it comes before the first `Host` block). `--uninstall` removes exactly that fenced block.
//! Both are idempotent and keep the rest of the user's file byte for byte. No daemon is needed.
//!
//! The block's `ProxyCommand` runs `wick vm ssh-proxy %h %p`, which asks wickd for the VM (so a
//! socket user reaches only their own VMs), pins its host keys like `wick vm ssh` and relays the
//! connection to its IP: `ssh <name>.vm`, `scp`, `rsync` and editors' remote-SSH work without
//! host DNS for `.vm` (no systemd-resolved needed).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use wick_model::Paths;

use super::{out, Ctx};
use crate::cli::SshConfigArgs;

/// First line of the block wick adds to `~/.ssh/config`.
pub const BEGIN_MARKER: &str = "# >>> wick >>>";
/// Last line of the block wick adds to `~/.ssh/config`.
pub const END_MARKER: &str = "# <<< wick <<<";

/// Where wick's ssh client files live. `wick vm ssh` must use the same key and known_hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshPaths {
    /// wick's client directory: `$WICK_ROOT` when set, else `$XDG_CONFIG_HOME/wick`, else
    /// `~/.config/wick`.
    pub dir: PathBuf,
    /// wick's ssh client config, included from `~/.ssh/config`: `<dir>/ssh_config`.
    pub config: PathBuf,
    /// wick's private key: `<dir>/id_ed25519` (public key beside it, `.pub`).
    pub key: PathBuf,
    /// wick's known_hosts for guests: `<dir>/known_hosts`.
    pub known_hosts: PathBuf,
    /// The user's ssh config: `~/.ssh/config`.
    pub user_config: PathBuf,
}

impl SshPaths {
    /// The paths for the current user and `WICK_ROOT` layout.
    pub fn resolve(paths: &Paths) -> Result<SshPaths> {
        let home = home_dir()?;
        let xdg = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let dir = match (&paths.root, xdg) {
            (Some(root), _) => std::path::absolute(root)
                .with_context(|| format!("cannot make {} absolute", root.display()))?,
            (None, Some(xdg)) => xdg.join("wick"),
            (None, None) => home.join(".config").join("wick"),
        };
        Ok(SshPaths::under(&dir, &home))
    }

    /// The layout for client directory `dir` and home directory `home`.
    pub fn under(dir: &Path, home: &Path) -> SshPaths {
        SshPaths {
            dir: dir.to_path_buf(),
            config: dir.join("ssh_config"),
            key: dir.join("id_ed25519"),
            known_hosts: dir.join("known_hosts"),
            user_config: home.join(".ssh").join("config"),
        }
    }
}

fn home_dir() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Ok(u.dir),
        _ => bail!("cannot find your home directory: set HOME"),
    }
}

/// An ssh_config argument: quoted when it has spaces.
pub(crate) fn ssh_arg(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().any(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    }
}

/// The fenced block that includes `include_path`.
pub fn block(include_path: &Path) -> String {
    format!(
        "{BEGIN_MARKER}\nInclude {}\n{END_MARKER}\n",
        ssh_arg(include_path)
    )
}

/// The `ProxyCommand` of wick's ssh config: this `wick` binary with this invocation's root and
/// socket, so it reaches the same daemon whatever the environment ssh runs it in.
pub fn proxy_command(ctx: &Ctx) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the wick executable")?;
    let exe = fs::canonicalize(&exe).unwrap_or(exe);
    let mut cmd = String::new();
    if let Some(root) = &ctx.paths.root {
        let root = std::path::absolute(root)
            .with_context(|| format!("cannot make {} absolute", root.display()))?;
        cmd.push_str(&format!("env WICK_ROOT={} ", ssh_arg(&root)));
    }
    let socket = std::path::absolute(&ctx.socket)
        .with_context(|| format!("cannot make {} absolute", ctx.socket.display()))?;
    for p in [&exe, &socket] {
        if p.display().to_string().contains('"') {
            bail!(
                "{} contains a double quote, which ssh_config cannot express",
                p.display()
            );
        }
    }
    cmd.push_str(&format!(
        "{} --socket {} vm ssh-proxy %h %p",
        ssh_arg(&exe),
        ssh_arg(&socket)
    ));
    Ok(cmd)
}

/// wick's own ssh client config.
pub fn wick_ssh_config(key: &Path, known_hosts: &Path, proxy: &str) -> String {
    format!(
        "# wick: ssh settings for VMs (`ssh <name>.vm`). Written by `wick ssh-config --install`,\n\
         # which rewrites it: put your own settings in ~/.ssh/config instead.\n\
         Host *.vm\n\
         \x20   User root\n\
         \x20   IdentityFile {}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   UserKnownHostsFile {}\n\
         \x20   StrictHostKeyChecking accept-new\n\
         \x20   ProxyCommand {}\n",
        ssh_arg(key),
        ssh_arg(known_hosts),
        proxy
    )
}

/// `existing` with wick's block (for `include_path`) at the top and no other wick block.
/// Applying it twice gives the same text; [`remove_block`] undoes it exactly.
pub fn install_block(existing: &str, include_path: &Path) -> String {
    format!("{}{}", block(include_path), remove_block(existing))
}

/// `existing` without wick's fenced blocks: every line from a begin marker through the next end
/// marker goes. Stray markers (a begin with no end after it, an end with no begin) are removed
/// alone, never the lines around them. Everything else is kept byte for byte.
pub fn remove_block(existing: &str) -> String {
    let lines: Vec<&str> = existing.split_inclusive('\n').collect();
    let is = |line: &str, marker: &str| line.trim_end() == marker;
    let mut out = String::with_capacity(existing.len());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if is(line, BEGIN_MARKER) {
            // A begin marker: drop through the matching end, if there is one before the next begin.
            let end = lines[i + 1..]
                .iter()
                .position(|l| is(l, END_MARKER) || is(l, BEGIN_MARKER))
                .map(|k| i + 1 + k)
                .filter(|&j| is(lines[j], END_MARKER));
            i = match end {
                Some(j) => j + 1,
                None => i + 1,
            };
            continue;
        }
        if !is(line, END_MARKER) {
            out.push_str(line);
        }
        i += 1;
    }
    out
}

pub async fn run(ctx: &Ctx, args: SshConfigArgs) -> Result<()> {
    let paths = SshPaths::resolve(&ctx.paths)?;
    let proxy = proxy_command(ctx)?;
    for p in [&paths.config, &paths.key, &paths.known_hosts] {
        if p.display().to_string().contains('"') {
            bail!(
                "{} contains a double quote, which ssh_config cannot express; set WICK_ROOT or \
                 XDG_CONFIG_HOME to a plainer directory",
                p.display()
            );
        }
    }
    if args.install {
        install(&paths, &proxy)
    } else if args.uninstall {
        uninstall(&paths)
    } else {
        preview(&paths, &proxy)
    }
}

fn preview(p: &SshPaths, proxy: &str) -> Result<()> {
    let current = read_or_empty(&p.user_config)?;
    let installed = current == install_block(&current, &p.config);
    out(&format!(
        "`wick ssh-config --install` puts this block at the top of {}:\n\n{}\n\
         and writes {}:\n\n{}\n\
         status: {}\n",
        p.user_config.display(),
        block(&p.config),
        p.config.display(),
        wick_ssh_config(&p.key, &p.known_hosts, proxy),
        if installed {
            "installed"
        } else {
            "not installed"
        }
    ))
}

fn install(p: &SshPaths, proxy: &str) -> Result<()> {
    let mut report = String::new();
    create_private_dir(&p.dir)?;
    let content = wick_ssh_config(&p.key, &p.known_hosts, proxy);
    if read_or_empty(&p.config)? != content {
        write_atomic(&p.config, &content, 0o600)?;
        report.push_str(&format!("wrote {}\n", p.config.display()));
    }
    if !p.key.exists() {
        match generate_key(&p.key) {
            Ok(()) => report.push_str(&format!("created the key {}\n", p.key.display())),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    let ssh_dir = p
        .user_config
        .parent()
        .context("~/.ssh/config has no parent directory")?;
    create_private_dir(ssh_dir)?;
    let target = follow_symlink(&p.user_config)?;
    let current = read_or_empty(&target)?;
    let new = install_block(&current, &p.config);
    if new != current {
        write_atomic(&target, &new, 0o600)?;
        report.push_str(&format!(
            "added wick's Include to {}\n",
            p.user_config.display()
        ));
    }
    if report.is_empty() {
        report = format!(
            "already installed in {} (nothing changed)\n",
            p.user_config.display()
        );
    }
    report.push_str(&format!(
        "`ssh <name>.vm` logs in as root with {} (host keys: {}).\n",
        p.key.display(),
        p.known_hosts.display()
    ));
    out(&report)
}

fn uninstall(p: &SshPaths) -> Result<()> {
    let target = follow_symlink(&p.user_config)?;
    let current = read_or_empty(&target)?;
    let new = remove_block(&current);
    if new == current {
        return out(&format!(
            "wick's Include is not in {} (nothing changed)\n",
            p.user_config.display()
        ));
    }
    write_atomic(&target, &new, 0o600)?;
    out(&format!(
        "removed wick's Include from {} ({} and the key are kept)\n",
        p.user_config.display(),
        p.config.display()
    ))
}

fn read_or_empty(path: &Path) -> Result<String> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .with_context(|| format!("{} is not UTF-8 text; edit it by hand", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A `~/.ssh/config` managed as a symlink (dotfile repos) is edited where it points.
fn follow_symlink(path: &Path) -> Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).with_context(|| {
            format!(
                "{} is a symlink to a missing file; fix or remove it",
                path.display()
            )
        }),
        _ => Ok(path.to_path_buf()),
    }
}

/// Creates `dir` (mode 0700) if missing; an existing directory keeps its mode.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))
}

/// Replaces `path` with `content` atomically (temp file + rename), keeping the mode of an
/// existing file, else using `new_mode`.
pub(crate) fn write_atomic(path: &Path, content: &str, new_mode: u32) -> Result<()> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(new_mode);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.wick-{}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// The caller's wick public key (`<dir>/id_ed25519.pub`), creating the key pair on first use
/// when ssh-keygen exists. `None` (with a warning) when there is no key to offer.
pub fn public_key(paths: &Paths) -> Option<String> {
    let sp = SshPaths::resolve(paths).ok()?;
    let pubkey = PathBuf::from(format!("{}.pub", sp.key.display()));
    if !sp.key.exists() {
        if let Err(e) = fs::create_dir_all(&sp.dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| generate_key(&sp.key))
        {
            eprintln!("warning: no ssh key for the guest: {e:#}");
            return None;
        }
    }
    fs::read_to_string(&pubkey)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The caller's git identity (`git config user.name` / `user.email`), if set.
pub fn git_identity() -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        Command::new("git")
            .args(["config", "--get", key])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    (get("user.name"), get("user.email"))
}

fn generate_key(key: &Path) -> Result<()> {
    // Generate under a temporary name and rename into place, so concurrent first uses (several
    // `wick vm create` at once) never see half a key pair or fight over an overwrite prompt.
    let tmp = key.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "wick", "-f"])
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {
            let tmp_pub = PathBuf::from(format!("{}.pub", tmp.display()));
            if key.exists() {
                // Someone else won the race: keep theirs.
                let _ = fs::remove_file(&tmp);
                let _ = fs::remove_file(&tmp_pub);
                return Ok(());
            }
            fs::rename(&tmp_pub, PathBuf::from(format!("{}.pub", key.display())))?;
            fs::rename(&tmp, key)?;
            Ok(())
        }
        Ok(s) => bail!("ssh-keygen failed ({s}) creating {}", key.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "ssh-keygen is not installed, so no key was created; install openssh-client, or \
             run `ssh-keygen -t ed25519 -N '' -f {}` yourself",
            key.display()
        ),
        Err(e) => Err(e).context("cannot run ssh-keygen"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INC: &str = "/home/u/.config/wick/ssh_config";

    fn inc() -> &'static Path {
        Path::new(INC)
    }

    #[test]
    fn empty_file() {
        let got = install_block("", inc());
        assert_eq!(
            got,
            format!("{BEGIN_MARKER}\nInclude {INC}\n{END_MARKER}\n")
        );
        assert_eq!(remove_block(&got), "");
    }

    #[test]
    fn goes_before_host_blocks_and_keeps_the_rest() {
        let user = "Host work\n    HostName 10.0.0.1\r\n\n# comment\nHost *\n  ForwardAgent no";
        let got = install_block(user, inc());
        assert!(got.starts_with(BEGIN_MARKER), "{got}");
        assert!(got.ends_with(user));
        assert_eq!(remove_block(&got), user);
    }

    #[test]
    fn already_installed_is_unchanged() {
        let once = install_block("Host a\n  User b\n", inc());
        assert_eq!(install_block(&once, inc()), once);
        // A block moved below Host blocks by hand is moved back to the top.
        let moved = format!("Host a\n  User b\n{}", block(inc()));
        assert_eq!(install_block(&moved, inc()), once);
        // A stale include path is replaced, not duplicated.
        let stale = install_block("Host a\n  User b\n", Path::new("/old/ssh_config"));
        assert_eq!(install_block(&stale, inc()), once);
    }

    #[test]
    fn stray_markers_are_removed_alone() {
        let text = format!("Host a\n{BEGIN_MARKER}\nHost b\n  User c\n");
        assert_eq!(remove_block(&text), "Host a\nHost b\n  User c\n");
        let text = format!("Host a\n{END_MARKER}  \nHost b\n");
        assert_eq!(remove_block(&text), "Host a\nHost b\n");
        // A begin, then another begin with its end: the first is stray, the second block goes.
        let text = format!("{BEGIN_MARKER}\nHost a\n{}", block(inc()));
        assert_eq!(remove_block(&text), "Host a\n");
        // Marker text inside another line is not a marker.
        let text = format!("Host a # {BEGIN_MARKER}\n");
        assert_eq!(remove_block(&text), text);
    }

    #[test]
    fn block_without_final_newline_and_crlf_markers() {
        let text = format!("{BEGIN_MARKER}\r\nInclude {INC}\r\n{END_MARKER}");
        assert_eq!(remove_block(&text), "");
        let text = format!("Host a\n{BEGIN_MARKER}\nInclude x\n{END_MARKER}");
        assert_eq!(remove_block(&text), "Host a\n");
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        let b = block(Path::new("/home/a b/ssh_config"));
        assert!(b.contains("Include \"/home/a b/ssh_config\"\n"), "{b}");
        let c = wick_ssh_config(
            Path::new("/k"),
            Path::new("/h h"),
            "/bin/wick vm ssh-proxy %h %p",
        );
        assert!(c.contains("IdentityFile /k\n"));
        assert!(c.contains("UserKnownHostsFile \"/h h\"\n"));
        assert!(c.contains("StrictHostKeyChecking accept-new\n"));
        assert!(c.contains("Host *.vm\n    User root\n"));
        assert!(c.contains("    ProxyCommand /bin/wick vm ssh-proxy %h %p\n"));
    }

    #[test]
    fn layout() {
        let p = SshPaths::under(Path::new("/r"), Path::new("/home/u"));
        assert_eq!(p.config, Path::new("/r/ssh_config"));
        assert_eq!(p.key, Path::new("/r/id_ed25519"));
        assert_eq!(p.known_hosts, Path::new("/r/known_hosts"));
        assert_eq!(p.user_config, Path::new("/home/u/.ssh/config"));
    }
}
