//! `ctl` as the client of a server it does not control (scripted hostile HTTP servers: endless
//! bodies, heads and event lines, silence, cut-short JSON), client input in its output (a real
//! proxy and a hostile client id), the end of `ctl watch`, and a closed stdout.

use crate::harness::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The address-space cap under which ctl runs against endless answers: reading one without a
/// bound hits it within seconds and aborts; the bounded client stays far below (the debug
/// binary maps ~160 MiB, a body is at most 64 MiB).
const MEMORY_CAP_KIB: u64 = 1024 * 1024;

/// A scripted HTTP server on loopback: each connection's request head is read, then `answer`
/// writes whatever it likes (until the client goes away).
fn hostile_server(answer: fn(&mut TcpStream)) -> String {
    loopback_server(move |mut stream| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        answer(&mut stream);
    })
}

/// A server on a free loopback port that runs `serve` on a thread of its own per connection.
fn loopback_server(serve: impl Fn(TcpStream) + Clone + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// Writes `block` until the client goes away.
fn endless(stream: &mut TcpStream, start: &[u8], block: &[u8]) {
    if stream.write_all(start).is_err() {
        return;
    }
    while stream.write_all(block).is_ok() {}
}

/// The outcome of one ctl run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `mqtt-chaos ctl --admin http://ADMIN ARGS…` under [`MEMORY_CAP_KIB`] of address space;
/// killed (and the test failed) if it runs longer than `limit`.
fn ctl_capped(admin: &str, args: &[&str], limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {MEMORY_CAP_KIB} && exec \"$0\" \"$@\""))
            .arg(binary())
            .args(["ctl", "--admin", &format!("http://{admin}")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (mut out, mut err) = (child.0.stdout.take().unwrap(), child.0.stderr.take().unwrap());
    let stdout = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < limit, "ctl {args:?} still ran after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
        took,
    }
}

/// Asserts a clean failure (exit 1, not an abort or a signal) whose message says `says`.
fn assert_fails_saying(run: &Run, says: &[&str]) {
    assert_eq!(run.code, Some(1), "stdout {:?}\nstderr {:?}", run.stdout, run.stderr);
    for s in says {
        assert!(run.stderr.contains(s), "{s:?} not in {:?}", run.stderr);
    }
    assert!(run.stdout.is_empty(), "{:?}", run.stdout);
}

#[test]
fn an_endless_body_ends_ctl_with_an_error_at_its_64_mib_limit() {
    let admin = hostile_server(|s| {
        endless(s, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[", &[b' '; 65536])
    });
    let run = ctl_capped(&admin, &["rules"], Duration::from_secs(60));
    assert_fails_saying(
        &run,
        &[&format!("http://{admin}/rules"), "over ctl's 64 MiB limit (see --max-answer)"],
    );
    let run = ctl_capped(&admin, &["rules", "--max-answer", "1MiB"], Duration::from_secs(60));
    assert_fails_saying(&run, &["over ctl's 1 MiB limit"]);
    // Announced up front: refused before anything is read.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n[");
        std::thread::sleep(Duration::from_secs(5));
    });
    let run = ctl_capped(&admin, &["--json", "connections"], Duration::from_secs(4));
    assert_fails_saying(&run, &["over ctl's 64 MiB limit"]);
}

#[test]
fn an_endless_header_line_ends_ctl_with_an_error_at_its_64_kib_limit() {
    let admin = hostile_server(|s| endless(s, b"HTTP/1.1 200 OK\r\nx-endless: ", &[b'a'; 65536]));
    let run = ctl_capped(&admin, &["connections"], Duration::from_secs(30));
    assert_fails_saying(
        &run,
        &[&format!("http://{admin}/connections"), "head of the answer is over ctl's 64 KiB"],
    );
    let run = ctl_capped(&admin, &["watch"], Duration::from_secs(30));
    assert_fails_saying(
        &run,
        &[&format!("http://{admin}/events"), "head of the answer is over ctl's 64 KiB"],
    );
}

#[test]
fn a_server_that_never_answers_times_ctl_out_including_watch() {
    let admin = hostile_server(|_| std::thread::sleep(Duration::from_secs(30)));
    for args in [&["rules", "--timeout", "500ms"][..], &["watch", "--timeout", "500ms"]] {
        let run = ctl_capped(&admin, args, Duration::from_secs(10));
        assert_fails_saying(
            &run,
            &[&format!("the admin API at http://{admin}/"), "did not answer within 500ms"],
        );
        assert!(run.took < Duration::from_secs(5), "{:?}", run.took);
    }
    // The head, then nothing: a pause within the body is bounded by the same time.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n[");
        std::thread::sleep(Duration::from_secs(30));
    });
    let run = ctl_capped(&admin, &["summary", "--timeout", "500ms"], Duration::from_secs(10));
    assert_fails_saying(&run, &[&format!("http://{admin}/summary"), "stopped sending its answer"]);
    // The default is stated in --help.
    let help = Command::new(binary()).args(["ctl", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("[default: 10s]"), "{help:?}");
}

#[test]
fn an_answer_cut_short_or_not_json_is_an_error_naming_the_url() {
    // Complete by its length, but truncated JSON.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n[{\"id\":1,");
    });
    for args in [&["connections"][..], &["--json", "connections"], &["connections", "--closed"]] {
        let run = ctl_capped(&admin, args, Duration::from_secs(10));
        assert_fails_saying(&run, &[&format!("the admin API at http://{admin}/connections"), "not JSON"]);
    }
    // Shorter than its length.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"rules\":[");
    });
    let run = ctl_capped(&admin, &["rules"], Duration::from_secs(10));
    assert_fails_saying(&run, &[&format!("http://{admin}/rules"), "cut short"]);
    // JSON, but not what the table shows.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
    });
    let run = ctl_capped(&admin, &["connections"], Duration::from_secs(10));
    assert_fails_saying(&run, &[&format!("http://{admin}/connections"), "not a list of connections"]);
    // Not HTTP at all.
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n");
    });
    let run = ctl_capped(&admin, &["rules"], Duration::from_secs(10));
    assert_fails_saying(&run, &[&format!("http://{admin}/rules"), "sent no valid answer"]);
}

#[test]
fn an_endless_event_line_or_event_ends_watch_with_an_error_at_its_1_mib_limit() {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
    let admin = hostile_server(|s| endless(s, &[HEAD, b"event: connect\ndata: "].concat(), &[b'x'; 65536]));
    let run = ctl_capped(&admin, &["watch"], Duration::from_secs(30));
    assert_fails_saying(&run, &[&format!("http://{admin}/events"), "an event line over ctl's 1 MiB limit"]);
    // Short lines, but an event that never ends.
    let admin = hostile_server(|s| endless(s, HEAD, b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"));
    let run = ctl_capped(&admin, &["watch", "--json"], Duration::from_secs(30));
    assert_fails_saying(&run, &[&format!("http://{admin}/events"), "an event over ctl's 1 MiB limit"]);
    // An event whose data is not JSON.
    let admin = hostile_server(|s| {
        let _ = s.write_all(&[HEAD, b"event: connect\ndata: {\"conn\":\n\n"].concat());
        std::thread::sleep(Duration::from_secs(5));
    });
    let run = ctl_capped(&admin, &["watch"], Duration::from_secs(4));
    assert_fails_saying(&run, &[&format!("http://{admin}/events"), "connect event whose data is not JSON"]);
}

#[test]
fn watch_takes_a_silent_stream_as_gone() {
    let admin = hostile_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n:\n\n");
        std::thread::sleep(Duration::from_secs(30));
    });
    let run = ctl_capped(&admin, &["watch", "--max-silence", "1s"], Duration::from_secs(10));
    assert_fails_saying(&run, &[&format!("http://{admin}/events"), "sent nothing for 1s", "taken as gone"]);
    assert!(run.took >= Duration::from_secs(1) && run.took < Duration::from_secs(5), "{:?}", run.took);
}

/// A broker that accepts every CONNECT and then holds the connection open.
fn accepting_broker() -> String {
    loopback_server(|mut stream| {
        let mut buf = [0u8; 4096];
        if stream.read(&mut buf).is_ok_and(|n| n > 0) {
            let _ = stream.write_all(&[0x20, 2, 0, 0]);
            while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    })
}

/// `ctl watch` (with `extra`) once it has subscribed; its stdout as lines.
fn start_watch(
    admin: &str,
    extra: &[&str],
) -> (KillOnDrop, std::sync::mpsc::Receiver<String>, BufReader<std::process::ChildStderr>) {
    let mut child = KillOnDrop(
        Command::new(binary())
            .args(["ctl", "--admin", &format!("http://{admin}"), "watch"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("watching the events"), "{line:?}");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx, stderr)
}

/// The next line of a watcher containing `needle`, within 5 s.
fn watched(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no watched line with {needle:?}: {e}"),
        }
    }
}

/// Waits (at most `limit`) for a child to exit; its code and the rest of its stderr.
fn exit_of(
    child: &mut KillOnDrop,
    stderr: &mut BufReader<std::process::ChildStderr>,
    limit: Duration,
) -> (Option<i32>, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    (status.code(), rest)
}

#[test]
fn a_hostile_client_id_reaches_tables_and_event_lines_escaped_and_json_exact() {
    const HOSTILE: &str = "dev\n\u{1b}[31mred";
    const SHOWN: &str = r"dev\n\u{1b}[31mred";
    let upstream = accepting_broker();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut proxy = ProxyProcess::start(&upstream, &["--admin", &admin, "--shutdown-grace", "200ms"]);
    let (mut lines, lines_rx, mut lines_err) = start_watch(&admin, &[]);
    let (_json, json_rx, _) = start_watch(&admin, &["--json"]);

    let mut device = std::net::TcpStream::connect(&proxy.listen).unwrap();
    device.write_all(&connect_v4(HOSTILE, 30, None)).unwrap();
    device.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    device.read_exact(&mut [0u8; 4]).unwrap();

    let line = watched(&lines_rx, "CONNECT");
    assert!(line.contains(&format!("({SHOWN}) CONNECT")) && !line.contains('\u{1b}'), "{line:?}");
    let event: Value = serde_json::from_str(&watched(&json_rx, "\"connect\"")).unwrap();
    assert_eq!(event["data"]["client_id"], HOSTILE);

    let (code, out, _) = ctl(&admin, &["connections"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 2, "a header and one row: {out:?}");
    assert!(out.contains(SHOWN) && !out.contains('\u{1b}'), "{out:?}");
    let (_, out, _) = ctl(&admin, &["--json", "connections"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()[0]["client_id"], HOSTILE);

    drop(device);
    let line = watched(&lines_rx, "closed by");
    assert!(line.contains(SHOWN) && !line.contains('\u{1b}'), "{line:?}");
    // In the closed history once both sides are gone.
    let line = watched(&lines_rx, "fully closed");
    assert!(line.contains(SHOWN) && !line.contains('\u{1b}'), "{line:?}");
    let (code, out, _) = ctl(&admin, &["connections", "--closed"]);
    assert_eq!(code, Some(0));
    // Every row is a record (the readiness check's connection is one too): none forged.
    assert!(out.lines().skip(1).all(|row| row.starts_with(|c: char| c.is_ascii_digit())), "{out:?}");
    assert_eq!(out.lines().filter(|row| row.contains(SHOWN)).count(), 1, "{out:?}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    let (_, out, _) = ctl(&admin, &["--json", "connections", "--closed"]);
    let closed: Value = serde_json::from_str(&out).unwrap();
    assert!(closed.as_array().unwrap().iter().any(|c| c["client_id"] == HOSTILE), "{out}");

    // The proxy stops: watch says so and fails.
    let pid = proxy.pid().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (code, message) = exit_of(&mut lines, &mut lines_err, Duration::from_secs(15));
    assert_eq!(code, Some(1), "{message}");
    assert!(message.contains(&format!("the event stream of http://{admin}/events")), "{message}");
    assert!(message.contains("ended") || message.contains("broke off"), "{message}");
    let _ = proxy.child.0.wait();
}

#[test]
fn watch_fails_with_a_message_when_the_proxy_dies() {
    let upstream = accepting_broker();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut proxy = ProxyProcess::start(&upstream, &["--admin", &admin]);
    let (mut watch, _rx, mut stderr) = start_watch(&admin, &[]);
    proxy.child.0.kill().unwrap();
    let (code, message) = exit_of(&mut watch, &mut stderr, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{message}");
    assert!(message.contains(&format!("http://{admin}/events")), "{message}");
}

#[test]
fn ctl_profile_says_which_rules_it_replaced() {
    let upstream = accepting_broker();
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let _proxy =
        ProxyProcess::start(&upstream, &["--admin", &admin, "--profiles-dir", dir.to_str().unwrap()]);
    let (code, out, _) = ctl(&admin, &["profile", "drop-pingresp"]);
    assert_eq!(code, Some(0));
    assert!(!out.contains("removed"), "nothing was in force: {out}");
    assert_eq!(ctl(&admin, &["add", r#"{"name":"mine","action":"drop","packets":["PUBLISH"]}"#]).0, Some(0));
    let (code, out, _) = ctl(&admin, &["profile", "drop-pingresp"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("removed the 2 global rules in force before (profile drop-pingresp and any added since): swallow-pingresp, mine;"),
        "{out}"
    );
    let (_, out, _) = ctl(&admin, &["--json", "profile", "drop-pingresp"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replaced"]["rules"], serde_json::json!(["swallow-pingresp"]));
}

/// Runs ctl with its stdout a pipe whose reader is gone before it writes; its exit code and stderr.
fn with_closed_stdout(admin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = binary_with_closed_stdout(&[&["ctl", "--admin", &format!("http://{admin}")], args].concat());
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the binary with `args` and its stdout a pipe whose reader is gone before it writes.
fn binary_with_closed_stdout(args: &[&str]) -> std::process::Output {
    let mut child =
        Command::new(binary()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    wait_with_limit(child, Duration::from_secs(10))
}

fn wait_with_limit(child: Child, limit: Duration) -> std::process::Output {
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &id.to_string()]).status();
            panic!("ctl still ran after {limit:?}");
        }
    }
}

#[test]
fn every_ctl_command_that_prints_ends_quietly_on_a_closed_pipe() {
    let upstream = accepting_broker();
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let proxy = ProxyProcess::start(&upstream, &["--admin", &admin, "--profiles-dir", dir.to_str().unwrap()]);
    let mut device = std::net::TcpStream::connect(&proxy.listen).unwrap();
    device.write_all(&connect_v4("piped", 30, None)).unwrap();
    device.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    device.read_exact(&mut [0u8; 4]).unwrap();
    let (_, out, _) = ctl(&admin, &["--json", "connections"]);
    let id = serde_json::from_str::<Value>(&out).unwrap()[0]["id"].as_u64().unwrap().to_string();
    let rule = r#"{"name":"mine","action":"drop","packets":["PUBLISH"]}"#;
    let commands: Vec<Vec<&str>> = vec![
        vec!["connections"],
        vec!["connections", "--closed"],
        vec!["rules"],
        vec!["profiles"],
        vec!["summary"],
        vec!["add", rule],
        vec!["remove", "mine"],
        vec!["add", "--conn", &id, rule],
        vec!["remove", "--conn", &id, "mine"],
        vec!["profile", "drop-pingresp"],
        vec!["reset"],
        vec!["kill", &id],
    ];
    for command in &commands {
        for json in [false, true] {
            let mut args = command.clone();
            if json {
                args.insert(0, "--json");
                // Commands that change something run once, as a table and as JSON in turn.
                if matches!(command[0], "add" | "remove" | "kill") {
                    continue;
                }
            }
            let (code, stderr) = with_closed_stdout(&admin, &args);
            assert_eq!((code, stderr.as_str()), (Some(0), ""), "ctl {args:?}");
        }
    }
    // Each change took effect although nothing could be printed.
    let (_, out, _) = ctl(&admin, &["--json", "connections"]);
    assert_eq!(out.trim(), "[]", "killed");
    assert_eq!(with_closed_stdout(&admin, &["--json", "add", rule]), (Some(0), String::new()));
    let (_, out, _) = ctl(&admin, &["--json", "rules"]);
    assert!(out.contains("\"mine\""), "{out}");
    // The standalone listing of profiles too.
    let out = binary_with_closed_stdout(&["profiles", "--profiles-dir", dir.to_str().unwrap()]);
    assert_eq!((out.status.code(), out.stderr.as_slice()), (Some(0), b"".as_slice()));

    // watch ends at its first event once its reader is gone.
    for json in [false, true] {
        let mut child = KillOnDrop(
            Command::new(binary())
                .args(["ctl", "--admin", &format!("http://{admin}"), "watch"])
                .args(if json { &["--json"][..] } else { &[] })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        drop(child.0.stdout.take());
        let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("watching the events"), "{line:?}");
        assert_eq!(ctl(&admin, &["reset"]).0, Some(0), "an event for the watcher");
        let (code, rest) = exit_of(&mut child, &mut stderr, Duration::from_secs(10));
        assert_eq!((code, rest.as_str()), (Some(0), ""), "watch (json: {json})");
    }
}
