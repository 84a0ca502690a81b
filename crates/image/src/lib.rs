//! Managed, content-addressed VM images for wick.
//!
//! An image is a directory `DIR/<sha256 of rootfs.ext4>/` holding `rootfs.ext4`, an optional
//! `work-seed.ext4` (the initial contents of the guest's `/root` work disk) and `manifest.json`
//! (an [`ImageRecord`]). Names map to ids in `DIR/index.json`, written atomically. Everything is
//! built without mounting anything: root filesystems are assembled in a private staging directory
//! and packed with `mkfs.ext4 -d`.
//!
//! - [`ImageStore`]: list, get, delete, prune; [`ImageStore::import`] of a rootfs tarball or an
//!   ext4 file; [`ImageStore::build_golden`] of the default Debian image (debootstrap).
//! - [`ImageStore::import_disk`]: an image from a VM's root disk (derived builds, `vm commit`),
//!   with [`ImageStore::find_by_key`] and [`ImageStore::alias`] for the build cache.
//! - [`oci::pull`]: an image from an OCI registry (linux/amd64, digest-verified, cached layers,
//!   whiteouts, traversal and symlink escapes refused).
//! - `testcache` (feature `testing`): a golden image built once and shared by the tests of every crate.
//!
//! Every operation is blocking (they run `debootstrap` and `mkfs.ext4`); async callers wrap them in
//! `spawn_blocking`. They need root: ownership inside an image is real ownership on the host while
//! it is staged.

mod derive;
mod error;
mod ext4;
mod extract;
mod golden;
mod inject;
mod mirror;
pub mod oci;
mod record;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testcache;
mod util;

pub use derive::{build_key, DiskImage, KeyedFile};
pub use error::{ImageError, Result};
pub use ext4::shrink_ext4;
pub use golden::{GoldenOptions, DEFAULT_SUITE, GOLDEN_PACKAGES};
pub use mirror::debian_mirror;
pub use record::{ImageConfig, ImageRecord, ImageSource};
pub use store::{
    validate_image_name, ImageStore, ImportOptions, PruneReport, DEFAULT_HEADROOM_MIB,
};

/// A progress callback: called with a short, human-readable stage description.
pub type Progress<'a> = &'a mut dyn FnMut(&str);
