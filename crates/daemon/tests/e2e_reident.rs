//! End to end on a real guest: the new identity a restored guest takes (`Configure::restored`).
//! A QEMU (TCG) VM is booted normally from the golden image with this build's wick-agent; its
//! clock is set an hour back, then a Configure with `restored` (a new machine-id, a new address
//! and the MAC that goes with it, host entropy, the host's clock, new SSH host keys) goes
//! straight to its agent over the VM's recorded vsock socket, as wickd's `guest.rs` sends it.
//! The guest must then hold exactly that identity, and its sshd serve the new key. Skipped (with
//! the reason) where QEMU, the Debian mirror or root are missing.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ssh_key::rand_core::{OsRng, RngCore};
use wick_agent_proto::{AgentClient, Configure, HostKey, NetworkConfig, Restored, AGENT_PORT};
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

mod real_guest;
use real_guest::{config, exec};

fn sh(env: &WickdEnv, name: &str, script: &str) -> String {
    let (code, out) = exec(env, name, &["sh", "-c", script]);
    assert_eq!(code, 0, "{script}: {out}");
    out.trim().to_string()
}

fn host_key(vm: &str) -> HostKey {
    let mut key = ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    key.set_comment(format!("root@{vm}"));
    HostKey {
        kind: "ed25519".into(),
        private: key.to_openssh(ssh_key::LineEnding::LF).unwrap().to_string(),
        public: key.public_key().to_openssh().unwrap(),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The key material (second field) of a public key line.
fn key_blob(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// Waits (up to a minute) until the guest's sshd serves the ed25519 key `public` on port 22.
fn wait_served(env: &WickdEnv, name: &str, public: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = exec(
            env,
            name,
            &["sh", "-c", "ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null"],
        );
        // `ssh-keyscan` prints `HOST TYPE KEY`.
        let served = |l: &str| l.split_whitespace().nth(2) == Some(key_blob(public));
        if !key_blob(public).is_empty() && out.lines().any(served) {
            return;
        }
        assert!(Instant::now() < end, "sshd does not serve {public}: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_restored_guest_takes_its_new_identity() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();
    env.wick_ok(&["vm", "create", "--name", "ri"]);

    // What the guest holds now: the identity a snapshot of it would carry into every fork.
    let old_mac = sh(&env, "ri", "cat /sys/class/net/eth0/address");
    let old_id = sh(&env, "ri", "cat /etc/machine-id");
    let old_random = sh(&env, "ri", "head -c 16 /dev/urandom | od -An -tx1");
    let old_cidr = sh(&env, "ri", "ip -o -4 addr show dev eth0 | awk '{print $4}'");
    let gateway = sh(&env, "ri", "ip route show default | awk '{print $3}'");
    let (old_ip, prefix) = old_cidr.split_once('/').expect("an IPv4 address on eth0");
    let mut octets: [u8; 4] = old_ip.parse::<std::net::Ipv4Addr>().unwrap().octets();
    octets[3] = if octets[3] == 250 { 251 } else { 250 };
    let new_ip = std::net::Ipv4Addr::from(octets);
    // A running sshd serves the key wickd pinned at create (so the restart below is real).
    let keyscan = exec(&env, "ri", &["sh", "-c", "command -v ssh-keyscan"]).0 == 0;
    if keyscan {
        let vm = env.wick_json(&["vm", "show", "ri"]);
        let pinned = vm["runtime"]["host_keys"][0].as_str().unwrap_or_default();
        wait_served(&env, "ri", pinned);
    } else {
        wick_testkit::skip("no ssh-keyscan in the guest: the served host key is not checked");
    }
    // A restored guest's clock is wherever its snapshot left it: an hour behind, here.
    sh(&env, "ri", "date -s @$(( $(date +%s) - 3600 )) >/dev/null");

    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let new_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let new_mac = wick_host::net::guest_mac(new_ip).to_ascii_lowercase();
    let mut entropy = vec![0u8; 64];
    OsRng.fill_bytes(&mut entropy);
    let key = host_key("ri");
    let cfg = Configure {
        hostname: Some("ri".into()),
        network: Some(NetworkConfig {
            ip_cidr: format!("{new_ip}/{prefix}"),
            gateway: gateway.parse().ok(),
            dns: vec![],
        }),
        host_keys: Some(vec![key.clone()]),
        restored: Some(Restored {
            machine_id: Some(new_id.clone()),
            entropy,
            unix_time_ns: now_ns(),
            mac: Some(new_mac.clone()),
        }),
        ..Default::default()
    };
    let vm = env.wick_json(&["vm", "show", "ri"]);
    let vsock = PathBuf::from(vm["runtime"]["vmm"]["vsock_socket"].as_str().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Instant::now();
    let reply = rt.block_on(async {
        let client = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(30))
            .await
            .expect("the agent answers on the VM's vsock socket");
        client.configure(&cfg).await.expect("Configure applied")
    });
    let took = t.elapsed();
    assert!(reply.restored, "this build's agent applied it: {reply:?}");
    assert!(
        reply.changed.iter().any(|c| c.contains("CRNG reseeded"))
            && reply.changed.iter().any(|c| c.contains("clock stepped")),
        "{reply:?}"
    );
    assert!(
        reply
            .host_keys
            .iter()
            .any(|k| key_blob(k) == key_blob(&key.public)),
        "{reply:?}"
    );

    assert_eq!(sh(&env, "ri", "cat /etc/machine-id"), new_id);
    assert_ne!(new_id, old_id);
    assert_eq!(sh(&env, "ri", "cat /sys/class/net/eth0/address"), new_mac);
    assert_ne!(new_mac, old_mac);
    let addrs = sh(&env, "ri", "ip -o -4 addr show dev eth0 | awk '{print $4}'");
    assert_eq!(
        addrs,
        format!("{new_ip}/{prefix}"),
        "exactly the new address (the old one dropped)"
    );
    let guest_secs: u64 = sh(&env, "ri", "date +%s").parse().unwrap();
    let host_secs = now_ns() / 1_000_000_000;
    assert!(
        host_secs.abs_diff(guest_secs) <= 5,
        "guest clock {guest_secs}, host {host_secs}"
    );
    let new_random = sh(&env, "ri", "head -c 16 /dev/urandom | od -An -tx1");
    assert_ne!(new_random, old_random);

    // sshd was restarted on the new key: what it serves on port 22 is the key sent.
    if keyscan {
        wait_served(&env, "ri", &key.public);
    }
    eprintln!(
        "e2e reident (TCG, debug build): Configure with `restored` applied in {:.2}s",
        took.as_secs_f64()
    );
    env.wick_ok(&["vm", "delete", "ri"]);
}
