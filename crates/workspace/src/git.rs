//! Running the host's `git` CLI: one helper returning stdout or a [`WorkspaceError::Git`] naming
//! the command and its stderr, and the object listing used to build packs.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{Result, WorkspaceError};

/// A `git -C dir` command with a stable, non-interactive environment.
pub(crate) fn command(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        // Read-only inspection must not rewrite the host's index (as `git status` may).
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null());
    c
}

/// Runs `git -C dir args…`, returning the raw output whatever the exit status.
pub(crate) fn run_raw<I, S>(dir: &Path, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    command(dir)
        .args(&args)
        .output()
        .map_err(|e| WorkspaceError::Io {
            what: format!(
                "cannot run `git {}` (is git installed?)",
                args.first()
                    .map(|a| a.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            error: e,
        })
}

/// Runs `git -C dir args…` and returns stdout, or an error with git's stderr.
pub(crate) fn run<I, S>(dir: &Path, args: I) -> Result<Vec<u8>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run_raw(dir, &args)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(git_error(dir, &args, &out))
    }
}

/// Like [`run`], trimmed to a UTF-8 line.
pub(crate) fn line<I, S>(dir: &Path, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Ok(String::from_utf8_lossy(&run(dir, args)?).trim().to_string())
}

pub(crate) fn git_error<S: AsRef<OsStr>>(dir: &Path, args: &[S], out: &Output) -> WorkspaceError {
    let what = args
        .iter()
        .take(2)
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    WorkspaceError::Git {
        what,
        repo: dir.to_path_buf(),
        detail: if stderr.is_empty() {
            format!("exit status {}", out.status)
        } else {
            stderr
        },
    }
}

/// Splits NUL-terminated output into paths.
pub(crate) fn nul_paths(out: &[u8]) -> Vec<PathBuf> {
    out.split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(OsStr::from_bytes(p)))
        .collect()
}

/// The commit, its root tree and every tree and blob below it (gitlinks excluded).
pub(crate) fn commit_objects(dir: &Path, commit: &str, into: &mut HashSet<String>) -> Result<()> {
    into.insert(commit.to_string());
    into.insert(line(dir, ["rev-parse", &format!("{commit}^{{tree}}")])?);
    let out = run(dir, ["ls-tree", "-r", "-t", "-z", "--full-tree", commit])?;
    for rec in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        // `<mode> SP <type> SP <object> TAB <path>`
        let meta = rec.split(|&b| b == b'\t').next().unwrap_or_default();
        let mut f = meta.split(|&b| b == b' ');
        let (_mode, kind, oid) = (f.next(), f.next(), f.next());
        if let (Some(kind), Some(oid)) = (kind, oid) {
            if kind == b"blob" || kind == b"tree" {
                into.insert(String::from_utf8_lossy(oid).into_owned());
            }
        }
    }
    Ok(())
}

/// Whether `commit` has parents (a shallow copy must then list it in `.git/shallow`).
pub(crate) fn has_parents(dir: &Path, commit: &str) -> Result<bool> {
    let l = line(dir, ["rev-list", "--parents", "-n", "1", commit])?;
    Ok(l.split_whitespace().count() > 1)
}

/// Whether the object exists in the repository.
pub(crate) fn has_object(dir: &Path, oid: &str) -> bool {
    run_raw(dir, ["cat-file", "-e", oid])
        .map(|o| o.status.success())
        .unwrap_or(false)
}
