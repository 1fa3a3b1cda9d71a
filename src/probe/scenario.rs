//! The scenarios: what each makes a raw client do through the in-process proxy (with which
//! rule), what it waits for, and how one run is judged.
//!
//! Every run returns one [`CaseRun`] per case (most scenarios have one; `takeover`,
//! `server-keepalive` and `will-delay` have several). Closes are read from the proxy's own
//! connection record (who closed, how, the silence the broker had heard), Wills from the
//! watcher's sightings.

use super::client::Sightings;
use super::judge::{self, CloseSeen, Judged, Tolerance, Verdict};
use super::report::Measured;
use crate::client::{Dial, Ended, Handshake, Pinging, RawClient};
use crate::codec::Protocol;
use crate::codec::encode::{ConnectSpec, WillSpec};
use crate::record::{Connection, Event, Registry};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The scenarios, in report order. The ids are a contract (`--scenarios`, JSON, JUnit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    Keepalive,
    PingResets,
    HalfOpen,
    KeepaliveZero,
    Takeover,
    ServerKeepalive,
    WillDelay,
    Rewrite,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Keepalive,
        Scenario::PingResets,
        Scenario::HalfOpen,
        Scenario::KeepaliveZero,
        Scenario::Takeover,
        Scenario::ServerKeepalive,
        Scenario::WillDelay,
        Scenario::Rewrite,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Scenario::Keepalive => "keepalive",
            Scenario::PingResets => "ping-resets",
            Scenario::HalfOpen => "half-open",
            Scenario::KeepaliveZero => "keepalive-zero",
            Scenario::Takeover => "takeover",
            Scenario::ServerKeepalive => "server-keepalive",
            Scenario::WillDelay => "will-delay",
            Scenario::Rewrite => "rewrite",
        }
    }

    pub fn parse(id: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.id() == id)
    }

    /// Two letters in the client ids (which stay within the 23 characters every broker accepts).
    fn code(self) -> &'static str {
        match self {
            Scenario::Keepalive => "ka",
            Scenario::PingResets => "pr",
            Scenario::HalfOpen => "ho",
            Scenario::KeepaliveZero => "kz",
            Scenario::Takeover => "to",
            Scenario::ServerKeepalive => "sk",
            Scenario::WillDelay => "wd",
            Scenario::Rewrite => "rw",
        }
    }

    /// Scenarios about MQTT 5 features, reported for MQTT 5 only.
    pub fn mqtt5_only(self) -> bool {
        matches!(self, Scenario::ServerKeepalive | Scenario::WillDelay)
    }

    /// The rule the proxy applies to this scenario's clients, as a JSON rule spec (the same
    /// schema as profiles and the admin API); `None` for scenarios without one.
    pub fn rule(self, prefix: &str, k: u16) -> Option<serde_json::Value> {
        let client_id = format!("{prefix}{}*", self.code());
        let name = format!("probe-{}", self.id());
        let matcher = serde_json::json!({ "client_id": client_id });
        Some(match self {
            Scenario::Keepalive => serde_json::json!({"name": name, "action": "drop",
                "direction": "client_to_broker", "packets": ["PINGREQ"], "match": matcher}),
            Scenario::HalfOpen => serde_json::json!({"name": name, "action": "blackhole",
                "direction": "client_to_broker", "match": matcher}),
            Scenario::Rewrite => serde_json::json!({"name": name, "action": "rewrite_keepalive",
                "set": k, "match": matcher}),
            _ => return None,
        })
    }

    /// What the specification expects, in a sentence with its references.
    pub fn expectation(self, protocol: Protocol, k: u16, tol: &Tolerance) -> String {
        let due = 1.5 * f64::from(k);
        let window = format!("{due:.1}–{:.1} s", due + tol.close_late_s);
        let v5 = protocol == Protocol::V5;
        let ka_ref =
            if v5 { "MQTT 5 §3.1.2.10 [MQTT-3.1.2-22]" } else { "MQTT 3.1.1 §3.1.2.10 [MQTT-3.1.2-24]" };
        let will_ref = if v5 { "§3.1.2.5" } else { "§3.1.2.5 [MQTT-3.1.2-8]" };
        match self {
            Scenario::Keepalive => format!(
                "the broker closes a client silent since its CONNECT after 1.5 × Keep Alive ({window}), {}and publishes its Will at once ({ka_ref}, {will_ref})",
                if v5 { "may send DISCONNECT 0x8D first, " } else { "" }
            ),
            Scenario::PingResets => format!(
                "every PINGREQ is answered with PINGRESP [MQTT-3.12.4-1] and restarts the timer: no close while pinging every k/2, then a close 1.5 × Keep Alive after the last PINGREQ ({window}) ({ka_ref})"
            ),
            Scenario::HalfOpen => format!(
                "with both sockets open and nothing arriving after the CONNECT, the broker notices no earlier and no later than 1.5 × Keep Alive ({window}) and publishes the Will ({ka_ref}, {will_ref})"
            ),
            Scenario::KeepaliveZero => format!(
                "Keep Alive 0 turns the mechanism off: the connection stays open through {} s of silence{} ({})",
                3 * u32::from(k),
                if v5 { " unless the broker announced a Server Keep Alive and enforces it" } else { "" },
                if v5 { "MQTT 5 §3.1.2.10" } else { "MQTT 3.1.1 §3.1.2.10" }
            ),
            Scenario::Takeover => format!(
                "a CONNECT with a client id already connected closes the old connection [MQTT-3.1.4-{}]{}; the new connection's Will is not published. Whether the old Will is published is reported, not judged (brokers differ)",
                if v5 { "3" } else { "2" },
                if v5 { " with DISCONNECT 0x8E Session taken over (§3.1.4, §4.13)" } else { "" }
            ),
            Scenario::ServerKeepalive => format!(
                "a Server Keep Alive in CONNACK (§3.2.2.3.14) replaces the client's Keep Alive, and the broker enforces the value in force at 1.5 × it (+{} s); values whose 1.5 × is over {} s are reported, not waited for",
                tol.close_late_s, WAIT_LIMIT_S
            ),
            Scenario::WillDelay => format!(
                "the Will is published after the Will Delay Interval ({WILL_DELAY} s) or when the session ends, whichever is first: at the close with Session Expiry 0, after {WILL_DELAY} s with Session Expiry 30 (+{} s) (§3.1.3.2.2, [MQTT-3.1.3-9])",
                tol.will_late_s
            ),
            Scenario::Rewrite => format!(
                "the proxy rewrites Keep Alive {} → {k} in the CONNECT; the broker enforces the value it received ({window}) ({ka_ref})",
                rewrite_from(k)
            ),
        }
    }

    /// The expectation in a few words, for the terminal table.
    pub fn expected_short(self, k: u16, tol: &Tolerance) -> String {
        let due = 1.5 * f64::from(k);
        let window = format!("close {due:.1}–{:.1} s", due + tol.close_late_s);
        match self {
            Scenario::Keepalive | Scenario::HalfOpen => format!("{window}, Will"),
            Scenario::PingResets => format!("{window} after last PINGREQ"),
            Scenario::KeepaliveZero => format!("open for {} s", 3 * u32::from(k)),
            Scenario::Takeover => "old closed (0x8E in 5), new Will kept".into(),
            Scenario::ServerKeepalive => "announced value enforced".into(),
            Scenario::WillDelay => format!("Will at 0 s / {WILL_DELAY} s"),
            Scenario::Rewrite => format!("{window} (k={k})"),
        }
    }
}

/// Will Delay Interval of the `will-delay` scenario, seconds.
const WILL_DELAY: u32 = 2;
/// `server-keepalive` waits for a close only when 1.5 × the value in force is at most this.
const WAIT_LIMIT_S: f64 = 30.0;

/// The Keep Alive the `rewrite` scenario's client asks for (the proxy rewrites it to k).
fn rewrite_from(k: u16) -> u16 {
    k.saturating_mul(4).max(60)
}

/// One case of one run: its judgement and what it measured (the JSON result's fields).
#[derive(Debug, Clone)]
pub struct CaseRun {
    /// Empty for a scenario's only case.
    pub case: &'static str,
    pub judged: Judged,
    pub measured: Measured<f64>,
}

impl CaseRun {
    pub(crate) fn new(case: &'static str, judged: Judged) -> CaseRun {
        CaseRun { case, judged, measured: Measured::default() }
    }

    fn with_close(mut self, c: &CloseSeen, keep_alive: u16) -> CaseRun {
        self.measured.close_after_s = Some(c.silence_s);
        self.measured.ratio = (keep_alive > 0).then(|| c.silence_s / f64::from(keep_alive));
        self.measured.close_how = Some(c.how);
        self.measured.disconnect_reason = c.disconnect_reason;
        self
    }
}

/// The first close of every connection through the probe's proxy, by the client's address
/// (each raw client knows its own).
#[derive(Default)]
pub struct Closes {
    closed: Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    changed: Notify,
}

impl Closes {
    /// Follows the proxy's record events until the registry goes away.
    pub async fn follow(self: Arc<Self>, registry: Arc<Registry>) {
        let mut events = registry.subscribe();
        drop(registry);
        loop {
            match events.recv().await {
                Ok(Event::Closed(conn)) => {
                    self.closed.lock().expect("closes lock").insert(conn.client_addr, conn);
                    self.changed.notify_waiters();
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The record of the connection from `client`, once it closed (waiting until `until`).
    pub async fn wait(&self, client: SocketAddr, until: Instant) -> Option<Arc<Connection>> {
        loop {
            let notified = self.changed.notified();
            if let Some(c) = self.closed.lock().expect("closes lock").get(&client) {
                return Some(c.clone());
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.closed.lock().expect("closes lock").get(&client).cloned();
            }
        }
    }
}

/// Everything a run needs.
pub struct Ctx {
    pub k: u16,
    pub tol: Tolerance,
    /// How long past the time the specification allows the probe waits for a close or a Will.
    pub timeout: Duration,
    /// The proxy's listener per protocol.
    pub proxy: HashMap<Protocol, String>,
    pub closes: Arc<Closes>,
    pub sightings: Arc<Sightings>,
    /// Client ids start with it (unique per probe run).
    pub prefix: String,
    /// Will topics live under it.
    pub topic_root: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// Every Reason String a CONNACK or DISCONNECT to a scenario's client carried (for the
    /// report's header).
    pub reason_strings: Mutex<std::collections::BTreeSet<String>>,
}

/// A scenario client's id: the run's prefix, the scenario's code, the protocol level, the run
/// (from 1) and the case's letter.
pub(crate) fn client_id(prefix: &str, s: Scenario, protocol: Protocol, run: u32, case: &str) -> String {
    format!("{prefix}{}{}r{run}{case}", s.code(), protocol.level())
}

/// Up to this long for the proxy's record of a close the client saw.
const RECORD_WAIT: Duration = Duration::from_secs(2);

impl Ctx {
    fn client_id(&self, s: Scenario, protocol: Protocol, run: u32, case: &str) -> String {
        client_id(&self.prefix, s, protocol, run, case)
    }

    fn connect(&self, protocol: Protocol, client_id: &str, keep_alive: u16) -> ConnectSpec {
        let mut c = ConnectSpec::new(protocol, client_id, keep_alive);
        c.username.clone_from(&self.username);
        c.password.clone_from(&self.password);
        c
    }

    fn will(&self, topic: &str, delay: Option<u32>) -> WillSpec {
        WillSpec {
            topic: topic.to_string(),
            payload: b"gone".to_vec(),
            qos: 0,
            retain: false,
            delay_interval: delay,
        }
    }

    fn half(&self, k: u16) -> Duration {
        Duration::from_secs_f64(f64::from(k) / 2.0)
    }

    fn wait_for_close(&self, from: Instant, keep_alive: u16) -> Instant {
        from + Duration::from_secs_f64(1.5 * f64::from(keep_alive)) + self.timeout
    }

    /// Opens a raw client through the proxy and sends `connect`.
    async fn open(&self, connect: &ConnectSpec) -> Result<(RawClient, Handshake), CaseRun> {
        let addr = &self.proxy[&connect.protocol];
        let fail = |e: std::io::Error| {
            CaseRun::new(
                "",
                Judged::new(Verdict::NotApplicable, format!("not measured: the probe's client failed: {e}")),
            )
        };
        let mut c =
            RawClient::open(Dial::tcp(addr), connect.protocol, Duration::from_secs(5)).await.map_err(fail)?;
        let h = c.handshake(connect, Instant::now() + self.timeout).await.map_err(fail)?;
        if let Handshake::Accepted(connack) | Handshake::Refused(connack) = &h {
            if let Some(r) = &connack.reason_string {
                self.reason_strings.lock().expect("reason strings lock").insert(r.clone());
            }
        }
        self.note_disconnect(&c);
        Ok((c, h))
    }

    /// Notes the Reason String of the DISCONNECT the broker sent `c`, if it sent one with one.
    fn note_disconnect(&self, c: &RawClient) {
        if let Some(r) = c.disconnect_reason_string() {
            self.reason_strings.lock().expect("reason strings lock").insert(r.to_string());
        }
    }

    /// The proxy's record of `client`'s close as a [`CloseSeen`], and when it closed.
    async fn close_of(&self, client: SocketAddr) -> Option<(CloseSeen, Instant)> {
        let conn = self.closes.wait(client, Instant::now() + RECORD_WAIT).await?;
        let info = conn.close_info()?;
        let at = conn.started + Duration::from_secs_f64(info.at_s);
        let seen = CloseSeen {
            closed_by: info.closed_by,
            how: info.how,
            disconnect_reason: info.disconnect_reason,
            silence_s: info.silence_s.unwrap_or(info.at_s),
        };
        Some((seen, at))
    }

    /// When a Will on `topic` arrived after `closed_at`, waiting until `until`.
    async fn will_delay(&self, topic: &str, closed_at: Instant, until: Instant) -> Option<f64> {
        let seen = self.sightings.wait(topic, until).await?;
        Some(seen.saturating_duration_since(closed_at).as_secs_f64())
    }
}

/// A CONNECT that was not accepted, as a case result.
fn not_accepted(case: &'static str, h: &Handshake) -> CaseRun {
    CaseRun::new(case, Judged::new(Verdict::NotApplicable, format!("not measured: {}", refusal(h))))
}

/// A handshake that did not succeed, in words.
pub fn refusal(h: &Handshake) -> String {
    match h {
        Handshake::Accepted(_) => "accepted".into(),
        Handshake::Refused(c) => format!("CONNECT refused with CONNACK code {:#04x}", c.code),
        Handshake::Closed(Ended::Reset) => "the broker reset the connection (RST) before CONNACK".into(),
        Handshake::Closed(Ended::Fin { disconnect: None }) => {
            "the broker closed with FIN before CONNACK".into()
        }
        Handshake::Closed(Ended::Fin { disconnect: Some(None) }) => {
            "the broker sent DISCONNECT and closed before CONNACK".into()
        }
        Handshake::Closed(Ended::Fin { disconnect: Some(Some(r)) }) => {
            format!("the broker sent DISCONNECT {r:#04x} and closed before CONNACK")
        }
        Handshake::Silent => "no CONNACK".into(),
    }
}

/// One run of `scenario` over `protocol`: its cases.
pub async fn run(ctx: &Ctx, scenario: Scenario, protocol: Protocol, run: u32) -> Vec<CaseRun> {
    match scenario {
        Scenario::Keepalive | Scenario::HalfOpen => {
            vec![silent_with_will(ctx, scenario, protocol, run).await]
        }
        Scenario::PingResets => vec![ping_resets(ctx, protocol, run).await],
        Scenario::KeepaliveZero => vec![keepalive_zero(ctx, protocol, run).await],
        Scenario::Takeover => {
            let (clean, persistent) =
                tokio::join!(takeover(ctx, protocol, run, true), takeover(ctx, protocol, run, false));
            vec![clean, persistent]
        }
        Scenario::ServerKeepalive => {
            let (zero, max, k) = tokio::join!(
                server_keepalive(ctx, run, "keepalive-0", 0),
                server_keepalive(ctx, run, "keepalive-65535", u16::MAX),
                server_keepalive(ctx, run, "keepalive-k", ctx.k),
            );
            vec![zero, max, k]
        }
        Scenario::WillDelay => {
            let (now, later) = tokio::join!(will_delay(ctx, run, 0), will_delay(ctx, run, 30));
            vec![now, later]
        }
        Scenario::Rewrite => vec![rewrite(ctx, protocol, run).await],
    }
}

/// `keepalive` and `half-open`: a Will, PINGREQs every k/2 that the proxy's rule drops or black
/// holes, and a wait for the broker to notice.
async fn silent_with_will(ctx: &Ctx, scenario: Scenario, protocol: Protocol, run: u32) -> CaseRun {
    let id = ctx.client_id(scenario, protocol, run, "");
    let topic = format!("{}/{id}", ctx.topic_root);
    let mut connect = ctx.connect(protocol, &id, ctx.k);
    connect.will = Some(ctx.will(&topic, None));
    let start = Instant::now();
    let (mut c, h) = match ctx.open(&connect).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let Handshake::Accepted(connack) = &h else { return not_accepted("", &h) };
    let k = connack.server_keep_alive.unwrap_or(ctx.k);
    let pinging = c.ping_until(Some(ctx.half(ctx.k)), ctx.wait_for_close(start, k)).await;
    let out = judge_silent_close(ctx, &c, &pinging, k).await;
    let Some(closed_at) = out.1 else {
        c.disconnect().await;
        return out.0;
    };
    let mut case = out.0;
    let delay = ctx.will_delay(&topic, closed_at, closed_at + ctx.timeout).await;
    case.measured.will_published = Some(delay.is_some());
    case.measured.will_delay_s = delay;
    case.judged = case.judged.and(judge::will(0.0, delay, &ctx.tol));
    case
}

/// Judges the close a pinging (or silent) client waited for, from the proxy's record.
async fn judge_silent_close(
    ctx: &Ctx,
    c: &RawClient,
    pinging: &Pinging,
    k: u16,
) -> (CaseRun, Option<Instant>) {
    if pinging.ended.is_none() {
        let waited_s = 1.5 * f64::from(k) + ctx.timeout.as_secs_f64();
        return (CaseRun::new("", judge::keepalive_close(k, None, waited_s, &ctx.tol)), None);
    }
    ctx.note_disconnect(c);
    match ctx.close_of(c.local).await {
        Some((seen, at)) => (
            CaseRun::new("", judge::keepalive_close(k, Some(&seen), 0.0, &ctx.tol)).with_close(&seen, k),
            Some(at),
        ),
        None => (
            CaseRun::new(
                "",
                Judged::new(Verdict::NotApplicable, "not measured: the proxy has no record of the close"),
            ),
            None,
        ),
    }
}

/// `ping-resets`: PINGREQ every k/2 for 3k, then silence.
async fn ping_resets(ctx: &Ctx, protocol: Protocol, run: u32) -> CaseRun {
    let id = ctx.client_id(Scenario::PingResets, protocol, run, "");
    let start = Instant::now();
    let (mut c, h) = match ctx.open(&ctx.connect(protocol, &id, ctx.k)).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let Handshake::Accepted(connack) = &h else { return not_accepted("", &h) };
    let k = connack.server_keep_alive.unwrap_or(ctx.k);
    let mut pinging = c.ping_until(Some(ctx.half(k)), start + 3 * Duration::from_secs(k.into())).await;
    if let Some((at, _)) = pinging.ended {
        ctx.note_disconnect(&c);
        let after = at.saturating_duration_since(start).as_secs_f64();
        return CaseRun::new(
            "",
            Judged::new(
                Verdict::Fails,
                format!("closed {after:.2} s into the pinging phase, after {} PINGREQs", pinging.sent),
            ),
        );
    }
    let last = pinging.last_sent.unwrap_or(start);
    c.ping_more(None, ctx.wait_for_close(last, k), &mut pinging).await;
    let (mut case, _) = judge_silent_close(ctx, &c, &pinging, k).await;
    if pinging.answered < pinging.sent {
        case.judged = case.judged.and(Judged::new(
            Verdict::Fails,
            format!("answered {} of {} PINGREQs with PINGRESP", pinging.answered, pinging.sent),
        ));
    }
    if pinging.ended.is_none() {
        c.disconnect().await;
    }
    case
}

/// `keepalive-zero`: Keep Alive 0 and 3k of silence.
async fn keepalive_zero(ctx: &Ctx, protocol: Protocol, run: u32) -> CaseRun {
    let id = ctx.client_id(Scenario::KeepaliveZero, protocol, run, "");
    let start = Instant::now();
    let (mut c, h) = match ctx.open(&ctx.connect(protocol, &id, 0)).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let connack = match &h {
        Handshake::Accepted(connack) => connack.clone(),
        Handshake::Silent => return not_accepted("", &h),
        refused => {
            let judged = Judged::new(Verdict::Deviates, format!("rejected at CONNECT: {}", refusal(refused)));
            return CaseRun::new("", judged);
        }
    };
    let quiet = 3 * Duration::from_secs(ctx.k.into());
    let announced = connack.server_keep_alive.filter(|&s| s > 0);
    let pinging = c.ping_until(None, start + quiet).await;
    ctx.note_disconnect(&c);
    let mut case = match (pinging.ended, ctx.close_of(c.local).await.filter(|_| pinging.ended.is_some())) {
        (None, _) => CaseRun::new(
            "",
            Judged::new(Verdict::Conforms, format!("stayed open through {} s of silence", quiet.as_secs())),
        ),
        (Some(_), Some((seen, _))) => {
            let judged = match announced {
                Some(s) => judge::keepalive_close(s, Some(&seen), 0.0, &ctx.tol),
                None => Judged::new(
                    Verdict::Deviates,
                    format!(
                        "closed after {:.2} s of silence with {} although Keep Alive 0 turns the mechanism off",
                        seen.silence_s,
                        seen.how_words()
                    ),
                ),
            };
            CaseRun::new("", judged).with_close(&seen, 0)
        }
        (Some(_), None) => CaseRun::new(
            "",
            Judged::new(Verdict::NotApplicable, "not measured: the proxy has no record of the close"),
        ),
    };
    case.measured.server_keepalive = connack.server_keep_alive;
    if let Some(s) = connack.server_keep_alive {
        case.judged.detail.push_str(&format!(" (CONNACK announced Server Keep Alive {s})"));
    }
    if pinging.ended.is_none() {
        c.disconnect().await;
    }
    case
}

/// `takeover`: the same client id twice, clean or persistent.
async fn takeover(ctx: &Ctx, protocol: Protocol, run: u32, clean: bool) -> CaseRun {
    let case_name = if clean { "clean" } else { "persistent" };
    let id = ctx.client_id(Scenario::Takeover, protocol, run, if clean { "c" } else { "p" });
    let v5 = protocol == Protocol::V5;
    let spec = |who: &str| {
        let mut c = ctx.connect(protocol, &id, ctx.k.max(30));
        c.clean_start = clean;
        c.session_expiry = v5.then_some(if clean { 0 } else { 60 });
        c.will = Some(ctx.will(&format!("{}/{id}/{who}", ctx.topic_root), None));
        c
    };
    let named = |mut c: CaseRun| {
        c.case = case_name;
        c
    };
    let (mut old, h) = match ctx.open(&spec("old")).await {
        Ok(x) => x,
        Err(e) => return named(e),
    };
    if !matches!(h, Handshake::Accepted(_)) {
        return not_accepted(case_name, &h);
    }
    let second = Instant::now();
    let (new, h) = match ctx.open(&spec("new")).await {
        Ok(x) => x,
        Err(e) => return named(e),
    };
    if !matches!(h, Handshake::Accepted(_)) {
        old.disconnect().await;
        return not_accepted(case_name, &h);
    }
    let ended = old.ping_until(None, second + ctx.timeout).await.ended;
    ctx.note_disconnect(&old);
    let mut case = if ended.is_none() {
        let mut c = CaseRun::new(
            case_name,
            Judged::new(
                Verdict::Fails,
                format!("old connection still open {} s after the new CONNECT", ctx.timeout.as_secs()),
            ),
        );
        c.measured.old_closed = Some(false);
        old.disconnect().await;
        c
    } else {
        match ctx.close_of(old.local).await {
            None => CaseRun::new(
                case_name,
                Judged::new(Verdict::NotApplicable, "not measured: the proxy has no record of the close"),
            ),
            Some((seen, at)) => {
                let after = at.saturating_duration_since(second).as_secs_f64();
                let mut words = format!(
                    "old connection closed {:.0} ms after the new CONNECT with {}",
                    after * 1000.0,
                    seen.how_words()
                );
                let old_will = ctx
                    .will_delay(&format!("{}/{id}/old", ctx.topic_root), at, at + Duration::from_secs(1))
                    .await;
                words.push_str(if old_will.is_some() {
                    "; old Will published"
                } else {
                    "; old Will not published"
                });
                let judged = if v5 && seen.disconnect_reason != Some(0x8e) {
                    Judged::new(Verdict::Deviates, format!("{words}; no DISCONNECT 0x8E"))
                } else {
                    Judged::new(Verdict::Conforms, words)
                };
                let mut c = CaseRun::new(case_name, judged);
                c.measured.close_after_s = Some(after);
                c.measured.close_how = Some(seen.how);
                c.measured.disconnect_reason = seen.disconnect_reason;
                c.measured.old_closed = Some(true);
                c.measured.will_published = Some(old_will.is_some());
                c.measured.will_delay_s = old_will;
                c
            }
        }
    };
    let new_will = ctx.sightings.wait(&format!("{}/{id}/new", ctx.topic_root), Instant::now()).await;
    if new_will.is_some() {
        case.judged = case.judged.and(Judged::new(
            Verdict::Fails,
            "the new connection's Will was published while it is connected",
        ));
    }
    new.disconnect().await;
    if !clean {
        // End the persistent session so that it does not outlive the probe on the broker.
        let mut c = ctx.connect(protocol, &id, ctx.k.max(30));
        c.session_expiry = v5.then_some(0);
        if let Ok((client, Handshake::Accepted(_))) = ctx.open(&c).await {
            client.disconnect().await;
        }
    }
    case
}

/// `server-keepalive`, one case: CONNECT with `keep_alive`, read the Server Keep Alive, and wait
/// for a close when the value in force is short enough.
async fn server_keepalive(ctx: &Ctx, run: u32, case: &'static str, keep_alive: u16) -> CaseRun {
    let tag = match keep_alive {
        0 => "z",
        u16::MAX => "m",
        _ => "k",
    };
    let id = ctx.client_id(Scenario::ServerKeepalive, Protocol::V5, run, tag);
    let start = Instant::now();
    let (mut c, h) = match ctx.open(&ctx.connect(Protocol::V5, &id, keep_alive)).await {
        Ok(x) => x,
        Err(mut e) => {
            e.case = case;
            return e;
        }
    };
    let Handshake::Accepted(connack) = &h else { return not_accepted(case, &h) };
    let announced = connack.server_keep_alive;
    let in_force = announced.unwrap_or(keep_alive);
    let said = match announced {
        Some(s) => format!("Keep Alive {keep_alive} → Server Keep Alive {s}"),
        None => format!("Keep Alive {keep_alive}: no Server Keep Alive"),
    };
    let mut out = if in_force == 0 {
        c.disconnect().await;
        CaseRun::new(
            case,
            Judged::new(Verdict::NotApplicable, format!("{said}: Keep Alive off, nothing to enforce")),
        )
    } else if 1.5 * f64::from(in_force) > WAIT_LIMIT_S {
        c.disconnect().await;
        CaseRun::new(
            case,
            Judged::new(
                Verdict::NotApplicable,
                format!("{said}: 1.5 × {in_force} s is too long to wait for"),
            ),
        )
    } else {
        let pinging = c.ping_until(None, ctx.wait_for_close(start, in_force)).await;
        let (mut r, _) = judge_silent_close(ctx, &c, &pinging, in_force).await;
        if pinging.ended.is_none() {
            c.disconnect().await;
        }
        r.case = case;
        r.judged.detail = format!("{said}; {}", r.judged.detail);
        r
    };
    out.measured.server_keepalive = announced;
    out
}

/// `will-delay`, one case: Will Delay Interval 2 s, `expiry` Session Expiry, a close without
/// DISCONNECT.
async fn will_delay(ctx: &Ctx, run: u32, expiry: u32) -> CaseRun {
    let case = if expiry == 0 { "session-expiry-0" } else { "session-expiry-30" };
    let id = ctx.client_id(Scenario::WillDelay, Protocol::V5, run, if expiry == 0 { "0" } else { "s" });
    let topic = format!("{}/{id}", ctx.topic_root);
    let mut connect = ctx.connect(Protocol::V5, &id, ctx.k.max(30));
    connect.session_expiry = Some(expiry);
    connect.will = Some(ctx.will(&topic, Some(WILL_DELAY)));
    let (c, h) = match ctx.open(&connect).await {
        Ok(x) => x,
        Err(mut e) => {
            e.case = case;
            return e;
        }
    };
    if !matches!(h, Handshake::Accepted(_)) {
        return not_accepted(case, &h);
    }
    let local = c.local;
    c.drop_connection().await;
    let Some((_, closed_at)) = ctx.close_of(local).await else {
        return CaseRun::new(
            case,
            Judged::new(Verdict::NotApplicable, "not measured: the proxy has no record of the close"),
        );
    };
    let expected = f64::from(WILL_DELAY.min(expiry));
    let until = closed_at + Duration::from_secs(expected as u64) + ctx.timeout;
    let delay = ctx.will_delay(&topic, closed_at, until).await;
    let mut out = CaseRun::new(case, judge::will(expected, delay, &ctx.tol));
    out.judged.detail = format!("Session Expiry {expiry}: {}", out.judged.detail);
    out.measured.will_published = Some(delay.is_some());
    out.measured.will_delay_s = delay;
    out
}

/// `rewrite`: the client asks for a long Keep Alive, the proxy forwards k, the client is silent.
async fn rewrite(ctx: &Ctx, protocol: Protocol, run: u32) -> CaseRun {
    let id = ctx.client_id(Scenario::Rewrite, protocol, run, "");
    let start = Instant::now();
    let (mut c, h) = match ctx.open(&ctx.connect(protocol, &id, rewrite_from(ctx.k))).await {
        Ok(x) => x,
        Err(e) => return e,
    };
    let Handshake::Accepted(connack) = &h else { return not_accepted("", &h) };
    let k = connack.server_keep_alive.unwrap_or(ctx.k);
    let pinging = c.ping_until(None, ctx.wait_for_close(start, k)).await;
    let (mut case, _) = judge_silent_close(ctx, &c, &pinging, k).await;
    let local = c.local;
    if pinging.ended.is_none() {
        c.disconnect().await;
    }
    let forwarded = ctx.closes.wait(local, Instant::now()).await.and_then(|conn| conn.keep_alive().forwarded);
    if pinging.ended.is_some() && forwarded != Some(ctx.k) {
        case.judged = Judged::new(
            Verdict::NotApplicable,
            format!("not measured: the proxy forwarded Keep Alive {forwarded:?}, not {}", ctx.k),
        );
    }
    case
}
