//! Building (or refreshing) the guest repository: read the guest's manifest and file listing,
//! decide what changed, stream one tar (working-tree files, history pack, manifest), then run the
//! git fix-ups in the guest.

mod archive;
mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wick_agent_proto::{AgentClient, ExecOutput, ExecRequest};

use crate::inspect::RepoPlan;
use crate::manifest::{self, Entry, GuestEntry, Kind, Manifest};
use crate::{Mode, Result, WorkspaceError, WorkspaceRecord, MANIFEST_NAME};
use archive::{send_archive, Archive};
use history::History;

/// What a [`prepare`] did.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// For the daemon to record on the VM.
    pub record: WorkspaceRecord,
    /// `true` when the guest path held no manifest, so everything was sent.
    pub fresh: bool,
    /// Working-tree files (and, in `full_copy`, `.git` files) sent.
    pub files_sent: u64,
    /// Their content bytes.
    pub file_bytes: u64,
    /// Files already up to date in the guest.
    pub files_unchanged: u64,
    /// Files deleted in the guest because they are gone on the host.
    pub files_deleted: u64,
    /// Git objects sent in the history pack (0 when the guest already had them).
    pub objects_sent: u64,
    pub pack_bytes: u64,
    /// Size of the whole tar stream.
    pub archive_bytes: u64,
    pub elapsed: Duration,
}

/// The `find -printf` format parsed by [`manifest::parse_guest_listing`].
const LISTING_FORMAT: &str = "%y %s %T@ %m\\0%P\\0%l\\0";

/// Git fix-ups of a shallow copy: `$1` guest path, `$2` HEAD, `$3` host branch (may be empty),
/// `$4` guest branch to create (may be empty), `$5` its start commit.
const SHALLOW_FIXUP: &str = r#"set -e
cd "$1"
if [ -n "$3" ]; then
  git update-ref "refs/heads/$3" "$2"
  git symbolic-ref HEAD "refs/heads/$3"
else
  git update-ref --no-deref HEAD "$2"
fi
git reset -q
if [ -n "$4" ]; then git checkout -q -B "$4" "$5"; fi
"#;

/// Git fix-ups of a full copy (same arguments): refresh the copied index's stat data.
const FULL_FIXUP: &str = r#"set -e
cd "$1"
git update-index -q --refresh >/dev/null || true
if [ -n "$4" ]; then git checkout -q -B "$4" "$5"; fi
"#;

/// Copies the plan's repository into the guest directory `guest_path` (see the crate docs),
/// reporting stages through `progress`. Re-preparing the same guest path sends only what changed.
pub async fn prepare(
    client: &AgentClient,
    plan: &RepoPlan,
    guest_path: &str,
    mut progress: impl FnMut(&str) + Send,
) -> Result<PrepareReport> {
    let start = Instant::now();
    let gp = guest_dir(guest_path)?;
    let source_path = plan.root.display().to_string();

    // 1. What the guest holds.
    progress("reading the guest workspace state");
    let (old, guest) = guest_state(client, plan, &gp, &source_path).await?;

    // 2. What the host has now.
    let root = plan.root.clone();
    let paths: Vec<PathBuf> = plan.files().map(Path::to_path_buf).collect();
    let current = blocking(move || stat_all(&root, &paths)).await?;

    // 3. The difference.
    let diff = Diff::new(old.as_ref(), &guest, &current);

    // 4. History: the objects of the wanted commits the guest lacks, packed in the background.
    let history = History::start(plan, old.as_ref()).await?;

    // 5. Deletions first (so replaced symlinks are never written through).
    if !diff.delete.is_empty() {
        progress(&format!(
            "removing {} path(s) in the guest",
            diff.delete.len()
        ));
        remove_in_guest(client, &gp, &diff.delete).await?;
    }

    // 6. One tar: git metadata, files, pack, manifest.
    let files_sent = diff.send.len() as u64;
    let file_bytes: u64 = diff.send.iter().map(|(_, e)| e.size).sum();
    progress(&format!(
        "sending {files_sent} file(s) ({:.1} MiB){}",
        file_bytes as f64 / (1024.0 * 1024.0),
        if history.pack.is_some() {
            format!(" and the history ({} objects)", history.objects_sent)
        } else {
            String::new()
        }
    ));
    let objects_sent = history.objects_sent;
    let (archive, pack_dir) = Archive::new(
        plan,
        &source_path,
        old.is_none(),
        current,
        diff.send,
        history,
    );
    let (pack_bytes, archive_bytes) = send_archive(client, &plan.root, &gp, archive).await?;
    drop(pack_dir);

    // 7. Git fix-ups.
    progress("setting up git in the guest");
    git_fixups(client, plan, &gp).await?;

    Ok(PrepareReport {
        record: WorkspaceRecord {
            source_path,
            guest_path: gp,
            head_commit: plan.head.clone(),
            branch: plan.guest_branch().map(str::to_string),
            mode: plan.mode,
            prepared_at: crate::now_rfc3339(),
        },
        fresh: old.is_none(),
        files_sent,
        file_bytes,
        files_unchanged: diff.unchanged,
        files_deleted: diff.deleted,
        objects_sent,
        pack_bytes,
        archive_bytes,
        elapsed: start.elapsed(),
    })
}

/// The guest directory: absolute, without a trailing `/` (but `/` itself stays).
fn guest_dir(guest_path: &str) -> Result<String> {
    if !guest_path.starts_with('/') {
        return Err(WorkspaceError::GuestPathNotAbsolute(guest_path.to_string()));
    }
    Ok(match guest_path.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
    .to_string())
}

/// The guest's manifest (refusing one written for another workspace) and, when it has one, its
/// file listing.
async fn guest_state(
    client: &AgentClient,
    plan: &RepoPlan,
    gp: &str,
    source_path: &str,
) -> Result<(Option<Manifest>, BTreeMap<Vec<u8>, GuestEntry>)> {
    let old = read_manifest(client, gp).await?;
    if let Some(m) = &old {
        if m.meta.source_path != source_path || m.meta.mode != plan.mode {
            return Err(WorkspaceError::OtherWorkspace {
                guest_path: gp.to_string(),
                source_path: m.meta.source_path.clone(),
                mode: m.meta.mode,
            });
        }
    }
    let guest = match &old {
        Some(_) => guest_listing(client, gp, plan.mode).await?,
        None => BTreeMap::new(),
    };
    Ok((old, guest))
}

/// What to send and delete so the guest matches the host.
struct Diff {
    send: Vec<(Vec<u8>, Entry)>,
    delete: Vec<Vec<u8>>,
    unchanged: u64,
    /// Paths deleted because they are gone on the host (not counting replaced ones).
    deleted: u64,
}

impl Diff {
    fn new(
        old: Option<&Manifest>,
        guest: &BTreeMap<Vec<u8>, GuestEntry>,
        current: &BTreeMap<Vec<u8>, Entry>,
    ) -> Diff {
        let mut diff = Diff {
            send: Vec::new(),
            delete: Vec::new(),
            unchanged: 0,
            deleted: 0,
        };
        for (p, e) in current {
            let g = guest.get(p);
            let up_to_date = old
                .and_then(|m| m.entries.get(p))
                .is_some_and(|was| was == e && g.is_some_and(|g| e.matches_guest(g)));
            if up_to_date {
                diff.unchanged += 1;
                continue;
            }
            // Replace symlinks and kind changes by deleting first (never write through a link).
            if g.is_some_and(|g: &GuestEntry| g.kind != e.kind || g.kind == Kind::Symlink) {
                diff.delete.push(p.clone());
            }
            diff.send.push((p.clone(), e.clone()));
        }
        if let Some(m) = old {
            for p in m.entries.keys() {
                if !current.contains_key(p) && guest.contains_key(p) {
                    diff.delete.push(p.clone());
                    diff.deleted += 1;
                }
            }
        }
        diff
    }
}

/// Points HEAD and the branches at the prepared commit (see [`SHALLOW_FIXUP`], [`FULL_FIXUP`]).
async fn git_fixups(client: &AgentClient, plan: &RepoPlan, gp: &str) -> Result<()> {
    let (new_branch, from) = match &plan.new_branch {
        Some(b) => (b.name.clone(), b.from_commit.clone()),
        None => (String::new(), String::new()),
    };
    let script = match plan.mode {
        Mode::Shallow => SHALLOW_FIXUP,
        Mode::FullCopy => FULL_FIXUP,
    };
    let out = exec(
        client,
        vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            gp.to_string(),
            plan.head.clone(),
            plan.branch.clone().unwrap_or_default(),
            new_branch,
            from,
        ],
        None,
    )
    .await?;
    check(&out, "set up the git repository")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkspaceError::io("run a host task")(io::Error::other(e.to_string())))?
}

/// Runs a command in the guest, feeding `stdin` if given, collecting its output.
pub(crate) async fn exec(
    client: &AgentClient,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
) -> Result<ExecOutput> {
    let mut req = ExecRequest::new(argv);
    req.env = vec![
        ("LC_ALL".into(), "C".into()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
    ];
    req.stdin = stdin.is_some();
    let mut session = client.exec(req).await?;
    match (stdin, session.take_stdin()) {
        (Some(data), Some(mut w)) => {
            let feed = async move {
                w.write(&data).await?;
                w.close().await
            };
            let (fed, out) = tokio::join!(feed, session.output());
            let out = out?;
            fed?;
            Ok(out)
        }
        _ => Ok(session.output().await?),
    }
}

/// Fails with the command's stderr unless it exited 0.
pub(crate) fn check(out: &ExecOutput, what: &'static str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if detail.is_empty() {
        detail = format!("exit status {}", out.status.shell_code());
    }
    if out.status.code == Some(127) {
        detail.push_str(" (is git installed in the guest image?)");
    }
    Err(WorkspaceError::Guest { what, detail })
}

async fn read_manifest(client: &AgentClient, gp: &str) -> Result<Option<Manifest>> {
    let out = exec(
        client,
        vec!["cat".into(), format!("{gp}/.git/{MANIFEST_NAME}")],
        None,
    )
    .await?;
    Ok(if out.status.success() {
        Manifest::decode(&out.stdout)
    } else {
        None
    })
}

async fn guest_listing(
    client: &AgentClient,
    gp: &str,
    mode: Mode,
) -> Result<BTreeMap<Vec<u8>, GuestEntry>> {
    let prune = match mode {
        Mode::Shallow => "./.git".to_string(),
        Mode::FullCopy => format!("./.git/{MANIFEST_NAME}"),
    };
    let script = format!(
        "cd \"$1\" && exec find . -path '{prune}' -prune -o \\( -type f -o -type l \\) -printf '{LISTING_FORMAT}'"
    );
    let out = exec(
        client,
        vec![
            "sh".into(),
            "-c".into(),
            script,
            "sh".into(),
            gp.to_string(),
        ],
        None,
    )
    .await?;
    check(&out, "list the workspace files (needs GNU find)")?;
    Ok(manifest::parse_guest_listing(&out.stdout))
}

async fn remove_in_guest(client: &AgentClient, gp: &str, paths: &[Vec<u8>]) -> Result<()> {
    let mut list = Vec::new();
    for p in paths {
        list.extend(p);
        list.push(0);
    }
    let out = exec(
        client,
        vec![
            "sh".into(),
            "-c".into(),
            "cd \"$1\" && xargs -0 rm -rf --".into(),
            "sh".into(),
            gp.to_string(),
        ],
        Some(list),
    )
    .await?;
    check(&out, "remove deleted files")?;
    // Directories left empty by the removal (deepest first; failures mean "not empty").
    let mut dirs: BTreeSet<Vec<u8>> = BTreeSet::new();
    for p in paths {
        let mut cur = Path::new(OsStr::from_bytes(p)).parent();
        while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.as_os_str().as_bytes().to_vec());
            cur = d.parent();
        }
    }
    if dirs.is_empty() {
        return Ok(());
    }
    let mut dirs: Vec<Vec<u8>> = dirs.into_iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.iter().filter(|&&b| b == b'/').count()));
    let mut list = Vec::new();
    for d in dirs {
        list.extend(d);
        list.push(0);
    }
    exec(
        client,
        vec![
            "sh".into(),
            "-c".into(),
            "cd \"$1\" && xargs -0 rmdir -- 2>/dev/null; true".into(),
            "sh".into(),
            gp.to_string(),
        ],
        Some(list),
    )
    .await?;
    Ok(())
}

/// lstat of every path (vanished ones are skipped: they are then deleted in the guest).
fn stat_all(root: &Path, paths: &[PathBuf]) -> Result<BTreeMap<Vec<u8>, Entry>> {
    let mut out = BTreeMap::new();
    for p in paths {
        let full = root.join(p);
        let Ok(m) = std::fs::symlink_metadata(&full) else {
            continue;
        };
        let target = if m.file_type().is_symlink() {
            Some(
                std::fs::read_link(&full)
                    .map_err(WorkspaceError::io(format!(
                        "cannot read the link {}",
                        full.display()
                    )))?
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else {
            None
        };
        if let Some(e) = Entry::from_metadata(&m, target) {
            out.insert(p.as_os_str().as_bytes().to_vec(), e);
        }
    }
    Ok(out)
}
