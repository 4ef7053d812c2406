//! The business event a verified IPN becomes: the contract downstream services consume.
//!
//! JSON, `content_type: application/json`, published persistent to `<p>.events` (topic) with
//! routing key `<txn_type|none>.<payment_status|none>` in lower case. Documented in
//! docs/events.md, with a JSON Schema (docs/event.schema.json) and an example per sample
//! (docs/examples/, checked against this code by a unit test).

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use serde::Serialize;

use crate::keys::OrderKey;
use crate::provider::Verified;
use crate::store::Reservation;

/// Version of the event's shape; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// One verified IPN, as business services receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Stable id: the same IPN (resends included) always has the same id. Deduplicate on it.
    pub event_id: String,
    /// `paypal`.
    pub provider: String,
    /// Events of one key are published in the order the bridge received them.
    pub order_key: String,
    /// 1, 2, 3... within the order key, without gaps.
    pub sequence: i64,
    /// `txn_type`, when present.
    pub txn_type: Option<String>,
    /// `payment_status`, when present.
    pub payment_status: Option<String>,
    /// `txn_id`, when present.
    pub txn_id: Option<String>,
    /// True for sandbox IPNs (`test_ipn=1`).
    pub test: bool,
    /// When the ingress received the IPN (RFC 3339).
    pub received_at: String,
    /// When PayPal answered VERIFIED (RFC 3339).
    pub verified_at: String,
    /// The charset the fields were decoded with (encoding_rs name, e.g. `windows-1252`).
    pub charset: String,
    /// True when the IPN named no charset, or an unknown one, and windows-1252 was assumed.
    pub charset_assumed: bool,
    /// Every field, decoded to UTF-8. When a name repeats, the first value is kept (the raw
    /// body has them all).
    pub fields: BTreeMap<String, String>,
    /// The exact bytes PayPal posted, base64 (standard alphabet, padded).
    pub raw_body_base64: String,
}

/// What the worker knows about an IPN besides its body.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// From `x-ipn-order-key`.
    pub order_key: &'a OrderKey,
    /// From the store's claim.
    pub reservation: Reservation,
    /// From `x-ipn-received-at`.
    pub received_at: SystemTime,
    /// Whose notification it is: `paypal`, `alipay`, `wechatpay`.
    pub provider: &'a str,
}

impl Event {
    /// Builds the event of a verified notification.
    pub fn new(verified: &Verified, body: &[u8], context: &Context<'_>) -> Event {
        Event {
            schema_version: SCHEMA_VERSION,
            event_id: context.reservation.event_id.to_string(),
            provider: context.provider.to_owned(),
            order_key: context.order_key.to_string(),
            sequence: context.reservation.sequence,
            txn_type: verified.txn_type.clone(),
            payment_status: verified.payment_status.clone(),
            txn_id: verified.txn_id.clone(),
            test: verified.test,
            received_at: rfc3339(context.received_at),
            verified_at: rfc3339(verified.verified_at),
            charset: verified.charset.clone(),
            charset_assumed: verified.charset_assumed,
            fields: verified.fields.clone(),
            raw_body_base64: base64::engine::general_purpose::STANDARD.encode(body),
        }
    }

    /// `<txn_type|none>.<payment_status|none>`, lower case, e.g. `subscr_payment.completed`;
    /// for a provider other than PayPal, prefixed with its name
    /// (`alipay.trade_status_sync.trade_success`), so no PayPal binding receives it.
    /// Characters with a meaning in topic patterns (`.`, `*`, `#`) become `_`.
    pub fn routing_key(&self) -> String {
        let part = |value: &Option<String>| {
            let text = value.as_deref().unwrap_or("none").to_lowercase();
            let clean: String = text
                .chars()
                .map(|c| if matches!(c, '.' | '*' | '#') { '_' } else { c })
                .take(100)
                .collect();
            clean
        };
        let key = format!("{}.{}", part(&self.txn_type), part(&self.payment_status));
        match self.provider.as_str() {
            crate::provider::paypal::NAME => key,
            provider => format!("{provider}.{key}"),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::form::Form;
    use crate::provider::paypal::samples_dir::samples;
    use crate::provider::{Checked, PayPal, Queued};

    /// The event of a sample as it would be the first of its key, at fixed times, as the
    /// worker builds it: PayPal's checks, a live-mode config that takes any receiver.
    fn example(body: &[u8]) -> Event {
        let form = Form::parse(body);
        let order_key = PayPal::order_key_of(&form, body);
        let received_at = UNIX_EPOCH + Duration::from_millis(1_763_900_000_123);
        let header = |_: &str| None;
        let queued = Queued {
            provider: "paypal",
            body,
            key: &order_key,
            received_at: Some(received_at),
            header: &header,
        };
        let test = form.text("test_ipn").as_deref() == Some("1");
        let config = crate::config::Paypal {
            environment: if test {
                crate::config::Environment::Sandbox
            } else {
                crate::config::Environment::Live
            },
            ..crate::config::Paypal::default()
        };
        let verified = match crate::provider::paypal::check(body) {
            Checked::Postback(pending) => {
                let at = received_at + Duration::from_millis(250);
                match pending.after_postback(&config, &queued, at) {
                    Checked::Passed(verified) => verified,
                    other => panic!("not passed: {other:?}"),
                }
            }
            other => panic!("no postback asked: {other:?}"),
        };
        let reservation = Reservation {
            event_id: verified.dedup.event_id(),
            sequence: 1,
        };
        let context = Context {
            order_key: &order_key,
            reservation,
            received_at,
            provider: "paypal",
        };
        Event::new(&verified, body, &context)
    }

    #[test]
    fn routing_keys_are_lower_case_with_none_for_absent_fields() {
        let key = |name: &str| {
            let (_, body) = samples()
                .into_iter()
                .find(|(n, _)| n == name)
                .expect("sample");
            example(&body).routing_key()
        };
        assert_eq!(key("013_subscr_payment.txt"), "subscr_payment.completed");
        assert_eq!(key("002_refunded.txt"), "none.refunded");
        assert_eq!(key("012_subscr_signup.txt"), "subscr_signup.none");
        assert_eq!(
            key("009_canceled_reversal.txt"),
            "express_checkout.canceled_reversal"
        );
        let mut odd = example(b"txn_type=a.b&payment_status=%23*");
        assert_eq!(odd.routing_key(), "a_b.__");
        odd.txn_type = None;
        assert_eq!(odd.routing_key(), "none.__");
    }

    #[test]
    fn fields_are_decoded_in_their_charset_and_the_raw_body_is_exact() {
        for (name, body) in samples() {
            let event = example(&body);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(&event.raw_body_base64)
                .expect("base64");
            assert_eq!(raw, body, "{name}");
            assert!(
                event.fields.values().all(|v| !v.contains('\u{FFFD}')),
                "{name}"
            );
        }
        let (_, body) = samples()
            .into_iter()
            .find(|(n, _)| n == "001_web_accept.txt")
            .expect("sample");
        let event = example(&body);
        assert_eq!(event.fields["last_name"], "Müller");
        assert_eq!(event.charset, "windows-1252");
        assert!(!event.test);
        assert_eq!(event.txn_id.as_deref(), Some("8FX91612UX4519215"));
        assert_eq!(event.received_at, "2025-11-23T12:13:20.123Z");
    }

    #[test]
    fn every_example_event_satisfies_the_documented_schema() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let schema_text =
            std::fs::read_to_string(root.join("docs/event.schema.json")).expect("schema");
        let schema: serde_json::Value = serde_json::from_str(&schema_text).expect("schema is JSON");
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("a valid schema");
        for (name, body) in samples() {
            let event = serde_json::to_value(example(&body)).expect("json");
            let errors: Vec<String> = validator
                .iter_errors(&event)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{name}: {errors:?}");
        }
        let mut broken = serde_json::to_value(example(b"txn_id=X")).expect("json");
        broken["sequence"] = serde_json::json!(0);
        assert!(
            !validator.is_valid(&broken),
            "the schema rejects what the contract forbids"
        );
    }

    /// docs/examples/<sample>.json must be exactly what this code produces, so the documented
    /// contract cannot drift. Regenerate with `UPDATE_EXAMPLES=1 cargo test --lib event`.
    #[test]
    fn the_documented_examples_are_what_the_code_produces() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
        for (name, body) in samples() {
            let path = dir.join(name.replace(".txt", ".json"));
            let produced = serde_json::to_string_pretty(&example(&body)).expect("json") + "\n";
            if std::env::var_os("UPDATE_EXAMPLES").is_some() {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, &produced).expect("write example");
            }
            let documented = std::fs::read_to_string(&path).expect("example exists");
            assert_eq!(documented, produced, "{} is out of date", path.display());
        }
    }
}
