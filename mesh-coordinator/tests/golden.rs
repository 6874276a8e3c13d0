//! Golden-file tests of the coordinator's placement decisions: each file in
//! `tests/golden/` is a script of commands, a line `----`, and the region
//! map and server states the state machine must end with. Run with
//! `BLESS=1` to rewrite the expected parts after a deliberate change (and
//! read the diff).
//!
//! Script lines (times in ms after the start; `#` starts a comment):
//! `world NXxNYxNZ`, `grace MS`, `register NAME at MS`,
//! `heartbeat NAME at MS`, `tick at MS`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use glam::IVec3;
use mesh_coordinator::state::{Addresses, Bootstrap, Command, CoordinatorState, Load, Policy, Response};
use shared::region::RegionTree;
use shared::{ServerId, TickClock};

const MS: u64 = 1_000_000;
const T0: u64 = 1_800_000_000_000 * MS;

fn at(words: &[&str], line: &str) -> u64 {
    match words {
        [.., "at", ms] => T0 + ms.parse::<u64>().unwrap_or_else(|_| panic!("bad time in {line:?}")) * MS,
        _ => panic!("expected `… at MS` in {line:?}"),
    }
}

fn run(script: &str) -> String {
    let mut state: Option<CoordinatorState> = None;
    let mut policy = Policy::default();
    let mut names: BTreeMap<String, ServerId> = BTreeMap::new();
    let mut out = String::new();
    for line in script.lines() {
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
                s.apply(Command::Tick { now: at(&words, line) }).0.expect("tick");
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
        writeln!(out, "{} {state} regions {}", rec.name, s.regions_of(rec.id).count()).expect("string");
    }
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
