//! Fault profiles: TOML files of rules, loaded with errors that point at `file:line:col`.
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
use crate::config::{ConfigError, line_col, read_config_file};
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
}

impl Profile {
    /// The rule set this profile activates.
    pub fn rule_set(&self) -> RuleSet {
        RuleSet::new(Some(self.spec.name.clone()), self.spec.seed, self.rules.clone())
    }
}

impl ProfileSpec {
    /// Validates every rule (errors name the field, e.g. `rules[1].packets[0]`).
    pub fn compile(self) -> Result<Profile, RuleError> {
        crate::names::check("profile name", &self.name)
            .map_err(|message| RuleError { path: "name".into(), message })?;
        compile_rules(&self.rules, "rules").map(|rules| Profile { spec: self, rules })
    }
}

/// Validates a list of rules whose names must be unique; `prefix` starts each error path.
pub fn compile_rules(specs: &[RuleSpec], prefix: &str) -> Result<Vec<Arc<Rule>>, RuleError> {
    let mut rules: Vec<Arc<Rule>> = Vec::with_capacity(specs.len());
    let mut names = std::collections::HashSet::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let path = format!("{prefix}[{i}]");
        if !names.insert(spec.name.as_str()) {
            return Err(RuleError {
                path: format!("{path}.name"),
                message: format!("duplicate rule name {:?}", spec.name),
            });
        }
        rules.push(Arc::new(spec.compile(&path)?));
    }
    Ok(rules)
}

/// Parses and validates profile text from `file`.
pub fn parse_profile(file: &str, text: &str) -> Result<Profile, ConfigError> {
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(text, offset);
        ConfigError { file: file.to_string(), line, col, message }
    };
    let spec: ProfileSpec = toml::from_str(text)
        .map_err(|e| at(e.span().map_or(0, |s| s.start), e.message().trim_end().to_string()))?;
    spec.compile().map_err(|e| at(span_of(text, &e.path).unwrap_or(0), e.message))
}

/// Reads a profile file.
pub fn load_profile(path: &Path) -> Result<Profile, ConfigError> {
    let (file, text) = read_config_file(path)?;
    parse_profile(&file, &text)
}

/// `--profile NAME|FILE`: a path if it names an existing file or looks like one (has a `/` or
/// ends in `.toml`), else `DIR/NAME.toml`.
pub fn resolve(name_or_file: &str, dir: &Path) -> PathBuf {
    let as_path = Path::new(name_or_file);
    if as_path.is_file() || name_or_file.contains('/') || name_or_file.ends_with(".toml") {
        as_path.to_path_buf()
    } else {
        dir.join(format!("{name_or_file}.toml"))
    }
}

/// The profiles in a directory, sorted by name, each loaded (or the error that stops it).
pub fn list(dir: &Path) -> std::io::Result<Vec<(PathBuf, Result<Profile, ConfigError>)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    Ok(paths.into_iter().map(|p| (p.clone(), load_profile(&p))).collect())
}

/// Byte offset of the value at `path` (`rules[2].match.protocol`) in TOML `text`; for a path
/// that is not in the text (a missing field), the closest enclosing value.
fn span_of(text: &str, path: &str) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut best = root.span().start;
    let mut table: &DeTable<'_> = root.get_ref();
    for segment in path.split('.') {
        let (key, indices) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        let Some(mut value) = table.get(key) else { break };
        best = value.span().start;
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let item = index.parse::<usize>().ok().and_then(|i| value.get_ref().as_array()?.get(i));
            let Some(item) = item else { return Some(best) };
            value = item;
            best = value.span().start;
        }
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    Some(best)
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
    fn a_valid_profile_compiles() {
        let p = parse_profile("demo.toml", GOOD).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rule_set().seed, 3);
    }

    #[test]
    fn errors_point_at_the_offending_value() {
        let bad = GOOD.replace("packets = [\"PINGREQ\"]", "packets = [\"PINGREQ\", \"PING\"]");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.col), (9, 23), "{e}");
        assert!(e.to_string().starts_with("p.toml:9:23: unknown packet type \"PING\""), "{e}");

        let bad = GOOD.replace("latency = \"1s\"", "latency = \"1s\"\nprobability = 2.0");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.col), (15, 15), "{e}");

        let bad = GOOD.replace("name = \"b\"", "name = \"a\"");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert_eq!(e.to_string(), "p.toml:12:8: duplicate rule name \"a\"");

        let bad = GOOD.replace("latency = \"1s\"", "latency = \"soon\"");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert!(e.to_string().starts_with("p.toml:14:11: invalid duration \"soon\""), "{e}");

        let bad = GOOD.replace("action = \"drop\"", "action = \"drop\"\nlatnecy = \"1s\"");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert!(e.to_string().starts_with("p.toml:9:1: unknown field `latnecy`"), "{e}");

        // A missing field points at its rule.
        let bad = GOOD.replace("latency = \"1s\"\n", "");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert_eq!(e.line, 11, "{e}");
    }

    #[test]
    fn a_profile_name_that_could_forge_log_lines_or_labels_is_refused_at_its_place() {
        let bad = GOOD.replace("name = \"demo\"", "name = \"demo\\r\\nINFO forged\"");
        let e = parse_profile("p.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.col), (2, 8), "{e}");
        assert!(e.message.contains("control character"), "{e}");
        let bad = GOOD.replace("name = \"demo\"", &format!("name = \"{}\"", "p".repeat(900_000)));
        let e = parse_profile("p.toml", &bad).unwrap_err();
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
    fn names_resolve_in_the_profiles_directory() {
        let dir = Path::new("/somewhere/profiles");
        assert_eq!(resolve("drop-pingreq", dir), dir.join("drop-pingreq.toml"));
        assert_eq!(resolve("./my.toml", dir), PathBuf::from("./my.toml"));
        assert_eq!(resolve("my.toml", dir), PathBuf::from("my.toml"));
    }
}
