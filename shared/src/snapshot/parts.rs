//! Components in snapshots.
//!
//! An entity's record carries, after its transform fields and when its
//! field mask has `HAS_COMPONENTS`, a component block:
//!
//! - a varint count, then per component in ascending id: the id (a varint
//!   difference from the previous one), a varint length and its whole
//!   encoding (a component is sent whole when its value changed, never as
//!   a delta of a delta: what changed since the state the client holds is
//!   sent, the rest is not);
//! - a varint `members`: 0, or one more than the count of ids that follow
//!   (differences, ascending): the components the client may see on the
//!   entity are now exactly these (sent when one was removed since the
//!   state the client holds).
//!
//! An entity new to the client's view is sent with every component the
//! client may see. A client sees the components whose audience is
//! everyone, and on its own entity those for the owner too; server-only
//! components never leave the server.
//!
//! The server keeps, per entity, each component's whole encoding and the
//! tick it last saw it change ([`WireComponents`]); the client applies what it
//! decodes ([`ComponentChanges`]) to its [`ComponentStore`], every
//! component checked against its registry first: all or nothing.

use std::ops::Range;

use super::{Reader, View, varint, varint_len};
use crate::component::{
    Audience, ComponentError, ComponentId, ComponentSet, MAX_COMPONENT_SIZE, MAX_COMPONENTS, Registry,
};
use crate::ids::EntityId;
use crate::time::Tick;
use crate::wire::DecodeError;

/// Whether tick `a` (low 32 bits, wrapping) comes after tick `b`.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    id: ComponentId,
    owner_only: bool,
    changed: u32,
    start: u32,
    len: u32,
}

/// What a component block of one entity costs for a client other than its
/// owner, summed up when its components change (one cache line, read while
/// costing many candidates without touching their components): whole,
/// nothing since the newest change, or only what changed at the newest
/// change, that block itself inline when it is small (a rig's is). Anything
/// else is measured on the components themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct BlockCost {
    whole: u16,
    /// The block for a client holding a state from before `newest`, but
    /// not before `second`.
    newest_len: u16,
    newest: u32,
    /// The change before the newest (of a part everyone sees, or a
    /// removal); `newest` when there is none.
    second: u32,
    /// The block of a client holding a state from between the two newest
    /// changes, when it fits here (`inline_len` bytes; 0: it does not).
    inline_len: u8,
    inline: [u8; INLINE_BLOCK],
}
const INLINE_BLOCK: usize = 51;
const _: () = assert!(std::mem::size_of::<BlockCost>() == 64);

impl Default for BlockCost {
    fn default() -> Self {
        Self { whole: 0, newest_len: 0, newest: 0, second: 0, inline_len: 0, inline: [0; INLINE_BLOCK] }
    }
}

impl BlockCost {
    /// The block for a client (not the owner) holding the state of tick
    /// `since`, when it is the newest change's and kept inline.
    pub fn inline_block(&self, since: Option<u32>) -> Option<&[u8]> {
        let s = since?;
        let newest_only = after(self.newest, s) && (self.second == self.newest || !after(self.second, s));
        (newest_only && self.inline_len > 0).then(|| &self.inline[..usize::from(self.inline_len)])
    }

    /// The block's length for a client (not the owner) holding the state
    /// of tick `since` (`None`: none), if the summary tells.
    pub fn len(&self, since: Option<u32>) -> Option<usize> {
        let Some(s) = since else { return Some(usize::from(self.whole)) };
        if !after(self.newest, s) {
            Some(0)
        } else if self.second == self.newest || !after(self.second, s) {
            Some(usize::from(self.newest_len))
        } else {
            None
        }
    }
}

/// One entity's components as its server sends them: those a client may
/// see, each whole with the tick it last changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireComponents {
    parts: Vec<Part>,
    bytes: Vec<u8>,
    removed_at: u32,
    /// Newest change of a component everyone sees, or of the members.
    everyone_at: u32,
    /// Newest change of any component a client sees.
    owner_at: u32,
    /// The allocations of the parts before the last refill.
    spare_parts: Vec<Part>,
    spare_bytes: Vec<u8>,
    cost: BlockCost,
    /// The block for a client (not the owner) holding no state of it, and
    /// for one holding a state from between the two newest changes.
    whole_block: Vec<u8>,
    newest_block: Vec<u8>,
}

impl WireComponents {
    /// Refills from an entity's components at tick `now` (allocations
    /// reused): those the registry lets a client see. Each component whose
    /// bytes differ from what this held (all of them when `fresh`: another
    /// entity's, or none) counts as changed now, as does the loss of one.
    pub fn refill(&mut self, set: &ComponentSet, registry: &Registry, now: u32, fresh: bool) {
        let mut parts = std::mem::take(&mut self.spare_parts);
        let mut bytes = std::mem::take(&mut self.spare_bytes);
        parts.clear();
        bytes.clear();
        if fresh {
            self.parts.clear();
            (self.removed_at, self.everyone_at, self.owner_at) = (now, now, now);
        }
        let (mut removed, mut everyone, mut owner) = (false, false, false);
        let mut old = self.parts.iter().peekable();
        for (id, value) in set.iter() {
            let owner_only = match registry.policy(id).map(|p| p.audience) {
                Some(Audience::Everyone) => false,
                Some(Audience::Owner) => true,
                Some(Audience::Servers) | None => continue,
            };
            while old.next_if(|p| p.id < id).is_some() {
                removed = true;
            }
            let same = old
                .next_if(|p| p.id == id)
                .filter(|p| &self.bytes[p.start as usize..(p.start + p.len) as usize] == value);
            let changed = same.map_or(now, |p| p.changed);
            let start = bytes.len() as u32;
            bytes.extend_from_slice(value);
            parts.push(Part { id, owner_only, changed, start, len: value.len() as u32 });
            if same.is_none() {
                owner = true;
                everyone |= !owner_only;
            }
        }
        removed |= old.next().is_some();
        if removed {
            (self.removed_at, everyone, owner) = (now, true, true);
        }
        if everyone {
            self.everyone_at = now;
        }
        if owner {
            self.owner_at = now;
        }
        self.spare_parts = std::mem::replace(&mut self.parts, parts);
        self.spare_bytes = std::mem::replace(&mut self.bytes, bytes);
        self.cost = self.summary();
        self.encode_common();
    }

    /// The block's costs for a client other than the owner.
    pub fn cost(&self) -> &BlockCost {
        &self.cost
    }

    fn summary(&self) -> BlockCost {
        let newest = self.everyone_at;
        let second = self
            .parts
            .iter()
            .filter(|p| !p.owner_only && p.changed != newest)
            .map(|p| p.changed)
            .chain((self.removed_at != newest).then_some(self.removed_at))
            .reduce(|a, b| if after(a, b) { a } else { b })
            .unwrap_or(newest);
        let len = |since| u16::try_from(self.block_len(since, false)).unwrap_or(u16::MAX);
        BlockCost {
            whole: len(None),
            newest_len: len(Some(newest.wrapping_sub(1))),
            newest,
            second,
            ..BlockCost::default()
        }
    }

    /// The blocks [`BlockCost`] sums up, encoded.
    fn encode_common(&mut self) {
        let (mut whole, mut newest) = (std::mem::take(&mut self.whole_block), std::mem::take(&mut self.newest_block));
        whole.clear();
        newest.clear();
        if self.cost.whole > 0 {
            self.encode_block(None, false, &mut whole);
        }
        if self.cost.newest_len > 0 {
            self.encode_block(Some(self.everyone_at.wrapping_sub(1)), false, &mut newest);
        }
        if !newest.is_empty() && newest.len() <= INLINE_BLOCK {
            self.cost.inline[..newest.len()].copy_from_slice(&newest);
            self.cost.inline_len = newest.len() as u8;
        } else {
            self.cost.inline_len = 0;
        }
        (self.whole_block, self.newest_block) = (whole, newest);
    }

    /// Whether it holds nothing (cleared, or never filled).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.cost == BlockCost::default()
    }

    /// No components (allocations kept).
    pub fn clear(&mut self) {
        self.parts.clear();
        self.bytes.clear();
        (self.removed_at, self.everyone_at, self.owner_at) = (0, 0, 0);
        self.cost = BlockCost::default();
        self.whole_block.clear();
        self.newest_block.clear();
    }

    /// The tick (low 32 bits) what every client sees of it last changed.
    pub fn everyone_at(&self) -> u32 {
        self.everyone_at
    }

    /// Whether what `owner` (the entity's own client) or another client
    /// sees changed after tick `stamp`.
    pub fn changed_after(&self, stamp: u32, owner: bool) -> bool {
        after(if owner { self.owner_at } else { self.everyone_at }, stamp)
    }

    fn sent(&self, since: Option<u32>, owner: bool) -> impl Iterator<Item = &Part> + '_ {
        self.parts.iter().filter(move |p| (owner || !p.owner_only) && since.is_none_or(|s| after(p.changed, s)))
    }

    fn members(&self, since: Option<u32>) -> bool {
        since.is_some_and(|s| after(self.removed_at, s))
    }

    /// The bytes of the block a record of this entity carries for a client
    /// that holds its state as of tick `since` (`None`: it holds none),
    /// 0 when there is nothing to send.
    pub(crate) fn block_len(&self, since: Option<u32>, owner: bool) -> usize {
        let (mut n, mut len, mut prev) = (0u64, 0, 0);
        for p in self.sent(since, owner) {
            n += 1;
            len += varint_len(u64::from(p.id - prev)) + varint_len(u64::from(p.len)) + p.len as usize;
            prev = p.id;
        }
        let members = self.members(since);
        if n == 0 && !members {
            return 0;
        }
        len += varint_len(n);
        if members {
            let (mut k, mut prev) = (0u64, 0);
            for p in self.parts.iter().filter(|p| owner || !p.owner_only) {
                k += 1;
                len += varint_len(u64::from(p.id - prev));
                prev = p.id;
            }
            len += varint_len(k + 1);
        } else {
            len += 1;
        }
        len
    }

    /// Writes the block [`WireComponents::block_len`] measured.
    pub(crate) fn write_block(&self, since: Option<u32>, owner: bool, out: &mut Vec<u8>) {
        // The two blocks most clients get, written once per change.
        match (owner, self.cost.len(since), since) {
            (false, Some(_), None) => out.extend_from_slice(&self.whole_block),
            (false, Some(_), Some(_)) => out.extend_from_slice(&self.newest_block),
            _ => self.encode_block(since, owner, out),
        }
    }

    fn encode_block(&self, since: Option<u32>, owner: bool, out: &mut Vec<u8>) {
        varint(out, self.sent(since, owner).count() as u64);
        let mut prev = 0;
        for p in self.sent(since, owner) {
            varint(out, u64::from(p.id - prev));
            varint(out, u64::from(p.len));
            out.extend_from_slice(&self.bytes[p.start as usize..(p.start + p.len) as usize]);
            prev = p.id;
        }
        if self.members(since) {
            let visible = || self.parts.iter().filter(|p| owner || !p.owner_only);
            varint(out, visible().count() as u64 + 1);
            let mut prev = 0;
            for p in visible() {
                varint(out, u64::from(p.id - prev));
                prev = p.id;
            }
        } else {
            varint(out, 0);
        }
    }
}

/// One record's components, as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    entity: EntityId,
    /// New to the view: its components are exactly those sent.
    whole: bool,
    parts: Range<u32>,
    members: Option<Range<u32>>,
}

/// The components one snapshot changed, as decoded (not yet checked
/// against a registry: [`ComponentStore::apply`] does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentChanges {
    records: Vec<Change>,
    /// (id, range in `data`).
    parts: Vec<(ComponentId, Range<u32>)>,
    members: Vec<ComponentId>,
    data: Vec<u8>,
}

impl ComponentChanges {
    pub(crate) fn clear(&mut self) {
        self.records.clear();
        self.parts.clear();
        self.members.clear();
        self.data.clear();
    }

    /// A record of `entity` (`whole`: new to the view) and, when `block`,
    /// its component block read from `r`.
    pub(super) fn record(
        &mut self,
        r: &mut Reader<'_>,
        entity: EntityId,
        whole: bool,
        block: bool,
    ) -> Result<(), DecodeError> {
        let start = self.parts.len() as u32;
        let mut members = None;
        if block {
            let n = r.varint()?;
            if n > MAX_COMPONENTS as u64 {
                return Err(DecodeError::Component(ComponentError::TooMany));
            }
            let mut id = 0u64;
            for k in 0..n {
                let step = r.varint()?;
                if k > 0 && step == 0 {
                    return Err(DecodeError::Component(ComponentError::Unordered(id as ComponentId)));
                }
                id =
                    id.checked_add(step).filter(|i| *i <= u64::from(ComponentId::MAX)).ok_or(DecodeError::BadVarint)?;
                let len = r.varint()?;
                if len > MAX_COMPONENT_SIZE as u64 {
                    return Err(DecodeError::Component(ComponentError::TooLarge {
                        id: id as ComponentId,
                        len: len as usize,
                        max: MAX_COMPONENT_SIZE,
                    }));
                }
                let bytes = r.bytes(len as usize)?;
                let at = self.data.len() as u32;
                self.data.extend_from_slice(bytes);
                self.parts.push((id as ComponentId, at..self.data.len() as u32));
            }
            let k = r.varint()?;
            if k > MAX_COMPONENTS as u64 + 1 {
                return Err(DecodeError::Component(ComponentError::TooMany));
            }
            if k > 0 {
                let from = self.members.len() as u32;
                let mut id = 0u64;
                for j in 0..k - 1 {
                    let step = r.varint()?;
                    if j > 0 && step == 0 {
                        return Err(DecodeError::Component(ComponentError::Unordered(id as ComponentId)));
                    }
                    id = id
                        .checked_add(step)
                        .filter(|i| *i <= u64::from(ComponentId::MAX))
                        .ok_or(DecodeError::BadVarint)?;
                    self.members.push(id as ComponentId);
                }
                members = Some(from..self.members.len() as u32);
            }
        }
        if block || whole {
            self.records.push(Change { entity, whole, parts: start..self.parts.len() as u32, members });
        }
        Ok(())
    }

    /// Component sets this snapshot sent, in all.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Each component sent: the entity, the component and its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (EntityId, ComponentId, &[u8])> + '_ {
        self.records.iter().flat_map(move |c| {
            self.parts[c.parts.start as usize..c.parts.end as usize]
                .iter()
                .map(move |(id, r)| (c.entity, *id, &self.data[r.start as usize..r.end as usize]))
        })
    }
}

/// What a client holds of the components of the entities one server
/// sends it: updated by each snapshot newer than the last.
///
/// An entity that leaves the view keeps its components here while a view
/// the client still holds as a baseline has it: a later snapshot against
/// that baseline may bring it back without resending what did not change.
#[derive(Debug, Clone, Default)]
pub struct ComponentStore {
    /// In id order: each entity's components and the newest view's tick
    /// that had it. A snapshot's records and views come in id order too, so
    /// applying one is a single merge, with no lookup per entity.
    sets: Vec<(EntityId, ComponentSet, Tick)>,
    /// The allocation of the sets before the last apply.
    spare: Vec<(EntityId, ComponentSet, Tick)>,
}

impl ComponentStore {
    /// The components of entity `id`, as the newest snapshot left them.
    pub fn get(&self, id: EntityId) -> Option<&ComponentSet> {
        self.sets.binary_search_by_key(&id, |s| s.0).ok().map(|i| &self.sets[i].1)
    }

    /// Entities whose components are kept.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Applies a decoded snapshot's changes, `view` being the view it
    /// decoded to and `oldest` the tick of the oldest view still kept as a
    /// baseline. Every component is checked against `registry` first: one
    /// refused, and nothing is applied. Entities in no view from `oldest`
    /// on are forgotten.
    pub fn apply(
        &mut self,
        ch: &ComponentChanges,
        view: &View,
        oldest: Tick,
        registry: &Registry,
    ) -> Result<(), ComponentError> {
        for (_, id, bytes) in ch.iter() {
            match registry.policy(id).map(|p| p.audience) {
                None => return Err(ComponentError::Unknown(id)),
                Some(Audience::Servers) => return Err(ComponentError::OutOfRange("a server-only component")),
                Some(_) => registry.validate(id, bytes)?,
            }
        }
        // The decoder makes both in id order, each id once.
        debug_assert!(ch.records.windows(2).all(|w| w[0].entity < w[1].entity));
        debug_assert!(view.entities.windows(2).all(|w| w[0].id < w[1].id));
        let mut out = std::mem::take(&mut self.spare);
        out.clear();
        let mut old = self.sets.drain(..).peekable();
        let mut records = ch.records.iter().peekable();
        let mut in_view = view.entities.iter().map(|e| e.id).peekable();
        loop {
            let id = match (old.peek(), records.peek()) {
                (None, None) => break,
                (Some(o), None) => o.0,
                (None, Some(c)) => c.entity,
                (Some(o), Some(c)) => o.0.min(c.entity),
            };
            let mut entry = match old.next_if(|o| o.0 == id) {
                Some(e) => e,
                None => (id, ComponentSet::new(), view.tick),
            };
            if let Some(c) = records.next_if(|c| c.entity == id) {
                let set = &mut entry.1;
                if c.whole {
                    *set = ComponentSet::new();
                }
                for (cid, r) in &ch.parts[c.parts.start as usize..c.parts.end as usize] {
                    set.put_bytes(*cid, &ch.data[r.start as usize..r.end as usize]);
                }
                if let Some(m) = &c.members {
                    let keep = &ch.members[m.start as usize..m.end as usize];
                    set.retain(|cid| keep.binary_search(&cid).is_ok());
                }
            }
            while in_view.next_if(|v| *v < id).is_some() {}
            if in_view.next_if_eq(&id).is_some() {
                entry.2 = view.tick;
            }
            if entry.2 >= oldest {
                out.push(entry);
            }
        }
        drop(old);
        self.spare = std::mem::replace(&mut self.sets, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::Component as _;
    use crate::component::builtin::{Kind, PlayerName};
    use crate::component::encode_whole;
    use crate::ids::ServerId;
    use crate::snapshot::QEntity;

    fn view(tick: Tick, ids: &[u64]) -> View {
        let e = |id: u64| QEntity { id: EntityId(id), pos: [0; 3], rot: 0, vel: [0; 3], authority: ServerId(1) };
        View { tick, entities: ids.iter().map(|&id| e(id)).collect() }
    }

    /// Changes giving each of `named` (whole: new to the view) a name.
    fn named(names: &[(u64, &str)]) -> ComponentChanges {
        let mut ch = ComponentChanges::default();
        for &(id, name) in names {
            let at = ch.data.len() as u32;
            ch.data.extend_from_slice(&encode_whole(&PlayerName(name.into())));
            let start = ch.parts.len() as u32;
            ch.parts.push((PlayerName::ID, at..ch.data.len() as u32));
            ch.records.push(Change { entity: EntityId(id), whole: true, parts: start..start + 1, members: None });
        }
        ch
    }

    #[test]
    fn the_store_keeps_an_entity_while_a_held_view_has_it_and_forgets_it_after() {
        let registry = Registry::builtin();
        let mut store = ComponentStore::default();
        let name =
            |s: &ComponentStore, id: u64| s.get(EntityId(id)).and_then(|c| c.bytes(PlayerName::ID)).map(<[u8]>::to_vec);
        store.apply(&named(&[(1, "a"), (2, "b"), (3, "c")]), &view(2, &[1, 2, 3]), 1, &registry).unwrap();
        assert_eq!(store.len(), 3);
        // 2 leaves the view; the client still holds view 2 as a baseline.
        store.apply(&ComponentChanges::default(), &view(3, &[1, 3]), 2, &registry).unwrap();
        assert_eq!(name(&store, 2), Some(encode_whole(&PlayerName("b".into()))), "kept for a delta against view 2");
        // 4 arrives; the others are unchanged.
        store.apply(&named(&[(4, "d")]), &view(4, &[1, 3, 4]), 2, &registry).unwrap();
        assert_eq!(store.len(), 4);
        // View 2 is no longer held: 2 is forgotten, the rest kept.
        store.apply(&ComponentChanges::default(), &view(5, &[1, 3, 4]), 3, &registry).unwrap();
        assert_eq!(name(&store, 2), None);
        for (id, n) in [(1, "a"), (3, "c"), (4, "d")] {
            assert_eq!(name(&store, id), Some(encode_whole(&PlayerName(n.into()))), "{id}");
        }
        // A refused component applies nothing.
        let mut bad = named(&[(5, "e")]);
        bad.parts[0].0 = Kind::ID;
        bad.data = vec![0xff; 3];
        assert!(store.apply(&bad, &view(6, &[1, 3, 4, 5]), 3, &registry).is_err());
        assert_eq!(store.len(), 3);
    }
}
