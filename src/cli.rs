//! The command line: `mqtt-chaos proxy …`. Every flag can also come from an environment
//! variable `MQTT_CHAOS_<FLAG>` (shown in `--help`).

use crate::config::{self, OnMalformed, RouteConfig, Settings};
use crate::fault::Profile;
use crate::fault::profile;
use crate::observer::ObserverProtocol;
use crate::transport::Transport;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "mqtt-chaos",
    version,
    about = "An MQTT-aware chaos proxy: break Keep Alive on purpose, measure who notices"
)]
pub struct Cli {
    /// Log output format (the level comes from RUST_LOG, default `info`).
    #[arg(long, global = true, env = "MQTT_CHAOS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: one route from --listen/--upstream, or several from --config.
    Proxy(Box<ProxyArgs>),
    /// Validate fault profiles: exit 0 if all are valid, else 2 with file:line:col and the reason.
    Check(CheckArgs),
    /// Talk to a running proxy's admin API.
    Ctl(CtlArgs),
    /// List the profiles `--profile NAME` finds: the files in --profiles-dir and the built-in ones.
    Profiles(ProfilesArgs),
    /// Tell how a broker handles dead connections: Keep Alive, half-open, takeover, Wills. Without
    /// --broker it starts an embedded broker. Exit 0: nothing fails; 1: something fails; 2: bad
    /// usage or an unreachable broker.
    Probe(Box<ProbeArgs>),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The broker: mqtt://HOST:PORT, HOST:PORT or HOST (port 1883 when none is given),
    /// mqtts://HOST:PORT (TLS, 8883), ws://HOST:PORT/PATH or wss://HOST:PORT/PATH (MQTT over
    /// WebSocket, 80/443, path /mqtt). Without it the probe starts an embedded broker (rumqttd)
    /// on free loopback ports.
    #[arg(long, env = "MQTT_CHAOS_PROBE_BROKER", value_name = "URL")]
    pub broker: Option<String>,

    /// TLS towards an mqtts:// or wss:// broker.
    #[command(flatten)]
    pub tls: UpstreamTlsArgs,

    /// Username for every CONNECT the probe sends.
    #[arg(long, env = "MQTT_CHAOS_PROBE_USERNAME", value_name = "USER")]
    pub username: Option<String>,

    /// File with the password (one line; or set MQTT_CHAOS_PROBE_PASSWORD). Never printed.
    #[arg(long, env = "MQTT_CHAOS_PROBE_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// MQTT versions to probe, comma-separated: 3.1.1, 5.
    #[arg(long, env = "MQTT_CHAOS_PROBE_PROTOCOL", default_value = "3.1.1,5", value_name = "LIST")]
    pub protocol: String,

    /// The Keep Alive k the scenarios use, seconds (1–3600).
    #[arg(long, env = "MQTT_CHAOS_PROBE_KEEPALIVE", default_value_t = 2, value_name = "SECS")]
    pub keepalive: u64,

    /// Scenarios to run, comma-separated (default: all): keepalive, ping-resets, half-open,
    /// keepalive-zero, takeover, server-keepalive, will-delay, rewrite.
    #[arg(long, env = "MQTT_CHAOS_PROBE_SCENARIOS", value_name = "LIST")]
    pub scenarios: Option<String>,

    /// Runs of each scenario (1–100); the report gives min/median/max. They overlap, their starts
    /// spread over 6 s (run i starts frac(i × 0.618) × 6 s after the first) so that a broker's
    /// coarse Keep Alive timer (mosquitto 2.0: every 6 s) is met in every phase.
    #[arg(long, env = "MQTT_CHAOS_PROBE_REPEAT", default_value_t = 1, value_name = "N")]
    pub repeat: u32,

    /// How long past what the specification allows to wait for a close or a Will before calling
    /// it missing, seconds (1–3600).
    #[arg(long, env = "MQTT_CHAOS_PROBE_TIMEOUT", default_value_t = 20, value_name = "SECS")]
    pub timeout: u64,

    /// Write the report as JSON (schema 1, PROBE.md).
    #[arg(long, env = "MQTT_CHAOS_PROBE_JSON", value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the report as JUnit XML: one test case per scenario × protocol.
    #[arg(long, env = "MQTT_CHAOS_PROBE_JUNIT", value_name = "FILE")]
    pub junit: Option<PathBuf>,

    /// Write the report as Markdown.
    #[arg(long, env = "MQTT_CHAOS_PROBE_MARKDOWN", value_name = "FILE")]
    pub markdown: Option<PathBuf>,

    /// Exit 1 when something deviates, too (not only when something fails).
    #[arg(long, env = "MQTT_CHAOS_PROBE_STRICT")]
    pub strict: bool,
}

impl ProbeArgs {
    /// The probe's options, checked; errors name the flag.
    pub fn options(&self) -> Result<crate::probe::Options, String> {
        use crate::codec::Protocol;
        use crate::probe::{Scenario, parse_broker_url};
        let broker = self.broker.as_deref().map(parse_broker_url).transpose()?;
        let transport = broker.as_ref().map_or(Transport::Tcp, |b| b.transport);
        if !transport.tls()
            && let Some(flag) = self.tls.options().upstream_given()
        {
            return Err(format!(
                "{flag} only applies to a TLS broker: give --broker as mqtts://HOST:PORT or wss://HOST:PORT/PATH"
            ));
        }
        let tls = match &broker {
            Some(b) => {
                crate::tls::RouteTls::load(self.tls.options(), Transport::Tcp, transport, &b.host_port)
                    .map_err(|e| e.to_string())?
            }
            None => crate::tls::RouteTls::default(),
        };
        let mut protocols = Vec::new();
        for p in self.protocol.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let p = match p {
                "3.1.1" | "4" => Protocol::V311,
                "5" | "5.0" => Protocol::V5,
                other => {
                    return Err(format!("--protocol: unknown MQTT version {other:?}; use 3.1.1, 5 or both"));
                }
            };
            if !protocols.contains(&p) {
                protocols.push(p);
            }
        }
        protocols.sort_by_key(|p| p.level());
        if protocols.is_empty() {
            return Err("--protocol: name at least one of 3.1.1, 5".into());
        }
        let scenarios = match self.scenarios.as_deref().map(str::trim) {
            None | Some("" | "all") => Scenario::ALL.to_vec(),
            Some(list) => {
                let mut out = Vec::new();
                for id in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let s = Scenario::parse(id).ok_or_else(|| {
                        let all: Vec<_> = Scenario::ALL.iter().map(|s| s.id()).collect();
                        format!("--scenarios: unknown scenario {id:?}; the scenarios are {}", all.join(", "))
                    })?;
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
                out.sort();
                out
            }
        };
        if !(1..=3600).contains(&self.keepalive) {
            return Err(format!("--keepalive {}: must be 1 to 3600 seconds", self.keepalive));
        }
        if !(1..=100).contains(&self.repeat) {
            return Err(format!("--repeat {}: must be 1 to 100", self.repeat));
        }
        if !(1..=3600).contains(&self.timeout) {
            return Err(format!("--timeout {}: must be 1 to 3600 seconds", self.timeout));
        }
        let password =
            password("--password-file", self.password_file.as_deref(), "MQTT_CHAOS_PROBE_PASSWORD")?
                .map(String::into_bytes);
        Ok(crate::probe::Options {
            broker,
            tls,
            username: self.username.clone(),
            password,
            protocols,
            keepalive: u16::try_from(self.keepalive).expect("checked: 1 to 3600"),
            scenarios,
            repeat: self.repeat,
            timeout: Duration::from_secs(self.timeout),
            strict: self.strict,
        })
    }
}

/// A password from `file` (its content without the final line ending; `flag` names it in the
/// error), else from the environment variable `env`. Never printed.
fn password(flag: &str, file: Option<&std::path::Path>, env: &str) -> Result<Option<String>, String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|p| Some(p.trim_end_matches(['\r', '\n']).to_string()))
            .map_err(|e| format!("{flag} {}: {e}", path.display())),
        None => Ok(std::env::var(env).ok()),
    }
}

#[derive(Debug, Args)]
pub struct ProfilesArgs {
    /// Where profile files are looked up (they override built-in profiles of the same name).
    #[arg(long, env = "MQTT_CHAOS_PROFILES_DIR", default_value = "profiles", value_name = "DIR")]
    pub profiles_dir: PathBuf,

    /// Print JSON (the admin API's `GET /profiles` form) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The proxy's admin API (before or after the subcommand; default http://127.0.0.1:9184).
    /// Several: repeat the flag or give a comma-separated list; the command goes to every proxy
    /// at once (not kill, --conn nor watch, which name one proxy's connections).
    #[arg(long, global = true, env = "MQTT_CHAOS_ADMIN_URL", value_delimiter = ',', value_name = "URL")]
    pub admin: Vec<String>,

    /// A file of admin API URLs, one a line (blank lines and `#` comments are skipped), in
    /// addition to any --admin.
    #[arg(long, global = true, env = "MQTT_CHAOS_ADMINS", value_name = "FILE")]
    pub admins: Option<PathBuf>,

    /// Bearer token, if the proxy runs with --admin-token (before or after the subcommand); sent
    /// to every proxy.
    #[arg(
        long,
        visible_alias = "token",
        global = true,
        env = "MQTT_CHAOS_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<String>,

    /// File holding the bearer token (its final line ending is ignored); sent to every proxy.
    #[arg(
        long,
        visible_alias = "token-file",
        global = true,
        env = "MQTT_CHAOS_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up when the admin API does not accept the connection, or send the head of its
    /// answer, within this time; or pauses that long within an answer, or takes over 6 times it
    /// for a whole answer (exit 1). Answers are also bounded in size: head 64 KiB, body --max-answer.
    #[arg(
        long,
        global = true,
        env = "MQTT_CHAOS_CTL_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_ctl_timeout
    )]
    pub timeout: Duration,

    /// The largest answer body ctl reads (a larger one is an error, exit 1). 64 MiB holds the
    /// records of 60,000 connections; more with --closed-history or long client ids may need more.
    #[arg(
        long,
        global = true,
        env = "MQTT_CHAOS_CTL_MAX_ANSWER",
        default_value = "64MiB",
        value_name = "SIZE",
        value_parser = parse_ctl_size
    )]
    pub max_answer: usize,

    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The admin API ctl asks when no --admin nor --admins is given.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9184";

impl CtlArgs {
    /// A client for every proxy named by --admin and --admins (in that order, each once; the
    /// default when neither is given), with the token, timeout and answer limit. Errors are bad
    /// usage, and name the flag or `file:line`.
    pub fn clients(&self) -> Result<Vec<crate::ctl::Client>, String> {
        let token = admin_token(
            self.admin_token.as_deref(),
            "--admin-token",
            self.admin_token_file.as_deref(),
            "--admin-token-file",
        )?;
        let client = |url: &str| {
            crate::ctl::Client::new(url, token.clone())
                .map(|c| c.with_timeout(self.timeout).with_max_answer(self.max_answer))
        };
        let written: usize =
            admin_values(std::env::args().skip(1)).iter().map(|v| v.split(',').count()).sum();
        if written > self.admin.len() {
            return Err(format!(
                "--admin is given both before and after the subcommand, and only those after it would \
                 count ({} of {written} URLs): give them all on one side",
                self.admin.len()
            ));
        }
        let mut clients = Vec::new();
        for url in &self.admin {
            clients.push(client(url.trim())?);
        }
        if let Some(path) = &self.admins {
            let file = path.display();
            let text = read_bounded(path, ADMINS_FILE_LIMIT).map_err(|e| format!("--admins {file}: {e}"))?;
            let before = clients.len();
            for (n, line) in text.lines().enumerate() {
                let url = line.split('#').next().unwrap_or("").trim();
                if !url.is_empty() {
                    clients.push(client(url).map_err(|e| format!("{file}:{}: {e}", n + 1))?);
                }
            }
            if clients.len() == before {
                return Err(format!("--admins {file}: no admin URL in it (one http://HOST:PORT a line)"));
            }
        }
        if clients.is_empty() {
            clients.push(client(DEFAULT_ADMIN_URL)?);
        }
        let mut seen = std::collections::HashSet::new();
        clients.retain(|c| seen.insert(c.base_url()));
        Ok(clients)
    }
}

/// The values of every `--admin` on a command line (`--admin URL` or `--admin=URL`), up to `--`.
/// clap keeps only those after the subcommand when a global flag is given on both sides.
fn admin_values(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut values = Vec::new();
    let mut args = args.take_while(|a| a != "--");
    while let Some(arg) = args.next() {
        if arg == "--admin" {
            values.extend(args.next());
        } else if let Some(value) = arg.strip_prefix("--admin=") {
            values.push(value.to_string());
        }
    }
    values
}

/// The largest `--admins` file: 1 MiB holds tens of thousands of URLs.
const ADMINS_FILE_LIMIT: u64 = 1024 * 1024;

/// The largest token file: a token is a line, not a document.
const TOKEN_FILE_LIMIT: u64 = 64 * 1024;

/// A text file of at most `limit` bytes (a larger one is an error, never read whole).
fn read_bounded(path: &std::path::Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("over {} KiB, too large for what it should hold", limit / 1024));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
}

/// The admin token from `--admin-token` (`flag`) or from the file of `--admin-token-file`
/// (`file_flag`; its final line ending is dropped), checked: a token must be one line of
/// visible ASCII characters (inner spaces allowed), or no client could send it in a header and
/// the proxy would never match it. Errors name the flag or the file, never the token.
pub fn admin_token(
    token: Option<&str>,
    flag: &str,
    file: Option<&std::path::Path>,
    file_flag: &str,
) -> Result<Option<String>, String> {
    let (token, source) = match (token, file) {
        (Some(_), Some(_)) => return Err(format!("give {flag} or {file_flag}, not both")),
        (None, None) => return Ok(None),
        (Some(t), None) => (t.to_string(), flag.to_string()),
        (None, Some(path)) => {
            let source = format!("{file_flag} {}", path.display());
            let text = read_bounded(path, TOKEN_FILE_LIMIT).map_err(|e| format!("{source}: {e}"))?;
            (
                text.strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text)
                    .to_string(),
                source,
            )
        }
    };
    let problem = if token.is_empty() {
        Some("the token is empty")
    } else if token.starts_with(' ') || token.ends_with(' ') {
        Some("the token starts or ends with a space")
    } else if token.contains(['\n', '\r']) {
        Some("the token is more than one line")
    } else if !token.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        Some("the token has a character that is not visible ASCII (a control character, a tab, or non-ASCII)")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!(
            "{source}: {problem}; a token is one line of visible ASCII characters, such as the output of \
             `openssl rand -hex 32`"
        )),
        None => Ok(Some(token)),
    }
}

/// A `ctl` size limit: over zero.
fn parse_ctl_size(text: &str) -> Result<usize, String> {
    match config::parse_size(text)? {
        0 => Err("must be over 0".to_string()),
        n => Ok(n),
    }
}

/// A `ctl` time limit: over zero, at most a year.
fn parse_ctl_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() || d > crate::fault::rule::MAX_DURATION {
        return Err(format!("{} is not between 1ms and 1 year", humantime::format_duration(d)));
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List live connections (with --closed: the recently closed ones, with how and why).
    Connections {
        #[arg(long)]
        closed: bool,
    },
    /// Close one connection.
    Kill {
        id: u64,
        /// fin or rst.
        #[arg(long, default_value = "fin")]
        how: String,
    },
    /// Show the rules in force.
    Rules,
    /// Add rules: JSON text (a rule or an array), or a .json/.toml file with one rule, an array,
    /// or `[[rules]]` tables (a profile). Global, or with --conn for one live connection only.
    Add {
        rule: String,
        /// The id of the live connection the rule is for (see `ctl connections`).
        #[arg(long, value_name = "ID")]
        conn: Option<u64>,
    },
    /// Remove a global rule by name, or with --conn one of a live connection's own rules.
    Remove {
        name: String,
        /// The id of the live connection whose own rule to remove.
        #[arg(long, value_name = "ID")]
        conn: Option<u64>,
    },
    /// Activate a profile: a name the proxy knows (its --profiles-dir, or built in), or a local TOML file.
    ///
    /// The profile's rules replace every global rule in force, those of the previous profile and
    /// those added with `ctl add` alike; ctl prints which it removed. Connections' own rules
    /// (`ctl add --conn`) are kept.
    Profile { profile: String },
    /// List the profiles the running proxy can activate by name.
    Profiles,
    /// The headline numbers per route: connections, closes, detections, Wills, takeovers, faults.
    Summary,
    /// Follow what happens, live: connects, CONNACKs, faults, closes, rule changes (until Ctrl-C).
    ///
    /// When the proxy stops or drops this watcher, or goes silent, ctl says so and exits 1.
    Watch {
        /// Take the proxy as gone when it sends nothing for this long, not even the keep-alive
        /// it sends every 15 s without events.
        #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_ctl_timeout)]
        max_silence: Duration,
        /// Only this connection.
        #[arg(long, value_name = "ID")]
        conn: Option<u64>,
        /// Only connections whose client id matches this glob (`*`, `?`).
        #[arg(long, value_name = "GLOB")]
        client_id: Option<String>,
    },
    /// Remove every rule (passthrough).
    Reset,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Profile files (or names, resolved in --profiles-dir), or routes files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<String>,

    /// Where profile names are looked up.
    #[arg(long, env = "MQTT_CHAOS_PROFILES_DIR", default_value = "profiles", value_name = "DIR")]
    pub profiles_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to accept MQTT clients on: HOST:PORT or mqtt://HOST:PORT (TCP), mqtts://HOST:PORT (TLS),
    /// ws://HOST:PORT/PATH (WebSocket), wss://HOST:PORT/PATH (WebSocket over TLS); PATH defaults to /mqtt.
    #[arg(long, env = "MQTT_CHAOS_LISTEN", conflicts_with = "config", requires = "upstream")]
    pub listen: Option<String>,

    /// Broker to forward to: HOST:PORT or mqtt://HOST:PORT (TCP), mqtts://HOST:PORT (TLS),
    /// ws://HOST:PORT/PATH (WebSocket), wss://HOST:PORT/PATH (WebSocket over TLS); PATH defaults to
    /// /mqtt. A host name is resolved at every connection.
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM", conflicts_with = "config", requires = "listen")]
    pub upstream: Option<String>,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Name of the route given by --listen/--upstream (a label in logs and metrics).
    #[arg(long, env = "MQTT_CHAOS_NAME", conflicts_with = "config", default_value = "default")]
    pub name: String,

    /// TOML file with several routes (a `[[route]]` table each: name, listen, upstream).
    #[arg(long, env = "MQTT_CHAOS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How long each side's setup may take before the client is closed: the client's TLS and
    /// WebSocket handshakes together; the dial, TLS and WebSocket handshakes to the broker together.
    #[arg(long, env = "MQTT_CHAOS_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// After SIGINT/SIGTERM, how long open connections may take to finish before they are closed.
    #[arg(long, env = "MQTT_CHAOS_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// What to do with a direction whose bytes are not MQTT: relay them raw, or close the connection.
    #[arg(long, env = "MQTT_CHAOS_ON_MALFORMED", value_enum, default_value_t = OnMalformed::Relay)]
    pub on_malformed: OnMalformed,

    /// Largest packet inspected whole (e.g. 256KiB); larger packets are streamed through unbuffered.
    #[arg(long, env = "MQTT_CHAOS_MAX_BUFFERED_PACKET", default_value = "256KiB", value_parser = config::parse_size)]
    pub max_buffered_packet: usize,

    /// Largest CONNECT or CONNACK (always decoded whole, whatever --max-buffered-packet says);
    /// a larger one is malformed and --on-malformed decides.
    #[arg(long, env = "MQTT_CHAOS_MAX_CONNECT_PACKET", default_value = "1MiB", value_parser = config::parse_size)]
    pub max_connect_packet: usize,

    /// Largest WebSocket frame a ws/wss side may send (1KiB up to the largest MQTT packet); a
    /// larger one closes the connection with Close 1009 (the proxy would have to hold it whole).
    #[arg(long, env = "MQTT_CHAOS_WS_MAX_FRAME", default_value = "16MiB", value_parser = config::parse_size)]
    pub ws_max_frame: usize,

    /// Most bytes all ws/wss connections together may hold of frames not yet complete (a frame is
    /// forwarded only whole); at the limit a connection holding part of a frame stops reading,
    /// all but one that finishes its frame first. Default 64MiB, or --ws-max-frame if larger;
    /// at least --ws-max-frame.
    #[arg(long, env = "MQTT_CHAOS_WS_MAX_HELD", value_parser = config::parse_size)]
    pub ws_max_held: Option<usize>,

    /// After one side sent FIN, how long the other direction may go on before both are closed (0s: for ever).
    #[arg(long, env = "MQTT_CHAOS_HALF_CLOSE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub half_close_timeout: Duration,

    /// Most connections open at once over all routes; beyond it new clients are closed at once
    /// (0: no limit).
    #[arg(long, env = "MQTT_CHAOS_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// How many closed connections `GET /connections?state=closed` keeps, the most recent
    /// (0: none; at most 1,000,000).
    #[arg(long, env = "MQTT_CHAOS_CLOSED_HISTORY", default_value_t = crate::record::CLOSED_HISTORY as u32,
        value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub closed_history: u32,

    /// Event loops forwarding connections, one thread each (1 to 256). With 1 (the default),
    /// packets of different connections reach the broker in the order they arrived; more loops
    /// use more cores, and keep that order only among connections on the same loop.
    #[arg(long, env = "MQTT_CHAOS_THREADS", default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// How long after a connection's close (plus its Will Delay Interval) its Will may take to be seen.
    #[arg(long, env = "MQTT_CHAOS_WILL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub will_timeout: Duration,

    /// Admin HTTP API address (metrics, connections, rules, profiles), or `none`.
    #[arg(long, env = "MQTT_CHAOS_ADMIN", default_value = "127.0.0.1:9184", value_name = "ADDR|none")]
    pub admin: String,

    /// Require `Authorization: Bearer TOKEN` on the admin API (every route but /healthz and
    /// /readyz). Required when --admin listens beyond loopback (or --admin-allow-no-token).
    #[arg(
        long,
        env = "MQTT_CHAOS_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<String>,

    /// File holding the admin token (a mounted Secret; its final line ending is ignored):
    /// the same as --admin-token, without the token on the command line. Never logged.
    #[arg(long, env = "MQTT_CHAOS_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Let --admin listen beyond loopback without a token (a lab): anyone who reaches it can
    /// then read the connections and change the rules.
    #[arg(long, env = "MQTT_CHAOS_ADMIN_ALLOW_NO_TOKEN")]
    pub admin_allow_no_token: bool,

    /// Also watch for Wills with an own MQTT client on each route's upstream (for subscribers
    /// that are not behind the proxy).
    #[arg(long, env = "MQTT_CHAOS_OBSERVE_WILLS")]
    pub observe_wills: bool,

    /// MQTT version of the Will observer: `auto` tries 5, then 3.1.1 if the broker refuses it.
    #[arg(long, env = "MQTT_CHAOS_OBSERVER_PROTOCOL", value_enum, default_value_t = ObserverProtocol::Auto)]
    pub observer_protocol: ObserverProtocol,

    /// Client id prefix of the Will observer (the route name is appended).
    #[arg(long, env = "MQTT_CHAOS_OBSERVER_CLIENT_ID", default_value = "mqtt-chaos-observer-")]
    pub observer_client_id: String,

    /// Username of the Will observer.
    #[arg(long, env = "MQTT_CHAOS_OBSERVER_USERNAME")]
    pub observer_username: Option<String>,

    /// File holding the Will observer's password (or set MQTT_CHAOS_OBSERVER_PASSWORD).
    #[arg(long, env = "MQTT_CHAOS_OBSERVER_PASSWORD_FILE", value_name = "FILE")]
    pub observer_password_file: Option<PathBuf>,

    /// Fault profile to activate at start: a name (a file in --profiles-dir, else a built-in
    /// profile; `mqtt-chaos profiles` lists them) or a file path.
    #[arg(long, env = "MQTT_CHAOS_PROFILE", value_name = "NAME|FILE")]
    pub profile: Option<String>,

    /// Where profile names are looked up.
    #[arg(long, env = "MQTT_CHAOS_PROFILES_DIR", default_value = "profiles", value_name = "DIR")]
    pub profiles_dir: PathBuf,

    /// How often the --profile file is looked at: a changed version is validated and replaces
    /// the global rules (as `PUT /profile` does); a bad one is logged and the rules stay. `0s`
    /// turns watching off.
    #[arg(long, env = "MQTT_CHAOS_PROFILE_RELOAD", default_value = "500ms", value_name = "INTERVAL",
        value_parser = profile_reload_interval)]
    pub profile_reload: Duration,
}

/// `--profile-reload`: `0s` (off), or at least [`crate::reload::MIN_INTERVAL`].
fn profile_reload_interval(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !every.is_zero() && every < crate::reload::MIN_INTERVAL {
        return Err(format!(
            "at least {} between looks at the file, or 0s to turn watching off",
            humantime::format_duration(crate::reload::MIN_INTERVAL)
        ));
    }
    Ok(every)
}

/// TLS options of the route given by --listen/--upstream (in a routes file: the same names with
/// `_`, per route).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM certificate chain the mqtts listener presents.
    #[arg(long, env = "MQTT_CHAOS_TLS_CERT", value_name = "FILE", conflicts_with = "config")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (never logged).
    #[arg(long, env = "MQTT_CHAOS_TLS_KEY", value_name = "FILE", conflicts_with = "config")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by these CAs (PEM): mutual TLS.
    #[arg(long, env = "MQTT_CHAOS_TLS_CLIENT_CA", value_name = "FILE", conflicts_with = "config")]
    pub tls_client_ca: Option<PathBuf>,

    #[command(flatten)]
    pub upstream: UpstreamTlsArgs,
}

/// How the proxy (or the probe) verifies and authenticates to a TLS broker. Shared by `proxy`
/// and `probe`; with `proxy --config` they are per-route fields of the routes file instead.
#[derive(Debug, Args, Default)]
pub struct UpstreamTlsArgs {
    /// Trust these CAs (PEM) for the broker's certificate (default: the platform's root store).
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// PEM client certificate chain presented to the broker.
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM_CERT", value_name = "FILE")]
    pub upstream_cert: Option<PathBuf>,

    /// PEM private key of --upstream-cert (never logged).
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM_KEY", value_name = "FILE")]
    pub upstream_key: Option<PathBuf>,

    /// SNI and verification name, when it differs from the broker's host.
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM_SERVER_NAME", value_name = "NAME")]
    pub upstream_server_name: Option<String>,

    /// Do not verify the broker's certificate (a warning at start and on every connection's record).
    #[arg(long, env = "MQTT_CHAOS_UPSTREAM_INSECURE")]
    pub upstream_insecure: bool,
}

impl UpstreamTlsArgs {
    pub fn options(&self) -> crate::tls::TlsOptions {
        crate::tls::TlsOptions {
            upstream_ca: self.upstream_ca.clone(),
            upstream_cert: self.upstream_cert.clone(),
            upstream_key: self.upstream_key.clone(),
            upstream_server_name: self.upstream_server_name.clone(),
            upstream_insecure: self.upstream_insecure,
            ..Default::default()
        }
    }
}

impl TlsArgs {
    pub fn options(&self) -> crate::tls::TlsOptions {
        crate::tls::TlsOptions {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            ..self.upstream.options()
        }
    }
}

impl ProxyArgs {
    /// The settings the flags describe. Errors are user-facing (an unreadable password file).
    pub fn settings(&self) -> Result<Settings, String> {
        let observe_wills = if self.observe_wills {
            let password = password(
                "--observer-password-file",
                self.observer_password_file.as_deref(),
                "MQTT_CHAOS_OBSERVER_PASSWORD",
            )?;
            Some(crate::observer::ObserverConfig {
                client_id: self.observer_client_id.clone(),
                username: self.observer_username.clone(),
                password,
                protocol: self.observer_protocol,
                keep_alive: None,
            })
        } else {
            None
        };
        let durations = [
            ("--connect-timeout", self.connect_timeout),
            ("--shutdown-grace", self.shutdown_grace),
            ("--half-close-timeout", self.half_close_timeout),
            ("--will-timeout", self.will_timeout),
        ];
        for (flag, d) in durations {
            if d > crate::fault::rule::MAX_DURATION {
                return Err(format!(
                    "{flag}: {} is over the maximum of 1 year (\"1year\")",
                    humantime::format_duration(d)
                ));
            }
        }
        for (flag, size) in [
            ("--max-buffered-packet", self.max_buffered_packet),
            ("--max-connect-packet", self.max_connect_packet),
            ("--ws-max-frame", self.ws_max_frame),
        ] {
            let largest = crate::codec::frame::MAX_REMAINING_LENGTH as usize + 5;
            if size > largest {
                return Err(format!(
                    "{flag}: {size} bytes is over the largest MQTT packet ({largest} bytes)"
                ));
            }
        }
        if self.ws_max_frame < 1024 {
            return Err(format!(
                "--ws-max-frame: {} bytes is under the smallest allowed, 1KiB",
                self.ws_max_frame
            ));
        }
        let ws_max_held = match self.ws_max_held {
            None => crate::ws::DEFAULT_MAX_HELD.max(self.ws_max_frame),
            Some(held) if held < self.ws_max_frame => {
                return Err(format!(
                    "--ws-max-held: {held} bytes is under --ws-max-frame ({} bytes): a frame that large could never \
                     be held whole; raise --ws-max-held or lower --ws-max-frame",
                    self.ws_max_frame
                ));
            }
            Some(held) => held,
        };
        Ok(Settings {
            connect_timeout: self.connect_timeout,
            shutdown_grace: self.shutdown_grace,
            on_malformed: self.on_malformed,
            max_buffered_packet: self.max_buffered_packet,
            max_connect_packet: self.max_connect_packet,
            ws_max_frame: self.ws_max_frame,
            ws_max_held,
            will_timeout: self.will_timeout,
            half_close_timeout: self.half_close_timeout,
            max_connections: self.max_connections,
            closed_history: self.closed_history as usize,
            event_loops: usize::from(self.threads),
            observe_wills,
            probe_upstreams: true,
        })
    }

    /// The admin API's token (`--admin-token` or `--admin-token-file`), checked against where
    /// `--admin` listens: beyond loopback a token is required unless `--admin-allow-no-token`.
    /// Errors are user-facing (exit 2) and never show the token.
    pub fn admin_token(&self) -> Result<Option<String>, String> {
        let token = admin_token(
            self.admin_token.as_deref(),
            "--admin-token",
            self.admin_token_file.as_deref(),
            "--admin-token-file",
        )?;
        if token.is_some()
            || self.admin_allow_no_token
            || self.admin == "none"
            || admin_on_loopback(&self.admin)
        {
            return Ok(token);
        }
        Err(self.open_admin_refused())
    }

    /// Why the proxy refuses to serve the admin API beyond loopback without a token.
    pub fn open_admin_refused(&self) -> String {
        format!(
            "--admin {} listens beyond loopback, and without a token anyone who reaches it could read the \
             connections and change the rules: give --admin-token-file FILE (env MQTT_CHAOS_ADMIN_TOKEN_FILE; \
             e.g. a mounted Secret) or --admin-token TOKEN, or listen on 127.0.0.1; in a lab, \
             --admin-allow-no-token (env MQTT_CHAOS_ADMIN_ALLOW_NO_TOKEN) runs it open",
            self.admin
        )
    }

    /// The profile to activate at start, if any, and where it was found. Errors are user-facing
    /// (`file:line:col: …`).
    pub fn profile_and_source(&self) -> Result<Option<(profile::Source, Profile)>, String> {
        let Some(name) = &self.profile else { return Ok(None) };
        profile::find(name, &self.profiles_dir).map(Some).map_err(|e| e.to_string())
    }

    /// The routes to run, from the file or the flags. Errors are user-facing messages.
    pub fn routes(&self) -> Result<Vec<RouteConfig>, String> {
        if let Some(path) = &self.config {
            if let Some(flag) = self.tls.upstream.options().upstream_given() {
                return Err(format!(
                    "the argument '{flag}' cannot be used with '--config': give it per route in the routes file ({})",
                    flag.trim_start_matches("--").replace('-', "_")
                ));
            }
            return config::load_routes(path).map_err(|e| e.to_string());
        }
        let (Some(listen), Some(upstream)) = (&self.listen, &self.upstream) else {
            return Err("nothing to proxy: give --listen ADDR --upstream HOST:PORT, or --config FILE".into());
        };
        config::validate_name(&self.name).map_err(|m| format!("--name: {m}"))?;
        let at = config::parse_address("--listen", listen)?;
        let up = config::parse_address("--upstream", upstream)?;
        let tls = crate::tls::RouteTls::load(self.tls.options(), at.transport, up.transport, &up.host_port)
            .map_err(|e| e.to_string())?;
        Ok(vec![RouteConfig {
            name: self.name.clone(),
            listen: at.host_port,
            upstream: up.host_port,
            tls,
            listen_ws: at.path,
            upstream_ws: up.path,
        }])
    }
}

/// Whether the admin address `addr` is on loopback only: every address it resolves to is. One
/// that does not resolve counts as loopback here; binding it fails and says why.
fn admin_on_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    match addr.to_socket_addrs() {
        Ok(mut addrs) => addrs.all(|a| a.ip().is_loopback()),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_one_line_of_visible_ascii_and_errors_never_show_it() {
        let check = |t: &str| admin_token(Some(t), "--admin-token", None, "--admin-token-file");
        assert_eq!(check("s3cret-Token_1+/=").unwrap().as_deref(), Some("s3cret-Token_1+/="));
        assert_eq!(check("two words").unwrap().as_deref(), Some("two words"));
        for (bad, says) in [
            ("", "empty"),
            (" lead-secret", "starts or ends with a space"),
            ("line-secret\nmore", "more than one line"),
            ("tab-secret\tx", "not visible ASCII"),
            ("caf\u{e9}-secret", "not visible ASCII"),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.starts_with("--admin-token: ") && e.contains(says), "{bad:?}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        for (content, token) in [("abc\n", "abc"), ("abc\r\n", "abc"), ("abc", "abc")] {
            std::fs::write(&file, content).unwrap();
            let read = admin_token(None, "--admin-token", Some(&file), "--admin-token-file").unwrap();
            assert_eq!(read.as_deref(), Some(token), "{content:?}");
        }
        std::fs::write(&file, vec![b'x'; 70_000]).unwrap();
        let e = admin_token(None, "--admin-token", Some(&file), "--admin-token-file").unwrap_err();
        assert!(e.contains("over 64 KiB"), "{e}");
    }

    #[test]
    fn only_addresses_that_resolve_to_loopback_alone_count_as_loopback() {
        assert!(admin_on_loopback("127.0.0.1:9184") && admin_on_loopback("[::1]:9184"));
        assert!(admin_on_loopback("localhost:9184"));
        assert!(!admin_on_loopback("0.0.0.0:9184") && !admin_on_loopback("[::]:9184"));
        assert!(!admin_on_loopback("10.1.2.3:9184"));
    }

    #[test]
    fn admin_flags_are_found_on_both_sides_of_the_subcommand() {
        let args = |a: &str| a.split(' ').map(str::to_string).collect::<Vec<_>>().into_iter();
        assert_eq!(admin_values(args("ctl --admin a,b rules --admin=c")), ["a,b", "c"]);
        assert_eq!(admin_values(args("ctl remove -- --admin")), Vec::<String>::new());
    }
}
