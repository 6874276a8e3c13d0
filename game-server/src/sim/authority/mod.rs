//! Authority over entities: which server simulates each one, and the only
//! code that changes it. Everything that moves an entity between servers
//! goes through here: boundary checks and early transfer requests
//! ([`authority`]), the release at the source ([`release`]), adoption at the
//! target, taking a handoff back and resuming an orphan ([`adopt`]), and the
//! per-tick authority log ([`log`]). The control-plane half of the protocol
//! (what the coordinator and the target are asked, and when) is
//! `crate::handoff`.
//!
//! Invariants (checked every tick by the in-process mesh tests and, from
//! the authority logs, by every multi-server test):
//! - at most one server simulates an entity in any tick, and while every
//!   server is up, exactly one does;
//! - an entity leaves a server only through [`release`] (or is dropped when
//!   the coordinator gave its region away and no transfer is under way) and
//!   arrives only through adoption (a handoff, a reclaim, an orphan);
//! - every committed transfer ends exactly once: delivered, returned,
//!   adopted or lost;
//! - a player's inputs are applied once and in order across servers (the
//!   handoff carries the last applied sequence; the target drops any at or
//!   below it).

pub mod adopt;
pub mod answers;
pub mod log;
pub mod release;

pub use adopt::{PendingAdoptions, Released, ResolvedOrphans};

/// This server is authoritative for the entity, through `region`. Only
/// this module changes it: the fields are private; a new entity gets one
/// from [`Authority::spawned`].
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority {
    region: RegionKey,
    region_epoch: Epoch,
    entity_epoch: Epoch,
    since: Tick,
}

impl Authority {
    /// A new entity's, created here (a join, a spawned prop): entity
    /// epoch 0, held through `region` under `region_epoch` from `tick`.
    pub fn spawned(region: RegionKey, region_epoch: Epoch, tick: Tick) -> Self {
        Self { region, region_epoch, entity_epoch: Epoch(0), since: tick }
    }

    /// The region it is held through.
    pub fn region(&self) -> RegionKey {
        self.region
    }

    /// The epoch this server holds `region` under (as it last knew it).
    pub fn region_epoch(&self) -> Epoch {
        self.region_epoch
    }

    /// The entity's authority epoch, which every transfer raises.
    pub fn entity_epoch(&self) -> Epoch {
        self.entity_epoch
    }

    /// The tick this server became authoritative.
    pub fn since(&self) -> Tick {
        self.since
    }
}

/// A transfer of the entity to another server, in progress. Only this
/// module creates or changes one; others ask what it means.
#[derive(Component, Debug, Clone, PartialEq)]
pub struct Transfer(pub(in crate::sim::authority) TransferState);

impl Transfer {
    /// Committed, or being given up: the coordinator has the entity with
    /// another server until the transfer ends.
    pub fn is_leaving(&self) -> bool {
        matches!(self.0, TransferState::Committed(_) | TransferState::Cancelling(_))
    }

    /// Refused lately: not asked again yet.
    pub fn is_backing_off(&self) -> bool {
        matches!(self.0, TransferState::Backoff { .. })
    }
}

/// A player held through a region the coordinator gave away: its client was
/// just told to pre-connect to the new owner, and the handoff waits until
/// `not_before` so that the client can (a boundary crossing gives it the
/// whole overlap zone to do so; a region move gives it this).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicting {
    pub(in crate::sim::authority) not_before: Tick,
}

/// The tick an entity was first seen past the handoff line (for the
/// handoff's latency: from here to the tick the new owner simulates it).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossed(pub(in crate::sim::authority) Tick);

/// Where a transfer stands.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::sim::authority) enum TransferState {
    /// Asked the coordinator at this tick.
    Requested {
        at: Tick,
        /// The region asked for: asked again, unchanged, if no answer
        /// comes (the coordinator may have committed it and lost the
        /// answer; the same request gets the same transfer).
        to_region: RegionKey,
        not_before: Tick,
    },
    Committed(CommittedTransfer),
    /// Asked early, and the entity did not pass the line after all: the
    /// coordinator is asked to give it back (under a new epoch).
    Cancelling(CommittedTransfer),
    /// Refused; do not ask again before this tick.
    Backoff {
        until: Tick,
    },
}
pub use log::{AuthorityLog, log_authority};
pub use release::{DueReleases, release_due};

use bevy_ecs::prelude::*;
use glam::DVec3;
use shared::region::{RegionKey, handoff_target};
use shared::wire::ServerControl;
use shared::{Epoch, Tick};
use tokio::sync::mpsc;
use tracing::debug;

use crate::sim::core::*;
use crate::sim::inbox::send;
use crate::sim::inbox::{Conns, Outbox};
use crate::sim::messages::{CommittedTransfer, Outbound, SimOut};

/// Ticks to wait before asking again for a refused transfer (45: half a
/// second at 90 Hz, so a refusal that persists costs two requests a second).
pub(crate) const TRANSFER_BACKOFF_TICKS: u64 = 45;
/// Ticks after which a transfer request still unanswered is asked again,
/// unchanged (270: 3 s at 90 Hz). The coordinator may have committed it and
/// lost the answer with its leader; it answers the same request with the
/// transfer it committed.
pub(crate) const TRANSFER_REQUEST_TIMEOUT_TICKS: u64 = 270;
/// How long a player in a region given away gets to pre-connect to the new
/// owner before the handoff (1.5 s; the coordinator's release lasts 5 s).
pub const EVICT_GRACE_TICKS: u64 = 135;

/// Boundary checks: pre-connect hints, transfer requests, and the release of
/// entities whose transfer takes effect next tick.
/// Which faces of each leaf have a neighbouring region across them (face,
/// edge or corner contact), per map version: nothing happens at a face with
/// no region behind it.
#[derive(Resource, Debug, Default)]
pub struct OpenFaces {
    version: u64,
    /// `None`: not a leaf of the current map (always checked in full).
    faces: rustc_hash::FxHashMap<shared::RegionKey, Option<[bool; 6]>>,
}

impl OpenFaces {
    /// Distance from `p` to the nearest open face of `region` (infinite
    /// when it has none).
    pub(crate) fn depth(&mut self, map: &crate::sim::messages::MapView, region: &shared::RegionKey, p: DVec3) -> f64 {
        if self.version != map.version {
            self.faces.clear();
            self.version = map.version;
        }
        let faces = *self.faces.entry(*region).or_insert_with(|| {
            if !map.tree.is_leaf(region) {
                return None;
            }
            let me = region.aabb();
            let mut open = [false; 6];
            for (n, _) in map.tree.neighbours(region).unwrap_or_default() {
                let a = n.aabb();
                for axis in 0..3 {
                    open[axis * 2] |= a.max[axis] <= me.min[axis];
                    open[axis * 2 + 1] |= a.min[axis] >= me.max[axis];
                }
            }
            Some(open)
        });
        let Some(faces) = faces else { return 0.0 };
        let a = region.aabb();
        let mut depth = f64::INFINITY;
        for axis in 0..3 {
            if faces[axis * 2] {
                depth = depth.min(p[axis] - a.min[axis]);
            }
            if faces[axis * 2 + 1] {
                depth = depth.min(a.max[axis] - p[axis]);
            }
        }
        depth
    }
}

pub fn authority(world: &mut World) {
    let cfg = world.resource::<SimConfig>().clone();
    let tick = world.resource::<TickState>().tick;
    let map = world.resource::<Map>().0.clone();
    let mut faces = std::mem::take(&mut *world.resource_mut::<OpenFaces>());
    let out = world.resource::<Outbox>().clone();
    let metrics = world.resource::<SimMetrics>().clone();

    let mut releases = Vec::new();
    let mut requests = Vec::new();
    let mut hints = Vec::new();
    let mut local_moves = Vec::new();
    let mut cancels = Vec::new();
    let mut crossed = Vec::new();
    // A prop in a hand goes where its holder goes, not on its own.
    let held: rustc_hash::FxHashSet<Entity> = world
        .query::<&crate::sim::physics::Hands>()
        .iter(world)
        .flat_map(|h| h.hands.iter().filter_map(|h| h.held.map(|held| held.prop)))
        .collect();
    {
        let mut q = world.query::<(
            Entity,
            &NetId,
            &Body,
            &Authority,
            Option<&Avatar>,
            Option<&Transfer>,
            Option<&Evicting>,
            Has<Crossed>,
            Has<crate::sim::interact::RemoteGrab>,
        )>();
        for (e, net, body, auth, avatar, transfer, evicting, has_crossed, grabbed) in q.iter(world) {
            // Props at rest are looked at ten times a second, a ninth of
            // them each tick; moving ones every tick.
            if avatar.is_none()
                && transfer.is_none()
                && (held.contains(&e)
                    || (body.vel.length_squared() < 0.01 && !(e.index_u32() as u64 + tick).is_multiple_of(9)))
            {
                continue;
            }
            let given_away = !matches!(map.live_owner(&auth.region), Some((o, _)) if o == cfg.server);
            match transfer {
                Some(Transfer(TransferState::Committed(t))) => {
                    // Asked for early: it goes once it has passed the line
                    // (the tick the transfer takes effect, or later); if it
                    // turned back, the transfer is given up. A prop a
                    // neighbour's player grabbed goes wherever it is.
                    let past = given_away
                        || grabbed
                        || handoff_target(&map.tree, &auth.region, body.pos, cfg.handoff_margin_m).is_some();
                    if past && !has_crossed && !given_away && !grabbed {
                        crossed.push(e);
                    }
                    if tick + 1 >= t.effective_tick && past {
                        releases.push((e, t.clone()));
                    } else if tick + 1 >= t.effective_tick + CANCEL_AFTER_TICKS {
                        cancels.push((e, t.clone()));
                    }
                    continue;
                }
                Some(Transfer(TransferState::Cancelling(_))) => continue,
                Some(Transfer(TransferState::Requested { at, .. })) if tick < at + TRANSFER_REQUEST_TIMEOUT_TICKS => {
                    continue;
                }
                Some(Transfer(TransferState::Requested { to_region, not_before, .. })) => {
                    requests.push((e, net.0, *auth, *to_region, body.pos, *not_before));
                    continue;
                }
                Some(Transfer(TransferState::Backoff { until })) if tick < *until => continue,
                _ => {}
            }
            // A region given away (`given_away`): hand the entity to
            // whoever holds the place it is in now, margin or not.
            // Deep inside its region (farther from every face than the
            // overlap zone and the handoff margin), nothing can change at a
            // boundary this tick.
            if transfer.is_none()
                && !given_away
                && faces.depth(&map, &auth.region, body.pos) > cfg.overlap_m + cfg.handoff_margin_m
            {
                continue;
            }
            if let Some(a) = avatar.filter(|a| a.conn.is_some()) {
                // The owner of the leaf the player stands in counts too: out
                // of a region given away, and inside the margin of a
                // neighbour whose owner just changed (the overlap zone of a
                // leaf is outside it), that is the server it goes to next.
                let home = map.tree.leaf_at(body.pos);
                for leaf in map.tree.overlapping_leaves(body.pos, cfg.overlap_m).into_iter().chain(home) {
                    if let Some((owner, _)) = map.live_owner(&leaf)
                        && owner != cfg.server
                        && !a.preconnected.contains(&owner)
                    {
                        hints.push((e, owner));
                    }
                }
            }
            // Out of a region given away, the client first gets time to
            // pre-connect to the new owner (the hint above).
            if given_away && evicting.is_some_and(|ev| tick < ev.not_before) {
                continue;
            }
            let target = if given_away {
                map.tree.leaf_at(body.pos).map(|t| (t, tick + 1))
            } else {
                handoff_target(&map.tree, &auth.region, body.pos, cfg.handoff_margin_m)
                    .map(|t| (t, tick + 1))
                    .or_else(|| predicted_crossing(&map, &cfg, auth, body, tick))
            };
            let Some((target, not_before)) = target else {
                if has_crossed {
                    crossed.push(e);
                }
                continue;
            };
            match map.live_owner(&target) {
                Some((owner, epoch)) if owner == cfg.server => local_moves.push((e, target, epoch)),
                Some(_) => {
                    if not_before == tick + 1 && !given_away && !has_crossed {
                        crossed.push(e);
                    }
                    requests.push((e, net.0, *auth, target, body.pos, not_before));
                }
                None => {}
            }
        }
    }

    for (e, region, epoch) in local_moves {
        if let Some(mut a) = world.get_mut::<Authority>(e) {
            a.region = region;
            a.region_epoch = epoch;
        }
    }
    for (e, owner) in hints {
        let Some(peer) = map.servers.get(&owner) else { continue };
        let hint = ServerControl::PreConnect {
            server: owner,
            quic_addr: peer.quic.clone(),
            cert_sha256: peer.cert_sha256.clone(),
            ticket: None,
        };
        let Some(mut a) = world.get_mut::<Avatar>(e) else { continue };
        a.preconnected.insert(owner);
        let (player, name, conn) = (a.player, a.name.clone(), a.conn);
        debug!(%player, to = %owner, ?conn, "pre-connect hinted");
        let Some(c) = conn else { continue };
        let Some(tx) = world.resource::<Conns>().0.get(&c).map(|c| c.tx.clone()) else { continue };
        // The control task asks the coordinator for a standby ticket and
        // sends the hint with it; with the outbox full, the hint goes now,
        // without one (the client then buys its own).
        if let Err(mpsc::error::TrySendError::Full(SimOut::Hint { hint, .. })) =
            out.0.try_send(SimOut::Hint { player, name, hint, tx })
        {
            metrics.0.hints.with_label_values(&["without_ticket"]).inc();
            send(world.resource::<Conns>(), c, Outbound::Control(hint), &metrics);
        }
    }
    // Crossings seen (or, for an entity back behind the line, forgotten).
    for e in crossed {
        let mut ent = world.entity_mut(e);
        if ent.contains::<Crossed>() {
            ent.remove::<Crossed>();
        } else {
            ent.insert(Crossed(tick));
        }
    }
    for (e, t) in cancels {
        let entity = world.get::<NetId>(e).map(|n| n.0);
        if let Some(entity) = entity
            && out.0.try_send(SimOut::CancelTransfer { entity, transfer_id: t.id }).is_ok()
        {
            debug!(%entity, transfer = t.id, "early transfer given up: the entity did not pass the line");
            world.entity_mut(e).insert(Transfer(TransferState::Cancelling(t)));
            metrics.0.transfers.with_label_values(&["cancel_requested"]).inc();
        }
    }
    for (e, entity, auth, target, pos, not_before) in requests {
        request_transfer(world, e, entity, auth, target, pos, not_before);
    }
    world.resource_mut::<DueReleases>().0.extend(releases);
    *world.resource_mut::<OpenFaces>() = faces;
}

/// Asks the coordinator to hand `e` into `target` from `not_before` on;
/// false if the control task's queue is full (asked again later) or the
/// target's schema lacks a component of the entity (see
/// [`target_understands`]).
pub(crate) fn request_transfer(
    world: &mut World,
    e: Entity,
    entity: shared::EntityId,
    auth: Authority,
    target: shared::RegionKey,
    pos: DVec3,
    not_before: u64,
) -> bool {
    if !target_understands(world, e, entity, target) {
        return false;
    }
    debug!(%entity, from = %auth.region, to = %target, not_before, "transfer requested");
    let registry = world.resource::<SimConfig>().registry.clone();
    let mine = world.resource_mut::<PeerSchemas>().mine(&registry);
    let components = world.get::<Components>(e).map_or_else(Vec::new, |c| mine.entries_of(c.0.set()));
    let req = SimOut::RequestTransfer {
        entity,
        from_region: auth.region,
        from_region_epoch: auth.region_epoch,
        entity_epoch: auth.entity_epoch,
        to_region: target,
        position: pos,
        not_before_tick: not_before,
        components,
    };
    let sent = world.resource::<Outbox>().0.try_send(req).is_ok();
    if sent {
        let tick = world.resource::<TickState>().tick;
        world.entity_mut(e).insert(Transfer(TransferState::Requested { at: tick, to_region: target, not_before }));
    }
    let kind = if sent { "requested" } else { "request_dropped" };
    world.resource::<SimMetrics>().0.transfers.with_label_values(&[kind]).inc();
    sent
}

/// The component schemas of the servers this server syncs ghosts to, as
/// their ghost links fetched them (`sync`): a transfer is asked for only
/// if its target knows every component of the entity as this server does.
#[derive(Resource, Debug, Default)]
pub struct PeerSchemas {
    /// Each server's, and whether it knows every component of this
    /// server's alike (the usual case: nothing to check or filter).
    by_server: std::collections::HashMap<shared::ServerId, (std::sync::Arc<shared::component::Schema>, bool)>,
    /// This server's own, built once.
    mine: Option<std::sync::Arc<shared::component::Schema>>,
}

impl PeerSchemas {
    /// Keeps `schema` as `server`'s; how many servers' are known.
    pub fn learn(
        &mut self,
        server: shared::ServerId,
        schema: std::sync::Arc<shared::component::Schema>,
        registry: &shared::component::Registry,
    ) -> usize {
        let mine = self.mine(registry);
        let all = mine.0.iter().all(|e| schema.0.contains(e));
        self.by_server.insert(server, (schema, all));
        self.by_server.len()
    }

    fn mine(&mut self, registry: &shared::component::Registry) -> std::sync::Arc<shared::component::Schema> {
        self.mine.get_or_insert_with(|| std::sync::Arc::new(registry.schema())).clone()
    }

    /// What of `set` `server` can read, when that is not all of it (`None`:
    /// send it as it is, or the server's schema is not known). A neighbour
    /// of an older build still mirrors what it knows of an entity.
    pub fn readable_by(
        &self,
        server: shared::ServerId,
        set: &shared::component::ComponentSet,
    ) -> Option<shared::component::ComponentSet> {
        let (theirs, all) = self.by_server.get(&server)?;
        let mine = self.mine.as_ref()?;
        if *all {
            return None;
        }
        let knows = |id| mine.0.iter().find(|e| e.id == id).is_some_and(|e| theirs.0.contains(e));
        if set.ids().all(knows) {
            return None;
        }
        let mut kept = set.clone();
        kept.retain(knows);
        Some(kept)
    }

    /// Forgets the servers `live` rejects (gone from the map: ids are never
    /// reused); how many servers' are known.
    pub fn retain(&mut self, live: impl Fn(shared::ServerId) -> bool) -> usize {
        self.by_server.retain(|s, _| live(*s));
        self.by_server.len()
    }
}

/// An entity whose transfer its target's schema refused, and that schema:
/// said once (logged and counted), checked again every time.
#[derive(Component, Debug)]
pub struct SchemaRefused {
    to: shared::ServerId,
    schema: std::sync::Arc<shared::component::Schema>,
}

/// Whether the owner of `target` knows every component of `e` as this
/// server does (same id, name and version), by the schema its ghost link
/// fetched. A server whose schema is not known (not fetched yet, or a build
/// without the call) is asked as before: it refuses a handoff it cannot
/// read itself, after the commit.
fn target_understands(world: &mut World, e: Entity, entity: shared::EntityId, target: RegionKey) -> bool {
    let Some((owner, _)) = world.resource::<Map>().0.live_owner(&target) else { return true };
    let Some((theirs, all)) = world.resource::<PeerSchemas>().by_server.get(&owner).cloned() else { return true };
    // It knows every component this server does, alike: nothing to check.
    if all {
        return true;
    }
    let registry = world.resource::<SimConfig>().registry.clone();
    let mine = world.resource_mut::<PeerSchemas>().mine(&registry);
    let verdict = match world.get::<Components>(e) {
        Some(c) => theirs.understands(&mine, c.0.set()),
        None => Ok(()),
    };
    match verdict {
        Ok(()) => {
            if world.get::<SchemaRefused>(e).is_some() {
                world.entity_mut(e).remove::<SchemaRefused>();
            }
            true
        }
        Err(err) => {
            let said = world
                .get::<SchemaRefused>(e)
                .is_some_and(|r| r.to == owner && std::sync::Arc::ptr_eq(&r.schema, &theirs));
            if !said {
                tracing::warn!(%entity, to = %owner, error = %err, "no transfer asked: the target lacks a component of the entity");
                world.resource::<SimMetrics>().0.transfers.with_label_values(&["schema_refused"]).inc();
                world.entity_mut(e).insert(SchemaRefused { to: owner, schema: theirs });
            }
            false
        }
    }
}

/// Ticks past its effective tick an early transfer waits for its entity to
/// pass the line before it is given up (9: a tenth of a second at 90 Hz).
pub(crate) const CANCEL_AFTER_TICKS: u64 = 9;

/// Where a moving entity's path passes the handoff line within the next
/// `handoff_predict_ticks` ticks: the region it enters and the first tick
/// the new owner would simulate it.
pub(crate) fn predicted_crossing(
    map: &crate::sim::messages::MapView,
    cfg: &SimConfig,
    auth: &Authority,
    body: &Body,
    tick: u64,
) -> Option<(shared::RegionKey, u64)> {
    if cfg.handoff_predict_ticks == 0 || body.vel.length_squared() < 1.0 {
        return None;
    }
    let dt = 1.0 / f64::from(cfg.clock.hz.max(1));
    (1..=cfg.handoff_predict_ticks).find_map(|k| {
        let p = body.pos + body.vel.as_dvec3() * (k as f64 * dt);
        // Past the line at the end of tick + k: the new owner takes over at
        // the next.
        handoff_target(&map.tree, &auth.region, p, cfg.handoff_margin_m).map(|t| (t, tick + k + 1))
    })
}
