//! The core of the simulation world, which every feature shares: an
//! entity's mesh id and body, a player's avatar, this server's config, the
//! tick being simulated, the metrics, the map as last heard, the id index,
//! and the load figures the heartbeat reports.
//!
//! API boundary: imports no feature of `sim` (only the channels'
//! vocabulary in `messages`). Authority over an entity is not here: see
//! `sim::authority`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bevy_ecs::prelude::*;
use glam::{DVec3, Vec3};
use shared::region::RegionKey;
use shared::wire::{InputFrame, Pose};
use shared::{EntityId, PlayerId, ServerId, Tick, TickClock};

use super::messages::{ConnId, MapView};
use crate::metrics::Metrics;

/// The mesh-wide identity of an entity.
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetId(pub EntityId);

/// Kinematic state of a body, world metres.
#[derive(Component, Debug, Clone, Copy, PartialEq)]
pub struct Body {
    pub pos: DVec3,
    pub yaw: f32,
    pub vel: Vec3,
}

/// The replicated components of an entity (`shared::component`), each
/// with the tick it last changed: they move with it in a handoff and reach
/// the clients that may see them. Change one through `Tracked::put`, so
/// that an unchanged value is not sent again.
#[derive(Component, Debug, Clone, Default, PartialEq)]
pub struct Components(pub shared::component::Tracked);

impl Components {
    /// A player's at its spawn: its kind and name.
    pub fn player(name: &str, tick: Tick) -> Self {
        use shared::component::builtin::{Kind, PlayerName};
        let mut t = shared::component::Tracked::default();
        t.put(&Kind::Player, tick);
        t.put(&PlayerName(name.chars().filter(|c| !c.is_control()).collect()), tick);
        Self(t)
    }

    /// A prop's at its spawn: its kind (shape and size).
    pub fn prop(shape: super::messages::PropShape, tick: Tick) -> Self {
        use shared::component::builtin::Kind;
        let mm = |m: f32| (m * 1000.0).round().max(1.0).min(f32::from(u16::MAX)) as u16;
        let kind = match shape {
            super::messages::PropShape::Box { half } => Kind::PropBox { half_mm: half.map(mm) },
            super::messages::PropShape::Ball { radius } => Kind::PropBall { radius_mm: mm(radius) },
        };
        let mut t = shared::component::Tracked::default();
        t.put(&kind, tick);
        Self(t)
    }
}

/// A player's avatar, and what the server knows of the player's input.
#[derive(Component, Debug, Clone, Default)]
pub struct Avatar {
    pub player: PlayerId,
    pub name: String,
    /// The connection snapshots go to, once the client is attached here.
    pub conn: Option<ConnId>,
    /// Newest input sequence applied (0: none).
    pub last_applied: u32,
    /// Inputs applied this tick: first and last sequence, and how many.
    pub applied_now: Option<(u32, u32, u32)>,
    /// Received, not yet applied, in sequence order.
    pub pending: VecDeque<InputFrame>,
    pub locomotion: [f32; 2],
    pub turn: f32,
    /// Tracked poses of the newest applied input, relative to the body.
    pub head: Pose,
    pub left: Pose,
    pub right: Pose,
    /// The rig others see, as last quantised (`VrRig`).
    pub rig: shared::component::builtin::VrRig,
    pub buttons: u32,
    /// Standing on something.
    pub on_ground: bool,
    /// Neighbours the client was told to pre-connect to.
    pub preconnected: BTreeSet<ServerId>,
    /// Ticks to simulate at once to catch up after a late handoff.
    pub catch_up: u64,
}

/// Static facts and knobs of this server's simulation.
#[derive(Resource, Debug, Clone)]
pub struct SimConfig {
    pub server: ServerId,
    pub clock: TickClock,
    pub handoff_margin_m: f64,
    /// Ticks ahead a moving entity's path is projected for an early
    /// transfer request (0: none).
    pub handoff_predict_ticks: u64,
    pub overlap_m: f64,
    pub walk_speed: f32,
    /// The player body's dimensions and motion limits.
    pub character: shared::controller::CharacterParams,
    /// Seed of the procedural terrain (sent to clients in `Welcome`).
    pub world_seed: u64,
    /// Entities farther than this from a player are left out of its snapshots.
    pub view_radius_m: f64,
    /// Bytes one snapshot datagram may carry (the player's downstream
    /// budget a snapshot, less QUIC's own overhead).
    pub snapshot_budget: usize,
    /// Ticks between two snapshots to one player (1: every tick). The
    /// players take turns by their entity id, the same turn on every
    /// server of the mesh (its tick grid is one).
    pub snapshot_every: u64,
    /// Threads that build players' snapshots beside the tick thread (0:
    /// the tick thread builds them all).
    pub replication_workers: usize,
    /// The components this server knows (the built-ins and the game's).
    pub registry: Arc<shared::component::Registry>,
}

/// The payload of one snapshot for `kbps` kbit/s at the socket, a player
/// sent one every `every` ticks of `tick_hz`: QUIC adds about 45 bytes to
/// each datagram (short header, packet number, AEAD tag, DATAGRAM frame).
pub fn snapshot_budget(kbps: u32, tick_hz: u32, every: u64) -> usize {
    (u64::from(kbps) * 1000 / 8 * every.max(1) / u64::from(tick_hz.max(1)))
        .saturating_sub(45)
        .clamp(64, shared::wire::MAX_DATAGRAM as u64) as usize
}

/// Ticks between two snapshots to one player for about `snapshot_hz` a
/// second (a whole number of ticks: 90, 45, 30, 22.5 … at 90 Hz).
pub fn snapshot_every(tick_hz: u32, snapshot_hz: u32) -> u64 {
    (u64::from(tick_hz) / u64::from(snapshot_hz.max(1))).max(1)
}

/// The tick being simulated.
#[derive(Resource, Debug, Clone, Copy, Default)]
pub struct TickState {
    pub tick: Tick,
    /// Seconds this tick advances (more than 1/90 s after skipped ticks).
    pub dt: f32,
}

#[derive(Resource, Debug, Clone)]
pub struct SimMetrics(pub Metrics);

#[derive(Resource, Debug, Clone, Default)]
pub struct Map(pub Arc<MapView>);

/// Lookups from mesh ids to ECS entities.
#[derive(Resource, Debug, Default)]
pub struct Index {
    pub by_net: HashMap<EntityId, Entity>,
    pub by_player: HashMap<PlayerId, Entity>,
}

/// Load figures the heartbeat reports, refreshed by the metrics system.
#[derive(Debug, Default)]
pub struct LoadShared {
    pub players: std::sync::atomic::AtomicU32,
    pub entities: std::sync::atomic::AtomicU32,
    pub tick_p99_us: std::sync::atomic::AtomicU32,
    pub ticks_overrun: std::sync::atomic::AtomicU64,
    pub tick: std::sync::atomic::AtomicU64,
    /// Players per region they are held through, refreshed once a second.
    pub regions: std::sync::Mutex<Vec<(RegionKey, u32)>>,
}

#[derive(Resource, Debug, Clone)]
pub struct Load(pub Arc<LoadShared>);

/// Recent tick durations, for the p99 the heartbeat reports.
#[derive(Resource, Debug, Default)]
pub struct TickTimes(pub VecDeque<u32>);
