//! The ingress's Prometheus metrics, in a registry of its own (so several servers in one
//! process, as in tests, never share counters).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status answered, or `dropped` when the client went away before the answer.
    pub status: String,
}

/// Label of the refusal counter: what the provider's own check at the door said.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `paypal`, `alipay`, `wechatpay`.
    pub provider: &'static str,
    /// E.g. `bad-signature`, `unsigned`.
    pub reason: &'static str,
}

/// Counters, histogram and gauge of one ingress server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// IPN requests by answered status.
    pub requests: Family<StatusLabel, Counter>,
    /// Seconds from publish to the broker's answer (or the timeout), every attempt.
    pub confirm_seconds: Histogram,
    /// IPN requests being handled now.
    pub in_flight: Gauge,
    /// Notifications refused by their provider's check at the door, by provider and reason.
    pub refused: Family<RefusedLabel, Counter>,
    /// Alert messages sent and failed, by channel.
    pub alerts: crate::alert::Counters,
    /// 1 while `/readyz` would answer 200 (set at each scrape).
    pub ready: Gauge,
    /// The broker node publishes go to (set at each scrape).
    pub broker_node: crate::amqp::NodeGauge,
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Metrics {
        let requests = Family::<StatusLabel, Counter>::default();
        // 0.5 ms .. ~8 s
        let confirm_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        let in_flight = Gauge::default();
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("ipn_ingress");
        registry.register(
            "requests",
            "IPN requests by answered status",
            requests.clone(),
        );
        registry.register(
            "publish_confirm_seconds",
            "Time from publish to the broker's confirm, nack, return or timeout",
            confirm_seconds.clone(),
        );
        registry.register("in_flight", "IPN requests being handled", in_flight.clone());
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the ingress can publish (what /readyz answers 200 to)",
            ready.clone(),
        );
        let refused = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "refused",
            "Notifications refused at the door (bad signature...), by provider and reason",
            refused.clone(),
        );
        let alerts = crate::alert::Counters::initialized();
        registry.register(
            "alerts_sent",
            "Alert messages delivered, by channel",
            alerts.sent.clone(),
        );
        registry.register(
            "alerts_failed",
            "Alert messages given up on, by channel",
            alerts.failed.clone(),
        );
        let broker_node = crate::amqp::NodeGauge::default();
        broker_node.register(registry);
        crate::telemetry::process::register(&mut root, "ipn-ingress");
        Metrics {
            broker_node,
            registry: root,
            alerts,
            requests,
            confirm_seconds,
            in_flight,
            refused,
            ready,
        }
    }

    /// Puts every series whose labels are known in advance at 0: each status the ingress answers
    /// (and `dropped`), and each refusal reason of each route's provider.
    pub fn initialize(&self, providers: &[&dyn crate::provider::Provider]) {
        for status in ["200", "400", "405", "408", "413", "415", "503", "dropped"] {
            let label = StatusLabel {
                status: status.to_owned(),
            };
            let _ = self.requests.get_or_create(&label);
        }
        for provider in providers {
            for reason in provider.refusal_reasons() {
                let label = RefusedLabel {
                    provider: provider.name(),
                    reason,
                };
                let _ = self.refused.get_or_create(&label);
            }
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
