//! The deployment files (deploy/) against the binary they deploy: every flag and environment
//! variable the Kubernetes manifests give the proxy is one `mqtt-chaos proxy --help` lists, the
//! ports in the arguments are the named container ports and the scrape annotation, the profiles
//! in the ConfigMap pass `mqtt-chaos check`, and the Containerfile builds what the manifests run.
//! The manifests' schemas and cross-references are checked by deploy/validate-manifests.py
//! (`.ci/run`), which needs no binary.

use crate::harness::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every `*.yaml` under deploy/kubernetes, with its path relative to it, sorted.
fn manifests() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let root = deploy_dir().join("kubernetes");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    assert!(out.len() >= 4, "the manifests under {}: {out:?}", root.display());
    out
}

/// A line without its YAML comment (a `#` at the start or after a blank; none of the manifests
/// has one inside a value after a blank).
fn uncommented(line: &str) -> &str {
    let bytes = line.as_bytes();
    (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
        .map_or(line, |i| &line[..i])
}

/// The `--flag` words and the `MQTT_CHAOS_*` names in a text.
fn flags_and_vars(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let (mut flags, mut vars) = (BTreeSet::new(), BTreeSet::new());
    for (i, _) in text.match_indices("--") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| !(c.is_whitespace() || c == '"' || c == '[' || c == ',')) {
            continue;
        }
        let name: String = text[i + 2..].chars().take_while(|&c| word(c)).collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{name}"));
        }
    }
    for (i, _) in text.match_indices("MQTT_CHAOS_") {
        vars.insert(text[i..].chars().take_while(|&c| word(c)).collect());
    }
    (flags, vars)
}

/// What `mqtt-chaos proxy --help` lists: its flags and environment variables.
fn proxy_help() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary()).args(["proxy", "--help"]).output().unwrap();
    assert!(out.status.success(), "proxy --help: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let (flags, vars) = flags_and_vars(&help);
    assert!(flags.contains("--listen") && vars.contains("MQTT_CHAOS_LISTEN"), "{help}");
    (flags, vars)
}

/// The flags and variables of `manifest` (comments left out) that the proxy does not have.
fn unknown_to_the_proxy(manifest: &str, help: &(BTreeSet<String>, BTreeSet<String>)) -> Vec<String> {
    let text: String = manifest.lines().map(|l| format!("{}\n", uncommented(l))).collect();
    let (flags, vars) = flags_and_vars(&text);
    flags.difference(&help.0).chain(vars.difference(&help.1)).cloned().collect()
}

#[test]
fn every_flag_and_environment_variable_in_the_manifests_is_one_the_proxy_has() {
    let help = proxy_help();
    let mut used = BTreeSet::new();
    for (name, text) in manifests() {
        let unknown = unknown_to_the_proxy(&text, &help);
        assert!(unknown.is_empty(), "{name} names what `mqtt-chaos proxy --help` does not list: {unknown:?}");
        used.extend(flags_and_vars(&text).0);
    }
    for flag in ["--listen", "--upstream", "--admin", "--admin-token-file", "--profile", "--profiles-dir"] {
        assert!(used.contains(flag), "no manifest gives {flag}: {used:?}");
    }
}

#[test]
fn a_manifest_naming_a_flag_or_variable_the_proxy_lacks_is_reported() {
    let help = proxy_help();
    let manifest = "args:\n  - proxy\n  - --listen # ok\n  - --admin-tokn-file\n  - \"--upstream\"\n\
                    # --in-a-comment is not looked at\nenv:\n  - name: MQTT_CHAOS_ADMIN_TOKN_FILE\n";
    assert_eq!(
        unknown_to_the_proxy(manifest, &help),
        ["--admin-tokn-file", "MQTT_CHAOS_ADMIN_TOKN_FILE"],
        "a misspelt flag and variable are caught, the real ones and comments are not"
    );
}

/// The value after `- FLAG` in a YAML list of arguments, one per line, without its comment.
fn arg_after<'a>(text: &'a str, flag: &str) -> Option<&'a str> {
    let mut lines = text.lines().map(|l| uncommented(l).trim());
    lines.by_ref().find(|l| *l == format!("- {flag}"))?;
    lines.next()?.strip_prefix("- ").map(|v| v.trim().trim_matches('"'))
}

/// `containerPort` of the port named `name`.
fn container_port(text: &str, name: &str) -> Option<u16> {
    let mut lines = text.lines().map(|l| uncommented(l).trim());
    lines.by_ref().find(|l| *l == format!("- name: {name}"))?;
    lines.next()?.strip_prefix("containerPort: ")?.parse().ok()
}

/// The port of `HOST:PORT` or `SCHEME://HOST:PORT[/PATH]`.
fn port(address: &str) -> u16 {
    let authority = address.split_once("://").map_or(address, |(_, rest)| rest).split('/').next().unwrap();
    authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

#[test]
fn the_ports_the_proxy_is_given_are_the_named_container_ports_and_the_scrape_annotation() {
    let mut pods = 0;
    for (name, text) in manifests() {
        let Some(admin) = arg_after(&text, "--admin") else { continue };
        pods += 1;
        assert!(
            admin.starts_with("0.0.0.0:"),
            "{name}: --admin {admin}: probes and Prometheus need the pod IP"
        );
        assert_eq!(
            Some(port(admin)),
            container_port(&text, "admin"),
            "{name}: --admin and the port named admin"
        );
        assert!(
            text.contains(&format!("prometheus.io/port: \"{}\"", port(admin))),
            "{name}: the prometheus.io/port annotation is the admin port"
        );
        let listen = arg_after(&text, "--listen").unwrap_or_else(|| panic!("{name}: no --listen"));
        assert!(listen.starts_with("mqtt://"), "{name}: --listen {listen}");
        if let Some(mqtt) = container_port(&text, "mqtt") {
            assert_eq!(port(listen), mqtt, "{name}: --listen and the port named mqtt");
        } else {
            assert!(
                listen.starts_with("mqtt://127.0.0.1:"),
                "{name}: a listener with no container port is the pod's own"
            );
        }
        let profile = arg_after(&text, "--profile").unwrap();
        assert_eq!(Some(profile.rsplit_once('/').unwrap().0), arg_after(&text, "--profiles-dir"), "{name}");
    }
    assert_eq!(pods, 2, "the Deployment and the sidecar");
}

/// The `NAME.toml: |` entries of a ConfigMap's data, dedented.
fn configmap_files(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(key) =
            line.strip_prefix("  ").and_then(|l| l.strip_suffix(": |")).filter(|k| k.ends_with(".toml"))
        {
            out.extend(current.take());
            current = Some((key.to_string(), String::new()));
        } else if let Some((_, body)) = &mut current {
            if line.starts_with("    ") || line.trim().is_empty() {
                body.push_str(line.get(4..).unwrap_or(""));
                body.push('\n');
            } else {
                out.extend(current.take());
            }
        }
    }
    out.extend(current);
    out
}

#[test]
fn the_profiles_in_the_configmap_pass_check() {
    let (_, text) = manifests().into_iter().find(|(n, _)| n == "profile-configmap.yaml").unwrap();
    let files = configmap_files(&text);
    assert!(files.iter().any(|(k, _)| k == "profile.toml"), "{files:?}");
    let dir = tempfile::tempdir().unwrap();
    for (key, body) in &files {
        std::fs::write(dir.path().join(key), body).unwrap();
    }
    let out = Command::new(binary())
        .arg("check")
        .args(files.iter().map(|(k, _)| k))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok: ")).count(), files.len(), "{stdout}");
}

#[test]
fn the_containerfile_builds_locked_and_runs_the_binary_as_the_manifests_user() {
    let file = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    assert!(file.contains("cargo build --release --locked"), "a locked release build");
    assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/mqtt-chaos\"]"), "the binary as ENTRYPOINT");
    let user = file.lines().find_map(|l| l.strip_prefix("USER ")).expect("a USER line");
    let uid = user.split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|u| u != 0), "a numeric non-root user: {user}");
    for (name, text) in manifests() {
        if text.contains("kind: Deployment") {
            assert!(text.contains(&format!("runAsUser: {uid}")), "{name} runs as the image's user {uid}");
        }
    }
}

#[test]
fn the_readmes_scrape_job_for_plain_prometheus_passes_promtool() {
    const README: &str = include_str!("../../README.md");
    let start =
        README.find("```yaml\nscrape_configs:\n").expect("the README's scrape job") + "```yaml\n".len();
    let job = &README[start..start + README[start..].find("```").unwrap()];
    let promtool = prometheus_binary().with_file_name("promtool");
    assert!(
        promtool.is_file(),
        "{} is missing: it comes with Prometheus (`apt-get install -y prometheus`, or run `.ci/run`)",
        promtool.display()
    );
    // Debian's Prometheus is built without Kubernetes discovery: fixed targets stand in for it;
    // promtool requires the token file to exist.
    let discovery = "    kubernetes_sd_configs:\n      - role: pod\n";
    let token_file = "/etc/prometheus/secrets/mqtt-chaos-admin-token/token";
    assert!(job.contains(discovery) && job.contains(token_file), "{job}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let config = job
        .replace(discovery, "    static_configs:\n      - targets: [\"127.0.0.1:9184\"]\n")
        .replace(token_file, &dir.path().join("token").display().to_string());
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
