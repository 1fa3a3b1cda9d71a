//! The probe's report: runs and cases added up into one result per scenario × protocol, and the
//! report written as a terminal table, Markdown, JSON (schema 1, PROBE.md) and JUnit XML.

use super::judge::{Judged, Stats, Tolerance, Verdict};
use super::scenario::{CaseRun, Scenario};
use crate::codec::Protocol;
use crate::text::escaped;
use crate::vocab::CloseHow;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The JSON report's schema version (PROBE.md); bumped on any incompatible change.
pub const SCHEMA: u32 = 1;

/// What the probe saw of the broker.
#[derive(Debug, Clone, Serialize)]
pub struct Broker {
    /// What `--broker` named, or the embedded broker's address.
    pub address: String,
    pub embedded: bool,
    /// The embedded broker's crate and version; `null` for `--broker`.
    pub implementation: Option<String>,
    /// Versions whose CONNECT the broker accepted: `"3.1.1"`, `"5"`.
    pub protocols: Vec<&'static str>,
    /// Versions asked for and refused, with how.
    pub refused: Vec<Refused>,
    /// MQTT 5 CONNACK to a CONNECT with Keep Alive k: the Server Keep Alive (null: none).
    pub server_keepalive: Option<u16>,
    /// MQTT 5 CONNACK to a CONNECT with an empty client id: the Assigned Client Identifier.
    pub assigned_client_id: Option<String>,
    /// Every distinct MQTT 5 Reason String the broker sent.
    pub reason_strings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub protocol: &'static str,
    pub how: String,
}

/// One scenario × protocol.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub protocol: &'static str,
    pub verdict: Verdict,
    pub expectation: String,
    /// What was measured, in words (each case's, for scenarios with cases).
    pub detail: String,
    pub runs: u32,
    #[serde(flatten)]
    pub measured: Measured,
    /// Scenarios with several cases (`takeover`, `server-keepalive`, `will-delay`): each one;
    /// the fields above are those of the main case.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<Case>,
    /// The short expectation for the terminal table.
    #[serde(skip)]
    pub expected_short: String,
}

/// One case of a scenario over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub case: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(flatten)]
    pub measured: Measured,
}

/// The measured fields; `null` where they do not apply or nothing was seen. `N` is one run's
/// value (`f64`) or the runs' min/median/max ([`Stats`]).
#[derive(Debug, Clone, Serialize)]
pub struct Measured<N = Stats> {
    pub close_after_s: Option<N>,
    pub ratio: Option<N>,
    pub close_how: Option<CloseHow>,
    pub disconnect_reason: Option<u8>,
    pub will_published: Option<bool>,
    pub will_delay_s: Option<N>,
    pub old_closed: Option<bool>,
    pub server_keepalive: Option<u16>,
}

impl<N> Default for Measured<N> {
    fn default() -> Self {
        Measured {
            close_after_s: None,
            ratio: None,
            close_how: None,
            disconnect_reason: None,
            will_published: None,
            will_delay_s: None,
            old_closed: None,
            server_keepalive: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub conforms: u32,
    pub deviates: u32,
    pub fails: u32,
    #[serde(rename = "n/a")]
    pub not_applicable: u32,
}

/// The whole report; its JSON form is the contract of PROBE.md.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub version: &'static str,
    pub broker: Broker,
    pub keepalive: u16,
    pub repeat: u32,
    pub timeout_s: f64,
    pub strict: bool,
    pub tolerance: Tolerance,
    pub results: Vec<Row>,
    pub summary: Summary,
    pub duration_s: f64,
    /// What keeps this run apart from others: its client ids start with `mcp` and it, its Will
    /// topics live under `mqtt-chaos/probe/` and it.
    pub run_id: String,
}

/// The case a multi-case scenario's top-level fields come from.
fn main_case(s: Scenario) -> &'static str {
    match s {
        Scenario::Takeover => "clean",
        Scenario::ServerKeepalive => "keepalive-k",
        Scenario::WillDelay => "session-expiry-30",
        _ => "",
    }
}

/// Adds up the runs of one scenario × protocol (`runs[i]` is run i's cases).
pub fn row(scenario: Scenario, protocol: Protocol, k: u16, tol: &Tolerance, runs: &[Vec<CaseRun>]) -> Row {
    let mut names: Vec<&'static str> = Vec::new();
    for c in runs.iter().flatten() {
        if !names.contains(&c.case) {
            names.push(c.case);
        }
    }
    let cases: Vec<Case> = names
        .iter()
        .map(|&name| {
            let of: Vec<&CaseRun> = runs.iter().flatten().filter(|c| c.case == name).collect();
            case(name, &of)
        })
        .collect();
    let main = cases.iter().find(|c| c.case == main_case(scenario)).or(cases.first());
    let verdict = cases.iter().map(|c| c.verdict).max().unwrap_or(Verdict::NotApplicable);
    let detail = if cases.len() == 1 {
        cases[0].detail.clone()
    } else {
        cases.iter().map(|c| format!("{}: {}", c.case, c.detail)).collect::<Vec<_>>().join(" | ")
    };
    Row {
        scenario: scenario.id(),
        protocol: protocol.version(),
        verdict,
        expectation: scenario.expectation(protocol, k, tol),
        detail,
        runs: runs.len() as u32,
        measured: main.map(|c| c.measured.clone()).unwrap_or_default(),
        cases: if cases.len() > 1 { cases } else { Vec::new() },
        expected_short: scenario.expected_short(k, tol),
    }
}

/// A row for a scenario × protocol that was not run, and why.
pub fn not_run(scenario: Scenario, protocol: Protocol, k: u16, tol: &Tolerance, why: String) -> Row {
    Row {
        scenario: scenario.id(),
        protocol: protocol.version(),
        verdict: Verdict::NotApplicable,
        expectation: scenario.expectation(protocol, k, tol),
        detail: why,
        runs: 0,
        measured: Measured::default(),
        cases: Vec::new(),
        expected_short: scenario.expected_short(k, tol),
    }
}

/// One case over its runs: the worst verdict (with how many runs had it) and the measurements
/// as min/median/max.
fn case(name: &'static str, runs: &[&CaseRun]) -> Case {
    let worst: Judged = runs
        .iter()
        .map(|r| r.judged.clone())
        .max_by(|a, b| a.verdict.cmp(&b.verdict))
        .unwrap_or_else(|| Judged::new(Verdict::NotApplicable, "no run"));
    let same = runs.iter().filter(|r| r.judged.verdict == worst.verdict).count();
    let detail = if runs.len() > 1 {
        format!("{} ({same} of {} runs)", worst.detail, runs.len())
    } else {
        worst.detail
    };
    let values =
        |f: fn(&CaseRun) -> Option<f64>| Stats::of(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
    let all = |f: fn(&CaseRun) -> Option<bool>| {
        let seen: Vec<bool> = runs.iter().filter_map(|r| f(r)).collect();
        (!seen.is_empty()).then(|| seen.iter().all(|&b| b))
    };
    let mut hows: Vec<CloseHow> = runs.iter().filter_map(|r| r.measured.close_how).collect();
    hows.sort();
    let close_how = hows.iter().max_by_key(|h| hows.iter().filter(|x| x == h).count()).copied();
    Case {
        case: name,
        verdict: worst.verdict,
        detail,
        measured: Measured {
            close_after_s: values(|r| r.measured.close_after_s),
            ratio: values(|r| r.measured.ratio),
            close_how,
            disconnect_reason: runs.iter().find_map(|r| r.measured.disconnect_reason),
            will_published: all(|r| r.measured.will_published),
            will_delay_s: values(|r| r.measured.will_delay_s),
            old_closed: all(|r| r.measured.old_closed),
            server_keepalive: runs.iter().find_map(|r| r.measured.server_keepalive),
        },
    }
}

impl Summary {
    pub fn of(rows: &[Row]) -> Summary {
        let mut s = Summary::default();
        for r in rows {
            *match r.verdict {
                Verdict::Conforms => &mut s.conforms,
                Verdict::Deviates => &mut s.deviates,
                Verdict::Fails => &mut s.fails,
                Verdict::NotApplicable => &mut s.not_applicable,
            } += 1;
        }
        s
    }
}

impl Measured {
    /// The measurement in a few words for the table: `3.00 s (1.50×) FIN, Will +0.00 s`.
    fn words(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.close_after_s {
            out.push_str(&c.words(" s"));
            if let Some(r) = &self.ratio {
                let _ = write!(out, " = {}", r.words("×"));
            }
        }
        if let Some(how) = self.close_how {
            let how = how_words(how, self.disconnect_reason);
            let _ = write!(out, "{}{how}", if out.is_empty() { "" } else { ", " });
        }
        if let Some(s) = self.server_keepalive {
            let _ = write!(out, "{}Server Keep Alive {s}", if out.is_empty() { "" } else { ", " });
        }
        match (self.will_published, &self.will_delay_s) {
            (Some(true), Some(d)) => {
                let _ = write!(out, "{}Will +{}", if out.is_empty() { "" } else { ", " }, d.words(" s"));
            }
            (Some(false), _) => out.push_str(if out.is_empty() { "no Will" } else { ", no Will" }),
            _ => {}
        }
        out
    }
}

impl Row {
    /// The table's MEASURED cell: the measurement of the case that decided the verdict (named,
    /// for scenarios with cases; the main case when they tie).
    fn measured_words(&self) -> String {
        let main = Scenario::parse(self.scenario).map_or("", main_case);
        let deciding = self.cases.iter().filter(|c| c.verdict == self.verdict).min_by_key(|c| c.case != main);
        let (prefix, m, verdict, detail) = match deciding {
            Some(c) => (format!("{}: ", c.case), &c.measured, c.verdict, &c.detail),
            None => (String::new(), &self.measured, self.verdict, &self.detail),
        };
        let words = match (m.old_closed, &m.close_after_s) {
            (Some(true), Some(after)) => format!(
                "old closed in {}, {}, old Will {}",
                if after.max < 0.001 { "<1 ms".to_string() } else { format!("{:.0} ms", after.max * 1000.0) },
                m.close_how.map_or("-".into(), |h| how_words(h, m.disconnect_reason)),
                if m.will_published == Some(true) { "published" } else { "not published" }
            ),
            (Some(false), _) => "old connection left open".into(),
            _ => m.words(),
        };
        match (words.is_empty(), verdict) {
            (false, _) => format!("{prefix}{words}"),
            (true, Verdict::NotApplicable) => "-".into(),
            (true, _) => shorten(&format!("{prefix}{detail}"), 48),
        }
    }
}

/// `FIN`, `RST`, `DISCONNECT 0x8D`.
fn how_words(how: CloseHow, reason: Option<u8>) -> String {
    match (how, reason) {
        (CloseHow::Disconnect, Some(r)) => format!("DISCONNECT {r:#04X}"),
        (h, _) => h.as_str().to_uppercase(),
    }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// The header lines shared by the terminal and Markdown forms.
fn header(r: &Report) -> Vec<String> {
    let b = &r.broker;
    let mut lines = Vec::new();
    lines.push(if b.embedded {
        format!(
            "broker: embedded {} on {}, started by the probe (pass --broker URL to probe yours)",
            b.implementation.as_deref().unwrap_or("broker"),
            b.address
        )
    } else {
        format!("broker: {}", b.address)
    });
    let mut accepted = if b.protocols.is_empty() { "none".to_string() } else { b.protocols.join(", ") };
    for refused in &b.refused {
        let _ = write!(accepted, "; refused {}: {}", refused.protocol, escaped(&refused.how));
    }
    lines.push(format!("protocols accepted: MQTT {accepted}"));
    if b.protocols.contains(&"5") {
        lines.push(format!(
            "MQTT 5 CONNACK: Server Keep Alive {}, assigned client id {}, reason strings {}",
            b.server_keepalive.map_or("none".to_string(), |s| s.to_string()),
            b.assigned_client_id.as_deref().map_or("none".to_string(), quoted),
            if b.reason_strings.is_empty() {
                "none".to_string()
            } else {
                b.reason_strings.iter().map(|r| quoted(r)).collect::<Vec<_>>().join(", ")
            }
        ));
    }
    lines.push(format!(
        "Keep Alive k = {} s, {} run{} each, waits up to {} s past what the specification allows; a close conforms from 1.5 × k − {} s to 1.5 × k + {} s, a Will up to {} s late",
        r.keepalive,
        r.repeat,
        if r.repeat == 1 { "" } else { "s" },
        r.timeout_s,
        r.tolerance.close_early_s,
        r.tolerance.close_late_s,
        r.tolerance.will_late_s
    ));
    lines
}

/// Peer text in quotes for the header, escaped ([`escaped`]) so that it cannot forge lines or
/// drive the terminal.
fn quoted(s: &str) -> String {
    format!("\"{}\"", escaped(s))
}

fn summary_line(r: &Report) -> String {
    let s = &r.summary;
    format!(
        "{} conforms, {} deviates, {} fails, {} n/a in {:.1} s{}",
        s.conforms,
        s.deviates,
        s.fails,
        s.not_applicable,
        r.duration_s,
        if r.strict { " (--strict: deviates fails the run)" } else { "" }
    )
}

/// The report for a terminal: header, table, each result's detail, the expectations.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    for line in header(r) {
        let _ = writeln!(out, "{line}");
    }
    out.push('\n');
    let heads = ["SCENARIO", "PROTOCOL", "VERDICT", "MEASURED", "EXPECTED"];
    let cells: Vec<[String; 5]> = r
        .results
        .iter()
        .map(|row| {
            [
                row.scenario.to_string(),
                row.protocol.to_string(),
                row.verdict.as_str().to_string(),
                escaped(&row.measured_words()).into_owned(),
                row.expected_short.clone(),
            ]
        })
        .collect();
    let mut widths = heads.map(|h| h.chars().count());
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cols: [&str; 5]| {
        let mut l = String::new();
        for (i, (col, w)) in cols.iter().zip(widths).enumerate() {
            if i == 4 {
                l.push_str(col);
            } else {
                let _ = write!(l, "{col}{}  ", " ".repeat(w - col.chars().count()));
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(heads);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
    let _ = writeln!(out, "\ndetails:");
    for row in &r.results {
        let _ = writeln!(
            out,
            "  {} {}: {} — {}",
            row.scenario,
            row.protocol,
            row.verdict.as_str(),
            escaped(&row.detail)
        );
    }
    let _ = writeln!(out, "\nwhat the specification expects:");
    let mut seen = Vec::new();
    for row in &r.results {
        if !seen.contains(&(row.scenario, &row.expectation)) {
            seen.push((row.scenario, &row.expectation));
            let _ = writeln!(out, "  {} ({}): {}", row.scenario, row.protocol, row.expectation);
        }
    }
    let _ = writeln!(out, "\n{}", summary_line(r));
    out
}

/// The report as Markdown: the same header, one table with the full expectations.
pub fn markdown(r: &Report) -> String {
    let mut out = String::from("# mqtt-chaos probe\n\n");
    for line in header(r) {
        let _ = writeln!(out, "- {line}");
    }
    out.push_str("\n| scenario | protocol | verdict | measured | expectation |\n|---|---|---|---|---|\n");
    let cell = |s: &str| escaped(s).replace('|', "\\|");
    for row in &r.results {
        let _ = writeln!(
            out,
            "| `{}` | {} | **{}** | {} | {} |",
            row.scenario,
            row.protocol,
            row.verdict.as_str(),
            cell(&row.detail),
            cell(&row.expectation)
        );
    }
    let _ = writeln!(out, "\n{}", summary_line(r));
    out
}

/// The report as JUnit XML: one test case per scenario × protocol. `fails` is a failure (and
/// `deviates` with `--strict`), `n/a` is skipped; a deviation that does not fail the run is
/// said in the case's system-out.
pub fn junit(r: &Report) -> String {
    let failing = |v: Verdict| v == Verdict::Fails || (r.strict && v == Verdict::Deviates);
    let failures = r.results.iter().filter(|x| failing(x.verdict)).count();
    let skipped = r.results.iter().filter(|x| x.verdict == Verdict::NotApplicable).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let suite = format!("mqtt-chaos probe {}", r.broker.address);
    let _ = writeln!(
        out,
        "<testsuites name=\"mqtt-chaos probe\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\">",
        r.results.len(),
        r.duration_s
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\">",
        xml(&suite),
        r.results.len(),
        r.duration_s
    );
    for row in &r.results {
        let _ = write!(
            out,
            "    <testcase classname=\"mqtt-chaos.probe.{}\" name=\"{} (MQTT {})\" time=\"{:.3}\"",
            xml(row.scenario),
            xml(row.scenario),
            row.protocol,
            row.measured.close_after_s.map_or(0.0, |s| s.max)
        );
        let body = match row.verdict {
            v if failing(v) => format!(
                "      <failure type=\"{}\" message=\"{}\">expected: {}</failure>\n",
                v.as_str(),
                xml(&row.detail),
                xml(&row.expectation)
            ),
            Verdict::NotApplicable => format!("      <skipped message=\"{}\"/>\n", xml(&row.detail)),
            v => format!("      <system-out>{}: {}</system-out>\n", v.as_str(), xml(&row.detail)),
        };
        let _ = write!(out, ">\n{body}    </testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// Escapes text for an XML attribute or element.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A report file asked for (`--json`, `--junit`, `--markdown`): checked before the probe starts,
/// written only once there is a report. A probe that ends without one (exit 2) leaves no file
/// behind, and an existing regular file is never left half-written: the report goes to a
/// temporary file beside it, renamed over it. Anything else that exists (`/dev/stdout`, a pipe,
/// a terminal) is written as it is.
#[derive(Debug)]
pub struct OutputFile {
    /// Where the report goes (an existing path's symbolic links resolved).
    target: PathBuf,
    /// Written in place: the target exists and is no regular file.
    in_place: bool,
}

impl OutputFile {
    /// Checks that `path` can be written — its directory takes a new file, an existing file
    /// opens for writing — and creates nothing that stays.
    pub fn check(path: &Path) -> std::io::Result<OutputFile> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(std::io::Error::other("is a directory")),
            Ok(m) if !m.is_file() => {
                std::fs::OpenOptions::new().write(true).open(path)?;
                Ok(OutputFile { target: path.to_path_buf(), in_place: true })
            }
            Ok(_) => {
                let target = std::fs::canonicalize(path)?;
                std::fs::OpenOptions::new().append(true).open(&target)?;
                OutputFile { target, in_place: false }.temp_works()
            }
            Err(_) => OutputFile { target: path.to_path_buf(), in_place: false }.temp_works(),
        }
    }

    fn temp_works(self) -> std::io::Result<OutputFile> {
        std::fs::OpenOptions::new().write(true).create_new(true).open(self.temp())?;
        std::fs::remove_file(self.temp())?;
        Ok(self)
    }

    /// Writes `content` whole: to the temporary file, then renamed over the target (or straight
    /// to a target that is no regular file).
    pub fn write(&self, content: &str) -> std::io::Result<()> {
        if self.in_place {
            return std::fs::OpenOptions::new()
                .write(true)
                .open(&self.target)
                .and_then(|mut f| std::io::Write::write_all(&mut f, content.as_bytes()));
        }
        let temp = self.temp();
        // A file written over keeps its permissions.
        let keep = std::fs::metadata(&self.target).map(|m| m.permissions());
        let written = std::fs::write(&temp, content)
            .and_then(|()| keep.map_or(Ok(()), |p| std::fs::set_permissions(&temp, p)))
            .and_then(|()| std::fs::rename(&temp, &self.target));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    }

    /// `.NAME.PID.tmp` beside the target.
    fn temp(&self) -> PathBuf {
        let name = self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.target.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    }
}

/// The report as JSON (schema 1, PROBE.md), pretty-printed.
pub fn json(r: &Report) -> String {
    let mut s = serde_json::to_string_pretty(r).expect("a report serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_to_something_that_is_no_regular_file_is_written_in_place() {
        // /dev/null stands for /dev/stdout, a pipe or a terminal: never replaced by a file.
        let out = OutputFile::check(Path::new("/dev/null")).unwrap();
        out.write("{}").unwrap();
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file(), "/dev/null is still a device");
        let dir = tempfile::tempdir().unwrap();
        assert!(OutputFile::check(dir.path()).is_err(), "a directory is refused");
    }

    fn run(case: &'static str, verdict: Verdict, close: Option<f64>) -> CaseRun {
        let mut r = CaseRun::new(case, Judged::new(verdict, format!("{case} {verdict:?}")));
        r.measured.close_after_s = close;
        r.measured.ratio = close.map(|c| c / 2.0);
        r.measured.close_how = close.map(|_| CloseHow::Fin);
        r
    }

    #[test]
    fn runs_add_up_to_the_worst_verdict_and_min_median_max() {
        let tol = Tolerance::default();
        let runs = vec![
            vec![run("", Verdict::Conforms, Some(3.0))],
            vec![run("", Verdict::Deviates, Some(8.0))],
            vec![run("", Verdict::Conforms, Some(3.5))],
        ];
        let row = row(Scenario::Keepalive, Protocol::V311, 2, &tol, &runs);
        assert_eq!(row.verdict, Verdict::Deviates);
        assert!(row.detail.ends_with("(1 of 3 runs)"), "{}", row.detail);
        assert_eq!(row.measured.close_after_s, Some(Stats { min: 3.0, median: 3.5, max: 8.0 }));
        assert_eq!(row.measured.ratio.unwrap().median, 1.75);
        assert_eq!(row.runs, 3);
        assert!(row.cases.is_empty());
    }

    #[test]
    fn a_scenario_with_cases_reports_each_and_its_main_case_on_top() {
        let tol = Tolerance::default();
        let runs =
            vec![vec![run("clean", Verdict::Conforms, Some(0.001)), run("persistent", Verdict::Fails, None)]];
        let row = row(Scenario::Takeover, Protocol::V5, 2, &tol, &runs);
        assert_eq!(row.verdict, Verdict::Fails);
        assert_eq!(row.cases.len(), 2);
        assert_eq!(row.measured.close_after_s.unwrap().max, 0.001, "the clean case is the main one");
        assert!(
            row.detail.starts_with("clean: ") && row.detail.contains(" | persistent: "),
            "{}",
            row.detail
        );
    }

    #[test]
    fn a_report_file_is_checked_first_and_written_whole_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let out = OutputFile::check(&path).unwrap();
        let listing = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(listing(), 0, "checking creates nothing that stays");
        out.write("{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        assert_eq!(listing(), 1, "no temporary file left");
        assert!(OutputFile::check(dir.path()).unwrap_err().to_string().contains("is a directory"));
        assert!(OutputFile::check(&dir.path().join("missing/r.json")).is_err());
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(xml("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot; ");
    }
}
