//! Real clients (rumqttc, MQTT 3.1.1 and 5.0) talking to a real mosquitto through the proxy.

use crate::harness::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

/// A received message, the same for both protocol versions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// A rumqttc client of either version, its event loop polled in a task.
pub(crate) struct Client {
    v4: Option<rumqttc::AsyncClient>,
    v5: Option<rumqttc::v5::AsyncClient>,
    msgs: mpsc::UnboundedReceiver<Msg>,
    acks: mpsc::UnboundedReceiver<&'static str>,
}

impl Client {
    pub(crate) async fn v4(id: &str, addr: SocketAddr) -> Client {
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            use rumqttc::{Event, Packet};
            while let Ok(ev) = el.poll().await {
                match ev {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = msg_tx.send(Msg {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                            retain: p.retain,
                        });
                    }
                    Event::Incoming(Packet::ConnAck(_)) => drop(ack_tx.send("CONNACK")),
                    Event::Incoming(Packet::SubAck(_)) => drop(ack_tx.send("SUBACK")),
                    Event::Incoming(Packet::PubAck(_)) => drop(ack_tx.send("PUBACK")),
                    Event::Incoming(Packet::PubComp(_)) => drop(ack_tx.send("PUBCOMP")),
                    _ => {}
                }
            }
        });
        let mut c = Client { v4: Some(client), v5: None, msgs, acks };
        c.expect_ack("CONNACK").await;
        c
    }

    pub(crate) async fn v5(id: &str, addr: SocketAddr) -> Client {
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 16);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            use rumqttc::v5::Event;
            use rumqttc::v5::mqttbytes::v5::Packet;
            while let Ok(ev) = el.poll().await {
                match ev {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = msg_tx.send(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                            retain: p.retain,
                        });
                    }
                    Event::Incoming(Packet::ConnAck(_)) => drop(ack_tx.send("CONNACK")),
                    Event::Incoming(Packet::SubAck(_)) => drop(ack_tx.send("SUBACK")),
                    Event::Incoming(Packet::PubAck(_)) => drop(ack_tx.send("PUBACK")),
                    Event::Incoming(Packet::PubComp(_)) => drop(ack_tx.send("PUBCOMP")),
                    _ => {}
                }
            }
        });
        let mut c = Client { v4: None, v5: Some(client), msgs, acks };
        c.expect_ack("CONNACK").await;
        c
    }

    pub(crate) async fn expect_ack(&mut self, what: &str) {
        let got = tokio::time::timeout(WAIT, self.acks.recv()).await.unwrap_or_else(|_| panic!("no {what}"));
        assert_eq!(got, Some(what));
    }

    pub(crate) async fn subscribe(&mut self, filter: &str) {
        if let Some(c) = &self.v4 {
            c.subscribe(filter, rumqttc::QoS::ExactlyOnce).await.unwrap();
        } else if let Some(c) = &self.v5 {
            c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::ExactlyOnce).await.unwrap();
        }
        self.expect_ack("SUBACK").await;
    }

    pub(crate) async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        if let Some(c) = &self.v4 {
            let q = rumqttc::qos(qos).unwrap();
            c.publish(topic, q, retain, payload.to_vec()).await.unwrap();
        } else if let Some(c) = &self.v5 {
            let q = rumqttc::v5::mqttbytes::qos(qos).unwrap();
            c.publish(topic, q, retain, payload.to_vec()).await.unwrap();
        }
        match qos {
            1 => self.expect_ack("PUBACK").await,
            2 => self.expect_ack("PUBCOMP").await,
            _ => {}
        }
    }

    pub(crate) async fn next_msg(&mut self) -> Msg {
        self.next_msg_within(WAIT).await
    }

    pub(crate) async fn next_msg_within(&mut self, within: Duration) -> Msg {
        tokio::time::timeout(within, self.msgs.recv())
            .await
            .unwrap_or_else(|_| panic!("no message arrived within {within:?}"))
            .expect("client ended")
    }
}

async fn publish_and_subscribe_at_every_qos(v5: bool) {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let new = |id: &'static str| async move {
        if v5 { Client::v5(id, proxy.addr).await } else { Client::v4(id, proxy.addr).await }
    };
    let mut sub = new("sub").await;
    sub.subscribe("t/#").await;
    let mut publ = new("pub").await;
    for qos in 0..=2u8 {
        let payload = format!("qos {qos} through the proxy");
        publ.publish(&format!("t/{qos}"), qos, false, payload.as_bytes()).await;
        let got = sub.next_msg().await;
        let want = Msg { topic: format!("t/{qos}"), payload: payload.into_bytes(), qos, retain: false };
        assert_eq!(got, want);
    }

    // A retained message reaches a subscriber that arrives later, flagged as retained.
    publ.publish("r/state", 1, true, b"on").await;
    let mut late = new("late").await;
    late.subscribe("r/#").await;
    let got = late.next_msg().await;
    assert_eq!((got.topic.as_str(), got.payload.as_slice(), got.retain), ("r/state", &b"on"[..], true));

    let live = proxy.running().registry().list();
    assert_eq!(live.len(), 3, "three clients are live through the proxy");
    let protocols: Vec<_> = live.iter().map(|c| c.protocol().map(|p| p.level())).collect();
    assert!(protocols.iter().all(|&p| p == Some(if v5 { 5 } else { 4 })), "{protocols:?}");
}

#[tokio::test]
async fn mqtt311_clients_publish_and_subscribe_at_qos_0_1_2_and_retain() {
    publish_and_subscribe_at_every_qos(false).await;
}

#[tokio::test]
async fn mqtt5_clients_publish_and_subscribe_at_qos_0_1_2_and_retain() {
    publish_and_subscribe_at_every_qos(true).await;
}

#[tokio::test]
async fn will_is_published_when_a_client_behind_the_proxy_is_killed() {
    let broker = Mosquitto::start();
    // The upstream is given by host name; it is resolved at every dial.
    let mut proxy = TestProxy::start(&format!("localhost:{}", broker.port)).await;
    // The watcher connects to the broker directly, as a real backend would.
    let direct: SocketAddr = broker.addr().parse().unwrap();
    let mut watcher = Client::v4("watcher", direct).await;
    watcher.subscribe("status/#").await;

    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("device-7", 30, Some(("status/device-7", "offline")))).await.unwrap();
    let connack = expect_packet(&mut device, WAIT, "CONNACK").await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // Killed: the socket closes without a DISCONNECT.
    drop(device);

    let will = watcher.next_msg().await;
    assert_eq!((will.topic.as_str(), will.payload.as_slice()), ("status/device-7", &b"offline"[..]));
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!(conn.client_id().as_deref(), Some("device-7"));
    assert_eq!(conn.will().map(|w| w.topic), Some("status/device-7".to_string()));
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "fin"));
}
