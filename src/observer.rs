//! `--observe-wills`: the proxy's own MQTT client on each route's upstream.
//!
//! The subscribers that matter for a Will are often not behind the proxy, so the proxy can
//! subscribe itself: one rumqttc client per route, connected straight to the broker,
//! subscribing to the Will topic of every connection as it learns it (from the CONNECT).
//! What it receives is reported as [`Event::WillTopicPublish`]; the monitor counts each expected
//! Will once, whichever path saw it first, and asks [`crate::route::ObserverView`] whether the
//! observer was watching a Will that never came. Retained messages (delivered because of the
//! subscription itself) are ignored. Every [`PRUNE_EVERY`] it unsubscribes from the topics no
//! live connection and no awaited Will needs any more, so a fleet that churns Will topics does
//! not grow its subscriptions for ever. Credentials come from flags, env or a file and are never
//! logged.
//!
//! It speaks MQTT 5 or 3.1.1 (`--observer-protocol`; `auto` tries 5 first and falls back to
//! 3.1.1 while 5 fails, and keeps what worked). Failed connections are retried after 1 s,
//! doubling to 30 s, counted, and logged once per change between connected and failing.

use crate::record::{Event, Registry};
use crate::route::Route;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::{Event as Event4, MqttOptions, Packet as Packet4, QoS};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
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
}

impl std::fmt::Debug for ObserverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverConfig")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Splits `host:port` (IPv6 in brackets).
fn host_port(upstream: &str) -> Option<(String, u16)> {
    let (host, port) = upstream.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port.parse().ok()?))
}

/// The request side of an MQTT client of either version.
enum Requests {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The connection side (rumqttc's event loop), polled by the observer's loop. A poll must not be
/// dropped halfway: that would abandon a connection attempt and start another.
enum Connection {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What one poll of a client gave.
enum Polled {
    Connected,
    /// A non-retained PUBLISH on this topic.
    Publish(String),
    Other,
}

fn client(
    v5: bool,
    client_id: &str,
    host: &str,
    port: u16,
    config: &ObserverConfig,
) -> (Requests, Connection) {
    let (user, password) = match &config.username {
        Some(u) => (Some(u.clone()), config.password.clone().unwrap_or_default()),
        None => (None, String::new()),
    };
    if v5 {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(30)).set_clean_start(true);
        if let Some(user) = user {
            o.set_credentials(user, password);
        }
        let (c, l) = rumqttc::v5::AsyncClient::new(o, 64);
        (Requests::V5(c), Connection::V5(Box::new(l)))
    } else {
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true);
        if let Some(user) = user {
            o.set_credentials(user, password);
        }
        let (c, l) = rumqttc::AsyncClient::new(o, 64);
        (Requests::V311(c), Connection::V311(Box::new(l)))
    }
}

impl Requests {
    fn version(&self) -> &'static str {
        match self {
            Requests::V311(_) => "3.1.1",
            Requests::V5(_) => "5",
        }
    }

    fn subscribe(&self, topic: &str) {
        // A full request queue loses nothing that matters: every topic is subscribed again
        // at the next connect.
        let _ = match self {
            Requests::V311(c) => c.try_subscribe(topic, QoS::AtLeastOnce).map_err(|_| ()),
            Requests::V5(c) => c.try_subscribe(topic, QoS5::AtLeastOnce).map_err(|_| ()),
        };
    }

    fn unsubscribe(&self, topic: &str) {
        // Lost in a full queue, the subscription goes at the next connect (clean session).
        let _ = match self {
            Requests::V311(c) => c.try_unsubscribe(topic).map_err(|_| ()),
            Requests::V5(c) => c.try_unsubscribe(topic).map_err(|_| ()),
        };
    }

    fn disconnect(&self) {
        let _ = match self {
            Requests::V311(c) => c.try_disconnect().map_err(|_| ()),
            Requests::V5(c) => c.try_disconnect().map_err(|_| ()),
        };
    }
}

impl Connection {
    async fn poll(&mut self) -> Result<Polled, String> {
        Ok(match self {
            Connection::V311(l) => match l.poll().await.map_err(|e| e.to_string())? {
                Event4::Incoming(Packet4::ConnAck(_)) => Polled::Connected,
                Event4::Incoming(Packet4::Publish(p)) if !p.retain => Polled::Publish(p.topic),
                _ => Polled::Other,
            },
            Connection::V5(l) => match l.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(_)) => Polled::Connected,
                rumqttc::v5::Event::Incoming(Packet5::Publish(p)) if !p.retain => {
                    Polled::Publish(String::from_utf8_lossy(&p.topic).into_owned())
                }
                _ => Polled::Other,
            },
        })
    }
}

/// Runs the observer of one route until `stop`.
pub async fn run(
    route: Arc<Route>,
    registry: Arc<Registry>,
    config: ObserverConfig,
    stop: CancellationToken,
) {
    let Some((host, port)) = host_port(&route.upstream) else { return };
    let client_id = format!("{}{}", config.client_id, route.name);
    // In `auto`, which version to try next; fixed once one worked.
    let mut v5 = config.protocol != ObserverProtocol::V311;
    let mut settled = config.protocol != ObserverProtocol::Auto;
    let (mut requests, mut connection) = client(v5, &client_id, &host, port, &config);
    let mut events = registry.subscribe();
    let mut topics: BTreeSet<String> = BTreeSet::new();
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(route = %route.name, client_id = %client_id, protocol = ?config.protocol,
        "observing Wills with an own connection to the upstream");
    loop {
        // Learn Will topics while the poll runs; the poll itself is never interrupted.
        let polled = {
            let poll = connection.poll();
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        requests.disconnect();
                        return;
                    }
                    polled = &mut poll => break polled,
                    _ = prune.tick() => {
                        // A topic is watched while a live connection has it as its Will, or
                        // while the monitor awaits a Will on it.
                        topics.retain(|topic| {
                            let keep = registry.is_watched(topic);
                            if !keep {
                                requests.unsubscribe(topic);
                                route.observer.unsubscribed(topic);
                            }
                            keep
                        });
                    }
                    ev = events.recv() => match ev {
                        Ok(Event::Connect(conn)) if Arc::ptr_eq(&conn.route, &route) => {
                            if let Some(will) = conn.will()
                                && topics.insert(will.topic.clone())
                            {
                                requests.subscribe(&will.topic);
                                route.observer.subscribed(&will.topic);
                            }
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => warn!(missed = n, "the Will observer fell behind"),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        };
        match polled {
            Ok(Polled::Connected) => {
                if failing || !settled {
                    info!(route = %route.name, protocol = requests.version(), "Will observer connected");
                }
                (failing, settled, backoff) = (false, true, FIRST_BACKOFF);
                // A clean session forgets subscriptions: subscribe again after every connect.
                for topic in &topics {
                    requests.subscribe(topic);
                }
                route.observer.connected(topics.iter().cloned());
            }
            Ok(Polled::Publish(topic)) => {
                registry.emit(Event::WillTopicPublish {
                    route: route.name.clone(),
                    topic,
                    at: Instant::now(),
                });
            }
            Ok(Polled::Other) => {}
            Err(error) => {
                route.observer.disconnected();
                route.metrics.on_observer_failure();
                if !failing {
                    warn!(route = %route.name, protocol = requests.version(), %error,
                        "Will observer cannot connect or lost its connection; retrying with back-off (1 s doubling to 30 s) until it works");
                    failing = true;
                } else {
                    debug!(route = %route.name, protocol = requests.version(), %error, retry_in = ?backoff,
                        "Will observer failed again");
                }
                if !settled {
                    v5 = !v5; // auto: try the other version next
                    (requests, connection) = client(v5, &client_id, &host, port, &config);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
