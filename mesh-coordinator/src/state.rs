//! The coordinator's decisions, as a deterministic state machine.
//!
//! Commands go in (each stamped with the time the leader proposed it), a
//! response and a list of events come out. No I/O, no clock reads, no
//! randomness: replaying the same commands on another replica yields the same
//! state, which is what the Raft log will do with it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use shared::region::{RegionKey, RegionTree};
use shared::{EntityId, Epoch, ServerId, Tick, TickClock};

/// Policy knobs of the state machine (part of the replicated state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// A server silent this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// How often servers heartbeat (told to them at registration).
    pub heartbeat_interval_ms: u64,
    /// Unowned regions wait this long after the first registration for more
    /// servers to arrive, unless there are already as many servers as regions.
    pub startup_grace_ms: u64,
    /// A committed transfer takes effect this many ticks after its commit, so
    /// the source can ship the state before the target needs it.
    pub handoff_lead_ticks: u64,
    /// Transfers kept in memory for the API.
    pub transfer_log_len: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            heartbeat_timeout_ms: 2_000,
            heartbeat_interval_ms: 500,
            startup_grace_ms: 3_000,
            handoff_lead_ticks: 9,
            transfer_log_len: 10_000,
        }
    }
}

/// When regions split and merge (the load balancer; set by operators
/// through the admin API, replicated like everything else). Defaults from
/// the infrastructure design: more than 40 players or CPU above 70 %.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// A region splits when its owner has more players than this…
    pub split_players: u32,
    /// …or its owner's CPU (fraction of one core) is above this.
    pub split_cpu: f32,
    /// Siblings merge when their players together are at most this…
    pub merge_players: u32,
    /// …and their owners' CPU is below this.
    pub merge_cpu: f32,
    /// No split or merge of a region within this long of its last one.
    pub cooldown_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { split_players: 40, split_cpu: 0.70, merge_players: 10, merge_cpu: 0.30, cooldown_ms: 60_000 }
    }
}

impl Thresholds {
    /// Refuses values that would make the balancer flap or never act.
    pub fn validate(&self) -> Result<(), String> {
        if self.split_players == 0 || self.split_players > 100_000 {
            return Err("split_players must be 1..=100000".into());
        }
        if !(self.split_cpu > 0.0 && self.split_cpu <= 64.0) {
            return Err("split_cpu must be in (0, 64] (fractions of a core)".into());
        }
        if self.merge_players >= self.split_players / 2 {
            return Err(format!(
                "merge_players ({}) must be below half of split_players ({}), or regions would flap",
                self.merge_players, self.split_players
            ));
        }
        if !(self.merge_cpu >= 0.0 && self.merge_cpu < self.split_cpu / 2.0) {
            return Err(format!("merge_cpu must be in [0, split_cpu / 2 = {})", self.split_cpu / 2.0));
        }
        if !(1_000..=86_400_000).contains(&self.cooldown_ms) {
            return Err("cooldown_ms must be 1000..=86400000".into());
        }
        Ok(())
    }
}

/// One operator write, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Raised by one for every record, never reused.
    pub seq: u64,
    /// When the proposer stamped the command (Unix ns).
    pub at: u64,
    /// What was done, e.g. `set_thresholds`.
    pub action: String,
    /// The values set, as JSON text.
    pub detail: String,
}

/// Operator writes kept in memory for `GET /v1/audit`.
pub const AUDIT_LOG_LEN: usize = 10_000;

/// Where a server can be reached (host:port strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addresses {
    pub quic: String,
    pub grpc: String,
    pub http: String,
    pub metrics: String,
    pub query: String,
}

/// Load a server reports with its heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub players: u32,
    pub entities: u32,
    pub cpu: f32,
    pub tick_p99_ms: f32,
    pub ticks_overrun: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: ServerId,
    pub name: String,
    pub addresses: Addresses,
    pub cert_sha256: String,
    pub capacity_players: u32,
    pub version: String,
    pub alive: bool,
    pub registered_at: u64,
    pub last_heartbeat: u64,
    pub load: Load,
}

/// Who owns a leaf region, under which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub server: Option<ServerId>,
    pub epoch: Epoch,
}

/// Authority over an entity as the log last decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityAuthority {
    pub server: ServerId,
    pub epoch: Epoch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferOutcome {
    /// Committed; the source has not reported how the handoff went.
    Committed,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub id: u64,
    pub entity: EntityId,
    pub from: ServerId,
    pub to: ServerId,
    pub from_region: RegionKey,
    pub to_region: RegionKey,
    pub entity_epoch: Epoch,
    pub to_region_epoch: Epoch,
    pub effective_tick: Tick,
    pub committed_at: u64,
    pub outcome: TransferOutcome,
    pub error: String,
}

/// Times are Unix nanoseconds, stamped by the proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Register {
        name: String,
        addresses: Addresses,
        cert_sha256: String,
        capacity_players: u32,
        version: String,
        now: u64,
    },
    Heartbeat {
        server: ServerId,
        load: Load,
        now: u64,
    },
    /// Periodic: failure detection and placement of unowned regions.
    Tick {
        now: u64,
    },
    RequestTransfer(TransferRequest),
    CompleteTransfer {
        transfer_id: u64,
        from: ServerId,
        delivered: bool,
        error: String,
        now: u64,
    },
    /// The first command of every new leader's term. A leader that finds the
    /// state pristine bootstraps it; in every case each live server gets a
    /// full heartbeat timeout from `now`, since its heartbeats could not
    /// commit while there was no leader.
    NewLeader {
        replica: u64,
        now: u64,
        bootstrap: Option<Bootstrap>,
    },
    /// An operator sets the split and merge thresholds.
    SetThresholds {
        thresholds: Thresholds,
        now: u64,
    },
}

/// What the first leader of a mesh fixes for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// Tick 0 of the mesh grid.
    pub clock_epoch: u64,
    pub policy: Policy,
    pub world_seed: u64,
    /// A topology snapshot from the database (see [`CoordinatorState::to_bytes`]),
    /// when the mesh existed before every replica lost its log.
    pub restore: Option<Vec<u8>>,
}

impl Command {
    /// Stable short name, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Register { .. } => "register",
            Command::Heartbeat { .. } => "heartbeat",
            Command::Tick { .. } => "tick",
            Command::RequestTransfer(_) => "request_transfer",
            Command::CompleteTransfer { .. } => "complete_transfer",
            Command::NewLeader { .. } => "new_leader",
            Command::SetThresholds { .. } => "set_thresholds",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRequest {
    pub entity: EntityId,
    pub from: ServerId,
    pub from_region: RegionKey,
    pub from_region_epoch: Epoch,
    pub entity_epoch: Epoch,
    pub to_region: RegionKey,
    pub not_before_tick: Tick,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Registered { server: ServerId },
    HeartbeatAck { fenced: bool },
    Transfer(TransferRecord),
    Done,
}

/// Why a command was refused. `reason()` is a stable metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("server {0} is not registered")]
    UnknownServer(ServerId),
    #[error("server {0} was declared dead and is fenced; register again")]
    Fenced(ServerId),
    #[error("no more server ids can be minted")]
    ServerIdsExhausted,
    #[error("region {region} is held under {current}, not {claimed} by {server}")]
    StaleRegionEpoch { region: RegionKey, server: ServerId, claimed: Epoch, current: Epoch },
    #[error("entity {entity} is held by {holder} under {current}; {server} claimed {claimed}")]
    StaleEntityEpoch { entity: EntityId, server: ServerId, claimed: Epoch, holder: ServerId, current: Epoch },
    #[error("region {0} is not a leaf of the region map")]
    UnknownRegion(RegionKey),
    #[error("region {0} has no live owner")]
    NoOwner(RegionKey),
    #[error("region {0} is owned by the requesting server itself")]
    SameServer(RegionKey),
    #[error("transfer {0} is unknown or not the caller's")]
    UnknownTransfer(u64),
    #[error("invalid thresholds: {0}")]
    BadThresholds(String),
    #[error("the mesh has not been bootstrapped by a leader yet")]
    NotBootstrapped,
    /// Not a decision of the state machine: the command could not be
    /// committed (no leader, or it did not commit in time). Retry.
    #[error("not committed: {0}")]
    Unavailable(String),
}

impl CommandError {
    pub fn reason(&self) -> &'static str {
        match self {
            CommandError::UnknownServer(_) => "unknown_server",
            CommandError::Fenced(_) => "fenced",
            CommandError::ServerIdsExhausted => "ids_exhausted",
            CommandError::StaleRegionEpoch { .. } | CommandError::StaleEntityEpoch { .. } => "stale_epoch",
            CommandError::UnknownRegion(_) => "unknown_region",
            CommandError::NoOwner(_) => "no_owner",
            CommandError::SameServer(_) => "same_server",
            CommandError::UnknownTransfer(_) => "unknown_transfer",
            CommandError::BadThresholds(_) => "bad_thresholds",
            CommandError::NotBootstrapped => "not_bootstrapped",
            CommandError::Unavailable(_) => "unavailable",
        }
    }
}

/// What a command changed, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ServerRegistered { server: ServerId, name: String },
    ServerDied { server: ServerId, silent_ms: u64 },
    RegionAssigned { region: RegionKey, server: Option<ServerId>, previous: Option<ServerId>, epoch: Epoch },
    TransferCommitted(TransferRecord),
    TransferCompleted { id: u64, outcome: TransferOutcome },
    Bootstrapped { restored: bool },
}

/// The replicated state of the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorState {
    pub policy: Policy,
    pub thresholds: Thresholds,
    pub clock: TickClock,
    /// Seed of the procedural terrain.
    pub world_seed: u64,
    tree: RegionTree,
    assignments: BTreeMap<RegionKey, Assignment>,
    servers: BTreeMap<ServerId, ServerRecord>,
    entities: BTreeMap<EntityId, EntityAuthority>,
    transfers: VecDeque<TransferRecord>,
    transfers_total: u64,
    audit: VecDeque<AuditRecord>,
    audit_total: u64,
    next_server_id: u32,
    next_epoch: u64,
    next_transfer_id: u64,
    map_version: u64,
    first_registration: Option<u64>,
}

impl CoordinatorState {
    /// The state as restored from a topology snapshot after every replica
    /// restarted: epochs, ids and the tick grid continue where they were, and
    /// every server the snapshot knew alive gets a full heartbeat timeout
    /// from `now` to check in before it is declared dead.
    pub fn restored(mut self, now: u64) -> Self {
        for s in self.servers.values_mut().filter(|s| s.alive) {
            s.last_heartbeat = s.last_heartbeat.max(now);
        }
        self.map_version += 1;
        self
    }

    /// Whether `other` describes the same world (roots and seed): a snapshot
    /// of another world must not be restored over this one.
    pub fn same_world(&self, other: &CoordinatorState) -> bool {
        self.world_seed == other.world_seed && self.tree.roots().eq(other.tree.roots())
    }

    pub fn new(policy: Policy, tree: RegionTree, clock: TickClock) -> Self {
        let assignments =
            tree.leaves().into_iter().map(|k| (k, Assignment { server: None, epoch: Epoch(0) })).collect();
        Self {
            policy,
            thresholds: Thresholds::default(),
            clock,
            world_seed: 0,
            tree,
            assignments,
            servers: BTreeMap::new(),
            entities: BTreeMap::new(),
            transfers: VecDeque::new(),
            transfers_total: 0,
            audit: VecDeque::new(),
            audit_total: 0,
            next_server_id: 1,
            next_epoch: 1,
            next_transfer_id: 1,
            map_version: 1,
            first_registration: None,
        }
    }

    pub fn tree(&self) -> &RegionTree {
        &self.tree
    }

    /// Every leaf with its assignment, in key order.
    pub fn assignments(&self) -> &BTreeMap<RegionKey, Assignment> {
        &self.assignments
    }

    pub fn servers(&self) -> &BTreeMap<ServerId, ServerRecord> {
        &self.servers
    }

    pub fn server(&self, id: ServerId) -> Option<&ServerRecord> {
        self.servers.get(&id)
    }

    pub fn entity_authority(&self, e: EntityId) -> Option<EntityAuthority> {
        self.entities.get(&e).copied()
    }

    /// The most recent transfers, oldest first.
    pub fn transfers(&self) -> &VecDeque<TransferRecord> {
        &self.transfers
    }

    pub fn transfers_total(&self) -> u64 {
        self.transfers_total
    }

    /// The most recent operator writes, oldest first.
    pub fn audit_log(&self) -> &VecDeque<AuditRecord> {
        &self.audit
    }

    fn audit(&mut self, action: &str, detail: String, at: u64) {
        self.audit_total += 1;
        self.audit.push_back(AuditRecord { seq: self.audit_total, at, action: action.into(), detail });
        while self.audit.len() > AUDIT_LOG_LEN {
            self.audit.pop_front();
        }
    }

    /// Raised whenever assignments or the server set change.
    pub fn map_version(&self) -> u64 {
        self.map_version
    }

    /// The live owner of the leaf holding `p`.
    pub fn owner_at(&self, p: shared::WorldPos) -> Option<(RegionKey, &ServerRecord)> {
        let leaf = self.tree.leaf_at(p)?;
        let server = self.assignments.get(&leaf)?.server?;
        self.servers.get(&server).filter(|s| s.alive).map(|s| (leaf, s))
    }

    pub fn regions_of(&self, server: ServerId) -> impl Iterator<Item = (&RegionKey, &Assignment)> {
        self.assignments.iter().filter(move |(_, a)| a.server == Some(server))
    }

    /// Whether a leader has bootstrapped the mesh (fixed its tick grid).
    pub fn is_bootstrapped(&self) -> bool {
        self.clock.epoch_unix_nanos != 0
    }

    /// The state as bytes: a format byte, then bincode. Raft snapshots and
    /// the database's topology snapshot both use it. Format 2 added the
    /// thresholds; format 1 (before them) is refused with a clear error.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![2u8];
        out.extend(bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("the state serialises"));
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<CoordinatorState, String> {
        match bytes.split_first() {
            Some((2, body)) => bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(s, _)| s)
                .map_err(|e| format!("snapshot does not decode: {e}")),
            Some((1, _)) => Err("snapshot format 1 was written by a build before Raft; start a new mesh (another \
                                 --cluster, or delete the development data directory)"
                .into()),
            Some((v, _)) => Err(format!("snapshot format {v} is unknown to this build")),
            None => Err("empty snapshot".into()),
        }
    }

    pub fn apply(&mut self, cmd: Command) -> (Result<Response, CommandError>, Vec<Event>) {
        let mut events = Vec::new();
        if !self.is_bootstrapped() && !matches!(cmd, Command::NewLeader { .. } | Command::Tick { .. }) {
            return (Err(CommandError::NotBootstrapped), events);
        }
        let result = match cmd {
            Command::Register { name, addresses, cert_sha256, capacity_players, version, now } => {
                self.register(name, addresses, cert_sha256, capacity_players, version, now, &mut events)
            }
            Command::Heartbeat { server, load, now } => self.heartbeat(server, load, now),
            Command::NewLeader { replica: _, now, bootstrap } => {
                if let Some(b) = bootstrap.filter(|_| !self.is_bootstrapped()) {
                    self.bootstrap(b, now, &mut events);
                }
                for s in self.servers.values_mut().filter(|s| s.alive) {
                    s.last_heartbeat = s.last_heartbeat.max(now);
                }
                Ok(Response::Done)
            }
            Command::SetThresholds { thresholds, now } => match thresholds.validate() {
                Ok(()) => {
                    self.thresholds = thresholds;
                    self.audit("set_thresholds", serde_json::to_string(&thresholds).unwrap_or_default(), now);
                    Ok(Response::Done)
                }
                Err(e) => Err(CommandError::BadThresholds(e)),
            },
            Command::Tick { .. } if !self.is_bootstrapped() => Ok(Response::Done),
            Command::Tick { now } => {
                self.detect_failures(now, &mut events);
                self.place_unowned(now, &mut events);
                Ok(Response::Done)
            }
            Command::RequestTransfer(req) => self.request_transfer(req, &mut events),
            Command::CompleteTransfer { transfer_id, from, delivered, error, now: _ } => {
                self.complete_transfer(transfer_id, from, delivered, error, &mut events)
            }
        };
        if events.iter().any(|e| !matches!(e, Event::TransferCompleted { .. })) {
            self.map_version += 1;
        }
        (result, events)
    }

    fn bootstrap(&mut self, b: Bootstrap, now: u64, events: &mut Vec<Event>) {
        let stored = b.restore.as_deref().map(CoordinatorState::from_bytes);
        match stored {
            // The loader checked the world before proposing; check again so
            // no replica ever takes another world's map.
            Some(Ok(stored)) if stored.same_world(self) && stored.is_bootstrapped() => {
                *self = stored.restored(now);
                events.push(Event::Bootstrapped { restored: true });
            }
            _ => {
                self.clock = TickClock::new(b.clock_epoch.max(1));
                self.policy = b.policy;
                self.world_seed = b.world_seed;
                events.push(Event::Bootstrapped { restored: false });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        name: String,
        addresses: Addresses,
        cert_sha256: String,
        capacity_players: u32,
        version: String,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        if self.next_server_id > ServerId::MAX {
            return Err(CommandError::ServerIdsExhausted);
        }
        let id = ServerId(self.next_server_id);
        self.next_server_id += 1;
        self.first_registration.get_or_insert(now);
        self.servers.insert(
            id,
            ServerRecord {
                id,
                name: name.clone(),
                addresses,
                cert_sha256,
                capacity_players,
                version,
                alive: true,
                registered_at: now,
                last_heartbeat: now,
                load: Load::default(),
            },
        );
        events.push(Event::ServerRegistered { server: id, name });
        self.place_unowned(now, events);
        Ok(Response::Registered { server: id })
    }

    fn heartbeat(&mut self, server: ServerId, load: Load, now: u64) -> Result<Response, CommandError> {
        let rec = self.servers.get_mut(&server).ok_or(CommandError::UnknownServer(server))?;
        if !rec.alive {
            return Ok(Response::HeartbeatAck { fenced: true });
        }
        rec.last_heartbeat = rec.last_heartbeat.max(now);
        rec.load = load;
        Ok(Response::HeartbeatAck { fenced: false })
    }

    fn detect_failures(&mut self, now: u64, events: &mut Vec<Event>) {
        let timeout = self.policy.heartbeat_timeout_ms * 1_000_000;
        let dead: Vec<(ServerId, u64)> = self
            .servers
            .values()
            .filter(|s| s.alive && now.saturating_sub(s.last_heartbeat) > timeout)
            .map(|s| (s.id, now - s.last_heartbeat))
            .collect();
        for (id, silent) in dead {
            if let Some(s) = self.servers.get_mut(&id) {
                s.alive = false;
            }
            events.push(Event::ServerDied { server: id, silent_ms: silent / 1_000_000 });
            let orphaned: Vec<RegionKey> = self.regions_of(id).map(|(k, _)| *k).collect();
            for region in orphaned {
                let to = self.choose_owner(&region, Some(id));
                self.assign(region, to, events);
            }
            // Authority over the dead server's entities is void; whoever
            // resumes them (from persistence) starts a new record.
            self.entities.retain(|_, a| a.server != id);
        }
    }

    /// Gives unowned leaves to live servers once the startup grace is over, or
    /// at once when there are at least as many live servers as leaves.
    fn place_unowned(&mut self, now: u64, events: &mut Vec<Event>) {
        let live = self.servers.values().filter(|s| s.alive).count();
        if live == 0 {
            return;
        }
        let grace_over =
            self.first_registration.is_some_and(|t| now.saturating_sub(t) >= self.policy.startup_grace_ms * 1_000_000);
        if !grace_over && live < self.assignments.len() {
            return;
        }
        let unowned: Vec<RegionKey> =
            self.assignments.iter().filter(|(_, a)| a.server.is_none()).map(|(k, _)| *k).collect();
        for region in unowned {
            let to = self.choose_owner(&region, None);
            if to.is_some() {
                self.assign(region, to, events);
            }
        }
    }

    /// The live server with the fewest regions; among equals, one that already
    /// owns a neighbour of `region`; then the lowest id.
    fn choose_owner(&self, region: &RegionKey, exclude: Option<ServerId>) -> Option<ServerId> {
        let neighbours: Vec<RegionKey> =
            self.tree.neighbours(region).map(|n| n.into_iter().map(|(k, _)| k).collect()).unwrap_or_default();
        self.servers
            .values()
            .filter(|s| s.alive && Some(s.id) != exclude)
            .min_by_key(|s| {
                let count = self.regions_of(s.id).count();
                let adjacent =
                    neighbours.iter().any(|n| self.assignments.get(n).is_some_and(|a| a.server == Some(s.id)));
                (count, !adjacent, s.id)
            })
            .map(|s| s.id)
    }

    fn assign(&mut self, region: RegionKey, server: Option<ServerId>, events: &mut Vec<Event>) {
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        let previous = self.assignments.get(&region).and_then(|a| a.server);
        self.assignments.insert(region, Assignment { server, epoch });
        events.push(Event::RegionAssigned { region, server, previous, epoch });
    }

    fn live_server(&self, id: ServerId) -> Result<&ServerRecord, CommandError> {
        let s = self.servers.get(&id).ok_or(CommandError::UnknownServer(id))?;
        if s.alive { Ok(s) } else { Err(CommandError::Fenced(id)) }
    }

    fn request_transfer(&mut self, req: TransferRequest, events: &mut Vec<Event>) -> Result<Response, CommandError> {
        self.live_server(req.from)?;
        let from_assignment =
            self.assignments.get(&req.from_region).ok_or(CommandError::UnknownRegion(req.from_region))?;
        if from_assignment.server != Some(req.from) || from_assignment.epoch != req.from_region_epoch {
            return Err(CommandError::StaleRegionEpoch {
                region: req.from_region,
                server: req.from,
                claimed: req.from_region_epoch,
                current: from_assignment.epoch,
            });
        }
        let held = self.entities.get(&req.entity).copied();
        let (holder, current) = held.map_or((req.from, Epoch(0)), |a| (a.server, a.epoch));
        if holder != req.from || current != req.entity_epoch {
            return Err(CommandError::StaleEntityEpoch {
                entity: req.entity,
                server: req.from,
                claimed: req.entity_epoch,
                holder,
                current,
            });
        }
        let to = *self.assignments.get(&req.to_region).ok_or(CommandError::UnknownRegion(req.to_region))?;
        let to_server = to.server.ok_or(CommandError::NoOwner(req.to_region))?;
        if to_server == req.from {
            return Err(CommandError::SameServer(req.to_region));
        }
        if !self.servers.get(&to_server).is_some_and(|s| s.alive) {
            return Err(CommandError::NoOwner(req.to_region));
        }
        let entity_epoch = current.next();
        let effective_tick = (self.clock.tick_at(req.now) + self.policy.handoff_lead_ticks).max(req.not_before_tick);
        let record = TransferRecord {
            id: self.next_transfer_id,
            entity: req.entity,
            from: req.from,
            to: to_server,
            from_region: req.from_region,
            to_region: req.to_region,
            entity_epoch,
            to_region_epoch: to.epoch,
            effective_tick,
            committed_at: req.now,
            outcome: TransferOutcome::Committed,
            error: String::new(),
        };
        self.next_transfer_id += 1;
        self.transfers_total += 1;
        self.entities.insert(req.entity, EntityAuthority { server: to_server, epoch: entity_epoch });
        self.transfers.push_back(record.clone());
        while self.transfers.len() > self.policy.transfer_log_len {
            self.transfers.pop_front();
        }
        events.push(Event::TransferCommitted(record.clone()));
        Ok(Response::Transfer(record))
    }

    fn complete_transfer(
        &mut self,
        id: u64,
        from: ServerId,
        delivered: bool,
        error: String,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        let rec = self
            .transfers
            .iter_mut()
            .rev()
            .find(|t| t.id == id && t.from == from)
            .ok_or(CommandError::UnknownTransfer(id))?;
        if rec.outcome == TransferOutcome::Committed {
            rec.outcome = if delivered { TransferOutcome::Delivered } else { TransferOutcome::Failed };
            rec.error = error;
            events.push(Event::TransferCompleted { id, outcome: rec.outcome });
        }
        Ok(Response::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glam::{DVec3, IVec3};

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000_000 * MS;

    fn state(nx: u32) -> CoordinatorState {
        CoordinatorState::new(Policy::default(), RegionTree::grid(IVec3::ZERO, nx, 1, 1), TickClock::new(T0))
    }

    fn register(s: &mut CoordinatorState, name: &str, now: u64) -> ServerId {
        let (r, _) = s.apply(Command::Register {
            name: name.into(),
            addresses: Addresses::default(),
            cert_sha256: String::new(),
            capacity_players: 100,
            version: "test".into(),
            now,
        });
        match r {
            Ok(Response::Registered { server }) => server,
            other => panic!("register failed: {other:?}"),
        }
    }

    fn owner(s: &CoordinatorState, k: RegionKey) -> Option<ServerId> {
        s.assignments()[&k].server
    }

    #[test]
    fn regions_wait_for_servers_then_spread() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        assert_eq!(owner(&s, RegionKey::root(0, 0, 0)), None, "one server, two regions: wait for grace");
        let b = register(&mut s, "b", T0 + 100 * MS);
        assert_eq!(owner(&s, RegionKey::root(0, 0, 0)), Some(a));
        assert_eq!(owner(&s, RegionKey::root(1, 0, 0)), Some(b));
        assert_ne!(s.assignments()[&RegionKey::root(0, 0, 0)].epoch, Epoch(0));
    }

    #[test]
    fn a_lone_server_takes_everything_after_the_grace() {
        let mut s = state(3);
        let a = register(&mut s, "a", T0);
        let _ = s.apply(Command::Heartbeat { server: a, load: Load::default(), now: T0 + 1_500 * MS });
        let _ = s.apply(Command::Tick { now: T0 + 2_999 * MS });
        assert!(s.assignments().values().all(|x| x.server.is_none()));
        let _ = s.apply(Command::Tick { now: T0 + 3_000 * MS });
        assert!(s.assignments().values().all(|x| x.server == Some(a)));
    }

    #[test]
    fn silent_servers_die_and_their_regions_move_with_new_epochs() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let r0 = RegionKey::root(0, 0, 0);
        let before = s.assignments()[&r0].epoch;
        let _ = s.apply(Command::Heartbeat { server: b, load: Load::default(), now: T0 + 1_900 * MS });
        let (_, ev) = s.apply(Command::Tick { now: T0 + 2_001 * MS });
        assert!(ev.contains(&Event::ServerDied { server: a, silent_ms: 2_001 }));
        assert_eq!(owner(&s, r0), Some(b));
        assert!(s.assignments()[&r0].epoch > before);
        // The dead server's next heartbeat fences it.
        let (r, _) = s.apply(Command::Heartbeat { server: a, load: Load::default(), now: T0 + 2_100 * MS });
        assert_eq!(r, Ok(Response::HeartbeatAck { fenced: true }));
    }

    fn transfer_req(s: &CoordinatorState, from: ServerId, entity_epoch: Epoch, now: u64) -> TransferRequest {
        let from_region = RegionKey::root(0, 0, 0);
        TransferRequest {
            entity: EntityId(7),
            from,
            from_region,
            from_region_epoch: s.assignments()[&from_region].epoch,
            entity_epoch,
            to_region: RegionKey::root(1, 0, 0),
            not_before_tick: 0,
            now,
        }
    }

    #[test]
    fn transfers_raise_the_entity_epoch_and_fence_the_old_holder() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let now = T0 + 1_000 * MS;
        let (r, ev) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), now)));
        let Ok(Response::Transfer(t)) = r else { panic!("transfer refused: {r:?}") };
        assert_eq!((t.from, t.to, t.entity_epoch), (a, b, Epoch(1)));
        assert_eq!(t.effective_tick, s.clock.tick_at(now) + Policy::default().handoff_lead_ticks);
        assert!(matches!(ev[0], Event::TransferCommitted(_)));
        assert_eq!(s.entity_authority(EntityId(7)), Some(EntityAuthority { server: b, epoch: Epoch(1) }));
        // Asking again with the old epoch is stale: the entity is b's now.
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), now)));
        assert_eq!(r.unwrap_err().reason(), "stale_epoch");
        let (r, _) = s.apply(Command::CompleteTransfer {
            transfer_id: t.id,
            from: a,
            delivered: true,
            error: String::new(),
            now,
        });
        assert_eq!(r, Ok(Response::Done));
        assert_eq!(s.transfers()[0].outcome, TransferOutcome::Delivered);
    }

    #[test]
    fn a_stale_region_epoch_is_refused() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        register(&mut s, "b", T0);
        let mut req = transfer_req(&s, a, Epoch(0), T0);
        req.from_region_epoch = Epoch(req.from_region_epoch.0 - 1);
        let (r, ev) = s.apply(Command::RequestTransfer(req));
        assert!(matches!(r, Err(CommandError::StaleRegionEpoch { .. })));
        assert!(ev.is_empty());
        assert_eq!(s.entity_authority(EntityId(7)), None);
    }

    #[test]
    fn owner_lookup_by_position() {
        let mut s = state(2);
        register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (leaf, rec) = s.owner_at(DVec3::new(2500.0, 10.0, 10.0)).unwrap();
        assert_eq!((leaf, rec.id), (RegionKey::root(1, 0, 0), b));
        assert!(s.owner_at(DVec3::new(-1.0, 10.0, 10.0)).is_none());
    }

    #[test]
    fn replaying_the_same_commands_gives_the_same_state() {
        let run = || {
            let mut s = state(4);
            let a = register(&mut s, "a", T0);
            register(&mut s, "b", T0 + MS);
            let _ = s.apply(Command::Tick { now: T0 + 4_000 * MS });
            let _ = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0 + 4_000 * MS)));
            let _ = s.apply(Command::Tick { now: T0 + 9_000 * MS });
            s
        };
        assert_eq!(run(), run());
    }
}
