//! The admin HTTP API (axum on hyper), bound to loopback by default.
//!
//! | route | does |
//! |---|---|
//! | `GET /healthz` | 200 `{"status":"ok"}` while the listeners are up, 503 `{"status":"shutting_down"}` once a shutdown began (never needs the token) |
//! | `GET /readyz` | 200 `{"status":"ready",…}` when every route's last dial of its upstream succeeded, else 503 `not_ready`; per route `reachable` and `last_error`; the active `profile` and its `profile_hash` (null without one; a profile never makes the proxy unready) (never needs the token) |
//! | `GET /metrics` | Prometheus text format, every metric of METRICS.md |
//! | `GET /connections?state=live\|closed\|all` | connection records (JSON, never passwords or usernames): live ones (default) with their `local_rules` and `state` (`connecting`, `live`, `refused`, `closing` with a `state_detail`), and/or the last `--closed-history` closed ones (oldest first) with their close `cause` |
//! | `GET /connections/{id}` | one record, with its `local_rules`; 404 if it is not live |
//! | `DELETE /connections/{id}?how=fin\|rst` | close one connection (default `fin`) |
//! | `GET /rules` | the rules in force: `{"profile", "seed", "rules": [...]}` |
//! | `POST /rules` | add one global rule (the profile rule schema, as JSON); 409 if the name is taken |
//! | `DELETE /rules/{name}` | remove one global rule; 404 if there is none |
//! | `POST /connections/{id}/rules` | add a rule for one live connection only |
//! | `DELETE /connections/{id}/rules/{name}` | remove a rule of one live connection; 404 if it has none of that name |
//! | `GET /profiles` | the profiles in `--profiles-dir` and the built-in ones (`source`), each with its description or its error |
//! | `PUT /profile` | activate a profile: `{"name": "…"}` (from `--profiles-dir`, else built in) or a TOML body; its rules replace every global rule, and the answer (the new rules) names those it `replaced` |
//! | `GET /events?conn=ID&client_id=GLOB` | Server-Sent Events as things happen: `connect`, `connack`, `fault` (a rule's first application on a connection), `closed`, `detection`, `will`, `rules` (the filters pick connections; rule changes always pass); a subscriber that falls behind is dropped and counted |
//! | `GET /summary` | per route: connections, closes, detections (count, median and max × Keep Alive), Wills, takeovers, faults by rule |
//! | `POST /reset` | remove every rule, global and per-connection: back to passthrough; says how many of each |
//!
//! Every change to the rules is atomic: concurrent requests take effect in some serial order and
//! none is lost (see [`crate::fault::RuleBook`]).
//!
//! Errors are JSON `{"error": "…", "status": N}` (validation errors also name the `field`):
//! 400, 404, 409, 413 (bodies over 1 MiB), 401 when `--admin-token` is set and the
//! `Authorization: Bearer` header is missing or wrong, 408 when a request is not complete
//! within [`REQUEST_TIMEOUT`] of its headers (a body dripping in).
//!
//! Authentication ([`require_token`]): with a token, every route needs `Authorization: Bearer
//! TOKEN` (compared in constant time) but `/healthz` and `/readyz`, which a kubelet probes
//! without headers and which tell nothing about connections or rules. `/metrics` needs it too (a
//! Prometheus scrape sends it with `authorization`/`bearer_token_file`). Whether the API may
//! run without a token is decided at start (`cli::ProxyArgs::admin_token`): only on loopback,
//! unless `--admin-allow-no-token`.
//!
//! [`serve`] runs the API over HTTP/1.1: a client gets [`HEADER_TIMEOUT`] to send its request
//! headers before the connection is closed, so stalled clients cannot pile up.

use crate::fault::{Profile, RuleSet, RuleSpec, profile};
use crate::record::Registry;
use crate::route::Route;
use crate::vocab::CloseHow;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Time a client has to send a request's headers, from the connection's start or the end of
/// its previous request; then the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time from a request's headers to its response, the body upload included; then 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// At a stop, how long a streaming response (`GET /events`) may go on before it is cut.
const STREAM_CUTOFF: Duration = Duration::from_secs(1);

/// What the API acts on: a handle to the running proxy.
#[derive(Clone)]
pub struct Control {
    pub routes: Vec<Arc<Route>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub rules: Arc<crate::fault::RuleBook>,
    pub profiles_dir: PathBuf,
    pub token: Option<String>,
    /// Cancelled when the proxy begins to shut down (`/healthz` then answers 503).
    pub stopping: CancellationToken,
}

impl Control {
    fn rule_set(&self) -> Arc<RuleSet> {
        self.rules.current()
    }
}

/// An API error: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), field: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "status": self.status.as_u16()});
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body over the {BODY_LIMIT}-byte limit")
        } else {
            r.body_text()
        };
        ApiError::new(status, message)
    }
}

impl From<crate::fault::RuleError> for ApiError {
    fn from(e: crate::fault::RuleError) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, field: Some(e.path.clone()), message: e.to_string() }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, body: Value) -> ApiResult {
    Ok((status, axum::Json(body)).into_response())
}

/// The API as a router, testable without a socket.
pub fn app(control: Control) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/connections", get(connections))
        .route("/connections/{id}", get(connection).delete(kill))
        .route("/connections/{id}/rules", post(add_connection_rule))
        .route("/connections/{id}/rules/{name}", delete(remove_connection_rule))
        .route("/rules", get(rules).post(add_rule))
        .route("/rules/{name}", delete(remove_rule))
        .route("/profiles", get(profiles))
        .route("/profile", put(activate_profile))
        .route("/reset", post(reset))
        .route("/summary", get(summary))
        .route("/events", get(events))
        .route_layer(middleware::from_fn_with_state(control.clone(), require_token))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see GET /healthz, /metrics, /connections, /rules, /profiles",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(deadline))
        .with_state(control)
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets the requests in flight finish
/// (each is bounded by [`REQUEST_TIMEOUT`]).
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let connections = TaskTracker::new();
    let mut errors = crate::server::AcceptErrors::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    errors.succeeded();
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors, typically: pause instead of spinning, log rarely.
                    let (pause, log) = errors.failed(tokio::time::Instant::now());
                    if let Some(held_back) = log {
                        tracing::warn!(error = %e, more_since_last_line = held_back,
                            "admin API: accept failed (logged every 10 s while it lasts)");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    // A response still streaming (`GET /events`) would hold the stop for ever.
                    tokio::time::timeout(STREAM_CUTOFF, conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = ended {
                tracing::debug!(client = %peer, error = %e, "admin API connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Answers 408 for a request not complete within [`REQUEST_TIMEOUT`] (its body still arriving)
/// and closes the connection.
async fn deadline(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let message = format!(
                "request not complete within {} s of its headers (body too slow)",
                REQUEST_TIMEOUT.as_secs()
            );
            let mut response = ApiError::new(StatusCode::REQUEST_TIMEOUT, message).into_response();
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            response
        }
    }
}

/// 200 while the listeners accept clients; 503 once a shutdown began.
async fn healthz(State(c): State<Control>) -> Response {
    if c.stopping.is_cancelled() {
        let body = json!({"status": "shutting_down"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

/// 200 when every route's last dial of its upstream succeeded, else 503; per route what the
/// last dial gave (`reachable` is null before the first).
async fn readyz(State(c): State<Control>) -> Response {
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            let (listen, upstream) = r.transports();
            json!({
                "route": r.name,
                "upstream": r.upstream,
                "listen_transport": listen,
                "upstream_transport": upstream,
                "reachable": r.reach.reachable(),
                "last_error": r.reach.last_error(),
            })
        })
        .collect();
    let ready = c.routes.iter().all(|r| r.reach.reachable() == Some(true));
    let (status, word) =
        if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not_ready") };
    // Which version of which profile this proxy runs (a fleet is compared on these).
    let set = c.rule_set();
    let hash = set.profile_hash.map(profile::hash_hex);
    let body = json!({"status": word, "routes": routes, "profile": set.profile, "profile_hash": hash});
    (status, axum::Json(body)).into_response()
}

async fn require_token(State(c): State<Control>, request: Request, next: Next) -> Response {
    if let Some(token) = &c.token {
        // `Bearer` is case-insensitive (RFC 9110 §11.1), and may be followed by several spaces.
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let mut refused =
                ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong `Authorization: Bearer` token")
                    .into_response();
            // RFC 6750 §3: a 401 names the scheme it wants.
            refused
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return refused;
        }
    }
    next.run(request).await
}

/// Whether `given` equals `token`, in a time that depends on `given`'s length only: every byte
/// of `given` is compared (with the token's, cycled), so neither where they differ nor the
/// token's length shows in how long a refusal takes.
fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    if token.is_empty() {
        return given.is_empty();
    }
    let mut differ = u8::from(given.len() != token.len());
    for (i, g) in given.iter().enumerate() {
        differ |= g ^ token[i % token.len()];
    }
    std::hint::black_box(differ) == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFilter {
    /// Only this connection.
    conn: Option<u64>,
    /// Only connections whose client id matches this glob.
    client_id: Option<String>,
}

/// Server-Sent Events: what happens, as it happens (see [`event_json`]). A subscriber that falls
/// more than the event backlog behind is dropped (its stream ends) and counted; it may reconnect.
async fn events(
    State(c): State<Control>,
    query: Result<Query<EventFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    let Query(filter) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let rx = c.registry.subscribe();
    let registry = c.registry.clone();
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let (registry, conn, client_id) = (registry.clone(), filter.conn, filter.client_id.clone());
        async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let Some((kind, data)) = crate::record::event_json(&ev) else { continue };
                        // The filters pick connections; rule changes concern them all.
                        let id = data["conn"].as_u64();
                        let wanted = id.is_none()
                            || conn.is_none_or(|c| id == Some(c))
                                && client_id.as_ref().is_none_or(|g| {
                                    data["client_id"]
                                        .as_str()
                                        .is_some_and(|cid| crate::fault::rule::glob(g, cid))
                                });
                        if wanted {
                            let event = Sse::default().event(kind).data(data.to_string());
                            return Some((Ok::<_, std::convert::Infallible>(event), rx));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        registry.events_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(missed, "an /events subscriber fell behind and was dropped");
                        return None;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn summary(State(c): State<Control>) -> ApiResult {
    ok(StatusCode::OK, crate::summary::of(&c.routes))
}

/// The Prometheus text format, or OpenMetrics when the scraper's `Accept` asks for it.
async fn metrics(State(c): State<Control>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::negotiate(accept);
    ([(header::CONTENT_TYPE, format.content_type())], c.metrics.encode(format)).into_response()
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("connection id {id:?} is not a number")))
}

fn live(c: &Control, id: &str) -> Result<Arc<crate::record::Connection>, ApiError> {
    let id = parse_id(id)?;
    c.registry.get(id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no live connection {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsQuery {
    /// `live` (default), `closed` or `all`.
    state: Option<String>,
}

async fn connections(
    State(c): State<Control>,
    query: Result<Query<ConnectionsQuery>, QueryRejection>,
) -> ApiResult {
    let query = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (live, closed) = match query.state.as_deref().unwrap_or("live") {
        "live" => (true, false),
        "closed" => (false, true),
        "all" => (true, true),
        other => {
            let why = format!("state {other:?} is not one of live, closed, all");
            return Err(ApiError {
                field: Some("state".into()),
                ..ApiError::new(StatusCode::BAD_REQUEST, why)
            });
        }
    };
    let mut all: Vec<Value> = Vec::new();
    if closed {
        // Closed records carry no local rules: they went with the connection.
        all.extend(c.registry.closed());
    }
    if live {
        all.extend(c.registry.list().iter().map(|conn| record(conn)));
    }
    ok(StatusCode::OK, json!(all))
}

async fn connection(State(c): State<Control>, Path(id): Path<String>) -> ApiResult {
    let conn = live(&c, &id)?;
    ok(StatusCode::OK, record(&conn))
}

/// A connection's record with the rules added for it alone (`local_rules`).
fn record(conn: &crate::record::Connection) -> Value {
    let mut body = json!(conn.snapshot());
    body["local_rules"] = json!(conn.local_rules().iter().map(|r| &r.spec).collect::<Vec<_>>());
    body
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillQuery {
    how: Option<String>,
}

async fn kill(
    State(c): State<Control>,
    Path(id): Path<String>,
    query: Result<Query<KillQuery>, QueryRejection>,
) -> ApiResult {
    let query = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let how = match query.how.as_deref().unwrap_or("fin") {
        "fin" => CloseHow::Fin,
        "rst" => CloseHow::Rst,
        other => {
            return Err(ApiError {
                field: Some("how".into()),
                ..ApiError::new(StatusCode::BAD_REQUEST, format!("how must be fin or rst, not {other:?}"))
            });
        }
    };
    let conn = live(&c, &id)?;
    conn.kill(how, "closed through the admin API");
    tracing::info!(conn = conn.id, how = %how.as_str(), "connection closed through the admin API");
    ok(StatusCode::OK, json!({"closed": conn.id, "how": how.as_str()}))
}

fn rules_body(set: &RuleSet) -> Value {
    json!({
        "profile": set.profile,
        "seed": set.seed,
        "rules": set.rules.iter().map(|r| &r.spec).collect::<Vec<_>>(),
    })
}

async fn rules(State(c): State<Control>) -> ApiResult {
    ok(StatusCode::OK, rules_body(&c.rule_set()))
}

/// Parses one rule from a JSON body and validates it.
fn rule_from(body: Result<Bytes, BytesRejection>) -> Result<Arc<crate::fault::Rule>, ApiError> {
    let body = body?;
    let spec: RuleSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not a valid rule: {e}")))?;
    Ok(Arc::new(spec.compile("rule")?))
}

async fn add_rule(State(c): State<Control>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let rule = rule_from(body)?;
    let added = c.rules.add(rule).map_err(|rule| {
        ApiError::new(StatusCode::CONFLICT, format!("a rule named {:?} is already in force", rule.name()))
    })?;
    let rule = added.rules.last().expect("just added");
    c.registry.emit(crate::record::Event::Rules { change: format!("rule {:?} added", rule.name()) });
    tracing::info!(
        rule = %rule.name(),
        action = %rule.kind().as_str(),
        scope = "global",
        rules = added.rules.len(),
        "rule added through the admin API"
    );
    ok(StatusCode::CREATED, json!(rule.spec))
}

async fn remove_rule(State(c): State<Control>, Path(name): Path<String>) -> ApiResult {
    let Some((rule, _)) = c.rules.remove(&name) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rule named {name:?} is in force")));
    };
    tracing::info!(rule = %rule.name(), scope = "global", "rule removed through the admin API");
    c.registry.emit(crate::record::Event::Rules { change: format!("rule {:?} removed", rule.name()) });
    ok(StatusCode::OK, json!({"removed": name}))
}

async fn add_connection_rule(
    State(c): State<Control>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let conn = live(&c, &id)?;
    let rule = rule_from(body)?;
    let spec = rule.spec.clone();
    conn.add_local_rule(rule).map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    tracing::info!(conn = conn.id, rule = %spec.name, action = %spec.action.as_str(), scope = "connection",
        "rule added through the admin API");
    ok(StatusCode::CREATED, json!({"connection": conn.id, "rule": spec}))
}

async fn remove_connection_rule(
    State(c): State<Control>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    let conn = live(&c, &id)?;
    if !conn.remove_local_rule(&name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("connection {} has no rule named {name:?} of its own", conn.id),
        ));
    }
    tracing::info!(conn = conn.id, rule = %name, scope = "connection", "rule removed through the admin API");
    ok(StatusCode::OK, json!({"connection": conn.id, "removed": name}))
}

/// The profiles `PUT /profile {"name"}` can activate (see [`profile::listing`]).
async fn profiles(State(c): State<Control>) -> ApiResult {
    ok(StatusCode::OK, profile::listing(&c.profiles_dir))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileByName {
    name: String,
}

async fn activate_profile(
    State(c): State<Control>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| media_type(t).eq_ignore_ascii_case("application/json"));
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the body is not UTF-8"))?;
    let profile: Profile = if is_json {
        let by_name: ProfileByName = serde_json::from_str(text).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("expected {{\"name\": \"…\"}}: {e}"))
        })?;
        let plain = !by_name.name.is_empty()
            && by_name.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !plain || by_name.name.starts_with('.') {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "a profile name is letters, digits, - _ and . (no paths)",
            ));
        }
        match profile::by_name(&by_name.name, &c.profiles_dir) {
            Ok(Some((_, p))) => p,
            Ok(None) => {
                let message = format!(
                    "no profile {:?} in {} nor built in; available: {}",
                    by_name.name,
                    c.profiles_dir.display(),
                    profile::available_names(&c.profiles_dir)
                );
                return Err(ApiError::new(StatusCode::NOT_FOUND, message));
            }
            Err(e) => return Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())),
        }
    } else {
        profile::parse_profile("request body", text)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    tracing::info!(profile = %profile.spec.name, rules = profile.rules.len(), "profile activated through the admin API");
    let set = profile.rule_set();
    let mut body = rules_body(&set);
    let old = c.rules.replace(set);
    // What the activation removed: every global rule in force before (connections' own stay).
    let removed: Vec<&str> = old.rules.iter().map(|r| r.name()).collect();
    body["replaced"] = json!({"profile": old.profile, "rules": removed});
    let change = format!("profile {:?} activated ({} rules)", profile.spec.name, profile.rules.len());
    c.registry.emit(crate::record::Event::Rules { change });
    ok(StatusCode::OK, body)
}

/// Removes every rule: the global ones and each live connection's own.
async fn reset(State(c): State<Control>) -> ApiResult {
    let old = c.rules.replace(RuleSet::new(None, None, Vec::new()));
    let local: usize = c.registry.list().iter().map(|conn| conn.clear_local_rules()).sum();
    tracing::info!(global = old.rules.len(), local, "all rules removed through the admin API (reset)");
    let change = format!("reset: {} global and {local} connection rules removed", old.rules.len());
    c.registry.emit(crate::record::Event::Rules { change });
    ok(StatusCode::OK, json!({"rules": [], "removed": {"global": old.rules.len(), "local": local}}))
}

/// The media type of a `Content-Type` value, without parameters (compared case-insensitively).
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn a_token_matches_only_itself_whatever_the_lengths() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for given in [&b""[..], b"s3cre", b"s3cret-", b"s3cres", b"s3crets3cret", b"S3cret"] {
            assert!(!constant_time_eq(given, b"s3cret"), "{given:?}");
        }
    }
}
