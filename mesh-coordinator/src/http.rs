//! The coordinator's HTTP API (port 8080): health, metrics and the admin views.
//!
//! Every JSON document here is part of the admin contract (`meshctl` and the
//! tests read it); fields are added, never renamed.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use glam::DVec3;
use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::state::{Addresses, Load, TransferRecord};

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/regions", get(regions))
        .route("/v1/servers", get(servers))
        .route("/v1/transfers", get(transfers))
        .route("/v1/status", get(status))
        .route("/v1/route", get(route))
        .with_state(node)
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegionView {
    /// `L<level>:<x>,<y>,<z>`
    pub region: String,
    pub level: u8,
    pub cell: [i32; 3],
    pub min: [f64; 3],
    pub max: [f64; 3],
    pub server_id: Option<u32>,
    pub server_name: Option<String>,
    pub epoch: u64,
}

async fn regions(State(node): State<Arc<Node>>) -> Json<Vec<RegionView>> {
    Json(node.read(|s| {
        s.assignments()
            .iter()
            .map(|(k, a)| {
                let b = k.aabb();
                RegionView {
                    region: k.to_string(),
                    level: k.level,
                    cell: [k.x, k.y, k.z],
                    min: b.min.to_array(),
                    max: b.max.to_array(),
                    server_id: a.server.map(|id| id.0),
                    server_name: a.server.and_then(|id| s.server(id)).map(|r| r.name.clone()),
                    epoch: a.epoch.0,
                }
            })
            .collect()
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerView {
    pub server_id: u32,
    pub name: String,
    pub alive: bool,
    pub addresses: Addresses,
    pub cert_sha256: String,
    pub version: String,
    pub capacity_players: u32,
    pub load: Load,
    pub regions: Vec<String>,
    pub last_heartbeat_age_ms: u64,
}

async fn servers(State(node): State<Arc<Node>>) -> Json<Vec<ServerView>> {
    let now = crate::node::now_nanos();
    Json(node.read(|s| {
        s.servers()
            .values()
            .map(|r| ServerView {
                server_id: r.id.0,
                name: r.name.clone(),
                alive: r.alive,
                addresses: r.addresses.clone(),
                cert_sha256: r.cert_sha256.clone(),
                version: r.version.clone(),
                capacity_players: r.capacity_players,
                load: r.load,
                regions: s.regions_of(r.id).map(|(k, _)| k.to_string()).collect(),
                last_heartbeat_age_ms: now.saturating_sub(r.last_heartbeat) / 1_000_000,
            })
            .collect()
    }))
}

#[derive(Debug, Deserialize)]
struct TransfersQuery {
    limit: Option<usize>,
}

async fn transfers(State(node): State<Arc<Node>>, Query(q): Query<TransfersQuery>) -> Json<Vec<TransferRecord>> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    Json(node.read(|s| s.transfers().iter().rev().take(limit).cloned().collect()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub ready: bool,
    pub map_version: u64,
    pub servers_alive: usize,
    pub servers_total: usize,
    pub regions: usize,
    pub regions_owned: usize,
    pub players: u64,
    pub transfers_total: u64,
    pub tick_p99_ms_max: f32,
    pub mesh_epoch_unix_nanos: u64,
    pub world_seed: u64,
}

async fn status(State(node): State<Arc<Node>>) -> Json<StatusView> {
    let ready = node.is_ready();
    Json(node.read(|s| {
        let alive: Vec<_> = s.servers().values().filter(|r| r.alive).collect();
        StatusView {
            ready,
            map_version: s.map_version(),
            servers_alive: alive.len(),
            servers_total: s.servers().len(),
            regions: s.assignments().len(),
            regions_owned: s
                .assignments()
                .values()
                .filter(|a| a.server.is_some_and(|id| s.server(id).is_some_and(|r| r.alive)))
                .count(),
            players: alive.iter().map(|r| u64::from(r.load.players)).sum(),
            transfers_total: s.transfers_total(),
            tick_p99_ms_max: alive.iter().map(|r| r.load.tick_p99_ms).fold(0.0, f32::max),
            mesh_epoch_unix_nanos: s.clock.epoch_unix_nanos,
            world_seed: s.world_seed,
        }
    }))
}

#[derive(Debug, Deserialize)]
struct RouteQuery {
    x: f64,
    y: f64,
    z: f64,
}

/// Which live server owns the point: where a client joins the world.
#[derive(Debug, Serialize, Deserialize)]
pub struct RouteView {
    pub region: String,
    pub server_id: u32,
    pub quic: String,
    pub cert_sha256: String,
}

async fn route(State(node): State<Arc<Node>>, Query(q): Query<RouteQuery>) -> Response {
    let p = DVec3::new(q.x, q.y, q.z);
    if !p.is_finite() {
        return (StatusCode::BAD_REQUEST, "coordinates must be finite\n").into_response();
    }
    match node.read(|s| {
        s.owner_at(p).map(|(k, r)| RouteView {
            region: k.to_string(),
            server_id: r.id.0,
            quic: r.addresses.quic.clone(),
            cert_sha256: r.cert_sha256.clone(),
        })
    }) {
        Some(v) => Json(v).into_response(),
        None => (StatusCode::NOT_FOUND, "no live server owns that point\n").into_response(),
    }
}
