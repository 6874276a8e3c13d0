//! The simulation without sockets: a headless world ticked by hand, with the
//! channels standing in for QUIC and gRPC.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use glam::{DVec3, IVec3};
use shared::region::{RegionKey, RegionTree};
use shared::wire::{InputFrame, JoinRole, ServerControl};
use shared::{EntityId, Epoch, PlayerId, ServerId, TickClock};
use tokio::sync::{mpsc, oneshot};

use super::core::*;
use super::messages::*;
use super::{SimParts, schedule, step, world};
use crate::metrics::Metrics;

pub(super) struct Harness {
    pub(super) world: bevy_ecs::world::World,
    schedule: bevy_ecs::schedule::Schedule,
    tx: mpsc::Sender<SimIn>,
    out: mpsc::Receiver<SimOut>,
    /// Directory updates seen by `step`, in order.
    pub(super) presence: Vec<(PlayerId, bool)>,
    /// Pre-connect hints the control task would have put a ticket in.
    pub(super) hints: Vec<(PlayerId, ServerControl)>,
    /// Overlap-sync lists, per tick: (to, tick, ghosts).
    pub(super) synced: Vec<(ServerId, u64, Vec<super::ghosts::GhostState>)>,
    /// The rest of the outbox, for `next_out`.
    outbox: VecDeque<SimOut>,
    pub(super) tick: u64,
}

pub(super) fn map() -> Arc<MapView> {
    let tree = RegionTree::grid(IVec3::ZERO, 2, 1, 1);
    let owners = HashMap::from([
        (RegionKey::root(0, 0, 0), (Some(ServerId(1)), Epoch(1))),
        (RegionKey::root(1, 0, 0), (Some(ServerId(2)), Epoch(2))),
    ]);
    let peer = |n: u16| PeerInfo {
        quic: format!("127.0.0.1:{n}"),
        grpc: String::new(),
        cert_sha256: "ab".into(),
        alive: true,
    };
    let servers = HashMap::from([(ServerId(1), peer(1)), (ServerId(2), peer(2))]);
    Arc::new(MapView { version: 1, tree, owners, servers })
}

/// A flat world (ground at y = 64) for tests about protocol, not terrain.
pub fn flat_world() -> super::WorldParts {
    let params = shared::terrain::TerrainParams {
        hill_amplitude_m: 0.0,
        overhang_m: 0.0,
        tunnel_width: 1e-9,
        ..Default::default()
    };
    let generator = shared::terrain::TerrainGen::with_params(1, shared::chunk::ChunkLayout::default(), params);
    world_parts(generator)
}

/// World parts around `generator` with an in-memory store, generating on
/// the tick thread so that chunk arrival is a function of the tick.
pub fn world_parts(generator: shared::terrain::TerrainGen) -> super::WorldParts {
    let store = crate::store::memory_world_store(&generator.layout);
    super::WorldParts {
        generator: Arc::new(generator),
        writer: crate::store::spawn_writer(store.clone(), 1).expect("writer starts"),
        store,
        checkpoints: None,
        terrain: super::terrain::TerrainSettings { workers: 0, ..Default::default() },
        edits: super::edits::EditSettings::default(),
        physics_origin: DVec3::new(2000.0, 0.0, 1000.0),
    }
}

pub const GROUND: f64 = 64.0;

impl Harness {
    pub(super) fn new(server: u32) -> Self {
        Self::with_world(server, flat_world())
    }

    pub(super) fn with_world(server: u32, world_parts: super::WorldParts) -> Self {
        let (tx, inbox) = mpsc::channel(1024);
        let (outbox, out) = mpsc::channel(1024);
        let parts = SimParts {
            config: SimConfig {
                server: ServerId(server),
                clock: TickClock::new(0),
                handoff_margin_m: 10.0,
                handoff_predict_ticks: 12,
                overlap_m: 100.0,
                walk_speed: 9.0,
                character: shared::controller::CharacterParams::default(),
                world_seed: 1,
                view_radius_m: 500.0,
                snapshot_budget: snapshot_budget(512, 90, 1),
                snapshot_every: 1,
                replication_workers: 1,
                registry: Arc::new(shared::component::Registry::builtin()),
            },
            inbox,
            outbox,
            metrics: Metrics::new(),
            load: Arc::default(),
            map: map(),
            authority_log: None,
            world: world_parts,
        };
        Self {
            world: world(parts),
            schedule: schedule(),
            tx,
            out,
            presence: Vec::new(),
            hints: Vec::new(),
            synced: Vec::new(),
            outbox: VecDeque::new(),
            tick: 100,
        }
    }

    pub(super) fn send(&self, m: SimIn) {
        self.tx.try_send(m).expect("inbox has room");
    }

    /// The next outbox message that is not a directory update or a hint.
    pub(super) fn next_out(&mut self) -> Result<SimOut, mpsc::error::TryRecvError> {
        self.outbox.pop_front().ok_or(mpsc::error::TryRecvError::Empty)
    }

    /// Runs one tick, then does what the control task does with hints (sends
    /// them on, here without a ticket) and keeps directory updates in
    /// `presence`.
    pub(super) fn step(&mut self) {
        self.tick += 1;
        step(&mut self.world, &mut self.schedule, self.tick, 1);
        while let Ok(out) = self.out.try_recv() {
            match out {
                SimOut::Presence { player, online, .. } => self.presence.push((player, online)),
                SimOut::Hint { player, hint, tx, .. } => {
                    self.hints.push((player, hint.clone()));
                    tx.try_send(Outbound::Control(hint)).expect("the client's queue has room");
                }
                SimOut::Ghosts { to, tick, ghosts } => self.synced.push((to, tick, ghosts)),
                other => self.outbox.push_back(other),
            }
        }
    }

    /// Ticks until the terrain around the avatar has loaded and it stands.
    pub(super) fn settle(&mut self) {
        for _ in 0..30 {
            self.step();
        }
        let (_, a) = self.avatar().expect("avatar spawned");
        assert!(a.on_ground, "avatar did not land");
    }

    pub(super) fn join(&self, conn: u64, role: JoinRole, spawn: DVec3) -> ConnRx {
        self.join_as(conn, PlayerId(7), role, spawn)
    }

    pub(super) fn join_as(&self, conn: u64, player: PlayerId, role: JoinRole, spawn: DVec3) -> ConnRx {
        self.join_saved(conn, player, role, spawn, None)
    }

    /// A join with the player's saved components, as the control task
    /// read them.
    pub(super) fn join_saved(
        &self,
        conn: u64,
        player: PlayerId,
        role: JoinRole,
        spawn: DVec3,
        saved: Option<shared::component::ComponentSet>,
    ) -> ConnRx {
        let (tx, rx) = ConnTx::channel(4096, 4096);
        self.send(SimIn::Joined { conn, player, name: "p".into(), role, spawn: Some(spawn), saved, tx });
        rx
    }

    pub(super) fn avatar(&mut self) -> Option<(Body, Avatar)> {
        let e = *self.world.resource::<Index>().by_player.get(&PlayerId(7))?;
        Some((*self.world.get::<Body>(e)?, self.world.get::<Avatar>(e)?.clone()))
    }
}

/// A component set as a game might put on an avatar.
fn rig_and_name() -> shared::component::ComponentSet {
    use shared::component::builtin::{PlayerName, VrRig};
    let mut c = shared::component::ComponentSet::new();
    let (head, hand) = poses();
    c.set(&VrRig::from_poses(&head, &hand, &hand));
    c.set(&PlayerName("ada".into()));
    c
}

/// The head and a hand of the tests' inputs, relative to the body.
fn poses() -> (shared::wire::Pose, shared::wire::Pose) {
    let head = shared::wire::Pose { pos: [0.0, 1.7, 0.0], rot: [0.0, 0.0, 0.0, 1.0] };
    let hand = shared::wire::Pose { pos: [0.3, 1.2, -0.4], rot: glam::Quat::from_rotation_y(0.3).to_array() };
    (head, hand)
}

pub(super) fn input(seq: u32, x: f32) -> InputFrame {
    let (head, hand) = poses();
    InputFrame { seq, locomotion: [x, 0.0], head, left: hand, right: hand, ..Default::default() }
}

/// Everything queued for a connection: its control frames and its newest snapshot.
fn drain(rx: &mut ConnRx) -> (Vec<ServerControl>, Option<shared::wire::Snapshot>) {
    let (mut controls, mut last) = (Vec::new(), None);
    // The tests' clients acknowledge no snapshot: each one is a full state.
    let mut snapshots = shared::snapshot::Receiver::default();
    while let Some(o) = rx.try_recv() {
        match o {
            Outbound::Control(c) => controls.push(c),
            Outbound::Datagram(b) => last = Some(snapshots.receive(&b).expect("a snapshot decodes")),
        }
    }
    (controls, last)
}

/// Everything sent on a connection, in order: snapshots as `Ok`, control
/// messages as `Err`.
pub(super) fn drain_all(rx: &mut ConnRx) -> Vec<Result<shared::wire::Snapshot, ServerControl>> {
    let mut snapshots = shared::snapshot::Receiver::default();
    let mut out = Vec::new();
    while let Some(o) = rx.try_recv() {
        out.push(match o {
            Outbound::Control(c) => Err(c),
            Outbound::Datagram(b) => Ok(snapshots.receive(&b).expect("a snapshot decodes")),
        });
    }
    out
}

pub(super) fn controls(rx: &mut ConnRx) -> Vec<ServerControl> {
    drain(rx).0
}

pub(super) fn last_snapshot(rx: &mut ConnRx) -> Option<shared::wire::Snapshot> {
    drain(rx).1
}

#[test]
fn inputs_apply_once_in_order_and_snapshots_acknowledge_them() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1000.0, 10.0, 1000.0));
    h.step();
    assert!(matches!(controls(&mut rx)[..], [ServerControl::Welcome { authoritative: true, world_seed: 1, .. }]));
    h.settle();
    let x0 = h.avatar().expect("avatar").0.pos.x;
    // Out of order, with a duplicate: applied as 1, 2, 3, once each.
    for s in [2, 1, 3, 2] {
        h.send(SimIn::Input { conn: 1, frame: input(s, 1.0) });
    }
    h.step();
    let (body, avatar) = h.avatar().expect("avatar spawned");
    assert_eq!(avatar.last_applied, 3);
    assert!(avatar.pending.is_empty());
    assert!((body.pos.x - (x0 + 9.0 / 90.0)).abs() < 1e-4, "moved one tick at 9 m/s: {}", body.pos.x);
    assert!((body.pos.y - GROUND).abs() < 1e-3, "walks on the ground: {}", body.pos.y);
    assert_eq!(last_snapshot(&mut rx).map(|s| s.last_input_seq), Some(3));
    // A late duplicate of an applied input is ignored.
    h.send(SimIn::Input { conn: 1, frame: input(3, -1.0) });
    h.step();
    assert_eq!(h.avatar().map(|(_, a)| a.locomotion), Some([1.0, 0.0]));
}

#[test]
fn snapshots_keep_to_the_budget_near_movers_update_most_and_nothing_starves() {
    let mut h = Harness::new(1);
    let centre = DVec3::new(1000.0, 10.0, 1000.0);
    let mut me = h.join(1, JoinRole::Play, centre);
    // Eighty players around, 3 to 90 m away, all walking, with ids spread
    // like real accounts' (39 bits).
    let pid = |i: u64| PlayerId((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 25);
    let mut others = Vec::new();
    for i in 0..80u64 {
        let r = 3.0 + 1.1 * i as f64;
        let a = i as f64 * 2.4;
        let at = centre + DVec3::new(r * a.cos(), 0.0, r * a.sin());
        others.push((h.join_as(100 + i, pid(i), JoinRole::Play, at), r));
    }
    let mut client = shared::snapshot::Receiver::default();
    let mut last: HashMap<EntityId, DVec3> = HashMap::new();
    let mut updates: HashMap<EntityId, Vec<u64>> = HashMap::new();
    let budget = snapshot_budget(512, 90, 1);
    let (mut max_len, mut seq) = (0, 0);
    for t in 0..180u64 {
        seq += 1;
        let ack = client.ack();
        h.send(SimIn::Input { conn: 1, frame: InputFrame { seq, ack_tick: ack, ..Default::default() } });
        for i in 0..80u64 {
            let x = if (t / 45 + i).is_multiple_of(2) { 1.0 } else { -1.0 };
            h.send(SimIn::Input { conn: 100 + i, frame: input(seq, x) });
        }
        h.step();
        for (rx, _) in &mut others {
            while rx.try_recv().is_some() {}
        }
        while let Some(o) = me.try_recv() {
            let Outbound::Datagram(b) = o else { continue };
            max_len = max_len.max(b.len());
            let snap = client.receive(&b).expect("decodes against what it acknowledged");
            for e in snap.entities.iter().filter(|e| e.id != EntityId(7)) {
                if last.insert(e.id, e.pos).is_none_or(|p| p != e.pos) {
                    updates.entry(e.id).or_default().push(t);
                }
            }
        }
    }
    assert!(max_len <= budget, "{max_len} > {budget}");
    assert_eq!(updates.len(), 80, "every player in view is known");
    // Over the last second (everyone walking): the nearest ten update more
    // often than the farthest ten, and each of those still gets updates.
    let id = |i: u64| EntityId::player(pid(i)).unwrap();
    let recent = |i: u64| updates[&id(i)].iter().filter(|t| **t >= 90).count();
    let near: usize = (0..10).map(recent).sum();
    let far: usize = (70..80).map(recent).sum();
    eprintln!(
        "updates over the last 90 ticks: nearest ten {near}, farthest ten {far}, largest datagram {max_len} of {budget}"
    );
    assert!(near > far, "near {near} vs far {far}");
    for i in 70..80 {
        let ticks = &updates[&id(i)];
        let gaps = ticks.windows(2).filter(|w| w[0] >= 90).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(recent(i) >= 3 && gaps <= 45, "player {i} starves: {ticks:?}");
    }
}

#[test]
fn at_half_the_tick_rate_players_take_turns_by_id_and_each_snapshot_gets_twice_the_bytes() {
    let mut h = Harness::new(1);
    let every = 2;
    {
        let mut c = h.world.resource_mut::<SimConfig>();
        c.snapshot_every = every;
        c.snapshot_budget = snapshot_budget(512, 90, every);
    }
    // Twice the bytes, less one datagram's overhead, within a datagram.
    let twice = (2 * snapshot_budget(512, 90, 1) + 45).min(shared::wire::MAX_DATAGRAM);
    assert_eq!(snapshot_budget(512, 90, every), twice);
    let centre = DVec3::new(1000.0, 10.0, 1000.0);
    let mut rxs: Vec<(EntityId, ConnRx, shared::snapshot::Receiver, Vec<u64>)> = (1..=4u64)
        .map(|i| {
            let at = centre + DVec3::new(3.0 * i as f64, 0.0, 0.0);
            let rx = h.join_as(i, PlayerId(i), JoinRole::Play, at);
            (EntityId::player(PlayerId(i)).unwrap(), rx, shared::snapshot::Receiver::default(), Vec::new())
        })
        .collect();
    for seq in 1..=40u32 {
        for (i, (_, _, client, _)) in rxs.iter().enumerate() {
            let frame = InputFrame { seq, ack_tick: client.ack(), ..Default::default() };
            h.send(SimIn::Input { conn: i as u64 + 1, frame });
        }
        h.step();
        for (_, rx, client, ticks) in &mut rxs {
            while let Some(o) = rx.try_recv() {
                let Outbound::Datagram(b) = o else { continue };
                let snap = client.receive(&b).expect("decodes");
                ticks.push(snap.tick);
            }
        }
    }
    for (id, _, _, ticks) in &rxs {
        // A newcomer's first snapshot comes at once; then every other
        // tick, on the turn its id gives it (the same on every server: the
        // mesh shares one tick grid).
        let on_turn = &ticks[1..];
        assert!(on_turn.len() >= 18, "{id:?} got {ticks:?}");
        assert!(on_turn.windows(2).all(|w| w[1] - w[0] == every), "{id:?} got {ticks:?}");
        assert!(on_turn.iter().all(|t| (t + id.0).is_multiple_of(every)), "{id:?} got {ticks:?}");
        assert!(ticks[1] - ticks[0] <= every, "{id:?} got {ticks:?}");
    }
    // Turns are shared out: players of both parities.
    assert!(rxs.iter().any(|r| r.0.0 % 2 == 0) && rxs.iter().any(|r| r.0.0 % 2 == 1));
    // Under load the loop skips a tick: nobody loses its snapshot, those
    // whose turn it was get theirs on the next tick that runs.
    h.tick += 1;
    let skipped = h.tick;
    h.step();
    for (id, rx, client, _) in &mut rxs {
        let mut got = Vec::new();
        while let Some(o) = rx.try_recv() {
            let Outbound::Datagram(b) = o else { continue };
            got.push(client.receive(&b).expect("decodes").tick);
        }
        if (skipped + id.0).is_multiple_of(every) {
            assert_eq!(got, [skipped + 1], "{id:?}: its turn was skipped");
        }
    }
}

#[test]
fn a_player_sees_who_comes_near_within_a_search_and_who_leaves_at_once() {
    let mut h = Harness::new(1);
    let centre = DVec3::new(1000.0, 10.0, 1000.0);
    let mut me = h.join(1, JoinRole::Play, centre);
    let mut client = shared::snapshot::Receiver::default();
    let seen = |h: &mut Harness, me: &mut ConnRx, client: &mut shared::snapshot::Receiver, seq: u32| {
        h.send(SimIn::Input { conn: 1, frame: InputFrame { seq, ack_tick: client.ack(), ..Default::default() } });
        h.step();
        let mut ids = Vec::new();
        while let Some(o) = me.try_recv() {
            let Outbound::Datagram(b) = o else { continue };
            ids = client.receive(&b).expect("decodes").entities.iter().map(|e| e.id).collect();
        }
        ids
    };
    for seq in 1..=3 {
        seen(&mut h, &mut me, &mut client, seq);
    }
    // A newcomer 10 m away: in the snapshots within one candidate search.
    let mut other = h.join_as(2, PlayerId(2), JoinRole::Play, centre + DVec3::new(10.0, 0.0, 0.0));
    let them = EntityId::player(PlayerId(2)).unwrap();
    let mut after = None;
    for t in 0..=super::replication::CANDIDATE_SEARCH_TICKS + 1 {
        if seen(&mut h, &mut me, &mut client, 10 + t as u32).contains(&them) {
            after = Some(t);
            break;
        }
        while other.try_recv().is_some() {}
    }
    let after = after.expect("the newcomer is seen within a search");
    assert!(after <= super::replication::CANDIDATE_SEARCH_TICKS, "seen after {after} ticks");
    // Gone from the server: gone from the next snapshot.
    h.send(SimIn::Left { conn: 2 });
    h.step();
    while me.try_recv().is_some() {}
    assert!(!seen(&mut h, &mut me, &mut client, 40).contains(&them), "a player who left is removed");
}

#[test]
fn a_spawn_in_another_servers_region_is_refused() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(2500.0, 10.0, 1000.0));
    h.step();
    match &controls(&mut rx)[..] {
        [ServerControl::Refused { reason }] => assert!(reason.starts_with("not_owner"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(h.avatar().is_none());
}

#[test]
fn crossing_the_line_requests_a_transfer_and_releases_at_the_committed_tick() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1999.0, 10.0, 1000.0));
    h.step();
    // The game's state on the avatar goes with it.
    let components = rig_and_name();
    let e = h.world.resource::<Index>().by_player[&PlayerId(7)];
    h.world.entity_mut(e).insert(Components(shared::component::Tracked::new(components.clone(), h.tick)));
    // Inside the hysteresis margin: no request, but the neighbour is hinted, once.
    assert!(controls(&mut rx).iter().any(|c| matches!(c, ServerControl::PreConnect { server: ServerId(2), .. })));
    h.step();
    assert!(h.next_out().is_err());
    assert!(!controls(&mut rx).iter().any(|c| matches!(c, ServerControl::PreConnect { .. })));
    // Past the line: one request, not one per tick.
    // 0.1 m a tick: 11 m to walk.
    for s in 1..=120 {
        h.send(SimIn::Input { conn: 1, frame: input(s, 1.0) });
        h.step();
    }
    let req = h.next_out().expect("a transfer request");
    let SimOut::RequestTransfer { entity, to_region, from_region_epoch, .. } = req else { panic!("{req:?}") };
    assert_eq!((entity, to_region, from_region_epoch), (EntityId(7), RegionKey::root(1, 0, 0), Epoch(1)));
    assert!(h.next_out().is_err(), "requested once");
    let effective = h.tick + 4;
    h.send(SimIn::TransferCommitted {
        entity,
        transfer: CommittedTransfer {
            id: 1,
            to: ServerId(2),
            to_region,
            to_region_epoch: Epoch(2),
            entity_epoch: Epoch(1),
            effective_tick: effective,
        },
    });
    h.step();
    h.step();
    assert!(h.avatar().is_some(), "still simulated here before effective - 1");
    let applied_before = h.avatar().unwrap().1.last_applied;
    h.send(SimIn::Input { conn: 1, frame: input(121, 1.0) });
    h.send(SimIn::Input { conn: 1, frame: input(122, 1.0) });
    h.step(); // tick effective - 1: simulated here, then released with its inputs applied
    assert_eq!(h.tick, effective - 1);
    let SimOut::Handoff(state) = h.next_out().expect("handoff shipped") else { panic!() };
    assert_eq!(state.effective_tick, effective);
    assert_eq!(state.last_applied_input, 122);
    assert_eq!(state.components, components, "the components travel with the entity");
    assert!(applied_before < 122);
    assert!(h.avatar().is_none(), "the source no longer simulates the avatar");
    assert!(controls(&mut rx).iter().any(|c| matches!(c, ServerControl::AuthorityMoved { to: ServerId(2), effective_tick } if *effective_tick == effective)));
    // It stays in view here, as a ghost of its new owner.
    let ghost = h.world.resource::<super::ghosts::Ghosts>().by_id.get(&EntityId(7)).cloned().expect("a ghost");
    assert_eq!((ghost.state.q.authority, ghost.state.region), (ServerId(2), RegionKey::root(1, 0, 0)));
}

#[test]
fn a_player_inside_the_margin_of_a_region_that_changes_owner_is_hinted_before_any_request() {
    // Both roots are this server's; the player walks 5 m into the second,
    // within the hysteresis margin, so it still belongs to the first.
    let mut h = Harness::new(1);
    let one_owner = {
        let mut m = (*map()).clone();
        m.owners.insert(RegionKey::root(1, 0, 0), (Some(ServerId(1)), Epoch(3)));
        Arc::new(m)
    };
    h.send(SimIn::Map(one_owner.clone()));
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1995.0, 10.0, 1000.0));
    h.step();
    for s in 1..=100 {
        h.send(SimIn::Input { conn: 1, frame: input(s, 1.0) });
        h.step();
    }
    h.send(SimIn::Input { conn: 1, frame: input(101, 0.0) });
    h.step();
    let (body, _) = h.avatar().expect("avatar");
    assert!(body.pos.x > 2003.0 && body.pos.x < 2010.0, "{}", body.pos);
    assert!(!controls(&mut rx).iter().any(|c| matches!(c, ServerControl::PreConnect { .. })), "one owner: no hint");
    assert!(h.next_out().is_err());
    // The second root goes to server 2 (a balancer move): the player stands
    // in it, so it must pre-connect there before it walks any deeper.
    let mut moved = (*one_owner).clone();
    moved.version = 3;
    moved.owners.insert(RegionKey::root(1, 0, 0), (Some(ServerId(2)), Epoch(4)));
    h.send(SimIn::Map(Arc::new(moved)));
    h.step();
    assert!(
        controls(&mut rx).iter().any(|c| matches!(c, ServerControl::PreConnect { server: ServerId(2), .. })),
        "hinted to the owner of the region it stands in"
    );
}

#[test]
fn the_target_adopts_at_the_effective_tick_and_merges_buffered_inputs() {
    let mut h = Harness::new(2);
    let mut rx = h.join(5, JoinRole::Standby, DVec3::ZERO);
    // The standby connection buffered inputs 10..=14 before the handoff.
    for s in 10..=14 {
        h.send(SimIn::Input { conn: 5, frame: input(s, 1.0) });
    }
    h.step();
    assert!(h.avatar().is_none());
    let effective = h.tick + 2;
    let state = HandoffState {
        transfer_id: 1,
        from: ServerId(1),
        to: ServerId(2),
        entity: EntityId(7),
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
        effective_tick: effective,
        pos: DVec3::new(2011.0, GROUND, 1000.0),
        yaw: 0.0,
        vel: glam::Vec3::ZERO,
        player: Some(PlayerId(7)),
        last_applied_input: 11,
        pending_inputs: vec![input(12, 1.0)],
        prop: None,
        crossed_tick: None,
        components: rig_and_name(),
    };
    let (reply, verdict) = oneshot::channel();
    h.send(SimIn::Adopt { state: Box::new(state.clone()), reply });
    h.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    assert!(h.avatar().is_none(), "not before the effective tick");
    // The same handoff again is stale.
    let (reply, verdict) = oneshot::channel();
    h.send(SimIn::Adopt { state: Box::new(state), reply });
    h.step();
    assert_eq!(h.tick, effective);
    assert!(matches!(verdict.blocking_recv().unwrap(), Err(AdoptError::StaleEntityEpoch(..))));
    let (_, avatar) = h.avatar().expect("adopted at the effective tick");
    assert_eq!(avatar.last_applied, 14, "12 from the source, 13 and 14 from the standby buffer; 10 and 11 dropped");
    let e = h.world.resource::<Index>().by_player[&PlayerId(7)];
    assert_eq!(h.world.get::<Components>(e).map(|c| c.0.set()), Some(&rig_and_name()), "adopted with its components");
    let (controls, snapshot) = drain(&mut rx);
    assert!(
        controls
            .iter()
            .any(|c| matches!(c, ServerControl::AuthorityGained { effective_tick } if *effective_tick == effective))
    );
    assert_eq!(snapshot.map(|s| (s.authoritative, s.last_input_seq)), Some((true, 14)));
}

#[test]
fn an_avatar_handed_over_before_its_player_connected_takes_the_name_it_connects_with() {
    // Without a name, the standby tickets of its later pre-connect hints
    // are refused by the coordinator (a name is 1..=64 bytes).
    let mut h = Harness::new(2);
    let effective = h.tick + 2;
    let state = HandoffState {
        transfer_id: 1,
        from: ServerId(1),
        to: ServerId(2),
        entity: EntityId(7),
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
        effective_tick: effective,
        pos: DVec3::new(2011.0, GROUND, 1000.0),
        yaw: 0.0,
        vel: glam::Vec3::ZERO,
        player: Some(PlayerId(7)),
        last_applied_input: 0,
        pending_inputs: Vec::new(),
        prop: None,
        crossed_tick: None,
        components: Default::default(),
    };
    let (reply, verdict) = oneshot::channel();
    h.send(SimIn::Adopt { state: Box::new(state), reply });
    h.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    h.step();
    assert_eq!(h.avatar().expect("adopted").1.name, "", "no connection of the player here yet");
    let _rx = h.join(5, JoinRole::Play, DVec3::ZERO);
    h.step();
    assert_eq!(h.avatar().expect("adopted").1.name, "p");
}

#[test]
fn a_handoff_for_another_server_is_refused() {
    let mut h = Harness::new(2);
    let (reply, verdict) = oneshot::channel();
    let state = HandoffState {
        transfer_id: 1,
        from: ServerId(1),
        to: ServerId(3),
        entity: EntityId(7),
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
        effective_tick: 0,
        pos: DVec3::ZERO,
        yaw: 0.0,
        vel: glam::Vec3::ZERO,
        player: None,
        last_applied_input: 0,
        pending_inputs: vec![],
        prop: None,
        crossed_tick: None,
        components: Default::default(),
    };
    h.send(SimIn::Adopt { state: Box::new(state), reply });
    h.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Err(AdoptError::WrongServer(ServerId(3))));
}

pub(super) fn prop_pos(h: &mut Harness, id: EntityId) -> DVec3 {
    let e = *h.world.resource::<Index>().by_net.get(&id).expect("prop indexed");
    h.world.get::<Body>(e).expect("prop has a body").pos
}

pub(super) fn spawn_box(h: &mut Harness, pos: DVec3) -> EntityId {
    let (reply, rx) = oneshot::channel();
    h.send(SimIn::SpawnProps {
        props: vec![PropSpawn { pos, shape: super::physics::PropShape::Box { half: [0.25; 3] }, vel: [0.0; 3] }],
        reply,
    });
    h.step();
    rx.blocking_recv().expect("answered").expect("spawned")[0]
}

#[test]
fn props_rest_on_the_terrain_and_fall_when_dug_under() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5));
    h.settle();
    let id = spawn_box(&mut h, DVec3::new(1002.5, GROUND + 1.5, 1000.5));
    for _ in 0..300 {
        h.step();
    }
    let rest = prop_pos(&mut h, id);
    assert!((rest.y - (GROUND + 0.25)).abs() < 0.02, "resting on the ground: {rest}");
    // Dig a pit under it.
    h.send(SimIn::Edit {
        conn: 1,
        id: 9,
        op: shared::edit::EditOp::Dig { center: DVec3::new(1002.5, GROUND - 1.0, 1000.5), radius: 2.0 },
    });
    let mut done = None;
    for _ in 0..200 {
        h.step();
        for c in controls(&mut rx) {
            if let ServerControl::EditResult { id: 9, outcome } = c {
                done = Some(outcome);
            }
        }
        if done.is_some() {
            break;
        }
    }
    assert!(
        matches!(done, Some(shared::wire::EditOutcome::Done { changed }) if changed > 10),
        "edit acknowledged: {done:?}"
    );
    for _ in 0..90 {
        h.step();
    }
    let fallen = prop_pos(&mut h, id);
    assert!(fallen.y < GROUND - 1.0, "fell into the pit: {fallen}");
}

#[test]
fn a_region_given_away_hands_its_players_over_in_place_and_drops_them_when_refused_for_good() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(500.0, 10.0, 1000.0));
    h.step();
    let _ = controls(&mut rx);
    // The coordinator moves region 0 (deep inside it, far from any face) to
    // server 2 under a new epoch, as a drain would.
    let mut moved = (*map()).clone();
    moved.version = 2;
    moved.owners.insert(RegionKey::root(0, 0, 0), (Some(ServerId(2)), Epoch(3)));
    h.send(SimIn::Map(Arc::new(moved)));
    h.step();
    assert!(h.avatar().is_some(), "the player is kept, not dropped");
    // The client is told to pre-connect at once, and given time to.
    let told = controls(&mut rx);
    assert!(told.iter().any(|c| matches!(c, ServerControl::PreConnect { server: ServerId(2), .. })), "{told:?}");
    for _ in 1..super::authority::EVICT_GRACE_TICKS {
        assert!(h.next_out().is_err(), "no handoff before the client could pre-connect");
        h.step();
    }
    h.step();
    let req = h.next_out().expect("a transfer request");
    let SimOut::RequestTransfer { entity, from_region, from_region_epoch, to_region, .. } = req else {
        panic!("{req:?}")
    };
    // Out of the region under the old epoch, into the same region, now server 2's.
    let r0 = RegionKey::root(0, 0, 0);
    assert_eq!((from_region, from_region_epoch, to_region), (r0, Epoch(1), r0));
    // An outage only delays it; a final refusal (the release ended) drops it.
    h.send(SimIn::TransferRefused { entity, reason: "unavailable".into(), permanent: false });
    h.step();
    assert!(h.avatar().is_some());
    h.send(SimIn::TransferRefused { entity, reason: "stale_epoch".into(), permanent: true });
    h.step();
    assert!(h.avatar().is_none());
}

#[test]
fn the_directory_hears_of_a_spawn_and_a_leave() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(500.0, 10.0, 1000.0));
    h.step();
    while h.next_out().is_ok() {}
    let player = h.avatar().map(|(_, a)| a.player).expect("spawned");
    assert_eq!(h.presence, [(player, true)]);
    h.send(SimIn::Left { conn: 1 });
    h.step();
    while h.next_out().is_ok() {}
    assert_eq!(h.presence, [(player, true), (player, false)]);
}

#[test]
fn the_position_feed_samples_what_the_server_owns_and_keeps_to_its_bound() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5));
    h.settle();
    for i in 0..9 {
        spawn_box(&mut h, DVec3::new(1003.0 + f64::from(i), GROUND + 0.5, 1001.0));
    }
    let ask = |h: &mut Harness, max: usize| {
        let (reply, rx) = oneshot::channel();
        h.send(SimIn::Positions { max, reply });
        h.step();
        rx.blocking_recv().expect("answered")
    };
    let all = ask(&mut h, 1000);
    assert_eq!((all.total, all.entities.len()), (10, 10), "{all:?}");
    assert_eq!(all.entities.iter().filter(|e| e.3 == 0).count(), 1, "one player: {all:?}");
    let p = all.entities.iter().find(|e| e.3 == 0).unwrap();
    let body = h.avatar().expect("avatar").0;
    assert!((p.0 - body.pos.x).abs() <= 0.05 && (p.2 - body.pos.z).abs() <= 0.05, "{p:?} vs {}", body.pos);
    assert!(all.entities.iter().all(|e| (e.0 * 10.0).fract() == 0.0), "rounded to 0.1 m: {all:?}");
    let few = ask(&mut h, 3);
    assert_eq!(few.total, 10);
    assert!(!few.entities.is_empty() && few.entities.len() <= 3, "{few:?}");
}

/// From `parallel_from` players a tick, a tick's snapshots are built by
/// the pool while the tick thread runs the next tick: the same bytes, at
/// most a tick later, every player served every tick.
#[test]
fn snapshots_built_by_the_pool_behind_the_tick_are_the_tick_threads_a_tick_later() {
    use super::replication::ReplicationPool;
    const PLAYERS: u64 = 6;
    const TICKS: u32 = 60;
    // Per connection, the datagrams it was sent, and how many had come by
    // the end of each tick.
    let run = |behind: bool| -> (Vec<Vec<Vec<u8>>>, Vec<Vec<usize>>) {
        let mut h = Harness::new(1);
        let pool = if behind {
            let mut p = ReplicationPool::new(1).expect("a pool");
            p.parallel_from = 1;
            p
        } else {
            ReplicationPool::default()
        };
        h.world.insert_resource(pool);
        let mut rxs: Vec<ConnRx> = (0..PLAYERS)
            .map(|i| {
                let at = DVec3::new(1000.0 + i as f64 * 3.0, GROUND + 1.0, 1000.0);
                h.join_as(i + 1, PlayerId(i + 10), JoinRole::Play, at)
            })
            .collect();
        let mut sent = vec![Vec::new(); PLAYERS as usize];
        let mut by_tick = vec![Vec::new(); PLAYERS as usize];
        for seq in 1..=TICKS {
            for conn in 1..=PLAYERS {
                h.send(SimIn::Input { conn, frame: input(seq, if seq > 30 { 1.0 } else { 0.0 }) });
            }
            h.step();
            for (c, rx) in rxs.iter_mut().enumerate() {
                while let Some(o) = rx.try_recv() {
                    if let Outbound::Datagram(b) = o {
                        sent[c].push(b.to_vec());
                    }
                }
                by_tick[c].push(sent[c].len());
            }
        }
        (sent, by_tick)
    };
    let (now, now_by_tick) = run(false);
    let (behind, behind_by_tick) = run(true);
    for c in 0..PLAYERS as usize {
        assert_eq!(now[c].len(), TICKS as usize, "every player a snapshot a tick");
        assert!(behind[c].len() >= TICKS as usize - 1, "the last tick's may still be on the way");
        assert_eq!(behind[c][..], now[c][..behind[c].len()], "the same snapshots");
        // Tick t's leaves by the end of tick t + 1 (the pool may be
        // quicker than the rest of tick t).
        for t in 1..TICKS as usize {
            assert!(behind_by_tick[c][t] >= now_by_tick[c][t - 1], "conn {c}, tick {t}: late");
        }
    }
}

/// Every entity this server owns is checkpointed about twice a second
/// while it changes (not while it rests), with its persisted components
/// and where it is; a player who leaves is tombstoned, not resumed.
#[test]
fn owned_entities_are_checkpointed_as_they_change_and_a_player_who_leaves_is_not_resumed() {
    use persistence::Store as _;
    use shared::component::builtin::Transform;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let memory = Arc::new(persistence::memory::MemoryStore::new(32 * 32 * 32));
    let metrics = Metrics::new();
    let writer = crate::checkpoint::spawn_checkpoint_writer(
        crate::store::WorldStore::new(memory.clone(), rt.handle().clone()),
        metrics.clone(),
    )
    .expect("writer starts");
    let mut h = Harness::new(1);
    h.world.insert_resource(super::checkpoints::Checkpoints(Some(writer.clone())));
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1000.0, GROUND + 1.0, 1000.0));
    let prop = spawn_box(&mut h, DVec3::new(1005.0, GROUND + 0.3, 1000.0));
    h.settle();
    let player = EntityId::player(PlayerId(7)).expect("a player id");
    let stored = || {
        std::thread::sleep(crate::checkpoint::FLUSH_INTERVAL * 3);
        rt.block_on(memory.checkpoints_within([-1e9; 3], [1e9; 3])).expect("read")
    };
    for seq in 1..=90 {
        h.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
        h.step();
    }
    let rows = stored();
    let mine = rows.iter().find(|r| r.entity == player.0).expect("the player is checkpointed");
    let (body, _) = h.avatar().expect("simulated");
    assert!(h.tick - mine.tick < super::checkpoints::CHECKPOINT_EVERY_TICKS, "at most half a second old");
    assert!(body.pos.x - mine.pos[0] < 9.0 * 0.5 + 0.1 && mine.pos[0] > 1001.0, "where it walked: {:?}", mine.pos);
    let registry = shared::component::Registry::builtin();
    let (set, _) = shared::component::ComponentSet::decode_saved(&mine.components, &registry).expect("decodes");
    let t = set.get::<Transform>().expect("a transform").expect("decodes");
    assert_eq!(t.pos_mm[0], (mine.pos[0] * 1000.0).round() as i64);
    assert_eq!((mine.epoch, mine.server, mine.gone), (0, 1, false));
    // The box rests: offered once, its row not rewritten as the player's is.
    let boxed = rows.iter().find(|r| r.entity == prop.0).expect("the prop is checkpointed").clone();
    for seq in 91..=180 {
        h.send(SimIn::Input { conn: 1, frame: input(seq, 0.0) });
        h.step();
    }
    let rows = stored();
    assert_eq!(rows.iter().find(|r| r.entity == prop.0), Some(&boxed), "a resting prop is not written again");
    // Standing still now: its last row stays, as the box's.
    let still = rows.iter().find(|r| r.entity == player.0).expect("still there").clone();
    for _ in 0..90 {
        h.step();
    }
    assert_eq!(stored().iter().find(|r| r.entity == player.0), Some(&still));
    // It leaves: a tombstone, so no successor resumes it.
    h.send(SimIn::Left { conn: 1 });
    h.step();
    assert!(writer.finish(std::time::Duration::from_secs(5)), "written");
    let rows = rt.block_on(memory.checkpoints_within([-1e9; 3], [1e9; 3])).expect("read");
    assert!(rows.iter().all(|r| r.entity != player.0), "{rows:?}");
    assert!(rows.iter().any(|r| r.entity == prop.0));
    assert_eq!(metrics.checkpoint_rows.with_label_values(&["refused_stale"]).get(), 0);
}
