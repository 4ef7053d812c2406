//! WeChat Pay's API v3 notification: a JSON POST whose `resource` is encrypted with the
//! merchant's APIv3 key, signed by WeChat Pay in four request headers, acknowledged with an
//! empty 200.
//!
//! - **At the ingress** (public keys only): `Wechatpay-Signature` is SHA256withRSA (PKCS#1 v1.5,
//!   base64) over `<Wechatpay-Timestamp>\n<Wechatpay-Nonce>\n<raw body>\n`, with the key that
//!   `Wechatpay-Serial` names (a platform certificate's serial, or a `PUB_KEY_ID_…` public-key id;
//!   several are configured during a switch). A signature starting `WECHATPAY/SIGNTEST/` is one
//!   of WeChat Pay's deliberate probes: it must get a failure answer, and the genuine copy
//!   follows. A timestamp further than `max_clock_skew` from the ingress's receive time is
//!   refused as stale. The headers travel with the raw body ([`HEADERS`]), so the worker checks
//!   the signature again.
//! - **In the worker** (the secret): the resource is AES-256-GCM with key = the 32-byte APIv3
//!   key, nonce = the 12 characters of `nonce` as bytes (not base64), AAD = `associated_data`,
//!   and the tag the last 16 bytes of the base64-decoded `ciphertext`. No other algorithm is
//!   accepted. The order key (`wechatpay:<out_trade_no>`) is known only then, so the ingress
//!   queues every notification under one intake key ([`intake_key`]) and the worker re-routes
//!   each, in arrival order, to its key's shard.
//! - Dedup by business state: `(mchid, transaction_id, event_type)` for a transaction,
//!   `(mchid, out_refund_no, refund_status)` for a refund (WeChat Pay's resends may differ in
//!   their envelope).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine;
use serde::Deserialize;

use crate::config;
use crate::keys::{DedupKeys, OrderKey, body_hash};
use crate::policy::Reason;
use crate::provider::{
    Checked, Failure, Kind, Provider, Queued, Received, Refused, Verified, minor_units,
};

/// The route's name in headers, metrics and events.
pub const NAME: &str = "wechatpay";

/// The key every WeChat Pay notification is queued under by the ingress,
/// `wechatpay-intake:all`: one shard and one lane take them in the order they arrived and
/// re-route each to its own key (`wechatpay:<out_trade_no>`), a key's one after the other, so a
/// refund posted after its payment is re-routed after it too. (Shards chosen by body would let a
/// refund overtake its payment on the way.) The lane re-routes the notifications waiting in it
/// together, different keys' concurrently ([`crate::worker::intake`]).
pub fn intake_key() -> OrderKey {
    OrderKey::new("wechatpay-intake", "all")
}

/// The request headers that carry the signature; they travel with the raw body.
pub const HEADERS: [&str; 5] = [
    TIMESTAMP,
    NONCE,
    SIGNATURE,
    SERIAL,
    "wechatpay-signature-type",
];
const TIMESTAMP: &str = "wechatpay-timestamp";
const NONCE: &str = "wechatpay-nonce";
const SIGNATURE: &str = "wechatpay-signature";
const SERIAL: &str = "wechatpay-serial";

/// The start of a probe's signature.
pub const PROBE_PREFIX: &str = "WECHATPAY/SIGNTEST/";

/// The only signature type there is; a notification naming another is refused.
const SIGNATURE_TYPE: &str = "WECHATPAY2-SHA256-RSA2048";

/// The longest value of a signature header taken (a 4096-bit signature is 684 base64
/// characters); anything longer is refused, so what travels with the body stays bounded.
pub const MAX_HEADER_BYTES: usize = 1024;

/// The decrypted fields that identify a notification: short printable ASCII in every genuine
/// one ([`crate::bounded::id_problem`]); they become keys, rows and routing keys.
pub const ID_FIELDS: [&str; 10] = [
    "id",
    "event_type",
    "mchid",
    "sp_mchid",
    "appid",
    "out_trade_no",
    "transaction_id",
    "out_refund_no",
    "trade_state",
    "refund_status",
];

/// Why a notification is refused at the door (answered 4xx with `{"code":"FAIL",…}`, so
/// WeChat Pay resends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A signature header is missing, too long or malformed.
    #[error("unsigned")]
    Unsigned,
    /// One of WeChat Pay's signature probes (`WECHATPAY/SIGNTEST/…`).
    #[error("signature probe")]
    Probe,
    /// `Wechatpay-Serial` names a key the config does not have.
    #[error("unknown serial")]
    UnknownSerial,
    /// `Wechatpay-Timestamp` too far from the receive time.
    #[error("stale timestamp")]
    Stale,
    /// The named key does not verify the signature.
    #[error("bad signature")]
    BadSignature,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::Probe => "probe",
            Refusal::UnknownSerial => "unknown-serial",
            Refusal::Stale => "stale",
            Refusal::BadSignature => "bad-signature",
        }
    }
}

/// The signature headers of one notification, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    timestamp: u64,
    nonce: String,
    signature: String,
    serial: String,
}

impl Signed {
    /// Reads the headers through `header` (by lower-case name), each bounded and printable.
    pub fn read<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Result<Signed, Refusal> {
        let get = |name| {
            let value = header(name).ok_or(Refusal::Unsigned)?;
            if value.is_empty()
                || value.len() > MAX_HEADER_BYTES
                || !value.iter().all(|b| b.is_ascii_graphic())
            {
                return Err(Refusal::Unsigned);
            }
            // ASCII graphic bytes are UTF-8.
            Ok(String::from_utf8_lossy(value).into_owned())
        };
        let signature = get(SIGNATURE)?;
        if signature.starts_with(PROBE_PREFIX) {
            return Err(Refusal::Probe);
        }
        if let Some(kind) = header("wechatpay-signature-type")
            && kind != SIGNATURE_TYPE.as_bytes()
        {
            return Err(Refusal::Unsigned);
        }
        let timestamp = get(TIMESTAMP)?;
        let timestamp = (timestamp.len() <= 12)
            .then(|| timestamp.parse::<u64>().ok())
            .flatten()
            .ok_or(Refusal::Unsigned)?;
        Ok(Signed {
            timestamp,
            nonce: get(NONCE)?,
            signature,
            serial: get(SERIAL)?,
        })
    }

    /// The bytes WeChat Pay signs: `timestamp\nnonce\nbody\n`.
    pub fn message(&self, body: &[u8]) -> Vec<u8> {
        let mut message = format!("{}\n{}\n", self.timestamp, self.nonce).into_bytes();
        message.extend_from_slice(body);
        message.push(b'\n');
        message
    }
}

/// WeChat Pay's public keys by serial, and the clock rule: everything the ingress needs.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: BTreeMap<String, Vec<u8>>,
    max_clock_skew: Duration,
}

impl Verifier {
    /// From a validated `[wechatpay]` section (its keys parse).
    pub fn new(config: &config::Wechatpay) -> Verifier {
        Verifier {
            keys: config
                .platform_keys
                .iter()
                .filter_map(|(serial, key)| {
                    let der = platform_key_der(serial, key).ok()?;
                    Some((serial.to_ascii_uppercase(), der))
                })
                .collect(),
            max_clock_skew: config.max_clock_skew,
        }
    }

    /// Checks a notification's signature, and its timestamp against `received_at` (when the
    /// ingress got it).
    pub fn verify(
        &self,
        signed: &Signed,
        body: &[u8],
        received_at: SystemTime,
    ) -> Result<(), Refusal> {
        let der = self
            .keys
            .get(&signed.serial.to_ascii_uppercase())
            .ok_or(Refusal::UnknownSerial)?;
        let sent = UNIX_EPOCH + Duration::from_secs(signed.timestamp);
        let skew = match received_at.duration_since(sent) {
            Ok(late) => late,
            Err(early) => early.duration(),
        };
        if skew > self.max_clock_skew {
            return Err(Refusal::Stale);
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&signed.signature)
            .map_err(|_| Refusal::BadSignature)?;
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
            .verify(&signed.message(body), &signature)
            .map_err(|_| Refusal::BadSignature)
    }
}

/// A platform key as configured for `serial`: a PEM certificate (its serial must be `serial`)
/// or public key, or bare base64 of either's DER; as the DER of an RSA public key of 2048 bits
/// or more.
pub fn platform_key_der(serial: &str, text: &str) -> Result<Vec<u8>, String> {
    let base64: String = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(base64.as_bytes())
        .map_err(|e| format!("not PEM or base64: {e}"))?;
    let key = match x509_parser::parse_x509_certificate(&der) {
        Ok((_, certificate)) => {
            let own = hex::encode_upper(certificate.raw_serial());
            let own = own.trim_start_matches("00");
            if !own.eq_ignore_ascii_case(serial) {
                return Err(format!(
                    "the certificate's serial is {own}, not the serial it is configured under"
                ));
            }
            certificate.public_key().raw.to_vec()
        }
        Err(_) => der,
    };
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &key)
        .parse()
        .map_err(|e| format!("not a certificate or an RSA public key of 2048 bits or more: {e}"))?;
    Ok(key)
}

/// The notification's JSON envelope.
#[derive(Debug, Clone, Deserialize)]
struct Envelope {
    id: String,
    #[serde(default)]
    create_time: Option<String>,
    event_type: String,
    #[serde(default)]
    resource_type: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    resource: Resource,
}

#[derive(Debug, Clone, Deserialize)]
struct Resource {
    algorithm: String,
    ciphertext: String,
    nonce: String,
    #[serde(default)]
    associated_data: Option<String>,
    #[serde(default)]
    original_type: Option<String>,
}

/// A notification's `event_type`, read without any check (for operators).
pub fn event_type(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        event_type: String,
    }
    serde_json::from_slice::<Typed>(body)
        .ok()
        .map(|typed| typed.event_type)
}

/// Decrypts an `AEAD_AES_256_GCM` resource with the APIv3 key; `None` when the key, the nonce,
/// the AAD or the ciphertext is wrong (the tag does not verify).
pub fn decrypt(
    apiv3_key: &[u8],
    nonce: &[u8],
    associated_data: &[u8],
    ciphertext_base64: &str,
) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, apiv3_key).ok()?);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut data = base64::engine::general_purpose::STANDARD
        .decode(ciphertext_base64)
        .ok()?;
    let plain = key
        .open_in_place(nonce, Aad::from(associated_data), &mut data)
        .ok()?;
    Some(plain.to_vec())
}

/// WeChat Pay at the ingress: the signature and the clock, checked with public keys.
impl Provider for Verifier {
    fn name(&self) -> &'static str {
        NAME
    }

    /// WeChat Pay posts JSON.
    fn accepts_content_type(&self, content_type: Option<&str>) -> bool {
        content_type.is_some_and(|value| {
            let essence = value.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
        })
    }

    /// An empty 200.
    fn acknowledgement(&self) -> &'static [u8] {
        b""
    }

    fn failure(&self, reason: &str) -> Option<Failure> {
        let body = serde_json::json!({ "code": "FAIL", "message": reason });
        Some(Failure {
            content_type: "application/json",
            body: body.to_string().into_bytes(),
        })
    }

    fn admit(&self, request: &Received<'_>) -> Result<OrderKey, Refused> {
        let checked = Signed::read(|name| request.header(name))
            .and_then(|signed| self.verify(&signed, request.body, request.received_at));
        checked.map(|()| intake_key()).map_err(|refusal| Refused {
            reason: refusal.as_str(),
            alert: match refusal {
                Refusal::Unsigned | Refusal::Probe => None,
                Refusal::UnknownSerial => Some(
                    "WeChat Pay signs with a key the config does not have: add its serial and certificate or public key to wechatpay.platform_keys (WeChat Pay resends for about 24 h)",
                ),
                Refusal::Stale => Some(
                    "a WeChat Pay notification whose Wechatpay-Timestamp is off by more than wechatpay.max_clock_skew: check this host's clock (NTP), or it is a replay",
                ),
                Refusal::BadSignature => Some(
                    "a notification at the WeChat Pay route whose signature does not verify with the key its serial names: a forgery, or a wrong key under that serial in wechatpay.platform_keys",
                ),
            },
        })
    }

    fn carried_headers(&self) -> &'static [&'static str] {
        &HEADERS
    }

    fn refusal_reasons(&self) -> &'static [&'static str] {
        &[
            "unsigned",
            "probe",
            "unknown-serial",
            "stale",
            "bad-signature",
        ]
    }

    /// Nothing of the key is visible before decryption, so every WeChat Pay notification
    /// queues under one intake key ([`intake_key`]); the worker re-routes each to its own key.
    fn order_key(&self, _body: &[u8]) -> OrderKey {
        intake_key()
    }
}

/// WeChat Pay as the worker sees it: the verifier again, the APIv3 key and the policy.
#[derive(Debug, Clone)]
pub struct WechatPay {
    verifier: Verifier,
    apiv3_key: config::Secret,
    mch_ids: Vec<String>,
    app_ids: Vec<String>,
}

/// A notification opened: its envelope and its decrypted resource.
#[derive(Debug, Clone)]
pub struct Opened {
    envelope: Envelope,
    resource: serde_json::Map<String, serde_json::Value>,
}

impl WechatPay {
    /// From a validated `[wechatpay]` section.
    pub fn new(config: &config::Wechatpay) -> WechatPay {
        WechatPay {
            verifier: Verifier::new(config),
            apiv3_key: config.apiv3_key.clone(),
            mch_ids: config.mch_ids.clone(),
            app_ids: config.app_ids.clone(),
        }
    }

    /// The worker's checks: signature again, decryption, identifying fields, policy.
    pub fn check(&self, queued: &Queued<'_>) -> Checked {
        let opened = match self.open(queued.body, queued.header, queued.received_at) {
            Ok(opened) => opened,
            Err((reason, cause)) => return Checked::Rejected(reason, Some(cause)),
        };
        if let Err(cause) = crate::policy::ids_processable(opened.id_fields()) {
            return Checked::Rejected(Reason::Unprocessable, Some(cause));
        }
        if let Err(reason) = self.policy(&opened) {
            return Checked::Rejected(reason, None);
        }
        Checked::Passed(Box::new(opened.verified(queued.body, SystemTime::now())))
    }

    /// The notification's own key, when it opens and its identifying fields are bounded.
    pub fn own_key(&self, queued: &Queued<'_>) -> Option<OrderKey> {
        let opened = self
            .open(queued.body, queued.header, queued.received_at)
            .ok()?;
        crate::policy::ids_processable(opened.id_fields()).ok()?;
        Some(opened.order_key(queued.body))
    }

    /// Checks the signature again (from the headers that travelled with the body; the clock
    /// against the ingress's receive time when known), then decrypts the resource. `Err` says
    /// why it is quarantined, with a cause.
    pub fn open(
        &self,
        body: &[u8],
        header: &(dyn Fn(&str) -> Option<Vec<u8>> + Sync),
        received_at: Option<SystemTime>,
    ) -> Result<Opened, (Reason, String)> {
        let values: BTreeMap<&str, Vec<u8>> = HEADERS
            .iter()
            .filter_map(|name| Some((*name, header(name)?)))
            .collect();
        let signed = Signed::read(|name| values.get(name).map(Vec::as_slice))
            .map_err(|refusal| (Reason::Invalid, format!("signature headers: {refusal}")))?;
        let at = received_at.unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(signed.timestamp));
        self.verifier
            .verify(&signed, body, at)
            .map_err(|refusal| (Reason::Invalid, format!("signature: {refusal}")))?;
        self.decrypt(body)
    }

    /// Reads the envelope and decrypts its resource with the APIv3 key (no signature check).
    pub fn decrypt(&self, body: &[u8]) -> Result<Opened, (Reason, String)> {
        let envelope: Envelope = serde_json::from_slice(body).map_err(|e| {
            (
                Reason::Unreadable,
                format!("not a WeChat Pay notification: {e}"),
            )
        })?;
        let resource = &envelope.resource;
        if resource.algorithm != "AEAD_AES_256_GCM" {
            return Err((
                Reason::Undecryptable,
                format!(
                    "algorithm `{}` is not AEAD_AES_256_GCM",
                    crate::bounded::shown(&resource.algorithm)
                ),
            ));
        }
        let plain = decrypt(
            self.apiv3_key.expose().as_bytes(),
            resource.nonce.as_bytes(),
            resource.associated_data.as_deref().unwrap_or("").as_bytes(),
            &resource.ciphertext,
        )
        .ok_or_else(|| {
            (
                Reason::Undecryptable,
                "the resource does not decrypt with wechatpay.apiv3_key (a wrong or changed APIv3 key)".to_owned(),
            )
        })?;
        Opened::from_parts(envelope, &plain)
    }

    /// The checks after decryption: our merchant (the service provider's in partner mode), and
    /// on a transaction our app when the config names apps.
    pub fn policy(&self, opened: &Opened) -> Result<(), Reason> {
        let merchant = opened.text("sp_mchid").or_else(|| opened.text("mchid"));
        if !merchant.is_some_and(|id| self.mch_ids.contains(&id)) {
            return Err(Reason::ForeignReceiver);
        }
        let app = opened.text("sp_appid").or_else(|| opened.text("appid"));
        match app {
            Some(app) if !self.app_ids.is_empty() && !self.app_ids.contains(&app) => {
                Err(Reason::ForeignReceiver)
            }
            _ => Ok(()),
        }
    }
}

impl Opened {
    /// A notification from its envelope (JSON) and its resource's plaintext, as if decrypted:
    /// for fuzzing what comes after decryption, which no fuzzed input can reach.
    pub fn parse(body: &[u8], plaintext: &[u8]) -> Result<Opened, (Reason, String)> {
        let envelope = serde_json::from_slice(body).map_err(|e| {
            (
                Reason::Unreadable,
                format!("not a WeChat Pay notification: {e}"),
            )
        })?;
        Opened::from_parts(envelope, plaintext)
    }

    fn from_parts(envelope: Envelope, plaintext: &[u8]) -> Result<Opened, (Reason, String)> {
        let resource = serde_json::from_slice(plaintext).map_err(|e| {
            (
                Reason::Unprocessable,
                format!("the decrypted resource is not a JSON object: {e}"),
            )
        })?;
        Ok(Opened { envelope, resource })
    }

    /// A decrypted top-level field as text (a number as its digits).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.resource.get(name)? {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    }

    /// True for `REFUND.*` notifications.
    fn is_refund(&self) -> bool {
        self.envelope.event_type.starts_with("REFUND.")
    }

    /// The order key: `wechatpay:<out_trade_no>` (a refund names its payment's), or without
    /// one the body's (so it does not stay on the intake key).
    pub fn order_key(&self, body: &[u8]) -> OrderKey {
        match self.text("out_trade_no").filter(|id| !id.trim().is_empty()) {
            Some(id) => OrderKey::new(NAME, id.trim()),
            None => OrderKey::of_body(body),
        }
    }

    /// The dedup keys: the body's hash, and the business state (see the module docs).
    pub fn dedup_keys(&self, body: &[u8]) -> DedupKeys {
        let merchant = self
            .text("sp_mchid")
            .or_else(|| self.text("mchid"))
            .unwrap_or_default();
        let semantic = if self.is_refund() {
            let refund = self.text("out_refund_no").unwrap_or_default();
            let status = self.text("refund_status").unwrap_or_default();
            format!("{NAME}|{merchant}|{refund}|{status}")
        } else if let Some(transaction) = self.text("transaction_id") {
            format!(
                "{NAME}|{merchant}|{transaction}|{}",
                self.envelope.event_type
            )
        } else {
            format!("{NAME}|id|{}", self.envelope.id)
        };
        DedupKeys {
            body_sha256: body_hash(body),
            semantic: Some(semantic),
        }
    }

    /// The values the checks before the claim look at ([`ID_FIELDS`]), by name.
    pub fn id_fields(&self) -> Vec<(&'static str, String)> {
        ID_FIELDS
            .iter()
            .filter_map(|name| {
                let value = match *name {
                    "id" => Some(self.envelope.id.clone()),
                    "event_type" => Some(self.envelope.event_type.clone()),
                    other => self.text(other),
                };
                Some((*name, value?))
            })
            .collect()
    }

    /// The notification as the pipeline takes it: a payment (`TRANSACTION.*`) of
    /// `amount.total`, or a refund (`REFUND.*`) of `amount.refund`, converted from fen; a refund
    /// names no currency, so none is given.
    pub fn verified(&self, body: &[u8], verified_at: SystemTime) -> Verified {
        let amount = |name: &str| {
            let amount = self.resource.get("amount")?.get(name)?.as_i64()?;
            Some(amount)
        };
        let currency = self
            .resource
            .get("amount")
            .and_then(|amount| amount.get("currency"))
            .and_then(|currency| currency.as_str())
            .map(str::to_owned);
        let (kind, minor) = if self.is_refund() {
            (Kind::Refund, amount("refund"))
        } else if self.envelope.event_type.starts_with("TRANSACTION.") {
            (Kind::Payment, amount("total"))
        } else {
            (Kind::Other, None)
        };
        Verified {
            dedup: self.dedup_keys(body),
            fields: self.fields(),
            txn_type: Some(self.envelope.event_type.clone()),
            payment_status: self.status(),
            txn_id: self.text("transaction_id"),
            kind,
            status: self.status().map(|status| status.to_lowercase()),
            amount: minor.map(|minor| minor_units(minor, currency.as_deref())),
            currency,
            merchant_order_id: self.text("out_trade_no"),
            // JSON is UTF-8 (RFC 8259).
            charset: "UTF-8".to_owned(),
            charset_assumed: false,
            test: false,
            paid: None,
            verified_at,
        }
    }

    /// The status: `trade_state` of a transaction, `refund_status` of a refund.
    pub fn status(&self) -> Option<String> {
        if self.is_refund() {
            self.text("refund_status")
        } else {
            self.text("trade_state")
        }
    }

    /// Every field for the event: the envelope's under `notification.` (`notification.id`,
    /// `notification.event_type`…), the decrypted resource's by their JSON path
    /// (`out_trade_no`, `amount.total`, `promotion_detail.0.amount`).
    pub fn fields(&self) -> BTreeMap<String, String> {
        let mut fields = BTreeMap::new();
        let envelope = &self.envelope;
        let mut put = |name: &str, value: Option<&String>| {
            if let Some(value) = value {
                fields.insert(format!("notification.{name}"), value.clone());
            }
        };
        put("id", Some(&envelope.id));
        put("create_time", envelope.create_time.as_ref());
        put("event_type", Some(&envelope.event_type));
        put("resource_type", envelope.resource_type.as_ref());
        put("summary", envelope.summary.as_ref());
        put("original_type", envelope.resource.original_type.as_ref());
        for (name, value) in &self.resource {
            flatten(name, value, &mut fields);
        }
        fields
    }
}

fn flatten(path: &str, value: &serde_json::Value, into: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::String(text) => {
            into.insert(path.to_owned(), text.clone());
        }
        serde_json::Value::Object(map) => {
            for (name, value) in map {
                flatten(&format!("{path}.{name}"), value, into);
            }
        }
        serde_json::Value::Array(items) => {
            for (index, value) in items.iter().enumerate() {
                flatten(&format!("{path}.{index}"), value, into);
            }
        }
        other => {
            into.insert(path.to_owned(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed notification and its platform certificate, from wechatpay-apiv3/wechatpay-go
    /// (core/notify/notify_test.go, `TestHandler_ParseNotifyRequest`), as WeChat Pay sends them.
    /// (Its resource is encrypted with a 16-byte key, AES-128, so it is not decrypted here.)
    const PUBLISHED_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----
MIIDVzCCAj+gAwIBAgIJANfOWdH1ItcBMA0GCSqGSIb3DQEBCwUAMEIxCzAJBgNV
BAYTAlhYMRUwEwYDVQQHDAxEZWZhdWx0IENpdHkxHDAaBgNVBAoME0RlZmF1bHQg
Q29tcGFueSBMdGQwHhcNMjEwNDI3MDg1NTIzWhcNMzEwNDI1MDg1NTIzWjBCMQsw
CQYDVQQGEwJYWDEVMBMGA1UEBwwMRGVmYXVsdCBDaXR5MRwwGgYDVQQKDBNEZWZh
dWx0IENvbXBhbnkgTHRkMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA
2VCTd91fnUn73Xy9DLvt/V62TVxRTEEstVdeRaZ3B3leO0pldE806mXO4RwdHXag
HQ4vGeZN0yqm++rDsGK+U3AH7kejyD2pXshNP9Cq5YwbptiLGtjcquw4HNxJQUOm
DeJf2vg6byms9RUipiq4SzbJKqJFlUpbuIPDpSpWz10PYmyCNeDGUUK65E5h2B83
4uxl1zNLYQCrkdBzb8oUxwYeP5a2DNxmjL5lsJML7DGr5znsevnoqGRwTm9fxCGf
y8wus7hwKz6clt3Whmmda7UAdb1c08hEQFVRbF14AR73xbnd8N0obCWJPCbzMCtk
aSef4FdEEgEXJiw0VAJT8wIDAQABo1AwTjAdBgNVHQ4EFgQUT1c7nd/SUO76HSoZ
umNUJv1R5PwwHwYDVR0jBBgwFoAUT1c7nd/SUO76HSoZumNUJv1R5PwwDAYDVR0T
BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOCAQEAfTjxKRQMzNB/U6ZoCUS+BSNfa2Oh
0plMN6ZuzwiVVZwg1jywvv5yv04koS7Pd4i9E4gt9ZBUQXlpq+A3oOCEEHNRR6b2
kyazGRM7s0OP5X21WrbpSmKmU6K7hkfx30yYs08LVs/Q8DIhvaj1FCFeJzUCzYn/
fHMq4tsbKO0dKAeydPM/nrUZBmaYQVKMVOORGLFjFKVO7JV6Kq/R86ouhjEPgJOe
2xulNBUcjicqtZlBdEh/PWCYP2SpGVDclKm8jeo175T3EVAkdKzzmfpxtMmnMlmq
cTJOU9TxuGvNASMtjj7pYIerTx+xgZDXEVBWFW9PjJ0TV06tCRsgSHItgg==
-----END CERTIFICATE-----";
    const PUBLISHED_SERIAL: &str = "D7CE59D1F522D701";
    const PUBLISHED_TIMESTAMP: &str = "1624523846";
    const PUBLISHED_NONCE: &str = "EcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz";
    const PUBLISHED_SIGNATURE: &str = "tJHIiIS9eB2hAYstmAmbbD3ZE5LiIm/Ug5tuL4fC0YOFRWIHV39UFIZXC0e9Wl6lBu6sKvkqDkzpqzBsVHyXFlbYZTOQrVdG4b6LfTnK4mikv9++ixJMd3vTf2yCqvBkh98zs3Ds5zsYQakzbcwhmw4fMJs4nPLws28H0UW9FjDR//rxELLwXvV1VEA1IBLX70xptjL8hrfUjEE8kkry6yNJTHZRU8CAc7qHli2Ng1V1qb9ARbK8A3ThmFmPQvRGrapI/jS2laKKgYUmfdEdkNO6B2Cke5e8VTxY406ArAmQ90GAihDwIcb16TQMnzCMBoutnwZKNiKRACrFmtxw2Q==";
    const PUBLISHED_BODY: &str = concat!(
        r#"{"id":"3119dfba-e649-5eec-ab1e-3412bc4d2e17","create_time":"2021-06-24T16:37:26+08:00","#,
        r#""resource_type":"encrypt-resource","event_type":"PAYSCORE.USER_OPEN_SERVICE","summary":"签约成功","#,
        r#""resource":{"original_type":"payscore","algorithm":"AEAD_AES_256_GCM","ciphertext":"YDS3lKPaC4Y52Gf3uhft5qUBlIa8b428AWTtTauHQfQrRw+X1WpiuHIDy0vo1Vd6VEq67aVyqPdDYMkRVSDaZL3iZttevRMOoPKMifozg6XPWjIZumks/GpT48lI4NizyeaqLBokNebthah3o1H76qSlO9NkDjp9bzmKLEYYH9TEklFUpsvPqOTOcgSLgh21YJXYR7dEBXFgRLiNIKRgO5JdXh1hccRUAlyVWxE54PXpnQ==","#,
        r#""associated_data":"payscore","nonce":"Kj7QIyUiYx1q"}}"#
    );

    fn verifier() -> Verifier {
        let config = config::Wechatpay {
            platform_keys: [(
                PUBLISHED_SERIAL.to_owned(),
                PUBLISHED_CERTIFICATE.to_owned(),
            )]
            .into(),
            ..config::Wechatpay::default()
        };
        Verifier::new(&config)
    }

    fn headers(signature: &str, serial: &str) -> Result<Signed, Refusal> {
        let values = [
            (TIMESTAMP, PUBLISHED_TIMESTAMP.to_owned()),
            (NONCE, PUBLISHED_NONCE.to_owned()),
            (SIGNATURE, signature.to_owned()),
            (SERIAL, serial.to_owned()),
        ];
        Signed::read(|name| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        })
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn wechat_pays_own_published_notification_verifies_and_a_changed_one_does_not() {
        let verifier = verifier();
        let signed = headers(PUBLISHED_SIGNATURE, PUBLISHED_SERIAL).expect("headers");
        let body = PUBLISHED_BODY.as_bytes();
        assert_eq!(verifier.verify(&signed, body, at(1_624_523_846)), Ok(()));
        // Within the clock rule either way; past it, stale.
        assert_eq!(verifier.verify(&signed, body, at(1_624_524_146)), Ok(()));
        assert_eq!(
            verifier.verify(&signed, body, at(1_624_524_147)),
            Err(Refusal::Stale)
        );
        assert_eq!(verifier.verify(&signed, body, at(1_624_523_546)), Ok(()));
        let altered = PUBLISHED_BODY.replace("签约成功", "签约失败");
        assert_eq!(
            verifier.verify(&signed, altered.as_bytes(), at(1_624_523_846)),
            Err(Refusal::BadSignature)
        );
        // The serial in lower case names the same key; another serial names none.
        let lower = headers(PUBLISHED_SIGNATURE, "d7ce59d1f522d701").expect("headers");
        assert_eq!(verifier.verify(&lower, body, at(1_624_523_846)), Ok(()));
        let other = headers(PUBLISHED_SIGNATURE, "PUB_KEY_ID_0000").expect("headers");
        assert_eq!(
            verifier.verify(&other, body, at(1_624_523_846)),
            Err(Refusal::UnknownSerial)
        );
    }

    #[test]
    fn probes_missing_and_oversized_headers_are_refused_before_any_key_is_used() {
        let probe = format!("{PROBE_PREFIX}{PUBLISHED_SIGNATURE}");
        assert_eq!(headers(&probe, PUBLISHED_SERIAL), Err(Refusal::Probe));
        assert_eq!(
            headers(&"A".repeat(MAX_HEADER_BYTES + 1), PUBLISHED_SERIAL),
            Err(Refusal::Unsigned)
        );
        assert_eq!(headers(PUBLISHED_SIGNATURE, "a b"), Err(Refusal::Unsigned));
        assert_eq!(headers(PUBLISHED_SIGNATURE, ""), Err(Refusal::Unsigned));
        assert_eq!(Signed::read(|_| None), Err(Refusal::Unsigned));
        let typed = |kind: &'static [u8]| {
            Signed::read(|name| match name {
                "wechatpay-signature-type" => Some(kind),
                TIMESTAMP => Some(PUBLISHED_TIMESTAMP.as_bytes()),
                NONCE => Some(PUBLISHED_NONCE.as_bytes()),
                SIGNATURE => Some(PUBLISHED_SIGNATURE.as_bytes()),
                SERIAL => Some(PUBLISHED_SERIAL.as_bytes()),
                _ => None,
            })
        };
        assert!(typed(b"WECHATPAY2-SHA256-RSA2048").is_ok());
        assert_eq!(typed(b"WECHATPAY2-SM2-WITH-SM3"), Err(Refusal::Unsigned));
    }

    #[test]
    fn a_certificate_must_be_configured_under_its_own_serial() {
        assert!(platform_key_der(PUBLISHED_SERIAL, PUBLISHED_CERTIFICATE).is_ok());
        let error = platform_key_der(
            "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
            PUBLISHED_CERTIFICATE,
        )
        .unwrap_err();
        assert!(error.contains("serial is D7CE59D1F522D701"), "{error}");
        assert!(platform_key_der("PUB_KEY_ID_1", "not a key").is_err());
    }

    /// AES-256-GCM vectors made with Python's `cryptography` (AESGCM), not with this code:
    /// key `0123456789abcdef0123456789abcdef` (32 ASCII bytes, as an APIv3 key), nonce
    /// `Kj7QIyUiYx1q`, AAD `transaction`.
    const VECTOR_KEY: &str = "0123456789abcdef0123456789abcdef";
    const VECTOR_NONCE: &str = "Kj7QIyUiYx1q";
    const VECTOR_AAD: &str = "transaction";
    const VECTOR_PLAIN: &str = r#"{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"1217752501201407033233368018","transaction_id":"4200000000000000000000000001","trade_state":"SUCCESS","amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"},"success_time":"2026-12-01T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}}"#;
    const VECTOR_CIPHERTEXT: &str = "3o+HCNs3jCx1rxUzdmAZxsbr4jGt2omFr/JIkV4O0N1avqei4o4IMdqVK/xoalk4qn/jvV0GtEjjAKGqWzEzjdVEwy4lV/Q7HCceim08XKh7ueCqZnCyo7OS14CAbgV46UrlGVF3eDck4n07/bD+i4DCYP8JC/dsQanGeLLaMKQVHVq/h6HI8C5H0zfmrvOL8T07vTOWE0ULsKs1SDqhaASV9fE0TYLpvZsg6Vb8uamm2z+4Q4k25WBW/Vs5r1x6ZWizr1zBhky0/OsscMIZHVNf5UTtaEU4fU9tXrQKkM5n5ok9vb8mi/mS7UYyYXujr8ZbLlE/YUWK6o8pOoRmWOxTuyLW8KKXtNwwFu+bKu62JZuK7zkF3Eq+C2hB05226JRyWhPE+fIPiramRBAt35mTTULPv0mPB+J91FMp+MdjEY0tHiIZjtz07o234JqTyOcaQQH3cNLKLWABTJ0d875plaLbyDI=";

    #[test]
    fn the_resource_decrypts_with_aes_256_gcm_and_nothing_else_opens_it() {
        let ciphertext = VECTOR_CIPHERTEXT.trim();
        let plain = decrypt(
            VECTOR_KEY.as_bytes(),
            VECTOR_NONCE.as_bytes(),
            VECTOR_AAD.as_bytes(),
            ciphertext,
        )
        .expect("decrypts");
        assert_eq!(plain, VECTOR_PLAIN.as_bytes());
        let wrong_key = "0123456789abcdef0123456789abcdeX";
        let nonce = VECTOR_NONCE.as_bytes();
        let aad = VECTOR_AAD.as_bytes();
        assert_eq!(decrypt(wrong_key.as_bytes(), nonce, aad, ciphertext), None);
        assert_eq!(
            decrypt(VECTOR_KEY.as_bytes(), nonce, b"refund", ciphertext),
            None
        );
        assert_eq!(
            decrypt(VECTOR_KEY.as_bytes(), b"Kj7QIyUiYx1r", aad, ciphertext),
            None
        );
        // A 16-byte key is AES-128: refused, never tried.
        assert_eq!(decrypt(b"testMchAPIv3Key0", nonce, aad, ciphertext), None);
        assert_eq!(
            decrypt(VECTOR_KEY.as_bytes(), nonce, aad, "not base64!"),
            None
        );
    }

    #[test]
    fn fields_keys_and_policy_of_an_opened_transaction() {
        let opened = Opened {
            envelope: serde_json::from_str(&format!(
                r#"{{"id":"EV-1","create_time":"2026-12-01T10:00:01+08:00","event_type":"TRANSACTION.SUCCESS","resource_type":"encrypt-resource","summary":"支付成功","resource":{{"algorithm":"AEAD_AES_256_GCM","ciphertext":"","nonce":"{VECTOR_NONCE}","associated_data":"transaction","original_type":"transaction"}}}}"#
            ))
            .expect("envelope"),
            resource: serde_json::from_str(VECTOR_PLAIN).expect("resource"),
        };
        let fields = opened.fields();
        assert_eq!(fields["amount.total"], "100");
        assert_eq!(fields["payer.openid"], "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
        assert_eq!(fields["notification.summary"], "支付成功");
        assert_eq!(
            opened.order_key(b"").as_str(),
            "wechatpay:1217752501201407033233368018"
        );
        assert_eq!(
            opened.dedup_keys(b"").semantic.as_deref(),
            Some("wechatpay|1900000109|4200000000000000000000000001|TRANSACTION.SUCCESS")
        );
        let mut wechat = WechatPay::new(&config::Wechatpay {
            mch_ids: vec!["1900000109".to_owned()],
            ..config::Wechatpay::default()
        });
        assert_eq!(wechat.policy(&opened), Ok(()));
        wechat.app_ids = vec!["wx-other".to_owned()];
        assert_eq!(wechat.policy(&opened), Err(Reason::ForeignReceiver));
        wechat.app_ids = vec!["wxd678efh567hg6787".to_owned()];
        assert_eq!(wechat.policy(&opened), Ok(()));
        wechat.mch_ids = vec!["1230000109".to_owned()];
        assert_eq!(wechat.policy(&opened), Err(Reason::ForeignReceiver));
    }
}
