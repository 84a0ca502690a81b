//! VMM containment (issue #9, defects 16–17) with the real `wickd` and `wick` and the fake
//! Firecracker: every VMM runs as its VM's own uid in a limited cgroup, and nothing (cgroup,
//! uid lease, uid-owned file) outlives a stop, a delete or a crash. Needs root.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde_json::Value;
use wick_host::cgroup::{Cgroups, Limits};
use wick_testkit::inspect::{owned_by, ProcStatus};
use wick_testkit::wickd::WickdEnv;

fn root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("{test}: needs root"));
        false
    }
}

fn cgroups(test: &str) -> Option<Cgroups> {
    match Cgroups::detect() {
        Ok(c) => Some(c),
        Err(e) => {
            wick_testkit::skip(format_args!("{test}: {e}"));
            None
        }
    }
}

fn vm(env: &WickdEnv, name: &str) -> Value {
    env.wick_json(&["vm", "show", name])
}

fn vmm_pid(v: &Value) -> u32 {
    v["runtime"]["vmm"]["pid"].as_u64().expect("vmm pid") as u32
}

fn jail(v: &Value) -> (u32, String) {
    let j = &v["runtime"]["jail"];
    (
        j["uid"].as_u64().unwrap_or_else(|| panic!("no jail: {v}")) as u32,
        j["cgroup"].as_str().unwrap().to_string(),
    )
}

/// `Uid:`/`Gid:` of `/proc/<pid>/status`: (real, effective, saved, fs) each.
fn ids(pid: u32) -> (Vec<u32>, Vec<u32>, String) {
    let st = ProcStatus::of(pid);
    (
        st.ids("Uid:"),
        st.ids("Gid:"),
        st.line("NoNewPrivs:").to_string(),
    )
}

fn gone(c: &Cgroups, rel: &str) -> bool {
    c.dirs(rel).iter().all(|d| !d.exists())
}

#[test]
fn vmm_runs_as_its_own_uid_in_a_limited_cgroup_and_leaves_nothing() {
    let t = "vmm_runs_as_its_own_uid_in_a_limited_cgroup_and_leaves_nothing";
    if !root(t) {
        return;
    }
    let Some(cg) = cgroups(t) else { return };
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&[
        "vm", "create", "--name", "c1", "--vcpu", "2", "--memory", "300M",
    ]);
    env.wick_ok(&["vm", "create", "--name", "c2"]);
    let v = vm(&env, "c1");
    let (uid, rel) = jail(&v);
    let (uid2, rel2) = jail(&vm(&env, "c2"));
    assert_ne!(uid, uid2, "one uid per VM");
    assert_ne!(rel, rel2);
    assert!(
        uid >= 1_900_000_000,
        "from the default vmm_uid_range: {uid}"
    );
    assert!(
        rel.ends_with(&format!("/vm-{}", &v["id"].as_str().unwrap()[..12])),
        "{rel}"
    );

    let pid = vmm_pid(&v);
    let (u, g, nnp) = ids(pid);
    assert_eq!(u, vec![uid; 4], "VMM uid (real, effective, saved, fs)");
    assert_eq!(g, vec![uid; 4], "VMM gid");
    assert_eq!(nnp, "NoNewPrivs:\t1");
    assert!(cg.pids(&rel).contains(&pid), "VMM in its cgroup");
    assert_eq!(
        cg.read_limits(&rel).unwrap(),
        Limits::for_vm(2, 300, 512, 1024),
        "cpu quota = vcpu, memory = guest + 512 MiB, pids"
    );
    let dir = PathBuf::from(v["runtime"]["dir"].as_str().unwrap());
    let m = std::fs::metadata(&dir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o700), "VM dir");
    let disk = v["runtime"]["root_disk"].as_str().unwrap();
    assert_eq!(std::fs::metadata(disk).unwrap().uid(), uid, "root disk");
    let kernel = std::fs::metadata(dir.join("boot/vmlinux")).unwrap();
    assert_eq!(kernel.uid(), 0, "the shared kernel stays root's");
    assert_eq!(kernel.mode() & 0o022, 0, "and read-only for the VMM uid");
    assert!(
        owned_by(&dir.parent().unwrap().join(v["id"].as_str().unwrap()), uid2).is_empty(),
        "no file of c1 belongs to c2's uid"
    );

    env.wick_ok(&["vm", "stop", "c1"]);
    let v = vm(&env, "c1");
    assert!(v["runtime"]["jail"].is_null(), "{v}");
    assert!(gone(&cg, &rel), "cgroup removed at stop");
    assert_eq!(owned_by(env.root(), uid), Vec::<PathBuf>::new());
    assert_eq!(
        std::fs::metadata(disk).unwrap().uid(),
        0,
        "disk back to root"
    );

    env.wick_ok(&["vm", "start", "c1"]);
    let (uid, rel) = jail(&vm(&env, "c1"));
    env.wick_ok(&["vm", "delete", "c1"]);
    env.wick_ok(&["vm", "delete", "c2"]);
    for (u, r) in [(uid, &rel), (uid2, &rel2)] {
        assert!(gone(&cg, r), "{r} removed at delete");
        assert_eq!(owned_by(env.root(), u), Vec::<PathBuf>::new());
    }
    let parent = rel.split('/').next().unwrap();
    assert!(gone(&cg, parent), "the parent goes with the last VM");
}

#[test]
fn crash_then_restart_leaves_no_cgroup_or_uid_file() {
    let t = "crash_then_restart_leaves_no_cgroup_or_uid_file";
    if !root(t) {
        return;
    }
    let Some(cg) = cgroups(t) else { return };
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "live"]);
    env.wick_ok(&["vm", "create", "--name", "gone"]);
    let live = vm(&env, "live");
    let dead = vm(&env, "gone");
    let (live_uid, live_cg) = jail(&live);
    let (dead_uid, dead_cg) = jail(&dead);
    let parent = live_cg.split('/').next().unwrap().to_string();

    env.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm_pid(&dead) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // A cgroup no VM records (e.g. a crash between making it and a record being dropped), with
    // a process in it.
    let orphan = format!("{parent}/vm-0000deadbeef");
    cg.create(&orphan, &Limits::for_vm(1, 16, 16, 16)).unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut sleeper = Kill(
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap(),
    );
    for f in cg.procs_files(&orphan) {
        std::fs::write(f, sleeper.0.id().to_string()).unwrap();
    }

    // A jailer chroot of a VM that no longer exists.
    let stray_jail = env.root().join("state/jail/firecracker/vm-0000deadbeef");
    std::fs::create_dir_all(stray_jail.join("root")).unwrap();

    env.start();
    assert!(gone(&cg, &orphan), "orphan cgroup swept");
    assert!(!stray_jail.exists(), "orphan jail swept");
    assert!(
        sleeper.0.try_wait().unwrap().is_some(),
        "its process was killed"
    );
    let d = vm(&env, "gone");
    assert_eq!(d["state"], "stopped", "{d}");
    assert!(d["runtime"]["jail"].is_null(), "{d}");
    assert!(
        gone(&cg, &dead_cg),
        "dead VM's cgroup released by reconcile"
    );
    assert_eq!(owned_by(env.root(), dead_uid), Vec::<PathBuf>::new());

    let l = vm(&env, "live");
    assert_eq!(l["state"], "running", "re-adopted: {l}");
    assert_eq!(jail(&l), (live_uid, live_cg.clone()), "keeps its jail");
    assert!(cg.pids(&live_cg).contains(&vmm_pid(&l)));

    env.wick_ok(&["vm", "delete", "live"]);
    env.wick_ok(&["vm", "delete", "gone"]);
    assert!(gone(&cg, &live_cg));
    assert!(gone(&cg, &parent), "nothing left under {parent}");
    assert_eq!(owned_by(env.root(), live_uid), Vec::<PathBuf>::new());
}

#[test]
fn containment_can_be_switched_off() {
    let t = "containment_can_be_switched_off";
    if !root(t) {
        return;
    }
    let mut env = WickdEnv::new("contain_vmm = false");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "open"]);
    let v = vm(&env, "open");
    assert!(v["runtime"]["jail"].is_null(), "{v}");
    assert_eq!(
        ids(vmm_pid(&v)).0,
        vec![0; 4],
        "unconfined VMM runs as root"
    );
    env.wick_ok(&["vm", "delete", "open"]);
}

#[test]
fn bad_containment_config_is_refused_by_name() {
    for (cfg, key) in [
        ("vmm_uid_range = \"0-10\"", "vmm_uid_range"),
        ("vmm_uid_range = \"5000\"", "vmm_uid_range"),
        ("cgroup_parent = \"../x\"", "cgroup_parent"),
    ] {
        let env = WickdEnv::new(cfg);
        let out = std::process::Command::new(wick_testkit::cargo_bin("wickd"))
            .arg("--root")
            .arg(env.root())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cfg}: {text}");
        assert!(text.contains(key), "{cfg}: {text}");
    }
}

/// A QEMU config (TCG) on the fake image; `None` when QEMU or its sidecar is missing.
fn qemu_env(t: &str, extra: &str) -> Option<WickdEnv> {
    for bin in ["qemu-system-x86_64"] {
        if std::process::Command::new(bin)
            .arg("--version")
            .output()
            .is_err()
        {
            wick_testkit::skip(format_args!(
                "{t}: {bin} is not installed (./scripts/install-host-deps)"
            ));
            return None;
        }
    }
    let env = WickdEnv::new("");
    let img = env.root().join("img");
    let cfg = format!(
        "vmm = \"qemu\"\naccel = \"tcg\"\nboot_timeout = \"10s\"\nstop_timeout = \"2s\"\n{extra}\n\n\
         [images.default]\nrootfs = {:?}\nkernel = {:?}\n",
        img.join("rootfs.ext4"),
        img.join("vmlinux")
    );
    std::fs::write(env.root().join("config.toml"), cfg).unwrap();
    Some(env)
}

#[test]
fn require_kvm_refuses_tcg_with_a_clear_error_and_leaves_nothing() {
    let t = "require_kvm_refuses_tcg_with_a_clear_error_and_leaves_nothing";
    if !root(t) {
        return;
    }
    let Some(cg) = cgroups(t) else { return };
    let parent = format!("wick-rk-{}", std::process::id());
    let Some(mut env) = qemu_env(
        t,
        &format!("require_kvm = true\ncgroup_parent = {parent:?}"),
    ) else {
        return;
    };
    env.start();
    let out = env.wick(&["vm", "create", "--name", "k1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("require_kvm = true")
            && err.contains("TCG")
            && err.contains("security boundary"),
        "{err}"
    );
    let v = vm(&env, "k1");
    assert_eq!(v["state"], "error", "{v}");
    assert!(
        v["runtime"]["vmm"].is_null() && v["runtime"]["jail"].is_null(),
        "{v}"
    );
    let left: Vec<u32> = env
        .processes()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu") || c.contains("vsock-mux")
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(left.is_empty(), "no QEMU or sidecar left: {left:?}");
    assert!(gone(&cg, &parent), "no cgroup left");
}

#[test]
fn doctor_warns_that_tcg_is_not_a_security_boundary() {
    let t = "doctor_warns_that_tcg_is_not_a_security_boundary";
    if !root(t) {
        return;
    }
    let Some(mut env) = qemu_env(t, "") else {
        return;
    };
    env.start();
    let out = env.wick(&["doctor", "--json"]);
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = rep["checks"].as_array().unwrap();
    let iso = checks
        .iter()
        .find(|c| c["area"] == "vmm" && c["name"] == "isolation")
        .unwrap_or_else(|| panic!("no isolation check: {rep}"));
    assert_eq!(iso["status"], "warn", "{iso}");
    assert!(
        iso["detail"]
            .as_str()
            .unwrap()
            .contains("security boundary"),
        "{iso}"
    );
    let c = checks
        .iter()
        .find(|c| c["area"] == "contain")
        .unwrap_or_else(|| panic!("no contain check: {rep}"));
    assert_eq!(c["status"], "pass", "{c}");
}

/// A VMM that escaped its guest owns its VM dir: it can put a symlink to another VM's socket in
/// place of its own. wickd connects to VM sockets without following a link, so it never drives
/// (or opens the agent of) the other VM through such a link.
#[test]
fn a_vmm_cannot_point_wickd_at_another_vms_sockets() {
    if !root("a_vmm_cannot_point_wickd_at_another_vms_sockets") {
        return;
    }
    let mut env =
        WickdEnv::new_with_image_extra(wick_testkit::wickd::FAKE_AGENT_CONFIG, "agent = true")
            .with_real_agent();
    env.start();
    env.wick_ok(&["vm", "create", "--name", "evil"]);
    env.wick_ok(&["vm", "create", "--name", "other"]);
    let (evil, other) = (vm(&env, "evil"), vm(&env, "other"));
    for key in ["vsock_socket", "api_socket"] {
        let mine = PathBuf::from(evil["runtime"]["vmm"][key].as_str().unwrap());
        let theirs = PathBuf::from(other["runtime"]["vmm"][key].as_str().unwrap());
        std::fs::rename(&mine, mine.with_extension("moved")).unwrap();
        std::os::unix::fs::symlink(&theirs, &mine).unwrap();
    }
    let out = env.wick(&["vm", "exec", "evil", "--", "echo", "reached"]);
    let text = wick_testkit::wickd::output_text(&out);
    assert!(!out.status.success() && !text.contains("reached"), "{text}");
    assert!(text.contains("not a socket"), "{text}");
    let out = env.wick(&["vm", "pause", "evil"]);
    assert!(!out.status.success(), "pause went through the link");
    assert_eq!(vm(&env, "other")["state"], "running");
    let out = env.wick(&["vm", "exec", "other", "--", "echo", "alive"]);
    assert!(out.status.success(), "{out:?}");
    env.wick_ok(&["vm", "delete", "evil", "other"]);
}

/// A VMM that escaped its guest owns its VM dir while it runs: it can replace its work disk
/// with a hard link to a host file (where `fs.protected_hardlinks` allows). The next start must
/// not hand that file to the next VMM uid.
#[test]
fn a_hard_link_left_in_the_vm_dir_is_not_handed_to_the_next_vmm() {
    let t = "a_hard_link_left_in_the_vm_dir_is_not_handed_to_the_next_vmm";
    if !root(t) {
        return;
    }
    let mut env = WickdEnv::new("");
    env.start();
    env.wick_ok(&["vm", "create", "--name", "h1"]);
    env.wick_ok(&["vm", "stop", "h1"]);
    let v = vm(&env, "h1");
    let work = PathBuf::from(v["runtime"]["work_disk"].as_str().unwrap());
    let host_file = env.root().join("host-secret");
    std::fs::write(&host_file, b"root only").unwrap();
    std::fs::remove_file(&work).unwrap();
    std::fs::hard_link(&host_file, &work).unwrap();
    let out = env.wick(&["vm", "start", "h1"]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "started with a planted link");
    assert!(text.contains("one link"), "{text}");
    let m = std::fs::metadata(&host_file).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0), "the host file stays root's");
    env.wick_ok(&["vm", "delete", "h1"]);
}
