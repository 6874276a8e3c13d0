//! The world outlives game servers: real processes, the real PostgreSQL of
//! `scripts/test` (serializable isolation), edits made by a scripted player
//! over QUIC.
//!
//! - a restarted server loads chunks identical to the ones it had (seed +
//!   stored deltas), on PostgreSQL and on the embedded store;
//! - SIGKILL during an edit storm: every acknowledged edit is in the
//!   database, and so is a checkpoint of every player the server held;
//! - a ten-second database outage during play: edits keep being applied,
//!   are acknowledged once written, and none is lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glam::DVec3;
use integration_tests::player::TestPlayer;
use integration_tests::proxy::OutageProxy;
use integration_tests::{Mesh, WORLD_SEED, blocking_text, metric};
use persistence::{StoreConfig, testing};
use sha2::Digest;
use shared::chunk::{ChunkKey, ChunkLayout};
use shared::edit::{EditOp, rebuild};
use shared::terrain::{ChunkVoxels, Material, TerrainGen};
use shared::wire::{EditOutcome, ServerControl};

const TOKEN: &str = "persistence-test-admin";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[derive(Debug, Clone)]
struct Ports {
    quic: SocketAddr,
    cert: String,
    http: String,
    metrics: String,
}

fn ports(mesh: &Mesh, i: usize) -> Ports {
    let v = &mesh.servers[i].1;
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("ports file lacks {k}")).to_owned();
    Ports {
        quic: s("quic").parse().expect("quic address"),
        cert: s("cert_sha256"),
        http: s("http"),
        metrics: s("metrics"),
    }
}

fn generator() -> TerrainGen {
    TerrainGen::new(WORLD_SEED, ChunkLayout::default())
}

/// Digs of single voxels (radius 0.5 at voxel centres) on a ring of 3 m
/// around `at`, three deep: distinct voxels, all within reach.
fn ring_digs(at: DVec3, per_ring: usize) -> Vec<EditOp> {
    let g = generator();
    let feet = DVec3::new(at.x, g.ground_height(at.x, at.z), at.z);
    let mut out = Vec::new();
    for depth in 0..3 {
        for k in 0..per_ring {
            let a = k as f64 / per_ring as f64 * std::f64::consts::TAU;
            let (x, z) = ((at.x + 3.0 * a.cos()).floor() + 0.5, (at.z + 3.0 * a.sin()).floor() + 0.5);
            let y = (g.ground_height(x, z) - 0.5 - depth as f64).floor() + 0.5;
            let op = EditOp::Dig { center: DVec3::new(x, y, z), radius: 0.5 };
            // Steep ground can put a spot out of the 5 m reach: skip it.
            if !out.contains(&op) && feet.distance(op.center()) < 4.5 {
                out.push(op);
            }
        }
    }
    out
}

/// The first place from `from` eastwards (metres apart by `step`) where a
/// ring of `per_ring` digs has at least `want` spots within reach.
fn dig_site(from: DVec3, step: f64, per_ring: usize, want: usize) -> (DVec3, Vec<EditOp>) {
    for k in 0..200 {
        let at = from + DVec3::new(step * k as f64, 0.0, 0.0);
        let ops = ring_digs(at, per_ring);
        if ops.len() >= want {
            return (at, ops);
        }
    }
    panic!("no place near {from} fits {want} digs");
}

/// Sends `ops` one every `every`, resending those refused for a transient
/// reason, and records each acknowledged one in `acked` (as it arrives).
/// Returns when all are acknowledged, the deadline passes, or the server goes.
async fn play(mut p: TestPlayer, ops: Vec<EditOp>, every: Duration, deadline: Instant, acked: Arc<Mutex<Vec<EditOp>>>) {
    let mut queue: std::collections::VecDeque<u32> = (0..ops.len() as u32).collect();
    let mut done = 0;
    while done < ops.len() && Instant::now() < deadline {
        if let Some(id) = queue.pop_front()
            && p.edit(id, ops[id as usize]).await.is_err()
        {
            return;
        }
        let until = Instant::now() + every;
        while Instant::now() < until {
            match p.next(until.saturating_duration_since(Instant::now())).await {
                Ok(Some(ServerControl::EditResult { id, outcome })) => match outcome {
                    EditOutcome::Done { .. } => {
                        acked.lock().expect("lock").push(ops[id as usize]);
                        done += 1;
                    }
                    EditOutcome::Rejected { reason } => {
                        assert!(
                            ["not_loaded", "no_avatar", "rate_limited", "store_busy"].contains(&reason.as_str()),
                            "edit {id} refused: {reason}"
                        );
                        queue.push_back(id);
                    }
                },
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// The world the store holds: chunks rebuilt from the seed and the stored deltas.
struct StoredWorld {
    store: Arc<dyn persistence::Store>,
    chunks: HashMap<ChunkKey, ChunkVoxels>,
}

impl StoredWorld {
    async fn open(url: &str) -> Self {
        let store = persistence::open(&StoreConfig { url: url.into(), migrate: false, ..Default::default() })
            .await
            .expect("the store opens");
        Self { store, chunks: HashMap::new() }
    }

    async fn chunk(&mut self, key: ChunkKey) -> &ChunkVoxels {
        if !self.chunks.contains_key(&key) {
            let deltas = self.store.chunk_deltas(key).await.expect("chunk reads").deltas;
            self.chunks.insert(key, rebuild(&generator(), key, &deltas));
        }
        &self.chunks[&key]
    }

    /// Asserts every voxel each dig covers is air in the stored world.
    async fn assert_dug(&mut self, digs: &[EditOp]) {
        let layout = ChunkLayout::default();
        for op in digs {
            for v in op.voxels(&layout) {
                let m = self.chunk(layout.chunk_of(v)).await.get(layout.local_index(v));
                assert_eq!(m, Material::Air, "acknowledged dig {op:?} is not in the database (voxel {v:?})");
            }
        }
    }
}

fn digest(voxels: &ChunkVoxels) -> String {
    let n = (ChunkLayout::default().chunk_voxels as usize).pow(3);
    let bytes: Vec<u8> = (0..n).map(|i| voxels.get(i) as u8).collect();
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// The server's view of a chunk (`GET /v1/chunks/…`): its digest once loaded.
async fn served_digest(http: &str, key: ChunkKey) -> Option<String> {
    let url = format!("http://{http}/v1/chunks/{}/{}/{}", key.x, key.y, key.z);
    let r = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["digest"].as_str().map(str::to_owned)
}

async fn wait_digest(http: &str, key: ChunkKey) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(d) = served_digest(http, key).await {
            return d;
        }
        assert!(Instant::now() < deadline, "chunk {key:?} never loaded on {http}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn join(p: &Ports, player: u64, at: DVec3) -> TestPlayer {
    let (player, answer) = TestPlayer::join(p.quic, &p.cert, player, at).await.expect("join");
    assert!(matches!(answer, ServerControl::Welcome { authoritative: true, .. }), "{answer:?}");
    player
}

/// Edits, restarts the server, and checks the new one serves the same chunks.
/// `store_url`: the database, or `None` for the mesh's embedded store.
fn restart_keeps_the_world(server_args: &[&str], store_url: Option<&str>) {
    let mut mesh = Mesh::start(1, server_args).expect("mesh starts");
    let embedded = persistence::embedded_url(&mesh.dir.path().join("world"));
    let store_url = store_url.unwrap_or(&embedded).to_owned();
    mesh.wait_regions_owned().expect("regions owned");
    let rt = runtime();
    let at = DVec3::new(600.5, 0.0, 700.5);
    let g = generator();
    let ground = g.ground_height(at.x, at.z);
    let ops = vec![
        EditOp::Dig { center: DVec3::new(at.x + 2.0, ground - 1.0, at.z), radius: 1.5 },
        EditOp::Place {
            center: DVec3::new(at.x - 2.0, ground + 0.2, at.z + 1.0),
            radius: 1.0,
            material: Material::Brick,
        },
        EditOp::Dig { center: DVec3::new(at.x, ground - 1.0, at.z - 2.5), radius: 1.2 },
        EditOp::Place { center: DVec3::new(at.x + 1.0, ground, at.z + 2.5), radius: 0.8, material: Material::Wood },
    ];
    let layout = ChunkLayout::default();
    let mut touched: Vec<ChunkKey> = ops.iter().flat_map(|op| op.voxels(&layout)).map(|v| layout.chunk_of(v)).collect();
    touched.sort();
    touched.dedup();

    let first = ports(&mesh, 0);
    let before: Vec<String> = rt.block_on(async {
        let p = join(&first, 77, at).await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        play(p, ops.clone(), Duration::from_millis(50), Instant::now() + Duration::from_secs(30), acked.clone()).await;
        assert_eq!(acked.lock().expect("lock").len(), ops.len(), "every edit acknowledged");
        let mut out = Vec::new();
        for k in &touched {
            out.push(wait_digest(&first.http, *k).await);
        }
        // The store holds exactly what the server shows.
        let mut stored = StoredWorld::open(&store_url).await;
        for (k, served) in touched.iter().zip(&out) {
            assert_eq!(&digest(stored.chunk(*k).await), served, "chunk {k:?}: store and server differ");
            assert_ne!(&digest(&g.generate(*k)), served, "chunk {k:?} was edited");
        }
        out
    });

    assert!(mesh.servers[0].0.stop(), "the first server stops cleanly");
    let i = mesh.start_server("gs-1-restarted", server_args).expect("second server starts");
    let second = ports(&mesh, i);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let _p = loop {
            match TestPlayer::join(second.quic, &second.cert, 77, at).await {
                Ok((p, ServerControl::Welcome { authoritative: true, .. })) => break p,
                _ => {
                    assert!(Instant::now() < deadline, "the restarted server never took the region");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        for (k, old) in touched.iter().zip(&before) {
            assert_eq!(&wait_digest(&second.http, *k).await, old, "chunk {k:?} differs after the restart");
        }
    });
}

#[test]
fn a_restarted_server_loads_identical_chunks_from_postgres() {
    let url = runtime().block_on(testing::fresh_database());
    let db = format!("--database-url={url}");
    restart_keeps_the_world(&[&db, &format!("--admin-token={TOKEN}")], Some(&url));
}

#[test]
fn a_restarted_server_loads_identical_chunks_from_the_embedded_store() {
    // The mesh's game servers share `<mesh dir>/world/world.sqlite`.
    restart_keeps_the_world(&[&format!("--admin-token={TOKEN}")], None);
}

#[test]
fn sigkill_during_an_edit_storm_loses_no_acknowledged_edit() {
    let url = runtime().block_on(testing::fresh_database());
    let db = format!("--database-url={url}");
    let mut mesh = Mesh::start(1, &[&db]).expect("mesh starts");
    mesh.wait_regions_owned().expect("regions owned");
    let p = ports(&mesh, 0);
    let rt = runtime();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut sent = 0;
    let mut sites = Vec::new();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut players = Vec::new();
        let mut from = DVec3::new(400.5, 0.0, 500.5);
        for i in 0..6u64 {
            let (at, ops) = dig_site(from, 7.0, 16, 36);
            sites.push((100 + i, at));
            from = at + DVec3::new(30.0, 0.0, 0.0);
            sent += ops.len();
            let player = join(&p, 100 + i, at).await;
            players.push(tokio::spawn(play(player, ops, Duration::from_millis(130), deadline, acked.clone())));
        }
        // Kill the server mid-storm, when a fifth of the edits are acknowledged.
        while acked.lock().expect("lock").len() < sent / 5 {
            assert!(Instant::now() < deadline, "the storm never got going");
            assert!(!players.iter().any(|p| p.is_finished()), "a player stopped early (see its panic)");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    mesh.servers[0].0.child.kill().expect("SIGKILL");
    let _ = mesh.servers[0].0.child.wait();
    let acked = acked.lock().expect("lock").clone();
    eprintln!("{} of {sent} edits acknowledged before SIGKILL", acked.len());
    assert!(acked.len() < sent, "the kill landed after the storm");
    rt.block_on(async {
        let mut stored = StoredWorld::open(&url).await;
        // Each player the server held was checkpointed where it stood, with
        // its transform (what a successor will resume it from).
        let rows = stored.store.checkpoints_within([-1e7; 3], [1e7; 3]).await.expect("checkpoints read");
        let registry = shared::component::Registry::builtin();
        for (player, at) in &sites {
            let id = shared::EntityId::player(shared::PlayerId(*player)).expect("a player id");
            let row =
                rows.iter().find(|r| r.entity == id.0).unwrap_or_else(|| panic!("player {player}: no checkpoint"));
            let pos = DVec3::from_array(row.pos);
            assert!((pos - *at).with_y(0.0).length() < 5.0, "player {player} checkpointed at {pos}, stood at {at}");
            let (set, _) = shared::component::ComponentSet::decode_saved(&row.components, &registry).expect("decodes");
            let t = set.get::<shared::component::builtin::Transform>().expect("a transform").expect("decodes");
            assert_eq!(t.pos_mm[0], (row.pos[0] * 1000.0).round() as i64);
            assert!(!row.gone && row.held_since <= row.tick);
        }
        stored.assert_dug(&acked).await
    });
}

#[test]
fn a_database_outage_during_play_loses_nothing_acknowledged() {
    let rt = runtime();
    let url = rt.block_on(testing::fresh_database());
    // postgres://user@host:port/db → through the proxy.
    let (head, db) = url.rsplit_once('/').expect("database path");
    let host = head.rsplit_once('@').map_or(head, |h| h.1).trim_start_matches("postgres://");
    let target: SocketAddr = host.parse().expect("test PostgreSQL on an IP address");
    let proxy = rt.block_on(OutageProxy::start(target)).expect("proxy");
    let via_proxy = format!("{}/{db}", head.replace(host, &proxy.addr.to_string()));
    let db_arg = format!("--database-url={via_proxy}");
    let mut mesh = Mesh::start(1, &[&db_arg]).expect("mesh starts");
    mesh.wait_regions_owned().expect("regions owned");
    let p = ports(&mesh, 0);
    let metrics_url = format!("http://{}/metrics", p.metrics);
    let (at, ops) = dig_site(DVec3::new(900.5, 0.0, 300.5), 7.0, 12, 30);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (mut up_seen_down, mut held_max) = (false, 0.0f64);
    let player = rt.block_on(join(&p, 300, at));
    // Slow enough that most edits are made during the outage.
    let task = rt.spawn(play(
        player,
        ops.clone(),
        Duration::from_millis(250),
        Instant::now() + Duration::from_secs(60),
        acked.clone(),
    ));
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().expect("lock").len() < 3 {
            assert!(!task.is_finished() && Instant::now() < deadline, "the player stopped before the outage");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    proxy.set_down(true);
    let outage = Instant::now();
    let acked_at_outage = acked.lock().expect("lock").len();
    while outage.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        let m = blocking_text(&metrics_url).expect("metrics answer during the outage");
        up_seen_down |= metric(&m, "world_store_up", "") == 0.0;
        held_max = held_max.max(metric(&m, "world_edits_unacknowledged", ""));
    }
    let acked_during = acked.lock().expect("lock").len() - acked_at_outage;
    proxy.set_down(false);
    rt.block_on(task).expect("the player saw no unexpected refusal");
    let acked = acked.lock().expect("lock").clone();
    eprintln!(
        "outage: {acked_during} acknowledged during it (flushes in flight at its start), up to {held_max} edits held, \
         {} of {} acknowledged in the end",
        acked.len(),
        ops.len()
    );
    assert!(up_seen_down, "world_store_up never showed the outage");
    assert!(held_max >= 5.0, "edits were not held during the outage (max {held_max})");
    assert!(acked_during <= 2, "{acked_during} edits acknowledged while the database was unreachable");
    assert_eq!(acked.len(), ops.len(), "every edit acknowledged once the database returned");
    assert!(mesh.servers[0].0.child.try_wait().expect("wait").is_none(), "the server survived the outage");
    rt.block_on(async { StoredWorld::open(&url).await.assert_dug(&acked).await });
    // Metrics are sampled once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = blocking_text(&metrics_url).expect("metrics");
        if metric(&m, "world_store_up", "") == 1.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&m, "world_store_up", ""), 1.0);
    assert!(metric(&m, "world_store_append_failures_total", "") >= 1.0);
}
