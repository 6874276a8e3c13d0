use clap::Parser;

/// The Planetary Survival mesh coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: mesh_coordinator::Config,
    /// Log format: text or json.
    #[arg(long, env = "PS_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    svc::init_logging(&cli.log_format, "info");
    svc::exit_code(mesh_coordinator::run(cli.config, svc::shutdown_signal()).await)
}
