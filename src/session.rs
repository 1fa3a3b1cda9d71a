//! One proxied connection from accept to close.
//!
//! The session completes the client's TLS handshake on a `mqtts` listener (here, not in the
//! accept loop: a slow handshake delays no one else), dials the upstream (and its TLS), runs
//! the two pumps side by side in one task (so an idle
//! connection costs one task), turns the end of one direction into the right end of the
//! other — a FIN becomes a half-close (done by the pump), a reset or an error becomes an RST
//! towards the other side and stops both pumps — carries out connection-level fault actions
//! (close a side with FIN or RST and hold the other half-open; send an MQTT 5 DISCONNECT), and
//! finally moves the record to the closed ones ([`Event::Ended`](crate::record::Event::Ended)).
//! The first close is recorded, logged and announced where it is seen (a pump, or here): a
//! side that lingers afterwards delays nothing.

use crate::codec::reason_name;
use crate::fault::rule::{CloseMode, SideSpec};
use crate::fault::{Applied, ConnAction};
use crate::pump::{Ctx, PumpEnd, pump};
use crate::record::{Connection, Registry, SideTransport};
use crate::tls::{ClientSide, ServerSide, TlsInfo};
use crate::transport::{Stream, Transport};
use crate::vocab::{CloseHow, Direction, Side};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

/// Runs one connection to its end. However the session ends — it returns, its task is dropped,
/// or code in it panics — the connection's record is closed, logged and removed from the
/// registry, its permit given back, and nothing else is touched: a panic is caught here, logged
/// and counted as an internal error of this connection alone.
pub(crate) async fn run(ctx: Ctx, client: TcpStream) {
    let _finish = Finish { conn: ctx.conn.clone(), registry: ctx.registry.clone() };
    let conn = ctx.conn.clone();
    let session = std::panic::AssertUnwindSafe(serve(ctx, client));
    if let Err(panic) = futures_util::FutureExt::catch_unwind(session).await {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        conn.route.metrics.on_internal_error();
        tracing::error!(conn = conn.id, route = %conn.route.name, error = %what,
            "internal error in this connection's session; closing it (other connections are not affected)");
        conn.end_by_proxy("internal_error", format!("internal error: {what}"), CloseHow::Error);
        // The sockets were dropped with the session future: both sides see the connection close.
    }
}

/// Closes the record when the session is gone, whichever way it went.
struct Finish {
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        finish(&self.conn, &self.registry);
    }
}

async fn serve(ctx: Ctx, client: TcpStream) {
    let conn = &ctx.conn;
    let route = &conn.route;
    if let Err(e) = client.set_nodelay(true) {
        debug!(conn = conn.id, error = %e, "TCP_NODELAY on the client socket failed");
    }
    // `--connect-timeout` bounds each side's whole setup: the client's TLS and WebSocket
    // handshakes together; the dial, TLS and WebSocket handshakes towards the broker together.
    let client_deadline = Instant::now() + ctx.settings.connect_timeout;
    let client = match &route.tls.listen {
        None => {
            conn.set_transport(Side::Client, SideTransport::tcp());
            Stream::Tcp(client)
        }
        Some(tls) => match unless_cancelled(&ctx, accept_tls(&ctx, tls, client, client_deadline)).await {
            Some(Some(stream)) => stream,
            _ => return,
        },
    };
    let client = match &route.listen_ws {
        None => client,
        Some(path) => {
            let handshake =
                crate::ws::accept(client, path, ctx.settings.ws_max_frame, Some(ctx.ws_held.clone()));
            let Some(handshake) =
                unless_cancelled(&ctx, handshake_within(&ctx, client_deadline, handshake)).await
            else {
                return;
            };
            match handshake {
                Ok((ws, subprotocol)) => {
                    conn.set_websocket(Side::Client, path, subprotocol);
                    Stream::Ws(Box::new(ws))
                }
                Err(e) => {
                    let Some(reason) = crate::ws::handshake_failure_reason(&e) else {
                        debug!(conn = conn.id, error = %e, "the client left before its WebSocket request");
                        conn.note_close(
                            Side::Client,
                            CloseHow::Fin,
                            None,
                            Some(e.to_string()),
                            Instant::now(),
                        );
                        return;
                    };
                    route.metrics.on_websocket_error(Side::Client, reason);
                    info!(conn = conn.id, route = %route.name, client = %conn.client_addr, reason, error = e.to_string().as_str(),
                        "WebSocket handshake with the client failed; closing it");
                    let why = format!("WebSocket handshake with the client failed: {e}");
                    conn.note_close(Side::Proxy, CloseHow::Error, None, Some(why), Instant::now());
                    return;
                }
            }
        }
    };
    let broker_deadline = Instant::now() + ctx.settings.connect_timeout;
    let dial = timeout_at(broker_deadline, TcpStream::connect(route.upstream.as_str()));
    let broker = match unless_cancelled(&ctx, dial).await {
        Some(Ok(Ok(broker))) => broker,
        None => return,
        Some(Ok(Err(e))) => return upstream_failed(&ctx, client, e.to_string()),
        Some(Err(_)) => {
            let why =
                format!("no answer within {}", humantime::format_duration(ctx.settings.connect_timeout));
            return upstream_failed(&ctx, client, why);
        }
    };
    if let Err(e) = broker.set_nodelay(true) {
        debug!(conn = conn.id, error = %e, "TCP_NODELAY on the broker socket failed");
    }
    if let Ok(addr) = broker.peer_addr() {
        conn.set_broker(addr, Instant::now());
    }
    let broker = match &route.tls.upstream {
        None => {
            conn.set_transport(Side::Broker, SideTransport::tcp());
            Stream::Tcp(broker)
        }
        Some(tls) => match unless_cancelled(&ctx, connect_tls(&ctx, tls, broker, broker_deadline)).await {
            Some(Ok(stream)) => stream,
            Some(Err(why)) => return upstream_failed(&ctx, client, why),
            None => return,
        },
    };
    let broker = match &route.upstream_ws {
        None => broker,
        Some(path) => {
            let tls = route.tls.upstream.is_some();
            let (max_frame, held) = (ctx.settings.ws_max_frame, Some(ctx.ws_held.clone()));
            let handshake = crate::ws::connect(broker, &route.upstream, path, tls, max_frame, held);
            let Some(handshake) =
                unless_cancelled(&ctx, handshake_within(&ctx, broker_deadline, handshake)).await
            else {
                return;
            };
            match handshake {
                Ok((ws, subprotocol)) => {
                    conn.set_websocket(Side::Broker, path, subprotocol);
                    Stream::Ws(Box::new(ws))
                }
                Err(e) => {
                    let why = format!("WebSocket handshake with the broker failed: {e}");
                    return upstream_failed(&ctx, client, why);
                }
            }
        }
    };
    if route.reach.dialed(Ok(()), Instant::now()) == crate::route::ReachLog::Back {
        info!(conn = conn.id, route = %route.name, upstream = %route.upstream, "the upstream broker is reachable again");
    }
    relay(&ctx, client, broker).await;
}

/// Runs one step of setting a connection up (a handshake, the dial) unless the connection is
/// cancelled first (`None`). Boxed: a step's state is large and short-lived; it must not be sized
/// into every connection's future for its whole life.
async fn unless_cancelled<T>(ctx: &Ctx, step: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = ctx.conn.cancel.cancelled() => None,
        r = Box::pin(step) => Some(r),
    }
}

/// The client's TLS handshake on a `mqtts` listener, within `--connect-timeout`. The ALPN
/// protocol the client offers first is accepted (the broker behind may expect it); the SNI is
/// recorded. A failure is one log line, a count by reason, and the close of this connection.
async fn accept_tls(ctx: &Ctx, tls: &ServerSide, tcp: TcpStream, deadline: Instant) -> Option<Stream> {
    let conn = &ctx.conn;
    let started = Instant::now();
    let handshake = crate::tls_stream::accept(tcp, |_sni, alpn| match alpn.into_iter().next() {
        Some(protocol) => {
            let mut config = (*tls.config).clone();
            config.alpn_protocols = vec![protocol];
            Arc::new(config)
        }
        None => tls.config.clone(),
    });
    let result = handshake_within(ctx, deadline, handshake).await;
    match result {
        Ok((stream, sni)) => {
            conn.route.metrics.on_tls_handshake(Side::Client, started.elapsed().as_secs_f64());
            let info = TlsInfo::of(stream.state(), sni);
            conn.set_transport(
                Side::Client,
                SideTransport {
                    transport: Transport::Tls,
                    tls: Some(info),
                    unverified: false,
                    websocket: None,
                },
            );
            Some(Stream::TlsServer(Box::new(stream)))
        }
        Err(e) => {
            let reason = crate::tls::failure_reason(&e);
            conn.route.metrics.on_tls_failure(Side::Client, reason);
            info!(conn = conn.id, route = %conn.route.name, client = %conn.client_addr, reason, error = e.to_string().as_str(),
                "TLS handshake with the client failed; closing it");
            conn.note_close(
                Side::Proxy,
                CloseHow::Error,
                None,
                Some(format!("TLS handshake with the client failed: {e}")),
                Instant::now(),
            );
            None
        }
    }
}

/// A handshake bounded by its side's setup deadline (`--connect-timeout` from the start of that side's setup;
/// running out of time is a `TimedOut` error).
async fn handshake_within<T>(
    ctx: &Ctx,
    deadline: Instant,
    handshake: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    timeout_at(deadline, handshake).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no handshake within {} of this side's setup",
                humantime::format_duration(ctx.settings.connect_timeout)
            ),
        ))
    })
}

/// The TLS handshake with the broker, within `--connect-timeout`. `Err` says why, for the
/// upstream-failure path (the failure is also counted by reason).
async fn connect_tls(
    ctx: &Ctx,
    tls: &ClientSide,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<Stream, String> {
    let conn = &ctx.conn;
    let started = Instant::now();
    let handshake = crate::tls_stream::connect(tcp, tls.config.clone(), tls.server_name.clone());
    let result = handshake_within(ctx, deadline, handshake).await;
    match result {
        Ok(stream) => {
            conn.route.metrics.on_tls_handshake(Side::Broker, started.elapsed().as_secs_f64());
            let info = TlsInfo::of(stream.state(), Some(tls.server_name.to_str().into_owned()));
            conn.set_transport(
                Side::Broker,
                SideTransport {
                    transport: Transport::Tls,
                    tls: Some(info),
                    unverified: tls.insecure,
                    websocket: None,
                },
            );
            Ok(Stream::TlsClient(Box::new(stream)))
        }
        Err(e) => {
            conn.route.metrics.on_tls_failure(Side::Broker, crate::tls::failure_reason(&e));
            Err(format!("TLS handshake with the broker failed: {e}"))
        }
    }
}

/// Runs both directions until both ended — or until a connection action is due, which is then
/// carried out once both pumps stopped at a packet boundary — and closes the sockets: a reset
/// seen from one side is passed on as a reset to the other (zero linger makes the close send
/// RST, not FIN).
async fn relay(ctx: &Ctx, mut client: Stream, mut broker: Stream) {
    let (up, down, action) = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut broker_rx, mut broker_tx) = broker.split();
        let pumps = both_directions(
            ctx,
            guarded(ctx, Direction::ClientToBroker, &mut client_rx, &mut broker_tx),
            guarded(ctx, Direction::BrokerToClient, &mut broker_rx, &mut client_tx),
        );
        tokio::pin!(pumps);
        tokio::select! {
            (up, down) = &mut pumps => (up, down, None),
            action = next_action(ctx) => {
                ctx.stop.cancel();
                let (up, down) = pumps.await;
                (up, down, Some(action))
            }
        }
    };
    for (stream, side) in [(&mut client, Side::Client), (&mut broker, Side::Broker)] {
        if let Stream::Ws(ws) = stream {
            websocket_end(ctx, ws, side);
            // Boxed: rare, and it must not be sized into every connection's future.
            Box::pin(ws.close_for_violation()).await;
        }
    }
    if let Some((action, applied)) = action
        && !matches!(up, PumpEnd::Cancelled)
    {
        // Boxed for the same reason as the dial: rare, and larger than an idle connection.
        return Box::pin(carry_out(ctx, action, &applied, client, broker)).await;
    }
    let proxy_rst =
        ctx.conn.close_info().is_some_and(|c| c.closed_by == Side::Proxy && c.how == CloseHow::Rst);
    // The client reset if reading from it or writing to it failed with a reset; likewise the broker.
    let client_reset = up.read_reset() || down.write_reset();
    let broker_reset = down.read_reset() || up.write_reset();
    for (stream, arm) in [(&client, broker_reset || proxy_rst), (&broker, client_reset || proxy_rst)] {
        arm_rst(ctx, stream, arm);
    }
}

/// Records what a WebSocket side counted (pings, pongs apart from MQTT's) and logs its Close code.
fn websocket_end(ctx: &Ctx, ws: &crate::ws::WsStream, side: Side) {
    ctx.conn.set_websocket_end(side, ws.pings, ws.pongs, ws.close_code);
    if let Some(code) = ws.close_code {
        info!(
            conn = ctx.conn.id,
            side = side.as_str(),
            code,
            pings = ws.pings,
            "WebSocket Close frame received"
        );
    }
}

/// Runs both pumps to their end. Once one ended with a FIN, the other gets
/// `--half-close-timeout` to end too; then the connection is cancelled, so a peer that never
/// closes cannot hold it for ever.
async fn both_directions(
    ctx: &Ctx,
    up: impl Future<Output = PumpEnd>,
    down: impl Future<Output = PumpEnd>,
) -> (PumpEnd, PumpEnd) {
    tokio::pin!(up, down);
    let (mut up_end, mut down_end) = (None, None);
    let mut deadline = None;
    let timeout = ctx.settings.half_close_timeout;
    loop {
        if let (Some(_), Some(_)) = (&up_end, &down_end) {
            return (up_end.expect("checked"), down_end.expect("checked"));
        }
        tokio::select! {
            end = &mut up, if up_end.is_none() => up_end = Some(end),
            end = &mut down, if down_end.is_none() => down_end = Some(end),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let open = if up_end.is_none() { "client" } else { "broker" };
                let detail = format!(
                    "half-closed for longer than --half-close-timeout ({}): the {open} never closed its side",
                    humantime::format_duration(timeout)
                );
                info!(conn = ctx.conn.id, timeout = %humantime::format_duration(timeout), still_open = open,
                    "half-closed for longer than --half-close-timeout; closing both sides");
                deadline = None;
                ctx.conn.end_by_proxy("half_close_timeout", detail, CloseHow::Fin);
                ctx.conn.cancel.cancel();
            }
        }
        let one_fin = matches!(up_end, Some(PumpEnd::Eof)) || matches!(down_end, Some(PumpEnd::Eof));
        if one_fin && deadline.is_none() && !timeout.is_zero() && !ctx.conn.cancel.is_cancelled() {
            // Bounded to a year by the settings; a deadline past what the clock holds is never.
            deadline = Instant::now().checked_add(timeout);
        }
    }
}

fn arm_rst(ctx: &Ctx, stream: &Stream, arm: bool) {
    if let Err(e) = arm.then(|| stream.tcp().set_zero_linger()).transpose() {
        debug!(conn = ctx.conn.id, error = %e, "could not arm RST on close");
    }
}

/// Waits until a connection action (close, disconnect) is due.
async fn next_action(ctx: &Ctx) -> (ConnAction, Applied) {
    loop {
        let seen = ctx.conn.wake.seen();
        let now = Instant::now();
        let (due, wake) = {
            let mut faults = ctx.faults();
            faults.refresh();
            (faults.due_action(now), faults.next_change(now))
        };
        if let Some(due) = due {
            return due;
        }
        tokio::select! {
            () = ctx.conn.wake.after(seen) => {}
            _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
        }
    }
}

/// Carries out a connection action on sockets no pump uses any more.
async fn carry_out(ctx: &Ctx, action: ConnAction, applied: &Applied, mut client: Stream, mut broker: Stream) {
    let conn = &ctx.conn;
    conn.on_fault(applied, &ctx.registry);
    let rule = applied.rule.name();
    let now = Instant::now();
    match action {
        ConnAction::Disconnect { reason, to } => {
            let why = format!(
                "rule {rule:?} sent DISCONNECT {} ({reason:#04x}) to {}",
                reason_name(reason),
                to.words()
            );
            info!(
                conn = conn.id,
                rule,
                reason = reason_name(reason),
                to = to.as_str(),
                "sending DISCONNECT, then closing"
            );
            conn.note_close(Side::Proxy, CloseHow::Disconnect, Some(reason), Some(why), now);
            // A DISCONNECT with a reason code and no properties (MQTT 5, 3.14).
            let packet = [0xe0, 0x01, reason];
            for (stream, to) in [(&mut client, to.client()), (&mut broker, to.broker())] {
                if to {
                    let _ = stream.write_all(&packet).await;
                    let _ = stream.flush().await;
                }
            }
        }
        ConnAction::Close { side, how } => {
            let rst = how == CloseMode::Rst;
            let why = format!("rule {rule:?} closed {} with {}", side.words(), how.as_str().to_uppercase());
            info!(conn = conn.id, rule, side = side.as_str(), how = how.as_str(), "closing by rule");
            conn.note_close(
                Side::Proxy,
                if rst { CloseHow::Rst } else { CloseHow::Fin },
                None,
                Some(why),
                now,
            );
            arm_rst(ctx, &client, rst && side.client());
            arm_rst(ctx, &broker, rst && side.broker());
            match side {
                SideSpec::Both => {
                    if !rst {
                        tokio::join!(close_cleanly(&mut client), close_cleanly(&mut broker));
                    }
                }
                SideSpec::Client => {
                    if !rst {
                        close_cleanly(&mut client).await;
                    }
                    drop(client);
                    hold_half_open(ctx, broker, Side::Broker).await;
                }
                SideSpec::Broker => {
                    if !rst {
                        close_cleanly(&mut broker).await;
                    }
                    drop(broker);
                    hold_half_open(ctx, client, Side::Client).await;
                }
            }
        }
    }
}

/// A side closed with FIN gets its transport's clean end, bounded to a second: a FIN on TCP,
/// `close_notify` and FIN on TLS, a Close frame (1000) on WebSocket.
async fn close_cleanly(stream: &mut Stream) {
    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// Keeps the side a rule left open connected, reading and discarding what it sends, until it
/// closes by itself (typically when its Keep Alive runs out) or the connection is killed.
async fn hold_half_open(ctx: &Ctx, mut stream: Stream, side: Side) {
    let started = Instant::now();
    let mut sink = vec![0u8; 2048];
    let ended = loop {
        tokio::select! {
            _ = ctx.conn.cancel.cancelled() => break "the connection was ended by the proxy",
            r = stream.read(&mut sink) => match r {
                Ok(0) => break "it closed (FIN)",
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "it reset the connection",
                Err(_) => break "it failed",
            },
        }
    };
    info!(
        conn = ctx.conn.id,
        side = side.as_str(),
        after_s = crate::record::round3(started.elapsed().as_secs_f64()),
        ended,
        "the side left half-open is gone"
    );
}

/// One pump that stops when the connection is cancelled, and cancels it when it ends for any
/// reason but a FIN (after a FIN the other direction goes on: that is a half-close).
async fn guarded<R, W>(ctx: &Ctx, dir: Direction, reader: &mut R, writer: &mut W) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let end = tokio::select! {
        biased;
        _ = ctx.conn.cancel.cancelled() => PumpEnd::Cancelled,
        end = pump(ctx, dir, reader, writer) => end,
    };
    if !matches!(end, PumpEnd::Eof | PumpEnd::Stopped) {
        ctx.conn.cancel.cancel();
    }
    debug!(conn = ctx.conn.id, direction = %dir, end = ?end, "direction ended");
    end
}

fn upstream_failed(ctx: &Ctx, client: Stream, why: String) {
    let conn = &ctx.conn;
    conn.route.metrics.on_upstream_failure();
    if let crate::route::ReachLog::Failed { held_back } =
        conn.route.reach.dialed(Err(why.clone()), Instant::now())
    {
        warn!(conn = conn.id, route = %conn.route.name, upstream = %conn.route.upstream, error = %why,
            more_since_last_line = held_back,
            "cannot reach the upstream broker; closing the client connection (logged every 10 s while it lasts)");
    }
    conn.note_close(
        Side::Proxy,
        CloseHow::Error,
        None,
        Some(format!("upstream connect failed: {why}")),
        Instant::now(),
    );
    drop(client);
}

/// Closes the record (if no side did, the proxy did: the session was cancelled) and moves it
/// from the registry's live connections to the closed ones.
fn finish(conn: &Arc<Connection>, registry: &Registry) {
    // A close recorded in a batch that was never written is announced now.
    conn.announce_close();
    if conn.close_info().is_none() {
        conn.note_close(
            Side::Proxy,
            CloseHow::Fin,
            None,
            Some("connection cancelled".into()),
            Instant::now(),
        );
    }
    conn.route.metrics.on_session_end();
    registry.close(conn);
}
