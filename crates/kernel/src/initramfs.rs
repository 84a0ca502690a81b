//! wick's initramfs: a gzip-compressed newc cpio archive holding the static `wick-init` as
//! `/init`, the kernel modules it must load (decompressed, under `/lib/modules/`), their load
//! order in `/etc/wick-init/modules`, and the mount points it uses. Output is deterministic:
//! fixed mtimes, owners and inode numbers, so the same inputs give the same bytes.
//!
//! `wick-init` must be a static binary. Build it with
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p wick-init --target x86_64-unknown-linux-gnu`;
//! [`locate_init_binary`] finds it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{elf, io_err, modules, KernelError, Result};

/// The command that builds a static wick-init, for error messages.
pub const BUILD_INIT_HINT: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p wick-init --target x86_64-unknown-linux-gnu";

/// Where modules go inside the initramfs.
pub const MODULES_DIR: &str = "lib/modules";

const NEWC_MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// One entry of a newc cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path without a leading `/` (e.g. `etc/wick-init/modules`).
    pub name: String,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    /// Device number of a character/block device node (major, minor).
    pub rdev: (u32, u32),
    /// File content, or the target of a symlink.
    pub data: Vec<u8>,
}

impl CpioEntry {
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & 0o170000 == S_IFREG
    }
}

/// Streams a newc ("070701") cpio archive. Owners are root, mtimes `mtime` (0 by default),
/// inode numbers sequential: the output depends only on what is added, in order.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            mtime: 0,
        }
    }

    fn put(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name.split('/').any(|c| c == "..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio path {name:?}"),
            ));
        }
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let data_len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file larger than 4 GiB"))?;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            if name == TRAILER { 0 } else { self.mtime },
            data_len,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    /// Adds a directory (parents must be added first).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a (uncompressed) newc cpio archive up to its trailer.
pub fn read_cpio(data: &[u8]) -> Result<Vec<CpioEntry>> {
    let bad = |m: String| KernelError::Invalid(format!("not a valid newc cpio archive: {m}"));
    let mut pos = 0usize;
    let mut out = Vec::new();
    loop {
        let h = data
            .get(pos..pos + 110)
            .ok_or_else(|| bad(format!("truncated header at {pos}")))?;
        if &h[..6] != NEWC_MAGIC {
            return Err(bad(format!("bad magic at {pos}")));
        }
        let field = |i: usize| -> Result<u32> {
            let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8])
                .map_err(|_| bad("non-ASCII header".into()))?;
            u32::from_str_radix(s, 16).map_err(|_| bad(format!("bad hex field {s:?}")))
        };
        let (mode, uid, gid, mtime, size) = (
            field(1)?,
            field(2)?,
            field(3)?,
            field(5)?,
            field(6)? as usize,
        );
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = pos + 110;
        let name = data
            .get(name_start..name_start + namesize.saturating_sub(1))
            .ok_or_else(|| bad("truncated name".into()))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = (name_start + namesize + 3) & !3;
        let body = data
            .get(data_start..data_start + size)
            .ok_or_else(|| bad(format!("truncated data of {name}")))?;
        pos = (data_start + size + 3) & !3;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(CpioEntry {
            name,
            mode,
            uid,
            gid,
            mtime,
            rdev,
            data: body.to_vec(),
        });
    }
}

/// What [`build`] put into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsInfo {
    /// Module names in load order.
    pub modules: Vec<String>,
    /// Size of the compressed archive.
    pub size: u64,
}

/// Builds a gzip-compressed initramfs at `out` with `init_bin` as `/init` and `modules` (paths to
/// `.ko`/`.ko.xz`/`.ko.zst`/`.ko.gz` files, in load order; stored decompressed). The file is
/// written atomically (temporary file, then rename).
pub fn build(init_bin: &Path, modules: &[PathBuf], out: &Path) -> Result<InitramfsInfo> {
    let init = std::fs::read(init_bin).map_err(io_err(format!(
        "cannot read wick-init {}",
        init_bin.display()
    )))?;
    check_static(&init, init_bin)?;

    let dir = out.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io_err(format!("cannot create a file in {}", dir.display())))?;
    let gz = flate2::GzBuilder::new().mtime(0).write(
        io::BufWriter::new(tmp.as_file()),
        flate2::Compression::best(),
    );
    let mut cpio = CpioWriter::new(gz);
    let w = |e: io::Error| KernelError::Io {
        context: format!("cannot write {}", out.display()),
        source: e,
    };
    for d in [
        "dev",
        "proc",
        "sys",
        "newroot",
        "etc",
        "etc/wick-init",
        "lib",
        MODULES_DIR,
    ] {
        cpio.dir(d, 0o755).map_err(w)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1).map_err(w)?;
    cpio.file("init", 0o755, &init).map_err(w)?;

    let mut list =
        String::from("# wick-init: modules to load, in order (written by wick-kernel)\n");
    let mut names = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in modules {
        let name = modules::module_name(&m.to_string_lossy());
        if !seen.insert(name.clone()) {
            return Err(KernelError::Invalid(format!(
                "module {name} is listed twice"
            )));
        }
        let data = modules::read_module(m)?;
        let rel = format!("{MODULES_DIR}/{name}.ko");
        cpio.file(&rel, 0o644, &data).map_err(w)?;
        list.push_str(&format!("/{rel}\n"));
        names.push(name);
    }
    cpio.file("etc/wick-init/modules", 0o644, list.as_bytes())
        .map_err(w)?;
    let gz = cpio.finish().map_err(w)?;
    let buf = gz.finish().map_err(w)?;
    buf.into_inner().map_err(|e| w(e.into_error()))?;
    tmp.as_file().sync_all().map_err(w)?;
    let size = tmp.as_file().metadata().map_err(w)?.len();
    tmp.persist(out).map_err(|e| w(e.error))?;
    Ok(InitramfsInfo {
        modules: names,
        size,
    })
}

fn check_static(bytes: &[u8], path: &Path) -> Result<()> {
    let info = elf::parse(bytes).map_err(|e| {
        KernelError::Invalid(format!(
            "{} is not a usable wick-init binary: {e}",
            path.display()
        ))
    })?;
    if info.has_interp {
        return Err(KernelError::Invalid(format!(
            "{} is dynamically linked and cannot run as the initramfs /init; build a static one with `{BUILD_INIT_HINT}`",
            path.display()
        )));
    }
    Ok(())
}

/// Whether `path` is a statically linked ELF executable (no `PT_INTERP`).
pub fn is_static_elf(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| elf::parse(&b).ok())
        .is_some_and(|i| !i.has_interp && (i.elf_type == 2 || i.elf_type == 3))
}

/// Finds a static `wick-init`: `$WICK_INIT_BIN`, then next to the running executable (and its
/// parent, for test binaries in `target/*/deps`), then in the cargo target directory
/// (`$CARGO_TARGET_DIR` or a `target` directory above the executable), preferring the
/// `x86_64-unknown-linux-gnu/release` build. Dynamically linked candidates are skipped; the error
/// names them and says how to build a static one.
pub fn locate_init_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WICK_INIT_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(KernelError::NotFound(format!(
                "WICK_INIT_BIN={} does not exist; build wick-init with `{BUILD_INIT_HINT}`",
                p.display()
            )));
        }
        check_static(
            &std::fs::read(&p).map_err(io_err(format!("cannot read {}", p.display())))?,
            &p,
        )?;
        return Ok(p);
    }
    let mut candidates = Vec::new();
    let exe = std::env::current_exe().ok();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        candidates.push(dir.join("wick-init"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("wick-init"));
        }
    }
    let mut target_dirs: Vec<PathBuf> = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Some(exe) = &exe {
        if let Some(t) = exe
            .ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "target"))
        {
            target_dirs.push(t.to_path_buf());
        }
    }
    for t in target_dirs {
        for sub in [
            "x86_64-unknown-linux-gnu/release",
            "x86_64-unknown-linux-musl/release",
            "release",
            "x86_64-unknown-linux-gnu/debug",
            "debug",
        ] {
            candidates.push(t.join(sub).join("wick-init"));
        }
    }
    let mut dynamic = Vec::new();
    for c in &candidates {
        if c.is_file() {
            if is_static_elf(c) {
                return Ok(c.clone());
            }
            dynamic.push(c.display().to_string());
        }
    }
    Err(KernelError::NotFound(format!(
        "no static wick-init binary found{}; build it with `{BUILD_INIT_HINT}` or set WICK_INIT_BIN",
        if dynamic.is_empty() {
            String::new()
        } else {
            format!(" ({} dynamically linked, unusable)", dynamic.join(", "))
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn cpio_round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"#!hello").unwrap();
        w.file("a/b", 0o644, b"").unwrap();
        w.symlink("sbin/init", "/init").unwrap();
        assert!(w.file("../escape", 0o644, b"x").is_err());
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_cpio(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["dev", "dev/console", "init", "a/b", "sbin/init"]
        );
        assert!(entries[0].is_dir());
        assert_eq!(entries[1].mode, S_IFCHR | 0o600);
        assert_eq!(entries[1].rdev, (5, 1));
        assert!(entries[2].is_file());
        assert_eq!(entries[2].mode & 0o7777, 0o755);
        assert_eq!(entries[2].data, b"#!hello");
        assert_eq!(entries[4].data, b"/init");
        assert!(entries
            .iter()
            .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0));
        assert!(read_cpio(&bytes[..50]).is_err());
    }

    #[test]
    fn build_refuses_dynamic_init_and_is_deterministic_with_static_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initrd.img");
        // The test binary itself is dynamically linked: refused, with the build hint.
        let me = std::env::current_exe().unwrap();
        let e = build(&me, &[], &out).unwrap_err().to_string();
        assert!(
            e.contains("dynamically linked") && e.contains("crt-static"),
            "{e}"
        );
        assert!(!out.exists());

        // A fake static "init": an ELF header without PT_INTERP.
        let init = dir.path().join("init");
        std::fs::write(&init, crate::testutil::fake_vmlinux(4096, false)).unwrap();
        let m1 = dir.path().join("virtio.ko");
        std::fs::write(&m1, b"module one").unwrap();
        let m2 = dir.path().join("virtio_blk.ko.gz");
        {
            let mut e = flate2::write::GzEncoder::new(
                std::fs::File::create(&m2).unwrap(),
                flate2::Compression::fast(),
            );
            e.write_all(b"module two").unwrap();
            e.finish().unwrap();
        }
        let info = build(&init, &[m1.clone(), m2.clone()], &out).unwrap();
        assert_eq!(info.modules, vec!["virtio", "virtio_blk"]);
        let first = std::fs::read(&out).unwrap();
        build(&init, &[m1, m2], &out).unwrap();
        assert!(
            first == std::fs::read(&out).unwrap(),
            "output is not deterministic"
        );

        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&first[..])
            .read_to_end(&mut cpio)
            .unwrap();
        let entries = read_cpio(&cpio).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(get("lib/modules/virtio_blk.ko").data, b"module two");
        assert_eq!(get("init").mode & 0o111, 0o111);
        let list = String::from_utf8(get("etc/wick-init/modules").data.clone()).unwrap();
        let lines: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            vec!["/lib/modules/virtio.ko", "/lib/modules/virtio_blk.ko"]
        );
        for d in ["dev", "proc", "sys", "newroot"] {
            assert!(get(d).is_dir());
        }
    }
}
