//! The events a run's downstream queue receives, read back and checked: each IPN answered 200
//! yields exactly one event, and each key's sequence numbers run 1..n.

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
}

/// What the downstream consumer saw across phases.
#[derive(Default)]
pub struct Ledger {
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
}

impl Drained {
    pub fn rate(&self) -> f64 {
        self.events.saturating_sub(1) as f64 / self.elapsed.as_secs_f64().max(1e-9)
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
    while !accepted.lock().await.is_empty() {
        let arrival = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .context("no event for 60 s")?
            .context("downstream consumer ended")?;
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
                Some(arrival) => {
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

pub fn parse_event(json: &[u8], at: SystemTime) -> Option<Arrival> {
    let event: serde_json::Value = serde_json::from_slice(json).ok()?;
    let txn_id = event.get("txn_id")?.as_str()?;
    Some(Arrival {
        at,
        order_key: event.get("order_key")?.as_str()?.to_owned(),
        sequence: event.get("sequence")?.as_i64()?,
        seq: txn_id.strip_prefix('B')?.parse().ok()?,
        received_at: event
            .get("received_at")
            .and_then(serde_json::Value::as_str)
            .and_then(|text| humantime::parse_rfc3339(text).ok()),
    })
}
