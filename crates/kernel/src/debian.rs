//! First-use kernel: download Debian's cloud kernel package with the machine's own apt
//! configuration (no mirror is named here): `apt-cache depends linux-image-cloud-amd64` names the
//! versioned package, `apt-get download` fetches it. A `.deb` already in the destination is
//! reused; concurrent callers serialise on a lock file in the destination and the second one
//! reuses the first one's download.

use std::path::{Path, PathBuf};
use wick_host::cmd::{Cmd, CmdError, Runner, SystemRunner};

use crate::{io_err, KernelError, Result};

/// The Debian metapackage that always depends on the current cloud kernel.
pub const CLOUD_KERNEL_META: &str = "linux-image-cloud-amd64";

/// Returns a Debian cloud kernel `.deb` in `dest_dir`, downloading it when none is there yet.
pub fn download_cloud_kernel(dest_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dest_dir)
        .map_err(io_err(format!("cannot create {}", dest_dir.display())))?;
    let lock_path = dest_dir.join(".download.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err(format!("cannot lock {}", lock_path.display()))(e.into()))?;

    if let Some(existing) = cached_deb(dest_dir)? {
        return Ok(existing);
    }
    let package = match versioned_package()? {
        Some(p) => p,
        None => {
            run_apt(&Cmd::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
            versioned_package()?.ok_or_else(|| {
                KernelError::Tool(format!(
                    "apt knows no {CLOUD_KERNEL_META} even after `apt-get update`: this needs a Debian amd64 system with a Debian suite in its apt sources; otherwise import a kernel with `wick kernel import`"
                ))
            })?
        }
    };
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(dest_dir)
        .map_err(io_err(format!(
            "cannot create a scratch dir in {}",
            dest_dir.display()
        )))?;
    run_apt(
        &Cmd::new("apt-get")
            .arg("download")
            .arg(package.as_str())
            .current_dir(partial.path()),
    )?;
    let deb = std::fs::read_dir(partial.path())
        .map_err(io_err("cannot list the download dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            KernelError::Tool(format!("apt-get download {package} produced no .deb file"))
        })?;
    let dest = dest_dir.join(deb.file_name().expect("file name"));
    std::fs::rename(&deb, &dest).map_err(io_err(format!(
        "cannot move the package to {}",
        dest.display()
    )))?;
    Ok(dest)
}

/// The newest `linux-image-*-cloud-amd64_*.deb` already in `dir`.
fn cached_deb(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)
        .map_err(io_err(format!("cannot list {}", dir.display())))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("linux-image-")
            && name.contains("-cloud-amd64")
            && !name.contains("-dbg")
            && name.ends_with(".deb")
            && e.path().is_file()
        {
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, e.path()));
        }
    }
    found.sort();
    Ok(found.pop().map(|(_, p)| p))
}

/// Asks apt which versioned package the metapackage depends on; `None` when apt doesn't know it.
fn versioned_package() -> Result<Option<String>> {
    let out = SystemRunner::new()
        .run(&Cmd::new("apt-cache").args(["depends", CLOUD_KERNEL_META]))
        .map_err(|e| KernelError::Tool(format!("{e}: downloading the Debian kernel needs apt; import a kernel with `wick kernel import` instead")))?;
    if !out.success() {
        return Ok(None);
    }
    Ok(parse_depends(&out.stdout_text()))
}

/// Picks the `linux-image-<version>-cloud-amd64` dependency out of `apt-cache depends` output.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:").map(str::trim))
        .map(|p| p.trim_start_matches('|').trim())
        .find(|p| {
            p.starts_with("linux-image-") && p.ends_with("-cloud-amd64") && *p != CLOUD_KERNEL_META
        })
        .map(str::to_string)
}

fn run_apt(cmd: &Cmd) -> Result<()> {
    SystemRunner::new()
        .run_ok(cmd)
        .map(drop)
        .map_err(|e: CmdError| KernelError::Tool(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alt = "linux-image-cloud-amd64\n |Depends: linux-image-6.1.0-9-cloud-amd64-unsigned\n  Depends: linux-image-6.1.0-9-cloud-amd64\n";
        assert_eq!(
            parse_depends(alt).as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn reuses_a_cached_package() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir
            .path()
            .join("linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb");
        std::fs::write(&deb, b"!<arch>\n").unwrap();
        std::fs::write(
            dir.path()
                .join("linux-image-6.1.0-56-cloud-amd64-dbg_1_amd64.deb"),
            b"x",
        )
        .unwrap();
        assert_eq!(download_cloud_kernel(dir.path()).unwrap(), deb);
    }
}
