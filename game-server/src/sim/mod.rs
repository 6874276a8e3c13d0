//! The 90 Hz simulation: a bevy_ecs world ticked on its own thread, on the
//! mesh-wide tick grid.
//!
//! The tick thread never awaits and never blocks on I/O: it drains its inbox
//! with `try_recv` at the start of a tick and hands everything it produces to
//! bounded channels with `try_send` (a full channel drops and counts).

pub mod authority;
pub mod checkpoints;
#[cfg(test)]
mod component_tests;
pub mod core;
pub mod edits;
#[cfg(test)]
mod ghost_tests;
pub mod ghosts;
pub mod inbox;
pub mod ingest;
pub mod interact;
#[cfg(test)]
mod interact_tests;
#[cfg(test)]
mod mesh_tests;
pub mod messages;
pub mod physics;
pub mod players;
pub mod replication;
pub mod terrain;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod world_tests;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bevy_ecs::prelude::{IntoScheduleConfigs, Schedule, SystemSet, World};
use bevy_ecs::schedule::ScheduleLabel;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::core::*;
use authority::AuthorityLog;
use messages::{MapView, SimIn, SimOut};

use crate::metrics::Metrics;
use crate::sim::authority::PendingAdoptions;
use crate::sim::inbox::{Conns, Inbox, Outbox};
use crate::sim::players::StandbyInputs;

/// The stages of a tick, in order.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimSet {
    /// Drain the inbox: joins, inputs, map updates, handoffs; integrate
    /// finished terrain chunks.
    Ingest,
    /// Apply inputs to player bodies.
    PlayerBodies,
    /// Hands, then the rigid-body step.
    Physics,
    /// Dig and build; colliders follow in the same tick.
    WorldEdits,
    /// Boundary checks, transfer requests, releases.
    Authority,
    /// Snapshots to players, then the releases `Authority` decided (after
    /// the snapshot of the last tick simulated here), then overlap sync.
    Replication,
    /// Gauges and load figures.
    Metrics,
}

#[derive(ScheduleLabel, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tick;

/// Builds the schedule of one tick.
pub fn schedule() -> Schedule {
    let mut s = Schedule::new(Tick);
    s.configure_sets(
        (
            SimSet::Ingest,
            SimSet::PlayerBodies,
            SimSet::Physics,
            SimSet::WorldEdits,
            SimSet::Authority,
            SimSet::Replication,
            SimSet::Metrics,
        )
            .chain(),
    );
    s.add_systems((
        (ingest::ingest, ghosts::expire, terrain::stream).chain().in_set(SimSet::Ingest),
        players::player_bodies.in_set(SimSet::PlayerBodies),
        (physics::hands, interact::reach, physics::step).chain().in_set(SimSet::Physics),
        edits::world_edits.in_set(SimSet::WorldEdits),
        (authority::log_authority, authority::authority).chain().in_set(SimSet::Authority),
        ((replication::replication, authority::release_due, ghosts::sync_out).chain(), replication::chunk_edits)
            .in_set(SimSet::Replication),
        (replication::report, checkpoints::offer).in_set(SimSet::Metrics),
    ));
    s
}

/// Everything the tick thread is made of, before it starts.
#[derive(Debug)]
pub struct SimParts {
    pub config: SimConfig,
    pub inbox: mpsc::Receiver<SimIn>,
    pub outbox: mpsc::Sender<SimOut>,
    pub metrics: Metrics,
    pub load: Arc<LoadShared>,
    pub map: Arc<MapView>,
    pub authority_log: Option<std::sync::mpsc::SyncSender<String>>,
    pub world: WorldParts,
}

/// The world a simulation starts from: terrain, where edits go, knobs.
#[derive(Debug, Clone)]
pub struct WorldParts {
    pub generator: Arc<shared::terrain::TerrainGen>,
    pub store: crate::store::WorldStore,
    pub writer: crate::store::WriterHandle,
    /// The checkpoint writer (`None`: this world is not checkpointed).
    pub checkpoints: Option<crate::checkpoint::CheckpointHandle>,
    pub terrain: terrain::TerrainSettings,
    pub edits: edits::EditSettings,
    /// Origin of the physics world's `f32` coordinates.
    pub physics_origin: glam::DVec3,
}

/// A world with every resource the systems need.
pub fn world(p: SimParts) -> World {
    let mut w = World::new();
    let ids = shared::ids::EntityIdAllocator::new(p.config.server).ok();
    w.insert_resource(players::Progression(p.world.store.clone()));
    w.insert_resource(terrain::Terrain::new(p.world.generator, p.world.store, p.world.terrain));
    w.insert_resource(physics::Physics::new(p.world.physics_origin));
    w.insert_resource(edits::Edits::new(p.world.edits, p.world.writer, ids));
    w.insert_resource(checkpoints::Checkpoints(p.world.checkpoints));
    let pool = replication::ReplicationPool::new(p.config.replication_workers).unwrap_or_else(|e| {
        warn!(error = %e, "no replication threads; the tick thread builds every snapshot");
        replication::ReplicationPool::default()
    });
    w.insert_resource(pool);
    w.insert_resource(p.config);
    w.insert_resource(TickState::default());
    w.insert_resource(Inbox(p.inbox));
    w.insert_resource(Outbox(p.outbox));
    w.insert_resource(SimMetrics(p.metrics));
    w.insert_resource(Load(p.load));
    w.insert_resource(Map(p.map));
    w.insert_resource(Conns::default());
    w.insert_resource(StandbyInputs::default());
    w.insert_resource(PendingAdoptions::default());
    w.insert_resource(Index::default());
    w.insert_resource(ghosts::Ghosts::default());
    w.insert_resource(authority::Released::default());
    w.insert_resource(authority::DueReleases::default());
    w.insert_resource(authority::ResolvedOrphans::default());
    w.insert_resource(authority::PeerSchemas::default());
    w.insert_resource(AuthorityLog { tx: p.authority_log, ..Default::default() });
    w.insert_resource(TickTimes::default());
    w.insert_resource(authority::OpenFaces::default());
    w
}

/// Runs one tick: sets the tick number and its length, runs the schedule.
pub fn step(world: &mut World, schedule: &mut Schedule, tick: u64, ticks_elapsed: u64) {
    let hz = world.resource::<SimConfig>().clock.hz as f32;
    *world.resource_mut::<TickState>() = TickState { tick, dt: ticks_elapsed.clamp(1, 10) as f32 / hz };
    schedule.run(world);
}

/// Starts the tick thread. It runs until `stop` is set.
pub fn spawn(parts: SimParts, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("tick".into()).spawn(move || run(parts, &stop)).context("starting the tick thread")
}

fn run(parts: SimParts, stop: &AtomicBool) {
    let clock = parts.config.clock;
    let metrics = parts.metrics.clone();
    let load = parts.load.clone();
    let mut world = world(parts);
    let mut schedule = schedule();
    let mut times: std::collections::VecDeque<u32> = std::collections::VecDeque::with_capacity(1024);
    let mut tick = clock.tick_at(svc::unix_nanos()) + 1;
    let mut last = tick - 1;
    let (mut window_start, mut window_ticks, mut physics_seen) = (Instant::now(), 0u32, (0.0f64, 0u64));
    info!(first_tick = tick, hz = clock.hz, "tick thread started");
    while !stop.load(Ordering::Relaxed) {
        // Wait for the start of this tick's slot on the mesh grid.
        let start = clock.tick_start(tick);
        let now = svc::unix_nanos();
        if start > now {
            std::thread::sleep(Duration::from_nanos(start - now));
        }
        let t0 = Instant::now();
        step(&mut world, &mut schedule, tick, tick - last);
        let took = t0.elapsed();
        metrics.tick_duration.observe(took.as_secs_f64());
        metrics.ticks.inc();
        window_ticks += 1;
        if times.len() == 900 {
            times.pop_front();
        }
        times.push_back(took.as_micros().min(u128::from(u32::MAX)) as u32);
        if tick.is_multiple_of(90) {
            let now = Instant::now();
            let secs = now.duration_since(window_start).as_secs_f64();
            if secs > 0.0 {
                metrics.fps_avg.set(f64::from(window_ticks) / secs);
            }
            let (sum, n) = (metrics.physics_step.get_sample_sum(), metrics.physics_step.get_sample_count());
            if n > physics_seen.1 {
                metrics.physics_step_mean.set((sum - physics_seen.0) / (n - physics_seen.1) as f64);
            }
            physics_seen = (sum, n);
            window_start = now;
            window_ticks = 0;
            let mut sorted: Vec<u32> = times.iter().copied().collect();
            sorted.sort_unstable();
            let p99 = sorted.get(sorted.len() * 99 / 100).copied().unwrap_or(0);
            load.tick_p99_us.store(p99, Ordering::Relaxed);
        }
        last = tick;
        // Next tick: the following one, or, after an overrun, the tick whose
        // slot is in progress now. Missed slots are skipped, never replayed.
        let now = svc::unix_nanos();
        let current = clock.tick_at(now);
        if current > tick {
            metrics.ticks_overrun.inc();
            load.ticks_overrun.fetch_add(1, Ordering::Relaxed);
            let skipped = current - tick - 1;
            if skipped > 0 {
                metrics.ticks_skipped.inc_by(skipped);
                warn!(tick, skipped, took_us = took.as_micros() as u64, "tick overran its slot");
            }
            // The slot of `current` is in progress: run it at once, late.
            tick = current;
        } else {
            tick += 1;
        }
    }
    edits::hand_over_backlog(&mut world);
    players::save_all_progress(&mut world);
    info!(last_tick = last, "tick thread stopped");
}

/// Starts the thread that appends authority lines to `path`.
pub fn authority_log_writer(path: &Path) -> anyhow::Result<std::sync::mpsc::SyncSender<String>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the authority log {}", path.display()))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1 << 16);
    std::thread::Builder::new()
        .name("authority-log".into())
        .spawn(move || {
            let mut w = std::io::BufWriter::new(file);
            while let Ok(line) = rx.recv() {
                let mut ok = writeln!(w, "{line}").is_ok();
                while let Ok(more) = rx.try_recv() {
                    ok &= writeln!(w, "{more}").is_ok();
                }
                // Idle: flush so readers see whole lines.
                if !(ok && w.flush().is_ok()) {
                    break;
                }
            }
        })
        .context("starting the authority log writer")?;
    Ok(tx)
}
