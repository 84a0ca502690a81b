//! End to end with a real guest: QEMU (TCG) boots the Debian cloud kernel through wick-init
//! into the golden image, wick-agent comes up over its virtio-serial channel (through the
//! `wickd vsock-mux` sidecar), and the VM is used for real — inside a private network namespace.
//! Skipped (with the reason) where QEMU, the Debian mirror or root are missing.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::guest::guest_assets;
use wick_testkit::inspect::{owned_by, ProcStatus};
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, counter, exec};

fn links(env: &WickdEnv) -> Vec<String> {
    let j: Value = serde_json::from_str(&env.ns_run("ip", &["-j", "link", "show"])).unwrap();
    j.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("wk-"))
        .collect()
}

/// QEMU and its sidecar run as the VM's own uid (never root) in the VM's cgroup with the
/// spec's limits, and the TCG warning is on the record: (uid, cgroup).
fn assert_contained(env: &WickdEnv, vm: &Value) -> (u32, String) {
    let uid = vm["runtime"]["jail"]["uid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no jail: {vm}")) as u32;
    let cgroup = vm["runtime"]["jail"]["cgroup"]
        .as_str()
        .unwrap()
        .to_string();
    let qemu = vm["runtime"]["vmm"]["pid"].as_u64().unwrap();
    let sidecar = vm["runtime"]["vmm"]["sidecars"][0]["pid"].as_u64().unwrap();
    for pid in [qemu, sidecar] {
        let uids = ProcStatus::of(pid as u32).ids("Uid:");
        assert_eq!(uids, vec![uid; 4], "pid {pid}: {uids:?}");
    }
    match wick_host::cgroup::Cgroups::detect() {
        Ok(cg) => {
            let members = cg.pids(&cgroup);
            assert!(
                members.contains(&(qemu as u32)) && members.contains(&(sidecar as u32)),
                "{members:?}"
            );
            let l = cg.read_limits(&cgroup).unwrap();
            let vcpu = vm["spec"]["vcpu"].as_u64().unwrap();
            let mem = vm["spec"]["memory_mib"].as_u64().unwrap();
            assert_eq!(l.cpu_quota_us, vcpu * 100_000);
            assert_eq!(l.memory_bytes, (mem + 512) << 20);
            assert_eq!(l.pids_max, 1024);
        }
        Err(e) => wick_testkit::skip(format_args!("cgroup limits not read back: {e}")),
    }
    assert_eq!(vm["runtime"]["accel"], "tcg", "{vm}");
    assert!(
        vm["runtime"]["isolation_warning"]
            .as_str()
            .is_some_and(|w| w.contains("not treat as a security boundary")),
        "{vm}"
    );
    let out = env.wick(&["vm", "show", vm["name"].as_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: this guest runs under QEMU's TCG"),
        "vm show warns"
    );
    (uid, cgroup)
}

/// `runtime.host_keys` as (type, base64) pairs, sorted.
fn recorded_host_keys(vm: &Value) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = vm["runtime"]["host_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let mut w = k.as_str().unwrap().split_whitespace();
            (w.next().unwrap().into(), w.next().unwrap().into())
        })
        .collect();
    keys.sort();
    keys
}

/// The host keys sshd serves on `ip:22` (`ssh-keyscan` from the daemon's namespace; sshd is
/// started without waiting for it, so this retries for a while), as (type, base64), sorted.
fn served_host_keys(env: &WickdEnv, ip: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = env
            .in_netns("ssh-keyscan".into())
            .args(["-T", "5", ip])
            .output()
            .unwrap();
        let mut keys: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() >= 3).then(|| (w[1].to_string(), w[2].to_string()))
            })
            .collect();
        if !keys.is_empty() || Instant::now() > deadline {
            keys.sort();
            return keys;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn real_guest_end_to_end() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();

    // A fake upstream behind the daemon's namespace, for NAT.
    let up = env.upstream();
    let listener = up.listen("198.51.100.2:8080".parse().unwrap()).unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let peer = s
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = s.write_all(peer.as_bytes());
        }
    });

    let t = Instant::now();
    let out = env.wick(&[
        "vm",
        "create",
        "--name",
        "g1",
        "--memory",
        "1G",
        "--disk-size",
        "2G",
        "--nat",
        "--publish",
        "127.0.0.1:18000:8000",
    ]);
    let created = t.elapsed();
    if !out.status.success() {
        let log = env.wick(&["vm", "logs", "g1"]);
        panic!(
            "create failed: {}\n--- vm log ---\n{}\n--- daemon ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&log.stdout),
            env.daemon_log()
        );
    }
    eprintln!("create → agent ready and configured: {created:?}");
    let g1 = env.wick_json(&["vm", "show", "g1"]);
    let vm_dir = g1["runtime"]["dir"].as_str().unwrap().to_string();
    let (jail_uid, cgroup) = assert_contained(&env, &g1);

    let (code, uname) = exec(&env, "g1", &["uname", "-r"]);
    assert_eq!(code, 0);
    assert!(uname.contains("cloud-amd64"), "guest kernel: {uname}");
    assert_eq!(
        exec(&env, "g1", &["sh", "-c", "exit 7"]).0,
        7,
        "exit code passes through"
    );
    assert_eq!(exec(&env, "g1", &["hostname"]).1.trim(), "g1");
    let (_, mnt) = exec(&env, "g1", &["findmnt", "-n", "-o", "SOURCE", "/root"]);
    assert!(mnt.contains("vdb"), "/root is the work disk: {mnt}");

    // Real OpenSSH with wick's key and pinned host keys.
    let out = env.wick(&["vm", "ssh", "g1", "--", "true"]);
    assert!(
        out.status.success(),
        "vm ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The host key sshd serves is the one wickd made and recorded (not one the guest chose),
    // and it is the guest's only host key.
    let ip = g1["runtime"]["ip"].as_str().unwrap().to_string();
    let recorded = recorded_host_keys(&g1);
    assert_eq!(
        served_host_keys(&env, &ip),
        recorded,
        "ssh-keyscan vs runtime.host_keys"
    );
    let (_, files) = exec(&env, "g1", &["sh", "-c", "ls /etc/ssh | grep ^ssh_host_"]);
    assert_eq!(
        files.split_whitespace().collect::<Vec<_>>(),
        ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    );

    // `ssh g1.vm` after `wick ssh-config --install`, with no host DNS for `.vm` (this netns
    // has no resolver that knows it): the ProxyCommand goes through wick.
    let home = tempfile::tempdir().unwrap();
    let out = env
        .wick_cmd()
        .env("HOME", home.path())
        .args(["ssh-config", "--install"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .in_netns("ssh".into())
        .env("HOME", home.path())
        .env_remove("WICK_ROOT")
        .stdin(std::process::Stdio::null())
        .args(["-F"])
        .arg(env.root().join("ssh_config"))
        .args(["-o", "BatchMode=yes", "g1.vm", "hostname"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh g1.vm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "g1");

    // vm cp round trip.
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("sub/bin"), (0..=255u8).collect::<Vec<_>>()).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    env.wick_ok(&["vm", "cp", src.to_str().unwrap(), "g1:/root/copied"]);
    let back = host.path().join("back");
    env.wick_ok(&["vm", "cp", "g1:/root/copied", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(back.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        std::fs::read(back.join("sub/bin")).unwrap(),
        (0..=255u8).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap().to_str(),
        Some("a.txt")
    );

    // A guest HTTP server on 8000: listed by vm ports, reachable through --publish.
    let server = r#"setsid perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8000,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){<$c>; print $c "HTTP/1.0 200 OK\r\n\r\nhello from g1\n"; close $c}' >/dev/null 2>&1 < /dev/null &"#;
    assert_eq!(exec(&env, "g1", &["sh", "-c", server]).0, 0);
    let mut ports = Value::Null;
    for _ in 0..50 {
        ports = env.wick_json(&["vm", "ports", "g1"]);
        if ports.to_string().contains("8000") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ports.to_string().contains("8000"), "vm ports: {ports}");
    let dn = env.netns.as_ref().unwrap();
    let mut s = dn
        .connect("127.0.0.1:18000".parse().unwrap(), Duration::from_secs(5))
        .expect("publish");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("hello from g1"), "{body}");

    // NAT: the guest reaches the upstream, which sees the masqueraded address.
    let (code, seen) = exec(
        &env,
        "g1",
        &["bash", "-c", "exec 3<>/dev/tcp/198.51.100.2/8080; cat <&3"],
    );
    assert_eq!((code, seen.trim()), (0, "198.51.100.1"), "NAT");

    // Data in /root survives stop/start.
    assert_eq!(
        exec(&env, "g1", &["sh", "-c", "echo kept > /root/proof && sync"]).0,
        0
    );
    let t = Instant::now();
    env.wick_ok(&["vm", "stop", "g1"]);
    eprintln!("stop (agent poweroff): {:?}", t.elapsed());
    env.wick_ok(&["vm", "start", "g1"]);
    let (code, proof) = exec(&env, "g1", &["cat", "/root/proof"]);
    assert_eq!(
        (code, proof.trim()),
        (0, "kept"),
        "data in /root survives stop/start"
    );
    // The host key is kept across stop/start, pinned and served.
    assert_eq!(
        recorded_host_keys(&env.wick_json(&["vm", "show", "g1"])),
        recorded
    );
    assert_eq!(
        served_host_keys(&env, &ip),
        recorded,
        "host key after restart"
    );

    // wickd dies (kill -9) and comes back: QEMU and its agent-channel sidecar keep running, are
    // re-adopted, and the agent answers through the same sidecar.
    let sidecar = env.wick_json(&["vm", "show", "g1"])["runtime"]["vmm"]["sidecars"][0]["pid"]
        .as_u64()
        .unwrap();
    env.kill9();
    env.start();
    let v = env.wick_json(&["vm", "show", "g1"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(
        v["runtime"]["vmm"]["sidecars"][0]["pid"].as_u64(),
        Some(sidecar)
    );
    assert_eq!(
        exec(&env, "g1", &["echo", "re-adopted"]),
        (0, "re-adopted\n".to_string())
    );

    // Delete leaves no process, TAP, rule, socket or file behind.
    env.wick_ok(&["vm", "delete", "g1"]);
    assert!(env.vmm_processes().is_empty());
    let daemon = env.daemon.as_ref().map(|d| d.id());
    let procs: Vec<u32> = env
        .processes()
        .into_iter()
        .filter(|p| Some(*p) != daemon)
        .collect();
    assert!(procs.is_empty(), "left over processes: {procs:?}");
    assert!(links(&env).is_empty(), "{:?}", links(&env));
    let rules = env.ns_run("nft", &["list", "ruleset"]);
    assert!(!rules.contains("vm-"), "{rules}");
    assert!(!std::path::Path::new(&vm_dir).exists(), "VM dir removed");
    if let Ok(cg) = wick_host::cgroup::Cgroups::detect() {
        assert!(
            cg.dirs(&cgroup).iter().all(|d| !d.exists()),
            "cgroup removed"
        );
    }
    assert!(
        owned_by(env.root(), jail_uid).is_empty(),
        "no file of the VMM uid is left: {:?}",
        owned_by(env.root(), jail_uid)
    );
    assert!(env
        .netns
        .as_ref()
        .unwrap()
        .connect(
            "127.0.0.1:18000".parse().unwrap(),
            Duration::from_millis(500)
        )
        .is_err());
    drop(up);
}

/// A real repository the test builds: history, a binary file, a symlink, an ignored file, an
/// untracked file.
fn make_repo(dir: &std::path::Path) {
    let git = |args: &[&str]| {
        let st = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    };
    std::fs::create_dir_all(dir).unwrap();
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README"), "one\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "first"]);
    std::fs::write(
        dir.join("bin.dat"),
        (0..=255u8).cycle().take(4096).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("README", dir.join("link")).unwrap();
    std::fs::write(dir.join("README"), "one\ntwo\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "second"]);
    std::fs::write(dir.join("debug.log"), "ignored\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "untracked\n").unwrap();
}

#[test]
fn vm_run_and_workspace_round_trip_on_a_real_guest() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    let host = tempfile::tempdir().unwrap();
    let repo = host.path().join("repo");
    make_repo(&repo);
    let repo_s = repo.to_str().unwrap();

    // vm run: the command's exit code becomes wick's; the VM stays.
    let t = Instant::now();
    let out = env.wick(&[
        "vm",
        "run",
        "--name",
        "r1",
        "--memory",
        "1G",
        "--disk-size",
        "2G",
        repo_s,
        "--",
        "sh",
        "-c",
        "test -f README && test -L link && exit 3",
    ]);
    eprintln!("vm run (create + prepare + command): {:?}", t.elapsed());
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r1 = env.wick_json(&["vm", "show", "r1"]);
    assert_eq!(r1["state"], "running");
    assert_eq!(r1["spec"]["workspace"]["guest_path"], "/root/repo", "{r1}");

    // The guest edits, adds, deletes (text and binary) and commits part of it.
    let edit =
        "cd /root/repo && git config user.email g@example.invalid && git config user.name g \
        && printf 'three\\n' >> README && rm bin.dat && head -c 3000 /dev/urandom > new.bin \
        && echo added > added.txt && git add added.txt && git commit -q -m guest-commit \
        && chmod +x added.txt && ln -s added.txt link2";
    let (code, _) = exec(&env, "r1", &["sh", "-c", edit]);
    assert_eq!(code, 0);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&repo)
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let out = env.wick(&["vm", "workspace", "export", "r1", "--base-commit", &head]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let patch = out.stdout;
    // A clean host clone at the original HEAD, patched, reproduces the guest tree exactly.
    let clone = host.path().join("clone");
    let st = std::process::Command::new("git")
        .args(["clone", "-q", repo_s, clone.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(repo.join("../p.diff"), &patch).unwrap();
    let st = std::process::Command::new("git")
        .args([
            "apply",
            "--binary",
            repo.join("../p.diff").to_str().unwrap(),
        ])
        .current_dir(&clone)
        .status()
        .unwrap();
    assert!(st.success(), "git apply");
    let (_, guest_sums) = exec(&env, "r1", &["sh", "-c", "cd /root/repo && find . -path ./.git -prune -o \\( -type f -o -type l \\) -print | sort | while read f; do if [ -L \"$f\" ]; then echo \"$f -> $(readlink \"$f\")\"; else echo \"$f $(sha256sum < \"$f\" | cut -c1-16) $(stat -c %a \"$f\")\"; fi; done"]);
    let host_sums = std::process::Command::new("sh")
        .args(["-c", "cd \"$1\" && find . -path ./.git -prune -o \\( -type f -o -type l \\) -print | sort | while read f; do if [ -L \"$f\" ]; then echo \"$f -> $(readlink \"$f\")\"; else echo \"$f $(sha256sum < \"$f\" | cut -c1-16) $(stat -c %a \"$f\")\"; fi; done", "sh", clone.to_str().unwrap()])
        .output()
        .unwrap();
    // The host clone lacks the ignored file (never copied) and keeps the untracked one only if
    // copied; compare what export carries: tracked + untracked non-ignored in the guest.
    let host_sums = String::from_utf8_lossy(&host_sums.stdout).to_string();
    assert_eq!(host_sums, guest_sums, "host clone + patch == guest tree");

    // vm run --rm leaves nothing behind.
    let out = env.wick(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "r2",
        "--memory",
        "1G",
        "--disk-size",
        "2G",
        repo_s,
        "--",
        "true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = env.wick_json(&["vm", "list"]);
    let names: Vec<&str> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1"], "--rm deleted r2");
    env.wick_ok(&["vm", "delete", "r1"]);
    assert!(env.vmm_processes().is_empty());
    assert!(links(&env).is_empty());
}

/// Waits until the warm pool holds `n` ready VMs and nothing else (`vm list --all`): their ids.
fn wait_pool_ready(env: &WickdEnv, n: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let list = env.wick_json(&["vm", "list", "--all"]);
        let pool: Vec<&Value> = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["runtime"]["pool"].is_string())
            .collect();
        if pool.len() == n && pool.iter().all(|v| v["runtime"]["pool"] == "ready") {
            return pool
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect();
        }
        // Generous: on a loaded 2-core host a TCG boot may miss boot_timeout and be retried.
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "the pool never became ready: {list}\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A VM taken from the warm pool on a real guest: its hostname, `NAME.vm`, SSH host key
/// (pinned after the assignment) and `/root` are its own, and nothing of one pooled VM's
/// identity reaches the next.
#[test]
fn a_pooled_vm_gets_its_own_identity_on_a_real_guest() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let config = format!(
        "{}\n[pool]\nsize = 2\nmemory = \"1G\"\ndisk = \"2G\"\n",
        config(&assets)
    );
    let mut env = WickdEnv::with_config(&config);
    env.start();
    // Both taken from the first fill: nothing waits for a refill booting meanwhile.
    let pooled = wait_pool_ready(&env, 2);
    let mut seen = Vec::new();
    for name in ["p1", "p2"] {
        let t = Instant::now();
        let out = env.wick(&[
            "vm",
            "create",
            "--name",
            name,
            "--memory",
            "1G",
            "--disk-size",
            "2G",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}\n{}", env.daemon_log());
        eprintln!("pooled create → configured: {:?}", t.elapsed());
        assert!(stderr.contains("warm pool"), "{stderr}");
        let vm = env.wick_json(&["vm", "show", name]);
        let id = vm["id"].as_str().unwrap().to_string();
        assert!(pooled.contains(&id), "a pooled VM: {id} of {pooled:?}");
        assert!(
            seen.iter().all(|(i, _, _)| *i != id),
            "not handed out twice"
        );
        assert_eq!(vm["state"], "running");

        assert_eq!(exec(&env, name, &["hostname"]).1.trim(), name);
        let ip = vm["runtime"]["ip"].as_str().unwrap();
        let (code, hosts) = exec(&env, name, &["getent", "hosts", &format!("{name}.vm")]);
        assert_eq!(code, 0, "{name}.vm resolves in the guest");
        assert!(hosts.contains(ip), "{name}.vm is {ip}: {hosts}");

        // Host keys: made for this VM, recorded at assignment and pinned by `vm ssh`.
        let keys: Vec<String> = vm["runtime"]["host_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let (_, guest_key) = exec(&env, name, &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]);
        let blob = guest_key.split_whitespace().nth(1).unwrap().to_string();
        assert!(
            keys.iter().any(|k| k.contains(&blob)),
            "{keys:?} vs {guest_key}"
        );
        let out = env.wick(&["vm", "ssh", name, "--", "hostname"]);
        assert!(
            out.status.success(),
            "vm ssh with the pinned key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);

        // /root holds nothing of an earlier VM; leave a trace for the next one to look for.
        let (_, secret) = exec(
            &env,
            name,
            &["sh", "-c", "ls -A /root; cat /etc/machine-id"],
        );
        assert!(!secret.contains("from-p1"), "{secret}");
        assert_eq!(
            exec(&env, name, &["sh", "-c", "echo x > /root/from-p1 && sync"]).0,
            0
        );
        let machine_id = secret.lines().last().unwrap_or_default().to_string();
        seen.push((id, blob, machine_id));
        env.wick_ok(&["vm", "delete", name]);
    }
    assert_ne!(seen[0].1, seen[1].1, "host keys differ");
    assert_ne!(seen[0].2, seen[1].2, "machine ids differ");
}

/// Pause and resume on a real guest: a counter in the guest stands still while paused (QMP
/// `stop`) and runs on after resume (`cont`); guest sessions are refused while paused.
#[test]
fn pause_stops_the_guest_and_resume_continues_it_on_a_real_guest() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    let out = env.wick(&["vm", "create", "--name", "p1", "--memory", "1G"]);
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    let looped = "i=0; while :; do echo $i > /root/c; i=$((i+1)); sleep 0.2; done";
    let start = format!("nohup setsid sh -c '{looped}' >/dev/null 2>&1 &");
    assert_eq!(exec(&env, "p1", &["sh", "-c", &start]).0, 0);
    let t = Instant::now();
    while exec(&env, "p1", &["test", "-s", "/root/c"]).0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the counter never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The same wall-clock gap, running and then paused.
    const GAP: Duration = Duration::from_secs(4);
    let r0 = counter(&env, "p1");
    std::thread::sleep(GAP);
    let running = counter(&env, "p1") - r0;

    let p0 = counter(&env, "p1");
    let t = Instant::now();
    env.wick_ok(&["vm", "pause", "p1"]);
    let pause_latency = t.elapsed();
    assert_eq!(env.wick_json(&["vm", "show", "p1"])["state"], "paused");
    let (code, _) = exec(&env, "p1", &["true"]);
    assert_ne!(code, 0, "exec is refused while paused");
    std::thread::sleep(GAP);
    let t = Instant::now();
    env.wick_ok(&["vm", "resume", "p1"]);
    let resume_latency = t.elapsed();
    let paused = counter(&env, "p1") - p0;
    eprintln!(
        "counter over {GAP:?}: running +{running}, paused +{paused}; \
         wick vm pause {pause_latency:?}, wick vm resume {resume_latency:?}"
    );
    assert!(running >= 4, "the counter runs: +{running} in {GAP:?}");
    assert!(
        paused * 2 < running,
        "paused for {GAP:?} the counter barely moves: +{paused} against +{running} running"
    );

    // Running again.
    let a = counter(&env, "p1");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        counter(&env, "p1") > a,
        "the counter continues after resume"
    );
    // Paused across a wickd crash: re-adopted as paused (QMP query-status), then stopped
    // cleanly (resumed first, so the guest powers off).
    env.wick_ok(&["vm", "pause", "p1"]);
    let qemu = env.wick_json(&["vm", "show", "p1"])["runtime"]["vmm"]["pid"].clone();
    env.kill9();
    env.start();
    let p1 = env.wick_json(&["vm", "show", "p1"]);
    assert_eq!(p1["state"], "paused", "{p1}");
    assert_eq!(p1["runtime"]["vmm"]["pid"], qemu, "the same QEMU");
    let t = Instant::now();
    env.wick_ok(&["vm", "stop", "p1"]);
    eprintln!("stop of a paused guest: {:?}", t.elapsed());
    let log = env.wick_ok(&["vm", "logs", "p1"]);
    assert!(
        log.contains("reboot: Power down") || log.contains("Power-Off"),
        "a clean poweroff: {}",
        &log[log.len().saturating_sub(2000)..]
    );
    env.wick_ok(&["vm", "delete", "p1"]);
    assert!(links(&env).is_empty(), "no TAP left");
}

/// A forward HTTP proxy for the builder VM's apt, listening in the test's upstream namespace
/// and connecting out from the host's: only to `allowed` (the Debian mirror of the machine's
/// apt sources), every other host gets 403. Plain requests (absolute-form) and CONNECT.
fn mirror_proxy(listener: std::net::TcpListener, allowed: String) {
    fn one(mut c: std::net::TcpStream, allowed: &str) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
            if c.read(&mut b)? == 0 {
                return Ok(());
            }
            head.push(b[0]);
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let mut w = line.split_whitespace();
        let (method, target) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        let connect = method == "CONNECT";
        let authority = match connect {
            true => target.to_string(),
            false => target
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("")
                .into(),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(80)),
            None => (authority.clone(), 80u16),
        };
        if host != allowed {
            return c.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        }
        let mut up = std::net::TcpStream::connect((host.as_str(), port))?;
        match connect {
            true => c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?,
            false => up.write_all(&head)?,
        }
        let (mut c2, mut up2) = (c.try_clone()?, up.try_clone()?);
        let t = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut up2);
            let _ = up2.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut up, &mut c);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = t.join();
        Ok(())
    }
    for c in listener.incoming().flatten() {
        let allowed = allowed.clone();
        std::thread::spawn(move || one(c, &allowed));
    }
}

/// `image build --from` on a real guest: the builder VM (QEMU TCG, NAT to a proxy that reaches
/// only the Debian mirror) installs jq and runs a step; VMs of the new image have its file; the
/// identical build is a cache hit in under a second.
#[test]
fn derived_image_build_on_a_real_guest() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => return wick_testkit::skip(format_args!("{why}")),
    };
    let mirror = match wick_image::debian_mirror(None, wick_image::DEFAULT_SUITE) {
        Ok(m) => m,
        Err(e) => return wick_testkit::skip(format_args!("no Debian mirror: {e}")),
    };
    let host = mirror
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_string();
    let online = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 80))
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
    if !online {
        return wick_testkit::skip(format_args!("the Debian mirror {host} is not reachable"));
    }
    let deb = std::fs::read_dir(wick_image::testcache::cache_root().join("debian-kernel"))
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        });
    let (Some(deb), Ok(init)) = (deb, wick_testkit::guest::static_wick_init()) else {
        return wick_testkit::skip(format_args!("no cached kernel .deb or static wick-init"));
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.env
        .push(("WICK_INIT_BIN".into(), init.display().to_string()));
    env.start();
    let up = env.upstream();
    let listener = up.listen("198.51.100.2:3128".parse().unwrap()).unwrap();
    std::thread::spawn(move || mirror_proxy(listener, host));
    let work = tempfile::tempdir().unwrap();
    let proxy = work.path().join("proxy.conf");
    std::fs::write(&proxy, "Acquire::http::Proxy \"http://198.51.100.2:3128\";\nAcquire::https::Proxy \"http://198.51.100.2:3128\";\n").unwrap();
    env.wick_ok(&[
        "kernel",
        "import",
        deb.to_str().unwrap(),
        "--name",
        "default",
    ]);
    env.wick_ok(&[
        "image",
        "import",
        assets.rootfs.to_str().unwrap(),
        "--name",
        "base",
    ]);

    let copy = format!("{}:/etc/apt/apt.conf.d/99wick-test-proxy", proxy.display());
    let args = [
        "image",
        "build",
        "--from",
        "base",
        "--copy",
        &copy,
        "--packages",
        "jq",
        "--run",
        "jq --version > /etc/jq-version",
        "--run",
        "rm /etc/apt/apt.conf.d/99wick-test-proxy",
        "--name",
        "jq",
    ];
    let t = Instant::now();
    let out = env.wick(&args);
    let built = t.elapsed();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(out.status.success(), "{}\n{}", text(&out), env.daemon_log());
    eprintln!("bench: image build --from base --packages jq --run … (TCG): {built:?}");

    env.wick_ok(&[
        "vm", "create", "--image", "jq", "--name", "j1", "--memory", "1G",
    ]);
    let (code, version) = exec(&env, "j1", &["cat", "/etc/jq-version"]);
    assert_eq!(code, 0, "{version}");
    assert!(version.starts_with("jq-"), "{version}");
    assert_eq!(
        exec(
            &env,
            "j1",
            &["test", "-e", "/etc/apt/apt.conf.d/99wick-test-proxy"]
        )
        .0,
        1
    );
    env.wick_ok(&["vm", "delete", "j1"]);

    let t = Instant::now();
    let out = env.wick(&args);
    let hit = t.elapsed();
    eprintln!("bench: identical image build (cache hit): {hit:?} (first build {built:?})");
    assert!(
        out.status.success() && text(&out).contains("cache hit"),
        "{}",
        text(&out)
    );
    assert!(hit < Duration::from_secs(1), "cache hit took {hit:?}");
    let vms = env.wick_json(&["vm", "list"]);
    assert!(
        !vms.to_string().contains("build-"),
        "builder VM left: {vms}"
    );
}
