//! The mesh coordinator: the authority over who owns which part of the world.
//!
//! - [`state`]: the decisions, a deterministic state machine (no I/O).
//! - [`node`]: the owner of that state machine; commands are applied there in
//!   one order (single node now, Raft later).
//! - [`grpc`] (port 9090): registration, heartbeats, region map, transfers.
//! - [`http`] (port 8080): health, metrics, admin views.

pub mod convert;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod node;
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
        Ok(())
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
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let [nx, ny, nz] = config.world_size;
    let tree = RegionTree::grid(config.world_origin, nx, ny, nz);
    // Tick 0 of the mesh grid: the coordinator's start, rounded down to a second.
    let epoch = now_nanos() / 1_000_000_000 * 1_000_000_000;
    let mut state = CoordinatorState::new(config.policy(), tree, TickClock::new(epoch));
    state.world_seed = config.world_seed;
    let node = Arc::new(Node::new(state, metrics::Metrics::new()));

    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP API on {}", config.http_addr))?;
    let grpc =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding gRPC on {}", config.grpc_addr))?;
    let ports = BoundPorts { http: http.local_addr()?, grpc: grpc.local_addr()? };
    info!(http = %ports.http, grpc = %ports.grpc, regions = nx * ny * nz, "coordinator listening");
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
    let ticker = {
        let node = node.clone();
        let period = Duration::from_millis((config.heartbeat_interval_ms / 2).clamp(50, 250));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => { let _ = node.propose(Command::Tick { now: now_nanos() }).await; }
                    _ = stop.cancelled() => break,
                }
            }
        })
    };

    let http_task = tokio::spawn({
        let app = http::router(node.clone());
        let stop = stop.clone().cancelled_owned();
        async move { axum::serve(http, app).with_graceful_shutdown(stop).await }
    });
    let grpc_task = tokio::spawn({
        let svc =
            proto::mesh::mesh_coordinator_server::MeshCoordinatorServer::new(grpc::CoordinatorGrpc::new(node.clone()));
        let stop = stop.clone().cancelled_owned();
        async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stop)
                .await
        }
    });

    let (h, g) = tokio::join!(http_task, grpc_task);
    ticker.abort();
    h.context("HTTP task panicked")?.context("HTTP server failed")?;
    g.context("gRPC task panicked")?.context("gRPC server failed")?;
    if !stop.is_cancelled() {
        warn!("servers stopped without a shutdown request");
    }
    info!("coordinator stopped");
    Ok(())
}
