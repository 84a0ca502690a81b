//! What a managed kernel can do, for `wick kernel list|show`: its entry point (the Xen PVH
//! note Firecracker's x86_64 loader uses, else the plain ELF entry) and, per guest device wick
//! uses, whether the driver is built in, a module, or missing, read from the kernel's modules
//! directory (`modules.builtin` and the module files).

use serde::{Deserialize, Serialize};

use crate::modules::ModuleIndex;
use crate::store::KernelRecord;

/// The guest devices wick uses and the driver each needs.
pub const FEATURES: &[(&str, &str)] = &[
    ("virtio-mmio", "virtio_mmio"),
    ("virtio-blk", "virtio_blk"),
    ("virtio-net", "virtio_net"),
    ("vsock", "vmw_vsock_virtio_transport"),
    ("virtio-console", "virtio_console"),
];

/// Where a driver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverState {
    /// Built into the kernel (`modules.builtin`).
    Builtin,
    /// A module in the kernel's modules directory.
    Module,
    /// Neither: the guest will lack the device.
    Missing,
    /// The kernel came without modules: assumed built in, not verified.
    Unknown,
}

/// One feature of a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub feature: String,
    pub driver: String,
    pub state: DriverState,
}

/// The drivers of [`FEATURES`] for `k` (an unreadable modules directory reads as unknown).
pub fn features(k: &KernelRecord) -> Vec<Feature> {
    let index = k
        .modules_dir
        .as_deref()
        .and_then(|d| ModuleIndex::load(d).ok());
    FEATURES
        .iter()
        .map(|(feature, driver)| {
            let state = match &index {
                None => DriverState::Unknown,
                Some(i) if i.is_builtin(driver) => DriverState::Builtin,
                Some(i) if i.module_path(driver).is_some() => DriverState::Module,
                Some(_) => DriverState::Missing,
            };
            Feature {
                feature: feature.to_string(),
                driver: driver.to_string(),
                state,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_are_read_from_the_modules_dir() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("6.1.0");
        std::fs::create_dir_all(m.join("kernel/drivers/block")).unwrap();
        std::fs::write(m.join("kernel/drivers/block/virtio_blk.ko.xz"), b"").unwrap();
        std::fs::write(
            m.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_mmio.ko\n",
        )
        .unwrap();
        let mut k: KernelRecord = serde_json::from_value(serde_json::json!({
            "name": "k", "version": "6.1.0", "sha256": "ab", "source_format": "deb",
            "vmlinux": "/k/vmlinux", "bzimage": null, "compression": null, "initrd": null,
            "modules_dir": m, "has_pvh_note": true, "needs_initramfs": true,
            "initrd_modules": [], "builtin_drivers": [], "warnings": [], "imported_at": 1
        }))
        .unwrap();
        let f = features(&k);
        let state = |name: &str| f.iter().find(|x| x.feature == name).unwrap().state;
        assert_eq!(state("virtio-mmio"), DriverState::Builtin);
        assert_eq!(state("virtio-blk"), DriverState::Module);
        assert_eq!(state("virtio-console"), DriverState::Missing);
        k.modules_dir = None;
        assert!(features(&k).iter().all(|x| x.state == DriverState::Unknown));
    }
}
