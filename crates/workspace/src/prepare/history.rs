//! The history a shallow prepare sends: the objects of the wanted commits the guest lacks,
//! packed by `git pack-objects` in a background thread.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::blocking;
use crate::inspect::RepoPlan;
use crate::manifest::Manifest;
use crate::{git, Mode, Result, WorkspaceError};

/// The history to send: the wanted commits, the shallow boundary, and the pack being built.
pub(super) struct History {
    pub(super) commits: Vec<String>,
    pub(super) shallow: BTreeSet<String>,
    pub(super) objects_sent: u64,
    /// The packing thread and the directory it writes into (removed when dropped).
    pub(super) pack: Option<(PackJob, tempfile::TempDir)>,
}

pub(super) type PackJob = std::thread::JoinHandle<Result<Vec<PathBuf>>>;

impl History {
    /// Finds the objects the guest lacks (shallow mode) and starts packing them.
    pub(super) async fn start(plan: &RepoPlan, old: Option<&Manifest>) -> Result<History> {
        let mut history = History {
            commits: plan.commits(),
            shallow: old
                .map(|m| m.meta.shallow.iter().cloned().collect())
                .unwrap_or_default(),
            objects_sent: 0,
            pack: None,
        };
        if plan.mode != Mode::Shallow {
            return Ok(history);
        }
        let had: Vec<String> = old.map(|m| m.meta.commits.clone()).unwrap_or_default();
        let same: HashSet<&String> = had.iter().collect();
        if history.commits.iter().all(|c| same.contains(c)) {
            return Ok(history);
        }
        let root = plan.root.clone();
        let want = history.commits.clone();
        let (ids, with_parents) = blocking(move || missing_objects(&root, &want, &had)).await?;
        history.shallow.extend(with_parents);
        history.objects_sent = ids.len() as u64;
        let dir = tempfile::Builder::new()
            .prefix("wick-workspace-pack-")
            .tempdir()
            .map_err(WorkspaceError::io(
                "cannot create a temporary directory for the pack",
            ))?;
        let root = plan.root.clone();
        let base = dir.path().join("pack");
        let job = std::thread::spawn(move || pack_objects(&root, &base, &ids));
        history.pack = Some((job, dir));
        Ok(history)
    }
}

/// The objects of the `want` commits not reachable from the `had` ones the host still has, and
/// the wanted commits that have parents (the guest's new shallow boundary).
fn missing_objects(
    root: &Path,
    want: &[String],
    had: &[String],
) -> Result<(HashSet<String>, Vec<String>)> {
    let mut ids = HashSet::new();
    for c in want {
        git::commit_objects(root, c, &mut ids)?;
    }
    let mut known = HashSet::new();
    for c in had.iter().filter(|c| git::has_object(root, c)) {
        git::commit_objects(root, c, &mut known)?;
    }
    ids.retain(|id| !known.contains(id));
    let mut with_parents = Vec::new();
    for c in want {
        if git::has_parents(root, c)? {
            with_parents.push(c.clone());
        }
    }
    Ok((ids, with_parents))
}

/// `git pack-objects` of `ids` into `base-<hash>.{pack,idx,rev}`: no delta search, fast
/// compression (packed host objects are reused as they are). Returns the files written.
fn pack_objects(root: &Path, base: &Path, ids: &HashSet<String>) -> Result<Vec<PathBuf>> {
    let mut child = git::command(root)
        .args([
            "-c",
            "pack.compression=1",
            "pack-objects",
            "-q",
            "--window=0",
        ])
        .arg(base)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(WorkspaceError::io("cannot run git pack-objects"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut list = String::with_capacity(ids.len() * 41);
    for id in ids {
        list.push_str(id);
        list.push('\n');
    }
    let wrote = stdin.write_all(list.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(WorkspaceError::io("cannot run git pack-objects"))?;
    if !out.status.success() || wrote.is_err() {
        return Err(git::git_error(root, &["pack-objects"], &out));
    }
    let dir = base.parent().expect("pack base has a parent");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(WorkspaceError::io("cannot list the pack directory"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    // The .pack before its .idx, so a reader never sees an index without its pack.
    files.sort_by_key(|p| !p.to_string_lossy().ends_with(".pack"));
    Ok(files)
}
