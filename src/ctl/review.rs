//! What needs a human, for the operator: list, replay or purge parked and quarantined IPNs, list
//! blocked keys, release a key by skipping its blocker.
//!
//! Keeps the order of `<p>.parked` and `<p>.quarantine`: a pass (listing included) reads exactly
//! the messages the queue held when it began, one `basic.get` at a time (a consumer could be
//! sent more, and those would go back to the *back* of a quorum queue without a delivery limit),
//! republishes each (with confirm) to where it goes (its shard, or the back of its queue when it
//! stays), and only then acks it. The messages left behind therefore end in their original
//! order; a crash mid-way leaves at most a second copy of one message (the store's dedup makes a
//! replayed copy a duplicate), never a lost one.

use anyhow::{Context, bail};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};

use super::{age, table};
use crate::amqp::{Outgoing, Publisher};
use crate::config::Config;
use crate::ipn::{Form, OrderKey, PayPal};
use crate::store::Store;
use crate::topology::Topology;
use crate::worker::gate::RELEASE;

/// Headers the worker adds on the way to a tier, `<p>.parked` or `<p>.quarantine`; a replay
/// starts the IPN afresh without them (`x-ipn-attempt` back to 0).
const RETRY_HEADERS: [&str; 6] = [
    "x-ipn-first-failure",
    "x-ipn-last-error",
    "x-ipn-reason",
    "x-ipn-parked-at",
    "x-ipn-tier",
    "x-death",
];

/// The queues an operator reviews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// `<p>.parked`: retries exhausted; their keys are blocked.
    Parked,
    /// `<p>.quarantine`: INVALID, policy failures, unreadable.
    Quarantine,
}

impl Queue {
    fn name(self, topology: &Topology) -> String {
        match self {
            Queue::Parked => topology.parked_queue(),
            Queue::Quarantine => topology.quarantine_queue(),
        }
    }
}

/// One message as a listing shows it; no personal data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// Its message id (what `--id` selects).
    pub message_id: Option<String>,
    /// Its order key.
    pub order_key: String,
    /// `txn_type`.
    pub txn_type: Option<String>,
    /// `txn_id`.
    pub txn_id: Option<String>,
    /// `x-ipn-reason`.
    pub reason: Option<String>,
    /// `x-ipn-attempt`.
    pub attempts: i64,
    /// Seconds since the ingress received it.
    pub age_seconds: Option<u64>,
    /// `x-ipn-last-error`.
    pub last_error: Option<String>,
}

/// Which messages an operation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every one.
    All,
    /// Those of one order key, e.g. `profile:I-7PX4WQ2N9KD3`.
    Key(String),
    /// The one with this message id.
    MessageId(String),
}

/// What a pass over a queue did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Messages taken (replayed or purged).
    pub taken: usize,
    /// Messages left in the queue, in their order.
    pub kept: usize,
    /// With [`list`]: every message seen, in queue order.
    pub listed: Vec<Listed>,
}

/// What to do with the messages a pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Back to their shard, attempts reset.
    Replay,
    /// Gone.
    Purge,
    /// Nothing: every message stays, and is listed.
    List,
}

/// Lists the messages of `queue` in order, leaving them as they were.
pub async fn list(config: &Config, queue: Queue) -> anyhow::Result<Vec<Listed>> {
    let pass = pass(config, queue, &Selection::All, Take::List).await?;
    Ok(pass.listed)
}

/// Replays the selected IPNs of `queue` to their shards, in their order, with their attempts
/// reset. A parked one is its key's blocker: when it succeeds the worker releases the IPNs held
/// behind it. A quarantined one is checked again (e.g. after fixing the environment config).
pub async fn replay(config: &Config, queue: Queue, selection: &Selection) -> anyhow::Result<Pass> {
    pass(config, queue, selection, Take::Replay).await
}

/// Deletes the selected IPNs of `queue` for good.
pub async fn purge(config: &Config, queue: Queue, selection: &Selection) -> anyhow::Result<Pass> {
    pass(config, queue, selection, Take::Purge).await
}

/// A blocked key, with how many IPNs it holds back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlockedKey {
    /// The key.
    pub order_key: String,
    /// `waiting` (in a delay tier) or `parked`.
    pub state: String,
    /// Message id of its blocker.
    pub blocker_id: String,
    /// The blocker's `txn_id`.
    pub txn_id: Option<String>,
    /// Failed attempts of the blocker.
    pub attempts: i64,
    /// IPNs held behind it.
    pub held: i64,
    /// Seconds since the key was blocked.
    pub blocked_seconds: u64,
    /// The blocker's last error.
    pub last_error: String,
}

/// Every blocked key, oldest first.
pub async fn blocked_keys(config: &Config) -> anyhow::Result<Vec<BlockedKey>> {
    let store = Store::connect_existing(&config.database)
        .await
        .context("cannot connect to the worker's database")?;
    let rows = store
        .blocked_keys()
        .await
        .context("cannot read the blocked keys");
    store.close().await;
    Ok(rows?
        .into_iter()
        .map(|row| BlockedKey {
            order_key: row.order_key,
            state: if row.parked { "parked" } else { "waiting" }.to_owned(),
            blocker_id: row.blocker_id,
            txn_id: row.txn_id,
            attempts: row.attempts,
            held: row.held,
            blocked_seconds: row.blocked_seconds,
            last_error: row.last_error,
        })
        .collect())
}

/// Releases `key`: the worker processes the IPNs held behind its blocker, in order, and
/// unblocks it. The blocker is skipped: with `purge_blocker` it is deleted from `<p>.parked`,
/// otherwise it stays there (a later replay publishes it after the released ones). Returns
/// whether the key was blocked.
pub async fn release(config: &Config, key: &str, purge_blocker: bool) -> anyhow::Result<bool> {
    let store = Store::connect_existing(&config.database)
        .await
        .context("cannot connect to the worker's database")?;
    let blocked = store.blocked(key).await.context("cannot read the key")?;
    store.close().await;
    let Some(blocked) = blocked else {
        return Ok(false);
    };
    if purge_blocker && blocked.parked {
        let selection = Selection::MessageId(blocked.blocker_id);
        purge(config, Queue::Parked, &selection).await?;
    }
    let topology = Topology::of(config);
    let publisher = publisher(config).await?;
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

async fn pass(
    config: &Config,
    queue: Queue,
    selection: &Selection,
    take: Take,
) -> anyhow::Result<Pass> {
    let topology = Topology::of(config);
    let publisher = publisher(config).await?;
    let connection = crate::amqp::connect(&config.amqp, "ipnctl")
        .await
        .with_context(|| format!("cannot connect to {}", config.amqp.url))?;
    let walk = Walk {
        config,
        topology: &topology,
        publisher: &publisher,
        queue: queue.name(&topology),
    };
    let result = walk.run(&connection, selection, take).await;
    let _ = connection.close(200, "done".into()).await;
    publisher.close().await;
    result
}

/// One pass over one queue.
struct Walk<'a> {
    config: &'a Config,
    topology: &'a Topology,
    publisher: &'a Publisher,
    queue: String,
}

impl Walk<'_> {
    async fn run(
        &self,
        connection: &Connection,
        selection: &Selection,
        take: Take,
    ) -> anyhow::Result<Pass> {
        let channel = connection.create_channel().await?;
        let count = queued(&channel, &self.queue).await?;
        let mut pass = Pass::default();
        for done in 0..count {
            let options = BasicGetOptions { no_ack: false };
            let got = channel
                .basic_get(self.queue.as_str().into(), options)
                .await?;
            let Some(message) = got else {
                break; // someone else emptied it meanwhile
            };
            let delivery = message.delivery;
            let key = order_key(&delivery.properties, &delivery.data);
            let taken = take != Take::List && selected(selection, &delivery.properties, &key);
            if take == Take::List {
                pass.listed
                    .push(listed(&delivery.properties, &delivery.data, &key));
            }
            self.move_one(&delivery, &key, taken, take).await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            if taken {
                pass.taken += 1
            } else {
                pass.kept += 1
            }
            if (done + 1) % 1000 == 0 {
                eprintln!(
                    "ipnctl: {} of {count} messages of {} done",
                    done + 1,
                    self.queue
                );
            }
        }
        Ok(pass)
    }

    /// Republishes one message where it goes (nowhere when purged), with confirm.
    async fn move_one(
        &self,
        delivery: &lapin::message::Delivery,
        key: &OrderKey,
        taken: bool,
        take: Take,
    ) -> anyhow::Result<()> {
        let shard = Topology::shard_routing_key(key.shard(self.topology.shards()));
        let inbound = self.topology.inbound_exchange();
        let (exchange, routing_key, properties) = match (taken, take) {
            (true, Take::Purge) => return Ok(()),
            (true, _) => (
                inbound.as_str(),
                shard.as_str(),
                replayed(&delivery.properties),
            ),
            (false, _) => ("", self.queue.as_str(), delivery.properties.clone()),
        };
        let message = Outgoing {
            exchange,
            routing_key,
            body: &delivery.data,
            properties,
        };
        let timeout = self.config.worker.confirm_timeout;
        self.publisher.publish(message, timeout).await?;
        Ok(())
    }
}

fn listed(properties: &BasicProperties, body: &[u8], key: &OrderKey) -> Listed {
    let header = |name| crate::worker::pipeline::header_text(properties, name);
    let form = Form::parse(body);
    let received = header("x-ipn-received-at").and_then(|t| humantime::parse_rfc3339(&t).ok());
    let attempts = match crate::worker::pipeline::header(properties, "x-ipn-attempt") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        _ => 0,
    };
    Listed {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        order_key: key.to_string(),
        txn_type: form.text("txn_type").map(|t| crate::bounded::shown(&t)),
        txn_id: form.text("txn_id").map(|t| crate::bounded::shown(&t)),
        reason: header("x-ipn-reason"),
        attempts,
        age_seconds: received.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
        last_error: header("x-ipn-last-error"),
    }
}

/// A publisher that declares nothing: a review only moves messages between queues that exist.
async fn publisher(config: &Config) -> anyhow::Result<Publisher> {
    let publisher = Publisher::start_undeclared(&config.amqp, "ipnctl-publish");
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

/// A listing as a readable table, one message per line.
pub fn listed_table(listed: &[Listed]) -> String {
    let rows = listed
        .iter()
        .map(|m| {
            vec![
                m.order_key.clone(),
                m.txn_type.clone().unwrap_or_default(),
                m.txn_id.clone().unwrap_or_default(),
                m.reason.clone().unwrap_or_default(),
                m.attempts.to_string(),
                m.age_seconds.map(age).unwrap_or_default(),
                m.message_id.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let head = [
        "KEY",
        "TXN_TYPE",
        "TXN_ID",
        "REASON",
        "ATTEMPTS",
        "AGE",
        "MESSAGE_ID",
    ];
    table(&head, rows)
}

/// Blocked keys as a readable table.
pub fn blocked_table(keys: &[BlockedKey]) -> String {
    let rows = keys
        .iter()
        .map(|k| {
            vec![
                k.order_key.clone(),
                k.state.clone(),
                k.held.to_string(),
                k.attempts.to_string(),
                age(k.blocked_seconds),
                k.txn_id.clone().unwrap_or_default(),
                k.blocker_id.clone(),
            ]
        })
        .collect();
    let head = [
        "KEY",
        "STATE",
        "HELD",
        "ATTEMPTS",
        "BLOCKED FOR",
        "TXN_ID",
        "BLOCKER",
    ];
    table(&head, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_starts_afresh_without_the_retry_headers() {
        let mut headers = FieldTable::default();
        headers.insert("x-ipn-order-key".into(), text("profile:I-1"));
        headers.insert("x-ipn-attempt".into(), AMQPValue::LongLongInt(4));
        for name in RETRY_HEADERS {
            headers.insert(name.into(), text("x"));
        }
        let properties = replayed(&BasicProperties::default().with_headers(headers));
        let headers = properties.headers().clone().expect("headers");
        let headers = headers.inner();
        assert_eq!(headers["x-ipn-attempt"], AMQPValue::LongLongInt(0));
        assert_eq!(headers["x-ipn-order-key"], text("profile:I-1"));
        assert!(headers.contains_key("x-ipn-replayed-at"));
        assert!(
            RETRY_HEADERS
                .iter()
                .all(|name| !headers.contains_key(*name))
        );
    }
}
