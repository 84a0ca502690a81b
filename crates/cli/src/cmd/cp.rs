//! `wick vm cp SRC DST`: copy between the host and a VM as tar streams through the agent.
//!
//! Host → guest: the host file or tree is archived (the `tar` crate, symlinks kept as symlinks,
//! modes and mtimes recorded) on a blocking thread and streamed into the agent's `PutFiles`,
//! which refuses entries escaping the destination. Guest → host: the agent's `GetFiles` archive
//! is unpacked by [`unpack_safe`], which refuses absolute paths, `..`, writes through symlinks
//! and hard links outside the destination.
//!
//! Naming follows `cp -r`: when DST is an existing directory (or ends with `/`), SRC lands inside
//! it under its own name; otherwise SRC is copied *as* DST. The archive's single top-level entry
//! is named accordingly, so no rename happens after the fact.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use wick_agent_proto::tarfs::{check_inside, safe_relative};

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use wick_agent_proto::{AgentChannel, ExecRequest, DATA_CHUNK};

use super::Ctx;
use crate::agent;
use crate::cli::CpArgs;

/// Where a guest path is relative to when not absolute.
const GUEST_HOME: &str = "/root";

/// One side of `vm cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Host(PathBuf),
    /// A VM and an absolute guest path (`dir_hint`: it ended with `/`).
    Guest {
        vm: String,
        path: String,
        dir_hint: bool,
    },
}

/// `VM:PATH` is a guest location when VM is non-empty and has no `/`, and the argument does not
/// start with `/` or `.` (so `./a:b` and `/x:y` stay host paths). A relative guest PATH is
/// relative to `/root`; an empty one means `/root`.
pub fn parse_location(arg: &str) -> Location {
    if !arg.starts_with('/') && !arg.starts_with('.') {
        if let Some((vm, path)) = arg.split_once(':') {
            if !vm.is_empty() && !vm.contains('/') {
                let dir_hint = path.ends_with('/');
                let trimmed = path.trim_end_matches('/');
                let path = if trimmed.is_empty() {
                    if path.starts_with('/') {
                        "/".to_string()
                    } else {
                        GUEST_HOME.to_string()
                    }
                } else if trimmed.starts_with('/') {
                    trimmed.to_string()
                } else {
                    format!("{GUEST_HOME}/{trimmed}")
                };
                return Location::Guest {
                    vm: vm.to_string(),
                    path,
                    dir_hint,
                };
            }
        }
    }
    Location::Host(PathBuf::from(arg))
}

pub async fn run(ctx: &Ctx, a: CpArgs) -> Result<()> {
    match (parse_location(&a.src), parse_location(&a.dst)) {
        (Location::Host(src), Location::Guest { vm, path, dir_hint }) => {
            let chan = agent::channel(ctx.client(), &vm);
            let t = Instant::now();
            let (entries, bytes) = to_guest(&chan, &src, &path, dir_hint).await?;
            eprintln!("{}", summary(entries, bytes, t, &format!("{vm}:{path}")));
            Ok(())
        }
        (Location::Guest { vm, path, .. }, Location::Host(dst)) => {
            let chan = agent::channel(ctx.client(), &vm);
            let t = Instant::now();
            let (entries, bytes) = to_host(&chan, &path, &a.dst, &dst).await?;
            eprintln!("{}", summary(entries, bytes, t, &a.dst));
            Ok(())
        }
        (Location::Guest { .. }, Location::Guest { .. }) => bail!(
            "both {} and {} name a VM; copy through the host in two steps (VM:PATH on one side \
             only)",
            a.src,
            a.dst
        ),
        (Location::Host(_), Location::Host(_)) => bail!(
            "neither {} nor {} names a VM: write the guest side as VM:PATH, e.g. \
             `wick vm cp ./dir a1:/root/dir` or `wick vm cp a1:/etc/hostname .`",
            a.src,
            a.dst
        ),
    }
}

fn summary(entries: u64, bytes: u64, t: Instant, to: &str) -> String {
    let secs = t.elapsed().as_secs_f64();
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!(
        "copied {entries} entries ({mib:.1} MiB) to {to} in {secs:.2} s ({:.1} MiB/s)",
        mib / secs.max(1e-6)
    )
}

/// The last component of `p` as an archive name (`.`/`..`/`/` have none).
fn base_name(p: &str) -> Option<String> {
    let name = Path::new(p).file_name()?.to_string_lossy().into_owned();
    (!name.is_empty()).then_some(name)
}

/// The parent of an absolute guest path (`/` for top-level names).
fn guest_parent(p: &str) -> String {
    match p.rsplit_once('/') {
        Some(("", _)) | None => "/".to_string(),
        Some((parent, _)) => parent.to_string(),
    }
}

/// Host → guest. Returns (entries, bytes) as the agent counted them.
async fn to_guest(
    chan: &AgentChannel,
    src: &Path,
    dst: &str,
    dst_dir_hint: bool,
) -> Result<(u64, u64)> {
    let meta = src
        .symlink_metadata()
        .with_context(|| format!("cannot read {}", src.display()))?;
    let src_name = match src.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        // `.`, `..` or `/`: name it after what it resolves to.
        None => fs::canonicalize(src)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .with_context(|| {
                format!("cannot copy {} itself; name a path below it", src.display())
            })?,
    };
    if meta.file_type().is_socket_like() {
        bail!(
            "{} is a socket or device; only files, directories and symlinks can be copied",
            src.display()
        );
    }
    // Into DST (existing directory, or a trailing slash), or as DST.
    let into = dst_dir_hint || dst == "/" || guest_is_dir(chan, dst).await?;
    let (dest_dir, name) = if into {
        (dst.to_string(), src_name)
    } else {
        let name = base_name(dst).context("the destination has no file name")?;
        (guest_parent(dst), name)
    };
    let (mut w, reader) = wick_agent_proto::pipe::pipe();
    let src_owned = src.to_path_buf();
    let builder = tokio::task::spawn_blocking(move || {
        match archive(&src_owned, Path::new(&name), &mut w) {
            Ok(()) => w.finish(),
            Err(e) => {
                // Make the reader fail, so a partial archive is never sent as complete.
                w.fail(io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
        }
    });
    let put = chan.put_tar(&dest_dir, reader).await;
    let built = builder.await.context("the archiving thread panicked")?;
    if let Err(e) = built {
        return Err(e).with_context(|| format!("archiving {}", src.display()));
    }
    let done = put.map_err(agent::to_anyhow)?;
    Ok((done.entries, done.bytes))
}

/// Whether the guest path is an existing directory (following symlinks, like `cp`).
async fn guest_is_dir(chan: &AgentChannel, path: &str) -> Result<bool> {
    let st = chan
        .exec(ExecRequest::new(["test", "-d", path]))
        .await
        .map_err(agent::to_anyhow)?
        .wait()
        .await
        .map_err(agent::to_anyhow)?;
    Ok(st.success())
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}

impl SocketLike for fs::FileType {
    fn is_socket_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_socket() || self.is_block_device() || self.is_char_device()
    }
}

/// Guest → host. Returns (entries, bytes unpacked).
async fn to_host(chan: &AgentChannel, src: &str, dst_arg: &str, dst: &Path) -> Result<(u64, u64)> {
    let Some(src_name) = base_name(src) else {
        bail!("cannot copy the guest's / itself; name a path below it");
    };
    let into = dst_arg.ends_with('/') || dst.is_dir();
    let (dest_dir, name) = if into {
        if !dst.exists() {
            fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
        }
        (dst.to_path_buf(), src_name)
    } else {
        let name = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", dst.display()))?;
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!(
                "{} does not exist: create it first (or end DST with / to create it)",
                parent.display()
            );
        }
        (parent, name)
    };
    let mut tar = chan.get_tar(src).await.map_err(agent::to_anyhow)?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack_safe(
            wick_agent_proto::pipe::BlockingChunkReader::new(rx),
            &dest_dir,
            &name,
        )
    });
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut streamed = Ok(());
    loop {
        match tar.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    break; // the unpacker stopped: its result says why
                }
            }
            Err(e) => {
                streamed = Err(e);
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpacker.await.context("the unpacking thread panicked")?;
    streamed.with_context(|| format!("receiving {src} from the guest"))?;
    unpacked
}

/// Archives `src` as `name`: directories recursively (sorted), symlinks as symlinks, sockets
/// skipped.
fn archive<W: Write>(src: &Path, name: &Path, out: W) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    wick_agent_proto::tarfs::append_tree(&mut b, src, name)?;
    b.finish()
}

/// `rel` with its first component replaced by `name`.
fn renamed(rel: &Path, name: &str) -> PathBuf {
    let mut it = rel.components();
    it.next();
    let rest = it.as_path();
    if rest.as_os_str().is_empty() {
        PathBuf::from(name) // `join("")` would add a trailing slash
    } else {
        Path::new(name).join(rest)
    }
}

/// Unpacks a tar archive holding one top-level entry into `dest`, naming that entry `name`.
/// Refuses (with an error, before writing the entry) absolute paths, `..`, more than one
/// top-level entry, paths through symlinks leading outside `dest`, and hard links to outside.
/// Modes and mtimes are kept (ownership is not); directories get their modes last so read-only
/// ones do not block their contents. Returns (entries, bytes of file data).
pub fn unpack_safe<R: Read>(archive: R, dest: &Path, name: &str) -> Result<(u64, u64)> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid destination name {name:?}");
    }
    let dest = dest
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dest.display()))?;
    let fail = |what: String| anyhow::anyhow!("unpacking into {}: {what}", dest.display());
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    let mut top: Option<PathBuf> = None;
    let mut dirs = Vec::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    for entry in ar.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(format!("reading the archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| fail(format!("bad entry name: {e}")))?
            .into_owned();
        let rel = safe_relative(&raw)
            .map_err(|why| fail(format!("refusing entry {}: its path {why}", raw.display())))?;
        let Some(first) = rel.components().next() else {
            continue; // `./` itself
        };
        let first = PathBuf::from(first.as_os_str());
        match &top {
            None => top = Some(first.clone()),
            Some(t) if *t != first => {
                return Err(fail(format!(
                    "refusing entry {}: the archive has more than one top-level entry",
                    raw.display()
                )))
            }
            Some(_) => {}
        }
        let target = dest.join(renamed(&rel, name));
        if let Some(parent) = target.parent() {
            check_inside(&dest, parent)
                .map_err(|why| fail(format!("refusing entry {}: {why}", raw.display())))?;
        }
        count += 1;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            fs::create_dir_all(&target)
                .map_err(|e| fail(format!("creating {}: {e}", target.display())))?;
            dirs.push((
                target,
                entry.header().mode().ok(),
                entry.header().mtime().ok(),
            ));
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| fail(format!("creating {}: {e}", parent.display())))?;
        }
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| fail(format!("bad link name of {}: {e}", raw.display())))?
                .unwrap_or_default()
                .into_owned();
            let link_rel = safe_relative(&link).map_err(|why| {
                fail(format!(
                    "refusing hard link {} -> {}: its target {why}",
                    raw.display(),
                    link.display()
                ))
            })?;
            if !top.as_ref().is_some_and(|t| link_rel.starts_with(t)) {
                return Err(fail(format!(
                    "refusing hard link {} -> {}: the target is outside the archive",
                    raw.display(),
                    link.display()
                )));
            }
            let src = dest.join(renamed(&link_rel, name));
            check_inside(&dest, &src)
                .map_err(|why| fail(format!("refusing hard link {}: {why}", raw.display())))?;
            let _ = fs::remove_file(&target);
            fs::hard_link(&src, &target)
                .map_err(|e| fail(format!("linking {}: {e}", target.display())))?;
            continue;
        }
        if target.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            return Err(fail(format!(
                "refusing entry {}: {} is a directory",
                raw.display(),
                target.display()
            )));
        }
        bytes += entry.header().size().unwrap_or(0);
        entry
            .unpack(&target)
            .map_err(|e| fail(format!("writing {}: {e}", target.display())))?;
    }
    if top.is_none() {
        return Err(fail("the archive is empty".into()));
    }
    // Deepest first, so a read-only parent is applied after its children.
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode, mtime) in dirs.into_iter().rev() {
        if let Some(mode) = mode {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| fail(format!("setting the mode of {}: {e}", dir.display())))?;
        }
        if let Some(mtime) = mtime {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
            if let Ok(f) = fs::File::open(&dir) {
                let _ = f.set_modified(t);
            }
        }
    }
    Ok((count, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn guest(vm: &str, path: &str, dir_hint: bool) -> Location {
        Location::Guest {
            vm: vm.into(),
            path: path.into(),
            dir_hint,
        }
    }

    #[test]
    fn locations() {
        assert_eq!(parse_location("a1:/etc/x"), guest("a1", "/etc/x", false));
        assert_eq!(parse_location("a1:src"), guest("a1", "/root/src", false));
        assert_eq!(parse_location("a1:"), guest("a1", "/root", false));
        assert_eq!(parse_location("a1:/"), guest("a1", "/", true));
        assert_eq!(parse_location("a1:/tmp/d/"), guest("a1", "/tmp/d", true));
        assert_eq!(parse_location("a1:a:b"), guest("a1", "/root/a:b", false));
        for host in [
            "./a1:x", "/tmp/a:b", "dir/a:b", "plain", ":x", ".", "../x:y",
        ] {
            assert_eq!(parse_location(host), Location::Host(host.into()), "{host}");
        }
    }

    #[test]
    fn guest_paths() {
        assert_eq!(guest_parent("/root/x"), "/root");
        assert_eq!(guest_parent("/x"), "/");
        assert_eq!(base_name("/root/x"), Some("x".into()));
        assert_eq!(base_name("/"), None);
    }

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("sub/deep")).unwrap();
        fs::write(root.join("a.txt"), b"hello").unwrap();
        fs::write(root.join("sub/bin"), (0..=255u8).collect::<Vec<_>>()).unwrap();
        fs::set_permissions(root.join("sub/bin"), fs::Permissions::from_mode(0o751)).unwrap();
        symlink("../a.txt", root.join("sub/link")).unwrap();
        fs::set_permissions(root.join("sub/deep"), fs::Permissions::from_mode(0o500)).unwrap();
    }

    fn tar_bytes(src: &Path, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        archive(src, Path::new(name), &mut out).unwrap();
        out
    }

    #[test]
    fn round_trip_with_rename() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        tree(&src);
        let dest = d.path().join("out");
        fs::create_dir(&dest).unwrap();
        let (n, bytes) = unpack_safe(&tar_bytes(&src, "src")[..], &dest, "copy").unwrap();
        assert_eq!((n, bytes), (6, 5 + 256));
        let c = dest.join("copy");
        assert_eq!(fs::read(c.join("a.txt")).unwrap(), b"hello");
        assert_eq!(fs::read(c.join("sub/bin")).unwrap().len(), 256);
        let mode = fs::metadata(c.join("sub/bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(
            fs::read_link(c.join("sub/link")).unwrap(),
            PathBuf::from("../a.txt")
        );
        let mode = fs::metadata(c.join("sub/deep"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o500);
        // A single file, renamed.
        unpack_safe(&tar_bytes(&src.join("a.txt"), "a.txt")[..], &dest, "b.txt").unwrap();
        assert_eq!(fs::read(dest.join("b.txt")).unwrap(), b"hello");
        // Make the tree removable for tempdir's cleanup.
        for p in [src.join("sub/deep"), c.join("sub/deep")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    /// A raw archive with hand-made entries (the tar builder refuses some bad names).
    fn raw_tar(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                let lb = l.as_bytes();
                h.as_old_mut().linkname[..lb.len()].copy_from_slice(lb);
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn refuses_escapes() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let out_s = outside.to_str().unwrap().to_string();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                raw_tar(&[("top/../../x", T::Regular, None, b"x")]),
            ),
            ("absolute", raw_tar(&[("/tmp/x", T::Regular, None, b"x")])),
            (
                "two tops",
                raw_tar(&[("a", T::Regular, None, b"x"), ("b", T::Regular, None, b"x")]),
            ),
            (
                "through symlink",
                raw_tar(&[
                    ("top", T::Directory, None, b""),
                    ("top/l", T::Symlink, Some(&out_s), b""),
                    ("top/l/x", T::Regular, None, b"x"),
                ]),
            ),
            (
                "hard link outside",
                raw_tar(&[
                    ("top", T::Directory, None, b""),
                    ("top/h", T::Link, Some("../../etc/passwd"), b""),
                ]),
            ),
            (
                "hard link to another top",
                raw_tar(&[
                    ("top", T::Directory, None, b""),
                    ("top/h", T::Link, Some("other/x"), b""),
                ]),
            ),
        ];
        for (i, (what, ar)) in cases.into_iter().enumerate() {
            let dest = d.path().join(format!("case{i}"));
            fs::create_dir(&dest).unwrap();
            let e = unpack_safe(&ar[..], &dest, "top").unwrap_err();
            assert!(e.to_string().contains("refusing"), "{what}: {e}");
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing escaped"
        );
        // A symlink pointing outside is fine as long as nothing is written through it.
        let ar = raw_tar(&[
            ("top", T::Directory, None, b""),
            ("top/l", T::Symlink, Some(&out_s), b""),
            ("top/f", T::Regular, None, b"data"),
            ("top/h", T::Link, Some("top/f"), b""),
        ]);
        unpack_safe(&ar[..], &dest, "top").unwrap();
        assert_eq!(fs::read(dest.join("top/h")).unwrap(), b"data");
        // Unpacking over an existing symlink replaces the link, never the file it points to.
        fs::write(outside.join("victim"), b"keep").unwrap();
        symlink(outside.join("victim"), dest.join("v")).unwrap();
        let ar = raw_tar(&[("v", T::Regular, None, b"new")]);
        unpack_safe(&ar[..], &dest, "v").unwrap();
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(fs::read(dest.join("v")).unwrap(), b"new");
    }
}
