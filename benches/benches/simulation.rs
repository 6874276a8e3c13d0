//! The simulation's hot paths: one whole tick at several loads, the
//! replication stage alone, terrain chunk generation, and applying an edit.

use std::hint::black_box;

use benches::{Scenario, ScenarioConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use glam::DVec3;
use shared::chunk::{ChunkKey, ChunkLayout};
use shared::edit::EditOp;
use shared::terrain::TerrainGen;

fn ticks(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick");
    g.sample_size(30);
    for (players, bodies) in [(50, 1000), (250, 1000), (1000, 1000), (1000, 5000)] {
        let mut s = Scenario::new(&ScenarioConfig { players, bodies, chunk_workers: 1, ..Default::default() });
        g.bench_function(format!("{players} players, {bodies} bodies"), |b| b.iter(|| s.tick()));
    }
    g.finish();
}

/// The replication stage alone (snapshots for every player, ghost sync out,
/// releases, chunk edits), timed inside whole ticks: five bodies a player,
/// the groups as dense at every size.
fn replication(c: &mut Criterion) {
    let stage = benches::STAGES.iter().position(|s| *s == "replication").expect("a replication stage");
    let mut g = c.benchmark_group("replication");
    g.sample_size(20);
    for players in [250, 1000] {
        let cfg = ScenarioConfig {
            players,
            bodies: 5 * players,
            chunk_workers: 1,
            spread_m: benches::spread_for(players, ScenarioConfig::default().group),
            ..Default::default()
        };
        let mut s = Scenario::new(&cfg);
        g.bench_function(format!("{players} players"), |b| {
            b.iter_custom(|n| {
                s.take_stage_times();
                let mut spent = 0.0;
                for _ in 0..n {
                    s.tick();
                    spent += s.take_stage_times()[stage];
                }
                std::time::Duration::from_secs_f64(spent)
            })
        });
    }
    g.finish();
}

fn terrain(c: &mut Criterion) {
    let g = TerrainGen::new(1, ChunkLayout::default());
    let surface = ChunkKey { x: 10, y: 2, z: 10 };
    c.bench_function("chunk/generate surface 32³", |b| b.iter(|| g.generate(black_box(surface))));
    let store = game_server::store::memory_world_store(&g.layout);
    c.bench_function("chunk/generate + collider 32³", |b| {
        b.iter(|| game_server::sim::terrain::build_chunk(&g, &store, black_box(surface)))
    });
}

fn edits(c: &mut Criterion) {
    let g = TerrainGen::new(1, ChunkLayout::default());
    let key = ChunkKey { x: 10, y: 2, z: 10 };
    let layout = g.layout;
    let base = g.generate(key);
    let centre = layout.chunk_aabb(key).min + DVec3::splat(16.0);
    let op = EditOp::Dig { center: centre, radius: 2.0 };
    c.bench_function("edit/dig r=2 m: voxels and deltas", |b| {
        b.iter(|| {
            let mut v = base.clone();
            let mut n = 0;
            for vx in op.voxels(&layout) {
                let i = layout.local_index(vx);
                if let Some(m) = op.result_for(v.get(i)) {
                    v.set(i, m, 32 * 32 * 32);
                    n += 1;
                }
            }
            black_box(n)
        })
    });
    c.bench_function("edit/collider rebuild of one chunk", |b| {
        b.iter(|| game_server::sim::terrain::chunk_shape(black_box(&base), &layout))
    });
}

criterion_group!(benches, ticks, replication, terrain, edits);
criterion_main!(benches);
