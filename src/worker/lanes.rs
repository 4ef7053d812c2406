//! One shard's lanes: a queue of waiting deliveries per order key.
//!
//! Keeps the fourth promise within a shard: messages of one order key are handled strictly one
//! after another in delivery order (a lane), different keys concurrently (bounded by
//! `worker.concurrency`). A delivery is acked only after the gate settled it. A failure of our
//! own database or broker keeps the IPN at the head of its lane and retries it in place with
//! backoff, unacked, so the key's later IPNs cannot overtake it; after `worker.retry_in_place`
//! tries it goes through the delay tiers instead (its key blocked behind it), so no message can
//! hold the shard's prefetch window forever.
//!
//! The intake lane (WeChat Pay's notifications, all under one intake key) takes every delivery
//! waiting in it at once and re-routes them together ([`super::intake`]); what that leaves goes
//! back to the front of the lane, in order, and is settled one at a time first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::Error;
use super::intake;
use super::metrics::{ChainStep, Metrics};
use super::pipeline::{self, Inbound, Pipeline};
use crate::backoff::Backoff;
use crate::bounded;
use crate::config;

/// What a lane's work returns when it ends: its key, and the deliveries it left unsettled
/// (unacked), in order, to go first when the lane goes on.
type Done = (String, Vec<Delivery>);

/// How a lane retries an IPN in place.
#[derive(Debug, Clone, Copy)]
struct Retries {
    min: Duration,
    max: Duration,
    in_place: u32,
    /// Bound on an ack: a silent broker must not hold a lane past shutdown.
    ack_timeout: Duration,
}

/// A shard's deliveries, sorted into lanes by order key.
pub(super) struct Lanes {
    shard: u16,
    pipeline: Arc<Pipeline>,
    limit: Arc<Semaphore>,
    retries: Retries,
    /// The lane whose deliveries are re-routed together ([`super::intake`]), when there is one.
    intake: Option<String>,
    /// The most deliveries of the intake lane taken together.
    intake_batch: usize,
    stop: CancellationToken,
    waiting: HashMap<String, VecDeque<Delivery>>,
    busy: HashSet<String>,
}

impl Lanes {
    pub(super) fn new(
        shard: u16,
        pipeline: Arc<Pipeline>,
        limit: Arc<Semaphore>,
        config: &config::Config,
        stop: CancellationToken,
    ) -> Lanes {
        let worker = &config.worker;
        let intake_lane = pipeline.providers.intake_key().map(|key| key.to_string());
        Lanes {
            shard,
            pipeline,
            limit,
            retries: Retries {
                min: worker.retry_min,
                max: worker.retry_max,
                in_place: worker.retry_in_place.get(),
                ack_timeout: config.amqp.connect_timeout,
            },
            intake: intake_lane,
            intake_batch: intake::MAX_BATCH.min(worker.concurrency.get()),
            stop,
            waiting: HashMap::new(),
            busy: HashSet::new(),
        }
    }

    /// Feeds deliveries into lanes until stopped; then lets the running IPNs finish. Returns
    /// `None` when stopped, or what ended the consumer.
    pub(super) async fn run(mut self, mut consumer: Consumer) -> Option<Error> {
        let mut running: JoinSet<Done> = JoinSet::new();
        let ended = loop {
            // Biased, the stop first: once stopped, no delivery may start. A stop leaves each
            // lane's waiting deliveries unstarted (unacked, redelivered in order later); a later
            // delivery of the same key started after that would overtake them and take the
            // key's next number before them (the cluster test's sequence gap).
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break None,
                Some(done) = running.join_next() => {
                    if let Ok((key, left)) = done {
                        self.next_in_lane(key, left, &mut running);
                    }
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => self.admit(delivery, &mut running),
                    Some(Err(error)) => break Some(Error::from(error)),
                    None => break Some(Error::ConsumerLost(self.shard)),
                },
            }
        };
        if ended.is_some() {
            // The session is over (its `stop` is this session's own token): IPNs retrying in
            // place must give up now, unacked, instead of waiting for a broker that is gone.
            self.stop.cancel();
        }
        // Finish what is running; deliveries still waiting stay unacked for redelivery.
        while running.join_next().await.is_some() {}
        ended
    }

    fn admit(&mut self, delivery: Delivery, running: &mut JoinSet<Done>) {
        if self.stop.is_cancelled() {
            // Stopped: it stays unacked and comes back after the ones its lane left waiting.
            return;
        }
        let key = lane_of(&delivery);
        // Which consumer got which delivery, when: what an order question needs answered.
        debug!(
            shard = self.shard,
            message_id = (delivery.properties.message_id().as_ref())
                .map(|id| bounded::shown(id.as_str()))
                .unwrap_or_default(),
            delivery_tag = delivery.delivery_tag,
            redelivered = delivery.redelivered,
            ipn.order_key = %key,
            "delivery admitted"
        );
        if self.busy.contains(&key) {
            self.waiting.entry(key).or_default().push_back(delivery);
        } else {
            self.busy.insert(key.clone());
            running.spawn(self.process(key, delivery));
        }
    }

    /// Starts the lane's next work once its last finished: the deliveries that work `left`
    /// unsettled first, one at a time; else the intake lane's waiting deliveries together; else
    /// the next one.
    fn next_in_lane(&mut self, key: String, left: Vec<Delivery>, running: &mut JoinSet<Done>) {
        let together = left.is_empty() && self.intake.as_deref() == Some(key.as_str());
        let waiting = self.waiting.entry(key.clone()).or_default();
        for delivery in left.into_iter().rev() {
            waiting.push_front(delivery);
        }
        // Stopped: the lane's deliveries stay unacked and come back in order later.
        let go = !self.stop.is_cancelled();
        let batch = (go && together && !waiting.is_empty()).then(|| {
            let n = waiting.len().min(self.intake_batch);
            waiting.drain(..n).collect::<Vec<_>>()
        });
        let one = (go && batch.is_none())
            .then(|| waiting.pop_front())
            .flatten();
        if waiting.is_empty() {
            self.waiting.remove(&key);
        }
        if let Some(batch) = batch {
            running.spawn(self.process_together(key, batch));
        } else if let Some(delivery) = one {
            running.spawn(self.process(key, delivery));
        } else {
            self.busy.remove(&key);
        }
    }

    /// Re-routes deliveries of the intake lane together ([`Pipeline::reroute_intake`]) and acks
    /// the confirmed ones; returns the rest, in order, for the lane to settle one at a time.
    fn process_together(
        &self,
        key: String,
        batch: Vec<Delivery>,
    ) -> impl Future<Output = Done> + use<> {
        let (pipeline, limit) = (Arc::clone(&self.pipeline), Arc::clone(&self.limit));
        let ack_timeout = self.retries.ack_timeout;
        let inbounds: Vec<Inbound> = batch
            .iter()
            .map(|delivery| Inbound::new(delivery.data.clone(), delivery.properties.clone()))
            .collect();
        async move {
            let permits = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            let done = {
                let Ok(_permits) = limit.acquire_many(permits).await else {
                    return (key, batch);
                };
                let _flying: Vec<InFlight> = (0..batch.len())
                    .map(|_| InFlight::new(&pipeline.metrics().in_flight))
                    .collect();
                let acked = |i: usize| ack(&batch[i], &key, ack_timeout, pipeline.metrics());
                pipeline.reroute_intake(&inbounds, acked).await
            };
            let left = batch
                .into_iter()
                .zip(done)
                .filter_map(|(delivery, acked)| (!acked).then_some(delivery))
                .collect();
            (key, left)
        }
    }

    /// Handles one delivery until it is settled and acked, retrying transient failures; gives
    /// up (unacked) only when the worker stops.
    fn process(&self, key: String, delivery: Delivery) -> impl Future<Output = Done> + use<> {
        let (pipeline, limit, stop) = (
            Arc::clone(&self.pipeline),
            Arc::clone(&self.limit),
            self.stop.clone(),
        );
        let retries = self.retries;
        let inbound = Inbound::new(delivery.data.clone(), delivery.properties.clone());
        let span = pipeline::span(&inbound.message_id, &key, inbound.attempt);
        let work = async move {
            let mut backoff = Backoff::new(retries.min, retries.max);
            let mut failures: u32 = 0;
            let mut last_error: Option<pipeline::Error> = None;
            loop {
                let outcome = {
                    let Ok(_permit) = limit.acquire().await else {
                        return (key, Vec::new());
                    };
                    let _flying = InFlight::new(&pipeline.metrics().in_flight);
                    let stuck = last_error.as_ref().filter(|_| failures >= retries.in_place);
                    settle(&pipeline, &inbound, stuck).await
                };
                match outcome {
                    Ok(()) => {
                        ack(&delivery, &key, retries.ack_timeout, pipeline.metrics()).await;
                        return (key, Vec::new());
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff.next_wait();
                        let cause = bounded::error_chain(&error);
                        warn!(error = cause, failures, retry_in = ?wait, "ipn not finished; retrying in place");
                        last_error = Some(error);
                        tokio::select! {
                            () = stop.cancelled() => return (key, Vec::new()),
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        };
        work.instrument(span)
    }
}

/// Settles an IPN; when it is `stuck` (failed in place too often), defers it through the
/// delay tiers instead, where its key's order allows.
async fn settle(
    pipeline: &Pipeline,
    inbound: &Inbound,
    stuck: Option<&pipeline::Error>,
) -> Result<(), pipeline::Error> {
    if let Some(error) = stuck
        && pipeline.defer_stuck(inbound, error).await?.is_some()
    {
        return Ok(());
    }
    pipeline.settle(inbound).await.map(|_| ())
}

async fn ack(delivery: &Delivery, key: &str, limit: Duration, metrics: &Metrics) {
    let acking = tokio::time::timeout(limit, delivery.acker.ack(BasicAckOptions::default()));
    let acked = metrics.step(ChainStep::Ack, acking).await;
    let error = match acked {
        Ok(Ok(_)) => return,
        Ok(Err(error)) => bounded::error_chain(&error),
        Err(_) => format!("no answer within {limit:?}"),
    };
    // Settled but not acked: the redelivery will be a duplicate.
    warn!(error, ipn.order_key = %key, "cannot ack a settled ipn; its redelivery will be a duplicate");
}

/// The lane of a delivery: its order key ([`crate::contract::key_of`]).
fn lane_of(delivery: &Delivery) -> String {
    crate::contract::key_of(&delivery.properties, &delivery.data).to_string()
}

/// One IPN counted in `ipn_worker_in_flight` while it is being settled (held by its permit's
/// holder; uncounted when dropped, also when the worker stops mid-way).
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
