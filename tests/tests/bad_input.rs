//! Bad input from clients and peers is refused or dropped, counted under a
//! stable reason, and never takes a server down.

use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::{Mesh, blocking_text, metric};
use proto::mesh as mpb;
use proto::peer as ppb;
use shared::PlayerId;
use shared::wire::{
    ALPN, ClientControl, JoinRole, PROTOCOL_VERSION, ServerControl, decode_frame, encode_frame, frame_len,
};

async fn connect(addr: SocketAddr, cert: &str, alpn: &[u8]) -> anyhow::Result<quinn::Connection> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    endpoint.set_default_client_config(bot_swarm::tls::client_config(cert, alpn)?);
    Ok(endpoint.connect(addr, "localhost")?.await?)
}

/// Says hello; returns the answer and the control stream, which must stay
/// open for as long as the session does.
async fn hello(
    conn: &quinn::Connection,
    ticket: &str,
) -> anyhow::Result<(ServerControl, quinn::SendStream, quinn::RecvStream)> {
    hello_with(conn, ticket, shared::component::Registry::builtin().schema()).await
}

/// As [`hello`], claiming to know the components of `schema`.
async fn hello_with(
    conn: &quinn::Connection,
    ticket: &str,
    schema: shared::component::Schema,
) -> anyhow::Result<(ServerControl, quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let h = ClientControl::Hello {
        version: PROTOCOL_VERSION,
        schema,
        ticket: ticket.into(),
        player: PlayerId(900),
        name: "probe".into(),
        role: JoinRole::Play,
        spawn: Some(glam::DVec3::new(500.0, 10.0, 500.0)),
    };
    send.write_all(&encode_frame(&h)?).await?;
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; frame_len(prefix)?];
    recv.read_exact(&mut body).await?;
    Ok((decode_frame(&body)?, send, recv))
}

#[test]
fn bad_input_is_refused_and_counted() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(2, &[])?;
    mesh.wait_regions_owned()?;
    let regions = mesh.get("/v1/regions")?;
    // The server owning the spawn point of the probe (region L0:0,0,0).
    let owner =
        regions.as_array().unwrap().iter().find(|r| r["region"] == "L0:0,0,0").unwrap()["server_id"].as_u64().unwrap();
    let (_, ports) = mesh.servers.iter().find(|(_, v)| v["server_id"].as_u64() == Some(owner)).unwrap();
    let other = mesh.servers.iter().find_map(|(_, v)| v["server_id"].as_u64().filter(|s| *s != owner)).unwrap();
    let quic: SocketAddr = ports["quic"].as_str().unwrap().parse()?;
    let cert = ports["cert_sha256"].as_str().unwrap().to_owned();
    let metrics_url = format!("http://{}/metrics", ports["metrics"].as_str().unwrap());
    let grpc = mesh.grpc.clone();
    let peer_grpc = ports["grpc"].as_str().unwrap().to_owned();

    let t0 = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        // An unknown ALPN fails the handshake.
        let t = std::time::Instant::now();
        assert!(connect(quic, &cert, b"not-our-protocol").await.is_err());
        eprintln!("alpn refusal took {:?}", t.elapsed());
        // A wrong ticket is refused with a reason.
        let c = connect(quic, &cert, ALPN).await?;
        match hello(&c, "forged").await?.0 {
            ServerControl::Refused { reason } => assert!(reason.starts_with("ticket_malformed"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A client whose components differ (another version of the VR rig)
        // is refused before it is sent anything it would decode wrong.
        let mut other_schema = shared::component::Registry::builtin().schema();
        other_schema.0.iter_mut().filter(|e| e.name == "vr_rig").for_each(|e| e.version += 1);
        let c = connect(quic, &cert, ALPN).await?;
        match hello_with(&c, integration_tests::DEV_TOKEN, other_schema).await?.0 {
            ServerControl::Refused { reason } => {
                assert!(
                    reason.starts_with("schema_mismatch") && reason.contains("vr_rig v1 here, vr_rig v2 there"),
                    "{reason}"
                )
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A good connection survives garbage datagrams, which are counted.
        let c = connect(quic, &cert, ALPN).await?;
        let (welcome, _send, _recv) = hello(&c, integration_tests::DEV_TOKEN).await?;
        assert!(matches!(welcome, ServerControl::Welcome { authoritative: true, .. }), "{welcome:?}");
        for junk in [&[][..], &[9, 9, 9][..], &[1, 0, 0][..]] {
            c.send_datagram(bytes_of(junk))?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(c.close_reason().is_none(), "the server dropped a connection over junk datagrams");

        // A transfer with a stale region epoch is fenced by the coordinator.
        let mut coord = mpb::mesh_coordinator_client::MeshCoordinatorClient::connect(format!("http://{grpc}")).await?;
        let stale = coord
            .request_transfer(mpb::TransferRequest {
                entity_id: 900,
                from_server: owner as u32,
                from_region: Some(mpb::RegionKey { level: 0, x: 0, y: 0, z: 0 }),
                from_region_epoch: 0,
                entity_epoch: 0,
                to_region: Some(mpb::RegionKey { level: 0, x: 1, y: 0, z: 0 }),
                position: None,
                not_before_tick: 0,
                components: Vec::new(),
            })
            .await
            .expect_err("a stale epoch must be refused");
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        assert!(stale.message().starts_with("stale_epoch"), "{}", stale.message());
        // A region key deeper than the octree is a bad request, not a panic.
        let deep = coord
            .request_transfer(mpb::TransferRequest {
                from_region: Some(mpb::RegionKey { level: 9, x: 0, y: 0, z: 0 }),
                ..Default::default()
            })
            .await
            .expect_err("level 9 does not exist");
        assert_eq!(deep.code(), tonic::Code::InvalidArgument);
        // Components named out of order are a bad request, refused before
        // anything is proposed.
        let entry = |id: u32| mpb::ComponentEntry { id, name: format!("c{id}"), version: 1 };
        let unordered = coord
            .request_transfer(mpb::TransferRequest {
                from_region: Some(mpb::RegionKey { level: 0, x: 0, y: 0, z: 0 }),
                to_region: Some(mpb::RegionKey { level: 0, x: 1, y: 0, z: 0 }),
                components: vec![entry(5), entry(3)],
                ..Default::default()
            })
            .await
            .expect_err("ids must ascend");
        assert_eq!(unordered.code(), tonic::Code::InvalidArgument);
        assert!(unordered.message().starts_with("bad_request: component ids not ascending"), "{}", unordered.message());
        // A server asks for a standby ticket for a player it does not hold,
        // or in the name of a server that does not exist: no ticket.
        let ask = |server_id: u32, to_server_id: u32| mpb::StandbyTicketRequest {
            server_id,
            player_id: 4_000_000,
            name: "mallory".into(),
            to_server_id,
        };
        let not_held = coord.standby_ticket(ask(owner as u32, other as u32)).await.expect_err("not its player");
        assert_eq!(not_held.code(), tonic::Code::FailedPrecondition, "{}", not_held.message());
        assert!(not_held.message().starts_with("not_yours"), "{}", not_held.message());
        let unknown = coord.standby_ticket(ask(4242, owner as u32)).await.expect_err("no such server");
        assert!(unknown.message().starts_with("unknown_server"), "{}", unknown.message());
        let to_itself = coord.standby_ticket(ask(owner as u32, owner as u32)).await.expect_err("to itself");
        assert!(to_itself.message().starts_with("unknown_server"), "{}", to_itself.message());

        // A handoff addressed to another server is refused by the peer.
        let mut peer =
            ppb::game_server_peer_client::GameServerPeerClient::connect(format!("http://{peer_grpc}")).await?;
        let wrong = peer
            .handoff(ppb::HandoffRequest {
                to_server: 4242,
                to_region: Some(ppb::RegionKey { level: 0, x: 0, y: 0, z: 0 }),
                state: Some(ppb::EntityState {
                    id: 7,
                    kind: ppb::EntityKind::Player as i32,
                    position: Some(ppb::Vec3 { x: 1.0, y: 1.0, z: 1.0 }),
                    velocity: Some(ppb::Vec3::default()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect_err("not addressed to this server");
        assert!(wrong.message().starts_with("wrong_server"), "{}", wrong.message());
        anyhow::Ok(())
    })?;

    eprintln!("probes took {:?}", t0.elapsed());
    let m = blocking_text(&metrics_url)?;
    assert!(metric(&m, "player_connections_refused_total", r#"reason="alpn""#) >= 1.0, "{m}");
    assert_eq!(metric(&m, "player_connections_refused_total", r#"reason="ticket_malformed""#), 1.0);
    assert_eq!(metric(&m, "player_connections_refused_total", r#"reason="schema_mismatch""#), 1.0);
    assert_eq!(metric(&m, "packets_dropped_total", r#"reason="truncated""#), 2.0);
    assert_eq!(metric(&m, "packets_dropped_total", r#"reason="unknown_kind""#), 1.0);
    assert_eq!(metric(&m, "peer_requests_refused_total", r#"reason="wrong_server""#), 1.0);
    let c = blocking_text(&format!("http://{}/metrics", mesh.http))?;
    assert_eq!(metric(&c, "mesh_requests_refused_total", r#"reason="stale_epoch""#), 1.0);
    assert_eq!(metric(&c, "mesh_requests_refused_total", r#"reason="bad_region_key""#), 1.0);
    for (p, _) in &mut mesh.servers {
        assert!(p.stop(), "{} did not survive the bad input:\n{}", p.name, p.log_text());
    }
    Ok(())
}

fn bytes_of(b: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(b)
}

/// Fraction of the ticks between two scrapes of `server_tick_duration_seconds`
/// that took at most 11.1 ms (the 90 Hz budget).
fn within_budget(before: &str, after: &str) -> f64 {
    let le = r#"le="0.0111""#;
    let within = metric(after, "server_tick_duration_seconds_bucket", le)
        - metric(before, "server_tick_duration_seconds_bucket", le);
    let all = metric(after, "server_tick_duration_seconds_count", "")
        - metric(before, "server_tick_duration_seconds_count", "");
    if all > 0.0 { within / all } else { 1.0 }
}

#[test]
fn a_flood_from_one_address_does_not_slow_the_tick_for_others() -> anyhow::Result<()> {
    let mesh = Mesh::start(1, &[])?;
    mesh.wait_regions_owned()?;
    let ports = &mesh.servers[0].1;
    let quic: SocketAddr = ports["quic"].as_str().unwrap().parse()?;
    let cert = ports["cert_sha256"].as_str().unwrap().to_owned();
    let metrics_url = format!("http://{}/metrics", ports["metrics"].as_str().unwrap());
    // Two players from 127.0.0.1 play through it.
    let (mut swarm, report) =
        mesh.swarm("steady", &["--bots=2", "--seconds=16", "--path=500,10,500;540,10,500", "--max-errors=0"])?;
    std::thread::sleep(Duration::from_secs(5));
    let before = blocking_text(&metrics_url)?;
    // From 127.0.0.2: 1,500 connection attempts as fast as they go, and
    // from 127.0.0.3 a spray of junk datagrams.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (attempts, refused) = rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 2], 0)))?;
        endpoint.set_default_client_config(bot_swarm::tls::client_config(&cert, ALPN)?);
        let junk = tokio::net::UdpSocket::bind("127.0.0.3:0").await?;
        let spray = tokio::spawn(async move {
            for i in 0..20_000u32 {
                let mut d = vec![0xC3u8; 1200];
                d[1..5].copy_from_slice(&i.to_le_bytes());
                let _ = junk.send_to(&d, quic).await;
                if i % 500 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let (mut attempts, mut refused) = (0u32, 0u32);
        for _ in 0..30 {
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..50 {
                let c = endpoint.connect(quic, "localhost")?;
                batch.spawn(async move { tokio::time::timeout(Duration::from_secs(3), c).await });
            }
            while let Some(r) = batch.join_next().await {
                attempts += 1;
                if !matches!(r, Ok(Ok(Ok(_)))) {
                    refused += 1;
                }
            }
        }
        let _ = spray.await;
        anyhow::Ok((attempts, refused))
    })?;
    let after = blocking_text(&metrics_url)?;
    // The query port answers one line of JSON, the two players included.
    let line = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(ports["query"].as_str().unwrap())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        text
    };
    assert!(line.ends_with('\n') && line.lines().count() == 1, "{line:?}");
    let q: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!((q["players"].as_u64(), q["capacity"].as_u64()), (Some(2), Some(1000)), "{q}");
    assert!(q["name"].is_string() && q["version"].is_string(), "{q}");
    assert!(q["regions"].as_array().is_some_and(|r| !r.is_empty()), "{q}");
    let status = swarm.child.wait()?;
    let r = Mesh::summary(&report)?;
    let counted = metric(&after, "player_connections_refused_total", r#"reason="rate_limited""#);
    eprintln!("{attempts} attempts, {refused} refused by the client's view, {counted} counted by the server");
    // The flood was turned away before any handshake, and counted...
    assert!(refused >= 1400 && counted >= 1400.0, "{refused} refused, {counted} counted");
    // ...while the players played on: no error, no gap, ticks within budget.
    assert_eq!(status.code(), Some(0), "{}", swarm.log_text());
    for bot in r["per_bot"].as_array().unwrap() {
        assert!(bot["max_snapshot_gap_ms"].as_u64() < Some(250), "{bot}");
    }
    let share = within_budget(&before, &after);
    assert!(share >= 0.99, "only {share:.3} of the ticks kept to 11.1 ms during the flood");
    Ok(())
}
