//! Conversions between `proto` wire types and domain types, at the gRPC edge.

use proto::mesh as pb;
use shared::region::{MAX_LEVEL, RegionKey};

use crate::state::{Addresses, Assignment, CoordinatorState, Load, ServerRecord};

/// A wire region key that does not name a region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    #[error("region key is missing")]
    Missing,
    #[error("region level {0} is deeper than {MAX_LEVEL}")]
    Level(u32),
}

pub fn key_from_pb(k: Option<&pb::RegionKey>) -> Result<RegionKey, BadKey> {
    let k = k.ok_or(BadKey::Missing)?;
    let level = u8::try_from(k.level).ok().filter(|l| *l <= MAX_LEVEL).ok_or(BadKey::Level(k.level))?;
    Ok(RegionKey::new(level, k.x, k.y, k.z))
}

pub fn key_to_pb(k: &RegionKey) -> pb::RegionKey {
    pb::RegionKey { level: u32::from(k.level), x: k.x, y: k.y, z: k.z }
}

pub fn addresses_from_pb(a: Option<pb::ServerAddresses>) -> Addresses {
    let a = a.unwrap_or_default();
    Addresses { quic: a.quic, grpc: a.grpc, http: a.http, metrics: a.metrics, query: a.query }
}

pub fn addresses_to_pb(a: &Addresses) -> pb::ServerAddresses {
    pb::ServerAddresses {
        quic: a.quic.clone(),
        grpc: a.grpc.clone(),
        http: a.http.clone(),
        metrics: a.metrics.clone(),
        query: a.query.clone(),
    }
}

pub fn load_from_pb(l: Option<pb::Load>) -> Load {
    let l = l.unwrap_or_default();
    let finite = |v: f32| if v.is_finite() { v.max(0.0) } else { 0.0 };
    Load {
        players: l.players,
        entities: l.entities,
        cpu: finite(l.cpu),
        tick_p99_ms: finite(l.tick_p99_ms),
        ticks_overrun: l.ticks_overrun,
    }
}

pub fn load_to_pb(l: &Load) -> pb::Load {
    pb::Load {
        players: l.players,
        entities: l.entities,
        cpu: l.cpu,
        tick_p99_ms: l.tick_p99_ms,
        ticks_overrun: l.ticks_overrun,
    }
}

fn assignment_to_pb(k: &RegionKey, a: &Assignment) -> pb::RegionAssignment {
    pb::RegionAssignment { region: Some(key_to_pb(k)), server_id: a.server.map_or(0, |s| s.0), epoch: a.epoch.0 }
}

fn server_to_pb(s: &ServerRecord) -> pb::ServerInfo {
    pb::ServerInfo {
        server_id: s.id.0,
        name: s.name.clone(),
        addresses: Some(addresses_to_pb(&s.addresses)),
        cert_sha256: s.cert_sha256.clone(),
        alive: s.alive,
        load: Some(load_to_pb(&s.load)),
    }
}

pub fn map_to_pb(s: &CoordinatorState) -> pb::RegionMap {
    pb::RegionMap {
        version: s.map_version(),
        assignments: s.assignments().iter().map(|(k, a)| assignment_to_pb(k, a)).collect(),
        servers: s.servers().values().map(server_to_pb).collect(),
        mesh_epoch_unix_nanos: s.clock.epoch_unix_nanos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_levels_are_refused() {
        let k = RegionKey::new(2, -4, 0, 9);
        assert_eq!(key_from_pb(Some(&key_to_pb(&k))), Ok(k));
        assert_eq!(key_from_pb(None), Err(BadKey::Missing));
        let deep = pb::RegionKey { level: 3, x: 0, y: 0, z: 0 };
        assert_eq!(key_from_pb(Some(&deep)), Err(BadKey::Level(3)));
        let huge = pb::RegionKey { level: 300, x: 0, y: 0, z: 0 };
        assert_eq!(key_from_pb(Some(&huge)), Err(BadKey::Level(300)));
    }

    #[test]
    fn non_finite_load_is_zeroed() {
        let l = load_from_pb(Some(pb::Load { cpu: f32::NAN, tick_p99_ms: -3.0, ..Default::default() }));
        assert_eq!((l.cpu, l.tick_p99_ms), (0.0, 0.0));
    }
}
