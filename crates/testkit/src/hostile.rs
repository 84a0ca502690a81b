//! The script of the **fake, hostile** guest agent (`hostile-agent`, a binary of this crate).
//!
//! Root in a guest can replace `wick-agent` with anything; this stand-in plays that attacker so
//! tests can prove that wickd and `wick` survive it. It speaks agent-proto's framing on the Unix
//! socket the fake Firecracker gives it (`FAKE_FC_AGENT_BIN=<hostile-agent>`, exactly like the
//! real agent), and answers each request as a [`Script`] says: a JSON file named by
//! [`SCRIPT_ENV`] in its environment (wickd's `WickdEnv::env` reaches it through the fake
//! Firecracker). The file is read again for every connection, so a test can change behaviour
//! between commands without recreating the VM.
//!
//! Requests are matched by their `op` name (`hello`, `configure`, `exec`, `put_files`,
//! `get_files`, `ports`, `health`, `shutdown`). An op missing from the script gets a plausible
//! answer for `hello`, `configure`, `shutdown`, `ports` and `health` (so a VM boots and stops
//! normally) and an error for the rest.
//!
//! Extending it: add a variant to [`Answer`] and its arm in the binary's `answer` function.
//! [`Answer::Frames`] already writes arbitrary frames (any kind byte, a declared length that
//! differs from the payload: oversized or truncated frames, repeated any number of times).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The environment variable naming the script file (JSON of [`Script`]).
pub const SCRIPT_ENV: &str = "HOSTILE_AGENT_SCRIPT";

/// What the hostile agent answers, by request op name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Script {
    pub answers: BTreeMap<String, Answer>,
}

impl Script {
    /// This script with `op` answered by `answer`.
    pub fn on(mut self, op: &str, answer: Answer) -> Self {
        self.answers.insert(op.to_string(), answer);
        self
    }

    /// Writes the script to `path` (atomically, so a connection never reads half a file).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)
    }

    /// Reads the script named by [`SCRIPT_ENV`]; the empty script when it is unset.
    pub fn from_env() -> std::io::Result<Script> {
        let Some(path) = std::env::var_os(SCRIPT_ENV) else {
            return Ok(Script::default());
        };
        let text = std::fs::read(&path)?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }
}

/// One scripted answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// A `Reply` frame `{"Err": {"message": ...}}`.
    Error(String),
    /// A `Reply` frame `{"Ok": value}`, the value verbatim (wrong shapes are allowed).
    Ok(serde_json::Value),
    /// `Reply` `Ok(())`, then these entries as a tar stream in `Data` frames, then `DataEnd`
    /// (the `get_files` conversation). Names and link names are written into the headers raw:
    /// `..` and absolute paths are allowed.
    Tar(Vec<TarEntry>),
    /// `Reply` `Ok(())`, then an `Error` frame with this message (a stream failing midway).
    StreamError(String),
    /// These frames exactly as given, then the connection is closed.
    Frames(Vec<RawFrame>),
}

/// One frame for [`Answer::Frames`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawFrame {
    /// The kind byte (any value, also unknown kinds).
    pub kind: u8,
    pub payload: Vec<u8>,
    /// The length written in the header instead of `payload.len()`.
    #[serde(default)]
    pub declared_len: Option<u32>,
    /// How many times to write the frame (default once).
    #[serde(default = "one")]
    pub repeat: u64,
}

fn one() -> u64 {
    1
}

/// The type of a [`TarEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One entry of a crafted archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TarEntry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime: u64,
    /// Symlink or hard link target.
    #[serde(default)]
    pub link: Option<String>,
    #[serde(default)]
    pub data: Vec<u8>,
    /// Device major and minor numbers.
    #[serde(default)]
    pub device: (u32, u32),
}

impl TarEntry {
    fn new(path: &str, kind: EntryKind, mode: u32) -> TarEntry {
        TarEntry {
            path: path.into(),
            kind,
            mode,
            mtime: 1_000_000_000,
            link: None,
            data: Vec::new(),
            device: (0, 0),
        }
    }

    pub fn file(path: &str, data: &[u8]) -> TarEntry {
        TarEntry {
            data: data.to_vec(),
            ..TarEntry::new(path, EntryKind::File, 0o644)
        }
    }

    pub fn dir(path: &str) -> TarEntry {
        TarEntry::new(path, EntryKind::Dir, 0o755)
    }

    pub fn symlink(path: &str, target: &str) -> TarEntry {
        TarEntry {
            link: Some(target.into()),
            ..TarEntry::new(path, EntryKind::Symlink, 0o777)
        }
    }

    pub fn hard_link(path: &str, target: &str) -> TarEntry {
        TarEntry {
            link: Some(target.into()),
            ..TarEntry::new(path, EntryKind::HardLink, 0o644)
        }
    }

    pub fn device(path: &str, kind: EntryKind, major: u32, minor: u32) -> TarEntry {
        TarEntry {
            device: (major, minor),
            ..TarEntry::new(path, kind, 0o666)
        }
    }

    pub fn mode(mut self, mode: u32) -> TarEntry {
        self.mode = mode;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> TarEntry {
        self.mtime = mtime;
        self
    }
}

/// A well-formed `Health` reply value with these (guest-controlled) strings.
pub fn health(agent_version: &str, boot_id: &str) -> serde_json::Value {
    serde_json::json!({
        "agent_version": agent_version, "boot_id": boot_id, "uptime_secs": 1.0,
        "load": [0.0, 0.0, 0.0], "mem_total_bytes": 1u64 << 30, "mem_available_bytes": 1u64 << 29,
        "root_fs_total_bytes": 1u64 << 30, "root_fs_avail_bytes": 1u64 << 29,
    })
}

/// A well-formed `Ports` reply value: one socket on `0.0.0.0:port` owned by `process`.
pub fn ports(port: u16, process: &str) -> serde_json::Value {
    serde_json::json!([{
        "proto": "tcp", "address": "0.0.0.0", "port": port, "inode": 1, "pid": 4242,
        "process": process,
    }])
}

/// The archive bytes of `entries` (GNU headers written by hand; names up to 100 bytes).
pub fn tar_bytes(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        let name = e.path.as_bytes();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = &e.link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(match e.kind {
            EntryKind::File => tar::EntryType::Regular,
            EntryKind::Dir => tar::EntryType::Directory,
            EntryKind::Symlink => tar::EntryType::Symlink,
            EntryKind::HardLink => tar::EntryType::Link,
            EntryKind::CharDevice => tar::EntryType::Char,
            EntryKind::BlockDevice => tar::EntryType::Block,
            EntryKind::Fifo => tar::EntryType::Fifo,
        });
        h.set_mode(e.mode);
        h.set_mtime(e.mtime);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
            let _ = h.set_device_major(e.device.0);
            let _ = h.set_device_minor(e.device.1);
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_and_archives_parse() {
        let s = Script::default()
            .on("ports", Answer::Error("\x1b[2J".into()))
            .on(
                "get_files",
                Answer::Tar(vec![
                    TarEntry::dir("x").mode(0o4777),
                    TarEntry::file("x/f", b"hi"),
                ]),
            );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.json");
        s.write(&p).unwrap();
        let back: Script = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back.answers.len(), 2);
        let Some(Answer::Tar(entries)) = back.answers.get("get_files") else {
            panic!("{back:?}")
        };
        let bytes = tar_bytes(entries);
        let mut ar = tar::Archive::new(&bytes[..]);
        let names: Vec<(String, u32)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                (name, e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(names, [("x".into(), 0o4777), ("x/f".into(), 0o644)]);
    }
}
