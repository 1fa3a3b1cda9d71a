//! TLS on both sides, haproxy against mqtt-chaos (`--tls`): each terminates the client's TLS and
//! re-encrypts towards a TLS sink. One cipher suite everywhere (TLS 1.3, AES-128-GCM: the client
//! and the sink offer only it), a certificate made for the run (rcgen, ECDSA P-256). Measured:
//! one connection streaming 1 KiB and 64 KiB PUBLISHes, handshakes per second (connect, TLS
//! handshake, CONNECT/CONNACK, close; 8 at a time), and RSS per idle TLS connection beside the
//! same figure for plain TCP through mqtt-chaos.

use crate::{Relay, ScratchDir, SinkStats, free_port, rss_kib, start, stream_to};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// TLS 1.3 with AES-128-GCM only.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

struct Pki {
    dir: ScratchDir,
    cert: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = ScratchDir::new();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("combined.pem"), format!("{}{}", cert.pem(), key.serialize_pem()))
            .unwrap();
        Pki { cert: cert.der().clone(), dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A TLS connection through `addr`, past its CONNACK.
async fn connected(
    addr: &str,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut s = tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    s.write_all(&crate::CONNECT).await.unwrap();
    s.flush().await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    s
}

fn haproxy(pki: &Pki, sink: &str, maxconn: usize) -> Relay {
    let bind = format!("ssl crt {}", pki.file("combined.pem"));
    crate::haproxy_with(sink, maxconn, &bind, "ssl verify none")
}

fn chaos(pki: &Pki, proxy: &Path, sink: &str) -> Relay {
    let addr = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = [
        "proxy",
        "--listen",
        &format!("mqtts://{addr}"),
        "--tls-cert",
        &pki.file("cert.pem"),
        "--tls-key",
        &pki.file("key.pem"),
        "--upstream",
        &format!("mqtts://{sink}"),
        "--upstream-insecure",
        "--admin",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    start("mqtt-chaos", &proxy.display().to_string(), &args, addr, None)
}

/// Completed connect + handshake + CONNECT/CONNACK + close per second, `workers` at a time.
async fn handshakes(addr: &str, tls: &tokio_rustls::TlsConnector, seconds: u64, workers: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (addr, tls, done) = (addr.to_string(), tls.clone(), done.clone());
            tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let mut s = connected(&addr, &tls).await;
                    let _ = s.shutdown().await;
                    done.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// RSS per idle connection (KiB): `n` connections opened, then held for a second.
async fn idle_kib<S: Send + 'static>(pid: u32, n: usize, open: impl AsyncFn() -> S) -> f64 {
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(open().await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    after.saturating_sub(before) as f64 / n as f64
}

/// The TLS table: haproxy and mqtt-chaos, same run.
pub async fn run(proxy: &Path, seconds: u64, idle: usize) -> String {
    let pki = Pki::new();
    let (sink, stats) = crate::sink_with(Some(pki.acceptor())).await;
    let stats: &SinkStats = &stats;
    let client = pki.connector();
    let mut rows = Vec::new();
    for name in ["haproxy", "mqtt-chaos"] {
        let relay = if name == "haproxy" {
            haproxy(&pki, &sink, idle.max(200) + 50)
        } else {
            chaos(&pki, proxy, &sink)
        };
        eprintln!("measuring TLS through {name}");
        let mut tput = Vec::new();
        for payload in [1024, 64 * 1024] {
            let conn = connected(&relay.addr, &client).await;
            tput.push(stream_to(vec![conn], stats, payload, seconds).await.0);
        }
        let rate = handshakes(&relay.addr, &client, seconds, 8).await;
        let pid = relay.pid().expect("a relay process");
        let tls_kib = idle_kib(pid, idle, async || connected(&relay.addr, &client).await).await;
        rows.push((name, tput, rate, tls_kib));
    }
    // The same idle figure for plain TCP through mqtt-chaos, for the ratio.
    let (plain_sink, _) = crate::sink().await;
    let plain = crate::chaos("mqtt-chaos", proxy, &plain_sink, None);
    let tcp_kib = idle_kib(plain.pid().unwrap(), idle, async || crate::connected(&plain.addr).await).await;
    let mut out = String::from(
        "\n### TLS on both sides (TLS 1.3, AES-128-GCM, ECDSA P-256)\n\n\
         | relay | 1 conn 1 KiB MB/s | 1 conn 64 KiB MB/s | handshakes/s (8 at a time) | idle RSS per TLS conn, KiB |\n|---|---|---|---|---|\n",
    );
    let ha = rows[0].clone();
    for (name, tput, rate, kib) in &rows {
        let ratio =
            |x: f64, h: f64| if *name == "haproxy" { String::new() } else { format!(" ({:.2}×)", x / h) };
        out.push_str(&format!(
            "| {name} | {:.1}{} | {:.1}{} | {:.0}{} | {:.1} |\n",
            tput[0],
            ratio(tput[0], ha.1[0]),
            tput[1],
            ratio(tput[1], ha.1[1]),
            rate,
            ratio(*rate, ha.2),
            kib
        ));
    }
    out.push_str(&format!(
        "\n{seconds} s per throughput and handshake cell; {idle} idle connections; mqtt-chaos over plain TCP in the same run: {tcp_kib:.1} KiB per idle connection (TLS ÷ TCP = {:.2}).\n",
        rows[1].3 / tcp_kib.max(0.001)
    ));
    out
}
