//! Test fixtures: a synthetic (fake) vmlinux ELF and a synthetic bzImage around a payload.

/// A fake x86_64 ELF "vmlinux": ELF header, a PT_LOAD covering the file, optionally a PT_NOTE
/// with the Xen PVH entry note (entry 0x1000000), a Linux banner and compressible filler.
pub fn fake_vmlinux(size: usize, pvh: bool) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..4].copy_from_slice(b"\x7fELF");
    d[4] = 2; // 64-bit
    d[5] = 1; // little-endian
    d[6] = 1;
    d[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    d[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    d[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    d[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    let phnum: u16 = if pvh { 2 } else { 1 };
    d[56..58].copy_from_slice(&phnum.to_le_bytes());
    // PT_LOAD over the whole file.
    let ph = 64;
    d[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    d[ph + 8..ph + 16].copy_from_slice(&0u64.to_le_bytes());
    d[ph + 32..ph + 40].copy_from_slice(&(size as u64).to_le_bytes());
    let note_off = 0x200usize;
    if pvh {
        let ph = 64 + 56;
        d[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        d[ph + 8..ph + 16].copy_from_slice(&(note_off as u64).to_le_bytes());
        d[ph + 32..ph + 40].copy_from_slice(&40u64.to_le_bytes());
        // An unrelated note first, then the PVH one.
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&[1, 2, 3, 4]);
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&18u32.to_le_bytes());
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        d[note_off..note_off + n.len()].copy_from_slice(&n);
    }
    let banner = b"Linux version 6.1.0-99-test-amd64 (fake@test) #1 SMP\0";
    d[0x400..0x400 + banner.len()].copy_from_slice(banner);
    // Filler that compresses but is not trivially constant.
    let mut x: u32 = 12345;
    for (i, b) in d.iter_mut().enumerate().skip(0x800) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = if i % 7 == 0 {
            (x >> 24) as u8
        } else {
            (i / 64) as u8
        };
    }
    d
}

/// A fake bzImage: a boot sector + setup header with `HdrS`, the payload (followed by the
/// kernel's 4-byte uncompressed-size trailer) and trailing junk. With `header_points`, the
/// payload_offset/payload_length fields locate the payload (protocol 2.15); without, the
/// protocol is 2.07 so only scanning can find it.
pub fn fake_bzimage(payload: &[u8], uncompressed_len: usize, header_points: bool) -> Vec<u8> {
    let setup_sects = 4u8;
    let base = (setup_sects as usize + 1) * 512;
    let lead_junk = 0x333usize; // decompressor code stand-in, before the payload
    let mut d = vec![0u8; base + lead_junk];
    d[0x1f1] = setup_sects;
    d[0x202..0x206].copy_from_slice(b"HdrS");
    let proto: u16 = if header_points { 0x020f } else { 0x0207 };
    d[0x206..0x208].copy_from_slice(&proto.to_le_bytes());
    // kernel_version string at 0x300 (pointer is relative to 0x200).
    d[0x20e..0x210].copy_from_slice(&(0x300u16 - 0x200).to_le_bytes());
    let v = b"6.1.0-99-test-amd64 (fake@test) #1 SMP\0";
    d[0x300..0x300 + v.len()].copy_from_slice(v);
    for (i, b) in d.iter_mut().enumerate().skip(base) {
        *b = (i * 31 % 251) as u8;
    }
    let payload_offset = (d.len() - base) as u32;
    let mut full = payload.to_vec();
    full.extend_from_slice(&(uncompressed_len as u32).to_le_bytes());
    if header_points {
        d[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        d[0x24c..0x250].copy_from_slice(&(full.len() as u32).to_le_bytes());
    }
    d.extend_from_slice(&full);
    d.extend((0..4096u32).map(|i| (i * 7 % 253) as u8));
    d
}
