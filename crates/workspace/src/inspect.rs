//! Host-side inspection: every refusal happens here, before any guest I/O, and the result is a
//! [`RepoPlan`] listing what [`crate::prepare`] would copy.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::git;
use crate::{Mode, Result, WorkspaceError};

/// What the user asked for (`--mode --branch --from --include-untracked`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareOptions {
    pub mode: Mode,
    /// Create this branch in the guest (only there) and check it out.
    pub branch: Option<String>,
    /// Start `branch` from this host reference instead of `HEAD`; needs `branch`.
    pub from: Option<String>,
    /// Also copy untracked files that are not ignored.
    pub include_untracked: bool,
}

/// A guest-only branch to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewBranch {
    pub name: String,
    /// The `--from` reference as given (for messages).
    pub from_ref: Option<String>,
    /// The commit it starts from (`HEAD` without `--from`).
    pub from_commit: String,
}

/// The result of [`inspect`]: a host repository that can be copied, and what to copy.
#[derive(Debug, Clone)]
pub struct RepoPlan {
    pub(crate) root: PathBuf,
    pub(crate) git_dir: PathBuf,
    pub(crate) head: String,
    pub(crate) branch: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) object_format: String,
    pub(crate) new_branch: Option<NewBranch>,
    pub(crate) include_untracked: bool,
    /// Tracked paths present in the working tree (files and symlinks), relative to `root`.
    pub(crate) tracked: Vec<PathBuf>,
    /// Untracked, non-ignored files (only with `include_untracked`).
    pub(crate) untracked: Vec<PathBuf>,
    /// Tracked paths deleted from the working tree (not copied).
    pub(crate) missing: Vec<PathBuf>,
    /// `full_copy` only: every file under `.git` and under the submodule checkouts.
    pub(crate) extra: Vec<PathBuf>,
}

impl RepoPlan {
    /// The repository's top-level directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host `HEAD` commit.
    pub fn head_commit(&self) -> &str {
        &self.head
    }

    /// The host's current branch (`None` when `HEAD` is detached).
    pub fn host_branch(&self) -> Option<&str> {
        self.branch.as_deref()
    }

    /// The branch that will be checked out in the guest.
    pub fn guest_branch(&self) -> Option<&str> {
        match &self.new_branch {
            Some(b) => Some(&b.name),
            None => self.branch.as_deref(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether untracked, non-ignored files are copied too.
    pub fn includes_untracked(&self) -> bool {
        self.include_untracked
    }

    /// Every path that will be copied, relative to the repository root.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.tracked
            .iter()
            .chain(&self.untracked)
            .chain(&self.extra)
            .map(PathBuf::as_path)
    }

    /// The commits whose history is sent (`HEAD`, and the `--from` commit if different).
    pub(crate) fn commits(&self) -> Vec<String> {
        let mut c = vec![self.head.clone()];
        if let Some(b) = &self.new_branch {
            if b.from_commit != self.head {
                c.push(b.from_commit.clone());
            }
        }
        c
    }
}

/// Inspects the repository at `path` (any directory inside its working tree) without touching
/// the guest. Each refusal is a distinct [`WorkspaceError`] telling the user what to do.
pub fn inspect(path: &Path, opts: &PrepareOptions) -> Result<RepoPlan> {
    if opts.from.is_some() && opts.branch.is_none() {
        return Err(WorkspaceError::FromWithoutBranch);
    }
    let root = work_tree_root(path)?;
    let git_dir = PathBuf::from(git::line(&root, ["rev-parse", "--absolute-git-dir"])?);
    let (head, branch) = head_and_branch(&root)?;
    let object_format = git::run_raw(&root, ["rev-parse", "--show-object-format"])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "sha1".to_string());
    let new_branch = new_branch(&root, opts, &head)?;

    let (tracked_all, submodules) = staged_paths(&root)?;
    if opts.mode == Mode::Shallow && (!submodules.is_empty() || root.join(".gitmodules").exists()) {
        let mut names: Vec<String> = submodules.iter().map(|p| p.display().to_string()).collect();
        if names.is_empty() {
            names.push(".gitmodules".into());
        }
        return Err(WorkspaceError::Submodules(names));
    }
    let (mut tracked, mut missing) = (Vec::new(), Vec::new());
    for p in tracked_all {
        match std::fs::symlink_metadata(root.join(&p)) {
            Ok(m) if m.is_file() || m.file_type().is_symlink() => tracked.push(p),
            Ok(_) => {} // a directory where a file is tracked: nothing to copy
            Err(_) => missing.push(p),
        }
    }
    let untracked = if opts.include_untracked {
        untracked_files(&root)?
    } else {
        Vec::new()
    };
    let extra = match opts.mode {
        Mode::FullCopy => git_dir_files(&root, &submodules)?,
        Mode::Shallow => Vec::new(),
    };

    Ok(RepoPlan {
        root,
        git_dir,
        head,
        branch,
        mode: opts.mode,
        object_format,
        new_branch,
        include_untracked: opts.include_untracked,
        tracked,
        untracked,
        missing,
        extra,
    })
}

/// The top of the working tree `path` is in, refusing what is not one (missing, not a
/// directory, not in a repository, bare, inside `.git`).
fn work_tree_root(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            WorkspaceError::NotFound(path.to_path_buf())
        } else {
            WorkspaceError::Io {
                what: format!("cannot read {}", path.display()),
                error: e,
            }
        }
    })?;
    if !meta.is_dir() {
        return Err(WorkspaceError::NotADirectory(path.to_path_buf()));
    }
    let out = git::run_raw(path, ["rev-parse", "--is-bare-repository"])?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("fatal: ")
            .to_string();
        return Err(WorkspaceError::NotAGitRepo {
            path: path.to_path_buf(),
            detail,
        });
    }
    if String::from_utf8_lossy(&out.stdout).trim() == "true" {
        return Err(WorkspaceError::BareRepo(path.to_path_buf()));
    }
    if git::line(path, ["rev-parse", "--is-inside-work-tree"])? != "true" {
        return Err(WorkspaceError::InsideGitDir(path.to_path_buf()));
    }
    Ok(PathBuf::from(git::line(
        path,
        ["rev-parse", "--show-toplevel"],
    )?))
}

/// The HEAD commit (refusing a repository without one) and the checked-out branch, if any.
fn head_and_branch(root: &Path) -> Result<(String, Option<String>)> {
    let head_out = git::run_raw(root, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])?;
    if !head_out.status.success() {
        return Err(WorkspaceError::NoCommits(root.to_path_buf()));
    }
    let head = String::from_utf8_lossy(&head_out.stdout).trim().to_string();
    let branch_out = git::run_raw(root, ["symbolic-ref", "-q", "--short", "HEAD"])?;
    let branch = branch_out
        .status
        .success()
        .then(|| {
            String::from_utf8_lossy(&branch_out.stdout)
                .trim()
                .to_string()
        })
        .filter(|b| !b.is_empty());
    Ok((head, branch))
}

/// The guest branch asked for (`--branch`, from `--from` or HEAD), checked.
fn new_branch(root: &Path, opts: &PrepareOptions, head: &str) -> Result<Option<NewBranch>> {
    let Some(name) = &opts.branch else {
        return Ok(None);
    };
    check_branch_name(root, name)?;
    let from_commit = match &opts.from {
        None => head.to_string(),
        Some(r) => resolve_commit(root, r)?,
    };
    Ok(Some(NewBranch {
        name: name.clone(),
        from_ref: opts.from.clone(),
        from_commit,
    }))
}

/// Tracked entries, with their modes: gitlinks (160000) are submodules. Returns (tracked
/// paths, submodule paths).
fn staged_paths(root: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let staged = git::run(root, ["ls-files", "-z", "--stage"])?;
    let mut tracked_all: Vec<PathBuf> = Vec::new();
    let mut submodules: Vec<PathBuf> = Vec::new();
    for rec in staged.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let Some(tab) = rec.iter().position(|&b| b == b'\t') else {
            continue;
        };
        let p = PathBuf::from(std::ffi::OsStr::from_bytes(&rec[tab + 1..]));
        if rec.starts_with(b"160000 ") {
            submodules.push(p);
        } else if tracked_all.last() != Some(&p) {
            // Unmerged paths appear once per stage.
            tracked_all.push(p);
        }
    }
    Ok((tracked_all, submodules))
}

/// Untracked, non-ignored files and symlinks.
fn untracked_files(root: &Path) -> Result<Vec<PathBuf>> {
    let out = git::run(root, ["ls-files", "-z", "--others", "--exclude-standard"])?;
    Ok(git::nul_paths(&out)
        .into_iter()
        .filter(|p| {
            std::fs::symlink_metadata(root.join(p))
                .map(|m| m.is_file() || m.file_type().is_symlink())
                .unwrap_or(false)
        })
        .collect())
}

/// A full copy's extra files: everything in `.git` and in the submodules.
fn git_dir_files(root: &Path, submodules: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let dot_git = root.join(".git");
    if !dot_git
        .symlink_metadata()
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Err(WorkspaceError::GitDirNotADirectory(dot_git));
    }
    let mut extra = Vec::new();
    walk(root, Path::new(".git"), &mut extra)?;
    for s in submodules {
        walk(root, s, &mut extra)?;
    }
    Ok(extra)
}

/// `git check-ref-format --branch`, plus refusing names that look like options.
fn check_branch_name(root: &Path, name: &str) -> Result<()> {
    let bad = |detail: &str| WorkspaceError::BadBranchName {
        name: name.to_string(),
        detail: detail.to_string(),
    };
    if name.starts_with('-') {
        return Err(bad("it must not start with `-`"));
    }
    let out = git::run_raw(root, ["check-ref-format", "--branch", name])?;
    if !out.status.success() {
        return Err(bad(
            "see `git help check-ref-format` (no spaces, `..`, `~`, `^`, `:`, `?`, `*`, `[`, \
             trailing `.lock` or `/`)",
        ));
    }
    // `--branch` also expands `@{-N}`; the guest branch must be a plain name.
    let expanded = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if expanded != name {
        return Err(bad(
            "it must be a plain branch name, not a `@{-N}` shorthand",
        ));
    }
    Ok(())
}

fn resolve_commit(root: &Path, reference: &str) -> Result<String> {
    if reference.starts_with('-') {
        return Err(WorkspaceError::BadRef {
            reference: reference.to_string(),
            detail: "it must not start with `-`".into(),
        });
    }
    let out = git::run_raw(
        root,
        [
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{reference}^{{commit}}"),
        ],
    )?;
    if !out.status.success() {
        return Err(WorkspaceError::BadRef {
            reference: reference.to_string(),
            detail: "no such branch, tag or commit (fetch it on the host first)".into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Collects every file and symlink below `root/rel` (not following symlinks).
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir)
        .map_err(WorkspaceError::io(format!("cannot list {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(WorkspaceError::io(format!("cannot list {}", dir.display())))?;
        let ft = e.file_type().map_err(WorkspaceError::io(format!(
            "cannot stat {}",
            e.path().display()
        )))?;
        let p = rel.join(e.file_name());
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() || ft.is_symlink() {
            if p.as_os_str().as_bytes() == format!(".git/{}", crate::MANIFEST_NAME).as_bytes() {
                continue;
            }
            out.push(p);
        }
    }
    Ok(())
}

/// What [`crate::prepare`] would copy: one line per path, then the history part.
pub fn dry_run(plan: &RepoPlan) -> Vec<String> {
    let mut lines: Vec<String> = plan
        .tracked
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    lines.extend(
        plan.untracked
            .iter()
            .map(|p| format!("{} (untracked)", p.display())),
    );
    let branch = match plan.branch.as_deref() {
        Some(b) => format!("branch {b}"),
        None => "detached HEAD".to_string(),
    };
    match plan.mode {
        Mode::Shallow => lines.push(format!(
            "history: shallow (depth 1): commit {} ({branch}) with its trees and blobs as one pack",
            plan.head
        )),
        Mode::FullCopy => lines.push(format!(
            "history: full copy of .git and submodules ({} files), HEAD {} ({branch})",
            plan.extra.len(),
            plan.head
        )),
    }
    if let Some(b) = &plan.new_branch {
        lines.push(format!(
            "guest branch: {} from {} ({}), created in the guest only",
            b.name,
            b.from_ref.as_deref().unwrap_or("HEAD"),
            b.from_commit
        ));
    }
    if !plan.missing.is_empty() {
        lines.push(format!(
            "not copied: {} tracked file(s) deleted in the working tree",
            plan.missing.len()
        ));
    }
    lines
}
