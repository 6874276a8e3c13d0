//! The per-tick authority log (`--authority-log`), which the invariant
//! checks read.

use bevy_ecs::prelude::*;

use crate::sim::components::*;

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
