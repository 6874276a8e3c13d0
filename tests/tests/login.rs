//! Logins end to end: accounts and passwords at the coordinator, signed
//! tickets checked by game servers offline, the Redis session cache and
//! directory, and what still works when Redis dies.
//!
//! The game servers here take no development token: only tickets get in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use glam::DVec3;
use integration_tests::player::TestPlayer;
use integration_tests::redis::PrivateRedis;
use integration_tests::{Mesh, blocking_text, metric};
use persistence::cache::Cache;
use serde_json::{Value, json};
use shared::PlayerId;
use shared::wire::{ClientControl, JoinRole, PROTOCOL_VERSION, ServerControl};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// POSTs JSON to the coordinator; the status and the JSON answer.
async fn post(mesh_http: &str, path: &str, bearer: Option<&str>, body: Value) -> anyhow::Result<(u16, Value)> {
    integration_tests::post_json(&format!("http://{mesh_http}{path}"), bearer, &body).await
}

async fn get(mesh_http: &str, path: &str) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("http://{mesh_http}{path}")).await?.error_for_status()?.json().await?)
}

fn hello(player: u64, ticket: &str, role: JoinRole) -> ClientControl {
    ClientControl::Hello {
        version: PROTOCOL_VERSION,
        schema: shared::component::Registry::builtin().schema(),
        ticket: ticket.to_owned(),
        player: PlayerId(player),
        name: "ignored: the ticket names the player".into(),
        role,
        // Ignored too: a ticket's spawn point is the coordinator's choice.
        spawn: Some(DVec3::new(3000.0, 10.0, 500.0)),
    }
}

async fn join(join: &Value, player: u64, role: JoinRole) -> anyhow::Result<(TestPlayer, ServerControl)> {
    let quic: SocketAddr = join["quic"].as_str().context("quic")?.parse()?;
    let ticket = join["ticket"].as_str().context("ticket")?;
    TestPlayer::hello(quic, join["cert_sha256"].as_str().context("cert")?, hello(player, ticket, role)).await
}

fn refusal(answer: &ServerControl) -> String {
    match answer {
        ServerControl::Refused { reason } => reason.clone(),
        other => format!("not refused: {other:?}"),
    }
}

fn server_metrics(mesh: &Mesh, i: usize) -> String {
    let addr = mesh.servers[i].1["metrics"].as_str().expect("metrics address in the ports file");
    blocking_text(&format!("http://{addr}/metrics")).expect("game-server metrics")
}

#[test]
fn players_log_in_and_join_with_tickets_and_logins_survive_redis_dying() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = PrivateRedis::start(dir.path())?;
    let cluster = format!("login-{}", std::process::id());
    let redis_arg = format!("--redis-url={}", redis.url());
    let cluster_arg = format!("--cluster={cluster}");
    // Polling logins below would trip the 10-a-minute limit per name (tested
    // in the coordinator's unit tests).
    let mesh =
        Mesh::start_with(2, &[&redis_arg, &cluster_arg, "--logins-per-name=1000"], &["--dev-token=", &redis_arg])?;
    mesh.wait_regions_owned()?;
    let http = mesh.http.clone();
    let rt = runtime();
    let cache = Cache::new(Some(&redis.url()), &cluster).map_err(anyhow::Error::msg)?;

    rt.block_on(async {
        // Accounts: created once, names checked, passwords never stored.
        let (s, acc) = post(&http, "/v1/accounts", None, json!({"name": "ada", "password": "correct horse"})).await?;
        assert_eq!(s, 201, "{acc}");
        let player = acc["player"].as_u64().context("player id")?;
        let (s, v) = post(&http, "/v1/accounts", None, json!({"name": "ada", "password": "another horse"})).await?;
        assert_eq!((s, v["error"].as_str()), (409, Some("name_taken")), "{v}");
        let (s, v) = post(&http, "/v1/accounts", None, json!({"name": "a d", "password": "correct horse"})).await?;
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
        let (s, v) = post(&http, "/v1/accounts", None, json!({"name": "ada"})).await?;
        assert_eq!(s, 400, "a body without a password: {v}");

        // Logins: a wrong password and an unknown name look the same.
        let (s, v) = post(&http, "/v1/login", None, json!({"name": "ada", "password": "wrong horse"})).await?;
        assert_eq!((s, v["error"].as_str()), (401, Some("bad_credentials")), "{v}");
        let (s, v) = post(&http, "/v1/login", None, json!({"name": "nobody", "password": "wrong horse"})).await?;
        assert_eq!((s, v["error"].as_str()), (401, Some("bad_credentials")), "{v}");

        // A first login may choose where to start, inside the world.
        let (s, v) = post(
            &http,
            "/v1/login",
            None,
            json!({"name": "ada", "password": "correct horse", "spawn": [-5.0, 0.0, 0.0]}),
        )
        .await?;
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "outside the world: {v}");
        let start = [2600.0, 10.0, 700.0];
        let (s, login) =
            post(&http, "/v1/login", None, json!({"name": "ada", "password": "correct horse", "spawn": start})).await?;
        assert_eq!(s, 200, "{login}");
        assert_eq!(login["player"].as_u64(), Some(player));
        let session = login["session"].as_str().context("session")?.to_owned();
        let j = &login["join"];
        let home = j["server_id"].as_u64().context("server id")? as u32;
        let routed = get(&http, "/v1/route?x=2600&y=10&z=700").await?;
        assert_eq!(routed["server_id"].as_u64(), Some(u64::from(home)), "the ticket names the owner of the spawn");

        // The ticket gets in, once.
        let (mut p, answer) = join(j, player, JoinRole::Play).await?;
        assert!(matches!(answer, ServerControl::Welcome { authoritative: true, .. }), "{answer:?}");
        let (_again, answer) = join(j, player, JoinRole::Play).await?;
        assert!(refusal(&answer).starts_with("ticket_replayed"), "{answer:?}");
        // The directory says where the player is.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.location(player).await? != Some(home) {
            anyhow::ensure!(Instant::now() < deadline, "the directory never named server {home}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A forged ticket (one character of the signature changed, inside it:
        // the last base64 character also carries padding bits, and changing
        // those makes a malformed ticket rather than a forged one) and a
        // ticket for another server.
        let ticket = j["ticket"].as_str().unwrap();
        let mut forged = ticket.as_bytes().to_vec();
        let i = forged.len() - 10;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        let mut fj = j.clone();
        fj["ticket"] = Value::String(forged);
        let (_f, answer) = join(&fj, player, JoinRole::Play).await?;
        assert!(refusal(&answer).starts_with("ticket_forged"), "{answer:?}");

        let other = get(&http, "/v1/servers")
            .await?
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["server_id"].as_u64().unwrap() as u32)
            .find(|id| *id != home)
            .context("a second server")?;
        let (s, standby) =
            post(&http, "/v1/tickets", Some(&session), json!({"role": "standby", "server_id": other})).await?;
        assert_eq!(s, 200, "a session buys tickets: {standby}");
        let mut wrong = standby.clone();
        wrong["quic"] = j["quic"].clone();
        wrong["cert_sha256"] = j["cert_sha256"].clone();
        let (_w, answer) = join(&wrong, player, JoinRole::Standby).await?;
        assert!(refusal(&answer).starts_with("ticket_wrong_server"), "{answer:?}");
        let (_s, answer) = join(&standby, player, JoinRole::Standby).await?;
        assert!(matches!(answer, ServerControl::Welcome { authoritative: false, .. }), "pre-connect: {answer:?}");
        let (s, v) = post(&http, "/v1/tickets", Some("0123456789abcdef0123456789abcdef"), json!({})).await?;
        assert_eq!((s, v["error"].as_str()), (401, Some("bad_session")), "{v}");
        for bad in [json!({"role": "standby"}), json!({"role": "spectator"})] {
            let (s, v) = post(&http, "/v1/tickets", Some(&session), bad).await?;
            assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
        }

        // Leaving saves where the player was; the next login starts there,
        // whatever spawn it asks for, and the directory forgets the player.
        p.send(&ClientControl::Bye).await?;
        drop(p);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = post(
                &http,
                "/v1/login",
                None,
                json!({"name": "ada", "password": "correct horse", "spawn": [3100.0, 10.0, 900.0]}),
            )
            .await?;
            assert_eq!(s, 200, "{v}");
            let spawn: Vec<f64> = serde_json::from_value(v["join"]["spawn"].clone())?;
            if (spawn[0] - start[0]).abs() < 1.0 && (spawn[2] - start[2]).abs() < 1.0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the saved position never came back: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.location(player).await?.is_some() {
            anyhow::ensure!(Instant::now() < deadline, "the directory kept the player after it left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The directory routes a login to the server holding the avatar (as
        // after a handoff), not to the owner of the saved position. A stale
        // entry heals: that server refuses a spawn it does not own, and
        // forgets the player when the refused connection ends.
        cache.set_location(player, other).await;
        let creds = json!({"name": "ada", "password": "correct horse"});
        let (s, v) = post(&http, "/v1/login", None, creds.clone()).await?;
        assert_eq!((s, v["join"]["server_id"].as_u64()), (200, Some(u64::from(other))), "{v}");
        let (_stale, answer) = join(&v["join"], player, JoinRole::Play).await?;
        assert!(refusal(&answer).starts_with("not_owner"), "{answer:?}");
        drop(_stale);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (s, v) = post(&http, "/v1/login", None, creds.clone()).await?;
            assert_eq!(s, 200, "{v}");
            if v["join"]["server_id"].as_u64() == Some(u64::from(home)) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the stale directory entry never healed: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Redis dies. Logins, sessions and joins still work (sessions from the
    // database); both processes count the degraded calls.
    redis.kill();
    rt.block_on(async {
        let (s, login) = post(&http, "/v1/login", None, json!({"name": "ada", "password": "correct horse"})).await?;
        assert_eq!(s, 200, "login without Redis: {login}");
        let player = login["player"].as_u64().unwrap();
        let (p, answer) = join(&login["join"], player, JoinRole::Play).await?;
        assert!(matches!(answer, ServerControl::Welcome { .. }), "join without Redis: {answer:?}");
        let session = login["session"].as_str().unwrap();
        let (s, v) = post(&http, "/v1/tickets", Some(session), json!({})).await?;
        assert_eq!(s, 200, "a session without Redis: {v}");
        let (s, v) = post(&http, "/v1/logout", Some(session), json!({})).await?;
        assert_eq!(s, 204, "{v}");
        let (s, v) = post(&http, "/v1/tickets", Some(session), json!({})).await?;
        assert_eq!((s, v["error"].as_str()), (401, Some("bad_session")), "logged out: {v}");
        // Logging out again (an unknown session) changes nothing, as documented.
        let (s, v) = post(&http, "/v1/logout", Some(session), json!({})).await?;
        assert_eq!(s, 204, "{v}");
        let (s, acc) = post(&http, "/v1/accounts", None, json!({"name": "bob", "password": "correct horse"})).await?;
        assert_eq!(s, 201, "sign-ups without Redis: {acc}");
        drop(p);
        Ok::<_, anyhow::Error>(())
    })?;
    let coord = blocking_text(&format!("http://{}/metrics", mesh.http))?;
    assert_eq!(metric(&coord, "cache_up", ""), 0.0, "{coord}");
    assert!(metric(&coord, "cache_degraded_total", r#"op="session""#) >= 1.0);
    assert!(metric(&coord, "cache_degraded_total", r#"op="rate_limit""#) >= 1.0);
    assert!(metric(&coord, "auth_requests_total", r#"outcome="login""#) >= 3.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (0..2).all(|i| metric(&server_metrics(&mesh, i), "cache_degraded_total", r#"op="directory""#) < 1.0) {
        anyhow::ensure!(Instant::now() < deadline, "no game server counted a directory call without Redis");
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused: f64 = (0..2)
        .map(|i| {
            let m = server_metrics(&mesh, i);
            ["ticket_replayed", "ticket_forged", "ticket_wrong_server"]
                .iter()
                .map(|r| metric(&m, "player_connections_refused_total", &format!(r#"reason="{r}""#)))
                .sum::<f64>()
        })
        .sum();
    assert_eq!(refused, 3.0, "each refusal counted once by reason");
    Ok(())
}

#[test]
fn expired_tickets_are_refused() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(1, &["--ticket-ttl-s=5"], &["--dev-token="])?;
    mesh.wait_regions_owned()?;
    let rt = runtime();
    rt.block_on(async {
        let (s, _) =
            post(&mesh.http, "/v1/accounts", None, json!({"name": "eve", "password": "correct horse"})).await?;
        assert_eq!(s, 201);
        let (s, login) =
            post(&mesh.http, "/v1/login", None, json!({"name": "eve", "password": "correct horse"})).await?;
        assert_eq!(s, 200, "{login}");
        let player = login["player"].as_u64().unwrap();
        // 5 s of validity and 5 s of leeway for clock skew.
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let (_p, answer) = join(&login["join"], player, JoinRole::Play).await?;
        assert!(refusal(&answer).starts_with("ticket_expired"), "{answer:?}");
        // The development token is off on these servers.
        let mut dev = login["join"].clone();
        dev["ticket"] = Value::String(integration_tests::DEV_TOKEN.into());
        let (_p, answer) = join(&dev, player, JoinRole::Play).await?;
        assert!(refusal(&answer).starts_with("ticket_malformed"), "{answer:?}");
        Ok(())
    })
}
