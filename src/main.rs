//! The `mqtt-chaos` binary: parses the command line, sets up logging, runs the proxy until
//! SIGINT or SIGTERM. Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or configuration.

use clap::Parser;
use mqtt_chaos::cli::{CheckArgs, Cli, Command, LogFormat, ProxyArgs};
use mqtt_chaos::fault::profile;
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
        Command::Check(args) => check(&args),
    }
}

/// `mqtt-chaos check FILE…`: every profile is loaded and validated; all errors are reported.
fn check(args: &CheckArgs) -> ExitCode {
    let mut failed = 0;
    for name in &args.files {
        let path = profile::resolve(name, &args.profiles_dir);
        match profile::load_profile(&path) {
            Ok(p) => {
                let n = p.rules.len();
                println!(
                    "ok: {} ({}: {n} rule{})",
                    path.display(),
                    p.spec.name,
                    if n == 1 { "" } else { "s" }
                );
            }
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    if failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS }
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
    let profile = match args.profile() {
        Ok(profile) => profile,
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
    if let Some(p) = profile {
        let names: Vec<_> = p.rules.iter().map(|r| r.name().to_string()).collect();
        tracing::info!(profile = %p.spec.name, rules = ?names, "profile active");
        proxy.set_rules(p.rule_set());
    }
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
