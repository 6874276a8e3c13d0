//! Process plumbing shared by the mesh's daemons and tools: how they log,
//! stop, report their bound ports and render their metrics. Nothing here
//! knows about the game.

#[cfg(feature = "http")]
pub mod http;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `PS_LOG` (default `default_level`), as text or,
/// with `format == "json"`, one JSON object per line.
pub fn init_logging(format: &str, default_level: &str) {
    let filter = EnvFilter::try_from_env("PS_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal: a log file (`meshctl up`'s, a pod's)
    // stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" { fmt.json().init() } else { fmt.init() }
}

/// An error and its causes on one line, `what: why: root cause`.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How a daemon or tool ends: `Ok` exits 0; an error (a port taken, a bad
/// flag value, a store that cannot be opened) is logged as one line and
/// exits 1. Never anyhow's report, which spreads over several lines and
/// adds a backtrace whenever `RUST_BACKTRACE` is set.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("exiting: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
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

/// What this process has used so far: CPU time (user + system) and its peak
/// resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub max_rss_kib: u64,
}

/// CPU time the calling thread has used (zero where the clock cannot be
/// read): what a stage costs, whatever else the host runs.
pub fn thread_cpu() -> std::time::Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(std::time::Duration::ZERO, std::time::Duration::from)
}

/// This process's [`Usage`], from `getrusage`.
pub fn usage() -> anyhow::Result<Usage> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    // Linux reports kibibytes.
    Ok(Usage { cpu_seconds: secs(u.user_time()) + secs(u.system_time()), max_rss_kib: u.max_rss().max(0) as u64 })
}

/// A UDP socket bound to `addr`, non-blocking, with kernel buffers of
/// `buffer_bytes` each way asked for: a QUIC endpoint that serves hundreds
/// of players at 90 Hz receives tens of thousands of datagrams a second, and
/// the usual 208 KiB default overflows whenever its task is late (the kernel
/// drops them: `RcvbufErrors` in `/proc/net/snmp`). The kernel caps the
/// size at `net.core.rmem_max` / `wmem_max`; the receive size granted is
/// returned.
pub fn udp_socket(addr: std::net::SocketAddr, buffer_bytes: usize) -> anyhow::Result<(std::net::UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).context("making a UDP socket")?;
    if addr.is_ipv6() {
        // Accept IPv4 too where the platform allows it (quinn does the same).
        let _ = s.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked is still a working socket.
    let _ = s.set_recv_buffer_size(buffer_bytes);
    let _ = s.set_send_buffer_size(buffer_bytes);
    s.bind(&addr.into()).with_context(|| format!("binding UDP {addr}"))?;
    s.set_nonblocking(true)?;
    let granted = s.recv_buffer_size().unwrap_or(0);
    Ok((s.into(), granted))
}

#[cfg(test)]
mod usage_tests {
    #[test]
    fn udp_sockets_get_bigger_buffers_than_the_default() {
        let (small, _) = super::udp_socket("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let (big, granted) = super::udp_socket("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let small = socket2::SockRef::from(&small).recv_buffer_size().unwrap();
        assert!(granted > small, "asked 1 MiB, got {granted}; asked 4 KiB, got {small}");
        assert_ne!(big.local_addr().unwrap().port(), 0);
    }

    #[test]
    fn usage_counts_cpu_time_and_peak_memory() {
        let before = super::usage().unwrap();
        let block = vec![1u8; 64 << 20];
        let mut x = 0u64;
        for i in 0..200_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let after = super::usage().unwrap();
        assert!(after.max_rss_kib >= 64 * 1024, "{after:?}");
        assert!(after.cpu_seconds > before.cpu_seconds, "{before:?} {after:?}");
        assert_eq!(block[block.len() - 1], 1);
    }
}
