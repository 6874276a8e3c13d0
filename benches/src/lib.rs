//! Scenarios for benchmarks: a game server's simulation, headless, with
//! players that move as VR players do and props scattered as in play.
//!
//! Used by the criterion benchmarks (`benches/`) and the `mesh-bench`
//! scenario runner. Everything is seeded: the same arguments build the same
//! world and play the same inputs.

pub mod failover;
pub mod handoff;
pub mod netcode;
pub mod persist;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Instant;

use bevy_ecs::prelude::{IntoScheduleConfigs, ResMut, Resource};
use bevy_ecs::schedule::Schedule;
use bevy_ecs::world::World;
use game_server::sim::core::{Body, Index, SimConfig, SimMetrics, snapshot_budget};
use game_server::sim::messages::{ConnTx, MapView, PeerInfo, PropSpawn, SimIn, SimOut};
use game_server::sim::physics::PropShape;
use game_server::sim::{SimParts, WorldParts, edits, schedule, step, terrain, world};
use glam::{DVec3, IVec3, Quat};
use shared::chunk::ChunkLayout;
use shared::edit::EditOp;
use shared::region::{RegionKey, RegionTree};
use shared::terrain::TerrainGen;
use shared::wire::{InputFrame, JoinRole, Pose, buttons};
use shared::{Epoch, PlayerId, ServerId, TickClock};
use tokio::sync::mpsc;

pub use shared::rng::Rng;

/// What a scenario holds.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    pub players: usize,
    pub bodies: usize,
    pub seed: u64,
    /// Generator threads (0: on the tick thread, deterministic).
    pub chunk_workers: usize,
    /// Players stand in groups of this many (villages, bases, fights).
    pub group: usize,
    /// Side of the square the groups' centres are scattered over, metres
    /// (1,700: 50 groups of 20 about 240 m apart). The world is as many
    /// 2000 m roots as it takes, all owned by this server.
    pub spread_m: f64,
    /// Threads building snapshots beside the tick thread.
    pub replication_workers: usize,
    /// Snapshots a second to each player (as the game server's
    /// `--snapshot-hz`).
    pub snapshot_hz: u32,
}

/// The spread of [`ScenarioConfig::spread_m`] that keeps the groups as
/// dense as 1,000 players in groups of 20 over 1,700 m.
pub fn spread_for(players: usize, group: usize) -> f64 {
    let groups = players.div_ceil(group.max(1)).max(1) as f64;
    1700.0 * (groups / 50.0).sqrt()
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            players: 1000,
            bodies: 5000,
            seed: 1,
            chunk_workers: 1,
            group: 20,
            spread_m: 1700.0,
            replication_workers: game_server::config::default_replication_workers(),
            snapshot_hz: game_server::config::DEFAULT_SNAPSHOT_HZ,
        }
    }
}

/// Time spent in each stage of the tick (the `SimSet`s, in order), measured
/// by marker systems the scenario adds between the stages.
#[derive(Resource, Debug, Default)]
pub struct StageTimes {
    last: Option<Instant>,
    /// Seconds per stage, summed over ticks.
    pub total: [f64; 7],
}

/// Names of the stages, in order.
pub const STAGES: [&str; 7] =
    ["ingest", "player_bodies", "physics", "world_edits", "authority", "replication", "metrics"];

fn mark<const K: usize>(mut t: ResMut<StageTimes>) {
    let now = Instant::now();
    if K > 0
        && let Some(last) = t.last
    {
        t.total[K - 1] += (now - last).as_secs_f64();
    }
    t.last = Some(now);
}

fn timed_schedule() -> Schedule {
    use game_server::sim::SimSet::*;
    let mut s = schedule();
    s.add_systems((
        mark::<0>.before(Ingest),
        mark::<1>.after(Ingest).before(PlayerBodies),
        mark::<2>.after(PlayerBodies).before(Physics),
        mark::<3>.after(Physics).before(WorldEdits),
        mark::<4>.after(WorldEdits).before(Authority),
        mark::<5>.after(Authority).before(Replication),
        mark::<6>.after(Replication).before(Metrics),
        mark::<7>.after(Metrics),
    ));
    s
}

/// What one simulated player is doing.
#[derive(Debug, Clone)]
struct Player {
    heading: f32,
    /// Ticks until the next change of mind.
    until: u32,
    walking: bool,
    seq: u32,
    look: f32,
    /// Holding the right grip for this many more ticks.
    grip: u32,
}

/// One game server's simulation, headless, with its players' input script.
pub struct Scenario {
    pub world: World,
    pub schedule: Schedule,
    pub tick: u64,
    tx: mpsc::Sender<SimIn>,
    _out: mpsc::Receiver<SimOut>,
    players: Vec<Player>,
    rng: Rng,
    stop_drain: Arc<AtomicBool>,
    pub edits_sent: u64,
    /// Props' rigid bodies, for throwing some.
    props: Vec<rapier3d::prelude::RigidBodyHandle>,
    pub throws: u64,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scenario").field("tick", &self.tick).field("players", &self.players.len()).finish()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.stop_drain.store(true, Ordering::Relaxed);
    }
}

/// The map of a one-server mesh: one 2000 m root, owned by server 1.
pub fn one_region_map() -> Arc<MapView> {
    single_server_map(1)
}

/// The map of a one-server mesh of `n` × 1 × `n` 2000 m roots, all owned by
/// server 1.
pub fn single_server_map(n: u32) -> Arc<MapView> {
    let tree = RegionTree::grid(IVec3::ZERO, n, 1, n);
    let owners = (0..n)
        .flat_map(|x| (0..n).map(move |z| (RegionKey::root(x as i32, 0, z as i32), (Some(ServerId(1)), Epoch(1)))))
        .collect();
    let peer = PeerInfo { quic: "127.0.0.1:7777".into(), grpc: String::new(), cert_sha256: String::new(), alive: true };
    Arc::new(MapView { version: 1, tree, owners, servers: HashMap::from([(ServerId(1), peer)]) })
}

impl Scenario {
    /// Builds the world, spawns the players and the props, and ticks until
    /// the terrain under everyone has loaded and the props have come to rest.
    pub fn new(c: &ScenarioConfig) -> Self {
        let layout = ChunkLayout::default();
        let roots = ((c.spread_m + 300.0) / 2000.0).ceil().max(1.0) as u32;
        let generator = Arc::new(TerrainGen::new(c.seed, layout));
        let store = game_server::store::memory_world_store(&layout);
        let writer = game_server::store::spawn_writer(store.clone(), 1).expect("writer thread starts");
        let metrics = game_server::metrics::Metrics::new();
        // Checkpointed as a server is (the tick's share of it is measured).
        let checkpoints = game_server::checkpoint::spawn_checkpoint_writer(store.clone(), metrics.clone())
            .expect("checkpoint writer starts");
        let (tx, inbox) = mpsc::channel(1 << 16);
        let (outbox, out) = mpsc::channel(1 << 12);
        let every = game_server::sim::core::snapshot_every(90, c.snapshot_hz);
        let parts = SimParts {
            config: SimConfig {
                server: ServerId(1),
                clock: TickClock::new(0),
                handoff_margin_m: 10.0,
                handoff_predict_ticks: 12,
                overlap_m: 100.0,
                walk_speed: 1.4,
                character: shared::controller::CharacterParams::default(),
                world_seed: c.seed,
                view_radius_m: 500.0,
                snapshot_budget: snapshot_budget(512, 90, every),
                snapshot_every: every,
                replication_workers: c.replication_workers,
                registry: Arc::new(shared::component::Registry::builtin()),
            },
            inbox,
            outbox,
            metrics,
            load: Arc::default(),
            map: single_server_map(roots),
            authority_log: None,
            world: WorldParts {
                generator: generator.clone(),
                store,
                writer,
                checkpoints: Some(checkpoints),
                terrain: terrain::TerrainSettings {
                    workers: c.chunk_workers,
                    integrate_per_tick: 64,
                    max_in_flight: 4096,
                    ..Default::default()
                },
                edits: edits::EditSettings::default(),
                physics_origin: DVec3::new(1000.0 * f64::from(roots), 0.0, 1000.0 * f64::from(roots)),
            },
        };
        let mut rng = Rng::new(c.seed);
        let stop_drain = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        let mut players = Vec::new();
        let mut spawns = Vec::new();
        let groups = c.players.div_ceil(c.group.max(1)).max(1);
        let centres: Vec<DVec3> = (0..groups)
            .map(|_| DVec3::new(rng.range(150.0, 150.0 + c.spread_m), 0.0, rng.range(150.0, 150.0 + c.spread_m)))
            .collect();
        for i in 0..c.players {
            let centre = centres[i % groups];
            let p = centre + DVec3::new(rng.range(-30.0, 30.0), 0.0, rng.range(-30.0, 30.0));
            let (otx, orx) = ConnTx::channel(64, 64);
            receivers.push(orx);
            tx.try_send(SimIn::Joined {
                conn: i as u64 + 1,
                player: PlayerId(i as u64 + 1),
                name: format!("bot-{i}"),
                role: JoinRole::Play,
                spawn: Some(p),
                saved: None,
                tx: otx,
            })
            .expect("inbox has room");
            spawns.push(p);
            players.push(Player {
                heading: rng.range(0.0, std::f64::consts::TAU) as f32,
                until: (rng.f64() * 300.0) as u32,
                walking: rng.f64() < 0.6,
                seq: 0,
                look: 0.0,
                grip: 0,
            });
        }
        // Outbound queues are drained elsewhere, as the network tasks would.
        {
            let stop = stop_drain.clone();
            std::thread::Builder::new()
                .name("drain".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for r in &mut receivers {
                            while r.try_recv().is_some() {}
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                })
                .expect("drain thread starts");
        }
        let mut s = Self {
            world: world(parts),
            schedule: timed_schedule(),
            tick: 1,
            tx,
            _out: out,
            players,
            rng,
            stop_drain,
            edits_sent: 0,
            props: Vec::new(),
            throws: 0,
        };
        // Props: most near players (within reach of where they play), the
        // rest scattered; dropped just above the ground to settle.
        let mut props = Vec::with_capacity(c.bodies);
        for i in 0..c.bodies {
            let near = if spawns.is_empty() || i % 4 == 3 {
                DVec3::new(s.rng.range(50.0, 1950.0), 0.0, s.rng.range(50.0, 1950.0))
            } else {
                spawns[i % spawns.len()] + DVec3::new(s.rng.range(-6.0, 6.0), 0.0, s.rng.range(-6.0, 6.0))
            };
            let shape =
                if i % 3 == 0 { PropShape::Ball { radius: 0.15 } } else { PropShape::Box { half: [0.2, 0.15, 0.25] } };
            let ground = generator.ground_height(near.x, near.z);
            props.push(PropSpawn { pos: DVec3::new(near.x, ground + 0.6, near.z), shape, vel: [0.0; 3] });
        }
        s.world.insert_resource(StageTimes::default());
        s.settle_terrain_around(&spawns, &props);
        if !props.is_empty() {
            let (reply, rx) = tokio::sync::oneshot::channel();
            s.tx.try_send(SimIn::SpawnProps { props, reply }).expect("inbox has room");
            s.step_quiet();
            rx.blocking_recv().expect("sim answered").expect("props spawn");
        }
        s.props = s.world.query::<&game_server::sim::physics::Prop>().iter(&s.world).map(|p| p.body).collect();
        // Setup integrates chunks as fast as they come; play uses the default.
        s.world.resource_mut::<terrain::Terrain>().settings.integrate_per_tick =
            terrain::TerrainSettings::default().integrate_per_tick;
        // Let the props land and fall asleep.
        for _i in 0..(5 * 90) {
            s.step_quiet();
            if s.awake() * 50 < c.bodies.max(1) {
                break;
            }
        }
        s
    }

    /// Ticks until chunks under the players and the props are loaded.
    fn settle_terrain_around(&mut self, players: &[DVec3], props: &[PropSpawn]) {
        let generator = self.world.resource::<terrain::Terrain>().generator.clone();
        let mut points: Vec<DVec3> =
            players.iter().map(|p| DVec3::new(p.x, generator.ground_height(p.x, p.z), p.z)).collect();
        points.extend(props.iter().map(|p| p.pos));
        // Generation runs on its own threads: wait in wall-clock time.
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while Instant::now() < deadline {
            let tick = self.tick;
            let mut t = self.world.resource_mut::<terrain::Terrain>();
            for p in &points {
                t.want_around(*p, 2.0, tick);
            }
            let t = self.world.resource::<terrain::Terrain>();
            if points.iter().all(|p| t.box_loaded(*p - DVec3::splat(2.0), *p + DVec3::splat(2.0))) {
                break;
            }
            self.step_quiet();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn step_quiet(&mut self) {
        self.tick += 1;
        step(&mut self.world, &mut self.schedule, self.tick, 1);
    }

    /// Dynamic bodies awake.
    pub fn awake(&self) -> usize {
        let p = self.world.resource::<game_server::sim::physics::Physics>();
        p.world.active_bodies().filter(|(_, b)| b.is_dynamic()).count()
    }

    /// Kinematic bodies: hands near props, held props.
    pub fn kinematic(&self) -> usize {
        let p = self.world.resource::<game_server::sim::physics::Physics>();
        p.world.rigid_bodies().filter(|(_, b)| b.is_kinematic()).count()
    }

    /// Queues this tick's inputs (and the odd edit) for every player, and
    /// throws a prop ten times a second (at 6 m/s, up and away), as players
    /// around the world would.
    pub fn script(&mut self) {
        if !self.props.is_empty() && self.tick.is_multiple_of(9) {
            {
                let h = self.props[(self.rng.next_u64() % self.props.len() as u64) as usize];
                let a = self.rng.range(0.0, std::f64::consts::TAU) as f32;
                let v = glam::Vec3::new(a.sin() * 6.0, 4.0, a.cos() * 6.0);
                let mut physics = self.world.resource_mut::<game_server::sim::physics::Physics>();
                if let Some(rb) = physics.world.bodies.get_mut(h)
                    && rb.is_dynamic()
                {
                    rb.set_linvel(v, true);
                    rb.enable_ccd(true);
                    self.throws += 1;
                }
            }
        }
        let dig_every = 90 * 100; // each player digs about once every 100 s
        for i in 0..self.players.len() {
            let rng = &mut self.rng;
            let p = &mut self.players[i];
            if p.until == 0 {
                p.walking = rng.f64() < 0.6;
                p.heading = rng.range(0.0, std::f64::consts::TAU) as f32;
                p.until = 90 + (rng.f64() * 450.0) as u32;
                if rng.f64() < 0.2 {
                    p.grip = 60 + (rng.f64() * 120.0) as u32;
                }
            }
            p.until -= 1;
            p.seq += 1;
            p.look += 0.02;
            let grip = p.grip > 0;
            p.grip = p.grip.saturating_sub(1);
            let swing = (p.look * 3.0).sin() * 0.3;
            let head_rot =
                Quat::from_rotation_y(p.look.sin() * 0.8) * Quat::from_rotation_x((p.look * 0.7).sin() * 0.3);
            let frame = InputFrame {
                seq: p.seq,
                ack_tick: self.tick,
                head: Pose { pos: [0.0, 1.7, 0.0], rot: head_rot.to_array() },
                left: Pose { pos: [-0.25, 1.2, -0.3 - swing], rot: [0.0, 0.0, 0.0, 1.0] },
                right: Pose { pos: [0.25, 1.2, -0.3 + swing], rot: [0.0, 0.0, 0.0, 1.0] },
                locomotion: if p.walking { [p.heading.sin(), p.heading.cos()] } else { [0.0, 0.0] },
                turn: 0.0,
                buttons: if grip { buttons::GRIP_RIGHT } else { 0 },
            };
            let conn = i as u64 + 1;
            let _ = self.tx.try_send(SimIn::Input { conn, frame });
            if (self.tick + i as u64 * 7919).is_multiple_of(dig_every) {
                self.edits_sent += 1;
                let _ = self.tx.try_send(SimIn::Edit {
                    conn,
                    id: p.seq,
                    op: EditOp::Dig { center: self.avatar_pos(i) + DVec3::new(0.0, -0.5, -1.5), radius: 1.2 },
                });
            }
        }
    }

    fn avatar_pos(&self, i: usize) -> DVec3 {
        let index = self.world.resource::<Index>();
        index
            .by_player
            .get(&PlayerId(i as u64 + 1))
            .and_then(|e| self.world.get::<Body>(*e))
            .map_or(DVec3::ZERO, |b| b.pos)
    }

    /// Scripts and runs one tick; returns how long the tick took (the
    /// simulation only: scripting the inputs is the network's work).
    pub fn tick(&mut self) -> std::time::Duration {
        self.script();
        self.tick += 1;
        let t0 = std::time::Instant::now();
        step(&mut self.world, &mut self.schedule, self.tick, 1);
        t0.elapsed()
    }

    /// Stage times so far, and resets them.
    pub fn take_stage_times(&mut self) -> [f64; 7] {
        std::mem::take(&mut self.world.resource_mut::<StageTimes>().total)
    }

    pub fn metrics(&self) -> game_server::metrics::Metrics {
        self.world.resource::<SimMetrics>().0.clone()
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}
