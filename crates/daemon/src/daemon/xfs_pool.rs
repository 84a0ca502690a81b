//! The XFS pool's durable record (`meta` key [`META_KEY`]): written before the pool is made,
//! re-established at start, and the pool swept when it has no record (or released when no VM
//! and no config uses it any more). The pool itself is `wick_storage::XfsPool`.

use wick_storage::{BackendKind, DiskPlan, PoolRecord, XfsPool};

use super::Daemon;
use crate::error::{Error, Result};
use crate::failpoint;

/// The `meta` key holding the pool's [`PoolRecord`] (JSON).
pub const META_KEY: &str = "xfs_pool";

impl Daemon {
    fn xfs_pool(&self) -> XfsPool {
        XfsPool::system(&self.paths.state)
    }

    fn pool_record(&self) -> Result<Option<PoolRecord>> {
        let Some(text) = self.store.get_meta(META_KEY)? else {
            return Ok(None);
        };
        match serde_json::from_str(&text) {
            Ok(rec) => Ok(Some(rec)),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable XFS pool record; using the default");
                Ok(Some(self.xfs_pool().record()))
            }
        }
    }

    fn save_pool_record(&self, rec: Option<&PoolRecord>) -> Result<()> {
        let json = rec
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::internal(e.to_string()))?;
        self.store.set_meta(META_KEY, json.as_deref())?;
        Ok(())
    }

    /// Before a disk is placed in the pool: its record is persisted (if it is not yet), then the
    /// pool is made or mounted, then its loop device recorded. Blocking.
    pub(super) fn establish_xfs_pool(&self) -> Result<()> {
        let pool = self.xfs_pool();
        let known = self.pool_record()?;
        if known.is_none() {
            self.save_pool_record(Some(&pool.record()))?;
        }
        failpoint::hit("xfs-pool-recorded");
        let rec = pool
            .establish(true)
            .map_err(|e| Error::precondition(format!("XFS pool: {e}")))?;
        failpoint::hit("xfs-pool-made");
        if rec.is_some() && rec != known {
            self.save_pool_record(rec.as_ref())?;
        }
        Ok(())
    }
}

/// At start, from the record and the VMs' plans: a recorded pool that the config or a VM uses is
/// mounted again (after a reboot or a lost mount) and swept of disks no VM owns; a pool without
/// a record is swept away (unmounted, its loop devices detached, its file removed); a recorded
/// pool that nothing uses any more is released and its record cleared. Blocking.
pub fn reconcile_xfs_pool(d: &Daemon, plans: &[DiskPlan]) -> Result<Vec<String>> {
    let pool = d.xfs_pool();
    let in_use = plans.iter().any(|p| p.kind() == BackendKind::XfsPool);
    let selected = d.storage.kind() == BackendKind::XfsPool;
    let fail = |e: wick_storage::StorageError| Error::internal(format!("XFS pool: {e}"));
    let rec = d.pool_record()?;
    if rec.is_none() && !in_use {
        // Without its directory nothing of a pool can be left: the file goes last.
        if !pool.file().parent().is_some_and(|p| p.exists()) {
            return Ok(Vec::new());
        }
        return pool.release_pool().map_err(fail);
    }
    if !selected && !in_use {
        let done = pool.release_pool().map_err(fail)?;
        d.save_pool_record(None)?;
        return Ok(done);
    }
    if rec.is_none() {
        // Disks of known VMs live in it: never sweep those; record the pool again.
        tracing::warn!("XFS pool without a record but used by VMs: recording it again");
        d.save_pool_record(Some(&pool.record()))?;
    }
    let now = pool.establish(false).map_err(fail)?;
    if now.is_some() && now != rec {
        d.save_pool_record(now.as_ref())?;
    }
    if selected {
        return Ok(Vec::new()); // the backend's own sweep runs next
    }
    use wick_storage::CowBackend;
    pool.sweep(plans).map_err(fail)
}
