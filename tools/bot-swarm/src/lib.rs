//! Headless bots that speak the full player protocol over QUIC.
//!
//! Each bot asks the coordinator which server owns its spawn point, joins it,
//! sends input datagrams at 90 Hz to every server it is connected to, walks a
//! path of waypoints from the positions the authoritative snapshots give it,
//! pre-connects to neighbours when told to, and records what it saw: snapshot
//! rate, acknowledged input sequence numbers per server, authority changes.

pub mod behaviour;
pub mod report;
pub mod tls;
pub mod work;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use glam::DVec3;
use serde::{Deserialize, Serialize};
use shared::edit::EditOp;
use shared::wire::{
    ALPN, ClientControl, EditOutcome, InputFrame, JoinRole, PROTOCOL_VERSION, ServerControl, Snapshot, buttons,
    decode_frame, encode_frame, frame_len,
};
use shared::{EntityId, PlayerId, ServerId, TICK_HZ};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a login or an account creation may take. The coordinator
/// hashes passwords a few at a time, so a ramp of hundreds of bots queues
/// there: a bot that gave up early and asked again would only lengthen the
/// queue (and spend its name's login allowance).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A bot that hears nothing from any server this long reconnects.
const SILENCE: Duration = Duration::from_secs(3);

/// What a swarm run is asked to do.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Coordinator HTTP API, e.g. `http://127.0.0.1:8080`.
    pub coordinator: String,
    pub bots: u32,
    /// Stop after this long (`None`: until cancelled).
    pub duration: Option<Duration>,
    pub auth: BotAuth,
    /// Waypoints every bot walks in a loop; bot `i` is shifted `i * spread_m` along Z.
    pub path: Vec<DVec3>,
    pub spread_m: f64,
    /// Player ids are `first_player + i`.
    pub first_player: u64,
    /// Bots start this far apart.
    pub ramp: Duration,
    /// Bearer token for the coordinator's admin views (the sampler reads
    /// `/v1/servers`), when it has a viewer token.
    pub view_token: Option<String>,
    /// Behaviours and their weights; `None`: every bot walks `path`.
    pub mix: Option<Vec<(behaviour::Behaviour, u32)>>,
    /// Seed of the behaviours' draw and waypoints.
    pub seed: u64,
    /// Where crowding bots gather (x, z); default: the middle of the first region.
    pub hotspot: Option<glam::DVec2>,
    /// Free hands gesture and heads look around every tick, as VR players'
    /// do ([`work::gesture`]); off: they hold still.
    pub gesture: bool,
}

/// How bots get in.
#[derive(Debug, Clone)]
pub enum BotAuth {
    /// Log in through the coordinator as `<prefix><first_player + i>`,
    /// creating the account on first use; tickets come from the login and,
    /// for pre-connects, from the session.
    Login { prefix: String, password: String },
    /// Servers started with `--dev-token` accept this token as any player:
    /// bot `i` is player `first_player + i`.
    DevToken(String),
}

/// Live counters, readable while the swarm runs.
#[derive(Debug, Default)]
pub struct Live {
    pub connected: AtomicU64,
    pub snapshots: AtomicU64,
    pub handoffs: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Snapshots that could not be decoded (their baseline was lost).
    pub undecoded: Arc<AtomicU64>,
    /// The components the snapshots carried, and how often the nearest
    /// avatars' rigs arrived.
    pub components: Arc<std::sync::Mutex<ComponentTally>>,
    /// The sampler's latest RTT p50 and p99, µs (for the progress line).
    pub rtt_p50_us: AtomicU64,
    pub rtt_p99_us: AtomicU64,
    /// Bytes at the bots' UDP sockets (QUIC's own included).
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// RTT samples (µs) since the sampler last took them.
    pub rtt_us: std::sync::Mutex<Vec<u32>>,
}

/// Acknowledgements one bot saw from one server while it was authoritative.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AckSpan {
    pub first_seq: u32,
    pub last_seq: u32,
    pub snapshots: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityChange {
    pub from: Option<u32>,
    pub to: u32,
    /// Server tick of the first authoritative snapshot from `to`.
    pub tick: u64,
    /// Newest input the new server had applied in that snapshot.
    pub acked_seq: u32,
    /// Newest input the old server had applied in its last snapshot.
    pub previous_acked_seq: u32,
}

/// What one bot saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BotReport {
    pub player: u64,
    /// What it did (`wander`, `commute`, `oscillate`, `crowd`, `path`).
    #[serde(default)]
    pub behaviour: String,
    pub joined: bool,
    pub inputs_sent: u32,
    pub snapshots: u64,
    pub authority_changes: Vec<AuthorityChange>,
    pub acks_by_server: BTreeMap<u32, AckSpan>,
    /// Times an authoritative snapshot acknowledged an older input than an
    /// earlier-ticked one: an input applied twice or out of order.
    pub ack_regressions: u64,
    /// Authoritative snapshots that arrived after a newer one and were ignored.
    pub stale_snapshots: u64,
    pub max_snapshot_gap_ms: u64,
    /// Largest step between the ticks of two successive authoritative
    /// snapshots (1: none missed), across handoffs too: what the mesh sent,
    /// apart from how late this process got to read it.
    #[serde(default)]
    pub max_snapshot_gap_ticks: u64,
    /// At each handoff: the new server's first snapshot tick less the old
    /// server's last.
    #[serde(default)]
    pub handoff_gap_ticks: Vec<u64>,
    /// Snapshots decoded but dropped because this bot's queue was full (it
    /// fell behind): gaps it saw that the mesh did not make.
    #[serde(default)]
    pub snapshots_dropped: u64,
    pub connections_opened: u32,
    /// Pre-connects that began with the standby ticket that came in the
    /// server's hint (no round trip to the coordinator).
    #[serde(default)]
    pub hinted_tickets: u32,
    /// Times it joined again after losing every connection.
    #[serde(default)]
    pub reconnects: u32,
    /// At each handoff: ms from the old server's last authoritative snapshot
    /// to the new server's first.
    #[serde(default)]
    pub handoff_gaps_ms: Vec<f64>,
    pub final_position: Option<[f64; 3]>,
    pub errors: Vec<String>,
    /// What a `dig_build` or `grab_throw` bot did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<work::WorkStats>,
    /// Milliseconds from sending an edit to its `Done` (durable in the store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edit_ms: Vec<f64>,
    /// Refused edits by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub edit_rejections: BTreeMap<String, u32>,
    /// Chunks of player edits streamed to it (terrain beyond the seed), and their voxels.
    #[serde(default)]
    pub chunk_edits: u32,
    #[serde(default)]
    pub chunk_edit_voxels: u64,
}

/// What the whole swarm saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmReport {
    pub bots: u32,
    pub joined: u32,
    pub seconds: f64,
    pub snapshots: u64,
    pub handoffs: u64,
    pub ack_regressions: u64,
    pub errors: u64,
    /// Snapshots a bot could not decode (a delta against a baseline lost on the way).
    #[serde(default)]
    pub undecoded_snapshots: u64,
    /// Chunks of player edits streamed to the bots.
    #[serde(default)]
    pub chunk_edits: u64,
    /// Over the whole run, from every bot's QUIC connections.
    #[serde(default)]
    pub rtt_p50_ms: f64,
    #[serde(default)]
    pub rtt_p99_ms: f64,
    /// Mean bandwidth per connected bot at the UDP socket.
    #[serde(default)]
    pub up_kbps_per_bot: f64,
    #[serde(default)]
    pub down_kbps_per_bot: f64,
    #[serde(default)]
    pub handoff_gap_p50_ms: f64,
    #[serde(default)]
    pub handoff_gap_p99_ms: f64,
    /// Every handoff gap of every bot (for the histogram).
    #[serde(default)]
    pub handoff_gaps_ms: Vec<f64>,
    #[serde(default)]
    pub timeline: report::Timeline,
    /// What the `dig_build` and `grab_throw` bots did, all together.
    #[serde(default)]
    pub work: WorkSummary,
    /// What the swarm process itself cost, and so what one bot costs.
    #[serde(default)]
    pub process: ProcessCost,
    /// The components in the snapshots, kbit/s per connected bot by
    /// component name (records' bytes: id, length and value, not the
    /// datagram's other bytes).
    #[serde(default)]
    pub component_kbps_per_bot: BTreeMap<String, f64>,
    /// How often each of the nearest ten avatars' rigs reached a bot, Hz
    /// (their rigs move every tick: 90 at most).
    #[serde(default)]
    pub near_rig_hz: f64,
    pub per_bot: Vec<BotReport>,
}

/// The swarm process's own cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessCost {
    /// Peak resident memory of the process, and that before any bot started, MiB.
    pub rss_peak_mib: f64,
    pub rss_before_bots_mib: f64,
    /// (peak − before) ÷ bots that joined, KiB.
    pub kib_per_bot: f64,
    /// CPU time (user + system) of the whole run.
    pub cpu_seconds: f64,
    /// CPU per bot: milliseconds of CPU per second a bot was connected
    /// (1000 would be one core per bot).
    pub cpu_ms_per_bot_second: f64,
    /// Input frames each connected bot sent a second (90 while the process
    /// keeps up with its bots).
    pub input_hz_per_bot: f64,
}

/// The swarm's edits, grabs and throws.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkSummary {
    pub edits_sent: u64,
    pub edits_done: u64,
    pub edits_rejected: u64,
    pub edit_rejections: BTreeMap<String, u64>,
    /// From sending an edit to its `Done` (durable in the world store).
    pub edit_p50_ms: f64,
    pub edit_p99_ms: f64,
    pub edit_ms: Vec<f64>,
    pub grips: u64,
    pub throws: u64,
    pub props_flew: u64,
    pub props_stayed: u64,
    pub props_unseen: u64,
}

impl WorkSummary {
    fn of(bots: &[BotReport]) -> Self {
        let mut w = WorkSummary::default();
        for b in bots {
            if let Some(s) = &b.work {
                w.edits_sent += u64::from(s.edits_sent);
                w.edits_done += u64::from(s.edits_done);
                w.edits_rejected += u64::from(s.edits_rejected);
                w.grips += u64::from(s.grips);
                w.throws += u64::from(s.throws);
                w.props_flew += u64::from(s.props_flew);
                w.props_stayed += u64::from(s.props_stayed);
                w.props_unseen += u64::from(s.props_unseen);
            }
            for (reason, n) in &b.edit_rejections {
                *w.edit_rejections.entry(reason.clone()).or_default() += u64::from(*n);
            }
            w.edit_ms.extend_from_slice(&b.edit_ms);
        }
        w.edit_p50_ms = report::percentile(&mut w.edit_ms, 0.5);
        w.edit_p99_ms = report::percentile(&mut w.edit_ms, 0.99);
        w
    }
}

#[derive(Debug, Deserialize)]
struct Route {
    server_id: u32,
    quic: String,
    cert_sha256: String,
}

enum Event {
    Snapshot(ServerId, Snapshot),
    Control(ServerId, ServerControl),
    Linked(ServerId, Link),
    /// A pre-connect gave up after its tries.
    NotLinked(ServerId),
    Closed(ServerId, String),
}

/// What a connection's pump task counts into.
struct Pump {
    undecoded: Arc<AtomicU64>,
    arrivals: Arc<std::sync::Mutex<Arrivals>>,
    components: Arc<std::sync::Mutex<ComponentTally>>,
}

/// Snapshots a link books before adding its tally to the swarm's.
const TALLY_EVERY: u32 = 64;

/// Avatars whose rig arrivals are counted: the nearest this many.
pub const NEAR_AVATARS: usize = 10;

/// The components snapshots carried to the bots.
#[derive(Debug, Default, Clone)]
pub struct ComponentTally {
    /// Per component id: bytes of its records (id and length included).
    pub bytes: BTreeMap<u16, u64>,
    /// Rig updates of the [`NEAR_AVATARS`] nearest avatars each snapshot saw.
    pub near_rig_updates: u64,
    /// Ticks those avatars were watched, summed over them.
    pub near_avatar_ticks: u64,
}

impl ComponentTally {
    /// Adds `other` to this one and empties it.
    fn add(&mut self, other: &mut ComponentTally) {
        for (id, b) in std::mem::take(&mut other.bytes) {
            *self.bytes.entry(id).or_default() += b;
        }
        self.near_rig_updates += std::mem::take(&mut other.near_rig_updates);
        self.near_avatar_ticks += std::mem::take(&mut other.near_avatar_ticks);
    }

    /// Books one decoded snapshot of a link whose player is `me`: the
    /// components it carried, and which of the nearest avatars' rigs came
    /// after `ticks` ticks since the link's last snapshot.
    fn book(&mut self, r: &shared::snapshot::Receiver, s: &Snapshot, me: EntityId, ticks: u64) {
        use shared::component::Component as _;
        use shared::component::builtin::VrRig;
        let mut rigs: Vec<EntityId> = Vec::new();
        for (e, id, b) in r.last_changes().iter() {
            *self.bytes.entry(id).or_default() += b.len() as u64 + 2;
            if id == VrRig::ID {
                rigs.push(e);
            }
        }
        let Some(at) = s.entities.iter().find(|e| e.id == me).map(|e| e.pos) else { return };
        // Avatars are players (a lookup of each entity's components would
        // cost the swarm more than the decoding).
        let mut near: Vec<(f64, EntityId)> = s
            .entities
            .iter()
            .filter(|e| e.id != me && e.id.as_player().is_some())
            .map(|e| (e.pos.distance_squared(at), e.id))
            .collect();
        if near.len() > NEAR_AVATARS {
            near.select_nth_unstable_by(NEAR_AVATARS, |a, b| a.0.total_cmp(&b.0));
            near.truncate(NEAR_AVATARS);
        }
        self.near_rig_updates += near.iter().filter(|(_, id)| rigs.contains(id)).count() as u64;
        self.near_avatar_ticks += near.len() as u64 * ticks;
    }
}

/// A bot's connection to one server: datagrams go straight onto it, control
/// frames through its pump task.
struct Link {
    conn: quinn::Connection,
    ctl: mpsc::Sender<ClientControl>,
    /// Newest snapshot tick decoded from this server (its next baseline).
    acked: Arc<AtomicU64>,
}

/// What a bot knows of its current session; a reconnect starts a new one.
#[derive(Debug, Default)]
struct Session {
    /// The server whose snapshots are authoritative for the avatar.
    authority: Option<ServerId>,
    /// Newest input acknowledged by an authoritative snapshot.
    last_ack: u32,
    last_snapshot: Option<Instant>,
}

/// Runs the swarm until its duration passes or `stop` is cancelled.
pub async fn run(cfg: SwarmConfig, live: Arc<Live>, stop: CancellationToken) -> anyhow::Result<SwarmReport> {
    anyhow::ensure!(cfg.mix.is_some() || !cfg.path.is_empty(), "the path needs at least one waypoint");
    let started = Instant::now();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    // Fail fast and clearly when the coordinator is not there at all.
    http.get(format!("{}/healthz", cfg.coordinator))
        .send()
        .await
        .with_context(|| format!("the coordinator at {} does not answer", cfg.coordinator))?;
    let mut endpoints: Vec<quinn::Endpoint> = Vec::new();
    let deadline_stop = stop.child_token();
    if let Some(d) = cfg.duration {
        let s = deadline_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    let sampler = tokio::spawn(report::sample(
        live.clone(),
        http.clone(),
        cfg.coordinator.clone(),
        cfg.view_token.clone(),
        deadline_stop.clone(),
    ));
    let world = match &cfg.mix {
        Some(_) => Some(world_of(&http, &cfg).await?),
        None => None,
    };
    let usage_before = svc::usage().unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.bots {
        if deadline_stop.is_cancelled() {
            break;
        }
        let (behaviour, path) = match (&cfg.mix, world) {
            (Some(mix), Some((w, first))) => behaviour::plan(mix, cfg.seed, i, w, cfg.hotspot.unwrap_or(first)),
            _ => {
                let shift = DVec3::new(0.0, 0.0, f64::from(i) * cfg.spread_m);
                (behaviour::Behaviour::Path, cfg.path.iter().map(|p| *p + shift).collect())
            }
        };
        let env = BotEnv {
            endpoint: endpoint_for(&mut endpoints, i)?,
            http: http.clone(),
            live: live.clone(),
            stop: deadline_stop.clone(),
        };
        tasks.spawn(Bot::new(&cfg, i, behaviour, path, env).run());
        tokio::select! {
            _ = tokio::time::sleep(cfg.ramp) => {}
            _ = deadline_stop.cancelled() => {}
        }
    }
    let mut per_bot = Vec::new();
    while let Some(r) = tasks.join_next().await {
        per_bot.push(r.context("a bot task panicked")?);
    }
    for e in &endpoints {
        e.wait_idle().await;
    }
    deadline_stop.cancel();
    let mut timeline = sampler.await.unwrap_or_default();
    per_bot.sort_by_key(|b| b.player);
    let seconds = started.elapsed().as_secs_f64();
    let mut gaps: Vec<f64> = per_bot.iter().flat_map(|b| b.handoff_gaps_ms.iter().copied()).collect();
    let mut rtt = std::mem::take(&mut timeline.rtt_all_ms);
    let bot_seconds: f64 = timeline.samples.iter().map(|s| s.connected as f64).sum::<f64>().max(1.0);
    let kbps = |bytes: u64| bytes as f64 * 8.0 / 1000.0 / bot_seconds;
    let usage = svc::usage().unwrap_or_default();
    let joined = per_bot.iter().filter(|b| b.joined).count();
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let process = ProcessCost {
        rss_peak_mib: mib(usage.max_rss_kib),
        rss_before_bots_mib: mib(usage_before.max_rss_kib),
        kib_per_bot: (usage.max_rss_kib.saturating_sub(usage_before.max_rss_kib) as f64 / joined.max(1) as f64).round(),
        cpu_seconds: (usage.cpu_seconds * 100.0).round() / 100.0,
        cpu_ms_per_bot_second: (usage.cpu_seconds * 1000.0 / bot_seconds * 100.0).round() / 100.0,
        input_hz_per_bot: (per_bot.iter().map(|b| f64::from(b.inputs_sent)).sum::<f64>() / bot_seconds * 10.0).round()
            / 10.0,
    };
    let tally = live.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let registry = shared::component::Registry::builtin();
    let component_kbps_per_bot = tally
        .bytes
        .iter()
        .map(|(id, b)| {
            let name = registry.name(*id).map_or_else(|| format!("component_{id}"), str::to_owned);
            (name, (kbps(*b) * 10.0).round() / 10.0)
        })
        .collect();
    let near_rig_hz = if tally.near_avatar_ticks == 0 {
        0.0
    } else {
        (tally.near_rig_updates as f64 * 90.0 / tally.near_avatar_ticks as f64 * 10.0).round() / 10.0
    };
    Ok(SwarmReport {
        component_kbps_per_bot,
        near_rig_hz,
        rtt_p50_ms: report::percentile(&mut rtt, 0.5),
        rtt_p99_ms: report::percentile(&mut rtt, 0.99),
        up_kbps_per_bot: (kbps(live.bytes_up.load(Ordering::Relaxed)) * 10.0).round() / 10.0,
        down_kbps_per_bot: (kbps(live.bytes_down.load(Ordering::Relaxed)) * 10.0).round() / 10.0,
        handoff_gap_p50_ms: report::percentile(&mut gaps, 0.5),
        handoff_gap_p99_ms: report::percentile(&mut gaps, 0.99),
        handoff_gaps_ms: gaps,
        timeline,
        work: WorkSummary::of(&per_bot),
        undecoded_snapshots: live.undecoded.load(Ordering::Relaxed),
        chunk_edits: per_bot.iter().map(|b| u64::from(b.chunk_edits)).sum(),
        process,
        bots: cfg.bots,
        joined: per_bot.iter().filter(|b| b.joined).count() as u32,
        seconds,
        snapshots: per_bot.iter().map(|b| b.snapshots).sum(),
        handoffs: per_bot.iter().map(|b| b.authority_changes.iter().filter(|c| c.from.is_some()).count() as u64).sum(),
        ack_regressions: per_bot.iter().map(|b| b.ack_regressions).sum(),
        errors: per_bot.iter().map(|b| b.errors.len() as u64).sum(),
        per_bot,
    })
}

/// Bots that share one UDP socket (and one endpoint driver task). One
/// socket for thousands of bots would take hundreds of thousands of
/// datagrams a second, more than one task and one kernel buffer keep up with.
const BOTS_PER_SOCKET: u32 = 100;

/// The endpoint of bot `i`, made when its group's first bot starts.
fn endpoint_for(endpoints: &mut Vec<quinn::Endpoint>, i: u32) -> anyhow::Result<quinn::Endpoint> {
    let k = (i / BOTS_PER_SOCKET) as usize;
    while endpoints.len() <= k {
        let (socket, _) = svc::udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)), 4 << 20)?;
        let e = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
            .context("starting a QUIC client endpoint")?;
        endpoints.push(e);
    }
    Ok(endpoints[k].clone())
}

/// The world's horizontal extent and the middle of its first region, from
/// the coordinator's region map.
async fn world_of(http: &reqwest::Client, cfg: &SwarmConfig) -> anyhow::Result<(behaviour::World, glam::DVec2)> {
    let url = format!("{}/v1/regions", cfg.coordinator);
    let mut req = http.get(&url);
    if let Some(t) = &cfg.view_token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(r.status().is_success(), "{url} answered {} (a viewer token needed?)", r.status());
    let regions: Vec<serde_json::Value> = r.json().await?;
    let mut min = glam::DVec2::splat(f64::INFINITY);
    let mut max = glam::DVec2::splat(f64::NEG_INFINITY);
    let mut first = None;
    for g in &regions {
        let (Some(lo), Some(hi)) = (g["min"].as_array(), g["max"].as_array()) else { continue };
        let f = |v: &[serde_json::Value], k: usize| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        let (a, b) = (glam::DVec2::new(f(lo, 0), f(lo, 2)), glam::DVec2::new(f(hi, 0), f(hi, 2)));
        min = min.min(a);
        max = max.max(b);
        first.get_or_insert((a + b) / 2.0);
    }
    let first = first.context("the coordinator lists no regions")?;
    Ok((behaviour::World { min, max }, first))
}

/// What every bot of a swarm shares.
struct BotEnv {
    endpoint: quinn::Endpoint,
    http: reqwest::Client,
    live: Arc<Live>,
    stop: CancellationToken,
}

struct Bot {
    player: PlayerId,
    name: String,
    coordinator: String,
    auth: BotAuth,
    /// The login session of a logged-in bot, for more tickets.
    login_session: Option<String>,
    path: Vec<DVec3>,
    endpoint: quinn::Endpoint,
    http: reqwest::Client,
    live: Arc<Live>,
    stop: CancellationToken,
    report: BotReport,
    /// Hands and tools, for the behaviours that use them.
    work: Option<work::Work>,
    gesture: bool,
    next_edit: u32,
    edits_in_flight: HashMap<u32, Instant>,
    /// What its pumps saw arrive.
    arrivals: Arc<std::sync::Mutex<Arrivals>>,
}

/// What a bot's pumps record of its authoritative snapshots as they arrive,
/// before the bot's own queue: what the mesh delivered, apart from how late
/// a busy bot gets to read it.
#[derive(Debug, Default)]
struct Arrivals {
    /// Server and tick of the newest authoritative snapshot (none at the
    /// start of a session).
    last: Option<(ServerId, u64)>,
    max_gap_ticks: u64,
    /// At each change of server: the new one's first tick less the old one's last.
    handoff_gap_ticks: Vec<u64>,
    /// Snapshots decoded but dropped because the bot's queue was full.
    dropped: u64,
}

impl Arrivals {
    fn book(&mut self, server: ServerId, tick: u64) {
        match self.last {
            Some((_, t)) if tick <= t => {}
            Some((from, t)) => {
                self.max_gap_ticks = self.max_gap_ticks.max(tick - t);
                if from != server {
                    self.handoff_gap_ticks.push(tick - t);
                }
                self.last = Some((server, tick));
            }
            None => self.last = Some((server, tick)),
        }
    }
}

impl Bot {
    /// Bot `i` of the swarm, doing `behaviour` along `path`.
    fn new(cfg: &SwarmConfig, i: u32, behaviour: behaviour::Behaviour, path: Vec<DVec3>, env: BotEnv) -> Self {
        let player = PlayerId(cfg.first_player + u64::from(i));
        let name = match &cfg.auth {
            BotAuth::Login { prefix, .. } => format!("{prefix}{}", player.0),
            BotAuth::DevToken(_) => format!("bot-{}", player.0),
        };
        // Builds are staggered over the build period, the same for a seed.
        let first_build =
            (behaviour::Rng::new(cfg.seed ^ u64::from(i)).next_u64() % u64::from(work::BUILD_EVERY)) as u32;
        let work = match behaviour {
            behaviour::Behaviour::DigBuild => Some(work::Work::new(work::Trade::DigBuild, first_build + 90)),
            behaviour::Behaviour::GrabThrow | behaviour::Behaviour::ThrowOver => {
                Some(work::Work::new(work::Trade::GrabThrow, first_build + 90))
            }
            _ => None,
        };
        Self {
            player,
            name,
            coordinator: cfg.coordinator.clone(),
            auth: cfg.auth.clone(),
            login_session: None,
            path,
            endpoint: env.endpoint,
            http: env.http,
            live: env.live,
            stop: env.stop,
            report: BotReport { player: player.0, behaviour: behaviour.name().to_owned(), ..Default::default() },
            gesture: cfg.gesture,
            work,
            next_edit: 0,
            arrivals: Arc::default(),
            edits_in_flight: HashMap::new(),
        }
    }

    fn error(&mut self, e: String) {
        warn!(player = %self.player, error = %e, "bot error");
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        if self.report.errors.len() < 20 {
            self.report.errors.push(e);
        }
    }

    async fn route(&self, p: DVec3) -> anyhow::Result<Route> {
        let url = format!("{}/v1/route?x={}&y={}&z={}", self.coordinator, p.x, p.y, p.z);
        let r = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(r.status().is_success(), "no server owns the spawn point yet ({})", r.status());
        Ok(r.json().await?)
    }

    async fn run(mut self) -> BotReport {
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let spawn = self.path[0];
        // Join the server that owns the spawn point; retry while the mesh settles.
        let primary = self.join(spawn, &tx, 20).await;
        let Some((first, link)) = primary else { return self.report };
        self.report.joined = true;
        self.live.connected.fetch_add(1, Ordering::Relaxed);
        let mut links: HashMap<ServerId, Link> = HashMap::from([(first, link)]);

        let mut seq: u32 = 0;
        let mut pos = spawn;
        let mut yaw = 0.0f32;
        let mut waypoint = 1 % self.path.len();
        // Where the bot was when it last made progress, and the input then.
        let mut stall = (spawn, 0u32);
        // Each bot gestures on its own rhythm.
        let gesture_phase = (self.player.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 / (1u64 << 24) as f32;
        let mut session = Session::default();
        // Ticks are the mesh's grid, shared by every server and session.
        let mut newest_auth_tick = 0;
        let mut props: Vec<(EntityId, DVec3)> = Vec::new();
        let mut every = tokio::time::interval(Duration::from_nanos(1_000_000_000 / u64::from(TICK_HZ)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut buf = Vec::with_capacity(128);
        // UDP bytes already counted, per connection.
        let mut counted: HashMap<ServerId, (u64, u64)> = HashMap::new();
        // When any server last sent anything: a server that dies without
        // closing (SIGKILL, a cut) goes silent long before QUIC times out.
        let mut last_heard = Instant::now();
        let mut rejoin = false;
        // Servers being pre-connected to, and the addresses hints gave.
        let mut pending: HashSet<ServerId> = HashSet::new();
        let mut known: HashMap<ServerId, (SocketAddr, String)> = HashMap::new();
        loop {
            tokio::select! {
                _ = every.tick() => {
                    seq = seq.wrapping_add(1);
                    let act = self.work.as_mut().map(|w| w.step(seq, work::Sight { pos, yaw, props: &props }));
                    let walk_to = act.as_ref().and_then(|a| a.walk_to);
                    if let Some(a) = &act
                        && let Some(op) = a.edit
                    {
                        self.send_edit(session.authority.and_then(|s| links.get(&s)), op);
                    }
                    let target = walk_to.unwrap_or(self.path[waypoint]);
                    let d = target - pos;
                    let flat = glam::DVec2::new(d.x, d.z);
                    if walk_to.is_none() && flat.length() < 1.5 {
                        waypoint = (waypoint + 1) % self.path.len();
                    }
                    let dir = if flat.length() > 1e-6 { flat / flat.length().max(2.0) } else { glam::DVec2::ZERO };
                    // Blocked by a wall for half a second while walking: jump.
                    let moved = glam::DVec2::new(pos.x - stall.0.x, pos.z - stall.0.z).length();
                    let jump = if moved > 0.3 || dir.length() < 0.2 {
                        stall = (pos, seq);
                        false
                    } else {
                        seq.wrapping_sub(stall.1) % 45 == 44
                    };
                    // Free hands gesture and the head looks around; at work
                    // the head and right hand do the work.
                    let (idle_head, left, idle_right) = if self.gesture {
                        work::gesture(seq, gesture_phase)
                    } else {
                        work::gesture(0, 0.0)
                    };
                    let (head, right, held) = act.map_or((idle_head, idle_right, 0), |a| (a.head, a.right, a.buttons));
                    let mut frame = InputFrame {
                        seq,
                        ack_tick: 0,
                        locomotion: [dir.x as f32, -dir.y as f32],
                        head,
                        left,
                        right,
                        buttons: held | if jump { buttons::JUMP } else { 0 },
                        ..Default::default()
                    };
                    // Each server deltas from the newest snapshot it sent that arrived.
                    for l in links.values() {
                        frame.ack_tick = l.acked.load(Ordering::Relaxed);
                        buf.clear();
                        frame.encode(&mut buf);
                        let _ = l.conn.send_datagram(Bytes::copy_from_slice(&buf));
                    }
                    self.report.inputs_sent = seq;
                    if seq.is_multiple_of(TICK_HZ) {
                        self.account(&links, session.authority, &mut counted);
                        if last_heard.elapsed() > SILENCE {
                            self.error(format!("no word from any server for {} s", SILENCE.as_secs()));
                            for l in links.values() {
                                l.conn.close(0u32.into(), b"silent");
                            }
                            links.clear();
                            rejoin = true;
                        }
                    }
                }
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if matches!(ev, Event::Snapshot(..) | Event::Control(..)) {
                        last_heard = Instant::now();
                    }
                    match ev {
                        Event::Snapshot(server, snap) => {
                            self.report.snapshots += 1;
                            self.live.snapshots.fetch_add(1, Ordering::Relaxed);
                            if !snap.authoritative {
                                continue;
                            }
                            // Servers share the tick grid: a snapshot older than one
                            // already seen (from either server) is stale.
                            if snap.tick <= newest_auth_tick {
                                self.report.stale_snapshots += 1;
                                continue;
                            }
                            newest_auth_tick = snap.tick;
                            self.on_authoritative(server, &snap, &mut session);
                            // Entities come sorted by id: find itself.
                            let me_id = EntityId::player(self.player).ok();
                            if let Some(me) = snap.entities.iter().find(|e| Some(e.id) == me_id) {
                                pos = me.pos;
                                yaw = glam::Quat::from_array(me.rot).to_euler(glam::EulerRot::YXZ).0;
                            }
                            if self.work.is_some() {
                                props.clear();
                                props.extend(
                                    snap.entities.iter().filter(|e| e.id.as_player().is_none()).map(|e| (e.id, e.pos)),
                                );
                            }
                        }
                        Event::Control(server, msg) => match msg {
                            ServerControl::PreConnect { server: to, quic_addr, cert_sha256, ticket } => {
                                match quic_addr.parse::<SocketAddr>() {
                                    Ok(addr) => {
                                        known.insert(to, (addr, cert_sha256));
                                        self.pre_connect(to, &links, &mut pending, &known, &tx, ticket);
                                    }
                                    Err(_) => self.error(format!("server {} sent a bad address {quic_addr:?}", server.0)),
                                }
                            }
                            ServerControl::AuthorityMoved { to, effective_tick } => {
                                debug!(player = %self.player, from = server.0, to = to.0, effective_tick, "told authority moves");
                                // Authority went where the bot has no link (a hint
                                // lost, a pre-connect that failed): link now.
                                self.pre_connect(to, &links, &mut pending, &known, &tx, None);
                            }
                            ServerControl::EditResult { id, outcome } => self.edit_answered(id, outcome),
                            ServerControl::ChunkEdits { voxels, .. } => {
                                self.report.chunk_edits += 1;
                                self.report.chunk_edit_voxels += voxels.len() as u64;
                            }
                            ServerControl::Refused { reason } => self.error(format!("server {} refused: {reason}", server.0)),
                            _ => {}
                        },
                        Event::Linked(server, link) => {
                            pending.remove(&server);
                            links.insert(server, link);
                        }
                        Event::NotLinked(server) => {
                            pending.remove(&server);
                        }
                        Event::Closed(server, why) => {
                            links.remove(&server);
                            if !self.stop.is_cancelled() {
                                self.error(format!("connection to server {} closed: {why}", server.0));
                            }
                            // Every link is gone (a server died, a network cut).
                            rejoin |= links.is_empty();
                        }
                    }
                }
                _ = self.stop.cancelled() => break,
            }
            if rejoin {
                // Join again where it stands, backing off: a new session,
                // whose acknowledgements start over.
                rejoin = false;
                // Before the new links' pumps book anything: a rejoin is
                // not a handoff, and its gap is not the mesh's.
                self.arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last = None;
                let Some((server, link)) = self.reconnect(pos, &tx).await else { break };
                links.insert(server, link);
                session = Session::default();
                props.clear();
                if let Some(w) = &mut self.work {
                    w.reset();
                }
                last_heard = Instant::now();
            }
        }
        for l in links.values() {
            l.conn.close(0u32.into(), b"bye");
        }
        self.live.connected.fetch_sub(1, Ordering::Relaxed);
        self.report.final_position = Some(pos.to_array());
        {
            let mut book = self.arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.report.max_snapshot_gap_ticks = book.max_gap_ticks;
            self.report.handoff_gap_ticks = std::mem::take(&mut book.handoff_gap_ticks);
            self.report.snapshots_dropped = book.dropped;
        }
        if let Some(w) = &self.work {
            self.report.work = Some(w.stats.clone());
        }
        self.report
    }

    /// Books an authoritative snapshot: gaps, authority changes (handoffs)
    /// and the order of acknowledged inputs.
    fn on_authoritative(&mut self, server: ServerId, snap: &Snapshot, session: &mut Session) {
        let now = Instant::now();
        let prev_snapshot = session.last_snapshot;
        if let Some(prev) = prev_snapshot {
            let gap = now.duration_since(prev).as_millis() as u64;
            self.report.max_snapshot_gap_ms = self.report.max_snapshot_gap_ms.max(gap);
        }
        session.last_snapshot = Some(now);
        if session.authority != Some(server) {
            if session.authority.is_some()
                && let Some(prev) = prev_snapshot
            {
                self.report.handoff_gaps_ms.push(now.duration_since(prev).as_secs_f64() * 1000.0);
            }
            self.report.authority_changes.push(AuthorityChange {
                from: session.authority.map(|s| s.0),
                to: server.0,
                tick: snap.tick,
                acked_seq: snap.last_input_seq,
                previous_acked_seq: session.last_ack,
            });
            if session.authority.is_some() {
                self.live.handoffs.fetch_add(1, Ordering::Relaxed);
                info!(player = %self.player, from = ?session.authority.map(|s| s.0), to = server.0, tick = snap.tick, "authority moved");
            }
            session.authority = Some(server);
        }
        if snap.last_input_seq < session.last_ack {
            self.report.ack_regressions += 1;
        }
        session.last_ack = session.last_ack.max(snap.last_input_seq);
        let span = self
            .report
            .acks_by_server
            .entry(server.0)
            .or_insert_with(|| AckSpan { first_seq: snap.last_input_seq, ..Default::default() });
        span.last_seq = span.last_seq.max(snap.last_input_seq);
        span.snapshots += 1;
    }

    /// Sends an edit to the server authoritative for the avatar.
    fn send_edit(&mut self, link: Option<&Link>, op: EditOp) {
        let Some(w) = self.work.as_mut() else { return };
        w.stats.edits_sent += 1;
        self.next_edit = self.next_edit.wrapping_add(1);
        let id = self.next_edit;
        match link {
            Some(l) if l.ctl.try_send(ClientControl::Edit { id, op }).is_ok() => {
                // Bounded: answers that never come (a link lost) age out.
                if self.edits_in_flight.len() >= 64 {
                    self.edits_in_flight.clear();
                }
                self.edits_in_flight.insert(id, Instant::now());
            }
            _ => w.edit_answered(false),
        }
    }

    fn edit_answered(&mut self, id: u32, outcome: EditOutcome) {
        let Some(sent) = self.edits_in_flight.remove(&id) else { return };
        let done = matches!(outcome, EditOutcome::Done { .. });
        if let EditOutcome::Rejected { reason } = outcome {
            *self.report.edit_rejections.entry(reason).or_default() += 1;
        } else {
            self.report.edit_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(w) = &mut self.work {
            w.edit_answered(done);
        }
    }

    /// Joins the server that owns `spawn` (logging in again when bots log
    /// in), trying up to `max_tries` times while the mesh settles.
    async fn join(&mut self, spawn: DVec3, tx: &mpsc::Sender<Event>, max_tries: u32) -> Option<(ServerId, Link)> {
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = async {
                let (route, ticket, spawn) = match self.auth.clone() {
                    BotAuth::DevToken(token) => (self.route(spawn).await?, token, Some(spawn)),
                    BotAuth::Login { password, .. } => {
                        let login = self.login(&password, spawn).await?;
                        self.player = PlayerId(login.player);
                        self.report.player = login.player;
                        self.login_session = Some(login.session);
                        let j = login.join;
                        let route = Route { server_id: j.server_id, quic: j.quic, cert_sha256: j.cert_sha256 };
                        (route, j.ticket, j.spawn.map(DVec3::from_array))
                    }
                };
                let addr: SocketAddr =
                    route.quic.parse().with_context(|| format!("bad QUIC address {}", route.quic))?;
                self.open(addr, &route.cert_sha256, JoinRole::Play, spawn, ticket, tx.clone())
                    .await
                    .map(|s| (s, route.server_id))
            }
            .await;
            match attempt {
                Ok(((server, link), _)) => break Some((server, link)),
                Err(e)
                    if tries < max_tries && !self.stop.is_cancelled() && e.downcast_ref::<LoginRefused>().is_none() =>
                {
                    debug!(player = %self.player, error = %format!("{e:#}"), "join failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = self.stop.cancelled() => break None,
                    }
                }
                Err(e) => {
                    self.error(format!("could not join: {e:#}"));
                    break None;
                }
            }
        }
    }

    /// Joins again after every connection was lost: 0.5 s, then twice as
    /// long each time up to 8 s, until it works or the run stops.
    async fn reconnect(&mut self, at: DVec3, tx: &mpsc::Sender<Event>) -> Option<(ServerId, Link)> {
        let mut wait = Duration::from_millis(500);
        while !self.stop.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return None,
            }
            self.report.reconnects += 1;
            self.live.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Some(joined) = self.join(at, tx, 1).await {
                info!(player = %self.player, server = joined.0.0, "reconnected");
                return Some(joined);
            }
            wait = (wait * 2).min(Duration::from_secs(8));
        }
        None
    }

    /// Adds what the connections moved since the last call to the swarm's
    /// byte counters, and samples the authoritative connection's RTT.
    fn account(
        &self,
        links: &HashMap<ServerId, Link>,
        authority: Option<ServerId>,
        counted: &mut HashMap<ServerId, (u64, u64)>,
    ) {
        for (server, l) in links {
            let st = l.conn.stats();
            let (tx, rx) = (st.udp_tx.bytes, st.udp_rx.bytes);
            let before = counted.insert(*server, (tx, rx)).unwrap_or((0, 0));
            self.live.bytes_up.fetch_add(tx.saturating_sub(before.0), Ordering::Relaxed);
            self.live.bytes_down.fetch_add(rx.saturating_sub(before.1), Ordering::Relaxed);
        }
        counted.retain(|s, _| links.contains_key(s));
        if let Some(c) = authority.and_then(|a| links.get(&a)).map(|l| &l.conn)
            && let Ok(mut v) = self.live.rtt_us.lock()
            && v.len() < 1_000_000
        {
            v.push(c.rtt().as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }

    /// Starts a standby link to `to` unless there is one or one is on its way.
    fn pre_connect(
        &mut self,
        to: ServerId,
        links: &HashMap<ServerId, Link>,
        pending: &mut HashSet<ServerId>,
        known: &HashMap<ServerId, (SocketAddr, String)>,
        tx: &mpsc::Sender<Event>,
        ticket: Option<String>,
    ) {
        if links.contains_key(&to) || pending.contains(&to) {
            return;
        }
        let Some((addr, cert)) = known.get(&to) else { return };
        debug!(player = %self.player, to = to.0, hinted_ticket = ticket.is_some(), "pre-connecting");
        pending.insert(to);
        let me = self.open_in_background(*addr, to, cert.clone(), tx.clone(), ticket);
        tokio::spawn(me);
    }

    fn open_in_background(
        &mut self,
        addr: SocketAddr,
        server: ServerId,
        cert: String,
        tx: mpsc::Sender<Event>,
        mut hinted: Option<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.report.connections_opened += 1;
        if !matches!(self.auth, BotAuth::Login { .. }) {
            hinted = None;
        }
        self.report.hinted_tickets += u32::from(hinted.is_some());
        let endpoint = self.endpoint.clone();
        let stop = self.stop.clone();
        let (player, name, auth) = (self.player, self.name.clone(), self.auth.clone());
        let (http, coordinator, session) = (self.http.clone(), self.coordinator.clone(), self.login_session.clone());
        let undecoded = self.live.undecoded.clone();
        let arrivals = self.arrivals.clone();
        let components = self.live.components.clone();
        async move {
            // A few tries, each with a fresh ticket (a ticket is good once): a
            // busy server may miss the first handshake.
            for attempt in 1..=3 {
                let ticket = match (&auth, hinted.take()) {
                    (BotAuth::DevToken(t), _) => Ok(t.clone()),
                    (BotAuth::Login { .. }, Some(t)) => Ok(t),
                    (BotAuth::Login { .. }, None) => {
                        standby_ticket(&http, &coordinator, session.as_deref(), server).await
                    }
                };
                match ticket {
                    Ok(ticket) => {
                        let hello = hello(player, &name, ticket, JoinRole::Standby, None);
                        let pump = Pump {
                            undecoded: undecoded.clone(),
                            arrivals: arrivals.clone(),
                            components: components.clone(),
                        };
                        match open(&endpoint, addr, &cert, hello, tx.clone(), stop.clone(), pump).await {
                            Ok((server, link)) => {
                                debug!(%player, server = server.0, attempt, "pre-connected");
                                let _ = tx.send(Event::Linked(server, link)).await;
                                return;
                            }
                            Err(e) => debug!(%addr, attempt, error = %format!("{e:#}"), "pre-connect failed"),
                        }
                    }
                    Err(e) => debug!(%addr, attempt, error = %format!("{e:#}"), "no ticket to pre-connect"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let _ = tx.send(Event::NotLinked(server)).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn open(
        &mut self,
        addr: SocketAddr,
        cert: &str,
        role: JoinRole,
        spawn: Option<DVec3>,
        ticket: String,
        tx: mpsc::Sender<Event>,
    ) -> anyhow::Result<(ServerId, Link)> {
        self.report.connections_opened += 1;
        let hello = hello(self.player, &self.name, ticket, role, spawn);
        let pump = Pump {
            undecoded: self.live.undecoded.clone(),
            arrivals: self.arrivals.clone(),
            components: self.live.components.clone(),
        };
        open(&self.endpoint, addr, cert, hello, tx, self.stop.clone(), pump).await
    }

    /// Logs in (creating the account the first time) and returns the
    /// coordinator's answer: the session and a ticket for the first server.
    async fn login(&self, password: &str, spawn: DVec3) -> anyhow::Result<LoginAnswer> {
        let url = format!("{}/v1/login", self.coordinator);
        let body = serde_json::json!({ "name": self.name, "password": password, "spawn": spawn.to_array() });
        for attempt in 0..2 {
            let r = self.http.post(&url).timeout(LOGIN_TIMEOUT).json(&body).send().await;
            let r = r.with_context(|| format!("POST {url}"))?;
            let status = r.status();
            if status.is_success() {
                return Ok(r.json().await?);
            }
            let text = r.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                // First run: make the account, then log in again.
                let url = format!("{}/v1/accounts", self.coordinator);
                let body = serde_json::json!({ "name": self.name, "password": password });
                let r = self.http.post(&url).timeout(LOGIN_TIMEOUT).json(&body).send().await;
                let r = r.with_context(|| format!("POST {url}"))?;
                anyhow::ensure!(
                    r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT,
                    "creating account {}: {} {}",
                    self.name,
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
                continue;
            }
            let refusal = format!("login as {} refused: {status} {text}", self.name);
            // A wrong password or a bad request will not mend by asking again.
            if matches!(status.as_u16(), 400 | 401 | 403) {
                return Err(LoginRefused(refusal).into());
            }
            anyhow::bail!(refusal);
        }
        anyhow::bail!("login as {} refused after creating the account", self.name)
    }
}

/// The coordinator refused a bot's credentials: not worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LoginRefused(String);

/// What `POST /v1/login` answers (the fields a bot uses).
#[derive(Debug, Deserialize)]
struct LoginAnswer {
    player: u64,
    session: String,
    join: TicketAnswer,
}

#[derive(Debug, Deserialize)]
struct TicketAnswer {
    ticket: String,
    server_id: u32,
    quic: String,
    cert_sha256: String,
    spawn: Option<[f64; 3]>,
}

/// A ticket to pre-connect to `server`, bought with the session.
async fn standby_ticket(
    http: &reqwest::Client,
    coordinator: &str,
    session: Option<&str>,
    server: ServerId,
) -> anyhow::Result<String> {
    let session = session.context("not logged in")?;
    let url = format!("{coordinator}/v1/tickets");
    let r = http
        .post(&url)
        .bearer_auth(session)
        .json(&serde_json::json!({ "role": "standby", "server_id": server.0 }))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    anyhow::ensure!(r.status().is_success(), "ticket refused: {} {}", r.status(), r.text().await.unwrap_or_default());
    Ok(r.json::<TicketAnswer>().await?.ticket)
}

fn hello(player: PlayerId, name: &str, ticket: String, role: JoinRole, spawn: Option<DVec3>) -> ClientControl {
    ClientControl::Hello {
        version: PROTOCOL_VERSION,
        schema: shared::component::Registry::builtin().schema(),
        ticket,
        player,
        name: name.to_owned(),
        role,
        spawn,
    }
}

async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<ServerControl> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; frame_len(prefix)?];
    recv.read_exact(&mut body).await?;
    Ok(decode_frame(&body)?)
}

/// Connects, says hello, waits for the welcome, then pumps the connection's
/// snapshots and control frames into `tx` from a background task.
async fn open(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    cert: &str,
    hello: ClientControl,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
    pump: Pump,
) -> anyhow::Result<(ServerId, Link)> {
    let cfg = tls::client_config(cert, ALPN)?;
    let conn = tokio::time::timeout(Duration::from_secs(5), endpoint.connect_with(cfg, addr, "localhost")?)
        .await
        .context("QUIC handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(&hello)?).await?;
    let welcome = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut recv)).await.context("no welcome")??;
    let (server, me) = match welcome {
        ServerControl::Welcome { server, entity, .. } => (server, entity),
        ServerControl::Refused { reason } => anyhow::bail!("refused: {reason}"),
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    };
    let c = conn.clone();
    let (ctl, mut ctl_rx) = mpsc::channel::<ClientControl>(16);
    let acked = Arc::new(AtomicU64::new(0));
    let acked_by_pump = acked.clone();
    let mut snapshots = shared::snapshot::Receiver::default();
    let mut last_tick = None;
    // Booked here, added to the swarm's now and then: one lock a snapshot
    // for every bot was a bottleneck of its own.
    let mut tally = ComponentTally::default();
    let mut unbooked = 0u32;
    tokio::spawn(async move {
        // The bot dropped its end: nothing more to send, keep reading.
        let mut bot_sends = true;
        // Frames from one stream kept across the loop's turns: a frame read
        // dropped half way by `select!` would lose the bytes it had taken
        // and misalign every frame after it.
        let mut frames = std::pin::pin!(futures::stream::unfold(recv, |mut r| async move {
            let f = read_frame(&mut r).await;
            Some((f, r))
        }));
        let why = loop {
            tokio::select! {
                m = ctl_rx.recv(), if bot_sends => match m {
                    Some(m) => {
                        let sent = match encode_frame(&m) {
                            Ok(f) => send.write_all(&f).await.map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(e) = sent { break format!("control stream: {e}"); }
                    }
                    None => bot_sends = false,
                },
                d = c.read_datagram() => match d {
                    Ok(b) => match snapshots.receive(&b) {
                        Ok(s) => {
                            acked_by_pump.store(snapshots.ack(), Ordering::Relaxed);
                            if last_tick.is_none_or(|t| s.tick > t) {
                                let ticks = last_tick.map_or(1, |t| s.tick - t);
                                last_tick = Some(s.tick);
                                tally.book(&snapshots, &s, me, ticks);
                                unbooked += 1;
                                if unbooked == TALLY_EVERY {
                                    unbooked = 0;
                                    pump.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(&mut tally);
                                }
                            }
                            let mut book = pump.arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if s.authoritative {
                                book.book(server, s.tick);
                            }
                            match tx.try_send(Event::Snapshot(server, s)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(_)) => book.dropped += 1,
                                Err(mpsc::error::TrySendError::Closed(_)) => break "bot ended".to_owned(),
                            }
                        }
                        Err(e) => {
                            // A baseline lost with its datagram: the next
                            // acknowledgement names one the server still has.
                            debug!(server = server.0, reason = e.reason(), "snapshot not decoded");
                            pump.undecoded.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Err(e) => break e.to_string(),
                },
                Some(f) = futures::StreamExt::next(&mut frames) => match f {
                    Ok(msg) => { let _ = tx.send(Event::Control(server, msg)).await; }
                    Err(e) => break e.to_string(),
                },
                _ = stop.cancelled() => break "stopped".to_owned(),
            }
        };
        let _ = send.finish();
        pump.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(&mut tally);
        let _ = tx.send(Event::Closed(server, why)).await;
    });
    Ok((server, Link { conn, ctl, acked }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_count_gaps_in_ticks_across_servers_and_ignore_stale_ones() {
        let mut a = Arrivals::default();
        for t in [10, 11, 12, 14] {
            a.book(ServerId(1), t);
        }
        assert_eq!(a.max_gap_ticks, 2);
        // A late one from before is stale: no gap, no change of server.
        a.book(ServerId(1), 13);
        // The new server's first snapshot, five ticks after the old one's last.
        a.book(ServerId(2), 19);
        a.book(ServerId(1), 18);
        a.book(ServerId(2), 20);
        assert_eq!(a.handoff_gap_ticks, vec![5]);
        assert_eq!(a.max_gap_ticks, 5);
        assert_eq!(a.last, Some((ServerId(2), 20)));
    }
}
