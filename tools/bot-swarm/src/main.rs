use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use bot_swarm::{Live, SwarmConfig};
use clap::Parser;
use glam::DVec3;
use tokio_util::sync::CancellationToken;

/// Headless bots that play a Planetary Survival mesh.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The coordinator's HTTP API.
    #[arg(long, env = "PS_COORDINATOR_HTTP", default_value = "http://127.0.0.1:8080")]
    coordinator: String,
    /// Number of bots.
    #[arg(long, default_value_t = 20)]
    bots: u32,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Join with this development token (servers started with the same
    /// `--dev-token`) instead of logging in through the coordinator.
    #[arg(long, env = "PS_DEV_TOKEN", hide_env_values = true)]
    dev_token: Option<String>,
    /// Bot accounts are named `<prefix><n>`; created on first use.
    #[arg(long, default_value = "bot-")]
    account_prefix: String,
    /// Password of the bot accounts.
    #[arg(long, env = "PS_BOT_PASSWORD", default_value = "bot-password", hide_env_values = true)]
    password: String,
    /// Waypoints, `x,y,z;x,y,z;…`, that every bot walks in a loop, instead of
    /// the behaviour mix.
    #[arg(long)]
    path: Option<String>,
    /// Behaviours and their weights: wander (strolls about its spawn),
    /// commute (crosses the world), oscillate (back and forth over a region
    /// boundary), crowd (mills about the hotspot), dig_build (builds a brick
    /// ball and digs its footing away every 10 s), grab_throw (picks up props
    /// near it and throws them; makes debris when there are none).
    #[arg(long, default_value = "wander=3,commute=2,oscillate=3,crowd=2,dig_build=1,grab_throw=1")]
    mix: String,
    /// Seed of the behaviours' draw and waypoints: the same seed, the same plan.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where crowding bots gather, `x,z`; default: the middle of the first region.
    #[arg(long)]
    hotspot: Option<String>,
    /// Heads and free hands move every tick as a VR player's do (every
    /// avatar's rig is then replicated every tick); off: they hold still.
    #[arg(long)]
    gesture: bool,
    /// Bot i walks the path shifted by i × this along Z, metres.
    #[arg(long, default_value_t = 4.0)]
    spread_m: f64,
    /// Id of the first bot's player account.
    #[arg(long, default_value_t = 1)]
    first_player: u64,
    /// Milliseconds between bot starts.
    #[arg(long, default_value_t = 20)]
    ramp_ms: u64,
    /// Write the report into this directory: `summary.json` and a
    /// self-contained `report.html` with plots (made if missing).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Bearer token for the coordinator's admin views, when it has a viewer
    /// token (the report reads `/v1/servers` to scrape the game servers).
    #[arg(long, env = "PS_VIEWER_TOKEN", hide_env_values = true)]
    viewer_token: Option<String>,
    /// Fail (exit 3) when the round-trip p99 over the run is above this, ms.
    #[arg(long)]
    max_rtt_p99_ms: Option<f64>,
    /// Fail when the p99 handoff gap (old server's last snapshot to the new
    /// one's first) is above this, ms.
    #[arg(long)]
    max_handoff_p99_ms: Option<f64>,
    /// Fail when bots report more errors than this.
    #[arg(long)]
    max_errors: Option<f64>,
    /// Fail when any bot waited longer than this between authoritative
    /// snapshots, ms.
    #[arg(long)]
    max_snapshot_gap_ms: Option<f64>,
    /// Fail when inputs were acknowledged out of order more often than this.
    #[arg(long)]
    max_ack_regressions: Option<f64>,
    /// Fail when the p99 from sending an edit to its durable
    /// acknowledgement is above this, ms (`dig_build`, `grab_throw` bots).
    #[arg(long)]
    max_edit_p99_ms: Option<f64>,
    /// Fail when fewer than this fraction of the bots joined.
    #[arg(long, default_value_t = 1.0)]
    min_joined_fraction: f64,
}

fn parse_path(s: &str) -> anyhow::Result<Vec<DVec3>> {
    s.split(';')
        .map(|p| {
            let v: Vec<f64> = p
                .split(',')
                .map(|c| c.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad waypoint {p:?}"))?;
            match v.as_slice() {
                [x, y, z] if v.iter().all(|c| c.is_finite()) => Ok(DVec3::new(*x, *y, *z)),
                _ => anyhow::bail!("a waypoint is x,y,z, got {p:?}"),
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    svc::init_logging("text", "warn");
    svc::exit_code(run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = SwarmConfig {
        coordinator: cli.coordinator.trim_end_matches('/').to_owned(),
        bots: cli.bots,
        duration: (cli.seconds > 0).then(|| Duration::from_secs(cli.seconds)),
        auth: match cli.dev_token {
            Some(t) => bot_swarm::BotAuth::DevToken(t),
            None => bot_swarm::BotAuth::Login { prefix: cli.account_prefix, password: cli.password },
        },
        path: match &cli.path {
            Some(p) => parse_path(p)?,
            None => Vec::new(),
        },
        mix: match &cli.path {
            Some(_) => None,
            None => Some(bot_swarm::behaviour::parse_mix(&cli.mix).map_err(anyhow::Error::msg)?),
        },
        seed: cli.seed,
        gesture: cli.gesture,
        hotspot: match &cli.hotspot {
            Some(h) => {
                let v: Vec<f64> = h
                    .split(',')
                    .map(|c| c.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("bad hotspot {h:?}"))?;
                match v.as_slice() {
                    [x, z] if x.is_finite() && z.is_finite() => Some(glam::DVec2::new(*x, *z)),
                    _ => anyhow::bail!("the hotspot is x,z, got {h:?}"),
                }
            }
            None => None,
        },
        spread_m: cli.spread_m,
        first_player: cli.first_player,
        ramp: Duration::from_millis(cli.ramp_ms),
        view_token: cli.viewer_token.clone().filter(|t| !t.is_empty()),
    };
    let limits = bot_swarm::report::Limits {
        max_rtt_p99_ms: cli.max_rtt_p99_ms,
        max_handoff_gap_ms: cli.max_handoff_p99_ms,
        max_errors: cli.max_errors,
        min_joined_fraction: Some(cli.min_joined_fraction),
        max_snapshot_gap_ms: cli.max_snapshot_gap_ms,
        max_ack_regressions: cli.max_ack_regressions,
        max_edit_p99_ms: cli.max_edit_p99_ms,
    };
    if let Some(dir) = &cli.report {
        std::fs::create_dir_all(dir).with_context(|| format!("making the report directory {}", dir.display()))?;
    }
    let live = Arc::new(Live::default());
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            svc::shutdown_signal().await;
            stop.cancel();
        });
    }
    let progress = {
        let live = live.clone();
        let tty = std::io::stderr().is_terminal();
        tokio::spawn(async move {
            let (mut last, mut last_handoffs) = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let snaps = live.snapshots.load(Ordering::Relaxed);
                let handoffs = live.handoffs.load(Ordering::Relaxed);
                let line = format!(
                    "bots connected {} · handoffs/s {} · RTT p50 {:.1} ms p99 {:.1} ms · snapshots/s {} · \
                     reconnects {} · errors {}",
                    live.connected.load(Ordering::Relaxed),
                    handoffs - last_handoffs,
                    live.rtt_p50_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    live.rtt_p99_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    snaps - last,
                    live.reconnects.load(Ordering::Relaxed),
                    live.errors.load(Ordering::Relaxed)
                );
                (last, last_handoffs) = (snaps, handoffs);
                if tty { eprint!("\r\x1b[2K{line}") } else { eprintln!("{line}") }
            }
        })
    };
    let report = bot_swarm::run(cfg, live, stop).await;
    progress.abort();
    eprintln!();
    let report = report?;
    let verdicts = limits.judge(&report);
    let summary = serde_json::json!({
        "bots": report.bots, "joined": report.joined, "seconds": report.seconds,
        "snapshots": report.snapshots, "handoffs": report.handoffs,
        "ack_regressions": report.ack_regressions, "errors": report.errors,
        "rtt_p50_ms": report.rtt_p50_ms, "rtt_p99_ms": report.rtt_p99_ms,
        "up_kbps_per_bot": report.up_kbps_per_bot, "down_kbps_per_bot": report.down_kbps_per_bot,
        "handoff_gap_p99_ms": report.handoff_gap_p99_ms,
        "edits_done": report.work.edits_done, "edits_rejected": report.work.edits_rejected,
        "edit_p99_ms": report.work.edit_p99_ms, "throws": report.work.throws, "props_flew": report.work.props_flew,
        "process": report.process,
    });
    println!("{summary}");
    if let Some(dir) = &cli.report {
        let mut full = serde_json::to_value(&report)?;
        full["verdicts"] = serde_json::to_value(&verdicts)?;
        let json = dir.join("summary.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&full)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let page = dir.join("report.html");
        std::fs::write(&page, bot_swarm::report::html(&report, &verdicts))
            .with_context(|| format!("writing {}", page.display()))?;
        eprintln!("report: {} and {}", json.display(), page.display());
    }
    if report.joined == 0 && report.bots > 0 {
        // Nothing was measured: say why, plainly, and fail before judging limits.
        let why = report.per_bot.iter().flat_map(|b| b.errors.first()).next().cloned();
        eprintln!("no bot could join the mesh: {}", why.as_deref().unwrap_or("the run ended before any bot joined"));
        std::process::exit(2);
    }
    let failed: Vec<String> =
        verdicts.iter().filter(|v| !v.ok).map(|v| format!("{} = {:.2} (limit {})", v.name, v.value, v.limit)).collect();
    if !failed.is_empty() {
        eprintln!("limits not met: {}", failed.join(", "));
        std::process::exit(3);
    }
    Ok(())
}
