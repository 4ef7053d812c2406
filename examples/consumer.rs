//! A business service consuming ipn-bridge events: the pattern to copy.
//!
//! ```sh
//! cargo run --example consumer -- --queue billing --bind 'paypal.subscription.#' --bind '*.refund.#'
//! ```
//! It declares its queue exactly as the bridge declares a `[[downstream]]` queue (durable quorum,
//! a delivery limit, and `<queue>.dead` for what it cannot take), binds it to `<prefix>.events`,
//! and for each event:
//! 1. skips it if its `event_id` was applied before (ipn-bridge publishes at least once: after a
//!    crash at the wrong moment an event can arrive twice, always with the same id and number;
//!    `ipnctl downstream dead replay` and `ipnctl events redeliver` send the same id again too);
//! 2. skips it if its `sequence` is not above the last one applied for its `order_key` (events of
//!    one key arrive in order; a lower number is an old copy);
//! 3. applies it (here: prints one line), then records the id and the number, then acks.
//!
//! An event it cannot apply (unreadable, or refused by the business rules) is *rejected* without
//! requeue: the broker moves it to `<queue>.dead`, the bridge alerts, and an operator replays it
//! after the fix. It never requeues in a loop (the delivery limit would dead-letter it anyway):
//! when its own database is down it stops consuming and comes back later, so the unacked events
//! return to the queue in order.
//!
//! A real service keeps step 3's record in its own database, in the same transaction as the
//! business change, so a crash between applying and acking cannot apply an event twice. This
//! example keeps it in memory to stay short. With a binding to a subset of routing keys, a key's
//! numbers have gaps (the events of other types went elsewhere); bind `#` to see every one.

use std::collections::{HashMap, HashSet};

use clap::Parser;
use futures_util::StreamExt;
use ipn_bridge::config::Downstream;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;

#[derive(Parser)]
struct Args {
    /// Broker.
    #[arg(
        long,
        env = "IPN_AMQP__URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
    /// ipn-bridge's topology prefix.
    #[arg(long, env = "IPN_TOPOLOGY__PREFIX", default_value = "ipn")]
    prefix: String,
    /// This service's queue.
    #[arg(long, default_value = "example.events")]
    queue: String,
    /// Routing-key patterns (`<provider>.<kind>.<type>.<status>`); default every event.
    #[arg(long = "bind", default_values_t = vec!["#".to_owned()])]
    bindings: Vec<String>,
    /// Returns of one event before the broker dead-letters it; must equal the bridge's
    /// `delivery_limit` when the queue is also a `[[downstream]]` entry.
    #[arg(long, default_value_t = 20)]
    delivery_limit: u16,
    /// Stop after this many events (for demos and tests); default never.
    #[arg(long)]
    max: Option<u64>,
}

/// The fields of an event this service reads (docs/events.md has them all).
#[derive(Debug, Deserialize)]
struct Event {
    event_id: String,
    order_key: String,
    sequence: i64,
    txn_type: Option<String>,
    payment_status: Option<String>,
    txn_id: Option<String>,
}

/// What to do with an event.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Apply,
    /// Applied before (same id).
    Duplicate,
    /// Older than what was applied for its key.
    Stale,
}

/// What this service has applied; keep it in your database in real life.
#[derive(Default)]
struct Applied {
    ids: HashSet<String>,
    last: HashMap<String, i64>,
}

impl Applied {
    fn decide(&self, event: &Event) -> Decision {
        if self.ids.contains(&event.event_id) {
            Decision::Duplicate
        } else if self
            .last
            .get(&event.order_key)
            .is_some_and(|&n| event.sequence <= n)
        {
            Decision::Stale
        } else {
            Decision::Apply
        }
    }

    fn record(&mut self, event: &Event) {
        self.ids.insert(event.event_id.clone());
        self.last.insert(event.order_key.clone(), event.sequence);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let bindings: Vec<&str> = args.bindings.iter().map(String::as_str).collect();
    let mut queue = Downstream::new(&args.queue, &bindings);
    queue.delivery_limit = std::num::NonZeroU16::new(args.delivery_limit)
        .ok_or_else(|| anyhow::anyhow!("--delivery-limit must be above zero"))?;
    let topology = ipn_bridge::config::Topology {
        prefix: args.prefix.clone(),
        ..ipn_bridge::config::Topology::default()
    };
    ipn_bridge::topology::declare_service_queue(&connection, &topology, &queue).await?;
    // One consumer, in order: a key's events must be applied one after another.
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "example-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut applied = Applied::default();
    let mut seen = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<Event>(&delivery.data) {
            Ok(event) => match applied.decide(&event) {
                Decision::Apply => {
                    println!(
                        "{} #{} {}.{} txn {}",
                        event.order_key,
                        event.sequence,
                        event.txn_type.as_deref().unwrap_or("none"),
                        event.payment_status.as_deref().unwrap_or("none"),
                        event.txn_id.as_deref().unwrap_or("-"),
                    );
                    applied.record(&event);
                }
                skipped => eprintln!("skipped {} ({skipped:?})", event.event_id),
            },
            // Not an event we understand: reject it (no requeue) so the broker moves it to
            // <queue>.dead for a human, and the events behind it go on.
            Err(error) => {
                eprintln!("unreadable event rejected to {}.dead: {error}", args.queue);
                let reject = BasicRejectOptions { requeue: false };
                delivery.acker.reject(reject).await?;
                continue;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        seen += 1;
        if args.max.is_some_and(|max| seen >= max) {
            break;
        }
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, key: &str, sequence: i64) -> Event {
        Event {
            event_id: id.to_owned(),
            order_key: key.to_owned(),
            sequence,
            txn_type: None,
            payment_status: None,
            txn_id: None,
        }
    }

    #[test]
    fn an_event_is_applied_once_and_never_after_a_newer_one_of_its_key() {
        let mut applied = Applied::default();
        let first = event("a", "profile:I-1", 1);
        assert_eq!(applied.decide(&first), Decision::Apply);
        applied.record(&first);
        assert_eq!(applied.decide(&first), Decision::Duplicate);
        let third = event("c", "profile:I-1", 3);
        assert_eq!(
            applied.decide(&third),
            Decision::Apply,
            "gaps are other event types"
        );
        applied.record(&third);
        assert_eq!(
            applied.decide(&event("b", "profile:I-1", 2)),
            Decision::Stale
        );
        assert_eq!(
            applied.decide(&event("d", "profile:I-2", 1)),
            Decision::Apply
        );
    }
}
