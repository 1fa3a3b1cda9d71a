//! The `mqtt-chaos` binary: parses the command line, sets up logging, runs the proxy until
//! SIGINT or SIGTERM. Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or configuration.

use clap::Parser;
use mqtt_chaos::cli::{CheckArgs, Cli, Command, CtlArgs, CtlCommand, LogFormat, ProxyArgs};
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
        Command::Proxy(args) => runtime.block_on(proxy(*args)),
        Command::Check(args) => check(&args),
        Command::Ctl(args) => runtime.block_on(ctl(args)),
    }
}

/// `mqtt-chaos ctl …`: one admin API request, printed as a table or JSON.
async fn ctl(args: CtlArgs) -> ExitCode {
    use mqtt_chaos::ctl;
    let client = match ctl::Client::new(&args.admin, args.admin_token.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqtt-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let json = Some("application/json");
    let request = match &args.command {
        CtlCommand::Connections => Ok(("GET", "/connections".to_string(), None, Vec::new())),
        CtlCommand::Kill { id, how } => {
            Ok(("DELETE", format!("/connections/{id}?how={how}"), None, Vec::new()))
        }
        CtlCommand::Rules => Ok(("GET", "/rules".to_string(), None, Vec::new())),
        CtlCommand::Add { rule } => ctl::rule_body(rule).map(|b| ("POST", "/rules".to_string(), json, b)),
        CtlCommand::Remove { name } => Ok(("DELETE", format!("/rules/{name}"), None, Vec::new())),
        CtlCommand::Profile { profile } => {
            if std::path::Path::new(profile).is_file() {
                std::fs::read(profile)
                    .map(|b| ("PUT", "/profile".to_string(), Some("application/toml"), b))
                    .map_err(|e| format!("{profile}: {e}"))
            } else {
                let body = serde_json::json!({ "name": profile }).to_string().into_bytes();
                Ok(("PUT", "/profile".to_string(), json, body))
            }
        }
        CtlCommand::Reset => Ok(("POST", "/reset".to_string(), None, Vec::new())),
    };
    let (method, path, content_type, body) = match request {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqtt-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let reply = match client.request(method, &path, content_type, &body).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqtt-chaos: {e}");
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&reply.status) {
        eprintln!("mqtt-chaos: {} ({})", reply.error(), reply.status);
        return ExitCode::from(1);
    }
    if args.json {
        println!("{}", reply.body);
        return ExitCode::SUCCESS;
    }
    let value = reply.json().unwrap_or_default();
    match &args.command {
        CtlCommand::Connections => print!("{}", ctl::connections_table(&value)),
        CtlCommand::Rules | CtlCommand::Profile { .. } => print!("{}", ctl::rules_table(&value)),
        CtlCommand::Kill { id, how } => println!("closed connection {id} ({how})"),
        CtlCommand::Add { .. } => println!("added rule {}", value["name"].as_str().unwrap_or("")),
        CtlCommand::Remove { name } => println!("removed rule {name}"),
        CtlCommand::Reset => println!("all rules removed"),
    }
    ExitCode::SUCCESS
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
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("mqtt-chaos: {message}");
            return ExitCode::from(2);
        }
    };
    let proxy = match Proxy::bind(&routes, settings).await {
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
    let admin = match args.admin.as_str() {
        "none" => None,
        addr => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("mqtt-chaos: cannot listen on {addr} for the admin API (--admin): {e}");
                return ExitCode::from(1);
            }
        },
    };
    let running = proxy.start();
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_task = admin.map(|listener| {
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
        if !loopback && args.admin_token.is_none() {
            tracing::warn!(admin = %addr, "the admin API listens beyond loopback without --admin-token");
        }
        tracing::info!(admin = %addr, "admin API listening");
        let app =
            mqtt_chaos::admin::app(running.control(args.profiles_dir.clone(), args.admin_token.clone()));
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the admin API stopped");
            }
        })
    });
    let signal = shutdown_signal().await;
    tracing::info!(signal, "shutting down");
    let report = running.shutdown().await;
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
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
