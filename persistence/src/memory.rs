//! A store in memory: tests, benchmarks, and meshes whose world need not
//! outlive the process. Same semantics as the database stores (the
//! behavioural tests run against it too), rows kept in the same shape.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::ids::PlayerId;

use crate::model::{self, group_by_chunk};
use crate::{
    Account, Checkpoint, ChunkDeltas, Compaction, Progress, RowKey, Session, Store, StoreError, Structure, TickDeltas,
    TopologySnapshot, TransferRecord,
};

#[derive(Debug, Default)]
struct Inner {
    rows: BTreeMap<(ChunkKey, RowKey), Vec<VoxelDelta>>,
    snapshots: HashMap<ChunkKey, (RowKey, Vec<VoxelDelta>)>,
    accounts: HashMap<String, Account>,
    progress: HashMap<PlayerId, Progress>,
    sessions: HashMap<String, Session>,
    structures: HashMap<u64, Structure>,
    topology: HashMap<String, TopologySnapshot>,
    transfers: BTreeMap<u64, TransferRecord>,
    checkpoints: BTreeMap<u64, Checkpoint>,
}

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    chunk_voxels: u32,
    /// While set, every call fails as a database outage would.
    down: AtomicBool,
}

impl MemoryStore {
    pub fn new(chunk_voxels: u32) -> Self {
        Self { inner: Mutex::new(Inner::default()), chunk_voxels, down: AtomicBool::new(false) }
    }

    /// Makes every call fail with `Unavailable` (or work again): an outage,
    /// for tests and benchmarks of what the callers do meanwhile.
    pub fn set_unavailable(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store set unavailable".into()));
        }
        self.inner.lock().map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))
    }
}

fn chunk_range(c: ChunkKey) -> std::ops::RangeInclusive<(ChunkKey, RowKey)> {
    let max = RowKey { tick: u64::MAX, writer: u64::MAX, seq: u64::MAX };
    (c, RowKey::default())..=(c, max)
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn append_deltas(&self, writer: u64, seq: u64, batches: &[TickDeltas]) -> Result<(), StoreError> {
        let tick = batches.iter().map(|b| b.tick).max().unwrap_or(0);
        model::check_indexes(batches, self.chunk_voxels)?;
        let mut inner = self.lock()?;
        for (chunk, deltas) in group_by_chunk(batches) {
            inner.rows.insert((chunk, RowKey { tick, writer, seq }), deltas);
        }
        Ok(())
    }

    async fn chunk_deltas(&self, chunk: ChunkKey) -> Result<ChunkDeltas, StoreError> {
        let inner = self.lock()?;
        let mut out = ChunkDeltas::default();
        if let Some((_, voxels)) = inner.snapshots.get(&chunk) {
            out.deltas.extend_from_slice(voxels);
            out.rows += 1;
        }
        for (_, ds) in inner.rows.range(chunk_range(chunk)) {
            out.deltas.extend_from_slice(ds);
            out.rows += 1;
        }
        Ok(out)
    }

    async fn compact_chunk(&self, chunk: ChunkKey) -> Result<Compaction, StoreError> {
        let mut inner = self.lock()?;
        let keys: Vec<(ChunkKey, RowKey)> = inner.rows.range(chunk_range(chunk)).map(|(k, _)| *k).collect();
        if keys.is_empty() {
            let voxels = inner.snapshots.get(&chunk).map_or(0, |s| s.1.len());
            return Ok(Compaction { rows_folded: 0, voxels });
        }
        let (mut upto, mut all) = inner.snapshots.remove(&chunk).unwrap_or_default();
        for k in &keys {
            if let Some(ds) = inner.rows.remove(k) {
                all.extend(ds);
            }
            upto = upto.max(k.1);
        }
        let folded = model::fold_deltas(&all);
        let voxels = folded.len();
        inner.snapshots.insert(chunk, (upto, folded));
        Ok(Compaction { rows_folded: keys.len(), voxels })
    }

    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        let mut inner = self.lock()?;
        if inner.accounts.contains_key(name) {
            return Err(StoreError::AlreadyExists(format!("account {name:?}")));
        }
        let account = Account {
            name: name.to_owned(),
            player: crate::random_player_id(),
            password_hash: password_hash.to_owned(),
            created_unix: (crate::migrations::now_unix_ms() / 1000) as u64,
        };
        inner.accounts.insert(name.to_owned(), account.clone());
        Ok(account)
    }

    async fn account(&self, name: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.lock()?.accounts.get(name).cloned())
    }

    async fn put_session(&self, token_sha256: &str, session: &Session) -> Result<(), StoreError> {
        self.lock()?.sessions.insert(token_sha256.to_owned(), session.clone());
        Ok(())
    }

    async fn session(&self, token_sha256: &str) -> Result<Option<Session>, StoreError> {
        let mut inner = self.lock()?;
        let now = (crate::migrations::now_unix_ms() / 1000) as u64;
        if inner.sessions.get(token_sha256).is_some_and(|s| s.expires_unix <= now) {
            inner.sessions.remove(token_sha256);
        }
        Ok(inner.sessions.get(token_sha256).cloned())
    }

    async fn drop_session(&self, token_sha256: &str) -> Result<(), StoreError> {
        self.lock()?.sessions.remove(token_sha256);
        Ok(())
    }

    async fn load_progress(&self, player: PlayerId) -> Result<Option<Progress>, StoreError> {
        Ok(self.lock()?.progress.get(&player).cloned())
    }

    async fn save_progress(&self, progress: &Progress) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(old) = inner.progress.get(&progress.player)
            && old.version >= progress.version
        {
            return Err(StoreError::Stale {
                what: format!("progress of player {}", progress.player),
                stored: old.version,
                offered: progress.version,
            });
        }
        inner.progress.insert(progress.player, progress.clone());
        Ok(())
    }

    async fn put_structure(&self, s: &Structure) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(old) = inner.structures.get(&s.id)
            && old.version >= s.version
        {
            return Err(StoreError::Stale {
                what: format!("structure {}", s.id),
                stored: old.version,
                offered: s.version,
            });
        }
        inner.structures.insert(s.id, s.clone());
        Ok(())
    }

    async fn structures_in_chunk(&self, chunk: ChunkKey) -> Result<Vec<Structure>, StoreError> {
        let inner = self.lock()?;
        let mut out: Vec<Structure> = inner.structures.values().filter(|s| s.chunk == chunk).cloned().collect();
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    async fn delete_structure(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.lock()?.structures.remove(&id).is_some())
    }

    async fn save_topology(&self, snapshot: &TopologySnapshot) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.topology.get(&snapshot.cluster).is_some_and(|old| old.version >= snapshot.version) {
            return Ok(false);
        }
        inner.topology.insert(snapshot.cluster.clone(), snapshot.clone());
        Ok(true)
    }

    async fn load_topology(&self, cluster: &str) -> Result<Option<TopologySnapshot>, StoreError> {
        Ok(self.lock()?.topology.get(cluster).cloned())
    }

    async fn write_checkpoints(&self, rows: &[Checkpoint]) -> Result<Vec<u64>, StoreError> {
        model::check_one_per_entity(rows)?;
        let mut inner = self.lock()?;
        let mut refused = Vec::new();
        for row in rows {
            match inner.checkpoints.get(&row.entity) {
                Some(stored) if !row.supersedes(stored) => refused.push(row.entity),
                _ => {
                    inner.checkpoints.insert(row.entity, row.clone());
                }
            }
        }
        Ok(refused)
    }

    async fn checkpoints_within(&self, min: [f64; 3], max: [f64; 3]) -> Result<Vec<Checkpoint>, StoreError> {
        Ok(self.lock()?.checkpoints.values().filter(|c| !c.gone && c.within(min, max)).cloned().collect())
    }

    async fn record_transfers(&self, transfers: &[TransferRecord]) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        for t in transfers {
            inner.transfers.insert(t.transfer_id, t.clone());
        }
        Ok(())
    }

    async fn recent_transfers(&self, limit: usize) -> Result<Vec<TransferRecord>, StoreError> {
        let inner = self.lock()?;
        let mut all: Vec<TransferRecord> = inner.transfers.values().cloned().collect();
        all.sort_by_key(|t| std::cmp::Reverse((t.unix_ms, t.transfer_id)));
        all.truncate(limit);
        Ok(all)
    }
}
