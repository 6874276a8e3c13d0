//! What is stored, as domain types, and the byte formats of the blobs.
//!
//! Every blob starts with a format byte; decoding checks it, the length, and
//! every field's range, and names what is wrong, so a corrupt or foreign row
//! is an error that says where it is, never a panic and never a wrong world.

use serde::{Deserialize, Serialize};
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::ids::PlayerId;
use shared::terrain::Material;

use crate::StoreError;

/// The deltas one tick of one writer made, as the writer hands them over.
#[derive(Debug, Clone, PartialEq)]
pub struct TickDeltas {
    /// Mesh tick the edits were applied at. Ticks are one grid across the
    /// mesh, so they order the edits of different servers (authority over a
    /// voxel changes hands at a tick).
    pub tick: u64,
    pub deltas: Vec<VoxelDelta>,
}

/// Where a stored row of deltas sits in a chunk's history: rows apply in
/// this order (tick, then writer, then the writer's own sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RowKey {
    pub tick: u64,
    pub writer: u64,
    pub seq: u64,
}

/// A chunk's stored deltas, oldest first, and how many rows held them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkDeltas {
    pub deltas: Vec<VoxelDelta>,
    /// Rows read: the compacted snapshot (if any) plus batch rows after it.
    pub rows: usize,
}

/// What compacting a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compaction {
    /// Batch rows folded into the snapshot (and deleted).
    pub rows_folded: usize,
    /// Voxels the snapshot now holds (each changed voxel once).
    pub voxels: usize,
}

/// A player account. The password hash is a PHC string (argon2id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub player: PlayerId,
    pub password_hash: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// A logged-in player's session. Stored by the SHA-256 of its token, cached
/// in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub player: u64,
    pub account: String,
    /// Seconds since the Unix epoch.
    pub expires_unix: u64,
}

/// A player's progression: saved on leave, handoff and periodically.
/// `version` only increases; a save with an older version is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub player: PlayerId,
    pub version: u64,
    pub position: [f64; 3],
    pub inventory: serde_json::Value,
    pub stats: serde_json::Value,
    /// The player entity's persisted components, as one component set
    /// (`shared::component::ComponentSet`'s encoding; empty: none). Opaque
    /// to the store: the game server checks it against its registry.
    #[serde(default)]
    pub components: Vec<u8>,
}

/// A base structure or machine and its automation state (free-form JSON the
/// simulation owns). `version` only increases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Structure {
    pub id: u64,
    pub owner: PlayerId,
    /// The chunk holding its anchor, for loading structures with terrain.
    pub chunk: ChunkKey,
    pub kind: String,
    pub version: u64,
    pub state: serde_json::Value,
}

/// The coordinator's whole replicated state at a log index, as bytes it
/// encodes itself. Restored when every replica restarts at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySnapshot {
    /// The mesh's name (one database can hold several meshes).
    pub cluster: String,
    /// Only increases (the Raft log index the snapshot was taken at).
    pub version: u64,
    pub data: Vec<u8>,
}

/// One entity's checkpoint: its persisted components as its owner
/// simulated them at a mesh tick, so that a successor can resume it when
/// the owner dies. One row per entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub entity: u64,
    /// The mesh tick its writer's authority over it began (a spawn, a
    /// join, a handoff's effective tick, a reclaim, a resume): rows are
    /// ordered by (`held_since`, `epoch`, `tick`), and the store refuses a
    /// row older than the stored one. An owner that was cut off, or handed
    /// the entity on, held it since earlier than its successor, so it
    /// cannot overwrite it; entity epochs alone would not do, as the
    /// coordinator starts them again at 0 after a death or a leave (a
    /// player who logs in again is a new holding, after its old rows).
    pub held_since: u64,
    /// The entity epoch its owner held it under.
    pub epoch: u64,
    pub tick: u64,
    /// The server that wrote it.
    pub server: u32,
    /// The region leaf the entity stood in: (level, x, y, z).
    pub region: (u8, i32, i32, i32),
    /// Where it stood (a resume finds it by position, whatever the leaves
    /// are by then).
    pub pos: [f64; 3],
    /// Its persisted components, as one `shared::component::ComponentSet`
    /// encoding (empty when `gone`).
    pub components: Vec<u8>,
    /// It left the world (a player logged out): kept as a tombstone, so
    /// that no older row brings it back, and never resumed.
    pub gone: bool,
}

impl Checkpoint {
    /// Whether this row may replace `stored` (same entity).
    pub fn supersedes(&self, stored: &Checkpoint) -> bool {
        (self.held_since, self.epoch, self.tick) >= (stored.held_since, stored.epoch, stored.tick)
    }

    /// Whether it stood within the box from `min` (included) to `max`
    /// (excluded).
    pub fn within(&self, min: [f64; 3], max: [f64; 3]) -> bool {
        (0..3).all(|i| self.pos[i] >= min[i] && self.pos[i] < max[i])
    }
}

/// One committed authority transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub transfer_id: u64,
    pub entity: u64,
    pub from_server: u32,
    pub to_server: u32,
    pub epoch: u64,
    pub effective_tick: u64,
    /// "committed", "completed", "failed", … as the coordinator names them.
    pub outcome: String,
    pub unix_ms: u64,
}

/// Format byte of delta blobs.
const DELTAS_V1: u8 = 1;
/// Bytes per delta in a v1 blob: index (u32 LE) and material.
const DELTA_BYTES: usize = 5;

/// Encodes deltas of one chunk (the chunk is the row's key, not in the blob).
pub fn encode_deltas<'a>(deltas: impl ExactSizeIterator<Item = &'a VoxelDelta>) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + deltas.len() * DELTA_BYTES);
    out.push(DELTAS_V1);
    out.extend_from_slice(&(deltas.len() as u32).to_le_bytes());
    for d in deltas {
        out.extend_from_slice(&d.index.to_le_bytes());
        out.push(d.material as u8);
    }
    out
}

/// Decodes a delta blob of `chunk`, checking every field. `max_index` is the
/// number of voxels in a chunk; `what` names the row in errors.
pub fn decode_deltas(
    bytes: &[u8],
    chunk: ChunkKey,
    max_index: u32,
    what: &dyn Fn() -> String,
    out: &mut Vec<VoxelDelta>,
) -> Result<usize, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { what: what(), reason };
    let (&format, rest) = bytes.split_first().ok_or_else(|| corrupt("empty blob".into()))?;
    if format != DELTAS_V1 {
        return Err(corrupt(format!("unknown delta format {format} (this build reads {DELTAS_V1})")));
    }
    if rest.len() < 4 {
        return Err(corrupt("truncated count".into()));
    }
    let (count, body) = rest.split_at(4);
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if body.len() != count * DELTA_BYTES {
        return Err(corrupt(format!("{} bytes for {count} deltas", body.len())));
    }
    out.reserve(count);
    for d in body.chunks_exact(DELTA_BYTES) {
        let index = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        if index >= max_index {
            return Err(corrupt(format!("voxel index {index} outside a chunk of {max_index}")));
        }
        let material = Material::from_u8(d[4]).ok_or_else(|| corrupt(format!("unknown material {}", d[4])))?;
        out.push(VoxelDelta { chunk, index, material });
    }
    Ok(count)
}

/// Refuses a checkpoint write naming an entity twice (one statement
/// cannot upsert a row twice).
pub fn check_one_per_entity(rows: &[Checkpoint]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    match rows.iter().find(|r| !seen.insert(r.entity)) {
        Some(r) => Err(StoreError::Invalid(format!("entity {} checkpointed twice in one write", r.entity))),
        None => Ok(()),
    }
}

/// A checkpoint row from its columns: (entity, held since, epoch, tick,
/// server, region level, x, y, z), the position, the components, whether
/// it is gone.
pub fn checkpoint_from_columns(
    ints: [i64; 9],
    pos: [f64; 3],
    components: Vec<u8>,
    gone: bool,
) -> Result<Checkpoint, StoreError> {
    let [entity, held_since, epoch, tick, server, level, x, y, z] = ints;
    let corrupt =
        |reason: String| StoreError::Corrupt { what: format!("entity checkpoint {}", from_i64(entity)), reason };
    let narrow = |v: i64, what: &str| i32::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")));
    Ok(Checkpoint {
        entity: from_i64(entity),
        held_since: from_i64(held_since),
        epoch: from_i64(epoch),
        tick: from_i64(tick),
        server: u32::try_from(server).map_err(|_| corrupt(format!("server {server} out of range")))?,
        region: (
            u8::try_from(level).map_err(|_| corrupt(format!("region level {level} out of range")))?,
            narrow(x, "region x")?,
            narrow(y, "region y")?,
            narrow(z, "region z")?,
        ),
        pos,
        components,
        gone,
    })
}

/// Refuses a write holding a voxel index outside a chunk of `max_index` voxels.
pub fn check_indexes(batches: &[TickDeltas], max_index: u32) -> Result<(), StoreError> {
    match batches.iter().flat_map(|b| &b.deltas).find(|d| d.index >= max_index) {
        Some(d) => Err(StoreError::Invalid(format!("voxel index {} outside a chunk", d.index))),
        None => Ok(()),
    }
}

/// Folds deltas into one per voxel (the last wins), sorted by index: the
/// content of a compacted chunk snapshot.
pub fn fold_deltas(deltas: &[VoxelDelta]) -> Vec<VoxelDelta> {
    let mut by_index: std::collections::BTreeMap<u32, VoxelDelta> = std::collections::BTreeMap::new();
    for d in deltas {
        by_index.insert(d.index, *d);
    }
    by_index.into_values().collect()
}

/// Groups a flush's deltas by chunk, keeping their order within each chunk.
pub fn group_by_chunk(batches: &[TickDeltas]) -> Vec<(ChunkKey, Vec<VoxelDelta>)> {
    let mut order: Vec<ChunkKey> = Vec::new();
    let mut groups: std::collections::HashMap<ChunkKey, Vec<VoxelDelta>> = std::collections::HashMap::new();
    for b in batches {
        for d in &b.deltas {
            groups
                .entry(d.chunk)
                .or_insert_with(|| {
                    order.push(d.chunk);
                    Vec::new()
                })
                .push(*d);
        }
    }
    order.into_iter().map(|c| (c, groups.remove(&c).unwrap_or_default())).collect()
}

/// Reinterprets a u64 id as the i64 a database column holds (bit for bit).
pub fn to_i64(v: u64) -> i64 {
    v as i64
}

/// Inverse of [`to_i64`].
pub fn from_i64(v: i64) -> u64 {
    v as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ChunkKey {
        ChunkKey { x: -3, y: 1, z: 7 }
    }

    fn d(index: u32, m: Material) -> VoxelDelta {
        VoxelDelta { chunk: key(), index, material: m }
    }

    #[test]
    fn deltas_round_trip() {
        let ds = vec![d(0, Material::Air), d(32767, Material::Wood), d(5, Material::Metal)];
        let blob = encode_deltas(ds.iter());
        let mut out = Vec::new();
        let n = decode_deltas(&blob, key(), 32768, &|| "row".into(), &mut out).expect("decodes");
        assert_eq!(n, 3);
        assert_eq!(out, ds);
    }

    #[test]
    fn corrupt_blobs_are_named_errors() {
        let good = encode_deltas([d(1, Material::Rock)].iter());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![9, 0, 0, 0, 0], "unknown delta format 9"),
            (vec![1, 1, 0], "truncated"),
            (good[..good.len() - 1].to_vec(), "bytes for 1 deltas"),
            (encode_deltas([d(40000, Material::Rock)].iter()), "outside a chunk"),
            (
                {
                    let mut b = good.clone();
                    *b.last_mut().expect("non-empty") = 200;
                    b
                },
                "unknown material 200",
            ),
        ];
        for (blob, want) in cases {
            let mut out = Vec::new();
            let err = decode_deltas(&blob, key(), 32768, &|| "chunk (-3,1,7) row 4".into(), &mut out)
                .expect_err("corrupt blob refused");
            let msg = err.to_string();
            assert!(msg.contains(want) && msg.contains("chunk (-3,1,7) row 4"), "{msg} lacks {want}");
            assert_eq!(err.kind(), "corrupt");
        }
    }

    #[test]
    fn fold_keeps_the_last_write_per_voxel() {
        let ds = vec![d(3, Material::Air), d(1, Material::Wood), d(3, Material::Brick)];
        assert_eq!(fold_deltas(&ds), vec![d(1, Material::Wood), d(3, Material::Brick)]);
    }

    #[test]
    fn ids_survive_the_signed_column() {
        for v in [0u64, 1, u64::MAX, 1 << 63, 0xdead_beef_0000_0001] {
            assert_eq!(from_i64(to_i64(v)), v);
        }
    }
}
