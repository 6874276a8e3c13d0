//! World positions and axis-aligned boxes.
//!
//! World positions are metres in `f64`: the world is many kilometres wide and
//! `f32` loses millimetres beyond a few kilometres. Simulation may work in
//! `f32` relative to a local origin; the conversion is the simulation's job.

use glam::DVec3;
use serde::{Deserialize, Serialize};

/// A point of the world, in metres. +Y is up.
pub type WorldPos = DVec3;

/// An axis-aligned box, half-open: it contains `min <= p < max` on every axis,
/// so boxes that tile space never share a point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Aabb {
    pub min: DVec3,
    pub max: DVec3,
}

impl Aabb {
    pub fn new(min: DVec3, max: DVec3) -> Self {
        debug_assert!(min.cmple(max).all(), "Aabb min must not exceed max");
        Self { min, max }
    }

    /// Half-open containment: `min <= p < max` on every axis.
    pub fn contains(&self, p: WorldPos) -> bool {
        p.cmpge(self.min).all() && p.cmplt(self.max).all()
    }

    /// Chebyshev (L∞) distance from `p` to the closed box: 0 inside or on
    /// the surface, otherwise the largest per-axis gap.
    pub fn linf_distance(&self, p: WorldPos) -> f64 {
        let below = self.min - p;
        let above = p - self.max;
        below.max(above).max(DVec3::ZERO).max_element()
    }

    /// The box grown by `margin` on every face.
    pub fn expanded(&self, margin: f64) -> Aabb {
        Aabb::new(self.min - DVec3::splat(margin), self.max + DVec3::splat(margin))
    }

    pub fn size(&self) -> DVec3 {
        self.max - self.min
    }

    pub fn center(&self) -> DVec3 {
        (self.min + self.max) * 0.5
    }

    /// Whether the closed boxes share at least one point.
    pub fn touches_closed(&self, other: &Aabb) -> bool {
        self.min.cmple(other.max).all() && other.min.cmple(self.max).all()
    }

    /// Whether the open interiors intersect (a positive-volume overlap).
    pub fn interiors_intersect(&self, other: &Aabb) -> bool {
        self.min.cmplt(other.max).all() && other.min.cmplt(self.max).all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit() -> Aabb {
        Aabb::new(DVec3::ZERO, DVec3::splat(10.0))
    }

    #[test]
    fn containment_is_half_open() {
        let b = unit();
        assert!(b.contains(DVec3::ZERO));
        assert!(b.contains(DVec3::splat(9.999)));
        assert!(!b.contains(DVec3::new(10.0, 5.0, 5.0)));
        assert!(!b.contains(DVec3::new(-0.001, 5.0, 5.0)));
    }

    #[test]
    fn linf_distance_is_largest_axis_gap() {
        let b = unit();
        assert_eq!(b.linf_distance(DVec3::splat(5.0)), 0.0);
        assert_eq!(b.linf_distance(DVec3::new(13.0, 5.0, 5.0)), 3.0);
        assert_eq!(b.linf_distance(DVec3::new(13.0, -7.0, 5.0)), 7.0);
        assert_eq!(b.linf_distance(DVec3::new(10.0, 10.0, 10.0)), 0.0);
    }
}
