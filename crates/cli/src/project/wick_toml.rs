//! `wick.toml`: the project's sandbox in wick's own terms (schema in the README, "The project's
//! sandbox"). Unknown keys are errors, with their line and column.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Deserialize;
use toml::Spanned;

use super::{at, check_env_name, check_port, check_size, Project, Setup};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    image: Option<Spanned<String>>,
    kernel: Option<String>,
    vcpu: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    nat: Option<bool>,
    #[serde(default)]
    allow_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    setup: SetupTable,
    #[serde(default)]
    run: RunTable,
}

/// `[setup]`: once per image.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetupTable {
    #[serde(default)]
    packages: Vec<Spanned<String>>,
    #[serde(default)]
    commands: Vec<String>,
}

/// `[run]`: at every `vm run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunTable {
    #[serde(default)]
    commands: Vec<String>,
    default: Option<String>,
}

/// Parses and checks `text`; errors are `LINE:COL: message`.
pub(super) fn parse(text: &str) -> Result<Project> {
    let file: File = toml::from_str(text).map_err(|e| {
        let pos = e.span().map_or(0, |s| s.start);
        at(text, pos, e.message())
    })?;
    check(text, &file)?;
    Ok(Project {
        image: file.image.map(Spanned::into_inner),
        kernel: file.kernel.filter(|k| !k.is_empty()),
        vcpu: file.vcpu.map(Spanned::into_inner),
        memory: file.memory.map(Spanned::into_inner),
        disk: file.disk.map(Spanned::into_inner),
        nat: file.nat,
        allow_hosts: file.allow_hosts,
        ports: file.ports.into_iter().map(Spanned::into_inner).collect(),
        user: file.user.filter(|u| !u.is_empty()),
        env: file
            .env
            .into_iter()
            .map(|(k, v)| (k.into_inner(), v))
            .collect(),
        setup: Setup {
            packages: file
                .setup
                .packages
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            commands: file.setup.commands,
        },
        run: file.run.commands,
        default_command: file.run.default.filter(|c| !c.trim().is_empty()),
        ..Default::default()
    })
}

fn check(text: &str, f: &File) -> Result<()> {
    if let Some(image) = &f.image {
        if image.get_ref().trim().is_empty() {
            return Err(at(text, image.span().start, "image is empty"));
        }
    }
    if let Some(vcpu) = &f.vcpu {
        if !(1..=u32::MAX as i64).contains(vcpu.get_ref()) {
            return Err(at(text, vcpu.span().start, "vcpu must be at least 1"));
        }
    }
    for (key, value) in [("memory", &f.memory), ("disk", &f.disk)] {
        if let Some(v) = value {
            check_size(text, v.span().start, key, v.get_ref())?;
        }
    }
    for p in &f.ports {
        check_port(text, p.span().start, "ports", p.get_ref())?;
    }
    for name in f.env.keys() {
        check_env_name(text, name.span().start, "env", name.get_ref())?;
    }
    for p in &f.setup.packages {
        // The daemon's rule for Debian package names.
        let name = p.get_ref();
        let ok = name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
        if !ok {
            return Err(at(
                text,
                p.span().start,
                format!("setup.packages: `{}` is not a package name", p.get_ref()),
            ));
        }
    }
    if f.nat == Some(true) && !f.allow_hosts.is_empty() {
        return Err(anyhow::anyhow!(
            "nat = true and allow_hosts contradict each other: give one of them"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
image = "python"
kernel = "k2"
vcpu = 2
memory = "2G"
disk = "8G"
allow_hosts = ["github.com", "*.pypi.org"]
ports = ["8080:80"]
user = "dev"

[env]
RUST_LOG = "debug"

[setup]
packages = ["jq", "python3-pip"]
commands = ["pip install tox"]

[run]
commands = ["make deps"]
default = "make test"
"#;

    #[test]
    fn the_whole_schema() {
        let p = parse(FULL).unwrap();
        assert_eq!(p.image.as_deref(), Some("python"));
        assert_eq!(p.kernel.as_deref(), Some("k2"));
        assert_eq!(p.vcpu, Some(2));
        assert_eq!(p.memory.as_deref(), Some("2G"));
        assert_eq!(p.disk.as_deref(), Some("8G"));
        assert_eq!(p.allow_hosts, ["github.com", "*.pypi.org"]);
        assert_eq!(p.ports, ["8080:80"]);
        assert_eq!(p.user.as_deref(), Some("dev"));
        assert_eq!(p.env, [("RUST_LOG".to_string(), "debug".to_string())]);
        assert_eq!(p.setup.packages, ["jq", "python3-pip"]);
        assert_eq!(p.setup.commands, ["pip install tox"]);
        assert_eq!(p.run, ["make deps"]);
        assert_eq!(p.default_command.as_deref(), Some("make test"));
        assert!(p.notes.is_empty());
        assert_eq!(parse("").unwrap(), Project::default());
    }

    #[test]
    fn errors_carry_line_and_column() {
        for (text, want) in [
            ("vcpu = 0\n", "1:8: vcpu must be at least 1"),
            ("\nmemory = \"2X\"\n", "2:10: memory:"),
            ("ports = [\"80\"]\n", "1:10: ports:"),
            ("[env]\n\"A-B\" = \"1\"\n", "2:1: env: `A-B`"),
            ("colour = 1\n", "1:1: unknown field `colour`"),
            ("[setup]\npackages = [\"jq; rm\"]\n", "2:13: setup.packages"),
            ("vcpu = \"two\"\n", "1:8: invalid type"),
            ("[run]\nbefore = []\n", "2:1: unknown field `before`"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
        let err = parse("nat = true\nallow_hosts = [\"a.b\"]\n").unwrap_err();
        assert!(err.to_string().contains("contradict"), "{err}");
    }
}
