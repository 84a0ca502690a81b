//! The `contain` capability: every VMM and sidecar runs as its VM's own unprivileged uid, in a
//! per-VM cgroup with CPU (vcpu quota), memory (guest + overhead) and pids limits.
//!
//! Durability: the uid is leased in the store (`vmm_uids`, unique per uid and per VM) and
//! recorded with the cgroup name (`<cgroup_parent>/vm-<12 hex>`) in `runtime.jail` before the
//! cgroup is made; each file handed to the uid is recorded (with its previous owner) before the
//! `chown`. `cleanup` kills whatever is left in the cgroup, removes it, gives every file in the VM
//! dir owned by the uid back to root and restores the recorded owners, then frees the uid; the
//! start-up sweep removes `vm-*` cgroups under the parent that no VM records.
//!
//! Files: the VM dir (0700) and its disks and log belong to the uid while the VMM runs; the
//! directories above it get the search bit for others (`o+x`, never `r`), so the uid can reach
//! its own dir and nothing else. The shared kernel and initrd are exposed read-only in the VM's
//! `boot/` dir (root-owned): a hard link when the artifact is world-readable on the same
//! filesystem, else a root-owned 0444 copy.

use std::ops::RangeInclusive;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use wick_host::cgroup::{Cgroups, Limits};
use wick_model::api::{Check, CheckStatus};
use wick_model::{Grant, VmRecord, VmmJail};
use wick_vmm::{Jail, VmmConfig};

use crate::capability::{Capability, HookCtx};
use crate::error::{Error, Result};

/// Memory a VMM needs beyond the guest's RAM (QEMU's TCG translation cache, device emulation,
/// the vsock sidecar).
pub const MEMORY_OVERHEAD_MIB: u64 = 512;
/// Tasks (processes + threads) per VM cgroup: QEMU's vCPU, I/O and worker threads, the sidecar.
pub const PIDS_MAX: u64 = 1024;
/// The VM dir's subdirectory holding the read-only kernel and initrd.
const BOOT_DIR: &str = "boot";

/// Confines VMMs (see the module docs).
pub struct Contain {
    cgroups: std::result::Result<Cgroups, String>,
    parent: String,
    uids: RangeInclusive<u32>,
    /// Directories above the VM dirs that need the search bit for the VMM uids.
    traverse: Vec<PathBuf>,
    /// `<state>/jail`: Firecracker jailer chroots (`<exec name>/vm-<12 hex>`).
    jails: PathBuf,
    /// Serializes making a VM cgroup with removing the (then empty) parent.
    tree: std::sync::Mutex<()>,
}

impl Contain {
    /// VM dirs are `paths.state/vms/<id>`; cgroup hierarchies invisible in wickd's mount
    /// namespace are mounted under `paths.run/cgroup` (see [`Cgroups::detect_or_mount`]).
    pub fn new(parent: String, uids: RangeInclusive<u32>, paths: &wick_model::Paths) -> Contain {
        let mut traverse = vec![paths.state.join("vms"), paths.state.clone()];
        traverse.extend(paths.root.clone());
        Contain {
            cgroups: Cgroups::detect_or_mount(&paths.run.join("cgroup")).map_err(|e| e.to_string()),
            parent,
            uids,
            traverse,
            jails: paths.state.join("jail"),
            tree: Default::default(),
        }
    }

    fn cgroups(&self) -> Result<&Cgroups> {
        self.cgroups.as_ref().map_err(|e| {
            Error::precondition(format!(
                "VMM containment needs cgroups with the cpu, memory and pids controllers: {e}; \
                 or set contain_vmm = false in config.toml (VMMs then run as root, unconfined)"
            ))
        })
    }

    fn cgroup_name(&self, vm: &VmRecord) -> String {
        format!("{}/vm-{}", self.parent, vm.short_id())
    }
}

/// The VM's limits: `vcpu` CPUs of quota, guest memory + [`MEMORY_OVERHEAD_MIB`], [`PIDS_MAX`].
pub fn limits(vm: &VmRecord) -> Limits {
    Limits::for_vm(
        vm.spec.vcpu,
        vm.spec.memory_mib,
        MEMORY_OVERHEAD_MIB,
        PIDS_MAX,
    )
}

/// The group of `/dev/kvm` when it grants group read/write (so an unprivileged VMM can use KVM).
fn kvm_groups() -> Vec<u32> {
    match std::fs::metadata("/dev/kvm") {
        Ok(m) if m.gid() != 0 && m.mode() & 0o060 == 0o060 => vec![m.gid()],
        _ => Vec::new(),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::internal(format!("{what}: {e}"))
}

/// The VM's boot file for `src` inside `boot/` (same file name).
fn boot_path(dir: &Path, src: &Path) -> PathBuf {
    dir.join(BOOT_DIR)
        .join(src.file_name().unwrap_or(std::ffi::OsStr::new("kernel")))
}

/// Exposes `src` read-only at `dst`: a hard link when `src` is world-readable (same inode, same
/// root ownership), else a root-owned 0444 copy.
fn expose_read_only(src: &Path, dst: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dst);
    let meta = std::fs::metadata(src).map_err(io(format!("boot file {}", src.display())))?;
    if meta.mode() & 0o004 != 0 && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(io(format!("copying {} into the VM dir", src.display())))?;
    std::os::unix::fs::lchown(dst, Some(0), Some(0))
        .map_err(io(format!("chown {}", dst.display())))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o444))
        .map_err(io(format!("chmod {}", dst.display())))
}

/// Adds the search bit for others to each of `dirs` (never the read bit).
fn ensure_traversable(dirs: &[PathBuf]) -> Result<()> {
    for d in dirs {
        let m = std::fs::metadata(d).map_err(io(format!("{}", d.display())))?;
        if m.mode() & 0o001 == 0 {
            let mode = (m.mode() & 0o7777) | 0o001;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod o+x {}", d.display())))?;
        }
    }
    Ok(())
}

/// Gives every entry under `dir` (and `dir`) owned by `uid` back to root, never following a link.
fn reclaim(dir: &Path, uid: u32, depth: u32) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if meta.uid() == uid && meta.file_type().is_symlink() {
        // Nothing of wick's is a symlink: the VMM (escaped?) made it. Root never follows it.
        return std::fs::remove_file(dir).map_err(io(format!("removing {}", dir.display())));
    }
    if meta.uid() == uid {
        std::os::unix::fs::lchown(dir, Some(0), Some(0))
            .map_err(io(format!("chown {} back to root", dir.display())))?;
    }
    if !meta.is_dir() || depth == 0 {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)
        .map_err(io(format!("{}", dir.display())))?
        .flatten()
    {
        reclaim(&e.path(), uid, depth - 1)?;
    }
    Ok(())
}

/// The files a VMM uid must own: its VM dir, disks and log (created empty if missing).
fn files_to_grant(vm: &VmRecord) -> Vec<PathBuf> {
    let dir = &vm.runtime.dir;
    let mut out = vec![dir.clone(), dir.join("vmm.log")];
    out.extend(vm.runtime.root_disk.iter().cloned());
    out.extend(vm.runtime.work_disk.iter().filter(|p| p.exists()).cloned());
    out
}

impl Contain {
    /// Records, then hands each of the VM's files to the uid (and exposes the boot files).
    fn grant(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        let dir = cx.vm.runtime.dir.clone();
        ensure_traversable(&self.traverse)?;
        let log = dir.join("vmm.log");
        wick_vmm::log::open_regular(std::fs::OpenOptions::new().create(true).append(true), &log)
            .map_err(io(format!("creating {}", log.display())))?;
        let Some(jail) = cx.vm.runtime.jail.as_ref() else {
            return Err(Error::internal("grant without a recorded jail"));
        };
        let uid = jail.uid;
        let todo = files_to_grant(cx.vm);
        let mut new = Vec::new();
        for p in &todo {
            let m = std::fs::symlink_metadata(p).map_err(io(format!("{}", p.display())))?;
            // The VM dir belonged to the VMM's uid before: root follows no link it left there,
            // symbolic or hard (a hard link to a host file would hand that file to the uid).
            let plain = m.is_dir() || (m.is_file() && m.nlink() == 1);
            if p != &dir && p.starts_with(&dir) && !plain {
                return Err(Error::precondition(format!(
                    "refusing to hand {} to the VMM: it is not a regular file with one link or \
                     a directory",
                    p.display()
                )));
            }
            if m.uid() != uid && !jail.granted.iter().any(|g| &g.path == p) {
                new.push(Grant {
                    path: p.clone(),
                    uid: m.uid(),
                    gid: m.gid(),
                });
            }
        }
        if let Some(j) = cx.vm.runtime.jail.as_mut() {
            j.granted.extend(new);
        }
        cx.persist()?; // previous owners recorded before any chown
        let owner = crate::perms::Access::User(nix::unistd::Uid::from_raw(uid));
        for p in &todo {
            crate::perms::apply(p, owner)
                .map_err(io(format!("giving {} to uid {uid}", p.display())))?;
        }
        let boot = dir.join(BOOT_DIR);
        if std::fs::symlink_metadata(&boot).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&boot).map_err(io(format!("removing {}", boot.display())))?;
        }
        std::fs::create_dir_all(&boot).map_err(io(format!("creating {}", boot.display())))?;
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", boot.display())))?;
        let spec = &cx.vm.spec;
        for src in std::iter::once(&spec.kernel).chain(spec.initrd.iter()) {
            expose_read_only(src, &boot_path(&dir, src))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Capability for Contain {
    fn name(&self) -> &'static str {
        "contain"
    }

    async fn preflight(&self, _vm: &VmRecord) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::precondition(
                "VMM containment needs wickd to run as root (to create cgroups and hand files to \
                 the VMM uids); run wickd as root or set contain_vmm = false in config.toml",
            ));
        }
        self.cgroups().map(drop)
    }

    async fn prepare_host(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        let cgroups = self.cgroups()?.clone();
        let uid = cx
            .store()
            .lease_uid(&cx.vm.id, self.uids.clone())?
            .ok_or_else(|| {
                Error::precondition(format!(
                    "every VMM uid of vmm_uid_range ({}-{}) is in use: stop a VM or widen the range",
                    self.uids.start(),
                    self.uids.end()
                ))
            })?;
        let cgroup = self.cgroup_name(cx.vm);
        let granted = cx
            .vm
            .runtime
            .jail
            .take()
            .map(|j| j.granted)
            .unwrap_or_default();
        cx.vm.runtime.jail = Some(VmmJail {
            uid,
            gid: uid,
            cgroup: cgroup.clone(),
            granted,
        });
        cx.persist()?; // uid and cgroup recorded before either is used
        let limits = limits(cx.vm);
        tokio::task::block_in_place(|| {
            let _t = self.tree.lock().unwrap_or_else(|e| e.into_inner());
            cgroups.create(&cgroup, &limits)
        })
        .map_err(|e| Error::precondition(format!("creating cgroup {cgroup}: {e}")))?;
        tokio::task::block_in_place(|| self.grant(cx))
    }

    fn vmm_config(&self, vm: &VmRecord, cfg: &mut VmmConfig) {
        let (Some(j), Ok(cgroups)) = (&vm.runtime.jail, &self.cgroups) else {
            return;
        };
        cfg.kernel = boot_path(&vm.runtime.dir, &vm.spec.kernel);
        cfg.initrd = vm
            .spec
            .initrd
            .as_ref()
            .map(|i| boot_path(&vm.runtime.dir, i));
        cfg.jail = Some(Jail {
            uid: j.uid,
            gid: j.gid,
            groups: kvm_groups(),
            cgroup: j.cgroup.clone(),
            cgroup_procs: cgroups.procs_files(&j.cgroup),
            limits: limits(vm),
            cgroup_version: if cgroups.version() == "v1" { 1 } else { 2 },
        });
    }

    async fn cleanup(&self, cx: &mut HookCtx<'_>) -> Result<()> {
        let Some(jail) = cx.vm.runtime.jail.clone() else {
            cx.store().release_uid(&cx.vm.id)?;
            return Ok(());
        };
        if let Ok(cgroups) = &self.cgroups {
            tokio::task::block_in_place(|| {
                cgroups.remove(&jail.cgroup)?;
                // The parent goes with its last VM (it stays while others use it).
                let _t = self.tree.lock().unwrap_or_else(|e| e.into_inner());
                cgroups.remove_if_empty(&self.parent);
                Ok::<_, wick_host::cgroup::CgroupError>(())
            })
            .map_err(|e| Error::internal(format!("removing cgroup {}: {e}", jail.cgroup)))?;
        }
        let dir = cx.vm.runtime.dir.clone();
        tokio::task::block_in_place(|| -> Result<()> {
            reclaim(&dir, jail.uid, 8)?;
            for g in &jail.granted {
                match std::os::unix::fs::lchown(&g.path, Some(g.uid), Some(g.gid)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(format!("restoring the owner of {}", g.path.display()))(
                            e,
                        ))
                    }
                    _ => {}
                }
            }
            match std::fs::remove_dir_all(dir.join(BOOT_DIR)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io(format!("removing {}/{BOOT_DIR}", dir.display()))(e))
                }
                _ => Ok(()),
            }
        })?;
        cx.store().release_uid(&cx.vm.id)?;
        cx.vm.runtime.jail = None;
        cx.persist()
    }

    async fn doctor(&self, vms: &[VmRecord]) -> Vec<Check> {
        let check = |status, detail: String, hint: Option<&str>| Check {
            area: "contain".into(),
            name: "cgroups".into(),
            status,
            detail,
            hint: hint.map(str::to_owned),
        };
        let confined = vms.iter().filter(|v| v.runtime.jail.is_some()).count();
        vec![match &self.cgroups {
            Ok(c) => check(
                CheckStatus::Pass,
                format!(
                    "cgroup {} under {}/; VMM uids {}-{}; {confined} VM(s) confined now",
                    c.version(),
                    self.parent,
                    self.uids.start(),
                    self.uids.end()
                ),
                None,
            ),
            Err(e) => check(
                CheckStatus::Fail,
                e.clone(),
                Some(
                    "mount the cpu, memory and pids cgroup controllers, or set contain_vmm = false",
                ),
            ),
        }]
    }

    /// wickd's start-up hardening (`perms::harden_tree`) strips every group/other bit, also the
    /// search bit adopted VMMs need to reach their VM dirs: give it back before serving.
    async fn started(&self, _vms: &[VmRecord]) -> Result<()> {
        ensure_traversable(&self.traverse)
    }

    /// Removes `vm-*` cgroups under the parent and jails that no VM records (a lease without a
    /// recorded jail is freed by `cleanup`).
    async fn sweep(&self, vms: &[VmRecord]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let Ok(cgroups) = &self.cgroups else {
            return Ok(out);
        };
        let recorded: std::collections::HashSet<&str> = vms
            .iter()
            .filter_map(|v| v.runtime.jail.as_ref().map(|j| j.cgroup.as_str()))
            .collect();
        for name in cgroups.children(&self.parent) {
            let rel = format!("{}/{name}", self.parent);
            if !name.starts_with("vm-") || recorded.contains(rel.as_str()) {
                continue;
            }
            match tokio::task::block_in_place(|| cgroups.remove(&rel)) {
                Ok(_) => out.push(format!("cgroup {rel}")),
                Err(e) => tracing::error!(cgroup = %rel, error = %e, "cannot remove orphan cgroup"),
            }
        }
        cgroups.remove_if_empty(&self.parent);
        out.extend(self.sweep_jails(vms));
        Ok(out)
    }
}

impl Contain {
    /// Removes jailer chroots (`<state>/jail/<exec>/vm-<12 hex>`) of VMs that no longer exist.
    /// Those of existing VMs are the driver's (removed at its cleanup, re-made at each start).
    fn sweep_jails(&self, vms: &[VmRecord]) -> Vec<String> {
        let known: std::collections::HashSet<String> =
            vms.iter().map(|v| format!("vm-{}", v.short_id())).collect();
        let mut out = Vec::new();
        for exec in std::fs::read_dir(&self.jails)
            .into_iter()
            .flatten()
            .flatten()
        {
            for jail in std::fs::read_dir(exec.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = jail.file_name().to_string_lossy().into_owned();
                if name.starts_with("vm-") && !known.contains(&name) {
                    match std::fs::remove_dir_all(jail.path()) {
                        Ok(()) => out.push(format!("jail {}", jail.path().display())),
                        Err(e) => {
                            tracing::error!(path = %jail.path().display(), error = %e, "cannot remove orphan jail")
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_boot_files_are_links_or_root_copies() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("vmlinux");
        std::fs::write(&src, b"kernel").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
        let dst = dir.path().join("link");
        expose_read_only(&src, &dst).unwrap();
        assert_eq!(
            std::fs::metadata(&dst).unwrap().ino(),
            std::fs::metadata(&src).unwrap().ino(),
            "world-readable: hard link"
        );
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
        expose_read_only(&src, &dst).unwrap();
        let m = std::fs::metadata(&dst).unwrap();
        assert_ne!(
            m.ino(),
            std::fs::metadata(&src).unwrap().ino(),
            "private: a copy"
        );
        assert_eq!(m.mode() & 0o7777, 0o444);
        assert_eq!(std::fs::read(&dst).unwrap(), b"kernel");
    }

    #[test]
    fn traversal_adds_only_the_search_bit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("s");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        ensure_traversable(std::slice::from_ref(&d)).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o701);
    }
}
