//! `mesh-bench failover`: three real coordinator replicas on loopback with
//! game servers heartbeating; the leader is killed (SIGKILL) again and
//! again, and restarted after. Measured: from the kill to the first write
//! committed by the new leader (a `PUT /v1/thresholds`, sent to the
//! surviving replicas until one answers 200), and the commit latency of a
//! write in steady state, and of a region-assignment change (region 0 moved
//! between the servers, a new epoch each time). Every write a replica acknowledged (one just
//! before each kill among them) must be in the replicated audit log at the
//! end; any that is not counts as lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

const TOKEN: &str = "bench-admin";

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub kills: usize,
    pub servers: usize,
    /// Steady-state writes timed for the commit latency.
    pub writes: usize,
}

struct Replica {
    child: Option<Child>,
    http: String,
    args: Vec<String>,
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The release binaries beside this one, built first so they are current.
pub(crate) fn bin_dir() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "mesh-coordinator", "-p", "game-server", "--bins"])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the coordinator and game server failed");
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("the bench's directory")?.to_path_buf())
}

/// Kills the processes when a bench ends, however it ends.
pub(crate) struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Command::new(bin)
        .args(args)
        .env("PS_LOG", std::env::var("PS_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

struct Bench {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    replicas: Vec<Replica>,
    dir: tempfile::TempDir,
    bins: PathBuf,
    seq: u64,
    /// Every write a replica acknowledged (its cooldown marker).
    acked: Vec<u64>,
}

impl Bench {
    async fn status(client: &reqwest::Client, http: &str) -> Option<Value> {
        let r = client.get(format!("http://{http}/v1/status")).timeout(Duration::from_millis(300)).send().await.ok()?;
        r.json().await.ok()
    }

    /// The replica every running replica agrees leads.
    fn leader(&self) -> Option<usize> {
        self.rt.block_on(async {
            let mut statuses = Vec::new();
            for (i, r) in self.replicas.iter().enumerate().filter(|(_, r)| r.child.is_some()) {
                if let Some(s) = Self::status(&self.client, &r.http).await {
                    statuses.push((i, s));
                }
            }
            let (i, s) = statuses.iter().find(|(_, s)| s["raft"]["role"] == "leader")?;
            let id = s["raft"]["id"].as_u64()?;
            let agree = statuses.iter().filter(|(_, s)| s["raft"]["leader"].as_u64() == Some(id)).count();
            (agree * 2 > self.replicas.len() && s["ready"] == true).then_some(*i)
        })
    }

    fn wait_leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One write: thresholds whose cooldown carries a sequence number.
    fn write(&mut self, i: usize, timeout: Duration) -> Option<u64> {
        self.seq += 1;
        let cooldown = 10_000 + self.seq;
        let body = thresholds(cooldown);
        let url = format!("http://{}/v1/thresholds", self.replicas[i].http);
        let ok = self.rt.block_on(async {
            let r = self.client.put(url).bearer_auth(TOKEN).json(&body).timeout(timeout).send().await;
            r.is_ok_and(|r| r.status().is_success())
        });
        if ok {
            self.acked.push(cooldown);
        }
        ok.then_some(cooldown)
    }

    /// Starts a write to a survivor every 10 ms (alternating, each with a
    /// 2 s timeout) until one commits; the time from `since` to that commit.
    /// Overlapping attempts keep the client's retry timeout out of the
    /// measurement. Returns once every attempt has answered.
    fn first_commit(&mut self, survivors: &[usize], since: Instant) -> anyhow::Result<Duration> {
        let mut attempts = tokio::task::JoinSet::new();
        let mut n = 0usize;
        self.rt.block_on(async {
            let mut every = tokio::time::interval(Duration::from_millis(10));
            let first = loop {
                tokio::select! {
                    _ = every.tick() => {
                        anyhow::ensure!(since.elapsed() < Duration::from_secs(30), "no write committed within 30 s");
                        self.seq += 1;
                        let cooldown = 10_000 + self.seq;
                        let url = format!("http://{}/v1/thresholds", self.replicas[survivors[n % survivors.len()]].http);
                        n += 1;
                        let req = self.client.put(url).bearer_auth(TOKEN).json(&thresholds(cooldown)).timeout(Duration::from_secs(2));
                        attempts.spawn(async move { req.send().await.is_ok_and(|r| r.status().is_success()).then_some(cooldown) });
                    }
                    Some(done) = attempts.join_next() => {
                        if let Ok(Some(v)) = done {
                            self.acked.push(v);
                            break since.elapsed();
                        }
                    }
                }
            };
            // Attempts still in flight: their answers count too.
            while let Some(done) = attempts.join_next().await {
                if let Ok(Some(v)) = done {
                    self.acked.push(v);
                }
            }
            Ok(first)
        })
    }

    /// The cooldown markers of every write in the audit log of replica `i`.
    fn audited(&self, i: usize) -> anyhow::Result<Vec<u64>> {
        let url = format!("http://{}/v1/audit?limit=10000", self.replicas[i].http);
        let log: Vec<Value> = self.rt.block_on(async { self.client.get(url).send().await?.json().await })?;
        Ok(log
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r["detail"].as_str()?).ok()?["cooldown_ms"].as_u64())
            .collect())
    }

    fn read_cooldown(&self, i: usize) -> Option<u64> {
        let url = format!("http://{}/v1/thresholds", self.replicas[i].http);
        self.rt.block_on(async {
            let r = self.client.get(url).timeout(Duration::from_millis(500)).send().await.ok()?;
            r.json::<Value>().await.ok()?["cooldown_ms"].as_u64()
        })
    }

    fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("coordinator-{}.log", i + 1));
        // Keep earlier logs: append a start counter.
        let log = if log.exists() { log.with_extension(format!("{}.log", self.seq)) } else { log };
        let child = spawn(&self.bins.join("mesh-coordinator"), &self.replicas[i].args, &log)?;
        self.replicas[i].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn thresholds(cooldown_ms: u64) -> Value {
    json!({"split_players": 40, "split_cpu": 0.7, "merge_players": 10, "merge_cpu": 0.3, "cooldown_ms": cooldown_ms})
}

fn percentile_ms(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    (v[i] * 100.0).round() / 100.0
}

pub fn run(cfg: &FailoverConfig) -> anyhow::Result<Value> {
    anyhow::ensure!((1..=1000).contains(&cfg.kills), "kills must be 1..=1000");
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let ports: Vec<(u16, u16, u16)> =
        (0..3).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let peers: Vec<String> = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{}", i + 1, p.2)).collect();
    let replicas = ports
        .iter()
        .enumerate()
        .map(|(i, (http, grpc, raft))| Replica {
            child: None,
            http: format!("127.0.0.1:{http}"),
            args: vec![
                format!("--http-addr=127.0.0.1:{http}"),
                format!("--grpc-addr=127.0.0.1:{grpc}"),
                format!("--raft-addr=127.0.0.1:{raft}"),
                format!("--raft-id={}", i + 1),
                format!("--raft-peers={}", peers.join(",")),
                format!("--raft-dir={}", dir.path().join(format!("raft-{}", i + 1)).display()),
                format!("--data-dir={}", dir.path().join("world").display()),
                format!("--admin-token={TOKEN}"),
            ],
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut b = Bench { rt, client: reqwest::Client::new(), replicas, dir, bins, seq: 0, acked: Vec::new() };
    for i in 0..3 {
        b.start_replica(i)?;
    }
    b.wait_leader(Duration::from_secs(30))?;
    let coordinators: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{}", p.1)).collect();
    let mut servers = Vec::new();
    for s in 0..cfg.servers {
        let args = vec![
            format!("--name=gs-{s}"),
            format!("--coordinator={}", coordinators.join(",")),
            "--quic-addr=127.0.0.1:0".into(),
            "--query-addr=127.0.0.1:0".into(),
            "--http-addr=127.0.0.1:0".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            "--grpc-addr=127.0.0.1:0".into(),
            format!("--data-dir={}", b.dir.path().join("world").display()),
        ];
        servers.push(ServerProc(spawn(&b.bins.join("game-server"), &args, &b.dir.path().join(format!("gs-{s}.log")))?));
    }
    // Let the servers register and get their regions.
    std::thread::sleep(Duration::from_secs(4));

    // Steady state: sequential writes through the leader.
    let mut commit_ms = Vec::new();
    let leader = b.wait_leader(Duration::from_secs(10))?;
    for _ in 0..cfg.writes {
        let t = Instant::now();
        if b.write(leader, Duration::from_secs(2)).is_some() {
            commit_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // Steady state: region-assignment changes (region 0 moved back and
    // forth between the servers through the leader), each a new epoch.
    let mut move_ms = Vec::new();
    let ids: Vec<u64> =
        b.rt.block_on(async {
            let url = format!("http://{}/v1/servers", b.replicas[leader].http);
            b.client.get(url).send().await.ok()?.json::<Value>().await.ok()
        })
        .and_then(|v| v.as_array().map(|a| a.iter().filter_map(|s| s["server_id"].as_u64()).collect()))
        .unwrap_or_default();
    if ids.len() >= 2 {
        let url = format!("http://{}/v1/regions/L0:0,0,0/move", b.replicas[leader].http);
        for n in 0..cfg.writes {
            let to = ids[n % ids.len()];
            let t = Instant::now();
            let ok = b.rt.block_on(async {
                let req =
                    b.client.post(&url).bearer_auth(TOKEN).json(&json!({ "to": to })).timeout(Duration::from_secs(2));
                // 409: it already had that owner (the first move, maybe).
                req.send().await.is_ok_and(|r| r.status().is_success())
            });
            if ok {
                move_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }

    let mut failover_ms = Vec::new();
    for k in 0..cfg.kills {
        let leader = b.wait_leader(Duration::from_secs(30))?;
        // A write acknowledged just before the kill: the most at risk.
        b.write(leader, Duration::from_secs(2)).context("the write before the kill")?;
        b.kill(leader);
        let killed = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let took = b.first_commit(&survivors, killed).with_context(|| format!("kill {k}"))?;
        failover_ms.push(took.as_secs_f64() * 1000.0);
        b.start_replica(leader)?;
        // Wait for the restarted replica to catch up before the next kill.
        let deadline = Instant::now() + Duration::from_secs(20);
        // (Every attempt has answered by now: no write is in flight, so the
        // replicas converge on one value.)
        while b.read_cooldown(leader).is_none() || b.read_cooldown(leader) != b.read_cooldown(survivors[0]) {
            if Instant::now() > deadline {
                let kept = std::mem::replace(&mut b.dir, tempfile::tempdir()?).keep();
                anyhow::bail!(
                    "kill {k}: the restarted replica {} did not catch up ({:?} there, {:?} on {}); logs in {}",
                    leader + 1,
                    b.read_cooldown(leader),
                    b.read_cooldown(survivors[0]),
                    survivors[0] + 1,
                    kept.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let leader = b.wait_leader(Duration::from_secs(30))?;
    // Every acknowledged write must be in the replicated audit log (of
    // the current leader, after all the leader changes).
    let audited = b.audited(leader)?;
    let oldest = audited.iter().min().copied().unwrap_or(0);
    let audited: std::collections::BTreeSet<u64> = audited.into_iter().collect();
    let lost = b.acked.iter().filter(|v| **v >= oldest && !audited.contains(v)).count();
    let status = b.rt.block_on(Bench::status(&b.client, &b.replicas[leader].http)).unwrap_or_default();
    drop(servers);
    if std::env::var_os("PS_BENCH_KEEP").is_some() {
        let kept = std::mem::replace(&mut b.dir, tempfile::tempdir()?).keep();
        eprintln!("logs kept in {}", kept.display());
    }
    Ok(json!({
        "kills": cfg.kills,
        "failover_p50_ms": percentile_ms(&mut failover_ms.clone(), 0.5),
        "failover_p99_ms": percentile_ms(&mut failover_ms.clone(), 0.99),
        "failover_max_ms": percentile_ms(&mut failover_ms, 1.0),
        "lost_commits": lost,
        "acknowledged_writes": b.acked.len(),
        "commit_p50_ms": percentile_ms(&mut commit_ms.clone(), 0.5),
        "commit_p99_ms": percentile_ms(&mut commit_ms, 0.99),
        "region_move_commits": move_ms.len(),
        "region_move_p50_ms": percentile_ms(&mut move_ms.clone(), 0.5),
        "region_move_p99_ms": percentile_ms(&mut move_ms, 0.99),
        "game_servers": cfg.servers,
        // A server declared dead during a failover would have been fenced.
        "game_servers_alive_at_end": status["servers_alive"],
        "game_servers_registered": status["servers_total"],
    }))
}

struct ServerProc(Child);

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
