//! The authority invariants, checked from the per-tick logs every game
//! server of a test mesh writes (`--authority-log`): one line a tick with
//! the entities it was authoritative for and, per avatar, the inputs it
//! applied that tick.
//!
//! - At every tick, no entity has more than one authoritative server; and
//!   where every server of the mesh logged the tick (none had died), an
//!   entity between its first and last appearance has exactly one.
//! - Each player's inputs are applied in increasing order across all
//!   servers, none twice; skipped sequence numbers (lost inputs) are counted.
//!   A server that resumes a dead source's player from its ghost logs the
//!   last input the ghost had (`resumed`): the inputs the source applied
//!   after it, in ticks whose state never left it, died with it, and are
//!   counted as rolled back, not as applied (the survivor applies them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// Inputs one server applied to one avatar in one tick: (tick, server,
/// first seq, last seq, count).
type Applied = (u64, u64, u64, u64, u64);

/// What the logs showed.
#[derive(Debug, Default, Clone)]
pub struct Invariants {
    /// Entities seen authoritative anywhere.
    pub entities: usize,
    /// Ticks checked for "exactly one" (every server logged them).
    pub ticks_checked: u64,
    /// (entity, tick, servers) where more than one server was authoritative.
    pub duplicated: Vec<(u64, u64, Vec<u64>)>,
    /// (entity, tick) where every server logged the tick, the entity was
    /// alive before and after it, and nobody was authoritative.
    pub unowned: Vec<(u64, u64)>,
    /// (entity, tick, first seq that tick, newest seq applied before) where an
    /// input was applied again or out of order.
    pub input_regressions: Vec<(u64, u64, u64, u64)>,
    /// Inputs applied, all players (on the timeline that survived).
    pub inputs_applied: u64,
    /// Inputs a server applied in ticks whose state died with it (after the
    /// ghost a successor resumed its player from).
    pub inputs_rolled_back: u64,
    /// Sequence numbers skipped between two applied inputs, all players.
    pub inputs_skipped: u64,
    /// Players whose inputs were applied by more than one server.
    pub players_handed_over: usize,
}

impl Invariants {
    /// Reads `<dir>/<name>.authority.jsonl` for each server name.
    pub fn read(dir: &Path, names: &[String]) -> anyhow::Result<Self> {
        // tick -> servers that logged it; entity -> tick -> servers.
        let mut logged: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut claims: BTreeMap<u64, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
        // entity -> (tick, server, first, last, count)
        let mut inputs: BTreeMap<u64, Vec<Applied>> = BTreeMap::new();
        // entity -> (tick, dead source, last input its ghost had)
        let mut resumed: BTreeMap<u64, Vec<(u64, u64, u64)>> = BTreeMap::new();
        let mut servers = BTreeSet::new();
        for name in names {
            let path = dir.join(format!("{name}.authority.jsonl"));
            let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for line in text.lines() {
                // The last line of a killed server may be cut short.
                let Ok(d) = serde_json::from_str::<Value>(line) else { continue };
                let (tick, server) = (d["tick"].as_u64().unwrap_or(0), d["server"].as_u64().unwrap_or(0));
                // A late handoff's ticks, simulated retroactively: claims,
                // but not a tick the server logged live.
                if d["catch_up"].as_bool() != Some(true) {
                    servers.insert(server);
                    logged.entry(tick).or_default().insert(server);
                }
                for e in d["auth"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
                    claims.entry(e).or_default().entry(tick).or_default().push(server);
                }
                for i in d["inputs"].as_array().into_iter().flatten() {
                    let v: Vec<u64> = i.as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
                    if let [e, first, last, n] = v[..] {
                        inputs.entry(e).or_default().push((tick, server, first, last, n));
                    }
                }
                for r in d["resumed"].as_array().into_iter().flatten() {
                    let v: Vec<u64> = r.as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
                    if let [e, from, last_input] = v[..] {
                        resumed.entry(e).or_default().push((tick, from, last_input));
                    }
                }
            }
        }
        let mut out = Invariants { entities: claims.len(), ..Default::default() };
        let all = servers.len();
        let mut checked = BTreeSet::new();
        for (entity, ticks) in &claims {
            let (Some(first), Some(last)) = (ticks.keys().next().copied(), ticks.keys().last().copied()) else {
                continue;
            };
            for (tick, s) in ticks {
                if s.len() > 1 {
                    out.duplicated.push((*entity, *tick, s.clone()));
                }
            }
            for t in first..=last {
                if logged.get(&t).is_some_and(|s| s.len() == all) {
                    checked.insert(t);
                    if !ticks.contains_key(&t) {
                        out.unowned.push((*entity, t));
                    }
                }
            }
        }
        out.ticks_checked = checked.len() as u64;
        for (entity, mut applied) in inputs {
            // What a dead source applied after the ghost its successor
            // resumed from is gone with it.
            for &(at, from, kept) in resumed.get(&entity).into_iter().flatten() {
                applied.retain_mut(|(tick, server, first, last, n)| {
                    if *server != from || *tick >= at || *last <= kept {
                        return true;
                    }
                    let gone = (*last - kept.max(first.saturating_sub(1))).min(*n);
                    out.inputs_rolled_back += gone;
                    *n -= gone;
                    *last = kept;
                    *n > 0
                });
            }
            applied.sort();
            let mut newest = 0u64;
            let by: BTreeSet<u64> = applied.iter().map(|a| a.1).collect();
            out.players_handed_over += usize::from(by.len() > 1);
            for (tick, _, first, last, n) in applied {
                if first <= newest || last < first || last - first + 1 < n {
                    out.input_regressions.push((entity, tick, first, newest));
                } else {
                    out.inputs_skipped += first - newest - 1 + (last - first + 1 - n);
                }
                out.inputs_applied += n;
                newest = newest.max(last);
            }
        }
        Ok(out)
    }

    /// Panics unless no entity ever had two authoritative servers, none was
    /// left without one while every server was up, and no input was applied
    /// twice or out of order.
    pub fn assert_hold(&self) {
        assert!(self.entities > 0 && self.ticks_checked > 0, "nothing was checked: {self:?}");
        assert!(self.duplicated.is_empty(), "two authorities: {:?}", &self.duplicated[..self.duplicated.len().min(10)]);
        assert!(self.unowned.is_empty(), "no authority: {:?}", &self.unowned[..self.unowned.len().min(10)]);
        assert!(
            self.input_regressions.is_empty(),
            "inputs applied twice or out of order: {:?}",
            &self.input_regressions[..self.input_regressions.len().min(10)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(a: &str, b: &str) -> Invariants {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.authority.jsonl"), a).unwrap();
        std::fs::write(dir.path().join("b.authority.jsonl"), b).unwrap();
        Invariants::read(dir.path(), &["a".into(), "b".into()]).unwrap()
    }

    #[test]
    fn a_clean_handoff_holds() {
        let inv = logs(
            "{\"tick\":1,\"server\":1,\"auth\":[7],\"inputs\":[[7,1,1,1]]}\n\
             {\"tick\":2,\"server\":1,\"auth\":[],\"inputs\":[]}\n",
            "{\"tick\":1,\"server\":2,\"auth\":[],\"inputs\":[]}\n\
             {\"tick\":2,\"server\":2,\"auth\":[7],\"inputs\":[[7,2,3,2]]}\n",
        );
        inv.assert_hold();
        assert_eq!((inv.ticks_checked, inv.inputs_applied, inv.inputs_skipped, inv.players_handed_over), (2, 3, 0, 1));
    }

    #[test]
    fn every_violation_is_caught() {
        // Both at tick 2; nobody at tick 3 (both logged it); input 2 twice; 5 and 6 skipped.
        let inv = logs(
            "{\"tick\":1,\"server\":1,\"auth\":[7],\"inputs\":[[7,1,2,2]]}\n\
             {\"tick\":2,\"server\":1,\"auth\":[7],\"inputs\":[]}\n\
             {\"tick\":3,\"server\":1,\"auth\":[],\"inputs\":[]}\n\
             {\"tick\":4,\"server\":1,\"auth\":[],\"inputs\":[]}\n",
            "{\"tick\":2,\"server\":2,\"auth\":[7],\"inputs\":[[7,2,4,3]]}\n\
             {\"tick\":3,\"server\":2,\"auth\":[],\"inputs\":[]}\n\
             {\"tick\":4,\"server\":2,\"auth\":[7],\"inputs\":[[7,7,7,1]]}\n",
        );
        assert_eq!(inv.duplicated, vec![(7, 2, vec![1, 2])]);
        assert_eq!(inv.unowned, vec![(7, 3)]);
        assert_eq!(inv.input_regressions, vec![(7, 2, 2, 2)]);
        assert_eq!(inv.inputs_skipped, 2);
        assert!(std::panic::catch_unwind(|| inv.assert_hold()).is_err());
    }

    #[test]
    fn inputs_a_dead_source_applied_after_its_last_ghost_are_rolled_back() {
        // Server 1 applies 1..=3, its ghost only got out with 2 applied; it
        // dies; server 2 resumes from the ghost and applies 3 and 4.
        let dead = "{\"tick\":1,\"server\":1,\"auth\":[7],\"inputs\":[[7,1,2,2]]}\n\
                    {\"tick\":2,\"server\":1,\"auth\":[7],\"inputs\":[[7,3,3,1]]}\n";
        let inv = logs(
            dead,
            "{\"tick\":1,\"server\":2,\"auth\":[],\"inputs\":[]}\n\
             {\"tick\":2,\"server\":2,\"auth\":[],\"inputs\":[]}\n\
             {\"tick\":5,\"server\":2,\"auth\":[7],\"inputs\":[[7,3,4,2]],\"resumed\":[[7,1,2]]}\n",
        );
        inv.assert_hold();
        assert_eq!((inv.inputs_applied, inv.inputs_rolled_back, inv.inputs_skipped), (4, 1, 0));
        // Without the resume record, input 3 was applied twice.
        let inv = logs(dead, "{\"tick\":5,\"server\":2,\"auth\":[7],\"inputs\":[[7,3,4,2]]}\n");
        assert_eq!(inv.input_regressions, vec![(7, 5, 3, 3)]);
        // A resume names its source: another server's re-application is
        // still caught.
        let inv = logs(dead, "{\"tick\":5,\"server\":2,\"auth\":[7],\"inputs\":[[7,3,4,2]],\"resumed\":[[7,9,2]]}\n");
        assert_eq!(inv.input_regressions, vec![(7, 5, 3, 3)]);
    }
}
