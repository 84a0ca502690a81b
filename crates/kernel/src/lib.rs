//! Guest kernels for wick: everything between "a kernel file the user has" and "the artifacts a
//! VMM boots".
//!
//! - [`detect`]: is a file an ELF `vmlinux`, a bzImage/vmlinuz, or a distro kernel `.deb`?
//! - [`bzimage`]: find and decompress the payload of a bzImage into the ELF `vmlinux` Firecracker
//!   needs (gzip, xz, lzma, lz4, zstd, bzip2), like the kernel's `scripts/extract-vmlinux`.
//! - [`elf`]: the few ELF facts wick checks (static binary, Xen PVH entry note, kernel version).
//! - [`modules`]: which virtio/vsock drivers are built in or modules, and their load order
//!   (from `modules.dep`, or from each module's own `.modinfo` when the package has no
//!   `modules.dep`).
//! - [`caps`]: what a kernel can do (PVH entry; virtio/vsock/console built in, modules or
//!   missing), for `wick kernel list`.
//! - [`initramfs`]: newc cpio writer/reader and the wick-init initramfs builder.
//! - [`deb`]: unpack a kernel `.deb` (kernel image + modules).
//! - [`store`]: the managed, content-addressed kernel store (`import`, `pull`, `list`, `get`,
//!   `delete`).
//! - [`debian`]: download the Debian cloud kernel package (the first-use path).

pub mod bzimage;
pub mod caps;
pub mod deb;
pub mod debian;
pub mod elf;
pub mod initramfs;
pub mod modules;
pub mod store;

#[cfg(test)]
pub(crate) mod testutil;

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use bzimage::{extract_vmlinux, Compression, Extracted};
pub use modules::{needs_initramfs, DriverCheck, ModuleIndex, REQUIRED_DRIVERS};
pub use store::{KernelRecord, KernelStore};

/// Why a kernel operation failed. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No such kernel in the store.
    #[error("{0}")]
    NotFound(String),
    /// A kernel with this name or content already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The input is not usable (wrong format, bad name, checksum mismatch, ...).
    #[error("{0}")]
    Invalid(String),
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (dpkg-deb, apt-get) is missing or failed.
    #[error("{0}")]
    Tool(String),
    /// An HTTP download failed.
    #[error("{0}")]
    Download(String),
}

/// Result alias of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// What kind of kernel file something is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    /// An ELF image (`vmlinux`): Firecracker boots it directly.
    Elf,
    /// An x86 boot-protocol image (`bzImage`, `vmlinuz`): `HdrS` at 0x202.
    BzImage,
    /// A Debian package (`ar` archive) holding `boot/vmlinuz-*` and `lib/modules/*`.
    Deb,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF vmlinux",
            KernelFormat::BzImage => "bzImage",
            KernelFormat::Deb => "Debian package",
        })
    }
}

/// Classifies the first bytes of a file (at least 0x206 bytes are needed to see a bzImage).
pub fn detect_bytes(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Some(KernelFormat::BzImage)
    } else if head.starts_with(b"!<arch>\n") {
        Some(KernelFormat::Deb)
    } else {
        None
    }
}

/// Classifies a kernel file by content (not by name).
pub fn detect(path: &Path) -> Result<KernelFormat> {
    let mut f =
        std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut head = Vec::with_capacity(0x400);
    f.by_ref()
        .take(0x400)
        .read_to_end(&mut head)
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    detect_bytes(&head).ok_or_else(|| {
        KernelError::Invalid(format!(
            "{} is not a kernel wick understands: expected an ELF vmlinux, a bzImage/vmlinuz \
             (\"HdrS\" at 0x202) or a kernel .deb package",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_bytes(&bz), Some(KernelFormat::BzImage));
        assert_eq!(
            detect_bytes(b"\x7fELF\x02\x01\x01"),
            Some(KernelFormat::Elf)
        );
        assert_eq!(
            detect_bytes(b"!<arch>\ndebian-binary   "),
            Some(KernelFormat::Deb)
        );
        assert_eq!(detect_bytes(b"#!/bin/sh\n"), None);
        assert_eq!(detect_bytes(&[0u8; 0x100]), None);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, &bz).unwrap();
        assert_eq!(detect(&p).unwrap(), KernelFormat::BzImage);
        std::fs::write(&p, b"hello").unwrap();
        let err = detect(&p).unwrap_err().to_string();
        assert!(err.contains("not a kernel"), "{err}");
    }
}
