//! `PUT /actions`: `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`, and the fake guest's
//! failure knobs.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use super::{fault, parse, Reply};
use crate::vm::{exit_with, Phase, Shared, Vm};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Prints numbered console lines forever at about `kib_per_s` KiB/s (`FAKE_FC_CONSOLE_SPAM_KIB_S`).
fn spam_console(kib_per_s: u64) {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (kib_per_s * 1024 / 100).max(1);
    let mut n: u64 = 0;
    let start = std::time::Instant::now();
    let mut ticks: u32 = 0;
    loop {
        let mut chunk = String::new();
        while (chunk.len() as u64) < per_tick {
            chunk.push_str(&format!("spam {n} the guest prints without end\n"));
            n += 1;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(chunk.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
        drop(out);
        ticks += 1;
        // Paced against the start, so the rate holds however long each write takes.
        let due = start + TICK * ticks;
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    }
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

pub fn put_actions(vm: &mut Vm, shared: &Shared, body: &Bytes) -> Result<Reply, Reply> {
    let action: Action = parse(body)?;
    match action.action_type {
        ActionType::InstanceStart => instance_start(vm, shared),
        ActionType::SendCtrlAltDel => send_ctrl_alt_del(vm, shared),
        ActionType::FlushMetrics => {
            vm.write_metrics();
            Ok(Reply::NoContent)
        }
    }
}

/// Boots the fake guest: console lines, the agent, and the start knobs.
fn instance_start(vm: &mut Vm, shared: &Shared) -> Result<Reply, Reply> {
    vm.pre_boot()?;
    let Some(boot) = vm.boot.clone() else {
        return Err(fault(
            "Start microvm error: Cannot start microvm without kernel configuration.",
        ));
    };
    if let Ok(msg) = std::env::var("FAKE_FC_FAIL_START") {
        if !msg.is_empty() {
            return Err(fault(msg));
        }
    }
    vm.start_agent()?;
    vm.phase = Phase::Running;
    println!(
        "[fake-firecracker] booting kernel {} with {} vcpus, {} MiB",
        boot.kernel_image_path, vm.machine.vcpu_count, vm.machine.mem_size_mib
    );
    println!(
        "[fake-firecracker] cmdline: {}",
        boot.boot_args.as_deref().unwrap_or("")
    );
    for d in &vm.drives {
        println!(
            "[fake-firecracker] drive {}: {}{}",
            d.drive_id,
            d.path_on_host.as_deref().unwrap_or("-"),
            if d.is_root_device { " (root)" } else { "" }
        );
    }
    println!("fake guest: reached init");
    if let Some(kib) = std::env::var("FAKE_FC_CONSOLE_SPAM_KIB_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || spam_console(kib));
    }
    vm.log("Successfully started microvm (fake)");
    vm.write_metrics();
    if let Some(ms) = std::env::var("FAKE_FC_EXIT_AFTER_START_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!(
                "[fake-firecracker] guest crashed (FAKE_FC_EXIT_AFTER_START_MS={ms}): exiting with code 1"
            );
            exit_with(&shared, 1);
        });
    }
    Ok(Reply::NoContent)
}

/// The fake guest powers off about 50 ms later (unless told to ignore the request).
fn send_ctrl_alt_del(vm: &mut Vm, shared: &Shared) -> Result<Reply, Reply> {
    vm.post_boot()?;
    if vm.phase == Phase::Paused {
        // The keystroke is queued, but a paused guest runs nothing to act on it.
        println!("fake guest: paused, Ctrl+Alt+Del not acted on");
        return Ok(Reply::NoContent);
    }
    if env_flag("FAKE_FC_IGNORE_CTRL_ALT_DEL") {
        println!("fake guest: ignoring Ctrl+Alt+Del (FAKE_FC_IGNORE_CTRL_ALT_DEL)");
        return Ok(Reply::NoContent);
    }
    println!("fake guest: Ctrl+Alt+Del received, powering off");
    let vsock = vm.vsock.as_ref().map(|v| v.uds_path.clone());
    vm.log("Vmm is stopping (fake guest powered off)");
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(p) = vsock {
            let _ = std::fs::remove_file(p);
        }
        println!("[fake-firecracker] guest powered off, exiting");
        exit_with(&shared, 0);
    });
    Ok(Reply::NoContent)
}
