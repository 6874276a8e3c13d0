use glam::IVec3;
use shared::TickClock;
use shared::region::{RegionKey, RegionTree};

use super::*;
use crate::state::{Addresses, Command, Load, Policy, Response};

const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000_000 * MS;

/// Two roots, two servers owning one each, `players` reported in the first.
fn mesh(players: u32) -> CoordinatorState {
    let mut s = CoordinatorState::new(Policy::default(), RegionTree::grid(IVec3::ZERO, 2, 1, 1), TickClock::new(T0));
    let mut ids = Vec::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let (r, _) = s.apply(Command::Register {
            name: name.into(),
            addresses: Addresses::default(),
            cert_sha256: String::new(),
            capacity_players: 100,
            version: "test".into(),
            now: T0 + i as u64 * 100 * MS,
        });
        match r {
            Ok(Response::Registered { server }) => ids.push(server),
            other => panic!("register: {other:?}"),
        }
    }
    let owner = s.assignments()[&RegionKey::root(0, 0, 0)].server.expect("owned");
    let load = Load { players, cpu: 0.25, tick_p99_ms: 4.5, ..Load::default() };
    let _ = s.apply(Command::Report {
        server: owner,
        load,
        regions: vec![(RegionKey::root(0, 0, 0), players)],
        now: T0 + 200 * MS,
    });
    s
}

fn kinds(rx: &mut mpsc::Receiver<Event>) -> Vec<&'static str> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push(e.kind);
    }
    v
}

#[test]
fn a_new_stream_gets_the_whole_picture_with_players_per_region() {
    let s = mesh(7);
    let hub = MapHub::new(crate::metrics::Metrics::new());
    let mut rx = hub.subscribe(&s, 1, 5).expect("room");
    let mut got = Vec::new();
    while let Ok(e) = rx.try_recv() {
        got.push(e);
    }
    assert_eq!(got.iter().map(|e| e.kind).collect::<Vec<_>>(), ["hello", "regions", "servers", "transfers", "audit"]);
    let regions: serde_json::Value = serde_json::from_str(&got[1].data).unwrap();
    let regions = regions["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    let r0 = regions.iter().find(|r| r["region"] == "L0:0,0,0").unwrap();
    assert_eq!(r0["players"], 7, "{r0}");
    assert!(r0["server_id"].is_u64() && r0["epoch"].as_u64().unwrap() > 0, "{r0}");
    let servers: serde_json::Value = serde_json::from_str(&got[2].data).unwrap();
    assert_eq!(servers["servers"].as_array().unwrap().len(), 2);
    assert!(servers["servers"][0]["history"].is_array(), "the first servers event carries the history");
    assert_eq!(hub.clients(), 1);
    assert_eq!(hub.metrics.map_clients.get(), 1);
}

#[test]
fn a_stream_that_does_not_read_is_cut_and_counted_and_the_others_go_on() {
    let s = mesh(1);
    let hub = MapHub::new(crate::metrics::Metrics::new());
    let _slow = hub.subscribe(&s, 1, 5).expect("room");
    let mut fast = hub.subscribe(&s, 1, 5).expect("room");
    let e = Event::new("servers", &servers_event(&s, 6, None));
    for i in 0..CLIENT_QUEUE {
        hub.broadcast(&e);
        // The fast one reads as it goes.
        assert!(!kinds(&mut fast).is_empty(), "broadcast {i}");
    }
    assert_eq!(hub.clients(), 1, "the slow stream was cut");
    assert_eq!(hub.metrics.map_clients_dropped.get(), 1);
    hub.broadcast(&e);
    assert_eq!(kinds(&mut fast), ["servers"]);
    // A stream whose reader left is forgotten without being counted.
    drop(fast);
    hub.broadcast(&e);
    assert_eq!((hub.clients(), hub.metrics.map_clients_dropped.get()), (0, 1));
}

#[test]
fn streams_beyond_the_limit_are_refused() {
    let s = mesh(1);
    let hub = MapHub::new(crate::metrics::Metrics::new());
    let open: Vec<_> = (0..MAX_CLIENTS).map(|_| hub.subscribe(&s, 1, 5).expect("room")).collect();
    assert!(hub.subscribe(&s, 1, 5).is_none());
    drop(open);
    assert!(hub.subscribe(&s, 1, 5).is_some(), "closed streams make room");
}

#[test]
fn the_sparkline_ring_keeps_ten_minutes_of_live_servers() {
    let mut s = mesh(3);
    let hub = MapHub::new(crate::metrics::Metrics::new());
    for i in 0..(HISTORY_LEN as u64 + 5) {
        hub.sample(&s, 1_000 + i * SAMPLE_PERIOD_MS);
    }
    let ev = servers_event(&s, 0, Some(&hub.history.lock().unwrap()));
    for server in &ev.servers {
        let h = server.history.as_ref().unwrap();
        assert_eq!(h.len(), HISTORY_LEN);
        assert_eq!(h[0].at_unix_ms, 1_000 + 5 * SAMPLE_PERIOD_MS, "oldest first, the oldest dropped");
        assert!(h.windows(2).all(|w| w[0].at_unix_ms < w[1].at_unix_ms));
    }
    let busy = ev.servers.iter().find(|x| x.server.load.players == 3).unwrap();
    assert_eq!(busy.history.as_ref().unwrap().last().unwrap().players, 3);
    assert!((busy.history.as_ref().unwrap()[0].tick_p99_ms - 4.5).abs() < 1e-6);
    // Between samples the history is left out.
    let text = serde_json::to_string(&servers_event(&s, 0, None)).unwrap();
    assert!(!text.contains("history"), "{text}");
    // A dead server keeps its ring for the ring's span, then loses it.
    let _ = s.apply(Command::Tick { now: T0 + 60_000 * MS });
    assert!(s.servers().values().all(|r| !r.alive), "both timed out");
    let last = 1_000 + (HISTORY_LEN as u64 + 4) * SAMPLE_PERIOD_MS;
    hub.sample(&s, last + SAMPLE_PERIOD_MS);
    assert_eq!(hub.history.lock().unwrap().len(), 2, "kept a while");
    hub.sample(&s, last + HISTORY_LEN as u64 * SAMPLE_PERIOD_MS);
    assert!(hub.history.lock().unwrap().is_empty(), "gone after ten minutes");
}

#[test]
fn shares_of_the_position_budget_stay_within_the_servers_bound() {
    assert_eq!(share(0), MAX_SHARE);
    assert_eq!(share(1), MAX_SHARE);
    assert_eq!(share(10), 2_000);
    assert_eq!(share(1_000), MIN_SHARE);
    assert!((1..2_000).all(|n| (MIN_SHARE..=MAX_SHARE).contains(&share(n))));
}
