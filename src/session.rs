//! One proxied connection from accept to close.
//!
//! The session dials the upstream, runs the two pumps side by side in one task (so an idle
//! connection costs one task), turns the end of one direction into the right end of the
//! other — a FIN becomes a half-close (done by the pump), a reset or an error becomes an RST
//! towards the other side and stops both pumps — and finally writes the closed record: one log
//! line and one [`Event::Closed`](crate::record::Event::Closed).

use crate::pump::{Ctx, PumpEnd, pump};
use crate::record::{CloseHow, Direction, Side};
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

pub(crate) async fn run(ctx: Ctx, client: TcpStream) {
    let conn = &ctx.conn;
    let route = &conn.route;
    if let Err(e) = client.set_nodelay(true) {
        debug!(conn = conn.id, error = %e, "TCP_NODELAY on the client socket failed");
    }
    let dial = tokio::select! {
        biased;
        _ = conn.cancel.cancelled() => None,
        r = timeout(ctx.settings.connect_timeout, TcpStream::connect(route.upstream.as_str())) => Some(r),
    };
    let broker = match dial {
        Some(Ok(Ok(broker))) => broker,
        None => return finish(&ctx),
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
    relay(&ctx, client, broker).await;
    finish(&ctx);
}

/// Runs both directions until both ended, then closes the sockets: a reset seen from one side
/// is passed on as a reset to the other (zero linger makes the close send RST, not FIN).
async fn relay(ctx: &Ctx, mut client: TcpStream, mut broker: TcpStream) {
    let (up, down) = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut broker_rx, mut broker_tx) = broker.split();
        tokio::join!(
            guarded(ctx, Direction::ClientToBroker, &mut client_rx, &mut broker_tx),
            guarded(ctx, Direction::BrokerToClient, &mut broker_rx, &mut client_tx),
        )
    };
    let proxy_rst =
        ctx.conn.close_info().is_some_and(|c| c.closed_by == Side::Proxy && c.how == CloseHow::Rst);
    // The client reset if reading from it or writing to it failed with a reset; likewise the broker.
    let client_reset = up.read_reset() || down.write_reset();
    let broker_reset = down.read_reset() || up.write_reset();
    for (stream, arm) in [(&client, broker_reset || proxy_rst), (&broker, client_reset || proxy_rst)] {
        if let Err(e) = arm.then(|| stream.set_zero_linger()).transpose() {
            debug!(conn = ctx.conn.id, error = %e, "could not arm RST on close");
        }
    }
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
    if !matches!(end, PumpEnd::Eof) {
        ctx.conn.cancel.cancel();
    }
    debug!(conn = ctx.conn.id, direction = %dir, end = ?end, "direction ended");
    end
}

fn upstream_failed(ctx: &Ctx, client: TcpStream, why: String) {
    let conn = &ctx.conn;
    conn.route.stats.upstream_connect_failures.fetch_add(1, Relaxed);
    warn!(conn = conn.id, route = %conn.route.name, upstream = %conn.route.upstream, error = %why,
        "cannot reach the upstream broker; closing the client connection");
    conn.note_close(
        Side::Proxy,
        CloseHow::Error,
        None,
        Some(format!("upstream connect failed: {why}")),
        Instant::now(),
    );
    drop(client);
    finish(ctx);
}

/// Removes the record from the registry, logs the closed-connection line and emits the event.
fn finish(ctx: &Ctx) {
    let conn = &ctx.conn;
    if conn.close_info().is_none() {
        conn.note_close(
            Side::Proxy,
            CloseHow::Fin,
            None,
            Some("connection cancelled".into()),
            Instant::now(),
        );
    }
    conn.route.stats.connections_active.fetch_sub(1, Relaxed);
    let s = conn.snapshot();
    let close = s.close.as_ref().expect("close recorded above");
    info!(
        conn = s.id,
        route = %s.route,
        client = %s.client_addr,
        client_id = %s.client_id.as_deref().unwrap_or(""),
        protocol = s.protocol.map(|p| p.level()).unwrap_or(0),
        closed_by = %close.closed_by.as_str(),
        how = %close.how.as_str(),
        reason = %close.reason.as_deref().unwrap_or("-"),
        silence_s = close.silence_s,
        silence_ratio = close.silence_ratio,
        keep_alive = close.keep_alive_enforced,
        duration_s = close.at_s,
        bytes_client_to_broker = s.client_to_broker.bytes,
        bytes_broker_to_client = s.broker_to_client.bytes,
        "connection closed"
    );
    ctx.registry.close(conn);
}
