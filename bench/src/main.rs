//! `mqtt-chaos-bench`: whole-system benchmarks on loopback, side by side in one run.
//!
//! The upstream is a sink that answers CONNECT with CONNACK and PINGREQ with PINGRESP and
//! discards PUBLISH. In front of it, in turn: nothing (direct), haproxy (`mode tcp`), socat, and
//! mqtt-chaos with no rule, with the `drop-pingreq` profile, with 20 rules that match no
//! connection, and with 10,000 such rules. For each: one connection streaming QoS 0 PUBLISH
//! (16 B, 1 KiB, 64 KiB payloads), 100 connections streaming 1 KiB, and 10,000 sequential
//! PINGREQ→PINGRESP round trips; for haproxy, mqtt-chaos and mqtt-chaos with 10,000 rules also N
//! idle connections (Keep Alive 30 s, pinging): RSS per connection and CPU.
//!
//! Then rule churn: mqtt-chaos with 10,000 rules and 1,000 open connections gets 1,000 more
//! rules through its admin API, one request after the other, while one more connection pings
//! without pause: the latency of each `POST /rules`, and the ping round trips during the churn
//! against the same connection's round trips before it.
//!
//! Every run is bounded in time and traffic. The result is markdown tables.

mod order;
mod tls;

use clap::Parser;
use mqtt_chaos::codec::{PacketType, Splitter, Step, encode_varint};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Benchmarks mqtt-chaos against a direct connection, haproxy and socat on loopback")]
struct Args {
    /// The mqtt-chaos binary to measure (build both with `cargo build --release --workspace`;
    /// for perf or heaptrack, `cargo build --profile profiling --workspace` and
    /// `--proxy target/profiling/mqtt-chaos`: the same code with line tables).
    #[arg(long, default_value = "target/release/mqtt-chaos")]
    proxy: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Idle connections for the memory/CPU measurement. Each costs the relay two file
    /// descriptors and this process two (client and sink side): `ulimit -n` must exceed
    /// 2 × this, plus a few dozen.
    #[arg(long, default_value_t = 8_000)]
    idle: usize,
    /// Seconds between the PINGREQs of each idle connection (Keep Alive 30 s pings every 30 s).
    /// Where the open-files limit caps `--idle`, a shorter interval reproduces the packet rate
    /// of more connections: 9,900 pinging every 15 s is the rate of 19,800 every 30 s.
    #[arg(long, default_value_t = 30)]
    ping_every: u64,
    /// Sequential PINGREQ round trips.
    #[arg(long, default_value_t = 10_000)]
    pings: usize,
    /// Where to write the markdown table (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rules added one by one in the churn measurement (0: skip it).
    #[arg(long, default_value_t = 1_000)]
    churn: usize,
    /// Measure only the relays with these names (repeatable, e.g. `--only haproxy --only
    /// mqtt-chaos`); ratios need `haproxy` among them.
    #[arg(long, value_name = "RELAY")]
    only: Vec<String>,
    /// Trials per cell of the arrival-order measurement (direct, haproxy, mqtt-chaos; 0: skip it).
    #[arg(long, default_value_t = 200)]
    order_trials: usize,
    /// Measure TLS on both sides only: haproxy and mqtt-chaos terminating and re-encrypting
    /// (1 KiB and 64 KiB throughput, handshakes per second, idle RSS per TLS connection).
    #[arg(long)]
    tls: bool,

    /// Measure only arrival order (no throughput, round trips, idle connections or churn).
    #[arg(long)]
    order_only: bool,
}

/// A profile of `n` rules that match no connection (client-id patterns, the costlier kind to
/// match: they cannot be looked up, every CONNECT checks each).
fn inert_rules(n: usize) -> String {
    let mut text = format!("name = \"{n}-inert-rules\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[rules]]\nname = \"inert-{i}\"\naction = \"drop\"\npackets = [\"PUBLISH\"]\nmatch = {{ client_id = \"nobody-{i}-*\" }}\n"
        ));
    }
    text
}

/// What the sink received.
#[derive(Default)]
struct SinkStats {
    bytes: AtomicU64,
    publishes: AtomicU64,
}

/// The upstream: answers CONNECT and PINGREQ, discards PUBLISH.
async fn sink() -> (String, Arc<SinkStats>) {
    sink_with(None).await
}

/// [`sink`], behind TLS when `tls` is given.
async fn sink_with(tls: Option<tokio_rustls::TlsAcceptor>) -> (String, Arc<SinkStats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stats = Arc::new(SinkStats::default());
    let s = stats.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            let (stats, tls) = (s.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_sink(conn, &stats).await,
                    Some(acceptor) => {
                        if let Ok(conn) = acceptor.accept(conn).await {
                            serve_sink(conn, &stats).await;
                        }
                    }
                }
            });
        }
    });
    (addr, stats)
}

/// One sink connection: answers CONNECT and PINGREQ, counts bytes and PUBLISHes.
async fn serve_sink<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, stats: &SinkStats) {
    let mut splitter = Splitter::new(4096);
    let mut buf = vec![0u8; 256 * 1024];
    let (mut start, mut end) = (0, 0);
    loop {
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        let n = match conn.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        end += n;
        stats.bytes.fetch_add(n as u64, Relaxed);
        let mut reply = Vec::new();
        loop {
            match splitter.step(&buf[start..end]) {
                Step::Frame(h) => {
                    match h.packet_type {
                        PacketType::Connect => reply.extend_from_slice(&[0x20, 0x02, 0x00, 0x00]),
                        PacketType::Pingreq => reply.extend_from_slice(&[0xd0, 0x00]),
                        PacketType::Publish => drop(stats.publishes.fetch_add(1, Relaxed)),
                        _ => {}
                    }
                    start += h.frame_len();
                }
                Step::StreamHead(h) => {
                    stats.publishes.fetch_add(u64::from(h.packet_type == PacketType::Publish), Relaxed);
                    start += usize::from(h.header_len);
                }
                Step::StreamBody(n) => start += n,
                Step::NeedMore { .. } => break,
                Step::Malformed(_) => return,
            }
        }
        if !reply.is_empty() && (conn.write_all(&reply).await.is_err() || conn.flush().await.is_err()) {
            return;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A scratch directory for a relay's config, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Relaxed);
        let dir = std::env::temp_dir().join(format!("mqtt-chaos-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a relay when called (the order trials start each one afresh).
type StartRelay<'a> = Box<dyn Fn() -> Relay + 'a>;

/// A relay in front of the sink.
struct Relay {
    name: String,
    addr: String,
    child: Option<Child>,
    _dir: Option<ScratchDir>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Relay {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

fn wait_listening(addr: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

fn start(name: &str, program: &str, args: &[String], addr: String, dir: Option<ScratchDir>) -> Relay {
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (apt-get install -y haproxy socat)"));
    wait_listening(&addr);
    Relay { name: name.into(), addr, child: Some(child), _dir: dir }
}

fn haproxy(sink: &str, idle: usize) -> Relay {
    // haproxy asks for 2 × maxconn + 17 descriptors at start and refuses to run without them.
    haproxy_with(sink, idle.max(200) + 50, "", "") // the throughput runs open 100 connections
}

/// haproxy in `mode tcp` from a free loopback port to `sink`, with `bind_options` (e.g. `ssl crt
/// FILE`) on its listener and `server_options` on its connection to the sink.
fn haproxy_with(sink: &str, maxconn: usize, bind_options: &str, server_options: &str) -> Relay {
    let dir = ScratchDir::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             frontend f\n  bind {addr} {bind_options}\n  maxconn {maxconn}\n  default_backend b\nbackend b\n  server s {sink} {server_options}\n"
        ),
    )
    .unwrap();
    start("haproxy", "haproxy", &["-db".into(), "-f".into(), cfg.display().to_string()], addr, Some(dir))
}

fn socat(sink: &str) -> Relay {
    let port = free_port();
    let args =
        vec![format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"), format!("TCP:{sink}")];
    start("socat", "socat", &args, format!("127.0.0.1:{port}"), None)
}

fn chaos(name: &str, proxy: &std::path::Path, sink: &str, profile: Option<&str>) -> Relay {
    chaos_with_admin(name, proxy, sink, profile, "none")
}

fn chaos_with_admin(
    name: &str,
    proxy: &std::path::Path,
    sink: &str,
    profile: Option<&str>,
    admin: &str,
) -> Relay {
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = ScratchDir::new();
    let mut args = vec!["proxy".into(), "--listen".into(), addr.clone(), "--upstream".into(), sink.into()];
    args.extend(["--admin".into(), admin.into()]);
    if let Some(text) = profile {
        let file = dir.path().join("profile.toml");
        std::fs::write(&file, text).unwrap();
        args.extend(["--profile".into(), file.display().to_string()]);
    }
    start(name, &proxy.display().to_string(), &args, addr, Some(dir))
}

fn publish(payload: usize) -> Vec<u8> {
    let mut p = vec![0x30];
    encode_varint(2 + 5 + payload, &mut p);
    p.extend_from_slice(&[0, 5, b'b', b'e', b'n', b'c', b'h']);
    p.extend(std::iter::repeat_n(0x42u8, payload));
    p
}

const CONNECT: [u8; 18] = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 4, b'b', b'e', b'n', b'c'];

async fn connected(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&CONNECT).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    s
}

/// MB/s and packets/s reaching the sink with `conns` connections streaming `payload`-byte PUBLISHes.
async fn throughput(addr: &str, sink: &SinkStats, payload: usize, conns: usize, seconds: u64) -> (f64, f64) {
    let mut streams = Vec::new();
    for _ in 0..conns {
        streams.push(connected(addr).await);
    }
    stream_to(streams, sink, payload, seconds).await
}

/// [`throughput`] over connections already made (and past their CONNACK).
async fn stream_to<S: AsyncWrite + Unpin + Send + 'static>(
    streams: Vec<S>,
    sink: &SinkStats,
    payload: usize,
    seconds: u64,
) -> (f64, f64) {
    let one = publish(payload);
    let batch: Vec<u8> =
        one.iter().copied().cycle().take(one.len() * (256 * 1024 / one.len()).max(1)).collect();
    let batch = Arc::new(batch);
    let (b0, p0, t0) = (sink.bytes.load(Relaxed), sink.publishes.load(Relaxed), Instant::now());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut s in streams {
        let batch = batch.clone();
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout_at(deadline, async {
                loop {
                    if s.write_all(&batch).await.is_err() {
                        return;
                    }
                }
            })
            .await;
            s
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        let mut s = t.await.unwrap();
        let _ = s.flush().await;
        open.push(s);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (b1, p1) = (sink.bytes.load(Relaxed), sink.publishes.load(Relaxed));
    drop(open);
    tokio::time::sleep(Duration::from_millis(300)).await; // let queued bytes drain before the next run
    ((b1 - b0) as f64 / elapsed / 1e6, (p1 - p0) as f64 / elapsed)
}

/// p50, p99, p99.9 of sequential PINGREQ→PINGRESP round trips, in microseconds.
async fn ping_rtt(addr: &str, n: usize) -> (f64, f64, f64) {
    let mut s = connected(addr).await;
    let mut rtts = Vec::with_capacity(n);
    let mut resp = [0u8; 2];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&[0xc0, 0x00]).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];
    (q(0.5), q(0.99), q(0.999))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// RSS per idle connection (KiB) and CPU (% of a core) over 10 s with `n` connections each
/// pinging every `every` s, staggered.
async fn idle(relay: &Relay, n: usize, every: u64) -> (f64, f64) {
    let pid = relay.pid().expect("a relay process");
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(500) {
        let batch: Vec<_> = (0..500.min(n - chunk * 500))
            .map(|_| {
                tokio::spawn({
                    let addr = relay.addr.clone();
                    async move { connected(&addr).await }
                })
            })
            .collect();
        for t in batch {
            conns.push(t.await.unwrap());
        }
    }
    let mut pingers = Vec::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        let offset = Duration::from_millis((i as u64 * every * 1000) / n as u64);
        pingers.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut resp = [0u8; 2];
            loop {
                if s.write_all(&[0xc0, 0x00]).await.is_err() || s.read_exact(&mut resp).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(every)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu = (cpu_ticks(pid) - c0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0;
    let after = rss_kib(pid);
    for p in pingers {
        p.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ((after.saturating_sub(before)) as f64 / n as f64, cpu)
}

#[derive(Default)]
struct Row {
    name: String,
    tput: Vec<(f64, f64)>,
    many: f64,
    rtt: (f64, f64, f64),
    idle: Option<(f64, f64)>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        args.proxy.is_file(),
        "{} is missing: run `cargo build --release --workspace` first",
        args.proxy.display()
    );
    let (sink_addr, sink_stats) = sink().await;
    let drop_pingreq = mqtt_chaos::fault::profile::BUILT_IN
        .iter()
        .find_map(|(name, text)| (*name == "drop-pingreq").then_some(*text))
        .expect("drop-pingreq is built in");
    let twenty = inert_rules(20);
    let ten_thousand = inert_rules(10_000);
    let relays: Vec<Box<dyn Fn() -> Relay>> = vec![
        Box::new(|| Relay { name: "direct".into(), addr: sink_addr.clone(), child: None, _dir: None }),
        Box::new(|| haproxy(&sink_addr, args.idle)),
        Box::new(|| socat(&sink_addr)),
        Box::new(|| chaos("mqtt-chaos", &args.proxy, &sink_addr, None)),
        Box::new(|| chaos("mqtt-chaos drop-pingreq", &args.proxy, &sink_addr, Some(drop_pingreq))),
        Box::new(|| chaos("mqtt-chaos 20 inert rules", &args.proxy, &sink_addr, Some(&twenty))),
        Box::new(|| chaos("mqtt-chaos 10,000 inert rules", &args.proxy, &sink_addr, Some(&ten_thousand))),
    ];
    let names = [
        "direct",
        "haproxy",
        "socat",
        "mqtt-chaos",
        "mqtt-chaos drop-pingreq",
        "mqtt-chaos 20 inert rules",
        "mqtt-chaos 10,000 inert rules",
    ];
    if args.tls {
        let table = tls::run(&args.proxy, args.seconds, args.idle.min(2000)).await;
        println!("{table}");
        if let Some(out) = &args.out {
            std::fs::write(out, &table).unwrap();
        }
        return;
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut table = String::new();
    if !args.order_only {
        table = measure(&args, &relays, &names, &sink_stats).await;
        if args.churn > 0 {
            eprintln!("measuring rule churn");
            table.push_str(&churn(&args, &sink_addr, &ten_thousand).await);
        }
    }
    if args.order_trials > 0 {
        let upstream = Arc::new(order::OrderSink::new());
        let up = upstream.addr.clone();
        let ordered: [(&str, StartRelay); 3] = [
            (
                "direct",
                Box::new(|| Relay { name: "direct".into(), addr: up.clone(), child: None, _dir: None }),
            ),
            ("haproxy", Box::new(|| haproxy(&up, 0))),
            ("mqtt-chaos", Box::new(|| chaos("mqtt-chaos", &args.proxy, &up, None))),
        ];
        let mut rows = Vec::new();
        for (name, make) in &ordered {
            if !wanted(name) {
                continue;
            }
            let relay = make();
            eprintln!("measuring arrival order through {name}");
            let (upstream, addr, trials) = (upstream.clone(), relay.addr.clone(), args.order_trials);
            let measured = tokio::task::spawn_blocking(move || upstream.measure(&addr, trials));
            rows.push((name.to_string(), measured.await.unwrap()));
        }
        table.push_str(&order::render(&rows, args.order_trials));
    }
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).unwrap();
    }
}

/// Throughput, round trips and idle connections through each relay, as a markdown table.
async fn measure(
    args: &Args,
    relays: &[Box<dyn Fn() -> Relay + '_>],
    names: &[&str],
    sink_stats: &SinkStats,
) -> String {
    let payloads = [16, 1024, 64 * 1024];
    let mut rows = Vec::new();
    for (make, &name) in relays.iter().zip(names) {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let relay = make();
        assert_eq!(relay.name, name);
        eprintln!("measuring {}", relay.name);
        let mut row = Row { name: relay.name.clone(), ..Row::default() };
        for &p in &payloads {
            row.tput.push(throughput(&relay.addr, sink_stats, p, 1, args.seconds).await);
        }
        row.many = throughput(&relay.addr, sink_stats, 1024, 100, args.seconds).await.0;
        // drop-pingreq swallows PINGREQ: its round trips cannot be measured.
        row.rtt = if relay.name.ends_with("drop-pingreq") {
            (f64::NAN, f64::NAN, f64::NAN)
        } else {
            ping_rtt(&relay.addr, args.pings).await
        };
        if args.idle > 0
            && ["haproxy", "mqtt-chaos", "mqtt-chaos 10,000 inert rules"].contains(&relay.name.as_str())
        {
            row.idle = Some(idle(&relay, args.idle, args.ping_every).await);
        }
        rows.push(row);
        drop(relay);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    render(&rows, args)
}

fn render(rows: &[Row], args: &Args) -> String {
    let ha = rows.iter().find(|r| r.name == "haproxy");
    let ratio = |v: f64, base: Option<f64>| base.map_or(String::new(), |b| format!(" ({:.2}×)", v / b));
    let mut t = String::from(
        "| relay | 1 conn 16 B: MB/s, msg/s | 1 conn 1 KiB: MB/s, msg/s | 1 conn 64 KiB: MB/s, msg/s | 100 conns 1 KiB: MB/s | ping RTT p50 / p99 / p99.9 µs | idle: RSS/conn KiB, CPU % |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let cell = |i: usize| {
            let (mb, msgs) = r.tput[i];
            format!("{mb:.1}{}, {msgs:.0}", ratio(mb, ha.map(|h| h.tput[i].0)))
        };
        let (p50, p99, p999) = r.rtt;
        let rtt = if p50.is_nan() {
            "— (PINGREQ dropped)".to_string()
        } else {
            format!("{p50:.0} / {p99:.0} / {p999:.0}")
        };
        let idle = r.idle.map_or("—".to_string(), |(kib, cpu)| format!("{kib:.1}, {cpu:.1}"));
        t.push_str(&format!(
            "| {} | {} | {} | {} | {:.1}{} | {} | {} |\n",
            r.name,
            cell(0),
            cell(1),
            cell(2),
            r.many,
            ratio(r.many, ha.map(|h| h.many)),
            rtt,
            idle
        ));
    }
    t.push_str(&format!(
        "\n{} s per throughput cell, {} sequential pings, {} idle connections pinging every {} s; \
         ratios are against haproxy.\n",
        args.seconds, args.pings, args.idle, args.ping_every
    ));
    t
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (q(0.5), q(0.99), v[v.len() - 1])
}

/// Rule churn under load: see the module documentation. A markdown section.
async fn churn(args: &Args, sink: &str, preload: &str) -> String {
    const CONNS: usize = 1_000;
    let admin = format!("127.0.0.1:{}", free_port());
    let relay = chaos_with_admin("mqtt-chaos churn", &args.proxy, sink, Some(preload), &admin);
    wait_listening(&admin);
    let mut open = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        open.push(connected(&relay.addr).await);
    }
    let mut pinger = connected(&relay.addr).await;
    let ping = async |s: &mut TcpStream| {
        let t = Instant::now();
        s.write_all(&[0xc0, 0x00]).await.unwrap();
        let mut resp = [0u8; 2];
        s.read_exact(&mut resp).await.unwrap();
        t.elapsed().as_secs_f64() * 1e6
    };
    let mut before = Vec::new();
    for _ in 0..2_000 {
        before.push(ping(&mut pinger).await);
    }
    let client = mqtt_chaos::ctl::Client::new(&format!("http://{admin}"), None).unwrap();
    let n = args.churn;
    let adding = tokio::spawn(async move {
        let mut took = Vec::with_capacity(n);
        for i in 0..n {
            let body = format!(
                "{{\"name\": \"churn-{i}\", \"action\": \"drop\", \"packets\": [\"PUBLISH\"], \"match\": {{\"client_id\": \"churn-{i}-*\"}}}}"
            );
            let t = Instant::now();
            let r =
                client.request("POST", "/rules", Some("application/json"), body.as_bytes()).await.unwrap();
            took.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r.status, 201, "{}", r.body);
        }
        took
    });
    let mut during = Vec::new();
    while !adding.is_finished() {
        during.push(ping(&mut pinger).await);
    }
    let took = adding.await.unwrap();
    drop(open);
    let (a50, a99, amax) = quantiles(took);
    let (b50, b99, bmax) = quantiles(before);
    let pings = during.len();
    let (d50, d99, dmax) = quantiles(during);
    format!(
        "\n| rule churn: {n} rules added one by one to 10,000, {CONNS} connections open | p50 | p99 | max |\n|---|---|---|---|\n\
         | `POST /rules` latency, ms | {a50:.2} | {a99:.2} | {amax:.2} |\n\
         | PINGREQ round trip before the churn, µs | {b50:.0} | {b99:.0} | {bmax:.0} |\n\
         | PINGREQ round trip during the churn ({pings} pings), µs | {d50:.0} | {d99:.0} | {dmax:.0} |\n"
    )
}
