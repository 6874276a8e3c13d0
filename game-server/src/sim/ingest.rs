//! The tick's inbox: draining, within a budget, what the network, the
//! control task and peers sent the simulation, and dispatching each message
//! to the feature it is for; admin prop spawns.

use super::core::*;
use super::messages::{Outbound, PropSpawn, SimIn};
use crate::sim::authority::adopt::*;
use crate::sim::inbox::{Conns, Inbox};
use crate::sim::players::*;
use bevy_ecs::prelude::*;
use glam::{Quat, Vec3};
use shared::EntityId;
use shared::wire::JoinRole;

/// Most inbox messages handled in one tick; the rest wait for the next.
pub(crate) const INBOX_BUDGET: usize = 65_536;
/// Drains the inbox: joins, inputs, leaves, map updates, transfer answers,
/// incoming handoffs; then spawns the handoffs that are due.
pub fn ingest(world: &mut World) {
    let mut msgs = Vec::new();
    {
        let mut inbox = world.resource_mut::<Inbox>();
        while msgs.len() < INBOX_BUDGET {
            match inbox.0.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
    }
    for m in msgs {
        match m {
            SimIn::PeerSchema { server, schema } => {
                let registry = world.resource::<SimConfig>().registry.clone();
                let n = world.resource_mut::<super::authority::PeerSchemas>().learn(server, schema, &registry);
                world.resource::<SimMetrics>().0.peer_schemas.set(n as i64);
            }
            SimIn::Joined { conn, player, name, role, spawn, saved, tx } => {
                joined(world, conn, player, name, role, spawn, saved, tx)
            }
            SimIn::Input { conn, frame } => {
                let Some(player) = world.resource_mut::<Conns>().0.get_mut(&conn).map(|c| {
                    // The newest snapshot this link has: the next one's baseline.
                    c.acked = c.acked.max(frame.ack_tick);
                    c.player
                }) else {
                    continue;
                };
                let avatar_entity = world.resource::<Index>().by_player.get(&player).copied();
                let buffered = match avatar_entity.and_then(|e| world.get_mut::<Avatar>(e)) {
                    Some(mut a) => {
                        let applied = a.last_applied;
                        buffer_input(&mut a.pending, frame, applied, INPUT_BUFFER)
                    }
                    None => {
                        let mut standby = world.resource_mut::<StandbyInputs>();
                        buffer_input(standby.0.entry(player).or_default(), frame, 0, STANDBY_INPUT_BUFFER)
                    }
                };
                if !buffered {
                    // Replayed, duplicated or older than what was applied.
                    world.resource::<SimMetrics>().0.inputs_rejected.with_label_values(&["stale_or_duplicate"]).inc();
                }
            }
            SimIn::Left { conn } => left(world, conn),
            SimIn::Edit { conn, id, op } => {
                let Some(player) = world.resource::<Conns>().0.get(&conn).map(|c| c.player) else { continue };
                world.resource_mut::<super::edits::Edits>().queue.push(super::edits::EditRequest {
                    conn: Some(conn),
                    player,
                    id,
                    op,
                });
            }
            SimIn::SpawnProps { props, reply } => {
                let _ = reply.send(spawn_props(world, &props));
            }
            SimIn::Positions { max, reply } => {
                let _ = reply.send(positions(world, max));
            }
            SimIn::InspectChunk { key, reply } => {
                let _ = reply.send(world.resource::<super::terrain::Terrain>().inspect(key));
            }
            SimIn::Broadcast(msg) => {
                let metrics = world.resource::<SimMetrics>().clone();
                for c in world.resource::<Conns>().0.values().filter(|c| c.role == JoinRole::Play) {
                    if let Err(e) = c.tx.try_send(Outbound::Control(msg.clone())) {
                        metrics.0.datagrams_dropped.with_label_values(&[e.reason()]).inc();
                    }
                }
            }
            SimIn::Map(map) => {
                let n = world.resource_mut::<super::authority::PeerSchemas>().retain(|s| map.servers.contains_key(&s));
                world.resource::<SimMetrics>().0.peer_schemas.set(n as i64);
                world.resource_mut::<Map>().0 = map;
                revalidate_authority(world);
            }
            SimIn::TransferCommitted { entity, transfer } => {
                super::authority::answers::committed(world, entity, transfer)
            }
            SimIn::TransferRefused { entity, reason, permanent } => {
                super::authority::answers::refused(world, entity, &reason, permanent)
            }
            SimIn::Ghosts(batch) => super::ghosts::receive(world, batch),
            SimIn::Interact { interaction, reply } => {
                let verdict = super::interact::apply(world, &interaction);
                if let Some(reply) = reply {
                    let _ = reply.send(verdict);
                }
            }
            SimIn::TransferCancelled { entity, entity_epoch } => {
                super::authority::answers::cancelled(world, entity, entity_epoch)
            }
            SimIn::Reclaimed { state, entity_epoch } => reclaimed(world, *state, entity_epoch),
            SimIn::Orphans(orphans) => {
                for o in orphans {
                    resume_orphan(world, o);
                }
            }
            SimIn::Adopt { state, reply } => {
                let verdict = check_adoption(world, &state);
                if verdict.is_ok() {
                    world.resource_mut::<PendingAdoptions>().0.push(*state);
                } else if let Err(e) = &verdict {
                    world.resource::<SimMetrics>().0.peer_refused.with_label_values(&[e.reason()]).inc();
                }
                let _ = reply.send(verdict);
            }
        }
    }
    adopt_due(world);
}

/// Most props one admin request spawns.
pub const MAX_PROPS_PER_REQUEST: usize = 10_000;

/// Spawns props for an admin; all or nothing.
/// Where the entities this server owns are: every `ceil(total / max)`-th
/// of them, so at most `max` (the admin map's dots; once a second while a
/// map is open, O(entities) on the tick thread).
pub fn positions(world: &mut World, max: usize) -> super::messages::Positions {
    let mut q = world.query_filtered::<(&Body, Has<Avatar>), With<super::authority::Authority>>();
    let total = q.iter(world).count();
    let stride = total.div_ceil(max.max(1)).max(1);
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let entities = q
        .iter(world)
        .step_by(stride)
        .take(max)
        .map(|(b, player)| (round(b.pos.x), round(b.pos.y), round(b.pos.z), u8::from(!player)))
        .collect();
    super::messages::Positions { total: total as u64, entities }
}

pub fn spawn_props(world: &mut World, props: &[PropSpawn]) -> Result<Vec<EntityId>, String> {
    if props.len() > MAX_PROPS_PER_REQUEST {
        return Err(format!("at most {MAX_PROPS_PER_REQUEST} props per request"));
    }
    let me = world.resource::<SimConfig>().server;
    let map = world.resource::<Map>().0.clone();
    for (i, p) in props.iter().enumerate() {
        p.shape.validate().map_err(|e| format!("prop {i}: {e}"))?;
        if !p.pos.is_finite() || !p.vel.iter().all(|v| v.is_finite() && v.abs() <= 100.0) {
            return Err(format!("prop {i}: position and velocity must be finite (speed at most 100 m/s)"));
        }
        let owned = map.tree.leaf_at(p.pos).and_then(|l| map.live_owner(&l)).is_some_and(|(o, _)| o == me);
        if !owned {
            return Err(format!("prop {i}: {} is not in a region this server owns", p.pos));
        }
    }
    let mut ids = Vec::with_capacity(props.len());
    for p in props {
        let id = world
            .resource_mut::<super::edits::Edits>()
            .mint()
            .ok_or_else(|| "this server cannot mint entity ids".to_owned())?;
        super::physics::spawn_prop(world, id, p.shape, p.pos, Quat::IDENTITY, Vec3::from(p.vel));
        ids.push(id);
    }
    Ok(ids)
}
