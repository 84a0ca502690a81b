//! `PUT /snapshot/create` and `PUT /snapshot/load`, with Firecracker's state rules and fault
//! messages (v1.16): create only while `Paused` (before boot: "not supported before starting";
//! running: "save/restore unavailable while running"); load only in a fresh process (after
//! boot: "not supported after starting"; after boot-specific configuration: "Loading a microVM
//! snapshot not allowed after configuring boot-specific resources.").
//!
//! What the fake writes is its own format, not Firecracker's: the state file is JSON (the
//! microVM's configuration and, when fronting a real agent, the fake guest's root directory);
//! the memory file is a sparse file of `mem_size_mib` MiB that starts with a tar of the fake
//! guest's root directory (its "RAM and disk", when a real agent is fronted). Load opens the
//! state's drives exactly as named (relative paths against the working directory, as the real
//! binary does: it cannot rename drives), restores the configuration with the overrides
//! applied, binds the vsock socket and, when `FAKE_FC_AGENT_BIN` is set, unpacks the guest root
//! beside the (new) vsock socket and starts the agent again there (vsock connections do not
//! survive a restore, as in Firecracker).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::boot_source::BootSource;
use super::drive::Drive;
use super::machine_configuration::MachineConfig;
use super::net::NetIface;
use super::vsock::{bind_vsock, Vsock};
use super::{fault, parse, Reply};
use crate::vm::{Phase, Shared, Vm};

const RUNNING: &str = "Create snapshot error: Cannot save the microVM state: Operation not \
                       allowed: save/restore unavailable while running";
const NOT_FRESH: &str = "Load snapshot error: Loading a microVM snapshot not allowed after \
                         configuring boot-specific resources.";
const MISSING_FIELD: &str = "missing field: either `mem_backend` or `mem_file_path` is required";
const TOO_MANY_FIELDS: &str =
    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required";
/// Marks a state file as the fake's.
const FORMAT: &str = "fake-firecracker-snapshot-v1";

#[derive(Debug, Deserialize)]
enum SnapshotType {
    Full,
    Diff,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    #[serde(default)]
    snapshot_type: Option<SnapshotType>,
    snapshot_path: PathBuf,
    mem_file_path: PathBuf,
}

#[derive(Debug, Deserialize, PartialEq)]
enum BackendType {
    File,
    Uffd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: BackendType,
    backend_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkOverride {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockOverride {
    uds_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadParams {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    enable_diff_snapshots: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: bool,
    #[serde(default)]
    huge_pages: Option<serde_json::Value>,
}

/// The fake's state file.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    machine: MachineConfig,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetIface>,
    vsock: Option<Vsock>,
    /// The fake guest's root directory (its "disk and memory") when a real agent is fronted.
    guest_root: Option<PathBuf>,
    /// The memory file starts with a tar of `guest_root`.
    #[serde(default)]
    guest_tar: bool,
}

pub fn put_snapshot(vm: &mut Vm, shared: &Shared, what: Option<&str>, body: &Bytes) -> Reply {
    let res = match what {
        Some("create") => create(vm, body),
        Some("load") => load(vm, shared, body),
        Some(other) => Err(fault(format!(
            "Invalid request method and/or path: PUT /snapshot/{other}."
        ))),
        None => Err(fault("Missing snapshot operation type.")),
    };
    match res {
        Ok(r) | Err(r) => r,
    }
}

fn create(vm: &mut Vm, body: &Bytes) -> Result<Reply, Reply> {
    let p: CreateParams = parse(body)?;
    match vm.phase {
        Phase::NotStarted => vm.post_boot()?,
        Phase::Running => return Err(fault(RUNNING)),
        Phase::Paused => {}
    }
    if matches!(p.snapshot_type, Some(SnapshotType::Diff)) && !vm.machine.track_dirty_pages {
        return Err(fault(
            "Create snapshot error: Cannot get dirty bitmap: dirty page tracking is disabled (fake)",
        ));
    }
    let state = State {
        format: FORMAT.into(),
        machine: vm.machine.clone(),
        boot: vm.boot.clone(),
        drives: vm.drives.clone(),
        nets: vm.nets.clone(),
        vsock: vm.vsock.clone(),
        guest_root: vm.guest_root(),
        guest_tar: vm.guest_root().is_some(),
    };
    let json = serde_json::to_vec_pretty(&state).expect("plain data");
    std::fs::write(&p.snapshot_path, json).map_err(|e| {
        fault(format!(
            "Create snapshot error: Cannot perform open on the snapshot backing file: {e}"
        ))
    })?;
    let mem_bytes = vm.machine.mem_size_mib as u64 * 1024 * 1024;
    std::fs::File::create(&p.mem_file_path)
        .and_then(|f| f.set_len(mem_bytes))
        .map_err(|e| {
            fault(format!(
                "Create snapshot error: Cannot perform open on the memory backing file: {e}"
            ))
        })?;
    if let Some(root) = vm.guest_root() {
        pack_guest(&root, &p.mem_file_path, mem_bytes).map_err(|e| {
            fault(format!(
                "Create snapshot error: (fake) cannot keep the guest root: {e}"
            ))
        })?;
    }
    vm.log(&format!(
        "snapshot created (fake): {} + {}",
        p.snapshot_path.display(),
        p.mem_file_path.display()
    ));
    Ok(Reply::NoContent)
}

fn restore_err(msg: impl std::fmt::Display) -> Reply {
    fault(format!(
        "Load snapshot error: Failed to restore from snapshot: {msg}"
    ))
}

fn load(vm: &mut Vm, shared: &Shared, body: &Bytes) -> Result<Reply, Reply> {
    let p: LoadParams = parse(body)?;
    let _ = (p.enable_diff_snapshots, p.clock_realtime, &p.huge_pages);
    let mem = match (p.mem_backend, p.mem_file_path) {
        (Some(_), Some(_)) => return Err(parse_fault(TOO_MANY_FIELDS)),
        (None, None) => return Err(parse_fault(MISSING_FIELD)),
        (Some(b), None) => b,
        (None, Some(path)) => MemBackend {
            backend_type: BackendType::File,
            backend_path: path,
        },
    };
    vm.pre_boot()?;
    if vm.boot_path {
        return Err(fault(NOT_FRESH));
    }
    let text = std::fs::read(&p.snapshot_path).map_err(|e| {
        restore_err(format!(
            "Cannot open the snapshot file {}: {e}",
            p.snapshot_path.display()
        ))
    })?;
    let mut state: State = serde_json::from_slice(&text)
        .ok()
        .filter(|s: &State| s.format == FORMAT)
        .ok_or_else(|| restore_err("not a snapshot of the fake Firecracker"))?;
    check_memory(&mem, state.machine.mem_size_mib)?;
    for o in p.network_overrides {
        let Some(net) = state.nets.iter_mut().find(|n| n.iface_id == o.iface_id) else {
            return Err(restore_err(format!(
                "Invalid network override: no network interface {:?} in the snapshot",
                o.iface_id
            )));
        };
        net.host_dev_name = o.host_dev_name;
    }
    if let Some(o) = p.vsock_override {
        match state.vsock.as_mut() {
            Some(v) => v.uds_path = o.uds_path,
            None => {
                return Err(restore_err(
                    "vsock override given but the snapshot has no vsock device",
                ))
            }
        }
    }
    open_drives(&state.drives)?;
    let guest_root = match (&state.vsock, state.guest_tar) {
        (Some(v), true) => {
            let root = Path::new(&v.uds_path)
                .parent()
                .unwrap_or(Path::new("."))
                .join("guest-root");
            unpack_guest(&mem.backend_path, &root)
                .map_err(|e| restore_err(format!("(fake) guest root: {e}")))?;
            Some(root)
        }
        _ => state.guest_root.clone(),
    };
    if let Some(v) = &state.vsock {
        bind_vsock(vm, shared, v.clone()).map_err(|e| restore_err(format!("vsock: {e}")))?;
    }
    vm.machine = state.machine;
    vm.machine.track_dirty_pages = p.track_dirty_pages;
    vm.boot = state.boot;
    vm.drives = state.drives;
    vm.nets = state.nets;
    vm.start_agent_in(guest_root.as_deref())?;
    vm.phase = if p.resume_vm {
        Phase::Running
    } else {
        Phase::Paused
    };
    vm.freeze_agent(vm.phase == Phase::Paused);
    vm.log(&format!(
        "snapshot loaded (fake) from {}, state {}",
        p.snapshot_path.display(),
        vm.phase.as_str()
    ));
    Ok(Reply::NoContent)
}

/// Opens every drive the state names, as Firecracker's load does (a relative path against the
/// working directory).
fn open_drives(drives: &[Drive]) -> Result<(), Reply> {
    for d in drives {
        let Some(path) = &d.path_on_host else {
            continue;
        };
        std::fs::OpenOptions::new()
            .read(true)
            .write(!d.is_read_only)
            .open(path)
            .map_err(|e| {
                restore_err(format!(
                    "Block device error: Unable to open the backing file {path}: {e}"
                ))
            })?;
    }
    Ok(())
}

/// Writes a tar of the fake guest's root at the start of the memory file (which keeps its size).
fn pack_guest(root: &Path, mem: &Path, mem_bytes: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(mem)?;
    let mut b = tar::Builder::new(f);
    b.follow_symlinks(false);
    b.append_dir_all(".", root)?;
    let f = b.into_inner()?;
    if f.metadata()?.len() > mem_bytes {
        return Err(std::io::Error::other(
            "the guest root is larger than its memory",
        ));
    }
    Ok(())
}

/// Unpacks the guest root kept in the memory file into `root` (a fresh directory).
fn unpack_guest(mem: &Path, root: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    tar::Archive::new(std::fs::File::open(mem)?).unpack(root)
}

/// A serde-level refusal, worded as Firecracker's body parser words it.
fn parse_fault(msg: &str) -> Reply {
    fault(format!(
        "An error occurred when deserializing the json body of a request: {msg}."
    ))
}

/// The memory backend must hold the snapshot's memory: a file of its size, or a listening
/// userfaultfd handler socket.
fn check_memory(mem: &MemBackend, mem_size_mib: usize) -> Result<(), Reply> {
    let path: &Path = &mem.backend_path;
    if mem.backend_type == BackendType::Uffd {
        return std::os::unix::net::UnixStream::connect(path)
            .map(drop)
            .map_err(|e| {
                restore_err(format!(
                    "Cannot connect to the UFFD handler socket {}: {e}",
                    path.display()
                ))
            });
    }
    let len = std::fs::metadata(path)
        .map_err(|e| {
            restore_err(format!(
                "Cannot open the memory file {}: {e}",
                path.display()
            ))
        })?
        .len();
    let want = mem_size_mib as u64 * 1024 * 1024;
    if len != want {
        return Err(restore_err(format!(
            "the memory file {} has {len} bytes, the snapshot's memory {want}",
            path.display()
        )));
    }
    Ok(())
}
