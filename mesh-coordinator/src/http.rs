//! The coordinator's HTTP API (port 8080): health, metrics and the admin views.
//!
//! Every JSON document here is part of the admin contract (`meshctl` and the
//! tests read it); fields are added, never renamed.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use glam::DVec3;
use serde::{Deserialize, Serialize};
pub use svc::http::{ApiPath, ApiQuery, with_json_fallbacks};

use shared::ids::{PlayerId, ServerId};
use shared::wire::JoinRole;

use crate::auth::{Auth, AuthError};
use crate::node::{Node, now_nanos};
use crate::state::{Addresses, AuditRecord, Command, CommandError, Load, Thresholds, TransferRecord};

/// Probes, metrics, the OpenAPI document and `/v1/route` (open), and the
/// admin views (`/v1/regions`, `/v1/servers`, `/v1/transfers`,
/// `/v1/status`: viewer or operator token when a viewer token is set).
pub fn router(node: Arc<Node>, access: ViewAccess) -> Router {
    let views = Router::new()
        .route("/v1/regions", get(regions))
        .route("/v1/servers", get(servers))
        .route("/v1/transfers", get(transfers))
        .route("/v1/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(access, require_viewer))
        .with_state(node.clone());
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/route", get(route))
        .route("/openapi.json", get(openapi))
        .with_state(node)
        .merge(views)
}

/// Most records one read of `/v1/transfers` or `/v1/audit` returns; a
/// larger `limit` is refused (400), as the document says.
pub const MAX_LIMIT: usize = 10_000;

/// `?limit=` of the logs: `default` when absent, refused above [`MAX_LIMIT`]
/// (400 `bad_request`).
fn limit(given: Option<usize>, default: usize) -> Result<usize, Box<Response>> {
    match given {
        Some(n) if n > MAX_LIMIT => {
            Err(Box::new(err(StatusCode::BAD_REQUEST, "bad_request", &format!("limit is 0 to {MAX_LIMIT}, not {n}"))))
        }
        n => Ok(n.unwrap_or(default)),
    }
}

/// The admin API as an OpenAPI 3.1 document.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Who may read the admin views: anyone when no viewer token is set
/// (development), else the bearer of the viewer or of the operator token.
/// Writes need the operator token in every case.
#[derive(Debug, Clone, Default)]
pub struct ViewAccess {
    pub viewer: Option<Arc<String>>,
    pub operator: Option<Arc<String>>,
}

impl ViewAccess {
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(viewer) = &self.viewer else { return true };
        let given = bearer(headers).unwrap_or_default().as_bytes();
        svc::constant_time_eq(given, viewer.as_bytes())
            || self.operator.as_ref().is_some_and(|o| svc::constant_time_eq(given, o.as_bytes()))
    }
}

async fn require_viewer(
    State(access): State<ViewAccess>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if access.admits(&headers) {
        next.run(req).await
    } else {
        err(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer viewer or operator token is required")
    }
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.read(|s| crate::node::refresh_load_gauges(&node.metrics, s));
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
    Json(node.read(region_views))
}

fn region_views(s: &crate::state::CoordinatorState) -> Vec<RegionView> {
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
    /// Drained by an operator: takes no regions.
    #[serde(default)]
    pub draining: bool,
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
                draining: s.is_draining(r.id),
            })
            .collect()
    }))
}

#[derive(Debug, Deserialize)]
struct TransfersQuery {
    limit: Option<usize>,
}

async fn transfers(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<TransfersQuery>) -> Response {
    let limit = match limit(q.limit, 100) {
        Ok(n) => n,
        Err(refusal) => return *refusal,
    };
    Json(node.read(|s| s.transfers().newest(limit).into_iter().cloned().collect::<Vec<TransferRecord>>()))
        .into_response()
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
    /// Raft as the answering replica sees it.
    #[serde(default)]
    pub raft: RaftView,
    /// Game servers the mesh should run for its players (for the autoscaler).
    #[serde(default)]
    pub desired_game_servers: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RaftView {
    pub id: u64,
    /// `leader`, `follower`, `candidate` or `pre_candidate`.
    pub role: String,
    /// 0: no leader known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
}

async fn status(State(node): State<Arc<Node>>) -> Json<StatusView> {
    let ready = node.is_ready();
    let r = node.raft_status();
    let raft = RaftView {
        id: r.id,
        role: r.role.to_owned(),
        leader: r.leader,
        term: r.term,
        commit: r.commit,
        applied: r.applied,
    };
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
            raft,
            desired_game_servers: s.desired_game_servers(),
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

async fn route(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<RouteQuery>) -> Response {
    let p = DVec3::new(q.x, q.y, q.z);
    if !p.is_finite() {
        return err(StatusCode::BAD_REQUEST, "bad_request", "coordinates must be finite");
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
        None => err(StatusCode::NOT_FOUND, "no_owner", &format!("no live server owns {p}")),
    }
}

// ---- players ----

/// `GET /v1/players` (players per live server and region, as the servers
/// last reported them) and `GET /v1/players/{id}` (where the directory says
/// one player is); viewer or operator token when a viewer token is set.
pub fn players_router(node: Arc<Node>, auth: Arc<Auth>, access: ViewAccess) -> Router {
    Router::new()
        .route("/v1/players", get(players))
        .route("/v1/players/{id}", get(player))
        .route_layer(axum::middleware::from_fn_with_state(access, require_viewer))
        .with_state((node, auth))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegionPlayers {
    pub region: String,
    pub players: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerPlayers {
    pub server_id: u32,
    pub name: String,
    pub players: u32,
    pub regions: Vec<RegionPlayers>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlayersView {
    pub total: u64,
    /// Players in the replicated directory (joined and not yet left).
    pub directory: u64,
    pub servers: Vec<ServerPlayers>,
}

async fn players(State((node, _)): State<AuthState>) -> Json<PlayersView> {
    Json(node.read(|s| {
        let servers: Vec<ServerPlayers> = s
            .servers()
            .values()
            .filter(|r| r.alive)
            .map(|r| ServerPlayers {
                server_id: r.id.0,
                name: r.name.clone(),
                players: r.load.players,
                regions: s
                    .region_players(r.id)
                    .iter()
                    .map(|(k, n)| RegionPlayers { region: k.to_string(), players: *n })
                    .collect(),
            })
            .collect();
        PlayersView {
            total: servers.iter().map(|x| u64::from(x.players)).sum(),
            directory: s.directory_len() as u64,
            servers,
        }
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlayerView {
    pub player: u64,
    pub server_id: u32,
    pub server_name: Option<String>,
}

async fn player(State((node, auth)): State<AuthState>, ApiPath(id): ApiPath<u64>) -> Response {
    // The replicated directory; Redis's (kept by the game servers' QUIC
    // front ends) for players it does not know.
    let replicated = node.read(|s| s.player_location(PlayerId(id)).map(|l| l.server));
    let server = match replicated {
        Some(s) => Some(s),
        None => auth.directory(PlayerId(id)).await,
    };
    match server {
        Some(server) => Json(PlayerView {
            player: id,
            server_id: server.0,
            server_name: node.read(|s| s.server(server).map(|r| r.name.clone())),
        })
        .into_response(),
        None => err(StatusCode::NOT_FOUND, "unknown_player", &format!("the directory has no server for player {id}")),
    }
}

// ---- accounts, logins, tickets ----

type AuthState = (Arc<Node>, Arc<Auth>);

/// `POST /v1/accounts`, `/v1/login`, `/v1/tickets`, `/v1/logout`.
pub fn auth_router(node: Arc<Node>, auth: Arc<Auth>) -> Router {
    Router::new()
        .route("/v1/accounts", post(create_account))
        .route("/v1/login", post(login))
        .route("/v1/tickets", post(ticket))
        .route("/v1/logout", post(logout))
        .route("/v1/leaderboards/{board}", get(leaderboard))
        .with_state((node, auth))
}

/// The mesh's operating knobs: `GET /v1/thresholds` (anyone who can read
/// the admin views) and `PUT /v1/thresholds` (bearer admin token), committed
/// through Raft.
pub fn ops_router(node: Arc<Node>, admin_token: Option<String>, access: ViewAccess) -> Router {
    Router::new()
        .route("/v1/thresholds", get(get_thresholds).put(put_thresholds))
        .route("/v1/audit", get(audit))
        .route("/v1/regions/{region}/split", post(split_region))
        .route("/v1/regions/{region}/merge", post(merge_region))
        .route("/v1/regions/{region}/move", post(move_region))
        .route("/v1/servers/{id}/drain", post(drain_server))
        .route("/v1/servers/{id}/undrain", post(undrain_server))
        .route_layer(axum::middleware::from_fn_with_state(access, require_viewer))
        .with_state((node, admin_token.map(Arc::new)))
}

/// Parses the `{region}` path segment, then proposes `make(region)`.
async fn region_op(
    node: &Node,
    token: Option<&String>,
    headers: &HeaderMap,
    raw: &str,
    make: impl FnOnce(shared::RegionKey) -> Command,
) -> Response {
    match raw.parse() {
        Ok(region) => operate(node, token, headers, make(region)).await,
        Err(e) => {
            err(StatusCode::BAD_REQUEST, "bad_region", &format!("{raw:?} is not a region key like L0:1,0,0 ({e})"))
        }
    }
}

/// Proposes an operator command; answers with the region map as committed.
async fn operate(node: &Node, token: Option<&String>, headers: &HeaderMap, cmd: Command) -> Response {
    if let Some(refusal) = admin_refusal(token, headers) {
        return refusal;
    }
    match node.propose(cmd).await {
        Ok(_) => Json(node.read(region_views)).into_response(),
        Err(e) => command_error(&e),
    }
}

/// `POST /v1/regions/{region}/split`: the 8 children stay with the owner.
async fn split_region(
    State((node, token)): State<OpsState>,
    ApiPath(region): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    region_op(&node, token.as_deref(), &headers, &region, |region| Command::SplitRegion { region, now: now_nanos() })
        .await
}

/// `POST /v1/regions/{parent}/merge`: its 8 leaf children become one region.
async fn merge_region(
    State((node, token)): State<OpsState>,
    ApiPath(region): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    region_op(&node, token.as_deref(), &headers, &region, |region| Command::MergeRegion { region, now: now_nanos() })
        .await
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The server id to move the region to.
    pub to: u32,
}

/// `POST /v1/regions/{region}/move` with `{"to": <server id>}`.
async fn move_region(
    State((node, token)): State<OpsState>,
    ApiPath(region): ApiPath<String>,
    headers: HeaderMap,
    b: Result<Json<MoveRequest>, JsonRejection>,
) -> Response {
    if let Some(refusal) = admin_refusal(token.as_deref(), &headers) {
        return refusal;
    }
    let to = match b {
        Ok(Json(m)) => ServerId(m.to),
        Err(e) => return err(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()),
    };
    region_op(&node, token.as_deref(), &headers, &region, |region| Command::MoveRegion { region, to, now: now_nanos() })
        .await
}

/// `POST /v1/servers/{id}/drain`: its regions go to other servers (their
/// players are handed over, not dropped) and it gets no more.
async fn drain_server(
    State((node, token)): State<OpsState>,
    ApiPath(id): ApiPath<u32>,
    headers: HeaderMap,
) -> Response {
    let cmd = Command::Drain { server: ServerId(id), undo: false, now: now_nanos() };
    operate(&node, token.as_deref(), &headers, cmd).await
}

/// `POST /v1/servers/{id}/undrain`: the server takes regions again.
async fn undrain_server(
    State((node, token)): State<OpsState>,
    ApiPath(id): ApiPath<u32>,
    headers: HeaderMap,
) -> Response {
    let cmd = Command::Drain { server: ServerId(id), undo: true, now: now_nanos() };
    operate(&node, token.as_deref(), &headers, cmd).await
}

type OpsState = (Arc<Node>, Option<Arc<String>>);

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

/// Operator writes, newest first (`?limit=`, default 100; the log keeps
/// the newest `AUDIT_LOG_LEN`).
async fn audit(State((node, _)): State<OpsState>, ApiQuery(q): ApiQuery<AuditQuery>) -> Response {
    let limit = match limit(q.limit, 100) {
        Ok(n) => n,
        Err(refusal) => return *refusal,
    };
    Json(node.read(|s| s.audit_log().iter().rev().take(limit).cloned().collect::<Vec<AuditRecord>>())).into_response()
}

async fn get_thresholds(State((node, _)): State<OpsState>) -> Json<Thresholds> {
    Json(node.read(|s| s.thresholds))
}

/// The bearer admin token check: the refusal to send, if any.
fn admin_refusal(token: Option<&String>, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Some(err(StatusCode::FORBIDDEN, "forbidden", "the admin API is off: start with --admin-token"));
    };
    let given = bearer(headers).ok().unwrap_or_default();
    if !svc::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Some(err(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer admin token is required"));
    }
    None
}

/// A refused or uncommitted command as an HTTP answer.
fn command_error(e: &CommandError) -> Response {
    let status = match e {
        CommandError::Unavailable(_) | CommandError::NotBootstrapped => StatusCode::SERVICE_UNAVAILABLE,
        CommandError::UnknownServer(_) | CommandError::UnknownRegion(_) | CommandError::UnknownTransfer(_) => {
            StatusCode::NOT_FOUND
        }
        CommandError::BadThresholds(_) | CommandError::TooSmall(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::CONFLICT,
    };
    err(status, e.reason(), &e.to_string())
}

async fn put_thresholds(
    State((node, token)): State<OpsState>,
    headers: HeaderMap,
    b: Result<Json<Thresholds>, JsonRejection>,
) -> Response {
    if let Some(refusal) = admin_refusal(token.as_deref(), &headers) {
        return refusal;
    }
    let thresholds = match b {
        Ok(Json(t)) => t,
        Err(e) => return err(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()),
    };
    match node.propose(Command::SetThresholds { thresholds, now: now_nanos() }).await {
        Ok(_) => Json(node.read(|s| s.thresholds)).into_response(),
        Err(e) => command_error(&e),
    }
}

/// `POST /v1/notices` (bearer admin token): a notice to every player.
pub fn admin_router(auth: Arc<Auth>, admin_token: Option<String>) -> Router {
    Router::new().route("/v1/notices", post(notice)).with_state((auth, admin_token.map(Arc::new)))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NoticeRequest {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NoticeView {
    /// Game servers that received it; 0 when Redis is down (not delivered).
    pub servers: u64,
    pub delivered: bool,
}

async fn notice(
    State((auth, token)): State<(Arc<Auth>, Option<Arc<String>>)>,
    headers: HeaderMap,
    b: Result<Json<NoticeRequest>, JsonRejection>,
) -> Response {
    if let Some(refusal) = admin_refusal(token.as_deref(), &headers) {
        return refusal;
    }
    let text = match b {
        Ok(Json(n)) => n.text,
        Err(e) => return err(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()),
    };
    if !shared::wire::is_relayable_text(&text) {
        return err(StatusCode::BAD_REQUEST, "bad_request", "a notice is 1 to 256 bytes without control characters");
    }
    let sent = auth.cache.publish(&persistence::cache::WorldEvent::Notice { text }).await;
    if sent.is_none() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Redis is down: the notice was not delivered");
    }
    Json(NoticeView { servers: sent.unwrap_or(0), delivered: true }).into_response()
}

#[derive(Debug, Deserialize)]
struct BoardQuery {
    n: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BoardEntry {
    pub player: u64,
    pub score: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BoardView {
    pub board: String,
    pub entries: Vec<BoardEntry>,
    /// Leaderboards live in Redis: while it is down they read empty.
    pub degraded: bool,
}

async fn leaderboard(
    State((_node, auth)): State<AuthState>,
    ApiPath(board): ApiPath<String>,
    ApiQuery(q): ApiQuery<BoardQuery>,
) -> Response {
    if board.is_empty() || board.len() > 64 || !board.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return err(StatusCode::BAD_REQUEST, "bad_request", "a board name is 1 to 64 of A-Z a-z 0-9 _");
    }
    let n = q.n.unwrap_or(10).clamp(1, 1000);
    let before = auth.cache.stats.degraded(persistence::cache::Op::Leaderboard);
    match auth.cache.top(&board, n).await {
        Ok(top) => Json(BoardView {
            board,
            entries: top.into_iter().map(|(player, score)| BoardEntry { player, score }).collect(),
            degraded: auth.cache.stats.degraded(persistence::cache::Op::Leaderboard) > before,
        })
        .into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string()),
    }
}

/// A refusal (`svc::http::ErrorView`); the labels here: `bad_request`,
/// `bad_credentials`, `bad_session`, `name_taken`, `rate_limited`,
/// `no_server`, `unavailable`, `unauthorized`, `forbidden`,
/// `unknown_player`, `bad_region`, `no_owner`, `no_route`,
/// `method_not_allowed`, or a refused command's reason.
fn err(status: StatusCode, error: &str, detail: &str) -> Response {
    svc::http::refusal(status, error, detail)
}

/// Counts the outcome and answers `Ok` with `status` and its JSON, `Err`
/// with its refusal.
fn reply<T: Serialize>(node: &Node, outcome: &str, status: StatusCode, r: Result<T, AuthError>) -> Response {
    match r {
        Ok(v) => {
            node.metrics.auth.with_label_values(&[outcome]).inc();
            (status, Json(v)).into_response()
        }
        Err(e) => refusal(node, e),
    }
}

fn refusal(node: &Node, e: AuthError) -> Response {
    let status = match &e {
        AuthError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AuthError::BadCredentials | AuthError::BadSession => StatusCode::UNAUTHORIZED,
        AuthError::NameTaken(_) => StatusCode::CONFLICT,
        AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        AuthError::NoServer(_) | AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    node.metrics.auth.with_label_values(&[e.label()]).inc();
    let mut r = err(status, e.label(), &e.to_string());
    if matches!(e, AuthError::RateLimited) {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
    }
    r
}

/// A JSON body, or a `bad_request` naming what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, AuthError> {
    b.map(|Json(v)| v).map_err(|e| AuthError::BadRequest(e.body_text()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccountView {
    pub player: u64,
    pub name: String,
}

async fn create_account(
    State((node, auth)): State<AuthState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    b: Result<Json<Credentials>, JsonRejection>,
) -> Response {
    let r = async {
        let c = body(b)?;
        let a = auth.create_account(&c.name, &c.password, peer.ip()).await?;
        Ok(AccountView { player: a.player.0, name: a.name })
    }
    .await;
    reply(&node, "account_created", StatusCode::CREATED, r)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
    /// Where a player with no saved position starts (inside the world);
    /// ignored once the player has one. Default: the world's spawn point.
    #[serde(default)]
    pub spawn: Option<[f64; 3]>,
}

/// A ticket and where to use it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TicketView {
    /// Present it in the QUIC hello; valid once, until `expires_unix_ms`.
    pub ticket: String,
    pub expires_unix_ms: u64,
    pub role: String,
    pub server_id: u32,
    pub quic: String,
    pub cert_sha256: String,
    /// Where the avatar appears if the server spawns it.
    pub spawn: Option<[f64; 3]>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoginView {
    pub player: u64,
    pub name: String,
    /// Bearer token for `/v1/tickets` and `/v1/logout`.
    pub session: String,
    pub session_expires_unix: u64,
    pub join: TicketView,
}

async fn login(
    State((node, auth)): State<AuthState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    b: Result<Json<LoginRequest>, JsonRejection>,
) -> Response {
    let r = async {
        let req = body(b)?;
        let hint = req.spawn.map(DVec3::from_array);
        let (account, token, session) = auth.login(&req.name, &req.password, peer.ip()).await?;
        let join = place(&node, &auth, account.player, &account.name, JoinRole::Play, None, hint).await?;
        Ok::<_, AuthError>(LoginView {
            player: account.player.0,
            name: account.name,
            session: token,
            session_expires_unix: session.expires_unix,
            join,
        })
    }
    .await;
    reply(&node, "login", StatusCode::OK, r)
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TicketRequest {
    /// `play` (default) or `standby` (a pre-connect to a neighbour).
    #[serde(default)]
    pub role: Option<String>,
    /// The server to join; required for `standby`. Default for `play`: the
    /// owner of the player's saved position.
    #[serde(default)]
    pub server_id: Option<u32>,
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AuthError::BadSession)
}

async fn ticket(
    State((node, auth)): State<AuthState>,
    headers: HeaderMap,
    b: Result<Json<TicketRequest>, JsonRejection>,
) -> Response {
    let r = async {
        let session = auth.session(bearer(&headers)?).await?;
        let req = body(b)?;
        let role = match req.role.as_deref() {
            None | Some("play") => JoinRole::Play,
            Some("standby") => JoinRole::Standby,
            Some(other) => return Err(AuthError::BadRequest(format!("role is play or standby, not {other:?}"))),
        };
        let server = req.server_id.map(ServerId);
        if role == JoinRole::Standby && server.is_none() {
            return Err(AuthError::BadRequest("a standby ticket needs a server_id".into()));
        }
        place(&node, &auth, PlayerId(session.player), &session.account, role, server, None).await
    }
    .await;
    reply(&node, "ticket", StatusCode::OK, r)
}

async fn logout(State((node, auth)): State<AuthState>, headers: HeaderMap) -> Response {
    let r = async { auth.logout(bearer(&headers)?).await }.await;
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refusal(&node, e),
    }
}

/// Chooses the server and spawn point of a ticket and signs it.
///
/// `play`: the player starts at their saved position, else at `hint` (a
/// first login may choose, inside the world), else at the world's spawn
/// point (the middle of its first root region), on the server the directory
/// says holds the avatar, else on the server that owns that point, unless
/// `server` names one. `standby`: `server` is required.
async fn place(
    node: &Node,
    auth: &Auth,
    player: PlayerId,
    name: &str,
    role: JoinRole,
    server: Option<ServerId>,
    hint: Option<DVec3>,
) -> Result<TicketView, AuthError> {
    let spawn = match role {
        JoinRole::Standby => None,
        JoinRole::Play => {
            let saved = auth.saved_position(player).await?;
            let start = match (saved, hint) {
                (Some(p), _) => p,
                (None, Some(h)) => {
                    if !h.is_finite() || node.read(|s| s.tree().leaf_at(h).is_none()) {
                        return Err(AuthError::BadRequest(format!("spawn {h} is outside the world")));
                    }
                    h
                }
                (None, None) => node.read(|s| world_spawn(s.tree())),
            };
            Some(start)
        }
    };
    // Where the avatar is now, if a live server says it holds it: a second
    // login or a reconnect must land on that server (it adopts the avatar),
    // never spawn a second one elsewhere. A stale entry heals itself: the
    // named server refuses a spawn it does not own, and clears the entry
    // when that connection ends.
    let holder = match (role, server) {
        (JoinRole::Play, None) => auth.directory(player).await,
        _ => None,
    };
    let target = node.read(|s| {
        let live = |id: ServerId| s.server(id).filter(|r| r.alive);
        let rec = match (server, spawn) {
            (Some(id), _) => live(id),
            (None, Some(p)) => holder.and_then(live).or_else(|| s.owner_at(p).map(|(_, r)| r)),
            (None, None) => None,
        };
        rec.map(|r| (r.id, r.addresses.quic.clone(), r.cert_sha256.clone()))
    });
    let Some((id, quic, cert_sha256)) = target else {
        return Err(AuthError::NoServer(match (server, spawn) {
            (Some(id), _) => format!("server {}", id.0),
            (None, Some(p)) => format!("{p}"),
            (None, None) => "standby without a server_id".into(),
        }));
    };
    let (ticket, expires_unix_ms) = auth.ticket(player, name, id, role, spawn);
    Ok(TicketView {
        ticket,
        expires_unix_ms,
        role: match role {
            JoinRole::Play => "play",
            JoinRole::Standby => "standby",
        }
        .to_owned(),
        server_id: id.0,
        quic,
        cert_sha256,
        spawn: spawn.map(|p| p.to_array()),
    })
}

/// Where new players start: above the middle of the world's first root.
pub fn world_spawn(tree: &shared::RegionTree) -> DVec3 {
    let root = tree.roots().min().copied();
    root.map_or(DVec3::new(1000.0, 10.0, 1000.0), |r| {
        let b = r.aabb();
        let c = (b.min + b.max) / 2.0;
        DVec3::new(c.x, 10.0, c.z)
    })
}
