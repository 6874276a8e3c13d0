//! Cross-boundary interaction on the owner's tick thread: what a
//! neighbour's push or grab does to a prop this server simulates, and what
//! is refused.
//!
//! The harness map: root (0,0,0), x 0–2000, is server 1's under epoch 1;
//! root (1,0,0), x 2000–4000, is server 2's under epoch 2.

use glam::{DVec3, Vec3};
use shared::region::RegionKey;
use shared::wire::JoinRole;
use shared::{EntityId, Epoch, ServerId};

use super::authority::Transfer;
use super::core::{Body, Index, SimMetrics};
use super::interact::{InteractKind, Interaction, RemoteGrab};
use super::messages::{SimIn, SimOut};
use super::tests::{GROUND, Harness, spawn_box};

fn count(h: &Harness, kind: &str, result: &str) -> u64 {
    h.world.resource::<SimMetrics>().0.interactions.with_label_values(&[kind, result]).get()
}

fn body(h: &Harness, id: EntityId) -> Body {
    let e = h.world.resource::<Index>().by_net[&id];
    *h.world.get::<Body>(e).unwrap()
}

/// Server 1 with a box at rest 1 m inside its face at x = 2000.
fn a_box_by_the_face() -> (Harness, EntityId, super::messages::ConnRx) {
    let mut h = Harness::new(1);
    let rx = h.join(1, JoinRole::Play, DVec3::new(1960.0, GROUND + 1.0, 1000.0));
    h.settle();
    let id = spawn_box(&mut h, DVec3::new(1999.0, GROUND + 1.0, 1000.0));
    for _ in 0..90 {
        h.step();
    }
    while h.next_out().is_ok() {}
    (h, id, rx)
}

fn push_from_2(id: EntityId) -> Interaction {
    Interaction {
        from: ServerId(2),
        entity: id,
        region: RegionKey::root(0, 0, 0),
        region_epoch: Epoch(1),
        point: DVec3::new(1999.5, GROUND + 0.25, 1000.0),
        kind: InteractKind::Push { hand_vel: Vec3::new(-4.5, 0.0, 0.0) },
    }
}

/// Server 2's player closes its grip on `id`, from root (1,0,0).
fn grab_from_2(id: EntityId) -> Interaction {
    Interaction {
        kind: InteractKind::Grab { to_region: RegionKey::root(1, 0, 0), to_region_epoch: Epoch(2) },
        ..push_from_2(id)
    }
}

#[test]
fn a_neighbours_push_moves_the_prop_and_bad_ones_change_nothing() {
    let (mut h, id, _rx) = a_box_by_the_face();
    let rest = body(&h, id);
    assert!(rest.vel.length() < 0.01, "at rest: {:?}", rest.vel);
    let good = push_from_2(id);
    let cases: Vec<(&str, Interaction)> = vec![
        ("own_server", Interaction { from: ServerId(1), ..good }),
        ("unknown_server", Interaction { from: ServerId(9), ..good }),
        // The hand is nowhere near a region of the sender.
        ("outside_zone", Interaction { point: DVec3::new(1500.0, GROUND, 1000.0), ..good }),
        ("unknown_entity", Interaction { entity: EntityId((1 << 40) | 999), ..good }),
        ("stale_epoch", Interaction { region_epoch: Epoch(0), ..good }),
        ("stale_epoch", Interaction { region: RegionKey::root(0, 1, 0), ..good }),
        // The player is not a prop.
        ("not_a_prop", Interaction { entity: EntityId(7), ..good }),
        ("out_of_reach", Interaction { point: DVec3::new(2010.0, GROUND, 1000.0), ..good }),
        // A grab into a region that is not the sender's.
        (
            "wrong_region",
            Interaction {
                kind: InteractKind::Grab { to_region: RegionKey::root(0, 0, 0), to_region_epoch: Epoch(1) },
                ..good
            },
        ),
        (
            "wrong_region",
            Interaction {
                kind: InteractKind::Grab { to_region: RegionKey::root(1, 0, 0), to_region_epoch: Epoch(1) },
                ..good
            },
        ),
    ];
    for (reason, i) in cases {
        let before = count(&h, i.kind.label(), reason);
        h.send(SimIn::Interact { interaction: i, reply: None });
        h.step();
        assert_eq!(count(&h, i.kind.label(), reason), before + 1, "{reason}: {i:?}");
        let now = body(&h, id);
        assert!(now.vel.length() < 0.01 && now.pos.distance(rest.pos) < 0.01, "{reason} changed nothing");
        assert!(h.world.get::<Transfer>(h.world.resource::<Index>().by_net[&id]).is_none(), "{reason}");
        assert!(h.next_out().is_err(), "{reason} asked for nothing");
    }
    // The good one: the box takes the hand's speed along the contact normal
    // (-x, away from the neighbour's hand).
    h.send(SimIn::Interact { interaction: good, reply: None });
    h.step();
    assert_eq!(count(&h, "push", "applied"), 1);
    let pushed = body(&h, id);
    assert!(pushed.vel.x < -3.0, "pushed: {:?}", pushed.vel);
    for _ in 0..60 {
        h.step();
    }
    assert!(body(&h, id).pos.x < rest.pos.x - 0.3, "slid away from the hand");
}

#[test]
fn a_neighbours_grab_hands_the_prop_over_wherever_it_is() {
    let (mut h, id, _rx) = a_box_by_the_face();
    let grab = grab_from_2(id);
    h.send(SimIn::Interact { interaction: grab, reply: None });
    h.step();
    assert_eq!(count(&h, "grab", "applied"), 1);
    let Ok(SimOut::RequestTransfer { entity, to_region, from_region, not_before_tick, .. }) = h.next_out() else {
        panic!("a transfer asked for")
    };
    assert_eq!((entity, to_region, from_region), (id, RegionKey::root(1, 0, 0), RegionKey::root(0, 0, 0)));
    assert_eq!(not_before_tick, h.tick + 1, "from the next tick on");
    let e = h.world.resource::<Index>().by_net[&id];
    assert!(h.world.get::<RemoteGrab>(e).is_some());
    // A second grab while it is being handed over: busy.
    h.send(SimIn::Interact { interaction: grab, reply: None });
    h.step();
    assert_eq!(count(&h, "grab", "busy"), 1);
    // Committed: released at its effective tick though it is 1 m inside
    // this server's region, nowhere near the handoff line.
    let effective = h.tick + 3;
    super::ghost_tests::commit(&mut h, id, effective);
    let mut shipped = None;
    for _ in 0..5 {
        h.step();
        while let Ok(o) = h.next_out() {
            if let SimOut::Handoff(s) = o {
                shipped = Some(s);
            }
        }
    }
    let s = shipped.expect("handed over");
    assert_eq!((s.entity, s.to, s.effective_tick), (id, ServerId(2), effective));
    assert!(s.prop.is_some() && s.pos.x < 2000.0, "{s:?}");
    assert!(!h.world.resource::<Index>().by_net.contains_key(&id), "no longer simulated here");
}

#[test]
fn a_refused_grab_leaves_the_prop_where_it_was() {
    let (mut h, id, _rx) = a_box_by_the_face();
    let grab = grab_from_2(id);
    h.send(SimIn::Interact { interaction: grab, reply: None });
    h.step();
    assert!(matches!(h.next_out(), Ok(SimOut::RequestTransfer { .. })));
    h.send(SimIn::TransferRefused { entity: id, reason: "stale".into(), permanent: true });
    for _ in 0..30 {
        h.step();
    }
    let e = h.world.resource::<Index>().by_net[&id];
    assert!(h.world.get::<RemoteGrab>(e).is_none());
    assert!(h.next_out().is_err(), "not asked for again: it is not past any line");
    assert!(h.world.resource::<Index>().by_net.contains_key(&id));
}
