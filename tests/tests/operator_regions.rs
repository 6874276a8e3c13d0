//! Operator changes to the region map on a live mesh, as real processes:
//! draining the server two bots play on hands them to the other server
//! without dropping them; a split and a merge of the region they are in
//! (kept by its owner) do not disturb them; writes that would break an
//! invariant are refused with a clear HTTP error and change nothing.

use std::time::Duration;

use integration_tests::{Mesh, Proc, walkable_line};
use serde_json::{Value, json};

const TOKEN: &str = "ops-token";

fn owner_of(regions: &Value, key: &str) -> Option<u64> {
    regions.as_array()?.iter().find(|r| r["region"] == key)?["server_id"].as_u64()
}

#[test]
fn drain_hands_players_over_and_bad_operator_writes_change_nothing() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with(2, &[&format!("--admin-token={TOKEN}")], &["--walk-speed=4"])?;
    let regions = mesh.wait_regions_owned()?;
    let first = owner_of(&regions, "L0:0,0,0").expect("region 0 owned");
    let second = owner_of(&regions, "L0:1,0,0").expect("region 1 owned");
    assert_ne!(first, second);

    // Refusals first, each with its reason, none changing the map.
    let refusals: [(&str, Option<&str>, Value, u16, &str); 7] = [
        ("/v1/servers/1/drain", None, json!({}), 401, "unauthorized"),
        ("/v1/servers/1/drain", Some("wrong"), json!({}), 401, "unauthorized"),
        ("/v1/servers/99/drain", Some(TOKEN), json!({}), 404, "unknown_server"),
        ("/v1/regions/L9:0,0,0/split", Some(TOKEN), json!({}), 400, "bad_region"),
        ("/v1/regions/L0:0,0,0/merge", Some(TOKEN), json!({}), 409, "not_mergeable"),
        ("/v1/regions/L0:0,0,0/move", Some(TOKEN), json!({"to": 99}), 404, "unknown_server"),
        ("/v1/regions/L0:0,0,0/move", Some(TOKEN), json!({"to": "two"}), 400, "bad_request"),
    ];
    for (path, bearer, body, status, reason) in refusals {
        let (got, answer) = mesh.post(path, bearer, body)?;
        assert_eq!((got, answer["error"].as_str()), (status, Some(reason)), "{path}: {answer}");
    }
    assert_eq!(mesh.get("/v1/regions")?, regions, "refused writes changed the map");

    // Two bots walk back and forth deep inside region 0 (x 900–1100), on
    // the first server.
    let z = walkable_line(900.0, 1100.0, 1000.0)?;
    // Their accounts, made here so the test knows their player ids.
    let mut ids = Vec::new();
    for n in 1..=2 {
        let (status, a) =
            mesh.post("/v1/accounts", None, json!({"name": format!("bot-{n}"), "password": "bot-password"}))?;
        assert_eq!(status, 201, "{a}");
        ids.push(a["player"].as_u64().expect("player id"));
    }
    let report_dir = mesh.dir.path().join("report");
    let report = report_dir.join("summary.json");
    let mut swarm = Proc::start(
        "bot-swarm",
        "bot-swarm",
        &[
            format!("--coordinator=http://{}", mesh.http),
            "--bots=2".into(),
            "--seconds=14".into(),
            format!("--path=900,10,{z};1100,10,{z}"),
            "--spread-m=0".into(),
            format!("--report={}", report_dir.display()),
        ],
        mesh.dir.path(),
    )?;
    std::thread::sleep(Duration::from_secs(4));
    let players = mesh.get("/v1/players")?;
    assert_eq!((players["total"].as_u64(), players["directory"].as_u64()), (Some(2), Some(2)), "{players}");
    let on_first = players["servers"].as_array().unwrap().iter().find(|s| s["server_id"].as_u64() == Some(first));
    let regions = &on_first.expect("the first server is listed")["regions"];
    assert_eq!(regions, &json!([{"region": "L0:0,0,0", "players": 2}]), "{players}");
    // The same figures for Prometheus, and what the autoscaler is told.
    let metrics = integration_tests::blocking_text(&format!("http://{}/metrics", mesh.http))?;
    let gauge = integration_tests::metric(&metrics, "mesh_region_players", r#"region="L0:0,0,0""#);
    assert_eq!(gauge, 2.0, "mesh_region_players");
    assert_eq!(integration_tests::metric(&metrics, "mesh_desired_game_servers", ""), 1.0);
    assert!(metrics.contains("\nprocess_resident_memory_bytes "), "process metrics:\n{metrics}");

    // Split the region they are in: the children stay with its owner.
    let (status, map) = mesh.post("/v1/regions/L0:0,0,0/split", Some(TOKEN), json!({}))?;
    assert_eq!(status, 200, "{map}");
    let kids: Vec<&Value> = map.as_array().unwrap().iter().filter(|r| r["level"] == 1).collect();
    assert_eq!(kids.len(), 8, "{map}");
    assert!(kids.iter().all(|r| r["server_id"].as_u64() == Some(first)), "{map}");
    let (status, answer) = mesh.post("/v1/regions/L1:0,0,0/split", Some(TOKEN), json!({}))?;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = mesh.post("/v1/regions/L2:0,0,0/split", Some(TOKEN), json!({}))?;
    assert_eq!((status, answer["error"].as_str()), (400, Some("too_small")), "{answer}");
    std::thread::sleep(Duration::from_secs(2));
    for key in ["L1:0,0,0", "L0:0,0,0"] {
        let (status, answer) = mesh.post(&format!("/v1/regions/{key}/merge"), Some(TOKEN), json!({}))?;
        assert_eq!(status, 200, "merge {key}: {answer}");
    }
    std::thread::sleep(Duration::from_secs(2));

    // Drain the first server: its region goes to the second, and so do the
    // bots, through the handoff protocol.
    let (status, map) = mesh.post(&format!("/v1/servers/{first}/drain"), Some(TOKEN), json!({}))?;
    assert_eq!(status, 200, "{map}");
    assert!(map.as_array().unwrap().iter().all(|r| r["server_id"].as_u64() == Some(second)), "{map}");
    let (status, answer) = mesh.post(&format!("/v1/servers/{second}/drain"), Some(TOKEN), json!({}))?;
    assert_eq!((status, answer["error"].as_str()), (409, Some("last_server")), "{answer}");

    // While they still play (each got 1.5 s to pre-connect to the new owner
    // before its handoff): the directory says each is on the second server.
    std::thread::sleep(Duration::from_secs(4));
    for id in &ids {
        let at = mesh.get(&format!("/v1/players/{id}"))?;
        assert_eq!(at["server_id"].as_u64(), Some(second), "player {id} after the drain: {at}");
    }
    let exit = swarm.child.wait()?;
    assert!(exit.success(), "bot-swarm failed:\n{}", swarm.log_text());
    let servers = mesh.get("/v1/servers")?;
    let drained = servers.as_array().unwrap().iter().find(|s| s["server_id"].as_u64() == Some(first)).unwrap();
    assert_eq!((drained["draining"].as_bool(), drained["regions"].as_array().map(Vec::len)), (Some(true), Some(0)));
    let audit = mesh.get("/v1/audit")?;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|a| a["action"].as_str()).collect();
    assert_eq!(actions, ["drain", "merge_region", "merge_region", "split_region", "split_region"], "{audit}");
    let transfers = mesh.get("/v1/transfers?limit=100")?;
    let logs: String = mesh.servers.iter().map(|(p, _)| p.log_text()).collect();
    for (p, _) in &mut mesh.servers {
        assert!(p.stop(), "{} did not stop cleanly:\n{}", p.name, p.log_text());
    }
    // One authority per entity at every tick; inputs applied once, in order.
    mesh.invariants()?.assert_hold();

    // Every bot moved from the first server to the second once, losing and
    // repeating no input, and kept playing there.
    let r: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let said = || format!("{r}\ntransfers: {transfers}\n{}\n{logs}", swarm.log_text());
    assert_eq!(r["joined"], 2, "{}", said());
    assert_eq!(r["ack_regressions"], 0, "{}", said());
    for bot in r["per_bot"].as_array().unwrap() {
        assert!(bot["errors"].as_array().unwrap().is_empty(), "bot errors: {}", said());
        // The hint to pre-connect to the new owner carried a standby ticket.
        assert!(bot["hinted_tickets"].as_u64() >= Some(1), "pre-connected with the hint's ticket: {}", said());
        let changes = bot["authority_changes"].as_array().unwrap();
        let handoffs: Vec<&Value> = changes.iter().filter(|c| !c["from"].is_null()).collect();
        assert_eq!(handoffs.len(), 1, "one handoff, at the drain: {}", said());
        let h = handoffs[0];
        assert_eq!((h["from"].as_u64(), h["to"].as_u64()), (Some(first), Some(second)), "{}", said());
        let (new, old) = (h["acked_seq"].as_u64().unwrap(), h["previous_acked_seq"].as_u64().unwrap());
        assert!(new >= old && new - old <= 45, "inputs lost or repeated at the handoff: {h}");
        let span = &bot["acks_by_server"][second.to_string()];
        assert!(ids.contains(&bot["player"].as_u64().unwrap()), "{bot}");
        assert!(span["snapshots"].as_u64().unwrap_or(0) > 90, "few snapshots from the new owner: {}", said());
        println!("bot {}: max snapshot gap {} ms", bot["player"], bot["max_snapshot_gap_ms"]);
    }
    for t in transfers.as_array().unwrap() {
        assert_eq!(t["outcome"], "Delivered", "{t}");
    }
    // They left: the directory forgot them.
    assert_eq!(mesh.get("/v1/players")?["directory"], 0);
    Ok(())
}

fn put(mesh: &Mesh, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let r = reqwest::Client::new()
            .put(format!("http://{}{path}", mesh.http))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    })
}

#[test]
fn a_crowd_makes_its_region_split_and_part_of_it_move_without_dropping_anyone() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with(2, &[&format!("--admin-token={TOKEN}")], &["--walk-speed=6"])?;
    let regions = mesh.wait_regions_owned()?;
    let first = owner_of(&regions, "L0:0,0,0").expect("region 0 owned");
    // A crowd is more than two players here; CPU never triggers (64 cores)
    // and nothing merges (CPU below 0).
    let t = json!({"split_players": 2, "merge_players": 0, "split_cpu": 64.0, "merge_cpu": 0.0, "cooldown_ms": 1000});
    let (status, answer) = put(&mesh, "/v1/thresholds", t)?;
    assert_eq!(status, 200, "{answer}");

    // Three bots in region 0: two walk x 900–960, one x 1040–1100, so that
    // after the split two children hold them (x = 1000 is the line between).
    let z = walkable_line(900.0, 1100.0, 1000.0)?;
    let swarm = |name: &str, bots: u32, path: &str| {
        let report = mesh.dir.path().join(name);
        let p = Proc::start(
            name,
            "bot-swarm",
            &[
                format!("--coordinator=http://{}", mesh.http),
                format!("--bots={bots}"),
                "--seconds=15".into(),
                format!("--path={path}"),
                "--spread-m=0".into(),
                format!("--report={}", report.display()),
                format!("--account-prefix={name}-"),
            ],
            mesh.dir.path(),
        );
        p.map(|p| (p, report))
    };
    let mut swarms =
        [swarm("west", 2, &format!("900,10,{z};960,10,{z}"))?, swarm("east", 1, &format!("1040,10,{z};1100,10,{z}"))?];
    // What the autoscaler is told, while they play.
    let mut desired = 0;
    while swarms.iter_mut().any(|(p, _)| p.child.try_wait().is_ok_and(|e| e.is_none())) {
        desired = desired.max(mesh.get("/v1/status")?["desired_game_servers"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(500));
    }
    for (p, _) in &mut swarms {
        let exit = p.child.wait()?;
        assert!(exit.success(), "bot-swarm failed:\n{}", p.log_text());
    }
    let metrics = integration_tests::blocking_text(&format!("http://{}/metrics", mesh.http))?;
    let map = mesh.get("/v1/regions")?;
    let logs: String = mesh.servers.iter().map(|(p, _)| p.log_text()).collect();
    for (p, _) in &mut mesh.servers {
        assert!(p.stop(), "{} did not stop cleanly:\n{}", p.name, p.log_text());
    }
    // One authority per entity at every tick; inputs applied once, in order.
    mesh.invariants()?.assert_hold();

    let said = || format!("map: {map}\n{logs}");
    let splits = integration_tests::metric(&metrics, "mesh_region_changes_total", r#"kind="split""#);
    let moves = integration_tests::metric(&metrics, "mesh_region_changes_total", r#"kind="move""#);
    println!("balancer: {splits} splits, {moves} moves; desired_game_servers up to {desired}");
    assert!(splits >= 1.0 && moves >= 1.0, "the balancer split and moved: {}", said());
    let second_owns_part =
        map.as_array().unwrap().iter().any(|x| {
            x["region"].as_str().is_some_and(|k| !k.starts_with("L0:")) && x["server_id"].as_u64() != Some(first)
        });
    assert!(second_owns_part, "part of the crowded region moved to the other server: {map}");
    assert_eq!(desired, 3, "3 players at 1 a server (3/4 of 2)");
    let mut moved = 0;
    for (p, report) in &swarms {
        let r: Value = serde_json::from_slice(&std::fs::read(report.join("summary.json"))?)?;
        assert_eq!(r["ack_regressions"], 0, "{r}");
        assert_eq!(r["joined"], r["bots"], "{r}\n{}", p.log_text());
        for bot in r["per_bot"].as_array().unwrap() {
            assert!(bot["errors"].as_array().unwrap().is_empty(), "bot errors: {r}\n{}", said());
            let changes = bot["authority_changes"].as_array().unwrap();
            moved += changes.iter().filter(|c| !c["from"].is_null()).count();
            for h in changes.iter().filter(|c| !c["from"].is_null()) {
                let (new, old) = (h["acked_seq"].as_u64().unwrap(), h["previous_acked_seq"].as_u64().unwrap());
                assert!(new >= old && new - old <= 45, "inputs lost or repeated at the handoff: {h}");
            }
            println!(
                "bot {}: {} authority changes, max snapshot gap {} ms",
                bot["player"],
                changes.len(),
                bot["max_snapshot_gap_ms"]
            );
        }
    }
    assert!(moved >= 1, "a bot was handed to the other server with its region: {}", said());
    Ok(())
}

#[test]
fn every_documented_route_exists_roles_hold_and_refusals_say_why_in_json() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(1, &[&format!("--admin-token={TOKEN}"), "--viewer-token=view-token"], &[])?;
    mesh.wait_regions_owned_as(Some("view-token"))?;
    let doc: Value =
        serde_json::from_str(&integration_tests::blocking_text(&format!("http://{}/openapi.json", mesh.http))?)?;
    assert_eq!(doc["openapi"], "3.1.0");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = reqwest::Client::new();
    // (status, body) of one request.
    let send = |method: &str, path: &str, bearer: Option<&str>| -> anyhow::Result<(u16, String)> {
        let url = format!("http://{}{path}", mesh.http);
        let mut req = client.request(method.parse().expect("method"), url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        rt.block_on(async {
            let r = req.timeout(std::time::Duration::from_secs(10)).send().await?;
            let status = r.status().as_u16();
            // An event stream never ends: its status is the answer.
            let streaming =
                r.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            Ok((status, if streaming { String::new() } else { r.text().await? }))
        })
    };
    let call = |method: &str, path: &str, bearer: Option<&str>| -> anyhow::Result<(u16, bool)> {
        let (status, body) = send(method, path, bearer)?;
        // A route's own refusals say why; no route at all is `no_route`
        // (404) or `method_not_allowed` (405).
        let reason = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"].as_str().map(str::to_owned));
        Ok((status, matches!(reason.as_deref(), Some("no_route" | "method_not_allowed"))))
    };
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{region}", "L0:0,0,0").replace("{id}", "1").replace("{board}", "kills");
        let concrete = if path == "/v1/route" { format!("{concrete}?x=1&y=1&z=1") } else { concrete };
        for (method, op) in ops.as_object().unwrap() {
            // Unauthenticated: anything but "no such route".
            let (status, unrouted) = call(&method.to_uppercase(), &concrete, None)?;
            assert!(!unrouted, "{method} {path} is documented but not routed: {status}");
            // Open operations leave `security` out.
            let security: Vec<&str> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_object().and_then(|o| o.keys().next()).map(String::as_str))
                .collect();
            match (method.as_str(), security.as_slice()) {
                ("get", ["viewer", "operator"]) => {
                    assert_eq!(status, 401, "GET {path} without a token");
                    // Admitted (an unknown player is still a 404 with a reason).
                    for token in ["view-token", TOKEN] {
                        let (status, unrouted) = call("GET", &concrete, Some(token))?;
                        assert!(!unrouted && status != 401 && status != 403, "GET {path} with {token}: {status}");
                    }
                }
                (_, ["operator"]) => {
                    assert_eq!(status, 401, "{method} {path} without a token");
                    let (as_viewer, _) = call(&method.to_uppercase(), &concrete, Some("view-token"))?;
                    assert_eq!(as_viewer, 401, "{method} {path} as a viewer");
                }
                _ => {}
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations documented");
    // Every refusal is `{"error","detail"}` JSON, the framework's own too.
    let refusal = |method: &str, path: &str, bearer: Option<&str>| -> anyhow::Result<(u16, Value)> {
        let (status, body) = send(method, path, bearer)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{method} {path}: {body:?}: {e}"))?;
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{method} {path}: no detail in {v}");
        Ok((status, v))
    };
    for (method, path, bearer, status, error) in [
        ("GET", "/v1/route?x=1&y=1", None, 400, "bad_request"),
        ("GET", "/v1/route?x=1&y=1&z=abc", None, 400, "bad_request"),
        ("GET", "/v1/route?x=1&y=1&z=NaN", None, 400, "bad_request"),
        ("GET", "/v1/route?x=-9000000&y=1&z=1", None, 404, "no_owner"),
        ("GET", "/v1/players/null", Some("view-token"), 400, "bad_request"),
        ("GET", "/v1/transfers?limit=10001", Some("view-token"), 400, "bad_request"),
        ("GET", "/v1/audit?limit=-1", Some("view-token"), 400, "bad_request"),
        ("GET", "/v1/audit?limit=10001", Some("view-token"), 400, "bad_request"),
        ("POST", "/v1/servers/x/drain", Some(TOKEN), 400, "bad_request"),
        ("GET", "/v1/leaderboards/kills?n=many", None, 400, "bad_request"),
        ("GET", "/v1/nothing-here", None, 404, "no_route"),
        ("DELETE", "/v1/regions", Some("view-token"), 405, "method_not_allowed"),
    ] {
        let (got, v) = refusal(method, path, bearer)?;
        assert_eq!((got, v["error"].as_str()), (status, Some(error)), "{method} {path}: {v}");
    }
    // The largest limit documented is served.
    let (ok, _) = call("GET", "/v1/audit?limit=10000", Some("view-token"))?;
    assert_eq!(ok, 200);
    Ok(())
}
