//! The netcode benchmark: one coordinator and one game server (release
//! builds, on loopback) and `visible + 1` bots of the real swarm crowding one
//! spot, so that every bot sees every other, walking all the time. Bytes are
//! counted at the bots' UDP sockets (QUIC's own included); the snapshot
//! encoding time comes from the server's `server_snapshot_encode_seconds`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::failover::{Procs, bin_dir, free_port, spawn};

#[derive(Debug, Clone)]
pub struct NetcodeConfig {
    /// Avatars each player sees (the swarm is one more).
    pub visible: u32,
    pub seconds: u64,
    /// The game server's per-player downstream budget.
    pub bandwidth_kbps: u32,
}

const DEV_TOKEN: &str = "netcode-bench";

pub fn run(cfg: &NetcodeConfig) -> anyhow::Result<Value> {
    anyhow::ensure!((1..=500).contains(&cfg.visible), "visible must be 1..=500");
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let (http, grpc, raft) = (free_port()?, free_port()?, free_port()?);
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &bins.join("mesh-coordinator"),
        &[
            format!("--http-addr=127.0.0.1:{http}"),
            format!("--grpc-addr=127.0.0.1:{grpc}"),
            format!("--raft-addr=127.0.0.1:{raft}"),
            "--raft-id=1".into(),
            format!("--raft-peers=1=127.0.0.1:{raft}"),
            format!("--raft-dir={}", dir.path().join("raft").display()),
            "--database-url=memory:".into(),
            "--world-size=1x1x1".into(),
        ],
        &dir.path().join("coordinator.log"),
    )?);
    let metrics_port = free_port()?;
    procs.0.push(spawn(
        &bins.join("game-server"),
        &[
            "--name=gs-netcode".into(),
            format!("--coordinator=http://127.0.0.1:{grpc}"),
            "--quic-addr=127.0.0.1:0".into(),
            "--query-addr=127.0.0.1:0".into(),
            "--http-addr=127.0.0.1:0".into(),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--grpc-addr=127.0.0.1:0".into(),
            "--database-url=memory:".into(),
            format!("--dev-token={DEV_TOKEN}"),
            format!("--player-bandwidth-kbps={}", cfg.bandwidth_kbps),
            // Every bot connects from 127.0.0.1.
            "--connects-per-ip-per-s=100000".into(),
        ],
        &dir.path().join("gs.log"),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        let coordinator = format!("http://127.0.0.1:{http}");
        // Wait for the server to own the one region.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let owned = async {
                let v: Value = client.get(format!("{coordinator}/v1/regions")).send().await.ok()?.json().await.ok()?;
                v.as_array()?.iter().all(|r| r["server_id"].as_u64().is_some()).then_some(())
            };
            if owned.await.is_some() {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the game server never got its region");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let scrape = || async {
            let text = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await?.text().await?;
            anyhow::Ok(bot_swarm::report::buckets(&text, "server_snapshot_encode_seconds"))
        };
        let swarm = bot_swarm::SwarmConfig {
            coordinator: coordinator.clone(),
            bots: cfg.visible + 1,
            duration: Some(Duration::from_secs(cfg.seconds)),
            auth: bot_swarm::BotAuth::DevToken(DEV_TOKEN.into()),
            path: Vec::new(),
            spread_m: 0.0,
            first_player: 1,
            ramp: Duration::from_millis(10),
            view_token: None,
            mix: Some(vec![(bot_swarm::behaviour::Behaviour::Crowd, 1)]),
            seed: 1,
            hotspot: None,
            gesture: true,
        };
        let live = Arc::new(bot_swarm::Live::default());
        let before = scrape().await.context("scraping the game server")?;
        let r = bot_swarm::run(swarm, live, tokio_util::sync::CancellationToken::new()).await?;
        let after = scrape().await.context("scraping the game server")?;
        let encode_us = |p| bot_swarm::report::quantile_between(&before, &after, p).map(|s| (s * 1e7).round() / 10.0);
        // Entities each bot's snapshots held, on average (whether all were in view).
        Ok(json!({
            "visible": cfg.visible,
            "bots": r.bots,
            "joined": r.joined,
            "seconds": cfg.seconds,
            "bandwidth_budget_kbps": cfg.bandwidth_kbps,
            "down_kbps_per_player": r.down_kbps_per_bot,
            "up_kbps_per_player": r.up_kbps_per_bot,
            "snapshot_encode_us_p50": encode_us(0.5),
            "snapshot_encode_us_p99": encode_us(0.99),
            "snapshots_per_player_per_s": (r.snapshots as f64 / f64::from(r.joined.max(1)) / r.seconds * 10.0).round() / 10.0,
            "undecoded_snapshots": r.undecoded_snapshots,
            "component_kbps_per_player": r.component_kbps_per_bot,
            "near_rig_hz": r.near_rig_hz,
            "rtt_p99_ms": r.rtt_p99_ms,
            "errors": r.errors,
        }))
    })
}
