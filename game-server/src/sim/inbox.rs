//! Queueing a message for one player connection (the tick thread never
//! waits: what does not fit is counted). Imports no feature of the
//! simulation; every feature may use it.

use super::components::{Conns, SimMetrics};
use super::messages::Outbound;

/// Queues a message for one connection; what does not fit is counted (a
/// datagram dropped; for a control frame, the connection is closed).
pub(crate) fn send(conns: &Conns, conn: u64, msg: Outbound, metrics: &SimMetrics) {
    if let Some(c) = conns.0.get(&conn)
        && let Err(e) = c.tx.try_send(msg)
    {
        metrics.0.datagrams_dropped.with_label_values(&[e.reason()]).inc();
    }
}
