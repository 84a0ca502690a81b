//! `config.toml`: parsed strictly (unknown keys are errors naming the key), then resolved.
//!
//! `[vm_defaults]` resolve config → host heuristic → built-in, each value keeping its
//! [`Provenance`] so `wick config show` and `wick doctor` can say where it came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wick_model::api::{Provenance, Resolved, ResolvedDefaults};
use wick_model::parse_size_mib;

mod pool;
pub use pool::PoolConfig;

/// Largest vCPU count a VM may ask for (Firecracker's limit).
pub const MAX_VCPU: u64 = 32;
/// Default `vmm_uid_range`: far above any login or system uid, below 2^31.
pub const DEFAULT_VMM_UIDS: std::ops::RangeInclusive<u32> = 1_900_000_000..=1_900_065_535;
/// Largest disk a VM may ask for: 16 TiB.
pub const MAX_DISK_MIB: u64 = 16 * 1024 * 1024;

/// The daemon's configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `error|warn|info|debug|trace` (the `RUST_LOG` env var wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// VMM driver: `auto` (Firecracker when its binary exists and KVM can boot guests, else
    /// QEMU), `firecracker`, `qemu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<String>,
    /// QEMU binary (default `qemu-system-x86_64` on PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_bin: Option<PathBuf>,
    /// Ignored: QEMU's agent channel no longer uses `vhost-device-vsock` (its sidecar is wickd
    /// itself, `wickd vsock-mux`). Accepted so that older config files still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_vsock_bin: Option<PathBuf>,
    /// QEMU acceleration: `auto` (probe KVM once, fall back to TCG), `kvm`, `tcg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Path of the Firecracker binary (default: `firecracker` on PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firecracker_bin: Option<PathBuf>,
    /// Firecracker's `jailer` (chroot, cgroup, uid drop). Unset: wickd itself confines
    /// Firecracker (uid, cgroup), without a chroot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jailer_bin: Option<PathBuf>,
    /// Run every VMM and sidecar as its VM's own unprivileged uid in a per-VM cgroup (default
    /// true). `false` runs them as root, unconfined: for debugging and benchmarks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contain_vmm: Option<bool>,
    /// The uids (and gids) leased to VMMs, one per VM: `"FIRST-LAST"` (default
    /// `"1900000000-1900065535"`). They must belong to no user or group of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_uid_range: Option<String>,
    /// Parent cgroup of the per-VM cgroups (`<parent>/vm-<12 hex>`; default `wick`). The
    /// start-up sweep removes `vm-*` cgroups under it that belong to no VM: one parent per wickd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    /// Refuse to start a VM without hardware virtualization (QEMU's TCG is not a security
    /// boundary). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_kvm: Option<bool>,
    /// Image used when `vm create` names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image_name: Option<String>,
    /// Bound on every wait for the VMM/guest during start (e.g. `30s`, `2m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout: Option<String>,
    /// Graceful stop window before the VMM is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<String>,
    /// Group given read/write access to the API socket (mode 0660).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Give VMs a network (bridge, TAP, IP, DNS, optional NAT). Off only on hosts without
    /// CAP_NET_ADMIN or for VMs that must have no NIC at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<bool>,
    /// Bridge the VMs' TAPs hang off (default `wick0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_name: Option<String>,
    /// The bridge's address: the guests' gateway and DNS server (default `172.30.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_ip: Option<String>,
    /// The guests' network (default `172.30.0.0/24`); must contain `bridge_ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Let VMs reach each other (bridge port isolation off). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_vm_to_vm: Option<bool>,
    /// NAT backend: `auto` (nft, else iptables, else iptables-legacy), `nft`, `iptables`,
    /// `iptables-legacy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_backend: Option<String>,
    /// Port of the `.vm` DNS server on 127.0.0.1 (guests use port 53 on the bridge IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_port: Option<u16>,
    /// Upstream resolvers for names outside `.vm` (default: the host's resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_dns: Option<Vec<String>>,
    /// Route `.vm` through systemd-resolved (`resolvectl`) when it runs (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_integration: Option<bool>,
    /// Root disk backend: `auto` (reflink if the state dir can, else dm-snapshot where
    /// device-mapper exists, else the XFS pool where XFS and loop devices work, else copy),
    /// `reflink`, `dm-snapshot`, `pool` (the XFS pool), `copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_backend: Option<String>,
    /// Stop VMs untouched (no user action, no agent session) for this long (`0` = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_stale_after: Option<String>,
    /// What auto-stop does to an untouched VM: `stop` (default) or `suspend` (its state kept in
    /// its suspend image, the VMM ended; a VM whose suspend fails is stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_action: Option<String>,
    /// How often VM CPU/memory stats are sampled (and auto-stop checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_poll_interval: Option<String>,
    /// Cap of each VM's VMM log (`vmm.log` + `vmm.log.1`, the serial console), e.g. `8M`,
    /// `512K` (default 8 MiB, at least 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_log_max: Option<String>,
    /// Serve Prometheus metrics over plain HTTP at `ADDR:PORT` (a bare `PORT` means
    /// 127.0.0.1). Off by default; anyone who can reach it sees every VM's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Host files copied into each guest's `/root` at start (missing host files: a warning).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_sync: Vec<FileSync>,
    #[serde(default)]
    pub vm_defaults: VmDefaults,
    /// Host addresses non-root owners may publish ports on besides loopback (default none:
    /// loopback only). Root may publish on any address and any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_publish_addresses: Vec<String>,
    /// `[limits]`: what each non-root owner's VMs may add up to.
    #[serde(default)]
    pub limits: Limits,
    /// Registered images by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, ImageConfig>,
    /// `[pool]`: the warm pool (off when absent or `size = 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolConfig>,
}

/// A byte size: `65536`, `512K`, `8M`, `1G` (binary units; a bare number means bytes).
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let bad = || format!("{s:?} is not a size; use a number with an optional K, M or G suffix");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mul: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `[[file_sync]]`: a host file copied into the guest at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSync {
    pub host: PathBuf,
    /// Absolute guest path under `/root`.
    pub guest: String,
    /// Octal permission bits as a string, e.g. `"0600"` (default `0600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `[vm_defaults]`: sizes as strings (`2G`, `512M`, bare = MiB).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// `[limits]`: per-owner totals for non-root owners, over all the VMs they own (running or
/// not). Sizes as strings (`64G`, bare = MiB). Root's VMs are not limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Number of VMs (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<u64>,
    /// Sum of vCPUs (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u64>,
    /// Sum of memory (default: the host's RAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
    /// Sum of work disk sizes (default 1T).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk: Option<String>,
    /// Number of snapshots (default 8; each holds the guest's memory and disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u64>,
}

/// [`Limits`] with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedLimits {
    pub max_vms: u64,
    pub max_vcpus: u64,
    pub max_memory_mib: u64,
    pub max_disk_mib: u64,
    pub max_snapshots: u64,
}

impl Limits {
    /// The limits with defaults (`host` gives the memory default).
    pub fn resolve(&self, host: &HostFacts) -> ResolvedLimits {
        let size = |s: &Option<String>, default: u64| {
            s.as_deref()
                .and_then(|s| parse_size_mib(s).ok())
                .unwrap_or(default)
        };
        ResolvedLimits {
            max_vms: self.max_vms.unwrap_or(16),
            max_vcpus: self.max_vcpus.unwrap_or(64),
            max_memory_mib: size(&self.max_memory, host.memory_mib.unwrap_or(16 * 1024)),
            max_disk_mib: size(&self.max_disk, 1024 * 1024),
            max_snapshots: self.max_snapshots.unwrap_or(8),
        }
    }
}

/// `[images.NAME]`: a root filesystem and the kernel that boots it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// The image runs wick-agent (wickd then waits for it and configures the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<bool>,
    /// ext4 image with the default `/root` contents, cloned into each VM's work disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_seed: Option<PathBuf>,
}

/// Kernel command line used when an image names none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw";

/// A configuration problem, with the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path`; a missing file is the empty config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Semantic checks beyond the TOML shape.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(v) = self.vm_defaults.vcpu {
            if v == 0 || v > MAX_VCPU {
                return Err(format!("vm_defaults.vcpu = {v}: must be 1..={MAX_VCPU}"));
            }
        }
        if let Some(m) = &self.vm_defaults.memory {
            parse_size_mib(m).map_err(|e| format!("vm_defaults.memory: {e}"))?;
        }
        if let Some(d) = &self.vm_defaults.disk {
            parse_size_mib(d).map_err(|e| format!("vm_defaults.disk: {e}"))?;
        }
        self.metrics_listen()?;
        for f in &self.file_sync {
            if !f.guest.starts_with("/root/") {
                return Err(format!(
                    "file_sync guest path {:?} must be under /root/",
                    f.guest
                ));
            }
            if let Some(m) = &f.mode {
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .map_err(|_| format!("file_sync mode {m:?}: use octal like \"0600\""))?;
            }
        }
        for (key, v) in [
            ("limits.max_memory", &self.limits.max_memory),
            ("limits.max_disk", &self.limits.max_disk),
        ] {
            if let Some(v) = v {
                parse_size_mib(v).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        for a in &self.user_publish_addresses {
            a.parse::<std::net::IpAddr>()
                .map_err(|_| format!("user_publish_addresses: {a:?} is not an IP address"))?;
        }
        for (key, v) in [
            ("boot_timeout", &self.boot_timeout),
            ("stop_timeout", &self.stop_timeout),
            ("auto_stop_stale_after", &self.auto_stop_stale_after),
            ("stats_poll_interval", &self.stats_poll_interval),
        ] {
            if let Some(v) = v {
                parse_duration(v).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        self.auto_stop_action()?;
        if let Some(v) = &self.vmm {
            if !["auto", "firecracker", "qemu"].contains(&v.as_str()) {
                return Err(format!("vmm = {v:?}: use auto, firecracker or qemu"));
            }
        }
        if let Some(a) = &self.accel {
            a.parse::<wick_vmm::qemu::Accel>()
                .map_err(|_| format!("accel = {a:?}: use auto, kvm or tcg"))?;
        }
        if let Some(b) = &self.nat_backend {
            if !["auto", "nft", "iptables", "iptables-legacy"].contains(&b.as_str()) {
                return Err(format!(
                    "nat_backend = {b:?}: use auto, nft, iptables or iptables-legacy"
                ));
            }
        }
        if let Some(p) = &self.pool {
            p.validate()?;
        }
        self.vmm_log_limit()?;
        self.network_settings()?;
        self.storage_choice()?;
        self.vmm_uid_range()?;
        if self.jailer_bin.is_some() && !self.contain_vmm() {
            return Err(
                "jailer_bin needs contain_vmm = true (the jailer runs the VM's uid and cgroup)"
                    .into(),
            );
        }
        self.cgroup_parent(&wick_model::Paths::new(None))?;
        if let Some(ups) = &self.upstream_dns {
            for u in ups {
                u.parse::<std::net::IpAddr>()
                    .map_err(|_| format!("upstream_dns: {u:?} is not an IP address"))?;
            }
        }
        for name in self.images.keys() {
            wick_model::validate_name(name)
                .map_err(|e| format!("images.{name}: image names follow VM name rules: {e}"))?;
        }
        Ok(())
    }

    /// The VMM log cap (`vmm_log_max`).
    pub fn vmm_log_limit(&self) -> Result<wick_vmm::log::LogLimit, String> {
        let Some(v) = &self.vmm_log_max else {
            return Ok(wick_vmm::log::LogLimit::default());
        };
        let max = parse_size_bytes(v).map_err(|e| format!("vmm_log_max: {e}"))?;
        if max < wick_vmm::log::MIN_LOG_MAX {
            return Err(format!(
                "vmm_log_max = {v:?}: must be at least 64K (the log must hold a boot's lines)"
            ));
        }
        Ok(wick_vmm::log::LogLimit { max })
    }

    /// The `metrics_listen` address, if set.
    pub fn metrics_listen(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let Some(v) = &self.metrics_listen else {
            return Ok(None);
        };
        if let Ok(port) = v.trim().parse::<u16>() {
            return Ok(Some((std::net::Ipv4Addr::LOCALHOST, port).into()));
        }
        v.trim().parse().map(Some).map_err(|_| {
            format!("metrics_listen = {v:?}: use ADDR:PORT (e.g. 127.0.0.1:9464) or a bare PORT")
        })
    }

    pub fn boot_timeout(&self) -> Duration {
        self.boot_timeout
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(30))
    }

    /// What auto-stop starts on an untouched VM (`auto_stop_action`): stop or suspend.
    pub fn auto_stop_action(&self) -> Result<wick_model::vm::LifecycleOp, String> {
        use wick_model::vm::LifecycleOp;
        match self.auto_stop_action.as_deref() {
            None | Some("stop") => Ok(LifecycleOp::Stop),
            Some("suspend") => Ok(LifecycleOp::Suspend),
            Some(other) => Err(format!(
                "auto_stop_action = {other:?}: use \"stop\" or \"suspend\""
            )),
        }
    }

    pub fn stop_timeout(&self) -> Duration {
        self.stop_timeout
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(10))
    }

    /// The configured root disk backend choice.
    pub fn storage_choice(&self) -> Result<wick_storage::BackendChoice, String> {
        match &self.storage_backend {
            None => Ok(wick_storage::BackendChoice::Auto),
            Some(s) => s.parse().map_err(|_| {
                format!("storage_backend = {s:?}: use auto, reflink, dm-snapshot, pool or copy")
            }),
        }
    }

    /// The uids leased to VMMs (`vmm_uid_range`).
    pub fn vmm_uid_range(&self) -> Result<std::ops::RangeInclusive<u32>, String> {
        let Some(r) = &self.vmm_uid_range else {
            return Ok(DEFAULT_VMM_UIDS);
        };
        let bad = || {
            format!(
                "vmm_uid_range = {r:?}: use \"FIRST-LAST\" with 1000 <= FIRST <= LAST < 4294967295"
            )
        };
        let (a, b) = r.split_once('-').ok_or_else(bad)?;
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a < 1000 || a > b || b == u32::MAX {
            return Err(bad());
        }
        Ok(a..=b)
    }

    /// Parent of the per-VM cgroups: `cgroup_parent`, else the layout's default
    /// ([`wick_model::Paths::default_cgroup_parent`]).
    pub fn cgroup_parent(&self, paths: &wick_model::Paths) -> Result<String, String> {
        let p = self
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| paths.default_cgroup_parent());
        let ok = !p.is_empty()
            && p.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            });
        if ok {
            Ok(p)
        } else {
            Err(format!(
                "cgroup_parent = {p:?}: use a relative cgroup path of letters, digits, `-`, `_`, `.`"
            ))
        }
    }

    /// Whether VMMs run confined (`contain_vmm`, default true).
    pub fn contain_vmm(&self) -> bool {
        self.contain_vmm.unwrap_or(true)
    }

    pub fn default_image_name(&self) -> &str {
        self.default_image_name.as_deref().unwrap_or("default")
    }

    /// `[vm_defaults]` resolved against `host`.
    pub fn resolve_defaults(&self, host: &HostFacts) -> ResolvedDefaults {
        let vcpu = match self.vm_defaults.vcpu {
            Some(v) => Resolved {
                value: v,
                source: Provenance::Config,
            },
            None => match host.cpus {
                Some(c) if c / 4 >= 1 => Resolved {
                    value: (c / 4).min(4),
                    source: Provenance::HostHeuristic,
                },
                _ => Resolved {
                    value: 1,
                    source: Provenance::BuiltIn,
                },
            },
        };
        let memory_mib = match self.vm_defaults.memory.as_deref().map(parse_size_mib) {
            Some(Ok(m)) => Resolved {
                value: m,
                source: Provenance::Config,
            },
            _ => match host.memory_mib {
                Some(m) if m / 8 >= 512 => Resolved {
                    value: (m / 8).min(8192),
                    source: Provenance::HostHeuristic,
                },
                _ => Resolved {
                    value: 512,
                    source: Provenance::BuiltIn,
                },
            },
        };
        let disk_mib = match self.vm_defaults.disk.as_deref().map(parse_size_mib) {
            Some(Ok(d)) => Resolved {
                value: d,
                source: Provenance::Config,
            },
            _ => Resolved {
                value: 8192,
                source: Provenance::BuiltIn,
            },
        };
        ResolvedDefaults {
            vcpu,
            memory_mib,
            disk_mib,
        }
    }
}

/// The network settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    pub bridge_name: String,
    /// `bridge_ip/prefix`, as the bridge carries it.
    pub bridge_cidr: String,
    pub bridge_ip: std::net::Ipv4Addr,
    pub allow_vm_to_vm: bool,
    pub nat_backend: String,
    pub dns_port: u16,
}

impl Config {
    /// Whether VMs get a network.
    pub fn network_enabled(&self) -> bool {
        self.network.unwrap_or(true)
    }

    /// Bridge, addresses and NAT backend with defaults applied.
    pub fn network_settings(&self) -> Result<NetworkSettings, String> {
        let bridge_name = self.bridge_name.clone().unwrap_or_else(|| "wick0".into());
        if bridge_name.is_empty() || bridge_name.len() > 15 || bridge_name.starts_with("wk-") {
            return Err(format!(
                "bridge_name = {bridge_name:?}: use 1-15 characters, not starting with \"wk-\" (reserved for VM TAPs)"
            ));
        }
        let ip_s = self
            .bridge_ip
            .clone()
            .unwrap_or_else(|| "172.30.0.1".into());
        let bridge_ip: std::net::Ipv4Addr = ip_s
            .parse()
            .map_err(|_| format!("bridge_ip = {ip_s:?} is not an IPv4 address"))?;
        let cidr = self.cidr.clone().unwrap_or_else(|| "172.30.0.0/24".into());
        let (net, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("cidr = {cidr:?}: use ADDRESS/PREFIX, e.g. 172.30.0.0/24"))?;
        let net: std::net::Ipv4Addr = net
            .parse()
            .map_err(|_| format!("cidr = {cidr:?}: bad network address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("cidr = {cidr:?}: prefix must be 8..=30"))?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(bridge_ip) & mask != u32::from(net) & mask {
            return Err(format!("bridge_ip {bridge_ip} is outside cidr {cidr}"));
        }
        Ok(NetworkSettings {
            bridge_name,
            bridge_cidr: format!("{bridge_ip}/{prefix}"),
            bridge_ip,
            allow_vm_to_vm: self.allow_vm_to_vm.unwrap_or(false),
            nat_backend: self.nat_backend.clone().unwrap_or_else(|| "auto".into()),
            dns_port: self.dns_port.unwrap_or(10053),
        })
    }
}

/// Facts about the host the heuristics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: Option<u64>,
    pub memory_mib: Option<u64>,
}

impl HostFacts {
    /// Reads CPU count and `MemTotal` from this host.
    pub fn probe() -> HostFacts {
        let cpus = std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u64);
        let memory_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map(|kb| kb / 1024)
        });
        HostFacts { cpus, memory_mib }
    }
}

/// Parses `30s`, `5m`, `2h`, `500ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 500ms, 30s, 5m, 2h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: use e.g. 500ms, 30s, 5m, 2h"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// The example `wick daemon install` writes: every commented setting, uncommented, is a
    /// valid config (so it names no key the daemon does not know).
    #[test]
    fn the_install_example_is_a_valid_config() {
        let example = wick_model::paths::CONFIG_EXAMPLE;
        assert_eq!(parse(example), Ok(Config::default()));
        let uncommented: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let all = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(all.vmm.as_deref(), Some("auto"));
        assert_eq!(all.file_sync.len(), 1);
        assert_eq!(all.limits.max_vms, Some(16));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("bogus_key = 1").unwrap_err();
        assert!(e.contains("bogus_key"), "{e}");
        let e = parse("[vm_defaults]\nram = \"1G\"").unwrap_err();
        assert!(e.contains("ram"), "{e}");
    }

    #[test]
    fn bad_values_refused() {
        assert!(parse("[vm_defaults]\nvcpu = 0")
            .unwrap_err()
            .contains("vcpu"));
        assert!(parse("[vm_defaults]\nmemory = \"lots\"")
            .unwrap_err()
            .contains("memory"));
        assert!(parse("boot_timeout = \"soon\"")
            .unwrap_err()
            .contains("boot_timeout"));
        assert!(parse("vmm = \"vbox\"").unwrap_err().contains("vbox"));
        assert!(parse("accel = \"hvf\"").unwrap_err().contains("hvf"));
    }

    #[test]
    fn vmm_log_max_is_a_checked_size() {
        let c = parse("vmm_log_max = \"512K\"").unwrap();
        assert_eq!(c.vmm_log_limit().unwrap().max, 512 << 10);
        assert_eq!(
            Config::default().vmm_log_limit().unwrap().max,
            wick_vmm::log::DEFAULT_LOG_MAX
        );
        for bad in ["\"lots\"", "\"1K\"", "\"99999999999G\""] {
            let e = parse(&format!("vmm_log_max = {bad}")).unwrap_err();
            assert!(e.contains("vmm_log_max"), "{e}");
        }
    }

    #[test]
    fn defaults_resolve_with_provenance() {
        let host = HostFacts {
            cpus: Some(8),
            memory_mib: Some(16384),
        };
        let d = Config::default().resolve_defaults(&host);
        assert_eq!(
            d.vcpu,
            Resolved {
                value: 2,
                source: Provenance::HostHeuristic
            }
        );
        assert_eq!(
            d.memory_mib,
            Resolved {
                value: 2048,
                source: Provenance::HostHeuristic
            }
        );
        assert_eq!(
            d.disk_mib,
            Resolved {
                value: 8192,
                source: Provenance::BuiltIn
            }
        );

        let small = HostFacts {
            cpus: Some(2),
            memory_mib: Some(2048),
        };
        let d = Config::default().resolve_defaults(&small);
        assert_eq!(d.vcpu.source, Provenance::BuiltIn);
        assert_eq!(
            d.memory_mib,
            Resolved {
                value: 512,
                source: Provenance::BuiltIn
            }
        );

        let big = HostFacts {
            cpus: Some(64),
            memory_mib: Some(1 << 20),
        };
        let d = Config::default().resolve_defaults(&big);
        assert_eq!((d.vcpu.value, d.memory_mib.value), (4, 8192));

        let c = parse("[vm_defaults]\nvcpu = 3\nmemory = \"1G\"\ndisk = \"4G\"").unwrap();
        let d = c.resolve_defaults(&host);
        assert_eq!(
            d.vcpu,
            Resolved {
                value: 3,
                source: Provenance::Config
            }
        );
        assert_eq!(d.memory_mib.value, 1024);
        assert_eq!(d.disk_mib.value, 4096);
    }

    #[test]
    fn network_settings() {
        let n = Config::default().network_settings().unwrap();
        assert_eq!(n.bridge_cidr, "172.30.0.1/24");
        assert_eq!(n.bridge_name, "wick0");
        assert!(parse("bridge_ip = \"10.0.0.1\"")
            .unwrap_err()
            .contains("outside cidr"));
        assert!(parse("bridge_name = \"wk-x\"")
            .unwrap_err()
            .contains("reserved"));
        assert!(parse("nat_backend = \"pf\"").unwrap_err().contains("pf"));
        let c = parse("bridge_ip = \"10.9.0.1\"\ncidr = \"10.9.0.0/16\"").unwrap();
        assert_eq!(c.network_settings().unwrap().bridge_cidr, "10.9.0.1/16");
    }

    #[test]
    fn auto_stop_action_is_stop_or_suspend() {
        use wick_model::vm::LifecycleOp;
        assert_eq!(Config::default().auto_stop_action(), Ok(LifecycleOp::Stop));
        let c = parse("auto_stop_action = \"suspend\"").unwrap();
        assert_eq!(c.auto_stop_action(), Ok(LifecycleOp::Suspend));
        let e = parse("auto_stop_action = \"hibernate\"").unwrap_err();
        assert!(
            e.contains("auto_stop_action") && e.contains("hibernate"),
            "{e}"
        );
    }

    #[test]
    fn limits_and_publish_addresses() {
        let host = HostFacts {
            cpus: Some(2),
            memory_mib: Some(4096),
        };
        let l = Config::default().limits.resolve(&host);
        assert_eq!(
            (l.max_vms, l.max_vcpus, l.max_memory_mib, l.max_disk_mib),
            (16, 64, 4096, 1 << 20)
        );
        let c = parse("[limits]\nmax_vms = 2\nmax_memory = \"1G\"\nmax_disk = \"10G\"").unwrap();
        let l = c.limits.resolve(&host);
        assert_eq!(
            (l.max_vms, l.max_memory_mib, l.max_disk_mib),
            (2, 1024, 10240)
        );
        assert!(parse("[limits]\nmax_memory = \"lots\"")
            .unwrap_err()
            .contains("limits.max_memory"));
        assert!(parse("[limits]\nmax_ram = 1")
            .unwrap_err()
            .contains("max_ram"));
        assert!(parse("user_publish_addresses = [\"10.0.0.5\"]").is_ok());
        assert!(parse("user_publish_addresses = [\"any\"]")
            .unwrap_err()
            .contains("user_publish_addresses"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("x").is_err());
    }
}
