//! The gRPC face of the coordinator (port 9090): what game servers call.

use std::sync::Arc;

use proto::mesh as pb;
use proto::mesh::mesh_coordinator_server::MeshCoordinator;
use shared::{EntityId, Epoch, ServerId};
use tonic::{Request, Response, Status};

use crate::auth::Auth;
use crate::convert::{addresses_from_pb, addresses_to_pb, key_from_pb, load_from_pb, map_to_pb};
use crate::node::{Node, now_nanos};
use crate::state::{Command, CommandError, Response as SmResponse, TransferRequest};

#[derive(Debug, Clone)]
pub struct CoordinatorGrpc {
    node: Arc<Node>,
    auth: Arc<Auth>,
    /// The public keys game servers accept tickets from.
    ticket_keys: Vec<[u8; 32]>,
    cluster: String,
}

impl CoordinatorGrpc {
    /// `auth` signs tickets; `cluster`: the mesh's name in shared storage.
    pub fn new(node: Arc<Node>, auth: Arc<Auth>, cluster: String) -> Self {
        let ticket_keys = vec![auth.public_key()];
        Self { node, auth, ticket_keys, cluster }
    }

    fn refuse(&self, reason: &'static str, msg: impl std::fmt::Display) -> Status {
        self.node.metrics.refused.with_label_values(&[reason]).inc();
        Status::invalid_argument(format!("{reason}: {msg}"))
    }
}

/// Maps a refused command to a gRPC status whose message starts with the
/// stable reason, so callers can tell fencing from other failures.
pub fn status_of(e: CommandError) -> Status {
    let msg = format!("{}: {e}", e.reason());
    let refusal = pb::Refusal { code: refusal_code(&e) as i32, detail: e.to_string() };
    let details = bytes::Bytes::from(prost::Message::encode_to_vec(&refusal));
    let status = match e {
        CommandError::UnknownServer(_) | CommandError::UnknownTransfer(_) => Status::not_found(msg),
        CommandError::UnknownRegion(_) | CommandError::BadThresholds(_) | CommandError::TooSmall(_) => {
            Status::invalid_argument(msg)
        }
        CommandError::ServerIdsExhausted | CommandError::DirectoryFull | CommandError::TooManyTransfers(_) => {
            Status::resource_exhausted(msg)
        }
        CommandError::NoOwner(_) | CommandError::NotBootstrapped | CommandError::Unavailable(_) => {
            Status::unavailable(msg)
        }
        CommandError::Fenced(_)
        | CommandError::StaleRegionEpoch { .. }
        | CommandError::StaleEntityEpoch { .. }
        | CommandError::SameServer(_)
        | CommandError::Draining(_)
        | CommandError::LastServer(_)
        | CommandError::NotMergeable(..)
        | CommandError::SchemaMismatch { .. } => Status::failed_precondition(msg),
    };
    Status::with_details(status.code(), status.message(), details)
}

/// The typed code of a refusal on the wire.
fn refusal_code(e: &CommandError) -> pb::RefusalCode {
    use pb::RefusalCode as C;
    match e {
        CommandError::UnknownServer(_) => C::UnknownServer,
        CommandError::Fenced(_) => C::Fenced,
        CommandError::ServerIdsExhausted | CommandError::DirectoryFull | CommandError::TooManyTransfers(_) => {
            C::Exhausted
        }
        CommandError::StaleRegionEpoch { .. } => C::StaleRegionEpoch,
        CommandError::StaleEntityEpoch { .. } => C::StaleEntityEpoch,
        CommandError::UnknownRegion(_) => C::UnknownRegion,
        CommandError::NoOwner(_) => C::NoOwner,
        CommandError::SameServer(_) => C::SameServer,
        CommandError::UnknownTransfer(_) => C::UnknownTransfer,
        CommandError::BadThresholds(_) => C::BadThresholds,
        CommandError::NotBootstrapped | CommandError::Unavailable(_) => C::NotCommitted,
        CommandError::Draining(_) => C::Draining,
        CommandError::LastServer(_) => C::LastServer,
        CommandError::TooSmall(_) => C::TooSmall,
        CommandError::NotMergeable(..) => C::NotMergeable,
        CommandError::SchemaMismatch { .. } => C::SchemaMismatch,
    }
}

/// A server's component schema, or an entity's components, as a request
/// carries them (see [`shared::component::Schema::checked`]).
fn components_from_pb(entries: &[pb::ComponentEntry]) -> Result<shared::component::Schema, &'static str> {
    shared::component::Schema::checked(entries.iter().map(|e| (e.id, e.name.as_str(), e.version)))
}

/// The command a registration proposes. A build that sends no schema gets
/// the command it always did: it is not checked, and replicas of the
/// previous release read the entry.
fn register_command(r: pb::RegisterRequest, now: u64) -> Result<Command, &'static str> {
    let schema = components_from_pb(&r.components)?;
    let (name, addresses, cert_sha256, capacity_players, version) =
        (r.name, addresses_from_pb(r.addresses), r.cert_sha256, r.capacity_players, r.version);
    Ok(if schema.0.is_empty() {
        Command::Register { name, addresses, cert_sha256, capacity_players, version, now }
    } else {
        Command::RegisterWithSchema { name, addresses, cert_sha256, capacity_players, version, schema, now }
    })
}

fn unexpected(r: SmResponse) -> Status {
    Status::internal(format!("unexpected state-machine response {r:?}"))
}

#[tonic::async_trait]
impl MeshCoordinator for CoordinatorGrpc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() || r.name.len() > 256 {
            return Err(self.refuse("bad_request", "server name must be 1..=256 bytes"));
        }
        let cmd = register_command(r, now_nanos()).map_err(|e| self.refuse("bad_request", e))?;
        match self.node.propose(cmd).await.map_err(status_of)? {
            SmResponse::Registered { server } => Ok(Response::new(self.node.read(|s| pb::RegisterResponse {
                server_id: server.0,
                mesh_epoch_unix_nanos: s.clock.epoch_unix_nanos,
                tick_hz: s.clock.hz,
                heartbeat_interval_ms: s.policy.heartbeat_interval_ms as u32,
                map: Some(map_to_pb(s)),
                world_seed: s.world_seed,
                ticket_public_keys: self.ticket_keys.iter().map(|k| k.to_vec()).collect(),
                cluster: self.cluster.clone(),
            }))),
            other => Err(unexpected(other)),
        }
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let mut regions = Vec::with_capacity(r.regions.len().min(crate::state::MAX_REPORTED_REGIONS));
        for l in r.regions.iter().take(crate::state::MAX_REPORTED_REGIONS) {
            match key_from_pb(l.region.as_ref()) {
                Ok(k) => regions.push((k, l.players)),
                Err(e) => {
                    let _ = self.refuse("bad_region_key", e);
                }
            }
        }
        let cmd =
            Command::Report { server: ServerId(r.server_id), load: load_from_pb(r.load), regions, now: now_nanos() };
        match self.node.propose(cmd).await.map_err(status_of)? {
            SmResponse::HeartbeatAck { fenced } => Ok(Response::new(self.node.read(|s| {
                pb::HeartbeatResponse {
                    map: (s.map_version() != r.known_map_version).then(|| map_to_pb(s)),
                    fenced,
                    orphans: s
                        .orphans_for(ServerId(r.server_id))
                        .map(|t| pb::OrphanedTransfer {
                            transfer_id: t.id,
                            entity_id: t.entity.0,
                            entity_epoch: t.entity_epoch.0,
                            to_region: Some(crate::convert::key_to_pb(&t.to_region)),
                            to_region_epoch: t.to_region_epoch.0,
                            from_server: t.from.0,
                        })
                        .collect(),
                }
            }))),
            other => Err(unexpected(other)),
        }
    }

    async fn get_region_map(&self, _req: Request<pb::GetRegionMapRequest>) -> Result<Response<pb::RegionMap>, Status> {
        Ok(Response::new(self.node.read(map_to_pb)))
    }

    async fn request_transfer(
        &self,
        req: Request<pb::TransferRequest>,
    ) -> Result<Response<pb::TransferResponse>, Status> {
        let r = req.into_inner();
        let from_region = key_from_pb(r.from_region.as_ref()).map_err(|e| self.refuse("bad_region_key", e))?;
        let to_region = key_from_pb(r.to_region.as_ref()).map_err(|e| self.refuse("bad_region_key", e))?;
        let components = components_from_pb(&r.components).map_err(|e| self.refuse("bad_request", e))?;
        let request = TransferRequest {
            entity: EntityId(r.entity_id),
            from: ServerId(r.from_server),
            from_region,
            from_region_epoch: Epoch(r.from_region_epoch),
            entity_epoch: Epoch(r.entity_epoch),
            to_region,
            not_before_tick: r.not_before_tick,
            now: now_nanos(),
        };
        // A build that names no components gets the command it always did.
        let cmd = if components.0.is_empty() {
            Command::RequestTransfer(request)
        } else {
            Command::RequestTransferOf { request, components: components.0 }
        };
        match self.node.propose(cmd).await.map_err(status_of)? {
            SmResponse::Transfer(t) => {
                let target = self.node.read(|s| s.server(t.to).cloned());
                let target = target.ok_or_else(|| Status::internal("transfer target vanished"))?;
                Ok(Response::new(pb::TransferResponse {
                    transfer_id: t.id,
                    entity_epoch: t.entity_epoch.0,
                    to_server: t.to.0,
                    to_addresses: Some(addresses_to_pb(&target.addresses)),
                    to_cert_sha256: target.cert_sha256,
                    to_region_epoch: t.to_region_epoch.0,
                    effective_tick: t.effective_tick,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn complete_transfer(
        &self,
        req: Request<pb::CompleteTransferRequest>,
    ) -> Result<Response<pb::CompleteTransferResponse>, Status> {
        let r = req.into_inner();
        let error: String = r.error.chars().take(1024).collect();
        let (transfer_id, from, now) = (r.transfer_id, ServerId(r.from_server), now_nanos());
        let cmd = match (r.reclaim, r.orphan) {
            (true, true) => return Err(self.refuse("bad_request", "reclaim and orphan exclude each other")),
            (true, false) => Command::ReclaimTransfer { transfer_id, from, error, now },
            (false, true) => Command::ResolveOrphan { transfer_id, server: from, adopted: r.delivered, now },
            (false, false) => Command::CompleteTransfer { transfer_id, from, delivered: r.delivered, error, now },
        };
        match self.node.propose(cmd).await.map_err(status_of)? {
            SmResponse::Reclaimed { entity_epoch } => {
                Ok(Response::new(pb::CompleteTransferResponse { reclaimed: true, entity_epoch: entity_epoch.0 }))
            }
            SmResponse::Done => Ok(Response::new(pb::CompleteTransferResponse::default())),
            other => Err(unexpected(other)),
        }
    }

    async fn presence(&self, req: Request<pb::PresenceRequest>) -> Result<Response<pb::PresenceResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::Presence {
            server: ServerId(r.server_id),
            player: shared::PlayerId(r.player_id),
            entity: EntityId(r.entity_id),
            online: r.online,
            now: now_nanos(),
        };
        self.node.propose(cmd).await.map_err(status_of)?;
        Ok(Response::new(pb::PresenceResponse {}))
    }

    async fn standby_ticket(
        &self,
        req: Request<pb::StandbyTicketRequest>,
    ) -> Result<Response<pb::StandbyTicketResponse>, Status> {
        let r = req.into_inner();
        let (from, to, player) = (ServerId(r.server_id), ServerId(r.to_server_id), shared::PlayerId(r.player_id));
        if r.name.is_empty() || r.name.len() > 64 {
            return Err(self.refuse("bad_request", "a player name is 1..=64 bytes"));
        }
        // Only for a player the caller holds, to join another live server:
        // a game server cannot mint itself tickets for players elsewhere.
        let checked = self.node.read(|s| {
            let live = |id: ServerId| s.server(id).is_some_and(|rec| rec.alive);
            if !live(from) {
                return Err(("unknown_server", format!("server {from} is not a live server")));
            }
            if from == to || !live(to) {
                return Err(("unknown_server", format!("server {to} is not another live server")));
            }
            match s.player_location(player) {
                Some(at) if at.server == from || at.server == to => Ok(()),
                Some(at) => Err(("not_yours", format!("player {player} is on server {}", at.server))),
                None => Err(("not_yours", format!("player {player} is not in the directory"))),
            }
        });
        if let Err((reason, msg)) = checked {
            self.node.metrics.auth.with_label_values(&[reason]).inc();
            return Err(match reason {
                "not_yours" => Status::failed_precondition(format!("{reason}: {msg}")),
                _ => Status::not_found(format!("{reason}: {msg}")),
            });
        }
        let (ticket, expires_unix_ms) = self.auth.ticket(player, &r.name, to, shared::wire::JoinRole::Standby, None);
        self.node.metrics.auth.with_label_values(&["hint_ticket"]).inc();
        Ok(Response::new(pb::StandbyTicketResponse { ticket, expires_unix_ms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_without_components_proposes_the_previous_releases_command() {
        let r = |components| pb::RegisterRequest { name: "gs".into(), components, ..Default::default() };
        assert!(matches!(register_command(r(Vec::new()), 1), Ok(Command::Register { .. })));
        let entry = |id| pb::ComponentEntry { id, name: format!("c{id}"), version: 1 };
        let Ok(Command::RegisterWithSchema { schema, .. }) = register_command(r(vec![entry(1), entry(3)]), 1) else {
            panic!("a schema is registered")
        };
        assert_eq!(schema.0.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(register_command(r(vec![entry(3), entry(1)]), 1).err(), Some("component ids not ascending"));
    }
}
