//! wickd's durable state: one SQLite database (bundled rusqlite) in WAL mode.
//!
//! The store holds VM records — spec **and** runtime, the identity of every host resource a VM
//! holds. It is the only memory the daemon trusts after a crash, so every write that records a
//! host resource must commit before (or atomically with) creating it.
//!
//! Schema changes are versioned [`migrations`], each applied in its own transaction and recorded
//! in `schema_migrations`. Versions this binary does not know (written by a newer wick) are left
//! alone.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use thiserror::Error;
use wick_model::{VmRecord, VmRuntime, VmSpec, VmState};

pub mod migrations;
mod snapshots;

/// Errors of the store. `NameTaken` and `NotFound` are user errors; the rest are internal.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("no VM matches {0:?}")]
    NotFound(String),
    #[error("{reference:?} is ambiguous: it matches {matches}")]
    Ambiguous { reference: String, matches: String },
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record in the state database: {0}")]
    Corrupt(String),
    #[error("a snapshot named {0:?} already exists")]
    SnapshotNameTaken(String),
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Lowest vsock guest CID handed out (0-2 are reserved by vsock).
pub const FIRST_GUEST_CID: u32 = 3;

/// Current UTC time in RFC 3339 with milliseconds, as stored in every timestamp column.
pub fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Handle to the database. Cheap operations; callers share it behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
}

const VM_COLUMNS: &str =
    "id, name, owner, state, spec, runtime, created_at, updated_at, touched_at";

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory store (tests and benchmarks).
    pub fn open_in_memory() -> Result<Store> {
        let mut conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Versions of the migrations applied to this database.
    pub fn schema_versions(&self) -> Result<Vec<i64>> {
        Ok(migrations::applied(&self.conn())?)
    }

    /// Quick health probe for `doctor`: integrity of the database file.
    pub fn integrity_check(&self) -> Result<String> {
        let conn = self.conn();
        Ok(conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0))?)
    }

    /// Inserts a new VM, assigning it a unique vsock CID (written into `runtime.guest_cid`).
    /// Fails with `NameTaken` if the name is in use.
    pub fn create_vm(&self, mut vm: VmRecord) -> Result<VmRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [&vm.name], |_| {
                Ok(true)
            })
            .optional()?
            .unwrap_or(false);
        if taken {
            return Err(StoreError::NameTaken(vm.name));
        }
        let cid: u32 = tx.query_row(
            "SELECT COALESCE(MAX(guest_cid) + 1, ?1) FROM vms",
            [FIRST_GUEST_CID],
            |r| r.get(0),
        )?;
        vm.runtime.guest_cid = cid;
        tx.execute(
            "INSERT INTO vms (id, name, owner, state, guest_cid, spec, runtime, created_at, updated_at, touched_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                vm.id,
                vm.name,
                vm.owner,
                vm.state.as_str(),
                cid,
                to_json(&vm.spec)?,
                to_json(&vm.runtime)?,
                vm.created_at,
                vm.updated_at,
                vm.touched_at
            ],
        )
        .map_err(|e| map_unique(e, &vm.name))?;
        tx.commit()?;
        Ok(vm)
    }

    /// Writes the mutable parts of a VM (state, spec, runtime, timestamps). `updated_at` is set
    /// to now. Returns the record as stored.
    pub fn save_vm(&self, vm: &VmRecord) -> Result<VmRecord> {
        let mut vm = vm.clone();
        vm.updated_at = now();
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, spec = ?3, runtime = ?4, updated_at = ?5, touched_at = ?6 WHERE id = ?1",
            params![
                vm.id,
                vm.state.as_str(),
                to_json(&vm.spec)?,
                to_json(&vm.runtime)?,
                vm.updated_at,
                vm.touched_at
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(vm.id.clone()));
        }
        Ok(vm)
    }

    /// A VM by exact id.
    pub fn get_vm(&self, id: &str) -> Result<VmRecord> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
            [id],
            row_to_vm,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?
    }

    /// Resolves a user's reference: exact name, exact id, or unique id prefix — among the VMs
    /// visible to `owner` (`None` = all).
    pub fn find_vm(&self, reference: &str, owner: Option<u32>) -> Result<VmRecord> {
        let visible = |vm: &VmRecord| owner.is_none_or(|o| vm.owner == o);
        let conn = self.conn();
        let one = |sql: &str, key: &str| -> Result<Option<VmRecord>> {
            Ok(conn
                .query_row(
                    &format!("SELECT {VM_COLUMNS} FROM vms WHERE {sql}"),
                    [key],
                    row_to_vm,
                )
                .optional()?
                .transpose()?
                .filter(visible))
        };
        // Unambiguous order: an exact id, then a name, then a unique id prefix. Names never
        // look like ids or id prefixes (`validate_vm_name`), so no VM's name can shadow
        // another VM's id.
        let lower = reference.to_ascii_lowercase();
        if lower.len() == wick_model::vm::ID_LEN {
            if let Some(vm) = one("id = ?1", &lower)? {
                return Ok(vm);
            }
        }
        if let Some(vm) = one("name = ?1", reference)? {
            return Ok(vm);
        }
        if !wick_model::vm::looks_like_id(reference) {
            return Err(StoreError::NotFound(reference.to_string()));
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE substr(id, 1, ?2) = ?1 ORDER BY created_at"
        ))?;
        let matches: Vec<VmRecord> = stmt
            .query_map(
                params![reference.to_ascii_lowercase(), reference.len()],
                row_to_vm,
            )?
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(visible)
            .collect();
        match matches.len() {
            0 => Err(StoreError::NotFound(reference.to_string())),
            1 => Ok(matches.into_iter().next().expect("one")),
            _ => Err(StoreError::Ambiguous {
                reference: reference.to_string(),
                matches: matches
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// All VMs visible to `owner` (`None` = all), oldest first.
    pub fn list_vms(&self, owner: Option<u32>) -> Result<Vec<VmRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE ?1 IS NULL OR owner = ?1 ORDER BY created_at, name"
        ))?;
        let rows = stmt.query_map([owner], row_to_vm)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// Takes one ready warm-pool VM for a create, atomically: in one write transaction, the
    /// first ready pool VM (oldest first) that `pick` accepts is rewritten by `assign` (new
    /// name, owner, spec, pool slot) — only if it is still ready, so concurrent takers can never
    /// get the same VM. `Ok(None)`: no match. `NameTaken`: the new name is in use (nothing
    /// changed).
    pub fn take_pooled(
        &self,
        pick: impl Fn(&VmRecord) -> bool,
        assign: impl FnOnce(VmRecord) -> VmRecord,
    ) -> Result<Option<VmRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE json_extract(runtime, '$.pool') = 'ready'
                 ORDER BY created_at, name"
            ))?;
            let rows = stmt.query_map([], row_to_vm)?;
            let mut found = None;
            for r in rows {
                let vm = r??;
                if pick(&vm) {
                    found = Some(vm);
                    break;
                }
            }
            found
        };
        let Some(old) = found else {
            return Ok(None);
        };
        let mut vm = assign(old.clone());
        vm.id = old.id.clone();
        vm.updated_at = now();
        // The new name must be free: also of the pool VM itself, whose own name is wickd's.
        if vm.name != old.name || vm.owner != old.owner {
            let taken = tx
                .query_row("SELECT 1 FROM vms WHERE name = ?1", [&vm.name], |_| Ok(()))
                .optional()?
                .is_some();
            if taken {
                return Err(StoreError::NameTaken(vm.name));
            }
        }
        let n = tx
            .execute(
                "UPDATE vms SET name = ?2, owner = ?3, state = ?4, spec = ?5, runtime = ?6,
                 created_at = ?7, updated_at = ?8, touched_at = ?9
                 WHERE id = ?1 AND json_extract(runtime, '$.pool') = 'ready'",
                params![
                    vm.id,
                    vm.name,
                    vm.owner,
                    vm.state.as_str(),
                    to_json(&vm.spec)?,
                    to_json(&vm.runtime)?,
                    vm.created_at,
                    vm.updated_at,
                    vm.touched_at
                ],
            )
            .map_err(|e| map_unique(e, &vm.name))?;
        if n != 1 {
            return Ok(None);
        }
        tx.commit()?;
        Ok(Some(vm))
    }

    /// Marks the VM as used now (a user action or an agent session): only `touched_at`
    /// changes, so it never races with a lifecycle operation's writes of the rest.
    pub fn touch_vm(&self, id: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE vms SET touched_at = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    /// Removes a VM's record. Idempotent.
    pub fn delete_vm(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM vms WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Number of VMs, and of those in `running`.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let conn = self.conn();
        Ok(conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(state = 'running'), 0) FROM vms",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }
}

impl Store {
    /// The VM's IPv4 lease: its existing one, or the first of `candidates` nobody holds. Unique
    /// per VM and per address (enforced by the schema), safe under concurrent callers.
    pub fn lease_ip(
        &self,
        vm_id: &str,
        candidates: impl IntoIterator<Item = std::net::Ipv4Addr>,
    ) -> Result<Option<std::net::Ipv4Addr>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .query_row("SELECT ip FROM ip_leases WHERE vm_id = ?1", [vm_id], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(ip) = existing {
            return ip
                .parse()
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("lease {ip:?} of vm {vm_id}")));
        }
        let taken: std::collections::HashSet<String> = {
            let mut stmt = tx.prepare("SELECT ip FROM ip_leases")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(ip) = candidates
            .into_iter()
            .find(|ip| !taken.contains(&ip.to_string()))
        else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO ip_leases (ip, vm_id) VALUES (?1, ?2)",
            params![ip.to_string(), vm_id],
        )?;
        tx.commit()?;
        Ok(Some(ip))
    }

    /// Releases the VM's lease. Idempotent.
    pub fn release_ip(&self, vm_id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM ip_leases WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// The VM's VMM uid: its existing lease, or the lowest uid of `range` nobody holds. Unique
    /// per VM and per uid (enforced by the schema), safe under concurrent callers; `None` when
    /// the range is exhausted.
    pub fn lease_uid(
        &self,
        vm_id: &str,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<Option<u32>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<u32> = tx
            .query_row("SELECT uid FROM vmm_uids WHERE vm_id = ?1", [vm_id], |r| {
                r.get(0)
            })
            .optional()?;
        if existing.is_some() {
            return Ok(existing);
        }
        let taken: std::collections::HashSet<u32> = {
            let mut stmt = tx.prepare("SELECT uid FROM vmm_uids WHERE uid BETWEEN ?1 AND ?2")?;
            let rows = stmt.query_map(params![range.start(), range.end()], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(uid) = range.into_iter().find(|u| !taken.contains(u)) else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO vmm_uids (uid, vm_id) VALUES (?1, ?2)",
            params![uid, vm_id],
        )?;
        tx.commit()?;
        Ok(Some(uid))
    }

    /// Releases the VM's uid lease. Idempotent.
    pub fn release_uid(&self, vm_id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM vmm_uids WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// A daemon-level durable fact (e.g. that wick turned `ip_forward` on).
    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Sets (`Some`) or clears (`None`) a daemon-level fact.
    pub fn set_meta(&self, key: &str, value: Option<&str>) -> Result<()> {
        let conn = self.conn();
        match value {
            Some(v) => conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, v],
            )?,
            None => conn.execute("DELETE FROM meta WHERE key = ?1", [key])?,
        };
        Ok(())
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn map_unique(e: rusqlite::Error, name: &str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("vms.name") =>
        {
            StoreError::NameTaken(name.to_string())
        }
        _ => StoreError::Sqlite(e),
    }
}

fn row_to_vm(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<VmRecord>> {
    let id: String = r.get(0)?;
    let state: String = r.get(3)?;
    let spec: String = r.get(4)?;
    let runtime: String = r.get(5)?;
    let parsed = (|| -> Result<VmRecord> {
        let state: VmState = state
            .parse()
            .map_err(|e: String| StoreError::Corrupt(format!("vm {id}: {e}")))?;
        let spec: VmSpec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Corrupt(format!("vm {id} spec: {e}")))?;
        let runtime: VmRuntime = serde_json::from_str(&runtime)
            .map_err(|e| StoreError::Corrupt(format!("vm {id} runtime: {e}")))?;
        Ok(VmRecord {
            id: id.clone(),
            name: r.get(1)?,
            owner: r.get(2)?,
            state,
            spec,
            runtime,
            created_at: r.get(6)?,
            updated_at: r.get(7)?,
            touched_at: r.get(8)?,
        })
    })();
    Ok(parsed)
}

#[cfg(test)]
mod tests;
