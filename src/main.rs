//! The `mqtt-chaos` binary: parses the command line, sets up logging, runs the proxy until
//! SIGINT or SIGTERM. Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or configuration.

use clap::Parser;
use mqtt_chaos::cli::{Cli, Command, LogFormat, ProxyArgs};
use mqtt_chaos::server::Proxy;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtt-chaos: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Proxy(args) => runtime.block_on(proxy(args)),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

async fn proxy(args: ProxyArgs) -> ExitCode {
    let routes = match args.routes() {
        Ok(routes) => routes,
        Err(message) => {
            eprintln!("mqtt-chaos: {message}");
            return ExitCode::from(2);
        }
    };
    let proxy = match Proxy::bind(&routes, args.settings()).await {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("mqtt-chaos: {e}");
            return ExitCode::from(1);
        }
    };
    let running = proxy.start();
    let signal = shutdown_signal().await;
    tracing::info!(signal, "shutting down");
    let report = running.shutdown().await;
    tracing::info!(closed_after_grace = report.closed_after_grace, "stopped");
    ExitCode::SUCCESS
}

/// Waits for SIGINT or SIGTERM and names it.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
