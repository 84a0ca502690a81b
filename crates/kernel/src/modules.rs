//! Kernel modules: which of the drivers a wick guest needs are built in, which are modules, and
//! in what order the modules must be loaded.
//!
//! Sources, in order of trust: `modules.builtin` (built-in drivers), `modules.dep` (written by
//! `depmod`, present on installed systems), and otherwise each module's own `.modinfo` section
//! (`depends=`, `softdep=pre:`) — Debian's kernel packages ship no `modules.dep` (their postinst
//! runs depmod), so the fallback is the common case for an unpacked `.deb`. Compressed modules
//! (`.ko.xz`, `.ko.zst`, `.ko.gz`) are read transparently.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{io_err, KernelError, Result};

/// Drivers a wick guest needs: virtio-mmio transport, root/work disks, network, the agent
/// channel (vsock under Firecracker, a virtio-serial port under QEMU) and the root filesystem.
pub const REQUIRED_DRIVERS: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "ext4",
];

/// The canonical module name of a module path or file name: the base name without `.ko` (and
/// compression suffix), with `-` as `_` (`kernel/net/vmw_vsock/vsock.ko.xz` → `vsock`).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = ["", ".xz", ".zst", ".gz"]
        .iter()
        .find_map(|c| base.strip_suffix(&format!(".ko{c}")))
        .unwrap_or(base);
    stem.replace('-', "_")
}

fn is_module_file(name: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).map_err(io_err(format!("cannot read module {}", path.display())))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let res = if name.ends_with(".ko.xz") {
        xz2::read::XzDecoder::new_multi_decoder(&raw[..]).read_to_end(&mut out)
    } else if name.ends_with(".ko.zst") {
        zstd::stream::read::Decoder::new(&raw[..]).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".ko.gz") {
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else {
        return Ok(raw);
    };
    res.map_err(io_err(format!(
        "cannot decompress module {}",
        path.display()
    )))?;
    Ok(out)
}

/// The `key=value` pairs of a module's `.modinfo` section.
pub fn modinfo(ko: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let sec = elf_section(ko, ".modinfo")?.ok_or("module has no .modinfo section")?;
    Ok(sec
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = std::str::from_utf8(kv).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// The bytes of the named section of an ELF64 LE relocatable file.
fn elf_section<'a>(d: &'a [u8], want: &str) -> std::result::Result<Option<&'a [u8]>, String> {
    if !d.starts_with(b"\x7fELF") || d.get(4) != Some(&2) || d.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF module".into());
    }
    let le = |o: usize, n: usize| -> std::result::Result<u64, String> {
        d.get(o..o + n)
            .map(|b| b.iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64))
            .ok_or_else(|| "truncated ELF module".to_string())
    };
    let shoff = le(40, 8)? as usize;
    let shentsize = le(58, 2)? as usize;
    let shnum = le(60, 2)? as usize;
    let shstrndx = le(62, 2)? as usize;
    let sect = |i: usize| -> std::result::Result<(u64, u64, u64), String> {
        let h = shoff + i * shentsize;
        Ok((le(h, 4)?, le(h + 24, 8)?, le(h + 32, 8)?))
    };
    let (_, str_off, str_size) = sect(shstrndx)?;
    let strtab = d
        .get(str_off as usize..(str_off + str_size) as usize)
        .ok_or("truncated section names")?;
    for i in 0..shnum {
        let (name_off, off, size) = sect(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or(&[]);
        if name == want.as_bytes() {
            return d
                .get(off as usize..(off + size) as usize)
                .map(Some)
                .ok_or_else(|| format!("section {want} is truncated"));
        }
    }
    Ok(None)
}

/// A module file to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
}

/// What [`ModuleIndex::resolve`] found for a set of wanted drivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Modules to load, dependencies first.
    pub load_order: Vec<ModuleFile>,
    /// Wanted drivers that are built into the kernel.
    pub builtin: Vec<String>,
    /// Wanted drivers that are neither built in nor available as modules.
    pub missing: Vec<String>,
}

/// The modules of one kernel (`lib/modules/<version>`).
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
    dep: Option<HashMap<String, Vec<String>>>,
}

impl ModuleIndex {
    /// Indexes `modules_dir` (a `lib/modules/<version>` directory).
    pub fn load(modules_dir: &Path) -> Result<ModuleIndex> {
        if !modules_dir.is_dir() {
            return Err(KernelError::Invalid(format!(
                "{} is not a kernel modules directory (expected lib/modules/<version>)",
                modules_dir.display()
            )));
        }
        let mut files = HashMap::new();
        let mut stack = vec![modules_dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir)
                .map_err(io_err(format!("cannot list {}", dir.display())))?;
            for e in entries {
                let e = e.map_err(io_err(format!("cannot list {}", dir.display())))?;
                let ft = e.file_type().map_err(io_err("cannot stat"))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if ft.is_dir() {
                    // `build` and `source` are symlinks into headers on installed systems.
                    stack.push(e.path());
                } else if ft.is_file() && is_module_file(&name) {
                    files.entry(module_name(&name)).or_insert_with(|| e.path());
                }
            }
        }
        let builtin = match std::fs::read_to_string(modules_dir.join("modules.builtin")) {
            Ok(t) => t
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(module_name)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(io_err("cannot read modules.builtin")(e)),
        };
        let dep = match std::fs::read_to_string(modules_dir.join("modules.dep")) {
            Ok(t) => Some(parse_modules_dep(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("cannot read modules.dep")(e)),
        };
        Ok(ModuleIndex {
            dir: modules_dir.to_path_buf(),
            files,
            builtin,
            dep,
        })
    }

    /// Whether `name` is built into the kernel (per `modules.builtin`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// The file of module `name`, if the kernel has it as a module.
    pub fn module_path(&self, name: &str) -> Option<&Path> {
        self.files.get(&module_name(name)).map(PathBuf::as_path)
    }

    /// Whether a `modules.dep` was found (otherwise dependencies come from `.modinfo`).
    pub fn has_modules_dep(&self) -> bool {
        self.dep.is_some()
    }

    /// Modules `name` needs loaded before it: hard dependencies plus `softdep pre:` modules that
    /// exist (by name) as modules.
    pub fn dependencies(&self, name: &str) -> Result<Vec<String>> {
        let name = module_name(name);
        if let Some(dep) = &self.dep {
            if let Some(d) = dep.get(&name) {
                return Ok(d.clone());
            }
        }
        let Some(path) = self.files.get(&name) else {
            return Ok(Vec::new());
        };
        let ko = read_module(path)?;
        let info = modinfo(&ko).map_err(|e| {
            KernelError::Invalid(format!("cannot read module {}: {e}", path.display()))
        })?;
        let mut deps = Vec::new();
        for (k, v) in info {
            match k.as_str() {
                "depends" => deps.extend(v.split(',').filter(|s| !s.is_empty()).map(module_name)),
                "softdep" => {
                    // "pre: a b post: c"
                    let mut pre = false;
                    for w in v.split_whitespace() {
                        match w {
                            "pre:" => pre = true,
                            "post:" => pre = false,
                            m if pre && self.files.contains_key(&module_name(m)) => {
                                deps.push(module_name(m))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(deps)
    }

    /// Resolves `wanted` drivers into a load order (each module after all of its dependencies;
    /// built-in ones need no loading).
    pub fn resolve(&self, wanted: &[&str]) -> Result<Resolution> {
        let mut res = Resolution::default();
        let mut done: HashSet<String> = HashSet::new();
        for w in wanted {
            let name = module_name(w);
            if self.builtin.contains(&name) {
                res.builtin.push(name);
            } else if self.files.contains_key(&name) {
                let mut visiting = Vec::new();
                self.visit(&name, &mut visiting, &mut done, &mut res.load_order)?;
            } else {
                res.missing.push(name);
            }
        }
        Ok(res)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut Vec<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<ModuleFile>,
    ) -> Result<()> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if let Some(pos) = visiting.iter().position(|v| v == name) {
            let mut cycle = visiting[pos..].to_vec();
            cycle.push(name.to_string());
            return Err(KernelError::Invalid(format!(
                "module dependency cycle in {}: {}",
                self.dir.display(),
                cycle.join(" -> ")
            )));
        }
        let Some(path) = self.files.get(name) else {
            return Err(KernelError::Invalid(format!(
                "module {} needs {name}, which is neither built in nor present in {}",
                visiting.last().map_or("?", String::as_str),
                self.dir.display()
            )));
        };
        visiting.push(name.to_string());
        // Deterministic order among siblings.
        let deps: BTreeSet<String> = self.dependencies(name)?.into_iter().collect();
        for d in deps {
            self.visit(&d, visiting, done, order)?;
        }
        visiting.pop();
        done.insert(name.to_string());
        order.push(ModuleFile {
            name: name.to_string(),
            path: path.clone(),
        });
        Ok(())
    }
}

/// Parses `modules.dep` (`path/a.ko: path/b.ko path/c.ko`) into name → dependency names.
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                module_name(m.trim()),
                deps.split_whitespace().map(module_name).collect(),
            ))
        })
        .collect()
}

/// What [`needs_initramfs`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverCheck {
    /// Some required driver is a module: the kernel needs wick's initramfs to boot.
    pub needs_initramfs: bool,
    /// The load order and the built-in / missing drivers.
    pub resolution: Resolution,
}

/// Checks [`REQUIRED_DRIVERS`] against a kernel's modules directory.
pub fn needs_initramfs(modules_dir: &Path) -> Result<DriverCheck> {
    let index = ModuleIndex::load(modules_dir)?;
    let resolution = index.resolve(REQUIRED_DRIVERS)?;
    Ok(DriverCheck {
        needs_initramfs: !resolution.load_order.is_empty(),
        resolution,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(module_name("kernel/net/vmw_vsock/vsock.ko.xz"), "vsock");
        assert_eq!(module_name("amd-uncore.ko"), "amd_uncore");
        assert_eq!(module_name("virtio_blk"), "virtio_blk");
        assert_eq!(module_name("x.ko.zst"), "x");
    }

    fn touch(dir: &Path, rel: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn orders_from_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for m in [
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
            "kernel/drivers/block/virtio_blk.ko.xz",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/net/vmw_vsock/vsock.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "kernel/drivers/char/virtio_console.ko",
        ] {
            touch(d, m);
        }
        std::fs::write(d.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        // modules.dep lists transitive deps, in an order where the last is loaded first.
        std::fs::write(
            d.join("modules.dep"),
            "kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/net/core/failover.ko:\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/net/vmw_vsock/vsock.ko:\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko\n\
             kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let check = needs_initramfs(d).unwrap();
        assert!(check.needs_initramfs);
        let names: Vec<&str> = check
            .resolution
            .load_order
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(check.resolution.builtin, vec!["ext4"]);
        assert!(check.resolution.missing.is_empty());
        // Every module comes after its dependencies, each exactly once.
        let pos = |n: &str| {
            names
                .iter()
                .position(|x| *x == n)
                .unwrap_or_else(|| panic!("{n} missing in {names:?}"))
        };
        assert_eq!(names.len(), 11, "{names:?}");
        assert!(pos("virtio_ring") < pos("virtio_console"));
        assert!(pos("virtio") < pos("virtio_mmio") && pos("virtio_ring") < pos("virtio_mmio"));
        assert!(pos("virtio_mmio") < pos("virtio_blk"));
        assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        // Wanted order is kept where dependencies allow it.
        assert_eq!(&names[..3], &["virtio", "virtio_ring", "virtio_mmio"]);
        assert!(check.resolution.load_order[pos("virtio_blk")]
            .path
            .ends_with("virtio_blk.ko.xz"));
    }

    #[test]
    fn builtin_kernel_needs_no_initramfs_and_missing_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio_mmio.ko\nkernel/drivers/block/virtio_blk.ko\nkernel/drivers/net/virtio_net.ko\nkernel/drivers/char/virtio_console.ko\nkernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let check = needs_initramfs(dir.path()).unwrap();
        assert!(!check.needs_initramfs);
        assert_eq!(check.resolution.missing, vec!["vmw_vsock_virtio_transport"]);
    }

    #[test]
    fn cycles_and_dangling_dependencies_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(d, "a.ko");
        touch(d, "b.ko");
        touch(d, "c.ko");
        std::fs::write(
            d.join("modules.dep"),
            "a.ko: b.ko\nb.ko: a.ko\nc.ko: zz.ko\n",
        )
        .unwrap();
        let idx = ModuleIndex::load(d).unwrap();
        let e = idx.resolve(&["a"]).unwrap_err().to_string();
        assert!(e.contains("cycle") && e.contains("a -> b -> a"), "{e}");
        let e = idx.resolve(&["c"]).unwrap_err().to_string();
        assert!(e.contains("needs zz"), "{e}");
    }

    /// A minimal relocatable ELF with a `.modinfo` section, like a real `.ko`.
    fn fake_ko(modinfo: &str) -> Vec<u8> {
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        let mi_off = d.len();
        d.extend_from_slice(modinfo.as_bytes());
        let str_off = d.len();
        d.extend_from_slice(shstr);
        while !d.len().is_multiple_of(8) {
            d.push(0);
        }
        let shoff = d.len();
        d.extend(std::iter::repeat_n(0u8, 64 * 3));
        let mut sh = |i: usize, name: u32, off: usize, size: usize| {
            let h = shoff + i * 64;
            d[h..h + 4].copy_from_slice(&name.to_le_bytes());
            d[h + 24..h + 32].copy_from_slice(&(off as u64).to_le_bytes());
            d[h + 32..h + 40].copy_from_slice(&(size as u64).to_le_bytes());
        };
        sh(1, 1, mi_off, modinfo.len());
        sh(2, 10, str_off, shstr.len());
        d[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[58..60].copy_from_slice(&64u16.to_le_bytes());
        d[60..62].copy_from_slice(&3u16.to_le_bytes());
        d[62..64].copy_from_slice(&2u16.to_le_bytes());
        d
    }

    #[test]
    fn orders_from_modinfo_without_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("kernel");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("virtio.ko"), fake_ko("name=virtio\0depends=\0")).unwrap();
        std::fs::write(
            d.join("virtio_ring.ko"),
            fake_ko("depends=\0name=virtio_ring\0"),
        )
        .unwrap();
        std::fs::write(d.join("crc_x.ko"), fake_ko("depends=\0")).unwrap();
        let blk = fake_ko(
            "license=GPL\0depends=virtio,virtio_ring\0softdep=pre: crc-x nosuch\0name=virtio_blk\0",
        );
        let mut xz = Vec::new();
        {
            use std::io::Write;
            let mut e = xz2::write::XzEncoder::new(&mut xz, 1);
            e.write_all(&blk).unwrap();
            e.finish().unwrap();
        }
        std::fs::write(d.join("virtio_blk.ko.xz"), xz).unwrap();
        assert_eq!(
            modinfo(&blk).unwrap()[1],
            ("depends".into(), "virtio,virtio_ring".into())
        );
        let idx = ModuleIndex::load(dir.path()).unwrap();
        assert!(!idx.has_modules_dep());
        let r = idx.resolve(&["virtio_blk"]).unwrap();
        let names: Vec<&str> = r.load_order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["crc_x", "virtio", "virtio_ring", "virtio_blk"]);
    }
}
