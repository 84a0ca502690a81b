//! The durable VM record: what the user asked for (spec) and every host resource the VM holds
//! (runtime). The runtime is the single source of truth for cleanup — see the durability rule in
//! `ARCHITECTURE.md`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod lifecycle;
pub use lifecycle::{resume_hint, LifecycleOp, Next, TransitionError, VmAction};

/// Lifecycle state of a VM. Which action moves it where is one table: [`VmState::next`].
///
/// ```text
///  creating ──> stopped <──> starting ──> running ──> stopping ──> stopped
///                  ^             │           │ ^
///                  └── error <───┴─────────┐ v │ pause / resume
///                                          paused
///
///  running / paused ──suspend──> suspended ──start──> starting (loads the suspend image)
///                                    └──stop──> stopped (the image discarded)
/// ```
///
/// `paused`: the VMM process is alive with every host resource (TAP, DNS name, published
/// ports), its vCPUs stopped; nothing runs in the guest until `resume`.
///
/// `suspended`: no VMM and no host resource but the disks, the IP lease and the suspend image
/// (`runtime.restore`); the next start loads the image and the guest continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Stopped,
    Starting,
    Running,
    /// The VMM is alive but its vCPUs are stopped (`wick vm pause`).
    Paused,
    Stopping,
    Error,
    /// No VMM: the guest's memory and device state wait in its suspend image (`wick vm
    /// suspend`); the next start loads it.
    Suspended,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Error => "error",
            VmState::Suspended => "suspended",
        }
    }

    /// States in which the VM may hold a live VMM process.
    pub fn may_have_vmm(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    /// States in which the guest is up with its identity: its DNS name, published ports and
    /// network rules exist (a paused guest keeps them; connections wait for `resume`).
    pub fn guest_up(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "creating" => VmState::Creating,
            "stopped" => VmState::Stopped,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopping" => VmState::Stopping,
            "error" => VmState::Error,
            "suspended" => VmState::Suspended,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

/// What the VM is: fixed at create, changed only by `vm set`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub vcpu: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// Image name the root disk was cloned from.
    pub image: String,
    /// Kernel image path used to boot.
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    /// VMM driver (`firecracker`).
    pub vmm: String,
    /// Outbound NAT for the guest.
    #[serde(default)]
    pub nat: bool,
    /// Egress allowlist: when not empty, the guest reaches only these hosts (`name` or
    /// `*.suffix`), through NAT restricted to their resolved addresses; `nat` is then false.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// The image runs wick-agent: the daemon waits for it and configures the guest at start.
    #[serde(default)]
    pub agent: bool,
    /// Public keys for the guest's `/root/.ssh/authorized_keys`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Git identity set in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_email: Option<String>,
    /// Host ports forwarded to guest ports by wickd (`--publish`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortMapping>,
    /// The repository last prepared into the guest (`vm run PATH`, `vm workspace prepare`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceInfo>,
    /// Which init runs as the guest's PID 1 (`vm create --init`; `wick.init=` on the kernel
    /// command line).
    #[serde(default, skip_serializing_if = "InitMode::is_auto")]
    pub init: InitMode,
    /// The image's OCI config (user, working dir, env, entrypoint, cmd), copied at create so
    /// later changes to the image do not change this VM: the defaults of `vm exec` / `vm run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfig>,
}

/// Which init runs as the guest's PID 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// The image's `/sbin/init` when it is systemd (which starts wick-agent), else wick-init.
    #[default]
    Auto,
    /// wick-init stays PID 1: mounts, reaping, the agent (and sshd), poweroff.
    Wick,
    /// The image's own init, whatever it is.
    Image,
}

impl InitMode {
    pub fn is_auto(&self) -> bool {
        *self == InitMode::Auto
    }
    pub fn as_str(self) -> &'static str {
        match self {
            InitMode::Auto => "auto",
            InitMode::Wick => "wick",
            InitMode::Image => "image",
        }
    }
    /// The kernel command line word that asks wick-init for this mode (none for `auto`).
    pub fn boot_arg(self) -> Option<String> {
        (!self.is_auto()).then(|| format!("wick.init={}", self.as_str()))
    }
}

impl FromStr for InitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(InitMode::Auto),
            "wick" => Ok(InitMode::Wick),
            "image" => Ok(InitMode::Image),
            other => Err(format!("unknown init {other:?}: use auto, wick or image")),
        }
    }
}

/// The parts of an OCI image's config that become the defaults of `vm exec` and `vm run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageConfig {
    /// `NAME=VALUE` pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
}

impl ImageConfig {
    pub fn is_empty(&self) -> bool {
        *self == ImageConfig::default()
    }
    /// What `vm run` runs without a command: Entrypoint followed by Cmd.
    pub fn default_command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

/// A host repository copied into the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkspaceInfo {
    /// The host repository's top-level directory.
    pub source_path: String,
    pub guest_path: String,
    /// The host `HEAD` commit copied.
    pub head_commit: String,
    /// The branch checked out in the guest.
    #[serde(default)]
    pub branch: Option<String>,
    /// `shallow` or `full_copy`.
    pub mode: String,
    /// RFC 3339 UTC.
    pub prepared_at: String,
}

/// A published port: wickd listens on `host_ip:host_port` and forwards to the guest's
/// `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    pub host_ip: String,
    pub host_port: u16,
    pub guest_port: u16,
}

impl PortMapping {
    /// Parses `[HOST_IP:]HOST_PORT:GUEST_PORT`; the host IP defaults to `127.0.0.1`.
    pub fn parse(s: &str) -> Result<PortMapping, String> {
        let bad = || {
            format!("invalid --publish {s:?}: use [HOST_IP:]HOST_PORT:GUEST_PORT, e.g. 8080:8000")
        };
        let (host, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let (ip, hport) = match host.rsplit_once(':') {
            Some((ip, p)) => (ip.trim_matches(|c| c == '[' || c == ']'), p),
            None => ("127.0.0.1", host),
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{}: {ip:?} is not an IP address", bad()))?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
        Ok(PortMapping {
            host_ip: ip.to_string(),
            host_port: port(hport).ok_or_else(bad)?,
            guest_port: port(guest).ok_or_else(bad)?,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host_ip, self.host_port, self.guest_port)
    }
}

/// Identity of a running VMM process. Written to the durable runtime **before** the process is
/// spawned (sockets, log) and completed right after (pid, start time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmmHandle {
    pub driver: String,
    #[schema(value_type = String)]
    pub api_socket: PathBuf,
    #[schema(value_type = String)]
    pub vsock_socket: PathBuf,
    #[schema(value_type = String)]
    pub log_path: PathBuf,
    /// Process id, once spawned.
    pub pid: Option<u32>,
    /// `/proc/<pid>/stat` start time (clock ticks since boot): guards against pid reuse.
    pub start_time: Option<u64>,
    /// Helper processes the VMM needs (e.g. QEMU's agent-channel sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Sidecar>,
}

/// A helper process of a VMM. Its `socket` is planned (and persisted) before it is spawned, so
/// it can be found again by scanning `/proc` for that argument even if its pid was never saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sidecar {
    /// What it is (`vsock-mux`; `vhost-device-vsock` in older records).
    pub name: String,
    /// A path that appears verbatim on its command line.
    #[schema(value_type = String)]
    pub socket: PathBuf,
    pub pid: Option<u32>,
    pub start_time: Option<u64>,
}

/// Every host resource the VM holds right now. Cleared field by field as resources are released.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRuntime {
    /// Per-VM directory under the state root.
    #[schema(value_type = String)]
    pub dir: PathBuf,
    /// The VM's root disk (a copy-on-write clone of the image), as the VMM opens it.
    #[schema(value_type = Option<String>)]
    pub root_disk: Option<PathBuf>,
    /// The storage backend's durable record of the root disk (files, loop and dm names), written
    /// before the disk is made: what `release` needs after any crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub root_disk_plan: Option<serde_json::Value>,
    /// The VM's work disk (ext4, mounted at `/root` in the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub work_disk: Option<PathBuf>,
    /// vsock context id of the guest.
    pub guest_cid: u32,
    /// The live (or possibly live) VMM.
    pub vmm: Option<VmmHandle>,
    /// TAP device, once networking creates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Guest IPv4 address, leased at first start and kept until delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// NAT backend (`nft`, `iptables`, `iptables-legacy`) holding this VM's NAT rules, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    /// The guest's SSH host public keys as its agent reported them at start (for known_hosts:
    /// `wick vm ssh` pins them, so even the first connection is verified).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_keys: Vec<String>,
    /// Why the VM is in `error`, with the tail of the VMM log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The unprivileged identity and cgroup the VMM and its sidecars run in (recorded before
    /// the cgroup is made or any file is handed to the uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<VmmJail>,
    /// How the guest CPU runs while the VMM is up: `kvm` (hardware virtualization) or `tcg`
    /// (QEMU's emulator, which QEMU's security policy does not treat as a security boundary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Set while the guest runs without hardware isolation (`accel = tcg`): what that means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation_warning: Option<String>,
    /// Set while the VM belongs to wickd's warm pool (`[pool]`), or is being handed out of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSlot>,
    /// Set while the VM's next start loads a saved state instead of booting (a restore from a
    /// snapshot, a fork, or the VM's own suspend image). Recorded before the files it names
    /// exist; the start that loads them clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreFrom>,
    /// Set while `wick vm suspend` writes the suspend image `restore` names: not complete yet,
    /// never loaded; reconcile drops it after a crash (`daemon/suspend.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspending: bool,
}

/// A saved state a start loads instead of booting ([`VmRuntime::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreFrom {
    /// The state files, in the order `Vmm::save_state` returned them, inside the VM dir and
    /// readable by the VMM's uid (hard links of a snapshot's root-owned, read-only files, or the
    /// VM's own suspend image). The VMM never gets write access to a snapshot's files.
    #[schema(value_type = Vec<String>)]
    pub files: Vec<PathBuf>,
    /// The snapshot restored from; `None` for the VM's own suspend image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// After loading, the guest gets this VM's identity (MAC, IP, hostname, machine-id, SSH
    /// host keys, a reseeded RNG) — a restore or fork; `false` keeps the guest's own (suspend),
    /// where only the clock is stepped and the RNG reseeded.
    pub new_identity: bool,
}

/// Where a warm-pool VM is: booting for the pool, ready to be taken, or taken and being given
/// its owner's identity. A pool VM is never returned to the pool once taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolSlot {
    /// Being created and booted for the pool (wickd's, no identity).
    Filling,
    /// Booted to agent-ready, unconfigured, waiting for a matching create.
    Ready,
    /// Taken by a create (owner, name and spec already the user's); its identity is being
    /// applied. A restart during this ends it as the user's VM in `error`.
    Assigning,
}

/// [`VmRuntime::isolation_warning`] of a VM under TCG.
pub const TCG_WARNING: &str = "this guest runs under QEMU's TCG emulator, which QEMU's security \
policy does not treat as a security boundary: do not run untrusted code in it (use KVM; \
`require_kvm = true` refuses TCG)";

impl VmRuntime {
    /// Records how the guest CPU runs (`kvm`/`tcg`, `None` once the VMM is gone) and the
    /// isolation warning that goes with it.
    pub fn set_accel(&mut self, accel: Option<String>) {
        self.isolation_warning = (accel.as_deref() == Some("tcg")).then(|| TCG_WARNING.to_string());
        self.accel = accel;
    }
}

/// A VMM's containment: its own uid/gid (leased uniquely from `vmm_uid_range`), its cgroup and
/// the host files handed to that uid (with their previous owners, restored on release).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmmJail {
    pub uid: u32,
    pub gid: u32,
    /// The cgroup, relative to each controller's root: `<parent>/vm-<12 hex>`.
    pub cgroup: String,
    /// Files whose owner was changed to `uid`, recorded before each `chown`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted: Vec<Grant>,
}

/// A file handed to a VMM uid, and the owner to give it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Grant {
    #[schema(value_type = String)]
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// A VM as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    /// Unix uid of the caller that created the VM.
    pub owner: u32,
    pub state: VmState,
    pub spec: VmSpec,
    pub runtime: VmRuntime,
    /// RFC 3339 UTC timestamps.
    pub created_at: String,
    pub updated_at: String,
    /// Last user action on the VM (for auto-stop).
    pub touched_at: String,
}

impl VmRecord {
    /// An unassigned warm-pool VM (filling or ready): wickd's, hidden from `vm list` (shown by
    /// `vm list --all`) and from every lookup by name or id.
    pub fn is_pooled(&self) -> bool {
        matches!(self.runtime.pool, Some(PoolSlot::Filling | PoolSlot::Ready))
    }

    /// First 12 hex digits of the id: used in host resource names (`wk-<short>`).
    pub fn short_id(&self) -> &str {
        short_id(&self.id)
    }
}

/// First 12 characters of a VM id.
pub fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Length of a VM id (lowercase hex digits).
pub const ID_LEN: usize = 32;
/// Shortest id prefix a lookup accepts (shorter references are names only).
pub const MIN_ID_PREFIX: usize = 4;

/// Whether `s` could be a VM id or an id prefix a lookup accepts: [`MIN_ID_PREFIX`] to
/// [`ID_LEN`] hex digits. VM names never look like this.
pub fn looks_like_id(s: &str) -> bool {
    (MIN_ID_PREFIX..=ID_LEN).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A new random VM id: 32 lowercase hex digits.
pub fn new_vm_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_vm_id();
        let b = new_vm_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(short_id(&a).len(), 12);
    }

    #[test]
    fn port_mappings() {
        let m = PortMapping::parse("8080:8000").unwrap();
        assert_eq!(
            (m.host_ip.as_str(), m.host_port, m.guest_port),
            ("127.0.0.1", 8080, 8000)
        );
        let m = PortMapping::parse("0.0.0.0:80:8000").unwrap();
        assert_eq!(m.host_ip, "0.0.0.0");
        assert_eq!(m.to_string(), "0.0.0.0:80:8000");
        for bad in ["8080", "x:1", "1:0", "70000:1", "nope:1:2", ""] {
            assert!(PortMapping::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips() {
        for s in [
            VmState::Creating,
            VmState::Stopped,
            VmState::Starting,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Error,
            VmState::Suspended,
        ] {
            assert_eq!(s.as_str().parse::<VmState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }
}
