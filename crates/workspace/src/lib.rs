//! wick-workspace: a host git repository in, the guest's changes out.
//!
//! The three steps, in the order `wick vm workspace prepare|export` and `wick vm run` use them:
//!
//! 1. [`inspect`] looks at the host repository **before any guest I/O** and refuses what cannot
//!    be copied (not a directory, not a git repository, a bare repository, submodules outside
//!    [`Mode::FullCopy`], `--from` without `--branch`, an invalid branch name, an unknown `--from`
//!    reference). It returns a [`RepoPlan`]; [`dry_run`] lists what the plan would copy.
//! 2. [`prepare`] builds the guest repository through an already connected
//!    [`wick_agent_proto::AgentClient`]: one tar stream (`put_tar`) carrying the working-tree
//!    files and the history, then a few `git` fix-ups run by `exec`. Re-preparing the same guest
//!    path transfers only what changed (see *Re-prepare* below).
//! 3. [`export`] / [`export_to`] produce a binary-safe patch of the guest repository against its
//!    `HEAD` (or a base commit) through a throwaway index, so `git apply` on the host replays the
//!    guest's work; the guest's own index and tree are untouched.
//!
//! # History ([`Mode::Shallow`], the default)
//!
//! The guest gets a depth-1 history: one pack holding the `HEAD` commit (and the `--from`
//! commit), their trees and their blobs, written on the host by `git pack-objects` from the
//! object ids of `git ls-tree` (no delta search, fast compression, reusing the host's packed
//! data) while the working tree is already streaming; `.git/shallow` marks the commits whose
//! parents are absent. The guest then runs `git reset` (index = `HEAD`, stat data refreshed), so
//! `git status` there shows exactly the host's uncommitted changes to tracked files (plus the
//! untracked files when they were included), and commits and diffs work.
//! [`Mode::FullCopy`] instead copies the whole `.git` directory and submodule checkouts as-is.
//!
//! # Re-prepare
//!
//! The tar also carries a manifest (`.git/wick-manifest`: every copied path with its host size,
//! mtime in nanoseconds, mode and symlink target). A later [`prepare`] into the same guest path
//! reads it back and lists the guest's files (`find -printf`, one exec each), then sends only the
//! files that changed on the host or were changed in the guest, deletes the ones that vanished
//! from the host, and sends only the objects of a new `HEAD` that the previous one lacked.
//! Re-preparing makes every copied path match the host again: edits made in the guest to those
//! paths are overwritten (export them first); files created only in the guest are left alone.

mod export;
mod git;
mod inspect;
mod manifest;
mod prepare;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wick_agent_proto::AgentError;

pub use export::{export, export_to};
pub use inspect::{dry_run, inspect, PrepareOptions, RepoPlan};
pub use prepare::{prepare, PrepareReport};

/// Where `wick vm run` and `wick vm workspace prepare` put the repository in the guest.
pub const DEFAULT_GUEST_PATH: &str = "/root/repo";

/// Name of the manifest kept inside the guest repository's `.git` directory.
pub const MANIFEST_NAME: &str = "wick-manifest";

/// How much of the repository is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Working tree plus a depth-1 history (the default; submodules are refused).
    #[default]
    Shallow,
    /// Working tree plus the whole `.git` directory and submodule checkouts, as they are.
    FullCopy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shallow => "shallow",
            Mode::FullCopy => "full_copy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = WorkspaceError;

    /// Accepts `shallow` (alias `default`) and `full_copy` (alias `full-copy`).
    fn from_str(s: &str) -> Result<Mode, WorkspaceError> {
        match s {
            "shallow" | "default" => Ok(Mode::Shallow),
            "full_copy" | "full-copy" => Ok(Mode::FullCopy),
            _ => Err(WorkspaceError::BadMode(s.to_string())),
        }
    }
}

/// What the daemon records on the VM after a successful [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    /// The host repository's top-level directory.
    pub source_path: String,
    pub guest_path: String,
    /// The host `HEAD` commit copied.
    pub head_commit: String,
    /// The branch checked out in the guest (`--branch`, else the host's current branch; `None`
    /// for a detached `HEAD`).
    pub branch: Option<String>,
    pub mode: Mode,
    /// RFC 3339 UTC.
    pub prepared_at: String,
}

/// Everything that can go wrong. Inspection errors (the first group) happen before any guest I/O.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is not a directory: pass the directory of a git repository")]
    NotADirectory(PathBuf),
    #[error("{path} is not inside a git repository ({detail}): run `git init` there, or pass a repository's directory")]
    NotAGitRepo { path: PathBuf, detail: String },
    #[error("{0} is a bare git repository (it has no working tree): clone it and pass the clone")]
    BareRepo(PathBuf),
    #[error("{0} is inside a .git directory: pass the repository's working tree")]
    InsideGitDir(PathBuf),
    #[error("the repository {0} has no commits yet: commit something first")]
    NoCommits(PathBuf),
    #[error(
        "the repository has submodules ({}): the shallow copy cannot include them; pass \
         `--mode full_copy` to copy the repository with its submodules as they are",
        .0.join(", ")
    )]
    Submodules(Vec<String>),
    #[error(
        "full_copy needs {0} to be a directory (this checkout's .git is a file: a linked worktree \
         or a submodule); use the default shallow mode"
    )]
    GitDirNotADirectory(PathBuf),
    #[error("--from needs --branch: name the guest branch to create from that reference")]
    FromWithoutBranch,
    #[error("unknown workspace mode {0:?}: use `shallow` (the default) or `full_copy`")]
    BadMode(String),
    #[error("{name:?} is not a valid branch name: {detail}")]
    BadBranchName { name: String, detail: String },
    #[error("--from {reference:?} does not name a commit in the host repository: {detail}")]
    BadRef { reference: String, detail: String },
    #[error("the guest path {0:?} must be absolute")]
    GuestPathNotAbsolute(String),
    #[error(
        "the guest path {guest_path} holds a workspace prepared from {source_path} ({mode}); \
         prepare into another guest path or remove it in the guest first"
    )]
    OtherWorkspace {
        guest_path: String,
        source_path: String,
        mode: Mode,
    },
    #[error("git {what} failed in {repo}: {detail}")]
    Git {
        what: String,
        repo: PathBuf,
        detail: String,
    },
    /// The message carries the OS error; it is deliberately not named `source` (thiserror
    /// would also chain it, and error reports would print it twice).
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("in the guest, could not {what}: {detail}")]
    Guest { what: &'static str, detail: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl WorkspaceError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkspaceError {
        let what = what.into();
        move |error| WorkspaceError::Io { what, error }
    }
}

pub type Result<T, E = WorkspaceError> = std::result::Result<T, E>;

/// The current time as RFC 3339 UTC with milliseconds (as `wick-store` writes timestamps).
pub(crate) fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_serialize() {
        assert_eq!("shallow".parse::<Mode>().unwrap(), Mode::Shallow);
        assert_eq!("default".parse::<Mode>().unwrap(), Mode::Shallow);
        assert_eq!("full_copy".parse::<Mode>().unwrap(), Mode::FullCopy);
        let e = "deep".parse::<Mode>().unwrap_err().to_string();
        assert!(e.contains("\"deep\"") && e.contains("full_copy"), "{e}");
        assert_eq!(
            serde_json::to_string(&Mode::FullCopy).unwrap(),
            "\"full_copy\""
        );
        assert!(now_rfc3339().ends_with('Z'));
    }
}
