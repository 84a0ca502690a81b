//! The VMM driver seam.
//!
//! `wickd` drives every hypervisor through the [`Vmm`] trait; a driver knows how to spawn its
//! process, configure and boot a guest, stop or kill it, and find it again after a daemon restart.
//! Drivers never touch the store: the daemon records the [`VmmHandle`] returned by [`Vmm::plan`]
//! **before** calling [`Vmm::spawn`], and the pid right after (the durability rule).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use wick_model::api::Check;
use wick_model::VmmHandle;

mod common;
pub mod confine;
pub mod firecracker;
pub mod jailer;
pub mod log;
pub mod qemu;
mod snapshot;

/// Everything a driver needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub vm_id: String,
    pub vcpu: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub root_disk: PathBuf,
    /// Extra block devices, in order after the root disk.
    pub extra_disks: Vec<PathBuf>,
    pub guest_cid: u32,
    /// Host TAP to attach as `eth0` (created by the caller, up and bridged).
    pub tap: Option<String>,
    pub guest_mac: Option<String>,
    /// Run the VMM and its sidecars confined (unprivileged uid, cgroup); `None` runs them as
    /// the daemon's user, unconfined.
    pub jail: Option<Jail>,
    /// Refuse to run the guest without hardware virtualization (QEMU's TCG is not a security
    /// boundary).
    pub require_kvm: bool,
}

/// The unprivileged identity and cgroup a VMM and its sidecars run in. The daemon creates the
/// cgroup and hands the VM's files to `uid` before spawning; a driver makes each process join
/// the cgroup and drop to `uid` between `fork` and `exec` (see [`confine::confine`]), or hands
/// the same facts to Firecracker's jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group owning `/dev/kvm`).
    pub groups: Vec<u32>,
    /// The cgroup, relative to each controller's root (`wick/vm-<12 hex>`).
    pub cgroup: String,
    /// Its `cgroup.procs` files (one per v1 controller, one on v2).
    pub cgroup_procs: Vec<PathBuf>,
    /// Its limits (for the jailer, which makes the cgroup itself).
    pub limits: wick_host::cgroup::Limits,
    /// `1` or `2`.
    pub cgroup_version: u8,
}

/// A freshly spawned VMM process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// `/proc/<pid>/stat` start time.
    pub start_time: u64,
    /// The child, for the daemon to reap. `None` when the process is not our child.
    pub child: Option<tokio::process::Child>,
    /// Sidecars spawned with it (pids filled in); the daemon records them in the handle.
    pub sidecars: Vec<wick_model::Sidecar>,
    /// How the guest CPU runs: `kvm` or `tcg`.
    pub accel: String,
}

/// Errors of a VMM driver. Messages are for the user: say what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("VMM binary not found: {0}")]
    BinaryNotFound(String),
    #[error("could not spawn the VMM: {0}")]
    Spawn(String),
    #[error("VMM API call {call} failed: {message}")]
    Api { call: String, message: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("VMM process exited: {0}")]
    Exited(String),
    #[error("{0}")]
    Other(String),
}

/// A running VMM's guest as the VMM reports it ([`Vmm::run_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped ([`Vmm::pause`]); memory and devices are kept.
    Paused,
    /// Anything else the VMM reports (not started, shut down, an internal error), verbatim.
    Other(String),
}

/// A VMM driver (Firecracker, QEMU).
#[async_trait]
pub trait Vmm: Send + Sync {
    /// Driver name as stored in VM specs (`firecracker`).
    fn name(&self) -> &'static str;

    /// The sockets and log this VM's VMM will use, all inside `vm_dir`. Pure: the caller persists
    /// the result before [`Vmm::spawn`].
    fn plan(&self, vm_dir: &Path) -> VmmHandle;

    /// Unlinks stale sockets and spawns the VMM process (and its sidecars) in its own process
    /// group, its stdout/stderr appended to `handle.log_path`. Returns once the API socket accepts
    /// connections (bounded by `timeout`). The guest does not run yet.
    ///
    /// `cfg` is the same configuration [`Vmm::boot`] gets next: a driver whose VMM takes the
    /// machine on its command line (QEMU) needs it here; an API-configured one (Firecracker)
    /// ignores it.
    async fn spawn(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<Spawned, VmmError>;

    /// Configures the guest (through the API, when not done at spawn) and starts it.
    async fn boot(
        &self,
        handle: &VmmHandle,
        cfg: &VmmConfig,
        timeout: Duration,
    ) -> Result<(), VmmError>;

    /// Graceful stop request, then SIGKILL if the process outlives `timeout`. Idempotent: a VMM
    /// that is already gone is success.
    async fn stop(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError>;

    /// Stops the guest's vCPUs; the VMM process, its memory and devices stay. Returns once the
    /// VMM reports the guest paused (bounded by `timeout`). Pausing a paused guest is success.
    async fn pause(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError>;

    /// Lets a paused guest run again; resuming a running guest is success.
    async fn resume(&self, handle: &VmmHandle, timeout: Duration) -> Result<(), VmmError>;

    /// Whether the guest runs or is paused, asked of the VMM (reconcile settles a record that
    /// disagrees with it).
    async fn run_state(&self, handle: &VmmHandle, timeout: Duration) -> Result<RunState, VmmError>;

    /// Sends `signal` to the VMM process (if it is still the one recorded).
    fn kill(&self, handle: &VmmHandle, signal: nix::sys::signal::Signal) -> Result<(), VmmError>;

    /// Pid of the live VMM serving `handle.api_socket`: the recorded pid if it is still that
    /// process, else found by scanning `/proc` for the socket on a command line.
    fn find(&self, handle: &VmmHandle) -> Option<u32>;

    /// Removes the sockets the VMM leaves behind. Idempotent.
    fn cleanup(&self, handle: &VmmHandle);

    /// Read-only host checks for `wick doctor`.
    fn doctor(&self) -> Vec<Check>;

    /// A fatal guest failure the VMM reported without exiting (QEMU stays alive, paused, after
    /// `KVM internal error`), as a message for the user; `None` when nothing is known to be
    /// wrong. Callers waiting for the guest (e.g. for its agent) poll this to fail fast.
    fn guest_failure(&self, _handle: &VmmHandle) -> Option<String> {
        None
    }

    /// Writes the paused guest's memory and device state into files the VMM process creates in
    /// `dir` (one it can write: the VM dir), named `<prefix>.*`, and returns their paths
    /// (`snapshot.rs`). The caller pauses first and moves the files away after.
    async fn save_state(
        &self,
        _handle: &VmmHandle,
        _dir: &Path,
        _prefix: &str,
        _timeout: Duration,
    ) -> Result<Vec<PathBuf>, VmmError> {
        Err(VmmError::Other(format!(
            "the {} driver cannot save a VM's state",
            self.name()
        )))
    }

    /// Like [`Vmm::spawn`], but the VMM waits to load a saved state instead of booting (QEMU
    /// `-incoming defer`; Firecracker: its API up, nothing configured). Then [`Vmm::load_state`]
    /// and [`Vmm::resume`].
    async fn spawn_restore(
        &self,
        _handle: &VmmHandle,
        _cfg: &VmmConfig,
        _timeout: Duration,
    ) -> Result<Spawned, VmmError> {
        Err(VmmError::Other(format!(
            "the {} driver cannot restore a saved VM state",
            self.name()
        )))
    }

    /// Loads the state [`Vmm::save_state`] wrote (the same files, in the same order, now at
    /// `files`: inside the VM dir and readable, never writable, by the VMM's uid) into a VMM
    /// started by [`Vmm::spawn_restore`], attached to `cfg`'s disks, TAP and sockets (not the
    /// source's). The guest stays paused until [`Vmm::resume`].
    async fn load_state(
        &self,
        _handle: &VmmHandle,
        _cfg: &VmmConfig,
        _files: &[PathBuf],
        _timeout: Duration,
    ) -> Result<(), VmmError> {
        Err(VmmError::Other(format!(
            "the {} driver cannot restore a saved VM state",
            self.name()
        )))
    }

    /// Cheap check before a start: is the VMM usable at all (binary present, …)? The error
    /// says what to install or configure.
    fn preflight(&self) -> Result<(), VmmError> {
        Ok(())
    }
}
