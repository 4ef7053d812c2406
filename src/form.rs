//! The form body as PayPal sends it, read without losing a byte.
//!
//! Splits on `&` and the first `=`, turns `+` into a space and percent-decodes to *bytes*; only
//! then are the bytes decoded to text with the message's own `charset` (windows-1252 when it is
//! missing or unknown, and flagged). `form_urlencoded` would decode as lossy UTF-8 and turn a
//! windows-1252 `%FC` into U+FFFD, so it is not used for values.

use std::borrow::Cow;

use encoding_rs::{Encoding, WINDOWS_1252};

/// The fields of a form body, percent-decoded to raw bytes, in body order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The charset a form's bytes are decoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charset {
    /// The encoding used.
    pub encoding: &'static Encoding,
    /// True when the form named no charset, or one encoding_rs does not know, and windows-1252
    /// was assumed (PayPal's default for accounts that never chose one).
    pub assumed: bool,
}

impl Form {
    /// Splits a raw body. Never fails: empty segments are skipped and a segment without `=` is a
    /// name with an empty value, so any body yields a form (possibly empty).
    pub fn parse(body: &[u8]) -> Form {
        let pairs = body
            .split(|b| *b == b'&')
            .filter(|segment| !segment.is_empty())
            .map(|segment| {
                let (name, value) = match segment.iter().position(|b| *b == b'=') {
                    Some(at) => (&segment[..at], &segment[at + 1..]),
                    None => (segment, &[][..]),
                };
                (unescape(name), unescape(value))
            })
            .collect();
        Form { pairs }
    }

    /// Every field as (name, value) raw bytes, in body order.
    pub fn pairs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.pairs
    }

    /// True when the body held no field at all.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The raw bytes of the first field named `name`.
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The first field named `name`, decoded with the form's charset; `None` when absent or empty.
    pub fn text(&self, name: &str) -> Option<String> {
        text_of(self.charset(), self.raw(name)?)
    }

    /// The charset named by the `charset` field, or windows-1252 (assumed) without a usable one.
    pub fn charset(&self) -> Charset {
        charset_of(self.raw("charset"))
    }

    /// Every field decoded to UTF-8 with the form's charset, in body order.
    pub fn decoded(&self) -> Vec<(String, String)> {
        let encoding = self.charset().encoding;
        self.pairs
            .iter()
            .map(|(n, v)| {
                (
                    decode(encoding, n).into_owned(),
                    decode(encoding, v).into_owned(),
                )
            })
            .collect()
    }
}

/// The raw bytes of the first field of each of `names` in `body`, in one pass and without
/// splitting the whole body: the cheap path for the few fields the ingress reads. Same rules as
/// [`Form::parse`].
pub fn fields<const N: usize>(body: &[u8], names: [&str; N]) -> [Option<Vec<u8>>; N] {
    let mut found: [Option<Vec<u8>>; N] = std::array::from_fn(|_| None);
    for segment in body.split(|b| *b == b'&').filter(|s| !s.is_empty()) {
        let (raw_name, value) = match segment.iter().position(|b| *b == b'=') {
            Some(at) => (&segment[..at], &segment[at + 1..]),
            None => (segment, &[][..]),
        };
        let name: Cow<[u8]> = if raw_name.iter().any(|b| *b == b'%' || *b == b'+') {
            Cow::Owned(unescape(raw_name))
        } else {
            Cow::Borrowed(raw_name)
        };
        if let Some(slot) = names.iter().position(|n| n.as_bytes() == name.as_ref()) {
            found[slot].get_or_insert_with(|| unescape(value));
        }
    }
    found
}

/// The charset a body names in its `charset` field, or windows-1252 (assumed).
pub fn charset_of(raw: Option<&[u8]>) -> Charset {
    match raw.and_then(Encoding::for_label) {
        Some(encoding) => Charset {
            encoding,
            assumed: false,
        },
        None => Charset {
            encoding: WINDOWS_1252,
            assumed: true,
        },
    }
}

/// Decodes a field's raw bytes with `charset`; `None` when empty.
pub fn text_of(charset: Charset, raw: &[u8]) -> Option<String> {
    (!raw.is_empty()).then(|| decode(charset.encoding, raw).into_owned())
}

/// `+` to space, then `%XX` to the byte it names; malformed escapes stay as they are.
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.iter().position(|b| matches!(b, b'+' | b'%')) {
        out.extend_from_slice(&rest[..at]);
        if rest[at] == b'+' {
            out.push(b' ');
            rest = &rest[at + 1..];
            continue;
        }
        match rest.get(at + 1..at + 3).and_then(hex_byte) {
            Some(byte) => {
                out.push(byte);
                rest = &rest[at + 3..];
            }
            None => {
                out.push(b'%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// The byte two hex digits name (either case), as `%XX` escapes write it.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digit = |b: u8| char::from(b).to_digit(16);
    match digits {
        [high, low] => u8::try_from(digit(*high)? * 16 + digit(*low)?).ok(),
        _ => None,
    }
}

/// Decodes without a BOM sniff: the form's declared charset is the truth.
fn decode<'a>(encoding: &'static Encoding, bytes: &'a [u8]) -> Cow<'a, str> {
    encoding.decode_without_bom_handling(bytes).0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition `unescape` must keep: `+` to space, then `percent_decode`.
    fn reference(raw: &[u8]) -> Vec<u8> {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&spaced).collect()
    }

    #[test]
    fn unescape_decodes_exactly_as_plus_to_space_then_percent_decode() {
        // Every string of up to five bytes over an alphabet of the cases: escapes whole,
        // cut short, malformed, in either case, next to `+` and to each other.
        let alphabet = b"%+4aFg1\xfc";
        let mut strings: Vec<Vec<u8>> = vec![Vec::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let mut longer = Vec::new();
            for string in &strings {
                for byte in alphabet {
                    let mut next = string.clone();
                    next.push(*byte);
                    assert_eq!(unescape(&next), reference(&next), "{next:?}");
                    checked += 1;
                    longer.push(next);
                }
            }
            strings = longer;
        }
        assert_eq!(checked, 8 + 64 + 512 + 4096 + 32768);
        for sample in [
            &b"Buch+%96+Abo"[..],
            b"a%2",
            b"%%41",
            b"%zz%41%4",
            b"100%25+sure",
            b"",
        ] {
            assert_eq!(unescape(sample), reference(sample), "{sample:?}");
        }
    }

    #[test]
    fn windows_1252_values_decode_to_the_right_letters() {
        let form = Form::parse(b"last_name=M%FCller&item=Buch+%96+Abo&charset=windows-1252");
        assert_eq!(form.text("last_name").as_deref(), Some("Müller"));
        // 0x96 is an en dash in windows-1252 but a control character in ISO-8859-1.
        assert_eq!(form.text("item").as_deref(), Some("Buch – Abo"));
        assert!(!form.charset().assumed);
    }

    #[test]
    fn utf8_values_decode_when_the_form_says_utf8() {
        let form = Form::parse(b"first_name=Zo%C3%AB&charset=UTF-8");
        assert_eq!(form.text("first_name").as_deref(), Some("Zoë"));
    }

    #[test]
    fn a_missing_or_unknown_charset_falls_back_to_windows_1252_flagged() {
        for body in [&b"n=J%F6rg"[..], b"n=J%F6rg&charset=klingon"] {
            let form = Form::parse(body);
            assert_eq!(form.text("n").as_deref(), Some("Jörg"));
            assert_eq!(form.charset().encoding, WINDOWS_1252);
            assert!(form.charset().assumed);
        }
    }

    #[test]
    fn escaped_separators_stay_inside_their_value() {
        let form =
            Form::parse(b"custom=website_id%3D13%26user_id%3D21&payer_email=jorg%2Bbuyer%40x");
        assert_eq!(form.raw("custom"), Some(&b"website_id=13&user_id=21"[..]));
        assert_eq!(form.raw("payer_email"), Some(&b"jorg+buyer@x"[..]));
    }

    #[test]
    fn odd_segments_never_fail() {
        let form = Form::parse(b"&&a&b==c&%zz=%&=v");
        assert_eq!(form.raw("a"), Some(&b""[..]));
        assert_eq!(form.raw("b"), Some(&b"=c"[..]));
        assert_eq!(form.raw("%zz"), Some(&b"%"[..]));
        assert_eq!(form.raw(""), Some(&b"v"[..]));
        assert!(Form::parse(b"").is_empty());
        assert_eq!(form.text("a"), None, "an empty value reads as absent");
    }

    #[test]
    fn fields_finds_what_parse_finds() {
        let body = b"a=1&b%5Fc=x+y&charset=utf-8&empty=&a=2&plain";
        let form = Form::parse(body);
        let names = ["a", "b_c", "charset", "empty", "plain", "missing"];
        let found = fields(body, names);
        for (name, value) in names.iter().zip(&found) {
            assert_eq!(value.as_deref(), form.raw(name), "{name}");
        }
    }

    #[test]
    fn decoded_keeps_body_order_and_crlf() {
        let form = Form::parse(b"b=2&a=x%0D%0Ay&charset=utf-8");
        let fields = form.decoded();
        assert_eq!(fields[0], ("b".to_owned(), "2".to_owned()));
        assert_eq!(fields[1], ("a".to_owned(), "x\r\ny".to_owned()));
    }
}
