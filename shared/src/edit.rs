//! World edits and the deltas they leave.
//!
//! A player's edit is an operation in world space ([`EditOp`]: dig a sphere,
//! fill a sphere with a material). Applied to the voxels, it becomes a list of
//! per-chunk voxel deltas ([`VoxelDelta`]: "voxel i of chunk k is now m").
//! Deltas are what is stored: the procedural chunk plus its deltas, in order,
//! rebuilds the chunk exactly ([`rebuild`]). A delta sets a material, so
//! re-applying a suffix of the list is harmless, which is what lets a server
//! overlay its not-yet-durable deltas on a chunk read from storage.

use glam::DVec3;
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkKey, ChunkLayout, VoxelCoord};
use crate::terrain::{ChunkVoxels, Material, TerrainGen};

/// Largest radius of one edit, metres.
pub const MAX_EDIT_RADIUS_M: f32 = 4.0;

/// One edit operation, in world space.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum EditOp {
    /// Turn every solid voxel whose centre lies within `radius` of `center` into air.
    Dig { center: DVec3, radius: f32 },
    /// Fill every air voxel whose centre lies within `radius` of `center` with `material`.
    Place { center: DVec3, radius: f32, material: Material },
}

/// Why an edit operation is malformed, whatever the world looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EditShapeError {
    #[error("edit centre or radius is not finite")]
    NonFinite,
    #[error("edit radius must be in (0, {MAX_EDIT_RADIUS_M}] m")]
    Radius,
    #[error("only structure materials can be placed, and never air")]
    Material,
}

impl EditOp {
    pub fn center(&self) -> DVec3 {
        match self {
            EditOp::Dig { center, .. } | EditOp::Place { center, .. } => *center,
        }
    }

    pub fn radius(&self) -> f32 {
        match self {
            EditOp::Dig { radius, .. } | EditOp::Place { radius, .. } => *radius,
        }
    }

    /// Checks what can be checked without the world.
    pub fn validate(&self) -> Result<(), EditShapeError> {
        let (c, r) = (self.center(), self.radius());
        if !c.is_finite() || !r.is_finite() {
            return Err(EditShapeError::NonFinite);
        }
        if !(r > 0.0 && r <= MAX_EDIT_RADIUS_M) {
            return Err(EditShapeError::Radius);
        }
        if let EditOp::Place { material, .. } = self
            && !material.is_structure()
            && !matches!(material, Material::Soil | Material::Rock)
        {
            return Err(EditShapeError::Material);
        }
        Ok(())
    }

    /// The voxels the operation covers, in a fixed order (z, y, x ascending).
    pub fn voxels(&self, layout: &ChunkLayout) -> Vec<VoxelCoord> {
        let (c, r) = (self.center(), f64::from(self.radius()));
        let lo = layout.voxel_at(c - DVec3::splat(r));
        let hi = layout.voxel_at(c + DVec3::splat(r));
        let mut out = Vec::new();
        for z in lo.z..=hi.z {
            for y in lo.y..=hi.y {
                for x in lo.x..=hi.x {
                    let v = VoxelCoord { x, y, z };
                    if layout.voxel_center(v).distance_squared(c) <= r * r {
                        out.push(v);
                    }
                }
            }
        }
        out
    }

    /// What the operation turns voxel `old` into (`None`: unchanged).
    pub fn result_for(&self, old: Material) -> Option<Material> {
        match self {
            EditOp::Dig { .. } if old.is_solid() => Some(Material::Air),
            EditOp::Place { material, .. } if !old.is_solid() => Some(*material),
            _ => None,
        }
    }
}

/// "Voxel `index` of `chunk` is now `material`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VoxelDelta {
    pub chunk: ChunkKey,
    /// Index inside the chunk, as [`ChunkLayout::local_index`].
    pub index: u32,
    pub material: Material,
}

/// Applies deltas of one chunk, in order, to its voxels.
pub fn apply_deltas<'a>(
    voxels: &mut ChunkVoxels,
    layout: &ChunkLayout,
    deltas: impl IntoIterator<Item = &'a VoxelDelta>,
) {
    let len = (layout.chunk_voxels as usize).pow(3);
    for d in deltas {
        voxels.set(d.index as usize, d.material, len);
    }
    voxels.compact();
}

/// A chunk as the world holds it: generated from the seed, then its deltas.
pub fn rebuild(terrain: &TerrainGen, key: ChunkKey, deltas: &[VoxelDelta]) -> ChunkVoxels {
    let mut v = terrain.generate(key);
    apply_deltas(&mut v, &terrain.layout, deltas.iter().filter(|d| d.chunk == key));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dig_covers_a_sphere() {
        let l = ChunkLayout::default();
        let op = EditOp::Dig { center: DVec3::new(10.5, 10.5, 10.5), radius: 1.0 };
        let v = op.voxels(&l);
        // The centre voxel and its 6 face neighbours.
        assert_eq!(v.len(), 7);
        assert!(v.contains(&VoxelCoord { x: 10, y: 10, z: 10 }));
        assert!(v.contains(&VoxelCoord { x: 11, y: 10, z: 10 }));
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        let c = DVec3::ZERO;
        assert!(EditOp::Dig { center: c, radius: 2.0 }.validate().is_ok());
        assert_eq!(EditOp::Dig { center: c, radius: 0.0 }.validate(), Err(EditShapeError::Radius));
        assert_eq!(EditOp::Dig { center: c, radius: 40.0 }.validate(), Err(EditShapeError::Radius));
        assert_eq!(EditOp::Dig { center: DVec3::NAN, radius: 1.0 }.validate(), Err(EditShapeError::NonFinite));
        assert_eq!(EditOp::Dig { center: c, radius: f32::INFINITY }.validate(), Err(EditShapeError::NonFinite));
        assert_eq!(
            EditOp::Place { center: c, radius: 1.0, material: Material::Air }.validate(),
            Err(EditShapeError::Material)
        );
        assert_eq!(
            EditOp::Place { center: c, radius: 1.0, material: Material::Ore }.validate(),
            Err(EditShapeError::Material)
        );
    }

    #[test]
    fn dig_only_removes_and_place_only_fills() {
        let dig = EditOp::Dig { center: DVec3::ZERO, radius: 1.0 };
        let place = EditOp::Place { center: DVec3::ZERO, radius: 1.0, material: Material::Wood };
        assert_eq!(dig.result_for(Material::Rock), Some(Material::Air));
        assert_eq!(dig.result_for(Material::Air), None);
        assert_eq!(place.result_for(Material::Air), Some(Material::Wood));
        assert_eq!(place.result_for(Material::Rock), None);
    }
}
