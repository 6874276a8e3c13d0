//! The game server's side of persistence: a blocking view of the world
//! store for the chunk generator threads, and the writer thread that keeps
//! the tick thread away from storage.
//!
//! What an edit acknowledgement promises: `EditResult::Done` is sent only
//! after the writer's transaction holding every delta of the edit has
//! committed (PostgreSQL/CockroachDB: committed; embedded SQLite:
//! committed with `synchronous = FULL`). A server killed at any moment loses
//! only edits it never acknowledged.
//!
//! While the database is down the writer keeps retrying the same flush (with
//! backoff, logging once and then every retry's count); edits queue behind
//! it up to [`WRITER_QUEUE`] batches, then the tick thread refuses new edits
//! (`store_busy`). Nothing acknowledged is ever dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use persistence::{Store, StoreError, TickDeltas};
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Rows a chunk may gather before the writer compacts it.
pub const COMPACT_AFTER_ROWS: usize = 32;
/// Chunks waiting for the compactor, at most (more wait for their next rows).
const COMPACTOR_QUEUE: usize = 1024;
/// Deltas the writer puts in one transaction, at most (more wait for the next).
pub const MAX_FLUSH_DELTAS: usize = 200_000;

/// The world store, for threads that are not tokio's (chunk generators, the
/// writer): each call blocks on the server's runtime.
#[derive(Debug, Clone)]
pub struct WorldStore {
    pub store: Arc<dyn Store>,
    pub rt: Handle,
    /// Progression saves not yet written, by player: a join reads these
    /// before the store, so a player back before its leave's save landed
    /// starts from it, not from the row before.
    pending: Arc<std::sync::Mutex<HashMap<shared::PlayerId, persistence::model::Progress>>>,
}

/// `current` (a component set) with the components of `stored` it lacks
/// that `registry` still persists.
fn keep_lacking(
    current: &[u8],
    stored: Option<persistence::model::Progress>,
    registry: &shared::component::Registry,
) -> Vec<u8> {
    use shared::component::ComponentSet;
    let Some(stored) = stored.filter(|s| !s.components.is_empty()) else { return current.to_vec() };
    let Ok((old, _)) = ComponentSet::decode_saved(&stored.components, registry) else { return current.to_vec() };
    let Ok((mut merged, _)) = ComponentSet::decode_saved(current, registry) else { return current.to_vec() };
    for (id, bytes) in old.iter() {
        if merged.bytes(id).is_none() && registry.policy(id).is_some_and(|p| p.persisted) {
            merged.put_bytes(id, bytes);
        }
    }
    merged.to_bytes()
}

impl WorldStore {
    pub fn new(store: Arc<dyn Store>, rt: Handle) -> Self {
        Self { store, rt, pending: Arc::default() }
    }

    /// A player's progression: the newest save of it still being written
    /// here, else the stored one.
    pub async fn load_progress(
        &self,
        player: shared::PlayerId,
    ) -> Result<Option<persistence::model::Progress>, StoreError> {
        let pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&player).cloned();
        match pending {
            Some(p) => Ok(Some(p)),
            None => self.store.load_progress(player).await,
        }
    }

    /// Saves a player's progression off the tick thread, retrying for about
    /// ten seconds; a save older than the stored one (`Stale`) is dropped,
    /// and a failure is logged and counted by the caller's metrics. With
    /// `keep_stored`, the stored components this save lacks are kept (those
    /// the registry still persists): the avatar holds only part of them.
    pub fn save_progress(
        &self,
        mut p: persistence::model::Progress,
        keep_stored: Option<Arc<shared::component::Registry>>,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let store = self.store.clone();
        // Whole saves are read back from here until written (one that
        // merges in stored components is not whole until it has).
        let pending = keep_stored.is_none().then(|| {
            let mut held = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if held.get(&p.player).is_none_or(|old| old.version < p.version) {
                held.insert(p.player, p.clone());
            }
            self.pending.clone()
        });
        let (player, version) = (p.player, p.version);
        let saving = self.rt.spawn(async move {
            let mut wait = std::time::Duration::from_millis(100);
            let mut attempts = 0;
            loop {
                attempts += 1;
                if let Some(registry) = &keep_stored {
                    match store.load_progress(p.player).await {
                        Ok(stored) => p.components = keep_lacking(&p.components, stored, registry),
                        Err(e) if e.is_transient() && attempts < 10 => {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(std::time::Duration::from_secs(2));
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(player = %p.player, error = %e, "player progression not saved");
                            return Err(e);
                        }
                    }
                }
                match store.save_progress(&p).await {
                    Ok(()) | Err(StoreError::Stale { .. }) => return Ok(()),
                    Err(e) if e.is_transient() && attempts < 10 => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::warn!(player = %p.player, error = %e, "player progression not saved");
                        return Err(e);
                    }
                }
            }
        });
        self.rt.spawn(async move {
            let result = saving.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("save task: {e}"))));
            if let Some(pending) = pending {
                let mut held = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if held.get(&player).is_some_and(|p| p.version == version) {
                    held.remove(&player);
                }
            }
            result
        })
    }

    /// Every stored delta of `chunk`, oldest first. A chunk that has gathered
    /// many rows is compacted in the background.
    pub fn chunk_deltas(&self, chunk: ChunkKey) -> Result<Vec<VoxelDelta>, StoreError> {
        let read = self.rt.block_on(self.store.chunk_deltas(chunk))?;
        if read.rows > COMPACT_AFTER_ROWS {
            let store = self.store.clone();
            self.rt.spawn(async move {
                if let Err(e) = store.compact_chunk(chunk).await {
                    warn!(?chunk, error = %e, "compacting a chunk after load failed");
                }
            });
        }
        Ok(read.deltas)
    }
}

/// A world store in memory on a small runtime of its own: simulation tests
/// and benchmarks, which have no server runtime.
pub fn memory_world_store(layout: &shared::chunk::ChunkLayout) -> WorldStore {
    let n = layout.chunk_voxels;
    background(Arc::new(persistence::memory::MemoryStore::new(n * n * n)))
}

/// `store` on a small runtime of its own (tests and benchmarks).
pub fn background(store: Arc<dyn Store>) -> WorldStore {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-runtime")
            .enable_all()
            .build()
            .expect("a one-thread runtime starts")
    });
    WorldStore::new(store, rt.handle().clone())
}

/// A batch of deltas from one tick, numbered by the tick thread.
#[derive(Debug)]
pub struct DeltaBatch {
    /// Sequence number of the newest edit in the batch.
    pub upto: u64,
    /// Mesh tick the edits were applied at.
    pub tick: u64,
    pub deltas: Vec<VoxelDelta>,
}

/// How the writer is doing, for metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Whether the last attempt to write succeeded.
    pub store_up: AtomicBool,
    pub append_failures: AtomicU64,
    pub flushes: AtomicU64,
    pub deltas_written: AtomicU64,
    pub compactions: AtomicU64,
    pub compaction_failures: AtomicU64,
    /// Deltas taken from the queue and not yet durable.
    pub in_flight_deltas: AtomicU64,
    /// Duration of the newest successful flush, microseconds.
    pub last_flush_us: AtomicU64,
    /// Set when the writer has written everything and stopped.
    pub finished: AtomicBool,
}

/// The tick thread's end of the writer: `try_send` batches, read how far
/// the store has made them durable.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    pub tx: mpsc::Sender<DeltaBatch>,
    /// Newest edit sequence number known durable.
    pub durable: Arc<AtomicU64>,
    pub stats: Arc<WriterStats>,
}

impl WriterHandle {
    /// Room for this many more batches before edits must be refused.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Batches queued for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn durable_upto(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Waits (blocking, up to `limit`) for the writer to finish once every
    /// other handle is gone; returns whether it did. Consumes this handle.
    pub fn wait_finished(self, limit: Duration) -> bool {
        let stats = self.stats.clone();
        drop(self);
        let deadline = Instant::now() + limit;
        while !stats.finished.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Batches the writer may hold before the tick thread refuses new edits.
pub const WRITER_QUEUE: usize = 256;

/// Starts the writer thread. It appends what is queued in one transaction
/// (one row per chunk), retrying with backoff while the store fails; nothing
/// is dropped. Chunks that gathered [`COMPACT_AFTER_ROWS`] rows are compacted
/// in the background. `writer_id` must be unique to this process (a random id).
/// The thread ends when every `WriterHandle` is gone and its queue is written.
pub fn spawn_writer(store: WorldStore, writer_id: u64) -> std::io::Result<WriterHandle> {
    let (tx, mut rx) = mpsc::channel::<DeltaBatch>(WRITER_QUEUE);
    let durable = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(WriterStats { store_up: AtomicBool::new(true), ..Default::default() });
    let (done, st) = (durable.clone(), stats.clone());
    let compactor = spawn_compactor(&store, stats.clone());
    std::thread::Builder::new().name("edit-writer".into()).spawn(move || {
        let mut seq = 0u64;
        let mut rows_since_compaction: HashMap<ChunkKey, usize> = HashMap::new();
        let mut carry: Option<DeltaBatch> = None;
        while let Some(first) = carry.take().or_else(|| rx.blocking_recv()) {
            let mut upto = first.upto;
            let mut count = first.deltas.len();
            let mut batches = vec![TickDeltas { tick: first.tick, deltas: first.deltas }];
            while count < MAX_FLUSH_DELTAS {
                let Ok(more) = rx.try_recv() else { break };
                if count + more.deltas.len() > MAX_FLUSH_DELTAS {
                    carry = Some(more);
                    break;
                }
                upto = upto.max(more.upto);
                count += more.deltas.len();
                batches.push(TickDeltas { tick: more.tick, deltas: more.deltas });
            }
            st.in_flight_deltas.store(count as u64, Ordering::Relaxed);
            seq += 1;
            write_durably(&store, writer_id, seq, &batches, &st);
            done.store(upto, Ordering::Release);
            st.in_flight_deltas.store(0, Ordering::Relaxed);
            st.flushes.fetch_add(1, Ordering::Relaxed);
            st.deltas_written.fetch_add(count as u64, Ordering::Relaxed);
            let mut chunks: Vec<ChunkKey> = batches.iter().flat_map(|b| b.deltas.iter().map(|d| d.chunk)).collect();
            chunks.sort_unstable();
            chunks.dedup();
            for c in chunks {
                *rows_since_compaction.entry(c).or_default() += 1;
            }
            compact_busy_chunks(&mut rows_since_compaction, &compactor);
        }
        st.finished.store(true, Ordering::Release);
    })?;
    Ok(WriterHandle { tx, durable, stats })
}

/// Appends one flush, retrying (same writer and seq, so a retry after an
/// ambiguous failure cannot duplicate rows) until the store takes it.
fn write_durably(store: &WorldStore, writer_id: u64, seq: u64, batches: &[TickDeltas], st: &WriterStats) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    let t0 = Instant::now();
    loop {
        let attempt = Instant::now();
        match store.rt.block_on(store.store.append_deltas(writer_id, seq, batches)) {
            Ok(()) => {
                st.last_flush_us.store(attempt.elapsed().as_micros() as u64, Ordering::Relaxed);
                if failures > 0 {
                    info!(
                        failures,
                        outage_s = t0.elapsed().as_secs_f64(),
                        "world store writable again; held edits written"
                    );
                }
                st.store_up.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                failures += 1;
                st.append_failures.fetch_add(1, Ordering::Relaxed);
                st.store_up.store(false, Ordering::Relaxed);
                let deltas: usize = batches.iter().map(|b| b.deltas.len()).sum();
                if failures == 1 {
                    error!(error = %e, kind = e.kind(), deltas, "world store append failed; holding the edits and retrying");
                } else if failures.is_power_of_two() {
                    warn!(error = %e, failures, deltas, "world store still failing; edits held");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Hands chunks that gathered [`COMPACT_AFTER_ROWS`] rows to the compactor
/// (one task on the runtime, off the writer's path: flushes never wait for
/// a compaction).
fn compact_busy_chunks(rows: &mut HashMap<ChunkKey, usize>, compactor: &mpsc::Sender<ChunkKey>) {
    for (c, n) in rows.iter_mut() {
        if *n >= COMPACT_AFTER_ROWS && compactor.try_send(*c).is_ok() {
            *n = 0;
        }
    }
    rows.retain(|_, n| *n > 0);
}

/// Compacts the chunks it is sent, one at a time.
fn spawn_compactor(store: &WorldStore, st: Arc<WriterStats>) -> mpsc::Sender<ChunkKey> {
    let (tx, mut rx) = mpsc::channel::<ChunkKey>(COMPACTOR_QUEUE);
    let s = store.store.clone();
    store.rt.spawn(async move {
        while let Some(c) = rx.recv().await {
            match s.compact_chunk(c).await {
                Ok(_) => {
                    st.compactions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    st.compaction_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(chunk = ?c, error = %e, "compacting a chunk failed; it will be tried again later");
                }
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use persistence::memory::MemoryStore;
    use shared::terrain::Material;

    fn delta(i: u32) -> VoxelDelta {
        VoxelDelta { chunk: ChunkKey { x: 0, y: 0, z: 0 }, index: i, material: Material::Air }
    }

    #[test]
    fn a_join_reads_a_save_still_being_written() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let memory = Arc::new(MemoryStore::new(32 * 32 * 32));
        let store = WorldStore::new(memory.clone(), rt.handle().clone());
        let player = shared::PlayerId(4);
        let progress = |version, x| persistence::model::Progress {
            player,
            version,
            position: [x, 0.0, 0.0],
            inventory: serde_json::json!([]),
            stats: serde_json::json!({}),
            components: vec![1, 2, 1, 0],
        };
        rt.block_on(store.save_progress(progress(1, 1.0), None)).expect("task").expect("saved");
        // The database is down: the leave's save retries; a join here reads it.
        memory.set_unavailable(true);
        let saving = store.save_progress(progress(2, 2.0), None);
        let read = rt.block_on(store.load_progress(player)).expect("read").expect("saved");
        assert_eq!((read.version, read.position[0]), (2, 2.0));
        memory.set_unavailable(false);
        rt.block_on(saving).expect("task").expect("saved once the database is back");
        let stored = rt.block_on(memory.load_progress(player)).expect("read").expect("saved");
        assert_eq!(stored.version, 2);
        assert!(store.pending.lock().expect("lock").is_empty(), "nothing held once written");
    }

    #[test]
    fn a_partial_avatars_save_keeps_the_stored_components_it_lacks() {
        use shared::component::ComponentSet;
        use shared::component::builtin::{Kind, PlayerName, PropBody};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let store = WorldStore::new(Arc::new(MemoryStore::new(32 * 32 * 32)), rt.handle().clone());
        let registry = Arc::new(shared::component::Registry::builtin());
        let progress = |version, set: &ComponentSet| persistence::model::Progress {
            player: shared::PlayerId(9),
            version,
            position: [0.0; 3],
            inventory: serde_json::json!([]),
            stats: serde_json::json!({}),
            components: set.to_bytes(),
        };
        // Saved at its last leave: a kind and a persisted server-side one.
        let mut full = ComponentSet::new();
        full.set(&Kind::Player);
        full.set(&PropBody { angvel_mrads: [1, 2, 3], asleep: false });
        rt.block_on(store.save_progress(progress(1, &full), None)).expect("task").expect("saved");
        // Resumed from its ghost: only the mirrored ones (and a name, which
        // is not persisted).
        let mut partial = ComponentSet::new();
        partial.set(&Kind::PropBall { radius_mm: 7 });
        partial.set(&PlayerName("ada".into()));
        rt.block_on(store.save_progress(progress(2, &partial), Some(registry.clone()))).expect("task").expect("saved");
        let stored = rt.block_on(store.store.load_progress(shared::PlayerId(9))).expect("read").expect("saved");
        let stored = ComponentSet::decode(&stored.components, &registry).expect("decodes");
        assert_eq!(stored.get::<Kind>(), Some(Ok(Kind::PropBall { radius_mm: 7 })), "the avatar's wins");
        assert_eq!(stored.get::<PropBody>(), Some(Ok(PropBody { angvel_mrads: [1, 2, 3], asleep: false })), "kept");
        // A whole avatar's save replaces them.
        rt.block_on(store.save_progress(progress(3, &partial), None)).expect("task").expect("saved");
        let stored = rt.block_on(store.store.load_progress(shared::PlayerId(9))).expect("read").expect("saved");
        assert_eq!(ComponentSet::decode(&stored.components, &registry).expect("decodes"), partial);
    }

    #[test]
    fn writer_retries_until_durable_and_keeps_order() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let store = Arc::new(MemoryStore::new(32 * 32 * 32));
        store.set_unavailable(true);
        let ws = WorldStore::new(store.clone(), rt.handle().clone());
        let w = spawn_writer(ws.clone(), 9).expect("writer starts");
        w.tx.try_send(DeltaBatch { upto: 1, tick: 5, deltas: vec![delta(1), delta(2)] }).expect("queue has room");
        w.tx.try_send(DeltaBatch { upto: 2, tick: 6, deltas: vec![delta(3)] }).expect("queue has room");
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.stats.append_failures.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "writer never tried");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(w.durable_upto(), 0, "nothing durable while the store is down");
        assert!(!w.stats.store_up.load(Ordering::Relaxed));
        store.set_unavailable(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.durable_upto() < 2 {
            assert!(Instant::now() < deadline, "writer never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = ws.chunk_deltas(ChunkKey { x: 0, y: 0, z: 0 }).expect("memory store answers");
        assert_eq!(got.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(w.stats.append_failures.load(Ordering::Relaxed) >= 2);
        assert!(w.stats.store_up.load(Ordering::Relaxed));
    }

    #[test]
    fn busy_chunks_are_compacted_and_read_the_same() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let store = Arc::new(MemoryStore::new(32 * 32 * 32));
        let ws = WorldStore::new(store.clone(), rt.handle().clone());
        let w = spawn_writer(ws.clone(), 3).expect("writer starts");
        let n = COMPACT_AFTER_ROWS as u64 + 5;
        for i in 1..=n {
            // One batch at a time, so each is its own flush and row.
            w.tx.try_send(DeltaBatch { upto: i, tick: i, deltas: vec![delta(i as u32 % 7)] }).expect("room");
            let deadline = Instant::now() + Duration::from_secs(10);
            while w.durable_upto() < i {
                assert!(Instant::now() < deadline, "writer stalled");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The compactor runs beside the writer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.stats.compactions.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline, "no compaction");
            std::thread::sleep(Duration::from_millis(5));
        }
        let read = rt.block_on(store.chunk_deltas(ChunkKey { x: 0, y: 0, z: 0 })).expect("read");
        assert!(read.rows < COMPACT_AFTER_ROWS, "{} rows after compaction", read.rows);
        let last: HashMap<u32, Material> = read.deltas.iter().map(|d| (d.index, d.material)).collect();
        assert_eq!(last.len(), 7);
    }
}
