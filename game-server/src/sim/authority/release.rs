//! Departures: an entity whose transfer takes effect next tick is shipped
//! to its new owner at the end of this tick, after this tick's snapshots.

use bevy_ecs::prelude::*;
use glam::Vec3;
use shared::wire::{JoinRole, ServerControl};
use tracing::{info, warn};

use super::{Authority, Crossed};
use crate::sim::authority::adopt::*;
use crate::sim::core::*;
use crate::sim::inbox::send;
use crate::sim::inbox::{Conns, Outbox};
use crate::sim::messages::{HandoffState, Outbound, SimOut};
use crate::sim::players::*;

/// Entities to hand over at the end of this tick, after replication: the
/// player gets this tick's snapshot from the server that simulated it, so
/// the new owner's first (next tick) follows it without a gap.
#[derive(Resource, Debug, Default)]
pub struct DueReleases(pub Vec<(Entity, crate::sim::messages::CommittedTransfer)>);

pub fn release_due(world: &mut World) {
    let due = std::mem::take(&mut world.resource_mut::<DueReleases>().0);
    if due.is_empty() {
        return;
    }
    let tick = world.resource::<TickState>().tick;
    let out = world.resource::<Outbox>().clone();
    let metrics = world.resource::<SimMetrics>().clone();
    for (e, t) in due {
        release(world, e, t, tick, &out, &metrics);
    }
}

/// Ships the entity to its new owner and stops simulating it here: this
/// server simulated it up to and including `tick`.
pub(crate) fn release(
    world: &mut World,
    e: Entity,
    t: crate::sim::messages::CommittedTransfer,
    tick: u64,
    out: &Outbox,
    metrics: &SimMetrics,
) {
    let me = world.resource::<SimConfig>().server;
    let (Some(net), Some(body)) = (world.get::<NetId>(e).copied(), world.get::<Body>(e).copied()) else { return };
    let avatar = world.get::<Avatar>(e).cloned();
    let prop = world.get::<crate::sim::physics::Prop>(e).copied().map(|p| {
        let physics = world.resource::<crate::sim::physics::Physics>();
        let rb = physics.world.bodies.get(p.body);
        crate::sim::messages::PropHandoff {
            shape: p.shape,
            rot: p.rot,
            angvel: rb.map_or(Vec3::ZERO, |rb| rb.angvel()),
            sleeping: rb.is_some_and(|rb| rb.is_sleeping()),
        }
    });
    let effective_tick = tick + 1;
    if effective_tick > t.effective_tick {
        warn!(entity = %net.0, planned = t.effective_tick, actual = effective_tick, "transfer released late");
    }
    let state = HandoffState {
        transfer_id: t.id,
        from: me,
        to: t.to,
        entity: net.0,
        entity_epoch: t.entity_epoch,
        to_region: t.to_region,
        to_region_epoch: t.to_region_epoch,
        effective_tick,
        pos: body.pos,
        yaw: body.yaw,
        vel: body.vel,
        player: avatar.as_ref().map(|a| a.player),
        last_applied_input: avatar.as_ref().map_or(0, |a| a.last_applied),
        pending_inputs: avatar.as_ref().map(|a| a.pending.iter().copied().collect()).unwrap_or_default(),
        prop,
        crossed_tick: world.get::<Crossed>(e).map(|c| c.0),
        components: world.get::<Components>(e).map(|c| c.0.set().clone()).unwrap_or_default(),
    };
    if out.0.try_send(SimOut::Handoff(Box::new(state))).is_err() {
        // Authority already moved in the coordinator's log; without the state
        // the target cannot simulate. Counted; the handoff issue recovers it.
        metrics.0.transfers.with_label_values(&["handoff_dropped"]).inc();
        warn!(entity = %net.0, "handoff could not be queued");
    }
    metrics.0.transfers.with_label_values(&["out"]).inc();
    if let Some(a) = &avatar {
        // The client keeps its connection as a standby: inputs that still
        // arrive here are buffered, in case authority comes back.
        let mut conns = world.resource_mut::<Conns>();
        for c in conns.0.values_mut().filter(|c| c.player == a.player) {
            c.role = JoinRole::Standby;
        }
        let conns = world.resource::<Conns>();
        if let Some(c) = a.conn {
            send(conns, c, Outbound::Control(ServerControl::AuthorityMoved { to: t.to, effective_tick }), metrics);
        }
    }
    info!(entity = %net.0, to = %t.to, transfer = t.id, effective_tick, "authority released");
    if let Some(a) = world.get::<Authority>(e).copied() {
        let mut released = world.resource_mut::<Released>();
        if tick.is_multiple_of(90) {
            released.0.retain(|_, (_, at)| tick.saturating_sub(*at) <= RELEASED_MEMORY_TICKS);
        }
        released.0.insert(t.id, (a, tick));
    }
    // Its players keep seeing it, now as a ghost of the new owner.
    let cfg = world.resource::<SimConfig>().clone();
    let prop_now = world.get::<crate::sim::physics::Prop>(e).copied();
    let auth =
        Authority { region: t.to_region, region_epoch: t.to_region_epoch, entity_epoch: t.entity_epoch, since: tick };
    let comps = crate::sim::ghosts::ghosted(&cfg.registry, world.get::<Components>(e));
    let mut ghost =
        crate::sim::ghosts::ghost_state(&cfg, (&net, &body, &auth, avatar.as_ref(), prop_now.as_ref()), Some(comps));
    ghost.q.authority = t.to;
    despawn(world, e);
    crate::sim::ghosts::released(world, ghost);
}
