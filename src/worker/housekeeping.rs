//! The worker's periodic jobs beside the shards: purging old dedup records, and refreshing the
//! blocked-key gauges together with whether the database answers (for `/readyz`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pipeline::Pipeline;
use crate::bounded;
use crate::store::Store;

/// Deletes dedup records past the retention once an hour (every worker does; the deletes are
/// idempotent), until `stop`.
pub(super) async fn purge_periodically(store: Store, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.purge_older_than(retention).await {
            Ok(0) => {}
            Ok(purged) => info!(purged, "old dedup records purged"),
            Err(error) => {
                let error = bounded::error_chain(&error);
                warn!(error, "cannot purge old dedup records; will try again");
            }
        }
    }
}

/// Refreshes the blocked-key and held-IPN gauges (counts and ages) every five seconds, and with them whether the
/// database answers (for `/readyz`), until `stop`. The counts are the deployment's (PostgreSQL's),
/// so only the worker that owns shard 0 exports them; the others export 0, so that a `sum()` over
/// the workers is the count, not a multiple of it.
pub(super) async fn count_blocked(
    store: Store,
    pipeline: Arc<Pipeline>,
    config: crate::config::Config,
    id: String,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let totals = tokio::time::timeout(Duration::from_secs(5), store.blocked_totals()).await;
        let up = matches!(totals, Ok(Ok(_)));
        if let Ok(Ok(totals)) = totals {
            let exporting = super::watch::watching(&store, &config, &id).await;
            let metrics = pipeline.metrics();
            let shown = |value| if exporting { value } else { 0 };
            let age = |value| if exporting { value } else { 0.0 };
            metrics.blocked_keys.set(shown(totals.keys));
            metrics.held_now.set(shown(totals.held));
            metrics
                .longest_blocked_seconds
                .set(age(totals.longest_blocked_seconds));
            metrics
                .oldest_parked_seconds
                .set(age(totals.oldest_parked_seconds));
        }
        pipeline.database_up.store(up, Ordering::Relaxed);
    }
}
