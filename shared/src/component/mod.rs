//! Replicated components: the state a game attaches to entities, which
//! moves with authority (handoff), is mirrored to neighbours (ghosts),
//! reaches clients (snapshots) and is kept (checkpoints), each as its
//! [`Policy`] says.
//!
//! A component is a type implementing [`Component`]: a stable numeric id
//! and name, a version, a largest encoded size, a policy, and a codec of
//! its value, whole or as a delta against a baseline value. The type *is*
//! the quantised form (millimetres, smallest-three rotations, small
//! integers): equal values are never sent twice, and what a client decodes
//! is exactly what the server holds. Decoding is bounded and never panics:
//! every malformed input is a [`ComponentError`] whose
//! [`reason`](ComponentError::reason) is a stable metric label.
//!
//! The [`Registry`] is the same code on server and client. Its [`Schema`]
//! (ids, names, versions) travels in the player's hello and between
//! servers: peers with different schemas refuse each other
//! (`schema_mismatch`) rather than decode wrong.
//!
//! [`ComponentSet`] is the one encoding of an entity's components at rest
//! and in a handoff or ghost batch: a varint count, then per component in
//! ascending id a varint id, a varint length and its whole encoding.
//!
//! The built-in components ([`builtin`]) re-express the state the mesh was
//! born with: transform, kind, the VR rig, the player's name, a prop's
//! rigid-body extras.

pub mod builtin;
mod tracked;

pub use tracked::Tracked;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A component's stable number: never reused for another component.
pub type ComponentId = u16;

/// Largest encoding any component may declare, bytes.
pub const MAX_COMPONENT_SIZE: usize = 1024;
/// Largest encoding a component clients see may declare: its record must
/// fit a snapshot's byte budget (about 660 bytes at 512 kbit/s) beside the
/// entity's other state, or the entity would never reach a client.
pub const MAX_VISIBLE_SIZE: usize = 512;
/// Most components one entity carries.
pub const MAX_COMPONENTS: usize = 64;
/// Most components a registry holds (a schema in a hello stays small).
pub const MAX_REGISTERED: usize = 256;
/// Longest component name, bytes (`a-z 0-9 _ .`).
pub const MAX_NAME: usize = 48;

/// Who sees a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Audience {
    /// Every client whose interest includes the entity.
    Everyone,
    /// Only the client playing the entity.
    Owner,
    /// No client: server-side state.
    Servers,
}

/// What happens to a component besides moving with its entity in a
/// handoff (which every component does: authority over an entity is
/// authority over all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub audience: Audience,
    /// Neighbours mirror it in their ghosts of the entity.
    pub ghosted: bool,
    /// Checkpoints keep it.
    pub persisted: bool,
}

/// Why a component, a set or a schema was refused. `reason()` names are
/// metric labels: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ComponentError {
    #[error("component {0} is not registered here")]
    Unknown(ComponentId),
    #[error("component {id} is {len} bytes, more than its {max}")]
    TooLarge { id: ComponentId, len: usize, max: usize },
    #[error("a value is out of its range: {0}")]
    OutOfRange(&'static str),
    #[error("a component's encoding ends early")]
    Truncated,
    #[error("a component's encoding has {0} bytes after its end")]
    TrailingBytes(usize),
    #[error("a variable-length integer is too long")]
    BadVarint,
    #[error("component {0} appears twice or out of order in a set")]
    Unordered(ComponentId),
    #[error("more than {MAX_COMPONENTS} components on one entity")]
    TooMany,
    #[error("a delta of component {0} came without its baseline")]
    NoBaseline(ComponentId),
}

impl ComponentError {
    /// A stable metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ComponentError::Unknown(_) => "unknown_component",
            ComponentError::TooLarge { .. } => "component_too_large",
            ComponentError::OutOfRange(_) => "component_out_of_range",
            ComponentError::Truncated => "truncated",
            ComponentError::TrailingBytes(_) => "trailing_bytes",
            ComponentError::BadVarint => "bad_varint",
            ComponentError::Unordered(_) => "components_unordered",
            ComponentError::TooMany => "too_many_components",
            ComponentError::NoBaseline(_) => "unknown_baseline",
        }
    }
}

/// A replicated component. Implement it on the quantised form of the state.
///
/// The codec must round-trip exactly: `decode(encode(v, base), base) == v`
/// for every value and baseline (the registry's property test checks the
/// built-ins; a game's components get [`check_round_trip`]), and every
/// encoding must fit `MAX_SIZE`.
pub trait Component: Clone + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// Stable, unique in the registry, never reused.
    const ID: ComponentId;
    /// Stable, unique, `a-z 0-9 _ .`, at most [`MAX_NAME`] bytes.
    const NAME: &'static str;
    /// Raised when the encoding changes: peers with another version refuse.
    const VERSION: u16;
    /// Largest encoding, whole or delta, bytes; at most [`MAX_COMPONENT_SIZE`].
    const MAX_SIZE: usize;
    const POLICY: Policy;

    /// Appends the value, as a delta against `base` when there is one.
    fn encode(&self, base: Option<&Self>, out: &mut Vec<u8>);
    /// Reads a value written by [`Component::encode`] with the same `base`.
    fn decode(r: &mut Reader<'_>, base: Option<&Self>) -> Result<Self, ComponentError>;
}

/// The whole encoding of `v`.
pub fn encode_whole<C: Component>(v: &C) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    v.encode(None, &mut out);
    out
}

/// Decodes a whole encoding of `C`, all of it.
pub fn decode_whole<C: Component>(bytes: &[u8]) -> Result<C, ComponentError> {
    if bytes.len() > C::MAX_SIZE {
        return Err(ComponentError::TooLarge { id: C::ID, len: bytes.len(), max: C::MAX_SIZE });
    }
    let mut r = Reader::new(bytes);
    let v = C::decode(&mut r, None)?;
    r.finish()?;
    Ok(v)
}

/// Checks `C`'s codec on one value and baseline: both encodings fit
/// `MAX_SIZE` and decode back to `v`. For a game's own property tests.
pub fn check_round_trip<C: Component>(v: &C, base: &C) -> Result<(), String> {
    for b in [None, Some(base)] {
        let mut out = Vec::new();
        v.encode(b, &mut out);
        if out.len() > C::MAX_SIZE {
            return Err(format!("{} encodes {v:?} in {} bytes, more than {}", C::NAME, out.len(), C::MAX_SIZE));
        }
        let mut r = Reader::new(&out);
        let back = C::decode(&mut r, b).map_err(|e| format!("{}: {e} decoding {v:?}", C::NAME))?;
        r.finish().map_err(|e| format!("{}: {e}", C::NAME))?;
        if &back != v {
            return Err(format!("{}: {v:?} came back as {back:?} (baseline {b:?})", C::NAME));
        }
    }
    Ok(())
}

/// A bounded little-endian reader: every read checks the length first.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ComponentError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(ComponentError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    pub fn u8(&mut self) -> Result<u8, ComponentError> {
        Ok(self.take::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, ComponentError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    pub fn i16(&mut self) -> Result<i16, ComponentError> {
        Ok(i16::from_le_bytes(self.take()?))
    }
    pub fn u32(&mut self) -> Result<u32, ComponentError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub fn u64(&mut self) -> Result<u64, ComponentError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    pub fn varint(&mut self) -> Result<u64, ComponentError> {
        crate::codec::take_varint(&mut self.0).map_err(|e| match e {
            crate::wire::DecodeError::Truncated => ComponentError::Truncated,
            _ => ComponentError::BadVarint,
        })
    }
    /// A zigzag varint.
    pub fn signed(&mut self) -> Result<i64, ComponentError> {
        Ok(crate::codec::unzigzag(self.varint()?))
    }
    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ComponentError> {
        if n > self.0.len() {
            return Err(ComponentError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub fn remaining(&self) -> usize {
        self.0.len()
    }
    /// Nothing may follow.
    pub fn finish(&self) -> Result<(), ComponentError> {
        if self.0.is_empty() { Ok(()) } else { Err(ComponentError::TrailingBytes(self.0.len())) }
    }
}

/// Writers matching [`Reader`].
pub mod put {
    pub fn varint(out: &mut Vec<u8>, v: u64) {
        crate::codec::put_varint(out, v);
    }
    /// A zigzag varint.
    pub fn signed(out: &mut Vec<u8>, v: i64) {
        crate::codec::put_varint(out, crate::codec::zigzag(v));
    }
}

/// One line of a [`Schema`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEntry {
    pub id: ComponentId,
    pub name: String,
    pub version: u16,
}

/// The components a peer knows, in ascending id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema(pub Vec<SchemaEntry>);

impl Schema {
    /// A schema read off the wire (a peer's, a server's registration, a
    /// transfer's components): at most as many components as a registry
    /// holds, ids and versions in range, names as a registry allows,
    /// ascending ids. The error is for people.
    pub fn checked<'a>(entries: impl ExactSizeIterator<Item = (u32, &'a str, u32)>) -> Result<Schema, &'static str> {
        if entries.len() > MAX_REGISTERED {
            return Err("more components than a registry holds");
        }
        let mut out: Vec<SchemaEntry> = Vec::with_capacity(entries.len());
        for (id, name, version) in entries {
            let id = u16::try_from(id).map_err(|_| "component id out of range")?;
            let version = u16::try_from(version).map_err(|_| "version out of range")?;
            if name.len() > MAX_NAME {
                return Err("component name too long");
            }
            if out.last().is_some_and(|l| l.id >= id) {
                return Err("component ids not ascending");
            }
            out.push(SchemaEntry { id, name: name.to_owned(), version });
        }
        Ok(Schema(out))
    }

    /// The entries of `set`'s components, as this schema knows them (a
    /// component it lacks is left out: a set only holds registered ones).
    pub fn entries_of(&self, set: &ComponentSet) -> Vec<SchemaEntry> {
        set.ids().filter_map(|id| self.0.iter().find(|e| e.id == id).cloned()).collect()
    }
    /// `None` when `theirs` is this schema; else the first difference, for
    /// people (`schema_mismatch: …`).
    pub fn mismatch(&self, theirs: &Schema) -> Option<String> {
        let mine: BTreeMap<_, _> = self.0.iter().map(|e| (e.id, e)).collect();
        let other: BTreeMap<_, _> = theirs.0.iter().map(|e| (e.id, e)).collect();
        for id in mine.keys().chain(other.keys()) {
            match (mine.get(id), other.get(id)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    return Some(format!(
                        "component {id} is {} v{} here, {} v{} there",
                        a.name, a.version, b.name, b.version
                    ));
                }
                (Some(a), None) => return Some(format!("component {id} ({} v{}) is missing there", a.name, a.version)),
                (None, Some(b)) => return Some(format!("component {id} ({} v{}) is unknown here", b.name, b.version)),
                (None, None) => {}
            }
        }
        (self.0.len() != theirs.0.len()).then(|| "a component is listed twice".to_owned())
    }

    /// Whether every component of `set` is known to this schema at the
    /// version `mine` has: a handoff to a peer with this schema would be
    /// understood (checked before a transfer is committed).
    pub fn understands(&self, mine: &Schema, set: &ComponentSet) -> Result<(), ComponentError> {
        for id in set.ids() {
            let here = mine.0.iter().find(|e| e.id == id);
            let there = self.0.iter().find(|e| e.id == id);
            match (here, there) {
                (Some(a), Some(b)) if a == b => {}
                _ => return Err(ComponentError::Unknown(id)),
            }
        }
        Ok(())
    }
}

/// Why a component could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("component id {0} is taken by {1}")]
    IdTaken(ComponentId, &'static str),
    #[error("component name {0} is taken")]
    NameTaken(&'static str),
    #[error("component name {0:?} is not 1 to {MAX_NAME} of a-z 0-9 _ .")]
    BadName(&'static str),
    #[error("{name} declares a largest size of {size} bytes, not 1 to {MAX_COMPONENT_SIZE}")]
    BadSize { name: &'static str, size: usize },
    #[error("{name} is seen by clients and declares {size} bytes, more than {MAX_VISIBLE_SIZE}")]
    TooLargeForClients { name: &'static str, size: usize },
    #[error("more than {MAX_REGISTERED} components")]
    Full,
}

/// Checks a whole encoding of one component (type-erased).
type Validate = fn(&[u8]) -> Result<(), ComponentError>;
/// Writes a component's delta from its whole encoding against a baseline's
/// (type-erased [`Component::encode`]).
type Diff = fn(&[u8], Option<&[u8]>, &mut Vec<u8>) -> Result<(), ComponentError>;
/// Reads a delta against a baseline's whole encoding; answers the new
/// whole encoding (type-erased [`Component::decode`]).
type Patch = fn(&mut Reader<'_>, Option<&[u8]>) -> Result<Vec<u8>, ComponentError>;

#[derive(Clone)]
struct Entry {
    name: &'static str,
    version: u16,
    max_size: usize,
    policy: Policy,
    validate: Validate,
    diff: Diff,
    patch: Patch,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{} (≤ {} B, {:?})", self.name, self.version, self.max_size, self.policy)
    }
}

/// The components this peer knows: the same code on server and client.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<ComponentId, Entry>,
}

impl Registry {
    /// No components at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in components ([`builtin`]).
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        builtin::register(&mut r).expect("the built-in components register");
        r
    }

    /// Adds `C`. Refused: an id or name taken, a bad name, a largest size
    /// outside 1..=[`MAX_COMPONENT_SIZE`].
    pub fn register<C: Component>(&mut self) -> Result<(), RegistryError> {
        if let Some(e) = self.entries.get(&C::ID) {
            return Err(RegistryError::IdTaken(C::ID, e.name));
        }
        if self.entries.values().any(|e| e.name == C::NAME) {
            return Err(RegistryError::NameTaken(C::NAME));
        }
        let name_ok = !C::NAME.is_empty()
            && C::NAME.len() <= MAX_NAME
            && C::NAME.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        if !name_ok {
            return Err(RegistryError::BadName(C::NAME));
        }
        if !(1..=MAX_COMPONENT_SIZE).contains(&C::MAX_SIZE) {
            return Err(RegistryError::BadSize { name: C::NAME, size: C::MAX_SIZE });
        }
        if C::POLICY.audience != Audience::Servers && C::MAX_SIZE > MAX_VISIBLE_SIZE {
            return Err(RegistryError::TooLargeForClients { name: C::NAME, size: C::MAX_SIZE });
        }
        if self.entries.len() >= MAX_REGISTERED {
            return Err(RegistryError::Full);
        }
        let validate: Validate = |bytes| decode_whole::<C>(bytes).map(|_| ());
        let diff: Diff = |now, base, out| {
            let now = decode_whole::<C>(now)?;
            let base = base.map(decode_whole::<C>).transpose()?;
            now.encode(base.as_ref(), out);
            Ok(())
        };
        let patch: Patch = |r, base| {
            let base = base.map(decode_whole::<C>).transpose()?;
            let v = C::decode(r, base.as_ref())?;
            r.finish()?;
            Ok(encode_whole(&v))
        };
        self.entries.insert(
            C::ID,
            Entry {
                name: C::NAME,
                version: C::VERSION,
                max_size: C::MAX_SIZE,
                policy: C::POLICY,
                validate,
                diff,
                patch,
            },
        );
        Ok(())
    }

    pub fn schema(&self) -> Schema {
        Schema(
            self.entries
                .iter()
                .map(|(id, e)| SchemaEntry { id: *id, name: e.name.to_owned(), version: e.version })
                .collect(),
        )
    }

    pub fn policy(&self, id: ComponentId) -> Option<Policy> {
        self.entries.get(&id).map(|e| e.policy)
    }

    pub fn name(&self, id: ComponentId) -> Option<&'static str> {
        self.entries.get(&id).map(|e| e.name)
    }

    /// Checks a whole encoding of component `id`: known, within its size,
    /// decodable to a value in range, nothing after it.
    pub fn validate(&self, id: ComponentId, bytes: &[u8]) -> Result<(), ComponentError> {
        let e = self.entries.get(&id).ok_or(ComponentError::Unknown(id))?;
        if bytes.len() > e.max_size {
            return Err(ComponentError::TooLarge { id, len: bytes.len(), max: e.max_size });
        }
        (e.validate)(bytes)
    }
}

/// An entity's components, each as its whole encoding, in ascending id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentSet {
    items: Vec<(ComponentId, Vec<u8>)>,
}

impl ComponentSet {
    pub const fn new() -> Self {
        Self { items: Vec::new() }
    }

    /// Sets (or replaces) `C`.
    pub fn set<C: Component>(&mut self, v: &C) {
        let bytes = encode_whole(v);
        match self.items.binary_search_by_key(&C::ID, |(id, _)| *id) {
            Ok(i) => self.items[i].1 = bytes,
            Err(i) => self.items.insert(i, (C::ID, bytes)),
        }
    }

    /// `C`, if the set has it (an error if its bytes do not decode as `C`).
    pub fn get<C: Component>(&self) -> Option<Result<C, ComponentError>> {
        self.bytes(C::ID).map(decode_whole::<C>)
    }

    pub fn bytes(&self, id: ComponentId) -> Option<&[u8]> {
        self.items.binary_search_by_key(&id, |(i, _)| *i).ok().map(|i| self.items[i].1.as_slice())
    }

    /// Sets component `id` to a whole encoding (not checked: the caller
    /// validated it); reuses the old value's allocation.
    pub fn put_bytes(&mut self, id: ComponentId, bytes: &[u8]) {
        match self.items.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(i) => {
                let v = &mut self.items[i].1;
                v.clear();
                v.extend_from_slice(bytes);
            }
            Err(i) => self.items.insert(i, (id, bytes.to_vec())),
        }
    }

    /// Each component's id and whole encoding, in ascending id.
    pub fn iter(&self) -> impl Iterator<Item = (ComponentId, &[u8])> + '_ {
        self.items.iter().map(|(id, b)| (*id, b.as_slice()))
    }

    /// Keeps the components `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(ComponentId) -> bool) {
        self.items.retain(|(id, _)| keep(*id));
    }

    pub fn remove(&mut self, id: ComponentId) -> bool {
        match self.items.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(i) => {
                self.items.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = ComponentId> + '_ {
        self.items.iter().map(|(id, _)| *id)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The components whose policy `keep` accepts (what a ghost carries,
    /// what a checkpoint keeps); unknown ones are left out.
    pub fn filtered(&self, registry: &Registry, keep: impl Fn(&Policy) -> bool) -> Self {
        let items =
            self.items.iter().filter(|(id, _)| registry.policy(*id).is_some_and(|p| keep(&p))).cloned().collect();
        Self { items }
    }

    /// Appends the set's encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put::varint(out, self.items.len() as u64);
        for (id, bytes) in &self.items {
            put::varint(out, u64::from(*id));
            put::varint(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.items.iter().map(|(_, b)| b.len() + 3).sum::<usize>());
        self.encode(&mut out);
        out
    }

    /// Appends what changed from `base` to this set among the components
    /// `keep` accepts (a snapshot: those the client may see): the count and
    /// the components whose value changed, each as its delta against the
    /// base's value (whole when the base lacks it), in ascending id; then
    /// the count and ids of those the base has and this set no longer has.
    /// Nothing changed costs two bytes. Components the registry does not
    /// know are left out.
    pub fn encode_changes(
        &self,
        base: Option<&ComponentSet>,
        registry: &Registry,
        keep: impl Fn(&Policy) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ComponentError> {
        let kept = |id: ComponentId| registry.entries.get(&id).filter(|e| keep(&e.policy));
        let before = |id| base.and_then(|b| b.bytes(id));
        let changed: Vec<_> = self
            .items
            .iter()
            .filter(|(id, bytes)| kept(*id).is_some() && before(*id) != Some(bytes.as_slice()))
            .collect();
        put::varint(out, changed.len() as u64);
        let mut delta = Vec::with_capacity(32);
        for (id, bytes) in changed {
            let entry = kept(*id).ok_or(ComponentError::Unknown(*id))?;
            delta.clear();
            (entry.diff)(bytes, before(*id), &mut delta)?;
            put::varint(out, u64::from(*id));
            put::varint(out, delta.len() as u64);
            out.extend_from_slice(&delta);
        }
        let removed: Vec<ComponentId> = base
            .into_iter()
            .flat_map(ComponentSet::ids)
            .filter(|id| kept(*id).is_some() && self.bytes(*id).is_none())
            .collect();
        put::varint(out, removed.len() as u64);
        for id in removed {
            put::varint(out, u64::from(id));
        }
        Ok(())
    }

    /// Reads what [`ComponentSet::encode_changes`] wrote against the same
    /// `base`: the base with the changes applied. Every component is
    /// checked against `registry`; all or nothing.
    pub fn decode_changes(
        r: &mut Reader<'_>,
        base: Option<&ComponentSet>,
        registry: &Registry,
    ) -> Result<Self, ComponentError> {
        let mut set = base.cloned().unwrap_or_default();
        let n = r.varint()?;
        if n > MAX_COMPONENTS as u64 {
            return Err(ComponentError::TooMany);
        }
        let mut last: Option<ComponentId> = None;
        for _ in 0..n {
            let id = ComponentId::try_from(r.varint()?).map_err(|_| ComponentError::Unknown(ComponentId::MAX))?;
            if last.is_some_and(|l| id <= l) {
                return Err(ComponentError::Unordered(id));
            }
            last = Some(id);
            let entry = registry.entries.get(&id).ok_or(ComponentError::Unknown(id))?;
            let len = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
            if len > entry.max_size {
                return Err(ComponentError::TooLarge { id, len, max: entry.max_size });
            }
            let mut body = Reader::new(r.bytes(len)?);
            let whole = (entry.patch)(&mut body, set.bytes(id))?;
            match set.items.binary_search_by_key(&id, |(i, _)| *i) {
                Ok(i) => set.items[i].1 = whole,
                Err(i) => set.items.insert(i, (id, whole)),
            }
        }
        let removed = r.varint()?;
        if removed > MAX_COMPONENTS as u64 {
            return Err(ComponentError::TooMany);
        }
        for _ in 0..removed {
            let id = ComponentId::try_from(r.varint()?).map_err(|_| ComponentError::Unknown(ComponentId::MAX))?;
            if !set.remove(id) {
                return Err(ComponentError::Unknown(id));
            }
        }
        if set.items.len() > MAX_COMPONENTS {
            return Err(ComponentError::TooMany);
        }
        Ok(set)
    }

    /// Reads a set, all of it, every component checked against `registry`:
    /// all or nothing.
    pub fn decode(bytes: &[u8], registry: &Registry) -> Result<Self, ComponentError> {
        Self::read(bytes, |id, body| registry.validate(id, body).map(|()| true))
    }

    /// Reads a set saved earlier (a player's progression) by a build whose
    /// registry may differ: a component this registry refuses (gone from
    /// the game, or a value it no longer accepts) is left out and returned
    /// with the reason; the rest is kept. A malformed set (truncated,
    /// unordered, too many) is refused whole.
    #[allow(clippy::type_complexity)]
    pub fn decode_saved(
        bytes: &[u8],
        registry: &Registry,
    ) -> Result<(Self, Vec<(ComponentId, ComponentError)>), ComponentError> {
        let mut dropped = Vec::new();
        let set = Self::read(bytes, |id, body| match registry.validate(id, body) {
            Ok(()) => Ok(true),
            Err(e) => {
                dropped.push((id, e));
                Ok(false)
            }
        })?;
        Ok((set, dropped))
    }

    /// Reads a set's framing; `keep` checks each component (`Ok(false)`:
    /// left out).
    fn read(
        bytes: &[u8],
        mut keep: impl FnMut(ComponentId, &[u8]) -> Result<bool, ComponentError>,
    ) -> Result<Self, ComponentError> {
        let mut r = Reader::new(bytes);
        let n = r.varint()?;
        if n > MAX_COMPONENTS as u64 {
            return Err(ComponentError::TooMany);
        }
        let mut items = Vec::with_capacity(n as usize);
        let mut last: Option<ComponentId> = None;
        for _ in 0..n {
            let raw = r.varint()?;
            let id = ComponentId::try_from(raw).map_err(|_| ComponentError::Unknown(ComponentId::MAX))?;
            if last.is_some_and(|l| id <= l) {
                return Err(ComponentError::Unordered(id));
            }
            last = Some(id);
            let len = r.varint()?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_COMPONENT_SIZE {
                return Err(ComponentError::TooLarge { id, len, max: MAX_COMPONENT_SIZE });
            }
            let body = r.bytes(len)?;
            if keep(id, body)? {
                items.push((id, body.to_vec()));
            }
        }
        r.finish()?;
        Ok(Self { items })
    }
}

#[cfg(test)]
mod tests;
