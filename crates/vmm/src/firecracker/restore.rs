//! Restoring a Firecracker snapshot into another VM, and the drive paths that make it possible.
//!
//! Firecracker's `PUT /snapshot/load` (v1.16) cannot rename block devices: the vmstate names
//! each drive's `path_on_host` as it was given at boot, and the load opens exactly that path.
//! So an unjailed Firecracker runs with its VM dir as working directory and is given *relative*
//! drive paths ([`drive_path`]): `rootfs.ext4` and `work.ext4` in the VM dir, or, for a disk kept
//! elsewhere (the XFS pool), a symlink `drive-<id>` in the VM dir. A snapshot then names
//! `rootfs.ext4` (or `drive-rootfs`) relative to whichever VM loads it, and the restored VM
//! opens its own clones (a load makes its `drive-<id>` links first).
//! The network interface and the vsock socket are moved with `network_overrides` and
//! `vsock_override`; memory comes from the state's hard link (File backend, a private mapping:
//! forks of one snapshot share its page cache). Jailed snapshots are refused (see
//! [`crate::snapshot`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use wick_model::VmmHandle;

use super::{request, Firecracker};
use crate::common::{remove_if_exists, vm_dir};
use crate::{VmmConfig, VmmError};

/// The path Firecracker is given for drive `id` backed by `disk` (unjailed): relative to the VM
/// dir, its working directory. A disk outside the VM dir gets a symlink `drive-<id>` there
/// (made afresh: the VMM's uid owns the dir, and it opens the link with its own rights).
pub(crate) fn drive_path(handle: &VmmHandle, disk: &Path, id: &str) -> Result<PathBuf, VmmError> {
    let dir = vm_dir(&handle.api_socket);
    if let (Some(parent), Some(name)) = (disk.parent(), disk.file_name()) {
        if parent == dir {
            return Ok(PathBuf::from(name));
        }
    }
    link_drive(&dir, disk, id)
}

/// Makes `dir/drive-<id>` a symlink to `disk` (afresh); returns its relative name.
fn link_drive(dir: &Path, disk: &Path, id: &str) -> Result<PathBuf, VmmError> {
    let link = format!("drive-{id}");
    let at = dir.join(&link);
    remove_if_exists(&at)
        .and_then(|()| std::os::unix::fs::symlink(disk, &at))
        .map_err(|e| {
            VmmError::Other(format!(
                "cannot link {} to {}: {e}",
                at.display(),
                disk.display()
            ))
        })?;
    Ok(PathBuf::from(link))
}

/// Before a load: this VM's disks under both names a state may give them (`drive-<id>` for a
/// disk kept outside the VM dir, e.g. in the XFS pool; the file name for one inside it).
fn link_drives(handle: &VmmHandle, cfg: &VmmConfig) -> Result<(), VmmError> {
    let dir = vm_dir(&handle.api_socket);
    let extra = cfg.extra_disks.iter().enumerate();
    let ids = std::iter::once((cfg.root_disk.clone(), "rootfs".to_string()))
        .chain(extra.map(|(i, d)| (d.clone(), format!("disk{}", i + 1))));
    for (disk, id) in ids {
        link_drive(&dir, &disk, &id)?;
    }
    Ok(())
}

impl Firecracker {
    /// `PUT /snapshot/load` of `files` (`[vmstate, mem]`, hard links in the VM dir) into a
    /// Firecracker started by `spawn_restore`, attached to this VM's TAP and vsock socket; the
    /// guest stays paused.
    pub(crate) async fn load_files(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        files: &[PathBuf],
        timeout: Duration,
    ) -> Result<(), VmmError> {
        if self.jailed() {
            return Err(VmmError::Other(
                "restoring snapshots of jailed Firecracker VMs is not supported yet (unset jailer_bin)".into(),
            ));
        }
        let [state, mem] = files else {
            return Err(VmmError::Other(format!(
                "a Firecracker snapshot has two state files (vmstate, memory), not {}",
                files.len()
            )));
        };
        // Firecracker binds the vsock socket during the load and fails if the file exists.
        remove_if_exists(&handle.vsock_socket).map_err(|e| {
            VmmError::Other(format!(
                "cannot remove stale {}: {e}",
                handle.vsock_socket.display()
            ))
        })?;
        link_drives(handle, cfg)?;
        let req = load_request(handle, cfg, state, mem);
        tokio::time::timeout(timeout, self.load_snapshot(handle, req))
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout(
                    timeout,
                    "Firecracker to answer PUT /snapshot/load".into(),
                ))
            })
    }
}

/// The load request: the File memory backend, this VM's TAP and vsock socket, paused.
pub(crate) fn load_request(
    handle: &VmmHandle,
    cfg: &VmmConfig,
    state: &Path,
    mem: &Path,
) -> request::SnapshotLoad {
    request::SnapshotLoad {
        snapshot_path: state.to_path_buf(),
        mem_backend: request::MemBackend {
            backend_type: request::MemBackendType::File,
            backend_path: mem.to_path_buf(),
        },
        track_dirty_pages: false,
        resume_vm: false,
        network_overrides: cfg
            .tap
            .iter()
            .map(|tap| request::NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: tap.clone(),
            })
            .collect(),
        vsock_override: Some(request::VsockOverride {
            uds_path: handle.vsock_socket.clone(),
        }),
        clock_realtime: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vmm;

    #[test]
    fn drives_inside_the_vm_dir_are_relative_and_others_are_linked() {
        let d = tempfile::tempdir().unwrap();
        let fc = Firecracker::new("/bin/true");
        let h = fc.plan(d.path());
        let inside = d.path().join("rootfs.ext4");
        assert_eq!(
            drive_path(&h, &inside, "rootfs").unwrap(),
            PathBuf::from("rootfs.ext4")
        );
        let outside = PathBuf::from("/pool/vms/x.ext4");
        assert_eq!(
            drive_path(&h, &outside, "rootfs").unwrap(),
            PathBuf::from("drive-rootfs")
        );
        assert_eq!(
            std::fs::read_link(d.path().join("drive-rootfs")).unwrap(),
            outside
        );
        // Made afresh each time.
        drive_path(&h, Path::new("/pool/vms/y.ext4"), "rootfs").unwrap();
        assert_eq!(
            std::fs::read_link(d.path().join("drive-rootfs")).unwrap(),
            PathBuf::from("/pool/vms/y.ext4")
        );
    }

    #[test]
    fn the_load_request_moves_the_tap_and_the_vsock_and_stays_paused() {
        let fc = Firecracker::new("/bin/true");
        let h = fc.plan(Path::new("/v/b"));
        let cfg = VmmConfig {
            vm_id: "b".into(),
            vcpu: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: None,
            boot_args: String::new(),
            root_disk: "/v/b/rootfs.ext4".into(),
            extra_disks: vec![],
            guest_cid: 9,
            tap: Some("wk-new".into()),
            guest_mac: None,
            jail: None,
            require_kvm: false,
        };
        let r = load_request(
            &h,
            &cfg,
            Path::new("/v/b/restore.vmstate"),
            Path::new("/v/b/restore.mem"),
        );
        assert!(!r.resume_vm);
        assert_eq!(r.network_overrides[0].host_dev_name, "wk-new");
        assert_eq!(
            r.vsock_override.unwrap().uds_path,
            PathBuf::from("/v/b/vsock.sock")
        );
        assert_eq!(r.mem_backend.backend_type, request::MemBackendType::File);
    }
}
