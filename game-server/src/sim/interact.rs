//! Cross-boundary interaction: a player here touching a prop a neighbour
//! owns (a ghost here).
//!
//! The player's server never changes a ghost. It tells the owner what the
//! hand did, and the owner applies it to the entity it simulates; the
//! result comes back through overlap sync like any other motion:
//! - **push** (a hand moving into the prop, fast or slow: a hit is a fast
//!   push): the owner gives the prop the velocity the hand had along the
//!   contact normal, as an impulse;
//! - **grab** (a grip closing within reach of it): the owner hands the prop
//!   to the grabbing player's server, through the coordinator like any
//!   handoff (new entity epoch), released at once wherever it is. The prop
//!   arrives in the hand if the grip is still closed. Once thrown, it goes
//!   back by the normal boundary rules if it lands in the owner's region.
//!
//! Ghost props are not in this server's physics: its own props pass
//! through them. (Kinematic copies of them were tried: two servers' props
//! resting against each other's copies, each pushed by the other's with a
//! tick or two of lag, kept each other awake, and over 15 minutes of the
//! handoff bench the ticks that overran their slot grew from 2 a minute to
//! 750.)
//!
//! The owner checks every request against its own state; a refusal is
//! counted in `interactions_total{kind,result}` and changes nothing.

use std::collections::HashMap;

use bevy_ecs::prelude::*;
use glam::{DVec3, IVec3, Quat, Vec3};
use rapier3d::prelude::RigidBodyType;
use shared::region::RegionKey;
use shared::{EntityId, Epoch, ServerId, Tick};
use tracing::debug;

use super::authority::{Authority, Transfer};
use super::core::*;
use super::ghosts::{GhostKind, Ghosts};
use super::messages::SimOut;
pub use super::messages::{InteractKind, InteractRefusal, Interaction};
use super::physics::{GRAB_RADIUS, HAND_RADIUS, Hands, Held, Physics, Prop, PropShape};
use crate::sim::inbox::Outbox;

/// Ticks between two pushes of one hand (the owner's answer takes a tick or
/// two to come back through sync; the owner ignores what a push adds to a
/// prop already moving away at the hand's speed).
pub const PUSH_COOLDOWN_TICKS: Tick = 6;
/// How long a hand waits for a grabbed prop to arrive (90 ticks: a second
/// at 90 Hz, for the owner's transfer to commit and its handoff to come).
pub const PENDING_GRAB_TICKS: Tick = 90;
/// Slowest hand, relative to the prop along the contact normal, that pushes,
/// m/s (a hand resting against a prop does not push it).
const MIN_PUSH_SPEED: f32 = 0.3;
/// Fastest change of velocity one push gives, m/s.
const MAX_PUSH_SPEED: f32 = 30.0;
/// What the owner allows beyond a hand's reach for the time the request
/// took to come (the requester saw the prop a tick or two ago), metres.
const REACH_SLACK_M: f64 = 1.0;
/// Cells of the per-tick grid of ghost props, metres.
const CELL_M: f64 = 2.0;

/// A prop asked for by a neighbour's player: it is released to that
/// neighbour the tick its transfer takes effect, wherever it is.
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteGrab(pub Tick);

impl PropShape {
    /// Radius of the sphere around the centre that holds the whole shape.
    pub fn bounding_radius(&self) -> f32 {
        match *self {
            PropShape::Box { half } => Vec3::from(half).length(),
            PropShape::Ball { radius } => radius,
        }
    }

    /// Distance from `p` to the surface of the shape placed at `center`
    /// turned by `rot` (negative inside).
    pub fn distance(&self, center: DVec3, rot: Quat, p: DVec3) -> f64 {
        match *self {
            PropShape::Ball { radius } => (p - center).length() - f64::from(radius),
            PropShape::Box { half } => {
                let local = rot.inverse().as_dquat() * (p - center);
                let q = local.abs() - Vec3::from(half).as_dvec3();
                q.max(DVec3::ZERO).length() + q.max_element().min(0.0)
            }
        }
    }
}

/// Applies a neighbour's interaction to an entity this server owns, and
/// counts it.
pub fn apply(world: &mut World, i: &Interaction) -> Result<(), InteractRefusal> {
    let checked = check_grab_region(world, i).and_then(|()| check(world, i));
    let verdict = checked.and_then(|(e, prop, pos)| match i.kind {
        InteractKind::Push { hand_vel } => push(world, prop, pos, i.point, hand_vel),
        InteractKind::Grab { to_region, .. } => grab(world, e, i.entity, to_region),
    });
    let result = verdict.map_or_else(|r| r.reason(), |()| "applied");
    world.resource::<SimMetrics>().0.interactions.with_label_values(&[i.kind.label(), result]).inc();
    if let Err(r) = verdict {
        debug!(entity = %i.entity, from = %i.from, kind = i.kind.label(), reason = r.reason(), "interaction refused");
    }
    verdict
}

/// The prop `i` names, if the sender may act on it: its entity, its rigid
/// body, its position.
fn check(world: &World, i: &Interaction) -> Result<(Entity, Prop, DVec3), InteractRefusal> {
    let cfg = world.resource::<SimConfig>();
    let map = &world.resource::<Map>().0;
    if i.from == cfg.server {
        return Err(InteractRefusal::OwnServer);
    }
    if !map.servers.get(&i.from).is_some_and(|p| p.alive) {
        return Err(InteractRefusal::UnknownServer);
    }
    let senders = |l: &RegionKey| matches!(map.owners.get(l), Some((Some(o), _)) if *o == i.from);
    let near_sender = map.tree.leaf_at(i.point).into_iter().chain(map.tree.overlapping_leaves(i.point, cfg.overlap_m));
    if !near_sender.into_iter().any(|l| senders(&l)) {
        return Err(InteractRefusal::OutsideZone);
    }
    let Some(e) = world.resource::<Index>().by_net.get(&i.entity).copied() else {
        return Err(if world.resource::<Ghosts>().by_id.contains_key(&i.entity) {
            InteractRefusal::NotOwner
        } else {
            InteractRefusal::UnknownEntity
        });
    };
    let auth = world.get::<Authority>(e).ok_or(InteractRefusal::NotOwner)?;
    if auth.region() != i.region || auth.region_epoch() != i.region_epoch {
        return Err(InteractRefusal::StaleEpoch);
    }
    let prop = *world.get::<Prop>(e).ok_or(InteractRefusal::NotAProp)?;
    let body = world.get::<Body>(e).ok_or(InteractRefusal::UnknownEntity)?;
    let reach = f64::from(prop.shape.bounding_radius() + HAND_RADIUS + GRAB_RADIUS)
        + REACH_SLACK_M
        + f64::from(body.vel.length()) * 0.2;
    if (i.point - body.pos).length() > reach {
        return Err(InteractRefusal::OutOfReach);
    }
    if held_here(world, e) {
        return Err(InteractRefusal::Held);
    }
    Ok((e, prop, body.pos))
}

fn held_here(world: &World, prop: Entity) -> bool {
    world
        .try_query::<&Hands>()
        .is_some_and(|mut q| q.iter(world).any(|h| h.hands.iter().any(|h| h.held.is_some_and(|x| x.prop == prop))))
}

/// The hand's velocity along the contact normal, less the prop's, becomes
/// the prop's: an impulse through its centre.
fn push(world: &mut World, prop: Prop, pos: DVec3, point: DVec3, hand_vel: Vec3) -> Result<(), InteractRefusal> {
    if !hand_vel.is_finite() {
        return Err(InteractRefusal::OutOfReach);
    }
    let mut physics = world.resource_mut::<Physics>();
    let Some(rb) = physics.world.bodies.get_mut(prop.body) else { return Err(InteractRefusal::UnknownEntity) };
    if rb.body_type() != RigidBodyType::Dynamic {
        return Err(InteractRefusal::Held);
    }
    let n = (pos - point).as_vec3().try_normalize().or_else(|| hand_vel.try_normalize()).unwrap_or(Vec3::Y);
    let dv = (hand_vel - rb.linvel()).dot(n).clamp(0.0, MAX_PUSH_SPEED);
    if dv > 0.0 {
        let impulse = n * dv * rb.mass();
        rb.apply_impulse(impulse, true);
    }
    Ok(())
}

/// Asks the coordinator to hand the prop to the grabbing player's server;
/// [`RemoteGrab`] releases it as soon as the transfer takes effect.
fn grab(world: &mut World, e: Entity, entity: EntityId, to_region: RegionKey) -> Result<(), InteractRefusal> {
    if world.get::<Transfer>(e).is_some_and(|t| !t.is_backing_off()) {
        return Err(InteractRefusal::Busy);
    }
    let (Some(auth), Some(body)) = (world.get::<Authority>(e).copied(), world.get::<Body>(e).copied()) else {
        return Err(InteractRefusal::NotOwner);
    };
    let tick = world.resource::<TickState>().tick;
    if !super::authority::request_transfer(world, e, entity, auth, to_region, body.pos, tick + 1) {
        return Err(InteractRefusal::Busy);
    }
    world.entity_mut(e).insert(RemoteGrab(tick));
    Ok(())
}

/// A grab hands the prop into a region of the sender's, under the epoch this
/// server's map has.
fn check_grab_region(world: &World, i: &Interaction) -> Result<(), InteractRefusal> {
    let InteractKind::Grab { to_region, to_region_epoch } = i.kind else { return Ok(()) };
    match world.resource::<Map>().0.live_owner(&to_region) {
        Some((o, epoch)) if o == i.from && epoch == to_region_epoch => Ok(()),
        _ => Err(InteractRefusal::WrongRegion),
    }
}

/// A ghost prop near a hand, for this tick.
#[derive(Debug, Clone, Copy)]
struct Near {
    id: EntityId,
    owner: ServerId,
    region: RegionKey,
    region_epoch: Epoch,
    pos: DVec3,
    rot: Quat,
    vel: Vec3,
    shape: PropShape,
}

/// Ghost props by grid cell, rebuilt each tick there are any.
#[derive(Debug, Default)]
pub struct ReachScratch {
    props: Vec<Near>,
    cells: HashMap<IVec3, Vec<u32>>,
}

fn cell(p: DVec3) -> IVec3 {
    (p / CELL_M).floor().as_ivec3()
}

/// The requester's side: hands of players here that push a ghost prop or
/// close their grip on one send the act to its owner. Runs after
/// [`super::physics::hands`] has moved the hands and handled grips on this
/// server's own props.
#[allow(clippy::too_many_arguments)]
pub fn reach(
    ghosts: Res<Ghosts>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    out: Res<Outbox>,
    metrics: Res<SimMetrics>,
    mut scratch: Local<ReachScratch>,
    mut players: Query<(&Authority, &mut Hands)>,
) {
    let t = tick.tick;
    let dt = f64::from(tick.dt.max(1e-4));
    let ReachScratch { props, cells } = &mut *scratch;
    props.clear();
    cells.clear();
    for g in ghosts.by_id.values() {
        let (GhostKind::Prop, Some(shape)) = (g.state.kind, g.state.shape) else { continue };
        let s = g.state.q.state();
        let near = Near {
            id: g.state.q.id,
            owner: g.state.q.authority,
            region: g.state.region,
            region_epoch: g.state.region_epoch,
            pos: s.pos,
            rot: Quat::from_array(s.rot).normalize(),
            vel: Vec3::from(s.vel),
            shape,
        };
        let r = f64::from(shape.bounding_radius() + HAND_RADIUS + GRAB_RADIUS);
        let (lo, hi) = (cell(near.pos - DVec3::splat(r)), cell(near.pos + DVec3::splat(r)));
        let idx = props.len() as u32;
        props.push(near);
        for x in lo.x..=hi.x {
            for y in lo.y..=hi.y {
                for z in lo.z..=hi.z {
                    cells.entry(IVec3::new(x, y, z)).or_default().push(idx);
                }
            }
        }
    }
    let send = |to: ServerId, i: Interaction| {
        let label = i.kind.label();
        let result = if out.0.try_send(SimOut::Interact { to, interaction: i }).is_ok() { "sent" } else { "dropped" };
        metrics.0.interactions.with_label_values(&[label, result]).inc();
    };
    for (auth, mut hands) in players.iter_mut() {
        // Only look (and so only mark the component changed) when there
        // is something to do.
        let waiting = hands.hands.iter().any(|h| h.pending_grab.is_some());
        if props.is_empty() && !waiting {
            continue;
        }
        for hand in hands.hands.iter_mut() {
            if let Some((_, at)) = hand.pending_grab
                && (!hand.grip || hand.held.is_some() || t > at + PENDING_GRAB_TICKS)
            {
                hand.pending_grab = None;
            }
            if hand.held.is_some() {
                continue;
            }
            let Some(candidates) = cells.get(&cell(hand.pos)) else { continue };
            for &k in candidates {
                let g = &props[k as usize];
                let d = g.shape.distance(g.pos, g.rot, hand.pos);
                let interaction = |kind| Interaction {
                    from: cfg.server,
                    entity: g.id,
                    region: g.region,
                    region_epoch: g.region_epoch,
                    point: hand.pos,
                    kind,
                };
                if hand.pressed_at == t && hand.pending_grab.is_none() && d <= f64::from(GRAB_RADIUS) {
                    debug!(entity = %g.id, owner = %g.owner, "ghost prop grabbed: asking its owner for it");
                    send(
                        g.owner,
                        interaction(InteractKind::Grab {
                            to_region: auth.region(),
                            to_region_epoch: auth.region_epoch(),
                        }),
                    );
                    hand.pending_grab = Some((g.id, t));
                    break;
                }
                if d <= f64::from(HAND_RADIUS) && t >= hand.pushed_at + PUSH_COOLDOWN_TICKS {
                    let hand_vel = ((hand.pos - hand.prev_pos) / dt).as_vec3();
                    let n = (g.pos - hand.pos).as_vec3().try_normalize().unwrap_or(Vec3::ZERO);
                    if (hand_vel - g.vel).dot(n) > MIN_PUSH_SPEED {
                        send(g.owner, interaction(InteractKind::Push { hand_vel }));
                        hand.pushed_at = t;
                        break;
                    }
                }
            }
        }
    }
}

/// A prop handed here because a player's hand grabbed its ghost: if that
/// grip is still closed, the prop arrives in the hand.
pub fn arrived(world: &mut World, prop: Entity, id: EntityId) {
    let Some(body) = world.get::<Prop>(prop).map(|p| p.body) else { return };
    let mut found = None;
    let mut q = world.query::<(Entity, &Hands)>();
    for (e, h) in q.iter(world) {
        if let Some(k) = h.hands.iter().position(|h| h.pending_grab.is_some_and(|(p, _)| p == id)) {
            found = Some((e, k));
            break;
        }
    }
    let Some((player, k)) = found else { return };
    let Some(hand) = world.get::<Hands>(player).map(|h| h.hands[k]) else { return };
    let attach = hand.grip && hand.held.is_none();
    let offset = {
        let mut physics = world.resource_mut::<Physics>();
        let local = rapier3d::math::Pose::from_parts(physics.to_local(hand.pos), hand.rot);
        physics.world.bodies.get_mut(body).filter(|_| attach).map(|rb| {
            rb.set_body_type(RigidBodyType::KinematicPositionBased, true);
            local.inverse() * *rb.position()
        })
    };
    let metrics = world.resource::<SimMetrics>().0.clone();
    if let Some(mut hands) = world.get_mut::<Hands>(player) {
        let h = &mut hands.hands[k];
        h.pending_grab = None;
        if let Some(offset) = offset {
            h.held = Some(Held { prop, body, offset });
            metrics.grabs.inc();
            metrics.interactions.with_label_values(&["grab", "arrived"]).inc();
            debug!(entity = %id, "grabbed prop arrived in the hand");
        }
    }
}
