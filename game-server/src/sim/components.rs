//! Components and resources of the simulation world.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bevy_ecs::prelude::*;
use glam::{DVec3, Vec3};
use shared::region::RegionKey;
use shared::wire::{InputFrame, JoinRole, Pose};
use shared::{EntityId, PlayerId, ServerId, Tick, TickClock};
use tokio::sync::mpsc;

use super::messages::{ConnId, HandoffState, MapView, SimIn, SimOut};
use crate::metrics::Metrics;

/// Inputs kept per player beyond the newest applied: enough for a second of
/// client-side jitter and for a handoff to carry what was not applied yet.
pub const INPUT_BUFFER: usize = 128;

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
    pub buttons: u32,
    /// Standing on something.
    pub on_ground: bool,
    /// Neighbours the client was told to pre-connect to.
    pub preconnected: BTreeSet<ServerId>,
    /// Ticks to simulate at once to catch up after a late handoff.
    pub catch_up: u64,
}

pub use super::authority::{Authority, Transfer};

/// A player held through a region the coordinator gave away: its client was
/// just told to pre-connect to the new owner, and the handoff waits until
/// `not_before` so that the client can (a boundary crossing gives it the
/// whole overlap zone to do so; a region move gives it this).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicting {
    pub not_before: shared::Tick,
}

/// The tick an entity was first seen past the handoff line (for the
/// handoff's latency: from here to the tick the new owner simulates it).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossed(pub Tick);

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
    /// budget a tick, less QUIC's own overhead).
    pub snapshot_budget: usize,
}

/// The snapshot payload a tick for `kbps` kbit/s at the socket: QUIC adds
/// about 45 bytes to each datagram (short header, packet number, AEAD tag,
/// DATAGRAM frame).
pub fn snapshot_budget(kbps: u32, tick_hz: u32) -> usize {
    (u64::from(kbps) * 1000 / 8 / u64::from(tick_hz.max(1)))
        .saturating_sub(45)
        .clamp(64, shared::wire::MAX_DATAGRAM as u64) as usize
}

/// The tick being simulated.
#[derive(Resource, Debug, Clone, Copy, Default)]
pub struct TickState {
    pub tick: Tick,
    /// Seconds this tick advances (more than 1/90 s after skipped ticks).
    pub dt: f32,
}

#[derive(Resource, Debug)]
pub struct Inbox(pub mpsc::Receiver<SimIn>);

#[derive(Resource, Debug, Clone)]
pub struct Outbox(pub mpsc::Sender<SimOut>);

#[derive(Resource, Debug, Clone)]
pub struct SimMetrics(pub Metrics);

#[derive(Resource, Debug, Clone, Default)]
pub struct Map(pub Arc<MapView>);

#[derive(Debug)]
pub struct Conn {
    pub player: PlayerId,
    /// The name the player joined with (an avatar handed over here takes it).
    pub name: String,
    pub role: JoinRole,
    pub tx: super::messages::ConnTx,
    /// Newest snapshot tick the client acknowledged on this connection.
    pub acked: shared::Tick,
}

/// Player connections open on this server.
#[derive(Resource, Debug, Default)]
pub struct Conns(pub HashMap<ConnId, Conn>);

/// Inputs of players this server holds a standby connection for.
#[derive(Resource, Debug, Default)]
pub struct StandbyInputs(pub HashMap<PlayerId, VecDeque<InputFrame>>);

/// Handoffs accepted whose effective tick has not come yet.
#[derive(Resource, Debug, Default)]
pub struct PendingAdoptions(pub Vec<HandoffState>);

/// Lookups from mesh ids to ECS entities.
#[derive(Resource, Debug, Default)]
pub struct Index {
    pub by_net: HashMap<EntityId, Entity>,
    pub by_player: HashMap<PlayerId, Entity>,
}

/// Where the per-tick authority lines go, if anywhere.
#[derive(Resource, Debug, Default)]
pub struct AuthorityLog {
    pub tx: Option<std::sync::mpsc::SyncSender<String>>,
    /// Lines for ticks simulated retroactively after a late handoff.
    pub catch_up: Vec<(Tick, EntityId)>,
    /// Orphaned transfers resumed from a ghost since the last line: the
    /// entity, its dead source and the last input the ghost had applied.
    /// The source may have applied (and logged) later ones in ticks whose
    /// state never left it: those died with it and are applied again here.
    pub resumed: Vec<(EntityId, shared::ServerId, u64)>,
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

/// Inputs a standby connection keeps: enough to cover a source that dies
/// while handing the player over (2 s until the coordinator declares it
/// dead, a heartbeat to hear of it), so the target resumes with every input.
pub const STANDBY_INPUT_BUFFER: usize = 360;

/// Pushes `frame` into a sequence-ordered input buffer of at most `cap`
/// frames (the oldest go first); drops duplicates and frames at or below
/// `applied`. Returns whether it was kept.
pub fn buffer_input(buf: &mut VecDeque<InputFrame>, frame: InputFrame, applied: u32, cap: usize) -> bool {
    if frame.seq <= applied || buf.iter().any(|f| f.seq == frame.seq) {
        return false;
    }
    let at = buf.iter().position(|f| f.seq > frame.seq).unwrap_or(buf.len());
    buf.insert(at, frame);
    while buf.len() > cap {
        buf.pop_front();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(seq: u32) -> InputFrame {
        InputFrame { seq, ..Default::default() }
    }

    #[test]
    fn input_buffer_orders_dedups_and_bounds() {
        let mut b = VecDeque::new();
        assert!(buffer_input(&mut b, f(3), 0, INPUT_BUFFER));
        assert!(buffer_input(&mut b, f(1), 0, INPUT_BUFFER));
        assert!(!buffer_input(&mut b, f(3), 0, INPUT_BUFFER));
        assert!(!buffer_input(&mut b, f(5), 7, INPUT_BUFFER));
        assert!(buffer_input(&mut b, f(2), 0, INPUT_BUFFER));
        assert_eq!(b.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        for s in 10..10 + INPUT_BUFFER as u32 {
            buffer_input(&mut b, f(s), 0, INPUT_BUFFER);
        }
        assert_eq!(b.len(), INPUT_BUFFER);
        assert_eq!(b.front().map(|f| f.seq), Some(10));
    }
}
