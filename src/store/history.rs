//! The event history: every event the bridge published, as it was published, for as long as its
//! dedup record lives (`database.dedup_retention`). Written by [`Store::mark_done`]; read here
//! by `ipnctl events find` and `ipnctl events redeliver`.

use std::time::{Duration, SystemTime};

use sqlx::Row;
use uuid::Uuid;

use super::{Error, Store, Within};

/// Which stored events to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    /// The events of one `txn_id`.
    Txn(String),
    /// The events of one order key.
    Key(String),
    /// One event.
    Id(Uuid),
    /// Events published from `since` up to (not including) `until`.
    Between {
        /// Inclusive start.
        since: SystemTime,
        /// Exclusive end; none for "until now".
        until: Option<SystemTime>,
    },
}

/// One event from the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its event id (the message id it was published with).
    pub event_id: Uuid,
    /// Its order key.
    pub order_key: String,
    /// Its sequence number within the key.
    pub sequence: i64,
    /// Its routing key on `<p>.events`; none for events published before the history existed.
    pub routing_key: Option<String>,
    /// The IPN's `txn_id`.
    pub txn_id: Option<String>,
    /// When the broker confirmed it and the worker recorded it.
    pub published_at: SystemTime,
    /// The JSON body exactly as published; none for events published before the history
    /// existed (they cannot be redelivered).
    pub json: Option<String>,
}

type Query<'a> = sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// An [`EventFilter`] as the queries below bind it: $1 txn, $2 key, $3 id, $4 since, $5 until.
struct Params<'a> {
    txn: Option<&'a str>,
    key: Option<&'a str>,
    id: Option<Uuid>,
    since: Option<String>,
    until: Option<String>,
}

impl EventFilter {
    fn params(&self) -> Params<'_> {
        let time = |t: &SystemTime| humantime::format_rfc3339_micros(*t).to_string();
        let none = Params {
            txn: None,
            key: None,
            id: None,
            since: None,
            until: None,
        };
        match self {
            EventFilter::Txn(txn) => Params {
                txn: Some(txn),
                ..none
            },
            EventFilter::Key(key) => Params {
                key: Some(key),
                ..none
            },
            EventFilter::Id(id) => Params {
                id: Some(*id),
                ..none
            },
            EventFilter::Between { since, until } => Params {
                since: Some(time(since)),
                until: until.as_ref().map(time),
                ..none
            },
        }
    }
}

impl<'a> Params<'a> {
    /// Binds $1..$5 to `query`.
    fn bind(self, query: Query<'a>) -> Query<'a> {
        query
            .bind(self.txn)
            .bind(self.key)
            .bind(self.id)
            .bind(self.since)
            .bind(self.until)
    }
}

/// The conditions every history query shares ($1..$5 as [`Params::bind`] binds them).
const MATCHING: &str = "state = 'done'
     AND ($1::text IS NULL OR txn_id = $1)
     AND ($2::text IS NULL OR order_key = $2)
     AND ($3::uuid IS NULL OR event_id = $3)
     AND ($4::text IS NULL OR done_at >= $4::timestamptz)
     AND ($5::text IS NULL OR done_at < $5::timestamptz)";

const COLUMNS: &str = "event_id, order_key, sequence, routing_key, txn_id, event_json,
     EXTRACT(EPOCH FROM done_at)::float8 AS published_epoch";

impl Store {
    /// At most `limit` stored events matching `filter`, in the order they were published.
    pub async fn find_events(
        &self,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ipn_event WHERE {MATCHING}
             ORDER BY done_at, order_key, sequence LIMIT $6"
        );
        let rows = filter
            .params()
            .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .within(self.query_timeout, "find_events")
            .await?;
        rows.iter().map(stored).collect()
    }

    /// How many stored events match `filter`.
    pub async fn count_events(&self, filter: &EventFilter) -> Result<u64, Error> {
        let sql = format!("SELECT count(*) AS n FROM ipn_event WHERE {MATCHING}");
        let row = filter
            .params()
            .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
            .fetch_one(&self.pool)
            .within(self.query_timeout, "count_events")
            .await?;
        let count: i64 = row.try_get("n")?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The next `page` stored events matching `filter` after `(order key, sequence)` `after`,
    /// in per-key sequence order (keys one after another): pages for a redelivery of any size
    /// in bounded memory.
    pub async fn events_after(
        &self,
        filter: &EventFilter,
        after: Option<(&str, i64)>,
        page: u32,
    ) -> Result<Vec<StoredEvent>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ipn_event WHERE {MATCHING}
               AND ($6::text IS NULL OR (order_key, sequence) > ($6, $7))
             ORDER BY order_key, sequence LIMIT $8"
        );
        let rows = filter
            .params()
            .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
            .bind(after.map(|(key, _)| key))
            .bind(after.map_or(0, |(_, sequence)| sequence))
            .bind(i64::from(page))
            .fetch_all(&self.pool)
            .within(self.query_timeout, "events_after")
            .await?;
        rows.iter().map(stored).collect()
    }
}

fn stored(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, Error> {
    let epoch: f64 = row.try_get("published_epoch")?;
    Ok(StoredEvent {
        event_id: row.try_get("event_id")?,
        order_key: row.try_get("order_key")?,
        sequence: row.try_get("sequence")?,
        routing_key: row.try_get("routing_key")?,
        txn_id: row.try_get("txn_id")?,
        json: row.try_get("event_json")?,
        published_at: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0)),
    })
}
