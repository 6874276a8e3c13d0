//! `meshctl`: the admin CLI of a Planetary Survival mesh, and `meshctl up`,
//! which runs a whole mesh on this machine.

mod up;

use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(version, about = "Admin CLI and local launcher of a Planetary Survival mesh")]
struct Cli {
    /// The coordinator's HTTP API.
    #[arg(long, global = true, env = "PS_COORDINATOR_HTTP", default_value = "http://127.0.0.1:8080")]
    coordinator: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The operator token, for commands that change the mesh.
    #[arg(long, global = true, env = "PS_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local mesh: a coordinator, game servers and bots on loopback.
    Up(up::UpArgs),
    /// SIGKILL a member of the running `meshctl up` (`gs-1`,
    /// `coordinator-2`, `bot-swarm`, as its status line names them): try
    /// failover on a laptop; `meshctl up` starts it again.
    Kill(up::MemberArgs),
    /// Stop a member of the running `meshctl up` cleanly (SIGTERM); `meshctl
    /// up` starts it again.
    Restart(up::MemberArgs),
    /// The mesh at a glance.
    Status,
    /// The admin map's address (the coordinator serves it at `/`): printed
    /// once the coordinator answers, and opened in a browser with --browser.
    Open {
        /// Open it with $BROWSER, else xdg-open.
        #[arg(long)]
        browser: bool,
    },
    /// Regions with their owners and epochs.
    Regions,
    /// Game servers with their load.
    Servers,
    /// Recent authority transfers.
    Transfers {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Move every region of a server to others (its players are handed
    /// over, not dropped) and give it no more; then it can be stopped.
    Drain {
        /// The server's id or name (`meshctl servers`). Default: this
        /// pod's server (`PS_SERVER_NAME`), which is how a game server's
        /// preStop hook drains it.
        #[arg(env = "PS_SERVER_NAME")]
        server: String,
        /// Take the server back into placement instead.
        #[arg(long)]
        undo: bool,
        /// Wait up to this many seconds until the server reports no players.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Split a region into its 8 children (down to 500 m); they stay with its owner.
    Split {
        /// A region key as `meshctl regions` shows it, e.g. L0:1,0,0.
        region: String,
    },
    /// Merge the 8 children of a region back into it.
    Merge {
        /// The parent's key, e.g. L0:1,0,0.
        region: String,
    },
    /// Move a region to another server; its players are handed over.
    Move {
        region: String,
        /// The server id to move it to.
        #[arg(long)]
        to: u32,
    },
    /// Players per server and region.
    Players,
    /// The split and merge thresholds.
    Thresholds,
    /// Operator writes, newest first.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Apply pending schema migrations to the world store (game servers also
    /// apply them at start-up). A database migrated by a newer build is
    /// refused untouched.
    Migrate {
        /// `postgres://…` (CockroachDB or PostgreSQL); unset: the embedded
        /// store under --data-dir.
        #[arg(long, env = "PS_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Directory of the embedded store.
        #[arg(long, env = "PS_DATA_DIR", default_value = ".mesh-data/world")]
        data_dir: std::path::PathBuf,
        /// Only check the schema is current; change nothing.
        #[arg(long)]
        check: bool,
    },
}

/// An expected failure (a coordinator that cannot be reached, a refusal, a
/// member of `meshctl up` that exited) is one line on stderr and exit code
/// 1: never anyhow's report, which would add a backtrace under
/// `RUST_BACKTRACE`.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {}", svc::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A client for the admin API that gives up on a coordinator that does not
/// answer, instead of waiting forever.
fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(15))
        .build()?)
}

/// What went wrong with a request, at its root (`Connection refused`, a
/// timeout), not reqwest's outer "error sending request".
fn request_error(base: &str, e: &reqwest::Error) -> anyhow::Error {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let why = if e.is_timeout() { "timed out".to_owned() } else { root.to_string() };
    anyhow::anyhow!(
        "cannot reach the coordinator at {base}: {why} (is it running? --coordinator or PS_COORDINATOR_HTTP names it)"
    )
}

/// `meshctl open`: checks the coordinator serves the map, prints its
/// address, and opens it when asked.
async fn open(base: &str, browser: bool) -> anyhow::Result<()> {
    let url = format!("{base}/");
    let r = http_client()?.get(&url).send().await.map_err(|e| request_error(base, &e))?;
    let html = r.headers().get(reqwest::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if !r.status().is_success() || !html {
        anyhow::bail!("{url} answered {} without the map: is it a coordinator of this version?", r.status());
    }
    println!("{url}");
    if browser {
        let program = std::env::var("BROWSER").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| "xdg-open".into());
        std::process::Command::new(&program)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {program} to open {url}: {e} (set $BROWSER)"))?;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let base = cli.coordinator.trim_end_matches('/').to_owned();
    let _ = READ_TOKEN.set(cli.token.clone().or_else(|| std::env::var("PS_VIEWER_TOKEN").ok()));
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Kill(args) => up::signal_member(&args, nix::sys::signal::Signal::SIGKILL),
        Command::Restart(args) => up::signal_member(&args, nix::sys::signal::Signal::SIGTERM),
        Command::Migrate { database_url, data_dir, check } => {
            let url = database_url.unwrap_or_else(|| persistence::embedded_url(&data_dir));
            let store = persistence::open(&persistence::StoreConfig { url: url.clone(), migrate: !check, ..Default::default() })
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let version = persistence::migrations::LATEST;
            if cli.json {
                println!("{}", serde_json::json!({ "backend": store.backend(), "schema_version": version, "checked_only": check }));
            } else {
                println!("{} store {} is at schema version {version}", store.backend(), persistence::redact(&url));
            }
            Ok(())
        }
        Command::Open { browser } => open(&base, browser).await,
        Command::Status => show(&base, "/v1/status", cli.json, |v| {
            let keys = ["ready", "servers_alive", "servers_total", "regions", "regions_owned", "players", "transfers_total", "tick_p99_ms_max", "map_version"];
            keys.iter().map(|k| format!("{k:<16} {}", v[*k])).collect::<Vec<_>>().join("\n")
        })
        .await,
        Command::Regions => show(&base, "/v1/regions", cli.json, regions_table).await,
        Command::Servers => show(&base, "/v1/servers", cli.json, |v| {
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    serde_json::json!({
                        "id": s["server_id"], "name": s["name"], "alive": s["alive"], "draining": s["draining"],
                        "players": s["load"]["players"], "tick_p99_ms": s["load"]["tick_p99_ms"],
                        "regions": s["regions"].as_array().map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
                        "quic": s["addresses"]["quic"],
                    })
                })
                .collect();
            table(
                &Value::Array(rows),
                &[("ID", "id"), ("NAME", "name"), ("ALIVE", "alive"), ("DRAINING", "draining"), ("PLAYERS", "players"), ("TICK P99 MS", "tick_p99_ms"), ("REGIONS", "regions"), ("QUIC", "quic")],
            )
        })
        .await,
        Command::Drain { server, undo, wait } => {
            let server = server_id(&base, &server).await?;
            let verb = if undo { "undrain" } else { "drain" };
            let token = cli.token.as_deref();
            write(&base, &format!("/v1/servers/{server}/{verb}"), token, serde_json::json!({}), cli.json).await?;
            match wait {
                Some(secs) if !undo => wait_drained(&base, server, secs).await,
                _ => Ok(()),
            }
        }
        Command::Split { region } => {
            write(&base, &format!("/v1/regions/{region}/split"), cli.token.as_deref(), serde_json::json!({}), cli.json).await
        }
        Command::Merge { region } => {
            write(&base, &format!("/v1/regions/{region}/merge"), cli.token.as_deref(), serde_json::json!({}), cli.json).await
        }
        Command::Move { region, to } => {
            let body = serde_json::json!({ "to": to });
            write(&base, &format!("/v1/regions/{region}/move"), cli.token.as_deref(), body, cli.json).await
        }
        Command::Players => show(&base, "/v1/players", cli.json, |v| {
            let rows: Vec<Value> = v["servers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| {
                    s["regions"].as_array().into_iter().flatten().map(move |r| {
                        serde_json::json!({"id": s["server_id"], "name": s["name"], "region": r["region"], "players": r["players"]})
                    })
                })
                .collect();
            let t = table(&Value::Array(rows), &[("ID", "id"), ("NAME", "name"), ("REGION", "region"), ("PLAYERS", "players")]);
            format!("{t}\ntotal {}", v["total"])
        })
        .await,
        Command::Thresholds => show(&base, "/v1/thresholds", cli.json, |v| {
            v.as_object().into_iter().flatten().map(|(k, x)| format!("{k:<16} {x}")).collect::<Vec<_>>().join("\n")
        })
        .await,
        Command::Audit { limit } => show(&base, &format!("/v1/audit?limit={limit}"), cli.json, |v| {
            table(v, &[("SEQ", "seq"), ("AT", "at"), ("ACTION", "action"), ("DETAIL", "detail")])
        })
        .await,
        Command::Transfers { limit } => show(&base, &format!("/v1/transfers?limit={limit}"), cli.json, |v| {
            table(v, &[("ID", "id"), ("ENTITY", "entity"), ("FROM", "from"), ("TO", "to"), ("EPOCH", "entity_epoch"), ("TICK", "effective_tick"), ("OUTCOME", "outcome")])
        })
        .await,
    }
}

fn regions_table(v: &Value) -> String {
    table(v, &[("REGION", "region"), ("SERVER", "server_id"), ("NAME", "server_name"), ("EPOCH", "epoch")])
}

/// POSTs an operator command; prints the region map it answers with, or
/// fails with the coordinator's reason.
async fn write(base: &str, path: &str, token: Option<&str>, body: Value, json: bool) -> anyhow::Result<()> {
    let url = format!("{base}{path}");
    let mut req = http_client()?.post(&url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| request_error(base, &e))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let hint = if status.as_u16() == 401 { " (pass --token or set PS_ADMIN_TOKEN)" } else { "" };
        anyhow::bail!("refused ({status}, {}): {}{hint}", cell(&v["error"]), cell(&v["detail"]));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", regions_table(&v));
    }
    Ok(())
}

/// A server id, or the id of the live server of that name (else the
/// newest of that name).
async fn server_id(base: &str, id_or_name: &str) -> anyhow::Result<u32> {
    if let Ok(id) = id_or_name.parse() {
        return Ok(id);
    }
    let servers = get(base, &format!("{base}/v1/servers")).await?;
    let named: Vec<&Value> =
        servers.as_array().into_iter().flatten().filter(|s| s["name"].as_str() == Some(id_or_name)).collect();
    let pick = named.iter().max_by_key(|s| (s["alive"] == true, s["server_id"].as_u64().unwrap_or(0)));
    pick.and_then(|s| s["server_id"].as_u64())
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| anyhow::anyhow!("no server is named {id_or_name:?} (meshctl servers lists them)"))
}

/// Polls the servers until `server` reports no players, for `secs` at most.
async fn wait_drained(base: &str, server: u32, secs: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let url = format!("{base}/v1/servers");
        let servers = get(base, &url).await?;
        let me = servers.as_array().into_iter().flatten().find(|s| s["server_id"].as_u64() == Some(u64::from(server)));
        let players = me.map_or(0, |s| s["load"]["players"].as_u64().unwrap_or(0));
        if players == 0 {
            eprintln!("server {server} is drained: no players left");
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "server {server} still reports {players} players after {secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn show(base: &str, path: &str, json: bool, render: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    let url = format!("{base}{path}");
    let v = get(base, &url).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", render(&v));
    }
    Ok(())
}

/// The token the views are read with: `--token` (or `PS_ADMIN_TOKEN`), else
/// `PS_VIEWER_TOKEN`.
static READ_TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// GETs an admin view, with the read token when there is one.
async fn get(base: &str, url: &str) -> anyhow::Result<Value> {
    let token = READ_TOKEN.get().cloned().flatten();
    let mut req = http_client()?.get(url);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| request_error(base, &e))?;
    let status = resp.status();
    if status.as_u16() == 401 {
        anyhow::bail!("{url} answered 401: set PS_VIEWER_TOKEN (or PS_ADMIN_TOKEN) to a token the coordinator accepts");
    }
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(resp.json().await?)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A plain text table of `rows` (an array of objects) with the given columns.
fn table(rows: &Value, cols: &[(&str, &str)]) -> String {
    let rows: Vec<Vec<String>> =
        rows.as_array().into_iter().flatten().map(|r| cols.iter().map(|(_, k)| cell(&r[*k])).collect()).collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| rows.iter().map(|r| r[i].len()).chain([h.len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    std::iter::once(line(cols.iter().map(|(h, _)| (*h).to_owned()).collect()))
        .chain(rows.into_iter().map(line))
        .collect::<Vec<_>>()
        .join("\n")
}
