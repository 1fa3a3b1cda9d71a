//! `--observe-wills`: the proxy's own MQTT client on each route's upstream.
//!
//! The subscribers that matter for a Will are often not behind the proxy, so the proxy can
//! subscribe itself: one rumqttc (MQTT 3.1.1) client per route, connected straight to the
//! broker, subscribing to the Will topic of every connection as it learns it (from the CONNECT).
//! What it receives is reported as [`Event::WillTopicPublish`]; the monitor counts each expected
//! Will once, whichever path saw it first. Retained messages (delivered because of the
//! subscription itself) are ignored. Credentials come from flags, env or a file and are never
//! logged.

use crate::record::{Event, Registry};
use crate::route::Route;
use rumqttc::{AsyncClient, ConnectionError, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How the observer connects.
#[derive(Clone, Default)]
pub struct ObserverConfig {
    /// Client id prefix; the route name is appended.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for ObserverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverConfig")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// Splits `host:port` (IPv6 in brackets).
fn host_port(upstream: &str) -> Option<(String, u16)> {
    let (host, port) = upstream.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port.parse().ok()?))
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
    let mut options = MqttOptions::new(client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut events = registry.subscribe();
    let mut topics: BTreeSet<String> = BTreeSet::new();
    info!(route = %route.name, client_id = %client_id, "observing Wills with an own connection to the upstream");
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
            ev = events.recv() => match ev {
                Ok(Event::Connect(conn)) if Arc::ptr_eq(&conn.route, &route) => {
                    if let Some(will) = conn.will()
                        && topics.insert(will.topic.clone())
                    {
                        let _ = client.try_subscribe(will.topic.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => warn!(missed = n, "the Will observer fell behind"),
                Err(RecvError::Closed) => return,
            },
            polled = eventloop.poll() => match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    debug!(route = %route.name, "Will observer connected");
                    // A clean session forgets subscriptions: subscribe again after every connect.
                    for topic in &topics {
                        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) if !p.retain => {
                    registry.emit(Event::WillTopicPublish { route: route.name.clone(), topic: p.topic, at: Instant::now() });
                }
                Ok(_) => {}
                Err(e) => {
                    let detail = match &e {
                        ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                        other => other.to_string(),
                    };
                    warn!(route = %route.name, error = %detail, "Will observer disconnected; retrying in 1 s");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
}
