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

fn encode(state: &CoordinatorState) -> Vec<u8> {
    // Format byte, then bincode (serde) of the state.
    let mut out = vec![1u8];
    out.extend(bincode::serde::encode_to_vec(state, bincode::config::standard()).expect("the state serialises"));
    out
}

fn decode(bytes: &[u8]) -> Result<CoordinatorState, String> {
    match bytes.split_first() {
        Some((1, body)) => bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map(|(s, _)| s)
            .map_err(|e| format!("snapshot does not decode: {e}")),
        Some((v, _)) => Err(format!("snapshot format {v} is unknown to this build")),
        None => Err("empty snapshot".into()),
    }
}

/// The state to start from: the stored snapshot of `cluster` if there is one
/// (for the same world as `fresh`), else `fresh`.
pub async fn load(
    store: &dyn Store,
    cluster: &str,
    fresh: CoordinatorState,
    now: u64,
) -> anyhow::Result<CoordinatorState> {
    let Some(snap) = store.load_topology(cluster).await? else {
        info!(%cluster, "no stored topology: a new mesh");
        return Ok(fresh);
    };
    let stored = decode(&snap.data).map_err(|e| anyhow::anyhow!("the stored topology of {cluster:?}: {e}"))?;
    anyhow::ensure!(
        stored.same_world(&fresh),
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
        "restored the stored topology"
    );
    Ok(stored.restored(now))
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
/// once more on the way out.
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
        let now = crate::node::now_nanos();
        let (mark, data, finished) = node.read(|s| {
            let mark = (s.map_version(), s.transfers_total());
            let data = (saved != Some(mark)).then(|| encode(s));
            let finished: Vec<_> = s
                .transfers()
                .iter()
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
    use crate::state::{Command, Policy};
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

    #[tokio::test]
    async fn the_topology_comes_back_with_its_epochs_and_tick_grid() {
        let store = persistence::memory::MemoryStore::new(32 * 32 * 32);
        let fresh = state(7);
        assert_eq!(load(&store, "c", fresh.clone(), 5).await.unwrap(), fresh, "nothing stored: fresh");

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
        let data = encode(&s);
        store.save_topology(&TopologySnapshot { cluster: "c".into(), version: 1, data }).await.unwrap();

        // Much later: the server gets a fresh timeout, epochs carry on.
        let later = 60_000_000_000;
        let mut back = load(&store, "c", state(7), later).await.unwrap();
        assert_eq!(back.clock, s.clock);
        assert_eq!(back.assignments().values().map(|a| (a.server, a.epoch)).collect::<Vec<_>>(), owned);
        back.apply(Command::Tick { now: later + 1 }).0.unwrap();
        assert!(back.servers().values().all(|r| r.alive), "a full heartbeat timeout to check in");

        // Another world is refused, not restored.
        let err = load(&store, "c", state(8), later).await.unwrap_err();
        assert!(err.to_string().contains("another world"), "{err}");
        // Garbage is a clear error.
        store.save_topology(&TopologySnapshot { cluster: "d".into(), version: 1, data: vec![9, 9] }).await.unwrap();
        let err = load(&store, "d", state(7), later).await.unwrap_err();
        assert!(err.to_string().contains("format 9"), "{err}");
    }
}
