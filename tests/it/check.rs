//! `mqtt-chaos check` and the loading of profiles and routes files by the binary: every error
//! of a file in line order, advice for a profile named like a file, and a closed stdout.

use crate::harness::*;
use std::process::{Command, Output, Stdio};

fn run_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary()).args(args).current_dir(dir).env_remove("RUST_LOG").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Three invalid rules, at lines 5, 12 and 20. The last one is wrong in a way serde sees (an
/// unknown field) and would be the only one reported by a loader that deserializes the whole
/// file first; the others are wrong in ways only validation sees.
const THREE_BAD_RULES: &str = r#"name = "three"

[[rules]]
name = "a"
probability = 1.5
action = "drop"

[[rules]]
name = "b"
action = "delay"
latency = "1s"
packets = ["PINGREQ", "PING"]

[[rules]]
name = "c"
action = "delay"
latency = "2s"

[[rules]]
latnecy = "2s"
name = "d"
action = "delay"
"#;

#[test]
fn check_reports_every_invalid_rule_of_a_profile_in_line_order_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("three.toml"), THREE_BAD_RULES).unwrap();
    let out = run_in(dir.path(), &["check", "three.toml", "passthrough"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert_eq!(lines[0], "three.toml:5:15: probability must be between 0.0 and 1.0, got 1.5");
    assert!(lines[1].starts_with("three.toml:12:23: unknown packet type \"PING\"; known: CONNECT,"), "{err}");
    assert!(lines[2].starts_with("three.toml:20:1: unknown field `latnecy`, expected one of"), "{err}");
    assert!(lines[2].ends_with("; did you mean `latency`?"), "{err}");
    // The other files are still checked.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok: built-in (passthrough: 0 rules)\n");

    // The proxy refuses to start with the same list, each line prefixed.
    let out = run_in(
        dir.path(),
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--profile", "three.toml"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let starts: Vec<&str> = err.lines().map(|l| l.split(": ").take(2).collect::<Vec<_>>()[1]).collect();
    assert_eq!(starts, ["three.toml:5:15", "three.toml:12:23", "three.toml:20:1"], "{err}");
    assert!(err.lines().all(|l| l.starts_with("mqtt-chaos: three.toml:")), "{err}");
}

#[test]
fn every_invalid_route_of_a_routes_file_is_reported_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[route]]\nname = \"a b\"\nlisten = \"127.0.0.1:0\"\nupstream = \"no-port\"\n\n\
         [[route]]\nname = \"c\"\nlisten = \"127.0.0.1:0\"\nupstream = \"h:1\"\nport = 3\n",
    )
    .unwrap();
    let expected = [
        "routes.toml:2:8: invalid route name \"a b\"",
        "routes.toml:4:12: invalid upstream address \"no-port\"",
        "routes.toml:10:1: unknown field `port`",
    ];
    let out = run_in(dir.path(), &["check", "routes.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 3, "{err}");
    for (line, start) in err.lines().zip(expected) {
        assert!(line.starts_with(start), "{line:?} should start with {start:?}:\n{err}");
    }
    let out = run_in(dir.path(), &["proxy", "--config", "routes.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    for (line, start) in err.lines().zip(expected) {
        assert!(line.starts_with(&format!("mqtt-chaos: {start}")), "{line:?}:\n{err}");
    }

    std::fs::write(
        dir.path().join("good.toml"),
        "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"h:1\"\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["check", "good.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok: good.toml (routes file: 1 route)\n");
}

#[test]
fn a_missing_profile_file_named_like_a_built_in_profile_suggests_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let advice = "did you mean the built-in profile `drop-pingreq`? A profile name is given alone, \
                  without a path or `.toml`";
    for path in ["drop-pingreq.toml", "profiles/drop-pingreq.toml", "drop-pingrq.toml"] {
        let out = run_in(dir.path(), &["check", path]);
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.starts_with(&format!("{path}: cannot read: ")) && err.contains(advice), "{err}");

        let proxy = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--profile", path];
        let out = run_in(dir.path(), &proxy);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(advice), "{}", stderr(&out));

        // ctl says so before asking the proxy, whose names are no paths.
        let out = run_in(dir.path(), &["ctl", "--admin", "127.0.0.1:1", "profile", path]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("{path}: no such file; {advice}")), "{}", stderr(&out));
    }
    // A name one letter off is answered with the name it is close to.
    let out = run_in(dir.path(), &["check", "drop-pingrq"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("did you mean `drop-pingreq`? available: "), "{}", stderr(&out));
    // Nothing close: no guess.
    let out = run_in(dir.path(), &["check", "zzz.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains("did you mean"), "{}", stderr(&out));
}

#[test]
fn commands_that_write_to_stdout_end_quietly_when_it_is_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["check", "passthrough", "drop-pingreq"][..],
        &["profiles"],
        &["profiles", "--json"],
        &["--help"],
        &["--version"],
        &["help"],
        &["check", "--help"],
        &["proxy", "--help"],
    ] {
        // The read end is closed before the binary starts: its first write meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(binary())
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // An invalid file still fails the check with a closed stdout, and its errors are said.
    std::fs::write(dir.path().join("three.toml"), THREE_BAD_RULES).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(binary())
        .args(["check", "passthrough", "three.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::from(writer))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 3, "{}", stderr(&out));
}
