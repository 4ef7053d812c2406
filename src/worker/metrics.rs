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
    /// Shard queues this worker owns and consumes now.
    pub owned_shards: Gauge,
    /// Keys blocked now (read from the database every few seconds).
    pub blocked_keys: Gauge,
    /// IPNs held behind blocked keys now (read from the database every few seconds).
    pub held_now: Gauge,
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
    /// Fresh metrics, all zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ipn_worker");
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
            owned_shards: Gauge::default(),
            blocked_keys: Gauge::default(),
            held_now: Gauge::default(),
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
            "owned_shards",
            "Shard queues this worker owns and consumes",
            metrics.owned_shards.clone(),
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
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        crate::telemetry::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
