//! The handoff benchmark: a loopback mesh of three coordinator replicas
//! and four game servers on a 2 × 2 grid of root regions (release builds),
//! and a swarm of real bots that oscillate across the region faces, commute
//! over them and throw props over them. It reports how many handoffs
//! happened and how long they took (from the tick an entity passed the
//! handoff line, on its old owner, to the first tick its new owner
//! simulated it: `handoff_latency_ticks`), and checks the authority
//! invariants over every server's per-tick log: no entity with two
//! authorities (`duplicated`), none without one (`unowned_entity_ticks`),
//! none dropped (`lost`), each bot's inputs applied once and in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::failover::{Procs, bin_dir, free_port, spawn};

#[derive(Debug, Clone)]
pub struct HandoffConfig {
    pub bots: u32,
    pub seconds: u64,
    pub seed: u64,
    /// `oscillate=…,commute=…,throw_over=…`.
    pub mix: String,
}

const DEV_TOKEN: &str = "handoff-bench";
const ADMIN_TOKEN: &str = "handoff-bench-admin";
const TICK_MS: f64 = 1000.0 / 90.0;

/// Counters of `authority_transfers_total` by kind, summed over servers.
fn transfers(texts: &[String]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for t in texts {
        for (k, v) in bot_swarm::report::counters_by(t, "authority_transfers_total", "kind") {
            *out.entry(k).or_insert(0.0) += v;
        }
    }
    out
}

/// `interactions_total` summed over servers, by `kind:result`.
fn interactions(texts: &[String]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in texts.iter().flat_map(|t| t.lines()).filter(|l| l.starts_with("interactions_total{")) {
        let label = |name: &str| line.split(&format!("{name}=\"")).nth(1)?.split('"').next();
        let (Some(kind), Some(result), Some(v)) =
            (label("kind"), label("result"), line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        else {
            continue;
        };
        *out.entry(format!("{kind}:{result}")).or_insert(0.0) += v;
    }
    out
}

/// The buckets of `name` summed over servers.
fn summed_buckets(texts: &[String], name: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for t in texts {
        for (le, v) in bot_swarm::report::buckets(t, name) {
            match out.iter_mut().find(|(l, _)| *l == le) {
                Some(e) => e.1 += v,
                None => out.push((le, v)),
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

pub fn run(cfg: &HandoffConfig) -> anyhow::Result<Value> {
    anyhow::ensure!((1..=2000).contains(&cfg.bots), "bots must be 1..=2000");
    let mix = bot_swarm::behaviour::parse_mix(&cfg.mix).map_err(|e| anyhow::anyhow!(e))?;
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let mut procs = Procs(Vec::new());
    let ports: Vec<(u16, u16, u16)> =
        (0..3).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let peers: Vec<String> = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{}", i + 1, p.2)).collect();
    for (i, (http, grpc, raft)) in ports.iter().enumerate() {
        procs.0.push(spawn(
            &bins.join("mesh-coordinator"),
            &[
                format!("--http-addr=127.0.0.1:{http}"),
                format!("--grpc-addr=127.0.0.1:{grpc}"),
                format!("--raft-addr=127.0.0.1:{raft}"),
                format!("--raft-id={}", i + 1),
                format!("--raft-peers={}", peers.join(",")),
                format!("--raft-dir={}", dir.path().join(format!("raft-{}", i + 1)).display()),
                "--database-url=memory:".into(),
                "--world-size=2x1x2".into(),
                format!("--admin-token={ADMIN_TOKEN}"),
            ],
            &dir.path().join(format!("coordinator-{}.log", i + 1)),
        )?);
    }
    let coordinators: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{}", p.1)).collect();
    let mut metrics_ports = Vec::new();
    let mut names = Vec::new();
    for s in 0..4 {
        let metrics = free_port()?;
        let name = format!("gs-{s}");
        procs.0.push(spawn(
            &bins.join("game-server"),
            &[
                format!("--name={name}"),
                format!("--coordinator={}", coordinators.join(",")),
                "--quic-addr=127.0.0.1:0".into(),
                "--query-addr=127.0.0.1:0".into(),
                "--http-addr=127.0.0.1:0".into(),
                format!("--metrics-addr=127.0.0.1:{metrics}"),
                "--grpc-addr=127.0.0.1:0".into(),
                "--database-url=memory:".into(),
                format!("--dev-token={DEV_TOKEN}"),
                "--connects-per-ip-per-s=100000".into(),
                format!("--authority-log={}", dir.path().join(format!("{name}.authority.jsonl")).display()),
            ],
            &dir.path().join(format!("{name}.log")),
        )?);
        metrics_ports.push(metrics);
        names.push(name);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        // The four regions, each with its own live owner.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let coordinator = loop {
            let mut found = None;
            for (http, _, _) in &ports {
                let url = format!("http://127.0.0.1:{http}");
                let owners = async {
                    let v: Value = client.get(format!("{url}/v1/regions")).send().await.ok()?.json().await.ok()?;
                    let owners: std::collections::BTreeSet<u64> =
                        v.as_array()?.iter().map(|r| r["server_id"].as_u64()).collect::<Option<_>>()?;
                    (owners.len() == 4).then_some(())
                };
                if owners.await.is_some() {
                    found = Some(url);
                    break;
                }
            }
            if let Some(url) = found {
                break url;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the four regions never got four owners");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        // The grid stays 2 × 2: no split or move by the balancer (a bench of
        // handoffs across fixed boundaries; region moves are the operator
        // tests' and the load run's).
        let fixed = json!({"split_players": 100_000, "split_cpu": 64.0, "merge_players": 0, "merge_cpu": 0.0, "cooldown_ms": 60_000});
        let mut put = false;
        for (http, _, _) in &ports {
            let r = client
                .put(format!("http://127.0.0.1:{http}/v1/thresholds"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&fixed)
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                put = true;
                break;
            }
        }
        anyhow::ensure!(put, "no coordinator replica took the thresholds");
        let scrape = || async {
            let mut texts = Vec::new();
            for p in &metrics_ports {
                texts.push(client.get(format!("http://127.0.0.1:{p}/metrics")).send().await?.text().await?);
            }
            anyhow::Ok(texts)
        };
        let swarm = bot_swarm::SwarmConfig {
            coordinator: coordinator.clone(),
            bots: cfg.bots,
            duration: Some(Duration::from_secs(cfg.seconds)),
            auth: bot_swarm::BotAuth::DevToken(DEV_TOKEN.into()),
            path: Vec::new(),
            spread_m: 0.0,
            first_player: 1,
            ramp: Duration::from_millis(20),
            view_token: None,
            mix: Some(mix),
            seed: cfg.seed,
            hotspot: None,
            gesture: false,
        };
        let live = Arc::new(bot_swarm::Live::default());
        let before = scrape().await.context("scraping the game servers")?;
        let r = bot_swarm::run(swarm, live, tokio_util::sync::CancellationToken::new()).await?;
        let after = scrape().await.context("scraping the game servers")?;
        let (t0, t1) = (transfers(&before), transfers(&after));
        let delta = |k: &str| t1.get(k).copied().unwrap_or(0.0) - t0.get(k).copied().unwrap_or(0.0);
        let (l0, l1) =
            (summed_buckets(&before, "handoff_latency_ticks"), summed_buckets(&after, "handoff_latency_ticks"));
        let latency_ms =
            |p| bot_swarm::report::quantile_between(&l0, &l1, p).map(|ticks| (ticks * TICK_MS * 10.0).round() / 10.0);
        let (d0, d1) =
            (summed_buckets(&before, "server_tick_duration_seconds"), summed_buckets(&after, "server_tick_duration_seconds"));
        let tick_ms = |p| bot_swarm::report::quantile_between(&d0, &d1, p).map(|s| (s * 1e4).round() / 10.0);
        let measured = l1.last().map_or(0.0, |b| b.1) - l0.last().map_or(0.0, |b| b.1);
        // A server the coordinator declared dead (starved of CPU past the
        // heartbeat timeout) keeps simulating until its next heartbeat
        // answer fences it: ticks owned twice then are that, not a handoff.
        let mut deaths = 0.0f64;
        for (http, _, _) in &ports {
            if let Ok(r) = client.get(format!("http://127.0.0.1:{http}/metrics")).send().await
                && let Ok(text) = r.text().await
            {
                let n = text
                    .lines()
                    .find_map(|l| l.strip_prefix("mesh_server_deaths_total "))
                    .and_then(|v| v.trim().parse::<f64>().ok());
                deaths = deaths.max(n.unwrap_or(0.0));
            }
        }
        let inv = integration_tests::invariants::Invariants::read(dir.path(), &names)?;
        // The bots' errors by kind (numbers replaced, so that what failed
        // and why count together).
        let mut error_kinds: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for e in r.per_bot.iter().flat_map(|b| &b.errors) {
            let kind: String =
                e.chars().map(|c| if c.is_ascii_digit() { 'N' } else { c }).take(120).collect::<String>().replace("NN", "N");
            *error_kinds.entry(kind).or_default() += 1;
        }
        let max_gap_ms = r.per_bot.iter().map(|b| b.max_snapshot_gap_ms).max().unwrap_or(0);
        let max_gap_ticks = r.per_bot.iter().map(|b| b.max_snapshot_gap_ticks).max().unwrap_or(0);
        let mut handoff_gap_ticks: Vec<u64> = r.per_bot.iter().flat_map(|b| b.handoff_gap_ticks.iter().copied()).collect();
        handoff_gap_ticks.sort_unstable();
        let handoff_gap_ticks_p99 = (!handoff_gap_ticks.is_empty())
            .then(|| handoff_gap_ticks[((handoff_gap_ticks.len() - 1) as f64 * 0.99).round() as usize]);
        let lost = delta("lost") + delta("orphan_lost") + delta("handoff_dropped");
        let kinds: serde_json::Map<String, Value> =
            t1.keys().map(|k| (k.clone(), json!(delta(k)))).filter(|(_, v)| v.as_f64() != Some(0.0)).collect();
        let (i0, i1) = (interactions(&before), interactions(&after));
        let interactions: serde_json::Map<String, Value> = i1
            .iter()
            .map(|(k, v)| (k.clone(), json!(v - i0.get(k).copied().unwrap_or(0.0))))
            .filter(|(_, v)| v.as_f64() != Some(0.0))
            .collect();
        if std::env::var_os("PS_BENCH_KEEP").is_some() {
            let kept = dir.path().to_path_buf();
            std::mem::forget(dir);
            eprintln!("logs kept in {}", kept.display());
        }
        Ok(json!({
            "transfers_by_kind": kinds,
            "bots": r.bots,
            "joined": r.joined,
            "seconds": cfg.seconds,
            "mix": cfg.mix,
            "handoffs": delta("in"),
            "handoffs_timed": measured,
            "handoff_p50_ms": latency_ms(0.5),
            "handoff_p99_ms": latency_ms(0.99),
            "tick_p50_ms": tick_ms(0.5),
            "tick_p99_ms": tick_ms(0.99),
            "lost": lost,
            "duplicated": inv.duplicated.len(),
            "servers_declared_dead": deaths,
            "error_kinds": error_kinds,
            "unowned_entity_ticks": inv.unowned.len(),
            "unowned_sample": inv.unowned.iter().take(5).collect::<Vec<_>>(),
            "input_regressions": inv.input_regressions.len(),
            "inputs_skipped": inv.inputs_skipped,
            "ticks_checked": inv.ticks_checked,
            "entities_checked": inv.entities,
            "max_snapshot_gap_ticks": max_gap_ticks,
            "snapshots_received": r.snapshots,
            "stale_snapshots": r.per_bot.iter().map(|b| b.stale_snapshots).sum::<u64>(),
            "undecoded_snapshots": r.undecoded_snapshots,
            "snapshots_dropped_by_bots": r.per_bot.iter().map(|b| b.snapshots_dropped).sum::<u64>(),
            "bots_over_2_ticks": r.per_bot.iter().filter(|b| b.max_snapshot_gap_ticks > 2).count(),
            "handoff_gap_ticks_p99": handoff_gap_ticks_p99,
            "handoff_gap_ticks_max": handoff_gap_ticks.last(),
            "handoff_gap_ticks_counts": handoff_gap_ticks.iter().fold(std::collections::BTreeMap::new(), |mut m, g| {
                *m.entry(g.to_string()).or_insert(0u32) += 1;
                m
            }),
            "max_snapshot_gap_wall_ms": max_gap_ms,
            "bot_handoffs": r.handoffs,
            "ack_regressions": r.ack_regressions,
            "handoff_gap_p99_ms": r.handoff_gap_p99_ms,
            "transfers_cancelled": delta("cancelled"),
            "transfers_reclaimed": delta("reclaimed"),
            "throws": r.work.throws,
            "interactions": interactions,
            "errors": r.errors,
        }))
    })
}
