//! Many agent connections over one byte stream: the QEMU agent channel.
//!
//! QEMU cannot migrate (snapshot) a VM with a vhost-user vsock device, so QEMU guests reach the
//! agent over a **virtio-serial port** named [`PORT_NAME`] instead. One port is one byte stream;
//! agent-proto needs one connection per request. This module carries many connections over it:
//!
//! - **Link frames** (this file): the stream is cut into frames `0x00 COBS(kind | body | crc32)
//!   0x00`. COBS leaves no zero byte inside a frame, so a reader finds the next frame boundary
//!   wherever it starts reading — after a snapshot restore the guest may hold half a frame of the
//!   old session. The CRC rejects such a torn frame. Frames: `Hello(nonce)` (host), `HelloAck(nonce)`
//!   (guest), `Reset` (guest: "start a new session"), `Data(bytes)` (both).
//! - **Sessions** ([`session`]): the host opens a session with a fresh nonce (`Hello`); the guest
//!   drops whatever session it had, answers `HelloAck`, and both run a yamux connection over the
//!   `Data` frames of that session. The host ignores every frame until the `HelloAck` with its
//!   nonce, so stale bytes of a previous session (before a restore, from an earlier sidecar) never
//!   reach the new one. The guest sends `Reset` whenever it (re)opens the port, so a restarted
//!   agent gets a new session too.
//! - **Streams**: each yamux stream starts with a port header (`u32` LE, host → guest), answered
//!   by one byte ([`ACCEPTED`] or [`REFUSED`]); after that it is the agent connection.
//!
//! Everything the peer controls is bounded: a frame's size ([`MAX_WIRE_FRAME`], longer ones are
//! dropped up to the next boundary), the streams of a session ([`MAX_STREAMS`]) and the receive
//! windows ([`config`]), and the header (four bytes, read with a timeout by the caller).

pub mod session;

use std::io;

/// The name of the virtio-serial port the agent channel uses (QEMU's `virtserialport,name=`).
pub const PORT_NAME: &str = "wick.agent";

/// Largest `Data` payload a sender puts in one frame.
pub const MAX_DATA: usize = 16 * 1024;

/// Largest frame accepted on the wire (COBS-encoded, without the delimiters); longer ones are
/// dropped whole.
pub const MAX_WIRE_FRAME: usize = MAX_DATA + MAX_DATA / 254 + 16;

/// Most concurrent streams in one session (each side refuses more).
pub const MAX_STREAMS: usize = 64;

/// The guest's answer to a port header: someone serves that port.
pub const ACCEPTED: u8 = 0;
/// The guest's answer to a port header: nothing listens there.
pub const REFUSED: u8 = 1;

const KIND_HELLO: u8 = 1;
const KIND_HELLO_ACK: u8 = 2;
const KIND_RESET: u8 = 3;
const KIND_DATA: u8 = 4;

/// One link frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host: start session `nonce`.
    Hello(u64),
    /// Guest: session `nonce` started.
    HelloAck(u64),
    /// Guest: the agent (re)opened the port; please start a new session.
    Reset,
    /// Bytes of the current session's yamux stream.
    Data(Vec<u8>),
}

/// The yamux configuration of both ends: at most [`MAX_STREAMS`] streams, each with yamux's
/// default 256 KiB window, so a peer can make us buffer at most 16 MiB.
pub fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS)
        .set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024))
        .set_split_send_size(MAX_DATA);
    c
}

/// `frame` on the wire: `0x00 COBS(kind | body | crc32 LE) 0x00`.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut raw = Vec::with_capacity(16);
    match frame {
        Frame::Hello(n) => {
            raw.push(KIND_HELLO);
            raw.extend_from_slice(&n.to_le_bytes());
        }
        Frame::HelloAck(n) => {
            raw.push(KIND_HELLO_ACK);
            raw.extend_from_slice(&n.to_le_bytes());
        }
        Frame::Reset => raw.push(KIND_RESET),
        Frame::Data(d) => {
            raw.reserve(d.len() + 4);
            raw.push(KIND_DATA);
            raw.extend_from_slice(d);
        }
    }
    let crc = crc32fast::hash(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 254 + 3);
    out.push(0);
    cobs_encode(&raw, &mut out);
    out.push(0);
    out
}

/// Consistent Overhead Byte Stuffing: `data` without any zero byte, one extra byte per 254.
fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code: u8 = 1;
    for &b in data {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xff {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

/// The inverse of [`cobs_encode`]; `None` when `data` is not a valid encoding.
fn cobs_decode(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        let code = data[i] as usize;
        if code == 0 || i + code > data.len() {
            return None;
        }
        out.extend_from_slice(&data[i + 1..i + code]);
        i += code;
        if code < 0xff && i < data.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Parses one decoded frame (kind, body, CRC).
fn parse(raw: &[u8]) -> Option<Frame> {
    if raw.len() < 5 {
        return None;
    }
    let (body, crc) = raw.split_at(raw.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let nonce = || {
        body.get(1..9)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match (body[0], body.len()) {
        (KIND_HELLO, 9) => nonce().map(Frame::Hello),
        (KIND_HELLO_ACK, 9) => nonce().map(Frame::HelloAck),
        (KIND_RESET, 1) => Some(Frame::Reset),
        (KIND_DATA, n) if n > 1 => Some(Frame::Data(body[1..].to_vec())),
        _ => None,
    }
}

/// Splits the incoming byte stream into frames. Memory is bounded by [`MAX_WIRE_FRAME`]: an
/// overlong frame is dropped up to its end. Torn or corrupt frames are counted and dropped.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Inside an overlong frame: skip to the next boundary.
    skipping: bool,
    /// Frames dropped so far (torn, corrupt, overlong, unknown).
    pub dropped: u64,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feeds `bytes`; returns the complete frames they finish, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for chunk in bytes.split_inclusive(|b| *b == 0) {
            let (body, ends) = match chunk.split_last() {
                Some((0, body)) => (body, true),
                _ => (chunk, false),
            };
            if !self.skipping {
                if self.buf.len() + body.len() > MAX_WIRE_FRAME {
                    self.buf.clear();
                    self.skipping = true;
                    self.dropped += 1;
                } else {
                    self.buf.extend_from_slice(body);
                }
            }
            if ends {
                if !self.skipping && !self.buf.is_empty() {
                    match cobs_decode(&self.buf).as_deref().and_then(parse) {
                        Some(f) => frames.push(f),
                        None => self.dropped += 1,
                    }
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
        frames
    }
}

/// Writes the port header of a new stream.
pub async fn write_port<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, port: u32) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&port.to_le_bytes()).await?;
    w.flush().await
}

/// Reads the port header of a new stream (the caller bounds it in time).
pub async fn read_port<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<u32> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::Hello(0),
            Frame::HelloAck(u64::MAX),
            Frame::Reset,
            Frame::Data(vec![0; 600]),
            Frame::Data((0..=255).cycle().take(MAX_DATA).collect()),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(encode).collect();
        let mut d = Decoder::new();
        assert_eq!(d.push(&wire), frames);
        assert_eq!(d.dropped, 0);
        // Byte by byte gives the same.
        let mut d = Decoder::new();
        let got: Vec<Frame> = wire.iter().flat_map(|b| d.push(&[*b])).collect();
        assert_eq!(got, frames);
    }

    #[test]
    fn a_torn_frame_is_dropped_and_the_next_one_found() {
        let old = encode(&Frame::Data(vec![7; 5000]));
        let new = encode(&Frame::Hello(42));
        // (old[1..] would still be whole: only its leading delimiter is gone.)
        for cut in [2, 3, 100, old.len() - 2] {
            let mut d = Decoder::new();
            let mut wire = old[cut..].to_vec();
            wire.extend_from_slice(&new);
            assert!(d.push(&wire) == vec![Frame::Hello(42)], "cut at {cut}");
            // And a tail of the old stream cut at the other end.
            let mut d = Decoder::new();
            let mut wire = old[..cut].to_vec();
            wire.extend_from_slice(&new);
            assert!(d.push(&wire) == vec![Frame::Hello(42)], "cut at {cut}");
        }
    }

    #[test]
    fn overlong_and_corrupt_frames_are_bounded_and_dropped() {
        let mut d = Decoder::new();
        let mut wire = vec![0u8];
        wire.extend(std::iter::repeat_n(9u8, 10 * MAX_WIRE_FRAME));
        wire.push(0);
        let mut bad = encode(&Frame::HelloAck(5));
        bad[3] ^= 0x40;
        wire.extend_from_slice(&bad);
        wire.extend_from_slice(&encode(&Frame::Reset));
        assert_eq!(d.push(&wire), vec![Frame::Reset]);
        assert_eq!(d.dropped, 2);
        assert!(d.buf.capacity() <= 2 * MAX_WIRE_FRAME);
    }

    proptest! {
        #[test]
        fn cobs_round_trips(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut enc = Vec::new();
            cobs_encode(&data, &mut enc);
            prop_assert!(!enc.contains(&0));
            prop_assert_eq!(cobs_decode(&enc), Some(data));
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut d = Decoder::new();
            let _ = d.push(&data);
        }
    }
}
