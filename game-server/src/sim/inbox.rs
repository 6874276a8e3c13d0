//! The simulation's channels: its inbox, its outbox to the control plane,
//! and the player connections it writes to, with [`send`], which queues a
//! message for one connection (the tick thread never waits: what does not
//! fit is counted). Imports no feature of the
//! simulation; every feature may use it.

use std::collections::HashMap;

use bevy_ecs::prelude::*;
use shared::PlayerId;
use shared::wire::JoinRole;
use tokio::sync::mpsc;

use super::core::SimMetrics;
use super::messages::{ConnId, ConnTx, Outbound, SimIn, SimOut};

/// Queues a message for one connection; what does not fit is counted (a
/// datagram dropped; for a control frame, the connection is closed).
pub(crate) fn send(conns: &Conns, conn: u64, msg: Outbound, metrics: &SimMetrics) {
    if let Some(c) = conns.0.get(&conn)
        && let Err(e) = c.tx.try_send(msg)
    {
        metrics.0.datagrams_dropped.with_label_values(&[e.reason()]).inc();
    }
}

#[derive(Resource, Debug)]
pub struct Inbox(pub mpsc::Receiver<SimIn>);

#[derive(Resource, Debug, Clone)]
pub struct Outbox(pub mpsc::Sender<SimOut>);

#[derive(Debug)]
pub struct Conn {
    pub player: PlayerId,
    /// The name the player joined with (an avatar handed over here takes it).
    pub name: String,
    pub role: JoinRole,
    pub tx: ConnTx,
    /// Newest snapshot tick the client acknowledged on this connection.
    pub acked: shared::Tick,
}

/// Player connections open on this server.
#[derive(Resource, Debug, Default)]
pub struct Conns(pub HashMap<ConnId, Conn>);
