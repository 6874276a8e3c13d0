//! Hot geometry of the mesh: which leaf holds a point, which neighbours see it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use glam::{DVec3, IVec3};
use shared::region::{DEFAULT_OVERLAP_M, RegionKey, RegionTree};

fn tree() -> RegionTree {
    // 8×2×8 roots with a crowded corner split down to 500 m.
    let mut t = RegionTree::grid(IVec3::new(-4, 0, -4), 8, 2, 8);
    let kids = t.split(RegionKey::root(0, 0, 0)).expect("root is a leaf");
    for k in kids {
        t.split(k).expect("child is a leaf");
    }
    t
}

fn bench(c: &mut Criterion) {
    let t = tree();
    let points: Vec<DVec3> = (0..1024)
        .map(|i| {
            let f = f64::from(i);
            DVec3::new((f * 37.3) % 4000.0 - 2000.0, (f * 11.7) % 3000.0, (f * 53.9) % 4000.0 - 2000.0)
        })
        .collect();
    c.bench_function("leaf_at/1024 points", |b| {
        b.iter(|| points.iter().filter_map(|p| t.leaf_at(black_box(*p))).count())
    });
    c.bench_function("overlapping_leaves/1024 points", |b| {
        b.iter(|| points.iter().map(|p| t.overlapping_leaves(black_box(*p), DEFAULT_OVERLAP_M).len()).sum::<usize>())
    });
    let leaf = RegionKey::new(2, 0, 0, 0);
    c.bench_function("neighbours/500 m leaf in a split corner", |b| {
        b.iter(|| t.neighbours(black_box(&leaf)).map(|n| n.len()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
