//! Conversions between `proto` wire types and domain types, at the gRPC edge.

use std::collections::HashMap;

use glam::DVec3;
use proto::{mesh as mpb, peer as ppb};
use shared::region::{MAX_LEVEL, RegionKey, RegionTree};
use shared::wire::{InputFrame, Pose};
use shared::{EntityId, Epoch, PlayerId, ServerId};

use crate::handoff::{Refusal, Refused};
use crate::sim::ghosts::{GhostBatch, GhostKind, GhostState};
use crate::sim::interact::{InteractKind, Interaction};
use crate::sim::messages::{HandoffState, MapView, PeerInfo, PropHandoff};
use crate::sim::physics::PropShape;

/// A wire message that does not make sense. `reason()` is a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("region level {0} is deeper than {MAX_LEVEL}")]
    Level(u32),
    #[error("a number in {0} is NaN or infinite")]
    NonFinite(&'static str),
    #[error("{0} pending inputs is more than a handoff carries")]
    TooManyInputs(usize),
    #[error("{0} is more than a ghost batch carries")]
    TooManyGhosts(usize),
    #[error("ghost {0} names region {1}, the batch has {2}")]
    GhostRegion(u64, u32, usize),
    #[error("ghost {0}: {1}")]
    BadGhost(u64, &'static str),
    #[error("prop: {0}")]
    BadProp(&'static str),
    #[error("interaction: {0}")]
    BadInteraction(&'static str),
    #[error("components: {0}")]
    Components(shared::component::ComponentError),
    #[error("schema: {0}")]
    BadSchema(&'static str),
}

impl BadMessage {
    pub fn reason(&self) -> &'static str {
        match self {
            BadMessage::Components(e) => e.reason(),
            _ => "bad_request",
        }
    }
}

fn key(level: u32, x: i32, y: i32, z: i32) -> Result<RegionKey, BadMessage> {
    let level = u8::try_from(level).ok().filter(|l| *l <= MAX_LEVEL).ok_or(BadMessage::Level(level))?;
    Ok(RegionKey::new(level, x, y, z))
}

pub fn mesh_key(k: Option<&mpb::RegionKey>) -> Result<RegionKey, BadMessage> {
    let k = k.ok_or(BadMessage::Missing("region"))?;
    key(k.level, k.x, k.y, k.z)
}

pub fn mesh_key_to_pb(k: &RegionKey) -> mpb::RegionKey {
    mpb::RegionKey { level: u32::from(k.level), x: k.x, y: k.y, z: k.z }
}

fn peer_key(k: Option<&ppb::RegionKey>) -> Result<RegionKey, BadMessage> {
    peer_key_named(k, "to_region")
}

fn peer_key_named(k: Option<&ppb::RegionKey>, field: &'static str) -> Result<RegionKey, BadMessage> {
    let k = k.ok_or(BadMessage::Missing(field))?;
    key(k.level, k.x, k.y, k.z)
}

/// The coordinator's map as the simulation uses it. Assignments with a bad
/// key are skipped (and counted by the caller through the returned number).
pub fn map_from_pb(m: &mpb::RegionMap) -> (MapView, usize) {
    let mut owners = HashMap::new();
    let mut bad = 0;
    for a in &m.assignments {
        match mesh_key(a.region.as_ref()) {
            Ok(k) => {
                let owner = (a.server_id != 0).then_some(ServerId(a.server_id));
                owners.insert(k, (owner, Epoch(a.epoch)));
            }
            Err(_) => bad += 1,
        }
    }
    let tree = tree_from_leaves(owners.keys().copied());
    let servers = m
        .servers
        .iter()
        .map(|s| {
            let a = s.addresses.clone().unwrap_or_default();
            (
                ServerId(s.server_id),
                PeerInfo { quic: a.quic, grpc: a.grpc, cert_sha256: s.cert_sha256.clone(), alive: s.alive },
            )
        })
        .collect();
    (MapView { version: m.version, tree, owners, servers }, bad)
}

/// The tree whose leaves are `leaves`: their roots, with every proper ancestor split.
pub fn tree_from_leaves(leaves: impl IntoIterator<Item = RegionKey>) -> RegionTree {
    let leaves: Vec<RegionKey> = leaves.into_iter().collect();
    let mut tree = RegionTree::new(leaves.iter().map(|k| k.root_ancestor()));
    let mut by_level = leaves;
    by_level.sort_by_key(|k| k.level);
    for leaf in by_level {
        let mut chain = Vec::new();
        let mut k = leaf;
        while let Some(p) = k.parent() {
            chain.push(p);
            k = p;
        }
        for ancestor in chain.into_iter().rev() {
            if tree.is_leaf(&ancestor) {
                let _ = tree.split(ancestor);
            }
        }
    }
    tree
}

fn v3(v: DVec3) -> ppb::Vec3 {
    ppb::Vec3 { x: v.x, y: v.y, z: v.z }
}

fn finite_v3(v: Option<&ppb::Vec3>, field: &'static str) -> Result<DVec3, BadMessage> {
    let v = v.ok_or(BadMessage::Missing(field))?;
    let d = DVec3::new(v.x, v.y, v.z);
    if d.is_finite() { Ok(d) } else { Err(BadMessage::NonFinite(field)) }
}

fn pose_to_pb(p: &Pose) -> ppb::Pose {
    ppb::Pose { px: p.pos[0], py: p.pos[1], pz: p.pos[2], rx: p.rot[0], ry: p.rot[1], rz: p.rot[2], rw: p.rot[3] }
}

fn pose_from_pb(p: Option<&ppb::Pose>) -> Pose {
    p.map_or_else(Pose::default, |p| Pose { pos: [p.px, p.py, p.pz], rot: [p.rx, p.ry, p.rz, p.rw] })
}

pub fn input_to_pb(f: &InputFrame) -> ppb::InputFrame {
    ppb::InputFrame {
        seq: f.seq,
        ack_tick: f.ack_tick,
        head: Some(pose_to_pb(&f.head)),
        left: Some(pose_to_pb(&f.left)),
        right: Some(pose_to_pb(&f.right)),
        locomotion_x: f.locomotion[0],
        locomotion_y: f.locomotion[1],
        turn: f.turn,
        buttons: f.buttons,
    }
}

pub fn input_from_pb(f: &ppb::InputFrame) -> Result<InputFrame, BadMessage> {
    let frame = InputFrame {
        seq: f.seq,
        ack_tick: f.ack_tick,
        head: pose_from_pb(f.head.as_ref()),
        left: pose_from_pb(f.left.as_ref()),
        right: pose_from_pb(f.right.as_ref()),
        locomotion: [f.locomotion_x, f.locomotion_y],
        turn: f.turn,
        buttons: f.buttons,
    };
    let poses = [frame.head, frame.left, frame.right];
    let finite = [frame.locomotion[0], frame.locomotion[1], frame.turn]
        .into_iter()
        .chain(poses.iter().flat_map(|p| p.pos.into_iter().chain(p.rot)))
        .all(f32::is_finite);
    if finite { Ok(frame) } else { Err(BadMessage::NonFinite("pending_inputs")) }
}

pub fn handoff_to_pb(h: &HandoffState) -> ppb::HandoffRequest {
    ppb::HandoffRequest {
        transfer_id: h.transfer_id,
        from_server: h.from.0,
        to_server: h.to.0,
        entity_epoch: h.entity_epoch.0,
        to_region: Some(ppb::RegionKey {
            level: u32::from(h.to_region.level),
            x: h.to_region.x,
            y: h.to_region.y,
            z: h.to_region.z,
        }),
        to_region_epoch: h.to_region_epoch.0,
        effective_tick: h.effective_tick,
        state: Some(ppb::EntityState {
            id: h.entity.0,
            kind: if h.player.is_some() { ppb::EntityKind::Player } else { ppb::EntityKind::Prop } as i32,
            position: Some(v3(h.pos)),
            yaw: h.yaw,
            velocity: Some(v3(h.vel.as_dvec3())),
            tick: h.effective_tick,
        }),
        player_id: h.player.map_or(0, |p| p.0),
        last_applied_input_seq: h.last_applied_input,
        pending_inputs: h.pending_inputs.iter().map(input_to_pb).collect(),
        crossed_tick: h.crossed_tick.unwrap_or(0),
        components: if h.components.is_empty() { Vec::new() } else { h.components.to_bytes() },
        prop: h.prop.map(|p| ppb::PropState {
            rx: p.rot.x,
            ry: p.rot.y,
            rz: p.rot.z,
            rw: p.rot.w,
            angular_velocity: Some(v3(p.angvel.as_dvec3())),
            shape: Some(match shape_to_pb(p.shape) {
                ppb::ghost::Shape::BoxHalfExtents(h) => ppb::prop_state::Shape::BoxHalfExtents(h),
                ppb::ghost::Shape::BallRadius(r) => ppb::prop_state::Shape::BallRadius(r),
            }),
            sleeping: p.sleeping,
        }),
    }
}

fn shape_to_pb(s: PropShape) -> ppb::ghost::Shape {
    match s {
        PropShape::Box { half } => ppb::ghost::Shape::BoxHalfExtents(v3(glam::Vec3::from(half).as_dvec3())),
        PropShape::Ball { radius } => ppb::ghost::Shape::BallRadius(radius),
    }
}

fn shape_from_pb(s: &ppb::ghost::Shape) -> Result<PropShape, BadMessage> {
    let shape = match s {
        ppb::ghost::Shape::BoxHalfExtents(h) => {
            PropShape::Box { half: finite_v3(Some(h), "prop.shape")?.as_vec3().to_array() }
        }
        ppb::ghost::Shape::BallRadius(r) => PropShape::Ball { radius: *r },
    };
    shape.validate().map_err(|_| BadMessage::BadProp("shape out of range"))?;
    Ok(shape)
}

fn prop_from_pb(p: &ppb::PropState) -> Result<PropHandoff, BadMessage> {
    let shape = match &p.shape {
        Some(ppb::prop_state::Shape::BoxHalfExtents(h)) => shape_from_pb(&ppb::ghost::Shape::BoxHalfExtents(*h))?,
        Some(ppb::prop_state::Shape::BallRadius(r)) => shape_from_pb(&ppb::ghost::Shape::BallRadius(*r))?,
        None => return Err(BadMessage::Missing("prop.shape")),
    };
    let rot = glam::Quat::from_xyzw(p.rx, p.ry, p.rz, p.rw);
    if !rot.is_finite() || (rot.length_squared() - 1.0).abs() > 0.01 {
        return Err(BadMessage::BadProp("rotation is not a unit quaternion"));
    }
    let angvel = finite_v3(p.angular_velocity.as_ref(), "prop.angular_velocity")?.as_vec3();
    if angvel.length() > 1000.0 {
        return Err(BadMessage::BadProp("spinning faster than 1000 rad/s"));
    }
    Ok(PropHandoff { shape, rot: rot.normalize(), angvel, sleeping: p.sleeping })
}

/// Most pending inputs a handoff may carry (the sender's buffer is smaller).
pub const MAX_HANDOFF_INPUTS: usize = 1024;

/// A handoff from the wire; its components checked against `registry`.
pub fn handoff_from_pb(
    r: &ppb::HandoffRequest,
    registry: &shared::component::Registry,
) -> Result<HandoffState, BadMessage> {
    let s = r.state.as_ref().ok_or(BadMessage::Missing("state"))?;
    if r.pending_inputs.len() > MAX_HANDOFF_INPUTS {
        return Err(BadMessage::TooManyInputs(r.pending_inputs.len()));
    }
    let yaw = if s.yaw.is_finite() { s.yaw } else { return Err(BadMessage::NonFinite("state.yaw")) };
    let is_player = s.kind == ppb::EntityKind::Player as i32;
    Ok(HandoffState {
        transfer_id: r.transfer_id,
        from: ServerId(r.from_server),
        to: ServerId(r.to_server),
        entity: EntityId(s.id),
        entity_epoch: Epoch(r.entity_epoch),
        to_region: peer_key(r.to_region.as_ref())?,
        to_region_epoch: Epoch(r.to_region_epoch),
        effective_tick: r.effective_tick,
        pos: finite_v3(s.position.as_ref(), "state.position")?,
        yaw,
        vel: finite_v3(s.velocity.as_ref(), "state.velocity")?.as_vec3(),
        player: is_player.then_some(PlayerId(r.player_id)),
        last_applied_input: r.last_applied_input_seq,
        pending_inputs: r.pending_inputs.iter().map(input_from_pb).collect::<Result<_, _>>()?,
        crossed_tick: (r.crossed_tick > 0).then_some(r.crossed_tick),
        components: if r.components.is_empty() {
            shared::component::ComponentSet::new()
        } else {
            shared::component::ComponentSet::decode(&r.components, registry).map_err(BadMessage::Components)?
        },
        prop: match (is_player, &r.prop) {
            (false, Some(p)) => Some(prop_from_pb(p)?),
            (false, None) => return Err(BadMessage::Missing("prop")),
            (true, _) => None,
        },
    })
}

/// Most ghosts (and removals) one batch may carry.
pub const MAX_BATCH_GHOSTS: usize = 8192;
/// Positions beyond this many millimetres from the origin are not in any world.
const MAX_GHOST_MM: i64 = 1 << 40;

fn peer_key_to_pb(k: &RegionKey) -> ppb::RegionKey {
    ppb::RegionKey { level: u32::from(k.level), x: k.x, y: k.y, z: k.z }
}

/// A batch for the wire: `ghosts` are what changed (all of them when
/// `full`; a ghost's components go only where its `comps` is `Some`),
/// `removed` what left.
pub fn ghost_batch_to_pb(
    from: ServerId,
    tick: shared::Tick,
    full: bool,
    ghosts: &[GhostState],
    removed: &[EntityId],
) -> ppb::GhostBatch {
    let mut regions: Vec<(RegionKey, Epoch)> = Vec::new();
    let ghosts = ghosts
        .iter()
        .map(|g| {
            let at = regions.iter().position(|r| *r == (g.region, g.region_epoch)).unwrap_or_else(|| {
                regions.push((g.region, g.region_epoch));
                regions.len() - 1
            });
            ppb::Ghost {
                id: g.q.id.0,
                region: at as u32,
                kind: match g.kind {
                    GhostKind::Player => ppb::EntityKind::Player,
                    GhostKind::Prop => ppb::EntityKind::Prop,
                } as i32,
                x_mm: g.q.pos[0],
                y_mm: g.q.pos[1],
                z_mm: g.q.pos[2],
                rot: g.q.rot,
                vx_cms: i32::from(g.q.vel[0]),
                vy_cms: i32::from(g.q.vel[1]),
                vz_cms: i32::from(g.q.vel[2]),
                last_input_seq: g.last_input,
                shape: g.shape.map(shape_to_pb),
                components: g.comps.as_ref().map(|c| c.to_bytes()),
            }
        })
        .collect();
    ppb::GhostBatch {
        from_server: from.0,
        tick,
        full,
        regions: regions.iter().map(|(k, e)| ppb::GhostRegion { key: Some(peer_key_to_pb(k)), epoch: e.0 }).collect(),
        ghosts,
        removed: removed.iter().map(|id| id.0).collect(),
    }
}

/// A batch from the wire, every ghost checked (components against
/// `registry`): one bad ghost refuses the whole batch.
pub fn ghost_batch_from_pb(
    b: &ppb::GhostBatch,
    registry: &shared::component::Registry,
) -> Result<GhostBatch, BadMessage> {
    if b.ghosts.len() > MAX_BATCH_GHOSTS || b.removed.len() > MAX_BATCH_GHOSTS || b.regions.len() > MAX_BATCH_GHOSTS {
        return Err(BadMessage::TooManyGhosts(b.ghosts.len().max(b.removed.len()).max(b.regions.len())));
    }
    let regions: Vec<(RegionKey, Epoch)> =
        b.regions.iter().map(|r| Ok((peer_key(r.key.as_ref())?, Epoch(r.epoch)))).collect::<Result<_, _>>()?;
    let from = ServerId(b.from_server);
    let ghosts = b
        .ghosts
        .iter()
        .map(|g| {
            let (region, region_epoch) =
                *regions.get(g.region as usize).ok_or(BadMessage::GhostRegion(g.id, g.region, regions.len()))?;
            let id = EntityId(g.id);
            let kind = match ppb::EntityKind::try_from(g.kind) {
                Ok(ppb::EntityKind::Player) if id.as_player().is_some() => GhostKind::Player,
                Ok(ppb::EntityKind::Prop) if id.as_player().is_none() => GhostKind::Prop,
                _ => return Err(BadMessage::BadGhost(g.id, "kind does not match the id")),
            };
            let pos = [g.x_mm, g.y_mm, g.z_mm];
            if pos.iter().any(|v| v.abs() > MAX_GHOST_MM) {
                return Err(BadMessage::BadGhost(g.id, "position out of range"));
            }
            if g.rot >> 47 != 0 {
                return Err(BadMessage::BadGhost(g.id, "rotation wider than 47 bits"));
            }
            let cms = |v: i32| i16::try_from(v).map_err(|_| BadMessage::BadGhost(g.id, "velocity out of range"));
            let shape = match (&g.shape, kind) {
                (None, GhostKind::Player) => None,
                (Some(sh), GhostKind::Prop) => {
                    Some(shape_from_pb(sh).map_err(|_| BadMessage::BadGhost(g.id, "bad prop shape"))?)
                }
                _ => return Err(BadMessage::BadGhost(g.id, "a prop has a shape, a player none")),
            };
            let comps = match &g.components {
                Some(bytes) => Some(std::sync::Arc::new(
                    shared::component::ComponentSet::decode(bytes, registry).map_err(BadMessage::Components)?,
                )),
                None => None,
            };
            Ok(GhostState {
                region,
                region_epoch,
                kind,
                last_input: g.last_input_seq,
                shape,
                comps,
                q: shared::snapshot::QEntity {
                    id,
                    pos,
                    rot: g.rot,
                    vel: [cms(g.vx_cms)?, cms(g.vy_cms)?, cms(g.vz_cms)?],
                    authority: from,
                },
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(GhostBatch {
        from,
        tick: b.tick,
        full: b.full,
        ghosts,
        removed: b.removed.iter().map(|id| EntityId(*id)).collect(),
    })
}

/// Fastest hand a push may claim, m/s (a tracked hand moves at most a few
/// tens; more is a bad message, not a hard hit).
const MAX_HAND_SPEED: f64 = 100.0;

pub fn schema_to_pb(s: &shared::component::Schema) -> ppb::SchemaResponse {
    ppb::SchemaResponse {
        entries: s
            .0
            .iter()
            .map(|e| ppb::SchemaEntry { id: u32::from(e.id), name: e.name.clone(), version: u32::from(e.version) })
            .collect(),
    }
}

/// A peer's schema: at most as many components as a registry holds, ids
/// and versions in range, names as a registry allows, ascending ids.
pub fn schema_from_pb(r: &ppb::SchemaResponse) -> Result<shared::component::Schema, BadMessage> {
    shared::component::Schema::checked(r.entries.iter().map(|e| (e.id, e.name.as_str(), e.version)))
        .map_err(BadMessage::BadSchema)
}

/// Components as the coordinator's messages carry them.
pub fn components_to_mesh_pb(entries: &[shared::component::SchemaEntry]) -> Vec<mpb::ComponentEntry> {
    entries
        .iter()
        .map(|e| mpb::ComponentEntry { id: u32::from(e.id), name: e.name.clone(), version: u32::from(e.version) })
        .collect()
}

pub fn interaction_to_pb(i: &Interaction) -> ppb::InteractRequest {
    use ppb::interact_request::Kind;
    ppb::InteractRequest {
        from_server: i.from.0,
        entity: i.entity.0,
        region: Some(peer_key_to_pb(&i.region)),
        region_epoch: i.region_epoch.0,
        point: Some(v3(i.point)),
        kind: Some(match i.kind {
            InteractKind::Push { hand_vel } => Kind::Push(ppb::Push { hand_velocity: Some(v3(hand_vel.as_dvec3())) }),
            InteractKind::Grab { to_region, to_region_epoch } => Kind::Grab(ppb::Grab {
                to_region: Some(peer_key_to_pb(&to_region)),
                to_region_epoch: to_region_epoch.0,
            }),
        }),
    }
}

pub fn interaction_from_pb(r: &ppb::InteractRequest) -> Result<Interaction, BadMessage> {
    use ppb::interact_request::Kind;
    let kind = match r.kind.as_ref().ok_or(BadMessage::Missing("kind"))? {
        Kind::Push(p) => {
            let v = finite_v3(p.hand_velocity.as_ref(), "push.hand_velocity")?;
            if v.length() > MAX_HAND_SPEED {
                return Err(BadMessage::BadInteraction("the hand is faster than any hand"));
            }
            InteractKind::Push { hand_vel: v.as_vec3() }
        }
        Kind::Grab(g) => InteractKind::Grab {
            to_region: peer_key_named(g.to_region.as_ref(), "grab.to_region")?,
            to_region_epoch: Epoch(g.to_region_epoch),
        },
    };
    let point = finite_v3(r.point.as_ref(), "point")?;
    if point.abs().max_element() * 1000.0 > MAX_GHOST_MM as f64 {
        return Err(BadMessage::BadInteraction("the hand is outside any world"));
    }
    Ok(Interaction {
        from: ServerId(r.from_server),
        entity: EntityId(r.entity),
        region: peer_key_named(r.region.as_ref(), "region")?,
        region_epoch: Epoch(r.region_epoch),
        point,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use glam::Vec3;

    fn state() -> HandoffState {
        HandoffState {
            transfer_id: 9,
            from: ServerId(1),
            to: ServerId(2),
            entity: EntityId(42),
            entity_epoch: Epoch(3),
            to_region: RegionKey::new(1, 2, 0, 1),
            to_region_epoch: Epoch(7),
            effective_tick: 1000,
            pos: DVec3::new(2010.5, 10.0, -3.25),
            yaw: 1.5,
            vel: Vec3::new(6.0, 0.0, 0.0),
            player: Some(PlayerId(42)),
            last_applied_input: 77,
            pending_inputs: vec![InputFrame { seq: 78, locomotion: [1.0, 0.0], ..Default::default() }],
            prop: None,
            crossed_tick: Some(990),
            components: {
                let mut c = shared::component::ComponentSet::new();
                c.set(&shared::component::builtin::Kind::Player);
                c.set(&shared::component::builtin::PlayerName("ada".into()));
                c
            },
        }
    }

    fn reg() -> shared::component::Registry {
        shared::component::Registry::builtin()
    }

    fn prop_state() -> HandoffState {
        HandoffState {
            entity: EntityId((3 << 40) | 5),
            player: None,
            last_applied_input: 0,
            pending_inputs: Vec::new(),
            prop: Some(PropHandoff {
                shape: PropShape::Box { half: [0.25, 0.5, 0.25] },
                rot: glam::Quat::from_rotation_z(0.7),
                angvel: Vec3::new(0.0, 3.0, -1.0),
                sleeping: false,
            }),
            ..state()
        }
    }

    #[test]
    fn handoff_round_trips() {
        let s = state();
        assert_eq!(handoff_from_pb(&handoff_to_pb(&s), &reg()), Ok(s));
        let p = prop_state();
        assert_eq!(handoff_from_pb(&handoff_to_pb(&p), &reg()), Ok(p));
    }

    #[test]
    fn a_prop_handoff_without_a_sane_body_is_refused() {
        let mut r = handoff_to_pb(&prop_state());
        r.prop = None;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::Missing("prop")));
        let mut r = handoff_to_pb(&prop_state());
        r.prop.as_mut().unwrap().rw = 3.0;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::BadProp("rotation is not a unit quaternion")));
        let mut r = handoff_to_pb(&prop_state());
        r.prop.as_mut().unwrap().shape = Some(ppb::prop_state::Shape::BallRadius(40.0));
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::BadProp("shape out of range")));
        let mut r = handoff_to_pb(&prop_state());
        r.prop.as_mut().unwrap().angular_velocity.as_mut().unwrap().y = f64::INFINITY;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::NonFinite("prop.angular_velocity")));
    }

    /// Components move with the entity; a set the target cannot read
    /// (a component it does not know, a value out of range) is refused whole.
    #[test]
    fn a_handoff_carries_the_components_and_refuses_what_it_cannot_read() {
        let s = state();
        let back = handoff_from_pb(&handoff_to_pb(&s), &reg()).unwrap();
        assert_eq!(back.components, s.components);
        assert_eq!(back.components.get::<shared::component::builtin::PlayerName>().unwrap().unwrap().0, "ada");
        let mut r = handoff_to_pb(&s);
        r.components = vec![1, 0xe8, 0x07, 1, 0]; // component 1000, unknown here
        let e = handoff_from_pb(&r, &reg()).unwrap_err();
        assert_eq!(e.reason(), "unknown_component", "{e}");
        r.components = vec![1, 2, 1, 9]; // a kind that does not exist
        assert_eq!(handoff_from_pb(&r, &reg()).unwrap_err().reason(), "component_out_of_range");
        // None at all is an empty set.
        let mut r = handoff_to_pb(&s);
        r.components.clear();
        assert!(handoff_from_pb(&r, &reg()).unwrap().components.is_empty());
    }

    #[test]
    fn malformed_handoffs_are_refused() {
        let mut r = handoff_to_pb(&state());
        r.state.as_mut().unwrap().position.as_mut().unwrap().x = f64::NAN;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::NonFinite("state.position")));
        let mut r = handoff_to_pb(&state());
        r.to_region.as_mut().unwrap().level = 7;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::Level(7)));
        let mut r = handoff_to_pb(&state());
        r.state = None;
        assert_eq!(handoff_from_pb(&r, &reg()), Err(BadMessage::Missing("state")));
    }

    fn push() -> Interaction {
        Interaction {
            from: ServerId(2),
            entity: EntityId((1 << 40) | 3),
            region: RegionKey::root(0, 0, 0),
            region_epoch: Epoch(1),
            point: DVec3::new(1999.5, 64.25, 1000.0),
            kind: InteractKind::Push { hand_vel: Vec3::new(4.5, 0.0, 0.0) },
        }
    }

    #[test]
    fn interactions_round_trip_and_bad_ones_are_refused() {
        let p = push();
        assert_eq!(interaction_from_pb(&interaction_to_pb(&p)), Ok(p));
        let g = Interaction {
            kind: InteractKind::Grab { to_region: RegionKey::root(1, 0, 0), to_region_epoch: Epoch(2) },
            ..push()
        };
        assert_eq!(interaction_from_pb(&interaction_to_pb(&g)), Ok(g));
        let mut r = interaction_to_pb(&p);
        r.point.as_mut().unwrap().y = f64::NAN;
        assert_eq!(interaction_from_pb(&r), Err(BadMessage::NonFinite("point")));
        let mut r = interaction_to_pb(&p);
        r.kind = None;
        assert_eq!(interaction_from_pb(&r), Err(BadMessage::Missing("kind")));
        let mut r = interaction_to_pb(&p);
        r.kind = Some(ppb::interact_request::Kind::Push(ppb::Push {
            hand_velocity: Some(ppb::Vec3 { x: 1e6, y: 0.0, z: 0.0 }),
        }));
        assert_eq!(interaction_from_pb(&r), Err(BadMessage::BadInteraction("the hand is faster than any hand")));
        let mut r = interaction_to_pb(&g);
        r.region = None;
        assert_eq!(interaction_from_pb(&r), Err(BadMessage::Missing("region")));
        let mut r = interaction_to_pb(&g);
        r.point.as_mut().unwrap().x = 1e300;
        assert_eq!(interaction_from_pb(&r), Err(BadMessage::BadInteraction("the hand is outside any world")));
    }

    proptest::proptest! {
        /// Fuzzing the peer and coordinator decoders: any bytes, and valid
        /// messages with bytes flipped, decode to a value or a refusal,
        /// never a panic.
        #[test]
        fn arbitrary_peer_and_map_messages_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 0..8),
        ) {
            use prost::Message;
            if let Ok(r) = ppb::HandoffRequest::decode(bytes.as_slice()) {
                let _ = handoff_from_pb(&r, &reg());
            }
            if let Ok(m) = mpb::RegionMap::decode(bytes.as_slice()) {
                let _ = map_from_pb(&m);
            }
            if let Ok(f) = ppb::InputFrame::decode(bytes.as_slice()) {
                let _ = input_from_pb(&f);
            }
            if let Ok(i) = ppb::InteractRequest::decode(bytes.as_slice()) {
                let _ = interaction_from_pb(&i);
            }
            let mut valid = handoff_to_pb(&state()).encode_to_vec();
            for (at, b) in flips {
                let n = valid.len();
                valid[at % n] ^= b;
            }
            if let Ok(r) = ppb::HandoffRequest::decode(valid.as_slice()) {
                let _ = handoff_from_pb(&r, &reg());
            }
        }
    }

    #[test]
    fn trees_rebuild_from_their_leaves() {
        let mut t = RegionTree::grid(glam::IVec3::ZERO, 2, 1, 1);
        let kids = t.split(RegionKey::root(1, 0, 0)).unwrap();
        t.split(kids[3]).unwrap();
        assert_eq!(tree_from_leaves(t.leaves()), t);
    }
}

/// The coordinator's refusal of a command: the typed code in the status
/// details, else (a coordinator of the previous release) the reason its
/// message starts with, else the status code.
pub fn refusal_from_coordinator(s: &tonic::Status) -> Refused {
    use mpb::RefusalCode as C;
    let typed = <mpb::Refusal as prost::Message>::decode(s.details()).ok().and_then(|r| {
        let refusal = match C::try_from(r.code).ok()? {
            C::Unspecified => return None,
            C::Fenced => Refusal::Fenced,
            C::StaleRegionEpoch => Refusal::StaleRegionEpoch,
            C::StaleEntityEpoch => Refusal::StaleEntityEpoch,
            C::SameServer => Refusal::SameServer,
            C::UnknownRegion => Refusal::UnknownRegion,
            C::NoOwner => Refusal::NoOwner,
            C::NotCommitted => Refusal::NotCommitted,
            C::Exhausted => Refusal::Exhausted,
            C::SchemaMismatch => Refusal::SchemaMismatch,
            // Refusals of operator commands and lookups: not decisions
            // about a transfer.
            C::UnknownServer
            | C::UnknownTransfer
            | C::Draining
            | C::LastServer
            | C::TooSmall
            | C::NotMergeable
            | C::BadThresholds => Refusal::Unknown,
        };
        Some(Refused::new(refusal, r.detail))
    });
    typed.unwrap_or_else(|| {
        let reason = s.message().split(':').next().unwrap_or_default();
        let refusal = match reason {
            "fenced" => Refusal::Fenced,
            "stale_epoch" => Refusal::StaleEntityEpoch,
            "same_server" => Refusal::SameServer,
            "unknown_region" => Refusal::UnknownRegion,
            "no_owner" => Refusal::NoOwner,
            "not_bootstrapped" | "unavailable" => Refusal::NotCommitted,
            "ids_exhausted" | "directory_full" | "transfers_full" => Refusal::Exhausted,
            "schema_mismatch" => Refusal::SchemaMismatch,
            _ if s.code() == tonic::Code::FailedPrecondition => Refusal::StaleEntityEpoch,
            _ if s.code() == tonic::Code::NotFound => Refusal::Unknown,
            _ => Refusal::NotCommitted,
        };
        Refused::new(refusal, s.message())
    })
}

/// A target's refusal of a handoff as the wire carries it.
fn handoff_refusal_to_pb(r: Refusal) -> ppb::HandoffRefusal {
    match r {
        Refusal::WrongServer => ppb::HandoffRefusal::WrongServer,
        Refusal::TargetStaleEpoch => ppb::HandoffRefusal::StaleEpoch,
        Refusal::AlreadyHeld => ppb::HandoffRefusal::AlreadyHeld,
        Refusal::BadRequest => ppb::HandoffRefusal::BadRequest,
        _ => ppb::HandoffRefusal::Busy,
    }
}

/// A handoff refused by this server, as it answers: the status the
/// previous release reads (`code`, `<reason>: <words>`), with the typed
/// refusal in its details.
pub fn handoff_refusal_status(code: tonic::Code, refused: &Refused) -> tonic::Status {
    let answer = ppb::HandoffResponse {
        accepted: false,
        reason: refused.to_string(),
        refusal: handoff_refusal_to_pb(refused.refusal) as i32,
    };
    let details = bytes::Bytes::from(prost::Message::encode_to_vec(&answer));
    tonic::Status::with_details(code, refused.to_string(), details)
}

/// The simulation's refusal to adopt a handoff, as this server answers it.
pub fn adopt_refusal_status(e: &crate::sim::messages::AdoptError) -> tonic::Status {
    use crate::sim::messages::AdoptError;
    let (code, refusal) = match e {
        AdoptError::WrongServer(_) => (tonic::Code::FailedPrecondition, Refusal::WrongServer),
        AdoptError::StaleRegionEpoch { .. } => (tonic::Code::FailedPrecondition, Refusal::TargetStaleEpoch),
        AdoptError::StaleEntityEpoch(..) => (tonic::Code::FailedPrecondition, Refusal::AlreadyHeld),
        // Busy, not a decision: the source tries again.
        AdoptError::Unavailable => (tonic::Code::Unavailable, Refusal::Busy),
    };
    handoff_refusal_status(code, &Refused::new(refusal, e.to_string()))
}

/// A handoff answer that is not `accepted`, typed.
pub fn refusal_from_handoff_answer(a: &ppb::HandoffResponse) -> Option<Refused> {
    let refusal = match ppb::HandoffRefusal::try_from(a.refusal).unwrap_or(ppb::HandoffRefusal::Unspecified) {
        ppb::HandoffRefusal::Unspecified => return None,
        ppb::HandoffRefusal::WrongServer => Refusal::WrongServer,
        ppb::HandoffRefusal::StaleEpoch => Refusal::TargetStaleEpoch,
        ppb::HandoffRefusal::AlreadyHeld => Refusal::AlreadyHeld,
        ppb::HandoffRefusal::Busy => Refusal::Busy,
        ppb::HandoffRefusal::BadRequest => Refusal::BadRequest,
    };
    Some(Refused::new(refusal, a.reason.clone()))
}

/// What a target's answer to a handoff means: taken, or refused and why.
/// Reads the typed refusal (in an answer, or in a status's details), else
/// what a target of the previous release says: `already_held` leading its
/// message, failed precondition or invalid argument (final), any other
/// status (the target busy or unreachable: try again).
pub fn handoff_answer(answer: Result<&ppb::HandoffResponse, &tonic::Status>) -> Result<(), Refused> {
    match answer {
        Ok(a) if a.accepted => Ok(()),
        // The previous release never answers `accepted: false`; a target
        // that does without a code refused it for good.
        Ok(a) => {
            Err(refusal_from_handoff_answer(a).unwrap_or_else(|| Refused::new(Refusal::BadRequest, a.reason.clone())))
        }
        Err(s) => {
            if let Ok(a) = <ppb::HandoffResponse as prost::Message>::decode(s.details())
                && let Some(r) = refusal_from_handoff_answer(&a)
            {
                return Err(r);
            }
            let reason = s.message().split(':').next().unwrap_or_default();
            let named = Refusal::from_label(reason).filter(|r| r.class() != crate::handoff::Class::Transient);
            let refusal = named.unwrap_or(match s.code() {
                tonic::Code::FailedPrecondition => Refusal::TargetStaleEpoch,
                tonic::Code::InvalidArgument => Refusal::BadRequest,
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted => Refusal::Busy,
                _ => Refusal::Unreachable,
            });
            Err(Refused::new(refusal, s.message()))
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use crate::handoff::Class;
    use crate::sim::messages::AdoptError;
    use mesh_coordinator::state::CommandError;

    /// A status as the previous release sent it: code and message, no details.
    fn legacy(s: &tonic::Status) -> tonic::Status {
        tonic::Status::new(s.code(), s.message())
    }

    #[test]
    fn a_targets_refusal_reads_the_same_typed_and_in_the_previous_releases_form() {
        let region = RegionKey::root(1, 0, 0);
        let cases = [
            (AdoptError::WrongServer(ServerId(3)), Refusal::WrongServer),
            (AdoptError::StaleRegionEpoch { region, known: Epoch(4), claimed: Epoch(3) }, Refusal::TargetStaleEpoch),
            (AdoptError::StaleEntityEpoch(EntityId(9), Epoch(2)), Refusal::AlreadyHeld),
            // Busy is not a decision: the source sends it again.
            (AdoptError::Unavailable, Refusal::Busy),
        ];
        for (e, want) in cases {
            let status = adopt_refusal_status(&e);
            assert_eq!(handoff_answer(Err(&status)).map_err(|r| r.refusal), Err(want), "{e:?}");
            // What this release sends, read by the previous one: its code and
            // the reason leading its message.
            assert_eq!(status.message().split(':').next(), Some(want.label()), "{e:?}");
            let old_reads_final =
                matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument);
            assert_eq!(old_reads_final, want.class() == Class::Permanent || want == Refusal::AlreadyHeld, "{e:?}");
            // Without the details (an older target), the same class.
            let old = handoff_answer(Err(&legacy(&status))).map_err(|r| r.refusal.class());
            assert_eq!(old, Err(want.class()), "{e:?}");
        }
        assert_eq!(handoff_answer(Ok(&ppb::HandoffResponse { accepted: true, ..Default::default() })), Ok(()));
        let unreachable = tonic::Status::deadline_exceeded("no answer");
        assert_eq!(handoff_answer(Err(&unreachable)).map_err(|r| r.refusal), Err(Refusal::Unreachable));
    }

    #[test]
    fn a_coordinators_refusal_reads_the_same_typed_and_in_the_previous_releases_form() {
        use mesh_coordinator::grpc::status_of;
        let region = RegionKey::root(1, 0, 0);
        let cases = [
            (CommandError::Fenced(ServerId(1)), Refusal::Fenced),
            (
                CommandError::StaleRegionEpoch { region, server: ServerId(1), claimed: Epoch(1), current: Epoch(2) },
                Refusal::StaleRegionEpoch,
            ),
            (
                CommandError::StaleEntityEpoch {
                    entity: EntityId(9),
                    server: ServerId(1),
                    claimed: Epoch(1),
                    holder: ServerId(2),
                    current: Epoch(2),
                },
                Refusal::StaleEntityEpoch,
            ),
            (CommandError::SameServer(region), Refusal::SameServer),
            (CommandError::UnknownRegion(region), Refusal::UnknownRegion),
            (CommandError::NoOwner(region), Refusal::NoOwner),
            (CommandError::NotBootstrapped, Refusal::NotCommitted),
            (CommandError::Unavailable("no leader".into()), Refusal::NotCommitted),
            (CommandError::DirectoryFull, Refusal::Exhausted),
            (CommandError::TooManyTransfers(5), Refusal::Exhausted),
            (CommandError::UnknownTransfer(5), Refusal::Unknown),
        ];
        for (e, want) in cases {
            let status = status_of(e.clone());
            assert_eq!(refusal_from_coordinator(&status).refusal, want, "{e:?}");
            let old = refusal_from_coordinator(&legacy(&status)).refusal.class();
            assert_eq!(old, want.class(), "{e:?} from a coordinator of the previous release");
        }
    }
}
