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

fn picture(s: &CoordinatorState, hub: &MapHub) -> Vec<Event> {
    Picture::read(s, 1, 5, &hub.history(), true).events()
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
    let mut rx = hub.subscribe(picture(&s, &hub)).expect("room");
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
    let _slow = hub.subscribe(picture(&s, &hub)).expect("room");
    let mut fast = hub.subscribe(picture(&s, &hub)).expect("room");
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
    let open: Vec<_> = (0..MAX_CLIENTS).map(|_| hub.subscribe(picture(&s, &hub)).expect("room")).collect();
    assert!(hub.subscribe(picture(&s, &hub)).is_none());
    drop(open);
    assert!(hub.subscribe(picture(&s, &hub)).is_some(), "closed streams make room");
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

#[test]
fn closing_the_hub_ends_every_stream_and_opens_no_more() {
    let s = mesh(1);
    let hub = MapHub::new(crate::metrics::Metrics::new());
    let mut rx = hub.subscribe(picture(&s, &hub)).expect("room");
    hub.close();
    assert!(hub.closed().is_cancelled());
    // What was queued is still read, then the stream ends.
    while let Ok(_e) = rx.try_recv() {}
    assert!(rx.blocking_recv().is_none(), "the sender is gone");
    assert!(!hub.has_room());
    assert!(hub.subscribe(picture(&s, &hub)).is_none());
}

#[test]
fn the_feed_asks_only_plain_host_ports() {
    for ok in ["127.0.0.1:8080", "gs-1.gs.ns.svc:8080", "[::1]:8080"] {
        assert!(plain_host_port(ok), "{ok}");
    }
    for bad in ["", "8080", "host:", "host:99999", "evil.com/x?:80", "user@host:80", "http://h:80", "h:80/#"] {
        assert!(!plain_host_port(bad), "{bad}");
    }
}

/// Drives transfers through the state machine: a server that dies with a
/// player crossing away from it.
#[test]
fn transfers_are_sent_once_new_and_again_when_their_outcome_changes() {
    use crate::state::{TransferOutcome, TransferRecord};
    let mut s = mesh(1);
    let owners: Vec<_> = [RegionKey::root(0, 0, 0), RegionKey::root(1, 0, 0)]
        .iter()
        .map(|k| (*k, s.assignments()[k].server.expect("owned"), s.assignments()[k].epoch))
        .collect();
    assert_ne!(owners[0].1, owners[1].1);
    let (from_region, from, from_epoch) = owners[0];
    let (to_region, ..) = owners[1];
    let mut ids = Vec::new();
    for entity in 1..=3u64 {
        let req = crate::state::TransferRequest {
            entity: shared::EntityId(entity),
            from,
            from_region,
            from_region_epoch: from_epoch,
            entity_epoch: shared::Epoch(0),
            to_region,
            not_before_tick: 0,
            now: T0 + 300 * MS,
        };
        match s.apply(Command::RequestTransfer(req)).0 {
            Ok(Response::Transfer(t)) => ids.push(t.id),
            other => panic!("transfer: {other:?}"),
        }
    }
    // A new stream sees all three; the loop, after none of them, sees all three.
    let sent = transfers_after(&s, 0, 10);
    assert_eq!(sent.iter().map(|t| t.id).collect::<Vec<_>>(), ids);
    assert_eq!(transfers_after(&s, ids[0], 10).len(), 2);
    assert_eq!(transfers_after(&s, ids[2], 10).len(), 0);
    assert_eq!(transfers_after(&s, 0, 2).iter().map(|t| t.id).collect::<Vec<_>>(), ids[1..], "the newest");
    let mut watched: BTreeMap<u64, TransferOutcome> = sent.iter().map(|t| (t.id, t.outcome)).collect();
    assert!(changed_outcomes(&s, &mut watched).is_empty(), "nothing changed yet");
    // One is delivered: sent again, once, and no longer watched.
    let _ = s.apply(Command::CompleteTransfer {
        transfer_id: ids[0],
        from,
        delivered: true,
        error: String::new(),
        now: T0 + 400 * MS,
    });
    let changed: Vec<TransferRecord> = changed_outcomes(&s, &mut watched);
    assert_eq!(changed.iter().map(|t| (t.id, t.outcome)).collect::<Vec<_>>(), [(ids[0], TransferOutcome::Delivered)]);
    assert!(!watched.contains_key(&ids[0]));
    assert!(changed_outcomes(&s, &mut watched).is_empty(), "sent once");
    assert_eq!(watched.len(), 2);
}
