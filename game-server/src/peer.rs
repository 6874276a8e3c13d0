//! The gRPC service other game servers call (port 9090).

use std::time::Duration;

use proto::peer as ppb;
use proto::peer::game_server_peer_server::GameServerPeer;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::handoff_from_pb;
use crate::metrics::Metrics;
use crate::sim::messages::SimIn;

#[derive(Debug, Clone)]
pub struct PeerService {
    sim: mpsc::Sender<SimIn>,
    metrics: Metrics,
}

impl PeerService {
    pub fn new(sim: mpsc::Sender<SimIn>, metrics: Metrics) -> Self {
        Self { sim, metrics }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.peer_refused.with_label_values(&[reason]).inc();
        status
    }
}

#[tonic::async_trait]
impl GameServerPeer for PeerService {
    async fn handoff(&self, req: Request<ppb::HandoffRequest>) -> Result<Response<ppb::HandoffResponse>, Status> {
        let state = handoff_from_pb(req.get_ref())
            .map_err(|e| self.refuse(e.reason(), Status::invalid_argument(format!("bad_request: {e}"))))?;
        let (reply, verdict) = oneshot::channel();
        self.sim
            .send_timeout(SimIn::Adopt { state: Box::new(state), reply }, Duration::from_secs(1))
            .await
            .map_err(|_| self.refuse("sim_busy", Status::unavailable("the simulation is not accepting handoffs")))?;
        match tokio::time::timeout(Duration::from_secs(2), verdict).await {
            Ok(Ok(Ok(()))) => Ok(Response::new(ppb::HandoffResponse { accepted: true, reason: String::new() })),
            // Counted by the simulation, which knows the reason.
            Ok(Ok(Err(e))) => Err(Status::failed_precondition(format!("{}: {e}", e.reason()))),
            _ => Err(self.refuse("sim_busy", Status::unavailable("the simulation did not answer"))),
        }
    }

    async fn sync_ghosts(
        &self,
        _req: Request<Streaming<ppb::GhostBatch>>,
    ) -> Result<Response<ppb::GhostSyncSummary>, Status> {
        Err(self.refuse("unimplemented", Status::unimplemented("overlap ghost sync is not built yet")))
    }
}
