//! Client-side checks of user input, with the same rules (and messages) as the daemon, so bad
//! input is refused before anything is sent. The daemon validates again.

use anyhow::{bail, Result};
use wick_model::api::{CreateVmRequest, SetVmRequest};
use wick_model::{parse_size_mib, validate_vm_name};

use crate::cli::{SetArgs, VmSpecArgs, WorkspaceFlags};

/// A VM name: a DNS label.
pub fn name(name: &str) -> Result<()> {
    validate_vm_name(name)?;
    Ok(())
}

/// A vcpu count given as `flag`.
pub fn vcpu(flag: &str, n: i64) -> Result<()> {
    if n < 1 {
        bail!("{flag} must be at least 1 (got {n})");
    }
    if n > u32::MAX as i64 {
        bail!("{flag} {n} is too large");
    }
    Ok(())
}

/// A size given as `flag`, in MiB.
pub fn size(flag: &str, s: &str) -> Result<u64> {
    parse_size_mib(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

impl VmSpecArgs {
    /// The `POST /v1/vms` body, after checking every value.
    pub fn to_request(&self, no_start: bool) -> Result<CreateVmRequest> {
        if let Some(n) = &self.name {
            name(n)?;
        }
        if let Some(v) = self.vcpu {
            vcpu("--vcpu", v)?;
        }
        if let Some(m) = &self.memory {
            size("--memory", m)?;
        }
        if let Some(d) = &self.disk_size {
            size("--disk-size", d)?;
        }
        if let Some(i) = &self.image {
            if i.trim().is_empty() {
                bail!("--image is empty; omit it to use the default image");
            }
        }
        if self.nat && !self.allow_host.is_empty() {
            bail!(
                "--nat and --allow-host contradict each other: --nat lets the guest reach every \
                 host, --allow-host only the listed ones; give one of them"
            );
        }
        Ok(CreateVmRequest {
            name: self.name.clone(),
            image: self.image.clone(),
            kernel: self.kernel.clone(),
            vcpu: self.vcpu,
            memory: self.memory.clone(),
            disk_size: self.disk_size.clone(),
            nat: self.nat,
            allow_hosts: self.allow_host.clone(),
            no_start,
            publish: self
                .publish
                .iter()
                .map(|p| wick_model::PortMapping::parse(p).map(|_| p.clone()))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?,
            init: self.init,
            ..Default::default()
        })
    }
}

impl WorkspaceFlags {
    /// The workspace options, after checking the flags that need no repository (`--mode`,
    /// `--from` without `--branch`); the rest is checked by [`wick_workspace::inspect`].
    pub fn to_options(&self) -> Result<wick_workspace::PrepareOptions> {
        if self.from.is_some() && self.branch.is_none() {
            return Err(wick_workspace::WorkspaceError::FromWithoutBranch.into());
        }
        let mode = match &self.mode {
            Some(m) => m.parse::<wick_workspace::Mode>()?,
            None => wick_workspace::Mode::default(),
        };
        Ok(wick_workspace::PrepareOptions {
            mode,
            branch: self.branch.clone(),
            from: self.from.clone(),
            include_untracked: self.include_untracked,
        })
    }
}

impl SetArgs {
    /// The request body, after checking every value; at least one change is required.
    pub fn to_request(&self) -> Result<SetVmRequest> {
        if self.vcpu.is_none()
            && self.memory.is_none()
            && self.nat.is_none()
            && self.publish.is_empty()
            && self.unpublish.is_empty()
            && self.allow_host.is_empty()
            && self.deny_host.is_empty()
        {
            bail!(
                "nothing to change: pass at least one of --vcpu, --memory, --nat on|off, --allow-host, --deny-host, --publish or --unpublish"
            );
        }
        for p in &self.publish {
            wick_model::PortMapping::parse(p).map_err(anyhow::Error::msg)?;
        }
        if let Some(v) = self.vcpu {
            vcpu("--vcpu", v)?;
        }
        if let Some(m) = &self.memory {
            size("--memory", m)?;
        }
        Ok(SetVmRequest {
            workspace: None,
            publish_add: self.publish.clone(),
            publish_remove: self.unpublish.clone(),
            vcpu: self.vcpu,
            memory: self.memory.clone(),
            nat: self.nat.map(|n| n.as_bool()),
            allow_host_add: self.allow_host.clone(),
            allow_host_remove: self.deny_host.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command, VmCommand};

    fn create_err(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(["wick", "vm", "create"].iter().chain(args)).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        a.vm.to_request(a.no_start).unwrap_err().to_string()
    }

    fn set_result(args: &[&str]) -> anyhow::Result<wick_model::api::SetVmRequest> {
        let cli = Cli::try_parse_from(["wick", "vm", "set", "a1"].iter().chain(args)).unwrap();
        let Command::Vm(VmCommand::Set(a)) = cli.command else {
            panic!()
        };
        a.to_request()
    }

    #[test]
    fn create_messages() {
        assert_eq!(
            create_err(&["--vcpu", "0"]),
            "--vcpu must be at least 1 (got 0)"
        );
        assert_eq!(
            create_err(&["--vcpu", "-2"]),
            "--vcpu must be at least 1 (got -2)"
        );
        let m = create_err(&["--memory", "lots"]);
        assert!(m.starts_with("--memory: invalid size \"lots\""), "{m}");
        assert!(m.contains("512M, 2G"), "{m}");
        let m = create_err(&["--memory", "0"]);
        assert!(m.contains("must be greater than zero"), "{m}");
        let m = create_err(&["--disk-size", "1.5G"]);
        assert!(m.starts_with("--disk-size: invalid size"), "{m}");
        let m = create_err(&["--name", "-bad"]);
        assert_eq!(m, "VM name \"-bad\" must not start or end with '-'");
        let m = create_err(&["--name", "Bad"]);
        assert!(m.contains("'B' at position 1"), "{m}");
    }

    #[test]
    fn create_request_passes_what_the_user_typed() {
        let cli = Cli::try_parse_from([
            "wick", "vm", "create", "--name", "a1", "--memory", "2G", "--vcpu", "3", "--nat",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        let r = a.vm.to_request(a.no_start).unwrap();
        assert_eq!(r.name.as_deref(), Some("a1"));
        assert_eq!(r.memory.as_deref(), Some("2G"));
        assert_eq!(r.vcpu, Some(3));
        assert!(r.nat && !r.no_start);
        assert_eq!(r.disk_size, None);
        assert_eq!(r.init, None);
        let cli = Cli::try_parse_from(["wick", "vm", "create", "--init", "wick"]).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            a.vm.to_request(false).unwrap().init,
            Some(wick_model::InitMode::Wick)
        );
        let e = Cli::try_parse_from(["wick", "vm", "create", "--init", "sysv"]).unwrap_err();
        assert!(e.to_string().contains("use auto, wick or image"), "{e}");
    }

    #[test]
    fn workspace_flags() {
        let cli = Cli::try_parse_from(["wick", "vm", "run", ".", "--from", "v1"]).unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!()
        };
        let m = a.workspace.to_options().unwrap_err().to_string();
        assert!(m.starts_with("--from needs --branch"), "{m}");
        let cli = Cli::try_parse_from(["wick", "vm", "run", ".", "--mode", "deep"]).unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!()
        };
        let m = a.workspace.to_options().unwrap_err().to_string();
        assert!(m.contains("unknown workspace mode \"deep\""), "{m}");
        let cli = Cli::try_parse_from([
            "wick",
            "vm",
            "run",
            ".",
            "--mode",
            "full-copy",
            "--branch",
            "wip",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!()
        };
        let o = a.workspace.to_options().unwrap();
        assert_eq!(o.mode, wick_workspace::Mode::FullCopy);
        assert_eq!(o.branch.as_deref(), Some("wip"));
    }

    #[test]
    fn allow_host_flags() {
        let m = create_err(&["--nat", "--allow-host", "github.com"]);
        assert!(m.contains("contradict"), "{m}");
        let cli = Cli::try_parse_from([
            "wick",
            "vm",
            "run",
            ".",
            "--allow-host",
            "github.com",
            "--allow-host",
            "*.pypi.org",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!()
        };
        let r = a.vm.to_request(false).unwrap();
        assert_eq!(r.allow_hosts, ["github.com", "*.pypi.org"]);
        assert!(!r.nat);
        let r = set_result(&["--allow-host", "a.test", "--deny-host", "b.test"]).unwrap();
        assert_eq!(r.allow_host_add, ["a.test"]);
        assert_eq!(r.allow_host_remove, ["b.test"]);
    }

    #[test]
    fn set_needs_a_change() {
        let m = set_result(&[]).unwrap_err().to_string();
        assert!(m.starts_with("nothing to change"), "{m}");
        assert_eq!(
            set_result(&["--vcpu", "0"]).unwrap_err().to_string(),
            "--vcpu must be at least 1 (got 0)"
        );
        let r = set_result(&["--nat", "on"]).unwrap();
        assert_eq!((r.nat, r.vcpu, r.memory), (Some(true), None, None));
    }
}
