//! CockroachDB / PostgreSQL over the Postgres wire protocol.
//!
//! A deadpool pool of tokio-postgres connections; prepared statements cached
//! per connection; every operation is one transaction, retried on
//! serialization failures (SQLSTATE 40001) and deadlocks (40P01) with
//! jittered backoff ([`crate::retry`]). Multi-row writes go in one statement
//! through `unnest` of arrays, which both databases accept.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::ids::PlayerId;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};
use tracing::info;

use crate::migrations::{self, now_unix_ms};
use crate::model::{self, decode_deltas, encode_deltas, from_i64, group_by_chunk, to_i64};
use crate::retry::{Backoff, Retryable, with_retry};
use crate::{
    Account, Checkpoint, ChunkDeltas, Compaction, Progress, RowKey, Session, Store, StoreConfig, StoreError, Structure,
    TickDeltas, TopologySnapshot, TransferRecord,
};

/// What can go wrong inside one attempt of a transaction.
#[derive(Debug)]
enum Attempt {
    Db(tokio_postgres::Error),
    Pool(PoolError),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        Attempt::Db(e)
    }
}

impl From<PoolError> for Attempt {
    fn from(e: PoolError) -> Self {
        Attempt::Pool(e)
    }
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Store(e)
    }
}

fn sqlstate(e: &Attempt) -> Option<&SqlState> {
    match e {
        Attempt::Db(e) => e.code(),
        Attempt::Pool(PoolError::Backend(e)) => e.code(),
        _ => None,
    }
}

impl Retryable for Attempt {
    fn retryable(&self) -> bool {
        matches!(sqlstate(self), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
    }
}

impl From<Attempt> for StoreError {
    fn from(e: Attempt) -> Self {
        match e {
            Attempt::Store(e) => e,
            Attempt::Db(e) => StoreError::Unavailable(db_error_text(&e)),
            Attempt::Pool(PoolError::Backend(e)) => StoreError::Unavailable(db_error_text(&e)),
            Attempt::Pool(PoolError::Timeout(t)) => {
                StoreError::Unavailable(format!("no database connection within the pool's timeout ({t:?})"))
            }
            Attempt::Pool(e) => StoreError::Unavailable(format!("connection pool: {e}")),
        }
    }
}

/// tokio-postgres' Display says only "db error"; the details are in the source.
fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: Pool,
    chunk_voxels: u32,
    backoff: Backoff,
}

const SELECT_ROWS: &str = "SELECT tick, writer, seq, deltas FROM world_delta_rows
     WHERE cx = $1 AND cy = $2 AND cz = $3 ORDER BY tick, writer, seq";
const SELECT_SNAPSHOT: &str = "SELECT upto_tick, upto_writer, upto_seq, voxels FROM world_chunk_snapshots
     WHERE cx = $1 AND cy = $2 AND cz = $3";

/// A verifying rustls connector trusting only the CAs in `ca` (PEM).
fn tls_connector(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let shown = ca.display();
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| StoreError::Invalid(format!("database CA file {shown}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Invalid(format!("database CA file {shown}: {e}")))?;
    for c in certs {
        roots.add(c).map_err(|e| StoreError::Invalid(format!("database CA file {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invalid(format!("database CA file {shown} holds no certificate")));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Invalid(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects (within `connect_timeout`), checks the schema version and,
    /// with `config.migrate`, applies pending migrations.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let shown = crate::redact(&config.url);
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| StoreError::Invalid(format!("database URL {shown}: {e}")))?;
        pg.connect_timeout(config.connect_timeout);
        if pg.get_application_name().is_none() {
            pg.application_name("planetary-survival");
        }
        let mc = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &config.ca_file {
            None => Manager::from_config(pg, NoTls, mc),
            Some(ca) => Manager::from_config(pg, tls_connector(ca)?, mc),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Invalid(format!("connection pool for {shown}: {e}")))?;
        let store = Self { pool, chunk_voxels: config.chunk_voxels, backoff: Backoff::default() };
        let client = tokio::time::timeout(config.connect_timeout, store.pool.get())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "database {shown} unreachable: no answer within {:?}",
                    config.connect_timeout
                ))
            })?
            .map_err(|e| {
                let why = match StoreError::from(Attempt::from(e)) {
                    StoreError::Unavailable(why) => why,
                    other => other.to_string(),
                };
                StoreError::Unavailable(format!("database {shown} unreachable: {why}"))
            })?;
        drop(client);
        let version = if config.migrate { store.migrate().await? } else { store.schema_version().await? };
        if version < migrations::LATEST {
            return Err(StoreError::Invalid(format!(
                "database {shown} is at schema version {version}, this build needs {}; run `meshctl migrate`",
                migrations::LATEST
            )));
        }
        info!(database = %shown, schema = version, "connected to the database");
        Ok(store)
    }

    async fn client(&self) -> Result<Object, Attempt> {
        Ok(self.pool.get().await?)
    }

    /// The applied schema version (0 for an empty database).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let v = self
            .ddl_retry(|| async {
                let client = self.client().await?;
                client.batch_execute(migrations::BOOKKEEPING).await?;
                let row = client.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?;
                Ok(row.get::<_, i64>(0))
            })
            .await?;
        migrations::pending(migrations::POSTGRES, v)?;
        Ok(v)
    }

    /// Runs schema work that several processes may run at once: besides
    /// serialization failures, concurrent `CREATE … IF NOT EXISTS` collide
    /// on PostgreSQL's catalog (a unique violation, or the table's row type
    /// "already exists"); the loser retries.
    async fn ddl_retry<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let mut tries = 0;
        loop {
            match with_retry(self.backoff, &op).await {
                Err(e)
                    if tries < 5
                        && sqlstate(&e).is_some_and(|c| {
                            *c == SqlState::UNIQUE_VIOLATION
                                || *c == SqlState::DUPLICATE_TABLE
                                || *c == SqlState::DUPLICATE_OBJECT
                                || *c == SqlState::DUPLICATE_COLUMN
                        }) =>
                {
                    tries += 1;
                    tokio::time::sleep(self.backoff.delay(tries)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Applies pending migrations, each in its own transaction; returns the
    /// version now applied. Several processes may run it at once: a
    /// migration another one applied meanwhile is skipped.
    pub async fn migrate(&self) -> Result<i64, StoreError> {
        let mut current = self.schema_version().await?;
        for m in migrations::pending(migrations::POSTGRES, current)? {
            let apply = || async {
                let mut client = self.client().await?;
                let tx = client.transaction().await?;
                let done = tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[&m.version]).await?;
                if done.is_none() {
                    for s in m.statements {
                        tx.batch_execute(s).await?;
                    }
                    tx.execute(
                        "INSERT INTO schema_migrations (version, name, applied_unix_ms) VALUES ($1, $2, $3)
                         ON CONFLICT (version) DO NOTHING",
                        &[&m.version, &m.name, &now_unix_ms()],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok::<bool, Attempt>(done.is_none())
            };
            let applied = self.ddl_retry(apply).await?;
            if applied {
                info!(version = m.version, name = m.name, "applied migration");
            }
            current = m.version;
        }
        Ok(current)
    }

    async fn append_once(&self, rows: &Appends) -> Result<(), Attempt> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO world_delta_rows (cx, cy, cz, tick, writer, seq, deltas)
                 SELECT * FROM unnest($1::INT4[], $2::INT4[], $3::INT4[], $4::INT8[], $5::INT8[], $6::INT8[], $7::BYTEA[])
                 ON CONFLICT (cx, cy, cz, tick, writer, seq) DO NOTHING",
            )
            .await?;
        client
            .execute(&stmt, &[&rows.cx, &rows.cy, &rows.cz, &rows.tick, &rows.writer, &rows.seq, &rows.blobs])
            .await?;
        Ok(())
    }

    fn decode_rows(
        &self,
        chunk: ChunkKey,
        rows: &[Row],
        out: &mut Vec<VoxelDelta>,
    ) -> Result<Option<RowKey>, StoreError> {
        let mut last = None;
        for r in rows {
            let key = RowKey { tick: from_i64(r.get(0)), writer: from_i64(r.get(1)), seq: from_i64(r.get(2)) };
            let blob: &[u8] = r.get(3);
            let what = || {
                format!(
                    "world_delta_rows chunk ({},{},{}) key ({},{},{})",
                    chunk.x, chunk.y, chunk.z, key.tick, key.writer, key.seq
                )
            };
            decode_deltas(blob, chunk, self.chunk_voxels, &what, out)?;
            last = Some(key);
        }
        Ok(last)
    }

    fn decode_snapshot(&self, chunk: ChunkKey, row: &Row, out: &mut Vec<VoxelDelta>) -> Result<RowKey, StoreError> {
        let key = RowKey { tick: from_i64(row.get(0)), writer: from_i64(row.get(1)), seq: from_i64(row.get(2)) };
        let blob: &[u8] = row.get(3);
        let what = || format!("world_chunk_snapshots chunk ({},{},{})", chunk.x, chunk.y, chunk.z);
        decode_deltas(blob, chunk, self.chunk_voxels, &what, out)?;
        Ok(key)
    }

    async fn chunk_once(&self, chunk: ChunkKey) -> Result<ChunkDeltas, Attempt> {
        let mut client = self.client().await?;
        let snap_stmt = client.prepare_cached(SELECT_SNAPSHOT).await?;
        let rows_stmt = client.prepare_cached(SELECT_ROWS).await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        let (x, y, z) = (chunk.x, chunk.y, chunk.z);
        let snap = tx.query_opt(&snap_stmt, &[&x, &y, &z]).await?;
        let rows = tx.query(&rows_stmt, &[&x, &y, &z]).await?;
        tx.commit().await?;
        let mut out = ChunkDeltas::default();
        if let Some(s) = &snap {
            self.decode_snapshot(chunk, s, &mut out.deltas)?;
            out.rows += 1;
        }
        self.decode_rows(chunk, &rows, &mut out.deltas)?;
        out.rows += rows.len();
        Ok(out)
    }

    async fn compact_once(&self, chunk: ChunkKey) -> Result<Compaction, Attempt> {
        let mut client = self.client().await?;
        let snap_stmt = client.prepare_cached(SELECT_SNAPSHOT).await?;
        let rows_stmt = client.prepare_cached(SELECT_ROWS).await?;
        let tx = client.transaction().await?;
        let (x, y, z) = (chunk.x, chunk.y, chunk.z);
        let snap = tx.query_opt(&snap_stmt, &[&x, &y, &z]).await?;
        let rows = tx.query(&rows_stmt, &[&x, &y, &z]).await?;
        let mut all = Vec::new();
        let mut upto = match &snap {
            Some(s) => self.decode_snapshot(chunk, s, &mut all)?,
            None => RowKey::default(),
        };
        let Some(last) = self.decode_rows(chunk, &rows, &mut all)? else {
            tx.commit().await?;
            return Ok(Compaction { rows_folded: 0, voxels: all.len() });
        };
        upto = upto.max(last);
        let folded = model::fold_deltas(&all);
        let blob = encode_deltas(folded.iter());
        tx.execute(
            "INSERT INTO world_chunk_snapshots (cx, cy, cz, upto_tick, upto_writer, upto_seq, voxels, rows_folded, updated_unix_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (cx, cy, cz) DO UPDATE SET upto_tick = excluded.upto_tick, upto_writer = excluded.upto_writer,
               upto_seq = excluded.upto_seq, voxels = excluded.voxels,
               rows_folded = world_chunk_snapshots.rows_folded + excluded.rows_folded,
               updated_unix_ms = excluded.updated_unix_ms",
            &[
                &x,
                &y,
                &z,
                &to_i64(upto.tick),
                &to_i64(upto.writer),
                &to_i64(upto.seq),
                &blob,
                &(rows.len() as i64),
                &now_unix_ms(),
            ],
        )
        .await?;
        // Exactly the rows read: serializable isolation aborts one of us if
        // a row is inserted into the range meanwhile.
        tx.execute(
            "DELETE FROM world_delta_rows WHERE cx = $1 AND cy = $2 AND cz = $3 AND (tick, writer, seq) <= ($4, $5, $6)",
            &[&x, &y, &z, &to_i64(last.tick), &to_i64(last.writer), &to_i64(last.seq)],
        )
        .await?;
        tx.commit().await?;
        Ok(Compaction { rows_folded: rows.len(), voxels: folded.len() })
    }

    async fn create_account_once(&self, name: &str, hash: &str) -> Result<Account, Attempt> {
        let client = self.client().await?;
        let account = Account {
            name: name.to_owned(),
            player: crate::random_player_id(),
            password_hash: hash.to_owned(),
            created_unix: (now_unix_ms() / 1000) as u64,
        };
        let n = client
            .execute(
                "INSERT INTO accounts (name, player_id, password_hash, created_unix) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &to_i64(account.player.0), &hash, &(account.created_unix as i64)],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::AlreadyExists(format!("account {name:?}")).into());
        }
        Ok(account)
    }
}

/// A flush's rows as column arrays for `unnest`.
#[derive(Debug, Default)]
struct Appends {
    cx: Vec<i32>,
    cy: Vec<i32>,
    cz: Vec<i32>,
    tick: Vec<i64>,
    writer: Vec<i64>,
    seq: Vec<i64>,
    blobs: Vec<Vec<u8>>,
}

fn decode_json(v: &str, what: &dyn Fn() -> String) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(v).map_err(|e| StoreError::Corrupt { what: what(), reason: e.to_string() })
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn append_deltas(&self, writer: u64, seq: u64, batches: &[TickDeltas]) -> Result<(), StoreError> {
        model::check_indexes(batches, self.chunk_voxels)?;
        let tick = batches.iter().map(|b| b.tick).max().unwrap_or(0);
        let mut rows = Appends::default();
        for (chunk, deltas) in group_by_chunk(batches) {
            rows.cx.push(chunk.x);
            rows.cy.push(chunk.y);
            rows.cz.push(chunk.z);
            rows.tick.push(to_i64(tick));
            rows.writer.push(to_i64(writer));
            rows.seq.push(to_i64(seq));
            rows.blobs.push(encode_deltas(deltas.iter()));
        }
        if rows.cx.is_empty() {
            return Ok(());
        }
        Ok(with_retry(self.backoff, || self.append_once(&rows)).await?)
    }

    async fn chunk_deltas(&self, chunk: ChunkKey) -> Result<ChunkDeltas, StoreError> {
        Ok(with_retry(self.backoff, || self.chunk_once(chunk)).await?)
    }

    async fn compact_chunk(&self, chunk: ChunkKey) -> Result<Compaction, StoreError> {
        Ok(with_retry(self.backoff, || self.compact_once(chunk)).await?)
    }

    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        // A fresh random id colliding with another account's is a unique
        // violation on player_id: draw again.
        let mut tries = 0;
        loop {
            match with_retry(self.backoff, || self.create_account_once(name, password_hash)).await {
                Err(e) if tries < 3 && sqlstate(&e).is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION) => tries += 1,
                other => return Ok(other?),
            }
        }
    }

    async fn account(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let row = with_retry(self.backoff, || async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT player_id, password_hash, created_unix FROM accounts WHERE name = $1")
                .await?;
            Ok::<_, Attempt>(client.query_opt(&stmt, &[&name]).await?)
        })
        .await?;
        Ok(row.map(|r| Account {
            name: name.to_owned(),
            player: PlayerId(from_i64(r.get(0))),
            password_hash: r.get(1),
            created_unix: from_i64(r.get(2)),
        }))
    }

    async fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError> {
        with_retry(self.backoff, || async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO sessions (token_sha256, player_id, account, expires_unix) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (token_sha256) DO UPDATE SET player_id = excluded.player_id,
                       account = excluded.account, expires_unix = excluded.expires_unix",
                    &[&token_sha256, &to_i64(session.player), &session.account, &to_i64(session.expires_unix)],
                )
                .await?;
            Ok::<_, Attempt>(())
        })
        .await?;
        Ok(())
    }

    async fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError> {
        let now = now_unix_ms() / 1000;
        let row = with_retry(self.backoff, || async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT player_id, account, expires_unix FROM sessions WHERE token_sha256 = $1",
                    &[&token_sha256],
                )
                .await?;
            if row.as_ref().is_some_and(|r| r.get::<_, i64>(2) <= now) {
                client.execute("DELETE FROM sessions WHERE token_sha256 = $1", &[&token_sha256]).await?;
                return Ok::<_, Attempt>(None);
            }
            Ok(row)
        })
        .await?;
        Ok(row.map(|r| Session { player: from_i64(r.get(0)), account: r.get(1), expires_unix: from_i64(r.get(2)) }))
    }

    async fn drop_session(&self, token_sha256: &str) -> Result<(), StoreError> {
        with_retry(self.backoff, || async {
            let client = self.client().await?;
            client.execute("DELETE FROM sessions WHERE token_sha256 = $1", &[&token_sha256]).await?;
            Ok::<_, Attempt>(())
        })
        .await?;
        Ok(())
    }

    async fn load_progress(&self, player: PlayerId) -> Result<Option<Progress>, StoreError> {
        let row = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .query_opt(
                        "SELECT version, pos_x, pos_y, pos_z, inventory::TEXT, stats::TEXT, components
                         FROM player_progress WHERE player_id = $1",
                        &[&to_i64(player.0)],
                    )
                    .await?,
            )
        })
        .await?;
        let Some(r) = row else { return Ok(None) };
        let what = || format!("player_progress of player {player}");
        Ok(Some(Progress {
            player,
            version: from_i64(r.get(0)),
            position: [r.get(1), r.get(2), r.get(3)],
            inventory: decode_json(r.get(4), &what)?,
            stats: decode_json(r.get(5), &what)?,
            components: r.get(6),
        }))
    }

    async fn save_progress(&self, p: &Progress) -> Result<(), StoreError> {
        let n = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .execute(
                        "INSERT INTO player_progress
                           (player_id, version, pos_x, pos_y, pos_z, inventory, stats, components, updated_unix_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                         ON CONFLICT (player_id) DO UPDATE SET version = excluded.version, pos_x = excluded.pos_x,
                           pos_y = excluded.pos_y, pos_z = excluded.pos_z, inventory = excluded.inventory,
                           stats = excluded.stats, components = excluded.components,
                           updated_unix_ms = excluded.updated_unix_ms
                         WHERE player_progress.version < excluded.version",
                        &[
                            &to_i64(p.player.0),
                            &to_i64(p.version),
                            &p.position[0],
                            &p.position[1],
                            &p.position[2],
                            &p.inventory,
                            &p.stats,
                            &p.components,
                            &now_unix_ms(),
                        ],
                    )
                    .await?,
            )
        })
        .await?;
        if n == 0 {
            let stored = self.load_progress(p.player).await?.map_or(0, |s| s.version);
            return Err(StoreError::Stale {
                what: format!("progress of player {}", p.player),
                stored,
                offered: p.version,
            });
        }
        Ok(())
    }

    async fn put_structure(&self, s: &Structure) -> Result<(), StoreError> {
        let n = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .execute(
                        "INSERT INTO structures (structure_id, owner_id, cx, cy, cz, kind, version, state, updated_unix_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                         ON CONFLICT (structure_id) DO UPDATE SET owner_id = excluded.owner_id, cx = excluded.cx,
                           cy = excluded.cy, cz = excluded.cz, kind = excluded.kind, version = excluded.version,
                           state = excluded.state, updated_unix_ms = excluded.updated_unix_ms
                         WHERE structures.version < excluded.version",
                        &[
                            &to_i64(s.id),
                            &to_i64(s.owner.0),
                            &s.chunk.x,
                            &s.chunk.y,
                            &s.chunk.z,
                            &s.kind,
                            &to_i64(s.version),
                            &s.state,
                            &now_unix_ms(),
                        ],
                    )
                    .await?,
            )
        })
        .await?;
        if n == 0 {
            let stored = with_retry(self.backoff, || async {
                let client = self.client().await?;
                let r = client
                    .query_opt("SELECT version FROM structures WHERE structure_id = $1", &[&to_i64(s.id)])
                    .await?;
                Ok::<_, Attempt>(r.map_or(0, |r| from_i64(r.get(0))))
            })
            .await?;
            return Err(StoreError::Stale { what: format!("structure {}", s.id), stored, offered: s.version });
        }
        Ok(())
    }

    async fn structures_in_chunk(&self, chunk: ChunkKey) -> Result<Vec<Structure>, StoreError> {
        let rows = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .query(
                        "SELECT structure_id, owner_id, kind, version, state::TEXT FROM structures
                         WHERE cx = $1 AND cy = $2 AND cz = $3 ORDER BY structure_id",
                        &[&chunk.x, &chunk.y, &chunk.z],
                    )
                    .await?,
            )
        })
        .await?;
        rows.iter()
            .map(|r| {
                let id = from_i64(r.get(0));
                Ok(Structure {
                    id,
                    owner: PlayerId(from_i64(r.get(1))),
                    chunk,
                    kind: r.get(2),
                    version: from_i64(r.get(3)),
                    state: decode_json(r.get(4), &|| format!("structures row {id}"))?,
                })
            })
            .collect()
    }

    async fn delete_structure(&self, id: u64) -> Result<bool, StoreError> {
        let n = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(client.execute("DELETE FROM structures WHERE structure_id = $1", &[&to_i64(id)]).await?)
        })
        .await?;
        Ok(n > 0)
    }

    async fn save_topology(&self, t: &TopologySnapshot) -> Result<bool, StoreError> {
        let n = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .execute(
                        "INSERT INTO mesh_topology (cluster, version, data, saved_unix_ms) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (cluster) DO UPDATE SET version = excluded.version, data = excluded.data,
                           saved_unix_ms = excluded.saved_unix_ms
                         WHERE mesh_topology.version < excluded.version",
                        &[&t.cluster, &to_i64(t.version), &t.data, &now_unix_ms()],
                    )
                    .await?,
            )
        })
        .await?;
        Ok(n > 0)
    }

    async fn load_topology(&self, cluster: &str) -> Result<Option<TopologySnapshot>, StoreError> {
        let row = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client.query_opt("SELECT version, data FROM mesh_topology WHERE cluster = $1", &[&cluster]).await?,
            )
        })
        .await?;
        Ok(row.map(|r| TopologySnapshot { cluster: cluster.to_owned(), version: from_i64(r.get(0)), data: r.get(1) }))
    }

    async fn record_transfers(&self, transfers: &[TransferRecord]) -> Result<(), StoreError> {
        if transfers.is_empty() {
            return Ok(());
        }
        let col = |f: &dyn Fn(&TransferRecord) -> i64| transfers.iter().map(f).collect::<Vec<i64>>();
        let (id, entity, from, to) = (
            col(&|t| to_i64(t.transfer_id)),
            col(&|t| to_i64(t.entity)),
            col(&|t| i64::from(t.from_server)),
            col(&|t| i64::from(t.to_server)),
        );
        let (epoch, tick, ms) =
            (col(&|t| to_i64(t.epoch)), col(&|t| to_i64(t.effective_tick)), col(&|t| to_i64(t.unix_ms)));
        let outcome: Vec<&str> = transfers.iter().map(|t| t.outcome.as_str()).collect();
        with_retry(self.backoff, || async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO authority_transfers (transfer_id, entity_id, from_server, to_server, epoch, effective_tick, outcome, unix_ms)
                     SELECT * FROM unnest($1::INT8[], $2::INT8[], $3::INT8[], $4::INT8[], $5::INT8[], $6::INT8[], $7::TEXT[], $8::INT8[])
                     ON CONFLICT (transfer_id) DO UPDATE SET outcome = excluded.outcome, unix_ms = excluded.unix_ms",
                    &[&id, &entity, &from, &to, &epoch, &tick, &outcome, &ms],
                )
                .await?;
            Ok::<_, Attempt>(())
        })
        .await?;
        Ok(())
    }

    async fn write_checkpoints(&self, rows: &[Checkpoint]) -> Result<Vec<u64>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        model::check_one_per_entity(rows)?;
        let int = |f: &dyn Fn(&Checkpoint) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
        let float = |i: usize| rows.iter().map(|r| r.pos[i]).collect::<Vec<f64>>();
        let (entity, since, epoch, tick, server) = (
            int(&|r| to_i64(r.entity)),
            int(&|r| to_i64(r.held_since)),
            int(&|r| to_i64(r.epoch)),
            int(&|r| to_i64(r.tick)),
            int(&|r| i64::from(r.server)),
        );
        let (level, rx, ry, rz) = (
            int(&|r| i64::from(r.region.0)),
            int(&|r| i64::from(r.region.1)),
            int(&|r| i64::from(r.region.2)),
            int(&|r| i64::from(r.region.3)),
        );
        let (px, py, pz) = (float(0), float(1), float(2));
        let components: Vec<&[u8]> = rows.iter().map(|r| r.components.as_slice()).collect();
        let gone: Vec<bool> = rows.iter().map(|r| r.gone).collect();
        let ms = vec![now_unix_ms(); rows.len()];
        let written = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .query(
                        "INSERT INTO entity_checkpoints (entity_id, held_since, epoch, tick, server_id, region_level, region_x,
                           region_y, region_z, pos_x, pos_y, pos_z, components, gone, written_unix_ms)
                         SELECT * FROM unnest($1::INT8[], $2::INT8[], $3::INT8[], $4::INT8[], $5::INT8[], $6::INT8[],
                           $7::INT8[], $8::INT8[], $9::INT8[], $10::FLOAT8[], $11::FLOAT8[], $12::FLOAT8[], $13::BYTEA[],
                           $14::BOOL[], $15::INT8[])
                         ON CONFLICT (entity_id) DO UPDATE SET held_since = excluded.held_since, epoch = excluded.epoch, tick = excluded.tick, server_id = excluded.server_id,
                       region_level = excluded.region_level, region_x = excluded.region_x, region_y = excluded.region_y,
                       region_z = excluded.region_z, pos_x = excluded.pos_x, pos_y = excluded.pos_y, pos_z = excluded.pos_z,
                       components = excluded.components, gone = excluded.gone, written_unix_ms = excluded.written_unix_ms
                     WHERE (entity_checkpoints.held_since, entity_checkpoints.epoch, entity_checkpoints.tick)
                       <= (excluded.held_since, excluded.epoch, excluded.tick)
                         RETURNING entity_id",
                        &[
                            &entity, &since, &epoch, &tick, &server, &level, &rx, &ry, &rz, &px, &py, &pz, &components,
                            &gone, &ms,
                        ],
                    )
                    .await?,
            )
        })
        .await?;
        let written: std::collections::HashSet<u64> = written.iter().map(|r| from_i64(r.get(0))).collect();
        Ok(rows.iter().map(|r| r.entity).filter(|e| !written.contains(e)).collect())
    }

    async fn checkpoints_within(&self, min: [f64; 3], max: [f64; 3]) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .query(
                        "SELECT entity_id, held_since, epoch, tick, server_id, region_level, region_x, region_y, region_z,
                           pos_x, pos_y, pos_z, components, gone
                         FROM entity_checkpoints
                         WHERE NOT gone AND pos_x >= $1 AND pos_x < $2 AND pos_y >= $3 AND pos_y < $4
                           AND pos_z >= $5 AND pos_z < $6",
                        &[&min[0], &max[0], &min[1], &max[1], &min[2], &max[2]],
                    )
                    .await?,
            )
        })
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                model::checkpoint_from_columns(
                    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8)],
                    [r.get(9), r.get(10), r.get(11)],
                    r.get(12),
                    r.get(13),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|c| c.entity);
        Ok(out)
    }

    async fn recent_transfers(&self, limit: usize) -> Result<Vec<TransferRecord>, StoreError> {
        let rows = with_retry(self.backoff, || async {
            let client = self.client().await?;
            Ok::<_, Attempt>(
                client
                    .query(
                        "SELECT transfer_id, entity_id, from_server, to_server, epoch, effective_tick, outcome, unix_ms
                         FROM authority_transfers ORDER BY unix_ms DESC, transfer_id DESC LIMIT $1",
                        &[&(limit.min(100_000) as i64)],
                    )
                    .await?,
            )
        })
        .await?;
        rows.iter()
            .map(|r| {
                let server = |i: usize| {
                    let v: i64 = r.get(i);
                    u32::try_from(v).map_err(|_| StoreError::Corrupt {
                        what: format!("authority_transfers row {}", from_i64(r.get(0))),
                        reason: format!("server id {v} out of range"),
                    })
                };
                Ok(TransferRecord {
                    transfer_id: from_i64(r.get(0)),
                    entity: from_i64(r.get(1)),
                    from_server: server(2)?,
                    to_server: server(3)?,
                    epoch: from_i64(r.get(4)),
                    effective_tick: from_i64(r.get(5)),
                    outcome: r.get(6),
                    unix_ms: from_i64(r.get(7)),
                })
            })
            .collect()
    }
}
