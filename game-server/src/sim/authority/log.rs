//! The per-tick authority log (`--authority-log`), which the invariant
//! checks read.

use bevy_ecs::prelude::*;
use shared::{EntityId, ServerId, Tick};

use super::Authority;
use crate::sim::core::*;

/// Where the per-tick authority lines go, if anywhere.
#[derive(Resource, Debug, Default)]
pub struct AuthorityLog {
    pub tx: Option<std::sync::mpsc::SyncSender<String>>,
    /// Lines for ticks simulated retroactively after a late handoff.
    pub catch_up: Vec<(Tick, EntityId)>,
    /// Orphaned transfers resumed from a ghost since the last line: the
    /// entity, its dead source and the last input the ghost had applied.
    /// The source may have applied (and logged) later ones in ticks whose
    /// state never left it: those died with it and are applied again here.
    pub resumed: Vec<(EntityId, ServerId, u64)>,
}

/// One line per tick naming the entities this server simulated
/// authoritatively in it (plus ticks simulated retroactively after a late
/// handoff). Runs right after the bodies moved, before any release.
pub fn log_authority(
    entities: Query<(&NetId, Option<&Avatar>), With<Authority>>,
    tick: Res<TickState>,
    cfg: Res<SimConfig>,
    metrics: Res<SimMetrics>,
    mut log: ResMut<AuthorityLog>,
) {
    let Some(tx) = log.tx.clone() else { return };
    let mut lines: Vec<String> = Vec::new();
    let mut catch_up = std::mem::take(&mut log.catch_up);
    catch_up.sort_by_key(|(t, _)| *t);
    for (t, e) in catch_up {
        lines.push(format!(r#"{{"tick":{t},"server":{},"auth":[{}],"catch_up":true}}"#, cfg.server.0, e.0));
    }
    let ids: Vec<String> = entities.iter().map(|(n, _)| n.0.0.to_string()).collect();
    // Inputs applied this tick, per avatar: [entity, first seq, last seq, count].
    let inputs: Vec<String> = entities
        .iter()
        .filter_map(|(n, a)| a.and_then(|a| a.applied_now).map(|(f, l, c)| format!("[{},{f},{l},{c}]", n.0.0)))
        .collect();
    // Orphans resumed this tick: [entity, dead source, last input its ghost had].
    let resumed: Vec<String> =
        std::mem::take(&mut log.resumed).iter().map(|(e, from, last)| format!("[{},{},{last}]", e.0, from.0)).collect();
    lines.push(format!(
        r#"{{"tick":{},"server":{},"auth":[{}],"inputs":[{}],"resumed":[{}]}}"#,
        tick.tick,
        cfg.server.0,
        ids.join(","),
        inputs.join(","),
        resumed.join(",")
    ));
    for l in lines {
        if tx.try_send(l).is_err() {
            metrics.0.datagrams_dropped.with_label_values(&["authority_log_full"]).inc();
        }
    }
}
