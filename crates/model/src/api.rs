//! Bodies of the `/v1` HTTP API between `wick` and `wickd`.
//!
//! Long operations (create, start, stop, restart, delete of VMs; import, pull and build of images
//! and kernels) answer `202` with an [`Operation`]; its progress is streamed as
//! newline-delimited JSON [`OpEvent`]s from `GET /v1/operations/{id}/events`. Every error is an
//! [`ApiError`]. The image and kernel bodies ([`ImageView`], [`KernelView`], ...) close the module.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vm::VmRecord;

/// Machine-readable error class, mapped to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    Conflict,
    InvalidArgument,
    NotRunning,
    FailedPrecondition,
    PermissionDenied,
    Cancelled,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotRunning | ErrorCode::FailedPrecondition => 412,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::Cancelled => 499,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotRunning => "not_running",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            op_id: None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ApiError {}

/// `POST /v1/vms`. Every field is optional; the daemon fills in resolved defaults. Sizes are
/// strings (`2G`, `512M`, bare = MiB) so the daemon validates exactly what the user typed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// A DNS label (lowercase a-z, 0-9, inner `-`) that does not look like a VM id.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    /// A managed kernel to boot instead of the image's default (`wick kernel list`).
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu: Option<i64>,
    /// A size: a positive number and an optional unit K, M (the default), G or T (`KB`, `KiB`, …
    /// too), a whole number of MiB, at most the host's RAM.
    #[serde(default)]
    #[schema(pattern = r"^\s*0*[1-9][0-9]*\s*([KkMmGgTt]([Ii]?[Bb])?)?\s*$")]
    pub memory: Option<String>,
    /// A size like `memory`, at most 16 TiB.
    #[serde(default)]
    #[schema(pattern = r"^\s*0*[1-9][0-9]*\s*([KkMmGgTt]([Ii]?[Bb])?)?\s*$")]
    pub disk_size: Option<String>,
    #[serde(default)]
    pub nat: bool,
    /// Egress allowlist (`--allow-host`): host names or `*.suffix` patterns the guest may reach
    /// (at most 64); everything else is dropped and other names get NXDOMAIN. Refused with
    /// `nat`, which allows everything.
    #[serde(default)]
    #[schema(schema_with = allow_host_list_schema)]
    pub allow_hosts: Vec<String>,
    /// Create the VM stopped.
    #[serde(default)]
    pub no_start: bool,
    /// SSH public keys to authorize in the guest (the CLI sends the caller's wick key).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Git identity for the guest (the CLI sends the caller's `user.name`/`user.email`).
    #[serde(default)]
    pub git_name: Option<String>,
    #[serde(default)]
    pub git_email: Option<String>,
    /// Published ports, `[HOST_IP:]HOST_PORT:GUEST_PORT` each.
    #[serde(default)]
    #[schema(schema_with = port_spec_list_schema)]
    pub publish: Vec<String>,
    /// Which init runs as PID 1: `auto` (default), `wick` or `image`.
    #[serde(default)]
    pub init: Option<crate::vm::InitMode>,
    /// Restore this snapshot (name, id or unique id prefix) instead of booting an image: the
    /// new VM continues the snapshot's guest with its own identity. The snapshot decides vcpu,
    /// memory, disk size, image, kernel and init (refused here); `no_start` is refused too.
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

/// `PATCH /v1/vms/{vm}` (`wick vm set`). vcpu/memory apply at next start; NAT applies live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetVmRequest {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu: Option<i64>,
    /// A size, as in `CreateVmRequest.memory`.
    #[serde(default)]
    #[schema(pattern = r"^\s*0*[1-9][0-9]*\s*([KkMmGgTt]([Ii]?[Bb])?)?\s*$")]
    pub memory: Option<String>,
    #[serde(default)]
    pub nat: Option<bool>,
    /// Hosts to add to the egress allowlist (`--allow-host`), live on a running VM.
    #[serde(default)]
    #[schema(schema_with = allow_host_list_schema)]
    pub allow_host_add: Vec<String>,
    /// Hosts to remove from the egress allowlist (`--deny-host`), exactly as listed; removing
    /// the last one ends the restriction (no egress, unless `nat` is turned on).
    #[serde(default)]
    #[schema(schema_with = allow_host_list_schema)]
    pub allow_host_remove: Vec<String>,
    /// Ports to start forwarding (`[HOST_IP:]HOST_PORT:GUEST_PORT`), live on a running VM.
    #[serde(default)]
    #[schema(schema_with = port_spec_list_schema)]
    pub publish_add: Vec<String>,
    /// Host ports to stop forwarding.
    #[serde(default)]
    #[schema(schema_with = port_list_schema)]
    pub publish_remove: Vec<u16>,
    /// Record the repository just prepared into the guest (the CLI sends it after a prepare).
    #[serde(default)]
    pub workspace: Option<crate::vm::WorkspaceInfo>,
}

/// `POST /v1/vms/{vm}/kill`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Signal name (`KILL`, `sigterm`, …; any case, `SIG` optional) or number (1–31); default
    /// `KILL`.
    #[serde(default)]
    #[schema(schema_with = signal_schema)]
    pub signal: Option<String>,
}

/// The schema of a list of egress allowlist entries: a host name or `*.` and a host name
/// (letters, digits, `-`, `_`; labels of 1-63 characters; a trailing dot allowed).
fn allow_host_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let label = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";
    let host = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(256))
        .pattern(Some(format!(r"^(\*\.)?({label}\.)*{label}\.?$")));
    ArrayBuilder::new().items(host).max_items(Some(64)).build()
}

/// The schema of a list of TCP/UDP ports (`u16`s).
fn port_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let port = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(65535));
    ArrayBuilder::new().items(port).build()
}

/// The schema of a list of `[HOST_IP:]HOST_PORT:GUEST_PORT` strings: ports 1-65535 (as
/// `u16::from_str` reads them), the IP only roughly (the daemon parses it).
fn port_spec_list_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let port = r"\+?0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";
    let spec = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!(r"^(\[?[0-9A-Fa-f:.]+\]?:)?{port}:{port}$")));
    ArrayBuilder::new().items(spec).build()
}

/// Names of the signals `KillRequest.signal` takes (Linux, without `SIG`).
const SIGNAL_NAMES: &[&str] = &[
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// The schema of `KillRequest.signal`: null, or a name of [`SIGNAL_NAMES`] (any case, `SIG`
/// optional) or a number 1–31, with surrounding blanks.
fn signal_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let nocase = |s: &str| -> String {
        s.chars()
            .map(|c| match c.is_ascii_alphabetic() {
                true => format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase()),
                false => c.to_string(),
            })
            .collect()
    };
    let names: Vec<String> = SIGNAL_NAMES.iter().map(|n| nocase(n)).collect();
    let pattern = format!(
        r"^[ \t\n\r]*(\+?0*([1-9]|[12][0-9]|3[01])|({})?({}))[ \t\n\r]*$",
        nocase("SIG"),
        names.join("|")
    );
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(pattern))
        .build()
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmRecord>,
}

/// `POST /v1/vms/prune`: VMs deleted (all non-running VMs of the caller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PruneResult {
    pub deleted: Vec<String>,
    pub failed: Vec<ApiError>,
}

/// Kind of a long operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    Start,
    Stop,
    Restart,
    Delete,
    Pause,
    Resume,
    /// `vm suspend`: the guest's state into its suspend image, the VMM gone.
    Suspend,
    /// `vm snapshot`: the VM's state and disks into a new snapshot.
    Snapshot,
    /// `vm fork`: a transient snapshot of the VM, then one restore (a `create`) per fork.
    Fork,
    ImageImport,
    ImagePull,
    ImageBuild,
    ImageCommit,
    KernelImport,
    KernelPull,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OpState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, OpState::Running)
    }
}

/// A long operation on one VM, or one that makes an image or a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: OpKind,
    /// The VM (empty for image and kernel operations).
    pub vm_id: String,
    pub vm_name: String,
    pub state: OpState,
    /// Current (or last) stage, e.g. `clone root disk`, `spawn vmm`, `boot`.
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub error: Option<ApiError>,
    /// The VM after the operation (absent for delete).
    #[serde(default)]
    pub vm: Option<VmRecord>,
    pub started_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// What an image or kernel operation makes (absent for VM operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactOp>,
}

/// The image or kernel an operation makes and, once it succeeded, the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactOp {
    /// Name of the new image or kernel.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelView>,
}

impl ArtifactOp {
    pub fn named(name: impl Into<String>) -> ArtifactOp {
        ArtifactOp {
            name: name.into(),
            image: None,
            kernel: None,
        }
    }
}

/// One line of an operation's event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OpEvent {
    pub op_id: String,
    /// Sequence number within the operation, from 0.
    pub seq: u64,
    pub state: OpState,
    /// Stage entered (for `running` events).
    #[serde(default)]
    pub stage: Option<String>,
    /// Milliseconds since the operation started.
    pub elapsed_ms: u64,
    #[serde(default)]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub vm: Option<VmRecord>,
    /// The result of an image or kernel operation (terminal events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactOp>,
}

/// `GET /v1/vms/{vm}/stats`: resource use of the VM's VMM processes, sampled by wickd's poller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    pub name: String,
    pub state: String,
    pub vcpu: u32,
    pub memory_mib: u64,
    /// CPU use of the VMM (and sidecars) since the previous sample, in percent of one core.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the VMM (and sidecars).
    #[serde(default)]
    pub rss_kib: Option<u64>,
    /// When the sample was taken (RFC 3339), absent before the first sample.
    #[serde(default)]
    pub sampled_at: Option<String>,
    /// Last user action or agent session (auto-stop counts from here).
    pub touched_at: String,
}

/// Where a resolved setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    Config,
    HostHeuristic,
    BuiltIn,
}

impl std::fmt::Display for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provenance::Config => "config",
            Provenance::HostHeuristic => "host heuristic",
            Provenance::BuiltIn => "built-in",
        })
    }
}

/// A resolved value with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resolved {
    pub value: u64,
    pub source: Provenance,
}

/// `[vm_defaults]` after resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResolvedDefaults {
    pub vcpu: Resolved,
    pub memory_mib: Resolved,
    pub disk_mib: Resolved,
}

/// `GET /v1/config`: the daemon's effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    /// Path of the config file read (it may not exist).
    pub path: String,
    pub file_exists: bool,
    /// The effective config as TOML-shaped JSON.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub vm_defaults: ResolvedDefaults,
}

/// `GET /v1/daemon/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub root: String,
    pub socket: String,
    pub uptime_secs: u64,
    pub vms: u64,
    pub running: u64,
}

/// `POST /v1/daemon/stop`: the daemon exits shortly after answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DaemonStopping {
    pub stopping: bool,
}

/// Result of one doctor check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
}

/// One line of `wick doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// Area: `store`, `host`, `vmm`, `config`, or a capability name.
    pub area: String,
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
    /// What to do about a warn/fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// `GET /v1/doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
}

impl DoctorReport {
    pub fn worst(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(CheckStatus::Pass)
    }
}

// ------------------------------------------------------------------ images and kernels

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSource {
    /// Built from Debian packages (`wick image build`).
    Build {
        suite: String,
        mirror: String,
        packages: Vec<String>,
    },
    /// Imported from a rootfs tarball or an ext4 file.
    Import {
        #[schema(value_type = String)]
        path: PathBuf,
    },
    /// Pulled from an OCI registry; `layers` are the layer digests.
    Oci {
        reference: String,
        digest: String,
        layers: Vec<String>,
    },
    /// Built from another image by a builder VM (`wick image build --from`).
    Derived {
        /// The base image's name and id (rootfs sha256) at build time.
        base: String,
        base_id: String,
        packages: Vec<String>,
        run: Vec<String>,
        /// Guest paths of the copied files.
        copied: Vec<String>,
    },
    /// Made from a stopped VM's root disk (`wick vm commit`).
    Commit { vm: String, base: String },
}

/// A managed image as the API shows it: its record plus the VMs (visible to the caller) using
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub name: String,
    /// Hex sha256 of the root filesystem; also the image's directory name.
    pub id: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub source: ImageSource,
    #[schema(value_type = String)]
    pub rootfs: PathBuf,
    #[schema(value_type = Option<String>)]
    pub work_seed: Option<PathBuf>,
    /// Apparent size of the root filesystem in bytes (the guest's root disk size).
    pub size: u64,
    /// Name of the kernel the image boots with by default, when it has one.
    pub default_kernel: Option<String>,
    /// Whether wick-agent and its systemd unit are in the image.
    pub agent_injected: bool,
    /// The cache key of a derived build (`image build --from`): a hash of its inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_key: Option<String>,
    /// The OCI config's user, working dir, env, entrypoint and cmd (pulled images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::vm::ImageConfig>,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// What kind of kernel file was imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    Elf,
    BzImage,
    Deb,
}

/// How a bzImage payload was compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelCompression {
    Gzip,
    Xz,
    Lzma,
    Lz4,
    Zstd,
    Bzip2,
}

/// A managed kernel as the API shows it: its record plus the VMs (visible to the caller)
/// booting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KernelView {
    pub name: String,
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64` (`unknown` if none could be found).
    pub version: String,
    /// sha256 of the imported file, lowercase hex.
    pub sha256: String,
    pub source_format: KernelFormat,
    /// The ELF vmlinux (Firecracker).
    #[schema(value_type = String)]
    pub vmlinux: PathBuf,
    /// The bzImage (QEMU), when the source had one.
    #[schema(value_type = Option<String>)]
    pub bzimage: Option<PathBuf>,
    pub compression: Option<KernelCompression>,
    /// wick's initramfs, when the kernel needs one.
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    #[schema(value_type = Option<String>)]
    pub modules_dir: Option<PathBuf>,
    pub has_pvh_note: bool,
    pub needs_initramfs: bool,
    pub initrd_modules: Vec<String>,
    pub builtin_drivers: Vec<String>,
    pub warnings: Vec<String>,
    /// Import time, seconds since the Unix epoch.
    pub imported_at: u64,
    /// Per guest device wick uses: is its driver built in, a module, or missing.
    #[serde(default)]
    pub features: Vec<KernelFeature>,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// One guest device of a kernel (`wick kernel list`): `feature` (virtio-mmio, virtio-blk,
/// virtio-net, vsock, virtio-console), its `driver`, and `state`: `builtin`, `module`,
/// `missing`, or `unknown` (a kernel imported without modules: assumed built in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KernelFeature {
    pub feature: String,
    pub driver: String,
    pub state: DriverState,
}

/// Where a kernel's driver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriverState {
    Builtin,
    Module,
    Missing,
    Unknown,
}

/// `PATCH /v1/images/{name}` (`wick image set`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetImageRequest {
    /// The managed kernel VMs of this image boot by default; `""` clears it (the kernel named
    /// `default` is used then).
    #[serde(default)]
    pub kernel: Option<String>,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

/// `GET /v1/kernels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KernelList {
    pub kernels: Vec<KernelView>,
}

/// `POST /v1/images/prune`: what was removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PruneImagesResult {
    #[schema(value_type = Vec<String>)]
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

/// `POST /v1/images/import` and `POST /v1/kernels/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// Absolute path on the daemon's host: a rootfs tarball or ext4 file (images), a vmlinux,
    /// bzImage or kernel `.deb` (kernels).
    #[schema(value_type = String)]
    pub path: PathBuf,
    pub name: String,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// `REGISTRY/REPOSITORY[:TAG|@DIGEST]`.
    pub reference: String,
    pub name: String,
    /// Speak plain HTTP to the reference's registry.
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/build`. Without `from`, the golden Debian image (debootstrap, `suite`
/// and extra `packages`); with `from`, an image derived from `from` by a builder VM:
/// `copy` files put in, `packages` installed with apt-get, each `run` step run with `sh -c`.
/// A derived build whose inputs match an existing image's `build_key` is a cache hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// Image name (default `default`; required with `from`).
    #[serde(default)]
    pub name: Option<String>,
    /// The base image of a derived build.
    #[serde(default)]
    pub from: Option<String>,
    /// Debian packages to install (golden: added to its list).
    #[serde(default)]
    #[schema(schema_with = package_list_schema)]
    pub packages: Vec<String>,
    /// Shell commands run in the builder VM (`sh -c`), in order (derived builds only).
    #[serde(default)]
    pub run: Vec<String>,
    /// Host files copied into the builder VM, read with the caller's rights.
    #[serde(default)]
    pub copy: Vec<CopyFile>,
    /// Debian suite of a golden build (default bookworm).
    #[serde(default)]
    #[schema(pattern = r"^[a-z][a-z0-9-]{0,31}$")]
    pub suite: Option<String>,
    /// Replace an existing image of that name built from other inputs (root only).
    #[serde(default)]
    pub force: bool,
}

fn package_list_schema() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .pattern(Some(r"^[a-z0-9][a-z0-9+.-]{0,127}$")),
        )
        .max_items(Some(256))
        .build()
}

/// A host file copied into a derived image: `src` (absolute, on the daemon's host, read with
/// the requesting user's rights) to the guest path `dst` with `mode` (default 0644).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyFile {
    #[schema(value_type = String)]
    pub src: PathBuf,
    pub dst: String,
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `POST /v1/vms/{vm}/commit`: an image from a stopped VM's root disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitVmRequest {
    pub name: String,
    /// Replace an existing image of that name (root only).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/kernels/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullKernelRequest {
    /// `http://` or `https://` URL of a vmlinux, bzImage or kernel `.deb`.
    pub url: String,
    /// Expected sha256 of the downloaded file (64 hex digits).
    pub sha256: String,
    pub name: String,
}
