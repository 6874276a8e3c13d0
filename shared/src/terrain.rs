//! Procedural voxel terrain: a seeded density function, materials, and the
//! voxels of one chunk.
//!
//! The world's terrain is a pure function of the world seed: rolling hills
//! from 2D fractal noise, overhangs from 3D noise in a band around the
//! surface, tunnel caves where two 3D noises are both near zero, and bubble
//! caves deep down. Player edits ([`crate::edit`]) are stored as deltas on
//! top; seed + deltas rebuild any chunk exactly.
//!
//! Generation samples the density on a coarse lattice aligned to the global
//! voxel grid (every [`LATTICE_STEP`] voxels) and interpolates trilinearly
//! in between: a chunk costs ~1,000 noise samples instead of ~33,000, and
//! because the lattice is global, neighbouring chunks agree on their shared
//! faces whatever the chunk size.

use glam::DVec3;
use noise::{Fbm, MultiFractal, NoiseFn, Perlin};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkKey, ChunkLayout, VoxelCoord};

/// Voxels between two density samples, per axis.
pub const LATTICE_STEP: i32 = 4;

/// What one voxel is made of. `u8` on the wire and in storage: never
/// renumber a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[repr(u8)]
pub enum Material {
    #[default]
    Air = 0,
    Rock = 1,
    Soil = 2,
    Ore = 3,
    /// Placed by players: structures. Unsupported structure voxels break off.
    Wood = 4,
    Brick = 5,
    Metal = 6,
}

impl Material {
    pub const ALL: [Material; 7] = [
        Material::Air,
        Material::Rock,
        Material::Soil,
        Material::Ore,
        Material::Wood,
        Material::Brick,
        Material::Metal,
    ];

    pub fn from_u8(v: u8) -> Option<Material> {
        Self::ALL.get(usize::from(v)).copied()
    }

    pub fn is_solid(self) -> bool {
        self != Material::Air
    }

    /// Placed by players rather than generated: breaks off when nothing
    /// natural holds it.
    pub fn is_structure(self) -> bool {
        matches!(self, Material::Wood | Material::Brick | Material::Metal)
    }

    /// Density in kg/m³, for the props a broken structure leaves.
    pub fn density_kg_m3(self) -> f32 {
        match self {
            Material::Air => 1.2,
            Material::Soil => 1500.0,
            Material::Rock | Material::Brick => 2000.0,
            Material::Ore => 3500.0,
            Material::Wood => 600.0,
            Material::Metal => 7800.0,
        }
    }
}

/// The voxels of one chunk: one material for all (most chunks: open sky or
/// solid rock), or one byte per voxel, x fastest (see
/// [`ChunkLayout::local_index`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkVoxels {
    Uniform(Material),
    Dense(Box<[Material]>),
}

impl ChunkVoxels {
    pub fn get(&self, index: usize) -> Material {
        match self {
            ChunkVoxels::Uniform(m) => *m,
            ChunkVoxels::Dense(v) => v.get(index).copied().unwrap_or(Material::Air),
        }
    }

    /// Sets one voxel; `len` is the chunk's voxel count. Returns the old material.
    pub fn set(&mut self, index: usize, m: Material, len: usize) -> Material {
        if let ChunkVoxels::Uniform(u) = *self {
            if u == m {
                return m;
            }
            *self = ChunkVoxels::Dense(vec![u; len].into_boxed_slice());
        }
        match self {
            ChunkVoxels::Dense(v) => match v.get_mut(index) {
                Some(slot) => std::mem::replace(slot, m),
                None => Material::Air,
            },
            ChunkVoxels::Uniform(_) => unreachable!("made dense above"),
        }
    }

    /// Collapses a dense chunk whose voxels are all alike.
    pub fn compact(&mut self) {
        if let ChunkVoxels::Dense(v) = self
            && let Some(first) = v.first().copied()
            && v.iter().all(|m| *m == first)
        {
            *self = ChunkVoxels::Uniform(first);
        }
    }

    pub fn is_uniform(&self, m: Material) -> bool {
        matches!(self, ChunkVoxels::Uniform(u) if *u == m)
    }
}

/// The terrain's shape knobs. Defaults are what the world is made of; a
/// change of any of them is a new world.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TerrainParams {
    /// Mean height of the ground, metres.
    pub base_height_m: f64,
    /// Peak deviation of the hills from the base, metres.
    pub hill_amplitude_m: f64,
    /// Typical distance between hills, metres.
    pub hill_wavelength_m: f64,
    /// Strength of the 3D noise that makes overhangs, metres.
    pub overhang_m: f64,
    /// Soil thickness above the rock, metres.
    pub soil_m: f64,
    /// Width of tunnel caves, in noise units (larger: wider and more tunnels).
    pub tunnel_width: f64,
    /// Below this height everything is rock (no caves), metres.
    pub floor_m: f64,
}

impl Default for TerrainParams {
    fn default() -> Self {
        Self {
            base_height_m: 64.0,
            hill_amplitude_m: 36.0,
            hill_wavelength_m: 320.0,
            overhang_m: 9.0,
            soil_m: 3.0,
            tunnel_width: 0.075,
            floor_m: 4.0,
        }
    }
}

/// The seeded terrain function. Cheap to clone the parameters, not the
/// noise tables: share one behind an `Arc` between generator threads.
#[derive(Debug, Clone)]
pub struct TerrainGen {
    pub seed: u64,
    pub layout: ChunkLayout,
    pub params: TerrainParams,
    hills: Fbm<Perlin>,
    overhang: Perlin,
    tunnel_a: Fbm<Perlin>,
    tunnel_b: Fbm<Perlin>,
    bubbles: Perlin,
    ore: Perlin,
}

/// The lattice values of a chunk: density and ore, at every lattice point
/// around it.
struct Lattice {
    k0: [i32; 3],
    n: [usize; 3],
    density: Vec<f64>,
    surface: Vec<f64>,
    ore: Vec<f64>,
}

impl TerrainGen {
    pub fn new(seed: u64, layout: ChunkLayout) -> Self {
        Self::with_params(seed, layout, TerrainParams::default())
    }

    pub fn with_params(seed: u64, layout: ChunkLayout, params: TerrainParams) -> Self {
        // Each noise gets its own 32-bit seed derived from the world seed.
        let sub = |salt: u64| -> u32 {
            let mut x = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 33;
            x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
            x ^= x >> 33;
            x as u32
        };
        Self {
            seed,
            layout,
            params,
            hills: Fbm::<Perlin>::new(sub(1)).set_octaves(4).set_frequency(1.0 / params.hill_wavelength_m),
            overhang: Perlin::new(sub(2)),
            tunnel_a: Fbm::<Perlin>::new(sub(3)).set_octaves(2).set_frequency(1.0 / 96.0),
            tunnel_b: Fbm::<Perlin>::new(sub(4)).set_octaves(2).set_frequency(1.0 / 96.0),
            bubbles: Perlin::new(sub(5)),
            ore: Perlin::new(sub(6)),
        }
    }

    /// Height of the smooth ground (before overhangs and caves) at `x, z`.
    pub fn surface_height(&self, x: f64, z: f64) -> f64 {
        self.params.base_height_m + self.params.hill_amplitude_m * self.hills.get([x, z])
    }

    /// Density at `p` given the smooth ground height there: positive is
    /// solid. Continuous, so the lattice interpolates it well.
    fn density_with_surface(&self, p: DVec3, surface: f64) -> f64 {
        let pr = &self.params;
        let depth = surface - p.y;
        // Overhangs: 3D noise, strongest within 12 m of the surface.
        let band = (1.0 - (depth / 12.0).abs()).max(0.0);
        let mut d = depth + pr.overhang_m * band * self.overhang.get((p / 24.0).to_array());
        if p.y < pr.floor_m {
            return d.max(1.0);
        }
        // Tunnels: where two 3D noises are both near zero, a worm of air.
        let a = self.tunnel_a.get(p.to_array()).abs();
        let b = self.tunnel_b.get((p * DVec3::new(1.0, 1.6, 1.0)).to_array()).abs();
        let worm = (pr.tunnel_width - a.max(b)) / pr.tunnel_width;
        if worm > 0.0 {
            d = d.min(-8.0 * worm);
        }
        // Bubble caves, only well below the surface.
        if depth > 16.0 {
            let bubble = self.bubbles.get((p / 40.0).to_array()) - 0.45;
            if bubble > 0.0 {
                d = d.min(-60.0 * bubble);
            }
        }
        d
    }

    /// Density at `p`: positive is solid.
    pub fn density(&self, p: DVec3) -> f64 {
        self.density_with_surface(p, self.surface_height(p.x, p.z))
    }

    fn lattice(&self, key: ChunkKey) -> Lattice {
        let n = self.layout.chunk_voxels as i32;
        let base = [key.x * n, key.y * n, key.z * n];
        // Lattice points around voxel centres `base + 0.5 ..= base + n - 0.5`.
        let k0 = base.map(|b| b.div_euclid(LATTICE_STEP));
        let k1 = base.map(|b| (b + n - 1).div_euclid(LATTICE_STEP) + 1);
        let dims = [0, 1, 2].map(|i| (k1[i] - k0[i] + 1) as usize);
        let step_m = f64::from(LATTICE_STEP) * self.layout.voxel_m;
        let mut surface = Vec::with_capacity(dims[0] * dims[2]);
        for kz in 0..dims[2] {
            for kx in 0..dims[0] {
                let x = f64::from(k0[0] + kx as i32) * step_m;
                let z = f64::from(k0[2] + kz as i32) * step_m;
                surface.push(self.surface_height(x, z));
            }
        }
        let total = dims[0] * dims[1] * dims[2];
        let mut density = Vec::with_capacity(total);
        let mut ore = Vec::with_capacity(total);
        for kz in 0..dims[2] {
            for ky in 0..dims[1] {
                for kx in 0..dims[0] {
                    let p = DVec3::new(
                        f64::from(k0[0] + kx as i32),
                        f64::from(k0[1] + ky as i32),
                        f64::from(k0[2] + kz as i32),
                    ) * step_m;
                    let s = surface[kz * dims[0] + kx];
                    let d = self.density_with_surface(p, s);
                    density.push(d);
                    // Ore only matters inside rock; skip the noise in the air.
                    ore.push(if d > 0.0 { self.ore.get((p / 14.0).to_array()) } else { -1.0 });
                }
            }
        }
        Lattice { k0, n: dims, density, surface, ore }
    }

    /// The procedural voxels of chunk `key`, before any edit.
    pub fn generate(&self, key: ChunkKey) -> ChunkVoxels {
        let lat = self.lattice(key);
        // Quick exits: a chunk whose whole lattice is far from the surface.
        let all_air = lat.density.iter().all(|d| *d < -1.0);
        if all_air {
            return ChunkVoxels::Uniform(Material::Air);
        }
        let n = self.layout.chunk_voxels as i32;
        let len = (n * n * n) as usize;
        let mut out = vec![Material::Air; len].into_boxed_slice();
        let [nx, ny, _] = lat.n;
        let at = |v: &[f64], x: usize, y: usize, z: usize| v[(z * ny + y) * nx + x];
        let step = f64::from(LATTICE_STEP);
        let soil_m = self.params.soil_m;
        let mut i = 0usize;
        for lz in 0..n {
            let gz = key.z * n + lz;
            let fz = (f64::from(gz) + 0.5) / step - f64::from(lat.k0[2]);
            let (cz, tz) = (fz.floor() as usize, fz.fract());
            for ly in 0..n {
                let gy = key.y * n + ly;
                let fy = (f64::from(gy) + 0.5) / step - f64::from(lat.k0[1]);
                let (cy, ty) = (fy.floor() as usize, fy.fract());
                let y_m = (f64::from(gy) + 0.5) * self.layout.voxel_m;
                for lx in 0..n {
                    let gx = key.x * n + lx;
                    let fx = (f64::from(gx) + 0.5) / step - f64::from(lat.k0[0]);
                    let (cx, tx) = (fx.floor() as usize, fx.fract());
                    let tri = |v: &[f64]| {
                        let c00 = lerp(at(v, cx, cy, cz), at(v, cx + 1, cy, cz), tx);
                        let c10 = lerp(at(v, cx, cy + 1, cz), at(v, cx + 1, cy + 1, cz), tx);
                        let c01 = lerp(at(v, cx, cy, cz + 1), at(v, cx + 1, cy, cz + 1), tx);
                        let c11 = lerp(at(v, cx, cy + 1, cz + 1), at(v, cx + 1, cy + 1, cz + 1), tx);
                        lerp(lerp(c00, c10, ty), lerp(c01, c11, ty), tz)
                    };
                    let d = tri(&lat.density);
                    if d > 0.0 {
                        let s = &lat.surface;
                        let surface = lerp(
                            lerp(s[cz * nx + cx], s[cz * nx + cx + 1], tx),
                            lerp(s[(cz + 1) * nx + cx], s[(cz + 1) * nx + cx + 1], tx),
                            tz,
                        );
                        let depth = surface - y_m;
                        out[i] = if (0.0..soil_m).contains(&depth) {
                            Material::Soil
                        } else if tri(&lat.ore) > 0.42 {
                            Material::Ore
                        } else {
                            Material::Rock
                        };
                    }
                    i += 1;
                }
            }
        }
        let mut v = ChunkVoxels::Dense(out);
        v.compact();
        v
    }

    /// Height of the top of the highest solid voxel at `x, z` as generated
    /// (before edits), metres: where a body dropped from the sky lands.
    /// Evaluates one lattice column, not whole chunks.
    pub fn ground_height(&self, x: f64, z: f64) -> f64 {
        let vm = self.layout.voxel_m;
        let (vx, vz) = ((x / vm).floor() as i32, (z / vm).floor() as i32);
        let step = f64::from(LATTICE_STEP);
        let step_m = step * vm;
        let fx = (f64::from(vx) + 0.5) / step;
        let fz = (f64::from(vz) + 0.5) / step;
        let (kx, kz) = (fx.floor() as i32, fz.floor() as i32);
        let (tx, tz) = (fx - f64::from(kx), fz - f64::from(kz));
        let cols = [(kx, kz), (kx + 1, kz), (kx, kz + 1), (kx + 1, kz + 1)];
        let surf = cols.map(|(cx, cz)| self.surface_height(f64::from(cx) * step_m, f64::from(cz) * step_m));
        let level = |ky: i32| -> [f64; 4] {
            let y = f64::from(ky) * step_m;
            [0, 1, 2, 3].map(|i| {
                let (cx, cz) = cols[i];
                self.density_with_surface(DVec3::new(f64::from(cx) * step_m, y, f64::from(cz) * step_m), surf[i])
            })
        };
        let p = &self.params;
        let top = ((p.base_height_m + p.hill_amplitude_m + p.overhang_m + 8.0) / step_m).ceil() as i32;
        let bottom = (p.floor_m / step_m).floor() as i32 - 1;
        let mut upper = level(top);
        for ky in (bottom..top).rev() {
            let lower = level(ky);
            // The voxels whose centres lie between lattice levels ky and ky+1, top first.
            for j in (0..LATTICE_STEP).rev() {
                let vy = ky * LATTICE_STEP + j;
                let ty = (f64::from(vy) + 0.5) / step - f64::from(ky);
                if !(0.0..1.0).contains(&ty) {
                    continue;
                }
                let d = lerp(
                    lerp(lerp(lower[0], lower[1], tx), lerp(upper[0], upper[1], tx), ty),
                    lerp(lerp(lower[2], lower[3], tx), lerp(upper[2], upper[3], tx), ty),
                    tz,
                );
                if d > 0.0 {
                    return f64::from(vy + 1) * vm;
                }
            }
            upper = lower;
        }
        p.floor_m
    }

    /// The material of one voxel as generated (slow: generates nothing else,
    /// but evaluates the lattice cell around it; for tests and tools).
    pub fn voxel(&self, v: VoxelCoord) -> Material {
        let key = self.layout.chunk_of(v);
        self.generate(key).get(self.layout.local_index(v))
    }
}

fn lerp(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terrain(seed: u64) -> TerrainGen {
        TerrainGen::new(seed, ChunkLayout::default())
    }

    fn key(x: i32, y: i32, z: i32) -> ChunkKey {
        ChunkKey { x, y, z }
    }

    #[test]
    fn same_seed_same_chunk_other_seed_other_chunk() {
        let k = key(3, 2, 5);
        assert_eq!(terrain(7).generate(k), terrain(7).generate(k));
        assert_ne!(terrain(7).generate(k), terrain(8).generate(k));
    }

    #[test]
    fn sky_is_air_and_depths_are_rock() {
        let g = terrain(1);
        assert_eq!(g.generate(key(0, 10, 0)), ChunkVoxels::Uniform(Material::Air));
        // Below the cave floor everything is solid.
        let deep = g.generate(key(0, -2, 0));
        assert!((0..32 * 32 * 32).all(|i| deep.get(i).is_solid()));
    }

    #[test]
    fn surface_chunks_hold_soil_rock_and_air() {
        let g = terrain(42);
        let mut seen = std::collections::BTreeSet::new();
        for x in 0..6 {
            for y in 1..4 {
                let c = g.generate(key(x, y, 0));
                for i in (0..32 * 32 * 32).step_by(7) {
                    seen.insert(c.get(i));
                }
            }
        }
        for m in [Material::Air, Material::Soil, Material::Rock, Material::Ore] {
            assert!(seen.contains(&m), "no {m:?} in 18 chunks around the surface: {seen:?}");
        }
    }

    #[test]
    fn chunking_does_not_change_the_world() {
        // The same voxels generated as 32³ chunks and as 16³ chunks agree.
        let big = TerrainGen::new(9, ChunkLayout { voxel_m: 1.0, chunk_voxels: 32 });
        let small = TerrainGen::new(9, ChunkLayout { voxel_m: 1.0, chunk_voxels: 16 });
        let c = big.generate(key(1, 2, 1));
        for (dx, dy, dz) in [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)] {
            let s = small.generate(key(2 + dx, 4 + dy, 2 + dz));
            for i in 0..16 * 16 * 16 {
                let v = small.layout.voxel_of(key(2 + dx, 4 + dy, 2 + dz), i);
                assert_eq!(s.get(i), c.get(big.layout.local_index(v)), "voxel {v:?}");
            }
        }
    }

    #[test]
    fn there_are_caves_and_overhangs() {
        // Somewhere in a 256 m square there is air with rock above it
        // below the smooth surface: a cave or an overhang.
        let g = terrain(3);
        let mut covered_air = 0;
        for cx in 0..8 {
            for cz in 0..8 {
                for cy in 0..4 {
                    let k = key(cx, cy, cz);
                    let c = g.generate(k);
                    if c.is_uniform(Material::Air) || c.is_uniform(Material::Rock) {
                        continue;
                    }
                    for i in (0..32 * 32 * 31).step_by(11) {
                        if c.get(i) == Material::Air && c.get(i + 32 * 32).is_solid() {
                            covered_air += 1;
                        }
                    }
                }
            }
        }
        assert!(covered_air > 100, "only {covered_air} air voxels under solid ones");
    }

    #[test]
    fn ground_height_is_the_top_of_the_generated_column() {
        let g = terrain(11);
        let l = g.layout;
        for (x, z) in [(5.5, 7.5), (100.2, -40.7), (-333.0, 812.9), (1000.0, 1000.0)] {
            let h = g.ground_height(x, z);
            let v = l.voxel_at(DVec3::new(x, h - 0.5, z));
            assert!(g.voxel(v).is_solid(), "below {h} at {x},{z} is air");
            for up in 0..20 {
                let a = VoxelCoord { y: v.y + 1 + up, ..v };
                assert_eq!(g.voxel(a), Material::Air, "above {h} at {x},{z}: {a:?} is solid");
            }
        }
    }

    #[test]
    fn set_promotes_and_compact_collapses() {
        let mut v = ChunkVoxels::Uniform(Material::Rock);
        assert_eq!(v.set(5, Material::Air, 8), Material::Rock);
        assert_eq!(v.get(5), Material::Air);
        assert_eq!(v.get(4), Material::Rock);
        v.set(5, Material::Rock, 8);
        v.compact();
        assert_eq!(v, ChunkVoxels::Uniform(Material::Rock));
        assert_eq!(Material::from_u8(6), Some(Material::Metal));
        assert_eq!(Material::from_u8(7), None);
    }
}
