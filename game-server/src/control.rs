//! The game server's side of the control plane: registration and heartbeats
//! with the coordinator, and the execution of transfers (commit through the
//! coordinator, then hand the state to the target server).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::mesh as mpb;
use proto::mesh::mesh_coordinator_client::MeshCoordinatorClient;
use proto::peer::game_server_peer_client::GameServerPeerClient;
use shared::{Epoch, ServerId, TickClock};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::convert::{handoff_answer, handoff_to_pb, map_from_pb, mesh_key_to_pb, refusal_from_coordinator};
use crate::handoff::{Action, Event, HandoffDriver, Millis, ReclaimFor, Refusal, Refused, TransferAsk};
use crate::metrics::Metrics;
use crate::sim::core::LoadShared;
use crate::sim::messages::{CommittedTransfer, ConnTx, HandoffState, MapView, Outbound, SimIn, SimOut};
use shared::wire::ServerControl;

/// How long one gRPC call to a coordinator replica or a peer may take; past
/// it the call fails (`DeadlineExceeded`), which moves a coordinator call on
/// to the next replica.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily connected gRPC channel to `addr` (`host:port` or a URL).
pub fn channel(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    Ok(tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad gRPC address {url:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The coordinator replicas, called one at a time: a call that fails at the
/// transport (a replica down, restarting or cut off) or answers
/// `Unavailable` (no leader yet) moves on to the next replica and tries it,
/// each replica once per call. Any replica serves any call: followers hand
/// writes to the leader through Raft.
#[derive(Debug, Clone)]
pub struct Coordinators {
    clients: Arc<Vec<(String, MeshCoordinatorClient<Channel>)>>,
    current: Arc<std::sync::atomic::AtomicUsize>,
}

impl Coordinators {
    /// `list`: comma-separated gRPC addresses of the replicas.
    pub fn new(list: &str) -> anyhow::Result<Self> {
        let clients = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Ok((a.to_owned(), MeshCoordinatorClient::new(channel(a)?))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!clients.is_empty(), "no coordinator address given");
        Ok(Self { clients: Arc::new(clients), current: Arc::default() })
    }

    /// Calls `f` on the current replica, failing over as described above.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(MeshCoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let (addr, client) = &self.clients[i];
            match f(client.clone()).await {
                Ok(r) => {
                    if k > 0 {
                        info!(coordinator = %addr, "coordinator replica answering");
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(r.into_inner());
                }
                Err(s) if n > 1 && worth_another_replica(&s) => {
                    warn!(coordinator = %addr, error = %s.message(), "coordinator replica did not answer; trying the next");
                    last = Some(s);
                }
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no coordinator replica answered")))
    }
}

fn worth_another_replica(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// What registration gave this server.
#[derive(Debug, Clone)]
pub struct Registration {
    pub server: ServerId,
    pub clock: TickClock,
    pub heartbeat_every: Duration,
    pub map: Arc<MapView>,
    pub world_seed: u64,
    /// Public keys of the coordinator's ticket signer.
    pub ticket_keys: Vec<[u8; 32]>,
    /// The mesh's name in shared storage.
    pub cluster: String,
}

/// Registers with the coordinator, retrying with backoff until `timeout`.
pub async fn register(
    client: &Coordinators,
    req: mpb::RegisterRequest,
    timeout: Duration,
) -> anyhow::Result<Registration> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        match client
            .call(|mut c| {
                let req = req.clone();
                async move { c.register(req).await }
            })
            .await
        {
            Ok(r) => {
                let (map, _) = map_from_pb(&r.map.unwrap_or_default());
                anyhow::ensure!(r.tick_hz > 0, "coordinator sent a tick rate of 0");
                let ticket_keys = r
                    .ticket_public_keys
                    .iter()
                    .map(|k| <[u8; 32]>::try_from(k.as_slice()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| anyhow::anyhow!("coordinator sent a ticket key that is not 32 bytes"))?;
                if ticket_keys.is_empty() {
                    warn!("the coordinator sent no ticket key: only development tokens can join");
                }
                return Ok(Registration {
                    server: ServerId(r.server_id),
                    clock: TickClock { epoch_unix_nanos: r.mesh_epoch_unix_nanos, hz: r.tick_hz },
                    heartbeat_every: Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50))),
                    map: Arc::new(map),
                    world_seed: r.world_seed,
                    ticket_keys,
                    cluster: r.cluster,
                });
            }
            Err(status) if Instant::now() + backoff < deadline => {
                warn!(error = %status.message(), retry_in_ms = backoff.as_millis() as u64, "coordinator unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(status) => {
                anyhow::bail!("could not register with the coordinator within {timeout:?}: {}", status.message())
            }
        }
    }
}

/// Heartbeats until `stop`; forwards new maps to the simulation; cancels
/// `fenced` if the coordinator declared this server dead.
#[allow(clippy::too_many_arguments)]
pub async fn heartbeat_loop(
    client: Coordinators,
    me: ServerId,
    every: Duration,
    load: Arc<LoadShared>,
    sim: mpsc::Sender<SimIn>,
    maps: watch::Sender<Arc<MapView>>,
    metrics: Metrics,
    stop: CancellationToken,
    fenced: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = maps.borrow().version;
    let mut cpu = CpuSampler::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let req = mpb::HeartbeatRequest {
            server_id: me.0,
            load: Some(mpb::Load {
                players: load.players.load(Ordering::Relaxed),
                entities: load.entities.load(Ordering::Relaxed),
                cpu: cpu.sample(),
                tick_p99_ms: load.tick_p99_us.load(Ordering::Relaxed) as f32 / 1000.0,
                ticks_overrun: load.ticks_overrun.load(Ordering::Relaxed),
            }),
            known_map_version: known,
            regions: load
                .regions
                .lock()
                .map(|r| {
                    r.iter()
                        .map(|(k, n)| mpb::RegionLoad { region: Some(crate::convert::mesh_key_to_pb(k)), players: *n })
                        .collect()
                })
                .unwrap_or_default(),
        };
        match client
            .call(|mut c| {
                let req = req.clone();
                async move { c.heartbeat(req).await }
            })
            .await
        {
            Ok(r) => {
                if r.fenced {
                    error!(server = %me, "the coordinator declared this server dead; stopping");
                    fenced.cancel();
                    return;
                }
                if !r.orphans.is_empty() {
                    let orphans = r
                        .orphans
                        .iter()
                        .filter_map(|o| {
                            Some(crate::sim::messages::Orphan {
                                transfer_id: o.transfer_id,
                                from: ServerId(o.from_server),
                                entity: shared::EntityId(o.entity_id),
                                entity_epoch: Epoch(o.entity_epoch),
                                to_region: crate::convert::mesh_key(o.to_region.as_ref()).ok()?,
                                to_region_epoch: Epoch(o.to_region_epoch),
                            })
                        })
                        .collect();
                    if sim.send(SimIn::Orphans(orphans)).await.is_err() {
                        return;
                    }
                }
                if let Some(m) = r.map {
                    let (view, bad) = map_from_pb(&m);
                    if bad > 0 {
                        metrics.peer_refused.with_label_values(&["bad_region_key"]).inc_by(bad as u64);
                    }
                    known = view.version;
                    let view = Arc::new(view);
                    maps.send_replace(view.clone());
                    if sim.send(SimIn::Map(view)).await.is_err() {
                        return;
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                error!(server = %me, "the coordinator does not know this server; stopping");
                fenced.cancel();
                return;
            }
            Err(status) => warn!(error = %status.message(), "heartbeat failed"),
        }
    }
}

/// Process CPU time since the last sample, as a fraction of one core.
#[derive(Debug, Default)]
struct CpuSampler {
    last: Option<(Instant, f64)>,
}

impl CpuSampler {
    fn sample(&mut self) -> f32 {
        let Some(cpu_s) = process_cpu_seconds() else { return 0.0 };
        let now = Instant::now();
        let frac = match self.last {
            Some((t, c)) if now > t => ((cpu_s - c) / now.duration_since(t).as_secs_f64()).max(0.0),
            _ => 0.0,
        };
        self.last = Some((now, cpu_s));
        frac as f32
    }
}

/// User + system CPU seconds of this process, from /proc (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// gRPC clients of peer servers, with the address each was made for.
type PeerClients = HashMap<ServerId, (String, GameServerPeerClient<Channel>)>;

/// Carries out what the simulation asks of the control plane.
#[derive(Debug, Clone)]
pub struct TransferExecutor {
    pub me: ServerId,
    pub coordinator: Coordinators,
    pub sim: mpsc::Sender<SimIn>,
    pub maps: watch::Receiver<Arc<MapView>>,
    pub metrics: Metrics,
    peers: Arc<Mutex<PeerClients>>,
}

/// How long a pre-connect hint may wait for its standby ticket.
const HINT_TICKET_WAIT: Duration = Duration::from_secs(1);

/// The servers `map` lists as dead.
fn dead_servers(map: &MapView) -> BTreeSet<ServerId> {
    map.servers.iter().filter(|(_, p)| !p.alive).map(|(id, _)| *id).collect()
}

/// Sleeps until `t`, or forever without one.
async fn sleep_until_some(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl TransferExecutor {
    pub fn new(
        me: ServerId,
        coordinator: Coordinators,
        sim: mpsc::Sender<SimIn>,
        maps: watch::Receiver<Arc<MapView>>,
        metrics: Metrics,
    ) -> Self {
        Self { me, coordinator, sim, maps, metrics, peers: Arc::default() }
    }

    /// Runs until the simulation's outbox closes. The handoff protocol's
    /// decisions are the [`HandoffDriver`]'s; this loop feeds it what the
    /// simulation asks, the answers of the calls it made and the map's
    /// dead servers, performs its actions and wakes it at its timeouts.
    pub async fn run(self, mut rx: mpsc::Receiver<SimOut>) {
        // Directory updates go one at a time, in order, so a leave never
        // overtakes its join.
        let (presence_tx, presence_rx) = mpsc::channel(4096);
        tokio::spawn(self.clone().report_presence(presence_rx));
        let mut ghosts =
            crate::sync::GhostLinks::new(self.me, self.maps.clone(), self.metrics.clone(), self.sim.clone());
        let mut driver = HandoffDriver::new();
        // The driver's messages for the simulation, in order: one task
        // forwards them, waiting while the inbox is full.
        let (to_sim, mut to_sim_rx) = mpsc::unbounded_channel::<SimIn>();
        let sim = self.sim.clone();
        tokio::spawn(async move {
            while let Some(msg) = to_sim_rx.recv().await {
                if sim.send(msg).await.is_err() {
                    break;
                }
            }
        });
        // Answers of the calls the driver asked for: one per call.
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<Event>();
        let origin = tokio::time::Instant::now();
        let now = || origin.elapsed().as_millis() as Millis;
        let mut maps = self.maps.clone();
        driver.handle(now(), Event::Dead(dead_servers(&maps.borrow())));
        loop {
            let wake = driver.poll_timeout().map(|t| origin + Duration::from_millis(t));
            tokio::select! {
                out = rx.recv() => match out {
                    None => break,
                    Some(SimOut::Ghosts { to, tick, ghosts: list }) => ghosts.send(to, tick, list),
                    Some(SimOut::Presence { player, entity, online }) => {
                        if presence_tx.try_send((player, entity, online)).is_err() {
                            self.metrics.transfers.with_label_values(&["presence_dropped"]).inc();
                        }
                    }
                    Some(SimOut::Hint { player, name, hint, tx }) => {
                        tokio::spawn(self.clone().hint(player, name, hint, tx));
                    }
                    Some(SimOut::Interact { to, interaction }) => {
                        tokio::spawn(self.clone().interact(to, interaction));
                    }
                    Some(out) => driver.handle(now(), Event::Sim(out)),
                },
                Some(answer) = answers.recv() => driver.handle(now(), answer),
                Ok(()) = maps.changed() => {
                    let dead = dead_servers(&maps.borrow_and_update());
                    driver.handle(now(), Event::Dead(dead));
                }
                () = sleep_until_some(wake) => driver.handle_timeout(now()),
            }
            while let Some(action) = driver.poll_action() {
                self.perform(action, &answers_tx, &to_sim);
            }
        }
    }

    /// Carries out one of the driver's actions; a call's answer comes back
    /// on `answers`.
    fn perform(&self, action: Action, answers: &mpsc::UnboundedSender<Event>, to_sim: &mpsc::UnboundedSender<SimIn>) {
        let this = self.clone();
        let answers = answers.clone();
        match action {
            Action::Count(label) => self.metrics.transfers.with_label_values(&[label]).inc(),
            Action::ToSim(msg) => {
                let _ = to_sim.send(msg);
            }
            Action::RequestTransfer(ask) => {
                tokio::spawn(async move {
                    let answer = this.request(&ask).await;
                    let _ = answers.send(Event::TransferAnswered { entity: ask.entity, answer });
                });
            }
            Action::SendHandoff(state) => {
                tokio::spawn(async move {
                    let answer = this.send_handoff(&state).await;
                    let _ = answers.send(Event::HandoffAnswered { transfer_id: state.transfer_id, answer });
                });
            }
            Action::Complete { transfer_id } => {
                tokio::spawn(async move {
                    let req = mpb::CompleteTransferRequest {
                        transfer_id,
                        from_server: this.me.0,
                        delivered: true,
                        ..Default::default()
                    };
                    match this.complete(req).await {
                        Ok(_) => info!(transfer = transfer_id, "transfer completed"),
                        Err(s) => {
                            warn!(transfer = transfer_id, error = %s.message(), "could not report the transfer's completion")
                        }
                    }
                });
            }
            Action::Reclaim { transfer_id, error, why } => {
                tokio::spawn(async move {
                    let req = mpb::CompleteTransferRequest {
                        transfer_id,
                        from_server: this.me.0,
                        error,
                        reclaim: true,
                        ..Default::default()
                    };
                    let answer = match this.complete(req).await {
                        Ok(r) => Ok(r.reclaimed.then_some(Epoch(r.entity_epoch))),
                        Err(s) => Err(s.message().to_owned()),
                    };
                    let event = match why {
                        ReclaimFor::Undelivered => Event::ReclaimAnswered { transfer_id, answer },
                        ReclaimFor::Cancel { entity } => Event::CancelAnswered { entity, answer },
                    };
                    let _ = answers.send(event);
                });
            }
            Action::ReportOrphan { transfer_id, adopted } => {
                tokio::spawn(async move {
                    let req = mpb::CompleteTransferRequest {
                        transfer_id,
                        from_server: this.me.0,
                        delivered: adopted,
                        orphan: true,
                        ..Default::default()
                    };
                    if let Err(s) = this.complete(req).await {
                        warn!(transfer = transfer_id, error = %s.message(), "could not report an orphaned transfer");
                    }
                });
            }
        }
    }

    /// Puts a standby ticket into a pre-connect hint and sends it. The
    /// coordinator refuses while the directory does not yet list the player
    /// here (a hint right after the join): asked again a few times within a
    /// second; after that, or with the coordinator unreachable, the hint
    /// goes without a ticket and the client buys one with its session.
    async fn hint(self, player: shared::PlayerId, name: String, mut hint: ServerControl, tx: ConnTx) {
        let ServerControl::PreConnect { server: to, ticket, .. } = &mut hint else { return };
        let req = mpb::StandbyTicketRequest { server_id: self.me.0, player_id: player.0, name, to_server_id: to.0 };
        let deadline = tokio::time::Instant::now() + HINT_TICKET_WAIT;
        loop {
            let asked = tokio::time::timeout_at(
                deadline,
                self.coordinator.call(|mut c| {
                    let req = req.clone();
                    async move { c.standby_ticket(req).await }
                }),
            )
            .await;
            match asked {
                Ok(Ok(r)) => {
                    *ticket = Some(r.ticket);
                    break;
                }
                Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                Ok(Err(s)) => {
                    warn!(%player, to = %req.to_server_id, error = %s.message(), "no standby ticket for a pre-connect hint");
                    break;
                }
                Err(_) => break,
            }
        }
        let label = if ticket.is_some() { "with_ticket" } else { "without_ticket" };
        self.metrics.hints.with_label_values(&[label]).inc();
        if let Err(e) = tx.try_send(Outbound::Control(hint)) {
            self.metrics.datagrams_dropped.with_label_values(&[e.reason()]).inc();
        }
    }

    /// Sends directory updates in order, retrying an unavailable
    /// coordinator for up to 10 s each.
    async fn report_presence(self, mut rx: mpsc::Receiver<(shared::PlayerId, shared::EntityId, bool)>) {
        while let Some((player, entity, online)) = rx.recv().await {
            let req = mpb::PresenceRequest { server_id: self.me.0, player_id: player.0, entity_id: entity.0, online };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match self.coordinator.call(|mut c| async move { c.presence(req).await }).await {
                    Ok(_) => break,
                    Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => {
                        warn!(%player, online, error = %s.message(), "the coordinator's directory refused an update");
                        self.metrics.transfers.with_label_values(&["presence_refused"]).inc();
                        break;
                    }
                }
            }
        }
    }

    /// Asks the coordinator for a transfer. A retried request (its answer
    /// lost with a leader) gets the committed transfer back.
    async fn request(&self, ask: &TransferAsk) -> Result<CommittedTransfer, Refused> {
        let req = mpb::TransferRequest {
            entity_id: ask.entity.0,
            from_server: self.me.0,
            from_region: Some(mesh_key_to_pb(&ask.from_region)),
            from_region_epoch: ask.from_region_epoch.0,
            entity_epoch: ask.entity_epoch.0,
            to_region: Some(mesh_key_to_pb(&ask.to_region)),
            position: Some(mpb::Vec3 { x: ask.position.x, y: ask.position.y, z: ask.position.z }),
            not_before_tick: ask.not_before_tick,
            components: crate::convert::components_to_mesh_pb(&ask.components),
        };
        match self
            .coordinator
            .call(|mut c| {
                let req = req.clone();
                async move { c.request_transfer(req).await }
            })
            .await
        {
            Ok(r) => Ok(CommittedTransfer {
                id: r.transfer_id,
                to: ServerId(r.to_server),
                to_region: ask.to_region,
                to_region_epoch: Epoch(r.to_region_epoch),
                entity_epoch: Epoch(r.entity_epoch),
                effective_tick: r.effective_tick,
            }),
            Err(status) => Err(refusal_from_coordinator(&status)),
        }
    }

    /// Sends a player's push or grab to the prop's owner. Not retried: the
    /// hand acts again on its next contact or grip.
    async fn interact(self, to: ServerId, interaction: crate::sim::interact::Interaction) {
        let label = interaction.kind.label();
        let result = match self.peer(to).await {
            Ok(mut client) => {
                let req = crate::convert::interaction_to_pb(&interaction);
                match tokio::time::timeout(Duration::from_secs(2), client.interact(req)).await {
                    Ok(Ok(r)) if r.get_ref().applied => "delivered",
                    Ok(Ok(r)) => {
                        debug!(entity = %interaction.entity, %to, reason = %r.get_ref().reason, "interaction refused");
                        "refused"
                    }
                    Ok(Err(s)) => {
                        debug!(entity = %interaction.entity, %to, error = %s.message(), "interaction not delivered");
                        "send_failed"
                    }
                    Err(_) => "send_failed",
                }
            }
            Err(e) => {
                debug!(entity = %interaction.entity, %to, error = %e, "interaction not delivered");
                "send_failed"
            }
        };
        self.metrics.interactions.with_label_values(&[label, result]).inc();
    }

    async fn peer(&self, server: ServerId) -> anyhow::Result<GameServerPeerClient<Channel>> {
        let addr = {
            let map = self.maps.borrow();
            map.servers
                .get(&server)
                .map(|p| p.grpc.clone())
                .with_context(|| format!("server {server} is not on the map"))?
        };
        let mut peers = self.peers.lock().await;
        if let Some((a, c)) = peers.get(&server)
            && *a == addr
        {
            return Ok(c.clone());
        }
        let client = GameServerPeerClient::new(channel(&addr)?);
        peers.insert(server, (addr, client.clone()));
        Ok(client)
    }

    /// One attempt to hand `state` to its target, within 2 s.
    async fn send_handoff(&self, state: &HandoffState) -> Result<(), Refused> {
        let mut peer = self.peer(state.to).await.map_err(|e| Refused::new(Refusal::Unreachable, format!("{e:#}")))?;
        match tokio::time::timeout(Duration::from_secs(2), peer.handoff(handoff_to_pb(state))).await {
            Ok(Ok(r)) => handoff_answer(Ok(r.get_ref())),
            Ok(Err(s)) => handoff_answer(Err(&s)),
            Err(_) => Err(Refused::new(Refusal::Unreachable, "the target did not answer within 2 s")),
        }
    }

    async fn complete(
        &self,
        req: mpb::CompleteTransferRequest,
    ) -> Result<mpb::CompleteTransferResponse, tonic::Status> {
        self.coordinator
            .call(|mut c| {
                let req = req.clone();
                async move { c.complete_transfer(req).await }
            })
            .await
    }
}
