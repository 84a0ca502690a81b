//! Host-only integration tests: the real `wick-agent` binary (`--listen-unix`, `--root-prefix`,
//! `--no-poweroff`), the fake hybrid-vsock muxer in front, and the real `AgentClient`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use wick_agent_proto::testing::FakeVsockMuxer;
use wick_agent_proto::{
    AgentClient, AgentError, Configure, ExecEvent, ExecRequest, HostKey, NetworkConfig, SyncFile,
    WindowSize, AGENT_PORT, PROTOCOL_VERSION,
};
use wick_testkit::agent::{have, is_root};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_reports_versions() {
    let h = support::start().await;
    let info = h.client.hello().await.unwrap();
    assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    assert_eq!(info.agent_version, wick_agent_proto::AGENT_VERSION);
    assert_eq!(info.boot_id.len(), 36, "boot id {:?}", info.boot_id);
    let host = nix::unistd::gethostname().unwrap();
    assert_eq!(info.hostname, host.to_string_lossy());
    assert!(!info.kernel.is_empty());
    assert_eq!(&info, h.client.agent_info());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gives_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("vsock.sock");
    // Nothing listens behind the muxer: it closes every connection, as Firecracker does.
    let _mux =
        FakeVsockMuxer::start(&vsock, &[(AGENT_PORT, dir.path().join("none.sock"))]).unwrap();
    let err = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NotReady { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("10700") && msg.contains("closed the connection"),
        "{msg}"
    );
    // And with no socket at all.
    let err = AgentClient::connect(&dir.path().join("missing.sock"), AGENT_PORT, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_and_exit_code() {
    let h = support::start().await;
    let out = h
        .client
        .exec(sh("echo out; echo err >&2; exit 7"))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.status.code, out.status.signal), (Some(7), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_signal() {
    let h = support::start().await;
    let st = h
        .client
        .exec(sh("kill -9 $$"))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!((st.code, st.signal), (None, Some(9)));
    assert_eq!(st.shell_code(), 137);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_env_cwd_user_and_errors() {
    let h = support::start().await;
    let mut req = sh("pwd; echo \"$FOO\"; echo \"$HOME\"; id -u");
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some(h.dir.path().to_string_lossy().into_owned());
    let out = h.client.exec(req).await.unwrap().output().await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let me = nix::unistd::geteuid().as_raw().to_string();
    assert_eq!(
        lines[0],
        h.dir.path().canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(lines[1], "bar baz");
    assert_eq!(lines[3], me);

    if is_root() {
        let mut req = ExecRequest::new(["id", "-u"]);
        req.user = Some("nobody".into());
        let out = h.client.exec(req).await.unwrap().output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
        let mut req = ExecRequest::new(["id", "-u"]);
        req.user = Some("4242".into());
        let out = h.client.exec(req).await.unwrap().output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4242");
    } else {
        wick_testkit::skip(format_args!("the user-switch part: needs root"));
    }

    let err = h
        .client
        .exec(ExecRequest::new(["no-such-command-wick"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-command-wick"), "{err}");
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some("/no/such/dir".into());
    let err = h.client.exec(req).await.unwrap_err();
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
    let mut req = ExecRequest::new(["true"]);
    req.user = Some("no-such-user-wick".into());
    let err = h.client.exec(req).await.unwrap_err();
    assert!(err.to_string().contains("no-such-user-wick"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_pipes_stdin() {
    let h = support::start().await;
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = true;
    let mut s = h.client.exec(req).await.unwrap();
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let stdin = s.take_stdin().unwrap();
    let input = data.clone();
    let feeder = tokio::spawn(async move { stdin.copy_from(&input[..]).await });
    let out = s.output().await.unwrap();
    assert_eq!(feeder.await.unwrap().unwrap(), data.len() as u64);
    assert!(
        out.stdout == data,
        "cat echoed {} of {} bytes",
        out.stdout.len(),
        data.len()
    );
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_pty_and_resize() {
    let h = support::start().await;
    let mut req = sh("stty size; tty; read x; stty size");
    req.tty = Some(WindowSize { rows: 24, cols: 80 });
    req.stdin = true;
    let mut s = h.client.exec(req).await.unwrap();
    let mut stdin = s.take_stdin().unwrap();
    let ctl = s.control();
    let mut seen = Vec::new();
    let mut resized = false;
    let status = loop {
        match s.next_event().await.unwrap().expect("an event") {
            ExecEvent::Stdout(b) => {
                seen.extend_from_slice(&b);
                let text = String::from_utf8_lossy(&seen);
                if !resized && text.contains("24 80") && text.contains("/dev/pts/") {
                    resized = true;
                    ctl.resize(WindowSize {
                        rows: 50,
                        cols: 132,
                    })
                    .await
                    .unwrap();
                    stdin.write(b"go\n").await.unwrap();
                }
            }
            ExecEvent::Stderr(b) => panic!("a tty merges stderr, got {b:?}"),
            ExecEvent::Exit(st) => break st,
        }
    };
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("50 132"), "output: {text:?}");
    assert!(status.success(), "{status:?}");
    assert!(s.next_event().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_execs() {
    let h = support::start().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let c = h.client.clone();
        set.spawn(async move {
            let out = c
                .exec(ExecRequest::new([
                    "sh",
                    "-c",
                    "sleep 0.3; echo $0",
                    &i.to_string(),
                ]))
                .await
                .unwrap()
                .output()
                .await
                .unwrap();
            (i, out)
        });
    }
    let start = std::time::Instant::now();
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let (i, out) = r.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
        assert!(out.status.success());
        n += 1;
    }
    assert_eq!(n, 20);
    eprintln!("20 concurrent 0.3 s execs took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_session_kills_the_process() {
    let h = support::start().await;
    let s = h
        .client
        .exec(ExecRequest::new(["sleep", "600"]))
        .await
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(s.pid() as i32);
    assert!(nix::sys::signal::kill(pid, None).is_ok(), "sleep runs");
    drop(s);
    let mut gone = false;
    for _ in 0..100 {
        if nix::sys::signal::kill(pid, None).is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the process group was killed when the host hung up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_reaches_the_process_group() {
    let h = support::start().await;
    let s = h
        .client
        .exec(ExecRequest::new(["sleep", "600"]))
        .await
        .unwrap();
    s.control().signal(15).await.unwrap();
    let st = s.wait().await.unwrap();
    assert_eq!(st.signal, Some(15));
}

/// A tree with modes, a symlink, an empty dir, a binary file and a read-only dir.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("plain.txt"), b"hello\n").unwrap();
    fs::set_permissions(root.join("plain.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(root.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let bin: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    fs::write(root.join("sub/deeper/blob.bin"), &bin).unwrap();
    symlink("../plain.txt", root.join("sub/link")).unwrap();
    symlink("/nonexistent/abs", root.join("dangling")).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    fs::write(root.join("ro/inside"), b"x").unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
}

/// path → (kind, mode, contents or link target), for comparing trees.
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        let m = fs::symlink_metadata(p).unwrap();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        let mode = m.permissions().mode() & 0o7777;
        if m.file_type().is_symlink() {
            let t = fs::read_link(p).unwrap();
            out.insert(rel, ('l', 0, t.to_string_lossy().as_bytes().to_vec()));
        } else if m.is_dir() {
            out.insert(rel, ('d', mode, vec![]));
            for e in fs::read_dir(p).unwrap() {
                walk(base, &e.unwrap().path(), out);
            }
        } else {
            out.insert(rel, ('f', mode, fs::read(p).unwrap()));
        }
    }
    walk(root, root, &mut out);
    out
}

fn tar_of(dir: &Path, name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(name, dir).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_round_trip() {
    let h = support::start().await;
    let src = h.path("src/tree");
    make_tree(&src);
    let archive = tar_of(&src, "tree");
    let dest = h.path("guest/dest");
    let done = h
        .client
        .put_tar(dest.to_str().unwrap(), &archive[..])
        .await
        .unwrap();
    assert!(done.entries >= 10, "{done:?}");
    assert_eq!(done.bytes, archive.len() as u64);
    assert_eq!(
        snapshot(&src),
        snapshot(&dest.join("tree")),
        "put preserved the tree"
    );

    let mut reader = h
        .client
        .get_tar(dest.join("tree").to_str().unwrap())
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
        .await
        .unwrap();
    let back = h.path("back");
    fs::create_dir_all(&back).unwrap();
    let mut ar = tar::Archive::new(&got[..]);
    ar.set_preserve_permissions(true);
    ar.unpack(&back).unwrap();
    assert_eq!(
        snapshot(&src),
        snapshot(&back.join("tree")),
        "get preserved the tree"
    );

    // A single file comes back under its own name.
    let mut reader = h
        .client
        .get_tar(src.join("plain.txt").to_str().unwrap())
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
        .await
        .unwrap();
    let mut ar = tar::Archive::new(&got[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["plain.txt"]);

    let err = h.client.get_tar("/no/such/path/wick").await.unwrap_err();
    assert!(err.to_string().contains("/no/such/path/wick"), "{err}");
    let err = h
        .client
        .put_tar("relative/dir", &archive[..])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");

    // Make the read-only dir removable for TempDir cleanup.
    for d in [src.join("ro"), dest.join("tree/ro"), back.join("tree/ro")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A tar with raw entry names (the tar crate's builder refuses unsafe ones).
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> Self {
        RawTar(Vec::new())
    }

    fn entry(mut self, name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        {
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_refuses_escapes() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let h = support::start().await;
    let dest = h.path("dest");
    let outside = h.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("file"), b"original").unwrap();
    let d = dest.to_str().unwrap();
    let abs_target = format!("/etc/wick-agent-test-{}", std::process::id());

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            RawTar::new().entry("../x", Regular, None, b"evil").finish(),
        ),
        (
            "nested dot-dot",
            RawTar::new()
                .entry("a/../../x", Regular, None, b"evil")
                .finish(),
        ),
        (
            "absolute",
            RawTar::new()
                .entry(&abs_target, Regular, None, b"evil")
                .finish(),
        ),
        (
            "write through symlink",
            RawTar::new()
                .entry("esc", Symlink, Some(outside.to_str().unwrap()), b"")
                .entry("esc/pwned", Regular, None, b"evil")
                .finish(),
        ),
        (
            "dir through symlink",
            RawTar::new()
                .entry("esc2", Symlink, Some(outside.to_str().unwrap()), b"")
                .entry("esc2/newdir/", Directory, None, b"")
                .finish(),
        ),
        (
            "hard link outside",
            RawTar::new()
                .entry("h", Link, Some("../outside/file"), b"")
                .finish(),
        ),
        (
            "absolute hard link",
            RawTar::new()
                .entry(
                    "h2",
                    Link,
                    Some(outside.join("file").to_str().unwrap()),
                    b"",
                )
                .finish(),
        ),
    ];
    for (what, archive) in cases {
        let err = h.client.put_tar(d, &archive[..]).await.unwrap_err();
        let msg = err.to_string();
        eprintln!("{what}: {msg}");
        assert!(matches!(err, AgentError::Remote { .. }), "{what}: {msg}");
        assert!(
            msg.contains("refusing") || msg.contains("outside"),
            "{what}: {msg}"
        );
    }
    assert!(!h.path("x").exists());
    assert!(!Path::new(&abs_target).exists());
    assert!(!outside.join("pwned").exists());
    assert!(!outside.join("newdir").exists());
    assert_eq!(fs::read(outside.join("file")).unwrap(), b"original");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);

    // A symlink to an outside file, then a regular file of the same name: the link is replaced,
    // the outside file is untouched.
    let archive = RawTar::new()
        .entry(
            "f",
            Symlink,
            Some(outside.join("file").to_str().unwrap()),
            b"",
        )
        .entry("f", Regular, None, b"inside")
        .finish();
    h.client.put_tar(d, &archive[..]).await.unwrap();
    assert_eq!(fs::read(outside.join("file")).unwrap(), b"original");
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"inside");
    assert!(!fs::symlink_metadata(dest.join("f"))
        .unwrap()
        .file_type()
        .is_symlink());

    // Garbage is an error, not a hang.
    let err = h.client.put_tar(d, &[7u8; 4096][..]).await.unwrap_err();
    assert!(err.to_string().contains("unpacking"), "{err}");
    // The agent still serves.
    h.client.hello().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_lists_a_test_listener() {
    let h = support::start().await;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ports = h.client.ports().await.unwrap();
    let p = ports
        .iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("port {port} missing from {ports:?}"));
    assert_eq!(p.proto, "tcp");
    assert_eq!(p.address.to_string(), "127.0.0.1");
    assert_eq!(p.pid, Some(std::process::id()), "{p:?}");
    assert!(p.process.as_deref().is_some_and(|n| !n.is_empty()));
    drop(l);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fields_present() {
    let h = support::start().await;
    let hl = h.client.health().await.unwrap();
    assert!(hl.uptime_secs > 0.0);
    assert_eq!(hl.boot_id, h.client.agent_info().boot_id);
    assert!(hl.mem_total_bytes > 0 && hl.mem_available_bytes > 0);
    assert!(hl.mem_available_bytes <= hl.mem_total_bytes);
    assert!(hl.root_fs_total_bytes > 0);
    assert!(hl.load.iter().all(|l| *l >= 0.0));
}

/// A host key pair as wickd sends it (the agent does not parse key material).
fn host_key(n: u8) -> HostKey {
    HostKey {
        kind: "ed25519".into(),
        private: format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nkey{n}\n-----END OPENSSH PRIVATE KEY-----\n"
        ),
        public: format!("ssh-ed25519 AAAAkey{n} root@wick-test-vm"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_writes_below_the_root_prefix() {
    let h = support::start().await;
    let host_name_before = nix::unistd::gethostname().unwrap();
    let root = &h.root;
    fs::create_dir_all(root.join("etc/ssh")).unwrap();
    fs::create_dir_all(root.join("root/.ssh")).unwrap();
    fs::write(
        root.join("root/.ssh/authorized_keys"),
        "ssh-ed25519 AAAAuser mine\n",
    )
    .unwrap();
    let cfg = Configure {
        hostname: Some("wick-test-vm".into()),
        network: Some(NetworkConfig {
            ip_cidr: "172.30.0.5/24".into(),
            gateway: Some("172.30.0.1".parse().unwrap()),
            dns: vec!["172.30.0.1".parse().unwrap()],
        }),
        authorized_keys: Some(vec!["ssh-ed25519 AAAAwick wick".into()]),
        git_name: Some("Wick Tester".into()),
        git_email: Some("tester@example.invalid".into()),
        files: vec![SyncFile {
            path: "/root/.config/tool/credentials".into(),
            mode: 0o600,
            contents: b"secret\x00\xff".to_vec(),
        }],
        regenerate_host_keys: false,
        host_keys: Some(vec![host_key(1)]),
        restored: None,
    };
    let r = h.client.configure(&cfg).await.unwrap();
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "wick-test-vm\n"
    );
    assert!(fs::read_to_string(root.join("etc/hosts"))
        .unwrap()
        .contains("127.0.1.1\twick-test-vm"));
    assert!(fs::read_to_string(root.join("etc/resolv.conf"))
        .unwrap()
        .contains("nameserver 172.30.0.1\n"));
    let keys = fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap();
    assert!(
        keys.contains("AAAAuser mine") && keys.contains("AAAAwick wick"),
        "{keys}"
    );
    let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("root/.ssh/authorized_keys"), 0o600);
    assert_eq!(mode("root/.ssh"), 0o700);
    assert_eq!(
        fs::read(root.join("root/.config/tool/credentials")).unwrap(),
        b"secret\x00\xff"
    );
    assert_eq!(mode("root/.config/tool/credentials"), 0o600);
    if have("git") {
        let g = fs::read_to_string(root.join("etc/gitconfig")).unwrap();
        assert!(
            g.contains("Wick Tester") && g.contains("tester@example.invalid"),
            "{g}"
        );
    } else {
        wick_testkit::skip(format_args!(
            "git not installed: skipping the git identity check"
        ));
        assert!(r.warnings.iter().any(|w| w.contains("git")));
    }
    // The host keys sent are installed (the agent never generates any) and reported.
    assert_eq!(
        fs::read_to_string(root.join("etc/ssh/ssh_host_ed25519_key")).unwrap(),
        host_key(1).private
    );
    assert_eq!(mode("etc/ssh/ssh_host_ed25519_key"), 0o600);
    assert_eq!(r.host_keys, [host_key(1).public]);
    assert!(r.warnings.iter().any(|w| w.contains("not live")), "{r:?}");

    // Idempotent: nothing changes the second time.
    let again = h.client.configure(&cfg).await.unwrap();
    assert!(again.changed.is_empty(), "{:?}", again.changed);
    assert_eq!(again.host_keys, r.host_keys);

    // New host keys replace the old ones; a Configure without keys keeps them.
    let next = Configure {
        host_keys: Some(vec![host_key(2)]),
        ..Default::default()
    };
    let r2 = h.client.configure(&next).await.unwrap();
    assert_eq!(r2.host_keys, [host_key(2).public]);
    let keep = h.client.configure(&Configure::default()).await.unwrap();
    assert_eq!(keep.host_keys, [host_key(2).public]);

    // Refusals: outside /root, `..`, through a symlink leading out.
    for path in ["/etc/passwd", "/root/../etc/passwd"] {
        let bad = Configure {
            files: vec![SyncFile {
                path: path.into(),
                mode: 0o644,
                contents: b"x".to_vec(),
            }],
            ..Default::default()
        };
        let err = h.client.configure(&bad).await.unwrap_err();
        assert!(err.to_string().contains(path), "{err}");
    }
    let outside = h.path("outside");
    fs::create_dir_all(&outside).unwrap();
    symlink(&outside, root.join("root/evil")).unwrap();
    let bad = Configure {
        files: vec![SyncFile {
            path: "/root/evil/x".into(),
            mode: 0o644,
            contents: b"x".to_vec(),
        }],
        ..Default::default()
    };
    let err = h.client.configure(&bad).await.unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!outside.join("x").exists());
    let err = h
        .client
        .configure(&Configure {
            hostname: Some("bad_name!".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid hostname"), "{err}");

    assert_eq!(nix::unistd::gethostname().unwrap(), host_name_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_replies_before_acting() {
    let h = support::start().await;
    let r = h.client.shutdown(true).await.unwrap();
    assert_eq!(r.action, "none", "poweroff is disabled by --no-poweroff");
    // Still serving.
    h.client.hello().await.unwrap();
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.agent_pid() as i32), None).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_child_holding_stdout_does_not_hang_the_exec() {
    let h = support::start().await;
    let start = std::time::Instant::now();
    let out = h
        .client
        .exec(sh("sleep 30 & echo $!"))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let bg: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(bg), nix::sys::signal::SIGKILL);
    // Not a timing measurement: only proof that the exec did not wait for the 30 s sleep.
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_versions_are_refused_by_name() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wick_agent_proto::{read_frame, write_json, Envelope, FrameKind, Request};
    let h = support::start().await;
    let ask = |req: Request| {
        let vsock = h.vsock.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&vsock).await.unwrap();
            s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
                .await
                .unwrap();
            let mut line = Vec::new();
            loop {
                let b = s.read_u8().await.unwrap();
                if b == b'\n' {
                    break;
                }
                line.push(b);
            }
            assert!(line.starts_with(b"OK "), "{line:?}");
            let env = Envelope {
                protocol: PROTOCOL_VERSION + 1,
                request: req,
            };
            write_json(&mut s, FrameKind::Request, &env).await.unwrap();
            let f = read_frame(&mut s).await.unwrap().unwrap();
            assert_eq!(f.kind, FrameKind::Reply);
            String::from_utf8(f.payload.to_vec()).unwrap()
        }
    };
    let refused = ask(Request::Ports).await;
    assert!(
        refused.contains("\"Err\"") && refused.contains("protocol version"),
        "{refused}"
    );
    // Hello is still answered, so the host can name both versions.
    let hello = ask(Request::Hello).await;
    assert!(
        hello.contains("\"Ok\"") && hello.contains("protocol_version"),
        "{hello}"
    );
}
