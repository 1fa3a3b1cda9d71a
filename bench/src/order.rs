//! Arrival order across connections: does a relay deliver packets to the upstream in the order
//! the clients sent them?
//!
//! N client connections go through the relay to an upstream whose receiver waits in `epoll`
//! (mio, edge-triggered): the kernel lists sockets in the order they became readable, so the
//! event order *is* the arrival order, without a thread spinning beside the relay under test.
//! Each trial sends one small PUBLISH on each connection, Δ apart (a spin wait on the sending
//! thread), starting with a different connection each time; it counts as in order when the
//! upstream saw all N arrive in send order. Trials start from idle (the previous one fully
//! received, then a pause), like a test suite's SUBSCRIBE on one client followed by a PUBLISH on
//! another.

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The gaps between the sends of one trial.
pub const DELTAS_US: [u64; 5] = [0, 20, 50, 100, 500];
/// The connection counts measured.
pub const CONNS: [usize; 2] = [2, 10];

/// One trial's packet: PUBLISH QoS 0 to topic "o" with a 4-byte payload.
const PACKET: [u8; 9] = [0x30, 7, 0, 1, b'o', 0, 0, 0, 0];
/// How long a trial may take before it counts as lost (and out of order).
const TRIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle time between trials.
const PAUSE: Duration = Duration::from_millis(2);

/// An upstream for the ordering measurement: a listener whose connections are read by one thread
/// in `epoll`.
pub struct OrderSink {
    listener: TcpListener,
    pub addr: String,
}

impl OrderSink {
    pub fn new() -> OrderSink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        OrderSink { listener, addr }
    }

    /// Per connection count, per Δ: the fraction of `trials` that arrived in send order
    /// through the relay listening on `relay`.
    pub fn measure(&self, relay: &str, trials: usize) -> Vec<Vec<f64>> {
        CONNS
            .iter()
            .map(|&n| DELTAS_US.iter().map(|&d| self.fraction(relay, n, d, trials)).collect())
            .collect()
    }

    fn fraction(&self, relay: &str, conns: usize, delta_us: u64, trials: usize) -> f64 {
        let (clients, upstream) = self.connect(relay, conns);
        let (arrivals_tx, arrivals) = mpsc::channel::<Vec<usize>>();
        let (trial_tx, trial_rx) = mpsc::channel::<()>();
        let receiver = std::thread::spawn(move || receive(upstream, trial_rx, arrivals_tx));
        let mut in_order = 0;
        for t in 0..trials {
            let order: Vec<usize> = (0..conns).map(|i| (t + i) % conns).collect();
            trial_tx.send(()).unwrap();
            std::thread::sleep(PAUSE);
            let mut sent_at = Instant::now();
            for (k, &c) in order.iter().enumerate() {
                if k > 0 {
                    sent_at += Duration::from_micros(delta_us);
                    while Instant::now() < sent_at {
                        std::hint::spin_loop();
                    }
                }
                (&clients[c]).write_all(&PACKET).unwrap();
            }
            let seen = arrivals.recv().unwrap();
            in_order += usize::from(seen == order);
        }
        drop(trial_tx);
        receiver.join().unwrap();
        in_order as f64 / trials as f64
    }

    /// `conns` clients through the relay, each connected (CONNECT answered), and the upstream
    /// side of each, in the same order.
    fn connect(&self, relay: &str, conns: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let mut clients = Vec::new();
        let mut upstream = Vec::new();
        for i in 0..conns {
            let mut c = TcpStream::connect(relay).unwrap();
            c.set_nodelay(true).unwrap();
            c.write_all(&connect(i)).unwrap();
            // The relay may have dialled for connections that were only a check that it
            // listens (closed at once, no CONNECT): skip those.
            let mut u = loop {
                let (mut u, _) = self.listener.accept().unwrap();
                u.set_nodelay(true).unwrap();
                let mut got = vec![0u8; connect(i).len()];
                match u.read_exact(&mut got) {
                    Ok(()) => {
                        assert_eq!(got, connect(i), "the upstream connections arrive in connect order");
                        break u;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
                    Err(e) => panic!("upstream read: {e}"),
                }
            };
            u.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            c.read_exact(&mut [0u8; 4]).unwrap();
            clients.push(c);
            upstream.push(u);
        }
        (clients, upstream)
    }
}

/// A CONNECT with client id `o<i>` (3 characters: every CONNECT has the same length).
fn connect(i: usize) -> Vec<u8> {
    let id = format!("o{i:02}");
    let mut p = vec![0x10, 12 + id.len() as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, id.len() as u8];
    p.extend(id.as_bytes());
    p
}

/// For each trial announced on `trials`: the order in which the upstream connections received
/// their packet, in `epoll`'s order of readiness.
fn receive(upstream: Vec<TcpStream>, trials: mpsc::Receiver<()>, arrivals: mpsc::Sender<Vec<usize>>) {
    let mut poll = Poll::new().unwrap();
    let mut sockets: Vec<MioStream> = upstream
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            MioStream::from_std(s)
        })
        .collect();
    for (i, s) in sockets.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE).unwrap();
    }
    let mut events = Events::with_capacity(64);
    let mut buf = [0u8; 4096];
    let mut pending = vec![0usize; sockets.len()];
    while trials.recv().is_ok() {
        let mut seen = Vec::new();
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        while seen.len() < sockets.len() && Instant::now() < deadline {
            poll.poll(&mut events, Some(deadline - Instant::now())).unwrap();
            for ev in &events {
                let i = ev.token().0;
                // Edge-triggered: read everything there is.
                loop {
                    match sockets[i].read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => pending[i] += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("upstream read: {e}"),
                    }
                }
                if pending[i] >= PACKET.len() && !seen.contains(&i) {
                    pending[i] -= PACKET.len();
                    seen.push(i);
                }
            }
        }
        if arrivals.send(seen).is_err() {
            return;
        }
    }
}

/// The ordering table: one row per relay.
pub fn render(rows: &[(String, Vec<Vec<f64>>)], trials: usize) -> String {
    let mut out = String::from("\n| relay |");
    for n in CONNS {
        for d in DELTAS_US {
            out.push_str(&format!(" {n} conns Δ {d} µs |"));
        }
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(CONNS.len() * DELTAS_US.len()));
    out.push('\n');
    for (name, fractions) in rows {
        out.push_str(&format!("| {name} |"));
        for f in fractions.iter().flatten() {
            out.push_str(&format!(" {:.1} % |", f * 100.0));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\nArrival order: {trials} trials per cell from idle, each one small PUBLISH per connection, Δ apart, \
         starting with a different connection each time; the share of trials the upstream received \
         entirely in send order (epoll's readiness order on one receiving thread).\n"
    ));
    out
}
