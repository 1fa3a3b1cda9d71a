//! `mqtt-chaos ctl`: the admin API for shells and scripts.
//!
//! A deliberately small HTTP/1.1 client (one request per connection, `Connection: close`) — the
//! admin API is on loopback or a trusted network and needs no TLS — plus table rendering.

use crate::fault::RuleSpec;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An admin API endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`.
    authority: String,
    token: Option<String>,
}

/// A response: status and body text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.body)
            .map_err(|e| format!("the admin API answered {} with a non-JSON body ({e})", self.status))
    }

    /// The error message of a JSON error body, or the raw body.
    pub fn error(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.clone())
    }
}

impl Client {
    /// `http://host:port` (or just `host:port`); other schemes and paths are refused.
    pub fn new(url: &str, token: Option<String>) -> Result<Client, String> {
        let rest = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
        if rest.contains('/') || url.starts_with("https://") || !rest.contains(':') {
            return Err(format!("--admin must be http://HOST:PORT, got {url:?}"));
        }
        Ok(Client { authority: rest.to_string(), token })
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Reply, String> {
        let fail = |e: std::io::Error| format!("admin API at {} unreachable: {e}", self.authority);
        let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("admin API at {} did not answer within 5 s", self.authority))?
            .map_err(fail)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.authority,
            body.len()
        );
        if let Some(t) = content_type {
            head.push_str(&format!("Content-Type: {t}\r\n"));
        }
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.map_err(fail)?;
        stream.write_all(body).await.map_err(fail)?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| format!("admin API at {} did not finish its answer within 30 s", self.authority))?
            .map_err(fail)?;
        parse_response(&raw)
    }
}

impl Client {
    /// Follows `GET /events` (with its query): calls `on_open` once the proxy has subscribed this
    /// watcher (every event from then on arrives), then `on_event(kind, data)` for each event
    /// until the proxy ends the stream. Asked as HTTP/1.0 so that the body is the raw event
    /// stream, delimited by the close.
    pub async fn watch(
        &self,
        query: &str,
        on_open: impl FnOnce(),
        mut on_event: impl FnMut(&str, &str),
    ) -> Result<(), String> {
        use tokio::io::AsyncBufReadExt;
        let fail = |e: std::io::Error| format!("admin API at {} unreachable: {e}", self.authority);
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("admin API at {} did not answer within 5 s", self.authority))?
            .map_err(fail)?;
        let mut stream = tokio::io::BufReader::new(stream);
        let mut head = format!(
            "GET /events{query} HTTP/1.0\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            self.authority
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        stream.get_mut().write_all(head.as_bytes()).await.map_err(fail)?;
        let mut line = String::new();
        stream.read_line(&mut line).await.map_err(fail)?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        // The headers, up to the blank line.
        loop {
            line.clear();
            if stream.read_line(&mut line).await.map_err(fail)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        if status != 200 {
            let mut body = String::new();
            let _ = stream.read_to_string(&mut body).await;
            let reply = Reply { status, body };
            return Err(format!("{} ({status})", reply.error()));
        }
        on_open();
        let (mut kind, mut data) = (String::new(), String::new());
        loop {
            line.clear();
            if stream.read_line(&mut line).await.map_err(fail)? == 0 {
                return Ok(());
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if let Some(k) = l.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(d) = l.strip_prefix("data:") {
                data.push_str(d.trim_start());
            } else if l.is_empty() && !data.is_empty() {
                on_event(&kind, &data);
                kind.clear();
                data.clear();
            }
        }
    }
}

/// One `/events` event as a line a person reads.
pub fn event_line(kind: &str, data: &str) -> String {
    let v: Value = serde_json::from_str(data).unwrap_or_default();
    let s = |k: &str| match &v[k] {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let client_id = v["client_id"].as_str().filter(|id| !id.is_empty()).unwrap_or("no client id");
    let conn = format!("conn {} ({client_id})", s("conn"));
    let faults: Vec<String> =
        v["faults"].as_object().into_iter().flatten().map(|(rule, n)| format!("{rule}={n}")).collect();
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
        other => format!("{other} {data}"),
    }
}

/// Parses an HTTP/1.1 response (content-length, chunked, or read-to-close bodies).
fn parse_response(raw: &[u8]) -> Result<Reply, String> {
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("malformed HTTP response (no header end)")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let mut body = &raw[split + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let end = body.windows(2).position(|w| w == b"\r\n").ok_or("malformed chunk")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16)
                .map_err(|_| "malformed chunk size")?;
            body = &body[end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size).ok_or("truncated chunk")?);
            body = body.get(size + 2..).unwrap_or_default();
        }
        out
    } else {
        body.to_vec()
    };
    Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned() })
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
            p["name"].as_str().unwrap_or(""),
            p["source"].as_str().unwrap_or(""),
            rules,
            about
        ));
    }
    out
}

/// Connections as a table: their state (for closed ones, how and why they closed) and faults.
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
        let faults: Vec<String> =
            c["faults"].as_object().into_iter().flatten().map(|(rule, n)| format!("{rule}={n}")).collect();
        let own: Vec<&str> =
            c["local_rules"].as_array().into_iter().flatten().filter_map(|r| r["name"].as_str()).collect();
        let close = &c["close"];
        let state = match (c["state"].as_str().unwrap_or("-"), c["state_detail"].as_str()) {
            ("closed", _) => format!(
                "closed: {} by {}",
                close["cause"].as_str().unwrap_or("-"),
                close["closed_by"].as_str().unwrap_or("-")
            ),
            (state, Some(detail)) => format!("{state}: {detail}"),
            (state, None) => state.to_string(),
        };
        out.push_str(&format!(
            "{:<6} {:<10} {:<24} {:<34} {:<5} {:<14} {:>8.1} {:>10} {:>10}  {:<16} {}\n",
            c["id"].as_u64().unwrap_or(0),
            c["route"].as_str().unwrap_or(""),
            c["client_id"].as_str().unwrap_or("-"),
            state,
            c["protocol"].as_u64().map_or("-".to_string(), |p| p.to_string()),
            format!("{}/{}/{}", ka("requested"), ka("broker_enforced"), ka("client_enforced")),
            c["age_s"].as_f64().unwrap_or(0.0),
            c["client_to_broker"]["bytes"].as_u64().unwrap_or(0),
            c["broker_to_client"]["bytes"].as_u64().unwrap_or(0),
            if own.is_empty() { "-".to_string() } else { own.join(",") },
            faults.join(","),
        ));
    }
    out
}

/// The rules in force as a table.
pub fn rules_table(v: &Value) -> String {
    let mut out = format!("profile: {}\n", v["profile"].as_str().unwrap_or("(none)"));
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
            r["name"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or(""),
            r["direction"].as_str().unwrap_or("both"),
            packets,
            r["after"].as_str().unwrap_or("0s"),
            r["duration"].as_str().unwrap_or("-"),
        ));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn admin_urls() {
        assert!(Client::new("http://127.0.0.1:9184", None).is_ok());
        assert!(Client::new("127.0.0.1:9184/", None).is_ok());
        assert!(Client::new("https://x:1", None).is_err());
        assert!(Client::new("http://x:1/metrics", None).is_err());
    }
}
