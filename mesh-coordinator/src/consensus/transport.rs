//! Raft messages between replicas over gRPC (port 7946).
//!
//! Outbound, one task per peer drains a bounded queue and sends batches in
//! order; a full queue drops (Raft retransmits) and a failed send is
//! reported to Raft as "unreachable" so it stops pipelining to that peer.
//! Inbound, batches from another mesh or world are refused; the rest go to
//! the replica's driver.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use prometheus::IntCounterVec;
use proto::raft as pb;
use proto::raft::raft_peer_client::RaftPeerClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::node::Input;

/// Batches waiting for one peer before new ones are dropped.
const QUEUE: usize = 1024;

/// Who this mesh is, as every batch states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster: String,
    pub world: String,
}

#[derive(Debug)]
pub struct Transport {
    queues: BTreeMap<u64, mpsc::Sender<Vec<Message>>>,
    dropped: IntCounterVec,
}

impl Transport {
    /// Starts one sender task per peer (`id → URL`, this replica excluded)
    /// on `rt`. `driver` receives reports of unreachable peers and snapshot
    /// outcomes.
    pub fn start(
        rt: &tokio::runtime::Handle,
        me: u64,
        peers: &BTreeMap<u64, String>,
        identity: Identity,
        driver: std_mpsc::Sender<Input>,
        dropped: IntCounterVec,
    ) -> anyhow::Result<Self> {
        let mut queues = BTreeMap::new();
        for (&id, url) in peers.iter().filter(|(id, _)| **id != me) {
            let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("raft peer {id}: bad address {url:?}: {e}"))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.insert(id, tx);
            let _guard = rt.enter();
            let client = RaftPeerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            rt.spawn(send_loop(me, id, client, rx, identity.clone(), driver.clone(), dropped.clone()));
        }
        Ok(Self { queues, dropped })
    }

    /// Queues `msgs` for their peers; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            match self.queues.get(&to) {
                Some(q) => {
                    if q.try_send(batch).is_err() {
                        self.dropped.with_label_values(&["queue_full"]).inc();
                    }
                }
                None => self.dropped.with_label_values(&["unknown_peer"]).inc(),
            }
        }
    }
}

async fn send_loop(
    me: u64,
    to: u64,
    mut client: RaftPeerClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<Vec<Message>>,
    identity: Identity,
    driver: std_mpsc::Sender<Input>,
    dropped: IntCounterVec,
) {
    while let Some(mut batch) = rx.recv().await {
        // Whatever queued meanwhile goes in the same request, in order.
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let snapshots = batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
        let mut messages = Vec::with_capacity(batch.len());
        for m in &batch {
            match m.write_to_bytes() {
                Ok(b) => messages.push(b),
                Err(_) => dropped.with_label_values(&["encode"]).inc(),
            }
        }
        let req =
            pb::RaftBatch { cluster: identity.cluster.clone(), world: identity.world.clone(), from: me, messages };
        let ok = match client.send(req).await {
            Ok(_) => true,
            Err(status) => {
                debug!(peer = to, error = %status.message(), "raft peer unreachable");
                dropped.with_label_values(&["unreachable"]).inc_by(batch.len() as u64);
                false
            }
        };
        let mut reports = Vec::new();
        if !ok {
            reports.push(Input::Unreachable(to));
        }
        if snapshots > 0 {
            reports.push(Input::SnapshotSent { to, ok });
        }
        for r in reports {
            if driver.send(r).is_err() {
                return;
            }
        }
    }
}

/// The inbound side: hands batches to the driver.
#[derive(Debug, Clone)]
pub struct RaftPeerService {
    pub identity: Identity,
    /// This replica's id, and every other replica's.
    pub me: u64,
    pub peers: std::collections::BTreeSet<u64>,
    pub driver: std_mpsc::Sender<Input>,
    pub refused: IntCounterVec,
}

#[tonic::async_trait]
impl pb::raft_peer_server::RaftPeer for RaftPeerService {
    async fn send(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let b = req.into_inner();
        if b.cluster != self.identity.cluster || b.world != self.identity.world {
            self.refused.with_label_values(&["wrong_mesh"]).inc();
            return Err(Status::failed_precondition(format!(
                "wrong_mesh: this replica serves cluster {:?} world {:?}; replica {} sent cluster {:?} world {:?}",
                self.identity.cluster, self.identity.world, b.from, b.cluster, b.world
            )));
        }
        if b.from == self.me || !self.peers.contains(&b.from) {
            self.refused.with_label_values(&["unknown_peer"]).inc();
            return Err(Status::permission_denied(format!(
                "unknown_peer: replica {} is not among this replica's peers {:?}",
                b.from, self.peers
            )));
        }
        let mut msgs = Vec::with_capacity(b.messages.len());
        for bytes in &b.messages {
            match Message::parse_from_bytes(bytes) {
                Ok(m) if m.from == b.from && m.to == self.me => msgs.push(m),
                _ => self.refused.with_label_values(&["bad_message"]).inc(),
            }
        }
        self.driver.send(Input::Raft(msgs)).map_err(|_| Status::unavailable("the replica is stopping"))?;
        Ok(Response::new(pb::RaftAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::raft::raft_peer_server::RaftPeer as _;

    fn encoded(from: u64, to: u64) -> Vec<u8> {
        Message { from, to, ..Message::default() }.write_to_bytes().unwrap()
    }

    #[tokio::test]
    async fn batches_from_other_meshes_or_unknown_peers_are_refused_and_counted() {
        let (tx, rx) = std_mpsc::channel();
        let refused = IntCounterVec::new(prometheus::Opts::new("refused", "test"), &["reason"]).unwrap();
        let svc = RaftPeerService {
            identity: Identity { cluster: "a".into(), world: "w".into() },
            me: 1,
            peers: [2, 3].into(),
            driver: tx,
            refused: refused.clone(),
        };
        let batch = |cluster: &str, from: u64, messages: Vec<Vec<u8>>| pb::RaftBatch {
            cluster: cluster.into(),
            world: "w".into(),
            from,
            messages,
        };
        let e = svc.send(Request::new(batch("b", 2, vec![encoded(2, 1)]))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        for from in [9, 1] {
            let e = svc.send(Request::new(batch("a", from, vec![encoded(from, 1)]))).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "from {from}");
        }
        assert!(rx.try_recv().is_err(), "nothing refused reaches Raft");

        // Within a good batch, a message for someone else, one claiming
        // another sender and garbage are dropped; the rest goes through.
        let messages = vec![encoded(2, 1), encoded(2, 3), encoded(3, 1), vec![0xff, 0xff, 0xff]];
        svc.send(Request::new(batch("a", 2, messages))).await.unwrap();
        match rx.try_recv() {
            Ok(Input::Raft(msgs)) => assert_eq!(msgs.len(), 1),
            other => panic!("expected one message for Raft, got {other:?}"),
        }
        let count = |r: &str| refused.with_label_values(&[r]).get();
        assert_eq!((count("wrong_mesh"), count("unknown_peer"), count("bad_message")), (1, 2, 3));
    }
}
