//! A golden image built once per machine and shared by tests (of this crate and others), in
//! `$WICK_TEST_CACHE` (default `/var/cache/wick-test`), keyed by a hash of the build inputs and
//! guarded by a file lock so concurrent test processes build it once.

use std::fs::{self, File};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{ImageError, IoContext, Result};
use crate::golden::GoldenOptions;
use crate::record::ImageRecord;
use crate::store::ImageStore;
use crate::util::{sparse_copy, which, write_atomic};

/// Environment variable naming the test cache directory.
pub const CACHE_ENV: &str = "WICK_TEST_CACHE";

/// A cached golden build.
#[derive(Debug, Clone)]
pub struct CachedGolden {
    pub rootfs: PathBuf,
    pub work_seed: PathBuf,
    /// The record of the build (its paths point into the cache).
    pub record: ImageRecord,
    pub key: String,
}

/// The test cache directory.
pub fn cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wick-test"))
}

/// Options for golden builds made by tests: debootstrap's package cache in the test cache, and
/// 256 MiB of free space (enough to boot and run tests; smaller images hash faster).
pub fn test_golden_options(agent_bin: Option<&Path>) -> GoldenOptions {
    GoldenOptions {
        agent_bin: agent_bin.map(Path::to_path_buf),
        cache_dir: Some(cache_root().join("debootstrap")),
        headroom_mib: Some(256),
        ..GoldenOptions::default()
    }
}

/// Why a golden build cannot run here (a reason to print when skipping), or `None`.
pub fn golden_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("building the golden image needs root".into());
    }
    for tool in ["debootstrap", "mkfs.ext4", "debugfs"] {
        if which(tool).is_none() {
            return Some(format!(
                "{tool} is not installed (apt-get install debootstrap e2fsprogs)"
            ));
        }
    }
    let mirror = match crate::debian_mirror(None, crate::DEFAULT_SUITE) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    if !reachable(&mirror) {
        return Some(format!("the Debian mirror {mirror} is not reachable"));
    }
    None
}

/// Whether a TCP connection to the mirror's host opens within 5 s.
fn reachable(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let hostport = rest.split('/').next().unwrap_or("");
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if scheme == "https" { 443 } else { 80 })
    };
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok())
}

/// The cached golden image for `agent_bin`, building it (once, under a lock) when missing.
pub fn golden(agent_bin: Option<&Path>, progress: crate::Progress<'_>) -> Result<CachedGolden> {
    let opts = test_golden_options(agent_bin);
    let key = opts.content_key()?;
    let _lock = lock()?;
    if let Some(c) = load(&key)? {
        return Ok(c);
    }
    let build = cache_root()
        .join("golden")
        .join(format!(".build-{}", &key[..16]));
    if build.exists() {
        fs::remove_dir_all(&build).ctx("remove", &build)?;
    }
    let store = ImageStore::new(build.join("images"))?;
    let record = store.build_golden(&opts, progress)?;
    let r = publish_locked(&key, &record);
    let _ = fs::remove_dir_all(&build);
    r
}

/// Puts a golden image a test built itself into the cache (no-op when one is there).
pub fn publish(opts: &GoldenOptions, record: &ImageRecord) -> Result<CachedGolden> {
    let key = opts.content_key()?;
    let _lock = lock()?;
    if let Some(c) = load(&key)? {
        return Ok(c);
    }
    publish_locked(&key, record)
}

fn publish_locked(key: &str, record: &ImageRecord) -> Result<CachedGolden> {
    let seed = record.work_seed.as_ref().ok_or_else(|| {
        ImageError::Invalid("a golden image without a work-seed cannot be cached".into())
    })?;
    let dir = key_dir(key);
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).ctx("remove", &tmp)?;
    }
    fs::create_dir_all(&tmp).ctx("create", &tmp)?;
    sparse_copy(&record.rootfs, &tmp.join("rootfs.ext4"))?;
    sparse_copy(seed, &tmp.join("work-seed.ext4"))?;
    let mut rec = record.clone();
    rec.rootfs = dir.join("rootfs.ext4");
    rec.work_seed = Some(dir.join("work-seed.ext4"));
    write_atomic(
        &tmp.join("record.json"),
        &serde_json::to_vec_pretty(&rec).expect("record serializes"),
    )?;
    if dir.exists() {
        fs::remove_dir_all(&dir).ctx("remove", &dir)?;
    }
    fs::rename(&tmp, &dir).ctx("move into place", &dir)?;
    load(key)?.ok_or_else(|| ImageError::Invalid(format!("{} vanished", dir.display())))
}

fn key_dir(key: &str) -> PathBuf {
    cache_root().join("golden").join(key)
}

fn load(key: &str) -> Result<Option<CachedGolden>> {
    let dir = key_dir(key);
    let Ok(bytes) = fs::read(dir.join("record.json")) else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<ImageRecord>(&bytes) else {
        return Ok(None);
    };
    Ok(Some(CachedGolden {
        rootfs: dir.join("rootfs.ext4"),
        work_seed: dir.join("work-seed.ext4"),
        record,
        key: key.to_string(),
    }))
}

fn lock() -> Result<Flock<File>> {
    let dir = cache_root().join("golden");
    fs::create_dir_all(&dir).ctx("create", &dir)?;
    let path = dir.join(".lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx("open", &path)?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| ImageError::io(format!("lock {}", path.display()), e.into()))
}
