//! The checks a VM's spec passes at create and `vm set` (every check the CLI makes, again):
//! sizes, published ports and the owner's `[limits]`.

use wick_model::api::ErrorCode;
use wick_model::{parse_size_mib, PortMapping, VmRecord, VmSpec};

use super::{Caller, Daemon};
use crate::config::{MAX_DISK_MIB, MAX_VCPU};
use crate::error::{Error, Result};

impl Daemon {
    /// Parses `--publish` values and refuses host ports already published by another VM (or
    /// twice in one request), and, for non-root callers, privileged ports and addresses other
    /// than loopback and `user_publish_addresses`.
    pub(super) fn check_publish(
        &self,
        specs: &[String],
        vm_id: Option<&str>,
        caller: Caller,
    ) -> Result<Vec<PortMapping>> {
        let mut out: Vec<PortMapping> = Vec::new();
        let taken: Vec<(String, PortMapping)> = self
            .store
            .list_vms(None)?
            .into_iter()
            .filter(|v| Some(v.id.as_str()) != vm_id)
            .flat_map(|v| v.spec.publish.into_iter().map(move |m| (v.name.clone(), m)))
            .collect();
        for s in specs {
            let m = PortMapping::parse(s).map_err(Error::invalid)?;
            if caller.uid != 0 {
                self.check_user_publish(&m)?;
            }
            if let Some((name, _)) = taken.iter().find(|(_, t)| t.host_port == m.host_port) {
                return Err(Error::conflict(format!(
                    "host port {} is already published by VM {name}",
                    m.host_port
                )));
            }
            if out.iter().any(|o| o.host_port == m.host_port) {
                return Err(Error::invalid(format!(
                    "host port {} is published twice",
                    m.host_port
                )));
            }
            out.push(m);
        }
        Ok(out)
    }

    /// What a non-root owner may publish: ports a non-root process could bind itself, on
    /// loopback or an address root listed in `user_publish_addresses`.
    pub(super) fn check_user_publish(&self, m: &PortMapping) -> Result<()> {
        let denied = |msg: String| Error::new(ErrorCode::PermissionDenied, msg);
        let start = unprivileged_port_start();
        if u32::from(m.host_port) < start {
            return Err(denied(format!(
                "host port {} is privileged (below net.ipv4.ip_unprivileged_port_start = {start}); \
                 only root may publish it: use a port >= {start}",
                m.host_port
            )));
        }
        let ip: std::net::IpAddr = m
            .host_ip
            .parse()
            .map_err(|_| Error::invalid(format!("bad host IP {}", m.host_ip)))?;
        let listed = self
            .config
            .user_publish_addresses
            .iter()
            .any(|a| a.parse::<std::net::IpAddr>().ok() == Some(ip));
        if !ip.is_loopback() && !listed {
            return Err(denied(format!(
                "host address {ip} is not loopback; only root may publish on it (root can allow \
                 it for everyone in user_publish_addresses in the config)"
            )));
        }
        Ok(())
    }

    /// Refuses `spec` (a new VM, or `old` = the current spec of VM `vm_id`) when it would take
    /// a non-root `owner` past a `[limits]` total. A change that does not grow a resource is
    /// never refused for it (limits lowered in the config do not block shrinking or `--nat`).
    /// Callers hold [`Daemon::quota`] until the record is saved.
    pub(super) fn check_limits(
        &self,
        owner: u32,
        current: Option<(&str, &VmSpec)>,
        spec: &VmSpec,
    ) -> Result<()> {
        if owner == 0 {
            return Ok(());
        }
        let vm_id = current.map(|(id, _)| id);
        let old = current.map(|(_, s)| s);
        let limits = self.config.limits.resolve(&self.host);
        let others: Vec<VmRecord> = self
            .store
            .list_vms(Some(owner))?
            .into_iter()
            .filter(|v| Some(v.id.as_str()) != vm_id)
            .collect();
        let sum = |f: fn(&VmSpec) -> u64| others.iter().map(|v| f(&v.spec)).sum::<u64>();
        let grows = |f: fn(&VmSpec) -> u64| old.is_none_or(|o| f(spec) > f(o));
        let checks = [
            (
                "max_vms",
                "VMs",
                others.len() as u64,
                1,
                limits.max_vms,
                old.is_none(),
            ),
            (
                "max_vcpus",
                "vCPUs",
                sum(|s| s.vcpu as u64),
                spec.vcpu as u64,
                limits.max_vcpus,
                grows(|s| s.vcpu as u64),
            ),
            (
                "max_memory",
                "MiB of memory",
                sum(|s| s.memory_mib),
                spec.memory_mib,
                limits.max_memory_mib,
                grows(|s| s.memory_mib),
            ),
            (
                "max_disk",
                "MiB of work disk",
                sum(|s| s.disk_mib),
                spec.disk_mib,
                limits.max_disk_mib,
                grows(|s| s.disk_mib),
            ),
        ];
        for (key, what, used, more, max, grows) in checks {
            if grows && used + more > max {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "limit [limits] {key} = {max} {what} per user: uid {owner}'s other VMs \
                         use {used}, this VM needs {more}; delete or shrink a VM, or ask root to \
                         raise the limit"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn check_memory(&self, m: &str) -> Result<u64> {
        let mib = parse_size_mib(m).map_err(|e| Error::invalid(format!("--memory: {e}")))?;
        if let Some(host) = self.host.memory_mib {
            if mib > host {
                return Err(Error::invalid(format!(
                    "--memory {m} is more than this host's {host} MiB of RAM"
                )));
            }
        }
        Ok(mib)
    }
}

/// `net.ipv4.ip_unprivileged_port_start` of wickd's network namespace (where it listens);
/// 1024 when unreadable.
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

pub(super) fn check_vcpu(v: i64) -> Result<u32> {
    if v < 1 || v as u64 > MAX_VCPU {
        return Err(Error::invalid(format!(
            "--vcpu {v}: must be between 1 and {MAX_VCPU}"
        )));
    }
    Ok(v as u32)
}

pub(super) fn check_disk(d: &str) -> Result<u64> {
    let mib = parse_size_mib(d).map_err(|e| Error::invalid(format!("--disk-size: {e}")))?;
    if mib > MAX_DISK_MIB {
        return Err(Error::invalid(format!(
            "--disk-size {d} is larger than the 16 TiB limit"
        )));
    }
    Ok(mib)
}
