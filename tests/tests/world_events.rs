//! Cross-server world events through Redis: chat lines and operator notices
//! reach players on every server; the leaderboard counts what players dig;
//! with Redis dead, chat still reaches the players of the same server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glam::DVec3;
use integration_tests::player::TestPlayer;
use integration_tests::redis::PrivateRedis;
use integration_tests::{Mesh, WORLD_SEED, blocking_text, metric, post_json};
use serde_json::{Value, json};
use shared::PlayerId;
use shared::chunk::ChunkLayout;
use shared::edit::EditOp;
use shared::terrain::TerrainGen;
use shared::wire::{ClientControl, EditOutcome, ServerControl};

/// Reads frames until one matches, or `None` after `wait`.
async fn wait_for(
    p: &mut TestPlayer,
    wait: Duration,
    want: impl Fn(&ServerControl) -> bool,
) -> anyhow::Result<Option<ServerControl>> {
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match p.next(left).await? {
            Some(f) if want(&f) => return Ok(Some(f)),
            Some(_) => {}
            None => break,
        }
    }
    Ok(None)
}

fn chat_from(from: u64, text: &'static str) -> impl Fn(&ServerControl) -> bool {
    move |f| matches!(f, ServerControl::Chat { from: p, text: t, .. } if *p == PlayerId(from) && t == text)
}

#[test]
fn chat_and_notices_cross_servers_and_degrade_to_local_without_redis() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = PrivateRedis::start(dir.path())?;
    let redis_arg = format!("--redis-url={}", redis.url());
    let cluster_arg = format!("--cluster=events-{}", std::process::id());
    let mesh = Mesh::start_with(2, &[&redis_arg, &cluster_arg, "--admin-token=op-token"], &[&redis_arg])?;
    let regions = mesh.wait_regions_owned()?;
    let owner_of = |region: &str| {
        let id = regions.as_array().unwrap().iter().find(|r| r["region"] == region).unwrap()["server_id"].clone();
        mesh.servers.iter().position(|(_, v)| v["server_id"] == id).unwrap()
    };
    let (a, b) = (owner_of("L0:0,0,0"), owner_of("L0:1,0,0"));
    let addr = |i: usize| -> (SocketAddr, String) {
        let v = &mesh.servers[i].1;
        (v["quic"].as_str().unwrap().parse().unwrap(), v["cert_sha256"].as_str().unwrap().to_owned())
    };
    let notices = format!("http://{}/v1/notices", mesh.http);
    let board = format!("http://{}/v1/leaderboards/voxels_changed", mesh.http);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let (mut p1, mut p2, mut p3) = rt.block_on(async {
        let (qa, ca) = addr(a);
        let (qb, cb) = addr(b);
        let (p1, w1) = TestPlayer::join(qa, &ca, 11, DVec3::new(1000.5, 0.0, 1000.5)).await?;
        let (p2, w2) = TestPlayer::join(qa, &ca, 12, DVec3::new(1004.5, 0.0, 1000.5)).await?;
        let (p3, w3) = TestPlayer::join(qb, &cb, 13, DVec3::new(3000.5, 0.0, 1000.5)).await?;
        for w in [w1, w2, w3] {
            assert!(matches!(w, ServerControl::Welcome { authoritative: true, .. }), "{w:?}");
        }
        Ok::<_, anyhow::Error>((p1, p2, p3))
    })?;

    rt.block_on(async {
        // A chat line reaches the players of both servers.
        p1.send(&ClientControl::Chat { text: "hello mesh".into() }).await?;
        for p in [&mut p2, &mut p3, &mut p1] {
            let got = wait_for(p, Duration::from_secs(5), chat_from(11, "hello mesh")).await?;
            assert!(got.is_some(), "a player missed the chat line");
        }
        // Oversized lines are dropped and counted, not relayed.
        p1.send(&ClientControl::Chat { text: "x".repeat(300) }).await?;

        // Notices: operators only, to everyone.
        let (s, _) = post_json(&notices, None, &json!({"text": "restart in 5 minutes"})).await?;
        assert_eq!(s, 401);
        let (s, v) = post_json(&notices, Some("op-token"), &json!({"text": "restart in 5 minutes"})).await?;
        assert_eq!((s, v["servers"].as_u64()), (200, Some(2)), "{v}");
        for p in [&mut p1, &mut p2, &mut p3] {
            let got = wait_for(
                p,
                Duration::from_secs(5),
                |f| matches!(f, ServerControl::Notice { text } if text == "restart in 5 minutes"),
            )
            .await?;
            assert!(got.is_some(), "a player missed the notice");
        }

        // Digging puts the player on the leaderboard, by voxels changed.
        let g = TerrainGen::new(WORLD_SEED, ChunkLayout::default());
        let ground = g.ground_height(1000.5, 1000.5);
        let mut changed = 0;
        let deadline = Instant::now() + Duration::from_secs(15);
        for id in 1.. {
            anyhow::ensure!(Instant::now() < deadline, "the dig was never applied");
            let op = EditOp::Dig { center: DVec3::new(1001.5, ground - 1.0, 1000.5), radius: 1.5 };
            p1.edit(id, op).await?;
            let r =
                wait_for(&mut p1, Duration::from_secs(5), |f| matches!(f, ServerControl::EditResult { .. })).await?;
            match r {
                Some(ServerControl::EditResult { outcome: EditOutcome::Done { changed: n }, .. }) if n > 0 => {
                    changed = n;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let top: Value = reqwest::get(&board).await?.json().await?;
            if top["entries"][0]["player"] == 11 {
                assert_eq!(top["entries"][0]["score"].as_f64(), Some(f64::from(changed)), "{top}");
                assert_eq!(top["degraded"], false);
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the leaderboard never showed the digger: {top}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Redis dies: chat reaches the players of the same server only, and
    // notices say they were not delivered.
    redis.kill();
    rt.block_on(async {
        p1.send(&ClientControl::Chat { text: "anyone here".into() }).await?;
        assert!(wait_for(&mut p2, Duration::from_secs(5), chat_from(11, "anyone here")).await?.is_some());
        assert!(wait_for(&mut p3, Duration::from_secs(1), chat_from(11, "anyone here")).await?.is_none());
        let (s, v) = post_json(&notices, Some("op-token"), &json!({"text": "still there?"})).await?;
        assert_eq!((s, v["error"].as_str()), (503, Some("unavailable")), "{v}");
        let top: Value = reqwest::get(&board).await?.json().await?;
        assert_eq!((top["degraded"].as_bool(), top["entries"].as_array().map(Vec::len)), (Some(true), Some(0)));
        Ok::<_, anyhow::Error>(())
    })?;
    let m = blocking_text(&format!("http://{}/metrics", mesh.servers[a].1["metrics"].as_str().unwrap()))?;
    assert!(metric(&m, "world_events_total", r#"route="published""#) >= 1.0);
    assert!(metric(&m, "world_events_total", r#"route="local""#) >= 1.0);
    assert!(metric(&m, "world_events_total", r#"route="invalid""#) >= 1.0);
    assert!(metric(&m, "world_events_total", r#"route="delivered""#) >= 2.0);
    Ok(())
}
