//! Redis behind Sentinel, as the chart's production Redis runs: the mesh's
//! cache finds the master through the Sentinels (`redis+sentinel://`), and
//! after the master dies and the Sentinel promotes the replica, it finds
//! the new master and its writes go on.

use std::time::{Duration, Instant};

use integration_tests::redis::PrivateRedis;
use persistence::cache::Cache;
use persistence::model::Session;

fn session(player: u64) -> Session {
    Session { player, account: format!("p{player}"), expires_unix: 4_000_000_000 }
}

async fn role(port: u16) -> String {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connects");
    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut c).await.expect("info");
    info.lines().find_map(|l| l.strip_prefix("role:")).unwrap_or("?").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_a_sentinel_failover() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let master = PrivateRedis::start(dir.path())?;
    let replica_of = format!("127.0.0.1 {}", master.port);
    let replica = PrivateRedis::start_with(dir.path(), &["--replicaof", &replica_of])?;
    let sentinel = PrivateRedis::sentinel(dir.path(), "mymaster", master.port)?;

    let cache = Cache::new(Some(&format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port)), "sentinel-test")
        .map_err(anyhow::Error::msg)?;
    cache.put_session("before", &session(1), Duration::from_secs(60)).await;
    assert_eq!(cache.session("before").await?, Some(session(1)), "written through the master the sentinel named");
    assert!(Cache::new(Some("redis+sentinel://127.0.0.1:1"), "x").is_err(), "no master name: refused");

    // Wait until the replica has the data, then kill the master: the
    // sentinel notices within a second and promotes the replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    let replica_client = redis::Client::open(format!("redis://127.0.0.1:{}/", replica.port))?;
    let mut rc = replica_client.get_multiplexed_async_connection().await?;
    loop {
        let copied: Option<String> = redis::cmd("GET").arg("sentinel-test:session:before").query_async(&mut rc).await?;
        if copied.is_some() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut master = master;
    master.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(replica.port).await != "master" {
        anyhow::ensure!(Instant::now() < deadline, "the replica was never promoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Writes go on, to the new master, within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 2;
    loop {
        cache.put_session(&format!("after-{n}"), &session(n), Duration::from_secs(60)).await;
        if cache.session(&format!("after-{n}")).await? == Some(session(n)) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the cache never wrote to the new master");
        n += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", replica.port))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let stored: Option<String> =
        redis::cmd("GET").arg(format!("sentinel-test:session:after-{n}")).query_async(&mut c).await?;
    assert!(stored.is_some(), "the write is on the promoted replica");
    assert_eq!(cache.session("before").await?, Some(session(1)), "what was written before the failover is kept");
    Ok(())
}
