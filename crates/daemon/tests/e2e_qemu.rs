//! End to end with a real guest: QEMU (TCG) boots the Debian cloud kernel through wick-init
//! into the golden image, wick-agent comes up over vsock, and the VM is used for real — inside a
//! private network namespace. Skipped (with the reason) where QEMU, vhost-device-vsock, the
//! Debian mirror or root are missing.

use std::time::{Duration, Instant};

use serde_json::Value;
use wick_agent_proto::{AgentClient, ExecRequest, AGENT_PORT};
use wick_testkit::guest::guest_assets;
use wick_testkit::wickd::WickdEnv;

fn config(a: &wick_testkit::guest::GuestAssets) -> String {
    format!(
        r#"vmm = "qemu"
accel = "tcg"
boot_timeout = "180s"
stop_timeout = "30s"
dns_port = 10053

[images.default]
rootfs = {rootfs:?}
work_seed = {seed:?}
kernel = {kernel:?}
initrd = {initrd:?}
agent = true
boot_args = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw"
"#,
        rootfs = a.rootfs,
        seed = a.work_seed,
        kernel = a.kernel,
        initrd = a.initrd,
    )
}

fn agent(env: &WickdEnv, name: &str, rt: &tokio::runtime::Runtime) -> AgentClient {
    let v: Value = env.wick_json(&["vm", "show", name]);
    let sock = v["runtime"]["vmm"]["vsock_socket"]
        .as_str()
        .unwrap()
        .to_string();
    rt.block_on(AgentClient::connect(
        sock.as_ref(),
        AGENT_PORT,
        Duration::from_secs(30),
    ))
    .expect("agent reachable")
}

fn run(rt: &tokio::runtime::Runtime, c: &AgentClient, argv: &[&str]) -> (i32, String) {
    let out = rt
        .block_on(async {
            c.exec(ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await?
            .output()
            .await
        })
        .expect("exec");
    (
        out.status.code.unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn real_guest_boots_runs_and_keeps_its_data() {
    let assets = match guest_assets() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut env = WickdEnv::with_config(&config(&assets));
    env.start();

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
    ]);
    let created = t.elapsed();
    if !out.status.success() {
        let show = env.wick(&["vm", "logs", "g1"]);
        panic!(
            "create failed: {}\n--- vm log ---\n{}\n--- daemon ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&show.stdout),
            env.daemon_log()
        );
    }
    eprintln!("create → agent ready and configured: {created:?}");
    let c = agent(&env, "g1", &rt);
    let (code, uname) = run(&rt, &c, &["uname", "-r"]);
    assert_eq!(code, 0);
    assert!(uname.contains("cloud-amd64"), "guest kernel: {uname}");
    assert_eq!(run(&rt, &c, &["sh", "-c", "exit 7"]).0, 7);
    let (_, host) = run(&rt, &c, &["hostname"]);
    assert_eq!(host.trim(), "g1");
    // The work disk is /root.
    let (code, mnt) = run(&rt, &c, &["sh", "-c", "findmnt -n -o SOURCE /root"]);
    assert_eq!(code, 0, "{mnt}");
    assert!(mnt.contains("vdb"), "{mnt}");
    assert_eq!(
        run(&rt, &c, &["sh", "-c", "echo kept > /root/proof && sync"]).0,
        0
    );

    let t = Instant::now();
    env.wick_ok(&["vm", "stop", "g1"]);
    eprintln!("stop (agent poweroff): {:?}", t.elapsed());
    env.wick_ok(&["vm", "start", "g1"]);
    let c = agent(&env, "g1", &rt);
    let (code, proof) = run(&rt, &c, &["cat", "/root/proof"]);
    assert_eq!(code, 0, "cat /root/proof");
    assert_eq!(proof.trim(), "kept", "data in /root survives stop/start");

    env.wick_ok(&["vm", "delete", "g1"]);
    assert!(env.vmm_processes().is_empty());
    let procs = env.processes();
    assert!(
        procs
            .iter()
            .all(|p| Some(*p) == env.daemon.as_ref().map(|d| d.id())),
        "only the daemon is left: {procs:?}"
    );
}
