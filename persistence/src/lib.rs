//! Persistence: what must outlive a process, behind one interface ([`Store`])
//! with three implementations:
//!
//! - [`pg::PgStore`]: CockroachDB (or PostgreSQL) over the Postgres wire
//!   protocol, with a connection pool, versioned migrations, and every
//!   transaction retried on SQLSTATE 40001.
//! - [`embedded::SqliteStore`]: the default when no database URL is given; a
//!   SQLite file under the data directory, shared by every process of a local
//!   mesh (WAL mode lets several processes read and write it).
//! - [`memory::MemoryStore`]: tests, benchmarks, throwaway meshes.
//!
//! Plus [`cache`] (Redis: sessions, directory, events, rate limits,
//! leaderboards, each with a fallback when Redis is down) and
//! [`retry`]. The same behavioural tests run against every store
//! (`tests/behaviour.rs`).
//!
//! Ordering: a chunk's delta rows apply in [`RowKey`] order: mesh tick, then
//! writer, then the writer's sequence. Only the region's owner edits a voxel,
//! and ownership changes at a tick, so this is the order the edits happened in.
//! One gap: a row an old owner writes late (after a database outage longer
//! than a handoff) is read after a snapshot that already folded the new
//! owner's later rows of the same voxel.

mod args;
pub mod cache;
pub mod embedded;
pub mod memory;
pub mod migrations;
pub mod model;
pub mod pg;
pub mod retry;

pub use args::StoreArgs;

use std::sync::Arc;
use std::time::Duration;

use shared::chunk::ChunkKey;
use shared::ids::PlayerId;

pub use model::{
    Account, Checkpoint, ChunkDeltas, Compaction, Progress, RowKey, Session, Structure, TickDeltas, TopologySnapshot,
    TransferRecord,
};

/// Why a store operation failed. [`StoreError::kind`] is a stable short name
/// for metric labels.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed the request: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A row does not decode: named, left as it is, never overwritten.
    #[error("corrupt row in {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// The database was migrated by a newer build than this one.
    #[error(
        "database schema is at version {found}, newer than this build's {known}; refusing to touch it (upgrade this binary)"
    )]
    SchemaTooNew { found: i64, known: i64 },
    /// The row exists already (account names).
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A write carried a version not newer than the stored one.
    #[error("stale write to {what}: stored version {stored}, offered {offered}")]
    Stale { what: String, stored: u64, offered: u64 },
    /// The request itself is wrong (a bad name, a value out of range).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl StoreError {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::SchemaTooNew { .. } => "schema_too_new",
            StoreError::AlreadyExists(_) => "already_exists",
            StoreError::Stale { .. } => "stale",
            StoreError::Invalid(_) => "invalid",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The one storage interface of the mesh. Every method is one transaction.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// "postgres", "sqlite" or "memory".
    fn backend(&self) -> &'static str;

    // ---- world deltas ----

    /// Appends one writer's deltas atomically: all of them are durable once
    /// this returns `Ok`, none if it fails. One row per chunk, keyed
    /// (tick = newest tick of the batches, writer, seq); retrying the same
    /// (writer, seq) after an ambiguous failure does not duplicate them.
    async fn append_deltas(&self, writer: u64, seq: u64, batches: &[TickDeltas]) -> Result<(), StoreError>;

    /// Every stored delta of `chunk`, oldest first.
    async fn chunk_deltas(&self, chunk: ChunkKey) -> Result<ChunkDeltas, StoreError>;

    /// Folds the chunk's batch rows into its snapshot row, in one transaction.
    async fn compact_chunk(&self, chunk: ChunkKey) -> Result<Compaction, StoreError>;

    // ---- players ----

    /// Creates an account with a fresh player id; `AlreadyExists` if taken.
    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError>;
    async fn account(&self, name: &str) -> Result<Option<Account>, StoreError>;
    /// Saves a session under the SHA-256 (hex) of its token.
    async fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError>;
    /// The session, if it exists and has not expired (an expired one is deleted).
    async fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError>;
    async fn drop_session(&self, token_sha256: &str) -> Result<(), StoreError>;
    async fn load_progress(&self, player: PlayerId) -> Result<Option<Progress>, StoreError>;
    /// Saves when `progress.version` is newer than the stored one, else `Stale`.
    async fn save_progress(&self, progress: &Progress) -> Result<(), StoreError>;

    // ---- structures and automation ----

    /// Saves when `structure.version` is newer than the stored one, else `Stale`.
    async fn put_structure(&self, structure: &Structure) -> Result<(), StoreError>;
    async fn structures_in_chunk(&self, chunk: ChunkKey) -> Result<Vec<Structure>, StoreError>;
    /// Removes a structure; `Ok(false)` if there was none.
    async fn delete_structure(&self, id: u64) -> Result<bool, StoreError>;

    // ---- mesh topology and authority transfers ----

    /// Stores the snapshot unless a newer one is stored; returns whether it did.
    async fn save_topology(&self, snapshot: &TopologySnapshot) -> Result<bool, StoreError>;
    async fn load_topology(&self, cluster: &str) -> Result<Option<TopologySnapshot>, StoreError>;
    /// Records transfers; a transfer id already recorded is updated (its outcome moves on).
    async fn record_transfers(&self, transfers: &[TransferRecord]) -> Result<(), StoreError>;
    /// The newest `limit` transfers, newest first.
    async fn recent_transfers(&self, limit: usize) -> Result<Vec<TransferRecord>, StoreError>;

    // ---- entity checkpoints ----

    /// Writes checkpoints (at most one per entity in `rows`) in one
    /// transaction (one statement on PostgreSQL/CockroachDB); a row is
    /// refused, not written, when the stored row of its entity is newer by
    /// (held since, epoch, tick) (see [`Checkpoint::supersedes`]). Returns
    /// the entities refused.
    async fn write_checkpoints(&self, rows: &[Checkpoint]) -> Result<Vec<u64>, StoreError>;
    /// The checkpoints of entities not gone that stood within the box from
    /// `min` (included) to `max` (excluded), in entity order.
    async fn checkpoints_within(&self, min: [f64; 3], max: [f64; 3]) -> Result<Vec<Checkpoint>, StoreError>;
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `postgres://…` (CockroachDB or PostgreSQL), `sqlite:PATH`, or `memory:`.
    pub url: String,
    /// Voxels in a chunk (32³ by default); deltas outside are corrupt.
    pub chunk_voxels: u32,
    /// Connections in the pool (PostgreSQL).
    pub pool_size: usize,
    /// How long start-up waits for the database before failing.
    pub connect_timeout: Duration,
    /// Apply pending migrations at start-up (else only check the version).
    pub migrate: bool,
    /// PEM certificates of the CA that signed the database's certificate:
    /// connect over TLS (verified, TLS 1.2+) instead of in the clear. Use
    /// with `sslmode=require` in the URL, as CockroachDB's secure mode needs.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "memory:".into(),
            chunk_voxels: 32 * 32 * 32,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            migrate: true,
            ca_file: None,
        }
    }
}

/// The store URL for a data directory: the embedded default.
pub fn embedded_url(data_dir: &std::path::Path) -> String {
    format!("sqlite:{}", data_dir.join("world.sqlite").display())
}

/// Opens the store `config.url` names, checking (and with `migrate`,
/// applying) its schema. An unreachable database fails within
/// `connect_timeout` with an error naming it (password hidden).
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let url = config.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(pg::PgStore::connect(config).await?))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(embedded::SqliteStore::open(std::path::Path::new(path), config).await?))
    } else if url == "memory:" {
        Ok(Arc::new(memory::MemoryStore::new(config.chunk_voxels)))
    } else {
        Err(StoreError::Invalid(format!("store URL {:?}: expected postgres://…, sqlite:PATH or memory:", redact(url))))
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Random non-zero 63-bit id (player ids, writer ids): positive as an INT8.
pub fn random_id() -> u64 {
    fastrand::u64(1..(1u64 << 63))
}

/// A fresh random player id, in `1..=MAX_PLAYER_ID` (a player's id is its
/// avatar's 40-bit entity serial). Stores draw again on a collision.
pub fn random_player_id() -> shared::PlayerId {
    shared::PlayerId(fastrand::u64(1..=shared::ids::MAX_PLAYER_ID))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(redact("postgres://ps:secret@db:26257/mesh"), "postgres://ps:***@db:26257/mesh");
        assert_eq!(redact("postgres://ps@db/mesh"), "postgres://ps@db/mesh");
        assert_eq!(redact("sqlite:/tmp/x"), "sqlite:/tmp/x");
    }

    #[tokio::test]
    async fn unknown_url_schemes_are_refused() {
        let cfg = StoreConfig { url: "mysql://root:pw@x/y".into(), ..Default::default() };
        let err = open(&cfg).await.expect_err("refused");
        assert_eq!(err.kind(), "invalid");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}

pub mod testing {
    //! Helpers for tests that need the real servers `scripts/test` starts.

    /// The PostgreSQL server of the tests (`PS_TEST_DATABASE_URL`, set by
    /// `scripts/test`). Panics with instructions when unset: a test that
    /// needs PostgreSQL must not pass without it.
    pub fn postgres_url() -> String {
        std::env::var("PS_TEST_DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "PS_TEST_DATABASE_URL is not set: run the tests with scripts/test, which starts PostgreSQL and Redis"
            )
        })
    }

    /// The Redis server of the tests (`PS_TEST_REDIS_URL`).
    pub fn redis_url() -> String {
        std::env::var("PS_TEST_REDIS_URL").unwrap_or_else(|_| {
            panic!("PS_TEST_REDIS_URL is not set: run the tests with scripts/test, which starts PostgreSQL and Redis")
        })
    }

    /// The CA of the test PostgreSQL's TLS certificate (`PS_TEST_DATABASE_CA`).
    pub fn postgres_ca() -> std::path::PathBuf {
        std::env::var("PS_TEST_DATABASE_CA").map(Into::into).unwrap_or_else(|_| {
            panic!("PS_TEST_DATABASE_CA is not set: run the tests with scripts/test, which starts PostgreSQL and Redis")
        })
    }

    /// Creates an empty database of its own on the test server and returns
    /// its URL, so tests never see each other's rows.
    pub async fn fresh_database() -> String {
        let admin = postgres_url();
        let name = format!("ps_test_{:016x}", fastrand::u64(..));
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {admin}: {e}"));
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        drop(client);
        let _ = task.await;
        match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("PS_TEST_DATABASE_URL {admin} has no database path"),
        }
    }
}
