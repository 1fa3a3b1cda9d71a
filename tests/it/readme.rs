//! Every shell block of the README runs as written, against throwaway brokers on free ports.
//!
//! What the test changes, and nothing else: loopback ports are mapped to free ones (the same
//! mapping for every block and for the README's `routes.toml`); `cargo run --release --` and
//! `./target/release/mqtt-chaos` name the binary these tests built, and `cargo build --release`
//! is skipped (that binary is built); `apt-get install -y P…` becomes a check that P is
//! installed; `.ci/run` is skipped (it is what runs this test). The upstream broker on 1883 is a
//! mosquitto the test starts; a block's background jobs (`&`) that it does not stop itself must
//! still be running when the block ends; a proxy started in the foreground is run until it
//! listens and stopped with SIGTERM (exit 0) before the next one starts, or at the end.
//! `mqtt-chaos probe` may exit 1 (the broker broke a MUST: a finding, which the README says) but
//! must print its report. Where a block starts a subscriber for one message (`mosquitto_sub …
//! -C 1`), each of its `mosquitto_pub -t TOPIC -m MESSAGE` must have reached it; the by-hand
//! block's proxy must print its summary when the block stops it.

use crate::harness::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const README: &str = include_str!("../../README.md");

/// The fenced blocks of one language, in order.
fn blocks(lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in README.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{lang}") => current = Some(String::new()),
            Some(block) if line.starts_with("```") => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// Replaces each mapped port where it stands as a whole number after `127.0.0.1:` or `-p `.
fn map_ports(text: &str, ports: &BTreeMap<u16, u16>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for prefix in ["127.0.0.1:", "-p "] {
            if let Some(after) = rest.strip_prefix(prefix) {
                let digits = after.bytes().take_while(u8::is_ascii_digit).count();
                if let Some(to) = after[..digits].parse::<u16>().ok().and_then(|p| ports.get(&p)) {
                    out.push_str(prefix);
                    out.push_str(&to.to_string());
                    rest = &after[digits..];
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn installed(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until something accepts on `port`.
fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of `flag` in a `mosquitto_pub` line, without its quotes.
fn published<'a>(line: &'a str, flag: &str) -> &'a str {
    let after = line.split_once(&format!(" {flag} ")).unwrap_or_else(|| panic!("{flag} in `{line}`")).1;
    match after.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap(),
        None => after.split_whitespace().next().unwrap(),
    }
}

#[test]
fn every_shell_block_of_the_readme_runs_as_written() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ports: BTreeMap<u16, u16> = [1884, 1885, 1886, 8080, 8884, 8885, 18830, 18840, 19184, 9184, 9090]
        .into_iter()
        .map(|p| (p, free_port()))
        .collect();
    ports.insert(1883, broker.port);
    let admin_port = ports[&9184];
    // The README's routes file, where its command expects it.
    let routes =
        blocks("toml").into_iter().find(|b| b.starts_with("# routes.toml")).expect("the routes file block");
    std::fs::write(dir.path().join("routes.toml"), map_ports(&routes, &ports)).unwrap();
    std::os::unix::fs::symlink(root.join("grafana"), dir.path().join("grafana")).unwrap();
    let bin = binary().display().to_string();
    let mut foreground: Option<KillOnDrop> = None;
    let stop = |server: Option<KillOnDrop>| {
        if let Some(mut server) = server {
            assert!(
                Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap().success()
            );
            let status = server.0.wait().unwrap();
            assert!(status.success(), "a README proxy did not stop cleanly: {status}");
        }
    };
    let sh_blocks = blocks("sh");
    assert!(sh_blocks.len() >= 5, "{sh_blocks:?}");
    for block in sh_blocks {
        if block.trim() == ".ci/run" {
            continue;
        }
        // Background jobs never outlive the block, even when it fails.
        let mut script = String::from("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n");
        let text = map_ports(&block, &ports)
            .replace("cargo run --release --", &bin)
            .replace("./target/release/mqtt-chaos", &bin);
        let mut lines = text.lines().peekable();
        let mut long_running = None;
        let mut probes = 0;
        while let Some(line) = lines.next() {
            let mut command = line.to_string();
            while command.trim_end().ends_with('\\') {
                command = format!("{}\n{}", command, lines.next().unwrap_or(""));
            }
            let words = command.split('#').next().unwrap_or("").trim().to_string();
            if words.starts_with("cargo build --release") {
                continue;
            }
            if let Some(packages) = words.strip_prefix("apt-get install -y ") {
                for p in packages.split_whitespace() {
                    assert!(installed(p), "the README installs {p}: `apt-get install -y {p}`");
                }
                continue;
            }
            if words.starts_with(&bin) && words.contains(" proxy ") && !words.ends_with('&') {
                long_running = Some(words);
                continue;
            }
            if words.starts_with(&format!("{bin} probe")) {
                probes += 1;
                command = format!("{words} || [ $? -eq 1 ]");
            }
            script.push_str(&command);
            script.push('\n');
        }
        if let Some(command) = long_running {
            stop(foreground.take());
            let child = Command::new("sh")
                .args(["-c", &format!("exec {command}")])
                .current_dir(dir.path())
                .env("MQTT_CHAOS_ADMIN", format!("127.0.0.1:{admin_port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            foreground = Some(KillOnDrop(child));
            wait_port(admin_port, &command);
        }
        // Background jobs must have survived the block; then they are stopped.
        script.push_str("sleep 1\nfor job in $(jobs -p); do kill -0 \"$job\" || { echo \"background job $job died\" >&2; exit 1; }; done\nkill $(jobs -p) 2>/dev/null || true\nwait || true\n");
        let out = Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .env("MQTT_CHAOS_ADMIN", format!("127.0.0.1:{admin_port}"))
            .env("MQTT_CHAOS_ADMIN_URL", format!("http://127.0.0.1:{admin_port}"))
            .env("PATH", format!("{}:/usr/sbin:/usr/local/sbin", std::env::var("PATH").unwrap_or_default()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README block failed:\n{block}\nas run:\n{script}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reports = String::from_utf8_lossy(&out.stdout).matches("\nSCENARIO ").count();
        assert_eq!(
            reports,
            probes,
            "each probe printed its report:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if block.lines().any(|l| l.starts_with("mosquitto_sub") && l.contains(" -C 1 ")) {
            for publish in block.lines().filter(|l| l.starts_with("mosquitto_pub")) {
                let (topic, message) = (published(publish, "-t"), published(publish, "-m"));
                assert!(
                    stdout.lines().any(|l| l == format!("{topic} {message}")),
                    "`{publish}` did not reach the block's subscriber:\n{stdout}"
                );
            }
        }
        if block.contains("ctl watch") {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("summary:\nroute default"),
                "the stopped proxy printed its summary:\n{stderr}"
            );
            assert!(stdout.contains("sleepy"), "ctl watch showed the client:\n{stdout}");
        }
        if block.contains("curl") {
            let answers = String::from_utf8_lossy(&out.stdout);
            assert!(answers.contains("\"name\":\"mute\""), "the rule was added: {answers}");
            assert!(answers.contains("\"profile\":\"partition\""), "the profile was activated: {answers}");
        }
    }
    stop(foreground.take());
}
