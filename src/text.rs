//! Peer input written as text (a leaf: it imports nothing of the crate).
//!
//! Client ids, usernames, Will topics, certificate names, SNI, reason strings and anything else
//! a client or a broker sends cannot be refused, and may hold newlines (a forged log line) or
//! escape sequences (that drive the operator's terminal). Wherever such a value is written as
//! text — a `ctl` table, an event line, the probe's report — it goes through [`escaped`]; log
//! lines record it as a string field, which the text log format quotes and escapes and the
//! JSON log format keeps exact. JSON answers carry it exact.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls, DEL, and the Unicode
/// format characters that reorder or hide text (bidirectional overrides and isolates, zero-width
/// characters, the line and paragraph separators).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `s` with every character that could forge a line or drive a terminal written as an escape
/// (`\n`, `\r`, `\t`, `\u{1b}`); a backslash is doubled when anything is escaped, so an escape
/// cannot be told apart from the text `\n`. Borrowed when there is nothing to escape.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) || c == '\\' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escaped`] as a `Display` value, for `format!` and friends.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escaped(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_is_borrowed_unchanged() {
        assert!(matches!(escaped("sensor-42/état"), Cow::Borrowed("sensor-42/état")));
        assert!(matches!(escaped(r"a\b"), Cow::Borrowed(r"a\b")));
    }

    #[test]
    fn newlines_and_escape_sequences_are_written_as_escapes() {
        assert_eq!(escaped("dev\nINFO forged line"), r"dev\nINFO forged line");
        assert_eq!(escaped("\x1b[2J\x1b]0;owned\x07"), r"\u{1b}[2J\u{1b}]0;owned\u{7}");
        assert_eq!(escaped("a\r\tb\u{7f}\u{9b}"), r"a\r\tb\u{7f}\u{9b}");
    }

    #[test]
    fn text_reordering_and_invisible_characters_are_escaped() {
        assert_eq!(escaped("admin\u{202E}txt.exe"), r"admin\u{202e}txt.exe");
        assert_eq!(escaped("a\u{200B}b\u{2028}"), r"a\u{200b}b\u{2028}");
    }

    #[test]
    fn a_backslash_is_doubled_once_anything_is_escaped() {
        // Otherwise the text `\n` and an escaped newline would read the same.
        assert_eq!(escaped("x\\n\ny"), r"x\\n\ny");
        assert_eq!(Escaped("x\\n\ny").to_string(), r"x\\n\ny");
    }
}
