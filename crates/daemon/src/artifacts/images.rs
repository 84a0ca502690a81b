//! The image half of [`Artifacts`]: list, get, delete and prune, and the jobs that make images
//! (import of a rootfs tarball or ext4 file, OCI pull, golden build), checked up front and run
//! on the blocking pool.

use std::path::{Path, PathBuf};

use wick_image::{oci, GoldenOptions, ImageRecord, ImageStore, ImportOptions};
use wick_model::api::{OpKind, PruneImagesResult};
use wick_model::VmRecord;

use super::first_use::Coarse;
use super::{blocking, check_reserved, check_source, image_users, in_use_error, Artifacts};
use crate::error::{Error, Result};

/// A job that makes one image: checked (name free and valid, source there, agent found) and
/// ready to run on the blocking pool with [`ImageJob::run`].
pub struct ImageJob {
    store: ImageStore,
    name: String,
    /// Stages to report before the work (e.g. why no agent is injected).
    notes: Vec<String>,
    work: Work,
}

enum Work {
    Import {
        path: PathBuf,
        agent: Option<PathBuf>,
    },
    Pull {
        reference: String,
        opts: oci::PullOptions,
    },
    Build {
        opts: GoldenOptions,
    },
}

impl ImageJob {
    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operation kind that runs it.
    pub fn kind(&self) -> OpKind {
        match self.work {
            Work::Import { .. } => OpKind::ImageImport,
            Work::Pull { .. } => OpKind::ImagePull,
            Work::Build { .. } => OpKind::ImageBuild,
        }
    }

    /// The store the image goes into.
    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// Whether its progress callback may unwind to cancel it: not during a golden build, whose
    /// progress lines come while debootstrap (a child process) runs.
    pub fn interruptible(&self) -> bool {
        !matches!(self.work, Work::Build { .. })
    }

    /// Makes the image (blocking). Staging directories are removed when it fails.
    pub fn run(self, progress: &mut dyn FnMut(&str)) -> Result<ImageRecord> {
        for n in &self.notes {
            progress(n);
        }
        let (store, name) = (&self.store, self.name.as_str());
        match self.work {
            Work::Import { path, agent } => {
                let opts = ImportOptions {
                    agent_bin: agent,
                    ..ImportOptions::default()
                };
                Ok(store.import_with(&path, name, &opts, progress)?)
            }
            Work::Pull { reference, opts } => {
                Ok(oci::pull(store, &reference, name, &opts, progress)?)
            }
            Work::Build { opts } => {
                let mut coarse = Coarse::new(|s: &str| progress(s));
                Ok(store.build_golden(&opts, &mut |s| coarse.emit(s))?)
            }
        }
    }
}

impl Artifacts {
    /// Every image, sorted by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.images.list()?)
    }

    /// The image called `name`.
    pub fn get_image(&self, name: &str) -> Result<ImageRecord> {
        Ok(self.images.get(name)?)
    }

    /// Deletes image `name`, refused with `conflict` while any VM of `in_use` uses it.
    pub async fn delete_image(&self, name: &str, in_use: &[VmRecord]) -> Result<ImageRecord> {
        let users = image_users(name, in_use);
        if !users.is_empty() {
            return Err(in_use_error("image", name, &users));
        }
        let store = self.images.clone();
        let name = name.to_string();
        blocking(move || Ok(store.delete(&name)?)).await
    }

    /// Sets image `name`'s default kernel (`None`: the kernel named `default`), which must be a
    /// managed kernel.
    pub async fn set_image_kernel(
        &self,
        name: &str,
        kernel: Option<String>,
    ) -> Result<ImageRecord> {
        if let Some(k) = &kernel {
            self.kernel_boot(k, false)?; // exists, or the error lists the kernels there are
        }
        let store = self.images.clone();
        let name = name.to_string();
        blocking(move || Ok(store.set_default_kernel(&name, kernel.as_deref())?)).await
    }

    /// Removes image files no name points at, dead builds' staging directories and unused
    /// cached OCI layers.
    pub async fn prune_images(&self) -> Result<PruneImagesResult> {
        let store = self.images.clone();
        blocking(move || {
            let r = store.prune()?;
            Ok(PruneImagesResult {
                removed: r.removed,
                freed_bytes: r.freed_bytes,
            })
        })
        .await
    }

    /// Imports a rootfs tarball or an ext4 file as image `name`, without an operation (see
    /// [`Artifacts::image_import`]).
    pub async fn import_image(
        &self,
        path: PathBuf,
        name: String,
        mut progress: impl FnMut(&str) + Send + 'static,
    ) -> Result<ImageRecord> {
        let job = self.image_import(path, name)?;
        blocking(move || job.run(&mut progress)).await
    }

    /// The job importing `path` (a rootfs tarball or an ext4 file, absolute) as image `name`.
    /// Tarballs get wick-agent injected when one is found; ext4 files are taken as they are
    /// (never mounted).
    pub fn image_import(&self, path: PathBuf, name: String) -> Result<ImageJob> {
        self.check_new_image(&name)?;
        check_source(&path)?;
        let mut notes = Vec::new();
        let agent = if is_ext4(&path) {
            None
        } else {
            match self.agent_binary() {
                Ok(a) => Some(a),
                Err(e) => {
                    notes.push(format!("importing without wick-agent: {}", e.message()));
                    None
                }
            }
        };
        Ok(self.image_job(name, notes, Work::Import { path, agent }))
    }

    /// The job pulling an OCI image (linux/amd64) as image `name`, wick-agent injected when
    /// one is found. `insecure` speaks plain HTTP to the reference's registry.
    pub fn image_pull(&self, reference: String, name: String, insecure: bool) -> Result<ImageJob> {
        self.check_new_image(&name)?;
        let insecure_registries = match (insecure, registry_of(&reference)) {
            (false, _) => Vec::new(),
            (true, Some(r)) => vec![r],
            (true, None) => {
                return Err(Error::invalid(format!(
                    "--insecure needs a reference that names its registry \
                     (HOST[:PORT]/REPOSITORY[:TAG]), got {reference:?}"
                )))
            }
        };
        let mut notes = Vec::new();
        let agent = match self.agent_binary() {
            Ok(a) => Some(a),
            Err(e) => {
                notes.push(format!("pulling without wick-agent: {}", e.message()));
                None
            }
        };
        let opts = oci::PullOptions {
            agent_bin: agent,
            insecure_registries,
            ..oci::PullOptions::default()
        };
        Ok(self.image_job(name, notes, Work::Pull { reference, opts }))
    }

    /// The job building the golden Debian image as `name` with wick-agent injected (which
    /// must be found), from `suite` (default: the configured one) with extra `packages`.
    pub fn image_build(
        &self,
        name: String,
        suite: Option<String>,
        packages: Vec<String>,
    ) -> Result<ImageJob> {
        self.check_new_image(&name)?;
        super::build::check_packages(&packages)?;
        if let Some(s) = &suite {
            let ok = s.len() <= 32
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(Error::invalid(format!(
                    "{s:?} is not a Debian suite name (e.g. bookworm, trixie)"
                )));
            }
        }
        let mut extra_packages = self.golden.extra_packages.clone();
        extra_packages.extend(packages);
        let opts = GoldenOptions {
            name: name.clone(),
            agent_bin: Some(self.agent_binary()?),
            suite: suite.unwrap_or_else(|| self.golden.suite.clone()),
            extra_packages,
            ..self.golden.clone()
        };
        Ok(self.image_job(name, Vec::new(), Work::Build { opts }))
    }

    fn image_job(&self, name: String, notes: Vec<String>, work: Work) -> ImageJob {
        ImageJob {
            store: self.images.clone(),
            name,
            notes,
            work,
        }
    }

    /// Checks that an image name is usable and free, so those errors come before any job.
    pub fn check_new_image(&self, name: &str) -> Result<()> {
        wick_image::validate_image_name(name)?;
        check_reserved(name)?;
        if self.images.exists(name)? {
            return Err(Error::conflict(format!(
                "an image named {name:?} already exists; delete it first or choose another name"
            )));
        }
        Ok(())
    }
}

/// Whether `path` carries the ext2/3/4 superblock magic.
fn is_ext4(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(1024 + 56))?;
            f.read_exact(&mut magic)
        })
        .is_ok()
        && magic == [0x53, 0xef]
}

/// The registry part (`host[:port]`) of an OCI reference that names one explicitly.
fn registry_of(reference: &str) -> Option<String> {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            Some(first.to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::path::Path;
    use wick_model::api::ErrorCode;

    #[tokio::test]
    async fn image_deletion_is_refused_while_in_use() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = small_ext4(d.path()) else {
            return;
        };
        let a = artifacts(d.path());
        let rec = a
            .import_image(img, "base".into(), |_| {})
            .await
            .expect("import an ext4 file");
        assert_eq!(a.list_images().unwrap(), vec![rec.clone()]);
        let vms = [
            vm("a1", "base", Path::new("/k")),
            vm("b22", "base", Path::new("/k")),
            vm("c333", "other", Path::new("/k")),
        ];
        let e = a.delete_image("base", &vms).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(e.message().contains("VMs a1, b22"), "{e}");
        assert!(!e.message().contains("c333"), "{e}");
        assert!(rec.rootfs.exists(), "nothing deleted");
        a.delete_image("base", &vms[2..]).await.unwrap();
        assert!(!rec.rootfs.exists());
        let e = a.delete_image("base", &[]).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotFound);
    }

    #[test]
    fn jobs_are_checked_before_they_run() {
        let d = tempfile::tempdir().unwrap();
        let a = artifacts(d.path());
        let e = a.image_import("/nonexistent.tar".into(), "x".into());
        assert!(e.err().unwrap().message().contains("does not exist"));
        let e = a.image_pull("library/debian".into(), "x".into(), true);
        assert_eq!(e.err().unwrap().code(), ErrorCode::InvalidArgument);
        let e = a.image_pull("r:5000/x".into(), "Bad/Name".into(), false);
        assert!(e.err().unwrap().message().contains("invalid image name"));
        let e = a.image_build("prune".into(), None, Vec::new());
        assert_eq!(e.err().unwrap().code(), ErrorCode::InvalidArgument);
        let e = a.image_build("g".into(), Some("Book worm".into()), Vec::new());
        assert!(e.err().unwrap().message().contains("suite"));
        let e = a.image_build("g".into(), None, vec!["--force-yes".into()]);
        assert!(e.err().unwrap().message().contains("package"));
        let job = a.image_pull("r:5000/x".into(), "x".into(), false).unwrap();
        assert_eq!((job.kind(), job.name()), (OpKind::ImagePull, "x"));
        assert!(job.interruptible());
    }

    #[test]
    fn registries_of_references() {
        assert_eq!(
            registry_of("127.0.0.1:5000/t/img:1").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(registry_of("localhost/x").as_deref(), Some("localhost"));
        assert_eq!(registry_of("library/debian"), None);
    }
}
