//! `mqtt-chaos ctl`: the admin API for shells and scripts.
//!
//! An HTTP/1.1 client (hyper's, one request per connection; the admin API is on loopback or a
//! trusted network and needs no TLS), the `GET /events` reader of `ctl watch`, and the tables.
//!
//! ctl is the client of a server it does not control (a wrong `--admin`, something else on the
//! port, a stuck proxy), so every answer is bounded: its head to [`HEAD_LIMIT`], its body to
//! [`BODY_LIMIT`] (unless `--max-answer`), an event of `ctl watch` to [`EVENT_LIMIT`]; the
//! connection and the head of the answer must arrive within the client's timeout ([`TIMEOUT`]
//! unless `--timeout`), a body may pause no longer than that and must be complete within
//! [`ANSWER_TIMEOUTS`] times it; `watch` takes a stream silent for `--max-silence` (60 s by
//! default: four of the keep-alives the proxy sends every 15 s) as gone, and says when the stream
//! ends. An answer that is cut short or is not the JSON it should be is an error naming the URL.
//!
//! Text from the API (client ids, reason strings, names) goes through [`crate::text::escaped`]
//! in tables and event lines; `--json` prints the API's JSON exact.
//!
//! With several `--admin` URLs (or `--admins FILE`), [`many`] sends a command to every proxy at
//! once, each exchange under the same bounds, and reports per proxy: answers merged with a
//! column naming the proxy (or, with `--json`, an object keyed by proxy URL), one line per
//! proxy that failed. Commands that name a connection by id (`kill`, `--conn`) and `watch`
//! stay with one proxy.

use crate::cli::CtlCommand;
use crate::fault::RuleSpec;
use crate::text::{Escaped, escaped};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::Value;
use std::ops::ControlFlow;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest head (status line and headers) of an answer.
pub const HEAD_LIMIT: usize = 64 * 1024;
/// Largest body of an answer unless `--max-answer`. The largest the proxy sends is `GET /connections` (about 1 KB per
/// connection, more with long client ids): 64 MiB holds 60,000 connections of 1 KB, or 900 with
/// 64 KiB client ids (the MQTT maximum; 6 bytes a character if they are all escaped, 1 if not);
/// `--closed-history` up to 1,000,000 and `--max-connections` 0 (no limit) can make more.
pub const BODY_LIMIT: usize = 64 * 1024 * 1024;
/// Largest event of `ctl watch` (a line, and the data of one event): the proxy's are under 1 KB
/// plus a client id and a Will topic (64 KiB each at most, escaped up to 6 times that).
pub const EVENT_LIMIT: usize = 1024 * 1024;
/// Default time for the connection, then for the head of the answer, and the longest pause
/// within a body.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A whole answer must arrive within this many times the timeout.
pub const ANSWER_TIMEOUTS: u32 = 6;

/// An admin API endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`.
    authority: String,
    token: Option<String>,
    timeout: Duration,
    max_body: usize,
}

/// A response: status and body text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The body (invalid UTF-8 replaced; [`Reply::json`] refuses such a body).
    pub body: String,
    /// What was asked: `http://host:port/path`.
    pub url: String,
    utf8: bool,
}

impl Reply {
    /// The body as JSON; an error naming the URL when it is not JSON (cut short, say).
    pub fn json(&self) -> Result<Value, String> {
        let what = |e: &dyn std::fmt::Display| {
            format!(
                "the admin API at {} answered {} with a body that is not JSON ({e})",
                self.url, self.status
            )
        };
        if !self.utf8 {
            return Err(what(&"invalid UTF-8"));
        }
        serde_json::from_str(&self.body).map_err(|e| what(&e))
    }

    /// The error message of a JSON error body, or the start of the raw body; escaped, as it goes
    /// to a terminal.
    pub fn error(&self) -> String {
        let message = self.json().ok().and_then(|v| v["error"].as_str().map(str::to_string));
        let message = message.unwrap_or_else(|| {
            let mut start: String = self.body.chars().take(500).collect();
            if start.len() < self.body.len() {
                start.push('…');
            }
            start
        });
        escaped(&message).into_owned()
    }
}

/// Aborts the task driving a connection when the exchange is over or abandoned.
struct Driving(tokio::task::AbortHandle);

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A size as people write it: `64 MiB`, `512 KiB`, or bytes.
fn size(bytes: usize) -> String {
    match bytes {
        b if b > 0 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b > 0 && b % 1024 == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// A hyper error with its causes, for a message.
fn explain(e: &hyper::Error) -> String {
    if e.is_parse_too_large() {
        return format!("the head of the answer is over ctl's {} KiB limit", HEAD_LIMIT / 1024);
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl Client {
    /// `http://host:port` (or just `host:port`); other schemes and paths are refused.
    pub fn new(url: &str, token: Option<String>) -> Result<Client, String> {
        let rest = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
        if rest.contains('/') || url.starts_with("https://") || !rest.contains(':') {
            return Err(format!("--admin must be http://HOST:PORT, got {url:?}"));
        }
        if rest.parse::<hyper::http::uri::Authority>().is_err() {
            return Err(format!("--admin must be http://HOST:PORT, got {url:?}"));
        }
        Ok(Client { authority: rest.to_string(), token, timeout: TIMEOUT, max_body: BODY_LIMIT })
    }

    /// The time for the connection, then for the head of an answer, and the longest pause in a
    /// body (default [`TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The largest body of an answer (default [`BODY_LIMIT`]).
    pub fn with_max_answer(mut self, bytes: usize) -> Client {
        self.max_body = bytes;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.authority)
    }

    /// The proxy this client asks, as `http://host:port` (the name of its column and JSON key
    /// when ctl asks several).
    pub fn base_url(&self) -> String {
        self.url("")
    }

    /// Connects, sends the request, and waits for the head of the answer: all within the timeout.
    async fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(hyper::Response<Incoming>, Driving), String> {
        let url = self.url(path);
        let mut request =
            hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(t) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("cannot ask {url}: {e}"))?;
        let exchange = async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| format!("admin API at {} unreachable: {e}", self.authority))?;
            let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
                .max_header_size(HEAD_LIMIT)
                .max_buf_size(HEAD_LIMIT.max(8192) * 2)
                .handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{url}: {}", explain(&e)))?;
            let driving = Driving(tokio::spawn(connection).abort_handle());
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("the admin API at {url} sent no valid answer: {}", explain(&e)))?;
            Ok((response, driving))
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| {
            format!(
                "the admin API at {url} did not answer within {} (see --timeout)",
                humantime::format_duration(self.timeout)
            )
        })?
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Reply, String> {
        let url = self.url(path);
        let headers: Vec<(&str, &str)> = content_type.map(|t| ("content-type", t)).into_iter().collect();
        let (response, _driving) = self.open(method, path, &headers, body).await?;
        self.read_answer(response, url).await
    }

    /// Reads an answer whole, within its bounds: at most --max-answer, no pause over --timeout,
    /// all of it within [`ANSWER_TIMEOUTS`] × --timeout.
    async fn read_answer(
        &self,
        response: hyper::Response<hyper::body::Incoming>,
        url: String,
    ) -> Result<Reply, String> {
        let deadline = Instant::now() + self.timeout.saturating_mul(ANSWER_TIMEOUTS);
        let status = response.status().as_u16();
        let too_large = || {
            format!(
                "the answer of the admin API at {url} is over ctl's {} limit (see --max-answer)",
                size(self.max_body)
            )
        };
        let announced = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let mut incoming = response.into_body();
        let mut raw = Vec::with_capacity(announced.unwrap_or(0).min(1 << 20) as usize);
        loop {
            let pause = (Instant::now() + self.timeout).min(deadline);
            let frame = tokio::time::timeout_at(pause, incoming.frame()).await.map_err(|_| {
                format!(
                    "the admin API at {url} stopped sending its answer (nothing for {}, or not complete within {})",
                    humantime::format_duration(self.timeout),
                    humantime::format_duration(self.timeout.saturating_mul(ANSWER_TIMEOUTS))
                )
            })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| {
                format!("the answer of the admin API at {url} was cut short: {}", explain(&e))
            })?;
            if let Ok(data) = frame.into_data() {
                if raw.len() + data.len() > self.max_body {
                    return Err(too_large());
                }
                raw.extend_from_slice(&data);
            }
        }
        let (body, utf8) = match String::from_utf8(raw) {
            Ok(body) => (body, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        Ok(Reply { status, body, url, utf8 })
    }

    /// Follows `GET /events` (with its query): calls `on_open` once the proxy has subscribed this
    /// watcher (every event from then on arrives), then `on_event(kind, data)` for each event
    /// (`data` is JSON) until `on_event` breaks (then `Ok`). An end of the stream, a silence of
    /// `max_silence`, an event over [`EVENT_LIMIT`] or one that is not JSON is an error saying so.
    pub async fn watch(
        &self,
        query: &str,
        max_silence: Duration,
        on_open: impl FnOnce(),
        mut on_event: impl FnMut(&str, &Value, &str) -> ControlFlow<()>,
    ) -> Result<(), String> {
        let path = format!("/events{query}");
        let url = self.url(&path);
        let (response, _driving) = self.open("GET", &path, &[("accept", "text/event-stream")], b"").await?;
        let status = response.status().as_u16();
        if status != 200 {
            // The error body, read with the bounds of any answer.
            let reply = self.read_answer(response, url).await?;
            return Err(format!("{} ({status})", reply.error()));
        }
        on_open();
        let mut incoming = response.into_body();
        let mut events = EventStream::default();
        loop {
            let frame = tokio::time::timeout(max_silence, incoming.frame()).await.map_err(|_| {
                format!(
                    "the admin API at {url} sent nothing for {}, not even its keep-alive (every 15 s): \
                     taken as gone (see --max-silence)",
                    humantime::format_duration(max_silence)
                )
            })?;
            let frame = match frame {
                None => {
                    return Err(format!(
                        "the event stream of {url} ended: the proxy stopped, or dropped this watcher \
                         (one that falls too far behind is dropped; see its log)"
                    ));
                }
                Some(frame) => frame.map_err(|e| {
                    format!("the event stream of {url} broke off: {} (did the proxy stop?)", explain(&e))
                })?,
            };
            let Ok(data) = frame.into_data() else { continue };
            let mut failed = None;
            let flow = events.feed(&data, |kind, data| match serde_json::from_str::<Value>(data) {
                Ok(value) => on_event(kind, &value, data),
                Err(e) => {
                    failed = Some(format!(
                        "the admin API at {url} sent a {} event whose data is not JSON ({e})",
                        Escaped(kind)
                    ));
                    ControlFlow::Break(())
                }
            });
            let flow = flow.map_err(|e| format!("the admin API at {url} sent {e}"))?;
            if let Some(failed) = failed {
                return Err(failed);
            }
            if flow.is_break() {
                return Ok(());
            }
        }
    }
}

/// A Server-Sent Events parser (the WHATWG rules: lines end in CR LF, LF or CR; `event:` names
/// the kind, `data:` lines are joined with newlines, a blank line ends the event, `:` lines are
/// comments, other fields are ignored) holding at most [`EVENT_LIMIT`] of a line and of an event.
#[derive(Debug, Default)]
struct EventStream {
    line: Vec<u8>,
    /// The last byte was a CR: an LF right after it ends no second line.
    after_cr: bool,
    kind: String,
    data: String,
    has_data: bool,
}

impl EventStream {
    /// Feeds bytes; calls `on_event(kind, data)` for each complete event, until it breaks.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(&str, &str) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, String> {
        while !bytes.is_empty() {
            if std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.line.len() + bytes.len() > EVENT_LIMIT {
                    return Err(format!("an event line over ctl's {} MiB limit", EVENT_LIMIT >> 20));
                }
                self.line.extend_from_slice(bytes);
                break;
            };
            if self.line.len() + end > EVENT_LIMIT {
                return Err(format!("an event line over ctl's {} MiB limit", EVENT_LIMIT >> 20));
            }
            self.line.extend_from_slice(&bytes[..end]);
            self.after_cr = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            let line = std::mem::take(&mut self.line);
            if self.line_done(&line, &mut on_event)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    fn line_done(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(&str, &str) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, String> {
        if line.is_empty() {
            let kind = std::mem::take(&mut self.kind);
            let data = std::mem::take(&mut self.data);
            if std::mem::take(&mut self.has_data) {
                let kind = if kind.is_empty() { "message" } else { kind.as_str() };
                return Ok(on_event(kind, &data));
            }
            return Ok(ControlFlow::Continue(()));
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.kind = value.to_string(),
            "data" => {
                if self.data.len() + value.len() + 1 > EVENT_LIMIT {
                    return Err(format!("an event over ctl's {} MiB limit", EVENT_LIMIT >> 20));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // a comment (the keep-alive), `id`, `retry`
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// One `/events` event as a line a person reads; every text from the API is escaped.
pub fn event_line(kind: &str, v: &Value) -> String {
    let s = |k: &str| match &v[k] {
        Value::Null => "-".to_string(),
        Value::String(s) => escaped(s).into_owned(),
        other => escaped(&other.to_string()).into_owned(),
    };
    let client_id = v["client_id"].as_str().filter(|id| !id.is_empty()).unwrap_or("no client id");
    let conn = format!("conn {} ({})", s("conn"), Escaped(client_id));
    let faults = fault_counts(&v["faults"]);
    let faults = if faults.is_empty() { "none".to_string() } else { faults.join(",") };
    match kind {
        "connect" => format!(
            "{conn} CONNECT protocol {} Keep Alive {} (forwarded {})",
            s("protocol"),
            s("keep_alive"),
            s("forwarded_keep_alive")
        ),
        "connack" => format!("{conn} CONNACK code {}", s("code")),
        "fault" => format!("{conn} fault {}: {} {}", s("rule"), s("action"), s("direction")),
        "closed" => format!(
            "{conn} closed by {} ({}, cause {}) after {} s of silence = {} × Keep Alive {}; faults {}",
            s("closed_by"),
            s("how"),
            s("cause"),
            s("silence_s"),
            s("silence_ratio"),
            s("keep_alive"),
            faults
        ),
        "rules" => format!("rules: {}", s("change")),
        "detection" => format!(
            "{conn} the {} detected the silence after {} s = {} × Keep Alive",
            s("side"),
            s("silence_s"),
            s("ratio")
        ),
        "ended" => format!("{conn} fully closed, {} s after its first close", s("lingered_s")),
        "takeover" => format!("{conn} taken over by conn {}", s("by")),
        "will" => format!(
            "conn {} Will on {}: {} (after {} s; watched by {})",
            s("conn"),
            s("topic"),
            s("outcome"),
            s("delay_s"),
            s("watched_by")
        ),
        other => format!("{} {}", Escaped(other), Escaped(&v.to_string())),
    }
}

/// A rules file as `ctl add` takes it: a profile, or just `[[rules]]` tables.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    #[allow(dead_code)] // a profile's own fields are accepted and not used
    name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    seed: Option<u64>,
    rules: Vec<RuleSpec>,
}

/// The rules for `ctl add`, each as a JSON request body: JSON text (one rule or an array), or a
/// `.json`/`.toml` file holding one rule, an array of rules, or `[[rules]]` tables (a profile or
/// the README's snippets). TOML errors carry `file:line:col`.
pub fn rule_bodies(arg: &str) -> Result<Vec<Vec<u8>>, String> {
    let path = std::path::Path::new(arg);
    let specs: Vec<RuleSpec> = if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{arg}: {e}"))?;
        if arg.ends_with(".toml") {
            let at = |e: toml::de::Error| {
                let (line, col) = crate::config::line_col(&text, e.span().map_or(0, |s| s.start));
                format!("{arg}:{line}:{col}: {}", e.message().trim_end())
            };
            let has_rules = text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("rules"));
            if has_rules {
                toml::from_str::<RulesFile>(&text).map_err(at)?.rules
            } else {
                vec![toml::from_str::<RuleSpec>(&text).map_err(at)?]
            }
        } else {
            json_rules(&text).map_err(|e| format!("{arg}: {e}"))?
        }
    } else {
        json_rules(arg).map_err(|e| format!("the rule is neither a file nor valid JSON: {e}"))?
    };
    if specs.is_empty() {
        return Err(format!("{arg}: no rule in it"));
    }
    specs.iter().map(|s| serde_json::to_vec(s).map_err(|e| e.to_string())).collect()
}

/// One JSON rule, or an array of them.
fn json_rules(text: &str) -> Result<Vec<RuleSpec>, serde_json::Error> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
    } else {
        serde_json::from_str(text).map(|one| vec![one])
    }
}

/// A string of the API's JSON as table text: escaped, or `default` when it is not a string.
fn cell<'a>(v: &'a Value, default: &'a str) -> std::borrow::Cow<'a, str> {
    escaped(v.as_str().unwrap_or(default))
}

/// Profiles (`GET /profiles`) as a table.
pub fn profiles_table(v: &Value) -> String {
    let mut out = format!("{:<28} {:<9} {:>5}  {}\n", "NAME", "SOURCE", "RULES", "DESCRIPTION");
    for p in v.as_array().into_iter().flatten() {
        let rules = p["rules"].as_u64().map_or("-".to_string(), |n| n.to_string());
        let about = p["description"].as_str().or(p["error"].as_str()).unwrap_or("");
        let mut about: String = about.lines().next().unwrap_or("").chars().take(100).collect();
        if about.chars().count() == 100 {
            about.push('…');
        }
        out.push_str(&format!(
            "{:<28} {:<9} {:>5}  {}\n",
            cell(&p["name"], ""),
            cell(&p["source"], ""),
            rules,
            escaped(&about)
        ));
    }
    out
}

/// `rule=count,…` of a record's `faults` object, escaped.
fn fault_counts(faults: &Value) -> Vec<String> {
    faults
        .as_object()
        .into_iter()
        .flatten()
        .map(|(rule, n)| format!("{}={}", escaped(rule), escaped(&n.to_string())))
        .collect()
}

/// Connections as a table: their state (for closed ones, how and why they closed) and faults.
/// Client ids and every other text are escaped.
pub fn connections_table(v: &Value) -> String {
    let mut out = format!(
        "{:<6} {:<10} {:<24} {:<34} {:<5} {:<14} {:>8} {:>10} {:>10}  {:<16} {}\n",
        "ID",
        "ROUTE",
        "CLIENT_ID",
        "STATE",
        "PROTO",
        "KA req/bk/cl",
        "AGE_S",
        "C→B_BYTES",
        "B→C_BYTES",
        "OWN_RULES",
        "FAULTS"
    );
    for c in v.as_array().into_iter().flatten() {
        let ka = |k: &str| c["keep_alive"][k].as_u64().map_or("-".to_string(), |n| n.to_string());
        let own: Vec<_> =
            c["local_rules"].as_array().into_iter().flatten().map(|r| cell(&r["name"], "?")).collect();
        let close = &c["close"];
        let state = match (c["state"].as_str().unwrap_or("-"), c["state_detail"].as_str()) {
            // The proxy's own close is its cause: "closed by the proxy", not "proxy by proxy".
            ("closed", _) => match (cell(&close["cause"], "-"), cell(&close["closed_by"], "-")) {
                (cause, by) if cause == by => format!("closed by the {by}"),
                (cause, by) => format!("closed: {cause} by {by}"),
            },
            (state, Some(detail)) => format!("{}: {}", escaped(state), escaped(detail)),
            (state, None) => escaped(state).into_owned(),
        };
        out.push_str(&format!(
            "{:<6} {:<10} {:<24} {:<34} {:<5} {:<14} {:>8.1} {:>10} {:>10}  {:<16} {}\n",
            c["id"].as_u64().unwrap_or(0),
            cell(&c["route"], ""),
            cell(&c["client_id"], "-"),
            state,
            c["protocol"].as_u64().map_or("-".to_string(), |p| p.to_string()),
            format!("{}/{}/{}", ka("requested"), ka("broker_enforced"), ka("client_enforced")),
            c["age_s"].as_f64().unwrap_or(0.0),
            c["client_to_broker"]["bytes"].as_u64().unwrap_or(0),
            c["broker_to_client"]["bytes"].as_u64().unwrap_or(0),
            if own.is_empty() { "-".to_string() } else { own.join(",") },
            fault_counts(&c["faults"]).join(","),
        ));
    }
    out
}

/// The rules in force as a table.
pub fn rules_table(v: &Value) -> String {
    let mut out = format!("profile: {}\n", cell(&v["profile"], "(none)"));
    out.push_str(&format!(
        "{:<28} {:<18} {:<17} {:<20} {:<8} {:<8}\n",
        "NAME", "ACTION", "DIRECTION", "PACKETS", "AFTER", "DURATION"
    ));
    for r in v["rules"].as_array().into_iter().flatten() {
        let packets = r["packets"]
            .as_array()
            .map_or("all".to_string(), |p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
        out.push_str(&format!(
            "{:<28} {:<18} {:<17} {:<20} {:<8} {:<8}\n",
            cell(&r["name"], ""),
            cell(&r["action"], ""),
            cell(&r["direction"], "both"),
            escaped(&packets),
            cell(&r["after"], "0s"),
            cell(&r["duration"], "-"),
        ));
    }
    out
}

/// What `PUT /profile` replaced (its answer's `replaced`): a line saying which rules the
/// activation removed, or `None` when there were none (or the proxy does not say).
pub fn replaced_line(v: &Value) -> Option<String> {
    let names: Vec<_> = v["replaced"]["rules"].as_array()?.iter().map(|n| cell(n, "?")).collect();
    if names.is_empty() {
        return None;
    }
    let from = match v["replaced"]["profile"].as_str() {
        Some(p) => format!(" (profile {} and any added since)", escaped(p)),
        None => String::new(),
    };
    Some(format!(
        "removed the {} global rule{} in force before{from}: {}; connections' own rules are kept\n",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    ))
}

/// Whether an answer has the shape its table needs: a list (`connections`, `profiles`) or an
/// object (`rules`, `summary`, …); `what` names it for the error.
pub fn expect_shape(reply: &Reply, v: &Value, list: bool, what: &str) -> Result<(), String> {
    let fits = if list { v.is_array() } else { v.is_object() };
    if fits {
        return Ok(());
    }
    Err(format!("the admin API at {} answered {} with JSON that is not {what}", reply.url, reply.status))
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request of a ctl command: method, path, content type, body.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
}

impl Request {
    fn get(path: &str) -> Request {
        Request { method: "GET", path: path.to_string(), content_type: None, body: Vec::new() }
    }
}

/// The request of `command`, or `None` for `add` and `watch` (their own exchanges). An error is
/// bad usage (a profile path that is no file).
pub fn request_for(command: &CtlCommand) -> Result<Option<Request>, String> {
    let segment = percent_encode;
    Ok(Some(match command {
        CtlCommand::Connections { closed } => {
            Request::get(if *closed { "/connections?state=closed" } else { "/connections" })
        }
        CtlCommand::Kill { id, how } => Request {
            method: "DELETE",
            path: format!("/connections/{id}?how={}", segment(how)),
            ..Request::get("")
        },
        CtlCommand::Rules => Request::get("/rules"),
        CtlCommand::Add { .. } | CtlCommand::Watch { .. } => return Ok(None),
        CtlCommand::Remove { name, conn } => {
            let name = segment(name);
            let path = conn.map_or(format!("/rules/{name}"), |id| format!("/connections/{id}/rules/{name}"));
            Request { method: "DELETE", path, ..Request::get("") }
        }
        CtlCommand::Profile { profile } => {
            let put = |content_type, body| Request {
                method: "PUT",
                path: "/profile".to_string(),
                content_type: Some(content_type),
                body,
            };
            if std::path::Path::new(profile).is_file() {
                put("application/toml", std::fs::read(profile).map_err(|e| format!("{profile}: {e}"))?)
            } else if crate::fault::profile::is_path(profile) {
                // Not a file, and no name either (a name has no `/` nor `.toml`).
                let hint = crate::fault::profile::path_hint(profile, None)
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                return Err(format!("{profile}: no such file{hint}"));
            } else {
                put("application/json", serde_json::json!({ "name": profile }).to_string().into_bytes())
            }
        }
        CtlCommand::Reset => Request { method: "POST", ..Request::get("/reset") },
        CtlCommand::Profiles => Request::get("/profiles"),
        CtlCommand::Summary => Request::get("/summary"),
    }))
}

/// The shape the answer to `command` must have: a list (`true`) or an object, and its name for
/// the error.
pub fn answer_shape(command: &CtlCommand) -> (bool, &'static str) {
    match command {
        CtlCommand::Connections { .. } => (true, "a list of connections"),
        CtlCommand::Profiles => (true, "a list of profiles"),
        CtlCommand::Rules | CtlCommand::Profile { .. } => (false, "the rules in force"),
        CtlCommand::Summary => (false, "a summary"),
        _ => (false, "an object"),
    }
}

/// The answer to `command` as text; for `add`, the line of one rule added.
pub fn render(command: &CtlCommand, value: &Value) -> String {
    match command {
        CtlCommand::Connections { .. } => connections_table(value),
        CtlCommand::Rules => rules_table(value),
        CtlCommand::Profile { .. } => rules_table(value) + &replaced_line(value).unwrap_or_default(),
        CtlCommand::Kill { id, how } => format!("closed connection {id} ({})\n", escaped(how)),
        CtlCommand::Add { conn: None, .. } => {
            format!("added rule {}\n", escaped(value["name"].as_str().unwrap_or("")))
        }
        CtlCommand::Add { conn: Some(id), .. } => format!(
            "added rule {} to connection {id}\n",
            escaped(value["rule"]["name"].as_str().unwrap_or(""))
        ),
        CtlCommand::Profiles => profiles_table(value),
        CtlCommand::Summary => crate::summary::text(value),
        CtlCommand::Watch { .. } => String::new(),
        CtlCommand::Remove { name, conn: None } => format!("removed rule {}\n", escaped(name)),
        CtlCommand::Remove { name, conn: Some(id) } => {
            format!("removed rule {} from connection {id}\n", escaped(name))
        }
        CtlCommand::Reset => format!(
            "all rules removed ({} global, {} of single connections)\n",
            value["removed"]["global"].as_u64().unwrap_or(0),
            value["removed"]["local"].as_u64().unwrap_or(0)
        ),
    }
}

/// Sends `request` and checks the answer: a 2xx status (else the API's error and the status)
/// and JSON of the shape `command` expects.
pub async fn exchange(
    client: &Client,
    command: &CtlCommand,
    request: &Request,
) -> Result<(Reply, Value), String> {
    let reply = client.request(request.method, &request.path, request.content_type, &request.body).await?;
    if !(200..300).contains(&reply.status) {
        return Err(format!("{} ({})", reply.error(), reply.status));
    }
    let (list, what) = answer_shape(command);
    let value = reply.json().and_then(|v| expect_shape(&reply, &v, list, what).map(|()| v))?;
    Ok((reply, value))
}

/// `ctl add` on one proxy: one request per rule body to `path`, in order, calling `on_added` for
/// each rule added; stops at the first refusal, whose error says how many were added before it.
pub async fn add_rules(
    client: &Client,
    path: &str,
    bodies: &[Vec<u8>],
    mut on_added: impl FnMut(&Reply, &Value),
) -> Result<(), String> {
    for (added, body) in bodies.iter().enumerate() {
        let before = if added > 0 { format!(" (after adding {added})") } else { String::new() };
        let reply = client
            .request("POST", path, Some("application/json"), body)
            .await
            .map_err(|e| format!("{e}{before}"))?;
        if !(200..300).contains(&reply.status) {
            return Err(format!("{} ({}){before}", reply.error(), reply.status));
        }
        let value = reply.json().map_err(|e| format!("{e}{before}"))?;
        on_added(&reply, &value);
    }
    Ok(())
}

/// What a command sent to several proxies gave: the output (every proxy's answer, merged), and
/// one line per proxy that failed (then a count), for stderr.
#[derive(Debug, Default)]
pub struct Merged {
    pub out: String,
    pub failures: Vec<String>,
}

/// Sends `command` to every proxy at once (each exchange bounded as any), and merges the
/// answers in the order the proxies were given: tables and lines get a first column naming the
/// proxy (one header for `connections`); `json` gives one object keyed by proxy URL whose
/// values are the API's JSON exact (for `add`, the list of rules added), or `{"error": "…"}`
/// for a proxy that failed. An error is bad usage: a command that names a connection by id,
/// `watch`, or a rule or profile file that cannot be used.
pub async fn many(clients: &[Client], command: &CtlCommand, json: bool) -> Result<Merged, String> {
    let n = clients.len();
    let one_proxy = |what: &str| {
        format!("{what}, which is one proxy's: give one --admin ({n} given), and run ctl once per proxy")
    };
    let prepared = match command {
        CtlCommand::Kill { .. } => return Err(one_proxy("ctl kill names a connection by its id")),
        CtlCommand::Add { conn: Some(_), .. } | CtlCommand::Remove { conn: Some(_), .. } => {
            return Err(one_proxy("--conn names a connection by its id"));
        }
        CtlCommand::Watch { .. } => {
            return Err(format!(
                "ctl watch follows one proxy: give one --admin ({n} given), and run one ctl watch per proxy"
            ));
        }
        CtlCommand::Add { rule, conn: None } => Prepared::Add { path: "/rules", bodies: rule_bodies(rule)? },
        other => Prepared::One(request_for(other)?.expect("add and watch are handled above")),
    };
    let ask = |client| ask(client, command, &prepared);
    let answers = futures_util::future::join_all(clients.iter().map(ask)).await;
    let urls: Vec<String> = clients.iter().map(Client::base_url).collect();
    let width = urls.iter().map(|u| u.chars().count()).chain([PROXY.len()]).max().unwrap_or(0);
    let mut merged = Merged::default();
    if json {
        let entries: Vec<String> = urls
            .iter()
            .zip(&answers)
            .map(|(url, answer)| {
                let value = match answer {
                    Ok((_, body)) => body.trim().to_string(),
                    Err(e) => serde_json::json!({ "error": e }).to_string(),
                };
                format!("{}:{value}", Value::from(url.as_str()))
            })
            .collect();
        merged.out = format!("{{{}}}\n", entries.join(","));
    } else {
        let header = matches!(command, CtlCommand::Connections { .. });
        if header {
            let columns = connections_table(&Value::Array(Vec::new()));
            merged.out = format!("{PROXY:<width$}  {columns}");
        }
        for (url, answer) in urls.iter().zip(&answers) {
            if let Ok((text, _)) = answer {
                for line in text.lines().skip(usize::from(header)) {
                    merged.out.push_str(&format!("{url:<width$}  {line}\n"));
                }
            }
        }
    }
    let mut failed = Vec::new();
    for (url, answer) in urls.iter().zip(&answers) {
        if let Err(e) = answer {
            merged.failures.push(format!("{url}: {e}"));
            failed.push(url.as_str());
        }
    }
    if !failed.is_empty() {
        merged.failures.push(format!("{} of {n} proxies failed: {}", failed.len(), failed.join(", ")));
    }
    Ok(merged)
}

/// A command ready to send to any number of proxies.
enum Prepared {
    One(Request),
    Add { path: &'static str, bodies: Vec<Vec<u8>> },
}

/// One proxy's answer to `command`: as text, and its JSON (for `add`, a list of the rules added).
async fn ask(client: &Client, command: &CtlCommand, prepared: &Prepared) -> Result<(String, String), String> {
    match prepared {
        Prepared::One(request) => {
            let (reply, value) = exchange(client, command, request).await?;
            Ok((render(command, &value), reply.body))
        }
        Prepared::Add { path, bodies } => {
            let (mut text, mut answers) = (String::new(), Vec::new());
            add_rules(client, path, bodies, |reply, value| {
                text.push_str(&render(command, value));
                answers.push(reply.body.clone());
            })
            .await?;
            Ok((text, format!("[{}]", answers.join(","))))
        }
    }
}

/// The name of the column naming the proxy when ctl asks several.
const PROXY: &str = "PROXY";

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `feed` yields for `chunks` fed one after the other.
    fn events_of(chunks: &[&[u8]]) -> Result<Vec<(String, String)>, String> {
        let mut parser = EventStream::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let flow = parser.feed(chunk, |k, d| {
                out.push((k.to_string(), d.to_string()));
                ControlFlow::Continue(())
            })?;
            assert!(flow.is_continue());
        }
        Ok(out)
    }

    #[test]
    fn server_sent_events_split_anywhere_and_any_line_ending() {
        let one = |k: &str, d: &str| (k.to_string(), d.to_string());
        let stream: &[u8] =
            b":\n\nevent: connect\ndata: {\"a\":1}\n\nevent:closed\r\ndata:x\r\ndata: y\r\n\r\ndata: z\r\r";
        let expected = vec![one("connect", "{\"a\":1}"), one("closed", "x\ny"), one("message", "z")];
        assert_eq!(events_of(&[stream]).unwrap(), expected);
        // Byte by byte: a CR LF split between two reads is one line end, not two.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events_of(&bytes).unwrap(), expected);
    }

    #[test]
    fn an_event_line_or_an_event_over_the_limit_is_an_error() {
        let long = vec![b'x'; EVENT_LIMIT / 2 + 1];
        let e = events_of(&[b"data: ", &long, &long]).unwrap_err();
        assert!(e.contains("event line over ctl's 1 MiB limit"), "{e}");
        let line = [b"data: ".as_slice(), &long, b"\n"].concat();
        let e = events_of(&[&line, &line]).unwrap_err();
        assert!(e.contains("an event over ctl's 1 MiB limit"), "{e}");
        // Up to the limit is fine.
        assert_eq!(events_of(&[&line, b"\n"]).unwrap().len(), 1);
    }

    #[test]
    fn text_from_the_api_is_escaped_in_tables_and_event_lines() {
        let hostile = "dev\n\u{1b}[31mred";
        let record = serde_json::json!([{"id": 1, "client_id": hostile, "route": "r\u{7}",
            "state": "closed", "close": {"cause": "x\ry", "closed_by": "client"},
            "local_rules": [{"name": "a\u{202e}b"}], "faults": {"f\n": 1}}]);
        let table = connections_table(&record);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\u{1b}') && !table.contains('\r') && !table.contains('\u{7}'), "{table}");
        assert!(
            table.contains(r"dev\n\u{1b}[31mred")
                && table.contains(r"a\u{202e}b")
                && table.contains(r"f\n=1")
        );
        let event = serde_json::json!({"conn": 1, "client_id": hostile, "protocol": 4});
        let line = event_line("connect", &event);
        assert_eq!(line, r"conn 1 (dev\n\u{1b}[31mred) CONNECT protocol 4 Keep Alive - (forwarded -)");
        assert!(!event_line("odd\u{1b}", &event).contains('\u{1b}'));
    }

    #[test]
    fn a_close_reads_as_a_sentence_whoever_closed() {
        let record = |cause: &str, by: &str| serde_json::json!([{"id": 1, "state": "closed", "close": {"cause": cause, "closed_by": by}}]);
        assert!(connections_table(&record("proxy", "proxy")).contains("closed by the proxy"));
        let broker = connections_table(&record("keepalive_timeout", "broker"));
        assert!(broker.contains("closed: keepalive_timeout by broker"), "{broker}");
    }

    #[test]
    fn admin_urls() {
        assert!(Client::new("http://127.0.0.1:9184", None).is_ok());
        assert!(Client::new("127.0.0.1:9184/", None).is_ok());
        assert!(Client::new("https://x:1", None).is_err());
        assert!(Client::new("http://x:1/metrics", None).is_err());
    }
}
