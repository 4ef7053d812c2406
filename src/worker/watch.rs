//! The watch on the queues: one worker (the owner of shard 0 among the live workers, so three
//! workers do not send three alerts or triple a `sum()`) looks at every `[[downstream]]` queue
//! each `worker.downstream_check`, exports depth, consumers and dead-lettered events as metrics,
//! and raises an alert when a service is in trouble ([`crate::downstream::Watch`] has the
//! rules); and exports the depth of the bridge's own queues (the inbound shards together,
//! parked, quarantine, dead) as `ipn_worker_queue_messages`.
//!
//! It has a broker connection of its own, opened when needed and bounded by
//! `amqp.connect_timeout` at every step, so a silent broker delays only the next look.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::metrics::QueueLabel;
use super::ownership;
use super::pipeline::Pipeline;
use crate::bounded;
use crate::config::Config;
use crate::downstream::{Watch, look};
use crate::store::Store;

/// The shard whose owner watches the downstream queues.
const WATCHING_SHARD: u16 = 0;

/// Looks at the downstream queues and the bridge's own every `worker.downstream_check` while this worker owns
/// [`WATCHING_SHARD`], until `stop`.
pub(super) async fn watch_queues(
    config: Config,
    store: Store,
    pipeline: Arc<Pipeline>,
    id: String,
    stop: CancellationToken,
) {
    let topology = crate::topology::Topology::of(&config);
    let mut watches: Vec<Watch> = config.downstream.iter().cloned().map(Watch::new).collect();
    let mut connection: Option<Connection> = None;
    let mut every = tokio::time::interval(config.worker.downstream_check);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        if !watching(&store, &config, &id).await {
            forget(&pipeline);
            // Whoever watches next starts afresh, so a takeover back does not tell old news.
            watches = config.downstream.iter().cloned().map(Watch::new).collect();
            continue;
        }
        let limit = config.amqp.connect_timeout;
        if !connection.as_ref().is_some_and(|c| c.status().connected()) {
            let connect = crate::amqp::connect(&config.amqp, "ipn-worker-watch");
            connection = match tokio::time::timeout(limit, connect).await {
                Ok(Ok(connected)) => Some(connected.connection),
                Ok(Err(error)) => {
                    let error = bounded::error_chain(&error);
                    warn!(
                        error,
                        "cannot look at the downstream queues; will try again"
                    );
                    continue;
                }
                Err(_) => {
                    warn!(after = ?limit, "cannot look at the downstream queues: the broker did not answer; will try again");
                    continue;
                }
            };
        }
        let Some(open) = &connection else { continue };
        if !look_at_all(open, &mut watches, &pipeline, limit).await
            || !look_at_bridge(open, &topology, &pipeline, limit).await
        {
            connection = None;
        }
    }
    if let Some(connection) = connection {
        let close = connection.close(200, "worker stopping".into());
        let _ = tokio::time::timeout(config.amqp.connect_timeout, close).await;
    }
}

/// Whether this worker watches now: it owns [`WATCHING_SHARD`] among the live workers.
/// Whether worker `id` owns [`WATCHING_SHARD`] among the live workers now: the one worker that
/// watches the downstream queues and exports the deployment-wide gauges.
pub(super) async fn watching(store: &Store, config: &Config, id: &str) -> bool {
    match store.live_workers(config.worker.takeover).await {
        Ok(live) => {
            let ids: Vec<String> = live.into_iter().map(|w| w.worker_id).collect();
            ownership::owner(WATCHING_SHARD, &ids, config.topology.shards.get()) == Some(id)
        }
        Err(error) => {
            let error = bounded::error_chain(&error);
            warn!(
                error,
                "cannot read the live workers; not watching the downstream queues this time"
            );
            false
        }
    }
}

/// One look at every queue; false when the connection is no good any more.
async fn look_at_all(
    connection: &Connection,
    watches: &mut [Watch],
    pipeline: &Pipeline,
    limit: Duration,
) -> bool {
    let metrics = pipeline.metrics();
    for watch in watches.iter_mut() {
        let queue = watch.queue().queue.clone();
        let seen = match tokio::time::timeout(limit, look(connection, &queue)).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(error)) => {
                let error = bounded::error_chain(&error);
                warn!(
                    error,
                    queue, "cannot look at a downstream queue; will try again"
                );
                return false;
            }
            Err(_) => {
                warn!(queue, after = ?limit, "the broker did not answer a look at a downstream queue; will try again");
                return false;
            }
        };
        let label = QueueLabel {
            queue: queue.clone(),
        };
        metrics
            .downstream_depth
            .get_or_create(&label)
            .set(i64::from(seen.depth));
        metrics
            .downstream_consumers
            .get_or_create(&label)
            .set(i64::from(seen.consumers));
        metrics
            .downstream_dead
            .get_or_create(&label)
            .set(i64::from(seen.dead));
        for trouble in watch.observe(Instant::now(), seen) {
            pipeline.alerter.raise(watch.alert(trouble));
        }
    }
    true
}

/// One look at the bridge's own queues (passive declarations, no message touched); false when
/// the connection is no good any more.
async fn look_at_bridge(
    connection: &Connection,
    topology: &crate::topology::Topology,
    pipeline: &Pipeline,
    limit: Duration,
) -> bool {
    let queues = topology.own_queues();
    let counted =
        tokio::time::timeout(limit, crate::topology::count_messages(connection, &queues)).await;
    let totals = match counted {
        Ok(Ok(totals)) => totals,
        Ok(Err(error)) => {
            let error = bounded::error_chain(&error);
            warn!(error, "cannot count the bridge's queues; will try again");
            return false;
        }
        Err(_) => {
            warn!(after = ?limit, "the broker did not answer a count of the bridge's queues; will try again");
            return false;
        }
    };
    let metrics = pipeline.metrics();
    for (queue, messages) in totals {
        let label = super::metrics::RoleLabel { queue };
        metrics
            .queue_messages
            .get_or_create(&label)
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
    }
    true
}

/// Stops exporting the watched gauges: another worker watches.
fn forget(pipeline: &Pipeline) {
    let metrics = pipeline.metrics();
    metrics.queue_messages.clear();
    metrics.downstream_depth.clear();
    metrics.downstream_consumers.clear();
    metrics.downstream_dead.clear();
}
