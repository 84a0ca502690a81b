//! What an image boots from: a `[images.NAME]` table of the config, else a managed image and
//! its kernel.

use wick_model::api::ErrorCode;
use wick_model::VmSpec;

use super::Daemon;
use crate::config::DEFAULT_BOOT_ARGS;
use crate::error::{Error, Result};

/// What an image boots from.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub rootfs: std::path::PathBuf,
    pub work_seed: Option<std::path::PathBuf>,
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    pub boot_args: String,
    pub agent: bool,
    /// The image's OCI process config, copied into the spec at create.
    pub config: Option<wick_model::ImageConfig>,
}

impl BootFiles {
    pub(super) fn apply(&self, spec: &mut VmSpec) {
        spec.kernel = self.kernel.clone();
        spec.initrd = self.initrd.clone();
        spec.boot_args = self.boot_args.clone();
        spec.agent = self.agent;
        spec.image_config = self.config.clone();
    }
}

impl Daemon {
    /// Root filesystem, work-seed and boot files of an image: a `[images.NAME]` table of the
    /// config first, else a managed image (with its kernel).
    pub fn boot_files(&self, image: &str) -> Result<BootFiles> {
        if let Some(i) = self.config.images.get(image) {
            return Ok(BootFiles {
                rootfs: i.rootfs.clone(),
                work_seed: i.work_seed.clone(),
                kernel: i.kernel.clone(),
                initrd: i.initrd.clone(),
                boot_args: i
                    .boot_args
                    .clone()
                    .unwrap_or_else(|| DEFAULT_BOOT_ARGS.into()),
                agent: i.agent.unwrap_or(false),
                config: None,
            });
        }
        let b = self.artifacts.resolve(image).map_err(|e| {
            let configured: Vec<_> = self.config.images.keys().cloned().collect();
            if e.code() == ErrorCode::NotFound && !configured.is_empty() {
                Error::new(
                    ErrorCode::NotFound,
                    format!("{e}; images in the config: {}", configured.join(", ")),
                )
            } else {
                e
            }
        })?;
        // QEMU boots the bzImage; Firecracker needs the ELF vmlinux.
        let kernel = match (self.vmm.name(), &b.kernel_bzimage) {
            ("qemu", Some(bz)) => bz.clone(),
            _ => b.kernel_vmlinux.clone(),
        };
        Ok(BootFiles {
            rootfs: b.rootfs,
            work_seed: b.work_seed,
            kernel,
            initrd: b.initrd,
            boot_args: DEFAULT_BOOT_ARGS.into(),
            agent: b.agent,
            config: b.config,
        })
    }
}
