use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A Planetary Survival game server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: game_server::Config,
    /// Log format: text or json.
    #[arg(long, env = "PS_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("PS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        fmt.json().init()
    } else {
        fmt.init()
    }
    // Two I/O workers; the simulation has a thread of its own.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("io").build()?;
    match rt.block_on(game_server::run(cli.config, shutdown_signal()))? {
        game_server::Exit::Shutdown => Ok(()),
        game_server::Exit::Fenced => std::process::exit(3),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
