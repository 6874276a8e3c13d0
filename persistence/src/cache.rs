//! Redis: the session cache, the player → server directory, rate-limit
//! counters, leaderboards and cross-server world events (pub/sub).
//!
//! Redis is never the only copy of anything and never a reason to fail: when
//! it is unreachable (or answers slowly, past 500 ms), every call degrades —
//! sessions and directory lookups miss (callers fall back to the database or
//! the coordinator), rate limits are counted in this process, leaderboard
//! writes are dropped, events are not delivered — and `degraded` counts it
//! per operation. A value of the wrong type or shape is an error naming the
//! key, and is left as it is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tracing::warn;

pub use crate::model::Session;

/// A cross-server world event (chat, server notices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorldEvent {
    Chat { from: u64, name: String, text: String },
    Notice { text: String },
}

/// Why a cached value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis key {key} holds a value of the wrong type or shape: {reason}")]
    WrongValue { key: String, reason: String },
}

/// Operations, for the `degraded` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Session,
    Directory,
    RateLimit,
    Leaderboard,
    Events,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Session, Op::Directory, Op::RateLimit, Op::Leaderboard, Op::Events];

    /// Stable metric label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Session => "session",
            Op::Directory => "directory",
            Op::RateLimit => "rate_limit",
            Op::Leaderboard => "leaderboard",
            Op::Events => "events",
        }
    }
}

/// How Redis is doing, for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub up: AtomicBool,
    degraded: [AtomicU64; 5],
}

impl CacheStats {
    /// Calls served without Redis, for `op`.
    pub fn degraded(&self, op: Op) -> u64 {
        self.degraded[op as usize].load(Ordering::Relaxed)
    }
}

/// How long one Redis call (or a Sentinel's answer) may take before it is
/// counted degraded and served without Redis (connecting gets twice this),
/// so a slow Redis degrades like a missing one instead of stalling callers.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The pause before trying to reach Redis again after it failed, so calls
/// made while it is down degrade at once instead of each waiting to connect.
const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// Where Redis is: one server, or the master a group of Sentinels names
/// (`redis+sentinel://host:26379,host:26379/<master name>`), looked up again
/// after every connection failure so that a failover is followed.
#[derive(Debug, Clone)]
enum Source {
    Direct(redis::Client),
    Sentinel { sentinels: Vec<String>, master: String },
}

impl Source {
    fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return redis::Client::open(url).map(Source::Direct).map_err(|e| format!("redis URL: {e}"));
        };
        let (hosts, master) = rest.split_once('/').ok_or("redis+sentinel URL: no master name after the hosts")?;
        let master = master.trim_end_matches('/');
        let sentinels: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}/")).collect();
        if sentinels.is_empty() || master.is_empty() || master.contains(['/', '?']) {
            return Err(format!("redis+sentinel URL {url:?}: expected redis+sentinel://host:port[,host:port…]/master"));
        }
        for s in &sentinels {
            redis::Client::open(s.as_str()).map_err(|e| format!("redis+sentinel URL: {s}: {e}"))?;
        }
        Ok(Source::Sentinel { sentinels, master: master.to_owned() })
    }

    /// A client for the current master.
    async fn client(&self) -> Result<redis::Client, String> {
        let (sentinels, master) = match self {
            Source::Direct(c) => return Ok(c.clone()),
            Source::Sentinel { sentinels, master } => (sentinels, master),
        };
        let mut last = String::from("no sentinel");
        for s in sentinels {
            let ask = async {
                let mut c = redis::Client::open(s.as_str())?.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(master)
                    .query_async::<Option<(String, u16)>>(&mut c)
                    .await
            };
            match tokio::time::timeout(TIMEOUT, ask).await {
                Ok(Ok(Some((host, port)))) => {
                    return redis::Client::open(format!("redis://{host}:{port}/")).map_err(|e| e.to_string());
                }
                Ok(Ok(None)) => last = format!("{s} knows no master {master:?}"),
                Ok(Err(e)) => last = format!("{s}: {e}"),
                Err(_) => last = format!("{s} did not answer"),
            }
        }
        Err(last)
    }
}

#[derive(Debug)]
pub struct Cache {
    source: Option<Source>,
    /// Prefix of every key and channel (one Redis can serve several meshes).
    ns: String,
    conn: tokio::sync::Mutex<(Option<ConnectionManager>, Option<Instant>)>,
    local_limits: Mutex<HashMap<String, (Instant, u64)>>,
    pub stats: CacheStats,
}

impl Cache {
    /// A cache on `url` (`redis://…`), or none at all with `None`: every
    /// call then degrades. Never fails: an unreachable Redis is retried
    /// every 2 s from the calls that need it.
    pub fn new(url: Option<&str>, namespace: &str) -> Result<Self, String> {
        let source = url.map(Source::parse).transpose()?;
        Ok(Self {
            source,
            ns: namespace.to_owned(),
            conn: tokio::sync::Mutex::new((None, None)),
            local_limits: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
        })
    }

    /// The prefix of every key and channel of this cache.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.ns.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        let source = self.source.as_ref()?;
        let mut g = self.conn.lock().await;
        if let Some(c) = &g.0 {
            return Some(c.clone());
        }
        if g.1.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            return None;
        }
        g.1 = Some(Instant::now());
        let client = match source.client().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "no redis master from the sentinels; degrading");
                return None;
            }
        };
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        match tokio::time::timeout(TIMEOUT * 2, ConnectionManager::new_with_config(client.clone(), cfg)).await {
            Ok(Ok(c)) => {
                g.0 = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                warn!(error = %e, "redis unreachable; degrading");
                None
            }
            Err(_) => {
                warn!("redis did not answer; degrading");
                None
            }
        }
    }

    /// Drops the connection: the next call (after the reconnect pause) looks
    /// the master up again.
    async fn forget_connection(&self) {
        self.conn.lock().await.0 = None;
    }

    /// Runs `f` on Redis; `None` (counted as degraded) when Redis is down.
    async fn run<T, F, Fut>(&self, op: Op, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let out = match self.connection().await {
            Some(c) => match tokio::time::timeout(TIMEOUT, f(c)).await {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) if e.code() == Some("READONLY") => {
                    // A replica now (a Sentinel failover): find the master.
                    warn!(op = op.label(), "redis is a read-only replica now; looking for the master");
                    self.forget_connection().await;
                    None
                }
                Ok(Err(e))
                    if !(e.is_io_error()
                        || e.is_timeout()
                        || e.is_connection_refusal()
                        || e.is_connection_dropped()) =>
                {
                    // Redis answered: the value is of the wrong type (or
                    // the command wrong). Callers see a miss; nothing is
                    // overwritten.
                    warn!(op = op.label(), error = %e, "redis refused the command (wrong value type?); left as it is");
                    self.stats.up.store(true, Ordering::Relaxed);
                    return None;
                }
                Ok(Err(_)) | Err(_) => {
                    if matches!(self.source, Some(Source::Sentinel { .. })) {
                        self.forget_connection().await;
                    }
                    None
                }
            },
            None => None,
        };
        self.stats.up.store(out.is_some(), Ordering::Relaxed);
        if out.is_none() {
            self.stats.degraded[op as usize].fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    // ---- sessions ----

    pub async fn put_session(&self, token: &str, s: &Session, ttl: Duration) {
        let (key, val) = (self.key(&["session", token]), serde_json::to_string(s).unwrap_or_default());
        let secs = ttl.as_secs().max(1);
        self.run(Op::Session, |mut c| async move { c.set_ex::<_, _, ()>(key, val, secs).await }).await;
    }

    /// The cached session, `Ok(None)` on a miss or when Redis is down.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, CacheError> {
        let key = self.key(&["session", token]);
        let k = key.clone();
        let raw: Option<Option<String>> = self.run(Op::Session, |mut c| async move { c.get(k).await }).await;
        match raw.flatten() {
            None => Ok(None),
            Some(v) => {
                serde_json::from_str(&v).map(Some).map_err(|e| CacheError::WrongValue { key, reason: e.to_string() })
            }
        }
    }

    pub async fn drop_session(&self, token: &str) {
        let key = self.key(&["session", token]);
        self.run(Op::Session, |mut c| async move { c.del::<_, ()>(key).await }).await;
    }

    // ---- player → server directory ----

    pub async fn set_location(&self, player: u64, server: u32) {
        let key = self.key(&["where", &player.to_string()]);
        self.run(Op::Directory, |mut c| async move { c.set_ex::<_, _, ()>(key, server, 3600).await }).await;
    }

    /// Forgets where the player is, if the entry still names `server` (a
    /// later join elsewhere is left alone).
    pub async fn clear_location(&self, player: u64, server: u32) {
        let key = self.key(&["where", &player.to_string()]);
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        self.run(Op::Directory, |mut c| async move { script.key(key).arg(server).invoke_async::<i64>(&mut c).await })
            .await;
    }

    /// The server the player was last seen on; `Ok(None)` on a miss or when Redis is down.
    pub async fn location(&self, player: u64) -> Result<Option<u32>, CacheError> {
        let key = self.key(&["where", &player.to_string()]);
        let k = key.clone();
        let raw: Option<Option<String>> = self.run(Op::Directory, |mut c| async move { c.get(k).await }).await;
        match raw.flatten() {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| CacheError::WrongValue { key, reason: format!("{v:?}: {e}") }),
        }
    }

    // ---- rate limits ----

    /// Counts one event against `limit` per `window` for `subject`; whether
    /// it is allowed. Fixed windows, shared by every process through Redis,
    /// or per process while Redis is down.
    pub async fn allow(&self, subject: &str, limit: u64, window: Duration) -> bool {
        let secs = window.as_secs().max(1);
        let slot = crate::migrations::now_unix_ms() as u64 / 1000 / secs;
        let key = self.key(&["rate", subject, &slot.to_string()]);
        let k = key.clone();
        let counted = self
            .run(Op::RateLimit, |mut c| async move {
                let (n,): (u64,) = redis::pipe()
                    .atomic()
                    .incr(&k, 1u64)
                    .expire(&k, secs as i64 + 1)
                    .ignore()
                    .query_async(&mut c)
                    .await?;
                Ok(n)
            })
            .await;
        let n = match counted {
            Some(n) => n,
            None => {
                let mut local = self.local_limits.lock().unwrap_or_else(|p| p.into_inner());
                local.retain(|_, (t, _)| t.elapsed() < window * 2);
                let e = local.entry(key).or_insert((Instant::now(), 0));
                e.1 += 1;
                e.1
            }
        };
        n <= limit
    }

    // ---- leaderboards ----

    pub async fn add_score(&self, board: &str, player: u64, delta: f64) {
        let key = self.key(&["board", board]);
        self.run(Op::Leaderboard, |mut c| async move { c.zincr::<_, _, _, ()>(key, player, delta).await }).await;
    }

    /// The `n` best (player, score), best first; empty when Redis is down.
    pub async fn top(&self, board: &str, n: usize) -> Result<Vec<(u64, f64)>, CacheError> {
        let key = self.key(&["board", board]);
        let k = key.clone();
        let raw: Option<Vec<(String, f64)>> =
            self.run(Op::Leaderboard, |mut c| async move { c.zrevrange_withscores(k, 0, n as isize - 1).await }).await;
        raw.unwrap_or_default()
            .into_iter()
            .map(|(p, s)| {
                p.parse()
                    .map(|p| (p, s))
                    .map_err(|e| CacheError::WrongValue { key: key.clone(), reason: format!("member {p:?}: {e}") })
            })
            .collect()
    }

    // ---- cross-server events ----

    /// Publishes to every server subscribed; returns how many received it
    /// (`None` when Redis is down: the event is not delivered).
    pub async fn publish(&self, event: &WorldEvent) -> Option<u64> {
        let (ch, msg) = (self.key(&["events"]), serde_json::to_string(event).unwrap_or_default());
        self.run(Op::Events, |mut c| async move { c.publish(ch, msg).await }).await
    }

    /// Delivers this mesh's world events into a channel until it is closed,
    /// resubscribing after Redis outages. Malformed messages are skipped
    /// (and logged).
    pub fn subscribe(self: &std::sync::Arc<Self>, buffer: usize) -> tokio::sync::mpsc::Receiver<WorldEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(buffer);
        let me = self.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let Some(source) = me.source.clone() else { return };
            let channel = me.key(&["events"]);
            while !tx.is_closed() {
                let pubsub = match source.client().await {
                    Ok(client) => tokio::time::timeout(TIMEOUT * 2, client.get_async_pubsub()).await.ok(),
                    Err(_) => None,
                };
                let Some(Ok(mut pubsub)) = pubsub else {
                    me.stats.degraded[Op::Events as usize].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(RECONNECT_EVERY).await;
                    continue;
                };
                if pubsub.subscribe(&channel).await.is_err() {
                    tokio::time::sleep(RECONNECT_EVERY).await;
                    continue;
                }
                let mut stream = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            match serde_json::from_slice::<WorldEvent>(msg.get_payload_bytes()) {
                                Ok(e) => {
                                    if tx.send(e).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => warn!(channel = %channel, error = %e, "malformed world event skipped"),
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        rx
    }
}

/// Exports a cache's health as Prometheus metrics: `cache_up` (whether the
/// last call reached Redis) and `cache_degraded_total{op}` (calls served
/// without Redis).
#[derive(Debug, Clone)]
pub struct CacheCollector {
    cache: std::sync::Arc<Cache>,
    up: prometheus::IntGauge,
    degraded: prometheus::IntCounterVec,
}

impl CacheCollector {
    pub fn new(cache: std::sync::Arc<Cache>) -> Self {
        let up = prometheus::IntGauge::new("cache_up", "Whether the last call to Redis succeeded (0 while degraded)")
            .expect("static metric definition");
        let degraded = prometheus::IntCounterVec::new(
            prometheus::Opts::new("cache_degraded_total", "Cache calls served without Redis, by operation"),
            &["op"],
        )
        .expect("static metric definition");
        for op in Op::ALL {
            degraded.with_label_values(&[op.label()]);
        }
        Self { cache, up, degraded }
    }
}

impl prometheus::core::Collector for CacheCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.up.desc();
        d.extend(self.degraded.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let stats = &self.cache.stats;
        self.up.set(i64::from(stats.up.load(Ordering::Relaxed)));
        for op in Op::ALL {
            let c = self.degraded.with_label_values(&[op.label()]);
            let now = stats.degraded(op);
            let seen = c.get();
            if now > seen {
                c.inc_by(now - seen);
            }
        }
        let mut out = self.up.collect();
        out.extend(self.degraded.collect());
        out
    }
}
