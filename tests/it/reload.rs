//! Profiles that reload: the binary watches its `--profile` file and applies a changed version
//! as `PUT /profile` does — a Kubernetes ConfigMap's `..data` symlink swap, an editor's
//! write-rename, a delete and re-create — while a bad version keeps the rules in force, is
//! logged once with `file:line:col` and counted; `/readyz` and `mqtt_chaos_build_info` name the
//! profile and the hash of its text.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// The promise: a change is live within this.
const PROMPT: Duration = Duration::from_secs(2);

const CALM: &str = "name = \"calm\"\ndescription = \"nothing yet\"\n";
const MUTE: &str = "name = \"mute\"\n\n[[rules]]\nname = \"swallow\"\naction = \"drop\"\n\
                    direction = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n";
/// Line 5, column 12: an unknown packet type.
const BROKEN: &str =
    "name = \"mute\"\n\n[[rules]]\nname = \"swallow\"\npackets = [\"PINGRQ\"]\naction = \"drop\"\n";
const DELAY: &str = "name = \"slow\"\n\n[[rules]]\nname = \"lag\"\naction = \"delay\"\nlatency = \"10ms\"\n";

/// 64-bit FNV-1a, written here from its definition: the hash README.md documents.
fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The binary with an admin API, its log in a file. Killed on drop.
struct Proxy {
    _child: KillOnDrop,
    listen: String,
    api: mqtt_chaos::ctl::Client,
    log: PathBuf,
}

impl Proxy {
    fn start(dir: &Path, upstream: &str, extra: &[&str]) -> Proxy {
        let listen = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let log = dir.join("proxy.log");
        let child = KillOnDrop(
            Command::new(binary())
                .args(["proxy", "--listen", &listen, "--upstream", upstream, "--admin", &admin])
                .args(extra)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        for addr in [&listen, &admin] {
            let up = (0..200).any(|_| {
                let up = std::net::TcpStream::connect(addr).is_ok();
                if !up {
                    std::thread::sleep(Duration::from_millis(25));
                }
                up
            });
            assert!(up, "the proxy did not listen on {addr}:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        let api = mqtt_chaos::ctl::Client::new(&format!("http://{admin}"), None).unwrap();
        Proxy { _child: child, listen, api, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let reply = self.api.request("GET", path, None, b"").await.unwrap();
        (reply.status, reply.body)
    }

    async fn json(&self, path: &str) -> Value {
        let (_, body) = self.get(path).await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The profile and the rule names in force (`GET /rules`).
    async fn rules(&self) -> (String, Vec<String>) {
        let v = self.json("/rules").await;
        let names =
            v["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().into()).collect();
        (v["profile"].as_str().unwrap_or("").into(), names)
    }

    /// Waits until the profile in force is `name`; how long that took.
    async fn until_profile(&self, name: &str, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within + Duration::from_secs(3) {
            if self.rules().await.0 == name {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("profile {name:?} not in force after {:?}:\n{}", start.elapsed(), self.log());
    }

    /// `mqtt_chaos_profile_reloads_total{result}`.
    async fn reloads(&self, result: &str) -> u64 {
        let (_, text) = self.get("/metrics").await;
        let line = format!("mqtt_chaos_profile_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Waits until `result` was counted `n` times.
    async fn until_reloads(&self, result: &str, n: u64, within: Duration) {
        let start = Instant::now();
        while self.reloads(result).await < n {
            assert!(
                start.elapsed() < within,
                "{result} not counted {n} times within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What `/readyz` and `mqtt_chaos_build_info` say the profile is: (name, hash) from each.
    async fn identity(&self) -> ((Value, Value), String) {
        let ready = self.json("/readyz").await;
        let (_, metrics) = self.get("/metrics").await;
        let info = metrics.lines().find(|l| l.starts_with("mqtt_chaos_build_info{")).unwrap().to_string();
        ((ready["profile"].clone(), ready["profile_hash"].clone()), info)
    }

    fn log_lines_with(&self, text: &str) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(text)).map(str::to_string).collect()
    }
}

/// A ConfigMap volume as the kubelet lays it out: the files in a timestamped directory,
/// `..data` pointing at it, and each key a symlink through `..data`.
struct ConfigMap {
    dir: PathBuf,
    version: u32,
}

impl ConfigMap {
    fn new(dir: &Path, text: &str) -> ConfigMap {
        let mut map = ConfigMap { dir: dir.join("config"), version: 0 };
        std::fs::create_dir(&map.dir).unwrap();
        let first = map.write_version(text);
        std::os::unix::fs::symlink(&first, map.dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/profile.toml", map.dir.join("profile.toml")).unwrap();
        map
    }

    fn file(&self) -> PathBuf {
        self.dir.join("profile.toml")
    }

    fn write_version(&mut self, text: &str) -> String {
        self.version += 1;
        let name = format!("..2026_01_01_00_00_{:02}.{:09}", self.version, self.version);
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        std::fs::write(self.dir.join(&name).join("profile.toml"), text).unwrap();
        name
    }

    /// The kubelet's atomic update: a new timestamped directory, a temporary symlink to it
    /// renamed over `..data`, the old directory removed.
    fn swap(&mut self, text: &str) {
        let old = std::fs::read_link(self.dir.join("..data")).unwrap();
        let new = self.write_version(text);
        std::os::unix::fs::symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_symlink_swap_changes_the_live_rules_within_2_s_while_a_client_stays_connected() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut map = ConfigMap::new(dir.path(), CALM);
    let proxy = Proxy::start(dir.path(), &broker.addr(), &["--profile", map.file().to_str().unwrap()]);
    assert_eq!(proxy.identity().await.0, (Value::from("calm"), Value::from(fnv1a64(CALM.as_bytes()))));

    // A rule added through the API: the reload replaces it, as PUT /profile does, and says so.
    let mine = r#"{"name": "mine", "action": "delay", "latency": "1ms", "packets": ["SUBSCRIBE"]}"#;
    let added = proxy.api.request("POST", "/rules", Some("application/json"), mine.as_bytes()).await.unwrap();
    assert_eq!(added.status, 201, "{}", added.body);

    let mut device = tokio::net::TcpStream::connect(&proxy.listen).await.unwrap();
    device.write_all(&connect_v4("steady", 60, None)).await.unwrap();
    expect_packet(&mut device, PROMPT, "CONNACK").await;
    device.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut device, PROMPT, "PINGRESP before the swap").await, PINGRESP);

    map.swap(MUTE);
    let took = proxy.until_profile("mute", PROMPT).await;
    eprintln!("the ..data swap was in force after {took:?}");
    assert!(took < PROMPT, "the swap took {took:?} to apply");
    assert_eq!(proxy.rules().await.1, ["swallow"], "the file's rules replace every global rule");
    // The same connection, still open, now loses its PINGREQ.
    device.write_all(&PINGREQ).await.unwrap();
    let (after, ending) = read_to_end(&mut device, Duration::from_millis(1500)).await;
    assert_eq!((after.as_slice(), ending), (&[][..], Ending::Open), "no PINGRESP, connection open");

    let hash = fnv1a64(MUTE.as_bytes());
    let ((name, ready_hash), info) = proxy.identity().await;
    assert_eq!((name, ready_hash), (Value::from("mute"), Value::from(hash.as_str())));
    assert!(info.contains(&format!("profile=\"mute\",profile_hash=\"{hash}\"")), "{info}");
    assert_eq!(proxy.reloads("applied").await, 1);
    let applied = proxy.log_lines_with("reloaded");
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(applied[0].contains("replaced_not_from_file=mine"), "{}", applied[0]);
    assert!(applied[0].contains("rules added through the API included"), "{}", applied[0]);
}

#[tokio::test]
async fn a_broken_swap_keeps_the_rules_is_counted_invalid_and_logged_once_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let mut map = ConfigMap::new(dir.path(), MUTE);
    let proxy = Proxy::start(dir.path(), "127.0.0.1:1", &["--profile", map.file().to_str().unwrap()]);

    map.swap(BROKEN);
    proxy.until_reloads("invalid", 1, PROMPT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // three more polls
    assert_eq!(proxy.rules().await, ("mute".into(), vec!["swallow".into()]), "the rules in force stay");
    assert_eq!(proxy.reloads("invalid").await, 1, "counted once, not at every poll");
    assert_eq!(proxy.reloads("applied").await, 0);
    let at = format!("{}:5:12: unknown packet type \"PINGRQ\"", map.file().display());
    let reported = proxy.log_lines_with("is not valid");
    assert_eq!(reported.len(), 1, "logged once: {reported:?}");
    assert!(reported[0].contains(&at) && reported[0].contains("WARN"), "{}", reported[0]);
    assert_eq!(proxy.identity().await.0.1, Value::from(fnv1a64(MUTE.as_bytes())));

    // Fixed: applied, and the line says what it recovered from.
    map.swap(DELAY);
    proxy.until_profile("slow", PROMPT).await;
    let applied = proxy.log_lines_with("reloaded");
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(applied[0].contains("recovered_from=") && applied[0].contains(&at), "{}", applied[0]);
}

#[tokio::test]
async fn a_profile_named_from_the_profiles_dir_follows_an_editor_save_and_a_delete_and_re_create() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    let file = profiles.join("lab.toml");
    std::fs::write(&file, CALM).unwrap();
    let proxy = Proxy::start(
        dir.path(),
        "127.0.0.1:1",
        &["--profiles-dir", profiles.to_str().unwrap(), "--profile", "lab"],
    );
    assert_eq!(proxy.rules().await.0, "calm");

    // An editor's save: a new file written beside it, renamed over it.
    let swap = profiles.join(".lab.toml.swp");
    std::fs::write(&swap, MUTE).unwrap();
    std::fs::rename(&swap, &file).unwrap();
    let took = proxy.until_profile("mute", PROMPT).await;
    eprintln!("the editor's save was in force after {took:?}");
    assert!(took < PROMPT, "{took:?}");

    // Deleted: the rules stay; said once.
    std::fs::remove_file(&file).unwrap();
    proxy.until_reloads("missing", 1, PROMPT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.rules().await.0, "mute");
    assert_eq!(proxy.reloads("missing").await, 1);
    assert_eq!(proxy.log_lines_with("no such file").len(), 1, "{}", proxy.log());

    // Created again: applied.
    std::fs::write(&file, DELAY).unwrap();
    proxy.until_profile("slow", PROMPT).await;
    assert_eq!(proxy.reloads("applied").await, 2);
    assert_eq!(proxy.identity().await.0.1, Value::from(fnv1a64(DELAY.as_bytes())));
}

#[tokio::test]
async fn a_directory_in_place_of_the_profile_file_is_counted_unreadable_and_the_rules_stay() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, MUTE).unwrap();
    let proxy = Proxy::start(dir.path(), "127.0.0.1:1", &["--profile", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    proxy.until_reloads("unreadable", 1, PROMPT + PROMPT).await;
    assert_eq!(proxy.rules().await.0, "mute");
    assert_eq!(proxy.log_lines_with("is a directory").len(), 1, "{}", proxy.log());
    std::fs::remove_dir(&file).unwrap();
    std::fs::write(&file, CALM).unwrap();
    proxy.until_profile("calm", PROMPT).await;
}

#[tokio::test]
async fn profile_reload_0s_leaves_the_rules_alone_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, MUTE).unwrap();
    let proxy = Proxy::start(
        dir.path(),
        "127.0.0.1:1",
        &["--profile", file.to_str().unwrap(), "--profile-reload", "0s"],
    );
    std::fs::write(&file, CALM).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.rules().await.0, "mute");
    assert!(proxy.log_lines_with("watching the profile file").is_empty(), "{}", proxy.log());
    let refused = Command::new(binary()).args(["proxy", "--profile-reload", "10ms"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--profile-reload") && said.contains("or 0s to turn watching off"), "{said}");
}
