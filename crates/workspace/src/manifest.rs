//! The manifest kept in the guest (`.git/wick-manifest`) and the guest file listing it is checked
//! against, so a re-prepare sends only what changed.
//!
//! Format (binary-safe for any path):
//!
//! ```text
//! wick-manifest 1\n
//! <Meta as JSON>\n
//! then per entry: <f|l> SP <mode octal> SP <size> SP <mtime ns> NUL <path> NUL <symlink target> NUL
//! ```
//!
//! The guest listing is `find -printf '%y %s %T@ %m\0%P\0%l\0'`: kind, size, mtime (seconds with
//! a fraction), permission bits, path, symlink target.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::Mode;

const MAGIC: &[u8] = b"wick-manifest 1\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Symlink,
}

/// A copied path as it was on the host when copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub target: Vec<u8>,
}

impl Entry {
    /// The host state of a file or symlink (`None` for anything else).
    pub fn from_metadata(m: &Metadata, target: Option<Vec<u8>>) -> Option<Entry> {
        let kind = if m.file_type().is_symlink() {
            Kind::Symlink
        } else if m.is_file() {
            Kind::File
        } else {
            return None;
        };
        Some(Entry {
            kind,
            mode: m.mode() & 0o7777,
            size: if kind == Kind::File { m.size() } else { 0 },
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            target: target.unwrap_or_default(),
        })
    }

    /// The whole seconds written into the tar header (what the guest's mtime will be).
    pub fn mtime_secs(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000_000)
    }

    /// Whether the guest's file still is what this entry put there.
    pub fn matches_guest(&self, g: &GuestEntry) -> bool {
        match self.kind {
            Kind::File => {
                g.kind == Kind::File
                    && g.size == self.size
                    && g.mtime_secs == self.mtime_secs()
                    && g.mode == self.mode
            }
            Kind::Symlink => g.kind == Kind::Symlink && g.target == self.target,
        }
    }
}

/// What the manifest says about the whole workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub source_path: String,
    pub mode: Mode,
    pub head: String,
    /// Commits whose trees and blobs the guest holds (their objects need not be sent again).
    pub commits: Vec<String>,
    /// Commits listed in `.git/shallow`.
    pub shallow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub meta: Meta,
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(serde_json::to_vec(&self.meta).expect("manifest meta serializes"));
        out.push(b'\n');
        for (path, e) in &self.entries {
            let k = match e.kind {
                Kind::File => 'f',
                Kind::Symlink => 'l',
            };
            out.extend(format!("{k} {:o} {} {}", e.mode, e.size, e.mtime_ns).as_bytes());
            out.push(0);
            out.extend(path);
            out.push(0);
            out.extend(&e.target);
            out.push(0);
        }
        out
    }

    /// Parses a manifest; `None` if it is not one (then the guest path is prepared afresh).
    pub fn decode(data: &[u8]) -> Option<Manifest> {
        let rest = data.strip_prefix(MAGIC)?;
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let meta: Meta = serde_json::from_slice(&rest[..nl]).ok()?;
        let mut entries = BTreeMap::new();
        let mut fields = rest[nl + 1..].split(|&b| b == 0);
        // The last field is the empty split after the final NUL.
        while let Some(head) = fields.next().filter(|h| !h.is_empty()) {
            let (path, target) = (fields.next()?, fields.next()?);
            let head = std::str::from_utf8(head).ok()?;
            let mut f = head.split(' ');
            let kind = match f.next()? {
                "f" => Kind::File,
                "l" => Kind::Symlink,
                _ => return None,
            };
            let e = Entry {
                kind,
                mode: u32::from_str_radix(f.next()?, 8).ok()?,
                size: f.next()?.parse().ok()?,
                mtime_ns: f.next()?.parse().ok()?,
                target: target.to_vec(),
            };
            entries.insert(path.to_vec(), e);
        }
        Some(Manifest { meta, entries })
    }
}

/// A file or symlink as it is in the guest now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestEntry {
    pub kind: Kind,
    pub size: u64,
    pub mtime_secs: i64,
    pub mode: u32,
    pub target: Vec<u8>,
}

/// Parses the `find -printf '%y %s %T@ %m\0%P\0%l\0'` listing (other kinds are skipped).
pub(crate) fn parse_guest_listing(data: &[u8]) -> BTreeMap<Vec<u8>, GuestEntry> {
    let mut out = BTreeMap::new();
    let mut fields = data.split(|&b| b == 0);
    while let (Some(head), Some(path), Some(target)) = (fields.next(), fields.next(), fields.next())
    {
        let Ok(head) = std::str::from_utf8(head) else {
            continue;
        };
        let mut f = head.split(' ');
        let (Some(k), Some(size), Some(mtime), Some(mode)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let kind = match k {
            "f" => Kind::File,
            "l" => Kind::Symlink,
            _ => continue,
        };
        let mtime_secs = mtime
            .split('.')
            .next()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(i64::MIN);
        out.insert(
            path.to_vec(),
            GuestEntry {
                kind,
                size: size.parse().unwrap_or(u64::MAX),
                mtime_secs,
                mode: u32::from_str_radix(mode, 8).unwrap_or(u32::MAX),
                target: target.to_vec(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_odd_paths() {
        let mut entries = BTreeMap::new();
        entries.insert(
            b"dir/with space/\xffbin\nary".to_vec(),
            Entry {
                kind: Kind::File,
                mode: 0o755,
                size: 12,
                mtime_ns: 1_700_000_000_123_456_789,
                target: vec![],
            },
        );
        entries.insert(
            b"link".to_vec(),
            Entry {
                kind: Kind::Symlink,
                mode: 0o777,
                size: 0,
                mtime_ns: 5,
                target: b"../x y".to_vec(),
            },
        );
        let m = Manifest {
            meta: Meta {
                source_path: "/src".into(),
                mode: Mode::Shallow,
                head: "abc".into(),
                commits: vec!["abc".into()],
                shallow: vec![],
            },
            entries,
        };
        assert_eq!(Manifest::decode(&m.encode()), Some(m));
        assert_eq!(Manifest::decode(b"garbage"), None);
    }

    #[test]
    fn guest_listing_parses_and_matches() {
        let data = b"f 12 1700000000.5000000000 755\0dir/a\0\0l 5 1.0 777\0link\0../x y\0d 4096 1.0 755\0dir\0\0";
        let g = parse_guest_listing(data);
        assert_eq!(g.len(), 2);
        let e = Entry {
            kind: Kind::File,
            mode: 0o755,
            size: 12,
            mtime_ns: 1_700_000_000_999_999_999,
            target: vec![],
        };
        assert!(e.matches_guest(&g[&b"dir/a".to_vec()]));
        let l = Entry {
            kind: Kind::Symlink,
            mode: 0o777,
            size: 0,
            mtime_ns: 0,
            target: b"../x y".to_vec(),
        };
        assert!(l.matches_guest(&g[&b"link".to_vec()]));
        assert!(!l.matches_guest(&g[&b"dir/a".to_vec()]));
    }
}
