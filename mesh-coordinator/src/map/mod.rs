//! The admin map (`docs/admin-map.md`): the page at `/`, embedded in the
//! binary, and the event stream that keeps it live (`GET /v1/events`).
//!
//! A [`MapHub`] holds the open streams and the ring of server samples the
//! sparklines draw. [`run`] wakes once a second: it takes a sample every
//! [`SAMPLE_PERIOD_MS`] whether or not a map is open, and, only while one
//! is, sends what changed and relays the position feed it asks each live
//! game server for (`GET /v1/positions`), which is therefore not on the
//! heartbeats. A stream that falls [`CLIENT_QUEUE`] events behind is cut
//! (the page reconnects) rather than buffered without bound.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::{ErrorView, RegionView, ServerView, ViewRefusals};
use crate::node::Node;
use crate::state::CoordinatorState;

/// The page: one HTML file, nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("../../assets/map.html");
/// Streams open at once; one more is refused (503 `busy`).
pub const MAX_CLIENTS: usize = 64;
/// Events a stream may fall behind before it is cut.
pub const CLIENT_QUEUE: usize = 64;
/// How often the sparklines' ring takes a sample of every server.
pub const SAMPLE_PERIOD_MS: u64 = 10_000;
/// Samples kept per server: ten minutes.
pub const HISTORY_LEN: usize = 60;
/// Positions relayed a second over all servers (each server's share is
/// this divided among them, between [`MIN_SHARE`] and [`MAX_SHARE`]).
pub const POSITIONS_BUDGET: usize = 20_000;
pub const MIN_SHARE: usize = 100;
/// The game servers' own bound (`game_server::http::MAX_POSITIONS`).
pub const MAX_SHARE: usize = 5_000;
/// Transfers and audit records a new stream starts with.
pub const INITIAL_LOG: usize = 50;
/// Most transfers or audit records one event carries.
pub const MAX_LOG_EVENT: usize = 1_000;
/// How long the position feed waits for a game server.
const POLL_TIMEOUT: Duration = Duration::from_millis(800);

/// One sample of a server for the sparklines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_unix_ms: u64,
    pub players: u32,
    pub cpu: f32,
    pub tick_p99_ms: f32,
    pub ticks_overrun: u64,
}

/// One event of the stream, its JSON shared by every stream it goes to.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub data: Arc<str>,
}

impl Event {
    pub fn new(kind: &'static str, data: &impl Serialize) -> Self {
        let text = serde_json::to_string(data).expect("map events serialise");
        Self { kind, data: text.into() }
    }
}

/// A leaf region as the map draws it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MapRegion {
    #[serde(flatten)]
    pub region: RegionView,
    /// As its owner last reported; 0 when unknown.
    pub players: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegionsEvent {
    pub map_version: u64,
    pub regions: Vec<MapRegion>,
}

/// A server as the map shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MapServer {
    #[serde(flatten)]
    pub server: ServerView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Sample>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServersEvent {
    pub at_unix_ms: u64,
    pub servers: Vec<MapServer>,
}

/// A game server's answer to `GET /v1/positions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerPositions {
    pub total: u64,
    pub entities: Vec<(f64, f64, f64, u8)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PositionsOf {
    pub server_id: u32,
    #[serde(flatten)]
    pub positions: ServerPositions,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PositionsEvent {
    pub at_unix_ms: u64,
    pub servers: Vec<PositionsOf>,
}

#[derive(Debug, Serialize)]
struct Hello {
    replica: u64,
    map_version: u64,
    mesh_epoch_unix_nanos: u64,
    sample_period_ms: u64,
    positions_max: u64,
}

/// The open streams and the sparklines' ring.
#[derive(Debug)]
pub struct MapHub {
    clients: Mutex<Vec<mpsc::Sender<Event>>>,
    history: Mutex<BTreeMap<u32, VecDeque<Sample>>>,
    /// The last `positions` event, for a stream that opens between two
    /// (cleared when no stream is open, so a map opened later does not
    /// start with old dots).
    positions: Mutex<Option<Event>>,
    /// Cancelled when the coordinator stops: every stream ends, and no new
    /// one opens (an open stream would hold the graceful shutdown).
    closed: CancellationToken,
    /// Held by the loop from reading the state to sending what it read, and
    /// by a new stream from reading its picture to joining: a stream never
    /// gets, after its picture, an event read before it.
    turn: Mutex<()>,
    metrics: crate::metrics::Metrics,
}

/// The hub's locks guard plain data: a panic elsewhere leaves it usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a new stream starts with: read under the state's lock as owned
/// data, serialised outside it.
#[derive(Debug)]
pub struct Picture {
    hello: Hello,
    regions: RegionsEvent,
    servers: ServersEvent,
    transfers: Vec<crate::state::TransferRecord>,
    audit: Vec<crate::state::AuditRecord>,
}

impl Picture {
    /// Reads the picture; `history` is the sparklines' ring, copied before;
    /// `feed`: whether the position feed is on.
    pub fn read(
        s: &CoordinatorState,
        replica: u64,
        now_ms: u64,
        history: &BTreeMap<u32, VecDeque<Sample>>,
        feed: bool,
    ) -> Self {
        let alive = s.servers().values().filter(|r| r.alive).count();
        Self {
            hello: Hello {
                replica,
                map_version: s.map_version(),
                mesh_epoch_unix_nanos: s.clock.epoch_unix_nanos,
                sample_period_ms: SAMPLE_PERIOD_MS,
                positions_max: if feed { share(alive) as u64 } else { 0 },
            },
            regions: regions_event(s),
            servers: servers_event(s, now_ms, Some(history)),
            transfers: transfers_after(s, 0, INITIAL_LOG),
            audit: audit_after(s, 0, INITIAL_LOG),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        vec![
            Event::new("hello", &self.hello),
            Event::new("regions", &self.regions),
            Event::new("servers", &self.servers),
            Event::new("transfers", &self.transfers),
            Event::new("audit", &self.audit),
        ]
    }
}

impl MapHub {
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        Self {
            clients: Mutex::default(),
            history: Mutex::default(),
            positions: Mutex::default(),
            closed: CancellationToken::new(),
            turn: Mutex::default(),
            metrics,
        }
    }

    pub fn clients(&self) -> usize {
        lock(&self.clients).len()
    }

    /// Whether one more stream may open.
    pub fn has_room(&self) -> bool {
        let mut clients = lock(&self.clients);
        clients.retain(|c| !c.is_closed());
        clients.len() < MAX_CLIENTS && !self.closed.is_cancelled()
    }

    /// The sparklines' ring, copied.
    pub fn history(&self) -> BTreeMap<u32, VecDeque<Sample>> {
        lock(&self.history).clone()
    }

    /// A new stream that starts with `first` (a [`Picture`]'s events) and
    /// the last positions; `None` when [`MAX_CLIENTS`] are open or the hub
    /// is closed.
    pub fn subscribe(&self, first: Vec<Event>) -> Option<mpsc::Receiver<Event>> {
        let mut clients = lock(&self.clients);
        clients.retain(|c| !c.is_closed());
        if clients.len() >= MAX_CLIENTS || self.closed.is_cancelled() {
            return None;
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        for e in first.into_iter().chain(lock(&self.positions).clone()).take(CLIENT_QUEUE) {
            // The queue is new and as long as this.
            let _ = tx.try_send(e);
        }
        clients.push(tx);
        self.metrics.map_clients.set(clients.len() as i64);
        Some(rx)
    }

    /// Ends every stream and opens no more.
    pub fn close(&self) {
        self.closed.cancel();
        lock(&self.clients).clear();
        self.metrics.map_clients.set(0);
    }

    /// Cancelled when the hub closes.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Sends `e` to every stream; one that is [`CLIENT_QUEUE`] behind is cut
    /// and counted.
    pub fn broadcast(&self, e: &Event) {
        let mut clients = lock(&self.clients);
        clients.retain(|c| match c.try_send(e.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.map_clients_dropped.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.metrics.map_clients.set(clients.len() as i64);
    }

    /// Sends a `positions` event and keeps it for streams that open before
    /// the next.
    pub fn publish_positions(&self, e: Event) {
        *lock(&self.positions) = Some(e.clone());
        self.broadcast(&e);
    }

    /// A sample of every live server into the ring; a dead server's ring
    /// goes when its newest sample is older than the ring's span.
    pub fn sample(&self, s: &CoordinatorState, now_ms: u64) {
        let mut history = lock(&self.history);
        let span = HISTORY_LEN as u64 * SAMPLE_PERIOD_MS;
        history.retain(|id, ring| {
            s.server(shared::ServerId(*id)).is_some_and(|r| r.alive)
                || ring.back().is_some_and(|x| x.at_unix_ms + span > now_ms)
        });
        for r in s.servers().values().filter(|r| r.alive) {
            let ring = history.entry(r.id.0).or_default();
            if ring.len() == HISTORY_LEN {
                ring.pop_front();
            }
            ring.push_back(Sample {
                at_unix_ms: now_ms,
                players: r.load.players,
                cpu: r.load.cpu,
                tick_p99_ms: r.load.tick_p99_ms,
                ticks_overrun: r.load.ticks_overrun,
            });
        }
    }
}

/// Each server's share of [`POSITIONS_BUDGET`].
pub fn share(servers: usize) -> usize {
    (POSITIONS_BUDGET / servers.max(1)).clamp(MIN_SHARE, MAX_SHARE)
}

pub fn regions_event(s: &CoordinatorState) -> RegionsEvent {
    let mut players: HashMap<String, u32> = HashMap::new();
    for r in s.servers().values().filter(|r| r.alive) {
        for (k, n) in s.region_players(r.id) {
            *players.entry(k.to_string()).or_default() += n;
        }
    }
    let regions = crate::http::region_views(s)
        .into_iter()
        .map(|region| MapRegion { players: players.get(&region.region).copied().unwrap_or(0), region })
        .collect();
    RegionsEvent { map_version: s.map_version(), regions }
}

pub fn servers_event(
    s: &CoordinatorState,
    now_ms: u64,
    history: Option<&BTreeMap<u32, VecDeque<Sample>>>,
) -> ServersEvent {
    let servers = crate::http::server_views(s, now_ms * 1_000_000)
        .into_iter()
        .map(|server| MapServer {
            history: history.map(|h| h.get(&server.server_id).map(|r| r.iter().copied().collect()).unwrap_or_default()),
            server,
        })
        .collect();
    ServersEvent { at_unix_ms: now_ms, servers }
}

/// Transfers newer than `after` (by id), oldest first, the newest `max`
/// of them (bounded work: [`crate::state::Transfers::after`]).
pub fn transfers_after(s: &CoordinatorState, after: u64, max: usize) -> Vec<crate::state::TransferRecord> {
    s.transfers().after(after, max).into_iter().cloned().collect()
}

/// Audit records newer than `after` (by seq), oldest first, at most `max`.
pub fn audit_after(s: &CoordinatorState, after: u64, max: usize) -> Vec<crate::state::AuditRecord> {
    let mut v: Vec<_> = s.audit_log().iter().rev().take(max).filter(|a| a.seq > after).cloned().collect();
    v.reverse();
    v
}

fn newest_ids(s: &CoordinatorState) -> (u64, u64) {
    (s.transfers().last_id(), s.audit_log().back().map_or(0, |a| a.seq))
}

/// Most transfers whose outcome the loop keeps watching after sending
/// them in flight, so that the page sees them end.
const WATCHED: usize = 1_000;

/// The transfers among `watched` (sent while in flight, with the outcome
/// sent) whose outcome changed since, as they are now. Those that ended
/// leave `watched`, as do those no longer in flight nor among the last
/// `2 * WATCHED` to end.
fn changed_outcomes(
    s: &CoordinatorState,
    watched: &mut BTreeMap<u64, crate::state::TransferOutcome>,
) -> Vec<crate::state::TransferRecord> {
    let t = s.transfers();
    let ended: HashMap<u64, &crate::state::TransferRecord> =
        t.recently_ended(2 * WATCHED).filter(|r| watched.contains_key(&r.id)).map(|r| (r.id, r)).collect();
    let mut out = Vec::new();
    watched.retain(|id, outcome| match t.in_flight_get(*id).or_else(|| ended.get(id).copied()) {
        Some(r) if r.outcome != *outcome => {
            out.push(r.clone());
            *outcome = r.outcome;
            !r.outcome.ended()
        }
        Some(_) => true,
        None => false,
    });
    out
}

/// Whether `addr` is a plain `host:port` (all the feed may ask): no
/// scheme, path, user or query for a registrant to slip in.
fn plain_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else { return false };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    !host.is_empty()
        && port.parse::<u16>().is_ok()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
}

fn unix_ms() -> u64 {
    crate::node::now_nanos() / 1_000_000
}

/// The hub's loop: samples, and while a map is open, what changed and
/// the positions, once a second. `feed_token`: what the game servers'
/// `/v1/positions` want (`--map-feed-token`); unset, positions are not
/// asked for. On `stop` it closes the hub, ending every stream.
pub async fn run(hub: Arc<MapHub>, node: Arc<Node>, feed_token: Option<String>, stop: CancellationToken) {
    let http =
        match reqwest::Client::builder().timeout(POLL_TIMEOUT).redirect(reqwest::redirect::Policy::none()).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the admin map's position feed cannot start");
                return;
            }
        };
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_transfer, mut last_audit) = node.read(newest_ids);
    let mut watched = BTreeMap::new();
    let mut last_regions: Option<Arc<str>> = None;
    let mut last_sample = 0u64;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => {
                hub.close();
                return;
            }
        }
        let now_ms = unix_ms();
        let sampled = now_ms.saturating_sub(last_sample) >= SAMPLE_PERIOD_MS;
        if sampled {
            node.read(|s| hub.sample(s, now_ms));
            last_sample = now_ms;
        }
        if hub.clients() == 0 {
            (last_transfer, last_audit) = node.read(newest_ids);
            watched.clear();
            last_regions = None;
            *lock(&hub.positions) = None;
            continue;
        }
        // Owned copies under the state's lock; JSON outside it.
        let history = if sampled { Some(hub.history()) } else { None };
        let turn = lock(&hub.turn);
        let (regions, servers, transfers, changed, audit, targets) = node.read(|s| {
            let targets: Vec<(u32, String)> =
                s.servers().values().filter(|r| r.alive).map(|r| (r.id.0, r.addresses.http.clone())).collect();
            (
                regions_event(s),
                servers_event(s, now_ms, history.as_ref()),
                transfers_after(s, last_transfer, MAX_LOG_EVENT),
                changed_outcomes(s, &mut watched),
                audit_after(s, last_audit, MAX_LOG_EVENT),
                targets,
            )
        });
        let regions = Event::new("regions", &regions);
        if last_regions.as_ref() != Some(&regions.data) {
            last_regions = Some(regions.data.clone());
            hub.broadcast(&regions);
        }
        hub.broadcast(&Event::new("servers", &servers));
        if let Some(t) = transfers.last() {
            last_transfer = t.id;
        }
        for t in transfers.iter().filter(|t| !t.outcome.ended()) {
            if watched.len() < WATCHED {
                watched.insert(t.id, t.outcome);
            }
        }
        // New ones, then those whose outcome changed (the page merges by id).
        let transfers: Vec<_> = transfers.into_iter().chain(changed).collect();
        if !transfers.is_empty() {
            hub.broadcast(&Event::new("transfers", &transfers));
        }
        if let Some(a) = audit.last() {
            last_audit = a.seq;
            hub.broadcast(&Event::new("audit", &audit));
        }
        drop(turn);
        if let Some(token) = &feed_token {
            let positions = poll_positions(&http, &hub, &targets, token).await;
            hub.publish_positions(Event::new("positions", &positions));
        }
    }
}

/// Asks every live server for its share of positions, all at once; one
/// that does not answer in time is left out this second (and counted).
async fn poll_positions(
    http: &reqwest::Client,
    hub: &MapHub,
    targets: &[(u32, String)],
    token: &str,
) -> PositionsEvent {
    let max = share(targets.len());
    // A position is at most about 40 bytes of JSON.
    let cap = max * 48 + 1024;
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in targets {
        if !plain_host_port(addr) {
            hub.metrics.map_position_polls.with_label_values(&["bad_address"]).inc();
            continue;
        }
        let req = http.get(format!("http://{addr}/v1/positions?max={max}")).bearer_auth(token);
        let id = *id;
        asks.spawn(async move { (id, fetch_capped(req, cap).await) });
    }
    let mut servers = Vec::with_capacity(targets.len());
    while let Some(done) = asks.join_next().await {
        let Ok((server_id, answer)) = done else { continue };
        match answer {
            Ok(mut positions) => {
                positions.entities.truncate(max);
                hub.metrics.map_position_polls.with_label_values(&["ok"]).inc();
                servers.push(PositionsOf { server_id, positions });
            }
            Err(e) => {
                debug!(server = server_id, error = %e, "no positions from a game server");
                hub.metrics.map_position_polls.with_label_values(&["failed"]).inc();
            }
        }
    }
    servers.sort_by_key(|p| p.server_id);
    PositionsEvent { at_unix_ms: unix_ms(), servers }
}

/// One game server's positions, its body read up to `cap` bytes.
async fn fetch_capped(req: reqwest::RequestBuilder, cap: usize) -> anyhow::Result<ServerPositions> {
    let mut r = req.send().await?.error_for_status()?;
    if r.content_length().is_some_and(|n| n > cap as u64) {
        anyhow::bail!("answer longer than {cap} bytes");
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if body.len() + chunk.len() > cap {
            anyhow::bail!("answer longer than {cap} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The node, the hub, and whether the position feed is on.
pub type MapState = (Arc<Node>, Arc<MapHub>, bool);

/// `/` (open: the page holds no data) and `/v1/events` (viewer or
/// operator token when a viewer token is set).
pub fn page_routes() -> OpenApiRouter<MapState> {
    OpenApiRouter::new().routes(routes!(page))
}

pub fn event_routes() -> OpenApiRouter<MapState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// The admin map (HTML, embedded; nothing fetched from elsewhere).
#[utoipa::path(get, path = "/", tag = "views",
    responses((status = 200, description = "The admin map page", body = String, content_type = "text/html")))]
async fn page() -> Response {
    // Everything is inline and same-origin: nothing else may load, and the
    // page may not be framed.
    const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                       connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// The admin map's live events (server-sent events; `docs/admin-map.md`).
///
/// `hello`, `regions`, `servers`, `transfers`, `audit` at once, then what
/// changes, at most once a second per type, and `positions` every second.
/// A stream 64 events behind is cut.
#[utoipa::path(get, path = "/v1/events", tag = "views", security(("viewer" = []), ("operator" = [])), responses(
    (status = 200, description = "text/event-stream of the map's events", body = String, content_type = "text/event-stream"),
    (status = 503, description = "64 streams are open already (`busy`)", body = ErrorView),
    ViewRefusals,
))]
async fn events(State((node, hub, feed)): State<MapState>) -> Response {
    let busy = || {
        svc::http::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            &format!("{MAX_CLIENTS} event streams are open already, or the coordinator is stopping"),
        )
    };
    if !hub.has_room() {
        return busy();
    }
    let replica = node.raft_status().id;
    let history = hub.history();
    let joined = {
        let _turn = lock(&hub.turn);
        let picture = node.read(|s| Picture::read(s, replica, unix_ms(), &history, feed));
        hub.subscribe(picture.events())
    };
    match joined {
        Some(rx) => stream(rx, hub.closed()),
        None => busy(),
    }
}

/// A stream's events as `text/event-stream`, with a keep-alive comment
/// every 15 s, until `closed` is cancelled.
pub fn stream(rx: mpsc::Receiver<Event>, closed: CancellationToken) -> Response {
    let events = futures::StreamExt::take_until(ReceiverStream::new(rx), closed.cancelled_owned())
        .map(|e| Ok::<_, Infallible>(sse::Event::default().event(e.kind).data(&*e.data)));
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive")).into_response()
}

#[cfg(test)]
mod tests;
