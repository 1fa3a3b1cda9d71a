//! The admin API as it runs in a cluster: beyond loopback only with a token (or an explicit
//! opt-out), the token from a file, probes open and everything else guarded; and `ctl` driving
//! several proxies at once.

use crate::harness::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// `mqtt-chaos proxy` with its own route on a free loopback port and `extra` flags, with none of
/// the admin variables of the environment this test runs in; its stderr goes to a file.
fn proxy_command(extra: &[&str], stderr: &std::fs::File) -> Command {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(binary());
    command
        .args(["proxy", "--listen", &listen, "--upstream", "127.0.0.1:1", "--shutdown-grace", "100ms"])
        .args(extra)
        .env_remove("MQTT_CHAOS_ADMIN_TOKEN")
        .env_remove("MQTT_CHAOS_ADMIN_TOKEN_FILE")
        .env_remove("MQTT_CHAOS_ADMIN_ALLOW_NO_TOKEN")
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().unwrap());
    command
}

/// Runs the proxy with `extra` flags expecting it to stop by itself: its exit code and stderr
/// (killed, and the test failed, if it still runs after [`WAIT`]).
fn refused_start(extra: &[&str]) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(proxy_command(extra, log.as_file()).spawn().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < WAIT, "the proxy started with {extra:?}; it should have refused");
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(log.path()).unwrap())
}

/// A proxy that serves its admin API on `admin` (given as `0.0.0.0:PORT` or `127.0.0.1:PORT`),
/// once `127.0.0.1:PORT` accepts; its log is in `.1`.
fn started(admin: &str, extra: &[&str]) -> (KillOnDrop, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut args = vec!["--admin", admin];
    args.extend(extra);
    let mut child = KillOnDrop(proxy_command(&args, log.as_file()).spawn().unwrap());
    let port = admin.rsplit(':').next().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
        let ended = child.0.try_wait().unwrap();
        assert!(
            ended.is_none() && started.elapsed() < WAIT,
            "the admin API did not come up on {admin} ({ended:?}): {}",
            std::fs::read_to_string(log.path()).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, log)
}

/// One HTTP/1.1 GET on 127.0.0.1:`port` with `headers`: the status and the whole answer.
fn get(port: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{headers}\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer)
}

#[test]
fn an_admin_api_beyond_loopback_without_a_token_refuses_to_start_unless_told_it_is_a_lab() {
    let port = free_port().to_string();
    let all = format!("0.0.0.0:{port}");
    let (code, err) = refused_start(&["--admin", &all]);
    assert_eq!(code, Some(2), "{err}");
    for says in
        [&format!("--admin {all} listens beyond loopback"), "--admin-token-file", "--admin-allow-no-token"]
    {
        assert!(err.contains(says), "{says:?} missing from: {err}");
    }
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "nothing listens after a refusal"
    );
    // An empty token is no token (`Bearer ` would match it).
    let (code, err) = refused_start(&["--admin", &all, "--admin-token", ""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--admin-token: the token is empty"), "{err}");

    // The lab's explicit opt-out: it starts, open, and says so.
    let (mut proxy, log) = started(&all, &["--admin-allow-no-token"]);
    assert_eq!(get(&port, "/rules", "").0, 200);
    proxy.0.kill().unwrap();
    proxy.0.wait().unwrap();
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(log.contains("listens beyond loopback without a token"), "{log}");

    // Loopback needs no token, as before.
    let local = format!("127.0.0.1:{}", free_port());
    let (_proxy, _log) = started(&local, &[]);
    assert_eq!(get(local.rsplit(':').next().unwrap(), "/rules", "").0, 200);
}

#[test]
fn a_token_from_a_file_guards_metrics_and_rules_while_probes_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let token = "k8s-secret-7f3a9c";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let port = free_port().to_string();
    let (mut proxy, log) =
        started(&format!("0.0.0.0:{port}"), &["--admin-token-file", file.to_str().unwrap()]);

    assert_eq!(get(&port, "/healthz", "").0, 200, "a kubelet probe sends no token");
    assert_ne!(get(&port, "/readyz", "").0, 401, "a kubelet probe sends no token");
    let (status, answer) = get(&port, "/metrics", "");
    assert_eq!(status, 401, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("www-authenticate: bearer"), "{answer}");
    assert_eq!(get(&port, "/metrics", "authorization: Bearer k8s-secret-7f3a9\r\n").0, 401, "a prefix");
    assert_eq!(get(&port, "/metrics", &format!("authorization: Bearer {token}x\r\n")).0, 401);
    let (status, answer) = get(&port, "/metrics", &format!("authorization: Bearer {token}\r\n"));
    assert_eq!(status, 200, "the file's final newline is not part of the token");
    assert!(answer.contains("mqtt_chaos_"), "{answer}");
    for path in ["/connections", "/rules", "/summary", "/profiles", "/events"] {
        assert_eq!(get(&port, path, "").0, 401, "{path} without the token");
    }

    // ctl sends it, from a file or the environment.
    let admin = format!("http://127.0.0.1:{port}");
    let ctl = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(binary());
        command.args(["ctl", "--admin", &admin]).args(args).env_remove("MQTT_CHAOS_ADMIN_TOKEN");
        match env {
            Some(path) => command.env("MQTT_CHAOS_ADMIN_TOKEN_FILE", path),
            None => command.env_remove("MQTT_CHAOS_ADMIN_TOKEN_FILE"),
        };
        command.output().unwrap()
    };
    assert!(ctl(&["rules", "--token-file", file.to_str().unwrap()], None).status.success());
    assert!(ctl(&["rules"], Some(file.to_str().unwrap())).status.success());
    let refused = ctl(&["rules"], None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("(401)"), "{refused:?}");

    proxy.0.kill().unwrap();
    proxy.0.wait().unwrap();
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(log.contains("admin API listening") && log.contains("bearer token"), "{log}");
    assert!(!log.contains(token), "the token is never logged: {log}");
}

#[test]
fn a_token_file_that_cannot_be_read_or_holds_no_token_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let two_lines = dir.path().join("two-lines");
    std::fs::write(&two_lines, "abc\nsecret-part\n").unwrap();
    let cases = [
        (&missing, "No such file"),
        (&empty, "the token is empty"),
        (&two_lines, "the token is more than one line"),
        (&dir.path().to_path_buf(), "--admin-token-file"),
    ];
    for (file, says) in cases {
        let path = file.to_str().unwrap();
        let (code, err) = refused_start(&["--admin", "none", "--admin-token-file", path]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(&format!("--admin-token-file {path}: ")) && err.contains(says), "{err}");
        assert!(!err.contains("secret-part"), "the file's content is not shown: {err}");
    }
    let (code, err) = refused_start(&["--admin-token", "a", "--admin-token-file", empty.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

/// A server on a free loopback port that reads each request's head, writes `answer` and
/// closes; with an empty `answer` it holds the connection open without a word.
fn http_server(answer: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                if answer.is_empty() {
                    // Reads the body and waits, until ctl gives up and closes.
                    let _ = stream.read_to_end(&mut head);
                } else {
                    let _ = stream.write_all(answer.as_bytes());
                }
            });
        }
    });
    addr
}

/// `ctl ARGS…` with the environment's admin variables removed: exit code, stdout, stderr.
fn ctl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .arg("ctl")
        .args(args)
        .env_remove("MQTT_CHAOS_ADMIN_URL")
        .env_remove("MQTT_CHAOS_ADMINS")
        .env_remove("MQTT_CHAOS_ADMIN_TOKEN")
        .env_remove("MQTT_CHAOS_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctl_changes_every_proxy_at_once_and_names_the_one_that_failed() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "fleet-token\n").unwrap();
    let token = ["--token-file", token_file.to_str().unwrap()];
    let (a, b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let guarded = |admin: &str| {
        ProxyProcess::start(
            &broker.addr(),
            &["--admin", admin, "--admin-token-file", token_file.to_str().unwrap()],
        )
    };
    let (_pa, _pb) = (guarded(&a), guarded(&b));
    let (_reserved, dead) = dead_address();
    let (url_a, url_b, url_dead) = (format!("http://{a}"), format!("http://{b}"), format!("http://{dead}"));

    // Three proxies that are no proxies: one down, one answering garbage, one silent.
    let url_garbage = format!("http://{}", http_server("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"));
    let url_silent = format!("http://{}", http_server(""));

    // A comma list and a repeated flag, five admins; the bad ones get a line each, the others
    // proceed, all at once (the silent one's --timeout is waited for once, not per proxy).
    let list = format!("{url_a},{url_dead},{url_garbage}");
    let mut args = vec!["--admin", &list, "--admin", &url_b, "--admin", &url_silent, "--timeout", "1s"];
    args.extend(token);
    let started = Instant::now();
    let (code, out, err) = ctl(&[&args[..], &["profile", "drop-pingresp"]].concat());
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(took < Duration::from_millis(2500), "concurrent, each within --timeout: took {took:?}");
    for url in [&url_a, &url_b] {
        assert!(
            out.lines().any(|l| l.starts_with(url.as_str()) && l.contains("profile: drop-pingresp")),
            "{url} applied it: {out}"
        );
    }
    for (url, why) in
        [(&url_dead, "unreachable"), (&url_garbage, "not JSON"), (&url_silent, "did not answer within 1s")]
    {
        assert!(!out.contains(url.as_str()), "{out}");
        let failure =
            err.lines().find(|l| l.starts_with(&format!("mqtt-chaos: {url}: "))).unwrap_or_default();
        assert!(failure.contains(why), "a clear line for {url}: {err}");
    }
    let failed = format!("3 of 5 proxies failed: {url_dead}, {url_garbage}, {url_silent}");
    assert!(err.lines().last().unwrap_or_default().ends_with(&failed), "{err}");
    for admin in [&url_a, &url_b] {
        let (code, out, _) = ctl(&[&["--admin", admin.as_str(), "--json", "rules"][..], &token].concat());
        assert_eq!(code, Some(0));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["profile"], "drop-pingresp", "{admin}");
    }

    // A file of admins, with comments; --json is an object keyed by proxy URL.
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("# the fleet\n{url_a}\n\n{b}   # without http://\n{url_dead}\n"))
        .unwrap();
    let admins = ["--admins", admins.to_str().unwrap()];
    let rule = r#"{"name":"mute","action":"drop","packets":["PINGREQ"]}"#;
    let (code, out, err) = ctl(&[&admins[..], &token, &["--json", "add", rule]].concat());
    assert_eq!(code, Some(1), "{err}");
    let answers: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answers.as_object().unwrap().len(), 3, "{out}");
    let at = |url: &str| out.find(&format!("\"{url}\":")).unwrap();
    assert!(at(&url_a) < at(&url_b) && at(&url_b) < at(&url_dead), "in the order given: {out}");
    assert_eq!(answers[&url_a][0]["name"], "mute");
    assert_eq!(answers[&url_b][0]["name"], "mute");
    assert!(answers[&url_dead]["error"].as_str().unwrap().contains("unreachable"), "{out}");

    // Without the token, every proxy refuses, each on its line.
    let (code, _, err) = ctl(&["--admin", &url_a, "--admin", &url_b, "remove", "mute"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().filter(|l| l.contains("(401)")).count(), 2, "{err}");
    let (code, out, err) = ctl(&["--admin", &url_a, "--admin", &url_b, "reset", token[0], token[1]]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().filter(|l| l.contains("all rules removed (2 global")).count(), 2, "{out}");

    // What names one proxy's connection, or follows one stream, stays with one proxy.
    for command in [&["kill", "1"][..], &["add", "--conn", "1", rule][..], &["watch"][..]] {
        let (code, _, err) = ctl(&[&["--admin", url_a.as_str(), "--admin", &url_b][..], command].concat());
        assert_eq!(code, Some(2), "{command:?}: {err}");
        assert!(err.contains("give one --admin (2 given)"), "{err}");
    }
    // clap would keep only the --admin after the subcommand: said, not half done.
    let (code, _, err) = ctl(&["--admin", &url_a, "reset", "--admin", &url_b]);
    assert_eq!(code, Some(2));
    assert!(err.contains("both before and after the subcommand"), "{err}");
    // A bad URL anywhere stops everything before anything is sent.
    let (code, _, err) = ctl(&["--admin", &url_a, "--admin", "https://x:1", "reset"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--admin must be http://HOST:PORT"), "{err}");
}

#[test]
fn ctl_connections_over_two_proxies_merges_the_rows_with_a_proxy_column() {
    let broker = Mosquitto::start();
    let (a, b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (pa, pb) = (
        ProxyProcess::start(&broker.addr(), &["--admin", &a]),
        ProxyProcess::start(&broker.addr(), &["--admin", &b]),
    );
    let mut devices = Vec::new();
    for (proxy, id) in [(&pa, "device-on-a"), (&pb, "device-on-b")] {
        let mut device = std::net::TcpStream::connect(&proxy.listen).unwrap();
        device.write_all(&connect_v4(id, 60, None)).unwrap();
        device.set_read_timeout(Some(WAIT)).unwrap();
        device.read_exact(&mut [0u8; 4]).unwrap();
        devices.push(device);
    }
    let (url_a, url_b) = (format!("http://{a}"), format!("http://{b}"));

    let (code, out, err) = ctl(&["--admin", &url_a, "--admin", &url_b, "connections"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "one header, a row per connection: {out}");
    assert!(lines[0].starts_with("PROXY") && lines[0].contains("CLIENT_ID"), "{out}");
    assert!(lines[1].starts_with(&url_a) && lines[1].contains("device-on-a"), "{out}");
    assert!(lines[2].starts_with(&url_b) && lines[2].contains("device-on-b"), "{out}");
    let column = lines[0].find("ID").unwrap();
    assert!(
        lines[1..].iter().all(|l| l[column..].starts_with(|c: char| c.is_ascii_digit())),
        "aligned: {out}"
    );

    // With one admin, the table of before: no proxy column.
    let (code, one, _) = ctl(&["--admin", &url_a, "connections"]);
    assert_eq!(code, Some(0));
    assert!(one.starts_with("ID ") && one.contains("device-on-a") && !one.contains("PROXY"), "{one}");
    assert_eq!(one.lines().nth(1).unwrap(), &lines[1][column..], "the same row, after the proxy column");

    let (code, out, _) = ctl(&["--admin", &format!("{url_a},{url_b}"), "--json", "connections"]);
    assert_eq!(code, Some(0));
    let merged: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(merged[&url_a][0]["client_id"], "device-on-a");
    assert_eq!(merged[&url_b][0]["client_id"], "device-on-b");

    let (code, out, _) = ctl(&["--admin", &url_a, "--admin", &url_b, "summary"]);
    assert_eq!(code, Some(0));
    for url in [&url_a, &url_b] {
        assert!(out.lines().any(|l| l.starts_with(url.as_str()) && l.contains("route default")), "{out}");
    }
    assert!(out.lines().all(|l| l.starts_with(&url_a) || l.starts_with(&url_b)), "{out}");
}
