//! Where world deltas live: the interface the simulation writes edits to
//! and reads chunks back from, an in-memory implementation, and the writer
//! thread that keeps the tick thread away from storage.
//!
//! The persistence issue adds the database-backed implementations behind
//! [`DeltaStore`]; nothing else changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("world store unavailable: {0}")]
    Unavailable(String),
}

/// Durable world deltas, per chunk, in the order they were made.
pub trait DeltaStore: Send + Sync + std::fmt::Debug + 'static {
    /// Every delta of `chunk`, oldest first. Called from generator threads.
    fn chunk_deltas(&self, chunk: ChunkKey) -> Result<Vec<VoxelDelta>, StoreError>;
    /// Appends deltas (any chunks, in order). Once it returns `Ok`, they are
    /// durable. Called from the writer thread only.
    fn append(&self, deltas: &[VoxelDelta]) -> Result<(), StoreError>;
}

/// Deltas in memory: the store of tests, benchmarks, and a mesh that does not
/// need its world to outlive the process.
#[derive(Debug, Default)]
pub struct MemoryDeltaStore {
    chunks: Mutex<HashMap<ChunkKey, Vec<VoxelDelta>>>,
}

impl MemoryDeltaStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl DeltaStore for MemoryDeltaStore {
    fn chunk_deltas(&self, chunk: ChunkKey) -> Result<Vec<VoxelDelta>, StoreError> {
        let chunks = self.chunks.lock().map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(chunks.get(&chunk).cloned().unwrap_or_default())
    }

    fn append(&self, deltas: &[VoxelDelta]) -> Result<(), StoreError> {
        let mut chunks = self.chunks.lock().map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        for d in deltas {
            chunks.entry(d.chunk).or_default().push(*d);
        }
        Ok(())
    }
}

/// A batch of deltas from one tick, numbered by the tick thread.
#[derive(Debug)]
pub struct DeltaBatch {
    /// Sequence number of the newest edit in the batch.
    pub upto: u64,
    pub deltas: Vec<VoxelDelta>,
}

/// The tick thread's end of the writer: `try_send` batches, read how far
/// the store has made them durable.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    pub tx: mpsc::Sender<DeltaBatch>,
    /// Newest edit sequence number known durable.
    pub durable: Arc<AtomicU64>,
}

impl WriterHandle {
    /// Room for this many more batches before edits must be refused.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    pub fn durable_upto(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }
}

/// Batches the writer may hold before the tick thread refuses new edits.
pub const WRITER_QUEUE: usize = 256;

/// Starts the writer thread. It appends each batch (coalescing what queued
/// up meanwhile), retrying with backoff while the store is unavailable;
/// nothing is dropped. It ends when every `WriterHandle` is gone and its
/// queue is written.
pub fn spawn_writer(store: Arc<dyn DeltaStore>) -> std::io::Result<WriterHandle> {
    let (tx, mut rx) = mpsc::channel::<DeltaBatch>(WRITER_QUEUE);
    let durable = Arc::new(AtomicU64::new(0));
    let done = durable.clone();
    std::thread::Builder::new().name("edit-writer".into()).spawn(move || {
        while let Some(first) = rx.blocking_recv() {
            let mut upto = first.upto;
            let mut deltas = first.deltas;
            while let Ok(more) = rx.try_recv() {
                upto = upto.max(more.upto);
                deltas.extend(more.deltas);
            }
            let mut backoff = Duration::from_millis(50);
            let mut failures = 0u32;
            loop {
                match store.append(&deltas) {
                    Ok(()) => break,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            error!(error = %e, deltas = deltas.len(), "world store append failed; holding the edits and retrying");
                        } else {
                            warn!(error = %e, failures, "world store still failing");
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if failures > 0 {
                info!(failures, "world store append succeeded after retries");
            }
            done.store(upto, Ordering::Release);
        }
    })?;
    Ok(WriterHandle { tx, durable })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::terrain::Material;

    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryDeltaStore,
        fail_first: AtomicU64,
    }

    impl DeltaStore for Flaky {
        fn chunk_deltas(&self, chunk: ChunkKey) -> Result<Vec<VoxelDelta>, StoreError> {
            self.inner.chunk_deltas(chunk)
        }
        fn append(&self, deltas: &[VoxelDelta]) -> Result<(), StoreError> {
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(StoreError::Unavailable("down".into()));
            }
            self.inner.append(deltas)
        }
    }

    fn delta(i: u32) -> VoxelDelta {
        VoxelDelta { chunk: ChunkKey { x: 0, y: 0, z: 0 }, index: i, material: Material::Air }
    }

    #[test]
    fn writer_retries_until_durable_and_keeps_order() {
        let store = Arc::new(Flaky { fail_first: AtomicU64::new(2), ..Default::default() });
        let w = spawn_writer(store.clone()).expect("writer starts");
        w.tx.try_send(DeltaBatch { upto: 1, deltas: vec![delta(1), delta(2)] }).expect("queue has room");
        w.tx.try_send(DeltaBatch { upto: 2, deltas: vec![delta(3)] }).expect("queue has room");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.durable_upto() < 2 {
            assert!(std::time::Instant::now() < deadline, "writer never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = store.chunk_deltas(ChunkKey { x: 0, y: 0, z: 0 }).expect("memory store answers");
        assert_eq!(got.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}
