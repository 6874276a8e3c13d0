//! The octree of cubic regions: the units of ownership of the mesh.
//!
//! The world is a grid of root cubes of edge [`ROOT_EDGE_M`] (2000 m). A region
//! may split into 8 children of half the edge, down to [`MIN_EDGE_M`] (500 m,
//! level [`MAX_LEVEL`]). A [`RegionKey`] names one cube of that hierarchy by
//! its level and integer cell coordinates; a [`RegionTree`] says which root
//! cubes exist and which regions are split, so its leaves tile the world and
//! every point of the world lies in exactly one leaf.

use std::collections::BTreeSet;
use std::fmt;

use glam::{DVec3, IVec3};
use serde::{Deserialize, Serialize};

use crate::geom::{Aabb, WorldPos};

/// Edge of a root region, metres.
pub const ROOT_EDGE_M: f64 = 2000.0;
/// Deepest level of the octree (level 0 = root = 2000 m, 1 = 1000 m, 2 = 500 m).
pub const MAX_LEVEL: u8 = 2;
/// Edge of the smallest region, metres.
pub const MIN_EDGE_M: f64 = ROOT_EDGE_M / (1u32 << MAX_LEVEL) as f64;
/// Default width of the overlap zone outside a region's faces, metres.
pub const DEFAULT_OVERLAP_M: f64 = 100.0;

/// One cube of the region octree: `level` 0 is a root cube of 2000 m; each
/// level halves the edge. `x, y, z` are cell coordinates at that level, so the
/// cube spans `[cell * edge, (cell + 1) * edge)` on each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionKey {
    pub level: u8,
    pub x: i32,
    pub y: i32,
    pub z: i32,
}

/// Errors of region-key and region-tree operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("region level {0} is deeper than the minimum region size allows (max level {MAX_LEVEL})")]
    LevelTooDeep(u8),
    #[error("region {0} is not a leaf of the tree")]
    NotALeaf(RegionKey),
    #[error("region {0} is not split, or one of its children is split")]
    NotMergeable(RegionKey),
    #[error("region {0} is not part of the world")]
    OutsideWorld(RegionKey),
    #[error("cannot parse region key {0:?}: expected L<level>:<x>,<y>,<z>")]
    Parse(String),
}

impl RegionKey {
    pub const fn new(level: u8, x: i32, y: i32, z: i32) -> Self {
        Self { level, x, y, z }
    }

    pub const fn root(x: i32, y: i32, z: i32) -> Self {
        Self::new(0, x, y, z)
    }

    pub fn cell(&self) -> IVec3 {
        IVec3::new(self.x, self.y, self.z)
    }

    /// Edge length of regions at `level`, metres.
    pub fn edge_at(level: u8) -> f64 {
        ROOT_EDGE_M / f64::from(1u32 << level)
    }

    pub fn edge(&self) -> f64 {
        Self::edge_at(self.level)
    }

    /// The region of `level` whose half-open cube holds `p`.
    pub fn containing(p: WorldPos, level: u8) -> Result<Self, RegionError> {
        if level > MAX_LEVEL {
            return Err(RegionError::LevelTooDeep(level));
        }
        let edge = Self::edge_at(level);
        Ok(Self::new(level, cell_of(p.x, edge), cell_of(p.y, edge), cell_of(p.z, edge)))
    }

    /// The region's cube, half-open.
    pub fn aabb(&self) -> Aabb {
        let edge = self.edge();
        let min = self.cell().as_dvec3() * edge;
        Aabb::new(min, min + DVec3::splat(edge))
    }

    pub fn contains(&self, p: WorldPos) -> bool {
        self.aabb().contains(p)
    }

    pub fn parent(&self) -> Option<Self> {
        (self.level > 0)
            .then(|| Self::new(self.level - 1, self.x.div_euclid(2), self.y.div_euclid(2), self.z.div_euclid(2)))
    }

    /// The root cube this region lies in.
    pub fn root_ancestor(&self) -> Self {
        let shift = u32::from(self.level);
        Self::root(self.x >> shift, self.y >> shift, self.z >> shift)
    }

    /// Whether `self` is `other` or one of its descendants.
    pub fn is_within(&self, other: &RegionKey) -> bool {
        if self.level < other.level {
            return false;
        }
        let shift = u32::from(self.level - other.level);
        (self.x >> shift, self.y >> shift, self.z >> shift) == (other.x, other.y, other.z)
    }

    /// The 8 children, in a fixed order (x fastest, then y, then z).
    pub fn children(&self) -> Result<[Self; 8], RegionError> {
        if self.level >= MAX_LEVEL {
            return Err(RegionError::LevelTooDeep(self.level + 1));
        }
        let l = self.level + 1;
        let (bx, by, bz) = (self.x * 2, self.y * 2, self.z * 2);
        Ok(std::array::from_fn(|i| {
            let i = i as i32;
            Self::new(l, bx + (i & 1), by + ((i >> 1) & 1), bz + ((i >> 2) & 1))
        }))
    }

    /// The child holding `p`; `p` must lie in `self`.
    fn child_containing(&self, p: WorldPos) -> Self {
        let edge = Self::edge_at(self.level + 1);
        let c = |v: f64, base: i32| cell_of(v, edge).clamp(base * 2, base * 2 + 1);
        Self::new(self.level + 1, c(p.x, self.x), c(p.y, self.y), c(p.z, self.z))
    }

    /// Whether `p` lies in this region's overlap zone of width `margin`: the
    /// shell outside its faces whose Chebyshev (L∞) distance to the cube is at
    /// most `margin`. The region itself is not part of its own zone.
    pub fn in_overlap_zone(&self, p: WorldPos, margin: f64) -> bool {
        let b = self.aabb();
        !b.contains(p) && b.linf_distance(p) <= margin
    }

    /// How `other` touches `self`, if the two are distinct cubes with disjoint
    /// interiors that share at least one point.
    pub fn contact(&self, other: &RegionKey) -> Option<Contact> {
        contact_between(&self.aabb(), &other.aabb())
    }
}

impl fmt::Display for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}:{},{},{}", self.level, self.x, self.y, self.z)
    }
}

impl std::str::FromStr for RegionKey {
    type Err = RegionError;

    /// Parses the `Display` form, `L<level>:<x>,<y>,<z>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RegionError::Parse(s.to_owned());
        let rest = s.strip_prefix('L').ok_or_else(err)?;
        let (level, cells) = rest.split_once(':').ok_or_else(err)?;
        let level: u8 = level.parse().map_err(|_| err())?;
        if level > MAX_LEVEL {
            return Err(RegionError::LevelTooDeep(level));
        }
        let mut it = cells.split(',').map(|c| c.trim().parse::<i32>());
        let (Some(Ok(x)), Some(Ok(y)), Some(Ok(z)), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(err());
        };
        Ok(Self::new(level, x, y, z))
    }
}

/// Integer cell of coordinate `v` for cells of `edge`, with exact half-open
/// semantics: `cell * edge <= v < (cell + 1) * edge`. The division alone can
/// round across a boundary; the products are exact for our edges, so the
/// comparisons settle it.
fn cell_of(v: f64, edge: f64) -> i32 {
    let mut c = (v / edge).floor();
    if c * edge > v {
        c -= 1.0;
    } else if (c + 1.0) * edge <= v {
        c += 1.0;
    }
    c as i32
}

/// How two regions touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Contact {
    /// They share a patch of a face (positive area).
    Face,
    /// They share a segment of an edge, and no area.
    Edge,
    /// They share a single corner point.
    Corner,
}

fn contact_between(a: &Aabb, b: &Aabb) -> Option<Contact> {
    if !a.touches_closed(b) || a.interiors_intersect(b) {
        return None;
    }
    // Axes on which the closed intervals meet in a single point.
    let point_axes = (0..3).filter(|&i| a.max[i] == b.min[i] || b.max[i] == a.min[i]).count();
    match point_axes {
        1 => Some(Contact::Face),
        2 => Some(Contact::Edge),
        3 => Some(Contact::Corner),
        _ => None,
    }
}

/// The region octree of one world: which root cubes exist and which regions
/// are split. Its leaves tile the world.
///
/// Invariants: every split region lies under a root of the world, is above
/// [`MAX_LEVEL`], and all its ancestors are split too.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RegionTree {
    roots: BTreeSet<RegionKey>,
    split: BTreeSet<RegionKey>,
}

impl RegionTree {
    /// A world made of the given root cells, none of them split.
    pub fn new(roots: impl IntoIterator<Item = RegionKey>) -> Self {
        Self { roots: roots.into_iter().map(|k| k.root_ancestor()).collect(), split: BTreeSet::new() }
    }

    /// A box of `nx × ny × nz` root cells with its minimum corner at root cell `origin`.
    pub fn grid(origin: IVec3, nx: u32, ny: u32, nz: u32) -> Self {
        let mut roots = Vec::new();
        for z in 0..nz as i32 {
            for y in 0..ny as i32 {
                for x in 0..nx as i32 {
                    roots.push(RegionKey::root(origin.x + x, origin.y + y, origin.z + z));
                }
            }
        }
        Self::new(roots)
    }

    pub fn roots(&self) -> impl Iterator<Item = &RegionKey> {
        self.roots.iter()
    }

    /// Whether `key` is a region of this tree (a leaf or a split node).
    pub fn has_region(&self, key: &RegionKey) -> bool {
        self.roots.contains(&key.root_ancestor()) && key.parent().is_none_or(|p| self.split.contains(&p))
    }

    pub fn is_leaf(&self, key: &RegionKey) -> bool {
        self.has_region(key) && !self.split.contains(key)
    }

    pub fn is_split(&self, key: &RegionKey) -> bool {
        self.split.contains(key)
    }

    /// Splits leaf `key` into its 8 children and returns them.
    pub fn split(&mut self, key: RegionKey) -> Result<[RegionKey; 8], RegionError> {
        if !self.is_leaf(&key) {
            return Err(RegionError::NotALeaf(key));
        }
        let children = key.children()?;
        self.split.insert(key);
        Ok(children)
    }

    /// Merges the 8 children of `key` back into it; they must all be leaves.
    pub fn merge(&mut self, key: RegionKey) -> Result<(), RegionError> {
        if !self.split.contains(&key) {
            return Err(RegionError::NotMergeable(key));
        }
        let children = key.children()?;
        if children.iter().any(|c| self.split.contains(c)) {
            return Err(RegionError::NotMergeable(key));
        }
        self.split.remove(&key);
        Ok(())
    }

    /// The leaf whose cube holds `p`, or `None` outside the world.
    pub fn leaf_at(&self, p: WorldPos) -> Option<RegionKey> {
        let mut key = RegionKey::containing(p, 0).ok()?;
        if !self.roots.contains(&key) {
            return None;
        }
        while self.split.contains(&key) {
            key = key.child_containing(p);
        }
        Some(key)
    }

    /// Every leaf, in key order of their roots and then depth-first.
    pub fn leaves(&self) -> Vec<RegionKey> {
        let mut out = Vec::new();
        for root in &self.roots {
            self.collect_leaves(*root, &mut out);
        }
        out
    }

    fn collect_leaves(&self, key: RegionKey, out: &mut Vec<RegionKey>) {
        if self.split.contains(&key) {
            if let Ok(children) = key.children() {
                for c in children {
                    self.collect_leaves(c, out);
                }
            }
        } else {
            out.push(key);
        }
    }

    /// Leaves of any level that touch `leaf` through a face, an edge or a
    /// corner, with the kind of contact, sorted by key.
    pub fn neighbours(&self, leaf: &RegionKey) -> Result<Vec<(RegionKey, Contact)>, RegionError> {
        if !self.is_leaf(leaf) {
            return Err(RegionError::NotALeaf(*leaf));
        }
        let target = leaf.aabb();
        let root = leaf.root_ancestor();
        let mut out = Vec::new();
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let r = RegionKey::root(root.x + dx, root.y + dy, root.z + dz);
                    if self.roots.contains(&r) {
                        self.collect_touching(r, leaf, &target, &mut out);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn collect_touching(&self, key: RegionKey, leaf: &RegionKey, target: &Aabb, out: &mut Vec<(RegionKey, Contact)>) {
        if key == *leaf || !key.aabb().touches_closed(target) {
            return;
        }
        if self.split.contains(&key) {
            if let Ok(children) = key.children() {
                for c in children {
                    self.collect_touching(c, leaf, target, out);
                }
            }
        } else if let Some(contact) = contact_between(target, &key.aabb()) {
            out.push((key, contact));
        }
    }

    /// The leaves whose overlap zone (of width `margin`) holds `p`: the
    /// neighbours that must see a ghost of an entity at `p`.
    pub fn overlapping_leaves(&self, p: WorldPos, margin: f64) -> Vec<RegionKey> {
        let Some(home) = self.leaf_at(p) else {
            return Vec::new();
        };
        // Fast path: the cube of half-width `margin` around p lies strictly
        // inside its own leaf, so no other leaf is within `margin`.
        let b = home.aabb();
        if (p - b.min).min_element() > margin && (b.max - p).min_element() > margin {
            return Vec::new();
        }
        if margin >= MIN_EDGE_M {
            // Probing cannot see past a whole leaf: ask every leaf.
            let mut all = self.leaves();
            all.retain(|k| k.in_overlap_zone(p, margin));
            return all;
        }
        // A leaf whose zone holds p contains a point within `margin` of p on
        // every axis; leaves are wider than any sane margin (MIN_EDGE_M), so
        // that point can be taken among 27 probes around p.
        // Per axis: p itself, and the points `margin` away on either side (the
        // lower one nudged down, because cubes are half-open at their max face).
        let probes = |v: f64| [(v - margin).next_down(), v, v + margin];
        let mut out = BTreeSet::new();
        for z in probes(p.z) {
            for y in probes(p.y) {
                for x in probes(p.x) {
                    if let Some(k) = self.leaf_at(DVec3::new(x, y, z))
                        && k != home
                        && k.in_overlap_zone(p, margin)
                    {
                        out.insert(k);
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

/// Hysteresis for authority: the region that should take over an entity owned
/// through `current`, now at `p`. `None` while the entity is inside `current`
/// or within `margin` (Chebyshev) of it, so an entity moving back and forth
/// across a face never changes owner.
pub fn handoff_target(tree: &RegionTree, current: &RegionKey, p: WorldPos, margin: f64) -> Option<RegionKey> {
    if current.aabb().linf_distance(p) <= margin {
        return None;
    }
    tree.leaf_at(p).filter(|k| k != current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn world() -> RegionTree {
        RegionTree::grid(IVec3::new(-1, -1, -1), 3, 2, 2)
    }

    /// A tree with a few splits at different depths, chosen from `seeds`.
    fn tree_with_splits(seeds: &[(u8, u8, u8)]) -> RegionTree {
        let mut t = world();
        for &(a, b, c) in seeds {
            let leaves = t.leaves();
            let pick = leaves[(a as usize * 31 + b as usize * 7 + c as usize) % leaves.len()];
            let _ = t.split(pick);
        }
        t
    }

    fn point_in_world() -> impl Strategy<Value = DVec3> {
        (-2000.0..3999.999f64, -2000.0..1999.999f64, -2000.0..1999.999f64).prop_map(|(x, y, z)| DVec3::new(x, y, z))
    }

    #[test]
    fn edges_halve_down_to_the_minimum() {
        assert_eq!(RegionKey::edge_at(0), 2000.0);
        assert_eq!(RegionKey::edge_at(1), 1000.0);
        assert_eq!(RegionKey::edge_at(2), 500.0);
        assert_eq!(MIN_EDGE_M, 500.0);
        assert!(RegionKey::new(2, 0, 0, 0).children().is_err());
    }

    #[test]
    fn negative_coordinates_floor() {
        let k = RegionKey::containing(DVec3::new(-0.001, 0.0, -2000.0), 0).unwrap();
        assert_eq!(k, RegionKey::root(-1, 0, -1));
        let k = RegionKey::containing(DVec3::new(-500.0, 0.0, 0.0), 2).unwrap();
        assert_eq!(k.x, -1);
        assert_eq!(RegionKey::new(2, -1, -1, 3).parent(), Some(RegionKey::new(1, -1, -1, 1)));
        assert_eq!(RegionKey::new(2, -1, 5, 3).root_ancestor(), RegionKey::root(-1, 1, 0));
    }

    #[test]
    fn display_round_trips() {
        let k = RegionKey::new(2, -3, 0, 7);
        assert_eq!(k.to_string(), "L2:-3,0,7");
        assert_eq!("L2:-3,0,7".parse::<RegionKey>().unwrap(), k);
        assert!("L3:0,0,0".parse::<RegionKey>().is_err());
        assert!("L1:0,0".parse::<RegionKey>().is_err());
        assert!("0,0,0".parse::<RegionKey>().is_err());
    }

    #[test]
    fn split_and_merge_rules() {
        let mut t = world();
        let r = RegionKey::root(0, 0, 0);
        let kids = t.split(r).unwrap();
        assert!(!t.is_leaf(&r));
        assert!(kids.iter().all(|k| t.is_leaf(k)));
        assert_eq!(t.split(r), Err(RegionError::NotALeaf(r)));
        t.split(kids[0]).unwrap();
        assert_eq!(t.merge(r), Err(RegionError::NotMergeable(r)));
        t.merge(kids[0]).unwrap();
        t.merge(r).unwrap();
        assert_eq!(t, world());
        let outside = RegionKey::root(9, 9, 9);
        assert_eq!(t.split(outside), Err(RegionError::NotALeaf(outside)));
    }

    #[test]
    fn neighbours_of_a_root_in_a_line() {
        let t = RegionTree::grid(IVec3::ZERO, 3, 1, 1);
        let n = t.neighbours(&RegionKey::root(1, 0, 0)).unwrap();
        assert_eq!(n, vec![(RegionKey::root(0, 0, 0), Contact::Face), (RegionKey::root(2, 0, 0), Contact::Face)]);
    }

    #[test]
    fn neighbours_across_levels() {
        let mut t = RegionTree::grid(IVec3::ZERO, 2, 2, 2);
        let kids = t.split(RegionKey::root(1, 0, 0)).unwrap();
        // Root (0,0,0) touches 4 children of root (1,0,0) by a face (those with
        // local x = 0), and the other roots by faces, edges and a corner.
        let n = t.neighbours(&RegionKey::root(0, 0, 0)).unwrap();
        let faces: Vec<_> = n.iter().filter(|(k, c)| k.level == 1 && *c == Contact::Face).collect();
        assert_eq!(faces.len(), 4);
        assert!(n.contains(&(RegionKey::root(0, 1, 0), Contact::Face)));
        assert!(n.contains(&(RegionKey::root(0, 1, 1), Contact::Edge)));
        assert!(n.contains(&(RegionKey::root(1, 1, 0), Contact::Edge)));
        assert!(n.contains(&(RegionKey::root(1, 1, 1), Contact::Corner)));
        // A small child sees the big root across its face.
        let small = kids[0]; // L1:2,0,0
        let n = t.neighbours(&small).unwrap();
        assert!(n.contains(&(RegionKey::root(0, 0, 0), Contact::Face)));
        assert!(n.contains(&(kids[1], Contact::Face)));
        assert!(n.contains(&(kids[3], Contact::Edge)));
        assert!(n.contains(&(kids[7], Contact::Corner)));
        // 7 siblings and the big root; nothing else is within reach.
        assert_eq!(n.len(), 8, "{n:?}");
    }

    #[test]
    fn hysteresis_holds_near_the_face() {
        let t = RegionTree::grid(IVec3::ZERO, 2, 1, 1);
        let a = RegionKey::root(0, 0, 0);
        let b = RegionKey::root(1, 0, 0);
        let at = |x: f64| DVec3::new(x, 10.0, 10.0);
        assert_eq!(handoff_target(&t, &a, at(1999.0), 10.0), None);
        assert_eq!(handoff_target(&t, &a, at(2005.0), 10.0), None);
        assert_eq!(handoff_target(&t, &a, at(2010.5), 10.0), Some(b));
        assert_eq!(handoff_target(&t, &b, at(1995.0), 10.0), None);
        assert_eq!(handoff_target(&t, &b, at(1989.0), 10.0), Some(a));
        // Leaving the world gives no target.
        assert_eq!(handoff_target(&t, &b, at(4100.0), 10.0), None);
    }

    proptest! {
        #[test]
        fn every_point_lies_in_exactly_one_leaf(
            seeds in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..12),
            p in point_in_world(),
        ) {
            let t = tree_with_splits(&seeds);
            let holders: Vec<_> = t.leaves().into_iter().filter(|k| k.contains(p)).collect();
            prop_assert_eq!(holders.len(), 1, "point {:?} in leaves {:?}", p, holders);
            prop_assert_eq!(t.leaf_at(p), Some(holders[0]));
        }

        #[test]
        fn points_on_boundaries_lie_in_exactly_one_leaf(
            seeds in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..12),
            (ix, iy, iz) in (-3i32..8, -3i32..4, -3i32..4),
            nudge in prop_oneof![Just(0.0), Just(-1e-9), Just(1e-9)],
        ) {
            let t = tree_with_splits(&seeds);
            let p = DVec3::new(ix as f64 * 500.0 + nudge, iy as f64 * 500.0, iz as f64 * 500.0 - nudge);
            let holders = t.leaves().into_iter().filter(|k| k.contains(p)).count();
            prop_assert_eq!(holders, 1);
        }

        #[test]
        fn children_tile_their_parent_exactly(
            level in 0u8..MAX_LEVEL,
            (x, y, z) in (-50i32..50, -50i32..50, -50i32..50),
            f in (0.0..1.0f64, 0.0..1.0f64, 0.0..1.0f64),
        ) {
            let parent = RegionKey::new(level, x, y, z);
            let kids = parent.children().unwrap();
            let vol: f64 = kids.iter().map(|k| k.aabb().size().element_product()).sum();
            prop_assert_eq!(vol, parent.aabb().size().element_product());
            for (i, a) in kids.iter().enumerate() {
                prop_assert_eq!(a.parent(), Some(parent));
                prop_assert!(a.is_within(&parent));
                for b in &kids[i + 1..] {
                    prop_assert!(!a.aabb().interiors_intersect(&b.aabb()));
                }
            }
            let b = parent.aabb();
            let p = b.min + b.size() * DVec3::new(f.0, f.1, f.2);
            prop_assert_eq!(kids.iter().filter(|k| k.contains(p)).count(), 1);
        }

        #[test]
        fn overlap_membership_agrees_with_distance(
            level in 0u8..=MAX_LEVEL,
            p in point_in_world(),
            margin in prop_oneof![Just(DEFAULT_OVERLAP_M), 1.0..300.0f64],
        ) {
            let key = RegionKey::containing(DVec3::new(10.0, 10.0, 10.0), level).unwrap();
            let b = key.aabb();
            // Independent statement: outside the cube, inside the cube grown by margin.
            let expected = !b.contains(p)
                && (0..3).all(|i| p[i] >= b.min[i] - margin && p[i] <= b.max[i] + margin);
            prop_assert_eq!(key.in_overlap_zone(p, margin), expected);
            prop_assert_eq!(key.in_overlap_zone(p, margin), !b.contains(p) && b.linf_distance(p) <= margin);
        }

        #[test]
        fn overlapping_leaves_are_exactly_the_zones_holding_the_point(
            seeds in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..12),
            p in point_in_world(),
        ) {
            let t = tree_with_splits(&seeds);
            let brute: Vec<_> = t.leaves().into_iter()
                .filter(|k| k.in_overlap_zone(p, DEFAULT_OVERLAP_M))
                .collect();
            let mut fast = t.overlapping_leaves(p, DEFAULT_OVERLAP_M);
            fast.sort();
            let mut brute = brute;
            brute.sort();
            prop_assert_eq!(fast, brute);
        }

        #[test]
        fn neighbours_are_exactly_the_touching_leaves(
            seeds in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..12),
            pick in any::<usize>(),
        ) {
            let t = tree_with_splits(&seeds);
            let leaves = t.leaves();
            let leaf = leaves[pick % leaves.len()];
            let brute: Vec<_> = leaves.iter()
                .filter(|k| **k != leaf)
                .filter_map(|k| leaf.contact(k).map(|c| (*k, c)))
                .collect();
            let mut brute = brute;
            brute.sort();
            prop_assert_eq!(t.neighbours(&leaf).unwrap(), brute);
        }
    }
}
