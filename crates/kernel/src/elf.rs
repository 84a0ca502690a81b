//! The few ELF facts wick needs, read straight from the bytes (ELF64 little-endian only):
//! whether a binary is static (no `PT_INTERP`), whether a `vmlinux` carries the Xen PVH entry
//! note Firecracker boots through on x86_64, that its loadable segments are all present (a
//! truncated decompression fails this), and the kernel release in its banner.

/// Note name and type of the PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_NOTE_NAME: &[u8] = b"Xen";
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;

/// What [`parse`] learned about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_type` (2 = executable, 3 = shared object / PIE).
    pub elf_type: u16,
    /// `e_machine` (62 = x86_64).
    pub machine: u16,
    /// A `PT_INTERP` segment exists: the binary is dynamically linked.
    pub has_interp: bool,
    /// The Xen PVH 32-bit entry point, when the note is present.
    pub pvh_entry: Option<u64>,
    /// Every `PT_LOAD` segment's file range lies inside the file.
    pub segments_in_bounds: bool,
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    d.get(off..off + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}
fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    d.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    d.get(off..off + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Parses an ELF64 little-endian file. Errors say what is wrong.
pub fn parse(d: &[u8]) -> Result<ElfInfo, String> {
    if !d.starts_with(b"\x7fELF") {
        return Err("not an ELF file (no \\x7fELF magic)".into());
    }
    if d.get(4) != Some(&2) || d.get(5) != Some(&1) {
        return Err("only 64-bit little-endian ELF files are supported".into());
    }
    let short = || "ELF header is truncated".to_string();
    let elf_type = u16_at(d, 16).ok_or_else(short)?;
    let machine = u16_at(d, 18).ok_or_else(short)?;
    let phoff = u64_at(d, 32).ok_or_else(short)? as usize;
    let shoff = u64_at(d, 40).ok_or_else(short)? as usize;
    let phentsize = u16_at(d, 54).ok_or_else(short)? as usize;
    let phnum = u16_at(d, 56).ok_or_else(short)? as usize;
    let shentsize = u16_at(d, 58).ok_or_else(short)? as usize;
    let shnum = u16_at(d, 60).ok_or_else(short)? as usize;

    let mut info = ElfInfo {
        elf_type,
        machine,
        has_interp: false,
        pvh_entry: None,
        segments_in_bounds: true,
    };
    if phnum > 0 && phentsize < 56 {
        return Err(format!("bad program header size {phentsize}"));
    }
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (Some(p_type), Some(p_offset), Some(p_filesz)) =
            (u32_at(d, ph), u64_at(d, ph + 8), u64_at(d, ph + 32))
        else {
            return Err("program headers are truncated".into());
        };
        let end = p_offset.checked_add(p_filesz);
        let in_bounds = end.is_some_and(|e| e <= d.len() as u64);
        match p_type {
            PT_INTERP => info.has_interp = true,
            PT_LOAD if !in_bounds => info.segments_in_bounds = false,
            PT_NOTE if in_bounds && info.pvh_entry.is_none() => {
                info.pvh_entry =
                    find_pvh_note(&d[p_offset as usize..(p_offset + p_filesz) as usize]);
            }
            _ => {}
        }
    }
    if info.pvh_entry.is_none() && shnum > 0 && shentsize >= 64 {
        for i in 0..shnum {
            let sh = shoff + i * shentsize;
            let (Some(sh_type), Some(off), Some(size)) =
                (u32_at(d, sh + 4), u64_at(d, sh + 24), u64_at(d, sh + 32))
            else {
                break;
            };
            if sh_type == SHT_NOTE {
                if let Some(end) = off.checked_add(size).filter(|e| *e <= d.len() as u64) {
                    if let Some(e) = find_pvh_note(&d[off as usize..end as usize]) {
                        info.pvh_entry = Some(e);
                        break;
                    }
                }
            }
        }
    }
    Ok(info)
}

/// Walks a note area (namesz, descsz, type, name, desc; 4-byte aligned) for the PVH entry note.
fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let align = |n: usize| (n + 3) & !3;
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = u32_at(notes, pos)? as usize;
        let descsz = u32_at(notes, pos + 4)? as usize;
        let ntype = u32_at(notes, pos + 8)?;
        let name_start = pos + 12;
        let desc_start = name_start.checked_add(align(namesz))?;
        let next = desc_start.checked_add(align(descsz))?;
        if desc_start + descsz > notes.len() {
            return None;
        }
        let name = &notes[name_start..name_start + namesz];
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        if name == XEN_NOTE_NAME && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = &notes[desc_start..desc_start + descsz];
            return match descsz {
                4 => u32_at(desc, 0).map(u64::from),
                8 => u64_at(desc, 0),
                _ => None,
            };
        }
        pos = next;
    }
    None
}

/// The kernel release from a `Linux version 6.1.0-... (` banner inside an image, if any.
pub fn linux_banner_release(d: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"Linux version ";
    let mut from = 0;
    while let Some(i) = find(&d[from..], NEEDLE) {
        let start = from + i + NEEDLE.len();
        let rest = &d[start..d.len().min(start + 128)];
        if rest.first().is_some_and(u8::is_ascii_digit) {
            let end = rest
                .iter()
                .position(|b| b.is_ascii_whitespace() || *b == 0)
                .unwrap_or(rest.len());
            return std::str::from_utf8(&rest[..end]).ok().map(str::to_string);
        }
        from = start;
    }
    None
}

/// Position of `needle` in `hay` (naive; fine for the sizes here).
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|b| *b == first)
        {
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fake_vmlinux;

    #[test]
    fn reads_pvh_note_and_bounds() {
        let v = fake_vmlinux(64 * 1024, true);
        let info = parse(&v).unwrap();
        assert_eq!(info.pvh_entry, Some(0x0100_0000));
        assert!(!info.has_interp);
        assert!(info.segments_in_bounds);
        assert_eq!(info.machine, 62);
        assert_eq!(
            linux_banner_release(&v).as_deref(),
            Some("6.1.0-99-test-amd64")
        );

        let no_note = fake_vmlinux(64 * 1024, false);
        assert_eq!(parse(&no_note).unwrap().pvh_entry, None);

        let truncated = &v[..v.len() / 2];
        assert!(!parse(truncated).unwrap().segments_in_bounds);
        assert!(parse(b"not elf").is_err());
    }

    #[test]
    fn detects_dynamic_binaries() {
        // The test binary itself is dynamically linked (the default gnu target).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(parse(&me).unwrap().has_interp);
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"aaa", b"b"), None);
    }
}
