//! `--observe-wills`: the proxy's own MQTT client on each route's upstream.
//!
//! The subscribers that matter for a Will are often not behind the proxy, so the proxy can
//! subscribe itself: one client per route ([`crate::client::RawClient`], over the upstream's
//! transport — TCP, TLS, WebSocket — with the route's TLS settings), connected straight to the
//! broker, subscribing to the Will topic of every connection as it learns it (from the CONNECT).
//! What it receives is reported as [`Event::WillTopicPublish`]; the monitor counts each expected
//! Will once, whichever path saw it first, and asks [`crate::route::ObserverView`] whether the
//! observer was watching a Will that never came (a topic counts as watched once its SUBACK
//! granted it; a refused subscription is logged). Retained messages (delivered because of the
//! subscription itself) are ignored. Every [`PRUNE_EVERY`] it unsubscribes from the topics no
//! live connection and no awaited Will needs any more, so a fleet that churns Will topics does
//! not grow its subscriptions for ever. Credentials come from flags, env or a file and are never
//! logged.
//!
//! It speaks MQTT 5 or 3.1.1 (`--observer-protocol`; `auto` tries 5 first and falls back to
//! 3.1.1 while 5 fails, and keeps what worked). Subscriptions are QoS 0 (nothing to
//! acknowledge; over one live connection nothing is lost), Keep Alive 30 s with a PINGREQ every
//! 30 s; a PINGREQ unanswered by the next one ends the connection (the broker is gone).
//! The back-off starts over only once a connection answered a PINGREQ, so a broker that accepts
//! the observer and drops it at once is retried ever more slowly, not every second. Failed connections are retried after 1 s, doubling to 30 s, counted, and logged once
//! per change between connected and failing.

use crate::client::{Dial, Handshake, Next, RawClient};
use crate::codec::encode::{self, ConnectSpec};
use crate::codec::{PacketType, Protocol, Publish};
use crate::record::{Event, Registry};
use crate::route::Route;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The MQTT version the observer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ObserverProtocol {
    /// MQTT 5, else 3.1.1.
    #[default]
    Auto,
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

/// The first retry after a failure; each further one waits twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the observer drops the topics nothing watches any more.
pub const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// How the observer connects.
#[derive(Clone, Default)]
pub struct ObserverConfig {
    /// Client id prefix; the route name is appended.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub protocol: ObserverProtocol,
    /// Keep Alive of the observer's connection, in whole seconds (`None`: 30 s).
    pub keep_alive: Option<Duration>,
}

impl std::fmt::Debug for ObserverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverConfig")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("protocol", &self.protocol)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// The observer's Keep Alive, and how often it pings, unless [`ObserverConfig::keep_alive`] says.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long a connection attempt (TCP, TLS, WebSocket, CONNECT) may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// The observer's connection, or the time of its next attempt.
enum State {
    /// `unanswered`: a PINGREQ went out and its PINGRESP has not come yet.
    Connected {
        client: RawClient,
        ping_at: Instant,
        unanswered: bool,
    },
    Waiting {
        retry_at: Instant,
    },
}

/// What woke the observer's loop.
enum Wake {
    Stop,
    Prune,
    Event(Result<Event, RecvError>),
    Mqtt(Next),
    Retry,
}

/// One observer: its route, what it watches, and how it connects.
struct Observer {
    route: Arc<Route>,
    registry: Arc<Registry>,
    config: ObserverConfig,
    client_id: String,
    /// The version to try next, and whether `auto` settled on one.
    v5: bool,
    settled: bool,
    /// Every Will topic wanted, subscribed or not.
    topics: BTreeSet<String>,
    keep_alive: Duration,
    /// SUBSCRIBEs sent and not yet answered, by packet id.
    pending: HashMap<u16, String>,
    packet_id: u16,
    backoff: Duration,
    failing: bool,
}

/// Runs the observer of one route until `stop`.
pub async fn run(
    route: Arc<Route>,
    registry: Arc<Registry>,
    config: ObserverConfig,
    stop: CancellationToken,
) {
    let mut events = registry.subscribe();
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut o = Observer {
        client_id: format!("{}{}", config.client_id, route.name),
        keep_alive: config.keep_alive.unwrap_or(KEEP_ALIVE),
        v5: config.protocol != ObserverProtocol::V311,
        settled: config.protocol != ObserverProtocol::Auto,
        route,
        registry,
        config,
        topics: BTreeSet::new(),
        pending: HashMap::new(),
        packet_id: 0,
        backoff: FIRST_BACKOFF,
        failing: false,
    };
    info!(route = %o.route.name, client_id = %o.client_id, protocol = ?o.config.protocol,
        "observing Wills with an own connection to the upstream");
    let mut state = State::Waiting { retry_at: Instant::now() };
    loop {
        let wake = match &mut state {
            State::Connected { client, ping_at, .. } => tokio::select! {
                _ = stop.cancelled() => Wake::Stop,
                _ = prune.tick() => Wake::Prune,
                ev = events.recv() => Wake::Event(ev),
                next = client.next(*ping_at) => Wake::Mqtt(next),
            },
            State::Waiting { retry_at } => tokio::select! {
                _ = stop.cancelled() => Wake::Stop,
                _ = prune.tick() => Wake::Prune,
                ev = events.recv() => Wake::Event(ev),
                () = sleep_until(*retry_at) => Wake::Retry,
            },
        };
        let client = match &mut state {
            State::Connected { client, .. } => Some(client),
            State::Waiting { .. } => None,
        };
        let sent = match wake {
            Wake::Stop => {
                if let State::Connected { client, .. } = state {
                    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
                }
                return;
            }
            Wake::Prune => o.prune(client).await,
            Wake::Event(Ok(Event::Connect(conn))) if Arc::ptr_eq(&conn.route, &o.route) => {
                match conn.will() {
                    Some(will) if o.topics.insert(will.topic.clone()) => match client {
                        Some(c) => o.subscribe(c, &will.topic).await,
                        None => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
            Wake::Event(Ok(_)) => Ok(()),
            Wake::Event(Err(RecvError::Lagged(n))) => {
                warn!(route = %o.route.name, missed = n,
                    "the Will observer fell behind; taking the Will topics from the live connections");
                o.resync(client).await
            }
            Wake::Event(Err(RecvError::Closed)) => return,
            Wake::Mqtt(next) => match (next, &mut state) {
                // A broker that does not answer a PINGREQ within Keep Alive is gone (a half-open
                // connection): reconnect.
                (Next::Quiet, State::Connected { unanswered: true, .. }) => {
                    Err(format!("no PINGRESP within {:?}", o.keep_alive))
                }
                (Next::Quiet, State::Connected { client, ping_at, unanswered }) => {
                    (*ping_at, *unanswered) = (Instant::now() + o.keep_alive, true);
                    client.send(&encode::PINGREQ).await.map_err(|e| e.to_string())
                }
                (Next::Packet(h, _), State::Connected { unanswered, .. })
                    if h.packet_type == PacketType::Pingresp =>
                {
                    *unanswered = false;
                    o.stable();
                    Ok(())
                }
                (Next::Packet(h, frame), _) => {
                    o.received(h, &frame);
                    Ok(())
                }
                (Next::Ended(ended), _) => Err(format!("the broker closed the connection ({ended:?})")),
                (Next::Quiet, State::Waiting { .. }) => Ok(()),
            },
            Wake::Retry => match o.connect(&stop).await {
                Some(Ok(client)) => {
                    state = State::Connected {
                        client,
                        ping_at: Instant::now() + o.keep_alive,
                        unanswered: false,
                    };
                    Ok(())
                }
                Some(Err(error)) => Err(error),
                None => return,
            },
        };
        if let Err(error) = sent {
            o.failed(&error);
            state = State::Waiting { retry_at: Instant::now() + o.backoff };
            o.backoff = (o.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Observer {
    fn protocol(&self) -> Protocol {
        if self.v5 { Protocol::V5 } else { Protocol::V311 }
    }

    /// One connection attempt: connect, CONNECT, and SUBSCRIBE every wanted topic. `None`: stopped.
    /// With `auto` not settled yet, a broker that refuses the MQTT 5 CONNECT (a CONNACK code,
    /// or a close before any CONNACK) is asked again at once in 3.1.1: that fallback is the
    /// plan, not a failure. Any other failure (unreachable, TLS, silence) is one.
    async fn connect(&mut self, stop: &CancellationToken) -> Option<Result<RawClient, String>> {
        match self.attempt(stop).await? {
            Err((true, e)) if !self.settled && self.v5 => {
                info!(route = %self.route.name, answer = e.as_str(),
                    "the upstream refused the Will observer's MQTT 5 CONNECT; trying MQTT 3.1.1");
                self.v5 = false;
                self.attempt(stop).await.map(|r| r.map_err(|(_, e)| e))
            }
            result => Some(result.map_err(|(_, e)| e)),
        }
    }

    /// One connection attempt; an error says whether the broker refused the CONNECT.
    async fn attempt(&mut self, stop: &CancellationToken) -> Option<Result<RawClient, (bool, String)>> {
        let route = self.route.clone();
        let dial = Dial {
            addr: &route.upstream,
            tls: route.tls.upstream.as_deref(),
            ws_path: route.upstream_ws.as_deref(),
        };
        let protocol = self.protocol();
        let mut connect = ConnectSpec::new(
            protocol,
            self.client_id.clone(),
            self.keep_alive.as_secs().clamp(1, 65535) as u16,
        );
        connect.username.clone_from(&self.config.username);
        connect.password = self.config.password.as_ref().map(|p| p.as_bytes().to_vec());
        let attempt = async {
            let failed = |e: std::io::Error| (false, e.to_string());
            let mut client = RawClient::open(dial, protocol, CONNECT_WITHIN).await.map_err(failed)?;
            match client.handshake(&connect, Instant::now() + CONNECT_WITHIN).await.map_err(failed)? {
                Handshake::Accepted(_) => Ok(client),
                Handshake::Refused(connack) => {
                    Err((true, format!("CONNECT refused with code {:#04x}", connack.code)))
                }
                Handshake::Closed(ended) => {
                    Err((true, format!("the broker closed the connection before CONNACK ({ended:?})")))
                }
                Handshake::Silent => Err((false, format!("no CONNACK within {CONNECT_WITHIN:?}"))),
            }
        };
        let mut client = match tokio::select! {
            _ = stop.cancelled() => return None,
            r = attempt => r,
        } {
            Ok(client) => client,
            Err(e) => return Some(Err(e)),
        };
        if self.failing || !self.settled {
            info!(route = %self.route.name, protocol = protocol.version(), "Will observer connected");
        }
        // The back-off starts over only once the connection proved itself (its first PINGRESP):
        // a broker that accepts and then drops the observer is retried ever more slowly.
        self.settled = true;
        // A clean session starts without subscriptions: each topic is granted again by its SUBACK.
        self.route.observer.connected([]);
        self.pending.clear();
        for topic in self.topics.clone() {
            if let Err(e) = self.subscribe(&mut client, &topic).await {
                return Some(Err((false, e)));
            }
        }
        Some(Ok(client))
    }

    /// The connection answered a PINGREQ: it works.
    fn stable(&mut self) {
        (self.failing, self.backoff) = (false, FIRST_BACKOFF);
    }

    /// After missed events: every live connection's Will topic on this route is wanted.
    async fn resync(&mut self, mut client: Option<&mut RawClient>) -> Result<(), String> {
        let live: Vec<String> = self
            .registry
            .list()
            .iter()
            .filter(|c| Arc::ptr_eq(&c.route, &self.route))
            .filter_map(|c| c.will().map(|w| w.topic.clone()))
            .collect();
        for topic in live {
            if self.topics.insert(topic.clone())
                && let Some(c) = client.as_deref_mut()
            {
                self.subscribe(c, &topic).await?;
            }
        }
        Ok(())
    }

    fn next_id(&mut self) -> u16 {
        self.packet_id = self.packet_id.checked_add(1).unwrap_or(1);
        self.packet_id
    }

    async fn subscribe(&mut self, client: &mut RawClient, topic: &str) -> Result<(), String> {
        let id = self.next_id();
        self.pending.insert(id, topic.to_string());
        client.send(&encode::subscribe(self.protocol(), id, topic, 0)).await.map_err(|e| e.to_string())
    }

    /// Drops the topics nothing watches any more: a live connection has the topic as its Will,
    /// or the monitor awaits a Will on it.
    async fn prune(&mut self, mut client: Option<&mut RawClient>) -> Result<(), String> {
        let gone: Vec<String> =
            self.topics.iter().filter(|t| !self.registry.is_watched(t)).cloned().collect();
        for topic in gone {
            self.topics.remove(&topic);
            self.route.observer.unsubscribed(&topic);
            if let Some(c) = client.as_deref_mut() {
                let id = self.next_id();
                c.send(&encode::unsubscribe(self.protocol(), id, &topic)).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// A packet from the broker: a PUBLISH on a Will topic, or the answer to a SUBSCRIBE.
    fn received(&mut self, h: crate::codec::FrameHeader, frame: &[u8]) {
        match h.packet_type {
            PacketType::Publish => {
                if let Ok(p) = Publish::decode(frame, &h, self.protocol())
                    && !p.retain
                    && let Some(topic) = self.registry.watched(&p.topic)
                {
                    let route = self.route.name.clone();
                    self.registry.emit(Event::WillTopicPublish { route, topic, at: Instant::now() });
                }
            }
            PacketType::Suback => {
                let at = usize::from(h.header_len);
                let id = frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                let Some(topic) = id.and_then(|id| self.pending.remove(&id)) else { return };
                // The last byte is the one filter's return (3.1.1) or reason (5) code.
                match frame.last() {
                    Some(&code) if code < 0x80 => {
                        if self.topics.contains(&topic) {
                            self.route.observer.subscribed(&topic);
                        }
                    }
                    code => warn!(route = %self.route.name, topic = &*topic,
                        code = format!("{:#04x}", code.copied().unwrap_or_default()),
                        "the broker refused the Will observer's subscription; Wills on this topic are seen only through the proxy"),
                }
            }
            _ => {}
        }
    }

    fn failed(&mut self, error: &str) {
        self.route.observer.disconnected();
        self.route.metrics.on_observer_failure();
        let protocol = self.protocol().version();
        if !self.failing {
            warn!(route = %self.route.name, protocol, %error,
                "Will observer cannot connect or lost its connection; retrying with back-off (1 s doubling to 30 s) until it works");
            self.failing = true;
        } else {
            debug!(route = %self.route.name, protocol, %error, retry_in = ?self.backoff,
                "Will observer failed again");
        }
        if !self.settled {
            self.v5 = !self.v5; // auto: try the other version next
        }
    }
}
