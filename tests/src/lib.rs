//! Helpers for the multi-process tests: build and start the real binaries on
//! 127.0.0.1 with port 0, read their ports files, stop them with SIGTERM.

pub mod cluster;
pub mod invariants;
pub mod player;
pub mod proxy;
pub mod redis;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

/// The binaries the multi-process tests run.
pub const BINARIES: [&str; 4] = ["mesh-coordinator", "game-server", "bot-swarm", "meshctl"];

/// The directory holding the workspace's binaries, never stale ones.
///
/// `scripts/test` over the whole workspace sets `PS_TEST_BIN_DIR` to
/// cargo's own `debug` directory: each of the four packages has an
/// integration test, so that very `cargo test` built their binaries before
/// running any test (with the test run's features: nothing is built
/// twice). Otherwise (`cargo test -p integration-tests`, an IDE) they are
/// built once per test process into a target directory of their own: the
/// feature set cargo unifies for that build is not the one of `cargo
/// test`, and sharing a directory would rebuild both every time.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PS_TEST_BIN_DIR").map(PathBuf::from) {
            for b in BINARIES {
                assert!(dir.join(b).is_file(), "PS_TEST_BIN_DIR={} has no {b}", dir.display());
            }
            return dir;
        }
        // tests run from <target>/<profile>/deps/
        let exe = std::env::current_exe().expect("test executable path");
        let target = exe.ancestors().nth(3).expect("<target>/<profile>/deps/<test>").to_path_buf();
        let own = target.join("integration");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--bins"])
            .args(BINARIES.iter().flat_map(|b| ["-p", b]))
            .arg("--target-dir")
            .arg(&own)
            .status()
            .expect("running cargo build for the integration tests");
        assert!(status.success(), "building the binaries failed");
        own.join("debug")
    })
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(name: &str, bin: &str, args: &[String], dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin_dir().join(bin))
            .args(args)
            .env("PS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Self { name: name.to_owned(), child, log })
    }

    /// Sends SIGTERM and waits up to 10 s; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Waits for a JSON ports file, failing early if `proc` exits.
pub fn wait_ports(path: &Path, proc: &mut Proc) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        if let Some(status) = proc.child.try_wait()? {
            anyhow::bail!("{} exited ({status}):\n{}", proc.name, proc.log_text());
        }
        anyhow::ensure!(Instant::now() < deadline, "{} never wrote {}", proc.name, path.display());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// POSTs JSON (with a bearer token if given); the status and the JSON
/// answer, or the raw text as a JSON string when the answer is not JSON.
pub async fn post_json(url: &str, bearer: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
    let mut req = ::reqwest::Client::new().post(url).json(body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// A coordinator and `n` game servers on loopback.
#[derive(Debug)]
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub coordinator: Proc,
    pub http: String,
    pub grpc: String,
    pub servers: Vec<(Proc, Value)>,
    coordinator_args: Vec<String>,
}

/// The development token the test meshes' game servers accept (so tests
/// can join as any player without an account); tests of the login path
/// start servers with `--dev-token=` (none).
pub const DEV_TOKEN: &str = "dev";

impl Mesh {
    pub fn start(n: usize, server_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(n, &[], server_args)
    }

    /// A mesh whose coordinator gets `coordinator_args` too.
    pub fn start_with(n: usize, coordinator_args: &[&str], server_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports = dir.path().join("coordinator.json");
        let mut args = vec![
            "--http-addr=127.0.0.1:0".into(),
            "--grpc-addr=127.0.0.1:0".into(),
            "--raft-addr=127.0.0.1:0".into(),
            format!("--world-seed={WORLD_SEED}"),
            format!("--ports-file={}", ports.display()),
            // Accounts live in the mesh's one embedded store.
            format!("--data-dir={}", dir.path().join("world").display()),
        ];
        args.extend(coordinator_args.iter().map(|s| (*s).to_owned()));
        let mut coordinator = Proc::start("coordinator", "mesh-coordinator", &args, dir.path())?;
        let c = wait_ports(&ports, &mut coordinator)?;
        let http = c["http"].as_str().context("http")?.to_owned();
        let grpc = c["grpc"].as_str().context("grpc")?.to_owned();
        let mut mesh = Self { dir, coordinator, http, grpc, servers: Vec::new(), coordinator_args: args };
        for i in 1..=n {
            mesh.start_server(&format!("gs-{i}"), server_args)?;
        }
        Ok(mesh)
    }

    /// Stops the coordinator (cleanly: SIGTERM) and starts a new one on the
    /// same store. Its ports change: game servers started before it cannot
    /// reach it.
    pub fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.coordinator.stop(),
            "the coordinator did not stop cleanly:\n{}",
            self.coordinator.log_text()
        );
        let ports = self.dir.path().join("coordinator.json");
        let _ = std::fs::remove_file(&ports);
        self.coordinator = Proc::start("coordinator-2", "mesh-coordinator", &self.coordinator_args, self.dir.path())?;
        let c = wait_ports(&ports, &mut self.coordinator)?;
        self.http = c["http"].as_str().context("http")?.to_owned();
        self.grpc = c["grpc"].as_str().context("grpc")?.to_owned();
        Ok(())
    }

    /// The authority invariants over every game server's log so far.
    pub fn invariants(&self) -> anyhow::Result<invariants::Invariants> {
        invariants_of(self.dir.path(), &self.servers)
    }

    /// Starts one more game server; returns its index in `servers`.
    pub fn start_server(&mut self, name: &str, server_args: &[&str]) -> anyhow::Result<usize> {
        let dir = self.dir.path();
        let ports = dir.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&ports);
        let mut args = vec![
            format!("--name={name}"),
            format!("--coordinator=http://{}", self.grpc),
            "--quic-addr=127.0.0.1:0".into(),
            "--query-addr=127.0.0.1:0".into(),
            "--http-addr=127.0.0.1:0".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            "--grpc-addr=127.0.0.1:0".into(),
            format!("--ports-file={}", ports.display()),
            format!("--authority-log={}", dir.join(format!("{name}.authority.jsonl")).display()),
            // One world for the mesh, as `meshctl up` does.
            format!("--data-dir={}", dir.join("world").display()),
        ];
        if !server_args.iter().any(|a| a.starts_with("--dev-token")) {
            args.push(format!("--dev-token={DEV_TOKEN}"));
        }
        args.extend(server_args.iter().map(|s| (*s).to_owned()));
        let mut p = Proc::start(name, "game-server", &args, dir)?;
        let v = wait_ports(&ports, &mut p)?;
        self.servers.push((p, v));
        Ok(self.servers.len() - 1)
    }

    /// Starts `bot-swarm` against this mesh as `name`: its bots log in as
    /// `<name>-<n>` and its report goes to `<dir>/<name>` (returned), with
    /// `args` for the rest (bots, seconds, path or mix, limits).
    pub fn swarm(&self, name: &str, args: &[&str]) -> anyhow::Result<(Proc, PathBuf)> {
        swarm_at(self.dir.path(), &self.http, name, args)
    }

    /// POSTs JSON to the coordinator's API, from a runtime of its own.
    pub fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> anyhow::Result<(u16, Value)> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(post_json(&format!("http://{}{path}", self.http), bearer, &body))
    }

    /// The `summary.json` a swarm wrote into `report`.
    pub fn summary(report: &Path) -> anyhow::Result<Value> {
        let path = report.join("summary.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.get_as(path, None)
    }

    /// A GET of the coordinator's API with a bearer token.
    pub fn get_as(&self, path: &str, bearer: Option<&str>) -> anyhow::Result<Value> {
        reqwest::blocking_get_as(&format!("http://{}{path}", self.http), bearer)
    }

    /// Waits until every region has a live owner.
    pub fn wait_regions_owned(&self) -> anyhow::Result<Value> {
        self.wait_regions_owned_as(None)
    }

    /// As [`Mesh::wait_regions_owned`], reading the views with `bearer`.
    pub fn wait_regions_owned_as(&self, bearer: Option<&str>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let regions = self.get_as("/v1/regions", bearer)?;
            let owned = regions.as_array().is_some_and(|r| r.iter().all(|x| !x["server_id"].is_null()));
            // ... and every server has heard of its regions (maps travel with heartbeats).
            let heard = owned
                && self.servers.iter().all(|(_, v)| {
                    let url = format!("http://{}/v1/status", v["http"].as_str().unwrap_or_default());
                    reqwest::blocking_get(&url).is_ok_and(|s| s["regions"].as_array().is_some_and(|r| !r.is_empty()))
                });
            if heard {
                return Ok(regions);
            }
            anyhow::ensure!(Instant::now() < deadline, "regions never all owned: {regions}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads a Prometheus counter (summed over label sets matching `labels`).
/// Starts `bot-swarm` in `dir`, routed by the coordinator API at `http`:
/// its bots log in as `<name>-<n>` and its report goes to `<dir>/<name>`
/// (returned), with `args` for the rest.
pub fn swarm_at(dir: &Path, http: &str, name: &str, args: &[&str]) -> anyhow::Result<(Proc, PathBuf)> {
    let report = dir.join(name);
    let mut all = vec![
        format!("--coordinator=http://{http}"),
        format!("--account-prefix={name}-"),
        format!("--report={}", report.display()),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    Ok((Proc::start(name, "bot-swarm", &all, dir)?, report))
}

/// The authority invariants over the logs `servers` wrote in `dir`.
pub fn invariants_of(dir: &Path, servers: &[(Proc, Value)]) -> anyhow::Result<invariants::Invariants> {
    let names: Vec<String> = servers.iter().map(|(p, _)| p.name.clone()).collect();
    invariants::Invariants::read(dir, &names)
}

pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let matches = key == name || (key.starts_with(&format!("{name}{{")) && key.contains(labels));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

mod reqwest {
    //! A blocking GET of JSON, from a small runtime of its own.
    pub fn blocking_get(url: &str) -> anyhow::Result<serde_json::Value> {
        blocking_get_as(url, None)
    }

    /// As [`blocking_get`], with a bearer token.
    pub fn blocking_get_as(url: &str, bearer: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut req = ::reqwest::Client::new().get(url);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let r = req.send().await?;
            anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
            Ok(r.json().await?)
        })
    }

    pub fn blocking_text(url: &str) -> anyhow::Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async { Ok(::reqwest::get(url).await?.text().await?) })
    }
}

pub use reqwest::{blocking_get_as, blocking_text};

/// The terrain seed the test meshes run with.
pub const WORLD_SEED: u64 = 20_261_122;

/// A line `z` (a voxel centre) along which the generated ground from `x0`
/// to `x1` is walkable without jumping: no step higher than one voxel, on
/// the line and a voxel either side. Bots walk straight lines; the world
/// has cliffs.
pub fn walkable_line(x0: f64, x1: f64, z_from: f64) -> anyhow::Result<f64> {
    let g = shared::terrain::TerrainGen::new(WORLD_SEED, shared::chunk::ChunkLayout::default());
    for k in 0..400 {
        let z = (z_from + f64::from(k)).floor() + 0.5;
        let ok = [-1.0, 0.0, 1.0].iter().all(|dz| {
            let mut x = x0.floor() + 0.5;
            let mut h = g.ground_height(x, z + dz);
            while x < x1 {
                x += 1.0;
                let n = g.ground_height(x, z + dz);
                if (n - h).abs() > 1.0 {
                    return false;
                }
                h = n;
            }
            true
        });
        if ok {
            return Ok(z);
        }
    }
    anyhow::bail!("no walkable line from x = {x0} to {x1} within 400 m of z = {z_from}")
}
