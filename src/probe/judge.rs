//! Verdicts, pure: what one run measured against what the specification expects, and how runs
//! and cases add up. No I/O, no clock; the scenarios feed it numbers.

use crate::codec::reason_name;
use crate::vocab::{CloseHow, Side};
use serde::Serialize;

/// A result's verdict. Ordered from least to most serious: a group's verdict is its worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Verdict {
    /// Not measured: the protocol is not accepted, the scenario does not apply, or the probe
    /// could not observe it.
    #[serde(rename = "n/a")]
    NotApplicable,
    #[serde(rename = "conforms")]
    Conforms,
    /// Measured, but outside what the specification describes (e.g. closed after 4.1 × Keep
    /// Alive, no DISCONNECT 0x8E).
    #[serde(rename = "deviates")]
    Deviates,
    /// A MUST not met (never closed, no Will, a live connection's Will published).
    #[serde(rename = "fails")]
    Fails,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NotApplicable => "n/a",
            Verdict::Conforms => "conforms",
            Verdict::Deviates => "deviates",
            Verdict::Fails => "fails",
        }
    }
}

/// A verdict and the sentence that explains it.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub verdict: Verdict,
    pub detail: String,
}

impl Judged {
    pub fn new(verdict: Verdict, detail: impl Into<String>) -> Judged {
        Judged { verdict, detail: detail.into() }
    }

    /// Both findings: the worse verdict, both details.
    pub fn and(self, other: Judged) -> Judged {
        Judged::new(self.verdict.max(other.verdict), format!("{}; {}", self.detail, other.detail))
    }
}

/// How far a measured close may be from 1.5 × Keep Alive and still conform, and how late a Will
/// may come. Written into every report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    /// A close this much later than 1.5 × Keep Alive still conforms, seconds.
    pub close_late_s: f64,
    /// A close this much earlier than 1.5 × Keep Alive still conforms (timer granularity of the
    /// measurement itself), seconds.
    pub close_early_s: f64,
    /// A Will this much later than expected still conforms, seconds.
    pub will_late_s: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { close_late_s: 1.0, close_early_s: 0.05, will_late_s: 1.0 }
    }
}

/// The close the proxy recorded: who, how, and the silence the closing side had heard.
#[derive(Debug, Clone, PartialEq)]
pub struct CloseSeen {
    pub closed_by: Side,
    pub how: CloseHow,
    pub disconnect_reason: Option<u8>,
    /// Seconds between the last packet delivered to the closing side and the close.
    pub silence_s: f64,
}

impl CloseSeen {
    /// `FIN`, `RST`, `DISCONNECT 0x8D (keep_alive_timeout)`.
    pub fn how_words(&self) -> String {
        match (self.how, self.disconnect_reason) {
            (CloseHow::Disconnect, Some(r)) => format!("DISCONNECT {r:#04X} ({})", reason_name(r)),
            (CloseHow::Disconnect, None) => "DISCONNECT".into(),
            (CloseHow::Fin, _) => "FIN".into(),
            (CloseHow::Rst, _) => "RST".into(),
            (CloseHow::Error, _) => "a socket error".into(),
        }
    }
}

/// A broker that enforces Keep Alive `keep_alive` must close a silent client 1.5 × it after the
/// client's last packet ([MQTT-3.1.2-24]). `close` is what happened within the wait
/// (`waited_s` after the last packet).
pub fn keepalive_close(keep_alive: u16, close: Option<&CloseSeen>, waited_s: f64, tol: &Tolerance) -> Judged {
    let due = 1.5 * f64::from(keep_alive);
    let Some(c) = close else {
        return Judged::new(
            Verdict::Fails,
            format!("never closed: still open {waited_s:.1} s after the last packet (due at {due:.1} s)"),
        );
    };
    if c.closed_by != Side::Broker {
        return Judged::new(
            Verdict::NotApplicable,
            format!("not measured: the {} closed first", c.closed_by.as_str()),
        );
    }
    let ratio = c.silence_s / f64::from(keep_alive);
    let said = format!("closed after {:.2} s ({ratio:.2} × Keep Alive) with {}", c.silence_s, c.how_words());
    if c.silence_s < due - tol.close_early_s {
        Judged::new(Verdict::Deviates, format!("{said}: early, before 1.5 × Keep Alive"))
    } else if c.silence_s > due + tol.close_late_s {
        Judged::new(
            Verdict::Deviates,
            format!("{said}: late, more than {} s after 1.5 × Keep Alive", tol.close_late_s),
        )
    } else {
        Judged::new(Verdict::Conforms, said)
    }
}

/// A Will expected `expected_s` after the close; `delay_s` is when it came, if it did within the
/// wait.
pub fn will(expected_s: f64, delay_s: Option<f64>, tol: &Tolerance) -> Judged {
    match delay_s {
        None => Judged::new(Verdict::Fails, "Will not published"),
        Some(d) if d < expected_s - tol.close_early_s => Judged::new(
            Verdict::Deviates,
            format!("Will published after {d:.2} s, before its {expected_s:.0} s delay"),
        ),
        Some(d) if d > expected_s + tol.will_late_s => Judged::new(
            Verdict::Deviates,
            format!("Will published after {d:.2} s, expected {expected_s:.0} s"),
        ),
        Some(d) => Judged::new(Verdict::Conforms, format!("Will published after {d:.2} s")),
    }
}

/// Minimum, median and maximum of a measurement over runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        Some(Stats { min: round(v[0]), median: round(median), max: round(v[n - 1]) })
    }

    /// `3.00 s` for one value or values equal as shown, `2.98–3.41 s (median 3.02)` otherwise.
    pub fn words(&self, unit: &str) -> String {
        let (min, max) = (format!("{:.2}", self.min), format!("{:.2}", self.max));
        if min == max {
            format!("{min}{unit}")
        } else {
            format!("{min}–{max}{unit} (median {:.2})", self.median)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker_close(silence_s: f64) -> CloseSeen {
        CloseSeen { closed_by: Side::Broker, how: CloseHow::Fin, disconnect_reason: None, silence_s }
    }

    #[test]
    fn a_close_within_the_tolerance_conforms_and_outside_deviates() {
        let tol = Tolerance::default();
        let v = |s: f64| keepalive_close(2, Some(&broker_close(s)), 20.0, &tol).verdict;
        assert_eq!(v(3.0), Verdict::Conforms);
        assert_eq!(v(2.96), Verdict::Conforms, "within the measurement's own granularity");
        assert_eq!(v(3.99), Verdict::Conforms);
        assert_eq!(v(2.9), Verdict::Deviates);
        assert_eq!(v(4.1), Verdict::Deviates);
        let late = keepalive_close(2, Some(&broker_close(8.2)), 20.0, &tol);
        assert!(late.detail.contains("4.10 × Keep Alive") && late.detail.contains("late"), "{}", late.detail);
        let never = keepalive_close(2, None, 23.0, &tol);
        assert_eq!(never.verdict, Verdict::Fails);
        assert!(never.detail.contains("never closed"), "{}", never.detail);
        let by_client = CloseSeen { closed_by: Side::Client, ..broker_close(1.0) };
        assert_eq!(keepalive_close(2, Some(&by_client), 20.0, &tol).verdict, Verdict::NotApplicable);
    }

    #[test]
    fn a_disconnect_is_named_with_its_reason() {
        let c = CloseSeen { how: CloseHow::Disconnect, disconnect_reason: Some(0x8d), ..broker_close(3.0) };
        assert_eq!(c.how_words(), "DISCONNECT 0x8D (keep_alive_timeout)");
    }

    #[test]
    fn wills_are_judged_against_their_delay() {
        let tol = Tolerance::default();
        assert_eq!(will(0.0, Some(0.01), &tol).verdict, Verdict::Conforms);
        assert_eq!(will(2.0, Some(2.3), &tol).verdict, Verdict::Conforms);
        assert_eq!(will(2.0, Some(0.0), &tol).verdict, Verdict::Deviates);
        assert_eq!(will(0.0, Some(5.0), &tol).verdict, Verdict::Deviates);
        assert_eq!(will(0.0, None, &tol).verdict, Verdict::Fails);
    }

    #[test]
    fn the_worst_verdict_wins_and_both_reasons_are_kept() {
        let a = Judged::new(Verdict::Conforms, "a");
        let d = Judged::new(Verdict::Deviates, "d");
        assert_eq!(a.clone().and(d.clone()), Judged::new(Verdict::Deviates, "a; d"));
        assert_eq!(d.clone().and(a.clone()), Judged::new(Verdict::Deviates, "d; a"));
        assert_eq!(Judged::new(Verdict::NotApplicable, "x").and(a.clone()).verdict, Verdict::Conforms);
        assert!(Verdict::Fails > Verdict::Deviates && Verdict::Deviates > Verdict::Conforms);
    }

    #[test]
    fn stats_are_min_median_max() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[3.0, 1.0, 2.0]), Some(Stats { min: 1.0, median: 2.0, max: 3.0 }));
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Stats::of(&[3.0]).unwrap().words(" s"), "3.00 s");
        assert_eq!(Stats::of(&[3.0, 3.5]).unwrap().words(" s"), "3.00–3.50 s (median 3.25)");
        assert_eq!(Stats::of(&[3.001, 3.004]).unwrap().words(" s"), "3.00 s", "equal as shown");
    }
}
