//! PayPal IPN: the raw body, its fields, and the order key it belongs to.
//!
//! The raw body is the truth and is never re-encoded: PayPal's postback must be
//! `cmd=_notify-validate&` followed by the exact bytes received. Fields are read from it with
//! [`Form`], which keeps the message's own charset.

pub mod verify;

use crate::form::{self, Form, fields};
use crate::keys::{DedupKeys, OrderKey, body_hash};
use crate::provider::{Checked, Kind, Provider, Queued, Verified};

/// PayPal's name in `x-ipn-provider`, events and metrics.
pub const NAME: &str = "paypal";

/// Order keys of subscriptions and recurring-payment profiles start with this.
pub const PROFILE_PREFIX: &str = "profile:";

/// The checks before the postback: a form whose identifying fields are bounded.
pub fn check(body: &[u8]) -> Checked {
    if let Err(checked) = super::readable(body) {
        return checked;
    }
    let form = Form::parse(body);
    match crate::policy::processable(&form) {
        Ok(()) => Checked::Postback(Pending { form }),
        Err(cause) => Checked::Rejected(crate::policy::Reason::Unprocessable, Some(cause)),
    }
}

/// What an IPN is about: a refund or dispute by its status or type first (a subscription's
/// refund is a refund), then subscriptions and recurring profiles, payouts, and payments.
pub fn kind_of(txn_type: Option<&str>, payment_status: Option<&str>) -> Kind {
    let txn_type = txn_type.unwrap_or_default();
    match payment_status {
        Some("Refunded") => return Kind::Refund,
        Some("Reversed" | "Canceled_Reversal") => return Kind::Dispute,
        _ => {}
    }
    if matches!(txn_type, "new_case" | "adjustment") {
        Kind::Dispute
    } else if txn_type == "masspay" {
        Kind::Payout
    } else if txn_type.starts_with("subscr_") || txn_type.starts_with("recurring_payment") {
        Kind::Subscription
    } else if payment_status.is_some() {
        Kind::Payment
    } else {
        Kind::Other
    }
}

/// An IPN waiting for PayPal's postback, parsed once.
#[derive(Debug)]
pub struct Pending {
    form: Form,
}

impl Pending {
    /// Its `txn_id`, for log lines.
    pub fn txn_id(&self) -> Option<String> {
        self.form.text("txn_id")
    }

    /// After PayPal's `VERIFIED`: environment and receiver, then the event's view.
    pub fn after_postback(
        self,
        paypal: &crate::config::Paypal,
        queued: &Queued<'_>,
        verified_at: std::time::SystemTime,
    ) -> Checked {
        let form = self.form;
        if let Err(reason) = crate::policy::check(&form, paypal) {
            return Checked::Rejected(reason, None);
        }
        let dedup = PayPal::dedup_keys(&form, queued.body);
        let names = [
            form.text("txn_type"),
            form.text("payment_status"),
            form.text("txn_id"),
        ];
        let mut verified = Verified::of_form(&form, dedup, names, verified_at);
        verified.test = form.text("test_ipn").as_deref() == Some("1");
        verified.kind = kind_of(
            form.text("txn_type").as_deref(),
            form.text("payment_status").as_deref(),
        );
        verified.amount = form.text("mc_gross");
        verified.currency = form.text("mc_currency");
        verified.merchant_order_id = form.text("invoice");
        // A later refund or chargeback naming only this txn_id follows the profile's order.
        verified.paid = form
            .text("txn_id")
            .filter(|_| queued.key.as_str().starts_with(PROFILE_PREFIX))
            .map(|txn| crate::bounded::id(txn.trim()).into_owned());
        Checked::Passed(Box::new(verified))
    }
}

/// The PayPal IPN provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct PayPal;

/// Fields that name a key, first present wins: (field, key kind).
///
/// `subscr_id` and `recurring_payment_id` share one id space (`profile:`); refunds and
/// reversals name their payment in `parent_txn_id`, so they follow that payment's key.
const KEY_FIELDS: [(&str, &str); 5] = [
    ("subscr_id", "profile"),
    ("recurring_payment_id", "profile"),
    ("mp_id", "ba"),
    ("parent_txn_id", "txn"),
    ("txn_id", "txn"),
];

impl PayPal {
    /// The order key of a parsed IPN: the first present key field, else the body's hash
    /// (masspay and other messages that order with nothing).
    pub fn order_key_of(form: &Form, body: &[u8]) -> OrderKey {
        key_from(KEY_FIELDS.iter().map(|(field, _)| form.text(field)), body)
    }
}

impl PayPal {
    /// The dedup keys of a parsed IPN: its body hash, and the semantic key
    /// `ipn_track_id|txn_type|txn_id|payment_status` when it has an `ipn_track_id` (`resend` and
    /// every other field ignored). `ipn_track_id` alone is not unique: a signup and its first
    /// payment share it, and so does an eCheck's Pending and Completed, which differ in status.
    pub fn dedup_keys(form: &Form, body: &[u8]) -> DedupKeys {
        let field = |name| form.text(name).unwrap_or_default();
        let semantic = form.text("ipn_track_id").map(|track| {
            format!(
                "{track}|{}|{}|{}",
                field("txn_type"),
                field("txn_id"),
                field("payment_status")
            )
        });
        DedupKeys {
            body_sha256: body_hash(body),
            semantic,
        }
    }
}

/// The first non-blank id, in [`KEY_FIELDS`] order, makes the key.
fn key_from(ids: impl Iterator<Item = Option<String>>, body: &[u8]) -> OrderKey {
    KEY_FIELDS
        .iter()
        .zip(ids)
        .find_map(|((_, kind), id)| {
            let id = id?;
            let id = id.trim();
            (!id.is_empty()).then(|| OrderKey::new(kind, id))
        })
        .unwrap_or_else(|| OrderKey::of_body(body))
}

impl Provider for PayPal {
    fn name(&self) -> &'static str {
        NAME
    }

    fn accepts_content_type(&self, content_type: Option<&str>) -> bool {
        let Some(content_type) = content_type else {
            return false;
        };
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    }

    /// PayPal wants an HTTP 200; the body is ignored, so it is empty.
    fn acknowledgement(&self) -> &'static [u8] {
        b""
    }

    /// Reads only the fields it needs, without parsing the whole body (the ingress's hot path);
    /// gives the same key as [`PayPal::order_key_of`].
    fn order_key(&self, body: &[u8]) -> OrderKey {
        let names = KEY_FIELDS.map(|(field, _)| field);
        let [charset, ids @ ..] = fields(
            body,
            ["charset", names[0], names[1], names[2], names[3], names[4]],
        );
        let charset = form::charset_of(charset.as_deref());
        key_from(
            ids.into_iter().map(|raw| form::text_of(charset, &raw?)),
            body,
        )
    }
}

/// The sample bodies in tests/samples/, loaded the same way the integration tests load them.
#[cfg(test)]
#[path = "../../../tests/samples.rs"]
pub(crate) mod samples_dir;

#[cfg(test)]
mod tests {
    use super::samples_dir::{sample, samples};
    use super::*;

    /// The order key of every sample, as listed in tests/samples/README.md.
    const EXPECTED_KEYS: [(&str, &str); 26] = [
        ("001_web_accept.txt", "txn:8FX91612UX4519215"),
        ("002_refunded.txt", "txn:8FX91612UX4519215"),
        ("003_cart.txt", "txn:6TS1068787252245S"),
        ("004_reversed.txt", "txn:6TS1068787252245S"),
        ("005_adjustment.txt", "txn:6TS1068787252245S"),
        ("006_express_checkout.txt", "txn:51403485VH153354B"),
        ("007_new_case.txt", "txn:51403485VH153354B"),
        ("008_reversed.txt", "txn:51403485VH153354B"),
        ("009_canceled_reversal.txt", "txn:51403485VH153354B"),
        ("010_web_accept_echeck_pending.txt", "txn:4MC0186636400980G"),
        (
            "011_web_accept_echeck_completed.txt",
            "txn:4MC0186636400980G",
        ),
        ("012_subscr_signup.txt", "profile:I-7PX4WQ2N9KD3"),
        ("013_subscr_payment.txt", "profile:I-7PX4WQ2N9KD3"),
        ("014_subscr_payment.txt", "profile:I-7PX4WQ2N9KD3"),
        ("015_refunded.txt", "profile:I-7PX4WQ2N9KD3"),
        ("016_subscr_cancel.txt", "profile:I-7PX4WQ2N9KD3"),
        ("017_subscr_eot.txt", "profile:I-7PX4WQ2N9KD3"),
        ("018_subscr_signup.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("019_subscr_modify.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("020_subscr_payment.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("021_subscr_failed.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("022_subscr_failed.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("023_subscr_eot.txt", "profile:I-3NH8V1TQ6ZRB"),
        ("041_masspay.txt", "msg:"),
        ("042_send_money.txt", "txn:0W743212FG220445R"),
        ("043_web_accept_simulator.txt", "txn:593976436"),
    ];

    #[test]
    fn every_sample_gets_its_documented_order_key() {
        let samples = samples();
        assert_eq!(
            samples.len(),
            EXPECTED_KEYS.len(),
            "a sample without an expectation"
        );
        for ((name, body), (expected_name, expected_key)) in samples.iter().zip(EXPECTED_KEYS) {
            assert_eq!(name, expected_name);
            let key = PayPal.order_key(body);
            assert_eq!(
                key,
                PayPal::order_key_of(&Form::parse(body), body),
                "{name}"
            );
            if expected_key == "msg:" {
                assert_eq!(key, OrderKey::of_body(body), "{name}");
            } else {
                assert_eq!(key.as_str(), expected_key, "{name}");
            }
        }
    }

    #[test]
    fn every_sample_decodes_without_replacement_characters() {
        for (name, body) in samples() {
            let form = Form::parse(&body);
            assert!(!form.is_empty(), "{name}");
            for (field, value) in form.decoded() {
                assert!(!value.contains('\u{FFFD}'), "{name}: {field}={value}");
            }
            let named = form.raw("charset").is_some();
            assert_eq!(form.charset().assumed, !named, "{name}");
        }
    }

    #[test]
    fn sample_names_decode_in_their_own_charset() {
        let read = |name: &str| Form::parse(&sample(name));
        assert_eq!(
            read("001_web_accept.txt").text("last_name").as_deref(),
            Some("Müller")
        );
        assert_eq!(
            read("001_web_accept.txt").text("item_name").as_deref(),
            Some("Gartenbuch – Jahresabo")
        );
        assert_eq!(
            read("003_cart.txt").text("address_city").as_deref(),
            Some("Besançon")
        );
        assert_eq!(
            read("012_subscr_signup.txt")
                .text("address_name")
                .as_deref(),
            Some("Sigríður Guðmundsdóttir")
        );
        assert_eq!(
            read("010_web_accept_echeck_pending.txt")
                .text("first_name")
                .as_deref(),
            Some("François")
        );
        let simulator = read("043_web_accept_simulator.txt");
        assert_eq!(
            simulator.text("address_name").as_deref(),
            Some("John Smith")
        );
        assert!(simulator.charset().assumed);
        // The simulator's literal `+` in `GMT+0100` is a space by the form rules.
        assert!(
            simulator
                .text("payment_date")
                .is_some_and(|d| d.contains("GMT 0100"))
        );
    }

    #[test]
    fn dedup_keys_tell_resends_from_distinct_messages() {
        let keys = |name: &str| {
            let body = sample(name);
            PayPal::dedup_keys(&Form::parse(&body), &body)
        };
        // A signup and its first payment share ipn_track_id: distinct.
        assert_ne!(
            keys("012_subscr_signup.txt").semantic,
            keys("013_subscr_payment.txt").semantic
        );
        // An eCheck's Pending and Completed share txn_id: distinct.
        let pending = keys("010_web_accept_echeck_pending.txt");
        let completed = keys("011_web_accept_echeck_completed.txt");
        assert_ne!(pending.event_id(), completed.event_id());
        // A manual resend (`resend=true` added) is the same message.
        let original = sample("001_web_accept.txt");
        let mut resent = original.clone();
        resent.extend_from_slice(b"&resend=true");
        let original_keys = PayPal::dedup_keys(&Form::parse(&original), &original);
        let resent_keys = PayPal::dedup_keys(&Form::parse(&resent), &resent);
        assert_ne!(original_keys.body_sha256, resent_keys.body_sha256);
        assert_eq!(original_keys.event_id(), resent_keys.event_id());
        // The simulator sends no ipn_track_id: only its bytes identify it.
        assert_eq!(keys("043_web_accept_simulator.txt").semantic, None);
        // Every sample has its own event id.
        let ids: std::collections::HashSet<_> = samples()
            .iter()
            .map(|(_, b)| PayPal::dedup_keys(&Form::parse(b), b).event_id())
            .collect();
        assert_eq!(ids.len(), samples().len());
    }

    #[test]
    fn an_empty_key_field_is_skipped() {
        let body = b"subscr_id=&txn_id=ABC";
        assert_eq!(PayPal.order_key(body).as_str(), "txn:ABC");
    }

    #[test]
    fn form_content_types_are_accepted_with_parameters_and_any_case() {
        assert!(PayPal.accepts_content_type(Some("application/x-www-form-urlencoded")));
        assert!(
            PayPal.accepts_content_type(Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"))
        );
        assert!(!PayPal.accepts_content_type(Some("application/json")));
        assert!(!PayPal.accepts_content_type(Some("multipart/form-data; boundary=x")));
        assert!(!PayPal.accepts_content_type(None));
    }
}
