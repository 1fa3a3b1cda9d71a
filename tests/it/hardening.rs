//! Nothing a user or a device sends takes the proxy down: values at the edge of the schema,
//! names that could forge logs, repeated CONNECTs, rule churn, concurrent API calls, signals,
//! running out of file descriptors.

use crate::admin::{assert_error, call, serve_admin};
use crate::harness::*;
use mqtt_chaos::config::Settings;
use mqtt_chaos::ctl::Client;
use mqtt_chaos::vocab::Direction;
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);
const HUGE: &str = "500000000000years";

/// Polls `/metrics` until the `mqtt_chaos_tracked_entries` gauges are all 0.
async fn assert_indexes_empty(proxy: &TestProxy, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = proxy.running().metrics();
        let entries: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("mqtt_chaos_tracked_entries{") && !l.ends_with(" 0"))
            .collect();
        if entries.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "indexes keyed by client input kept entries: {entries:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no connection is open, and checks the gauge agrees.
async fn assert_all_closed(proxy: &TestProxy) {
    let deadline = Instant::now() + WAIT;
    while !proxy.running().registry().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.running().registry().is_empty(), "{} still open", proxy.running().registry().len());
    assert_eq!(proxy.running().routes()[0].metrics.totals().active, 0);
}

#[tokio::test]
async fn a_duration_of_500_billion_years_is_refused_where_it_is_given_and_the_maximum_works() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    let mut device = proxy.connected("long-lived", 30).await;

    for (field, rule) in [
        ("after", json!({"name": "x", "action": "drop", "after": HUGE})),
        ("duration", json!({"name": "x", "action": "blackhole", "duration": HUGE})),
        ("latency", json!({"name": "x", "action": "delay", "latency": HUGE})),
        ("jitter", json!({"name": "x", "action": "delay", "latency": "1s", "jitter": HUGE})),
    ] {
        let r = call(admin, "POST", "/rules", Some(rule)).await;
        assert_error(&r, 400, "over the maximum of 1 year");
        assert_eq!(r.json().unwrap()["field"], format!("rule.{field}"));
    }
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let profile =
        format!("name = \"p\"\n[[rules]]\nname = \"late\"\naction = \"drop\"\nafter = \"{HUGE}\"\n");
    let r = client.request("PUT", "/profile", Some("application/toml"), profile.as_bytes()).await.unwrap();
    assert_error(&r, 400, "request body:5:9: `after` of");

    // The largest admitted values are accepted and nothing overflows: the connection works on.
    for rule in [
        json!({"name": "far", "action": "drop", "after": "1year", "duration": "1year"}),
        json!({"name": "slow", "action": "delay", "latency": "1year", "jitter": "1year", "packets": ["PUBLISH"]}),
        json!({"name": "cut", "action": "close", "after": "1year"}),
    ] {
        assert_eq!(call(admin, "POST", "/rules", Some(rule)).await.status, 201);
    }
    device.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut device, WAIT, "PINGRESP").await, PINGRESP);
    drop(device);
    assert_all_closed(&proxy).await;
}

#[test]
fn a_duration_flag_or_profile_at_500_billion_years_stops_the_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("forever.toml");
    std::fs::write(
        &bad,
        format!("name = \"forever\"\n[[rules]]\nname = \"z\"\naction = \"freeze\"\nduration = \"{HUGE}\"\n"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", "--profile", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forever.toml:5:12: `duration` of"), "{err}");
    for flag in ["--half-close-timeout", "--shutdown-grace", "--connect-timeout", "--will-timeout"] {
        let out = Command::new(binary())
            .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", flag, HUGE])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{flag}: ")) && err.contains("over the maximum of 1 year"), "{err}");
    }
}

#[test]
fn size_flags_at_the_edges_stop_the_start_with_exit_2_naming_the_flag() {
    for (flag, value, message) in [
        ("--ws-max-frame", "1024MiB", "--ws-max-frame: 1073741824 bytes is over the largest MQTT packet"),
        ("--ws-max-frame", "100", "--ws-max-frame: 100 bytes is under the smallest allowed, 1KiB"),
        (
            "--max-buffered-packet",
            "1024MiB",
            "--max-buffered-packet: 1073741824 bytes is over the largest MQTT packet",
        ),
    ] {
        let out = Command::new(binary())
            .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{flag} {value}: {err}");
    }
    // The edges themselves are accepted: the proxy starts with each.
    for value in ["1KiB", "268435460B"] {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = spawn_binary(
            &["proxy", "--listen", &listen, "--upstream", "h:1", "--ws-max-frame", value],
            &listen,
        );
        assert!(child.try_wait().unwrap().is_none(), "--ws-max-frame {value}: still running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[tokio::test]
async fn names_that_could_forge_log_lines_or_labels_are_refused() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    for name in ["evil\r\n2026-11-30T00:00:00Z INFO forged line", "nul\0byte", "esc\u{1b}[31m"] {
        let profile = format!("name = {}\n", serde_json::to_string(name).unwrap());
        let r =
            client.request("PUT", "/profile", Some("application/toml"), profile.as_bytes()).await.unwrap();
        assert_error(&r, 400, "control character");
        let r = call(admin, "POST", "/rules", Some(json!({"name": name, "action": "drop"}))).await;
        assert_error(&r, 400, "control character");
    }
    let long = format!("name = \"{}\"\n", "n".repeat(900_000));
    let r = client.request("PUT", "/profile", Some("application/toml"), long.as_bytes()).await.unwrap();
    assert_error(&r, 400, "at most 64 are allowed");
    let m = call(admin, "GET", "/metrics", None).await.body;
    assert!(
        m.contains("mqtt_chaos_build_info{version=\"0.1.0\",profile=\"\",profile_hash=\"\"} 1"),
        "nothing was activated"
    );
}

#[tokio::test]
async fn a_client_that_sends_connect_twice_leaves_nothing_behind_and_takes_nobody_over() {
    let broker = Mosquitto::start();
    let settings = Settings { will_timeout: Duration::from_millis(500), ..Settings::default() };
    let mut proxy = TestProxy::start_with(&broker.addr(), settings).await;
    let big_id = "i".repeat(60_000);
    for i in 0..100 {
        let mut c = proxy.connect().await;
        let first = connect_v4(&format!("twice-{i}"), 30, Some((&format!("will/twice-{i}"), "gone")));
        let second = connect_v4(&big_id, 30, Some((&format!("will/other-{i}"), "gone")));
        // Both in one write: the second arrives in the same read as the first.
        c.write_all(&[first, second].concat()).await.unwrap();
        // mosquitto accepted the first, then closes on the protocol violation.
        let (got, ending) = read_to_end(&mut c, WAIT).await;
        assert_ne!(ending, Ending::Open, "the broker closes a client that sends CONNECT twice");
        assert!(got.starts_with(&[0x20, 0x02]), "the first CONNECT was answered: {got:02x?}");
    }
    assert_all_closed(&proxy).await;
    // The harness's own event receiver is not read in this test: it would keep the records.
    proxy.events = proxy.running().registry().subscribe();
    let metrics = &proxy.running().routes()[0].metrics;
    assert_eq!(metrics.malformed(Direction::ClientToBroker), 100, "each second CONNECT counted as malformed");
    assert_indexes_empty(&proxy, Duration::from_secs(5)).await;

    // A later client with the first id is no takeover of a connection that is long gone.
    let again = proxy.connected("twice-0", 30).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = proxy.running().metrics();
    for outcome in ["closed", "disconnect_0x8e", "not_enforced"] {
        let line = format!("mqtt_chaos_takeovers_total{{route=\"default\",outcome=\"{outcome}\"}} 0");
        assert!(m.contains(&line), "{line} missing in:\n{m}");
    }
    let live = proxy.running().registry().list();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].client_id().as_deref(), Some("twice-0"));
    drop(again);
    assert_all_closed(&proxy).await;
    assert_indexes_empty(&proxy, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rule_changes_through_the_api_are_never_lost() {
    let proxy = TestProxy::start("127.0.0.1:1").await;
    let admin = serve_admin(&proxy, None).await;
    // 8 clients × 150 different rules at once: every 201 is a rule in force.
    let adders: Vec<_> = (0..8)
        .map(|t| {
            tokio::spawn(async move {
                let mut created = 0;
                for i in 0..150 {
                    let rule = json!({"name": format!("t{t}-{i}"), "action": "drop", "match": {"client_id": "nobody"}});
                    created += usize::from(call(admin, "POST", "/rules", Some(rule)).await.status == 201);
                }
                created
            })
        })
        .collect();
    let mut created = 0;
    for a in adders {
        created += a.await.unwrap();
    }
    assert_eq!(created, 1200);
    let rules = call(admin, "GET", "/rules", None).await.json().unwrap();
    assert_eq!(rules["rules"].as_array().unwrap().len(), 1200, "a 201 whose rule is not in force");

    // Two requests for the same name at once: exactly one wins, every time.
    for round in 0..30 {
        let rule = json!({"name": format!("same-{round}"), "action": "drop"});
        let (a, b) = tokio::join!(
            call(admin, "POST", "/rules", Some(rule.clone())),
            call(admin, "POST", "/rules", Some(rule))
        );
        let mut statuses = [a.status, b.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}");
    }
    // Removals racing with a reset: the answers add up to what was in force.
    let removers: Vec<_> = (0..600)
        .map(|i| {
            tokio::spawn(
                async move { call(admin, "DELETE", &format!("/rules/t{}-{}", i % 8, i / 8), None).await },
            )
        })
        .collect();
    let reset = call(admin, "POST", "/reset", None).await.json().unwrap();
    let mut removed = 0;
    for r in removers {
        let r = r.await.unwrap();
        assert!(r.status == 200 || r.status == 404, "{}", r.body);
        removed += u64::from(r.status == 200);
    }
    assert_eq!(removed + reset["removed"]["global"].as_u64().unwrap(), 1230);
    assert_eq!(call(admin, "GET", "/rules", None).await.json().unwrap()["rules"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_added_as_fast_as_the_api_allows_never_hold_back_a_connections_pingresps() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    let stop = Instant::now() + Duration::from_secs(4);
    let churn: Vec<_> = (0..4)
        .map(|t| {
            tokio::spawn(async move {
                let mut n = 0u32;
                while Instant::now() < stop {
                    let rule = json!({"name": format!("c{t}-{n}"), "action": "drop", "match": {"client_id": format!("d{n}")}});
                    assert_eq!(call(admin, "POST", "/rules", Some(rule)).await.status, 201);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let pinged = pinging_client(
        proxy.addr,
        "steady",
        30,
        None,
        Some(Duration::from_millis(200)),
        Duration::from_secs(4),
    )
    .await;
    let mut added = 0;
    for c in churn {
        added += c.await.unwrap();
    }
    assert_eq!(pinged.ending, Ending::Open);
    assert!(pinged.pingresps.len() >= 17, "{} PINGRESPs for 19 PINGREQs", pinged.pingresps.len());
    let worst = pinged.pingresps.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "a gap of {worst:?} between PINGRESPs while {added} rules were added"
    );
    assert!(added > 500, "only {added} rules were added: the churn was too slow to prove anything");
}

#[tokio::test]
async fn rules_that_act_without_a_packet_reach_an_idle_connection_at_once_when_added_or_removed() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    let mut quiet = proxy.connected("quiet", 60).await;
    let mut other = proxy.connected("other", 60).await;

    // A freeze added while the client is silent: what it sends next waits…
    let freeze = json!({"name": "ice", "action": "freeze", "direction": "client_to_broker", "match": {"client_id": "quiet"}});
    assert_eq!(call(admin, "POST", "/rules", Some(freeze)).await.status, 201);
    tokio::time::sleep(Duration::from_millis(100)).await;
    quiet.write_all(&PINGREQ).await.unwrap();
    assert_eq!(read_to_end(&mut quiet, Duration::from_millis(500)).await, (vec![], Ending::Open));
    // …until the rule is removed: the PINGREQ goes out with no further packet to prompt it.
    assert_eq!(call(admin, "DELETE", "/rules/ice", None).await.status, 200);
    assert_eq!(expect_packet(&mut quiet, Duration::from_secs(1), "PINGRESP").await, PINGRESP);

    // A close added for an idle connection closes it now, and only it.
    let cut = json!({"name": "cut", "action": "close", "how": "rst", "match": {"client_id": "quiet"}});
    assert_eq!(call(admin, "POST", "/rules", Some(cut)).await.status, 201);
    assert_eq!(read_to_end(&mut quiet, Duration::from_secs(1)).await.1, Ending::Reset);
    other.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut other, WAIT, "PINGRESP").await, PINGRESP);
}

#[tokio::test]
async fn readyz_reports_per_route_whether_the_upstream_was_reachable_at_the_last_dial() {
    let (_reserved, dead) = dead_address();
    let probing = || Settings { probe_upstreams: true, ..Settings::default() };
    let proxy = TestProxy::start_with(&dead, probing()).await;
    let admin = serve_admin(&proxy, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the start-up probe
    let r = call(admin, "GET", "/readyz", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let v = r.json().unwrap();
    assert_eq!(
        (v["status"].as_str(), v["routes"][0]["reachable"].as_bool()),
        (Some("not_ready"), Some(false))
    );
    assert!(v["routes"][0]["last_error"].as_str().unwrap().contains("refused"), "{v}");
    assert_eq!(call(admin, "GET", "/healthz", None).await.status, 200, "alive, though not ready");

    let broker = Mosquitto::start();
    let proxy = TestProxy::start_with(&broker.addr(), probing()).await;
    let admin = serve_admin(&proxy, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = call(admin, "GET", "/readyz", None).await.json().unwrap();
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(v["routes"][0]["reachable"], json!(true));
    assert_eq!(
        (&v["routes"][0]["listen_transport"], &v["routes"][0]["upstream_transport"]),
        (&json!("tcp"), &json!("tcp"))
    );
}

/// One raw HTTP/1.1 request (for headers `ctl` never sends); the status and body.
async fn raw_http(admin: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request =
        format!("{head}\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer)).await.unwrap().unwrap();
    let status = answer[9..12].parse().unwrap();
    (status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[tokio::test]
async fn the_bearer_scheme_and_media_types_are_case_insensitive() {
    let proxy = TestProxy::start("127.0.0.1:1").await;
    let admin = serve_admin(&proxy, Some("s3cret")).await;
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret"] {
        let (status, body) =
            raw_http(admin, &format!("GET /rules HTTP/1.1\r\nAuthorization: {auth}"), "").await;
        assert_eq!(status, 200, "{auth}: {body}");
    }
    let (status, _) = raw_http(admin, "GET /rules HTTP/1.1\r\nAuthorization: Basic s3cret", "").await;
    assert_eq!(status, 401);
    let (status, body) = raw_http(
        admin,
        "PUT /profile HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Type: APPLICATION/JSON; Charset=UTF-8",
        "{\"name\": \"drop-pingreq\"}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"profile\":\"drop-pingreq\""), "{body}");
}

/// The proxy binary with an admin API and its log captured (RUST_LOG=info), once `/healthz`
/// answers; `stop` sends SIGTERM and returns the log.
struct LoggedProxy {
    child: KillOnDrop,
    admin: String,
    listen: String,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl LoggedProxy {
    fn start(upstream: &str, extra: &[&str]) -> LoggedProxy {
        let admin = format!("127.0.0.1:{}", free_port());
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary())
            .args(["proxy", "--listen", &listen, "--upstream", upstream, "--admin", &admin])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let proxy = LoggedProxy {
            child: KillOnDrop(child),
            admin: admin.clone(),
            listen,
            client: Client::new(&format!("http://{admin}"), None).unwrap(),
            rt: tokio::runtime::Runtime::new().unwrap(),
        };
        let up = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            proxy.call("GET", "/healthz", None).is_ok_and(|r| r.status == 200)
        });
        assert!(up, "the proxy did not come up");
        proxy
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<mqtt_chaos::ctl::Reply, String> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.rt.block_on(self.client.request(method, path, Some("application/json"), &body))
    }

    /// A raw MQTT 3.1.1 client through the proxy, its CONNACK read.
    fn connected(&self, client_id: &str) -> std::net::TcpStream {
        let mut device = std::net::TcpStream::connect(&self.listen).unwrap();
        std::io::Write::write_all(&mut device, &connect_v4(client_id, 60, None)).unwrap();
        device.set_read_timeout(Some(WAIT)).unwrap();
        std::io::Read::read_exact(&mut device, &mut [0u8; 4]).unwrap();
        device
    }

    fn sigterm(&self) {
        assert!(
            Command::new("kill").args(["-TERM", &self.child.0.id().to_string()]).status().unwrap().success()
        );
    }

    /// SIGTERM (unless it ended already), then the whole log once the process ended.
    fn stop(mut self) -> String {
        if self.child.0.try_wait().unwrap().is_none() {
            self.sigterm();
        }
        let _ = self.child.0.wait();
        let mut log = String::new();
        std::io::Read::read_to_string(self.child.0.stderr.as_mut().unwrap(), &mut log).unwrap();
        log
    }
}

#[test]
fn healthz_says_shutting_down_during_the_grace_and_a_second_signal_closes_everything_now() {
    let broker = Mosquitto::start();
    let mut proxy = LoggedProxy::start(&broker.addr(), &["--shutdown-grace", "60s"]);
    let mut device = proxy.connected("lingering");
    proxy.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    let r = proxy.call("GET", "/healthz", None).expect("the admin API serves during the grace period");
    assert_eq!((r.status, r.json().unwrap()), (503, json!({"status": "shutting_down"})));
    let second = Instant::now();
    proxy.sigterm();
    let status = loop {
        if let Some(status) = proxy.child.0.try_wait().unwrap() {
            break status;
        }
        assert!(second.elapsed() < Duration::from_secs(5), "a second SIGTERM did not end the grace period");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let log = proxy.stop();
    assert!(log.contains("press Ctrl-C again") && log.contains("1 open connections"), "{log}");
    assert!(log.contains("closing the remaining connections now"), "{log}");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut device, &mut rest); // closed by the proxy
}

#[test]
fn out_of_file_descriptors_the_proxy_counts_accept_errors_logs_them_once_per_interval_and_recovers() {
    let broker = Mosquitto::start();
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    // A shell lowers the open-files limit for the proxy alone (lowering needs no privilege).
    let cmd = format!(
        "ulimit -n 40 && exec {} proxy --listen {listen} --upstream {} --admin {admin}",
        binary().display(),
        broker.addr()
    );
    let child = Command::new("sh")
        .args(["-c", &cmd])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let up = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::net::TcpStream::connect(&admin).is_ok()
    });
    assert!(up, "the proxy did not come up");
    // Each proxied connection takes two descriptors: 40 clients exhaust the 40 allowed.
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let mut c = std::net::TcpStream::connect(&listen).unwrap();
            let _ = std::io::Write::write_all(&mut c, &connect_v4(&format!("fd-{i}"), 60, None));
            c
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    drop(clients);
    std::thread::sleep(Duration::from_millis(1500)); // descriptors come back; accepting resumes
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let metrics = rt.block_on(client.request("GET", "/metrics", None, b"")).unwrap().body;
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mqtt_chaos_accept_errors_total{route=\"default\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors >= 1.0, "no accept error counted:\n{metrics}");
    let mut device = std::net::TcpStream::connect(&listen).unwrap();
    std::io::Write::write_all(&mut device, &connect_v4("after-the-storm", 60, None)).unwrap();
    device.set_read_timeout(Some(WAIT)).unwrap();
    let mut connack = [0u8; 4];
    std::io::Read::read_exact(&mut device, &mut connack).expect("accepting works again");
    drop(device);
    assert!(Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap().success());
    let _ = child.0.wait();
    let mut log = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    // One line per listener (the route's, the admin API's) and 10 s at most: not one per failure.
    assert!((1..=4).contains(&lines), "{lines} accept-error lines for {errors} errors in 4.5 s:\n{log}");
}

#[test]
fn the_log_tells_what_happened_without_prometheus_or_debug() {
    let broker = Mosquitto::start();
    let proxy = LoggedProxy::start(&broker.addr(), &[]);
    let rule =
        json!({"name": "mute", "action": "drop", "direction": "client_to_broker", "packets": ["PINGREQ"]});
    assert_eq!(proxy.call("POST", "/rules", Some(rule)).unwrap().status, 201);
    let mut device = proxy.connected("talkative");
    for _ in 0..3 {
        std::io::Write::write_all(&mut device, &PINGREQ).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let id = proxy.call("GET", "/connections", None).unwrap().json().unwrap()[0]["id"].as_u64().unwrap();
    assert_eq!(proxy.call("DELETE", &format!("/connections/{id}"), None).unwrap().status, 200);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut device, &mut rest);
    let log = proxy.stop();
    let added = log
        .lines()
        .find(|l| l.contains("rule added through the admin API"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(added.contains("rule=mute"), "{added}");
    let first = log.lines().filter(|l| l.contains("fault applied to this connection")).collect::<Vec<_>>();
    assert_eq!(first.len(), 1, "one INFO line for three applications:\n{log}");
    assert!(first[0].contains("rule=mute") && first[0].contains("action=drop"), "{}", first[0]);
    assert!(log.contains("connection closed through the admin API"), "{log}");
    let closed =
        log.lines().find(|l| l.contains("connection closed conn=")).unwrap_or_else(|| panic!("{log}"));
    assert!(closed.contains("faults=mute=3") && closed.contains("ended_by_proxy=admin"), "{closed}");
    // At the stop, the summary: the headline numbers without Prometheus.
    let summary = &log[log.find("summary:").unwrap_or_else(|| panic!("no summary at the stop:\n{log}"))..];
    assert!(summary.contains("1 connection (0 open, 0 rejected, 0 failed to reach the broker)"), "{summary}");
    assert!(summary.contains("closes: 1 ended by the proxy (fin)"), "{summary}");
    assert!(summary.contains("fault mute (drop client_to_broker): applied 3 times"), "{summary}");
}

#[tokio::test]
async fn the_summary_tells_who_detected_a_silent_client_and_after_how_many_keep_alives() {
    let broker = Mosquitto::start();
    let settings = Settings { will_timeout: Duration::from_secs(3), ..Settings::default() };
    let proxy = TestProxy::start_with(&broker.addr(), settings).await;
    proxy.set_rules("[[rules]]\nname = \"mute\"\naction = \"drop\"\ndirection = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n");
    let admin = serve_admin(&proxy, None).await;
    let mut live = proxy.running().registry().subscribe();
    let mut watcher = proxy.connected("watcher", 60).await;
    watcher.write_all(&subscribe_v4(1, "status/#", 0)).await.unwrap();
    expect_packet(&mut watcher, WAIT, "SUBACK").await;
    // Keep Alive 2, pinging every second: the pings vanish, mosquitto closes it within its window.
    let seen = pinging_client(
        proxy.addr,
        "silent",
        2,
        Some(("status/silent", "gone")),
        Some(Duration::from_secs(1)),
        Duration::from_secs(15),
    )
    .await;
    assert_ne!(seen.ending, Ending::Open, "mosquitto closed the silent client");
    let deadline = Instant::now() + WAIT;
    let summary = loop {
        let v = call(admin, "GET", "/summary", None).await.json().unwrap();
        if v["routes"][0]["wills"]["observed"] == 1 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = &summary["routes"][0];
    assert_eq!(r["broker_detection_ratio"]["count"], 1, "{summary}");
    let ratio = r["broker_detection_ratio"]["median"].as_f64().unwrap();
    assert!((1.4..6.0).contains(&ratio), "mosquitto closes between 1.5 × and about 5 × Keep Alive: {ratio}");
    assert_eq!(r["broker_detection_ratio"]["max"].as_f64(), Some(ratio));
    assert_eq!(
        r["wills"],
        json!({"expected": 1, "observed": 1, "missing": 0, "unobservable": 0}),
        "{summary}"
    );
    assert!(r["faults"][0]["count"].as_u64().unwrap() >= 1, "{summary}");
    let text = mqtt_chaos::summary::text(&summary);
    assert!(text.contains("broker detected a silent peer once: median"), "{text}");
    // The live view (`/events`, `ctl watch`) told the same as it happened.
    let mut kinds = Vec::new();
    while let Ok(ev) = live.try_recv() {
        if let Some((kind, data)) = mqtt_chaos::record::event_json(&ev) {
            match kind {
                "detection" => {
                    assert_eq!(
                        (data["side"].as_str(), data["client_id"].as_str()),
                        (Some("broker"), Some("silent"))
                    );
                    assert_eq!(data["ratio"].as_f64(), Some(ratio));
                }
                "will" => assert_eq!(
                    (data["outcome"].as_str(), data["topic"].as_str()),
                    (Some("observed"), Some("status/silent"))
                ),
                _ => {}
            }
            kinds.push(kind);
        }
    }
    assert!(kinds.contains(&"detection") && kinds.contains(&"will"), "{kinds:?}");
    assert!(text.contains("Wills: 1 expected = 1 observed + 0 missing + 0 unobservable"), "{text}");
}

/// `mqtt-chaos ctl watch` as a child process; its stdout lines arrive on the receiver.
fn ctl_watch(admin: &str, extra: &[&str]) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(binary())
        .args(["ctl", "watch", "--admin", &format!("http://{admin}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says so on stderr once the proxy has subscribed it: no event is missed after that.
    let mut said = String::new();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    std::io::BufRead::read_line(&mut stderr, &mut said).unwrap();
    assert!(said.starts_with("watching the events of http://"), "{said:?}");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (KillOnDrop(child), rx)
}

#[test]
fn ctl_watch_shows_connects_faults_closes_and_rule_changes_as_they_happen() {
    let broker = Mosquitto::start();
    let proxy = LoggedProxy::start(&broker.addr(), &[]);
    let (_all, all) = ctl_watch(&proxy.admin, &["--json"]);
    let (_others, others) = ctl_watch(&proxy.admin, &["--client-id", "other-*"]);
    let (_readable, readable) = ctl_watch(&proxy.admin, &[]);
    let rule =
        json!({"name": "mute", "action": "drop", "direction": "client_to_broker", "packets": ["PINGREQ"]});
    assert_eq!(proxy.call("POST", "/rules", Some(rule)).unwrap().status, 201);
    let mut device = proxy.connected("watched");
    std::io::Write::write_all(&mut device, &PINGREQ).unwrap();
    std::io::Write::write_all(&mut device, &PINGREQ).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(device);

    let mut kinds = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !kinds.contains(&"closed".to_string()) {
        let line =
            all.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("events in time");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let kind = v["event"].as_str().unwrap().to_string();
        match kind.as_str() {
            "rules" => assert_eq!(v["data"]["change"], "rule \"mute\" added"),
            "connect" => assert_eq!(
                (v["data"]["client_id"].as_str(), v["data"]["keep_alive"].as_u64()),
                (Some("watched"), Some(60))
            ),
            "fault" => assert_eq!(v["data"]["rule"], "mute", "{line}"),
            "closed" => {
                assert_eq!(
                    (v["data"]["closed_by"].as_str(), v["data"]["how"].as_str()),
                    (Some("client"), Some("fin"))
                );
                assert_eq!(v["data"]["faults"], json!({"mute": 2}), "{line}");
            }
            _ => {}
        }
        kinds.push(kind);
    }
    assert_eq!(kinds, ["rules", "connect", "connack", "fault", "closed"], "one fault line for two drops");
    let line = readable.recv_timeout(WAIT).unwrap();
    assert!(line.ends_with("rules: rule \"mute\" added"), "{line}");
    let connect = readable.recv_timeout(WAIT).unwrap();
    assert!(connect.contains("conn 1 (watched) CONNECT protocol 4 Keep Alive 60"), "{connect}");
    // The filtered watcher saw the rule change (it concerns every connection), nothing of `watched`.
    let first = others.recv_timeout(WAIT).unwrap();
    assert!(first.contains("rules: rule \"mute\" added"), "{first}");
    let rest: Vec<String> = others.try_iter().collect();
    assert!(rest.is_empty(), "{rest:?}");
    let _ = proxy.stop();
}
