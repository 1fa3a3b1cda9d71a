//! The probe's Will watcher: one of the proxy's own clients ([`crate::client`]), subscribed
//! straight to the broker, noting when each Will arrives.

use crate::client::{Dial, Handshake, Next, RawClient};
use crate::codec::encode::{self, ConnectSpec};
use crate::codec::{PacketType, Publish};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};

/// Wills (and any other PUBLISH) seen under the probe's topic root, by topic, with the time each
/// arrived. Filled by [`watch`], a subscriber connected straight to the broker.
#[derive(Default)]
pub struct Sightings {
    seen: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

impl Sightings {
    /// When a PUBLISH on `topic` first arrived, waiting for one until `until`.
    pub async fn wait(&self, topic: &str, until: Instant) -> Option<Instant> {
        loop {
            let notified = self.changed.notified();
            if let Some(at) = self.seen.lock().expect("sightings lock").get(topic) {
                return Some(*at);
            }
            if timeout_at(until, notified).await.is_err() {
                return self.seen.lock().expect("sightings lock").get(topic).copied();
            }
        }
    }

    fn note(&self, topic: String) {
        self.seen.lock().expect("sightings lock").entry(topic).or_insert_with(Instant::now);
        self.changed.notify_waiters();
    }
}

/// Subscribes to `filter` on `addr` and notes every PUBLISH in `sightings` until the
/// connection ends. Returns once the SUBACK arrived (the watch is in place), or an error that
/// says why it could not be set up.
pub async fn watch(
    dial: Dial<'_>,
    connect: ConnectSpec,
    filter: &str,
    sightings: Arc<Sightings>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let protocol = connect.protocol;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = RawClient::open(dial, protocol, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
    match c.handshake(&connect, deadline).await.map_err(|e| e.to_string())? {
        Handshake::Accepted(_) => {}
        other => {
            let reason = match &other {
                Handshake::Refused(c) => c.reason_string.as_deref().map(crate::text::escaped),
                _ => None,
            };
            return Err(format!(
                "the Will watcher's CONNECT was not accepted: {}{}",
                super::scenario::refusal(&other),
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
    }
    c.send(&encode::subscribe(protocol, 1, filter, 0)).await.map_err(|e| e.to_string())?;
    loop {
        match c.next(deadline).await {
            Next::Packet(h, frame) if h.packet_type == PacketType::Suback => {
                // The last byte is the one filter's return (3.1.1) or reason (5) code.
                match frame.last() {
                    Some(&code) if code < 0x80 => break,
                    code => {
                        return Err(format!(
                            "the broker refused the Will watcher's subscription to {filter} (SUBACK code {:#04x}); the probe must be allowed to subscribe to the topics it publishes Wills on",
                            code.copied().unwrap_or_default()
                        ));
                    }
                }
            }
            Next::Packet(..) => {}
            Next::Ended(e) => return Err(format!("the broker closed the Will watcher ({e:?})")),
            Next::Quiet => return Err("the Will watcher's SUBSCRIBE was not answered within 10 s".into()),
        }
    }
    // The watcher's CONNECT asks for Keep Alive 60 (some brokers refuse 0): ping every 30 s.
    Ok(tokio::spawn(async move {
        let mut next_ping = Instant::now() + Duration::from_secs(30);
        loop {
            match c.next(next_ping).await {
                Next::Packet(h, frame) if h.packet_type == PacketType::Publish => {
                    if let Ok(p) = Publish::decode(&frame, &h, protocol) {
                        sightings.note(p.topic);
                    }
                }
                Next::Packet(..) => {}
                Next::Quiet => {
                    if c.send(&encode::PINGREQ).await.is_err() {
                        return;
                    }
                    next_ping += Duration::from_secs(30);
                }
                Next::Ended(_) => return,
            }
        }
    }))
}
