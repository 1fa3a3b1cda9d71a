//! The binary as users run it: flags, env variables, errors and exit codes, logs, signals.

use crate::harness::*;
use std::io::Write;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    Command::new(binary()).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let out = run(&["proxy", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--listen", "MQTT_CHAOS_LISTEN"),
        ("--upstream", "MQTT_CHAOS_UPSTREAM"),
        ("--name", "MQTT_CHAOS_NAME"),
        ("--config", "MQTT_CHAOS_CONFIG"),
        ("--connect-timeout", "MQTT_CHAOS_CONNECT_TIMEOUT"),
        ("--shutdown-grace", "MQTT_CHAOS_SHUTDOWN_GRACE"),
        ("--on-malformed", "MQTT_CHAOS_ON_MALFORMED"),
        ("--max-buffered-packet", "MQTT_CHAOS_MAX_BUFFERED_PACKET"),
        ("--max-connect-packet", "MQTT_CHAOS_MAX_CONNECT_PACKET"),
        ("--ws-max-frame", "MQTT_CHAOS_WS_MAX_FRAME"),
        ("--max-connections", "MQTT_CHAOS_MAX_CONNECTIONS"),
        ("--half-close-timeout", "MQTT_CHAOS_HALF_CLOSE_TIMEOUT"),
        ("--log-format", "MQTT_CHAOS_LOG_FORMAT"),
    ] {
        assert!(help.contains(flag) && help.contains(env), "{flag} / {env} missing from:\n{help}");
    }
}

#[test]
fn flags_and_a_routes_file_may_not_both_define_routes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"h:1\"\n").unwrap();
    let out =
        run(&["proxy", "--config", file.to_str().unwrap(), "--listen", "127.0.0.1:1", "--upstream", "h:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));

    // The same conflict through an environment variable is not silent either.
    let out = Command::new(binary())
        .args(["proxy", "--config", file.to_str().unwrap()])
        .env("MQTT_CHAOS_LISTEN", "127.0.0.1:1")
        .env("MQTT_CHAOS_UPSTREAM", "h:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // Upstream TLS flags are per route in a routes file.
    let out = run(&["proxy", "--config", file.to_str().unwrap(), "--upstream-insecure"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("'--upstream-insecure' cannot be used with '--config': give it per route in the routes file (upstream_insecure)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn configuration_errors_exit_2_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"no-port\"\n")
        .unwrap();
    let out = run(&["proxy", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let expected = format!("{}:4:12: invalid upstream address \"no-port\"", file.display());
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));

    let out = run(&["proxy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("give --listen ADDR --upstream HOST:PORT, or --config FILE"));

    let out = run(&["proxy", "--listen", "127.0.0.1:0", "--upstream", "localhost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid --upstream address \"localhost\""), "{}", stderr(&out));

    let out = run(&["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", "--connect-timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2));

    // The closed-connection ring, the event loops, the observer's version: one past the largest
    // (or below the least), a wrong name.
    for (flag, value, says) in [
        ("--closed-history", "1000001", "1000000"),
        ("--threads", "257", "1..=256"),
        ("--threads", "0", "1..=256"),
        ("--observer-protocol", "4", "3.1.1"),
    ] {
        let out = run(&["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(stderr(&out).contains(flag) && stderr(&out).contains(says), "{}", stderr(&out));
    }
}

/// Listeners of several event loops share their address (`SO_REUSEPORT`), which would let a
/// second proxy of the same user join them silently and take half the clients: it must fail as
/// if the address were simply taken, also when it uses several event loops itself, and also
/// when only the running one does.
#[test]
fn a_second_proxy_on_the_address_of_one_with_several_event_loops_exits_1() {
    let listen = format!("127.0.0.1:{}", free_port());
    let first =
        spawn_binary(&["proxy", "--threads", "2", "--listen", &listen, "--upstream", "127.0.0.1:1"], &listen);
    for threads in ["2", "1"] {
        let mut second = Command::new(binary())
            .args(["proxy", "--threads", threads, "--admin", "none", "--listen", &listen])
            .args(["--upstream", "127.0.0.1:1"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while second.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(5) {
                let _ = second.kill();
                panic!("--threads {threads}: the second proxy joined the address and is running");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = second.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "--threads {threads}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("cannot listen on {listen}")), "{}", stderr(&out));
    }
    sigterm(&first);
    assert!(first.wait_with_output().unwrap().status.success());
}

#[test]
fn a_listen_address_in_use_exits_1_naming_the_route() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["proxy", "--name", "plant-a", "--listen", &addr, "--upstream", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("route \"plant-a\": cannot listen on {addr}")),
        "{}",
        stderr(&out)
    );
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM failed");
}

#[test]
fn an_unreachable_upstream_is_reported_at_start_and_its_failures_are_logged_as_json_without_flooding() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (_reserved, dead) = dead_address();
    let child =
        spawn_binary(&["proxy", "--log-format", "json", "--listen", &listen, "--upstream", &dead], &listen);
    // The readiness probe was conn 1; five clients retry against the dead broker.
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(std::io::Read::read(&mut s, &mut buf).unwrap(), 0, "client closed with EOF");
    }
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = stderr(&out);
    let line = log
        .lines()
        .find(|l| l.contains("upstream not reachable at start"))
        .unwrap_or_else(|| panic!("no start-up reachability line in:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("log lines are JSON");
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["upstream"], dead);
    assert!(v["error"].as_str().unwrap().contains("refused"), "{line}");
    // Within the 10 s interval every per-client failure is held back: no line per retry.
    let repeats = log.lines().filter(|l| l.contains("cannot reach the upstream broker")).count();
    assert_eq!(repeats, 0, "{log}");
    let closed = log.lines().find(|l| l.contains("connection closed") && l.contains("\"conn\":2")).unwrap();
    let v: serde_json::Value = serde_json::from_str(closed).unwrap();
    assert_eq!((v["closed_by"].as_str(), v["how"].as_str()), (Some("proxy"), Some("error")));
    assert!(v["reason"].as_str().unwrap().starts_with("upstream connect failed"), "{closed}");
    // Numbers are JSON numbers with at most 3 decimals.
    let duration = v["duration_s"].as_f64().expect("duration_s is a number");
    assert!(((duration * 1000.0).round() - duration * 1000.0).abs() < 1e-6, "{closed}");
}

#[test]
fn sigterm_lets_connections_finish_within_the_grace_period_then_closes_them() {
    let broker = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = spawn_binary(
        &["proxy", "--listen", &listen, "--upstream", &broker.addr(), "--shutdown-grace", "1500ms"],
        &listen,
    );
    let mut device = std::net::TcpStream::connect(&listen).unwrap();
    device.write_all(&connect_v4("lingering", 60, None)).unwrap();
    device.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut connack = [0u8; 4];
    std::io::Read::read_exact(&mut device, &mut connack).unwrap();

    let signalled = Instant::now();
    sigterm(&child);
    // New connections are refused once the signal is handled.
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::net::TcpStream::connect(&listen).is_err(), "still accepting after SIGTERM");
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "exited after {took:?}");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut device, &mut rest);
    let log = stderr(&out);
    assert!(log.contains("shutdown grace period over"), "{log}");
    assert!(log.contains("proxy shutting down"), "{log}");
}

#[test]
fn sigterm_with_no_connections_exits_at_once() {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = spawn_binary(&["proxy", "--listen", &listen, "--upstream", "127.0.0.1:1"], &listen);
    std::thread::sleep(Duration::from_millis(200)); // let the readiness probe's session end
    let signalled = Instant::now();
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(signalled.elapsed() < Duration::from_secs(2), "took {:?}", signalled.elapsed());
}

#[test]
fn every_shipped_profile_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "{files:?}");
    let mut args = vec!["check".to_string()];
    args.extend(files.iter().cloned());
    let out = Command::new(binary()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "passthrough",
        "drop-pingreq",
        "drop-pingresp",
        "half-open-client",
        "half-open-broker",
        "partition",
        "keepalive-disable",
        "keepalive-shrink",
        "server-keepalive-override",
        "flaky-pingresp",
        "slow-pingresp",
        "reset-storm",
    ] {
        assert!(stdout.contains(&format!("({name}:")), "{name} not checked:\n{stdout}");
    }
}

#[test]
fn check_reports_every_bad_profile_with_file_line_and_column_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\n\n[[rules]]\nname = \"x\"\naction = \"drop\"\nprobability = 1.5\n")
        .unwrap();
    let worse = dir.path().join("worse.toml");
    std::fs::write(
        &worse,
        "name = \"worse\"\n[[rules]]\nname = \"x\"\naction = \"drop\"\npackets = [\"PONG\"]\n",
    )
    .unwrap();
    let out = run(&["check", bad.to_str().unwrap(), worse.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:6:15: probability must be between 0.0 and 1.0, got 1.5", bad.display())),
        "{err}"
    );
    assert!(err.contains(&format!("{}:5:12: unknown packet type \"PONG\"", worse.display())), "{err}");
}

#[test]
fn a_profile_that_fails_to_load_stops_the_start_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n[[rules]]\nname = \"k\"\naction = \"rewrite_keepalive\"\nset = 1\nscale = 2.0\n",
    )
    .unwrap();
    let out =
        run(&["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", "--profile", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("bad.toml:6:9: give either `set` or `scale`, not both"),
        "{}",
        stderr(&out)
    );

    let out = run(&["proxy", "--listen", "127.0.0.1:0", "--upstream", "h:1", "--profile", "no-such-profile"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no-such-profile: no profile of that name in profiles nor built in"), "{err}");
    assert!(
        err.contains("available: drop-pingreq, drop-pingresp,") && err.contains("mqtt-chaos profiles"),
        "{err}"
    );
}

#[test]
fn the_binary_carries_its_profiles_and_a_file_of_the_same_name_overrides_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("partition.toml"),
        "name = \"partition\"\ndescription = \"my own partition\"\n",
    )
    .unwrap();
    let out = run(&["profiles", "--json", "--profiles-dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 12, "{list:?}");
    let partition = list.iter().find(|p| p["name"] == "partition").unwrap();
    assert_eq!(
        (partition["source"].as_str(), partition["description"].as_str()),
        (Some("file"), Some("my own partition"))
    );
    let drop = list.iter().find(|p| p["name"] == "drop-pingreq").unwrap();
    assert_eq!((drop["source"].as_str(), drop["rules"].as_u64()), (Some("built-in"), Some(1)));
    let table = String::from_utf8(run(&["profiles", "--profiles-dir", "/nonexistent"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("reset-storm") && table.contains("built-in"),
        "{table}"
    );
    // `check` and `--profile` find a built-in profile by name from any directory.
    let out = run(&["check", "drop-pingresp", "--profiles-dir", "/nonexistent"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: built-in (drop-pingresp: 1 rule)"));
}

#[test]
fn a_profile_named_on_the_command_line_is_active_from_the_start_even_outside_the_source_tree() {
    let broker = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let dir = std::path::Path::new("/nonexistent/profiles"); // the built-in profile is found
    let child = spawn_binary(
        &[
            "proxy",
            "--listen",
            &listen,
            "--upstream",
            &broker.addr(),
            "--profiles-dir",
            dir.to_str().unwrap(),
            "--profile",
            "keepalive-disable",
            "--shutdown-grace",
            "200ms",
        ],
        &listen,
    );
    let mut device = std::net::TcpStream::connect(&listen).unwrap();
    device.write_all(&connect_v4("from-cli", 30, None)).unwrap();
    device.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut connack = [0u8; 4];
    std::io::Read::read_exact(&mut device, &mut connack).unwrap();
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(log.contains("profile active") && log.contains("keepalive-disable"), "{log}");
    assert!(broker.log().lines().any(|l| l.contains("as from-cli") && l.contains("k0")), "{}", broker.log());
}

/// What racy test suites rely on (Paho's `test_request_response`, `test_subscribe_options`): a
/// SUBSCRIBE one client sends just before another client's PUBLISH is in force at the broker when
/// the PUBLISH arrives. The binary serves sockets in the order they became ready (main.rs).
#[tokio::test]
async fn a_subscribe_sent_just_before_another_clients_publish_is_in_force_when_the_publish_arrives() {
    use tokio::io::AsyncWriteExt;
    const WAIT: Duration = Duration::from_secs(5);
    let broker = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = spawn_binary(&["proxy", "--listen", &listen, "--upstream", &broker.addr()], &listen);
    let connected = |id: &'static str| {
        let listen = listen.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&listen).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&connect_v4(id, 60, None)).await.unwrap();
            expect_packet(&mut s, WAIT, "CONNACK").await;
            s
        }
    };
    let mut publisher = connected("order-publisher").await;
    let mut subscriber = connected("order-subscriber").await;
    for trial in 1..=50u16 {
        let topic = format!("order/{trial}");
        subscriber.write_all(&subscribe_v4(trial, &topic, 0)).await.unwrap();
        publisher.write_all(&publish_v4(&topic, b"x")).await.unwrap();
        expect_packet(&mut subscriber, WAIT, "SUBACK").await;
        let got = tokio::time::timeout(Duration::from_secs(1), read_packet(&mut subscriber)).await;
        assert!(
            matches!(&got, Ok(Ok(p)) if p[0] == 0x30),
            "trial {trial}: the PUBLISH overtook the SUBSCRIBE sent before it ({got:?})"
        );
    }
    drop((publisher, subscriber));
    sigterm(&child);
    assert!(child.wait_with_output().unwrap().status.success());
}

/// Voluntary context switches of the proxy's thread called `name` (it sleeps in epoll between
/// events: each wake-up is one).
fn thread_wakeups(pid: u32, name: &str) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim() != name {
            return None;
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")?.trim().parse().ok())
    })
}

#[tokio::test]
async fn with_two_threads_connections_are_served_by_both_event_loops() {
    use tokio::io::AsyncWriteExt;
    const WAIT: Duration = Duration::from_secs(5);
    let broker = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = spawn_binary(
        &["proxy", "--threads", "2", "--listen", &listen, "--upstream", &broker.addr()],
        &listen,
    );
    let before = thread_wakeups(child.id(), "mqtt-chaos-l2").expect("a second event loop thread");
    // 40 clients (40 source ports: the kernel spreads them over both loops' listeners), each
    // subscribing to its own topic and getting back what it publishes, 20 times.
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut s = tokio::net::TcpStream::connect(&listen).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&connect_v4(&format!("spread-{i}"), 60, None)).await.unwrap();
        expect_packet(&mut s, WAIT, "CONNACK").await;
        s.write_all(&subscribe_v4(1, &format!("spread/{i}"), 0)).await.unwrap();
        expect_packet(&mut s, WAIT, "SUBACK").await;
        clients.push(s);
    }
    for round in 0..20 {
        for (i, s) in clients.iter_mut().enumerate() {
            let publish = publish_v4(&format!("spread/{i}"), format!("{round}").as_bytes());
            s.write_all(&publish).await.unwrap();
            assert_eq!(expect_packet(s, WAIT, "PUBLISH").await, publish, "client {i}, round {round}");
        }
    }
    let after = thread_wakeups(child.id(), "mqtt-chaos-l2").unwrap();
    assert!(
        after >= before + 100,
        "the second event loop woke {} times for 40 × 20 round trips",
        after - before
    );
    drop(clients);
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("event_loops=2"), "{}", stderr(&out));
}

#[test]
fn help_names_every_transport_of_listen_and_upstream() {
    let out = run(&["proxy", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen <LISTEN>", "--upstream <UPSTREAM>"] {
        let from = help.find(flag).unwrap_or_else(|| panic!("{flag} missing from:\n{help}"));
        // The flag's own text: up to the next flag.
        let text = &help[from + flag.len()..];
        let text = &text[..text.find("\n  -").unwrap_or(text.len())];
        for scheme in ["mqtt://", "mqtts://", "ws://", "wss://"] {
            assert!(text.contains(scheme), "{flag} does not mention {scheme}:\n{text}");
        }
    }
}
