//! Overlap sync on the tick thread: what goes to neighbours, and what is
//! kept of what they send.
//!
//! The harness map: root (0,0,0), x 0–2000, is server 1's under epoch 1;
//! root (1,0,0), x 2000–4000, is server 2's under epoch 2.

use glam::DVec3;
use shared::component::ComponentSet;
use shared::region::RegionKey;
use shared::snapshot::QEntity;
use shared::wire::{EntityState, JoinRole};
use shared::{EntityId, Epoch, ServerId};

use super::ghosts::{GHOST_TIMEOUT_TICKS, GhostBatch, GhostKind, GhostState, Ghosts};
use super::messages::SimIn;
use super::tests::{GROUND, Harness, last_snapshot, spawn_box};

fn prop(serial: u64, pos: DVec3, region: RegionKey, epoch: u64) -> GhostState {
    GhostState {
        region,
        region_epoch: Epoch(epoch),
        kind: GhostKind::Prop,
        last_input: 0,
        shape: Some(super::physics::PropShape::Ball { radius: 0.2 }),
        q: QEntity::quantise(&EntityState {
            id: EntityId((2 << 40) | serial),
            pos,
            rot: [0.0, 0.0, 0.0, 1.0],
            vel: [1.0, 0.0, 0.0],
            authority: ServerId(2),
        }),
        comps: Some(std::sync::Arc::new(prop_kind(200))),
    }
}

/// A ball prop's kind component, `radius_mm` across.
fn prop_kind(radius_mm: u16) -> ComponentSet {
    let mut set = ComponentSet::new();
    set.set(&shared::component::builtin::Kind::PropBall { radius_mm });
    set
}

fn batch(h: &Harness, full: bool, ghosts: Vec<GhostState>, removed: Vec<EntityId>) -> SimIn {
    SimIn::Ghosts(GhostBatch { from: ServerId(2), tick: h.tick, full, ghosts, removed })
}

fn refused(h: &Harness, reason: &str) -> u64 {
    h.world.resource::<super::core::SimMetrics>().0.ghost_updates.with_label_values(&[reason]).get()
}

fn held(h: &Harness) -> Vec<EntityId> {
    let mut ids: Vec<EntityId> = h.world.resource::<Ghosts>().by_id.keys().copied().collect();
    ids.sort();
    ids
}

#[test]
fn entities_in_a_neighbours_overlap_zone_are_sent_to_it_every_tick() {
    let mut h = Harness::new(1);
    // One player 50 m from the boundary, one deep inside.
    let _near = h.join_as(1, shared::PlayerId(7), JoinRole::Play, DVec3::new(1950.0, GROUND + 1.0, 1000.0));
    let _deep = h.join_as(2, shared::PlayerId(8), JoinRole::Play, DVec3::new(1000.0, GROUND + 1.0, 1000.0));
    h.step();
    let boxed = spawn_box(&mut h, DVec3::new(1990.0, GROUND + 1.0, 1010.0));
    h.synced.clear();
    for _ in 0..3 {
        h.step();
    }
    assert_eq!(h.synced.len(), 3, "one list a tick: {:?}", h.synced);
    for (to, tick, list) in &h.synced {
        assert_eq!(*to, ServerId(2));
        let mut ids: Vec<(EntityId, GhostKind)> = list.iter().map(|g| (g.q.id, g.kind)).collect();
        ids.sort();
        assert_eq!(ids, vec![(EntityId(7), GhostKind::Player), (boxed, GhostKind::Prop)], "tick {tick}");
        assert!(list.iter().all(|g| g.region == RegionKey::root(0, 0, 0) && g.region_epoch == Epoch(1)));
        assert!(list.iter().all(|g| g.q.authority == ServerId(1)));
    }
    // The list for a neighbour that has nothing left goes once, empty.
    h.send(SimIn::Left { conn: 1 });
    let e = *h.world.resource::<super::core::Index>().by_net.get(&boxed).unwrap();
    super::physics::release_physics(&mut h.world, e);
    h.world.despawn(e);
    h.world.resource_mut::<super::core::Index>().by_net.remove(&boxed);
    h.synced.clear();
    for _ in 0..3 {
        h.step();
    }
    let lists: Vec<usize> = h.synced.iter().map(|(_, _, l)| l.len()).collect();
    assert_eq!(lists, vec![0], "{:?}", h.synced);
}

#[test]
fn ghosts_are_shown_to_players_with_their_owner_and_never_simulated() {
    let mut h = Harness::new(1);
    let mut rx = h.join(1, JoinRole::Play, DVec3::new(1960.0, GROUND + 1.0, 1000.0));
    h.settle();
    let g = prop(1, DVec3::new(2030.0, GROUND + 5.0, 1000.0), RegionKey::root(1, 0, 0), 2);
    h.send(batch(&h, true, vec![g.clone()], vec![]));
    // Within one search of the player's candidates.
    for _ in 0..=super::replication::CANDIDATE_SEARCH_TICKS {
        h.step();
    }
    let snap = last_snapshot(&mut rx).expect("a snapshot");
    let seen = snap.entities.iter().find(|e| e.id == g.q.id).expect("the ghost is in the snapshot");
    assert_eq!(seen.authority, ServerId(2));
    // Held as sent: in the air with a velocity, yet not falling or moving
    // here (only its owner simulates it).
    assert!((seen.pos - DVec3::new(2030.0, GROUND + 5.0, 1000.0)).length() < 0.002, "{}", seen.pos);
    assert!(!h.world.resource::<super::core::Index>().by_net.contains_key(&g.q.id));
    // The owner moves it: the next snapshot follows.
    let mut moved = prop(1, DVec3::new(2031.0, GROUND + 4.0, 1000.0), RegionKey::root(1, 0, 0), 2);
    moved.q.vel = [0; 3];
    h.send(batch(&h, false, vec![moved], vec![]));
    h.step();
    let snap = last_snapshot(&mut rx).unwrap();
    let seen = snap.entities.iter().find(|e| e.id == g.q.id).unwrap();
    assert!((seen.pos.x - 2031.0).abs() < 0.002, "{}", seen.pos);
    // The owner says it left: gone from the next snapshot.
    h.send(batch(&h, false, vec![], vec![g.q.id]));
    h.step();
    let snap = last_snapshot(&mut rx).unwrap();
    assert!(!snap.entities.iter().any(|e| e.id == g.q.id));
    assert_eq!(refused(&h, "applied"), 3);
}

#[test]
fn a_ghost_keeps_its_components_until_its_owner_sends_new_ones() {
    let mut h = Harness::new(1);
    h.step();
    let g = prop(1, DVec3::new(2030.0, GROUND, 1000.0), RegionKey::root(1, 0, 0), 2);
    h.send(batch(&h, true, vec![g.clone()], vec![]));
    h.step();
    let at = h.world.resource::<Ghosts>().by_id[&g.q.id].comps_at;
    assert_eq!(at, h.tick);
    // It moved; its components are left out (unchanged): kept, as dated.
    h.step();
    let moved =
        GhostState { comps: None, q: QEntity { pos: [g.q.pos[0] + 100, g.q.pos[1], g.q.pos[2]], ..g.q }, ..g.clone() };
    h.send(batch(&h, false, vec![moved.clone()], vec![]));
    h.step();
    let held = h.world.resource::<Ghosts>().by_id[&g.q.id].clone();
    assert_eq!((held.state.q, held.comps(), held.comps_at), (moved.q, &prop_kind(200), at));
    // New ones replace them.
    let grown = GhostState { comps: Some(std::sync::Arc::new(prop_kind(300))), ..moved };
    h.send(batch(&h, false, vec![grown], vec![]));
    h.step();
    let held = h.world.resource::<Ghosts>().by_id[&g.q.id].clone();
    assert_eq!((held.comps(), held.comps_at), (&prop_kind(300), h.tick));
}

#[test]
fn bad_ghosts_are_refused_counted_and_change_nothing() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1960.0, GROUND + 1.0, 1000.0));
    h.settle();
    let theirs = RegionKey::root(1, 0, 0);
    let good = prop(1, DVec3::new(2030.0, GROUND, 1000.0), theirs, 2);
    h.send(batch(&h, true, vec![good.clone()], vec![]));
    h.step();
    assert_eq!(held(&h), vec![good.q.id]);
    let cases: Vec<(&str, GhostState)> = vec![
        // An epoch older than the map's.
        ("stale_epoch", prop(2, DVec3::new(2030.0, GROUND, 1000.0), theirs, 1)),
        // A region the sender does not own (it is this server's).
        ("not_owner", prop(3, DVec3::new(1990.0, GROUND, 1000.0), RegionKey::root(0, 0, 0), 1)),
        // A region that is not in the map.
        ("unknown_region", prop(4, DVec3::new(2030.0, GROUND, 1000.0), RegionKey::root(5, 0, 0), 2)),
        // Far from every region of this server.
        ("outside_zone", prop(5, DVec3::new(3500.0, GROUND, 1000.0), theirs, 2)),
        // This server's own player.
        ("own_entity", {
            let mut p = prop(6, DVec3::new(2030.0, GROUND, 1000.0), theirs, 2);
            p.q.id = EntityId(7);
            p.kind = GhostKind::Player;
            p.shape = None;
            p
        }),
    ];
    for (reason, g) in cases {
        let before = refused(&h, reason);
        h.send(batch(&h, false, vec![g], vec![]));
        h.step();
        assert_eq!(refused(&h, reason), before + 1, "{reason}");
        assert_eq!(held(&h), vec![good.q.id], "{reason} changed nothing");
    }
    // A removal of an entity the sender has no ghost of here.
    h.send(batch(&h, false, vec![], vec![EntityId((2 << 40) | 99)]));
    h.step();
    assert_eq!(refused(&h, "unknown_entity"), 1);
    // A sender that is not in the map, or that claims to be this server.
    for (from, reason) in [(ServerId(9), "unknown_server"), (ServerId(1), "own_server")] {
        let g = prop(7, DVec3::new(2030.0, GROUND, 1000.0), theirs, 2);
        h.send(SimIn::Ghosts(GhostBatch { from, tick: h.tick, full: true, ghosts: vec![g], removed: vec![] }));
        h.step();
        assert_eq!(refused(&h, reason), 1, "{reason}");
        assert_eq!(held(&h), vec![good.q.id], "{reason} changed nothing");
    }
    // The good ghost never moved.
    let kept = h.world.resource::<Ghosts>().by_id[&good.q.id].clone();
    assert_eq!(kept.state, good);
}

#[test]
fn ghosts_go_when_a_full_batch_omits_them_or_their_owner_falls_silent() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1960.0, GROUND + 1.0, 1000.0));
    h.settle();
    let theirs = RegionKey::root(1, 0, 0);
    let a = prop(1, DVec3::new(2030.0, GROUND, 1000.0), theirs, 2);
    let b = prop(2, DVec3::new(2040.0, GROUND, 1000.0), theirs, 2);
    h.send(batch(&h, true, vec![a.clone(), b.clone()], vec![]));
    h.step();
    assert_eq!(held(&h), vec![a.q.id, b.q.id]);
    // A full batch lists only `a`: `b` is gone.
    h.send(batch(&h, true, vec![a.clone()], vec![]));
    h.step();
    assert_eq!(held(&h), vec![a.q.id]);
    // Empty batches keep `a` alive, at rest and unmentioned.
    for _ in 0..2 * GHOST_TIMEOUT_TICKS {
        h.send(batch(&h, false, vec![], vec![]));
        h.step();
    }
    assert_eq!(held(&h), vec![a.q.id]);
    // Then the owner says nothing: dropped after the timeout, not before.
    for _ in 0..GHOST_TIMEOUT_TICKS - 1 {
        h.step();
    }
    assert_eq!(held(&h), vec![a.q.id]);
    h.step();
    h.step();
    assert!(held(&h).is_empty());
    assert_eq!(refused(&h, "expired"), 1);
}

#[test]
fn an_entity_handed_to_this_server_stops_being_a_ghost_and_its_late_removal_is_expected() {
    let mut h = Harness::new(1);
    let _rx = h.join(1, JoinRole::Play, DVec3::new(1960.0, GROUND + 1.0, 1000.0));
    h.settle();
    // Player 8, on server 2, walks toward this server's region.
    let mut g = prop(0, DVec3::new(2005.0, GROUND + 0.9, 1000.0), RegionKey::root(1, 0, 0), 2);
    g.q.id = EntityId(8);
    g.kind = GhostKind::Player;
    g.shape = None;
    h.send(batch(&h, true, vec![g.clone()], vec![]));
    h.step();
    assert_eq!(held(&h), vec![EntityId(8)]);
    let (reply, verdict) = tokio::sync::oneshot::channel();
    let state = super::messages::HandoffState {
        transfer_id: 5,
        from: ServerId(2),
        to: ServerId(1),
        entity: EntityId(8),
        entity_epoch: Epoch(2),
        to_region: RegionKey::root(0, 0, 0),
        to_region_epoch: Epoch(1),
        effective_tick: h.tick + 2,
        pos: DVec3::new(1989.0, GROUND + 0.9, 1000.0),
        yaw: 0.0,
        vel: glam::Vec3::ZERO,
        player: Some(shared::PlayerId(8)),
        last_applied_input: 0,
        pending_inputs: Vec::new(),
        prop: None,
        crossed_tick: None,
        components: Default::default(),
    };
    h.send(SimIn::Adopt { state: Box::new(state), reply });
    h.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    assert_eq!(held(&h), vec![EntityId(8)], "a ghost until the effective tick");
    h.step();
    assert!(held(&h).is_empty(), "simulated here now: no ghost of it");
    // The old owner's batches still in flight: its last state of the entity
    // is refused, its removal is expected; neither brings the ghost back.
    h.send(batch(&h, false, vec![g.clone()], vec![]));
    h.send(batch(&h, false, vec![], vec![EntityId(8)]));
    h.step();
    assert!(held(&h).is_empty());
    assert_eq!((refused(&h, "own_entity"), refused(&h, "unknown_entity")), (1, 0));
}

/// Two servers' simulations ticked in lockstep in one process, the
/// coordinator's part played by the test: a prop thrown over the boundary
/// is asked for, released with its rigid body, adopted, and goes on flying
/// on the neighbour; the source keeps it in view as a ghost.
#[test]
fn a_thrown_prop_crosses_to_the_neighbour_with_its_rigid_body() {
    use super::messages::{CommittedTransfer, PropSpawn, SimOut};
    use super::physics::{Prop, PropShape};
    let mut a = Harness::new(1);
    let mut b = Harness::new(2);
    // Players on both sides keep the terrain loaded.
    let _pa = a.join(1, JoinRole::Play, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    let _pb = b.join_as(1, shared::PlayerId(8), JoinRole::Play, DVec3::new(2030.0, GROUND + 1.0, 1000.0));
    for _ in 0..30 {
        a.step();
        b.step();
    }
    let (reply, ids) = tokio::sync::oneshot::channel();
    let shape = PropShape::Box { half: [0.2, 0.2, 0.2] };
    a.send(SimIn::SpawnProps {
        props: vec![PropSpawn { pos: DVec3::new(1996.0, GROUND + 1.0, 1000.0), shape, vel: [14.0, 5.0, 0.0] }],
        reply,
    });
    a.step();
    b.step();
    let id = ids.blocking_recv().unwrap().unwrap()[0];
    // Spinning about the vertical.
    let pe = *a.world.resource::<super::core::Index>().by_net.get(&id).unwrap();
    super::physics::set_spin(&mut a.world, pe, glam::Vec3::new(0.0, 6.0, 0.0), false);
    // It flies past the handoff line (x = 2010): a asks once.
    let mut asked = None;
    for _ in 0..90 {
        a.step();
        b.step();
        if let Ok(out) = a.next_out() {
            asked = Some(out);
            break;
        }
    }
    let Some(SimOut::RequestTransfer {
        entity,
        to_region,
        from_region_epoch,
        entity_epoch,
        position,
        not_before_tick,
        ..
    }) = asked
    else {
        panic!("no transfer asked for: {asked:?}");
    };
    assert_eq!((entity, to_region, from_region_epoch), (id, RegionKey::root(1, 0, 0), Epoch(1)));
    // Asked early: its path passes the line (x = 2010) within 12 ticks, for
    // the tick it does.
    assert!(position.x < 2010.0, "before the line: {position}");
    assert!(not_before_tick > a.tick + 1 && not_before_tick <= a.tick + 13, "{not_before_tick} at {}", a.tick);
    let effective = not_before_tick;
    a.send(SimIn::TransferCommitted {
        entity,
        transfer: CommittedTransfer {
            id: 11,
            to: ServerId(2),
            to_region,
            to_region_epoch: Epoch(2),
            entity_epoch: entity_epoch.next(),
            effective_tick: effective,
        },
    });
    let mut shipped = None;
    for _ in 0..20 {
        a.step();
        b.step();
        if let Ok(SimOut::Handoff(s)) = a.next_out() {
            shipped = Some(s);
            break;
        }
    }
    let state = shipped.expect("the prop was shipped");
    assert_eq!(state.effective_tick, effective);
    // Released the tick it passed the line: the handoff costs one tick.
    assert_eq!(state.crossed_tick, Some(a.tick), "{state:?}");
    assert!(state.pos.x > 2010.0, "past the line: {}", state.pos);
    let body = state.prop.expect("with its rigid body");
    assert_eq!(body.shape, shape);
    assert!(state.vel.x > 10.0, "still flying: {}", state.vel);
    assert!(body.angvel.y > 4.0, "still spinning: {}", body.angvel);
    assert!(body.rot.angle_between(glam::Quat::IDENTITY) > 0.1, "turned as it spun: {}", body.rot);
    assert!(!a.world.resource::<super::core::Index>().by_net.contains_key(&id), "a no longer simulates it");
    let ghost = a.world.resource::<Ghosts>().by_id[&id].clone();
    assert_eq!(ghost.state.q.authority, ServerId(2), "a shows it as b's");
    // b adopts it at the effective tick and simulates it from there.
    let (reply, verdict) = tokio::sync::oneshot::channel();
    let shipped_at = state.pos;
    b.send(SimIn::Adopt { state: state.clone(), reply });
    b.step();
    a.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    assert_eq!(b.tick, effective);
    let latency = b.world.resource::<super::core::SimMetrics>().0.handoff_latency_ticks.get_sample_sum();
    assert_eq!(latency, 1.0, "one tick from the line to the new owner");
    let e = *b.world.resource::<super::core::Index>().by_net.get(&id).expect("b simulates it");
    let rb = b.world.get::<Prop>(e).expect("as a rigid body").body;
    {
        let physics = b.world.resource::<super::physics::Physics>();
        let rb = &physics.world.bodies[rb];
        assert!((rb.angvel() - body.angvel).length() < 0.5, "spin kept: {} vs {}", rb.angvel(), body.angvel);
    }
    let rot = b.world.get::<Prop>(e).unwrap().rot;
    assert!(rot.angle_between(body.rot) < 0.2, "orientation kept: {rot} vs {}", body.rot);
    for _ in 0..10 {
        a.step();
        b.step();
    }
    let now = b.world.get::<super::core::Body>(e).unwrap().pos;
    assert!(now.x > shipped_at.x + 1.0, "it went on flying on b: {shipped_at} → {now}");
    assert_eq!(b.world.get::<super::authority::Authority>(e).unwrap().entity_epoch(), entity_epoch.next());
}

/// Walks player 7 on `a` (server 1) from x = 1999 past the handoff line
/// (x = 2010), feeding `b` (server 2, if any) the overlap sync and the
/// player's inputs on its standby connection, until `a` asks for the
/// transfer. Returns the next input sequence number.
fn walk_over(a: &mut Harness, mut b: Option<&mut Harness>) -> (u32, super::messages::SimOut) {
    use super::tests::input;
    for s in 1..=200 {
        a.send(SimIn::Input { conn: 1, frame: input(s, 1.0) });
        a.step();
        if let Some(b) = b.as_deref_mut() {
            b.send(SimIn::Input { conn: 1, frame: input(s, 1.0) });
            for (to, tick, ghosts) in std::mem::take(&mut a.synced) {
                assert_eq!(to, ServerId(2));
                b.send(SimIn::Ghosts(GhostBatch { from: ServerId(1), tick, full: true, ghosts, removed: vec![] }));
            }
            b.step();
        }
        if let Ok(out) = a.next_out() {
            return (s + 1, out);
        }
    }
    panic!("no transfer requested");
}

pub(super) fn commit(a: &mut Harness, entity: EntityId, effective: u64) {
    a.send(SimIn::TransferCommitted {
        entity,
        transfer: super::messages::CommittedTransfer {
            id: 21,
            to: ServerId(2),
            to_region: RegionKey::root(1, 0, 0),
            to_region_epoch: Epoch(2),
            entity_epoch: Epoch(1),
            effective_tick: effective,
        },
    });
}

/// Player 7 on server 1 (no server 2 here) walked over the line; its
/// transfer is committed, as the coordinator would: at the predicted
/// crossing, or later. Returns the server, the player's connection, the
/// next input sequence number and the player's entity.
fn walked_over_and_committed() -> (Harness, super::messages::ConnRx, u32, EntityId) {
    use super::messages::SimOut;
    let mut a = Harness::new(1);
    let rx = a.join(1, JoinRole::Play, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    a.step();
    let (seq, asked) = walk_over(&mut a, None);
    let SimOut::RequestTransfer { entity, not_before_tick, .. } = asked else { panic!("{asked:?}") };
    let effective = not_before_tick.max(a.tick + 3);
    commit(&mut a, entity, effective);
    (a, rx, seq, entity)
}

#[test]
fn a_handoff_the_target_never_got_comes_back_to_the_source() {
    use super::messages::SimOut;
    use super::tests::{controls, input};
    use shared::wire::ServerControl;
    let (mut a, mut rx, mut seq, entity) = walked_over_and_committed();
    let mut shipped = None;
    for _ in 0..20 {
        if shipped.is_some() {
            break;
        }
        a.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
        seq += 1;
        a.step();
        if let Ok(SimOut::Handoff(s)) = a.next_out() {
            shipped = Some(s);
        }
    }
    let state = shipped.expect("shipped");
    assert!(a.avatar().is_none());
    let (released_at, shipped_applied) = (state.pos, state.last_applied_input);
    // The target is dead: the client goes on sending to the source's
    // standby connection; the coordinator gives the entity back.
    for _ in 0..5 {
        a.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
        seq += 1;
        a.step();
    }
    controls(&mut rx);
    a.send(SimIn::Reclaimed { state, entity_epoch: Epoch(2) });
    a.step();
    let (body, avatar) = a.avatar().expect("simulated here again");
    let auth = *a
        .world
        .get::<super::authority::Authority>(*a.world.resource::<super::core::Index>().by_net.get(&entity).unwrap())
        .unwrap();
    assert_eq!(
        (auth.region(), auth.region_epoch(), auth.entity_epoch()),
        (RegionKey::root(0, 0, 0), Epoch(1), Epoch(2))
    );
    assert!((body.pos - released_at).length() < 0.5, "from where it was shipped: {released_at} → {}", body.pos);
    assert!(held(&a).is_empty(), "no ghost of what is simulated here");
    assert!(controls(&mut rx).iter().any(|c| matches!(c, ServerControl::AuthorityGained { .. })));
    // Every input the client sent is applied, once and in order: the ones
    // shipped with the state, then the ones buffered since.
    assert!(avatar.last_applied > shipped_applied, "the buffered inputs apply");
    for _ in 0..20 {
        a.step();
    }
    let (_, avatar) = a.avatar().unwrap();
    assert!(shipped_applied < seq - 5);
    assert_eq!(avatar.last_applied, seq - 1, "all {} inputs applied", seq - 1);
}

#[test]
fn a_transfer_whose_source_died_resumes_on_the_target_from_its_ghost() {
    use super::messages::{Orphan, SimOut};
    use super::tests::{controls, input};
    use shared::wire::ServerControl;
    let mut a = Harness::new(1);
    let mut b = Harness::new(2);
    let _ra = a.join(1, JoinRole::Play, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    let mut rb = b.join(1, JoinRole::Standby, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    a.step();
    b.step();
    let (mut seq, asked) = walk_over(&mut a, Some(&mut b));
    let SimOut::RequestTransfer { entity, .. } = asked else { panic!("{asked:?}") };
    let ghost = b.world.resource::<Ghosts>().by_id[&entity].clone();
    assert_eq!(ghost.state.kind, GhostKind::Player);
    assert!(ghost.state.last_input > 0, "the ghost says which input its owner applied");
    // The transfer commits; then a dies before it ships anything. The client
    // goes on sending its inputs to b.
    let effective = a.tick + 9;
    commit(&mut a, entity, effective);
    for _ in 0..3 * GHOST_TIMEOUT_TICKS {
        b.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
        seq += 1;
        b.step();
    }
    assert!(held(&b).is_empty(), "the silent owner's ghosts are gone from view");
    // The coordinator declares a dead and lists the orphaned transfer.
    let mut dead = (*super::tests::map()).clone();
    dead.version += 1;
    dead.servers.get_mut(&ServerId(1)).unwrap().alive = false;
    b.send(SimIn::Map(std::sync::Arc::new(dead)));
    let orphan = Orphan {
        transfer_id: 21,
        from: ServerId(1),
        entity,
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
    };
    let (log_tx, log) = std::sync::mpsc::sync_channel(64);
    b.world.resource_mut::<super::authority::AuthorityLog>().tx = Some(log_tx);
    b.send(SimIn::Orphans(vec![orphan]));
    b.step();
    // The authority log says where it resumed from: inputs the dead source
    // logged after the ghost's last one died with it.
    let lines: Vec<String> = log.try_iter().collect();
    let resumed = format!(r#""resumed":[[{},1,{}]]"#, entity.0, ghost.state.last_input);
    assert!(lines.iter().any(|l| l.contains(&resumed)), "{resumed} in {lines:?}");
    b.world.resource_mut::<super::authority::AuthorityLog>().tx = None;
    // Listed again by the next heartbeat: acted on once.
    b.send(SimIn::Orphans(vec![orphan]));
    b.step();
    let answers: Vec<_> = std::iter::from_fn(|| b.next_out().ok()).collect();
    assert!(matches!(answers.as_slice(), [SimOut::OrphanResolved { transfer_id: 21, adopted: true }]), "{answers:?}");
    let (body, avatar) = b.avatar().expect("b simulates the player now");
    // With the components its ghost had (kind, rig and name), marked as
    // resumed from it (a save of its progression keeps what it lacks).
    let e = b.world.resource::<super::core::Index>().by_net[&entity];
    let mut comps = b.world.get::<super::core::Components>(e).expect("components").0.set().clone();
    assert!(comps.remove(6), "marked resumed_from_ghost: {comps:?}");
    assert_eq!(comps.len(), 3, "{comps:?}");
    assert_eq!(&comps, ghost.comps(), "its ghost's");
    let g = ghost.state.q.state();
    assert!((body.pos - g.pos).length() < 2.0, "from its ghost: {} vs {}", body.pos, g.pos);
    assert!(controls(&mut rb).iter().any(|c| matches!(c, ServerControl::AuthorityGained { .. })));
    // The inputs after the ghost's last applied one are applied, once each,
    // in order (the buffer keeps the newest 128).
    assert!(avatar.last_applied >= ghost.state.last_input);
    for _ in 0..200 {
        b.step();
    }
    assert_eq!(b.avatar().unwrap().1.last_applied, seq - 1);
}

#[test]
fn an_orphan_with_no_ghost_is_reported_lost() {
    use super::messages::{Orphan, SimOut};
    let mut b = Harness::new(2);
    b.step();
    b.send(SimIn::Orphans(vec![Orphan {
        transfer_id: 4,
        from: ServerId(1),
        entity: EntityId(77),
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
    }]));
    b.step();
    assert!(matches!(b.next_out(), Ok(SimOut::OrphanResolved { transfer_id: 4, adopted: false })));
    assert!(!b.world.resource::<super::core::Index>().by_net.contains_key(&EntityId(77)));
}

#[test]
fn a_prop_handed_over_late_logs_the_ticks_it_was_carried_through() {
    use super::authority::AuthorityLog;
    use super::messages::{HandoffState, PropHandoff};
    let mut h = Harness::new(2);
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    h.world.resource_mut::<AuthorityLog>().tx = Some(tx);
    for _ in 0..5 {
        h.step();
    }
    let id = EntityId((1 << 40) | 77);
    // Released by server 1 for tick h.tick - 1: it arrives two ticks late.
    let effective = h.tick - 1;
    let state = HandoffState {
        transfer_id: 5,
        from: ServerId(1),
        to: ServerId(2),
        entity: id,
        entity_epoch: Epoch(1),
        to_region: RegionKey::root(1, 0, 0),
        to_region_epoch: Epoch(2),
        effective_tick: effective,
        pos: DVec3::new(2005.0, GROUND + 3.0, 1000.0),
        yaw: 0.0,
        vel: glam::Vec3::new(5.0, 0.0, 0.0),
        player: None,
        last_applied_input: 0,
        pending_inputs: Vec::new(),
        prop: Some(PropHandoff {
            shape: super::physics::PropShape::Ball { radius: 0.2 },
            rot: glam::Quat::IDENTITY,
            angvel: glam::Vec3::ZERO,
            sleeping: false,
        }),
        crossed_tick: Some(effective - 1),
        components: Default::default(),
    };
    let (reply, verdict) = tokio::sync::oneshot::channel();
    h.send(SimIn::Adopt { state: Box::new(state), reply });
    h.step();
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    let lines: Vec<serde_json::Value> = rx.try_iter().map(|l| serde_json::from_str(&l).unwrap()).collect();
    let logged =
        |t: u64| lines.iter().any(|l| l["tick"] == t && l["auth"].as_array().unwrap().iter().any(|e| e == id.0));
    for t in effective..=h.tick {
        assert!(logged(t), "tick {t} of {id} is logged: {lines:?}");
    }
}

#[test]
fn the_source_sends_the_snapshot_of_the_last_tick_it_simulated_before_it_lets_go() {
    use super::messages::SimOut;
    use super::tests::{drain_all, input};
    use shared::wire::ServerControl;
    let (mut a, mut rx, mut seq, _) = walked_over_and_committed();
    let _ = drain_all(&mut rx);
    let mut shipped = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        a.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
        seq += 1;
        a.step();
        seen.extend(drain_all(&mut rx));
        if let Ok(SimOut::Handoff(s)) = a.next_out() {
            shipped = Some(s);
            break;
        }
    }
    let state = shipped.expect("shipped");
    // The newest snapshot is of the tick released, with the inputs applied
    // in it (the new owner simulates the next tick), and the client was told.
    let Some(Ok(snap)) = seen.iter().rfind(|o| o.is_ok()) else { panic!("{seen:?}") };
    assert_eq!((snap.tick, snap.authoritative), (state.effective_tick - 1, true));
    assert_eq!(snap.last_input_seq, state.last_applied_input);
    assert!(seen.iter().any(|o| matches!(o, Err(ServerControl::AuthorityMoved { effective_tick, .. })
        if *effective_tick == state.effective_tick)));
}
