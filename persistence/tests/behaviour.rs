//! The same behaviour, asserted against every store: in memory, the embedded
//! SQLite file, and the real PostgreSQL server `scripts/test` starts
//! (serializable isolation, as CockroachDB).

use std::sync::Arc;
use std::time::{Duration, Instant};

use persistence::{
    Checkpoint, Progress, Session, Store, StoreConfig, StoreError, Structure, TickDeltas, TopologySnapshot,
    TransferRecord, migrations, model::fold_deltas, testing,
};
use serde_json::json;
use shared::chunk::ChunkKey;
use shared::edit::VoxelDelta;
use shared::ids::PlayerId;
use shared::terrain::Material;

/// A store and whatever must live as long as it (a temporary directory).
struct Fixture {
    store: Arc<dyn Store>,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

async fn memory() -> Fixture {
    let cfg = StoreConfig::default();
    Fixture { store: persistence::open(&cfg).await.expect("memory store"), url: cfg.url, _dir: None }
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = persistence::embedded_url(dir.path());
    let store = persistence::open(&StoreConfig { url: url.clone(), ..Default::default() }).await.expect("sqlite store");
    Fixture { store, url, _dir: Some(dir) }
}

async fn postgres() -> Fixture {
    let url = testing::fresh_database().await;
    let store = persistence::open(&StoreConfig { url: url.clone(), pool_size: 4, ..Default::default() })
        .await
        .expect("postgres store");
    Fixture { store, url, _dir: None }
}

const A: ChunkKey = ChunkKey { x: -1, y: 2, z: 3 };
const B: ChunkKey = ChunkKey { x: 40, y: -7, z: 0 };

fn d(chunk: ChunkKey, index: u32, material: Material) -> VoxelDelta {
    VoxelDelta { chunk, index, material }
}

fn tick(tick: u64, deltas: Vec<VoxelDelta>) -> TickDeltas {
    TickDeltas { tick, deltas }
}

async fn deltas_come_back_in_tick_writer_seq_order(f: Fixture) {
    let s = &f.store;
    // Writer 7 flushes at tick 20; writer 3 flushed tick 10 later (a slow
    // writer): reads still apply tick 10 first.
    s.append_deltas(7, 1, &[tick(20, vec![d(A, 5, Material::Wood), d(B, 1, Material::Air)])]).await.expect("append");
    s.append_deltas(3, 9, &[tick(9, vec![d(A, 5, Material::Air)]), tick(10, vec![d(A, 6, Material::Brick)])])
        .await
        .expect("append");
    s.append_deltas(7, 2, &[tick(20, vec![d(A, 5, Material::Metal)])]).await.expect("append");
    let a = s.chunk_deltas(A).await.expect("read");
    assert_eq!(
        a.deltas,
        vec![d(A, 5, Material::Air), d(A, 6, Material::Brick), d(A, 5, Material::Wood), d(A, 5, Material::Metal)]
    );
    assert_eq!(a.rows, 3);
    let b = s.chunk_deltas(B).await.expect("read");
    assert_eq!((b.deltas, b.rows), (vec![d(B, 1, Material::Air)], 1));
    let empty = s.chunk_deltas(ChunkKey { x: 0, y: 0, z: 0 }).await.expect("read");
    assert_eq!((empty.deltas.len(), empty.rows), (0, 0));
}

async fn a_retried_append_is_not_duplicated(f: Fixture) {
    let s = &f.store;
    let batch = [tick(4, vec![d(A, 1, Material::Soil), d(A, 2, Material::Soil)])];
    s.append_deltas(11, 5, &batch).await.expect("append");
    s.append_deltas(11, 5, &batch).await.expect("retry of the same flush");
    assert_eq!(s.chunk_deltas(A).await.expect("read").deltas.len(), 2);
}

async fn compaction_keeps_the_chunk_and_reads_few_rows(f: Fixture) {
    let s = &f.store;
    let mut all = Vec::new();
    for i in 0..40u64 {
        let ds = vec![d(A, (i % 7) as u32, Material::ALL[(i % 7) as usize]), d(A, 100 + i as u32, Material::Brick)];
        all.extend(ds.clone());
        s.append_deltas(1, i, &[tick(i, ds)]).await.expect("append");
    }
    let before = s.chunk_deltas(A).await.expect("read");
    assert_eq!(before.rows, 40);
    let c = s.compact_chunk(A).await.expect("compact");
    assert_eq!(c.rows_folded, 40);
    assert_eq!(c.voxels, fold_deltas(&all).len());
    let after = s.chunk_deltas(A).await.expect("read");
    assert_eq!(after.rows, 1, "one snapshot row after compaction");
    assert_eq!(fold_deltas(&after.deltas), fold_deltas(&before.deltas));
    // Edits after the compaction apply on top of the snapshot.
    s.append_deltas(1, 100, &[tick(100, vec![d(A, 3, Material::Metal)])]).await.expect("append");
    all.push(d(A, 3, Material::Metal));
    let later = s.chunk_deltas(A).await.expect("read");
    assert_eq!(later.rows, 2);
    assert_eq!(fold_deltas(&later.deltas), fold_deltas(&all));
    let again = s.compact_chunk(A).await.expect("compact again");
    assert_eq!(again.rows_folded, 1);
    assert_eq!(fold_deltas(&s.chunk_deltas(A).await.expect("read").deltas), fold_deltas(&all));
    // Nothing to fold: nothing changes.
    assert_eq!(s.compact_chunk(A).await.expect("compact").rows_folded, 0);
    assert_eq!(s.compact_chunk(B).await.expect("compact empty").voxels, 0);
}

async fn out_of_chunk_deltas_are_refused(f: Fixture) {
    let err =
        f.store.append_deltas(1, 1, &[tick(1, vec![d(A, 32 * 32 * 32, Material::Rock)])]).await.expect_err("refused");
    assert_eq!(err.kind(), "invalid");
    assert_eq!(f.store.chunk_deltas(A).await.expect("read").rows, 0);
}

async fn accounts_are_unique_by_name(f: Fixture) {
    let s = &f.store;
    let a = s.create_account("ada", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA").await.expect("create");
    let b = s.create_account("bob", "hash-b").await.expect("create");
    assert_ne!(a.player, b.player);
    // A player id is its avatar's 40-bit entity serial.
    for p in [a.player, b.player] {
        assert!(p.0 > 0 && p.0 <= shared::ids::MAX_PLAYER_ID, "{p}");
    }
    let dup = s.create_account("ada", "other").await.expect_err("name taken");
    assert!(matches!(dup, StoreError::AlreadyExists(_)), "{dup}");
    assert_eq!(s.account("ada").await.expect("read"), Some(a));
    assert_eq!(s.account("nobody").await.expect("read"), None);
}

async fn sessions_expire_and_can_be_dropped(f: Fixture) {
    let s = &f.store;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let live = Session { player: 7, account: "ada".into(), expires_unix: now + 3600 };
    let dead = Session { player: 8, account: "bob".into(), expires_unix: now - 1 };
    s.put_session("aa11", &live).await.expect("put");
    s.put_session("bb22", &dead).await.expect("put");
    assert_eq!(s.session("aa11").await.expect("read"), Some(live.clone()));
    assert_eq!(s.session("bb22").await.expect("read"), None, "expired");
    assert_eq!(s.session("cc33").await.expect("read"), None);
    s.drop_session("aa11").await.expect("drop");
    assert_eq!(s.session("aa11").await.expect("read"), None, "dropped");
    s.drop_session("aa11").await.expect("dropping twice is fine");
}

async fn progress_versions_only_increase(f: Fixture) {
    let s = &f.store;
    let p = PlayerId(42);
    assert_eq!(s.load_progress(p).await.expect("read"), None);
    let v1 = Progress {
        player: p,
        version: 1,
        position: [1.5, 64.0, -3.25],
        inventory: json!({"rock": 12, "tools": ["pick"]}),
        stats: json!({"dug": 3}),
        // Opaque bytes to the store (a component set, to the game server).
        components: vec![2, 0xe9, 7, 4, 1, 2, 3, 4, 0],
    };
    s.save_progress(&v1).await.expect("save v1");
    assert_eq!(s.load_progress(p).await.expect("read"), Some(v1.clone()));
    let stale = Progress { position: [0.0; 3], ..v1.clone() };
    match s.save_progress(&stale).await {
        Err(StoreError::Stale { stored: 1, offered: 1, .. }) => {}
        other => panic!("expected Stale, got {other:?}"),
    }
    assert_eq!(s.load_progress(p).await.expect("read"), Some(v1.clone()), "the stale save changed nothing");
    let v2 = Progress { version: 2, stats: json!({"dug": 4}), components: Vec::new(), ..v1 };
    s.save_progress(&v2).await.expect("save v2");
    assert_eq!(s.load_progress(p).await.expect("read"), Some(v2));
}

async fn structures_by_chunk_with_versions(f: Fixture) {
    let s = &f.store;
    let mk = |id: u64, chunk: ChunkKey, version: u64| Structure {
        id,
        owner: PlayerId(7),
        chunk,
        kind: "conveyor".into(),
        version,
        state: json!({"speed": version, "items": [1, 2]}),
    };
    s.put_structure(&mk(3, A, 1)).await.expect("put");
    s.put_structure(&mk(1, A, 1)).await.expect("put");
    s.put_structure(&mk(2, B, 1)).await.expect("put");
    s.put_structure(&mk(3, A, 2)).await.expect("update");
    assert!(matches!(s.put_structure(&mk(3, A, 2)).await, Err(StoreError::Stale { stored: 2, .. })));
    let in_a = s.structures_in_chunk(A).await.expect("list");
    assert_eq!(in_a, vec![mk(1, A, 1), mk(3, A, 2)]);
    assert!(s.delete_structure(1).await.expect("delete"));
    assert!(!s.delete_structure(1).await.expect("delete twice"));
    assert_eq!(s.structures_in_chunk(A).await.expect("list"), vec![mk(3, A, 2)]);
}

async fn topology_snapshots_never_go_back(f: Fixture) {
    let s = &f.store;
    let snap = |version: u64, byte: u8| TopologySnapshot { cluster: "mesh-a".into(), version, data: vec![byte; 300] };
    assert_eq!(s.load_topology("mesh-a").await.expect("read"), None);
    assert!(s.save_topology(&snap(5, 1)).await.expect("save"));
    assert!(!s.save_topology(&snap(3, 2)).await.expect("older refused"));
    assert!(!s.save_topology(&snap(5, 3)).await.expect("same refused"));
    assert_eq!(s.load_topology("mesh-a").await.expect("read"), Some(snap(5, 1)));
    assert!(s.save_topology(&snap(6, 4)).await.expect("newer"));
    assert_eq!(s.load_topology("mesh-a").await.expect("read"), Some(snap(6, 4)));
    assert_eq!(s.load_topology("mesh-b").await.expect("read"), None);
}

async fn transfer_log_keeps_every_transfer(f: Fixture) {
    let s = &f.store;
    let t = |id: u64, ms: u64, outcome: &str| TransferRecord {
        transfer_id: id,
        entity: u64::MAX - id,
        from_server: 1,
        to_server: 2,
        epoch: 10 + id,
        effective_tick: 1000 + id,
        outcome: outcome.into(),
        unix_ms: ms,
    };
    s.record_transfers(&[t(1, 100, "committed"), t(2, 200, "committed"), t(3, 300, "committed")])
        .await
        .expect("record");
    s.record_transfers(&[t(2, 250, "completed")]).await.expect("update");
    s.record_transfers(&[]).await.expect("nothing");
    let recent = s.recent_transfers(2).await.expect("read");
    assert_eq!(recent, vec![t(3, 300, "committed"), t(2, 250, "completed")]);
    assert_eq!(s.recent_transfers(10).await.expect("read").len(), 3);
}

async fn checkpoints_are_fenced_by_holding_and_found_by_place(f: Fixture) {
    let s = &f.store;
    // (entity, held since, epoch, tick, x, a byte of its components)
    let cp = |entity: u64, since: u64, epoch: u64, tick: u64, x: f64, byte: u8| Checkpoint {
        entity,
        held_since: since,
        epoch,
        tick,
        server: 7,
        region: (1, 4, 0, -3),
        pos: [x, 64.5, -10.25],
        components: vec![byte; 5],
        gone: false,
    };
    let write = |rows: Vec<Checkpoint>| async move { s.write_checkpoints(&rows).await.expect("write") };
    let (a, b) = (1u64, u64::MAX - 5);
    assert!(write(vec![]).await.is_empty());
    assert!(write(vec![cp(a, 50, 2, 100, 2010.0, 1), cp(b, 10, 1, 100, 2020.0, 2)]).await.is_empty());
    // The same holding, a newer tick: written; an older tick: refused. A
    // holder that handed it on, or was cut off, held it since earlier
    // than its successor: refused whatever its tick or epoch.
    assert!(write(vec![cp(a, 50, 2, 150, 2011.0, 3)]).await.is_empty());
    assert_eq!(write(vec![cp(a, 50, 2, 120, 2012.0, 4), cp(b, 5, 9, 900, 2021.0, 5)]).await, vec![a, b]);
    // Its successor (a handoff's target, from its effective tick).
    assert!(write(vec![cp(a, 140, 3, 140, 2013.0, 6)]).await.is_empty());
    assert_eq!(write(vec![cp(a, 50, 2, 400, 2013.0, 6)]).await, vec![a], "the old holder, late");
    let near = |min: [f64; 3], max: [f64; 3]| async move { s.checkpoints_within(min, max).await.expect("read") };
    assert_eq!(near([2000.0, 0.0, -100.0], [2015.0, 100.0, 0.0]).await, vec![cp(a, 140, 3, 140, 2013.0, 6)]);
    assert_eq!(
        near([2000.0, 0.0, -100.0], [2100.0, 100.0, 0.0]).await,
        vec![cp(a, 140, 3, 140, 2013.0, 6), cp(b, 10, 1, 100, 2020.0, 2)]
    );
    assert!(near([2013.0, 0.0, -100.0], [2020.0, 100.0, 0.0]).await.len() == 1, "min included, max excluded");
    // Gone: never resumed, and no older row brings it back; a later
    // holding (a player logging in again, at epoch 0 again) does.
    let tombstone = Checkpoint { gone: true, components: Vec::new(), ..cp(a, 140, 3, 200, 2013.0, 0) };
    assert!(write(vec![tombstone]).await.is_empty());
    assert_eq!(near([2000.0, 0.0, -100.0], [2100.0, 100.0, 0.0]).await, vec![cp(b, 10, 1, 100, 2020.0, 2)]);
    assert_eq!(write(vec![cp(a, 140, 3, 190, 2013.0, 7)]).await, vec![a]);
    assert!(write(vec![cp(a, 250, 0, 250, 2014.0, 8)]).await.is_empty());
    assert_eq!(near([2014.0, 0.0, -100.0], [2015.0, 100.0, 0.0]).await, vec![cp(a, 250, 0, 250, 2014.0, 8)]);
    // One row per entity a write.
    let twice = s.write_checkpoints(&[cp(9, 1, 1, 1, 0.0, 1), cp(9, 1, 1, 2, 0.0, 1)]).await;
    assert!(matches!(twice, Err(StoreError::Invalid(_))), "{twice:?}");
}

macro_rules! behaviour {
    ($($test:ident),* $(,)?) => {
        mod memory_store {
            $(#[tokio::test] async fn $test() { super::$test(super::memory().await).await })*
        }
        mod sqlite_store {
            $(#[tokio::test] async fn $test() { super::$test(super::sqlite().await).await })*
        }
        mod postgres_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::postgres().await).await })*
        }
    };
}

behaviour!(
    deltas_come_back_in_tick_writer_seq_order,
    a_retried_append_is_not_duplicated,
    compaction_keeps_the_chunk_and_reads_few_rows,
    out_of_chunk_deltas_are_refused,
    accounts_are_unique_by_name,
    sessions_expire_and_can_be_dropped,
    progress_versions_only_increase,
    structures_by_chunk_with_versions,
    topology_snapshots_never_go_back,
    transfer_log_keeps_every_transfer,
    checkpoints_are_fenced_by_holding_and_found_by_place,
);

// ---- what only the database stores have: schema, corrupt rows, outages ----

async fn raw_pg(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await.expect("raw sql");
    drop(client);
    let _ = task.await;
}

fn raw_sqlite(url: &str, sql: &str) {
    let path = url.strip_prefix("sqlite:").expect("sqlite url");
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch(sql).expect("raw sql");
}

async fn check_corrupt_rows_are_named_and_kept(f: Fixture, raw: impl AsyncFnOnce(&str, &str)) {
    f.store.append_deltas(1, 1, &[tick(1, vec![d(A, 9, Material::Wood)])]).await.expect("append");
    // A foreign row: format byte 7.
    raw(
        &f.url,
        "INSERT INTO world_delta_rows (cx, cy, cz, tick, writer, seq, deltas) VALUES (-1, 2, 3, 5, 1, 2, '\\x0700')",
    )
    .await;
    let err = f.store.chunk_deltas(A).await.expect_err("corrupt row refused");
    assert_eq!(err.kind(), "corrupt");
    let msg = err.to_string();
    assert!(msg.contains("chunk (-1,2,3) key (5,1,2)") && msg.contains("unknown delta format 7"), "{msg}");
    // Compaction refuses too, and leaves both rows where they are.
    assert_eq!(f.store.compact_chunk(A).await.expect_err("refused").kind(), "corrupt");
    let again = f.store.chunk_deltas(A).await.expect_err("still corrupt, still there");
    assert!(again.to_string().contains("key (5,1,2)"));
}

/// A row written without components (as before migration 3 added them)
/// reads back with none.
async fn check_progress_without_components_reads_as_none(f: Fixture, raw: impl AsyncFnOnce(&str, &str)) {
    raw(
        &f.url,
        "INSERT INTO player_progress (player_id, version, pos_x, pos_y, pos_z, inventory, stats, updated_unix_ms)
         VALUES (5, 9, 1.0, 2.0, 3.0, '[]', '{}', 0)",
    )
    .await;
    let p = f.store.load_progress(PlayerId(5)).await.expect("read").expect("saved");
    assert_eq!((p.version, p.position, p.components), (9, [1.0, 2.0, 3.0], Vec::new()));
}

async fn check_newer_schema_is_refused_untouched(f: Fixture, raw: impl AsyncFnOnce(&str, &str)) {
    f.store.create_account("keep", "h").await.expect("create");
    let future = migrations::LATEST + 5;
    raw(
        &f.url,
        &format!(
            "INSERT INTO schema_migrations (version, name, applied_unix_ms) VALUES ({future}, 'from the future', 0)"
        ),
    )
    .await;
    let err = persistence::open(&StoreConfig { url: f.url.clone(), ..Default::default() })
        .await
        .expect_err("newer schema refused");
    match &err {
        StoreError::SchemaTooNew { found, known } => assert_eq!((*found, *known), (future, migrations::LATEST)),
        other => panic!("expected SchemaTooNew, got {other}"),
    }
    assert!(err.to_string().contains("refusing to touch it"));
    assert!(f.store.account("keep").await.expect("read").is_some(), "nothing was dropped");
}

mod postgres_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_connections_verify_the_server() {
        let url = format!("{}?sslmode=require", testing::fresh_database().await);
        let tls = |ca: std::path::PathBuf| StoreConfig { url: url.clone(), ca_file: Some(ca), ..Default::default() };
        let store = persistence::open(&tls(testing::postgres_ca())).await.expect("TLS with the right CA");
        let a = store.create_account("tls", "h").await.expect("write over TLS");
        assert_eq!(store.account("tls").await.expect("read over TLS"), Some(a));

        // A CA that did not sign the server's certificate: refused, not ignored.
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("other-ca.pem");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
        std::fs::write(&other, ck.cert.pem()).expect("write");
        let err = persistence::open(&StoreConfig { connect_timeout: Duration::from_secs(3), ..tls(other) })
            .await
            .expect_err("an untrusted server certificate");
        let text = err.to_string().to_lowercase();
        assert!(text.contains("certificate") || text.contains("tls"), "{err}");
        // No CA in the file: a clear error before any connection.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = persistence::open(&tls(empty)).await.expect_err("no CA");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_rows_are_named_and_kept() {
        check_corrupt_rows_are_named_and_kept(postgres().await, async |u, s| raw_pg(u, s).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn newer_schema_is_refused_untouched() {
        check_newer_schema_is_refused_untouched(postgres().await, async |u, s| raw_pg(u, s).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_without_components_reads_as_none() {
        check_progress_without_components_reads_as_none(postgres().await, async |u, s| raw_pg(u, s).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_starts_migrate_once() {
        let url = testing::fresh_database().await;
        let opens = (0..4).map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { persistence::open(&StoreConfig { url, pool_size: 2, ..Default::default() }).await },
            )
        });
        for r in futures::future::join_all(opens).await {
            r.expect("task").expect("every concurrent start succeeds");
        }
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        let n: i64 = client.query_one("SELECT count(*) FROM schema_migrations", &[]).await.expect("count").get(0);
        assert_eq!(n, migrations::LATEST);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_a_quick_clear_error() {
        // Port 9 (discard) on loopback: nothing listens.
        let cfg = StoreConfig {
            url: "postgres://ps:hunter2@127.0.0.1:9/mesh".into(),
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let t0 = Instant::now();
        let err = persistence::open(&cfg).await.expect_err("unreachable");
        assert!(t0.elapsed() < Duration::from_secs(8), "took {:?}", t0.elapsed());
        let msg = err.to_string();
        assert!(err.is_transient() && msg.contains("127.0.0.1:9") && msg.contains("unreachable"), "{msg}");
        assert!(!msg.contains("hunter2"), "password leaked: {msg}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serialization_conflicts_are_retried() {
        // Many writers compacting and appending the same chunk at once: under
        // serializable isolation some transactions abort with 40001 and must
        // be retried, not surface as errors or lose rows.
        let f = postgres().await;
        let mut tasks = Vec::new();
        for w in 0..6u64 {
            let s = f.store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..15u64 {
                    s.append_deltas(w + 1, i, &[tick(i, vec![d(A, (w * 100 + i) as u32, Material::Brick)])]).await?;
                    s.compact_chunk(A).await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("no error survives the retries");
        }
        let all = f.store.chunk_deltas(A).await.expect("read");
        assert_eq!(fold_deltas(&all.deltas).len(), 6 * 15, "every delta kept exactly");
    }
}

mod sqlite_only {
    use super::*;

    #[tokio::test]
    async fn corrupt_rows_are_named_and_kept() {
        check_corrupt_rows_are_named_and_kept(sqlite().await, async |u, s| {
            raw_sqlite(u, &s.replace("'\\x0700'", "X'0700'"))
        })
        .await;
    }

    #[tokio::test]
    async fn newer_schema_is_refused_untouched() {
        check_newer_schema_is_refused_untouched(sqlite().await, async |u, s| raw_sqlite(u, s)).await;
    }

    #[tokio::test]
    async fn progress_without_components_reads_as_none() {
        check_progress_without_components_reads_as_none(sqlite().await, async |u, s| raw_sqlite(u, s)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_share_one_file() {
        // Two stores on one file stand for two processes of a local mesh.
        let f = sqlite().await;
        let other =
            persistence::open(&StoreConfig { url: f.url.clone(), ..Default::default() }).await.expect("second opener");
        let (a, b) = (f.store.clone(), other.clone());
        let w1 = tokio::spawn(async move {
            for i in 0..50u64 {
                a.append_deltas(1, i, &[tick(i, vec![d(A, i as u32, Material::Wood)])]).await.expect("append");
            }
        });
        let w2 = tokio::spawn(async move {
            for i in 0..50u64 {
                b.append_deltas(2, i, &[tick(i, vec![d(B, i as u32, Material::Metal)])]).await.expect("append");
            }
        });
        w1.await.expect("writer 1");
        w2.await.expect("writer 2");
        assert_eq!(other.chunk_deltas(A).await.expect("read").deltas.len(), 50);
        assert_eq!(f.store.chunk_deltas(B).await.expect("read").deltas.len(), 50);
    }

    #[tokio::test]
    async fn the_world_outlives_the_store() {
        let f = sqlite().await;
        f.store.append_deltas(1, 1, &[tick(1, vec![d(A, 1, Material::Ore)])]).await.expect("append");
        let url = f.url.clone();
        drop(f.store);
        let reopened = persistence::open(&StoreConfig { url, ..Default::default() }).await.expect("reopen");
        assert_eq!(reopened.chunk_deltas(A).await.expect("read").deltas, vec![d(A, 1, Material::Ore)]);
    }
}
