use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::component::builtin::{Kind, PlayerName, RigPose, VrRig};
use crate::component::{Audience, Component, ComponentError, Policy, Reader, Registry, Tracked};
use crate::ids::ServerId;
use crate::rng::Rng;
use crate::snapshot::{ComponentChanges, ComponentStore, History, View, WireComponents, decode, decode_into};

/// A component only its owner sees (as an inventory would be).
#[derive(Debug, Clone, PartialEq)]
struct Secret(u32);

impl Component for Secret {
    const ID: u16 = 1001;
    const NAME: &'static str = "test.secret";
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

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register::<Secret>().expect("registers");
    r
}

/// A server's entity states as a game server keeps them: slots reused
/// once freed, the states of the last `depth` ticks.
struct Ring {
    depth: usize,
    now: u32,
    /// Per slot, now.
    cur: Vec<Option<QEntity>>,
    changed: Vec<u32>,
    frames: Vec<(u32, Vec<Option<QEntity>>)>,
    /// Per slot, the components of its entity now.
    comps: Vec<WireComponents>,
}

impl Values for Ring {
    fn now(&self) -> u32 {
        self.now
    }
    fn current(&self, slot: u32) -> &QEntity {
        self.cur[slot as usize].as_ref().expect("wanted entities are here")
    }
    fn changed(&self, slot: u32) -> u32 {
        self.changed[slot as usize]
    }
    fn components(&self, slot: u32) -> &WireComponents {
        &self.comps[slot as usize]
    }
    fn at(&self, slot: u32, stamp: u32, id: EntityId) -> Option<&QEntity> {
        let (tick, states) = &self.frames[stamp as usize % self.depth];
        (*tick == stamp).then_some(())?;
        states.get(slot as usize)?.as_ref().filter(|q| q.id == id)
    }
}

/// Entities that come and go, move, stop and move back, over `ticks`.
struct World {
    rng: Rng,
    ring: Ring,
    /// Per entity (index = id - 1): its slot while here, and its state.
    here: Vec<Option<u32>>,
    state: Vec<QEntity>,
    free: Vec<u32>,
    /// Every state of every tick, for the test to say what a [`Held`] means.
    all: HashMap<(u32, EntityId), QEntity>,
    /// Per entity, its components as its server holds them.
    tracked: Vec<Tracked>,
    registry: Registry,
}

impl World {
    fn new(seed: u64, depth: usize, n: usize) -> Self {
        let state = (1..=n as u64)
            .map(|i| QEntity {
                id: EntityId(i * 3 + (i << 33)),
                pos: [i as i64 * 1000, 0, 0],
                rot: 0,
                vel: [0; 3],
                authority: ServerId(1),
            })
            .collect();
        Self {
            rng: Rng::new(seed),
            ring: Ring {
                depth,
                now: 0,
                cur: vec![],
                changed: vec![],
                frames: vec![(u32::MAX, vec![]); depth],
                comps: vec![],
            },
            here: vec![None; n],
            state,
            free: vec![],
            all: HashMap::new(),
            tracked: (0..n)
                .map(|i| {
                    let mut t = Tracked::default();
                    t.put(&Kind::Player, 0);
                    t.put(&Secret(i as u32), 0);
                    t
                })
                .collect(),
            registry: registry(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.f64() < p
    }

    fn step(&mut self, tick: u32) {
        self.ring.now = tick;
        let before: Vec<Option<QEntity>> = self.ring.cur.clone();
        for e in 0..self.state.len() {
            if self.chance(0.08) {
                // Comes or goes.
                match self.here[e].take() {
                    Some(s) => {
                        self.ring.cur[s as usize] = None;
                        self.free.push(s);
                    }
                    None => {
                        let s = self.free.pop().unwrap_or_else(|| {
                            self.ring.cur.push(None);
                            self.ring.changed.push(0);
                            self.ring.comps.push(WireComponents::default());
                            self.ring.cur.len() as u32 - 1
                        });
                        self.here[e] = Some(s);
                    }
                }
            }
            let q = &mut self.state[e];
            let r = self.rng.f64();
            if r < 0.4 {
                q.pos[0] += (self.rng.range(-300.0, 300.0)) as i64;
                q.vel[2] = self.rng.range(-50.0, 50.0) as i16;
            } else if r < 0.5 {
                q.rot ^= 1 << (self.rng.f64() * 40.0) as u32;
            } else if r < 0.55 {
                q.authority = ServerId(q.authority.0 % 3 + 1);
            } else if r < 0.6 {
                // Moves and moves back: changed, though its state is the same.
                q.pos[1] = 0;
            } else if r < 0.65 {
                q.pos[1] = 5;
            }
            // Its components: the rig often, the rest now and then.
            let t = &mut self.tracked[e];
            let c = self.rng.f64();
            let t64 = u64::from(tick);
            if c < 0.3 {
                let mm = |rng: &mut Rng| rng.range(-900.0, 900.0) as i16;
                let pose = |rng: &mut Rng| RigPose {
                    pos_mm: [mm(rng), mm(rng), mm(rng)],
                    rot: (rng.next_u64() as u32) & 0x3fff_ffff,
                };
                let rig = VrRig { head: pose(&mut self.rng), left: pose(&mut self.rng), right: pose(&mut self.rng) };
                t.put(&rig, t64);
            } else if c < 0.35 {
                t.put(&PlayerName(format!("p{}", (self.rng.next_u64() as u32) % 7)), t64);
            } else if c < 0.4 {
                t.remove(PlayerName::ID, t64);
            } else if c < 0.45 {
                t.put(&Secret(self.rng.next_u64() as u32), t64);
            } else if c < 0.47 {
                t.remove(VrRig::ID, t64);
            }
            if let Some(s) = self.here[e] {
                let s = s as usize;
                let was = before.get(s).copied().flatten();
                let comps = &mut self.ring.comps[s];
                let fresh = was.is_none_or(|w| w.id != q.id);
                comps.refill(self.tracked[e].set(), &self.registry, tick, fresh);
                // The summary answers as the components do, where it answers.
                for back in [0u32, 1, 2, 3, 5, 8, 13, 40] {
                    let since = tick.wrapping_sub(back);
                    if let Some(n) = comps.cost().len(Some(since)) {
                        assert_eq!(n, comps.block_len(Some(since), false), "since {since} at {tick}");
                    }
                }
                assert_eq!(comps.cost().len(None), Some(comps.block_len(None, false)));
                if was != Some(*q) || fresh || comps.everyone_at() == tick {
                    self.ring.changed[s] = tick;
                }
                self.ring.cur[s] = Some(*q);
                self.all.insert((tick, q.id), *q);
            }
        }
        let depth = self.ring.depth;
        self.ring.frames[tick as usize % depth] = (tick, self.ring.cur.clone());
    }

    /// What the client should hold after the newest snapshot.
    fn expected(&self, b: &Baselines) -> View {
        let (tick, held) = b.newest().expect("a snapshot was encoded");
        View { tick, entities: held.iter().map(|h| self.all[&(h.stamp, h.id)]).collect() }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_client_decodes_exactly_what_the_server_says_it_holds(
        seed in any::<u64>(),
        depth in 2usize..40,
        n in 1usize..60,
        loss in 0.0f64..0.5,
    ) {
        let mut w = World::new(seed, depth, n);
        let mut b = Baselines::default();
        let mut client = History::default();
        let mut store = ComponentStore::default();
        let mut changes = ComponentChanges::default();
        // The client plays the first entity: it alone sees its secret.
        let me = w.state[0].id;
        let mut received: Vec<Tick> = vec![];
        let mut out = Vec::new();
        let mut wanted = Vec::new();
        for tick in 1..120u32 {
            w.step(tick);
            wanted.clear();
            for e in 0..n {
                if let Some(slot) = w.here[e].filter(|_| w.rng.f64() < 0.85) {
                    wanted.push(Want { id: w.state[e].id, slot, priority: w.rng.range(-1.0, 50.0) as f32 });
                }
            }
            wanted.sort_by_key(|x| x.id);
            // The newest the client got, sometimes an older one or none.
            let acked = match w.rng.f64() {
                r if r < 0.1 => 0,
                r if r < 0.3 && received.len() > 2 => received[received.len() - 3],
                _ => received.last().copied().unwrap_or(0),
            };
            let budget = w.rng.range(20.0, 900.0) as usize;
            out.clear();
            let header = Header { tick: u64::from(tick), server: ServerId(1), authoritative: true, last_input_seq: 0 };
            let base = b.history.iter().rev().find(|v| v.tick == acked).cloned();
            let origin = DVec3::new(1.4, 0.0, -7.6);
            b.encode(&w.ring, &header, origin, me, &wanted, acked, budget, &mut out);
            prop_assert!(out.len() <= budget.max(24), "{} > {budget}", out.len());
            prop_assert_eq!(b.fresh().len(), wanted.len());
            // Greedy by priority: a changed entity left out while a lower
            // one went costs more than that one did.
            let held = |x: &Want| base.as_ref().and_then(|v| v.held.iter().find(|h| h.id == x.id));
            let changed = |x: &Want| {
                held(x).is_none_or(|h| h.slot != x.slot || after(w.ring.changed(x.slot), h.stamp))
            };
            let cost = |x: &Want| {
                let e = w.ring.current(x.slot);
                let c = &w.ring.comps[x.slot as usize];
                let own = x.id == me;
                match held(x).map(|h| (w.ring.at(h.slot, h.stamp, h.id), h.stamp)) {
                    None => record_len(e, None, origin_mm(origin), 0) + c.block_len(None, own),
                    Some((Some(b), s)) => record_len(e, Some(b), origin_mm(origin), 0) + c.block_len(Some(s), own),
                    Some((None, _)) => {
                        varint_len(e.id.0) + record_len(e, None, origin_mm(origin), 0) + c.block_len(None, own)
                    }
                }
            };
            let rank = |x: &Want| x.priority.max(0.0);
            for (u, fu) in wanted.iter().zip(b.fresh()).filter(|(u, f)| changed(u) && !**f) {
                for (p, _) in wanted.iter().zip(b.fresh()).filter(|(p, f)| changed(p) && **f) {
                    if rank(u) > rank(p) {
                        prop_assert!(cost(u) > cost(p), "{:?} left out ({fu}), {:?} sent", u, p);
                    }
                }
            }
            if w.rng.f64() < loss {
                continue;
            }
            let (h, got) = decode_into(&out, |t| client.get(t), &mut changes)
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(h, header);
            prop_assert_eq!(&got, &w.expected(&b));
            let oldest = client.oldest_tick().unwrap_or(h.tick);
            store.apply(&changes, &got, oldest, &w.registry).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            for (x, fresh) in wanted.iter().zip(b.fresh()) {
                if *fresh {
                    prop_assert!(got.entities.contains(w.ring.current(x.slot)), "{:?} fresh but not held", x.id);
                    // And the components it may see, exactly as they are now.
                    let e = w.state.iter().position(|s| s.id == x.id).expect("an entity");
                    let visible = w.tracked[e].set().filtered(&w.registry, |p| {
                        p.audience == Audience::Everyone || (x.id == me && p.audience == Audience::Owner)
                    });
                    prop_assert_eq!(store.get(x.id), Some(&visible), "{:?}", x.id);
                }
            }
            // Every entity the client sees has its components.
            for e in &got.entities {
                prop_assert!(store.get(e.id).is_some(), "{:?} without components", e.id);
            }
            client.push(got);
            received.push(u64::from(tick));
        }
    }
}

#[test]
fn a_state_the_ring_forgot_is_sent_whole_and_what_is_unchanged_costs_nothing() {
    // A ring of two ticks; the client acknowledges nothing for a while.
    let mut w = World::new(1, 2, 1);
    let mut b = Baselines::default();
    let mut client = History::default();
    let header =
        |tick: u32| Header { tick: u64::from(tick), server: ServerId(1), authoritative: true, last_input_seq: 0 };
    let q = |w: &World| w.state[0];
    // Tick 1: it comes, is sent whole.
    w.ring.now = 1;
    w.ring.cur = vec![Some(q(&w))];
    w.ring.changed = vec![1];
    w.ring.comps = vec![WireComponents::default()];
    w.ring.frames[1] = (1, w.ring.cur.clone());
    w.all.insert((1, q(&w).id), q(&w));
    let want = [Want { id: q(&w).id, slot: 0, priority: 1.0 }];
    let mut out = Vec::new();
    b.encode(&w.ring, &header(1), DVec3::ZERO, EntityId(1), &want, 0, 1000, &mut out);
    client.push(decode(&out, |t| client.get(t)).unwrap().1);
    // Tick 2, nothing changed: a delta of no record.
    w.ring.now = 2;
    w.ring.frames[0] = (2, w.ring.cur.clone());
    out.clear();
    b.encode(&w.ring, &header(2), DVec3::ZERO, EntityId(1), &want, 1, 1000, &mut out);
    assert_eq!(b.fresh(), [true]);
    let (_, v) = decode(&out, |t| client.get(t)).unwrap();
    assert_eq!(v.entities, [q(&w)]);
    assert_eq!(*out.last().unwrap(), 0, "no record");
    // Ticks 3 and 4 it moves; the client still acknowledges tick 1, whose
    // state the ring of two ticks no longer has: it is removed and sent
    // whole, and the client ends with its state of now.
    for tick in [3, 4] {
        w.state[0].pos[0] += 250;
        w.ring.now = tick;
        w.ring.cur = vec![Some(q(&w))];
        w.ring.changed = vec![tick];
        w.ring.frames[tick as usize % 2] = (tick, w.ring.cur.clone());
        w.all.insert((tick, q(&w).id), q(&w));
    }
    out.clear();
    b.encode(&w.ring, &header(4), DVec3::ZERO, EntityId(1), &want, 1, 1000, &mut out);
    assert_eq!(b.fresh(), [true]);
    let (_, v) = decode(&out, |t| client.get(t)).unwrap();
    assert_eq!(v.entities, [q(&w)]);
    assert_eq!(v, w.expected(&b));
    // With too small a budget for it, the client keeps what it held.
    w.state[0].pos[0] += 250;
    w.ring.now = 5;
    w.ring.cur = vec![Some(q(&w))];
    w.ring.changed = vec![5];
    w.ring.frames[1] = (5, w.ring.cur.clone());
    w.all.insert((5, q(&w).id), q(&w));
    out.clear();
    b.encode(&w.ring, &header(5), DVec3::ZERO, EntityId(1), &want, 1, 16, &mut out);
    assert_eq!(b.fresh(), [false]);
    let (_, v) = decode(&out, |t| client.get(t)).unwrap();
    assert_eq!(v, w.expected(&b));
    assert_ne!(v.entities, [q(&w)]);
}
