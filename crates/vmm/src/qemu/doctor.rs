//! `wick doctor`'s QEMU checks: binaries, KVM, the accel verdict and what isolation it gives.

use std::path::Path;

use wick_model::api::{Check, CheckStatus};

use super::{Accel, Engine, Qemu, QEMU_HOW, SIDECAR, SIDECAR_HOW};
use crate::common::{binary_check, check};

impl Qemu {
    /// Every check of this driver.
    pub(super) fn checks(&self) -> Vec<Check> {
        let mut checks = vec![
            binary_check("qemu", &self.bin, QEMU_HOW),
            binary_check(SIDECAR, &self.sidecar_bin, SIDECAR_HOW),
        ];
        let kvm = Path::new("/dev/kvm");
        checks.push(if kvm.exists() {
            check("kvm", CheckStatus::Pass, "/dev/kvm exists".into(), None)
        } else {
            check(
                "kvm",
                if self.accel == Accel::Kvm {
                    CheckStatus::Fail
                } else {
                    CheckStatus::Warn
                },
                "/dev/kvm does not exist: guests run under TCG (emulation, several times slower)"
                    .into(),
                Some("enable virtualization (VT-x/AMD-V or nested) and load kvm_intel/kvm_amd"),
            )
        });
        checks.push(match self.accel {
            Accel::Kvm | Accel::Tcg => check(
                "accel",
                CheckStatus::Pass,
                format!("configured: {}", self.accel),
                None,
            ),
            Accel::Auto => match self.cached_verdict() {
                Some(v) => check(
                    "accel",
                    CheckStatus::Pass,
                    format!("auto → {} ({}; probed in {} ms)", v.engine, v.reason, v.probe_ms),
                    None,
                ),
                None => check(
                    "accel",
                    CheckStatus::Pass,
                    "auto: not probed yet (the first VM start boots its kernel under KVM to decide)"
                        .into(),
                    None,
                ),
            },
        });
        checks.push(self.isolation_check(kvm.exists()));
        checks
    }
    /// The engine VMs will (likely) run on, if known without a probe.
    fn expected_engine(&self, kvm_exists: bool) -> Option<Engine> {
        match self.accel {
            Accel::Kvm => Some(Engine::Kvm),
            Accel::Tcg => Some(Engine::Tcg),
            Accel::Auto if !kvm_exists => Some(Engine::Tcg),
            Accel::Auto => self.cached_verdict().map(|v| v.engine),
        }
    }

    /// `wick doctor`'s isolation line: TCG is not a security boundary in QEMU's own security
    /// policy, so a guest under TCG is a warning.
    fn isolation_check(&self, kvm_exists: bool) -> Check {
        match self.expected_engine(kvm_exists) {
            Some(Engine::Tcg) => check(
                "isolation",
                CheckStatus::Warn,
                "guests run under TCG (emulation), which QEMU's security policy does not treat as \
                 a security boundary: a hostile guest exploiting a TCG bug gets the VMM's \
                 (unprivileged, confined) process"
                    .into(),
                Some(
                    "use hardware virtualization (KVM) for untrusted guests; `require_kvm = true` \
                      refuses to start a VM without it",
                ),
            ),
            Some(Engine::Kvm) => check(
                "isolation",
                CheckStatus::Pass,
                "guests run under KVM (hardware virtualization)".into(),
                None,
            ),
            None => check(
                "isolation",
                CheckStatus::Pass,
                "decided at the first start (KVM if the probe boots, else TCG, which is not a \
                 security boundary)"
                    .into(),
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QemuOptions;
    use crate::Vmm;

    #[test]
    fn tcg_is_reported_as_no_security_boundary() {
        let q = Qemu::new(QemuOptions {
            accel: Accel::Tcg,
            ..QemuOptions::default()
        });
        let c = q.isolation_check(true);
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(
            c.detail.contains("not treat as a security boundary"),
            "{c:?}"
        );
        assert!(c.hint.unwrap().contains("require_kvm"));
        let doctor = q.doctor();
        assert!(doctor
            .iter()
            .any(|c| c.name == "isolation" && c.status == CheckStatus::Warn));
        let q = Qemu::new(QemuOptions {
            accel: Accel::Kvm,
            ..QemuOptions::default()
        });
        assert_eq!(q.isolation_check(true).status, CheckStatus::Pass);
        let auto = Qemu::new(QemuOptions::default());
        assert_eq!(
            auto.isolation_check(false).status,
            CheckStatus::Warn,
            "no /dev/kvm: TCG"
        );
    }
}
