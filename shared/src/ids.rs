//! Identifiers that are unique across the whole mesh.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One incarnation of a game server. The coordinator mints a fresh id at every
/// registration, from a counter its log only raises, so a restarted process is
/// a new server and ids are never reused. At most [`ServerId::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServerId(pub u32);

impl ServerId {
    /// Ids fit the 24-bit namespace field of [`EntityId`].
    pub const MAX: u32 = (1 << 24) - 1;
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gs-{}", self.0)
    }
}

/// A player account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PlayerId(pub u64);

impl fmt::Display for PlayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "player-{}", self.0)
    }
}

/// An epoch: raised only by the coordinator's log; newer wins, stale is fenced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Self {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// An entity, unique across the mesh and for its whole life: the id stays
/// when authority over the entity moves between servers.
///
/// Layout: the top 24 bits are a namespace, the low 40 bits a serial. Namespace
/// 0 holds players (serial = player id); namespace `n > 0` holds entities
/// minted by server incarnation `n`, which never repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityId(pub u64);

const SERIAL_BITS: u32 = 40;
/// The largest player id: a player's id is its avatar's entity serial.
pub const MAX_PLAYER_ID: u64 = (1 << SERIAL_BITS) - 1;
const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("player id {0} does not fit the 40-bit entity serial")]
    PlayerIdTooLarge(u64),
    #[error("server id {0} is outside 1..=2^24-1")]
    BadServerId(u32),
    #[error("server {0} has minted all 2^40 entity ids of its incarnation")]
    Exhausted(ServerId),
}

impl EntityId {
    /// The avatar of a player.
    pub fn player(p: PlayerId) -> Result<Self, IdError> {
        if p.0 > SERIAL_MASK {
            return Err(IdError::PlayerIdTooLarge(p.0));
        }
        Ok(EntityId(p.0))
    }

    /// The player whose avatar this is, if it is one.
    pub fn as_player(&self) -> Option<PlayerId> {
        (self.namespace() == 0).then_some(PlayerId(self.serial()))
    }

    /// The server incarnation that minted this entity (`None` for players).
    pub fn minted_by(&self) -> Option<ServerId> {
        let ns = self.namespace();
        (ns != 0).then_some(ServerId(ns))
    }

    fn namespace(&self) -> u32 {
        (self.0 >> SERIAL_BITS) as u32
    }

    fn serial(&self) -> u64 {
        self.0 & SERIAL_MASK
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.minted_by() {
            None => write!(f, "e:p{}", self.serial()),
            Some(s) => write!(f, "e:{}/{}", s.0, self.serial()),
        }
    }
}

/// Mints entity ids for one server incarnation.
#[derive(Debug, Clone)]
pub struct EntityIdAllocator {
    server: ServerId,
    next: u64,
}

impl EntityIdAllocator {
    pub fn new(server: ServerId) -> Result<Self, IdError> {
        if server.0 == 0 || server.0 > ServerId::MAX {
            return Err(IdError::BadServerId(server.0));
        }
        Ok(Self { server, next: 1 })
    }

    pub fn mint(&mut self) -> Result<EntityId, IdError> {
        if self.next > SERIAL_MASK {
            return Err(IdError::Exhausted(self.server));
        }
        let id = (u64::from(self.server.0) << SERIAL_BITS) | self.next;
        self.next += 1;
        Ok(EntityId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn players_and_minted_entities_never_collide() {
        let mut a = EntityIdAllocator::new(ServerId(1)).unwrap();
        let e = a.mint().unwrap();
        assert_eq!(e.minted_by(), Some(ServerId(1)));
        assert_eq!(e.as_player(), None);
        let p = EntityId::player(PlayerId(1)).unwrap();
        assert_ne!(e, p);
        assert_eq!(p.as_player(), Some(PlayerId(1)));
        assert!(EntityId::player(PlayerId(1 << 41)).is_err());
        assert!(EntityIdAllocator::new(ServerId(0)).is_err());
        assert!(EntityIdAllocator::new(ServerId(1 << 24)).is_err());
    }

    proptest! {
        #[test]
        fn ids_of_distinct_servers_are_distinct(s1 in 1u32..=ServerId::MAX, s2 in 1u32..=ServerId::MAX, n in 1usize..50) {
            prop_assume!(s1 != s2);
            let mut a = EntityIdAllocator::new(ServerId(s1)).unwrap();
            let mut b = EntityIdAllocator::new(ServerId(s2)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..n {
                prop_assert!(seen.insert(a.mint().unwrap()));
                prop_assert!(seen.insert(b.mint().unwrap()));
            }
        }
    }
}
