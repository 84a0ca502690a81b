//! Building (or refreshing) the guest repository: read the guest's manifest and file listing,
//! decide what changed, stream one tar (working-tree files, history pack, manifest), then run the
//! git fix-ups in the guest.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use wick_agent_proto::{AgentClient, ExecOutput, ExecRequest};

use crate::inspect::RepoPlan;
use crate::manifest::{self, Entry, GuestEntry, Kind, Manifest, Meta};
use crate::{git, Mode, Result, WorkspaceError, WorkspaceRecord, MANIFEST_NAME};
use wick_agent_proto::pipe::PipeWriter;

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

/// The history to send: the wanted commits, the shallow boundary, and the pack being built.
struct History {
    commits: Vec<String>,
    shallow: BTreeSet<String>,
    objects_sent: u64,
    /// The packing thread and the directory it writes into (removed when dropped).
    pack: Option<(PackJob, tempfile::TempDir)>,
}

type PackJob = std::thread::JoinHandle<Result<Vec<PathBuf>>>;

impl History {
    /// Finds the objects the guest lacks (shallow mode) and starts packing them.
    async fn start(plan: &RepoPlan, old: Option<&Manifest>) -> Result<History> {
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

/// Everything the one tar carries, in the order it is written.
struct Archive {
    meta_files: Vec<(String, Vec<u8>, u32)>,
    files: Vec<(Vec<u8>, Entry)>,
    pack: Option<PackJob>,
    manifest: Vec<u8>,
}

impl Archive {
    /// The archive of a prepare, and the pack's directory (to keep until the archive is sent).
    fn new(
        plan: &RepoPlan,
        source_path: &str,
        fresh: bool,
        current: BTreeMap<Vec<u8>, Entry>,
        files: Vec<(Vec<u8>, Entry)>,
        history: History,
    ) -> (Archive, Option<tempfile::TempDir>) {
        let shallow = plan.mode == Mode::Shallow;
        let manifest = Manifest {
            meta: Meta {
                source_path: source_path.to_string(),
                mode: plan.mode,
                head: plan.head.clone(),
                commits: if shallow { history.commits } else { Vec::new() },
                shallow: history.shallow.iter().cloned().collect(),
            },
            entries: current,
        };
        let mut meta_files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        if shallow {
            if fresh {
                meta_files.push((".git/HEAD".into(), head_file(plan), 0o644));
                meta_files.push((".git/config".into(), config_file(plan), 0o644));
                if let Ok(ex) = std::fs::read(plan.git_dir.join("info/exclude")) {
                    meta_files.push((".git/info/exclude".into(), ex, 0o644));
                }
            }
            let mut sh = String::new();
            for c in &history.shallow {
                sh.push_str(c);
                sh.push('\n');
            }
            meta_files.push((".git/shallow".into(), sh.into_bytes(), 0o644));
        }
        let (pack, dir) = history.pack.unzip();
        let archive = Archive {
            meta_files,
            files,
            pack,
            manifest: manifest.encode(),
        };
        (archive, dir)
    }
}

/// Streams the archive into `gp`; returns (pack bytes, archive bytes).
async fn send_archive(
    client: &AgentClient,
    root: &Path,
    gp: &str,
    archive: Archive,
) -> Result<(u64, u64)> {
    let (writer, reader) = wick_agent_proto::pipe::pipe();
    let root = root.to_path_buf();
    let tar_job = std::thread::spawn(move || build_tar(writer, &root, archive));
    let put = client.put_tar(gp, reader).await;
    let tar = tar_job.join().unwrap_or_else(|_| {
        Err(WorkspaceError::io("build the archive")(io::Error::other(
            "the archive builder panicked",
        )))
    });
    let (pack_bytes, archive_len) = tar?;
    let done = put?;
    Ok((pack_bytes, done.bytes.max(archive_len)))
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

fn head_file(plan: &RepoPlan) -> Vec<u8> {
    match &plan.branch {
        Some(b) => format!("ref: refs/heads/{b}\n").into_bytes(),
        None => format!("{}\n", plan.head).into_bytes(),
    }
}

fn config_file(plan: &RepoPlan) -> Vec<u8> {
    let mut c = String::from("[core]\n");
    if plan.object_format == "sha1" {
        c.push_str("\trepositoryformatversion = 0\n");
    } else {
        c.push_str("\trepositoryformatversion = 1\n");
    }
    c.push_str("\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n");
    if plan.object_format != "sha1" {
        c.push_str(&format!(
            "[extensions]\n\tobjectformat = {}\n",
            plan.object_format
        ));
    }
    c.into_bytes()
}

/// Writes the archive into the pipe; returns (pack bytes, archive bytes).
fn build_tar(mut w: PipeWriter, root: &Path, archive: Archive) -> Result<(u64, u64)> {
    let mut counter = Counter { w: &mut w, n: 0 };
    let mut b = tar::Builder::new(&mut counter);
    let r = write_entries(&mut b, root, archive);
    match r {
        Ok(pack_bytes) => {
            let fin = b.into_inner().map(|c| c.n);
            match fin {
                Ok(n) => {
                    w.finish()
                        .map_err(WorkspaceError::io("stream the archive to the guest"))?;
                    Ok((pack_bytes, n))
                }
                Err(e) => Err(WorkspaceError::io("stream the archive to the guest")(e)),
            }
        }
        Err(e) => {
            // Do not let the builder's drop write an end-of-archive marker: the guest must see
            // the failure, not a shorter archive.
            std::mem::forget(b);
            w.fail(io::Error::other(e.to_string()));
            Err(e)
        }
    }
}

struct Counter<'a> {
    w: &'a mut PipeWriter,
    n: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes the archive's entries: git directories and metadata, files, pack, manifest last.
/// Returns the pack's size.
fn write_entries<W: Write>(b: &mut tar::Builder<W>, root: &Path, archive: Archive) -> Result<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let send_err = WorkspaceError::io("stream the archive to the guest");
    for d in [
        ".git/refs/heads",
        ".git/refs/tags",
        ".git/objects/info",
        ".git/objects/pack",
    ] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, now);
        b.append_data(&mut h, d, io::empty())
            .map_err(WorkspaceError::io("stream the archive to the guest"))?;
    }
    for (path, data, mode) in archive.meta_files {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, now);
        b.append_data(&mut h, &path, &data[..])
            .map_err(WorkspaceError::io("stream the archive to the guest"))?;
    }
    for (p, e) in archive.files {
        append_file(b, root, Path::new(OsStr::from_bytes(&p)), &e)?;
    }
    let pack_bytes = match archive.pack {
        Some(job) => append_pack(b, job, now)?,
        None => 0,
    };
    let manifest = archive.manifest;
    let mut h = header(tar::EntryType::Regular, 0o644, manifest.len() as u64, now);
    b.append_data(&mut h, format!(".git/{MANIFEST_NAME}"), &manifest[..])
        .map_err(send_err)?;
    Ok(pack_bytes)
}

/// One working-tree file or symlink, `rel` to `root`.
fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    e: &Entry,
) -> Result<()> {
    match e.kind {
        Kind::Symlink => {
            let mut h = header(tar::EntryType::Symlink, e.mode, 0, e.mtime_secs());
            b.append_link(&mut h, rel, Path::new(OsStr::from_bytes(&e.target)))
                .map_err(WorkspaceError::io(format!(
                    "archive the link {}",
                    rel.display()
                )))?;
        }
        Kind::File => {
            let full = root.join(rel);
            let f = File::open(&full).map_err(WorkspaceError::io(format!(
                "cannot read {} (did it change during the copy? prepare again)",
                full.display()
            )))?;
            // Exactly the size in the header, even if the file changes meanwhile (the
            // manifest then differs and the next prepare sends it again).
            let data = f.take(e.size).chain(io::repeat(0)).take(e.size);
            let mut h = header(tar::EntryType::Regular, e.mode, e.size, e.mtime_secs());
            b.append_data(&mut h, rel, data)
                .map_err(WorkspaceError::io(format!("archive {}", full.display())))?;
        }
    }
    Ok(())
}

/// The history pack's files once the packing thread is done; returns their size.
fn append_pack<W: Write>(b: &mut tar::Builder<W>, job: PackJob, now: i64) -> Result<u64> {
    let files = job.join().unwrap_or_else(|_| {
        Err(WorkspaceError::io("pack the history")(io::Error::other(
            "the packing thread panicked",
        )))
    })?;
    let mut pack_bytes = 0u64;
    for f in files {
        let name = f.file_name().unwrap_or_default().to_owned();
        let file =
            File::open(&f).map_err(WorkspaceError::io(format!("cannot read {}", f.display())))?;
        let len = file
            .metadata()
            .map_err(WorkspaceError::io(format!("cannot stat {}", f.display())))?
            .len();
        pack_bytes += len;
        let mut h = header(tar::EntryType::Regular, 0o444, len, now);
        let dest = Path::new(".git/objects/pack").join(name);
        b.append_data(&mut h, dest, file.take(len))
            .map_err(WorkspaceError::io("stream the history pack"))?;
    }
    Ok(pack_bytes)
}
