//! The work disk: a per-VM ext4 image (label `work`) the guest mounts at `/root`. Seeded from the
//! image's work-seed (an ext4 image holding the default `/root`) when there is one, else empty;
//! grown offline with `resize2fs` when the user asks for more (`vm set --disk-size`). Never shrunk.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::file::{clone_file, remove_if_exists};
use crate::runner::{command_error, run_ok, run_on_image, Runner, SystemRunner, STDIN_PATH};

/// Filesystem label of every work disk.
pub const LABEL: &str = "work";
/// The e2fsprogs tools the work disk needs (checked by `doctor`).
pub const TOOLS: [&str; 4] = ["mkfs.ext4", "resize2fs", "e2fsck", "tune2fs"];

fn bytes(size_mib: u64) -> Result<u64> {
    if size_mib == 0 {
        return Err(StorageError::Invalid(
            "work disk size must be at least 1 MiB".into(),
        ));
    }
    size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| StorageError::Invalid(format!("work disk size {size_mib} MiB is too large")))
}

/// Makes the work disk at `path` (must not exist) of `size_mib` MiB: a clone of `seed` (reflink
/// when possible, else sparse copy) grown to size and relabelled `work`, or without a seed a
/// fresh `mkfs.ext4 -L work` on a sparse file. The file is removed again if any step fails.
pub fn create(path: &Path, size_mib: u64, seed: Option<&Path>) -> Result<()> {
    let size = bytes(size_mib)?;
    let r = SystemRunner::new();
    if let Some(seed) = seed {
        let seed_len = std::fs::metadata(seed)
            .map_err(|e| StorageError::io("cannot use work-seed", seed, e))?
            .len();
        if seed_len > size {
            return Err(StorageError::Invalid(format!(
                "work disk size {size_mib} MiB is smaller than the image's work-seed ({} MiB); \
                 ask for at least {} MiB",
                seed_len.div_ceil(1 << 20),
                seed_len.div_ceil(1 << 20)
            )));
        }
        clone_file(seed, path)?;
        let res = resize_to(&r, path, size, seed_len)
            .and_then(|()| run_ok(&r, "tune2fs", &["-L", LABEL, &p(path)]).map(|_| ()));
        if res.is_err() {
            let _ = remove_if_exists(path);
        }
        return res;
    }
    let f = OpenOptions::new()
        .mode(0o600) // owner only (state dir files are private)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StorageError::io("cannot create work disk", path, e))?;
    let res = f
        .set_len(size)
        .map_err(|e| StorageError::io("cannot size work disk", path, e))
        .and_then(|()| {
            run_ok(
                &r,
                "mkfs.ext4",
                // The file is fresh and sparse (reads as zeros), so skipping the zeroing of
                // inode tables and journal is safe: 4 MiB written instead of ~70 MiB for 8 GiB.
                &[
                    "-q",
                    "-F",
                    "-L",
                    LABEL,
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                    &p(path),
                ],
            )
            .map(|_| ())
        });
    drop(f);
    if res.is_err() {
        let _ = remove_if_exists(path);
    }
    res
}

/// Grows the (unused: VM stopped) work disk at `path` to `new_size_mib` MiB. Returns `false` when
/// it already has that size. Shrinking is refused. If the filesystem cannot be grown the file is
/// truncated back to its old size, which leaves it exactly as it was.
pub fn grow(path: &Path, new_size_mib: u64) -> Result<bool> {
    let new = bytes(new_size_mib)?;
    let old = std::fs::metadata(path)
        .map_err(|e| StorageError::io("cannot use work disk", path, e))?
        .len();
    if new < old {
        return Err(StorageError::Invalid(format!(
            "cannot shrink the work disk {} from {} MiB to {new_size_mib} MiB: shrinking is not \
             supported; choose a size of at least {} MiB",
            path.display(),
            old >> 20,
            old.div_ceil(1 << 20)
        )));
    }
    if new == old {
        return Ok(false);
    }
    resize_to(&SystemRunner::new(), path, new, old)?;
    Ok(true)
}

/// Sets the file length to `size` and grows the filesystem to fill it (running `e2fsck -fp`
/// first when `resize2fs` asks for it). On failure the file gets its `old` length back.
fn resize_to(r: &dyn Runner, path: &Path, size: u64, old: u64) -> Result<()> {
    let f = OpenOptions::new()
        .mode(0o600) // owner only (state dir files are private)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("cannot open", path, e))?;
    f.set_len(size)
        .map_err(|e| StorageError::io("cannot grow", path, e))?;
    let res = resize2fs(r, path);
    if res.is_err() {
        let _ = f.set_len(old);
    }
    res
}

/// `resize2fs`, and `e2fsck -fp` first when it asks for it: the filesystem is the guest's, so
/// both run as `nobody` on the file given as their stdin (`run_on_image`).
fn resize2fs(r: &dyn Runner, path: &Path) -> Result<()> {
    let p = p(path);
    let out = run_on_image(r, path, "resize2fs", &[STDIN_PATH])?;
    if out.status.success() {
        return Ok(());
    }
    let msg =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if !msg.contains("e2fsck -f") {
        return Err(command_error("resize2fs", &[&p], &out, None));
    }
    // Exit codes 1 and 2 mean "errors corrected"; 4 and up mean it could not.
    let fsck = run_on_image(r, path, "e2fsck", &["-fp", STDIN_PATH])?;
    if !matches!(fsck.status.code(), Some(0..=3)) {
        return Err(command_error(
            "e2fsck",
            &["-fp", &p],
            &fsck,
            Some(format!(
                "the filesystem in {p} needs repair: run e2fsck -f {p} by hand"
            )),
        ));
    }
    let out = run_on_image(r, path, "resize2fs", &[STDIN_PATH])?;
    match out.status.success() {
        true => Ok(()),
        false => Err(command_error("resize2fs", &[&p], &out, None)),
    }
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
