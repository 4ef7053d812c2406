//! PostgreSQL: the worker's state that must survive crashes and be shared by all workers.
//!
//! Keeps the third promise (each IPN reaches business services once, under a stable event id)
//! with a reservation protocol:
//!
//! 1. [`Store::claim`], in one statement: find the IPN's row by body hash or semantic key;
//!    without one, take the key's next sequence number and insert a `pending` row with the event
//!    id. A `done` row means a duplicate (ack, publish nothing); a `pending` row means an earlier
//!    attempt crashed somewhere after claiming: publish again with the *same* id and sequence.
//! 2. publish the event and wait for the broker's confirm;
//! 3. [`Store::mark_done`];
//! 4. ack the inbound message.
//!
//! A crash between any two steps leads to redelivery and a republish under the same id and
//! number (which downstream deduplicates by event id), never to a lost event or a second id.
//! Unique constraints on the body hash, the semantic key and (key, sequence) make the database,
//! not our code, the judge of races. Migrations in `migrations/` run at connect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool, Row};
use uuid::Uuid;

use crate::config;
use crate::keys::DedupKeys;

mod batch;
mod history;

use batch::Batcher;
pub use batch::{BatchMetrics, PerStatement, StatementLabel};

pub use history::{EventFilter, StoredEvent};

/// The database could not do what was asked; the caller should retry later.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Cannot connect, or cannot create the database.
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("cannot migrate the database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    /// A statement run for many IPNs at once failed for a reason that is every one's (the
    /// connection, not a value; see `store::batch`).
    #[error("database query failed (run for several IPNs together)")]
    Batched(#[source] Arc<sqlx::Error>),
    /// The task that runs a kind of query in batches has stopped (the worker is stopping).
    #[error("the `{0}` batches are no longer run")]
    BatchGone(&'static str),
    /// PostgreSQL did not answer in time (`database.connect_timeout` or `query_timeout`).
    #[error("PostgreSQL did not answer `{what}` within {after:?}")]
    Timeout {
        /// The operation that timed out: `connect`, `create database`, `migrate`, or the
        /// query's name.
        what: &'static str,
        /// The limit that passed.
        after: Duration,
    },
}

/// Bounds a database future by a timeout that names what timed out.
trait Within<T> {
    fn within(self, limit: Duration, what: &'static str) -> impl Future<Output = Result<T, Error>>;
}

impl<T, F: Future<Output = Result<T, sqlx::Error>>> Within<T> for F {
    async fn within(self, limit: Duration, what: &'static str) -> Result<T, Error> {
        timed(limit, what, async { self.await.map_err(Error::Query) }).await
    }
}

/// Bounds any future by `limit`, as [`Error::Timeout`] naming `what`.
async fn timed<T>(
    limit: Duration,
    what: &'static str,
    future: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or(Err(Error::Timeout { what, after: limit }))
}

/// SQLSTATEs that say a value can never be stored, however often it is tried: a NUL in text
/// (22021), an untranslatable character (22P05), a value too long for its column (22001), a
/// malformed value (22P02), a row too large for an index (54000).
/// <https://www.postgresql.org/docs/15/errcodes-appendix.html>
const PERMANENT_SQLSTATES: [&str; 5] = ["22021", "22P05", "22001", "22P02", "54000"];

impl Error {
    /// True when retrying cannot help: the database refused the value itself, not because it
    /// was unavailable. Such an IPN is quarantined as `unprocessable`, never retried forever.
    pub fn is_permanent(&self) -> bool {
        let Error::Query(error) = self else {
            return false;
        };
        error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| PERMANENT_SQLSTATES.contains(&code.as_ref()))
    }
}

/// The event id and per-key sequence number an IPN publishes under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Stable event id.
    pub event_id: Uuid,
    /// 1, 2, 3... within the order key.
    pub sequence: i64,
}

/// What [`Store::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time: publish under this reservation.
    New(Reservation),
    /// Claimed before but not confirmed (a crash or a failed publish): publish again, same ids.
    Pending(Reservation),
    /// Already published: a duplicate; publish nothing.
    Done(Reservation),
}

/// An event as the broker confirmed it, for the history.
#[derive(Debug, Clone, Copy)]
pub struct Published<'a> {
    /// Its routing key on `<p>.events`.
    pub routing_key: &'a str,
    /// The IPN's `txn_id`, bounded ([`crate::event::Event::stored_txn_id`]).
    pub txn_id: Option<&'a str>,
    /// The JSON body exactly as published.
    pub json: &'a str,
}

/// A key's block, as the worker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Message id of the IPN the key waits for.
    pub blocker_id: String,
    /// The blocker is parked (an operator must act), rather than waiting in a delay tier.
    pub parked: bool,
    /// Failed attempts of the blocker so far.
    pub attempts: i64,
}

/// A worker with a recent heartbeat.
/// The deployment's blocked keys and held IPNs, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockedTotals {
    /// Keys blocked behind a deferred or parked IPN.
    pub keys: i64,
    /// IPNs held behind them.
    pub held: i64,
    /// Seconds since the longest-blocked key was blocked (0: none).
    pub longest_blocked_seconds: f64,
    /// Seconds since the oldest parked IPN was parked (each blocks its key; 0: none).
    pub oldest_parked_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveWorker {
    /// Its id (`worker.id`, or generated at start).
    pub worker_id: String,
    /// The host it runs on.
    pub host: String,
    /// Seconds since it started.
    pub up_seconds: u64,
    /// Milliseconds since its last heartbeat.
    pub silent_ms: u64,
}

/// A blocked key as operators list it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedRow {
    /// The key.
    pub order_key: String,
    /// Message id of its blocker.
    pub blocker_id: String,
    /// Parked rather than waiting in a tier.
    pub parked: bool,
    /// Failed attempts of the blocker.
    pub attempts: i64,
    /// The blocker's last error.
    pub last_error: String,
    /// The blocker's `txn_id`.
    pub txn_id: Option<String>,
    /// IPNs held behind it.
    pub held: i64,
    /// Seconds since the key was blocked.
    pub blocked_seconds: u64,
}

/// A block to record.
#[derive(Debug, Clone)]
pub struct Block<'a> {
    /// The key.
    pub order_key: &'a str,
    /// Message id of the IPN it waits for.
    pub blocker_id: &'a str,
    /// Parked rather than waiting in a tier.
    pub parked: bool,
    /// The key's shard.
    pub shard: u16,
    /// Failed attempts so far.
    pub attempts: i64,
    /// The last error, for operators.
    pub last_error: &'a str,
    /// For operators: the blocker's `txn_type`.
    pub txn_type: Option<&'a str>,
    /// For operators: the blocker's `txn_id`.
    pub txn_id: Option<&'a str>,
}

/// An IPN held behind its key's blocker: what is needed to process it later as if it had just
/// been delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Its key.
    pub order_key: String,
    /// Its message id.
    pub message_id: String,
    /// The raw IPN bytes.
    pub body: Vec<u8>,
    /// Its AMQP content type.
    pub content_type: Option<String>,
    /// `x-ipn-received-at`, as written by the ingress.
    pub received_at: Option<String>,
    /// `x-ipn-attempt`.
    pub attempt: i64,
    /// The contract headers kept while held ([`crate::contract::kept_while_held`]), as JSON.
    pub contract_headers: Option<String>,
}

/// What the gate must know about a key before it takes one of its IPNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The key's block, if it is blocked.
    pub blocked: Option<Blocked>,
    /// The profile key the transaction asked about was paid under, if the bridge saw it.
    pub profile: Option<String>,
}

/// A pool of connections to the worker's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    query_timeout: Duration,
    /// Claims of IPNs arriving together, as one statement.
    claims: Arc<Batcher<Claims>>,
    /// Mark-done updates of IPNs finishing together, as one statement.
    done: Arc<Batcher<MarkDone>>,
    /// The gate's look-ups of keys taken together, as one statement.
    key_states: Arc<Batcher<KeyStates>>,
    /// The three batchers' sizes and durations.
    batches: BatchMetrics,
}

/// Refuses a connection to a server that does not take writes (a standby the database address
/// still points at after a failover, or `default_transaction_read_only`): libpq's
/// `target_session_attrs=read-write`, which sqlx lacks. The pool then connects again.
async fn refuse_read_only(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let read_only: String = sqlx::query_scalar("SHOW transaction_read_only")
        .fetch_one(&mut *connection)
        .await?;
    if read_only == "on" {
        tracing::warn!("database server is read-only (a standby?); connecting again");
        return Err(sqlx::Error::Configuration(
            "the server is read-only (a standby?): the worker needs the primary".into(),
        ));
    }
    Ok(())
}

/// Readies each pooled connection: refuses a standby ([`refuse_read_only`]) and plans every
/// statement for the tables as they are now (`plan_cache_mode = force_custom_plan`).
///
/// The worker's statements are prepared once per connection and run millions of times. By
/// default PostgreSQL switches a prepared statement to a generic plan after five executions
/// and keeps it until the table's statistics change. A worker that starts on empty or new
/// tables (a first install, a new database) caches plans made for tables of no rows, which
/// read the whole table through a hash join instead of one index look-up per IPN; they stay
/// until autovacuum's first ANALYZE, which a backlog's drain does not wait for. Measured with the
/// e2e bench at 10 keys: 3 680 sequential scans of `ipn_event` and 3 867 of `ipn_txn_profile`
/// in 12 s of drain, PostgreSQL 1 422 µs of CPU per event, 645 events/s; with custom plans
/// 194 and 190 (all in the first moments, when the tables were small), 641 µs, 933 events/s
/// (docs/PERFORMANCE.md). Planning each batch costs less than that at every key count measured.
/// A `SET`, not a startup option, so a pooler that refuses startup options (PgBouncer) passes it.
async fn prepare_session(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    refuse_read_only(connection).await?;
    sqlx::query("SET plan_cache_mode = force_custom_plan")
        .execute(&mut *connection)
        .await?;
    Ok(())
}

impl Store {
    /// Connects (creating the database if it does not exist yet) and applies the migrations.
    ///
    /// Every step is bounded: `database.connect_timeout` for connecting and creating the
    /// database, `database.query_timeout` for the migrations and every query after.
    pub async fn connect(config: &config::Database) -> Result<Store, Error> {
        let store = Store::open(config, true).await?;
        let migrate = async {
            sqlx::migrate!("./migrations")
                .run(&store.pool)
                .await
                .map_err(Error::Migrate)
        };
        timed(config.query_timeout, "migrate", migrate).await?;
        Ok(store)
    }

    /// Connects to an existing database without creating or migrating anything (for
    /// read-only tools): a missing database is [`Error::Connect`] naming it.
    pub async fn connect_existing(config: &config::Database) -> Result<Store, Error> {
        Store::open(config, false).await
    }

    async fn open(config: &config::Database, create: bool) -> Result<Store, Error> {
        let options: PgConnectOptions = config.url.options();
        if create {
            timed(
                config.connect_timeout,
                "create database",
                ensure_database(&options),
            )
            .await?;
        }
        // One connection first, so a server that refuses us (read-only above all) says why at
        // start-up; the pool's own attempts only say that it timed out.
        let probe = async {
            let mut connection = options.connect().await?;
            refuse_read_only(&mut connection).await?;
            connection.close().await
        };
        // A probe that times out is left to the pool's own bounded connect below.
        if let Ok(Err(error)) = tokio::time::timeout(config.connect_timeout, probe).await {
            return Err(Error::Connect(error));
        }
        let connect = PgPoolOptions::new()
            .max_connections(config.max_connections.get())
            .acquire_timeout(config.acquire_timeout)
            .after_connect(|connection, _| Box::pin(prepare_session(connection)))
            .connect_with(options);
        let pool = connect
            .within(config.connect_timeout, "connect")
            .await
            .map_err(|error| match error {
                Error::Query(error) => Error::Connect(error),
                other => other,
            })?;
        let limit = config.query_timeout;
        let batches = BatchMetrics::default();
        Ok(Store {
            claims: Arc::new(Batcher::start(pool.clone(), limit, &batches)),
            done: Arc::new(Batcher::start(pool.clone(), limit, &batches)),
            key_states: Arc::new(Batcher::start(pool.clone(), limit, &batches)),
            batches,
            pool,
            query_timeout: limit,
        })
    }

    /// How the group commit's batches go (sizes and durations per statement), for the metrics.
    pub fn batch_metrics(&self) -> &BatchMetrics {
        &self.batches
    }

    /// Finds or reserves the row of an IPN; see the module docs for the protocol.
    ///
    /// One statement, so one round trip and one commit: it returns the existing row when there
    /// is one, and otherwise takes the key's next number and inserts the `pending` row. Two
    /// claims of the same IPN racing each other (only possible across a consumer failover)
    /// cannot both insert: the loser fails on a unique constraint, its whole statement (the
    /// number it took included) rolls back, and its retry finds the winner's row.
    pub async fn claim(&self, keys: &DedupKeys, order_key: &str) -> Result<Claim, Error> {
        self.claim_paid(keys, order_key, None).await
    }

    /// [`Store::claim`], also remembering (in the same statement) that `paid_txn` was paid under
    /// the profile key `order_key`, for re-routing its later refunds and chargebacks.
    pub async fn claim_paid(
        &self,
        keys: &DedupKeys,
        order_key: &str,
        paid_txn: Option<&str>,
    ) -> Result<Claim, Error> {
        let claim = Claiming {
            body_sha256: keys.body_sha256.clone(),
            semantic_key: keys.stored_semantic().map(std::borrow::Cow::into_owned),
            order_key: order_key.to_owned(),
            event_id: keys.event_id(),
            paid_txn: paid_txn.map(str::to_owned),
        };
        self.claims.call(claim).await
    }

    /// Records that the broker confirmed the event, and keeps the event as published for
    /// `ipnctl events` (idempotent: a row already done keeps its first event).
    ///
    /// One statement on the IPN's own row, so the history can never disagree with the dedup
    /// record: a crash before it leaves a pending row (republished under the same id), after it
    /// one done row with its event. IPNs finishing at the same moment share the statement
    /// (group commit, `store::batch`); each call returns only once its row is committed.
    pub async fn mark_done(&self, event_id: Uuid, event: &Published<'_>) -> Result<(), Error> {
        let done = Done {
            event_id,
            routing_key: event.routing_key.to_owned(),
            txn_id: event.txn_id.map(str::to_owned),
            json: event.json.to_owned(),
        };
        self.done.call(done).await
    }

    /// Deletes dedup records of events confirmed longer than `retention` ago; returns how many.
    /// Sequence counters are kept, so numbering continues after a purge.
    pub async fn purge_older_than(&self, retention: Duration) -> Result<u64, Error> {
        let seconds = retention.as_secs_f64();
        let result = sqlx::query(
            "DELETE FROM ipn_event WHERE state = 'done' AND done_at < now() - make_interval(secs => $1)",
        )
        .bind(seconds)
        .execute(&self.pool)
        .within(self.query_timeout, "purge_older_than")
        .await?;
        // Refunds and chargebacks come within months of a payment, not years: the map of
        // payments to profiles lives as long as the dedup records.
        sqlx::query(
            "DELETE FROM ipn_txn_profile WHERE created_at < now() - make_interval(secs => $1)",
        )
        .bind(seconds)
        .execute(&self.pool)
        .within(self.query_timeout, "purge_older_than")
        .await?;
        Ok(result.rows_affected())
    }

    /// The block on `order_key`, if the key is blocked.
    pub async fn blocked(&self, order_key: &str) -> Result<Option<Blocked>, Error> {
        Ok(self.key_state(order_key, None).await?.blocked)
    }

    /// In one statement: the block on `order_key`, and (when `paid_txn` is given) the profile
    /// key that transaction was paid under. Look-ups of many lanes at the same moment share
    /// the statement (`store::batch`).
    pub async fn key_state(
        &self,
        order_key: &str,
        paid_txn: Option<&str>,
    ) -> Result<KeyState, Error> {
        let asked = (order_key.to_owned(), paid_txn.map(str::to_owned));
        self.key_states.call(asked).await
    }

    /// Blocks `block.order_key` behind `block.blocker_id`, or moves an existing block to it.
    pub async fn block(&self, block: &Block<'_>) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO ipn_blocked_key
                 (order_key, blocker_id, state, shard, attempts, last_error, txn_type, txn_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (order_key) DO UPDATE SET
                 blocker_id = EXCLUDED.blocker_id, state = EXCLUDED.state,
                 attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                 txn_type = EXCLUDED.txn_type, txn_id = EXCLUDED.txn_id, updated_at = now()",
        )
        .bind(block.order_key)
        .bind(block.blocker_id)
        .bind(if block.parked { "parked" } else { "waiting" })
        .bind(i32::from(block.shard))
        .bind(block.attempts)
        .bind(block.last_error)
        .bind(block.txn_type)
        .bind(block.txn_id)
        .execute(&self.pool)
        .within(self.query_timeout, "block")
        .await?;
        Ok(())
    }

    /// Lifts the block on `order_key` (its held IPNs must all be released first).
    pub async fn unblock(&self, order_key: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM ipn_blocked_key WHERE order_key = $1")
            .bind(order_key)
            .execute(&self.pool)
            .within(self.query_timeout, "unblock")
            .await?;
        Ok(())
    }

    /// Holds an IPN behind its key's blocker, after the ones held before it; holding the same
    /// message twice (a redelivery) keeps the first.
    pub async fn hold(&self, held: &Held) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO ipn_held
                 (order_key, message_id, body, content_type, received_at, attempt, contract_headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(&held.order_key)
        .bind(&held.message_id)
        .bind(&held.body)
        .bind(&held.content_type)
        .bind(&held.received_at)
        .bind(held.attempt)
        .bind(&held.contract_headers)
        .execute(&self.pool)
        .within(self.query_timeout, "hold")
        .await?;
        Ok(())
    }

    /// The first IPN held for `order_key`, with its row id.
    pub async fn next_held(&self, order_key: &str) -> Result<Option<(i64, Held)>, Error> {
        let row = sqlx::query(
            "SELECT id, message_id, body, content_type, received_at, attempt, contract_headers
             FROM ipn_held WHERE order_key = $1 ORDER BY id LIMIT 1",
        )
        .bind(order_key)
        .fetch_optional(&self.pool)
        .within(self.query_timeout, "next_held")
        .await?;
        let Some(row) = row else { return Ok(None) };
        let held = Held {
            order_key: order_key.to_owned(),
            message_id: row.try_get("message_id")?,
            body: row.try_get("body")?,
            content_type: row.try_get("content_type")?,
            received_at: row.try_get("received_at")?,
            attempt: row.try_get("attempt")?,
            contract_headers: row.try_get("contract_headers")?,
        };
        Ok(Some((row.try_get("id")?, held)))
    }

    /// Forgets a held IPN once it was released (published, quarantined or deferred).
    pub async fn remove_held(&self, id: i64) -> Result<(), Error> {
        sqlx::query("DELETE FROM ipn_held WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .within(self.query_timeout, "remove_held")
            .await?;
        Ok(())
    }

    /// Every blocked key with how many IPNs it holds, oldest block first (for operators).
    pub async fn blocked_keys(&self) -> Result<Vec<BlockedRow>, Error> {
        let rows = sqlx::query(
            "SELECT b.order_key, b.blocker_id, b.state, b.attempts, b.last_error, b.txn_id,
                    (SELECT count(*) FROM ipn_held h WHERE h.order_key = b.order_key) AS held,
                    EXTRACT(EPOCH FROM now() - b.blocked_at)::float8 AS blocked_seconds
             FROM ipn_blocked_key b ORDER BY b.blocked_at, b.order_key",
        )
        .fetch_all(&self.pool)
        .within(self.query_timeout, "blocked_keys")
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                let seconds: f64 = row.try_get("blocked_seconds")?;
                Ok(BlockedRow {
                    order_key: row.try_get("order_key")?,
                    blocker_id: row.try_get("blocker_id")?,
                    parked: state == "parked",
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                    txn_id: row.try_get("txn_id")?,
                    held: row.try_get("held")?,
                    blocked_seconds: seconds.max(0.0) as u64,
                })
            })
            .collect()
    }

    /// How many keys are blocked, how many IPNs they hold, and for how long (for metrics).
    pub async fn blocked_totals(&self) -> Result<BlockedTotals, Error> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM ipn_blocked_key) AS keys,
                    (SELECT count(*) FROM ipn_held) AS held,
                    (SELECT coalesce(extract(epoch FROM now() - min(blocked_at)), 0)::float8
                       FROM ipn_blocked_key) AS longest_blocked,
                    (SELECT coalesce(extract(epoch FROM now() - min(updated_at)), 0)::float8
                       FROM ipn_blocked_key WHERE state = 'parked') AS oldest_parked",
        )
        .fetch_one(&self.pool)
        .within(self.query_timeout, "blocked_totals")
        .await?;
        Ok(BlockedTotals {
            keys: row.try_get("keys")?,
            held: row.try_get("held")?,
            longest_blocked_seconds: row.try_get("longest_blocked")?,
            oldest_parked_seconds: row.try_get("oldest_parked")?,
        })
    }

    /// Records that `worker_id` is alive now (registering it on first call).
    pub async fn heartbeat(&self, worker_id: &str, host: &str) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO ipn_worker (worker_id, host) VALUES ($1, $2)
             ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(worker_id)
        .bind(host)
        .execute(&self.pool)
        .within(self.query_timeout, "heartbeat")
        .await?;
        Ok(())
    }

    /// Workers whose last heartbeat is at most `within` old, by id; forgets workers silent for
    /// a day.
    pub async fn live_workers(&self, within: Duration) -> Result<Vec<LiveWorker>, Error> {
        sqlx::query("DELETE FROM ipn_worker WHERE heartbeat_at < now() - interval '1 day'")
            .execute(&self.pool)
            .within(self.query_timeout, "live_workers")
            .await?;
        let rows = sqlx::query(
            "SELECT worker_id, host,
                    EXTRACT(EPOCH FROM now() - started_at)::float8 AS up_seconds,
                    EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 AS silent_seconds
             FROM ipn_worker WHERE heartbeat_at >= now() - make_interval(secs => $1)
             ORDER BY worker_id",
        )
        .bind(within.as_secs_f64())
        .fetch_all(&self.pool)
        .within(self.query_timeout, "live_workers")
        .await?;
        rows.iter()
            .map(|row| {
                let up: f64 = row.try_get("up_seconds")?;
                let silent: f64 = row.try_get("silent_seconds")?;
                Ok(LiveWorker {
                    worker_id: row.try_get("worker_id")?,
                    host: row.try_get("host")?,
                    up_seconds: up.max(0.0) as u64,
                    silent_ms: (silent.max(0.0) * 1000.0) as u64,
                })
            })
            .collect()
    }

    /// Removes `worker_id` from the live set at once (a clean stop), so its shards move now
    /// rather than after the takeover time.
    pub async fn leave(&self, worker_id: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM ipn_worker WHERE worker_id = $1")
            .bind(worker_id)
            .execute(&self.pool)
            .within(self.query_timeout, "leave")
            .await?;
        Ok(())
    }

    /// A server setting as the store's connections see it (`current_setting(name)`), for
    /// diagnostics: e.g. that the settings each connection makes at connect are in force.
    pub async fn setting(&self, name: &str) -> Result<String, Error> {
        sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&self.pool)
            .within(self.query_timeout, "setting")
            .await
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A claim of one IPN, owned so it can wait for its batch.
struct Claiming {
    body_sha256: String,
    semantic_key: Option<String>,
    order_key: String,
    event_id: Uuid,
    paid_txn: Option<String>,
}

/// [`Store::claim_paid`] of many IPNs in one statement (data-modifying CTEs over `unnest`).
///
/// Row by row it is the single claim: the IPN's existing row (by body hash or semantic key)
/// when there is one; otherwise the key's next number and a `pending` row. Two requests of one
/// key cannot share a batch (a key's IPNs go one after another in its lane); if they ever did,
/// the sequence upsert would refuse the statement (SQLSTATE 21000) and the batch would run one
/// by one. A race with another worker fails on a unique constraint as before, rolling back the
/// whole batch (numbers included); the one-by-one rerun then tells each request its own answer.
struct Claims;

impl batch::Kind for Claims {
    type Request = Claiming;
    type Response = Claim;
    const NAME: &'static str = "claim";

    async fn run(pool: &PgPool, requests: &[Claiming]) -> Result<Vec<Claim>, sqlx::Error> {
        let rows = sqlx::query(
            "WITH r AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[])
                     WITH ORDINALITY AS r(body_sha256, semantic_key, order_key, event_id, paid_txn, i)
             ), existing AS (
                 SELECT r.i, e.event_id, e.sequence, e.state FROM r CROSS JOIN LATERAL (
                     SELECT event_id, sequence, state FROM ipn_event
                     WHERE body_sha256 = r.body_sha256 OR semantic_key = r.semantic_key
                     ORDER BY created_at LIMIT 1
                 ) e
             ), fresh AS (
                 SELECT r.* FROM r WHERE NOT EXISTS (SELECT 1 FROM existing x WHERE x.i = r.i)
             ), next AS (
                 INSERT INTO ipn_key_sequence (order_key, last_sequence)
                 SELECT order_key, 1 FROM fresh
                 ON CONFLICT (order_key)
                 DO UPDATE SET last_sequence = ipn_key_sequence.last_sequence + 1
                 RETURNING order_key, last_sequence
             ), inserted AS (
                 INSERT INTO ipn_event (event_id, body_sha256, semantic_key, order_key, sequence, state)
                 SELECT f.event_id, f.body_sha256, f.semantic_key, f.order_key, n.last_sequence, 'pending'
                 FROM fresh f JOIN next n ON n.order_key = f.order_key
                 RETURNING event_id, sequence, state
             ), paid AS (
                 INSERT INTO ipn_txn_profile (txn_id, order_key)
                 SELECT paid_txn, order_key FROM r WHERE paid_txn IS NOT NULL
                 ON CONFLICT (txn_id) DO NOTHING
             )
             SELECT x.i, x.event_id, x.sequence, x.state, false AS new FROM existing x
             UNION ALL
             SELECT f.i, n.event_id, n.sequence, n.state, true AS new
             FROM inserted n JOIN fresh f ON f.event_id = n.event_id
             ORDER BY 1",
        )
        .bind(requests.iter().map(|c| c.body_sha256.as_str()).collect::<Vec<_>>())
        .bind(requests.iter().map(|c| c.semantic_key.as_deref()).collect::<Vec<_>>())
        .bind(requests.iter().map(|c| c.order_key.as_str()).collect::<Vec<_>>())
        .bind(requests.iter().map(|c| c.event_id).collect::<Vec<_>>())
        .bind(requests.iter().map(|c| c.paid_txn.as_deref()).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|row| {
                let reservation = Reservation {
                    event_id: row.try_get("event_id")?,
                    sequence: row.try_get("sequence")?,
                };
                let (new, state): (bool, String) = (row.try_get("new")?, row.try_get("state")?);
                Ok(match (new, state.as_str()) {
                    (true, _) => Claim::New(reservation),
                    (false, "done") => Claim::Done(reservation),
                    (false, _) => Claim::Pending(reservation),
                })
            })
            .collect()
    }
}

/// A mark-done of one IPN, owned so it can wait for its batch.
struct Done {
    event_id: Uuid,
    routing_key: String,
    txn_id: Option<String>,
    json: String,
}

/// [`Store::mark_done`] of many IPNs: one `UPDATE … FROM unnest(…)`.
struct MarkDone;

impl batch::Kind for MarkDone {
    type Request = Done;
    type Response = ();
    const NAME: &'static str = "mark_done";

    async fn run(pool: &PgPool, requests: &[Done]) -> Result<Vec<()>, sqlx::Error> {
        // Rows in one order whoever updates them, so two batches cannot deadlock.
        let mut sorted: Vec<&Done> = requests.iter().collect();
        sorted.sort_by_key(|done| done.event_id);
        sqlx::query(
            "UPDATE ipn_event AS e SET state = 'done', done_at = now(),
                 routing_key = d.routing_key, txn_id = d.txn_id, event_json = d.event_json
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                 AS d(event_id, routing_key, txn_id, event_json)
             WHERE e.event_id = d.event_id AND e.state = 'pending'",
        )
        .bind(sorted.iter().map(|d| d.event_id).collect::<Vec<_>>())
        .bind(
            sorted
                .iter()
                .map(|d| d.routing_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            sorted
                .iter()
                .map(|d| d.txn_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(sorted.iter().map(|d| d.json.as_str()).collect::<Vec<_>>())
        .execute(pool)
        .await?;
        Ok(vec![(); requests.len()])
    }
}

/// [`Store::key_state`] of many keys: one `SELECT` over `unnest(…)`, a row per request in
/// order (each table's key is unique, so the joins add none).
struct KeyStates;

impl batch::Kind for KeyStates {
    type Request = (String, Option<String>);
    type Response = KeyState;
    const NAME: &'static str = "key_state";

    async fn run(
        pool: &PgPool,
        requests: &[(String, Option<String>)],
    ) -> Result<Vec<KeyState>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT b.blocker_id, b.state, b.attempts, p.order_key AS profile
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(order_key, txn_id, i)
             LEFT JOIN ipn_blocked_key b ON b.order_key = r.order_key
             LEFT JOIN ipn_txn_profile p ON p.txn_id = r.txn_id
             ORDER BY r.i",
        )
        .bind(requests.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.1.as_deref()).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|row| {
                let blocker_id: Option<String> = row.try_get("blocker_id")?;
                let blocked = match blocker_id {
                    Some(blocker_id) => Some(Blocked {
                        blocker_id,
                        parked: row.try_get::<String, _>("state")? == "parked",
                        attempts: row.try_get("attempts")?,
                    }),
                    None => None,
                };
                Ok(KeyState {
                    blocked,
                    profile: row.try_get("profile")?,
                })
            })
            .collect()
    }
}

/// Creates the configured database when PostgreSQL says it does not exist (SQLSTATE 3D000).
async fn ensure_database(options: &PgConnectOptions) -> Result<(), Error> {
    let error = match options.connect().await {
        Ok(connection) => {
            // Only probing; a failing close changes nothing.
            let _ = connection.close().await;
            return Ok(());
        }
        Err(error) => error,
    };
    let missing = error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "3D000");
    let Some(name) = options.get_database().filter(|_| missing) else {
        return Err(Error::Connect(error));
    };
    let maintenance = options.clone().database("postgres");
    let mut connection = maintenance.connect().await.map_err(Error::Connect)?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    // The name is quoted as an identifier above; CREATE DATABASE takes no bind parameters.
    let created = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut connection)
        .await;
    // Another worker may have created it at the same moment: PostgreSQL says 42P04 (exists), or
    // 23505 (unique violation on pg_database) when the two CREATEs raced. Both are fine.
    match created {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505") =>
        {
            Ok(())
        }
        Err(e) => Err(Error::Connect(e)),
    }
}
