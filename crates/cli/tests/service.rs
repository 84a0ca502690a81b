//! `wick daemon install|uninstall --fs-root DIR`: the unit systemd accepts, idempotence, and an
//! uninstall that leaves no file behind. (`--fs-root` uses `systemctl --root`, so nothing on this
//! host is enabled, started or stopped.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wick(fs_root: &Path, args: &[&str]) -> Output {
    // wick finds wickd beside itself: make sure it is built.
    wick_testkit::cargo_bin("wickd");
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .arg("--fs-root")
        .arg(fs_root)
        .env_remove("WICK_ROOT")
        .output()
        .expect("run wick")
}

fn ok(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {out}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Every non-directory under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn have_systemctl() -> bool {
    Command::new("systemctl").arg("--version").output().is_ok()
}

#[test]
fn install_is_idempotent_verified_and_uninstall_leaves_nothing() {
    if !have_systemctl() {
        return wick_testkit::skip("systemctl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first = ok(wick(root, &["daemon", "install"]));
    let unit = root.join("etc/systemd/system/wickd.service");
    let config = root.join("etc/wick/config.toml");
    assert!(first.contains("wrote "), "{first}");
    let text = std::fs::read_to_string(&unit).unwrap();
    let wickd = std::fs::canonicalize(wick_testkit::cargo_bin("wickd")).unwrap();
    assert!(
        text.contains(&format!("ExecStart={}\n", wickd.display())),
        "{text}"
    );
    assert!(text.contains("KillMode=process"), "{text}");
    assert!(root
        .join("etc/systemd/system/multi-user.target.wants/wickd.service")
        .symlink_metadata()
        .is_ok());
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        wick_model::paths::CONFIG_EXAMPLE
    );

    verify(&unit);

    // Twice: nothing changes.
    let second = ok(wick(root, &["daemon", "install"]));
    assert!(second.contains("is up to date"), "{second}");
    assert!(second.contains("kept the existing config"), "{second}");
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), text);

    let gone = ok(wick(root, &["daemon", "uninstall"]));
    assert!(
        gone.contains("removed the untouched example config"),
        "{gone}"
    );
    assert_eq!(files(root), Vec::<PathBuf>::new());
    let again = ok(wick(root, &["daemon", "uninstall"]));
    assert!(again.contains("is not installed"), "{again}");
}

#[test]
fn uninstall_keeps_an_edited_config() {
    if !have_systemctl() {
        return wick_testkit::skip("systemctl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(wick(root, &["daemon", "install"]));
    let config = root.join("etc/wick/config.toml");
    std::fs::write(&config, "socket_group = \"wick\"\n").unwrap();
    let out = ok(wick(root, &["daemon", "uninstall"]));
    assert!(out.contains("(it was edited)"), "{out}");
    assert_eq!(files(root), vec![config]);
}

/// `systemd-analyze verify` accepts the unit without a single warning.
fn verify(unit: &Path) {
    let Ok(o) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
    else {
        return wick_testkit::skip("systemd-analyze is not installed: the unit was not verified");
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
