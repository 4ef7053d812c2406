//! Configuration: defaults in code, then an optional TOML file, then `IPN_*` environment
//! variables (`IPN_AMQP__URL` sets `amqp.url`).
//!
//! Loading is a pure function of (file text, environment map) so tests never touch the process
//! environment. Unknown keys are rejected and every value is typed at the edge, so a typo or a
//! bad value stops the process at start-up with one line naming the key, instead of running
//! with a surprise.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;
use serde::Deserialize;

/// Channels one connection may use, under RabbitMQ's default `channel_max` of 2047.
const MAX_CHANNELS: usize = 2000;

/// Broker nodes `amqp.urls` may list: a cluster has 3, 5 or 7; the bound keeps the node label of
/// the metrics and the connection walk small.
const MAX_NODES: usize = 32;

/// Environment variables that name the config file rather than a setting.
pub const CONFIG_FILE_VAR: &str = "IPN_CONFIG";
const ENV_PREFIX: &str = "IPN_";

/// A configuration that cannot be used; its `Display` is the one line an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file named by `--config` or `IPN_CONFIG` cannot be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The path as given.
        path: String,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file: {0}")]
    File(#[source] toml::de::Error),
    /// A key is unknown or its value has the wrong type or range.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `ingress.listen`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The whole configuration of every binary.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Broker connection.
    pub amqp: Amqp,
    /// Names and shapes of exchanges and queues.
    pub topology: Topology,
    /// The HTTP intake.
    pub ingress: Ingress,
    /// PayPal verification.
    pub paypal: Paypal,
    /// Alipay's asynchronous notifications (off by default).
    pub alipay: Alipay,
    /// WeChat Pay's API v3 notifications (off by default).
    pub wechatpay: Wechatpay,
    /// The worker's PostgreSQL database.
    pub database: Database,
    /// The worker's processing.
    pub worker: Worker,
    /// Delayed retries of IPNs PayPal could not verify, and when to give up (park).
    pub retry: Retry,
    /// Telling a human: email and webhook alerts.
    pub alert: Alert,
    /// Queues of business services, declared and bound to `<prefix>.events` at start-up.
    /// File only (`[[downstream]]` entries), not settable from the environment.
    pub downstream: Vec<Downstream>,
    /// Logs.
    pub telemetry: Telemetry,
}

/// A business service's queue on `<prefix>.events`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Downstream {
    /// Queue name (a durable quorum queue, created if missing).
    pub queue: String,
    /// Topic patterns on `<provider>.<kind>.<type>.<status>`, e.g. `paypal.subscription.#`,
    /// `*.refund.#`.
    /// RabbitMQ's `*` and `#` match whole words only, so a word that mixes them with letters
    /// (`subscr_*`) would match nothing: it is refused at load.
    #[serde(default = "all_events")]
    pub bindings: Vec<String>,
    /// Returns of one event to the queue (a requeue, or a consumer gone with it unacked) before
    /// the broker dead-letters it to `<queue>.dead`, so it is delivered at most
    /// `delivery_limit + 1` times (RabbitMQ 3.10 counts returns): a service that requeues a
    /// poison event cannot loop on it forever.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: NonZeroU16,
    /// Events nobody consumed for this long move to `<queue>.dead` (off by default).
    #[serde(default, with = "humantime_serde")]
    pub message_ttl: Option<Duration>,
    /// The worker alerts when the queue has had no consumer for this long.
    #[serde(default = "default_no_consumer_after", with = "humantime_serde")]
    pub no_consumer_after: Duration,
    /// The worker alerts when the queue holds more than this many events and still grows.
    #[serde(default = "default_max_depth")]
    pub max_depth: u32,
}

impl Downstream {
    /// A queue bound with `bindings`, every other setting at its default.
    pub fn new(queue: &str, bindings: &[&str]) -> Downstream {
        Downstream {
            queue: queue.to_owned(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            delivery_limit: default_delivery_limit(),
            message_ttl: None,
            no_consumer_after: default_no_consumer_after(),
            max_depth: default_max_depth(),
        }
    }
}

/// A downstream queue's dead-letter queue: `<queue>.dead`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

fn all_events() -> Vec<String> {
    vec!["#".to_owned()]
}

fn default_delivery_limit() -> NonZeroU16 {
    NonZeroU16::new(20).unwrap_or(NonZeroU16::MIN)
}

fn default_no_consumer_after() -> Duration {
    Duration::from_secs(300)
}

fn default_max_depth() -> u32 {
    10_000
}

/// How the worker processes each IPN.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Worker {
    /// Postbacks tried in-process before the failure counts as transient for the message.
    pub verify_attempts: std::num::NonZeroU32,
    /// Wait before the second attempt; doubles for each further one.
    #[serde(with = "humantime_serde")]
    pub verify_backoff: Duration,
    /// Longest wait for the broker's confirm of an event or quarantine publish.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Unacked deliveries per shard queue (AMQP prefetch).
    pub prefetch: std::num::NonZeroU16,
    /// IPNs processed at once by this worker, across shards and keys.
    pub concurrency: std::num::NonZeroUsize,
    /// After a transient failure, an IPN is tried again after this long, doubling up to
    /// `retry_max`; later IPNs of its key wait behind it, other keys go on.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest wait between tries of one IPN.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Tries in place (unacked, key held) before an IPN failing on our own database or broker
    /// is sent through the delay tiers instead, so it cannot hold its shard's prefetch window
    /// forever.
    pub retry_in_place: std::num::NonZeroU32,
    /// On SIGTERM, IPNs in progress get this long to finish (publish, confirm, ack).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Address of the worker's `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// This worker's id among the workers sharing the shards; unset: a fresh one per start.
    #[serde(deserialize_with = "optional_text")]
    pub id: Option<String>,
    /// How often the worker records that it is alive and recomputes which shards it owns.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A worker silent this long is taken for dead; its shards go to the others.
    #[serde(with = "humantime_serde")]
    pub takeover: Duration,
    /// How often one of the workers looks at each `[[downstream]]` queue (depth, consumers,
    /// dead-lettered) for the metrics and the alerts.
    #[serde(with = "humantime_serde")]
    pub downstream_check: Duration,
}

impl Default for Worker {
    fn default() -> Self {
        Self {
            verify_attempts: std::num::NonZeroU32::new(3).unwrap_or(std::num::NonZeroU32::MIN),
            verify_backoff: Duration::from_millis(500),
            confirm_timeout: Duration::from_secs(10),
            prefetch: std::num::NonZeroU16::new(64).unwrap_or(std::num::NonZeroU16::MIN),
            concurrency: std::num::NonZeroUsize::new(64).unwrap_or(std::num::NonZeroUsize::MIN),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            retry_in_place: std::num::NonZeroU32::new(5).unwrap_or(std::num::NonZeroU32::MIN),
            shutdown_grace: Duration::from_secs(15),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            id: None,
            heartbeat: Duration::from_secs(5),
            takeover: Duration::from_secs(15),
            downstream_check: Duration::from_secs(30),
        }
    }
}

/// Delayed retries: an IPN that PayPal could not verify (after the in-process attempts) waits in
/// the tier queue of its attempt, then returns to its shard; past the last tier, or past
/// `max_age`, it is parked.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retry {
    /// The wait before each further attempt, in order. Equal delays share one queue
    /// (`<prefix>.wait.<delay>`). Environment: comma-separated, e.g. `10s,1m,10m`.
    #[serde(deserialize_with = "durations")]
    pub tiers: Vec<Duration>,
    /// An IPN failing this long after its first failure is parked even with tiers left.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        let hour = Duration::from_secs(3600);
        Self {
            // About PayPal's own resend span (4 days), in growing steps.
            tiers: vec![
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(600),
                hour,
                6 * hour,
                24 * hour,
                24 * hour,
                24 * hour,
            ],
            max_age: 5 * 24 * hour,
        }
    }
}

/// Alerts to a human: a webhook, email over SMTP, either or both (none: alerts are only logged).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Alert {
    /// JSON POST with a Slack-compatible `text` field. Never printed (it may hold a token).
    pub webhook_url: Option<WebhookUrl>,
    /// `smtps://user:pass@host:465` (TLS) or `smtp://user:pass@host:587?tls=required`
    /// (STARTTLS). Never printed with its password.
    pub smtp_url: Option<SmtpUrl>,
    /// The sender of alert emails.
    #[serde(deserialize_with = "text_or_number")]
    pub email_from: String,
    /// Recipients of alert emails. Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub email_to: Vec<String>,
    /// Alerts of one cause (kind and reason) go out at most once per interval; the ones in
    /// between are summarized in the next.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// A failing channel is tried this many times (waits of 1 s, doubling) before the alert is
    /// given up on that channel.
    pub attempts: std::num::NonZeroU32,
}

impl Default for Alert {
    fn default() -> Self {
        Self {
            webhook_url: None,
            smtp_url: None,
            email_from: "ipn-bridge <ipn-bridge@localhost>".to_owned(),
            email_to: Vec::new(),
            min_interval: Duration::from_secs(600),
            attempts: std::num::NonZeroU32::new(6).unwrap_or(std::num::NonZeroU32::MIN),
        }
    }
}

/// The worker's PostgreSQL database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    /// `postgres://user:pass@host:port/db`; the database is created if missing. Never printed
    /// with its password.
    pub url: DatabaseUrl,
    /// Connections in the pool.
    pub max_connections: std::num::NonZeroU32,
    /// Longest wait for a free connection.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest wait for a new connection (and for creating the database) at start-up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for any one query or migration; past it the operation fails, naming
    /// what timed out.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Dedup records are kept at least this long after their event was published.
    #[serde(with = "humantime_serde")]
    pub dedup_retention: Duration,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            url: DatabaseUrl::from_str("postgres://postgres@127.0.0.1:5432/ipn_bridge")
                .unwrap_or_else(|_| unreachable!("the default URL parses")),
            max_connections: std::num::NonZeroU32::new(8).unwrap_or(std::num::NonZeroU32::MIN),
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(10),
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A URL with its password replaced by `***`.
fn redacted(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            // Only fails for URLs that cannot carry a password, which this one does.
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unprintable url>".to_owned(),
    }
}

/// Which PayPal environment verifies IPNs, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Paypal {
    /// `live` or `sandbox`: picks the postback URL (and, later, the `test_ipn` policy).
    pub environment: Environment,
    /// Overrides the environment's postback URL (tests, local demos with `ipnctl fake-paypal`).
    /// Empty means unset, so a container environment can always pass the variable.
    #[serde(deserialize_with = "optional_url")]
    pub verify_url: Option<url::Url>,
    /// One postback gives up after this long (connect included); the outcome is then transient.
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Duration,
    /// The merchant's PayPal account ids; when set (with or without emails), an IPN for another
    /// account is quarantined. Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub receiver_ids: Vec<String>,
    /// The merchant's PayPal account emails (compared case-insensitively). Environment:
    /// comma-separated.
    #[serde(deserialize_with = "list")]
    pub receiver_emails: Vec<String>,
}

impl Default for Paypal {
    fn default() -> Self {
        Self {
            environment: Environment::Live,
            verify_url: None,
            verify_timeout: Duration::from_secs(10),
            receiver_ids: Vec::new(),
            receiver_emails: Vec::new(),
        }
    }
}

/// Alipay's asynchronous notifications (`trade_status_sync`), verified by the ingress with
/// Alipay's public key(s) before anything is queued.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Alipay {
    /// Take Alipay notifications at `path`.
    pub enabled: bool,
    /// The ingress route Alipay posts to (the `notify_url` given to Alipay).
    pub path: String,
    /// Our Alipay app id; a notification for another app is quarantined.
    #[serde(deserialize_with = "text_or_number")]
    pub app_id: String,
    /// Our seller ids (`2088…`); when set, a notification naming another seller is quarantined.
    /// Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub seller_ids: Vec<String>,
    /// Alipay's public key(s) for SHA256withRSA (`RSA2`): PEM text, the bare base64 the Alipay
    /// console shows, or the path of a file holding either. Several during a key rotation (each
    /// is tried). Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub public_keys: Vec<String>,
}

impl Default for Alipay {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "/alipay/notify".to_owned(),
            app_id: String::new(),
            seller_ids: Vec::new(),
            public_keys: Vec::new(),
        }
    }
}

impl Alipay {
    /// Replaces each key given as a file path by the file's text.
    fn read_key_files(&mut self) -> Result<(), Error> {
        for key in &mut self.public_keys {
            *key = read_if_path(key, "alipay.public_keys")?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        let problem = if self.app_id.is_empty() {
            Some((
                "alipay.app_id",
                "must be set when alipay.enabled".to_owned(),
            ))
        } else if self.public_keys.is_empty() {
            Some((
                "alipay.public_keys",
                "must name at least one Alipay public key when alipay.enabled".to_owned(),
            ))
        } else if !self.path.starts_with('/') || self.path.contains(['?', '#']) {
            Some((
                "alipay.path",
                "must be a path like /alipay/notify".to_owned(),
            ))
        } else {
            self.public_keys
                .iter()
                .enumerate()
                .find_map(|(index, key)| {
                    crate::provider::alipay::public_key_der(key)
                        .err()
                        .map(|e| format!("key {index}: {e}"))
                })
                .map(|e| ("alipay.public_keys", e))
        };
        match problem {
            Some((key, problem)) => Err(Error::Invalid {
                key: key.to_owned(),
                problem,
            }),
            None => Ok(()),
        }
    }
}

/// WeChat Pay's API v3 notifications: signed by WeChat Pay (checked by the ingress with the
/// platform's public keys before anything is queued), their resource encrypted with the
/// merchant's APIv3 key (decrypted by the worker only).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Wechatpay {
    /// Take WeChat Pay notifications at `path`.
    pub enabled: bool,
    /// The ingress route WeChat Pay posts to (the `notify_url` of our orders and refunds).
    pub path: String,
    /// Our merchant id(s) (`mchid`; in partner mode the service provider's `sp_mchid`): a
    /// notification for another merchant is quarantined. Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub mch_ids: Vec<String>,
    /// Our app id(s) (`appid` / `sp_appid`); when set, a transaction for another app is
    /// quarantined (refunds name no app). Environment: comma-separated.
    #[serde(deserialize_with = "list")]
    pub app_ids: Vec<String>,
    /// The merchant's APIv3 key (32 characters), or the path of a file holding it. Needed by
    /// the worker only; never printed.
    pub apiv3_key: Secret,
    /// WeChat Pay's keys by the serial a notification names in `Wechatpay-Serial`: a platform
    /// certificate's serial (hex) or a public-key id (`PUB_KEY_ID_…`), each mapped to the
    /// certificate or public key as PEM text or the path of a file holding it. During a switch
    /// WeChat Pay signs with both for days: configure both. Environment: `SERIAL=PEM-or-path`
    /// pairs, comma-separated.
    #[serde(deserialize_with = "serial_map")]
    pub platform_keys: BTreeMap<String, String>,
    /// How far a notification's `Wechatpay-Timestamp` may be from the ingress's clock when it
    /// arrives (WeChat Pay's SDKs use 5 minutes); further is refused as stale.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for Wechatpay {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "/wechatpay/notify".to_owned(),
            mch_ids: Vec::new(),
            app_ids: Vec::new(),
            apiv3_key: Secret::default(),
            platform_keys: BTreeMap::new(),
            max_clock_skew: Duration::from_secs(300),
        }
    }
}

impl Wechatpay {
    /// Replaces each key given as a file path by the file's text.
    fn read_key_files(&mut self) -> Result<(), Error> {
        for key in self.platform_keys.values_mut() {
            *key = read_if_path(key, "wechatpay.platform_keys")?;
        }
        let key = read_if_path(self.apiv3_key.expose(), "wechatpay.apiv3_key")?;
        self.apiv3_key = Secret(key.trim_end_matches(['\r', '\n']).to_owned());
        Ok(())
    }

    fn validate(&self) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        let problem = if self.mch_ids.is_empty() {
            Some((
                "wechatpay.mch_ids",
                "must name our merchant id when wechatpay.enabled".to_owned(),
            ))
        } else if self.apiv3_key.expose().len() != 32 {
            Some((
                "wechatpay.apiv3_key",
                format!(
                    "must be the 32-character APIv3 key set in the merchant platform (this one has {} bytes)",
                    self.apiv3_key.expose().len()
                ),
            ))
        } else if self.platform_keys.is_empty() {
            Some((
                "wechatpay.platform_keys",
                "must map at least one Wechatpay-Serial to its certificate or public key when wechatpay.enabled".to_owned(),
            ))
        } else if !self.path.starts_with('/') || self.path.contains(['?', '#']) {
            Some((
                "wechatpay.path",
                "must be a path like /wechatpay/notify".to_owned(),
            ))
        } else {
            self.platform_keys.iter().find_map(|(serial, key)| {
                crate::provider::wechatpay::platform_key_der(serial, key)
                    .err()
                    .map(|e| ("wechatpay.platform_keys", format!("{serial}: {e}")))
            })
        };
        match problem {
            Some((key, problem)) => Err(Error::Invalid {
                key: key.to_owned(),
                problem,
            }),
            None => Ok(()),
        }
    }
}

/// A file's text when `value` is a path (`/…` or `./…`), else `value`.
fn read_if_path(value: &str, key: &str) -> Result<String, Error> {
    if value.starts_with('/') || value.starts_with("./") {
        std::fs::read_to_string(value).map_err(|e| Error::Invalid {
            key: key.to_owned(),
            problem: format!("cannot read {value}: {e}"),
        })
    } else {
        Ok(value.to_owned())
    }
}

/// A secret value (a key): deserialized like text, never printed by `Debug` or `Display`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(unset)"
        } else {
            "Secret(***)"
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A map from TOML (`{ "SERIAL" = "PEM or path" }`) or from the environment
/// (`SERIAL=path,SERIAL=path`).
fn serial_map<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Map {
        Table(BTreeMap<String, String>),
        Text(String),
    }
    match Map::deserialize(deserializer)? {
        Map::Table(table) => Ok(table),
        Map::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((serial, key)) => Ok((serial.trim().to_owned(), key.trim().to_owned())),
                None => Err(serde::de::Error::custom(format!(
                    "`{}` is not SERIAL=PEM-or-path",
                    crate::bounded::shown(pair)
                ))),
            })
            .collect(),
    }
}

/// A PayPal environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Real money: `https://ipnpb.paypal.com/cgi-bin/webscr`.
    #[default]
    Live,
    /// The sandbox: `https://ipnpb.sandbox.paypal.com/cgi-bin/webscr`.
    Sandbox,
}

impl Paypal {
    /// The URL postbacks go to: the override, or the environment's own.
    pub fn postback_url(&self) -> url::Url {
        let fallback = match self.environment {
            Environment::Live => "https://ipnpb.paypal.com/cgi-bin/webscr",
            Environment::Sandbox => "https://ipnpb.sandbox.paypal.com/cgi-bin/webscr",
        };
        self.verify_url.clone().unwrap_or_else(|| {
            url::Url::parse(fallback).unwrap_or_else(|_| unreachable!("constant URLs parse"))
        })
    }
}

/// Broker connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Amqp {
    /// `amqp://user:pass@host:port/vhost`; the password never prints. The one-node case of
    /// `urls`; set one or the other.
    pub url: AmqpUrl,
    /// The nodes of a cluster, one URL each (same vhost): every connection goes to the first
    /// that answers, in an order shuffled once per process, and to another after a loss
    /// ([`crate::amqp::connect`]). Empty: `url` alone. From the environment, comma-separated.
    #[serde(deserialize_with = "amqp_urls")]
    pub urls: Vec<AmqpUrl>,
    /// Confirm-mode channels the publisher spreads its messages over.
    pub publisher_channels: NonZeroUsize,
    /// Give up on one connection attempt after this long.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles up to `reconnect_max`.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// AMQP heartbeat asked of the broker (a `heartbeat` in the URL wins): a silent broker is
    /// noticed after two missed beats. Whole seconds, 0 to 65535 s; 0 turns heartbeats off.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Confirm timeouts in a row after which the publisher takes its connection for dead,
    /// answers at once that the broker is unavailable and reconnects.
    pub timeouts_before_reconnect: std::num::NonZeroU32,
}

impl Default for Amqp {
    fn default() -> Self {
        Self {
            url: AmqpUrl::from_str("amqp://guest:guest@127.0.0.1:5672/%2f")
                .unwrap_or_else(|_| unreachable!("the default URL parses")),
            urls: Vec::new(),
            publisher_channels: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            timeouts_before_reconnect: std::num::NonZeroU32::new(3)
                .unwrap_or(std::num::NonZeroU32::MIN),
        }
    }
}

impl Amqp {
    /// The broker nodes to connect to: `urls`, or `url` when that is empty.
    pub fn nodes(&self) -> &[AmqpUrl] {
        if self.urls.is_empty() {
            std::slice::from_ref(&self.url)
        } else {
            &self.urls
        }
    }

    /// The nodes for messages, passwords hidden: `amqp://guest:***@a:5672/%2f, …`.
    pub fn shown(&self) -> String {
        let shown: Vec<String> = self.nodes().iter().map(ToString::to_string).collect();
        shown.join(", ")
    }

    fn validate(&self, url_set: bool) -> Result<(), Error> {
        let invalid = |problem: &str| Error::Invalid {
            key: "amqp.urls".to_owned(),
            problem: problem.to_owned(),
        };
        if url_set && !self.urls.is_empty() {
            return Err(invalid(
                "set amqp.url (one node) or amqp.urls (a cluster's nodes), not both",
            ));
        }
        if self.urls.len() > MAX_NODES {
            return Err(invalid("must list at most 32 nodes"));
        }
        let vhost = |url: &AmqpUrl| url.parsed.vhost.clone();
        if let Some(first) = self.urls.first()
            && self.urls.iter().any(|url| vhost(url) != vhost(first))
        {
            return Err(invalid(
                "every node must name the same vhost: the topology lives in one vhost of the cluster",
            ));
        }
        Ok(())
    }
}

/// A list of AMQP URLs from TOML (`["amqp://…", "amqp://…"]`) or the environment (`a,b`).
fn amqp_urls<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<AmqpUrl>, D::Error> {
    list(deserializer)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// Topology settings: see `topology.rs` for the names derived from them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topology {
    /// Prefix of every exchange and queue name.
    #[serde(deserialize_with = "text_or_number")]
    pub prefix: String,
    /// Number of shard queues. Fixed per deployment: changing it is a drained migration.
    pub shards: NonZeroU16,
    /// Returns of one message to its shard queue (redeliveries) before the broker dead-letters
    /// it to `<prefix>.dead` (RabbitMQ 3.10 counts returns: `delivery_limit + 1` deliveries).
    pub delivery_limit: NonZeroU16,
    /// Nodes each quorum queue is replicated on when it is created
    /// (`x-quorum-initial-group-size`); a cluster with fewer nodes uses all of them. 3 survives
    /// one node lost; 5 two. Existing queues keep their own.
    pub quorum_group_size: std::num::NonZeroU8,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            prefix: "ipn".to_owned(),
            shards: NonZeroU16::new(32).unwrap_or(NonZeroU16::MIN),
            delivery_limit: NonZeroU16::new(20).unwrap_or(NonZeroU16::MIN),
            quorum_group_size: std::num::NonZeroU8::new(3).unwrap_or(std::num::NonZeroU8::MIN),
        }
    }
}

/// HTTP intake settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingress {
    /// Address to listen on: the providers' paths, `/healthz` and `/readyz`, and `/metrics`
    /// unless [`Ingress::admin_listen`] is set.
    pub listen: SocketAddr,
    /// A second address, for `/metrics` (and `/healthz`, `/readyz`): when set, `listen` (the
    /// public one) no longer answers `/metrics`, which tells anyone who asks the notification
    /// volume, the refusals and the broker node's address. Empty: none.
    #[serde(deserialize_with = "optional_address")]
    pub admin_listen: Option<SocketAddr>,
    /// Path PayPal posts to.
    #[serde(deserialize_with = "text_or_number")]
    pub path: String,
    /// Larger bodies get 413; reading stops at the limit.
    pub max_body_bytes: NonZeroUsize,
    /// Longest wait for the broker's confirm before answering 503.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// A client must send its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this time, or gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections served at once; further ones wait in the listen backlog until one closes.
    /// Keep it well under the open-file limit.
    pub max_connections: NonZeroUsize,
}

impl Default for Ingress {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            path: "/ipn".to_owned(),
            max_body_bytes: NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN),
            confirm_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(15),
            max_connections: NonZeroUsize::new(512).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// Log output settings; the filter comes from `RUST_LOG`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    /// `pretty` for people, `json` for log shippers.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A URL checked when loaded, whose password never appears in `Debug` or `Display`.
pub struct SecretUrl<K: UrlKind> {
    text: String,
    parsed: K::Parsed,
}

/// What a [`SecretUrl`] must parse as.
pub trait UrlKind {
    /// The parsed form clients connect with.
    type Parsed: Clone;
    /// Parses, or says in a few words what is wrong.
    fn parse(text: &str) -> Result<Self::Parsed, String>;
}

/// `amqp://` or `amqps://`, parsed by lapin.
#[derive(Debug, Clone, Copy)]
pub struct AmqpKind;

impl UrlKind for AmqpKind {
    type Parsed = AMQPUri;
    fn parse(text: &str) -> Result<AMQPUri, String> {
        AMQPUri::from_str(text).map_err(|e| format!("not an AMQP URL: {e}"))
    }
}

/// `postgres://` or `postgresql://`, parsed by sqlx.
#[derive(Debug, Clone, Copy)]
pub struct PostgresKind;

impl UrlKind for PostgresKind {
    type Parsed = sqlx::postgres::PgConnectOptions;
    fn parse(text: &str) -> Result<Self::Parsed, String> {
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err("must start with postgres:// or postgresql://".to_owned());
        }
        sqlx::postgres::PgConnectOptions::from_str(text)
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))
    }
}

/// `http://` or `https://`, for webhooks.
#[derive(Debug, Clone, Copy)]
pub struct WebhookKind;

impl UrlKind for WebhookKind {
    type Parsed = url::Url;
    fn parse(text: &str) -> Result<url::Url, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
        match url.scheme() {
            "http" | "https" => Ok(url),
            _ => Err("must start with http:// or https://".to_owned()),
        }
    }
}

/// `smtp://` or `smtps://`, as lettre reads it.
#[derive(Debug, Clone, Copy)]
pub struct SmtpKind;

impl UrlKind for SmtpKind {
    type Parsed = String;
    fn parse(text: &str) -> Result<String, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
        match url.scheme() {
            "smtp" | "smtps" => Ok(text.to_owned()),
            _ => Err("must start with smtp:// or smtps://".to_owned()),
        }
    }
}

/// An alert webhook's URL.
pub type WebhookUrl = SecretUrl<WebhookKind>;
/// An SMTP server's URL, credentials included.
pub type SmtpUrl = SecretUrl<SmtpKind>;

impl WebhookUrl {
    /// The URL to POST to.
    pub fn url(&self) -> url::Url {
        self.parsed.clone()
    }
}

impl SmtpUrl {
    /// The URL text, for lettre.
    pub fn expose(&self) -> &str {
        &self.parsed
    }
}

/// The broker's URL.
pub type AmqpUrl = SecretUrl<AmqpKind>;
/// The worker database's URL.
pub type DatabaseUrl = SecretUrl<PostgresKind>;

impl AmqpUrl {
    /// The parsed URI, for connecting.
    pub fn uri(&self) -> AMQPUri {
        self.parsed.clone()
    }

    /// `host:port`: which node this is, for logs and metrics (no credentials, no vhost).
    pub fn node(&self) -> String {
        let authority = &self.parsed.authority;
        format!("{}:{}", authority.host, authority.port)
    }
}

impl DatabaseUrl {
    /// Connection options for sqlx.
    pub fn options(&self) -> sqlx::postgres::PgConnectOptions {
        self.parsed.clone()
    }
}

impl<K: UrlKind> Clone for SecretUrl<K> {
    fn clone(&self) -> Self {
        Self {
            text: self.text.clone(),
            parsed: self.parsed.clone(),
        }
    }
}

impl<K: UrlKind> FromStr for SecretUrl<K> {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(Self {
            text: text.to_owned(),
            parsed: K::parse(text)?,
        })
    }
}

impl<'de, K: UrlKind> Deserialize<'de> for SecretUrl<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl<K: UrlKind> fmt::Display for SecretUrl<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redacted(&self.text))
    }
}

impl<K: UrlKind> fmt::Debug for SecretUrl<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

impl Config {
    /// Builds the configuration from the optional file text and the environment (only `IPN_*`
    /// variables are read; `IPN_CONFIG` names the file and is skipped).
    pub fn load(file_text: Option<&str>, env: &BTreeMap<String, String>) -> Result<Config, Error> {
        let mut table = match file_text {
            Some(text) => toml::from_str::<toml::Table>(text).map_err(Error::File)?,
            None => toml::Table::new(),
        };
        for (name, value) in env.iter().filter(|(name, _)| is_setting(name)) {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                overlay(&mut table, name, path, value)?;
            }
        }
        let url_set = table
            .get("amqp")
            .and_then(toml::Value::as_table)
            .is_some_and(|amqp| amqp.contains_key("url"));
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::Invalid {
                key: e.path().to_string(),
                problem: e.inner().message().to_owned(),
            })?;
        config.alipay.read_key_files()?;
        config.wechatpay.read_key_files()?;
        config.amqp.validate(url_set)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads from the process: the file at `path` if given, and the process environment.
    pub fn from_process(path: Option<&std::path::Path>) -> Result<Config, Error> {
        let text = match path {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        let mut env = BTreeMap::new();
        for (name, value) in std::env::vars_os() {
            // Only our own variables matter; one of them that is not UTF-8 is an error, not
            // a setting silently dropped.
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => {
                    env.insert(name, value);
                }
                Err(_) if is_setting(&name) => {
                    return Err(Error::Invalid {
                        key: name,
                        problem: "the value is not valid UTF-8".to_owned(),
                    });
                }
                Err(_) => {}
            }
        }
        Config::load(text.as_deref(), &env)
    }

    /// For binaries: loads from the process, or prints `<program>: <the one-line problem>` to
    /// stderr and gives exit code 64 (EX_CONFIG) to return from `main`.
    pub fn for_binary(
        program: &str,
        path: Option<&std::path::Path>,
    ) -> Result<Config, std::process::ExitCode> {
        Config::from_process(path).map_err(|error| {
            eprintln!("{program}: {error}");
            std::process::ExitCode::from(64)
        })
    }

    /// Timeouts of zero would fail every operation at once.
    fn validate_timeouts(&self) -> Result<(), Error> {
        let timeouts = [
            ("amqp.connect_timeout", self.amqp.connect_timeout),
            ("ingress.confirm_timeout", self.ingress.confirm_timeout),
            (
                "ingress.header_read_timeout",
                self.ingress.header_read_timeout,
            ),
            ("ingress.body_read_timeout", self.ingress.body_read_timeout),
            ("worker.confirm_timeout", self.worker.confirm_timeout),
            ("paypal.verify_timeout", self.paypal.verify_timeout),
            ("database.acquire_timeout", self.database.acquire_timeout),
            ("database.connect_timeout", self.database.connect_timeout),
            ("database.query_timeout", self.database.query_timeout),
            ("worker.downstream_check", self.worker.downstream_check),
        ];
        match timeouts.iter().find(|(_, limit)| limit.is_zero()) {
            Some((key, _)) => Err(Error::Invalid {
                key: (*key).to_owned(),
                problem: "must be above zero".to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Alert addresses must parse as mailboxes (`Name <a@b>` or `a@b`).
    fn validate_emails(&self) -> Result<(), Error> {
        let addresses = std::iter::once(("alert.email_from", &self.alert.email_from))
            .chain(self.alert.email_to.iter().map(|to| ("alert.email_to", to)));
        for (key, address) in addresses {
            if let Err(error) = address.parse::<lettre::message::Mailbox>() {
                return Err(Error::Invalid {
                    key: key.to_owned(),
                    problem: format!("`{address}` is not an email address: {error}"),
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &str, problem: &str| Error::Invalid {
            key: key.to_owned(),
            problem: problem.to_owned(),
        };
        if !self.ingress.path.starts_with('/') {
            return Err(invalid("ingress.path", "must start with `/`"));
        }
        if !self
            .ingress
            .path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
        {
            return Err(invalid(
                "ingress.path",
                "must be a plain path: printable ASCII without spaces, `?` or `#`",
            ));
        }
        self.validate_timeouts()?;
        if let Some(admin) = self.ingress.admin_listen
            && admin.port() != 0
            && admin.port() == self.ingress.listen.port()
            && (admin.ip() == self.ingress.listen.ip()
                || admin.ip().is_unspecified()
                || self.ingress.listen.ip().is_unspecified())
        {
            return Err(invalid(
                "ingress.admin_listen",
                "must not be ingress.listen's address: the point is a port the public cannot reach",
            ));
        }
        if ["/healthz", "/readyz", "/metrics"].contains(&self.ingress.path.as_str()) {
            return Err(invalid(
                "ingress.path",
                "is reserved for health and metrics",
            ));
        }
        let prefix_ok = !self.topology.prefix.is_empty()
            && self.topology.prefix.len() <= 200
            && (self.topology.prefix.chars())
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !prefix_ok {
            return Err(invalid(
                "topology.prefix",
                "must be 1-200 characters of letters, digits, `-`, `_` or `.`",
            ));
        }
        if self.topology.prefix.starts_with("amq.") {
            return Err(invalid(
                "topology.prefix",
                "must not start with `amq.`: RabbitMQ reserves those names",
            ));
        }
        // The worker opens a channel per shard plus a few; RabbitMQ's channel_max is 2047.
        if self.amqp.publisher_channels.get() > MAX_CHANNELS {
            return Err(invalid(
                "amqp.publisher_channels",
                "must be at most 2000 (RabbitMQ allows 2047 channels per connection)",
            ));
        }
        if usize::from(self.topology.shards.get()) > MAX_CHANNELS {
            return Err(invalid(
                "topology.shards",
                "must be at most 2000: the worker consumes each on a channel of one connection (RabbitMQ allows 2047)",
            ));
        }
        self.validate_emails()?;
        self.alipay.validate()?;
        if self.alipay.enabled && self.alipay.path == self.ingress.path {
            return Err(invalid(
                "alipay.path",
                "must differ from ingress.path (PayPal's route)",
            ));
        }
        self.wechatpay.validate()?;
        if self.wechatpay.enabled
            && (self.wechatpay.path == self.ingress.path
                || (self.alipay.enabled && self.wechatpay.path == self.alipay.path))
        {
            return Err(invalid(
                "wechatpay.path",
                "must differ from ingress.path and alipay.path",
            ));
        }
        for (index, downstream) in self.downstream.iter().enumerate() {
            if let Some(pattern) = downstream
                .bindings
                .iter()
                .find(|b| !whole_word_wildcards(b))
            {
                return Err(invalid(
                    &format!("downstream[{index}].bindings"),
                    &format!(
                        "`{pattern}` matches nothing: RabbitMQ's `*` (one word) and `#` (any words) stand for whole dot-separated words only; bind a family instead, e.g. `paypal.subscription.#`, `*.refund.#` (docs/events.md)"
                    ),
                ));
            }
            if let Some(pattern) = downstream
                .bindings
                .iter()
                .find(|b| !starts_with_provider(b))
            {
                return Err(invalid(
                    &format!("downstream[{index}].bindings"),
                    &format!(
                        "`{pattern}` matches nothing: routing keys are <provider>.<kind>.<type>.<status> since event schema version 2 (e.g. `subscr_payment.#` is now `paypal.subscription.subscr_payment.#`, `#.refunded` is `paypal.refund.#` or `*.refund.#`; docs/events.md, \"Migrating from version 1\")"
                    ),
                ));
            }
            // Room for `.dead`: RabbitMQ names are at most 255 bytes.
            let name_ok = !downstream.queue.is_empty() && downstream.queue.len() <= 250;
            if !name_ok
                || downstream
                    .bindings
                    .iter()
                    .any(|b| b.is_empty() || b.len() > 255)
            {
                return Err(invalid(
                    &format!("downstream[{index}]"),
                    "queue must be 1-250 characters (it gets a `.dead` queue beside it) and bindings 1-255",
                ));
            }
            if downstream.queue.starts_with("amq.") {
                return Err(invalid(
                    &format!("downstream[{index}].queue"),
                    "must not start with `amq.`: RabbitMQ reserves those names",
                ));
            }
            let dead = dead_letter_queue(&downstream.queue);
            if self.downstream.iter().any(|other| other.queue == dead) {
                return Err(invalid(
                    &format!("downstream[{index}].queue"),
                    &format!(
                        "`{dead}` is its dead-letter queue and cannot be a downstream queue too"
                    ),
                ));
            }
            if self.downstream[..index]
                .iter()
                .any(|other| other.queue == downstream.queue)
            {
                return Err(invalid(
                    &format!("downstream[{index}].queue"),
                    "is listed twice; merge the bindings into one entry",
                ));
            }
            if downstream.message_ttl.is_some_and(|ttl| {
                ttl < Duration::from_millis(1) || ttl.as_millis() > u128::from(u32::MAX)
            }) {
                return Err(invalid(
                    &format!("downstream[{index}].message_ttl"),
                    "must be between 1ms and 49 days (RabbitMQ's x-message-ttl is a 32-bit count of milliseconds)",
                ));
            }
            if downstream.no_consumer_after.is_zero() {
                return Err(invalid(
                    &format!("downstream[{index}].no_consumer_after"),
                    "must be above zero",
                ));
            }
        }
        if self.worker.heartbeat.is_zero() || self.worker.heartbeat * 2 > self.worker.takeover {
            return Err(invalid(
                "worker.takeover",
                "must be at least twice worker.heartbeat (and the heartbeat above zero)",
            ));
        }
        if self.alert.smtp_url.is_some() && self.alert.email_to.is_empty() {
            return Err(invalid(
                "alert.email_to",
                "is needed when alert.smtp_url is set",
            ));
        }
        // A TTL must be a positive whole number of milliseconds below 2^32 (RabbitMQ's limit).
        let tier_ok = |d: &Duration| d.as_millis() >= 1 && d.as_millis() < u128::from(u32::MAX);
        if self.retry.tiers.is_empty() || !self.retry.tiers.iter().all(tier_ok) {
            return Err(invalid(
                "retry.tiers",
                "needs at least one delay, each from 1ms to 49 days",
            ));
        }
        if self.amqp.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(invalid("amqp.heartbeat", "must be at most 65535s"));
        }
        if self.amqp.reconnect_min.is_zero() || self.amqp.reconnect_min > self.amqp.reconnect_max {
            return Err(invalid(
                "amqp.reconnect_min",
                "must be above zero and at most amqp.reconnect_max",
            ));
        }
        Ok(())
    }
}

/// True when a topic pattern's first word is a provider's name, `*` or `#`: every routing key
/// starts with its provider.
fn starts_with_provider(pattern: &str) -> bool {
    let first = pattern.split('.').next().unwrap_or_default();
    first == "*" || first == "#" || crate::provider::NAMES.contains(&first)
}

/// True when every `*` and `#` in a topic pattern is a whole word of its own.
fn whole_word_wildcards(pattern: &str) -> bool {
    pattern
        .split('.')
        .all(|word| word == "*" || word == "#" || !word.contains(['*', '#']))
}

/// Sets `IPN_A__B=value` as `a.b = value` in `table`. Values that read as integers or booleans
/// become those, so numeric keys can be set from the environment.
/// Whether an environment variable is configuration: `IPN_<SECTION>__<KEY>` only. Other names
/// that start with `IPN_` are not ours: Kubernetes injects `IPN_PORT`, `IPN_SERVICE_HOST`,
/// `IPN_PORT_8080_TCP_ADDR`… into every pod of a namespace with a Service named `ipn`, and they
/// must not stop the process. A misspelt key (`IPN_INGRESS__LISTN`) or section
/// (`IPN_INGRES__LISTEN`) still is an error naming it.
fn is_setting(name: &str) -> bool {
    name != CONFIG_FILE_VAR
        && name
            .strip_prefix(ENV_PREFIX)
            .is_some_and(|path| path.contains("__"))
}

fn overlay(table: &mut toml::Table, name: &str, path: &str, value: &str) -> Result<(), Error> {
    let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let Some((last, parents)) = keys.split_last() else {
        return Ok(());
    };
    let mut node = table;
    for key in parents {
        let entry = node
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| Error::Invalid {
            key: name.to_owned(),
            problem: format!("`{key}` is not a section"),
        })?;
    }
    node.insert(last.clone(), env_value(value));
    Ok(())
}

/// A text value that the environment may have turned into a number or a boolean.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Plain(String),
    Number(i64),
    Boolean(bool),
}

impl Text {
    fn into_string(self) -> String {
        match self {
            Text::Plain(text) => text,
            Text::Number(number) => number.to_string(),
            Text::Boolean(value) => value.to_string(),
        }
    }
}

/// Environment values that look like numbers arrive as numbers; a text key takes them as text
/// (`IPN_WORKER__ID=42` is the id "42").
fn text_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Text::deserialize(deserializer)?.into_string())
}

/// [`text_or_number`] for an optional key.
fn optional_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(Option::<Text>::deserialize(deserializer)?.map(Text::into_string))
}

/// A list from TOML (`["a", "b"]`) or from the environment (`a,b`); blanks are dropped.
fn list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<Text>),
        Text(Text),
    }
    let items: Vec<String> = match List::deserialize(deserializer)? {
        List::Items(items) => items.into_iter().map(Text::into_string).collect(),
        List::Text(text) => (text.into_string().split(',')).map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

/// A URL, or `None` for an empty string.
fn optional_url<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<url::Url>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    url::Url::parse(text.trim())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))
}

/// A socket address (`host:port`), or `None` for an empty string.
fn optional_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("not an address (ip:port): {e}")))
}

/// Durations from TOML (`["10s", "1m"]`) or from the environment (`10s,1m`).
fn durations<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    list(deserializer)?
        .iter()
        .map(|text| {
            humantime::parse_duration(text)
                .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))
        })
        .collect()
}

fn env_value(value: &str) -> toml::Value {
    if let Ok(n) = value.parse::<i64>() {
        toml::Value::Integer(n)
    } else if let Ok(b) = value.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::load(None, &env(&[])).expect("defaults load");
        assert_eq!(config.ingress.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.ingress.path, "/ipn");
        assert_eq!(config.ingress.max_body_bytes.get(), 65_536);
        assert_eq!(config.topology.prefix, "ipn");
        assert_eq!(config.topology.shards.get(), 32);
        assert_eq!(
            config.amqp.url.to_string(),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let file = "[ingress]\npath = \"/from-file\"\nconfirm_timeout = \"2s\"\n";
        let vars = env(&[
            ("IPN_INGRESS__PATH", "/from-env"),
            ("IPN_TOPOLOGY__SHARDS", "8"),
            ("IPN_CONFIG", "/etc/ipn.toml"),
            ("PATH", "/usr/bin"),
        ]);
        let config = Config::load(Some(file), &vars).expect("loads");
        assert_eq!(config.ingress.path, "/from-env");
        assert_eq!(config.ingress.confirm_timeout, Duration::from_secs(2));
        assert_eq!(config.topology.shards.get(), 8);
    }

    #[test]
    fn a_cluster_is_a_list_of_node_urls_from_the_file_or_the_environment() {
        let one = Config::load(None, &env(&[])).expect("defaults");
        let nodes: Vec<String> = one.amqp.nodes().iter().map(|u| u.node()).collect();
        assert_eq!(
            nodes,
            ["127.0.0.1:5672"],
            "amqp.url alone is the one-node case"
        );

        let urls = "amqp://u:secret@a:5672/v, amqp://u:secret@b:5673/v,amqp://u:secret@c/v";
        let three = Config::load(None, &env(&[("IPN_AMQP__URLS", urls)])).expect("urls");
        let nodes: Vec<String> = three.amqp.nodes().iter().map(|u| u.node()).collect();
        assert_eq!(nodes, ["a:5672", "b:5673", "c:5672"]);
        assert!(
            !three.amqp.shown().contains("secret"),
            "{}",
            three.amqp.shown()
        );
        assert_eq!(three.amqp.shown().matches("***").count(), 3);

        let file = "[amqp]\nurls = [\"amqp://a/v\", \"amqp://b/v\"]\n";
        let two = Config::load(Some(file), &env(&[])).expect("file");
        assert_eq!(two.amqp.nodes().len(), 2);
    }

    #[test]
    fn a_cluster_list_is_refused_with_a_url_beside_it_or_with_mixed_vhosts() {
        let both = env(&[
            ("IPN_AMQP__URL", "amqp://a/%2f"),
            ("IPN_AMQP__URLS", "amqp://a/%2f,amqp://b/%2f"),
        ]);
        let err = Config::load(None, &both).unwrap_err().to_string();
        assert!(
            err.contains("amqp.urls") && err.contains("not both"),
            "{err}"
        );
        let mixed = env(&[("IPN_AMQP__URLS", "amqp://a/one,amqp://b/two")]);
        let err = Config::load(None, &mixed).unwrap_err().to_string();
        assert!(err.contains("same vhost"), "{err}");
        let bad = env(&[("IPN_AMQP__URLS", "amqp://a/%2f,http://b")]);
        let err = Config::load(None, &bad).unwrap_err().to_string();
        assert!(err.contains("amqp.urls"), "{err}");
        let many = vec!["amqp://a/%2f"; 33].join(",");
        let err = Config::load(None, &env(&[("IPN_AMQP__URLS", &many)])).unwrap_err();
        assert!(err.to_string().contains("at most 32"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named_in_the_error() {
        let err = Config::load(Some("[ingress]\nlisten_port = 80\n"), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = Config::load(None, &env(&[("IPN_INGRES__PATH", "/x")])).unwrap_err();
        assert!(err.to_string().contains("ingres"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Config::load(None, &env(&[("IPN_INGRESS__LISTEN", "nowhere")])).unwrap_err();
        assert!(
            err.to_string().starts_with("config key `ingress.listen`"),
            "{err}"
        );
        let err = Config::load(None, &env(&[("IPN_TOPOLOGY__SHARDS", "0")])).unwrap_err();
        assert!(err.to_string().contains("topology.shards"), "{err}");
        let err =
            Config::load(None, &env(&[("IPN_INGRESS__CONFIRM_TIMEOUT", "soon")])).unwrap_err();
        assert!(err.to_string().contains("ingress.confirm_timeout"), "{err}");
        let err = Config::load(None, &env(&[("IPN_AMQP__URL", "http://x")])).unwrap_err();
        assert!(err.to_string().contains("amqp.url"), "{err}");
        let err = Config::load(None, &env(&[("IPN_INGRESS__PATH", "ipn")])).unwrap_err();
        assert!(err.to_string().contains("ingress.path"), "{err}");
    }

    #[test]
    fn the_ingress_admin_address_is_optional_and_never_the_public_one() {
        let none = Config::load(None, &env(&[])).expect("loads");
        assert_eq!(none.ingress.admin_listen, None);
        let blank = env(&[("IPN_INGRESS__ADMIN_LISTEN", " ")]);
        assert_eq!(
            Config::load(None, &blank)
                .expect("loads")
                .ingress
                .admin_listen,
            None
        );
        let set = Config::load(
            Some("[ingress]\nadmin_listen = \"0.0.0.0:8082\"\n"),
            &env(&[]),
        )
        .expect("loads");
        assert_eq!(
            set.ingress.admin_listen,
            Some("0.0.0.0:8082".parse().expect("address"))
        );
        let bad = env(&[("IPN_INGRESS__ADMIN_LISTEN", "localhost")]);
        let err = Config::load(None, &bad).unwrap_err();
        assert!(err.to_string().contains("ingress.admin_listen"), "{err}");
        for (public, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
        ] {
            let same = env(&[
                ("IPN_INGRESS__LISTEN", public),
                ("IPN_INGRESS__ADMIN_LISTEN", admin),
            ]);
            let err = Config::load(None, &same).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("config key `ingress.admin_listen`"),
                "{public} {admin}: {err}"
            );
        }
        // Another address on the same port, or two ports the system picks, are two listeners.
        for (public, admin) in [
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            let apart = env(&[
                ("IPN_INGRESS__LISTEN", public),
                ("IPN_INGRESS__ADMIN_LISTEN", admin),
            ]);
            Config::load(None, &apart).expect("two listeners");
        }
    }

    #[test]
    fn the_postback_url_follows_the_environment_unless_overridden() {
        let live = Config::load(None, &env(&[])).expect("loads");
        assert_eq!(
            live.paypal.postback_url().as_str(),
            "https://ipnpb.paypal.com/cgi-bin/webscr"
        );
        let sandbox =
            Config::load(None, &env(&[("IPN_PAYPAL__ENVIRONMENT", "sandbox")])).expect("loads");
        assert_eq!(
            sandbox.paypal.postback_url().as_str(),
            "https://ipnpb.sandbox.paypal.com/cgi-bin/webscr"
        );
        let local = env(&[(
            "IPN_PAYPAL__VERIFY_URL",
            "http://127.0.0.1:9090/cgi-bin/webscr",
        )]);
        let local = Config::load(None, &local).expect("loads");
        assert_eq!(
            local.paypal.postback_url().as_str(),
            "http://127.0.0.1:9090/cgi-bin/webscr"
        );
        let err = Config::load(None, &env(&[("IPN_PAYPAL__ENVIRONMENT", "staging")])).unwrap_err();
        assert!(err.to_string().contains("paypal.environment"), "{err}");
    }

    #[test]
    fn retry_tiers_come_from_a_list_or_comma_separated_durations_and_must_not_be_empty() {
        let vars = env(&[("IPN_RETRY__TIERS", "10s, 1m,2h")]);
        let config = Config::load(None, &vars).expect("loads");
        let expected = [10, 60, 7200].map(Duration::from_secs);
        assert_eq!(config.retry.tiers, expected);
        let error = Config::load(Some("[retry]\ntiers = []\n"), &env(&[])).expect_err("empty");
        assert!(error.to_string().contains("retry.tiers"), "{error}");
        let error = Config::load(None, &env(&[("IPN_RETRY__TIERS", "soon")])).expect_err("bad");
        assert!(error.to_string().contains("retry.tiers"), "{error}");
    }

    #[test]
    fn an_empty_verify_url_means_the_environments_own() {
        let vars = env(&[("IPN_PAYPAL__VERIFY_URL", "")]);
        assert_eq!(
            Config::load(None, &vars).expect("loads").paypal.verify_url,
            None
        );
    }

    #[test]
    fn alerts_by_email_need_recipients_and_takeover_needs_two_heartbeats() {
        let vars = env(&[("IPN_ALERT__SMTP_URL", "smtps://u:secret@mail.example:465")]);
        let error = Config::load(None, &vars).expect_err("no recipients");
        assert!(error.to_string().contains("alert.email_to"), "{error}");
        assert!(!error.to_string().contains("secret"));
        let vars = env(&[
            ("IPN_WORKER__HEARTBEAT", "10s"),
            ("IPN_WORKER__TAKEOVER", "15s"),
        ]);
        let error = Config::load(None, &vars).expect_err("takeover too short");
        assert!(error.to_string().contains("worker.takeover"), "{error}");
    }

    #[test]
    fn receiver_lists_come_from_toml_arrays_or_comma_separated_variables() {
        let file = "[paypal]\nreceiver_ids = [\"K8L3Z5QH2W9PA\"]\n";
        let vars = env(&[(
            "IPN_PAYPAL__RECEIVER_EMAILS",
            "billing@a.example, Shop@B.example,",
        )]);
        let config = Config::load(Some(file), &vars).expect("loads");
        assert_eq!(config.paypal.receiver_ids, ["K8L3Z5QH2W9PA"]);
        assert_eq!(
            config.paypal.receiver_emails,
            ["billing@a.example", "Shop@B.example"]
        );
    }

    #[test]
    fn downstream_queues_come_from_the_file_with_all_events_by_default() {
        let file = "[[downstream]]\nqueue = \"billing\"\nbindings = [\"paypal.subscription.#\"]\n\n[[downstream]]\nqueue = \"audit\"\n";
        let config = Config::load(Some(file), &env(&[])).expect("loads");
        assert_eq!(config.downstream.len(), 2);
        assert_eq!(config.downstream[0].bindings, ["paypal.subscription.#"]);
        assert_eq!(config.downstream[1].bindings, ["#"]);
        for pattern in ["subscr_*.#", "recurring_payment*.#", "#.refund#"] {
            let file = format!("[[downstream]]\nqueue = \"b\"\nbindings = [\"{pattern}\"]\n");
            let err = Config::load(Some(&file), &env(&[])).unwrap_err();
            assert!(err.to_string().contains("downstream[0].bindings"), "{err}");
        }
        for pattern in [
            "*.refund.#",
            "#",
            "paypal.subscription.*.*",
            "wechatpay.#.b",
            "#.completed",
        ] {
            let file = format!("[[downstream]]\nqueue = \"b\"\nbindings = [\"{pattern}\"]\n");
            assert!(Config::load(Some(&file), &env(&[])).is_ok(), "{pattern}");
        }
        // Version 1's routing keys started with the txn_type: such a binding would match
        // nothing now, so it is refused with the way to migrate.
        for pattern in ["subscr_payment.#", "none.refunded", "stripe.#"] {
            let file = format!("[[downstream]]\nqueue = \"b\"\nbindings = [\"{pattern}\"]\n");
            let err = Config::load(Some(&file), &env(&[])).unwrap_err();
            assert!(
                err.to_string().contains("Migrating from version 1"),
                "{err}"
            );
        }
        let err = Config::load(Some("[[downstream]]\nqueue = \"\"\n"), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("downstream[0]"), "{err}");
    }

    #[test]
    fn a_numeric_prefix_from_the_environment_stays_text() {
        let config = Config::load(None, &env(&[("IPN_TOPOLOGY__PREFIX", "2024")])).expect("loads");
        assert_eq!(config.topology.prefix, "2024");
    }

    #[test]
    fn text_keys_take_numbers_and_booleans_from_the_environment_as_text() {
        let vars = env(&[
            ("IPN_WORKER__ID", "42"),
            ("IPN_PAYPAL__RECEIVER_IDS", "12345"),
            ("IPN_INGRESS__PATH", "/ipn"),
        ]);
        let config = Config::load(None, &vars).expect("loads");
        assert_eq!(config.worker.id.as_deref(), Some("42"));
        assert_eq!(config.paypal.receiver_ids, ["12345"]);
        let file = "[paypal]\nreceiver_ids = [\"K8L3Z5QH2W9PA\", \"777\"]\n";
        let config = Config::load(Some(file), &env(&[])).expect("loads");
        assert_eq!(config.paypal.receiver_ids, ["K8L3Z5QH2W9PA", "777"]);
    }

    #[test]
    fn configuration_that_loads_but_cannot_work_is_refused_naming_its_key() {
        let refused = [
            (
                "IPN_INGRESS__CONFIRM_TIMEOUT",
                "0s",
                "ingress.confirm_timeout",
            ),
            (
                "IPN_INGRESS__BODY_READ_TIMEOUT",
                "0s",
                "ingress.body_read_timeout",
            ),
            (
                "IPN_DATABASE__QUERY_TIMEOUT",
                "0s",
                "database.query_timeout",
            ),
            ("IPN_TOPOLOGY__PREFIX", "amq.ipn", "topology.prefix"),
            ("IPN_INGRESS__PATH", "/ipn?x=1", "ingress.path"),
            ("IPN_INGRESS__PATH", "/my ipn", "ingress.path"),
            (
                "IPN_AMQP__PUBLISHER_CHANNELS",
                "5000",
                "amqp.publisher_channels",
            ),
            ("IPN_TOPOLOGY__SHARDS", "4000", "topology.shards"),
            (
                "IPN_ALERT__EMAIL_FROM",
                "not an address",
                "alert.email_from",
            ),
            (
                "IPN_ALERT__EMAIL_TO",
                "ops@example.com,nobody",
                "alert.email_to",
            ),
            ("IPN_AMQP__HEARTBEAT", "100000s", "amqp.heartbeat"),
        ];
        for (name, value, key) in refused {
            let error = Config::load(None, &env(&[(name, value)])).expect_err(value);
            assert!(error.to_string().contains(key), "{name}={value}: {error}");
        }
    }

    #[test]
    fn invalid_toml_is_reported_as_a_file_error() {
        let err = Config::load(Some("[ingress\n"), &env(&[])).unwrap_err();
        assert!(matches!(err, Error::File(_)));
    }

    #[test]
    fn the_password_never_prints() {
        let vars = env(&[("IPN_AMQP__URL", "amqp://app:s3cret@broker:5672/prod")]);
        let config = Config::load(None, &vars).expect("loads");
        let shown = format!("{config:?} {}", config.amqp.url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@broker"), "{shown}");
    }

    #[test]
    fn the_database_password_never_prints() {
        let vars = env(&[("IPN_DATABASE__URL", "postgres://ipn:hunter2@db:5432/ipn")]);
        let config = Config::load(None, &vars).expect("loads");
        let shown = format!("{config:?} {}", config.database.url);
        assert!(!shown.contains("hunter2"), "{shown}");
        let err = Config::load(None, &env(&[("IPN_DATABASE__URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn the_example_config_loads_and_equals_the_defaults() {
        let text = include_str!("../config/example.toml");
        let example = Config::load(Some(text), &env(&[])).expect("example loads");
        assert_eq!(format!("{example:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn only_section_key_variables_are_configuration_so_kubernetes_service_variables_are_ignored() {
        let kubernetes = [
            ("IPN_PORT", "tcp://10.0.0.7:8080"),
            ("IPN_SERVICE_HOST", "10.0.0.7"),
            ("IPN_SERVICE_PORT", "8080"),
            ("IPN_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("IPN_INGRESS__CONFIRM_TIMEOUT", "3s"),
        ];
        let config = Config::load(None, &env(&kubernetes)).expect("loads");
        assert_eq!(config.ingress.confirm_timeout, Duration::from_secs(3));
        for typo in ["IPN_INGRESS__LISTN", "IPN_INGRES__LISTEN"] {
            let error = Config::load(None, &env(&[(typo, "x")])).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("config key"), "{typo}: {text}");
        }
    }

    #[test]
    fn alipay_needs_an_app_id_and_keys_that_are_rsa_public_keys_when_enabled() {
        let on = |extra: &str| format!("[alipay]\nenabled = true\n{extra}");
        let error = Config::load(Some(&on("public_keys = [\"x\"]\n")), &env(&[])).unwrap_err();
        assert!(error.to_string().contains("alipay.app_id"), "{error}");
        let error = Config::load(Some(&on("app_id = \"2021\"\n")), &env(&[])).unwrap_err();
        assert!(error.to_string().contains("alipay.public_keys"), "{error}");
        let bad = on("app_id = \"2021\"\npublic_keys = [\"bm90IGEga2V5\"]\n");
        let error = Config::load(Some(&bad), &env(&[])).unwrap_err();
        assert!(
            error.to_string().contains("key 0: not an RSA public key"),
            "{error}"
        );
        let missing = on("app_id = \"2021\"\npublic_keys = [\"/no/such/alipay.pem\"]\n");
        let error = Config::load(Some(&missing), &env(&[])).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot read /no/such/alipay.pem"),
            "{error}"
        );
        // Off: nothing is checked.
        assert!(Config::load(Some("[alipay]\napp_id = \"\"\n"), &env(&[])).is_ok());
    }

    #[test]
    fn wechatpay_needs_a_merchant_a_32_byte_apiv3_key_and_keys_under_their_serials() {
        let on = |extra: &str| format!("[wechatpay]\nenabled = true\n{extra}");
        let key = "0123456789abcdef0123456789abcdef";
        let error =
            Config::load(Some(&on(&format!("apiv3_key = \"{key}\"\n"))), &env(&[])).unwrap_err();
        assert!(error.to_string().contains("wechatpay.mch_ids"), "{error}");
        let short = on("mch_ids = [\"1900000109\"]\napiv3_key = \"testMchAPIv3Key0\"\n");
        let error = Config::load(Some(&short), &env(&[])).unwrap_err();
        assert!(error.to_string().contains("32-character"), "{error}");
        assert!(
            !error.to_string().contains("testMchAPIv3Key0"),
            "the key is never printed: {error}"
        );
        let keyless = on(&format!(
            "mch_ids = [\"1900000109\"]\napiv3_key = \"{key}\"\n"
        ));
        let error = Config::load(Some(&keyless), &env(&[])).unwrap_err();
        assert!(
            error.to_string().contains("wechatpay.platform_keys"),
            "{error}"
        );
        // From the environment: SERIAL=PEM-or-path pairs; a file that is missing is an error.
        let vars = env(&[
            ("IPN_WECHATPAY__ENABLED", "true"),
            ("IPN_WECHATPAY__MCH_IDS", "1900000109"),
            ("IPN_WECHATPAY__APIV3_KEY", key),
            (
                "IPN_WECHATPAY__PLATFORM_KEYS",
                "PUB_KEY_ID_01=/no/such/wechatpay.pem",
            ),
        ]);
        let error = Config::load(None, &vars).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot read /no/such/wechatpay.pem"),
            "{error}"
        );
        let vars = env(&[
            ("IPN_WECHATPAY__ENABLED", "true"),
            ("IPN_WECHATPAY__MCH_IDS", "1900000109"),
            ("IPN_WECHATPAY__APIV3_KEY", key),
            ("IPN_WECHATPAY__PLATFORM_KEYS", "PUB_KEY_ID_01=bm90IGEga2V5"),
        ]);
        let error = Config::load(None, &vars).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("PUB_KEY_ID_01: not a certificate or an RSA public key"),
            "{error}"
        );
        // Off: nothing is checked; the key never shows in the config's Debug.
        let off = Config::load(
            Some(&format!("[wechatpay]\napiv3_key = \"{key}\"\n")),
            &env(&[]),
        )
        .expect("off");
        assert!(!format!("{off:?}").contains(key));
        assert_eq!(off.wechatpay.apiv3_key.expose(), key);
    }

    #[test]
    fn the_example_downstream_entry_uncommented_states_the_defaults() {
        let text = include_str!("../config/example.toml");
        let settings = [
            "[[downstream]]",
            "queue =",
            "bindings =",
            "            ",
            "delivery_limit =",
            "no_consumer_after =",
            "max_depth =",
        ];
        let uncommented: String = text
            .lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|line| settings.iter().any(|s| line.starts_with(s)))
            .map(|line| format!("{line}\n"))
            .collect();
        let config = Config::load(Some(&uncommented), &env(&[])).expect("loads");
        let bindings = ["paypal.subscription.#", "*.refund.#", "*.dispute.#"];
        assert_eq!(config.downstream, [Downstream::new("billing", &bindings)]);
    }
}
