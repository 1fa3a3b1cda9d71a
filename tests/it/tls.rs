//! MQTT over TLS on either side of the proxy, with certificates made for each test (rcgen):
//! mosquitto with a TLS listener and its own command-line clients (libmosquitto) through a
//! `mqtts` proxy, byte-exact streams against a scripted TLS broker, the `drop-pingreq` profile
//! detected under TLS as on TCP, mutual TLS, an untrusted broker certificate (refused, then
//! accepted with `--upstream-insecure`), a plaintext client on a TLS listener, and key files
//! that stop the start.

use crate::harness::*;
use mqtt_chaos::config::RouteConfig;
use mqtt_chaos::record::Event;
use mqtt_chaos::tls::{RouteTls, TlsOptions};
use mqtt_chaos::transport::Transport;
use mqtt_chaos::vocab::{Cause, Side};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate
/// (CN `device-7`), and a second CA nobody trusts with a server certificate of its own; all as
/// PEM files in a temporary folder.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

fn new_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    expired: bool,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    if expired {
        (params.not_before, params.not_after) =
            (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1));
    }
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_cert, ca) = new_ca("mqtt-chaos test CA");
        let (other_cert, other) = new_ca("an untrusted CA");
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let files = [("ca.pem", ca_cert.pem()), ("other-ca.pem", other_cert.pem())];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let names = &["localhost", "127.0.0.1"][..];
        for (base, issuer, cn, sans, usage, expired) in [
            ("server", &ca, "localhost", names, server.clone(), false),
            ("client", &ca, "device-7", &[][..], ExtendedKeyUsagePurpose::ClientAuth, false),
            ("other-server", &other, "localhost", names, server.clone(), false),
            ("expired-server", &ca, "localhost", names, server.clone(), true),
        ] {
            let (cert, key) = leaf(issuer, cn, sans, usage, expired);
            std::fs::write(dir.path().join(format!("{base}.pem")), cert).unwrap();
            std::fs::write(dir.path().join(format!("{base}.key")), key).unwrap();
        }
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A rustls client that trusts the test CA, with the client certificate if `cert`.
    pub(crate) fn client_config(&self, cert: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(self.path("ca.pem")).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = if cert {
            let chain = vec![CertificateDer::from_pem_file(self.path("client.pem")).unwrap()];
            let key = PrivateKeyDer::from_pem_file(self.path("client.key")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }

    /// A TLS connection to `addr` as `localhost`.
    pub(crate) async fn connect(
        &self,
        addr: &str,
        cert: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(self.client_config(cert));
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    /// TLS options: listener with the server certificate, upstream verified with the test CA.
    pub(crate) fn options(&self) -> TlsOptions {
        TlsOptions {
            cert: Some(self.path("server.pem")),
            key: Some(self.path("server.key")),
            upstream_ca: Some(self.path("ca.pem")),
            upstream_server_name: Some("localhost".into()),
            ..TlsOptions::default()
        }
    }

    /// mosquitto with a TLS listener presenting `cert` (besides its plain one), and the TLS
    /// listener's address.
    pub(crate) fn mosquitto(&self, cert: &str) -> (Mosquitto, String) {
        let port = free_port();
        let listener = format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            self.s("ca.pem"),
            self.s(&format!("{cert}.pem")),
            self.s(&format!("{cert}.key"))
        );
        (Mosquitto::start_with(&listener), format!("127.0.0.1:{port}"))
    }
}

/// An in-process proxy route from `listen` (`tcp`/`tls`) to `upstream`.
pub(crate) async fn proxy(
    pki: &Pki,
    listen: Transport,
    upstream: &str,
    up: Transport,
    options: TlsOptions,
) -> TestProxy {
    let mut o = options;
    if listen == Transport::Tcp {
        (o.cert, o.key, o.client_ca) = (None, None, None);
    }
    if up == Transport::Tcp {
        (o.upstream_ca, o.upstream_server_name, o.upstream_insecure) = (None, None, false);
    }
    let _ = pki;
    let tls = RouteTls::load(o, listen, up, upstream).expect("TLS options load");
    let route = RouteConfig { tls, ..RouteConfig::tcp("default", "127.0.0.1:0", upstream) };
    TestProxy::start_route(route, Default::default()).await
}

fn mosquitto_client(args: &[&str]) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install -y mosquitto-clients)")
}

#[tokio::test]
async fn mosquitto_clients_over_tls_through_the_proxy_qos_0_1_2_both_ways() {
    let pki = Pki::new();
    let (broker, upstream) = pki.mosquitto("server");
    let tls_port = upstream.rsplit_once(':').unwrap().1.to_string();
    let p = proxy(&pki, Transport::Tls, &upstream, Transport::Tls, pki.options()).await;
    let via_proxy = p.addr.port().to_string();
    let direct = tls_port;
    let ca = pki.s("ca.pem");
    // Subscriber through the proxy, publisher straight to the broker; then the other way.
    for (sub_port, pub_port) in [(&via_proxy, &direct), (&direct, &via_proxy)] {
        for qos in ["0", "1", "2"] {
            let topic = format!("tls/{sub_port}/{qos}");
            let common = ["-h", "localhost", "--cafile", ca.as_str(), "-t", topic.as_str(), "-q", qos];
            let sub = mosquitto_client(&[&common[..], &["-p", sub_port, "-C", "1", "-W", "10"]].concat());
            tokio::time::sleep(Duration::from_millis(700)).await;
            // Off the runtime: the proxy under test runs on it.
            let mut publish = Command::new("mosquitto_pub");
            publish.args(common).args(["-p", pub_port, "-m", "over tls"]);
            let pubd = tokio::task::spawn_blocking(move || publish.output())
                .await
                .unwrap()
                .expect("mosquitto_pub (apt-get install -y mosquitto-clients)");
            assert!(
                pubd.status.success(),
                "publish via {pub_port}: {}",
                String::from_utf8_lossy(&pubd.stderr)
            );
            let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap()).await.unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout) == "over tls\n",
                "QoS {qos}, subscriber on {sub_port}: {:?} {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                broker.log()
            );
        }
    }
    // The records say how each side was carried.
    let closed = p.running().registry().closed();
    let s = closed.first().expect("a closed record");
    assert_eq!(
        (&s["client_transport"]["transport"], &s["broker_transport"]["transport"]),
        (&"tls".into(), &"tls".into()),
        "{s}"
    );
    let info = &s["broker_transport"]["tls"];
    assert_eq!(info["sni"], "localhost", "{s}");
    assert!(info["version"].as_str().is_some_and(|v| v.starts_with("TLSv1_")), "{s}");
    assert!(info["cipher_suite"].is_string(), "{s}");
    let metrics = p.running().metrics();
    assert!(
        metrics.contains("mqtt_chaos_tls_handshake_seconds_count{route=\"default\",side=\"client\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mqtt_chaos_tls_handshake_seconds_count{route=\"default\",side=\"broker\"}"),
        "{metrics}"
    );
}

/// A scripted TLS broker: accepts one connection, returns its stream.
async fn tls_broker(
    pki: &Pki,
) -> (String, tokio::task::JoinHandle<tokio_rustls::server::TlsStream<TcpStream>>) {
    let chain = vec![CertificateDer::from_pem_file(pki.path("server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.unwrap()
    });
    (addr, task)
}

#[tokio::test]
async fn streams_are_byte_exact_under_tls_in_both_directions_and_a_close_notify_passes_as_one() {
    let pki = Pki::new();
    let (upstream, accepted) = tls_broker(&pki).await;
    let p = proxy(&pki, Transport::Tls, &upstream, Transport::Tls, pki.options()).await;
    let mut client = pki.connect(&p.addr.to_string(), false).await.unwrap();
    // CONNECT, SUBSCRIBE and three PUBLISHes, written in awkward pieces.
    let mut up = connect_v4("exact", 30, None);
    up.extend(subscribe_v4(1, "a/#", 1));
    for i in 0..3u8 {
        up.extend(publish_v4("a/b", &vec![i; 1000 + usize::from(i)]));
    }
    for piece in up.chunks(7) {
        client.write_all(piece).await.unwrap();
        client.flush().await.unwrap();
    }
    let mut broker = accepted.await.unwrap();
    let mut got = vec![0u8; up.len()];
    tokio::time::timeout(Duration::from_secs(5), broker.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, up, "client to broker, byte for byte");
    let mut down = vec![0x20, 2, 0, 0];
    down.extend([0x90, 3, 0, 1, 1]);
    down.extend(publish_v4("a/c", &[7u8; 5000]));
    broker.write_all(&down).await.unwrap();
    broker.flush().await.unwrap();
    let mut got = vec![0u8; down.len()];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, down, "broker to client, byte for byte");
    // The client closes cleanly (close_notify, then FIN): the broker sees a clean end, and can
    // still send (a half-close).
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n =
        tokio::time::timeout(Duration::from_secs(5), broker.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(n, 0, "a clean end of stream, not an error");
    broker.write_all(&[0xd0, 0]).await.unwrap();
    broker.flush().await.unwrap();
    let mut pingresp = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut pingresp)).await.unwrap().unwrap();
    assert_eq!(pingresp, [0xd0, 0], "the other direction still flows after the half-close");
}

#[tokio::test]
async fn drop_pingreq_under_tls_is_detected_by_the_broker_as_on_tcp() {
    let pki = Pki::new();
    let (_broker, upstream) = pki.mosquitto("server");
    let mut p = proxy(&pki, Transport::Tls, &upstream, Transport::Tls, pki.options()).await;
    p.set_rules("[[rules]]\nname = \"swallow\"\naction = \"drop\"\ndirection = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n");
    let mut client = pki.connect(&p.addr.to_string(), false).await.unwrap();
    client.write_all(&connect_v4("tls-silent", 2, None)).await.unwrap();
    client.flush().await.unwrap();
    expect_packet(&mut client, Duration::from_secs(5), "CONNACK").await;
    let pinger = tokio::spawn(async move {
        // PINGREQ every second, all swallowed; the broker hears silence.
        for _ in 0..20 {
            if client.write_all(&[0xc0, 0]).await.is_err() || client.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let (_conn, close) = p.next_closed(Duration::from_secs(15)).await;
    pinger.abort();
    assert_eq!((close.closed_by, close.cause), (Side::Broker, Cause::KeepaliveTimeout), "{close:?}");
    let ratio = close.silence_ratio.unwrap();
    // mosquitto 2.0's coarse timer: between about 1.5 and 5 × Keep Alive, as over TCP.
    assert!((1.0..5.5).contains(&ratio), "{ratio}");
}

#[tokio::test]
async fn mutual_tls_admits_a_client_certificate_and_refuses_its_absence() {
    let pki = Pki::new();
    let (upstream, accepted) = tls_broker(&pki).await;
    let options = TlsOptions { client_ca: Some(pki.path("ca.pem")), ..pki.options() };
    let mut p = proxy(&pki, Transport::Tls, &upstream, Transport::Tls, options).await;
    let addr = p.addr.to_string();
    // Without a certificate: the handshake (or the first read) fails, the reason is counted.
    let refused = match pki.connect(&addr, false).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(&connect_v4("no-cert", 30, None)).await;
            let _ = s.flush().await;
            let mut b = [0u8; 1];
            !matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(1)))
        }
    };
    assert!(refused, "a client without a certificate was let in");
    let (_conn, close) = p.next_closed(Duration::from_secs(5)).await;
    assert_eq!(close.closed_by, Side::Proxy);
    assert!(
        close.reason.as_deref().is_some_and(|r| r.contains("TLS handshake with the client failed")),
        "{close:?}"
    );
    let metrics = p.running().metrics();
    assert!(
        metrics.contains("mqtt_chaos_tls_handshake_failures_total{route=\"default\",side=\"client\",reason=\"no_client_certificate\"} 1"),
        "{metrics}"
    );
    // With one: through; a rule matching the certificate's CN acts (Keep Alive 30 → 7), and
    // the record names the certificate.
    p.set_rules("[[rules]]\nname = \"by-cert\"\naction = \"rewrite_keepalive\"\nset = 7\nmatch = { cert_cn = \"device-*\" }\n");
    let mut client = pki.connect(&addr, true).await.unwrap();
    client.write_all(&connect_v4("with-cert", 30, None)).await.unwrap();
    client.flush().await.unwrap();
    let mut broker = accepted.await.unwrap();
    let mut got = vec![0u8; connect_v4("with-cert", 30, None).len()];
    tokio::time::timeout(Duration::from_secs(5), broker.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, connect_v4("with-cert", 7, None), "the cert_cn rule rewrote the Keep Alive");
    let live = p.running().registry().list();
    let c = live.iter().find(|c| c.client_id().as_deref() == Some("with-cert")).expect("the live record");
    let info = c.snapshot().client_transport.unwrap().tls.unwrap();
    assert!(info.peer_certificate);
    assert_eq!(info.peer_cn.as_deref(), Some("device-7"));
}

#[tokio::test]
async fn an_untrusted_broker_certificate_is_refused_and_accepted_when_insecure() {
    let pki = Pki::new();
    let (_broker, upstream) = pki.mosquitto("other-server");
    // Plain TCP towards the proxy, TLS towards the broker (the proxy as a TLS origination point).
    let mut strict = proxy(&pki, Transport::Tcp, &upstream, Transport::Tls, pki.options()).await;
    let mut c = TcpStream::connect(strict.addr).await.unwrap();
    c.write_all(&connect_v4("strict", 30, None)).await.unwrap();
    let (_, ending) = read_to_end(&mut c, Duration::from_secs(5)).await;
    assert_ne!(ending, Ending::Open, "the client was closed");
    let (_conn, close) = strict.next_closed(Duration::from_secs(5)).await;
    assert!(
        close.reason.as_deref().is_some_and(|r| r.contains("TLS handshake with the broker failed")),
        "{close:?}"
    );
    let metrics = strict.running().metrics();
    assert!(metrics.contains("side=\"broker\",reason=\"unknown_issuer\"} 1"), "{metrics}");

    let options = TlsOptions { upstream_insecure: true, upstream_ca: None, ..pki.options() };
    let insecure = proxy(&pki, Transport::Tcp, &upstream, Transport::Tls, options).await;
    let mut c = TcpStream::connect(insecure.addr).await.unwrap();
    c.write_all(&connect_v4("insecure", 30, None)).await.unwrap();
    let connack = expect_packet(&mut c, Duration::from_secs(5), "CONNACK").await;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let live = insecure.running().registry().list();
    let c = live.iter().find(|c| c.client_id().as_deref() == Some("insecure")).unwrap();
    let json = serde_json::to_value(c.snapshot()).unwrap();
    assert_eq!(json["broker_transport"]["unverified"], true, "{json}");
    assert_eq!(json["broker_transport"]["transport"], "tls");
    assert_eq!(json["client_transport"]["transport"], "tcp");
}

/// A broker certificate that has expired, or that names another host, is refused with its own
/// reason in the metric and the record.
#[tokio::test]
async fn an_expired_or_wrong_name_broker_certificate_is_refused_with_its_reason() {
    let pki = Pki::new();
    let (_expired, expired_at) = pki.mosquitto("expired-server");
    let (_valid, valid_at) = pki.mosquitto("server");
    let wrong_name =
        TlsOptions { upstream_server_name: Some("broker.elsewhere.example".into()), ..pki.options() };
    for (upstream, options, reason) in
        [(&expired_at, pki.options(), "expired"), (&valid_at, wrong_name, "wrong_name")]
    {
        let mut p = proxy(&pki, Transport::Tcp, upstream, Transport::Tls, options).await;
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(&connect_v4("refused", 30, None)).await.unwrap();
        let (_, ending) = read_to_end(&mut c, Duration::from_secs(5)).await;
        assert_ne!(ending, Ending::Open, "{reason}: the client was closed");
        let (_conn, close) = p.next_closed(Duration::from_secs(5)).await;
        let why = close.reason.clone().unwrap_or_default();
        assert!(why.contains("TLS handshake with the broker failed"), "{reason}: {why}");
        let metrics = p.running().metrics();
        let sample = format!(
            "mqtt_chaos_tls_handshake_failures_total{{route=\"default\",side=\"broker\",reason=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&sample), "{sample}\n{metrics}");
    }
}

#[tokio::test]
async fn a_plaintext_client_on_a_tls_listener_is_closed_and_disturbs_no_one() {
    let pki = Pki::new();
    let (upstream, accepted) = tls_broker(&pki).await;
    let mut p = proxy(&pki, Transport::Tls, &upstream, Transport::Tls, pki.options()).await;
    let mut good = pki.connect(&p.addr.to_string(), false).await.unwrap();
    let mut plain = TcpStream::connect(p.addr).await.unwrap();
    plain.write_all(&connect_v4("plain", 30, None)).await.unwrap();
    let (_, ending) = read_to_end(&mut plain, Duration::from_secs(5)).await;
    assert_ne!(ending, Ending::Open);
    let (_conn, close) = p.next_closed(Duration::from_secs(5)).await;
    assert!(
        close.reason.as_deref().is_some_and(|r| r.contains("TLS handshake with the client failed")),
        "{close:?}"
    );
    assert!(p.running().metrics().contains("side=\"client\",reason=\"not_tls\"} 1"));
    // The TLS client next to it goes on.
    good.write_all(&connect_v4("good", 30, None)).await.unwrap();
    good.flush().await.unwrap();
    let mut broker = accepted.await.unwrap();
    let mut got = vec![0u8; connect_v4("good", 30, None).len()];
    tokio::time::timeout(Duration::from_secs(5), broker.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, connect_v4("good", 30, None));
    while let Ok(ev) = p.events.try_recv() {
        assert!(!matches!(ev, Event::Closed(c) if c.client_id().as_deref() == Some("good")));
    }
}

#[tokio::test]
async fn key_files_that_cannot_be_used_stop_the_start_naming_the_file() {
    let pki = Pki::new();
    std::fs::write(pki.path("empty.pem"), "nothing here\n").unwrap();
    let run = |extra: Vec<String>| {
        let mut args = vec![
            "proxy".to_string(),
            "--listen".into(),
            "mqtts://127.0.0.1:0".into(),
            "--upstream".into(),
            "127.0.0.1:1".into(),
            "--admin".into(),
            "none".into(),
        ];
        args.extend(extra);
        Command::new(binary()).args(&args).output().unwrap()
    };
    let cases = [
        (vec![], "--tls-cert: a TLS listener needs its certificate".to_string()),
        (
            vec!["--tls-cert".into(), pki.s("server.pem"), "--tls-key".into(), pki.s("missing.key")],
            format!("--tls-key {}", pki.s("missing.key")),
        ),
        (
            vec!["--tls-cert".into(), pki.s("empty.pem"), "--tls-key".into(), pki.s("server.key")],
            format!("--tls-cert {}: holds no PEM certificate", pki.s("empty.pem")),
        ),
        (
            vec!["--tls-cert".into(), pki.s("server.pem"), "--tls-key".into(), pki.s("client.key")],
            format!(
                "--tls-key {}: does not match the certificate in {}",
                pki.s("client.key"),
                pki.s("server.pem")
            ),
        ),
    ];
    for (extra, message) in cases {
        let out = run(extra.clone());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(&message), "{extra:?}: {err}");
        let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
        let body = key.lines().nth(1).unwrap();
        assert!(!err.contains(body), "key material in the message");
    }
    // TLS options on a plain listener would do nothing: refused.
    let out = Command::new(binary())
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--admin",
            "none",
            "--tls-cert",
        ])
        .arg(pki.path("server.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert: only applies to a TLS listener"));
}

#[tokio::test]
async fn a_client_that_never_finishes_its_tls_or_websocket_handshake_is_closed_at_the_connect_timeout() {
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let settings =
        || mqtt_chaos::config::Settings { connect_timeout: Duration::from_millis(300), ..Default::default() };
    let listen_tls = TlsOptions { upstream_ca: None, upstream_server_name: None, ..pki.options() };
    let tls = RouteTls::load(listen_tls, Transport::Tls, Transport::Tcp, &broker.addr()).unwrap();
    let tls_route = RouteConfig { tls, ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr()) };
    let ws_route = RouteConfig {
        listen_ws: Some("/mqtt".into()),
        ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr())
    };
    // Silent after connecting (TLS), and a request that stops halfway (WebSocket).
    for (route, sends, what) in [
        (tls_route, &b""[..], "TLS handshake with the client failed"),
        (ws_route, &b"GET /mqtt HTTP/1.1\r\nHost: p\r\n"[..], "WebSocket handshake with the client failed"),
    ] {
        let mut p = TestProxy::start_route(route, settings()).await;
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(sends).await.unwrap();
        let started = std::time::Instant::now();
        let (_, ending) = read_to_end(&mut c, Duration::from_secs(5)).await;
        assert_ne!(ending, Ending::Open, "{what}: still open after 5 s");
        assert!(started.elapsed() < Duration::from_secs(2), "{what}: closed after {:?}", started.elapsed());
        let (_conn, close) = p.next_closed(Duration::from_secs(2)).await;
        let reason = close.reason.unwrap_or_default();
        assert!(reason.contains(what) && reason.contains("no handshake within 300ms"), "{reason}");
    }
}
