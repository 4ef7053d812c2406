//! The per-key gate: a key's order holds while one of its IPNs cannot be verified for minutes,
//! hours or days, and no other key waits for it.
//!
//! - An IPN PayPal could not verify (after the in-process attempts) is *deferred*: a copy goes to
//!   `<p>.retry` with its shard number as routing key and `x-ipn-tier` naming the wait queue of
//!   its attempt; when the queue's TTL expires the broker dead-letters it back to its own shard.
//!   Its key becomes *blocked* behind it (PostgreSQL, `ipn_blocked_key`).
//! - Past the last tier, or `retry.max_age` after the first failure, the IPN is *parked* in
//!   `<p>.parked` (reason, attempts and last error in headers); its key stays blocked until an
//!   operator replays it or releases the key (`ipnctl`).
//! - Every later IPN of a blocked key is *held*: stored in PostgreSQL in arrival order, then
//!   acked. Behind a parked IPN, held IPNs are verified first, so forgeries are still quarantined.
//! - When the blocker comes back and finishes, the held IPNs are processed in order; if one of
//!   them fails in turn, it becomes the blocker. When none is left, the key is unblocked.
//!
//! - A refund, reversal, case or adjustment whose key is `txn:<id>` (it names no subscription)
//!   is *re-routed* when `<id>` was paid under a subscription or recurring profile the bridge has
//!   seen: a copy goes to that profile's shard under the profile's key (`x-ipn-rerouted-from`
//!   keeps the old one), so a chargeback cannot overtake the payments of its own subscription.
//!   Unknown transactions (or a `txn:` key that is itself blocked) stay on their own key.
//! - A notification whose key the ingress could not see (WeChat Pay encrypts it, so the ingress
//!   queues every one under one intake key) is re-routed the same way to the key inside it,
//!   once decrypted, whether the intake key is blocked or not.
//!
//! Crash safety: every step publishes (with confirm) before it records, and records before the
//! caller acks. A crash in between leaves at most a second copy of an IPN in a tier or in
//! `<p>.parked`, with the same message id; whichever copy finishes first publishes the event,
//! and the store's dedup makes the other a duplicate. Nothing is acked before it is stored.
//! Lanes (one key at a time within a shard) and single active consumer make the worker running
//! a shard the only writer of its keys' blocks.

use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tracing::{Instrument, info, warn};

use super::metrics::{ChainStep, TierLabel};
use super::pipeline::{Error, Inbound, Outcome, Pipeline, Screened, Step};
use crate::alert::{Alert, Kind};
use crate::amqp::Outgoing;
use crate::bounded;
use crate::contract::{self, header_text, text};
use crate::keys::OrderKey;
use crate::provider::Providers;
use crate::store::{Block, Blocked, Held};
use crate::topology::Topology;

/// Order keys of single transactions start with this.
const TXN_PREFIX: &str = "txn:";

/// The value of `x-ipn-control` that makes the worker release a key's held IPNs.
pub const RELEASE: &str = "release";

/// What became of a delivery; each is final, so the caller acks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The pipeline finished it (published, duplicate or quarantined), then released this many
    /// held IPNs of its key.
    Finished {
        /// What the pipeline did.
        outcome: Outcome,
        /// Held IPNs processed after it.
        released: usize,
    },
    /// PayPal could not verify it: a copy waits in this tier; its key is blocked behind it.
    Deferred {
        /// The `x-ipn-tier` (the delay, e.g. `10s`).
        tier: String,
    },
    /// Out of retries: in `<p>.parked`; its key is blocked until an operator acts.
    Parked,
    /// Its key is blocked: stored behind the blocker, in order.
    Held,
    /// Sent on to the key and shard it belongs to: a dispute of a subscription's payment
    /// (refund, reversal, case, adjustment naming only the txn) to the profile's, to be ordered
    /// with its payments; an encrypted notification to the key inside it.
    Rerouted {
        /// The order key it was sent to.
        to: String,
    },
    /// An `ipnctl` instruction, carried out: this many held IPNs released.
    Controlled {
        /// Held IPNs processed.
        released: usize,
    },
}

impl Pipeline {
    /// Takes one delivery through the gate: processes it, defers or parks it, or holds it behind
    /// its key's blocker. `Err` means not finished (database or broker trouble): do not ack.
    ///
    /// A permanent error (a value the bridge can never store or publish) ends in quarantine as
    /// `unprocessable`, at whichever step it happened, instead of being retried forever.
    pub async fn settle(&self, inbound: &Inbound) -> Result<Settled, Error> {
        match self.settle_once(inbound).await {
            Err(error) if error.is_permanent() => self.finish_unprocessable(inbound, &error).await,
            settled => settled,
        }
    }

    /// Quarantines an IPN that failed with a permanent error; final, so the caller acks.
    async fn finish_unprocessable(
        &self,
        inbound: &Inbound,
        error: &Error,
    ) -> Result<Settled, Error> {
        let outcome = self.quarantine_unprocessable(inbound, error).await?;
        Ok(Settled::Finished {
            outcome,
            released: 0,
        })
    }

    /// After `worker.retry_in_place` transient failures in a row: sends the IPN through the
    /// delay tiers like a PayPal failure, its key blocked behind it, so it stops holding the
    /// shard's prefetch window while the others go on. Not when another IPN blocks its key
    /// (then it was being held, and deferring it would let it overtake that one): it stays in
    /// place (`Ok(None)`).
    pub async fn defer_stuck(
        &self,
        inbound: &Inbound,
        error: &Error,
    ) -> Result<Option<Settled>, Error> {
        let key = inbound.key();
        match self.store.blocked(key.as_str()).await? {
            Some(blocked) if blocked.blocker_id != inbound.message_id => Ok(None),
            _ => {
                let chain = bounded::error_chain(error);
                Ok(Some(self.defer(inbound, key, &chain).await?))
            }
        }
    }

    async fn settle_once(&self, inbound: &Inbound) -> Result<Settled, Error> {
        let key = inbound.key();
        if let Some(control) = &inbound.control {
            return self.control(control, key).await;
        }
        // One statement (shared with the other lanes' at the same moment): is the key blocked,
        // and was the transaction a `txn:` key names paid under a profile?
        let looked_up = self.store.key_state(key.as_str(), paid_txn(inbound, key));
        let state = self.metrics.step(ChainStep::Gate, looked_up).await?;
        match state.blocked {
            None => match state.profile {
                Some(profile) => self.reroute(inbound, key, &profile).await,
                None => self.attempt(inbound, key).await,
            },
            Some(blocked) if blocked.blocker_id == inbound.message_id => {
                match self.attempt(inbound, key).await? {
                    Settled::Finished { outcome, .. } => {
                        let released = self.release(key).await?;
                        Ok(Settled::Finished { outcome, released })
                    }
                    rerouted @ Settled::Rerouted { .. } => {
                        self.release(key).await?;
                        Ok(rerouted)
                    }
                    again => Ok(again),
                }
            }
            Some(blocked) => self.hold(inbound, key, &blocked).await,
        }
    }

    /// The key inside an encrypted notification (WeChat Pay's) when it is not the key the
    /// message came with, and it was not re-routed already.
    pub(super) fn own_key(&self, inbound: &Inbound) -> Option<OrderKey> {
        if header_text(&inbound.properties, contract::REROUTED_FROM).is_some() {
            return None;
        }
        let header = |name: &str| contract::request_header(&inbound.properties, name);
        self.providers.own_key(&inbound.queued(&header))
    }

    /// Publishes a copy of the IPN to the shard of the key it belongs to, under that key
    /// (`x-ipn-rerouted-from` keeping the old one), and waits for the confirm; the caller then
    /// acks this copy.
    pub(super) async fn reroute(
        &self,
        inbound: &Inbound,
        key: &OrderKey,
        profile: &str,
    ) -> Result<Settled, Error> {
        let mut headers = inbound.properties.headers().clone().unwrap_or_default();
        headers.insert(contract::ORDER_KEY.into(), text(profile));
        headers.insert(contract::REROUTED_FROM.into(), text(key.as_str()));
        let shard = OrderKey::from_header(profile).shard(self.topology.shards());
        let exchange = self.topology.inbound_exchange();
        let routing_key = Topology::shard_routing_key(shard);
        self.copy(inbound, &exchange, &routing_key, headers).await?;
        self.metrics.rerouted.inc();
        self.crash_point(Step::Rerouted)?;
        info!(ipn.order_key = %key, to = profile, "re-routed to the key it belongs to");
        Ok(Settled::Rerouted {
            to: profile.to_owned(),
        })
    }

    /// The pipeline, with a PayPal failure turned into a deferral; first, a notification whose
    /// own key is inside it is re-routed there (whether its intake key was blocked or not: it
    /// belongs to the other key's order, and the intake key's next IPN follows it).
    async fn attempt(&self, inbound: &Inbound, key: &OrderKey) -> Result<Settled, Error> {
        if let Some(own) = self.own_key(inbound) {
            return self.reroute(inbound, key, own.as_str()).await;
        }
        match self.handle(inbound).await {
            Ok(outcome) => Ok(Settled::Finished {
                outcome,
                released: 0,
            }),
            Err(Error::Verify(error)) => {
                self.defer(inbound, key, &bounded::error_chain(&error))
                    .await
            }
            Err(error) if error.is_permanent() => self.finish_unprocessable(inbound, &error).await,
            Err(other) => Err(other),
        }
    }

    /// Sends the IPN to the tier of its attempt, or parks it; then blocks its key behind it.
    async fn defer(
        &self,
        inbound: &Inbound,
        key: &OrderKey,
        error: &str,
    ) -> Result<Settled, Error> {
        let attempts = inbound.attempt.saturating_add(1);
        let now = SystemTime::now();
        let first_failure = inbound.first_failure.unwrap_or(now);
        let age = now.duration_since(first_failure).unwrap_or_default();
        let tier = usize::try_from(inbound.attempt)
            .ok()
            .and_then(|n| self.retry.tiers.get(n).copied());
        let mut headers = inbound.properties.headers().clone().unwrap_or_default();
        headers.insert(contract::ATTEMPT.into(), AMQPValue::LongLongInt(attempts));
        headers.insert(
            contract::FIRST_FAILURE.into(),
            text(&contract::time(first_failure)),
        );
        headers.insert(contract::LAST_ERROR.into(), text(error));
        let shard = key.shard(self.topology.shards());
        let settled = match tier.filter(|_| age < self.retry.max_age) {
            Some(delay) => {
                let tier = Topology::tier_name(delay);
                headers.insert(contract::TIER.into(), text(&tier));
                let exchange = self.topology.retry_exchange();
                let routing_key = Topology::shard_routing_key(shard);
                self.copy(inbound, &exchange, &routing_key, headers).await?;
                let label = TierLabel { tier: tier.clone() };
                self.metrics.retries.get_or_create(&label).inc();
                warn!(ipn.order_key = %key, attempt = attempts, %tier, error, "ipn not verified; retrying later");
                Settled::Deferred { tier }
            }
            None => {
                let reason = if tier.is_some() {
                    "too old"
                } else {
                    "retries exhausted"
                };
                headers.insert(contract::REASON.into(), text(reason));
                headers.insert(contract::PARKED_AT.into(), text(&contract::time(now)));
                self.copy(inbound, "", &self.topology.parked_queue(), headers)
                    .await?;
                self.metrics.parked.inc();
                warn!(
                    attempts,
                    reason, error, "ipn parked; its key stays blocked until an operator acts"
                );
                self.alerter.raise(Alert {
                    kind: Kind::Parked,
                    order_key: key.to_string(),
                    txn_id: Providers::txn_id(inbound.provider, &inbound.body),
                    reason: format!("{reason} after {attempts} attempts: {error}"),
                    fix: format!(
                        "its key is blocked; once PayPal answers again: `ipnctl parked replay --key {key}`; to give up on it and deliver the IPNs held behind it: `ipnctl key release {key} --purge-blocker`"
                    ),
                });
                Settled::Parked
            }
        };
        self.crash_point(Step::Deferred)?;
        // Shown to operators only: bounded and free of NUL, so the row can always be stored.
        let (txn_type, txn_id) = Providers::identify(inbound.provider, &inbound.body);
        let txn_type = txn_type.as_deref().map(bounded::shown);
        let txn_id = txn_id.as_deref().map(bounded::shown);
        let block = Block {
            order_key: key.as_str(),
            blocker_id: &inbound.message_id,
            parked: settled == Settled::Parked,
            shard,
            attempts,
            last_error: error,
            txn_type: txn_type.as_deref(),
            txn_id: txn_id.as_deref(),
        };
        self.store.block(&block).await?;
        self.crash_point(Step::Blocked)?;
        Ok(settled)
    }

    /// Publishes a copy of the IPN (same body, properties and message id) with `headers`, and
    /// waits for the confirm.
    async fn copy(
        &self,
        inbound: &Inbound,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
    ) -> Result<(), Error> {
        let properties = inbound
            .properties
            .clone()
            .with_message_id(ShortString::from(inbound.message_id.as_str()))
            .with_headers(headers);
        let message = Outgoing {
            exchange,
            routing_key,
            body: &inbound.body,
            properties,
        };
        self.publisher
            .publish(message, self.worker.confirm_timeout)
            .await?;
        Ok(())
    }

    /// Stores the IPN behind its key's blocker. Behind a parked blocker it is verified first:
    /// the key may wait for days, and a forgery should be caught (and alerted) now.
    async fn hold(
        &self,
        inbound: &Inbound,
        key: &OrderKey,
        blocked: &Blocked,
    ) -> Result<Settled, Error> {
        if blocked.parked {
            match self.screen(inbound).await {
                Ok(Screened::Rejected(reason, cause)) => {
                    let outcome = self.quarantine(inbound, reason, cause.as_deref()).await?;
                    return Ok(Settled::Finished {
                        outcome,
                        released: 0,
                    });
                }
                Ok(Screened::Passed(..)) => {}
                Err(error) => {
                    let error = bounded::error_chain(&error);
                    warn!(error, ipn.order_key = %key, "cannot verify an ipn held behind a parked one; it is verified when released");
                }
            }
        }
        let held = Held {
            order_key: key.to_string(),
            message_id: inbound.message_id.clone(),
            body: inbound.body.clone(),
            content_type: inbound
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.to_string()),
            received_at: inbound.received_at.map(contract::time),
            attempt: inbound.attempt,
            contract_headers: contract::kept_while_held(&inbound.properties),
        };
        self.store.hold(&held).await?;
        self.metrics.held.inc();
        if blocked.parked {
            self.alerter.raise(Alert {
                kind: Kind::HeldBehindParked,
                order_key: key.to_string(),
                txn_id: Providers::txn_id(inbound.provider, &inbound.body),
                reason: format!("waits behind parked IPN {}", blocked.blocker_id),
                fix: format!(
                    "`ipnctl parked replay --key {key}` once PayPal answers again, or `ipnctl key release {key}` to skip the parked one"
                ),
            });
        }
        info!(ipn.order_key = %key, blocker = %blocked.blocker_id, parked = blocked.parked, "ipn held behind its key's blocker");
        Ok(Settled::Held)
    }

    /// Processes the key's held IPNs in order; unblocks the key when none is left. Stops early
    /// when one of them is deferred or parked: it is the key's blocker now.
    async fn release(&self, key: &OrderKey) -> Result<usize, Error> {
        let mut released = 0;
        while let Some((id, held)) = self.store.next_held(key.as_str()).await? {
            let span = super::pipeline::span(&held.message_id, key.as_str(), held.attempt);
            let settled = self
                .attempt(&held_inbound(held), key)
                .instrument(span)
                .await?;
            self.crash_point(Step::Released)?;
            self.store.remove_held(id).await?;
            self.metrics.released.inc();
            if !matches!(settled, Settled::Finished { .. } | Settled::Rerouted { .. }) {
                return Ok(released);
            }
            released += 1;
        }
        self.store.unblock(key.as_str()).await?;
        if released > 0 {
            info!(ipn.order_key = %key, released, "key released");
        }
        Ok(released)
    }

    async fn control(&self, control: &str, key: &OrderKey) -> Result<Settled, Error> {
        if control != RELEASE {
            let control = bounded::shown(control);
            warn!(control, ipn.order_key = %key, "unknown control message ignored");
            return Ok(Settled::Controlled { released: 0 });
        }
        let released = self.release(key).await?;
        info!(ipn.order_key = %key, released, "key released by an operator");
        Ok(Settled::Controlled { released })
    }
}

/// The transaction whose profile a `txn:` key's IPN would be re-routed to, when the message was
/// not re-routed already.
fn paid_txn<'a>(inbound: &Inbound, key: &'a OrderKey) -> Option<&'a str> {
    let txn_id = key.as_str().strip_prefix(TXN_PREFIX)?;
    match header_text(&inbound.properties, contract::REROUTED_FROM) {
        Some(_) => None,
        None => Some(txn_id),
    }
}

/// A held IPN as if it had just been delivered, with the headers the ingress gave it.
fn held_inbound(held: Held) -> Inbound {
    let mut headers = FieldTable::default();
    headers.insert(contract::ORDER_KEY.into(), text(&held.order_key));
    headers.insert(
        contract::ATTEMPT.into(),
        AMQPValue::LongLongInt(held.attempt),
    );
    if let Some(received_at) = &held.received_at {
        headers.insert(contract::RECEIVED_AT.into(), text(received_at));
    }
    if let Some(kept) = &held.contract_headers {
        contract::restore_held(&mut headers, kept);
    }
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(held.message_id.as_str()))
        .with_headers(headers);
    if let Some(content_type) = held
        .content_type
        .as_deref()
        .and_then(|c| ShortString::try_new(c).ok())
    {
        properties = properties.with_content_type(content_type);
    }
    Inbound::new(held.body, properties)
}
