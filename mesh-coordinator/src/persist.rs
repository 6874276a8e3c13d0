//! What the coordinator keeps in the database: the topology snapshot (its
//! whole state, restored when every replica restarts at once) and the
//! authority transfer log.
//!
//! Once a second, if the state changed, the snapshot is written under the
//! mesh's cluster name with a version that only increases (Unix ms; the store
//! refuses an older one), and finished transfers (and those committed over 30
//! s ago) are appended to the log. A database outage is logged and retried
//! next second; it never stops the coordinator.

use std::sync::Arc;
use std::time::Duration;

use persistence::{Store, StoreError, TopologySnapshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::node::Node;
use crate::state::{CoordinatorState, TransferOutcome, TransferRecord};

/// The stored snapshot of `cluster`, checked to decode and to describe the
/// same world as `fresh`, as bytes for [`crate::state::Bootstrap::restore`].
/// A mesh's first leader restores it when the Raft log is empty (every
/// replica lost its disk, or a development mesh without `--raft-dir`).
pub async fn load(store: &dyn Store, cluster: &str, fresh: &CoordinatorState) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(snap) = store.load_topology(cluster).await? else {
        info!(%cluster, "no stored topology");
        return Ok(None);
    };
    let stored = CoordinatorState::from_bytes(&snap.data)
        .map_err(|e| anyhow::anyhow!("the stored topology of {cluster:?}: {e}"))?;
    anyhow::ensure!(
        stored.same_world(fresh),
        "the stored topology of cluster {cluster:?} is for another world (seed {}, {} roots); start with the same \
         --world-seed and --world-size, or another --cluster",
        stored.world_seed,
        stored.tree().roots().count()
    );
    info!(
        %cluster,
        version = snap.version,
        servers = stored.servers().len(),
        transfers = stored.transfers_total(),
        "found a stored topology (restored if the Raft log is empty)"
    );
    Ok(Some(snap.data))
}

fn transfer_row(t: &TransferRecord) -> persistence::TransferRecord {
    persistence::TransferRecord {
        transfer_id: t.id,
        entity: t.entity.0,
        from_server: t.from.0,
        to_server: t.to.0,
        epoch: t.entity_epoch.0,
        effective_tick: t.effective_tick,
        outcome: format!("{:?}", t.outcome).to_lowercase(),
        unix_ms: t.committed_at / 1_000_000,
    }
}

/// Saves the snapshot and the transfer log once a second until `stop`, and
/// once more on the way out; only while this replica leads (the others hold
/// the same state).
pub async fn run(node: Arc<Node>, store: Arc<dyn Store>, cluster: String, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved: Option<(u64, u64)> = None;
    let mut logged_upto = 0u64;
    let mut last_version = 0u64;
    loop {
        let stopping = tokio::select! {
            _ = every.tick() => false,
            _ = stop.cancelled() => true,
        };
        if !node.is_leader() {
            // Another replica saves; when this one leads again it starts over
            // (the transfer rows are upserts: writing one twice is harmless).
            saved = None;
            logged_upto = 0;
            if stopping {
                break;
            }
            continue;
        }
        let now = crate::node::now_nanos();
        let (mark, data, finished) = node.read(|s| {
            if !s.is_bootstrapped() {
                return ((0, 0), None, Vec::new());
            }
            if logged_upto == 0 {
                // Whatever the log still holds in memory is written again.
                logged_upto = s.transfers().recent().first().map_or(0, |t| t.id.saturating_sub(1));
            }
            let mark = (s.map_version(), s.transfers_total());
            let data = (saved != Some(mark)).then(|| s.to_bytes());
            let finished: Vec<_> = s
                .transfers()
                .recent()
                .into_iter()
                .filter(|t| t.id > logged_upto)
                .filter(|t| {
                    t.outcome != TransferOutcome::Committed || now.saturating_sub(t.committed_at) > 30_000_000_000
                })
                .map(transfer_row)
                .collect();
            (mark, data, finished)
        });
        if let Some(data) = data {
            let version = (now / 1_000_000).max(last_version + 1);
            match store.save_topology(&TopologySnapshot { cluster: cluster.clone(), version, data }).await {
                Ok(_) => {
                    saved = Some(mark);
                    last_version = version;
                    node.metrics.store_writes.with_label_values(&["topology", "ok"]).inc();
                }
                Err(e) => failed(&node, "topology", &e),
            }
        }
        // Only a prefix of finished transfers moves the mark, so none is skipped.
        let prefix: Vec<_> = {
            let mut expect = logged_upto + 1;
            finished
                .into_iter()
                .take_while(|t| {
                    let ok = t.transfer_id == expect;
                    expect += 1;
                    ok
                })
                .collect()
        };
        if let Some(last) = prefix.last().map(|t| t.transfer_id) {
            match store.record_transfers(&prefix).await {
                Ok(()) => {
                    logged_upto = last;
                    node.metrics.store_writes.with_label_values(&["transfers", "ok"]).inc();
                }
                Err(e) => failed(&node, "transfers", &e),
            }
        }
        if stopping {
            break;
        }
    }
}

fn failed(node: &Node, what: &'static str, e: &StoreError) {
    node.metrics.store_writes.with_label_values(&[what, "failed"]).inc();
    warn!(what, error = %e, "saving to the database failed; retrying in a second");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Bootstrap, Command, Policy};
    use glam::IVec3;
    use shared::TickClock;
    use shared::region::RegionTree;

    fn state(seed: u64) -> CoordinatorState {
        let mut s = CoordinatorState::new(
            Policy { startup_grace_ms: 0, ..Policy::default() },
            RegionTree::grid(IVec3::ZERO, 2, 1, 1),
            TickClock::new(1_000_000_000),
        );
        s.world_seed = seed;
        s
    }

    fn pristine(seed: u64) -> CoordinatorState {
        let mut s = state(seed);
        s.clock = TickClock::new(0);
        s
    }

    #[tokio::test]
    async fn the_topology_comes_back_with_its_epochs_and_tick_grid() {
        let store = persistence::memory::MemoryStore::new(32 * 32 * 32);
        assert_eq!(load(&store, "c", &pristine(7)).await.unwrap(), None, "nothing stored");

        let mut s = state(7);
        let (r, _) = s.apply(Command::Register {
            name: "gs".into(),
            addresses: Default::default(),
            cert_sha256: String::new(),
            capacity_players: 10,
            version: "t".into(),
            now: 2_000_000_000,
        });
        r.unwrap();
        s.apply(Command::Tick { now: 2_000_000_001 }).0.unwrap();
        let owned: Vec<_> = s.assignments().values().map(|a| (a.server, a.epoch)).collect();
        assert!(owned.iter().all(|(srv, e)| srv.is_some() && e.0 > 0), "{owned:?}");
        let data = s.to_bytes();
        store.save_topology(&TopologySnapshot { cluster: "c".into(), version: 1, data }).await.unwrap();

        // Much later, a first leader bootstraps from it: the server gets a
        // fresh timeout, epochs and the tick grid carry on.
        let later = 60_000_000_000;
        let restore = load(&store, "c", &pristine(7)).await.unwrap();
        assert!(restore.is_some());
        let mut back = pristine(7);
        let bootstrap = Bootstrap { clock_epoch: later, policy: back.policy.clone(), world_seed: 7, restore };
        let (r, ev) = back.apply(Command::NewLeader { replica: 1, now: later, bootstrap: Some(bootstrap) });
        r.unwrap();
        assert_eq!(ev, vec![crate::state::Event::Bootstrapped { restored: true }]);
        assert_eq!(back.clock, s.clock);
        assert_eq!(back.assignments().values().map(|a| (a.server, a.epoch)).collect::<Vec<_>>(), owned);
        back.apply(Command::Tick { now: later + 1 }).0.unwrap();
        assert!(back.servers().values().all(|r| r.alive), "a full heartbeat timeout to check in");

        // Another world is refused, not restored.
        let err = load(&store, "c", &pristine(8)).await.unwrap_err();
        assert!(err.to_string().contains("another world"), "{err}");
        // Garbage is a clear error.
        store.save_topology(&TopologySnapshot { cluster: "d".into(), version: 1, data: vec![9, 9] }).await.unwrap();
        let err = load(&store, "d", &pristine(7)).await.unwrap_err();
        assert!(err.to_string().contains("format 9"), "{err}");
    }
}
