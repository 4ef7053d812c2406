//! The events a run's downstream queue receives, read back and checked: each IPN answered 200
//! yields exactly one event, and each key's sequence numbers run 1..n.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use tokio::sync::{Mutex, mpsc};

use super::histogram;

/// One event as the downstream consumer saw it.
pub struct Arrival {
    pub at: SystemTime,
    pub order_key: String,
    pub sequence: i64,
    /// The `bench_seq` of the IPN (its `txn_id` is `B<seq>`, whatever the provider).
    pub seq: u64,
    pub received_at: Option<SystemTime>,
    /// The event's size: body bytes (JSON) and content-header frame bytes (its properties).
    pub bytes: (usize, usize),
}

/// The relay phases' order keys start with this (`relay:<bench_seq>`); the worker's never do.
pub const RELAY_KEY_PREFIX: &str = "relay:";

/// What the downstream consumer saw across phases.
#[derive(Default)]
pub struct Ledger {
    /// A relay phase's ledger: it counts only the relay's events (order keys starting with
    /// [`RELAY_KEY_PREFIX`]); any other ledger counts only the others. The relay's events for
    /// the same `bench_seq` must never stand in for the worker's.
    pub relayed: bool,
    /// Events of the other kind that arrived while this ledger's phase ran (skipped).
    pub strays: u64,
    pub events: u64,
    pub duplicates: u64,
    pub sequence_errors: u64,
    pub last_sequence: HashMap<String, i64>,
}

/// One phase's events at the downstream queue.
pub struct Drained {
    pub events: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// Body and content-header bytes of all its events.
    pub bytes: (usize, usize),
}

impl Drained {
    pub fn rate(&self) -> f64 {
        self.events.saturating_sub(1) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean body and content-header bytes per event.
    pub fn mean_bytes(&self) -> (usize, usize) {
        let n = usize::try_from(self.events.max(1)).unwrap_or(usize::MAX);
        (self.bytes.0 / n, self.bytes.1 / n)
    }

    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Takes events until every IPN in `accepted` has one (each found one leaves the set); the rate
/// runs from the first event to the last.
pub async fn take_events(
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    accepted: &Mutex<HashSet<u64>>,
    ledger: &mut Ledger,
) -> anyhow::Result<Drained> {
    let mut latency = histogram();
    let (mut first, mut last, mut events) = (None, None, 0);
    let mut bytes = (0, 0);
    while !accepted.lock().await.is_empty() {
        let arrival = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .context("no event for 60 s")?
            .context("downstream consumer ended")?;
        if arrival.order_key.starts_with(RELAY_KEY_PREFIX) != ledger.relayed {
            ledger.strays += 1;
            continue;
        }
        if !accepted.lock().await.remove(&arrival.seq) {
            ledger.duplicates += 1;
            continue;
        }
        let previous = ledger
            .last_sequence
            .insert(arrival.order_key.clone(), arrival.sequence);
        if arrival.sequence != previous.unwrap_or(0) + 1 {
            ledger.sequence_errors += 1;
        }
        if let Some(received) = arrival.received_at {
            let waited = arrival.at.duration_since(received).unwrap_or_default();
            latency.saturating_record(waited.as_micros().max(1) as u64);
        }
        first.get_or_insert(arrival.at);
        last = Some(arrival.at);
        events += 1;
        bytes = (bytes.0 + arrival.bytes.0, bytes.1 + arrival.bytes.1);
        ledger.events += 1;
    }
    let elapsed = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    Ok(Drained {
        events,
        elapsed,
        latency,
        bytes,
    })
}

/// Consumes the downstream queue (no ack: the bench is its only reader) into a channel.
pub async fn consume_downstream(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<mpsc::UnboundedReceiver<Arrival>> {
    let channel = connection.create_channel().await?;
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await?;
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = SystemTime::now();
            match parse_event(&delivery.data, at) {
                Some(mut arrival) => {
                    arrival.bytes.1 = ipn_bridge::amqp::header_frame_size(&delivery.properties);
                    if sender.send(arrival).is_err() {
                        return;
                    }
                }
                None => eprintln!("an event the bench cannot read"),
            }
        }
    });
    Ok(receiver)
}

/// The fields of an event the bench reads. Typed, so the downstream consumer skips the rest of
/// a ~3 KB event (its `fields` and `raw_body_base64`) without building a tree of it: the bench
/// shares the two cores with what it measures.
#[derive(serde::Deserialize)]
struct EventFields<'a> {
    #[serde(borrow)]
    txn_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    order_key: Cow<'a, str>,
    sequence: i64,
    #[serde(borrow, default)]
    received_at: Option<Cow<'a, str>>,
}

pub fn parse_event(json: &[u8], at: SystemTime) -> Option<Arrival> {
    let event: EventFields = serde_json::from_slice(json).ok()?;
    Some(Arrival {
        at,
        order_key: event.order_key.into_owned(),
        sequence: event.sequence,
        seq: event.txn_id?.strip_prefix('B')?.parse().ok()?,
        received_at: event
            .received_at
            .and_then(|text| humantime::parse_rfc3339(&text).ok()),
        bytes: (json.len(), 0),
    })
}
