//! An entity's components as its server holds them: the set, and when each
//! component last changed, so a snapshot sends a client only the
//! components that changed since the state it holds.

use super::{Component, ComponentId, ComponentSet};

/// Whether tick `a` (low 32 bits, wrapping) comes after tick `b`.
pub(crate) fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// An entity's components with the tick (its low 32 bits) each last
/// changed and the tick one was last removed. Setting a component to the
/// value it has changes nothing (nor its tick).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked {
    set: ComponentSet,
    /// Per component of `set`, in the same (ascending id) order.
    changed: Vec<u32>,
    removed_at: u32,
    /// The newest of `changed` and `removed_at`.
    newest: u32,
}

impl Tracked {
    /// A set that arrived (spawned, adopted) at `tick`: every component
    /// counts as changed then.
    pub fn new(set: ComponentSet, tick: u64) -> Self {
        let t = tick as u32;
        Self { changed: vec![t; set.len()], set, removed_at: t, newest: t }
    }

    pub fn set(&self) -> &ComponentSet {
        &self.set
    }

    /// Sets `C` at `tick`; whether its value changed.
    pub fn put<C: Component>(&mut self, v: &C, tick: u64) -> bool {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.clear();
            v.encode(None, buf);
            self.put_bytes(C::ID, buf, tick)
        })
    }

    /// Sets component `id` to a whole encoding (already validated) at
    /// `tick`; whether its value changed.
    pub fn put_bytes(&mut self, id: ComponentId, bytes: &[u8], tick: u64) -> bool {
        if self.set.bytes(id) == Some(bytes) {
            return false;
        }
        self.set.put_bytes(id, bytes);
        let i = self.set.ids().position(|x| x == id).expect("just put");
        if self.changed.len() < self.set.len() {
            self.changed.insert(i, 0);
        }
        self.changed[i] = tick as u32;
        self.newest = tick as u32;
        true
    }

    /// Removes component `id` at `tick`; whether it was there.
    pub fn remove(&mut self, id: ComponentId, tick: u64) -> bool {
        let Some(i) = self.set.ids().position(|x| x == id) else { return false };
        self.set.remove(id);
        self.changed.remove(i);
        self.removed_at = tick as u32;
        self.newest = tick as u32;
        true
    }

    /// Each component's id, whole encoding and the tick it last changed.
    pub fn iter(&self) -> impl Iterator<Item = (ComponentId, &[u8], u32)> + '_ {
        self.set.iter().zip(&self.changed).map(|((id, b), t)| (id, b, *t))
    }

    /// The tick a component was last removed (or the set arrived).
    pub fn removed_at(&self) -> u32 {
        self.removed_at
    }

    /// The tick anything last changed.
    pub fn newest(&self) -> u32 {
        self.newest
    }

    /// Whether anything changed after tick `stamp`.
    pub fn changed_after(&self, stamp: u32) -> bool {
        after(self.newest, stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::builtin::{Kind, PlayerName, VrRig};

    #[test]
    fn a_component_set_to_its_value_keeps_its_tick_and_a_removal_is_dated() {
        let mut set = ComponentSet::new();
        set.set(&Kind::Player);
        let mut t = Tracked::new(set, 10);
        assert!(!t.put(&Kind::Player, 20), "same value");
        assert_eq!(t.iter().map(|(id, _, at)| (id, at)).collect::<Vec<_>>(), vec![(2, 10)]);
        assert!(t.put(&PlayerName("ana".into()), 21));
        let mut rig = VrRig::default();
        rig.head.pos_mm = [0, 1700, 0];
        assert!(t.put(&rig, 22));
        assert_eq!(t.iter().map(|(id, _, at)| (id, at)).collect::<Vec<_>>(), vec![(2, 10), (3, 22), (4, 21)]);
        assert!(t.changed_after(21) && !t.changed_after(22));
        assert!(t.remove(4, 30) && !t.remove(4, 31));
        assert_eq!((t.removed_at(), t.newest()), (30, 30));
        assert_eq!(t.iter().map(|(id, _, at)| (id, at)).collect::<Vec<_>>(), vec![(2, 10), (3, 22)]);
        assert_eq!(t.set().get::<VrRig>(), Some(Ok(rig)));
    }
}
