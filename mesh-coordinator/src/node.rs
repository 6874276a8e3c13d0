//! The owner of the state machine: commands are proposed here, committed
//! through Raft and applied in log order on every replica.
//!
//! One thread per process drives the [`Replica`]: it ticks Raft on a real
//! clock, steps messages from peers, proposes, handles each `Ready` (the log
//! made durable before messages that promise it are sent), applies committed
//! entries and answers the callers whose proposals they were. Everything
//! else talks to it through a channel.
//!
//! - Writes ([`Node::propose`]) can be made on any replica: a follower's
//!   proposal is forwarded by Raft to the leader, and the follower answers
//!   once it has applied the entry itself, so a read that follows sees it.
//! - [`Node::read`] reads this replica's state (possibly a little behind the
//!   leader); [`Node::read_current`] first waits for a read index confirmed
//!   by the leader (linearizable).
//! - A new leader's first entry is [`Command::NewLeader`]: it bootstraps a
//!   pristine mesh (tick grid, policy, the database's topology snapshot if
//!   there is one) and gives every live server a full heartbeat timeout.
//! - Only the leader proposes the periodic [`Command::Tick`] and writes to
//!   the database.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use raft::StateRole;
use raft::eraftpb::Message;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::consensus::transport::{Identity, Transport};
use crate::consensus::{Applied, ProposalId, ProposeError, RaftStore, Replica, Timing};
use crate::metrics::Metrics;
use crate::state::{Bootstrap, Command, CommandError, CoordinatorState, Event, Policy, Response};

/// Unix time, nanoseconds: the timestamp a proposer stamps on commands.
pub use svc::unix_nanos as now_nanos;

/// How long a proposal may take to commit before the caller is told to retry.
const PROPOSE_TIMEOUT: Duration = Duration::from_millis(1_500);

/// What the driver thread is asked to do.
#[derive(Debug)]
pub enum Input {
    Propose { cmd: Command, reply: oneshot::Sender<Result<Applied, ProposeError>> },
    ReadIndex { reply: oneshot::Sender<Result<u64, ProposeError>> },
    Raft(Vec<Message>),
    Unreachable(u64),
    SnapshotSent { to: u64, ok: bool },
    Stop,
}

/// Raft as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RaftStatus {
    pub id: u64,
    pub role: &'static str,
    /// 0: no leader known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
}

impl RaftStatus {
    pub fn is_leader(&self) -> bool {
        self.leader == self.id && self.role == "leader"
    }
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::Leader => "leader",
        StateRole::PreCandidate => "pre_candidate",
    }
}

/// How this replica takes part in Raft.
#[derive(Debug, Clone)]
pub struct RaftSetup {
    pub id: u64,
    /// Every replica (this one included): id → URL of its Raft port.
    pub peers: BTreeMap<u64, String>,
    /// Where the log lives; `None`: memory (lost at exit).
    pub dir: Option<std::path::PathBuf>,
    pub tick: Duration,
    pub timing: Timing,
    pub identity: Identity,
}

/// What a new leader bootstraps a pristine mesh with.
#[derive(Debug, Clone)]
pub struct Genesis {
    pub policy: Policy,
    pub world_seed: u64,
    pub restore: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Shared {
    state: Arc<Mutex<CoordinatorState>>,
    metrics: Metrics,
    map_version: watch::Sender<u64>,
    status: watch::Sender<RaftStatus>,
}

#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    pub metrics: Metrics,
    inbox: std_mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    driver: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Node {
    /// Opens the log, starts the driver thread and the outbound transport
    /// (on `rt`). Returns the node and the sender the inbound Raft service
    /// hands peer messages to.
    pub fn start(
        setup: RaftSetup,
        initial: CoordinatorState,
        genesis: Genesis,
        metrics: Metrics,
        rt: &tokio::runtime::Handle,
    ) -> anyhow::Result<(Arc<Node>, std_mpsc::Sender<Input>)> {
        let voters: Vec<u64> = setup.peers.keys().copied().collect();
        anyhow::ensure!(voters.contains(&setup.id), "raft id {} is not among the peers {voters:?}", setup.id);
        let store = match &setup.dir {
            Some(dir) => RaftStore::open(dir, &voters)
                .map_err(|e| anyhow::anyhow!("opening the Raft log in {}: {e}", dir.display()))?,
            None => RaftStore::in_memory(&voters),
        };
        let state = Arc::new(Mutex::new(initial.clone()));
        let replica = Replica::new(setup.id, store, initial, state.clone(), setup.timing, &crate::consensus::logger())?;
        let first = {
            let s = replica.state();
            s.map_version()
        };
        let status0 = RaftStatus {
            id: setup.id,
            role: role_name(replica.role()),
            leader: replica.leader(),
            term: replica.term(),
            commit: replica.commit_index(),
            applied: replica.applied(),
        };
        let (status_tx, status_rx) = watch::channel(status0);
        let (map_tx, _) = watch::channel(first);
        let shared = Arc::new(Shared { state, metrics: metrics.clone(), map_version: map_tx, status: status_tx });
        refresh_gauges(&shared.metrics, &shared.state.lock().unwrap_or_else(PoisonError::into_inner));
        let (inbox, rx) = std_mpsc::channel();
        let transport = Transport::start(
            rt,
            setup.id,
            &setup.peers,
            setup.identity.clone(),
            inbox.clone(),
            metrics.raft_dropped.clone(),
        )?;
        let mut driver = Driver {
            replica,
            shared: shared.clone(),
            transport,
            rx,
            tick: setup.tick,
            genesis,
            next_seq: 1,
            pending: HashMap::new(),
            reads: Vec::new(),
            next_read: 1,
            last_status: status0,
        };
        info!(id = setup.id, voters = ?voters, durable = setup.dir.is_some(), "raft replica starting");
        let handle = std::thread::Builder::new().name("raft".into()).spawn(move || driver.run())?;
        let node = Arc::new(Node {
            shared,
            metrics,
            inbox: inbox.clone(),
            status: status_rx,
            driver: Mutex::new(Some(handle)),
        });
        Ok((node, inbox))
    }

    fn lock(&self) -> MutexGuard<'_, CoordinatorState> {
        // The state machine never panics half-way through a command; if a
        // caller did while holding the lock, the state is still whole.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn raft_status(&self) -> RaftStatus {
        *self.status.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.raft_status().is_leader()
    }

    /// Whether this node can serve: a leader is known and the mesh is
    /// bootstrapped.
    pub fn is_ready(&self) -> bool {
        self.raft_status().leader != 0 && self.lock().is_bootstrapped()
    }

    /// Commits `cmd` through the log and returns what applying it answered.
    /// `CommandError::Unavailable` means it did not commit in time (no
    /// leader, a leader change): the caller may retry.
    pub async fn propose(&self, cmd: Command) -> Result<Response, CommandError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        let mut status = self.status.clone();
        loop {
            let (reply, rx) = oneshot::channel();
            self.inbox
                .send(Input::Propose { cmd: cmd.clone(), reply })
                .map_err(|_| CommandError::Unavailable("the replica is stopping".into()))?;
            let outcome = tokio::time::timeout_at(deadline, rx).await;
            let result = match outcome {
                Ok(Ok(Ok(applied))) => return applied.result,
                Ok(Ok(Err(ProposeError::NoLeader))) => {
                    // Wait for a leader, then try again.
                    let waited = tokio::time::timeout_at(deadline, status.wait_for(|s| s.leader != 0)).await;
                    if waited.is_ok() {
                        continue;
                    }
                    "no leader".to_owned()
                }
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Err(_)) => "the proposal was dropped".to_owned(),
                Err(_) => format!("not committed within {} ms", PROPOSE_TIMEOUT.as_millis()),
            };
            self.metrics.raft_proposals_failed.inc();
            return Err(CommandError::Unavailable(result));
        }
    }

    /// A read of this replica's state (it may trail the leader slightly).
    pub fn read<R>(&self, f: impl FnOnce(&CoordinatorState) -> R) -> R {
        f(&self.lock())
    }

    /// A linearizable read: waits until this replica has applied everything
    /// the leader had committed when the read began.
    pub async fn read_current<R>(&self, f: impl FnOnce(&CoordinatorState) -> R) -> Result<R, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.inbox
            .send(Input::ReadIndex { reply })
            .map_err(|_| CommandError::Unavailable("the replica is stopping".into()))?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(Ok(_))) => Ok(self.read(f)),
            Ok(Ok(Err(e))) => Err(CommandError::Unavailable(e.to_string())),
            _ => Err(CommandError::Unavailable("no read index from the leader in time".into())),
        }
    }

    /// Changes whenever the region map does.
    pub fn watch_map(&self) -> watch::Receiver<u64> {
        self.shared.map_version.subscribe()
    }

    /// Changes whenever the role, leader, term or applied index do.
    pub fn watch_raft(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Stops the driver thread (the log is already durable).
    pub fn stop(&self) {
        let _ = self.inbox.send(Input::Stop);
        let handle = self.driver.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            error!("the raft driver thread panicked");
        }
    }
}

struct PendingRead {
    ctx: u64,
    index: Option<u64>,
    reply: oneshot::Sender<Result<u64, ProposeError>>,
    deadline: Instant,
}

struct Driver {
    replica: Replica,
    shared: Arc<Shared>,
    transport: Transport,
    rx: std_mpsc::Receiver<Input>,
    tick: Duration,
    genesis: Genesis,
    next_seq: u64,
    pending: HashMap<u64, (oneshot::Sender<Result<Applied, ProposeError>>, Instant)>,
    reads: Vec<PendingRead>,
    next_read: u64,
    last_status: RaftStatus,
}

impl Driver {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Input::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(input) => {
                    if !self.handle(input) {
                        break;
                    }
                    // Take whatever else is queued before the next Ready.
                    for _ in 0..1024 {
                        match self.rx.try_recv() {
                            Ok(Input::Stop) => return,
                            Ok(input) => {
                                self.handle(input);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= next_tick {
                self.replica.tick();
                next_tick += self.tick;
                if next_tick < now {
                    // The thread was descheduled: no burst of ticks.
                    next_tick = now + self.tick;
                }
                self.expire(now);
            }
            if let Err(e) = self.ready() {
                // A storage failure: this replica cannot safely go on.
                error!(error = %e, "the raft log failed; the replica stops (restart it)");
                self.shared.metrics.raft_storage_failures.inc();
                std::process::exit(4);
            }
        }
        info!("raft replica stopped");
    }

    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Propose { cmd, reply } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let id = ProposalId { replica: self.replica.id(), seq };
                match self.replica.propose(id, &cmd) {
                    Ok(()) => {
                        self.pending.insert(seq, (reply, Instant::now() + PROPOSE_TIMEOUT));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                let ctx = self.next_read;
                self.next_read += 1;
                self.replica.read_index(ctx.to_le_bytes().to_vec());
                self.reads.push(PendingRead { ctx, index: None, reply, deadline: Instant::now() + PROPOSE_TIMEOUT });
            }
            Input::Raft(msgs) => {
                for m in msgs {
                    if let Err(e) = self.replica.step(m) {
                        debug!(error = %e, "raft message ignored");
                    }
                }
            }
            Input::Unreachable(peer) => self.replica.report_unreachable(peer),
            Input::SnapshotSent { to, ok } => self.replica.report_snapshot(to, ok),
            Input::Stop => return false,
        }
        true
    }

    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, (_, deadline)| *deadline > now);
        self.reads.retain(|r| r.deadline > now);
    }

    fn ready(&mut self) -> raft::Result<()> {
        let out = self.replica.process_ready()?;
        self.transport.send(out.messages);
        if out.snapshot_installed {
            info!(applied = self.replica.applied(), "installed a snapshot from the leader");
            self.shared.metrics.raft_snapshots_installed.inc();
        }
        let metrics = &self.shared.metrics;
        let mut map_changed = out.snapshot_installed;
        for a in out.applied {
            metrics.commands.with_label_values(&[a.kind]).inc();
            if let Err(e) = &a.result {
                metrics.refused.with_label_values(&[e.reason()]).inc();
            }
            map_changed |= a.events.iter().any(|e| !matches!(e, Event::TransferCompleted { .. }));
            for e in &a.events {
                record(metrics, e);
            }
            if a.id.replica == self.replica.id()
                && let Some((reply, _)) = self.pending.remove(&a.id.seq)
            {
                let _ = reply.send(Ok(a));
            }
        }
        if map_changed {
            let s = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            refresh_gauges(metrics, &s);
            self.shared.map_version.send_replace(s.map_version());
        }
        for rs in out.read_states {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(0);
            if let Some(r) = self.reads.iter_mut().find(|r| r.ctx == ctx) {
                r.index = Some(rs.index);
            }
        }
        let applied = self.replica.applied();
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads).into_iter().partition(|r| r.index.is_some_and(|i| i <= applied));
        self.reads = waiting;
        for r in done {
            let _ = r.reply.send(Ok(applied));
        }
        if let Some((role, leader, term)) = out.role_change {
            info!(role = role_name(role), leader, term, "raft role");
            if role == StateRole::Leader {
                metrics.raft_leader_changes.inc();
                self.announce_leadership();
            }
        }
        self.publish_status();
        Ok(())
    }

    /// The first entry of a new term (see [`Command::NewLeader`]).
    fn announce_leadership(&mut self) {
        let now = now_nanos();
        let bootstrap = (!self.replica.state().is_bootstrapped()).then(|| Bootstrap {
            // Tick 0 of the grid: now, rounded down to a second.
            clock_epoch: now / 1_000_000_000 * 1_000_000_000,
            policy: self.genesis.policy.clone(),
            world_seed: self.genesis.world_seed,
            restore: self.genesis.restore.clone(),
        });
        let seq = self.next_seq;
        self.next_seq += 1;
        let cmd = Command::NewLeader { replica: self.replica.id(), now, bootstrap };
        if let Err(e) = self.replica.propose(ProposalId { replica: self.replica.id(), seq }, &cmd) {
            warn!(error = %e, "could not propose the new leader's first entry");
        }
    }

    fn publish_status(&mut self) {
        let r = &self.replica;
        let status = RaftStatus {
            id: r.id(),
            role: role_name(r.role()),
            leader: r.leader(),
            term: r.term(),
            commit: r.commit_index(),
            applied: r.applied(),
        };
        if status != self.last_status {
            let m = &self.shared.metrics;
            m.raft_term.set(status.term as i64);
            m.raft_applied.set(status.applied as i64);
            m.raft_commit.set(status.commit as i64);
            m.raft_is_leader.set(i64::from(status.is_leader()));
            m.raft_has_leader.set(i64::from(status.leader != 0));
            self.last_status = status;
            self.shared.status.send_replace(status);
        }
    }
}

/// Gauges that follow the servers' load reports rather than the map: set at
/// scrape time.
pub fn refresh_load_gauges(metrics: &Metrics, s: &CoordinatorState) {
    metrics.desired_game_servers.set(i64::from(s.desired_game_servers()));
    metrics.region_players.reset();
    for r in s.servers().values().filter(|r| r.alive) {
        for (region, n) in s.region_players(r.id) {
            metrics.region_players.with_label_values(&[&region.to_string(), &r.name]).set(i64::from(*n));
        }
    }
}

fn refresh_gauges(metrics: &Metrics, s: &CoordinatorState) {
    let alive = s.servers().values().filter(|r| r.alive).count() as i64;
    let total = s.servers().len() as i64;
    metrics.servers.with_label_values(&["alive"]).set(alive);
    metrics.servers.with_label_values(&["dead"]).set(total - alive);
    let owned =
        s.assignments().values().filter(|a| a.server.is_some_and(|id| s.server(id).is_some_and(|r| r.alive))).count()
            as i64;
    metrics.regions.with_label_values(&["owned"]).set(owned);
    metrics.regions.with_label_values(&["unowned"]).set(s.assignments().len() as i64 - owned);
}

fn record(metrics: &Metrics, e: &Event) {
    match e {
        Event::ServerRegistered { server, name } => info!(%server, %name, "server registered"),
        Event::ServerDied { server, silent_ms } => {
            metrics.server_deaths.inc();
            warn!(%server, silent_ms, "server declared dead");
        }
        Event::RegionAssigned { region, server, previous, epoch } => {
            info!(%region, server = ?server.map(|s| s.0), previous = ?previous.map(|s| s.0), %epoch, "region assigned")
        }
        Event::TransferCommitted(t) => {
            metrics.transfers.inc();
            info!(
                id = t.id, entity = %t.entity, from = %t.from, to = %t.to,
                epoch = %t.entity_epoch, effective_tick = t.effective_tick,
                "authority transfer committed"
            );
        }
        Event::TransferCompleted { id, outcome } => info!(id, ?outcome, "authority transfer completed"),
        Event::Bootstrapped { restored: true } => info!("mesh bootstrapped: restored the stored topology"),
        Event::Bootstrapped { restored: false } => info!("mesh bootstrapped: a new mesh"),
        Event::RegionSplit { region } => {
            metrics.region_changes.with_label_values(&["split"]).inc();
            info!(%region, "region split")
        }
        Event::RegionsMerged { region } => {
            metrics.region_changes.with_label_values(&["merge"]).inc();
            info!(%region, "regions merged")
        }
        Event::ServerDraining { server, draining } => info!(%server, draining, "server drain changed"),
        Event::RegionRebalanced { region, from, to, players } => {
            metrics.region_changes.with_label_values(&["move"]).inc();
            info!(%region, %from, %to, players, "region moved off an overloaded server")
        }
    }
}
