//! End-to-end tests: the proxy between real mosquitto brokers, real MQTT client libraries,
//! raw sockets and scripted fake brokers. mosquitto must be installed (`apt-get install -y
//! mosquitto`); without it these tests fail with that instruction.

mod admin;
mod check;
mod cli;
mod cluster;
mod ctl;
mod dashboard;
mod deploy;
mod faults;
mod hardening;
mod harness;
mod history;
mod interop;
mod keepalive;
mod large;
mod lifecycle;
mod metrics;
mod peer_bounds;
mod probe;
mod pubsub;
mod readme;
mod reload;
mod robust;
mod soak;
mod tls;
mod transports;
mod truth;
mod wills;
mod wire;
mod ws;
