//! The one tar a prepare streams into the guest: git directories and metadata, working-tree
//! files, the history pack, and the manifest last.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use wick_agent_proto::pipe::PipeWriter;
use wick_agent_proto::AgentClient;

use super::history::{History, PackJob};
use crate::inspect::RepoPlan;
use crate::manifest::{Entry, Kind, Manifest, Meta};
use crate::{Mode, Result, WorkspaceError, MANIFEST_NAME};

/// Everything the one tar carries, in the order it is written.
pub(super) struct Archive {
    meta_files: Vec<(String, Vec<u8>, u32)>,
    files: Vec<(Vec<u8>, Entry)>,
    pack: Option<PackJob>,
    manifest: Vec<u8>,
}

impl Archive {
    /// The archive of a prepare, and the pack's directory (to keep until the archive is sent).
    pub(super) fn new(
        plan: &RepoPlan,
        source_path: &str,
        fresh: bool,
        current: BTreeMap<Vec<u8>, Entry>,
        files: Vec<(Vec<u8>, Entry)>,
        history: History,
    ) -> (Archive, Option<tempfile::TempDir>) {
        let shallow = plan.mode == Mode::Shallow;
        let manifest = Manifest {
            meta: Meta {
                source_path: source_path.to_string(),
                mode: plan.mode,
                head: plan.head.clone(),
                commits: if shallow { history.commits } else { Vec::new() },
                shallow: history.shallow.iter().cloned().collect(),
            },
            entries: current,
        };
        let mut meta_files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        if shallow {
            if fresh {
                meta_files.push((".git/HEAD".into(), head_file(plan), 0o644));
                meta_files.push((".git/config".into(), config_file(plan), 0o644));
                if let Ok(ex) = std::fs::read(plan.git_dir.join("info/exclude")) {
                    meta_files.push((".git/info/exclude".into(), ex, 0o644));
                }
            }
            let mut sh = String::new();
            for c in &history.shallow {
                sh.push_str(c);
                sh.push('\n');
            }
            meta_files.push((".git/shallow".into(), sh.into_bytes(), 0o644));
        }
        let (pack, dir) = history.pack.unzip();
        let archive = Archive {
            meta_files,
            files,
            pack,
            manifest: manifest.encode(),
        };
        (archive, dir)
    }
}

/// Streams the archive into `gp`; returns (pack bytes, archive bytes).
pub(super) async fn send_archive(
    client: &AgentClient,
    root: &Path,
    gp: &str,
    archive: Archive,
) -> Result<(u64, u64)> {
    let (writer, reader) = wick_agent_proto::pipe::pipe();
    let root = root.to_path_buf();
    let tar_job = std::thread::spawn(move || build_tar(writer, &root, archive));
    let put = client.put_tar(gp, reader).await;
    let tar = tar_job.join().unwrap_or_else(|_| {
        Err(WorkspaceError::io("build the archive")(io::Error::other(
            "the archive builder panicked",
        )))
    });
    let (pack_bytes, archive_len) = tar?;
    let done = put?;
    Ok((pack_bytes, done.bytes.max(archive_len)))
}

fn head_file(plan: &RepoPlan) -> Vec<u8> {
    match &plan.branch {
        Some(b) => format!("ref: refs/heads/{b}\n").into_bytes(),
        None => format!("{}\n", plan.head).into_bytes(),
    }
}

fn config_file(plan: &RepoPlan) -> Vec<u8> {
    let mut c = String::from("[core]\n");
    if plan.object_format == "sha1" {
        c.push_str("\trepositoryformatversion = 0\n");
    } else {
        c.push_str("\trepositoryformatversion = 1\n");
    }
    c.push_str("\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n");
    if plan.object_format != "sha1" {
        c.push_str(&format!(
            "[extensions]\n\tobjectformat = {}\n",
            plan.object_format
        ));
    }
    c.into_bytes()
}

/// Writes the archive into the pipe; returns (pack bytes, archive bytes).
fn build_tar(mut w: PipeWriter, root: &Path, archive: Archive) -> Result<(u64, u64)> {
    let mut counter = Counter { w: &mut w, n: 0 };
    let mut b = tar::Builder::new(&mut counter);
    let r = write_entries(&mut b, root, archive);
    match r {
        Ok(pack_bytes) => {
            let fin = b.into_inner().map(|c| c.n);
            match fin {
                Ok(n) => {
                    w.finish()
                        .map_err(WorkspaceError::io("stream the archive to the guest"))?;
                    Ok((pack_bytes, n))
                }
                Err(e) => Err(WorkspaceError::io("stream the archive to the guest")(e)),
            }
        }
        Err(e) => {
            // Do not let the builder's drop write an end-of-archive marker: the guest must see
            // the failure, not a shorter archive.
            std::mem::forget(b);
            w.fail(io::Error::other(e.to_string()));
            Err(e)
        }
    }
}

struct Counter<'a> {
    w: &'a mut PipeWriter,
    n: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes the archive's entries: git directories and metadata, files, pack, manifest last.
/// Returns the pack's size.
fn write_entries<W: Write>(b: &mut tar::Builder<W>, root: &Path, archive: Archive) -> Result<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let send_err = WorkspaceError::io("stream the archive to the guest");
    for d in [
        ".git/refs/heads",
        ".git/refs/tags",
        ".git/objects/info",
        ".git/objects/pack",
    ] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, now);
        b.append_data(&mut h, d, io::empty())
            .map_err(WorkspaceError::io("stream the archive to the guest"))?;
    }
    for (path, data, mode) in archive.meta_files {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, now);
        b.append_data(&mut h, &path, &data[..])
            .map_err(WorkspaceError::io("stream the archive to the guest"))?;
    }
    for (p, e) in archive.files {
        append_file(b, root, Path::new(OsStr::from_bytes(&p)), &e)?;
    }
    let pack_bytes = match archive.pack {
        Some(job) => append_pack(b, job, now)?,
        None => 0,
    };
    let manifest = archive.manifest;
    let mut h = header(tar::EntryType::Regular, 0o644, manifest.len() as u64, now);
    b.append_data(&mut h, format!(".git/{MANIFEST_NAME}"), &manifest[..])
        .map_err(send_err)?;
    Ok(pack_bytes)
}

/// One working-tree file or symlink, `rel` to `root`.
fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    e: &Entry,
) -> Result<()> {
    match e.kind {
        Kind::Symlink => {
            let mut h = header(tar::EntryType::Symlink, e.mode, 0, e.mtime_secs());
            b.append_link(&mut h, rel, Path::new(OsStr::from_bytes(&e.target)))
                .map_err(WorkspaceError::io(format!(
                    "archive the link {}",
                    rel.display()
                )))?;
        }
        Kind::File => {
            let full = root.join(rel);
            let f = File::open(&full).map_err(WorkspaceError::io(format!(
                "cannot read {} (did it change during the copy? prepare again)",
                full.display()
            )))?;
            // Exactly the size in the header, even if the file changes meanwhile (the
            // manifest then differs and the next prepare sends it again).
            let data = f.take(e.size).chain(io::repeat(0)).take(e.size);
            let mut h = header(tar::EntryType::Regular, e.mode, e.size, e.mtime_secs());
            b.append_data(&mut h, rel, data)
                .map_err(WorkspaceError::io(format!("archive {}", full.display())))?;
        }
    }
    Ok(())
}

/// The history pack's files once the packing thread is done; returns their size.
fn append_pack<W: Write>(b: &mut tar::Builder<W>, job: PackJob, now: i64) -> Result<u64> {
    let files = job.join().unwrap_or_else(|_| {
        Err(WorkspaceError::io("pack the history")(io::Error::other(
            "the packing thread panicked",
        )))
    })?;
    let mut pack_bytes = 0u64;
    for f in files {
        let name = f.file_name().unwrap_or_default().to_owned();
        let file =
            File::open(&f).map_err(WorkspaceError::io(format!("cannot read {}", f.display())))?;
        let len = file
            .metadata()
            .map_err(WorkspaceError::io(format!("cannot stat {}", f.display())))?
            .len();
        pack_bytes += len;
        let mut h = header(tar::EntryType::Regular, 0o444, len, now);
        let dest = Path::new(".git/objects/pack").join(name);
        b.append_data(&mut h, dest, file.take(len))
            .map_err(WorkspaceError::io("stream the history pack"))?;
    }
    Ok(pack_bytes)
}
