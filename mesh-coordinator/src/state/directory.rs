//! The player directory: where each online player's avatar is simulated,
//! as the log last decided it (a join, a committed transfer, a reclaim, a
//! leave, a death). Routing, standby tickets and the admin views read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shared::{EntityId, PlayerId, ServerId};

use super::CommandError;

/// Players the directory holds at most (a bound on the state's size).
pub const MAX_DIRECTORY: usize = 1_000_000;

/// Where a player's avatar is simulated, as the log last decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlayerLocation {
    pub server: ServerId,
    pub entity: EntityId,
    /// When it got there (Unix ns).
    pub since: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Directory {
    /// Where each online player's avatar is. Invariant: at most
    /// [`MAX_DIRECTORY`] entries, but for a reclaim (which restores one).
    players: BTreeMap<PlayerId, PlayerLocation>,
    /// The player of each avatar. Invariant: the exact inverse of
    /// `players` (`avatars[players[p].entity] == p` for every `p`, and no
    /// other entry).
    avatars: BTreeMap<EntityId, PlayerId>,
}

impl Directory {
    /// From the two maps of a format-3 state, mending any entry of one
    /// without its inverse in the other.
    pub(super) fn from_maps(players: BTreeMap<PlayerId, PlayerLocation>) -> Self {
        let avatars = players.iter().map(|(p, l)| (l.entity, *p)).collect();
        Self { players, avatars }
    }

    pub fn get(&self, player: PlayerId) -> Option<PlayerLocation> {
        self.players.get(&player).copied()
    }

    pub fn len(&self) -> usize {
        self.players.len()
    }

    pub fn is_empty(&self) -> bool {
        self.players.is_empty()
    }

    /// The player went online on `server` with this avatar (replacing any
    /// avatar it had).
    pub fn join(&mut self, player: PlayerId, entity: EntityId, server: ServerId, now: u64) -> Result<(), CommandError> {
        if self.players.len() >= MAX_DIRECTORY && !self.players.contains_key(&player) {
            return Err(CommandError::DirectoryFull);
        }
        self.put(player, PlayerLocation { server, entity, since: now });
        Ok(())
    }

    /// The avatar left `server`: the player is offline, unless the
    /// directory already has it elsewhere or with another avatar (a late
    /// leave from a server it was handed away from).
    pub fn leave(&mut self, player: PlayerId, entity: EntityId, server: ServerId) {
        if self.players.get(&player).is_some_and(|l| l.server == server && l.entity == entity) {
            self.players.remove(&player);
            self.avatars.remove(&entity);
        }
    }

    /// A transfer of `entity` committed to `server`: its player follows.
    pub fn follow(&mut self, entity: EntityId, server: ServerId, now: u64) {
        if let Some(p) = self.avatars.get(&entity)
            && let Some(loc) = self.players.get_mut(p)
        {
            loc.server = server;
            loc.since = now;
        }
    }

    /// `server` took back `entity` (a reclaim): its player, known by the
    /// avatar or by the entity's id, is there (again; a target's death
    /// dropped it).
    pub fn reclaimed(&mut self, entity: EntityId, server: ServerId, now: u64) {
        if let Some(p) = self.avatars.get(&entity).copied().or_else(|| entity.as_player()) {
            self.put(p, PlayerLocation { server, entity, since: now });
        }
    }

    /// The avatar is gone (an orphan nobody could resume).
    pub fn drop_avatar(&mut self, entity: EntityId) {
        if let Some(p) = self.avatars.remove(&entity) {
            self.players.remove(&p);
        }
    }

    /// `server` died: its players are no longer anywhere.
    pub fn drop_server(&mut self, server: ServerId) {
        let gone: Vec<PlayerId> = self.players.iter().filter(|(_, l)| l.server == server).map(|(p, _)| *p).collect();
        for p in gone {
            if let Some(l) = self.players.remove(&p) {
                self.avatars.remove(&l.entity);
            }
        }
    }

    fn put(&mut self, player: PlayerId, loc: PlayerLocation) {
        if let Some(old) = self.players.insert(player, loc) {
            self.avatars.remove(&old.entity);
        }
        // Another player's avatar under the same id: that player is gone.
        if let Some(other) = self.avatars.insert(loc.entity, player)
            && other != player
        {
            self.players.remove(&other);
        }
    }

    /// Checks the invariant (tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        assert_eq!(self.players.len(), self.avatars.len(), "{self:?}");
        for (p, l) in &self.players {
            assert_eq!(self.avatars.get(&l.entity), Some(p), "{self:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_maps_stay_each_others_inverse() {
        let mut d = Directory::default();
        let (p, q) = (PlayerId(1), PlayerId(2));
        let (e, f) = (EntityId(10), EntityId(11));
        let (a, b) = (ServerId(1), ServerId(2));
        d.join(p, e, a, 0).unwrap();
        d.check();
        // A new avatar for the same player replaces the old one.
        d.join(p, f, a, 1).unwrap();
        d.check();
        assert_eq!(d.get(p).map(|l| l.entity), Some(f));
        d.follow(f, b, 2);
        assert_eq!(d.get(p).map(|l| (l.server, l.since)), Some((b, 2)));
        // A late leave from a changes nothing; b's does.
        d.leave(p, f, a);
        assert_eq!(d.len(), 1);
        d.leave(p, f, b);
        assert!(d.is_empty());
        d.check();
        // Another player takes an id an avatar had: the old one is gone.
        d.join(p, e, a, 3).unwrap();
        d.reclaimed(e, b, 4);
        d.join(q, e, a, 5).unwrap();
        d.check();
        assert_eq!((d.get(p), d.get(q).map(|l| l.server)), (None, Some(a)));
        d.drop_server(a);
        assert!(d.is_empty());
        d.check();
        // A player's own avatar comes back by its id even when unknown.
        let own = EntityId::player(q).unwrap();
        d.reclaimed(own, b, 6);
        assert_eq!(d.get(q).map(|l| l.entity), Some(own));
        d.drop_avatar(own);
        assert!(d.is_empty());
        d.check();
    }
}
