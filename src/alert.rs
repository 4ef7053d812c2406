//! Alerts to a human: a webhook (JSON, Slack-compatible `text`) and email over SMTP (lettre).
//!
//! Keeps the fifth promise without endangering the others: raising an alert never waits (a
//! bounded queue in front of one background task), a failing channel is retried with backoff
//! and then logged, and alerts of one cause (kind and reason) go out at most once per
//! `alert.min_interval`, the ones in between summarized in the next, so an outage sends a
//! handful of messages, not thousands. An alert names the order key, txn_id, reason and the
//! command that fixes it; never the payer's personal data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tracing::warn;

use crate::backoff::Backoff;
use crate::config;

/// Alerts waiting for the background task; past this, new ones are logged and dropped.
const QUEUE: usize = 10_000;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An IPN was quarantined: PayPal said INVALID, or it failed a policy check (possible
    /// forgery), or it was unreadable.
    Quarantined,
    /// An IPN exhausted its retries and was parked; its key is blocked.
    Parked,
    /// An IPN is held behind its key's parked IPN.
    HeldBehindParked,
    /// An event could not be routed: no queue is bound to `<p>.events` for it.
    Unroutable,
    /// A business service's queue dead-lettered events to `<queue>.dead`.
    DownstreamDeadLettered,
    /// A business service's queue has had no consumer for `no_consumer_after`.
    DownstreamNoConsumer,
    /// A business service's queue holds more than `max_depth` events and grows.
    DownstreamBacklog,
    /// The ingress refused a provider's notification at the door (a signature that does not
    /// verify, an unknown key, a stale timestamp): the provider resends it, but until the cause
    /// is fixed nothing of it is queued.
    Refused,
}

impl Kind {
    /// Short name, for subjects, the webhook's `kind` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quarantined => "quarantined",
            Kind::Parked => "parked",
            Kind::HeldBehindParked => "held-behind-parked",
            Kind::Unroutable => "unroutable",
            Kind::DownstreamDeadLettered => "downstream-dead-lettered",
            Kind::DownstreamNoConsumer => "downstream-no-consumer",
            Kind::DownstreamBacklog => "downstream-backlog",
            Kind::Refused => "refused",
        }
    }

    /// What the alert's `order_key` names: an IPN's order key, or (for the downstream kinds) a
    /// business service's queue.
    pub fn subject(self) -> &'static str {
        match self {
            Kind::DownstreamDeadLettered | Kind::DownstreamNoConsumer | Kind::DownstreamBacklog => {
                "queue"
            }
            Kind::Refused => "provider",
            _ => "key",
        }
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// What it is about.
    pub kind: Kind,
    /// The IPN's order key; for the downstream kinds, the queue's name; for `refused`, the
    /// provider's.
    pub order_key: String,
    /// The IPN's txn_id, when it has one.
    pub txn_id: Option<String>,
    /// Why (e.g. `invalid`, `retries exhausted`).
    pub reason: String,
    /// What to run or do to fix it.
    pub fix: String,
}

/// The alerter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `alert.smtp_url` was not accepted by the SMTP client.
    #[error("alert.smtp_url")]
    Smtp(#[source] lettre::transport::smtp::Error),
    /// `alert.email_from` or `alert.email_to` is not an address.
    #[error("alert email address `{0}`")]
    Address(String, #[source] lettre::address::AddressError),
    /// The webhook's HTTP client.
    #[error("alert webhook client")]
    Http(#[source] reqwest::Error),
}

/// Counters the alerter keeps, labelled by channel (`webhook`, `email`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Alert messages delivered.
    pub sent: Family<ChannelLabel, Counter>,
    /// Alert messages given up on after every attempt.
    pub failed: Family<ChannelLabel, Counter>,
}

impl Counters {
    /// Both channels' series at 0 from the start, so `alerts_failed_total` can be alerted on
    /// before the first failure.
    pub fn initialized() -> Counters {
        let counters = Counters::default();
        for channel in ["webhook", "email"] {
            let label = ChannelLabel { channel };
            let _ = counters.sent.get_or_create(&label);
            let _ = counters.failed.get_or_create(&label);
        }
        counters
    }
}

/// Label of the alert counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ChannelLabel {
    /// `webhook` or `email`.
    pub channel: &'static str,
}

/// Raises alerts; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Alerter {
    queue: Option<mpsc::Sender<Alert>>,
}

impl Alerter {
    /// Starts the background task for the configured channels (none: alerts are only logged).
    pub fn start(config: &config::Alert, counters: Counters) -> Result<Alerter, Error> {
        let channels = Channels::new(config)?;
        if channels.is_empty() {
            return Ok(Alerter { queue: None });
        }
        let (queue, alerts) = mpsc::channel(QUEUE);
        let sender = Sender {
            channels: Arc::new(channels),
            counters,
            attempts: config.attempts.get(),
        };
        tokio::spawn(sender.run(alerts, config.min_interval));
        Ok(Alerter { queue: Some(queue) })
    }

    /// An alerter that only logs.
    pub fn logging_only() -> Alerter {
        Alerter { queue: None }
    }

    /// Logs the alert and hands it to the channels; returns at once.
    pub fn raise(&self, mut alert: Alert) {
        // Every field may come from a request: bounded before it is logged or sent.
        alert.order_key = crate::bounded::shown(&alert.order_key);
        alert.txn_id = alert.txn_id.as_deref().map(crate::bounded::shown);
        alert.reason = crate::bounded::cut(&alert.reason, crate::bounded::MAX_ERROR_BYTES);
        warn!(
            kind = alert.kind.as_str(),
            ipn.order_key = %alert.order_key,
            ipn.txn_id = alert.txn_id.as_deref().unwrap_or("-"),
            reason = %alert.reason,
            fix = %alert.fix,
            "alert"
        );
        if let Some(queue) = &self.queue
            && queue.try_send(alert).is_err()
        {
            warn!("alert queue full or closed; this alert is only logged");
        }
    }
}

/// The configured channels.
struct Channels {
    webhook: Option<(reqwest::Client, url::Url)>,
    email: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox, Vec<Mailbox>)>,
}

impl Channels {
    fn new(config: &config::Alert) -> Result<Channels, Error> {
        let webhook = match &config.webhook_url {
            Some(url) => {
                let client = reqwest::Client::builder()
                    .user_agent(concat!("ipn-bridge/", env!("CARGO_PKG_VERSION")))
                    .timeout(Duration::from_secs(10))
                    .build()
                    .map_err(Error::Http)?;
                Some((client, url.url()))
            }
            None => None,
        };
        let email = match &config.smtp_url {
            Some(url) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(Error::Smtp)?
                    .timeout(Some(Duration::from_secs(30)))
                    .build();
                let mailbox =
                    |text: &str| text.parse().map_err(|e| Error::Address(text.to_owned(), e));
                let to = config
                    .email_to
                    .iter()
                    .map(|t| mailbox(t))
                    .collect::<Result<_, _>>()?;
                Some((transport, mailbox(&config.email_from)?, to))
            }
            None => None,
        };
        Ok(Channels { webhook, email })
    }

    fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.email.is_none()
    }
}

/// One message to a human: an alert, or a summary of several of one cause.
#[derive(Debug, Clone)]
struct Notice {
    first: Alert,
    /// How many alerts this notice stands for (1 for a single alert).
    count: usize,
    /// Up to ten of the keys, for summaries.
    keys: Vec<String>,
}

impl Notice {
    fn subject(&self) -> String {
        let kind = self.first.kind.as_str();
        if self.count == 1 {
            format!("[ipn-bridge] {kind}: {}", self.first.order_key)
        } else {
            format!(
                "[ipn-bridge] {} more {kind} alerts ({})",
                self.count, self.first.reason
            )
        }
    }

    fn text(&self) -> String {
        let alert = &self.first;
        let txn = alert.txn_id.as_deref().unwrap_or("-");
        if self.count == 1 {
            format!(
                "{}\n{}: {}\ntxn_id: {txn}\nreason: {}\nfix: {}",
                self.subject(),
                alert.kind.subject(),
                alert.order_key,
                alert.reason,
                alert.fix
            )
        } else {
            format!(
                "{}\n{}s: {}{}\nreason: {}\nfix (for each): {}",
                self.subject(),
                alert.kind.subject(),
                self.keys.join(", "),
                if self.count > self.keys.len() {
                    ", ..."
                } else {
                    ""
                },
                alert.reason,
                alert.fix
            )
        }
    }

    fn json(&self) -> serde_json::Value {
        let alert = &self.first;
        serde_json::json!({
            "text": self.text(),
            "kind": alert.kind.as_str(),
            "order_key": alert.order_key,
            "txn_id": alert.txn_id,
            "reason": alert.reason,
            "fix": alert.fix,
            "count": self.count,
            "keys": self.keys,
        })
    }
}

/// Alerts of one cause not sent yet.
#[derive(Default)]
struct Cause {
    last_sent: Option<Instant>,
    pending: Vec<Alert>,
}

/// The background task: rate-limits by cause and delivers with retries.
struct Sender {
    channels: Arc<Channels>,
    counters: Counters,
    attempts: u32,
}

impl Sender {
    async fn run(self, mut alerts: mpsc::Receiver<Alert>, interval: Duration) {
        let mut causes: HashMap<(Kind, String), Cause> = HashMap::new();
        let mut tick = tokio::time::interval(
            interval.clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        loop {
            tokio::select! {
                alert = alerts.recv() => match alert {
                    Some(alert) => self.admit(&mut causes, alert, interval),
                    None => return,
                },
                _ = tick.tick() => self.summarize(&mut causes, interval),
            }
        }
    }

    fn admit(&self, causes: &mut HashMap<(Kind, String), Cause>, alert: Alert, interval: Duration) {
        let cause = causes
            .entry((alert.kind, alert.reason.clone()))
            .or_default();
        if cause.last_sent.is_some_and(|at| at.elapsed() < interval) {
            cause.pending.push(alert);
            return;
        }
        cause.last_sent = Some(Instant::now());
        self.deliver(Notice {
            keys: vec![alert.order_key.clone()],
            first: alert,
            count: 1,
        });
    }

    fn summarize(&self, causes: &mut HashMap<(Kind, String), Cause>, interval: Duration) {
        for cause in causes.values_mut() {
            let due = cause.last_sent.is_none_or(|at| at.elapsed() >= interval);
            if !due || cause.pending.is_empty() {
                continue;
            }
            let pending = std::mem::take(&mut cause.pending);
            let keys = pending
                .iter()
                .take(10)
                .map(|a| a.order_key.clone())
                .collect();
            cause.last_sent = Some(Instant::now());
            self.deliver(Notice {
                count: pending.len(),
                first: pending[0].clone(),
                keys,
            });
        }
    }

    /// Sends the notice on every channel, each in a task of its own with retries.
    fn deliver(&self, notice: Notice) {
        let notice = Arc::new(notice);
        if self.channels.webhook.is_some() {
            self.spawn_attempts("webhook", Arc::clone(&notice));
        }
        if self.channels.email.is_some() {
            self.spawn_attempts("email", notice);
        }
    }

    fn spawn_attempts(&self, channel: &'static str, notice: Arc<Notice>) {
        let (channels, counters, attempts) = (
            Arc::clone(&self.channels),
            self.counters.clone(),
            self.attempts,
        );
        tokio::spawn(async move {
            let label = ChannelLabel { channel };
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
            for attempt in 1..=attempts {
                match channels.send(channel, &notice).await {
                    Ok(()) => {
                        counters.sent.get_or_create(&label).inc();
                        return;
                    }
                    Err(error) => warn!(channel, attempt, %error, "alert not delivered; retrying"),
                }
                backoff.sleep().await;
            }
            counters.failed.get_or_create(&label).inc();
            warn!(channel, subject = %notice.subject(), "alert given up on this channel");
        });
    }
}

impl Channels {
    async fn send(&self, channel: &str, notice: &Notice) -> Result<(), String> {
        match (channel, &self.webhook, &self.email) {
            ("webhook", Some((client, url)), _) => {
                let response = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(notice.json().to_string())
                    .send()
                    .await
                    // reqwest's error text includes the URL, and with it any token in it.
                    .map_err(|e| crate::bounded::error_chain(&e.without_url()))?;
                match response.status() {
                    status if status.is_success() => Ok(()),
                    status => Err(format!("webhook answered {status}")),
                }
            }
            ("email", _, Some((transport, from, to))) => {
                let mut message = Message::builder()
                    .from(from.clone())
                    .subject(notice.subject());
                for recipient in to {
                    message = message.to(recipient.clone());
                }
                let message = message.body(notice.text()).map_err(|e| e.to_string())?;
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|e| crate::bounded::error_chain(&e))
            }
            _ => Err(format!("channel {channel} not configured")),
        }
    }
}
