//! The survival world on a headless server ticked with a fixed DT: terrain
//! under the feet, props in the hands, edits in the ground, and the same
//! world again when the same inputs are replayed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use glam::{DVec3, Quat};
use shared::EntityId;
use shared::chunk::{ChunkKey, ChunkLayout, VoxelCoord};
use shared::edit::{EditOp, rebuild};
use shared::terrain::{ChunkVoxels, Material, TerrainGen};
use shared::wire::{EditOutcome, InputFrame, JoinRole, Pose, ServerControl, buttons};

use super::core::*;
use super::messages::*;
use super::physics::Prop;
use super::terrain::Terrain;
use super::tests::{GROUND, Harness, controls, prop_pos, spawn_box, world_parts};

const SEED: u64 = 20_261_122;

fn frame(seq: u32) -> InputFrame {
    InputFrame {
        seq,
        head: Pose { pos: [0.0, 1.7, 0.0], rot: [0.0, 0.0, 0.0, 1.0] },
        left: Pose { pos: [-0.3, 1.2, -0.3], rot: [0.0, 0.0, 0.0, 1.0] },
        right: Pose { pos: [0.3, 1.2, -0.3], rot: [0.0, 0.0, 0.0, 1.0] },
        ..Default::default()
    }
}

fn metric(h: &Harness, f: impl Fn(&crate::metrics::Metrics) -> u64) -> u64 {
    f(&h.world.resource::<SimMetrics>().0)
}

/// Voxels of the generated world, chunk by chunk, for path finding.
struct Voxels {
    generator: TerrainGen,
    chunks: HashMap<ChunkKey, ChunkVoxels>,
}

impl Voxels {
    fn solid(&mut self, v: VoxelCoord) -> bool {
        let l = self.generator.layout;
        let k = l.chunk_of(v);
        let g = &self.generator;
        self.chunks.entry(k).or_insert_with(|| g.generate(k)).get(l.local_index(v)).is_solid()
    }

    /// Feet at `v`: solid floor, three voxels of air.
    fn standable(&mut self, v: VoxelCoord) -> bool {
        self.solid(VoxelCoord { y: v.y - 1, ..v }) && (0..3).all(|d| !self.solid(VoxelCoord { y: v.y + d, ..v }))
    }

    /// Rock within 8 voxels above the head: under a roof.
    fn covered(&mut self, v: VoxelCoord) -> bool {
        (3..12).any(|d| self.solid(VoxelCoord { y: v.y + d, ..v }))
    }
}

/// A walkable path from open sky into a cave: found by searching outward
/// from covered standing cells for the farthest open-sky cell.
fn path_into_a_cave(generator: TerrainGen, around: DVec3) -> Vec<VoxelCoord> {
    let mut w = Voxels { generator, chunks: HashMap::new() };
    let l = w.generator.layout;
    let c = l.voxel_at(around);
    let mut best: Option<Vec<VoxelCoord>> = None;
    // Candidate cave cells on a coarse grid around `around`.
    'search: for dz in (-96..=96).step_by(8) {
        for dx in (-96..=96).step_by(8) {
            let (x, z) = (c.x + dx, c.z + dz);
            for y in (16..110).rev() {
                let v = VoxelCoord { x, y, z };
                if !w.standable(v) || !w.covered(v) {
                    continue;
                }
                // Breadth-first search outward, 4-connected, steps of one voxel;
                // each cell remembers the lowest and highest floor on its way.
                let mut parent: HashMap<VoxelCoord, VoxelCoord> = HashMap::from([(v, v)]);
                let mut span: HashMap<VoxelCoord, (i32, i32)> = HashMap::from([(v, (v.y, v.y))]);
                let mut queue = VecDeque::from([(v, 0u32)]);
                let mut far_sky: Option<(VoxelCoord, u32)> = None;
                let mut best_span = 0;
                while let Some((cur, d)) = queue.pop_front() {
                    if d > 250 || parent.len() > 40_000 {
                        break;
                    }
                    let (lo, hi) = span[&cur];
                    if d >= 25
                        && hi - lo > best_span
                        && !w.covered(cur)
                        && (12..40).all(|k| !w.solid(VoxelCoord { y: cur.y + k, ..cur }))
                    {
                        best_span = hi - lo;
                        far_sky = Some((cur, d));
                    }
                    for (ex, ez) in [(1, 0), (-1, 0), (0, 1), (0, -1)] {
                        for ey in [0, 1, -1] {
                            let n = VoxelCoord { x: cur.x + ex, y: cur.y + ey, z: cur.z + ez };
                            if parent.contains_key(&n) || !w.standable(n) {
                                continue;
                            }
                            // Both cells standable is head room enough: a step up
                            // lifts the body in the lower column's air, a step down
                            // walks at the higher floor over the lower cell's air.
                            {
                                parent.insert(n, cur);
                                span.insert(n, (lo.min(n.y), hi.max(n.y)));
                                queue.push_back((n, d + 1));
                                break;
                            }
                        }
                    }
                }
                if let Some((sky, d)) = far_sky
                    && d >= 25
                {
                    let mut path = vec![sky];
                    while let Some(p) = parent.get(path.last().expect("non-empty")).copied() {
                        if p == *path.last().expect("non-empty") {
                            break;
                        }
                        path.push(p);
                    }
                    let (lo, hi) = path.iter().fold((i32::MAX, i32::MIN), |(a, b), p| (a.min(p.y), b.max(p.y)));
                    if hi - lo >= 3 {
                        best = Some(path);
                        break 'search;
                    }
                }
            }
        }
    }
    best.expect("a cave reachable on foot near the search point")
}

#[test]
fn a_player_walks_over_hills_into_a_cave_without_falling_through() {
    let layout = ChunkLayout::default();
    let path = path_into_a_cave(TerrainGen::new(SEED, layout), DVec3::new(1000.0, 0.0, 1000.0));
    let mut h = Harness::with_world(1, world_parts(TerrainGen::new(SEED, layout)));
    let start = layout.voxel_center(path[0]);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(start.x, 0.0, start.z));
    h.settle();
    let stuck_at_start = metric(&h, |m| m.bodies_stuck.get());
    let (lowest, _) = path.iter().fold((i32::MAX, 0), |(a, b), p| (a.min(p.y), b));
    let mut seq = 0;
    let mut next = 1;
    let mut covered_reached = false;
    for _ in 0..6000 {
        let (body, _) = h.avatar().expect("avatar");
        // Never inside rock, never below the path's floor.
        let terrain = h.world.resource::<Terrain>();
        let feet = layout.voxel_at(body.pos + DVec3::new(0.0, 0.05, 0.0));
        assert_eq!(terrain.material(feet), Some(Material::Air), "feet in rock at {}", body.pos);
        assert!(body.pos.y > f64::from(lowest) - 0.5, "fell through the terrain at {}", body.pos);
        let target = layout.voxel_center(path[next]);
        let d = DVec3::new(target.x - body.pos.x, 0.0, target.z - body.pos.z);
        if d.length() < 0.2 {
            if next + 1 == path.len() {
                covered_reached = true;
                break;
            }
            next += 1;
            continue;
        }
        let dir = d.normalize() * (d.length() * 4.0).min(1.0);
        seq += 1;
        let mut f = frame(seq);
        f.locomotion = [dir.x as f32, -dir.z as f32];
        h.send(SimIn::Input { conn: 1, frame: f });
        h.step();
        let _ = controls(&mut rx);
    }
    assert!(covered_reached, "stopped at waypoint {next} of {}: {:?}", path.len(), h.avatar().map(|a| a.0.pos));
    let (body, _) = h.avatar().expect("avatar");
    let t = h.world.resource::<Terrain>();
    let v = layout.voxel_at(body.pos + DVec3::new(0.0, 0.05, 0.0));
    assert!(
        (3..12).any(|d| t.material(VoxelCoord { y: v.y + d, ..v }).is_some_and(Material::is_solid)),
        "under a roof"
    );
    assert_eq!(metric(&h, |m| m.bodies_stuck.get()), stuck_at_start, "never stuck in rock on the way");
    assert!(path.len() >= 25);
}

/// Runs a fixed script on a fresh world: a player walking, turning,
/// gripping and digging, props tumbling. Returns everything that makes the
/// world's state, to compare bit for bit.
/// Every body (id, position bits, rotation bits) and every loaded chunk.
type WorldState = (Vec<(EntityId, [u64; 3], [u32; 4])>, Vec<(ChunkKey, ChunkVoxels)>);

fn scripted_world(ticks: u32) -> WorldState {
    let mut h = Harness::with_world(1, world_parts(TerrainGen::new(SEED, ChunkLayout::default())));
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1200.0, 0.0, 800.0));
    h.settle();
    let (body, _) = h.avatar().expect("avatar");
    for i in 0..6 {
        spawn_box(&mut h, body.pos + DVec3::new(f64::from(i) * 0.4 - 1.0, 2.0 + f64::from(i) * 0.5, -1.5));
    }
    for t in 0..ticks {
        let mut f = frame(t + 1);
        f.locomotion = [((t as f32) * 0.1).sin(), 0.6];
        f.turn = 0.5;
        if t % 4 < 2 {
            f.buttons = buttons::GRIP_RIGHT;
        }
        h.send(SimIn::Input { conn: 1, frame: f });
        if t == 3 {
            let (b, _) = h.avatar().expect("avatar");
            h.send(SimIn::Edit {
                conn: 1,
                id: 1,
                op: EditOp::Dig { center: b.pos + DVec3::new(0.0, -0.5, -1.5), radius: 1.5 },
            });
        }
        h.step();
    }
    let mut bodies: Vec<(EntityId, [u64; 3], [u32; 4])> = Vec::new();
    let mut q = h.world.query::<(&NetId, &Body, Option<&Prop>)>();
    for (n, b, p) in q.iter(&h.world) {
        let rot = p.map_or(Quat::from_rotation_y(b.yaw), |p| p.rot);
        bodies.push((n.0, b.pos.to_array().map(f64::to_bits), rot.to_array().map(f32::to_bits)));
    }
    bodies.sort_by_key(|b| b.0);
    let t = h.world.resource::<Terrain>();
    let mut chunks: Vec<(ChunkKey, ChunkVoxels)> = t.chunks.iter().map(|(k, c)| (*k, c.voxels.clone())).collect();
    chunks.sort_by_key(|c| c.0);
    (bodies, chunks)
}

#[test]
fn the_same_inputs_replayed_give_the_same_world_bit_for_bit() {
    let a = scripted_world(10);
    let b = scripted_world(10);
    assert_eq!(a.0.len(), 7, "one avatar and six props");
    assert_eq!(a.0, b.0, "bodies differ between two runs of the same script");
    assert!(a.1 == b.1, "terrain differs between two runs of the same script");
    // And the script did something: a different script gives another world.
    let c = scripted_world(11);
    assert_ne!(a.0, c.0);
}

#[test]
fn a_chunk_with_edits_rebuilt_from_seed_and_deltas_is_identical() {
    let generator = TerrainGen::new(SEED, ChunkLayout::default());
    let parts = world_parts(generator.clone());
    let store = parts.store.clone();
    let mut h = Harness::with_world(1, parts);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(700.0, 0.0, 1300.0));
    h.settle();
    let (body, _) = h.avatar().expect("avatar");
    let ops = [
        EditOp::Dig { center: body.pos + DVec3::new(1.0, -1.0, -2.0), radius: 2.5 },
        EditOp::Place { center: body.pos + DVec3::new(-2.0, 1.0, -1.0), radius: 1.2, material: Material::Brick },
        EditOp::Dig { center: body.pos + DVec3::new(-2.0, 1.0, -1.0), radius: 0.6 },
        EditOp::Place { center: body.pos + DVec3::new(2.0, 0.5, 2.0), radius: 1.0, material: Material::Wood },
    ];
    for (i, op) in ops.iter().enumerate() {
        h.send(SimIn::Edit { conn: 1, id: i as u32, op: *op });
    }
    let mut done = 0;
    for _ in 0..300 {
        h.step();
        done += controls(&mut rx)
            .iter()
            .filter(|c| matches!(c, ServerControl::EditResult { outcome: EditOutcome::Done { .. }, .. }))
            .count();
        if done == ops.len() {
            break;
        }
    }
    assert_eq!(done, ops.len(), "every edit applied and acknowledged durable");
    let t = h.world.resource::<Terrain>();
    let mut edited = 0;
    for (key, chunk) in &t.chunks {
        let deltas = store.chunk_deltas(*key).expect("memory store answers");
        if deltas.is_empty() {
            continue;
        }
        edited += 1;
        let mut live = chunk.voxels.clone();
        live.compact();
        assert_eq!(rebuild(&generator, *key, &deltas), live, "chunk {key:?}");
        assert_ne!(generator.generate(*key), live, "chunk {key:?} was edited");
    }
    assert!(edited >= 1);
}

#[test]
fn edits_during_a_store_outage_are_held_and_acknowledged_once_written() {
    let generator = TerrainGen::new(SEED, ChunkLayout::default());
    let memory = Arc::new(persistence::memory::MemoryStore::new(32 * 32 * 32));
    let mut parts = world_parts(generator.clone());
    parts.store = crate::store::background(memory.clone());
    parts.writer = crate::store::spawn_writer(parts.store.clone(), 5).expect("writer starts");
    let (writer, stored) = (parts.writer.clone(), parts.store.clone());
    let mut h = Harness::with_world(1, parts);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(700.0, 0.0, 1300.0));
    h.settle();
    let (body, _) = h.avatar().expect("avatar");
    memory.set_unavailable(true);
    let ops = [
        EditOp::Dig { center: body.pos + DVec3::new(1.0, -1.0, -2.0), radius: 1.5 },
        EditOp::Place { center: body.pos + DVec3::new(-2.0, 1.0, -1.0), radius: 1.0, material: Material::Brick },
    ];
    for (i, op) in ops.iter().enumerate() {
        h.send(SimIn::Edit { conn: 1, id: i as u32, op: *op });
    }
    let outcomes = |rx: &mut _| {
        controls(rx)
            .into_iter()
            .filter_map(|c| match c {
                ServerControl::EditResult { id, outcome } => Some((id, outcome)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Wall time, not ticks: the writer retries on its own clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        h.step();
        assert_eq!(outcomes(&mut rx), vec![], "nothing acknowledged while the store is down");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(metric(&h, |m| m.edits_unacknowledged.get() as u64), 2, "both edits applied and held");
    assert!(writer.stats.append_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // The edits are in the world already, for everyone on this server.
    let changed_before = metric(&h, |m| m.voxels_changed.get());
    assert!(changed_before > 0);

    memory.set_unavailable(false);
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while acked.len() < 2 && std::time::Instant::now() < deadline {
        h.step();
        acked.extend(outcomes(&mut rx));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    acked.sort_by_key(|a| a.0);
    assert!(matches!(acked.as_slice(), [(0, EditOutcome::Done { .. }), (1, EditOutcome::Done { .. })]), "{acked:?}");
    assert_eq!(metric(&h, |m| m.edits_unacknowledged.get() as u64), 0);
    // And what was acknowledged is what the store holds.
    let t = h.world.resource::<Terrain>();
    for (key, chunk) in &t.chunks {
        let deltas = stored.chunk_deltas(*key).expect("memory store answers");
        let mut live = chunk.voxels.clone();
        live.compact();
        assert_eq!(rebuild(&generator, *key, &deltas), live, "chunk {key:?}");
    }
}

#[test]
fn a_held_prop_follows_the_hand_and_flies_when_thrown() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5));
    h.settle();
    let (body, _) = h.avatar().expect("avatar");
    // A small box on the ground in front of the player, where the right hand reaches down.
    let id = spawn_box(&mut h, DVec3::new(body.pos.x, GROUND + 0.3, body.pos.z - 0.6));
    let mut seq = 0;
    let mut send = |h: &mut Harness, hand: [f32; 3], grip: bool| {
        seq += 1;
        let mut f = frame(seq);
        f.right.pos = hand;
        f.buttons = if grip { buttons::GRIP_RIGHT } else { 0 };
        h.send(SimIn::Input { conn: 1, frame: f });
        h.step();
    };
    // Reach down to it and wait for it to settle and the hand to appear.
    for _ in 0..120 {
        send(&mut h, [0.0, 0.6, -0.6], false);
    }
    send(&mut h, [0.0, 0.6, -0.6], true);
    assert_eq!(metric(&h, |m| m.grabs.get()), 1, "grabbed");
    // Lift it.
    for i in 0..40 {
        send(&mut h, [0.0, 0.6 + 0.03 * i as f32, -0.6], true);
    }
    let held = prop_pos(&mut h, id);
    assert!(held.y > GROUND + 1.2, "lifted with the hand: {held}");
    // Swing forward fast (0.08 m a tick = 7 m/s) and let go.
    for i in 0..8 {
        send(&mut h, [0.0, 1.5, -0.6 - 0.08 * i as f32], true);
    }
    let released_at = prop_pos(&mut h, id);
    send(&mut h, [0.0, 1.5, -1.25], false);
    for _ in 0..30 {
        send(&mut h, [0.3, 1.2, -0.3], false);
    }
    let landed = prop_pos(&mut h, id);
    assert!(released_at.z - landed.z > 1.5, "thrown forward (-z): from {released_at} to {landed}");
    assert_eq!(metric(&h, |m| m.throws.get()), 1);
}

#[test]
fn bad_inputs_and_edits_are_refused_and_counted() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1997.5, 70.0, 1000.5));
    h.settle();
    let (before, a) = h.avatar().expect("avatar");
    let mut seq = a.last_applied;
    let mut next = || {
        seq += 1;
        frame(seq)
    };
    // A head 10 m from the body, a hand 3 m from the head, a head that jumps
    // 2 m in one frame, a rotation that is not a unit quaternion.
    let mut far = next();
    far.head.pos = [10.0, 1.7, 0.0];
    let mut arm = next();
    arm.left.pos = [3.0, 1.2, 0.0];
    let ok = next();
    let mut jump = next();
    jump.head.pos = [2.0, 1.7, 0.0];
    jump.left.pos = [1.7, 1.2, -0.3];
    jump.right.pos = [2.3, 1.2, -0.3];
    jump.locomotion = [1.0, 0.0];
    let mut rot = next();
    rot.right.rot = [0.0, 0.0, 0.0, 5.0];
    rot.locomotion = [1.0, 0.0];
    for f in [far, arm, ok, jump, rot] {
        h.send(SimIn::Input { conn: 1, frame: f });
    }
    h.step();
    let m = |h: &Harness, r: &str| metric(h, |m| m.inputs_rejected.with_label_values(&[r]).get());
    assert_eq!((m(&h, "pose_far"), m(&h, "teleport"), m(&h, "bad_rotation")), (2, 1, 1));
    let (after, a) = h.avatar().expect("avatar");
    assert_eq!(a.last_applied, seq, "refused frames are consumed, not replayed");
    assert!((after.pos.x - before.pos.x).abs() < 1e-9, "no refused frame moved the body");

    // Edits: out of reach, in the neighbour's region, malformed, and a flood.
    let p = after.pos;
    let edits = [
        EditOp::Dig { center: p + DVec3::new(0.0, 0.0, -30.0), radius: 1.0 },
        EditOp::Dig { center: DVec3::new(2001.5, p.y, p.z), radius: 1.0 },
        EditOp::Dig { center: DVec3::new(f64::NAN, p.y, p.z), radius: 1.0 },
        EditOp::Place { center: p + DVec3::new(0.0, 0.5, -2.0), radius: 9.0, material: Material::Wood },
    ];
    for (i, op) in edits.into_iter().enumerate() {
        h.send(SimIn::Edit { conn: 1, id: i as u32, op });
    }
    for i in 0..40 {
        h.send(SimIn::Edit {
            conn: 1,
            id: 100 + i,
            op: EditOp::Dig { center: p + DVec3::new(-2.0, -1.0, 0.0), radius: 0.5 },
        });
    }
    h.step();
    let r = |h: &Harness, r: &str| metric(h, |m| m.edits_rejected.with_label_values(&[r]).get());
    assert_eq!(r(&h, "out_of_reach"), 1);
    assert_eq!(r(&h, "not_owner"), 1);
    assert_eq!(r(&h, "bad_shape"), 2);
    assert_eq!(r(&h, "rate_limited"), 40 - 16, "a burst of 16, then refused");
    let rejected = controls(&mut rx)
        .into_iter()
        .filter(|c| matches!(c, ServerControl::EditResult { outcome: EditOutcome::Rejected { .. }, .. }))
        .count();
    assert_eq!(rejected, 4 + 24, "every refusal is answered");
}

#[test]
fn an_unsupported_structure_breaks_into_falling_props() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5));
    h.settle();
    let (b, _) = h.avatar().expect("avatar");
    // A wooden pillar on a soil pedestal, then the pedestal dug away.
    let base = DVec3::new(b.pos.x + 3.0, GROUND + 0.5, b.pos.z);
    let ops = [
        EditOp::Place { center: base + DVec3::new(0.0, 1.0, 0.0), radius: 0.5, material: Material::Wood },
        EditOp::Place { center: base + DVec3::new(0.0, 2.0, 0.0), radius: 0.5, material: Material::Wood },
        EditOp::Place { center: base, radius: 0.5, material: Material::Soil },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        h.send(SimIn::Edit { conn: 1, id: i as u32, op });
    }
    h.step();
    let props_before = h.world.query::<&Prop>().iter(&h.world).count();
    h.send(SimIn::Edit { conn: 1, id: 9, op: EditOp::Dig { center: base, radius: 0.5 } });
    h.step();
    let props_after = h.world.query::<&Prop>().iter(&h.world).count();
    assert_eq!(props_after - props_before, 2, "two wooden voxels broke off");
    assert_eq!(metric(&h, |m| m.structures_broken.get()), 1);
    let t = h.world.resource::<Terrain>();
    let l = t.layout;
    assert_eq!(t.material(l.voxel_at(base + DVec3::new(0.0, 1.0, 0.0))), Some(Material::Air));
}

/// Streamed chunks: key, version, the voxels players changed.
type Streamed = Vec<(ChunkKey, u64, Vec<(u32, Material)>)>;

fn chunk_edits_of(controls: &[ServerControl]) -> Streamed {
    controls
        .iter()
        .filter_map(|c| match c {
            ServerControl::ChunkEdits { chunk, version, replace: true, voxels } => {
                Some((*chunk, *version, voxels.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn players_are_sent_the_edits_near_them_nearest_first_and_again_when_they_change() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5));
    h.settle();
    let (b, _) = h.avatar().expect("avatar");
    let streamed = |rx: &mut ConnRx| chunk_edits_of(&controls(rx));
    // Nothing was changed: nothing to stream (the client has the seed).
    for _ in 0..20 {
        h.step();
    }
    assert!(streamed(&mut rx).is_empty());
    // Two holes, 4 m and 1.5 m away (different chunks when possible), dug in one tick.
    let far = b.pos + DVec3::new(4.0, -1.0, 0.0);
    let near = b.pos + DVec3::new(-1.5, -1.0, 0.0);
    for (i, c) in [far, near].into_iter().enumerate() {
        h.send(SimIn::Edit { conn: 1, id: i as u32, op: EditOp::Dig { center: c, radius: 0.6 } });
    }
    for _ in 0..20 {
        h.step();
    }
    let got = streamed(&mut rx);
    let layout = h.world.resource::<Terrain>().layout;
    let terrain = h.world.resource::<Terrain>();
    let edited: Vec<ChunkKey> = {
        let mut e: Vec<ChunkKey> = terrain.edited.iter().copied().collect();
        e.sort();
        e
    };
    assert!(!edited.is_empty());
    let mut keys: Vec<ChunkKey> = got.iter().map(|g| g.0).collect();
    keys.sort();
    assert_eq!(keys, edited, "each changed chunk once");
    for (key, version, voxels) in &got {
        let c = &terrain.chunks[key];
        assert_eq!(*version, c.version);
        // Exactly the chunk's changes: air where the holes are.
        assert_eq!(voxels.len(), c.edits.len());
        assert!(voxels.iter().all(|(i, m)| c.voxels.get(*i as usize) == *m && *m == Material::Air));
    }
    // Nearest first.
    let d = |k: &ChunkKey| layout.chunk_aabb(*k).linf_distance(b.pos);
    assert!(got.windows(2).all(|w| d(&w[0].0) <= d(&w[1].0)), "{got:?}");
    // Another hole in the near chunk: that chunk again, with more voxels.
    let key = layout.chunk_of(layout.voxel_at(near));
    let before = got.iter().find(|g| g.0 == key).map(|g| g.2.len()).unwrap_or(0);
    h.send(SimIn::Edit { conn: 1, id: 9, op: EditOp::Dig { center: near + DVec3::new(0.0, -1.0, 0.0), radius: 1.2 } });
    for _ in 0..20 {
        h.step();
    }
    let all = controls(&mut rx);
    let again = chunk_edits_of(&all);
    assert_eq!(again.len(), 1, "only the changed chunk: {all:?}");
    assert_eq!(again[0].0, key);
    assert!(again[0].2.len() > before);
}
