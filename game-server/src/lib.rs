//! A game-server pod: the 90 Hz simulation of the regions the coordinator
//! gives it, and the QUIC endpoint of its players.
//!
//! Threads: the tick thread ([`sim`]) owns the ECS world; a tokio runtime runs
//! the player endpoint ([`net`]), the control plane ([`control`]), the peer
//! gRPC service ([`peer`]) and the HTTP endpoints ([`http`]). Bounded
//! channels join them; the tick thread never waits on them.

pub mod checkpoint;
pub mod config;
pub mod control;
pub mod convert;
pub mod handoff;
pub mod http;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod sim;
pub mod store;
pub mod sync;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use proto::mesh as mpb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

/// The addresses a running game server listens on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoundPorts {
    pub server_id: u32,
    pub quic: SocketAddr,
    pub query: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub grpc: SocketAddr,
    pub cert_sha256: String,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Shutdown,
    /// The coordinator fenced this server: its regions belong to others now.
    Fenced,
}

/// Runs a game server until `shutdown` resolves or the coordinator fences it,
/// knowing the built-in components.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<Exit> {
    run_with(config, Arc::new(shared::component::Registry::builtin()), shutdown).await
}

/// As [`run`], knowing the components of `registry` (a game's own besides
/// the built-ins): clients and handoffs must agree with it.
pub async fn run_with(
    config: Config,
    registry: Arc<shared::component::Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Exit> {
    config.validate()?;
    let metrics = metrics::Metrics::new();
    let layout = shared::chunk::ChunkLayout::default();
    let store = persistence::open(&config.storage.store_config(layout.chunk_voxels.pow(3)))
        .await
        .context("opening the world store")?;
    info!(backend = store.backend(), "world store open");

    let identity = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => tls::from_files(c, k)?,
        _ => {
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            names.extend(config.advertise_host.clone());
            tls::self_signed(names)?
        }
    };
    let (socket, granted) = svc::udp_socket(config.quic_addr, config.udp_buffer_bytes)
        .with_context(|| format!("binding QUIC on {}", config.quic_addr))?;
    if granted < config.udp_buffer_bytes {
        info!(
            asked = config.udp_buffer_bytes,
            granted, "the kernel capped the QUIC socket's receive buffer (net.core.rmem_max)"
        );
    }
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(tls::server_config(&identity)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("starting QUIC on {}", config.quic_addr))?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding {what} on {addr}"))
    };
    let query = bind(config.query_addr, "the query port").await?;
    let http = bind(config.http_addr, "HTTP").await?;
    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    let grpc = bind(config.grpc_addr, "gRPC").await?;
    let quic_addr = endpoint.local_addr()?;
    let addresses = mpb::ServerAddresses {
        quic: config.advertised(quic_addr),
        grpc: config.advertised(grpc.local_addr()?),
        http: config.advertised(http.local_addr()?),
        metrics: config.advertised(metrics_l.local_addr()?),
        query: config.advertised(query.local_addr()?),
    };

    let coordinator = control::Coordinators::new(&config.coordinator)?;
    let reg = control::register(
        &coordinator,
        mpb::RegisterRequest {
            name: config.name.clone(),
            addresses: Some(addresses.clone()),
            capacity_players: config.capacity,
            cert_sha256: identity.sha256.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            components: convert::components_to_mesh_pb(&registry.schema().0),
        },
        std::time::Duration::from_secs(config.register_timeout_s),
    )
    .await?;
    info!(server = %reg.server, quic = %addresses.quic, grpc = %addresses.grpc, "registered with the coordinator");
    let dev_token = config.dev_token.clone().filter(|t| !t.is_empty());
    if dev_token.is_some() {
        warn!("--dev-token is set: any client holding it joins as any player (development only)");
    }
    let tickets = Arc::new(net::Tickets::new(
        reg.server,
        shared::ticket::TicketVerifier::new(reg.ticket_keys.clone()),
        dev_token,
    ));
    let cache = Arc::new(
        persistence::cache::Cache::new(config.storage.redis_url.as_deref(), &reg.cluster)
            .map_err(anyhow::Error::msg)?,
    );
    metrics
        .registry
        .register(Box::new(persistence::cache::CacheCollector::new(cache.clone())))
        .context("registering cache metrics")?;

    let (sim_tx, sim_rx) = mpsc::channel(65_536);
    let (out_tx, out_rx) = mpsc::channel(4_096);
    let (maps_tx, maps_rx) = watch::channel(reg.map.clone());
    let load = Arc::new(sim::core::LoadShared::default());
    let authority_log = config.authority_log.as_deref().map(sim::authority_log_writer).transpose()?;
    let sim_stop = Arc::new(AtomicBool::new(false));
    let store = store::WorldStore::new(store, tokio::runtime::Handle::current());
    let store_for_joins = store.clone();
    let writer = store::spawn_writer(store.clone(), persistence::random_id()).context("starting the edit writer")?;
    let checkpoints = checkpoint::spawn_checkpoint_writer(store.clone(), metrics.clone())
        .context("starting the checkpoint writer")?;
    let checkpoints_at_exit = checkpoints.clone();
    let world_parts = sim::WorldParts {
        checkpoints: Some(checkpoints),
        generator: Arc::new(shared::terrain::TerrainGen::new(reg.world_seed, layout)),
        store,
        writer,
        terrain: sim::terrain::TerrainSettings {
            player_radius_m: config.chunk_radius_m,
            workers: config.chunk_workers,
            ..Default::default()
        },
        edits: sim::edits::EditSettings::default(),
        physics_origin: physics_origin(&reg.map.tree),
    };
    let writer_watch = world_parts.writer.clone();
    let writer_at_exit = world_parts.writer.clone();
    let sim_thread = sim::spawn(
        sim::SimParts {
            config: sim::core::SimConfig {
                server: reg.server,
                clock: reg.clock,
                handoff_margin_m: config.handoff_margin_m,
                handoff_predict_ticks: config.handoff_predict_ticks.min(90),
                overlap_m: config.overlap_m,
                walk_speed: config.walk_speed,
                character: shared::controller::CharacterParams::default(),
                world_seed: reg.world_seed,
                view_radius_m: 500.0,
                snapshot_budget: sim::core::snapshot_budget(
                    config.player_bandwidth_kbps,
                    reg.clock.hz,
                    sim::core::snapshot_every(reg.clock.hz, config.snapshot_hz),
                ),
                snapshot_every: sim::core::snapshot_every(reg.clock.hz, config.snapshot_hz),
                replication_workers: config
                    .replication_workers
                    .map_or_else(config::default_replication_workers, usize::from),
                registry: registry.clone(),
            },
            inbox: sim_rx,
            outbox: out_tx,
            metrics: metrics.clone(),
            load: load.clone(),
            map: reg.map.clone(),
            authority_log,
            world: world_parts,
        },
        sim_stop.clone(),
    )?;

    let stop = CancellationToken::new();
    let fenced = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => metrics.sample_writer(&writer_watch),
                }
            }
        });
    }
    tasks.spawn(net::serve(
        endpoint,
        {
            let limits = net::NetLimits {
                inputs_per_s: config.inputs_per_s,
                connects_per_ip_per_s: config.connects_per_ip_per_s,
                ..Default::default()
            };
            let ctx = net::NetContext::new(sim_tx.clone(), tickets.clone(), metrics.clone(), cache.clone(), limits)
                .with_registry(registry.clone(), store_for_joins);
            net::relay_world_events(&ctx);
            ctx
        },
        stop.clone(),
    ));
    tasks.spawn(control::heartbeat_loop(
        coordinator.clone(),
        reg.server,
        reg.heartbeat_every,
        load.clone(),
        sim_tx.clone(),
        maps_tx,
        metrics.clone(),
        stop.clone(),
        fenced.clone(),
    ));
    tasks.spawn(
        control::TransferExecutor::new(reg.server, coordinator, sim_tx.clone(), maps_rx.clone(), metrics.clone())
            .run(out_rx),
    );
    let local = http::LocalState {
        name: config.name.clone(),
        server: reg.server,
        clock: reg.clock,
        capacity: config.capacity,
        load,
        maps: maps_rx,
        sim: sim_tx.clone(),
        admin_token: config.admin_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from),
        feed_token: config.map_feed_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from),
    };
    tasks.spawn(http::serve_query(query, local.clone(), stop.clone()));
    {
        let stop = stop.clone();
        let app = http::router(local);
        tasks.spawn(async move {
            let _ = axum::serve(http, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    }
    {
        let stop = stop.clone();
        let app = http::metrics_router(metrics.clone());
        tasks.spawn(async move {
            let _ = axum::serve(metrics_l, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    }
    {
        let stop = stop.clone();
        let svc = proto::peer::game_server_peer_server::GameServerPeerServer::new(
            peer::PeerService::new(sim_tx, metrics.clone()).with_registry(registry.clone()),
        );
        tasks.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stop.cancelled_owned())
                .await;
        });
    }

    let ports = BoundPorts {
        server_id: reg.server.0,
        quic: quic_addr,
        query: addr_of(&addresses.query)?,
        http: addr_of(&addresses.http)?,
        metrics: addr_of(&addresses.metrics)?,
        grpc: addr_of(&addresses.grpc)?,
        cert_sha256: identity.sha256,
    };
    if let Some(path) = &config.ports_file {
        svc::write_json_atomically(path, &ports)?;
    }
    info!(server = %reg.server, http = %ports.http, metrics = %ports.metrics, query = %ports.query, "game server running");

    let exit = tokio::select! {
        _ = shutdown => Exit::Shutdown,
        _ = fenced.cancelled() => Exit::Fenced,
    };
    info!(?exit, "stopping");
    stop.cancel();
    sim_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} })
            .await;
    tasks.abort_all();
    tokio::task::spawn_blocking(move || sim_thread.join()).await.ok();
    // Applied edits still queued are written before the process ends (an
    // outage longer than this loses them; none of them was acknowledged).
    let pending = writer_at_exit.queued();
    let written =
        tokio::task::spawn_blocking(move || writer_at_exit.wait_finished(std::time::Duration::from_secs(15))).await;
    if !matches!(written, Ok(true)) {
        warn!(pending, "stopped before the world store took every queued edit");
    }
    let checkpointed =
        tokio::task::spawn_blocking(move || checkpoints_at_exit.finish(std::time::Duration::from_secs(5))).await;
    if !matches!(checkpointed, Ok(true)) {
        warn!("entity checkpoints were not all written before exit: a successor resumes from older ones");
    }
    info!("game server stopped");
    Ok(exit)
}

/// The centre of the world's root regions at ground level: every point of a
/// world up to tens of kilometres wide is within `f32` millimetres of it.
pub fn physics_origin(tree: &shared::RegionTree) -> glam::DVec3 {
    let (mut lo, mut hi) = (glam::DVec3::splat(f64::MAX), glam::DVec3::splat(f64::MIN));
    for r in tree.roots() {
        let a = r.aabb();
        lo = lo.min(a.min);
        hi = hi.max(a.max);
    }
    if lo.x > hi.x {
        return glam::DVec3::ZERO;
    }
    let c = (lo + hi) / 2.0;
    glam::DVec3::new(c.x, 0.0, c.z)
}

fn addr_of(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().or_else(|_| {
        // Advertised under a host name: report the port on loopback.
        let port = s.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).context("address without a port")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    })
}
