//! Several coordinator replicas (one Raft group) and game servers on
//! loopback. Replicas keep fixed ports across restarts (game servers list
//! them all), and their Raft logs on disk.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::{Proc, WORLD_SEED, reqwest, wait_ports};

/// The admin token of the test clusters.
pub const ADMIN_TOKEN: &str = "test-admin";

#[derive(Debug)]
pub struct Replica {
    pub proc: Option<Proc>,
    pub http: String,
    pub grpc: String,
    args: Vec<String>,
    starts: u32,
}

#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub servers: Vec<(Proc, Value)>,
}

/// A port free right now on 127.0.0.1 (another process may take it before
/// it is used; tests retry nothing, so collisions show as failures).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// `replicas` coordinators, then `servers` game servers that know them all.
    pub fn start(replicas: usize, servers: usize, coordinator_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..replicas {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let peers: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, _, raft))| format!("{}=127.0.0.1:{raft}", i + 1)).collect();
        // One ticket key for every replica (as `meshctl up` and the chart
        // give them): a ticket any of them signs is good on every server.
        let key = dir.path().join("ticket.key");
        std::fs::write(&key, "5a".repeat(32))?;
        let mut cluster = Self { dir, replicas: Vec::new(), servers: Vec::new() };
        for (i, (http, grpc, raft)) in ports.iter().enumerate() {
            let id = i + 1;
            let d = cluster.dir.path();
            let mut args = vec![
                format!("--http-addr=127.0.0.1:{http}"),
                format!("--grpc-addr=127.0.0.1:{grpc}"),
                format!("--raft-addr=127.0.0.1:{raft}"),
                format!("--raft-id={id}"),
                format!("--raft-peers={}", peers.join(",")),
                format!("--raft-dir={}", d.join(format!("raft-{id}")).display()),
                format!("--world-seed={WORLD_SEED}"),
                format!("--ports-file={}", d.join(format!("coordinator-{id}.json")).display()),
                format!("--data-dir={}", d.join("world").display()),
                format!("--admin-token={ADMIN_TOKEN}"),
                format!("--ticket-key-file={}", key.display()),
            ];
            args.extend(coordinator_args.iter().map(|s| (*s).to_owned()));
            cluster.replicas.push(Replica {
                proc: None,
                http: format!("127.0.0.1:{http}"),
                grpc: format!("127.0.0.1:{grpc}"),
                args,
                starts: 0,
            });
        }
        for i in 0..replicas {
            cluster.start_replica(i)?;
        }
        cluster.wait_leader(Duration::from_secs(20))?;
        for i in 1..=servers {
            cluster.start_server(&format!("gs-{i}"), &[])?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) replica `i` on its ports and log.
    pub fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let d = self.dir.path().to_path_buf();
        let r = &mut self.replicas[i];
        r.starts += 1;
        let ports = d.join(format!("coordinator-{}.json", i + 1));
        let _ = std::fs::remove_file(&ports);
        let mut p = Proc::start(&format!("coordinator-{}-{}", i + 1, r.starts), "mesh-coordinator", &r.args, &d)?;
        wait_ports(&ports, &mut p)?;
        r.proc = Some(p);
        Ok(())
    }

    /// SIGKILL: no clean shutdown, no last write.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    pub fn start_server(&mut self, name: &str, server_args: &[&str]) -> anyhow::Result<usize> {
        let d = self.dir.path();
        let ports = d.join(format!("{name}.json"));
        let coordinators: Vec<String> = self.replicas.iter().map(|r| format!("http://{}", r.grpc)).collect();
        let mut args = vec![
            format!("--name={name}"),
            format!("--coordinator={}", coordinators.join(",")),
            "--quic-addr=127.0.0.1:0".into(),
            "--query-addr=127.0.0.1:0".into(),
            "--http-addr=127.0.0.1:0".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            "--grpc-addr=127.0.0.1:0".into(),
            format!("--ports-file={}", ports.display()),
            format!("--authority-log={}", d.join(format!("{name}.authority.jsonl")).display()),
            format!("--data-dir={}", d.join("world").display()),
            format!("--dev-token={}", crate::DEV_TOKEN),
        ];
        args.extend(server_args.iter().map(|s| (*s).to_owned()));
        let mut p = Proc::start(name, "game-server", &args, d)?;
        let v = wait_ports(&ports, &mut p)?;
        self.servers.push((p, v));
        Ok(self.servers.len() - 1)
    }

    /// Starts `bot-swarm` routed by replica `i`, as [`crate::Mesh::swarm`].
    pub fn swarm(&self, i: usize, name: &str, args: &[&str]) -> anyhow::Result<(Proc, std::path::PathBuf)> {
        crate::swarm_at(self.dir.path(), &self.replicas[i].http, name, args)
    }

    /// The authority invariants over every game server's log so far.
    pub fn invariants(&self) -> anyhow::Result<crate::invariants::Invariants> {
        crate::invariants_of(self.dir.path(), &self.servers)
    }

    /// GET from replica `i`'s admin API.
    pub fn get(&self, i: usize, path: &str) -> anyhow::Result<Value> {
        reqwest::blocking_get(&format!("http://{}{path}", self.replicas[i].http))
    }

    /// Replica status of every running replica: (index, `/v1/status`).
    pub fn statuses(&self) -> Vec<(usize, Value)> {
        (0..self.replicas.len())
            .filter(|i| self.replicas[*i].proc.is_some())
            .filter_map(|i| self.get(i, "/v1/status").ok().map(|v| (i, v)))
            .collect()
    }

    /// The index of the replica that says it leads, once the others agree.
    pub fn leader(&self) -> Option<usize> {
        let statuses = self.statuses();
        let leader = statuses.iter().find(|(_, s)| s["raft"]["role"] == "leader")?;
        let id = leader.1["raft"]["id"].as_u64()?;
        let agreed = statuses.iter().filter(|(_, s)| s["raft"]["leader"].as_u64() == Some(id)).count();
        (agreed * 2 > self.replicas.len() && leader.1["ready"] == true).then_some(leader.0)
    }

    pub fn wait_leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader within {within:?}: {:?}", self.statuses());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every region has a live owner (as replica `i` sees it).
    pub fn wait_regions_owned(&self, i: usize) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let regions = self.get(i, "/v1/regions")?;
            if regions.as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|x| !x["server_id"].is_null())) {
                return Ok(regions);
            }
            anyhow::ensure!(Instant::now() < deadline, "regions never all owned: {regions}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `PUT /v1/thresholds` on replica `i`: a write through Raft.
    pub fn put_thresholds(&self, i: usize, body: &Value) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://{}/v1/thresholds", self.replicas[i].http);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let r = ::reqwest::Client::new()
                .put(&url)
                .bearer_auth(ADMIN_TOKEN)
                .json(body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .context("PUT /v1/thresholds")?;
            let status = r.status().as_u16();
            let text = r.text().await?;
            Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
        })
    }
}
