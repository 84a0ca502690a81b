//! Versioned schema migrations. Append only: never edit a released migration, add a new one.
//!
//! Each migration runs in its own transaction together with its row in `schema_migrations`, so a
//! crash mid-migration leaves the previous version intact. Rows for versions this binary does not
//! know (a newer wick ran here) are left alone; their schema changes are additive by convention.

use rusqlite::{params, Connection};

/// `(version, name, sql)`, in order.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "vms",
        "CREATE TABLE vms (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        owner       INTEGER NOT NULL,
        state       TEXT NOT NULL,
        guest_cid   INTEGER NOT NULL UNIQUE,
        spec        TEXT NOT NULL,
        runtime     TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        touched_at  TEXT NOT NULL
    );
    CREATE INDEX vms_owner ON vms(owner);",
    ),
    (
        2,
        "ip leases and daemon facts",
        "CREATE TABLE ip_leases (
        ip     TEXT PRIMARY KEY,
        vm_id  TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE
    );
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    );",
    ),
    (
        3,
        "vmm uids",
        "CREATE TABLE vmm_uids (
        uid    INTEGER PRIMARY KEY,
        vm_id  TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE
    );",
    ),
    (
        4,
        "snapshots",
        "CREATE TABLE snapshots (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        owner           INTEGER NOT NULL,
        source_vm_id    TEXT NOT NULL,
        source_vm_name  TEXT NOT NULL,
        vmm             TEXT NOT NULL,
        spec            TEXT NOT NULL,
        state           TEXT NOT NULL,
        frozen          INTEGER NOT NULL DEFAULT 0,
        source_running  INTEGER NOT NULL DEFAULT 0,
        size_bytes      INTEGER NOT NULL DEFAULT 0,
        created_at      TEXT NOT NULL
    );
    CREATE INDEX snapshots_owner ON snapshots(owner);",
    ),
];

/// Applies every known migration that is not yet recorded.
pub fn apply(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TEXT NOT NULL
        )",
    )?;
    let done = applied(conn)?;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![version, name, crate::now()],
        )?;
        tx.commit()?;
    }
    Ok(())
}

/// Versions recorded in `schema_migrations`, ascending.
pub fn applied(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare("SELECT version FROM schema_migrations ORDER BY version")?;
    let v = stmt.query_map([], |r| r.get(0))?.collect();
    v
}
