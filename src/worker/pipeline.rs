//! One inbound IPN, step by step: readable → verify (with in-process retries) → policy →
//! claim → publish the event → confirm → mark done. The caller acks only after `Ok(_)`.
//!
//! Every `Ok` outcome leaves nothing to redo: the event is confirmed and recorded, or the IPN is
//! a recorded duplicate, or it is confirmed in `<p>.quarantine`. `Err` means "not finished":
//! the caller must not ack (retry later); a redelivery then resumes safely because a claimed but
//! unconfirmed IPN is republished under the same event id and sequence number.

use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tracing::{info, warn};

use super::metrics::{ChainStep, Metrics, OutcomeLabel, ReasonLabel};
use crate::alert::{Alert, Alerter, Kind};
use crate::amqp::{Outgoing, PublishError, Publisher, State};
use crate::backoff::Backoff;
use crate::bounded;
use crate::config::{self, Config};
pub use crate::contract::Inbound;
use crate::contract::{self, text};
use crate::event::{Context, Event};
use crate::policy::Reason;
use crate::provider::paypal::verify::{self, Verdict, Verifier};
use crate::provider::{Checked, Providers, Verified};
use crate::store::{self, Claim, Store};
use crate::topology::Topology;

pub use crate::provider::paypal::PROFILE_PREFIX;

/// The span every line about one IPN is written in: its message id, order key and attempt, and
/// (recorded when known) its `txn_id` and event id, so one IPN's lines join on `message_id`.
pub fn span(message_id: &str, order_key: &str, attempt: i64) -> tracing::Span {
    tracing::info_span!(
        "ipn",
        message_id,
        ipn.order_key = order_key,
        attempt,
        ipn.txn_id = tracing::field::Empty,
        event_id = tracing::field::Empty,
    )
}

/// Records the provider's transaction id in the current IPN's span.
fn record_txn_id(txn_id: Option<String>) {
    if let Some(txn_id) = txn_id {
        tracing::Span::current().record("ipn.txn_id", bounded::shown(&txn_id).as_str());
    }
}

/// What the checks before claiming decided.
pub(super) enum Screened {
    /// Verified by its provider and within policy.
    Passed(Box<Verified>),
    /// To be quarantined for this reason, with a cause for `x-ipn-cause` when there is one.
    Rejected(Reason, Option<String>),
}

/// What became of an IPN; each is final, so the caller acks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event is published and confirmed.
    Published {
        /// Its event id.
        event_id: uuid::Uuid,
        /// Its sequence number within the order key.
        sequence: i64,
    },
    /// Already published before (a resend); nothing published now.
    Duplicate,
    /// Confirmed in `<p>.quarantine` with this reason.
    Quarantined(Reason),
}

/// A point between two steps of the exactly-once chain, where a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The IPN is claimed (id and sequence reserved); nothing published yet.
    Claimed,
    /// The event is published and confirmed; not yet marked done.
    Published,
    /// Marked done; not yet acked.
    MarkedDone,
    /// A copy is confirmed in a delay tier or `<p>.parked`; the key is not blocked yet.
    Deferred,
    /// The key is blocked behind the deferred IPN; the delivery is not acked yet.
    Blocked,
    /// A held IPN finished (published); its held row is not removed yet.
    Released,
    /// A copy is confirmed at the shard of the key it belongs to; the delivery is not acked yet.
    Rerouted,
}

/// Decides, at each [`Step`], whether to stop there as if the process had crashed.
pub type FaultInjector = Box<dyn Fn(Step) -> bool + Send + Sync>;

/// Why an IPN is not finished yet; all of these are transient.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PayPal could not be asked, after every in-process attempt.
    #[error("PayPal verification unavailable")]
    Verify(#[source] verify::Error),
    /// The database failed.
    #[error("state store unavailable")]
    Store(#[from] store::Error),
    /// The broker did not confirm the event or the quarantined copy.
    #[error("publish not confirmed")]
    Publish(#[from] PublishError),
    /// A fault injector stopped the IPN here (tests of crash safety only).
    #[error("fault injected after {0:?}")]
    Injected(Step),
}

impl Error {
    /// True when trying again cannot help: the database refused one of the IPN's values, or a
    /// message built from it cannot be published. The IPN is then quarantined as
    /// `unprocessable`; every other error is transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Store(error) => error.is_permanent(),
            Error::Publish(error) => error.is_permanent(),
            Error::Verify(_) | Error::Injected(_) => false,
        }
    }
}

/// Everything one IPN needs; shared by all of a worker's tasks.
pub struct Pipeline {
    /// Every enabled provider's checks.
    pub(super) providers: Providers,
    pub(super) worker: config::Worker,
    pub(super) retry: config::Retry,
    pub(super) topology: Topology,
    verifier: Verifier,
    pub(super) store: Store,
    pub(super) publisher: Publisher,
    pub(super) metrics: Metrics,
    pub(super) alerter: Alerter,
    /// The database answered the last periodic check (for `/readyz`).
    pub(super) database_up: std::sync::atomic::AtomicBool,
    fault: Option<FaultInjector>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Assembles the pipeline from its parts (the caller owns their lifetimes).
    pub fn new(
        config: &Config,
        verifier: Verifier,
        store: Store,
        publisher: Publisher,
    ) -> Pipeline {
        let metrics = Metrics::new(store.batch_metrics());
        // Each delay tier's retry series exists from the start, at 0.
        for delay in &config.retry.tiers {
            let label = super::metrics::TierLabel {
                tier: Topology::tier_name(*delay),
            };
            let _ = metrics.retries.get_or_create(&label);
        }
        Pipeline {
            providers: Providers::new(config),
            worker: config.worker.clone(),
            retry: config.retry.clone(),
            topology: Topology::of(config),
            verifier,
            store,
            publisher,
            metrics,
            alerter: Alerter::logging_only(),
            database_up: std::sync::atomic::AtomicBool::new(true),
            fault: None,
        }
    }

    /// Sends alerts through `alerter` (by default they are only logged).
    pub fn with_alerter(mut self, alerter: Alerter) -> Pipeline {
        self.alerter = alerter;
        self
    }

    /// Stops an IPN at the steps `fault` picks, as if the process had crashed there: what came
    /// before is done, nothing after it happens, and `handle` returns `Err(Injected)` so the
    /// caller does not ack. For crash-safety tests.
    pub fn with_fault_injection(mut self, fault: FaultInjector) -> Pipeline {
        self.fault = Some(fault);
        self
    }

    pub(super) fn crash_point(&self, step: Step) -> Result<(), Error> {
        match &self.fault {
            Some(fault) if fault(step) => Err(Error::Injected(step)),
            _ => Ok(()),
        }
    }

    /// This pipeline's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Waits until the publisher is connected, at most `limit`; true when it is.
    pub async fn wait_publisher(&self, limit: std::time::Duration) -> bool {
        self.publisher.wait_connected(limit).await
    }

    /// Whether events can be published now.
    pub fn publisher_state(&self) -> State {
        self.publisher.state()
    }

    /// Readable, verified, within policy: the checks before an IPN may become an event.
    pub(super) async fn screen(&self, inbound: &Inbound) -> Result<Screened, Error> {
        let header = |name: &str| contract::request_header(&inbound.properties, name);
        let queued = inbound.queued(&header);
        let checked = match self.providers.check(&queued) {
            Checked::Postback(pending) => {
                record_txn_id(pending.txn_id());
                match self.verify(&inbound.body).await? {
                    Verdict::Invalid => Checked::Rejected(Reason::Invalid, None),
                    Verdict::Verified => {
                        self.providers
                            .after_postback(pending, &queued, SystemTime::now())
                    }
                }
            }
            checked => checked,
        };
        Ok(match checked {
            Checked::Passed(verified) => {
                record_txn_id(verified.txn_id.clone());
                Screened::Passed(verified)
            }
            Checked::Rejected(reason, cause) => {
                record_txn_id(Providers::txn_id(inbound.provider, &inbound.body));
                Screened::Rejected(reason, cause)
            }
            // after_postback never asks for another postback
            Checked::Postback(_) => Screened::Rejected(Reason::Invalid, None),
        })
    }

    /// Takes one IPN as far as it can go; see the module docs.
    pub async fn handle(&self, inbound: &Inbound) -> Result<Outcome, Error> {
        let verified = match self.screen(inbound).await? {
            Screened::Passed(verified) => verified,
            Screened::Rejected(reason, cause) => {
                return self.quarantine(inbound, reason, cause.as_deref()).await;
            }
        };
        let order_key = inbound.key();
        let keys = &verified.dedup;
        let paid = verified.paid.as_deref();
        let claim = self.store.claim_paid(keys, order_key.as_str(), paid);
        let claimed = self.metrics.step(ChainStep::Claim, claim).await?;
        let reservation = match claimed {
            Claim::Done(reservation) => {
                let event_id = reservation.event_id.to_string();
                tracing::Span::current().record("event_id", event_id.as_str());
                self.metrics.duplicates.inc();
                info!(
                    sequence = reservation.sequence,
                    "duplicate of a published ipn; dropped"
                );
                return Ok(Outcome::Duplicate);
            }
            Claim::New(reservation) | Claim::Pending(reservation) => reservation,
        };
        let event_id = reservation.event_id.to_string();
        tracing::Span::current().record("event_id", event_id.as_str());
        let context = Context {
            order_key,
            reservation,
            received_at: inbound.received_at.unwrap_or(verified.verified_at),
            provider: inbound.provider,
        };
        let event = Event::new(*verified, &inbound.body, &context);
        let routing_key = event.routing_key();
        let json = event.to_json();
        self.crash_point(Step::Claimed)?;
        let publish = self.publish_event(&event, &routing_key, &json);
        if let Err(error) = self.metrics.step(ChainStep::Publish, publish).await {
            if matches!(error, Error::Publish(PublishError::Unroutable)) {
                self.alerter.raise(Alert {
                    kind: Kind::Unroutable,
                    order_key: order_key.to_string(),
                    txn_id: event.txn_id.clone(),
                    reason: format!("no queue bound for {}", event.routing_key()),
                    fix: format!(
                        "bind a queue to {} for this routing key ([[downstream]] in the config, then restart or `ipnctl topology declare`); the worker retries by itself",
                        self.topology.events_exchange()
                    ),
                });
            }
            return Err(error);
        }
        self.crash_point(Step::Published)?;
        let published = store::Published {
            routing_key: &routing_key,
            txn_id: event.stored_txn_id(),
            json: &json,
        };
        let mark_done = self.store.mark_done(reservation.event_id, &published);
        self.metrics.step(ChainStep::MarkDone, mark_done).await?;
        self.crash_point(Step::MarkedDone)?;
        self.metrics.events.inc();
        if let Some(received) = inbound.received_at {
            let waited = SystemTime::now()
                .duration_since(received)
                .unwrap_or_default();
            self.metrics
                .receive_to_publish_seconds
                .observe(waited.as_secs_f64());
        }
        info!(
            sequence = reservation.sequence,
            routing_key, "event published"
        );
        Ok(Outcome::Published {
            event_id: reservation.event_id,
            sequence: reservation.sequence,
        })
    }

    /// Postbacks with in-process retries: `verify_attempts`, waiting `verify_backoff`, doubling.
    async fn verify(&self, body: &[u8]) -> Result<Verdict, Error> {
        let mut backoff = Backoff::new(self.worker.verify_backoff, self.worker.retry_max);
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let result = self.verifier.verify(body).await;
            self.metrics
                .verify_seconds
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(Verdict::Verified) => "verified",
                Ok(Verdict::Invalid) => "invalid",
                Err(_) => "error",
            };
            self.metrics
                .verifications
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            match result {
                Ok(verdict) => return Ok(verdict),
                Err(error) if attempt >= self.worker.verify_attempts.get() => {
                    return Err(Error::Verify(error));
                }
                Err(error) => {
                    let error = bounded::error_chain(&error);
                    warn!(
                        error,
                        postback = attempt,
                        "PayPal verification failed; retrying"
                    );
                }
            }
            backoff.sleep().await;
            attempt += 1;
        }
    }

    async fn publish_event(
        &self,
        event: &Event,
        routing_key: &str,
        json: &str,
    ) -> Result<(), Error> {
        let properties =
            contract::event_properties(&event.event_id, &event.order_key, event.sequence);
        let exchange = self.topology.events_exchange();
        let message = Outgoing {
            exchange: &exchange,
            routing_key,
            body: json.as_bytes(),
            properties,
        };
        Ok(self
            .publisher
            .publish(message, self.worker.confirm_timeout)
            .await?)
    }

    /// Quarantines an IPN that failed with a permanent error (`unprocessable`), the error's
    /// whole chain in `x-ipn-cause`.
    pub(super) async fn quarantine_unprocessable(
        &self,
        inbound: &Inbound,
        error: &Error,
    ) -> Result<Outcome, Error> {
        let cause = bounded::error_chain(error);
        warn!(ipn.order_key = %inbound.key(), cause, "ipn cannot be processed; quarantining it");
        self.quarantine(inbound, Reason::Unprocessable, Some(&cause))
            .await
    }

    /// Puts the raw IPN in `<p>.quarantine` with its reason (and the cause, when there is one,
    /// in `x-ipn-cause`), and waits for the confirm.
    pub(super) async fn quarantine(
        &self,
        inbound: &Inbound,
        reason: Reason,
        cause: Option<&str>,
    ) -> Result<Outcome, Error> {
        // A cause may quote the notification (a decoder's message names the value it refused):
        // bounded once here, for the header, the log line and the alert alike.
        let cause = cause.map(|cause| bounded::cut(cause, bounded::MAX_ERROR_BYTES));
        let cause = cause.as_deref();
        let mut headers = inbound.properties.headers().clone().unwrap_or_default();
        headers.insert(contract::REASON.into(), text(reason.as_str()));
        if let Some(cause) = cause {
            headers.insert(contract::CAUSE.into(), text(cause));
        }
        headers.insert(
            contract::ATTEMPT.into(),
            AMQPValue::LongLongInt(inbound.attempt),
        );
        let queue = self.topology.quarantine_queue();
        let mut message = Outgoing {
            exchange: "",
            routing_key: &queue,
            body: &inbound.body,
            properties: inbound.properties.clone().with_headers(headers),
        };
        let limit = self.worker.confirm_timeout;
        match self.publisher.publish(message.clone(), limit).await {
            Err(PublishError::TooLarge { size, .. }) => {
                // Someone else's headers made it too large (ours are bounded): keep ours only,
                // so quarantine always ends an IPN.
                warn!(ipn.order_key = %inbound.key(), size, "quarantining with the bridge's own headers only");
                let properties = own_properties(inbound, reason, cause);
                message.properties = properties;
                self.publisher.publish(message, limit).await?;
            }
            other => other?,
        }
        let label = ReasonLabel {
            reason: reason.as_str(),
        };
        self.metrics.quarantined.get_or_create(&label).inc();
        warn!(reason = reason.as_str(), queue, "ipn quarantined");
        self.alerter.raise(Alert {
            kind: Kind::Quarantined,
            order_key: inbound.key().to_string(),
            txn_id: Providers::txn_id(inbound.provider, &inbound.body),
            // The reason alone, so alerts of one reason are rate-limited together; the cause
            // (which varies) goes with the fix.
            reason: reason.as_str().to_owned(),
            fix: match cause {
                Some(cause) => format!(
                    "{cause}; {}",
                    Providers::quarantine_fix(inbound.provider, reason, &inbound.message_id)
                ),
                None => Providers::quarantine_fix(inbound.provider, reason, &inbound.message_id),
            },
        });
        Ok(Outcome::Quarantined(reason))
    }
}

/// The properties of `inbound` with only the bridge's own headers, bounded whatever the message
/// carried, and `x-ipn-headers-dropped` saying so.
fn own_properties(inbound: &Inbound, reason: Reason, cause: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(contract::ORDER_KEY.into(), text(inbound.key().as_str()));
    headers.insert(contract::REASON.into(), text(reason.as_str()));
    headers.insert(
        contract::ATTEMPT.into(),
        AMQPValue::LongLongInt(inbound.attempt),
    );
    headers.insert(contract::HEADERS_DROPPED.into(), AMQPValue::Boolean(true));
    if let Some(cause) = cause {
        headers.insert(contract::CAUSE.into(), text(cause));
    }
    if let Some(received_at) = inbound.received_at {
        headers.insert(
            contract::RECEIVED_AT.into(),
            text(&contract::time(received_at)),
        );
    }
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(inbound.message_id.as_str()))
        .with_headers(headers);
    if let Some(content_type) = inbound.properties.content_type() {
        properties = properties.with_content_type(content_type.clone());
    }
    properties
}
