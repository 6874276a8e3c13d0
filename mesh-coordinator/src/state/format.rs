//! The state's bytes: a format byte, then bincode (standard config).
//!
//! - Format 5 (written): the whole [`CoordinatorState`], then the servers'
//!   component schemas (`BTreeMap<ServerId, Schema>`).
//! - Format 4 (read, migrated): the whole state alone (no schemas: servers
//!   registered before are not checked until they register again).
//! - Format 3 (read, migrated): the format-2 core, then an extension
//!   (drains, releases, the balancer's memory, the player directory); the
//!   transfers as one bounded deque, ended and in flight together.
//! - Format 2 (read, migrated): the core alone.
//! - Format 1 (before Raft) and any format newer than this build's are
//!   refused with a clear error: a replica never guesses at a layout.
//!
//! A replica of the previous release refuses format 5 the same way ("format
//! 5 is unknown to this build"): during a roll, a new leader's snapshot
//! reaches only replicas already rolled (see the chart README).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use shared::component::Schema;
use shared::region::{RegionKey, RegionTree};
use shared::{EntityId, PlayerId, ServerId, TickClock};

use super::{
    Assignment, AuditRecord, BalancerMemory, CoordinatorState, Directory, EntityAuthority, PlayerLocation, Policy,
    Release, ServerRecord, Thresholds, TransferRecord, Transfers,
};

/// The format this build writes.
pub const FORMAT: u8 = 5;

pub fn encode(s: &CoordinatorState) -> Vec<u8> {
    let config = bincode::config::standard();
    let mut out = vec![FORMAT];
    out.extend(bincode::serde::encode_to_vec(s, config).expect("the state serialises"));
    out.extend(bincode::serde::encode_to_vec(&s.schemas, config).expect("the schemas serialise"));
    out
}

pub fn decode(bytes: &[u8]) -> Result<CoordinatorState, String> {
    let config = bincode::config::standard();
    let whole = |body: &[u8], used: usize| {
        if used == body.len() { Ok(()) } else { Err(format!("snapshot has {} trailing bytes", body.len() - used)) }
    };
    match bytes.split_first() {
        Some((5, body)) => {
            let (mut s, used) = bincode::serde::decode_from_slice::<CoordinatorState, _>(body, config)
                .map_err(|e| format!("snapshot does not decode: {e}"))?;
            let (schemas, rest) =
                bincode::serde::decode_from_slice::<BTreeMap<ServerId, Schema>, _>(&body[used..], config)
                    .map_err(|e| format!("snapshot's component schemas do not decode: {e}"))?;
            whole(body, used + rest)?;
            s.schemas = schemas;
            Ok(s)
        }
        Some((4, body)) => {
            let (s, used) = bincode::serde::decode_from_slice::<CoordinatorState, _>(body, config)
                .map_err(|e| format!("snapshot (format 4) does not decode: {e}"))?;
            whole(body, used)?;
            Ok(s)
        }
        Some((3, body)) => {
            let (core, used) = bincode::serde::decode_from_slice::<CoreV3, _>(body, config)
                .map_err(|e| format!("snapshot (format 3) does not decode: {e}"))?;
            let (ext, rest) = bincode::serde::decode_from_slice::<ExtensionV3, _>(&body[used..], config)
                .map_err(|e| format!("snapshot (format 3) extension does not decode: {e}"))?;
            whole(body, used + rest)?;
            Ok(core.migrate(ext))
        }
        Some((2, body)) => {
            let (core, _) = bincode::serde::decode_from_slice::<CoreV3, _>(body, config)
                .map_err(|e| format!("snapshot (format 2) does not decode: {e}"))?;
            Ok(core.migrate(ExtensionV3::default()))
        }
        Some((1, _)) => Err("snapshot format 1 was written by a build before Raft; start a new mesh (another \
                             --cluster, or delete the development data directory)"
            .into()),
        Some((v, _)) => Err(format!("snapshot format {v} is unknown to this build (it reads 2 to {FORMAT})")),
        None => Err("empty snapshot".into()),
    }
}

/// The state as formats 2 and 3 laid it out (field order is the layout).
#[derive(Deserialize)]
struct CoreV3 {
    policy: Policy,
    thresholds: Thresholds,
    clock: TickClock,
    world_seed: u64,
    tree: RegionTree,
    assignments: BTreeMap<RegionKey, Assignment>,
    servers: BTreeMap<ServerId, ServerRecord>,
    entities: BTreeMap<EntityId, EntityAuthority>,
    transfers: VecDeque<TransferRecord>,
    transfers_total: u64,
    audit: VecDeque<AuditRecord>,
    audit_total: u64,
    next_server_id: u32,
    next_epoch: u64,
    next_transfer_id: u64,
    map_version: u64,
    first_registration: Option<u64>,
}

/// What format 3 appended after the core.
#[derive(Default, Serialize, Deserialize)]
struct ExtensionV3 {
    drained: BTreeSet<ServerId>,
    releases: BTreeMap<RegionKey, Release>,
    region_players: BTreeMap<ServerId, Vec<(RegionKey, u32)>>,
    last_change: BTreeMap<RegionKey, u64>,
    acted: BTreeMap<ServerId, u64>,
    players: BTreeMap<PlayerId, PlayerLocation>,
    /// The inverse of `players`, rebuilt from it.
    #[allow(dead_code)]
    avatars: BTreeMap<EntityId, PlayerId>,
}

impl CoreV3 {
    fn migrate(self, ext: ExtensionV3) -> CoordinatorState {
        CoordinatorState {
            policy: self.policy,
            thresholds: self.thresholds,
            clock: self.clock,
            world_seed: self.world_seed,
            tree: self.tree,
            assignments: self.assignments,
            servers: self.servers,
            entities: self.entities,
            transfers: Transfers::from_log(self.transfers, self.transfers_total, self.next_transfer_id),
            directory: Directory::from_maps(ext.players),
            audit: self.audit,
            audit_total: self.audit_total,
            next_server_id: self.next_server_id,
            next_epoch: self.next_epoch,
            map_version: self.map_version,
            first_registration: self.first_registration,
            drained: ext.drained,
            releases: ext.releases,
            balancer: BalancerMemory {
                region_players: ext.region_players,
                last_change: ext.last_change,
                acted: ext.acted,
            },
            schemas: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TransferOutcome;
    use shared::Epoch;

    /// Written by the previous release (format 3): three servers, the
    /// third drained (its region moved, with a release); a prop's transfer
    /// delivered and the player 9's in flight; the player in the directory.
    const FORMAT_3: &[u8] = include_bytes!("../../tests/data/state-format-3.bin");

    #[test]
    fn a_format_3_state_migrates_with_nothing_lost() {
        let s = decode(FORMAT_3).unwrap();
        assert_eq!(s.servers().len(), 3);
        let c = ServerId(3);
        assert!(s.is_draining(c));
        assert_eq!(s.releases().values().map(|r| r.server).collect::<Vec<_>>(), [c]);
        assert_eq!(s.audit_log().len(), 1);
        // Transfers: the delivered one is history, the player's in flight
        // (where reclaims and retries find it); ids go on from the log's.
        let t = s.transfers();
        assert_eq!(t.total(), 2);
        assert_eq!(
            t.recent().iter().map(|r| (r.id, r.outcome)).collect::<Vec<_>>(),
            [(1, TransferOutcome::Delivered), (2, TransferOutcome::Committed)]
        );
        assert_eq!(t.in_flight().map(|r| r.id).collect::<Vec<_>>(), [2]);
        let player = PlayerId(9);
        let avatar = EntityId::player(player).unwrap();
        assert_eq!(s.entity_authority(avatar).map(|a| (a.server, a.epoch)), Some((ServerId(2), Epoch(1))));
        // The directory followed the commit, both ways round.
        assert_eq!(s.player_location(player).map(|l| (l.server, l.entity)), Some((ServerId(2), avatar)));
        s.directory.check();
        // Written again, it is the format of this build and reads back the same.
        let again = encode(&s);
        assert_eq!(again[0], FORMAT);
        assert_eq!(decode(&again).unwrap(), s);
        let mut next = s.clone();
        let mut events = Vec::new();
        let Ok(crate::state::Response::Transfer(r)) = next.request_transfer(
            crate::state::TransferRequest {
                entity: EntityId((1 << 40) | 6),
                from: ServerId(1),
                from_region: RegionKey::root(0, 0, 0),
                from_region_epoch: s.assignments()[&RegionKey::root(0, 0, 0)].epoch,
                entity_epoch: Epoch(0),
                to_region: RegionKey::root(1, 0, 0),
                not_before_tick: 0,
                now: s.clock.epoch_unix_nanos + 10_000_000,
            },
            &[],
            &mut events,
        ) else {
            panic!("{events:?}")
        };
        assert_eq!(r.id, 3, "ids go on after the migrated ones");
    }

    #[test]
    fn a_format_2_state_loads_with_no_drains_releases_or_directory() {
        // Format 2 is format 3's core alone.
        let body = &FORMAT_3[1..];
        let (_, used) = bincode::serde::decode_from_slice::<CoreV3, _>(body, bincode::config::standard()).unwrap();
        let mut v2 = vec![2u8];
        v2.extend(&body[..used]);
        let old = decode(&v2).unwrap();
        let new = decode(FORMAT_3).unwrap();
        assert!(!old.is_draining(ServerId(3)) && old.releases().is_empty() && old.directory_len() == 0);
        assert_eq!((old.assignments(), old.transfers()), (new.assignments(), new.transfers()));
    }

    #[test]
    fn a_format_4_state_loads_without_schemas_and_format_5_keeps_them() {
        use shared::component::SchemaEntry;
        let mut s = decode(FORMAT_3).unwrap();
        let schema = Schema(vec![SchemaEntry { id: 1003, name: "banner".into(), version: 2 }]);
        s.schemas.insert(ServerId(2), schema.clone());
        // Format 4 was the state alone (what serialising the state writes).
        let mut v4 = vec![4u8];
        v4.extend(bincode::serde::encode_to_vec(&s, bincode::config::standard()).unwrap());
        let old = decode(&v4).unwrap();
        assert!(old.schema_of(ServerId(2)).is_none(), "format 4 held no schemas");
        assert_eq!(old.servers(), s.servers());
        let again = decode(&encode(&s)).unwrap();
        assert_eq!(again.schema_of(ServerId(2)), Some(&schema));
        assert_eq!(again, s);
    }

    #[test]
    fn formats_it_does_not_know_are_refused_clearly() {
        let mut newer = encode(&decode(FORMAT_3).unwrap());
        newer[0] = FORMAT + 1;
        assert_eq!(decode(&newer).unwrap_err(), "snapshot format 6 is unknown to this build (it reads 2 to 5)");
        assert!(decode(&[1, 0]).unwrap_err().contains("before Raft"));
        assert_eq!(decode(&[]).unwrap_err(), "empty snapshot");
        let mut trailing = encode(&decode(FORMAT_3).unwrap());
        trailing.push(0);
        assert!(decode(&trailing).unwrap_err().contains("trailing"));
        let mut truncated = FORMAT_3.to_vec();
        truncated.truncate(FORMAT_3.len() - 3);
        assert!(decode(&truncated).is_err());
    }
}
