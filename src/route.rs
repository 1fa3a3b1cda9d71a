//! A route: one listener forwarding to one upstream broker, and its counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Route-wide counters, updated by sessions and read by the metrics.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// Directions switched to raw relay or closed because their bytes were not MQTT,
    /// indexed client_to_broker, broker_to_client.
    pub malformed: [AtomicU64; 2],
    /// Fault applications by (rule, action, direction); `direction` is `both` for actions on the
    /// whole connection. Written once per applied fault, never per forwarded packet.
    pub faults: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
}

impl RouteStats {
    /// How often `rule` was applied on this route, summed over directions.
    pub fn fault_count(&self, rule: &str) -> u64 {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.iter().filter(|((r, _, _), _)| r == rule).map(|(_, n)| n).sum()
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
