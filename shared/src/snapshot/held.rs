//! The server's end of the snapshot codec, at a thousand clients a
//! process: what a client holds is remembered as *which* state of an
//! entity it holds (its slot and the tick of that state, 16 bytes), not
//! the state itself (56). The states live once per server, in a ring of
//! recent ticks behind [`Values`]; an entity unchanged since the client
//! got it is told by comparing two ticks, not two states; only what is
//! sent is read in full. The bytes are [`super::encode_by_id`]'s: the one
//! decoder reads both.
//!
//! A state the ring no longer holds cannot be a delta's base: such an
//! entity is listed as removed and sent whole in the same snapshot (the
//! decoder applies removals first), which costs its id once more.

use std::collections::VecDeque;

use glam::DVec3;

use super::{
    BlockCost, HAS_COMPONENTS, HISTORY, Header, MAX_VIEW_ENTITIES, QEntity, WireComponents, match_baseline, origin_mm,
    priority_key, record, record_len, varint, varint_len, write_head,
};
use crate::ids::EntityId;
use crate::time::Tick;
use crate::wire::MAX_DATAGRAM;

/// Which state of an entity a client holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub id: EntityId,
    /// The entity's slot in the server's [`Values`] when it was sent.
    pub slot: u32,
    /// The tick (its low 32 bits) whose state the client holds.
    pub stamp: u32,
}

/// An entity a snapshot considers, with its weight (higher first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Want {
    pub id: EntityId,
    /// Its slot in the server's [`Values`] this tick.
    pub slot: u32,
    pub priority: f32,
}

/// The entity states a server's snapshots are made of: each entity in a
/// slot it keeps while it is here, and the states of recent ticks.
pub trait Values {
    /// The tick being sent (its low 32 bits).
    fn now(&self) -> u32;
    /// The state of the entity in `slot`, now.
    fn current(&self, slot: u32) -> &QEntity;
    /// The tick (low 32 bits) the state in `slot`, or a component of it
    /// that every client sees, last changed, or its entity came to the
    /// slot: the state now is the state of every tick since.
    fn changed(&self, slot: u32) -> u32;
    /// The components of the entity in `slot`, now, as clients may see
    /// them.
    fn components(&self, slot: u32) -> &WireComponents;
    /// What the component block of the entity in `slot` costs a client
    /// other than its owner (its [`WireComponents::cost`]; a server may
    /// keep these apart, densely, as they are read for many candidates).
    fn block_cost(&self, slot: u32) -> &BlockCost {
        self.components(slot).cost()
    }
    /// The state `id` had in `slot` at tick `stamp`, while it is remembered.
    fn at(&self, slot: u32, stamp: u32, id: EntityId) -> Option<&QEntity>;
}

/// Changed entities in a row that do not fit after which a snapshot is
/// closed: each costs a look at the state its client holds.
const MAX_MISFITS: usize = 8;
/// The fewest bytes of a record: its id's difference, the field mask and
/// one field.
const MIN_RECORD: usize = 3;

/// Whether tick `a` comes after tick `b` (low 32 bits, wrapping).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[derive(Debug, Clone, Default)]
struct HeldView {
    tick: Tick,
    /// In id order.
    held: Vec<Held>,
}

/// How a wanted entity goes in this snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    No,
    /// A delta against the state the client holds, or whole if it holds none.
    Sent,
    /// Whole, after its removal: the state the client holds is forgotten.
    Resent,
}

/// A server's sending end for one client: encodes against the newest
/// snapshot the client acknowledged, keeping what each snapshot left the
/// client holding (at most [`HISTORY`] of them).
#[derive(Debug, Clone, Default)]
pub struct Baselines {
    history: VecDeque<HeldView>,
    /// The allocation of the last view dropped from the history.
    spare: Vec<Held>,
    /// Per wanted entity: its index in the baseline.
    at: Vec<Option<u32>>,
    removed: Vec<EntityId>,
    resent: Vec<EntityId>,
    /// Changed entities by priority: `!priority` bits above, index in `wanted` below.
    keys: Vec<u64>,
    picked: Vec<Pick>,
    fresh: Vec<bool>,
    head: Vec<u8>,
    counts: RecordCounts,
}

/// What the snapshots a [`Baselines`] encoded were made of, summed since
/// it was made (a server adds them to its metrics): an entity the view
/// churns is sent whole again and again, a lagging ack resends states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordCounts {
    /// Entities new to the client's view, sent whole.
    pub new: u64,
    /// Deltas against the state the client holds.
    pub delta: u64,
    /// Entities sent whole again because the ring forgot the state the
    /// client holds.
    pub resent: u64,
    /// Entities removed from the client's view.
    pub removed: u64,
    /// Bytes of component blocks.
    pub component_bytes: u64,
    /// Snapshots sent with no baseline (the client acknowledged none that
    /// is remembered): every entity in them is new.
    pub unbased: u64,
}

impl RecordCounts {
    /// What was counted since `before` (an earlier reading of the same
    /// counts).
    pub fn since(&self, before: &Self) -> Self {
        Self {
            new: self.new - before.new,
            delta: self.delta - before.delta,
            resent: self.resent - before.resent,
            removed: self.removed - before.removed,
            component_bytes: self.component_bytes - before.component_bytes,
            unbased: self.unbased - before.unbased,
        }
    }

    /// Adds `other` to these.
    pub fn add(&mut self, other: &Self) {
        self.new += other.new;
        self.delta += other.delta;
        self.resent += other.resent;
        self.removed += other.removed;
        self.component_bytes += other.component_bytes;
        self.unbased += other.unbased;
    }
}

impl Baselines {
    /// Encodes a snapshot into `out` (appended), as [`super::encode_by_id`]
    /// does: `wanted` in id order, each id once; changed entities in
    /// priority order while they fit `budget` (never more than
    /// [`MAX_DATAGRAM`]), until [`MAX_MISFITS`] in a row did not;
    /// baseline entities not wanted are removed.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &mut self,
        values: &impl Values,
        header: &Header,
        origin: DVec3,
        me: EntityId,
        wanted: &[Want],
        acked: Tick,
        budget: usize,
        out: &mut Vec<u8>,
    ) {
        debug_assert!(wanted.windows(2).all(|w| w[0].id < w[1].id), "wanted is sorted by id, each id once");
        let budget = budget.min(MAX_DATAGRAM);
        let start = out.len();
        let origin_q = origin_mm(origin);
        let now = values.now();
        let base = self.history.iter().rev().find(|v| v.tick == acked);
        write_head(header, origin_q, base.map(|b| b.tick), &mut self.head);
        self.counts.unbased += u64::from(base.is_none());
        let mut used = self.head.len() + 2 * 3; // two counts, up to 3 bytes each
        let kept = base.map_or(&[][..], |b| &b.held[..]);
        used = match_baseline(kept, |h| h.id, wanted, |w| w.id, budget, used, &mut self.at, &mut self.removed);
        // What changed since the state the client holds, by priority.
        self.fresh.clear();
        self.fresh.resize(wanted.len(), false);
        self.picked.clear();
        self.picked.resize(wanted.len(), Pick::No);
        self.keys.clear();
        for (k, w) in wanted.iter().enumerate() {
            let unchanged = self.at[k].is_some_and(|i| {
                let h = &kept[i as usize];
                h.slot == w.slot
                    && !after(values.changed(w.slot), h.stamp)
                    // The client's own entity: its owner-only components too.
                    && (w.id != me || !values.components(w.slot).changed_after(h.stamp, true))
            });
            if unchanged {
                self.fresh[k] = true;
            } else {
                self.keys.push(priority_key(w.priority, k));
            }
        }
        self.keys.sort_unstable();
        let mut room = MAX_VIEW_ENTITIES.saturating_sub(kept.len() - self.removed.len());
        let mut chosen = 0u64;
        self.resent.clear();
        let mut misfits = 0;
        for &key in &self.keys {
            // Costing reads the state the client holds, likely out of
            // cache: stop once nothing more is likely to fit.
            if misfits == MAX_MISFITS || budget.saturating_sub(used) < MIN_RECORD {
                break;
            }
            let k = key as u32 as usize;
            let at = self.at[k];
            if at.is_none() && room == 0 {
                continue;
            }
            let w = &wanted[k];
            let e = values.current(w.slot);
            let owner = w.id == me;
            let (cost, pick) = match at.map(|i| (held_state(values, &kept[i as usize]), kept[i as usize].stamp)) {
                None => (record_len(e, None, origin_q, 0) + block_len(values, w.slot, None, owner), Pick::Sent),
                Some((Some(b), stamp)) => {
                    (record_len(e, Some(b), origin_q, 0) + block_len(values, w.slot, Some(stamp), owner), Pick::Sent)
                }
                // Its removal costs at most its whole id more.
                Some((None, _)) => (
                    varint_len(e.id.0) + record_len(e, None, origin_q, 0) + block_len(values, w.slot, None, owner),
                    Pick::Resent,
                ),
            };
            if used + cost <= budget {
                used += cost;
                self.picked[k] = pick;
                self.fresh[k] = true;
                chosen += 1;
                if at.is_none() {
                    room -= 1;
                }
                if pick == Pick::Resent {
                    self.resent.push(e.id);
                }
                misfits = 0;
            } else {
                misfits += 1;
            }
        }
        // What the client holds after this snapshot, in id order: the
        // baseline less what was removed; what was sent or is unchanged at
        // this tick's state; what changed and did not fit, as it was.
        let mut view = HeldView { tick: header.tick, held: std::mem::take(&mut self.spare) };
        view.held.clear();
        let (mut i, mut r) = (0, 0);
        for (k, w) in wanted.iter().enumerate() {
            while i < kept.len() && kept[i].id < w.id {
                if self.removed.get(r) == Some(&kept[i].id) {
                    r += 1;
                } else {
                    view.held.push(kept[i]);
                }
                i += 1;
            }
            let held = (i < kept.len() && kept[i].id == w.id).then(|| {
                i += 1;
                kept[i - 1]
            });
            if self.fresh[k] {
                view.held.push(Held { id: w.id, slot: w.slot, stamp: now });
            } else if let Some(h) = held {
                view.held.push(h);
            }
        }
        for h in &kept[i..] {
            if self.removed.get(r) == Some(&h.id) {
                r += 1;
            } else {
                view.held.push(*h);
            }
        }
        out.extend_from_slice(&self.head);
        // The removed and the resent, merged in id order.
        self.resent.sort_unstable();
        varint(out, (self.removed.len() + self.resent.len()) as u64);
        let (mut prev, mut a, mut b) = (0, 0, 0);
        while a < self.removed.len() || b < self.resent.len() {
            let id = match (self.removed.get(a), self.resent.get(b)) {
                (Some(x), Some(y)) if x < y => {
                    a += 1;
                    *x
                }
                (Some(x), None) => {
                    a += 1;
                    *x
                }
                (_, Some(y)) => {
                    b += 1;
                    *y
                }
                (None, None) => unreachable!("the loop's condition"),
            };
            varint(out, id.0 - prev);
            prev = id.0;
        }
        self.counts.removed += self.removed.len() as u64;
        varint(out, chosen);
        let mut prev = 0;
        for (k, w) in wanted.iter().enumerate() {
            let (base, since) = match self.picked[k] {
                Pick::No => continue,
                Pick::Sent => match self.at[k].map(|i| &kept[i as usize]) {
                    Some(h) => (held_state(values, h), Some(h.stamp)),
                    None => (None, None),
                },
                Pick::Resent => (None, None),
            };
            let owner = w.id == me;
            match (self.picked[k], since) {
                (Pick::Resent, _) => self.counts.resent += 1,
                (_, None) => self.counts.new += 1,
                _ => self.counts.delta += 1,
            }
            let block_bytes = block_len(values, w.slot, since, owner);
            self.counts.component_bytes += block_bytes as u64;
            let block = block_bytes > 0;
            record(values.current(w.slot), base, origin_q, prev, if block { HAS_COMPONENTS } else { 0 }, out);
            if block {
                // Most clients get the newest change's block, inline in
                // the cost already read.
                match values.block_cost(w.slot).inline_block(since).filter(|_| !owner) {
                    Some(b) => out.extend_from_slice(b),
                    None => values.components(w.slot).write_block(since, owner, out),
                }
            }
            prev = w.id.0;
        }
        debug_assert!(out.len() - start <= budget.max(self.head.len() + 2), "{} > {budget}", out.len() - start);
        if self.history.len() == HISTORY
            && let Some(old) = self.history.pop_front()
        {
            self.spare = old.held;
        }
        self.history.push_back(view);
    }

    /// After [`Baselines::encode`]: per entity of `wanted`, whether the
    /// client holds its current state once it decodes the snapshot (sent
    /// now, or unchanged since the state it holds).
    pub fn fresh(&self) -> &[bool] {
        &self.fresh
    }

    /// What the snapshots encoded so far were made of.
    pub fn counts(&self) -> RecordCounts {
        self.counts
    }

    /// What the newest snapshot left the client holding, in id order.
    pub fn newest(&self) -> Option<(Tick, &[Held])> {
        self.history.back().map(|v| (v.tick, &v.held[..]))
    }
}

/// The length of the component block of the entity in `slot` for a client
/// holding its state of tick `since` (`owner`: the entity is the client's).
fn block_len(values: &impl Values, slot: u32, since: Option<u32>, owner: bool) -> usize {
    let measured = || values.components(slot).block_len(since, owner);
    if owner { measured() } else { values.block_cost(slot).len(since).unwrap_or_else(measured) }
}

fn held_state<'a>(values: &'a impl Values, h: &Held) -> Option<&'a QEntity> {
    values.at(h.slot, h.stamp, h.id)
}

#[cfg(test)]
mod tests;
