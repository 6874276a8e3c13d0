//! Snapshot encoding: quantised, delta-compressed against a snapshot the
//! client acknowledged, written within a byte budget in priority order.
//!
//! - Positions travel in millimetres: relative to the per-snapshot origin
//!   (whole metres, near the receiving player) for an entity the baseline
//!   lacks, relative to its baseline value otherwise.
//! - Rotations travel as smallest-three quaternions: the index of the
//!   largest component (2 bits) and the other three in 15 bits each, 6 bytes.
//! - Velocities travel in cm/s.
//! - Against a baseline, an entity whose quantised state did not change
//!   costs nothing; a changed one sends only the fields that changed; one
//!   that left the view is listed as removed.
//!
//! The encoder returns the [`View`] the client will hold after decoding
//! (what it was sent on top of the baseline, the baseline's values for what
//! did not fit the budget). The server keeps these views as baselines, so
//! both sides delta from exactly the same integers and errors never add up.
//!
//! Integers are LEB128 varints (zigzag for signed). Every decode error is a
//! [`DecodeError`] with a stable reason.

pub mod held;
pub mod parts;

pub use parts::{BlockCost, ComponentChanges, ComponentStore, WireComponents};

use glam::DVec3;

use crate::codec::{from_smallest_three, put_varint as varint, smallest_three, take_varint, unzigzag, zigzag};
use crate::ids::{EntityId, ServerId};
use crate::time::Tick;
use crate::wire::{DecodeError, EntityState, MAX_DATAGRAM, Snapshot};

/// Datagram kind of a snapshot.
pub const KIND_SNAPSHOT: u8 = 2;
/// Position quantum, metres.
pub const POS_QUANTUM_M: f64 = 0.001;
/// Velocity quantum, m/s.
pub const VEL_QUANTUM: f32 = 0.01;
/// Bits per smallest-three component.
const ROT_BITS: u32 = 15;
/// Snapshots a side keeps as baselines (0.35 s at 90 Hz: acknowledgements
/// older than that fall back to a full state).
pub const HISTORY: usize = 32;
/// Most entities a decoded view holds (a bound on what a peer can make us allocate).
pub const MAX_VIEW_ENTITIES: usize = 1024;

const FLAG_AUTHORITATIVE: u8 = 1;
const FLAG_DELTA: u8 = 2;
const HAS_POS: u8 = 1;
const HAS_ROT: u8 = 2;
const HAS_VEL: u8 = 4;
const HAS_AUTHORITY: u8 = 8;
/// The record carries a component block ([`parts`]).
const HAS_COMPONENTS: u8 = 16;
/// The fields a record of an entity new to the view must have.
const WHOLE: u8 = HAS_POS | HAS_ROT | HAS_VEL | HAS_AUTHORITY;

/// An entity as the wire carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QEntity {
    pub id: EntityId,
    /// Millimetres.
    pub pos: [i64; 3],
    /// Smallest-three, 47 bits.
    pub rot: u64,
    /// Centimetres a second.
    pub vel: [i16; 3],
    pub authority: ServerId,
}

impl QEntity {
    pub fn quantise(e: &EntityState) -> Self {
        let mm = |v: f64| (v / POS_QUANTUM_M).round() as i64;
        let cms = |v: f32| (v / VEL_QUANTUM).round().clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16;
        Self {
            id: e.id,
            pos: [mm(e.pos.x), mm(e.pos.y), mm(e.pos.z)],
            rot: smallest_three(e.rot, ROT_BITS),
            vel: [cms(e.vel[0]), cms(e.vel[1]), cms(e.vel[2])],
            authority: e.authority,
        }
    }

    pub fn state(&self) -> EntityState {
        EntityState {
            id: self.id,
            pos: DVec3::new(self.pos[0] as f64, self.pos[1] as f64, self.pos[2] as f64) * POS_QUANTUM_M,
            rot: from_smallest_three(self.rot, ROT_BITS),
            vel: self.vel.map(|v| f32::from(v) * VEL_QUANTUM),
            authority: self.authority,
        }
    }
}

/// What a client holds of one server's world after one snapshot: entities
/// sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub tick: Tick,
    pub entities: Vec<QEntity>,
}

/// The fields of a snapshot besides its entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tick: Tick,
    pub server: ServerId,
    pub authoritative: bool,
    pub last_input_seq: u32,
}

fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7).max(1)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (b, rest) = self.0.split_first().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*b)
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        take_varint(&mut self.0)
    }
    fn signed(&mut self) -> Result<i64, DecodeError> {
        Ok(unzigzag(self.varint()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::BadVarint)
    }
    fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }
    fn rot(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..6 {
            v |= u64::from(self.u8()?) << (8 * i);
        }
        if (v >> (2 + 3 * ROT_BITS)) != 0 {
            return Err(DecodeError::BadFrame);
        }
        Ok(v)
    }
}

/// Metres of the origin: the receiving player's position, rounded.
fn origin_mm(origin: DVec3) -> [i64; 3] {
    let m = |v: f64| if v.is_finite() { v.round() as i64 } else { 0 };
    [m(origin.x) * 1000, m(origin.y) * 1000, m(origin.z) * 1000]
}

/// A snapshot's bytes before its removals: kind, flags, tick, server, last
/// input, the baseline's distance (a delta) and the origin (whole metres).
fn write_head(header: &Header, origin_q: [i64; 3], baseline: Option<Tick>, head: &mut Vec<u8>) {
    head.clear();
    head.push(KIND_SNAPSHOT);
    let mut flags = if header.authoritative { FLAG_AUTHORITATIVE } else { 0 };
    if baseline.is_some() {
        flags |= FLAG_DELTA;
    }
    head.push(flags);
    varint(head, header.tick);
    varint(head, u64::from(header.server.0));
    varint(head, u64::from(header.last_input_seq));
    if let Some(b) = baseline {
        varint(head, header.tick.saturating_sub(b));
    }
    for v in origin_q {
        varint(head, zigzag(v / 1000));
    }
}

/// Removals first: a client must not keep ghosts of what left its view.
/// One walk of the baseline (`kept`) and the `wanted` ids, both in id
/// order, lists in `removed` the baseline entities not wanted while their
/// ids fit `budget`, and puts in `at` each wanted entity's index in the
/// baseline. Returns the bytes used after the removals.
#[allow(clippy::too_many_arguments)]
fn match_baseline<K, W>(
    kept: &[K],
    kept_id: impl Fn(&K) -> EntityId,
    wanted: &[W],
    wanted_id: impl Fn(&W) -> EntityId,
    budget: usize,
    mut used: usize,
    at: &mut Vec<Option<u32>>,
    removed: &mut Vec<EntityId>,
) -> usize {
    at.clear();
    at.resize(wanted.len(), None);
    removed.clear();
    let (mut prev, mut j, mut removing) = (0, 0, true);
    for (i, e) in kept.iter().enumerate() {
        let id = kept_id(e);
        while j < wanted.len() && wanted_id(&wanted[j]) < id {
            j += 1;
        }
        if wanted.get(j).is_some_and(|w| wanted_id(w) == id) {
            at[j] = Some(i as u32);
        } else if removing {
            let cost = varint_len(id.0 - prev);
            if used + cost > budget {
                removing = false;
                continue;
            }
            used += cost;
            prev = id.0;
            removed.push(id);
        }
    }
    used
}

/// The sort key of a changed entity: its priority's bits above (`!`:
/// highest first; non-negative floats order as their bits, and -0.0 and
/// NaN count as 0), its index below.
fn priority_key(priority: f32, index: usize) -> u64 {
    let p = if priority > 0.0 { priority } else { 0.0 };
    (u64::from(!p.to_bits()) << 32) | index as u64
}

/// Which fields of `e` differ from `base` (all of them without one).
fn changed(e: &QEntity, base: Option<&QEntity>) -> u8 {
    let Some(b) = base else { return HAS_POS | HAS_ROT | HAS_VEL | HAS_AUTHORITY };
    let mut mask = 0;
    if b.pos != e.pos {
        mask |= HAS_POS;
    }
    if b.rot != e.rot {
        mask |= HAS_ROT;
    }
    if b.vel != e.vel {
        mask |= HAS_VEL;
    }
    if b.authority != e.authority {
        mask |= HAS_AUTHORITY;
    }
    mask
}

/// The length of [`record`]'s bytes, without writing them.
fn record_len(e: &QEntity, base: Option<&QEntity>, origin: [i64; 3], prev_id: u64) -> usize {
    let mask = changed(e, base);
    let mut n = varint_len(e.id.0 - prev_id) + 1;
    if mask & HAS_POS != 0 {
        let from = base.map_or(origin, |b| b.pos);
        n += e.pos.iter().zip(from).map(|(p, f)| varint_len(zigzag(p.wrapping_sub(f)))).sum::<usize>();
    }
    if mask & HAS_ROT != 0 {
        n += 6;
    }
    if mask & HAS_VEL != 0 {
        n += e.vel.iter().map(|v| varint_len(zigzag(i64::from(*v)))).sum::<usize>();
    }
    if mask & HAS_AUTHORITY != 0 {
        n += varint_len(u64::from(e.authority.0));
    }
    n
}

/// One entity's record: what changed against `base` (all of it without
/// one); `extra` adds [`HAS_COMPONENTS`] when a component block follows.
fn record(e: &QEntity, base: Option<&QEntity>, origin: [i64; 3], prev_id: u64, extra: u8, out: &mut Vec<u8>) {
    let mask = changed(e, base) | extra;
    varint(out, e.id.0 - prev_id);
    out.push(mask);
    if mask & HAS_POS != 0 {
        let from = base.map_or(origin, |b| b.pos);
        for (p, f) in e.pos.iter().zip(from) {
            varint(out, zigzag(p.wrapping_sub(f)));
        }
    }
    if mask & HAS_ROT != 0 {
        out.extend_from_slice(&e.rot.to_le_bytes()[..6]);
    }
    if mask & HAS_VEL != 0 {
        for v in e.vel {
            varint(out, zigzag(i64::from(v)));
        }
    }
    if mask & HAS_AUTHORITY != 0 {
        varint(out, u64::from(e.authority.0));
    }
}

/// Buffers [`encode_with`] and [`encode_by_id`] reuse from one snapshot
/// to the next.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    /// Per entity of `wanted` (id order): its index in the baseline.
    at: Vec<Option<u32>>,
    removed: Vec<EntityId>,
    /// Changed entities by priority: `!priority` bits above, index in `wanted` below.
    keys: Vec<u64>,
    /// Per entity of `wanted` (id order): sent in this snapshot.
    picked: Vec<bool>,
    head: Vec<u8>,
    /// Per entity of `wanted` (the caller's order): the view now holds its current state.
    fresh: Vec<bool>,
    /// [`encode_with`]'s input in id order: the entities, their rank as a
    /// priority, and where each entity of the caller's order went.
    sorted: Vec<QEntity>,
    rank: Vec<f32>,
    by_id: Vec<(EntityId, u32)>,
    place: Vec<u32>,
    fresh_by_id: Vec<bool>,
}

impl Scratch {
    /// After an encode: for each entity of the `wanted` it was given (in
    /// its order), whether the client's view now holds its current state
    /// (sent now, or unchanged from the baseline).
    pub fn fresh(&self) -> &[bool] {
        &self.fresh
    }
}

/// Encodes a snapshot into `out` (appended): the entities of `wanted`, in
/// priority order (highest first), as deltas against `baseline` (a full
/// state without one), in at most `budget` bytes (never more than
/// [`MAX_DATAGRAM`]). Entities that did not fit keep, for the client, their
/// baseline state or stay unknown to it; entities of the baseline that are
/// not wanted are removed. Returns the view the client will hold.
pub fn encode(
    header: &Header,
    origin: DVec3,
    wanted: &[QEntity],
    baseline: Option<&View>,
    budget: usize,
    out: &mut Vec<u8>,
) -> View {
    let mut view = View::default();
    encode_with(&mut Scratch::default(), header, origin, wanted, baseline, budget, out, &mut view);
    view
}

/// [`encode`] with buffers kept by the caller, writing the view the client
/// will hold into `view` (its allocation reused). A duplicate id in
/// `wanted` is sent once, at its first place.
#[allow(clippy::too_many_arguments)]
pub fn encode_with(
    sc: &mut Scratch,
    header: &Header,
    origin: DVec3,
    wanted: &[QEntity],
    baseline: Option<&View>,
    budget: usize,
    out: &mut Vec<u8>,
    view: &mut View,
) {
    // In id order, each id once, ranked by its first place.
    let mut by_id = std::mem::take(&mut sc.by_id);
    by_id.clear();
    by_id.extend(wanted.iter().enumerate().map(|(k, e)| (e.id, k as u32)));
    by_id.sort_unstable();
    by_id.dedup_by_key(|w| w.0);
    let (mut sorted, mut rank, mut place) =
        (std::mem::take(&mut sc.sorted), std::mem::take(&mut sc.rank), std::mem::take(&mut sc.place));
    sorted.clear();
    rank.clear();
    place.clear();
    place.resize(wanted.len(), 0);
    for (j, &(_, k)) in by_id.iter().enumerate() {
        sorted.push(wanted[k as usize]);
        rank.push((wanted.len() - k as usize) as f32);
        place[k as usize] = j as u32;
    }
    for (k, e) in wanted.iter().enumerate() {
        // A duplicate shares its id's place.
        if by_id[place[k] as usize].0 != e.id {
            place[k] = by_id.binary_search_by_key(&e.id, |w| w.0).unwrap_or(0) as u32;
        }
    }
    encode_by_id(sc, header, origin, &sorted, &rank, baseline, budget, out, view);
    std::mem::swap(&mut sc.fresh, &mut sc.fresh_by_id);
    sc.fresh.clear();
    sc.fresh.extend(place.iter().map(|&j| sc.fresh_by_id[j as usize]));
    (sc.by_id, sc.sorted, sc.rank, sc.place) = (by_id, sorted, rank, place);
}

/// [`encode_with`] for a caller that keeps its entities in id order:
/// `wanted` sorted by id, each id once, and `priority` giving each its
/// weight (higher first; changed entities are sent in that order while
/// they fit). No sort of the whole set: only the changed entities are
/// ordered. [`Scratch::fresh`] answers in `wanted`'s order.
#[allow(clippy::too_many_arguments)]
pub fn encode_by_id(
    sc: &mut Scratch,
    header: &Header,
    origin: DVec3,
    wanted: &[QEntity],
    priority: &[f32],
    baseline: Option<&View>,
    budget: usize,
    out: &mut Vec<u8>,
    view: &mut View,
) {
    debug_assert!(wanted.windows(2).all(|w| w[0].id < w[1].id), "wanted is sorted by id, each id once");
    debug_assert_eq!(wanted.len(), priority.len());
    let budget = budget.min(MAX_DATAGRAM);
    let start = out.len();
    let origin_q = origin_mm(origin);
    write_head(header, origin_q, baseline.map(|b| b.tick), &mut sc.head);
    let mut used = sc.head.len() + 2 * 3; // two counts, up to 3 bytes each
    let kept = baseline.map_or(&[][..], |b| &b.entities[..]);
    used = match_baseline(kept, |e| e.id, wanted, |w| w.id, budget, used, &mut sc.at, &mut sc.removed);
    // Then what changed, in priority order, while it fits (and while the
    // client's view has room for what it lacks). The id is costed in full
    // here; written as a difference it only gets shorter.
    sc.fresh.clear();
    sc.fresh.resize(wanted.len(), false);
    sc.picked.clear();
    sc.picked.resize(wanted.len(), false);
    sc.keys.clear();
    for (k, e) in wanted.iter().enumerate() {
        let base = sc.at[k].map(|i| &kept[i as usize]);
        if base == Some(e) {
            sc.fresh[k] = true;
        } else {
            sc.keys.push(priority_key(priority[k], k));
        }
    }
    sc.keys.sort_unstable();
    let mut room = MAX_VIEW_ENTITIES.saturating_sub(kept.len() - sc.removed.len());
    let mut chosen = 0u64;
    for &key in &sc.keys {
        let k = key as u32 as usize;
        let at = sc.at[k];
        if at.is_none() && room == 0 {
            continue;
        }
        let cost = record_len(&wanted[k], at.map(|i| &kept[i as usize]), origin_q, 0);
        if used + cost <= budget {
            used += cost;
            sc.picked[k] = true;
            sc.fresh[k] = true;
            chosen += 1;
            if at.is_none() {
                room -= 1;
            }
        }
    }
    // The view the client ends with: the baseline less what was removed,
    // with what was sent (both in id order).
    view.tick = header.tick;
    view.entities.clear();
    let (mut i, mut r) = (0, 0);
    for (k, e) in wanted.iter().enumerate() {
        while i < kept.len() && kept[i].id < e.id {
            if sc.removed.get(r) == Some(&kept[i].id) {
                r += 1;
            } else {
                view.entities.push(kept[i]);
            }
            i += 1;
        }
        let held = (i < kept.len() && kept[i].id == e.id).then(|| {
            i += 1;
            kept[i - 1]
        });
        if sc.picked[k] {
            view.entities.push(*e);
        } else if let Some(h) = held {
            view.entities.push(h);
        }
    }
    for e in &kept[i..] {
        if sc.removed.get(r) == Some(&e.id) {
            r += 1;
        } else {
            view.entities.push(*e);
        }
    }
    out.extend_from_slice(&sc.head);
    varint(out, sc.removed.len() as u64);
    let mut prev = 0;
    for id in &sc.removed {
        varint(out, id.0 - prev);
        prev = id.0;
    }
    varint(out, chosen);
    let mut prev = 0;
    for (k, e) in wanted.iter().enumerate() {
        if sc.picked[k] {
            record(e, sc.at[k].map(|i| &kept[i as usize]), origin_q, prev, 0, out);
            prev = e.id.0;
        }
    }
    debug_assert!(out.len() - start <= budget.max(sc.head.len() + 2), "{} > {budget}", out.len() - start);
}

/// Decodes a snapshot datagram; `baseline` finds the view of a tick this
/// side holds (a delta against one it lacks is refused: `unknown_baseline`).
pub fn decode<'a>(
    bytes: &[u8],
    baseline: impl FnOnce(Tick) -> Option<&'a View>,
) -> Result<(Header, View), DecodeError> {
    decode_into(bytes, baseline, &mut ComponentChanges::default())
}

/// [`decode`], with the components the snapshot carries read into
/// `changes` (cleared first; not checked against a registry:
/// [`ComponentStore::apply`] does).
pub fn decode_into<'a>(
    bytes: &[u8],
    baseline: impl FnOnce(Tick) -> Option<&'a View>,
    changes: &mut ComponentChanges,
) -> Result<(Header, View), DecodeError> {
    changes.clear();
    let mut r = Reader(bytes);
    if r.u8()? != KIND_SNAPSHOT {
        return Err(DecodeError::UnknownKind(bytes[0]));
    }
    let flags = r.u8()?;
    if flags & !(FLAG_AUTHORITATIVE | FLAG_DELTA) != 0 {
        return Err(DecodeError::BadFrame);
    }
    let tick = r.varint()?;
    let server = ServerId(r.u32()?);
    let last_input_seq = r.u32()?;
    let base = if flags & FLAG_DELTA != 0 {
        let back = r.varint()?;
        let t = tick.checked_sub(back).ok_or(DecodeError::UnknownBaseline)?;
        Some(baseline(t).filter(|v| v.tick == t).ok_or(DecodeError::UnknownBaseline)?)
    } else {
        None
    };
    let mut origin = [0i64; 3];
    for o in &mut origin {
        *o = r.signed()?.checked_mul(1000).ok_or(DecodeError::BadVarint)?;
    }
    let mut view: Vec<QEntity> = base.map(|b| b.entities.clone()).unwrap_or_default();
    let n_removed = r.varint()?;
    if n_removed > view.len() as u64 {
        return Err(DecodeError::TooManyEntities);
    }
    let mut id = 0u64;
    for _ in 0..n_removed {
        id = id.checked_add(r.varint()?).ok_or(DecodeError::BadVarint)?;
        match view.binary_search_by_key(&EntityId(id), |e| e.id) {
            Ok(i) => {
                view.remove(i);
            }
            Err(_) => return Err(DecodeError::BadFrame),
        }
    }
    let n = r.varint()?;
    if n > MAX_VIEW_ENTITIES as u64 {
        return Err(DecodeError::TooManyEntities);
    }
    let mut id = 0u64;
    for k in 0..n {
        let step = r.varint()?;
        if k > 0 && step == 0 {
            return Err(DecodeError::BadFrame);
        }
        id = id.checked_add(step).ok_or(DecodeError::BadVarint)?;
        let mask = r.u8()?;
        if mask & !(WHOLE | HAS_COMPONENTS) != 0 {
            return Err(DecodeError::BadFrame);
        }
        let slot = view.binary_search_by_key(&EntityId(id), |e| e.id);
        let prior = match slot {
            Ok(i) => Some(view[i]),
            Err(_) if mask & WHOLE != WHOLE => return Err(DecodeError::BadFrame),
            Err(_) => None,
        };
        let mut e =
            prior.unwrap_or(QEntity { id: EntityId(id), pos: [0; 3], rot: 0, vel: [0; 3], authority: ServerId(0) });
        if mask & HAS_POS != 0 {
            let from = prior.map_or(origin, |p| p.pos);
            for (p, f) in e.pos.iter_mut().zip(from) {
                *p = f.wrapping_add(r.signed()?);
            }
        }
        if mask & HAS_ROT != 0 {
            e.rot = r.rot()?;
        }
        if mask & HAS_VEL != 0 {
            for v in &mut e.vel {
                *v = i16::try_from(r.signed()?).map_err(|_| DecodeError::BadVarint)?;
            }
        }
        if mask & HAS_AUTHORITY != 0 {
            e.authority = ServerId(r.u32()?);
        }
        changes.record(&mut r, e.id, prior.is_none(), mask & HAS_COMPONENTS != 0)?;
        match slot {
            Ok(i) => view[i] = e,
            Err(i) if view.len() < MAX_VIEW_ENTITIES => view.insert(i, e),
            Err(_) => return Err(DecodeError::TooManyEntities),
        }
    }
    if !r.0.is_empty() {
        return Err(DecodeError::TrailingBytes(r.0.len()));
    }
    let header = Header { tick, server, authoritative: flags & FLAG_AUTHORITATIVE != 0, last_input_seq };
    Ok((header, View { tick, entities: view }))
}

/// The views one side keeps, newest last, at most [`HISTORY`].
#[derive(Debug, Clone, Default)]
pub struct History(std::collections::VecDeque<View>);

impl History {
    pub fn get(&self, tick: Tick) -> Option<&View> {
        self.0.iter().rev().find(|v| v.tick == tick)
    }

    /// Keeps `view`; returns the oldest if it made room for it.
    pub fn push(&mut self, view: View) -> Option<View> {
        let old = if self.0.len() == HISTORY { self.0.pop_front() } else { None };
        self.0.push_back(view);
        old
    }

    pub fn newest_tick(&self) -> Option<Tick> {
        self.0.back().map(|v| v.tick)
    }

    pub fn oldest_tick(&self) -> Option<Tick> {
        self.0.front().map(|v| v.tick)
    }
}

/// A client's receiving end of one server's snapshots: the views it holds
/// as baselines and the components of the entities it sees.
#[derive(Debug, Clone)]
pub struct Receiver {
    history: History,
    registry: std::sync::Arc<crate::component::Registry>,
    components: ComponentStore,
    changes: ComponentChanges,
}

impl Default for Receiver {
    /// Knowing the built-in components.
    fn default() -> Self {
        Self::with_registry(std::sync::Arc::new(crate::component::Registry::builtin()))
    }
}

impl Receiver {
    /// Knowing the components of `registry` (the server's must be the same).
    pub fn with_registry(registry: std::sync::Arc<crate::component::Registry>) -> Self {
        Self {
            history: History::default(),
            registry,
            components: ComponentStore::default(),
            changes: ComponentChanges::default(),
        }
    }

    /// Decodes a datagram against the views received before. A snapshot
    /// newer than all before it updates [`Receiver::components`]; one with
    /// a component the registry refuses is refused whole.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Snapshot, DecodeError> {
        let (h, view) = decode_into(bytes, |t| self.history.get(t), &mut self.changes)?;
        let newest = self.history.newest_tick().is_none_or(|t| h.tick > t);
        if newest {
            let oldest = self.history.oldest_tick().unwrap_or(h.tick);
            self.components.apply(&self.changes, &view, oldest, &self.registry).map_err(DecodeError::Component)?;
        }
        let snapshot = Snapshot {
            tick: h.tick,
            server: h.server,
            authoritative: h.authoritative,
            last_input_seq: h.last_input_seq,
            entities: view.entities.iter().map(QEntity::state).collect(),
        };
        if newest {
            self.history.push(view);
        }
        Ok(snapshot)
    }

    /// The tick to acknowledge: the newest snapshot decoded (0: none).
    pub fn ack(&self) -> Tick {
        self.history.newest_tick().unwrap_or(0)
    }

    /// The components of the entities seen, as the newest snapshot left them.
    pub fn components(&self) -> &ComponentStore {
        &self.components
    }

    /// The components the last snapshot decoded carried.
    pub fn last_changes(&self) -> &ComponentChanges {
        &self.changes
    }
}

/// A server's sending end for one client: encodes against the newest
/// snapshot the client acknowledged, keeping what it sent as baselines.
#[derive(Debug, Clone, Default)]
pub struct Sender {
    history: History,
    scratch: Scratch,
    /// The allocation of the last view dropped from the history.
    spare: View,
}

impl Sender {
    pub fn encode(
        &mut self,
        header: &Header,
        origin: DVec3,
        wanted: &[QEntity],
        acked: Tick,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> &View {
        self.keep(acked, |sc, baseline, view| encode_with(sc, header, origin, wanted, baseline, budget, out, view))
    }

    /// Runs one encoder against the view acknowledged at `acked` into a
    /// reused view, and keeps the result as the newest baseline.
    fn keep(&mut self, acked: Tick, encode: impl FnOnce(&mut Scratch, Option<&View>, &mut View)) -> &View {
        let mut view = std::mem::take(&mut self.spare);
        encode(&mut self.scratch, self.history.get(acked), &mut view);
        if let Some(old) = self.history.push(view) {
            self.spare = old;
        }
        self.history.0.back().expect("just pushed")
    }

    /// [`Sender::encode`] of entities in id order with their priorities
    /// (see [`encode_by_id`]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_by_id(
        &mut self,
        header: &Header,
        origin: DVec3,
        wanted: &[QEntity],
        priority: &[f32],
        acked: Tick,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> &View {
        self.keep(acked, |sc, baseline, view| {
            encode_by_id(sc, header, origin, wanted, priority, baseline, budget, out, view)
        })
    }

    /// After [`Sender::encode`]: per entity of `wanted`, whether the client
    /// holds its current state once it decodes the snapshot.
    pub fn fresh(&self) -> &[bool] {
        self.scratch.fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glam::Quat;
    use proptest::prelude::*;

    fn entity() -> impl Strategy<Value = EntityState> {
        (
            0u64..40,
            proptest::array::uniform3(-5000.0f64..5000.0),
            proptest::array::uniform4(-1.0f32..1.0),
            proptest::array::uniform3(-50.0f32..50.0),
            1u32..4,
        )
            .prop_map(|(id, p, r, v, a)| EntityState {
                id: EntityId((id << 36) | id),
                pos: DVec3::from_array(p),
                rot: r,
                vel: v,
                authority: ServerId(a),
            })
    }

    fn unique(v: Vec<EntityState>) -> Vec<EntityState> {
        let mut seen = std::collections::HashSet::new();
        v.into_iter().filter(|e| seen.insert(e.id)).collect()
    }

    fn same_rotation(a: [f32; 4], b: [f32; 4]) -> bool {
        let (a, b) = (Quat::from_array(a), Quat::from_array(b));
        let a = if a.length_squared() > 1e-12 { a.normalize() } else { Quat::IDENTITY };
        a.dot(b).abs() > 1.0 - 1e-6
    }

    fn close(x: &EntityState, y: &EntityState) -> bool {
        x.id == y.id
            && (x.pos - y.pos).abs().max_element() <= POS_QUANTUM_M / 2.0 + 1e-9
            && same_rotation(x.rot, y.rot)
            && x.vel.iter().zip(y.vel).all(|(a, b)| (a - b).abs() <= VEL_QUANTUM / 2.0 + 1e-4)
            && x.authority == y.authority
    }

    const HEADER: Header = Header { tick: 100, server: ServerId(1), authoritative: true, last_input_seq: 7 };

    proptest! {
        #[test]
        fn decode_of_encode_is_within_quantisation_for_any_baseline(
            now in proptest::collection::vec(entity(), 0..30),
            before in proptest::collection::vec(entity(), 0..30),
            origin in proptest::array::uniform3(-3000.0f64..3000.0),
            with_baseline in any::<bool>(),
        ) {
            let now = unique(now);
            let base = View {
                tick: 90,
                entities: {
                    let mut q: Vec<QEntity> = unique(before).iter().map(QEntity::quantise).collect();
                    q.sort_by_key(|e| e.id);
                    q
                },
            };
            let baseline = with_baseline.then_some(&base);
            let wanted: Vec<QEntity> = now.iter().map(QEntity::quantise).collect();
            let mut out = Vec::new();
            let sent = encode(&HEADER, DVec3::from_array(origin), &wanted, baseline, usize::MAX, &mut out);
            let (h, got) = decode(&out, |t| baseline.filter(|b| b.tick == t)).unwrap();
            prop_assert_eq!(h, HEADER);
            // What the server records is exactly what the client holds.
            prop_assert_eq!(&got, &sent);
            // With room for all, the client has every wanted entity and nothing else.
            if out.len() < MAX_DATAGRAM {
                prop_assert_eq!(got.entities.len(), now.len());
                for e in &now {
                    let d = got.entities.iter().find(|g| g.id == e.id).expect("present").state();
                    prop_assert!(close(e, &d), "{:?} vs {:?}", e, d);
                }
            }
        }

        #[test]
        fn reused_buffers_change_nothing_and_fresh_says_what_the_client_holds(
            rounds in proptest::collection::vec(
                (proptest::collection::vec(entity(), 0..40), 60usize..1200, any::<bool>()),
                1..6,
            ),
        ) {
            // One scratch and one view reused across snapshots give what
            // fresh buffers give, and `fresh` marks exactly the wanted
            // entities the client's view holds as they are now.
            let mut sc = Scratch::default();
            let mut reused = View::default();
            let mut base: Option<View> = None;
            for (tick, (now, budget, keep_base)) in rounds.into_iter().enumerate() {
                let wanted: Vec<QEntity> = unique(now).iter().map(QEntity::quantise).collect();
                let header = Header { tick: 100 + tick as u64, ..HEADER };
                let baseline = base.as_ref().filter(|_| keep_base);
                let mut a = Vec::new();
                let fresh_view = encode(&header, DVec3::ZERO, &wanted, baseline, budget, &mut a);
                let mut b = Vec::new();
                encode_with(&mut sc, &header, DVec3::ZERO, &wanted, baseline, budget, &mut b, &mut reused);
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(&fresh_view, &reused);
                prop_assert_eq!(sc.fresh().len(), wanted.len());
                for (e, f) in wanted.iter().zip(sc.fresh()) {
                    let held = reused.entities.iter().any(|v| v == e);
                    prop_assert_eq!(*f, held, "{:?}", e.id);
                }
                base = Some(fresh_view);
            }
        }

        #[test]
        fn a_budget_is_never_exceeded_and_both_sides_still_agree(
            now in proptest::collection::vec(entity(), 0..40),
            before in proptest::collection::vec(entity(), 0..40),
            budget in 40usize..600,
            with_baseline in any::<bool>(),
        ) {
            let wanted: Vec<QEntity> = unique(now).iter().map(QEntity::quantise).collect();
            let mut base: Vec<QEntity> = unique(before).iter().map(QEntity::quantise).collect();
            base.sort_by_key(|e| e.id);
            let base = View { tick: 99, entities: base };
            let baseline = with_baseline.then_some(&base);
            let mut out = Vec::new();
            let sent = encode(&HEADER, DVec3::ZERO, &wanted, baseline, budget, &mut out);
            prop_assert!(out.len() <= budget, "{} > {budget}", out.len());
            let (_, got) = decode(&out, |t| baseline.filter(|b| b.tick == t)).unwrap();
            prop_assert_eq!(got, sent);
        }

        #[test]
        fn entities_in_id_order_go_by_their_priority_and_both_sides_agree(
            now in proptest::collection::vec((entity(), 0.0f32..100.0), 0..60),
            before in proptest::collection::vec(entity(), 0..60),
            budget in 30usize..900,
            with_baseline in any::<bool>(),
        ) {
            let mut now: Vec<(QEntity, f32)> = now.iter().map(|(e, p)| (QEntity::quantise(e), *p)).collect();
            now.sort_by_key(|(e, _)| e.id);
            now.dedup_by_key(|(e, _)| e.id);
            let wanted: Vec<QEntity> = now.iter().map(|n| n.0).collect();
            let priority: Vec<f32> = now.iter().map(|n| n.1).collect();
            let mut base: Vec<QEntity> = unique(before).iter().map(QEntity::quantise).collect();
            base.sort_by_key(|e| e.id);
            let base = View { tick: 99, entities: base };
            let baseline = with_baseline.then_some(&base);
            let mut sc = Scratch::default();
            let (mut out, mut sent) = (Vec::new(), View::default());
            encode_by_id(&mut sc, &HEADER, DVec3::ZERO, &wanted, &priority, baseline, budget, &mut out, &mut sent);
            prop_assert!(out.len() <= budget.max(24), "{} > {budget}", out.len());
            let (_, got) = decode(&out, |t| baseline.filter(|b| b.tick == t)).unwrap();
            prop_assert_eq!(&got, &sent);
            prop_assert_eq!(sc.fresh().len(), wanted.len());
            let base_of = |e: &QEntity| baseline.and_then(|b| b.entities.iter().find(|x| x.id == e.id));
            for (e, f) in wanted.iter().zip(sc.fresh()) {
                prop_assert_eq!(*f, got.entities.contains(e), "{:?}", e.id);
            }
            // Greedy in priority order: a changed entity left out while a
            // lower one went costs more than that one did.
            let cost = |k: usize| record_len(&wanted[k], base_of(&wanted[k]), origin_mm(DVec3::ZERO), 0);
            let changed = |k: usize| base_of(&wanted[k]) != Some(&wanted[k]);
            for u in (0..wanted.len()).filter(|&u| changed(u) && !sc.fresh()[u]) {
                for p in (0..wanted.len()).filter(|&p| changed(p) && sc.fresh()[p]) {
                    if priority[u] > priority[p] {
                        prop_assert!(cost(u) > cost(p), "{u} (p {}) left out, {p} (p {}) sent", priority[u], priority[p]);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let base = View { tick: 5, entities: vec![] };
            let _ = decode(&bytes, |_| Some(&base));
            let _ = decode(&bytes, |_| None);
        }
    }

    #[test]
    fn unchanged_entities_cost_nothing_and_priority_decides_what_fits() {
        let e = |n: u64, x: f64| EntityState {
            id: EntityId(n),
            pos: DVec3::new(x, 10.0, 0.0),
            rot: [0.0, 0.0, 0.0, 1.0],
            vel: [0.0; 3],
            authority: ServerId(1),
        };
        let all: Vec<QEntity> = (1..=50).map(|n| QEntity::quantise(&e(n, n as f64))).collect();
        let mut sender = Sender::default();
        let mut client = Receiver::default();
        let mut out = Vec::new();
        let h = |tick| Header { tick, ..HEADER };
        sender.encode(&h(1), DVec3::ZERO, &all, 0, usize::MAX, &mut out);
        let full = out.len();
        client.receive(&out).unwrap();
        // Nothing moved: a delta against the acknowledged tick is a header.
        out.clear();
        sender.encode(&h(2), DVec3::ZERO, &all, client.ack(), usize::MAX, &mut out);
        assert!(out.len() < 16, "{} bytes for no change (full: {full})", out.len());
        let s = client.receive(&out).unwrap();
        assert_eq!(s.entities.len(), 50);
        // Everything moves, the budget holds about half: the first in
        // priority order are sent, the rest keep their old state.
        let moved: Vec<QEntity> = (1..=50).map(|n| QEntity::quantise(&e(n, n as f64 + 0.5))).collect();
        let mut by_priority = moved.clone();
        by_priority.reverse();
        out.clear();
        sender.encode(&h(3), DVec3::ZERO, &by_priority, client.ack(), 200, &mut out);
        assert!(out.len() <= 200);
        let s = client.receive(&out).unwrap();
        let updated: Vec<u64> = s.entities.iter().filter(|x| x.pos.x.fract() != 0.0).map(|x| x.id.0).collect();
        assert!(updated.len() > 5 && updated.len() < 50, "{updated:?}");
        assert!(updated.iter().all(|id| *id > 50 - updated.len() as u64), "highest priority first: {updated:?}");
        // A delta against a tick the client does not hold is refused, counted by reason.
        out.clear();
        let mut other = Sender::default();
        other.encode(&h(4), DVec3::ZERO, &all, 0, usize::MAX, &mut out);
        let mut fresh = Receiver::default();
        out.clear();
        sender.encode(&h(5), DVec3::ZERO, &all, 3, usize::MAX, &mut out);
        assert_eq!(fresh.receive(&out).unwrap_err().reason(), "unknown_baseline");
    }
}
