//! `wick doctor`: a read-only report of everything a VM start depends on, each check with a fix
//! hint. Nothing here changes the host.

use std::collections::HashSet;
use std::sync::Arc;

use wick_model::api::{Check, CheckStatus, DoctorReport};

use crate::daemon::Daemon;

fn check(
    area: &str,
    name: &str,
    status: CheckStatus,
    detail: impl Into<String>,
    hint: Option<&str>,
) -> Check {
    Check {
        area: area.into(),
        name: name.into(),
        status,
        detail: detail.into(),
        hint: hint.map(str::to_string),
    }
}

/// Runs every check.
pub async fn run(d: &Arc<Daemon>) -> DoctorReport {
    let mut checks = store_checks(d);

    // VMM driver (binary, KVM).
    checks.extend(d.vmm.doctor());

    // Storage backends.
    if let Ok(choice) = d.config.storage_choice() {
        checks.extend(wick_storage::doctor(
            choice,
            &d.paths.state,
            d.config.jailer_bin.is_some(),
        ));
    }

    checks.extend(config_checks(d));
    checks.push(default_image_check(d));

    // Capabilities.
    let vms = d.store.list_vms(None).unwrap_or_default();
    for cap in &d.caps {
        checks.extend(cap.doctor(&vms).await);
    }

    checks.push(d.pool_check());
    checks.push(leftovers_check(d, &vms));
    DoctorReport { checks }
}

/// State store: the database's integrity and a writable state dir.
fn store_checks(d: &Daemon) -> Vec<Check> {
    use CheckStatus::*;
    let mut checks = Vec::new();
    match d.store.integrity_check() {
        Ok(s) if s == "ok" => checks.push(check(
            "store",
            "database",
            Pass,
            format!(
                "{} (schema {:?})",
                d.paths.db().display(),
                d.store.schema_versions().unwrap_or_default()
            ),
            None,
        )),
        Ok(s) => checks.push(check(
            "store",
            "database",
            Fail,
            s,
            Some("restore the state database from a backup"),
        )),
        Err(e) => checks.push(check(
            "store",
            "database",
            Fail,
            e.to_string(),
            Some("check permissions of the state directory"),
        )),
    }
    let probe = d.paths.state.join(".doctor-probe");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            checks.push(check(
                "store",
                "state dir writable",
                Pass,
                d.paths.state.display().to_string(),
                None,
            ));
        }
        Err(e) => checks.push(check(
            "store",
            "state dir writable",
            Fail,
            format!("{}: {e}", d.paths.state.display()),
            Some("run wickd as root, or point WICK_ROOT at a writable directory"),
        )),
    }
    checks
}

/// Config and defaults with provenance.
fn config_checks(d: &Daemon) -> Vec<Check> {
    let mut checks = vec![check(
        "config",
        "config file",
        CheckStatus::Pass,
        if d.paths.config.exists() {
            format!("{} (loaded)", d.paths.config.display())
        } else {
            format!("{} (absent; built-in defaults)", d.paths.config.display())
        },
        None,
    )];
    let df = &d.defaults;
    for (name, v, unit) in [
        ("vm_defaults.vcpu", &df.vcpu, ""),
        ("vm_defaults.memory", &df.memory_mib, " MiB"),
        ("vm_defaults.disk", &df.disk_mib, " MiB"),
    ] {
        checks.push(check(
            "config",
            name,
            CheckStatus::Pass,
            format!("{}{unit} ({})", v.value, v.source),
            None,
        ));
    }
    checks
}

/// The configured default image and its files.
fn default_image_check(d: &Daemon) -> Check {
    use CheckStatus::*;
    let name = d.config.default_image_name();
    let Some(img) = d.config.images.get(name) else {
        return managed_default_image_check(d, name);
    };
    let missing: Vec<String> = [Some(&img.rootfs), Some(&img.kernel), img.initrd.as_ref()]
        .into_iter()
        .flatten()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        check(
            "image",
            "default image",
            Pass,
            format!("{name}: {}", img.rootfs.display()),
            None,
        )
    } else {
        check(
            "image",
            "default image",
            Fail,
            format!("{name}: missing {}", missing.join(", ")),
            Some("fix the paths in the image's config table"),
        )
    }
}

/// The default image when the config names no such table: a managed image (imported, pulled,
/// built, or the `default` pair wick prepares on first use).
fn managed_default_image_check(d: &Daemon, name: &str) -> Check {
    use CheckStatus::*;
    match (d.artifacts.get_image(name), name == "default") {
        (Ok(img), _) => check(
            "image",
            "default image",
            Pass,
            format!("{name}: managed image {}", img.rootfs.display()),
            None,
        ),
        (Err(_), true) => check(
            "image",
            "default image",
            Pass,
            "default: not prepared yet; the first `wick vm create` or `wick vm run` downloads \
             the Debian kernel and builds it (a few minutes, once)"
                .to_string(),
            None,
        ),
        (Err(_), false) => check(
            "image",
            "default image",
            Warn,
            format!("no image named {name:?}: neither an [images.{name}] table nor a managed image"),
            Some("wick image build|import|pull --name NAME, or add an [images.NAME] table to the config"),
        ),
    }
}

/// Leftovers: VMM processes of VMs that no longer exist.
fn leftovers_check(d: &Daemon, vms: &[wick_model::VmRecord]) -> Check {
    let known: HashSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
    let orphans = crate::reconcile::orphan_vmms(&d.paths.state.join("vms"), &known);
    if orphans.is_empty() {
        return check(
            "host",
            "leftover VMM processes",
            CheckStatus::Pass,
            "none",
            None,
        );
    }
    check(
        "host",
        "leftover VMM processes",
        CheckStatus::Warn,
        orphans
            .iter()
            .map(|(p, id)| format!("pid {p} (vm dir {id})"))
            .collect::<Vec<_>>()
            .join(", "),
        Some("restart wickd: its start-up sweep ends them"),
    )
}
