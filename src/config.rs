//! Proxy settings and the routes file.
//!
//! A routes file is TOML with one `[[route]]` table per route:
//!
//! ```toml
//! [[route]]
//! name = "plant-a"
//! listen = "127.0.0.1:1884"
//! upstream = "broker.example:1883"
//! ```
//!
//! Every error names the file, line and column it comes from, and a file's errors are reported
//! all together ([`ConfigErrors`], in file order): each entry of a routes file, and each rule of
//! a profile ([`crate::fault::profile`]), is deserialized on its own, each wrong key of it is
//! found ([`deserialize_all`]), and validation goes on past the first problem.

use serde::Deserialize;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// What to do with a direction whose bytes stop being MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMalformed {
    /// Relay the rest of that direction byte for byte, so the peer answers as without the proxy.
    #[default]
    Relay,
    /// Close both sides of the connection.
    Close,
}

/// Settings shared by every route and connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long dialing the upstream may take before the client is closed.
    pub connect_timeout: Duration,
    /// How long connections may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    pub on_malformed: OnMalformed,
    /// Packets up to this size (fixed header included) are inspected whole; larger ones are
    /// streamed through.
    pub max_buffered_packet: usize,
    /// CONNECT and CONNACK are always buffered and decoded whole up to this size; larger ones
    /// are malformed (`on_malformed` decides what follows).
    pub max_connect_packet: usize,
    /// Largest WebSocket frame (or message) a `ws`/`wss` side may send.
    pub ws_max_frame: usize,
    /// Most bytes all WebSocket connections together may hold of unfinished frames
    /// (`--ws-max-held`; see [`crate::ws::HeldBytes`]).
    pub ws_max_held: usize,
    /// How long after the Will Delay Interval an expected Will may take to be seen.
    pub will_timeout: Duration,
    /// After one direction ended with a FIN, how long the other may go on before the proxy
    /// closes both (0: for ever). Bounds connections whose peer never closes.
    pub half_close_timeout: Duration,
    /// Most connections open at once over all routes (0: no limit); beyond it new clients are
    /// closed at once.
    pub max_connections: usize,
    /// How many closed connections' records are kept for `GET /connections?state=closed`.
    pub closed_history: usize,
    /// `--observe-wills`: subscribe to Will topics with an own client on each upstream.
    pub observe_wills: Option<crate::observer::ObserverConfig>,
    /// Event loops, one thread each (`--threads`). With one, packets of different connections
    /// reach the broker in the order they arrived; with more, only those of connections on the
    /// same loop (the kernel spreads new connections over the loops).
    pub event_loops: usize,
    /// Dial each upstream once at start and log whether it answered (the binary does; embedders
    /// and tests whose scripted broker counts its connections may not want the extra dial).
    pub probe_upstreams: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            on_malformed: OnMalformed::Relay,
            max_buffered_packet: 256 * 1024,
            max_connect_packet: crate::codec::frame::DEFAULT_MAX_HANDSHAKE,
            ws_max_frame: crate::ws::DEFAULT_MAX_FRAME,
            ws_max_held: crate::ws::DEFAULT_MAX_HELD,
            will_timeout: Duration::from_secs(10),
            half_close_timeout: Duration::from_secs(30),
            max_connections: 0,
            closed_history: crate::record::CLOSED_HISTORY,
            event_loops: 1,
            observe_wills: None,
            probe_upstreams: false,
        }
    }
}

/// One route as configured: accept on `listen`, forward to `upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    /// `address:port` to bind (the scheme stripped); a host name is resolved once at start.
    pub listen: String,
    /// `host:port` of the broker (the scheme stripped); resolved at every dial.
    pub upstream: String,
    /// TLS for the sides given as `mqtts://` or `wss://`, loaded at start.
    pub tls: crate::tls::RouteTls,
    /// The WebSocket path of a `ws://`/`wss://` listener (`None`: not WebSocket).
    pub listen_ws: Option<String>,
    /// The WebSocket path of a `ws://`/`wss://` upstream.
    pub upstream_ws: Option<String>,
}

impl RouteConfig {
    /// A plain TCP route.
    pub fn tcp(
        name: impl Into<String>,
        listen: impl Into<String>,
        upstream: impl Into<String>,
    ) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            listen: listen.into(),
            upstream: upstream.into(),
            tls: Default::default(),
            listen_ws: None,
            upstream_ws: None,
        }
    }
}

/// An address as given on `--listen`, `--upstream` or in a routes file: `HOST:PORT` or
/// `mqtt://HOST:PORT` (plain TCP), `mqtts://HOST:PORT` (TLS), `ws://HOST:PORT/PATH` (MQTT over
/// WebSocket, path `/mqtt` when none is given), `wss://HOST:PORT/PATH` (over TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub transport: crate::transport::Transport,
    /// `HOST:PORT`.
    pub host_port: String,
    /// The WebSocket path (`ws`, `wss` only).
    pub path: Option<String>,
}

impl std::fmt::Display for Address {
    /// `HOST:PORT` for plain TCP, else the URL (`mqtts://HOST:PORT`, `ws://HOST:PORT/PATH`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::transport::Transport;
        let scheme = match self.transport {
            Transport::Tcp => return f.write_str(&self.host_port),
            Transport::Tls => "mqtts",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        };
        write!(f, "{scheme}://{}{}", self.host_port, self.path.as_deref().unwrap_or(""))
    }
}

pub fn parse_address(what: &str, value: &str) -> Result<Address, String> {
    use crate::transport::Transport;
    let (transport, rest) = match value.split_once("://") {
        None => (Transport::Tcp, value),
        Some(("mqtt" | "tcp", rest)) => (Transport::Tcp, rest),
        Some(("mqtts" | "ssl", rest)) => (Transport::Tls, rest),
        Some(("ws", rest)) => (Transport::Ws, rest),
        Some(("wss", rest)) => (Transport::Wss, rest),
        Some((scheme, _)) => {
            return Err(format!(
                "invalid {what} address {value:?}: unknown scheme {scheme:?}; use HOST:PORT, mqtt://, mqtts://, ws:// or wss://"
            ));
        }
    };
    let (host_port, path) = match rest.split_once('/') {
        Some((hp, p)) => (hp, format!("/{p}")),
        None => (rest, String::new()),
    };
    validate_host_port(what, host_port)?;
    let path = if transport.websocket() {
        Some(if path.is_empty() || path == "/" { "/mqtt".to_string() } else { path })
    } else {
        if !path.is_empty() && path != "/" {
            return Err(format!("invalid {what} address {value:?}: a path only goes with ws:// or wss://"));
        }
        None
    };
    Ok(Address { transport, host_port: host_port.to_string(), path })
}

/// A configuration error with its location, printed as `file:line:col: message` (or
/// `file: message` when it concerns the whole file, e.g. it cannot be read).
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file, self.message),
            line => write!(f, "{}:{line}:{}: {}", self.file, self.col, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in one file, in file order (never empty). Displayed one per line, each
/// as `file:line:col: message`.
#[derive(Debug)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in file order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// The first error.
    pub fn first(&self) -> &ConfigError {
        &self.0[0]
    }

    /// One line: the first error, and how many more there are.
    pub fn summary(&self) -> String {
        match self.0.len() {
            1 => self.0[0].to_string(),
            n => format!("{} (and {} more error{})", self.0[0], n - 1, if n == 2 { "" } else { "s" }),
        }
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Collects the errors of one file's text as they are found, in any order.
pub(crate) struct Errors<'a> {
    file: &'a str,
    text: &'a str,
    /// Byte offset and message; lines and columns are worked out once, in [`Errors::finish_with`].
    found: Vec<(usize, String)>,
}

impl<'a> Errors<'a> {
    pub(crate) fn new(file: &'a str, text: &'a str) -> Self {
        Errors { file, text, found: Vec::new() }
    }

    /// An error at byte `offset` of the text.
    pub(crate) fn at(&mut self, offset: usize, message: impl Into<String>) {
        self.found.push((offset, message.into()));
    }

    /// An error of the TOML parser or of deserializing, at its span (the start of the file if
    /// it has none).
    pub(crate) fn toml(&mut self, e: &toml::de::Error) {
        self.at(e.span().map_or(0, |s| s.start), suggest_known(e.message().trim_end()));
    }

    /// `value` if nothing was found, else every error sorted by position (each once).
    pub(crate) fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        self.finish_with(Some(value))
    }

    /// Like [`Errors::finish`] for a value that could not be made (`None`, after an error).
    pub(crate) fn finish_with<T>(mut self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(value) if self.found.is_empty() => return Ok(value),
            None if self.found.is_empty() => self.at(0, "invalid file"),
            _ => {}
        }
        // Stable: errors at one position keep the order they were found in.
        self.found.sort_by_key(|(offset, _)| *offset);
        let mut seen = std::collections::HashSet::new();
        self.found.retain(|e| seen.insert(e.clone()));
        // One pass over the text for every position (a file with many errors stays linear).
        let (mut at, mut line, mut line_start) = (0, 1, 0);
        let bytes = self.text.as_bytes();
        let mut errors: Vec<ConfigError> = Vec::with_capacity(self.found.len());
        for (offset, message) in self.found {
            let offset = offset.min(bytes.len());
            for (i, &b) in bytes[at..offset].iter().enumerate() {
                if b == b'\n' {
                    (line, line_start) = (line + 1, at + i + 1);
                }
            }
            at = offset;
            let col = offset - line_start + 1;
            errors.push(ConfigError { file: self.file.to_string(), line, col, message });
        }
        Err(ConfigErrors(errors))
    }
}

/// The name of `names` closest to `word` within two edits (a letter added, left out or
/// changed), if any; the first of equally close ones.
pub(crate) fn closest<'a>(word: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word: Vec<char> = word.chars().collect();
    names
        .filter_map(|name| {
            let d = edit_distance(&word, &name.chars().collect::<Vec<_>>());
            (d <= 2 && d < word.len()).then_some((d, name))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Levenshtein distance.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb)).min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// serde's "unknown field `latnecy`, expected one of `name`, …, `latency`" (or variant) with
/// the closest expected word suggested.
fn suggest_known(message: &str) -> String {
    let Some(rest) =
        message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return message.to_string();
    };
    let Some((given, expected)) = rest.split_once('`') else { return message.to_string() };
    let known = expected.split('`').skip(1).step_by(2);
    match closest(given, known) {
        Some(near) => format!("{message}; did you mean `{near}`?"),
        None => message.to_string(),
    }
}

/// Deserializes a `T` from a TOML value. When that fails, every key of the table that is wrong
/// (unknown, or of a wrong type or value) is reported, not only the first one serde meets: each
/// key is tried alone, and a key that fails alone for another reason than the fields it leaves
/// missing is wrong. A missing field is reported only when no key is wrong.
pub(crate) fn deserialize_all<T: serde::de::DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    errors: &mut Errors<'_>,
) -> Option<T> {
    let from = |v: Spanned<DeValue<'_>>| T::deserialize(toml::de::ValueDeserializer::from(v));
    let whole = match from(value.clone()) {
        Ok(v) => return Some(v),
        Err(e) => e,
    };
    let mut wrong = 0;
    if let DeValue::Table(table) = value.get_ref()
        && table.len() > 1
    {
        for (key, item) in table.iter() {
            let mut alone = DeTable::new();
            alone.insert(key.clone(), item.clone());
            // serde's derive says "missing field `…`" for each required field not given.
            if let Err(e) = from(Spanned::new(value.span(), DeValue::Table(alone)))
                && !e.message().starts_with("missing field")
            {
                errors.toml(&e);
                wrong += 1;
            }
        }
    }
    if wrong == 0 {
        errors.toml(&whole);
    }
    None
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    /// Deserialized entry by entry by [`document`]; declared for serde's list of known fields.
    #[serde(default)]
    #[allow(dead_code)]
    route: Vec<RouteEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: Spanned<String>,
    listen: Spanned<String>,
    upstream: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    tls_client_ca: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<String>>,
    upstream_cert: Option<Spanned<String>>,
    upstream_key: Option<Spanned<String>>,
    upstream_server_name: Option<Spanned<String>>,
    upstream_insecure: Option<Spanned<bool>>,
}

/// Reads a configuration file: its name as errors show it, and its text.
pub fn read_config_file(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigError { file, line: 0, col: 0, message: format!("cannot read: {e}") }),
    }
}

/// Whether the file at `path` reads as a routes file (TOML with `[[route]]` tables and none of
/// a profile's `name` or `[[rules]]`) rather than a profile.
pub fn looks_like_routes(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let Ok(root) = DeTable::parse(&text) else { return false };
    let root = root.get_ref();
    root.contains_key("route") && !root.contains_key("rules") && !root.contains_key("name")
}

/// Reads and validates a routes file.
pub fn load_routes(path: &Path) -> Result<Vec<RouteConfig>, ConfigErrors> {
    let (file, text) = read_config_file(path)?;
    parse_routes(&file, &text)
}

/// Parses and validates the text of a routes file named `file`; every error is reported.
pub fn parse_routes(file: &str, text: &str) -> Result<Vec<RouteConfig>, ConfigErrors> {
    let mut errors = Errors::new(file, text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            errors.toml(&e);
            return errors.finish(Vec::new());
        }
    };
    let (_, entries, given) = document::<RoutesFile, RouteEntry>(&root, "route", &mut errors);
    if !given || (entries.is_empty() && errors.found.is_empty()) {
        errors.at(0, "no routes: add at least one [[route]] with name, listen and upstream");
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut listeners: Vec<(&str, String)> = Vec::new();
    for entry in entries.iter().flatten() {
        let before = errors.found.len();
        let mut err = |field: &Spanned<String>, msg: String| errors.at(field.span().start, msg);
        if let Err(m) = validate_name(entry.name.get_ref()) {
            err(&entry.name, m);
        }
        if names.contains(&entry.name.get_ref().as_str()) {
            err(&entry.name, format!("duplicate route name {:?}", entry.name.get_ref()));
        }
        names.push(entry.name.get_ref());
        let up = parse_address("upstream", entry.upstream.get_ref()).map_err(|m| err(&entry.upstream, m));
        let at = parse_address("listen", entry.listen.get_ref()).map_err(|m| err(&entry.listen, m));
        if let Ok(at) = &at {
            if let Some((name, listen)) = listeners.iter().find(|(_, l)| *l == at.host_port) {
                err(&entry.listen, format!("route {name:?} already listens on {listen}"));
            }
            listeners.push((entry.name.get_ref(), at.host_port.clone()));
        }
        let (Ok(at), Ok(up)) = (at, up) else { continue };
        let (listen_transport, listen, upstream_transport, upstream) =
            (at.transport, at.host_port, up.transport, up.host_port);
        let path = |f: &Option<Spanned<String>>| f.as_ref().map(|v| std::path::PathBuf::from(v.get_ref()));
        let options = crate::tls::TlsOptions {
            cert: path(&entry.tls_cert),
            key: path(&entry.tls_key),
            client_ca: path(&entry.tls_client_ca),
            upstream_ca: path(&entry.upstream_ca),
            upstream_cert: path(&entry.upstream_cert),
            upstream_key: path(&entry.upstream_key),
            upstream_server_name: entry.upstream_server_name.as_ref().map(|v| v.get_ref().clone()),
            upstream_insecure: entry.upstream_insecure.as_ref().is_some_and(|v| *v.get_ref()),
        };
        let tls = match crate::tls::RouteTls::load(options, listen_transport, upstream_transport, &upstream) {
            Ok(tls) => tls,
            Err(e) => {
                // The field the error is about, as the routes file spells it (`--tls-cert` → `tls_cert`).
                let field = e.field.trim_start_matches('-').replace('-', "_");
                let span = match field.as_str() {
                    "tls_cert" => entry.tls_cert.as_ref().map(|v| v.span().start),
                    "tls_key" => entry.tls_key.as_ref().map(|v| v.span().start),
                    "tls_client_ca" => entry.tls_client_ca.as_ref().map(|v| v.span().start),
                    "upstream_ca" => entry.upstream_ca.as_ref().map(|v| v.span().start),
                    "upstream_cert" => entry.upstream_cert.as_ref().map(|v| v.span().start),
                    "upstream_key" => entry.upstream_key.as_ref().map(|v| v.span().start),
                    "upstream_server_name" => entry.upstream_server_name.as_ref().map(|v| v.span().start),
                    "upstream_insecure" => entry.upstream_insecure.as_ref().map(|v| v.span().start),
                    _ => None,
                };
                let at = span.unwrap_or(entry.listen.span().start);
                let file_part = if e.file.is_empty() { String::new() } else { format!(" {}", e.file) };
                errors.at(at, format!("{field}{file_part}: {}", e.message));
                continue;
            }
        };
        if errors.found.len() > before {
            continue;
        }
        routes.push(RouteConfig {
            name: entry.name.get_ref().clone(),
            listen,
            upstream,
            tls,
            listen_ws: at.path,
            upstream_ws: up.path,
        });
    }
    errors.finish(routes)
}

/// A document of a `Head` table with an array of `Item` tables under `key` (`[[route]]`,
/// `[[rules]]`): the head deserialized without the array, each item on its own, and whether
/// the key is there. Every error goes to `errors`; an item that fails is `None`.
pub(crate) fn document<Head: serde::de::DeserializeOwned, Item: serde::de::DeserializeOwned>(
    root: &Spanned<DeTable<'_>>,
    key: &str,
    errors: &mut Errors<'_>,
) -> (Option<Head>, Vec<Option<Item>>, bool) {
    // The head without the array, which is not copied.
    let mut head = DeTable::new();
    let mut items = None;
    for (k, v) in root.get_ref().iter() {
        if k.get_ref() == key {
            items = Some(v);
        } else {
            head.insert(k.clone(), v.clone());
        }
    }
    let head = deserialize_all::<Head>(&Spanned::new(root.span(), DeValue::Table(head)), errors);
    let items = match items {
        None => Vec::new(),
        Some(value) => match value.get_ref() {
            DeValue::Array(items) => items.iter().map(|item| deserialize_all::<Item>(item, errors)).collect(),
            DeValue::Table(_) => {
                let message =
                    format!("`{key}` is a single table: write [[{key}]] (double brackets) above each one");
                errors.at(value.span().start, message);
                Vec::new()
            }
            // Not a list: serde says what it is instead.
            _ => deserialize_all::<Vec<Item>>(value, errors)
                .unwrap_or_default()
                .into_iter()
                .map(Some)
                .collect(),
        },
    };
    (head, items, root.get_ref().contains_key(key))
}

/// Route names become metric labels and log fields: keep them short and plain.
pub fn validate_name(name: &str) -> Result<(), String> {
    crate::names::check("route name", name)?;
    let ok = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(format!("invalid route name {name:?}: use 1 to 64 of A-Z a-z 0-9 - _ .")) }
}

/// Checks `host:port` (IPv6 in brackets) without resolving it.
pub fn validate_host_port(what: &str, value: &str) -> Result<(), String> {
    let bad =
        || format!("invalid {what} address {value:?}: expected host:port, e.g. 127.0.0.1:1883 or [::1]:1883");
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad());
    }
    Ok(())
}

/// Parses a byte size: `262144`, `256KiB`, `1MiB`, `64kb`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize =
        digits.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 262144, 256KiB or 1MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("invalid size unit in {s:?}: use B, KiB or MiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_file_with_an_empty_route_list_has_no_routes() {
        for text in ["", "route = []\n"] {
            let e = parse_routes("r.toml", text).unwrap_err();
            assert!(e.to_string().contains("no routes"), "{text:?}: {e}");
        }
    }

    #[test]
    fn parses_routes_file() {
        let text = "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:1883\"\n";
        let routes = parse_routes("r.toml", text).unwrap();
        assert_eq!(routes[0].upstream, "localhost:1883");
    }

    #[test]
    fn errors_point_at_file_line_and_column() {
        let text = "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"nope\"\n";
        let e = parse_routes("r.toml", text).unwrap_err().to_string();
        assert!(e.starts_with("r.toml:4:12: invalid upstream address \"nope\""), "{e}");

        let text = "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"h:1\"\nport = 3\n";
        let e = parse_routes("r.toml", text).unwrap_err().to_string();
        assert!(e.starts_with("r.toml:5:1: unknown field `port`"), "{e}");
    }

    #[test]
    fn rejects_duplicate_names_and_listeners() {
        let route = |name: &str, listen: &str| {
            format!("[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"h:1\"\n")
        };
        let e = parse_routes("f", &(route("a", "127.0.0.1:1") + &route("a", "127.0.0.1:2")))
            .unwrap_err()
            .first()
            .clone();
        assert_eq!((e.line, e.message.as_str()), (6, "duplicate route name \"a\""));
        let e = parse_routes("f", &(route("a", "127.0.0.1:1") + &route("b", "127.0.0.1:1")))
            .unwrap_err()
            .first()
            .clone();
        assert_eq!((e.line, e.message.as_str()), (7, "route \"a\" already listens on 127.0.0.1:1"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("262144"), Ok(262_144));
        assert_eq!(parse_size("256KiB"), Ok(262_144));
        assert_eq!(parse_size("1 MiB"), Ok(1_048_576));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn addresses_take_the_mqtt_url_schemes() {
        use crate::transport::Transport;
        let a = |v: &str| parse_address("--listen", v);
        assert_eq!(a("127.0.0.1:1884").unwrap().transport, Transport::Tcp);
        assert_eq!(a("mqtt://127.0.0.1:1884").unwrap().host_port, "127.0.0.1:1884");
        assert_eq!(a("mqtts://b:8883").unwrap().transport, Transport::Tls);
        let ws = a("ws://b:8080").unwrap();
        assert_eq!((ws.transport, ws.path.as_deref()), (Transport::Ws, Some("/mqtt")));
        let wss = a("wss://[::1]:443/custom/path").unwrap();
        assert_eq!(
            (wss.transport, wss.host_port.as_str(), wss.path.as_deref()),
            (Transport::Wss, "[::1]:443", Some("/custom/path"))
        );
        assert!(a("mqtt://b:1883/path").unwrap_err().contains("a path only goes with ws://"));
        assert!(a("http://b:80").unwrap_err().contains("unknown scheme \"http\""));
        assert!(a("ws://b").is_err());
    }

    #[test]
    fn host_ports() {
        assert!(validate_host_port("x", "[::1]:1883").is_ok());
        assert!(validate_host_port("x", "broker.local:1883").is_ok());
        assert!(validate_host_port("x", "::1:1883").is_err());
        assert!(validate_host_port("x", "host:99999").is_err());
        assert!(validate_host_port("x", ":1883").is_err());
    }
}
