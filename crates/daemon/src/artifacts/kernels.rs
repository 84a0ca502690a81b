//! The kernel half of [`Artifacts`]: list, get and delete, and the jobs that make kernels
//! (import of a vmlinux, bzImage or kernel `.deb`; download with a pinned sha256).

use std::path::PathBuf;

use wick_kernel::{KernelError, KernelRecord, KernelStore};
use wick_model::api::OpKind;
use wick_model::VmRecord;

use super::{blocking, check_reserved, check_source, in_use_error, kernel_users, Artifacts};
use crate::error::{Error, Result};

/// A job that makes one kernel: checked (name free, source there) and ready to run on the
/// blocking pool with [`KernelJob::run`].
pub struct KernelJob {
    store: KernelStore,
    name: String,
    work: Work,
}

enum Work {
    Import { path: PathBuf },
    Pull { url: String, sha256: String },
}

impl KernelJob {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operation kind that runs it.
    pub fn kind(&self) -> OpKind {
        match self.work {
            Work::Import { .. } => OpKind::KernelImport,
            Work::Pull { .. } => OpKind::KernelPull,
        }
    }

    /// The store the kernel goes into.
    pub fn store(&self) -> &KernelStore {
        &self.store
    }

    /// Makes the kernel (blocking). The store builds it in a staging directory that a failure
    /// removes.
    pub fn run(self, progress: &mut dyn FnMut(&str)) -> Result<KernelRecord> {
        match self.work {
            Work::Import { path } => {
                progress(&format!("import kernel from {}", path.display()));
                Ok(self.store.import(&path, &self.name)?)
            }
            Work::Pull { url, sha256 } => {
                progress(&format!("download and import {url}"));
                Ok(self.store.pull(&url, &sha256, &self.name)?)
            }
        }
    }
}

impl Artifacts {
    /// Every kernel, sorted by name.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>> {
        Ok(self.kernels.list()?)
    }

    /// The boot files of managed kernel `name` (`vm create --kernel`): the bzImage for QEMU
    /// when there is one, else the ELF vmlinux, and its initramfs. An unknown name is an
    /// `invalid_argument` listing the kernels there are.
    pub fn kernel_boot(&self, name: &str, qemu: bool) -> Result<(PathBuf, Option<PathBuf>)> {
        let k = match self.kernels.get(name) {
            Ok(k) => k,
            Err(KernelError::NotFound(_)) => {
                let names: Vec<String> = self.list_kernels()?.into_iter().map(|k| k.name).collect();
                return Err(Error::invalid(format!(
                    "no kernel named {name:?}; managed kernels: {} (`wick kernel list`)",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let kernel = match (qemu, k.bzimage) {
            (true, Some(bz)) => bz,
            _ => k.vmlinux,
        };
        Ok((kernel, k.initrd))
    }

    /// The kernel called `name`.
    pub fn get_kernel(&self, name: &str) -> Result<KernelRecord> {
        Ok(self.kernels.get(name)?)
    }

    /// Deletes kernel `name`, refused with `conflict` while any VM of `in_use` boots it.
    pub async fn delete_kernel(&self, name: &str, in_use: &[VmRecord]) -> Result<KernelRecord> {
        let rec = self.get_kernel(name)?;
        let users = kernel_users(&rec, in_use);
        if !users.is_empty() {
            return Err(in_use_error("kernel", name, &users));
        }
        let store = self.kernels.clone();
        blocking(move || {
            store.delete(&rec.name)?;
            Ok(rec)
        })
        .await
    }

    /// Imports an ELF vmlinux, a bzImage/vmlinuz or a kernel `.deb` as kernel `name`, without
    /// an operation (see [`Artifacts::kernel_import`]).
    pub async fn import_kernel(&self, path: PathBuf, name: String) -> Result<KernelRecord> {
        let job = self.kernel_import(path, name)?;
        blocking(move || job.run(&mut |_| {})).await
    }

    /// The job importing `path` (absolute) as kernel `name`.
    pub fn kernel_import(&self, path: PathBuf, name: String) -> Result<KernelJob> {
        self.check_new_kernel(&name)?;
        check_source(&path)?;
        Ok(self.kernel_job(name, Work::Import { path }))
    }

    /// The job downloading a kernel file, verifying its sha256 and importing it as `name`.
    pub fn kernel_pull(&self, url: String, sha256: String, name: String) -> Result<KernelJob> {
        self.check_new_kernel(&name)?;
        Ok(self.kernel_job(name, Work::Pull { url, sha256 }))
    }

    fn kernel_job(&self, name: String, work: Work) -> KernelJob {
        KernelJob {
            store: self.kernels.clone(),
            name,
            work,
        }
    }

    /// Checks that a kernel name is usable and free, so those errors come before any job.
    pub fn check_new_kernel(&self, name: &str) -> Result<()> {
        check_reserved(name)?;
        match self.kernels.get(name) {
            Ok(k) => Err(Error::conflict(format!(
                "a kernel named {name:?} already exists (version {}); delete it first or \
                 choose another name",
                k.version
            ))),
            Err(KernelError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::path::Path;
    use wick_model::api::ErrorCode;

    #[tokio::test]
    async fn kernel_deletion_is_refused_while_a_vm_boots_it() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let src = d.path().join("vmlinux");
        fake_vmlinux(&src, 1);
        let k = a.import_kernel(src, "k1".into()).await.unwrap();
        let vms = [
            vm("a1", "x", &k.vmlinux),
            vm("b2", "x", Path::new("/elsewhere/vmlinux")),
        ];
        assert_eq!(kernel_users(&k, &vms), ["a1"]);
        let e = a.delete_kernel("k1", &vms).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(
            e.message().contains("kernel \"k1\" is used by VM a1;"),
            "{e}"
        );
        assert!(a.get_kernel("k1").is_ok());
        a.delete_kernel("k1", &vms[1..]).await.unwrap();
        assert_eq!(a.get_kernel("k1").unwrap_err().code(), ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn a_taken_kernel_name_is_a_conflict() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let src = d.path().join("vmlinux");
        fake_vmlinux(&src, 1);
        a.import_kernel(src.clone(), "k1".into()).await.unwrap();
        let e = a.kernel_import(src, "k1".into()).err().unwrap();
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(e.message().contains("already exists"), "{e}");
        let job = a
            .kernel_pull("http://x/k".into(), "00".into(), "k2".into())
            .unwrap();
        assert_eq!((job.kind(), job.name()), (OpKind::KernelPull, "k2"));
    }
}
