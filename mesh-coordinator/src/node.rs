//! The owner of the state machine: commands are proposed here and applied in
//! one order.
//!
//! This is the single-node form: a proposal is applied at once. The Raft
//! issue replaces `propose` with "append to the log, wait for commit, apply",
//! leaving the state machine and every caller unchanged.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::state::{Command, CommandError, CoordinatorState, Event, Response};

#[derive(Debug)]
pub struct Node {
    state: Mutex<CoordinatorState>,
    pub metrics: Metrics,
    map_version: watch::Sender<u64>,
}

/// Unix time, nanoseconds: the timestamp a proposer stamps on commands.
pub use svc::unix_nanos as now_nanos;

impl Node {
    pub fn new(state: CoordinatorState, metrics: Metrics) -> Self {
        let (map_version, _) = watch::channel(state.map_version());
        let node = Self { state: Mutex::new(state), metrics, map_version };
        node.refresh_gauges(&node.lock());
        node
    }

    fn lock(&self) -> MutexGuard<'_, CoordinatorState> {
        // The state machine never panics half-way through a command; if a
        // caller did while holding the lock, the state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this node can serve current reads and accept writes.
    pub fn is_ready(&self) -> bool {
        true
    }

    /// Applies `cmd` in log order and returns its response.
    pub async fn propose(&self, cmd: Command) -> Result<Response, CommandError> {
        let kind = cmd.kind();
        let (result, events) = {
            let mut s = self.lock();
            let out = s.apply(cmd);
            if !out.1.is_empty() {
                self.refresh_gauges(&s);
                self.map_version.send_replace(s.map_version());
            }
            out
        };
        self.metrics.commands.with_label_values(&[kind]).inc();
        if let Err(e) = &result {
            self.metrics.refused.with_label_values(&[e.reason()]).inc();
        }
        for e in &events {
            self.record(e);
        }
        result
    }

    /// A read of the current state.
    pub fn read<R>(&self, f: impl FnOnce(&CoordinatorState) -> R) -> R {
        f(&self.lock())
    }

    /// Changes whenever the region map does.
    pub fn watch_map(&self) -> watch::Receiver<u64> {
        self.map_version.subscribe()
    }

    fn refresh_gauges(&self, s: &CoordinatorState) {
        let alive = s.servers().values().filter(|r| r.alive).count() as i64;
        let total = s.servers().len() as i64;
        self.metrics.servers.with_label_values(&["alive"]).set(alive);
        self.metrics.servers.with_label_values(&["dead"]).set(total - alive);
        let owned = s
            .assignments()
            .values()
            .filter(|a| a.server.is_some_and(|id| s.server(id).is_some_and(|r| r.alive)))
            .count() as i64;
        self.metrics.regions.with_label_values(&["owned"]).set(owned);
        self.metrics.regions.with_label_values(&["unowned"]).set(s.assignments().len() as i64 - owned);
    }

    fn record(&self, e: &Event) {
        match e {
            Event::ServerRegistered { server, name } => info!(%server, %name, "server registered"),
            Event::ServerDied { server, silent_ms } => {
                self.metrics.server_deaths.inc();
                warn!(%server, silent_ms, "server declared dead");
            }
            Event::RegionAssigned { region, server, previous, epoch } => {
                info!(%region, server = ?server.map(|s| s.0), previous = ?previous.map(|s| s.0), %epoch, "region assigned")
            }
            Event::TransferCommitted(t) => {
                self.metrics.transfers.inc();
                info!(
                    id = t.id, entity = %t.entity, from = %t.from, to = %t.to,
                    epoch = %t.entity_epoch, effective_tick = t.effective_tick,
                    "authority transfer committed"
                );
            }
            Event::TransferCompleted { id, outcome } => info!(id, ?outcome, "authority transfer completed"),
        }
    }
}
