//! A bounded in-memory pipe from a blocking writer (a tar builder on its own thread) to an
//! async reader (what `put_tar` consumes), so archives are streamed, never buffered whole; and
//! [`ChunkReader`], the async end over a channel of chunks, also behind [`crate::TarReader`].

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Size of the chunks handed across; the channel holds a few of them.
const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 8;

/// A new pipe: write the archive into the [`PipeWriter`] on a blocking thread, hand the
/// [`PipeReader`] to the async consumer.
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = mpsc::channel(DEPTH);
    (
        PipeWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
        },
        ChunkReader::new(rx),
    )
}

/// The blocking end. Call [`PipeWriter::finish`] (or drop it) at the end; [`PipeWriter::fail`]
/// makes the reader see an error instead of a clean end.
pub struct PipeWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl PipeWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.send()
    }

    pub fn fail(self, e: io::Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The async end of a [`pipe`].
pub type PipeReader = ChunkReader;

/// An `AsyncRead` over a channel of chunks; an `Err` chunk ends the stream with that error,
/// and a closed channel is a clean end.
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChunkReader {
        ChunkReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.cur.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.cur.len().min(buf.remaining());
        buf.put_slice(&self.cur.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The other direction: a blocking `Read` over a channel of chunks (an async task receives the
/// stream and sends chunks; an unpacker on a blocking thread reads them). A closed channel is
/// the end of the stream.
#[derive(Debug)]
pub struct BlockingChunkReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl BlockingChunkReader {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> BlockingChunkReader {
        BlockingChunkReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl io::Read for BlockingChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(buf.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
