//! Unpacking a distro kernel `.deb`: `dpkg-deb -x` into a scratch directory, then find
//! `boot/vmlinuz-<version>` and its `lib/modules/<version>` (or `usr/lib/modules/<version>` in
//! merged-/usr packages).

use std::path::{Path, PathBuf};
use wick_host::cmd::{Cmd, CmdError, Runner, SystemRunner};

use crate::{io_err, KernelError, Result};

/// A kernel package unpacked into a scratch directory (removed on drop).
#[derive(Debug)]
pub struct DebKernel {
    /// The kernel release, e.g. `6.1.0-28-cloud-amd64`.
    pub version: String,
    /// The kernel image (`boot/vmlinuz-<version>`, a bzImage on x86).
    pub kernel: PathBuf,
    /// `lib/modules/<version>`, when the package ships modules.
    pub modules_dir: Option<PathBuf>,
    /// `boot/config-<version>`, when present.
    pub config: Option<PathBuf>,
    scratch: tempfile::TempDir,
}

impl DebKernel {
    /// The scratch directory the package was unpacked into.
    pub fn root(&self) -> &Path {
        self.scratch.path()
    }
}

/// Unpacks `deb` into a new scratch directory under `scratch_parent` (use one on the same
/// filesystem as the destination, so results can be renamed into place).
pub fn unpack(deb: &Path, scratch_parent: &Path) -> Result<DebKernel> {
    let scratch = tempfile::Builder::new()
        .prefix(".deb-")
        .tempdir_in(scratch_parent)
        .map_err(io_err(format!(
            "cannot create a scratch dir in {}",
            scratch_parent.display()
        )))?;
    let cmd = Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(deb.to_string_lossy())
        .arg(scratch.path().to_string_lossy());
    match SystemRunner::new().run_ok(&cmd) {
        Ok(_) => {}
        Err(CmdError::Spawn { source, .. }) => return Err(KernelError::Tool(format!(
            "cannot run dpkg-deb to unpack {} ({source}); install it (`apt-get install dpkg`) or import the vmlinuz and modules directly",
            deb.display()
        ))),
        Err(CmdError::Failed { stderr, .. }) => return Err(KernelError::Invalid(format!(
            "dpkg-deb could not unpack {}: {stderr}",
            deb.display(),
        ))),
    }
    let root = scratch.path();
    let boot = root.join("boot");
    let mut kernels: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&boot) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for prefix in ["vmlinuz-", "vmlinux-"] {
                if let Some(v) = name.strip_prefix(prefix) {
                    kernels.push((v.to_string(), e.path()));
                }
            }
        }
    }
    kernels.sort();
    let (version, kernel) = match kernels.len() {
        1 => kernels.remove(0),
        0 => {
            return Err(KernelError::Invalid(format!(
                "{} holds no boot/vmlinuz-*: is it a kernel image package (linux-image-*)?",
                deb.display()
            )))
        }
        _ => {
            return Err(KernelError::Invalid(format!(
                "{} holds several kernels ({}); import one vmlinuz directly",
                deb.display(),
                kernels
                    .iter()
                    .map(|(v, _)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| root.join(m).join(&version))
        .find(|p| p.is_dir());
    let config = Some(boot.join(format!("config-{version}"))).filter(|p| p.is_file());
    Ok(DebKernel {
        version,
        kernel,
        modules_dir,
        config,
        scratch,
    })
}
