//! The coordinator's decisions, as a deterministic state machine.
//!
//! Commands go in (each stamped with the time the leader proposed it), a
//! response and a list of events come out. No I/O, no clock reads, no
//! randomness: replaying the same commands on another replica yields the same
//! state, which is what the Raft log will do with it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use shared::region::{RegionKey, RegionTree};
use shared::{EntityId, Epoch, PlayerId, ServerId, Tick, TickClock};

mod directory;
mod format;
mod transfers;

pub use directory::{Directory, MAX_DIRECTORY, PlayerLocation};
pub use transfers::{MAX_IN_FLIGHT, Transfers};

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
/// The ranges [`Thresholds::validate`] keeps are in the schema.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Thresholds {
    /// A region splits when its owner has more players than this…
    #[schema(minimum = 1, maximum = 100_000)]
    pub split_players: u32,
    /// …or its owner's CPU (fraction of one core) is above this.
    #[schema(exclusive_minimum = 0, maximum = 64)]
    pub split_cpu: f32,
    /// Siblings merge when their players together are at most this
    /// (below `split_players / 2`)…
    #[schema(minimum = 0)]
    pub merge_players: u32,
    /// …and their owners' CPU is below this (below `split_cpu / 2`).
    #[schema(minimum = 0)]
    pub merge_cpu: f32,
    /// No split or merge of a region within this long of its last one.
    #[schema(minimum = 1_000, maximum = 86_400_000)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// How long the previous owner of a region that was moved away from it
/// (drain, move, merge) may still hand the entities it holds there to the
/// new owner, under its old epoch. A handoff takes about 100 ms; what is
/// still there after this is lost to the old owner (and counted there).
pub const RELEASE_MS: u64 = 5_000;

/// Region loads kept per report (a server holding more regions than this
/// reports its most crowded ones).
pub const MAX_REPORTED_REGIONS: usize = 4_096;

/// Of the split threshold, what a server may reach by taking a region from
/// an overloaded one (so relief does not overload the receiver).
const RELIEF_FILL: f32 = 0.75;

/// A region's previous owner, allowed to hand entities out of it until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub server: ServerId,
    pub epoch: Epoch,
    pub until: u64,
}

/// What the balancer remembers between its passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalancerMemory {
    /// Players per region, as each server last reported them.
    region_players: BTreeMap<ServerId, Vec<(RegionKey, u32)>>,
    /// When a region last split (key: the region) or merged (key: the
    /// parent): the balancer does not undo either within the cool-down.
    last_change: BTreeMap<RegionKey, u64>,
    /// When the balancer last changed a server's regions: it waits for a
    /// report that reflects the change before acting on that server again.
    acted: BTreeMap<ServerId, u64>,
}

/// Where a server can be reached (host:port strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Addresses {
    pub quic: String,
    pub grpc: String,
    pub http: String,
    pub metrics: String,
    pub query: String,
}

/// Load a server reports with its heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TransferOutcome {
    /// Committed; the source has not reported how the handoff went.
    Committed,
    Delivered,
    Failed,
    /// The handoff could not be delivered (the target died or refused) and
    /// the source took the entity back under a new epoch.
    Returned,
    /// The source died before it reported a delivery: the target resumes
    /// the entity from its ghost of it (it is told in its heartbeats).
    Orphaned,
    /// The target resumed an orphaned transfer's entity from its ghost.
    Adopted,
    /// The target had nothing to resume an orphaned transfer's entity from.
    Lost,
}

/// How a region key is written in JSON records (the schema of
/// [`RegionKey`], which `shared` keeps free of the API's crates): a cube of
/// the octree at `level`, cell `x, y, z`.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // a schema, never built
pub struct RegionCell {
    pub level: u8,
    pub x: i32,
    pub y: i32,
    pub z: i32,
}

/// One authority transfer as the log keeps it (`GET /v1/transfers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Transfer)]
pub struct TransferRecord {
    pub id: u64,
    #[schema(value_type = u64)]
    pub entity: EntityId,
    #[schema(value_type = u32)]
    pub from: ServerId,
    #[schema(value_type = u32)]
    pub to: ServerId,
    #[schema(value_type = RegionCell)]
    pub from_region: RegionKey,
    #[schema(value_type = RegionCell)]
    pub to_region: RegionKey,
    #[schema(value_type = u64)]
    pub entity_epoch: Epoch,
    #[schema(value_type = u64)]
    pub to_region_epoch: Epoch,
    /// The mesh tick the new owner simulates from.
    #[schema(value_type = u64)]
    pub effective_tick: Tick,
    /// Unix ns.
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
    /// An operator moves a leaf region to another live server.
    MoveRegion {
        region: RegionKey,
        to: ServerId,
        now: u64,
    },
    /// An operator splits a leaf region into its 8 children, which stay with
    /// the region's owner (new epochs) until moved.
    SplitRegion {
        region: RegionKey,
        now: u64,
    },
    /// An operator merges the 8 leaf children of `region` back into it; the
    /// owner of most children (then the lowest id) takes it.
    MergeRegion {
        region: RegionKey,
        now: u64,
    },
    /// Moves every region of a server to others and gives it no more, so it
    /// can be stopped without dropping anyone. `undo` takes it back into
    /// placement (its regions stay where they went).
    Drain {
        server: ServerId,
        undo: bool,
        now: u64,
    },
    /// A player's avatar appeared on (`online`) or left a server.
    Presence {
        server: ServerId,
        player: PlayerId,
        entity: EntityId,
        online: bool,
        now: u64,
    },
    /// A heartbeat with the players per region (what game servers send;
    /// `Heartbeat` stays for entries already in logs).
    Report {
        server: ServerId,
        load: Load,
        regions: Vec<(RegionKey, u32)>,
        now: u64,
    },
    /// The source of a committed transfer could not deliver it (the target
    /// died, or refused it): it takes the entity back under a new epoch.
    ReclaimTransfer {
        transfer_id: u64,
        from: ServerId,
        error: String,
        now: u64,
    },
    /// The target of an orphaned transfer resumed its entity from its ghost
    /// (`adopted`), or had nothing to resume it from.
    ResolveOrphan {
        transfer_id: u64,
        server: ServerId,
        adopted: bool,
        now: u64,
    },
    // Variants are only ever appended: a log entry names its variant by
    // index.
    /// `Register` with the server's component schema (what game servers of
    /// this release send; `Register` stays for entries already in logs).
    RegisterWithSchema {
        name: String,
        addresses: Addresses,
        cert_sha256: String,
        capacity_players: u32,
        version: String,
        schema: shared::component::Schema,
        now: u64,
    },
    /// `RequestTransfer` naming the components the entity carries, as its
    /// source knows them: refused if the target's schema lacks one.
    RequestTransferOf {
        request: TransferRequest,
        components: Vec<shared::component::SchemaEntry>,
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
            Command::RequestTransfer(_) | Command::RequestTransferOf { .. } => "request_transfer",
            Command::RegisterWithSchema { .. } => "register",
            Command::CompleteTransfer { .. } => "complete_transfer",
            Command::NewLeader { .. } => "new_leader",
            Command::SetThresholds { .. } => "set_thresholds",
            Command::MoveRegion { .. } => "move_region",
            Command::SplitRegion { .. } => "split_region",
            Command::MergeRegion { .. } => "merge_region",
            Command::Drain { undo: false, .. } => "drain",
            Command::Drain { undo: true, .. } => "undrain",
            Command::Report { .. } => "heartbeat",
            Command::Presence { .. } => "presence",
            Command::ReclaimTransfer { .. } => "reclaim_transfer",
            Command::ResolveOrphan { .. } => "resolve_orphan",
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
    Registered {
        server: ServerId,
    },
    HeartbeatAck {
        fenced: bool,
    },
    Transfer(TransferRecord),
    /// The entity is the reclaiming source's again, under this epoch.
    Reclaimed {
        entity_epoch: Epoch,
    },
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
    #[error("server {0} is draining and takes no regions")]
    Draining(ServerId),
    #[error("server {0} is the last live server that takes regions; draining it would leave its regions without owner")]
    LastServer(ServerId),
    #[error("region {0} is {edge} m, the smallest size; it cannot split", edge = .0.edge())]
    TooSmall(RegionKey),
    #[error("region {0} cannot merge: {1}")]
    NotMergeable(RegionKey, String),
    #[error("the player directory is full ({MAX_DIRECTORY} players)")]
    DirectoryFull,
    #[error("{0} transfers are in flight, the most the coordinator keeps; ask again later")]
    TooManyTransfers(usize),
    #[error("entity {entity} cannot go to server {server}: {detail}")]
    SchemaMismatch { entity: EntityId, server: ServerId, detail: String },
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
            CommandError::Draining(_) => "draining",
            CommandError::LastServer(_) => "last_server",
            CommandError::TooSmall(_) => "too_small",
            CommandError::NotMergeable(..) => "not_mergeable",
            CommandError::DirectoryFull => "directory_full",
            CommandError::TooManyTransfers(_) => "transfers_full",
            CommandError::SchemaMismatch { .. } => "schema_mismatch",
            CommandError::Unavailable(_) => "unavailable",
        }
    }
}

/// What a command changed, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ServerRegistered {
        server: ServerId,
        name: String,
    },
    ServerDied {
        server: ServerId,
        silent_ms: u64,
    },
    RegionAssigned {
        region: RegionKey,
        server: Option<ServerId>,
        previous: Option<ServerId>,
        epoch: Epoch,
    },
    TransferCommitted(TransferRecord),
    TransferCompleted {
        id: u64,
        outcome: TransferOutcome,
    },
    Bootstrapped {
        restored: bool,
    },
    RegionSplit {
        region: RegionKey,
    },
    RegionsMerged {
        region: RegionKey,
    },
    /// The balancer moved a region off an overloaded server.
    RegionRebalanced {
        region: RegionKey,
        from: ServerId,
        to: ServerId,
        players: u32,
    },
    ServerDraining {
        server: ServerId,
        draining: bool,
    },
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
    /// Who holds each entity that ever changed servers, under which
    /// epoch. Changed only together with `transfers` (a commit, a reclaim,
    /// an orphan lost) and by a holder's death or a player's leave.
    entities: BTreeMap<EntityId, EntityAuthority>,
    transfers: Transfers,
    /// Follows `entities` for avatars: a commit, a reclaim or a lost orphan
    /// moves a player where its avatar went.
    directory: Directory,
    audit: VecDeque<AuditRecord>,
    audit_total: u64,
    next_server_id: u32,
    next_epoch: u64,
    map_version: u64,
    first_registration: Option<u64>,
    /// Servers an operator drained: they take no regions.
    drained: BTreeSet<ServerId>,
    /// Regions moved away whose previous owner may still hand out what it
    /// holds there.
    releases: BTreeMap<RegionKey, Release>,
    balancer: BalancerMemory,
    /// The component schema each live server registered with (servers of
    /// a build that sends none have none here and are not checked): a
    /// transfer of an entity carrying a component its target does not know
    /// alike is refused before it is committed. Written after the rest of
    /// the state (format 5, see [`format`]).
    #[serde(skip)]
    schemas: BTreeMap<ServerId, shared::component::Schema>,
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
            transfers: Transfers::default(),
            directory: Directory::default(),
            audit: VecDeque::new(),
            audit_total: 0,
            next_server_id: 1,
            next_epoch: 1,
            map_version: 1,
            first_registration: None,
            drained: BTreeSet::new(),
            releases: BTreeMap::new(),
            balancer: BalancerMemory::default(),
            schemas: BTreeMap::new(),
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

    /// The component schema a live server registered with, if it sent one.
    pub fn schema_of(&self, id: ServerId) -> Option<&shared::component::Schema> {
        self.schemas.get(&id)
    }

    pub fn entity_authority(&self, e: EntityId) -> Option<EntityAuthority> {
        self.entities.get(&e).copied()
    }

    /// The transfers in flight and the most recent ended ones.
    pub fn transfers(&self) -> &Transfers {
        &self.transfers
    }

    pub fn transfers_total(&self) -> u64 {
        self.transfers.total()
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

    /// Whether an operator drained the server (it takes no regions).
    pub fn is_draining(&self, server: ServerId) -> bool {
        self.drained.contains(&server)
    }

    /// Where the directory says the player's avatar is simulated.
    pub fn player_location(&self, player: PlayerId) -> Option<PlayerLocation> {
        self.directory.get(player)
    }

    /// Players in the directory.
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// Players per region, as `server` last reported them.
    pub fn region_players(&self, server: ServerId) -> &[(RegionKey, u32)] {
        self.balancer.region_players.get(&server).map_or(&[], Vec::as_slice)
    }

    /// Regions whose previous owner may still hand entities out of them.
    pub fn releases(&self) -> &BTreeMap<RegionKey, Release> {
        &self.releases
    }

    /// Whether a leader has bootstrapped the mesh (fixed its tick grid).
    pub fn is_bootstrapped(&self) -> bool {
        self.clock.epoch_unix_nanos != 0
    }

    /// The state as bytes: a format byte, then bincode. Raft snapshots and
    /// the database's topology snapshot both use it; see [`format`] for the
    /// formats this build reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        format::encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<CoordinatorState, String> {
        format::decode(bytes)
    }

    pub fn apply(&mut self, cmd: Command) -> (Result<Response, CommandError>, Vec<Event>) {
        let mut events = Vec::new();
        if !self.is_bootstrapped() && !matches!(cmd, Command::NewLeader { .. } | Command::Tick { .. }) {
            return (Err(CommandError::NotBootstrapped), events);
        }
        let result = match cmd {
            Command::Register { name, addresses, cert_sha256, capacity_players, version, now } => {
                self.register(name, addresses, cert_sha256, capacity_players, version, None, now, &mut events)
            }
            Command::RegisterWithSchema { name, addresses, cert_sha256, capacity_players, version, schema, now } => {
                self.register(name, addresses, cert_sha256, capacity_players, version, Some(schema), now, &mut events)
            }
            Command::Heartbeat { server, load, now } => self.heartbeat(server, load, now),
            Command::Report { server, load, mut regions, now } => {
                let r = self.heartbeat(server, load, now);
                if matches!(r, Ok(Response::HeartbeatAck { fenced: false })) {
                    regions.truncate(MAX_REPORTED_REGIONS);
                    self.balancer.region_players.insert(server, regions);
                }
                r
            }
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
                self.releases.retain(|_, r| r.until > now);
                self.detect_failures(now, &mut events);
                self.place_unowned(now, &mut events);
                self.balance(now, &mut events);
                Ok(Response::Done)
            }
            Command::MoveRegion { region, to, now } => self.move_region(region, to, now, &mut events),
            Command::Presence { server, player, entity, online, now } => {
                self.presence(server, player, entity, online, now)
            }
            Command::SplitRegion { region, now } => self.split_region(region, now, &mut events),
            Command::MergeRegion { region, now } => self.merge_region(region, now, &mut events),
            Command::Drain { server, undo, now } => self.drain(server, undo, now, &mut events),
            Command::RequestTransfer(req) => self.request_transfer(req, &[], &mut events),
            Command::RequestTransferOf { request, components } => {
                self.request_transfer(request, &components, &mut events)
            }
            Command::CompleteTransfer { transfer_id, from, delivered, error, now: _ } => {
                self.complete_transfer(transfer_id, from, delivered, error, &mut events)
            }
            Command::ReclaimTransfer { transfer_id, from, error, now } => {
                self.reclaim_transfer(transfer_id, from, error, now, &mut events)
            }
            Command::ResolveOrphan { transfer_id, server, adopted, now: _ } => {
                self.resolve_orphan(transfer_id, server, adopted, &mut events)
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
        schema: Option<shared::component::Schema>,
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
        if let Some(schema) = schema {
            self.schemas.insert(id, schema);
        }
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
            self.schemas.remove(&id);
            events.push(Event::ServerDied { server: id, silent_ms: silent / 1_000_000 });
            let orphaned: Vec<RegionKey> = self.regions_of(id).map(|(k, _)| *k).collect();
            for region in orphaned {
                let to = self.choose_owner(&region, Some(id));
                self.assign(region, to, events);
            }
            // Authority over the dead server's entities is void; whoever
            // resumes them (from persistence) starts a new record.
            self.entities.retain(|_, a| a.server != id);
            // Transfers it committed but never reported delivered: the
            // target resumes the entity from its ghost. Those it reported
            // undelivered it can no longer take back, and orphans it was
            // to resume it never will: nobody has those entities.
            let ends: Vec<(u64, TransferOutcome)> = self
                .transfers
                .in_flight()
                .filter_map(|t| match t.outcome {
                    TransferOutcome::Committed if t.from == id => Some((t.id, TransferOutcome::Orphaned)),
                    TransferOutcome::Failed if t.from == id => Some((t.id, TransferOutcome::Lost)),
                    TransferOutcome::Orphaned if t.to == id => Some((t.id, TransferOutcome::Lost)),
                    _ => None,
                })
                .collect();
            for (t, outcome) in ends {
                self.transfers.set_outcome(t, outcome, None, self.policy.transfer_log_len);
                events.push(Event::TransferCompleted { id: t, outcome });
            }
            self.directory.drop_server(id);
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
            .filter(|s| s.alive && Some(s.id) != exclude && !self.drained.contains(&s.id))
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

    fn request_transfer(
        &mut self,
        req: TransferRequest,
        components: &[shared::component::SchemaEntry],
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        self.live_server(req.from)?;
        // The owner hands entities out of its region; a previous owner out of
        // a region moved away from it (or merged), under its old epoch (or an
        // older one: that of the parent it held before a split it learnt of
        // together with the move), while its release lasts.
        let released = self
            .releases
            .get(&req.from_region)
            .is_some_and(|r| r.server == req.from && req.from_region_epoch <= r.epoch && req.now < r.until);
        if !released {
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
        }
        let held = self.entities.get(&req.entity).copied();
        let (holder, current) = held.map_or((req.from, Epoch(0)), |a| (a.server, a.epoch));
        // The same request again (its answer was lost with a leader that
        // died after committing it): the same transfer, not a refusal that
        // would leave the source holding what the log gave away.
        if let Some(t) = self.transfers.in_flight().find(|t| {
            t.entity == req.entity
                && t.from == req.from
                && t.entity_epoch == req.entity_epoch.next()
                && t.outcome == TransferOutcome::Committed
                && holder == t.to
                && current == t.entity_epoch
        }) {
            return Ok(Response::Transfer(t.clone()));
        }
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
        // A rolling upgrade: the target must read every component of the
        // entity as its source writes it, or the handoff would be refused
        // on arrival, after the commit.
        if let Some(theirs) = self.schemas.get(&to_server)
            && let Some(c) = components.iter().find(|c| !theirs.0.contains(c))
        {
            return Err(CommandError::SchemaMismatch {
                entity: req.entity,
                server: to_server,
                detail: match theirs.0.iter().find(|e| e.id == c.id) {
                    Some(e) => {
                        format!("component {} is {} v{} there, {} v{} here", c.id, e.name, e.version, c.name, c.version)
                    }
                    None => format!("component {} ({} v{}) is unknown there", c.id, c.name, c.version),
                },
            });
        }
        let entity_epoch = current.next();
        let effective_tick = (self.clock.tick_at(req.now) + self.policy.handoff_lead_ticks).max(req.not_before_tick);
        let record = self.transfers.commit(|id| TransferRecord {
            id,
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
        })?;
        self.entities.insert(req.entity, EntityAuthority { server: to_server, epoch: entity_epoch });
        self.directory.follow(req.entity, to_server, req.now);
        events.push(Event::TransferCommitted(record.clone()));
        Ok(Response::Transfer(record))
    }

    fn presence(
        &mut self,
        server: ServerId,
        player: PlayerId,
        entity: EntityId,
        online: bool,
        now: u64,
    ) -> Result<Response, CommandError> {
        self.live_server(server)?;
        if online {
            self.directory.join(player, entity, server, now)?;
        } else {
            self.directory.leave(player, entity, server);
            // The avatar is gone from its holder: the player's next session
            // starts a new one at epoch 0, which an old record would fence.
            if self.entities.get(&entity).is_some_and(|a| a.server == server) {
                self.entities.remove(&entity);
            }
        }
        Ok(Response::Done)
    }

    /// Gives a leaf to `to` under a new epoch; a live previous owner keeps a
    /// release on it so it can hand over the entities it holds there.
    fn hand_over(&mut self, region: RegionKey, to: ServerId, now: u64, events: &mut Vec<Event>) {
        if let Some(prev) = self.assignments.get(&region).copied()
            && let Some(from) = prev.server
            && from != to
            && self.servers.get(&from).is_some_and(|s| s.alive)
        {
            self.releases
                .insert(region, Release { server: from, epoch: prev.epoch, until: now + RELEASE_MS * 1_000_000 });
        }
        self.assign(region, Some(to), events);
    }

    /// A live server that takes regions.
    fn placeable(&self, id: ServerId) -> Result<(), CommandError> {
        self.live_server(id)?;
        if self.drained.contains(&id) {
            return Err(CommandError::Draining(id));
        }
        Ok(())
    }

    fn move_region(
        &mut self,
        region: RegionKey,
        to: ServerId,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        let current = self.assignments.get(&region).ok_or(CommandError::UnknownRegion(region))?;
        self.placeable(to)?;
        if current.server == Some(to) {
            return Err(CommandError::SameServer(region));
        }
        self.hand_over(region, to, now, events);
        self.audit("move_region", format!(r#"{{"region":"{region}","to":{}}}"#, to.0), now);
        Ok(Response::Done)
    }

    fn split_region(&mut self, region: RegionKey, now: u64, events: &mut Vec<Event>) -> Result<Response, CommandError> {
        self.split_leaf(region, now, events)?;
        self.audit("split_region", format!(r#"{{"region":"{region}"}}"#), now);
        Ok(Response::Done)
    }

    /// Splits a leaf; its children keep its owner under new epochs.
    fn split_leaf(&mut self, region: RegionKey, now: u64, events: &mut Vec<Event>) -> Result<(), CommandError> {
        let parent = *self.assignments.get(&region).ok_or(CommandError::UnknownRegion(region))?;
        if region.level >= shared::region::MAX_LEVEL {
            return Err(CommandError::TooSmall(region));
        }
        let children = self.tree.split(region).map_err(|_| CommandError::UnknownRegion(region))?;
        self.assignments.remove(&region);
        // A release on the parent covers the entities in its children too: the
        // previous owner still names the parent and its old epoch.
        for child in children {
            self.assign(child, parent.server, events);
        }
        self.balancer.last_change.insert(region, now);
        events.push(Event::RegionSplit { region });
        Ok(())
    }

    fn merge_region(&mut self, region: RegionKey, now: u64, events: &mut Vec<Event>) -> Result<Response, CommandError> {
        self.merge_children(region, now, events)?;
        self.audit("merge_region", format!(r#"{{"region":"{region}"}}"#), now);
        Ok(Response::Done)
    }

    /// Merges the 8 leaf children of `region`; the owner of most takes it.
    fn merge_children(&mut self, region: RegionKey, now: u64, events: &mut Vec<Event>) -> Result<(), CommandError> {
        if !self.tree.is_split(&region) {
            let why = if self.tree.is_leaf(&region) { "it is not split" } else { "it is not in the region map" };
            return Err(CommandError::NotMergeable(region, why.into()));
        }
        let children = region.children().map_err(|e| CommandError::NotMergeable(region, e.to_string()))?;
        if let Some(c) = children.iter().find(|c| !self.tree.is_leaf(c)) {
            return Err(CommandError::NotMergeable(region, format!("its child {c} is split; merge it first")));
        }
        let mut count: BTreeMap<ServerId, usize> = BTreeMap::new();
        for c in &children {
            if let Some(s) = self.assignments.get(c).and_then(|a| a.server)
                && self.servers.get(&s).is_some_and(|r| r.alive)
            {
                *count.entry(s).or_default() += 1;
            }
        }
        let owner = count.iter().max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id))).map(|(id, _)| *id);
        self.tree.merge(region).map_err(|e| CommandError::NotMergeable(region, e.to_string()))?;
        for c in &children {
            if let Some(a) = self.assignments.remove(c)
                && let Some(from) = a.server
                && Some(from) != owner
                && self.servers.get(&from).is_some_and(|s| s.alive)
            {
                self.releases.insert(*c, Release { server: from, epoch: a.epoch, until: now + RELEASE_MS * 1_000_000 });
            }
        }
        let owner = owner.or_else(|| self.choose_owner(&region, None));
        self.assign(region, owner, events);
        self.balancer.last_change.insert(region, now);
        events.push(Event::RegionsMerged { region });
        Ok(())
    }

    /// Players in a leaf, as its owner last reported them.
    fn leaf_players(&self, leaf: &RegionKey) -> u32 {
        let Some(owner) = self.assignments.get(leaf).and_then(|a| a.server) else { return 0 };
        self.balancer.region_players.get(&owner).and_then(|r| r.iter().find(|(k, _)| k == leaf)).map_or(0, |(_, n)| *n)
    }

    fn cooled(&self, key: &RegionKey, now: u64) -> bool {
        self.balancer
            .last_change
            .get(key)
            .is_none_or(|t| now.saturating_sub(*t) >= self.thresholds.cooldown_ms * 1_000_000)
    }

    /// The load balancer, run on every tick. An overloaded server (more
    /// players than `split_players`, or CPU above `split_cpu`) first sheds
    /// its most crowded region that another server can take without passing
    /// three quarters of the threshold (a neighbour first, then the least
    /// loaded); if none can, its most crowded region splits (to 500 m at
    /// least), so the next report shows where its players are. Siblings
    /// whose players together are at most `merge_players`, on owners below
    /// `merge_cpu`, merge. A split is not undone by a merge (nor a merge by
    /// a split) within `cooldown_ms`, and a server is not acted on again
    /// before a report after the last change to it.
    fn balance(&mut self, now: u64, events: &mut Vec<Event>) {
        let t = self.thresholds;
        let spacing = 2 * self.policy.heartbeat_interval_ms * 1_000_000;
        let fresh = |s: &Self, id: ServerId| {
            let heard = s.servers.get(&id).map_or(0, |r| r.last_heartbeat);
            s.balancer.acted.get(&id).is_none_or(|at| heard >= at.saturating_add(spacing))
        };
        let overloaded: Vec<ServerId> = self
            .servers
            .values()
            .filter(|r| r.alive && !self.drained.contains(&r.id))
            .filter(|r| r.load.players > t.split_players || r.load.cpu > t.split_cpu)
            .map(|r| r.id)
            .collect();
        for from in overloaded {
            if !fresh(self, from) {
                continue;
            }
            let mut leaves: Vec<(RegionKey, u32)> =
                self.regions_of(from).map(|(k, _)| (*k, self.leaf_players(k))).filter(|(_, n)| *n > 0).collect();
            leaves.sort_by_key(|(k, n)| (std::cmp::Reverse(*n), *k));
            let owned = self.regions_of(from).count();
            let shed = leaves
                .iter()
                .filter(|_| owned >= 2)
                .find_map(|(k, n)| self.relief_target(k, *n, from).map(|to| (*k, *n, to)));
            if let Some((region, players, to)) = shed {
                self.hand_over(region, to, now, events);
                events.push(Event::RegionRebalanced { region, from, to, players });
                self.balancer.acted.insert(from, now);
                self.balancer.acted.insert(to, now);
                continue;
            }
            let splittable =
                leaves.iter().map(|(k, _)| *k).find(|k| k.level < shared::region::MAX_LEVEL && self.cooled(k, now));
            if let Some(region) = splittable
                && self.split_leaf(region, now, events).is_ok()
            {
                self.balancer.acted.insert(from, now);
            }
        }
        let parents: Vec<RegionKey> = self
            .assignments
            .keys()
            .filter_map(|k| k.parent())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|p| p.children().is_ok_and(|c| c.iter().all(|k| self.tree.is_leaf(k))))
            .collect();
        for parent in parents {
            let Ok(children) = parent.children() else { continue };
            let quiet = children.iter().all(|c| {
                let owner = self.assignments.get(c).and_then(|a| a.server);
                owner.is_none_or(|o| self.servers.get(&o).is_none_or(|r| !r.alive || r.load.cpu < t.merge_cpu))
            });
            let players: u32 = children.iter().map(|c| self.leaf_players(c)).sum();
            if quiet && players <= t.merge_players && self.cooled(&parent, now) {
                let _ = self.merge_children(parent, now, events);
            }
        }
    }

    /// Who takes `region` (with `players`) off `from`: a live server that
    /// takes regions and stays within three quarters of the thresholds with
    /// it; one owning a neighbour first, then the fewest players, then the
    /// lowest id.
    fn relief_target(&self, region: &RegionKey, players: u32, from: ServerId) -> Option<ServerId> {
        let t = self.thresholds;
        let room = (t.split_players as f32 * RELIEF_FILL) as u32;
        let neighbours: Vec<RegionKey> =
            self.tree.neighbours(region).map(|n| n.into_iter().map(|(k, _)| k).collect()).unwrap_or_default();
        self.servers
            .values()
            .filter(|s| s.alive && s.id != from && !self.drained.contains(&s.id))
            .filter(|s| s.load.players + players <= room && s.load.cpu < t.split_cpu * RELIEF_FILL)
            .filter(|s| s.capacity_players == 0 || s.load.players + players <= s.capacity_players)
            .min_by_key(|s| {
                let adjacent =
                    neighbours.iter().any(|n| self.assignments.get(n).is_some_and(|a| a.server == Some(s.id)));
                (!adjacent, s.load.players, s.id)
            })
            .map(|s| s.id)
    }

    /// Game servers the mesh should run for its players: enough that each
    /// stays within three quarters of the split threshold, one more when
    /// every live server is above the CPU threshold, and never fewer than
    /// one. Exported for the autoscaler.
    pub fn desired_game_servers(&self) -> u32 {
        let t = self.thresholds;
        let live: Vec<&ServerRecord> = self.servers.values().filter(|s| s.alive).collect();
        let players: u32 = live.iter().map(|s| s.load.players).sum();
        let per = ((t.split_players as f32 * RELIEF_FILL) as u32).max(1);
        let by_players = players.div_ceil(per);
        let hot = !live.is_empty() && live.iter().all(|s| s.load.cpu > t.split_cpu);
        let serving = live.iter().filter(|s| !self.drained.contains(&s.id)).count() as u32;
        by_players.max(if hot { serving + 1 } else { 0 }).max(1)
    }

    fn drain(
        &mut self,
        server: ServerId,
        undo: bool,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        if undo {
            self.servers.get(&server).ok_or(CommandError::UnknownServer(server))?;
            if self.drained.remove(&server) {
                events.push(Event::ServerDraining { server, draining: false });
                self.audit("undrain", format!(r#"{{"server":{}}}"#, server.0), now);
            }
            return Ok(Response::Done);
        }
        self.live_server(server)?;
        if self.drained.contains(&server) {
            return Ok(Response::Done);
        }
        let others = self.servers.values().any(|s| s.alive && s.id != server && !self.drained.contains(&s.id));
        if !others {
            return Err(CommandError::LastServer(server));
        }
        self.drained.insert(server);
        let regions: Vec<RegionKey> = self.regions_of(server).map(|(k, _)| *k).collect();
        for region in regions {
            if let Some(to) = self.choose_owner(&region, Some(server)) {
                self.hand_over(region, to, now, events);
            }
        }
        events.push(Event::ServerDraining { server, draining: true });
        self.audit("drain", format!(r#"{{"server":{}}}"#, server.0), now);
        Ok(Response::Done)
    }

    /// The transfer `id`, in flight or recently ended, if `ok` says the
    /// caller may act on it.
    fn transfer(&self, id: u64, ok: impl Fn(&TransferRecord) -> bool) -> Result<&TransferRecord, CommandError> {
        self.transfers.get(id).filter(|t| ok(t)).ok_or(CommandError::UnknownTransfer(id))
    }

    fn end_transfer(&mut self, id: u64, outcome: TransferOutcome, error: Option<String>, events: &mut Vec<Event>) {
        if self.transfers.set_outcome(id, outcome, error, self.policy.transfer_log_len) {
            events.push(Event::TransferCompleted { id, outcome });
        }
    }

    fn complete_transfer(
        &mut self,
        id: u64,
        from: ServerId,
        delivered: bool,
        error: String,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        let rec = self.transfer(id, |t| t.from == from)?;
        if rec.outcome == TransferOutcome::Committed {
            let outcome = if delivered { TransferOutcome::Delivered } else { TransferOutcome::Failed };
            self.end_transfer(id, outcome, Some(error), events);
        }
        Ok(Response::Done)
    }

    /// The source takes back an entity whose handoff it could not deliver:
    /// allowed while the log still has the entity with the target under the
    /// transfer's epoch (or with nobody, the target having died).
    fn reclaim_transfer(
        &mut self,
        id: u64,
        from: ServerId,
        error: String,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        self.live_server(from)?;
        let rec = self.transfer(id, |t| t.from == from)?.clone();
        let held = self.entities.get(&rec.entity).copied();
        let untouched = match held {
            Some(a) => a.server == rec.to && a.epoch == rec.entity_epoch,
            None => !self.servers.get(&rec.to).is_some_and(|s| s.alive),
        };
        if !matches!(rec.outcome, TransferOutcome::Committed | TransferOutcome::Failed) || !untouched {
            let (holder, current) = held.map_or((rec.to, rec.entity_epoch), |a| (a.server, a.epoch));
            return Err(CommandError::StaleEntityEpoch {
                entity: rec.entity,
                server: from,
                claimed: rec.entity_epoch,
                holder,
                current,
            });
        }
        let entity_epoch = rec.entity_epoch.next();
        self.entities.insert(rec.entity, EntityAuthority { server: from, epoch: entity_epoch });
        // A player's directory entry follows (the target's death dropped it).
        self.directory.reclaimed(rec.entity, from, now);
        self.end_transfer(id, TransferOutcome::Returned, Some(error), events);
        Ok(Response::Reclaimed { entity_epoch })
    }

    /// Transfers to `server` whose source died before delivering them.
    pub fn orphans_for(&self, server: ServerId) -> impl Iterator<Item = &TransferRecord> {
        self.transfers.in_flight().filter(move |t| t.to == server && t.outcome == TransferOutcome::Orphaned)
    }

    fn resolve_orphan(
        &mut self,
        id: u64,
        server: ServerId,
        adopted: bool,
        events: &mut Vec<Event>,
    ) -> Result<Response, CommandError> {
        let entity = self.transfer(id, |t| t.to == server && t.outcome == TransferOutcome::Orphaned)?.entity;
        let outcome = if adopted { TransferOutcome::Adopted } else { TransferOutcome::Lost };
        if !adopted {
            self.entities.remove(&entity);
            self.directory.drop_avatar(entity);
        }
        self.end_transfer(id, outcome, None, events);
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
    fn a_transfer_to_a_server_that_lacks_a_component_of_the_entity_is_refused_before_it_is_committed() {
        use shared::component::{Schema, SchemaEntry};
        let entry = |id, name: &str, version| SchemaEntry { id, name: name.into(), version };
        let kind = entry(2, "kind", 1);
        let banner = entry(1003, "banner", 1);
        let mut s = state(2);
        let register_with = |s: &mut CoordinatorState, name: &str, schema: Vec<SchemaEntry>| {
            let (r, _) = s.apply(Command::RegisterWithSchema {
                name: name.into(),
                addresses: Addresses::default(),
                cert_sha256: String::new(),
                capacity_players: 100,
                version: "test".into(),
                schema: Schema(schema),
                now: T0,
            });
            let Ok(Response::Registered { server }) = r else { panic!("{r:?}") };
            server
        };
        let a = register_with(&mut s, "new", vec![kind.clone(), banner.clone()]);
        let b = register_with(&mut s, "old", vec![kind.clone()]);
        assert_eq!(s.schema_of(b).map(|x| x.0.len()), Some(1));
        let now = T0 + 1_000 * MS;
        let ask = |s: &CoordinatorState, components: Vec<SchemaEntry>| Command::RequestTransferOf {
            request: transfer_req(s, a, Epoch(0), now),
            components,
        };
        // The entity carries a banner, which b does not know: refused,
        // nothing committed, the entity still a's.
        let (r, ev) = s.apply(ask(&s, vec![kind.clone(), banner.clone()]));
        let err = r.unwrap_err();
        assert_eq!(err.reason(), "schema_mismatch");
        assert!(err.to_string().contains("component 1003 (banner v1) is unknown there"), "{err}");
        assert!(ev.is_empty());
        assert_eq!(s.transfers().total(), 0);
        assert_eq!(s.entity_authority(EntityId(7)), None);
        // Known under another version: refused too, saying both.
        let (r, _) = s.apply(ask(&s, vec![entry(2, "kind", 2)]));
        assert!(r.unwrap_err().to_string().contains("is kind v1 there, kind v2 here"));
        // Without the banner it goes; so does a request of a build that
        // names no components.
        let (r, _) = s.apply(ask(&s, vec![kind.clone()]));
        let Ok(Response::Transfer(t)) = r else { panic!("{r:?}") };
        assert_eq!(t.to, b);
        // A server that registered without a schema is not checked.
        let c = register(&mut s, "older", T0);
        assert!(s.schema_of(c).is_none());
        // Declared dead, a server's schema is forgotten.
        let (_, ev) = s.apply(Command::Tick { now: T0 + 60_000 * MS });
        assert!(ev.iter().any(|e| matches!(e, Event::ServerDied { server, .. } if *server == b)));
        assert!(s.schema_of(b).is_none());
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
        // The same request again (its answer lost with a leader): the same
        // transfer, nothing new committed.
        let (r, ev) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), now + 5 * MS)));
        assert_eq!(r, Ok(Response::Transfer(t.clone())));
        assert!(ev.is_empty());
        assert_eq!(s.transfers().recent().len(), 1);
        // Another server with the old epoch is stale: the entity is b's now.
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, b, Epoch(0), now)));
        assert_eq!(r.unwrap_err().reason(), "stale_epoch");
        let (r, _) = s.apply(Command::CompleteTransfer {
            transfer_id: t.id,
            from: a,
            delivered: true,
            error: String::new(),
            now,
        });
        assert_eq!(r, Ok(Response::Done));
        assert_eq!(s.transfers().recent()[0].outcome, TransferOutcome::Delivered);
        // Delivered: asking again is stale, not the old transfer.
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), now)));
        assert_eq!(r.unwrap_err().reason(), "stale_epoch");
    }

    fn beat(s: &mut CoordinatorState, server: ServerId, now: u64) {
        let _ = s.apply(Command::Heartbeat { server, load: Load::default(), now });
    }

    #[test]
    fn a_player_who_leaves_and_comes_back_can_be_handed_over_again() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0)));
        assert!(matches!(r, Ok(Response::Transfer(_))), "{r:?}");
        assert_eq!(s.entity_authority(EntityId(7)).map(|e| (e.server, e.epoch)), Some((b, Epoch(1))));
        // It leaves b; a leave from a server that does not hold it changes nothing.
        let leave = |s: &mut CoordinatorState, server| {
            s.apply(Command::Presence { server, player: PlayerId(7), entity: EntityId(7), online: false, now: T0 }).0
        };
        assert_eq!(leave(&mut s, a), Ok(Response::Done));
        assert!(s.entity_authority(EntityId(7)).is_some());
        assert_eq!(leave(&mut s, b), Ok(Response::Done));
        assert_eq!(s.entity_authority(EntityId(7)), None);
        // Back on a, a new avatar at epoch 0 is handed over as any other.
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0 + MS)));
        assert!(matches!(r, Ok(Response::Transfer(ref t)) if t.to == b), "{r:?}");
    }

    #[test]
    fn a_source_takes_back_what_a_dead_target_never_got() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0 + 100 * MS)));
        let Ok(Response::Transfer(t)) = r else { panic!("{r:?}") };
        // b dies before the state reaches it: a keeps beating, b does not.
        let mut now = T0 + 100 * MS;
        while s.server(b).is_some_and(|r| r.alive) {
            now += 500 * MS;
            beat(&mut s, a, now);
            let _ = s.apply(Command::Tick { now });
        }
        let reclaim = |s: &mut CoordinatorState, from| {
            s.apply(Command::ReclaimTransfer { transfer_id: t.id, from, error: "target died".into(), now }).0
        };
        // Only the transfer's source may take it back.
        assert!(matches!(reclaim(&mut s, b), Err(CommandError::Fenced(_))));
        assert_eq!(reclaim(&mut s, a), Ok(Response::Reclaimed { entity_epoch: Epoch(2) }));
        assert_eq!(s.entity_authority(EntityId(7)), Some(EntityAuthority { server: a, epoch: Epoch(2) }));
        assert_eq!(s.transfers().recent()[0].outcome, TransferOutcome::Returned);
        assert_eq!(s.player_location(PlayerId(7)).map(|l| l.server), Some(a), "the directory follows the player");
        // Once is all: the second time is stale.
        assert_eq!(reclaim(&mut s, a).unwrap_err().reason(), "stale_epoch");
    }

    #[test]
    fn an_in_flight_transfer_is_not_forgotten_when_the_history_is_full() {
        let mut s = CoordinatorState::new(
            Policy { transfer_log_len: 4, ..Policy::default() },
            RegionTree::grid(IVec3::ZERO, 2, 1, 1),
            TickClock::new(T0),
        );
        let a = register(&mut s, "a", T0);
        let _b = register(&mut s, "b", T0);
        let (r0, r1) = (RegionKey::root(0, 0, 0), RegionKey::root(1, 0, 0));
        let now = T0 + 100 * MS;
        let Ok(Response::Transfer(slow)) = s.apply(request(a, 100, held(&s, r0), r1, now)).0 else { panic!() };
        // Six more, delivered: more than the history keeps.
        for e in 0..6 {
            let Ok(Response::Transfer(t)) = s.apply(request(a, 200 + e, held(&s, r0), r1, now)).0 else { panic!() };
            let done =
                Command::CompleteTransfer { transfer_id: t.id, from: a, delivered: true, error: String::new(), now };
            assert_eq!(s.apply(done).0, Ok(Response::Done));
        }
        assert_eq!(s.transfers().recent().len(), 5, "four ended and the one in flight");
        // The slow one is still live protocol state: its retried request
        // gets it back, and its source may still take it back.
        assert_eq!(s.apply(request(a, 100, held(&s, r0), r1, now + MS)).0, Ok(Response::Transfer(slow.clone())));
        let reclaim = Command::ReclaimTransfer { transfer_id: slow.id, from: a, error: "refused".into(), now };
        assert_eq!(s.apply(reclaim).0, Ok(Response::Reclaimed { entity_epoch: Epoch(2) }));
        assert_eq!(s.transfers().in_flight_len(), 0);
    }

    #[test]
    fn nothing_is_taken_back_that_the_target_already_handed_on() {
        let mut s = state(3);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let c = register(&mut s, "c", T0);
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0)));
        let Ok(Response::Transfer(t)) = r else { panic!("{r:?}") };
        // b got it and handed it to c's region (L0:2,0,0).
        let mut on = transfer_req(&s, b, Epoch(1), T0 + 10 * MS);
        on.from_region = RegionKey::root(1, 0, 0);
        on.from_region_epoch = s.assignments()[&on.from_region].epoch;
        on.to_region = RegionKey::root(2, 0, 0);
        let (r, _) = s.apply(Command::RequestTransfer(on));
        assert!(matches!(r, Ok(Response::Transfer(ref t2)) if t2.to == c), "{r:?}");
        let (r, _) =
            s.apply(Command::ReclaimTransfer { transfer_id: t.id, from: a, error: String::new(), now: T0 + 20 * MS });
        assert_eq!(r.unwrap_err().reason(), "stale_epoch");
        assert_eq!(s.entity_authority(EntityId(7)).map(|e| e.server), Some(c));
    }

    #[test]
    fn a_dead_sources_transfers_are_orphaned_for_the_target_to_resume() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (r, _) = s.apply(Command::RequestTransfer(transfer_req(&s, a, Epoch(0), T0 + 100 * MS)));
        let Ok(Response::Transfer(t)) = r else { panic!("{r:?}") };
        assert_eq!(s.orphans_for(b).count(), 0);
        let mut now = T0 + 100 * MS;
        while s.server(a).is_some_and(|r| r.alive) {
            now += 500 * MS;
            beat(&mut s, b, now);
            let _ = s.apply(Command::Tick { now });
        }
        assert_eq!(s.transfers().recent()[0].outcome, TransferOutcome::Orphaned);
        let orphans: Vec<u64> = s.orphans_for(b).map(|t| t.id).collect();
        assert_eq!(orphans, vec![t.id]);
        assert_eq!(s.entity_authority(EntityId(7)), Some(EntityAuthority { server: b, epoch: Epoch(1) }));
        // Only the target resolves it, once.
        let resolve = |s: &mut CoordinatorState, server, adopted| {
            s.apply(Command::ResolveOrphan { transfer_id: t.id, server, adopted, now }).0
        };
        assert!(resolve(&mut s, a, true).is_err());
        assert_eq!(resolve(&mut s, b, true), Ok(Response::Done));
        assert!(resolve(&mut s, b, false).is_err());
        assert_eq!(s.transfers().recent()[0].outcome, TransferOutcome::Adopted);
        assert_eq!(s.orphans_for(b).count(), 0);
        assert_eq!(s.entity_authority(EntityId(7)).map(|e| e.server), Some(b));
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

    fn request(
        from: ServerId,
        entity: u64,
        (from_region, from_region_epoch): (RegionKey, Epoch),
        to_region: RegionKey,
        now: u64,
    ) -> Command {
        Command::RequestTransfer(TransferRequest {
            entity: EntityId(entity),
            from,
            from_region,
            from_region_epoch,
            entity_epoch: Epoch(0),
            to_region,
            not_before_tick: 0,
            now,
        })
    }

    fn held(s: &CoordinatorState, k: RegionKey) -> (RegionKey, Epoch) {
        (k, s.assignments()[&k].epoch)
    }

    #[test]
    fn a_moved_region_lets_its_old_owner_hand_out_what_it_holds_until_the_release_ends() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let r0 = RegionKey::root(0, 0, 0);
        let old = held(&s, r0);
        assert_eq!(s.apply(Command::MoveRegion { region: r0, to: a, now: T0 }).0, Err(CommandError::SameServer(r0)));
        s.apply(Command::MoveRegion { region: r0, to: b, now: T0 + MS }).0.unwrap();
        assert_eq!(owner(&s, r0), Some(b));
        assert!(s.assignments()[&r0].epoch > old.1);
        // In place: out of r0 (old epoch) into r0 (now b's).
        let Ok(Response::Transfer(t)) = s.apply(request(a, 1, old, r0, T0 + 2 * MS)).0 else { panic!() };
        assert_eq!((t.from, t.to, t.to_region_epoch), (a, b, s.assignments()[&r0].epoch));
        // The new owner cannot use the old epoch; the old one cannot after the release.
        assert!(matches!(s.apply(request(b, 2, old, r0, T0 + 2 * MS)).0, Err(CommandError::StaleRegionEpoch { .. })));
        let late = T0 + MS + RELEASE_MS * MS;
        assert!(matches!(s.apply(request(a, 3, old, r0, late)).0, Err(CommandError::StaleRegionEpoch { .. })));
        s.apply(Command::Tick { now: late }).0.unwrap();
        assert!(s.releases().is_empty(), "expired releases are dropped");
    }

    #[test]
    fn split_keeps_the_owner_merge_gives_the_region_to_the_majority() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let r0 = RegionKey::root(0, 0, 0);
        let before = s.assignments()[&r0].epoch;
        let (r, ev) = s.apply(Command::SplitRegion { region: r0, now: T0 });
        r.unwrap();
        assert!(ev.contains(&Event::RegionSplit { region: r0 }));
        let kids = r0.children().unwrap();
        assert!(kids.iter().all(|k| owner(&s, *k) == Some(a) && s.assignments()[k].epoch > before));
        assert!(!s.assignments().contains_key(&r0));
        // Down to 500 m, no further.
        let k0 = kids[0];
        s.apply(Command::SplitRegion { region: k0, now: T0 }).0.unwrap();
        let g = k0.children().unwrap()[0];
        assert_eq!(s.apply(Command::SplitRegion { region: g, now: T0 }).0, Err(CommandError::TooSmall(g)));
        assert_eq!(s.apply(Command::SplitRegion { region: r0, now: T0 }).0, Err(CommandError::UnknownRegion(r0)));
        // Merging r0 needs k0 merged first.
        assert!(matches!(s.apply(Command::MergeRegion { region: r0, now: T0 }).0, Err(CommandError::NotMergeable(..))));
        s.apply(Command::MergeRegion { region: k0, now: T0 }).0.unwrap();
        // Five children to b, three stay with a: b takes the merged region,
        // and a may still hand out of its children.
        for k in &kids[..5] {
            s.apply(Command::MoveRegion { region: *k, to: b, now: T0 }).0.unwrap();
        }
        let a_child = held(&s, kids[7]);
        let (r, ev) = s.apply(Command::MergeRegion { region: r0, now: T0 + MS });
        r.unwrap();
        assert!(ev.contains(&Event::RegionsMerged { region: r0 }));
        assert_eq!(owner(&s, r0), Some(b));
        assert!(kids.iter().all(|k| !s.assignments().contains_key(k)));
        let Ok(Response::Transfer(t)) = s.apply(request(a, 1, a_child, r0, T0 + 2 * MS)).0 else { panic!() };
        assert_eq!(t.to, b);
        assert!(matches!(s.apply(Command::MergeRegion { region: r0, now: T0 }).0, Err(CommandError::NotMergeable(..))));
        // Epochs only ever rise, through all of it.
        assert!(s.assignments()[&r0].epoch > s.assignments()[&RegionKey::root(1, 0, 0)].epoch);
    }

    #[test]
    fn drain_moves_every_region_away_and_refuses_the_last_server() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (r0, r1) = (RegionKey::root(0, 0, 0), RegionKey::root(1, 0, 0));
        let old = held(&s, r0);
        s.apply(Command::Drain { server: a, undo: false, now: T0 }).0.unwrap();
        assert!(s.is_draining(a));
        assert_eq!((owner(&s, r0), owner(&s, r1)), (Some(b), Some(b)));
        assert!(matches!(s.apply(request(a, 1, old, r0, T0 + MS)).0, Ok(Response::Transfer(_))), "released");
        assert_eq!(s.apply(Command::Drain { server: b, undo: false, now: T0 }).0, Err(CommandError::LastServer(b)));
        assert_eq!(s.apply(Command::MoveRegion { region: r0, to: a, now: T0 }).0, Err(CommandError::Draining(a)));
        s.apply(Command::Drain { server: a, undo: false, now: T0 }).0.unwrap();
        assert_eq!(s.audit_log().iter().filter(|r| r.action == "drain").count(), 1, "a repeated drain is a no-op");
        // A drained server inherits nothing when another dies.
        let c = register(&mut s, "c", T0 + 10 * MS);
        s.apply(Command::MoveRegion { region: r1, to: c, now: T0 + 10 * MS }).0.unwrap();
        let _ = s.apply(Command::Heartbeat { server: a, load: Load::default(), now: T0 + 1_900 * MS });
        let _ = s.apply(Command::Heartbeat { server: b, load: Load::default(), now: T0 + 1_900 * MS });
        s.apply(Command::Tick { now: T0 + 2_100 * MS }).0.unwrap();
        assert_eq!(owner(&s, r1), Some(b), "c died; its region went to b, not to the drained a");
        assert_eq!(
            s.apply(Command::MoveRegion { region: r1, to: c, now: T0 + 2_100 * MS }).0,
            Err(CommandError::Fenced(c)),
            "no region goes to a dead server"
        );
        s.apply(Command::Drain { server: a, undo: true, now: T0 + 2_100 * MS }).0.unwrap();
        assert!(!s.is_draining(a));
        s.apply(Command::MoveRegion { region: r0, to: a, now: T0 + 2_100 * MS }).0.unwrap();
        assert_eq!(
            s.apply(Command::Drain { server: ServerId(99), undo: false, now: T0 }).0,
            Err(CommandError::UnknownServer(ServerId(99)))
        );
    }

    #[test]
    fn drains_and_releases_survive_snapshots() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let _b = register(&mut s, "b", T0);
        s.apply(Command::Drain { server: a, undo: false, now: T0 }).0.unwrap();
        let back = CoordinatorState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(back.is_draining(a) && !back.releases().is_empty());
        let mut trailing = s.to_bytes();
        trailing.push(0);
        assert!(CoordinatorState::from_bytes(&trailing).is_err());
    }

    #[test]
    fn the_directory_follows_joins_handoffs_leaves_and_deaths() {
        let mut s = state(2);
        let a = register(&mut s, "a", T0);
        let b = register(&mut s, "b", T0);
        let (p, e) = (PlayerId(9), EntityId(7));
        let presence = |server, online, now| Command::Presence { server, player: p, entity: e, online, now };
        s.apply(presence(a, true, T0)).0.unwrap();
        assert_eq!(s.player_location(p).map(|l| l.server), Some(a));
        // The avatar is handed to b: the directory follows the commit.
        let r0 = RegionKey::root(0, 0, 0);
        let Ok(Response::Transfer(_)) = s.apply(request(a, 7, held(&s, r0), RegionKey::root(1, 0, 0), T0 + MS)).0
        else {
            panic!()
        };
        assert_eq!(s.player_location(p).map(|l| l.server), Some(b));
        // A late leave from a (its standby link closing) changes nothing.
        s.apply(presence(a, false, T0 + 2 * MS)).0.unwrap();
        assert_eq!(s.player_location(p).map(|l| l.server), Some(b));
        assert_eq!(s.directory_len(), 1);
        // b dies: its players are no longer anywhere.
        let _ = s.apply(Command::Heartbeat { server: a, load: Load::default(), now: T0 + 1_900 * MS });
        s.apply(Command::Tick { now: T0 + 2_100 * MS }).0.unwrap();
        assert_eq!(s.player_location(p), None);
        // A dead server cannot claim players; a live one leaving removes them.
        assert_eq!(s.apply(presence(b, true, T0 + 2_200 * MS)).0, Err(CommandError::Fenced(b)));
        s.apply(presence(a, true, T0 + 2_200 * MS)).0.unwrap();
        s.apply(presence(a, false, T0 + 2_300 * MS)).0.unwrap();
        assert_eq!(s.directory_len(), 0);
    }
}
