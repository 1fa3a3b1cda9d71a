//! Profiles that reload: the `--profile` file is watched, and a change is validated and applied
//! atomically, the way `PUT /profile` applies a profile (its rules replace every global rule in
//! force through [`RuleBook::replace`]; connections' own rules stay).
//!
//! **What is watched.** `--profile FILE`: that path. `--profile NAME`: `--profiles-dir/NAME.toml`,
//! the file the name resolves to first — also when the name was found built in at start, so a
//! file of that name that appears later overrides the built-in profile, as it would at start.
//! Nothing else in the directory is watched: `GET /profiles` and `PUT /profile {"name"}` read it
//! afresh at each request.
//!
//! **How.** A thread of its own (a big profile's parse never delays the forwarding) polls every
//! `--profile-reload` (default 500 ms): one `stat` of the path, symlinks followed. Only when the
//! file it resolves to differs — device, inode, size, mtime, ctime, mode — is it read (at most
//! [`MAX_FILE`] bytes) and hashed ([`content_hash`]); only content whose hash differs from the
//! profile in force is parsed. A file modified within [`RACY`] of the read is read again at
//! the next poll even if its `stat` stays the same (a write within the file system's timestamp
//! granularity could otherwise go unseen). Polling, not inotify: Kubernetes updates a mounted
//! ConfigMap by swapping the `..data` symlink of the directory, an editor saves by writing a new
//! file and renaming it over the old one, a file may be deleted and created again; a poll sees
//! each as a new target at the same path, with no watch to re-arm.
//!
//! **Bad edits.** Whatever goes wrong, the rules in force stay. Each distinct problem is logged
//! once (not at every poll) and counted in `mqtt_chaos_profile_reloads_total{result}`
//! ([`ReloadResult`]); the line that applies a good version after a problem says what it recovered
//! from. Content that does not parse is reported only if it is still the same at the next poll:
//! a file overwritten in place may be read half-written, and the complete file a poll later is
//! then applied without any error having been reported.

use crate::config::{ConfigError, ConfigErrors};
use crate::fault::profile::{self, Profile, Source, content_hash, hash_hex};
use crate::fault::{RuleBook, RuleSet};
use crate::metrics::Metrics;
use crate::record::{Event, Registry};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// The shortest interval `--profile-reload` accepts (other than 0, off).
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// A file bigger than this is refused unread (a profile of 30,000 rules is about 2 MB).
pub const MAX_FILE: u64 = 16 * 1024 * 1024;

/// A file modified less than this before it was read is read again at the next poll.
pub const RACY: Duration = Duration::from_secs(2);

/// What came of a change of the watched file: the `result` label of
/// `mqtt_chaos_profile_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// A new valid version: its rules replaced the global rules in force.
    Applied,
    /// New content that is not a valid profile (TOML, schema, names; or not UTF-8, or over
    /// [`MAX_FILE`]), still the same one poll later: the rules in force stay.
    Invalid,
    /// The path exists but cannot be read: permissions, a directory or another non-file.
    Unreadable,
    /// The path (or the target of its symlinks) does not exist.
    Missing,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 4] =
        [ReloadResult::Applied, ReloadResult::Invalid, ReloadResult::Unreadable, ReloadResult::Missing];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Invalid => "invalid",
            ReloadResult::Unreadable => "unreadable",
            ReloadResult::Missing => "missing",
        }
    }
}

/// The file `--profile NAME|FILE` is watched at: the file it was loaded from, or for a name
/// found built in, `DIR/NAME.toml` (the file that would override it).
pub fn watched_path(name_or_file: &str, source: &Source, dir: &Path) -> PathBuf {
    match source {
        Source::File(path) => path.clone(),
        Source::BuiltIn => dir.join(format!("{name_or_file}.toml")),
    }
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mode: u32,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

impl Stamp {
    #[cfg(unix)]
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mode: m.mode(),
            mtime: m.modified().ok(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    #[cfg(not(unix))]
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { dev: 0, ino: 0, len: m.len(), mode: 0, mtime: m.modified().ok(), ctime: (0, 0) }
    }
}

/// What a poll found that needs doing.
#[derive(Debug)]
pub enum Found {
    /// A new valid version, to apply. `previous` names the rules the file brought before;
    /// `recovered_from` is the problem reported before it, if any.
    Apply { profile: Profile, previous: Vec<String>, recovered_from: Option<String> },
    /// A problem not reported yet: to log once and count.
    Problem { result: ReloadResult, message: String },
    /// After a reported problem, the file holds the profile in force again: nothing to apply.
    Recovered { from: String },
}

/// The watch of one profile file: what is in force from it and what was reported. Polled by
/// [`spawn`]'s thread; the file system is its only input (tests poll it directly).
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    /// Hash of the profile text in force from this path (or the built-in one at start).
    applied: Option<u64>,
    /// The rule names of that profile.
    applied_rules: Vec<String>,
    /// The version last read and dealt with, and whether it was modified too recently to be
    /// trusted unread next time.
    known: Option<(Stamp, bool)>,
    /// Invalid content seen once, reported if it is still there at the next poll.
    pending_invalid: Option<u64>,
    /// Invalid content reported.
    reported_invalid: Option<u64>,
    /// The problem last reported.
    trouble: Option<(ReloadResult, String)>,
    /// The profile in force is built in and no file has been seen yet: its absence is no news.
    expected_absent: bool,
}

impl Watcher {
    /// Watches `path` for versions other than `in_force`, the profile active at start;
    /// `from_path` says whether it was loaded from `path` (else its absence is expected).
    pub fn new(path: PathBuf, in_force: &Profile, from_path: bool) -> Watcher {
        Watcher {
            applied: in_force.hash,
            applied_rules: in_force.rules.iter().map(|r| r.name().to_string()).collect(),
            known: None,
            pending_invalid: None,
            reported_invalid: None,
            trouble: None,
            expected_absent: !from_path,
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rule names of the profile last applied from the file (or in force at start).
    pub fn applied_rules(&self) -> &[String] {
        &self.applied_rules
    }

    /// Looks at the file once; `now` is the time of the look.
    pub fn poll(&mut self, now: SystemTime) -> Option<Found> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.problem(ReloadResult::Missing, missing(&self.path));
            }
            Err(e) => return self.problem(ReloadResult::Unreadable, format!("{}: {e}", self.path.display())),
        };
        if meta.is_dir() {
            return self.problem(
                ReloadResult::Unreadable,
                format!("{}: is a directory, not a profile file", self.path.display()),
            );
        }
        if !meta.is_file() {
            // A FIFO or a device: reading could block the watch for ever.
            return self
                .problem(ReloadResult::Unreadable, format!("{}: not a regular file", self.path.display()));
        }
        if self.known.is_some_and(|(stamp, racy)| !racy && stamp == Stamp::of(&meta)) {
            return None;
        }
        let (stamp, bytes) = match read(&self.path) {
            Ok(read) => read,
            Err(Unread::Missing) => return self.problem(ReloadResult::Missing, missing(&self.path)),
            Err(Unread::Unreadable(message)) => return self.problem(ReloadResult::Unreadable, message),
            Err(Unread::TooBig(stamp, len)) => {
                let message = format!(
                    "{}: {len} bytes, over the {} MiB a profile file may have",
                    self.path.display(),
                    MAX_FILE >> 20
                );
                return self.invalid(stamp, content_hash(message.as_bytes()), false, message);
            }
        };
        self.expected_absent = false;
        // A write within the timestamp granularity after this read would leave the stamp as is.
        // (A modification time in the future, a skewed clock, is not taken as racy: it would
        // have the file read and hashed again at every look.)
        let racy = stamp.mtime.is_none_or(|m| now.duration_since(m).is_ok_and(|age| age < RACY));
        let hash = content_hash(&bytes);
        if Some(hash) == self.applied {
            self.known = Some((stamp, racy));
            self.pending_invalid = None;
            self.reported_invalid = None;
            return self.trouble.take().map(|(_, from)| Found::Recovered { from });
        }
        let file = self.path.display().to_string();
        let parsed = match String::from_utf8(bytes) {
            Ok(text) => profile::parse_profile(&file, &text),
            Err(e) => Err(not_utf8(&file, e.as_bytes(), e.utf8_error().valid_up_to()).into()),
        };
        match parsed {
            Ok(profile) => {
                self.applied = Some(hash);
                let names = profile.rules.iter().map(|r| r.name().to_string()).collect();
                let previous = std::mem::replace(&mut self.applied_rules, names);
                self.known = Some((stamp, racy));
                self.pending_invalid = None;
                self.reported_invalid = None;
                let recovered_from = self.trouble.take().map(|(_, m)| m);
                Some(Found::Apply { profile, previous, recovered_from })
            }
            Err(errors) => self.invalid(stamp, hash, racy, errors_line(&errors)),
        }
    }

    /// Content that is not a valid profile: reported once it is seen a second time in a row.
    fn invalid(&mut self, stamp: Stamp, hash: u64, racy: bool, message: String) -> Option<Found> {
        if self.reported_invalid == Some(hash) {
            self.known = Some((stamp, racy));
            return None;
        }
        if self.pending_invalid != Some(hash) {
            // Perhaps half-written: look again at the next poll.
            self.pending_invalid = Some(hash);
            return None;
        }
        self.pending_invalid = None;
        self.reported_invalid = Some(hash);
        self.known = Some((stamp, racy));
        self.trouble = Some((ReloadResult::Invalid, message.clone()));
        Some(Found::Problem { result: ReloadResult::Invalid, message })
    }

    /// The file cannot be read: reported if it is not the problem reported last.
    fn problem(&mut self, result: ReloadResult, message: String) -> Option<Found> {
        // Whatever comes next is read afresh, even content seen before.
        self.known = None;
        self.pending_invalid = None;
        self.reported_invalid = None;
        if result == ReloadResult::Missing && self.expected_absent {
            return None;
        }
        if self.trouble.as_ref().is_some_and(|(r, m)| *r == result && *m == message) {
            return None;
        }
        self.trouble = Some((result, message.clone()));
        Some(Found::Problem { result, message })
    }
}

fn missing(path: &Path) -> String {
    format!("{}: no such file", path.display())
}

/// Every error of a file on one line: the first with its `file:line:col`, then the others.
fn errors_line(errors: &ConfigErrors) -> String {
    errors.errors().iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The error for text that is not UTF-8, at the first bad byte.
fn not_utf8(file: &str, bytes: &[u8], at: usize) -> ConfigError {
    let before = &bytes[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    ConfigError { file: file.to_string(), line, col, message: "not UTF-8 text".into() }
}

enum Unread {
    Missing,
    Unreadable(String),
    TooBig(Stamp, u64),
}

/// The file's content and the stamp of the very file read (it may have been replaced since the
/// `stat` of the path).
fn read(path: &Path) -> Result<(Stamp, Vec<u8>), Unread> {
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Unread::Missing,
        _ => Unread::Unreadable(format!("{}: cannot read: {e}", path.display())),
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    let stamp = Stamp::of(&meta);
    if meta.len() > MAX_FILE {
        return Err(Unread::TooBig(stamp, meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(failed)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(Unread::TooBig(stamp, bytes.len() as u64));
    }
    Ok((stamp, bytes))
}

/// What a watch changes: the rules, the metrics, the events.
pub struct Targets {
    pub rules: Arc<RuleBook>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
}

/// The running watch; stopping it (or dropping it) ends its thread.
pub struct Watching {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watching {
    /// Ends the watch and waits for its thread (at most one poll in progress).
    pub fn stop(mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// Polls `watcher` every `every` on a thread of its own and applies what it finds to `targets`.
pub fn spawn(mut watcher: Watcher, every: Duration, targets: Targets) -> std::io::Result<Watching> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new().name("mqtt-chaos-profile".into()).spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
            if let Some(found) = watcher.poll(SystemTime::now()) {
                act(&watcher, found, &targets);
            }
        }
    })?;
    Ok(Watching { stop: Some(stop), thread: Some(thread) })
}

/// Carries out what a poll found: apply, or log (and count) a problem or a recovery.
fn act(watcher: &Watcher, found: Found, t: &Targets) {
    let file = watcher.path().display();
    match found {
        Found::Apply { profile, previous, recovered_from } => {
            let set: RuleSet = profile.rule_set();
            let hash = profile.hash.map(hash_hex).unwrap_or_default();
            let old = t.rules.replace(set);
            // Rules in force that the file did not bring: added through the API (`ctl add`),
            // or a profile activated through it. The reload replaces them, as PUT /profile does.
            let others: Vec<&str> =
                old.rules.iter().map(|r| r.name()).filter(|n| !previous.iter().any(|p| p == n)).collect();
            let (name, n) = (profile.spec.name.as_str(), profile.rules.len());
            let recovered = recovered_from.unwrap_or_default();
            tracing::info!(
                file = %file,
                profile = %name,
                hash = %hash,
                rules = n,
                replaced = old.rules.len(),
                replaced_not_from_file = %others.join(", "),
                recovered_from = %recovered,
                "profile file changed: reloaded; its rules replace every global rule in force, as PUT /profile \
                 does (rules added through the API included; connections' own rules stay)"
            );
            t.metrics.on_profile_reload(ReloadResult::Applied);
            let change = format!("profile {name:?} reloaded from {file} ({n} rules)");
            t.registry.emit(Event::Rules { change });
        }
        Found::Problem { result, message } => {
            let advice = match result {
                ReloadResult::Invalid => {
                    "the profile file changed but is not valid: the rules in force stay (`mqtt-chaos check FILE` \
                     lists every error)"
                }
                ReloadResult::Missing => {
                    "the profile file is gone: the rules in force stay; it is applied again when it is back"
                }
                _ => "the profile file cannot be read: the rules in force stay",
            };
            tracing::warn!(file = %file, result = result.as_str(), error = %message, "{advice}");
            t.metrics.on_profile_reload(result);
        }
        Found::Recovered { from } => {
            tracing::info!(file = %file, recovered_from = %from,
                "the profile file is back and holds the profile in force: nothing to reload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "name = \"v1\"\n[[rules]]\nname = \"a\"\naction = \"drop\"\npackets = [\"PINGREQ\"]\n";
    const V2: &str = "name = \"v2\"\n[[rules]]\nname = \"b\"\naction = \"drop\"\npackets = [\"PINGRESP\"]\n";
    const BAD: &str = "name = \"v3\"\n[[rules]]\nname = \"c\"\naction = \"drop\"\npackets = [\"PING\"]\n";

    fn start(dir: &Path, text: &str) -> Watcher {
        let path = dir.join("p.toml");
        std::fs::write(&path, text).unwrap();
        let p = profile::load_profile(&path).unwrap();
        Watcher::new(path, &p, true)
    }

    fn poll(w: &mut Watcher) -> Option<Found> {
        w.poll(SystemTime::now())
    }

    fn applied(found: Option<Found>) -> (String, Option<String>) {
        match found {
            Some(Found::Apply { profile, recovered_from, .. }) => (profile.spec.name, recovered_from),
            other => panic!("expected a profile to apply, got {other:?}"),
        }
    }

    fn problem(found: Option<Found>) -> (ReloadResult, String) {
        match found {
            Some(Found::Problem { result, message }) => (result, message),
            other => panic!("expected a problem, got {other:?}"),
        }
    }

    #[test]
    fn the_file_in_force_is_left_alone_and_a_new_version_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        assert!(poll(&mut w).is_none());
        std::fs::write(w.path(), V2).unwrap();
        assert_eq!(applied(poll(&mut w)), ("v2".into(), None));
        assert_eq!(w.applied_rules(), ["b"]);
        assert!(poll(&mut w).is_none(), "the same version is not applied twice");
        // Touched, or rewritten with the same bytes: nothing to apply.
        std::fs::write(w.path(), V2).unwrap();
        assert!(poll(&mut w).is_none());
    }

    #[test]
    fn a_half_written_file_completed_by_the_next_poll_is_applied_without_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        std::fs::write(w.path(), &V2[..V2.len() - 8]).unwrap();
        assert!(poll(&mut w).is_none(), "invalid content is not reported at first sight");
        std::fs::write(w.path(), V2).unwrap();
        assert_eq!(applied(poll(&mut w)), ("v2".into(), None), "no problem was reported");
    }

    #[test]
    fn an_invalid_version_is_reported_once_with_file_line_col_and_the_recovery_says_from_what() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        std::fs::write(w.path(), BAD).unwrap();
        assert!(poll(&mut w).is_none());
        let (result, message) = problem(poll(&mut w));
        assert_eq!(result, ReloadResult::Invalid);
        let at = format!("{}:5:12: unknown packet type \"PING\"", w.path().display());
        assert!(message.starts_with(&at), "{message}");
        for _ in 0..3 {
            assert!(poll(&mut w).is_none(), "reported once, not at every poll");
        }
        std::fs::write(w.path(), V2).unwrap();
        let (name, from) = applied(poll(&mut w));
        assert_eq!(name, "v2");
        assert_eq!(from.as_deref(), Some(message.as_str()));
    }

    #[test]
    fn a_deleted_file_is_reported_once_and_its_return_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        std::fs::remove_file(w.path()).unwrap();
        let (result, message) = problem(poll(&mut w));
        assert_eq!(result, ReloadResult::Missing);
        assert!(message.ends_with("p.toml: no such file"), "{message}");
        assert!(poll(&mut w).is_none() && poll(&mut w).is_none());
        // Back unchanged: a note, nothing to apply.
        std::fs::write(w.path(), V1).unwrap();
        assert!(matches!(poll(&mut w), Some(Found::Recovered { .. })));
        std::fs::remove_file(w.path()).unwrap();
        assert_eq!(problem(poll(&mut w)).0, ReloadResult::Missing, "a second disappearance is news");
        std::fs::write(w.path(), V2).unwrap();
        assert_eq!(applied(poll(&mut w)).0, "v2");
    }

    #[test]
    fn a_directory_in_place_of_the_file_is_unreadable_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        std::fs::remove_file(w.path()).unwrap();
        std::fs::create_dir(w.path()).unwrap();
        let (result, message) = problem(poll(&mut w));
        assert_eq!(result, ReloadResult::Unreadable);
        assert!(message.ends_with("is a directory, not a profile file"), "{message}");
        assert!(poll(&mut w).is_none());
    }

    #[test]
    fn content_that_is_not_utf8_is_invalid_at_its_first_bad_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = start(dir.path(), V1);
        std::fs::write(w.path(), b"name = \"v1\"\n# caf\xe9\n").unwrap();
        assert!(poll(&mut w).is_none());
        let (result, message) = problem(poll(&mut w));
        assert_eq!(result, ReloadResult::Invalid);
        assert!(message.ends_with("p.toml:2:6: not UTF-8 text"), "{message}");
    }

    #[test]
    fn a_name_found_built_in_watches_the_file_that_would_override_it_and_expects_it_absent() {
        let dir = tempfile::tempdir().unwrap();
        let (source, p) = profile::find("drop-pingreq", dir.path()).unwrap();
        let path = watched_path("drop-pingreq", &source, dir.path());
        assert_eq!(path, dir.path().join("drop-pingreq.toml"));
        let mut w = Watcher::new(path, &p, false);
        assert!(poll(&mut w).is_none(), "its absence is not news");
        std::fs::write(w.path(), V2).unwrap();
        assert_eq!(applied(poll(&mut w)), ("v2".into(), None), "the file overrides the built-in profile");
        std::fs::remove_file(w.path()).unwrap();
        assert_eq!(problem(poll(&mut w)).0, ReloadResult::Missing, "once seen, its absence is news");
    }
}
