//! The warm pool (`[pool]`), with the real `wickd` and `wick`, the fake Firecracker fronting the
//! real `wick-agent`: matching creates take ready pool VMs (never the same one twice), the pool
//! refills, pool VMs are wickd's (hidden from lookups and from socket users), and a `kill -9`
//! with pooled VMs — or in the middle of an assignment — leaves the pool consistent and nothing
//! leaked. Needs root; skipped otherwise.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use wick_testkit::cargo_bin;
use wick_testkit::dns::query_a;
use wick_testkit::wickd::{WickdEnv, FAKE_AGENT_CONFIG};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        wick_testkit::skip(format_args!("needs root"));
        false
    }
}

/// A daemon with an agent image and `[pool] size = N`, extra config appended.
fn pool_env(size: u32, extra: &str, local_users: bool) -> WickdEnv {
    let config = format!("{FAKE_AGENT_CONFIG}\n{extra}\n[pool]\nsize = {size}\n");
    let mut env = if local_users {
        WickdEnv::for_local_users(&config, "agent = true")
    } else {
        WickdEnv::new_with_image_extra(&config, "agent = true")
    };
    env.env.push((
        "FAKE_FC_AGENT_BIN".into(),
        cargo_bin("wick-agent").display().to_string(),
    ));
    env
}

/// `vm list --all` entries that are the pool's (unassigned).
fn pool_vms(env: &WickdEnv) -> Vec<Value> {
    let list = env.wick_json(&["vm", "list", "--all"]);
    list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| matches!(v["runtime"]["pool"].as_str(), Some("ready" | "filling")))
        .cloned()
        .collect()
}

/// Ids of the pool's ready, running VMs.
fn ready_ids(env: &WickdEnv) -> HashSet<String> {
    pool_vms(env)
        .iter()
        .filter(|v| v["runtime"]["pool"] == "ready" && v["state"] == "running")
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the pool holds exactly `n` ready VMs and nothing else; returns their ids.
fn wait_pool(env: &WickdEnv, n: usize) -> HashSet<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = pool_vms(env);
        let ready = ready_ids(env);
        if ready.len() == n && all.len() == n {
            return ready;
        }
        assert!(
            Instant::now() < deadline,
            "pool never settled at {n} ready: {all:?}\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Unassigned pool VMs have no identity: no `<name>.vm` (the daemon's `dns_port` is 10053).
fn assert_pool_names_do_not_resolve(env: &WickdEnv) {
    let ns = env.netns.as_ref().unwrap();
    for v in pool_vms(env) {
        assert!(
            v["runtime"]["ip"].is_string(),
            "pool VMs have an address: {v}"
        );
        let name = format!("{}.vm", v["name"].as_str().unwrap());
        let got = query_a(ns, "127.0.0.1:10053".parse().unwrap(), &name);
        assert_eq!(
            got.map_err(|c| format!("{c:?}")),
            Err("NXDomain".into()),
            "{name}"
        );
    }
}

fn guest_root(v: &Value) -> PathBuf {
    let vsock = PathBuf::from(v["runtime"]["vmm"]["vsock_socket"].as_str().unwrap());
    vsock.parent().unwrap().join("guest-root")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn matching_creates_take_pool_vms_once_each_and_the_pool_refills() {
    if !root() {
        return;
    }
    let mut env = pool_env(2, "", false);
    env.start();
    let first = wait_pool(&env, 2);
    // Pool VMs are wickd's: not in `vm list`, not found by name, booted but unconfigured.
    let plain = env.wick_json(&["vm", "list"]);
    assert_eq!(plain["vms"].as_array().unwrap().len(), 0, "{plain}");
    for v in pool_vms(&env) {
        let name = v["name"].as_str().unwrap();
        assert!(name.starts_with("pool-"), "{v}");
        assert_eq!(v["owner"], 0);
        let out = env.wick(&["vm", "show", name]);
        assert!(
            !out.status.success(),
            "root cannot act on pool VM {name} by name"
        );
        assert!(
            !guest_root(&v).join("etc/hostname").exists(),
            "a pool VM has no identity yet: {v}"
        );
        assert!(v["runtime"]["host_keys"].is_null(), "{v}");
    }
    let table = env.wick_ok(&["vm", "list", "--all"]);
    assert_eq!(table.matches("pool:ready").count(), 2, "{table}");
    let doctor = env.wick_json(&["doctor"]);
    let check = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["area"] == "pool")
        .cloned()
        .unwrap_or_else(|| panic!("doctor has a pool check: {doctor}"));
    assert!(
        check["detail"].as_str().unwrap().contains("2 ready"),
        "{check}"
    );

    // A create that differs from the pool's spec goes cold and leaves the pool alone.
    let out = env.wick(&["vm", "create", "--name", "big", "--vcpu", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warm pool"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        ready_ids(&env),
        first,
        "a non-matching create takes nothing"
    );
    env.wick_ok(&["vm", "delete", "big"]);

    // Six concurrent matching creates: both ready VMs are served, each exactly once; the rest
    // boot cold (or from a refill that was already ready: a legitimate host outcome).
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .map(|n| {
                let env = &env;
                s.spawn(move || env.wick(&["vm", "create", "--name", n]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids = HashSet::new();
    let mut pooled = 0;
    for (n, out) in names.iter().zip(&outs) {
        assert!(
            out.status.success(),
            "create {n}: {}\n{}",
            text(&out.stderr),
            env.daemon_log()
        );
        let v = env.wick_json(&["vm", "show", n]);
        assert_eq!(v["state"], "running", "{v}");
        assert!(v["runtime"]["pool"].is_null(), "assignment finished: {v}");
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_string()),
            "same VM twice"
        );
        let from_pool = text(&out.stderr).contains("take a ready VM from the warm pool");
        if from_pool {
            pooled += 1;
        }
        // Its identity is its own, pooled or not.
        let hostname = fs::read_to_string(guest_root(&v).join("etc/hostname")).unwrap();
        assert_eq!(hostname.trim(), n.as_str());
    }
    let served: HashSet<&String> = first.iter().filter(|id| ids.contains(*id)).collect();
    assert_eq!(served.len(), 2, "both ready pool VMs were handed out");
    assert!(
        pooled >= 2,
        "at least the two ready VMs served from the pool"
    );
    eprintln!(
        "pool: {pooled} of 6 creates served from the pool, {} cold",
        6 - pooled
    );
    let list = env.wick_json(&["vm", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 6, "{list}");

    // The pool refills with new VMs; taken ones never come back.
    let refilled = wait_pool(&env, 2);
    assert!(refilled.is_disjoint(&ids), "{refilled:?} vs {ids:?}");
    for n in &names {
        env.wick_ok(&["vm", "delete", n]);
    }
    assert_eq!(
        env.vmm_processes().len(),
        2,
        "only the pool's VMMs are left"
    );
}

#[test]
fn kill9_with_pooled_vms_and_during_an_assignment_leaves_the_pool_consistent() {
    if !root() {
        return;
    }
    let mut env = pool_env(2, "dns_port = 10053", false);
    env.start();
    let before = wait_pool(&env, 2);
    let pids = env.vmm_processes();
    assert_eq!(pids.len(), 2);

    // kill -9 with a ready pool: both are re-adopted, nothing new is booted.
    env.kill9();
    env.start();
    let after = wait_pool(&env, 2);
    assert_eq!(after, before, "ready pool VMs are re-adopted");
    let mut now = env.vmm_processes();
    now.sort();
    let mut was = pids.clone();
    was.sort();
    assert_eq!(now, was, "same VMMs, none leaked, none restarted");
    assert_pool_names_do_not_resolve(&env);

    // kill -9 right after a create took a pool VM, before its identity was applied.
    env.kill9();
    env.env
        .push(("WICK_FAILPOINTS".into(), "pool-assign".into()));
    env.start();
    wait_pool(&env, 2);
    // Through another path to the socket: a CLI that loses wickd must not autostart one
    // (it would lack the test's environment).
    let link = env.root().join("sock");
    std::os::unix::fs::symlink(env.socket(), &link).unwrap();
    let out = env
        .wick_cmd()
        .env("WICK_SOCKET", &link)
        .args(["vm", "create", "--name", "u1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "wickd died under the create");
    env.kill9();
    env.env.retain(|(k, _)| k != "WICK_FAILPOINTS");
    env.start();
    let u1 = env.wick_json(&["vm", "show", "u1"]);
    assert_eq!(
        u1["state"], "error",
        "the half-assigned VM is the user's, in error: {u1}"
    );
    assert!(u1["runtime"]["pool"].is_null(), "{u1}");
    assert!(u1["runtime"]["vmm"].is_null(), "released: {u1}");
    assert!(
        u1["runtime"]["last_error"]
            .as_str()
            .unwrap()
            .contains("warm pool"),
        "{u1}"
    );
    let u1_id = u1["id"].as_str().unwrap().to_string();
    assert!(before.contains(&u1_id), "u1 was a pool VM");
    let refilled = wait_pool(&env, 2);
    assert!(!refilled.contains(&u1_id), "never back in the pool");
    assert_eq!(
        env.vmm_processes().len(),
        2,
        "the pool's two VMMs, nothing leaked"
    );
    env.wick_ok(&["vm", "delete", "u1"]);

    // kill -9 while the pool is being filled: the half-made VMs are reaped, the pool refills.
    let vms_dir = env.root().join("state/vms");
    for id in wait_pool(&env, 2) {
        env.wick_ok(&["vm", "create", "--name", &format!("t{}", &id[..4])]);
    }
    env.kill9(); // the refill of the two just taken may be anywhere
    env.start();
    let pool = wait_pool(&env, 2);
    let users = env.wick_json(&["vm", "list"]);
    let users: Vec<&Value> = users["vms"].as_array().unwrap().iter().collect();
    assert_eq!(users.len(), 2);
    assert_eq!(
        env.vmm_processes().len(),
        4,
        "two users' VMs and two pool VMs, nothing leaked"
    );
    let known: HashSet<String> = pool
        .iter()
        .cloned()
        .chain(users.iter().map(|v| v["id"].as_str().unwrap().to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dirs: HashSet<String> = fs::read_dir(&vms_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if dirs == known {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM dirs {dirs:?} vs records {known:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // After the restart, users' VMs resolve as `<name>.vm`; the pool's (no identity yet) do not.
    let ns = env.netns.as_ref().unwrap();
    let dns = "127.0.0.1:10053".parse().unwrap();
    for u in &users {
        let name = format!("{}.vm", u["name"].as_str().unwrap());
        assert!(
            query_a(ns, dns, &name).is_ok_and(|a| !a.is_empty()),
            "{name}"
        );
    }
    assert_pool_names_do_not_resolve(&env);
}

#[test]
fn socket_users_cannot_see_or_name_pool_vms_but_their_creates_use_them() {
    if !root() {
        return;
    }
    let mut env = pool_env(1, "", true);
    env.start();
    let ids = wait_pool(&env, 1);
    let pool = pool_vms(&env);
    let name = pool[0]["name"].as_str().unwrap();

    let out = env.wick_as_user(&["vm", "list", "--all", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["vms"].as_array().unwrap().len(), 0, "{list}");
    for args in [
        vec!["vm", "show", name],
        vec!["vm", "delete", name],
        vec!["vm", "stop", name],
        vec!["vm", "exec", name, "--", "true"],
    ] {
        let out = env.wick_as_user(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            text(&out.stderr).contains("no VM matches"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // A user naming a VM like a pool VM gets the name conflict, not the pool VM.
    let out = env.wick_as_user(&["vm", "create", "--name", name]);
    assert!(!out.status.success());
    assert_eq!(ready_ids(&env), ids, "still the pool's");

    // A matching create by the user takes it: now the user's, with the user's identity.
    let out = env.wick_as_user(&["vm", "create", "--name", "mine"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        env.daemon_log()
    );
    assert!(
        text(&out.stderr).contains("warm pool"),
        "{}",
        text(&out.stderr)
    );
    let v = env.wick_json(&["vm", "show", "mine"]);
    assert_eq!(v["owner"], wick_testkit::wickd::USER_UID);
    assert!(ids.contains(v["id"].as_str().unwrap()));
    let hostname = fs::read_to_string(guest_root(&v).join("etc/hostname")).unwrap();
    assert_eq!(hostname.trim(), "mine");
    let refilled = wait_pool(&env, 1);
    assert!(refilled.is_disjoint(&ids));
    let out = env.wick_as_user(&["vm", "delete", "mine"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn max_memory_caps_the_pool_and_creates_must_match_its_memory() {
    if !root() {
        return;
    }
    let mut env = pool_env(3, "", false);
    let cfg = env.root().join("config.toml");
    let config = fs::read_to_string(&cfg).unwrap().replace(
        "size = 3\n",
        "size = 3\nmemory = \"256M\"\nmax_memory = \"512M\"\n",
    );
    fs::write(&cfg, config).unwrap();
    env.start();
    let ids = wait_pool(&env, 2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pool_vms(&env).len(),
        2,
        "max_memory holds the pool at 2 x 256M"
    );
    // The default memory differs from the pool's: cold. `--memory 256M` matches.
    let out = env.wick(&["vm", "create", "--name", "cold"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("warm pool"));
    let out = env.wick(&["vm", "create", "--name", "warm", "--memory", "256M"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warm pool"));
    let warm = env.wick_json(&["vm", "show", "warm"]);
    assert!(ids.contains(warm["id"].as_str().unwrap()));
}

#[test]
fn fill_failures_back_off_and_show_in_doctor() {
    if !root() {
        return;
    }
    // An image without the agent cannot serve the pool: every fill fails.
    let mut env = WickdEnv::new("[pool]\nsize = 2\n");
    env.start();
    std::thread::sleep(Duration::from_secs(6));
    let fails = env.daemon_log().matches("warm pool: fill failed").count();
    assert!(fails >= 1, "{}", env.daemon_log());
    // 2 fills at once, then backoff 2 s, 4 s, ...: a handful in 6 s, never a hot loop.
    assert!(
        fails <= 8,
        "{fails} fill failures in 6 s:\n{}",
        env.daemon_log()
    );
    let doctor = env.wick_json(&["doctor"]);
    let check = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["area"] == "pool")
        .cloned()
        .unwrap();
    assert_eq!(check["status"], "warn", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("does not run wick-agent"),
        "{check}"
    );
}
