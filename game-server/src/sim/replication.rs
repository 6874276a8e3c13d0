//! Replication: each player's snapshot (interest, priority, the byte
//! budget, the delta codec), the player edits streamed to it, and the load
//! the heartbeat reports.

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat};
use shared::EntityId;
use shared::chunk::floor_i32;
use shared::snapshot::{self, QEntity};
use shared::wire::{EntityState, ServerControl};

use super::authority::Authority;
use super::core::*;
use super::messages::Outbound;
use crate::sim::inbox::Conns;
use crate::sim::inbox::send;

/// Edge of the cells replication buckets entities in, metres.
pub(crate) const GRID_CELL_M: f64 = 16.0;

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
pub(crate) const MAX_CANDIDATES: usize = 128;

/// How much an entity's update matters this tick: near and fast first.
/// Accumulated every tick it is not sent, so far and slow ones get their
/// turn (nothing starves).
pub(crate) fn priority(distance_m: f64, speed: f32) -> f32 {
    (1.0 / (1.0 + distance_m as f32 / 8.0)) * (1.0 + speed / 4.0)
}

pub(crate) fn cell_of(p: DVec3) -> (i32, i32) {
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
            *per.entry(a.region()).or_default() += 1;
        }
        if let Ok(mut r) = load.0.regions.lock() {
            *r = per.into_iter().collect();
        }
    }
}
