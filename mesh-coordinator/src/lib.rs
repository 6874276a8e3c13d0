//! The mesh coordinator: the authority over who owns which part of the world.
//!
//! - [`state`]: the decisions, a deterministic state machine (no I/O).
//! - [`node`]: the owner of that state machine; commands are committed
//!   through Raft ([`consensus`]) and applied in log order on every replica.
//! - [`grpc`] (port 9090): registration, heartbeats, region map, transfers.
//! - [`http`] (port 8080): health, metrics, admin views, logins.
//! - [`map`]: the admin map page at `/` and its event stream.
//! - [`auth`]: accounts, sessions and the tickets game servers verify.

pub mod auth;
pub mod consensus;
pub mod convert;
pub mod grpc;
pub mod http;
pub mod map;
pub mod metrics;
pub mod node;
pub mod persist;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use glam::IVec3;
use serde::{Deserialize, Serialize};
use shared::TickClock;
use shared::region::RegionTree;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::node::{Node, now_nanos};
use crate::state::{Command, CoordinatorState, Policy};

/// Coordinator configuration. Every flag can also be set from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// HTTP admin API, health and metrics.
    #[arg(long, env = "PS_COORD_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// gRPC for game servers.
    #[arg(long, env = "PS_COORD_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: SocketAddr,
    /// The world, in root cubes of 2000 m: `NXxNYxNZ`.
    #[arg(long, env = "PS_WORLD_SIZE", default_value = "2x1x1", value_parser = parse_world_size)]
    pub world_size: [u32; 3],
    /// Root cell of the world's minimum corner: `x,y,z`.
    #[arg(long, env = "PS_WORLD_ORIGIN", default_value = "0,0,0", value_parser = parse_ivec3, allow_hyphen_values = true)]
    pub world_origin: IVec3,
    /// Seed of the procedural terrain, handed to every game server. A new
    /// seed is a new world: never change it for a world with saved edits.
    #[arg(long, env = "PS_WORLD_SEED", default_value_t = 20_261_122)]
    pub world_seed: u64,
    /// A game server silent this long is declared dead.
    #[arg(long, env = "PS_HEARTBEAT_TIMEOUT_MS", default_value_t = 2_000)]
    pub heartbeat_timeout_ms: u64,
    /// How often game servers are told to heartbeat.
    #[arg(long, env = "PS_HEARTBEAT_INTERVAL_MS", default_value_t = 500)]
    pub heartbeat_interval_ms: u64,
    /// How long unowned regions wait for more servers after the first registers.
    #[arg(long, env = "PS_STARTUP_GRACE_MS", default_value_t = 3_000)]
    pub startup_grace_ms: u64,
    /// Ticks between a transfer's commit and the tick it takes effect.
    #[arg(long, env = "PS_HANDOFF_LEAD_TICKS", default_value_t = 9)]
    pub handoff_lead_ticks: u64,
    /// Bearer token of the operator writes (`POST /v1/notices`, `PUT
    /// /v1/thresholds`, drain, split, merge, move). Unset: they answer 403.
    #[arg(long, env = "PS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token that may read the admin views (`/v1/regions`,
    /// `/v1/servers`, `/v1/transfers`, `/v1/status`, `/v1/thresholds`,
    /// `/v1/audit`); the operator token may too. Unset: the views are open
    /// (development). Probes, `/metrics`, `/openapi.json`, `/v1/route` and
    /// logins are always open.
    #[arg(long, env = "PS_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,
    /// Bearer token presented to game servers for the admin map's position
    /// feed (their `--map-feed-token`; read-only). Unset: the map shows no
    /// players or props.
    #[arg(long, env = "PS_MAP_FEED_TOKEN", hide_env_values = true)]
    pub map_feed_token: Option<String>,
    /// Name of this mesh in shared storage: the prefix of its Redis keys
    /// (one Redis may serve several meshes).
    #[arg(long, env = "PS_CLUSTER", default_value = "planetary")]
    pub cluster: String,
    #[command(flatten)]
    pub storage: persistence::StoreArgs,
    /// File holding the Ed25519 seed that signs login tickets, as 64 hex
    /// digits (`openssl rand -hex 32`). Every replica needs the same one.
    /// Unset: a key made at start (development only).
    #[arg(long, env = "PS_TICKET_KEY_FILE")]
    pub ticket_key_file: Option<PathBuf>,
    /// How long a login ticket is valid, seconds.
    #[arg(long, env = "PS_TICKET_TTL_S", default_value_t = 60)]
    pub ticket_ttl_s: u64,
    /// How long a session lasts, seconds.
    #[arg(long, env = "PS_SESSION_TTL_S", default_value_t = 86_400)]
    pub session_ttl_s: u64,
    /// Login attempts per account name per minute.
    #[arg(long, env = "PS_LOGINS_PER_NAME", default_value_t = 10)]
    pub logins_per_name: u64,
    /// Login and sign-up attempts per client address per minute.
    #[arg(long, env = "PS_LOGINS_PER_ADDRESS", default_value_t = 120)]
    pub logins_per_address: u64,
    /// This replica's Raft id (1.., unique among the replicas). Unset: the
    /// pod index + 1, else 1.
    #[arg(long, env = "PS_RAFT_ID")]
    pub raft_id: Option<u64>,
    /// In a StatefulSet, the pod's ordinal (the `apps.kubernetes.io/pod-index`
    /// label, through the downward API): the Raft id is it + 1.
    #[arg(long, env = "PS_POD_INDEX")]
    pub pod_index: Option<u64>,
    /// Every replica, this one included: `id=URL` of its Raft port, comma
    /// separated (`1=http://coord-0.coord:7946,2=...`). Empty: this replica
    /// alone (development).
    #[arg(long, env = "PS_RAFT_PEERS", default_value = "", value_parser = parse_peers)]
    pub raft_peers: Peers,
    /// Raft messages from the other replicas.
    #[arg(long, env = "PS_RAFT_ADDR", default_value = "0.0.0.0:7946")]
    pub raft_addr: SocketAddr,
    /// Directory of this replica's Raft log (fsynced). Unset: memory, lost
    /// at exit, which is only safe for a single development replica.
    #[arg(long, env = "PS_RAFT_DIR")]
    pub raft_dir: Option<PathBuf>,
    /// One Raft tick, milliseconds. A follower that hears no leader for
    /// 8–16 ticks (320–640 ms by default) starts an election; the leader
    /// heartbeats every 2 ticks.
    #[arg(long, env = "PS_RAFT_TICK_MS", default_value_t = 40)]
    pub raft_tick_ms: u64,
    /// Write the bound addresses here as JSON once listening (for tools and tests binding port 0).
    #[arg(long, env = "PS_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.world_size.iter().all(|n| (1..=64).contains(n)),
            "world size must be 1..=64 root cubes per axis"
        );
        anyhow::ensure!(self.heartbeat_interval_ms >= 50, "heartbeat interval must be at least 50 ms");
        anyhow::ensure!(
            self.heartbeat_timeout_ms >= 2 * self.heartbeat_interval_ms,
            "heartbeat timeout ({} ms) must be at least twice the interval ({} ms)",
            self.heartbeat_timeout_ms,
            self.heartbeat_interval_ms
        );
        anyhow::ensure!((1..=900).contains(&self.handoff_lead_ticks), "handoff lead must be 1..=900 ticks");
        anyhow::ensure!(
            !self.cluster.is_empty()
                && self.cluster.len() <= 64
                && self.cluster.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "cluster name must be 1..=64 characters of A-Z, a-z, 0-9, - and _"
        );
        self.storage.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            (5..=shared::ticket::MAX_LIFETIME_MS / 1000).contains(&self.ticket_ttl_s),
            "ticket lifetime must be 5..={} s",
            shared::ticket::MAX_LIFETIME_MS / 1000
        );
        anyhow::ensure!(self.session_ttl_s >= 60, "sessions must last at least 60 s");
        anyhow::ensure!(
            self.logins_per_name >= 1 && self.logins_per_address >= 1,
            "login limits must be at least 1 a minute"
        );
        anyhow::ensure!(self.raft_id() >= 1, "raft id must be at least 1");
        if !self.raft_peers.0.is_empty() {
            anyhow::ensure!(
                self.raft_peers.0.contains_key(&self.raft_id()),
                "--raft-peers must list this replica's own id {} ({:?})",
                self.raft_id(),
                self.raft_peers.0.keys().collect::<Vec<_>>()
            );
        }
        anyhow::ensure!((10..=1_000).contains(&self.raft_tick_ms), "raft tick must be 10..=1000 ms");
        Ok(())
    }

    /// `--raft-id`, else the pod index + 1, else 1.
    pub fn raft_id(&self) -> u64 {
        self.raft_id.or(self.pod_index.map(|i| i.saturating_add(1))).unwrap_or(1)
    }

    pub fn policy(&self) -> Policy {
        Policy {
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            startup_grace_ms: self.startup_grace_ms,
            handoff_lead_ticks: self.handoff_lead_ticks,
            ..Policy::default()
        }
    }
}

/// The Raft replicas: id → URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers(pub std::collections::BTreeMap<u64, String>);

pub fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut peers = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("expected id=URL, got {part:?}"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("raft id {id:?} is not a number"))?;
        if id == 0 {
            return Err("raft ids start at 1".into());
        }
        let addr = addr.trim();
        let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        if peers.insert(id, url).is_some() {
            return Err(format!("raft id {id} is listed twice"));
        }
    }
    Ok(Peers(peers))
}

pub fn parse_world_size(s: &str) -> Result<[u32; 3], String> {
    let parts: Vec<_> = s.split('x').map(|p| p.trim().parse::<u32>()).collect();
    match parts.as_slice() {
        [Ok(x), Ok(y), Ok(z)] => Ok([*x, *y, *z]),
        _ => Err(format!("expected NXxNYxNZ such as 2x1x1, got {s:?}")),
    }
}

pub fn parse_ivec3(s: &str) -> Result<IVec3, String> {
    let parts: Vec<_> = s.split(',').map(|p| p.trim().parse::<i32>()).collect();
    match parts.as_slice() {
        [Ok(x), Ok(y), Ok(z)] => Ok(IVec3::new(*x, *y, *z)),
        _ => Err(format!("expected x,y,z such as 0,0,0, got {s:?}")),
    }
}

/// The addresses a running coordinator listens on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoundPorts {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub raft: SocketAddr,
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let [nx, ny, nz] = config.world_size;
    let tree = RegionTree::grid(config.world_origin, nx, ny, nz);
    // Pristine until the first leader bootstraps it (tick grid, policy): the
    // same on every replica, as Raft needs.
    let mut initial = CoordinatorState::new(config.policy(), tree, TickClock::new(0));
    initial.world_seed = config.world_seed;

    let key = auth::load_key(config.ticket_key_file.as_deref())?;
    let store =
        persistence::open(&config.storage.store_config(shared::chunk::ChunkLayout::default().chunk_voxels.pow(3)))
            .await
            .context("opening the account store")?;
    info!(backend = store.backend(), "store open");
    let restore = persist::load(store.as_ref(), &config.cluster, &initial).await?;

    let raft_listener = TcpListener::bind(config.raft_addr)
        .await
        .with_context(|| format!("binding the Raft port on {}", config.raft_addr))?;
    let raft_bound = raft_listener.local_addr()?;
    let mut peers = config.raft_peers.0.clone();
    if peers.is_empty() {
        peers.insert(config.raft_id(), format!("http://{raft_bound}"));
    }
    if peers.len() > 1 && config.raft_dir.is_none() {
        warn!("--raft-dir is unset: this replica's log is in memory and a restart loses it (development only)");
    }
    let identity = consensus::transport::Identity {
        cluster: config.cluster.clone(),
        world: format!(
            "seed={};size={}x{}x{};origin={},{},{}",
            config.world_seed, nx, ny, nz, config.world_origin.x, config.world_origin.y, config.world_origin.z
        ),
    };
    let peer_ids = peers.keys().copied().filter(|id| *id != config.raft_id()).collect();
    let setup = node::RaftSetup {
        id: config.raft_id(),
        peers,
        dir: config.raft_dir.clone(),
        tick: Duration::from_millis(config.raft_tick_ms),
        timing: consensus::Timing::default(),
        identity: identity.clone(),
    };
    let genesis = node::Genesis { policy: config.policy(), world_seed: config.world_seed, restore };
    let metrics = metrics::Metrics::new();
    let (node, raft_inbox) = Node::start(setup, initial, genesis, metrics.clone(), &tokio::runtime::Handle::current())?;
    let cache = Arc::new(
        persistence::cache::Cache::new(config.storage.redis_url.as_deref(), &config.cluster)
            .map_err(anyhow::Error::msg)?,
    );
    node.metrics
        .registry
        .register(Box::new(persistence::cache::CacheCollector::new(cache.clone())))
        .context("registering cache metrics")?;
    let auth = Arc::new(auth::Auth::new(
        store.clone(),
        cache,
        key,
        auth::AuthPolicy {
            ticket_ttl: Duration::from_secs(config.ticket_ttl_s),
            session_ttl: Duration::from_secs(config.session_ttl_s),
            per_name_per_minute: config.logins_per_name,
            per_address_per_minute: config.logins_per_address,
        },
    ));

    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP API on {}", config.http_addr))?;
    let grpc =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding gRPC on {}", config.grpc_addr))?;
    let ports = BoundPorts { http: http.local_addr()?, grpc: grpc.local_addr()?, raft: raft_bound };
    info!(http = %ports.http, grpc = %ports.grpc, raft = %ports.raft, regions = nx * ny * nz, "coordinator listening");
    if let Some(path) = &config.ports_file {
        svc::write_json_atomically(path, &ports)?;
    }

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });

    // Failure detection and placement run on a timer, through the log.
    let saver = tokio::spawn(persist::run(node.clone(), store.clone(), config.cluster.clone(), stop.clone()));
    let ticker = {
        let node = node.clone();
        let period = Duration::from_millis((config.heartbeat_interval_ms / 2).clamp(50, 250));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if node.is_leader() {
                            let _ = node.propose(Command::Tick { now: now_nanos() }).await;
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        })
    };

    // The admin map's hub: samples for its sparklines always, events and
    // the position feed only while a map is open.
    let map = Arc::new(map::MapHub::new(node.metrics.clone()));
    let feed_token = config.map_feed_token.clone().filter(|t| !t.is_empty());
    let feed = feed_token.is_some();
    tokio::spawn(map::run(map.clone(), node.clone(), feed_token, stop.clone()));
    let http_task = tokio::spawn({
        let access = http::ViewAccess {
            viewer: config.viewer_token.clone().filter(|t| !t.is_empty()).map(Arc::new),
            operator: config.admin_token.clone().filter(|t| !t.is_empty()).map(Arc::new),
        };
        let app = http::app(node.clone(), auth.clone(), access, config.admin_token.clone(), map.clone(), feed);
        let stop = stop.clone().cancelled_owned();
        async move {
            axum::serve(http, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(stop)
                .await
        }
    });
    let grpc_task = tokio::spawn({
        let svc = proto::mesh::mesh_coordinator_server::MeshCoordinatorServer::new(grpc::CoordinatorGrpc::new(
            node.clone(),
            auth.clone(),
            config.cluster.clone(),
        ));
        let stop = stop.clone().cancelled_owned();
        async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stop)
                .await
        }
    });

    let raft_task = tokio::spawn({
        let svc = proto::raft::raft_peer_server::RaftPeerServer::new(consensus::transport::RaftPeerService {
            identity,
            me: config.raft_id(),
            peers: peer_ids,
            driver: raft_inbox,
            refused: metrics.raft_refused.clone(),
        })
        .max_decoding_message_size(256 << 20);
        let stop = stop.clone().cancelled_owned();
        async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(raft_listener), stop)
                .await
        }
    });

    let (h, g, r) = tokio::join!(http_task, grpc_task, raft_task);
    ticker.abort();
    // The last snapshot and transfers, written on the way out (bounded).
    if tokio::time::timeout(Duration::from_secs(5), saver).await.is_err() {
        warn!("the last topology save did not finish within 5 s");
    }
    h.context("HTTP task panicked")?.context("HTTP server failed")?;
    g.context("gRPC task panicked")?.context("gRPC server failed")?;
    r.context("Raft task panicked")?.context("Raft server failed")?;
    let stopper = node.clone();
    tokio::task::spawn_blocking(move || stopper.stop()).await.context("stopping the raft replica")?;
    if !stop.is_cancelled() {
        warn!("servers stopped without a shutdown request");
    }
    info!("coordinator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn the_raft_id_comes_from_the_flag_else_the_pod_index() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["mesh-coordinator"], args].concat()).expect("flags").config;
        assert_eq!(parse(&[]).raft_id(), 1);
        assert_eq!(parse(&["--pod-index", "2"]).raft_id(), 3);
        assert_eq!(parse(&["--pod-index", "2", "--raft-id", "7"]).raft_id(), 7);
    }
}
