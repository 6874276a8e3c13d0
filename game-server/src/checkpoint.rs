//! Entity checkpoints (issue 24): what a successor resumes an entity from
//! when its server dies. The tick thread offers the persisted state of the
//! entities it owns (`sim::checkpoints`); a writer thread keeps the newest
//! offer per entity in a bounded backlog and writes the backlog every
//! [`FLUSH_INTERVAL`], one multi-row statement at a time, retrying while
//! the store fails. The store fences each row by entity epoch
//! (`persistence::Store::write_checkpoints`): what it refuses was written
//! by a successor already, and is counted, not retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use persistence::Checkpoint;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::store::WorldStore;

/// How often the writer writes what was offered: with an entity offered
/// every half second, its stored state is at most about 0.8 s old.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Entities the backlog holds at most (a newer offer of one it holds
/// replaces it; an offer of another is dropped, and counted, while full).
pub const MAX_BACKLOG: usize = 200_000;
/// Rows in one statement.
pub const MAX_ROWS_A_WRITE: usize = 4_096;

#[derive(Debug, Default)]
struct Backlog {
    /// The newest offer per entity, with when it was offered.
    rows: HashMap<u64, (Checkpoint, Instant)>,
    /// Rows taken out to be written, not written yet.
    writing: usize,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    backlog: Mutex<Backlog>,
    wake: Condvar,
    finished: AtomicBool,
    /// The writer stopped with rows it could not write.
    lost: AtomicBool,
    metrics: Metrics,
}

/// The tick thread's end of the checkpoint writer.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    shared: Arc<Shared>,
}

impl CheckpointHandle {
    /// Hands rows to the writer (never blocks on the store). A row replaces
    /// an older offer of its entity not yet written. Answers the entities
    /// not taken (the backlog is full): offer them again later.
    pub fn offer(&self, rows: impl IntoIterator<Item = Checkpoint>) -> Vec<u64> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let Ok(mut b) = self.shared.backlog.lock() else { return dropped };
        let m = &self.shared.metrics;
        for row in rows {
            let full = b.rows.len() >= MAX_BACKLOG;
            match b.rows.get_mut(&row.entity) {
                Some(held) if row.supersedes(&held.0) => *held = (row, held.1.min(now)),
                Some(_) => {}
                None if full => {
                    m.checkpoint_rows.with_label_values(&["dropped_backlog_full"]).inc();
                    dropped.push(row.entity);
                }
                None => {
                    b.rows.insert(row.entity, (row, now));
                }
            }
        }
        m.checkpoint_backlog.set((b.rows.len() + b.writing) as i64);
        dropped
    }

    /// Entities offered and not yet written (being written included).
    pub fn backlog(&self) -> usize {
        self.shared.backlog.lock().map_or(0, |b| b.rows.len() + b.writing)
    }

    /// Writes what is left and stops the writer; waits up to `limit` for it
    /// (blocking) and returns whether everything was written.
    pub fn finish(&self, limit: Duration) -> bool {
        if let Ok(mut b) = self.shared.backlog.lock() {
            b.closed = true;
        }
        self.shared.wake.notify_all();
        let deadline = Instant::now() + limit;
        while !self.shared.finished.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        !self.shared.lost.load(Ordering::Acquire)
    }
}

/// Starts the writer thread (it ends after [`CheckpointHandle::finish`]).
pub fn spawn_checkpoint_writer(store: WorldStore, metrics: Metrics) -> std::io::Result<CheckpointHandle> {
    let shared = Arc::new(Shared {
        backlog: Mutex::new(Backlog::default()),
        wake: Condvar::new(),
        finished: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        metrics,
    });
    let s = shared.clone();
    std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
        let mut failures = 0u32;
        let mut backoff = FLUSH_INTERVAL;
        loop {
            let (batch, closed) = {
                let Ok(mut b) = s.backlog.lock() else { break };
                if !b.closed {
                    let wait = if failures > 0 { backoff } else { FLUSH_INTERVAL };
                    b = match s.wake.wait_timeout(b, wait) {
                        Ok((b, _)) => b,
                        Err(_) => break,
                    };
                }
                let rows: Vec<(Checkpoint, Instant)> = b.rows.drain().map(|(_, r)| r).collect();
                b.writing = rows.len();
                (rows, b.closed)
            };
            if !batch.is_empty() {
                match write(&store, &batch, &s.metrics) {
                    Ok(()) => {
                        if failures > 0 {
                            info!(failures, "checkpoints written again");
                        }
                        failures = 0;
                        backoff = FLUSH_INTERVAL;
                        if let Ok(mut b) = s.backlog.lock() {
                            b.writing = 0;
                            s.metrics.checkpoint_backlog.set(b.rows.len() as i64);
                        }
                    }
                    Err((e, unwritten)) => {
                        failures += 1;
                        s.metrics.checkpoint_write_failures.inc();
                        if failures == 1 {
                            error!(error = %e, rows = unwritten.len(), "writing checkpoints failed; holding them and retrying");
                        } else if failures.is_power_of_two() {
                            warn!(error = %e, failures, rows = unwritten.len(), "checkpoints still not written");
                        }
                        // Back in the backlog, unless a newer offer of the
                        // entity came meanwhile.
                        if let Ok(mut b) = s.backlog.lock() {
                            b.writing = 0;
                            for (row, at) in unwritten {
                                b.rows.entry(row.entity).or_insert((row, at));
                            }
                            s.metrics.checkpoint_backlog.set(b.rows.len() as i64);
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        if closed {
                            // Stopping: one more try, then what is left is lost with the process.
                            if !write_rest(&store, &s) {
                                let left = s.backlog.lock().map_or(0, |b| b.rows.len());
                                error!(rows = left, "stopping with checkpoints the store did not take");
                                s.lost.store(true, Ordering::Release);
                            }
                            break;
                        }
                        continue;
                    }
                }
            }
            if closed {
                break;
            }
        }
        s.finished.store(true, Ordering::Release);
    })?;
    Ok(CheckpointHandle { shared })
}

/// At shutdown after a failure: one more attempt at what is left (left in
/// the backlog if it fails).
fn write_rest(store: &WorldStore, s: &Shared) -> bool {
    let rows: Vec<(Checkpoint, Instant)> = match s.backlog.lock() {
        Ok(mut b) => b.rows.drain().map(|(_, r)| r).collect(),
        Err(_) => return false,
    };
    match write(store, &rows, &s.metrics) {
        Ok(()) => true,
        Err((_, unwritten)) => {
            if let Ok(mut b) = s.backlog.lock() {
                b.rows.extend(unwritten.into_iter().map(|(r, at)| (r.entity, (r, at))));
            }
            false
        }
    }
}

/// Writes `rows` in statements of at most [`MAX_ROWS_A_WRITE`]; on a
/// failure, the rows not written go back with the error.
fn write(
    store: &WorldStore,
    rows: &[(Checkpoint, Instant)],
    m: &Metrics,
) -> Result<(), (persistence::StoreError, Vec<(Checkpoint, Instant)>)> {
    for (i, part) in rows.chunks(MAX_ROWS_A_WRITE).enumerate() {
        let batch: Vec<Checkpoint> = part.iter().map(|(r, _)| r.clone()).collect();
        match store.rt.block_on(store.store.write_checkpoints(&batch)) {
            Ok(refused) => {
                m.checkpoint_rows.with_label_values(&["written"]).inc_by((batch.len() - refused.len()) as u64);
                m.checkpoint_rows.with_label_values(&["refused_stale"]).inc_by(refused.len() as u64);
                if let Some(oldest) = part.iter().map(|(_, at)| *at).min() {
                    m.checkpoint_lag.set(oldest.elapsed().as_secs_f64());
                }
            }
            Err(e) => return Err((e, rows[i * MAX_ROWS_A_WRITE..].to_vec())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use persistence::Store as _;
    use persistence::memory::MemoryStore;

    fn row(entity: u64, epoch: u64, tick: u64) -> Checkpoint {
        Checkpoint {
            entity,
            held_since: epoch,
            epoch,
            tick,
            server: 1,
            region: (0, 1, 0, 0),
            pos: [2010.0, 64.0, 1000.0],
            components: vec![tick as u8],
            gone: false,
        }
    }

    #[test]
    fn the_newest_offer_is_written_once_the_store_takes_it_and_a_successors_row_stands() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let memory = Arc::new(MemoryStore::new(32 * 32 * 32));
        let metrics = Metrics::new();
        let h = spawn_checkpoint_writer(WorldStore::new(memory.clone(), rt.handle().clone()), metrics.clone())
            .expect("writer starts");
        // A successor holds entity 2 under a newer epoch already.
        rt.block_on(memory.write_checkpoints(&[row(2, 5, 10)])).expect("written");
        memory.set_unavailable(true);
        h.offer([row(1, 0, 100), row(2, 4, 100)]);
        h.offer([row(1, 0, 145)]);
        h.offer([row(1, 0, 120)]);
        std::thread::sleep(FLUSH_INTERVAL * 3);
        assert!(metrics.checkpoint_write_failures.get() >= 1, "the outage is counted");
        assert_eq!(h.backlog(), 2, "held, newest per entity (being written included)");
        memory.set_unavailable(false);
        assert!(h.finish(Duration::from_secs(10)), "written at the end");
        let rows = rt.block_on(memory.checkpoints_within([0.0; 3], [1e6; 3])).expect("read");
        let got: Vec<(u64, u64, u64)> = rows.iter().map(|r| (r.entity, r.epoch, r.tick)).collect();
        assert_eq!(got, [(1, 0, 145), (2, 5, 10)]);
        assert_eq!(metrics.checkpoint_rows.with_label_values(&["written"]).get(), 1);
        assert_eq!(metrics.checkpoint_rows.with_label_values(&["refused_stale"]).get(), 1);
    }
}
