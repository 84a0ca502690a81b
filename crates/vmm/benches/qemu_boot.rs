//! Benchmark of the QEMU driver under TCG with Debian's cloud kernel (from the test cache):
//! spawn → QMP ready (sidecar + QEMU paused), `cont` → running, boot → `Linux version` on the
//! console, boot → the kernel's end of init (the root-mount panic, no initramfs), and stop.
//! Prints a table of per-run numbers and medians. `cargo bench -p wick-vmm --bench qemu_boot`;
//! `WICK_BENCH_RUNS` sets the number of runs (default 5).

#[path = "../tests/qemu_support/mod.rs"]
mod qemu_support;

use std::time::{Duration, Instant};

use wick_vmm::qemu::{Accel, Qemu, QemuOptions};
use wick_vmm::{Vmm, VmmConfig};

#[derive(Default, Clone, Copy)]
struct Run {
    spawn: Duration,
    running: Duration,
    linux: Duration,
    end_of_init: Duration,
    stop: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn wait_console(log: &std::path::Path, what: &str, t0: Instant) -> Option<Duration> {
    while t0.elapsed() < Duration::from_secs(120) {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(what)
        {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn one(kernel: &std::path::Path) -> Result<Run, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = dir.path().join("root.ext4");
    std::fs::File::create(&root)
        .and_then(|f| f.set_len(16 << 20))
        .map_err(|e| e.to_string())?;
    let qemu = Qemu::new(QemuOptions {
        accel: Accel::Tcg,
        sidecar_bin: Some(wick_testkit::cargo_bin("wickd")),
        ..QemuOptions::default()
    });
    let mut h = qemu.plan(dir.path());
    let cfg = VmmConfig {
        vm_id: "bench".into(),
        vcpu: 2,
        memory_mib: 512,
        kernel: kernel.to_path_buf(),
        initrd: None,
        boot_args: "console=ttyS0 root=/dev/vdz rootwait".into(),
        root_disk: root,
        extra_disks: Vec::new(),
        guest_cid: 3,
        tap: None,
        guest_mac: None,
        jail: None,
        require_kvm: false,
    };
    let mut run = Run::default();
    let t = Instant::now();
    let s = qemu
        .spawn(&h, &cfg, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    run.spawn = t.elapsed();
    h.pid = Some(s.pid);
    h.start_time = Some(s.start_time);
    h.sidecars = s.sidecars;
    let t = Instant::now();
    qemu.boot(&h, &cfg, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    run.running = t.elapsed();
    run.linux = wait_console(&h.log_path, "Linux version", t)
        .await
        .ok_or("no 'Linux version' within 120 s")?;
    // `rootwait` on a missing disk: the kernel finished its own init and waits for the root.
    run.end_of_init = wait_console(&h.log_path, "Waiting for root device", t)
        .await
        .ok_or("no 'Waiting for root device' within 120 s")?;
    let t = Instant::now();
    qemu.stop(&h, Duration::from_millis(500))
        .await
        .map_err(|e| e.to_string())?;
    run.stop = t.elapsed();
    qemu.cleanup(&h);
    if let Some(mut c) = s.child {
        let _ = c.wait().await;
    }
    Ok(run)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Some(why) = qemu_support::qemu_unavailable() {
        println!("qemu_boot: SKIPPED: {why}");
        return;
    }
    let kernel = match qemu_support::debian_kernel() {
        Ok(k) => k,
        Err(why) => {
            println!("qemu_boot: SKIPPED: {why}");
            return;
        }
    };
    let runs: usize = std::env::var("WICK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!("QEMU driver, TCG, kernel {}", kernel.display());
    println!(
        "{:>4} {:>12} {:>12} {:>14} {:>14} {:>10}",
        "run", "spawn->QMP", "cont->run", "->Linux ver.", "->end of init", "stop"
    );
    let mut all = Vec::new();
    for i in 0..runs {
        match one(&kernel).await {
            Ok(r) => {
                println!(
                    "{:>4} {:>12.1?} {:>12.1?} {:>14.1?} {:>14.1?} {:>10.1?}",
                    i + 1,
                    r.spawn,
                    r.running,
                    r.linux,
                    r.end_of_init,
                    r.stop
                );
                all.push(r);
            }
            Err(e) => println!("{:>4} failed: {e}", i + 1),
        }
    }
    if all.is_empty() {
        return;
    }
    let m = |f: fn(&Run) -> Duration| median(all.iter().map(f).collect());
    println!(
        "{:>4} {:>12.1?} {:>12.1?} {:>14.1?} {:>14.1?} {:>10.1?}",
        "p50",
        m(|r| r.spawn),
        m(|r| r.running),
        m(|r| r.linux),
        m(|r| r.end_of_init),
        m(|r| r.stop)
    );
}
