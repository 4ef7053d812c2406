//! Every exchange and queue name, derived from one prefix, and their idempotent declaration.
//!
//! ```text
//! <p>.inbound (direct) --rk = shard n--> <p>.inbound.<n>  quorum, single active consumer,
//!                                                         x-delivery-limit, dead-letters
//!                                                         (at-least-once) to <p>.dead
//! <p>.quarantine                                           quorum; reason in x-ipn-reason
//! <p>.retry (headers) --x-ipn-tier = <delay>--> <p>.wait.<delay>  quorum, x-message-ttl,
//!                                      dead-letters (at-least-once) to <p>.inbound, keeping the
//!                                      shard routing key the message was published with
//! <p>.parked                                               quorum; retries exhausted
//! <p>.events (topic) --rk = <provider>.<kind>.<type>.<status>--> <queue> of each [[downstream]]
//!                                      quorum, x-delivery-limit, x-message-ttl (optional),
//!                                      dead-letters (at-least-once) to <queue>.dead
//! ```
//! Delays are one queue per delay with a queue TTL, never a per-message `expiration`: an expired
//! message leaves only from the head, so mixed delays in one queue would block each other
//! (<https://www.rabbitmq.com/docs/ttl#per-message-ttl-caveats>). A wait queue sets no
//! dead-letter routing key, so the broker reuses the message's own (its shard number): a direct
//! retry exchange keyed by tier would send it back with the tier as key, which `<p>.inbound`
//! would drop silently.
//! Quorum queues are always persisted and, with `x-delivery-limit` set, put a requeued message
//! back at the head (without a limit, RabbitMQ 3.10 puts it at the back, breaking order).
//! At-least-once dead-lettering requires `x-overflow=reject-publish`
//! (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>).

mod declarer;

use std::num::{NonZeroU8, NonZeroU16};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::config;
use declarer::Declarer;

/// The names and shapes of the bridge's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    shards: NonZeroU16,
    delivery_limit: NonZeroU16,
    group_size: NonZeroU8,
    tiers: Vec<Duration>,
    downstream: Vec<config::Downstream>,
}

impl Topology {
    /// The topology a configuration describes.
    pub fn new(config: &config::Topology) -> Topology {
        Topology {
            prefix: config.prefix.clone(),
            shards: config.shards,
            delivery_limit: config.delivery_limit,
            group_size: config.quorum_group_size,
            tiers: config::Retry::default().tiers,
            downstream: Vec::new(),
        }
    }

    /// The topology of a whole configuration: also the business services' queues.
    pub fn of(config: &config::Config) -> Topology {
        Topology {
            downstream: config.downstream.clone(),
            tiers: config.retry.tiers.clone(),
            ..Topology::new(&config.topology)
        }
    }

    /// The same topology without the business services' queues: what the ingress declares.
    pub fn without_downstream(mut self) -> Topology {
        self.downstream.clear();
        self
    }

    /// Number of shard queues.
    pub fn shards(&self) -> NonZeroU16 {
        self.shards
    }

    /// `<p>.inbound`: the direct exchange the ingress publishes to, keyed by shard number.
    pub fn inbound_exchange(&self) -> String {
        format!("{}.inbound", self.prefix)
    }

    /// `<p>.inbound.<n>`: the queue of shard `n`.
    pub fn shard_queue(&self, shard: u16) -> String {
        format!("{}.inbound.{shard}", self.prefix)
    }

    /// The routing key that reaches shard `n`'s queue: its number.
    pub fn shard_routing_key(shard: u16) -> String {
        shard.to_string()
    }

    /// `<p>.dead`: where the broker puts messages past their delivery limit.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `<p>.quarantine`: forgeries, policy failures and unreadable bodies, with the reason in
    /// `x-ipn-reason`.
    pub fn quarantine_queue(&self) -> String {
        format!("{}.quarantine", self.prefix)
    }

    /// `<p>.retry`: the headers exchange that routes a message to the wait queue named by its
    /// `x-ipn-tier` header. Publish to it with the message's shard number as routing key.
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// The `x-ipn-tier` value of a delay: the delay written compactly (`10s`, `1m30s`, `1day`).
    pub fn tier_name(delay: Duration) -> String {
        humantime::format_duration(delay)
            .to_string()
            .replace(' ', "")
    }

    /// The configured delays, in the order of attempts.
    pub fn tiers(&self) -> &[Duration] {
        &self.tiers
    }

    /// `<p>.wait.<delay>`: where messages wait out one delay.
    pub fn wait_queue(&self, delay: Duration) -> String {
        format!("{}.wait.{}", self.prefix, Self::tier_name(delay))
    }

    /// `<p>.parked`: IPNs whose retries are exhausted, waiting for an operator.
    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.prefix)
    }

    /// The distinct delays, in first-use order (equal delays share a wait queue).
    fn distinct_tiers(&self) -> Vec<Duration> {
        let mut distinct: Vec<Duration> = Vec::new();
        for delay in &self.tiers {
            if !distinct.contains(delay) {
                distinct.push(*delay);
            }
        }
        distinct
    }

    /// `<p>.events`: the topic exchange business services bind their queues to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The bridge's own queues by role, for their depths: every shard as `inbound`, then
    /// `parked`, `quarantine` and `dead`.
    pub fn own_queues(&self) -> Vec<(&'static str, String)> {
        (0..self.shards().get())
            .map(|shard| ("inbound", self.shard_queue(shard)))
            .chain([
                ("parked", self.parked_queue()),
                ("quarantine", self.quarantine_queue()),
                ("dead", self.dead_queue()),
            ])
            .collect()
    }

    /// Every queue name, for tools that list or remove them.
    pub fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = (0..self.shards.get())
            .map(|n| self.shard_queue(n))
            .collect();
        queues.push(self.dead_queue());
        queues.push(self.quarantine_queue());
        queues.push(self.parked_queue());
        queues.extend(
            self.distinct_tiers()
                .into_iter()
                .map(|d| self.wait_queue(d)),
        );
        queues
    }

    /// The business services' queues, as configured.
    pub fn downstream(&self) -> &[config::Downstream] {
        &self.downstream
    }

    /// Every exchange name, for tools that remove them.
    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.inbound_exchange(),
            self.retry_exchange(),
            self.events_exchange(),
        ]
    }

    /// Declares everything on a channel of its own; safe to repeat, and fails (with the
    /// broker's reason) if an existing queue has different arguments rather than silently using
    /// it. Placement (the quorum group's initial size, the leader locator) is the exception: it
    /// only applies when a queue is created, so an existing queue keeps its own
    /// (`declarer`).
    pub async fn declare(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let mut declarer = Declarer::open(connection).await?;
        for queue in [
            self.dead_queue(),
            self.quarantine_queue(),
            self.parked_queue(),
        ] {
            declarer.queue(&queue, self.quorum_args()).await?;
        }
        declarer
            .exchange(&self.events_exchange(), ExchangeKind::Topic)
            .await?;
        for downstream in &self.downstream {
            self.declare_service_queue(&mut declarer, downstream)
                .await?;
        }
        let exchange = self.inbound_exchange();
        declarer.exchange(&exchange, ExchangeKind::Direct).await?;
        for shard in 0..self.shards.get() {
            let queue = self.shard_queue(shard);
            declarer.queue(&queue, self.shard_args()).await?;
            let routing_key = Self::shard_routing_key(shard);
            declarer
                .bind(&queue, &exchange, &routing_key, FieldTable::default())
                .await?;
        }
        self.declare_retry(&mut declarer).await?;
        declarer.close().await
    }

    /// `<p>.retry` and a wait queue per distinct delay, bound by `x-ipn-tier`; after
    /// `<p>.inbound` exists, which the wait queues dead-letter to.
    async fn declare_retry(&self, declarer: &mut Declarer<'_>) -> Result<(), lapin::Error> {
        let exchange = self.retry_exchange();
        declarer.exchange(&exchange, ExchangeKind::Headers).await?;
        for delay in self.distinct_tiers() {
            let queue = self.wait_queue(delay);
            declarer.queue(&queue, self.wait_args(delay)).await?;
            // `all-with-x`: a plain `all` ignores binding arguments that start with `x-`, so a
            // binding on `x-ipn-tier` alone would match every message and copy it into every
            // wait queue (seen on 3.10.8). `all-with-x` exists since RabbitMQ 3.10.
            let mut binding = FieldTable::default();
            insert(&mut binding, "x-match", text("all-with-x"));
            insert(
                &mut binding,
                crate::contract::TIER,
                text(&Self::tier_name(delay)),
            );
            declarer.bind(&queue, &exchange, "", binding).await?;
        }
        Ok(())
    }

    fn wait_args(&self, delay: Duration) -> FieldTable {
        let mut args = self.quorum_args();
        // Validated by config: 1 ms up to u32::MAX ms.
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        insert(&mut args, "x-message-ttl", AMQPValue::LongLongInt(ttl));
        insert(
            &mut args,
            "x-dead-letter-exchange",
            text(&self.inbound_exchange()),
        );
        insert(&mut args, "x-dead-letter-strategy", text("at-least-once"));
        insert(&mut args, "x-overflow", text("reject-publish"));
        args
    }

    /// A quorum queue, its group of `topology.quorum_group_size` nodes (or all, when fewer) and
    /// its leader placed on the node with the fewest leaders.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        insert(&mut args, "x-queue-type", text("quorum"));
        let size = i64::from(self.group_size.get());
        insert(
            &mut args,
            declarer::GROUP_SIZE,
            AMQPValue::LongLongInt(size),
        );
        insert(&mut args, declarer::LEADER_LOCATOR, text("balanced"));
        args
    }

    /// Declares a business service's queue as the bridge does (with its `<queue>.dead`) and
    /// binds it to `<p>.events`: a rejected event, one requeued `delivery_limit` times, or (with
    /// `message_ttl`) one nobody consumed in time moves to `<queue>.dead`, at least once.
    async fn declare_service_queue(
        &self,
        declarer: &mut Declarer<'_>,
        downstream: &config::Downstream,
    ) -> Result<(), lapin::Error> {
        let queue = downstream.queue.as_str();
        let dead = config::dead_letter_queue(queue);
        declarer.queue(&dead, self.quorum_args()).await?;
        let mut args = self.quorum_args();
        let limit = i64::from(downstream.delivery_limit.get());
        insert(&mut args, "x-delivery-limit", AMQPValue::LongLongInt(limit));
        insert(&mut args, "x-dead-letter-exchange", text(""));
        insert(&mut args, "x-dead-letter-routing-key", text(&dead));
        insert(&mut args, "x-dead-letter-strategy", text("at-least-once"));
        insert(&mut args, "x-overflow", text("reject-publish"));
        if let Some(ttl) = downstream.message_ttl {
            // Validated by config: 1 ms up to u32::MAX ms.
            let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            insert(&mut args, "x-message-ttl", AMQPValue::LongLongInt(ttl));
        }
        declarer.queue(queue, args).await?;
        let exchange = self.events_exchange();
        for pattern in &downstream.bindings {
            declarer
                .bind(queue, &exchange, pattern, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    fn shard_args(&self) -> FieldTable {
        let mut args = self.quorum_args();
        insert(
            &mut args,
            "x-single-active-consumer",
            AMQPValue::Boolean(true),
        );
        let limit = i64::from(self.delivery_limit.get());
        insert(&mut args, "x-delivery-limit", AMQPValue::LongLongInt(limit));
        insert(&mut args, "x-dead-letter-exchange", text(""));
        insert(
            &mut args,
            "x-dead-letter-routing-key",
            text(&self.dead_queue()),
        );
        insert(&mut args, "x-dead-letter-strategy", text("at-least-once"));
        insert(&mut args, "x-overflow", text("reject-publish"));
        args
    }
}

/// The messages in `queues` (role, name), summed by role in the roles' first order: passive
/// declarations, no message touched; an error when one of them does not exist.
pub async fn count_messages(
    connection: &Connection,
    queues: &[(&'static str, String)],
) -> Result<Vec<(&'static str, u64)>, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut totals: Vec<(&'static str, u64)> = Vec::new();
    for (role, queue) in queues {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await?;
        let count = u64::from(declared.message_count());
        match totals.iter_mut().find(|(r, _)| r == role) {
            Some((_, total)) => *total += count,
            None => totals.push((role, count)),
        }
    }
    // Only looking; a failing close changes nothing.
    let _ = channel.close(200, "counted".into()).await;
    Ok(totals)
}

/// Declares a business service's queue exactly as the bridge of `topology` does (with its
/// `<queue>.dead`, bound to `<p>.events`, which must exist). A service declaring its own queue
/// calls this, so its arguments always equal the bridge's (RabbitMQ refuses a second
/// declaration with other arguments).
pub async fn declare_service_queue(
    connection: &Connection,
    topology: &config::Topology,
    downstream: &config::Downstream,
) -> Result<(), lapin::Error> {
    let mut declarer = Declarer::open(connection).await?;
    let topology = Topology::new(topology);
    topology
        .declare_service_queue(&mut declarer, downstream)
        .await?;
    declarer.close().await
}

fn insert(args: &mut FieldTable, key: &str, value: AMQPValue) {
    args.insert(ShortString::from(key), value);
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let config = config::Topology {
            prefix: "acme".to_owned(),
            shards: NonZeroU16::new(3).expect("non-zero"),
            ..config::Topology::default()
        };
        let topology = Topology::new(&config);
        assert_eq!(topology.inbound_exchange(), "acme.inbound");
        assert_eq!(topology.events_exchange(), "acme.events");
        assert_eq!(
            topology.queues(),
            [
                "acme.inbound.0",
                "acme.inbound.1",
                "acme.inbound.2",
                "acme.dead",
                "acme.quarantine",
                "acme.parked",
                "acme.wait.10s",
                "acme.wait.1m",
                "acme.wait.10m",
                "acme.wait.1h",
                "acme.wait.6h",
                "acme.wait.1day",
            ]
        );
        assert_eq!(Topology::shard_routing_key(2), "2");
        assert_eq!(topology.retry_exchange(), "acme.retry");
        assert_eq!(Topology::tier_name(Duration::from_secs(90)), "1m30s");
    }
}
