//! The systems of one tick, in the order of [`super::SimSet`].

use std::collections::VecDeque;

use bevy_ecs::prelude::*;
use bytes::Bytes;
use glam::{DVec3, Vec2, Vec3};
use shared::region::handoff_target;
use shared::wire::{EntityState, JoinRole, MAX_SNAPSHOT_ENTITIES, ServerControl, Snapshot};
use shared::{EntityId, Epoch, PlayerId};
use tracing::{debug, info, warn};

use super::components::*;
use super::messages::{AdoptError, HandoffState, Outbound, SimIn, SimOut};

/// Most inbox messages handled in one tick; the rest wait for the next.
const INBOX_BUDGET: usize = 65_536;
/// Ticks to wait before asking again for a refused transfer.
const TRANSFER_BACKOFF_TICKS: u64 = 45;
/// Ticks after which an unanswered transfer request is forgotten.
const TRANSFER_REQUEST_TIMEOUT_TICKS: u64 = 270;
/// Where a player joins when the client names no spawn point.
pub const DEFAULT_SPAWN: DVec3 = DVec3::new(1000.0, 10.0, 1000.0);

fn send(conns: &Conns, conn: u64, msg: Outbound, metrics: &SimMetrics) {
    if let Some(c) = conns.0.get(&conn)
        && c.tx.try_send(msg).is_err()
    {
        metrics.0.datagrams_dropped.with_label_values(&["outbound_full"]).inc();
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
                let Some(player) = world.resource::<Conns>().0.get(&conn).map(|c| c.player) else { continue };
                let avatar_entity = world.resource::<Index>().by_player.get(&player).copied();
                match avatar_entity.and_then(|e| world.get_mut::<Avatar>(e)) {
                    Some(mut a) => {
                        let applied = a.last_applied;
                        buffer_input(&mut a.pending, frame, applied);
                    }
                    None => {
                        let mut standby = world.resource_mut::<StandbyInputs>();
                        buffer_input(standby.0.entry(player).or_default(), frame, 0);
                    }
                }
            }
            SimIn::Left { conn } => left(world, conn),
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
            SimIn::TransferRefused { entity, reason } => {
                let until = world.resource::<TickState>().tick + TRANSFER_BACKOFF_TICKS;
                let e = world.resource::<Index>().by_net.get(&entity).copied();
                if let Some(mut t) = e.and_then(|e| world.get_mut::<Transfer>(e)) {
                    debug!(%entity, %reason, "transfer refused");
                    *t = Transfer::Backoff { until };
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
    tx: tokio::sync::mpsc::Sender<Outbound>,
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
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, role, tx });
        }
        (JoinRole::Play, None) => {
            let p = spawn.unwrap_or(DEFAULT_SPAWN);
            let map = world.resource::<Map>().0.clone();
            let Some(leaf) = map.tree.leaf_at(p) else {
                return refuse(format!("outside_world: spawn point {p} is outside the world"));
            };
            match map.live_owner(&leaf) {
                Some((owner, epoch)) if owner == cfg.server => {
                    let _ = tx.try_send(Outbound::Control(welcome(true, entity_id)));
                    world.resource_mut::<Conns>().0.insert(conn, Conn { player, role, tx });
                    let e = world
                        .spawn((
                            NetId(entity_id),
                            Body { pos: p, yaw: 0.0, vel: Vec3::ZERO },
                            Avatar { player, name, conn: Some(conn), ..Default::default() },
                            Authority { region: leaf, region_epoch: epoch, entity_epoch: Epoch(0), since: tick },
                        ))
                        .id();
                    let mut index = world.resource_mut::<Index>();
                    index.by_net.insert(entity_id, e);
                    index.by_player.insert(player, e);
                    info!(%player, %entity_id, region = %leaf, "player spawned");
                }
                Some((owner, _)) => refuse(format!("not_owner: region {leaf} is owned by server {}", owner.0)),
                None => refuse(format!("not_owner: region {leaf} has no live owner yet")),
            }
        }
        (JoinRole::Standby, _) => {
            let _ = tx.try_send(Outbound::Control(welcome(existing.is_some(), entity_id)));
            world.resource_mut::<Conns>().0.insert(conn, Conn { player, role, tx });
            if let Some(mut a) = existing.and_then(|e| world.get_mut::<Avatar>(e)) {
                a.conn.get_or_insert(conn);
            }
        }
    }
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
    if !still_connected && world.get::<Transfer>(e).is_none_or(|t| !matches!(t, Transfer::Committed(_))) {
        despawn(world, e);
        info!(player = %c.player, "player left");
    }
}

fn despawn(world: &mut World, e: Entity) {
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

/// After a map change: refresh region epochs, drop authority over regions
/// that are no longer ours (the coordinator gave them away).
fn revalidate_authority(world: &mut World) {
    let me = world.resource::<SimConfig>().server;
    let map = world.resource::<Map>().0.clone();
    let mut lost = Vec::new();
    let mut q = world.query::<(Entity, &mut Authority, &Body)>();
    for (e, mut auth, body) in q.iter_mut(world) {
        let leaf = map.tree.leaf_at(body.pos).unwrap_or(auth.region);
        let region = if map.tree.is_leaf(&auth.region) { auth.region } else { leaf };
        match map.live_owner(&region) {
            Some((owner, epoch)) if owner == me => {
                auth.region = region;
                auth.region_epoch = epoch;
            }
            _ => lost.push(e),
        }
    }
    let metrics = world.resource::<SimMetrics>().clone();
    for e in lost {
        let id = world.get::<NetId>(e).map(|n| n.0);
        let in_transfer = matches!(world.get::<Transfer>(e), Some(Transfer::Committed(_)));
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
        let late = tick - s.effective_tick;
        metrics.0.handoff_late_ticks.observe(late as f64);
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
        if let Some(p) = s.player
            && let Some(buf) = world.resource_mut::<StandbyInputs>().0.remove(&p)
        {
            for f in buf {
                buffer_input(&mut pending, f, s.last_applied_input);
            }
        }
        let mut e = world.spawn((
            NetId(s.entity),
            Body { pos: s.pos, yaw: s.yaw, vel: s.vel },
            Authority {
                region: s.to_region,
                region_epoch: s.to_region_epoch,
                entity_epoch: s.entity_epoch,
                since: s.effective_tick,
            },
        ));
        if let Some(player) = s.player {
            e.insert(Avatar {
                player,
                name: String::new(),
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
        {
            let mut log = world.resource_mut::<AuthorityLog>();
            if log.tx.is_some() {
                log.catch_up.extend((s.effective_tick..tick).map(|t| (t, s.entity)));
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

/// Applies each player's pending inputs, in order and once, and moves the body.
pub fn player_bodies(
    mut q: Query<(&mut Body, &mut Avatar), With<Authority>>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
) {
    let mut applied = 0u64;
    for (mut body, mut a) in &mut q {
        let steps = (1 + a.catch_up.min(90)) as f32;
        a.catch_up = 0;
        while let Some(f) = a.pending.pop_front() {
            a.last_applied = f.seq;
            let stick = Vec2::from(f.locomotion);
            a.locomotion = if stick.length_squared() > 1.0 { stick.normalize().into() } else { stick.into() };
            a.turn = f.turn.clamp(-std::f32::consts::TAU, std::f32::consts::TAU);
            applied += 1;
        }
        let dt = tick.dt * steps;
        body.yaw = (body.yaw + a.turn * dt).rem_euclid(std::f32::consts::TAU);
        // Yaw 0 faces -Z; the stick's x strafes right (+X at yaw 0).
        let (s, c) = body.yaw.sin_cos();
        let forward = Vec3::new(-s, 0.0, -c);
        let right = Vec3::new(c, 0.0, -s);
        body.vel = (right * a.locomotion[0] + forward * a.locomotion[1]) * cfg.walk_speed;
        let step = body.vel * dt;
        body.pos += step.as_dvec3();
    }
    metrics.0.inputs_applied.inc_by(applied);
}

/// Boundary checks: pre-connect hints, transfer requests, and the release of
/// entities whose transfer takes effect next tick.
pub fn authority(world: &mut World) {
    let cfg = world.resource::<SimConfig>().clone();
    let tick = world.resource::<TickState>().tick;
    let map = world.resource::<Map>().0.clone();
    let out = world.resource::<Outbox>().clone();
    let metrics = world.resource::<SimMetrics>().clone();

    let mut releases = Vec::new();
    let mut requests = Vec::new();
    let mut hints = Vec::new();
    let mut local_moves = Vec::new();
    {
        let mut q = world.query::<(Entity, &NetId, &Body, &Authority, Option<&Avatar>, Option<&Transfer>)>();
        for (e, net, body, auth, avatar, transfer) in q.iter(world) {
            match transfer {
                Some(Transfer::Committed(t)) if tick + 1 >= t.effective_tick => {
                    releases.push((e, t.clone()));
                    continue;
                }
                Some(Transfer::Committed(_)) => continue,
                Some(Transfer::Requested { at }) if tick < at + TRANSFER_REQUEST_TIMEOUT_TICKS => continue,
                Some(Transfer::Backoff { until }) if tick < *until => continue,
                _ => {}
            }
            if let Some(a) = avatar.filter(|a| a.conn.is_some()) {
                for leaf in map.tree.overlapping_leaves(body.pos, cfg.overlap_m) {
                    if let Some((owner, _)) = map.live_owner(&leaf)
                        && owner != cfg.server
                        && !a.preconnected.contains(&owner)
                    {
                        hints.push((e, owner));
                    }
                }
            }
            let Some(target) = handoff_target(&map.tree, &auth.region, body.pos, cfg.handoff_margin_m) else {
                continue;
            };
            match map.live_owner(&target) {
                Some((owner, epoch)) if owner == cfg.server => local_moves.push((e, target, epoch)),
                Some(_) => requests.push((e, net.0, *auth, target, body.pos)),
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
        let msg = ServerControl::PreConnect {
            server: owner,
            quic_addr: peer.quic.clone(),
            cert_sha256: peer.cert_sha256.clone(),
        };
        let conn = world.get_mut::<Avatar>(e).and_then(|mut a| {
            a.preconnected.insert(owner);
            a.conn
        });
        if let Some(c) = conn {
            send(world.resource::<Conns>(), c, Outbound::Control(msg), &metrics);
        }
    }
    for (e, entity, auth, target, pos) in requests {
        let req = SimOut::RequestTransfer {
            entity,
            from_region: auth.region,
            from_region_epoch: auth.region_epoch,
            entity_epoch: auth.entity_epoch,
            to_region: target,
            position: pos,
            not_before_tick: tick + 1,
        };
        if out.0.try_send(req).is_ok() {
            world.entity_mut(e).insert(Transfer::Requested { at: tick });
            metrics.0.transfers.with_label_values(&["requested"]).inc();
        } else {
            metrics.0.transfers.with_label_values(&["request_dropped"]).inc();
        }
    }
    for (e, t) in releases {
        release(world, e, t, tick, &out, &metrics);
    }
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
    despawn(world, e);
}

/// Sends each attached player a snapshot of what is near it.
pub fn replication(
    q: Query<(&NetId, &Body, Option<&Avatar>), With<Authority>>,
    conns: Res<Conns>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut scratch: Local<Vec<EntityState>>,
) {
    scratch.clear();
    scratch.extend(q.iter().map(|(n, b, _)| EntityState {
        id: n.0,
        pos: b.pos,
        yaw: b.yaw,
        vel: b.vel.to_array(),
        authority: cfg.server,
    }));
    let r2 = cfg.view_radius_m * cfg.view_radius_m;
    let mut near: Vec<(f64, usize)> = Vec::new();
    let mut buf = Vec::with_capacity(shared::wire::MAX_DATAGRAM);
    let (mut sent, mut bytes) = (0u64, 0u64);
    for (net, body, avatar) in &q {
        let Some(conn) = avatar.and_then(|a| a.conn) else { continue };
        let Some(a) = avatar else { continue };
        near.clear();
        near.extend(
            scratch
                .iter()
                .enumerate()
                .filter(|(_, s)| s.id != net.0)
                .map(|(i, s)| (s.pos.distance_squared(body.pos), i))
                .filter(|(d, _)| *d <= r2),
        );
        let keep = MAX_SNAPSHOT_ENTITIES - 1;
        if near.len() > keep {
            near.select_nth_unstable_by(keep, |x, y| x.0.total_cmp(&y.0));
            near.truncate(keep);
        }
        let mut entities = Vec::with_capacity(near.len() + 1);
        entities.push(EntityState {
            id: net.0,
            pos: body.pos,
            yaw: body.yaw,
            vel: body.vel.to_array(),
            authority: cfg.server,
        });
        entities.extend(near.iter().map(|(_, i)| scratch[*i]));
        let snap = Snapshot {
            tick: tick.tick,
            server: cfg.server,
            authoritative: true,
            last_input_seq: a.last_applied,
            entities,
        };
        buf.clear();
        snap.encode(&mut buf);
        bytes += buf.len() as u64;
        sent += 1;
        send(&conns, conn, Outbound::Datagram(Bytes::copy_from_slice(&buf)), &metrics);
    }
    metrics.0.snapshots_sent.inc_by(sent);
    metrics.0.bytes_sent.inc_by(bytes);
}

/// Gauges and the heartbeat's load figures.
pub fn report(
    players: Query<(), (With<Avatar>, With<Authority>)>,
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
}

/// One line per tick naming the entities this server simulated
/// authoritatively in it (plus ticks simulated retroactively after a late
/// handoff). Runs right after the bodies moved, before any release.
pub fn log_authority(
    entities: Query<&NetId, With<Authority>>,
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
    let ids: Vec<String> = entities.iter().map(|n| n.0.0.to_string()).collect();
    lines.push(format!(r#"{{"tick":{},"server":{},"auth":[{}]}}"#, tick.tick, cfg.server.0, ids.join(",")));
    for l in lines {
        if tx.try_send(l).is_err() {
            metrics.0.datagrams_dropped.with_label_values(&["authority_log_full"]).inc();
        }
    }
}
