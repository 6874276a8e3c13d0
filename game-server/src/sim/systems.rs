//! The systems of one tick, in the order of [`super::SimSet`].

use std::collections::VecDeque;

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat, Vec2, Vec3, Vec4};
use shared::chunk::floor_i32;
use shared::controller::{CharacterState, move_character};
use shared::region::handoff_target;
use shared::snapshot::{self, QEntity};
use shared::wire::{EntityState, InputFrame, JoinRole, Pose, ServerControl, buttons};
use shared::{EntityId, Epoch, PlayerId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::components::*;
use super::messages::{AdoptError, HandoffState, Outbound, PropSpawn, SimIn, SimOut};
use super::physics::Hands;

/// Most inbox messages handled in one tick; the rest wait for the next.
const INBOX_BUDGET: usize = 65_536;
/// Ticks to wait before asking again for a refused transfer.
const TRANSFER_BACKOFF_TICKS: u64 = 45;
/// Ticks after which an unanswered transfer request is forgotten.
const TRANSFER_REQUEST_TIMEOUT_TICKS: u64 = 270;
/// How long a player in a region given away gets to pre-connect to the new
/// owner before the handoff (1.5 s; the coordinator's release lasts 5 s).
pub const EVICT_GRACE_TICKS: u64 = 135;
/// Where a player joins when the client names no spawn point.
pub const DEFAULT_SPAWN: DVec3 = DVec3::new(1000.0, 10.0, 1000.0);

/// Queues a message for one connection; what does not fit is counted (a
/// datagram dropped; for a control frame, the connection is closed).
pub(super) fn send(conns: &Conns, conn: u64, msg: Outbound, metrics: &SimMetrics) {
    if let Some(c) = conns.0.get(&conn)
        && let Err(e) = c.tx.try_send(msg)
    {
        metrics.0.datagrams_dropped.with_label_values(&[e.reason()]).inc();
    }
}

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
            SimIn::Joined { conn, player, name, role, spawn, tx } => joined(world, conn, player, name, role, spawn, tx),
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
                world.resource_mut::<Map>().0 = map;
                revalidate_authority(world);
            }
            SimIn::TransferCommitted { entity, transfer } => {
                let e = world.resource::<Index>().by_net.get(&entity).copied();
                match e.and_then(|e| world.get_mut::<Transfer>(e)) {
                    Some(mut t) if matches!(*t, Transfer::Requested { .. }) => *t = Transfer::Committed(transfer),
                    _ => warn!(%entity, id = transfer.id, "transfer committed for an entity not waiting for one"),
                }
            }
            SimIn::TransferRefused { entity, reason, permanent } => {
                let until = world.resource::<TickState>().tick + TRANSFER_BACKOFF_TICKS;
                let e = world.resource::<Index>().by_net.get(&entity).copied();
                // Out of a region given away, a final refusal means the
                // release is over: the entity is no longer ours to hand on.
                if permanent && let Some(e) = e.filter(|e| given_away(world, *e)) {
                    warn!(%entity, %reason, "authority lost: the region was given away and the handoff refused");
                    world.resource::<SimMetrics>().0.transfers.with_label_values(&["lost"]).inc();
                    despawn(world, e);
                } else if let Some(e) = e
                    && let Some(mut t) = world.get_mut::<Transfer>(e)
                {
                    debug!(%entity, %reason, "transfer refused");
                    *t = Transfer::Backoff { until };
                    world.entity_mut(e).remove::<super::interact::RemoteGrab>();
                }
            }
            SimIn::Ghosts(batch) => super::ghosts::receive(world, batch),
            SimIn::Interact { interaction, reply } => {
                let verdict = super::interact::apply(world, &interaction);
                if let Some(reply) = reply {
                    let _ = reply.send(verdict);
                }
            }
            SimIn::TransferCancelled { entity, entity_epoch } => {
                let Some(e) = world.resource::<Index>().by_net.get(&entity).copied() else { continue };
                let Some(Transfer::Cancelling(t)) = world.get::<Transfer>(e).cloned() else { continue };
                let tick = world.resource::<TickState>().tick;
                match entity_epoch {
                    Some(epoch) => {
                        if let Some(mut a) = world.get_mut::<Authority>(e) {
                            a.entity_epoch = epoch;
                        }
                        world.entity_mut(e).insert(Transfer::Backoff { until: tick + CANCEL_AFTER_TICKS });
                        world.resource::<SimMetrics>().0.transfers.with_label_values(&["cancelled"]).inc();
                    }
                    // Asked again after a while (or released, if it passes
                    // the line meanwhile).
                    None => {
                        world.entity_mut(e).insert(Transfer::Committed(super::messages::CommittedTransfer {
                            effective_tick: tick,
                            ..t
                        }));
                    }
                }
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

#[allow(clippy::too_many_arguments)]
fn joined(
    world: &mut World,
    conn: u64,
    player: PlayerId,
    name: String,
    role: JoinRole,
    spawn: Option<DVec3>,
    tx: super::messages::ConnTx,
) {
    let cfg = world.resource::<SimConfig>().clone();
    let tick = world.resource::<TickState>().tick;
    let metrics = world.resource::<SimMetrics>().clone();
    let refuse = |reason: String| {
        metrics.0.connections_refused.with_label_values(&[reason.split(':').next().unwrap_or("refused")]).inc();
        let _ = tx.try_send(Outbound::Control(ServerControl::Refused { reason }));
    };
    let welcome = |authoritative: bool, entity: EntityId| ServerControl::Welcome {
        server: cfg.server,
        entity,
        tick_hz: cfg.clock.hz,
        mesh_epoch_unix_nanos: cfg.clock.epoch_unix_nanos,
        authoritative,
        world_seed: cfg.world_seed,
    };
    let entity_id = match EntityId::player(player) {
        Ok(id) => id,
        Err(e) => return refuse(format!("bad_player: {e}")),
    };
    let existing = world.resource::<Index>().by_player.get(&player).copied();
    match (role, existing) {
        (JoinRole::Play, Some(e)) => {
            if let Some(mut a) = world.get_mut::<Avatar>(e) {
                a.conn = Some(conn);
            }
            let _ = tx.try_send(Outbound::Control(welcome(true, entity_id)));
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
        }
        (JoinRole::Play, None) => {
            let mut p = spawn.unwrap_or(DEFAULT_SPAWN);
            if !p.is_finite() {
                return refuse("bad_spawn: spawn point is not finite".to_owned());
            }
            // Stand on the generated ground (edits since are handled by the
            // controller: it lifts a body out of rock, and falls into pits).
            p.y = world.resource::<super::terrain::Terrain>().generator.ground_height(p.x, p.z) + 0.01;
            let map = world.resource::<Map>().0.clone();
            let Some(leaf) = map.tree.leaf_at(p) else {
                return refuse(format!("outside_world: spawn point {p} is outside the world"));
            };
            match map.live_owner(&leaf) {
                Some((owner, epoch)) if owner == cfg.server => {
                    let _ = tx.try_send(Outbound::Control(welcome(true, entity_id)));
                    world
                        .resource_mut::<Conns>()
                        .0
                        .insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
                    let e = world
                        .spawn((
                            NetId(entity_id),
                            Body { pos: p, yaw: 0.0, vel: Vec3::ZERO },
                            Avatar { player, name, conn: Some(conn), ..Default::default() },
                            Authority { region: leaf, region_epoch: epoch, entity_epoch: Epoch(0), since: tick },
                            Hands::default(),
                        ))
                        .id();
                    let mut index = world.resource_mut::<Index>();
                    index.by_net.insert(entity_id, e);
                    index.by_player.insert(player, e);
                    info!(%player, %entity_id, region = %leaf, "player spawned");
                    presence(world, player, entity_id, true);
                }
                Some((owner, _)) => refuse(format!("not_owner: region {leaf} is owned by server {}", owner.0)),
                None => refuse(format!("not_owner: region {leaf} has no live owner yet")),
            }
        }
        (JoinRole::Standby, _) => {
            let _ = tx.try_send(Outbound::Control(welcome(existing.is_some(), entity_id)));
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, name: name.clone(), role, tx, acked: 0 });
            if let Some(mut a) = existing.and_then(|e| world.get_mut::<Avatar>(e)) {
                a.conn.get_or_insert(conn);
            }
        }
    }
}

/// Most props one admin request spawns.
pub const MAX_PROPS_PER_REQUEST: usize = 10_000;

/// Spawns props for an admin; all or nothing.
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

fn left(world: &mut World, conn: u64) {
    let Some(c) = world.resource_mut::<Conns>().0.remove(&conn) else { return };
    let still_connected = world.resource::<Conns>().0.values().any(|o| o.player == c.player);
    if !still_connected {
        world.resource_mut::<StandbyInputs>().0.remove(&c.player);
    }
    let Some(e) = world.resource::<Index>().by_player.get(&c.player).copied() else { return };
    let other = world.resource::<Conns>().0.iter().find(|(_, o)| o.player == c.player).map(|(id, _)| *id);
    if let Some(mut a) = world.get_mut::<Avatar>(e)
        && a.conn == Some(conn)
    {
        a.conn = other;
    }
    if !still_connected
        && world.get::<Transfer>(e).is_none_or(|t| !matches!(t, Transfer::Committed(_) | Transfer::Cancelling(_)))
    {
        save_progress(world, e);
        let entity = world.get::<NetId>(e).map(|n| n.0);
        despawn(world, e);
        info!(player = %c.player, "player left");
        if let Some(entity) = entity {
            presence(world, c.player, entity, false);
        }
    }
}

/// Tells the coordinator's directory; a full outbox drops it (counted).
fn presence(world: &World, player: PlayerId, entity: EntityId, online: bool) {
    let out = world.resource::<Outbox>();
    if out.0.try_send(SimOut::Presence { player, entity, online }).is_err() {
        world.resource::<SimMetrics>().0.transfers.with_label_values(&["presence_dropped"]).inc();
    }
}

/// The player's progression as it stands (position; inventory and stats
/// once the game has them), saved in the background. The version is the
/// mesh tick, which every server agrees on, so a later save always wins.
pub fn progress_of(world: &World, e: Entity) -> Option<persistence::model::Progress> {
    let (avatar, body) = (world.get::<Avatar>(e)?, world.get::<Body>(e)?);
    Some(persistence::model::Progress {
        player: avatar.player,
        version: world.resource::<TickState>().tick,
        position: body.pos.to_array(),
        inventory: serde_json::json!([]),
        stats: serde_json::json!({}),
    })
}

fn save_progress(world: &World, e: Entity) {
    if let Some(p) = progress_of(world, e) {
        world.resource::<Progression>().0.save_progress(p);
    }
}

/// At shutdown: saves every avatar's progression and waits (up to 5 s) for
/// the saves, so a clean stop or a rolling update keeps where players were.
pub fn save_all_progress(world: &mut World) {
    let avatars: Vec<Entity> = world.query_filtered::<Entity, With<Avatar>>().iter(world).collect();
    let store = world.resource::<Progression>().0.clone();
    let saves: Vec<_> = avatars.iter().filter_map(|e| progress_of(world, *e)).map(|p| store.save_progress(p)).collect();
    let n = saves.len();
    let done = store.rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), futures::future::join_all(saves)).await
    });
    match done {
        Ok(results) => {
            let failed = results.iter().filter(|r| !matches!(r, Ok(Ok(())))).count();
            info!(players = n, failed, "progression saved at shutdown");
        }
        Err(_) => warn!(players = n, "progression saves did not finish within 5 s of shutdown"),
    }
}

/// Where player progression is saved.
#[derive(Debug, Resource, Clone)]
pub struct Progression(pub crate::store::WorldStore);

fn despawn(world: &mut World, e: Entity) {
    super::physics::release_physics(world, e);
    let net = world.get::<NetId>(e).map(|n| n.0);
    let player = world.get::<Avatar>(e).map(|a| a.player);
    world.despawn(e);
    let mut index = world.resource_mut::<Index>();
    if let Some(n) = net {
        index.by_net.remove(&n);
    }
    if let Some(p) = player {
        index.by_player.remove(&p);
    }
}

/// Whether the region the entity is held through is no longer this
/// server's (moved, merged or split away by the coordinator).
fn given_away(world: &World, e: Entity) -> bool {
    let me = world.resource::<SimConfig>().server;
    let map = &world.resource::<Map>().0;
    world.get::<Authority>(e).is_some_and(|a| !matches!(map.live_owner(&a.region), Some((o, _)) if o == me))
}

/// After a map change: refresh region epochs (a split or merge renames the
/// region an entity is in), and drop authority over regions that are no
/// longer ours. Players in a region moved to another live server (a drain,
/// a move, a merge) keep their old region and epoch: the coordinator lets
/// this server hand them over under it for a while, and `authority` does.
fn revalidate_authority(world: &mut World) {
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
        let in_transfer = matches!(world.get::<Transfer>(e), Some(Transfer::Committed(_) | Transfer::Cancelling(_)));
        if in_transfer {
            continue;
        }
        warn!(entity = ?id, "authority lost: the coordinator gave the entity's region away");
        metrics.0.transfers.with_label_values(&["lost"]).inc();
        despawn(world, e);
    }
}

fn check_adoption(world: &World, s: &HandoffState) -> Result<(), AdoptError> {
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
fn reclaimed(world: &mut World, state: HandoffState, entity_epoch: Epoch) {
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
/// velocity, orientation; a player's last applied input, so the inputs its
/// standby connection buffered since apply once). Without a ghost, it is
/// lost, and the coordinator is told so.
fn resume_orphan(world: &mut World, o: super::messages::Orphan) {
    let tick = world.resource::<TickState>().tick;
    let me = world.resource::<SimConfig>().server;
    if !world.resource_mut::<ResolvedOrphans>().0.insert(o.transfer_id) {
        return;
    }
    let metrics = world.resource::<SimMetrics>().clone();
    let out = world.resource::<Outbox>().clone();
    let ghost = world.resource::<super::ghosts::Ghosts>().last_known(o.entity).copied();
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
            prop: g.state.shape.map(|shape| super::messages::PropHandoff {
                shape,
                rot,
                angvel: Vec3::ZERO,
                sleeping: false,
            }),
            crossed_tick: None,
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
const RELEASED_MEMORY_TICKS: shared::Tick = 90 * 60;

fn adopt_due(world: &mut World) {
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
        super::ghosts::adopted(world, s.entity);
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
            let e = super::physics::spawn_prop(world, s.entity, p.shape, pos, p.rot, s.vel);
            super::physics::set_spin(world, e, p.angvel, p.sleeping);
            world.entity_mut(e).insert(authority);
            super::interact::arrived(world, e, s.entity);
            info!(entity = %s.entity, from = %s.from, transfer = s.transfer_id, late_ticks = late, "authority gained");
            continue;
        }
        let mut e = world.spawn((NetId(s.entity), Body { pos: s.pos, yaw: s.yaw, vel: s.vel }, authority));
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

fn cfg_hz(world: &World) -> f64 {
    f64::from(world.resource::<SimConfig>().clock.hz.max(1))
}

/// Limits on tracked poses, relative to the body (the play-space origin).
pub mod pose_limits {
    /// Farthest the head may be from the body's vertical axis, metres.
    pub const HEAD_HORIZONTAL_M: f32 = 2.5;
    /// Highest the head may be above the feet, metres.
    pub const HEAD_HEIGHT_M: f32 = 2.6;
    /// Farthest a hand may be from the head, metres.
    pub const ARM_M: f32 = 1.3;
    /// Farthest the head may move between two frames (45 m/s at 90 Hz).
    pub const HEAD_STEP_M: f32 = 0.5;
}

/// Why an input frame is refused: a stable metric label.
pub fn check_input(f: &InputFrame, prev_head: &Pose) -> Result<(), &'static str> {
    use pose_limits::*;
    let quat_ok = |r: &[f32; 4]| (0.8..1.2).contains(&Vec4::from(*r).length_squared());
    if !quat_ok(&f.head.rot) || !quat_ok(&f.left.rot) || !quat_ok(&f.right.rot) {
        return Err("bad_rotation");
    }
    let head = Vec3::from(f.head.pos);
    if Vec2::new(head.x, head.z).length() > HEAD_HORIZONTAL_M || !(-0.5..=HEAD_HEIGHT_M).contains(&head.y) {
        return Err("pose_far");
    }
    if head.distance(Vec3::from(f.left.pos)) > ARM_M || head.distance(Vec3::from(f.right.pos)) > ARM_M {
        return Err("pose_far");
    }
    if *prev_head != Pose::default() && head.distance(Vec3::from(prev_head.pos)) > HEAD_STEP_M {
        return Err("teleport");
    }
    Ok(())
}

/// Applies each player's pending inputs, in order and once, and moves the
/// body with the character controller against the terrain.
pub fn player_bodies(
    mut q: Query<(&mut Body, &mut Avatar), With<Authority>>,
    terrain: Res<super::terrain::Terrain>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
) {
    let mut applied = 0u64;
    for (mut body, mut a) in &mut q {
        let steps = 1 + a.catch_up.min(90);
        a.catch_up = 0;
        let mut jump = false;
        a.applied_now = None;
        while let Some(f) = a.pending.pop_front() {
            a.last_applied = f.seq;
            a.applied_now = Some(match a.applied_now {
                Some((first, _, n)) => (first, f.seq, n + 1),
                None => (f.seq, f.seq, 1),
            });
            if let Err(reason) = check_input(&f, &a.head) {
                metrics.0.inputs_rejected.with_label_values(&[reason]).inc();
                continue;
            }
            let stick = Vec2::from(f.locomotion);
            a.locomotion = if stick.length_squared() > 1.0 { stick.normalize().into() } else { stick.into() };
            a.turn = f.turn.clamp(-std::f32::consts::TAU, std::f32::consts::TAU);
            a.head = f.head;
            a.left = f.left;
            a.right = f.right;
            jump |= f.buttons & buttons::JUMP != 0 && a.buttons & buttons::JUMP == 0;
            a.buttons = f.buttons;
            applied += 1;
        }
        let mut state = CharacterState { pos: body.pos, vel: body.vel, on_ground: a.on_ground };
        for _ in 0..steps {
            body.yaw = (body.yaw + a.turn * tick.dt).rem_euclid(std::f32::consts::TAU);
            // Yaw 0 faces -Z; the stick's x strafes right (+X at yaw 0).
            let (s, c) = body.yaw.sin_cos();
            let forward = Vec3::new(-s, 0.0, -c);
            let right = Vec3::new(c, 0.0, -s);
            let wish = (right * a.locomotion[0] + forward * a.locomotion[1]) * cfg.walk_speed;
            let out = move_character(&cfg.character, &mut state, wish, jump, tick.dt, &terrain.layout, &*terrain);
            jump = false;
            if out.stuck {
                metrics.0.bodies_stuck.inc();
            }
        }
        body.pos = state.pos;
        body.vel = state.vel;
        a.on_ground = state.on_ground;
    }
    metrics.0.inputs_applied.inc_by(applied);
}

/// Boundary checks: pre-connect hints, transfer requests, and the release of
/// entities whose transfer takes effect next tick.
/// Which faces of each leaf have a neighbouring region across them (face,
/// edge or corner contact), per map version: nothing happens at a face with
/// no region behind it.
#[derive(Resource, Debug, Default)]
pub struct OpenFaces {
    version: u64,
    /// `None`: not a leaf of the current map (always checked in full).
    faces: rustc_hash::FxHashMap<shared::RegionKey, Option<[bool; 6]>>,
}

impl OpenFaces {
    /// Distance from `p` to the nearest open face of `region` (infinite
    /// when it has none).
    fn depth(&mut self, map: &super::messages::MapView, region: &shared::RegionKey, p: DVec3) -> f64 {
        if self.version != map.version {
            self.faces.clear();
            self.version = map.version;
        }
        let faces = *self.faces.entry(*region).or_insert_with(|| {
            if !map.tree.is_leaf(region) {
                return None;
            }
            let me = region.aabb();
            let mut open = [false; 6];
            for (n, _) in map.tree.neighbours(region).unwrap_or_default() {
                let a = n.aabb();
                for axis in 0..3 {
                    open[axis * 2] |= a.max[axis] <= me.min[axis];
                    open[axis * 2 + 1] |= a.min[axis] >= me.max[axis];
                }
            }
            Some(open)
        });
        let Some(faces) = faces else { return 0.0 };
        let a = region.aabb();
        let mut depth = f64::INFINITY;
        for axis in 0..3 {
            if faces[axis * 2] {
                depth = depth.min(p[axis] - a.min[axis]);
            }
            if faces[axis * 2 + 1] {
                depth = depth.min(a.max[axis] - p[axis]);
            }
        }
        depth
    }
}

pub fn authority(world: &mut World) {
    let cfg = world.resource::<SimConfig>().clone();
    let tick = world.resource::<TickState>().tick;
    let map = world.resource::<Map>().0.clone();
    let mut faces = std::mem::take(&mut *world.resource_mut::<OpenFaces>());
    let out = world.resource::<Outbox>().clone();
    let metrics = world.resource::<SimMetrics>().clone();

    let mut releases = Vec::new();
    let mut requests = Vec::new();
    let mut hints = Vec::new();
    let mut local_moves = Vec::new();
    let mut cancels = Vec::new();
    let mut crossed = Vec::new();
    // A prop in a hand goes where its holder goes, not on its own.
    let held: rustc_hash::FxHashSet<Entity> = world
        .query::<&super::physics::Hands>()
        .iter(world)
        .flat_map(|h| h.hands.iter().filter_map(|h| h.held.map(|held| held.prop)))
        .collect();
    {
        let mut q = world.query::<(
            Entity,
            &NetId,
            &Body,
            &Authority,
            Option<&Avatar>,
            Option<&Transfer>,
            Option<&Evicting>,
            Has<Crossed>,
            Has<super::interact::RemoteGrab>,
        )>();
        for (e, net, body, auth, avatar, transfer, evicting, has_crossed, grabbed) in q.iter(world) {
            // Props at rest are looked at ten times a second, a ninth of
            // them each tick; moving ones every tick.
            if avatar.is_none()
                && transfer.is_none()
                && (held.contains(&e)
                    || (body.vel.length_squared() < 0.01 && !(e.index_u32() as u64 + tick).is_multiple_of(9)))
            {
                continue;
            }
            let given_away = !matches!(map.live_owner(&auth.region), Some((o, _)) if o == cfg.server);
            match transfer {
                Some(Transfer::Committed(t)) => {
                    // Asked for early: it goes once it has passed the line
                    // (the tick the transfer takes effect, or later); if it
                    // turned back, the transfer is given up. A prop a
                    // neighbour's player grabbed goes wherever it is.
                    let past = given_away
                        || grabbed
                        || handoff_target(&map.tree, &auth.region, body.pos, cfg.handoff_margin_m).is_some();
                    if past && !has_crossed && !given_away && !grabbed {
                        crossed.push(e);
                    }
                    if tick + 1 >= t.effective_tick && past {
                        releases.push((e, t.clone()));
                    } else if tick + 1 >= t.effective_tick + CANCEL_AFTER_TICKS {
                        cancels.push((e, t.clone()));
                    }
                    continue;
                }
                Some(Transfer::Cancelling(_)) => continue,
                Some(Transfer::Requested { at, .. }) if tick < at + TRANSFER_REQUEST_TIMEOUT_TICKS => continue,
                Some(Transfer::Requested { to_region, not_before, .. }) => {
                    requests.push((e, net.0, *auth, *to_region, body.pos, *not_before));
                    continue;
                }
                Some(Transfer::Backoff { until }) if tick < *until => continue,
                _ => {}
            }
            // A region given away (`given_away`): hand the entity to
            // whoever holds the place it is in now, margin or not.
            // Deep inside its region (farther from every face than the
            // overlap zone and the handoff margin), nothing can change at a
            // boundary this tick.
            if transfer.is_none()
                && !given_away
                && faces.depth(&map, &auth.region, body.pos) > cfg.overlap_m + cfg.handoff_margin_m
            {
                continue;
            }
            if let Some(a) = avatar.filter(|a| a.conn.is_some()) {
                // The owner of the leaf the player stands in counts too: out
                // of a region given away, and inside the margin of a
                // neighbour whose owner just changed (the overlap zone of a
                // leaf is outside it), that is the server it goes to next.
                let home = map.tree.leaf_at(body.pos);
                for leaf in map.tree.overlapping_leaves(body.pos, cfg.overlap_m).into_iter().chain(home) {
                    if let Some((owner, _)) = map.live_owner(&leaf)
                        && owner != cfg.server
                        && !a.preconnected.contains(&owner)
                    {
                        hints.push((e, owner));
                    }
                }
            }
            // Out of a region given away, the client first gets time to
            // pre-connect to the new owner (the hint above).
            if given_away && evicting.is_some_and(|ev| tick < ev.not_before) {
                continue;
            }
            let target = if given_away {
                map.tree.leaf_at(body.pos).map(|t| (t, tick + 1))
            } else {
                handoff_target(&map.tree, &auth.region, body.pos, cfg.handoff_margin_m)
                    .map(|t| (t, tick + 1))
                    .or_else(|| predicted_crossing(&map, &cfg, auth, body, tick))
            };
            let Some((target, not_before)) = target else {
                if has_crossed {
                    crossed.push(e);
                }
                continue;
            };
            match map.live_owner(&target) {
                Some((owner, epoch)) if owner == cfg.server => local_moves.push((e, target, epoch)),
                Some(_) => {
                    if not_before == tick + 1 && !given_away && !has_crossed {
                        crossed.push(e);
                    }
                    requests.push((e, net.0, *auth, target, body.pos, not_before));
                }
                None => {}
            }
        }
    }

    for (e, region, epoch) in local_moves {
        if let Some(mut a) = world.get_mut::<Authority>(e) {
            a.region = region;
            a.region_epoch = epoch;
        }
    }
    for (e, owner) in hints {
        let Some(peer) = map.servers.get(&owner) else { continue };
        let hint = ServerControl::PreConnect {
            server: owner,
            quic_addr: peer.quic.clone(),
            cert_sha256: peer.cert_sha256.clone(),
            ticket: None,
        };
        let Some(mut a) = world.get_mut::<Avatar>(e) else { continue };
        a.preconnected.insert(owner);
        let (player, name, conn) = (a.player, a.name.clone(), a.conn);
        debug!(%player, to = %owner, ?conn, "pre-connect hinted");
        let Some(c) = conn else { continue };
        let Some(tx) = world.resource::<Conns>().0.get(&c).map(|c| c.tx.clone()) else { continue };
        // The control task asks the coordinator for a standby ticket and
        // sends the hint with it; with the outbox full, the hint goes now,
        // without one (the client then buys its own).
        if let Err(mpsc::error::TrySendError::Full(SimOut::Hint { hint, .. })) =
            out.0.try_send(SimOut::Hint { player, name, hint, tx })
        {
            metrics.0.hints.with_label_values(&["without_ticket"]).inc();
            send(world.resource::<Conns>(), c, Outbound::Control(hint), &metrics);
        }
    }
    // Crossings seen (or, for an entity back behind the line, forgotten).
    for e in crossed {
        let mut ent = world.entity_mut(e);
        if ent.contains::<Crossed>() {
            ent.remove::<Crossed>();
        } else {
            ent.insert(Crossed(tick));
        }
    }
    for (e, t) in cancels {
        let entity = world.get::<NetId>(e).map(|n| n.0);
        if let Some(entity) = entity
            && out.0.try_send(SimOut::CancelTransfer { entity, transfer_id: t.id }).is_ok()
        {
            debug!(%entity, transfer = t.id, "early transfer given up: the entity did not pass the line");
            world.entity_mut(e).insert(Transfer::Cancelling(t));
            metrics.0.transfers.with_label_values(&["cancel_requested"]).inc();
        }
    }
    for (e, entity, auth, target, pos, not_before) in requests {
        request_transfer(world, e, entity, auth, target, pos, not_before);
    }
    world.resource_mut::<DueReleases>().0.extend(releases);
    *world.resource_mut::<OpenFaces>() = faces;
}

/// Entities to hand over at the end of this tick, after replication: the
/// player gets this tick's snapshot from the server that simulated it, so
/// the new owner's first (next tick) follows it without a gap.
#[derive(Resource, Debug, Default)]
pub struct DueReleases(pub Vec<(Entity, super::messages::CommittedTransfer)>);

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

/// Asks the coordinator to hand `e` into `target` from `not_before` on;
/// false if the control task's queue is full (asked again later).
pub(super) fn request_transfer(
    world: &mut World,
    e: Entity,
    entity: shared::EntityId,
    auth: Authority,
    target: shared::RegionKey,
    pos: DVec3,
    not_before: u64,
) -> bool {
    debug!(%entity, from = %auth.region, to = %target, not_before, "transfer requested");
    let req = SimOut::RequestTransfer {
        entity,
        from_region: auth.region,
        from_region_epoch: auth.region_epoch,
        entity_epoch: auth.entity_epoch,
        to_region: target,
        position: pos,
        not_before_tick: not_before,
    };
    let sent = world.resource::<Outbox>().0.try_send(req).is_ok();
    if sent {
        let tick = world.resource::<TickState>().tick;
        world.entity_mut(e).insert(Transfer::Requested { at: tick, to_region: target, not_before });
    }
    let kind = if sent { "requested" } else { "request_dropped" };
    world.resource::<SimMetrics>().0.transfers.with_label_values(&[kind]).inc();
    sent
}

/// Ticks past its effective tick an early transfer waits for its entity to
/// pass the line before it is given up.
const CANCEL_AFTER_TICKS: u64 = 9;

/// Where a moving entity's path passes the handoff line within the next
/// `handoff_predict_ticks` ticks: the region it enters and the first tick
/// the new owner would simulate it.
fn predicted_crossing(
    map: &super::messages::MapView,
    cfg: &SimConfig,
    auth: &Authority,
    body: &Body,
    tick: u64,
) -> Option<(shared::RegionKey, u64)> {
    if cfg.handoff_predict_ticks == 0 || body.vel.length_squared() < 1.0 {
        return None;
    }
    let dt = 1.0 / f64::from(cfg.clock.hz.max(1));
    (1..=cfg.handoff_predict_ticks).find_map(|k| {
        let p = body.pos + body.vel.as_dvec3() * (k as f64 * dt);
        // Past the line at the end of tick + k: the new owner takes over at
        // the next.
        handoff_target(&map.tree, &auth.region, p, cfg.handoff_margin_m).map(|t| (t, tick + k + 1))
    })
}

/// Ships the entity to its new owner and stops simulating it here: this
/// server simulated it up to and including `tick`.
fn release(
    world: &mut World,
    e: Entity,
    t: super::messages::CommittedTransfer,
    tick: u64,
    out: &Outbox,
    metrics: &SimMetrics,
) {
    let me = world.resource::<SimConfig>().server;
    let (Some(net), Some(body)) = (world.get::<NetId>(e).copied(), world.get::<Body>(e).copied()) else { return };
    let avatar = world.get::<Avatar>(e).cloned();
    let prop = world.get::<super::physics::Prop>(e).copied().map(|p| {
        let physics = world.resource::<super::physics::Physics>();
        let rb = physics.world.bodies.get(p.body);
        super::messages::PropHandoff {
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
    let prop_now = world.get::<super::physics::Prop>(e).copied();
    let auth =
        Authority { region: t.to_region, region_epoch: t.to_region_epoch, entity_epoch: t.entity_epoch, since: tick };
    let mut ghost = super::ghosts::ghost_state(&cfg, &net, &body, &auth, avatar.as_ref(), prop_now.as_ref());
    ghost.q.authority = t.to;
    despawn(world, e);
    super::ghosts::released(world, ghost);
}

/// Edge of the cells replication buckets entities in, metres.
const GRID_CELL_M: f64 = 16.0;

/// What replication reads of an entity.
type Replicated = (&'static NetId, &'static Body, Option<&'static Avatar>, Option<&'static super::physics::Prop>);

/// Buffers replication keeps between ticks.
#[derive(Debug, Default)]
pub struct ReplicationScratch {
    states: Vec<EntityState>,
    /// `states` as the wire carries them: quantised once a tick, not once per viewer.
    quantised: Vec<QEntity>,
    grid: rustc_hash::FxHashMap<(i32, i32), Vec<u32>>,
    near: Vec<(f64, u32)>,
    buf: Vec<u8>,
    wanted: Vec<(f32, QEntity)>,
    sorted: Vec<QEntity>,
    /// Per connection: what was sent (baselines) and each entity's
    /// accumulated priority.
    links: rustc_hash::FxHashMap<super::messages::ConnId, Link>,
}

/// One connection's replication state.
#[derive(Debug, Default)]
struct Link {
    sender: snapshot::Sender,
    priority: rustc_hash::FxHashMap<EntityId, f32>,
    /// Tick this link was last served (stale links are dropped).
    served: shared::Tick,
}

/// Entities a snapshot considers, nearest first (the budget decides how
/// many of them change hands each tick).
const MAX_CANDIDATES: usize = 128;

/// How much an entity's update matters this tick: near and fast first.
/// Accumulated every tick it is not sent, so far and slow ones get their
/// turn (nothing starves).
fn priority(distance_m: f64, speed: f32) -> f32 {
    (1.0 / (1.0 + distance_m as f32 / 8.0)) * (1.0 + speed / 4.0)
}

fn cell_of(p: DVec3) -> (i32, i32) {
    (floor_i32(p.x / GRID_CELL_M), floor_i32(p.z / GRID_CELL_M))
}

/// Sends each attached player a snapshot of what is near it: itself, then
/// the nearest entities within the view radius, found ring by ring in a
/// grid of the entities rebuilt every tick.
pub fn replication(
    q: Query<Replicated, With<Authority>>,
    ghosts: Res<super::ghosts::Ghosts>,
    conns: Res<Conns>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut scratch: Local<ReplicationScratch>,
) {
    let sc = &mut *scratch;
    sc.states.clear();
    sc.quantised.clear();
    if tick.tick.is_multiple_of(90) {
        sc.grid.clear();
    } else {
        sc.grid.values_mut().for_each(Vec::clear);
    }
    for (n, b, _, prop) in &q {
        let rot = prop.map_or_else(|| Quat::from_rotation_y(b.yaw), |p| p.rot);
        sc.grid.entry(cell_of(b.pos)).or_default().push(sc.states.len() as u32);
        sc.states.push(EntityState {
            id: n.0,
            pos: b.pos,
            rot: rot.to_array(),
            vel: b.vel.to_array(),
            authority: cfg.server,
        });
        sc.quantised.push(QEntity::quantise(sc.states.last().expect("just pushed")));
    }
    // Neighbours' entities near our regions, as their owners simulate them.
    for (state, q) in ghosts.states() {
        sc.grid.entry(cell_of(state.pos)).or_default().push(sc.states.len() as u32);
        sc.states.push(state);
        sc.quantised.push(q);
    }
    let occupied = sc.grid.values().filter(|c| !c.is_empty()).count();
    let r2 = cfg.view_radius_m * cfg.view_radius_m;
    let max_ring = (cfg.view_radius_m / GRID_CELL_M).ceil() as i32;
    let keep = MAX_CANDIDATES;
    let (mut sent, mut bytes) = (0u64, 0u64);
    for (net, body, avatar, _) in &q {
        let Some(a) = avatar else { continue };
        let Some(conn) = a.conn else { continue };
        sc.near.clear();
        let (cx, cz) = cell_of(body.pos);
        for ring in 0..=max_ring {
            // Far from everyone, rings of empty cells cost more than a look
            // at every occupied cell: finish with that.
            if (2 * ring + 1) * 8 > occupied as i32 {
                for (&(x, z), cell) in &sc.grid {
                    if (x - cx).abs().max((z - cz).abs()) < ring {
                        continue;
                    }
                    for &i in cell {
                        let s = &sc.states[i as usize];
                        let d = s.pos.distance_squared(body.pos);
                        if s.id != net.0 && d <= r2 {
                            sc.near.push((d, i));
                        }
                    }
                }
                break;
            }
            for dz in -ring..=ring {
                for dx in -ring..=ring {
                    if dx.abs() != ring && dz.abs() != ring {
                        continue;
                    }
                    let Some(cell) = sc.grid.get(&(cx + dx, cz + dz)) else { continue };
                    for &i in cell {
                        let s = &sc.states[i as usize];
                        let d = s.pos.distance_squared(body.pos);
                        if s.id != net.0 && d <= r2 {
                            sc.near.push((d, i));
                        }
                    }
                }
            }
            // Enough found: what is left is farther than most of them
            // (interest management proper ranks by more than distance).
            if sc.near.len() >= keep {
                break;
            }
        }
        if sc.near.len() > keep {
            sc.near.select_nth_unstable_by(keep, |x, y| x.0.total_cmp(&y.0));
            sc.near.truncate(keep);
        }
        let link = sc.links.entry(conn).or_default();
        link.served = tick.tick;
        // Priority order: the player itself, then by accumulated priority.
        sc.wanted.clear();
        for (d2, i) in &sc.near {
            let e = &sc.states[*i as usize];
            let p = link.priority.entry(e.id).or_insert(0.0);
            *p += priority(d2.sqrt(), glam::Vec3::from(e.vel).length());
            sc.wanted.push((*p, sc.quantised[*i as usize]));
        }
        sc.wanted.sort_unstable_by(|x, y| y.0.total_cmp(&x.0));
        sc.sorted.clear();
        sc.sorted.push(QEntity::quantise(&EntityState {
            id: net.0,
            pos: body.pos,
            rot: Quat::from_rotation_y(body.yaw).to_array(),
            vel: body.vel.to_array(),
            authority: cfg.server,
        }));
        sc.sorted.extend(sc.wanted.iter().map(|(_, q)| *q));
        let header = snapshot::Header {
            tick: tick.tick,
            server: cfg.server,
            authoritative: true,
            last_input_seq: a.last_applied,
        };
        let acked = conns.0.get(&conn).map_or(0, |c| c.acked);
        sc.buf.clear();
        let started = std::time::Instant::now();
        let view = link.sender.encode(&header, body.pos, &sc.sorted, acked, cfg.snapshot_budget, &mut sc.buf);
        metrics.0.snapshot_encode.observe(started.elapsed().as_secs_f64());
        // What the client now holds as wanted is up to date: its priority
        // starts over; the rest keep accumulating.
        for q in &sc.sorted[1..] {
            if view.entities.binary_search_by_key(&q.id, |v| v.id).is_ok_and(|k| view.entities[k] == *q) {
                link.priority.insert(q.id, 0.0);
            }
        }
        if link.priority.len() > 4 * MAX_CANDIDATES {
            let near: rustc_hash::FxHashSet<EntityId> = sc.sorted.iter().map(|q| q.id).collect();
            link.priority.retain(|id, _| near.contains(id));
        }
        bytes += sc.buf.len() as u64;
        sent += 1;
        send(&conns, conn, Outbound::Datagram(bytes::Bytes::copy_from_slice(&sc.buf)), &metrics);
    }
    // Connections gone (or no longer served here) drop their baselines.
    if tick.tick.is_multiple_of(90) {
        sc.links.retain(|c, l| conns.0.contains_key(c) && l.served + 90 > tick.tick);
    }
    metrics.0.snapshots_sent.inc_by(sent);
    metrics.0.bytes_sent.inc_by(bytes);
}

/// Edited chunks farther than this from a player are not streamed to it.
pub const CHUNK_STREAM_RADIUS_M: f64 = 128.0;
/// Chunks one player is sent in one turn (a player's turn comes every 9
/// ticks: 40 chunks a second at most).
pub const CHUNKS_PER_TURN: usize = 4;

/// Per connection: the version of each chunk it was sent.
#[derive(Debug, Default)]
pub struct ChunkStreams {
    sent: rustc_hash::FxHashMap<super::messages::ConnId, rustc_hash::FxHashMap<shared::chunk::ChunkKey, u64>>,
}

/// Streams what players changed in the terrain to the players near it,
/// nearest chunk first, a few chunks a turn, each again when it changes.
/// Clients generate the rest of the world from the seed. A ninth of the
/// players each tick (every player ten times a second).
pub fn chunk_edits(
    players: Query<(&Body, &Avatar), With<Authority>>,
    terrain: Res<super::terrain::Terrain>,
    conns: Res<Conns>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut streams: Local<ChunkStreams>,
) {
    if tick.tick.is_multiple_of(90) {
        streams.sent.retain(|c, _| conns.0.contains_key(c));
    }
    if terrain.edited.is_empty() {
        return;
    }
    let slice = tick.tick % 9;
    let layout = terrain.layout;
    let mut near: Vec<(f64, shared::chunk::ChunkKey)> = Vec::new();
    for (i, (body, a)) in players.iter().enumerate() {
        let Some(conn) = a.conn.filter(|_| i as u64 % 9 == slice) else { continue };
        let sent = streams.sent.entry(conn).or_default();
        near.clear();
        for key in &terrain.edited {
            let d = layout.chunk_aabb(*key).linf_distance(body.pos);
            let version = terrain.chunks.get(key).map_or(0, |c| c.version);
            if d <= CHUNK_STREAM_RADIUS_M && sent.get(key) != Some(&version) {
                near.push((d, *key));
            }
        }
        near.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
        for (_, key) in near.iter().take(CHUNKS_PER_TURN) {
            let Some(c) = terrain.chunks.get(key) else { continue };
            let voxels: Vec<(u32, shared::terrain::Material)> = c.edits.iter().map(|(i, m)| (*i, *m)).collect();
            for (k, part) in voxels.chunks(shared::wire::MAX_CHUNK_EDITS_PER_FRAME).enumerate() {
                let msg = ServerControl::ChunkEdits {
                    chunk: *key,
                    version: c.version,
                    replace: k == 0,
                    voxels: part.to_vec(),
                };
                send(&conns, conn, Outbound::Control(msg), &metrics);
            }
            sent.insert(*key, c.version);
            metrics.0.chunk_edits_sent.inc();
        }
    }
}

/// Gauges and the heartbeat's load figures.
pub fn report(
    players: Query<&Authority, With<Avatar>>,
    entities: Query<(), With<Authority>>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    load: Res<Load>,
    conns: Res<Conns>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let np = players.iter().count();
    let ne = entities.iter().count();
    metrics.0.active_players.set(np as i64);
    metrics.0.entities.set(ne as i64);
    metrics.0.connections.set(conns.0.len() as i64);
    load.0.players.store(np as u32, Relaxed);
    load.0.entities.store(ne as u32, Relaxed);
    load.0.tick.store(tick.tick, Relaxed);
    if tick.tick.is_multiple_of(90) {
        let mut per: std::collections::BTreeMap<shared::RegionKey, u32> = std::collections::BTreeMap::new();
        for a in &players {
            *per.entry(a.region).or_default() += 1;
        }
        if let Ok(mut r) = load.0.regions.lock() {
            *r = per.into_iter().collect();
        }
    }
}

/// One line per tick naming the entities this server simulated
/// authoritatively in it (plus ticks simulated retroactively after a late
/// handoff). Runs right after the bodies moved, before any release.
pub fn log_authority(
    entities: Query<(&NetId, Option<&Avatar>), With<Authority>>,
    tick: Res<TickState>,
    cfg: Res<SimConfig>,
    metrics: Res<SimMetrics>,
    mut log: ResMut<AuthorityLog>,
) {
    let Some(tx) = log.tx.clone() else { return };
    let mut lines: Vec<String> = Vec::new();
    let mut catch_up = std::mem::take(&mut log.catch_up);
    catch_up.sort_by_key(|(t, _)| *t);
    for (t, e) in catch_up {
        lines.push(format!(r#"{{"tick":{t},"server":{},"auth":[{}],"catch_up":true}}"#, cfg.server.0, e.0));
    }
    let ids: Vec<String> = entities.iter().map(|(n, _)| n.0.0.to_string()).collect();
    // Inputs applied this tick, per avatar: [entity, first seq, last seq, count].
    let inputs: Vec<String> = entities
        .iter()
        .filter_map(|(n, a)| a.and_then(|a| a.applied_now).map(|(f, l, c)| format!("[{},{f},{l},{c}]", n.0.0)))
        .collect();
    // Orphans resumed this tick: [entity, dead source, last input its ghost had].
    let resumed: Vec<String> =
        std::mem::take(&mut log.resumed).iter().map(|(e, from, last)| format!("[{},{},{last}]", e.0, from.0)).collect();
    lines.push(format!(
        r#"{{"tick":{},"server":{},"auth":[{}],"inputs":[{}],"resumed":[{}]}}"#,
        tick.tick,
        cfg.server.0,
        ids.join(","),
        inputs.join(","),
        resumed.join(",")
    ));
    for l in lines {
        if tx.try_send(l).is_err() {
            metrics.0.datagrams_dropped.with_label_values(&["authority_log_full"]).inc();
        }
    }
}
