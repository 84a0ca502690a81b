//! The one error type of the crate: every variant names what was being done and, where there is
//! one, what the user can do about it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// Result alias of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What went wrong while making, finding or releasing a disk.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A filesystem call failed on `path`.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A helper program could not be started at all.
    #[error("cannot run {command}: {source}{}", hint_suffix(hint))]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
        hint: Option<String>,
    },
    /// A helper program ran and failed.
    #[error("{command} failed ({status}): {stderr}{}", hint_suffix(hint))]
    Command {
        command: String,
        status: String,
        stderr: String,
        hint: Option<String>,
    },
    /// The host or the chosen filesystem cannot do what the backend needs.
    #[error("{0}")]
    Unsupported(String),
    /// A bad argument or a state that forbids the operation (e.g. shrinking a disk).
    #[error("{0}")]
    Invalid(String),
}

fn hint_suffix(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(" (hint: {h})"),
        None => String::new(),
    }
}

impl StorageError {
    /// An [`StorageError::Io`] for `action` on `path`.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        StorageError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `Display` of an exit status that says "exit status 1" or "killed by signal 9".
pub(crate) struct Status<'a>(pub &'a ExitStatus);

impl fmt::Display for Status<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::os::unix::process::ExitStatusExt;
        match (self.0.code(), self.0.signal()) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            _ => write!(f, "{}", self.0),
        }
    }
}

/// What to install when `program` is missing.
pub(crate) fn spawn_hint(program: &str) -> Option<String> {
    let pkg = match program {
        "losetup" => "util-linux",
        "dmsetup" => "dmsetup",
        "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        "mkfs.ext4" | "resize2fs" | "e2fsck" | "tune2fs" | "debugfs" => "e2fsprogs",
        _ => return None,
    };
    Some(format!("install the {pkg} package"))
}
