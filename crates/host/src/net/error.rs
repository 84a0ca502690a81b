//! [`NetError`]: every failure names the command, its exit status and stderr, plus a hint.

use crate::cmd::CmdError;

/// A failed host networking operation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command ran and exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}{}", hint_suffix(.hint))]
    Command {
        /// The full command line, as run (including any `ip netns exec NS` prefix).
        command: String,
        /// Exit status, e.g. `exit status: 2` or `signal: 9`.
        status: String,
        /// Trimmed stderr (or stdout when stderr was empty).
        stderr: String,
        /// What probably went wrong and what to do about it.
        hint: String,
    },
    /// A command could not be started at all (binary missing, permissions).
    #[error("cannot run `{command}`: {source}{}", hint_suffix(.hint))]
    Spawn {
        /// The command line that could not be started.
        command: String,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: String,
    },
    /// A command succeeded but printed something we could not understand.
    #[error("cannot parse the output of `{command}`: {detail}")]
    Parse {
        /// The command whose output was parsed.
        command: String,
        /// What was wrong with it.
        detail: String,
    },
    /// An argument was rejected before anything ran (bad name, bad CIDR, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// No usable NAT backend (neither `nft` nor `iptables` nor `iptables-legacy` works).
    #[error("no NAT backend works on this host: {0}")]
    NoBackend(String),
    /// The backend cannot do what was asked (e.g. an egress allowlist without nftables).
    #[error("not supported here: {0}")]
    Unsupported(String),
    /// The per-VM anti-spoofing guard cannot be installed (the VM must not start unprotected).
    #[error("cannot guard the VM's bridge port against address spoofing, refusing to start it unprotected: {0}")]
    Unguarded(String),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" (hint: {hint})")
    }
}

/// A best-effort hint from the program and its stderr.
pub(crate) fn hint_for(program: &str, stderr: &str) -> String {
    let e = stderr.to_ascii_lowercase();
    if e.contains("operation not permitted") || e.contains("permission denied") {
        return "host networking needs root (CAP_NET_ADMIN): run wickd as root".into();
    }
    if program == "nft" && e.contains("no such file or directory") {
        return "the nftables object is missing (already removed?) or nf_tables is not available"
            .into();
    }
    if e.contains("cannot find device") || e.contains("does not exist") {
        return "the interface does not exist (already removed, or never created)".into();
    }
    if e.contains("file exists") {
        return "the object already exists with different settings".into();
    }
    if program.starts_with("iptables") && e.contains("resource temporarily unavailable") {
        return "another process holds the xtables lock".into();
    }
    if e.contains("unknown") && (program == "ip" || program == "bridge") {
        return "iproute2 is too old for this option: install a newer iproute2".into();
    }
    String::new()
}

/// The hint for a program that cannot be started.
pub(crate) fn spawn_hint(program: &str) -> String {
    let pkg = match program {
        "ip" | "bridge" => "iproute2",
        "nft" => "nftables",
        p if p.starts_with("iptables") => "iptables",
        "sysctl" => "procps",
        _ => return String::new(),
    };
    format!("is `{program}` installed? (package {pkg})")
}

impl From<CmdError> for NetError {
    fn from(e: CmdError) -> Self {
        match e {
            CmdError::Spawn {
                program,
                command,
                source,
            } => NetError::Spawn {
                command,
                source,
                hint: spawn_hint(&program),
            },
            CmdError::Failed {
                program,
                command,
                status,
                stderr,
            } => NetError::Command {
                command,
                status,
                hint: hint_for(&program, &stderr),
                stderr,
            },
        }
    }
}
