//! The command tree (clap derive). Parsing only: no I/O and no validation beyond types; user
//! input is checked in [`crate::validate`] so the messages match the daemon's.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// One-command development sandboxes on Firecracker microVMs.
///
/// `wick` is the client of `wickd`, the root daemon that owns every VM and host resource. It
/// talks to the daemon over a Unix socket; when run as root it starts the daemon if needed.
#[derive(Debug, Parser)]
#[command(name = "wick", version, max_term_width = 100)]
pub struct Cli {
    /// Path of wickd's API socket [default: $WICK_SOCKET, else $WICK_ROOT/run/wickd.sock, else
    /// /run/wick/wickd.sock].
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        help_heading = "Global options"
    )]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the daemon's answer as pretty JSON.
    #[arg(long)]
    pub json: bool,
    /// Also list the warm pool's unassigned VMs (wickd's, shown to root; state `pool:ready` or
    /// `pool:booting`).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Manage images: the root filesystems VMs are created from.
    #[command(subcommand)]
    Image(crate::cmd::image::ImageCommand),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(crate::cmd::kernel::KernelCommand),
    /// List, show and delete snapshots (`wick vm snapshot` makes them).
    #[command(subcommand)]
    Snapshot(crate::cmd::snapshot::SnapshotCommand),
    /// Inspect or stop the wickd daemon.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Show the daemon's effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check the host, the daemon's state and its capabilities; exits 1 if any check fails.
    Doctor(JsonArgs),
    /// Print the client's version and, if it is running, the daemon's.
    Version(JsonArgs),
    /// Serve the Model Context Protocol on stdin/stdout, for coding agents: tools to create
    /// VMs, run commands and repositories, read and write files, list ports, export a
    /// workspace's patch, stop and delete. VMs belong to the user running it.
    Mcp,
    /// Make `ssh <name>.vm` work: show, install or remove wick's Include in ~/.ssh/config.
    ///
    /// `--install` writes wick's ssh settings (user root, wick's key, its own known_hosts, trust
    /// on first use) to its own file, creates the key if missing, and includes that file at the
    /// top of ~/.ssh/config between `# >>> wick >>>` markers. `--uninstall` removes that block
    /// only. Without a flag, prints what --install would do.
    SshConfig(SshConfigArgs),
    /// Print a shell completion script (e.g. `wick completion bash > /etc/bash_completion.d/wick`).
    Completion {
        /// Shell to generate the script for.
        shell: clap_complete::Shell,
    },
}

/// `wick ssh-config` flags.
#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Write wick's ssh settings and include them from ~/.ssh/config (idempotent).
    #[arg(long, conflicts_with = "uninstall")]
    pub install: bool,
    /// Remove wick's Include block from ~/.ssh/config (idempotent).
    #[arg(long)]
    pub uninstall: bool,
}

/// Just `--json`.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print the daemon's answer as pretty JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from an image and (unless --no-start) boot it.
    ///
    /// Every omitted value (--vcpu, --memory, --disk-size, --image) comes from the daemon's
    /// `[vm_defaults]`: config file, then a host heuristic, then a built-in floor. `wick config
    /// show` prints the resolved defaults and where each came from.
    Create(CreateArgs),
    /// Create a VM, copy a repository into it and run a command there, or log in.
    ///
    /// Three shapes: `wick vm run` (a new VM, then an interactive ssh session), `wick vm run
    /// PATH` (the git repository at PATH copied to /root/repo, then ssh), and `wick vm run PATH
    /// -- CMD...` (CMD run in /root/repo; its exit code becomes wick's). With --rm the VM is
    /// deleted when the command or session ends. Sizes and image default as for `vm create`.
    Run(Box<RunArgs>),
    /// Copy a host repository into a VM, or export the guest's changes as a patch.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Boot one or more stopped VMs.
    Start(LifecycleArgs),
    /// Stop one or more VMs gracefully (guest poweroff, forced after a timeout).
    Stop(LifecycleArgs),
    /// Stop then start one or more VMs.
    Restart(LifecycleArgs),
    /// Pause one or more running VMs: their vCPUs stop, memory and every resource stay (the
    /// DNS name and published ports too; connections wait until resume).
    Pause(LifecycleArgs),
    /// Resume one or more paused VMs.
    Resume(LifecycleArgs),
    /// Suspend one or more running or paused VMs: memory and device state saved to disk, the
    /// VMM ended (its RAM freed), disks kept. `vm start` — or any use: exec, ssh, cp — resumes.
    Suspend(LifecycleArgs),
    /// Snapshot a running or paused VM: memory, devices and both disks, kept by wickd.
    Snapshot(crate::cmd::snapshot::VmSnapshotArgs),
    /// Fork a running or paused VM into new VMs that continue its guest, each with its own
    /// identity (MAC, IP, hostname, host keys, vsock CID).
    Fork(crate::cmd::snapshot::ForkArgs),
    /// Delete one or more VMs and every host resource they hold.
    #[command(visible_alias = "rm")]
    Delete(LifecycleArgs),
    /// Send a signal to the VMM of one or more VMs; they end up stopped.
    Kill(KillArgs),
    /// List VMs (yours; root sees all).
    #[command(visible_alias = "ps")]
    List(ListArgs),
    /// Print a VM's full record as JSON.
    Show(ShowArgs),
    /// Print a VM's VMM log (serial console and VMM output).
    Logs(LogsArgs),
    /// Delete every VM of yours that is not running.
    Prune(PruneArgs),
    /// Change a VM's vcpu, memory (applied at next start), NAT or published ports (live).
    Set(SetArgs),
    /// Forward host ports to a VM's guest ports (`wick vm set --publish/--unpublish`).
    #[command(name = "port-forward")]
    PortForward(PortForwardArgs),
    /// Run a command in a VM through its agent; the command's exit code becomes wick's.
    ///
    /// Output streams as it comes (stdout and stderr kept apart, merged under -t). A command
    /// killed by signal N exits 128+N. Without -i the command's stdin is /dev/null.
    Exec(ExecArgs),
    /// Log into a VM with OpenSSH (as root, with wick's key), or run a command there.
    ///
    /// Connects to the VM's IP with `HostKeyAlias=<name>.vm` and wick's own known_hosts, into
    /// which the host keys wickd got from the guest's agent are pinned first: a changed key is
    /// refused. Extra arguments after `--` go to ssh's remote command, as with plain ssh.
    Ssh(SshArgs),
    /// Relay stdin/stdout to a VM's SSH port: the `ProxyCommand` of `wick ssh-config`, so
    /// `ssh <name>.vm` needs no host DNS. Pins the VM's host keys like `vm ssh`.
    SshProxy(SshProxyArgs),
    /// Copy files or directories between the host and a VM (`VM:PATH` on exactly one side).
    ///
    /// Directories are copied recursively; modes, mtimes and symlinks are kept. Like `cp -r`:
    /// when DST is an existing directory (or ends with `/`), SRC is copied into it under its own
    /// name, otherwise SRC is copied to DST. A relative guest PATH is relative to /root.
    Cp(CpArgs),
    /// List the TCP ports listening in a VM, with `<name>.vm:<port>` endpoints (and an http://
    /// URL for ports that answer HTTP).
    Ports(VmJsonArgs),
    /// Show the guest's health as its agent reports it: uptime, boot id, load, memory, disk.
    Health(VmJsonArgs),
    /// Show CPU and memory use of a VM's VMM as sampled by wickd.
    Stats(VmJsonArgs),
    /// Make an image from a stopped VM's root disk (`wick vm create --image NAME` boots it).
    Commit(crate::cmd::image::CommitArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub vm: VmSpecArgs,
    /// Create the VM but leave it stopped.
    #[arg(long)]
    pub no_start: bool,
    /// Take the VM's image, size, network, ports and setup from the project definition in DIR
    /// (`wick.toml`, else `.devcontainer/devcontainer.json`); flags win over the file.
    #[arg(long, value_name = "DIR")]
    pub from_dir: Option<PathBuf>,
    /// Restore snapshot SNAP (`wick snapshot list`) into the new VM instead of booting an image:
    /// it continues the snapshot's guest with its own identity. Only --name, --nat,
    /// --allow-host and --publish combine with it.
    #[arg(long, value_name = "SNAP", conflicts_with_all = ["from_dir", "no_start"])]
    pub from_snapshot: Option<String>,
    /// Print the created VM as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a new VM looks like: shared by `vm create` and `vm run`.
#[derive(Debug, Args, Default)]
pub struct VmSpecArgs {
    /// VM name: a DNS label (a-z, 0-9, '-'). Generated when omitted (e.g. calm-otter).
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    pub name: Option<String>,
    /// Image to clone the root disk from [default: from config].
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Managed kernel to boot (`wick kernel list`) [default: the image's, else `default`].
    #[arg(long, value_name = "KERNEL")]
    pub kernel: Option<String>,
    /// Number of virtual CPUs [default: from [vm_defaults]].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpu: Option<i64>,
    /// Memory, e.g. 1G or 512M; a bare number means MiB [default: from [vm_defaults]].
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Size of the work disk mounted at /root, e.g. 8G [default: from [vm_defaults]].
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk_size: Option<String>,
    /// Give the guest outbound network access (NAT).
    #[arg(long)]
    pub nat: bool,
    /// Let the guest reach only this host (`github.com`) or the hosts under a domain
    /// (`'*.pypi.org'`, not `pypi.org` itself), through wick's DNS (repeatable; instead of
    /// --nat).
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Forward a host port to a guest port, owned by wickd (repeatable). The host IP defaults to
    /// 127.0.0.1.
    #[arg(
        long = "publish",
        short = 'p',
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
    /// Which init runs as the guest's PID 1: `auto` (the image's when it is systemd, else
    /// wick-init), `wick` (wick-init starts the agent, reaps, powers off) or `image`.
    #[arg(long, value_name = "auto|wick|image")]
    pub init: Option<wick_model::InitMode>,
}

/// `wick vm run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A git repository (any directory inside its working tree) to copy into /root/repo.
    #[arg(value_name = "PATH")]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmSpecArgs,
    /// Delete the VM when the command or session ends (kept if the guest never came up).
    #[arg(long)]
    pub rm: bool,
    #[command(flatten)]
    pub workspace: WorkspaceFlags,
    /// Print the spec and what would be copied; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Ignore the repository's wick.toml / devcontainer.json.
    #[arg(long)]
    pub no_project: bool,
    /// Where the repository goes in the guest (for tests whose guest is the host).
    #[arg(long, value_name = "DIR", hide = true)]
    pub guest_path: Option<String>,
    /// The command to run in the repository (after `--`); without it, an interactive ssh session.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How a repository is copied into the guest (`vm run PATH`, `vm workspace prepare`).
#[derive(Debug, Args, Default, Clone)]
pub struct WorkspaceFlags {
    /// Create this branch in the guest only and check it out.
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    pub branch: Option<String>,
    /// Start --branch from this host branch, tag or commit instead of HEAD.
    #[arg(long, value_name = "REF", allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Also copy untracked files that are not ignored.
    #[arg(long)]
    pub include_untracked: bool,
    /// `shallow` (working tree plus a depth-1 history; the default) or `full_copy` (the whole
    /// .git directory and submodules as they are).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Copy a host git repository into a running VM through its agent.
    ///
    /// Tracked files (plus untracked, non-ignored ones with --include-untracked) and the
    /// history needed to commit and diff there. Everything is checked on the host before any
    /// guest I/O. Preparing the same VM again sends only what changed.
    Prepare(WorkspacePrepareArgs),
    /// Print the guest repository's changes as a binary-safe patch (for `git apply`).
    ///
    /// The diff is against the guest's HEAD (or --base-commit) and includes uncommitted and
    /// untracked files; it is built through a throwaway index, so the guest's index and tree are
    /// untouched. E.g. `wick vm workspace export a1 | git apply`.
    Export(WorkspaceExportArgs),
}

#[derive(Debug, Args)]
pub struct WorkspacePrepareArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// The host repository (any directory inside its working tree).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Where the repository goes in the guest.
    #[arg(long, value_name = "DIR", default_value = wick_workspace::DEFAULT_GUEST_PATH)]
    pub guest_path: String,
    #[command(flatten)]
    pub workspace: WorkspaceFlags,
    /// List what would be copied; touch nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct WorkspaceExportArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// The guest repository.
    #[arg(long, value_name = "DIR", default_value = wick_workspace::DEFAULT_GUEST_PATH)]
    pub guest_path: String,
    /// Diff against this commit instead of the guest's HEAD (includes the guest's commits).
    #[arg(long, value_name = "SHA", allow_hyphen_values = true)]
    pub base_commit: Option<String>,
    /// Write the patch to FILE instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LifecycleArgs {
    /// VMs by name, id or unique id prefix; several run concurrently.
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal name (KILL, TERM, SIGINT, ...) or number.
    #[arg(long, short = 's', default_value = "KILL", value_name = "SIG")]
    pub signal: String,
    /// VMs by name, id or unique id prefix.
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Accepted for symmetry: `vm show` always prints JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Only the last N lines.
    #[arg(long, short = 'n', value_name = "N")]
    pub tail: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Mappings to add, `[HOST_IP:]HOST_PORT:GUEST_PORT`.
    #[arg(value_name = "MAPPING")]
    pub mappings: Vec<String>,
    /// Host ports to stop forwarding.
    #[arg(long = "remove", value_name = "HOST_PORT")]
    pub remove: Vec<u16>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Number of virtual CPUs (applies at next start).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpu: Option<i64>,
    /// Memory, e.g. 2G (applies at next start).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Outbound NAT (applies live to a running VM).
    #[arg(long, value_name = "on|off")]
    pub nat: Option<OnOff>,
    /// Add a host (or `*.domain`) to the egress allowlist, live (repeatable).
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Remove an entry from the egress allowlist, live (repeatable).
    #[arg(long = "deny-host", value_name = "HOST")]
    pub deny_host: Vec<String>,
    /// Start forwarding a host port to a guest port, live (repeatable).
    #[arg(
        long = "publish",
        short = 'p',
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
    /// Stop forwarding a host port, live (repeatable).
    #[arg(long = "unpublish", value_name = "HOST_PORT")]
    pub unpublish: Vec<u16>,
    /// Print the updated VM as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Forward stdin to the command; the end of input closes its stdin.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command under a pseudo-terminal (the local terminal goes raw; window size
    /// changes follow).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable); `-e NAME` passes the local value.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the guest [default: the user's home].
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User name or uid to run as [default: root].
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// A remote command (after `--`) instead of a login shell.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshProxyArgs {
    /// The host ssh was asked for: `<vm>.vm` (or a VM reference).
    #[arg(value_name = "HOST")]
    pub host: String,
    /// The guest port.
    #[arg(value_name = "PORT", default_value_t = 22)]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a host path or VM:PATH.
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Destination: a host path or VM:PATH.
    #[arg(value_name = "DST")]
    pub dst: String,
}

/// A VM and `--json`.
#[derive(Debug, Args)]
pub struct VmJsonArgs {
    /// VM by name, id or unique id prefix.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A switch value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    #[value(alias = "true", alias = "yes")]
    On,
    #[value(alias = "false", alias = "no")]
    Off,
}

impl OnOff {
    pub fn as_bool(self) -> bool {
        self == OnOff::On
    }
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether wickd is running, its version, pid, root and VM counts (exit 1 if not running).
    Status(JsonArgs),
    /// Stop wickd; VMs keep running and are re-adopted at its next start.
    Stop,
    /// Install wickd as a systemd service: write `wickd.service` (and a commented
    /// `config.toml` when there is none), enable it and start it. Idempotent.
    Install(ServiceArgs),
    /// Stop and disable the service and remove its unit (and the config, if still the
    /// untouched example). VMs keep running. Idempotent.
    Uninstall(ServiceArgs),
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Act on the file system under DIR (a machine image being prepared) with
    /// `systemctl --root`; nothing is started or stopped.
    #[arg(long, value_name = "DIR")]
    pub fs_root: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the config file path, the effective config and the resolved VM defaults.
    Show(JsonArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("wick").chain(args.iter().copied()))
    }

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_accepts_everything() {
        let cli = parse(&[
            "vm",
            "create",
            "--name",
            "a1",
            "--image",
            "debian",
            "--vcpu",
            "2",
            "--memory",
            "1G",
            "--disk-size",
            "8G",
            "--nat",
            "--no-start",
            "--json",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.vm.name.as_deref(), Some("a1"));
        assert_eq!(a.vm.image.as_deref(), Some("debian"));
        assert_eq!(a.vm.vcpu, Some(2));
        assert_eq!(a.vm.memory.as_deref(), Some("1G"));
        assert_eq!(a.vm.disk_size.as_deref(), Some("8G"));
        assert!(a.vm.nat && a.no_start && a.json);
    }

    #[test]
    fn hyphen_and_negative_values_reach_the_validator() {
        let cli = parse(&[
            "vm", "create", "--name", "-bad", "--vcpu", "-1", "--memory", "-5",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.vm.name.as_deref(), Some("-bad"));
        assert_eq!(a.vm.vcpu, Some(-1));
        assert_eq!(a.vm.memory.as_deref(), Some("-5"));
    }

    #[test]
    fn vcpu_must_be_a_number() {
        let e = parse(&["vm", "create", "--vcpu", "two"]).unwrap_err();
        assert!(e.to_string().contains("--vcpu"), "{e}");
    }

    #[test]
    fn lifecycle_takes_several_vms() {
        let cli = parse(&["vm", "stop", "a1", "b2", "3f2a"]).unwrap();
        let Command::Vm(VmCommand::Stop(a)) = cli.command else {
            panic!("not stop")
        };
        assert_eq!(a.vms, ["a1", "b2", "3f2a"]);
        assert!(
            parse(&["vm", "start"]).is_err(),
            "at least one VM is required"
        );
        let cli = parse(&["vm", "rm", "a1"]).unwrap();
        assert!(matches!(cli.command, Command::Vm(VmCommand::Delete(_))));
    }

    #[test]
    fn kill_defaults_to_sigkill() {
        let cli = parse(&["vm", "kill", "a1"]).unwrap();
        let Command::Vm(VmCommand::Kill(a)) = cli.command else {
            panic!("not kill")
        };
        assert_eq!(a.signal, "KILL");
        let cli = parse(&["vm", "kill", "--signal", "TERM", "a1", "b2"]).unwrap();
        let Command::Vm(VmCommand::Kill(a)) = cli.command else {
            panic!("not kill")
        };
        assert_eq!((a.signal.as_str(), a.vms.len()), ("TERM", 2));
    }

    #[test]
    fn ps_is_list() {
        let cli = parse(&["vm", "ps", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Vm(VmCommand::List(ListArgs {
                json: true,
                all: false
            }))
        ));
        let cli = parse(&["vm", "list", "--all"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Vm(VmCommand::List(ListArgs { all: true, .. }))
        ));
    }

    #[test]
    fn set_nat_on_off() {
        let cli = parse(&["vm", "set", "a1", "--nat", "off", "--memory", "2G"]).unwrap();
        let Command::Vm(VmCommand::Set(a)) = cli.command else {
            panic!("not set")
        };
        assert_eq!(a.nat, Some(OnOff::Off));
        assert_eq!(a.memory.as_deref(), Some("2G"));
        assert!(parse(&["vm", "set", "a1", "--nat", "maybe"]).is_err());
    }

    #[test]
    fn global_socket_flag() {
        let cli = parse(&["daemon", "status", "--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(
            cli.socket.as_deref(),
            Some(std::path::Path::new("/tmp/x.sock"))
        );
    }

    #[test]
    fn ssh_config_flags() {
        let cli = parse(&["ssh-config", "--install"]).unwrap();
        let Command::SshConfig(a) = cli.command else {
            panic!("not ssh-config")
        };
        assert!(a.install && !a.uninstall);
        assert!(parse(&["ssh-config"]).is_ok());
        assert!(parse(&["ssh-config", "--install", "--uninstall"]).is_err());
    }

    #[test]
    fn exec_needs_a_command_after_double_dash() {
        let cli = parse(&[
            "vm", "exec", "-it", "-e", "A=1", "-e", "B=2", "-w", "/srv", "-u", "app", "a1", "--",
            "ls", "-la",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Exec(a)) = cli.command else {
            panic!("not exec")
        };
        assert!(a.interactive && a.tty);
        assert_eq!(a.env, ["A=1", "B=2"]);
        assert_eq!(
            (a.workdir.as_deref(), a.user.as_deref()),
            (Some("/srv"), Some("app"))
        );
        assert_eq!(
            (a.vm.as_str(), a.command),
            ("a1", vec!["ls".into(), "-la".into()])
        );
        for bad in [
            &["vm", "exec", "a1"][..],
            &["vm", "exec", "a1", "ls"],
            &["vm", "exec", "a1", "--"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.use_stderr(), "{bad:?}");
            assert!(e.to_string().contains("Usage"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ssh_cp_and_guest_queries() {
        let cli = parse(&["vm", "ssh", "a1"]).unwrap();
        let Command::Vm(VmCommand::Ssh(a)) = cli.command else {
            panic!("not ssh")
        };
        assert!(a.command.is_empty());
        let cli = parse(&["vm", "ssh", "a1", "--", "uname", "-r"]).unwrap();
        let Command::Vm(VmCommand::Ssh(a)) = cli.command else {
            panic!("not ssh")
        };
        assert_eq!(a.command, ["uname", "-r"]);
        let cli = parse(&["vm", "cp", "./x", "a1:/root/x"]).unwrap();
        let Command::Vm(VmCommand::Cp(a)) = cli.command else {
            panic!("not cp")
        };
        assert_eq!((a.src.as_str(), a.dst.as_str()), ("./x", "a1:/root/x"));
        assert!(parse(&["vm", "cp", "./x"]).is_err());
        for cmd in ["ports", "health", "stats"] {
            let cli = parse(&["vm", cmd, "a1", "--json"]).unwrap();
            let Command::Vm(c) = cli.command else {
                panic!("not vm")
            };
            let a = match c {
                VmCommand::Ports(a) | VmCommand::Health(a) | VmCommand::Stats(a) => a,
                other => panic!("{other:?}"),
            };
            assert!(a.json && a.vm == "a1");
        }
    }

    #[test]
    fn run_shapes() {
        let cli = parse(&["vm", "run"]).unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!("not run")
        };
        assert!(a.path.is_none() && a.command.is_empty() && !a.rm);
        let cli = parse(&[
            "vm",
            "run",
            "--rm",
            "--name",
            "a1",
            "--branch",
            "wip",
            "--from",
            "v1",
            "--mode",
            "full_copy",
            "--include-untracked",
            "--nat",
            "-p",
            "8080:80",
            "./repo",
            "--",
            "make",
            "-j2",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Run(a)) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.path.as_deref(), Some(std::path::Path::new("./repo")));
        assert_eq!(a.command, ["make", "-j2"]);
        assert!(a.rm && a.vm.nat && a.workspace.include_untracked);
        assert_eq!(a.vm.name.as_deref(), Some("a1"));
        assert_eq!(a.workspace.branch.as_deref(), Some("wip"));
        assert_eq!(a.workspace.from.as_deref(), Some("v1"));
        assert_eq!(a.workspace.mode.as_deref(), Some("full_copy"));
        assert_eq!(a.vm.publish, ["8080:80"]);
    }

    #[test]
    fn workspace_commands() {
        let cli = parse(&["vm", "workspace", "prepare", "a1", "."]).unwrap();
        let Command::Vm(VmCommand::Workspace(WorkspaceCommand::Prepare(a))) = cli.command else {
            panic!("not prepare")
        };
        assert_eq!(a.guest_path, "/root/repo");
        assert!(!a.dry_run && a.workspace.branch.is_none() && a.workspace.mode.is_none());
        let cli = parse(&[
            "vm",
            "workspace",
            "export",
            "a1",
            "--base-commit",
            "abc",
            "-o",
            "x.patch",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Workspace(WorkspaceCommand::Export(a))) = cli.command else {
            panic!("not export")
        };
        assert_eq!(a.base_commit.as_deref(), Some("abc"));
        assert_eq!(a.output.as_deref(), Some(std::path::Path::new("x.patch")));
        assert!(parse(&["vm", "workspace", "prepare", "a1"]).is_err());
    }

    #[test]
    fn completion_shells() {
        for sh in ["bash", "zsh", "fish", "elvish", "powershell"] {
            parse(&["completion", sh]).unwrap();
        }
        assert!(parse(&["completion", "tcsh"]).is_err());
    }

    #[test]
    fn create_help_mentions_vm_defaults() {
        let mut cmd = Cli::command();
        let create = cmd
            .find_subcommand_mut("vm")
            .unwrap()
            .find_subcommand_mut("create")
            .unwrap();
        let help = create.render_long_help().to_string();
        assert!(help.contains("[vm_defaults]"), "{help}");
        assert!(help.contains("wick config show"), "{help}");
    }
}
