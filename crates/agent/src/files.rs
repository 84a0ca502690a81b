//! File transfer as tar streams: `PutFiles` unpacks into a directory, refusing every entry that
//! would land outside it; `GetFiles` archives a file or directory tree.
//!
//! The tar work is synchronous (the `tar` crate) and runs on a blocking thread, fed through a
//! bounded channel so a slow disk pushes back on the host.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use wick_agent_proto::tarfs::{check_inside, safe_relative};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use wick_agent_proto::{
    read_frame, write_frame, write_json, FrameKind, PutDone, RemoteError, DATA_CHUNK,
};

use crate::server::reply;

/// `PutFiles`: reply ready, receive `Data`… `DataEnd`, unpack, reply [`PutDone`] or the error
/// (as soon as it happens; the rest of the stream is then drained and discarded).
pub async fn put<R, W>(dest_dir: &str, mut rd: R, mut wr: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let dest = PathBuf::from(dest_dir);
    if !dest.is_absolute() {
        return reply::<(), _>(
            &mut wr,
            Err(RemoteError::new(format!(
                "the destination {dest_dir:?} must be an absolute guest path"
            ))),
        )
        .await;
    }
    if let Err(e) = fs::create_dir_all(&dest) {
        return reply::<(), _>(
            &mut wr,
            Err(RemoteError::new(format!("cannot create {dest_dir}: {e}"))),
        )
        .await;
    }
    reply(&mut wr, Ok(())).await?;

    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let unpack_dest = dest.clone();
    let mut unpacker = Some(tokio::task::spawn_blocking(move || {
        unpack(
            wick_agent_proto::pipe::BlockingChunkReader::new(rx),
            &unpack_dest,
        )
    }));
    let mut tx = Some(tx);
    // The unpacker's result, once known before the end of the stream.
    let mut early: Option<Result<u64, RemoteError>> = None;
    let mut bytes = 0u64;
    loop {
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            // The host gave up (or saw our error): nothing more to say.
            Ok(None) | Err(_) => return Ok(()),
        };
        match frame.kind {
            FrameKind::Data => {
                bytes += frame.payload.len() as u64;
                let Some(t) = &tx else {
                    continue; // already finished or failed: discard the rest
                };
                if t.send(frame.payload).await.is_err() {
                    // The unpacker stopped before the stream's end: an error, or the archive's
                    // end-of-archive marker came before the last padding.
                    tx = None;
                    let r = join(unpacker.take()).await;
                    if let Err(e) = &r {
                        reply::<PutDone, _>(&mut wr, Err(e.clone())).await?;
                    }
                    early = Some(r);
                }
            }
            FrameKind::DataEnd => break,
            k => {
                let e = RemoteError::new(format!("unexpected {k:?} frame in a tar stream"));
                return reply::<PutDone, _>(&mut wr, Err(e)).await;
            }
        }
    }
    drop(tx);
    let result = match early {
        Some(Err(_)) => return Ok(()), // already replied
        Some(Ok(n)) => Ok(n),
        None => join(unpacker.take()).await,
    };
    reply(&mut wr, result.map(|entries| PutDone { entries, bytes })).await
}

async fn join(
    task: Option<tokio::task::JoinHandle<Result<u64, RemoteError>>>,
) -> Result<u64, RemoteError> {
    match task {
        Some(t) => t
            .await
            .unwrap_or_else(|e| Err(RemoteError::new(format!("unpacking panicked: {e}")))),
        None => Err(RemoteError::new(
            "internal error: the unpacker was already joined",
        )),
    }
}

/// Unpacks `archive` into `dest`, refusing any entry that would escape it. Returns the number of
/// entries. Directory entries are applied last so read-only directories do not block their
/// contents.
fn unpack<R: Read>(archive: R, dest: &Path) -> Result<u64, RemoteError> {
    let fail =
        |what: String| RemoteError::new(format!("unpacking into {}: {what}", dest.display()));
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    let dest = dest
        .canonicalize()
        .map_err(|e| fail(format!("cannot resolve the destination: {e}")))?;
    let mut dirs = Vec::new();
    let mut count = 0u64;
    for entry in ar.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(format!("reading the archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| fail(format!("bad entry name: {e}")))?
            .into_owned();
        let rel = safe_relative(&raw)
            .map_err(|why| fail(format!("refusing entry {}: its path {why}", raw.display())))?;
        let kind = entry.header().entry_type();
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| fail(format!("bad link name of {}: {e}", raw.display())))?
                .unwrap_or_default();
            safe_relative(&target).map_err(|why| {
                fail(format!(
                    "refusing hard link {} -> {}: its target {why}",
                    raw.display(),
                    target.display()
                ))
            })?;
        }
        count += 1;
        if rel.as_os_str().is_empty() {
            continue; // the destination itself (`./`)
        }
        // Refuse writing through a symlink that leads outside `dest` (the tar crate checks the
        // parent directory too; this also covers the entry's own final component being replaced).
        if let Some(parent) = rel.parent() {
            check_inside(&dest, &dest.join(parent))
                .map_err(|why| fail(format!("refusing entry {}: {why}", raw.display())))?;
        }
        if kind.is_dir() {
            dirs.push(entry);
            continue;
        }
        let unpacked = entry
            .unpack_in(&dest)
            .map_err(|e| fail(format!("writing {}: {e}", raw.display())))?;
        if !unpacked {
            return Err(fail(format!(
                "refusing entry {}: it would land outside the destination",
                raw.display()
            )));
        }
    }
    // Deepest first, so a read-only parent is applied after its children.
    dirs.reverse();
    for mut d in dirs {
        let name = d.path().map(|p| p.into_owned()).unwrap_or_default();
        d.unpack_in(&dest)
            .map_err(|e| fail(format!("creating directory {}: {e}", name.display())))?;
    }
    Ok(count)
}

/// `GetFiles`: reply ready, then stream a tar of `path` as `Data`… `DataEnd` (or `Error`).
pub async fn get<W: AsyncWrite + Unpin>(path: &str, mut wr: W) -> io::Result<()> {
    let src = PathBuf::from(path);
    if !src.is_absolute() {
        return reply::<(), _>(
            &mut wr,
            Err(RemoteError::new(format!(
                "the path {path:?} must be an absolute guest path"
            ))),
        )
        .await;
    }
    if let Err(e) = src.symlink_metadata() {
        return reply::<(), _>(
            &mut wr,
            Err(RemoteError::new(format!("cannot read {path}: {e}"))),
        )
        .await;
    }
    reply(&mut wr, Ok(())).await?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let task = tokio::task::spawn_blocking(move || archive(&src, ChannelWriter::new(tx)));
    while let Some(chunk) = rx.recv().await {
        write_frame(&mut wr, FrameKind::Data, &chunk).await?;
    }
    let result = task
        .await
        .unwrap_or_else(|e| Err(RemoteError::new(format!("archiving panicked: {e}"))));
    match result {
        Ok(()) => write_frame(&mut wr, FrameKind::DataEnd, &[]).await?,
        Err(e) => {
            tracing::info!("get {path}: {e}");
            write_json(&mut wr, FrameKind::Error, &e).await?
        }
    }
    wr.shutdown().await
}

/// A blocking `Write` that sends [`DATA_CHUNK`]-sized chunks into a channel.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(DATA_CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(DATA_CHUNK));
        self.tx
            .blocking_send(chunk.into())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(DATA_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == DATA_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Archives `src` (file, symlink or directory tree) under its own name. Sockets are skipped;
/// symlinks are stored as symlinks.
fn archive(src: &Path, out: ChannelWriter) -> Result<(), RemoteError> {
    let fail = |e: io::Error| RemoteError::new(format!("archiving {}: {e}", src.display()));
    let name = src
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    wick_agent_proto::tarfs::append_tree(&mut b, src, &name).map_err(fail)?;
    let mut out = b.into_inner().map_err(fail)?;
    out.flush().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_paths() {
        assert_eq!(
            safe_relative(Path::new("./a/b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert!(safe_relative(Path::new("a/../../x")).is_err());
        assert!(safe_relative(Path::new("/etc/x")).is_err());
        assert_eq!(safe_relative(Path::new(".")).unwrap(), PathBuf::new());
    }
}
