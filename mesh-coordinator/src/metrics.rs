//! The coordinator's Prometheus metrics, on a registry of its own.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// The names of the metrics registered (for the list in ARCHITECTURE.md).
    names: Vec<String>,
    pub servers: IntGaugeVec,
    pub regions: IntGaugeVec,
    /// What the autoscaler should run (see `CoordinatorState::desired_game_servers`).
    pub desired_game_servers: prometheus::IntGauge,
    /// Players per leaf region and owner, as the servers last reported them.
    pub region_players: IntGaugeVec,
    pub commands: IntCounterVec,
    pub refused: IntCounterVec,
    pub transfers: IntCounter,
    pub server_deaths: IntCounter,
    /// Regions split and merged (by hand or by the balancer), by `kind`.
    pub region_changes: IntCounterVec,
    /// Auth outcomes: `login`, `ticket`, `account_created`, or a refusal label.
    pub auth: IntCounterVec,
    /// Database writes by what (`topology`, `transfers`) and result (`ok`, `failed`).
    pub store_writes: IntCounterVec,
    /// Raft messages not delivered, by reason (`queue_full`, `unreachable`, …).
    pub raft_dropped: IntCounterVec,
    /// Raft batches refused from peers (`wrong_mesh`, `bad_message`).
    pub raft_refused: IntCounterVec,
    pub raft_proposals_failed: IntCounter,
    pub raft_storage_failures: IntCounter,
    pub raft_snapshots_installed: IntCounter,
    pub raft_leader_changes: IntCounter,
    pub raft_term: IntGauge,
    pub raft_commit: IntGauge,
    pub raft_applied: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_has_leader: IntGauge,
    /// Admin map event streams open.
    pub map_clients: IntGauge,
    /// Admin map streams cut for falling behind.
    pub map_clients_dropped: IntCounter,
    /// Position-feed requests to game servers, by `outcome` (`ok`, `failed`).
    pub map_position_polls: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let servers = IntGaugeVec::new(Opts::new("mesh_servers", "Registered game servers by state"), &["state"])
            .expect("static metric definition");
        let regions =
            IntGaugeVec::new(Opts::new("mesh_regions", "Leaf regions by whether a live server owns them"), &["state"])
                .expect("static metric definition");
        let commands =
            IntCounterVec::new(Opts::new("mesh_commands_total", "State-machine commands applied, by kind"), &["kind"])
                .expect("static metric definition");
        let refused = IntCounterVec::new(
            Opts::new("mesh_requests_refused_total", "Requests refused, by stable reason"),
            &["reason"],
        )
        .expect("static metric definition");
        let transfers = IntCounter::new(
            "authority_transfers_committed_total",
            "Authority transfers committed (the infrastructure document's authority_transfer_count)",
        )
        .expect("static metric definition");
        let server_deaths = IntCounter::new("mesh_server_deaths_total", "Game servers declared dead")
            .expect("static metric definition");
        let desired_game_servers = prometheus::IntGauge::new(
            "mesh_desired_game_servers",
            "Game servers the mesh should run for its players (for the autoscaler)",
        )
        .expect("static metric definition");
        let region_players = IntGaugeVec::new(
            Opts::new("mesh_region_players", "Players per region, as its owner last reported them"),
            &["region", "server"],
        )
        .expect("static metric definition");
        let region_changes = IntCounterVec::new(
            Opts::new(
                "mesh_region_changes_total",
                "Region splits, merges and balancer moves committed, by kind (split, merge, move)",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let auth = IntCounterVec::new(
            Opts::new("auth_requests_total", "Account, login and ticket requests by outcome"),
            &["outcome"],
        )
        .expect("static metric definition");
        let store_writes = IntCounterVec::new(
            Opts::new("coordinator_store_writes_total", "Topology and transfer-log writes to the database by result"),
            &["what", "result"],
        )
        .expect("static metric definition");
        let counter_vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("static metric definition")
        };
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("static metric definition");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("static metric definition");
        let mut names = Vec::new();
        let raft_dropped =
            counter_vec("raft_messages_dropped_total", "Raft messages not delivered, by reason", "reason");
        let raft_refused =
            counter_vec("raft_batches_refused_total", "Raft batches refused from peers, by reason", "reason");
        let raft_proposals_failed =
            counter("raft_proposals_failed_total", "Proposals that did not commit in time (no leader, leader change)");
        let raft_storage_failures = counter("raft_storage_failures_total", "Raft log writes that failed");
        let raft_snapshots_installed =
            counter("raft_snapshots_installed_total", "Snapshots received from the leader and installed");
        let raft_leader_changes = counter("raft_leader_elections_won_total", "Times this replica became leader");
        let raft_term = gauge("raft_term", "Current Raft term");
        let raft_commit = gauge("raft_commit_index", "Highest log index known committed");
        let raft_applied = gauge("raft_applied_index", "Highest log index applied to the state machine");
        let raft_is_leader = gauge("raft_is_leader", "1 while this replica leads");
        let raft_has_leader = gauge("raft_has_leader", "1 while this replica knows a leader");
        let map_clients = gauge("coordinator_map_clients", "Admin map event streams open");
        let map_clients_dropped =
            counter("coordinator_map_clients_dropped_total", "Admin map event streams cut for falling behind");
        let map_position_polls = counter_vec(
            "coordinator_map_position_polls_total",
            "Position-feed requests to game servers while a map is open, by outcome",
            "outcome",
        );
        for c in [
            Box::new(raft_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(raft_refused.clone()),
            Box::new(raft_proposals_failed.clone()),
            Box::new(raft_storage_failures.clone()),
            Box::new(raft_snapshots_installed.clone()),
            Box::new(raft_leader_changes.clone()),
            Box::new(raft_term.clone()),
            Box::new(raft_commit.clone()),
            Box::new(raft_applied.clone()),
            Box::new(raft_is_leader.clone()),
            Box::new(raft_has_leader.clone()),
            Box::new(map_clients.clone()),
            Box::new(map_clients_dropped.clone()),
            Box::new(map_position_polls.clone()),
        ] {
            names.extend(c.desc().into_iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        for c in [
            Box::new(auth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(store_writes.clone()),
            Box::new(servers.clone()),
            Box::new(regions.clone()),
            Box::new(desired_game_servers.clone()),
            Box::new(region_players.clone()),
            Box::new(commands.clone()),
            Box::new(refused.clone()),
            Box::new(transfers.clone()),
            Box::new(server_deaths.clone()),
            Box::new(region_changes.clone()),
        ] {
            names.extend(c.desc().into_iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        Self {
            registry,
            names,
            servers,
            regions,
            desired_game_servers,
            region_players,
            commands,
            refused,
            transfers,
            server_deaths,
            region_changes,
            auth,
            store_writes,
            raft_dropped,
            raft_refused,
            raft_proposals_failed,
            raft_storage_failures,
            raft_snapshots_installed,
            raft_leader_changes,
            raft_term,
            raft_commit,
            raft_applied,
            raft_is_leader,
            raft_has_leader,
            map_clients,
            map_clients_dropped,
            map_position_polls,
        }
    }

    /// The names of the metrics it registered (the process's own aside).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        svc::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
