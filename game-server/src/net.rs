//! The player endpoint: QUIC (quinn) on UDP 7777.
//!
//! One task per connection reads the client's hello on the control stream,
//! then forwards input datagrams to the tick thread and writes what the tick
//! thread sends back. Malformed input is dropped and counted, never fatal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use shared::ids::{PlayerId, ServerId};
use shared::ticket::TicketVerifier;
use shared::wire::{
    ClientControl, Datagram, DecodeError, EditOutcome, JoinRole, PROTOCOL_VERSION, ServerControl, decode_frame,
    encode_frame, frame_len,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::sim::messages::{ConnTx, Outbound, SimIn};

/// QUIC application close codes the server uses.
pub mod close {
    pub const NORMAL: u32 = 0;
    pub const REFUSED: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
    /// The client left its control stream unread until its queue filled.
    pub const TOO_SLOW: u32 = 4;
}

/// Frames a client may wait before sending its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued per connection; a full queue drops (and counts) them.
const OUTBOUND_QUEUE: usize = 256;
/// Control frames queued per connection; a full queue closes it.
const CONTROL_QUEUE: usize = 512;

#[derive(Debug, Clone)]
pub struct NetContext {
    pub sim: mpsc::Sender<SimIn>,
    pub tickets: Arc<Tickets>,
    pub metrics: Metrics,
    /// Where players are (Redis): set on join, cleared when they leave.
    pub cache: Arc<persistence::cache::Cache>,
    pub limits: NetLimits,
    /// The components this server knows; a client must know the same.
    pub schema: Arc<shared::component::Schema>,
    /// Where a playing join's saved components are read from, and the
    /// registry they are checked against (none: joins start without).
    pub saved: Option<(crate::store::WorldStore, Arc<shared::component::Registry>)>,
    next_conn: Arc<AtomicU64>,
}

/// How long a join waits for the player's saved components.
const SAVED_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Rate limits of the player endpoint (token buckets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetLimits {
    /// Input datagrams a connection may send a second (90 expected), and in a burst.
    pub inputs_per_s: f64,
    pub inputs_burst: f64,
    /// Connection attempts one IP address may make a second, and in a burst.
    pub connects_per_ip_per_s: f64,
    pub connects_per_ip_burst: f64,
}

/// 135 inputs a second per connection (1.5 times a client's 90), 45 in a
/// burst (half a second of them); 5 connection attempts a second per
/// address, 20 in a burst. The flags `--inputs-per-s` and
/// `--connects-per-ip-per-s` set the rates.
impl Default for NetLimits {
    fn default() -> Self {
        Self { inputs_per_s: 135.0, inputs_burst: 45.0, connects_per_ip_per_s: 5.0, connects_per_ip_burst: 20.0 }
    }
}

/// Seconds on the process's monotonic clock (what the buckets count in).
fn now_s() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

/// Addresses remembered by the connection-attempt limit before full
/// buckets (no recent attempts) are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

impl NetContext {
    pub fn new(
        sim: mpsc::Sender<SimIn>,
        tickets: Arc<Tickets>,
        metrics: Metrics,
        cache: Arc<persistence::cache::Cache>,
        limits: NetLimits,
    ) -> Self {
        let schema = Arc::new(shared::component::Registry::builtin().schema());
        Self { sim, tickets, metrics, cache, limits, schema, saved: None, next_conn: Arc::new(AtomicU64::new(1)) }
    }

    /// The components clients must know (the server's registry's schema),
    /// and where playing joins read their saved ones.
    pub fn with_registry(
        mut self,
        registry: Arc<shared::component::Registry>,
        store: crate::store::WorldStore,
    ) -> Self {
        self.schema = Arc::new(registry.schema());
        self.saved = Some((store, registry));
        self
    }

    async fn saved_components(&self, player: PlayerId) -> Result<Option<shared::component::ComponentSet>, String> {
        match &self.saved {
            Some((store, registry)) => {
                saved_components(store.load_progress(player), registry, &self.metrics, player).await
            }
            None => Ok(None),
        }
    }
}

/// A playing join's saved components: none for a player never saved; an
/// error (the join is refused, to be tried again) when the store cannot
/// say, so that a fresh avatar never overwrites a saved one. Components
/// `registry` refuses are left out and counted.
async fn saved_components(
    load: impl std::future::Future<Output = Result<Option<persistence::Progress>, persistence::StoreError>>,
    registry: &shared::component::Registry,
    metrics: &Metrics,
    player: PlayerId,
) -> Result<Option<shared::component::ComponentSet>, String> {
    let progress = match tokio::time::timeout(SAVED_READ_TIMEOUT, load).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {SAVED_READ_TIMEOUT:?}")),
    };
    let Some(p) = progress.filter(|p| !p.components.is_empty()) else { return Ok(None) };
    match shared::component::ComponentSet::decode_saved(&p.components, registry) {
        Ok((set, dropped)) => {
            for (id, e) in dropped {
                warn!(%player, component = id, error = %e, "a saved component left out");
                metrics.saved_components_dropped.with_label_values(&[e.reason()]).inc();
            }
            Ok(Some(set))
        }
        Err(e) => {
            warn!(%player, error = %e, "saved components unreadable: the player starts without");
            metrics.saved_components_dropped.with_label_values(&[e.reason()]).inc();
            Ok(None)
        }
    }
}

/// Who a hello lets in.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub player: PlayerId,
    pub name: String,
    pub role: JoinRole,
    pub spawn: Option<glam::DVec3>,
}

/// Checks the tickets of hellos: signed by the coordinator for this server,
/// unexpired, each accepted once. With a development token configured, a
/// hello carrying it is let in as whoever it claims to be (tests, local
/// experiments; never in production).
#[derive(Debug)]
pub struct Tickets {
    pub server: ServerId,
    verifier: TicketVerifier,
    dev_token: Option<String>,
    /// Nonces of accepted tickets → their expiry (Unix ms).
    seen: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

impl Tickets {
    pub fn new(server: ServerId, verifier: TicketVerifier, dev_token: Option<String>) -> Self {
        Self { server, verifier, dev_token, seen: Default::default() }
    }

    /// Admits a hello or says why not (a stable reason and a detail).
    pub fn admit(
        &self,
        ticket: &str,
        player: PlayerId,
        name: String,
        role: JoinRole,
        spawn: Option<glam::DVec3>,
        now_unix_ms: u64,
    ) -> Result<Admitted, (&'static str, String)> {
        if self.dev_token.as_deref().is_some_and(|t| t == ticket) {
            return Ok(Admitted { player, name, role, spawn });
        }
        let claims = self.verifier.verify(ticket, self.server, now_unix_ms).map_err(|e| (e.reason(), e.to_string()))?;
        if claims.player != player || claims.role != role {
            return Err((
                "ticket_mismatch",
                format!(
                    "the ticket is for player {} as {:?}, the hello says {player} as {role:?}",
                    claims.player, claims.role
                ),
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= 4096 {
            seen.retain(|_, expires| *expires + shared::ticket::EXPIRY_LEEWAY_MS >= now_unix_ms);
        }
        if seen.insert(claims.nonce, claims.expires_unix_ms).is_some() {
            return Err(("ticket_replayed", shared::ticket::TicketError::Replayed.to_string()));
        }
        Ok(Admitted { player: claims.player, name: claims.name, role: claims.role, spawn: claims.spawn })
    }
}

/// The leaderboard of voxels players changed (dug or placed).
pub const VOXELS_BOARD: &str = "voxels_changed";

/// Relays a player's chat line to the whole mesh (Redis pub/sub), or to this
/// server's players while Redis is down. Empty, oversized or control-laden
/// lines, and more than 5 lines in 10 s per player, are dropped and counted.
fn chat(ctx: &NetContext, player: PlayerId, name: &str, text: String) {
    let m = &ctx.metrics;
    if !shared::wire::is_relayable_text(&text) {
        m.world_events.with_label_values(&["invalid"]).inc();
        return;
    }
    let (cache, sim, m, name) = (ctx.cache.clone(), ctx.sim.clone(), m.clone(), name.to_owned());
    tokio::spawn(async move {
        if !cache.allow(&format!("chat:{}", player.0), 5, Duration::from_secs(10)).await {
            m.world_events.with_label_values(&["rate_limited"]).inc();
            return;
        }
        let event = persistence::cache::WorldEvent::Chat { from: player.0, name: name.clone(), text: text.clone() };
        if cache.publish(&event).await.is_some() {
            m.world_events.with_label_values(&["published"]).inc();
        } else {
            m.world_events.with_label_values(&["local"]).inc();
            let _ = sim.try_send(SimIn::Broadcast(ServerControl::Chat { from: player, name, text }));
        }
    });
}

/// Delivers the mesh's world events (from Redis) to this server's players.
pub fn relay_world_events(ctx: &NetContext) {
    let mut events = ctx.cache.subscribe(1024);
    let (sim, m) = (ctx.sim.clone(), ctx.metrics.clone());
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let msg = match e {
                persistence::cache::WorldEvent::Chat { from, name, text } => {
                    ServerControl::Chat { from: PlayerId(from), name, text }
                }
                persistence::cache::WorldEvent::Notice { text } => ServerControl::Notice { text },
            };
            if sim.try_send(SimIn::Broadcast(msg)).is_ok() {
                m.world_events.with_label_values(&["delivered"]).inc();
            }
        }
    });
}

/// Accepts players until `stop` is cancelled, then closes every connection.
pub async fn serve(endpoint: quinn::Endpoint, ctx: NetContext, stop: CancellationToken) {
    let mut attempts: std::collections::HashMap<std::net::IpAddr, shared::rate::TokenBucket> =
        std::collections::HashMap::new();
    let l = ctx.limits;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // One address hammering the endpoint is refused before any
                // handshake work, so players elsewhere do not pay for it.
                let now = now_s();
                if attempts.len() >= MAX_TRACKED_ADDRESSES {
                    attempts.retain(|_, b| !b.is_full(now));
                    // Still full (a flood from very many addresses): forget
                    // them all rather than scan the map at every attempt.
                    if attempts.len() >= MAX_TRACKED_ADDRESSES {
                        attempts.clear();
                    }
                }
                let ip = incoming.remote_address().ip();
                let bucket = attempts
                    .entry(ip)
                    .or_insert_with(|| shared::rate::TokenBucket::new(l.connects_per_ip_per_s, l.connects_per_ip_burst, now));
                if !bucket.take(now) {
                    ctx.metrics.connections_refused.with_label_values(&["rate_limited"]).inc();
                    incoming.refuse();
                    continue;
                }
                tokio::spawn(handle(incoming, ctx.clone(), stop.clone()));
            }
            _ = stop.cancelled() => break,
        }
    }
    endpoint.close(close::SHUTDOWN.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Stable label for a failed handshake.
fn handshake_reason(e: &quinn::ConnectionError) -> &'static str {
    match e {
        // TLS alert 120, no_application_protocol, as a QUIC crypto error.
        quinn::ConnectionError::TransportError(t) if t.code == quinn::TransportErrorCode::crypto(120) => "alpn",
        quinn::ConnectionError::TransportError(_) => "tls",
        quinn::ConnectionError::TimedOut => "handshake_timeout",
        quinn::ConnectionError::VersionMismatch => "quic_version",
        _ => "handshake_failed",
    }
}

#[derive(Debug, thiserror::Error)]
enum HelloError {
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    Timeout,
    #[error("control stream: {0}")]
    Stream(String),
    #[error("{0}")]
    Decode(DecodeError),
}

async fn read_frame<T: for<'de> serde::Deserialize<'de>>(recv: &mut quinn::RecvStream) -> Result<T, HelloError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(|e| HelloError::Stream(e.to_string()))?;
    let n = frame_len(prefix).map_err(HelloError::Decode)?;
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body).await.map_err(|e| HelloError::Stream(e.to_string()))?;
    decode_frame(&body).map_err(HelloError::Decode)
}

async fn write_control(send: &mut quinn::SendStream, msg: &ServerControl) -> bool {
    match encode_frame(msg) {
        Ok(bytes) => send.write_all(&bytes).await.is_ok(),
        Err(_) => false,
    }
}

/// Finishes the control stream and closes the connection once the client has
/// received what was written (or after a second), so a refusal's reason
/// reaches the client before the close does.
async fn finish_then_close(mut send: quinn::SendStream, conn: &quinn::Connection, code: u32, reason: &[u8]) {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(code.into(), reason);
}

async fn handle(incoming: quinn::Incoming, ctx: NetContext, stop: CancellationToken) {
    let m = &ctx.metrics;
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            let reason = handshake_reason(&e);
            m.connections_refused.with_label_values(&[reason]).inc();
            debug!(%remote, %reason, error = %e, "handshake failed");
            return;
        }
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            m.connections_refused.with_label_values(&["no_hello"]).inc();
            conn.close(close::PROTOCOL.into(), b"no control stream");
            return;
        }
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<ClientControl>(&mut recv)).await {
        Ok(r) => r,
        Err(_) => Err(HelloError::Timeout),
    };
    let refuse = |reason: &'static str, detail: String| {
        m.connections_refused.with_label_values(&[reason]).inc();
        debug!(%remote, %reason, %detail, "player connection refused");
        ServerControl::Refused { reason: format!("{reason}: {detail}") }
    };
    let (player, name, role, spawn) = match hello {
        Ok(ClientControl::Hello { version, schema, ticket, player, name, role, spawn }) => {
            let admitted = if version != PROTOCOL_VERSION {
                Err(refuse("bad_version", format!("server speaks {PROTOCOL_VERSION}, client {version}")))
            } else if let Some(diff) = ctx.schema.mismatch(&schema) {
                Err(refuse("schema_mismatch", format!("(here: this server; there: the client) {diff}")))
            } else if name.len() > 64 {
                Err(refuse("bad_hello", "name longer than 64 bytes".into()))
            } else if spawn.is_some_and(|p| !p.is_finite()) {
                Err(refuse("bad_hello", "spawn point is not finite".into()))
            } else {
                ctx.tickets
                    .admit(&ticket, player, name, role, spawn, svc::unix_nanos() / 1_000_000)
                    .map_err(|(reason, detail)| refuse(reason, detail))
            };
            match admitted {
                Ok(a) => (a.player, a.name, a.role, a.spawn),
                Err(r) => {
                    let _ = write_control(&mut send, &r).await;
                    finish_then_close(send, &conn, close::REFUSED, b"refused").await;
                    return;
                }
            }
        }
        Ok(ClientControl::Bye) => {
            conn.close(close::NORMAL.into(), b"bye");
            return;
        }
        Ok(ClientControl::Edit { .. } | ClientControl::Chat { .. }) => {
            let r = refuse("no_hello", "the first frame must be a hello".into());
            let _ = write_control(&mut send, &r).await;
            finish_then_close(send, &conn, close::PROTOCOL, b"bad hello").await;
            return;
        }
        Err(e) => {
            let reason = match &e {
                HelloError::Decode(d) => d.reason(),
                HelloError::Timeout => "no_hello",
                HelloError::Stream(_) => "no_hello",
            };
            let r = refuse(reason, e.to_string());
            let _ = write_control(&mut send, &r).await;
            finish_then_close(send, &conn, close::PROTOCOL, b"bad hello").await;
            return;
        }
    };

    let saved = match role {
        JoinRole::Play => ctx.saved_components(player).await,
        JoinRole::Standby => Ok(None),
    };
    let saved = match saved {
        Ok(s) => s,
        Err(e) => {
            let r = refuse(
                "store_unavailable",
                format!("the player's saved state cannot be read now ({e}); join again with a new ticket"),
            );
            let _ = write_control(&mut send, &r).await;
            finish_then_close(send, &conn, close::REFUSED, b"store unavailable").await;
            return;
        }
    };
    let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = ConnTx::channel(OUTBOUND_QUEUE, CONTROL_QUEUE);
    let joined = SimIn::Joined { conn: id, player, name: name.clone(), role, spawn, saved, tx };
    if ctx.sim.send_timeout(joined, Duration::from_secs(1)).await.is_err() {
        let r = refuse("server_busy", "the simulation is not accepting players".into());
        let _ = write_control(&mut send, &r).await;
        finish_then_close(send, &conn, close::REFUSED, b"busy").await;
        return;
    }
    info!(%remote, conn = id, %player, ?role, "player connected");
    // The directory (Redis) says where the player plays; off the hello's path.
    let located = (role == JoinRole::Play).then(|| {
        let (cache, server) = (ctx.cache.clone(), ctx.tickets.server.0);
        tokio::spawn(async move { cache.set_location(player.0, server).await })
    });

    // Writer: what the tick thread sends this connection.
    let writer = {
        let conn = conn.clone();
        let metrics = ctx.metrics.clone();
        let cache = ctx.cache.clone();
        tokio::spawn(async move {
            loop {
                // Control frames first: a reliable frame never waits behind
                // a queue of snapshots.
                let out = tokio::select! {
                    biased;
                    _ = rx.kicked.cancelled() => {
                        // The frame that did not fit is counted where it was sent.
                        warn!(%player, "the client does not read its control stream; closing");
                        conn.close(close::TOO_SLOW.into(), b"control stream not read");
                        break;
                    }
                    c = rx.control.recv() => c.map(Outbound::Control),
                    d = rx.datagrams.recv() => d.map(Outbound::Datagram),
                };
                let Some(out) = out else { break };
                match out {
                    Outbound::Datagram(b) => {
                        if let Err(e) = conn.send_datagram(b) {
                            let reason = match e {
                                quinn::SendDatagramError::TooLarge => "too_large",
                                quinn::SendDatagramError::ConnectionLost(_) => break,
                                _ => "send_failed",
                            };
                            metrics.datagrams_dropped.with_label_values(&[reason]).inc();
                        }
                    }
                    Outbound::Control(msg) => {
                        let refused = matches!(msg, ServerControl::Refused { .. });
                        if let ServerControl::EditResult { outcome: EditOutcome::Done { changed }, .. } = &msg
                            && *changed > 0
                        {
                            // The leaderboard of voxels changed (Redis; dropped while it is down).
                            let (cache, changed) = (cache.clone(), f64::from(*changed));
                            tokio::spawn(async move { cache.add_score(VOXELS_BOARD, player.0, changed).await });
                        }
                        if !write_control(&mut send, &msg).await {
                            break;
                        }
                        if refused {
                            finish_then_close(send, &conn, close::REFUSED, b"refused").await;
                            break;
                        }
                    }
                }
            }
        })
    };

    // Reader: datagrams and control frames from the client. The frames come
    // from one stream kept across the loop's turns: a frame read dropped
    // half way by `select!` would lose the bytes it had taken and misalign
    // every frame after it.
    let mut inputs = shared::rate::TokenBucket::new(ctx.limits.inputs_per_s, ctx.limits.inputs_burst, now_s());
    let mut frames = std::pin::pin!(futures::stream::unfold(recv, |mut r| async move {
        let f = read_frame::<ClientControl>(&mut r).await;
        Some((f, r))
    }));
    let reason = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(bytes) => on_datagram(&ctx, id, bytes, &mut inputs),
                Err(e) => break format!("{e}"),
            },
            Some(f) = futures::StreamExt::next(&mut frames) => match f {
                Ok(ClientControl::Bye) => {
                    conn.close(close::NORMAL.into(), b"bye");
                    break "bye".to_owned();
                }
                Ok(ClientControl::Hello { .. }) => {
                    m.datagrams_dropped.with_label_values(&["duplicate_hello"]).inc();
                }
                Ok(ClientControl::Chat { text }) if role == JoinRole::Play => chat(&ctx, player, &name, text),
                Ok(ClientControl::Chat { .. }) => {
                    m.world_events.with_label_values(&["invalid"]).inc();
                }
                Ok(ClientControl::Edit { id: edit_id, op }) => {
                    // Edits are few and reliable: wait for room rather than drop one.
                    if ctx.sim.send_timeout(SimIn::Edit { conn: id, id: edit_id, op }, Duration::from_secs(1)).await.is_err() {
                        m.datagrams_dropped.with_label_values(&["sim_busy"]).inc();
                    }
                }
                Err(HelloError::Decode(e)) => {
                    m.datagrams_dropped.with_label_values(&[e.reason()]).inc();
                    conn.close(close::PROTOCOL.into(), b"bad control frame");
                    break format!("bad control frame: {e}");
                }
                Err(e) => break e.to_string(),
            },
            _ = stop.cancelled() => {
                conn.close(close::SHUTDOWN.into(), b"server shutting down");
                break "shutdown".to_owned();
            }
        }
    };
    writer.abort();
    if let Some(set) = located {
        let (cache, server) = (ctx.cache.clone(), ctx.tickets.server.0);
        tokio::spawn(async move {
            let _ = set.await;
            cache.clear_location(player.0, server).await;
        });
    }
    if ctx.sim.send_timeout(SimIn::Left { conn: id }, Duration::from_secs(5)).await.is_err() {
        warn!(conn = id, "could not tell the simulation a player left");
    }
    info!(%remote, conn = id, %player, %reason, "player disconnected");
}

fn on_datagram(ctx: &NetContext, conn: u64, bytes: Bytes, inputs: &mut shared::rate::TokenBucket) {
    ctx.metrics.bytes_received.inc_by(bytes.len() as u64);
    if !inputs.take(now_s()) {
        ctx.metrics.datagrams_dropped.with_label_values(&["rate_limited"]).inc();
        return;
    }
    match Datagram::decode_input(&bytes) {
        Ok(frame) => {
            if ctx.sim.try_send(SimIn::Input { conn, frame }).is_err() {
                ctx.metrics.datagrams_dropped.with_label_values(&["sim_busy"]).inc();
            }
        }
        Err(e) => ctx.metrics.datagrams_dropped.with_label_values(&[e.reason()]).inc(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::component::builtin::Kind;
    use shared::component::{Component as _, ComponentSet, Registry};

    #[tokio::test]
    async fn a_playing_join_reads_its_saved_components_and_keeps_what_this_build_accepts() {
        let store = persistence::open(&persistence::StoreConfig::default()).await.expect("memory store");
        let metrics = Metrics::new();
        let registry = Registry::builtin();
        let dropped = |reason: &str| metrics.saved_components_dropped.with_label_values(&[reason]).get();
        let read = |p: u64| saved_components(store.load_progress(PlayerId(p)), &registry, &metrics, PlayerId(p));
        assert_eq!(read(1).await, Ok(None), "never saved");
        let save = |p: u64, components: Vec<u8>| {
            let store = store.clone();
            async move {
                let progress = persistence::Progress {
                    player: PlayerId(p),
                    version: 1,
                    position: [0.0; 3],
                    inventory: serde_json::json!([]),
                    stats: serde_json::json!({}),
                    components,
                };
                store.save_progress(&progress).await.expect("saved");
            }
        };
        // Its kind, and a component of a build that had id 1500 (gone).
        let mut with_gone = Vec::new();
        shared::component::put::varint(&mut with_gone, 2);
        for (id, body) in [(Kind::ID, vec![0u8]), (1500, vec![1, 2])] {
            shared::component::put::varint(&mut with_gone, u64::from(id));
            shared::component::put::varint(&mut with_gone, body.len() as u64);
            with_gone.extend_from_slice(&body);
        }
        save(2, with_gone).await;
        let mut kind = ComponentSet::new();
        kind.set(&Kind::Player);
        assert_eq!(read(2).await, Ok(Some(kind)), "the kind kept");
        assert_eq!(dropped("unknown_component"), 1);
        // Broken framing: it starts without, counted.
        save(3, vec![5, 2]).await;
        assert_eq!(read(3).await, Ok(None));
        assert_eq!(dropped("truncated"), 1);
    }
}
