//! Process plumbing shared by the mesh's daemons and tools: how they log,
//! stop, report their bound ports and render their metrics. Nothing here
//! knows about the game.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `PS_LOG` (default `default_level`), as text or,
/// with `format == "json"`, one JSON object per line.
pub fn init_logging(format: &str, default_level: &str) {
    let filter = EnvFilter::try_from_env("PS_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" { fmt.json().init() } else { fmt.init() }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes and `meshctl up` send).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

/// Writes `value` as JSON to `path` atomically (temporary file, then rename),
/// so a reader polling for the file never sees half of it.
pub fn write_json_atomically(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Prometheus text exposition of every metric in `registry`.
pub fn render_metrics(registry: &prometheus::Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

/// Unix time, nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Compares secrets (tokens) in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
