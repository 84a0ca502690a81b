//! Guest failures QEMU does not report itself: fatal KVM lines in the console, and a KVM boot
//! that stays silent.

use std::path::Path;
use std::time::Duration;

use super::accel;
use super::cmdline::START_MARKER;
use super::Engine;
use crate::common::{tail_lines, with_tail};

/// A fatal line in the VMM log since the last start (`KVM internal error`, …), with the tail.
pub fn console_failure(log: &Path) -> Option<String> {
    let text = tail_lines(log, 4000);
    let since_start = match text.rfind(START_MARKER) {
        Some(i) => &text[i..],
        None => &text[..],
    };
    let line = since_start
        .lines()
        .find(|l| accel::KVM_FAILURES.iter().any(|f| l.contains(f)))?;
    Some(with_tail(
        format!(
            "the guest failed under KVM ({}); QEMU stays paused after this: use accel = \"tcg\" \
             (or \"auto\") on this host",
            line.trim()
        ),
        log,
    ))
}

/// A boot under KVM that shows no sign of the kernel (no `Linux version` since the last start
/// marker) and has not written to its console for `after`: on some hosts KVM neither fails nor
/// runs a stock guest (HOST-NOTES), so silence is the failure. A healthy KVM guest prints its
/// banner within milliseconds; an idle guest after boot is not judged (it printed the banner).
pub fn kvm_stall(log: &Path, after: Duration) -> Option<String> {
    let text = tail_lines(log, 4000);
    let since_start = &text[text.rfind(START_MARKER)?..];
    let marker = since_start.lines().next()?;
    if !marker.contains(&format!("(accel {})", Engine::Kvm))
        || since_start.contains("Linux version")
    {
        return None;
    }
    let idle = std::fs::metadata(log)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    (idle >= after).then(|| {
        with_tail(
            format!(
                "the guest made no progress under KVM in {}s (the kernel printed nothing): this \
                 host's KVM cannot run it; use accel = \"tcg\" (or \"auto\") on this host",
                idle.as_secs()
            ),
            log,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn console_failures_count_only_since_the_last_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            format!("{START_MARKER} ===\nKVM internal error. Suberror: 1\nemulation failure\n"),
        )
        .unwrap();
        let msg = console_failure(&log).unwrap();
        assert!(
            msg.contains("KVM internal error") && msg.contains("tcg"),
            "{msg}"
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{START_MARKER} ===\n[    0.000000] Linux version 6.1").unwrap();
        assert_eq!(console_failure(&log), None);
        assert_eq!(console_failure(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_silent_kvm_boot_is_a_failure_a_silent_tcg_or_booted_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let now = Duration::ZERO;
        std::fs::write(&log, format!("{START_MARKER} (accel kvm) ===\n")).unwrap();
        let msg = kvm_stall(&log, now).unwrap();
        assert!(
            msg.contains("no progress under KVM") && msg.contains("tcg"),
            "{msg}"
        );
        // Not yet silent for long enough.
        assert_eq!(kvm_stall(&log, Duration::from_secs(3600)), None);
        std::fs::write(&log, format!("{START_MARKER} (accel tcg) ===\n")).unwrap();
        assert_eq!(kvm_stall(&log, now), None);
        std::fs::write(
            &log,
            format!("{START_MARKER} (accel kvm) ===\n[    0.000000] Linux version 6.1\n"),
        )
        .unwrap();
        assert_eq!(kvm_stall(&log, now), None);
        assert_eq!(kvm_stall(&dir.path().join("missing"), now), None);
    }
}
