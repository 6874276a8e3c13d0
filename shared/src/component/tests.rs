use proptest::prelude::*;

use super::builtin::*;
use super::*;
use crate::wire::Pose;

/// A game's component, as a studio would write one: health points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health(u16);

impl Component for Health {
    const ID: ComponentId = FIRST_GAME_ID;
    const NAME: &'static str = "test.health";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 3;
    const POLICY: Policy = Policy { audience: Audience::Owner, ghosted: false, persisted: true };

    fn encode(&self, _base: Option<&Self>, out: &mut Vec<u8>) {
        put::varint(out, u64::from(self.0));
    }

    fn decode(r: &mut Reader<'_>, _base: Option<&Self>) -> Result<Self, ComponentError> {
        let v = r.varint()?;
        if v > 1000 {
            return Err(ComponentError::OutOfRange("health"));
        }
        Ok(Self(v as u16))
    }
}

fn transform() -> impl Strategy<Value = Transform> {
    let pos = -(1i64 << 40)..=(1i64 << 40);
    (prop::array::uniform3(pos), 0u64..(1 << 47), prop::array::uniform3(any::<i16>()))
        .prop_map(|(pos_mm, rot, vel_cms)| Transform { pos_mm, rot, vel_cms })
}

fn rig_pose() -> impl Strategy<Value = RigPose> {
    (prop::array::uniform3(any::<i16>()), any::<u32>()).prop_map(|(pos_mm, rot)| RigPose { pos_mm, rot })
}

fn rig() -> impl Strategy<Value = VrRig> {
    // Often equal poses, so deltas leave some out.
    (rig_pose(), rig_pose(), rig_pose(), 0u8..8).prop_map(|(head, left, right, same)| VrRig {
        head: if same & 1 != 0 { RigPose::default() } else { head },
        left: if same & 2 != 0 { RigPose::default() } else { left },
        right,
    })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Player),
        prop::array::uniform3(1u16..).prop_map(|half_mm| Kind::PropBox { half_mm }),
        (1u16..).prop_map(|radius_mm| Kind::PropBall { radius_mm }),
    ]
}

fn name() -> impl Strategy<Value = PlayerName> {
    "[a-zA-Z0-9 _éü-]{0,32}".prop_map(PlayerName)
}

fn prop_body() -> impl Strategy<Value = PropBody> {
    (prop::array::uniform3(any::<i16>()), any::<bool>())
        .prop_map(|(angvel_mrads, asleep)| PropBody { angvel_mrads, asleep })
}

proptest! {
    #[test]
    fn every_builtin_component_round_trips_whole_and_against_any_baseline(
        (t, tb) in (transform(), transform()),
        (r, rb) in (rig(), rig()),
        (k, kb) in (kind(), kind()),
        (n, nb) in (name(), name()),
        (p, pb) in (prop_body(), prop_body()),
    ) {
        check_round_trip(&t, &tb).map_err(TestCaseError::fail)?;
        check_round_trip(&t, &t).map_err(TestCaseError::fail)?;
        check_round_trip(&r, &rb).map_err(TestCaseError::fail)?;
        check_round_trip(&k, &kb).map_err(TestCaseError::fail)?;
        check_round_trip(&p, &pb).map_err(TestCaseError::fail)?;
        if n.0.len() <= MAX_PLAYER_NAME {
            check_round_trip(&n, &nb).map_err(TestCaseError::fail)?;
        }
        // An unchanged value costs one byte.
        let mut out = Vec::new();
        t.encode(Some(&t), &mut out);
        r.encode(Some(&r), &mut out);
        prop_assert_eq!(out.len(), 2);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        let registry = Registry::builtin();
        let _ = ComponentSet::decode(&bytes, &registry);
        for id in 1..=5 {
            let _ = registry.validate(id, &bytes);
        }
        let _ = decode_whole::<Transform>(&bytes);
        let base = Transform { pos_mm: [i64::MAX, 0, 0], ..Transform::default() };
        let _ = Transform::decode(&mut Reader::new(&bytes), Some(&base));
    }

    #[test]
    fn a_set_round_trips_through_its_encoding(t in transform(), r in rig(), k in kind(), hp in 0u16..=1000) {
        let mut registry = Registry::builtin();
        registry.register::<Health>().unwrap();
        let mut set = ComponentSet::new();
        set.set(&Health(hp));
        set.set(&r);
        set.set(&t);
        set.set(&k);
        let back = ComponentSet::decode(&set.to_bytes(), &registry).unwrap();
        prop_assert_eq!(&back, &set);
        prop_assert_eq!(back.get::<Transform>().unwrap().unwrap(), t);
        prop_assert_eq!(back.get::<VrRig>().unwrap().unwrap(), r);
        prop_assert_eq!(back.get::<Health>().unwrap().unwrap(), Health(hp));
        prop_assert!(back.get::<PlayerName>().is_none());
        prop_assert_eq!(back.ids().collect::<Vec<_>>(), vec![1, 2, 3, FIRST_GAME_ID]);
    }
}

#[test]
fn a_set_with_anything_wrong_is_refused_whole_with_its_reason() {
    let mut registry = Registry::builtin();
    registry.register::<Health>().unwrap();
    let mut set = ComponentSet::new();
    set.set(&Kind::Player);
    set.set(&Health(7));
    let good = set.to_bytes();
    assert!(ComponentSet::decode(&good, &registry).is_ok());
    // Without the game's component registered, the whole set is refused.
    assert_eq!(ComponentSet::decode(&good, &Registry::builtin()).unwrap_err().reason(), "unknown_component");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // count 1: id 2, 1 byte: kind 9 (no such kind).
        (vec![1, 2, 1, 9], "component_out_of_range"),
        // A box of size zero.
        (vec![1, 2, 7, 1, 0, 0, 1, 0, 1, 0], "component_out_of_range"),
        // Out of order, and twice.
        (vec![2, 3, 1, 0, 2, 1, 0], "components_unordered"),
        (vec![2, 2, 1, 0, 2, 1, 0], "components_unordered"),
        // Longer than the component's largest size (kind: 7).
        (vec![1, 2, 8, 1, 1, 0, 1, 0, 1, 0, 0], "component_too_large"),
        // Longer than any component.
        (vec![1, 2, 0x81, 0x10], "component_too_large"),
        // Ends early, has bytes after its end, too many.
        (vec![1, 2, 3, 1], "truncated"),
        (vec![1, 2, 1, 0, 0], "trailing_bytes"),
        (vec![65], "too_many_components"),
        // Trailing bytes inside a component's own span.
        (vec![1, 2, 2, 0, 0], "trailing_bytes"),
        (vec![1, 2, 1, 0xff], "component_out_of_range"),
        (vec![1, 0xff, 0xff, 0xff, 0xff, 0x0f, 0], "unknown_component"),
    ];
    for (bytes, reason) in cases {
        let e = ComponentSet::decode(&bytes, &registry).unwrap_err();
        assert_eq!(e.reason(), reason, "{bytes:?}: {e}");
    }
}

#[test]
fn a_saved_set_keeps_what_the_registry_still_has_and_says_what_it_left_out() {
    let mut registry = Registry::builtin();
    registry.register::<Health>().unwrap();
    let mut set = ComponentSet::new();
    set.set(&Kind::Player);
    set.set(&Health(7));
    let saved = set.to_bytes();
    assert_eq!(ComponentSet::decode_saved(&saved, &registry), Ok((set.clone(), vec![])));
    // A build without the game's component keeps the kind.
    let (kept, dropped) = ComponentSet::decode_saved(&saved, &Registry::builtin()).expect("framing is fine");
    assert_eq!(kept.ids().collect::<Vec<_>>(), [Kind::ID]);
    assert_eq!(dropped, vec![(FIRST_GAME_ID, ComponentError::Unknown(FIRST_GAME_ID))]);
    // A value out of range is left out; broken framing refuses the set.
    let (kept, dropped) = ComponentSet::decode_saved(&[1, 2, 1, 9], &registry).expect("framing is fine");
    assert!(kept.is_empty());
    assert_eq!(dropped[0].1.reason(), "component_out_of_range");
    assert_eq!(ComponentSet::decode_saved(&[1, 2, 3, 1], &registry).unwrap_err().reason(), "truncated");
    assert_eq!(
        ComponentSet::decode_saved(&[2, 3, 1, 0, 2, 1, 0], &registry).unwrap_err().reason(),
        "components_unordered"
    );
}

/// A component that encodes nothing, for registration checks.
macro_rules! empty_component {
    ($t:ident, $id:expr, $name:expr, $size:expr) => {
        #[derive(Debug, Clone, PartialEq)]
        struct $t;
        impl Component for $t {
            const ID: ComponentId = $id;
            const NAME: &'static str = $name;
            const VERSION: u16 = 1;
            const MAX_SIZE: usize = $size;
            const POLICY: Policy = Policy { audience: Audience::Servers, ghosted: false, persisted: false };
            fn encode(&self, _: Option<&Self>, _: &mut Vec<u8>) {}
            fn decode(_: &mut Reader<'_>, _: Option<&Self>) -> Result<Self, ComponentError> {
                Ok(Self)
            }
        }
    };
}

#[test]
fn registration_refuses_what_would_make_the_schema_ambiguous() {
    empty_component!(SameId, 1, "game.other", 1);
    empty_component!(SameName, 1001, "transform", 1);
    empty_component!(BadName, 1002, "Bad Name", 1);
    empty_component!(Huge, 1003, "game.huge", MAX_COMPONENT_SIZE + 1);
    let mut r = Registry::builtin();
    assert_eq!(r.register::<SameId>(), Err(RegistryError::IdTaken(1, "transform")));
    assert_eq!(r.register::<SameName>(), Err(RegistryError::NameTaken("transform")));
    assert_eq!(r.register::<BadName>(), Err(RegistryError::BadName("Bad Name")));
    assert!(matches!(r.register::<Huge>(), Err(RegistryError::BadSize { .. })));
    // Server-side state may be large; what clients see must fit a snapshot.
    empty_component!(BigServerSide, 1004, "game.big", MAX_COMPONENT_SIZE);
    assert_eq!(r.register::<BigServerSide>(), Ok(()));
    #[derive(Debug, Clone, PartialEq)]
    struct BigVisible;
    impl Component for BigVisible {
        const ID: ComponentId = 1005;
        const NAME: &'static str = "game.big_visible";
        const VERSION: u16 = 1;
        const MAX_SIZE: usize = MAX_VISIBLE_SIZE + 1;
        const POLICY: Policy = Policy { audience: Audience::Owner, ghosted: false, persisted: false };
        fn encode(&self, _: Option<&Self>, _: &mut Vec<u8>) {}
        fn decode(_: &mut Reader<'_>, _: Option<&Self>) -> Result<Self, ComponentError> {
            Ok(Self)
        }
    }
    assert!(matches!(r.register::<BigVisible>(), Err(RegistryError::TooLargeForClients { .. })));
    let mut expected = Registry::builtin();
    expected.register::<BigServerSide>().unwrap();
    assert_eq!(r.schema(), expected.schema(), "nothing refused was added");
}

#[test]
fn schemas_that_differ_say_where() {
    let ours = Registry::builtin().schema();
    assert_eq!(ours.mismatch(&ours), None);
    assert_eq!(
        ours.0.iter().map(|e| (e.id, e.name.as_str())).collect::<Vec<_>>(),
        [(1, "transform"), (2, "kind"), (3, "vr_rig"), (4, "player_name"), (5, "prop_body"), (6, "resumed_from_ghost")]
    );
    let mut theirs = ours.clone();
    theirs.0[2].version = 2;
    assert_eq!(ours.mismatch(&theirs).unwrap(), "component 3 is vr_rig v1 here, vr_rig v2 there");
    let mut newer = Registry::builtin();
    newer.register::<Health>().unwrap();
    let newer = newer.schema();
    assert_eq!(ours.mismatch(&newer).unwrap(), "component 1000 (test.health v1) is unknown here");
    assert_eq!(newer.mismatch(&ours).unwrap(), "component 1000 (test.health v1) is missing there");
    let mut twice = ours.clone();
    twice.0.push(twice.0[0].clone());
    assert!(ours.mismatch(&twice).is_some());

    // A handoff is understood by a peer that has every component of the
    // set at the same version, whatever else either has.
    let mut set = ComponentSet::new();
    set.set(&Kind::Player);
    assert!(ours.understands(&newer, &set).is_ok());
    set.set(&Health(3));
    assert_eq!(ours.understands(&newer, &set), Err(ComponentError::Unknown(FIRST_GAME_ID)));
    assert!(theirs.understands(&ours, &ComponentSet::new()).is_ok());
}

#[test]
fn filtered_sets_keep_what_the_policies_say() {
    let mut registry = Registry::builtin();
    registry.register::<Health>().unwrap();
    let mut set = ComponentSet::new();
    set.set(&Transform::default());
    set.set(&VrRig::default());
    set.set(&PropBody::default());
    set.set(&Health(5));
    let ids = |s: &ComponentSet| s.ids().collect::<Vec<_>>();
    assert_eq!(ids(&set.filtered(&registry, |p| p.persisted)), [1, 5, FIRST_GAME_ID]);
    assert_eq!(ids(&set.filtered(&registry, |p| p.ghosted)), [1, 3, 5]);
    assert_eq!(ids(&set.filtered(&registry, |p| p.audience == Audience::Everyone)), [1, 3]);
    assert_eq!(ids(&set.filtered(&Registry::builtin(), |_| true)), [1, 3, 5], "unknown ones are left out");
}

#[test]
fn a_rig_pose_keeps_the_input_quantisation() {
    let p = Pose {
        pos: [0.1234, -1.5, 2.0004],
        rot: [0.0, std::f32::consts::FRAC_1_SQRT_2, 0.0, std::f32::consts::FRAC_1_SQRT_2],
    };
    let q = RigPose::quantise(&p);
    assert_eq!(q.pos_mm, [123, -1500, 2000]);
    let back = q.pose();
    let dot: f32 = back.rot.iter().zip(p.rot).map(|(a, b)| a * b).sum();
    assert!(dot.abs() > 0.999, "{back:?}");
    // Out of range and not finite: clamped, never a panic.
    let far = RigPose::quantise(&Pose { pos: [100.0, f32::NAN, -100.0], rot: [f32::NAN; 4] });
    assert_eq!(far.pos_mm, [i16::MAX, 0, i16::MIN]);
    // A name is cut at a character boundary, and decodes.
    let long = PlayerName("é".repeat(20));
    let back: PlayerName = decode_whole(&encode_whole(&long)).unwrap();
    assert_eq!(back.0, "é".repeat(16));
}

/// A set of some built-ins (each present or not) and a game's component.
fn set() -> impl Strategy<Value = ComponentSet> {
    (
        prop::option::of(transform()),
        prop::option::of(kind()),
        prop::option::of(rig()),
        prop::option::of(prop_body()),
        prop::option::of(0u16..=1000),
    )
        .prop_map(|(t, k, r, p, hp)| {
            let mut s = ComponentSet::new();
            t.iter().for_each(|v| s.set(v));
            k.iter().for_each(|v| s.set(v));
            r.iter().for_each(|v| s.set(v));
            p.iter().for_each(|v| s.set(v));
            hp.iter().for_each(|v| s.set(&Health(*v)));
            s
        })
}

proptest! {
    /// What a client decodes against its baseline is what the server holds
    /// of what the client may see, whatever the two sets are.
    #[test]
    fn changes_against_any_baseline_give_the_current_set(now in set(), base in prop::option::of(set())) {
        let mut registry = Registry::builtin();
        registry.register::<Health>().unwrap();
        let seen = |p: &Policy| p.audience != Audience::Servers;
        let mut out = Vec::new();
        now.encode_changes(base.as_ref(), &registry, seen, &mut out).unwrap();
        // The client's baseline holds only what it may see.
        let client_base = base.as_ref().map(|b| b.filtered(&registry, seen));
        let mut r = Reader::new(&out);
        let got = ComponentSet::decode_changes(&mut r, client_base.as_ref(), &registry).unwrap();
        r.finish().unwrap();
        prop_assert_eq!(got, now.filtered(&registry, seen));
        // Against itself, nothing: two bytes.
        let mut same = Vec::new();
        now.encode_changes(Some(&now), &registry, seen, &mut same).unwrap();
        prop_assert_eq!(same, vec![0, 0]);
    }

    #[test]
    fn changes_from_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..80), base in set()) {
        let mut registry = Registry::builtin();
        registry.register::<Health>().unwrap();
        let _ = ComponentSet::decode_changes(&mut Reader::new(&bytes), Some(&base), &registry);
        let _ = ComponentSet::decode_changes(&mut Reader::new(&bytes), None, &registry);
    }
}

#[test]
fn a_moved_transform_costs_its_delta_and_a_removal_is_explicit() {
    let registry = Registry::builtin();
    let mut base = ComponentSet::new();
    base.set(&Transform { pos_mm: [1_000_000, 64_000, 2_000_000], rot: 5, vel_cms: [100, 0, 0] });
    base.set(&Kind::Player);
    base.set(&VrRig::default());
    let mut now = base.clone();
    now.set(&Transform { pos_mm: [1_000_011, 64_000, 2_000_000], rot: 5, vel_cms: [100, 0, 0] });
    now.remove(VrRig::ID);
    let mut out = Vec::new();
    now.encode_changes(Some(&base), &registry, |_| true, &mut out).unwrap();
    // 1 changed: id 1, 5 bytes (mask, x +11, y 0, z 0); 1 removed: id 3.
    assert_eq!(out, [1, 1, 4, 1, 22, 0, 0, 1, 3]);
    let got = ComponentSet::decode_changes(&mut Reader::new(&out), Some(&base), &registry).unwrap();
    assert_eq!(got, now);
    // Removing what the baseline does not have is refused.
    let bad = [0, 1, 4];
    assert_eq!(
        ComponentSet::decode_changes(&mut Reader::new(&bad), Some(&base), &registry).unwrap_err().reason(),
        "unknown_component"
    );
}
