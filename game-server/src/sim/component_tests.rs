//! Components reach clients: what each client may see, when it changes,
//! and nothing else.

use std::sync::Arc;

use glam::DVec3;
use shared::component::builtin::{Kind, PlayerName, VrRig};
use shared::component::{Audience, Component, ComponentError, Policy, Reader, Registry};
use shared::wire::{InputFrame, JoinRole, Pose};
use shared::{EntityId, PlayerId};

use super::core::*;
use super::messages::*;
use super::tests::{Harness, spawn_box};

/// A game's component only its player sees (as an inventory would be).
#[derive(Debug, Clone, PartialEq)]
struct Purse(u32);

impl Component for Purse {
    const ID: u16 = 1001;
    const NAME: &'static str = "test.purse";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 4;
    const POLICY: Policy = Policy { audience: Audience::Owner, ghosted: false, persisted: true };
    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }
    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        Ok(Self(r.u32()?))
    }
}

/// A game's server-side state: no client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Mood(u8);

impl Component for Mood {
    const ID: u16 = 1002;
    const NAME: &'static str = "test.mood";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 1;
    const POLICY: Policy = Policy { audience: Audience::Servers, ghosted: false, persisted: false };
    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        out.push(self.0);
    }
    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        Ok(Self(r.u8()?))
    }
}

/// A game's component everyone sees, neighbours mirror and checkpoints
/// keep (a team's banner, say).
#[derive(Debug, Clone, PartialEq)]
struct Banner(u32);

impl Component for Banner {
    const ID: u16 = 1003;
    const NAME: &'static str = "test.banner";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 4;
    const POLICY: Policy = Policy { audience: Audience::Everyone, ghosted: true, persisted: true };
    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }
    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        Ok(Self(r.u32()?))
    }
}

fn registry() -> Arc<Registry> {
    let mut r = Registry::builtin();
    r.register::<Purse>().expect("registers");
    r.register::<Mood>().expect("registers");
    r.register::<Banner>().expect("registers");
    Arc::new(r)
}

fn rig_input(seq: u32, ack: u64, reach: f32) -> InputFrame {
    let head = Pose { pos: [0.0, 1.7, 0.0], rot: [0.0, 0.0, 0.0, 1.0] };
    let hand = Pose { pos: [0.2, 1.3, -reach], rot: [0.0, 0.0, 0.0, 1.0] };
    InputFrame { seq, ack_tick: ack, head, left: hand, right: hand, ..Default::default() }
}

fn put<C: Component>(h: &mut Harness, id: EntityId, v: &C) {
    let e = h.world.resource::<Index>().by_net[&id];
    let tick = h.world.resource::<TickState>().tick;
    h.world.get_mut::<Components>(e).expect("has components").0.put(v, tick);
}

#[test]
fn a_client_sees_the_components_it_may_see_as_they_change_and_no_other() {
    let mut h = Harness::new(1);
    let registry = registry();
    h.world.resource_mut::<SimConfig>().registry = registry.clone();
    let centre = DVec3::new(1000.5, 70.0, 1000.5);
    let mut me = h.join_as(1, PlayerId(7), JoinRole::Play, centre);
    let mut other = h.join_as(2, PlayerId(8), JoinRole::Play, centre + DVec3::new(3.0, 0.0, 0.0));
    let prop = spawn_box(&mut h, centre + DVec3::new(-3.0, 0.0, 0.0));
    let (me_id, other_id) = (EntityId::player(PlayerId(7)).unwrap(), EntityId::player(PlayerId(8)).unwrap());
    put(&mut h, me_id, &Purse(9));
    put(&mut h, other_id, &Purse(5));
    put(&mut h, other_id, &Mood(3));
    let mut client = shared::snapshot::Receiver::with_registry(registry.clone());
    let mut seq = 0;
    let mut run = |h: &mut Harness, client: &mut shared::snapshot::Receiver, reach: f32, ticks: u32| {
        let mut bytes = 0;
        for _ in 0..ticks {
            seq += 1;
            h.send(SimIn::Input { conn: 1, frame: rig_input(seq, client.ack(), 0.3) });
            h.send(SimIn::Input { conn: 2, frame: rig_input(seq, 0, reach) });
            h.step();
            while other.try_recv().is_some() {}
            while let Some(o) = me.try_recv() {
                if let Outbound::Datagram(b) = o {
                    bytes += b.len();
                    client.receive(&b).expect("decodes, its components accepted");
                }
            }
        }
        bytes
    };
    run(&mut h, &mut client, 0.3, 20);
    let seen = |client: &shared::snapshot::Receiver, id| client.components().get(id).cloned().unwrap_or_default();
    // The other player: its kind, name and rig; not its purse nor its mood.
    let o = seen(&client, other_id);
    assert_eq!(o.get::<Kind>(), Some(Ok(Kind::Player)));
    assert_eq!(o.get::<PlayerName>(), Some(Ok(PlayerName("p".into()))));
    let reach_of = |rig: &VrRig| rig.left.pos_mm[2];
    assert_eq!(o.get::<VrRig>().map(|r| r.map(|r| reach_of(&r))), Some(Ok(-300)));
    assert_eq!(o.ids().collect::<Vec<_>>(), [Kind::ID, VrRig::ID, PlayerName::ID], "no purse, no mood");
    // The player's own purse, its alone; the prop's kind.
    assert_eq!(seen(&client, me_id).get::<Purse>(), Some(Ok(Purse(9))));
    assert_eq!(seen(&client, prop).get::<Kind>(), Some(Ok(Kind::PropBox { half_mm: [250; 3] })));
    // Nothing changes: what the client holds costs nothing more.
    let still = run(&mut h, &mut client, 0.3, 30);
    // The other reaches out: the client sees its hands move.
    let moving = run(&mut h, &mut client, 0.5, 5);
    assert_eq!(seen(&client, other_id).get::<VrRig>().map(|r| r.map(|r| reach_of(&r))), Some(Ok(-500)));
    assert!(moving > still / 6, "a moved rig is sent: {moving} bytes in 5 ticks vs {still} in 30");
    // A purse changes and a name goes: the client follows.
    put(&mut h, me_id, &Purse(10));
    let e = h.world.resource::<Index>().by_net[&other_id];
    let tick = h.world.resource::<TickState>().tick;
    h.world.get_mut::<Components>(e).expect("components").0.remove(PlayerName::ID, tick);
    run(&mut h, &mut client, 0.5, 5);
    assert_eq!(seen(&client, me_id).get::<Purse>(), Some(Ok(Purse(10))));
    assert_eq!(seen(&client, other_id).ids().collect::<Vec<_>>(), [Kind::ID, VrRig::ID]);
    // A client with another registry refuses a snapshot carrying what it
    // does not know, whole (the hello's schema check keeps such a client out).
    let mut rx = h.join_as(3, PlayerId(9), JoinRole::Play, centre + DVec3::new(0.0, 0.0, 3.0));
    h.step();
    put(&mut h, EntityId::player(PlayerId(9)).unwrap(), &Purse(1));
    let mut stranger = shared::snapshot::Receiver::default();
    h.step();
    let mut refused = None;
    while let Some(o) = rx.try_recv() {
        if let Outbound::Datagram(b) = o {
            let ack = stranger.ack();
            refused = Some((stranger.receive(&b).map(|_| ()).map_err(|e| e.reason()), ack));
        }
    }
    let (verdict, ack_before) = refused.expect("a snapshot");
    assert_eq!(verdict, Err("unknown_component"));
    assert_eq!(stranger.ack(), ack_before, "the refused snapshot is not kept as a baseline");
    let own = stranger.components().get(EntityId::player(PlayerId(9)).unwrap()).cloned().unwrap_or_default();
    assert!(own.get::<Purse>().is_none(), "nothing of it applied");
}

/// Server 1's overlap sync for server 2 this tick, through the wire.
fn sync(a: &mut Harness, b: &Harness, registry: &Registry) {
    for (to, tick, ghosts) in std::mem::take(&mut a.synced) {
        assert_eq!(to, shared::ServerId(2));
        let pb = crate::convert::ghost_batch_to_pb(shared::ServerId(1), tick, true, &ghosts, &[]);
        let batch = crate::convert::ghost_batch_from_pb(&pb, registry).expect("decodes");
        b.send(SimIn::Ghosts(batch));
    }
}

/// The components `h` holds of entity `id`: its own, else its ghost's.
fn held_by(h: &Harness, id: EntityId) -> shared::component::ComponentSet {
    match h.world.resource::<Index>().by_net.get(&id) {
        Some(e) => h.world.get::<Components>(*e).expect("components").0.set().clone(),
        None => h.world.resource::<super::ghosts::Ghosts>().by_id[&id].comps().clone(),
    }
}

/// What a handoff's state looks like after the wire.
fn over_the_wire(s: &HandoffState, registry: &Registry) -> HandoffState {
    crate::convert::handoff_from_pb(&crate::convert::handoff_to_pb(s), registry).expect("decodes")
}

#[test]
fn a_game_component_goes_with_its_entity_to_ghosts_handoffs_reclaims_and_clients() {
    use super::ghost_tests::commit;
    use super::tests::{GROUND, input};
    let registry = registry();
    let (mut a, mut b) = (Harness::new(1), Harness::new(2));
    a.world.resource_mut::<SimConfig>().registry = registry.clone();
    b.world.resource_mut::<SimConfig>().registry = registry.clone();
    // Player 7 on a by the boundary (x = 2000) with b's standby link;
    // player 8 on b watches across it.
    let _ra = a.join(1, JoinRole::Play, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    let _rb = b.join(1, JoinRole::Standby, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    let mut watcher = b.join_as(2, PlayerId(8), JoinRole::Play, DVec3::new(2025.0, GROUND + 1.0, 1000.0));
    let mut client = shared::snapshot::Receiver::with_registry(registry.clone());
    for _ in 0..30 {
        a.step();
        b.step();
    }
    let player = EntityId::player(PlayerId(7)).unwrap();
    put(&mut a, player, &Banner(7));
    put(&mut a, player, &Purse(3));
    let prop = spawn_box(&mut a, DVec3::new(1995.0, GROUND + 1.0, 1003.0));
    put(&mut a, prop, &Banner(11));
    let mut seq = 0;
    let mut tick = |a: &mut Harness, b: &mut Harness, client: &mut shared::snapshot::Receiver, walk: f32| {
        seq += 1;
        a.send(SimIn::Input { conn: 1, frame: input(seq, walk) });
        b.send(SimIn::Input { conn: 1, frame: input(seq, walk) });
        b.send(SimIn::Input { conn: 2, frame: InputFrame { seq, ack_tick: client.ack(), ..input(seq, 0.0) } });
        a.step();
        sync(a, b, &registry);
        b.step();
        while let Some(o) = watcher.try_recv() {
            if let Outbound::Datagram(d) = o {
                client.receive(&d).expect("decodes");
            }
        }
    };
    for _ in 0..20 {
        tick(&mut a, &mut b, &mut client, 0.0);
    }
    // b's ghosts carry what neighbours mirror: not the purse.
    let ghost = held_by(&b, player);
    assert_eq!(ghost.get::<Banner>(), Some(Ok(Banner(7))));
    assert_eq!(ghost.get::<Purse>(), None, "the purse is not mirrored");
    assert_eq!(held_by(&b, prop).get::<Banner>(), Some(Ok(Banner(11))));
    // b's player sees them on the ghosts.
    let seen = |client: &shared::snapshot::Receiver, id| client.components().get(id).cloned().unwrap_or_default();
    assert_eq!(seen(&client, player).get::<Banner>(), Some(Ok(Banner(7))));
    assert_eq!(seen(&client, prop).get::<Banner>(), Some(Ok(Banner(11))));
    // Changed on a: the ghost and the client follow.
    put(&mut a, prop, &Banner(12));
    for _ in 0..5 {
        tick(&mut a, &mut b, &mut client, 0.0);
    }
    assert_eq!(held_by(&b, prop).get::<Banner>(), Some(Ok(Banner(12))));
    assert_eq!(seen(&client, prop).get::<Banner>(), Some(Ok(Banner(12))));
    // Player 7 walks over; the transfer commits for a tick b is past when
    // it adopts it (a late handoff, simulated forward).
    let asked = (0..200).find_map(|_| {
        tick(&mut a, &mut b, &mut client, 1.0);
        a.next_out().ok()
    });
    let Some(SimOut::RequestTransfer { entity, not_before_tick, .. }) = asked else { panic!("{asked:?}") };
    assert_eq!(entity, player);
    let effective = not_before_tick.max(a.tick + 3);
    commit(&mut a, entity, effective);
    let shipped = (0..20).find_map(|_| {
        tick(&mut a, &mut b, &mut client, 1.0);
        match a.next_out() {
            Ok(SimOut::Handoff(s)) => Some(s),
            _ => None,
        }
    });
    let state = over_the_wire(&shipped.expect("shipped"), &registry);
    assert_eq!(state.components.get::<Banner>(), Some(Ok(Banner(7))), "all of it moves");
    assert_eq!(state.components.get::<Purse>(), Some(Ok(Purse(3))));
    // a shows the player as b's ghost now, banner and all.
    assert_eq!(held_by(&a, player).get::<Banner>(), Some(Ok(Banner(7))));
    for _ in 0..3 {
        tick(&mut a, &mut b, &mut client, 1.0);
    }
    let (reply, verdict) = tokio::sync::oneshot::channel();
    b.send(SimIn::Adopt { state: Box::new(state.clone()), reply });
    tick(&mut a, &mut b, &mut client, 1.0);
    assert_eq!(verdict.blocking_recv().unwrap(), Ok(()));
    assert!(b.tick > effective, "adopted late: at {} for {effective}", b.tick);
    let adopted = held_by(&b, player);
    assert_eq!((adopted.get::<Banner>(), adopted.get::<Purse>()), (Some(Ok(Banner(7))), Some(Ok(Purse(3)))));
    // b cannot deliver it after all (say): a takes it back, all of it.
    let mut back = a.world.resource::<super::ghosts::Ghosts>().by_id.contains_key(&player);
    back &= !a.world.resource::<Index>().by_net.contains_key(&player);
    assert!(back, "a holds only a ghost of it");
    a.send(SimIn::Reclaimed { state: Box::new(state), entity_epoch: shared::Epoch(2) });
    a.step();
    let reclaimed = held_by(&a, player);
    assert!(a.world.resource::<Index>().by_net.contains_key(&player), "simulated on a again");
    assert_eq!((reclaimed.get::<Banner>(), reclaimed.get::<Purse>()), (Some(Ok(Banner(7))), Some(Ok(Purse(3)))));
}

#[test]
fn a_player_comes_back_with_its_persisted_components_and_leaves_them_saved() {
    let mut h = Harness::new(1);
    let registry = registry();
    h.world.resource_mut::<SimConfig>().registry = registry.clone();
    // What the control task read of its progression: a purse and a banner
    // (persisted), a mood (not: a build that persisted it saved it).
    let mut saved = shared::component::ComponentSet::new();
    saved.set(&Purse(40));
    saved.set(&Mood(2));
    saved.set(&Banner(5));
    let me = EntityId::player(PlayerId(7)).unwrap();
    let _rx = h.join_saved(1, PlayerId(7), JoinRole::Play, DVec3::new(1000.5, 70.0, 1000.5), Some(saved));
    h.step();
    let e = h.world.resource::<Index>().by_net[&me];
    let held = h.world.get::<Components>(e).expect("components").0.set().clone();
    assert_eq!(held.get::<Purse>(), Some(Ok(Purse(40))));
    assert_eq!(held.get::<Banner>(), Some(Ok(Banner(5))));
    assert_eq!(held.get::<Mood>(), None, "not persisted here");
    assert_eq!(held.get::<PlayerName>(), Some(Ok(PlayerName("p".into()))), "the name is the hello's");
    // It earns a coin; what its progression saves is what persists.
    put(&mut h, me, &Purse(41));
    put(&mut h, me, &Mood(1));
    let p = super::players::progress_of(&h.world, e).expect("a player");
    let stored = shared::component::ComponentSet::decode(&p.components, &registry).expect("decodes");
    assert_eq!(stored.ids().collect::<Vec<_>>(), [Kind::ID, Purse::ID, Banner::ID]);
    assert_eq!(stored.get::<Purse>(), Some(Ok(Purse(41))));
}

#[test]
fn no_transfer_is_asked_of_a_server_that_lacks_a_component_of_the_entity() {
    use super::tests::{GROUND, input};
    let registry = registry();
    let mut a = Harness::new(1);
    a.world.resource_mut::<SimConfig>().registry = registry.clone();
    let _ra = a.join(1, JoinRole::Play, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    a.step();
    let player = EntityId::player(PlayerId(7)).unwrap();
    put(&mut a, player, &Banner(1));
    // Server 2 runs a build without the banner (a rolling upgrade).
    a.send(SimIn::PeerSchema { server: shared::ServerId(2), schema: Arc::new(Registry::builtin().schema()) });
    let refused =
        |a: &Harness| a.world.resource::<SimMetrics>().0.transfers.with_label_values(&["schema_refused"]).get();
    let mut seq = 0;
    let mut walk = |a: &mut Harness, ticks: u32| {
        (0..ticks).find_map(|_| {
            seq += 1;
            a.send(SimIn::Input { conn: 1, frame: input(seq, 1.0) });
            a.step();
            a.next_out().ok()
        })
    };
    let asked = walk(&mut a, 200);
    assert!(asked.is_none(), "nothing asked of the coordinator: {asked:?}");
    let (body, _) = a.avatar().expect("still simulated here");
    assert!(body.pos.x > 2010.0, "past the handoff line: {}", body.pos);
    assert_eq!(refused(&a), 1, "said once");
    // Server 2 is upgraded: the transfer is asked for at once.
    a.send(SimIn::PeerSchema { server: shared::ServerId(2), schema: Arc::new(registry.schema()) });
    let asked = walk(&mut a, 3);
    let Some(SimOut::RequestTransfer { entity, components, .. }) = asked else { panic!("{asked:?}") };
    assert_eq!(entity, player);
    // It names the entity's components, for the coordinator to check too.
    let banner = registry.schema().0.into_iter().find(|e| e.id == Banner::ID).expect("registered");
    assert!(components.contains(&banner), "{components:?}");
}

#[test]
fn a_neighbour_of_an_older_build_mirrors_the_components_it_knows() {
    use super::tests::GROUND;
    let registry = registry();
    let mut a = Harness::new(1);
    a.world.resource_mut::<SimConfig>().registry = registry.clone();
    let _ra = a.join(1, JoinRole::Play, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    a.step();
    let player = EntityId::player(PlayerId(7)).unwrap();
    put(&mut a, player, &Banner(3));
    let synced = |a: &mut Harness| {
        a.synced.clear();
        a.step();
        let (_, _, list) = a.synced.pop().expect("a list for server 2");
        let g = list.iter().find(|g| g.q.id == player).expect("the player is listed").clone();
        (g.comps.clone().expect("with its components"), list)
    };
    let (comps, _) = synced(&mut a);
    assert_eq!(comps.get::<Banner>(), Some(Ok(Banner(3))), "schema not known yet: all of them");
    // Server 2 runs a build without the banner: it gets the rest, which it can read.
    a.send(SimIn::PeerSchema { server: shared::ServerId(2), schema: Arc::new(Registry::builtin().schema()) });
    let (comps, list) = synced(&mut a);
    assert_eq!(comps.get::<Banner>(), None);
    assert_eq!(comps.get::<Kind>(), Some(Ok(Kind::Player)));
    let pb = crate::convert::ghost_batch_to_pb(shared::ServerId(1), a.tick, true, &list, &[]);
    assert!(crate::convert::ghost_batch_from_pb(&pb, &Registry::builtin()).is_ok(), "the older build reads it");
    // Upgraded: all of them again.
    a.send(SimIn::PeerSchema { server: shared::ServerId(2), schema: Arc::new(registry.schema()) });
    let (comps, _) = synced(&mut a);
    assert_eq!(comps.get::<Banner>(), Some(Ok(Banner(3))));
}

#[test]
fn the_coordinator_refuses_a_transfer_to_a_server_that_lacks_a_component_before_committing_it() {
    use super::mesh_tests::MeshSim;
    use super::tests::GROUND;
    // Server 1 runs a build with the game's components, server 2 one
    // without them (a rolling upgrade), and no ghost link has told server 1
    // so: the coordinator, which both registered their schemas with,
    // refuses. (Server-side state: the test's clients know only the
    // built-in components.)
    let mut m = MeshSim::with_registries(glam::IVec3::ZERO, 2, 1, 1, &[registry()]);
    let p = PlayerId(1);
    let player = EntityId::player(p).unwrap();
    m.join(p, DVec3::new(1990.0, GROUND + 1.0, 1000.0));
    m.run(30, &|_, _| [0.0, 0.0]);
    let (first, _) = m.where_is(p).expect("simulated");
    assert_eq!(first, m.nodes[0].id);
    put(&mut m.nodes[0].h, player, &Mood(4));
    m.run(300, &|_, _| [1.0, 0.0]);
    let (still, at) = m.where_is(p).expect("simulated");
    assert_eq!(still, first, "kept by its server");
    assert!(at.x > 2010.0, "well past the handoff line: {at}");
    assert_eq!(m.coord.transfers().total(), 0, "nothing committed");
    assert_eq!(m.counts.handoffs, 0);
    // Its mood is gone: the next request goes through.
    let e = m.nodes[0].h.world.resource::<Index>().by_net[&player];
    let tick = m.nodes[0].h.world.resource::<TickState>().tick;
    m.nodes[0].h.world.get_mut::<Components>(e).expect("has components").0.remove(Mood::ID, tick);
    m.run(120, &|_, _| [0.0, 0.0]);
    assert_eq!(m.where_is(p).map(|w| w.0), Some(m.nodes[1].id));
    assert_eq!(m.counts.handoffs, 1);
}
