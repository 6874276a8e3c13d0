//! Game-server configuration: every flag can also be set from the environment
//! (what the Helm chart does).

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Name shown in the admin API (the pod name in Kubernetes).
    #[arg(long, env = "PS_SERVER_NAME", default_value = "game-server")]
    pub name: String,
    /// The coordinator replicas' gRPC endpoints, comma separated; calls fail
    /// over from one to the next.
    #[arg(long, env = "PS_COORDINATOR", default_value = "http://127.0.0.1:9090")]
    pub coordinator: String,
    /// Players, QUIC over UDP.
    #[arg(long, env = "PS_QUIC_ADDR", default_value = "0.0.0.0:7777")]
    pub quic_addr: SocketAddr,
    /// Query port (TCP): a one-line JSON status.
    #[arg(long, env = "PS_QUERY_ADDR", default_value = "0.0.0.0:7778")]
    pub query_addr: SocketAddr,
    /// `/health`, `/ready` and the local API.
    #[arg(long, env = "PS_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Prometheus metrics.
    #[arg(long, env = "PS_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    pub metrics_addr: SocketAddr,
    /// gRPC from the coordinator and neighbour servers.
    #[arg(long, env = "PS_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: SocketAddr,
    /// Host others reach this server at; default: the bind address, or
    /// 127.0.0.1 when binding all interfaces. In Kubernetes, the pod's DNS name.
    #[arg(long, env = "PS_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Kernel buffer asked for the QUIC socket, each way, bytes. The kernel
    /// grants at most `net.core.rmem_max` (raise it on hosts with hundreds
    /// of players a server: 90 datagrams a second from each).
    #[arg(long, env = "PS_UDP_BUFFER_BYTES", default_value_t = 4 << 20)]
    pub udp_buffer_bytes: usize,
    /// Downstream budget of each player's snapshots, kbit/s at the UDP
    /// socket. Near and fast entities fill it first; the rest wait their
    /// turn (a priority accumulator: nothing starves).
    #[arg(long, env = "PS_PLAYER_BANDWIDTH_KBPS", default_value_t = 512)]
    pub player_bandwidth_kbps: u32,
    /// Snapshots a second to each player, 10 to the tick rate, as a whole
    /// number of ticks between two (90, 45, 30, 22 …; a rate between two
    /// of them gets the higher). The bandwidth above is shared out over
    /// them: fewer, larger snapshots cost the server less per player (the
    /// candidates and the baseline are walked once a snapshot) and the
    /// client's interpolation a little more delay.
    #[arg(long, env = "PS_SNAPSHOT_HZ", default_value_t = DEFAULT_SNAPSHOT_HZ)]
    pub snapshot_hz: u32,
    /// Threads that build players' snapshots beside the tick thread (0:
    /// the tick thread builds them all). Default: one less than the cores
    /// this process may use, at most 7 (the tick thread is the other).
    #[arg(long, env = "PS_REPLICATION_WORKERS", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub replication_workers: Option<u16>,
    /// Input datagrams one connection may send a second (a client sends 90);
    /// more are dropped and counted (`packets_dropped_total{reason="rate_limited"}`).
    #[arg(long, env = "PS_INPUTS_PER_S", default_value_t = 135.0)]
    pub inputs_per_s: f64,
    /// Connection attempts one IP address may make a second (20 in a
    /// burst); more are refused before the handshake
    /// (`player_connections_refused_total{reason="rate_limited"}`).
    #[arg(long, env = "PS_CONNECTS_PER_IP_PER_S", default_value_t = 5.0)]
    pub connects_per_ip_per_s: f64,
    /// Players this server accepts.
    #[arg(long, env = "PS_CAPACITY", default_value_t = 1000)]
    pub capacity: u32,
    /// Bearer token of the local admin API (`POST /v1/props`). Unset: the
    /// admin endpoints answer 403.
    #[arg(long, env = "PS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token the coordinator presents for the admin map's position
    /// feed (`GET /v1/positions`, read-only). Unset: only the admin token
    /// may read it; neither: 403.
    #[arg(long, env = "PS_MAP_FEED_TOKEN", hide_env_values = true)]
    pub map_feed_token: Option<String>,
    /// Development only: a hello carrying this token instead of a signed
    /// ticket is let in as whichever player it names. Unset or empty (the
    /// default, and in production): only tickets from the coordinator's login.
    #[arg(long, env = "PS_DEV_TOKEN", hide_env_values = true)]
    pub dev_token: Option<String>,
    /// TLS certificate chain (PEM) for QUIC; with `--tls-key`. Default: a
    /// self-signed certificate made at start, pinned by clients through the
    /// coordinator.
    #[arg(long, env = "PS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "PS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Metres an entity must be past a region's face before its authority moves.
    #[arg(long, env = "PS_HANDOFF_MARGIN_M", default_value_t = 10.0)]
    pub handoff_margin_m: f64,
    /// Ticks ahead a moving entity's path is projected: a transfer is asked
    /// for when it will pass the handoff line within them, to take effect
    /// at the tick it does (so a handoff costs about one tick); 0 asks only
    /// once it has passed. Keep it above the coordinator's
    /// --handoff-lead-ticks.
    #[arg(long, env = "PS_HANDOFF_PREDICT_TICKS", default_value_t = 12)]
    pub handoff_predict_ticks: u64,
    /// Width of the overlap zone, metres.
    #[arg(long, env = "PS_OVERLAP_M", default_value_t = shared::region::DEFAULT_OVERLAP_M)]
    pub overlap_m: f64,
    /// Walking speed at full stick, metres per second.
    #[arg(long, env = "PS_WALK_SPEED", default_value_t = 6.0)]
    pub walk_speed: f32,
    /// Threads generating terrain chunks.
    #[arg(long, env = "PS_CHUNK_WORKERS", default_value_t = 1)]
    pub chunk_workers: usize,
    /// Terrain within this distance of a player is kept loaded, metres.
    #[arg(long, env = "PS_CHUNK_RADIUS_M", default_value_t = 12.0)]
    pub chunk_radius_m: f64,
    #[command(flatten)]
    pub storage: persistence::StoreArgs,
    /// Give up registering with the coordinator after this many seconds.
    #[arg(long, env = "PS_REGISTER_TIMEOUT_S", default_value_t = 30)]
    pub register_timeout_s: u64,
    /// Write the bound addresses here as JSON once listening.
    #[arg(long, env = "PS_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
    /// Append one JSON line per tick naming the entities this server was
    /// authoritative for (for tests and investigations; costly).
    #[arg(long, env = "PS_AUTHORITY_LOG")]
    pub authority_log: Option<PathBuf>,
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.name.is_empty() && self.name.len() <= 256, "server name must be 1..=256 bytes");
        anyhow::ensure!(
            self.handoff_margin_m.is_finite() && self.handoff_margin_m >= 0.0 && self.handoff_margin_m < self.overlap_m,
            "handoff margin must be in [0, overlap width)"
        );
        anyhow::ensure!(
            self.overlap_m.is_finite() && self.overlap_m > 0.0 && self.overlap_m < shared::region::MIN_EDGE_M,
            "overlap width must be in (0, {} m)",
            shared::region::MIN_EDGE_M
        );
        anyhow::ensure!(
            self.walk_speed.is_finite() && self.walk_speed > 0.0 && self.walk_speed < 100.0,
            "walk speed must be in (0, 100) m/s"
        );
        anyhow::ensure!(self.capacity > 0, "capacity must be positive");
        anyhow::ensure!(
            self.inputs_per_s.is_finite() && self.inputs_per_s >= 90.0,
            "inputs per second must be at least 90 (a client's rate)"
        );
        anyhow::ensure!(
            self.connects_per_ip_per_s.is_finite() && self.connects_per_ip_per_s > 0.0,
            "connection attempts per address must be positive"
        );
        anyhow::ensure!(
            (64..=1_000_000).contains(&self.player_bandwidth_kbps),
            "player bandwidth must be 64..=1000000 kbit/s"
        );
        anyhow::ensure!(
            (MIN_SNAPSHOT_HZ..=shared::time::TICK_HZ).contains(&self.snapshot_hz),
            "snapshot rate must be {MIN_SNAPSHOT_HZ}..={} Hz",
            shared::time::TICK_HZ
        );
        anyhow::ensure!((1..=16).contains(&self.chunk_workers), "chunk workers must be 1..=16");
        anyhow::ensure!(
            self.chunk_radius_m.is_finite() && (4.0..=256.0).contains(&self.chunk_radius_m),
            "chunk radius must be 4..=256 m"
        );
        anyhow::ensure!(
            self.dev_token
                .as_ref()
                .is_none_or(|t| t.is_empty() || (t.len() >= 3 && !t.starts_with(shared::ticket::PREFIX))),
            "the development token must be at least 3 bytes (empty: none) and not look like a ticket"
        );
        self.storage.validate().map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// `host:port` others reach `bound` at.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        let host = match &self.advertise_host {
            Some(h) => h.clone(),
            None if bound.ip().is_unspecified() => "127.0.0.1".to_owned(),
            None => bound.ip().to_string(),
        };
        format!("{host}:{}", bound.port())
    }
}

/// Snapshots a second to each player unless configured.
pub const DEFAULT_SNAPSHOT_HZ: u32 = 90;
/// The fewest snapshots a second a player may be configured to get: the
/// baselines point into `RING_TICKS` (64) ticks of states, which must hold
/// a few snapshots and their acknowledgement.
pub const MIN_SNAPSHOT_HZ: u32 = 10;

/// Threads building snapshots beside the tick thread when
/// `--replication-workers` is not given: one less than the cores this
/// process may use, at most 7.
pub fn default_replication_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).min(7)
}
