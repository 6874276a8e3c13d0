//! Golden-file tests of the coordinator's placement decisions: each file in
//! `tests/golden/` is a script of commands, a line `----`, and the region
//! map and server states the state machine must end with. Run with
//! `BLESS=1` to rewrite the expected parts after a deliberate change (and
//! read the diff).
//!
//! Script lines (times in ms after the start; `#` starts a comment):
//! `world NXxNYxNZ`, `grace MS`, `timeout MS` (heartbeat timeout; before
//! `world`), `thresholds KEY=VALUE…`, `register NAME at MS`,
//! `heartbeat NAME at MS`, `report NAME players N [cpu X] [REGION=N…] at MS`,
//! `split REGION at MS`, `merge REGION at MS`, `move REGION NAME at MS`,
//! `drain NAME at MS`, `tick at MS`.
//!
//! The output lists what each command decided (deaths, splits, merges,
//! moves), then the region map, the servers and `desired_game_servers`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use glam::IVec3;
use mesh_coordinator::state::{
    Addresses, Bootstrap, Command, CoordinatorState, Event, Load, Policy, Response, Thresholds,
};
use shared::region::{RegionKey, RegionTree};
use shared::{ServerId, TickClock};

const MS: u64 = 1_000_000;
const T0: u64 = 1_800_000_000_000 * MS;

fn at(words: &[&str], line: &str) -> u64 {
    match words {
        [.., "at", ms] => T0 + ms.parse::<u64>().unwrap_or_else(|_| panic!("bad time in {line:?}")) * MS,
        _ => panic!("expected `… at MS` in {line:?}"),
    }
}

fn region(word: &str, line: &str) -> RegionKey {
    word.parse().unwrap_or_else(|e| panic!("bad region {word:?} in {line:?}: {e}"))
}

/// The decisions among `events`, one line each.
fn decisions(events: &[Event], name_of: &dyn Fn(ServerId) -> String) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ServerDied { server, .. } => Some(format!("dead {}", name_of(*server))),
            Event::RegionSplit { region } => Some(format!("split {region}")),
            Event::RegionsMerged { region } => Some(format!("merge {region}")),
            Event::RegionRebalanced { region, from, to, players } => {
                Some(format!("move {region} {} -> {} ({players} players)", name_of(*from), name_of(*to)))
            }
            _ => None,
        })
        .collect()
}

fn run(script: &str) -> String {
    let mut state: Option<CoordinatorState> = None;
    let mut policy = Policy::default();
    let mut names: BTreeMap<String, ServerId> = BTreeMap::new();
    let mut out = String::new();
    for line in script.lines() {
        let ids = names.clone();
        let name_of =
            move |id: ServerId| ids.iter().find(|(_, v)| **v == id).map_or("?".to_owned(), |(k, _)| k.clone());
        let server = |w: &str| *names.get(w).unwrap_or_else(|| panic!("unknown server {w:?}"));
        let apply = |s: &mut CoordinatorState, cmd: Command, line: &str, out: &mut String| {
            let (r, events) = s.apply(cmd);
            if let Err(e) = r {
                writeln!(out, "! {line}: {e}").expect("string");
            }
            for d in decisions(&events, &name_of) {
                writeln!(out, "{line}: {d}").expect("string");
            }
        };
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "world" => {
                let size = mesh_coordinator::parse_world_size(words[1]).expect("world size");
                let tree = RegionTree::grid(IVec3::ZERO, size[0], size[1], size[2]);
                let mut s = CoordinatorState::new(policy.clone(), tree, TickClock::new(0));
                let b = Bootstrap { clock_epoch: T0, policy: policy.clone(), world_seed: 1, restore: None };
                s.apply(Command::NewLeader { replica: 1, now: T0, bootstrap: Some(b) }).0.expect("bootstrap");
                state = Some(s);
            }
            "grace" => policy.startup_grace_ms = words[1].parse().expect("grace ms"),
            "timeout" => policy.heartbeat_timeout_ms = words[1].parse().expect("timeout ms"),
            "thresholds" => {
                let s = state.as_mut().expect("`world` first");
                let mut t = Thresholds::default();
                for kv in &words[1..] {
                    let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("KEY=VALUE in {line:?}"));
                    match k {
                        "split_players" => t.split_players = v.parse().expect("number"),
                        "merge_players" => t.merge_players = v.parse().expect("number"),
                        "split_cpu" => t.split_cpu = v.parse().expect("number"),
                        "merge_cpu" => t.merge_cpu = v.parse().expect("number"),
                        "cooldown_ms" => t.cooldown_ms = v.parse().expect("number"),
                        other => panic!("unknown threshold {other:?}"),
                    }
                }
                apply(s, Command::SetThresholds { thresholds: t, now: T0 }, line, &mut out);
            }
            "report" => {
                let s = state.as_mut().expect("`world` first");
                let mut load = Load::default();
                let mut regions = Vec::new();
                let mut i = 2;
                while i < words.len() - 2 {
                    match words[i] {
                        "players" => load.players = words[i + 1].parse().expect("players"),
                        "cpu" => load.cpu = words[i + 1].parse().expect("cpu"),
                        kv => {
                            let (k, n) = kv.split_once('=').unwrap_or_else(|| panic!("REGION=N in {line:?}"));
                            regions.push((region(k, line), n.parse().expect("players")));
                            i += 1;
                            continue;
                        }
                    }
                    i += 2;
                }
                let cmd = Command::Report { server: server(words[1]), load, regions, now: at(&words, line) };
                apply(s, cmd, line, &mut out);
            }
            "split" | "merge" => {
                let s = state.as_mut().expect("`world` first");
                let (region, now) = (region(words[1], line), at(&words, line));
                let cmd = if words[0] == "split" {
                    Command::SplitRegion { region, now }
                } else {
                    Command::MergeRegion { region, now }
                };
                apply(s, cmd, line, &mut out);
            }
            "move" => {
                let s = state.as_mut().expect("`world` first");
                let cmd =
                    Command::MoveRegion { region: region(words[1], line), to: server(words[2]), now: at(&words, line) };
                apply(s, cmd, line, &mut out);
            }
            "drain" => {
                let s = state.as_mut().expect("`world` first");
                let cmd = Command::Drain { server: server(words[1]), undo: false, now: at(&words, line) };
                apply(s, cmd, line, &mut out);
            }
            "register" => {
                let s = state.as_mut().expect("`world` first");
                let (r, _) = s.apply(Command::Register {
                    name: words[1].into(),
                    addresses: Addresses::default(),
                    cert_sha256: String::new(),
                    capacity_players: 100,
                    version: "golden".into(),
                    now: at(&words, line),
                });
                match r {
                    Ok(Response::Registered { server }) => {
                        names.insert(words[1].into(), server);
                    }
                    other => writeln!(out, "! {line}: {other:?}").expect("string"),
                }
            }
            "heartbeat" => {
                let s = state.as_mut().expect("`world` first");
                let server = *names.get(words[1]).unwrap_or_else(|| panic!("unknown server in {line:?}"));
                let (r, _) = s.apply(Command::Heartbeat { server, load: Load::default(), now: at(&words, line) });
                if !matches!(r, Ok(Response::HeartbeatAck { fenced: false })) {
                    writeln!(out, "! {line}: {r:?}").expect("string");
                }
            }
            "tick" => {
                let s = state.as_mut().expect("`world` first");
                apply(s, Command::Tick { now: at(&words, line) }, line, &mut out);
            }
            other => panic!("unknown script command {other:?} in {line:?}"),
        }
    }
    let s = state.expect("a script needs `world`");
    let name_of = |id: ServerId| names.iter().find(|(_, v)| **v == id).map_or("?".to_owned(), |(k, _)| k.clone());
    for (region, a) in s.assignments() {
        let owner = a.server.map_or("-".to_owned(), name_of);
        writeln!(out, "{region} {owner} {}", a.epoch).expect("string");
    }
    for rec in s.servers().values() {
        let state = if rec.alive { "alive" } else { "dead" };
        let drained = if s.is_draining(rec.id) { " draining" } else { "" };
        writeln!(out, "{} {state}{drained} regions {}", rec.name, s.regions_of(rec.id).count()).expect("string");
    }
    writeln!(out, "desired_game_servers {}", s.desired_game_servers()).expect("string");
    out
}

#[test]
fn placement_decisions_match_the_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("BLESS").is_some();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("tests/golden").map(|e| e.expect("entry").path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "txt")) {
        let text = std::fs::read_to_string(&path).expect("golden file");
        let (script, expected) = text.split_once("\n----\n").unwrap_or((&text, ""));
        let got = run(script);
        if bless {
            std::fs::write(&path, format!("{script}\n----\n{got}")).expect("writing golden file");
        } else if got != expected {
            failures.push(format!("{}:\n--- expected\n{expected}--- got\n{got}", path.display()));
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} golden files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
