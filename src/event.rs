//! The business event a verified IPN becomes: the contract downstream services consume.
//!
//! JSON, `content_type: application/json`, published persistent to `<p>.events` (topic) with
//! routing key `<provider>.<kind>.<type|none>.<status|none>` in lower case (version 2 of the
//! contract). Documented in docs/events.md, with a JSON Schema (docs/event.schema.json) and an
//! example per sample and provider (docs/examples/, checked against this code by a unit test).

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use serde::Serialize;

use crate::keys::OrderKey;
use crate::provider::{Kind, Verified};
use crate::store::Reservation;

/// Version of the event's shape; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 2;

/// The longest word of a routing key taken from a notification's fields (its type, its status):
/// three such words, a kind of at most 12 bytes (`subscription`) and three dots make 255 bytes,
/// AMQP's limit for a routing key. Provider ids are far shorter; a word is cut, never refused.
pub const MAX_ROUTING_WORD_BYTES: usize = 80;

/// One verified IPN, as business services receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Stable id: the same IPN (resends included) always has the same id. Deduplicate on it.
    pub event_id: String,
    /// `paypal`, `alipay`, `wechatpay`.
    pub provider: String,
    /// Events of one key are published in the order the bridge received them.
    pub order_key: String,
    /// 1, 2, 3... within the order key, without gaps.
    pub sequence: i64,
    /// What it is about, for every provider: `payment`, `refund`, `dispute`, `subscription`,
    /// `payout`, `other`.
    pub kind: Kind,
    /// The provider's status, lower case (`completed`, `trade_success`, `success`).
    pub status: Option<String>,
    /// The amount in the currency's major unit, a decimal string.
    pub amount: Option<String>,
    /// ISO 4217, when known.
    pub currency: Option<String>,
    /// The provider's transaction id.
    pub transaction_id: Option<String>,
    /// The merchant's own order id (PayPal `invoice`, Alipay and WeChat Pay `out_trade_no`).
    pub merchant_order_id: Option<String>,
    /// The provider's own type field: PayPal `txn_type`, Alipay `notify_type`, WeChat Pay
    /// `event_type`.
    pub txn_type: Option<String>,
    /// The provider's own status field: PayPal `payment_status`, Alipay `trade_status`, WeChat
    /// Pay `trade_state` / `refund_status`.
    pub payment_status: Option<String>,
    /// The provider's transaction id (as `transaction_id`; kept from version 1).
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
    /// Builds the event of a verified notification, taking its fields over (no copy of them).
    pub fn new(verified: Verified, body: &[u8], context: &Context<'_>) -> Event {
        let transaction_id = verified.txn_id.clone();
        Event {
            schema_version: SCHEMA_VERSION,
            event_id: context.reservation.event_id.to_string(),
            provider: context.provider.to_owned(),
            order_key: context.order_key.to_string(),
            sequence: context.reservation.sequence,
            kind: verified.kind,
            status: verified.status,
            amount: verified.amount,
            currency: verified.currency,
            transaction_id,
            merchant_order_id: verified.merchant_order_id,
            txn_type: verified.txn_type,
            payment_status: verified.payment_status,
            txn_id: verified.txn_id,
            test: verified.test,
            received_at: rfc3339(context.received_at),
            verified_at: rfc3339(verified.verified_at),
            charset: verified.charset,
            charset_assumed: verified.charset_assumed,
            fields: verified.fields,
            raw_body_base64: base64::engine::general_purpose::STANDARD.encode(body),
        }
    }

    /// `<provider>.<kind>.<type|none>.<status|none>`, lower case, always four words, e.g.
    /// `paypal.subscription.subscr_payment.completed`, `alipay.refund.trade_status_sync.trade_closed`,
    /// `wechatpay.payment.transaction_success.success`; bind a family with one pattern
    /// (`paypal.subscription.#`, `*.refund.#`). Characters with a meaning in topic patterns
    /// (`.`, `*`, `#`) become `_`; each word is cut to [`MAX_ROUTING_WORD_BYTES`] (at a
    /// character's end), so the key always fits AMQP's 255-byte routing key.
    pub fn routing_key(&self) -> String {
        let word = |value: Option<&str>| {
            let text = value.unwrap_or("none").to_lowercase();
            let mut clean = String::new();
            for c in text.chars() {
                if clean.len() + c.len_utf8() > MAX_ROUTING_WORD_BYTES {
                    break;
                }
                clean.push(if matches!(c, '.' | '*' | '#') { '_' } else { c });
            }
            if clean.is_empty() {
                "none".to_owned()
            } else {
                clean
            }
        };
        format!(
            "{}.{}.{}.{}",
            word(Some(&self.provider)),
            self.kind.as_str(),
            word(self.txn_type.as_deref()),
            word(self.status.as_deref()),
        )
    }

    /// The `txn_id` the history stores and `ipnctl events find --txn` looks up: trimmed, as the
    /// id checks judged it (so at most 64 bytes of printable ASCII, far inside a btree index
    /// row, whatever white space surrounded it); `None` when absent or blank.
    pub fn stored_txn_id(&self) -> Option<&str> {
        let txn_id = self.txn_id.as_deref()?.trim();
        (!txn_id.is_empty()).then_some(txn_id)
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

    use lapin::types::ShortString;

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
        Event::new(*verified, body, &context)
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
        assert_eq!(
            key("013_subscr_payment.txt"),
            "paypal.subscription.subscr_payment.completed"
        );
        assert_eq!(key("002_refunded.txt"), "paypal.refund.none.refunded");
        assert_eq!(
            key("012_subscr_signup.txt"),
            "paypal.subscription.subscr_signup.none"
        );
        assert_eq!(
            key("009_canceled_reversal.txt"),
            "paypal.dispute.express_checkout.canceled_reversal"
        );
        assert_eq!(key("007_new_case.txt"), "paypal.dispute.new_case.none");
        assert_eq!(key("041_masspay.txt"), "paypal.payout.masspay.processed");
        assert_eq!(
            key("001_web_accept.txt"),
            "paypal.payment.web_accept.completed"
        );
        let mut odd = example(b"txn_type=a.b&payment_status=%23*");
        assert_eq!(odd.routing_key(), "paypal.payment.a_b.__");
        odd.txn_type = None;
        assert_eq!(odd.routing_key(), "paypal.payment.none.__");
    }

    #[test]
    fn routing_keys_fit_amqp_whatever_the_words_hold() {
        let mut event = example(b"txn_type=web_accept&payment_status=Completed");
        event.kind = Kind::Subscription;
        // Three-byte characters (U+3000 is white space, which the id checks trim away), a
        // four-byte one, and plain ASCII, each far past a word's budget.
        for long in [
            "\u{3000}".repeat(200),
            "\u{1F600}".repeat(100),
            "a".repeat(300),
        ] {
            event.txn_type = Some(format!("{long}web_accept"));
            event.status = Some(long.clone());
            let key = event.routing_key();
            assert!(key.len() <= 255, "{} bytes", key.len());
            assert!(ShortString::try_new(key.as_str()).is_ok());
            let words: Vec<&str> = key.split('.').collect();
            assert_eq!(words[..2], ["paypal", "subscription"]);
            for word in &words[2..] {
                assert!(word.len() <= MAX_ROUTING_WORD_BYTES, "{word}");
                assert!(long.starts_with(word), "a word is cut, not changed: {word}");
                assert!(word.len() + 4 > MAX_ROUTING_WORD_BYTES, "cut at the budget");
            }
        }
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

    /// The event of a verified notification of another provider, first of its key, at the
    /// examples' fixed times.
    fn provider_event(provider: &str, order_key: &str, verified: Verified, body: &[u8]) -> Event {
        let order_key = OrderKey::from_header(order_key);
        let context = Context {
            order_key: &order_key,
            reservation: Reservation {
                event_id: verified.dedup.event_id(),
                sequence: 1,
            },
            received_at: UNIX_EPOCH + Duration::from_millis(1_763_900_000_123),
            provider,
        };
        Event::new(verified, body, &context)
    }

    /// An example event per provider and type besides PayPal's samples: file name and event.
    fn provider_examples() -> Vec<(String, Event)> {
        use crate::provider::{alipay, wechatpay};
        let at = UNIX_EPOCH + Duration::from_millis(1_763_900_000_373);
        let mut examples = Vec::new();
        let payment = "notify_time=2026-12-01+10%3A00%3A02&notify_type=trade_status_sync&notify_id=2026120100222155624068450559358070&app_id=2021004100000001&charset=utf-8&version=1.0&sign_type=RSA2&sign=c2lnbg%3D%3D&trade_no=2026120122001468450512505578&out_trade_no=ORDER-20261201-0001&buyer_logon_id=xud***%40126.com&seller_id=2088531891668739&trade_status=TRADE_SUCCESS&total_amount=88.00&receipt_amount=88.00&subject=%E8%AF%AD%E9%9B%80%E7%A9%BA%E9%97%B4&gmt_payment=2026-12-01+10%3A00%3A01";
        let refund = "notify_time=2026-12-02+09%3A00%3A02&notify_type=trade_status_sync&notify_id=2026120200222155624068450559358071&app_id=2021004100000001&charset=utf-8&version=1.0&sign_type=RSA2&sign=c2lnbg%3D%3D&trade_no=2026120122001468450512505578&out_trade_no=ORDER-20261201-0001&out_biz_no=R-0001&seller_id=2088531891668739&trade_status=TRADE_SUCCESS&total_amount=88.00&refund_fee=30.00&gmt_refund=2026-12-02+09%3A00%3A01.123&gmt_payment=2026-12-01+10%3A00%3A01";
        for (name, body) in [
            ("alipay_trade_success", payment),
            ("alipay_refund_partial", refund),
        ] {
            let form = Form::parse(body.as_bytes());
            let verified = alipay::verified(&form, body.as_bytes(), at);
            let key = alipay::order_key(&form, body.as_bytes());
            let event = provider_event("alipay", key.as_str(), verified, body.as_bytes());
            examples.push((name.to_owned(), event));
        }
        let envelope = |event_type: &str, original: &str| {
            format!(
                r#"{{"id":"EV-2026120110000001-{original}","create_time":"2026-12-01T10:00:01+08:00","resource_type":"encrypt-resource","event_type":"{event_type}","summary":"支付成功","resource":{{"original_type":"{original}","algorithm":"AEAD_AES_256_GCM","ciphertext":"(the resource below, encrypted)","associated_data":"{original}","nonce":"Kj7QIyUiYx1q"}}}}"#
            )
        };
        let transaction = r#"{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"ORDER-20261201-0006","transaction_id":"4200000000202612010000000001","trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"支付成功","bank_type":"CMC","success_time":"2026-12-01T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},"amount":{"total":8800,"payer_total":8800,"currency":"CNY","payer_currency":"CNY"}}"#;
        let refunded = r#"{"mchid":"1900000109","out_trade_no":"ORDER-20261201-0006","transaction_id":"4200000000202612010000000001","out_refund_no":"R-0001","refund_id":"50000000382019052709732678859","refund_status":"SUCCESS","success_time":"2026-12-01T10:05:00+08:00","user_received_account":"招商银行信用卡0403","amount":{"total":8800,"refund":3000,"payer_total":8800,"payer_refund":3000}}"#;
        for (name, event_type, original, plain) in [
            (
                "wechatpay_transaction_success",
                "TRANSACTION.SUCCESS",
                "transaction",
                transaction,
            ),
            (
                "wechatpay_refund_success",
                "REFUND.SUCCESS",
                "refund",
                refunded,
            ),
        ] {
            let body = envelope(event_type, original);
            let opened =
                wechatpay::Opened::parse(body.as_bytes(), plain.as_bytes()).expect("opens");
            let key = opened.order_key(body.as_bytes());
            let verified = opened.verified(body.as_bytes(), at);
            let event = provider_event("wechatpay", key.as_str(), verified, body.as_bytes());
            examples.push((name.to_owned(), event));
        }
        examples
    }

    #[test]
    fn the_providers_normalized_fields_and_routing_keys() {
        let examples: std::collections::BTreeMap<String, Event> =
            provider_examples().into_iter().collect();
        let ali = &examples["alipay_trade_success"];
        assert_eq!(
            (ali.kind, ali.amount.as_deref(), ali.currency.as_deref()),
            (Kind::Payment, Some("88.00"), Some("CNY"))
        );
        assert_eq!(
            ali.merchant_order_id.as_deref(),
            Some("ORDER-20261201-0001")
        );
        assert_eq!(
            ali.routing_key(),
            "alipay.payment.trade_status_sync.trade_success"
        );
        let refund = &examples["alipay_refund_partial"];
        assert_eq!(
            (refund.kind, refund.amount.as_deref()),
            (Kind::Refund, Some("30.00"))
        );
        assert_eq!(
            refund.routing_key(),
            "alipay.refund.trade_status_sync.trade_success"
        );
        let wx = &examples["wechatpay_transaction_success"];
        assert_eq!(
            (wx.kind, wx.amount.as_deref(), wx.currency.as_deref()),
            (Kind::Payment, Some("88.00"), Some("CNY")),
            "8800 fen"
        );
        assert_eq!(
            wx.routing_key(),
            "wechatpay.payment.transaction_success.success"
        );
        let wx_refund = &examples["wechatpay_refund_success"];
        assert_eq!(
            (
                wx_refund.kind,
                wx_refund.amount.as_deref(),
                wx_refund.currency.as_deref()
            ),
            (Kind::Refund, Some("30.00"), None),
            "a WeChat Pay refund names no currency"
        );
        assert_eq!(wx_refund.order_key, "wechatpay:ORDER-20261201-0006");
        assert_eq!(
            wx_refund.routing_key(),
            "wechatpay.refund.refund_success.success"
        );
        // One pattern per family, whoever sent it: every refund matches `*.refund.#`.
        for event in examples.values() {
            let words: Vec<String> = event.routing_key().split('.').map(str::to_owned).collect();
            assert_eq!(words.len(), 4, "{}", event.routing_key());
            assert_eq!(words[0], event.provider);
        }
        assert_eq!(crate::provider::minor_units(-5, None), "-0.05");
        assert_eq!(crate::provider::minor_units(1200, Some("JPY")), "1200");
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
        let paypal = samples()
            .into_iter()
            .map(|(name, body)| (name, example(&body)));
        for (name, event) in paypal.chain(provider_examples()) {
            let event = serde_json::to_value(event).expect("json");
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
        let paypal = samples()
            .into_iter()
            .map(|(name, body)| (name.replace(".txt", ""), example(&body)));
        for (name, event) in paypal.chain(provider_examples()) {
            let path = dir.join(format!("{name}.json"));
            let produced = serde_json::to_string_pretty(&event).expect("json") + "\n";
            if std::env::var_os("UPDATE_EXAMPLES").is_some() {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, &produced).expect("write example");
            }
            let documented = std::fs::read_to_string(&path).expect("example exists");
            assert_eq!(documented, produced, "{} is out of date", path.display());
        }
    }
}
