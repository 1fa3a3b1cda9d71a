//! TLS over a TCP socket with rustls' unbuffered API, so that an idle connection holds no
//! buffer at all.
//!
//! rustls' buffered connections (and tokio-rustls on top) keep a 4 KiB read buffer per
//! session for the connection's whole life; the proxy holds two sessions per connection, and
//! most MQTT connections are idle most of the time. Here the bytes in flight live in three
//! buffers of our own, each allocated when bytes arrive and freed once they are consumed:
//! `incoming` (ciphertext read, not yet a whole record), `plain` (decrypted, not yet read) and
//! `outgoing` (encrypted, not yet written). An idle reader waits for the socket's readiness, not
//! in a read into a buffer. Idle RSS per proxied TLS connection: BENCHMARKS.md.
//!
//! Close semantics are the transport's (see [`crate::transport`]): `shutdown` sends
//! `close_notify`, then a FIN; a peer's `close_notify`, or a FIN without one between records, is
//! the end of the stream (a FIN inside a record is a truncation: an error). Errors from rustls
//! come wrapped in an `io::Error` ([`crate::tls::failure_reason`] reads them); after one the
//! session is failed for good, and rustls is not called again.
//!
//! Reading may send (a key update's answer) and writing may process what was read, so both
//! halves of a split stream must be polled by one task, as the session's pumps are: the socket
//! keeps one waker per direction.

use rustls::client::UnbufferedClientConnection;
use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use std::io;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most ciphertext read from the socket at once: two full TLS records.
const READ_CHUNK: usize = 2 * (16 * 1024 + 256);
/// The most plaintext one write encrypts.
const WRITE_CHUNK: usize = 256 * 1024;

/// One side of the unbuffered API: a server or client connection.
pub trait Side: DerefMut<Target = rustls::unbuffered::UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Where the session stands after processing what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Application data may be sent (and read, as it comes).
    Open,
    /// Both sides sent `close_notify`.
    Closed,
}

/// A TLS session over TCP (see the module documentation).
pub struct TlsStream<S> {
    tcp: TcpStream,
    conn: S,
    incoming: Vec<u8>,
    plain: Vec<u8>,
    plain_pos: usize,
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent `close_notify`, or closed TCP.
    read_closed: bool,
    close_sent: bool,
    /// rustls reported an error: the session is over.
    failed: bool,
}

/// What [`TlsStream::process`] should send once the session may send application data.
#[derive(Clone, Copy)]
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

pub type ServerStream = TlsStream<UnbufferedServerConnection>;
pub type ClientStream = TlsStream<UnbufferedClientConnection>;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The client's handshake on a TLS listener. The client's hello is read first, so that the
/// configuration can depend on it: `configure` gets the SNI and the ALPN protocols offered and
/// returns the configuration to use. Returns the stream and the SNI.
pub async fn accept(
    tcp: TcpStream,
    configure: impl FnOnce(Option<&str>, Vec<Vec<u8>>) -> Arc<ServerConfig>,
) -> io::Result<(ServerStream, Option<String>)> {
    let mut acceptor = Acceptor::default();
    let mut incoming = Vec::new();
    let mut fed = 0;
    let accepted = 'hello: loop {
        if read_some(&tcp, &mut incoming).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // The acceptor takes what its buffer holds at a time: ask after each piece.
        while fed < incoming.len() {
            let mut new = &incoming[fed..];
            fed += acceptor.read_tls(&mut new)?;
            match acceptor.accept() {
                Ok(Some(accepted)) => break 'hello accepted,
                Ok(None) => {}
                Err((e, mut alert)) => {
                    let mut bytes = Vec::new();
                    let _ = alert.write_all(&mut bytes);
                    let _ = tcp.try_write(&bytes);
                    return Err(tls_error(e));
                }
            }
        }
    };
    let hello = accepted.client_hello();
    let sni = hello.server_name().map(str::to_string);
    let alpn = hello.alpn().map(|offered| offered.map(<[u8]>::to_vec).collect()).unwrap_or_default();
    let config = configure(sni.as_deref(), alpn);
    drop(accepted);
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream::new(tcp, conn, incoming);
    stream.handshake().await?;
    Ok((stream, sni))
}

/// The proxy's handshake with a TLS broker.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<ClientStream> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut stream = TlsStream::new(tcp, conn, Vec::new());
    stream.handshake().await?;
    Ok(stream)
}

/// Appends what the socket has (waiting until it has something) to `buf`: 0 at EOF.
async fn read_some(tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        buf.reserve(READ_CHUNK);
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

impl<S: Side> TlsStream<S> {
    fn new(tcp: TcpStream, conn: S, incoming: Vec<u8>) -> Self {
        TlsStream {
            tcp,
            conn,
            incoming,
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_closed: false,
            close_sent: false,
            failed: false,
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The negotiated parameters and the peer's certificates.
    pub fn state(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Runs the handshake to its end: reads, processes, sends what rustls answers.
    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let step = self.process(Send::Nothing, None).map(|(step, _)| step);
            // Send what rustls has to say first (an alert, on failure).
            std::future::poll_fn(|cx| self.poll_send(cx)).await?;
            match step? {
                Step::Open => return Ok(()),
                Step::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Step::Blocked => {
                    if read_some(&self.tcp, &mut self.incoming).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }

    /// Lets rustls process the ciphertext read so far: records it consumed leave `incoming`,
    /// plaintext goes to `read_into` while it has room and nothing waits before it, the rest to
    /// `plain`, what rustls has to send to `outgoing`. Once the session may send application
    /// data, encrypts what `send` says into `outgoing` too (how much: the `usize`). After an
    /// error the session is failed for good.
    fn process(&mut self, send: Send<'_>, read_into: Option<&mut ReadBuf<'_>>) -> io::Result<(Step, usize)> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the TLS session failed earlier"));
        }
        let mut taken = 0;
        let result = self.process_from(&mut taken, send, read_into);
        if result.is_ok() {
            // Once per call: the bytes after each record are not moved record by record.
            self.incoming.drain(..taken);
        } else {
            (self.failed, self.incoming, self.plain) = (true, Vec::new(), Vec::new());
        }
        result
    }

    /// [`TlsStream::process`] over `incoming[*taken..]`, advancing `taken` past what rustls consumed.
    fn process_from(
        &mut self,
        taken: &mut usize,
        send: Send<'_>,
        mut read_into: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Step, usize)> {
        let TlsStream { conn, incoming, plain, outgoing, read_closed, .. } = self;
        loop {
            let UnbufferedStatus { discard, state } = conn.process(&mut incoming[*taken..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // The alert rustls queued goes out with the error. It is found before any
                    // deframing, but rustls' offsets into the buffer still hold: the same slice.
                    if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
                        conn.process(&mut incoming[*taken..]).state
                    {
                        let _ = encode_into(outgoing, SMALL, |out| encoded(encode.encode(out)));
                    }
                    return Err(tls_error(e));
                }
            };
            let done = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let mut payload = record.map_err(tls_error)?.payload;
                        if plain.is_empty()
                            && let Some(buf) = read_into.as_deref_mut()
                        {
                            let n = payload.len().min(buf.remaining());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        plain.extend_from_slice(payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(outgoing, SMALL, |out| encoded(encode.encode(out)))?;
                    None
                }
                // What was encoded is in `outgoing`, which is sent before anything else.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    None
                }
                ConnectionState::Closed => Some((Step::Closed, 0)),
                ConnectionState::BlockedHandshake => Some((Step::Blocked, 0)),
                ConnectionState::WriteTraffic(mut traffic) => {
                    let written = match send {
                        Send::Nothing => 0,
                        Send::Data(data) => {
                            let data = &data[..data.len().min(WRITE_CHUNK)];
                            // Each record adds its header, content type and tag (22–29 bytes).
                            let room = data.len() + (data.len() / (16 * 1024) + 1) * 64;
                            encode_into(outgoing, room, |out| encrypted(traffic.encrypt(data, out)))?;
                            data.len()
                        }
                        Send::CloseNotify => {
                            encode_into(outgoing, SMALL, |out| encrypted(traffic.queue_close_notify(out)))?;
                            0
                        }
                    };
                    Some((Step::Open, written))
                }
                // Early data (never enabled here) and states of later rustls versions.
                other => return Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
            };
            *taken += discard;
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Writes `outgoing` to the socket; frees it once it is all out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_pos..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.out_pos += n,
            }
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes `write`'s session writable (sending what is owed first) and encrypts into it.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_send(cx))?;
        match self.process(Send::Data(data), None)? {
            (Step::Open, n) => Poll::Ready(Ok(n)),
            (Step::Closed, _) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            (Step::Blocked, _) => Poll::Ready(Err(io::Error::other("TLS session not ready to send"))),
        }
    }
}

/// What rustls made of a slice to encode into: bytes written, or the room it needs.
enum Encoded {
    Wrote(usize),
    Need(usize),
}

fn encoded(r: Result<usize, EncodeError>) -> io::Result<Encoded> {
    match r {
        Ok(n) => Ok(Encoded::Wrote(n)),
        Err(EncodeError::InsufficientSize(s)) => Ok(Encoded::Need(s.required_size)),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

fn encrypted(r: Result<usize, EncryptError>) -> io::Result<Encoded> {
    match r {
        Ok(n) => Ok(Encoded::Wrote(n)),
        Err(EncryptError::InsufficientSize(s)) => Ok(Encoded::Need(s.required_size)),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Room for what rustls sends besides application data (alerts, handshake messages; a larger
/// one asks for more).
const SMALL: usize = 1024;

/// Lets `encode` fill the end of `out` (`room` bytes to start with), growing it as rustls asks.
fn encode_into(
    out: &mut Vec<u8>,
    mut room: usize,
    mut encode: impl FnMut(&mut [u8]) -> io::Result<Encoded>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(Encoded::Wrote(n)) => {
                out.truncate(start + n);
                return Ok(());
            }
            Ok(Encoded::Need(required)) if required > room => room = required,
            Ok(Encoded::Need(_)) => unreachable!("rustls asked for no more room than it had"),
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
}

impl<S: Side + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plain.len() {
                let n = (this.plain.len() - this.plain_pos).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // What rustls answered while reading (a key update's answer) goes out now if the
            // socket takes it, else with the next write or flush.
            if !this.outgoing.is_empty() {
                let _ = this.poll_send(cx)?;
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            this.incoming.reserve(READ_CHUNK);
            match this.tcp.try_read_buf(&mut this.incoming) {
                Ok(0) if !this.incoming.is_empty() => {
                    this.incoming = Vec::new();
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed inside a TLS record");
                    return Poll::Ready(Err(e));
                }
                Ok(0) => {
                    // A peer that closed TCP without close_notify (between records) has ended its
                    // stream all the same.
                    this.read_closed = true;
                    this.incoming = Vec::new();
                }
                Ok(_) => {
                    // Plaintext goes straight into the caller's buffer; only what does not fit waits.
                    let before = buf.filled().len();
                    if let Err(e) = this.process(Send::Nothing, Some(buf)) {
                        let _ = this.poll_send(cx); // the alert, if it can go at once
                        return Poll::Ready(Err(e));
                    }
                    if buf.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.incoming.is_empty() {
                        this.incoming = Vec::new(); // idle: hold no buffer
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: Side + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_encrypt(cx, data))?;
        // Start sending at once; whatever is left goes with the next write or flush.
        let _ = self.poll_send(cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    /// `close_notify`, then a FIN.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        if !this.close_sent {
            this.close_sent = true;
            if !this.failed {
                this.process(Send::CloseNotify, None)?;
            }
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A self-signed `localhost` certificate: the server's configuration and a client's that trusts it.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        configs_named("mqtt-chaos test", rustls::DEFAULT_VERSIONS)
    }

    /// With the client limited to `versions`.
    fn configs_named(
        issuer: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, issuer);
        let cert = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    /// Our server side against tokio-rustls' client.
    async fn ours_and_theirs() -> (ServerStream, tokio_rustls::client::TlsStream<TcpStream>) {
        ours_and_theirs_with(rustls::DEFAULT_VERSIONS).await
    }

    async fn ours_and_theirs_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (ServerStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server_config, client_config) = configs_named("mqtt-chaos test", versions);
        let (s, c) = tcp_pair().await;
        let theirs = tokio_rustls::TlsConnector::from(client_config).connect(localhost(), c);
        let ours = accept(s, |_, _| server_config);
        let (ours, theirs) = tokio::join!(ours, theirs);
        (ours.unwrap().0, theirs.unwrap())
    }

    /// Bytes no two runs of which look alike.
    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Reads exactly `n` bytes `step` at a time.
    async fn read_in_steps(r: &mut (impl AsyncRead + Unpin), n: usize, step: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = vec![0; step];
        while got.len() < n {
            let k = r.read(&mut chunk).await.unwrap();
            assert!(k > 0, "EOF after {} of {n} bytes", got.len());
            got.extend_from_slice(&chunk[..k]);
        }
        got
    }

    #[tokio::test]
    async fn bytes_pass_exactly_both_ways_whatever_the_read_size_with_either_side_ours() {
        let sent = data(300_000);
        // Ours as the server (TLS 1.3 and 1.2): the peer writes in one go, we read 7 bytes at a
        // time, and back.
        for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
            let (mut ours, mut theirs) = ours_and_theirs_with(versions).await;
            assert_eq!(ours.state().protocol_version(), Some(versions[0].version));
            let write = async {
                theirs.write_all(&sent).await.unwrap();
                theirs.flush().await.unwrap();
            };
            let (_, got) = tokio::join!(write, read_in_steps(&mut ours, sent.len(), 7));
            assert!(got == sent, "server side read what the client wrote");
            let write = async {
                for piece in sent.chunks(1000) {
                    ours.write_all(piece).await.unwrap();
                }
                ours.flush().await.unwrap();
            };
            let (_, got) = tokio::join!(write, read_in_steps(&mut theirs, sent.len(), 65_536));
            assert!(got == sent, "client read what the server side wrote");
        }
        // Ours as the client.
        let (server_config, client_config) = configs();
        let (s, c) = tcp_pair().await;
        let theirs = tokio_rustls::TlsAcceptor::from(server_config).accept(s);
        let (ours, theirs) = tokio::join!(connect(c, client_config, localhost()), theirs);
        let (mut ours, mut theirs) = (ours.unwrap(), theirs.unwrap());
        let write = async {
            ours.write_all(&sent).await.unwrap();
            ours.flush().await.unwrap();
        };
        let (_, got) = tokio::join!(write, read_in_steps(&mut theirs, sent.len(), 4096));
        assert!(got == sent);
        let write = async {
            theirs.write_all(&sent).await.unwrap();
            theirs.flush().await.unwrap();
        };
        let (_, got) = tokio::join!(write, read_in_steps(&mut ours, sent.len(), 1));
        assert!(got == sent);
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (mut ours, mut theirs) = ours_and_theirs().await;
        theirs.write_all(&data(50_000)).await.unwrap();
        theirs.flush().await.unwrap();
        read_in_steps(&mut ours, 50_000, 512).await;
        ours.write_all(&data(50_000)).await.unwrap();
        ours.flush().await.unwrap();
        read_in_steps(&mut theirs, 50_000, 512).await;
        // Nothing more to read: the read waits for the socket, holding nothing.
        let mut buf = [0u8; 512];
        let pending = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut ours).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(pending, "nothing was sent, so nothing can be read");
        let held = (ours.incoming.capacity(), ours.plain.capacity(), ours.outgoing.capacity());
        assert_eq!(held, (0, 0, 0), "incoming, plain, outgoing");
    }

    #[tokio::test]
    async fn a_key_update_from_the_peer_is_answered_and_traffic_goes_on() {
        let (mut ours, mut theirs) = ours_and_theirs().await;
        theirs.write_all(b"before").await.unwrap();
        theirs.flush().await.unwrap();
        assert_eq!(read_in_steps(&mut ours, 6, 64).await, b"before");
        // The client asks for new keys both ways (TLS 1.3 KeyUpdate, update_requested).
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        theirs.write_all(b"after").await.unwrap();
        theirs.flush().await.unwrap();
        assert_eq!(read_in_steps(&mut ours, 5, 64).await, b"after");
        ours.write_all(b"answer").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_in_steps(&mut theirs, 6, 64).await, b"answer");
    }

    #[tokio::test]
    async fn close_notify_ends_one_direction_and_the_other_goes_on() {
        let (mut ours, mut theirs) = ours_and_theirs().await;
        theirs.shutdown().await.unwrap(); // close_notify, FIN
        let mut buf = [0u8; 16];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0, "the end of the client's stream");
        ours.write_all(b"still here").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_in_steps(&mut theirs, 10, 64).await, b"still here");
        ours.shutdown().await.unwrap();
        assert_eq!(theirs.read(&mut buf).await.unwrap(), 0, "a clean end, not a truncation");
        // A peer that closes TCP without close_notify has ended its stream all the same.
        let (mut ours, mut theirs) = ours_and_theirs().await;
        ours.write_all(b"x").await.unwrap();
        ours.flush().await.unwrap();
        // (Read first: a socket closed with unread bytes, such as session tickets, sends RST.)
        assert_eq!(read_in_steps(&mut theirs, 1, 64).await, b"x");
        drop(theirs.into_inner().0);
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        // But one that closes inside a record has cut the stream short.
        let (mut ours, mut theirs) = ours_and_theirs().await;
        ours.write_all(b"x").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(read_in_steps(&mut theirs, 1, 64).await, b"x");
        let tcp = theirs.get_mut().0;
        tcp.write_all(&[0x17, 0x03, 0x03, 0x00]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let e = ours.read(&mut buf).await.expect_err("a truncated record");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    /// A peer that announces a handshake message larger than rustls allows, after a valid
    /// hello: an error for this connection, not a panic.
    #[tokio::test]
    async fn an_oversized_handshake_message_is_an_error_not_a_panic() {
        let (server_config, _) = configs();
        let (_, client_config) = configs_named("mqtt-chaos test", &[&rustls::version::TLS12]);
        let mut hello_conn = rustls::ClientConnection::new(client_config, localhost()).unwrap();
        let mut hello = Vec::new();
        hello_conn.write_tls(&mut hello).unwrap();
        let (s, mut c) = tcp_pair().await;
        let ours = tokio::spawn(accept(s, move |_, _| server_config));
        c.write_all(&hello).await.unwrap();
        // A handshake record whose message claims 0x10000 bytes (ClientKeyExchange), in part.
        c.write_all(&[0x16, 0x03, 0x03, 0x00, 0x08, 0x10, 0x01, 0x00, 0x00, 1, 2, 3, 4]).await.unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), ours).await.unwrap();
        let e = result.expect("no panic").err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn a_handshake_that_fails_says_why_and_the_peer_hears_an_alert() {
        let (server_config, _) = configs();
        let (_, untrusting) = configs_named("someone else", rustls::DEFAULT_VERSIONS); // trusts another certificate
        let (s, c) = tcp_pair().await;
        let theirs = tokio_rustls::TlsAcceptor::from(server_config).accept(s);
        let (ours, theirs) = tokio::join!(connect(c, untrusting, localhost()), theirs);
        let e = ours.err().expect("an untrusted certificate is refused");
        assert_eq!(crate::tls::failure_reason(&e), "unknown_issuer", "{e}");
        let e = theirs.expect_err("the server hears the client's alert");
        assert!(e.to_string().contains("UnknownCA") || e.to_string().contains("alert"), "{e}");
        // Not TLS at all.
        let (s, mut c) = tcp_pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (server_config, _) = configs();
        let e = accept(s, |_, _| server_config).await.err().expect("HTTP is not TLS");
        assert_eq!(crate::tls::failure_reason(&e), "not_tls", "{e}");
    }

    /// A TLS 1.1 ClientHello (as an old device sends): version 3.2, one cipher suite
    /// (TLS_RSA_WITH_AES_128_CBC_SHA), no extensions.
    fn tls11_client_hello() -> Vec<u8> {
        let mut hello = vec![0x03, 0x02];
        hello.extend([0x11; 32]); // random
        hello.extend([0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]); // no session id, suites, compression
        let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
        handshake.extend(hello);
        let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
        record.extend(handshake);
        record
    }

    #[tokio::test]
    async fn a_tls_1_1_client_is_refused_for_its_protocol_version() {
        let (s, mut c) = tcp_pair().await;
        c.write_all(&tls11_client_hello()).await.unwrap();
        let (server_config, _) = configs();
        let e = accept(s, |_, _| server_config).await.err().expect("TLS 1.1 is refused");
        assert_eq!(crate::tls::failure_reason(&e), "protocol_version", "{e}");
    }
}
