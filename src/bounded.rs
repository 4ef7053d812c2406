//! Bounds on every value the bridge derives from a request: ids in order keys, database text,
//! log fields and error texts.
//!
//! Keeps DESIGN.md's sixth promise: whatever anyone posts, no header, key, log line or database
//! value grows with it. A value that is too long or holds bytes we could not store or print
//! safely is replaced by a fixed-length, deterministic stand-in (`sha256:<hex>`) where it is an
//! identity (so the same input still maps to the same key), or cut where it is only shown.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

/// Longest id kept verbatim in an order key. PayPal's ids are 9–20 characters (`txn_id` 17,
/// `subscr_id` `I-`/`S-` + 12, `mp_id` `B-` + 17); 64 leaves room for any real one.
pub const MAX_ID_BYTES: usize = 64;

/// Longest order key a header may carry: a kind, `:`, and an id within [`MAX_ID_BYTES`] or its
/// `sha256:` stand-in (71 bytes).
pub const MAX_KEY_BYTES: usize = 96;

/// Longest dedup key stored verbatim (PayPal's are about 60 bytes); longer ones are stored as
/// their hash, far below PostgreSQL's btree row limit (about 2 704 bytes).
pub const MAX_DEDUP_KEY_BYTES: usize = 256;

/// Longest value written to a log field or to an informational database column.
pub const MAX_SHOWN_BYTES: usize = 200;

/// Longest error text kept in a header, a database column or an alert.
pub const MAX_ERROR_BYTES: usize = 500;

/// `sha256:<64 hex>`: the stand-in of a value that cannot be kept as it is.
pub fn digest(value: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(value)))
}

/// An id as an order key may hold it: itself when it is short printable ASCII without spaces
/// (what PayPal sends), else its [`digest`]. Deterministic, so a key's order still holds.
pub fn id(value: &str) -> Cow<'_, str> {
    if id_problem(value).is_none() {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(digest(value.as_bytes()))
    }
}

/// Why `value` cannot be kept verbatim as an id (longer than [`MAX_ID_BYTES`], or a byte that
/// is not printable ASCII), or `None` when it can. The one rule for ids: [`id`] applies it,
/// `policy::processable` reports it.
pub fn id_problem(value: &str) -> Option<String> {
    if value.len() > MAX_ID_BYTES {
        return Some(format!(
            "is {} bytes long (at most {MAX_ID_BYTES})",
            value.len()
        ));
    }
    let bad = value.chars().find(|c| !c.is_ascii_graphic())?;
    Some(format!("holds {bad:?}, not printable ASCII"))
}

/// A whole key or id (as read from a header) within the bounds an ingress gives it: printable
/// ASCII without spaces, at most [`MAX_KEY_BYTES`].
pub fn is_token(value: &str) -> bool {
    value.len() <= MAX_KEY_BYTES && value.bytes().all(|b| b.is_ascii_graphic())
}

/// A dedup key as it is stored: itself when short and free of NUL (which PostgreSQL `text`
/// refuses, SQLSTATE 22021), else its [`digest`].
pub fn dedup_key(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_DEDUP_KEY_BYTES && !value.contains('\0') {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(digest(value.as_bytes()))
    }
}

/// A value for a log field or an informational database column: control characters (NUL
/// included) replaced by `?`, cut at [`MAX_SHOWN_BYTES`] with `…` and the full length appended.
pub fn shown(value: &str) -> String {
    cut(value, MAX_SHOWN_BYTES)
}

/// An error with its causes, `: `-joined on one line, cut at [`MAX_ERROR_BYTES`].
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source in their own text; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    cut(&text, MAX_ERROR_BYTES)
}

/// `value` without control characters, at most `max` bytes plus a short suffix saying how long
/// it was.
pub fn cut(value: &str, max: usize) -> String {
    let clean = |c: char| if c.is_control() { '?' } else { c };
    if value.len() <= max {
        return value.chars().map(clean).collect();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let head: String = value[..end].chars().map(clean).collect();
    format!("{head}…({} bytes)", value.len())
}

/// A budget of log lines per second for lines an attacker can cause at will (one per refused
/// request): past it, lines are skipped and counted, and the next line admitted says how many.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    /// The second (since the process started) the count is for.
    second: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU32,
    skipped: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

impl LogBudget {
    /// At most `per_second` lines each second.
    pub fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            second: std::sync::atomic::AtomicU64::new(0),
            used: std::sync::atomic::AtomicU32::new(0),
            skipped: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    /// `Some(skipped)` when a line may be written now, with how many were skipped since the last
    /// one written; `None` when over budget (the line is counted as skipped).
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_secs();
        if self.second.swap(now, Relaxed) != now {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < self.per_second {
            Some(self.skipped.swap(0, Relaxed))
        } else {
            self.skipped.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_admits_its_lines_per_second_and_counts_the_rest() {
        let budget = LogBudget::new(3);
        let admitted: Vec<Option<u64>> = (0..5).map(|_| budget.admit()).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        // The next second: the first line says two were skipped.
        budget
            .second
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(budget.admit(), Some(2));
        assert_eq!(budget.admit(), Some(0));
    }

    #[test]
    fn paypal_ids_are_kept_as_they_are() {
        for id_text in [
            "8FX91612UX4519215",
            "I-7PX4WQ2N9KD3",
            "B-5HC23496J3545304S",
            "593976436",
        ] {
            assert_eq!(id(id_text), id_text);
        }
    }

    #[test]
    fn long_or_odd_ids_become_a_fixed_length_digest() {
        let long = "A".repeat(MAX_ID_BYTES + 1);
        for odd in ["AB\0CD", "with space", "Müller", long.as_str()] {
            let bounded = id(odd);
            assert!(bounded.starts_with("sha256:"), "{odd:?}");
            assert_eq!(bounded.len(), 71);
            assert_eq!(bounded, id(odd), "deterministic");
        }
        assert_ne!(id("AB\0CD"), id("AB\0CE"));
        assert!(is_token(&format!("txn:{}", id(&long))));
        assert!(!is_token(&format!("txn:{long}{long}")));
    }

    #[test]
    fn dedup_keys_with_nul_or_too_long_are_stored_as_digests() {
        assert_eq!(
            dedup_key("t|web_accept|X|Completed"),
            "t|web_accept|X|Completed"
        );
        assert!(dedup_key("t|web_accept|X\0|Completed").starts_with("sha256:"));
        assert!(dedup_key(&"x".repeat(3000)).starts_with("sha256:"));
    }

    #[test]
    fn shown_values_are_cut_and_cleaned() {
        let long = "é".repeat(1000);
        let cut_text = shown(&long);
        assert!(cut_text.len() <= MAX_SHOWN_BYTES + 20, "{}", cut_text.len());
        assert!(cut_text.ends_with("…(2000 bytes)"));
        assert_eq!(shown("a\0b\nc"), "a?b?c");
    }

    #[test]
    fn an_error_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
    }
}
