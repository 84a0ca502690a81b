//! The project's own sandbox definition, read from the repository: `wick.toml` at its root, or
//! else the part of `.devcontainer/devcontainer.json` (or `.devcontainer.json`) that maps
//! cleanly onto a wick VM. `wick vm run PATH` and `wick vm create --from-dir DIR` read it.
//!
//! A [`Project`] is only data: what the file asks for, with every unsupported devcontainer field
//! named in [`Project::notes`] (never silently dropped). Flags on the command line win over the
//! file ([`Project::fill`]); the daemon validates the resulting request again, as for any create.
//! Errors name the file, line and column.

mod devcontainer;
mod wick_toml;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::VmSpecArgs;

/// The file names looked for, in order: the first one present is the project's definition.
pub const FILES: [&str; 3] = [
    "wick.toml",
    ".devcontainer/devcontainer.json",
    ".devcontainer.json",
];

/// Largest project file read.
const MAX_FILE_LEN: u64 = 1 << 20;

/// What a repository asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Project {
    /// The file this came from.
    pub source: PathBuf,
    pub image: Option<String>,
    /// A managed kernel (`wick kernel list`), as `--kernel`.
    pub kernel: Option<String>,
    pub vcpu: Option<i64>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub nat: Option<bool>,
    pub allow_hosts: Vec<String>,
    /// `[HOST_IP:]HOST_PORT:GUEST_PORT` each, as `--publish`.
    pub ports: Vec<String>,
    /// Environment of every command `vm run` runs (setup, run commands, the command).
    pub env: Vec<(String, String)>,
    /// The guest user the run commands and the command run as (default root).
    pub user: Option<String>,
    /// Built once per image into a cached image (`wick image build --from`).
    pub setup: Setup,
    /// Shell commands run in the repository at every `vm run`, before the command.
    pub run: Vec<String>,
    /// The command of `vm run PATH` when none is given (a shell command line).
    pub default_command: Option<String>,
    /// What the file holds that wick does not use, one line each (printed as warnings).
    pub notes: Vec<String>,
}

/// Steps baked into an image once: packages, then shell commands, as root, without the
/// repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setup {
    pub packages: Vec<String>,
    pub commands: Vec<String>,
}

impl Setup {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.commands.is_empty()
    }
}

impl Project {
    /// The project definition in directory `dir` (a repository's root), if it has one.
    pub fn find(dir: &Path) -> Result<Option<Project>> {
        for name in FILES {
            let path = dir.join(name);
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            // The repository may be hostile: no FIFO (a hang), device or huge file.
            if !meta.is_file() || meta.len() > MAX_FILE_LEN {
                anyhow::bail!(
                    "{}: not a regular file of at most {} KiB",
                    path.display(),
                    MAX_FILE_LEN >> 10
                );
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let project = if name.ends_with(".toml") {
                wick_toml::parse(&text)
            } else {
                devcontainer::parse(&text)
            };
            let mut project = project.map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
            project.source = path;
            return Ok(Some(project));
        }
        Ok(None)
    }

    /// Fills what `args` leaves open from the file: a flag given on the command line wins.
    /// `--allow-host` on the command line also overrides the file's `nat`, and `--nat` the
    /// file's allowlist (they contradict each other).
    pub fn fill(&self, args: &mut VmSpecArgs) {
        fill(&mut args.image, &self.image);
        fill(&mut args.kernel, &self.kernel);
        fill(&mut args.vcpu, &self.vcpu);
        fill(&mut args.memory, &self.memory);
        fill(&mut args.disk_size, &self.disk);
        let network_given = args.nat || !args.allow_host.is_empty();
        if !network_given {
            args.nat = self.nat.unwrap_or(false);
            args.allow_host = self.allow_hosts.clone();
        }
        if args.publish.is_empty() {
            args.publish = self.ports.clone();
        }
    }

    /// One line for the terminal: which file was read and what it changes.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(i) = &self.image {
            parts.push(format!("image {i}"));
        }
        if let Some(k) = &self.kernel {
            parts.push(format!("kernel {k}"));
        }
        if !self.setup.is_empty() {
            parts.push(format!(
                "setup of {} package(s) and {} command(s)",
                self.setup.packages.len(),
                self.setup.commands.len()
            ));
        }
        if self.nat == Some(true) {
            parts.push("NAT on".into());
        }
        if !self.allow_hosts.is_empty() {
            parts.push(format!("allow {}", self.allow_hosts.join(", ")));
        }
        if !self.ports.is_empty() {
            parts.push(format!("publish {}", self.ports.join(", ")));
        }
        if !self.run.is_empty() {
            parts.push(format!("{} run command(s)", self.run.len()));
        }
        let file = self
            .source
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        match parts.is_empty() {
            true => format!("project: {file}"),
            false => format!("project: {file}: {}", parts.join("; ")),
        }
    }
}

fn fill<T: Clone>(slot: &mut Option<T>, from: &Option<T>) {
    if slot.is_none() {
        slot.clone_from(from);
    }
}

/// A 1-based line and column for byte offset `pos` of `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// An error at byte offset `pos`: `LINE:COL: message` (the caller prefixes the file).
fn at(text: &str, pos: usize, msg: impl std::fmt::Display) -> anyhow::Error {
    let (line, col) = line_col(text, pos);
    anyhow::anyhow!("{line}:{col}: {msg}")
}

/// Checks shared by both formats: sizes, vcpus, ports, env names. `pos` gives each value's
/// offset for the error.
fn check_size(text: &str, pos: usize, key: &str, value: &str) -> Result<()> {
    wick_model::parse_size_mib(value).map_err(|e| at(text, pos, format!("{key}: {e}")))?;
    Ok(())
}

fn check_port(text: &str, pos: usize, key: &str, value: &str) -> Result<()> {
    wick_model::PortMapping::parse(value).map_err(|e| at(text, pos, format!("{key}: {e}")))?;
    Ok(())
}

fn check_env_name(text: &str, pos: usize, key: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(at(
            text,
            pos,
            format!("{key}: `{name}` is not an environment variable name (letters, digits, `_`)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        let t = "a\nbc\ndef";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 2));
        assert_eq!(line_col(t, 5), (3, 1));
        assert_eq!(line_col(t, 99), (3, 4));
    }

    #[test]
    fn flags_win_over_the_file() {
        let p = Project {
            image: Some("py".into()),
            vcpu: Some(4),
            nat: Some(true),
            ports: vec!["8080:80".into()],
            ..Default::default()
        };
        let mut args = VmSpecArgs {
            vcpu: Some(1),
            ..Default::default()
        };
        p.fill(&mut args);
        assert_eq!(args.image.as_deref(), Some("py"));
        assert_eq!(args.vcpu, Some(1));
        assert!(args.nat);
        assert_eq!(args.publish, ["8080:80"]);

        let mut args = VmSpecArgs {
            allow_host: vec!["github.com".into()],
            ..Default::default()
        };
        p.fill(&mut args);
        assert!(
            !args.nat,
            "--allow-host on the command line overrides the file's nat"
        );
    }

    #[test]
    fn wick_toml_wins_over_devcontainer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".devcontainer")).unwrap();
        std::fs::write(
            dir.path().join(".devcontainer/devcontainer.json"),
            r#"{"image": "a"}"#,
        )
        .unwrap();
        let p = Project::find(dir.path()).unwrap().unwrap();
        assert_eq!(p.image.as_deref(), Some("a"));
        std::fs::write(dir.path().join("wick.toml"), "image = \"b\"\n").unwrap();
        let p = Project::find(dir.path()).unwrap().unwrap();
        assert_eq!(p.image.as_deref(), Some("b"));
        assert!(p.source.ends_with("wick.toml"));
        assert!(Project::find(&dir.path().join(".devcontainer"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("wick.toml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = Project::find(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("wick.toml"),
            "vcpu = 2\nmemory = \"lots\"\n",
        )
        .unwrap();
        let err = Project::find(dir.path()).unwrap_err().to_string();
        assert!(err.contains("wick.toml:2:10: memory"), "{err}");
    }
}
