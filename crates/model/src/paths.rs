//! Where wick keeps things. One layout shared by `wick` and `wickd`, so the CLI finds the
//! daemon's socket from the same `WICK_ROOT` the daemon was started with.
//!
//! | what | with `WICK_ROOT=DIR` | system default |
//! |---|---|---|
//! | config | `DIR/config.toml` | `/etc/wick/config.toml` |
//! | state (db, VM dirs) | `DIR/state` | `/var/lib/wick` |
//! | runtime (socket, daemon log) | `DIR/run` | `/run/wick` |
//! | cache | `DIR/cache` | `/var/cache/wick` |

use std::path::{Path, PathBuf};

/// A commented `config.toml` with every setting at its default, written by
/// `wick daemon install` when the host has no config yet (the daemon's tests parse it).
pub const CONFIG_EXAMPLE: &str = include_str!("config.example.toml");

/// Environment variable that relocates everything under one directory.
pub const ROOT_ENV: &str = "WICK_ROOT";

/// Resolved locations of config, state, runtime and cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub root: Option<PathBuf>,
    pub config: PathBuf,
    pub state: PathBuf,
    pub run: PathBuf,
    pub cache: PathBuf,
}

impl Paths {
    /// The layout under `root`, or the system layout when `None`.
    pub fn new(root: Option<&Path>) -> Paths {
        match root {
            Some(r) => Paths {
                root: Some(r.to_path_buf()),
                config: r.join("config.toml"),
                state: r.join("state"),
                run: r.join("run"),
                cache: r.join("cache"),
            },
            None => Paths {
                root: None,
                config: PathBuf::from("/etc/wick/config.toml"),
                state: PathBuf::from("/var/lib/wick"),
                run: PathBuf::from("/run/wick"),
                cache: PathBuf::from("/var/cache/wick"),
            },
        }
    }

    /// The layout chosen by `WICK_ROOT` (unset or empty = system layout).
    pub fn from_env() -> Paths {
        match std::env::var_os(ROOT_ENV) {
            Some(v) if !v.is_empty() => Paths::new(Some(Path::new(&v))),
            _ => Paths::new(None),
        }
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.run.join("wickd.sock")
    }

    /// The daemon's log when the CLI starts it.
    pub fn daemon_log(&self) -> PathBuf {
        self.run.join("wickd.log")
    }

    /// The SQLite database.
    pub fn db(&self) -> PathBuf {
        self.state.join("wick.db")
    }

    /// The default parent of this layout's per-VM cgroups: `wick` for the system layout,
    /// `wick-<8 hex>` (FNV-1a of the root path) under a `WICK_ROOT`, so daemons of different
    /// roots never sweep each other's cgroups.
    pub fn default_cgroup_parent(&self) -> String {
        use std::os::unix::ffi::OsStrExt;
        match &self.root {
            None => "wick".into(),
            Some(root) => {
                let h = root
                    .as_os_str()
                    .as_bytes()
                    .iter()
                    .fold(0x811c_9dc5u32, |h, b| {
                        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
                    });
                format!("wick-{h:08x}")
            }
        }
    }

    /// Directory of one VM.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.state.join("vms").join(vm_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooted_layout() {
        let p = Paths::new(Some(Path::new("/tmp/w")));
        assert_eq!(p.socket(), PathBuf::from("/tmp/w/run/wickd.sock"));
        assert_eq!(p.db(), PathBuf::from("/tmp/w/state/wick.db"));
        assert_eq!(p.config, PathBuf::from("/tmp/w/config.toml"));
        assert_eq!(
            Paths::new(None).socket(),
            PathBuf::from("/run/wick/wickd.sock")
        );
        assert_eq!(Paths::new(None).default_cgroup_parent(), "wick");
        let a = p.default_cgroup_parent();
        assert!(a.starts_with("wick-") && a.len() == 13, "{a}");
        assert_ne!(
            a,
            Paths::new(Some(Path::new("/tmp/x"))).default_cgroup_parent()
        );
    }
}
