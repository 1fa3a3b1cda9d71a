//! `mqtt-chaos probe` through the binary: against the embedded broker, against mosquitto, and
//! against a scripted broker for each verdict (one that never enforces Keep Alive, one that
//! closes early, one that sends DISCONNECT 0x8D and 0x8E, one that rejects Keep Alive 0, a
//! 3.1.1-only one, one that needs a username). The JSON report is validated against
//! PROBE.schema.json, the JUnit report parsed as XML.

use crate::harness::{Mosquitto, binary, dead_address, free_port, packet};
use mqtt_chaos::codec::{
    Connect, FrameHeader, PacketType, Protocol, Publish, Splitter, Step, TopicFilters, filter_matches,
};
use serde_json::Value;
use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Running the probe

struct Probe {
    out: Output,
    json: Value,
    junit: String,
    markdown: String,
}

impl Probe {
    fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    /// The result for `scenario` × `protocol`.
    fn result(&self, scenario: &str, protocol: &str) -> &Value {
        self.json["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["scenario"] == scenario && r["protocol"] == protocol)
            .unwrap_or_else(|| panic!("no result for {scenario} {protocol} in {}", self.stdout()))
    }

    fn verdict(&self, scenario: &str, protocol: &str) -> String {
        self.result(scenario, protocol)["verdict"].as_str().unwrap().to_string()
    }

    fn case<'a>(&'a self, scenario: &str, protocol: &str, case: &str) -> &'a Value {
        self.result(scenario, protocol)["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["case"] == case)
            .unwrap_or_else(|| panic!("no case {case} of {scenario} {protocol}"))
    }
}

/// Runs `mqtt-chaos probe ARGS --json --junit --markdown` (off the test's runtime), checks the
/// JSON against the schema and the JUnit report's counts against the JSON.
async fn probe(args: &[&str]) -> Probe {
    probe_env(args, &[]).await
}

async fn probe_env(args: &[&str], env: &[(&str, &str)]) -> Probe {
    let dir = tempfile::tempdir().unwrap();
    let (json, junit, markdown) =
        (dir.path().join("r.json"), dir.path().join("r.xml"), dir.path().join("r.md"));
    let mut cmd = Command::new(binary());
    cmd.arg("probe").args(args);
    cmd.arg("--json").arg(&json).arg("--junit").arg(&junit).arg("--markdown").arg(&markdown);
    cmd.envs(env.iter().copied()).env_remove("RUST_LOG").stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let report = read(&json);
    if report.is_empty() {
        return Probe { out, json: Value::Null, junit: String::new(), markdown: String::new() };
    }
    let json: Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{report}"));
    let errors = validate(&json, &schema(), &schema(), "$");
    assert!(
        errors.is_empty(),
        "the report does not match PROBE.schema.json:\n{}\n{report}",
        errors.join("\n")
    );
    let p = Probe { out, json, junit: read(&junit), markdown: read(&markdown) };
    check_junit(&p);
    p
}

/// The JUnit report parses as XML and has one test case per result, failures for `fails`
/// (and `deviates` with --strict), skipped for `n/a`.
fn check_junit(p: &Probe) {
    let doc =
        roxmltree::Document::parse(&p.junit).unwrap_or_else(|e| panic!("JUnit is not XML: {e}\n{}", p.junit));
    let results = p.json["results"].as_array().unwrap();
    let strict = p.json["strict"].as_bool().unwrap();
    let count = |v: &str| results.iter().filter(|r| r["verdict"] == v).count();
    let failing = count("fails") + if strict { count("deviates") } else { 0 };
    let suites = doc.root_element();
    assert_eq!(suites.tag_name().name(), "testsuites");
    assert_eq!(suites.attribute("tests"), Some(results.len().to_string().as_str()));
    assert_eq!(suites.attribute("failures"), Some(failing.to_string().as_str()));
    assert_eq!(suites.attribute("skipped"), Some(count("n/a").to_string().as_str()));
    let cases: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("testcase")).collect();
    assert_eq!(cases.len(), results.len());
    for (case, r) in cases.iter().zip(results) {
        let name = format!("{} (MQTT {})", r["scenario"].as_str().unwrap(), r["protocol"].as_str().unwrap());
        assert_eq!(case.attribute("name"), Some(name.as_str()));
        let failed = case.children().any(|n| n.has_tag_name("failure"));
        let skipped = case.children().any(|n| n.has_tag_name("skipped"));
        let v = r["verdict"].as_str().unwrap();
        assert_eq!(failed, v == "fails" || (strict && v == "deviates"), "{name}: {v}");
        assert_eq!(skipped, v == "n/a", "{name}: {v}");
    }
    assert_eq!(doc.descendants().filter(|n| n.has_tag_name("failure")).count(), failing);
    // The Markdown report has one table row per result.
    let rows = p.markdown.lines().filter(|l| l.starts_with("| `")).count();
    assert_eq!(rows, results.len(), "{}", p.markdown);
}

impl MiniBroker {
    /// The probe of this broker: `--keepalive 1 --timeout 2 --scenarios SCENARIOS`, then `extra`.
    async fn probe(&self, scenarios: &str, extra: &[&str]) -> Probe {
        self.probe_env(scenarios, extra, &[]).await
    }

    async fn probe_env(&self, scenarios: &str, extra: &[&str], env: &[(&str, &str)]) -> Probe {
        let args = ["--broker", &self.addr, "--keepalive", "1", "--timeout", "2", "--scenarios", scenarios];
        probe_env(&[&args[..], extra].concat(), env).await
    }
}

fn ratio_median(r: &Value) -> f64 {
    r["ratio"]["median"].as_f64().unwrap_or_else(|| panic!("no ratio in {r}"))
}

// ---------------------------------------------------------------------------------------------
// Against real brokers

#[tokio::test]
async fn the_embedded_broker_is_probed_in_one_command() {
    let p = probe(&[]).await;
    let out = p.stdout();
    // rumqttd 0.20 publishes the new connection's Will on a takeover: a MUST broken, so exit 1.
    assert_eq!(p.code(), 1, "{out}\n{}", p.stderr());
    assert!(out.contains("broker: embedded rumqttd 0.20 on 127."), "{out}");
    assert_eq!(p.json["broker"]["embedded"], true);
    assert_eq!(p.json["broker"]["protocols"], serde_json::json!(["3.1.1", "5"]));
    assert_eq!(
        p.json["results"].as_array().unwrap().len(),
        14,
        "6 scenarios × 2 versions + 2 for MQTT 5 only"
    );
    for v in ["3.1.1", "5"] {
        // rumqttd enforces Keep Alive to the millisecond and publishes the Will at once.
        for s in ["keepalive", "half-open", "ping-resets", "rewrite"] {
            let r = p.result(s, v);
            assert_eq!(r["verdict"], "conforms", "{s} {v}: {r}");
            let ratio = ratio_median(r);
            assert!((1.45..1.6).contains(&ratio), "{s} {v}: {ratio}");
            assert_eq!(r["close_how"], "fin");
        }
        assert_eq!(p.result("keepalive", v)["will_published"], true);
        // It closes a Keep Alive 0 CONNECT without CONNACK.
        assert_eq!(p.verdict("keepalive-zero", v), "deviates");
        assert!(p.result("keepalive-zero", v)["detail"].as_str().unwrap().contains("rejected at CONNECT"));
        // Takeover: the old connection is closed, and the new one's Will is published.
        let clean = p.case("takeover", v, "clean");
        assert_eq!(clean["old_closed"], true);
        assert_eq!(clean["verdict"], "fails");
        assert!(clean["detail"].as_str().unwrap().contains("new connection's Will was published"), "{clean}");
    }
    assert_eq!(p.verdict("will-delay", "5"), "conforms");
    assert_eq!(p.case("server-keepalive", "5", "keepalive-k")["server_keepalive"], Value::Null);
    assert!(p.json["duration_s"].as_f64().unwrap() < 60.0);
    assert!(!p.stderr().contains("panicked"), "rumqttd's panics stay out of the output:\n{}", p.stderr());
}

#[tokio::test]
async fn mosquitto_is_probed_and_its_coarse_timer_shows() {
    let m = Mosquitto::start();
    let url = format!("mqtt://{}", m.addr());
    let p = probe(&["--broker", &url, "--repeat", "3"]).await;
    let out = p.stdout();
    assert_eq!(p.code(), 0, "mosquitto 2.0 fails no MUST:\n{out}\n{}", p.stderr());
    assert_eq!(p.json["broker"]["embedded"], false);
    assert_eq!(p.json["broker"]["address"], m.addr());
    assert!(p.json["broker"]["assigned_client_id"].as_str().is_some_and(|id| id.starts_with("auto-")));
    for v in ["3.1.1", "5"] {
        for s in ["keepalive", "half-open", "rewrite"] {
            let r = p.result(s, v);
            assert_eq!(r["runs"], 3);
            // Its Keep Alive check runs every 6 s: anywhere from about 1.5 × to 5 ×.
            let (lo, hi) = (r["ratio"]["min"].as_f64().unwrap(), r["ratio"]["max"].as_f64().unwrap());
            assert!(lo >= 1.0 && hi <= 5.5, "{s} {v}: {lo}–{hi}");
            // The runs start 1.4 s and 3.7 s apart (PROBE.md), so they meet that check in three
            // phases: three different closes, not one instant measured three times.
            let close = &r["close_after_s"];
            let spread = close["max"].as_f64().unwrap() - close["min"].as_f64().unwrap();
            assert!(spread >= 1.0, "{s} {v}: {close}");
            assert!(["conforms", "deviates"].contains(&r["verdict"].as_str().unwrap()), "{s} {v}: {r}");
            // Just a FIN: no DISCONNECT 0x8D.
            assert_eq!(r["close_how"], "fin", "{s} {v}: {r}");
            assert_eq!(r["disconnect_reason"], Value::Null);
        }
        assert_eq!(p.result("keepalive", v)["will_published"], true);
        assert_eq!(p.verdict("keepalive-zero", v), "conforms", "Keep Alive 0 stays open");
        let clean = p.case("takeover", v, "clean");
        assert_eq!(clean["old_closed"], true);
        assert!(clean["close_after_s"]["max"].as_f64().unwrap() < 0.5, "{clean}");
        assert_eq!(clean["close_how"], "fin", "no DISCONNECT 0x8E before 2.0.15: {clean}");
        assert_eq!(clean["will_published"], true, "mosquitto publishes the old Will of a clean session");
        assert_eq!(
            p.case("takeover", v, "persistent")["will_published"],
            false,
            "but not of a persistent one"
        );
    }
    assert_eq!(p.verdict("takeover", "5"), "deviates", "MQTT 5 asks for DISCONNECT 0x8E");
    assert_eq!(p.verdict("takeover", "3.1.1"), "conforms");
    assert_eq!(p.result("keepalive-zero", "5")["server_keepalive"], 65535);
    assert!(out.contains("SCENARIO") && out.contains("keepalive         3.1.1"), "{out}");
}

/// The probe reaches a TLS broker (verified against `--upstream-ca`) and a WebSocket broker:
/// its identification, Will watcher and the in-process proxy's upstream all speak the URL's
/// transport. An untrusted certificate stops it with exit 2 and the reason.
#[tokio::test]
async fn the_probe_speaks_tls_and_websocket_to_the_broker() {
    let pki = crate::tls::Pki::new();
    let (_tls_broker, tls_addr) = pki.mosquitto("server");
    let (_other, untrusted) = pki.mosquitto("other-server");
    let ws_port = free_port();
    let _ws_broker = Mosquitto::start_with(&format!("listener {ws_port} 127.0.0.1\nprotocol websockets\n"));
    let ca = pki.path("ca.pem").display().to_string();
    let tls_url = format!("mqtts://{tls_addr}");
    let ws_url = format!("ws://127.0.0.1:{ws_port}/mqtt");
    let runs: [(&str, Vec<&str>); 2] =
        [(&tls_url, vec!["--upstream-ca", &ca, "--upstream-server-name", "localhost"]), (&ws_url, vec![])];
    for (url, extra) in runs {
        let mut args = vec!["--broker", url, "--scenarios", "keepalive", "--protocol", "3.1.1"];
        args.extend(extra);
        let p = probe(&args).await;
        let out = p.stdout();
        assert_eq!(p.code(), 0, "{url}:\n{out}\n{}", p.stderr());
        assert_eq!(p.json["broker"]["address"], url);
        let r = p.result("keepalive", "3.1.1");
        // Closed by mosquitto's Keep Alive check (every few seconds), and the Will seen.
        let ratio = r["ratio"]["min"].as_f64().unwrap();
        assert!((1.0..=5.5).contains(&ratio), "{url}: {r}");
        assert_eq!(r["will_published"], true, "{url}: {r}");
    }
    let url = format!("mqtts://{untrusted}");
    let p = probe(&["--broker", &url, "--upstream-ca", &ca, "--upstream-server-name", "localhost"]).await;
    assert_eq!(p.code(), 2, "{}", p.stderr());
    assert!(p.stderr().contains(&format!("cannot reach the broker at {url}")), "{}", p.stderr());
    assert!(
        p.stderr().contains("TLS handshake failed") && p.stderr().contains("UnknownIssuer"),
        "{}",
        p.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// Against scripted brokers, one behaviour each

#[tokio::test]
async fn a_broker_that_never_enforces_keepalive_fails() {
    let b = MiniBroker::start(Behaviour { keepalive: None, ..Behaviour::default() }).await;
    let p = b.probe("keepalive,ping-resets", &[]).await;
    assert_eq!(p.code(), 1, "{}", p.stdout());
    for v in ["3.1.1", "5"] {
        let r = p.result("keepalive", v);
        assert_eq!(r["verdict"], "fails");
        assert!(r["detail"].as_str().unwrap().contains("never closed"), "{r}");
        assert_eq!(r["close_after_s"], Value::Null);
        assert_eq!(p.verdict("ping-resets", v), "fails");
    }
    assert_eq!(p.json["summary"]["fails"], 4);
    // --strict changes nothing about fails; deviates alone would not fail without it.
    assert!(p.stdout().contains("0 conforms, 0 deviates, 4 fails, 0 n/a"), "{}", p.stdout());
}

#[tokio::test]
async fn a_broker_that_closes_early_deviates_and_strict_makes_it_fail() {
    let b = MiniBroker::start(Behaviour { keepalive: Some(1.0), ..Behaviour::default() }).await;
    let args =
        ["--broker", &b.addr, "--keepalive", "2", "--timeout", "2", "--scenarios", "keepalive,half-open"];
    let p = probe(&args).await;
    assert_eq!(p.code(), 0, "deviates alone does not fail the run: {}", p.stdout());
    for v in ["3.1.1", "5"] {
        for s in ["keepalive", "half-open"] {
            let r = p.result(s, v);
            assert_eq!(r["verdict"], "deviates", "{r}");
            assert!(r["detail"].as_str().unwrap().contains("early"), "{r}");
            let ratio = ratio_median(r);
            assert!((0.95..1.3).contains(&ratio), "{s} {v}: {ratio}");
            assert_eq!(r["will_published"], true);
        }
    }
    let strict = probe(&[&args[..], &["--strict"]].concat()).await;
    assert_eq!(strict.code(), 1, "{}", strict.stdout());
    assert_eq!(strict.json["strict"], true);
}

#[tokio::test]
async fn disconnect_reasons_0x8d_and_0x8e_are_reported() {
    let b = MiniBroker::start(Behaviour {
        keepalive_reason: Some(0x8d),
        takeover_reason: Some(0x8e),
        ..Behaviour::default()
    })
    .await;
    let p = b.probe("keepalive,takeover", &[]).await;
    assert_eq!(p.code(), 0, "{}", p.stdout());
    let ka = p.result("keepalive", "5");
    assert_eq!(
        (&ka["verdict"], &ka["close_how"], &ka["disconnect_reason"]),
        (&"conforms".into(), &"disconnect".into(), &0x8d.into())
    );
    assert!(ka["detail"].as_str().unwrap().contains("DISCONNECT 0x8D (keep_alive_timeout)"), "{ka}");
    let to = p.result("takeover", "5");
    assert_eq!((&to["verdict"], &to["disconnect_reason"]), (&"conforms".into(), &0x8e.into()), "{to}");
    // MQTT 3.1.1 has no reasons: a plain close.
    assert_eq!(p.result("keepalive", "3.1.1")["close_how"], "fin");
    assert_eq!(p.verdict("takeover", "3.1.1"), "conforms");
}

/// The Reason String of a broker's DISCONNECT is in the report: exact in the JSON, escaped in
/// the terminal's header (it is the broker's text: it could hold escape sequences).
#[tokio::test]
async fn the_reason_string_of_a_brokers_disconnect_is_reported() {
    let said = "idle too long\x1b[2J\nFORGED";
    let b = MiniBroker::start(Behaviour {
        keepalive_reason: Some(0x8d),
        keepalive_reason_string: Some(said.into()),
        ..Behaviour::default()
    })
    .await;
    let p = b.probe("keepalive", &["--protocol", "5"]).await;
    assert_eq!(p.code(), 0, "{}", p.stdout());
    assert_eq!(p.json["broker"]["reason_strings"], serde_json::json!([said]));
    let out = p.stdout();
    assert!(out.contains(r#"reason strings "idle too long\u{1b}[2J\nFORGED""#), "{out}");
    assert!(!out.contains('\x1b') && !out.contains("\nFORGED"), "{out}");
    assert!(p.markdown.contains(r"\u{1b}[2J\nFORGED") && !p.markdown.contains('\x1b'), "{}", p.markdown);
}

#[tokio::test]
async fn a_broker_that_rejects_keepalive_zero_deviates() {
    let b = MiniBroker::start(Behaviour { reject_keepalive_zero: true, ..Behaviour::default() }).await;
    let p = b.probe("keepalive-zero", &[]).await;
    assert_eq!(p.code(), 0);
    for (v, code) in [("3.1.1", "0x02"), ("5", "0x82")] {
        let r = p.result("keepalive-zero", v);
        assert_eq!(r["verdict"], "deviates", "{r}");
        let said = format!("rejected at CONNECT: CONNECT refused with CONNACK code {code}");
        assert!(r["detail"].as_str().unwrap().contains(&said), "{r}");
    }
    // And one that accepts it keeps it open: conforms.
    let b = MiniBroker::start(Behaviour::default()).await;
    let p = b.probe("keepalive-zero", &[]).await;
    assert_eq!(p.verdict("keepalive-zero", "3.1.1"), "conforms");
}

#[tokio::test]
async fn mqtt5_rows_are_not_applicable_on_a_311_only_broker() {
    let b = MiniBroker::start(Behaviour { mqtt5: false, ..Behaviour::default() }).await;
    let p = b.probe("keepalive,will-delay", &[]).await;
    assert_eq!(p.code(), 0, "{}", p.stdout());
    assert_eq!(p.json["broker"]["protocols"], serde_json::json!(["3.1.1"]));
    assert_eq!(p.json["broker"]["refused"][0]["protocol"], "5");
    assert_eq!(p.verdict("keepalive", "3.1.1"), "conforms");
    for s in ["keepalive", "will-delay"] {
        let r = p.result(s, "5");
        assert_eq!(r["verdict"], "n/a");
        assert!(r["detail"].as_str().unwrap().contains("does not accept MQTT 5"), "{r}");
    }
    assert!(p.stdout().contains("refused 5: CONNECT refused with CONNACK code 0x01"), "{}", p.stdout());
}

#[tokio::test]
async fn a_broker_that_needs_a_username_works_with_credentials_never_printed() {
    let secret = "s3cr3t-pw-9f2";
    let b = MiniBroker::start(Behaviour {
        credentials: Some(("probe-user".into(), secret.into())),
        ..Behaviour::default()
    })
    .await;
    let without = probe(&["--broker", &b.addr, "--scenarios", "keepalive"]).await;
    assert_eq!(without.code(), 2);
    let err = without.stderr();
    assert!(err.contains(&b.addr) && err.contains("not authorized") && err.contains("--username"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let with_file = b
        .probe("keepalive,takeover", &["--username", "probe-user", "--password-file", file.to_str().unwrap()])
        .await;
    assert_eq!(with_file.code(), 0, "{}\n{}", with_file.stdout(), with_file.stderr());
    assert_eq!(with_file.verdict("keepalive", "5"), "conforms");
    let with_env = b
        .probe_env(
            "keepalive,takeover",
            &["--username", "probe-user"],
            &[("MQTT_CHAOS_PROBE_PASSWORD", secret)],
        )
        .await;
    assert_eq!(with_env.verdict("takeover", "3.1.1"), "conforms", "{}", with_env.stdout());
    for p in [&without, &with_file, &with_env] {
        let all = format!("{}{}{}{}{}", p.stdout(), p.stderr(), p.json, p.junit, p.markdown);
        assert!(!all.contains(secret), "the password was printed");
    }
}

#[tokio::test]
async fn a_reset_is_reported_as_rst() {
    let b = MiniBroker::start(Behaviour { keepalive_rst: true, ..Behaviour::default() }).await;
    let p = b.probe("keepalive", &["--protocol", "3.1.1"]).await;
    let r = p.result("keepalive", "3.1.1");
    assert_eq!((&r["verdict"], &r["close_how"]), (&"conforms".into(), &"rst".into()), "{r}");
    assert!(r["detail"].as_str().unwrap().contains("with RST"), "{r}");
}

#[tokio::test]
async fn a_broker_that_refuses_the_will_watcher_stops_the_probe_with_the_reason() {
    let b = MiniBroker::start(Behaviour { refuse_subscriptions: true, ..Behaviour::default() }).await;
    let p = probe(&["--broker", &b.addr, "--scenarios", "keepalive"]).await;
    assert_eq!(p.code(), 2, "{}", p.stdout());
    let err = p.stderr();
    assert!(
        err.contains("refused the Will watcher's subscription to mqtt-chaos/probe/")
            && err.contains("SUBACK code 0x80"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Servers that do not answer a CONNECT with a CONNACK: told for what they are, at once, and no
// report file left behind (exit 2)

/// A server that answers each connection's first bytes with `reply` and then, with `close`,
/// closes it (FIN), else keeps it open (and silent) for a minute.
async fn answering(reply: &'static [u8], close: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                if !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                let _ = s.write_all(reply).await;
                if close {
                    let _ = s.shutdown().await;
                    // Drain until the probe closes: the close stays a FIN, never a reset.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                } else {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    addr
}

/// Runs the probe of `addr` (`--timeout 20`) with `--json`, `--junit` and `--markdown` in a
/// fresh directory: its exit code, stderr, how long it took, and the files left in the directory.
async fn probe_failing(addr: &str) -> (Option<i32>, String, Duration, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["probe", "--broker", addr, "--scenarios", "keepalive", "--timeout", "20"]);
    for (flag, name) in [("--json", "r.json"), ("--junit", "r.xml"), ("--markdown", "r.md")] {
        cmd.arg(flag).arg(dir.path().join(name));
    }
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    let began = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let took = began.elapsed();
    let left = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), took, left)
}

#[tokio::test]
async fn a_server_that_answers_with_http_is_not_mqtt_and_the_probe_says_so_at_once() {
    let addr = answering(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nBad Request", false).await;
    let (code, err, took, left) = probe_failing(&addr).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "the broker at {addr} gave no valid CONNACK to the MQTT 3.1.1 CONNECT: not MQTT: the reply starts with `HTTP/1."
        )),
        "{err}"
    );
    assert!(!err.contains("CONNACK code"), "no CONNACK was ever sent: {err}");
    // The connection stays open: waiting for a CONNACK would take the 10 s identification limit.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(left.is_empty(), "exit 2 leaves no report file: {left:?}");
}

#[tokio::test]
async fn a_broker_that_closes_with_fin_before_connack_is_reported_as_such() {
    let addr = answering(b"", true).await;
    let (code, err, took, left) = probe_failing(&addr).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("MQTT 3.1.1: the broker closed with FIN before CONNACK; MQTT 5: the broker closed with FIN before CONNACK"),
        "{err}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(left.is_empty(), "exit 2 leaves no report file: {left:?}");
}

#[tokio::test]
async fn a_connack_of_an_absurd_length_is_malformed_not_a_reset() {
    // Remaining length 268,435,455: the largest MQTT can encode, for a 4-byte packet.
    let addr = answering(&[0x20, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00], false).await;
    let (code, err, took, left) = probe_failing(&addr).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("malformed CONNACK: remaining length 268435455"), "{err}");
    assert!(!err.contains("reset"), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(left.is_empty(), "exit 2 leaves no report file: {left:?}");
}

/// Two probes started at the same moment against one mosquitto: each has client ids of its
/// own (its process id in them), so neither takes the other's connections over.
#[tokio::test]
async fn two_probes_at_once_against_one_broker_keep_their_clients_apart() {
    let m = Mosquitto::start();
    let url = format!("mqtt://{}", m.addr());
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str| {
        Command::new(binary())
            .args(["probe", "--broker", &url, "--scenarios", "keepalive", "--protocol", "3.1.1"])
            .args(["--keepalive", "1", "--timeout", "8", "--json"])
            .arg(dir.path().join(name))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a.json"), spawn("b.json"));
    let pids = [a.id(), b.id()];
    let outs =
        tokio::task::spawn_blocking(move || [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()])
            .await
            .unwrap();
    let mut run_ids = Vec::new();
    for ((out, name), pid) in outs.iter().zip(["a.json", "b.json"]).zip(pids) {
        let shown =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{shown}");
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap();
        let r = &json["results"][0];
        assert_eq!(r["close_how"], "fin", "closed by the Keep Alive check, not by a takeover: {r}");
        assert_eq!(r["will_published"], true, "{r}");
        let run_id = json["run_id"].as_str().unwrap().to_string();
        assert!(run_id.starts_with(&format!("{:06x}", pid & 0xff_ffff)), "{run_id} of process {pid}");
        run_ids.push(run_id);
    }
    assert_ne!(run_ids[0], run_ids[1]);
    let log = m.log();
    assert!(
        log.contains(&format!("mcp{}", run_ids[0])) && log.contains(&format!("mcp{}", run_ids[1])),
        "{log}"
    );
    assert!(!log.contains("already connected"), "no client of one probe took over the other's:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// Usage, unreachable brokers, output on a terminal

#[tokio::test]
async fn bad_usage_and_an_unreachable_broker_exit_2_with_the_reason() {
    let (_held, dead) = dead_address();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--broker".into(), dead.clone()], "cannot reach the broker at"),
        (vec!["--keepalive".into(), "0".into()], "--keepalive 0: must be 1 to 3600"),
        // The range the probe takes, not that of the field's type (0..=65535).
        (vec!["--keepalive".into(), "70000".into()], "--keepalive 70000: must be 1 to 3600 seconds"),
        (vec!["--repeat".into(), "101".into()], "--repeat 101"),
        (
            vec!["--scenarios".into(), "keepalive,nope".into()],
            "unknown scenario \"nope\"; the scenarios are keepalive, ping-resets",
        ),
        (vec!["--protocol".into(), "3.1".into()], "--protocol: unknown MQTT version"),
        (
            vec!["--upstream-ca".into(), "/nonexistent/ca.pem".into()],
            "--upstream-ca only applies to a TLS broker: give --broker as mqtts://HOST:PORT",
        ),
        (
            vec![
                "--broker".into(),
                "mqtts://127.0.0.1:8883".into(),
                "--upstream-ca".into(),
                "/nonexistent/ca.pem".into(),
            ],
            "--upstream-ca /nonexistent/ca.pem",
        ),
        (vec!["--broker".into(), "https://b".into()], "unknown scheme \"https\""),
        (vec!["--password-file".into(), "/nonexistent/pw".into()], "--password-file /nonexistent/pw"),
        (vec!["--json".into(), "/nonexistent/dir/r.json".into()], "--json /nonexistent/dir/r.json"),
    ];
    for (args, message) in cases {
        let out = tokio::task::spawn_blocking({
            let args = args.clone();
            move || Command::new(binary()).arg("probe").args(&args).stdin(Stdio::null()).output().unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        if args[1] == dead {
            assert!(err.contains(&dead) && err.contains("refused"), "names the address and the cause: {err}");
        }
    }
}

#[tokio::test]
async fn progress_is_live_on_a_terminal_and_plain_lines_elsewhere() {
    let b = MiniBroker::start(Behaviour::default()).await;
    let args = format!(
        "{} probe --broker {} --keepalive 1 --protocol 5 --scenarios keepalive",
        binary().display(),
        b.addr
    );
    // `script` runs the probe on a pseudo-terminal (util-linux, in every Debian).
    let tty = tokio::task::spawn_blocking(move || {
        Command::new("script").args(["-qec", &args, "/dev/null"]).stdin(Stdio::null()).output()
    })
    .await
    .unwrap()
    .expect("`script` (util-linux) runs the probe on a terminal: apt-get install -y bsdutils");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(
        shown.contains("\r\x1b[2K") && shown.contains("0/1 done, running: keepalive (MQTT 5)"),
        "{shown:?}"
    );
    let plain =
        probe(&["--broker", &b.addr, "--keepalive", "1", "--protocol", "5", "--scenarios", "keepalive"])
            .await;
    let out = plain.stdout();
    assert!(!out.contains('\x1b'), "no escape codes when stdout is not a terminal: {out:?}");
    assert!(
        out.contains("started   keepalive (MQTT 5)\n")
            && out.contains("finished  keepalive (MQTT 5): conforms"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// A scripted broker with one behaviour to vary

#[derive(Clone)]
struct Behaviour {
    /// Close a client silent for this many × its Keep Alive (`None`: never).
    keepalive: Option<f64>,
    /// MQTT 5: DISCONNECT with this reason before a Keep Alive close.
    keepalive_reason: Option<u8>,
    /// That DISCONNECT's Reason String (property 0x1F).
    keepalive_reason_string: Option<String>,
    /// MQTT 5: DISCONNECT with this reason to a connection taken over.
    takeover_reason: Option<u8>,
    /// Refuse Keep Alive 0 with CONNACK 0x02 (3.1.1) / 0x82 (5).
    reject_keepalive_zero: bool,
    /// Accept MQTT 5 (else CONNACK 0x01, unacceptable protocol version).
    mqtt5: bool,
    /// Require this username and password (else CONNACK 0x05 / 0x87).
    credentials: Option<(String, String)>,
    /// Close a Keep Alive timeout with a reset instead of a FIN.
    keepalive_rst: bool,
    /// Refuse every subscription (SUBACK 0x80 / 0x87).
    refuse_subscriptions: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            keepalive: Some(1.5),
            keepalive_reason: None,
            keepalive_reason_string: None,
            takeover_reason: None,
            reject_keepalive_zero: false,
            mqtt5: true,
            credentials: None,
            keepalive_rst: false,
            refuse_subscriptions: false,
        }
    }
}

/// A small broker: CONNACK, PINGRESP, SUBACK, takeover, Keep Alive per [`Behaviour`], Wills
/// published at once to matching subscribers on any close without DISCONNECT.
struct MiniBroker {
    addr: String,
}

enum Cmd {
    Deliver(Vec<u8>),
    TakenOver,
}

#[derive(Default)]
struct Shared {
    next_id: u64,
    /// Live connections by client id: (connection number, commands).
    clients: HashMap<String, (u64, mpsc::UnboundedSender<Cmd>)>,
    /// Subscriptions: (filter, protocol, commands).
    subscriptions: Vec<(String, Protocol, mpsc::UnboundedSender<Cmd>)>,
}

impl MiniBroker {
    async fn start(behaviour: Behaviour) -> MiniBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, behaviour.clone(), shared.clone()));
            }
        });
        MiniBroker { addr }
    }
}

fn connack(p: Protocol, code: u8) -> Vec<u8> {
    if p == Protocol::V5 { packet(0x20, &[0, code, 0]) } else { packet(0x20, &[0, code]) }
}

fn disconnect_with(reason: u8) -> Vec<u8> {
    packet(0xe0, &[reason, 0])
}

/// An MQTT 5 DISCONNECT with a reason and a Reason String.
fn disconnect_saying(reason: u8, text: &str) -> Vec<u8> {
    let mut props = vec![0x1f];
    props.extend_from_slice(&(text.len() as u16).to_be_bytes());
    props.extend_from_slice(text.as_bytes());
    let mut body = vec![reason, props.len() as u8];
    body.extend(props);
    packet(0xe0, &body)
}

/// A PUBLISH of `topic` QoS 0 (the Will's payload does not matter to the probe).
fn publish(p: Protocol, topic: &str) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if p == Protocol::V5 {
        body.push(0);
    }
    body.extend_from_slice(b"gone");
    packet(0x30, &body)
}

async fn serve(mut s: TcpStream, b: Behaviour, shared: Arc<Mutex<Shared>>) {
    let mut buf = Vec::new();
    let splitter = Splitter::new(64 * 1024);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut me: Option<(String, u64, Protocol, u16, Option<String>)> = None;
    let mut last = Instant::now();
    let mut chunk = [0u8; 4096];
    // Whether the connection ended in a way that publishes the Will.
    let publish_will;
    loop {
        while let Step::Frame(h) = splitter.peek(&buf) {
            let f: Vec<u8> = buf.drain(..h.frame_len()).collect();
            last = Instant::now();
            match handle(&mut s, &f, &h, &b, &shared, &tx, &mut me).await {
                Flow::Go => {}
                Flow::Stop { will } => {
                    end(&shared, &me, will);
                    return;
                }
            }
        }
        let keepalive = me.as_ref().map_or(0, |m| m.3);
        let due = b
            .keepalive
            .filter(|_| keepalive > 0)
            .map(|f| last + Duration::from_secs_f64(f * f64::from(keepalive)));
        tokio::select! {
            n = s.read(&mut chunk) => match n {
                Ok(0) | Err(_) => { publish_will = true; break; }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            cmd = rx.recv() => match cmd {
                Some(Cmd::Deliver(p)) => { let _ = s.write_all(&p).await; }
                Some(Cmd::TakenOver) | None => {
                    if let (Some(r), Some((_, _, Protocol::V5, _, _))) = (b.takeover_reason, &me) {
                        let _ = s.write_all(&disconnect_with(r)).await;
                    }
                    publish_will = true;
                    break;
                }
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if due.is_some() => {
                if let (Some(r), Some((_, _, Protocol::V5, _, _))) = (b.keepalive_reason, &me) {
                    let packet = match &b.keepalive_reason_string {
                        Some(text) => disconnect_saying(r, text),
                        None => disconnect_with(r),
                    };
                    let _ = s.write_all(&packet).await;
                }
                if b.keepalive_rst {
                    s.set_zero_linger().unwrap();
                }
                publish_will = true;
                break;
            }
        }
    }
    end(&shared, &me, publish_will);
}

enum Flow {
    Go,
    Stop { will: bool },
}

async fn handle(
    s: &mut TcpStream,
    f: &[u8],
    h: &FrameHeader,
    b: &Behaviour,
    shared: &Arc<Mutex<Shared>>,
    tx: &mpsc::UnboundedSender<Cmd>,
    me: &mut Option<(String, u64, Protocol, u16, Option<String>)>,
) -> Flow {
    let protocol = me.as_ref().map_or(Protocol::V311, |m| m.2);
    match h.packet_type {
        PacketType::Connect => {
            let Ok(c) = Connect::decode(f, h) else { return Flow::Stop { will: false } };
            let refuse = |code5: u8, code4: u8| if c.protocol == Protocol::V5 { code5 } else { code4 };
            let code = if c.protocol == Protocol::V5 && !b.mqtt5 {
                Some(0x01)
            } else if b.credentials.as_ref().is_some_and(|(u, pw)| {
                c.username.as_deref() != Some(u.as_str())
                    || !c.password_present
                    || !f.ends_with(pw.as_bytes())
            }) {
                Some(refuse(0x87, 0x05))
            } else if b.reject_keepalive_zero && c.keep_alive == 0 {
                Some(refuse(0x82, 0x02))
            } else {
                None
            };
            if let Some(code) = code {
                let p = if code == 0x01 { Protocol::V311 } else { c.protocol };
                let _ = s.write_all(&connack(p, code)).await;
                return Flow::Stop { will: false };
            }
            let id = if c.client_id.is_empty() { "assigned".to_string() } else { c.client_id.clone() };
            let old = {
                let mut sh = shared.lock().unwrap();
                sh.next_id += 1;
                let n = sh.next_id;
                *me =
                    Some((id.clone(), n, c.protocol, c.keep_alive, c.will.as_ref().map(|w| w.topic.clone())));
                sh.clients.insert(id, (n, tx.clone()))
            };
            if let Some((_, old)) = old {
                let _ = old.send(Cmd::TakenOver);
            }
            let _ = s.write_all(&connack(c.protocol, 0)).await;
        }
        PacketType::Pingreq => {
            let _ = s.write_all(&[0xd0, 0]).await;
        }
        PacketType::Subscribe => {
            let id = [f[usize::from(h.header_len)], f[usize::from(h.header_len) + 1]];
            let code = match (b.refuse_subscriptions, protocol) {
                (false, _) => 0,
                (true, Protocol::V5) => 0x87,
                (true, _) => 0x80,
            };
            if let (0, Ok(filters)) = (code, TopicFilters::decode(f, h, protocol, true)) {
                let mut sh = shared.lock().unwrap();
                for filter in filters.0 {
                    sh.subscriptions.push((filter, protocol, tx.clone()));
                }
            }
            let body =
                if protocol == Protocol::V5 { vec![id[0], id[1], 0, code] } else { vec![id[0], id[1], code] };
            let _ = s.write_all(&packet(0x90, &body)).await;
        }
        PacketType::Disconnect => return Flow::Stop { will: false },
        PacketType::Publish => {
            let _ = Publish::decode(f, h, protocol);
        }
        _ => {}
    }
    Flow::Go
}

/// The connection ended: leave the client table (unless taken over) and publish the Will.
fn end(shared: &Arc<Mutex<Shared>>, me: &Option<(String, u64, Protocol, u16, Option<String>)>, will: bool) {
    let Some((id, n, _, _, topic)) = me else { return };
    let mut sh = shared.lock().unwrap();
    if sh.clients.get(id).is_some_and(|(m, _)| m == n) {
        sh.clients.remove(id);
    }
    if let (true, Some(topic)) = (will, topic) {
        sh.subscriptions.retain(|(_, _, tx)| !tx.is_closed());
        for (filter, p, tx) in &sh.subscriptions {
            if filter_matches(filter, topic) {
                let _ = tx.send(Cmd::Deliver(publish(*p, topic)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A JSON Schema validator for the keywords PROBE.schema.json uses (and no others: a keyword it
// does not know fails the check, so the schema cannot silently outgrow it).

fn schema() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/PROBE.schema.json")).unwrap();
    serde_json::from_str(&text).expect("PROBE.schema.json is JSON")
}

fn validate(v: &Value, s: &Value, root: &Value, at: &str) -> Vec<String> {
    const KNOWN: [&str; 15] = [
        "$schema",
        "$id",
        "$defs",
        "$ref",
        "title",
        "description",
        "type",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "minimum",
        "maximum",
    ];
    let mut errors = Vec::new();
    let s = s.as_object().expect("a schema is an object");
    for k in s.keys() {
        assert!(
            KNOWN.contains(&k.as_str()),
            "PROBE.schema.json uses {k}, which the test's validator does not know"
        );
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("only local $refs");
        return validate(v, &root["$defs"][name], root, at);
    }
    if let Some(types) = s.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
            _ => panic!("bad type in schema"),
        };
        let ok = types.iter().any(|t| match *t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_u64() || v.is_i64(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            other => panic!("unknown type {other}"),
        });
        if !ok {
            errors.push(format!("{at}: {v} is not of type {types:?}"));
            return errors;
        }
    }
    if let Some(c) = s.get("const") {
        if v != c {
            errors.push(format!("{at}: {v} is not {c}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if s.get("minimum").and_then(Value::as_f64).is_some_and(|m| n < m) {
            errors.push(format!("{at}: {n} is below the minimum"));
        }
        if s.get("maximum").and_then(Value::as_f64).is_some_and(|m| n > m) {
            errors.push(format!("{at}: {n} is above the maximum"));
        }
    }
    if let Some(o) = v.as_object() {
        for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !o.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{at}: {r} is missing"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => errors.extend(validate(val, ps, root, &format!("{at}.{k}"))),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: {k} is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Some(a), Some(items)) = (v.as_array(), s.get("items")) {
        for (i, item) in a.iter().enumerate() {
            errors.extend(validate(item, items, root, &format!("{at}[{i}]")));
        }
    }
    errors
}

#[test]
fn the_schema_validator_rejects_what_the_schema_forbids() {
    let s = schema();
    let good = serde_json::json!({"scenario": "keepalive", "protocol": "5", "verdict": "conforms", "expectation": "e",
        "detail": "d", "runs": 1, "close_after_s": {"min": 3.0, "median": 3.0, "max": 3.0}, "ratio": null,
        "close_how": "fin", "disconnect_reason": null, "will_published": true, "will_delay_s": null,
        "old_closed": null, "server_keepalive": null});
    assert_eq!(validate(&good, &s["$defs"]["result"], &s, "$"), Vec::<String>::new());
    for (field, bad) in [
        ("verdict", serde_json::json!("maybe")),
        ("protocol", serde_json::json!("3.1")),
        ("close_after_s", serde_json::json!({"min": 1.0})),
        ("disconnect_reason", serde_json::json!(300)),
        ("surprise", serde_json::json!(1)),
    ] {
        let mut doc = good.clone();
        doc[field] = bad;
        assert!(!validate(&doc, &s["$defs"]["result"], &s, "$").is_empty(), "{field} should be rejected");
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("runs");
    assert!(!validate(&missing, &s["$defs"]["result"], &s, "$").is_empty());
}
