//! The coordinator's answers to this server's transfer requests, as the
//! control task relays them: committed, refused (for now, or for good), or
//! an early transfer given up (the entity back under a new epoch, or not).

use bevy_ecs::prelude::*;
use shared::{EntityId, Epoch};
use tracing::{debug, warn};

use super::Authority;
use super::adopt::given_away;
use super::{CANCEL_AFTER_TICKS, TRANSFER_BACKOFF_TICKS, Transfer, TransferState};
use crate::sim::core::{Index, SimMetrics, TickState};
use crate::sim::messages::CommittedTransfer;
use crate::sim::players::despawn;

/// The coordinator committed the transfer this server asked for.
pub fn committed(world: &mut World, entity: EntityId, transfer: CommittedTransfer) {
    let e = world.resource::<Index>().by_net.get(&entity).copied();
    match e.and_then(|e| world.get_mut::<Transfer>(e)) {
        Some(mut t) if matches!(*t, Transfer(TransferState::Requested { .. })) => {
            *t = Transfer(TransferState::Committed(transfer))
        }
        _ => warn!(%entity, id = transfer.id, "transfer committed for an entity not waiting for one"),
    }
}

/// The coordinator refused it: asked again after a back-off; out of a region
/// given away, a final refusal means the release is over and the entity is
/// no longer this server's to hand on.
pub fn refused(world: &mut World, entity: EntityId, reason: &str, permanent: bool) {
    let until = world.resource::<TickState>().tick + TRANSFER_BACKOFF_TICKS;
    let e = world.resource::<Index>().by_net.get(&entity).copied();
    if permanent && let Some(e) = e.filter(|e| given_away(world, *e)) {
        warn!(%entity, %reason, "authority lost: the region was given away and the handoff refused");
        world.resource::<SimMetrics>().0.transfers.with_label_values(&["lost"]).inc();
        despawn(world, e);
    } else if let Some(e) = e
        && let Some(mut t) = world.get_mut::<Transfer>(e)
    {
        debug!(%entity, %reason, "transfer refused");
        *t = Transfer(TransferState::Backoff { until });
        world.entity_mut(e).remove::<crate::sim::interact::RemoteGrab>();
    }
}

/// An early transfer given up: back here under `entity_epoch`, or, when the
/// coordinator did not give it back, committed still (released if it passes
/// the line, else asked to be given up again after a while).
pub fn cancelled(world: &mut World, entity: EntityId, entity_epoch: Option<Epoch>) {
    let Some(e) = world.resource::<Index>().by_net.get(&entity).copied() else { return };
    let Some(Transfer(TransferState::Cancelling(t))) = world.get::<Transfer>(e).cloned() else { return };
    let tick = world.resource::<TickState>().tick;
    match entity_epoch {
        Some(epoch) => {
            if let Some(mut a) = world.get_mut::<Authority>(e) {
                a.entity_epoch = epoch;
            }
            world.entity_mut(e).insert(Transfer(TransferState::Backoff { until: tick + CANCEL_AFTER_TICKS }));
            world.resource::<SimMetrics>().0.transfers.with_label_values(&["cancelled"]).inc();
        }
        None => {
            world
                .entity_mut(e)
                .insert(Transfer(TransferState::Committed(CommittedTransfer { effective_tick: tick, ..t })));
        }
    }
}
