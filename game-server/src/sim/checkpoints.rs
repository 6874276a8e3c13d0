//! Offers the persisted state of the entities this server owns to the
//! checkpoint writer ([`crate::checkpoint`]): each entity every
//! [`CHECKPOINT_EVERY_TICKS`], a share of them each tick, when it changed
//! since its last offer (its persisted components, and a transform from
//! its body), and a tombstone when a player leaves. Resuming from them is
//! not built yet (issue 24, item 2).

use bevy_ecs::prelude::*;
use glam::Quat;
use persistence::Checkpoint;
use shared::component::builtin::Transform;
use shared::snapshot::QEntity;
use shared::wire::EntityState;

use super::authority::Authority;
use super::core::*;

/// Ticks between two offers of one entity (half a second at 90 Hz).
pub const CHECKPOINT_EVERY_TICKS: u64 = 45;

/// The checkpoint writer, if this server checkpoints.
#[derive(Resource, Debug, Default, Clone)]
pub struct Checkpoints(pub Option<crate::checkpoint::CheckpointHandle>);

/// What was last offered of an entity here: the same again is not.
#[derive(Component, Debug)]
pub struct LastCheckpoint {
    epoch: u64,
    components: Vec<u8>,
    /// The change tick of that offer: an entity none of whose body, prop
    /// or components changed since is not even encoded again.
    at: bevy_ecs::change_detection::Tick,
}

type Checkpointed = (
    Entity,
    &'static NetId,
    Ref<'static, Body>,
    &'static Authority,
    Option<Ref<'static, Components>>,
    Option<Ref<'static, super::physics::Prop>>,
    Option<&'static mut LastCheckpoint>,
);

/// The entity's persisted state as a checkpoint's component set.
fn state_of(
    id: shared::EntityId,
    body: &Body,
    prop: Option<&super::physics::Prop>,
    comps: Option<&Components>,
    cfg: &SimConfig,
) -> Vec<u8> {
    let rot = prop.map_or_else(|| Quat::from_rotation_y(body.yaw), |p| p.rot);
    let state = EntityState { id, pos: body.pos, rot: rot.to_array(), vel: body.vel.to_array(), authority: cfg.server };
    let q = QEntity::quantise(&state);
    let mut set = comps.map(|c| c.0.set().filtered(&cfg.registry, |p| p.persisted)).unwrap_or_default();
    set.set(&Transform { pos_mm: q.pos, rot: q.rot, vel_cms: q.vel });
    set.to_bytes()
}

fn row(
    id: shared::EntityId,
    auth: &Authority,
    body: &Body,
    tick: u64,
    cfg: &SimConfig,
    components: Vec<u8>,
) -> Checkpoint {
    let r = auth.region();
    Checkpoint {
        entity: id.0,
        held_since: auth.since(),
        epoch: auth.entity_epoch().0,
        tick,
        server: cfg.server.0,
        region: (r.level, r.x, r.y, r.z),
        pos: body.pos.to_array(),
        gone: components.is_empty(),
        components,
    }
}

/// This tick's share of the entities (and the shares of ticks skipped
/// under load), those that changed.
pub fn offer(
    mut commands: Commands,
    mut q: Query<Checkpointed>,
    checkpoints: Res<Checkpoints>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    mut last_tick: Local<Option<u64>>,
    ticks: bevy_ecs::system::SystemChangeTick,
) {
    let Some(writer) = &checkpoints.0 else { return };
    let from = last_tick.map_or(tick.tick, |l| (l + 1).max(tick.tick.saturating_sub(CHECKPOINT_EVERY_TICKS - 1)));
    *last_tick = Some(tick.tick);
    let shares: u64 = (from..=tick.tick).fold(0, |m, t| m | 1 << (t % CHECKPOINT_EVERY_TICKS));
    let mut rows = Vec::new();
    let mut offered = Vec::new();
    for (e, n, body, auth, comps, prop, last) in &mut q {
        if shares & (1 << (n.0.0 % CHECKPOINT_EVERY_TICKS)) == 0 {
            continue;
        }
        let epoch = auth.entity_epoch().0;
        let now = ticks.this_run();
        let since = |at| {
            body.last_changed().is_newer_than(at, now)
                || comps.as_ref().is_some_and(|c| c.last_changed().is_newer_than(at, now))
                || prop.as_ref().is_some_and(|p| p.last_changed().is_newer_than(at, now))
        };
        if last.as_ref().is_some_and(|l| l.epoch == epoch && !since(l.at)) {
            continue;
        }
        let components = state_of(n.0, &body, prop.as_deref(), comps.as_deref(), &cfg);
        match last {
            Some(mut l) if l.epoch == epoch && l.components == components => {
                l.at = now;
                continue;
            }
            Some(mut l) => {
                l.epoch = epoch;
                l.components.clone_from(&components);
                l.at = now;
            }
            None => {
                commands.entity(e).insert(LastCheckpoint { epoch, components: components.clone(), at: now });
            }
        }
        rows.push(row(n.0, auth, &body, tick.tick, &cfg, components));
        offered.push((n.0.0, e));
    }
    if rows.is_empty() {
        return;
    }
    // Not taken (the backlog is full): offered again next time, changed or not.
    for entity in writer.offer(rows) {
        if let Some((_, e)) = offered.iter().find(|(id, _)| *id == entity) {
            commands.entity(*e).remove::<LastCheckpoint>();
        }
    }
}

/// A tombstone for `e`, which leaves the world (its player logged out):
/// no successor resumes it.
pub fn gone(world: &World, e: Entity) {
    let Some(writer) = &world.resource::<Checkpoints>().0 else { return };
    let (Some(n), Some(body), Some(auth)) = (world.get::<NetId>(e), world.get::<Body>(e), world.get::<Authority>(e))
    else {
        return;
    };
    let tick = world.resource::<TickState>().tick;
    writer.offer([row(n.0, auth, body, tick, world.resource::<SimConfig>(), Vec::new())]);
}
