//! Real-guest benchmark of images without systemd (QEMU TCG on this host; prints a table,
//! asserts nothing): create → agent ready and configured, and `vm stop` (guest poweroff until
//! the VMM exits), side by side for the golden image (systemd as PID 1), a busybox image and a
//! debootstrap-minbase + python3 image (wick-init as PID 1), all booting the same kernel and
//! initramfs in one daemon, rounds interleaved. A failed create is counted and printed, not
//! fatal.
//!
//! `cargo bench -p wick-daemon --bench no_systemd` as root; skipped (with the reason) where QEMU, the
//! registry, debootstrap or the Debian mirror are missing.

use std::time::{Duration, Instant};

#[path = "../tests/images_common/mod.rs"]
mod images_common;

const ROUNDS: usize = 5;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut s = match images_common::setup(true) {
        Ok(s) => s,
        Err(why) => {
            wick_testkit::skip(format_args!("{why}"));
            return;
        }
    };
    let env = &mut s.env;
    let images = [
        ("golden", "systemd"),
        ("bb", "wick-init"),
        ("py", "wick-init"),
    ];
    let mut ready: Vec<Vec<Duration>> = vec![Vec::new(); images.len()];
    let mut stop: Vec<Vec<Duration>> = vec![Vec::new(); images.len()];
    let mut failures = vec![0usize; images.len()];
    for round in 0..ROUNDS {
        for (i, (image, _)) in images.iter().enumerate() {
            let name = format!("{image}-{round}");
            let t = Instant::now();
            let out = env.wick(&[
                "vm",
                "create",
                "--name",
                &name,
                "--image",
                image,
                "--memory",
                "512M",
                "--disk-size",
                "1G",
            ]);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
                println!("round {round} {image}: create FAILED: {last}");
                failures[i] += 1;
                let _ = env.wick(&["vm", "delete", &name]);
                continue;
            }
            ready[i].push(t.elapsed());
            let t = Instant::now();
            env.wick_ok(&["vm", "stop", &name]);
            stop[i].push(t.elapsed());
            println!(
                "round {round} {image}: ready {}, stop {}",
                ms(*ready[i].last().unwrap()),
                ms(*stop[i].last().unwrap())
            );
            env.wick_ok(&["vm", "delete", &name]);
        }
    }
    println!(
        "create → agent ready and configured, and vm stop; QEMU TCG, 512 MiB, {ROUNDS} rounds"
    );
    println!(
        "{:<8} {:<10} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "image", "PID 1", "ready p50", "ready max", "stop p50", "stop max", "failed"
    );
    for (i, (image, init)) in images.iter().enumerate() {
        if ready[i].is_empty() {
            println!("{image:<8} {init:<10} every create failed");
            continue;
        }
        println!(
            "{:<8} {:<10} {:>12} {:>12} {:>12} {:>12} {:>8}",
            image,
            init,
            ms(pct(&mut ready[i], 0.5)),
            ms(pct(&mut ready[i], 1.0)),
            ms(pct(&mut stop[i], 0.5)),
            ms(pct(&mut stop[i], 1.0)),
            failures[i],
        );
    }
}
