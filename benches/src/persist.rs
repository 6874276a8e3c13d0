//! The persistence benchmark: game servers' edit writers (the code the game
//! server runs) fed at a target rate from 90 Hz "tick threads", against a
//! real store.
//!
//! Each edit changes `voxels_per_edit` voxels no other edit touches, spread
//! over `chunks` chunks per server, so at the end every acknowledged edit can
//! be checked in the store: `lost` counts acknowledged edits whose voxels are
//! not all there. Latency is from the tick that made the edit to the moment
//! the writer reported it durable (observed by a thread polling every 0.5 ms).

use std::time::{Duration, Instant};

use anyhow::Context;
use game_server::store::{DeltaBatch, WorldStore, spawn_writer};
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::terrain::Material;

#[derive(Debug, Clone)]
pub struct PersistConfig {
    pub url: String,
    pub seconds: f64,
    pub rate: u32,
    pub servers: usize,
    pub voxels_per_edit: u32,
    pub chunks: u32,
}

const CHUNK_VOXELS: u32 = 32 * 32 * 32;

/// Edit `i` of server `s`: its chunk and first voxel index. Edits walk the
/// chunks round-robin, and within a chunk take consecutive voxel runs.
fn edit_at(cfg: &PersistConfig, s: usize, i: u64) -> (ChunkKey, u32) {
    let slot = (i / u64::from(cfg.chunks)) as u32;
    (chunk_key(s, (i % u64::from(cfg.chunks)) as u32), (slot * cfg.voxels_per_edit) % CHUNK_VOXELS)
}

/// Chunk `c` of server `s`: servers far apart, chunks in a 16-wide grid.
fn chunk_key(s: usize, c: u32) -> ChunkKey {
    ChunkKey { x: s as i32 * 1000 + c as i32 % 16, y: 0, z: c as i32 / 16 }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

pub fn run(cfg: &PersistConfig) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(cfg.seconds > 0.0 && cfg.seconds <= 3600.0, "seconds must be in (0, 3600]");
    anyhow::ensure!((1..=64).contains(&cfg.servers), "servers must be 1..=64");
    anyhow::ensure!((1..=256).contains(&cfg.voxels_per_edit), "voxels per edit must be 1..=256");
    anyhow::ensure!(cfg.chunks >= 1, "chunks must be positive");
    let per_chunk = u64::from(CHUNK_VOXELS / cfg.voxels_per_edit) * u64::from(cfg.chunks);
    let per_server = (f64::from(cfg.rate) * cfg.seconds / cfg.servers as f64).ceil() as u64;
    anyhow::ensure!(
        per_server <= per_chunk,
        "{per_server} edits a server do not fit {} chunks without reusing voxels: raise --chunks",
        cfg.chunks
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut writers = Vec::new();
    for _ in 0..cfg.servers {
        let store = rt
            .block_on(persistence::open(&persistence::StoreConfig {
                url: cfg.url.clone(),
                pool_size: 4,
                ..Default::default()
            }))
            .with_context(|| format!("opening {}", persistence::redact(&cfg.url)))?;
        let ws = WorldStore::new(store, rt.handle().clone());
        let w = spawn_writer(ws.clone(), persistence::random_id())?;
        writers.push((ws, w));
    }
    let backend = writers[0].0.store.backend();

    let ticks = (cfg.seconds * 90.0).round() as u64;
    let slot = Duration::from_nanos(1_000_000_000 / 90);
    let per_tick = f64::from(cfg.rate) / 90.0 / cfg.servers as f64;
    let start = Instant::now();
    let handles: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(s, (_, w))| {
            let (w, cfg) = (w.clone(), cfg.clone());
            std::thread::spawn(move || {
                // One "tick thread": seq numbers, submit times, refusals.
                let mut submitted: Vec<Instant> = Vec::new();
                let mut latencies: Vec<f64> = Vec::new();
                let mut refused = 0u64;
                let mut carry = 0.0f64;
                let mut seen = 0u64;
                let mut i = 0u64;
                let observe = |seen: &mut u64, latencies: &mut Vec<f64>, submitted: &[Instant]| {
                    let d = w.durable_upto();
                    let now = Instant::now();
                    while *seen < d {
                        latencies.push(now.duration_since(submitted[*seen as usize]).as_secs_f64() * 1000.0);
                        *seen += 1;
                    }
                };
                for t in 0..ticks {
                    carry += per_tick;
                    let n = carry.floor() as u64;
                    carry -= n as f64;
                    let now = Instant::now();
                    let mut deltas = Vec::with_capacity((n * u64::from(cfg.voxels_per_edit)) as usize);
                    for _ in 0..n {
                        let (chunk, first) = edit_at(&cfg, s, i);
                        for k in 0..cfg.voxels_per_edit {
                            deltas.push(VoxelDelta { chunk, index: first + k, material: Material::Brick });
                        }
                        i += 1;
                    }
                    if n > 0 {
                        match w.tx.try_send(DeltaBatch { upto: i, tick: 1_000 + t, deltas }) {
                            Ok(()) => submitted.extend(std::iter::repeat_n(now, n as usize)),
                            Err(_) => {
                                // The game server refuses these edits (store_busy).
                                refused += n;
                                i -= n;
                            }
                        }
                    }
                    // Poll durability finely until the next tick's slot.
                    let next = start + slot * (t as u32 + 1);
                    loop {
                        observe(&mut seen, &mut latencies, &submitted);
                        match next.checked_duration_since(Instant::now()) {
                            Some(wait) => std::thread::sleep(wait.min(Duration::from_micros(500))),
                            None => break,
                        }
                    }
                }
                let produced_s = start.elapsed().as_secs_f64();
                let deadline = Instant::now() + Duration::from_secs(60);
                while seen < i && Instant::now() < deadline {
                    observe(&mut seen, &mut latencies, &submitted);
                    std::thread::sleep(Duration::from_micros(500));
                }
                (i, seen, refused, latencies, produced_s)
            })
        })
        .collect();
    let mut made = 0u64;
    let mut durable = 0u64;
    let mut refused = 0u64;
    let mut lat = Vec::new();
    let mut made_per_server = Vec::new();
    for h in handles {
        let (i, seen, r, l, _) = h.join().map_err(|_| anyhow::anyhow!("a producer panicked"))?;
        made += i;
        durable += seen;
        refused += r;
        lat.extend(l);
        made_per_server.push(i);
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);

    // Every acknowledged edit's voxels must be in the store.
    let mut lost = 0u64;
    let mut rows_max = 0usize;
    for (s, (ws, _)) in writers.iter().enumerate() {
        let mut present: std::collections::HashMap<ChunkKey, std::collections::HashSet<u32>> =
            std::collections::HashMap::new();
        for c in 0..cfg.chunks.min(made_per_server[s].max(1) as u32) {
            let chunk = chunk_key(s, c);
            let read = rt.block_on(ws.store.chunk_deltas(chunk))?;
            rows_max = rows_max.max(read.rows);
            present
                .insert(chunk, read.deltas.iter().filter(|d| d.material == Material::Brick).map(|d| d.index).collect());
        }
        for i in 0..made_per_server[s] {
            let (chunk, first) = edit_at(cfg, s, i);
            let set = present.get(&chunk);
            if !(0..cfg.voxels_per_edit).all(|k| set.is_some_and(|set| set.contains(&(first + k)))) {
                lost += 1;
            }
        }
    }
    let flushes: u64 = writers.iter().map(|(_, w)| w.stats.flushes.load(std::sync::atomic::Ordering::Relaxed)).sum();
    let compactions: u64 =
        writers.iter().map(|(_, w)| w.stats.compactions.load(std::sync::atomic::Ordering::Relaxed)).sum();
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    Ok(serde_json::json!({
        "backend": backend,
        "servers": cfg.servers,
        "target_edits_per_s": cfg.rate,
        "voxels_per_edit": cfg.voxels_per_edit,
        "seconds": cfg.seconds,
        "edits": made,
        "edits_durable": durable,
        "edits_per_s": r3(durable as f64 / cfg.seconds),
        "refused_store_busy": refused,
        "durable_p50_ms": r3(percentile(&lat, 50.0)),
        "durable_p99_ms": r3(percentile(&lat, 99.0)),
        "durable_max_ms": r3(lat.last().copied().unwrap_or(0.0)),
        "lost": lost,
        "flushes": flushes,
        "compactions": compactions,
        "rows_per_chunk_read_max": rows_max,
        "wall_s": r3(wall),
    }))
}
