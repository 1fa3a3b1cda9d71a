//! Shared test parts: a real mosquitto on a free loopback port, the proxy in-process, raw MQTT
//! packet builders, a scripted fake broker, and waiting for connection records.

use mqtt_chaos::config::{RouteConfig, Settings};
use mqtt_chaos::record::{Connection, Event};
use mqtt_chaos::server::{Proxy, RunningProxy};
use mqtt_chaos::vocab::CloseInfo;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

/// Where mosquitto lives: on PATH, or in sbin (which root's PATH may lack).
pub fn mosquitto_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("mosquitto")).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain(["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed, and the end-to-end tests need a real broker: \
                 install it with `apt-get install -y mosquitto` (Debian/Ubuntu), or run `.ci/run`"
            )
        })
}

/// Where Prometheus lives.
pub fn prometheus_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/bin/prometheus")]).find(|p| p.is_file()).unwrap_or_else(
        || {
            panic!(
                "prometheus is not installed, and the dashboard test checks every query against a real one: \
             install it with `apt-get install -y prometheus` (Debian/Ubuntu), or run `.ci/run`"
            )
        },
    )
}

/// A Prometheus server on a free loopback port scraping its targets every second (one job; each
/// target's `instance` label is its address); stopped on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(target: &str) -> Prometheus {
        Self::scraping(&[target])
    }

    pub fn scraping(targets: &[&str]) -> Prometheus {
        let targets = targets.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
        let binary = prometheus_binary();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: mqtt-chaos\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let p = Prometheus { child, port, _dir: dir };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("prometheus did not start listening on {port}");
    }

    /// GET on Prometheus' HTTP API; the JSON answer.
    pub async fn api(&self, path_and_query: &str) -> serde_json::Value {
        let client = mqtt_chaos::ctl::Client::new(&format!("http://127.0.0.1:{}", self.port), None).unwrap();
        let reply = client.request("GET", path_and_query, None, b"").await.unwrap();
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
    }

    /// Runs an instant query.
    pub async fn query(&self, expr: &str) -> serde_json::Value {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr))).await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use mqtt_chaos::ctl::percent_encode;

/// A free loopback port (bound and released; the caller binds it next).
/// An address nothing listens on, reserved while the socket lives (bound, never listening), so
/// no other test can take the port: dials to it are refused.
pub fn dead_address() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    (socket, addr)
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A mosquitto broker with its own config on a free loopback port, stopped on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Starts mosquitto with extra config lines.
    pub fn start_with(extra: &str) -> Mosquitto {
        let binary = mosquitto_binary();
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     log_type all\nlog_dest stderr\nlog_timestamp true\n{extra}\n"
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
            let child = Self::spawn(&binary, &conf, log);
            let mut m = Mosquitto { child, port, dir, binary: binary.clone() };
            if m.wait_ready() {
                return m;
            }
            // Most likely the port was taken between free_port() and mosquitto's bind.
        }
        panic!("mosquitto did not start listening after 5 attempts");
    }

    fn spawn(binary: &Path, conf: &Path, log: std::fs::File) -> Child {
        Command::new(binary)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()))
    }

    /// Kills the broker (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same config.
    pub fn restart(&mut self) {
        let log =
            std::fs::OpenOptions::new().append(true).open(self.dir.path().join("mosquitto.log")).unwrap();
        self.child = Self::spawn(&self.binary, &self.dir.path().join("mosquitto.conf"), log);
        assert!(self.wait_ready(), "mosquitto did not come back on port {}", self.port);
    }

    fn wait_ready(&mut self) -> bool {
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What mosquitto logged so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy running in this process with one route called `default`.
pub struct TestProxy {
    pub running: Option<RunningProxy>,
    pub addr: SocketAddr,
    pub events: broadcast::Receiver<Event>,
}

impl TestProxy {
    pub async fn start(upstream: &str) -> TestProxy {
        Self::start_with(upstream, Settings::default()).await
    }

    pub async fn start_with(upstream: &str, settings: Settings) -> TestProxy {
        Self::start_route(RouteConfig::tcp("default", "127.0.0.1:0", upstream), settings).await
    }

    /// Starts the proxy with one route as given (its listen address should be port 0).
    pub async fn start_route(route: RouteConfig, settings: Settings) -> TestProxy {
        let proxy = Proxy::bind(&[route], settings).await.expect("bind the proxy");
        let events = proxy.registry().subscribe();
        let running = proxy.start();
        let addr = running.routes()[0].listen;
        TestProxy { running: Some(running), addr, events }
    }

    /// Starts the proxy with a profile from the repository's `profiles/` folder active.
    pub async fn with_profile(upstream: &str, profile: &str) -> TestProxy {
        let proxy = Self::start(upstream).await;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles").join(format!("{profile}.toml"));
        let p = mqtt_chaos::fault::load_profile(&path).unwrap_or_else(|e| panic!("{e}"));
        proxy.running().set_rules(p.rule_set());
        proxy
    }

    /// Activates rules given as TOML `[[rules]]` tables.
    pub fn set_rules(&self, toml_rules: &str) {
        let spec: mqtt_chaos::fault::ProfileSpec =
            toml::from_str(&format!("name = \"test\"\n{toml_rules}")).expect("test rules parse");
        let p = spec.compile().expect("test rules are valid");
        self.running().set_rules(p.rule_set());
    }

    pub fn running(&self) -> &RunningProxy {
        self.running.as_ref().unwrap()
    }

    /// A raw MQTT 3.1.1 client through the proxy, connected (its CONNACK read).
    pub async fn connected(&self, client_id: &str, keep_alive: u16) -> TcpStream {
        let mut s = self.connect().await;
        s.write_all(&connect_v4(client_id, keep_alive, None)).await.unwrap();
        expect_packet(&mut s, Duration::from_secs(5), "CONNACK").await;
        s
    }

    pub async fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Waits for the next connection to close and returns its record.
    pub async fn next_closed(&mut self, within: Duration) -> (Arc<Connection>, CloseInfo) {
        let (_, conn, close) = self.events_until_closed(within).await;
        (conn, close)
    }

    /// Waits until both sides of `conn` are gone (its first close may come well before).
    pub async fn ended(conn: &Connection, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while conn.snapshot().ended_s.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "connection {} did not end in time", conn.id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Collects events until a connection closes (its first close): `CONNECT`, `CONNACK`,
    /// `PUBLISH <direction> <topic>`, and returns them with the closed record.
    pub async fn events_until_closed(
        &mut self,
        within: Duration,
    ) -> (Vec<String>, Arc<Connection>, CloseInfo) {
        self.events_until(within, false).await
    }

    /// Like [`TestProxy::events_until_closed`], until both sides of a connection are gone.
    pub async fn events_until_ended(
        &mut self,
        within: Duration,
    ) -> (Vec<String>, Arc<Connection>, CloseInfo) {
        self.events_until(within, true).await
    }

    async fn events_until(
        &mut self,
        within: Duration,
        ended: bool,
    ) -> (Vec<String>, Arc<Connection>, CloseInfo) {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("no connection closed in time")
                .expect("event stream ended");
            match ev {
                Event::Connect(_) => seen.push("CONNECT".to_string()),
                Event::Connack(_) => seen.push("CONNACK".to_string()),
                Event::Publish { direction, topic, .. } => seen.push(format!("PUBLISH {direction} {topic}")),
                Event::WillTopicPublish { topic, .. } => seen.push(format!("OBSERVED {topic}")),
                Event::Closed(conn) | Event::Ended(conn) if ended == matches!(ev, Event::Ended(_)) => {
                    let close = conn.close_info().expect("closed record has close info");
                    return (seen, conn, close);
                }
                _ => {}
            }
        }
    }
}

// ---- a raw pinging client ------------------------------------------------------------

/// What a pinging client saw.
#[derive(Debug)]
pub struct Pinged {
    pub ending: Ending,
    /// From the CONNACK to the end (or to the end of the run if still open).
    pub lasted: Duration,
    /// When each PINGRESP arrived, after the CONNACK.
    pub pingresps: Vec<Duration>,
}

/// A raw MQTT 3.1.1 client that connects through `addr`, then sends a PINGREQ every `every`
/// (the first one after `every`) for at most `run`.
pub async fn pinging_client(
    addr: SocketAddr,
    client_id: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
    every: Option<Duration>,
    run: Duration,
) -> Pinged {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_v4(client_id, keep_alive, will)).await.unwrap();
    expect_packet(&mut s, Duration::from_secs(5), "CONNACK").await;
    let start = Instant::now();
    let (mut rx, mut tx) = s.into_split();
    let (events, mut seen) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            match read_packet(&mut rx).await {
                Ok(p) if p == PINGRESP => drop(events.send(Ok(start.elapsed()))),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return drop(events.send(Err(Ending::Reset)));
                }
                Err(_) => return drop(events.send(Err(Ending::Eof))),
            }
        }
    });
    let mut pingresps = Vec::new();
    let mut ticker = every.map(|e| tokio::time::interval_at(start + e, e));
    let deadline = start + run;
    let ending = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break Ending::Open,
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => {
                let _ = tx.write_all(&PINGREQ).await;
            }
            ev = seen.recv() => match ev {
                Some(Ok(at)) => pingresps.push(at),
                Some(Err(ending)) => break ending,
                None => break Ending::Eof,
            },
        }
    };
    reader.abort();
    Pinged { ending, lasted: start.elapsed(), pingresps }
}

// ---- raw MQTT packets ------------------------------------------------------------------

/// A packet from its first byte and body (the remaining length is computed).
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    mqtt_chaos::codec::encode_varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// An MQTT 3.1.1 CONNECT (clean session) with an optional Will (topic, payload), QoS 0.
pub fn connect_v4(client_id: &str, keep_alive: u16, will: Option<(&str, &str)>) -> Vec<u8> {
    use mqtt_chaos::codec::encode::{ConnectSpec, WillSpec};
    let mut c = ConnectSpec::new(mqtt_chaos::codec::Protocol::V311, client_id, keep_alive);
    c.will = will.map(|(topic, payload)| WillSpec {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos: 0,
        retain: false,
        delay_interval: None,
    });
    c.encode()
}

pub fn subscribe_v4(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    mqtt_chaos::codec::encode::subscribe(mqtt_chaos::codec::Protocol::V311, packet_id, filter, qos)
}

pub fn publish_v4(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

pub const PINGREQ: [u8; 2] = [0xc0, 0x00];
pub const PINGRESP: [u8; 2] = [0xd0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// Reads one whole MQTT packet (fixed header included).
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = vec![r.read_u8().await?];
    let mut len = 0usize;
    for i in 0..4 {
        let b = r.read_u8().await?;
        out.push(b);
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let start = out.len();
    out.resize(start + len, 0);
    r.read_exact(&mut out[start..]).await?;
    Ok(out)
}

/// Reads one packet within `within`, panicking with `what` if none arrives.
pub async fn expect_packet<R: AsyncRead + Unpin>(r: &mut R, within: Duration, what: &str) -> Vec<u8> {
    tokio::time::timeout(within, read_packet(r))
        .await
        .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
        .unwrap_or_else(|e| panic!("reading {what}: {e}"))
}

/// How a socket ended when read to the end.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Eof,
    Reset,
    Open,
}

/// Reads until the peer closes (or `within` passes) and tells how the socket ended and what
/// arrived before.
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R, within: Duration) -> (Vec<u8>, Ending) {
    let mut data = Vec::new();
    let ending = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) => return Ending::Eof,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ending::Reset,
                Err(e) => panic!("unexpected read error: {e}"),
            }
        }
    })
    .await
    .unwrap_or(Ending::Open);
    (data, ending)
}

/// A scripted broker on a free loopback port: the test accepts and drives each connection.
pub struct FakeBroker {
    pub listener: TcpListener,
}

impl FakeBroker {
    pub async fn start() -> FakeBroker {
        FakeBroker { listener: TcpListener::bind("127.0.0.1:0").await.unwrap() }
    }

    pub fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    pub async fn accept(&self) -> TcpStream {
        let (s, _) = tokio::time::timeout(Duration::from_secs(5), self.listener.accept())
            .await
            .expect("the proxy did not dial the fake broker")
            .unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

/// One memory figure of a process from /proc/PID/status, in bytes: `VmRSS` (resident now),
/// `VmHWM` (resident at most), `RssAnon` (its heap and stacks), …
pub fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resident-memory high-water mark of a process (bytes).
pub fn peak_rss(pid: u32) -> u64 {
    proc_memory(pid, "VmHWM")
}

/// A child process killed when the test ends, even by a failed assertion.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy binary, running `proxy --listen <free port> --upstream <upstream>` plus `extra`
/// (`--admin none` unless `extra` names an admin address), once it listens. Killed on drop.
pub struct ProxyProcess {
    pub child: KillOnDrop,
    pub listen: String,
}

impl ProxyProcess {
    pub fn start(upstream: &str, extra: &[&str]) -> ProxyProcess {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["proxy", "--listen", &listen, "--upstream", upstream];
        if !extra.contains(&"--admin") {
            args.extend(["--admin", "none"]);
        }
        args.extend(extra);
        let child = KillOnDrop(
            Command::new(binary()).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap(),
        );
        // Ready when the route listens, and the admin API too if one was asked for.
        let admin = extra.iter().position(|a| *a == "--admin").map(|i| extra[i + 1]).filter(|a| *a != "none");
        for addr in std::iter::once(listen.as_str()).chain(admin) {
            let ready = (0..200).any(|_| {
                let up = std::net::TcpStream::connect(addr).is_ok();
                if !up {
                    std::thread::sleep(Duration::from_millis(25));
                }
                up
            });
            assert!(ready, "the proxy did not start listening on {addr}");
        }
        ProxyProcess { child, listen }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub async fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.listen).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

/// The proxy binary built for these tests.
/// Starts the binary and waits until it listens on `listen`. The admin API is off: parallel
/// tests would compete for its default port.
pub fn spawn_binary(args: &[&str], listen: &str) -> Child {
    let mut child = Command::new(binary())
        .args(args)
        .args(["--admin", "none"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!("the proxy did not listen on {listen}:\n{}", String::from_utf8_lossy(&out.stderr));
}

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mqtt-chaos"))
}

/// `mqtt-chaos ctl --admin http://ADMIN ARGS…`: its exit code, stdout and stderr.
pub fn ctl(admin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .args(["ctl", "--admin", &format!("http://{admin}")])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
