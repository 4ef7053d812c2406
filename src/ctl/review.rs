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
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{age, table};
use crate::amqp::{Outgoing, Publisher};
use crate::config::Config;
use crate::contract::{self, text};
use crate::form::Form;
use crate::keys::OrderKey;
use crate::store::Store;
use crate::topology::Topology;
use crate::worker::gate::RELEASE;

/// Headers the broker adds when it dead-letters an event from a downstream queue; a replay
/// gives the event back to its service without them, as it was first published.
const DEAD_LETTER_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// Messages a pass over a downstream dead-letter queue reads before it republishes them: within
/// such a chunk each key's events are put back in sequence order.
const DEAD_CHUNK: usize = 200;

/// The queues an operator reviews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// `<p>.parked`: retries exhausted; their keys are blocked.
    Parked,
    /// `<p>.quarantine`: INVALID, policy failures, unreadable.
    Quarantine,
    /// `<queue>.dead` of this `[[downstream]]` queue: events its service rejected, requeued too
    /// often, or left past `message_ttl`.
    Dead(String),
    /// `<p>.dead`: IPNs the broker gave up on after `topology.delivery_limit` deliveries (a
    /// worker died on each of them); replayed to their shards like parked ones.
    BridgeDead,
}

impl Queue {
    fn name(&self, topology: &Topology) -> String {
        match self {
            Queue::Parked => topology.parked_queue(),
            Queue::Quarantine => topology.quarantine_queue(),
            Queue::Dead(queue) => crate::config::dead_letter_queue(queue),
            Queue::BridgeDead => topology.dead_queue(),
        }
    }

    /// Messages read before any is republished.
    fn chunk(&self) -> usize {
        match self {
            // One at a time: a crash leaves at most one second copy.
            Queue::Parked | Queue::Quarantine | Queue::BridgeDead => 1,
            Queue::Dead(_) => DEAD_CHUNK,
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
    /// When the ingress received it (RFC 3339, UTC).
    pub received_at: Option<String>,
    /// When it was parked (`x-ipn-parked-at`; parked IPNs only).
    pub parked_at: Option<String>,
    /// `x-ipn-last-error`.
    pub last_error: Option<String>,
    /// A dead-lettered event's sequence number within its key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
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

impl Selection {
    /// Whether a listed message is one this selection takes.
    pub fn takes(&self, listed: &Listed) -> bool {
        match self {
            Selection::All => true,
            Selection::Key(key) => listed.order_key == *key,
            Selection::MessageId(id) => listed.message_id.as_deref() == Some(id.as_str()),
        }
    }

    /// Whether it can take more than one message (a purge of those asks for `--yes`).
    pub fn may_take_many(&self) -> bool {
        !matches!(self, Selection::MessageId(_))
    }
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
pub async fn list(config: &Config, queue: &Queue) -> anyhow::Result<Vec<Listed>> {
    let pass = pass(config, queue, &Selection::All, Take::List).await?;
    Ok(pass.listed)
}

/// Replays the selected IPNs of `queue` to their shards, in their order, with their attempts
/// reset. A parked one is its key's blocker: when it succeeds the worker releases the IPNs held
/// behind it. A quarantined one is checked again (e.g. after fixing the environment config).
/// A dead-lettered event goes back to its service's queue, as first published (same event id,
/// key and sequence), each key's events in sequence order.
pub async fn replay(config: &Config, queue: &Queue, selection: &Selection) -> anyhow::Result<Pass> {
    pass(config, queue, selection, Take::Replay).await
}

/// Deletes the selected messages of `queue` for good.
pub async fn purge(config: &Config, queue: &Queue, selection: &Selection) -> anyhow::Result<Pass> {
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
        purge(config, &Queue::Parked, &selection).await?;
    }
    let topology = Topology::of(config);
    let publisher = publisher(config).await?;
    let mut headers = FieldTable::default();
    headers.insert(contract::CONTROL.into(), text(RELEASE));
    headers.insert(contract::ORDER_KEY.into(), text(key));
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
    queue: &Queue,
    selection: &Selection,
    take: Take,
) -> anyhow::Result<Pass> {
    let topology = Topology::of(config);
    let publisher = publisher(config).await?;
    let connection = super::connect(config).await?;
    let walk = Walk {
        config,
        topology: &topology,
        publisher: &publisher,
        name: queue.name(&topology),
        queue,
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
    queue: &'a Queue,
    /// The queue's name.
    name: String,
}

/// One message read in a pass, and whether the pass takes it.
struct Read {
    delivery: lapin::message::Delivery,
    key: OrderKey,
    taken: bool,
}

impl Walk<'_> {
    async fn run(
        &self,
        connection: &Connection,
        selection: &Selection,
        take: Take,
    ) -> anyhow::Result<Pass> {
        let channel = connection.create_channel().await?;
        let count = queued(&channel, &self.name).await?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let mut pass = Pass::default();
        let mut done = 0;
        let started = std::time::Instant::now();
        while done < count {
            let want = self.queue.chunk().min(count - done);
            let chunk = self.read(&channel, want, selection, take).await?;
            let Some(last) = chunk.last() else {
                break; // someone else emptied it meanwhile
            };
            let last_tag = last.delivery.delivery_tag;
            for &index in &in_key_order(&chunk) {
                let read = &chunk[index];
                if take == Take::List {
                    pass.listed.push(self.listed(&read.delivery, &read.key));
                }
                self.move_one(&read.delivery, &read.key, read.taken, take)
                    .await?;
                if read.taken {
                    pass.taken += 1
                } else {
                    pass.kept += 1
                }
            }
            // Only once every message of the chunk is republished (and confirmed).
            let multiple = BasicAckOptions { multiple: true };
            channel
                .basic_ack(last_tag, multiple)
                .await
                .context("cannot acknowledge the messages moved")?;
            let before = done;
            done += chunk.len();
            if done / 1000 > before / 1000 {
                eprintln!(
                    "ipnctl: {done} of {count} messages of {} done ({})",
                    self.name,
                    super::rate(done, started)
                );
            }
            if chunk.len() < want {
                break;
            }
        }
        Ok(pass)
    }

    /// Up to `want` messages, unacked, in queue order.
    async fn read(
        &self,
        channel: &Channel,
        want: usize,
        selection: &Selection,
        take: Take,
    ) -> anyhow::Result<Vec<Read>> {
        let mut chunk = Vec::with_capacity(want);
        for _ in 0..want {
            let options = BasicGetOptions { no_ack: false };
            let got = channel
                .basic_get(self.name.as_str().into(), options)
                .await?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let key = contract::key_of(&delivery.properties, &delivery.data);
            let taken = take != Take::List && selected(selection, &delivery.properties, &key);
            chunk.push(Read {
                delivery,
                key,
                taken,
            });
        }
        Ok(chunk)
    }

    fn listed(&self, delivery: &lapin::message::Delivery, key: &OrderKey) -> Listed {
        match self.queue {
            Queue::Dead(_) => listed_event(&delivery.properties, &delivery.data, key),
            Queue::Parked | Queue::Quarantine | Queue::BridgeDead => {
                listed(&delivery.properties, &delivery.data, key)
            }
        }
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
        let (exchange, routing_key, properties) = match (taken, take, self.queue) {
            (true, Take::Purge, _) => return Ok(()),
            (true, _, Queue::Dead(service)) => (
                "",
                service.as_str(),
                contract::without(
                    &delivery.properties,
                    &DEAD_LETTER_HEADERS,
                    contract::REPLAYED_AT,
                ),
            ),
            (true, _, _) => (
                inbound.as_str(),
                shard.as_str(),
                contract::replayed(&delivery.properties),
            ),
            (false, _, _) => ("", self.name.as_str(), delivery.properties.clone()),
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

/// The order to republish a chunk in: queue order, except that the taken messages of each key
/// that carry `x-ipn-sequence` (events) are put in sequence order among the places they hold.
fn in_key_order(chunk: &[Read]) -> Vec<usize> {
    let items: Vec<(&str, Option<i64>)> = chunk
        .iter()
        .map(|read| {
            let sequence = sequence(&read.delivery.properties).filter(|_| read.taken);
            (read.key.as_str(), sequence)
        })
        .collect();
    reordered(&items)
}

/// Indices of `items` (key, sequence) in queue order, with the items that have a sequence
/// sorted by it within each key, each key keeping the places its items held.
fn reordered(items: &[(&str, Option<i64>)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    let mut by_key: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (index, (key, sequence)) in items.iter().enumerate() {
        if sequence.is_some() {
            by_key.entry(key).or_default().push(index);
        }
    }
    for places in by_key.values() {
        let mut sorted = places.clone();
        sorted.sort_by_key(|&i| items[i].1);
        for (place, index) in places.iter().zip(sorted) {
            order[*place] = index;
        }
    }
    order
}

fn sequence(properties: &BasicProperties) -> Option<i64> {
    contract::integer(properties, contract::SEQUENCE)
}

/// A dead-lettered event as a listing shows it: its id, key, sequence, txn and why the broker
/// dead-lettered it (`rejected`, `delivery_limit`, `expired`).
fn listed_event(properties: &BasicProperties, body: &[u8], key: &OrderKey) -> Listed {
    let header = |name| contract::header_text(properties, name);
    let event: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| event[name].as_str().map(crate::bounded::shown);
    let received = field("received_at").and_then(|t| humantime::parse_rfc3339(&t).ok());
    let deliveries = contract::integer(properties, "x-delivery-count").unwrap_or(0);
    Listed {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        order_key: key.to_string(),
        txn_type: field("txn_type"),
        txn_id: field("txn_id"),
        reason: header("x-first-death-reason"),
        attempts: deliveries,
        age_seconds: received.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
        received_at: received.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        parked_at: None,
        last_error: None,
        sequence: sequence(properties),
    }
}

fn listed(properties: &BasicProperties, body: &[u8], key: &OrderKey) -> Listed {
    let header = |name| contract::header_text(properties, name);
    let form = Form::parse(body);
    let received = header(contract::RECEIVED_AT).and_then(|t| humantime::parse_rfc3339(&t).ok());
    let attempts = contract::attempt(properties);
    Listed {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        order_key: key.to_string(),
        txn_type: form.text("txn_type").map(|t| crate::bounded::shown(&t)),
        txn_id: form.text("txn_id").map(|t| crate::bounded::shown(&t)),
        // Dead-lettered by the broker: its reason (`delivery_limit`) instead of ours.
        reason: header(contract::REASON).or_else(|| header("x-first-death-reason")),
        attempts,
        age_seconds: received.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
        received_at: received.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        parked_at: header(contract::PARKED_AT),
        last_error: header(contract::LAST_ERROR),
        sequence: None,
    }
}

/// A publisher that declares nothing: a review only moves messages between queues that exist.
async fn publisher(config: &Config) -> anyhow::Result<Publisher> {
    let publisher = Publisher::start_undeclared(&config.amqp, "ipnctl-publish");
    if !publisher.wait_connected(config.amqp.connect_timeout).await {
        publisher.close().await;
        bail!("cannot connect to {}", config.amqp.shown());
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

/// A listing as a readable table, one message per line.
pub fn listed_table(listed: &[Listed]) -> String {
    let head = [
        "KEY",
        "TXN_TYPE",
        "TXN_ID",
        "REASON",
        "ATTEMPTS",
        "AGE",
        "MESSAGE_ID",
    ];
    table(&head, listed.iter().map(|m| row(m, false)).collect())
}

/// A dead-letter queue's events as a readable table, one per line: the listing with each
/// event's sequence, its redeliveries in the attempts column and its event id as message id.
pub fn dead_table(listed: &[Listed]) -> String {
    let head = [
        "KEY",
        "SEQ",
        "TXN_TYPE",
        "TXN_ID",
        "REASON",
        "REDELIVERED",
        "AGE",
        "EVENT_ID",
    ];
    table(&head, listed.iter().map(|m| row(m, true)).collect())
}

/// One listed message's cells, with its sequence after the key when `sequence`.
fn row(m: &Listed, sequence: bool) -> Vec<String> {
    let mut cells = vec![m.order_key.clone()];
    if sequence {
        cells.push(m.sequence.map(|s| s.to_string()).unwrap_or_default());
    }
    cells.extend([
        m.txn_type.clone().unwrap_or_default(),
        m.txn_id.clone().unwrap_or_default(),
        m.reason.clone().unwrap_or_default(),
        m.attempts.to_string(),
        m.age_seconds.map(age).unwrap_or_default(),
        m.message_id.clone().unwrap_or_default(),
    ]);
    cells
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
    fn each_keys_events_are_put_back_in_sequence_order_in_the_places_they_held() {
        let items = [
            ("b", Some(2)),
            ("a", Some(3)),
            ("x", None),
            ("b", Some(1)),
            ("a", Some(1)),
            ("a", Some(2)),
        ];
        let order = reordered(&items);
        let keys: Vec<(&str, Option<i64>)> = order.iter().map(|&i| items[i]).collect();
        assert_eq!(
            keys,
            [
                ("b", Some(1)),
                ("a", Some(1)),
                ("x", None),
                ("b", Some(2)),
                ("a", Some(2)),
                ("a", Some(3)),
            ]
        );
    }
}
