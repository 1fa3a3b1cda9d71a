//! The fault engine: rules as data, decided by pure code, executed by the pumps and the session.
//!
//! - [`rule`]: the rule schema (one flat TOML/JSON table per rule) and its validation.
//! - [`profile`]: profiles (a named, described, optionally seeded list of rules) from TOML files,
//!   with errors at `file:line:col`.
//! - [`engine`]: the active [`RuleSet`] (swapped atomically through a `watch` channel) and each
//!   connection's [`ConnFaults`], which turns (rules, packet, time, seeded randomness) into
//!   verdicts, direction modes and connection actions.
//!
//! What executes them: the pump (drop, delay, blackhole, freeze, half-close, Keep Alive
//! rewrites in CONNECT and CONNACK) and the session (close with FIN/RST, MQTT 5 DISCONNECT).

pub mod engine;
pub mod profile;
pub mod rule;

pub use engine::{
    Affected, Applied, ConnAction, ConnFaults, Mode, RuleBook, RuleSet, RulesRx, Verdict, Waker,
};
pub use profile::{Profile, ProfileSpec, compile_rules, load_profile, parse_profile};
pub use rule::{Action, ActionKind, Rule, RuleError, RuleSpec};
