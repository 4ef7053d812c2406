//! Alipay's asynchronous notification (`trade_status_sync`): a form POST, signed by Alipay with
//! SHA256withRSA (`RSA2`), acknowledged with the 7 bytes `success`.
//!
//! The signature is checked against the configured Alipay public key(s) (a notification names no
//! key, so during a rotation each configured one is tried; the algorithm comes from the config,
//! never from the message's `sign_type`). The signed content: the form decoded exactly once
//! (`+` → space, `%XX` → the byte; a value such as `passback_params` that is itself
//! percent-encoded stays so), without `sign` and `sign_type`, without empty values, sorted by
//! name, joined as `name=value` with `&`, in the message's own `charset` (the decoded bytes are
//! that charset's bytes already, so nothing is re-encoded).
//!
//! `notify_id` is the same on each of Alipay's resends of one notification while `notify_time`
//! and `sign` change: the dedup key. The order key is the merchant's `out_trade_no` (refunds and
//! closes of a payment are `trade_status_sync` notifications of the same `out_trade_no`).

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine;

use crate::config;
use crate::form::Form;
use crate::keys::{DedupKeys, OrderKey, body_hash};
use crate::policy::Reason;
use crate::provider::{Checked, Failure, Kind, Provider, Received, Refused, Verified};

/// The route's name in headers, metrics and events.
pub const NAME: &str = "alipay";

/// The fields that identify a notification: short printable ASCII in every genuine one
/// ([`crate::policy::fields_processable`]).
pub const ID_FIELDS: [&str; 7] = [
    "notify_id",
    "notify_type",
    "out_trade_no",
    "trade_no",
    "trade_status",
    "app_id",
    "seller_id",
];

/// What the event names as type, status and transaction id: `notify_type`, `trade_status`,
/// `trade_no`.
pub fn event_fields(form: &Form) -> [Option<String>; 3] {
    [
        form.text("notify_type"),
        form.text("trade_status"),
        form.text("trade_no"),
    ]
}

/// Why a notification is refused at the door (answered `fail`, so Alipay resends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `sign` field, or one that is not base64.
    #[error("unsigned")]
    Unsigned,
    /// No configured key verifies the signature.
    #[error("bad signature")]
    BadSignature,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad-signature",
        }
    }
}

/// Alipay, as configured.
#[derive(Debug, Clone)]
pub struct Alipay {
    keys: Vec<Vec<u8>>,
    app_id: String,
    seller_ids: Vec<String>,
}

impl Alipay {
    /// From a validated `[alipay]` section (its keys parse).
    pub fn new(config: &config::Alipay) -> Alipay {
        Alipay {
            keys: config
                .public_keys
                .iter()
                .filter_map(|key| public_key_der(key).ok())
                .collect(),
            app_id: config.app_id.clone(),
            seller_ids: config.seller_ids.clone(),
        }
    }

    /// Checks the signature of a raw notification body.
    pub fn verify(&self, body: &[u8]) -> Result<(), Refusal> {
        self.verify_form(&Form::parse(body))
    }

    /// [`Alipay::verify`] of a notification already parsed.
    pub fn verify_form(&self, form: &Form) -> Result<(), Refusal> {
        let signature = form
            .raw("sign")
            .and_then(|sign| base64::engine::general_purpose::STANDARD.decode(sign).ok())
            .ok_or(Refusal::Unsigned)?;
        let content = signed_content(form);
        let verifies = |der: &Vec<u8>| {
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
                .verify(&content, &signature)
                .is_ok()
        };
        if self.keys.iter().any(verifies) {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }

    /// The worker's checks: the ingress checked the signature before queueing; it is checked
    /// again here (a public-key operation, no network), so a message put in a shard by anyone
    /// else with access to the broker is not taken for Alipay's. Then the policy.
    pub fn check(&self, body: &[u8]) -> Checked {
        if let Err(checked) = super::readable(body) {
            return checked;
        }
        let form = Form::parse(body);
        if let Err(cause) = crate::policy::fields_processable(&form, &ID_FIELDS) {
            return Checked::Rejected(Reason::Unprocessable, Some(cause));
        }
        if self.verify_form(&form).is_err() {
            return Checked::Rejected(Reason::Invalid, None);
        }
        if let Err(reason) = self.policy(&form) {
            return Checked::Rejected(reason, None);
        }
        Checked::Passed(Box::new(verified(
            &form,
            body,
            std::time::SystemTime::now(),
        )))
    }

    /// The checks after the signature: addressed to our app, and (when the config names sellers)
    /// to one of our sellers.
    pub fn policy(&self, form: &Form) -> Result<(), Reason> {
        if form.text("app_id").as_deref() != Some(self.app_id.as_str()) {
            return Err(Reason::ForeignReceiver);
        }
        match form.text("seller_id") {
            Some(seller) if !self.seller_ids.is_empty() && !self.seller_ids.contains(&seller) => {
                Err(Reason::ForeignReceiver)
            }
            _ => Ok(()),
        }
    }
}

/// A verified notification as the pipeline takes it. A refund (partial: `TRADE_SUCCESS` with
/// `refund_fee`; full: `TRADE_CLOSED` with it) is kind `refund` with the cumulative `refund_fee`
/// as its amount; otherwise a payment of `total_amount`. Amounts are yuan (`CNY`) unless the
/// notification names a `trans_currency`.
pub fn verified(form: &Form, body: &[u8], verified_at: std::time::SystemTime) -> Verified {
    let mut verified = Verified::of_form(
        form,
        dedup_keys(form, body),
        event_fields(form),
        verified_at,
    );
    let refunded = form.text("refund_fee").filter(|fee| !fee.trim().is_empty());
    verified.kind = if refunded.is_some() {
        Kind::Refund
    } else {
        Kind::Payment
    };
    verified.amount = refunded.or_else(|| form.text("total_amount"));
    verified.currency = Some(
        form.text("trans_currency")
            .unwrap_or_else(|| "CNY".to_owned()),
    );
    verified.merchant_order_id = form.text("out_trade_no");
    verified
}

/// The order key of a notification: `alipay:<out_trade_no>`, or the body's hash without one.
pub fn order_key(form: &Form, body: &[u8]) -> OrderKey {
    match form.text("out_trade_no").filter(|id| !id.trim().is_empty()) {
        Some(id) => OrderKey::new(NAME, id.trim()),
        None => OrderKey::of_body(body),
    }
}

/// The dedup keys: the body hash, and `alipay|<notify_id>` (the same across Alipay's resends).
pub fn dedup_keys(form: &Form, body: &[u8]) -> DedupKeys {
    DedupKeys {
        body_sha256: body_hash(body),
        semantic: form.text("notify_id").map(|id| format!("{NAME}|{id}")),
    }
}

/// The bytes Alipay signs; see the module docs.
pub fn signed_content(form: &Form) -> Vec<u8> {
    let mut pairs: Vec<(&[u8], &[u8])> = form
        .pairs()
        .iter()
        .filter(|(name, value)| {
            !value.is_empty() && name.as_slice() != b"sign" && name.as_slice() != b"sign_type"
        })
        .map(|(name, value)| (name.as_slice(), value.as_slice()))
        .collect();
    pairs.sort();
    let mut content = Vec::new();
    for (index, (name, value)) in pairs.into_iter().enumerate() {
        if index > 0 {
            content.push(b'&');
        }
        content.extend_from_slice(name);
        content.push(b'=');
        content.extend_from_slice(value);
    }
    content
}

/// A public key as configured: PEM (`-----BEGIN PUBLIC KEY-----`), or the bare base64 of its
/// DER (SubjectPublicKeyInfo, as Alipay's console shows it, or PKCS#1), as DER bytes that parse
/// as an RSA key of 2048 bits or more.
pub fn public_key_der(text: &str) -> Result<Vec<u8>, String> {
    let base64: String = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(base64.as_bytes())
        .map_err(|e| format!("not PEM or base64: {e}"))?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &der)
        .parse()
        .map_err(|e| format!("not an RSA public key of 2048 bits or more: {e}"))?;
    Ok(der)
}

impl Provider for Alipay {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Alipay posts a form; it is read as one whatever the header says.
    fn accepts_content_type(&self, _content_type: Option<&str>) -> bool {
        true
    }

    fn acknowledgement(&self) -> &'static [u8] {
        b"success"
    }

    fn failure(&self, _reason: &str) -> Option<Failure> {
        Some(Failure {
            content_type: "text/plain; charset=utf-8",
            body: b"fail".to_vec(),
        })
    }

    fn admit(&self, request: &Received<'_>) -> Result<OrderKey, Refused> {
        let form = Form::parse(request.body);
        let verified = self.verify_form(&form);
        verified.map(|()| order_key(&form, request.body)).map_err(|refusal| Refused {
            reason: refusal.as_str(),
            alert: match refusal {
                Refusal::Unsigned => None,
                Refusal::BadSignature => Some(
                    "a notification at the Alipay route that no configured key verifies: a forgery, or Alipay's key changed (check alipay.public_keys against the Alipay console); Alipay resends for about 24 h",
                ),
            },
        })
    }

    fn refusal_reasons(&self) -> &'static [&'static str] {
        &["unsigned", "bad-signature"]
    }

    fn order_key(&self, body: &[u8]) -> OrderKey {
        order_key(&Form::parse(body), body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alipay's public key for notifications, and a real production `trade_status_sync`
    /// notification it signed, from alipay/alipay-sdk-nodejs-all (test/alipay.test.ts, "verify
    /// sign should delete sign_type"). The values as Alipay posts them: `fund_bill_list` is a
    /// JSON string.
    const PUBLISHED_KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqObrdC7hrgAVM98tK0nv3hSQRGGKT4lBsQjHiGjeYZjOPIPHR5knm2jnnz/YGIXIofVHkA/tAlBAd5DrY7YpvI4tP5EONLtZKC2ghBMx7McI2wRD0xiqzxOQr1FuhZGJ8/AUokBzJrzY+aGX2xcOrxFYRlFilvVLTXg4LWjR1tdPkO6+i7wQZAIVMClPkwVRZEbaERRHlKqTzv2gGv5rDU8gRoe1LeaN+6BlbTqHWkQcNCUNrA8C6l17XAXGKDsm/9TFWwO8EPHHHCaQdjtV5/FdcWIt+L8SR1ss7EXTjYDFtxcKVv9rEoY1lX8T4mX+GbXfZHraG5NCF1+XioL5JwIDAQAB";

    const PUBLISHED_FIELDS: [(&str, &str); 25] = [
        ("gmt_create", "2019-08-15 15:56:22"),
        ("charset", "utf-8"),
        ("seller_email", "z97-yuquerevenue@service.aliyun.com"),
        ("subject", "语雀空间 500人规模"),
        (
            "sign",
            "QfTb8tqE1BMhS5qAnXtvsF3/jBkEvu9q9en0pdbBUDDjvKycZhQb7h8GDs4FKfi049PynaNuatxSgLb/nLWZpXyyh0LEWdK2S6Ri7nPwrVgOs08zugLO20vOQz44y3ti2Ncm8/wZts1Fr2gZ7pShnVX3d1B50hbsXnObT1r/U8ONNQjWXd0HIul4TG+Q3fm3svmSvFEy0WnzuhcyHPX5Gm4ELNctL6Qd5YniGJFNcc7kopHYtI/XD9YCKCH6Ct02rzUs9i11C9CsadtZn+WhxF26Dqt9sGEFajkJ8cxUTLi8+VCpLHsgPE8P0y095uQcDdK0YjCh4x7wVSov+lrmOQ==",
        ),
        ("buyer_id", "2088102534368455"),
        ("invoice_amount", "0.10"),
        ("notify_id", "2019081500222155624068450559358070"),
        (
            "fund_bill_list",
            r#"[{"amount":"0.10","fundChannel":"ALIPAYACCOUNT"}]"#,
        ),
        ("notify_type", "trade_status_sync"),
        ("trade_status", "TRADE_SUCCESS"),
        ("receipt_amount", "0.10"),
        ("buyer_pay_amount", "0.10"),
        ("sign_type", "RSA2"),
        ("app_id", "2019073166072302"),
        ("seller_id", "2088531891668739"),
        ("gmt_payment", "2019-08-15 15:56:24"),
        ("notify_time", "2019-08-15 15:56:25"),
        ("version", "1.0"),
        ("out_trade_no", "20190815155618536-564-57"),
        ("total_amount", "0.10"),
        ("trade_no", "2019081522001468450512505578"),
        ("auth_app_id", "2019073166072302"),
        ("buyer_logon_id", "xud***@126.com"),
        ("point_amount", "0.00"),
    ];

    fn encoded(fields: &[(&str, &str)]) -> Vec<u8> {
        let pairs: Vec<String> = fields
            .iter()
            .map(|(name, value)| {
                let value: String = percent_encoding::utf8_percent_encode(
                    value,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .collect();
                format!("{name}={value}")
            })
            .collect();
        pairs.join("&").into_bytes()
    }

    fn alipay(key: &str) -> Alipay {
        Alipay::new(&config::Alipay {
            public_keys: vec![key.to_owned()],
            app_id: "2019073166072302".to_owned(),
            ..config::Alipay::default()
        })
    }

    #[test]
    fn alipays_own_published_notification_verifies_and_a_changed_one_does_not() {
        let alipay = alipay(PUBLISHED_KEY);
        let body = encoded(&PUBLISHED_FIELDS);
        assert_eq!(alipay.verify(&body), Ok(()));
        // `+` for the spaces, as a browser-style encoder writes them: the same signed content.
        let plus = String::from_utf8(body.clone())
            .expect("ascii")
            .replace("%20", "+");
        assert_eq!(alipay.verify(plus.as_bytes()), Ok(()));
        let mut changed = PUBLISHED_FIELDS;
        changed[20] = ("total_amount", "100.10");
        assert_eq!(
            alipay.verify(&encoded(&changed)),
            Err(Refusal::BadSignature)
        );
        let unsigned: Vec<(&str, &str)> = PUBLISHED_FIELDS
            .iter()
            .copied()
            .filter(|(name, _)| *name != "sign")
            .collect();
        assert_eq!(alipay.verify(&encoded(&unsigned)), Err(Refusal::Unsigned));
        // The same key as PEM, in 64-character lines.
        let base64 = PUBLISHED_KEY.as_bytes().chunks(64);
        let lines: Vec<&str> = base64
            .map(|line| std::str::from_utf8(line).expect("ascii"))
            .collect();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        );
        assert_eq!(self::alipay(&pem).verify(&body), Ok(()));
    }

    #[test]
    fn the_signed_content_is_sorted_without_sign_sign_type_and_empty_values_decoded_once() {
        let form = Form::parse(
            b"sign=abc&b=2&sign_type=RSA2&a=x+y&empty=&passback_params=id%253D7&c=%E4%B8%AD",
        );
        assert_eq!(
            signed_content(&form),
            "a=x y&b=2&c=中&passback_params=id%3D7".as_bytes()
        );
    }

    #[test]
    fn keys_that_are_not_rsa_public_keys_are_refused() {
        assert!(public_key_der("not a key").is_err());
        assert!(public_key_der("AAAA").is_err());
        assert!(public_key_der(PUBLISHED_KEY).is_ok());
    }

    #[test]
    fn the_policy_wants_our_app_and_one_of_our_sellers() {
        let mut alipay = alipay(PUBLISHED_KEY);
        let form = Form::parse(&encoded(&PUBLISHED_FIELDS));
        assert_eq!(alipay.policy(&form), Ok(()));
        alipay.seller_ids = vec!["2088000000000000".to_owned()];
        assert_eq!(alipay.policy(&form), Err(Reason::ForeignReceiver));
        alipay.seller_ids = vec!["2088531891668739".to_owned()];
        assert_eq!(alipay.policy(&form), Ok(()));
        alipay.app_id = "someone-else".to_owned();
        assert_eq!(alipay.policy(&form), Err(Reason::ForeignReceiver));
        assert_eq!(
            order_key(&form, b"").as_str(),
            "alipay:20190815155618536-564-57"
        );
        assert_eq!(
            dedup_keys(&form, b"").semantic.as_deref(),
            Some("alipay|2019081500222155624068450559358070")
        );
    }
}
