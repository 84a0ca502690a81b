//! Image and kernel jobs as operations: the same records, event streams (`GET
//! /v1/operations/{id}/events`) and cancel as VM operations.
//!
//! A job runs on the blocking pool; its progress callback turns each progress message into a
//! stage of the operation. Cancel works in two ways:
//!
//! - At the job's next progress message, the callback unwinds out of the store's code with a
//!   [`Cancelled`] payload (the way salsa and rust-analyzer cancel queries), so the store's
//!   staging directory is dropped on the way out and nothing is committed. Not done during a
//!   golden build, whose progress comes while debootstrap (a child process) runs.
//! - Whatever the job still committed (it ended before noticing, or the cancel came after its
//!   last message) is deleted before the operation ends as `cancelled`.
//!
//! A name is reserved while a job makes it, so two jobs never race for one name and the
//! cleanup of one never removes another's result.

use std::collections::HashSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use wick_image::ImageStore;
use wick_kernel::{KernelError, KernelStore};
use wick_model::api::{ArtifactOp, OpKind};

use super::images::ImageJob;
use super::kernels::KernelJob;
use super::{blocking, image_view, kernel_view, Artifacts};
use crate::error::{Error, Result};
use crate::ops::{OpEntry, Ops};

/// One job: an image or a kernel to make.
pub enum Job {
    Image(ImageJob),
    Kernel(KernelJob),
}

impl From<ImageJob> for Job {
    fn from(j: ImageJob) -> Job {
        Job::Image(j)
    }
}

impl From<KernelJob> for Job {
    fn from(j: KernelJob) -> Job {
        Job::Kernel(j)
    }
}

impl Job {
    fn kind(&self) -> OpKind {
        match self {
            Job::Image(j) => j.kind(),
            Job::Kernel(j) => j.kind(),
        }
    }

    fn name(&self) -> &str {
        match self {
            Job::Image(j) => j.name(),
            Job::Kernel(j) => j.name(),
        }
    }

    /// `image:NAME` or `kernel:NAME`: the reservation key.
    fn key(&self) -> String {
        match self {
            Job::Image(j) => format!("image:{}", j.name()),
            Job::Kernel(j) => format!("kernel:{}", j.name()),
        }
    }

    fn interruptible(&self) -> bool {
        match self {
            Job::Image(j) => j.interruptible(),
            Job::Kernel(_) => true,
        }
    }

    fn leftover(&self) -> Leftover {
        match self {
            Job::Image(j) => Leftover::Image(j.store().clone(), j.name().to_string()),
            Job::Kernel(j) => Leftover::Kernel(j.store().clone(), j.name().to_string()),
        }
    }

    fn run(self, progress: &mut dyn FnMut(&str)) -> Result<ArtifactOp> {
        let name = self.name().to_string();
        let mut out = ArtifactOp::named(name);
        match self {
            Job::Image(j) => out.image = Some(image_view(j.run(progress)?, &[])),
            Job::Kernel(j) => out.kernel = Some(kernel_view(j.run(progress)?, &[])),
        }
        Ok(out)
    }
}

/// What a cancelled job may have committed under its (reserved) name.
enum Leftover {
    Image(ImageStore, String),
    Kernel(KernelStore, String),
}

impl Leftover {
    /// Deletes it; `true` when there was something.
    fn remove(&self) -> Result<bool> {
        match self {
            Leftover::Image(store, name) => match store.exists(name)? {
                true => store.delete(name).map(|_| true).map_err(Error::from),
                false => Ok(false),
            },
            Leftover::Kernel(store, name) => match store.get(name) {
                Ok(_) => store.delete(name).map(|_| true).map_err(Error::from),
                Err(KernelError::NotFound(_)) => Ok(false),
                Err(e) => Err(e.into()),
            },
        }
    }

    fn what(&self) -> String {
        match self {
            Leftover::Image(_, n) => format!("image {n}"),
            Leftover::Kernel(_, n) => format!("kernel {n}"),
        }
    }
}

/// The unwind payload of a cancelled job.
struct Cancelled;

/// Names jobs are making right now.
#[derive(Default, Clone)]
pub(super) struct Names(Arc<Mutex<HashSet<String>>>);

/// A reserved name, released on drop.
pub(crate) struct Reserved {
    names: Names,
    key: String,
}

impl Names {
    pub(super) fn reserve(&self, key: String) -> Result<Reserved> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.clone()) {
            let (what, name) = key.split_once(':').unwrap_or(("artifact", &key));
            return Err(Error::conflict(format!(
                "another operation is making {what} {name:?}; wait for it or cancel it"
            )));
        }
        Ok(Reserved {
            names: self.clone(),
            key,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut set = self.names.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

impl Artifacts {
    /// Reserves image name `name` for a job that makes it outside [`Artifacts::start`] (a
    /// derived build, a commit) until the returned guard drops.
    pub(crate) fn reserve_image(&self, name: &str) -> Result<Reserved> {
        self.jobs.reserve(format!("image:{name}"))
    }

    /// Starts `job` as an operation of `owner` and returns it (running). The job runs to its
    /// end in its own task, also when nobody follows the operation.
    pub fn start(&self, ops: &Ops, owner: u32, job: impl Into<Job>) -> Result<Arc<OpEntry>> {
        let job = job.into();
        let reserved = self.jobs.reserve(job.key())?;
        let op = ops.begin_artifact(job.kind(), job.name(), owner);
        let op2 = op.clone();
        tokio::spawn(async move {
            let out = run(&op2, job).await;
            if let Err(e) = &out {
                tracing::info!(op = %op2.id(), error = %e, "image/kernel operation ended");
            }
            drop(reserved);
            op2.finish_artifact(out);
        });
        Ok(op)
    }
}

/// Runs `job` under `op`: its progress becomes stages, a cancel stops it at its next stage,
/// and whatever a cancelled job committed is deleted.
async fn run(op: &Arc<OpEntry>, job: Job) -> Result<ArtifactOp> {
    run_observed(op, job, |_| {}).await
}

/// [`run`], calling `observe` after each stage (tests cancel at a chosen stage with it).
async fn run_observed(
    op: &Arc<OpEntry>,
    job: Job,
    observe: impl Fn(&str) + Send + 'static,
) -> Result<ArtifactOp> {
    let leftover = job.leftover();
    let interruptible = job.interruptible();
    let entry = op.clone();
    let out = blocking(move || {
        let mut progress = |s: &str| {
            entry.stage(s);
            observe(s);
            if interruptible && entry.cancel.is_cancelled() {
                resume_unwind(Box::new(Cancelled));
            }
        };
        match catch_unwind(AssertUnwindSafe(|| job.run(&mut progress))) {
            Ok(out) => out,
            Err(payload) if payload.is::<Cancelled>() => Err(Error::cancelled()),
            Err(payload) => resume_unwind(payload),
        }
    })
    .await;
    if !op.cancel.is_cancelled() {
        return out;
    }
    let what = leftover.what();
    if blocking(move || leftover.remove()).await? {
        op.stage(&format!("cancelled: removed {what}"));
    }
    Err(Error::cancelled())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use wick_model::api::{ErrorCode, OpState};

    /// Entries of the store directory that are neither images nor its own files.
    fn staging_left(a: &Artifacts) -> Vec<String> {
        std::fs::read_dir(a.images().dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n != ".lock")
            .collect()
    }

    #[tokio::test]
    async fn an_image_job_is_an_operation() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = small_ext4(d.path()) else {
            return;
        };
        let a = artifacts(d.path());
        let ops = Ops::default();
        let job = a.image_import(img.clone(), "base".into()).unwrap();
        let op = a.start(&ops, 0, job).unwrap();
        let e = a
            .start(&ops, 0, a.image_import(img, "base".into()).unwrap())
            .err()
            .unwrap();
        assert_eq!(e.code(), ErrorCode::Conflict, "the name is reserved: {e}");
        let done = op.wait().await;
        assert_eq!(done.state, OpState::Succeeded, "{done:?}");
        assert_eq!(done.kind, OpKind::ImageImport);
        let art = done.artifact.unwrap();
        assert_eq!(art.name, "base");
        assert_eq!(art.image.unwrap().name, "base");
        let (evs, ended) = op.events_since(0);
        assert!(ended);
        assert!(evs
            .iter()
            .any(|e| e.stage.as_deref() == Some("copying the ext4 image")));
        assert!(evs.last().unwrap().artifact.is_some(), "{evs:?}");
        assert_eq!(a.list_images().unwrap().len(), 1);
    }

    /// Cancel lands wherever the job is (between stages, or after its commit): the operation
    /// ends `cancelled`, no image is left and no staging directory either.
    #[tokio::test]
    async fn a_cancelled_import_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = small_ext4(d.path()) else {
            return;
        };
        let a = artifacts(d.path());
        let ops = Ops::default();
        for cancel_at in [
            "checking the ext4 image",
            "copying the ext4 image",
            "hashing the root filesystem",
            "done",
        ] {
            let job = a.image_import(img.clone(), "base".into()).unwrap();
            let op = ops.begin_artifact(job.kind(), job.name(), 0);
            let token = op.cancel.clone();
            let out = run_observed(&op, job.into(), move |s| {
                if s == cancel_at {
                    token.cancel();
                }
            })
            .await;
            assert_eq!(out.unwrap_err().code(), ErrorCode::Cancelled, "{cancel_at}");
            let (evs, _) = op.events_since(0);
            let removed = evs
                .iter()
                .any(|e| e.stage.as_deref() == Some("cancelled: removed image base"));
            // Only a cancel after the commit ("done") finds an image to remove.
            assert_eq!(removed, cancel_at == "done", "{cancel_at}: {evs:?}");
            assert!(a.list_images().unwrap().is_empty(), "{cancel_at}");
            assert!(
                staging_left(&a).is_empty(),
                "{cancel_at}: {:?}",
                staging_left(&a)
            );
            let pruned = a.prune_images().await.unwrap();
            assert!(pruned.removed.is_empty(), "{cancel_at}: {pruned:?}");
        }
        // The store is consistent: the same name imports again.
        let op = a
            .start(&ops, 0, a.image_import(img, "base".into()).unwrap())
            .unwrap();
        assert_eq!(op.wait().await.state, OpState::Succeeded);
    }

    #[tokio::test]
    async fn a_cancelled_kernel_import_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let ops = Ops::default();
        let src = d.path().join("vmlinux");
        fake_vmlinux(&src, 1);
        let op = a
            .start(&ops, 0, a.kernel_import(src.clone(), "k1".into()).unwrap())
            .unwrap();
        op.cancel.cancel();
        let done = op.wait().await;
        assert_eq!(done.state, OpState::Cancelled, "{done:?}");
        assert!(a.list_kernels().unwrap().is_empty());
        let op = a
            .start(&ops, 0, a.kernel_import(src, "k1".into()).unwrap())
            .unwrap();
        let done = op.wait().await;
        assert_eq!(done.state, OpState::Succeeded, "{done:?}");
        assert_eq!(done.artifact.unwrap().kernel.unwrap().name, "k1");
    }

    #[tokio::test]
    async fn a_failed_job_reports_and_leaves_no_staging() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let ops = Ops::default();
        let bad = d.path().join("not-an-image");
        std::fs::write(&bad, b"neither a tarball nor ext4").unwrap();
        let op = a
            .start(&ops, 0, a.image_import(bad, "x".into()).unwrap())
            .unwrap();
        let done = op.wait().await;
        assert_eq!(done.state, OpState::Failed, "{done:?}");
        assert!(done.error.unwrap().op_id.is_some());
        assert!(a.list_images().unwrap().is_empty());
        assert!(staging_left(&a).is_empty(), "{:?}", staging_left(&a));
    }
}
