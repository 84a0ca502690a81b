//! The durable description of one image (`manifest.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One managed image. Paths are absolute; they are recomputed from the store directory on load,
/// so a store can be moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// Hex sha256 of `rootfs.ext4`; also the image's directory name.
    pub id: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub source: ImageSource,
    pub rootfs: PathBuf,
    pub work_seed: Option<PathBuf>,
    /// Apparent size of `rootfs.ext4` in bytes (the guest's root disk size).
    pub size: u64,
    /// Name of the kernel this image boots with by default, when it has one.
    pub default_kernel: Option<String>,
    /// Whether `/usr/local/bin/wick-agent` and its systemd unit are in the image.
    pub agent_injected: bool,
    /// The input hash of a derived build (`image build --from`): its cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_key: Option<String>,
    /// The OCI image config's defaults for processes (pulled images; absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageConfig>,
}

/// What an OCI image's config says about the processes it runs (`config` of the image config
/// JSON): the defaults of `vm exec` and `vm run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSource {
    /// Built from Debian packages by [`crate::ImageStore::build_golden`].
    Build {
        suite: String,
        mirror: String,
        packages: Vec<String>,
    },
    /// Imported from a rootfs tarball or an ext4 file.
    Import { path: PathBuf },
    /// Pulled from an OCI registry. `layers` are the layer digests, which keep them in the cache.
    Oci {
        reference: String,
        digest: String,
        layers: Vec<String>,
    },
    /// Derived from image `base` (id `base_id`) by a builder VM (`crate::derive`).
    Derived {
        base: String,
        base_id: String,
        packages: Vec<String>,
        run: Vec<String>,
        copied: Vec<String>,
    },
    /// A stopped VM's root disk (`wick vm commit`); `base` is the VM's image.
    Commit { vm: String, base: String },
}
