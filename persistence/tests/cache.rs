//! The Redis cache against the real Redis `scripts/test` starts, and
//! against none at all (every call degrades, nothing fails).

use std::sync::Arc;
use std::time::Duration;

use persistence::cache::{Cache, Op, Session, WorldEvent};
use persistence::testing;

fn cache() -> Arc<Cache> {
    // A namespace of its own: tests share one Redis.
    let ns = format!("ps-test-{:016x}", fastrand::u64(..));
    Arc::new(Cache::new(Some(&testing::redis_url()), &ns).expect("redis url"))
}

fn down() -> Cache {
    Cache::new(Some("redis://127.0.0.1:9/"), "down").expect("redis url")
}

#[tokio::test]
async fn sessions_directory_and_leaderboards_round_trip() {
    let c = cache();
    let s = Session { player: 7, account: "ada".into(), expires_unix: 4_000_000_000 };
    c.put_session("tok", &s, Duration::from_secs(60)).await;
    assert_eq!(c.session("tok").await.expect("ok"), Some(s));
    assert_eq!(c.session("other").await.expect("ok"), None);
    c.drop_session("tok").await;
    assert_eq!(c.session("tok").await.expect("ok"), None);

    c.set_location(7, 3).await;
    assert_eq!(c.location(7).await.expect("ok"), Some(3));
    assert_eq!(c.location(8).await.expect("ok"), None);

    c.add_score("dug", 1, 5.0).await;
    c.add_score("dug", 2, 9.0).await;
    c.add_score("dug", 1, 6.0).await;
    assert_eq!(c.top("dug", 10).await.expect("ok"), vec![(1, 11.0), (2, 9.0)]);
    assert_eq!(c.top("dug", 1).await.expect("ok"), vec![(1, 11.0)]);
    assert!(c.stats.up.load(std::sync::atomic::Ordering::Relaxed));
    assert!(Op::ALL.iter().all(|op| c.stats.degraded(*op) == 0));
}

#[tokio::test]
async fn rate_limits_are_shared_through_redis() {
    // Two processes of one mesh (same namespace) count against one limit.
    let ns = format!("ps-test-{:016x}", fastrand::u64(..));
    let a = Cache::new(Some(&testing::redis_url()), &ns).expect("a");
    let b = Cache::new(Some(&testing::redis_url()), &ns).expect("b");
    let mut allowed = 0;
    for i in 0..10 {
        let c = if i % 2 == 0 { &a } else { &b };
        // An hour-long window: the test cannot straddle two of them in practice.
        allowed += usize::from(c.allow("login:ada", 6, Duration::from_secs(3600)).await);
    }
    assert_eq!(allowed, 6);
    assert_eq!(a.stats.degraded(Op::RateLimit) + b.stats.degraded(Op::RateLimit), 0);
}

#[tokio::test]
async fn a_value_of_the_wrong_shape_is_named_and_left_alone() {
    let c = cache();
    let raw = redis::Client::open(testing::redis_url()).expect("client");
    let mut conn = raw.get_multiplexed_async_connection().await.expect("connect");
    let key = format!("{}:session:bad", c.namespace());
    let _: () = redis::cmd("SET").arg(&key).arg("{not json").query_async(&mut conn).await.expect("set");
    let err = c.session("bad").await.expect_err("wrong shape refused");
    assert!(err.to_string().contains(&key), "{err}");
    let still: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("get");
    assert_eq!(still, "{not json", "left as it is");
    // A list where a string belongs: Redis says WRONGTYPE; a miss, not a crash.
    let loc_key = format!("{}:where:9", c.namespace());
    let _: () = redis::cmd("RPUSH").arg(&loc_key).arg("a").query_async(&mut conn).await.expect("rpush");
    assert_eq!(c.location(9).await.expect("a miss"), None);
    let kind: String = redis::cmd("TYPE").arg(&loc_key).query_async(&mut conn).await.expect("type");
    assert_eq!(kind, "list", "left as it is");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn world_events_reach_every_subscriber() {
    let ns = format!("ps-test-{:016x}", fastrand::u64(..));
    let a = Arc::new(Cache::new(Some(&testing::redis_url()), &ns).expect("a"));
    let b = Arc::new(Cache::new(Some(&testing::redis_url()), &ns).expect("b"));
    let mut rx = b.subscribe(16);
    let e = WorldEvent::Notice { text: "restart in 5 min".into() };
    // Subscription is asynchronous: publish until someone hears.
    let mut delivered = 0;
    for _ in 0..50 {
        delivered = a.publish(&e).await.expect("redis up");
        if delivered > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered, 1);
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("in time").expect("open");
    assert_eq!(got, e);
}

#[tokio::test]
async fn without_redis_everything_degrades_and_nothing_fails() {
    let c = down();
    let s = Session { player: 1, account: "a".into(), expires_unix: 1 };
    c.put_session("t", &s, Duration::from_secs(60)).await;
    assert_eq!(c.session("t").await.expect("a miss"), None);
    c.set_location(1, 2).await;
    assert_eq!(c.location(1).await.expect("a miss"), None);
    c.add_score("b", 1, 1.0).await;
    assert_eq!(c.top("b", 5).await.expect("empty"), vec![]);
    assert_eq!(c.publish(&WorldEvent::Chat { from: 1, name: "ada".into(), text: "hi".into() }).await, None);
    // Rate limits fall back to this process's counters.
    let allowed = futures_count(&c).await;
    assert_eq!(allowed, 3);
    assert!(!c.stats.up.load(std::sync::atomic::Ordering::Relaxed));
    for op in [Op::Session, Op::Directory, Op::RateLimit, Op::Leaderboard, Op::Events] {
        assert!(c.stats.degraded(op) >= 1, "{op:?} not counted");
    }
    let none = Cache::new(None, "none").expect("no url");
    assert_eq!(none.session("t").await.expect("a miss"), None);
}

async fn futures_count(c: &Cache) -> usize {
    let mut n = 0;
    for _ in 0..5 {
        n += usize::from(c.allow("login:x", 3, Duration::from_secs(60)).await);
    }
    n
}
