//! Group commit: the requests of one kind that many lanes make at the same moment, gathered
//! into one statement.
//!
//! One task per kind takes the first waiting request, then every other one already waiting (up
//! to [`MAX_BATCH`]), runs them as one statement (one round trip, one commit) and answers each
//! caller. Nothing waits for a batch to fill: under light load a batch is one request and costs
//! what a single statement did; under load the requests that queued while the last batch ran
//! go together. A caller is answered only after its batch committed, so "recorded before acked"
//! holds exactly as with one statement per IPN.
//!
//! When a batch fails on something the database said about a value (a constraint, a refused
//! byte), its requests are run again one by one, so each caller gets its own answer and a
//! permanent error names the one IPN that caused it ([`super::Error::is_permanent`]). Any other
//! failure (timeout, lost connection) is every caller's, as it would have been alone.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{Error, timed};

/// Requests run in one statement at most: bounds the statement's size and a batch's latency.
const MAX_BATCH: usize = 256;

/// Requests waiting for their batch at most; a caller beyond it waits for room (bounded memory
/// whatever the number of lanes).
const QUEUE: usize = 4 * MAX_BATCH;

/// One kind of request and the statement that runs many of them.
pub(super) trait Kind: Send + Sync + 'static {
    /// What one caller asks.
    type Request: Send + Sync + 'static;
    /// What one caller gets.
    type Response: Send + 'static;
    /// The query's name in timeouts.
    const NAME: &'static str;
    /// Runs every request in one statement; the answers in the requests' order.
    fn run(
        pool: &PgPool,
        requests: &[Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Response>, sqlx::Error>> + Send;
}

/// Label of the batch metrics: the statement's name (its kind's `NAME`: `key_state`, `claim`,
/// `mark_done`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatementLabel {
    /// Which statement.
    pub statement: &'static str,
}

/// A histogram per statement.
pub type PerStatement = Family<StatementLabel, Histogram, fn() -> Histogram>;

/// How big the batches are and how long each takes, per statement: what group commit does under
/// the load of the moment. Cheap to clone (the series are shared); the worker exports them
/// (`ipn_worker_database_batch_*`).
#[derive(Debug, Clone)]
pub struct BatchMetrics {
    /// Requests per batch (1 .. 256, the bound on a batch).
    pub size: PerStatement,
    /// Seconds per batch, from its statement's start to its last answer's (the one-by-one
    /// reruns of a refused batch included).
    pub seconds: PerStatement,
}

impl Default for BatchMetrics {
    fn default() -> Self {
        fn size() -> Histogram {
            // 1 .. 256 (MAX_BATCH)
            Histogram::new(exponential_buckets(1.0, 2.0, 9))
        }
        fn seconds() -> Histogram {
            // 0.5 ms .. ~8 s
            Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        }
        BatchMetrics {
            size: Family::new_with_constructor(size),
            seconds: Family::new_with_constructor(seconds),
        }
    }
}

/// One statement's two series of [`BatchMetrics`], taken once by its batcher.
struct StatementSeries {
    size: Histogram,
    seconds: Histogram,
}

impl StatementSeries {
    /// Creates the series (they exist from the start, at 0).
    fn of(metrics: &BatchMetrics, statement: &'static str) -> StatementSeries {
        let label = StatementLabel { statement };
        StatementSeries {
            size: metrics.size.get_or_create_owned(&label),
            seconds: metrics.seconds.get_or_create_owned(&label),
        }
    }

    fn observe(&self, requests: usize, started: Instant) {
        self.size.observe(requests as f64);
        self.seconds.observe(started.elapsed().as_secs_f64());
    }
}

type Waiting<K> = (
    <K as Kind>::Request,
    oneshot::Sender<Result<<K as Kind>::Response, Error>>,
);

/// The queue of one kind of request, and the task that runs it in batches.
pub(super) struct Batcher<K: Kind> {
    queue: mpsc::Sender<Waiting<K>>,
    limit: Duration,
}

impl<K: Kind> std::fmt::Debug for Batcher<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("kind", &K::NAME).finish()
    }
}

impl<K: Kind> Batcher<K> {
    /// Starts the task; it ends when the last handle is dropped. Each batch is bounded by
    /// `limit` (`database.query_timeout`) and observed in `metrics`.
    pub(super) fn start(pool: PgPool, limit: Duration, metrics: &BatchMetrics) -> Batcher<K> {
        let (queue, waiting) = mpsc::channel(QUEUE);
        let series = StatementSeries::of(metrics, K::NAME);
        tokio::spawn(run_batches::<K>(pool, limit, series, waiting));
        Batcher { queue, limit }
    }

    /// Runs `request` with whatever else is waiting; answers once its batch is done.
    pub(super) async fn call(&self, request: K::Request) -> Result<K::Response, Error> {
        let (answer, answered) = oneshot::channel();
        let limit = self.limit;
        let timeout = || Error::Timeout {
            what: K::NAME,
            after: limit,
        };
        // Waiting for room counts against the same limit: a stuck database must not hold a
        // lane longer than one query would have.
        let sent = tokio::time::timeout(limit, self.queue.send((request, answer))).await;
        match sent {
            Err(_) => return Err(timeout()),
            Ok(Err(_)) => return Err(Error::BatchGone(K::NAME)),
            Ok(Ok(())) => {}
        }
        match answered.await {
            Ok(result) => result,
            Err(_) => Err(Error::BatchGone(K::NAME)),
        }
    }
}

async fn run_batches<K: Kind>(
    pool: PgPool,
    limit: Duration,
    series: StatementSeries,
    mut waiting: mpsc::Receiver<Waiting<K>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (requests, answers): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let started = Instant::now();
        let results = run_one_batch::<K>(&pool, limit, &requests).await;
        series.observe(requests.len(), started);
        for (answer, result) in answers.into_iter().zip(results) {
            // A caller that gave up (stopped worker) no longer listens: nothing to do.
            let _ = answer.send(result);
        }
    }
}

/// One answer per request: the batch's, or each request's own when the database refused
/// something in the batch.
async fn run_one_batch<K: Kind>(
    pool: &PgPool,
    limit: Duration,
    requests: &[K::Request],
) -> Vec<Result<K::Response, Error>> {
    let ran = run_timed::<K>(pool, limit, requests).await;
    if let [_] = requests {
        return vec![ran.and_then(only::<K>)];
    }
    let shared = |error: sqlx::Error| {
        let error = Arc::new(error);
        requests
            .iter()
            .map(|_| Err(Error::Batched(Arc::clone(&error))))
            .collect()
    };
    match ran {
        Ok(responses) if responses.len() == requests.len() => {
            responses.into_iter().map(Ok).collect()
        }
        Ok(responses) => shared(sqlx::Error::Protocol(format!(
            "{} answered {} rows for {} requests",
            K::NAME,
            responses.len(),
            requests.len()
        ))),
        Err(Error::Query(error)) if error.as_database_error().is_some() => {
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                let alone = run_timed::<K>(pool, limit, std::slice::from_ref(request)).await;
                results.push(alone.and_then(only::<K>));
            }
            results
        }
        Err(Error::Timeout { what, after }) => requests
            .iter()
            .map(|_| Err(Error::Timeout { what, after }))
            .collect(),
        Err(Error::Query(error)) => shared(error),
        // `run_timed` fails with a query error or a timeout only; anything else is shared too.
        Err(other) => shared(sqlx::Error::Protocol(crate::bounded::error_chain(&other))),
    }
}

async fn run_timed<K: Kind>(
    pool: &PgPool,
    limit: Duration,
    requests: &[K::Request],
) -> Result<Vec<K::Response>, Error> {
    timed(limit, K::NAME, async {
        K::run(pool, requests).await.map_err(Error::Query)
    })
    .await
}

/// The one answer of a batch of one.
fn only<K: Kind>(mut responses: Vec<K::Response>) -> Result<K::Response, Error> {
    match (responses.pop(), responses.is_empty()) {
        (Some(response), true) => Ok(response),
        _ => Err(Error::Batched(Arc::new(sqlx::Error::Protocol(format!(
            "{} did not answer exactly one row for one request",
            K::NAME
        ))))),
    }
}
