//! A route: one listener forwarding to one upstream broker, and its counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Route-wide counters, updated by sessions and read by the metrics.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// Directions switched to raw relay or closed because their bytes were not MQTT,
    /// indexed client_to_broker, broker_to_client.
    pub malformed: [AtomicU64; 2],
}

impl RouteStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// A named listener → upstream pair.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    /// `host:port`, resolved at every dial so DNS changes are followed.
    pub upstream: String,
    pub stats: RouteStats,
}
