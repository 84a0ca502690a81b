//! End-to-end tests of prepare/export against the real `wick-agent` behind the fake hybrid-vsock
//! muxer (no VM: the "guest" is a temporary directory on this host), on real git repositories.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use support::{git, git_cmd, write, Harness};
use wick_workspace::{
    dry_run, export, inspect, prepare, Mode, PrepareOptions, WorkspaceError, MANIFEST_NAME,
};

fn binary_blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect()
}

/// A repository with history, a binary file, a symlink, an executable, an ignored file, an
/// untracked file, an uncommitted modification and a tracked file deleted in the working tree.
fn sample_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("host-repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    write(&repo.join("README.md"), b"# sample\n");
    write(&repo.join(".gitignore"), b"*.log\nbuild/\n");
    write(&repo.join("src/main.c"), b"int main(void) { return 0; }\n");
    write(&repo.join("old.txt"), b"to be deleted\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    write(&repo.join("assets/blob.bin"), &binary_blob(1, 70_000));
    write(&repo.join("run.sh"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(repo.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("README.md", repo.join("link-to-readme")).unwrap();
    write(&repo.join("dir with space/ünïcode.txt"), b"odd name\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "second"]);
    write(&repo.join("src/lib.c"), b"int f(void) { return 1; }\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "third"]);
    // Uncommitted state.
    write(&repo.join("src/main.c"), b"int main(void) { return 42; }\n");
    std::fs::remove_file(repo.join("old.txt")).unwrap();
    write(&repo.join("debug.log"), b"ignored\n");
    write(&repo.join("build/out.o"), b"ignored too\n");
    write(&repo.join("notes.txt"), b"untracked\n");
    repo
}

fn status(dir: &Path) -> String {
    git(dir, &["status", "--porcelain", "--untracked-files=all"])
}

/// Every file and symlink under `dir` except `.git`: path → (kind, executable, content/target).
fn tree(dir: &Path) -> BTreeMap<PathBuf, (char, bool, Vec<u8>)> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, (char, bool, Vec<u8>)>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            if p == Path::new(".git") {
                continue;
            }
            let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(root.join(&p)).unwrap();
                out.insert(p, ('l', false, t.into_os_string().into_encoded_bytes()));
            } else {
                let data = std::fs::read(root.join(&p)).unwrap();
                out.insert(p, ('f', m.permissions().mode() & 0o111 != 0, data));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, Path::new(""), &mut out);
    out
}

fn all() -> PrepareOptions {
    PrepareOptions {
        include_untracked: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_edit_export_apply_round_trip() {
    let h = Harness::start().await;
    let repo = sample_repo(h.dir.path());
    let head = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    let plan = inspect(&repo, &all()).unwrap();
    assert_eq!(plan.head_commit(), head);
    assert_eq!(plan.host_branch(), Some("main"));

    let guest = h.path("guest/repo");
    let gp = guest.to_str().unwrap();
    let mut stages = Vec::new();
    let report = prepare(&h.client, &plan, gp, |s| stages.push(s.to_string()))
        .await
        .unwrap();
    assert!(report.fresh);
    assert!(report.objects_sent > 0 && report.pack_bytes > 0);
    assert!(!stages.is_empty());
    assert_eq!(report.record.head_commit, head);
    assert_eq!(report.record.branch.as_deref(), Some("main"));
    assert_eq!(report.record.mode, Mode::Shallow);

    // The guest repository: same HEAD and branch, shallow, consistent, same changes.
    assert_eq!(git(&guest, &["rev-parse", "HEAD"]).trim(), head);
    assert_eq!(
        git(&guest, &["symbolic-ref", "--short", "HEAD"]).trim(),
        "main"
    );
    assert_eq!(git(&guest, &["rev-list", "--count", "HEAD"]).trim(), "1");
    assert_eq!(
        git(&guest, &["rev-parse", "--is-shallow-repository"]).trim(),
        "true"
    );
    git(&guest, &["fsck", "--no-progress", "--no-dangling"]);
    assert_eq!(status(&guest), status(&repo));
    assert!(status(&guest).contains(" M src/main.c"));
    assert!(status(&guest).contains(" D old.txt"));
    assert!(status(&guest).contains("?? notes.txt"));
    assert!(!guest.join("debug.log").exists() && !guest.join("build").exists());
    assert_eq!(
        std::fs::read_link(guest.join("link-to-readme")).unwrap(),
        Path::new("README.md")
    );
    assert_eq!(tree(&guest), {
        let mut t = tree(&repo);
        t.retain(|p, _| !p.starts_with("build") && p != Path::new("debug.log"));
        t
    });
    // The guest can diff against HEAD (the blobs are there).
    let d = git(&guest, &["diff", "src/main.c"]);
    assert!(d.contains("-int main(void) { return 0; }"), "{d}");

    // Work in the guest: edit, add, delete (text and binary), chmod, symlink; commit part of it.
    write(&guest.join("README.md"), b"# sample, edited in the guest\n");
    write(&guest.join("assets/blob.bin"), &binary_blob(7, 80_000));
    write(&guest.join("assets/new.bin"), &binary_blob(9, 5_000));
    write(&guest.join("docs/guide.md"), b"new doc\n");
    std::fs::remove_file(guest.join("src/lib.c")).unwrap();
    std::fs::set_permissions(
        guest.join("src/main.c"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("docs/guide.md", guest.join("guide-link")).unwrap();
    std::fs::remove_file(guest.join("link-to-readme")).unwrap();
    symlink("run.sh", guest.join("link-to-readme")).unwrap();
    git(&guest, &["add", "README.md", "assets/new.bin"]);
    git(&guest, &["commit", "-qm", "guest work"]);

    let index_before = std::fs::read(guest.join(".git/index")).unwrap();
    let status_before = status(&guest);
    let patch = export(&h.client, gp, Some(&head)).await.unwrap();
    assert_eq!(
        std::fs::read(guest.join(".git/index")).unwrap(),
        index_before
    );
    assert_eq!(status(&guest), status_before);
    assert!(String::from_utf8_lossy(&patch).contains("GIT binary patch"));

    // A clean host clone at the original HEAD + the patch = the guest's tree.
    let clean = h.path("clean");
    git(
        h.dir.path(),
        &[
            "clone",
            "-q",
            repo.to_str().unwrap(),
            clean.to_str().unwrap(),
        ],
    );
    git(&clean, &["checkout", "-q", &head]);
    let patch_file = h.path("export.patch");
    std::fs::write(&patch_file, &patch).unwrap();
    git(&clean, &["apply", patch_file.to_str().unwrap()]);
    assert_eq!(tree(&clean), tree(&guest));

    // Against the guest's HEAD, only the uncommitted part remains.
    let patch = export(&h.client, gp, None).await.unwrap();
    let text = String::from_utf8_lossy(&patch);
    assert!(
        text.contains("src/lib.c") && !text.contains("assets/new.bin"),
        "{text}"
    );

    // A base commit the shallow guest lacks is refused with a clear message.
    let first = git(&repo, &["rev-list", "--max-parents=0", "HEAD"])
        .trim()
        .to_string();
    let e = export(&h.client, gp, Some(&first))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the guest repository"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_files_only_on_request_and_dry_run_copies_nothing() {
    let h = Harness::start().await;
    let repo = sample_repo(h.dir.path());

    let plan = inspect(&repo, &all()).unwrap();
    let lines = dry_run(&plan);
    let guest = h.path("guest/repo");
    assert!(!guest.exists(), "a dry run does no guest I/O");
    for want in ["README.md", "assets/blob.bin", "link-to-readme", "run.sh"] {
        assert!(lines.iter().any(|l| l == want), "{want} in {lines:?}");
    }
    assert!(lines.iter().any(|l| l == "notes.txt (untracked)"));
    assert!(lines.iter().any(|l| l.starts_with("history: shallow")));
    assert!(!lines
        .iter()
        .any(|l| l.contains("debug.log") || l.contains("old.txt")));

    let plan = inspect(&repo, &PrepareOptions::default()).unwrap();
    assert!(!dry_run(&plan).iter().any(|l| l.contains("notes.txt")));
    prepare(&h.client, &plan, guest.to_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert!(!guest.join("notes.txt").exists());
    let want: String = status(&repo)
        .lines()
        .filter(|l| !l.starts_with("??"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(status(&guest), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_and_from_create_the_branch_in_the_guest_only() {
    let h = Harness::start().await;
    let repo = h.path("host-repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    write(&repo.join("a.txt"), b"a\n");
    write(&repo.join("b.txt"), b"b\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "base"]);
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    write(&repo.join("b.txt"), b"b from feature\n");
    write(&repo.join("f.txt"), b"feature only\n");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "feature work"]);
    let feature = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    git(&repo, &["checkout", "-q", "main"]);
    let main = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    write(&repo.join("a.txt"), b"a, uncommitted\n");
    let refs_before = git(&repo, &["for-each-ref"]);

    // --branch alone: from HEAD.
    let opts = PrepareOptions {
        branch: Some("wip".into()),
        ..Default::default()
    };
    let plan = inspect(&repo, &opts).unwrap();
    let g1 = h.path("g1");
    let r = prepare(&h.client, &plan, g1.to_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert_eq!(r.record.branch.as_deref(), Some("wip"));
    assert_eq!(git(&g1, &["symbolic-ref", "--short", "HEAD"]).trim(), "wip");
    assert_eq!(git(&g1, &["rev-parse", "HEAD"]).trim(), main);
    assert_eq!(status(&g1), " M a.txt\n");

    // --branch with --from: starts at the other branch, keeping the copied changes.
    let opts = PrepareOptions {
        branch: Some("work".into()),
        from: Some("feature".into()),
        ..Default::default()
    };
    let plan = inspect(&repo, &opts).unwrap();
    assert!(dry_run(&plan)
        .iter()
        .any(|l| l.contains("guest branch: work from feature")));
    let g2 = h.path("g2");
    prepare(&h.client, &plan, g2.to_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert_eq!(
        git(&g2, &["symbolic-ref", "--short", "HEAD"]).trim(),
        "work"
    );
    assert_eq!(git(&g2, &["rev-parse", "HEAD"]).trim(), feature);
    assert_eq!(std::fs::read(g2.join("f.txt")).unwrap(), b"feature only\n");
    assert_eq!(
        std::fs::read(g2.join("b.txt")).unwrap(),
        b"b from feature\n"
    );
    assert_eq!(
        std::fs::read(g2.join("a.txt")).unwrap(),
        b"a, uncommitted\n"
    );
    assert_eq!(status(&g2), " M a.txt\n");
    git(&g2, &["fsck", "--no-progress", "--no-dangling"]);

    // The host's branches did not move and no branch was created there.
    assert_eq!(git(&repo, &["for-each-ref"]), refs_before);
    assert_eq!(
        git(&repo, &["symbolic-ref", "--short", "HEAD"]).trim(),
        "main"
    );
}

#[test]
fn every_rejection_happens_at_inspection_with_a_clear_message() {
    // `inspect` takes no agent client: these refusals cannot have done any guest I/O.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let msg = |e: WorkspaceError| e.to_string();

    let e = inspect(&d.join("nope"), &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WorkspaceError::NotFound(_)), "{e}");

    write(&d.join("file"), b"x");
    let e = inspect(&d.join("file"), &PrepareOptions::default()).unwrap_err();
    assert!(msg(e).contains("is not a directory"));

    std::fs::create_dir(d.join("plain")).unwrap();
    let e = inspect(&d.join("plain"), &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WorkspaceError::NotAGitRepo { .. }), "{e}");
    assert!(msg(e).contains("is not inside a git repository"));

    git(d, &["init", "-q", "--bare", "bare.git"]);
    let e = inspect(&d.join("bare.git"), &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WorkspaceError::BareRepo(_)), "{e}");
    assert!(msg(e).contains("bare git repository"));

    let empty = d.join("empty");
    git(d, &["init", "-q", "empty"]);
    let e = inspect(&empty, &PrepareOptions::default()).unwrap_err();
    assert!(msg(e).contains("has no commits yet"));

    let repo = sample_repo(d);
    let e = inspect(&repo.join(".git"), &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WorkspaceError::InsideGitDir(_)), "{e}");

    let e = inspect(
        &repo,
        &PrepareOptions {
            from: Some("main".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, WorkspaceError::FromWithoutBranch), "{e}");
    assert!(msg(e).contains("--from needs --branch"));

    let e = "deep".parse::<Mode>().unwrap_err();
    assert!(matches!(e, WorkspaceError::BadMode(_)));
    assert!(msg(e).contains("unknown workspace mode \"deep\""));

    for bad in ["bad..name", "has space", "-dash", "end.lock", "@{-1}"] {
        let e = inspect(
            &repo,
            &PrepareOptions {
                branch: Some(bad.into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, WorkspaceError::BadBranchName { .. }),
            "{bad}: {e}"
        );
        assert!(msg(e).contains("is not a valid branch name"));
    }

    let e = inspect(
        &repo,
        &PrepareOptions {
            branch: Some("ok".into()),
            from: Some("no-such-ref".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, WorkspaceError::BadRef { .. }), "{e}");

    // Submodules: refused in shallow mode, accepted with full_copy.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    git(&sub, &["init", "-q"]);
    write(&sub.join("s.txt"), b"s\n");
    git(&sub, &["add", "-A"]);
    git(&sub, &["commit", "-qm", "sub"]);
    git(
        &repo,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            sub.to_str().unwrap(),
            "vendor/sub",
        ],
    );
    let e = inspect(&repo, &PrepareOptions::default()).unwrap_err();
    assert!(matches!(e, WorkspaceError::Submodules(_)), "{e}");
    assert!(
        msg(e).contains("vendor/sub")
            && msg(inspect(&repo, &PrepareOptions::default()).unwrap_err()).contains("full_copy")
    );
    let plan = inspect(
        &repo,
        &PrepareOptions {
            mode: Mode::FullCopy,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(plan.files().any(|p| p.starts_with("vendor/sub")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_copy_brings_the_whole_git_dir_and_submodules() {
    let h = Harness::start().await;
    let repo = sample_repo(h.dir.path());
    let sub = h.path("sub");
    std::fs::create_dir(&sub).unwrap();
    git(&sub, &["init", "-q"]);
    write(&sub.join("s.txt"), b"s\n");
    git(&sub, &["add", "-A"]);
    git(&sub, &["commit", "-qm", "sub"]);
    git(
        &repo,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            sub.to_str().unwrap(),
            "vendor/sub",
        ],
    );
    git(&repo, &["commit", "-qm", "add submodule"]);
    let plan = inspect(
        &repo,
        &PrepareOptions {
            mode: Mode::FullCopy,
            include_untracked: true,
            ..Default::default()
        },
    )
    .unwrap();
    let guest = h.path("full");
    let r = prepare(&h.client, &plan, guest.to_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert_eq!(r.record.mode, Mode::FullCopy);
    assert_eq!(r.objects_sent, 0, "the history travels as .git files");
    assert_eq!(
        git(&guest, &["rev-list", "--count", "HEAD"]).trim(),
        git(&repo, &["rev-list", "--count", "HEAD"]).trim()
    );
    assert_eq!(status(&guest), status(&repo));
    assert_eq!(
        git(&guest.join("vendor/sub"), &["rev-parse", "HEAD"]),
        git(&sub, &["rev-parse", "HEAD"])
    );
    // Re-preparing a full copy sends little (the refreshed index at most).
    let r = prepare(&h.client, &plan, guest.to_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert!(!r.fresh);
    assert!(r.files_sent <= 2, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_prepare_sends_only_what_changed() {
    let h = Harness::start().await;
    let repo = h.path("host-repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..200 {
        write(
            &repo.join(format!("d{}/f{i}.txt", i % 10)),
            format!("file {i}\n").repeat(50).as_bytes(),
        );
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "many files"]);
    let guest = h.path("guest");
    let gp = guest.to_str().unwrap();
    let opts = all();

    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert!(r.fresh);
    assert_eq!(r.files_sent, 200);
    assert!(guest.join(".git").join(MANIFEST_NAME).is_file());

    // Nothing changed: nothing sent.
    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert!(!r.fresh);
    assert_eq!(
        (r.files_sent, r.files_deleted, r.objects_sent),
        (0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.files_unchanged, 200);

    // One file changed: only it is sent.
    write(&repo.join("d3/f13.txt"), b"changed on the host\n");
    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert_eq!(
        (r.files_sent, r.files_deleted, r.objects_sent),
        (1, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.file_bytes, 20);
    assert_eq!(
        std::fs::read(guest.join("d3/f13.txt")).unwrap(),
        b"changed on the host\n"
    );
    assert_eq!(status(&guest), status(&repo));

    // One deleted, one added (untracked, included).
    std::fs::remove_file(repo.join("d4/f14.txt")).unwrap();
    write(&repo.join("d9/new.txt"), b"new\n");
    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert_eq!((r.files_sent, r.files_deleted), (1, 1), "{r:?}");
    assert!(!guest.join("d4/f14.txt").exists());
    assert_eq!(status(&guest), status(&repo));

    // An edit made in the guest to a copied file is detected and overwritten.
    write(&guest.join("d5/f15.txt"), b"guest edit\n");
    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert_eq!(r.files_sent, 1, "{r:?}");
    assert_eq!(
        std::fs::read(guest.join("d5/f15.txt")).unwrap(),
        std::fs::read(repo.join("d5/f15.txt")).unwrap()
    );

    // A new host commit: only its new objects travel, and the guest follows HEAD.
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "second"]);
    let r = prepare(&h.client, &inspect(&repo, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap();
    assert_eq!(r.files_sent, 0, "{r:?}");
    assert!(
        r.objects_sent > 0 && r.objects_sent < 10,
        "commit, a few trees, two blobs: {r:?}"
    );
    assert_eq!(
        git(&guest, &["rev-parse", "HEAD"]),
        git(&repo, &["rev-parse", "HEAD"])
    );
    assert_eq!(status(&guest), "");
    git(&guest, &["fsck", "--no-progress", "--no-dangling"]);

    // Another repository into the same guest path is refused.
    let other = h.path("other");
    std::fs::create_dir(&other).unwrap();
    git(&other, &["init", "-q"]);
    write(&other.join("x"), b"x");
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-qm", "x"]);
    let e = prepare(&h.client, &inspect(&other, &opts).unwrap(), gp, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, WorkspaceError::OtherWorkspace { .. }), "{e}");

    // Exporting an unchanged workspace gives an empty patch.
    assert!(export(&h.client, gp, None).await.unwrap().is_empty());
    let _ = git_cmd(&repo);
}
