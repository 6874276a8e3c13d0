//! Versioned schema migrations. Each migration is a list of statements that
//! are idempotent on their own (`IF NOT EXISTS`), applied in order; the
//! version applied is recorded in `schema_migrations`. A database whose
//! version is newer than [`LATEST`] is refused untouched.
//!
//! PostgreSQL and SQLite get their own DDL (types differ) under the same
//! version numbers. The PostgreSQL statements stay in the subset CockroachDB
//! accepts: no sequences, no SERIAL, no advisory locks.

/// One schema version.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// The newest schema version this build knows.
pub const LATEST: i64 = 4;

/// The bookkeeping table both engines share.
pub const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INT8 PRIMARY KEY,
    name TEXT NOT NULL,
    applied_unix_ms INT8 NOT NULL
)";

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        statements: &[
            // One row per chunk per writer flush; key order = application order.
            "CREATE TABLE IF NOT EXISTS world_delta_rows (
            cx INT4 NOT NULL, cy INT4 NOT NULL, cz INT4 NOT NULL,
            tick INT8 NOT NULL, writer INT8 NOT NULL, seq INT8 NOT NULL,
            deltas BYTEA NOT NULL,
            PRIMARY KEY (cx, cy, cz, tick, writer, seq)
        )",
            // The compaction of every row up to (upto_tick, upto_writer, upto_seq).
            "CREATE TABLE IF NOT EXISTS world_chunk_snapshots (
            cx INT4 NOT NULL, cy INT4 NOT NULL, cz INT4 NOT NULL,
            upto_tick INT8 NOT NULL, upto_writer INT8 NOT NULL, upto_seq INT8 NOT NULL,
            voxels BYTEA NOT NULL,
            rows_folded INT8 NOT NULL,
            updated_unix_ms INT8 NOT NULL,
            PRIMARY KEY (cx, cy, cz)
        )",
            "CREATE TABLE IF NOT EXISTS accounts (
            name TEXT PRIMARY KEY,
            player_id INT8 NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_unix INT8 NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS player_progress (
            player_id INT8 PRIMARY KEY,
            version INT8 NOT NULL,
            pos_x FLOAT8 NOT NULL, pos_y FLOAT8 NOT NULL, pos_z FLOAT8 NOT NULL,
            inventory JSONB NOT NULL,
            stats JSONB NOT NULL,
            updated_unix_ms INT8 NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS structures (
            structure_id INT8 PRIMARY KEY,
            owner_id INT8 NOT NULL,
            cx INT4 NOT NULL, cy INT4 NOT NULL, cz INT4 NOT NULL,
            kind TEXT NOT NULL,
            version INT8 NOT NULL,
            state JSONB NOT NULL,
            updated_unix_ms INT8 NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS structures_by_chunk ON structures (cx, cy, cz)",
            "CREATE TABLE IF NOT EXISTS mesh_topology (
            cluster TEXT PRIMARY KEY,
            version INT8 NOT NULL,
            data BYTEA NOT NULL,
            saved_unix_ms INT8 NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS authority_transfers (
            transfer_id INT8 PRIMARY KEY,
            entity_id INT8 NOT NULL,
            from_server INT8 NOT NULL,
            to_server INT8 NOT NULL,
            epoch INT8 NOT NULL,
            effective_tick INT8 NOT NULL,
            outcome TEXT NOT NULL,
            unix_ms INT8 NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS authority_transfers_by_time ON authority_transfers (unix_ms)",
        ],
    },
    Migration {
        version: 2,
        name: "sessions",
        statements: &[
            // Login sessions, by the SHA-256 of their token (a leaked table
            // yields no usable token). Redis caches them.
            "CREATE TABLE IF NOT EXISTS sessions (
                token_sha256 TEXT PRIMARY KEY,
                player_id INT8 NOT NULL,
                account TEXT NOT NULL,
                expires_unix INT8 NOT NULL
            )",
        ],
    },
    Migration {
        version: 3,
        name: "progress_components",
        // A player's persisted components, as one component set.
        statements: &["ALTER TABLE player_progress ADD COLUMN IF NOT EXISTS components BYTEA NOT NULL DEFAULT ''"],
    },
    Migration {
        version: 4,
        name: "entity_checkpoints",
        // One row per entity: its persisted components as its owner last
        // checkpointed them, fenced by entity epoch (see Store::write_checkpoints).
        statements: &[
            "CREATE TABLE IF NOT EXISTS entity_checkpoints (
                entity_id INT8 PRIMARY KEY,
                held_since INT8 NOT NULL,
                epoch INT8 NOT NULL,
                tick INT8 NOT NULL,
                server_id INT8 NOT NULL,
                region_level INT8 NOT NULL,
                region_x INT8 NOT NULL,
                region_y INT8 NOT NULL,
                region_z INT8 NOT NULL,
                pos_x FLOAT8 NOT NULL,
                pos_y FLOAT8 NOT NULL,
                pos_z FLOAT8 NOT NULL,
                components BYTEA NOT NULL,
                gone BOOL NOT NULL,
                written_unix_ms INT8 NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS entity_checkpoints_by_x ON entity_checkpoints (pos_x)",
        ],
    },
];

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        statements: &[
            "CREATE TABLE IF NOT EXISTS world_delta_rows (
            cx INTEGER NOT NULL, cy INTEGER NOT NULL, cz INTEGER NOT NULL,
            tick INTEGER NOT NULL, writer INTEGER NOT NULL, seq INTEGER NOT NULL,
            deltas BLOB NOT NULL,
            PRIMARY KEY (cx, cy, cz, tick, writer, seq)
        ) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS world_chunk_snapshots (
            cx INTEGER NOT NULL, cy INTEGER NOT NULL, cz INTEGER NOT NULL,
            upto_tick INTEGER NOT NULL, upto_writer INTEGER NOT NULL, upto_seq INTEGER NOT NULL,
            voxels BLOB NOT NULL,
            rows_folded INTEGER NOT NULL,
            updated_unix_ms INTEGER NOT NULL,
            PRIMARY KEY (cx, cy, cz)
        ) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS accounts (
            name TEXT PRIMARY KEY,
            player_id INTEGER NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_unix INTEGER NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS player_progress (
            player_id INTEGER PRIMARY KEY,
            version INTEGER NOT NULL,
            pos_x REAL NOT NULL, pos_y REAL NOT NULL, pos_z REAL NOT NULL,
            inventory TEXT NOT NULL,
            stats TEXT NOT NULL,
            updated_unix_ms INTEGER NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS structures (
            structure_id INTEGER PRIMARY KEY,
            owner_id INTEGER NOT NULL,
            cx INTEGER NOT NULL, cy INTEGER NOT NULL, cz INTEGER NOT NULL,
            kind TEXT NOT NULL,
            version INTEGER NOT NULL,
            state TEXT NOT NULL,
            updated_unix_ms INTEGER NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS structures_by_chunk ON structures (cx, cy, cz)",
            "CREATE TABLE IF NOT EXISTS mesh_topology (
            cluster TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            data BLOB NOT NULL,
            saved_unix_ms INTEGER NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS authority_transfers (
            transfer_id INTEGER PRIMARY KEY,
            entity_id INTEGER NOT NULL,
            from_server INTEGER NOT NULL,
            to_server INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            effective_tick INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            unix_ms INTEGER NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS authority_transfers_by_time ON authority_transfers (unix_ms)",
        ],
    },
    Migration {
        version: 2,
        name: "sessions",
        statements: &["CREATE TABLE IF NOT EXISTS sessions (
                token_sha256 TEXT PRIMARY KEY,
                player_id INTEGER NOT NULL,
                account TEXT NOT NULL,
                expires_unix INTEGER NOT NULL
            )"],
    },
    Migration {
        version: 3,
        name: "progress_components",
        // SQLite has no ADD COLUMN IF NOT EXISTS; the migration's
        // transaction makes it run once.
        statements: &["ALTER TABLE player_progress ADD COLUMN components BLOB NOT NULL DEFAULT x''"],
    },
    Migration {
        version: 4,
        name: "entity_checkpoints",
        statements: &[
            "CREATE TABLE IF NOT EXISTS entity_checkpoints (
                entity_id INTEGER PRIMARY KEY,
                held_since INTEGER NOT NULL,
                epoch INTEGER NOT NULL,
                tick INTEGER NOT NULL,
                server_id INTEGER NOT NULL,
                region_level INTEGER NOT NULL,
                region_x INTEGER NOT NULL,
                region_y INTEGER NOT NULL,
                region_z INTEGER NOT NULL,
                pos_x REAL NOT NULL,
                pos_y REAL NOT NULL,
                pos_z REAL NOT NULL,
                components BLOB NOT NULL,
                gone INTEGER NOT NULL,
                written_unix_ms INTEGER NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS entity_checkpoints_by_x ON entity_checkpoints (pos_x)",
        ],
    },
];

/// The migrations after `current`, checking `current` is not newer than
/// this build knows.
pub fn pending(all: &'static [Migration], current: i64) -> Result<&'static [Migration], crate::StoreError> {
    if current > LATEST {
        return Err(crate::StoreError::SchemaTooNew { found: current, known: LATEST });
    }
    let from = all.iter().position(|m| m.version > current).unwrap_or(all.len());
    Ok(&all[from..])
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_engines_have_the_same_versions_in_order() {
        for list in [POSTGRES, SQLITE] {
            let versions: Vec<i64> = list.iter().map(|m| m.version).collect();
            assert_eq!(versions, (1..=LATEST).collect::<Vec<_>>());
        }
        let names = |l: &[Migration]| l.iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(names(POSTGRES), names(SQLITE));
    }

    #[test]
    fn pending_skips_applied_and_refuses_newer() {
        assert_eq!(pending(POSTGRES, 0).expect("ok").len(), POSTGRES.len());
        assert!(pending(POSTGRES, LATEST).expect("ok").is_empty());
        let err = pending(POSTGRES, LATEST + 1).expect_err("newer refused");
        assert_eq!(err.kind(), "schema_too_new");
    }

    #[test]
    fn postgres_ddl_stays_in_the_cockroachdb_subset() {
        for m in POSTGRES {
            for s in m.statements {
                let up = s.to_uppercase();
                for banned in ["SERIAL", "SEQUENCE", "ADVISORY", "LISTEN", "NOTIFY"] {
                    assert!(!up.contains(banned), "migration {} uses {banned}", m.version);
                }
                assert!(up.contains("IF NOT EXISTS"), "migration {} statement is not idempotent", m.version);
            }
        }
    }
}
