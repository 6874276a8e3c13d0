//! What crosses the bounded channels between the I/O threads and the tick
//! thread. The tick thread only ever `try_send`s and `try_recv`s. It
//! imports no feature of the simulation: the payloads it carries (a ghost
//! batch, an interaction, a prop's shape) are defined here, and the
//! features that give them meaning re-export them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use glam::{DVec3, Vec3};
use shared::region::{RegionKey, RegionTree};
use shared::snapshot::QEntity;
use shared::wire::{InputFrame, JoinRole, ServerControl};
use shared::{EntityId, Epoch, PlayerId, ServerId, Tick};
use tokio::sync::{mpsc, oneshot};

/// A player connection, numbered by the endpoint.
pub type ConnId = u64;

/// Tick thread → one connection's writer task.
#[derive(Debug)]
pub enum Outbound {
    Datagram(Bytes),
    Control(ServerControl),
}

/// The tick thread's end of one connection's writer. Datagrams and control
/// frames queue apart: snapshots that pile up (a late writer, a slow client)
/// are dropped and counted, and never push out a control frame, which is
/// reliable. A control frame that finds its own queue full means the client
/// has not read its stream for a long time: the connection is closed
/// (`kicked`) rather than lose the frame silently.
#[derive(Debug, Clone)]
pub struct ConnTx {
    datagrams: mpsc::Sender<Bytes>,
    control: mpsc::Sender<ServerControl>,
    kicked: tokio_util::sync::CancellationToken,
}

/// The writer's end of [`ConnTx`].
#[derive(Debug)]
pub struct ConnRx {
    pub datagrams: mpsc::Receiver<Bytes>,
    pub control: mpsc::Receiver<ServerControl>,
    /// Cancelled when a control frame found its queue full.
    pub kicked: tokio_util::sync::CancellationToken,
}

/// Why [`ConnTx::try_send`] did not queue a message. `reason()` is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailed {
    DatagramsFull,
    ControlFull,
    Closed,
}

impl SendFailed {
    pub fn reason(self) -> &'static str {
        match self {
            SendFailed::DatagramsFull => "outbound_full",
            SendFailed::ControlFull => "control_full",
            SendFailed::Closed => "conn_closed",
        }
    }
}

impl ConnTx {
    /// A writer's two queues, `datagrams` and `control` deep.
    pub fn channel(datagrams: usize, control: usize) -> (ConnTx, ConnRx) {
        let (dtx, drx) = mpsc::channel(datagrams);
        let (ctx, crx) = mpsc::channel(control);
        let kicked = tokio_util::sync::CancellationToken::new();
        (
            ConnTx { datagrams: dtx, control: ctx, kicked: kicked.clone() },
            ConnRx { datagrams: drx, control: crx, kicked },
        )
    }

    /// Queues without waiting (the tick thread never waits).
    pub fn try_send(&self, msg: Outbound) -> Result<(), SendFailed> {
        use mpsc::error::TrySendError;
        match msg {
            Outbound::Datagram(b) => self.datagrams.try_send(b).map_err(|e| match e {
                TrySendError::Full(_) => SendFailed::DatagramsFull,
                TrySendError::Closed(_) => SendFailed::Closed,
            }),
            Outbound::Control(c) => self.control.try_send(c).map_err(|e| match e {
                TrySendError::Full(_) => {
                    self.kicked.cancel();
                    SendFailed::ControlFull
                }
                TrySendError::Closed(_) => SendFailed::Closed,
            }),
        }
    }
}

impl ConnRx {
    /// What is queued, control frames first (tests and benchmarks).
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.control
            .try_recv()
            .map(Outbound::Control)
            .or_else(|_| self.datagrams.try_recv().map(Outbound::Datagram))
            .ok()
    }
}

/// What the tick thread knows of another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub quic: String,
    pub grpc: String,
    pub cert_sha256: String,
    pub alive: bool,
}

/// The region map as this server last received it from the coordinator.
#[derive(Debug, Clone, Default)]
pub struct MapView {
    pub version: u64,
    pub tree: RegionTree,
    pub owners: HashMap<RegionKey, (Option<ServerId>, Epoch)>,
    pub servers: HashMap<ServerId, PeerInfo>,
}

impl MapView {
    /// The live owner of `region` and its epoch.
    pub fn live_owner(&self, region: &RegionKey) -> Option<(ServerId, Epoch)> {
        let (owner, epoch) = self.owners.get(region)?;
        let owner = (*owner)?;
        self.servers.get(&owner).filter(|p| p.alive).map(|_| (owner, *epoch))
    }
}

/// A transfer to this server whose source died before delivering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub transfer_id: u64,
    pub from: ServerId,
    pub entity: EntityId,
    pub entity_epoch: Epoch,
    pub to_region: RegionKey,
    pub to_region_epoch: Epoch,
}

/// A transfer the coordinator committed for an entity this server owns.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedTransfer {
    pub id: u64,
    pub to: ServerId,
    pub to_region: RegionKey,
    pub to_region_epoch: Epoch,
    pub entity_epoch: Epoch,
    pub effective_tick: Tick,
}

/// An entity's full state as it moves between servers.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffState {
    pub transfer_id: u64,
    pub from: ServerId,
    pub to: ServerId,
    pub entity: EntityId,
    pub entity_epoch: Epoch,
    pub to_region: RegionKey,
    pub to_region_epoch: Epoch,
    /// The first tick the target simulates; the state is the state at its start.
    pub effective_tick: Tick,
    pub pos: DVec3,
    pub yaw: f32,
    pub vel: Vec3,
    pub player: Option<PlayerId>,
    pub last_applied_input: u32,
    pub pending_inputs: Vec<InputFrame>,
    /// For a prop: the rest of its rigid body.
    pub prop: Option<PropHandoff>,
    /// The tick the source first saw it past the handoff line (`None` for a
    /// handoff out of a region given away).
    pub crossed_tick: Option<Tick>,
    /// Its components (the game's state on it): they move with it.
    pub components: shared::component::ComponentSet,
}

/// What a prop's rigid body needs besides position and velocity to go on
/// on another server exactly where it was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropHandoff {
    pub shape: PropShape,
    pub rot: glam::Quat,
    pub angvel: Vec3,
    pub sleeping: bool,
}

/// The answer to [`SimIn::Positions`] (`GET /v1/positions`): a sample of
/// at most `max` of the entities this server owns, evenly strided.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Positions {
    /// How many entities the server owns.
    pub total: u64,
    /// `[x, y, z, kind]`: metres rounded to 0.1, kind 0 a player, 1 a prop.
    pub entities: Vec<(f64, f64, f64, u8)>,
}

/// I/O threads → tick thread.
/// The answer to [`SimIn::InspectChunk`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkInfo {
    pub loaded: bool,
    /// SHA-256 (hex) of the voxels, one material byte each, index order.
    pub digest: Option<String>,
    /// Solid voxels.
    pub solid: u32,
}

#[derive(Debug)]
pub enum SimIn {
    /// The components neighbour `server` knows (its ghost link asked it).
    PeerSchema {
        server: ServerId,
        schema: std::sync::Arc<shared::component::Schema>,
    },
    Joined {
        conn: ConnId,
        player: PlayerId,
        name: String,
        role: JoinRole,
        spawn: Option<DVec3>,
        /// A playing join's saved components (its progression's, checked
        /// against the registry), put on the avatar if it spawns here.
        saved: Option<shared::component::ComponentSet>,
        tx: ConnTx,
    },
    Input {
        conn: ConnId,
        frame: InputFrame,
    },
    Left {
        conn: ConnId,
    },
    /// A player's edit, from its control stream.
    Edit {
        conn: ConnId,
        id: u32,
        op: shared::edit::EditOp,
    },
    /// An admin spawns props; the reply lists their ids.
    SpawnProps {
        props: Vec<PropSpawn>,
        reply: oneshot::Sender<Result<Vec<EntityId>, String>>,
    },
    /// An admin asks what the server holds of a chunk.
    InspectChunk {
        key: shared::chunk::ChunkKey,
        reply: oneshot::Sender<ChunkInfo>,
    },
    /// The admin map asks where the entities this server owns are.
    Positions {
        max: usize,
        reply: oneshot::Sender<Positions>,
    },
    Map(Arc<MapView>),
    /// A chat line or notice for every player playing here.
    Broadcast(ServerControl),
    TransferCommitted {
        entity: EntityId,
        transfer: CommittedTransfer,
    },
    TransferRefused {
        entity: EntityId,
        reason: String,
        /// A decision of the coordinator (stale epoch, no such region), not
        /// an outage: asking again will not help.
        permanent: bool,
    },
    /// A neighbour's overlap sync for one tick.
    Ghosts(GhostBatch),
    /// A neighbour's player pushed or grabbed an entity this server owns;
    /// the verdict goes back to the neighbour, if it waits for one.
    Interact {
        interaction: Interaction,
        reply: Option<oneshot::Sender<Result<(), InteractRefusal>>>,
    },
    /// Transfers to this server whose source died before delivering them
    /// (from the heartbeat; listed until resolved).
    Orphans(Vec<Orphan>),
    /// A handoff this server could not deliver was taken back: the entity
    /// is this server's again under `entity_epoch`.
    Reclaimed {
        state: Box<HandoffState>,
        entity_epoch: Epoch,
    },
    /// The answer to [`SimOut::CancelTransfer`]: the entity's new epoch, or
    /// `None` if the coordinator could not give it back (asked again later).
    TransferCancelled {
        entity: EntityId,
        entity_epoch: Option<Epoch>,
    },
    /// A neighbour hands an entity over; the reply says whether it was taken.
    Adopt {
        state: Box<HandoffState>,
        reply: oneshot::Sender<Result<(), AdoptError>>,
    },
}

/// One prop to spawn.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct PropSpawn {
    pub pos: DVec3,
    #[serde(flatten)]
    pub shape: PropShape,
    /// Initial velocity, m/s.
    #[serde(default)]
    pub vel: [f32; 3],
}

/// Tick thread → control task.
#[derive(Debug)]
pub enum SimOut {
    RequestTransfer {
        entity: EntityId,
        from_region: RegionKey,
        from_region_epoch: Epoch,
        entity_epoch: Epoch,
        to_region: RegionKey,
        position: DVec3,
        not_before_tick: Tick,
        /// The components the entity carries, as this server's schema
        /// names them: the coordinator refuses a target that lacks one.
        components: Vec<shared::component::SchemaEntry>,
    },
    Handoff(Box<HandoffState>),
    /// The entities this server owns in `to`'s overlap zone this tick (the
    /// control task sends what changed since the last batch).
    Ghosts {
        to: ServerId,
        tick: Tick,
        ghosts: Vec<GhostState>,
    },
    /// A player here pushed or grabbed a prop `to` owns: tell `to`.
    Interact {
        to: ServerId,
        interaction: Interaction,
    },
    /// A transfer asked early whose entity did not pass the line: take it
    /// back (the target never got anything).
    CancelTransfer {
        entity: EntityId,
        transfer_id: u64,
    },
    /// An orphaned transfer was resumed from the ghost (`adopted`) or not.
    OrphanResolved {
        transfer_id: u64,
        adopted: bool,
    },
    /// Tell the client to pre-connect to a neighbour (`hint` is a
    /// [`ServerControl::PreConnect`] without its ticket): the control task
    /// asks the coordinator for a standby ticket, puts it in, and sends the
    /// hint on `tx`.
    Hint {
        player: PlayerId,
        name: String,
        hint: ServerControl,
        tx: ConnTx,
    },
    /// A player's avatar was spawned here (`online`) or left: for the
    /// coordinator's player directory (handoffs move entries by themselves).
    Presence {
        player: PlayerId,
        entity: EntityId,
        online: bool,
    },
}

/// The refusal of a handoff the target already has (an earlier attempt got
/// through): the sender counts it as delivered.
pub const ALREADY_HELD: &str = "already_held";

/// Why an incoming handoff was refused. `reason()` is a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    #[error("handoff addressed to server {0}, not to this one")]
    WrongServer(ServerId),
    #[error("region {region} is held under {known}, the handoff carries {claimed}")]
    StaleRegionEpoch { region: RegionKey, known: Epoch, claimed: Epoch },
    #[error("entity {0} is already here under epoch {1}")]
    StaleEntityEpoch(EntityId, Epoch),
    #[error("the simulation is not accepting handoffs")]
    Unavailable,
}

impl AdoptError {
    pub fn reason(&self) -> &'static str {
        match self {
            AdoptError::WrongServer(_) => "wrong_server",
            AdoptError::StaleRegionEpoch { .. } => "stale_epoch",
            AdoptError::StaleEntityEpoch(..) => ALREADY_HELD,
            AdoptError::Unavailable => "unavailable",
        }
    }
}

// Payloads the features define the meaning of; kept here so that the
// channels' vocabulary depends on no feature.

/// What a prop is shaped like.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum PropShape {
    /// A box with these half extents, metres.
    Box {
        half: [f32; 3],
    },
    Ball {
        radius: f32,
    },
}

impl PropShape {
    pub fn validate(&self) -> Result<(), &'static str> {
        let ok = |v: f32| v.is_finite() && (0.02..=4.0).contains(&v);
        match self {
            PropShape::Box { half } if half.iter().all(|h| ok(*h)) => Ok(()),
            PropShape::Ball { radius } if ok(*radius) => Ok(()),
            _ => Err("prop sizes must be 0.02..=4 m"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GhostKind {
    Player,
    Prop,
}

/// One entity as its owner sends it to a neighbour: its state, quantised as
/// snapshots carry it (`q.authority` is the owner), the region it is owned
/// through, and the components neighbours mirror.
#[derive(Debug, Clone, PartialEq)]
pub struct GhostState {
    pub region: RegionKey,
    pub region_epoch: Epoch,
    pub kind: GhostKind,
    pub q: QEntity,
    /// Players: the newest input applied.
    pub last_input: u32,
    /// Props: their shape.
    pub shape: Option<PropShape>,
    /// Its ghosted components (`Policy::ghosted`), shared by every
    /// neighbour's list. `None` in a received batch: unchanged since the
    /// sender's last batch that listed the entity.
    pub comps: Option<std::sync::Arc<shared::component::ComponentSet>>,
}

/// One tick of overlap sync from one neighbour, as decoded at the gRPC edge.
#[derive(Debug, Clone, PartialEq)]
pub struct GhostBatch {
    pub from: ServerId,
    pub tick: Tick,
    /// Lists every ghost the sender has for us: the rest are gone.
    pub full: bool,
    pub ghosts: Vec<GhostState>,
    pub removed: Vec<EntityId>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InteractKind {
    /// A hand moving at `hand_vel` (world, m/s) touched the prop.
    Push { hand_vel: Vec3 },
    /// A grip closed on the prop: hand it to the requester, into
    /// `to_region` (the grabbing player's, held under `to_region_epoch`).
    Grab { to_region: RegionKey, to_region_epoch: Epoch },
}

impl InteractKind {
    pub fn label(&self) -> &'static str {
        match self {
            InteractKind::Push { .. } => "push",
            InteractKind::Grab { .. } => "grab",
        }
    }
}

/// One hand's act on an entity `from` does not own, sent to its owner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub from: ServerId,
    pub entity: EntityId,
    /// The region the requester's ghost says the entity is owned through,
    /// and its epoch.
    pub region: RegionKey,
    pub region_epoch: Epoch,
    /// The hand, world metres.
    pub point: DVec3,
    pub kind: InteractKind,
}

/// Why the owner refused an interaction. `reason()` is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InteractRefusal {
    #[error("the request claims to come from this server")]
    OwnServer,
    #[error("the sender is not a live server of the map")]
    UnknownServer,
    #[error("the hand is not near any region of the sender")]
    OutsideZone,
    #[error("no such entity here")]
    UnknownEntity,
    #[error("this server is not authoritative for the entity")]
    NotOwner,
    #[error("the entity is held through another region or epoch")]
    StaleEpoch,
    #[error("only props can be pushed or grabbed")]
    NotAProp,
    #[error("the prop is out of the hand's reach")]
    OutOfReach,
    #[error("a hand here holds the prop")]
    Held,
    #[error("the prop is being handed over already")]
    Busy,
    #[error("the region to hand the prop into is not the sender's")]
    WrongRegion,
}

impl InteractRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            InteractRefusal::OwnServer => "own_server",
            InteractRefusal::UnknownServer => "unknown_server",
            InteractRefusal::OutsideZone => "outside_zone",
            InteractRefusal::UnknownEntity => "unknown_entity",
            InteractRefusal::NotOwner => "not_owner",
            InteractRefusal::StaleEpoch => "stale_epoch",
            InteractRefusal::NotAProp => "not_a_prop",
            InteractRefusal::OutOfReach => "out_of_reach",
            InteractRefusal::Held => "held",
            InteractRefusal::Busy => "busy",
            InteractRefusal::WrongRegion => "wrong_region",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_datagram_queue_never_pushes_out_a_control_frame() {
        let (tx, mut rx) = ConnTx::channel(2, 2);
        let snap = || Outbound::Datagram(Bytes::from_static(b"s"));
        let hint = || Outbound::Control(ServerControl::Notice { text: "pre-connect".into() });
        assert_eq!(tx.try_send(snap()), Ok(()));
        assert_eq!(tx.try_send(snap()), Ok(()));
        assert_eq!(tx.try_send(snap()), Err(SendFailed::DatagramsFull));
        assert_eq!(tx.try_send(hint()), Ok(()), "snapshots piling up leave control frames room");
        assert!(!rx.kicked.is_cancelled());
        // Control frames come out first.
        assert!(matches!(rx.try_recv(), Some(Outbound::Control(_))));
        assert!(matches!(rx.try_recv(), Some(Outbound::Datagram(_))));
        // A control queue that fills up closes the connection instead of losing a frame quietly.
        assert_eq!(tx.try_send(hint()), Ok(()));
        assert_eq!(tx.try_send(hint()), Ok(()));
        assert_eq!(tx.try_send(hint()), Err(SendFailed::ControlFull));
        assert!(rx.kicked.is_cancelled());
        assert_eq!(SendFailed::ControlFull.reason(), "control_full");
        drop(rx);
        assert_eq!(tx.try_send(hint()), Err(SendFailed::Closed));
    }
}
