//! Fault profiles: TOML files of rules, loaded with every error pointing at `file:line:col`;
//! `--profile NAME|FILE` resolution, with advice for a name that was misspelt or given as a path.
//!
//! ```toml
//! name = "drop-pingreq"
//! description = "The broker hears silence: it closes the client after ~1.5 × Keep Alive."
//! seed = 7                       # optional: makes every random decision reproducible
//!
//! [[rules]]
//! name = "swallow-pingreq"
//! action = "drop"
//! direction = "client_to_broker"
//! packets = ["PINGREQ"]
//! ```

use super::engine::RuleSet;
use super::rule::{Rule, RuleError, RuleSpec};
use crate::config::{ConfigError, ConfigErrors, Errors, closest, document, read_config_file};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::de::{DeTable, DeValue};

/// A profile as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    pub name: String,
    /// What the user should observe, and on which side.
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub spec: ProfileSpec,
    pub rules: Vec<Arc<Rule>>,
    /// [`content_hash`] of the text it was parsed from; `None` for one built from a
    /// [`ProfileSpec`] in code.
    pub hash: Option<u64>,
}

impl Profile {
    /// The rule set this profile activates.
    pub fn rule_set(&self) -> RuleSet {
        let mut set = RuleSet::new(Some(self.spec.name.clone()), self.spec.seed, self.rules.clone());
        set.profile_hash = self.hash;
        set
    }
}

/// The hash that identifies a version of a profile (`/readyz`, `mqtt_chaos_build_info`): 64-bit
/// FNV-1a of the exact bytes of its text. Stable across builds and platforms, so any FNV-1a
/// implementation run on a file tells whether a proxy runs that version of it. It tells versions
/// apart; it is no protection against a forged file (not a cryptographic hash). Written by
/// [`hash_hex`].
pub fn content_hash(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A [`content_hash`] as written: 16 lower-case hex digits.
pub fn hash_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

impl ProfileSpec {
    /// Validates every rule (errors name the field, e.g. `rules[1].packets[0]`).
    pub fn compile(self) -> Result<Profile, RuleError> {
        crate::names::check("profile name", &self.name)
            .map_err(|message| RuleError { path: "name".into(), message })?;
        compile_rules(&self.rules, "rules").map(|rules| Profile { spec: self, rules, hash: None })
    }
}

/// Validates a list of rules whose names must be unique; `prefix` starts each error path.
pub fn compile_rules(specs: &[RuleSpec], prefix: &str) -> Result<Vec<Arc<Rule>>, RuleError> {
    let mut rules: Vec<Arc<Rule>> = Vec::with_capacity(specs.len());
    let mut names = std::collections::HashSet::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let path = format!("{prefix}[{i}]");
        if !names.insert(spec.name.as_str()) {
            return Err(duplicate(&path, &spec.name));
        }
        rules.push(Arc::new(spec.compile(&path)?));
    }
    Ok(rules)
}

/// Parses and validates profile text from `file`. Every error is reported, in file order: a
/// TOML syntax error alone (parsing stops there), else each wrong field of the profile and of
/// every rule.
pub fn parse_profile(file: &str, text: &str) -> Result<Profile, ConfigErrors> {
    let mut errors = Errors::new(file, text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            errors.toml(&e);
            return errors.finish_with(None);
        }
    };
    let (head, specs, _) = document::<ProfileSpec, RuleSpec>(&root, "rules", &mut errors);
    let at = |e: RuleError| (span_in(&root, &e.path), e.message);
    let mut found = Vec::new();
    if let Some(head) = &head
        && let Err(message) = crate::names::check("profile name", &head.name)
    {
        found.push(at(RuleError { path: "name".into(), message }));
    }
    let mut rules = Vec::with_capacity(specs.len());
    let mut names = std::collections::HashSet::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let Some(spec) = spec else { continue };
        let path = format!("rules[{i}]");
        if !names.insert(spec.name.as_str()) {
            found.push(at(duplicate(&path, &spec.name)));
        }
        match spec.compile_all(&path) {
            Ok(rule) => rules.push(Arc::new(rule)),
            Err(list) => found.extend(list.into_iter().map(at)),
        }
    }
    for (offset, message) in found {
        errors.at(offset, message);
    }
    let profile = head.map(|mut spec| {
        spec.rules = specs.into_iter().flatten().collect();
        Profile { spec, rules, hash: Some(content_hash(text.as_bytes())) }
    });
    errors.finish_with(profile)
}

/// The error of a rule whose name an earlier rule has.
fn duplicate(path: &str, name: &str) -> RuleError {
    RuleError { path: format!("{path}.name"), message: format!("duplicate rule name {name:?}") }
}

/// Reads a profile file.
pub fn load_profile(path: &Path) -> Result<Profile, ConfigErrors> {
    let (file, text) = read_config_file(path)?;
    parse_profile(&file, &text)
}

/// The shipped profiles (`profiles/*.toml`), compiled into the binary so that `--profile NAME`
/// works wherever the binary is installed. A file of the same name in `--profiles-dir`
/// overrides one. A test keeps this list equal to the folder.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("drop-pingreq", include_str!("../../profiles/drop-pingreq.toml")),
    ("drop-pingresp", include_str!("../../profiles/drop-pingresp.toml")),
    ("flaky-pingresp", include_str!("../../profiles/flaky-pingresp.toml")),
    ("half-open-broker", include_str!("../../profiles/half-open-broker.toml")),
    ("half-open-client", include_str!("../../profiles/half-open-client.toml")),
    ("keepalive-disable", include_str!("../../profiles/keepalive-disable.toml")),
    ("keepalive-shrink", include_str!("../../profiles/keepalive-shrink.toml")),
    ("partition", include_str!("../../profiles/partition.toml")),
    ("passthrough", include_str!("../../profiles/passthrough.toml")),
    ("reset-storm", include_str!("../../profiles/reset-storm.toml")),
    ("server-keepalive-override", include_str!("../../profiles/server-keepalive-override.toml")),
    ("slow-pingresp", include_str!("../../profiles/slow-pingresp.toml")),
];

/// Where a profile comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    BuiltIn,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::BuiltIn => f.write_str("built-in"),
        }
    }
}

/// Whether `--profile` was given a path (an existing file, or text with a `/` or ending in
/// `.toml`) rather than a name.
pub fn is_path(name_or_file: &str) -> bool {
    Path::new(name_or_file).is_file() || name_or_file.contains('/') || name_or_file.ends_with(".toml")
}

/// `--profile NAME|FILE`: a file path; or a name, looked up as `DIR/NAME.toml`, then among the
/// built-in profiles. An unknown name is an error that lists the available ones and suggests a
/// close one; a path to no file that looks like a profile name (`drop-pingreq.toml`) suggests
/// that name.
pub fn find(name_or_file: &str, dir: &Path) -> Result<(Source, Profile), ConfigErrors> {
    if is_path(name_or_file) {
        let path = PathBuf::from(name_or_file);
        return match load_profile(&path) {
            Ok(p) => Ok((Source::File(path), p)),
            Err(e) if !path.exists() => match path_hint(name_or_file, Some(dir)) {
                Some(hint) => {
                    let mut first = e.first().clone();
                    first.message = format!("{}; {hint}", first.message);
                    Err(first.into())
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        };
    }
    let names = reachable(dir);
    let close = closest(name_or_file, names.iter().map(|(n, _)| n.as_str()))
        .map(|n| format!("did you mean `{n}`? "))
        .unwrap_or_default();
    let available = names.into_iter().map(|(n, _)| n).collect::<Vec<_>>().join(", ");
    by_name(name_or_file, dir)?.ok_or_else(|| {
        ConfigError {
            file: name_or_file.to_string(),
            line: 0,
            col: 0,
            message: format!(
                "no profile of that name in {} nor built in; {close}available: {available} (`mqtt-chaos \
                 profiles` describes them; --profiles-dir DIR looks elsewhere; a path to a .toml file works too)",
                dir.display(),
            ),
        }
        .into()
    })
}

/// For a path to no file (`drop-pingreq.toml`, `profiles/drop-pingrq.toml`): the profile name
/// it may have meant, as advice. Its file name without `.toml` is compared with the names a
/// profile can be given by (those in `dir`, if given, and the built-in ones), exactly, then
/// within two typing mistakes.
pub fn path_hint(path: &str, dir: Option<&Path>) -> Option<String> {
    let stem = Path::new(path).file_stem()?.to_str()?;
    let names = match dir {
        Some(dir) => reachable(dir),
        None => BUILT_IN.iter().map(|(n, _)| (n.to_string(), Source::BuiltIn)).collect(),
    };
    let (name, source) = match names.iter().find(|(n, _)| n == stem) {
        Some(found) => found,
        None => {
            let close = closest(stem, names.iter().map(|(n, _)| n.as_str()))?;
            names.iter().find(|(n, _)| n == close)?
        }
    };
    let kind = match source {
        Source::BuiltIn => "the built-in profile".to_string(),
        Source::File(file) => format!("the profile in {}", file.display()),
    };
    Some(format!("did you mean {kind} `{name}`? A profile name is given alone, without a path or `.toml`"))
}

/// A profile by name only (never a path): `DIR/NAME.toml`, then the built-in one; `None` if
/// there is neither.
pub fn by_name(name: &str, dir: &Path) -> Result<Option<(Source, Profile)>, ConfigErrors> {
    let path = dir.join(format!("{name}.toml"));
    if path.is_file() {
        return load_profile(&path).map(|p| Some((Source::File(path), p)));
    }
    match BUILT_IN.iter().find(|(n, _)| *n == name) {
        Some((name, text)) => {
            parse_profile(&format!("built-in profile {name}"), text).map(|p| Some((Source::BuiltIn, p)))
        }
        None => Ok(None),
    }
}

/// [`available`] as JSON (`GET /profiles`, `mqtt-chaos profiles --json`): per profile its
/// `name`, `source` (`file` with its `file`, or `built-in`), and `description` and `rules`, or
/// the `error` that stops it from loading.
pub fn listing(dir: &Path) -> serde_json::Value {
    use serde_json::json;
    let items: Vec<serde_json::Value> = available(dir)
        .into_iter()
        .map(|l| {
            let mut item = match l.loaded {
                Ok(p) => json!({"name": l.name, "description": p.spec.description, "rules": p.rules.len()}),
                Err(e) => json!({"name": l.name, "error": e.summary()}),
            };
            match l.source {
                Source::File(path) => {
                    item["source"] = json!("file");
                    item["file"] = json!(path.display().to_string());
                }
                Source::BuiltIn => item["source"] = json!("built-in"),
            }
            item
        })
        .collect();
    json!(items)
}

/// The names `by_name` finds, comma-separated.
pub fn available_names(dir: &Path) -> String {
    available(dir).into_iter().map(|l| l.name).collect::<Vec<_>>().join(", ")
}

/// One profile in a listing: its name (from the file name or the built-in table), where it is,
/// and what loading it gave.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub source: Source,
    pub loaded: Result<Profile, ConfigErrors>,
}

/// Every profile `find` can reach by name, sorted by name: the files in `dir` (a missing or
/// unreadable folder gives none) and the built-in profiles no file overrides.
pub fn available(dir: &Path) -> Vec<Listed> {
    reachable(dir)
        .into_iter()
        .map(|(name, source)| {
            let loaded = match &source {
                Source::File(path) => load_profile(path),
                Source::BuiltIn => {
                    let text = BUILT_IN.iter().find(|(n, _)| *n == name).map_or("", |(_, t)| *t);
                    parse_profile(&format!("built-in profile {name}"), text)
                }
            };
            Listed { name, source, loaded }
        })
        .collect()
}

/// The names of [`available`] and where each is, without loading them.
fn reachable(dir: &Path) -> Vec<(String, Source)> {
    let mut all: Vec<(String, Source)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|path| Some((path.file_stem()?.to_str()?.to_string(), Source::File(path))))
        .collect();
    for (name, _) in BUILT_IN {
        if !all.iter().any(|(n, _)| n == name) {
            all.push((name.to_string(), Source::BuiltIn));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Byte offset of the value at `path` (`rules[2].match.protocol`) in the parsed document
/// `root`; for a path that is not in the text (a missing field), the closest enclosing value.
fn span_in(root: &toml::Spanned<DeTable<'_>>, path: &str) -> usize {
    let mut best = root.span().start;
    let mut table: &DeTable<'_> = root.get_ref();
    for segment in path.split('.') {
        let (key, indices) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        let Some(mut value) = table.get(key) else { break };
        best = value.span().start;
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let item = index.parse::<usize>().ok().and_then(|i| value.get_ref().as_array()?.get(i));
            let Some(item) = item else { return best };
            value = item;
            best = value.span().start;
        }
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "demo"
description = "demo"
seed = 3

[[rules]]
name = "a"
action = "drop"
packets = ["PINGREQ"]

[[rules]]
name = "b"
action = "delay"
latency = "1s"
"#;

    #[test]
    fn the_profile_hash_is_fnv1a_64_of_the_exact_text() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(hash_hex(content_hash(b"")), "cbf29ce484222325");
        assert_eq!(hash_hex(content_hash(b"a")), "af63dc4c8601ec8c");
        assert_eq!(hash_hex(content_hash(b"foobar")), "85944171f73967e8");
        let p = parse_profile("demo.toml", GOOD).unwrap();
        assert_eq!(p.hash, Some(content_hash(GOOD.as_bytes())));
        assert_eq!(p.rule_set().profile_hash, p.hash);
        let q = parse_profile("demo.toml", &format!("{GOOD}\n")).unwrap();
        assert_ne!(q.hash, p.hash, "a changed byte is a different version");
    }

    #[test]
    fn a_valid_profile_compiles() {
        let p = parse_profile("demo.toml", GOOD).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rule_set().seed, 3);
    }

    #[test]
    fn errors_point_at_the_offending_value() {
        let bad = GOOD.replace("packets = [\"PINGREQ\"]", "packets = [\"PINGREQ\", \"PING\"]");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert_eq!((e.line, e.col), (9, 23), "{e}");
        assert!(e.to_string().starts_with("p.toml:9:23: unknown packet type \"PING\""), "{e}");

        let bad = GOOD.replace("latency = \"1s\"", "latency = \"1s\"\nprobability = 2.0");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert_eq!((e.line, e.col), (15, 15), "{e}");

        let bad = GOOD.replace("name = \"b\"", "name = \"a\"");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert_eq!(e.to_string(), "p.toml:12:8: duplicate rule name \"a\"");

        let bad = GOOD.replace("latency = \"1s\"", "latency = \"soon\"");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert!(e.to_string().starts_with("p.toml:14:11: invalid duration \"soon\""), "{e}");

        let bad = GOOD.replace("action = \"drop\"", "action = \"drop\"\nlatnecy = \"1s\"");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert!(e.to_string().starts_with("p.toml:9:1: unknown field `latnecy`"), "{e}");

        // A missing field points at its rule.
        let bad = GOOD.replace("latency = \"1s\"\n", "");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert_eq!(e.line, 11, "{e}");
    }

    #[test]
    fn a_profile_name_that_could_forge_log_lines_or_labels_is_refused_at_its_place() {
        let bad = GOOD.replace("name = \"demo\"", "name = \"demo\\r\\nINFO forged\"");
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert_eq!((e.line, e.col), (2, 8), "{e}");
        assert!(e.message.contains("control character"), "{e}");
        let bad = GOOD.replace("name = \"demo\"", &format!("name = \"{}\"", "p".repeat(900_000)));
        let e = parse_profile("p.toml", &bad).unwrap_err().first().clone();
        assert!(e.message.contains("at most 64"), "{e}");
    }

    #[test]
    fn thirty_thousand_rules_load_without_a_quadratic_name_check() {
        let text: String = (0..30_000)
            .map(|i| {
                format!("[[rules]]\nname = \"r{i}\"\naction = \"drop\"\nmatch = {{ client_id = \"d{i}\" }}\n")
            })
            .collect();
        let p = parse_profile("big.toml", &format!("name = \"big\"\n{text}")).unwrap();
        assert_eq!(p.rules.len(), 30_000);
        let dup = format!("name = \"big\"\n{text}[[rules]]\nname = \"r29999\"\naction = \"drop\"\n");
        let e = parse_profile("big.toml", &dup).unwrap_err();
        assert!(e.to_string().contains("duplicate rule name \"r29999\""), "{e}");
    }

    #[test]
    fn the_built_in_profiles_are_the_shipped_folder_and_all_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| {
                (p.file_stem().unwrap().to_str().unwrap().to_string(), std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        files.sort();
        let built_in: Vec<(String, String)> =
            BUILT_IN.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        assert_eq!(built_in, files, "BUILT_IN must list every file of profiles/ (and only those)");
        for (name, text) in BUILT_IN {
            let p = parse_profile(name, text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.spec.name, *name, "a profile's name is its file name");
        }
    }

    #[test]
    fn names_are_found_in_the_directory_first_then_built_in_and_unknown_ones_list_the_rest() {
        let nowhere = Path::new("/nonexistent/profiles");
        let (source, p) = find("drop-pingreq", nowhere).unwrap();
        assert_eq!((source, p.spec.name.as_str()), (Source::BuiltIn, "drop-pingreq"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("drop-pingreq.toml"),
            "name = \"drop-pingreq\"\ndescription = \"mine\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("extra.toml"), "name = \"extra\"\n").unwrap();
        let (source, p) = find("drop-pingreq", dir.path()).unwrap();
        assert_eq!(source, Source::File(dir.path().join("drop-pingreq.toml")));
        assert_eq!(p.spec.description, "mine", "a file overrides the built-in profile");
        let e = find("no-such", dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("no-such: no profile of that name"), "{e}");
        assert!(e.contains("drop-pingreq, drop-pingresp, extra, flaky-pingresp"), "{e}");
        let listed = available(dir.path());
        assert_eq!(listed.len(), BUILT_IN.len() + 1);
        assert!(find("./missing.toml", dir.path()).unwrap_err().to_string().contains("cannot read"));
    }
}
