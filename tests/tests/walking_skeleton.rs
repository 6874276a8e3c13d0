//! The walking skeleton, end to end: a coordinator and two game servers as
//! real processes, a bot walking back and forth across the face between the
//! two root regions over real QUIC, authority moving through the coordinator
//! and the peer gRPC contract.

use std::collections::BTreeSet;

use integration_tests::{Mesh, Proc, blocking_text, metric, walkable_line};
use serde_json::Value;

#[test]
fn a_bot_walks_across_the_boundary_and_authority_follows() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(2, &["--walk-speed=20"])?;
    let regions = mesh.wait_regions_owned()?;
    let owners: BTreeSet<_> = regions.as_array().unwrap().iter().map(|r| r["server_id"].as_u64()).collect();
    assert_eq!(owners.len(), 2, "each root region has its own server: {regions}");

    // Two bots walk 1970 m <-> 2030 m along x: across the face at x = 2000
    // and past the 10 m hysteresis margin on both sides.
    // The world has hills and cliffs: walk a line without cliffs.
    let z = walkable_line(1970.0, 2030.0, 900.0)?;
    let report_dir = mesh.dir.path().join("report");
    let report = report_dir.join("summary.json");
    let mut swarm = Proc::start(
        "bot-swarm",
        "bot-swarm",
        &[
            format!("--coordinator=http://{}", mesh.http),
            "--bots=2".into(),
            "--seconds=12".into(),
            format!("--path=1970,10,{z};2030,10,{z}"),
            "--spread-m=0".into(),
            format!("--report={}", report_dir.display()),
        ],
        mesh.dir.path(),
    )?;
    let status = swarm.child.wait()?;
    assert!(status.success(), "bot-swarm failed:\n{}", swarm.log_text());

    let transfers = mesh.get("/v1/transfers?limit=1000")?;
    let metrics_text: Vec<String> = mesh
        .servers
        .iter()
        .map(|(_, v)| blocking_text(&format!("http://{}/metrics", v["metrics"].as_str().unwrap())))
        .collect::<Result<_, _>>()?;
    for (p, _) in &mut mesh.servers {
        assert!(p.stop(), "{} did not stop cleanly:\n{}", p.name, p.log_text());
    }

    // The coordinator committed transfers, and the sources delivered them.
    let transfers = transfers.as_array().unwrap();
    assert!(transfers.len() >= 2, "expected transfers, got {transfers:?}");
    for t in transfers {
        assert_eq!(t["outcome"], "Delivered", "transfer not delivered: {t}");
    }
    // Both servers handed authority out and took it in.
    let logs: String = mesh.servers.iter().map(|(p, _)| p.log_text()).collect();
    let bots_said =
        || format!("{}\n{}\n{logs}", swarm.log_text(), std::fs::read_to_string(&report).unwrap_or_default());
    for m in &metrics_text {
        assert!(metric(m, "authority_transfers_total", r#"kind="out""#) >= 1.0, "{}", bots_said());
        assert!(metric(m, "authority_transfers_total", r#"kind="in""#) >= 1.0, "{}", bots_said());
        // Except to connections that just closed: the bots quit at the end
        // of the run, and a snapshot or two may go out to one before the
        // tick thread hears it left.
        let drops: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("packets_dropped_total") && !l.contains(r#"reason="conn_closed""#))
            .collect();
        let dropped =
            metric(m, "packets_dropped_total", "") - metric(m, "packets_dropped_total", r#"reason="conn_closed""#);
        assert_eq!(dropped, 0.0, "no datagram dropped: {drops:?}");
    }

    // What the bots saw.
    let r: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    // The report: figures over time, each server's tick p99 scraped from its
    // own /metrics, and a page of plots that needs nothing else.
    assert!(r["rtt_p50_ms"].as_f64() > Some(0.0) && r["up_kbps_per_bot"].as_f64() > Some(0.0), "{r}");
    assert!(r["down_kbps_per_bot"].as_f64() > Some(0.0), "{r}");
    assert!(r["handoff_gaps_ms"].as_array().map_or(0, Vec::len) >= 2, "a gap measured at each handoff: {r}");
    assert!(r["timeline"]["samples"].as_array().map_or(0, Vec::len) >= 10, "one sample a second");
    let scraped = r["timeline"]["server_tick_p99_ms"].as_object().map_or(0, |m| m.len());
    assert_eq!(scraped, 2, "both servers' tick p99: {}", r["timeline"]["server_tick_p99_ms"]);
    let page = std::fs::read_to_string(report_dir.join("report.html"))?;
    assert!(page.contains("<svg") && page.contains("Round-trip time") && !page.contains("src=\"http"));
    assert_eq!(r["joined"], 2);
    assert_eq!(r["ack_regressions"], 0, "an input was acknowledged out of order");
    for bot in r["per_bot"].as_array().unwrap() {
        let changes = bot["authority_changes"].as_array().unwrap();
        let handoffs: Vec<&Value> = changes.iter().filter(|c| !c["from"].is_null()).collect();
        assert!(!handoffs.is_empty(), "bot {} never changed server: {bot}", bot["player"]);
        for h in &handoffs {
            // The new server acknowledges from where the old one stopped: no
            // input lost, none applied twice.
            let (new, old) = (h["acked_seq"].as_u64().unwrap(), h["previous_acked_seq"].as_u64().unwrap());
            assert!(new >= old, "acks went back at a handoff: {h}");
            assert!(new - old <= 45, "a handoff lost half a second of input: {h}");
        }
        // Input sequence numbers kept being acknowledged on both sides.
        let acks = bot["acks_by_server"].as_object().unwrap();
        assert_eq!(acks.len(), 2, "acks from both servers: {acks:?}");
        for span in acks.values() {
            assert!(span["snapshots"].as_u64().unwrap() > 90, "few authoritative snapshots: {span}");
            assert!(span["last_seq"].as_u64() > span["first_seq"].as_u64(), "acks did not advance: {span}");
        }
        assert!(bot["errors"].as_array().unwrap().is_empty(), "bot errors: {}", bot["errors"]);
    }

    // At every tick both servers logged, exactly one was authoritative for
    // each bot's avatar, and each bot's inputs applied once, in order.
    let inv = mesh.invariants()?;
    inv.assert_hold();
    assert_eq!(inv.entities, 2, "two avatars were simulated: {inv:?}");
    assert_eq!(inv.players_handed_over, 2, "both were simulated by both servers over time: {inv:?}");
    assert!(inv.ticks_checked > 600, "too few ticks checked: {inv:?}");
    assert!(inv.inputs_applied > 1000, "{inv:?}");
    eprintln!(
        "invariants: {} ticks checked, {} inputs applied, {} skipped",
        inv.ticks_checked, inv.inputs_applied, inv.inputs_skipped
    );
    Ok(())
}
