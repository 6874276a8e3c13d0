//! Replication: each player's snapshot (interest, priority, the byte
//! budget, the delta codec), the player edits streamed to it, and the load
//! the heartbeat reports.

use bevy_ecs::prelude::*;
use glam::{DVec3, Quat};
use shared::EntityId;
use shared::chunk::floor_i32;
use shared::snapshot::{self, QEntity, held};
use shared::wire::{EntityState, ServerControl};

use super::authority::Authority;
use super::core::*;
use super::messages::Outbound;
use crate::sim::inbox::Conns;
use crate::sim::inbox::send;

/// Edge of the cells replication buckets entities in, metres (doubled
/// while the entities' bounding square would need more than
/// [`MAX_GRID_CELLS`]).
pub(crate) const GRID_CELL_M: f64 = 32.0;
/// Most cells of the grid (4 MiB of offsets).
const MAX_GRID_CELLS: usize = 1 << 20;

/// What replication reads of an entity.
type Replicated = (
    &'static NetId,
    Ref<'static, Body>,
    Option<&'static Avatar>,
    Option<Ref<'static, super::physics::Prop>>,
    Option<Ref<'static, Components>>,
);

/// What every player's snapshot is built from this tick, shared read-only
/// by the workers. An entity keeps its slot (its index in the arrays) from
/// tick to tick while it is here, so a link finds its candidates by index
/// and remembers what a client holds as a slot and a tick
/// ([`held::Held`]): the states themselves are kept once, here, for the
/// last [`RING_TICKS`] ticks.
#[derive(Debug)]
struct Frame {
    tick: shared::Tick,
    /// The tick of the frame before this one: the tick before, unless
    /// ticks were skipped under load. An entity in the same slot then is
    /// still there, and what changed is told by the ECS's change detection
    /// since then.
    prev: shared::Tick,
    states: Vec<EntityState>,
    /// What every snapshot reads of each slot, in half a cache line.
    hot: Vec<Slot>,
    /// The wire's state of every slot at each of the last [`RING_TICKS`]
    /// ticks (tick modulo its length), with that tick's low 32 bits.
    ring: Vec<(u32, Vec<QEntity>)>,
    /// The components clients may see of each slot's entity, refilled
    /// when they change or another entity takes the slot.
    comps: Vec<snapshot::WireComponents>,
    /// Each slot's `comps[slot].cost()`, kept densely: read for every
    /// candidate costed.
    costs: Vec<snapshot::BlockCost>,
    /// Whether `comps[slot]` holds any.
    has_comps: Vec<bool>,
    /// Slots filled this tick.
    live: Vec<u32>,
    slot: rustc_hash::FxHashMap<EntityId, u32>,
    free: Vec<u32>,
    grid: Grid,
}

/// Ticks of entity states the frame keeps (0.7 s): a client holding an
/// older state of a changed entity is sent it whole. At 90 snapshots a
/// second the accumulator sends every changed entity within 45 ticks;
/// `--snapshot-hz` is at least 10 (a snapshot every 9 ticks).
pub(crate) const RING_TICKS: usize = 64;

/// The state of a slot never filled at a tick of the ring (no entity has
/// id 0, and a held state is looked up by slot, tick and id).
const NO_STATE: QEntity = QEntity { id: EntityId(0), pos: [0; 3], rot: 0, vel: [0; 3], authority: shared::ServerId(0) };

impl Default for Frame {
    fn default() -> Self {
        Self {
            tick: 0,
            prev: shared::Tick::MAX,
            states: Vec::new(),
            hot: Vec::new(),
            ring: vec![(u32::MAX, Vec::new()); RING_TICKS],
            comps: Vec::new(),
            costs: Vec::new(),
            has_comps: Vec::new(),
            live: Vec::new(),
            slot: rustc_hash::FxHashMap::default(),
            free: Vec::new(),
            grid: Grid::default(),
        }
    }
}

/// What a snapshot reads of every candidate, in half a cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct Slot {
    id: EntityId,
    /// The tick (its low 32 bits) the slot was last filled: a slot not
    /// filled this tick is free.
    filled: u32,
    /// The tick (low 32 bits) its wire state last changed, or its entity
    /// came to the slot.
    changed: u32,
    pos: glam::Vec3,
    /// Metres a second.
    speed: f32,
}
const _: () = assert!(std::mem::size_of::<Slot>() == 32);

/// The entities bucketed by square cells over their bounding square, in
/// one array (a cell's entities are contiguous): looking a cell up is an
/// index, not a hash.
#[derive(Debug, Default)]
struct Grid {
    cell_m: f64,
    /// The cell at the grid's (0, 0).
    origin: (i32, i32),
    width: usize,
    height: usize,
    /// Where each cell's entities start in `members` (one more entry than
    /// cells: the end).
    start: Vec<u32>,
    members: Vec<u32>,
    /// Each entity's cell, while building.
    cell: Vec<u32>,
}

impl Grid {
    fn cell_at(&self, p: DVec3) -> (i32, i32) {
        (floor_i32(p.x / self.cell_m), floor_i32(p.z / self.cell_m))
    }

    /// Buckets the `live` slots of `states` (a counting sort by cell).
    fn build(&mut self, states: &[EntityState], live: &[u32]) {
        self.cell_m = GRID_CELL_M;
        self.members.clear();
        self.cell.clear();
        let (mut lo, mut hi) = ((i32::MAX, i32::MAX), (i32::MIN, i32::MIN));
        for &i in live {
            let (x, z) = cell_of(states[i as usize].pos);
            lo = (lo.0.min(x), lo.1.min(z));
            hi = (hi.0.max(x), hi.1.max(z));
        }
        if live.is_empty() {
            (lo, hi) = ((0, 0), (0, 0));
        }
        // Cells in the bounding square, at this cell size.
        let span = |lo: i32, hi: i32, k: i64| ((i64::from(hi) - i64::from(lo)) / k + 1) as usize;
        let mut k = 1i64;
        while span(lo.0, hi.0, k).saturating_mul(span(lo.1, hi.1, k)) > MAX_GRID_CELLS {
            k *= 2;
            self.cell_m *= 2.0;
        }
        self.origin = (lo.0.div_euclid(k as i32), lo.1.div_euclid(k as i32));
        let far = (hi.0.div_euclid(k as i32), hi.1.div_euclid(k as i32));
        self.width = (far.0 - self.origin.0) as usize + 1;
        self.height = (far.1 - self.origin.1) as usize + 1;
        let cells = self.width * self.height;
        self.start.clear();
        self.start.resize(cells + 1, 0);
        for &i in live {
            let (x, z) = self.cell_at(states[i as usize].pos);
            let c = (z - self.origin.1) as usize * self.width + (x - self.origin.0) as usize;
            self.cell.push(c as u32);
            self.start[c + 1] += 1;
        }
        for c in 0..cells {
            self.start[c + 1] += self.start[c];
        }
        self.members.resize(live.len(), 0);
        // Scatter, counting each cell's fill in its own start (then put back).
        for (&i, &c) in live.iter().zip(&self.cell) {
            let at = &mut self.start[c as usize];
            self.members[*at as usize] = i;
            *at += 1;
        }
        for c in (1..=cells).rev() {
            self.start[c] = self.start[c - 1];
        }
        self.start[0] = 0;
    }

    /// The entities of cell (`x`, `z`) (grid coordinates; empty outside).
    fn at(&self, x: i64, z: i64) -> &[u32] {
        if x < 0 || z < 0 || x >= self.width as i64 || z >= self.height as i64 {
            return &[];
        }
        let c = z as usize * self.width + x as usize;
        &self.members[self.start[c] as usize..self.start[c + 1] as usize]
    }
}

/// Buffers replication keeps between ticks.
#[derive(Debug, Default)]
pub struct ReplicationScratch {
    frame: Frame,
    /// Per connection: what was sent (baselines) and each candidate's
    /// accumulated priority.
    links: rustc_hash::FxHashMap<super::messages::ConnId, Link>,
    /// This tick's players, each with its link while it is served.
    jobs: Vec<Job>,
    /// One per share of the players (a thread's, or a part of a batch).
    workers: Vec<Worker>,
    /// Last tick's snapshots, being built by the pool while the tick
    /// thread runs this tick's stages (it holds the frame meanwhile).
    in_flight: Option<InFlight>,
}

/// A tick's snapshots handed to the pool: built while the tick thread
/// goes on with the next tick, gathered (the tick thread helping with what
/// is left) before that tick's replication touches the frame again.
#[derive(Debug)]
struct InFlight {
    batch: std::sync::Arc<Batch>,
    /// The pool's tasks that have not finished (each holds a clone of
    /// `batch` until it signals here).
    running: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
}

/// What one tick's snapshots are built from, shared by whoever builds them.
#[derive(Debug)]
struct Batch {
    frame: Frame,
    tick: shared::Tick,
    cfg: SimConfig,
    metrics: SimMetrics,
    /// The players in parts; a part is taken by the first to claim it.
    parts: Vec<std::sync::Mutex<Option<Part>>>,
    next: std::sync::atomic::AtomicUsize,
    /// Parts served, back for the tick thread.
    done: std::sync::Mutex<Vec<Part>>,
}

#[derive(Debug)]
struct Part {
    jobs: Vec<Job>,
    worker: Worker,
}

impl Batch {
    /// Serves parts until none is left to claim.
    fn work(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.parts.get(i) else { return };
            let Some(mut part) = slot.lock().ok().and_then(|mut p| p.take()) else { continue };
            part.worker.serve(&self.frame, &mut part.jobs, self.tick, &self.cfg, &self.metrics);
            if let Ok(mut done) = self.done.lock() {
                done.push(part);
            }
        }
    }
}

/// Parts of a batch per thread serving it: the tick thread, helping at
/// the gathering, takes what the pool has not started.
const PARTS_PER_THREAD: usize = 4;

/// One connection's replication state.
#[derive(Debug, Default)]
struct Link {
    baselines: held::Baselines,
    /// The entities its snapshots consider, in id order, each with its
    /// accumulated priority: searched anew every [`CANDIDATE_SEARCH_TICKS`].
    candidates: Vec<Candidate>,
    /// Tick this link was last served (stale links are dropped).
    served: shared::Tick,
    /// Where the player stood at the last search of its candidates.
    searched_at: Option<DVec3>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: EntityId,
    /// Its slot in the frame (checked against the id every tick).
    slot: u32,
    /// Priority accumulated since the client last got its current state.
    acc: f32,
}

/// One player to send a snapshot to this tick.
#[derive(Debug)]
struct Job {
    conn: super::messages::ConnId,
    /// Its connection's queue (`None`: gone).
    tx: Option<super::messages::ConnTx>,
    /// The player's own slot in the frame.
    me: u32,
    last_input_seq: u32,
    acked: shared::Tick,
    /// Not served at its last turn: its candidates may be old.
    resumed: bool,
    link: Link,
}

/// One thread's scratch (reused every tick).
#[derive(Debug, Default)]
struct Worker {
    near: Vec<(f64, u32)>,
    found: Vec<Candidate>,
    /// This snapshot's entities in id order, with their priorities.
    wanted: Vec<held::Want>,
    buf: Vec<u8>,
    sent: u64,
    bytes: u64,
    /// What the snapshots it served this tick were made of.
    records: held::RecordCounts,
}

/// Fewest players a tick that are worth sharing out with the pool: below
/// it, waking the pool's threads costs more than it saves, and on a
/// crowded host their spinning takes cores from the other processes.
pub(crate) const PARALLEL_FROM_PLAYERS: usize = 128;

/// Threads that serve players' snapshots beside the tick thread.
///
/// From [`ReplicationPool::parallel_from`] players a tick, a tick's
/// snapshots are built by the pool while the tick thread runs the next
/// tick's stages (they leave one stage later, a few milliseconds), and
/// gathered, the tick thread helping, before the next tick's replication.
#[derive(Resource, Debug)]
pub struct ReplicationPool {
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// Fewest players a tick that are shared out with the pool.
    pub parallel_from: usize,
}

impl Default for ReplicationPool {
    fn default() -> Self {
        Self { pool: None, parallel_from: PARALLEL_FROM_PLAYERS }
    }
}

impl ReplicationPool {
    /// A pool of `workers` threads (0: the tick thread serves everyone).
    pub fn new(workers: usize) -> anyhow::Result<Self> {
        if workers == 0 {
            return Ok(Self::default());
        }
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(workers).thread_name(|i| format!("replication-{i}")).build()?;
        Ok(Self { pool: Some(std::sync::Arc::new(pool)), ..Self::default() })
    }

    /// Threads serving players, the tick thread included.
    fn threads(&self) -> usize {
        1 + self.pool.as_ref().map_or(0, |p| p.current_num_threads())
    }
}

/// Entities a snapshot considers, nearest first (the budget decides how
/// many of them change hands each tick).
pub(crate) const MAX_CANDIDATES: usize = 128;

/// Ticks between two searches of a link's candidates (the links take
/// turns, an eighth of them a tick). In between, the candidates found are
/// re-ranked every tick by their distance and speed, and dropped when they
/// leave the view radius or the server: an entity that comes near is
/// considered within 89 ms.
pub(crate) const CANDIDATE_SEARCH_TICKS: u64 = 8;

/// A player this far from where its candidates were searched (a teleport,
/// a vehicle) has them searched again at once, turn or not, as has a
/// player whose link was not served at its last turn (handed back, rejoined).
pub(crate) const SEARCH_AGAIN_M: f64 = 16.0;

/// How much an entity's update matters this tick: near and fast first,
/// nearness cubed so that the avatars next to a player (whose heads and
/// hands it watches) are updated at 45 Hz or more in a crowd of fifty.
/// Accumulated every tick it is not sent, so far and slow ones get their
/// turn (nothing starves).
pub(crate) fn priority(distance_m: f64, speed: f32) -> f32 {
    let near = 1.0 / (1.0 + distance_m as f32 / 8.0);
    near * near * near * (1.0 + speed / 4.0)
}

pub(crate) fn cell_of(p: DVec3) -> (i32, i32) {
    (floor_i32(p.x / GRID_CELL_M), floor_i32(p.z / GRID_CELL_M))
}

/// Sends each attached player a snapshot of what is near it: itself, then
/// the nearest entities within the view radius, found ring by ring in a
/// grid of the entities rebuilt every tick. Players are independent once
/// the grid is built: they are shared out between the tick thread and the
/// [`ReplicationPool`].
#[allow(clippy::too_many_arguments)]
pub fn replication(
    q: Query<Replicated, With<Authority>>,
    ghosts: Res<super::ghosts::Ghosts>,
    conns: Res<Conns>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    pool: Res<ReplicationPool>,
    mut scratch: Local<ReplicationScratch>,
) {
    let cpu_at = svc::thread_cpu();
    let sc = &mut *scratch;
    // Last tick's snapshots first: the frame comes back with them.
    gather(sc, &metrics);
    let every = cfg.snapshot_every.max(1);
    let f = &mut sc.frame;
    f.begin(tick.tick);
    sc.jobs.clear();
    for (n, b, avatar, prop, comps) in &q {
        // A resting prop (most of them) is not quantised again.
        let comps_changed = comps.as_ref().is_some_and(|c| c.is_changed());
        let still = !b.is_changed() && !comps_changed && prop.as_ref().is_some_and(|p| !p.is_changed());
        let Some(me) = still.then(|| f.keep(n.0)).flatten().or_else(|| {
            let rot = prop.as_ref().map_or_else(|| Quat::from_rotation_y(b.yaw), |p| p.rot);
            let state =
                EntityState { id: n.0, pos: b.pos, rot: rot.to_array(), vel: b.vel.to_array(), authority: cfg.server };
            let comps = comps.as_ref().map(|c| (c.0.set(), comps_changed));
            f.put(state, QEntity::quantise(&state), comps, &cfg.registry)
        }) else {
            continue;
        };
        // This tick's players, each taking its link along.
        let Some((a, conn)) = avatar.and_then(|a| Some((a, a.conn?))) else { continue };
        // Its turn, or it missed its turn (a tick skipped under load).
        let turn = tick.tick.wrapping_add(n.0.0).is_multiple_of(every);
        if !turn && sc.links.get(&conn).is_some_and(|l| l.served + every >= tick.tick) {
            continue;
        }
        let mut link = sc.links.remove(&conn).unwrap_or_default();
        // Not served at its last turn that ran (ticks skipped under load
        // are no missed turns).
        let resumed = link.served + every <= f.prev;
        link.served = tick.tick;
        sc.jobs.push(Job {
            conn,
            tx: conns.0.get(&conn).map(|c| c.tx.clone()),
            me,
            last_input_seq: a.last_applied,
            acked: conns.0.get(&conn).map_or(0, |c| c.acked),
            resumed,
            link,
        });
    }
    // Neighbours' entities near our regions, as their owners simulate them
    // (an entity of ours wins over its ghost).
    for (state, q, comps, at) in ghosts.states() {
        f.put(state, q, Some((comps, at > f.prev || f.prev == shared::Tick::MAX)), &cfg.registry);
    }
    f.end();
    // Connections gone (or no longer served here) drop their baselines.
    if tick.tick.is_multiple_of(90) {
        sc.links.retain(|c, l| conns.0.contains_key(c) && l.served + 90 + every > tick.tick);
    }
    match pool.pool.as_ref().filter(|_| sc.jobs.len() >= pool.parallel_from.max(1)) {
        Some(p) => send_off(sc, p, pool.threads(), tick.tick, &cfg, &metrics),
        None => {
            sc.workers.resize_with(1, Worker::default);
            sc.workers[0].serve(&sc.frame, &mut sc.jobs, tick.tick, &cfg, &metrics);
            for job in sc.jobs.drain(..) {
                sc.links.insert(job.conn, job.link);
            }
            count(&mut sc.workers, &metrics);
        }
    }
    metrics.0.replication_cpu.inc_by(svc::thread_cpu().saturating_sub(cpu_at).as_secs_f64());
}

/// Hands this tick's players to the pool, in parts, with the frame.
fn send_off(
    sc: &mut ReplicationScratch,
    pool: &std::sync::Arc<rayon::ThreadPool>,
    threads: usize,
    tick: shared::Tick,
    cfg: &SimConfig,
    metrics: &SimMetrics,
) {
    use std::sync::{Arc, Condvar, Mutex};
    let n = (threads * PARTS_PER_THREAD).min(sc.jobs.len()).max(1);
    let per = sc.jobs.len().div_ceil(n);
    sc.workers.resize_with(n, Worker::default);
    let mut parts = Vec::with_capacity(n);
    let mut jobs = std::mem::take(&mut sc.jobs);
    for worker in sc.workers.drain(..) {
        let rest = jobs.split_off(per.min(jobs.len()));
        parts.push(Mutex::new(Some(Part { jobs, worker })));
        jobs = rest;
    }
    let batch = Arc::new(Batch {
        frame: std::mem::take(&mut sc.frame),
        tick,
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        parts,
        next: std::sync::atomic::AtomicUsize::new(0),
        done: Mutex::new(Vec::with_capacity(n)),
    });
    let tasks = threads - 1;
    let running = Arc::new((Mutex::new(tasks), Condvar::new()));
    for _ in 0..tasks {
        let (batch, running) = (batch.clone(), running.clone());
        pool.spawn(move || {
            // Says the task is done however it ends (a panic too), after
            // it let go of the batch, which goes back whole.
            let done = Finished(running);
            // A local declared after `done`: dropped before it, unwinding too.
            let batch = batch;
            let at = svc::thread_cpu();
            batch.work();
            let cpu = svc::thread_cpu().saturating_sub(at).as_secs_f64();
            batch.metrics.0.replication_cpu.inc_by(cpu);
            drop(batch);
            drop(done);
        });
    }
    sc.in_flight = Some(InFlight { batch, running });
}

/// Counts a pool task out of a batch when dropped.
struct Finished(std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>);

impl Drop for Finished {
    fn drop(&mut self) {
        let (left, cv) = &*self.0;
        let mut left = left.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *left -= 1;
        cv.notify_all();
    }
}

/// Gathers the snapshots [`send_off`] handed to the pool, serving the
/// parts it has not started: the frame, links and scratch come back.
fn gather(sc: &mut ReplicationScratch, metrics: &SimMetrics) {
    let Some(InFlight { batch, running }) = sc.in_flight.take() else { return };
    batch.work();
    let (left, cv) = &*running;
    let mut left = left.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    while *left > 0 {
        left = cv.wait(left).unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    drop(left);
    let batch = match std::sync::Arc::try_unwrap(batch) {
        Ok(b) => b,
        Err(_) => unreachable!("every task let go of the batch before it finished"),
    };
    sc.frame = batch.frame;
    let done = batch.done.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    for part in done {
        for job in part.jobs {
            sc.links.insert(job.conn, job.link);
        }
        sc.workers.push(part.worker);
    }
    count(&mut sc.workers, metrics);
}

/// Adds what the workers sent to the metrics, and zeroes their counts.
fn count(workers: &mut [Worker], metrics: &SimMetrics) {
    let (mut sent, mut bytes) = (0, 0);
    let mut records = held::RecordCounts::default();
    for w in workers {
        sent += std::mem::take(&mut w.sent);
        bytes += std::mem::take(&mut w.bytes);
        records.add(&std::mem::take(&mut w.records));
    }
    metrics.0.snapshots_sent.inc_by(sent);
    metrics.0.bytes_sent.inc_by(bytes);
    let [new, delta, resent, removed] = &metrics.0.snapshot_record_kinds;
    new.inc_by(records.new);
    delta.inc_by(records.delta);
    resent.inc_by(records.resent);
    removed.inc_by(records.removed);
    metrics.0.snapshots_unbased.inc_by(records.unbased);
    metrics.0.snapshot_component_bytes.inc_by(records.component_bytes);
}

impl Frame {
    fn begin(&mut self, tick: shared::Tick) {
        self.prev = self.tick;
        self.tick = tick;
        self.live.clear();
        self.ring[tick as usize % RING_TICKS].0 = tick as u32;
    }

    /// Puts an entity's state in its slot, and its components (refilled
    /// when they changed, or the slot is new to it); `None` if an entity of
    /// that id was put this tick already.
    fn put(
        &mut self,
        state: EntityState,
        q: QEntity,
        comps: Option<(&shared::component::ComponentSet, bool)>,
        registry: &shared::component::Registry,
    ) -> Option<u32> {
        let i = match self.slot.entry(state.id) {
            std::collections::hash_map::Entry::Occupied(o) => *o.get(),
            std::collections::hash_map::Entry::Vacant(v) => *v.insert(self.free.pop().unwrap_or_else(|| {
                self.states.push(state);
                self.hot.push(Slot {
                    id: EntityId(0),
                    // Not this tick (nor an id of anything).
                    filled: (self.tick as u32).wrapping_sub(1),
                    changed: 0,
                    pos: glam::Vec3::ZERO,
                    speed: 0.0,
                });
                self.comps.push(snapshot::WireComponents::default());
                self.costs.push(snapshot::BlockCost::default());
                self.has_comps.push(false);
                self.states.len() as u32 - 1
            })),
        };
        let k = i as usize;
        let now = self.tick as u32;
        let old = self.hot[k];
        if old.filled == now {
            return None;
        }
        // Unchanged: here last frame, in this slot, with the same state.
        let prev = self.prev as u32;
        let last = &self.ring[self.prev as usize % RING_TICKS];
        let here = old.id == state.id && old.filled == prev;
        let same = here && last.0 == prev && last.1.get(k) == Some(&q);
        // The components are touched only when they changed, the slot is
        // new to the entity, or a ghost replaces what had some.
        // A slot whose components were emptied (its entity became a
        // ghost here) starts over too: what clients hold of it is unknown.
        let fresh = !here || !self.has_comps[k];
        let moved = match comps {
            Some((set, changed)) if changed || fresh => {
                let wire = &mut self.comps[k];
                let before = wire.everyone_at();
                wire.refill(set, registry, now, fresh);
                self.costs[k] = *wire.cost();
                self.has_comps[k] = true;
                wire.everyone_at() != before
            }
            Some(_) => false,
            // Had some until now, has none from now on: clients are told.
            None if self.has_comps[k] => {
                self.comps[k].refill(&shared::component::ComponentSet::new(), registry, now, false);
                self.costs[k] = *self.comps[k].cost();
                self.has_comps[k] = false;
                true
            }
            None => false,
        };
        // What every client sees of it changed: its components too.
        let same = same && !moved;
        self.hot[k] = Slot {
            id: state.id,
            filled: now,
            changed: if same { old.changed } else { now },
            pos: state.pos.as_vec3(),
            speed: glam::Vec3::from(state.vel).length(),
        };
        let ring = &mut self.ring[self.tick as usize % RING_TICKS].1;
        if ring.len() <= k {
            ring.resize(self.hot.len(), NO_STATE);
        }
        ring[k] = q;
        self.states[k] = state;
        self.live.push(i);
        Some(i)
    }

    /// Puts entity `id` in its slot with the last frame's state, if it was
    /// there then (`None`: it was not; [`Frame::put`] it).
    fn keep(&mut self, id: EntityId) -> Option<u32> {
        let i = *self.slot.get(&id)?;
        let k = i as usize;
        let now = self.tick as u32;
        let prev = self.prev as u32;
        let last = self.prev as usize % RING_TICKS;
        let old = &mut self.hot[k];
        if old.id != id || old.filled != prev || self.ring[last].0 != prev {
            return None;
        }
        let q = *self.ring[last].1.get(k)?;
        old.filled = now;
        let ring = &mut self.ring[self.tick as usize % RING_TICKS].1;
        if ring.len() <= k {
            ring.resize(self.hot.len(), NO_STATE);
        }
        ring[k] = q;
        self.live.push(i);
        Some(i)
    }

    /// Frees the slots of entities gone and buckets the rest.
    fn end(&mut self) {
        if self.slot.len() != self.live.len() {
            let (hot, now, free) = (&self.hot, self.tick as u32, &mut self.free);
            self.slot.retain(|_, i| {
                let here = hot[*i as usize].filled == now;
                if !here {
                    free.push(*i);
                }
                here
            });
        }
        self.grid.build(&self.states, &self.live);
    }

    /// The entity `id` in `slot`, if it is there this tick.
    fn get(&self, slot: u32, id: EntityId) -> Option<&Slot> {
        let k = slot as usize;
        let s = self.hot.get(k)?;
        (s.id == id && s.filled == self.tick as u32).then_some(s)
    }

    /// The entities within `r2` (squared metres) of `me`, nearest first
    /// among the nearest `keep`, into `near` as (squared distance, index):
    /// cells ring by ring around `me` until `keep` are found (what is left
    /// is farther than most of them; interest management proper ranks by
    /// more than distance) or the view radius is passed.
    fn near(&self, me: &EntityState, view_radius_m: f64, keep: usize, near: &mut Vec<(f64, u32)>) {
        near.clear();
        let g = &self.grid;
        let r2 = view_radius_m * view_radius_m;
        let (x, z) = g.cell_at(me.pos);
        let (cx, cz) = (i64::from(x) - i64::from(g.origin.0), i64::from(z) - i64::from(g.origin.1));
        // No ring past the view radius, nor past the grid's far edges.
        let edge = cx.max(g.width as i64 - 1 - cx).max(cz).max(g.height as i64 - 1 - cz);
        let max_ring = ((view_radius_m / g.cell_m).ceil() as i64).min(edge.max(0));
        let look = |cell: &[u32], near: &mut Vec<(f64, u32)>| {
            for &i in cell {
                let s = &self.states[i as usize];
                let d = s.pos.distance_squared(me.pos);
                if d <= r2 && s.id != me.id {
                    near.push((d, i));
                }
            }
        };
        for ring in 0..=max_ring {
            for dz in [-ring, ring] {
                for dx in -ring..=ring {
                    look(g.at(cx + dx, cz + dz), near);
                }
                if ring == 0 {
                    break;
                }
            }
            for dz in 1 - ring..ring {
                look(g.at(cx - ring, cz + dz), near);
                look(g.at(cx + ring, cz + dz), near);
            }
            if near.len() >= keep {
                break;
            }
        }
        if near.len() > keep {
            near.select_nth_unstable_by(keep, |x, y| x.0.total_cmp(&y.0));
            near.truncate(keep);
        }
    }
}

impl held::Values for Frame {
    fn now(&self) -> u32 {
        self.tick as u32
    }

    fn current(&self, slot: u32) -> &QEntity {
        &self.ring[self.tick as usize % RING_TICKS].1[slot as usize]
    }

    fn changed(&self, slot: u32) -> u32 {
        self.hot[slot as usize].changed
    }

    fn components(&self, slot: u32) -> &snapshot::WireComponents {
        &self.comps[slot as usize]
    }

    fn block_cost(&self, slot: u32) -> &snapshot::BlockCost {
        &self.costs[slot as usize]
    }

    fn at(&self, slot: u32, stamp: u32, id: EntityId) -> Option<&QEntity> {
        let (tick, states) = &self.ring[stamp as usize % RING_TICKS];
        states.get(slot as usize).filter(|q| *tick == stamp && q.id == id)
    }
}

impl Worker {
    /// Builds, encodes and queues the snapshot of each of `jobs`.
    fn serve(&mut self, frame: &Frame, jobs: &mut [Job], tick: shared::Tick, cfg: &SimConfig, metrics: &SimMetrics) {
        let r2 = (cfg.view_radius_m * cfg.view_radius_m) as f32;
        // Searches fall on a player's snapshot ticks.
        let every = cfg.snapshot_every.max(1);
        let search_every = every * CANDIDATE_SEARCH_TICKS.div_ceil(every);
        for job in jobs {
            let started = std::time::Instant::now();
            let me = &frame.states[job.me as usize];
            let link = &mut job.link;
            let moved = link.searched_at.is_none_or(|p| p.distance_squared(me.pos) > SEARCH_AGAIN_M * SEARCH_AGAIN_M);
            if moved || job.resumed || tick.wrapping_add(me.id.0).is_multiple_of(search_every) {
                self.search(frame, me, cfg.view_radius_m, &mut link.candidates);
                link.searched_at = Some(me.pos);
            }
            // This snapshot's entities in id order (the player itself
            // among them, first in priority), each candidate's priority
            // accumulated; candidates gone or out of view are dropped.
            self.wanted.clear();
            let me_pos = frame.hot[job.me as usize].pos;
            let me_want = held::Want { id: me.id, slot: job.me, priority: f32::INFINITY };
            let mut me_at = None;
            link.candidates.retain_mut(|c| {
                let Some(s) = frame.get(c.slot, c.id) else { return false };
                let d2 = s.pos.distance_squared(me_pos);
                if d2 > r2 || c.id == me.id {
                    return false;
                }
                if me_at.is_none() && me.id < c.id {
                    me_at = Some(self.wanted.len());
                    self.wanted.push(me_want);
                }
                c.acc += priority(f64::from(d2.sqrt()), s.speed);
                self.wanted.push(held::Want { id: c.id, slot: c.slot, priority: c.acc });
                true
            });
            let me_at = me_at.unwrap_or_else(|| {
                self.wanted.push(me_want);
                self.wanted.len() - 1
            });
            let header =
                snapshot::Header { tick, server: cfg.server, authoritative: true, last_input_seq: job.last_input_seq };
            self.buf.clear();
            let before = link.baselines.counts();
            link.baselines.encode(
                frame,
                &header,
                me.pos,
                me.id,
                &self.wanted,
                job.acked,
                cfg.snapshot_budget,
                &mut self.buf,
            );
            self.records.add(&link.baselines.counts().since(&before));
            // What the client now holds as wanted is up to date: its
            // priority starts over; the rest keep accumulating.
            let fresh = link.baselines.fresh();
            let others = fresh[..me_at].iter().chain(&fresh[me_at + 1..]);
            for (c, &fresh) in link.candidates.iter_mut().zip(others) {
                if fresh {
                    c.acc = 0.0;
                }
            }
            metrics.0.snapshot_encode.observe(started.elapsed().as_secs_f64());
            self.bytes += self.buf.len() as u64;
            self.sent += 1;
            if let Some(tx) = &job.tx
                && let Err(e) = tx.try_send(Outbound::Datagram(bytes::Bytes::copy_from_slice(&self.buf)))
            {
                metrics.0.datagrams_dropped.with_label_values(&[e.reason()]).inc();
            }
        }
    }

    /// Searches a link's candidates anew: the nearest within the view
    /// radius, in id order, keeping the priority of those it had.
    fn search(&mut self, frame: &Frame, me: &EntityState, view_radius_m: f64, candidates: &mut Vec<Candidate>) {
        frame.near(me, view_radius_m, MAX_CANDIDATES, &mut self.near);
        self.found.clear();
        self.found.extend(self.near.iter().map(|&(_, slot)| Candidate {
            id: frame.hot[slot as usize].id,
            slot,
            acc: 0.0,
        }));
        self.found.sort_unstable_by_key(|c| c.id);
        let mut j = 0;
        for c in &mut self.found {
            while j < candidates.len() && candidates[j].id < c.id {
                j += 1;
            }
            if let Some(old) = candidates.get(j).filter(|o| o.id == c.id) {
                c.acc = old.acc;
            }
        }
        std::mem::swap(candidates, &mut self.found);
    }
}

/// Edited chunks farther than this from a player are not streamed to it.
pub const CHUNK_STREAM_RADIUS_M: f64 = 128.0;
/// Chunks one player is sent in one turn (a player's turn comes every 9
/// ticks: 40 chunks a second at most).
pub const CHUNKS_PER_TURN: usize = 4;

/// Per connection: the version of each chunk it was sent.
#[derive(Debug, Default)]
pub struct ChunkStreams {
    sent: rustc_hash::FxHashMap<super::messages::ConnId, rustc_hash::FxHashMap<shared::chunk::ChunkKey, u64>>,
}

/// Streams what players changed in the terrain to the players near it,
/// nearest chunk first, a few chunks a turn, each again when it changes.
/// Clients generate the rest of the world from the seed. A ninth of the
/// players each tick (every player ten times a second).
pub fn chunk_edits(
    players: Query<(&Body, &Avatar), With<Authority>>,
    terrain: Res<super::terrain::Terrain>,
    conns: Res<Conns>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    mut streams: Local<ChunkStreams>,
) {
    if tick.tick.is_multiple_of(90) {
        streams.sent.retain(|c, _| conns.0.contains_key(c));
    }
    if terrain.edited.is_empty() {
        return;
    }
    let slice = tick.tick % 9;
    let layout = terrain.layout;
    let mut near: Vec<(f64, shared::chunk::ChunkKey)> = Vec::new();
    for (i, (body, a)) in players.iter().enumerate() {
        let Some(conn) = a.conn.filter(|_| i as u64 % 9 == slice) else { continue };
        let sent = streams.sent.entry(conn).or_default();
        near.clear();
        for key in &terrain.edited {
            let d = layout.chunk_aabb(*key).linf_distance(body.pos);
            let version = terrain.chunks.get(key).map_or(0, |c| c.version);
            if d <= CHUNK_STREAM_RADIUS_M && sent.get(key) != Some(&version) {
                near.push((d, *key));
            }
        }
        near.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
        for (_, key) in near.iter().take(CHUNKS_PER_TURN) {
            let Some(c) = terrain.chunks.get(key) else { continue };
            let voxels: Vec<(u32, shared::terrain::Material)> = c.edits.iter().map(|(i, m)| (*i, *m)).collect();
            for (k, part) in voxels.chunks(shared::wire::MAX_CHUNK_EDITS_PER_FRAME).enumerate() {
                let msg = ServerControl::ChunkEdits {
                    chunk: *key,
                    version: c.version,
                    replace: k == 0,
                    voxels: part.to_vec(),
                };
                send(&conns, conn, Outbound::Control(msg), &metrics);
            }
            sent.insert(*key, c.version);
            metrics.0.chunk_edits_sent.inc();
        }
    }
}

/// Gauges and the heartbeat's load figures.
pub fn report(
    players: Query<&Authority, With<Avatar>>,
    entities: Query<(), With<Authority>>,
    tick: Res<TickState>,
    metrics: Res<SimMetrics>,
    load: Res<Load>,
    conns: Res<Conns>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let np = players.iter().count();
    let ne = entities.iter().count();
    metrics.0.active_players.set(np as i64);
    metrics.0.entities.set(ne as i64);
    metrics.0.connections.set(conns.0.len() as i64);
    load.0.players.store(np as u32, Relaxed);
    load.0.entities.store(ne as u32, Relaxed);
    load.0.tick.store(tick.tick, Relaxed);
    if tick.tick.is_multiple_of(90) {
        let mut per: std::collections::BTreeMap<shared::RegionKey, u32> = std::collections::BTreeMap::new();
        for a in &players {
            *per.entry(a.region()).or_default() += 1;
        }
        if let Ok(mut r) = load.0.regions.lock() {
            *r = per.into_iter().collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::rng::Rng;

    fn frame(points: &[DVec3]) -> Frame {
        let mut f = Frame::default();
        f.begin(1);
        for (i, p) in points.iter().enumerate() {
            let s = EntityState {
                id: EntityId(i as u64 + 1),
                pos: *p,
                rot: [0.0, 0.0, 0.0, 1.0],
                vel: [0.0; 3],
                authority: shared::ServerId(1),
            };
            f.put(s, QEntity::quantise(&s), None, &shared::component::Registry::empty());
        }
        f.end();
        f
    }

    /// Entity 5, at rest at (3, 4, 5).
    fn still_entity() -> EntityState {
        EntityState {
            id: EntityId(5),
            pos: DVec3::new(3.0, 4.0, 5.0),
            rot: [0.0, 0.0, 0.0, 1.0],
            vel: [0.0; 3],
            authority: shared::ServerId(1),
        }
    }

    fn brute(f: &Frame, me: &EntityState, radius: f64) -> Vec<u32> {
        let mut v: Vec<u32> = (0..f.states.len() as u32)
            .filter(|&i| {
                let s = &f.states[i as usize];
                s.id != me.id && s.pos.distance_squared(me.pos) <= radius * radius
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn an_entity_keeps_its_slot_while_here_and_a_freed_slot_answers_for_no_one_else() {
        let state = |id: u64| EntityState {
            id: EntityId(id),
            pos: DVec3::new(id as f64, 0.0, 0.0),
            rot: [0.0, 0.0, 0.0, 1.0],
            vel: [0.0; 3],
            authority: shared::ServerId(1),
        };
        let put = |f: &mut Frame, id: u64| {
            f.put(state(id), QEntity::quantise(&state(id)), None, &shared::component::Registry::empty())
        };
        let mut f = Frame::default();
        f.begin(1);
        let a = put(&mut f, 1).unwrap();
        let b = put(&mut f, 2).unwrap();
        // A second state of one id in one tick (a ghost of our own entity) is refused.
        assert_eq!(put(&mut f, 2), None);
        f.end();
        f.begin(2);
        assert_eq!(put(&mut f, 2), Some(b), "kept its slot");
        f.end();
        assert!(f.get(a, EntityId(1)).is_none(), "gone this tick");
        assert!(f.get(b, EntityId(2)).is_some());
        f.begin(3);
        let c = put(&mut f, 3).unwrap();
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(put(&mut f, 2), Some(b));
        f.end();
        assert!(f.get(a, EntityId(1)).is_none(), "a reused slot answers only for its new entity");
        assert_eq!(f.get(c, EntityId(3)).map(|s| s.id), Some(EntityId(3)));
        assert!(f.get(b, EntityId(3)).is_none());
    }

    #[test]
    fn an_entity_that_was_a_ghost_for_a_while_comes_back_with_its_components_as_they_are() {
        use shared::component::builtin::{Kind, PlayerName};
        use shared::component::{Component as _, ComponentSet, Registry};
        use shared::snapshot::{ComponentChanges, ComponentStore, History, decode_into, held::Baselines};
        let registry = Registry::builtin();
        let state = still_entity();
        let q = QEntity::quantise(&state);
        let mut named = ComponentSet::new();
        named.set(&Kind::Player);
        named.set(&PlayerName("ada".into()));
        let mut unnamed = ComponentSet::new();
        unnamed.set(&Kind::Player);
        let (mut f, mut b, mut client) = (Frame::default(), Baselines::default(), History::default());
        let (mut store, mut changes, mut out) = (ComponentStore::default(), ComponentChanges::default(), Vec::new());
        // Ours at 10 with a name; a ghost here at 11 (handed off); ours
        // again at 12 without its name. The client acknowledges 10 only.
        for (tick, comps, acked) in [(10, Some(&named), 0), (11, None, 10), (12, Some(&unnamed), 10)] {
            f.begin(tick);
            let slot = f.put(state, q, comps.map(|c| (c, true)), &registry).expect("put");
            f.end();
            let header = snapshot::Header { tick, server: shared::ServerId(1), authoritative: true, last_input_seq: 0 };
            let want = [held::Want { id: state.id, slot, priority: 1.0 }];
            out.clear();
            b.encode(&f, &header, DVec3::ZERO, EntityId(99), &want, acked, 1000, &mut out);
            let (_, view) = decode_into(&out, |t| client.get(t), &mut changes).expect("decodes");
            store.apply(&changes, &view, client.oldest_tick().unwrap_or(tick), &registry).expect("applies");
            client.push(view);
        }
        let held: Vec<_> = store.get(state.id).expect("in view").ids().collect();
        assert_eq!(held, [Kind::ID], "the name removed while it was away is gone");
    }

    #[test]
    fn components_unchanged_across_skipped_ticks_are_not_sent_again() {
        use held::Values as _;
        use shared::component::builtin::{Kind, PlayerName};
        use shared::component::{ComponentSet, Registry};
        let registry = Registry::builtin();
        let state = still_entity();
        let q = QEntity::quantise(&state);
        let mut set = ComponentSet::new();
        set.set(&Kind::Player);
        set.set(&PlayerName("ada".into()));
        let mut f = Frame::default();
        f.begin(10);
        let s = f.put(state, q, Some((&set, true)), &registry).unwrap();
        f.end();
        assert!(f.block_cost(s).len(None).unwrap() > 0, "a client new to it gets its components");
        // The server overran: ticks 11 to 13 never ran. Nothing changed.
        f.begin(14);
        assert_eq!(f.put(state, q, Some((&set, false)), &registry), Some(s));
        f.end();
        assert_eq!(f.changed(s), 10);
        assert_eq!(f.block_cost(s).len(Some(10)), Some(0), "a client holding tick 10 is sent no component");
        // A real change after the skip is one.
        set.set(&PlayerName("bea".into()));
        f.begin(16);
        f.put(state, q, Some((&set, true)), &registry);
        f.end();
        assert_eq!(f.changed(s), 16);
        assert!(f.block_cost(s).len(Some(10)).unwrap() > 0);
    }

    #[test]
    fn a_resting_entity_keeps_its_state_and_its_change_tick_only_while_it_stays() {
        use held::Values as _;
        let state = still_entity();
        let q = QEntity::quantise(&state);
        let mut f = Frame::default();
        f.begin(10);
        assert_eq!(f.keep(state.id), None, "never here: put it");
        let s = f.put(state, q, None, &shared::component::Registry::empty()).unwrap();
        f.end();
        for tick in 11..14 {
            f.begin(tick);
            assert_eq!(f.keep(state.id), Some(s));
            assert_eq!(f.keep(state.id), None, "once a tick");
            f.end();
            assert_eq!(f.current(s), &q);
            assert_eq!(f.changed(s), 10);
            assert_eq!(f.at(s, tick as u32, state.id), Some(&q));
        }
        // Ticks 14 and 15 skipped under load: still here, still unchanged.
        f.begin(16);
        assert_eq!(f.keep(state.id), Some(s), "a skipped tick is no absence");
        f.end();
        assert_eq!(f.changed(s), 10);
        f.begin(17);
        assert_eq!(f.put(state, q, None, &shared::component::Registry::empty()), Some(s));
        f.end();
        assert_eq!(f.changed(s), 10, "put again after a skip, the same state is no change");
        // Gone a tick: not kept, put anew, changed again.
        f.begin(18);
        f.end();
        f.begin(19);
        assert_eq!(f.keep(state.id), None);
        let s = f.put(state, q, None, &shared::component::Registry::empty()).unwrap();
        f.end();
        assert_eq!(f.changed(s), 19);
    }

    #[test]
    fn the_grid_finds_what_is_in_view_when_fewer_than_wanted() {
        let mut rng = Rng::new(7);
        for spread in [50.0, 900.0, 5_000.0, 400_000.0] {
            let points: Vec<DVec3> =
                (0..400).map(|_| DVec3::new(rng.range(-spread, spread), 0.0, rng.range(-spread, spread))).collect();
            let f = frame(&points);
            for me in f.states.iter().take(40) {
                let mut near = Vec::new();
                f.near(me, 500.0, 1000, &mut near);
                let mut got: Vec<u32> = near.iter().map(|n| n.1).collect();
                got.sort_unstable();
                assert_eq!(got, brute(&f, me, 500.0), "spread {spread} m, cell {} m", f.grid.cell_m);
            }
        }
    }

    #[test]
    fn a_crowd_gives_the_nearest_within_view_up_to_the_limit() {
        let mut rng = Rng::new(9);
        let points: Vec<DVec3> =
            (0..2_000).map(|_| DVec3::new(rng.range(0.0, 300.0), rng.range(0.0, 5.0), rng.range(0.0, 300.0))).collect();
        let f = frame(&points);
        let me = f.states[0];
        let mut near = Vec::new();
        f.near(&me, 500.0, MAX_CANDIDATES, &mut near);
        assert_eq!(near.len(), MAX_CANDIDATES);
        assert!(near.iter().all(|&(d, i)| d <= 500.0 * 500.0 && f.states[i as usize].id != me.id));
        // Ring by ring: everything found lies within a few cells of the
        // player, nearer than most of the crowd.
        let farthest = near.iter().map(|n| n.0.sqrt()).fold(0.0, f64::max);
        assert!(farthest < 3.0 * GRID_CELL_M, "farthest candidate {farthest} m");
    }
}
