//! The coordinator's Prometheus metrics, on a registry of its own.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub servers: IntGaugeVec,
    pub regions: IntGaugeVec,
    pub commands: IntCounterVec,
    pub refused: IntCounterVec,
    pub transfers: IntCounter,
    pub server_deaths: IntCounter,
    /// Auth outcomes: `login`, `ticket`, `account_created`, or a refusal label.
    pub auth: IntCounterVec,
    /// Database writes by what (`topology`, `transfers`) and result (`ok`, `failed`).
    pub store_writes: IntCounterVec,
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
        let transfers = IntCounter::new("authority_transfer_count", "Authority transfers committed")
            .expect("static metric definition");
        let server_deaths = IntCounter::new("mesh_server_deaths_total", "Game servers declared dead")
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
        for c in [
            Box::new(auth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(store_writes.clone()),
            Box::new(servers.clone()),
            Box::new(regions.clone()),
            Box::new(commands.clone()),
            Box::new(refused.clone()),
            Box::new(transfers.clone()),
            Box::new(server_deaths.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self { registry, servers, regions, commands, refused, transfers, server_deaths, auth, store_writes }
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
