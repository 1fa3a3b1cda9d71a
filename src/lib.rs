//! mqtt-chaos: an MQTT-aware chaos proxy.
//!
//! It sits between MQTT clients and a broker as a transparent TCP man-in-the-middle, parses
//! both directions on packet boundaries, and records what each side said and when, so that it
//! can tell who noticed a dead peer first and how long it took, as a multiple of Keep Alive.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`codec`] | pure MQTT framing and decoding: bytes in, values out; no I/O, no clock |
//! | [`fault`] | rules as data: schema and validation, profiles, the pure per-connection engine |
//! | [`reload`] | the `--profile` file watched (polled on a thread of its own): a changed version validated and applied as `PUT /profile` does, bad edits logged once and counted |
//! | [`pump`] | one direction of one connection: read, split, inspect, apply verdicts, write runs of packets — the only place bytes leave the proxy |
//! | [`session`] | one connection from accept to close: dial, two pumps, connection actions, FIN/RST propagation, the closed record |
//! | [`server`] | listeners, accept loops, the shutdown tree |
//! | [`record`] | live connection records, the registry of live connections, record events |
//! | [`route`] | a named listener → upstream pair: its address, reachability and Will observer view |
//! | [`metrics`] | every Prometheus family, registered in one place; a route's metrics say what happened (`on_close`, `on_batch`, …); the exposition (Prometheus text or OpenMetrics) |
//! | [`transport`] | a side's byte stream: plain TCP or TLS, with each transport's close semantics |
//! | [`tls`] | certificates and keys read at start, the rustls configurations of listeners and upstreams, handshake facts |
//! | [`tls_stream`] | a TLS session over TCP on rustls' unbuffered API: buffers only while bytes are in flight, `close_notify` semantics |
//! | [`ws`] | MQTT over WebSocket: the handshakes (subprotocol `mqtt`), frames as one byte stream, WebSocket pings counted apart |
//! | [`vocab`] | the shared words: `Direction`, `Side`, `CloseHow`, `Cause`, `CloseInfo`, takeover and Will outcomes, a pump's `Batch` (a leaf) |
//! | [`config`] | settings and the routes file (TOML, errors with `file:line:col`) |
//! | [`probe`] | `mqtt-chaos probe`: scenarios run through the in-process proxy against a broker (or the embedded one), verdicts against the specification, the report |
//! | [`summary`] | the headline numbers per route without Prometheus (`/summary`, `ctl summary`, the log at stop) |
//! | [`cli`] | the command line (clap), every flag with an `MQTT_CHAOS_*` env variable |
//! | [`text`] | peer input written as text: control characters escaped (a leaf) |
//! | [`names`] | the one rule for rule, profile and route names (length, no control characters) |
//!
//! See ARCHITECTURE.md for the data path as a diagram.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod ctl;
pub mod fault;
pub mod metrics;
pub mod monitor;
pub mod names;
pub mod observer;
pub mod probe;
pub mod pump;
pub mod record;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod summary;
pub mod text;
pub mod tls;
pub mod tls_stream;
pub mod transport;
pub mod vocab;
pub mod ws;
