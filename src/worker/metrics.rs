//! The worker's Prometheus metrics, in a registry of its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the verification counter: `verified`, `invalid` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The postback's outcome.
    pub outcome: &'static str,
}

/// Label of the quarantine counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `invalid`, `wrong-environment`, `foreign-receiver`, `unreadable`.
    pub reason: &'static str,
}

/// Label of the retry counter: the tier's delay (`10s`, `1m`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// The `x-ipn-tier` value.
    pub tier: String,
}

/// Label of the connection gauge: `publish`, `consume` (the broker) or `database`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// Which connection.
    pub connection: &'static str,
}

/// Label of the bridge's own queue depths: `inbound` (every shard together), `parked`,
/// `quarantine`, `dead`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// The queue's role.
    pub queue: &'static str,
}

/// A step of an IPN's chain, timed by [`Metrics::step`] (the postback's time is
/// `verify_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainStep {
    /// The gate's look-up of the key (blocked? paid under a profile?).
    Gate,
    /// The claim (dedup row and sequence number).
    Claim,
    /// The event's publish, to its confirm.
    Publish,
    /// The mark-done (the stored event).
    MarkDone,
    /// The delivery's ack.
    Ack,
}

impl ChainStep {
    /// Every step, in chain order (the order of [`Metrics`]' series).
    pub const ALL: [ChainStep; 5] = [
        ChainStep::Gate,
        ChainStep::Claim,
        ChainStep::Publish,
        ChainStep::MarkDone,
        ChainStep::Ack,
    ];

    /// Its `step` label: `gate`, `claim`, `publish`, `mark_done`, `ack`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChainStep::Gate => "gate",
            ChainStep::Claim => "claim",
            ChainStep::Publish => "publish",
            ChainStep::MarkDone => "mark_done",
            ChainStep::Ack => "ack",
        }
    }
}

/// Label of the step histogram: a [`ChainStep`]'s name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// Which step of the chain.
    pub step: &'static str,
}

/// A gauge of seconds.
pub type Seconds = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Label of the downstream gauges: the business service's queue.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The `[[downstream]]` queue's name.
    pub queue: String,
}

/// Counters, histogram and gauge of one worker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Postbacks by outcome.
    pub verifications: Family<OutcomeLabel, Counter>,
    /// Seconds per postback.
    pub verify_seconds: Histogram,
    /// Events published and confirmed.
    pub events: Counter,
    /// Resends recognised and dropped.
    pub duplicates: Counter,
    /// IPNs quarantined, by reason.
    pub quarantined: Family<ReasonLabel, Counter>,
    /// IPNs being processed now.
    pub in_flight: Gauge,
    /// IPNs sent to a delay tier, by tier.
    pub retries: Family<TierLabel, Counter>,
    /// IPNs parked after exhausting their tiers.
    pub parked: Counter,
    /// IPNs held behind a blocked key.
    pub held: Counter,
    /// Held IPNs released (processed) after their key's blocker.
    pub released: Counter,
    /// Messages re-routed to the key they belong to (disputes to their subscription's,
    /// encrypted notifications to the key inside them).
    pub rerouted: Counter,
    /// Notifications of the intake lane re-routed together, per batch that re-routed any
    /// ([`super::intake`]).
    pub intake_batch: Histogram,
    /// Shard queues this worker owns and consumes now.
    pub owned_shards: Gauge,
    /// Shard queues in the topology (`topology.shards`): `sum(owned_shards)` should equal it.
    pub shards: Gauge,
    /// Keys blocked now (read from the database every few seconds).
    pub blocked_keys: Gauge,
    /// IPNs held behind blocked keys now (read from the database every few seconds).
    pub held_now: Gauge,
    /// Seconds since the longest-blocked key was blocked (read with `blocked_keys`).
    pub longest_blocked_seconds: Seconds,
    /// Seconds since the oldest parked IPN was parked (read with `blocked_keys`).
    pub oldest_parked_seconds: Seconds,
    /// Messages in the bridge's own queues, by role (exported by the watching worker only).
    pub queue_messages: Family<RoleLabel, Gauge>,
    /// From the ingress's receive time to the event's confirmed publish.
    pub receive_to_publish_seconds: Histogram,
    /// Seconds an IPN spent in each step of the chain, waiting for its batch or its confirm
    /// included (the postback's are `verify_seconds`): where the receive-to-publish time goes.
    steps: Family<StepLabel, Histogram, fn() -> Histogram>,
    /// The series of `steps`, in [`ChainStep::ALL`]'s order, taken once (no look-up per
    /// observation).
    step_series: [Histogram; ChainStep::ALL.len()],
    /// 1 while a connection is up, by connection (set at each scrape).
    pub connected: Family<ConnectionLabel, Gauge>,
    /// The broker node of the publish and consume connections.
    pub broker_node: crate::amqp::NodeGauge,
    /// Alert messages sent and given up on, by channel.
    pub alerts: crate::alert::Counters,
    /// Events waiting in each downstream queue (exported by the watching worker only).
    pub downstream_depth: Family<QueueLabel, Gauge>,
    /// Consumers of each downstream queue (exported by the watching worker only).
    pub downstream_consumers: Family<QueueLabel, Gauge>,
    /// Events in each downstream queue's `<queue>.dead` (exported by the watching worker only).
    pub downstream_dead: Family<QueueLabel, Gauge>,
}

impl Metrics {
    /// Fresh metrics, all zero; `database` (the store's batch metrics) is exported with them.
    pub fn new(database: &crate::store::BatchMetrics) -> Metrics {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("ipn_worker");
        let steps: Family<StepLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(step_histogram);
        // Every step's series exists from the start, at 0.
        let step_series = ChainStep::ALL.map(|step| {
            steps.get_or_create_owned(&StepLabel {
                step: step.as_str(),
            })
        });
        let metrics = Metrics {
            verifications: Family::default(),
            // 5 ms .. ~80 s
            verify_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            events: Counter::default(),
            duplicates: Counter::default(),
            quarantined: Family::default(),
            in_flight: Gauge::default(),
            retries: Family::default(),
            parked: Counter::default(),
            held: Counter::default(),
            released: Counter::default(),
            alerts: crate::alert::Counters::initialized(),
            rerouted: Counter::default(),
            // 1 .. 64 (intake::MAX_BATCH)
            intake_batch: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            owned_shards: Gauge::default(),
            shards: Gauge::default(),
            blocked_keys: Gauge::default(),
            held_now: Gauge::default(),
            longest_blocked_seconds: Seconds::default(),
            oldest_parked_seconds: Seconds::default(),
            queue_messages: Family::default(),
            // 5 ms .. ~80 s
            receive_to_publish_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            steps,
            step_series,
            connected: Family::default(),
            broker_node: crate::amqp::NodeGauge::default(),
            downstream_depth: Family::default(),
            downstream_consumers: Family::default(),
            downstream_dead: Family::default(),
            registry: Registry::default(),
        };
        // Every series of a fixed label set exists from the start, at 0.
        for outcome in ["verified", "invalid", "error"] {
            let _ = metrics
                .verifications
                .get_or_create(&OutcomeLabel { outcome });
        }
        for reason in crate::policy::Reason::ALL {
            let label = ReasonLabel {
                reason: reason.as_str(),
            };
            let _ = metrics.quarantined.get_or_create(&label);
        }
        for connection in ["publish", "consume", "database"] {
            let _ = metrics
                .connected
                .get_or_create(&ConnectionLabel { connection });
        }
        registry.register(
            "verifications",
            "PayPal postbacks by outcome",
            metrics.verifications.clone(),
        );
        registry.register(
            "verify_seconds",
            "Seconds per PayPal postback",
            metrics.verify_seconds.clone(),
        );
        registry.register(
            "events_published",
            "Events published and confirmed",
            metrics.events.clone(),
        );
        registry.register(
            "duplicates",
            "Resends recognised and not published again",
            metrics.duplicates.clone(),
        );
        registry.register(
            "quarantined",
            "IPNs quarantined, by reason",
            metrics.quarantined.clone(),
        );
        registry.register(
            "in_flight",
            "IPNs being processed",
            metrics.in_flight.clone(),
        );
        registry.register(
            "retries",
            "IPNs sent to a delay tier, by tier",
            metrics.retries.clone(),
        );
        registry.register(
            "parked",
            "IPNs parked after exhausting their retries",
            metrics.parked.clone(),
        );
        registry.register(
            "held",
            "IPNs held behind a blocked key",
            metrics.held.clone(),
        );
        registry.register(
            "released",
            "Held IPNs processed after their key's blocker",
            metrics.released.clone(),
        );
        registry.register(
            "rerouted",
            "Messages re-routed to the order key they belong to (a dispute to its subscription's, an encrypted notification to the key inside it)",
            metrics.rerouted.clone(),
        );
        registry.register(
            "intake_batch_size",
            "Notifications of the intake lane (WeChat Pay's) re-routed together, per batch that re-routed any",
            metrics.intake_batch.clone(),
        );
        registry.register(
            "owned_shards",
            "Shard queues this worker owns and consumes",
            metrics.owned_shards.clone(),
        );
        registry.register(
            "shards",
            "Shard queues in the topology (sum(owned_shards) over the workers equals it when every shard is consumed)",
            metrics.shards.clone(),
        );
        registry.register(
            "blocked_keys",
            "Order keys blocked behind a deferred or parked IPN",
            metrics.blocked_keys.clone(),
        );
        registry.register(
            "held_ipns",
            "IPNs held behind blocked keys",
            metrics.held_now.clone(),
        );
        registry.register(
            "longest_blocked_seconds",
            "Seconds since the longest-blocked key was blocked (0: none; from the worker owning shard 0)",
            metrics.longest_blocked_seconds.clone(),
        );
        registry.register(
            "oldest_parked_seconds",
            "Seconds since the oldest parked IPN was parked (0: none; from the worker owning shard 0)",
            metrics.oldest_parked_seconds.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages in the bridge's queues: inbound (all shards), parked, quarantine, dead (from the worker owning shard 0)",
            metrics.queue_messages.clone(),
        );
        registry.register(
            "receive_to_publish_seconds",
            "From the ingress's receive time to the event's confirmed publish",
            metrics.receive_to_publish_seconds.clone(),
        );
        registry.register(
            "connected",
            "1 while the connection is up: publish and consume (the broker), database",
            metrics.connected.clone(),
        );
        metrics.broker_node.register(registry);
        registry.register(
            "alerts_sent",
            "Alert messages delivered, by channel",
            metrics.alerts.sent.clone(),
        );
        registry.register(
            "alerts_failed",
            "Alert messages given up on after every attempt, by channel",
            metrics.alerts.failed.clone(),
        );
        registry.register(
            "downstream_depth",
            "Events waiting in each downstream queue (from the worker that watches them)",
            metrics.downstream_depth.clone(),
        );
        registry.register(
            "downstream_consumers",
            "Consumers of each downstream queue (from the worker that watches them)",
            metrics.downstream_consumers.clone(),
        );
        registry.register(
            "downstream_dead",
            "Events in each downstream queue's dead-letter queue (from the worker that watches them)",
            metrics.downstream_dead.clone(),
        );
        registry.register(
            "step_seconds",
            "Seconds an IPN spent in each step (gate, claim, publish, mark_done, ack), waits for its batch or confirm included",
            metrics.steps.clone(),
        );
        registry.register(
            "database_batch_size",
            "Requests per group-commit batch, by statement",
            database.size.clone(),
        );
        registry.register(
            "database_batch_seconds",
            "Seconds per group-commit batch, by statement",
            database.seconds.clone(),
        );
        crate::telemetry::process::register(&mut root, "ipn-worker");
        Metrics {
            registry: root,
            ..metrics
        }
    }

    /// Runs `work` (one step of an IPN's chain) and observes how long it took, whatever its
    /// result.
    pub async fn step<T>(&self, step: ChainStep, work: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let result = work.await;
        self.step_series[step as usize].observe(started.elapsed().as_secs_f64());
        result
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        crate::telemetry::render_metrics(&self.registry)
    }
}

/// 0.5 ms .. ~16 s
fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_indexes_its_own_series() {
        for (i, step) in ChainStep::ALL.into_iter().enumerate() {
            assert_eq!(step as usize, i, "{step:?}");
        }
        let metrics = Metrics::new(&crate::store::BatchMetrics::default());
        let text = metrics.render();
        for step in ChainStep::ALL {
            let series = format!(
                "ipn_worker_step_seconds_count{{step=\"{}\"}} 0",
                step.as_str()
            );
            assert!(text.contains(&series), "{series} in {text}");
        }
    }
}
