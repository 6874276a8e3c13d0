//! World edits in the tick: validate, apply to the loaded voxels, rebuild
//! the touched colliders in the same tick, break off unsupported
//! structures, hand the deltas to the writer, and acknowledge each edit
//! once the store says it is durable.
//!
//! What an acknowledgement promises: `EditOutcome::Done` is sent only after
//! the writer reported every delta of the edit durable. A rejected edit was
//! not applied at all.

use std::collections::VecDeque;

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat, Vec3};
use rustc_hash::{FxHashMap, FxHashSet};
use shared::PlayerId;
use shared::chunk::{ChunkKey, VoxelCoord};
use shared::edit::{EditOp, VoxelDelta};
use shared::ids::EntityIdAllocator;
use shared::rate::TokenBucket;
use shared::terrain::Material;
use shared::wire::{EditOutcome, ServerControl};
use tracing::warn;

use super::authority::Authority;
use super::core::{Avatar, Body, Index, Map, SimConfig, SimMetrics, TickState};
use super::messages::{ConnId, Outbound};
use super::physics::{Physics, PropShape, spawn_prop, world_pose};
use super::terrain::Terrain;
use crate::sim::inbox::Conns;
use crate::store::{DeltaBatch, WriterHandle};

/// Structure voxels examined per break check; a bigger structure is
/// assumed to hold.
const MAX_STRUCTURE_SCAN: usize = 512;
/// Batches (one per tick with edits) held while the writer's queue is full,
/// beyond the writer's own queue: past this, edits are refused
/// (`store_busy`) rather than held without bound.
const MAX_BACKLOG: usize = 4 * 90;
/// Props farther than this beyond an edit's sphere are not woken by it, metres.
const WAKE_MARGIN_M: f64 = 2.0;
/// Props one broken structure turns into; the rest crumbles to nothing.
const MAX_DEBRIS: usize = 64;

/// Knobs of editing.
#[derive(Debug, Clone)]
pub struct EditSettings {
    /// Farthest an edit's nearest point may be from the player's head, metres.
    pub reach_m: f64,
    /// Sustained edits per second per player.
    pub rate_per_s: f64,
    /// Edits a player may make in a burst.
    pub burst: f64,
}

/// Edits reach 5 m from the head; 8 edits a second per player, 16 in a
/// burst.
impl Default for EditSettings {
    fn default() -> Self {
        Self { reach_m: 5.0, rate_per_s: 8.0, burst: 16.0 }
    }
}

/// An edit asked for by a player, waiting for this tick's edit stage.
#[derive(Debug, Clone)]
pub struct EditRequest {
    /// Where the answer goes (`None`: a scripted edit, no answer).
    pub conn: Option<ConnId>,
    pub player: PlayerId,
    pub id: u32,
    pub op: EditOp,
}

/// Edits in flight and the bookkeeping around them.
#[derive(Resource, Debug)]
pub struct Edits {
    pub settings: EditSettings,
    pub queue: Vec<EditRequest>,
    writer: WriterHandle,
    next_seq: u64,
    /// Applied, waiting to be durable: (seq, conn, id, changed).
    acks: VecDeque<(u64, Option<ConnId>, u32, u32)>,
    /// Batches the writer's queue had no room for; sent first next tick.
    backlog: VecDeque<DeltaBatch>,
    buckets: FxHashMap<PlayerId, TokenBucket>,
    ids: Option<EntityIdAllocator>,
}

impl Edits {
    pub fn new(settings: EditSettings, writer: WriterHandle, ids: Option<EntityIdAllocator>) -> Self {
        Self {
            settings,
            queue: Vec::new(),
            writer,
            next_seq: 1,
            acks: VecDeque::new(),
            backlog: VecDeque::new(),
            buckets: FxHashMap::default(),
            ids,
        }
    }

    /// A fresh mesh-wide entity id (props, debris).
    pub fn mint(&mut self) -> Option<shared::EntityId> {
        self.ids.as_mut().and_then(|a| a.mint().ok())
    }
}

fn reply(world: &World, conn: Option<ConnId>, id: u32, outcome: EditOutcome) {
    let Some(conn) = conn else { return };
    let msg = Outbound::Control(ServerControl::EditResult { id, outcome });
    super::inbox::send(world.resource::<Conns>(), conn, msg, world.resource::<SimMetrics>());
}

fn reject(world: &World, r: &EditRequest, reason: &'static str) {
    world.resource::<SimMetrics>().0.edits_rejected.with_label_values(&[reason]).inc();
    reply(world, r.conn, r.id, EditOutcome::Rejected { reason: reason.to_owned() });
}

/// Why the world refuses an edit, before anything changes.
fn check(world: &mut World, r: &EditRequest) -> Result<(), &'static str> {
    if r.op.validate().is_err() {
        return Err("bad_shape");
    }
    let e = world.resource::<Index>().by_player.get(&r.player).copied().ok_or("no_avatar")?;
    if world.get::<Authority>(e).is_none() {
        return Err("no_avatar");
    }
    let (Some(body), Some(avatar)) = (world.get::<Body>(e).copied(), world.get::<Avatar>(e)) else {
        return Err("no_avatar");
    };
    let head = world_pose(&body, &avatar.head).0;
    let (c, rad) = (r.op.center(), f64::from(r.op.radius()));
    let settings = world.resource::<Edits>().settings.clone();
    if head.distance(c) - rad > settings.reach_m {
        return Err("out_of_reach");
    }
    let lo = c - DVec3::splat(rad);
    let hi = c + DVec3::splat(rad);
    let me = world.resource::<SimConfig>().server;
    let map = world.resource::<Map>().0.clone();
    for i in 0..8 {
        let corner = DVec3::new(
            if i & 1 == 0 { lo.x } else { hi.x },
            if i & 2 == 0 { lo.y } else { hi.y },
            if i & 4 == 0 { lo.z } else { hi.z },
        );
        let owned = map.tree.leaf_at(corner).and_then(|l| map.live_owner(&l)).is_some_and(|(o, _)| o == me);
        if !owned {
            return Err("not_owner");
        }
    }
    if !world.resource::<Terrain>().box_loaded(lo, hi) {
        return Err("not_loaded");
    }
    if world.resource::<Edits>().backlog.len() >= MAX_BACKLOG {
        return Err("store_busy");
    }
    // Rate last: a refused edit does not spend a token.
    let tick = world.resource::<TickState>().tick;
    let hz = f64::from(world.resource::<SimConfig>().clock.hz);
    let mut edits = world.resource_mut::<Edits>();
    let now = tick as f64 / hz;
    let b = edits.buckets.entry(r.player).or_insert_with(|| TokenBucket::new(settings.rate_per_s, settings.burst, now));
    if b.take(now) { Ok(()) } else { Err("rate_limited") }
}

/// The edit stage of a tick.
pub fn world_edits(world: &mut World) {
    // Acknowledge what became durable.
    let durable = world.resource::<Edits>().writer.durable_upto();
    world.resource_mut::<Terrain>().flushed(durable);
    loop {
        let front = world.resource::<Edits>().acks.front().copied();
        match front {
            Some((seq, conn, id, changed)) if seq <= durable => {
                world.resource_mut::<Edits>().acks.pop_front();
                reply(world, conn, id, EditOutcome::Done { changed });
            }
            _ => break,
        }
    }
    flush_backlog(world);
    let waiting = world.resource::<Edits>().acks.len() as i64;
    world.resource::<SimMetrics>().0.edits_unacknowledged.set(waiting);

    let queue = std::mem::take(&mut world.resource_mut::<Edits>().queue);
    if queue.is_empty() {
        return;
    }
    let layout = world.resource::<Terrain>().layout;
    let mut batch = Vec::new();
    let mut touched: FxHashSet<ChunkKey> = FxHashSet::default();
    let mut upto = 0;
    let mut spheres: Vec<(DVec3, f64)> = Vec::new();
    for r in queue {
        if let Err(reason) = check(world, &r) {
            reject(world, &r, reason);
            continue;
        }
        spheres.push((r.op.center(), f64::from(r.op.radius())));
        let seq = {
            let mut e = world.resource_mut::<Edits>();
            e.next_seq += 1;
            e.next_seq - 1
        };
        upto = seq;
        let mut changed = Vec::new();
        {
            let mut terrain = world.resource_mut::<Terrain>();
            for v in r.op.voxels(&layout) {
                let Some(old) = terrain.material(v) else { continue };
                if let Some(new) = r.op.result_for(old) {
                    terrain.set(v, new);
                    changed.push((v, new));
                }
            }
        }
        if matches!(r.op, EditOp::Dig { .. }) {
            let dug: Vec<VoxelCoord> = changed.iter().map(|(v, _)| *v).collect();
            let broken = break_unsupported(world, &dug);
            changed.extend(broken.iter().map(|(v, _)| (*v, Material::Air)));
            spawn_debris(world, &broken);
        }
        let deltas: Vec<VoxelDelta> = changed
            .iter()
            .map(|(v, m)| VoxelDelta { chunk: layout.chunk_of(*v), index: layout.local_index(*v) as u32, material: *m })
            .collect();
        {
            let mut terrain = world.resource_mut::<Terrain>();
            for d in &deltas {
                touched.insert(d.chunk);
                terrain.unflushed.entry(d.chunk).or_default().push((seq, *d));
            }
        }
        world.resource::<SimMetrics>().0.edits_applied.inc();
        world.resource::<SimMetrics>().0.voxels_changed.inc_by(deltas.len() as u64);
        world.resource_mut::<Edits>().acks.push_back((seq, r.conn, r.id, deltas.len() as u32));
        batch.extend(deltas);
    }
    if upto > 0 {
        let tick = world.resource::<TickState>().tick;
        world.resource_mut::<Edits>().backlog.push_back(DeltaBatch { upto, tick, deltas: batch });
        flush_backlog(world);
    }
    // Colliders follow the voxels in the same tick.
    let mut touched: Vec<ChunkKey> = touched.into_iter().collect();
    touched.sort();
    world.resource_scope(|world, mut terrain: Mut<Terrain>| {
        let mut physics = world.resource_mut::<Physics>();
        for k in touched {
            let aabb = layout.chunk_aabb(k);
            terrain.rebuild_collider(k, &mut physics);
            // Rebuilding a chunk's collider wakes every prop touching it;
            // only those near an edit have a reason to move.
            let (lo, hi) = (physics.to_local(aabb.min), physics.to_local(aabb.max));
            let far: Vec<_> = physics
                .world
                .query_pipeline_with_filter(rapier3d::prelude::QueryFilter::only_dynamic())
                .intersect_aabb_conservative(rapier3d::geometry::Aabb::new(lo - Vec3::ONE, hi + Vec3::ONE))
                .filter_map(|(_, co)| co.parent())
                .filter(|b| {
                    physics.world.bodies.get(*b).is_some_and(|rb| {
                        let p = physics.origin + rb.translation().as_dvec3();
                        rb.is_sleeping() && spheres.iter().all(|(c, r)| p.distance(*c) > r + WAKE_MARGIN_M)
                    })
                })
                .collect();
            physics.resleep.extend(far);
        }
    });
}

/// At shutdown: gives the writer every batch still waiting for room in its
/// queue (blocking), so a clean stop writes every applied edit.
pub fn hand_over_backlog(world: &mut World) {
    let mut edits = world.resource_mut::<Edits>();
    let writer = edits.writer.tx.clone();
    for b in edits.backlog.drain(..) {
        if writer.blocking_send(b).is_err() {
            warn!("edit writer gone at shutdown; unwritten edits were never acknowledged");
            break;
        }
    }
}

fn flush_backlog(world: &mut World) {
    let mut edits = world.resource_mut::<Edits>();
    while let Some(b) = edits.backlog.pop_front() {
        match edits.writer.tx.try_send(b) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(b)) => {
                edits.backlog.push_front(b);
                break;
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(b)) => {
                // The writer is gone (shutting down): nothing will make these durable.
                warn!(upto = b.upto, "edit writer closed; edits stay unacknowledged");
                edits.backlog.push_front(b);
                break;
            }
        }
    }
}

/// Structure voxels next to the dug ones that no longer touch natural
/// ground, through other structure voxels. They break off.
fn break_unsupported(world: &World, dug: &[VoxelCoord]) -> Vec<(VoxelCoord, Material)> {
    let terrain = world.resource::<Terrain>();
    let mut seen: FxHashSet<VoxelCoord> = FxHashSet::default();
    let mut broken = Vec::new();
    const DIRS: [(i32, i32, i32); 6] = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)];
    let step = |v: VoxelCoord, d: (i32, i32, i32)| VoxelCoord { x: v.x + d.0, y: v.y + d.1, z: v.z + d.2 };
    for &v in dug {
        for d in DIRS {
            let start = step(v, d);
            if seen.contains(&start) || !terrain.material(start).is_some_and(Material::is_structure) {
                continue;
            }
            // Flood the structure; supported when it touches natural solid
            // (or unloaded) voxels, or is too big to scan.
            let mut component = vec![start];
            let mut frontier = vec![start];
            seen.insert(start);
            let mut supported = false;
            while let Some(c) = frontier.pop() {
                for d in DIRS {
                    let n = step(c, d);
                    match terrain.material(n) {
                        None => supported = true,
                        Some(m) if m.is_solid() && !m.is_structure() => supported = true,
                        Some(m) if m.is_structure() && seen.insert(n) => {
                            component.push(n);
                            frontier.push(n);
                        }
                        _ => {}
                    }
                }
                if supported || component.len() > MAX_STRUCTURE_SCAN {
                    supported = true;
                    break;
                }
            }
            if !supported {
                broken.extend(component.into_iter().map(|c| (c, terrain.material(c).unwrap_or(Material::Air))));
            }
        }
    }
    broken
}

/// Turns broken structure voxels into falling props.
fn spawn_debris(world: &mut World, broken: &[(VoxelCoord, Material)]) {
    if broken.is_empty() {
        return;
    }
    let layout = world.resource::<Terrain>().layout;
    {
        let mut terrain = world.resource_mut::<Terrain>();
        for (v, _) in broken {
            terrain.set(*v, Material::Air);
        }
    }
    let half = (layout.voxel_m as f32 / 2.0) * 0.98;
    for (v, _) in broken.iter().take(MAX_DEBRIS) {
        let id = world.resource_mut::<Edits>().mint();
        let Some(id) = id else { break };
        spawn_prop(world, id, PropShape::Box { half: [half; 3] }, layout.voxel_center(*v), Quat::IDENTITY, Vec3::ZERO);
    }
    world.resource::<SimMetrics>().0.structures_broken.inc();
}
