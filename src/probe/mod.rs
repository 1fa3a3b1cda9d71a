//! `mqtt-chaos probe`: one command that tells how a broker handles dead connections.
//!
//! It finds out which MQTT versions the broker accepts (a CONNECT straight to it), starts the
//! proxy in process (the same [`Proxy`] as `mqtt-chaos proxy`) in front of it with one rule per
//! scenario (matched by client id), subscribes a Will watcher straight to the broker, and runs
//! every scenario × protocol at once with raw clients through the proxy, the repeats of each
//! starting spread over a broker's timer phase ([`stagger`]). Closes are
//! read from the proxy's connection records, Wills from the watcher; [`judge`] turns them into
//! verdicts, [`report`] into the table, Markdown, JSON and JUnit.
//!
//! | file | owns |
//! |---|---|
//! | `client.rs` | raw MQTT clients on the project's codec; the Will watcher |
//! | `scenario.rs` | the scenarios: what each client does, which rule, one run's judgement |
//! | `judge.rs` | verdicts and tolerances, pure |
//! | `report.rs` | adding runs up; the report's forms (JSON schema 1 in PROBE.md) |
//! | `embedded.rs` | the embedded broker (rumqttd) |
//! | `progress.rs` | one line per scenario as it starts and ends; a live status line on a terminal |

pub mod client;
pub mod embedded;
pub mod judge;
pub mod progress;
pub mod report;
pub mod scenario;

use crate::client::{Dial, Handshake, RawClient};
use crate::codec::Protocol;
use crate::codec::encode::ConnectSpec;
use crate::config::{Address, RouteConfig, Settings};
use crate::fault::{RuleSet, RuleSpec, compile_rules};
use crate::server::Proxy;
use crate::tls::RouteTls;
use client::Sightings;
use judge::{Tolerance, Verdict};
use progress::Progress;
use report::{Broker, Refused, Report, Row};
pub use scenario::Scenario;
use scenario::{Closes, Ctx};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker (`host:port`, transport, WebSocket path); `None` starts the embedded one.
    pub broker: Option<Address>,
    /// TLS towards an `mqtts://`/`wss://` broker (its `upstream` side).
    pub tls: RouteTls,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// In report order.
    pub protocols: Vec<Protocol>,
    pub keepalive: u16,
    pub scenarios: Vec<Scenario>,
    pub repeat: u32,
    /// How long past what the specification allows to wait for a close or a Will.
    pub timeout: Duration,
    pub strict: bool,
}

impl Options {
    /// How the probe's own clients reach the broker at `addr` (the watcher, the identification).
    fn dial<'a>(&'a self, addr: &'a str) -> Dial<'a> {
        let ws_path = self.broker.as_ref().and_then(|b| b.path.as_deref());
        Dial { addr, tls: self.tls.upstream.as_deref(), ws_path }
    }
}

/// Why the probe could not run (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach the broker at {address}: {cause}")]
    Unreachable { address: String, cause: String },
    #[error("the broker at {address} refused the probe: {how}")]
    Refused { address: String, how: String },
    /// The reply to a CONNECT was no CONNACK (an HTTP or TLS server, a malformed CONNACK).
    #[error("the broker at {address} gave no valid CONNACK to the MQTT {protocol} CONNECT: {what}")]
    NotMqtt { address: String, protocol: &'static str, what: String },
    #[error("{0}")]
    Setup(String),
}

/// `mqtt://host:port`, `tcp://host:port`, `host:port` or `host` (port 1883); `mqtts://`/`ssl://`
/// (port 8883); `ws://host[:port][/path]` (port 80), `wss://…` (port 443), path `/mqtt` by default.
pub fn parse_broker_url(url: &str) -> Result<Address, String> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
    let port = match scheme {
        "mqtt" | "tcp" => 1883,
        "mqtts" | "ssl" => 8883,
        "ws" => 80,
        "wss" => 443,
        _ => {
            return Err(format!(
                "--broker {url}: unknown scheme {scheme:?}; use mqtt://, mqtts://, ws:// or wss://"
            ));
        }
    };
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    if host.is_empty() {
        return Err(format!("--broker {url}: expected {scheme}://HOST:PORT"));
    }
    let has_port = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') && (!h.contains(':') || h.ends_with(']')) => {
            port.parse::<u16>().map_err(|_| format!("--broker {url}: invalid port {port:?}"))?;
            true
        }
        _ => false,
    };
    let host_port = if has_port {
        host.to_string()
    } else if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    crate::config::parse_address("--broker", &format!("{scheme}://{host_port}/{path}"))
}

/// Runs the probe; the report says what the broker did.
pub async fn run(opts: &Options, progress: &Progress) -> Result<Report, ProbeError> {
    let began = Instant::now();
    let tol = Tolerance::default();
    let (targets, address, implementation) = match &opts.broker {
        Some(b) => {
            let targets = opts.protocols.iter().map(|&p| (p, b.host_port.clone())).collect::<HashMap<_, _>>();
            (targets, b.to_string(), None)
        }
        None => {
            let e = embedded::start().map_err(ProbeError::Setup)?;
            let t = HashMap::from([(Protocol::V311, e.v4.to_string()), (Protocol::V5, e.v5.to_string())]);
            let address = format!("{} (MQTT 3.1.1), {} (MQTT 5)", e.v4, e.v5);
            (t, address, Some(embedded::IMPLEMENTATION.to_string()))
        }
    };
    let run_id = run_id(&address);
    let prefix = format!("mcp{run_id}");
    let mut broker = Broker {
        address: address.clone(),
        embedded: opts.broker.is_none(),
        implementation,
        protocols: Vec::new(),
        refused: Vec::new(),
        server_keepalive: None,
        assigned_client_id: None,
        reason_strings: Vec::new(),
    };
    let mut accepted = Vec::new();
    for &p in &opts.protocols {
        match identify(opts.dial(&targets[&p]), p, opts, &prefix, &mut broker.reason_strings).await? {
            Ok(connack) => {
                accepted.push(p);
                broker.protocols.push(p.version());
                if p == Protocol::V5 {
                    broker.server_keepalive = connack.server_keep_alive;
                    broker.assigned_client_id = connack.assigned_client_id;
                    if let Some(r) = connack.reason_string {
                        if !broker.reason_strings.contains(&r) {
                            broker.reason_strings.push(r);
                        }
                    }
                }
            }
            Err(how) => broker.refused.push(Refused { protocol: p.version(), how }),
        }
    }
    if accepted.is_empty() {
        let how = broker
            .refused
            .iter()
            .map(|r| format!("MQTT {}: {}", r.protocol, crate::text::escaped(&r.how)))
            .collect::<Vec<_>>();
        return Err(ProbeError::Refused { address, how: how.join("; ") });
    }

    // The proxy: one route per accepted protocol (the embedded broker has one port for each).
    let routes: Vec<RouteConfig> = accepted
        .iter()
        .map(|&p| RouteConfig {
            tls: opts.tls.clone(),
            upstream_ws: opts.broker.as_ref().and_then(|b| b.path.clone()),
            ..RouteConfig::tcp(format!("probe-mqtt{}", p.level()), "127.0.0.1:0", targets[&p].clone())
        })
        .collect();
    let proxy = Proxy::bind(&routes, Settings { shutdown_grace: Duration::ZERO, ..Settings::default() })
        .await
        .map_err(|e| ProbeError::Setup(e.to_string()))?;
    let specs: Vec<RuleSpec> = opts
        .scenarios
        .iter()
        .filter_map(|s| s.rule(&prefix, opts.keepalive))
        .map(|v| serde_json::from_value(v).expect("the probe's rules are valid specs"))
        .collect();
    let rules =
        compile_rules(&specs, "probe").map_err(|e| ProbeError::Setup(format!("the probe's rules: {e}")))?;
    proxy.set_rules(RuleSet::new(Some("probe".into()), None, rules));
    let running = proxy.start();
    let closes = Arc::new(Closes::default());
    tokio::spawn(closes.clone().follow(running.registry().clone()));
    let proxy_addrs: HashMap<Protocol, String> =
        accepted.iter().zip(running.routes()).map(|(&p, r)| (p, r.listen.to_string())).collect();

    // The Will watcher: a subscriber straight to the broker (one per broker address).
    let topic_root = format!("mqtt-chaos/probe/{run_id}");
    let sightings = Arc::new(Sightings::default());
    let mut watched: Vec<&String> = Vec::new();
    let mut watchers = Vec::new();
    for &p in &accepted {
        let addr = &targets[&p];
        if watched.contains(&addr) {
            continue;
        }
        watched.push(addr);
        let mut connect = ConnectSpec::new(p, format!("{prefix}w{}", watchers.len()), 60);
        connect.username.clone_from(&opts.username);
        connect.password.clone_from(&opts.password);
        let filter = format!("{topic_root}/#");
        let task = client::watch(opts.dial(addr), connect, &filter, sightings.clone())
            .await
            .map_err(|e| ProbeError::Setup(format!("the Will watcher on {addr}: {e}")))?;
        watchers.push(task);
    }

    let ctx = Ctx {
        k: opts.keepalive,
        tol,
        timeout: opts.timeout,
        proxy: proxy_addrs,
        closes,
        sightings,
        prefix,
        topic_root,
        username: opts.username.clone(),
        password: opts.password.clone(),
        reason_strings: Default::default(),
    };
    let mut plan: Vec<(Scenario, Protocol)> = Vec::new();
    for &s in &opts.scenarios {
        for &p in &opts.protocols {
            if !(s.mqtt5_only() && p != Protocol::V5) {
                plan.push((s, p));
            }
        }
    }
    progress.plan(plan.iter().filter(|(_, p)| accepted.contains(p)).count());
    let jobs = plan.iter().map(|&(s, p)| {
        let (ctx, accepted, broker) = (&ctx, &accepted, &broker);
        async move {
            if !accepted.contains(&p) {
                let why =
                    broker.refused.iter().find(|r| r.protocol == p.version()).map_or("", |r| r.how.as_str());
                return report::not_run(
                    s,
                    p,
                    opts.keepalive,
                    &tol,
                    format!("the broker does not accept MQTT {} ({why})", p.version()),
                );
            }
            let label = format!("{} (MQTT {})", s.id(), p.version());
            progress.start(&label);
            let runs = futures_util::future::join_all((1..=opts.repeat).map(|i| async move {
                tokio::time::sleep(stagger(i - 1)).await;
                scenario::run(ctx, s, p, i).await
            }))
            .await;
            let row = report::row(s, p, opts.keepalive, &tol, &runs);
            progress.finish(&label, row.verdict, &row.detail);
            row
        }
    });
    let results: Vec<Row> = futures_util::future::join_all(jobs).await;
    for task in watchers {
        task.abort();
    }
    running.shutdown().await;
    for r in std::mem::take(&mut *ctx.reason_strings.lock().expect("reason strings lock")) {
        if !broker.reason_strings.contains(&r) {
            broker.reason_strings.push(r);
        }
    }
    let summary = report::Summary::of(&results);
    Ok(Report {
        schema: report::SCHEMA,
        version: env!("CARGO_PKG_VERSION"),
        broker,
        keepalive: opts.keepalive,
        repeat: opts.repeat,
        timeout_s: opts.timeout.as_secs_f64(),
        strict: opts.strict,
        tolerance: tol,
        results,
        summary,
        duration_s: (began.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        run_id,
    })
}

/// The exit code a report asks for: 1 when something fails (or deviates, with `--strict`).
pub fn exit_code(r: &Report) -> u8 {
    let failing = |v: Verdict| v == Verdict::Fails || (r.strict && v == Verdict::Deviates);
    u8::from(r.results.iter().any(|row| failing(row.verdict)))
}

/// The longest a run waits before it starts: the repeats of a scenario start spread over this
/// window, the period of the coarsest Keep Alive timer known (mosquitto 2.0 checks every 6 s,
/// in whole seconds).
pub const STAGGER_WINDOW: Duration = Duration::from_secs(6);

/// When run `i` (from 0) of a scenario starts, after the first: `frac(i × φ)` (φ the golden
/// ratio) of [`STAGGER_WINDOW`]. Run 0 starts at once (`--repeat 1` waits for nothing); the
/// starts of any number of runs fall evenly over the window, and so over every phase of a
/// broker's timer of up to 6 s, whole seconds included, instead of all in the same phase.
pub fn stagger(i: u32) -> Duration {
    const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
    STAGGER_WINDOW.mul_f64((f64::from(i) * PHI_FRAC).fract())
}

/// Twelve hex digits that keep this run's client ids and Will topics apart from every other
/// probe's, even one started at the same instant against the same broker: the process id (two
/// processes alive at once have different ones) and 24 bits of a hash of the clock, the
/// broker's address and the process's random hash keys (for probes on other hosts).
fn run_id(address: &str) -> String {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().hash(&mut h);
    address.hash(&mut h);
    std::process::id().hash(&mut h);
    format!("{:06x}{:06x}", std::process::id() & 0xff_ffff, h.finish() & 0xff_ffff)
}

/// A CONNECT straight to the broker: `Ok(CONNACK)` if accepted, `Err(how)` if this version is
/// refused; a broker that cannot be reached or refuses the credentials stops the probe.
async fn identify(
    dial: Dial<'_>,
    protocol: Protocol,
    opts: &Options,
    prefix: &str,
    reason_strings: &mut Vec<String>,
) -> Result<Result<crate::codec::Connack, String>, ProbeError> {
    let within = opts.timeout.min(Duration::from_secs(10));
    // MQTT 5 with an empty client id shows the id the broker assigns; some refuse it (0x85).
    let ids: &[&str] = if protocol == Protocol::V5 { &["", "id"] } else { &["id"] };
    let mut last = String::new();
    let addr = opts.broker.as_ref().map_or_else(|| dial.addr.to_string(), ToString::to_string);
    'ids: for id in ids {
        // A broker may drop a connection while it starts or under load: a close before any
        // CONNACK is asked again once before it counts as the version's refusal.
        for attempt in 0..2 {
            let mut c = RawClient::open(dial, protocol, within)
                .await
                .map_err(|e| ProbeError::Unreachable { address: addr.clone(), cause: e.to_string() })?;
            let client_id =
                if id.is_empty() { String::new() } else { format!("{prefix}{id}{}", protocol.level()) };
            let mut connect = ConnectSpec::new(protocol, client_id, opts.keepalive);
            connect.username.clone_from(&opts.username);
            connect.password.clone_from(&opts.password);
            let h = c.handshake(&connect, Instant::now() + within).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    ProbeError::NotMqtt {
                        address: addr.clone(),
                        protocol: protocol.version(),
                        what: e.to_string(),
                    }
                } else {
                    ProbeError::Unreachable { address: addr.clone(), cause: e.to_string() }
                }
            })?;
            if let Some(r) = c.disconnect_reason_string() {
                if !reason_strings.iter().any(|x| x == r) {
                    reason_strings.push(r.to_string());
                }
            }
            match h {
                Handshake::Accepted(connack) => {
                    c.disconnect().await;
                    return Ok(Ok(connack));
                }
                Handshake::Refused(connack) if matches!(connack.code, 0x04 | 0x05 | 0x86 | 0x87) => {
                    let hint = if opts.username.is_some() {
                        "check --username and --password-file"
                    } else {
                        "it may need --username and --password-file"
                    };
                    return Err(ProbeError::Refused {
                        address: addr.clone(),
                        how: format!(
                            "MQTT {} CONNACK code {:#04x} (not authorized{}); {hint}",
                            protocol.version(),
                            connack.code,
                            connack
                                .reason_string
                                .map(|r| format!(": {}", crate::text::escaped(&r)))
                                .unwrap_or_default()
                        ),
                    });
                }
                Handshake::Refused(connack) if connack.code == 0x85 && id.is_empty() => {
                    last = "an empty client id refused (0x85)".into();
                    continue 'ids;
                }
                Handshake::Closed(_) if attempt == 0 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => {
                    last = scenario::refusal(&other);
                    if let Handshake::Refused(connack) = other {
                        if let Some(r) = connack.reason_string {
                            last.push_str(&format!(" ({r})"));
                        }
                    }
                    break 'ids;
                }
            }
        }
    }
    Ok(Err(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Transport;

    #[test]
    fn broker_urls_take_every_scheme_with_its_default_port() {
        let url = |u: &str| parse_broker_url(u).map(|a| a.to_string());
        assert_eq!(url("mqtt://broker.local:1884").unwrap(), "broker.local:1884");
        assert_eq!(url("tcp://10.1.2.3:1883/").unwrap(), "10.1.2.3:1883");
        assert_eq!(url("broker.local").unwrap(), "broker.local:1883");
        assert_eq!(url("127.0.0.1:18830").unwrap(), "127.0.0.1:18830");
        assert_eq!(url("mqtt://[::1]:1884").unwrap(), "[::1]:1884");
        assert_eq!(url("[::1]").unwrap(), "[::1]:1883");
        assert_eq!(url("::1").unwrap(), "[::1]:1883");
        assert_eq!(url("mqtts://b").unwrap(), "mqtts://b:8883");
        assert_eq!(url("ssl://b:8884").unwrap(), "mqtts://b:8884");
        assert_eq!(url("ws://b").unwrap(), "ws://b:80/mqtt");
        assert_eq!(url("ws://b:8080/").unwrap(), "ws://b:8080/mqtt");
        assert_eq!(url("wss://[::1]/ws").unwrap(), "wss://[::1]:443/ws");
        let tls = parse_broker_url("mqtts://b:8883").unwrap();
        assert_eq!((tls.transport, tls.host_port.as_str(), tls.path), (Transport::Tls, "b:8883", None));
        assert!(url("http://b").unwrap_err().contains("unknown scheme \"http\""));
        assert!(url("b:99999").unwrap_err().contains("invalid port"));
        assert!(url("mqtt://b:1883/path").unwrap_err().contains("a path only goes with ws:// or wss://"));
        assert!(url("").is_err());
        assert!(url("mqtts://").is_err());
    }

    #[test]
    fn repeats_start_spread_over_every_phase_of_a_six_second_timer() {
        assert_eq!(stagger(0), Duration::ZERO, "--repeat 1 waits for nothing");
        for n in 2..=100u32 {
            let starts: Vec<f64> = (0..n).map(|i| stagger(i).as_secs_f64()).collect();
            assert!(starts.iter().all(|&s| (0.0..6.0).contains(&s)), "{n}: {starts:?}");
            // The largest gap between starts on the 6 s circle, and on a whole-second one (a
            // broker that rounds to whole seconds): none is left unvisited for long.
            for period in [6.0, 1.0] {
                let mut phases: Vec<f64> = starts.iter().map(|s| s % period).collect();
                phases.sort_by(f64::total_cmp);
                let wrap = period - phases[phases.len() - 1] + phases[0];
                let widest = phases.windows(2).map(|w| w[1] - w[0]).fold(wrap, f64::max);
                let runs = if period == 6.0 { n } else { n.min(6) };
                assert!(widest <= 2.7 * period / f64::from(runs), "{n} runs, period {period}: gap {widest}");
            }
        }
        // Three runs against mosquitto's 6 s check: three different phases, over 1 s apart.
        let three: Vec<f64> = (0..3).map(|i| stagger(i).as_secs_f64()).collect();
        assert!((three[1] - 3.708).abs() < 0.01 && (three[2] - 1.416).abs() < 0.01, "{three:?}");
    }

    #[test]
    fn run_ids_differ_between_processes_and_client_ids_stay_within_23_characters() {
        let id = run_id("b:1883");
        assert_eq!(id.len(), 12);
        assert!(id.starts_with(&format!("{:06x}", std::process::id() & 0xff_ffff)), "{id}");
        // The hash keys are random per process and call: two ids at the same instant differ.
        assert_ne!(run_id("b:1883")[6..], run_id("b:1883")[6..]);
        let prefix = format!("mcp{id}");
        let longest = scenario::client_id(&prefix, Scenario::ServerKeepalive, Protocol::V5, 100, "m");
        assert_eq!(longest.len(), 23, "{longest}");
    }

    #[test]
    fn the_exit_code_is_1_for_fails_and_for_deviates_only_when_strict() {
        let tol = Tolerance::default();
        let row = |v: Verdict| {
            let mut r = report::not_run(Scenario::Keepalive, Protocol::V311, 2, &tol, String::new());
            r.verdict = v;
            r
        };
        let report = |rows: Vec<Row>, strict: bool| Report {
            schema: report::SCHEMA,
            version: "test",
            broker: Broker {
                address: "b:1883".into(),
                embedded: false,
                implementation: None,
                protocols: vec!["3.1.1"],
                refused: Vec::new(),
                server_keepalive: None,
                assigned_client_id: None,
                reason_strings: Vec::new(),
            },
            keepalive: 2,
            repeat: 1,
            timeout_s: 20.0,
            strict,
            tolerance: tol,
            summary: report::Summary::of(&rows),
            results: rows,
            duration_s: 1.0,
            run_id: String::new(),
        };
        assert_eq!(exit_code(&report(vec![row(Verdict::Conforms), row(Verdict::NotApplicable)], false)), 0);
        assert_eq!(exit_code(&report(vec![row(Verdict::Deviates)], false)), 0);
        assert_eq!(exit_code(&report(vec![row(Verdict::Deviates)], true)), 1);
        assert_eq!(exit_code(&report(vec![row(Verdict::Conforms), row(Verdict::Fails)], false)), 1);
    }
}
