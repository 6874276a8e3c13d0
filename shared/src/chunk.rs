//! Voxel grid addressing: global voxel coordinates and fixed-size chunk keys.
//!
//! The terrain is a grid of cubic voxels of edge `voxel_m`, grouped in cubic
//! chunks of `chunk_voxels` voxels per edge. Chunks are the unit of generation,
//! streaming and persistence; voxel coordinates are global integers, so a
//! voxel's identity does not depend on which chunk or region holds it.

use glam::{DVec3, IVec3};
use serde::{Deserialize, Serialize};

use crate::geom::{Aabb, WorldPos};

/// `x.floor() as i32` without a libm call (x86-64's baseline has no SSE4.1
/// `roundsd`, so `f64::floor` is a function call; this is on hot paths).
/// Saturates like `as` outside the `i32` range.
#[inline]
pub fn floor_i32(x: f64) -> i32 {
    let i = x as i32;
    if f64::from(i) > x { i.saturating_sub(1) } else { i }
}

/// Integer coordinates of one voxel in the world grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VoxelCoord {
    pub x: i32,
    pub y: i32,
    pub z: i32,
}

/// Integer coordinates of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkKey {
    pub x: i32,
    pub y: i32,
    pub z: i32,
}

/// The voxel grid's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkLayout {
    /// Edge of one voxel, metres.
    pub voxel_m: f64,
    /// Voxels along each edge of a chunk.
    pub chunk_voxels: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayoutError {
    #[error("voxel edge must be a positive finite number of metres, got {0}")]
    VoxelSize(f64),
    #[error("chunk edge must be 1..=256 voxels, got {0}")]
    ChunkVoxels(u32),
}

impl Default for ChunkLayout {
    /// 1 m voxels in chunks of 32³.
    fn default() -> Self {
        Self { voxel_m: 1.0, chunk_voxels: 32 }
    }
}

impl ChunkLayout {
    pub fn validate(&self) -> Result<(), LayoutError> {
        if !(self.voxel_m.is_finite() && self.voxel_m > 0.0) {
            return Err(LayoutError::VoxelSize(self.voxel_m));
        }
        if !(1..=256).contains(&self.chunk_voxels) {
            return Err(LayoutError::ChunkVoxels(self.chunk_voxels));
        }
        Ok(())
    }

    pub fn chunk_m(&self) -> f64 {
        self.voxel_m * f64::from(self.chunk_voxels)
    }

    /// The voxel whose cube holds `p`.
    pub fn voxel_at(&self, p: WorldPos) -> VoxelCoord {
        let v = p / self.voxel_m;
        VoxelCoord { x: floor_i32(v.x), y: floor_i32(v.y), z: floor_i32(v.z) }
    }

    /// Centre of a voxel, in world metres.
    pub fn voxel_center(&self, v: VoxelCoord) -> WorldPos {
        (IVec3::new(v.x, v.y, v.z).as_dvec3() + DVec3::splat(0.5)) * self.voxel_m
    }

    pub fn chunk_of(&self, v: VoxelCoord) -> ChunkKey {
        let n = self.chunk_voxels as i32;
        ChunkKey { x: v.x.div_euclid(n), y: v.y.div_euclid(n), z: v.z.div_euclid(n) }
    }

    /// The chunk holding `p`.
    pub fn chunk_at(&self, p: WorldPos) -> ChunkKey {
        self.chunk_of(self.voxel_at(p))
    }

    /// Index of voxel `v` inside its chunk, x fastest: `0..chunk_voxels³`.
    pub fn local_index(&self, v: VoxelCoord) -> usize {
        let n = self.chunk_voxels as i32;
        let (x, y, z) = (v.x.rem_euclid(n), v.y.rem_euclid(n), v.z.rem_euclid(n));
        (x + n * (y + n * z)) as usize
    }

    /// The voxel at `index` (as from [`Self::local_index`]) of chunk `c`.
    pub fn voxel_of(&self, c: ChunkKey, index: usize) -> VoxelCoord {
        let n = self.chunk_voxels as usize;
        let (x, y, z) = (index % n, (index / n) % n, index / (n * n));
        let n = n as i32;
        VoxelCoord { x: c.x * n + x as i32, y: c.y * n + y as i32, z: c.z * n + z as i32 }
    }

    /// The chunk's cube in world metres.
    pub fn chunk_aabb(&self, c: ChunkKey) -> Aabb {
        let min = IVec3::new(c.x, c.y, c.z).as_dvec3() * self.chunk_m();
        Aabb::new(min, min + DVec3::splat(self.chunk_m()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn negative_voxels_belong_to_negative_chunks() {
        let l = ChunkLayout::default();
        let v = l.voxel_at(DVec3::new(-0.5, 0.0, 31.9));
        assert_eq!(v, VoxelCoord { x: -1, y: 0, z: 31 });
        assert_eq!(l.chunk_of(v), ChunkKey { x: -1, y: 0, z: 0 });
        assert_eq!(l.local_index(v), 31 + 32 * 32 * 31);
    }

    #[test]
    fn floor_i32_is_floor() {
        for x in [-2.5, -2.0, -1.0000001, -0.5, -0.0, 0.0, 0.3, 1.0, 7.9999, 1e12, -1e12, f64::NAN] {
            assert_eq!(floor_i32(x), x.floor() as i32, "{x}");
        }
    }

    #[test]
    fn validate_rejects_nonsense() {
        assert!(ChunkLayout::default().validate().is_ok());
        assert!(ChunkLayout { voxel_m: 0.0, chunk_voxels: 32 }.validate().is_err());
        assert!(ChunkLayout { voxel_m: f64::NAN, chunk_voxels: 32 }.validate().is_err());
        assert!(ChunkLayout { voxel_m: 1.0, chunk_voxels: 0 }.validate().is_err());
    }

    proptest! {
        #[test]
        fn local_index_round_trips(x in -100_000i32..100_000, y in -5000i32..5000, z in -100_000i32..100_000,
                                   voxels in prop_oneof![Just(16u32), Just(32u32), 1u32..64]) {
            let l = ChunkLayout { voxel_m: 0.5, chunk_voxels: voxels };
            let v = VoxelCoord { x, y, z };
            let c = l.chunk_of(v);
            let i = l.local_index(v);
            prop_assert!(i < (voxels * voxels * voxels) as usize);
            prop_assert_eq!(l.voxel_of(c, i), v);
            prop_assert!(l.chunk_aabb(c).contains(l.voxel_center(v)));
        }
    }
}
