//! Arrivals and returns: a map change revalidating what this server holds,
//! a handoff checked and adopted at its effective tick, a handoff that could
//! not be delivered taken back, an orphaned transfer resumed from a ghost.

use std::collections::VecDeque;

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat, Vec3};
use shared::Epoch;
use shared::wire::{JoinRole, ServerControl};
use tracing::{info, warn};

use super::{Authority, Evicting, Transfer};
use super::{AuthorityLog, EVICT_GRACE_TICKS};
use crate::sim::core::*;
use crate::sim::inbox::send;
use crate::sim::inbox::{Conns, Outbox};
use crate::sim::messages::{AdoptError, HandoffState, Outbound, SimOut};
use crate::sim::physics::Hands;
use crate::sim::players::*;

/// Handoffs accepted whose effective tick has not come yet.
#[derive(Resource, Debug, Default)]
pub struct PendingAdoptions(pub Vec<HandoffState>);

/// Whether the region the entity is held through is no longer this
/// server's (moved, merged or split away by the coordinator).
pub(crate) fn given_away(world: &World, e: Entity) -> bool {
    let me = world.resource::<SimConfig>().server;
    let map = &world.resource::<Map>().0;
    world.get::<Authority>(e).is_some_and(|a| !matches!(map.live_owner(&a.region), Some((o, _)) if o == me))
}

/// After a map change: refresh region epochs (a split or merge renames the
/// region an entity is in), and drop authority over regions that are no
/// longer ours. Players in a region moved to another live server (a drain,
/// a move, a merge) keep their old region and epoch: the coordinator lets
/// this server hand them over under it for a while, and `authority` does.
pub(crate) fn revalidate_authority(world: &mut World) {
    let me = world.resource::<SimConfig>().server;
    let tick = world.resource::<TickState>().tick;
    let map = world.resource::<Map>().0.clone();
    let mut lost = Vec::new();
    let (mut evicting, mut kept) = (Vec::new(), Vec::new());
    let mut q = world.query::<(Entity, &mut Authority, &Body, Option<&Avatar>, Option<&Evicting>)>();
    for (e, mut auth, body, avatar, evict) in q.iter_mut(world) {
        // Split: the child of the region it was held through nearest to it
        // (it may stand past the region's face, within the hysteresis
        // margin, in a neighbour's region); merged: the parent.
        let region = if map.tree.is_leaf(&auth.region) {
            auth.region
        } else {
            let a = auth.region.aabb();
            let inside = body.pos.clamp(a.min, a.max - DVec3::splat(1e-6));
            map.tree.leaf_at(inside).unwrap_or(auth.region)
        };
        match map.live_owner(&region) {
            Some((owner, epoch)) if owner == me => {
                auth.region = region;
                auth.region_epoch = epoch;
                if evict.is_some() {
                    kept.push(e);
                }
            }
            // Given away (moved, or split and part moved, in one update):
            // handed to the new owner under the release the coordinator
            // left this server, through the leaf it is in now (under the
            // epoch it had here: the release allows up to its own).
            Some(_) => {
                auth.region = region;
                if evict.is_none() {
                    evicting.push((e, avatar.is_some()));
                }
            }
            None => lost.push(e),
        }
    }
    for (e, player) in evicting {
        // Players get time to pre-connect to the new owner; props go at once.
        let grace = if player { EVICT_GRACE_TICKS } else { 0 };
        world.entity_mut(e).insert(Evicting { not_before: tick + grace });
        // Hint again, even servers hinted before: the client may have lost
        // (or never made) that link, and now it needs it.
        if let Some(mut a) = world.get_mut::<Avatar>(e) {
            a.preconnected.clear();
        }
    }
    for e in kept {
        world.entity_mut(e).remove::<Evicting>();
    }
    let metrics = world.resource::<SimMetrics>().clone();
    for e in lost {
        let id = world.get::<NetId>(e).map(|n| n.0);
        let in_transfer = world.get::<Transfer>(e).is_some_and(Transfer::is_leaving);
        if in_transfer {
            continue;
        }
        warn!(entity = ?id, "authority lost: the coordinator gave the entity's region away");
        metrics.0.transfers.with_label_values(&["lost"]).inc();
        despawn(world, e);
    }
}

pub(crate) fn check_adoption(world: &World, s: &HandoffState) -> Result<(), AdoptError> {
    let cfg = world.resource::<SimConfig>();
    if s.to != cfg.server {
        return Err(AdoptError::WrongServer(s.to));
    }
    let map = &world.resource::<Map>().0;
    if let Some((_, known)) = map.owners.get(&s.to_region)
        && *known > s.to_region_epoch
    {
        return Err(AdoptError::StaleRegionEpoch { region: s.to_region, known: *known, claimed: s.to_region_epoch });
    }
    if let Some(e) = world.resource::<Index>().by_net.get(&s.entity) {
        let held = world.get::<Authority>(*e).map_or(Epoch(0), |a| a.entity_epoch);
        if held >= s.entity_epoch {
            return Err(AdoptError::StaleEntityEpoch(s.entity, held));
        }
    }
    if world.resource::<PendingAdoptions>().0.iter().any(|p| p.entity == s.entity && p.entity_epoch >= s.entity_epoch) {
        return Err(AdoptError::StaleEntityEpoch(s.entity, s.entity_epoch));
    }
    Ok(())
}

/// Spawns the adopted entities whose effective tick has come. One that comes
/// late is simulated forward at once for the ticks it missed.
/// A handoff this server could not deliver came back: the entity is
/// simulated here again from the state it was shipped with, through the
/// region it was held through, under the epoch the coordinator gave back.
pub(crate) fn reclaimed(world: &mut World, state: HandoffState, entity_epoch: Epoch) {
    let me = world.resource::<SimConfig>().server;
    let tick = world.resource::<TickState>().tick;
    let metrics = world.resource::<SimMetrics>().clone();
    let Some((auth, _)) = world.resource_mut::<Released>().0.remove(&state.transfer_id) else {
        warn!(transfer = state.transfer_id, entity = %state.entity, "reclaimed a transfer this server does not remember");
        metrics.0.transfers.with_label_values(&["reclaim_unknown"]).inc();
        return;
    };
    let map = world.resource::<Map>().0.clone();
    let region_epoch = match map.live_owner(&auth.region) {
        Some((owner, epoch)) if owner == me => epoch,
        _ => auth.region_epoch,
    };
    info!(transfer = state.transfer_id, entity = %state.entity, %entity_epoch, "handoff taken back");
    metrics.0.transfers.with_label_values(&["reclaimed"]).inc();
    world.resource_mut::<PendingAdoptions>().0.push(HandoffState {
        from: state.to,
        to: me,
        to_region: auth.region,
        to_region_epoch: region_epoch,
        entity_epoch,
        effective_tick: tick,
        ..state
    });
}

/// A transfer to this server whose source died before delivering it: the
/// entity goes on here from the newest state its ghost had (position,
/// velocity, orientation, its ghosted components; a player's last applied
/// input, so the inputs its standby connection buffered since apply once).
/// Without a ghost, it is lost, and the coordinator is told so.
pub(crate) fn resume_orphan(world: &mut World, o: crate::sim::messages::Orphan) {
    let tick = world.resource::<TickState>().tick;
    let me = world.resource::<SimConfig>().server;
    if !world.resource_mut::<ResolvedOrphans>().0.insert(o.transfer_id) {
        return;
    }
    let metrics = world.resource::<SimMetrics>().clone();
    let out = world.resource::<Outbox>().clone();
    let ghost = world.resource::<crate::sim::ghosts::Ghosts>().last_known(o.entity).cloned();
    let state = ghost.filter(|g| g.state.q.authority == o.from).map(|g| {
        let e = g.state.q.state();
        let rot = Quat::from_array(e.rot);
        HandoffState {
            transfer_id: o.transfer_id,
            from: o.from,
            to: me,
            entity: o.entity,
            entity_epoch: o.entity_epoch,
            to_region: o.to_region,
            to_region_epoch: o.to_region_epoch,
            effective_tick: tick,
            pos: e.pos,
            yaw: rot.to_euler(glam::EulerRot::YXZ).0,
            vel: Vec3::from(e.vel),
            player: o.entity.as_player(),
            last_applied_input: g.state.last_input,
            pending_inputs: Vec::new(),
            prop: g.state.shape.map(|shape| crate::sim::messages::PropHandoff {
                shape,
                rot,
                angvel: Vec3::ZERO,
                sleeping: false,
            }),
            crossed_tick: None,
            // What neighbours mirror of it (`Policy::ghosted`): a component
            // that is not is lost with its owner, and the mark says so (a
            // save of its player's progression keeps the stored ones).
            components: {
                let mut c = g.comps().clone();
                c.set(&shared::component::builtin::ResumedFromGhost);
                c
            },
        }
    });
    let adopted = match state.map(|s| (check_adoption(world, &s), s)) {
        Some((Ok(()), s)) => {
            info!(transfer = o.transfer_id, entity = %o.entity, from = %o.from, "orphaned transfer resumed from its ghost");
            if s.player.is_some() {
                world.resource_mut::<AuthorityLog>().resumed.push((s.entity, s.from, u64::from(s.last_applied_input)));
            }
            world.resource_mut::<PendingAdoptions>().0.push(s);
            metrics.0.transfers.with_label_values(&["orphan_resumed"]).inc();
            true
        }
        Some((Err(e), _)) => {
            warn!(transfer = o.transfer_id, entity = %o.entity, error = %e, "orphaned transfer refused");
            metrics.0.transfers.with_label_values(&["orphan_lost"]).inc();
            false
        }
        None => {
            warn!(transfer = o.transfer_id, entity = %o.entity, from = %o.from, "orphaned transfer: no ghost to resume it from");
            metrics.0.transfers.with_label_values(&["orphan_lost"]).inc();
            false
        }
    };
    if out.0.try_send(SimOut::OrphanResolved { transfer_id: o.transfer_id, adopted }).is_err() {
        // Listed again by the next heartbeat; answered then.
        world.resource_mut::<ResolvedOrphans>().0.remove(&o.transfer_id);
    }
}

/// Orphaned transfers already acted on (the heartbeat lists them until the
/// coordinator hears back).
#[derive(Resource, Debug, Default)]
pub struct ResolvedOrphans(pub std::collections::HashSet<u64>);

/// Entities handed off recently, by transfer: the authority they had here,
/// for taking one back if its handoff cannot be delivered.
#[derive(Resource, Debug, Default)]
pub struct Released(pub std::collections::HashMap<u64, (Authority, shared::Tick)>);

/// How long a released entity's authority is remembered.
pub(crate) const RELEASED_MEMORY_TICKS: shared::Tick = 90 * 60;

pub(crate) fn adopt_due(world: &mut World) {
    let tick = world.resource::<TickState>().tick;
    let due: Vec<HandoffState> = {
        let mut p = world.resource_mut::<PendingAdoptions>();
        let (due, wait): (Vec<_>, Vec<_>) = p.0.drain(..).partition(|s| s.effective_tick <= tick);
        p.0 = wait;
        due
    };
    let metrics = world.resource::<SimMetrics>().clone();
    for s in due {
        if let Some(old) = world.resource::<Index>().by_net.get(&s.entity).copied() {
            despawn(world, old);
        }
        crate::sim::ghosts::adopted(world, s.entity);
        let late = tick - s.effective_tick;
        metrics.0.handoff_late_ticks.observe(late as f64);
        if let Some(c) = s.crossed_tick {
            metrics.0.handoff_latency_ticks.observe(tick.saturating_sub(c) as f64);
        }
        metrics.0.transfers.with_label_values(&["in"]).inc();
        let mut pending: VecDeque<_> =
            s.pending_inputs.iter().copied().filter(|f| f.seq > s.last_applied_input).collect();
        let conn = s.player.and_then(|p| {
            let conns = world.resource::<Conns>();
            conns
                .0
                .iter()
                .filter(|(_, c)| c.player == p)
                .max_by_key(|(_, c)| c.role == JoinRole::Play)
                .map(|(id, _)| *id)
        });
        let name = conn.and_then(|c| world.resource::<Conns>().0.get(&c).map(|c| c.name.clone())).unwrap_or_default();
        if let Some(p) = s.player
            && let Some(buf) = world.resource_mut::<StandbyInputs>().0.remove(&p)
        {
            for f in buf {
                buffer_input(&mut pending, f, s.last_applied_input, STANDBY_INPUT_BUFFER);
            }
        }
        let authority = Authority {
            region: s.to_region,
            region_epoch: s.to_region_epoch,
            entity_epoch: s.entity_epoch,
            since: s.effective_tick,
        };
        // The ticks it missed, simulated at once here (a player's inputs
        // through `catch_up`, a prop along its path), are logged as this
        // server's.
        {
            let mut log = world.resource_mut::<AuthorityLog>();
            if log.tx.is_some() {
                log.catch_up.extend((s.effective_tick..tick).map(|t| (t, s.entity)));
            }
        }
        if let Some(p) = s.prop {
            // A late prop goes on from where it would be by now (a few
            // ticks at most: a straight line soon leaves its real path).
            let pos = s.pos + s.vel.as_dvec3() * (late.min(9) as f64 / cfg_hz(world));
            let e = crate::sim::physics::spawn_prop(world, s.entity, p.shape, pos, p.rot, s.vel);
            crate::sim::physics::set_spin(world, e, p.angvel, p.sleeping);
            world.entity_mut(e).insert(authority);
            if !s.components.is_empty() {
                world.entity_mut(e).insert(Components(shared::component::Tracked::new(s.components, tick)));
            }
            crate::sim::interact::arrived(world, e, s.entity);
            info!(entity = %s.entity, from = %s.from, transfer = s.transfer_id, late_ticks = late, "authority gained");
            continue;
        }
        let mut e = world.spawn((NetId(s.entity), Body { pos: s.pos, yaw: s.yaw, vel: s.vel }, authority));
        match (s.components.is_empty(), s.player) {
            // From a server that sent none: a player's own, as at a spawn.
            (true, Some(_)) => e.insert(Components::player(&name, tick)),
            _ => e.insert(Components(shared::component::Tracked::new(s.components, tick))),
        };
        if let Some(player) = s.player {
            e.insert(Hands::default());
            e.insert(Avatar {
                player,
                name,
                conn,
                last_applied: s.last_applied_input,
                pending,
                catch_up: late,
                ..Default::default()
            });
        }
        let e = e.id();
        {
            let mut index = world.resource_mut::<Index>();
            index.by_net.insert(s.entity, e);
            if let Some(p) = s.player {
                index.by_player.insert(p, e);
            }
        }
        if let Some(c) = conn {
            {
                let mut conns = world.resource_mut::<Conns>();
                if let Some(conn) = conns.0.get_mut(&c) {
                    conn.role = JoinRole::Play;
                }
            }
            let conns = world.resource::<Conns>();
            send(
                conns,
                c,
                Outbound::Control(ServerControl::AuthorityGained { effective_tick: s.effective_tick }),
                &metrics,
            );
        }
        info!(entity = %s.entity, from = %s.from, transfer = s.transfer_id, late_ticks = late, "authority gained");
    }
}

pub(crate) fn cfg_hz(world: &World) -> f64 {
    f64::from(world.resource::<SimConfig>().clock.hz.max(1))
}
