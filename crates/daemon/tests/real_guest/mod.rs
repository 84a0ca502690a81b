//! Helpers of the real-guest end-to-end tests (QEMU TCG, the golden image): the daemon's
//! config, `vm exec`, and the background counter the pause and snapshot tests watch.
#![allow(dead_code)]

use wick_testkit::wickd::WickdEnv;

/// A QEMU (TCG) daemon config whose `default` image is the cached golden image `a`.
pub fn config(a: &wick_testkit::guest::GuestAssets) -> String {
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

/// `wick vm exec NAME -- ARGS`: (exit code, stdout).
pub fn exec(env: &WickdEnv, name: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec!["vm", "exec", name, "--"];
    a.extend_from_slice(args);
    let out = env.wick(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// `/root/c` of the guest: the counter's last value.
pub fn counter(env: &WickdEnv, name: &str) -> u64 {
    // The loop rewrites the file (`echo $i > /root/c`): a read can land between the truncate
    // and the write, so an empty answer is read again.
    for _ in 0..20 {
        let (code, out) = exec(env, name, &["cat", "/root/c"]);
        assert_eq!(code, 0, "{out}");
        if let Ok(n) = out.trim().parse() {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the counter file of {name} never held a number");
}
