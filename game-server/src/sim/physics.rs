//! Rigid bodies: props, the hands that push and carry them, and the rapier
//! world they live in.
//!
//! rapier works in `f32` metres relative to [`Physics::origin`], a point
//! fixed for the life of the process near the regions this server holds, so
//! positions keep sub-millimetre precision anywhere in them. ECS entities
//! and rapier bodies point at each other: `Prop::body` one way, the body's
//! `user_data` (the entity's bits) the other.
//!
//! Hands are kinematic balls, created only while a prop is within reach of
//! the player (checked ten times a second) or held: a thousand players'
//! hands in the broad phase every tick would cost more than all the props.

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat, Vec3};
use rapier3d::prelude::*;
use shared::EntityId;
use shared::wire::{Pose as WirePose, buttons};
use tracing::debug;

use super::authority::Authority;
use super::core::{Avatar, Body, NetId, SimMetrics, TickState};
pub use super::messages::PropShape;

/// Collision groups: terrain, props, hands. Hands touch props only: a hand
/// ball near the ground would otherwise be tested against a whole chunk's
/// boxes every tick.
pub const TERRAIN_GROUP: Group = Group::GROUP_1;
pub const PROP_GROUP: Group = Group::GROUP_2;
pub const HAND_GROUP: Group = Group::GROUP_3;

pub fn terrain_groups() -> InteractionGroups {
    InteractionGroups::new(TERRAIN_GROUP, PROP_GROUP, InteractionTestMode::And)
}

fn hand_groups() -> InteractionGroups {
    InteractionGroups::new(HAND_GROUP, PROP_GROUP, InteractionTestMode::And)
}

fn prop_groups() -> InteractionGroups {
    InteractionGroups::new(PROP_GROUP, Group::ALL, InteractionTestMode::And)
}

/// Radius of a hand's collider, metres.
pub const HAND_RADIUS: f32 = 0.07;
/// How far from a hand a prop can be grabbed, metres.
pub const GRAB_RADIUS: f32 = 0.15;
/// A prop within this distance of a hand gives the player hand colliders.
const HAND_ACTIVATION_M: f32 = 0.5;
/// Ticks hand colliders stay after the last prop left their reach.
const HAND_LINGER_TICKS: u64 = 45;
/// Props below this height fell out of the world and are removed, metres.
const KILL_Y: f64 = -200.0;
/// Fastest throw, m/s.
const MAX_THROW_SPEED: f32 = 30.0;

/// The rapier world and the local origin it is expressed against.
#[derive(Resource)]
pub struct Physics {
    pub world: PhysicsWorld,
    pub origin: DVec3,
    /// Sleeping props the next step will wake only because a collider they
    /// rest on was rebuilt by an edit far from them: put back to sleep
    /// right after it.
    pub resleep: Vec<RigidBodyHandle>,
}

impl std::fmt::Debug for Physics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Physics")
            .field("origin", &self.origin)
            .field("bodies", &self.world.bodies.len())
            .field("colliders", &self.world.colliders.len())
            .finish()
    }
}

impl Physics {
    pub fn new(origin: DVec3) -> Self {
        let mut world = PhysicsWorld::new();
        world.integration_parameters.dt = 1.0 / 90.0;
        Self { world, origin, resleep: Vec::new() }
    }

    pub fn to_local(&self, p: DVec3) -> Vec3 {
        (p - self.origin).as_vec3()
    }

    pub fn to_world(&self, v: Vec3) -> DVec3 {
        self.origin + v.as_dvec3()
    }
}

impl PropShape {
    fn collider(&self) -> ColliderBuilder {
        match *self {
            PropShape::Box { half } => ColliderBuilder::cuboid(half[0], half[1], half[2]),
            PropShape::Ball { radius } => ColliderBuilder::ball(radius),
        }
    }
}

/// A dynamic rigid body the simulation owns.
#[derive(Component, Debug, Clone, Copy)]
pub struct Prop {
    pub body: RigidBodyHandle,
    pub shape: PropShape,
    pub rot: Quat,
}

/// One hand of a player.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hand {
    /// World position and orientation, from the newest input.
    pub pos: DVec3,
    pub rot: Quat,
    /// Where it was a tick ago, for throw speeds.
    pub prev_pos: DVec3,
    pub grip: bool,
    /// The tick the grip last closed.
    pub pressed_at: u64,
    /// The tick this hand last pushed a neighbour's prop.
    pub pushed_at: u64,
    /// A neighbour's prop this hand closed on, asked of its owner at this
    /// tick: it arrives in the hand if the grip is still closed.
    pub pending_grab: Option<(EntityId, u64)>,
    /// The kinematic ball in the physics world, while props are near.
    pub proxy: Option<RigidBodyHandle>,
    pub held: Option<Held>,
}

/// A prop held in a hand: the prop's pose relative to the hand.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub prop: Entity,
    pub body: RigidBodyHandle,
    pub offset: rapier3d::math::Pose,
}

/// A player's tracked hands, left then right.
#[derive(Component, Debug, Clone, Default)]
pub struct Hands {
    pub hands: [Hand; 2],
    /// Last tick a prop was seen within reach.
    pub props_near_at: u64,
}

/// World pose of a tracked pose given relative to the body.
pub fn world_pose(body: &Body, p: &WirePose) -> (DVec3, Quat) {
    let yaw = Quat::from_rotation_y(body.yaw);
    let local = Vec3::from(p.pos);
    let rot = Quat::from_array(p.rot);
    let rot = if rot.length_squared() > 0.0 { rot.normalize() } else { Quat::IDENTITY };
    (body.pos + (yaw * local).as_dvec3(), yaw * rot)
}

/// Spawns a prop; returns its entity.
pub fn spawn_prop(world: &mut World, id: EntityId, shape: PropShape, pos: DVec3, rot: Quat, vel: Vec3) -> Entity {
    let authority = world.get_resource::<super::core::Map>().and_then(|m| {
        let map = m.0.clone();
        let me = world.resource::<super::core::SimConfig>().server;
        let leaf = map.tree.leaf_at(pos)?;
        match map.live_owner(&leaf) {
            Some((owner, epoch)) if owner == me => {
                Some(Authority::spawned(leaf, epoch, world.resource::<TickState>().tick))
            }
            _ => None,
        }
    });
    let e = world.spawn((NetId(id), Body { pos, yaw: 0.0, vel })).id();
    let mut physics = world.resource_mut::<Physics>();
    let local = physics.to_local(pos);
    let rb = RigidBodyBuilder::dynamic()
        .pose(rapier3d::math::Pose::from_parts(local, rot))
        .linvel(vel)
        .user_data(u128::from(e.to_bits()))
        .build();
    let collider = shape.collider().density(600.0).friction(0.7).restitution(0.1).collision_groups(prop_groups());
    let (body, _) = physics.world.insert(rb, collider);
    let tick = world.resource::<TickState>().tick;
    let mut ent = world.entity_mut(e);
    ent.insert((Prop { body, shape, rot }, super::core::Components::prop(shape, tick)));
    if let Some(a) = authority {
        ent.insert(a);
    }
    world.resource_mut::<super::core::Index>().by_net.insert(id, e);
    e
}

/// Gives a prop's body its spin, and puts it to sleep if it was asleep.
pub fn set_spin(world: &mut World, e: Entity, angvel: Vec3, sleeping: bool) {
    let Some(body) = world.get::<Prop>(e).map(|p| p.body) else { return };
    let mut physics = world.resource_mut::<Physics>();
    if let Some(rb) = physics.world.bodies.get_mut(body) {
        rb.set_angvel(angvel, true);
        if sleeping {
            rb.sleep();
        }
    }
}

/// Removes what an entity has in the physics world, before it is despawned:
/// a prop's body (letting go of it first if a hand holds it), a player's
/// hand balls (dropping what they hold).
pub fn release_physics(world: &mut World, e: Entity) {
    let prop = world.get::<Prop>(e).map(|p| p.body);
    let hands = world.get::<Hands>(e).map(|h| h.hands);
    let mut physics = world.resource_mut::<Physics>();
    if let Some(body) = prop {
        physics.world.remove_body(body);
    }
    for hand in hands.into_iter().flatten() {
        if let Some(h) = hand.proxy {
            physics.world.remove_body(h);
        }
        if let Some(held) = hand.held
            && let Some(rb) = physics.world.bodies.get_mut(held.body)
        {
            rb.set_body_type(RigidBodyType::Dynamic, true);
        }
    }
    if prop.is_some() {
        // A hand holding this prop lets go.
        let mut q = world.query::<&mut Hands>();
        for mut hands in q.iter_mut(world) {
            for hand in hands.hands.iter_mut() {
                if hand.held.is_some_and(|h| h.prop == e) {
                    hand.held = None;
                }
            }
        }
    }
}

/// Hands: follow the tracked poses, appear near props, grab on grip, carry,
/// throw on release. Runs before the step, so what a hand does this tick
/// acts in this tick's step.
pub fn hands(
    mut physics: ResMut<Physics>,
    mut players: Query<(Entity, &Body, &Avatar, &mut Hands)>,
    props: Query<(), With<Prop>>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
) {
    let physics = &mut *physics;
    let dt = tick.dt.max(1e-4);
    let tick = tick.tick;
    for (i, (e, body, avatar, mut hands)) in players.iter_mut().enumerate() {
        let poses = [avatar.left, avatar.right];
        let grips = [avatar.buttons & buttons::GRIP_LEFT != 0, avatar.buttons & buttons::GRIP_RIGHT != 0];
        let holding = hands.hands.iter().any(|h| h.held.is_some());
        // Ten times a second per player: is any prop within reach?
        if (i as u64 + tick).is_multiple_of(9) {
            let l = physics.to_local(world_pose(body, &poses[0]).0);
            let r = physics.to_local(world_pose(body, &poses[1]).0);
            let m = Vec3::splat(HAND_ACTIVATION_M);
            let aabb = rapier3d::geometry::Aabb::new(l.min(r) - m, l.max(r) + m);
            let near = physics
                .world
                .query_pipeline_with_filter(QueryFilter::only_dynamic())
                .intersect_aabb_conservative(aabb)
                .next()
                .is_some();
            if near {
                hands.props_near_at = tick;
            }
        }
        let active = holding || tick.saturating_sub(hands.props_near_at) < HAND_LINGER_TICKS;
        for (k, hand) in hands.hands.iter_mut().enumerate() {
            let (pos, rot) = world_pose(body, &poses[k]);
            hand.prev_pos = if hand.pos == DVec3::ZERO { pos } else { hand.pos };
            hand.pos = pos;
            hand.rot = rot;
            let local = rapier3d::math::Pose::from_parts(physics.to_local(pos), rot);
            match (active, hand.proxy) {
                (true, None) => {
                    let rb = RigidBodyBuilder::kinematic_position_based()
                        .pose(local)
                        .user_data(u128::from(e.to_bits()))
                        .build();
                    let ball = ColliderBuilder::ball(HAND_RADIUS).density(1000.0).collision_groups(hand_groups());
                    let (h, _) = physics.world.insert(rb, ball);
                    hand.proxy = Some(h);
                }
                (true, Some(h)) => {
                    if let Some(rb) = physics.world.bodies.get_mut(h) {
                        rb.set_next_kinematic_position(local);
                    }
                }
                (false, Some(h)) => {
                    physics.world.remove_body(h);
                    hand.proxy = None;
                }
                (false, None) => {}
            }
            let pressed = grips[k] && !hand.grip;
            let released = !grips[k] && hand.grip;
            hand.grip = grips[k];
            if pressed {
                hand.pressed_at = tick;
            }
            if pressed && hand.held.is_none() {
                let ball = Ball::new(GRAB_RADIUS);
                let at = rapier3d::math::Pose::from_parts(physics.to_local(pos), Quat::IDENTITY);
                let hit = physics
                    .world
                    .query_pipeline_with_filter(QueryFilter::only_dynamic())
                    .intersect_shape(at, &ball)
                    .find_map(|(_, co)| co.parent());
                if let Some(b) = hit
                    && let Some(rb) = physics.world.bodies.get_mut(b)
                {
                    let prop = Entity::from_bits(rb.user_data as u64);
                    let offset = local.inverse() * *rb.position();
                    rb.set_body_type(RigidBodyType::KinematicPositionBased, true);
                    hand.held = Some(Held { prop, body: b, offset });
                    metrics.0.grabs.inc();
                    debug!(?prop, "prop grabbed");
                }
            } else if released && let Some(held) = hand.held.take() {
                let v = ((hand.pos - hand.prev_pos) / f64::from(dt)).as_vec3().clamp_length_max(MAX_THROW_SPEED);
                if let Some(rb) = physics.world.bodies.get_mut(held.body) {
                    rb.set_body_type(RigidBodyType::Dynamic, true);
                    rb.set_linvel(v, true);
                    rb.enable_ccd(true);
                }
                metrics.0.throws.inc();
            }
            if let Some(held) = hand.held {
                if let Some(rb) = physics.world.bodies.get_mut(held.body) {
                    rb.set_next_kinematic_position(local * held.offset);
                } else {
                    hand.held = None;
                }
                if !props.contains(held.prop) {
                    hand.held = None;
                }
            }
        }
    }
}

/// One physics step, then the moved props' state back into the ECS.
pub fn step(
    mut physics: ResMut<Physics>,
    mut props: Query<(&mut Body, &mut Prop, &NetId)>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut index: ResMut<super::core::Index>,
    mut commands: Commands,
) {
    let physics = &mut *physics;
    physics.world.integration_parameters.dt = tick.dt;
    let t0 = std::time::Instant::now();
    physics.world.step();
    for h in std::mem::take(&mut physics.resleep) {
        if let Some(rb) = physics.world.bodies.get_mut(h)
            && rb.is_dynamic()
        {
            rb.sleep();
        }
    }
    let took = t0.elapsed().as_secs_f64();
    metrics.0.physics_step.observe(took);
    let origin = physics.origin;
    let mut fell = Vec::new();
    let mut awake = 0usize;
    for (_, rb) in physics.world.active_bodies() {
        if !rb.is_dynamic() && !rb.is_kinematic() {
            continue;
        }
        awake += usize::from(rb.is_dynamic());
        let e = Entity::from_bits(rb.user_data as u64);
        let Ok((mut body, mut prop, net)) = props.get_mut(e) else { continue };
        body.pos = origin + rb.translation().as_dvec3();
        body.vel = rb.linvel();
        prop.rot = *rb.rotation();
        if body.pos.y < KILL_Y {
            fell.push((e, prop.body, net.0));
        }
    }
    awake -= fell.len().min(awake);
    for (e, b, id) in fell {
        physics.world.remove_body(b);
        index.by_net.remove(&id);
        commands.entity(e).despawn();
        metrics.0.props_removed.with_label_values(&["fell_out"]).inc();
    }
    metrics.0.props_awake.set(awake as i64);
}
