//! Terrain in the simulation: which chunks are loaded, how they arrive from
//! the generator threads, and their colliders.
//!
//! Chunks are loaded around players and awake props, generated (seed +
//! stored deltas) on worker threads, and handed to the tick thread finished,
//! collider shape included. The tick thread only integrates a bounded number
//! per tick. A chunk nobody has wanted for a while is unloaded, unless it
//! holds edits not yet durable.
//!
//! Colliders: one static compound of boxes per chunk (its solid voxels,
//! greedily merged). An edit rebuilds the shapes of the chunks it touched in
//! the same tick; changing a chunk's collider wakes only the props touching
//! that chunk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;
use glam::{DVec3, Vec3};
use rapier3d::prelude::{
    ColliderBuilder, ColliderHandle, Pose, QueryFilter, RigidBodyHandle, RigidBodyType, SharedShape,
};
use rustc_hash::{FxHashMap, FxHashSet};
use shared::Tick;
use shared::chunk::{ChunkKey, ChunkLayout, VoxelCoord};
use shared::controller::SolidQuery;
use shared::edit::{VoxelDelta, rebuild};
use shared::terrain::{ChunkVoxels, Material, TerrainGen};
use tracing::warn;

use super::core::{Avatar, Body, SimMetrics, TickState};
use super::physics::Physics;
use crate::store::WorldStore;

/// Knobs of terrain streaming.
#[derive(Debug, Clone)]
pub struct TerrainSettings {
    /// Chunks within this distance (per axis) of a player are kept loaded.
    pub player_radius_m: f64,
    /// Chunks within this distance of an awake prop are kept loaded.
    pub prop_radius_m: f64,
    /// A chunk unwanted for this many ticks is unloaded.
    pub keep_ticks: u64,
    /// Chunks requested from the generators and not yet back, at most.
    pub max_in_flight: usize,
    /// Finished chunks integrated per tick, at most.
    pub integrate_per_tick: usize,
    /// Generator threads; 0 generates on the tick thread when asked (tests).
    pub workers: usize,
}

/// Chunks kept within 12 m of a player (`--chunk-radius-m`) and 4 m of an
/// awake prop, unloaded after 5 s (450 ticks) unwanted; at most 256 chunks
/// asked of the generators at once, and 8 integrated a tick, so the tick
/// thread takes finished chunks a few at a time.
impl Default for TerrainSettings {
    fn default() -> Self {
        Self {
            player_radius_m: 12.0,
            prop_radius_m: 4.0,
            keep_ticks: 5 * 90,
            max_in_flight: 256,
            integrate_per_tick: 8,
            workers: 1,
        }
    }
}

/// Chunks unloaded per tick, at most.
const UNLOADS_PER_TICK: usize = 4;

/// A chunk as a generator thread hands it over.
#[derive(Debug)]
pub struct ChunkReady {
    pub key: ChunkKey,
    /// Voxels, collider shape, and the stored deltas on top of the procedural world.
    pub result: Result<(ChunkVoxels, Option<SharedShape>, Vec<VoxelDelta>), String>,
    pub took: Duration,
}

enum Loader {
    Workers { jobs: crossbeam_channel::Sender<ChunkKey>, done: crossbeam_channel::Receiver<ChunkReady> },
    Inline { generator: Arc<TerrainGen>, store: WorldStore, queue: VecDeque<ChunkKey> },
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loader::Workers { .. } => f.write_str("Loader::Workers"),
            Loader::Inline { queue, .. } => write!(f, "Loader::Inline({} queued)", queue.len()),
        }
    }
}

/// Builds one chunk: procedural voxels, stored deltas on top, collider shape.
pub fn build_chunk(generator: &TerrainGen, store: &WorldStore, key: ChunkKey) -> ChunkReady {
    let t0 = Instant::now();
    let result = store
        .chunk_deltas(key)
        .map(|deltas| {
            let voxels = rebuild(generator, key, &deltas);
            let shape = chunk_shape(&voxels, &generator.layout);
            (voxels, shape, deltas)
        })
        .map_err(|e| e.to_string());
    ChunkReady { key, result, took: t0.elapsed() }
}

/// The chunk's solid voxels as a compound of boxes, in chunk-local metres
/// (origin at the chunk's minimum corner). Boxes are grown greedily along
/// x, then y, then z, so flat ground and solid rock become a few big boxes.
pub fn chunk_shape(voxels: &ChunkVoxels, layout: &ChunkLayout) -> Option<SharedShape> {
    let n = layout.chunk_voxels as usize;
    let vm = layout.voxel_m as f32;
    match voxels {
        ChunkVoxels::Uniform(m) if !m.is_solid() => return None,
        ChunkVoxels::Uniform(_) => {
            let h = vm * n as f32 / 2.0;
            let block = SharedShape::cuboid(h, h, h);
            return Some(SharedShape::compound(vec![(Pose::from_translation(Vec3::splat(h)), block)]));
        }
        ChunkVoxels::Dense(_) => {}
    }
    let idx = |x: usize, y: usize, z: usize| x + n * (y + n * z);
    // Free: solid and not yet in a box. Boxes grow along x, then z, then y:
    // terrain is layered, so horizontal slabs first gives fewer boxes.
    let mut free: Vec<bool> = (0..n * n * n).map(|i| voxels.get(i).is_solid()).collect();
    let mut parts = Vec::new();
    for y in 0..n {
        for z in 0..n {
            for x in 0..n {
                if !free[idx(x, y, z)] {
                    continue;
                }
                let mut x2 = x;
                while x2 + 1 < n && free[idx(x2 + 1, y, z)] {
                    x2 += 1;
                }
                let mut z2 = z;
                while z2 + 1 < n && free[idx(x, y, z2 + 1)..=idx(x2, y, z2 + 1)].iter().all(|f| *f) {
                    z2 += 1;
                }
                let mut y2 = y;
                while y2 + 1 < n && (z..=z2).all(|zz| free[idx(x, y2 + 1, zz)..=idx(x2, y2 + 1, zz)].iter().all(|f| *f))
                {
                    y2 += 1;
                }
                for yy in y..=y2 {
                    for zz in z..=z2 {
                        free[idx(x, yy, zz)..=idx(x2, yy, zz)].iter_mut().for_each(|f| *f = false);
                    }
                }
                let lo = Vec3::new(x as f32, y as f32, z as f32) * vm;
                let hi = Vec3::new((x2 + 1) as f32, (y2 + 1) as f32, (z2 + 1) as f32) * vm;
                let half = (hi - lo) / 2.0;
                parts.push((Pose::from_translation(lo + half), SharedShape::cuboid(half.x, half.y, half.z)));
            }
        }
    }
    if parts.is_empty() { None } else { Some(SharedShape::compound(parts)) }
}

/// A chunk the simulation holds.
#[derive(Debug)]
pub struct LoadedChunk {
    pub voxels: ChunkVoxels,
    pub collider: Option<ColliderHandle>,
    /// Last tick something wanted it loaded.
    pub wanted_at: Tick,
    /// What players changed on top of the procedural world: voxel index →
    /// material now (a client that generates the world from the seed needs
    /// only these).
    pub edits: std::collections::BTreeMap<u32, Material>,
    /// Drawn from the terrain's clock at every load and every change, so a
    /// version never names two different sets of edits (a chunk unloaded
    /// and read back gets a new one): clients are sent a chunk again when
    /// its version is not the one they were sent.
    pub version: u64,
}

impl LoadedChunk {
    fn new(
        voxels: ChunkVoxels,
        collider: Option<ColliderHandle>,
        wanted_at: Tick,
        deltas: &[VoxelDelta],
        version: u64,
    ) -> Self {
        let edits: std::collections::BTreeMap<u32, Material> = deltas.iter().map(|d| (d.index, d.material)).collect();
        Self { voxels, collider, wanted_at, edits, version }
    }
}

/// The terrain the tick thread simulates against.
#[derive(Resource, Debug)]
pub struct Terrain {
    pub layout: ChunkLayout,
    pub generator: Arc<TerrainGen>,
    pub settings: TerrainSettings,
    pub chunks: FxHashMap<ChunkKey, LoadedChunk>,
    /// Loaded chunks that players changed (what clients are sent).
    pub edited: FxHashSet<ChunkKey>,
    /// The source of chunk versions.
    versions: u64,
    /// log2 of the chunk edge in voxels, when it is a power of two.
    shift: Option<u32>,
    in_flight: FxHashSet<ChunkKey>,
    /// Deltas applied here but not yet known durable, with the sequence
    /// number of their edit: laid over chunks read back from the store.
    pub unflushed: FxHashMap<ChunkKey, Vec<(u64, VoxelDelta)>>,
    loader: Loader,
    /// Props frozen (made fixed) because the terrain under them unloaded:
    /// removing a collider wakes what rests on it, and a woken prop would
    /// fall through the missing ground. Thawed when the chunk returns.
    frozen: FxHashMap<ChunkKey, Vec<RigidBodyHandle>>,
    /// Stale chunks waiting to be unloaded, a few per tick.
    to_unload: VecDeque<ChunkKey>,
}

impl Terrain {
    /// Terrain streamed by `settings.workers` generator threads (or inline when 0).
    pub fn new(generator: Arc<TerrainGen>, store: WorldStore, settings: TerrainSettings) -> Self {
        let loader = if settings.workers == 0 {
            Loader::Inline { generator: generator.clone(), store, queue: VecDeque::new() }
        } else {
            let (jobs, job_rx) = crossbeam_channel::bounded::<ChunkKey>(settings.max_in_flight);
            let (done_tx, done) = crossbeam_channel::bounded::<ChunkReady>(settings.max_in_flight);
            for i in 0..settings.workers {
                let (job_rx, done_tx, generator, store) =
                    (job_rx.clone(), done_tx.clone(), generator.clone(), store.clone());
                let spawned = std::thread::Builder::new().name(format!("chunk-gen-{i}")).spawn(move || {
                    while let Ok(key) = job_rx.recv() {
                        if done_tx.send(build_chunk(&generator, &store, key)).is_err() {
                            break;
                        }
                    }
                });
                if let Err(e) = spawned {
                    warn!(error = %e, "could not start a chunk generator thread");
                }
            }
            Loader::Workers { jobs, done }
        };
        Self {
            layout: generator.layout,
            shift: generator
                .layout
                .chunk_voxels
                .is_power_of_two()
                .then(|| generator.layout.chunk_voxels.trailing_zeros()),
            generator,
            settings,
            chunks: FxHashMap::default(),
            in_flight: FxHashSet::default(),
            edited: FxHashSet::default(),
            versions: 0,
            unflushed: FxHashMap::default(),
            loader,
            frozen: FxHashMap::default(),
            to_unload: VecDeque::new(),
        }
    }

    pub fn is_loaded(&self, key: ChunkKey) -> bool {
        self.chunks.contains_key(&key)
    }

    /// The material of a loaded voxel; `None` when its chunk is not loaded.
    #[inline]
    pub fn material(&self, v: VoxelCoord) -> Option<Material> {
        let (key, index) = match self.shift {
            // Power-of-two chunks: shifts and masks instead of divisions.
            Some(s) => {
                let m = (1i32 << s) - 1;
                let key = ChunkKey { x: v.x >> s, y: v.y >> s, z: v.z >> s };
                (key, ((v.x & m) | (v.y & m) << s | (v.z & m) << (2 * s)) as usize)
            }
            None => (self.layout.chunk_of(v), self.layout.local_index(v)),
        };
        Some(self.chunks.get(&key)?.voxels.get(index))
    }

    /// Marks every chunk within `radius` of `p` as wanted at `tick`, and asks
    /// for those not loaded.
    pub fn want_around(&mut self, p: DVec3, radius: f64, tick: Tick) {
        let lo = self.layout.chunk_at(p - DVec3::splat(radius));
        let hi = self.layout.chunk_at(p + DVec3::splat(radius));
        for z in lo.z..=hi.z {
            for y in lo.y..=hi.y {
                for x in lo.x..=hi.x {
                    self.want(ChunkKey { x, y, z }, tick);
                }
            }
        }
    }

    fn want(&mut self, key: ChunkKey, tick: Tick) {
        if let Some(c) = self.chunks.get_mut(&key) {
            c.wanted_at = tick;
            return;
        }
        if self.in_flight.contains(&key) || self.in_flight.len() >= self.settings.max_in_flight {
            return;
        }
        let sent = match &mut self.loader {
            Loader::Workers { jobs, .. } => jobs.try_send(key).is_ok(),
            Loader::Inline { queue, .. } => {
                queue.push_back(key);
                true
            }
        };
        if sent {
            self.in_flight.insert(key);
        }
    }

    /// Finished chunks, at most `max`.
    fn take_ready(&mut self, max: usize) -> Vec<ChunkReady> {
        let mut out = Vec::new();
        match &mut self.loader {
            Loader::Workers { done, .. } => {
                while out.len() < max {
                    match done.try_recv() {
                        Ok(r) => out.push(r),
                        Err(_) => break,
                    }
                }
            }
            Loader::Inline { generator, store, queue } => {
                while out.len() < max {
                    let Some(key) = queue.pop_front() else { break };
                    out.push(build_chunk(generator, store, key));
                }
            }
        }
        out
    }

    /// Whether every chunk touched by the box `lo..hi` is loaded.
    pub fn box_loaded(&self, lo: DVec3, hi: DVec3) -> bool {
        let a = self.layout.chunk_at(lo);
        let b = self.layout.chunk_at(hi);
        (a.z..=b.z).all(|z| (a.y..=b.y).all(|y| (a.x..=b.x).all(|x| self.is_loaded(ChunkKey { x, y, z }))))
    }

    /// Sets one voxel of a loaded chunk. Returns the old material, `None`
    /// when the chunk is not loaded.
    pub fn set(&mut self, v: VoxelCoord, m: Material) -> Option<Material> {
        let len = (self.layout.chunk_voxels as usize).pow(3);
        let i = self.layout.local_index(v);
        let key = self.layout.chunk_of(v);
        let c = self.chunks.get_mut(&key)?;
        let old = c.voxels.set(i, m, len);
        if old != m {
            c.edits.insert(i as u32, m);
            self.versions += 1;
            c.version = self.versions;
            self.edited.insert(key);
        }
        Some(old)
    }

    /// Forgets unflushed deltas of edits up to `durable`.
    pub fn flushed(&mut self, durable: u64) {
        self.unflushed.retain(|_, v| {
            v.retain(|(seq, _)| *seq > durable);
            !v.is_empty()
        });
    }

    /// The chunk's collider shape from its current voxels, placed in the
    /// physics world.
    pub fn rebuild_collider(&mut self, key: ChunkKey, physics: &mut Physics) {
        let Some(c) = self.chunks.get_mut(&key) else { return };
        c.voxels.compact();
        let shape = chunk_shape(&c.voxels, &self.layout);
        let at = physics.to_local(self.layout.chunk_aabb(key).min);
        replace_collider(physics, &mut c.collider, shape, at);
    }
}

fn replace_collider(physics: &mut Physics, slot: &mut Option<ColliderHandle>, shape: Option<SharedShape>, at: Vec3) {
    match (slot.as_ref(), shape) {
        (Some(h), Some(s)) => {
            if let Some(co) = physics.world.colliders.get_mut(*h) {
                co.set_shape(s);
            }
        }
        (Some(h), None) => {
            physics.world.remove_collider(*h);
            *slot = None;
        }
        (None, Some(s)) => {
            let co = ColliderBuilder::new(s)
                .translation(at)
                .friction(0.8)
                .collision_groups(super::physics::terrain_groups())
                .build();
            *slot = Some(physics.world.insert_collider(co, None));
        }
        (None, None) => {}
    }
}

/// Solid-voxel lookups for the character controller; unloaded chunks are solid.
impl SolidQuery for Terrain {
    fn solid(&self, v: VoxelCoord) -> bool {
        self.material(v).is_none_or(Material::is_solid)
    }
}

/// Streams terrain: integrates finished chunks, asks for the chunks a
/// slice of the players (a ninth of them each tick) and the awake props
/// need, and unloads what nobody wanted for a while.
pub fn stream(
    mut terrain: ResMut<Terrain>,
    mut physics: ResMut<Physics>,
    players: Query<&Body, With<Avatar>>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut slice: Local<u64>,
) {
    let tick = tick.tick;
    let terrain = &mut *terrain;
    let budget = terrain.settings.integrate_per_tick;
    for ready in terrain.take_ready(budget) {
        terrain.in_flight.remove(&ready.key);
        metrics.0.chunk_generate.observe(ready.took.as_secs_f64());
        let (mut voxels, mut shape, mut deltas) = match ready.result {
            Ok(v) => v,
            Err(e) => {
                // Asked again by whoever still wants it.
                metrics.0.chunk_failures.inc();
                warn!(chunk = ?ready.key, error = %e, "chunk could not be loaded");
                continue;
            }
        };
        if let Some(mine) = terrain.unflushed.get(&ready.key) {
            shared::edit::apply_deltas(&mut voxels, &terrain.layout, mine.iter().map(|(_, d)| d));
            shape = chunk_shape(&voxels, &terrain.layout);
            deltas.extend(mine.iter().map(|(_, d)| *d));
        }
        let mut collider = None;
        let at = physics.to_local(terrain.layout.chunk_aabb(ready.key).min);
        replace_collider(&mut physics, &mut collider, shape, at);
        if !deltas.is_empty() {
            terrain.edited.insert(ready.key);
        }
        terrain.versions += 1;
        let version = terrain.versions;
        terrain.chunks.insert(ready.key, LoadedChunk::new(voxels, collider, tick, &deltas, version));
        thaw(terrain, &mut physics, ready.key);
    }

    // A ninth of the players each tick: every player is seen 10 times a second.
    *slice = (*slice + 1) % 9;
    let radius = terrain.settings.player_radius_m;
    for (i, body) in players.iter().enumerate() {
        if i as u64 % 9 == *slice {
            terrain.want_around(body.pos, radius, tick);
        }
    }
    if *slice == 0 {
        let r = terrain.settings.prop_radius_m;
        let awake: Vec<DVec3> = physics
            .world
            .active_bodies()
            .filter(|(_, b)| b.is_dynamic())
            .map(|(_, b)| physics.origin + b.translation().as_dvec3())
            .collect();
        for p in awake {
            terrain.want_around(p, r, tick);
        }
    }

    // Once a second, list the stale chunks; unload a few per tick, so that
    // neither this stage nor the physics step (its broad phase) takes a
    // second's worth of removals in one tick.
    let keep = terrain.settings.keep_ticks;
    if tick.is_multiple_of(90) && terrain.to_unload.is_empty() {
        let mut stale: Vec<ChunkKey> = terrain
            .chunks
            .iter()
            .filter(|(k, c)| tick.saturating_sub(c.wanted_at) > keep && !terrain.unflushed.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        stale.sort();
        terrain.to_unload.extend(stale);
    }
    for _ in 0..UNLOADS_PER_TICK {
        let Some(k) = terrain.to_unload.pop_front() else { break };
        let still_stale = terrain
            .chunks
            .get(&k)
            .is_some_and(|c| tick.saturating_sub(c.wanted_at) > keep && !terrain.unflushed.contains_key(&k));
        if !still_stale {
            continue;
        }
        {
            let Some(sleepers) = props_on(terrain, &physics, k) else { continue };
            for b in &sleepers {
                if let Some(rb) = physics.world.bodies.get_mut(*b) {
                    rb.set_body_type(RigidBodyType::Fixed, false);
                }
            }
            if !sleepers.is_empty() {
                terrain.frozen.entry(k).or_default().extend(sleepers);
            }
            terrain.edited.remove(&k);
            if let Some(c) = terrain.chunks.remove(&k)
                && let Some(h) = c.collider
            {
                physics.world.remove_collider(h);
            }
        }
    }
    metrics.0.terrain_chunks_loaded.set(terrain.chunks.len() as i64);
}

/// The props resting in or on chunk `key`; `None` if one of them is awake
/// (then the chunk stays: that prop wants it).
fn props_on(terrain: &Terrain, physics: &Physics, key: ChunkKey) -> Option<Vec<RigidBodyHandle>> {
    let aabb = terrain.layout.chunk_aabb(key);
    let (lo, hi) = (physics.to_local(aabb.min) - Vec3::splat(0.5), physics.to_local(aabb.max) + Vec3::splat(0.5));
    let mut out = Vec::new();
    for (_, co) in physics
        .world
        .query_pipeline_with_filter(QueryFilter::only_dynamic())
        .intersect_aabb_conservative(rapier3d::geometry::Aabb::new(lo, hi))
    {
        let Some(b) = co.parent() else { continue };
        let rb = physics.world.bodies.get(b)?;
        if !rb.is_sleeping() {
            return None;
        }
        if !out.contains(&b) {
            out.push(b);
        }
    }
    Some(out)
}

/// Thaws the props frozen when `key` unloaded, if all the terrain around
/// them is back; the others wait for the next missing chunk.
fn thaw(terrain: &mut Terrain, physics: &mut Physics, key: ChunkKey) {
    let Some(list) = terrain.frozen.remove(&key) else { return };
    for b in list {
        let Some(rb) = physics.world.bodies.get(b) else { continue };
        let p = physics.origin + rb.translation().as_dvec3();
        let lo = terrain.layout.chunk_at(p - DVec3::splat(1.0));
        let hi = terrain.layout.chunk_at(p + DVec3::splat(1.0));
        let missing = (lo.z..=hi.z)
            .flat_map(|z| (lo.y..=hi.y).flat_map(move |y| (lo.x..=hi.x).map(move |x| ChunkKey { x, y, z })))
            .find(|k| !terrain.is_loaded(*k));
        match missing {
            Some(k) => terrain.frozen.entry(k).or_default().push(b),
            None => {
                if let Some(rb) = physics.world.bodies.get_mut(b) {
                    rb.set_body_type(RigidBodyType::Dynamic, false);
                    rb.sleep();
                }
            }
        }
    }
}

impl Terrain {
    /// What is loaded of `key`, with a digest of its voxels.
    pub fn inspect(&self, key: ChunkKey) -> super::messages::ChunkInfo {
        let Some(c) = self.chunks.get(&key) else {
            return super::messages::ChunkInfo { loaded: false, digest: None, solid: 0 };
        };
        let n = (self.layout.chunk_voxels as usize).pow(3);
        let solid = (0..n).filter(|i| c.voxels.get(*i).is_solid()).count() as u32;
        super::messages::ChunkInfo { loaded: true, digest: Some(voxel_digest(&c.voxels, &self.layout)), solid }
    }
}

/// The digest [`Terrain::inspect`] gives for `voxels` (tests compare them).
pub fn voxel_digest(voxels: &ChunkVoxels, layout: &ChunkLayout) -> String {
    use sha2::Digest;
    let n = (layout.chunk_voxels as usize).pow(3);
    let bytes: Vec<u8> = (0..n).map(|i| voxels.get(i) as u8).collect();
    hex::encode(sha2::Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_boxes_cover_exactly_the_solid_voxels() {
        let layout = ChunkLayout { voxel_m: 1.0, chunk_voxels: 16 };
        let generator = TerrainGen::new(5, layout);
        let mut checked = 0;
        for y in 2..6 {
            let key = ChunkKey { x: 3, y, z: 1 };
            let ready = build_chunk(&generator, &crate::store::memory_world_store(&layout), key);
            let (voxels, shape, _) = ready.result.expect("memory store never fails");
            let Some(shape) = shape else {
                assert!(voxels.is_uniform(Material::Air));
                continue;
            };
            let compound = shape.as_compound().expect("a compound");
            // Every voxel centre is inside a box exactly when the voxel is solid.
            for i in 0..16 * 16 * 16 {
                let v = layout.voxel_of(key, i);
                let local = (layout.voxel_center(v) - layout.chunk_aabb(key).min).as_vec3();
                let inside = compound.shapes().iter().any(|(pose, s)| {
                    let c = s.as_cuboid().expect("boxes only");
                    let d = (local - pose.translation).abs();
                    d.x < c.half_extents.x && d.y < c.half_extents.y && d.z < c.half_extents.z
                });
                assert_eq!(inside, voxels.get(i).is_solid(), "voxel {v:?}");
                checked += 1;
            }
        }
        assert!(checked > 0, "no surface chunk in the sample");
    }
}
