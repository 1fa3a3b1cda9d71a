//! Deciding what the active rules do to one connection: pure code, driven by the pumps.
//!
//! A [`RuleSet`] is immutable. The one [`RuleBook`] owns the rule set in force: every change
//! (add, remove, replace) is made atomically inside `watch::Sender::send_if_modified`, so two
//! concurrent changes never lose one another, and publishes a new set with the next version.
//!
//! Each connection's [`ConnFaults`] keeps state only for the rules that *apply* to it (match its
//! route, client id, username and protocol, and won the per-connection probability roll), so
//! rules for other devices cost it nothing: no memory, no time per packet. When a new set is
//! published, a connection catches up from the set's short history of changes (an added or a
//! removed rule is one step, whatever the number of rules); only a replaced set (a profile, a
//! reset) or a connection that fell too far behind matches every rule again, through an index
//! of exact client ids.
//!
//! Time windows: a rule acts on a connection from `max(CONNECT seen, rule activated) + after`
//! for `duration` (or until the connection ends). Nothing acts before the CONNECT is seen,
//! because matching needs the client id, username and protocol. Random decisions come from a
//! per-(rule, client id) stream seeded from the profile's `seed`, so a seeded profile makes the
//! same decisions for the same device every run.

use super::rule::{Action, ActionKind, CloseMode, ConnFacts, Rule, SideSpec};
use crate::codec::PacketType;
use crate::vocab::Direction;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How many recent changes a rule set remembers for connections to catch up with (copied with
/// each change: 256 entries cost a few microseconds).
const HISTORY: usize = 256;

/// One change from the previous version of the rule set.
#[derive(Debug, Clone)]
pub enum Change {
    Added(Arc<Rule>),
    Removed(Arc<Rule>),
}

/// The rules in force, as one immutable value.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// The profile they came from, if any.
    pub profile: Option<String>,
    /// The hash of that profile's text ([`crate::fault::profile::content_hash`]), if it came
    /// from text (a file, a built-in profile, a `PUT /profile` body); kept while rules are added
    /// or removed.
    pub profile_hash: Option<u64>,
    /// Seed of every random decision; random when the profile gave none.
    pub seed: u64,
    pub rules: Vec<Arc<Rule>>,
    /// Increases by one with every change the [`RuleBook`] publishes.
    pub version: u64,
    /// The changes that led to this version, oldest first, each with the version it made
    /// (consecutive, ending at `version`); empty after a replacement.
    changes: Arc<Vec<(u64, Change)>>,
    /// Built the first time a connection needs to match every rule.
    index: OnceLock<ClientIdIndex>,
}

/// Rules by the client id they match: exact ids in a map, patterns and "any" in a list.
#[derive(Debug, Default)]
struct ClientIdIndex {
    exact: HashMap<String, Vec<usize>>,
    others: Vec<usize>,
}

impl RuleSet {
    pub fn new(profile: Option<String>, seed: Option<u64>, rules: Vec<Arc<Rule>>) -> RuleSet {
        let seed = seed.unwrap_or_else(|| RandomState::new().hash_one(Instant::now()));
        RuleSet { profile, seed, rules, ..RuleSet::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| r.name() == name)
    }

    /// The rules that may match a connection with this client id, in rule-set order.
    fn candidates(&self, client_id: &str) -> impl Iterator<Item = usize> + '_ {
        let index = self.index.get_or_init(|| {
            let mut index = ClientIdIndex::default();
            for (i, r) in self.rules.iter().enumerate() {
                match &r.matcher.client_id {
                    Some(id) if !id.contains(['*', '?']) => {
                        index.exact.entry(id.clone()).or_default().push(i)
                    }
                    _ => index.others.push(i),
                }
            }
            index
        });
        let exact = index.exact.get(client_id).map_or(&[][..], Vec::as_slice);
        merge_sorted(&index.others, exact)
    }

    /// The changes from `version` to this set, if it still remembers all of them.
    fn changes_since(&self, version: u64) -> Option<&[(u64, Change)]> {
        if version == self.version {
            return Some(&[]);
        }
        let first = self.changes.iter().position(|(v, _)| *v == version + 1)?;
        Some(&self.changes[first..])
    }

    /// The next version: `rules` changed by `change`.
    fn with_change(&self, rules: Vec<Arc<Rule>>, change: Change) -> RuleSet {
        let version = self.version + 1;
        let skip = self.changes.len().saturating_sub(HISTORY - 1);
        let mut changes: Vec<_> = self.changes[skip..].to_vec();
        changes.push((version, change));
        RuleSet {
            profile: self.profile.clone(),
            profile_hash: self.profile_hash,
            seed: self.seed,
            rules,
            version,
            changes: Arc::new(changes),
            index: OnceLock::new(),
        }
    }
}

/// The union of two ascending lists, ascending (each index is in one list only).
fn merge_sorted<'a>(mut a: &'a [usize], mut b: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    std::iter::from_fn(move || {
        let (next, rest) = match (a.first(), b.first()) {
            (Some(x), Some(y)) if y < x => (*y, &mut b),
            (Some(x), _) => (*x, &mut a),
            (None, Some(y)) => (*y, &mut b),
            (None, None) => return None,
        };
        *rest = &rest[1..];
        Some(next)
    })
}

/// Where the active rule set is published.
pub type RulesRx = watch::Receiver<Arc<RuleSet>>;

/// Which live connections a rule change may affect *now*, without a packet: those in a mode
/// (black hole, freeze, half-close) or with a connection action (close, disconnect) that the
/// change starts or ends. Per-packet rules act at the next packet, so they wake nobody.
#[derive(Debug, Clone, Copy)]
pub enum Affected<'a> {
    /// A replaced set (a profile, a reset).
    All,
    /// Connections this added or removed rule may match.
    MatchedBy(&'a Rule),
}

/// Called after each change, to wake the connections it affects.
pub type Waker = Box<dyn Fn(Affected<'_>) + Send + Sync>;

/// The one owner of the rule set in force: every change is atomic (concurrent admin requests
/// are applied in some serial order, none lost) and published to every connection. Connections
/// pick a change up at their next packet boundary; the `waker` wakes the ones it affects at once.
pub struct RuleBook {
    tx: watch::Sender<Arc<RuleSet>>,
    waker: Option<Waker>,
}

impl Default for RuleBook {
    fn default() -> Self {
        RuleBook { tx: watch::channel(Arc::new(RuleSet::new(None, None, Vec::new()))).0, waker: None }
    }
}

impl RuleBook {
    /// A book that calls `waker` after every change.
    pub fn with_waker(waker: Waker) -> RuleBook {
        RuleBook { waker: Some(waker), ..RuleBook::default() }
    }

    fn wake(&self, affected: Affected<'_>) {
        let time_driven = match affected {
            Affected::All => true,
            Affected::MatchedBy(rule) => rule.kind().is_time_driven(),
        };
        if let (Some(waker), true) = (&self.waker, time_driven) {
            waker(affected);
        }
    }

    /// The rule set in force.
    pub fn current(&self) -> Arc<RuleSet> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> RulesRx {
        self.tx.subscribe()
    }

    /// Adds a rule after the others; fails with the rule back if one of that name is in force.
    pub fn add(&self, rule: Arc<Rule>) -> Result<Arc<RuleSet>, Arc<Rule>> {
        let mut outcome = Err(rule.clone());
        self.tx.send_if_modified(|set| {
            if set.get(rule.name()).is_some() {
                return false;
            }
            let mut rules = Vec::with_capacity(set.rules.len() + 1);
            rules.extend(set.rules.iter().cloned());
            rules.push(rule.clone());
            *set = Arc::new(set.with_change(rules, Change::Added(rule.clone())));
            outcome = Ok(set.clone());
            true
        });
        if outcome.is_ok() {
            self.wake(Affected::MatchedBy(&rule));
        }
        outcome
    }

    /// Removes the rule called `name`; `None` if there is none. Returns the rule and the
    /// version without it.
    pub fn remove(&self, name: &str) -> Option<(Arc<Rule>, u64)> {
        let mut removed = None;
        self.tx.send_if_modified(|set| {
            let Some(i) = set.rules.iter().position(|r| r.name() == name) else { return false };
            let mut rules = set.rules.clone();
            let rule = rules.remove(i);
            *set = Arc::new(set.with_change(rules, Change::Removed(rule.clone())));
            removed = Some((rule, set.version));
            true
        });
        if let Some((rule, _)) = &removed {
            self.wake(Affected::MatchedBy(rule));
        }
        removed
    }

    /// Makes `set` the rules in force (a profile, or none); returns the set it replaced.
    pub fn replace(&self, mut set: RuleSet) -> Arc<RuleSet> {
        let mut old = None;
        self.tx.send_modify(|current| {
            set.version = current.version + 1;
            set.changes = Arc::default();
            old = Some(std::mem::replace(current, Arc::new(std::mem::take(&mut set))));
        });
        self.wake(Affected::All);
        old.expect("send_modify ran the closure")
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop,
    /// Hold it until then (and everything after it in the direction, to keep the order).
    Delay(Instant),
}

/// The state of one direction at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Read and discard, at packet boundaries.
    Blackhole,
    /// Stop reading from the sender (what was read already waits, unforwarded).
    Freeze,
    /// The write half towards the receiver was shut down (`close` with `how = "half"`):
    /// what the sender sends is discarded.
    Shut,
}

/// An action on the whole connection, carried out by the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAction {
    /// Close a side (or both) with FIN or RST; a side left open is held half-open.
    Close { side: SideSpec, how: CloseMode },
    /// Send an MQTT 5 DISCONNECT with this reason to one side or both, then close.
    Disconnect { reason: u8, to: SideSpec },
}

/// The state of one rule that applies to one connection.
struct RuleState {
    rule: Arc<Rule>,
    /// Packets affected so far (for `count`).
    count: u64,
    rng: SplitMix64,
    /// A one-shot action (close, disconnect, a mode's entry) already happened, per direction.
    fired: [bool; 2],
}

/// Identifying facts of the connection, known from the CONNECT.
struct Facts {
    route: String,
    client_id: String,
    username: Option<String>,
    cert_cn: Option<String>,
    protocol: u8,
    connect_at: Instant,
    /// Unique among the connections of the process (numbers a device's connections).
    serial: u64,
}

/// Hands out [`Facts::serial`].
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Facts {
    /// Whether `rule` applies to this connection: its match, its protocol, and for actions on
    /// the whole connection the probability roll (from the rule's own seeded stream).
    fn state_for(&self, rule: &Arc<Rule>, seed: u64) -> Option<RuleState> {
        let c = ConnFacts {
            route: &self.route,
            client_id: &self.client_id,
            username: self.username.as_deref(),
            cert_cn: self.cert_cn.as_deref(),
            protocol: self.protocol,
        };
        let mqtt5_only = matches!(rule.kind(), ActionKind::ServerKeepalive | ActionKind::Disconnect);
        if !rule.matcher.matches(&c) || (mqtt5_only && self.protocol != 5) {
            return None;
        }
        // A random rule draws a new stream for each connection of a device it matches (its
        // first, second, … since the rule became active), the same one in every run with the
        // same seed.
        let nth = if rule.is_random() {
            rule.connection_number(&self.route, &self.client_id, self.serial)
        } else {
            1
        };
        let mut rng = SplitMix64::new(seed, rule.name(), &self.client_id, nth);
        let per_connection = !matches!(rule.kind(), ActionKind::Drop | ActionKind::Delay);
        (!per_connection || rng.chance(rule.probability)).then(|| RuleState {
            rule: rule.clone(),
            count: 0,
            rng,
            fired: [false; 2],
        })
    }
}

/// The fault state of one connection, shared by its two pumps and its session.
pub struct ConnFaults {
    rx: RulesRx,
    set: Arc<RuleSet>,
    /// Rules added for this connection only (admin API), after the global ones.
    local_rx: Option<watch::Receiver<Vec<Arc<Rule>>>>,
    local: Vec<Arc<Rule>>,
    facts: Option<Facts>,
    /// The applicable rules: global ones in rule-set order, then local ones.
    rules: Vec<RuleState>,
    /// How many of `rules` are global.
    globals: usize,
    /// Per direction, the packet types an applicable drop/delay rule may act on: a packet
    /// outside it is forwarded after one bit test.
    packet_masks: [u16; 2],
}

/// A fault that was applied, for counting and logging.
#[derive(Debug, Clone)]
pub struct Applied {
    pub rule: Arc<Rule>,
    pub direction: Option<Direction>,
}

impl ConnFaults {
    pub fn new(mut rx: RulesRx) -> ConnFaults {
        let set = rx.borrow_and_update().clone();
        ConnFaults {
            rx,
            set,
            local_rx: None,
            local: Vec::new(),
            facts: None,
            rules: Vec::new(),
            globals: 0,
            packet_masks: [0; 2],
        }
    }

    /// Also follows rules published for this connection only.
    pub fn with_local(mut self, mut local: watch::Receiver<Vec<Arc<Rule>>>) -> ConnFaults {
        self.local = local.borrow_and_update().clone();
        self.local_rx = Some(local);
        self
    }

    /// No rule applies: the pumps can skip every fault check.
    pub fn is_idle(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many rules apply to this connection (its fault state grows only with these).
    #[cfg(test)]
    fn applicable(&self) -> usize {
        self.rules.len()
    }

    /// Picks up a newly published rule set, keeping the state of rules that remain.
    pub fn refresh(&mut self) {
        let global = self.rx.has_changed().unwrap_or(false);
        let local = self.local_rx.as_ref().is_some_and(|rx| rx.has_changed().unwrap_or(false));
        if !global && !local {
            return;
        }
        if global {
            let set = self.rx.borrow_and_update().clone();
            let seen = std::mem::replace(&mut self.set, set).version;
            self.catch_up(seen);
        }
        if local && let Some(rx) = &mut self.local_rx {
            self.local = rx.borrow_and_update().clone();
            self.rebuild_local();
        }
        self.update_masks();
    }

    /// Learns who the connection is (at CONNECT) and starts the rule clock.
    pub fn on_connect(
        &mut self,
        route: &str,
        client_id: &str,
        username: Option<&str>,
        cert_cn: Option<&str>,
        protocol: u8,
        at: Instant,
    ) {
        self.facts = Some(Facts {
            route: route.to_string(),
            client_id: client_id.to_string(),
            username: username.map(str::to_string),
            cert_cn: cert_cn.map(str::to_string),
            protocol,
            connect_at: at,
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        });
        if let Ok(true) = self.rx.has_changed() {
            self.set = self.rx.borrow_and_update().clone();
        }
        if let Some(rx) = &mut self.local_rx {
            self.local = rx.borrow_and_update().clone();
        }
        self.rebuild_globals();
        self.rebuild_local();
        self.update_masks();
    }

    /// Brings the global rules from version `seen` to the current set: change by change when
    /// the set remembers them, else by matching every rule again.
    fn catch_up(&mut self, seen: u64) {
        let Some(facts) = &self.facts else { return };
        let Some(changes) = self.set.changes_since(seen) else { return self.rebuild_globals() };
        for (_, change) in changes {
            match change {
                Change::Added(rule) => {
                    if let Some(state) = facts.state_for(rule, self.set.seed) {
                        self.rules.insert(self.globals, state);
                        self.globals += 1;
                    }
                }
                Change::Removed(rule) => {
                    if let Some(i) =
                        self.rules[..self.globals].iter().position(|s| Arc::ptr_eq(&s.rule, rule))
                    {
                        self.rules.remove(i);
                        self.globals -= 1;
                    }
                }
            }
        }
    }

    /// Matches every rule of the set again, keeping the state of those that still apply.
    fn rebuild_globals(&mut self) {
        let Some(facts) = &self.facts else { return };
        let locals = self.rules.split_off(self.globals);
        let mut old: HashMap<*const Rule, RuleState> =
            self.rules.drain(..).map(|s| (Arc::as_ptr(&s.rule), s)).collect();
        let set = &self.set;
        for i in set.candidates(&facts.client_id) {
            let rule = &set.rules[i];
            if let Some(state) = old.remove(&Arc::as_ptr(rule)).or_else(|| facts.state_for(rule, set.seed)) {
                self.rules.push(state);
            }
        }
        self.globals = self.rules.len();
        self.rules.extend(locals);
    }

    /// Matches the connection's own rules again, keeping the state of those that remain.
    fn rebuild_local(&mut self) {
        let Some(facts) = &self.facts else { return };
        let mut old = self.rules.split_off(self.globals);
        for rule in &self.local {
            match old.iter().position(|s| Arc::ptr_eq(&s.rule, rule)) {
                Some(i) => self.rules.push(old.swap_remove(i)),
                None => self.rules.extend(facts.state_for(rule, self.set.seed)),
            }
        }
    }

    fn update_masks(&mut self) {
        self.packet_masks = [0; 2];
        for s in self.rules.iter().filter(|s| matches!(s.rule.action, Action::Drop | Action::Delay { .. })) {
            for dir in Direction::BOTH {
                if s.rule.applies_to(dir) {
                    self.packet_masks[dir as usize] |= s.rule.packets;
                }
            }
        }
    }

    /// The window in which `rule` acts on this connection; a start beyond what an `Instant`
    /// can hold is never.
    fn window(facts: &Facts, rule: &Rule) -> Option<(Instant, Option<Instant>)> {
        let start = facts.connect_at.max(rule.activated).checked_add(rule.after)?;
        Some((start, rule.duration.and_then(|d| start.checked_add(d))))
    }

    fn active(&self, rule: &Rule, now: Instant) -> bool {
        let Some(facts) = &self.facts else { return false };
        Self::window(facts, rule).is_some_and(|(start, end)| start <= now && end.is_none_or(|e| now < e))
    }

    /// The verdict for one packet; the rule that decided it, if one did.
    pub fn decide(&mut self, dir: Direction, t: PacketType, now: Instant) -> (Verdict, Option<Applied>) {
        if self.packet_masks[dir as usize] & (1 << t.index()) == 0 {
            return (Verdict::Forward, None);
        }
        for i in 0..self.rules.len() {
            let s = &self.rules[i];
            let r = &s.rule;
            if !matches!(r.action, Action::Drop | Action::Delay { .. })
                || !r.applies_to(dir)
                || !r.applies_to_packet(t)
                || r.count.is_some_and(|c| s.count >= c)
                || !self.active(r, now)
            {
                continue;
            }
            let s = &mut self.rules[i];
            if !s.rng.chance(s.rule.probability) {
                continue;
            }
            s.count += 1;
            let verdict = match s.rule.action {
                Action::Delay { latency, jitter } => {
                    let held = s.rng.jittered(latency, jitter);
                    // Bounded by validation (a year at most); saturate all the same.
                    Verdict::Delay(now.checked_add(held).unwrap_or(now + super::rule::MAX_DURATION))
                }
                _ => Verdict::Drop,
            };
            return (verdict, Some(Applied { rule: s.rule.clone(), direction: Some(dir) }));
        }
        (Verdict::Forward, None)
    }

    /// The mode of a direction now; the first time a mode rule takes effect in a direction it is
    /// also returned as applied.
    pub fn mode(&mut self, dir: Direction, now: Instant) -> (Mode, Option<Applied>) {
        for i in 0..self.rules.len() {
            let s = &self.rules[i];
            let mode = match s.rule.action {
                Action::Blackhole if s.rule.applies_to(dir) => Mode::Blackhole,
                Action::Freeze if s.rule.applies_to(dir) => Mode::Freeze,
                Action::Close { side, how: CloseMode::Half } if towards(side, dir) => Mode::Shut,
                _ => continue,
            };
            if !self.active(&s.rule, now) {
                continue;
            }
            let s = &mut self.rules[i];
            let first = !std::mem::replace(&mut s.fired[dir as usize], true);
            return (mode, first.then(|| Applied { rule: s.rule.clone(), direction: Some(dir) }));
        }
        (Mode::Normal, None)
    }

    /// A connection action whose time has come (each fires once).
    pub fn due_action(&mut self, now: Instant) -> Option<(ConnAction, Applied)> {
        for i in 0..self.rules.len() {
            let s = &self.rules[i];
            let action = match s.rule.action {
                Action::Close { side, how } if how != CloseMode::Half => ConnAction::Close { side, how },
                Action::Disconnect { reason, to } => ConnAction::Disconnect { reason, to },
                _ => continue,
            };
            if s.fired[0] || !self.active(&s.rule, now) {
                continue;
            }
            let s = &mut self.rules[i];
            s.fired[0] = true;
            return Some((action, Applied { rule: s.rule.clone(), direction: None }));
        }
        None
    }

    /// The Keep Alive to forward in the CONNECT instead of `requested`, if a rule says so.
    pub fn rewrite_keepalive(&mut self, requested: u16, now: Instant) -> Option<(u16, Applied)> {
        self.first_active(now, |a| matches!(a, Action::RewriteKeepalive { .. }))
            .map(|r| (r.action.rewrite(requested).unwrap_or(requested), Applied { rule: r, direction: None }))
    }

    /// The Server Keep Alive to announce to an MQTT 5 client, if a rule says so.
    pub fn server_keepalive(&mut self, now: Instant) -> Option<(u16, Applied)> {
        let rule = self.first_active(now, |a| matches!(a, Action::ServerKeepalive { .. }))?;
        let Action::ServerKeepalive { set } = rule.action else { return None };
        Some((set, Applied { rule, direction: None }))
    }

    fn first_active(&self, now: Instant, pick: impl Fn(&Action) -> bool) -> Option<Arc<Rule>> {
        self.rules.iter().find(|s| pick(&s.rule.action) && self.active(&s.rule, now)).map(|s| s.rule.clone())
    }

    /// The next moment a window opens or closes, so time-driven behaviour (modes, connection
    /// actions) can be re-evaluated then.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let facts = self.facts.as_ref()?;
        self.rules
            .iter()
            .filter(|s| !matches!(s.rule.action, Action::Drop | Action::Delay { .. }))
            .filter_map(|s| Self::window(facts, &s.rule))
            .flat_map(|(start, end)| [Some(start), end])
            .flatten()
            .filter(|&t| t > now)
            .min()
    }
}

/// Whether `close` of `side` shuts the writer of `dir` (the direction that writes to that side).
fn towards(side: SideSpec, dir: Direction) -> bool {
    match dir {
        Direction::ClientToBroker => side.broker(),
        Direction::BrokerToClient => side.client(),
    }
}

/// A small, fast, seedable generator (SplitMix64): reproducible decisions, no dependency.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream for one rule on one connection of a device (its `nth` since the rule became
    /// active), derived from the rule set's seed.
    fn new(seed: u64, rule: &str, client_id: &str, nth: u64) -> Self {
        // FNV-1a over the names and the number: stable across runs and Rust versions.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rule.bytes().chain([0xff]).chain(client_id.bytes()).chain([0xff]).chain(nth.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        SplitMix64(seed ^ h)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (always for 1.0, never for 0.0, without drawing for either).
    fn chance(&mut self, p: f64) -> bool {
        p >= 1.0 || (p > 0.0 && self.next_f64() < p)
    }

    /// `base ± jitter`, uniformly, never below zero.
    fn jittered(&mut self, base: Duration, jitter: Duration) -> Duration {
        if jitter.is_zero() {
            return base;
        }
        let offset = (self.next_f64() * 2.0 - 1.0) * jitter.as_secs_f64();
        Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::rule::RuleSpec;

    fn rule(toml_text: &str) -> Arc<Rule> {
        Arc::new(toml::from_str::<RuleSpec>(toml_text).unwrap().compile("r").unwrap())
    }

    fn faults(rules: Vec<Arc<Rule>>, seed: u64) -> (RuleBook, ConnFaults) {
        let book = RuleBook::default();
        book.replace(RuleSet::new(None, Some(seed), rules));
        let f = ConnFaults::new(book.subscribe());
        (book, f)
    }

    fn connect(f: &mut ConnFaults, client_id: &str, protocol: u8) {
        f.on_connect("default", client_id, None, None, protocol, Instant::now());
    }

    const C2B: Direction = Direction::ClientToBroker;
    const B2C: Direction = Direction::BrokerToClient;

    #[tokio::test(start_paused = true)]
    async fn nothing_acts_before_the_connect() {
        let (_tx, mut f) = faults(vec![rule("name = \"d\"\naction = \"drop\"\n")], 1);
        assert_eq!(f.decide(C2B, PacketType::Connect, Instant::now()).0, Verdict::Forward);
        connect(&mut f, "c", 4);
        assert_eq!(f.decide(C2B, PacketType::Connect, Instant::now()).0, Verdict::Drop);
    }

    #[tokio::test(start_paused = true)]
    async fn drop_matches_direction_packet_and_client_id() {
        let r = rule(
            "name = \"d\"\naction = \"drop\"\ndirection = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n\
             match = { client_id = \"sensor-*\" }\n",
        );
        let (_tx, mut f) = faults(vec![r.clone()], 1);
        connect(&mut f, "sensor-1", 4);
        let now = Instant::now();
        assert_eq!(f.decide(C2B, PacketType::Pingreq, now).0, Verdict::Drop);
        assert_eq!(f.decide(C2B, PacketType::Publish, now).0, Verdict::Forward);
        assert_eq!(f.decide(B2C, PacketType::Pingreq, now).0, Verdict::Forward);
        let (_tx, mut other) = faults(vec![r], 1);
        connect(&mut other, "pump-1", 4);
        assert_eq!(other.decide(C2B, PacketType::Pingreq, now).0, Verdict::Forward);
    }

    #[tokio::test(start_paused = true)]
    async fn after_duration_and_count_bound_a_rule() {
        let r = rule("name = \"d\"\naction = \"drop\"\nafter = \"10s\"\nduration = \"5s\"\ncount = 2\n");
        let (_tx, mut f) = faults(vec![r], 1);
        connect(&mut f, "c", 4);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(f.decide(C2B, PacketType::Pingreq, at(9)).0, Verdict::Forward);
        assert_eq!(f.decide(C2B, PacketType::Pingreq, at(10)).0, Verdict::Drop);
        assert_eq!(f.decide(C2B, PacketType::Pingreq, at(11)).0, Verdict::Drop);
        assert_eq!(f.decide(C2B, PacketType::Pingreq, at(12)).0, Verdict::Forward, "count = 2 reached");
        let (_tx, mut g) =
            faults(vec![rule("name = \"d\"\naction = \"drop\"\nafter = \"10s\"\nduration = \"5s\"\n")], 1);
        connect(&mut g, "c", 4);
        assert_eq!(g.decide(C2B, PacketType::Pingreq, at(14)).0, Verdict::Drop);
        assert_eq!(g.decide(C2B, PacketType::Pingreq, at(15)).0, Verdict::Forward, "window over");
        assert_eq!(g.next_change(at(0)), None, "packet rules need no timer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_seeded_probability_is_reproducible_and_close_to_its_rate() {
        let run = |seed| {
            let r = rule("name = \"flaky\"\naction = \"drop\"\nprobability = 0.3\n");
            let (_tx, mut f) = faults(vec![r], seed);
            connect(&mut f, "device", 4);
            (0..1000)
                .map(|_| f.decide(B2C, PacketType::Pingresp, Instant::now()).0 == Verdict::Drop)
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (run(42), run(42), run(43));
        assert_eq!(a, b, "same seed, same decisions");
        assert_ne!(a, c, "another seed, other decisions");
        let dropped = a.iter().filter(|&&d| d).count();
        assert!((250..350).contains(&dropped), "{dropped} of 1000 dropped at p = 0.3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnecting_device_draws_anew_on_each_connection_and_a_seeded_run_repeats() {
        // 40 connections of one device; each records whether its first PINGRESP is dropped
        // (flaky-pingresp) and whether a per-connection reset rule applies (reset-storm).
        let run = |seed| {
            let book = RuleBook::default();
            let rules = vec![
                rule("name = \"flaky\"\naction = \"drop\"\npackets = [\"PINGRESP\"]\nprobability = 0.3\n"),
                rule(
                    "name = \"storm\"\naction = \"close\"\nhow = \"rst\"\nafter = \"1s\"\nprobability = 0.5\n",
                ),
            ];
            book.replace(RuleSet::new(None, Some(seed), rules));
            (0..40)
                .map(|_| {
                    let mut f = ConnFaults::new(book.subscribe());
                    connect(&mut f, "device-7", 4);
                    let dropped = f.decide(B2C, PacketType::Pingresp, Instant::now()).0 == Verdict::Drop;
                    let reset = f.rules.iter().any(|s| s.rule.name() == "storm");
                    (dropped, reset)
                })
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (run(5), run(5), run(6));
        assert_eq!(a, b, "the same seed repeats every connection's decisions");
        assert_ne!(a, c, "another seed decides otherwise");
        let dropped = a.iter().filter(|(d, _)| *d).count();
        let reset = a.iter().filter(|(_, r)| *r).count();
        assert!((4..=22).contains(&dropped), "p = 0.3 over 40 reconnects: {dropped} first PINGRESPs dropped");
        assert!((8..=32).contains(&reset), "p = 0.5 over 40 reconnects: {reset} connections reset");
        // Asking again for the same connection (a rebuild) keeps its number, hence its draw.
        let r = rule("name = \"n\"\naction = \"drop\"\nprobability = 0.5\n");
        assert_eq!(r.connection_number("default", "d", 10), 1);
        assert_eq!(r.connection_number("default", "d", 10), 1);
        assert_eq!(r.connection_number("default", "d", 11), 2);
        assert_eq!(r.connection_number("default", "other", 12), 1);
        // Only devices the rule matches are numbered (the others cost it nothing).
        let victims = rule(
            "name = \"v\"\naction = \"drop\"\nprobability = 0.5\nmatch = { client_id = \"victim-*\" }\n",
        );
        let (_tx, mut f) = faults(vec![victims.clone()], 1);
        connect(&mut f, "bystander", 4);
        assert!(f.rules.is_empty());
        assert_eq!(victims.connection_number("default", "bystander", u64::MAX), 1, "first time asked");
    }

    #[tokio::test(start_paused = true)]
    async fn delay_is_measured_from_receipt_with_bounded_jitter() {
        let r = rule("name = \"slow\"\naction = \"delay\"\nlatency = \"2s\"\njitter = \"500ms\"\n");
        let (_tx, mut f) = faults(vec![r], 7);
        connect(&mut f, "c", 4);
        let now = Instant::now();
        for _ in 0..100 {
            let Verdict::Delay(until) = f.decide(B2C, PacketType::Pingresp, now).0 else { panic!() };
            let d = until - now;
            assert!(d >= Duration::from_millis(1500) && d <= Duration::from_millis(2500), "{d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn modes_open_and_close_with_their_window_and_report_the_first_entry() {
        let r = rule("name = \"p\"\naction = \"blackhole\"\nafter = \"1s\"\nduration = \"3s\"\n");
        let (_tx, mut f) = faults(vec![r], 1);
        connect(&mut f, "c", 4);
        let t0 = Instant::now();
        assert_eq!(f.mode(C2B, t0).0, Mode::Normal);
        assert_eq!(f.next_change(t0), Some(t0 + Duration::from_secs(1)));
        let (mode, applied) = f.mode(C2B, t0 + Duration::from_secs(1));
        assert_eq!((mode, applied.is_some()), (Mode::Blackhole, true));
        assert!(f.mode(C2B, t0 + Duration::from_secs(2)).1.is_none(), "counted once");
        assert!(f.mode(B2C, t0 + Duration::from_secs(2)).1.is_some(), "once per direction");
        assert_eq!(f.next_change(t0 + Duration::from_secs(2)), Some(t0 + Duration::from_secs(4)));
        assert_eq!(f.mode(C2B, t0 + Duration::from_secs(4)).0, Mode::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_close_shuts_the_direction_writing_to_that_side() {
        let r = rule("name = \"h\"\naction = \"close\"\nside = \"client\"\nhow = \"half\"\n");
        let (_tx, mut f) = faults(vec![r], 1);
        connect(&mut f, "c", 4);
        assert_eq!(f.mode(B2C, Instant::now()).0, Mode::Shut);
        assert_eq!(f.mode(C2B, Instant::now()).0, Mode::Normal);
        assert!(f.due_action(Instant::now()).is_none(), "half is not a connection action");
    }

    #[tokio::test(start_paused = true)]
    async fn connection_actions_fire_once_when_due_and_mqtt5_actions_skip_older_protocols() {
        let close = rule("name = \"c\"\naction = \"close\"\nafter = \"5s\"\nhow = \"rst\"\n");
        let disc = rule("name = \"x\"\naction = \"disconnect\"\nreason = 0x8D\n");
        let (_tx, mut f) = faults(vec![close.clone(), disc.clone()], 1);
        connect(&mut f, "c", 4);
        let t0 = Instant::now();
        assert!(f.due_action(t0).is_none(), "disconnect needs MQTT 5; the close is not due yet");
        assert_eq!(f.next_change(t0), Some(t0 + Duration::from_secs(5)));
        let (a, _) = f.due_action(t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(a, ConnAction::Close { side: SideSpec::Both, how: CloseMode::Rst });
        assert!(f.due_action(t0 + Duration::from_secs(6)).is_none());

        let (_tx, mut g) = faults(vec![disc], 1);
        connect(&mut g, "c", 5);
        assert_eq!(
            g.due_action(t0).unwrap().0,
            ConnAction::Disconnect { reason: 0x8d, to: SideSpec::Client }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_swapped_rule_set_applies_to_existing_connections_from_the_swap_on() {
        let (tx, mut f) = faults(vec![], 1);
        connect(&mut f, "c", 4);
        assert!(f.is_idle());
        tokio::time::advance(Duration::from_secs(100)).await;
        // A 3 s partition activated now affects this 100 s old connection now, for 3 s.
        tx.replace(RuleSet::new(
            None,
            Some(1),
            vec![rule("name = \"p\"\naction = \"blackhole\"\nduration = \"3s\"\n")],
        ));
        f.refresh();
        let now = Instant::now();
        assert_eq!(f.mode(C2B, now).0, Mode::Blackhole);
        assert_eq!(f.mode(C2B, now + Duration::from_secs(3)).0, Mode::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn rules_that_match_nobody_leave_every_packet_to_the_fast_path() {
        let inert: Vec<_> = (0..20)
            .map(|i| {
                rule(&format!(
                    "name = \"r{i}\"\naction = \"drop\"\nmatch = {{ client_id = \"nobody-{i}\" }}\n"
                ))
            })
            .collect();
        let only_pingresp = rule(
            "name = \"p\"\naction = \"drop\"\ndirection = \"broker_to_client\"\npackets = [\"PINGRESP\"]\n",
        );
        let (_tx, mut f) = faults([inert, vec![only_pingresp]].concat(), 1);
        connect(&mut f, "device", 4);
        assert_eq!(f.packet_masks, [0, 1 << PacketType::Pingresp.index()]);
        assert_eq!(f.decide(C2B, PacketType::Publish, Instant::now()).0, Verdict::Forward);
        assert_eq!(f.decide(B2C, PacketType::Pingresp, Instant::now()).0, Verdict::Drop);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_rewrites_apply_to_matching_connections() {
        let rw = rule("name = \"k\"\naction = \"rewrite_keepalive\"\nset = 2\nmatch = { protocol = [4] }\n");
        let ska = rule("name = \"s\"\naction = \"server_keepalive\"\nset = 7\n");
        let (_tx, mut f) = faults(vec![rw.clone(), ska.clone()], 1);
        connect(&mut f, "c", 4);
        assert_eq!(f.rewrite_keepalive(60, Instant::now()).map(|a| a.0), Some(2));
        assert!(f.server_keepalive(Instant::now()).is_none(), "not MQTT 5");
        let (_tx, mut g) = faults(vec![rw, ska], 1);
        connect(&mut g, "c", 5);
        assert!(g.rewrite_keepalive(60, Instant::now()).is_none(), "match excludes 5");
        assert_eq!(g.server_keepalive(Instant::now()).map(|a| a.0), Some(7));
    }

    fn for_client(name: &str, client_id: &str) -> Arc<Rule> {
        rule(&format!("name = \"{name}\"\naction = \"drop\"\nmatch = {{ client_id = \"{client_id}\" }}\n"))
    }

    #[test]
    fn the_book_wakes_connections_only_for_changes_that_act_without_a_packet() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let book = RuleBook::with_waker(Box::new(move |a| {
            seen.lock().unwrap().push(match a {
                Affected::All => "all".to_string(),
                Affected::MatchedBy(r) => r.name().to_string(),
            })
        }));
        book.add(rule("name = \"d\"\naction = \"drop\"\n")).unwrap();
        book.add(rule("name = \"l\"\naction = \"delay\"\nlatency = \"1s\"\n")).unwrap();
        book.add(rule("name = \"k\"\naction = \"rewrite_keepalive\"\nset = 5\n")).unwrap();
        assert!(calls.lock().unwrap().is_empty(), "per-packet rules act at the next packet");
        book.add(rule("name = \"b\"\naction = \"blackhole\"\n")).unwrap();
        book.add(rule("name = \"c\"\naction = \"close\"\nafter = \"5s\"\n")).unwrap();
        book.remove("b").unwrap();
        book.remove("d").unwrap();
        book.replace(RuleSet::new(None, None, vec![]));
        assert_eq!(*calls.lock().unwrap(), ["b", "c", "b", "all"]);
    }

    #[test]
    fn merged_candidates_keep_rule_set_order() {
        let merged: Vec<_> = merge_sorted(&[0, 3, 4, 9], &[1, 5, 10]).collect();
        assert_eq!(merged, [0, 1, 3, 4, 5, 9, 10]);
        assert_eq!(merge_sorted(&[], &[2]).collect::<Vec<_>>(), [2]);
        assert_eq!(merge_sorted(&[2], &[]).collect::<Vec<_>>(), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_keeps_state_only_for_the_rules_that_apply_to_it() {
        let mut rules: Vec<_> =
            (0..10_000).map(|i| for_client(&format!("r{i}"), &format!("device-{i}"))).collect();
        rules.push(for_client("pattern", "sensor-*"));
        let (_book, mut f) = faults(rules, 1);
        connect(&mut f, "device-77", 4);
        assert_eq!(f.applicable(), 1, "only r77 matches device-77");
        assert_eq!(f.decide(C2B, PacketType::Publish, Instant::now()).1.unwrap().rule.name(), "r77");
        let (_book, mut g) = faults(vec![for_client("nobody", "nobody"); 1], 1);
        connect(&mut g, "device-1", 4);
        assert!(g.is_idle(), "no rule applies: the fast path");
    }

    #[tokio::test(start_paused = true)]
    async fn added_and_removed_rules_reach_a_live_connection_step_by_step_in_order() {
        let (book, mut f) = faults(vec![], 1);
        connect(&mut f, "device", 4);
        let first = rule("name = \"a\"\naction = \"drop\"\ncount = 1\n");
        book.add(first.clone()).unwrap();
        book.add(for_client("other", "someone-else")).unwrap();
        book.add(rule("name = \"b\"\naction = \"delay\"\nlatency = \"1s\"\n")).unwrap();
        f.refresh();
        assert_eq!(f.applicable(), 2, "a and b apply, `other` does not");
        let now = Instant::now();
        assert_eq!(f.decide(C2B, PacketType::Publish, now).0, Verdict::Drop, "a comes first");
        assert!(matches!(f.decide(C2B, PacketType::Publish, now).0, Verdict::Delay(_)), "a's count is spent");
        assert!(book.add(for_client("a", "x")).is_err(), "names are unique");
        book.remove("b").unwrap();
        book.add(rule("name = \"b\"\naction = \"drop\"\n")).unwrap();
        f.refresh();
        assert_eq!(f.decide(C2B, PacketType::Publish, now).0, Verdict::Drop, "the new b, a drop");
        assert_eq!(f.rules[0].count, 1, "a kept its count through the changes");
        assert!(book.remove("nothing").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_fell_behind_the_history_matches_every_rule_again_keeping_state() {
        let (book, mut f) = faults(vec![rule("name = \"keep\"\naction = \"drop\"\ncount = 3\n")], 1);
        connect(&mut f, "device", 4);
        assert_eq!(f.decide(C2B, PacketType::Publish, Instant::now()).0, Verdict::Drop);
        for i in 0..(HISTORY + 10) {
            book.add(for_client(&format!("n{i}"), "nobody")).unwrap();
        }
        book.add(for_client("mine", "device")).unwrap();
        assert!(book.current().changes_since(1).is_none(), "beyond the remembered history");
        f.refresh();
        assert_eq!(f.applicable(), 2);
        assert_eq!(f.rules[0].count, 1, "`keep` kept its count through the full match");
    }

    #[test]
    fn concurrent_changes_to_the_book_are_never_lost() {
        let book = Arc::new(RuleBook::default());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let book = book.clone();
                std::thread::spawn(move || {
                    let mut created = 0;
                    for i in 0..150 {
                        created += usize::from(book.add(for_client(&format!("t{t}-{i}"), "x")).is_ok());
                        // Every thread also races for the same names: exactly one may win each.
                        created += usize::from(book.add(for_client(&format!("shared-{i}"), "x")).is_ok());
                    }
                    created
                })
            })
            .collect();
        let created: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let set = book.current();
        assert_eq!(created, 8 * 150 + 150);
        assert_eq!(set.rules.len(), created, "every 201 is a rule in force");
        assert_eq!(set.version, created as u64, "one version per change");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8),
        Remove(u8),
        Reset,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![6 => (0u8..6).prop_map(Op::Add), 3 => (0u8..6).prop_map(Op::Remove), 1 => Just(Op::Reset)]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Whatever mix of adds, removes and resets four threads make at once, the book ends as
        /// some serial order of the changes that succeeded would leave it: each success made
        /// exactly one version, and replaying them in version order is valid at every step.
        #[test]
        fn concurrent_changes_equal_some_serial_order(
            threads in proptest::collection::vec(proptest::collection::vec(op(), 1..40), 4)
        ) {
            let book = Arc::new(RuleBook::default());
            let handles: Vec<_> = threads.into_iter().map(|ops| {
                let book = book.clone();
                std::thread::spawn(move || {
                    ops.into_iter().filter_map(|op| {
                        let version = match &op {
                            Op::Add(n) => book.add(for_client(&format!("n{n}"), "x")).ok().map(|s| s.version),
                            Op::Remove(n) => book.remove(&format!("n{n}")).map(|(_, v)| v),
                            Op::Reset => Some(book.replace(RuleSet::new(None, Some(1), vec![])).version + 1),
                        };
                        version.map(|v| (v, op))
                    }).collect::<Vec<_>>()
                })
            }).collect();
            let mut done: Vec<(u64, Op)> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
            done.sort_by_key(|(v, _)| *v);
            let versions: Vec<u64> = done.iter().map(|(v, _)| *v).collect();
            proptest::prop_assert_eq!(versions, (1..=done.len() as u64).collect::<Vec<_>>());
            let mut model: Vec<String> = Vec::new();
            for (v, op) in &done {
                match op {
                    Op::Add(n) => {
                        let name = format!("n{n}");
                        proptest::prop_assert!(!model.contains(&name), "version {v}: added {name} twice");
                        model.push(name);
                    }
                    Op::Remove(n) => {
                        let name = format!("n{n}");
                        proptest::prop_assert!(model.contains(&name), "version {v}: removed absent {name}");
                        model.retain(|m| *m != name);
                    }
                    Op::Reset => model.clear(),
                }
            }
            let names: Vec<String> = book.current().rules.iter().map(|r| r.name().to_string()).collect();
            proptest::prop_assert_eq!(names, model);
        }
    }
}
