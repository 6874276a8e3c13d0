//! The gRPC service other game servers call (port 9090).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::peer as ppb;
use proto::peer::game_server_peer_server::GameServerPeer;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::convert::{
    adopt_refusal_status, ghost_batch_from_pb, handoff_from_pb, handoff_refusal_status, interaction_from_pb,
};
use crate::handoff::{Refusal, Refused};
use crate::metrics::Metrics;
use crate::sim::messages::SimIn;

#[derive(Debug, Clone)]
pub struct PeerService {
    sim: mpsc::Sender<SimIn>,
    metrics: Metrics,
    interactions: Arc<Mutex<Window>>,
    registry: Arc<shared::component::Registry>,
}

/// Most interactions all peers together may ask for in a second. Each goes
/// through the tick thread's inbox, which player inputs share: a peer that
/// floods it is refused here (`interact_rate_limited`), not let crowd them
/// out. A thousand players reaching over one boundary push a few times a
/// second each.
pub const MAX_INTERACTIONS_PER_S: u32 = 4000;

/// A fixed one-second window of interactions taken.
#[derive(Debug)]
struct Window {
    start: Instant,
    taken: u32,
}

impl Window {
    fn take(&mut self, now: Instant, limit: u32) -> bool {
        if now.duration_since(self.start) >= Duration::from_secs(1) {
            *self = Window { start: now, taken: 0 };
        }
        self.taken += 1;
        self.taken <= limit
    }
}

impl PeerService {
    pub fn new(sim: mpsc::Sender<SimIn>, metrics: Metrics) -> Self {
        let window = Window { start: Instant::now(), taken: 0 };
        let registry = Arc::new(shared::component::Registry::builtin());
        Self { sim, metrics, interactions: Arc::new(Mutex::new(window)), registry }
    }

    /// The components this server knows (a handoff naming another is refused).
    pub fn with_registry(mut self, registry: Arc<shared::component::Registry>) -> Self {
        self.registry = registry;
        self
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.peer_refused.with_label_values(&[reason]).inc();
        status
    }
}

#[tonic::async_trait]
impl GameServerPeer for PeerService {
    async fn handoff(&self, req: Request<ppb::HandoffRequest>) -> Result<Response<ppb::HandoffResponse>, Status> {
        let busy = |words: &str| handoff_refusal_status(Code::Unavailable, &Refused::new(Refusal::Busy, words));
        let state = handoff_from_pb(req.get_ref(), &self.registry).map_err(|e| {
            let refused = Refused::new(Refusal::BadRequest, e.to_string());
            self.refuse(e.reason(), handoff_refusal_status(Code::InvalidArgument, &refused))
        })?;
        let (reply, verdict) = oneshot::channel();
        self.sim
            .send_timeout(SimIn::Adopt { state: Box::new(state), reply }, Duration::from_secs(1))
            .await
            .map_err(|_| self.refuse("sim_busy", busy("the simulation is not accepting handoffs")))?;
        match tokio::time::timeout(Duration::from_secs(2), verdict).await {
            Ok(Ok(Ok(()))) => Ok(Response::new(ppb::HandoffResponse { accepted: true, ..Default::default() })),
            // Counted by the simulation, which knows the reason.
            Ok(Ok(Err(e))) => Err(adopt_refusal_status(&e)),
            _ => Err(self.refuse("sim_busy", busy("the simulation did not answer"))),
        }
    }

    async fn schema(&self, _req: Request<ppb::SchemaRequest>) -> Result<Response<ppb::SchemaResponse>, Status> {
        Ok(Response::new(crate::convert::schema_to_pb(&self.registry.schema())))
    }

    async fn interact(&self, req: Request<ppb::InteractRequest>) -> Result<Response<ppb::InteractResponse>, Status> {
        let allowed =
            self.interactions.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now(), MAX_INTERACTIONS_PER_S);
        if !allowed {
            return Err(self.refuse("interact_rate_limited", Status::resource_exhausted("too many interactions")));
        }
        let interaction = interaction_from_pb(req.get_ref())
            .map_err(|e| self.refuse(e.reason(), Status::invalid_argument(format!("bad_request: {e}"))))?;
        let (reply, verdict) = oneshot::channel();
        // A tick thread too busy to take it: the hand tries again (a push
        // on its next contact, a grab on its next grip).
        self.sim
            .try_send(SimIn::Interact { interaction, reply: Some(reply) })
            .map_err(|_| self.refuse("sim_busy", Status::unavailable("the simulation is not accepting requests")))?;
        match tokio::time::timeout(Duration::from_secs(2), verdict).await {
            Ok(Ok(Ok(()))) => Ok(Response::new(ppb::InteractResponse { applied: true, reason: String::new() })),
            // Counted by the simulation.
            Ok(Ok(Err(r))) => Ok(Response::new(ppb::InteractResponse { applied: false, reason: r.reason().into() })),
            _ => Err(self.refuse("sim_busy", Status::unavailable("the simulation did not answer"))),
        }
    }

    async fn sync_ghosts(
        &self,
        req: Request<Streaming<ppb::GhostBatch>>,
    ) -> Result<Response<ppb::GhostSyncSummary>, Status> {
        let mut stream = req.into_inner();
        let mut summary = ppb::GhostSyncSummary::default();
        let mut sender = None;
        let received = || self.metrics.ghost_batches.with_label_values(&["received"]);
        while let Some(b) = stream.message().await? {
            let batch = match ghost_batch_from_pb(&b, &self.registry) {
                // One stream, one sender.
                Ok(batch) if *sender.get_or_insert(batch.from) == batch.from => batch,
                refused => {
                    let reason = refused.err().map_or("sender_changed", |e| e.reason());
                    summary.batches_refused += 1;
                    self.metrics.ghost_batches.with_label_values(&["refused"]).inc();
                    self.metrics.peer_refused.with_label_values(&[reason]).inc();
                    continue;
                }
            };
            received().inc();
            // A tick thread too busy to take it: the owner's next batch
            // carries the newer state anyway.
            if self.sim.try_send(SimIn::Ghosts(batch)).is_err() {
                self.metrics.ghost_batches.with_label_values(&["dropped"]).inc();
                continue;
            }
            summary.batches_accepted += 1;
        }
        Ok(Response::new(summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interaction_window_refuses_past_its_limit_and_starts_over_each_second() {
        let t0 = Instant::now();
        let mut w = Window { start: t0, taken: 0 };
        let taken = (0..10).filter(|_| w.take(t0, 4)).count();
        assert_eq!(taken, 4);
        assert!(!w.take(t0 + Duration::from_millis(999), 4));
        assert!(w.take(t0 + Duration::from_secs(1), 4), "a new second");
        assert_eq!(w.taken, 1);
    }
}
