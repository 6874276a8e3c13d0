//! Overlap sync, the network side: one gRPC stream (`SyncGhosts`, port 9090)
//! to each neighbour the tick thread has ghosts for, carrying per tick only
//! the ghosts whose state changed since the stream's previous batch, what
//! left, and about once a second a full batch. A stream that breaks is opened
//! again and starts with a full batch, so the receiver never holds deltas
//! against something it missed. Batches the network cannot take are dropped
//! (counted): the next one is computed against what was really sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::peer as ppb;
use proto::peer::game_server_peer_client::GameServerPeerClient;
use shared::{EntityId, ServerId, Tick};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::convert::{ghost_batch_to_pb, schema_from_pb};
use crate::metrics::Metrics;
use crate::sim::ghosts::GhostState;
use crate::sim::messages::{MapView, SimIn};

/// Batches a link queues before it drops them (a third of a second).
const LINK_QUEUE: usize = 32;
/// A full batch every this many batches (90: about once a second, at one
/// batch a tick), which bounds how long a receiver can hold a ghost the
/// owner no longer lists.
pub const FULL_EVERY: u64 = 90;
/// A link with nothing to send for this long closes its stream.
const IDLE: Duration = Duration::from_secs(10);

type Tickful = (Tick, Vec<GhostState>);

/// The tick thread's lists, routed to one link task per neighbour.
#[derive(Debug)]
pub struct GhostLinks {
    me: ServerId,
    maps: watch::Receiver<Arc<MapView>>,
    metrics: Metrics,
    /// Where each neighbour's component schema goes (the tick thread).
    sim: mpsc::Sender<SimIn>,
    links: HashMap<ServerId, mpsc::Sender<Tickful>>,
}

impl GhostLinks {
    pub fn new(me: ServerId, maps: watch::Receiver<Arc<MapView>>, metrics: Metrics, sim: mpsc::Sender<SimIn>) -> Self {
        Self { me, maps, metrics, sim, links: HashMap::new() }
    }

    /// Queues one tick's list for `to`, starting its link if needed.
    pub fn send(&mut self, to: ServerId, tick: Tick, ghosts: Vec<GhostState>) {
        let mut item = (tick, ghosts);
        for _ in 0..2 {
            let tx = self.links.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                let peer = Peer { me: self.me, to, maps: self.maps.clone(), metrics: self.metrics.clone() };
                tokio::spawn(link(peer, self.sim.clone(), rx));
                tx
            });
            match tx.try_send(item) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.ghost_batches.with_label_values(&["dropped"]).inc();
                    return;
                }
                // The link ended (idle, or its server left the map): a new one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.links.remove(&to);
                    item = back;
                }
            }
        }
    }
}

/// What a stream last told the receiver, to send only what changed.
#[derive(Debug, Default)]
struct Sent {
    ghosts: HashMap<EntityId, GhostState>,
    batches: u64,
}

impl Sent {
    /// The batch for this tick's list, and the list as the receiver will
    /// hold it once it is sent.
    fn delta(&self, me: ServerId, tick: Tick, list: &[GhostState]) -> ppb::GhostBatch {
        let full = self.batches.is_multiple_of(FULL_EVERY);
        let changed: Vec<GhostState> = list
            .iter()
            .filter_map(|g| {
                let before = self.ghosts.get(&g.q.id);
                if full || before.is_none() {
                    return Some(g.clone());
                }
                let before = before?;
                // Components only when they changed.
                let comps = if before.comps == g.comps { None } else { g.comps.clone() };
                (before != g).then(|| GhostState { comps, ..g.clone() })
            })
            .collect();
        let mut removed: Vec<EntityId> = if full {
            Vec::new()
        } else {
            self.ghosts.keys().filter(|id| !list.iter().any(|g| g.q.id == **id)).copied().collect()
        };
        removed.sort_unstable();
        ghost_batch_to_pb(me, tick, full, &changed, &removed)
    }

    fn sent(&mut self, list: Vec<GhostState>) {
        self.ghosts = list.into_iter().map(|g| (g.q.id, g)).collect();
        self.batches += 1;
    }
}

/// Who a link is between, and what it reads and counts.
#[derive(Debug)]
struct Peer {
    me: ServerId,
    to: ServerId,
    maps: watch::Receiver<Arc<MapView>>,
    metrics: Metrics,
}

/// Asks the neighbour which components it knows, for the tick thread to
/// check transfers against. A build without the call (a rolling upgrade)
/// or no answer: nothing is known, and transfers go as before.
async fn fetch_schema(
    client: &mut GameServerPeerClient<tonic::transport::Channel>,
    to: ServerId,
    metrics: &Metrics,
    sim: &mpsc::Sender<SimIn>,
) {
    match tokio::time::timeout(Duration::from_secs(1), client.schema(ppb::SchemaRequest {})).await {
        Ok(Ok(r)) => match schema_from_pb(r.get_ref()) {
            Ok(schema) => {
                let _ = sim.send(SimIn::PeerSchema { server: to, schema: Arc::new(schema) }).await;
            }
            Err(e) => {
                info!(%to, error = %e, "the neighbour's component schema is malformed");
                metrics.peer_refused.with_label_values(&[e.reason()]).inc();
            }
        },
        Ok(Err(s)) => debug!(%to, code = ?s.code(), "the neighbour did not say its component schema"),
        Err(_) => debug!(%to, "the neighbour did not say its component schema in time"),
    }
}

async fn link(peer: Peer, sim: mpsc::Sender<SimIn>, mut rx: mpsc::Receiver<Tickful>) {
    let Peer { me, to, maps, metrics } = peer;
    let dropped = || metrics.ghost_batches.with_label_values(&["dropped"]);
    loop {
        let addr = maps.borrow().servers.get(&to).filter(|p| p.alive && !p.grpc.is_empty()).map(|p| p.grpc.clone());
        let Some(addr) = addr else {
            debug!(%to, "ghost link ends: the server left the map");
            return;
        };
        let client =
            match tokio::time::timeout(Duration::from_secs(1), GameServerPeerClient::connect(format!("http://{addr}")))
                .await
            {
                Ok(Ok(c)) => c,
                _ => {
                    // Unreachable for now: what was queued is stale by the next try.
                    debug!(%to, %addr, "ghost link cannot connect");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    while rx.try_recv().is_ok() {
                        dropped().inc();
                    }
                    continue;
                }
            };
        let mut client = client;
        fetch_schema(&mut client, to, &metrics, &sim).await;
        let (stream_tx, stream_rx) = mpsc::channel(LINK_QUEUE);
        let call = tokio::spawn(async move { client.sync_ghosts(ReceiverStream::new(stream_rx)).await });
        info!(%to, %addr, "ghost sync stream open");
        let mut sent = Sent::default();
        loop {
            let Ok(next) = tokio::time::timeout(IDLE, rx.recv()).await else {
                debug!(%to, "ghost link idle: closing");
                drop(stream_tx);
                let _ = call.await;
                return;
            };
            let Some((tick, list)) = next else { return };
            let batch = sent.delta(me, tick, &list);
            match stream_tx.try_send(batch) {
                Ok(()) => {
                    sent.sent(list);
                    metrics.ghost_batches.with_label_values(&["sent"]).inc();
                }
                Err(mpsc::error::TrySendError::Full(_)) => dropped().inc(),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    dropped().inc();
                    break;
                }
            }
        }
        match call.await {
            Ok(Err(s)) => info!(%to, error = %s.message(), "ghost sync stream ended"),
            _ => info!(%to, "ghost sync stream ended"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::ghost_batch_from_pb;
    use crate::sim::ghosts::{GhostBatch, GhostKind};
    use prost::Message;
    use shared::Epoch;
    use shared::component::builtin::Kind;
    use shared::component::{ComponentSet, Registry};
    use shared::region::RegionKey;
    use shared::snapshot::QEntity;

    fn g(id: u64, x: i64) -> GhostState {
        GhostState {
            region: RegionKey::root(0, 0, 0),
            region_epoch: Epoch(3),
            kind: GhostKind::Prop,
            last_input: 0,
            shape: Some(crate::sim::physics::PropShape::Ball { radius: 0.2 }),
            q: QEntity { id: EntityId((1 << 40) | id), pos: [x, 0, 0], rot: 0, vel: [0; 3], authority: ServerId(1) },
            comps: Some(Arc::new(comps(200))),
        }
    }

    fn comps(radius_mm: u16) -> ComponentSet {
        let mut set = ComponentSet::new();
        set.set(&Kind::PropBall { radius_mm });
        set
    }

    /// As the receiver decodes `g` when its components did not change.
    fn same_comps(g: GhostState) -> GhostState {
        GhostState { comps: None, ..g }
    }

    fn decode(b: &ppb::GhostBatch) -> GhostBatch {
        ghost_batch_from_pb(b, &Registry::builtin()).expect("decodes")
    }

    #[test]
    fn batches_carry_what_changed_what_left_and_sometimes_everything() {
        let mut s = Sent::default();
        let me = ServerId(1);
        let first = vec![g(1, 10), g(2, 20)];
        let b = decode(&s.delta(me, 5, &first));
        assert!(b.full, "a stream starts with everything");
        assert_eq!(b.ghosts, first);
        s.sent(first);
        // One moved, one at rest, one new; none left.
        let second = vec![g(1, 11), g(2, 20), g(3, 30)];
        let b = decode(&s.delta(me, 6, &second));
        assert!(!b.full);
        assert_eq!(b.ghosts, vec![same_comps(g(1, 11)), g(3, 30)], "components only with the new one");
        assert!(b.removed.is_empty());
        s.sent(second);
        // Two left.
        let third = vec![g(2, 20)];
        let b = decode(&s.delta(me, 7, &third));
        assert!(b.ghosts.is_empty());
        assert_eq!(b.removed, vec![g(1, 0).q.id, g(3, 0).q.id]);
        s.sent(third);
        // Nothing changed: an empty batch (it still says the sender is alive).
        let b = s.delta(me, 8, &[g(2, 20)]);
        assert!(b.ghosts.is_empty() && b.removed.is_empty());
        assert!(b.encoded_len() < 16, "{} bytes", b.encoded_len());
        // Every FULL_EVERY batches, everything again.
        for _ in 0..FULL_EVERY - 3 {
            s.sent(vec![g(2, 20)]);
        }
        let b = decode(&s.delta(me, 9, &[g(2, 20)]));
        assert!(b.full);
        assert_eq!(b.ghosts, vec![g(2, 20)]);
    }

    #[test]
    fn a_schema_crosses_the_wire_as_it_is_and_a_malformed_one_is_refused() {
        use crate::convert::{schema_from_pb, schema_to_pb};
        let schema = Registry::builtin().schema();
        assert_eq!(schema_from_pb(&schema_to_pb(&schema)), Ok(schema.clone()));
        let mut pb = schema_to_pb(&schema);
        pb.entries.swap(0, 1);
        assert_eq!(schema_from_pb(&pb).unwrap_err().to_string(), "schema: component ids not ascending");
        let mut pb = schema_to_pb(&schema);
        pb.entries[0].version = 70_000;
        assert!(schema_from_pb(&pb).is_err());
        let mut pb = schema_to_pb(&schema);
        pb.entries[0].name = "x".repeat(49);
        assert!(schema_from_pb(&pb).is_err());
    }

    #[test]
    fn a_ghost_whose_components_changed_carries_them_and_a_bad_set_refuses_the_batch() {
        let mut s = Sent::default();
        let me = ServerId(1);
        s.sent(vec![g(1, 10)]);
        // At rest, its kind changed: the ghost goes again, with them.
        let grown = GhostState { comps: Some(Arc::new(comps(300))), ..g(1, 10) };
        let b = decode(&s.delta(me, 6, std::slice::from_ref(&grown)));
        assert_eq!(b.ghosts, vec![grown.clone()]);
        s.sent(vec![grown.clone()]);
        // Moved, same components: without them.
        let moved = GhostState { comps: Some(Arc::new(comps(300))), ..g(1, 11) };
        assert_eq!(decode(&s.delta(me, 7, std::slice::from_ref(&moved))).ghosts, vec![same_comps(moved.clone())]);
        // An id the receiver's registry lacks: the whole batch is refused.
        let mut pb = s.delta(me, 8, &[GhostState { comps: Some(Arc::new(comps(400))), ..g(2, 20) }]);
        let mut bad = Vec::new();
        shared::component::put::varint(&mut bad, 1);
        shared::component::put::varint(&mut bad, 999);
        shared::component::put::varint(&mut bad, 1);
        bad.push(0);
        pb.ghosts[0].components = Some(bad);
        let err = ghost_batch_from_pb(&pb, &Registry::builtin()).expect_err("unknown component");
        assert_eq!(err.reason(), "unknown_component", "{err:?}");
    }
}
