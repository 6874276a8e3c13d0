//! The embedded default: SQLite (bundled, so a fresh machine needs nothing)
//! in one file under the data directory.
//!
//! WAL mode lets every process of a local mesh (the coordinator and all game
//! servers) open the same file: readers never block, writers take turns
//! (`busy_timeout`). `synchronous = FULL`: a committed transaction survives
//! power loss, which is what "durable" promises to a player. Each process
//! keeps one connection for writes and one for reads; calls run on tokio's
//! blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::ids::PlayerId;
use tracing::info;

use crate::migrations::{self, now_unix_ms};
use crate::model::{self, decode_deltas, encode_deltas, from_i64, group_by_chunk, to_i64};
use crate::{
    Account, Checkpoint, ChunkDeltas, Compaction, Progress, RowKey, Session, Store, StoreConfig, StoreError, Structure,
    TickDeltas, TopologySnapshot, TransferRecord,
};

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    chunk_voxels: u32,
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn unavailable(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("embedded store {}: {e}", path.display()))
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable(path))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable(path))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(unavailable(path))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(unavailable(path))?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(unavailable(path))?;
    Ok(conn)
}

const SELECT_ROWS: &str = "SELECT tick, writer, seq, deltas FROM world_delta_rows
     WHERE cx = ?1 AND cy = ?2 AND cz = ?3 ORDER BY tick, writer, seq";
const SELECT_SNAPSHOT: &str = "SELECT upto_tick, upto_writer, upto_seq, voxels FROM world_chunk_snapshots
     WHERE cx = ?1 AND cy = ?2 AND cz = ?3";

type RawRow = (RowKey, Vec<u8>);

fn read_rows(conn: &Connection, sql: &str, c: ChunkKey) -> rusqlite::Result<Vec<RawRow>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![c.x, c.y, c.z], |r| {
        Ok((RowKey { tick: from_i64(r.get(0)?), writer: from_i64(r.get(1)?), seq: from_i64(r.get(2)?) }, r.get(3)?))
    })?;
    rows.collect()
}

impl SqliteStore {
    /// Opens (creating) the database file, checks the schema version and,
    /// with `config.migrate`, applies pending migrations.
    pub async fn open(path: &Path, config: &StoreConfig) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let chunk_voxels = config.chunk_voxels;
        let migrate = config.migrate;
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
            }
            let mut writer = open_connection(&path)?;
            let version = migrate_connection(&mut writer, &path, migrate)?;
            if version < migrations::LATEST {
                return Err(StoreError::Invalid(format!(
                    "embedded store {} is at schema version {version}, this build needs {}; run `meshctl migrate`",
                    path.display(),
                    migrations::LATEST
                )));
            }
            let reader = open_connection(&path)?;
            info!(path = %path.display(), schema = version, "opened the embedded store");
            Ok(Self {
                inner: Arc::new(Inner { path, writer: Mutex::new(writer), reader: Mutex::new(reader), chunk_voxels }),
            })
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task: {e}")))?
    }

    /// Runs `f` with the writer (or reader) connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        write: bool,
        f: impl FnOnce(&mut Connection, &Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(if write { &inner.writer } else { &inner.reader })?;
            f(&mut conn, &inner)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task: {e}")))?
    }
}

fn lock(m: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, StoreError> {
    m.lock().map_err(|_| StoreError::Unavailable("embedded store lock poisoned".into()))
}

fn migrate_connection(conn: &mut Connection, path: &Path, migrate: bool) -> Result<i64, StoreError> {
    let err = unavailable(path);
    conn.execute_batch(migrations::BOOKKEEPING).map_err(&err)?;
    let current: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0)).map_err(&err)?;
    let pending = migrations::pending(migrations::SQLITE, current)?;
    if !migrate {
        return Ok(current);
    }
    let mut version = current;
    for m in pending {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
        let done: Option<i64> = tx
            .query_row("SELECT version FROM schema_migrations WHERE version = ?1", [m.version], |r| r.get(0))
            .optional()
            .map_err(&err)?;
        if done.is_none() {
            for s in m.statements {
                tx.execute_batch(s).map_err(&err)?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_unix_ms) VALUES (?1, ?2, ?3)",
                params![m.version, m.name, now_unix_ms()],
            )
            .map_err(&err)?;
            info!(version = m.version, name = m.name, "applied migration");
        }
        tx.commit().map_err(&err)?;
        version = m.version;
    }
    Ok(version)
}

fn decode_all(
    inner: &Inner,
    chunk: ChunkKey,
    snap: Option<&RawRow>,
    rows: &[RawRow],
    out: &mut Vec<VoxelDelta>,
) -> Result<(), StoreError> {
    if let Some((_, blob)) = snap {
        let what = || format!("world_chunk_snapshots chunk ({},{},{})", chunk.x, chunk.y, chunk.z);
        decode_deltas(blob, chunk, inner.chunk_voxels, &what, out)?;
    }
    for (key, blob) in rows {
        let what = || {
            format!(
                "world_delta_rows chunk ({},{},{}) key ({},{},{})",
                chunk.x, chunk.y, chunk.z, key.tick, key.writer, key.seq
            )
        };
        decode_deltas(blob, chunk, inner.chunk_voxels, &what, out)?;
    }
    Ok(())
}

fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

fn decode_json(v: &str, what: impl Fn() -> String) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(v).map_err(|e| StoreError::Corrupt { what: what(), reason: e.to_string() })
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn append_deltas(&self, writer: u64, seq: u64, batches: &[TickDeltas]) -> Result<(), StoreError> {
        model::check_indexes(batches, self.inner.chunk_voxels)?;
        let tick = to_i64(batches.iter().map(|b| b.tick).max().unwrap_or(0));
        let groups = group_by_chunk(batches);
        if groups.is_empty() {
            return Ok(());
        }
        let rows: Vec<(ChunkKey, Vec<u8>)> = groups.into_iter().map(|(c, ds)| (c, encode_deltas(ds.iter()))).collect();
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO world_delta_rows (cx, cy, cz, tick, writer, seq, deltas) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (cx, cy, cz, tick, writer, seq) DO NOTHING",
                    )
                    .map_err(&err)?;
                for (c, blob) in &rows {
                    stmt.execute(params![c.x, c.y, c.z, tick, to_i64(writer), to_i64(seq), blob]).map_err(&err)?;
                }
            }
            tx.commit().map_err(&err)
        })
        .await
    }

    async fn chunk_deltas(&self, chunk: ChunkKey) -> Result<ChunkDeltas, StoreError> {
        self.with(false, move |conn, inner| {
            let err = unavailable(&inner.path);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(&err)?;
            let snap = read_rows(&tx, SELECT_SNAPSHOT, chunk).map_err(&err)?;
            let rows = read_rows(&tx, SELECT_ROWS, chunk).map_err(&err)?;
            tx.commit().map_err(&err)?;
            let mut out = ChunkDeltas { deltas: Vec::new(), rows: snap.len() + rows.len() };
            decode_all(inner, chunk, snap.first(), &rows, &mut out.deltas)?;
            Ok(out)
        })
        .await
    }

    async fn compact_chunk(&self, chunk: ChunkKey) -> Result<Compaction, StoreError> {
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
            let snap = read_rows(&tx, SELECT_SNAPSHOT, chunk).map_err(&err)?;
            let rows = read_rows(&tx, SELECT_ROWS, chunk).map_err(&err)?;
            let mut all = Vec::new();
            decode_all(inner, chunk, snap.first(), &rows, &mut all)?;
            let Some(last) = rows.last().map(|r| r.0) else {
                return Ok(Compaction { rows_folded: 0, voxels: all.len() });
            };
            let upto = snap.first().map_or(last, |s| s.0.max(last));
            let folded = model::fold_deltas(&all);
            tx.execute(
                "INSERT INTO world_chunk_snapshots (cx, cy, cz, upto_tick, upto_writer, upto_seq, voxels, rows_folded, updated_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (cx, cy, cz) DO UPDATE SET upto_tick = excluded.upto_tick, upto_writer = excluded.upto_writer,
                   upto_seq = excluded.upto_seq, voxels = excluded.voxels,
                   rows_folded = world_chunk_snapshots.rows_folded + excluded.rows_folded,
                   updated_unix_ms = excluded.updated_unix_ms",
                params![
                    chunk.x,
                    chunk.y,
                    chunk.z,
                    to_i64(upto.tick),
                    to_i64(upto.writer),
                    to_i64(upto.seq),
                    encode_deltas(folded.iter()),
                    rows.len() as i64,
                    now_unix_ms()
                ],
            )
            .map_err(&err)?;
            tx.execute(
                "DELETE FROM world_delta_rows WHERE cx = ?1 AND cy = ?2 AND cz = ?3 AND (tick, writer, seq) <= (?4, ?5, ?6)",
                params![chunk.x, chunk.y, chunk.z, to_i64(last.tick), to_i64(last.writer), to_i64(last.seq)],
            )
            .map_err(&err)?;
            tx.commit().map_err(&err)?;
            Ok(Compaction { rows_folded: rows.len(), voxels: folded.len() })
        })
        .await
    }

    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        // A random player id that collides with another account's breaks
        // the UNIQUE constraint on player_id: draw again.
        for _ in 0..8 {
            let account = Account {
                name: name.to_owned(),
                player: crate::random_player_id(),
                password_hash: password_hash.to_owned(),
                created_unix: (now_unix_ms() / 1000) as u64,
            };
            let created = self
                .with(true, move |conn, inner| {
                    let r = conn.execute(
                        "INSERT INTO accounts (name, player_id, password_hash, created_unix) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (name) DO NOTHING",
                        params![
                            account.name,
                            to_i64(account.player.0),
                            account.password_hash,
                            account.created_unix as i64
                        ],
                    );
                    match r {
                        Ok(0) => Err(StoreError::AlreadyExists(format!("account {:?}", account.name))),
                        Ok(_) => Ok(Some(account)),
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                        {
                            Ok(None)
                        }
                        Err(e) => Err(unavailable(&inner.path)(e)),
                    }
                })
                .await?;
            if let Some(a) = created {
                return Ok(a);
            }
        }
        Err(StoreError::Unavailable("eight random player ids in a row were taken".into()))
    }

    async fn account(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let name = name.to_owned();
        self.with(false, move |conn, inner| {
            conn.query_row(
                "SELECT player_id, password_hash, created_unix FROM accounts WHERE name = ?1",
                [&name],
                |r| {
                    Ok(Account {
                        name: name.clone(),
                        player: PlayerId(from_i64(r.get(0)?)),
                        password_hash: r.get(1)?,
                        created_unix: from_i64(r.get(2)?),
                    })
                },
            )
            .optional()
            .map_err(unavailable(&inner.path))
        })
        .await
    }

    async fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError> {
        let (token, session) = (token_sha256.to_owned(), session.clone());
        self.with(true, move |conn, inner| {
            conn.execute(
                "INSERT INTO sessions (token_sha256, player_id, account, expires_unix) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (token_sha256) DO UPDATE SET player_id = excluded.player_id,
                   account = excluded.account, expires_unix = excluded.expires_unix",
                params![token, to_i64(session.player), session.account, to_i64(session.expires_unix)],
            )
            .map_err(unavailable(&inner.path))?;
            Ok(())
        })
        .await
    }

    async fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError> {
        let token = token_sha256.to_owned();
        let now = now_unix_ms() / 1000;
        let found = self
            .with(false, move |conn, inner| {
                conn.query_row(
                    "SELECT player_id, account, expires_unix FROM sessions WHERE token_sha256 = ?1",
                    [&token],
                    |r| {
                        Ok(Session {
                            player: from_i64(r.get(0)?),
                            account: r.get(1)?,
                            expires_unix: from_i64(r.get(2)?),
                        })
                    },
                )
                .optional()
                .map_err(unavailable(&inner.path))
            })
            .await?;
        match found {
            Some(s) if s.expires_unix as i64 <= now => {
                self.drop_session(token_sha256).await?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    async fn drop_session(&self, token_sha256: &str) -> Result<(), StoreError> {
        let token = token_sha256.to_owned();
        self.with(true, move |conn, inner| {
            conn.execute("DELETE FROM sessions WHERE token_sha256 = ?1", [&token]).map_err(unavailable(&inner.path))?;
            Ok(())
        })
        .await
    }

    async fn load_progress(&self, player: PlayerId) -> Result<Option<Progress>, StoreError> {
        let raw = self
            .with(false, move |conn, inner| {
                conn.query_row(
                    "SELECT version, pos_x, pos_y, pos_z, inventory, stats, components FROM player_progress
                     WHERE player_id = ?1",
                    [to_i64(player.0)],
                    |r| {
                        Ok((
                            from_i64(r.get(0)?),
                            [r.get(1)?, r.get(2)?, r.get(3)?],
                            r.get::<_, String>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, Vec<u8>>(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable(&inner.path))
            })
            .await?;
        let Some((version, position, inv, stats, components)) = raw else { return Ok(None) };
        let what = || format!("player_progress of player {player}");
        Ok(Some(Progress {
            player,
            version,
            position,
            inventory: decode_json(&inv, what)?,
            stats: decode_json(&stats, what)?,
            components,
        }))
    }

    async fn save_progress(&self, p: &Progress) -> Result<(), StoreError> {
        let p = p.clone();
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let n = conn
                .execute(
                    "INSERT INTO player_progress
                       (player_id, version, pos_x, pos_y, pos_z, inventory, stats, components, updated_unix_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (player_id) DO UPDATE SET version = excluded.version, pos_x = excluded.pos_x,
                       pos_y = excluded.pos_y, pos_z = excluded.pos_z, inventory = excluded.inventory,
                       stats = excluded.stats, components = excluded.components,
                       updated_unix_ms = excluded.updated_unix_ms
                     WHERE player_progress.version < excluded.version",
                    params![
                        to_i64(p.player.0),
                        to_i64(p.version),
                        p.position[0],
                        p.position[1],
                        p.position[2],
                        json_text(&p.inventory),
                        json_text(&p.stats),
                        p.components,
                        now_unix_ms()
                    ],
                )
                .map_err(&err)?;
            if n == 0 {
                let stored: i64 = conn
                    .query_row("SELECT version FROM player_progress WHERE player_id = ?1", [to_i64(p.player.0)], |r| {
                        r.get(0)
                    })
                    .map_err(&err)?;
                return Err(StoreError::Stale {
                    what: format!("progress of player {}", p.player),
                    stored: from_i64(stored),
                    offered: p.version,
                });
            }
            Ok(())
        })
        .await
    }

    async fn put_structure(&self, s: &Structure) -> Result<(), StoreError> {
        let s = s.clone();
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let n = conn
                .execute(
                    "INSERT INTO structures (structure_id, owner_id, cx, cy, cz, kind, version, state, updated_unix_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (structure_id) DO UPDATE SET owner_id = excluded.owner_id, cx = excluded.cx,
                       cy = excluded.cy, cz = excluded.cz, kind = excluded.kind, version = excluded.version,
                       state = excluded.state, updated_unix_ms = excluded.updated_unix_ms
                     WHERE structures.version < excluded.version",
                    params![
                        to_i64(s.id),
                        to_i64(s.owner.0),
                        s.chunk.x,
                        s.chunk.y,
                        s.chunk.z,
                        s.kind,
                        to_i64(s.version),
                        json_text(&s.state),
                        now_unix_ms()
                    ],
                )
                .map_err(&err)?;
            if n == 0 {
                let stored: i64 = conn
                    .query_row("SELECT version FROM structures WHERE structure_id = ?1", [to_i64(s.id)], |r| r.get(0))
                    .map_err(&err)?;
                return Err(StoreError::Stale {
                    what: format!("structure {}", s.id),
                    stored: from_i64(stored),
                    offered: s.version,
                });
            }
            Ok(())
        })
        .await
    }

    async fn structures_in_chunk(&self, chunk: ChunkKey) -> Result<Vec<Structure>, StoreError> {
        let raw = self
            .with(false, move |conn, inner| {
                let err = unavailable(&inner.path);
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT structure_id, owner_id, kind, version, state FROM structures
                         WHERE cx = ?1 AND cy = ?2 AND cz = ?3 ORDER BY structure_id",
                    )
                    .map_err(&err)?;
                let rows = stmt
                    .query_map(params![chunk.x, chunk.y, chunk.z], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    })
                    .map_err(&err)?;
                rows.collect::<rusqlite::Result<Vec<(i64, i64, String, i64, String)>>>().map_err(&err)
            })
            .await?;
        raw.into_iter()
            .map(|(id, owner, kind, version, state)| {
                let id = from_i64(id);
                Ok(Structure {
                    id,
                    owner: PlayerId(from_i64(owner)),
                    chunk,
                    kind,
                    version: from_i64(version),
                    state: decode_json(&state, || format!("structures row {id}"))?,
                })
            })
            .collect()
    }

    async fn delete_structure(&self, id: u64) -> Result<bool, StoreError> {
        self.with(true, move |conn, inner| {
            let n = conn
                .execute("DELETE FROM structures WHERE structure_id = ?1", [to_i64(id)])
                .map_err(unavailable(&inner.path))?;
            Ok(n > 0)
        })
        .await
    }

    async fn save_topology(&self, t: &TopologySnapshot) -> Result<bool, StoreError> {
        let t = t.clone();
        self.with(true, move |conn, inner| {
            let n = conn
                .execute(
                    "INSERT INTO mesh_topology (cluster, version, data, saved_unix_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (cluster) DO UPDATE SET version = excluded.version, data = excluded.data,
                       saved_unix_ms = excluded.saved_unix_ms
                     WHERE mesh_topology.version < excluded.version",
                    params![t.cluster, to_i64(t.version), t.data, now_unix_ms()],
                )
                .map_err(unavailable(&inner.path))?;
            Ok(n > 0)
        })
        .await
    }

    async fn write_checkpoints(&self, rows: &[Checkpoint]) -> Result<Vec<u64>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        model::check_one_per_entity(rows)?;
        let rows = rows.to_vec();
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
            let mut refused = Vec::new();
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO entity_checkpoints (entity_id, held_since, epoch, tick, server_id, region_level, region_x,
                           region_y, region_z, pos_x, pos_y, pos_z, components, gone, written_unix_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                         ON CONFLICT (entity_id) DO UPDATE SET held_since = excluded.held_since, epoch = excluded.epoch, tick = excluded.tick, server_id = excluded.server_id,
                       region_level = excluded.region_level, region_x = excluded.region_x, region_y = excluded.region_y,
                       region_z = excluded.region_z, pos_x = excluded.pos_x, pos_y = excluded.pos_y, pos_z = excluded.pos_z,
                       components = excluded.components, gone = excluded.gone, written_unix_ms = excluded.written_unix_ms
                     WHERE (entity_checkpoints.held_since, entity_checkpoints.epoch, entity_checkpoints.tick)
                       <= (excluded.held_since, excluded.epoch, excluded.tick)",
                    )
                    .map_err(&err)?;
                let ms = now_unix_ms();
                for r in &rows {
                    let n = stmt
                        .execute(params![
                            to_i64(r.entity),
                            to_i64(r.held_since),
                            to_i64(r.epoch),
                            to_i64(r.tick),
                            i64::from(r.server),
                            i64::from(r.region.0),
                            i64::from(r.region.1),
                            i64::from(r.region.2),
                            i64::from(r.region.3),
                            r.pos[0],
                            r.pos[1],
                            r.pos[2],
                            r.components,
                            r.gone,
                            ms
                        ])
                        .map_err(&err)?;
                    if n == 0 {
                        refused.push(r.entity);
                    }
                }
            }
            tx.commit().map_err(&err)?;
            Ok(refused)
        })
        .await
    }

    async fn checkpoints_within(&self, min: [f64; 3], max: [f64; 3]) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = self
            .with(false, move |conn, inner| {
                let err = unavailable(&inner.path);
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT entity_id, held_since, epoch, tick, server_id, region_level, region_x, region_y, region_z,
                           pos_x, pos_y, pos_z, components, gone
                         FROM entity_checkpoints
                         WHERE NOT gone AND pos_x >= ?1 AND pos_x < ?2 AND pos_y >= ?3 AND pos_y < ?4
                           AND pos_z >= ?5 AND pos_z < ?6",
                    )
                    .map_err(&err)?;
                let rows = stmt
                    .query_map(params![min[0], max[0], min[1], max[1], min[2], max[2]], |r| {
                        Ok((
                            [
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                                r.get(7)?,
                                r.get(8)?,
                            ],
                            [r.get(9)?, r.get(10)?, r.get(11)?],
                            r.get::<_, Vec<u8>>(12)?,
                            r.get::<_, bool>(13)?,
                        ))
                    })
                    .map_err(&err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(&err)?;
                Ok(rows)
            })
            .await?;
        let mut out = rows
            .into_iter()
            .map(|(ints, pos, components, gone)| model::checkpoint_from_columns(ints, pos, components, gone))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|c| c.entity);
        Ok(out)
    }

    async fn load_topology(&self, cluster: &str) -> Result<Option<TopologySnapshot>, StoreError> {
        let cluster = cluster.to_owned();
        self.with(false, move |conn, inner| {
            conn.query_row("SELECT version, data FROM mesh_topology WHERE cluster = ?1", [&cluster], |r| {
                Ok(TopologySnapshot { cluster: cluster.clone(), version: from_i64(r.get(0)?), data: r.get(1)? })
            })
            .optional()
            .map_err(unavailable(&inner.path))
        })
        .await
    }

    async fn record_transfers(&self, transfers: &[TransferRecord]) -> Result<(), StoreError> {
        if transfers.is_empty() {
            return Ok(());
        }
        let transfers = transfers.to_vec();
        self.with(true, move |conn, inner| {
            let err = unavailable(&inner.path);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO authority_transfers (transfer_id, entity_id, from_server, to_server, epoch, effective_tick, outcome, unix_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (transfer_id) DO UPDATE SET outcome = excluded.outcome, unix_ms = excluded.unix_ms",
                    )
                    .map_err(&err)?;
                for t in &transfers {
                    stmt.execute(params![
                        to_i64(t.transfer_id),
                        to_i64(t.entity),
                        t.from_server,
                        t.to_server,
                        to_i64(t.epoch),
                        to_i64(t.effective_tick),
                        t.outcome,
                        to_i64(t.unix_ms)
                    ])
                    .map_err(&err)?;
                }
            }
            tx.commit().map_err(&err)
        })
        .await
    }

    async fn recent_transfers(&self, limit: usize) -> Result<Vec<TransferRecord>, StoreError> {
        self.with(false, move |conn, inner| {
            let err = unavailable(&inner.path);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT transfer_id, entity_id, from_server, to_server, epoch, effective_tick, outcome, unix_ms
                     FROM authority_transfers ORDER BY unix_ms DESC, transfer_id DESC LIMIT ?1",
                )
                .map_err(&err)?;
            let rows = stmt
                .query_map([limit.min(100_000) as i64], |r| {
                    Ok(TransferRecord {
                        transfer_id: from_i64(r.get(0)?),
                        entity: from_i64(r.get(1)?),
                        from_server: r.get(2)?,
                        to_server: r.get(3)?,
                        epoch: from_i64(r.get(4)?),
                        effective_tick: from_i64(r.get(5)?),
                        outcome: r.get(6)?,
                        unix_ms: from_i64(r.get(7)?),
                    })
                })
                .map_err(&err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&err)
        })
        .await
    }
}
