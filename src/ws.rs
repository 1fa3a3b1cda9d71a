//! MQTT over WebSocket on either side: the handshakes (subprotocol `mqtt`, also `mqttv3.1`) and
//! [`WsStream`], which turns binary frames into one byte stream and back, so the pumps split
//! packets whatever the framing (a packet across frames, several packets in one frame). Each
//! run of packets a pump writes is one binary frame.
//!
//! WebSocket pings are answered (by tungstenite) and counted apart from MQTT's PINGREQ: a
//! WebSocket keepalive can hide a dead MQTT session. A Close frame ends the stream like a FIN
//! (its code is kept for the record); shutting the stream down sends a Close frame.

use crate::transport::Stream;
use futures_util::{Sink, Stream as _};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

/// Largest WebSocket message accepted (a whole MQTT packet fits: 256 MiB + headers).
pub const MAX_MESSAGE: usize = 268_435_460;

fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

/// The subprotocols MQTT clients ask for, preferred first.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A WebSocket as a byte stream.
pub struct WsStream {
    ws: WebSocketStream<Stream>,
    /// The payload of the binary frame being read, and how much of it was read.
    frame: Bytes,
    /// WebSocket pings received (answered by tungstenite) and pongs received.
    pub pings: u64,
    pub pongs: u64,
    /// The code of the Close frame the peer sent.
    pub close_code: Option<u16>,
}

impl WsStream {
    fn new(ws: WebSocketStream<Stream>) -> WsStream {
        WsStream { ws, frame: Bytes::new(), pings: 0, pongs: 0, close_code: None }
    }

    pub fn inner(&self) -> &Stream {
        self.ws.get_ref()
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::new(io::ErrorKind::BrokenPipe, e),
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
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                Some(Ok(Message::Binary(b))) => this.frame = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket frame: MQTT travels in binary frames",
                    )));
                }
                Some(Ok(Message::Ping(_))) => {
                    this.pings += 1;
                    // The pong tungstenite queued goes out now, not with the next write.
                    let _ = Pin::new(&mut this.ws).poll_flush(cx);
                }
                Some(Ok(Message::Pong(_))) => this.pongs += 1,
                Some(Ok(Message::Close(frame))) => {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// The server handshake on a `ws`/`wss` listener at `path`. A request that is not a WebSocket
/// upgrade to `path` is answered with an HTTP error (400, or 404 for another path) and closed.
/// Returns the subprotocol agreed.
// The callback's error type is tungstenite's HTTP response, large by its own definition.
#[allow(clippy::result_large_err)]
pub async fn accept(mut stream: Stream, path: &str) -> io::Result<(WsStream, Option<String>)> {
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
    match tokio_tungstenite::accept_hdr_async_with_config(&mut stream, callback, Some(config())).await {
        Ok(_) => {}
        Err(WsError::Http(_)) => {
            return Err(io::Error::new(io::ErrorKind::NotFound, "a WebSocket request for another path"));
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
    let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config())).await;
    Ok((WsStream::new(ws), agreed))
}

/// The client handshake towards a `ws`/`wss` broker: `GET path` on `host`, subprotocol `mqtt`.
pub async fn connect(
    stream: Stream,
    host_port: &str,
    path: &str,
    tls: bool,
) -> io::Result<(WsStream, Option<String>)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let scheme = if tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{host_port}{path}").into_client_request().map_err(to_io)?;
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().expect("a token"));
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config())).await.map_err(to_io)?;
    let agreed =
        response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok((WsStream::new(ws), agreed))
}
