//! The one rule for user-given names that reach logs, metric labels and JSON: rule names,
//! profile names and route names.
//!
//! A name is 1 to [`MAX_NAME_CHARS`] characters with no control characters (no CR/LF to forge
//! log lines, no NUL or escape sequences in labels). Route names are stricter still (see
//! [`crate::config::validate_name`]): they are also file-friendly identifiers.

/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Checks a name; `what` says what it names in the error (`rule name`, `profile name`).
pub fn check(what: &str, name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(format!("the {what} is empty; give 1 to {MAX_NAME_CHARS} printable characters"));
    }
    if chars > MAX_NAME_CHARS {
        let start: String = name.chars().take(16).collect();
        return Err(format!(
            "the {what} {start:?}… has {chars} characters; at most {MAX_NAME_CHARS} are allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "the {what} {name:?} contains the control character {:?}; use printable characters only",
            c
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_printable() {
        assert!(check("rule name", "drop-pingreq").is_ok());
        assert!(check("rule name", "überwachung ⚡").is_ok(), "any printable characters");
        assert!(check("rule name", &"x".repeat(64)).is_ok());
        assert!(check("rule name", &"é".repeat(64)).is_ok(), "counted in characters, not bytes");
        let long = check("profile name", &"x".repeat(65)).unwrap_err();
        assert!(long.contains("65 characters") && long.contains("at most 64"), "{long}");
        assert!(check("rule name", "").unwrap_err().contains("empty"));
        for bad in ["a\nb", "a\rb", "a\0b", "a\u{1b}[31mb", "a\u{85}b", "tab\there"] {
            let e = check("profile name", bad).unwrap_err();
            assert!(e.contains("control character"), "{bad:?}: {e}");
        }
        assert!(!check("rule name", &"x".repeat(900_000)).unwrap_err().contains(&"x".repeat(17)));
    }
}
