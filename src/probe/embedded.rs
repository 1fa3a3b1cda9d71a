//! The embedded broker of `mqtt-chaos probe` without `--broker`: rumqttd, a maintained MQTT
//! 3.1.1 and 5 broker used as a library, on free loopback ports (feature `embedded-broker`).
//!
//! rumqttd serves MQTT 3.1.1 and MQTT 5 on separate listeners, runs its router and listeners on
//! threads of its own, cannot be stopped and does not report the ports it bound. So the probe
//! picks two free ports, starts it on a thread named `mqtt-chaos-broker` that lives as long as
//! the process, and waits until both ports accept connections.

use std::net::SocketAddr;

/// The crate and version, for the report's header.
pub const IMPLEMENTATION: &str = "rumqttd 0.20";

/// A running embedded broker.
pub struct Embedded {
    /// Its MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// Its MQTT 5 listener.
    pub v5: SocketAddr,
}

#[cfg(feature = "embedded-broker")]
pub use with_rumqttd::start;

#[cfg(feature = "embedded-broker")]
mod with_rumqttd {
    use super::Embedded;
    use crate::codec::Protocol;
    use crate::codec::encode::ConnectSpec;
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// Starts rumqttd and waits until both its listeners answer a CONNECT. rumqttd cannot
    /// report a failed bind: should another program take a port in the moment between its
    /// release and rumqttd's bind (a listener on 0.0.0.0 takes that port on every address), the
    /// answer is not a CONNACK, and the broker is started again on other ports.
    pub fn start() -> Result<Embedded, String> {
        let mut last = String::new();
        for _attempt in 0..3 {
            match start_once() {
                Ok(embedded) => return Ok(embedded),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_once() -> Result<Embedded, String> {
        // Two distinct free ports, held until just before rumqttd binds them, on a loopback
        // address of this process's own: a port freed for rumqttd is not taken meanwhile by
        // something else on 127.0.0.1 (rumqttd binds by address and cannot report a failure).
        let ip = own_loopback_address();
        let free = || {
            std::net::TcpListener::bind((ip, 0))
                .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .map_err(|e| format!("no free loopback port for the embedded broker: {e}"))
        };
        let held = [free()?, free()?];
        let port = |i: usize| held[i].local_addr().map_err(|e| format!("no free loopback port: {e}"));
        let (v4, v5): (SocketAddr, SocketAddr) = (port(0)?, port(1)?);
        let server = |name: &str, listen: SocketAddr| ServerSettings {
            name: name.to_string(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 5_000,
                max_payload_size: 256 * 1024,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            // rumqttd's default of 0 connections refuses every client.
            router: RouterConfig {
                max_connections: 10_000,
                max_outgoing_packet_count: 200,
                max_segment_size: 1024 * 1024,
                max_segment_count: 10,
                ..Default::default()
            },
            v4: Some(HashMap::from([("v4".to_string(), server(V4_THREAD, v4))])),
            v5: Some(HashMap::from([("v5".to_string(), server(V5_THREAD, v5))])),
            ..Default::default()
        };
        quiet_broker_panics();
        drop(held);
        std::thread::Builder::new()
            .name(BROKER_THREAD.into())
            .spawn(move || {
                if let Err(e) = Broker::new(config).start() {
                    tracing::error!(error = %e, "the embedded broker stopped");
                }
            })
            .map_err(|e| format!("cannot start a thread for the embedded broker: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (addr, protocol) in [(v4, Protocol::V311), (v5, Protocol::V5)] {
            loop {
                match answers_connect(addr, protocol) {
                    Ok(true) => break,
                    Ok(false) => {
                        return Err(format!("another program answers on {addr}, not the embedded broker"));
                    }
                    Err(_) if std::time::Instant::now() > deadline => {
                        return Err(format!("the embedded broker did not open {addr} within 10 s"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(Embedded { v4, v5 })
    }

    /// Whether `addr` answers a CONNECT with a CONNACK (`Err`: nothing accepts there yet).
    fn answers_connect(addr: SocketAddr, protocol: Protocol) -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(&ConnectSpec::new(protocol, "mqtt-chaos-probe-ready", 10).encode())?;
        let mut first = [0u8; 1];
        let answered = s.read(&mut first).map(|n| n == 1 && first[0] == 0x20).unwrap_or(false);
        let _ = s.write_all(&crate::codec::encode::disconnect(protocol, 0));
        Ok(answered)
    }

    /// rumqttd names each listener's thread after its server, and its router `router-0`.
    const V4_THREAD: &str = "rumqttd-v4";
    const V5_THREAD: &str = "rumqttd-v5";
    const BROKER_THREAD: &str = "mqtt-chaos-broker";

    /// 127.x.y.z, picked from the process id and the clock (all of 127.0.0.0/8 is loopback
    /// on Linux; elsewhere binding it fails and 127.0.0.1 is used).
    fn own_loopback_address() -> std::net::Ipv4Addr {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let bits = std::process::id().wrapping_mul(2_654_435_761) ^ clock;
        let [a, b, c, _] = bits.to_be_bytes();
        std::net::Ipv4Addr::new(127, a.max(1), b, c.clamp(1, 254))
    }

    /// rumqttd 0.20 panics in a connection's task on some inputs (e.g. a v4 connection taken over:
    /// "This branch only matches for packets with Properties"); tokio ends that task, and the
    /// probe reports what the client saw. The panic message is logged at debug level instead of
    /// printed over the report; panics on any other thread go to the previous hook.
    fn quiet_broker_panics() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or_default();
            if [V4_THREAD, V5_THREAD, BROKER_THREAD].contains(&name) || name.starts_with("router-") {
                tracing::debug!(target: "mqtt_chaos::probe::embedded", thread = name, panic = %info, "the embedded broker panicked");
            } else {
                previous(info);
            }
        }));
    }
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start() -> Result<Embedded, String> {
    Err("this build has no embedded broker (feature `embedded-broker`): pass --broker URL".into())
}
