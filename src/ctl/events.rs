//! `ipnctl events`: the event history in PostgreSQL (`database.dedup_retention` long), to find
//! what became of an IPN and to deliver past events again to a service that missed them.
//!
//! A redelivery publishes each stored event exactly as it was published (same JSON, event id,
//! order key and sequence, so a service that dedups by event id applies each once), with
//! confirms, one at a time in per-key sequence order, straight to the named queue (through the
//! default exchange: no binding needed, no other service sees them again). It reads the history
//! in pages, so any size fits in bounded memory.

use std::time::SystemTime;

use anyhow::{Context, bail};

use super::table;
use crate::amqp::{Outgoing, Publisher};
use crate::config::Config;
use crate::contract::{self, text};
use crate::store::{EventFilter, Store, StoredEvent};

/// Stored events read per query during a redelivery.
const PAGE: u32 = 500;

/// One stored event as `events find` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Found {
    /// Its event id.
    pub event_id: String,
    /// Its order key.
    pub order_key: String,
    /// Its sequence number within the key.
    pub sequence: i64,
    /// Its routing key on `<p>.events`.
    pub routing_key: Option<String>,
    /// The IPN's `txn_id`.
    pub txn_id: Option<String>,
    /// When it was published (RFC 3339, UTC).
    pub published_at: String,
    /// The event as published (docs/events.md); null for events stored before the history.
    pub event: Option<serde_json::Value>,
}

/// A time on the command line: RFC 3339 (`2026-12-01T10:00:00Z`, or without the zone for UTC)
/// or a duration ago (`90m`, `2h`, `3days`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return Ok(time);
    }
    match humantime::parse_duration(text) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("`{text}` ago is before 1970")),
        Err(_) => Err(format!(
            "`{text}` is neither a time (2026-12-01T10:00:00Z) nor a duration ago (2h, 3days)"
        )),
    }
}

/// At most `limit` stored events matching `filter`, in publishing order, and how many match in
/// all.
pub async fn find(
    config: &Config,
    filter: &EventFilter,
    limit: u32,
) -> anyhow::Result<(Vec<Found>, u64)> {
    let store = connect(config).await?;
    let found = async {
        let events = store.find_events(filter, limit).await?;
        let total = store.count_events(filter).await?;
        Ok::<_, crate::store::Error>((events, total))
    }
    .await;
    store.close().await;
    let (events, total) = found.context("cannot read the event history")?;
    Ok((events.into_iter().map(shown).collect(), total))
}

fn shown(event: StoredEvent) -> Found {
    Found {
        event_id: event.event_id.to_string(),
        order_key: event.order_key,
        sequence: event.sequence,
        routing_key: event.routing_key,
        txn_id: event.txn_id,
        published_at: humantime::format_rfc3339_seconds(event.published_at).to_string(),
        event: event.json.and_then(|json| serde_json::from_str(&json).ok()),
    }
}

/// Found events as a readable table.
pub fn found_table(events: &[Found]) -> String {
    let rows = events
        .iter()
        .map(|e| {
            vec![
                e.published_at.clone(),
                e.order_key.clone(),
                e.sequence.to_string(),
                e.routing_key.clone().unwrap_or_default(),
                e.txn_id.clone().unwrap_or_default(),
                e.event_id.clone(),
            ]
        })
        .collect();
    let head = [
        "PUBLISHED",
        "KEY",
        "SEQ",
        "ROUTING KEY",
        "TXN_ID",
        "EVENT_ID",
    ];
    table(&head, rows)
}

/// What a redelivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redelivered {
    /// Events published to the queue and confirmed.
    pub published: u64,
    /// Matching events stored without their JSON (published before the history existed).
    pub skipped: u64,
}

/// Publishes every stored event matching `filter` to `queue` again; see the module docs.
/// Progress goes to stderr every thousand events.
pub async fn redeliver(
    config: &Config,
    filter: &EventFilter,
    queue: &str,
) -> anyhow::Result<Redelivered> {
    let store = connect(config).await?;
    let publisher = Publisher::start_undeclared(&config.amqp, "ipnctl-redeliver");
    let result = redeliver_with(config, &store, &publisher, filter, queue).await;
    publisher.close().await;
    store.close().await;
    result
}

async fn redeliver_with(
    config: &Config,
    store: &Store,
    publisher: &Publisher,
    filter: &EventFilter,
    queue: &str,
) -> anyhow::Result<Redelivered> {
    super::downstream::require_queue(config, queue).await?;
    if !publisher.wait_connected(config.amqp.connect_timeout).await {
        bail!("cannot connect to {}", config.amqp.shown());
    }
    let total = store
        .count_events(filter)
        .await
        .context("cannot read the event history")?;
    let mut done = Redelivered::default();
    let started = std::time::Instant::now();
    let mut after: Option<(String, i64)> = None;
    loop {
        let page = store
            .events_after(filter, after.as_ref().map(|(k, s)| (k.as_str(), *s)), PAGE)
            .await
            .context("cannot read the event history")?;
        let Some(last) = page.last() else { break };
        after = Some((last.order_key.clone(), last.sequence));
        for event in &page {
            let Some(json) = &event.json else {
                done.skipped += 1;
                continue;
            };
            publish(config, publisher, event, json, queue)
                .await
                .with_context(|| {
                    format!(
                        "cannot redeliver event {} ({} #{}) after {} of {total}",
                        event.event_id, event.order_key, event.sequence, done.published
                    )
                })?;
            done.published += 1;
            if done.published % 1000 == 0 {
                eprintln!(
                    "ipnctl: {} of {total} events redelivered to {queue} ({})",
                    done.published,
                    super::rate(
                        usize::try_from(done.published).unwrap_or(usize::MAX),
                        started
                    )
                );
            }
        }
    }
    Ok(done)
}

async fn publish(
    config: &Config,
    publisher: &Publisher,
    event: &StoredEvent,
    json: &str,
    queue: &str,
) -> anyhow::Result<()> {
    let id = event.event_id.to_string();
    let mut properties = contract::event_properties(&id, &event.order_key, event.sequence);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        contract::REDELIVERED_AT.into(),
        text(&contract::time(SystemTime::now())),
    );
    // A redelivery goes straight to one queue, so the delivery's own routing key is that
    // queue's name: the first one travels in a header.
    if let Some(routing_key) = &event.routing_key {
        headers.insert(contract::ROUTING_KEY.into(), text(routing_key));
    }
    properties = properties.with_headers(headers);
    let message = Outgoing {
        exchange: "",
        routing_key: queue,
        body: json.as_bytes(),
        properties,
    };
    publisher
        .publish(message, config.worker.confirm_timeout)
        .await?;
    Ok(())
}

async fn connect(config: &Config) -> anyhow::Result<Store> {
    Store::connect_existing(&config.database)
        .await
        .context("cannot connect to the worker's database")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let exact = parse_time("2026-12-01T10:00:00Z").expect("rfc3339");
        assert_eq!(
            humantime::format_rfc3339_seconds(exact).to_string(),
            "2026-12-01T10:00:00Z"
        );
        let local = parse_time("2026-12-01 10:00:00").expect("weak");
        assert_eq!(local, exact);
        let ago = parse_time("2h").expect("duration").elapsed().expect("past");
        assert!(
            ago >= Duration::from_secs(7200) && ago < Duration::from_secs(7300),
            "{ago:?}"
        );
        let error = parse_time("yesterday-ish").expect_err("neither");
        assert!(error.contains("neither a time"), "{error}");
    }
}
