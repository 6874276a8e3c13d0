//! The game server's Prometheus metrics (port 8081), on a registry of its own.
//!
//! Label values of the `*_dropped_total` / `*_refused_total` families are
//! stable short names (`DecodeError::reason`, …): dashboards and alerts key on
//! them.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// The names of the metrics registered (for the list in ARCHITECTURE.md).
    names: Vec<String>,
    pub tick_duration: Histogram,
    pub ticks: IntCounter,
    pub ticks_overrun: IntCounter,
    pub ticks_skipped: IntCounter,
    pub active_players: IntGauge,
    pub entities: IntGauge,
    pub connections: IntGauge,
    pub connections_refused: IntCounterVec,
    pub datagrams_dropped: IntCounterVec,
    pub peer_refused: IntCounterVec,
    /// Saved components left out at a join (the registry refused them).
    pub saved_components_dropped: IntCounterVec,
    /// Neighbours whose component schema this server knows.
    pub peer_schemas: IntGauge,
    pub bytes_sent: IntCounter,
    pub bytes_received: IntCounter,
    pub snapshots_sent: IntCounter,
    pub inputs_applied: IntCounter,
    pub transfers: IntCounterVec,
    pub handoff_late_ticks: Histogram,
    pub handoff_latency_ticks: Histogram,
    pub fps_avg: Gauge,
    pub physics_step: Histogram,
    pub snapshot_encode: Histogram,
    pub snapshot_records: IntCounterVec,
    /// `snapshot_records` by kind, looked up once: `new`, `delta`,
    /// `resent`, `removed`.
    pub snapshot_record_kinds: [IntCounter; 4],
    pub snapshot_component_bytes: IntCounter,
    pub snapshots_unbased: IntCounter,
    /// CPU time of building snapshots, every thread that does it counted.
    pub replication_cpu: prometheus::Counter,
    pub chunk_edits_sent: IntCounter,
    pub hints: IntCounterVec,
    pub ghosts: IntGauge,
    pub ghost_updates: IntCounterVec,
    pub ghost_batches: IntCounterVec,
    pub physics_step_mean: Gauge,
    pub terrain_chunks_loaded: IntGauge,
    pub chunk_generate: Histogram,
    pub chunk_failures: IntCounter,
    pub props_awake: IntGauge,
    pub props_removed: IntCounterVec,
    pub grabs: IntCounter,
    pub interactions: IntCounterVec,
    pub throws: IntCounter,
    pub inputs_rejected: IntCounterVec,
    pub bodies_stuck: IntCounter,
    pub edits_applied: IntCounter,
    /// Chat lines and notices: `published` (to every server through Redis),
    /// `local` (Redis down: this server's players only), `delivered` (from
    /// Redis to this server's players), `invalid`, `rate_limited`.
    pub world_events: IntCounterVec,
    pub edits_rejected: IntCounterVec,
    pub voxels_changed: IntCounter,
    pub structures_broken: IntCounter,
    pub edits_unacknowledged: IntGauge,
    pub store_up: IntGauge,
    pub store_queue_batches: IntGauge,
    pub store_in_flight_deltas: IntGauge,
    pub store_append_failures: IntCounter,
    /// Checkpoint rows: written, refused_stale (a successor's stands),
    /// dropped_backlog_full.
    pub checkpoint_rows: IntCounterVec,
    pub checkpoint_write_failures: IntCounter,
    pub checkpoint_backlog: IntGauge,
    pub checkpoint_lag: Gauge,
    pub store_compactions: IntCounter,
    pub store_last_flush: Gauge,
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("static metric definition")
}

fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("static metric definition")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("static metric definition")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("static metric definition")
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).expect("static metric definition")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let snapshot_records = counter_vec(
            "snapshot_records_total",
            "Entity records in snapshots: new to the view (whole), delta, resent whole (the state the client holds \
             was forgotten), and removals",
            "kind",
        );
        let snapshot_record_kinds =
            ["new", "delta", "resent", "removed"].map(|k| snapshot_records.with_label_values(&[k]));
        let mut m = Self {
            names: Vec::new(),
            tick_duration: histogram(
                "server_tick_duration_seconds",
                "Time to run one simulation tick",
                vec![0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.0111, 0.015, 0.025, 0.05, 0.1],
            ),
            ticks: counter("server_ticks_total", "Simulation ticks run"),
            ticks_overrun: counter("server_ticks_overrun_total", "Ticks that did not finish within their 1/90 s slot"),
            ticks_skipped: counter(
                "server_ticks_skipped_total",
                "Grid ticks skipped after an overrun (never caught up in a burst)",
            ),
            active_players: int_gauge("active_players", "Players this server is authoritative for"),
            entities: int_gauge("server_entities", "Entities this server is authoritative for"),
            connections: int_gauge("player_connections", "Open player QUIC connections"),
            connections_refused: counter_vec(
                "player_connections_refused_total",
                "Player connections refused, by reason",
                "reason",
            ),
            datagrams_dropped: counter_vec("packets_dropped_total", "Player datagrams dropped, by reason", "reason"),
            peer_refused: counter_vec(
                "peer_requests_refused_total",
                "Server-to-server requests refused, by reason",
                "reason",
            ),
            saved_components_dropped: counter_vec(
                "saved_components_dropped_total",
                "A player's saved components left out at its join (this build's registry refused them), by reason",
                "reason",
            ),
            peer_schemas: int_gauge(
                "peer_schemas",
                "Neighbours whose component schema this server knows (transfers to them are checked against it)",
            ),
            bytes_sent: counter("bytes_sent_total", "Datagram payload bytes sent to players"),
            bytes_received: counter("bytes_received_total", "Datagram payload bytes received from players"),
            snapshots_sent: counter("snapshots_sent_total", "Snapshot datagrams sent"),
            inputs_applied: counter("inputs_applied_total", "Player input frames applied"),
            transfers: counter_vec("authority_transfers_total", "Authority transfers by direction and result", "kind"),
            handoff_late_ticks: histogram(
                "handoff_late_ticks",
                "Ticks a handed-off entity arrived after its effective tick (0 = in time)",
                vec![0.0, 1.0, 2.0, 4.0, 9.0, 18.0, 45.0, 90.0],
            ),
            handoff_latency_ticks: histogram(
                "handoff_latency_ticks",
                "Ticks from the tick an entity passed the handoff line (on the source) to the first tick its new owner simulated it",
                vec![0.0, 1.0, 2.0, 3.0, 5.0, 9.0, 12.0, 18.0, 45.0, 90.0],
            ),
            fps_avg: gauge("server_fps_avg", "Ticks run over the last second (target 90)"),
            ghosts: int_gauge("ghosts", "Read-only ghosts held of entities neighbours own near this server's regions"),
            ghost_updates: counter_vec(
                "ghost_updates_total",
                "Ghost updates received from neighbours: applied, expired, or refused by reason",
                "result",
            ),
            ghost_batches: counter_vec(
                "ghost_batches_total",
                "Overlap-sync batches: sent, received, dropped (queue full or no stream), refused",
                "kind",
            ),
            hints: counter_vec(
                "preconnect_hints_total",
                "Pre-connect hints sent to players, with or without a standby ticket",
                "ticket",
            ),
            chunk_edits_sent: counter(
                "chunk_edits_sent_total",
                "Chunks whose player edits were streamed to a player (again when they change)",
            ),
            snapshot_encode: histogram(
                "server_snapshot_encode_seconds",
                "Time to pick, quantise and delta-encode one player's snapshot",
                vec![0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001],
            ),
            snapshot_records,
            snapshot_record_kinds,
            snapshots_unbased: counter(
                "snapshots_unbased_total",
                "Snapshots sent with no baseline: the client acknowledged none the server remembers, so every \
                 entity in it is sent whole",
            ),
            snapshot_component_bytes: counter(
                "snapshot_component_bytes_total",
                "Bytes of component blocks in snapshots",
            ),
            replication_cpu: prometheus::Counter::new(
                "server_replication_cpu_seconds_total",
                "CPU time the snapshot stage used, on the tick thread and the replication threads together",
            )
            .expect("static metric definition"),
            physics_step: histogram(
                "server_physics_step_seconds",
                "Time of one rigid-body step",
                vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016],
            ),
            physics_step_mean: gauge(
                "server_physics_step_mean_seconds",
                "Mean rigid-body step time over the last second (the infrastructure document's physics_step_ms)",
            ),
            terrain_chunks_loaded: int_gauge("terrain_chunks_loaded", "Terrain chunks held by the simulation"),
            chunk_generate: histogram(
                "terrain_chunk_load_seconds",
                "Time to build one chunk on a generator thread (store read, generation, collider)",
                vec![0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064],
            ),
            chunk_failures: counter("terrain_chunk_failures_total", "Chunks that could not be loaded (store errors)"),
            props_awake: int_gauge("props_awake", "Dynamic props not asleep"),
            props_removed: counter_vec("props_removed_total", "Props removed, by reason", "reason"),
            grabs: counter("props_grabbed_total", "Props grabbed by a hand"),
            interactions: IntCounterVec::new(
                Opts::new(
                    "interactions_total",
                    "Pushes and grabs of a neighbour's prop: sent or dropped by the player's server; applied or \
                     refused (by reason) by the owner; arrived in the hand",
                ),
                &["kind", "result"],
            )
            .expect("static metric definition"),
            throws: counter("props_released_total", "Props let go of (thrown or dropped)"),
            inputs_rejected: counter_vec(
                "inputs_rejected_total",
                "Player input frames refused by the simulation, by reason",
                "reason",
            ),
            bodies_stuck: counter(
                "bodies_stuck_total",
                "Player moves skipped because the body is inside rock or unloaded terrain",
            ),
            edits_applied: counter("world_edits_total", "World edits applied"),
            world_events: counter_vec("world_events_total", "Chat lines and notices, by route or drop reason", "route"),
            edits_rejected: counter_vec("world_edits_rejected_total", "World edits refused, by reason", "reason"),
            voxels_changed: counter("world_voxels_changed_total", "Voxels changed by edits and breaks"),
            structures_broken: counter("structures_broken_total", "Unsupported structures that broke off"),
            edits_unacknowledged: int_gauge(
                "world_edits_unacknowledged",
                "Edits applied and waiting for the store to make them durable (held during a database outage)",
            ),
            store_up: int_gauge("world_store_up", "1 while the world store takes writes, 0 while appends fail"),
            store_queue_batches: int_gauge("world_store_queue_batches", "Tick batches queued for the edit writer"),
            store_in_flight_deltas: int_gauge(
                "world_store_in_flight_deltas",
                "Voxel deltas in the writer's current transaction (retried while the store is down)",
            ),
            store_append_failures: counter(
                "world_store_append_failures_total",
                "Failed attempts to append world deltas",
            ),
            store_compactions: counter("world_store_compactions_total", "Chunks compacted into snapshot rows"),
            checkpoint_rows: counter_vec(
                "checkpoint_rows_total",
                "Entity checkpoint rows, by outcome: written, refused_stale (the store holds a successor's), dropped_backlog_full",
                "outcome",
            ),
            checkpoint_write_failures: counter(
                "checkpoint_write_failures_total",
                "Failed attempts to write checkpoints (held and retried)",
            ),
            checkpoint_backlog: int_gauge(
                "checkpoint_backlog",
                "Entities offered for a checkpoint and not yet written",
            ),
            checkpoint_lag: gauge(
                "checkpoint_lag_seconds",
                "Age of the oldest state in the newest checkpoint write when it landed",
            ),
            store_last_flush: gauge("world_store_last_flush_seconds", "Duration of the newest successful delta append"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.tick_duration.clone()),
            Box::new(m.ticks.clone()),
            Box::new(m.ticks_overrun.clone()),
            Box::new(m.ticks_skipped.clone()),
            Box::new(m.active_players.clone()),
            Box::new(m.entities.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.datagrams_dropped.clone()),
            Box::new(m.peer_refused.clone()),
            Box::new(m.saved_components_dropped.clone()),
            Box::new(m.peer_schemas.clone()),
            Box::new(m.bytes_sent.clone()),
            Box::new(m.bytes_received.clone()),
            Box::new(m.snapshots_sent.clone()),
            Box::new(m.inputs_applied.clone()),
            Box::new(m.transfers.clone()),
            Box::new(m.handoff_late_ticks.clone()),
            Box::new(m.fps_avg.clone()),
            Box::new(m.physics_step.clone()),
            Box::new(m.snapshot_encode.clone()),
            Box::new(m.snapshot_records.clone()),
            Box::new(m.snapshot_component_bytes.clone()),
            Box::new(m.snapshots_unbased.clone()),
            Box::new(m.replication_cpu.clone()),
            Box::new(m.chunk_edits_sent.clone()),
            Box::new(m.hints.clone()),
            Box::new(m.handoff_latency_ticks.clone()),
            Box::new(m.ghosts.clone()),
            Box::new(m.ghost_updates.clone()),
            Box::new(m.ghost_batches.clone()),
            Box::new(m.physics_step_mean.clone()),
            Box::new(m.terrain_chunks_loaded.clone()),
            Box::new(m.chunk_generate.clone()),
            Box::new(m.chunk_failures.clone()),
            Box::new(m.props_awake.clone()),
            Box::new(m.props_removed.clone()),
            Box::new(m.grabs.clone()),
            Box::new(m.interactions.clone()),
            Box::new(m.throws.clone()),
            Box::new(m.inputs_rejected.clone()),
            Box::new(m.bodies_stuck.clone()),
            Box::new(m.edits_applied.clone()),
            Box::new(m.world_events.clone()),
            Box::new(m.edits_rejected.clone()),
            Box::new(m.voxels_changed.clone()),
            Box::new(m.structures_broken.clone()),
            Box::new(m.edits_unacknowledged.clone()),
            Box::new(m.store_up.clone()),
            Box::new(m.store_queue_batches.clone()),
            Box::new(m.store_in_flight_deltas.clone()),
            Box::new(m.store_append_failures.clone()),
            Box::new(m.store_compactions.clone()),
            Box::new(m.store_last_flush.clone()),
            Box::new(m.checkpoint_rows.clone()),
            Box::new(m.checkpoint_write_failures.clone()),
            Box::new(m.checkpoint_backlog.clone()),
            Box::new(m.checkpoint_lag.clone()),
        ];
        for c in collectors {
            m.names.extend(c.desc().into_iter().map(|d| d.fq_name.clone()));
            m.registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        m
    }

    /// The names of the metrics it registered (the process's own aside).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Copies the edit writer's figures into the registry (called about once a second).
    pub fn sample_writer(&self, w: &crate::store::WriterHandle) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &w.stats;
        self.store_up.set(i64::from(s.store_up.load(Relaxed)));
        self.store_queue_batches.set(w.queued() as i64);
        self.store_in_flight_deltas.set(s.in_flight_deltas.load(Relaxed) as i64);
        let catch_up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        catch_up(&self.store_append_failures, s.append_failures.load(Relaxed));
        catch_up(&self.store_compactions, s.compactions.load(Relaxed));
        self.store_last_flush.set(s.last_flush_us.load(Relaxed) as f64 / 1e6);
    }

    pub fn render(&self) -> String {
        svc::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod list_tests {
    use std::collections::BTreeSet;

    use super::Metrics;

    /// The metric names ARCHITECTURE.md lists: every word in backticks in
    /// its "Metric names" section outside parentheses, labels (`{…}`) aside.
    fn listed() -> BTreeSet<String> {
        let md = include_str!("../../ARCHITECTURE.md");
        let section = md.split("\n## Metric names").nth(1).expect("ARCHITECTURE.md has a metric section");
        let section = section.split("\n## ").next().unwrap_or_default();
        let mut depth = 0usize;
        let outside: String = section
            .chars()
            .filter(|c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                depth == 0 && *c != ')'
            })
            .collect();
        outside.split('`').skip(1).step_by(2).filter_map(|s| s.split('{').next()).map(str::to_owned).collect()
    }

    /// What both daemons register: their own metrics and the cache's.
    fn registered() -> BTreeSet<String> {
        use prometheus::core::Collector;
        let game = Metrics::new();
        let coordinator = mesh_coordinator::metrics::Metrics::new();
        let cache = persistence::cache::Cache::new(None, "test").expect("a cache without Redis");
        let cache = persistence::cache::CacheCollector::new(std::sync::Arc::new(cache));
        let cache: Vec<String> = cache.desc().into_iter().map(|d| d.fq_name.clone()).collect();
        game.names().iter().chain(coordinator.names()).chain(&cache).cloned().collect()
    }

    /// Every metric either daemon registers is in ARCHITECTURE.md's list,
    /// and the list names none that neither registers.
    #[test]
    fn the_metric_list_in_architecture_md_is_the_registries() {
        let registered = registered();
        let listed = listed();
        let missing: Vec<&String> = registered.difference(&listed).collect();
        assert!(missing.is_empty(), "registered, not in ARCHITECTURE.md's metric list: {missing:?}");
        let stale: Vec<&String> = listed.difference(&registered).collect();
        assert!(stale.is_empty(), "in ARCHITECTURE.md's metric list, registered by neither daemon: {stale:?}");
    }

    /// Prometheus's naming rules (what `promtool check metrics` lints):
    /// base units spelt out, no suffix a histogram or summary reserves, and
    /// every counter ends in `_total`.
    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let game = Metrics::new();
        let coordinator = mesh_coordinator::metrics::Metrics::new();
        for name in &registered() {
            for bad in ["_ms", "_us", "_sec", "_secs", "_mb", "_kb", "_count", "_sum", "_bucket"] {
                assert!(!name.ends_with(bad), "{name}: ends in {bad}");
            }
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{name}");
        }
        for registry in [&game.registry, &coordinator.registry] {
            for family in registry.gather() {
                if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                    assert!(family.name().ends_with("_total"), "counter {} does not end in _total", family.name());
                }
            }
        }
    }
}
