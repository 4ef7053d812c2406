//! What a genuine IPN must also be before it reaches business services.
//!
//! Keeps the second promise's other half: PayPal's `VERIFIED` only says PayPal sent it, not that
//! it is for this merchant and this environment. A sandbox IPN in live mode (or the reverse), or
//! a genuine IPN of another account replayed at our endpoint, is quarantined with its reason.

use crate::bounded;
use crate::config::{self, Environment};
use crate::form::Form;

/// Why an IPN goes to `<p>.quarantine`; the text is the `x-ipn-reason` header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// PayPal answered INVALID: not sent by PayPal, or altered.
    Invalid,
    /// `test_ipn=1` in live mode, or its absence in sandbox mode.
    WrongEnvironment,
    /// Addressed to an account that is not the configured merchant's.
    ForeignReceiver,
    /// Not a form at all; no postback is made for it.
    Unreadable,
    /// Holds a value the bridge can never store or publish (the database refused it as a value,
    /// or a message built from it would not fit the broker's frame); the cause is in
    /// `x-ipn-cause`. Retrying could not help, so it is not retried.
    Unprocessable,
    /// An encrypted notification (WeChat Pay) that does not decrypt with the configured key,
    /// or names an algorithm the bridge does not accept; the cause is in `x-ipn-cause`.
    Undecryptable,
}

impl Reason {
    /// Every reason, for metrics that show each from the start.
    pub const ALL: [Reason; 6] = [
        Reason::Invalid,
        Reason::WrongEnvironment,
        Reason::ForeignReceiver,
        Reason::Unreadable,
        Reason::Unprocessable,
        Reason::Undecryptable,
    ];

    /// Header value: `invalid`, `wrong-environment`, `foreign-receiver`, `unreadable`,
    /// `unprocessable`, `undecryptable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unprocessable => "unprocessable",
            Reason::Invalid => "invalid",
            Reason::WrongEnvironment => "wrong-environment",
            Reason::ForeignReceiver => "foreign-receiver",
            Reason::Unreadable => "unreadable",
            Reason::Undecryptable => "undecryptable",
        }
    }
}

/// Checks before the postback: is the body a form at all (at least one `name=value` with a
/// non-empty name)? Anything else is quarantined without asking PayPal.
pub fn readable(body: &[u8]) -> Result<(), Reason> {
    let pair = |segment: &[u8]| {
        segment
            .iter()
            .position(|b| *b == b'=')
            .is_some_and(|at| at > 0)
    };
    if body.split(|b| *b == b'&').any(pair) {
        Ok(())
    } else {
        Err(Reason::Unreadable)
    }
}

/// Fields that identify an IPN or name what it is about: PayPal sends them as short ASCII
/// tokens. They become order keys, dedup keys, database rows and routing keys.
pub const ID_FIELDS: [&str; 8] = [
    "subscr_id",
    "recurring_payment_id",
    "mp_id",
    "parent_txn_id",
    "txn_id",
    "ipn_track_id",
    "txn_type",
    "payment_status",
];

/// Checks before the postback: every identifying field ([`ID_FIELDS`]) that is present is
/// short printable ASCII ([`bounded::id_problem`], the rule order keys use). PayPal never
/// sends anything else there; a NUL, a control byte, a non-ASCII character or a 3 KB `txn_id`
/// is a forgery or corruption, quarantined as `unprocessable` with the cause, without asking
/// PayPal.
pub fn processable(form: &Form) -> Result<(), String> {
    fields_processable(form, &ID_FIELDS)
}

/// [`processable`] for another provider's identifying `fields` of a form.
pub fn fields_processable(form: &Form, fields: &[&str]) -> Result<(), String> {
    ids_processable(
        fields
            .iter()
            .filter_map(|&field| Some((field, form.text(field)?))),
    )
}

/// The identifying fields' rule for any provider: each value given, trimmed, is short
/// printable ASCII.
pub fn ids_processable<'a>(
    fields: impl IntoIterator<Item = (&'a str, String)>,
) -> Result<(), String> {
    for (field, value) in fields {
        if let Some(problem) = bounded::id_problem(value.trim()) {
            return Err(format!("field `{field}` {problem}"));
        }
    }
    Ok(())
}

/// Checks after PayPal's `VERIFIED`: environment, then receiver.
pub fn check(form: &Form, paypal: &config::Paypal) -> Result<(), Reason> {
    let test = form.text("test_ipn").as_deref() == Some("1");
    if test != (paypal.environment == Environment::Sandbox) {
        return Err(Reason::WrongEnvironment);
    }
    if paypal.receiver_ids.is_empty() && paypal.receiver_emails.is_empty() {
        return Ok(());
    }
    // adjustment and masspay IPNs name the merchant as the payer.
    let merchant_pays = matches!(
        form.text("txn_type").as_deref(),
        Some("adjustment" | "masspay")
    );
    let (id_field, email_field) = if merchant_pays {
        ("payer_id", "payer_email")
    } else {
        ("receiver_id", "receiver_email")
    };
    let id_matches = form
        .text(id_field)
        .is_some_and(|id| paypal.receiver_ids.iter().any(|known| *known == id.trim()));
    let email_matches = form.text(email_field).is_some_and(|email| {
        let email = email.trim();
        paypal
            .receiver_emails
            .iter()
            .any(|known| known.eq_ignore_ascii_case(email))
    });
    if id_matches || email_matches {
        Ok(())
    } else {
        Err(Reason::ForeignReceiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::paypal::samples_dir::sample;

    fn paypal(environment: Environment, ids: &[&str], emails: &[&str]) -> config::Paypal {
        config::Paypal {
            environment,
            receiver_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            receiver_emails: emails.iter().map(|s| (*s).to_owned()).collect(),
            ..config::Paypal::default()
        }
    }

    fn form(name: &str) -> Form {
        Form::parse(&sample(name))
    }

    #[test]
    fn the_environment_must_match_test_ipn() {
        let live = paypal(Environment::Live, &[], &[]);
        let sandbox = paypal(Environment::Sandbox, &[], &[]);
        assert_eq!(check(&form("001_web_accept.txt"), &live), Ok(()));
        assert_eq!(
            check(&form("001_web_accept.txt"), &sandbox),
            Err(Reason::WrongEnvironment)
        );
        assert_eq!(check(&form("003_cart.txt"), &sandbox), Ok(()));
        assert_eq!(
            check(&form("003_cart.txt"), &live),
            Err(Reason::WrongEnvironment)
        );
    }

    #[test]
    fn a_configured_receiver_must_match_by_id_or_email() {
        let live_id = paypal(Environment::Live, &["K8L3Z5QH2W9PA"], &[]);
        let live_email = paypal(Environment::Live, &[], &["BILLING@brightleaf.example"]);
        let other = paypal(Environment::Live, &["SOMEONEELSE1"], &["x@example.com"]);
        for config in [&live_id, &live_email] {
            assert_eq!(check(&form("001_web_accept.txt"), config), Ok(()));
        }
        assert_eq!(
            check(&form("001_web_accept.txt"), &other),
            Err(Reason::ForeignReceiver)
        );
    }

    #[test]
    fn adjustment_and_masspay_are_checked_on_the_payer() {
        let sandbox = paypal(
            Environment::Sandbox,
            &[],
            &["billing-facilitator@brightleaf.example"],
        );
        assert_eq!(check(&form("005_adjustment.txt"), &sandbox), Ok(()));
        assert_eq!(check(&form("041_masspay.txt"), &sandbox), Ok(()));
        let other = paypal(Environment::Sandbox, &[], &["x@example.com"]);
        assert_eq!(
            check(&form("041_masspay.txt"), &other),
            Err(Reason::ForeignReceiver)
        );
    }

    #[test]
    fn identifying_fields_must_be_short_printable_ascii() {
        for name in [
            "001_web_accept.txt",
            "013_subscr_payment.txt",
            "041_masspay.txt",
        ] {
            assert_eq!(processable(&form(name)), Ok(()), "{name}");
        }
        let nul = processable(&Form::parse(b"txn_id=AB%00CD&payment_status=Completed"));
        assert!(nul.as_ref().is_err_and(|e| e.contains("txn_id")), "{nul:?}");
        let long = format!("txn_id={}", "A".repeat(3000));
        let long = processable(&Form::parse(long.as_bytes()));
        assert!(
            long.as_ref().is_err_and(|e| e.contains("3000 bytes")),
            "{long:?}"
        );
        let inflated = processable(&Form::parse(b"subscr_id=I-%80%80"));
        assert!(inflated.is_err(), "windows-1252 bytes in an id");
    }

    #[test]
    fn a_body_without_a_single_name_value_pair_is_unreadable() {
        assert_eq!(readable(b"\x00\xff garbage"), Err(Reason::Unreadable));
        assert_eq!(readable(b"&&&"), Err(Reason::Unreadable));
        assert_eq!(readable(b"=x&=y"), Err(Reason::Unreadable));
        assert_eq!(
            readable(b"junk&txn_id="),
            Ok(()),
            "odd, but a form: PayPal decides"
        );
        for (name, body) in crate::provider::paypal::samples_dir::samples() {
            assert_eq!(readable(&body), Ok(()), "{name}");
        }
    }
}
