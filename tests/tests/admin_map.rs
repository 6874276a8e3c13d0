//! The admin map in a real browser: Debian's Chromium, headless, driven
//! through WebDriver (chromium-driver), against a real local mesh with bots.
//! The map shows both root regions and their owners, the bots' dots move, a
//! split done through the page appears on the map and in `/v1/regions`, and
//! an action without the operator token is refused on the page with the
//! API's reason. It leaves a screenshot at `target/admin-map.png`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use integration_tests::{Mesh, bin_dir, walkable_line};
use serde_json::{Value, json};

const OPERATOR: &str = "ops-token";
const VIEWER: &str = "view-token";

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

async fn set_token(c: &Client, token: &str) -> anyhow::Result<()> {
    let input = c.find(Locator::Id("token")).await?;
    input.clear().await?;
    input.send_keys(token).await?;
    c.find(Locator::Id("token-save")).await?.click().await?;
    Ok(())
}

/// Selects a region on the page (its row in the list) and splits it,
/// confirming in the page's dialog; answers the notice's error label.
async fn split_on_page(c: &Client, region: &str) -> anyhow::Result<Value> {
    let row = format!("tr[data-region=\"{region}\"]");
    wait_for(c, "the region's row", &format!("!!document.querySelector('{row}')"), |v| v == true).await?;
    c.find(Locator::Css(&row)).await?.click().await?;
    wait_for(c, "the selection", "window.mapState.selected", |v| v == region).await?;
    c.find(Locator::Id("act-split")).await?.click().await?;
    c.find(Locator::Id("confirm-ok")).await?.click().await?;
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
        &[&format!("--admin-token={OPERATOR}"), &format!("--viewer-token={VIEWER}")],
        &[&format!("--admin-token={OPERATOR}")],
    )?;
    mesh.wait_regions_owned_as(Some(VIEWER))?;
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
            let rows = c.find_all(Locator::Css("#servers tr[data-server]")).await?;
            assert_eq!(rows.len(), 2);

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
