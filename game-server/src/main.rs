use clap::Parser;

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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    svc::init_logging(&cli.log_format, "info");
    // Two I/O workers; the simulation has a thread of its own.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("io").build()
    {
        Ok(rt) => rt,
        Err(e) => return svc::exit_code(Err(e.into())),
    };
    match rt.block_on(game_server::run(cli.config, svc::shutdown_signal())) {
        Ok(game_server::Exit::Shutdown) => std::process::ExitCode::SUCCESS,
        // Fenced by a newer owner of its regions: out at once, with a code
        // of its own (see `Exit`).
        Ok(game_server::Exit::Fenced) => std::process::exit(3),
        Err(e) => svc::exit_code(Err(e)),
    }
}
