//! The rule schema, shared by profiles, the admin API and the docs, and its validation.
//!
//! A [`RuleSpec`] is what users write (TOML in profiles, JSON over the API): one flat table with
//! the common fields and the fields of its action. [`RuleSpec::compile`] checks it and produces a
//! [`Rule`], the form the engine evaluates. Errors name the offending field as a path
//! (`rules[2].probability`) so a profile loader can turn it into `file:line:col`.

use crate::codec::PacketType;
use crate::vocab::Direction;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// The actions a rule can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Drop,
    Delay,
    Blackhole,
    Freeze,
    Close,
    RewriteKeepalive,
    ServerKeepalive,
    Disconnect,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Drop => "drop",
            ActionKind::Delay => "delay",
            ActionKind::Blackhole => "blackhole",
            ActionKind::Freeze => "freeze",
            ActionKind::Close => "close",
            ActionKind::RewriteKeepalive => "rewrite_keepalive",
            ActionKind::ServerKeepalive => "server_keepalive",
            ActionKind::Disconnect => "disconnect",
        }
    }

    /// Whether the action acts on a connection by the clock, without a packet: a mode (black
    /// hole, freeze, half-close) or a connection action (close, disconnect). A change to such a
    /// rule wakes the connections it matches.
    pub fn is_time_driven(self) -> bool {
        match self {
            ActionKind::Blackhole | ActionKind::Freeze | ActionKind::Close | ActionKind::Disconnect => true,
            ActionKind::Drop
            | ActionKind::Delay
            | ActionKind::RewriteKeepalive
            | ActionKind::ServerKeepalive => false,
        }
    }

    /// Packet actions decide per packet (their probability is per packet and `count` limits
    /// them); the others decide once per connection.
    fn is_packet_action(self) -> bool {
        matches!(self, ActionKind::Drop | ActionKind::Delay)
    }
}

/// `direction` as written: one direction or both. `upstream`/`downstream` are toxiproxy's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionSpec {
    #[serde(alias = "upstream")]
    ClientToBroker,
    #[serde(alias = "downstream")]
    BrokerToClient,
    Both,
}

/// Which side a `close` or `disconnect` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SideSpec {
    Client,
    Broker,
    Both,
}

impl SideSpec {
    /// As written in profiles: `client`, `broker`, `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            SideSpec::Client => "client",
            SideSpec::Broker => "broker",
            SideSpec::Both => "both",
        }
    }

    /// In a sentence: `the client`, `the broker`, `both sides`.
    pub fn words(self) -> &'static str {
        match self {
            SideSpec::Client => "the client",
            SideSpec::Broker => "the broker",
            SideSpec::Both => "both sides",
        }
    }

    pub fn client(self) -> bool {
        matches!(self, SideSpec::Client | SideSpec::Both)
    }
    pub fn broker(self) -> bool {
        matches!(self, SideSpec::Broker | SideSpec::Both)
    }
}

/// How `close` closes: FIN, RST, or only the write half (the side gets EOF, can still send).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseMode {
    Fin,
    Rst,
    Half,
}

impl CloseMode {
    /// As written in profiles: `fin`, `rst`, `half`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseMode::Fin => "fin",
            CloseMode::Rst => "rst",
            CloseMode::Half => "half",
        }
    }
}

/// A DISCONNECT reason: a code (`0x8D`, `141`) or its name (`keep_alive_timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReasonSpec {
    Code(u8),
    Name(String),
}

/// `match`: which connections a rule applies to. Every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Glob on the client id (`*` any run of characters, `?` one character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Glob on the username; a connection without a username never matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Glob on the subject CN of the client's TLS certificate (mutual TLS); a connection
    /// without one never matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_cn: Option<String>,
    /// Protocol levels: 3 (MQTT 3.1), 4 (3.1.1), 5 (5.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Vec<u8>>,
    /// Route names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Vec<String>>,
}

/// A rule as users write it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub action: ActionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<DirectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub after: Option<Duration>,
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<MatchSpec>,
    /// `delay`: how long to hold each packet.
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub latency: Option<Duration>,
    /// `delay`: ± this much, uniformly.
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Duration>,
    /// `close`: which side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<SideSpec>,
    /// `close`: fin, rst or half.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<CloseMode>,
    /// `rewrite_keepalive`, `server_keepalive`: the new value, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<u16>,
    /// `rewrite_keepalive`: multiply the client's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// `rewrite_keepalive`: clamp from below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u16>,
    /// `rewrite_keepalive`: clamp from above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u16>,
    /// `disconnect`: the reason code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReasonSpec>,
    /// `disconnect`: whom to send it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<SideSpec>,
}

/// `"10s"`, `"250ms"`, `"1m 30s"` in both directions.
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"10s\" or \"250ms\""
            ))
        })
    }
}

/// A validation error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RuleError {
    /// Path of the field, e.g. `rules[2].probability` (the rule's own path if the problem is
    /// the rule as a whole).
    pub path: String,
    pub message: String,
}

/// What a rule does, with its parameters checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Drop,
    Delay { latency: Duration, jitter: Duration },
    Blackhole,
    Freeze,
    Close { side: SideSpec, how: CloseMode },
    RewriteKeepalive { set: Option<u16>, scale: Option<f64>, min: Option<u16>, max: Option<u16> },
    ServerKeepalive { set: u16 },
    Disconnect { reason: u8, to: SideSpec },
}

impl Action {
    /// The Keep Alive a `rewrite_keepalive` turns `requested` into.
    pub fn rewrite(&self, requested: u16) -> Option<u16> {
        let Action::RewriteKeepalive { set, scale, min, max } = *self else { return None };
        let mut v = f64::from(set.unwrap_or(requested));
        if let Some(s) = scale {
            v = (v * s).round();
        }
        if let Some(m) = min {
            v = v.max(f64::from(m));
        }
        if let Some(m) = max {
            v = v.min(f64::from(m));
        }
        Some(v.clamp(0.0, 65535.0) as u16)
    }
}

/// Connection matcher, compiled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matcher {
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub cert_cn: Option<String>,
    pub protocol: Option<Vec<u8>>,
    pub route: Option<Vec<String>>,
}

/// What the matcher looks at.
pub struct ConnFacts<'a> {
    pub route: &'a str,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// The subject CN of the client's TLS certificate.
    pub cert_cn: Option<&'a str>,
    pub protocol: u8,
}

impl Matcher {
    /// Whether the matcher may match a connection of which the username is not known: true
    /// when it would match with some username.
    pub fn may_match(&self, route: &str, client_id: &str, protocol: u8) -> bool {
        self.route.as_ref().is_none_or(|r| r.iter().any(|r| r == route))
            && self.protocol.as_ref().is_none_or(|p| p.contains(&protocol))
            && self.client_id.as_ref().is_none_or(|g| glob(g, client_id))
    }

    pub fn matches(&self, c: &ConnFacts<'_>) -> bool {
        self.route.as_ref().is_none_or(|r| r.iter().any(|r| r == c.route))
            && self.protocol.as_ref().is_none_or(|p| p.contains(&c.protocol))
            && self.client_id.as_ref().is_none_or(|g| glob(g, c.client_id))
            && self.username.as_ref().is_none_or(|g| c.username.is_some_and(|u| glob(g, u)))
            && self.cert_cn.as_ref().is_none_or(|g| c.cert_cn.is_some_and(|cn| glob(g, cn)))
    }
}

/// A validated rule, as the engine evaluates it.
#[derive(Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    pub action: Action,
    /// Whether it acts on client_to_broker and on broker_to_client.
    pub directions: [bool; 2],
    /// Packet types it acts on, one bit per [`PacketType::index`].
    pub packets: u16,
    pub probability: f64,
    pub after: Duration,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub matcher: Matcher,
    /// When the rule became active: on connections older than that, its `after` counts from here.
    pub activated: Instant,
    /// How many times each device connected since the rule became active (random rules only).
    numbers: ConnectionNumbers,
}

/// Per (route, client id), the number of the device's latest connection since the rule became
/// active, and which connection that was (so asking again for the same connection gives the
/// same number). At most [`MAX_DEVICES`] devices; past that, new ones count from 1 every time.
#[derive(Debug, Default)]
struct ConnectionNumbers(std::sync::Mutex<std::collections::HashMap<(String, String), (u64, u64)>>);

/// Devices a random rule numbers the connections of.
pub const MAX_DEVICES: usize = 100_000;

impl Rule {
    /// Whether the rule decides anything at random (a probability below 1, or jitter).
    pub fn is_random(&self) -> bool {
        self.probability < 1.0 || matches!(self.action, Action::Delay { jitter, .. } if !jitter.is_zero())
    }

    /// The number of connection `serial` (unique in the process) among the connections of
    /// (`route`, `client_id`) since the rule became active: 1, 2, …
    pub fn connection_number(&self, route: &str, client_id: &str, serial: u64) -> u64 {
        let mut devices = self.numbers.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (route.to_string(), client_id.to_string());
        if devices.len() >= MAX_DEVICES && !devices.contains_key(&key) {
            return 1;
        }
        let (last, n) = devices.entry(key).or_insert((serial, 0));
        if *n == 0 || *last != serial {
            (*last, *n) = (serial, *n + 1);
        }
        *n
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn kind(&self) -> ActionKind {
        self.spec.action
    }

    pub fn applies_to(&self, dir: Direction) -> bool {
        self.directions[dir as usize]
    }

    pub fn applies_to_packet(&self, t: PacketType) -> bool {
        self.packets & (1 << t.index()) != 0
    }
}

/// The largest `after`, `duration`, `latency` or `jitter` a rule may give: one year as the
/// duration syntax counts it (`"1year"`, 365.25 days). Longer values are errors, so a rule's
/// windows and delays always fit in an `Instant`.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// Every packet type.
const ALL_PACKETS: u16 = (1 << 15) - 1;

impl RuleSpec {
    /// Validates the rule; `path` prefixes error paths (e.g. `rules[2]`). The first error
    /// [`RuleSpec::compile_all`] finds.
    pub fn compile(&self, path: &str) -> Result<Rule, RuleError> {
        self.compile_all(path).map_err(|mut errors| errors.swap_remove(0))
    }

    /// Validates the rule and reports every problem it has (never an empty list), each with
    /// the path of its field; `path` prefixes them (e.g. `rules[2]`).
    pub fn compile_all(&self, path: &str) -> Result<Rule, Vec<RuleError>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            let path = if field.is_empty() { path.to_string() } else { format!("{path}.{field}") };
            errors.push(RuleError { path, message });
        };
        let kind = self.action;
        let a = kind.as_str();
        if let Err(message) = crate::names::check("rule name", &self.name) {
            err("name", message);
        }
        // Every time value is bounded, so no arithmetic on it can overflow an `Instant`.
        for (field, value) in [
            ("after", self.after),
            ("duration", self.duration),
            ("latency", self.latency),
            ("jitter", self.jitter),
        ] {
            if let Some(d) = value
                && d > MAX_DURATION
            {
                err(
                    field,
                    format!(
                        "`{field}` of {} is over the maximum of 1 year (\"1year\", 365.25 days)",
                        humantime::format_duration(d)
                    ),
                );
            }
        }
        // Fields that belong to other actions are mistakes, not options to ignore.
        let foreign: [(&str, bool, &[ActionKind]); 11] = [
            ("latency", self.latency.is_some(), &[ActionKind::Delay]),
            ("jitter", self.jitter.is_some(), &[ActionKind::Delay]),
            ("side", self.side.is_some(), &[ActionKind::Close]),
            ("how", self.how.is_some(), &[ActionKind::Close]),
            ("set", self.set.is_some(), &[ActionKind::RewriteKeepalive, ActionKind::ServerKeepalive]),
            ("scale", self.scale.is_some(), &[ActionKind::RewriteKeepalive]),
            ("min", self.min.is_some(), &[ActionKind::RewriteKeepalive]),
            ("max", self.max.is_some(), &[ActionKind::RewriteKeepalive]),
            ("reason", self.reason.is_some(), &[ActionKind::Disconnect]),
            ("to", self.to.is_some(), &[ActionKind::Disconnect]),
            ("packets", self.packets.is_some(), &[ActionKind::Drop, ActionKind::Delay]),
        ];
        for (field, given, owners) in foreign {
            if given && !owners.contains(&kind) {
                let owners: Vec<_> = owners.iter().map(|o| o.as_str()).collect();
                err(
                    field,
                    format!("`{field}` does not apply to action `{a}` (only to {})", owners.join(", ")),
                );
            }
        }
        // Actions whose direction is fixed accept the direction they act in (saying it is
        // harmless) and reject any other.
        let direction_fixed = match kind {
            ActionKind::Close | ActionKind::Disconnect => Some((None, "use `side`/`to` to choose the side")),
            ActionKind::RewriteKeepalive => Some((
                Some(DirectionSpec::ClientToBroker),
                "it acts on the client's CONNECT, which travels client_to_broker",
            )),
            ActionKind::ServerKeepalive => Some((
                Some(DirectionSpec::BrokerToClient),
                "it acts on the broker's CONNACK, which travels broker_to_client",
            )),
            _ => None,
        };
        if let (Some(given), Some((agrees, why))) = (self.direction, direction_fixed)
            && Some(given) != agrees
        {
            err("direction", format!("`direction` does not apply to action `{a}`: {why}"));
        }
        if self.count.is_some() && !kind.is_packet_action() {
            err("count", format!("`count` limits packets; action `{a}` acts once per connection"));
        }
        let probability = self.probability.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&probability) {
            err("probability", format!("probability must be between 0.0 and 1.0, got {probability}"));
        }
        if self.duration == Some(Duration::ZERO) {
            err("duration", "a duration of 0 would never apply; leave it out for \"until the end\"".into());
        }
        let mut packets = ALL_PACKETS;
        // A `packets` list on an action it does not apply to was reported above.
        if let Some(names) = &self.packets
            && kind.is_packet_action()
        {
            if names.is_empty() {
                err("packets", "an empty list matches no packet; leave it out for all packets".into());
            }
            packets = 0;
            for (i, n) in names.iter().enumerate() {
                match PacketType::from_name(n) {
                    Some(t) => packets |= 1 << t.index(),
                    None => {
                        let all: Vec<_> = PacketType::ALL.iter().map(|t| t.name()).collect();
                        err(
                            &format!("packets[{i}]"),
                            format!("unknown packet type {n:?}; known: {}", all.join(", ")),
                        );
                    }
                }
            }
        }
        let matcher = self.matcher.clone().unwrap_or_default();
        if let Some(levels) = &matcher.protocol
            && let Some(bad) = levels.iter().find(|l| !(3..=5).contains(*l))
        {
            err("match.protocol", format!("protocol level {bad} is not 3 (MQTT 3.1), 4 (3.1.1) or 5 (5.0)"));
        }
        let action = match kind {
            ActionKind::Drop => Action::Drop,
            ActionKind::Blackhole => Action::Blackhole,
            ActionKind::Freeze => Action::Freeze,
            ActionKind::Delay => {
                if self.latency.is_none() {
                    err("latency", "action `delay` needs `latency`, e.g. latency = \"2s\"".into());
                }
                Action::Delay {
                    latency: self.latency.unwrap_or_default(),
                    jitter: self.jitter.unwrap_or_default(),
                }
            }
            ActionKind::Close => Action::Close {
                side: self.side.unwrap_or(SideSpec::Both),
                how: self.how.unwrap_or(CloseMode::Fin),
            },
            ActionKind::RewriteKeepalive => {
                if self.set.is_some() && self.scale.is_some() {
                    err("scale", "give either `set` or `scale`, not both".into());
                }
                if self.set.is_none() && self.scale.is_none() && self.min.is_none() && self.max.is_none() {
                    err("", "action `rewrite_keepalive` needs `set`, `scale`, `min` or `max`".into());
                }
                if let Some(s) = self.scale
                    && !(s.is_finite() && s >= 0.0)
                {
                    err("scale", format!("scale must be a finite number ≥ 0, got {s}"));
                }
                if let (Some(lo), Some(hi)) = (self.min, self.max)
                    && lo > hi
                {
                    err("min", format!("min ({lo}) is above max ({hi})"));
                }
                Action::RewriteKeepalive { set: self.set, scale: self.scale, min: self.min, max: self.max }
            }
            ActionKind::ServerKeepalive => {
                if self.set.is_none() {
                    err(
                        "set",
                        "action `server_keepalive` needs `set`, the Server Keep Alive in seconds".into(),
                    );
                }
                if matcher.protocol.as_ref().is_some_and(|p| !p.contains(&5)) {
                    err(
                        "match.protocol",
                        "`server_keepalive` only changes MQTT 5 CONNACKs, and this match excludes protocol 5"
                            .into(),
                    );
                }
                Action::ServerKeepalive { set: self.set.unwrap_or_default() }
            }
            ActionKind::Disconnect => {
                let reason = match &self.reason {
                    None => {
                        err("reason", "action `disconnect` needs `reason`, e.g. reason = 0x8D".into());
                        0
                    }
                    Some(ReasonSpec::Code(c)) => *c,
                    Some(ReasonSpec::Name(n)) => reason_code(n).unwrap_or_else(|| {
                        err("reason", format!("unknown DISCONNECT reason {n:?}; give a code such as 0x8D"));
                        0
                    }),
                };
                if matcher.protocol.as_ref().is_some_and(|p| !p.contains(&5)) {
                    err(
                        "match.protocol",
                        "`disconnect` sends MQTT 5 packets; this match excludes protocol 5".into(),
                    );
                }
                Action::Disconnect { reason, to: self.to.unwrap_or(SideSpec::Client) }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let directions = match self.direction.unwrap_or(DirectionSpec::Both) {
            DirectionSpec::ClientToBroker => [true, false],
            DirectionSpec::BrokerToClient => [false, true],
            DirectionSpec::Both => [true, true],
        };
        Ok(Rule {
            spec: self.clone(),
            action,
            directions,
            packets,
            probability,
            after: self.after.unwrap_or_default(),
            duration: self.duration,
            count: self.count,
            matcher: Matcher {
                client_id: matcher.client_id,
                username: matcher.username,
                cert_cn: matcher.cert_cn,
                protocol: matcher.protocol,
                route: matcher.route,
            },
            activated: Instant::now(),
            numbers: ConnectionNumbers::default(),
        })
    }
}

/// The code of a DISCONNECT reason name, as [`crate::codec::reason_name`] spells it.
fn reason_code(name: &str) -> Option<u8> {
    (0..=255u8).find(|&c| crate::codec::reason_name(c) == name && name != "other")
}

/// Matches `text` against a glob where `*` is any run of characters and `?` any one character.
/// ASCII (nearly every client id) is matched byte by byte without allocating: a new connection
/// may be matched against thousands of rules.
pub fn glob(pattern: &str, text: &str) -> bool {
    if pattern.is_ascii() && text.is_ascii() {
        return glob_units(pattern.as_bytes(), text.as_bytes(), b'*', b'?');
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    glob_units(&p, &t, '*', '?')
}

fn glob_units<T: Copy + PartialEq>(p: &[T], t: &[T], star: T, any: T) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None; // (pattern index after '*', text index)
    while ti < t.len() {
        match p.get(pi) {
            Some(&c) if c == star => {
                backtrack = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == any || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((bp, bt)) => {
                    pi = bp;
                    ti = bt + 1;
                    backtrack = Some((bp, bt + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> RuleSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn compile_err(toml_text: &str) -> RuleError {
        spec(toml_text).compile("rules[0]").unwrap_err()
    }

    #[test]
    fn globs() {
        assert!(glob("sensor-*", "sensor-17"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(glob("*-1?", "plant-a-12"));
        assert!(!glob("sensor-*", "actuator-1"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*a*b*", "xxaxxbxx"));
        assert!(!glob("*a*b", "xxaxxbxxc"));
        assert!(glob("gerät-?", "gerät-ä"), "? is one character, not one byte");
        assert!(!glob("gerät-?", "gerät-äb"));
    }

    #[test]
    fn compiles_a_drop_rule_with_aliases_and_defaults() {
        let r = spec("name = \"x\"\naction = \"drop\"\ndirection = \"upstream\"\npackets = [\"pingreq\"]\n")
            .compile("rules[0]")
            .unwrap();
        assert_eq!(r.directions, [true, false]);
        assert!(r.applies_to_packet(PacketType::Pingreq) && !r.applies_to_packet(PacketType::Publish));
        assert_eq!((r.probability, r.after, r.duration), (1.0, Duration::ZERO, None));
        let r =
            spec("name = \"y\"\naction = \"blackhole\"\ndirection = \"downstream\"\n").compile("r").unwrap();
        assert_eq!(r.directions, [false, true]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = compile_err("name = \"x\"\naction = \"drop\"\nprobability = 1.5\n");
        assert_eq!(e.to_string(), "rules[0].probability: probability must be between 0.0 and 1.0, got 1.5");
        let e = compile_err("name = \"x\"\naction = \"drop\"\npackets = [\"PINGREQ\", \"PONG\"]\n");
        assert_eq!(e.path, "rules[0].packets[1]");
        assert!(e.message.starts_with("unknown packet type \"PONG\""));
        let e = compile_err("name = \"x\"\naction = \"rewrite_keepalive\"\nset = 5\nscale = 0.5\n");
        assert_eq!(e.to_string(), "rules[0].scale: give either `set` or `scale`, not both");
        let e =
            compile_err("name = \"x\"\naction = \"server_keepalive\"\nset = 5\nmatch = { protocol = [4] }\n");
        assert_eq!(e.path, "rules[0].match.protocol");
        let e = compile_err("name = \"x\"\naction = \"blackhole\"\nlatency = \"1s\"\n");
        assert_eq!(
            e.to_string(),
            "rules[0].latency: `latency` does not apply to action `blackhole` (only to delay)"
        );
        let e = compile_err("name = \"x\"\naction = \"close\"\ncount = 3\n");
        assert_eq!(e.path, "rules[0].count");
        let e = compile_err("name = \"x\"\naction = \"delay\"\n");
        assert_eq!(e.path, "rules[0].latency");
        let e = compile_err("name = \"x\"\naction = \"disconnect\"\nreason = \"bogus\"\n");
        assert_eq!(e.path, "rules[0].reason");
    }

    #[test]
    fn every_problem_of_a_rule_is_reported_and_the_first_is_the_one_compile_gives() {
        let text = "name = \"x\"\naction = \"close\"\nprobability = 3.0\ncount = 2\nlatency = \"1s\"\n\
                    match = { protocol = [9] }\n";
        let errors = spec(text).compile_all("rules[0]").unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["rules[0].latency", "rules[0].count", "rules[0].probability", "rules[0].match.protocol"]
        );
        assert_eq!(spec(text).compile("rules[0]").unwrap_err(), errors[0]);
        // Each bad packet name is its own error.
        let text = "name = \"x\"\naction = \"drop\"\npackets = [\"PING\", \"PINGREQ\", \"PONG\"]\n";
        let errors = spec(text).compile_all("r").unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["r.packets[0]", "r.packets[2]"]);
    }

    #[test]
    fn time_values_are_bounded_by_a_year() {
        for field in ["after", "duration", "latency", "jitter"] {
            let extra = if field == "latency" { "" } else { "latency = \"1s\"\n" };
            let e = compile_err(&format!(
                "name = \"x\"\naction = \"delay\"\n{extra}{field} = \"500000000000years\"\n"
            ));
            assert_eq!(e.path, format!("rules[0].{field}"));
            assert!(e.message.contains("over the maximum of 1 year"), "{}", e.message);
        }
        let edge = spec(
            "name = \"x\"\naction = \"delay\"\nlatency = \"1year\"\njitter = \"1year\"\n\
             after = \"1year\"\nduration = \"1year\"\n",
        );
        assert!(edge.compile("r").is_ok(), "the maximum itself is allowed");
        let e = compile_err("name = \"x\"\naction = \"drop\"\nafter = \"1year 1s\"\n");
        assert_eq!(e.path, "rules[0].after");
    }

    #[test]
    fn rule_names_are_checked_by_the_one_name_rule() {
        let e = compile_err("name = \"a\\nforged log line\"\naction = \"drop\"\n");
        assert_eq!(e.path, "rules[0].name");
        assert!(e.message.contains("control character"), "{}", e.message);
        let e = compile_err(&format!("name = \"{}\"\naction = \"drop\"\n", "n".repeat(65)));
        assert_eq!(e.path, "rules[0].name");
    }

    #[test]
    fn disconnect_reasons_by_code_or_name() {
        let r = spec("name = \"x\"\naction = \"disconnect\"\nreason = 0x8D\n").compile("r").unwrap();
        assert_eq!(r.action, Action::Disconnect { reason: 0x8d, to: SideSpec::Client });
        let r =
            spec("name = \"x\"\naction = \"disconnect\"\nreason = \"session_taken_over\"\nto = \"both\"\n")
                .compile("r")
                .unwrap();
        assert_eq!(r.action, Action::Disconnect { reason: 0x8e, to: SideSpec::Both });
    }

    #[test]
    fn keepalive_rewrites() {
        let rw = |t: &str| {
            spec(&format!("name = \"x\"\naction = \"rewrite_keepalive\"\n{t}")).compile("r").unwrap().action
        };
        assert_eq!(rw("set = 2\n").rewrite(60), Some(2));
        assert_eq!(rw("set = 0\n").rewrite(60), Some(0));
        assert_eq!(rw("scale = 0.5\n").rewrite(61), Some(31));
        assert_eq!(rw("scale = 10.0\n").rewrite(60_000), Some(65535));
        assert_eq!(rw("min = 10\nmax = 20\n").rewrite(5), Some(10));
        assert_eq!(rw("min = 10\nmax = 20\n").rewrite(60), Some(20));
        assert_eq!(rw("max = 20\n").rewrite(0), Some(0), "0 (disabled) is below any max");
    }

    #[test]
    fn a_direction_that_agrees_with_a_fixed_direction_action_is_accepted() {
        let compiles = |action: &str, extra: &str, direction: &str| {
            spec(&format!("name = \"x\"\naction = \"{action}\"\n{extra}direction = \"{direction}\"\n"))
                .compile("r")
                .map(|_| ())
                .map_err(|e| e.message)
        };
        assert_eq!(compiles("rewrite_keepalive", "set = 2\n", "client_to_broker"), Ok(()));
        assert_eq!(compiles("rewrite_keepalive", "set = 2\n", "upstream"), Ok(()));
        assert_eq!(compiles("server_keepalive", "set = 2\n", "broker_to_client"), Ok(()));
        for (action, extra, wrong) in [
            ("rewrite_keepalive", "set = 2\n", "broker_to_client"),
            ("rewrite_keepalive", "set = 2\n", "both"),
            ("server_keepalive", "set = 2\n", "client_to_broker"),
            ("close", "", "client_to_broker"),
        ] {
            let e = compiles(action, extra, wrong).unwrap_err();
            assert!(e.contains("`direction` does not apply"), "{action} {wrong}: {e}");
        }
    }

    #[test]
    fn matcher() {
        let m = Matcher {
            client_id: Some("sensor-*".into()),
            username: None,
            cert_cn: None,
            protocol: Some(vec![4, 5]),
            route: Some(vec!["plant-a".into()]),
        };
        let facts = |id, proto, route| ConnFacts {
            route,
            client_id: id,
            username: None,
            cert_cn: None,
            protocol: proto,
        };
        assert!(m.matches(&facts("sensor-1", 4, "plant-a")));
        assert!(!m.matches(&facts("sensor-1", 3, "plant-a")));
        assert!(!m.matches(&facts("sensor-1", 4, "plant-b")));
        assert!(!m.matches(&facts("pump-1", 4, "plant-a")));
        let u = Matcher { username: Some("*".into()), ..Matcher::default() };
        assert!(!u.matches(&facts("x", 4, "r")), "no username never matches a username glob");
        let cn = Matcher { cert_cn: Some("device-*".into()), ..Matcher::default() };
        let with = |cert_cn| ConnFacts { route: "r", client_id: "x", username: None, cert_cn, protocol: 4 };
        assert!(cn.matches(&with(Some("device-7"))));
        assert!(!cn.matches(&with(Some("gateway-1"))));
        assert!(!cn.matches(&with(None)), "no client certificate never matches a cert_cn glob");
    }
}
