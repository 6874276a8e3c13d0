//! Overlap-zone sync between real game-server processes over gRPC: a prop
//! one server simulates near the boundary is seen, as a ghost with its
//! owner's authority, by a player on the other; a player near the boundary
//! is a ghost on the neighbour; ghosts go when their owner stops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glam::DVec3;
use integration_tests::player::TestPlayer;
use integration_tests::{Mesh, blocking_text, metric, walkable_line};
use serde_json::json;
use shared::{EntityId, ServerId};

const TOKEN: &str = "s3cret";

#[test]
fn a_neighbours_entities_near_the_boundary_are_seen_as_ghosts_until_it_stops() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(2, &[&format!("--admin-token={TOKEN}")])?;
    let regions = mesh.wait_regions_owned()?;
    let owner_of = |key: &str| {
        regions.as_array().unwrap().iter().find(|r| r["region"] == key).unwrap()["server_id"].as_u64().unwrap()
    };
    let (a, b) = (owner_of("L0:0,0,0"), owner_of("L0:1,0,0"));
    assert_ne!(a, b, "{regions}");
    let ports = |id: u64| mesh.servers.iter().position(|(_, v)| v["server_id"].as_u64() == Some(id)).unwrap();
    let (ia, ib) = (ports(a), ports(b));
    let (pa, pb) = (mesh.servers[ia].1.clone(), mesh.servers[ib].1.clone());
    let metrics = |p: &serde_json::Value| blocking_text(&format!("http://{}/metrics", p["metrics"].as_str().unwrap()));

    // A prop on b's side, 30 m past the boundary (x = 2000), dropped from high up.
    let z = walkable_line(1950.0, 2050.0, 1000.0)?;
    let rt = tokio::runtime::Runtime::new()?;
    let url = format!("http://{}/v1/props", pb["http"].as_str().unwrap());
    let (status, body) = rt.block_on(integration_tests::post_json(
        &url,
        Some(TOKEN),
        &json!({"props": [{"pos": [2030.0, 140.0, z], "shape": "box", "half": [0.3, 0.3, 0.3]}]}),
    ))?;
    assert_eq!(status, 200, "{body}");
    let prop = EntityId(body["ids"][0].as_u64().unwrap());

    // A player on a, 40 m before the boundary.
    let quic: SocketAddr = pa["quic"].as_str().unwrap().parse()?;
    let cert = pa["cert_sha256"].as_str().unwrap().to_owned();
    let (mut player, welcome) = rt.block_on(TestPlayer::join(quic, &cert, 4242, DVec3::new(1960.0, 10.0, z)))?;
    assert!(matches!(welcome, shared::wire::ServerControl::Welcome { authoritative: true, .. }), "{welcome:?}");

    // The prop shows up in the player's snapshots from a, with b's
    // authority, and falls as b simulates it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heights = Vec::new();
    while Instant::now() < deadline && heights.len() < 40 {
        let Some(snap) = rt.block_on(player.snapshot(Duration::from_secs(1)))? else { continue };
        assert_eq!(snap.server, ServerId(a as u32));
        if let Some(e) = snap.entities.iter().find(|e| e.id == prop) {
            assert_eq!(e.authority, ServerId(b as u32), "a ghost carries its owner's authority");
            assert!((e.pos.x - 2030.0).abs() < 1.0, "{}", e.pos);
            heights.push(e.pos.y);
        }
    }
    assert!(heights.len() >= 40, "the ghost was in {} snapshots", heights.len());
    assert!(heights.first() > heights.last(), "the ghost follows its owner's simulation: {heights:?}");

    // Both directions, counted: a holds the prop, b holds the player.
    std::thread::sleep(Duration::from_secs(1));
    let (ma, mb) = (metrics(&pa)?, metrics(&pb)?);
    assert!(metric(&ma, "ghosts", "") >= 1.0 && metric(&mb, "ghosts", "") >= 1.0, "{ma}\n{mb}");
    // Each asked the other which components it knows (transfers are
    // checked against them before they are asked for).
    assert!(metric(&ma, "peer_schemas", "") == 1.0 && metric(&mb, "peer_schemas", "") == 1.0, "{ma}\n{mb}");
    for (m, who) in [(&ma, "a"), (&mb, "b")] {
        let (sent, received) = (
            metric(m, "ghost_batches_total", r#"kind="sent""#),
            metric(m, "ghost_batches_total", r#"kind="received""#),
        );
        assert!(
            sent > 90.0 && received > 90.0,
            "{who}: every tick for over a second: {sent} sent, {received} received"
        );
        assert_eq!(metric(m, "ghost_updates_total", r#"result="not_owner""#), 0.0, "{who}");
        assert_eq!(metric(m, "ghost_updates_total", r#"result="stale_epoch""#), 0.0, "{who}");
    }

    // b stops: its ghosts leave a's snapshots within a second or so.
    assert!(mesh.servers[ib].0.stop(), "b stops cleanly");
    let stopped = Instant::now();
    let mut gone_after = None;
    while stopped.elapsed() < Duration::from_secs(5) {
        let Some(snap) = rt.block_on(player.snapshot(Duration::from_secs(1)))? else { continue };
        if !snap.entities.iter().any(|e| e.id == prop) {
            gone_after = Some(stopped.elapsed());
            break;
        }
    }
    let gone_after = gone_after.expect("the ghost of a stopped server's prop went away");
    assert!(gone_after < Duration::from_secs(3), "{gone_after:?}");
    let ma = metrics(&pa)?;
    assert_eq!(metric(&ma, "ghosts", ""), 0.0);
    mesh.invariants()?.assert_hold();
    assert!(metric(&ma, "ghost_updates_total", r#"result="expired""#) >= 1.0);
    Ok(())
}
