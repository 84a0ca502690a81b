//! `wick vm cp SRC DST`: copy between the host and a VM as tar streams through the agent.
//!
//! Host → guest: the host file or tree is archived (the `tar` crate, symlinks kept as symlinks,
//! modes and mtimes recorded) on a blocking thread and streamed into the agent's `PutFiles`,
//! which unpacks it with the shared `tarfs::unpack`. Guest → host: the agent's `GetFiles`
//! archive (attacker input: a hostile guest crafts it) is unpacked by [`unpack_safe`], the same
//! unpacker, which never follows a symlink below DST and drops setuid/setgid/sticky bits.
//!
//! Naming follows `cp -r`: when DST is an existing directory (or ends with `/`), SRC lands inside
//! it under its own name; otherwise SRC is copied *as* DST. The archive's single top-level entry
//! is named accordingly, so no rename happens after the fact.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use wick_agent_proto::tarfs::{self, UnpackOptions};

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use wick_agent_proto::{AgentChannel, ExecRequest, DATA_CHUNK};

use super::Ctx;
use crate::agent;
use crate::cli::CpArgs;
use crate::render;

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

/// Unpacks a tar archive holding one top-level entry into `dest`, naming that entry `name`,
/// with the shared unpacker (`tarfs::unpack`): absolute paths, `..`, more than one top-level
/// entry, anything below a symlink and hard links to files not from the archive are refused;
/// symlinks are replaced, never followed; setuid/setgid/sticky bits are dropped; device nodes
/// and fifos are skipped (and named on stderr). Returns (entries, bytes of file data).
pub fn unpack_safe<R: Read>(archive: R, dest: &Path, name: &str) -> Result<(u64, u64)> {
    let opts = UnpackOptions {
        rename_top: Some(name.to_string()),
    };
    let done = tarfs::unpack(archive, dest, &opts).map_err(|e| anyhow::anyhow!(e))?;
    if !done.skipped.is_empty() {
        eprintln!(
            "{}",
            render::escape(&format!(
                "warning: skipped {} special file(s) (device nodes, fifos are not copied): {}",
                done.skipped_total,
                done.skipped_summary()
            ))
        );
    }
    Ok((done.entries, done.bytes))
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
