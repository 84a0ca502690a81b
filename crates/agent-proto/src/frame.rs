//! Length-prefixed frames: `u32` BE payload length, `u8` kind, payload (see the crate doc).

use std::io;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted in one frame.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of the data chunks this crate writes (stdio and tar data).
pub const DATA_CHUNK: usize = 256 * 1024;

/// What a frame carries (see the table in the crate doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Reply = 2,
    Stdin = 3,
    StdinEof = 4,
    Resize = 5,
    Signal = 6,
    Stdout = 7,
    Stderr = 8,
    Exit = 9,
    Data = 10,
    DataEnd = 11,
    Error = 12,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match b {
            1 => Request,
            2 => Reply,
            3 => Stdin,
            4 => StdinEof,
            5 => Resize,
            6 => Signal,
            7 => Stdout,
            8 => Stderr,
            9 => Exit,
            10 => Data,
            11 => DataEnd,
            12 => Error,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    /// Decodes the JSON payload of a control frame.
    pub fn json<T: DeserializeOwned>(&self) -> io::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad JSON in a {:?} frame: {e}", self.kind),
            )
        })
    }
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a frame header",
            ));
        }
        got += n;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = FrameKind::from_u8(header[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", header[4]),
        )
    })?;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind,
        payload: payload.into(),
    }))
}

/// Writes one frame (header and payload in a single write).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes exceeds the limit of {MAX_FRAME_LEN}",
                payload.len()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Writes one control frame with a JSON payload.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    value: &T,
) -> io::Result<()> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    write_frame(w, kind, &payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Stdout, b"hello")
            .await
            .unwrap();
        write_json(
            &mut buf,
            FrameKind::Resize,
            &crate::WindowSize { rows: 2, cols: 3 },
        )
        .await
        .unwrap();
        assert_eq!(&buf[..5], &[0, 0, 0, 5, 7]);
        let mut r = &buf[..];
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (FrameKind::Stdout, &b"hello"[..]));
        let f = read_frame(&mut r).await.unwrap().unwrap();
        let ws: crate::WindowSize = f.json().unwrap();
        assert_eq!((ws.rows, ws.cols), (2, 3));
        assert!(read_frame(&mut r).await.unwrap().is_none());

        // Truncated header, unknown kind, oversized frame.
        assert!(read_frame(&mut &[0u8, 0][..]).await.is_err());
        assert!(read_frame(&mut &[0u8, 0, 0, 0, 99][..]).await.is_err());
        assert!(read_frame(&mut &[0xffu8, 0, 0, 0, 1][..]).await.is_err());
    }
}
