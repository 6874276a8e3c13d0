//! Overlap-zone sync, on the tick thread: what this server sends its
//! neighbours of the entities it owns near their regions, and the read-only
//! ghosts it holds of theirs near its own.
//!
//! Each tick, every entity this server is authoritative for that lies in a
//! neighbour's overlap zone (or inside the neighbour's region, within the
//! handoff hysteresis) goes into that neighbour's list ([`sync_out`]); the
//! control task turns the lists into deltas on one gRPC stream per neighbour
//! (`crate::sync`). Received batches are checked against this server's
//! region map ([`receive`]) and kept as [`Ghosts`]: never simulated, shown
//! to players through the normal snapshot path with their owner as the
//! authority, dropped when their owner says they left, when a full batch no
//! longer lists them, or when their owner falls silent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bevy_ecs::prelude::*;
use glam::Quat;
use shared::component::ComponentSet;
use shared::snapshot::QEntity;
use shared::wire::EntityState;
use shared::{EntityId, ServerId, Tick};
use tracing::debug;

use super::authority::Authority;
use super::core::*;
use super::messages::SimOut;
pub use super::messages::{GhostBatch, GhostKind, GhostState};
use crate::sim::inbox::Outbox;

/// A ghost whose owner has said nothing of it for this long is dropped
/// (owners send every tick they have ghosts for us, and a full batch about
/// once a second). 45 ticks: half a second at 90 Hz.
pub const GHOST_TIMEOUT_TICKS: Tick = 45;
/// Most ghosts one server holds (a bound on what peers can make it keep).
pub const MAX_GHOSTS: usize = 16_384;

#[derive(Debug, Clone, PartialEq)]
pub struct Ghost {
    /// Its `comps` are the newest its owner sent (`None`: none yet; a
    /// ghost first accepted from a delta batch gets them with the owner's
    /// next full batch, within a second).
    pub state: GhostState,
    /// The tick it was last sent or confirmed.
    pub seen: Tick,
    /// The tick its components last changed here.
    pub comps_at: Tick,
}

impl Ghost {
    /// Its ghosted components (none if its owner never sent any).
    pub fn comps(&self) -> &ComponentSet {
        static NONE: ComponentSet = ComponentSet::new();
        self.state.comps.as_deref().unwrap_or(&NONE)
    }
}

/// The ghosts this server holds, by entity.
#[derive(Resource, Debug, Default)]
pub struct Ghosts {
    pub by_id: HashMap<EntityId, Ghost>,
    /// When each neighbour last sent a batch.
    heard: HashMap<ServerId, Tick>,
    /// Ghosts dropped because their owner fell silent, kept a while: if the
    /// owner died handing one to this server, it is resumed from here.
    recent: HashMap<EntityId, (Ghost, Tick)>,
}

/// How long a ghost whose owner fell silent is remembered (900 ticks: 10 s
/// at 90 Hz), for the target of a handoff whose source died to resume the
/// entity from it; the coordinator declares a server dead after 2 s of
/// silence (`--heartbeat-timeout-ms`).
pub const REMEMBER_TICKS: Tick = 900;

impl Ghosts {
    /// The newest state this server has of a neighbour's entity: its ghost,
    /// or the ghost it had until its owner fell silent.
    pub fn last_known(&self, id: EntityId) -> Option<&Ghost> {
        self.by_id.get(&id).or_else(|| self.recent.get(&id).map(|(g, _)| g))
    }

    /// Ghosts as snapshots carry them: state, wire state, components and
    /// the tick those last changed.
    pub fn states(&self) -> impl Iterator<Item = (EntityState, QEntity, &ComponentSet, Tick)> + '_ {
        self.by_id.values().map(|g| (g.state.q.state(), g.state.q, g.comps(), g.comps_at))
    }
}

/// Why a ghost update was refused. `reason()` is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GhostRefusal {
    /// The batch claims to come from this server.
    OwnServer,
    /// The sender is not a live server of the map.
    UnknownServer,
    UnknownRegion,
    /// The region's epoch is older than the map's.
    StaleEpoch,
    /// The map says someone else owns the region (or the epoch is newer
    /// than the map this server has).
    NotOwner,
    /// The entity is nowhere near the sender's region or this server's.
    OutsideZone,
    /// This server is authoritative for the entity.
    OwnEntity,
    /// A removal of an entity the sender has no ghost of here.
    UnknownEntity,
    /// [`MAX_GHOSTS`] are held.
    Full,
}

impl GhostRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            GhostRefusal::OwnServer => "own_server",
            GhostRefusal::UnknownServer => "unknown_server",
            GhostRefusal::UnknownRegion => "unknown_region",
            GhostRefusal::StaleEpoch => "stale_epoch",
            GhostRefusal::NotOwner => "not_owner",
            GhostRefusal::OutsideZone => "outside_zone",
            GhostRefusal::OwnEntity => "own_entity",
            GhostRefusal::UnknownEntity => "unknown_entity",
            GhostRefusal::Full => "full",
        }
    }
}

/// Whether `g`, sent by `from`, may be held here as a ghost.
fn check(world: &World, from: ServerId, g: &GhostState) -> Result<(), GhostRefusal> {
    let cfg = world.resource::<SimConfig>();
    let map = &world.resource::<Map>().0;
    let Some((owner, epoch)) = map.owners.get(&g.region) else { return Err(GhostRefusal::UnknownRegion) };
    if g.region_epoch < *epoch {
        return Err(GhostRefusal::StaleEpoch);
    }
    if *owner != Some(from) || g.region_epoch != *epoch {
        return Err(GhostRefusal::NotOwner);
    }
    let pos = g.q.state().pos;
    // Owned through its region, it can be past the region's face by the
    // hysteresis margin (and a little more while its handoff is under way);
    // and it must be near one of this server's regions.
    let near_sender = g.region.aabb().expanded(cfg.overlap_m).contains(pos);
    let near_me = map
        .tree
        .leaf_at(pos)
        .into_iter()
        .chain(map.tree.overlapping_leaves(pos, cfg.overlap_m))
        .any(|l| matches!(map.owners.get(&l), Some((Some(o), _)) if *o == cfg.server));
    if !near_sender || !near_me {
        return Err(GhostRefusal::OutsideZone);
    }
    if world.resource::<Index>().by_net.contains_key(&g.q.id) {
        return Err(GhostRefusal::OwnEntity);
    }
    Ok(())
}

/// Applies a neighbour's batch: every update checked against the map, each
/// refusal counted by reason and changing nothing.
pub fn receive(world: &mut World, batch: GhostBatch) {
    let tick = world.resource::<TickState>().tick;
    let metrics = world.resource::<SimMetrics>().0.clone();
    let count = |r: GhostRefusal, n: usize| metrics.ghost_updates.with_label_values(&[r.reason()]).inc_by(n as u64);
    let me = world.resource::<SimConfig>().server;
    let from = batch.from;
    if from == me {
        return count(GhostRefusal::OwnServer, batch.ghosts.len() + batch.removed.len());
    }
    if !world.resource::<Map>().0.servers.get(&from).is_some_and(|p| p.alive) {
        return count(GhostRefusal::UnknownServer, batch.ghosts.len() + batch.removed.len());
    }
    let verdicts: Vec<Result<(), GhostRefusal>> = batch.ghosts.iter().map(|g| check(world, from, g)).collect();
    // Removals of entities handed to this server since are expected.
    let owned: HashSet<EntityId> = {
        let index = world.resource::<Index>();
        batch.removed.iter().copied().filter(|id| index.by_net.contains_key(id)).collect()
    };
    let mut ghosts = world.resource_mut::<Ghosts>();
    ghosts.heard.insert(from, tick);
    let (mut applied, mut listed) = (0u64, HashSet::new());
    for (g, verdict) in batch.ghosts.iter().zip(verdicts) {
        if let Err(r) = verdict {
            count(r, 1);
            continue;
        }
        if ghosts.by_id.len() >= MAX_GHOSTS && !ghosts.by_id.contains_key(&g.q.id) {
            count(GhostRefusal::Full, 1);
            continue;
        }
        listed.insert(g.q.id);
        // Components left out are unchanged: kept from the ghost held,
        // even of the owner before (they move with the entity: the closest
        // guess until this owner's next full batch).
        let held = ghosts.by_id.get(&g.q.id);
        let (comps, comps_at) = match (&g.comps, held) {
            (Some(c), Some(h)) if h.state.comps.as_ref() == Some(c) => (Some(c.clone()), h.comps_at),
            (Some(c), _) => (Some(c.clone()), tick),
            (None, Some(h)) => (h.state.comps.clone(), h.comps_at),
            (None, None) => (None, tick),
        };
        ghosts.by_id.insert(g.q.id, Ghost { state: GhostState { comps, ..g.clone() }, seen: tick, comps_at });
        applied += 1;
    }
    for id in &batch.removed {
        match ghosts.by_id.get(id) {
            Some(g) if g.state.q.authority == from => {
                ghosts.by_id.remove(id);
                applied += 1;
            }
            // Handed on since (to this server or another): nothing to drop.
            Some(_) => {}
            None if owned.contains(id) => {}
            None => count(GhostRefusal::UnknownEntity, 1),
        }
    }
    if batch.full {
        // A full batch confirms every ghost it lists, unchanged or not.
        for id in &listed {
            if let Some(g) = ghosts.by_id.get_mut(id) {
                g.seen = tick;
            }
        }
        let before = ghosts.by_id.len();
        ghosts.by_id.retain(|id, g| g.state.q.authority != from || listed.contains(id));
        applied += (before - ghosts.by_id.len()) as u64;
    }
    metrics.ghost_updates.with_label_values(&["applied"]).inc_by(applied);
    metrics.ghosts.set(ghosts.by_id.len() as i64);
}

/// Drops the ghosts whose owner fell silent or died: nothing heard of them
/// for [`GHOST_TIMEOUT_TICKS`].
pub fn expire(world: &mut World) {
    let tick = world.resource::<TickState>().tick;
    let map = world.resource::<Map>().0.clone();
    let metrics = world.resource::<SimMetrics>().0.clone();
    let mut ghosts = world.resource_mut::<Ghosts>();
    let Ghosts { by_id, heard, recent } = &mut *ghosts;
    let before = by_id.len();
    by_id.retain(|id, g| {
        let owner = g.state.q.authority;
        let last = heard.get(&owner).copied().unwrap_or(0).max(g.seen);
        let alive = map.servers.get(&owner).is_some_and(|p| p.alive);
        let keep = alive && tick.saturating_sub(last) <= GHOST_TIMEOUT_TICKS;
        if !keep && recent.len() < MAX_GHOSTS {
            recent.insert(*id, (g.clone(), tick));
        }
        keep
    });
    if tick.is_multiple_of(90) {
        recent.retain(|_, (_, at)| tick.saturating_sub(*at) <= REMEMBER_TICKS);
    }
    heard.retain(|s, t| {
        tick.saturating_sub(*t) <= GHOST_TIMEOUT_TICKS || by_id.values().any(|g| g.state.q.authority == *s)
    });
    let dropped = before - by_id.len();
    if dropped > 0 {
        debug!(dropped, "ghosts expired");
        metrics.ghost_updates.with_label_values(&["expired"]).inc_by(dropped as u64);
    }
    metrics.ghosts.set(by_id.len() as i64);
}

/// The entity is simulated here from now on: no ghost of it.
pub fn adopted(world: &mut World, id: EntityId) {
    let mut ghosts = world.resource_mut::<Ghosts>();
    ghosts.by_id.remove(&id);
    ghosts.recent.remove(&id);
}

/// The entity was just handed to `to`: it stays in view here as a ghost of
/// its new owner until that owner's sync takes over (or says nothing of it
/// and it expires).
pub fn released(world: &mut World, state: GhostState) {
    let tick = world.resource::<TickState>().tick;
    // Released after this tick's replication: new to the next frame, which
    // must drop what clients saw of it that neighbours do not mirror.
    world.resource_mut::<Ghosts>().by_id.insert(state.q.id, Ghost { state, seen: tick, comps_at: tick + 1 });
}

/// Per neighbour: the entities sent last tick (so that a neighbour whose
/// list emptied still gets the batch that says so).
#[derive(Debug, Default)]
pub struct SyncScratch {
    lists: HashMap<ServerId, Vec<GhostState>>,
    last: HashSet<ServerId>,
    dests: Vec<ServerId>,
    /// Each synced entity's ghosted components as last built, and the
    /// tick it was last synced: rebuilt only when they differ.
    comps: HashMap<EntityId, (Arc<ComponentSet>, Tick)>,
}

/// What sync reads of an entity.
type Synced = (
    &'static NetId,
    &'static Body,
    &'static Authority,
    Option<&'static Avatar>,
    Option<&'static super::physics::Prop>,
    Option<&'static Components>,
);

/// The state of an entity as neighbours hold it.
pub fn ghost_state(
    cfg: &SimConfig,
    (net, body, auth, avatar, prop): (&NetId, &Body, &Authority, Option<&Avatar>, Option<&super::physics::Prop>),
    comps: Option<Arc<ComponentSet>>,
) -> GhostState {
    let rot = prop.map_or_else(|| Quat::from_rotation_y(body.yaw), |p| p.rot);
    GhostState {
        last_input: avatar.map_or(0, |a| a.last_applied),
        shape: prop.map(|p| p.shape),
        region: auth.region(),
        region_epoch: auth.region_epoch(),
        kind: if avatar.is_some() { GhostKind::Player } else { GhostKind::Prop },
        q: QEntity::quantise(&EntityState {
            id: net.0,
            pos: body.pos,
            rot: rot.to_array(),
            vel: body.vel.to_array(),
            authority: cfg.server,
        }),
        comps,
    }
}

/// The components of `c` neighbours mirror.
pub fn ghosted(registry: &shared::component::Registry, c: Option<&Components>) -> Arc<ComponentSet> {
    Arc::new(c.map(|c| c.0.set().filtered(registry, |p| p.ghosted)).unwrap_or_default())
}

fn is_ghosted(registry: &shared::component::Registry, id: shared::component::ComponentId) -> bool {
    registry.policy(id).is_some_and(|p| p.ghosted)
}

/// Sends each neighbour the entities this server owns in its overlap zone
/// (or inside its region, within the hysteresis), every tick.
#[allow(clippy::too_many_arguments)]
pub fn sync_out(
    q: Query<Synced>,
    map: Res<Map>,
    cfg: Res<SimConfig>,
    tick: Res<TickState>,
    out: Res<Outbox>,
    metrics: Res<SimMetrics>,
    mut faces: ResMut<super::authority::OpenFaces>,
    schemas: Res<super::authority::PeerSchemas>,
    mut sc: Local<SyncScratch>,
) {
    let map = &map.0;
    let sc = &mut *sc;
    sc.lists.values_mut().for_each(Vec::clear);
    for (net, body, auth, avatar, prop, comps) in &q {
        // Farther from every face with a region behind it than the overlap
        // zone reaches: no neighbour sees it (leaves tile space, so no
        // other leaf is that near; the world's own edges have none).
        if faces.depth(map, &auth.region(), body.pos) > cfg.overlap_m {
            continue;
        }
        sc.dests.clear();
        for leaf in map.tree.leaf_at(body.pos).into_iter().chain(map.tree.overlapping_leaves(body.pos, cfg.overlap_m)) {
            if let Some((owner, _)) = map.live_owner(&leaf)
                && owner != cfg.server
                && !sc.dests.contains(&owner)
            {
                sc.dests.push(owner);
            }
        }
        if sc.dests.is_empty() {
            continue;
        }
        let set = match sc.comps.entry(net.0) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let (set, seen) = o.get_mut();
                // Compared, not stamped: a change at the tick it was built
                // (by a system after this one) must not be missed.
                let same = match comps {
                    Some(c) => c.0.set().iter().filter(|(id, _)| is_ghosted(&cfg.registry, *id)).eq(set.iter()),
                    None => set.is_empty(),
                };
                if !same {
                    *set = ghosted(&cfg.registry, comps);
                }
                *seen = tick.tick;
                set.clone()
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((ghosted(&cfg.registry, comps), tick.tick)).0.clone()
            }
        };
        let g = ghost_state(&cfg, (net, body, auth, avatar, prop), Some(set.clone()));
        for d in &sc.dests {
            let g = match schemas.readable_by(*d, &set) {
                Some(readable) => GhostState { comps: Some(Arc::new(readable)), ..g.clone() },
                None => g.clone(),
            };
            sc.lists.entry(*d).or_default().push(g);
        }
    }
    let mut now = HashSet::new();
    for (to, list) in &mut sc.lists {
        // An empty list goes once, to say that everything left.
        if list.is_empty() && !sc.last.contains(to) {
            continue;
        }
        if !list.is_empty() {
            now.insert(*to);
        }
        let msg = SimOut::Ghosts { to: *to, tick: tick.tick, ghosts: std::mem::take(list) };
        if out.0.try_send(msg).is_err() {
            metrics.0.ghost_batches.with_label_values(&["dropped"]).inc();
        }
    }
    sc.last = now;
    if tick.tick.is_multiple_of(90) {
        sc.lists.retain(|to, _| sc.last.contains(to));
        sc.comps.retain(|_, (_, seen)| *seen == tick.tick);
    }
}
