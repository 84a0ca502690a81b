//! `vm set`: vcpu/memory take effect at the next start; capability changes (NAT, egress
//! allowlist, ports) live. Also the one check of an egress allowlist ([`check_allow_hosts`]),
//! shared with create.

use std::sync::Arc;

use wick_model::api::{ErrorCode, SetVmRequest};
use wick_model::{VmRecord, VmSpec};
use wick_store::now;

use super::checks::check_vcpu;
use super::{Caller, Daemon};
use crate::capability::{Capability, HookCtx};
use crate::error::{Error, Result};

impl Daemon {
    /// `vm set`: vcpu/memory take effect at the next start; capability changes (NAT) live.
    pub async fn set(
        self: &Arc<Self>,
        reference: &str,
        req: SetVmRequest,
        caller: Caller,
    ) -> Result<VmRecord> {
        if nothing_to_set(&req) {
            return Err(Error::invalid(
                "nothing to set: give --vcpu, --memory, --nat, --allow-host/--deny-host or ports \
                 to publish/unpublish",
            ));
        }
        let vcpu = req.vcpu.map(check_vcpu).transpose()?;
        let memory = req
            .memory
            .as_deref()
            .map(|m| self.check_memory(m))
            .transpose()?;
        let vm = self.find(reference, caller)?;
        let _g = self.ops.try_lock_vm(&vm.id, &vm.name, None)?;
        let mut vm = self.store.get_vm(&vm.id)?;
        let old = vm.spec.clone();
        if vm.runtime.restore.is_some() && (vcpu.is_some() || memory.is_some()) {
            // The saved state (a suspend image) is of a machine with the old vCPUs and memory.
            return Err(Error::conflict(format!(
                "VM {} is {} with a saved state of its vCPUs and memory; start it first, or                  stop it (which discards that state), then set them",
                vm.name, vm.state
            )));
        }
        if let Some(v) = vcpu {
            vm.spec.vcpu = v;
        }
        if let Some(m) = memory {
            vm.spec.memory_mib = m;
        }
        if let Some(n) = req.nat {
            vm.spec.nat = n;
        }
        set_allow_hosts(&mut vm, &req)?;
        if let Some(w) = &req.workspace {
            vm.spec.workspace = Some(w.clone());
        }
        self.set_ports(&mut vm, &req, caller)?;
        vm.touched_at = now();
        {
            let _quota = self.quota.lock().unwrap_or_else(|e| e.into_inner());
            self.check_limits(vm.owner, Some((&vm.id, &old)), &vm.spec)?;
            vm = self.store.save_vm(&vm)?;
        }
        for (i, cap) in self.caps.iter().enumerate() {
            if let Err(e) = cap
                .apply_config_change(&mut HookCtx::new(&mut vm, &self.store), &old)
                .await
            {
                // Roll the spec back, and the capabilities that already applied it, so the
                // record matches the host (a half-applied change could leave full NAT on while
                // the record says allowlist).
                let new = std::mem::replace(&mut vm.spec, old.clone());
                self.undo_config_change(&mut vm, &new, &self.caps[..i])
                    .await;
                self.store.save_vm(&vm)?;
                return Err(e);
            }
        }
        Ok(self.store.save_vm(&vm)?)
    }

    /// Re-applies `vm.spec` (the old spec) through `applied`, in reverse order, after a later
    /// capability refused the change to `new`.
    async fn undo_config_change(
        &self,
        vm: &mut VmRecord,
        new: &VmSpec,
        applied: &[Arc<dyn Capability>],
    ) {
        for cap in applied.iter().rev() {
            if let Err(e) = cap
                .apply_config_change(&mut HookCtx::new(vm, &self.store), new)
                .await
            {
                tracing::error!(vm = %vm.name, capability = cap.name(), "cannot undo a configuration change: {e}");
            }
        }
    }

    /// Unpublishes `publish_remove`, then publishes `publish_add` (checked like at create).
    fn set_ports(&self, vm: &mut VmRecord, req: &SetVmRequest, caller: Caller) -> Result<()> {
        for port in &req.publish_remove {
            if !vm.spec.publish.iter().any(|m| m.host_port == *port) {
                return Err(Error::new(
                    ErrorCode::NotFound,
                    format!("VM {} does not publish host port {port}", vm.name),
                ));
            }
            vm.spec.publish.retain(|m| m.host_port != *port);
        }
        let others: Vec<u16> = vm.spec.publish.iter().map(|m| m.host_port).collect();
        for m in self.check_publish(&req.publish_add, Some(&vm.id), caller)? {
            if others.contains(&m.host_port) {
                return Err(Error::conflict(format!(
                    "host port {} is already published by {}",
                    m.host_port, vm.name
                )));
            }
            vm.spec.publish.push(m);
        }
        Ok(())
    }
}

/// Checks an egress allowlist (each entry a host name or `*.suffix`, at most
/// [`wick_dns::MAX_ALLOW_HOSTS`]) and its combination with NAT; returns the canonical entries
/// (lowercase, no trailing dot, no duplicates).
pub(super) fn check_allow_hosts(hosts: &[String], nat: bool) -> Result<Vec<String>> {
    let patterns = wick_dns::parse_allow_hosts(hosts).map_err(Error::invalid)?;
    if nat && !patterns.is_empty() {
        return Err(Error::invalid(
            "--nat and --allow-host contradict each other: --nat lets the guest reach every \
             host, --allow-host only the listed ones (an allowlist already gets NAT to them); \
             give one of them (with vm set: --nat off to switch to an allowlist)",
        ));
    }
    Ok(patterns.iter().map(ToString::to_string).collect())
}

/// Applies `--deny-host` (each must be in the list) then `--allow-host`, and checks the result
/// with the (possibly just changed) NAT setting.
fn set_allow_hosts(vm: &mut VmRecord, req: &SetVmRequest) -> Result<()> {
    let changes = !req.allow_host_add.is_empty() || !req.allow_host_remove.is_empty();
    if !changes && req.nat != Some(true) {
        return Ok(());
    }
    let mut list = vm.spec.allow_hosts.clone();
    for host in &req.allow_host_remove {
        let p = wick_dns::HostPattern::parse(host)
            .map_err(|e| Error::invalid(e.replace("--allow-host", "--deny-host")))?
            .to_string();
        if !list.contains(&p) {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("{p} is not in the egress allowlist of VM {}", vm.name),
            ));
        }
        list.retain(|h| *h != p);
    }
    list.extend(req.allow_host_add.iter().cloned());
    vm.spec.allow_hosts = check_allow_hosts(&list, vm.spec.nat)?;
    Ok(())
}

fn nothing_to_set(req: &SetVmRequest) -> bool {
    req.vcpu.is_none()
        && req.memory.is_none()
        && req.nat.is_none()
        && req.allow_host_add.is_empty()
        && req.allow_host_remove.is_empty()
        && req.publish_add.is_empty()
        && req.publish_remove.is_empty()
        && req.workspace.is_none()
}
