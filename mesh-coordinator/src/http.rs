//! The coordinator's HTTP API (port 8080): health, metrics and the admin views.
//!
//! Every JSON document here is part of the admin contract (`meshctl` and the
//! tests read it); fields are added, never renamed.
//!
//! Routes are made only through `utoipa_axum`'s `routes!` from handlers
//! annotated with `#[utoipa::path]`, so the OpenAPI document served at
//! `/openapi.json` ([`document`]) is generated from the handlers and their
//! types, and a route cannot exist without its documented operation.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use glam::DVec3;
use serde::{Deserialize, Serialize};
pub use svc::http::{ApiPath, ApiQuery, ErrorView, with_json_fallbacks};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use shared::ids::{PlayerId, ServerId};
use shared::wire::JoinRole;

use crate::auth::{Auth, AuthError};
use crate::node::{Node, now_nanos};
use crate::state::{Addresses, AuditRecord, Command, CommandError, Load, Thresholds, TransferRecord};

/// The whole HTTP API on one router, with JSON refusals for what no route
/// takes. `admin_token`: the operator token (writes); `access`: who may read
/// the views.
pub fn app(
    node: Arc<Node>,
    auth: Arc<Auth>,
    access: ViewAccess,
    admin_token: Option<String>,
    map: Arc<crate::map::MapHub>,
    feed: bool,
) -> Router {
    let token = admin_token.filter(|t| !t.is_empty()).map(Arc::new);
    let viewer = || axum::middleware::from_fn_with_state(access.clone(), require_viewer);
    let api = open_routes()
        .with_state(node.clone())
        .merge(crate::map::page_routes().with_state((node.clone(), map.clone(), feed)))
        .merge(crate::map::event_routes().route_layer(viewer()).with_state((node.clone(), map, feed)))
        .merge(view_routes().route_layer(viewer()).with_state(node.clone()))
        .merge(auth_routes().with_state((node.clone(), auth.clone())))
        .merge(player_routes().route_layer(viewer()).with_state((node.clone(), auth.clone())))
        .merge(admin_routes().with_state((auth, token.clone())))
        .merge(ops_routes().route_layer(viewer()).with_state((node, token)));
    with_json_fallbacks(api.split_for_parts().0)
}

/// Probes, metrics, the OpenAPI document and `/v1/route`: open to all.
fn open_routes() -> OpenApiRouter<Arc<Node>> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(route))
        .routes(routes!(openapi))
}

/// The admin views: viewer or operator token when a viewer token is set.
fn view_routes() -> OpenApiRouter<Arc<Node>> {
    OpenApiRouter::new()
        .routes(routes!(regions))
        .routes(routes!(servers))
        .routes(routes!(transfers))
        .routes(routes!(status))
}

/// The players' whereabouts: viewer or operator token when one is set.
fn player_routes() -> OpenApiRouter<AuthState> {
    OpenApiRouter::new().routes(routes!(players)).routes(routes!(player))
}

/// Accounts, logins, tickets, leaderboards: for players.
fn auth_routes() -> OpenApiRouter<AuthState> {
    OpenApiRouter::new()
        .routes(routes!(create_account))
        .routes(routes!(login))
        .routes(routes!(ticket))
        .routes(routes!(logout))
        .routes(routes!(leaderboard))
}

/// Notices to every player (operator token).
fn admin_routes() -> OpenApiRouter<(Arc<Auth>, Option<Arc<String>>)> {
    OpenApiRouter::new().routes(routes!(notice))
}

/// The mesh's operating knobs and the operator's actions: read with the
/// viewer or operator token, written with the operator token, committed
/// through Raft.
fn ops_routes() -> OpenApiRouter<OpsState> {
    OpenApiRouter::new()
        .routes(routes!(get_thresholds, put_thresholds))
        .routes(routes!(audit))
        .routes(routes!(split_region))
        .routes(routes!(merge_region))
        .routes(routes!(move_region))
        .routes(routes!(drain_server))
        .routes(routes!(undrain_server))
}

/// The OpenAPI 3.1 document of [`app`], generated from its handlers.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    for part in [
        open_routes().into_openapi(),
        crate::map::page_routes().into_openapi(),
        crate::map::event_routes().into_openapi(),
        view_routes().into_openapi(),
        player_routes().into_openapi(),
        auth_routes().into_openapi(),
        admin_routes().into_openapi(),
        ops_routes().into_openapi(),
    ] {
        doc.merge(part);
    }
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Planetary Survival mesh coordinator",
        version = "1",
        description = "The coordinator's HTTP API (port 8080). Views need the viewer or operator bearer token when \
the coordinator runs with --viewer-token; writes need the operator token (--admin-token). Refusals are \
{\"error\": label, \"detail\": text} with the status each operation lists. Every write is committed through Raft \
on any replica. A path no route has answers 404 no_route; a method a route does not take, 405 \
method_not_allowed; a malformed path, query or body, 400 bad_request."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorView)),
    tags(
        (name = "probes", description = "Liveness, readiness, metrics, this document"),
        (name = "views", description = "The mesh as the coordinator sees it"),
        (name = "players", description = "Accounts, sessions, tickets, leaderboards"),
        (name = "operations", description = "What operators change"),
    )
)]
struct ApiDoc;

/// The bearer tokens: `viewer` (`--viewer-token`), `operator`
/// (`--admin-token`), `session` (from `POST /v1/login`).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("viewer", "--viewer-token / PS_VIEWER_TOKEN"),
            ("operator", "--admin-token / PS_ADMIN_TOKEN"),
            ("session", "a session from POST /v1/login"),
        ] {
            let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(what)).build();
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

/// 401 of the views when a viewer token is set.
#[derive(Debug, utoipa::IntoResponses)]
pub enum ViewRefusals {
    /// Missing or wrong bearer token (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorView),
}

/// What every operator write may be refused with.
#[derive(Debug, utoipa::IntoResponses)]
pub enum WriteRefusals {
    /// Missing or wrong bearer operator token (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorView),
    /// The coordinator runs without `--admin-token` (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorView),
    /// Not committed: no leader, or the log is not bootstrapped
    /// (`unavailable`, `not_bootstrapped`).
    #[response(status = 503)]
    Unavailable(ErrorView),
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

/// This API's OpenAPI 3.1 document, generated from its handlers.
#[utoipa::path(get, path = "/openapi.json", tag = "probes",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi() -> Response {
    static DOC: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| document().to_pretty_json().expect("the document serialises"));
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

/// Alive (the process answers).
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
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

/// Ready: this replica knows a Raft leader.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "`ready`", body = String, content_type = "text/plain"),
    (status = 503, description = "`no leader`", body = String, content_type = "text/plain"),
))]
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response()
    }
}

/// Prometheus metrics (also on the metrics port).
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.read(|s| crate::node::refresh_load_gauges(&node.metrics, s));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

/// One leaf region and who owns it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Region)]
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

/// The leaf regions and their owners.
#[utoipa::path(get, path = "/v1/regions", tag = "views", security(("viewer" = []), ("operator" = [])),
    responses((status = 200, description = "Every leaf region", body = [RegionView]), ViewRefusals))]
async fn regions(State(node): State<Arc<Node>>) -> Json<Vec<RegionView>> {
    Json(node.read(region_views))
}

pub(crate) fn region_views(s: &crate::state::CoordinatorState) -> Vec<RegionView> {
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

/// One game server as its heartbeats left it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Server)]
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
    /// The components its build knows (`name vN`, ascending ids), as it
    /// registered them; absent for a build that sent none. During a rolling
    /// upgrade, an entity carrying a component a server lacks is not
    /// handed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<String>>,
}

/// The registered game servers.
#[utoipa::path(get, path = "/v1/servers", tag = "views", security(("viewer" = []), ("operator" = [])),
    responses((status = 200, description = "Every registered game server", body = [ServerView]), ViewRefusals))]
async fn servers(State(node): State<Arc<Node>>) -> Json<Vec<ServerView>> {
    let now = crate::node::now_nanos();
    Json(node.read(|s| server_views(s, now)))
}

/// Every registered server as `GET /v1/servers` shows it; `now` in Unix ns.
pub(crate) fn server_views(s: &crate::state::CoordinatorState, now: u64) -> Vec<ServerView> {
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
            components: s
                .schema_of(r.id)
                .map(|schema| schema.0.iter().map(|e| format!("{} v{}", e.name, e.version)).collect()),
        })
        .collect()
}

/// `?limit=` of a log read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LimitQuery {
    /// How many records, newest first; above 10000 is refused (400).
    #[param(minimum = 0, maximum = 10_000, default = 100)]
    limit: Option<usize>,
}

/// Authority transfers, newest first.
#[utoipa::path(get, path = "/v1/transfers", tag = "views", params(LimitQuery),
    security(("viewer" = []), ("operator" = [])), responses(
    (status = 200, description = "The newest transfers, newest first", body = [TransferRecord]),
    (status = 400, description = "Malformed query, or a limit above 10000 (`bad_request`)", body = ErrorView),
    ViewRefusals,
))]
async fn transfers(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<LimitQuery>) -> Response {
    let limit = match limit(q.limit, 100) {
        Ok(n) => n,
        Err(refusal) => return *refusal,
    };
    Json(node.read(|s| s.transfers().newest(limit).into_iter().cloned().collect::<Vec<TransferRecord>>()))
        .into_response()
}

/// The mesh in one document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Status)]
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[schema(as = Raft)]
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

/// The mesh at a glance, as this replica sees it.
#[utoipa::path(get, path = "/v1/status", tag = "views", security(("viewer" = []), ("operator" = [])),
    responses((status = 200, description = "The mesh's status", body = StatusView), ViewRefusals))]
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

/// A point of the world, in metres.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RouteQuery {
    x: f64,
    y: f64,
    z: f64,
}

/// Which live server owns the point: where a client joins the world.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Route)]
pub struct RouteView {
    pub region: String,
    pub server_id: u32,
    pub quic: String,
    pub cert_sha256: String,
}

/// Which live server owns a point.
#[utoipa::path(get, path = "/v1/route", tag = "views", params(RouteQuery), responses(
    (status = 200, description = "The owner of the point", body = RouteView),
    (status = 400, description = "A coordinate missing, malformed or not finite (`bad_request`)", body = ErrorView),
    (status = 404, description = "No live server owns the point (`no_owner`)", body = ErrorView),
))]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegionPlayers {
    pub region: String,
    pub players: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerPlayers {
    pub server_id: u32,
    pub name: String,
    pub players: u32,
    pub regions: Vec<RegionPlayers>,
}

/// Players per live server and region, as the servers last reported them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Players)]
pub struct PlayersView {
    pub total: u64,
    /// Players in the replicated directory (joined and not yet left).
    pub directory: u64,
    pub servers: Vec<ServerPlayers>,
}

/// Players per live server and region.
#[utoipa::path(get, path = "/v1/players", tag = "views", security(("viewer" = []), ("operator" = [])),
    responses((status = 200, description = "Players per server and region", body = PlayersView), ViewRefusals))]
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

/// Where the directory says a player is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Player)]
pub struct PlayerView {
    pub player: u64,
    pub server_id: u32,
    pub server_name: Option<String>,
}

/// Which game server holds a player.
#[utoipa::path(get, path = "/v1/players/{id}", tag = "views",
    params(("id" = u64, Path, description = "The player id")),
    security(("viewer" = []), ("operator" = [])), responses(
    (status = 200, description = "The server holding the player", body = PlayerView),
    (status = 400, description = "The id is not a number (`bad_request`)", body = ErrorView),
    (status = 404, description = "No server holds the player (`unknown_player`)", body = ErrorView),
    ViewRefusals,
))]
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

/// Splits a leaf region: its 8 children stay with its owner.
#[utoipa::path(post, path = "/v1/regions/{region}/split", tag = "operations", params(("region" = String, Path, description = "A region key like `L0:1,0,0`")),
    security(("operator" = [])), responses(
    (status = 200, description = "The region map as committed", body = [RegionView]),
    (status = 400, description = "Not a region key (`bad_region`), or too small to split (`too_small`)", body = ErrorView),
    (status = 404, description = "No such leaf region (`unknown_region`)", body = ErrorView),
    (status = 409, description = "Refused by the mesh's rules, e.g. within the cool-down (the command's reason)", body = ErrorView),
    WriteRefusals,
))]
async fn split_region(
    State((node, token)): State<OpsState>,
    ApiPath(region): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    region_op(&node, token.as_deref(), &headers, &region, |region| Command::SplitRegion { region, now: now_nanos() })
        .await
}

/// Merges the 8 leaf children of a region into it.
#[utoipa::path(post, path = "/v1/regions/{region}/merge", tag = "operations",
    params(("region" = String, Path, description = "The parent's key, like `L0:1,0,0`")),
    security(("operator" = [])), responses(
    (status = 200, description = "The region map as committed", body = [RegionView]),
    (status = 400, description = "Not a region key (`bad_region`)", body = ErrorView),
    (status = 404, description = "No such region (`unknown_region`)", body = ErrorView),
    (status = 409, description = "Refused by the mesh's rules, e.g. its children are not all leaves (the command's reason)", body = ErrorView),
    WriteRefusals,
))]
async fn merge_region(
    State((node, token)): State<OpsState>,
    ApiPath(region): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    region_op(&node, token.as_deref(), &headers, &region, |region| Command::MergeRegion { region, now: now_nanos() })
        .await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MoveRequest {
    /// The server id to move the region to.
    pub to: u32,
}

/// Moves a leaf region to another live server: its entities are handed over.
#[utoipa::path(post, path = "/v1/regions/{region}/move", tag = "operations", params(("region" = String, Path, description = "A region key like `L0:1,0,0`")),
    request_body = MoveRequest, security(("operator" = [])), responses(
    (status = 200, description = "The region map as committed", body = [RegionView]),
    (status = 400, description = "Not a region key (`bad_region`) or a malformed body (`bad_request`)", body = ErrorView),
    (status = 404, description = "No such region or server (`unknown_region`, `unknown_server`)", body = ErrorView),
    (status = 409, description = "Refused by the mesh's rules, e.g. the server is dead or draining (the command's reason)", body = ErrorView),
    WriteRefusals,
))]
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

/// Drains a server: its regions go to other servers (their players are
/// handed over, not dropped) and it gets no more.
#[utoipa::path(post, path = "/v1/servers/{id}/drain", tag = "operations", params(("id" = u32, Path, description = "The server id")),
    security(("operator" = [])), responses(
    (status = 200, description = "The region map as committed", body = [RegionView]),
    (status = 400, description = "The id is not a number (`bad_request`)", body = ErrorView),
    (status = 404, description = "No such server (`unknown_server`)", body = ErrorView),
    (status = 409, description = "Refused by the mesh's rules, e.g. no other live server (the command's reason)", body = ErrorView),
    WriteRefusals,
))]
async fn drain_server(
    State((node, token)): State<OpsState>,
    ApiPath(id): ApiPath<u32>,
    headers: HeaderMap,
) -> Response {
    let cmd = Command::Drain { server: ServerId(id), undo: false, now: now_nanos() };
    operate(&node, token.as_deref(), &headers, cmd).await
}

/// Undrains a server: it takes regions again.
#[utoipa::path(post, path = "/v1/servers/{id}/undrain", tag = "operations", params(("id" = u32, Path, description = "The server id")),
    security(("operator" = [])), responses(
    (status = 200, description = "The region map as committed", body = [RegionView]),
    (status = 400, description = "The id is not a number (`bad_request`)", body = ErrorView),
    (status = 404, description = "No such server (`unknown_server`)", body = ErrorView),
    (status = 409, description = "Refused by the mesh's rules (the command's reason)", body = ErrorView),
    WriteRefusals,
))]
async fn undrain_server(
    State((node, token)): State<OpsState>,
    ApiPath(id): ApiPath<u32>,
    headers: HeaderMap,
) -> Response {
    let cmd = Command::Drain { server: ServerId(id), undo: true, now: now_nanos() };
    operate(&node, token.as_deref(), &headers, cmd).await
}

type OpsState = (Arc<Node>, Option<Arc<String>>);

/// Operator writes, newest first (the log keeps the newest 10000).
#[utoipa::path(get, path = "/v1/audit", tag = "views", params(LimitQuery),
    security(("viewer" = []), ("operator" = [])), responses(
    (status = 200, description = "The newest operator writes, newest first", body = [AuditRecord]),
    (status = 400, description = "Malformed query, or a limit above 10000 (`bad_request`)", body = ErrorView),
    ViewRefusals,
))]
async fn audit(State((node, _)): State<OpsState>, ApiQuery(q): ApiQuery<LimitQuery>) -> Response {
    let limit = match limit(q.limit, 100) {
        Ok(n) => n,
        Err(refusal) => return *refusal,
    };
    Json(node.read(|s| s.audit_log().iter().rev().take(limit).cloned().collect::<Vec<AuditRecord>>())).into_response()
}

/// When regions split and merge.
#[utoipa::path(get, path = "/v1/thresholds", tag = "views", security(("viewer" = []), ("operator" = [])),
    responses((status = 200, description = "The balancer's thresholds", body = Thresholds), ViewRefusals))]
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

/// Sets when regions split and merge (all five, validated together).
#[utoipa::path(put, path = "/v1/thresholds", tag = "operations", request_body = Thresholds,
    security(("operator" = [])), responses(
    (status = 200, description = "The thresholds as committed", body = Thresholds),
    (status = 400, description = "A malformed body (`bad_request`) or values out of range, or merge thresholds not \
below half the split ones (`bad_thresholds`)", body = ErrorView),
    WriteRefusals,
))]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NoticeRequest {
    /// 1 to 256 bytes of UTF-8 without control characters.
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Notice)]
pub struct NoticeView {
    /// Game servers that received it; 0 when Redis is down (not delivered).
    pub servers: u64,
    pub delivered: bool,
}

/// Sends a notice to every player, through Redis to every game server.
#[utoipa::path(post, path = "/v1/notices", tag = "operations", request_body = NoticeRequest,
    security(("operator" = [])), responses(
    (status = 200, description = "Delivered to the game servers", body = NoticeView),
    (status = 400, description = "A malformed body or text (`bad_request`)", body = ErrorView),
    (status = 401, description = "Missing or wrong bearer operator token (`unauthorized`)", body = ErrorView),
    (status = 403, description = "The coordinator runs without `--admin-token` (`forbidden`)", body = ErrorView),
    (status = 503, description = "Redis is down: not delivered (`unavailable`)", body = ErrorView),
))]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct BoardQuery {
    /// How many entries, best first; clamped to 1..=1000.
    #[param(minimum = 1, maximum = 1000, default = 10)]
    n: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BoardEntry {
    pub player: u64,
    pub score: f64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Leaderboard)]
pub struct BoardView {
    pub board: String,
    pub entries: Vec<BoardEntry>,
    /// Leaderboards live in Redis: while it is down they read empty.
    pub degraded: bool,
}

/// A leaderboard's best entries.
#[utoipa::path(get, path = "/v1/leaderboards/{board}", tag = "players",
    params(("board" = String, Path, description = "1 to 64 of A-Z a-z 0-9 _", pattern = "^[A-Za-z0-9_]{1,64}$"), BoardQuery),
    responses(
    (status = 200, description = "The best entries, best first", body = BoardView),
    (status = 400, description = "A bad board name or `n` (`bad_request`)", body = ErrorView),
    (status = 503, description = "Redis is down (`unavailable`)", body = ErrorView),
))]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Credentials {
    /// 3 to 32 characters of `A-Z a-z 0-9 _ - .` (`auth::check_name`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{3,32}$")]
    pub name: String,
    /// 8 to 128 bytes of UTF-8 (`auth::check_password`; JSON Schema's
    /// lengths count characters, so the limit is stated here only).
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Account)]
pub struct AccountView {
    pub player: u64,
    pub name: String,
}

/// Creates an account.
#[utoipa::path(post, path = "/v1/accounts", tag = "players", request_body = Credentials, responses(
    (status = 201, description = "Created", body = AccountView),
    (status = 400, description = "A malformed body, name or password (`bad_request`)", body = ErrorView),
    (status = 409, description = "The name is taken (`name_taken`)", body = ErrorView),
    (status = 429, description = "Too many attempts from this address (`rate_limited`); see Retry-After", body = ErrorView),
    (status = 503, description = "The store or every server is unavailable (`unavailable`, `no_server`)", body = ErrorView),
))]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// An account name; one that could not be one is refused as bad
    /// credentials (401).
    pub name: String,
    pub password: String,
    /// Where a player with no saved position starts (inside the world);
    /// ignored once the player has one. Default: the world's spawn point.
    #[serde(default)]
    pub spawn: Option<[f64; 3]>,
}

/// A ticket and where to use it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Ticket)]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = Login)]
pub struct LoginView {
    pub player: u64,
    pub name: String,
    /// Bearer token for `/v1/tickets` and `/v1/logout`.
    pub session: String,
    pub session_expires_unix: u64,
    pub join: TicketView,
}

/// Logs in: a session and a ticket to join the world.
#[utoipa::path(post, path = "/v1/login", tag = "players", request_body = LoginRequest, responses(
    (status = 200, description = "A session and a join ticket", body = LoginView),
    (status = 400, description = "A malformed body, or a spawn outside the world (`bad_request`)", body = ErrorView),
    (status = 401, description = "Unknown name or wrong password (`bad_credentials`)", body = ErrorView),
    (status = 429, description = "Too many attempts from this address (`rate_limited`); see Retry-After", body = ErrorView),
    (status = 503, description = "The store or every server is unavailable (`unavailable`, `no_server`)", body = ErrorView),
))]
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

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
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

/// A new ticket for the session's player.
///
/// To play, or to stand by on a neighbour (a pre-connect for a handoff).
#[utoipa::path(post, path = "/v1/tickets", tag = "players", request_body = TicketRequest,
    security(("session" = [])), responses(
    (status = 200, description = "A ticket", body = TicketView),
    (status = 400, description = "A malformed body, a bad role, or standby without a server_id (`bad_request`)", body = ErrorView),
    (status = 401, description = "No such session, or expired (`bad_session`)", body = ErrorView),
    (status = 429, description = "Too many attempts from this address (`rate_limited`); see Retry-After", body = ErrorView),
    (status = 503, description = "The store or every server is unavailable (`unavailable`, `no_server`)", body = ErrorView),
))]
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

/// Ends a session.
///
/// Idempotent: a session that does not exist (unknown, expired or already
/// ended) answers 204 as well.
#[utoipa::path(post, path = "/v1/logout", tag = "players", security(("session" = [])), responses(
    (status = 204, description = "The session is ended (or did not exist)"),
    (status = 401, description = "No bearer session token (`bad_session`)", body = ErrorView),
    (status = 503, description = "The store is unavailable (`unavailable`)", body = ErrorView),
))]
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::to_value(document()).unwrap()
    }

    /// Every route is made by `routes!` from a documented handler: a bare
    /// `.route(` here, in `lib.rs` or in `map` would serve an undocumented
    /// path.
    #[test]
    fn routes_are_made_only_from_documented_handlers() {
        for (file, text) in [
            ("http.rs", include_str!("http.rs")),
            ("lib.rs", include_str!("lib.rs")),
            ("map/mod.rs", include_str!("map/mod.rs")),
        ] {
            let bare = text.lines().filter(|l| l.contains(".route(") && !l.trim_start().starts_with("//")).count();
            // This test's own line names the pattern once.
            let allowed = usize::from(file == "http.rs");
            assert_eq!(bare, allowed, "{file} makes a route without its documented operation");
        }
    }

    #[test]
    fn every_operation_documents_its_bodies_refusals_and_access() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut ops = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                ops += 1;
                let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
                assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path}: no success");
                for (status, r) in responses {
                    assert!(r["description"].as_str().is_some_and(|d| !d.is_empty()), "{method} {path} {status}");
                    if status.starts_with('4') || status.starts_with('5') {
                        let json = &r["content"]["application/json"]["schema"]["$ref"];
                        let plain = r["content"]["text/plain"].is_object();
                        assert!(json == "#/components/schemas/Error" || plain, "{method} {path} {status}: {r}");
                    } else if status != "204" {
                        assert!(r["content"].is_object(), "{method} {path} {status}: no body documented");
                    }
                }
                if let Some(body) = op.get("requestBody") {
                    assert!(body["content"]["application/json"]["schema"].is_object(), "{method} {path}");
                }
                // What needs a token says which and documents the 401.
                if op.get("security").is_some() {
                    assert!(responses.contains_key("401"), "{method} {path}: security without a 401");
                }
                for p in op["parameters"].as_array().into_iter().flatten() {
                    assert!(p["schema"].is_object(), "{method} {path}: {p}");
                }
            }
        }
        assert!(ops >= 25, "{ops} operations");
        // Every reference resolves.
        let text = doc.to_string();
        for r in text.split("\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(schemas.contains_key(name), "{name} is referenced but not defined");
        }
        for name in ["Error", "Region", "Server", "Status", "Transfer", "AuditRecord", "Thresholds", "Login", "Ticket"]
        {
            assert!(schemas.contains_key(name), "{name}");
        }
    }

    /// The limits the handlers keep are the schema's.
    #[test]
    fn the_schema_states_the_limits_the_code_keeps() {
        let doc = doc();
        for path in ["/v1/audit", "/v1/transfers"] {
            let limit = &doc["paths"][path]["get"]["parameters"][0];
            assert_eq!(limit["name"], "limit");
            assert_eq!(limit["schema"]["maximum"], MAX_LIMIT as u64, "{path}");
        }
        assert!(limit(Some(MAX_LIMIT), 100).is_ok());
        assert!(limit(Some(MAX_LIMIT + 1), 100).is_err());
        let t = &doc["components"]["schemas"]["Thresholds"]["properties"];
        assert_eq!(t["split_players"]["maximum"], 100_000);
        assert_eq!(t["cooldown_ms"]["minimum"], 1_000);
        assert_eq!(t["cooldown_ms"]["maximum"], 86_400_000);
        let ok = Thresholds::default();
        for (field, bad) in
            [("split_players", serde_json::json!(100_001)), ("cooldown_ms", 999.into()), ("split_cpu", 64.5.into())]
        {
            let mut v = serde_json::to_value(ok).unwrap();
            v[field] = bad.clone();
            let t: Thresholds = serde_json::from_value(v).unwrap();
            assert!(t.validate().is_err(), "{field} = {bad} is outside the schema and must be refused");
        }
        let creds = &doc["components"]["schemas"]["Credentials"]["properties"];
        assert_eq!(creds["name"]["pattern"], "^[A-Za-z0-9_.-]{3,32}$");
        assert!(creds["password"]["description"].as_str().unwrap().contains("8 to 128 bytes"));
        for (len, ok) in [(7, false), (8, true), (128, true), (129, false)] {
            assert_eq!(crate::auth::check_password(&"p".repeat(len)).is_ok(), ok, "a password of {len} bytes");
        }
        for (name, ok) in
            [("ab", false), ("abc", true), (&*"n".repeat(32), true), (&*"n".repeat(33), false), ("a b", false)]
        {
            assert_eq!(crate::auth::check_name(name).is_ok(), ok, "{name:?}");
        }
        let logout = &doc["paths"]["/v1/logout"]["post"];
        assert!(logout["responses"]["204"]["description"].as_str().unwrap().contains("did not exist"));
        assert!(logout.to_string().contains("does not exist"), "{logout}");
    }

    /// `cargo test -p mesh-coordinator --lib print_the_document -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the document"]
    fn print_the_document() {
        println!("{}", document().to_pretty_json().unwrap());
    }
}
