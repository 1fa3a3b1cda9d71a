//! Connection records: what the proxy knows about each connection, live and at its close.
//!
//! A [`Connection`] is shared between its session (which writes it) and readers such as the
//! admin API and the metrics (which take [`Snapshot`]s). Per-packet counters and timestamps are
//! atomics so the pumps never take a lock on the forwarding path; everything else changes a
//! handful of times per connection and sits behind a mutex.
//!
//! The [`Registry`] holds the live records and broadcasts [`Event`]s (CONNECT, CONNACK and
//! PUBLISH seen, connection closed) to whoever subscribes: Will and takeover detection build on
//! them.
//!
//! History is bounded in bytes, not only in count: when both sides are gone, the record joins
//! the ring of closed ones as JSON with every text cut to [`HISTORY_TEXT_MAX`] bytes of JSON
//! (and lists to [`HISTORY_LIST_MAX`] names), a sibling `<field>_len` giving the true length
//! ([`history_json`]); the record itself cuts the texts its peers chose the same way
//! ([`Connection::keep_for_history`]), so events still in the backlog hold no more. A live
//! record keeps everything whole.

use crate::codec::{Connack, Connect, PacketType, Protocol, Will, reason_name};
use crate::route::Route;
use crate::vocab::{Batch, Cause, CloseHow, CloseInfo, Direction, Side};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long after a takeover CONNECT a broker close of the old connection counts as the
/// takeover; later, the broker is said not to enforce takeovers.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(5);

/// What the first close looked like, for [`classify`].
#[derive(Debug, Clone, Copy)]
pub struct CloseFacts {
    pub closed_by: Side,
    pub how: CloseHow,
    pub disconnect_reason: Option<u8>,
    /// The CONNACK's return or reason code, if one was forwarded.
    pub connack: Option<u8>,
    /// The client id connected again less than [`TAKEOVER_WINDOW`] before this close.
    pub taken_over: bool,
    /// Silence before the close as a multiple of the Keep Alive the closing side enforces.
    pub silence_ratio: Option<f64>,
    /// The client sent a PINGREQ after the last PINGRESP it received.
    pub ping_outstanding: bool,
}

/// The cause of a close (see [`Cause`]).
pub fn classify(f: &CloseFacts) -> Cause {
    let disconnect =
        |codes: &[u8]| f.how == CloseHow::Disconnect && codes.contains(&f.disconnect_reason.unwrap_or(0));
    let silent = f.silence_ratio.is_some_and(|r| r >= 1.0);
    match f.closed_by {
        Side::Proxy => Cause::Proxy,
        _ if f.connack.is_some_and(|code| code != 0) => Cause::ConnectRefused,
        _ if f.connack.is_none() => Cause::NoConnack,
        Side::Broker if f.taken_over || disconnect(&[0x8e]) => Cause::Takeover,
        _ if disconnect(&[0x00, 0x04]) => Cause::Normal,
        Side::Broker if disconnect(&[0x8d]) || (f.how != CloseHow::Disconnect && silent) => {
            Cause::KeepaliveTimeout
        }
        Side::Client if f.how != CloseHow::Disconnect && (f.ping_outstanding || silent) => {
            Cause::ClientGaveUp
        }
        _ => Cause::Abrupt,
    }
}

/// Why the proxy itself ended a connection, after or instead of a side's close: the first close
/// ([`CloseInfo`]) says who noticed first; this says why the proxy then closed what was left.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyEnd {
    /// `half_close_timeout`, `internal_error`, `shutdown` or `admin`.
    pub cause: &'static str,
    pub detail: String,
}

/// Keep Alive as each party sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeepAlive {
    /// What the client asked for in CONNECT.
    pub requested: Option<u16>,
    /// What the proxy forwarded to the broker (differs when a rule rewrote it).
    pub forwarded: Option<u16>,
    /// MQTT 5 Server Keep Alive the broker announced in CONNACK.
    pub server_announced: Option<u16>,
    /// Server Keep Alive as forwarded to the client (differs when a rule rewrote it).
    pub server_to_client: Option<u16>,
}

impl KeepAlive {
    /// The broker enforces the value it received, or the Server Keep Alive it announced.
    pub fn broker_enforced(&self) -> Option<u16> {
        self.server_announced.or(self.forwarded)
    }

    /// The client enforces the value it sent, or the Server Keep Alive it was told.
    pub fn client_enforced(&self) -> Option<u16> {
        self.server_to_client.or(self.requested)
    }

    pub fn enforced_by(&self, side: Side) -> Option<u16> {
        match side {
            Side::Client => self.client_enforced(),
            Side::Broker => self.broker_enforced(),
            Side::Proxy => None,
        }
    }
}

/// Lock-free per-direction counters, written by that direction's pump once per batch.
#[derive(Default)]
struct DirStats {
    packets: [AtomicU64; 15],
    bytes: AtomicU64,
    /// Microseconds after the connection's start, plus one; 0 = never.
    last_packet: AtomicU64,
    /// Last PINGREQ (client_to_broker) or PINGRESP (broker_to_client), same encoding.
    last_ping: AtomicU64,
}

/// Wakes the tasks of one connection. Cheap (a counter and a `Notify`: idle connections keep
/// one each), and never lost: a waiter notes [`Wake::seen`] *before* it looks at the state a wake
/// may change, and [`Wake::after`] returns at once if a wake came since.
#[derive(Default)]
pub(crate) struct Wake {
    sent: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Wake {
    pub(crate) fn send(&self) {
        self.sent.fetch_add(1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// How many wakes were sent so far.
    pub(crate) fn seen(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Returns once a wake was sent after `seen` was taken.
    pub(crate) async fn after(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable(); // registered before the check: no wake slips between
            if self.sent.load(Ordering::Acquire) != seen {
                return;
            }
            notified.await;
        }
    }
}

/// Whether a client silent for `gap` broke its Keep Alive: by more than 10 % and 100 ms (timers
/// that fire a few milliseconds late are compliant; the broker itself waits 1.5 ×).
pub fn keepalive_violated(gap: Duration, keep_alive: u16) -> bool {
    keep_alive > 0
        && gap.as_secs_f64() > f64::from(keep_alive) * KEEPALIVE_TOLERANCE_FACTOR + KEEPALIVE_TOLERANCE_S
}

/// The Keep Alive violation threshold: gap > Keep Alive × this + [`KEEPALIVE_TOLERANCE_S`].
pub const KEEPALIVE_TOLERANCE_FACTOR: f64 = 1.1;
pub const KEEPALIVE_TOLERANCE_S: f64 = 0.1;

/// A connection whose last side closes this long after its first close gets a second log line.
pub const LINGER_LOGGED: Duration = Duration::from_secs(1);

/// A number for a log line: at most 3 decimals (milliseconds for seconds).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `rule=count,…` for the close line (`-` for none).
fn faults_by_rule(faults: &BTreeMap<String, u64>) -> String {
    if faults.is_empty() {
        return "-".into();
    }
    faults.iter().map(|(rule, n)| format!("{rule}={n}")).collect::<Vec<_>>().join(",")
}

/// How one side of a connection is carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SideTransport {
    pub transport: crate::transport::Transport,
    /// For `tls`: version, cipher suite, SNI, ALPN, whether the peer showed a certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsInfo>,
    /// The broker's certificate was not verified (`--upstream-insecure`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
    /// For `ws`/`wss`: the path and the subprotocol agreed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketInfo>,
}

impl SideTransport {
    /// Plain TCP.
    pub fn tcp() -> SideTransport {
        SideTransport {
            transport: crate::transport::Transport::Tcp,
            tls: None,
            unverified: false,
            websocket: None,
        }
    }
}

/// The WebSocket under one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebSocketInfo {
    pub path: String,
    pub subprotocol: Option<String>,
    /// WebSocket pings received from this side (answered by the proxy) and pongs received; not
    /// MQTT PINGREQ/PINGRESP. Known once the side's stream ended.
    pub pings: u64,
    pub pongs: u64,
    /// The code of the Close frame this side sent, if it sent one.
    pub close_code: Option<u16>,
}

/// Fields that change a few times per connection.
#[derive(Default)]
struct State {
    /// How each side is connected (`None` until known: the client's after its TLS handshake).
    client_transport: Option<SideTransport>,
    broker_transport: Option<SideTransport>,
    broker_addr: Option<SocketAddr>,
    /// When the upstream TCP connection was established.
    broker_connected: Option<Instant>,
    client_id: Option<String>,
    /// Whether the CONNECT carried a username (the username itself is not kept).
    username_present: bool,
    clean_start: Option<bool>,
    session_expiry: Option<u32>,
    will: Option<Will>,
    /// The Will topic whole, for as long as it is watched (after the end, `will` holds it cut).
    whole_will_topic: Weak<TopicWatch>,
    /// True lengths of the texts cut when the connection ended (for `/events`).
    cut: CutLengths,
    keep_alive: KeepAlive,
    connack: Option<ConnackSeen>,
    malformed: [Option<String>; 2],
    /// Faults applied to this connection, by rule name.
    faults: BTreeMap<String, u64>,
    close: Option<CloseInfo>,
    proxy_end: Option<ProxyEnd>,
    /// Keeps the Will topic watched while the record lives.
    will_watch: Option<Arc<TopicWatch>>,
    /// When a newer connection on the route presented this client id (a takeover).
    taken_over: Option<Instant>,
    /// Topic filters the client subscribed to through the proxy (for Will observability),
    /// at most [`MAX_FILTERS`].
    filters: Vec<String>,
    /// When both sides were gone.
    ended: Option<Instant>,
}

impl State {
    /// How `side` is connected (the client's for any side but the broker).
    fn transport_of(&mut self, side: Side) -> &mut Option<SideTransport> {
        match side {
            Side::Broker => &mut self.broker_transport,
            _ => &mut self.client_transport,
        }
    }
}

/// True byte lengths of the texts [`Connection::keep_for_history`] cut, by their name in
/// [`event_json`].
#[derive(Debug, Default, Clone, Copy)]
struct CutLengths {
    client_id: Option<usize>,
    will: Option<usize>,
    reason: Option<usize>,
}

/// Topic filters remembered per connection; a client that subscribes to more is taken to
/// watch every topic (its Wills can never be called unobservable wrongly).
pub const MAX_FILTERS: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct ConnackSeen {
    pub session_present: bool,
    /// Return code (3.1/3.1.1) or reason code (5.0).
    pub code: u8,
    pub assigned_client_id: Option<String>,
}

/// The live record of one proxied connection.
pub struct Connection {
    pub id: u64,
    pub route: Arc<Route>,
    pub client_addr: SocketAddr,
    pub started: Instant,
    started_wall: SystemTime,
    /// Cancelling it ends the connection (both pumps stop; the session closes the sockets).
    pub(crate) cancel: CancellationToken,
    /// Rules for this connection only (admin API); its fault engine follows them.
    pub(crate) local_rules: tokio::sync::watch::Sender<Vec<Arc<crate::fault::Rule>>>,
    /// Wakes the connection's pumps and session when its rules or its identity changed.
    pub(crate) wake: Wake,
    dirs: [DirStats; 2],
    /// Protocol level from the CONNECT (0 until seen), read by the broker_to_client pump to
    /// decode what the broker sends.
    protocol: AtomicU8,
    /// When the PINGREQ awaiting its PINGRESP was forwarded (same encoding as `last_packet`).
    ping_pending: AtomicU64,
    /// The first close is recorded and not announced yet ([`Connection::record_close`]).
    unannounced: AtomicBool,
    /// When the client last sent anything, including packets a rule then dropped.
    last_from_client: AtomicU64,
    /// When the client last sent a PINGREQ, including one a rule dropped.
    pingreq_from_client: AtomicU64,
    /// The longest silence between two of the client's packets, microseconds.
    max_client_gap: AtomicU64,
    /// The registry the record is filed in (its first close unfiles it and emits the event).
    registry: Weak<Registry>,
    state: Mutex<State>,
}

impl Connection {
    fn new(
        id: u64,
        route: Arc<Route>,
        client_addr: SocketAddr,
        cancel: CancellationToken,
        registry: Weak<Registry>,
    ) -> Self {
        Connection {
            id,
            route,
            client_addr,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            cancel,
            local_rules: tokio::sync::watch::channel(Vec::new()).0,
            wake: Wake::default(),
            dirs: Default::default(),
            protocol: AtomicU8::new(0),
            ping_pending: AtomicU64::new(0),
            unannounced: AtomicBool::new(false),
            last_from_client: AtomicU64::new(0),
            pingreq_from_client: AtomicU64::new(0),
            max_client_gap: AtomicU64::new(0),
            registry,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn micros_since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_micros() as u64 + 1
    }

    fn decode_time(&self, v: u64) -> Option<Instant> {
        (v > 0).then(|| self.started + Duration::from_micros(v - 1))
    }

    /// Protocol chosen by the CONNECT, once seen.
    pub fn protocol(&self) -> Option<Protocol> {
        Protocol::from_level(self.protocol.load(Relaxed))
    }

    pub fn client_id(&self) -> Option<String> {
        self.state().client_id.clone()
    }

    /// The Will of the CONNECT. Its topic is whole while the record lives, and after the end
    /// for as long as the topic is watched (the monitor awaits the Will); otherwise as history
    /// keeps it ([`HISTORY_TEXT_MAX`]).
    pub fn will(&self) -> Option<Will> {
        let (mut will, whole) = {
            let s = self.state();
            (s.will.clone()?, s.cut.will.and_then(|_| s.whole_will_topic.upgrade()))
        };
        if let Some(watch) = whole {
            will.topic = watch.topic().to_string();
        }
        Some(will)
    }

    pub fn keep_alive(&self) -> KeepAlive {
        self.state().keep_alive
    }

    /// The code of the CONNACK forwarded to the client, once one was.
    pub fn connack_code(&self) -> Option<u8> {
        self.state().connack.as_ref().map(|c| c.code)
    }

    pub fn close_info(&self) -> Option<CloseInfo> {
        self.state().close.clone()
    }

    /// When the last packet was delivered in `dir`.
    pub fn last_packet(&self, dir: Direction) -> Option<Instant> {
        self.decode_time(self.dirs[dir.index()].last_packet.load(Relaxed))
    }

    pub fn packets(&self, dir: Direction, t: PacketType) -> u64 {
        self.dirs[dir.index()].packets[t.index()].load(Relaxed)
    }

    pub fn bytes(&self, dir: Direction) -> u64 {
        self.dirs[dir.index()].bytes.load(Relaxed)
    }

    /// Rules that apply to this connection only.
    pub fn local_rules(&self) -> Vec<Arc<crate::fault::Rule>> {
        self.local_rules.borrow().clone()
    }

    /// Adds a rule for this connection only; fails if one with that name exists.
    pub fn add_local_rule(&self, rule: Arc<crate::fault::Rule>) -> Result<(), String> {
        let mut added = Err(format!("this connection already has a rule named {:?}", rule.name()));
        self.local_rules.send_if_modified(|rules| {
            if rules.iter().any(|r| r.name() == rule.name()) {
                return false;
            }
            rules.push(rule.clone());
            added = Ok(());
            true
        });
        self.wake();
        added
    }

    /// Wakes the pumps and the session: something that may change their mode or bring a
    /// connection action due has happened.
    pub(crate) fn wake(&self) {
        self.wake.send();
    }

    /// Removes this connection's rule called `name`; whether there was one.
    pub fn remove_local_rule(&self, name: &str) -> bool {
        let removed = self.local_rules.send_if_modified(|rules| {
            let before = rules.len();
            rules.retain(|r| r.name() != name);
            rules.len() != before
        });
        self.wake();
        removed
    }

    /// Removes every rule of this connection's own; how many there were.
    pub fn clear_local_rules(&self) -> usize {
        let mut cleared = 0;
        self.local_rules.send_if_modified(|rules| {
            cleared = rules.len();
            rules.clear();
            cleared > 0
        });
        self.wake();
        cleared
    }

    /// Ends the connection from outside (admin API): the proxy closes both sides with `how`.
    pub fn kill(self: &Arc<Self>, how: CloseHow, reason: &str) {
        self.end_by_proxy("admin", reason.to_string(), how);
        self.cancel.cancel();
    }

    /// Records that the proxy ends the connection itself, and why (the first close stays as it
    /// was if a side closed before; otherwise this is the first close too). The first call wins.
    pub(crate) fn end_by_proxy(self: &Arc<Self>, cause: &'static str, detail: String, how: CloseHow) {
        {
            let mut s = self.state();
            if s.proxy_end.is_none() {
                s.proxy_end = Some(ProxyEnd { cause, detail: detail.clone() });
            }
        }
        self.note_close(Side::Proxy, how, None, Some(detail), Instant::now());
    }

    /// Why the proxy ended the connection itself, if it did.
    pub fn proxy_end(&self) -> Option<ProxyEnd> {
        self.state().proxy_end.clone()
    }

    /// The subject CN of the certificate the client showed on a mutual-TLS listener.
    pub fn cert_cn(&self) -> Option<String> {
        self.state().client_transport.as_ref().and_then(|t| t.tls.as_ref()).and_then(|i| i.peer_cn.clone())
    }

    /// The side's stream (set with [`Connection::set_transport`]) carries MQTT over WebSocket
    /// at `path`, with the subprotocol agreed.
    pub(crate) fn set_websocket(&self, side: Side, path: &str, subprotocol: Option<String>) {
        let ws = WebSocketInfo { path: path.to_string(), subprotocol, pings: 0, pongs: 0, close_code: None };
        use crate::transport::Transport;
        let mut s = self.state();
        if let Some(t) = s.transport_of(side) {
            t.transport = if t.transport.tls() { Transport::Wss } else { Transport::Ws };
            t.websocket = Some(ws);
        }
    }

    /// What a side's WebSocket counted by the time its stream ended.
    pub(crate) fn set_websocket_end(&self, side: Side, pings: u64, pongs: u64, close_code: Option<u16>) {
        let mut s = self.state();
        if let Some(ws) = s.transport_of(side).as_mut().and_then(|t| t.websocket.as_mut()) {
            (ws.pings, ws.pongs, ws.close_code) = (pings, pongs, close_code);
        }
    }

    /// How the client (`Side::Client`) or the broker is connected.
    pub(crate) fn set_transport(&self, side: Side, t: SideTransport) {
        *self.state().transport_of(side) = Some(t);
    }

    pub(crate) fn set_broker(&self, addr: SocketAddr, at: Instant) {
        let mut s = self.state();
        s.broker_addr = Some(addr);
        s.broker_connected = Some(at);
    }

    /// Marks the connection taken over at `at`, unless a side closed it already (then it was
    /// gone before the new CONNECT: no takeover). Whether it was marked.
    fn mark_taken_over(&self, at: Instant) -> bool {
        let mut s = self.state();
        if s.close.is_some() {
            return false;
        }
        s.taken_over.get_or_insert(at);
        true
    }

    /// Adds topic filters the client subscribed to; returns those new to this connection (past
    /// [`MAX_FILTERS`], one `#` stands for all the rest).
    fn add_filters(&self, filters: Vec<String>) -> Vec<String> {
        let mut s = self.state();
        if s.close.is_some() {
            return Vec::new();
        }
        let mut added = Vec::new();
        for f in filters {
            if s.filters.len() >= MAX_FILTERS {
                let all = "#".to_string();
                if !s.filters.contains(&all) {
                    s.filters.push(all.clone());
                    added.push(all);
                }
                break; // `#` stands for the rest of this SUBSCRIBE and every later one
            }
            if !s.filters.contains(&f) {
                s.filters.push(f.clone());
                added.push(f);
            }
        }
        added
    }

    /// Removes topic filters the client unsubscribed from; returns those it had.
    fn remove_filters(&self, filters: &[String]) -> Vec<String> {
        let mut s = self.state();
        let (gone, kept) = std::mem::take(&mut s.filters).into_iter().partition(|f| filters.contains(f));
        s.filters = kept;
        gone
    }

    /// Takes the watch on this connection's Will topic (if it has a Will) from the record: the
    /// monitor keeps it while it awaits the Will, or drops it, at the first close.
    pub fn take_will_watch(&self) -> Option<Arc<TopicWatch>> {
        self.state().will_watch.take()
    }

    /// Records a CONNECT the client sent; `forwarded_keep_alive` is what went to the broker;
    /// `will_watch` keeps its Will topic watched.
    pub(crate) fn on_connect(
        &self,
        c: &Connect,
        forwarded_keep_alive: u16,
        will_watch: Option<Arc<TopicWatch>>,
    ) {
        self.protocol.store(c.protocol.level(), Relaxed);
        let mut s = self.state();
        s.client_id = Some(c.client_id.clone());
        s.username_present = c.username.is_some();
        s.clean_start = Some(c.clean_start);
        s.session_expiry = c.session_expiry;
        s.will = c.will.clone();
        s.whole_will_topic = will_watch.as_ref().map(Arc::downgrade).unwrap_or_default();
        s.keep_alive.requested = Some(c.keep_alive);
        s.keep_alive.forwarded = Some(forwarded_keep_alive);
        s.will_watch = will_watch;
    }

    /// Records a CONNACK the broker sent; `to_client` is the Server Keep Alive the client got.
    pub(crate) fn on_connack(&self, c: &Connack, to_client: Option<u16>) {
        let mut s = self.state();
        s.keep_alive.server_announced = c.server_keep_alive;
        s.keep_alive.server_to_client = to_client;
        if let Some(id) = &c.assigned_client_id {
            s.client_id = Some(id.clone());
        }
        s.connack = Some(ConnackSeen {
            session_present: c.session_present,
            code: c.code,
            assigned_client_id: c.assigned_client_id.clone(),
        });
    }

    /// Counts a fault applied to this connection, here and on its route; the first application
    /// of each rule on a connection is logged at INFO (every one at DEBUG, by the caller).
    pub(crate) fn on_fault(self: &Arc<Self>, applied: &crate::fault::Applied, registry: &Registry) {
        let rule = applied.rule.name();
        let first = {
            let mut s = self.state();
            match s.faults.get_mut(rule) {
                Some(n) => {
                    *n += 1;
                    false
                }
                None => {
                    s.faults.insert(rule.to_string(), 1);
                    true
                }
            }
        };
        let direction = applied.direction.map_or("both", Direction::as_str);
        let action = applied.rule.kind().as_str();
        if first {
            registry.emit(Event::Fault { conn: self.clone(), rule: rule.to_string(), action, direction });
            tracing::info!(conn = self.id, route = %self.route.name, rule = %rule, action = %action, direction = %direction,
                "fault applied to this connection (later applications are counted; RUST_LOG=debug logs each)");
        }
        self.route.metrics.on_fault(rule, action, direction);
    }

    /// Faults applied so far, by rule name.
    pub fn faults(&self) -> BTreeMap<String, u64> {
        self.state().faults.clone()
    }

    pub(crate) fn on_malformed(&self, dir: Direction, reason: String) {
        self.state().malformed[dir.index()] = Some(reason);
    }

    /// Records a batch delivered in `dir`, here and on the route.
    pub(crate) fn commit(&self, dir: Direction, batch: &Batch, at: Instant) {
        let d = &self.dirs[dir.index()];
        for (counter, &n) in d.packets.iter().zip(&batch.packets) {
            if n > 0 {
                counter.fetch_add(u64::from(n), Relaxed);
            }
        }
        d.bytes.fetch_add(batch.bytes, Relaxed);
        self.route.metrics.on_batch(dir, batch);
        if batch.any_packet {
            let t = self.micros_since_start(at);
            d.last_packet.store(t, Relaxed);
            if batch.ping {
                d.last_ping.store(t, Relaxed);
                if dir == Direction::ClientToBroker {
                    self.ping_pending.store(t, Relaxed);
                }
            }
        }
    }

    /// When the client last sent anything, including packets a rule dropped.
    pub fn last_from_client(&self) -> Option<Instant> {
        self.decode_time(self.last_from_client.load(Relaxed))
    }

    /// A PINGRESP arrived from the broker: the round trip since the PINGREQ forwarded last.
    pub(crate) fn on_pingresp(&self, at: Instant) {
        if let Some(sent) = self.decode_time(self.ping_pending.swap(0, Relaxed)) {
            self.route.metrics.on_ping_rtt(at.saturating_duration_since(sent).as_secs_f64());
        }
    }

    /// The client sent packets at `at`, a PINGREQ among them if `pingreq` (whatever the proxy
    /// then did with them): counts a Keep Alive violation if it had been silent for longer than
    /// [`keepalive_violated`] allows, and keeps its longest silence.
    pub(crate) fn on_client_activity(&self, at: Instant, pingreq: bool) {
        let now = self.micros_since_start(at);
        if pingreq {
            self.pingreq_from_client.store(now, Relaxed);
        }
        let Some(previous) = self.decode_time(self.last_from_client.swap(now, Relaxed)) else { return };
        let gap = at.saturating_duration_since(previous);
        self.max_client_gap.fetch_max(gap.as_micros() as u64, Relaxed);
        // No Keep Alive (1 s at least) is broken by a shorter gap: a streaming client's batches
        // never take the record's lock here.
        if !keepalive_violated(gap, 1) {
            return;
        }
        let keep_alive = self.state().keep_alive.client_enforced().unwrap_or(0);
        if keepalive_violated(gap, keep_alive) {
            self.route.metrics.on_client_keepalive_violation();
        }
    }

    /// The client's longest silence as a multiple of the Keep Alive it enforces, counting the
    /// silence before `until` (its first close); `None` without a Keep Alive.
    pub fn client_gap_ratio(&self, until: Instant) -> Option<f64> {
        let keep_alive = self.keep_alive().client_enforced().filter(|&k| k > 0)?;
        let last = self.last_from_client()?;
        let gap = Duration::from_micros(self.max_client_gap.load(Relaxed))
            .max(until.saturating_duration_since(last));
        Some(gap.as_secs_f64() / f64::from(keep_alive))
    }

    /// Records the first close seen on this connection and announces it (log line, event);
    /// later ones are ignored (the first tells who noticed first). Returns whether this one
    /// was the first.
    pub(crate) fn note_close(
        self: &Arc<Self>,
        closed_by: Side,
        how: CloseHow,
        disconnect_reason: Option<u8>,
        reason: Option<String>,
        at: Instant,
    ) -> bool {
        let first = self.record_close(closed_by, how, disconnect_reason, reason, at);
        if first {
            self.announce_close();
        }
        first
    }

    /// [`Connection::note_close`] without the announcement, for a close seen in the middle of
    /// a batch: its caller announces it ([`Connection::announce_close`]) once the batch is
    /// counted, so the close line counts the batch's bytes; should the batch never be written
    /// (the connection is cancelled first), the session's end announces it.
    pub(crate) fn record_close(
        &self,
        closed_by: Side,
        how: CloseHow,
        disconnect_reason: Option<u8>,
        reason: Option<String>,
        at: Instant,
    ) -> bool {
        {
            let mut s = self.state();
            if s.close.is_some() {
                return false;
            }
            let keep_alive_enforced = s.keep_alive.enforced_by(closed_by);
            let silence = match closed_by {
                Side::Proxy => None,
                side => {
                    // Silence as the closing side experienced it: since the last packet it received.
                    let toward = if side == Side::Broker {
                        Direction::ClientToBroker
                    } else {
                        Direction::BrokerToClient
                    };
                    let since = self
                        .last_packet(toward)
                        .or(if side == Side::Broker { s.broker_connected } else { None })
                        .unwrap_or(self.started);
                    Some(at.saturating_duration_since(since).as_secs_f64())
                }
            };
            let silence_ratio = match (silence, keep_alive_enforced) {
                (Some(secs), Some(ka)) if ka > 0 => Some(secs / f64::from(ka)),
                _ => None,
            };
            let pingresp_delivered = self.dirs[Direction::BrokerToClient.index()].last_ping.load(Relaxed);
            let cause = classify(&CloseFacts {
                closed_by,
                how,
                disconnect_reason,
                connack: s.connack.as_ref().map(|c| c.code),
                taken_over: s.taken_over.is_some_and(|t| at.saturating_duration_since(t) < TAKEOVER_WINDOW),
                silence_ratio,
                ping_outstanding: self.pingreq_from_client.load(Relaxed) > pingresp_delivered,
            });
            let reason = reason.or_else(|| disconnect_reason.map(|r| reason_name(r).to_string()));
            s.close = Some(CloseInfo {
                closed_by,
                how,
                cause,
                disconnect_reason,
                reason,
                at_s: at.saturating_duration_since(self.started).as_secs_f64(),
                silence_s: silence,
                silence_ratio,
                keep_alive_enforced,
            });
        }
        self.unannounced.store(true, Relaxed);
        true
    }

    /// Logs the first close and tells the registry (the `Closed` event), once.
    pub(crate) fn announce_close(self: &Arc<Self>) {
        if !self.unannounced.swap(false, Relaxed) {
            return;
        }
        self.log_close();
        if let Some(registry) = self.registry.upgrade() {
            registry.on_first_close(self);
        }
    }

    /// The connection's first close line: who closed, how, why, after what silence, with the
    /// faults applied so far by rule.
    fn log_close(&self) {
        let s = self.snapshot();
        let Some(close) = s.close.as_ref() else { return };
        tracing::info!(
            conn = s.id,
            route = %s.route,
            client = %s.client_addr,
            // Peer input is recorded as a string: the text log quotes and escapes it (no forged
            // lines, no escape sequences), the JSON log keeps it exact.
            client_id = s.client_id.as_deref().unwrap_or(""),
            protocol = s.protocol.map(|p| p.level()).unwrap_or(0),
            closed_by = %close.closed_by.as_str(),
            how = %close.how.as_str(),
            cause = %close.cause.as_str(),
            reason = close.reason.as_deref().unwrap_or("-"),
            silence_s = close.silence_s.map(round3),
            silence_ratio = close.silence_ratio.map(round3),
            keep_alive = close.keep_alive_enforced,
            duration_s = round3(close.at_s),
            bytes_client_to_broker = s.client_to_broker.bytes,
            bytes_broker_to_client = s.broker_to_client.bytes,
            ended_by_proxy = %s.proxy_end.as_ref().map_or("-", |e| e.cause),
            faults = %faults_by_rule(&s.faults),
            "connection closed"
        );
    }

    /// Both sides are gone: records when, and logs a second line if the end says something the
    /// first close did not (a side lingered for more than [`LINGER_LOGGED`], or the proxy had
    /// to end what was left).
    pub(crate) fn note_ended(&self, at: Instant) {
        let (close, proxy_end) = {
            let mut s = self.state();
            s.ended = Some(at);
            (s.close.clone(), s.proxy_end.clone())
        };
        let Some(close) = close else { return };
        let lingered = at.saturating_duration_since(self.started).as_secs_f64() - close.at_s;
        let proxy_ended_the_rest = close.closed_by != Side::Proxy && proxy_end.is_some();
        if lingered > LINGER_LOGGED.as_secs_f64() || proxy_ended_the_rest {
            let still_open = match close.closed_by {
                Side::Broker => "client",
                Side::Client => "broker",
                Side::Proxy => "-",
            };
            tracing::info!(
                conn = self.id,
                route = %self.route.name,
                closed_by = %close.closed_by.as_str(),
                lingering_side = still_open,
                lingered_s = round3(lingered),
                ended_by_proxy = %proxy_end.as_ref().map_or("-", |e| e.cause),
                duration_s = round3(close.at_s + lingered),
                "connection fully closed"
            );
        }
    }

    /// Both sides are gone: the texts the peers chose (client id, Will topic, reasons, TLS names,
    /// WebSocket path) are cut as history keeps them ([`abbreviated`]), so an event about this
    /// connection still in the backlog holds a bounded record. Their true lengths are kept for
    /// [`event_json`]; take the [`history_json`] of the record before.
    pub(crate) fn keep_for_history(&self) {
        let mut guard = self.state();
        let s = &mut *guard;
        s.cut = CutLengths {
            client_id: s.client_id.as_mut().and_then(cut),
            will: s.will.as_mut().and_then(|w| cut(&mut w.topic)),
            reason: s.close.as_mut().and_then(|c| c.reason.as_mut()).and_then(cut),
        };
        let assigned = s.connack.as_mut().and_then(|c| c.assigned_client_id.as_mut());
        let texts = assigned.into_iter().chain(s.malformed.iter_mut().flatten());
        texts.chain(s.proxy_end.as_mut().map(|e| &mut e.detail)).for_each(|t| {
            cut(t);
        });
        for t in [&mut s.client_transport, &mut s.broker_transport].into_iter().flatten() {
            if let Some(tls) = t.tls.as_mut() {
                let names =
                    [&mut tls.version, &mut tls.cipher_suite, &mut tls.sni, &mut tls.alpn, &mut tls.peer_cn];
                names.into_iter().flatten().for_each(|t| {
                    cut(t);
                });
                tls.peer_sans.truncate(HISTORY_LIST_MAX);
                tls.peer_sans.shrink_to_fit();
                tls.peer_sans.iter_mut().for_each(|t| {
                    cut(t);
                });
            }
            if let Some(ws) = t.websocket.as_mut() {
                cut(&mut ws.path);
                ws.subprotocol.as_mut().map(cut);
            }
        }
    }

    /// A serialisable copy of the record. Never contains the password (it is never stored)
    /// nor the username (only whether one was given).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let ago = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_secs_f64());
        let dir = |d: Direction| {
            let stats = &self.dirs[d.index()];
            DirSnapshot {
                packets: PacketType::ALL
                    .iter()
                    .filter_map(|&t| {
                        let n = stats.packets[t.index()].load(Relaxed);
                        (n > 0).then_some((t.name(), n))
                    })
                    .collect(),
                bytes: stats.bytes.load(Relaxed),
                last_packet_ago_s: ago(self.decode_time(stats.last_packet.load(Relaxed))),
                last_ping_ago_s: ago(self.decode_time(stats.last_ping.load(Relaxed))),
            }
        };
        let s = self.state();
        let since_start =
            |t: Option<Instant>| t.map(|t| t.saturating_duration_since(self.started).as_secs_f64());
        let (state, state_detail) = match (&s.ended, &s.close, &s.connack) {
            (Some(_), _, _) => ("closed", None),
            (None, Some(c), _) => {
                let detail = match c.closed_by {
                    Side::Broker => "broker closed, client still open",
                    Side::Client => "client closed, broker still open",
                    Side::Proxy => "proxy closed, waiting for the sides to go",
                };
                ("closing", Some(detail))
            }
            (None, None, Some(c)) if c.code != 0 => ("refused", None),
            (None, None, Some(_)) => ("live", None),
            (None, None, None) => ("connecting", None),
        };
        Snapshot {
            id: self.id,
            state,
            state_detail,
            route: self.route.name.clone(),
            client_addr: self.client_addr,
            broker_addr: s.broker_addr,
            client_transport: s.client_transport.clone(),
            broker_transport: s.broker_transport.clone(),
            started_unix_s: self
                .started_wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            age_s: now.saturating_duration_since(self.started).as_secs_f64(),
            client_id: s.client_id.clone(),
            protocol: self.protocol(),
            clean_start: s.clean_start,
            session_expiry: s.session_expiry,
            username_present: s.username_present,
            will: s.will.clone(),
            keep_alive: KeepAliveSnapshot {
                broker_enforced: s.keep_alive.broker_enforced(),
                client_enforced: s.keep_alive.client_enforced(),
                values: s.keep_alive,
            },
            connack: s.connack.clone(),
            client_to_broker: dir(Direction::ClientToBroker),
            broker_to_client: dir(Direction::BrokerToClient),
            malformed: Direction::BOTH
                .iter()
                .filter_map(|&d| s.malformed[d.index()].clone().map(|r| (d.as_str(), r)))
                .collect(),
            faults: s.faults.clone(),
            close: s.close.clone(),
            proxy_end: s.proxy_end.clone(),
            taken_over_s: since_start(s.taken_over),
            ended_s: since_start(s.ended),
            subscriptions: s.filters.len(),
        }
    }
}

/// JSON form of a connection record (the admin API and the closed-connection log use it).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub id: u64,
    /// `connecting` (no CONNACK yet), `live`, `refused` (a refusing CONNACK, not closed yet),
    /// `closing` (a side closed, the other is still open) or `closed`.
    pub state: &'static str,
    /// For `closing`: which side closed and which is still open.
    pub state_detail: Option<&'static str>,
    pub route: String,
    pub client_addr: SocketAddr,
    pub broker_addr: Option<SocketAddr>,
    /// How the client is connected to the proxy: `tcp` or `tls` (with the TLS facts).
    pub client_transport: Option<SideTransport>,
    /// How the proxy is connected to the broker.
    pub broker_transport: Option<SideTransport>,
    pub started_unix_s: f64,
    pub age_s: f64,
    pub client_id: Option<String>,
    pub protocol: Option<Protocol>,
    pub clean_start: Option<bool>,
    pub session_expiry: Option<u32>,
    pub username_present: bool,
    pub will: Option<Will>,
    pub keep_alive: KeepAliveSnapshot,
    pub connack: Option<ConnackSeen>,
    pub client_to_broker: DirSnapshot,
    pub broker_to_client: DirSnapshot,
    pub malformed: HashMap<&'static str, String>,
    /// Faults applied, by rule name.
    pub faults: BTreeMap<String, u64>,
    pub close: Option<CloseInfo>,
    /// Why the proxy ended the connection itself (absent when the sides closed it).
    pub proxy_end: Option<ProxyEnd>,
    /// When a newer connection presented this client id, seconds after this one's start.
    pub taken_over_s: Option<f64>,
    /// When both sides were gone, seconds after the start.
    pub ended_s: Option<f64>,
    /// Topic filters the client subscribed to through the proxy.
    pub subscriptions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeepAliveSnapshot {
    #[serde(flatten)]
    pub values: KeepAlive,
    pub broker_enforced: Option<u16>,
    pub client_enforced: Option<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirSnapshot {
    pub packets: HashMap<&'static str, u64>,
    pub bytes: u64,
    pub last_packet_ago_s: Option<f64>,
    pub last_ping_ago_s: Option<f64>,
}

/// Something that happened on a connection.
#[derive(Clone)]
pub enum Event {
    /// A CONNECT was forwarded to the broker (the record holds its fields).
    Connect(Arc<Connection>),
    /// A CONNACK was forwarded to the client.
    Connack(Arc<Connection>),
    /// A PUBLISH on a watched topic ([`Registry::watch_topic`]) was forwarded to a client.
    Publish {
        conn: Arc<Connection>,
        direction: Direction,
        topic: Arc<str>,
        qos: u8,
        retain: bool,
        at: Instant,
    },
    /// A side (or the proxy) closed the connection first; its record holds the [`CloseInfo`].
    /// Measurements are decided here, whether or not the other side is still open.
    Closed(Arc<Connection>),
    /// Both sides are gone (at once after `Closed`, or when a lingering side closed at last).
    Ended(Arc<Connection>),
    /// A CONNECT presented the client id of `old`, live on the same route (`new` is its
    /// connection id).
    Takeover { old: Arc<Connection>, new: u64, at: Instant },
    /// The Will observer (`--observe-wills`) received a PUBLISH on a Will topic.
    WillTopicPublish { route: String, topic: Arc<str>, at: Instant },
    /// A rule acted on a connection for the first time (later applications are only counted).
    Fault { conn: Arc<Connection>, rule: String, action: &'static str, direction: &'static str },
    /// The rules changed through the admin API: what happened, in words.
    Rules { change: String },
    /// The monitor counted a detection: `side` closed a silent peer after `ratio` × Keep Alive.
    Detection { conn: Arc<Connection>, side: Side, seconds: f64, ratio: f64 },
    /// The monitor settled an expected Will: `observed` (with its delay), `missing` or
    /// `unobservable`; `watched_by` says what could have seen it.
    Will {
        conn_id: u64,
        route: String,
        /// Cut as history keeps it ([`abbreviated`]); `topic_len` is its true length.
        topic: String,
        topic_len: usize,
        outcome: &'static str,
        delay_s: Option<f64>,
        watched_by: String,
    },
}

/// An event as `/events` shows it: its kind and a JSON object (`conn` and `client_id` where it
/// concerns a connection); `None` for events only the monitor needs. Texts are cut as history
/// keeps them ([`abbreviate_json`]: `client_id_len`, `will_len`, `reason_len`, `topic_len` give
/// the true lengths), whether the connection is still live or not.
pub fn event_json(ev: &Event) -> Option<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let who = |c: &Connection| json!({"conn": c.id, "route": c.route.name, "client_id": c.client_id()});
    let with = |c: &Connection, extra: serde_json::Value| {
        let mut v = who(c);
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        abbreviate_json(&mut v);
        // Texts the record already cut when the connection ended: their true lengths.
        let cut = c.state().cut;
        if let Some(v) = v.as_object_mut() {
            for (key, len) in [("client_id", cut.client_id), ("will", cut.will), ("reason", cut.reason)] {
                if let Some(len) = len.filter(|_| v.get(key).is_some_and(|t| t.is_string())) {
                    v.insert(format!("{key}_len"), len.into());
                }
            }
        }
        v
    };
    Some(match ev {
        Event::Connect(c) => {
            let ka = c.keep_alive();
            let extra = json!({"protocol": c.protocol().map(|p| p.level()), "keep_alive": ka.requested,
                "forwarded_keep_alive": ka.forwarded, "will": c.will().map(|w| w.topic)});
            ("connect", with(c, extra))
        }
        Event::Connack(c) => {
            let s = c.snapshot();
            let extra = json!({"code": s.connack.map(|a| a.code), "server_keep_alive": s.keep_alive.values.server_announced});
            ("connack", with(c, extra))
        }
        Event::Fault { conn, rule, action, direction } => {
            ("fault", with(conn, json!({"rule": rule, "action": action, "direction": direction})))
        }
        Event::Closed(c) => {
            let s = c.snapshot();
            let close = s.close.as_ref();
            let round = |v: Option<f64>| v.map(round3);
            let extra = json!({
                "closed_by": close.map(|c| c.closed_by.as_str()),
                "how": close.map(|c| c.how.as_str()),
                "cause": close.map(|c| c.cause.as_str()),
                "reason": close.and_then(|c| c.reason.clone()),
                "silence_s": round(close.and_then(|c| c.silence_s)),
                "silence_ratio": round(close.and_then(|c| c.silence_ratio)),
                "keep_alive": close.and_then(|c| c.keep_alive_enforced),
                "ended_by_proxy": s.proxy_end.as_ref().map(|e| e.cause),
                "faults": s.faults,
            });
            ("closed", with(c, extra))
        }
        Event::Ended(c) => {
            let s = c.snapshot();
            let lingered = match (s.ended_s, s.close.as_ref()) {
                (Some(end), Some(close)) => Some(round3(end - close.at_s)),
                _ => None,
            };
            let extra =
                json!({"lingered_s": lingered, "ended_by_proxy": s.proxy_end.as_ref().map(|e| e.cause)});
            ("ended", with(c, extra))
        }
        Event::Takeover { old, new, .. } => ("takeover", with(old, json!({"by": new}))),
        Event::Rules { change } => ("rules", json!({"change": change})),
        Event::Detection { conn, side, seconds, ratio } => {
            let extra =
                json!({"side": side.as_str(), "silence_s": round3(*seconds), "ratio": round3(*ratio)});
            ("detection", with(conn, extra))
        }
        Event::Will { conn_id, route, topic, topic_len, outcome, delay_s, watched_by } => {
            let mut v = json!({"conn": conn_id, "route": route, "topic": topic, "outcome": outcome,
                "delay_s": delay_s.map(round3), "watched_by": watched_by});
            if *topic_len > topic.len() {
                v["topic_len"] = (*topic_len).into();
            }
            ("will", v)
        }
        Event::Publish { .. } | Event::WillTopicPublish { .. } => return None,
    })
}

/// A watched Will topic; dropping the last clone stops the watch. The record's handle lives as
/// long as the record: until it is closed and every event subscriber has read its last event
/// about it (the monitor does at once; the broadcast ring holds at most 4,096 events).
pub struct TopicWatch {
    registry: Arc<Registry>,
    /// The registry's one copy of the topic.
    topic: Arc<str>,
}

impl TopicWatch {
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Drop for TopicWatch {
    fn drop(&mut self) {
        self.registry.unwatch_topic(&self.topic);
    }
}

/// Sizes of the monitor's indexes keyed by what clients send (client ids, Will topics),
/// published for `/metrics`: they return to 0 when no connection is open and no Will is
/// awaited, whatever the clients did.
#[derive(Debug, Default)]
pub struct Tracked {
    /// Takeover victims awaiting their close.
    pub takeovers: AtomicU64,
    /// Wills awaited.
    pub wills: AtomicU64,
    /// Will-topic PUBLISHes remembered to match a close seen after them.
    pub will_publishes: AtomicU64,
}

/// How many events a slow subscriber may fall behind before it misses some.
const EVENT_BACKLOG: usize = 4096;

/// Open connections by (route, client id), to recognise takeovers as the CONNECT passes.
#[derive(Default)]
struct ClientIndex {
    by_client: HashMap<(String, String), Vec<u64>>,
    /// The key each connection was filed under (its client id may change later: a CONNACK can
    /// assign one).
    keys: HashMap<u64, (String, String)>,
}

/// How many closed connections `GET /connections?state=closed` keeps by default.
pub const CLOSED_HISTORY: usize = 1000;

/// History (closed records, events) keeps a text whole when its JSON form (without the quotes)
/// takes at most this many bytes; a longer one is cut ([`abbreviated`]).
pub const HISTORY_TEXT_MAX: usize = 256;

/// History keeps at most this many names of a list (a certificate's subject alternative names).
pub const HISTORY_LIST_MAX: usize = 4;

/// The most bytes of JSON one closed record takes in the ring, whatever its peers sent (every
/// text at its longest), plus the names of the rules that acted on it (`faults`).
pub const HISTORY_RECORD_MAX: usize = 10 * 1024;

/// The bytes `c` takes inside a JSON string: `"`, `\` and control characters are escaped.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        c if u32::from(c) < 0x20 => 6, // \u00XX
        c => c.len_utf8(),
    }
}

/// What history keeps of `text`: the whole of it if its JSON form takes at most
/// [`HISTORY_TEXT_MAX`] bytes, else its longest prefix whose JSON form does (which ends on a
/// character boundary: printable text keeps its first 256 bytes, or up to 3 fewer).
pub fn abbreviated(text: &str) -> &str {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += json_len(c);
        if used > HISTORY_TEXT_MAX {
            return &text[..at];
        }
    }
    text
}

/// Cuts `text` to what history keeps of it ([`abbreviated`]) in a fresh allocation, so the whole
/// one is freed; returns its true length in bytes if it was cut.
fn cut(text: &mut String) -> Option<usize> {
    let kept = abbreviated(text).len();
    (kept < text.len()).then(|| {
        let len = text.len();
        *text = text[..kept].to_string();
        len
    })
}

/// Cuts a JSON object as history keeps it, in every nested object: a text longer than
/// [`abbreviated`] keeps gets a sibling `<field>_len`, its true length in bytes; a list of more
/// than [`HISTORY_LIST_MAX`] items, or one with a text cut, keeps its first items (texts cut)
/// and gets a sibling `<field>_len`, its true number of items.
pub fn abbreviate_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = value else { return };
    let mut lengths = Vec::new();
    for (key, v) in map.iter_mut() {
        let len = match v {
            Value::String(text) => cut(text),
            Value::Array(items) => {
                let len = items.len();
                items.truncate(HISTORY_LIST_MAX);
                let mut texts_cut = false;
                for item in items.iter_mut() {
                    match item {
                        Value::String(text) => texts_cut |= cut(text).is_some(),
                        other => abbreviate_json(other),
                    }
                }
                (len > HISTORY_LIST_MAX || texts_cut).then_some(len)
            }
            Value::Object(_) => {
                abbreviate_json(v);
                None
            }
            _ => None,
        };
        if let Some(len) = len {
            lengths.push((format!("{key}_len"), len));
        }
    }
    for (key, len) in lengths {
        map.insert(key, len.into());
    }
}

/// The JSON of a record as the ring of closed connections keeps it ([`abbreviate_json`]): at
/// most [`HISTORY_RECORD_MAX`] bytes.
pub fn history_json(snapshot: &Snapshot) -> String {
    let mut v = serde_json::to_value(snapshot).unwrap_or_default();
    abbreviate_json(&mut v);
    v.to_string()
}

/// The live connections of every route, the recently closed ones, and the event stream.
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Connection>>>,
    /// Records of the last `closed_capacity` connections fully closed, oldest first, as JSON
    /// (one compact allocation each).
    closed: Mutex<std::collections::VecDeque<Box<str>>>,
    closed_capacity: usize,
    clients: Mutex<ClientIndex>,
    /// Topic filters subscribed through the proxy by open connections: (route, filter) → how
    /// many connections hold it.
    subscriptions: Mutex<HashMap<(String, String), usize>>,
    events: broadcast::Sender<Event>,
    /// Will topics whose PUBLISHes are reported as events, with a reference count.
    will_topics: Mutex<HashMap<Arc<str>, usize>>,
    /// Number of entries in `will_topics`, so the pumps can skip PUBLISH decoding when zero.
    watching: AtomicU64,
    /// The monitor's index sizes.
    pub tracked: Tracked,
    /// `/events` subscribers dropped for falling behind.
    pub events_dropped: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(CLOSED_HISTORY)
    }
}

impl Registry {
    /// A registry that keeps the records of the last `closed_history` closed connections.
    pub fn new(closed_history: usize) -> Self {
        Registry {
            next_id: AtomicU64::new(1),
            live: Mutex::default(),
            closed: Mutex::default(),
            closed_capacity: closed_history,
            clients: Mutex::default(),
            subscriptions: Mutex::default(),
            events: broadcast::channel(EVENT_BACKLOG).0,
            will_topics: Mutex::default(),
            watching: AtomicU64::new(0),
            tracked: Tracked::default(),
            events_dropped: AtomicU64::new(0),
        }
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        lock(&self.live)
    }

    /// Receives every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether anyone listens, so the pumps can skip building events nobody reads.
    pub(crate) fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    pub fn emit(&self, event: Event) {
        // No receiver is not an error: events are optional.
        let _ = self.events.send(event);
    }

    fn will_topics(&self) -> MutexGuard<'_, HashMap<Arc<str>, usize>> {
        lock(&self.will_topics)
    }

    /// Reports PUBLISHes on `topic` flowing to clients as [`Event::Publish`] for as long as the
    /// returned handle (or a clone of it) lives: the connection whose Will it is holds one, and
    /// the monitor another while it awaits the Will, so no path can leave a topic watched.
    pub fn watch_topic(self: &Arc<Self>, topic: &str) -> Arc<TopicWatch> {
        let mut topics = self.will_topics();
        let shared = match topics.get_key_value(topic) {
            Some((key, _)) => key.clone(),
            None => Arc::from(topic),
        };
        *topics.entry(shared.clone()).or_default() += 1;
        self.watching.store(topics.len() as u64, Relaxed);
        Arc::new(TopicWatch { registry: self.clone(), topic: shared })
    }

    fn unwatch_topic(&self, topic: &str) {
        let mut topics = self.will_topics();
        if let Some(n) = topics.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                topics.remove(topic);
            }
        }
        self.watching.store(topics.len() as u64, Relaxed);
    }

    /// Whether any topic is watched (cheap: the pumps ask per PUBLISH).
    pub(crate) fn watching_topics(&self) -> bool {
        self.watching.load(Relaxed) > 0
    }

    pub(crate) fn is_watched(&self, topic: &str) -> bool {
        self.will_topics().contains_key(topic)
    }

    /// The watched topic equal to `topic`, shared: the events of PUBLISHes on a Will topic all
    /// point at this one copy, so a flood of them on a 64 KiB topic holds the topic once, not
    /// once per event in the backlog and in the monitor's recent PUBLISHes.
    pub(crate) fn watched(&self, topic: &str) -> Option<Arc<str>> {
        self.will_topics().get_key_value(topic).map(|(k, _)| k.clone())
    }

    /// The size of every index keyed by what clients send, by name (see [`Tracked`]).
    pub fn tracked_entries(&self) -> [(&'static str, u64); 6] {
        let t = &self.tracked;
        [
            ("client_ids", lock(&self.clients).keys.len() as u64),
            ("subscriptions", lock(&self.subscriptions).len() as u64),
            ("takeovers", t.takeovers.load(Relaxed)),
            ("wills", t.wills.load(Relaxed)),
            ("will_publishes", t.will_publishes.load(Relaxed)),
            ("will_topics", self.watching.load(Relaxed)),
        ]
    }

    pub fn get(&self, id: u64) -> Option<Arc<Connection>> {
        self.live().get(&id).cloned()
    }

    /// Wakes the live connections a rule change may affect at once (see
    /// [`crate::fault::Affected`]); the others pick the change up at their next packet.
    pub fn wake(&self, affected: crate::fault::Affected<'_>) {
        use crate::fault::Affected;
        let live: Vec<Arc<Connection>> = self.live().values().cloned().collect();
        for conn in live {
            let woken = match affected {
                Affected::All => true,
                Affected::MatchedBy(rule) => conn.client_id().is_some_and(|id| {
                    rule.matcher.may_match(&conn.route.name, &id, conn.protocol.load(Relaxed))
                }),
            };
            if woken {
                conn.wake();
            }
        }
    }

    /// Live connections, oldest first.
    pub fn list(&self) -> Vec<Arc<Connection>> {
        let mut all: Vec<_> = self.live().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    pub fn len(&self) -> usize {
        self.live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn open(
        self: &Arc<Self>,
        route: Arc<Route>,
        client_addr: SocketAddr,
        cancel: CancellationToken,
    ) -> Arc<Connection> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Connection::new(id, route, client_addr, cancel, Arc::downgrade(self)));
        self.live().insert(id, conn.clone());
        conn
    }

    /// Files a connection whose CONNECT is about to be forwarded under its client id; open
    /// connections with the same id on the route are taken over ([`Event::Takeover`]).
    pub(crate) fn on_connect(&self, conn: &Arc<Connection>) {
        let Some(client_id) = conn.client_id().filter(|id| !id.is_empty()) else { return };
        let key = (conn.route.name.clone(), client_id);
        let now = Instant::now();
        let old: Vec<u64> = {
            let mut index = lock(&self.clients);
            if index.keys.contains_key(&conn.id) || conn.close_info().is_some() {
                return; // a second CONNECT is malformed and never gets here; closed: nothing to file
            }
            let ids = index.by_client.entry(key.clone()).or_default();
            let old = ids.clone();
            ids.push(conn.id);
            index.keys.insert(conn.id, key);
            old
        };
        for old in old.into_iter().filter_map(|id| self.get(id)).filter(|old| old.mark_taken_over(now)) {
            tracing::debug!(conn = conn.id, old = old.id, "takeover: the client id is already connected");
            self.emit(Event::Takeover { old, new: conn.id, at: now });
        }
    }

    /// The client subscribed to `filters` through the proxy.
    pub(crate) fn on_subscribe(&self, conn: &Connection, filters: Vec<String>) {
        let mut subs = lock(&self.subscriptions);
        for f in conn.add_filters(filters) {
            *subs.entry((conn.route.name.clone(), f)).or_default() += 1;
        }
    }

    /// The client unsubscribed from `filters`.
    pub(crate) fn on_unsubscribe(&self, conn: &Connection, filters: &[String]) {
        let mut subs = lock(&self.subscriptions);
        let gone = conn.remove_filters(filters);
        release(&mut subs, &conn.route.name, gone);
    }

    /// How many subscriptions through the proxy on `route` match `topic`.
    pub fn subscribers(&self, route: &str, topic: &str) -> usize {
        lock(&self.subscriptions)
            .iter()
            .filter(|((r, filter), _)| r == route && crate::codec::filter_matches(filter, topic))
            .map(|(_, n)| n)
            .sum()
    }

    /// The first close of a connection: it no longer holds its client id or its subscriptions.
    fn on_first_close(&self, conn: &Arc<Connection>) {
        {
            let mut index = lock(&self.clients);
            if let Some(key) = index.keys.remove(&conn.id)
                && let Some(ids) = index.by_client.get_mut(&key)
            {
                ids.retain(|&i| i != conn.id);
                if ids.is_empty() {
                    index.by_client.remove(&key);
                }
            }
        }
        {
            let mut subs = lock(&self.subscriptions);
            let filters = std::mem::take(&mut conn.state().filters);
            release(&mut subs, &conn.route.name, filters);
        }
        self.emit(Event::Closed(conn.clone()));
    }

    /// Both sides of a connection are gone: it moves from the live list to the closed ones.
    pub(crate) fn close(&self, conn: &Arc<Connection>) {
        conn.note_ended(Instant::now());
        self.live().remove(&conn.id);
        if self.closed_capacity > 0 {
            let snapshot = history_json(&conn.snapshot()).into_boxed_str();
            let mut closed = lock(&self.closed);
            if closed.len() >= self.closed_capacity {
                closed.pop_front();
            }
            closed.push_back(snapshot);
        }
        conn.keep_for_history();
        self.emit(Event::Ended(conn.clone()));
    }

    /// The records of recently closed connections, oldest first (JSON [`Snapshot`]s).
    pub fn closed(&self) -> Vec<serde_json::Value> {
        lock(&self.closed).iter().filter_map(|s| serde_json::from_str(s).ok()).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks would be a bug elsewhere; the data stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops a connection's hold on `filters` of `route`.
fn release(subs: &mut HashMap<(String, String), usize>, route: &str, filters: Vec<String>) {
    for f in filters {
        let key = (route.to_string(), f);
        if let Some(n) = subs.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                subs.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(closed_by: Side, how: CloseHow) -> CloseFacts {
        CloseFacts {
            closed_by,
            how,
            disconnect_reason: None,
            connack: Some(0),
            taken_over: false,
            silence_ratio: Some(0.5),
            ping_outstanding: false,
        }
    }

    #[test]
    fn closes_are_classified_by_the_documented_rules() {
        use {CloseHow::*, Side::*};
        let cause = |f: CloseFacts| classify(&f).as_str();
        let silent = |f: CloseFacts| CloseFacts { silence_ratio: Some(1.5), ..f };
        let reason = |f: CloseFacts, r| CloseFacts { disconnect_reason: Some(r), ..f };
        // Only a broker close after ≥ 1 × Keep Alive of silence (or 0x8D) is a Keep Alive timeout.
        assert_eq!(cause(silent(facts(Broker, Fin))), "keepalive_timeout");
        assert_eq!(cause(silent(facts(Broker, Rst))), "keepalive_timeout");
        assert_eq!(cause(reason(facts(Broker, Disconnect), 0x8d)), "keepalive_timeout");
        assert_eq!(cause(facts(Broker, Fin)), "abrupt", "a broker dropping a client 0.5 × Keep Alive in");
        assert_eq!(cause(CloseFacts { silence_ratio: None, ..facts(Broker, Fin) }), "abrupt", "Keep Alive 0");
        // Refused or unanswered CONNECTs are never detections, whoever closes.
        assert_eq!(
            cause(silent(CloseFacts { connack: Some(0x87), ..facts(Broker, Fin) })),
            "connect_refused"
        );
        assert_eq!(cause(CloseFacts { connack: Some(5), ..facts(Client, Fin) }), "connect_refused");
        assert_eq!(cause(silent(CloseFacts { connack: None, ..facts(Broker, Fin) })), "no_connack");
        // Takeovers: seen as the CONNECT passed, or announced by 0x8E.
        assert_eq!(cause(silent(CloseFacts { taken_over: true, ..facts(Broker, Fin) })), "takeover");
        assert_eq!(cause(reason(facts(Broker, Disconnect), 0x8e)), "takeover");
        assert_eq!(
            cause(CloseFacts { taken_over: true, ..facts(Client, Fin) }),
            "abrupt",
            "the client closed it"
        );
        // Normal ends.
        assert_eq!(cause(facts(Client, Disconnect)), "normal", "MQTT 3.x DISCONNECT");
        assert_eq!(cause(reason(facts(Client, Disconnect), 0x04)), "normal");
        assert_eq!(cause(reason(facts(Broker, Disconnect), 0x00)), "normal");
        assert_eq!(cause(reason(facts(Client, Disconnect), 0x80)), "abrupt");
        // The client gives up: a PINGREQ unanswered, or a Keep Alive of silence.
        assert_eq!(cause(CloseFacts { ping_outstanding: true, ..facts(Client, Fin) }), "client_gave_up");
        assert_eq!(cause(silent(facts(Client, Rst))), "client_gave_up");
        assert_eq!(cause(facts(Client, Fin)), "abrupt", "a FIN half a Keep Alive after the last packet");
        assert_eq!(cause(silent(facts(Proxy, Fin))), "proxy");
    }

    #[tokio::test]
    async fn subscriptions_count_once_per_connection_and_go_with_its_first_close() {
        let registry = Arc::new(Registry::default());
        let route = Route::for_test("r");
        let open = || registry.open(route.clone(), "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
        let (a, b) = (open(), open());
        let filters = |f: &[&str]| f.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        registry.on_subscribe(&a, filters(&["dev/+", "dev/+"]));
        registry.on_subscribe(&a, filters(&["dev/+"])); // the same SUBSCRIBE again
        registry.on_subscribe(&b, filters(&["dev/#"]));
        assert_eq!(registry.subscribers("r", "dev/1"), 2, "one per connection and filter");
        assert_eq!(registry.subscribers("other", "dev/1"), 0, "per route");
        registry.on_unsubscribe(&a, &filters(&["dev/+", "never/subscribed"]));
        assert_eq!(registry.subscribers("r", "dev/1"), 1);
        // Past MAX_FILTERS, one `#` watches the rest.
        let many: Vec<String> = (0..MAX_FILTERS + 5).map(|i| format!("f/{i}")).collect();
        registry.on_subscribe(&a, many);
        assert_eq!(a.snapshot().subscriptions, MAX_FILTERS + 1);
        assert_eq!(registry.subscribers("r", "anything/at/all"), 1);
        // A first close releases everything, even with the socket still open.
        a.note_close(Side::Client, CloseHow::Fin, None, None, Instant::now());
        b.note_close(Side::Broker, CloseHow::Fin, None, None, Instant::now());
        registry.on_subscribe(&a, filters(&["late/filter"]));
        assert_eq!(registry.tracked_entries()[1], ("subscriptions", 0));
    }

    /// The JSON of `text` without its quotes: what history bounds.
    fn json_bytes(text: &str) -> usize {
        serde_json::to_string(text).unwrap().len() - 2
    }

    #[test]
    fn history_keeps_texts_of_up_to_256_json_bytes_and_cuts_longer_ones_on_a_character_boundary() {
        let kept = |text: String| abbreviated(&text).len();
        let a = |n: usize| "a".repeat(n);
        assert_eq!(kept(String::new()), 0);
        assert_eq!(kept(a(256)), 256, "at the limit: whole");
        assert_eq!(kept(a(257)), 256, "one byte over: cut to the limit");
        assert_eq!(kept("é".repeat(128)), 256, "two-byte characters up to the limit: whole");
        assert_eq!(kept("é".repeat(129)), 256);
        assert_eq!(kept(format!("a{}", "é".repeat(200))), 255, "a cut inside a character keeps it out");
        assert_eq!(kept("€".repeat(86)), 255, "three-byte characters");
        assert_eq!(kept(format!("{}😀", a(253))), 253, "a four-byte character across the limit");
        // JSON escapes count: `"` and `\` take 2 bytes, control characters up to 6.
        assert_eq!(kept("\"".repeat(128)), 128, "256 bytes of JSON: whole");
        assert_eq!(kept("\"".repeat(129)), 128);
        assert_eq!(kept(format!("{}\n", a(255))), 255, "the escaped newline would make 257");
        assert_eq!(kept("\u{1}".repeat(43)), 42, "\\u0001 is 6 bytes");
        for text in [a(300), "é".repeat(300), "\u{1}".repeat(300), format!("x{}", "\\".repeat(300))] {
            let cut = abbreviated(&text);
            assert!(text.starts_with(cut) && json_bytes(cut) <= HISTORY_TEXT_MAX && json_bytes(cut) > 250);
        }
    }

    /// A record with every text at the longest a peer (or the proxy) could make it.
    fn worst_record() -> Snapshot {
        let registry = Arc::new(Registry::default());
        let conn =
            registry.open(Route::for_test("r"), "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
        let mut s = conn.snapshot();
        let long = |c: char| c.to_string().repeat(65_535 / c.len_utf8());
        let tls = crate::tls::TlsInfo {
            version: Some(long('v')),
            cipher_suite: Some(long('c')),
            sni: Some(long('s')),
            alpn: Some(long('a')),
            peer_certificate: true,
            peer_cn: Some(long('\u{1}')),
            peer_sans: (0..100).map(|i| format!("{i}{}", long('"'))).collect(),
        };
        let ws = WebSocketInfo {
            path: long('/'),
            subprotocol: Some(long('p')),
            pings: 1,
            pongs: 1,
            close_code: None,
        };
        let side = SideTransport {
            transport: crate::transport::Transport::Wss,
            tls: Some(tls),
            unverified: false,
            websocket: Some(ws),
        };
        s.client_transport = Some(side.clone());
        s.broker_transport = Some(side);
        s.client_id = Some(long('é'));
        s.will =
            Some(Will { topic: long('\\'), qos: 1, retain: false, delay_interval: None, payload_len: 9 });
        s.connack =
            Some(ConnackSeen { session_present: false, code: 0, assigned_client_id: Some(long('i')) });
        s.malformed = [("client_to_broker", long('m')), ("broker_to_client", long('\n'))].into();
        s.close = Some(CloseInfo {
            closed_by: Side::Proxy,
            how: CloseHow::Fin,
            cause: Cause::Proxy,
            disconnect_reason: None,
            reason: Some(long('r')),
            at_s: 1.0,
            silence_s: None,
            silence_ratio: None,
            keep_alive_enforced: None,
        });
        s.proxy_end = Some(ProxyEnd { cause: "admin", detail: long('d') });
        s
    }

    #[test]
    fn a_closed_record_is_bounded_whatever_its_texts_and_says_what_it_cut() {
        let worst = worst_record();
        let json = history_json(&worst);
        assert!(json.len() <= HISTORY_RECORD_MAX, "{} bytes", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let whole = |text: &Option<String>| text.as_ref().unwrap().len();
        assert_eq!(v["client_id"].as_str().unwrap().len(), 256);
        assert_eq!(v["client_id_len"], whole(&worst.client_id));
        assert_eq!(v["will"]["topic"].as_str().unwrap(), "\\".repeat(128));
        assert_eq!(v["will"]["topic_len"], 65_535);
        assert_eq!(v["will"]["payload_len"], 9, "numbers stay as they are");
        assert_eq!(v["close"]["reason_len"], 65_535);
        assert_eq!(v["malformed"]["broker_to_client"].as_str().unwrap(), "\n".repeat(128));
        assert_eq!(v["malformed"]["broker_to_client_len"], 65_535);
        let tls = &v["client_transport"]["tls"];
        assert_eq!(tls["peer_cn"].as_str().unwrap().len(), 42, "42 control characters: 252 bytes of JSON");
        assert_eq!(tls["peer_sans"].as_array().unwrap().len(), HISTORY_LIST_MAX);
        assert_eq!(tls["peer_sans_len"], 100, "the true number of names");
        assert_eq!(v["broker_transport"]["websocket"]["path_len"], 65_535);

        // Short texts stay exact, with no length beside them.
        let mut short = worst_record();
        short.client_transport = None;
        short.broker_transport = None;
        short.client_id = Some("a".repeat(256));
        short.will = None;
        short.connack = None;
        short.malformed.clear();
        short.close = None;
        short.proxy_end = None;
        // Both read back from text: serde_json's float parsing may differ from the float in its
        // last bit, which a value made without text would not share.
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        let exact = parse(&serde_json::to_string(&short).unwrap());
        assert_eq!(parse(&history_json(&short)), exact);
    }

    #[tokio::test]
    async fn an_ended_record_keeps_its_texts_cut_while_its_awaited_will_topic_stays_whole() {
        use crate::codec::{Connect, FrameHeader, Protocol, encode};
        let registry = Arc::new(Registry::default());
        let mut events = registry.subscribe();
        let conn =
            registry.open(Route::for_test("r"), "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
        let (id, topic) = ("é".repeat(30_000), format!("will/{}", "t".repeat(60_000)));
        let mut spec = encode::ConnectSpec::new(Protocol::V311, id.clone(), 30);
        spec.will = Some(encode::WillSpec {
            topic: topic.clone(),
            payload: b"gone".to_vec(),
            qos: 0,
            retain: false,
            delay_interval: None,
        });
        let frame = spec.encode();
        let connect = Connect::decode(&frame, &FrameHeader::parse(&frame).unwrap().unwrap()).unwrap();
        conn.on_connect(&connect, 30, Some(registry.watch_topic(&topic)));
        assert_eq!(conn.client_id().unwrap(), id, "live: whole");
        let (_, connect_event) = event_json(&Event::Connect(conn.clone())).unwrap();
        assert_eq!(connect_event["client_id"].as_str().unwrap().len(), 256, "events are cut, live or not");
        assert_eq!(connect_event["client_id_len"], 60_000);
        assert_eq!(connect_event["will_len"], topic.len());

        conn.note_close(Side::Client, CloseHow::Rst, None, Some("x".repeat(1000)), Instant::now());
        registry.close(&conn);
        let closed = registry.closed();
        assert_eq!(closed[0]["client_id_len"], 60_000);
        assert_eq!(closed[0]["close"]["reason_len"], 1000);
        // The record itself now holds only what history keeps …
        assert_eq!(conn.client_id().unwrap().len(), 256);
        assert_eq!(conn.close_info().unwrap().reason.unwrap().len(), 256);
        // … but the Will topic the monitor awaits is whole while watched.
        assert_eq!(conn.will().unwrap().topic, topic);
        let watch = conn.take_will_watch().unwrap();
        assert_eq!(conn.will().unwrap().topic, topic, "the monitor holds the watch");
        drop(watch);
        assert_eq!(conn.will().unwrap().topic.len(), 256, "unwatched: as history keeps it");
        // Its events, read late from the backlog, still give the true lengths.
        let mut seen = 0;
        while let Ok(ev) = events.try_recv() {
            let Some((kind, v)) = event_json(&ev) else { continue };
            seen += 1;
            assert_eq!(v["client_id_len"], 60_000, "{kind}");
            assert!(v["client_id"].as_str().unwrap().len() <= 256, "{kind}");
            if kind == "closed" {
                assert_eq!(v["reason_len"], 1000);
            }
        }
        assert_eq!(seen, 2, "closed and ended");
    }

    #[test]
    fn keepalive_violations_allow_ten_percent_and_100_ms() {
        let ms = Duration::from_millis;
        assert!(!keepalive_violated(ms(2013), 2), "a pinging client 13 ms late is compliant");
        assert!(!keepalive_violated(ms(2300), 2));
        assert!(keepalive_violated(ms(2301), 2));
        assert!(!keepalive_violated(ms(11_100), 10));
        assert!(keepalive_violated(ms(11_101), 10));
        assert!(!keepalive_violated(Duration::from_secs(3600), 0), "Keep Alive 0: no limit");
    }
}
