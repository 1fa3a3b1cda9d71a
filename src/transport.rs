//! The byte streams a session relays: plain TCP, TLS (server side towards clients, client
//! side towards brokers), or MQTT over WebSocket on either ([`crate::ws`]). Pumps see one `AsyncRead + AsyncWrite` whatever the transport, so every
//! fault and measurement works the same on each; the session reaches the TCP socket underneath
//! for what only TCP has (zero linger, so that a close sends RST).
//!
//! Close semantics per transport: `shutdown()` of a TLS stream sends `close_notify` and then a
//! FIN (a half-close stays possible); a TLS peer that closes its TCP connection without
//! `close_notify` is read as a FIN, as most MQTT clients do exactly that.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Which transport a side of a connection uses (the record's and the routes' word for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Tcp,
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Transport {
    /// Whether TLS is involved (`mqtts`, `wss`).
    pub fn tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether it is MQTT over WebSocket (`ws`, `wss`).
    pub fn websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

/// One side's stream.
pub enum Stream {
    Tcp(TcpStream),
    /// A client's TLS connection to the proxy's listener.
    TlsServer(Box<crate::tls_stream::ServerStream>),
    /// The proxy's TLS connection to the broker.
    TlsClient(Box<crate::tls_stream::ClientStream>),
    /// MQTT over WebSocket, over one of the above.
    Ws(Box<crate::ws::WsStream>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::TlsServer(s) => s.tcp(),
            Stream::TlsClient(s) => s.tcp(),
            Stream::Ws(s) => s.inner().tcp(),
        }
    }

    /// A read half and a write half for the two pumps of one task. Plain TCP is split without
    /// a lock; a TLS stream, whose halves share one session state, through tokio's split.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (ReadHalf::Shared(r), WriteHalf::Shared(w))
            }
        }
    }
}

/// What every side's stream is; [`Stream`] delegates to the one it holds.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

impl Stream {
    fn io(&mut self) -> Pin<&mut dyn Io> {
        match self {
            Stream::Tcp(s) => Pin::new(s),
            Stream::TlsServer(s) => Pin::new(s.as_mut()),
            Stream::TlsClient(s) => Pin::new(s.as_mut()),
            Stream::Ws(s) => Pin::new(s.as_mut()),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// The reading half of a [`Stream::split`].
pub enum ReadHalf<'a> {
    Tcp(tokio::net::tcp::ReadHalf<'a>),
    Shared(tokio::io::ReadHalf<&'a mut Stream>),
}

/// The writing half of a [`Stream::split`].
pub enum WriteHalf<'a> {
    Tcp(tokio::net::tcp::WriteHalf<'a>),
    Shared(tokio::io::WriteHalf<&'a mut Stream>),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *self {
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Shared(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut *self {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Shared(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Shared(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Shared(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
