//! bzImage → ELF vmlinux: find the compressed kernel inside an x86 boot image and decompress it.
//!
//! Like the kernel's `scripts/extract-vmlinux`, with one shortcut first: boot protocol 2.08+
//! headers say exactly where the payload is (`payload_offset`/`payload_length`). Otherwise (or if
//! that fails) every offset where a compression magic appears is tried in file order, and the
//! first one that decompresses to a complete ELF wins. Candidates are rejected after their first
//! few output bytes when those are not `\x7fELF`, so scanning stays cheap.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::{elf, KernelError, Result};

/// Largest vmlinux we accept (guards against decompression bombs).
pub const MAX_VMLINUX: usize = 1 << 30;

/// Payload compression formats a bzImage can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Xz,
    Lzma,
    Lz4,
    Zstd,
    Bzip2,
}

impl Compression {
    /// All formats with the magic bytes that start their streams.
    pub const MAGICS: [(Compression, &'static [u8]); 6] = [
        (Compression::Gzip, &[0x1f, 0x8b, 0x08]),
        (Compression::Xz, &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]),
        (Compression::Lz4, &[0x02, 0x21, 0x4c, 0x18]),
        (Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd]),
        (Compression::Bzip2, &[0x42, 0x5a, 0x68]),
        (Compression::Lzma, &[0x5d, 0x00, 0x00]),
    ];

    /// Which format a stream starting with `data` is in, if any.
    pub fn sniff(data: &[u8]) -> Option<Compression> {
        Compression::MAGICS
            .iter()
            .find(|(_, m)| data.starts_with(m))
            .map(|(c, _)| *c)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lzma => "lzma",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        })
    }
}

/// The parts of the x86 setup header wick reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    /// Offset of the protected-mode code in the file: `(setup_sects + 1) * 512`.
    pub pm_offset: usize,
    /// The `kernel_version` string (release first, e.g. `6.1.0-28-cloud-amd64 (...) #1 SMP ...`).
    pub version: Option<String>,
    /// `(file offset, length)` of the compressed payload (protocol ≥ 2.08).
    pub payload: Option<(usize, usize)>,
}

/// Reads the setup header of a bzImage; `None` when there is no `HdrS` magic.
pub fn parse_header(d: &[u8]) -> Option<SetupHeader> {
    if d.len() < 0x250 || &d[0x202..0x206] != b"HdrS" {
        return None;
    }
    let le16 = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]);
    let le32 = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
    let protocol = le16(0x206);
    let setup_sects = match d[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm_offset = (setup_sects + 1) * 512;
    let version = match le16(0x20e) {
        0 => None,
        p => {
            let start = p as usize + 0x200;
            d.get(start..d.len().min(start + 256)).and_then(|s| {
                let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
                std::str::from_utf8(&s[..end]).ok().map(str::to_string)
            })
        }
    };
    let payload = if protocol >= 0x0208 {
        let off = pm_offset + le32(0x248) as usize;
        let len = le32(0x24c) as usize;
        (len > 0 && off.checked_add(len).is_some_and(|e| e <= d.len())).then_some((off, len))
    } else {
        None
    };
    Some(SetupHeader {
        protocol,
        pm_offset,
        version,
        payload,
    })
}

/// The result of [`extract_vmlinux`].
#[derive(Debug)]
pub struct Extracted {
    /// The ELF vmlinux.
    pub vmlinux: Vec<u8>,
    /// How the payload was compressed.
    pub compression: Compression,
    /// Where in the bzImage the payload started.
    pub offset: usize,
}

/// Every `(offset, format)` where a compression magic occurs, in file order.
pub fn scan_payloads(d: &[u8]) -> Vec<(usize, Compression)> {
    let mut out = Vec::new();
    for (c, magic) in Compression::MAGICS {
        let mut from = 0;
        while let Some(i) = elf::find(&d[from..], magic) {
            out.push((from + i, c));
            from += i + 1;
        }
    }
    out.sort_by_key(|(o, _)| *o);
    out
}

/// Extracts the ELF vmlinux from a bzImage's bytes.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Extracted> {
    let header = parse_header(bzimage);
    let mut tried = Vec::new();
    if let Some((off, len)) = header.as_ref().and_then(|h| h.payload) {
        if let Some(c) = Compression::sniff(&bzimage[off..]) {
            match decompress_elf(&bzimage[off..off + len], c) {
                Ok(v) => {
                    return Ok(Extracted {
                        vmlinux: v,
                        compression: c,
                        offset: off,
                    })
                }
                Err(e) => tried.push(format!("{c} at {off:#x} (from the header): {e}")),
            }
        }
    }
    let start = header
        .as_ref()
        .map_or(0, |h| h.pm_offset.min(bzimage.len()));
    let candidates = scan_payloads(&bzimage[start..]);
    let mut rejected = 0usize;
    for (rel, c) in candidates {
        let off = start + rel;
        match decompress_elf(&bzimage[off..], c) {
            Ok(v) => {
                return Ok(Extracted {
                    vmlinux: v,
                    compression: c,
                    offset: off,
                })
            }
            Err(e) if e == NOT_ELF => rejected += 1,
            Err(e) => tried.push(format!("{c} at {off:#x}: {e}")),
        }
    }
    Err(KernelError::Invalid(format!(
        "found no compressed ELF vmlinux in this bzImage ({} candidate(s) failed{}{}); \
         if it uses a compression other than gzip/xz/lzma/lz4/zstd/bzip2, extract the vmlinux \
         yourself and import that",
        tried.len() + rejected,
        if tried.is_empty() { "" } else { ": " },
        tried.join("; ")
    )))
}

const NOT_ELF: &str = "does not decompress to an ELF file";

/// Decompresses one payload candidate and checks it is a complete ELF file.
fn decompress_elf(data: &[u8], c: Compression) -> std::result::Result<Vec<u8>, String> {
    let out = decompress_one(data, c, MAX_VMLINUX, true)?;
    let info = elf::parse(&out)?;
    if !info.segments_in_bounds {
        return Err("the decompressed ELF is truncated (a segment lies past its end)".into());
    }
    Ok(out)
}

/// Decompresses exactly one stream of format `c` at the start of `data` (trailing bytes are
/// ignored), up to `limit` output bytes. With `want_elf`, gives up with an error as soon as the
/// output does not start with the ELF magic.
pub fn decompress_one(
    data: &[u8],
    c: Compression,
    limit: usize,
    want_elf: bool,
) -> std::result::Result<Vec<u8>, String> {
    match c {
        Compression::Lz4 => lz4_legacy_decompress(data, limit, want_elf),
        Compression::Xz => {
            let s =
                xz2::stream::Stream::new_stream_decoder(u64::MAX, 0).map_err(|e| e.to_string())?;
            liblzma_decode(data, s, limit, want_elf)
        }
        Compression::Lzma => {
            let s = xz2::stream::Stream::new_lzma_decoder(u64::MAX).map_err(|e| e.to_string())?;
            liblzma_decode(data, s, limit, want_elf)
        }
        Compression::Gzip => read_stream(flate2::read::GzDecoder::new(data), limit, want_elf),
        Compression::Bzip2 => read_stream(bzip2::read::BzDecoder::new(data), limit, want_elf),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(data)
                .map_err(|e| e.to_string())?
                .single_frame();
            d.window_log_max(31).map_err(|e| e.to_string())?;
            read_stream(d, limit, want_elf)
        }
    }
}

fn read_stream(
    mut r: impl Read,
    limit: usize,
    want_elf: bool,
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    if want_elf {
        let mut head = [0u8; 4];
        r.read_exact(&mut head).map_err(|e| e.to_string())?;
        if &head != b"\x7fELF" {
            return Err(NOT_ELF.into());
        }
        out.extend_from_slice(&head);
    }
    r.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    Ok(out)
}

/// Drives a liblzma decoder (xz or lzma-alone) over `data` until its stream ends; unlike
/// `xz2::read`, bytes after the end of the stream (the kernel's size trailer) are no error.
fn liblzma_decode(
    data: &[u8],
    mut stream: xz2::stream::Stream,
    limit: usize,
    want_elf: bool,
) -> std::result::Result<Vec<u8>, String> {
    use xz2::stream::{Action, Status};
    let mut out: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut pos = 0usize;
    loop {
        if out.capacity() - out.len() < (1 << 16) {
            out.reserve(out.len().clamp(1 << 16, 64 << 20));
        }
        let (in_before, out_before) = (stream.total_in(), out.len());
        let action = if pos >= data.len() {
            Action::Finish
        } else {
            Action::Run
        };
        let status = stream
            .process_vec(&data[pos..], &mut out, action)
            .map_err(|e| e.to_string())?;
        pos += (stream.total_in() - in_before) as usize;
        if want_elf && out.len() >= 4 && !out.starts_with(b"\x7fELF") {
            return Err(NOT_ELF.into());
        }
        if out.len() > limit {
            return Err(format!("decompresses to more than {limit} bytes"));
        }
        if status == Status::StreamEnd {
            return Ok(out);
        }
        if pos >= data.len() && out.len() == out_before && stream.total_in() == in_before {
            return Err("the compressed stream is truncated".into());
        }
    }
}

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

/// Decompresses the LZ4 "legacy" frame the kernel uses (`lz4 -l`): the magic, then chunks of
/// (u32 LE compressed size, LZ4 block) each expanding to at most 8 MiB. The stream has no end
/// marker; it ends at the end of input, at the kernel's 4-byte uncompressed-size trailer, or at
/// bytes that are not another chunk (only after the first chunk). With `want_elf` the first
/// chunk must start with the ELF magic.
pub fn lz4_legacy_decompress(
    data: &[u8],
    limit: usize,
    want_elf: bool,
) -> std::result::Result<Vec<u8>, String> {
    let word = |p: usize| {
        data.get(p..p + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if word(0) != Some(LZ4_LEGACY_MAGIC) {
        return Err("no LZ4 legacy magic".into());
    }
    let mut pos = 4;
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; LZ4_LEGACY_CHUNK];
    while let Some(size) = word(pos) {
        if size == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        if !out.is_empty() && size == out.len() {
            // The kernel's uncompressed-size trailer.
            break;
        }
        let block = match data.get(pos + 4..pos + 4 + size) {
            Some(b) if size > 0 => b,
            _ if !out.is_empty() => break,
            _ => return Err("LZ4 chunk size runs past the end of the data".into()),
        };
        let n = match lz4_flex::block::decompress_into(block, &mut chunk) {
            Ok(n) => n,
            Err(_) if !out.is_empty() => break,
            Err(e) => return Err(format!("LZ4 block: {e}")),
        };
        if want_elf && out.is_empty() && !chunk[..n].starts_with(b"\x7fELF") {
            return Err(NOT_ELF.into());
        }
        if out.len() + n > limit {
            return Err(format!("decompresses to more than {limit} bytes"));
        }
        out.extend_from_slice(&chunk[..n]);
        pos += 4 + size;
    }
    if out.is_empty() {
        return Err("empty LZ4 stream".into());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::{fake_bzimage, fake_vmlinux};
    use std::io::Write;

    /// Test-only LZ4 legacy compressor (what `lz4 -l` writes), 8 MiB chunks.
    pub fn lz4_legacy_compress(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for c in data.chunks(chunk) {
            let b = lz4_flex::block::compress(c);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
        }
        out
    }

    pub fn compress(data: &[u8], c: Compression) -> Vec<u8> {
        match c {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Lzma => {
                let opts = xz2::stream::LzmaOptions::new_preset(1).unwrap();
                let s = xz2::stream::Stream::new_lzma_encoder(&opts).unwrap();
                let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), s);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Lz4 => lz4_legacy_compress(data, 64 * 1024),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    #[test]
    fn extracts_every_compression_via_header_and_scan() {
        let vmlinux = fake_vmlinux(300 * 1024, true);
        for (c, _) in Compression::MAGICS {
            let payload = compress(&vmlinux, c);
            assert_eq!(Compression::sniff(&payload), Some(c), "{c}");
            for header_points in [true, false] {
                let bz = fake_bzimage(&payload, vmlinux.len(), header_points);
                let got =
                    extract_vmlinux(&bz).unwrap_or_else(|e| panic!("{c} {header_points}: {e}"));
                assert_eq!(got.compression, c);
                assert_eq!(got.vmlinux.len(), vmlinux.len(), "{c} {header_points}");
                assert!(
                    got.vmlinux == vmlinux,
                    "{c} {header_points}: content differs"
                );
            }
        }
    }

    #[test]
    fn decoys_before_the_payload_are_skipped() {
        // A gzip stream of non-ELF data and stray magics before the real (xz) payload.
        let vmlinux = fake_vmlinux(100 * 1024, true);
        let mut decoy = compress(b"not a kernel at all, just text", Compression::Gzip);
        decoy.extend_from_slice(&[0x5d, 0, 0, 0x42, 0x5a, 0x68, 0x28, 0xb5, 0x2f, 0xfd]);
        decoy.extend_from_slice(&compress(&vmlinux, Compression::Xz));
        let bz = fake_bzimage(&decoy, vmlinux.len(), false);
        let got = extract_vmlinux(&bz).unwrap();
        assert_eq!(got.compression, Compression::Xz);
        assert!(got.vmlinux == vmlinux);
    }

    #[test]
    fn header_fields() {
        let bz = fake_bzimage(b"xyz", 3, true);
        let h = parse_header(&bz).unwrap();
        assert_eq!(h.protocol, 0x020f);
        assert_eq!(h.pm_offset, 5 * 512);
        assert!(h.version.unwrap().starts_with("6.1.0-99-test-amd64 "));
        assert_eq!(h.payload.unwrap().1, 3 + 4);
        assert!(parse_header(&[0u8; 0x300]).is_none());
    }

    #[test]
    fn no_payload_is_a_clear_error() {
        let bz = fake_bzimage(b"plain bytes, nothing compressed", 0, false);
        let e = extract_vmlinux(&bz).unwrap_err().to_string();
        assert!(e.contains("found no compressed ELF vmlinux"), "{e}");
    }

    #[test]
    fn truncated_payload_is_refused() {
        let vmlinux = fake_vmlinux(200 * 1024, true);
        let payload = compress(&vmlinux, Compression::Lz4);
        let cut = &payload[..payload.len() * 2 / 3];
        let bz = fake_bzimage(cut, vmlinux.len(), true);
        assert!(extract_vmlinux(&bz).is_err());
    }
}
