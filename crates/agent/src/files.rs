//! File transfer as tar streams: `PutFiles` unpacks into a directory, refusing every entry that
//! would land outside it; `GetFiles` archives a file or directory tree.
//!
//! The tar work is synchronous (the `tar` crate) and runs on a blocking thread, fed through a
//! bounded channel so a slow disk pushes back on the host.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use wick_agent_proto::tarfs::{self, UnpackOptions};

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

/// Unpacks `archive` into `dest` with the shared unpacker (`tarfs::unpack`: nothing outside
/// `dest` is followed or written, special mode bits are dropped). Returns the number of
/// entries; skipped device nodes and fifos are logged.
fn unpack<R: Read>(archive: R, dest: &Path) -> Result<u64, RemoteError> {
    let done = tarfs::unpack(archive, dest, &UnpackOptions::default()).map_err(RemoteError::new)?;
    if !done.skipped.is_empty() {
        tracing::warn!(
            "unpacking into {}: skipped {}",
            dest.display(),
            done.skipped_summary()
        );
    }
    Ok(done.entries)
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
    fn unpacks_with_the_shared_unpacker() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("d")).unwrap();
        fs::write(src.path().join("d/f"), b"x").unwrap();
        let mut b = tar::Builder::new(Vec::new());
        wick_agent_proto::tarfs::append_tree(&mut b, &src.path().join("d"), Path::new("d"))
            .unwrap();
        let bytes = b.into_inner().unwrap();
        let dest = tempfile::tempdir().unwrap();
        assert_eq!(unpack(&bytes[..], dest.path()).unwrap(), 2);
        assert_eq!(fs::read(dest.path().join("d/f")).unwrap(), b"x");
        let e = unpack(&b"not a tar archive at all"[..], dest.path());
        assert!(e.is_err());
    }
}
