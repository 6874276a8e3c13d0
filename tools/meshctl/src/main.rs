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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local mesh: a coordinator, game servers and bots on loopback.
    Up(up::UpArgs),
    /// The mesh at a glance.
    Status,
    /// Regions with their owners and epochs.
    Regions,
    /// Game servers with their load.
    Servers,
    /// Recent authority transfers.
    Transfers {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let base = cli.coordinator.trim_end_matches('/').to_owned();
    match cli.command {
        Command::Up(args) => up::run(args).await,
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
        Command::Status => show(&base, "/v1/status", cli.json, |v| {
            let keys = ["ready", "servers_alive", "servers_total", "regions", "regions_owned", "players", "transfers_total", "tick_p99_ms_max", "map_version"];
            keys.iter().map(|k| format!("{k:<16} {}", v[*k])).collect::<Vec<_>>().join("\n")
        })
        .await,
        Command::Regions => show(&base, "/v1/regions", cli.json, |v| {
            table(v, &[("REGION", "region"), ("SERVER", "server_id"), ("NAME", "server_name"), ("EPOCH", "epoch")])
        })
        .await,
        Command::Servers => show(&base, "/v1/servers", cli.json, |v| {
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    serde_json::json!({
                        "id": s["server_id"], "name": s["name"], "alive": s["alive"],
                        "players": s["load"]["players"], "tick_p99_ms": s["load"]["tick_p99_ms"],
                        "regions": s["regions"].as_array().map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
                        "quic": s["addresses"]["quic"],
                    })
                })
                .collect();
            table(
                &Value::Array(rows),
                &[("ID", "id"), ("NAME", "name"), ("ALIVE", "alive"), ("PLAYERS", "players"), ("TICK P99 MS", "tick_p99_ms"), ("REGIONS", "regions"), ("QUIC", "quic")],
            )
        })
        .await,
        Command::Transfers { limit } => show(&base, &format!("/v1/transfers?limit={limit}"), cli.json, |v| {
            table(v, &[("ID", "id"), ("ENTITY", "entity"), ("FROM", "from"), ("TO", "to"), ("EPOCH", "entity_epoch"), ("TICK", "effective_tick"), ("OUTCOME", "outcome")])
        })
        .await,
    }
}

async fn show(base: &str, path: &str, json: bool, render: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    let url = format!("{base}{path}");
    let resp = reqwest::get(&url).await.map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {base}: {e}"))?;
    anyhow::ensure!(resp.status().is_success(), "{url} answered {}", resp.status());
    let v: Value = resp.json().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", render(&v));
    }
    Ok(())
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
