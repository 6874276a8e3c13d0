//! A whole mesh in one process, in virtual time: the coordinator's state
//! machine and several simulations, ticked in lockstep, with every message
//! between them routed by the test (overlap sync, transfer requests and
//! commits, handoffs, completions, reclaims, orphans, heartbeats). Races
//! are played out deterministically, and the authority invariants are
//! checked at every tick:
//!
//! - no entity has two authoritative servers; while every server is alive,
//!   each player's avatar has exactly one;
//! - each player's inputs are applied once, in increasing order, across all
//!   servers, and none is skipped.

use std::collections::{BTreeMap, HashMap};

use glam::{DVec3, IVec3};
use mesh_coordinator::state::{Addresses, Command, CoordinatorState, Policy, Response as CResponse, TransferRequest};
use shared::region::{RegionKey, RegionTree};
use shared::wire::{InputFrame, JoinRole};
use shared::{EntityId, PlayerId, ServerId, TickClock};
use tokio::sync::oneshot;

use super::authority::Authority;
use super::core::{Avatar, Index};
use super::ghosts::GhostBatch;
use super::messages::ConnRx;
use super::messages::{AdoptError, CommittedTransfer, HandoffState, SimIn, SimOut};
use super::tests::{GROUND, Harness};
use crate::handoff::{Action, Event, HandoffDriver, ReclaimFor, Refusal, Refused};

const EPOCH: u64 = 1_700_000_000_000_000_000;

pub(super) struct Node {
    pub(super) id: ServerId,
    pub(super) h: Harness,
    pub(super) alive: bool,
    /// The player's connection here (`Play` or `Standby`), kept open.
    conns: Vec<ConnRx>,
    /// The handoff protocol's control-plane half, production's own.
    driver: HandoffDriver,
}

/// A handoff shipped and not yet answered.
struct InFlight {
    state: HandoffState,
    verdict: Option<oneshot::Receiver<Result<(), AdoptError>>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Counts {
    /// Times an avatar's authoritative server changed.
    pub(super) handoffs: u64,
    pub(super) reclaimed: u64,
    /// Early transfers given up (the entity did not pass the line).
    pub(super) cancelled: u64,
    pub(super) orphans_adopted: u64,
    /// Ticks where some player had no authoritative server (only while a
    /// server is dead).
    pub(super) unowned_ticks: u64,
    pub(super) inputs_applied: u64,
    /// Pushes and grabs sent to a prop's owner.
    pub(super) interactions: u64,
}

pub(super) struct MeshSim {
    pub(super) coord: CoordinatorState,
    pub(super) nodes: Vec<Node>,
    pub(super) tick: u64,
    map_version: u64,
    in_flight: Vec<InFlight>,
    /// Emulates a coordinator leader that dies after committing: the next
    /// this many transfer answers are lost (the source asks again).
    pub(super) lose_answers: u32,
    /// Per player: newest input applied anywhere, and where it is simulated.
    newest: HashMap<EntityId, u32>,
    pub(super) owner: BTreeMap<EntityId, ServerId>,
    pub(super) counts: Counts,
    /// Next input sequence per player.
    seq: HashMap<PlayerId, u32>,
    /// Per entity: the servers it was synced to this tick.
    pub(super) fanout: BTreeMap<EntityId, std::collections::BTreeSet<ServerId>>,
}

impl MeshSim {
    /// A grid of `nx` × `ny` × `nz` roots from `origin`, one server per root.
    pub(super) fn new(origin: IVec3, nx: u32, ny: u32, nz: u32) -> Self {
        Self::with_registries(origin, nx, ny, nz, &[])
    }

    /// As [`MeshSim::new`], server `i` knowing the components of
    /// `registries[i]` (the built-in ones past the list's end), and
    /// registered with its schema as production's servers are.
    pub(super) fn with_registries(
        origin: IVec3,
        nx: u32,
        ny: u32,
        nz: u32,
        registries: &[std::sync::Arc<shared::component::Registry>],
    ) -> Self {
        let tree = RegionTree::grid(origin, nx, ny, nz);
        let clock = TickClock::new(EPOCH);
        let mut coord = CoordinatorState::new(Policy::default(), tree, clock);
        let n = nx * ny * nz;
        let tick = 100;
        let now = clock.tick_start(tick) + 1;
        let mut nodes = Vec::new();
        for i in 0..n {
            let registry = registries
                .get(i as usize)
                .cloned()
                .unwrap_or_else(|| std::sync::Arc::new(shared::component::Registry::builtin()));
            let (r, _) = coord.apply(Command::RegisterWithSchema {
                name: format!("gs-{i}"),
                addresses: Addresses { quic: format!("127.0.0.1:{}", 7000 + i), ..Default::default() },
                cert_sha256: "ab".into(),
                capacity_players: 100,
                version: "test".into(),
                schema: registry.schema(),
                now,
            });
            let Ok(CResponse::Registered { server }) = r else { panic!("{r:?}") };
            let mut h = Harness::new(server.0);
            h.world.resource_mut::<super::core::SimConfig>().registry = registry;
            h.tick = tick;
            nodes.push(Node { id: server, h, alive: true, conns: Vec::new(), driver: HandoffDriver::new() });
        }
        let mut sim = Self {
            coord,
            nodes,
            tick,
            map_version: 0,
            in_flight: Vec::new(),
            lose_answers: 0,
            newest: HashMap::new(),
            owner: BTreeMap::new(),
            counts: Counts::default(),
            seq: HashMap::new(),
            fanout: BTreeMap::new(),
        };
        sim.push_map();
        sim
    }

    fn now(&self) -> u64 {
        self.coord.clock.tick_start(self.tick) + 1
    }

    fn node(&mut self, id: ServerId) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == id && n.alive)
    }

    pub(super) fn owner_of_region(&self, key: RegionKey) -> ServerId {
        self.coord.assignments()[&key].server.expect("owned")
    }

    fn push_map(&mut self) {
        if self.coord.map_version() == self.map_version {
            return;
        }
        self.map_version = self.coord.map_version();
        let (view, bad) = crate::convert::map_from_pb(&mesh_coordinator::convert::map_to_pb(&self.coord));
        assert_eq!(bad, 0);
        let view = std::sync::Arc::new(view);
        for n in self.nodes.iter().filter(|n| n.alive) {
            n.h.send(SimIn::Map(view.clone()));
        }
    }

    /// A player joins where it stands: `Play` on the owner of the spot,
    /// `Standby` on every other server (a client near every boundary).
    pub(super) fn join(&mut self, player: PlayerId, at: DVec3) {
        let (_, owner) = self.coord.owner_at(at).map(|(l, r)| (l, r.id)).expect("inside the world");
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            let role = if n.id == owner { JoinRole::Play } else { JoinRole::Standby };
            n.conns.push(n.h.join_as(player.0, player, role, at));
        }
        self.seq.insert(player, 1);
    }

    /// One tick: every player sends `stick(player, tick)` as its input to
    /// every live server; the coordinator and the servers tick; messages are
    /// routed; the invariants are checked.
    pub(super) fn step(&mut self, stick: &dyn Fn(PlayerId, u64) -> [f32; 2]) {
        self.step_frames(&|p, t| InputFrame { locomotion: stick(p, t), ..Default::default() });
    }

    /// One tick, every player sending `frame(player, tick)` (its sequence
    /// number set here).
    pub(super) fn step_frames(&mut self, frame: &dyn Fn(PlayerId, u64) -> InputFrame) {
        self.tick += 1;
        let now = self.now();
        let players: Vec<PlayerId> = self.seq.keys().copied().collect();
        for p in players {
            let seq = self.seq[&p];
            let frame = InputFrame { seq, ..frame(p, self.tick) };
            for n in self.nodes.iter().filter(|n| n.alive) {
                n.h.send(SimIn::Input { conn: p.0, frame });
            }
            self.seq.insert(p, seq + 1);
        }
        // Heartbeats twice a second, and the coordinator's clock.
        if self.tick.is_multiple_of(45) {
            for n in self.nodes.iter().filter(|n| n.alive) {
                let _ = self.coord.apply(Command::Heartbeat { server: n.id, load: Default::default(), now });
                let orphans: Vec<_> = self
                    .coord
                    .orphans_for(n.id)
                    .map(|t| super::messages::Orphan {
                        transfer_id: t.id,
                        from: t.from,
                        entity: t.entity,
                        entity_epoch: t.entity_epoch,
                        to_region: t.to_region,
                        to_region_epoch: t.to_region_epoch,
                    })
                    .collect();
                if !orphans.is_empty() {
                    n.h.send(SimIn::Orphans(orphans));
                }
            }
        }
        let _ = self.coord.apply(Command::Tick { now });
        self.push_map();
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            n.h.step();
            assert_eq!(n.h.tick, self.tick);
        }
        self.route(now);
        self.check();
    }

    fn route(&mut self, now: u64) {
        self.fanout.clear();
        let mut outs = Vec::new();
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            for (to, tick, ghosts) in std::mem::take(&mut n.h.synced) {
                outs.push((n.id, SimOut::Ghosts { to, tick, ghosts }));
            }
            n.h.hints.clear();
            for (player, online) in std::mem::take(&mut n.h.presence) {
                let entity = EntityId::player(player).expect("a player id");
                let _ = self.coord.apply(Command::Presence { server: n.id, player, entity, online, now });
            }
            while let Ok(o) = n.h.next_out() {
                outs.push((n.id, o));
            }
            for c in &mut n.conns {
                super::tests::controls(c);
            }
        }
        let ms = now / 1_000_000;
        let dead: std::collections::BTreeSet<ServerId> =
            self.nodes.iter().map(|n| n.id).filter(|id| !self.coord.server(*id).is_some_and(|s| s.alive)).collect();
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            n.driver.handle(ms, Event::Dead(dead.clone()));
            n.driver.handle_timeout(ms);
        }
        for (from, out) in outs {
            match out {
                SimOut::Ghosts { to, tick, ghosts } => {
                    for g in &ghosts {
                        self.fanout.entry(g.q.id).or_default().insert(to);
                    }
                    if let Some(t) = self.node(to) {
                        t.h.send(SimIn::Ghosts(GhostBatch { from, tick, full: true, ghosts, removed: vec![] }));
                    }
                }
                SimOut::Interact { to, interaction } => {
                    self.counts.interactions += 1;
                    if let Some(t) = self.node(to) {
                        t.h.send(SimIn::Interact { interaction, reply: None });
                    }
                }
                SimOut::Presence { .. } | SimOut::Hint { .. } => {}
                // The handoff protocol: production's driver decides.
                out => {
                    if let Some(n) = self.node(from) {
                        n.driver.handle(ms, Event::Sim(out));
                    }
                }
            }
        }
        // Handoffs on the wire: answered by their target, or, from a dead
        // one, as production's transport answers (no connection).
        for f in std::mem::take(&mut self.in_flight) {
            let target_alive = self.node(f.state.to).is_some();
            let answer = match f.verdict {
                _ if !target_alive => Some(Err(Refused::new(Refusal::Unreachable, "connection refused"))),
                Some(mut v) => match v.try_recv() {
                    Ok(Ok(())) => Some(Ok(())),
                    Ok(Err(e)) => {
                        eprintln!("tick {}: handoff {} refused: {e}", self.tick, f.state.transfer_id);
                        // Through the wire's own encoding, as production.
                        Some(crate::convert::handoff_answer(Err(&crate::convert::adopt_refusal_status(&e))))
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        self.in_flight.push(InFlight { state: f.state.clone(), verdict: Some(v) });
                        None
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Some(Err(Refused::new(Refusal::Busy, "no verdict"))),
                },
                None => Some(Err(Refused::new(Refusal::Unreachable, "no target"))),
            };
            if let Some(answer) = answer
                && let Some(n) = self.node(f.state.from)
            {
                n.driver.handle(ms, Event::HandoffAnswered { transfer_id: f.state.transfer_id, answer });
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                self.perform(i, now);
            }
        }
    }

    /// Carries out node `i`'s driver actions against the coordinator's
    /// state machine and the other simulations, feeding the answers back,
    /// until it has nothing more to do.
    fn perform(&mut self, i: usize, now: u64) {
        let ms = now / 1_000_000;
        let from = self.nodes[i].id;
        while let Some(action) = self.nodes[i].driver.poll_action() {
            let event = match action {
                Action::RequestTransfer(ask) => {
                    let (r, _) = self.coord.apply(Command::RequestTransferOf {
                        request: TransferRequest {
                            entity: ask.entity,
                            from,
                            from_region: ask.from_region,
                            from_region_epoch: ask.from_region_epoch,
                            entity_epoch: ask.entity_epoch,
                            to_region: ask.to_region,
                            not_before_tick: ask.not_before_tick,
                            now,
                        },
                        components: ask.components,
                    });
                    if self.lose_answers > 0 && r.is_ok() {
                        self.lose_answers -= 1;
                        continue;
                    }
                    let answer = match r {
                        Ok(CResponse::Transfer(t)) => Ok(CommittedTransfer {
                            id: t.id,
                            to: t.to,
                            to_region: t.to_region,
                            to_region_epoch: t.to_region_epoch,
                            entity_epoch: t.entity_epoch,
                            effective_tick: t.effective_tick,
                        }),
                        Ok(other) => panic!("{other:?}"),
                        Err(e) => {
                            eprintln!("tick {}: transfer of {} refused: {e}", self.tick, ask.entity);
                            // Through the wire's own encoding, as production.
                            Err(crate::convert::refusal_from_coordinator(&mesh_coordinator::grpc::status_of(e)))
                        }
                    };
                    Some(Event::TransferAnswered { entity: ask.entity, answer })
                }
                Action::SendHandoff(state) => {
                    let (reply, verdict) = oneshot::channel();
                    let verdict = self.node(state.to).map(|t| {
                        t.h.send(SimIn::Adopt { state: state.clone(), reply });
                        verdict
                    });
                    self.in_flight.push(InFlight { state: *state, verdict });
                    None
                }
                Action::Complete { transfer_id } => {
                    let (r, _) = self.coord.apply(Command::CompleteTransfer {
                        transfer_id,
                        from,
                        delivered: true,
                        error: String::new(),
                        now,
                    });
                    assert_eq!(r, Ok(CResponse::Done));
                    None
                }
                Action::Reclaim { transfer_id, error, why } => {
                    let (r, _) = self.coord.apply(Command::ReclaimTransfer { transfer_id, from, error, now });
                    let answer = match r {
                        Ok(CResponse::Reclaimed { entity_epoch }) => Ok(Some(entity_epoch)),
                        Ok(_) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    };
                    Some(match why {
                        ReclaimFor::Undelivered => {
                            self.counts.reclaimed += u64::from(matches!(answer, Ok(Some(_))));
                            Event::ReclaimAnswered { transfer_id, answer }
                        }
                        ReclaimFor::Cancel { entity } => {
                            self.counts.cancelled += u64::from(matches!(answer, Ok(Some(_))));
                            Event::CancelAnswered { entity, answer }
                        }
                    })
                }
                Action::ReportOrphan { transfer_id, adopted } => {
                    let r = self.coord.apply(Command::ResolveOrphan { transfer_id, server: from, adopted, now }).0;
                    assert_eq!(r, Ok(CResponse::Done));
                    self.counts.orphans_adopted += u64::from(adopted);
                    None
                }
                Action::ToSim(msg) => {
                    self.nodes[i].h.send(msg);
                    None
                }
                Action::Count(_) => None,
            };
            if let Some(event) = event {
                self.nodes[i].driver.handle(ms, event);
            }
        }
    }

    /// Entities between two servers: handoffs on the wire, and those a live
    /// source's driver still holds (being delivered or taken back).
    fn in_transit(&self) -> Vec<&HandoffState> {
        let mut v: Vec<&HandoffState> = self.in_flight.iter().map(|f| &f.state).collect();
        for n in self.nodes.iter().filter(|n| n.alive) {
            for s in n.driver.states() {
                if !v.iter().any(|x| x.transfer_id == s.transfer_id) {
                    v.push(s);
                }
            }
        }
        v
    }

    /// The invariants, at this tick.
    fn check(&mut self) {
        let all_alive = self.nodes.iter().all(|n| n.alive);
        let mut seen: BTreeMap<EntityId, Vec<ServerId>> = BTreeMap::new();
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            let world = &mut n.h.world;
            let mut q = world.query::<(&super::core::NetId, &Avatar, &Authority)>();
            for (net, a, _) in q.iter(world) {
                seen.entry(net.0).or_default().push(n.id);
                if let Some((first, last, count)) = a.applied_now {
                    let newest = self.newest.entry(net.0).or_insert(0);
                    assert!(
                        first == *newest + 1 && last - first + 1 == count,
                        "tick {}: server {} applied inputs {first}..={last} ({count}) of {} after {}",
                        self.tick,
                        n.id,
                        net.0,
                        newest
                    );
                    *newest = last;
                    self.counts.inputs_applied += u64::from(count);
                }
            }
        }
        // Released at the end of this tick, adopted at the start of the
        // next: the source simulated this tick.
        let shipped: Vec<HandoffState> = self.in_transit().into_iter().cloned().collect();
        for state in &shipped {
            if state.effective_tick == self.tick + 1 && !seen.contains_key(&state.entity) {
                seen.entry(state.entity).or_default().push(state.from);
                // What it applied this tick before letting go.
                if state.player.is_some() {
                    let newest = self.newest.entry(state.entity).or_insert(0);
                    assert!(state.last_applied_input >= *newest, "tick {}: shipped {state:?}", self.tick);
                    self.counts.inputs_applied += u64::from(state.last_applied_input - *newest);
                    *newest = state.last_applied_input;
                }
            }
        }
        for (e, servers) in &seen {
            assert!(servers.len() == 1, "tick {}: {e} is simulated by {servers:?}", self.tick);
            if let Some(old) = self.owner.insert(*e, servers[0])
                && old != servers[0]
            {
                self.counts.handoffs += 1;
            }
        }
        let players: Vec<EntityId> = self.seq.keys().filter_map(|p| EntityId::player(*p).ok()).collect();
        let unowned = players.iter().filter(|p| !seen.contains_key(p)).count();
        if unowned > 0 {
            assert!(
                !all_alive,
                "tick {}: a player has no authoritative server with every server up; in flight: {:?}; transfers: {:?}",
                self.tick,
                shipped.iter().map(|s| (s.transfer_id, s.effective_tick)).collect::<Vec<_>>(),
                self.coord.transfers()
            );
            self.counts.unowned_ticks += 1;
        }
    }

    /// The server a player's avatar is simulated by.
    pub(super) fn where_is(&mut self, player: PlayerId) -> Option<(ServerId, DVec3)> {
        let id = EntityId::player(player).ok()?;
        for n in self.nodes.iter().filter(|n| n.alive) {
            if let Some(e) = n.h.world.resource::<Index>().by_net.get(&id) {
                return Some((n.id, n.h.world.get::<super::core::Body>(*e)?.pos));
            }
        }
        None
    }

    /// Where a player is, simulated or in transit between two servers.
    pub(super) fn pos(&mut self, player: PlayerId) -> DVec3 {
        if let Some((_, p)) = self.where_is(player) {
            return p;
        }
        let id = EntityId::player(player).expect("a player id");
        self.in_transit().into_iter().find(|s| s.entity == id).map(|s| s.pos).expect("somewhere")
    }

    /// Handoffs whose latency the targets measured, and the sum of those
    /// latencies in ticks (from the tick an entity passed the line).
    pub(super) fn latencies(&self) -> (u64, f64) {
        self.nodes.iter().fold((0, 0.0), |(n, sum), node| {
            let h = &node.h.world.resource::<super::core::SimMetrics>().0.handoff_latency_ticks;
            (n + h.get_sample_count(), sum + h.get_sample_sum())
        })
    }

    pub(super) fn kill(&mut self, id: ServerId) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).expect("a server");
        n.alive = false;
    }

    pub(super) fn run(&mut self, ticks: u64, stick: &dyn Fn(PlayerId, u64) -> [f32; 2]) {
        for _ in 0..ticks {
            self.step(stick);
        }
    }
}

/// Walking speed (m/s) of the simulations: 9; a stick of 1 is 0.1 m a tick.
fn towards(x: f64, target: f64) -> f32 {
    ((target - x) / 0.1).clamp(-1.0, 1.0) as f32
}

#[test]
fn a_player_oscillating_on_the_line_is_not_handed_back_and_forth() {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1995.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    // ±8 m around the face, inside the 10 m margin on both sides.
    for k in 0..12 {
        let target = if k % 2 == 0 { 2008.0 } else { 1992.0 };
        for _ in 0..200 {
            let x = m.pos(p).x;
            m.step(&|_, _| [towards(x, target), 0.0]);
        }
    }
    assert_eq!(m.counts.handoffs, 0, "never past the line: {:?}", m.counts);
    // ±15 m: past the line each way, one handoff per crossing, no more.
    for k in 0..6 {
        let target = if k % 2 == 0 { 2015.0 } else { 1985.0 };
        for _ in 0..400 {
            let x = m.pos(p).x;
            m.step(&|_, _| [towards(x, target), 0.0]);
        }
        let (owner, pos) = m.where_is(p).unwrap();
        let expected = m.owner_of_region(if k % 2 == 0 { RegionKey::root(1, 0, 0) } else { RegionKey::root(0, 0, 0) });
        assert_eq!(owner, expected, "swing {k}: at {pos}");
    }
    assert_eq!(m.counts.handoffs, 6, "{:?}", m.counts);
    assert_eq!(m.coord.transfers_total(), 6);
    // Each asked for early, taking effect the tick after it passed the line.
    assert_eq!(m.latencies(), (6, 6.0), "one tick each");
    assert!(m.counts.inputs_applied > 4000);
}

/// Runs until the coordinator has committed a transfer of `player`'s
/// avatar; returns its source and target.
fn until_committed(m: &mut MeshSim, target: DVec3, within: u64) -> (ServerId, ServerId) {
    for _ in 0..within {
        let p = m.pos(PlayerId(1));
        m.step(&|_, _| [towards(p.x, target.x), 0.0]);
        if let Some(t) = m
            .coord
            .transfers()
            .recent()
            .into_iter()
            .find(|t| t.outcome == mesh_coordinator::state::TransferOutcome::Committed)
        {
            return (t.from, t.to);
        }
    }
    panic!("no transfer committed");
}

#[test]
fn a_player_where_eight_regions_meet_is_synced_to_all_seven_neighbours_and_circles_the_corner() {
    // Eight roots meet at (2000, 0, 2000); the ground is 64 m above, within
    // every one's 100 m overlap zone.
    let mut m = MeshSim::new(IVec3::new(0, -1, 0), 2, 2, 2);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1995.0, GROUND + 1.0, 1995.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let id = EntityId::player(p).unwrap();
    assert_eq!(m.fanout[&id].len(), 7, "synced to every other owner: {:?}", m.fanout);
    // Around the corner, 20 m out, four times: through the four upper roots.
    let corners = [(2020.0, 1980.0), (2020.0, 2020.0), (1980.0, 2020.0), (1980.0, 1980.0)];
    let mut owners = std::collections::BTreeSet::new();
    for _ in 0..2 {
        for (x, z) in corners {
            for _ in 0..450 {
                let at = m.pos(p);
                // The stick's y walks forward (-z at yaw 0).
                m.step(&|_, _| [towards(at.x, x), -towards(at.z, z)]);
            }
            let at = m.pos(p);
            assert!((at.x - x).abs() < 1.0 && (at.z - z).abs() < 1.0, "reached ({x}, {z}): {at}");
            owners.insert(m.where_is(p).unwrap().0);
        }
    }
    assert_eq!(owners.len(), 4, "owned by each upper root's server in turn: {:?}", m.counts);
    assert_eq!(m.counts.handoffs, 8, "one handoff a side, no ping-pong: {:?}", m.counts);
}

#[test]
fn a_region_that_splits_and_moves_with_a_player_inside_keeps_it_in_play() {
    use mesh_coordinator::state::Command;
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(995.0, GROUND + 1.0, 900.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let first = m.where_is(p).unwrap().0;
    let now = m.coord.clock.tick_start(m.tick);
    let (r, _) = m.coord.apply(Command::SplitRegion { region: RegionKey::root(0, 0, 0), now });
    assert!(r.is_ok(), "{r:?}");
    // Walking across the children's faces (x = 1000): the children are all
    // the same server's, so no handoff.
    for _ in 0..400 {
        let x = m.pos(p).x;
        m.step(&|_, _| [towards(x, 1030.0), 0.0]);
    }
    assert_eq!((m.where_is(p).unwrap().0, m.counts.handoffs), (first, 0));
    assert!(m.pos(p).x > 1020.0, "walked over: {}", m.pos(p));
    // The child it stands in moves to the other server: it is handed over.
    let child = RegionKey::new(1, 1, 0, 0);
    let other = m.owner_of_region(RegionKey::root(1, 0, 0));
    let now = m.coord.clock.tick_start(m.tick);
    let (r, _) = m.coord.apply(Command::MoveRegion { region: child, to: other, now });
    assert!(r.is_ok(), "{r:?}");
    m.run(400, &|_, _| [0.0, 0.0]);
    assert_eq!((m.where_is(p).unwrap().0, m.counts.handoffs), (other, 1), "{:?}", m.counts);
}

#[test]
fn a_target_that_dies_mid_transfer_leaves_the_player_with_its_source() {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let (from, to) = until_committed(&mut m, DVec3::new(2030.0, 0.0, 1000.0), 600);
    m.kill(to);
    // It walks on over the line; the handoff finds the target dead.
    m.run(400, &|_, _| [1.0, 0.0]);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(from));
    assert_eq!(m.counts.reclaimed, 1, "{:?}", m.counts);
    assert_eq!(m.coord.transfers().recent()[0].outcome, mesh_coordinator::state::TransferOutcome::Returned);
    // It plays on: inputs keep being applied, in order (checked every tick).
    let before = m.counts.inputs_applied;
    m.run(90, &|_, _| [-1.0, 0.0]);
    assert_eq!(m.counts.inputs_applied - before, 90);
}

#[test]
fn a_source_that_dies_mid_transfer_leaves_the_player_with_its_target() {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let (from, to) = until_committed(&mut m, DVec3::new(2030.0, 0.0, 1000.0), 600);
    m.kill(from);
    m.run(400, &|_, _| [1.0, 0.0]);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(to));
    assert_eq!(m.counts.orphans_adopted, 1, "{:?}", m.counts);
    assert_eq!(m.coord.transfers().recent()[0].outcome, mesh_coordinator::state::TransferOutcome::Adopted);
    // Every input the client sent while nobody simulated it is applied,
    // once, in order: the per-tick check saw no gap.
    assert!(m.counts.unowned_ticks > 90, "{:?}", m.counts);
    let before = m.counts.inputs_applied;
    m.run(90, &|_, _| [1.0, 0.0]);
    assert_eq!(m.counts.inputs_applied - before, 90);
}

#[test]
fn a_transfer_whose_answer_is_lost_with_the_leader_is_not_committed_twice() {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    m.lose_answers = 1;
    let (from, to) = until_committed(&mut m, DVec3::new(2030.0, 0.0, 1000.0), 600);
    // The source never heard: it goes on simulating (over the line), and
    // asks again after its request times out (3 s); the coordinator answers
    // with the same transfer, and the handoff happens.
    for _ in 0..400 {
        let x = m.pos(p).x;
        m.step(&|_, _| [towards(x, 2040.0), 0.0]);
    }
    assert_eq!(m.where_is(p).map(|w| w.0), Some(to), "{:?}", m.coord.transfers());
    assert_eq!(m.coord.transfers().recent().len(), 1, "one transfer: {:?}", m.coord.transfers());
    assert_eq!((m.counts.handoffs, m.counts.unowned_ticks), (1, 0));
    let _ = from;
}

#[test]
fn an_early_transfer_for_a_player_who_stops_short_of_the_line_is_given_up() {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    // Full speed at the line, then a stop 0.5 m before it.
    for _ in 0..400 {
        let x = m.pos(p).x;
        m.step(&|_, _| [if x < 2009.2 { 1.0 } else { 0.0 }, 0.0]);
    }
    let at = m.pos(p).x;
    assert!(at < 2010.0, "stopped short: {at}");
    assert_eq!(m.coord.transfers_total(), 1, "asked early: {:?}", m.coord.transfers());
    assert_eq!((m.counts.cancelled, m.counts.handoffs), (1, 0), "{:?}", m.counts);
    assert_eq!(m.coord.transfers().recent()[0].outcome, mesh_coordinator::state::TransferOutcome::Returned);
    let first = m.owner_of_region(RegionKey::root(0, 0, 0));
    assert_eq!(m.where_is(p).map(|w| w.0), Some(first));
    // Under the epoch the coordinator gave back, it crosses later as usual.
    m.run(200, &|_, _| [1.0, 0.0]);
    assert_eq!(m.counts.handoffs, 1, "{:?}", m.counts);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(m.owner_of_region(RegionKey::root(1, 0, 0))));
}

#[test]
fn a_split_and_a_move_learnt_in_one_map_update_hand_over_players_and_props() {
    use mesh_coordinator::state::Command;
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1500.0, GROUND + 1.0, 500.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let (first, _) = m.where_is(p).unwrap();
    // A box beside the player.
    let prop = m.spawn_box(first, DVec3::new(1503.0, GROUND + 1.0, 500.0), 0.3, 60);
    // The coordinator splits the root and moves the child they stand in
    // (x 1000–2000, z 0–1000) before the server hears of either.
    let other = m.owner_of_region(RegionKey::root(1, 0, 0));
    let now = m.coord.clock.tick_start(m.tick);
    assert!(m.coord.apply(Command::SplitRegion { region: RegionKey::root(0, 0, 0), now }).0.is_ok());
    let child = RegionKey::new(1, 1, 0, 0);
    assert!(m.coord.apply(Command::MoveRegion { region: child, to: other, now }).0.is_ok());
    m.run(400, &|_, _| [0.0, 0.0]);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(other), "{:?}", m.counts);
    let on_other = m.node_of(other);
    assert!(on_other.h.world.resource::<Index>().by_net.contains_key(&prop), "the prop was handed over too");
    assert_eq!(m.lost(), 0);
}

#[test]
fn a_split_while_a_player_stands_past_the_face_keeps_it_with_its_server() {
    use mesh_coordinator::state::Command;
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1995.0, GROUND + 1.0, 500.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    // 5 m into the neighbour's region, inside the hysteresis margin: still
    // its first server's, held through L0:0,0,0.
    for _ in 0..100 {
        let x = m.pos(p).x;
        m.step(&|_, _| [towards(x, 2005.0), 0.0]);
    }
    let first = m.owner_of_region(RegionKey::root(0, 0, 0));
    assert_eq!(m.where_is(p).map(|w| w.0), Some(first));
    // Its region splits: it is held through the child nearest to it.
    let now = m.coord.clock.tick_start(m.tick);
    assert!(m.coord.apply(Command::SplitRegion { region: RegionKey::root(0, 0, 0), now }).0.is_ok());
    m.run(300, &|_, _| [0.0, 0.0]);
    assert_eq!((m.where_is(p).map(|w| w.0), m.counts.handoffs), (Some(first), 0), "{:?}", m.counts);
    assert_eq!(m.lost(), 0);
    // And walks on over the line: handed over as usual.
    m.run(200, &|_, _| [1.0, 0.0]);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(m.owner_of_region(RegionKey::root(1, 0, 0))));
    assert_eq!(m.counts.handoffs, 1);
}

/// A frame that holds the head still, leaning towards +x, and puts the
/// right hand at `hand` (relative to the body), gripping if `grip`.
fn reach_frame(hand: [f32; 3], grip: bool) -> InputFrame {
    use shared::wire::{Pose, buttons};
    let at = |pos| Pose { pos, rot: [0.0, 0.0, 0.0, 1.0] };
    InputFrame {
        head: at([0.8, 1.0, 0.0]),
        left: at([0.3, 0.6, 0.2]),
        right: at(hand),
        buttons: if grip { buttons::GRIP_RIGHT } else { 0 },
        ..Default::default()
    }
}

/// Two servers side by side; a player on the first stands 1 m from the
/// face at x = 2000, and a box the second owns rests 0.4 m past it. Returns
/// the mesh, the prop and its owner's index.
fn a_prop_across_the_line() -> (MeshSim, EntityId, ServerId, ServerId) {
    let mut m = MeshSim::new(IVec3::ZERO, 2, 1, 1);
    let p = PlayerId(1);
    m.join(p, DVec3::new(1999.0, GROUND + 1.0, 500.0));
    let (a, b) = (m.owner_of_region(RegionKey::root(0, 0, 0)), m.owner_of_region(RegionKey::root(1, 0, 0)));
    let prop = m.spawn_box(b, DVec3::new(2000.4, GROUND + 1.0, 500.0), 0.25, 120);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(a));
    (m, prop, a, b)
}

impl MeshSim {
    /// Has `server` spawn a box (half extent `half`) at `pos`, runs `ticks`
    /// ticks with every stick at rest, and returns its id.
    fn spawn_box(&mut self, server: ServerId, pos: DVec3, half: f32, ticks: u64) -> EntityId {
        let (reply, ids) = oneshot::channel();
        self.node_of(server).h.send(SimIn::SpawnProps {
            props: vec![super::messages::PropSpawn {
                pos,
                shape: super::physics::PropShape::Box { half: [half; 3] },
                vel: [0.0; 3],
            }],
            reply,
        });
        self.run(ticks, &|_, _| [0.0, 0.0]);
        ids.blocking_recv().expect("answered").expect("spawned")[0]
    }

    fn node_of(&self, id: ServerId) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("a server")
    }

    /// The servers simulating `e`, and its position on the first.
    fn holders(&self, e: EntityId) -> (Vec<ServerId>, Option<DVec3>) {
        let mut pos = None;
        let servers = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .filter_map(|n| {
                let ent = *n.h.world.resource::<Index>().by_net.get(&e)?;
                pos = pos.or(n.h.world.get::<super::core::Body>(ent).map(|b| b.pos));
                Some(n.id)
            })
            .collect();
        (servers, pos)
    }

    fn ghost_on(&self, server: ServerId, e: EntityId) -> Option<DVec3> {
        self.node_of(server).h.world.resource::<super::ghosts::Ghosts>().by_id.get(&e).map(|g| g.state.q.state().pos)
    }

    fn interactions(&self, server: ServerId, kind: &str, result: &str) -> u64 {
        let m = &self.node_of(server).h.world.resource::<super::core::SimMetrics>().0;
        m.interactions.with_label_values(&[kind, result]).get()
    }

    /// Transfers the servers had to give up as lost.
    fn lost(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.h.world.resource::<super::core::SimMetrics>().0.transfers.with_label_values(&["lost"]).get())
            .sum()
    }
}

#[test]
fn a_hand_pushing_a_neighbours_prop_moves_it_on_its_owner() {
    let (mut m, prop, a, b) = a_prop_across_the_line();
    let (_, rest) = m.holders(prop);
    let rest = rest.expect("simulated");
    let ghost = m.ghost_on(a, prop).expect("the player's server holds a ghost of the box");
    assert!(ghost.distance(rest) < 0.01, "{ghost} vs {rest}");
    // The hand sweeps +x through where the box is, at 4.5 m/s.
    let t0 = m.tick;
    for _ in 0..90 {
        m.step_frames(&|_, t| reach_frame([(0.8 + 0.05 * (t - t0) as f32).min(1.6), 0.25, 0.0], false));
        let (holders, _) = m.holders(prop);
        assert_eq!(holders, vec![b], "tick {}: only its owner simulates it", m.tick);
    }
    let (_, moved) = m.holders(prop);
    let moved = moved.unwrap();
    assert!(moved.x - rest.x > 0.3, "the owner moved the box away from the hand: {rest} -> {moved}");
    assert!(m.interactions(a, "push", "sent") >= 1);
    assert!(m.interactions(b, "push", "applied") >= 1);
    assert_eq!(m.interactions(b, "push", "out_of_reach") + m.interactions(b, "push", "stale_epoch"), 0);
    // And the player's server sees it where its owner put it.
    let ghost = m.ghost_on(a, prop).expect("still a ghost");
    assert!(ghost.distance(moved) < 0.05, "the ghost follows: {ghost} vs {moved}");
}

#[test]
fn a_grabbed_neighbours_prop_arrives_in_the_hand_and_goes_back_when_thrown_over() {
    let (mut m, prop, a, b) = a_prop_across_the_line();
    let p = PlayerId(1);
    // Grip closes with the hand inside the box's ghost.
    let mut arrived_at = None;
    for i in 0..60 {
        m.step_frames(&|_, _| reach_frame([1.35, 0.25, 0.0], true));
        let (holders, _) = m.holders(prop);
        assert!(holders.len() <= 1, "tick {}: {holders:?} simulate the box", m.tick);
        let held = {
            let n = m.node_of(a);
            let e = n.h.world.resource::<Index>().by_player.get(&p).copied().unwrap();
            n.h.world.get::<super::physics::Hands>(e).unwrap().hands[1].held.is_some()
        };
        if held && arrived_at.is_none() {
            assert_eq!(holders, vec![a]);
            arrived_at = Some(i);
        }
    }
    let arrived_at = arrived_at.expect("the box arrived in the hand");
    // The coordinator's lead (9 ticks) and a tick each way.
    assert!(arrived_at <= 14, "arrived after {arrived_at} ticks");
    assert_eq!(m.interactions(b, "grab", "applied"), 1);
    assert_eq!(m.interactions(a, "grab", "arrived"), 1);
    assert!(m.ghost_on(b, prop).is_some(), "the old owner keeps it in view");
    // Thrown hard, up and over into the owner's region: handed back there.
    m.step_frames(&|_, _| reach_frame([1.65, 0.55, 0.0], true));
    m.step_frames(&|_, _| reach_frame([1.95, 0.85, 0.0], false));
    for _ in 0..500 {
        m.step_frames(&|_, _| reach_frame([0.5, 0.5, 0.0], false));
        let (holders, _) = m.holders(prop);
        assert!(holders.len() <= 1, "tick {}: {holders:?} simulate the box", m.tick);
    }
    let (holders, pos) = m.holders(prop);
    let pos = pos.expect("not lost");
    assert!(pos.x > 2020.0, "it flew over: {pos}");
    assert_eq!(holders, vec![b], "back with the owner of where it landed");
    assert_eq!(m.lost(), 0);
}
