//! Derived builds (`wick image build --from`) and commits (`wick vm commit`): images made from
//! a VM's root disk, as artifact operations (progress, cancel, nothing left behind).
//!
//! A derived build is planned first ([`Daemon::plan_build`]: names, base image, packages, the
//! `--copy` files read with the caller's rights, the cache key). A plan whose key an image
//! already records is a cache hit: no VM, the existing image (or a new name for its files).
//! Otherwise the build runs ([`super::builder`]): its record is saved in the store's `meta`
//! (`image_builds`) before the builder VM exists, the VM (`build-<hex>`, root's, NAT on) is
//! made through the normal create path, the steps run, the VM is stopped, its root disk becomes
//! the image, and the VM is deleted and the record dropped in every outcome. After a crash,
//! [`sweep`] deletes what a recorded build left (run at start, after reconcile).
//!
//! Who may do what (images are shared, as for pull and prune): any socket user may build or
//! commit an image under a new name, from any image and from their own stopped VMs; replacing
//! an existing name (`force`) and deleting images are root's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wick_image::{DiskImage, ImageRecord, ImageSource, KeyedFile};
use wick_model::api::{
    ArtifactOp, BuildImageRequest, CommitVmRequest, ErrorCode, OpKind, Operation,
};
use wick_model::vm::LifecycleOp;
use wick_model::VmState;

use super::{image_users, image_view, in_use_error};
use crate::config::FileSync;
use crate::daemon::{Caller, Daemon};
use crate::error::{Error, Result};
use crate::ops::OpEntry;

/// The `meta` key holding the builds in flight (id → [`BuildRecord`]).
const META_KEY: &str = "image_builds";
/// Most derived builds a socket user runs at once (each holds a builder VM).
const MAX_BUILDS_PER_USER: usize = 1;
/// Most packages, run steps and copied files one build takes.
const MAX_ITEMS: usize = 256;
/// Default mode of a copied file.
const COPY_MODE: u32 = 0o644;

/// A checked derived build, ready to run.
pub struct BuildPlan {
    pub name: String,
    pub base: ImageRecord,
    pub packages: Vec<String>,
    pub run: Vec<String>,
    pub copies: Vec<CopyIn>,
    pub key: String,
    pub force: bool,
}

/// A file to put into the builder VM: read on the host already.
pub struct CopyIn {
    pub dst: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// A build in flight, saved before its builder VM exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    pub name: String,
    pub vm_name: String,
}

/// Serialises the per-user build count with the registration of a new build.
static BUILD_SLOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Serialises read-modify-write of the `image_builds` meta entry.
static RECORDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read_records(d: &Daemon) -> Result<BTreeMap<String, BuildRecord>> {
    let raw = d.store.get_meta(META_KEY)?;
    Ok(raw
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_default())
}

fn update_records(d: &Daemon, f: impl FnOnce(&mut BTreeMap<String, BuildRecord>)) -> Result<()> {
    let _g = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
    let mut all = read_records(d)?;
    f(&mut all);
    let text = serde_json::to_string(&all).map_err(|e| Error::internal(e.to_string()))?;
    let value = (!all.is_empty()).then_some(text);
    d.store.set_meta(META_KEY, value.as_deref())?;
    Ok(())
}

/// Whether VM `vm_name` (owned by root) is the builder VM of a build in flight. Builders get
/// no identity files: the steps are the requester's, so root's `[[file_sync]]` files and git
/// identity must never reach them.
/// When the records cannot be read, a root VM counts as a builder (fails closed: it only
/// loses root's files).
pub fn is_builder_vm(d: &Daemon, owner: u32, vm_name: &str) -> bool {
    owner == 0 && read_records(d).map_or(true, |all| all.values().any(|r| r.vm_name == vm_name))
}

/// Saves `rec` (before its builder VM is created).
pub(super) fn record(d: &Daemon, rec: &BuildRecord) -> Result<()> {
    update_records(d, |all| {
        all.insert(rec.id.clone(), rec.clone());
    })
}

/// Drops the record of build `id` (its VM is gone).
pub(super) fn forget(d: &Daemon, id: &str) -> Result<()> {
    update_records(d, |all| {
        all.remove(id);
    })
}

/// Deletes the builder VM called `vm_name`, if it exists (idempotent).
pub(super) async fn delete_builder(d: &Arc<Daemon>, vm_name: &str) -> Result<()> {
    let vm = match d.store.find_vm(vm_name, Some(0)) {
        Ok(vm) => vm,
        Err(wick_store::StoreError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let op = d.begin(LifecycleOp::Delete, vm)?;
    let done = op.wait().await;
    match done.error {
        None => Ok(()),
        Some(e) => Err(Error(e)),
    }
}

/// Start-up sweep: deletes the builder VM of every build a crash interrupted, drops their
/// records and removes dead staging directories. Runs after reconcile settled the VMs.
pub async fn sweep(d: &Arc<Daemon>) -> Vec<String> {
    let mut swept = Vec::new();
    let records = match read_records(d) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "image builds: cannot read their records");
            return swept;
        }
    };
    for rec in records.into_values() {
        match delete_builder(d, &rec.vm_name).await {
            Ok(()) => match forget(d, &rec.id) {
                Ok(()) => swept.push(format!("image build {} ({})", rec.name, rec.vm_name)),
                Err(e) => tracing::error!(error = %e, "image build record"),
            },
            Err(e) => tracing::error!(vm = %rec.vm_name, error = %e, "builder VM not deleted"),
        }
    }
    match d.artifacts.images().sweep_staging() {
        Ok(s) => swept.extend(s.iter().map(|p| p.display().to_string())),
        Err(e) => tracing::error!(error = %e, "image staging sweep"),
    }
    swept
}

/// Refuses package names apt would take as options or that are not Debian package names.
pub(super) fn check_packages(pkgs: &[String]) -> Result<()> {
    for p in pkgs {
        let ok = !p.is_empty()
            && p.len() <= 128
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
        if !ok {
            return Err(Error::invalid(format!(
                "{p:?} is not a Debian package name (lowercase a-z, 0-9, '+', '.', '-')"
            )));
        }
    }
    Ok(())
}

fn check_counts(req: &BuildImageRequest) -> Result<()> {
    for (what, n) in [
        ("packages", req.packages.len()),
        ("run steps", req.run.len()),
        ("copied files", req.copy.len()),
    ] {
        if n > MAX_ITEMS {
            return Err(Error::invalid(format!(
                "{n} {what}; a build takes at most {MAX_ITEMS}"
            )));
        }
    }
    if req.run.iter().any(|r| r.trim().is_empty()) {
        return Err(Error::invalid("a --run step is empty"));
    }
    Ok(())
}

/// Reads the `--copy` sources with `owner`'s rights (see `filesync`): a file the owner cannot
/// read is refused by the kernel, and the build with it.
async fn read_copies(req: &BuildImageRequest, owner: u32) -> Result<Vec<CopyIn>> {
    let mut files = Vec::new();
    for c in &req.copy {
        if !c.src.is_absolute() {
            return Err(Error::invalid(format!(
                "--copy source {} is not an absolute path",
                c.src.display()
            )));
        }
        if !c.dst.starts_with('/') || c.dst.split('/').any(|s| s == "..") || c.dst.ends_with('/') {
            return Err(Error::invalid(format!(
                "--copy destination {:?} must be an absolute guest file path without '..'",
                c.dst
            )));
        }
        let mode = c.mode.unwrap_or(COPY_MODE);
        if mode > 0o777 {
            return Err(Error::invalid(format!(
                "--copy mode {mode:o} is not a permission mode (0-0777)"
            )));
        }
        files.push(FileSync {
            host: c.src.clone(),
            guest: c.dst.clone(),
            mode: Some(format!("{mode:o}")),
        });
    }
    let (read, refused) =
        tokio::task::spawn_blocking(move || crate::filesync::read_files(&files, owner))
            .await
            .map_err(|e| Error::internal(e.to_string()))?;
    if let Some(why) = refused.first() {
        let why = why.replacen("file_sync", "--copy", 1);
        return Err(Error::new(ErrorCode::PermissionDenied, why));
    }
    Ok(read
        .into_iter()
        .map(|f| CopyIn {
            dst: f.path,
            mode: f.mode,
            contents: f.contents,
        })
        .collect())
}

/// Whether `caller` may make image `name` (replacing it with `force`).
fn check_target(d: &Daemon, name: &str, force: bool, caller: Caller) -> Result<()> {
    wick_image::validate_image_name(name)?;
    super::check_reserved(name)?;
    if !d.artifacts.images().exists(name)? {
        return Ok(());
    }
    if !force {
        return Err(Error::conflict(format!(
            "an image named {name:?} already exists (made from other inputs); choose another \
             name, or replace it with --force (root only)"
        )));
    }
    if caller.uid != 0 {
        return Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("only root can replace image {name:?} (--force); images are shared"),
        ));
    }
    let users = image_users(name, &d.store.list_vms(None)?);
    if !users.is_empty() {
        return Err(in_use_error("image", name, &users));
    }
    Ok(())
}

impl Daemon {
    /// Checks a derived build and computes its cache key (reading `--copy` files as the
    /// caller). Nothing is made.
    pub async fn plan_build(&self, req: &BuildImageRequest, caller: Caller) -> Result<BuildPlan> {
        let from = req.from.clone().unwrap_or_default();
        let name = req
            .name
            .clone()
            .ok_or_else(|| Error::invalid("a build --from needs --name"))?;
        check_counts(req)?;
        check_packages(&req.packages)?;
        wick_image::validate_image_name(&name)?;
        super::check_reserved(&name)?;
        let base = self.artifacts.get_image(&from)?;
        let copies = read_copies(req, caller.uid).await?;
        let keyed: Vec<KeyedFile<'_>> = copies
            .iter()
            .map(|c| KeyedFile {
                dst: &c.dst,
                mode: c.mode,
                contents: &c.contents,
            })
            .collect();
        let key = wick_image::build_key(&base, &req.packages, &req.run, &keyed);
        Ok(BuildPlan {
            name,
            base,
            packages: req.packages.clone(),
            run: req.run.clone(),
            copies,
            key,
            force: req.force,
        })
    }

    /// Starts a derived build as an operation of `caller`: a cache hit ends at once with the
    /// existing image; otherwise a builder VM runs the steps.
    pub async fn build_image(
        self: &Arc<Self>,
        req: BuildImageRequest,
        caller: Caller,
    ) -> Result<Operation> {
        let plan = self.plan_build(&req, caller).await?;
        let reserved = self.artifacts.reserve_image(&plan.name)?;
        if let Some(op) = self.cache_hit(&plan, caller)? {
            return Ok(op);
        }
        check_target(self, &plan.name, plan.force, caller)?;
        let op = {
            // Counting a user's builds and registering this one are one step.
            let _slots = BUILD_SLOTS.lock().unwrap_or_else(|e| e.into_inner());
            self.check_build_slots(caller)?;
            self.ops
                .begin_artifact(OpKind::ImageBuild, &plan.name, caller.uid)
        };
        let (d, op2) = (self.clone(), op.clone());
        tokio::spawn(async move {
            let out = super::builder::run(&d, &op2, plan).await;
            if let Err(e) = &out {
                tracing::info!(op = %op2.id(), error = %e, "image build ended");
            }
            drop(reserved);
            op2.finish_artifact(out);
        });
        Ok(op.snapshot())
    }

    /// A socket user runs at most [`MAX_BUILDS_PER_USER`] builds at once: each holds a
    /// root-owned builder VM, which `[limits]` (counted on the user's own VMs) does not see.
    fn check_build_slots(&self, caller: Caller) -> Result<()> {
        if caller.uid == 0 {
            return Ok(());
        }
        let mine = self
            .ops
            .running()
            .iter()
            .filter(|e| e.owner == caller.uid)
            .filter(|e| e.snapshot().kind == OpKind::ImageBuild)
            .count();
        if mine >= MAX_BUILDS_PER_USER {
            return Err(Error::conflict(format!(
                "you already have {mine} image build(s) running, the most a user may run at \
                 once; wait for it or cancel it"
            )));
        }
        Ok(())
    }

    /// An operation that is already over when an image records `plan.key`: the image itself
    /// (same name), or a new name for its files (another name).
    fn cache_hit(&self, plan: &BuildPlan, caller: Caller) -> Result<Option<Operation>> {
        let images = self.artifacts.images();
        let Some(hit) = images.find_by_key(&plan.key)? else {
            return Ok(None);
        };
        let image = if hit.name == plan.name {
            hit
        } else {
            let current = images.get(&plan.name).ok();
            if current.as_ref().and_then(|c| c.build_key.as_deref()) == Some(plan.key.as_str()) {
                current.expect("checked")
            } else {
                check_target(self, &plan.name, plan.force, caller)?;
                images.alias(&hit.name, &plan.name, plan.force)?
            }
        };
        let op = self
            .ops
            .begin_artifact(OpKind::ImageBuild, &plan.name, caller.uid);
        op.stage("cache hit: an image with the same inputs exists, no VM needed");
        op.output(&format!(
            "cache hit: image {} (key {})",
            image.name,
            &plan.key[..12]
        ));
        let mut out = ArtifactOp::named(plan.name.clone());
        out.image = Some(image_view(image, &[]));
        op.finish_artifact(Ok(out));
        Ok(Some(op.snapshot()))
    }

    /// `vm commit`: an image from the caller's stopped VM `reference`, as an operation.
    pub fn commit_vm(
        self: &Arc<Self>,
        reference: &str,
        req: CommitVmRequest,
        caller: Caller,
    ) -> Result<Operation> {
        check_target(self, &req.name, req.force, caller)?;
        let vm = self.find(reference, caller)?;
        let guard = self.ops.try_lock_vm(&vm.id, &vm.name, None)?;
        let vm = self.store.get_vm(&vm.id)?;
        if vm.state != VmState::Stopped || vm.runtime.vmm.is_some() {
            return Err(Error::conflict(format!(
                "VM {} is {}; a commit takes a stopped VM's disk (a running guest's disk is not \
                 consistent): stop it first (`wick vm stop {}`)",
                vm.name, vm.state, vm.name
            )));
        }
        let disk: PathBuf = vm.runtime.root_disk.clone().ok_or_else(|| {
            Error::precondition(format!("VM {} has no root disk recorded", vm.name))
        })?;
        let reserved = self.artifacts.reserve_image(&req.name)?;
        let base = self.artifacts.get_image(&vm.spec.image).ok();
        let what = DiskImage {
            source: ImageSource::Commit {
                vm: vm.name.clone(),
                base: vm.spec.image.clone(),
            },
            build_key: None,
            default_kernel: base.as_ref().and_then(|b| b.default_kernel.clone()),
            agent_injected: base.map_or(vm.spec.agent, |b| b.agent_injected),
            replace: req.force,
        };
        let op = self
            .ops
            .begin_artifact(OpKind::ImageCommit, &req.name, caller.uid);
        let (store, name, op2) = (self.artifacts.images().clone(), req.name, op.clone());
        tokio::spawn(async move {
            let op3 = op2.clone();
            let out = tokio::task::spawn_blocking(move || {
                let mut progress = |s: &str| op3.stage(s);
                let img = store.import_disk(&disk, &name, what, &mut progress)?;
                let size = img.size;
                op3.output(&format!("image {} made: {} bytes", img.name, size));
                let mut out = ArtifactOp::named(name);
                out.image = Some(image_view(img, &[]));
                Ok(out)
            })
            .await
            .map_err(|e| Error::internal(e.to_string()))
            .and_then(|r| r);
            drop((guard, reserved));
            op2.finish_artifact(out);
        });
        Ok(op.snapshot())
    }
}

/// A new build id: 12 hex digits.
pub(super) fn new_build_id() -> String {
    wick_model::new_vm_id()[..12].to_string()
}

/// The operation's cancel as an error at a step boundary.
pub(super) fn check(op: &OpEntry) -> Result<()> {
    op.check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_checked() {
        assert!(check_packages(&["jq".into(), "g++".into(), "libc6-dev".into()]).is_ok());
        for bad in ["-o", "--allow-unauthenticated", "Jq", "a b", "", "x;rm"] {
            let e = check_packages(&[bad.into()]).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn counts_and_empty_steps_are_refused() {
        let req = BuildImageRequest {
            run: vec!["  ".into()],
            ..Default::default()
        };
        assert!(check_counts(&req).unwrap_err().message().contains("empty"));
        let req = BuildImageRequest {
            packages: vec!["a".into(); MAX_ITEMS + 1],
            ..Default::default()
        };
        assert!(check_counts(&req).is_err());
    }
}
