//! Snapshot rows (`snapshots` table, migration 4). A row is written (`creating`) before any of
//! the snapshot's files exist and marked `ready` last; names are unique by the schema.

use rusqlite::{params, OptionalExtension};
use wick_model::{SnapshotRecord, SnapshotState, VmSpec};

use crate::{to_json, Result, Store, StoreError};

const COLUMNS: &str = "id, name, owner, source_vm_id, source_vm_name, vmm, spec, state, frozen, \
                       source_running, size_bytes, created_at";

impl Store {
    /// Inserts a new snapshot record. `SnapshotNameTaken` if the name is in use.
    pub fn create_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO snapshots ({COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    s.id,
                    s.name,
                    s.owner,
                    s.source_vm_id,
                    s.source_vm_name,
                    s.vmm,
                    to_json(&s.spec)?,
                    s.state.as_str(),
                    s.frozen,
                    s.source_was_running,
                    s.size_bytes as i64,
                    s.created_at
                ],
            )
            .map_err(|e| match &e {
                rusqlite::Error::SqliteFailure(f, Some(msg))
                    if f.code == rusqlite::ErrorCode::ConstraintViolation
                        && msg.contains("snapshots.name") =>
                {
                    StoreError::SnapshotNameTaken(s.name.clone())
                }
                _ => StoreError::Sqlite(e),
            })?;
        Ok(())
    }

    /// Marks a snapshot `ready` with what it holds.
    pub fn snapshot_ready(&self, id: &str, frozen: bool, size_bytes: u64) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE snapshots SET state = 'ready', frozen = ?2, size_bytes = ?3 WHERE id = ?1",
            params![id, frozen, size_bytes as i64],
        )?;
        if n == 0 {
            return Err(StoreError::SnapshotNotFound(id.to_string()));
        }
        Ok(())
    }

    /// Removes a snapshot's record. Idempotent.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Snapshots visible to `owner` (`None` = all), oldest first.
    pub fn list_snapshots(&self, owner: Option<u32>) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE ?1 IS NULL OR owner = ?1
             ORDER BY created_at, name"
        ))?;
        let rows = stmt.query_map([owner], row_to_snapshot)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// A snapshot by exact name, exact id or unique id prefix, among those visible to `owner`.
    pub fn find_snapshot(&self, reference: &str, owner: Option<u32>) -> Result<SnapshotRecord> {
        let all = self.list_snapshots(owner)?;
        if let Some(s) = all
            .iter()
            .find(|s| s.id == reference.to_ascii_lowercase() || s.name == reference)
        {
            return Ok(s.clone());
        }
        if !wick_model::vm::looks_like_id(reference) {
            return Err(StoreError::SnapshotNotFound(reference.to_string()));
        }
        let lower = reference.to_ascii_lowercase();
        let matches: Vec<&SnapshotRecord> =
            all.iter().filter(|s| s.id.starts_with(&lower)).collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::SnapshotNotFound(reference.to_string())),
            many => Err(StoreError::Ambiguous {
                reference: reference.to_string(),
                matches: many
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A snapshot by exact id, if recorded.
    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1"),
            [id],
            row_to_snapshot,
        )
        .optional()?
        .transpose()
    }
}

fn row_to_snapshot(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SnapshotRecord>> {
    let id: String = r.get(0)?;
    let spec: String = r.get(6)?;
    let state: String = r.get(7)?;
    let size: i64 = r.get(10)?;
    let parsed = (|| -> Result<SnapshotRecord> {
        let spec: VmSpec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Corrupt(format!("snapshot {id} spec: {e}")))?;
        let state = SnapshotState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot {id}: state {state:?}")))?;
        Ok(SnapshotRecord {
            id: id.clone(),
            name: r.get(1)?,
            owner: r.get(2)?,
            source_vm_id: r.get(3)?,
            source_vm_name: r.get(4)?,
            vmm: r.get(5)?,
            spec,
            state,
            frozen: r.get(8)?,
            source_was_running: r.get(9)?,
            size_bytes: size.max(0) as u64,
            created_at: r.get(11)?,
        })
    })();
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, owner: u32) -> SnapshotRecord {
        SnapshotRecord {
            id: wick_model::new_vm_id(),
            name: name.into(),
            owner,
            source_vm_id: "v".repeat(32),
            source_vm_name: "src".into(),
            vmm: "firecracker".into(),
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 512,
                ..Default::default()
            },
            state: SnapshotState::Creating,
            frozen: false,
            source_was_running: true,
            size_bytes: 0,
            created_at: crate::now(),
        }
    }

    #[test]
    fn snapshot_rows_round_trip_names_are_unique_and_owners_filter() {
        let st = Store::open_in_memory().unwrap();
        let a = snap("base", 1000);
        st.create_snapshot(&a).unwrap();
        assert!(matches!(
            st.create_snapshot(&snap("base", 0)),
            Err(StoreError::SnapshotNameTaken(n)) if n == "base"
        ));
        st.create_snapshot(&snap("other", 0)).unwrap();
        assert_eq!(st.find_snapshot("base", None).unwrap(), a);
        assert_eq!(
            st.find_snapshot(&a.id[..8], Some(1000)).unwrap().name,
            "base"
        );
        assert!(matches!(
            st.find_snapshot("other", Some(1000)),
            Err(StoreError::SnapshotNotFound(_))
        ));
        assert_eq!(st.list_snapshots(Some(1000)).unwrap().len(), 1);
        assert_eq!(st.list_snapshots(None).unwrap().len(), 2);
        st.snapshot_ready(&a.id, true, 4096).unwrap();
        let got = st.get_snapshot(&a.id).unwrap().unwrap();
        assert_eq!(
            (got.state, got.frozen, got.size_bytes),
            (SnapshotState::Ready, true, 4096)
        );
        st.delete_snapshot(&a.id).unwrap();
        st.delete_snapshot(&a.id).unwrap();
        assert!(st.get_snapshot(&a.id).unwrap().is_none());
    }
}
