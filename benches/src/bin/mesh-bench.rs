//! Scenario runner: prints one JSON object of figures per run.
//!
//! `mesh-bench sim --players 1000 --bodies 5000 --seconds 20` runs one game
//! server's simulation at 90 Hz (paced like the real tick loop) with players
//! wandering, looking around, grabbing and digging, and props scattered as
//! in play, and reports tick-time percentiles.

use std::time::{Duration, Instant};

use benches::{Scenario, ScenarioConfig, percentile};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Scenario benchmarks of the mesh; each prints one JSON object")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One game server's simulation at 90 Hz.
    Sim {
        #[arg(long, default_value_t = 1000)]
        players: usize,
        #[arg(long, default_value_t = 5000)]
        bodies: usize,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Terrain generator threads.
        #[arg(long, default_value_t = 1)]
        chunk_workers: usize,
        /// Run ticks back to back instead of on the 90 Hz grid.
        #[arg(long)]
        unpaced: bool,
        /// Side of the square the groups of players are scattered over,
        /// metres (default: as dense as 1,000 players over 1,700 m).
        #[arg(long)]
        spread_m: Option<f64>,
        /// Threads building snapshots beside the tick thread (default: one
        /// less than the cores, as the game server's).
        #[arg(long)]
        replication_workers: Option<usize>,
        /// Snapshots a second to each player (as the game server's).
        #[arg(long, default_value_t = game_server::config::DEFAULT_SNAPSHOT_HZ)]
        snapshot_hz: u32,
    },
    /// `sim` at several sizes, each in its own process, with five bodies a
    /// player and the groups equally dense at every size: tick percentiles
    /// and each stage's mean cost per player, and the memory a player costs.
    SimScale {
        /// Player counts to run (0 gives the memory baseline).
        #[arg(long, value_delimiter = ',', default_value = "0,50,250,500,1000,2000")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        bodies_per_player: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Passed on to each `sim`.
        #[arg(long)]
        replication_workers: Option<usize>,
        /// Passed on to each `sim`.
        #[arg(long, default_value_t = game_server::config::DEFAULT_SNAPSHOT_HZ)]
        snapshot_hz: u32,
    },
    /// Three coordinator replicas; the leader killed (SIGKILL) and restarted
    /// again and again.
    Failover {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Game servers heartbeating through the failovers.
        #[arg(long, default_value_t = 2)]
        servers: usize,
        /// Steady-state writes timed for the commit latency.
        #[arg(long, default_value_t = 200)]
        writes: usize,
    },
    /// One game server and `visible + 1` bots crowding one spot: bandwidth
    /// per player at the UDP socket and the snapshot encoding time.
    Netcode {
        /// Avatars each player sees.
        #[arg(long, default_value_t = 50)]
        visible: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// The server's per-player downstream budget, kbit/s.
        #[arg(long, default_value_t = 512)]
        bandwidth_kbps: u32,
    },
    /// Three coordinators and four game servers on a 2 × 2 grid, bots
    /// oscillating across, commuting over and throwing props over the
    /// region faces: handoff count, latency and the authority invariants.
    Handoff {
        #[arg(long, default_value_t = 200)]
        bots: u32,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "oscillate=6,commute=1,throw_over=3")]
        mix: String,
    },
    /// World edits from game-server writers to the store.
    Persist {
        /// `postgres://…`, `sqlite:PATH` or `memory:`.
        #[arg(long, env = "PS_DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Edits a second, all servers together.
        #[arg(long, default_value_t = 20_000)]
        rate: u32,
        /// Game servers (each its own writer thread and connection pool).
        #[arg(long, default_value_t = 4)]
        servers: usize,
        /// Voxels one edit changes.
        #[arg(long, default_value_t = 8)]
        voxels_per_edit: u32,
        /// Chunks each server's edits spread over.
        #[arg(long, default_value_t = 256)]
        chunks: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Handoff { bots, seconds, seed, mix } => {
            println!("{}", benches::handoff::run(&benches::handoff::HandoffConfig { bots, seconds, seed, mix })?);
        }
        Cmd::Netcode { visible, seconds, bandwidth_kbps } => {
            println!(
                "{}",
                benches::netcode::run(&benches::netcode::NetcodeConfig { visible, seconds, bandwidth_kbps })?
            );
        }
        Cmd::Failover { kills, servers, writes } => {
            println!("{}", benches::failover::run(&benches::failover::FailoverConfig { kills, servers, writes })?);
        }
        Cmd::Persist { database_url, seconds, rate, servers, voxels_per_edit, chunks } => {
            let cfg =
                benches::persist::PersistConfig { url: database_url, seconds, rate, servers, voxels_per_edit, chunks };
            println!("{}", benches::persist::run(&cfg)?);
        }
        Cmd::SimScale { sizes, bodies_per_player, seconds, seed, replication_workers, snapshot_hz } => {
            println!("{}", sim_scale(&sizes, bodies_per_player, seconds, seed, replication_workers, snapshot_hz)?);
        }
        Cmd::Sim {
            players,
            bodies,
            seconds,
            seed,
            chunk_workers,
            unpaced,
            spread_m,
            replication_workers,
            snapshot_hz,
        } => {
            anyhow::ensure!(
                (game_server::config::MIN_SNAPSHOT_HZ..=90).contains(&snapshot_hz),
                "snapshot-hz must be {}..=90",
                game_server::config::MIN_SNAPSHOT_HZ
            );
            anyhow::ensure!(seconds > 0.0 && seconds <= 3600.0, "seconds must be in (0, 3600]");
            let setup = Instant::now();
            let group = ScenarioConfig::default().group;
            let spread_m = spread_m.unwrap_or_else(|| benches::spread_for(players, group));
            anyhow::ensure!(spread_m > 0.0 && spread_m <= 20_000.0, "spread-m must be in (0, 20000]");
            let replication_workers =
                replication_workers.unwrap_or_else(game_server::config::default_replication_workers);
            anyhow::ensure!(replication_workers <= 64, "replication-workers must be 0..=64");
            let mut s = Scenario::new(&ScenarioConfig {
                players,
                bodies,
                seed,
                chunk_workers,
                group,
                spread_m,
                replication_workers,
                snapshot_hz,
            });
            let setup_s = setup.elapsed().as_secs_f64();
            let m0 = s.metrics();
            let (phys_sum0, phys_n0) = (m0.physics_step.get_sample_sum(), m0.physics_step.get_sample_count());
            let replication_cpu0 = m0.replication_cpu.get();
            // What snapshots are made of, as the server's metrics count it.
            let snapshot_counts = |m: &game_server::metrics::Metrics| {
                let [new, delta, resent, removed] = m.snapshot_record_kinds.each_ref().map(|c| c.get());
                let records = shared::snapshot::held::RecordCounts {
                    new,
                    delta,
                    resent,
                    removed,
                    component_bytes: m.snapshot_component_bytes.get(),
                    unbased: m.snapshots_unbased.get(),
                };
                (records, m.snapshots_sent.get(), m.bytes_sent.get())
            };
            let counts0 = snapshot_counts(&m0);
            let ticks = (seconds * 90.0).round() as usize;
            let slot = Duration::from_nanos(1_000_000_000 / 90);
            let mut times = Vec::with_capacity(ticks);
            let mut overruns = 0u64;
            let mut awake = 0usize;
            let mut kinematic = 0usize;
            // Checkpoints: the oldest state a write carried when it landed.
            let mut checkpoint_lag_max = 0.0f64;
            let checkpoints0 = m0.checkpoint_rows.with_label_values(&["written"]).get();
            let mut stage_sum = [0.0f64; 7];
            let mut worst = (0.0f64, [0.0f64; 7]);
            s.take_stage_times();
            let start = Instant::now();
            for i in 0..ticks {
                let took = s.tick();
                let st = s.take_stage_times();
                for (k, v) in st.iter().enumerate() {
                    stage_sum[k] += v;
                }
                if took.as_secs_f64() > worst.0 {
                    worst = (took.as_secs_f64(), st);
                }
                if took > slot {
                    overruns += 1;
                }
                times.push(took.as_secs_f64() * 1000.0);
                if i % 90 == 0 {
                    awake = awake.max(s.awake());
                    kinematic = kinematic.max(s.kinematic());
                    checkpoint_lag_max = checkpoint_lag_max.max(s.metrics().checkpoint_lag.get());
                }
                if !unpaced {
                    let next = start + slot * (i as u32 + 1);
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            let wall = start.elapsed().as_secs_f64();
            let m = s.metrics();
            let phys_n = m.physics_step.get_sample_count() - phys_n0;
            let phys_mean_ms =
                if phys_n > 0 { (m.physics_step.get_sample_sum() - phys_sum0) / phys_n as f64 * 1000.0 } else { 0.0 };
            let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let rejected: u64 = m.edits_rejected.with_label_values(&["out_of_reach"]).get()
                + m.edits_rejected.with_label_values(&["not_loaded"]).get()
                + m.edits_rejected.with_label_values(&["rate_limited"]).get();
            let stage_ms: serde_json::Map<String, serde_json::Value> = benches::STAGES
                .iter()
                .zip(stage_sum)
                .map(|(name, t)| ((*name).to_owned(), round3(t / ticks.max(1) as f64 * 1000.0).into()))
                .collect();
            let worst_ms: serde_json::Map<String, serde_json::Value> = benches::STAGES
                .iter()
                .zip(worst.1)
                .map(|(name, t)| ((*name).to_owned(), round3(t * 1000.0).into()))
                .collect();
            // CPU time, all threads: what the stage costs whatever else the host runs.
            let replication_cpu_ms = (m.replication_cpu.get() - replication_cpu0) / ticks.max(1) as f64 * 1000.0;
            // What the snapshots were made of, a snapshot on average.
            let (records, sent, bytes) = snapshot_counts(&m);
            let (records, sent, bytes) = (records.since(&counts0.0), sent - counts0.1, bytes - counts0.2);
            let per_snapshot = |n: u64| round3(n as f64 / sent.max(1) as f64);
            let snapshots = serde_json::json!({
                "sent": sent,
                "bytes": per_snapshot(bytes),
                "component_bytes": per_snapshot(records.component_bytes),
                "records": {
                    "new": per_snapshot(records.new),
                    "delta": per_snapshot(records.delta),
                    "resent": per_snapshot(records.resent),
                    "removed": per_snapshot(records.removed),
                },
                "unbased": records.unbased,
            });
            let out = serde_json::json!({
                "stage_mean_ms": stage_ms,
                "replication_cpu_ms": round3(replication_cpu_ms),
                "snapshots": snapshots,
                "checkpoints": {
                    "rows_written_per_s": round3(
                        (m.checkpoint_rows.with_label_values(&["written"]).get() - checkpoints0) as f64 / wall
                    ),
                    "lag_ms_max": round3(checkpoint_lag_max * 1000.0),
                    "refused": m.checkpoint_rows.with_label_values(&["refused_stale"]).get(),
                    "write_failures": m.checkpoint_write_failures.get(),
                },
                "slowest_tick_stages_ms": worst_ms,
                "players": players,
                "bodies": bodies,
                "ticks": ticks,
                "tick_p50_ms": round3(percentile(&sorted, 50.0)),
                "tick_p99_ms": round3(percentile(&sorted, 99.0)),
                "tick_max_ms": round3(sorted.last().copied().unwrap_or(0.0)),
                "tick_mean_ms": round3(mean),
                "overruns": overruns,
                "physics_step_mean_ms": round3(phys_mean_ms),
                "props_awake_max": awake,
                "kinematic_bodies_max": kinematic,
                "chunks_loaded": m.terrain_chunks_loaded.get(),
                "active_players": m.active_players.get(),
                "edits_sent": s.edits_sent,
                "props_thrown": s.throws,
                "edits_applied": m.edits_applied.get(),
                "edits_rejected": rejected,
                "grabs": m.grabs.get(),
                "releases": m.throws.get(),
                "setup_s": round3(setup_s),
                "wall_s": round3(wall),
                "paced": !unpaced,
                "spread_m": round3(spread_m),
                "replication_workers": replication_workers,
                "snapshot_hz": 90 / game_server::sim::core::snapshot_every(90, snapshot_hz),
                "peak_rss_mb": round3(svc::usage()?.max_rss_kib as f64 / 1024.0),
            });
            println!("{out}");
        }
    }
    Ok(())
}

/// Runs `sim` once per size, each in a child process (so that each peak
/// memory is its own), and gathers the figures per player.
fn sim_scale(
    sizes: &[usize],
    per_player: usize,
    seconds: f64,
    seed: u64,
    workers: Option<usize>,
    snapshot_hz: u32,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    anyhow::ensure!(!sizes.is_empty() && sizes.iter().all(|n| *n <= 10_000), "sizes must be 0..=10000");
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    let mut rss_at = std::collections::BTreeMap::new();
    for &players in sizes {
        let out = std::process::Command::new(&exe)
            .args(["sim", "--players", &players.to_string(), "--bodies", &(players * per_player).to_string()])
            .args(["--seconds", &seconds.to_string(), "--seed", &seed.to_string()])
            .args(workers.map(|w| format!("--replication-workers={w}")))
            .arg(format!("--snapshot-hz={snapshot_hz}"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running mesh-bench sim")?;
        anyhow::ensure!(out.status.success(), "mesh-bench sim --players {players} failed: {}", out.status);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading sim's JSON")?;
        let rss = v["peak_rss_mb"].as_f64().unwrap_or(0.0);
        rss_at.insert(players, rss);
        // Per player: none for the empty server.
        let per: serde_json::Map<String, serde_json::Value> = v["stage_mean_ms"]
            .as_object()
            .filter(|_| players > 0)
            .map(|m| {
                m.iter()
                    .map(|(k, ms)| {
                        let us = ms.as_f64().unwrap_or(0.0) * 1000.0 / players as f64;
                        (k.clone(), round3(us).into())
                    })
                    .collect()
            })
            .unwrap_or_default();
        runs.push(serde_json::json!({
            "players": players,
            "bodies": players * per_player,
            "tick_p50_ms": v["tick_p50_ms"],
            "tick_p99_ms": v["tick_p99_ms"],
            "overruns": v["overruns"],
            "ticks": v["ticks"],
            "stage_mean_ms": v["stage_mean_ms"],
            "stage_us_per_player": per,
            "replication_cpu_us_per_player": v["replication_cpu_ms"].as_f64().filter(|_| players > 0).map(|ms| round3(ms * 1000.0 / players as f64)),
            "peak_rss_mb": rss,
        }));
    }
    // Memory a player costs (five bodies each included): peak RSS at 1,000
    // (or the largest size) less the empty server's.
    let per_player_kb = rss_at.get(&0).and_then(|base| {
        let (&n, &rss) = rss_at.get_key_value(&1000).or_else(|| rss_at.iter().next_back().filter(|(n, _)| **n >= 1))?;
        Some(round3((rss - base) * 1024.0 / n as f64))
    });
    Ok(serde_json::json!({ "sizes": runs, "rss_kb_per_player": per_player_kb }))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
