//! The admin API, route by route, its errors and its token; `ctl` against the running binary.

use crate::harness::*;
use mqtt_chaos::ctl::{Client, Reply};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

/// Serves the admin API of `proxy` on a free loopback port.
pub(crate) async fn serve_admin(proxy: &TestProxy, token: Option<&str>) -> SocketAddr {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let app = mqtt_chaos::admin::app(proxy.running().control(dir, token.map(str::to_string)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mqtt_chaos::admin::serve(listener, app, Default::default()));
    addr
}

pub(crate) async fn call(admin: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Reply {
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    client.request(method, path, Some("application/json"), &body).await.unwrap()
}

pub(crate) fn assert_error(r: &Reply, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json().unwrap();
    assert_eq!(v["status"], status, "{}", r.body);
    assert!(v["error"].as_str().unwrap().contains(contains), "{}", r.body);
}

#[tokio::test]
async fn every_route_answers_and_every_error_is_json() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;

    assert_eq!(call(admin, "GET", "/healthz", None).await.json().unwrap(), json!({"status": "ok"}));
    let metrics = call(admin, "GET", "/metrics", None).await;
    assert!(metrics.body.contains("mqtt_chaos_connections_total{route=\"default\"} 0"), "{}", metrics.body);
    assert_eq!(call(admin, "GET", "/connections", None).await.json().unwrap(), json!([]));

    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("api-device", 30, None)).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK").await;
    let list = call(admin, "GET", "/connections", None).await.json().unwrap();
    assert_eq!(list[0]["client_id"], "api-device");
    let id = list[0]["id"].as_u64().unwrap();
    let one = call(admin, "GET", &format!("/connections/{id}"), None).await;
    assert_eq!(one.json().unwrap()["keep_alive"]["requested"], 30);
    assert_error(&call(admin, "GET", "/connections/999999", None).await, 404, "no live connection 999999");
    assert_error(&call(admin, "GET", "/connections/abc", None).await, 400, "not a number");

    // Global rules.
    let rule = json!({"name": "late", "action": "delay", "latency": "1s", "packets": ["PUBLISH"]});
    assert_eq!(call(admin, "POST", "/rules", Some(rule.clone())).await.status, 201);
    assert_error(&call(admin, "POST", "/rules", Some(rule)).await, 409, "already in force");
    let bad =
        call(admin, "POST", "/rules", Some(json!({"name": "p", "action": "drop", "probability": 2}))).await;
    assert_error(&bad, 400, "probability must be between 0.0 and 1.0");
    assert_eq!(bad.json().unwrap()["field"], "rule.probability");
    assert_error(
        &call(admin, "POST", "/rules", Some(json!({"name": "u", "action": "drop", "speed": 1}))).await,
        400,
        "unknown field `speed`",
    );
    let rules = call(admin, "GET", "/rules", None).await.json().unwrap();
    assert_eq!(rules["rules"][0]["name"], "late");
    assert_error(&call(admin, "DELETE", "/rules/nope", None).await, 404, "no rule named \"nope\"");
    assert_eq!(call(admin, "DELETE", "/rules/late", None).await.status, 200);
    assert_eq!(call(admin, "GET", "/rules", None).await.json().unwrap()["rules"], json!([]));

    // A rule for this one connection: its PINGREQs vanish, another connection's do not.
    let local =
        json!({"name": "mute", "action": "drop", "direction": "client_to_broker", "packets": ["PINGREQ"]});
    assert_eq!(
        call(admin, "POST", &format!("/connections/{id}/rules"), Some(local.clone())).await.status,
        201
    );
    assert_error(
        &call(admin, "POST", &format!("/connections/{id}/rules"), Some(local)).await,
        409,
        "already has a rule",
    );
    device.write_all(&PINGREQ).await.unwrap();
    assert_eq!(read_to_end(&mut device, Duration::from_millis(700)).await, (vec![], Ending::Open));
    let mut other = proxy.connect().await;
    other.write_all(&connect_v4("api-other", 30, None)).await.unwrap();
    expect_packet(&mut other, WAIT, "CONNACK").await;
    other.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut other, WAIT, "PINGRESP").await, PINGRESP);

    // The connection's own rule can be removed again: its PINGREQs flow once more.
    assert_error(
        &call(admin, "DELETE", &format!("/connections/{id}/rules/nothing"), None).await,
        404,
        "has no rule named \"nothing\"",
    );
    let removed = call(admin, "DELETE", &format!("/connections/{id}/rules/mute"), None).await;
    assert_eq!(removed.json().unwrap(), json!({"connection": id, "removed": "mute"}));
    device.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut device, WAIT, "PINGRESP").await, PINGRESP);
    // A reset removes global rules and every connection's own, and says how many of each.
    let again =
        json!({"name": "mute", "action": "drop", "direction": "client_to_broker", "packets": ["PINGREQ"]});
    assert_eq!(call(admin, "POST", &format!("/connections/{id}/rules"), Some(again)).await.status, 201);
    assert_eq!(
        call(
            admin,
            "POST",
            "/rules",
            Some(json!({"name": "g", "action": "delay", "latency": "1s", "packets": ["PUBLISH"]}))
        )
        .await
        .status,
        201
    );
    let reset = call(admin, "POST", "/reset", None).await.json().unwrap();
    assert_eq!(reset["removed"], json!({"global": 1, "local": 1}));
    assert_eq!(
        call(admin, "GET", &format!("/connections/{id}"), None).await.json().unwrap()["local_rules"],
        json!([])
    );
    device.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut device, WAIT, "PINGRESP").await, PINGRESP, "the reset removed `mute`");

    // Profiles.
    let profiles = call(admin, "GET", "/profiles", None).await.json().unwrap();
    assert!(profiles.as_array().unwrap().iter().any(|p| p["name"] == "drop-pingreq"), "{profiles}");
    let active = call(admin, "PUT", "/profile", Some(json!({"name": "drop-pingreq"}))).await;
    assert_eq!(active.json().unwrap()["profile"], "drop-pingreq");
    assert_error(&call(admin, "PUT", "/profile", Some(json!({"name": "../secrets"}))).await, 400, "no paths");
    assert_error(
        &call(admin, "PUT", "/profile", Some(json!({"name": "nope"}))).await,
        404,
        "no profile \"nope\"",
    );
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let toml_body = "name = \"inline\"\n[[rules]]\nname = \"z\"\naction = \"drop\"\npackets = [\"PONG\"]\n";
    let r = client.request("PUT", "/profile", Some("application/toml"), toml_body.as_bytes()).await.unwrap();
    assert_error(&r, 400, "request body:5:12: unknown packet type \"PONG\"");
    let good = toml_body.replace("PONG", "PINGREQ");
    let r = client.request("PUT", "/profile", Some("application/toml"), good.as_bytes()).await.unwrap();
    assert_eq!(r.json().unwrap()["profile"], "inline");
    let m = call(admin, "GET", "/metrics", None).await.body;
    // The hash is of the body's exact text, as of a watched file (README, "Profiles that reload").
    let hash =
        mqtt_chaos::fault::profile::hash_hex(mqtt_chaos::fault::profile::content_hash(good.as_bytes()));
    let info =
        format!("mqtt_chaos_build_info{{version=\"0.1.0\",profile=\"inline\",profile_hash=\"{hash}\"}} 1");
    assert!(m.contains(&info), "{m}");
    assert_eq!(call(admin, "POST", "/reset", None).await.status, 200);
    assert_eq!(call(admin, "GET", "/rules", None).await.json().unwrap()["profile"], Value::Null);

    // Closing one connection, with a reset.
    assert_error(
        &call(admin, "DELETE", &format!("/connections/{id}?how=gently"), None).await,
        400,
        "fin or rst",
    );
    assert_eq!(call(admin, "DELETE", &format!("/connections/{id}?how=rst"), None).await.status, 200);
    assert_eq!(read_to_end(&mut device, WAIT).await.1, Ending::Reset);
    assert_error(&call(admin, "GET", "/no/such/route", None).await, 404, "no such route");
}

#[tokio::test]
async fn abusive_bodies_get_clear_errors_and_the_data_path_is_unaffected() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let big = vec![b' '; 2 * 1024 * 1024];
    let r = client.request("POST", "/rules", Some("application/json"), &big).await.unwrap();
    assert_error(&r, 413, "limit");
    for nested in [
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!(
            "{{\"name\":\"n\",\"action\":\"drop\",\"match\":{}{}}}",
            "{\"a\":".repeat(10_000),
            "}".repeat(10_000)
        ),
    ] {
        let r = client.request("POST", "/rules", Some("application/json"), nested.as_bytes()).await.unwrap();
        assert_error(&r, 400, "not a valid rule");
    }
    let r = client.request("PUT", "/profile", Some("application/toml"), b"\xff\xfe name").await.unwrap();
    assert_error(&r, 400, "not UTF-8");
    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("still-fine", 30, None)).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK").await;
}

#[tokio::test]
async fn the_token_guards_every_route_but_healthz() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, Some("s3cret")).await;
    assert_error(&call(admin, "GET", "/metrics", None).await, 401, "Bearer");
    let wrong = Client::new(&format!("http://{admin}"), Some("guess".into())).unwrap();
    assert_error(&wrong.request("GET", "/rules", None, b"").await.unwrap(), 401, "Bearer");
    let right = Client::new(&format!("http://{admin}"), Some("s3cret".into())).unwrap();
    assert_eq!(right.request("GET", "/rules", None, b"").await.unwrap().status, 200);
    assert_eq!(call(admin, "GET", "/healthz", None).await.status, 200);
}

#[test]
fn ctl_drives_a_running_proxy() {
    let broker = Mosquitto::start();
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let dir = dir.to_str().unwrap();
    let proxy = ProxyProcess::start(
        &broker.addr(),
        &["--admin", &admin, "--profiles-dir", dir, "--shutdown-grace", "200ms"],
    );
    let listen = proxy.listen.clone();
    let ctl = |args: &[&str]| ctl(&admin, args);
    let mut device = std::net::TcpStream::connect(&listen).unwrap();
    std::io::Write::write_all(&mut device, &connect_v4("ctl-device", 45, None)).unwrap();
    device.set_read_timeout(Some(WAIT)).unwrap();
    std::io::Read::read_exact(&mut device, &mut [0u8; 4]).unwrap();

    let (code, out, _) = ctl(&["connections"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("ctl-device") && out.contains("45/45/45"), "{out}");
    let (code, out, _) = ctl(&["profiles"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("NAME") && out.contains("drop-pingresp") && out.contains("file"), "{out}");
    let (code, out, _) = ctl(&["profile", "drop-pingresp"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("profile: drop-pingresp") && out.contains("swallow-pingresp"), "{out}");
    let (code, out, _) = ctl(&["add", r#"{"name":"extra","action":"drop","packets":["PUBLISH"]}"#]);
    assert_eq!((code, out.trim()), (Some(0), "added rule extra"));
    let (code, _, err) = ctl(&["add", r#"{"name":"extra","action":"drop"}"#]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already in force (409)"), "{err}");
    let (code, out, _) = ctl(&["--json", "rules"]);
    assert_eq!(code, Some(0));
    let rules: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rules["rules"].as_array().unwrap().len(), 2);
    assert_eq!(ctl(&["remove", "extra"]).0, Some(0));

    // Global flags after the subcommand; a file of `[[rules]]` tables (the README's snippets).
    let snippets = tempfile::tempdir().unwrap();
    let file = snippets.path().join("rules.toml");
    std::fs::write(
        &file,
        "[[rules]]\nname = \"no-pingresp\"\naction = \"drop\"\ndirection = \"broker_to_client\"\n\
         packets = [\"PINGRESP\"]\nprobability = 0.3\n\n[[rules]]\nname = \"slow\"\naction = \"delay\"\n\
         latency = \"2s\"\npackets = [\"PUBLISH\"]\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["ctl", "add", file.to_str().unwrap(), "--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "added rule no-pingresp\nadded rule slow\n");
    let out = Command::new(binary())
        .args(["ctl", "rules", "--json", "--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    let rules: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = rules["rules"].as_array().unwrap().iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, [json!("swallow-pingresp"), json!("no-pingresp"), json!("slow")]);
    std::fs::write(&file, "[[rules]]\nname = \"bad\"\naction = \"drop\"\nspeed = 3\n").unwrap();
    let (code, _, err) = ctl(&["add", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("rules.toml:4:1: unknown field `speed`"), "{err}");

    let (code, out, _) = ctl(&["reset"]);
    assert_eq!((code, out.trim()), (Some(0), "all rules removed (3 global, 0 of single connections)"));
    let (code, out, _) = ctl(&["--json", "connections"]);
    assert_eq!(code, Some(0));
    let id = serde_json::from_str::<Value>(&out).unwrap()[0]["id"].as_u64().unwrap();

    // A rule for this connection alone shows in its row, and the connection feels it.
    let rule = r#"{"name":"mute-me","action":"drop","packets":["PINGRESP"]}"#;
    let (code, out, _) = ctl(&["add", "--conn", &id.to_string(), rule]);
    assert_eq!((code, out.trim()), (Some(0), format!("added rule mute-me to connection {id}").as_str()));
    let (code, out, _) = ctl(&["connections"]);
    assert_eq!(code, Some(0));
    let row = out.lines().find(|l| l.contains("ctl-device")).unwrap_or_default();
    assert!(row.contains("mute-me"), "{out}");
    assert!(!ctl(&["rules"]).1.contains("mute-me"), "a connection's rule is not a global one");
    std::io::Write::write_all(&mut device, &PINGREQ).unwrap();
    device.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(std::io::Read::read(&mut device, &mut [0u8; 2]).is_err(), "PINGRESP was not dropped");
    device.set_read_timeout(Some(WAIT)).unwrap();
    let (code, _, err) = ctl(&["add", "--conn", "999999", rule]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no live connection 999999 (404)"), "{err}");
    let (code, out, _) = ctl(&["remove", "--conn", &id.to_string(), "mute-me"]);
    assert_eq!((code, out.trim()), (Some(0), format!("removed rule mute-me from connection {id}").as_str()));
    std::io::Write::write_all(&mut device, &PINGREQ).unwrap();
    let mut pingresp = [0u8; 2];
    std::io::Read::read_exact(&mut device, &mut pingresp).unwrap();
    assert_eq!(pingresp, PINGRESP, "the connection's rule is gone");

    assert_eq!(ctl(&["kill", &id.to_string()]).0, Some(0));
    let mut rest = Vec::new();
    assert_eq!(std::io::Read::read_to_end(&mut device, &mut rest).unwrap(), 0, "killed with FIN");
    let out =
        Command::new(binary()).args(["ctl", "--admin", "http://127.0.0.1:1", "rules"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"), "{out:?}");
}

#[tokio::test]
async fn ten_thousand_rules_and_stalled_clients_leave_the_api_and_the_data_path_working() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;

    // A client that sends its request headers, then its body one byte every 500 ms (64 bytes
    // announced: 32 s), and one that never finishes its headers.
    let started = Instant::now();
    let drip = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut drip_rx, mut drip_tx) = drip.into_split();
    drip_tx
        .write_all(b"POST /rules HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n")
        .await
        .unwrap();
    tokio::spawn(async move {
        for _ in 0..64 {
            if drip_tx.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let dripped = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), drip_rx.read_to_end(&mut answer)).await;
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    });
    let mut stall = tokio::net::TcpStream::connect(admin).await.unwrap();
    stall.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let stalled = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), stall.read_to_end(&mut answer)).await;
        started.elapsed()
    });

    // 10,000 rules that match nobody, as one profile.
    let mut profile = String::from("name = \"ten-thousand\"\n");
    for i in 0..10_000 {
        profile.push_str(&format!(
            "[[rules]]\nname = \"r{i}\"\naction = \"drop\"\nmatch = {{ client_id = \"nobody-{i}\" }}\n"
        ));
    }
    assert!(profile.len() < mqtt_chaos::admin::BODY_LIMIT);
    let client = Client::new(&format!("http://{admin}"), None).unwrap();
    let r = client.request("PUT", "/profile", Some("application/toml"), profile.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    let m = call(admin, "GET", "/metrics", None).await.body;
    assert!(m.contains("mqtt_chaos_rules_active{route=\"default\"} 10000"), "rules_active is wrong");

    // The data path still works with every rule evaluated and none matching.
    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("busy-day", 30, None)).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK").await;
    for _ in 0..100 {
        device.write_all(&PINGREQ).await.unwrap();
        assert_eq!(expect_packet(&mut device, WAIT, "PINGRESP").await, PINGRESP);
    }
    assert_eq!(call(admin, "GET", "/healthz", None).await.status, 200, "the API answers during the drip");

    // The dripping body gets a 408 once REQUEST_TIMEOUT (10 s) has passed; the stalled headers
    // get their connection closed after HEADER_TIMEOUT (10 s).
    let (answer, after) = dripped.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?} after {after:?}");
    assert!(answer.contains("\"status\":408") && answer.contains("body too slow"), "{answer}");
    assert!((Duration::from_secs(9)..Duration::from_secs(15)).contains(&after), "408 after {after:?}");
    let after = stalled.await.unwrap();
    assert!((Duration::from_secs(9)..Duration::from_secs(15)).contains(&after), "closed after {after:?}");
    assert_eq!(call(admin, "GET", "/healthz", None).await.status, 200, "the API still answers");
}
