//! Parked IPNs and blocked keys, for the operator: replay parked IPNs to their shards, release a
//! key by skipping its blocker.
//!
//! Keeps the parked queue's order: an operation reads exactly the messages the queue held when it
//! began, one `basic.get` at a time (a consumer could be sent more, and those would go back to
//! the *back* of a quorum queue without a delivery limit), republishes each (with confirm) to
//! where it goes (its shard, or the back of `<p>.parked` when it stays), and only then acks it.
//! The messages left behind therefore end in their original order; a crash mid-way leaves at most
//! a second copy of one message (the store's dedup makes it a duplicate), never a lost one.

use anyhow::{Context, bail};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};

use crate::amqp::{Outgoing, Publisher};
use crate::config::Config;
use crate::ipn::{Form, OrderKey, PayPal};
use crate::store::Store;
use crate::topology::Topology;
use crate::worker::gate::RELEASE;

/// Headers the worker adds on the way to a tier or `<p>.parked`; a replay starts the IPN afresh
/// without them (`x-ipn-attempt` back to 0).
const RETRY_HEADERS: [&str; 6] = [
    "x-ipn-first-failure",
    "x-ipn-last-error",
    "x-ipn-reason",
    "x-ipn-parked-at",
    "x-ipn-tier",
    "x-death",
];

/// Which parked IPNs an operation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every one.
    All,
    /// Those of one order key, e.g. `profile:I-7PX4WQ2N9KD3`.
    Key(String),
    /// The one with this message id.
    MessageId(String),
}

/// What a pass over `<p>.parked` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Messages taken (replayed or purged).
    pub taken: usize,
    /// Messages left in `<p>.parked`, in their order.
    pub kept: usize,
}

/// What to do with the messages a pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Back to their shard, attempts reset.
    Replay,
    /// Gone.
    Purge,
}

/// Replays the selected parked IPNs to their shards, in their parked order, with their
/// attempts reset; the worker takes each as its key's blocker and, when it succeeds, releases
/// the IPNs held behind it.
pub async fn replay(config: &Config, selection: &Selection) -> anyhow::Result<Pass> {
    pass(config, selection, Take::Replay).await
}

/// Deletes the selected parked IPNs for good.
pub async fn purge(config: &Config, selection: &Selection) -> anyhow::Result<Pass> {
    pass(config, selection, Take::Purge).await
}

/// Releases `key`: the worker processes the IPNs held behind its blocker, in order, and
/// unblocks it. The blocker is skipped: with `purge_blocker` it is deleted from `<p>.parked`,
/// otherwise it stays there (a later replay publishes it after the released ones). Returns
/// whether the key was blocked.
pub async fn release(config: &Config, key: &str, purge_blocker: bool) -> anyhow::Result<bool> {
    let store = Store::connect(&config.database)
        .await
        .context("cannot connect to the worker's database")?;
    let blocked = store.blocked(key).await.context("cannot read the key")?;
    store.close().await;
    let Some(blocked) = blocked else {
        return Ok(false);
    };
    if purge_blocker && blocked.parked {
        purge(config, &Selection::MessageId(blocked.blocker_id)).await?;
    }
    let topology = Topology::of(config);
    let publisher = publisher(config, &topology).await?;
    let mut headers = FieldTable::default();
    headers.insert("x-ipn-control".into(), text(RELEASE));
    headers.insert("x-ipn-order-key".into(), text(key));
    let shard = OrderKey::from_header(key).shard(topology.shards());
    let message = Outgoing {
        exchange: &topology.inbound_exchange(),
        routing_key: &Topology::shard_routing_key(shard),
        body: b"",
        properties: BasicProperties::default().with_headers(headers),
    };
    let sent = publisher
        .publish(message, config.worker.confirm_timeout)
        .await;
    publisher.close().await;
    sent.context("cannot send the release to the key's shard")?;
    Ok(true)
}

async fn pass(config: &Config, selection: &Selection, take: Take) -> anyhow::Result<Pass> {
    let topology = Topology::of(config);
    let publisher = publisher(config, &topology).await?;
    let connection = crate::amqp::connect(&config.amqp, "ipnctl")
        .await
        .with_context(|| format!("cannot connect to {}", config.amqp.url))?;
    let result = walk(config, &topology, &publisher, &connection, selection, take).await;
    let _ = connection.close(200, "done".into()).await;
    publisher.close().await;
    result
}

async fn walk(
    config: &Config,
    topology: &Topology,
    publisher: &Publisher,
    connection: &Connection,
    selection: &Selection,
    take: Take,
) -> anyhow::Result<Pass> {
    let channel = connection.create_channel().await?;
    let queue = topology.parked_queue();
    let count = queued(&channel, &queue).await?;
    let mut pass = Pass::default();
    for done in 0..count {
        let options = BasicGetOptions { no_ack: false };
        let Some(message) = channel.basic_get(queue.as_str().into(), options).await? else {
            break; // someone else emptied it meanwhile
        };
        let delivery = message.delivery;
        let key = order_key(&delivery.properties, &delivery.data);
        let taken = selected(selection, &delivery.properties, &key);
        let timeout = config.worker.confirm_timeout;
        match (taken, take) {
            (true, Take::Purge) => {}
            (true, Take::Replay) => {
                let routing_key = Topology::shard_routing_key(key.shard(topology.shards()));
                let message = Outgoing {
                    exchange: &topology.inbound_exchange(),
                    routing_key: &routing_key,
                    body: &delivery.data,
                    properties: replayed(&delivery.properties),
                };
                publisher.publish(message, timeout).await?;
            }
            (false, _) => {
                let message = Outgoing {
                    exchange: "",
                    routing_key: &queue,
                    body: &delivery.data,
                    properties: delivery.properties.clone(),
                };
                publisher.publish(message, timeout).await?;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        if taken {
            pass.taken += 1
        } else {
            pass.kept += 1
        }
        if (done + 1) % 1000 == 0 {
            eprintln!("ipnctl: {} of {count} parked messages done", done + 1);
        }
    }
    Ok(pass)
}

async fn publisher(config: &Config, topology: &Topology) -> anyhow::Result<Publisher> {
    let publisher = Publisher::start(&config.amqp, topology.clone(), "ipnctl-publish");
    if !publisher.wait_connected(config.amqp.connect_timeout).await {
        publisher.close().await;
        bail!("cannot connect to {}", config.amqp.url);
    }
    Ok(publisher)
}

async fn queued(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} does not exist: run `ipnctl topology declare`"))?;
    Ok(declared.message_count())
}

fn selected(selection: &Selection, properties: &BasicProperties, key: &OrderKey) -> bool {
    match selection {
        Selection::All => true,
        Selection::Key(wanted) => key.as_str() == wanted,
        Selection::MessageId(wanted) => properties
            .message_id()
            .as_ref()
            .is_some_and(|id| id.as_str() == wanted),
    }
}

fn order_key(properties: &BasicProperties, body: &[u8]) -> OrderKey {
    match crate::worker::pipeline::header_text(properties, "x-ipn-order-key") {
        Some(key) => OrderKey::from_header(&key),
        None => PayPal::order_key_of(&Form::parse(body), body),
    }
}

/// The properties of a replayed IPN: the same, with the retry headers gone, attempts at 0 and
/// `x-ipn-replayed-at` set.
fn replayed(properties: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !RETRY_HEADERS.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers.insert("x-ipn-attempt".into(), AMQPValue::LongLongInt(0));
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    headers.insert("x-ipn-replayed-at".into(), text(&now));
    properties.clone().with_headers(headers)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
