//! MQTT over WebSocket on either side: the handshakes (subprotocol `mqtt`, also `mqttv3.1`) and
//! [`WsStream`], which turns binary frames into one byte stream and back, so the pumps split
//! packets whatever the framing (a packet across frames, several packets in one frame). Each
//! run of packets a pump writes is one binary frame.
//!
//! WebSocket pings are answered (by tungstenite) and counted apart from MQTT's PINGREQ: a
//! WebSocket keepalive can hide a dead MQTT session. A Close frame ends the stream like a FIN
//! (its code is kept for the record); shutting the stream down sends a Close frame.
//!
//! What a peer can make the proxy hold is bounded. A peer that sends pings and never reads gets
//! one Pong at a time: while a Pong cannot be written, nothing more is read from that peer (the
//! back-pressure a TCP peer gets from its own window), so no queue of Pongs grows. A frame is
//! delivered only whole, so its bytes are held until it is complete: [`HeldBytes`] counts what
//! every WebSocket connection holds of frames not yet complete or not yet forwarded, and at
//! `--ws-max-held` a connection that already holds bytes stops reading — all but one, which
//! finishes its message (see `held.rs`).
//!
//! A peer that breaks the WebSocket protocol — a frame larger than `--ws-max-frame` (the whole
//! frame would have to be held in memory), a text frame, a malformed frame — ends its stream
//! with a [`Violation`]: the pump counts it and the session answers with the Close code that
//! says why (1009, 1003, 1002).

use crate::transport::Stream;
use futures_util::{Sink, Stream as _};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

mod held;

use held::Counted;
pub use held::HeldBytes;

/// The default `--ws-max-frame`: 16 MiB, tungstenite's own default frame limit. A client that
/// sends one MQTT packet per frame (as browsers' MQTT libraries do) can send packets this large.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The default `--ws-max-held`: 64 MiB for the unfinished frames of all WebSocket connections
/// together (raised to `--ws-max-frame` when that is larger: the limit holds one whole frame).
pub const DEFAULT_MAX_HELD: usize = 64 * 1024 * 1024;

/// What one read from a WebSocket peer may take. tungstenite's default (128 KiB) would be
/// allocated, and touched, for every connection; it is also how far a connection may go past
/// `--ws-max-held` (a connection that holds nothing may always read once).
pub const READ_SIZE: usize = 8 * 1024;

/// A frame (or a message of several frames) may be this large and no larger.
fn config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
        .read_buffer_size(READ_SIZE)
}

/// The ways a peer breaks the WebSocket protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A frame (or message) over `--ws-max-frame`.
    FrameTooLarge,
    /// MQTT travels in binary frames.
    TextFrame,
    /// A malformed frame.
    Protocol,
}

impl Broken {
    /// The metrics' `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Broken::FrameTooLarge => "frame_too_large",
            Broken::TextFrame => "text_frame",
            Broken::Protocol => "protocol",
        }
    }

    /// The Close code that tells the peer why: too big, unsupported data, protocol error.
    fn close_code(self) -> u16 {
        match self {
            Broken::FrameTooLarge => 1009,
            Broken::TextFrame => 1003,
            Broken::Protocol => 1002,
        }
    }
}

/// How a peer broke the WebSocket protocol; carried inside the `io::Error` its stream returns.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    pub kind: Broken,
    pub message: String,
}

impl Violation {
    /// The violation an error from a [`WsStream`] carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&Violation> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<Violation>())
    }
}

/// Why a WebSocket handshake with a client failed, for the metrics' `reason`; `None` when the
/// client only closed before sending a whole request (a port or health check: not an error).
pub fn handshake_failure_reason(e: &io::Error) -> Option<&'static str> {
    Some(match e.kind() {
        io::ErrorKind::UnexpectedEof => return None,
        io::ErrorKind::NotFound => "not_found",
        io::ErrorKind::InvalidData => "bad_request",
        io::ErrorKind::TimedOut => "timeout",
        _ => "handshake",
    })
}

/// The subprotocols MQTT clients ask for, preferred first.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A WebSocket as a byte stream.
pub struct WsStream {
    ws: WebSocketStream<Counted>,
    /// The payload of the binary frame being read, and how much of it was read.
    frame: Bytes,
    /// What the frame being read holds against `--ws-max-held`, given back once it is read
    /// whole (its memory is one allocation until then).
    frame_counted: usize,
    /// A Pong is owed and could not be written: nothing more is read until it is.
    pong_owed: bool,
    /// WebSocket pings received (answered by tungstenite) and pongs received.
    pub pings: u64,
    pub pongs: u64,
    /// The code of the Close frame the peer sent.
    pub close_code: Option<u16>,
    /// A Close frame was queued by `poll_shutdown`.
    close_queued: bool,
    /// How the peer broke the protocol: its Close frame is owed ([`WsStream::close_for_violation`]).
    violated: Option<Broken>,
}

impl WsStream {
    fn new(mut ws: WebSocketStream<Counted>) -> WsStream {
        ws.get_mut().armed = true;
        WsStream {
            ws,
            frame: Bytes::new(),
            frame_counted: 0,
            pong_owed: false,
            pings: 0,
            pongs: 0,
            close_code: None,
            close_queued: false,
            violated: None,
        }
    }

    /// Sends the Close frame a protocol violation calls for (if the peer broke the protocol),
    /// within a second: the peer learns why it is closed.
    pub async fn close_for_violation(&mut self) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        if let Some(broken) = self.violated.take() {
            let frame = CloseFrame { code: broken.close_code().into(), reason: "".into() };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.ws.close(Some(frame))).await;
        }
    }

    /// Notes how the peer broke the protocol and returns the error that says so.
    fn broke(&mut self, kind: Broken, message: String) -> Poll<io::Result<()>> {
        self.violated = Some(kind);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Violation { kind, message })))
    }

    pub fn inner(&self) -> &Stream {
        &self.ws.get_ref().inner
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::SendAfterClosing) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.frame.is_empty() {
                let n = this.frame.len().min(buf.remaining());
                buf.put_slice(&this.frame.split_to(n));
                if this.frame.is_empty() {
                    // The frame's allocation goes with its last bytes.
                    this.frame = Bytes::new();
                    let counted = std::mem::take(&mut this.frame_counted);
                    this.ws.get_mut().forwarded(counted);
                }
                return Poll::Ready(Ok(()));
            }
            if this.pong_owed {
                // A peer that does not read gets no more Pongs queued: it is not read either.
                ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(to_io)?;
                this.pong_owed = false;
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // The end of the stream, or TCP closed without a Close frame (as browsers do when
                // a tab goes): a FIN — unless it cut a frame short.
                None
                | Some(Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                )) => {
                    let cut = this.ws.get_mut().ended();
                    if cut > 0 {
                        let message =
                            format!("the stream ended inside a WebSocket frame ({cut} bytes of it read)");
                        return this.broke(Broken::Protocol, message);
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Err(WsError::Capacity(e))) => {
                    return this
                        .broke(Broken::FrameTooLarge, format!("WebSocket frame over --ws-max-frame: {e}"));
                }
                Some(Err(WsError::Protocol(e))) => {
                    return this.broke(Broken::Protocol, format!("WebSocket protocol error: {e}"));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                Some(Ok(Message::Binary(b))) => {
                    let counted = this.ws.get_mut().take_message();
                    if b.is_empty() {
                        this.ws.get_mut().forwarded(counted);
                    } else {
                        this.frame_counted = counted;
                        this.frame = b;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    let message = "a text WebSocket frame: MQTT travels in binary frames".to_string();
                    return this.broke(Broken::TextFrame, message);
                }
                Some(Ok(Message::Ping(_))) => {
                    this.pings += 1;
                    this.ws.get_mut().control_delivered();
                    // The Pong tungstenite queued goes out now, not with the next write.
                    match Pin::new(&mut this.ws).poll_flush(cx) {
                        Poll::Pending => {
                            this.pong_owed = true;
                            return Poll::Pending;
                        }
                        Poll::Ready(r) => r.map_err(to_io)?,
                    }
                }
                Some(Ok(Message::Pong(_))) => {
                    this.pongs += 1;
                    this.ws.get_mut().control_delivered();
                }
                Some(Ok(Message::Close(frame))) => {
                    this.ws.get_mut().ended();
                    this.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(Message::Frame(_))) => {}
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut *ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    /// A Close frame with 1000 (normal closure), then the end of the stream underneath.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
        if !self.close_queued {
            let ws = &mut self.ws;
            match ready!(Pin::new(&mut *ws).poll_ready(cx)) {
                Ok(()) => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    // Refused only when a Close already went out: then closing is what is left.
                    let _ = Pin::new(&mut *ws).start_send(Message::Close(Some(frame)));
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(to_io(e))),
            }
            self.close_queued = true;
        }
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(e) => return Poll::Ready(Err(to_io(e))),
        }
        // tungstenite only flushes the Close frame: end the stream underneath too (a FIN, and
        // `close_notify` first under wss).
        Pin::new(self.ws.get_mut()).poll_shutdown(cx)
    }
}

/// The server handshake on a `ws`/`wss` listener at `path`. A request that is not a WebSocket
/// upgrade to `path` is answered with an HTTP error (400, or 404 for another path) and closed.
/// Returns the subprotocol agreed.
// The callback's error type is tungstenite's HTTP response, large by its own definition.
#[allow(clippy::result_large_err)]
pub async fn accept(
    mut stream: Stream,
    path: &str,
    max_frame: usize,
    held: Option<Arc<HeldBytes>>,
) -> io::Result<(WsStream, Option<String>)> {
    let mut agreed = None;
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            let mut e = ErrorResponse::new(Some(format!(
                "no MQTT over WebSocket at {}; try {path}\n",
                req.uri().path()
            )));
            *e.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
            return Err(e);
        }
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        if let Some(p) = SUBPROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) {
            resp.headers_mut().insert("sec-websocket-protocol", p.parse().expect("a token"));
            agreed = Some(p.to_string());
        }
        Ok(resp)
    };
    match tokio_tungstenite::accept_hdr_async_with_config(&mut stream, callback, Some(config(max_frame)))
        .await
    {
        Ok(_) => {}
        Err(WsError::Http(_)) => {
            return Err(io::Error::new(io::ErrorKind::NotFound, "a WebSocket request for another path"));
        }
        // Closed before its request was complete: a port check or a health check, not an error.
        Err(WsError::Protocol(ProtocolError::HandshakeIncomplete)) => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed before its WebSocket request was complete",
            ));
        }
        Err(e) => {
            // Not a WebSocket upgrade (or a broken one): say so in HTTP, then close.
            let body = format!("expected a WebSocket upgrade for MQTT at {path}: {e}\n");
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a WebSocket upgrade: {e}")));
        }
    }
    // The handshake read exactly the request (anything after it is refused as junk): the
    // stream now starts at the first frame.
    let stream = Counted::new(stream, held);
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config(max_frame))).await;
    Ok((WsStream::new(ws), agreed))
}

/// The client handshake towards a `ws`/`wss` broker: `GET path` on `host`, subprotocol `mqtt`.
pub async fn connect(
    stream: Stream,
    host_port: &str,
    path: &str,
    tls: bool,
    max_frame: usize,
    held: Option<Arc<HeldBytes>>,
) -> io::Result<(WsStream, Option<String>)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let scheme = if tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{host_port}{path}").into_client_request().map_err(to_io)?;
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().expect("a token"));
    let (ws, response) = tokio_tungstenite::client_async_with_config(
        request,
        Counted::new(stream, held),
        Some(config(max_frame)),
    )
    .await
    .map_err(to_io)?;
    let agreed =
        response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok((WsStream::new(ws), agreed))
}
