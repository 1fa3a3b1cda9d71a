//! The accept loops and the shutdown tree.
//!
//! [`Proxy::bind`] opens every route's listener (so a bad address fails before anything runs);
//! [`Proxy::start`] spawns one accept loop per route and returns a [`RunningProxy`], whose
//! [`shutdown`](RunningProxy::shutdown) stops accepting, waits up to the grace period for the
//! connections to finish, then closes the rest. With more than one event loop (`--threads N`),
//! every route gets N listeners on its address (`SO_REUSEPORT`) and `start` runs N − 1 of them
//! on threads of their own (`more_loop`); a connection lives on the loop that accepted it.
//!
//! Shutdown tree: `accept_stop` ends the accept loops; `connections` is the parent of every
//! connection's own token (cancelling one connection closes only it); a [`TaskTracker`] knows
//! when every session has finished.

use crate::config::{RouteConfig, Settings};
use crate::fault::{ConnFaults, RuleBook, RuleSet};
use crate::metrics::{Format, Metrics, ScrapeTime};
use crate::pump::Ctx;
use crate::record::Registry;
use crate::route::Route;
use crate::session;
use crate::vocab::CloseHow;
use crate::ws::HeldBytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// A listener that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("route {route:?}: cannot listen on {listen}: {source}")]
pub struct BindError {
    pub route: String,
    pub listen: String,
    #[source]
    pub source: std::io::Error,
}

/// Bound listeners, ready to start.
pub struct Proxy {
    listeners: Vec<(Arc<Route>, TcpListener)>,
    /// With more than one event loop (`--threads`): per further loop, its own listener of each
    /// route on the same address (`SO_REUSEPORT`: the kernel spreads new connections).
    more_loops: Vec<Vec<(Arc<Route>, std::net::TcpListener)>>,
    registry: Arc<Registry>,
    settings: Arc<Settings>,
    rules: Arc<RuleBook>,
    metrics: Arc<Metrics>,
    /// What WebSocket connections hold of unfinished frames, against `--ws-max-held`.
    ws_held: Arc<HeldBytes>,
}

impl Proxy {
    /// Binds every route's listener.
    pub async fn bind(routes: &[RouteConfig], settings: Settings) -> Result<Proxy, BindError> {
        let registry = Arc::new(Registry::new(settings.closed_history));
        let waking = registry.clone();
        let rules = Arc::new(RuleBook::with_waker(Box::new(move |affected| waking.wake(affected))));
        let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
        let ws_held = HeldBytes::new(settings.ws_max_held);
        let metrics =
            Arc::new(Metrics::new(scrape_time(names, rules.clone(), registry.clone(), ws_held.clone())));
        let mut listeners = Vec::with_capacity(routes.len());
        let loops = settings.event_loops.max(1);
        let mut more_loops: Vec<Vec<_>> = (1..loops).map(|_| Vec::new()).collect();
        for r in routes {
            let err = |source| BindError { route: r.name.clone(), listen: r.listen.clone(), source };
            let (listener, more) = if loops == 1 {
                (TcpListener::bind(r.listen.as_str()).await.map_err(err)?, Vec::new())
            } else {
                bind_shared(&r.listen, loops).await.map_err(err)?
            };
            let listen = listener.local_addr().map_err(err)?;
            let route = Route {
                name: r.name.clone(),
                listen,
                upstream: r.upstream.clone(),
                metrics: metrics.route(&r.name),
                reach: Default::default(),
                observer: Default::default(),
                tls: r.tls.clone(),
                listen_ws: r.listen_ws.clone(),
                upstream_ws: r.upstream_ws.clone(),
            };
            let route = Arc::new(route);
            for (lot, l) in more_loops.iter_mut().zip(more) {
                lot.push((route.clone(), l));
            }
            listeners.push((route, listener));
        }
        Ok(Proxy { listeners, more_loops, registry, settings: Arc::new(settings), rules, metrics, ws_held })
    }

    /// Makes `rules` the rules in force (before or after start).
    pub fn set_rules(&self, rules: RuleSet) {
        self.rules.replace(rules);
    }

    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.listeners.iter().map(|(r, _)| r.clone()).collect()
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Spawns the accept loops and the monitor on the current tokio runtime.
    pub fn start(self) -> RunningProxy {
        let monitor_stop = CancellationToken::new();
        let monitor = tokio::spawn(crate::monitor::run(
            self.registry.clone(),
            self.settings.will_timeout,
            monitor_stop.clone(),
        ));
        if let Some(observer) = &self.settings.observe_wills {
            for (route, _) in &self.listeners {
                let (route, registry, stop) = (route.clone(), self.registry.clone(), monitor_stop.clone());
                tokio::spawn(crate::observer::run(route, registry, observer.clone(), stop));
            }
        }
        let accept_stop = CancellationToken::new();
        let connections = CancellationToken::new();
        let tracker = TaskTracker::new();
        let routes = self.routes();
        let limit = self.settings.max_connections;
        let permits = (limit > 0).then(|| Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))));
        let shared = Accepting {
            registry: self.registry.clone(),
            settings: self.settings.clone(),
            connections: connections.clone(),
            tracker: tracker.clone(),
            rules: self.rules.clone(),
            permits,
            ws_held: self.ws_held.clone(),
        };
        let mut accept_loops = Vec::new();
        for (route, listener) in self.listeners {
            let scheme = |tls: bool, ws: bool| match (tls, ws) {
                (false, false) => "mqtt",
                (true, false) => "mqtts",
                (false, true) => "ws",
                (true, true) => "wss",
            };
            info!(route = %route.name, listen = %route.listen, upstream = %route.upstream,
                listen_scheme = scheme(route.tls.listen.is_some(), route.listen_ws.is_some()),
                upstream_scheme = scheme(route.tls.upstream.is_some(), route.upstream_ws.is_some()),
                "listening");
            if route.tls.upstream.as_ref().is_some_and(|t| t.insecure) {
                warn!(route = %route.name, upstream = %route.upstream,
                    "--upstream-insecure: the broker's certificate is not verified (each connection's record says so)");
            }
            if self.settings.probe_upstreams {
                let within = self.settings.connect_timeout;
                tokio::spawn(watch_upstream(route.clone(), within, accept_stop.clone()));
            }
            let acceptor = Acceptor { route, listener, shared: shared.clone() };
            accept_loops.push(tokio::spawn(acceptor.run(accept_stop.clone())));
        }
        let mut loop_threads = Vec::new();
        for (n, listeners) in self.more_loops.into_iter().enumerate() {
            let (shared, stop) = (shared.clone(), accept_stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("mqtt-chaos-l{}", n + 2))
                .spawn(move || more_loop(listeners, shared, stop));
            match spawned {
                Ok(thread) => loop_threads.push(thread),
                // Its listeners are closed with it: the kernel gives their share to the others.
                Err(e) => warn!(error = %e, "cannot start one more event loop; running with fewer"),
            }
        }
        if !loop_threads.is_empty() {
            info!(event_loops = loop_threads.len() + 1, "connections spread over event loops (--threads)");
        }
        RunningProxy {
            routes,
            metrics: self.metrics,
            registry: self.registry,
            settings: self.settings,
            rules: self.rules,
            accept_stop,
            connections,
            tracker,
            accept_loops,
            loop_threads,
            monitor: (monitor, monitor_stop),
        }
    }
}

/// What every accept loop shares.
#[derive(Clone)]
struct Accepting {
    registry: Arc<Registry>,
    settings: Arc<Settings>,
    connections: CancellationToken,
    tracker: TaskTracker,
    rules: Arc<RuleBook>,
    /// `--max-connections`, shared by every route's accept loop (none: no limit).
    permits: Option<Arc<Semaphore>>,
    ws_held: Arc<HeldBytes>,
}

struct Acceptor {
    route: Arc<Route>,
    listener: TcpListener,
    shared: Accepting,
}

impl Acceptor {
    async fn run(self, stop: CancellationToken) {
        let mut errors = AcceptErrors::default();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((socket, peer)) => {
                    errors.succeeded();
                    self.spawn_session(socket, peer)
                }
                Err(e) => {
                    self.route.metrics.on_accept_error();
                    let (pause, log) = errors.failed(Instant::now());
                    if let Some(held_back) = log {
                        warn!(route = %self.route.name, error = %e, more_since_last_line = held_back,
                            "accept failed (repeats are counted in mqtt_chaos_accept_errors_total and logged every 10 s)");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    fn spawn_session(&self, socket: tokio::net::TcpStream, peer: SocketAddr) {
        let limit = self.shared.settings.max_connections;
        let permit = match &self.shared.permits {
            None => None,
            Some(permits) => permits.clone().try_acquire_owned().ok(),
        };
        if self.shared.permits.is_some() && permit.is_none() {
            let rejected = self.route.metrics.on_rejected();
            // The first refusal and every 1000th are warnings; the rest would flood the log.
            if rejected == 1 || rejected % 1000 == 0 {
                warn!(route = %self.route.name, client = %peer, limit, rejected,
                    "connection limit reached (--max-connections): closing new clients at once");
            } else {
                debug!(route = %self.route.name, client = %peer, "connection limit reached; closing the client");
            }
            drop(socket);
            return;
        }
        self.route.metrics.on_accepted();
        let conn = self.shared.registry.open(self.route.clone(), peer, self.shared.connections.child_token());
        let faults = ConnFaults::new(self.shared.rules.subscribe()).with_local(conn.local_rules.subscribe());
        let ctx = Ctx {
            conn,
            registry: self.shared.registry.clone(),
            settings: self.shared.settings.clone(),
            faults: Mutex::new(faults),
            stop: CancellationToken::new(),
            _permit: permit,
            ws_held: self.shared.ws_held.clone(),
        };
        // No tracing span per connection: every log line carries `conn` itself, and a span would
        // keep a slot (with its formatted fields) in the subscriber's slab for every connection
        // ever open at once, scattered through the heap (measured: it kept the heap from
        // shrinking after a burst of 1,000 connections).
        self.shared.tracker.spawn(session::run(ctx, socket));
    }
}

/// Binds `loops` listeners to `listen` with `SO_REUSEPORT`: one for this event loop, the
/// others, unregistered, for the loops to come.
async fn bind_shared(
    listen: &str,
    loops: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    let addr = tokio::net::lookup_host(listen).await?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{listen} resolves to no address"))
    })?;
    let listener = |addr: SocketAddr| {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    // Sockets that all set SO_REUSEPORT share an address, even across processes of one user: a
    // second proxy would silently take half the clients. A plain bind first fails if anything
    // listens there (and picks the port when it is 0); the group then binds what it left free.
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    let first = listener(addr)?;
    let more = (1..loops).map(|_| listener(addr)?.into_std()).collect::<std::io::Result<_>>()?;
    Ok((first, more))
}

/// One more event loop (`--threads`): a current-thread runtime on this thread, accepting on its
/// own listener of each route; the connections it accepts live on it until they end, and it
/// ends when the proxy has stopped accepting and every connection has finished.
fn more_loop(
    listeners: Vec<(Arc<Route>, std::net::TcpListener)>,
    shared: Accepting,
    stop: CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "cannot start one more event loop; running with fewer");
            return;
        }
    };
    runtime.block_on(async move {
        let mut accept_loops = Vec::new();
        for (route, listener) in listeners {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    let acceptor = Acceptor { route, listener, shared: shared.clone() };
                    accept_loops.push(tokio::spawn(acceptor.run(stop.clone())));
                }
                Err(e) => warn!(route = %route.name, error = %e, "an event loop cannot accept on this route"),
            }
        }
        for task in accept_loops {
            let _ = task.await;
        }
        shared.tracker.wait().await;
    });
}

/// What the metrics read from the rules and the registry at each scrape.
fn scrape_time(
    routes: Vec<String>,
    rules: Arc<RuleBook>,
    registry: Arc<Registry>,
    ws_held: Arc<HeldBytes>,
) -> impl Fn() -> ScrapeTime + Send + Sync + 'static {
    move || {
        let rules = rules.current();
        let applies = |route: &String| {
            rules
                .rules
                .iter()
                .filter(|rule| rule.matcher.route.as_ref().is_none_or(|n| n.contains(route)))
                .count() as u64
        };
        ScrapeTime {
            version: env!("CARGO_PKG_VERSION"),
            profile: rules.profile.clone().unwrap_or_default(),
            profile_hash: rules.profile_hash.map(crate::fault::profile::hash_hex).unwrap_or_default(),
            rules_active: routes.iter().map(|r| (r.clone(), applies(r))).collect(),
            tracked_entries: registry.tracked_entries().to_vec(),
            event_subscribers_dropped: registry.events_dropped.load(std::sync::atomic::Ordering::Relaxed),
            websocket_held_bytes: ws_held.held() as u64,
            websocket_held_limit_bytes: ws_held.limit() as u64,
            websocket_reads_paused: ws_held.pauses(),
        }
    }
}

/// How often an unreachable upstream is tried again when no client does it (a proxy behind a
/// Kubernetes Service gets no clients while `/readyz` says not ready).
const RECHECK_UNREACHABLE: Duration = Duration::from_secs(5);

/// Reaches a route's upstream at start, over its whole transport (the TLS and WebSocket
/// handshakes included: a bare TCP connect would make the broker log, and count, a failed
/// handshake), closes cleanly and logs the result: brokers often start late in staging, so an
/// unreachable one is a warning, not a failure (`/readyz` reports it). While the upstream is
/// unreachable it is tried again every [`RECHECK_UNREACHABLE`], so `/readyz` turns ready once the
/// broker is up even when no client comes to find out.
async fn watch_upstream(route: Arc<Route>, within: Duration, stop: CancellationToken) {
    let result = reach(&route, within).await;
    match &result {
        Ok(()) => info!(route = %route.name, upstream = %route.upstream, "upstream reachable"),
        Err(e) => warn!(route = %route.name, upstream = %route.upstream, error = %e,
            "upstream not reachable at start; the proxy runs anyway, closes clients and tries again until it is up"),
    }
    // Logged above in its own words: what `dialed` would log is not needed.
    let _ = route.reach.dialed(result, Instant::now());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECHECK_UNREACHABLE) => {}
        }
        if route.reach.reachable() == Some(false) {
            let result = reach(&route, within).await;
            if route.reach.dialed(result, Instant::now()) == crate::route::ReachLog::Back {
                info!(route = %route.name, upstream = %route.upstream, "the upstream broker is reachable again");
            }
        }
    }
}

/// One connection to the upstream over its whole transport, closed cleanly.
async fn reach(route: &Route, within: Duration) -> Result<(), String> {
    let dial = crate::client::Dial {
        addr: &route.upstream,
        tls: route.tls.upstream.as_deref(),
        ws_path: route.upstream_ws.as_deref(),
    };
    let mut stream = dial.connect(within).await.map_err(|e| e.to_string())?;
    // close_notify under TLS, a Close frame on a WebSocket, then the FIN.
    let _ = tokio::time::timeout(within, tokio::io::AsyncWriteExt::shutdown(&mut stream)).await;
    Ok(())
}

/// A proxy whose accept loops are running.
pub struct RunningProxy {
    routes: Vec<Arc<Route>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    settings: Arc<Settings>,
    rules: Arc<RuleBook>,
    accept_stop: CancellationToken,
    connections: CancellationToken,
    tracker: TaskTracker,
    accept_loops: Vec<JoinHandle<()>>,
    /// The further event loops (`--threads`): each ends when every connection has finished.
    loop_threads: Vec<std::thread::JoinHandle<()>>,
    monitor: (JoinHandle<()>, CancellationToken),
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open when the grace period ended, closed by the proxy.
    pub closed_after_grace: usize,
}

impl RunningProxy {
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// A handle for the admin API.
    pub fn control(&self, profiles_dir: std::path::PathBuf, token: Option<String>) -> crate::admin::Control {
        crate::admin::Control {
            routes: self.routes.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            rules: self.rules.clone(),
            profiles_dir,
            token,
            stopping: self.accept_stop.clone(),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn metrics(&self) -> String {
        self.metrics.encode(Format::Prometheus)
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.current()
    }

    /// Makes `rules` the rules in force, for new and existing connections. Existing connections
    /// pick them up at their next packet boundary.
    pub fn set_rules(&self, rules: RuleSet) {
        self.rules.replace(rules);
    }

    /// Stops accepting, lets open connections finish within the grace period, then closes
    /// whatever is left.
    pub async fn shutdown(self) -> ShutdownReport {
        self.shutdown_or(std::future::pending()).await
    }

    /// [`RunningProxy::shutdown`], but closes what is left as soon as `now` completes (a second
    /// signal) instead of waiting for the end of the grace period.
    pub async fn shutdown_or(self, now: impl Future<Output = ()>) -> ShutdownReport {
        self.accept_stop.cancel();
        for task in self.accept_loops {
            let _ = task.await;
        }
        self.tracker.close();
        let open = self.registry.len();
        if open > 0 {
            info!(open, grace = %humantime::format_duration(self.settings.shutdown_grace),
                "stopped accepting; waiting for open connections to finish");
        }
        let mut report = ShutdownReport { closed_after_grace: 0 };
        let cut_short = tokio::select! {
            done = tokio::time::timeout(self.settings.shutdown_grace, self.tracker.wait()) => match done {
                Ok(()) => None,
                Err(_) => Some("shutdown grace period over; closing the remaining connections"),
            },
            () = now => Some("closing the remaining connections now"),
        };
        if let Some(why) = cut_short {
            let live = self.registry.list();
            report.closed_after_grace = live.len();
            warn!(count = live.len(), "{why}");
            for conn in live {
                conn.end_by_proxy("shutdown", "proxy shutting down".into(), CloseHow::Fin);
            }
            self.connections.cancel();
            self.tracker.wait().await;
        }
        for thread in self.loop_threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Let the monitor take in the last closes before it stops.
        tokio::task::yield_now().await;
        self.monitor.1.cancel();
        let _ = self.monitor.0.await;
        report
    }
}

/// What an accept loop does about failed accepts (typically out of file descriptors): pause
/// 10 ms, doubling up to 1 s while they go on, instead of spinning; log one line per 10 s with
/// the number held back, instead of one per failure.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    log: Throttle,
    pause: Duration,
}

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors { log: Throttle::new(Duration::from_secs(10)), pause: FIRST_PAUSE }
    }
}

impl AcceptErrors {
    pub(crate) fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// One failed accept: how long to pause, and whether to log it (with how many were held back).
    pub(crate) fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        (pause, self.log.hit(now))
    }
}

/// Lets a repeated warning through once per interval and counts the ones held back.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Throttle {
        Throttle { interval, last: None, held_back: 0 }
    }

    /// One more occurrence at `now`: `Some(n)` when it should be logged, with the `n`
    /// occurrences held back since the last line; `None` when it is held back.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
