//! `wick daemon install|uninstall`: wickd as a systemd service.
//!
//! Install writes `wickd.service` (and a commented config when there is none), enables it and,
//! when systemd runs this host, starts it. Uninstall stops and disables it and removes what
//! install wrote: the unit always, the config only while it is still the untouched example.
//! Both are idempotent. `--fs-root DIR` does the same inside DIR (a machine image being
//! prepared, or a test) with `systemctl --root`, and never starts or stops anything.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use wick_model::paths::CONFIG_EXAMPLE;
use wick_model::Paths;

use super::outln;

/// The unit's name.
pub const UNIT: &str = "wickd.service";

/// Where the files go.
pub struct Target {
    /// `/` or `--fs-root`.
    pub fs_root: PathBuf,
    /// `WICK_ROOT` of this invocation, passed on as `--root`.
    pub wick_root: Option<PathBuf>,
    /// The config file (host path, before `fs_root`).
    pub config: PathBuf,
}

impl Target {
    pub fn new(fs_root: Option<PathBuf>, paths: &Paths) -> Target {
        Target {
            fs_root: fs_root.unwrap_or_else(|| PathBuf::from("/")),
            wick_root: paths.root.clone(),
            config: paths.config.clone(),
        }
    }

    fn offline(&self) -> bool {
        self.fs_root != Path::new("/")
    }

    fn under_root(&self, p: &Path) -> PathBuf {
        self.fs_root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn unit_path(&self) -> PathBuf {
        self.under_root(Path::new("/etc/systemd/system").join(UNIT).as_path())
    }

    pub fn config_path(&self) -> PathBuf {
        self.under_root(&self.config)
    }
}

/// The daemon binary the unit starts (absolute): the wickd beside wick, else on PATH. Only
/// install needs it; uninstall works after the binaries are gone.
fn wickd_binary() -> Result<PathBuf> {
    let wickd = crate::autostart::find_wickd()?;
    fs::canonicalize(&wickd)
        .with_context(|| format!("cannot resolve the wickd binary {}", wickd.display()))
}

/// The unit text for `t`, starting `wickd`.
pub fn unit_text(t: &Target, wickd: &Path) -> String {
    let mut exec = wickd.display().to_string();
    if let Some(root) = &t.wick_root {
        exec.push_str(&format!(" --root {}", root.display()));
    }
    format!(
        "# Written by `wick daemon install`; removed by `wick daemon uninstall`.\n\
         [Unit]\n\
         Description=wick daemon: microVM development sandboxes\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={exec}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # Stopping or restarting wickd leaves the VMs running: the next wickd re-adopts them.\n\
         KillMode=process\n\
         LimitNOFILE=1048576\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Whether systemd manages this host (what `sd_booted` checks).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemctl ARGS` (with `--root` for an offline target), through wick's one command runner.
fn systemctl(t: &Target, args: &[&str]) -> Result<()> {
    use wick_host::cmd::{Cmd, Runner, SystemRunner};
    let mut cmd = Cmd::new("systemctl");
    if t.offline() {
        cmd = cmd.arg(format!("--root={}", t.fs_root.display()));
    }
    SystemRunner::new()
        .run_ok(&cmd.args(args.iter().copied()))
        .map(drop)
        .map_err(|e| match e.is_not_found() {
            true => {
                anyhow::anyhow!("systemctl is not installed: wick daemon install needs systemd")
            }
            false => anyhow::Error::new(e),
        })
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("wick-tmp");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `wick daemon install`.
pub fn install(t: &Target) -> Result<()> {
    if !nix::unistd::geteuid().is_root() && !t.offline() {
        bail!("wick daemon install writes to /etc and enables a system service: run it as root");
    }
    let unit = t.unit_path();
    let text = unit_text(t, &wickd_binary()?);
    match fs::read_to_string(&unit) {
        Ok(old) if old == text => outln(&format!("{} is up to date", unit.display()))?,
        _ => {
            write_new(&unit, &text, 0o644)?;
            outln(&format!("wrote {}", unit.display()))?;
        }
    }
    let config = t.config_path();
    if config.exists() {
        outln(&format!("kept the existing config {}", config.display()))?;
    } else {
        write_new(&config, CONFIG_EXAMPLE, 0o644)?;
        outln(&format!(
            "wrote {} (every setting commented out)",
            config.display()
        ))?;
    }
    if t.offline() || !systemd_running() {
        systemctl(t, &["enable", UNIT])?;
        return outln(&format!(
            "enabled {UNIT}; systemd does not run {}, so it starts at the next boot",
            if t.offline() {
                "that root"
            } else {
                "this host"
            }
        ));
    }
    systemctl(t, &["daemon-reload"])?;
    systemctl(t, &["enable", "--now", UNIT])?;
    outln(&format!("enabled and started {UNIT}"))
}

/// `wick daemon uninstall`.
pub fn uninstall(t: &Target) -> Result<()> {
    if !nix::unistd::geteuid().is_root() && !t.offline() {
        bail!("wick daemon uninstall changes /etc and a system service: run it as root");
    }
    let unit = t.unit_path();
    if !unit.exists() {
        outln(&format!(
            "{UNIT} is not installed ({} does not exist)",
            unit.display()
        ))?;
    } else {
        if !t.offline() && systemd_running() {
            systemctl(t, &["disable", "--now", UNIT])?;
        } else {
            systemctl(t, &["disable", UNIT])?;
        }
        fs::remove_file(&unit).with_context(|| format!("cannot remove {}", unit.display()))?;
        outln(&format!(
            "stopped, disabled and removed {} (VMs keep running; start wickd by hand to manage them)",
            unit.display()
        ))?;
        if !t.offline() && systemd_running() {
            systemctl(t, &["daemon-reload"])?;
        }
    }
    let config = t.config_path();
    match fs::read_to_string(&config) {
        Ok(text) if text == CONFIG_EXAMPLE => {
            fs::remove_file(&config)
                .with_context(|| format!("cannot remove {}", config.display()))?;
            outln(&format!(
                "removed the untouched example config {}",
                config.display()
            ))
        }
        Ok(_) => outln(&format!("kept {} (it was edited)", config.display())),
        Err(_) => Ok(()),
    }
}
