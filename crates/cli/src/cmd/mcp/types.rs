//! The MCP tools' parameters and results: their JSON Schemas are what clients see.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use wick_model::VmRecord;

/// A VM reference.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    /// VM name, id or unique id prefix (at least 4 hex digits).
    pub vm: String,
}

/// `restore_snapshot`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    /// The snapshot: name, id or unique id prefix.
    pub snapshot: String,
    /// The new VM's name (a DNS label); generated when omitted.
    pub name: Option<String>,
    /// Give the guest outbound network access (NAT).
    pub nat: Option<bool>,
}

/// `fork_vm`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkParams {
    /// The VM to fork: name, id or unique id prefix.
    pub vm: String,
    /// The fork's name; with count > 1 the forks are NAME-1 … NAME-K (default VM-fork-N).
    pub name: Option<String>,
    /// How many forks (1-64, default 1).
    pub count: Option<u32>,
}

/// What a new VM looks like; every field is optional.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// A DNS label (a-z, 0-9, '-'); generated when omitted.
    pub name: Option<String>,
    /// Image to create the VM from (default: the daemon's default image).
    pub image: Option<String>,
    /// Number of virtual CPUs.
    pub vcpu: Option<i64>,
    /// Memory, e.g. "2G" or "512M" (a bare number means MiB).
    pub memory: Option<String>,
    /// Size of the work disk mounted at /root, e.g. "8G".
    pub disk: Option<String>,
    /// Give the guest outbound network access (NAT).
    pub nat: Option<bool>,
    /// Egress allowlist instead of `nat`: the only hosts the guest may reach, "github.com" or
    /// "*.pypi.org" (hosts under pypi.org) each.
    pub allow_hosts: Option<Vec<String>>,
    /// Host-to-guest port forwards, "[HOST_IP:]HOST_PORT:GUEST_PORT" each.
    pub publish: Option<Vec<String>>,
}

/// How a command runs in a VM.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecOptions {
    /// Working directory (default: /root, or the repository for run_repository).
    pub cwd: Option<String>,
    /// Extra environment variables.
    pub env: Option<BTreeMap<String, String>>,
    /// User name or uid (default root).
    pub user: Option<String>,
    /// Kill the command after this many seconds (default 600, at most 86400).
    pub timeout_secs: Option<u64>,
    /// Keep at most this many bytes of stdout and of stderr (default 1 MiB, at most 16 MiB);
    /// the rest is dropped and the result says so.
    pub max_output_bytes: Option<u64>,
}

/// `exec`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// VM name, id or unique id prefix.
    pub vm: String,
    /// The program and its arguments (no shell: use ["sh", "-c", "..."] for one).
    pub command: Vec<String>,
    #[serde(flatten)]
    pub options: ExecOptions,
}

/// `run_repository`'s parameters: `wick vm run PATH -- COMMAND`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunParams {
    /// A git repository on the host (absolute, or relative to where `wick mcp` runs).
    pub path: String,
    /// The program and its arguments, run in the repository's copy in the guest.
    pub command: Vec<String>,
    /// Where the repository goes in the guest (default /root/repo).
    pub guest_path: Option<String>,
    /// Delete the VM afterwards (default false: it is kept for more exec calls).
    pub delete_after: Option<bool>,
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Kill the command after this many seconds (default 600).
    pub timeout_secs: Option<u64>,
    /// Keep at most this many bytes of stdout and of stderr (default 1 MiB).
    pub max_output_bytes: Option<u64>,
}

/// `read_file`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// VM name, id or unique id prefix.
    pub vm: String,
    /// Absolute path of a regular file in the guest.
    pub path: String,
    /// Refuse files larger than this (default 1 MiB, at most 16 MiB).
    pub max_bytes: Option<u64>,
}

/// `write_file`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// VM name, id or unique id prefix.
    pub vm: String,
    /// Absolute path in the guest; missing parent directories are created.
    pub path: String,
    /// The file's content.
    pub content: String,
    /// How `content` is encoded: "utf-8" (default) or "base64".
    pub encoding: Option<Encoding>,
    /// Octal permission bits, e.g. "0755" (default "0644").
    pub mode: Option<String>,
}

/// `list_files`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// VM name, id or unique id prefix.
    pub vm: String,
    /// Absolute path of a directory in the guest.
    pub path: String,
}

/// `export_workspace`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// VM name, id or unique id prefix.
    pub vm: String,
    /// The repository's path in the guest (default /root/repo).
    pub guest_path: Option<String>,
    /// Diff against this commit instead of the one the workspace was prepared from.
    pub base_commit: Option<String>,
}

/// How file content is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

/// A VM in one line.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VmSummary {
    pub id: String,
    pub name: String,
    /// creating, stopped, starting, running, stopping, error.
    pub state: String,
    /// The guest's IP address while it runs.
    pub ip: Option<String>,
    /// `<name>.vm`: the VM's DNS name on the host.
    pub dns_name: String,
    pub image: String,
    pub vcpu: u64,
    pub memory_mib: u64,
    /// Whether the guest has outbound network access to everywhere.
    pub nat: bool,
    /// The egress allowlist: when not empty, the only hosts the guest may reach.
    pub allow_hosts: Vec<String>,
    /// Why the VM is in `error`, when it is.
    pub error: Option<String>,
}

impl From<&VmRecord> for VmSummary {
    fn from(vm: &VmRecord) -> Self {
        VmSummary {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: vm.state.to_string(),
            ip: vm.runtime.ip.clone(),
            dns_name: format!("{}.vm", vm.name),
            image: vm.spec.image.clone(),
            vcpu: u64::from(vm.spec.vcpu),
            memory_mib: vm.spec.memory_mib,
            nat: vm.spec.nat,
            allow_hosts: vm.spec.allow_hosts.clone(),
            error: vm.runtime.last_error.clone(),
        }
    }
}

/// `list_vms`' result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VmList {
    pub vms: Vec<VmSummary>,
}

/// How a command ended and what it printed.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct ExecResult {
    /// The exit code (a command killed by signal N: 128+N).
    pub exit_code: i32,
    /// stdout, as UTF-8 (invalid bytes replaced).
    pub stdout: String,
    /// stderr, as UTF-8 (invalid bytes replaced).
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The command was killed at `timeout_secs`.
    pub timed_out: bool,
}

/// `run_repository`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunResult {
    pub vm: VmSummary,
    /// Where the repository is in the guest.
    pub guest_path: String,
    /// Whether the VM was deleted afterwards.
    pub deleted: bool,
    #[serde(flatten)]
    pub result: ExecResult,
}

/// `read_file`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileContent {
    pub path: String,
    pub size: u64,
    /// "utf-8" when the content is valid UTF-8, else "base64".
    pub encoding: Encoding,
    pub content: String,
}

/// `write_file`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Written {
    pub path: String,
    pub bytes: u64,
}

/// One directory entry.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileEntry {
    pub name: String,
    /// Whether the entry is a directory.
    pub dir: bool,
}

/// `list_files`' result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

/// One listening port in the guest.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Port {
    /// tcp or tcp6.
    pub proto: String,
    pub address: String,
    pub port: u16,
    pub process: Option<String>,
    /// `<ip>:<port>` to reach it from the host, when it listens beyond loopback.
    pub endpoint: Option<String>,
}

/// `ports`' result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PortList {
    pub vm: String,
    pub ports: Vec<Port>,
}

/// `export_workspace`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Patch {
    /// A `git apply`-able patch of the guest's changes (empty when there are none).
    pub patch: String,
    pub bytes: u64,
}
