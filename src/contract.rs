//! The message contract: every `x-ipn-*` header the bridge writes or reads, reading an inbound
//! message once into a typed [`Inbound`] (its order key resolved once), and writing the headers
//! of each step (the ingress's, a retry's, a park's, a replay's, an event's).
//!
//! Every header is optional on the way in: a message published by hand, or by an older bridge,
//! is still read (a missing key comes from the body, a missing id from the body's hash).

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::bounded;
use crate::keys::{OrderKey, body_hash};
use crate::provider::{NAMES, PayPal, Queued, paypal};

/// The key the message is ordered by (set by the ingress; rewritten by a re-route).
pub const ORDER_KEY: &str = "x-ipn-order-key";
/// When the ingress received the IPN (RFC 3339, ms).
pub const RECEIVED_AT: &str = "x-ipn-received-at";
/// Failed attempts so far: 0 from the ingress, +1 each time the worker defers it.
pub const ATTEMPT: &str = "x-ipn-attempt";
/// The provider whose notification this is (`paypal`).
pub const PROVIDER: &str = "x-ipn-provider";
/// When the first attempt failed (RFC 3339), once one did.
pub const FIRST_FAILURE: &str = "x-ipn-first-failure";
/// The last attempt's error (bounded), on a deferred or parked copy.
pub const LAST_ERROR: &str = "x-ipn-last-error";
/// The delay tier a deferred copy waits in (`10s`, `1m`…): the retry exchange routes on it.
pub const TIER: &str = "x-ipn-tier";
/// Why a copy was parked or quarantined.
pub const REASON: &str = "x-ipn-reason";
/// The cause behind an `unprocessable` quarantine.
pub const CAUSE: &str = "x-ipn-cause";
/// When a copy was parked (RFC 3339).
pub const PARKED_AT: &str = "x-ipn-parked-at";
/// Set on a quarantined copy that kept only the bridge's own headers.
pub const HEADERS_DROPPED: &str = "x-ipn-headers-dropped";
/// The key a re-routed dispute came from; such a message is not re-routed again.
pub const REROUTED_FROM: &str = "x-ipn-rerouted-from";
/// An instruction from `ipnctl` for the key (`release`), not an IPN.
pub const CONTROL: &str = "x-ipn-control";
/// When `ipnctl` replayed the message (from parked, quarantine or a dead-letter queue).
pub const REPLAYED_AT: &str = "x-ipn-replayed-at";
/// An event's sequence number within its key.
pub const SEQUENCE: &str = "x-ipn-sequence";
/// When `ipnctl events redeliver` sent an event again.
pub const REDELIVERED_AT: &str = "x-ipn-redelivered-at";
/// A redelivered event's routing key on `<p>.events`.
pub const ROUTING_KEY: &str = "x-ipn-routing-key";

/// The prefix of a request header that travelled with the raw body
/// (`x-ipn-http-wechatpay-signature`): the provider names which ([`crate::provider::Provider::carried_headers`]).
pub const REQUEST_HEADER_PREFIX: &str = "x-ipn-http-";

/// The longest request header value carried; longer ones are left out (the provider's check at
/// the door refuses them first).
pub const MAX_CARRIED_HEADER_BYTES: usize = 1024;

/// Adds the request headers `names` (lower case) that `value` gives, each at most
/// [`MAX_CARRIED_HEADER_BYTES`], under [`REQUEST_HEADER_PREFIX`].
pub fn carry_request_headers<'a>(
    headers: &mut FieldTable,
    names: &[&str],
    value: impl Fn(&str) -> Option<&'a [u8]>,
) {
    for name in names {
        if let Some(value) = value(name).filter(|v| v.len() <= MAX_CARRIED_HEADER_BYTES) {
            let carried = format!("{REQUEST_HEADER_PREFIX}{name}");
            headers.insert(
                carried.into(),
                AMQPValue::LongString(LongString::from(value.to_vec())),
            );
        }
    }
}

/// A request header that travelled with the raw body.
pub fn request_header(properties: &BasicProperties, name: &str) -> Option<Vec<u8>> {
    match header(properties, &format!("{REQUEST_HEADER_PREFIX}{name}"))? {
        AMQPValue::LongString(value) => Some(value.as_bytes().to_vec()),
        _ => None,
    }
}

/// The headers a held IPN keeps besides what its row has columns for: the provider, the
/// carried request headers and [`REROUTED_FROM`], as JSON (`{"name": "<base64 value>"}`);
/// `None` when it has none of them.
pub fn kept_while_held(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let kept: BTreeMap<&str, String> = headers
        .inner()
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name == PROVIDER || name == REROUTED_FROM || name.starts_with(REQUEST_HEADER_PREFIX)
        })
        .filter_map(|(name, value)| match value {
            AMQPValue::LongString(value) => Some((name.as_str(), base64(value.as_bytes()))),
            _ => None,
        })
        .collect();
    (!kept.is_empty()).then(|| serde_json::to_string(&kept).unwrap_or_default())
}

/// Puts the headers [`kept_while_held`] wrote back into `headers` (anything unreadable is
/// left out).
pub fn restore_held(headers: &mut FieldTable, kept: &str) {
    let Ok(kept) = serde_json::from_str::<BTreeMap<String, String>>(kept) else {
        return;
    };
    for (name, value) in kept {
        if let Ok(value) = base64::engine::general_purpose::STANDARD.decode(value) {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Headers a deferral or parking adds; a replay starts the IPN afresh without them
/// (`x-ipn-attempt` back to 0). `x-death` is the broker's record of the wait queues.
pub const RETRY_HEADERS: [&str; 6] = [
    FIRST_FAILURE,
    LAST_ERROR,
    REASON,
    PARKED_AT,
    TIER,
    "x-death",
];

/// An inbound message as the worker received it, read once.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The raw IPN bytes.
    pub body: Vec<u8>,
    /// Its order key: `x-ipn-order-key` (bounded by [`OrderKey::from_header`]), or without one
    /// the key its body gives.
    key: OrderKey,
    /// `x-ipn-received-at`, when the ingress set it.
    pub received_at: Option<SystemTime>,
    /// `x-ipn-attempt`: failed attempts so far (0 from the ingress).
    pub attempt: i64,
    /// `x-ipn-first-failure`: when the first attempt failed, once one did.
    pub first_failure: Option<SystemTime>,
    /// The message's identity across tiers, parking and holding: its `message_id`, or
    /// `sha256:<body hash>` for a message published without one (or with one no bridge wrote).
    pub message_id: String,
    /// `x-ipn-control`: an instruction from `ipnctl` for the key (e.g. `release`), not an IPN.
    pub control: Option<String>,
    /// The message's properties, kept on a quarantined, deferred or parked copy.
    pub properties: BasicProperties,
    /// `x-ipn-provider`: whose notification this is, as one of the names the bridge knows
    /// (`paypal` when absent or any other value, so the header cannot put arbitrary text into
    /// events and routing keys).
    pub provider: &'static str,
}

impl Inbound {
    /// Reads what the worker needs from a message's body and properties.
    pub fn new(body: Vec<u8>, properties: BasicProperties) -> Inbound {
        let time = |name| header_text(&properties, name).and_then(|t| parse_time(&t));
        // An id no ingress or worker wrote (too long, control bytes) is not trusted as identity.
        let message_id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() && bounded::is_token(id.as_str()) => id.to_string(),
            _ => format!("sha256:{}", body_hash(&body)),
        };
        Inbound {
            key: key_of(&properties, &body),
            control: header_text(&properties, CONTROL),
            received_at: time(RECEIVED_AT),
            first_failure: time(FIRST_FAILURE),
            attempt: attempt(&properties),
            provider: provider_of(&properties),
            message_id,
            body,
            properties,
        }
    }

    /// The key this IPN is ordered by.
    pub fn key(&self) -> &OrderKey {
        &self.key
    }

    /// The notification as its provider's checks see it; `header` reads the request headers
    /// that travelled with it ([`request_header`]).
    pub fn queued<'a>(
        &'a self,
        header: &'a (dyn Fn(&str) -> Option<Vec<u8>> + Sync),
    ) -> Queued<'a> {
        Queued {
            provider: self.provider,
            body: &self.body,
            key: &self.key,
            received_at: self.received_at,
            header,
        }
    }
}

/// The provider a message names in `x-ipn-provider`: one of [`NAMES`], PayPal's for anything else.
fn provider_of(properties: &BasicProperties) -> &'static str {
    let named = match header(properties, PROVIDER) {
        Some(AMQPValue::LongString(name)) => name.as_bytes(),
        _ => b"",
    };
    NAMES
        .into_iter()
        .find(|known| known.as_bytes() == named)
        .unwrap_or(paypal::NAME)
}

/// The order key of a message: its `x-ipn-order-key`, or without one the key its body gives.
pub fn key_of(properties: &BasicProperties, body: &[u8]) -> OrderKey {
    match header_text(properties, ORDER_KEY) {
        Some(key) => OrderKey::from_header(&key),
        None => PayPal::order_key_of(&crate::form::Form::parse(body), body),
    }
}

/// `x-ipn-attempt`, whichever integer type it was written with (0 when absent or not one).
pub fn attempt(properties: &BasicProperties) -> i64 {
    integer(properties, ATTEMPT).unwrap_or(0)
}

/// An integer header, whichever AMQP integer type carries it.
pub fn integer(properties: &BasicProperties, name: &str) -> Option<i64> {
    match header(properties, name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A header of a message.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// A text header (an AMQP long string) of a message, decoded lossily.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    }
}

/// An AMQP long-string header value.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A time as the contract writes it: RFC 3339 with milliseconds, UTC.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

/// The headers of a message as the ingress publishes it.
pub fn ingress_headers(provider: &str, order_key: &str, received_at: SystemTime) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(ORDER_KEY.into(), text(order_key));
    headers.insert(RECEIVED_AT.into(), text(&time(received_at)));
    headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(0));
    headers.insert(PROVIDER.into(), text(provider));
    headers
}

/// `properties` without the headers `dropped`, with the time now in the header `stamp`: a
/// replayed message, as first published.
pub fn without(properties: &BasicProperties, dropped: &[&str], stamp: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !dropped.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers.insert(stamp.into(), text(&time(SystemTime::now())));
    properties.clone().with_headers(headers)
}

/// The properties of a replayed IPN: the same, with the retry headers gone, attempts at 0 and
/// `x-ipn-replayed-at` set.
pub fn replayed(properties: &BasicProperties) -> BasicProperties {
    let properties = without(properties, &RETRY_HEADERS, REPLAYED_AT);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(0));
    properties.with_headers(headers)
}

/// The AMQP properties an event is published with: JSON, its event id as message id, and its
/// order key and sequence in `x-ipn-order-key` and `x-ipn-sequence` (so a consumer can order
/// and dedup without parsing the body). The same when `ipnctl` delivers it again.
pub fn event_properties(event_id: &str, order_key: &str, sequence: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ORDER_KEY.into(), text(order_key));
    headers.insert(SEQUENCE.into(), AMQPValue::LongLongInt(sequence));
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(event_id))
        .with_app_id(ShortString::from("ipn-worker"))
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbound_message_is_read_once_with_its_key_resolved() {
        let received = humantime::parse_rfc3339("2026-12-01T10:00:00.123Z").expect("time");
        let mut headers = ingress_headers("paypal", "profile:I-1", received);
        headers.insert(ATTEMPT.into(), AMQPValue::LongInt(3));
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from("01a2-id"))
            .with_headers(headers);
        let inbound = Inbound::new(b"txn_id=A".to_vec(), properties);
        assert_eq!(inbound.key().as_str(), "profile:I-1");
        assert_eq!(inbound.attempt, 3, "any integer type");
        assert_eq!(inbound.received_at, Some(received));
        assert_eq!(inbound.message_id, "01a2-id");
        // Without headers: the key from the body, the id from its hash.
        let bare = Inbound::new(b"txn_id=A".to_vec(), BasicProperties::default());
        assert_eq!(bare.key().as_str(), "txn:A");
        assert!(bare.message_id.starts_with("sha256:"));
        assert_eq!(bare.attempt, 0);
        assert_eq!(bare.provider, "paypal");
        // Only names the bridge knows: any other text is taken for PayPal's.
        let named = |name: &str| {
            let mut headers = FieldTable::default();
            headers.insert(PROVIDER.into(), text(name));
            let properties = BasicProperties::default().with_headers(headers);
            Inbound::new(b"x=1".to_vec(), properties).provider
        };
        assert_eq!(named("alipay"), "alipay");
        assert_eq!(named(&"x".repeat(10_000)), "paypal");
    }

    #[test]
    fn a_held_ipn_keeps_its_provider_carried_headers_and_reroute_origin_exactly() {
        let mut headers = ingress_headers("wechatpay", "wechatpay-intake:all", SystemTime::now());
        let signature: &[u8] = b"c2lnbmF0dXJl+/=";
        carry_request_headers(&mut headers, &["wechatpay-signature", "absent"], |name| {
            (name == "wechatpay-signature").then_some(signature)
        });
        headers.insert(REROUTED_FROM.into(), text("wechatpay-intake:all"));
        let properties = BasicProperties::default().with_headers(headers);
        let kept = kept_while_held(&properties).expect("kept");
        let mut restored = FieldTable::default();
        restore_held(&mut restored, &kept);
        let restored = BasicProperties::default().with_headers(restored);
        assert_eq!(
            request_header(&restored, "wechatpay-signature").as_deref(),
            Some(signature)
        );
        assert_eq!(request_header(&restored, "absent"), None);
        assert_eq!(
            header_text(&restored, PROVIDER).as_deref(),
            Some("wechatpay")
        );
        assert_eq!(
            header_text(&restored, REROUTED_FROM).as_deref(),
            Some("wechatpay-intake:all")
        );
        assert_eq!(
            header(&restored, ORDER_KEY),
            None,
            "the row has its own column for the key"
        );
        assert_eq!(kept_while_held(&BasicProperties::default()), None);
        // A value too long to have passed the door is not carried.
        let mut long = FieldTable::default();
        let huge = vec![b'A'; MAX_CARRIED_HEADER_BYTES + 1];
        carry_request_headers(&mut long, &["wechatpay-signature"], |_| Some(&huge[..]));
        assert!(long.inner().is_empty());
    }

    #[test]
    fn a_replay_starts_afresh_without_the_retry_headers() {
        let mut headers = FieldTable::default();
        headers.insert(ORDER_KEY.into(), text("profile:I-1"));
        headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(4));
        for name in RETRY_HEADERS {
            headers.insert(name.into(), text("x"));
        }
        let properties = replayed(&BasicProperties::default().with_headers(headers));
        let headers = properties.headers().clone().expect("headers");
        let headers = headers.inner();
        assert_eq!(headers[ATTEMPT], AMQPValue::LongLongInt(0));
        assert_eq!(headers[ORDER_KEY], text("profile:I-1"));
        assert!(headers.contains_key(REPLAYED_AT));
        assert!(
            RETRY_HEADERS
                .iter()
                .all(|name| !headers.contains_key(*name))
        );
    }
}
