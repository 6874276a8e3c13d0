//! The admin map in a real browser: Debian's Chromium, headless, driven
//! through WebDriver (chromium-driver), against a real local mesh with bots.
//! The map shows both root regions and their owners, the bots' dots move, a
//! split done through the page appears on the map and in `/v1/regions`, and
//! an action without the operator token is refused on the page with the
//! API's reason. It leaves a screenshot at `target/admin-map.png`.
//!
//! And at scale: 10,000 players over 1,000 regions from a synthetic state,
//! through the real page and event encoding, paint within a second and
//! cost the page under 100 ms of main thread a second
//! (`target/admin-map-10k.png`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::IntoResponse;
use fantoccini::{Client, ClientBuilder, Locator};
use integration_tests::{Mesh, bin_dir, walkable_line};
use mesh_coordinator::map::{
    Event, MapHub, Picture, PositionsEvent, PositionsOf, ServerPositions, regions_event, servers_event,
};
use mesh_coordinator::state::{Addresses, Command as Cmd, CoordinatorState, Load, Policy, Response, Thresholds};
use serde_json::{Value, json};

const OPERATOR: &str = "ops-token";
const VIEWER: &str = "view-token";
const FEED: &str = "feed-token";

/// A chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(name: &str, debian: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("{name} is not installed: the test command installs it (apt-get install {debian})")
        })
}

fn start_driver(log: &Path) -> anyhow::Result<Driver> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(program("chromedriver", "chromium-driver")?)
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into(), format!("--log-path={}", log.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let driver = Driver { child, url };
    let deadline = Instant::now() + Duration::from_secs(20);
    while integration_tests::blocking_get_as(&format!("{}/status", driver.url), None).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "chromedriver did not answer on {}", driver.url);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(driver)
}

async fn browser(driver: &Driver, profile: &Path) -> anyhow::Result<Client> {
    let chromium = program("chromium", "chromium")?;
    // As root Chromium needs --no-sandbox; the rest keeps it off the
    // network (this machine has none) and quiet.
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,900", format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let caps = caps.as_object().cloned().unwrap_or_default().into_iter().collect();
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    Ok(ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await?)
}

/// Evaluates `expr` in the page until `done` accepts its value.
async fn wait_for(c: &Client, what: &str, expr: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.execute(&format!("return {expr};"), vec![]).await?;
        if done(&v) {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: never; last {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks the element `css` selects. The page re-renders parts of itself
/// as events arrive; an element replaced between the find and the click is
/// found again (a few times), as a person would click again.
async fn click(c: &Client, css: &str) -> anyhow::Result<()> {
    for _ in 0..5 {
        match c.find(Locator::Css(css)).await?.click().await {
            Err(e) if e.is_stale_element_reference() => tokio::time::sleep(Duration::from_millis(50)).await,
            r => return Ok(r?),
        }
    }
    anyhow::bail!("{css} kept being replaced while being clicked")
}

async fn set_token(c: &Client, token: &str) -> anyhow::Result<()> {
    let input = c.find(Locator::Id("token")).await?;
    input.clear().await?;
    input.send_keys(token).await?;
    click(c, "#token-save").await?;
    Ok(())
}

/// Selects a region on the page (its row in the list) and splits it,
/// confirming in the page's dialog; answers the notice's error label.
async fn split_on_page(c: &Client, region: &str) -> anyhow::Result<Value> {
    let row = format!("tr[data-region=\"{region}\"]");
    wait_for(c, "the region's row", &format!("!!document.querySelector('{row}')"), |v| v == true).await?;
    click(c, &row).await?;
    wait_for(c, "the selection", "window.mapState.selected", |v| v == region).await?;
    click(c, "#act-split").await?;
    click(c, "#confirm-ok").await?;
    wait_for(
        c,
        "the API's answer on the page",
        "(() => { const n = document.getElementById('notice'); \
          return n.classList.contains('pending') ? null : {error: n.dataset.error, text: n.textContent}; })()",
        |v| v.is_object(),
    )
    .await
}

fn leaves(mesh: &Mesh) -> anyhow::Result<Vec<String>> {
    let v = mesh.get_as("/v1/regions", Some(VIEWER))?;
    let mut keys: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|r| r["region"].as_str().map(str::to_owned)).collect();
    keys.sort();
    Ok(keys)
}

#[test]
fn the_admin_map_shows_the_live_mesh_and_acts_only_with_the_operator_token() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(
        2,
        &[
            &format!("--admin-token={OPERATOR}"),
            &format!("--viewer-token={VIEWER}"),
            &format!("--map-feed-token={FEED}"),
        ],
        &[&format!("--map-feed-token={FEED}")],
    )?;
    mesh.wait_regions_owned_as(Some(VIEWER))?;
    // The game servers' position feed: the feed token only, bounded.
    let gs_http = mesh.servers[0].1["http"].as_str().unwrap_or_default().to_owned();
    let positions = |bearer: Option<&str>, max: &str| {
        integration_tests::blocking_get_as(&format!("http://{gs_http}/v1/positions?max={max}"), bearer)
    };
    let feed = positions(Some(FEED), "10")?;
    assert!(feed["total"].is_u64() && feed["entities"].is_array(), "{feed}");
    for (bearer, max, status) in
        [(None, "10", "401"), (Some(VIEWER), "10", "401"), (Some(FEED), "0", "400"), (Some(FEED), "5001", "400")]
    {
        let e = positions(bearer, max).expect_err("refused");
        assert!(e.to_string().contains(status), "{bearer:?} max={max}: {e}");
    }
    let z = walkable_line(900.0, 980.0, 1000.0)?;
    let (mut bots, _) =
        mesh.swarm("walkers", &["--bots=3", "--seconds=60", &format!("--path=900,10,{z};980,10,{z}")])?;

    // meshctl open names the page.
    let out = Command::new(bin_dir().join("meshctl"))
        .args([format!("--coordinator=http://{}", mesh.http), "open".into()])
        .output()?;
    assert!(out.status.success(), "meshctl open: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("http://{}/", mesh.http));

    let driver = start_driver(&mesh.dir.path().join("chromedriver.log"))?;
    let profile = mesh.dir.path().join("chromium-profile");
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/admin-map.png");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let page = format!("http://{}/", mesh.http);
    let result = rt.block_on(async {
        let c = browser(&driver, &profile).await?;
        let run = async {
            c.goto(&page).await?;
            // The views need a token here: the page asks for one.
            wait_for(
                &c,
                "the token prompt",
                "document.getElementById('token-box').classList.contains('needed')",
                |v| v == true,
            )
            .await?;
            set_token(&c, VIEWER).await?;
            let regions = wait_for(
                &c,
                "both roots with their owners",
                "window.mapState.connected && window.mapState.regions.map(r => [r.region, r.server_id, r.server_name])",
                |v| v.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|r| r[1].is_u64())),
            )
            .await?;
            let owners: Vec<u64> = regions.as_array().into_iter().flatten().filter_map(|r| r[1].as_u64()).collect();
            assert_ne!(owners[0], owners[1], "one root each: {regions}");
            // The servers panel lists both, by row.
            wait_for(&c, "both servers' rows", "document.querySelectorAll('#servers tr[data-server]').length", |v| {
                v == 2
            })
            .await?;

            // The bots' dots move.
            let dots = "window.mapState.positionsSeen > 0 && window.mapState.positions.servers\
                .flatMap(s => s.entities.filter(e => e[3] === 0).map(e => [e[0], e[2]]))";
            let before = wait_for(&c, "player dots", dots, |v| v.as_array().is_some_and(|a| a.len() == 3)).await?;
            let moved = |v: &Value| {
                let (Some(a), Some(b)) = (before.as_array(), v.as_array()) else { return false };
                let key = |p: &Value| (p[0].as_f64().unwrap_or(0.0), p[1].as_f64().unwrap_or(0.0));
                let mut a: Vec<_> = a.iter().map(key).collect();
                let mut b: Vec<_> = b.iter().map(key).collect();
                a.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
                b.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
                b.len() == 3 && a != b
            };
            wait_for(&c, "the dots to move", dots, moved).await?;

            // A split as a viewer is refused on the page with the API's reason.
            let refused = split_on_page(&c, "L0:0,0,0").await?;
            assert_eq!(refused["error"], "unauthorized", "{refused}");
            assert!(refused["text"].as_str().is_some_and(|t| t.contains("401")), "{refused}");

            // As the operator it is done, and the map shows the children.
            set_token(&c, OPERATOR).await?;
            wait_for(&c, "the stream again", "window.mapState.connected", |v| v == true).await?;
            let done = split_on_page(&c, "L0:0,0,0").await?;
            assert_eq!(done["error"], "", "{done}");
            wait_for(
                &c,
                "the split on the map",
                "window.mapState.regions.filter(r => r.region.startsWith('L1:')).length",
                |v| v == 8,
            )
            .await?;
            let png = c.screenshot().await?;
            std::fs::create_dir_all(shot.parent().expect("target"))?;
            std::fs::write(&shot, png)?;
            anyhow::Ok(())
        }
        .await;
        let _ = c.close().await;
        run
    });
    let _ = bots.child.kill();
    if let Err(e) = result {
        let log = std::fs::read_to_string(mesh.dir.path().join("chromedriver.log")).unwrap_or_default();
        let tail: String =
            log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        anyhow::bail!("{e:#}\nchromedriver log (tail):\n{tail}\ncoordinator:\n{}", mesh.coordinator.log_text());
    }
    let keys = leaves(&mesh)?;
    assert_eq!(keys.len(), 9, "{keys:?}");
    assert!(keys.iter().filter(|k| k.starts_with("L1:")).count() == 8, "{keys:?}");
    println!("screenshot: {}", shot.display());
    mesh.invariants()?.assert_hold();
    Ok(())
}

/// The coordinator's state of a large mesh, built through its own
/// commands: `servers` servers owning `nx * nz` roots, `players` players
/// spread evenly over the regions, as the servers' reports say.
fn synthetic_mesh(servers: u32, nx: u32, nz: u32, players: u32) -> anyhow::Result<CoordinatorState> {
    const MS: u64 = 1_000_000;
    let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 - 10_000 * MS;
    let tree = shared::region::RegionTree::grid(glam::IVec3::ZERO, nx, 1, nz);
    let mut s = CoordinatorState::new(Policy::default(), tree, shared::TickClock::new(t0));
    // No balancing: the map is to show exactly this.
    let calm = Thresholds {
        split_players: 100_000,
        split_cpu: 64.0,
        merge_players: 0,
        merge_cpu: 0.0,
        cooldown_ms: 86_400_000,
    };
    s.apply(Cmd::SetThresholds { thresholds: calm, now: t0 }).0.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ids = Vec::new();
    for i in 0..servers {
        let (r, _) = s.apply(Cmd::Register {
            name: format!("gs-{i}"),
            addresses: Addresses::default(),
            cert_sha256: String::new(),
            capacity_players: 500,
            version: "synthetic".into(),
            now: t0,
        });
        match r {
            Ok(Response::Registered { server }) => ids.push(server),
            other => anyhow::bail!("register: {other:?}"),
        }
    }
    let per_region = players / (nx * nz);
    for step in 1..=16u64 {
        let now = t0 + step * 500 * MS;
        for &server in &ids {
            let regions: Vec<_> = s.regions_of(server).map(|(k, _)| (*k, per_region)).collect();
            let players = regions.iter().map(|r| r.1).sum();
            let load = Load { players, cpu: 0.3, tick_p99_ms: 6.0, ..Load::default() };
            let _ = s.apply(Cmd::Report { server, load, regions, now });
        }
        let _ = s.apply(Cmd::Tick { now });
    }
    let owned = s.assignments().values().filter(|a| a.server.is_some()).count();
    anyhow::ensure!(owned == (nx * nz) as usize, "{owned} of {} regions owned", nx * nz);
    Ok(s)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `per_region` entities in every region of every server, at random.
fn synthetic_positions(s: &CoordinatorState, per_region: u32) -> Vec<PositionsOf> {
    let mut out = Vec::new();
    for server in s.servers().values() {
        let mut entities = Vec::new();
        for (k, _) in s.regions_of(server.id) {
            let b = k.aabb();
            for i in 0..per_region {
                let x = b.min.x + fastrand::f64() * (b.max.x - b.min.x);
                let z = b.min.z + fastrand::f64() * (b.max.z - b.min.z);
                entities.push(((x * 10.0).round() / 10.0, 12.0, (z * 10.0).round() / 10.0, u8::from(i % 10 == 9)));
            }
        }
        let total = entities.len() as u64;
        out.push(PositionsOf { server_id: server.id.0, positions: ServerPositions { total, entities } });
    }
    out
}

/// Ten thousand players over a thousand regions, fed from a synthetic
/// state through the real page and the real event encoding: the first
/// paint comes within a second, and the updates (every second: positions
/// of all 10,000, the 1,000 regions with new player counts, the servers)
/// cost the page under 100 ms of its main
/// thread a second (decoding, parsing, handling and drawing, as the page
/// counts them in `mapStats.renderMs`).
#[test]
fn ten_thousand_players_over_a_thousand_regions_paint_in_a_second_and_update_cheaply() -> anyhow::Result<()> {
    let state = Arc::new(synthetic_mesh(100, 40, 25, 10_000)?);
    let hub = Arc::new(MapHub::new(mesh_coordinator::metrics::Metrics::new()));
    let positions =
        move |s: &CoordinatorState| PositionsEvent { at_unix_ms: unix_ms(), servers: synthetic_positions(s, 10) };
    hub.publish_positions(Event::new("positions", &positions(&state)));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                ([(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], mesh_coordinator::map::PAGE)
            }),
        )
        .route(
            "/v1/events",
            axum::routing::get({
                let (state, hub) = (state.clone(), hub.clone());
                move || async move {
                    let first = Picture::read(&state, 1, unix_ms(), &hub.history(), true).events();
                    match hub.subscribe(first) {
                        Some(rx) => mesh_coordinator::map::stream(rx, hub.closed()),
                        None => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    }
                }
            }),
        );
    rt.spawn(async move { axum::serve(listener, app).await });
    // Once a second, as the coordinator's hub does while a map is open.
    rt.spawn({
        let (state, hub) = (state.clone(), hub.clone());
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                // As the coordinator's loop: the regions again whenever a
                // region's players change (here, every second).
                let mut regions = regions_event(&state);
                for r in &mut regions.regions {
                    r.players = fastrand::u32(0..20);
                }
                hub.broadcast(&Event::new("regions", &regions));
                hub.broadcast(&Event::new("servers", &servers_event(&state, unix_ms(), None)));
                hub.publish_positions(Event::new("positions", &positions(&state)));
            }
        }
    });

    let dir = tempfile::tempdir()?;
    let driver = start_driver(&dir.path().join("chromedriver.log"))?;
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/admin-map-10k.png");
    let figures = rt.block_on(async {
        let c = browser(&driver, &dir.path().join("profile")).await?;
        let run = async {
            c.goto(&format!("http://{addr}/")).await?;
            let first = wait_for(&c, "the first paint", "window.mapStats.firstPaintMs", Value::is_number).await?;
            let shown = wait_for(
                &c,
                "all of it",
                "[window.mapState.regions.length, window.mapState.servers.length, \
                  window.mapState.positions.servers.reduce((n, s) => n + s.entities.length, 0)]",
                |v| v == &json!([1000, 100, 10_000]),
            )
            .await?;
            wait_for(&c, "updates", "window.mapState.positionsSeen", |v| v.as_u64().is_some_and(|n| n >= 3)).await?;
            let at = "[window.mapStats.renderMs, performance.now(), window.mapStats.events, window.mapStats.frames]";
            let before = c.execute(&format!("return {at};"), vec![]).await?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            let after = c.execute(&format!("return {at};"), vec![]).await?;
            let f = |v: &Value, i: usize| v[i].as_f64().unwrap_or(f64::NAN);
            let per_second = (f(&after, 0) - f(&before, 0)) / ((f(&after, 1) - f(&before, 1)) / 1000.0);
            let png = c.screenshot().await?;
            std::fs::create_dir_all(shot.parent().expect("target"))?;
            std::fs::write(&shot, png)?;
            anyhow::Ok(json!({
                "first_paint_ms": first,
                "update_main_thread_ms_per_s": (per_second * 10.0).round() / 10.0,
                "events": f(&after, 2) - f(&before, 2),
                "frames": f(&after, 3) - f(&before, 3),
                "shown": shown,
            }))
        }
        .await;
        let _ = c.close().await;
        run
    })?;
    println!("{figures}");
    println!("screenshot: {}", shot.display());
    let first = figures["first_paint_ms"].as_f64().unwrap_or(f64::INFINITY);
    assert!(first < 1000.0, "first paint after {first} ms: {figures}");
    let per_second = figures["update_main_thread_ms_per_s"].as_f64().unwrap_or(f64::INFINITY);
    assert!(per_second < 100.0, "updates cost {per_second} ms a second: {figures}");
    assert!(figures["events"].as_f64().is_some_and(|n| n >= 25.0), "updates flowed: {figures}");
    Ok(())
}
