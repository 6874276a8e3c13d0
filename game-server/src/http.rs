//! HTTP on 8080 (`/health`, `/ready`, `/v1/status`, and for admins
//! `/v1/props`, `/v1/chunks/…`, `/v1/positions`), metrics on 8081, and the
//! query port 7778.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shared::{ServerId, TickClock};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sim::core::LoadShared;
use crate::sim::messages::MapView;

/// What the local endpoints report.
#[derive(Debug, Clone)]
pub struct LocalState {
    pub name: String,
    pub server: ServerId,
    pub clock: TickClock,
    pub capacity: u32,
    pub load: Arc<LoadShared>,
    pub maps: watch::Receiver<Arc<MapView>>,
    /// The simulation's inbox, for admin commands.
    pub sim: tokio::sync::mpsc::Sender<crate::sim::messages::SimIn>,
    pub admin_token: Option<Arc<str>>,
    /// The admin map's position-feed token (`GET /v1/positions`).
    pub feed_token: Option<Arc<str>>,
}

/// The status document of `/v1/status` and of the query port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub server_id: u32,
    pub version: String,
    pub players: u32,
    pub capacity: u32,
    pub entities: u32,
    pub tick: u64,
    pub regions: Vec<String>,
}

impl LocalState {
    pub fn status(&self) -> Status {
        let map = self.maps.borrow();
        let mut regions: Vec<String> =
            map.owners.iter().filter(|(_, (o, _))| *o == Some(self.server)).map(|(k, _)| k.to_string()).collect();
        regions.sort();
        Status {
            name: self.name.clone(),
            server_id: self.server.0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            players: self.load.players.load(Ordering::Relaxed),
            capacity: self.capacity,
            entities: self.load.entities.load(Ordering::Relaxed),
            tick: self.load.tick.load(Ordering::Relaxed),
            regions,
        }
    }

    /// Ready: the tick thread has run a tick within the last second.
    pub fn ready(&self) -> bool {
        let current = self.clock.tick_at(svc::unix_nanos());
        let last = self.load.tick.load(Ordering::Relaxed);
        last > 0 && current.saturating_sub(last) <= u64::from(self.clock.hz)
    }
}

pub fn router(state: LocalState) -> Router {
    svc::http::with_json_fallbacks(
        Router::new()
            .route("/health", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .route("/v1/status", get(|State(s): State<LocalState>| async move { Json(s.status()) }))
            .route("/v1/props", axum::routing::post(spawn_props))
            .route("/v1/chunks/{x}/{y}/{z}", get(inspect_chunk))
            .route("/v1/positions", get(positions))
            .with_state(state),
    )
}

/// Body of `POST /v1/props`.
#[derive(Debug, Deserialize)]
pub struct SpawnPropsRequest {
    pub props: Vec<crate::sim::messages::PropSpawn>,
}

/// A refusal (`svc::http::ErrorView`): `bad_request`, `unauthorized`,
/// `forbidden` (no admin token configured), `invalid_props`, `busy` (the
/// simulation's inbox is full), `unavailable` (the simulation stopped),
/// `no_route`, `method_not_allowed`.
fn error(status: StatusCode, label: &str, detail: &str) -> Response {
    svc::http::refusal(status, label, detail)
}

/// Spawns props (admin): all of them or none. Answers the new entity ids.
async fn spawn_props(
    State(s): State<LocalState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<SpawnPropsRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(refused) = admin_refusal(&s, &headers) {
        return refused;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()),
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    let msg = crate::sim::messages::SimIn::SpawnProps { props: req.props, reply };
    if s.sim.send_timeout(msg, std::time::Duration::from_secs(2)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", "the simulation is busy");
    }
    match rx.await {
        Ok(Ok(ids)) => Json(serde_json::json!({ "ids": ids.iter().map(|i| i.0).collect::<Vec<_>>() })).into_response(),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_props", &e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the simulation stopped"),
    }
}

/// Most entities one `GET /v1/positions` answers.
pub const MAX_POSITIONS: usize = 5_000;

#[derive(Debug, Deserialize)]
struct PositionsQuery {
    max: Option<usize>,
}

/// Where the entities this server owns are, for the coordinator's admin
/// map: a sample of at most `?max=` (default 1000, at most
/// [`MAX_POSITIONS`], larger is refused) and how many there are in all.
/// Needs the feed token (`--map-feed-token`, what the coordinator
/// presents) or the admin token; 403 when neither is set.
async fn positions(
    State(s): State<LocalState>,
    headers: axum::http::HeaderMap,
    svc::http::ApiQuery(q): svc::http::ApiQuery<PositionsQuery>,
) -> Response {
    let presented = bearer(&headers);
    let admitted = [&s.feed_token, &s.admin_token]
        .into_iter()
        .flatten()
        .any(|t| presented.is_some_and(|p| svc::constant_time_eq(p.as_bytes(), t.as_bytes())));
    if !admitted {
        return if s.feed_token.is_none() && s.admin_token.is_none() {
            error(StatusCode::FORBIDDEN, "forbidden", "the position feed is off: set PS_MAP_FEED_TOKEN")
        } else {
            error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token")
        };
    }
    let max = q.max.unwrap_or(1000);
    if !(1..=MAX_POSITIONS).contains(&max) {
        return error(StatusCode::BAD_REQUEST, "bad_request", &format!("max is 1 to {MAX_POSITIONS}, not {max}"));
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    let msg = crate::sim::messages::SimIn::Positions { max, reply };
    if s.sim.send_timeout(msg, std::time::Duration::from_secs(1)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", "the simulation is busy");
    }
    match rx.await {
        Ok(p) => Json(p).into_response(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the simulation stopped"),
    }
}

/// Checks the admin bearer token: `Some(refusal)` when it does not pass.
fn admin_refusal(s: &LocalState, headers: &axum::http::HeaderMap) -> Option<Response> {
    let Some(expected) = &s.admin_token else {
        return Some(error(StatusCode::FORBIDDEN, "forbidden", "the admin API is disabled: set PS_ADMIN_TOKEN"));
    };
    let presented = bearer(headers);
    if !presented.is_some_and(|p| svc::constant_time_eq(p.as_bytes(), expected.as_bytes())) {
        return Some(error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token"));
    }
    None
}

/// What the server holds of one chunk (admin): whether it is loaded, a
/// SHA-256 of its voxels (one material byte per voxel, x fastest), and how
/// many edits of it are not yet durable. Equal digests, equal chunks.
async fn inspect_chunk(
    State(s): State<LocalState>,
    headers: axum::http::HeaderMap,
    svc::http::ApiPath((x, y, z)): svc::http::ApiPath<(i32, i32, i32)>,
) -> Response {
    if let Some(refused) = admin_refusal(&s, &headers) {
        return refused;
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    let key = shared::chunk::ChunkKey { x, y, z };
    let msg = crate::sim::messages::SimIn::InspectChunk { key, reply };
    if s.sim.send_timeout(msg, std::time::Duration::from_secs(2)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", "the simulation is busy");
    }
    match rx.await {
        Ok(info) => Json(info).into_response(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the simulation stopped"),
    }
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

async fn ready(State(s): State<LocalState>) -> Response {
    if s.ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "tick thread not running\n").into_response()
    }
}

pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
        }),
    )
}

/// The query port: each TCP connection receives one line of JSON (the
/// [`Status`] document) and is closed.
pub async fn serve_query(listener: TcpListener, state: LocalState, stop: CancellationToken) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut sock, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let mut line = serde_json::to_vec(&state.status()).unwrap_or_default();
                    line.push(b'\n');
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sock.write_all(&line)).await;
                    let _ = sock.shutdown().await;
                });
            }
            _ = stop.cancelled() => return,
        }
    }
}
