//! Transparency proven by someone else's tests: the Eclipse Paho interoperability client suites
//! (MQTT 3.1.1 and 5, vendored with their licence in `tests/interop/paho`, README there) run
//! against mosquitto directly and through the `mqtt-chaos` binary, and fail the same tests both
//! ways. Several of them race one client's SUBSCRIBE against another's PUBLISH: a relay that
//! reorders packets across connections fails them.

use crate::harness::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

const SUITES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/paho/interoperability");
/// A test that prints nothing new for this long is ended (it waits for something that will not
/// come) and counted as failed.
const STUCK: Duration = Duration::from_secs(60);
/// A test that fails one way but not the other is run this many more times both ways.
const RERUNS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    /// Ended after [`STUCK`] without progress.
    Stuck,
}

impl Outcome {
    fn failed(self) -> bool {
        self != Outcome::Passed
    }
}

fn require_python() {
    let ok = Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "python3 is needed to run the Paho interoperability suites: apt-get install -y python3");
}

/// Runs a suite file as its own `__main__` block does (`-p PORT`), but with unittest told to run
/// the given tests, in that order, and to say on lines of their own when each starts and how it
/// ended. The suites' files stay as published (`client_test.py` would hand `-p` to unittest).
const RUNNER: &str = "import runpy, sys, unittest
file, port, names = sys.argv[1], sys.argv[2], sys.argv[3:]
def say(*words):
    print('\\nmqtt-chaos-runner', *words, file=sys.stderr, flush=True)
class Result(unittest.TextTestResult):
    def startTest(self, test):
        say('start', test._testMethodName)
        super().startTest(test)
    def stopTest(self, test):
        super().stopTest(test)
        failed = any(t is test for t, _ in self.failures + self.errors)
        say('failed' if failed else 'passed', test._testMethodName)
run = unittest.main
unittest.main = lambda *a, **k: run(argv=[file] + ['Test.' + n for n in names],
    testRunner=unittest.TextTestRunner(resultclass=Result, verbosity=2))
sys.argv = [file, '-p', port]
runpy.run_path(file, run_name='__main__')
";

/// The names of a suite's tests, in file order.
fn test_names(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{SUITES}/{file}")).unwrap();
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("def test"))
        .map(|rest| format!("test{}", rest.split('(').next().unwrap()))
        .collect()
}

/// Runs the tests `names` of suite `file` against a broker on `port`, one Python process for as
/// many as possible: a stuck test is ended and the rest go on in a new process.
fn run(file: &str, port: u16, names: &[String]) -> BTreeMap<String, Outcome> {
    let mut outcomes = BTreeMap::new();
    let mut rest = names.to_vec();
    while !rest.is_empty() {
        let mut child = Command::new("python3")
            .args(["-u", "-c", RUNNER, file, &port.to_string()])
            .args(&rest)
            .current_dir(SUITES)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut current: Option<usize> = None;
        let mut progress = Instant::now();
        let mut stuck = false;
        loop {
            match lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    let Some(said) = line.strip_prefix("mqtt-chaos-runner ") else { continue };
                    let (what, name) = said.split_once(' ').unwrap_or((said, ""));
                    match what {
                        "start" => {
                            current = rest.iter().position(|n| n == name);
                            progress = Instant::now();
                        }
                        verdict => {
                            let passed = verdict == "passed";
                            outcomes.insert(
                                name.to_string(),
                                if passed { Outcome::Passed } else { Outcome::Failed },
                            );
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) if progress.elapsed() > STUCK => {
                    stuck = true;
                    let _ = child.kill();
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.wait();
        let done = match (stuck, current) {
            (true, Some(i)) => {
                outcomes.insert(rest[i].clone(), Outcome::Stuck);
                i + 1
            }
            // Stuck before the first test started (the suite's own clean-up), or ended: no
            // test of this lot runs again.
            _ => rest.len(),
        };
        // A test that never reported (the process died) failed.
        for name in &rest[..done] {
            outcomes.entry(name.clone()).or_insert(Outcome::Failed);
        }
        rest.drain(..done);
    }
    outcomes
}

/// A broker reached directly, and a broker behind the binary.
struct Pair {
    direct: Mosquitto,
    behind: Mosquitto,
    proxy: std::process::Child,
    proxy_port: u16,
}

impl Pair {
    fn start() -> Pair {
        let (direct, behind) = (Mosquitto::start(), Mosquitto::start());
        let proxy_port = free_port();
        let listen = format!("127.0.0.1:{proxy_port}");
        let proxy = spawn_binary(&["proxy", "--listen", &listen, "--upstream", &behind.addr()], &listen);
        Pair { direct, behind, proxy, proxy_port }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }
}

/// The suite run both ways at once (each way with its own broker: the suites use fixed client
/// ids and topics): (outcomes direct, outcomes through the proxy).
fn both_ways(file: &str, pair: &Pair, names: &[String]) -> [BTreeMap<String, Outcome>; 2] {
    std::thread::scope(|s| {
        let direct = s.spawn(|| run(file, pair.direct.port, names));
        let proxied = s.spawn(|| run(file, pair.proxy_port, names));
        [direct.join().unwrap(), proxied.join().unwrap()]
    })
}

fn failures(outcomes: &BTreeMap<String, Outcome>) -> Vec<String> {
    outcomes.iter().filter(|(_, o)| o.failed()).map(|(n, o)| format!("{n} ({o:?})")).collect()
}

/// One suite run both ways.
struct SuiteRun {
    file: &'static str,
    names: Vec<String>,
    direct: BTreeMap<String, Outcome>,
    proxied: BTreeMap<String, Outcome>,
    pair: Pair,
}

fn run_suite(file: &'static str) -> SuiteRun {
    let pair = Pair::start();
    let names = test_names(file);
    let [direct, proxied] = both_ways(file, &pair, &names);
    SuiteRun { file, names, direct, proxied, pair }
}

#[test]
fn the_paho_interoperability_suites_fail_the_same_tests_through_the_proxy_as_directly() {
    require_python();
    // Both suites at once: each waits on its brokers' timers, not on the CPU.
    let runs: Vec<SuiteRun> = std::thread::scope(|s| {
        let handles: Vec<_> =
            ["client_test.py", "client_test5.py"].map(|file| s.spawn(move || run_suite(file))).into();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for SuiteRun { file, names, direct, proxied, pair } in runs {
        assert!(names.len() >= 10, "{file}: {names:?}");
        let passed = direct.values().filter(|o| !o.failed()).count();
        assert!(
            passed * 2 >= names.len(),
            "{file}: only {passed} of {} tests pass against mosquitto directly: the suite did not run \
             properly (mosquitto log:\n{})",
            names.len(),
            pair.direct.log()
        );
        // Timing-sensitive tests may fail once by chance: a difference must repeat.
        let mut differ: Vec<String> =
            names.iter().filter(|n| direct[*n].failed() != proxied[*n].failed()).cloned().collect();
        for _ in 0..RERUNS {
            if differ.is_empty() {
                break;
            }
            let [d, p] = both_ways(file, &pair, &differ);
            differ.retain(|n| d[n].failed() != p[n].failed());
        }
        eprintln!(
            "{file}: {} tests; failing directly: {:?}; through the proxy: {:?}",
            names.len(),
            failures(&direct),
            failures(&proxied)
        );
        assert!(
            differ.is_empty(),
            "{file}: these tests fail one way and not the other, every time: {differ:?}\n\
             directly: {:?}\nthrough the proxy: {:?}\nbroker behind the proxy:\n{}",
            failures(&direct),
            failures(&proxied),
            pair.behind.log()
        );
    }
}
