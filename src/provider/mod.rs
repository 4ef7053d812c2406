//! The seam between the pipeline and a payment provider.
//!
//! Everything provider-specific sits behind it. At the ingress, [`Provider`]: which requests a
//! route accepts, what it checks before anything is queued (a signature it can verify with
//! public keys), which request headers travel with the raw body, the order key it can see, and
//! how it is answered. PayPal IPN ([`PayPal`]), Alipay ([`alipay`]) and WeChat Pay
//! ([`wechatpay`]) are one module each.

pub mod alipay;
pub mod paypal;
pub mod wechatpay;

use std::time::SystemTime;

pub use paypal::PayPal;

use crate::keys::OrderKey;

/// A request as the ingress read it, for the provider's check at the door.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The raw body.
    pub body: &'a [u8],
    /// The request's headers.
    pub headers: &'a hyper::HeaderMap,
    /// When the ingress received it (before reading the body).
    pub received_at: SystemTime,
}

impl Received<'_> {
    /// A request header's raw value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .get(name)
            .map(hyper::header::HeaderValue::as_bytes)
    }
}

/// Why a provider's check at the door refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The metric label and the answer's reason (`bad-signature`, `probe`…).
    pub reason: &'static str,
    /// What an operator should do, when the refusal is worth an alert (a probe, or a request
    /// with no signature at all, is not).
    pub alert: Option<&'static str>,
}

/// A failure answer in the provider's own format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its body.
    pub body: Vec<u8>,
}

/// A payment provider's notification format, as the ingress sees it.
pub trait Provider: Send + Sync + 'static {
    /// Short lower-case name, carried in the `x-ipn-provider` header (`paypal`).
    fn name(&self) -> &'static str;

    /// True when a request with this `Content-Type` value (none: no header) can be one of this
    /// provider's notifications.
    fn accepts_content_type(&self, content_type: Option<&str>) -> bool;

    /// The body of the success answer, sent only once the notification is persisted.
    fn acknowledgement(&self) -> &'static [u8];

    /// Every failure answer's body, when the provider wants its own format (Alipay: `fail`);
    /// `None`: a short reason as plain text.
    fn failure(&self, _reason: &str) -> Option<Failure> {
        None
    }

    /// What the ingress checks before anything is queued: a signature it can verify with
    /// public keys. A refused request gets a failure answer, so the provider resends it. An
    /// admitted one's order key comes with it (from the body read once for both).
    fn admit(&self, request: &Received<'_>) -> Result<OrderKey, Refused> {
        Ok(self.order_key(request.body))
    }

    /// Every reason [`Provider::admit`] can refuse with (metric labels shown from the start).
    fn refusal_reasons(&self) -> &'static [&'static str] {
        &[]
    }

    /// The request headers (lower case) that must travel with the raw body, for the worker's
    /// own check (WeChat Pay's signature headers). Each was bounded by [`Provider::admit`].
    fn carried_headers(&self) -> &'static [&'static str] {
        &[]
    }

    /// The key whose messages must stay in order, as far as the ingress can see it. Any body
    /// yields a key.
    fn order_key(&self, body: &[u8]) -> OrderKey;
}

/// Each enabled provider's ingress route: PayPal at `ingress.path`, the others at their own
/// path when enabled.
pub fn routes(config: &Config) -> Vec<(String, Box<dyn Provider>)> {
    let mut routes: Vec<(String, Box<dyn Provider>)> =
        vec![(config.ingress.path.clone(), Box::new(PayPal))];
    if config.alipay.enabled {
        let alipay = alipay::Alipay::new(&config.alipay);
        routes.push((config.alipay.path.clone(), Box::new(alipay)));
    }
    if config.wechatpay.enabled {
        let wechatpay = wechatpay::Verifier::new(&config.wechatpay);
        routes.push((config.wechatpay.path.clone(), Box::new(wechatpay)));
    }
    routes
}

// ---------------------------------------------------------------------------------------------
// The worker's half: checking a queued notification and what it becomes.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::form::Form;
use crate::keys::DedupKeys;
use crate::policy::{self, Reason};

/// The names the bridge knows in `x-ipn-provider`; PayPal's is the default.
pub const NAMES: [&str; 3] = [paypal::NAME, alipay::NAME, wechatpay::NAME];

/// A queued notification, as the worker's checks see it.
pub struct Queued<'a> {
    /// `x-ipn-provider`: one of [`NAMES`].
    pub provider: &'static str,
    /// The raw body.
    pub body: &'a [u8],
    /// Its order key.
    pub key: &'a OrderKey,
    /// When the ingress received it, when known.
    pub received_at: Option<SystemTime>,
    /// A request header that travelled with the body.
    pub header: &'a (dyn Fn(&str) -> Option<Vec<u8>> + Sync),
}

/// A notification every check passed: what the pipeline needs to claim and publish it, the
/// same for every provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// What makes a resend a duplicate.
    pub dedup: DedupKeys,
    /// Every field, decoded to UTF-8 (first value when a name repeats).
    pub fields: BTreeMap<String, String>,
    /// What the event names as its type (`txn_type`, `notify_type`, `event_type`).
    pub txn_type: Option<String>,
    /// The provider's status (`payment_status`, `trade_status`, `trade_state`…).
    pub payment_status: Option<String>,
    /// The provider's transaction id (`txn_id`, `trade_no`, `transaction_id`).
    pub txn_id: Option<String>,
    /// What it is about, the same for every provider.
    pub kind: Kind,
    /// The provider's status in lower case (`completed`, `trade_success`, `success`).
    pub status: Option<String>,
    /// The amount in the currency's major unit, as a decimal string (`88.00`, `-10.00` for a
    /// PayPal refund); for a refund, the amount refunded (Alipay: cumulative).
    pub amount: Option<String>,
    /// The ISO 4217 currency, when the notification names or implies one.
    pub currency: Option<String>,
    /// The merchant's own order id (PayPal's `invoice`, `out_trade_no`).
    pub merchant_order_id: Option<String>,
    /// The charset the fields were decoded with (encoding_rs name).
    pub charset: String,
    /// True when the message named no charset and one was assumed.
    pub charset_assumed: bool,
    /// A sandbox / test notification.
    pub test: bool,
    /// A transaction paid under this notification's key that later disputes naming only it
    /// must follow (PayPal's subscription payments); recorded with the claim.
    pub paid: Option<String>,
    /// When the provider's check passed.
    pub verified_at: SystemTime,
}

impl Verified {
    /// A verified form notification's fields and charset; the rest from the provider.
    pub fn of_form(
        form: &Form,
        dedup: DedupKeys,
        [txn_type, payment_status, txn_id]: [Option<String>; 3],
        verified_at: SystemTime,
    ) -> Verified {
        let charset = form.charset();
        let mut fields = BTreeMap::new();
        for (name, value) in form.decoded() {
            fields.entry(name).or_insert(value);
        }
        let status = payment_status.as_deref().map(str::to_lowercase);
        Verified {
            dedup,
            fields,
            txn_type,
            payment_status,
            txn_id,
            kind: Kind::Other,
            status,
            amount: None,
            currency: None,
            merchant_order_id: None,
            charset: charset.encoding.name().to_owned(),
            charset_assumed: charset.assumed,
            test: false,
            paid: None,
            verified_at,
        }
    }
}

/// What a notification is about, whoever sent it: the first word after the provider in the
/// routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A payment (or its status changing: pending, completed, failed…).
    Payment,
    /// Money going back to the payer.
    Refund,
    /// A chargeback, reversal, case or adjustment.
    Dispute,
    /// A subscription's or recurring profile's lifecycle and payments.
    Subscription,
    /// Money sent by the merchant (PayPal masspay).
    Payout,
    /// Anything else.
    Other,
}

impl Kind {
    /// The word in routing keys and the event's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Payment => "payment",
            Kind::Refund => "refund",
            Kind::Dispute => "dispute",
            Kind::Subscription => "subscription",
            Kind::Payout => "payout",
            Kind::Other => "other",
        }
    }
}

/// An amount in minor units (fen, cents) as a decimal string in the major unit of `currency`
/// (2 decimals, none for the zero-decimal currencies WeChat Pay settles in).
pub fn minor_units(amount: i64, currency: Option<&str>) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let units = amount.unsigned_abs();
    match currency {
        Some("JPY" | "KRW") => format!("{sign}{units}"),
        _ => format!("{sign}{}.{:02}", units / 100, units % 100),
    }
}

/// What the worker's checks decided.
#[derive(Debug)]
pub enum Checked {
    /// Every check passed.
    Passed(Box<Verified>),
    /// To be quarantined for this reason, with a cause for `x-ipn-cause` when there is one.
    Rejected(Reason, Option<String>),
    /// PayPal's: the checks before the postback passed; ask PayPal, then
    /// [`Providers::after_postback`].
    Postback(paypal::Pending),
}

/// The worker's side of every enabled provider.
#[derive(Debug, Clone)]
pub struct Providers {
    paypal: crate::config::Paypal,
    alipay: Option<alipay::Alipay>,
    wechatpay: Option<wechatpay::WechatPay>,
}

impl Providers {
    /// From the config: PayPal always, the others when enabled.
    pub fn new(config: &Config) -> Providers {
        Providers {
            paypal: config.paypal.clone(),
            alipay: config
                .alipay
                .enabled
                .then(|| alipay::Alipay::new(&config.alipay)),
            wechatpay: config
                .wechatpay
                .enabled
                .then(|| wechatpay::WechatPay::new(&config.wechatpay)),
        }
    }

    /// The checks that need no network: readable, identifying fields bounded, signature,
    /// decryption, policy.
    pub fn check(&self, queued: &Queued<'_>) -> Checked {
        match queued.provider {
            alipay::NAME => match &self.alipay {
                Some(alipay) => alipay.check(queued.body),
                None => not_enabled("Alipay", "[alipay]"),
            },
            wechatpay::NAME => match &self.wechatpay {
                Some(wechatpay) => wechatpay.check(queued),
                None => not_enabled("WeChat Pay", "[wechatpay]"),
            },
            _ => paypal::check(queued.body),
        }
    }

    /// PayPal's checks after its `VERIFIED`.
    pub fn after_postback(
        &self,
        pending: paypal::Pending,
        queued: &Queued<'_>,
        verified_at: SystemTime,
    ) -> Checked {
        pending.after_postback(&self.paypal, queued, verified_at)
    }

    /// The key a notification belongs to when the ingress could not see it (WeChat Pay's is
    /// inside the encrypted resource), if that is not the key it has: the worker re-routes it
    /// there. `None` also when it cannot be opened (its checks then quarantine it).
    pub fn own_key(&self, queued: &Queued<'_>) -> Option<OrderKey> {
        match (queued.provider, &self.wechatpay) {
            (wechatpay::NAME, Some(wechatpay)) => {
                wechatpay.own_key(queued).filter(|key| key != queued.key)
            }
            _ => None,
        }
    }

    /// The intake key whose notifications this worker re-routes to the key inside them
    /// ([`Providers::own_key`]): WeChat Pay's, when it is enabled.
    pub fn intake_key(&self) -> Option<OrderKey> {
        self.wechatpay.as_ref().map(|_| wechatpay::intake_key())
    }

    /// The provider's transaction id as far as the body shows it, for log lines and alerts.
    pub fn txn_id(provider: &str, body: &[u8]) -> Option<String> {
        Providers::identify(provider, body).1
    }

    /// The notification's type and transaction id as far as the body shows them without any
    /// check (for operators: a blocked key's row, alerts): PayPal's `txn_type` and `txn_id`,
    /// Alipay's `notify_type` and `trade_no`, WeChat Pay's `event_type` (its transaction id is
    /// encrypted).
    pub fn identify(provider: &str, body: &[u8]) -> (Option<String>, Option<String>) {
        match provider {
            alipay::NAME => {
                let form = Form::parse(body);
                (form.text("notify_type"), form.text("trade_no"))
            }
            wechatpay::NAME => (wechatpay::event_type(body), None),
            _ => {
                let form = Form::parse(body);
                (form.text("txn_type"), form.text("txn_id"))
            }
        }
    }
}

impl Providers {
    /// What an operator can do about a notification of `provider` quarantined for `reason`
    /// (the alert's fix).
    pub fn quarantine_fix(provider: &str, reason: Reason, message_id: &str) -> String {
        let replay = format!("`ipnctl quarantine replay --id {message_id}`");
        match (provider, reason) {
            (alipay::NAME, Reason::Invalid) => format!(
                "its signature does not verify with alipay.public_keys here (the ingress had checked it): published into a shard by someone else, or the worker's keys differ from the ingress's; once they agree, {replay}"
            ),
            (alipay::NAME, Reason::ForeignReceiver) => format!(
                "addressed to another Alipay app or seller: check alipay.app_id/seller_ids; once they are right, {replay}"
            ),
            (wechatpay::NAME, Reason::Invalid) => format!(
                "its signature does not verify with wechatpay.platform_keys here (see x-ipn-cause; the ingress had checked it): published into a shard by someone else, or the worker's keys differ from the ingress's; once they agree, {replay}"
            ),
            (wechatpay::NAME, Reason::ForeignReceiver) => format!(
                "addressed to another WeChat Pay merchant or app: check wechatpay.mch_ids/app_ids; once they are right, {replay}"
            ),
            (_, Reason::Invalid) => format!(
                "PayPal says it did not send this IPN: a possible forgery; check where it came from. Nothing is published. If PayPal was wrong, {replay}"
            ),
            (_, Reason::WrongEnvironment) => format!(
                "a sandbox IPN in live mode or the reverse: check paypal.environment and the notify_url configured at PayPal; once the config is right, {replay}"
            ),
            (_, Reason::ForeignReceiver) => format!(
                "addressed to another PayPal account: check paypal.receiver_ids/receiver_emails; once they are right, {replay}"
            ),
            (_, Reason::Unreadable) => {
                "not a notification the provider could have sent; nothing to replay".to_owned()
            }
            (_, Reason::Undecryptable) => format!(
                "the resource does not decrypt (see x-ipn-cause): check wechatpay.apiv3_key against the merchant platform; once it is right, {replay}"
            ),
            (_, Reason::Unprocessable) => format!(
                "the bridge can never store or publish one of its values (see x-ipn-cause): most likely a forged or malformed notification. Nothing is published. If it is genuine, report it as a bug; after a fix, {replay}"
            ),
        }
    }
}

fn not_enabled(provider: &str, section: &str) -> Checked {
    let cause = format!(
        "a {provider} notification, but {section} is not enabled in this worker's config; enable it, then replay"
    );
    Checked::Rejected(Reason::Unprocessable, Some(cause))
}

/// [`policy::readable`], as a check's outcome.
fn readable(body: &[u8]) -> Result<(), Checked> {
    policy::readable(body).map_err(|reason| Checked::Rejected(reason, None))
}
