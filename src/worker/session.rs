//! The consume session: one broker connection carrying a channel and a consumer per shard this
//! worker owns, kept up for as long as the worker runs.
//!
//! Keeps three rules whatever the broker does: a lost or refused connection, channel or
//! consumer ends the session and a new one follows (with the shared backoff), always; every
//! broker operation of the session (connect, declare, qos, consume, close) is bounded by
//! `amqp.connect_timeout`; and `stop` is honoured in every state, so a stop drains within
//! `worker.shutdown_grace`. Ownership of shards among workers is recomputed every
//! `worker.heartbeat` ([`super::ownership`]); a shard no longer owned is drained, then its
//! channel closed, so the next owner's consumer becomes active with the rest in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Error;
use super::lanes::Lanes;
use super::ownership;
use super::pipeline::Pipeline;
use crate::amqp;
use crate::backoff::Backoff;
use crate::bounded;
use crate::config::Config;
use crate::store::Store;
use crate::topology::Topology;

/// What the consume sessions of one worker share.
pub(super) struct Session<'a> {
    pub(super) config: &'a Config,
    pub(super) store: &'a Store,
    pub(super) id: String,
    pub(super) topology: &'a Topology,
    pub(super) pipeline: &'a Arc<Pipeline>,
    pub(super) limit: Arc<Semaphore>,
    /// True while every owned shard has a live consumer (`/readyz`).
    pub(super) consuming: &'a AtomicBool,
    pub(super) stop: &'a CancellationToken,
}

/// The shards a session consumes: a stop token, a task and a kept consumer each.
#[derive(Default)]
struct Owned {
    tokens: HashMap<u16, CancellationToken>,
    tasks: JoinSet<(u16, Option<Error>)>,
    /// A clone of each shard's consumer, dropped only once the shard's channel closed (handed
    /// over) or the session's connection did. Dropping the last clone of an active consumer
    /// sends `basic.cancel`, and single active consumer then activates the next worker's
    /// consumer at once while this one still holds its unacked deliveries: those would reach
    /// the next worker after later IPNs of their keys (out of order, numbered after them).
    /// Closing the channel or connection instead returns them first, in order.
    consumers: HashMap<u16, Consumer>,
}

impl Session<'_> {
    /// Connects and consumes; after a loss, waits and does it again; returns when stopped.
    pub(super) async fn keep_consuming(&self) {
        let amqp = &self.config.amqp;
        let mut backoff = Backoff::new(amqp.reconnect_min, amqp.reconnect_max);
        while !self.stop.is_cancelled() {
            let mut reached_consuming = false;
            let result = self.connect_and_consume(&mut reached_consuming).await;
            self.consuming.store(false, Ordering::Relaxed);
            let error = match result {
                Ok(()) => return,
                Err(error) => bounded::error_chain(&error),
            };
            if reached_consuming {
                // The broker is there: what failed was this session, so start over quickly.
                backoff.reset();
            }
            let wait = backoff.next_wait();
            warn!(error, retry_in = ?wait, "not consuming; reconnecting");
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn connect_and_consume(&self, reached_consuming: &mut bool) -> Result<(), Error> {
        let connect = amqp::connect(&self.config.amqp, "ipn-worker-consume");
        let amqp::Connected { connection, node } = tokio::select! {
            () = self.stop.cancelled() => return Ok(()),
            connected = connect => connected?,
        };
        let nodes = &self.pipeline.metrics().broker_node;
        nodes.set("consume", Some(&node.name));
        let mut owned = Owned::default();
        let result = self
            .consume(&connection, &mut owned, reached_consuming)
            .await;
        nodes.set("consume", None);
        if result.is_err() {
            node.lost();
        }
        // Closing returns whatever is still unacked to the queues, in order. A connection
        // that already broke fails at once; a silent one is given up on.
        let close = connection.close(200, "worker stopping".into());
        let _ = tokio::time::timeout(self.config.amqp.connect_timeout, close).await;
        // Only now may the consumers go (see [`Owned::consumers`]).
        drop(owned);
        if result.is_ok() {
            // A clean stop: the others take the shards over now, not after `worker.takeover`.
            let _ = self.store.leave(&self.id).await;
        }
        result
    }

    /// One connection's life: every `worker.heartbeat`, record this worker as alive and
    /// subscribe to the shards it owns among the live workers, handing over (drain, then close
    /// the shard's channel) those it no longer owns; until `stop` (drain within the grace
    /// period, `Ok`) or until a consumer or an operation fails (`Err`).
    async fn consume(
        &self,
        connection: &Connection,
        owned: &mut Owned,
        reached: &mut bool,
    ) -> Result<(), Error> {
        let limit = self.config.amqp.connect_timeout;
        let declare = async {
            let declared = self.topology.declare(connection);
            amqp::bounded("declare the topology", limit * amqp::DECLARE_RPCS, declared).await
        };
        tokio::select! {
            () = self.stop.cancelled() => return Ok(()),
            declared = declare => declared?,
        }
        let session_stop = self.stop.child_token();
        let mut tick = tokio::time::interval(self.config.worker.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                () = self.stop.cancelled() => break None,
                _ = tick.tick() => {
                    let step = self.rebalance(connection, owned, &session_stop);
                    let stepped = tokio::select! {
                        () = self.stop.cancelled() => break None,
                        stepped = step => stepped,
                    };
                    match stepped {
                        Ok(()) => {
                            *reached = true;
                            self.consuming.store(true, Ordering::Relaxed);
                        }
                        Err(error) => break Some(error),
                    }
                }
                Some(ended) = owned.tasks.join_next() => match ended {
                    Ok((shard, None)) => {
                        owned.consumers.remove(&shard);
                        info!(shard, "shard handed over");
                    }
                    Ok((_, Some(error))) => break Some(error),
                    Err(_) => break Some(Error::ConsumerLost(u16::MAX)),
                },
            }
        };
        self.consuming.store(false, Ordering::Relaxed);
        session_stop.cancel();
        self.drain(&mut owned.tasks).await;
        self.pipeline.metrics().owned_shards.set(0);
        lost.map_or(Ok(()), Err)
    }

    /// Lets the shards' running IPNs finish within `worker.shutdown_grace`; what is cut off
    /// stays unacked and is redelivered.
    async fn drain(&self, shards: &mut JoinSet<(u16, Option<Error>)>) {
        let grace = self.config.worker.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while shards.join_next().await.is_some() {} });
        if drained.await.is_err() {
            warn!(
                ?grace,
                "grace period over; unfinished IPNs stay unacked and will be redelivered"
            );
            shards.abort_all();
        }
    }

    /// Records the heartbeat, then subscribes to the shards owned now and hands over the rest.
    /// When the database cannot tell who owns what, the shards held now are kept (single active
    /// consumer still guards each shard).
    async fn rebalance(
        &self,
        connection: &Connection,
        owned: &mut Owned,
        session_stop: &CancellationToken,
    ) -> Result<(), Error> {
        match self.my_shards().await {
            Some(mine) => self.reconcile(connection, &mine, owned, session_stop).await,
            None => Ok(()),
        }
    }

    /// Records the heartbeat and computes the shards this worker owns; `None` when the database
    /// cannot tell.
    async fn my_shards(&self) -> Option<Vec<u16>> {
        let within = self.config.worker.takeover;
        let beat = self.store.heartbeat(&self.id, &host()).await;
        let live = match beat {
            Ok(()) => self.store.live_workers(within).await,
            Err(error) => Err(error),
        };
        match live {
            Ok(live) => {
                let ids: Vec<String> = live.into_iter().map(|w| w.worker_id).collect();
                Some(ownership::owned_by(
                    &self.id,
                    &ids,
                    self.topology.shards().get(),
                ))
            }
            Err(error) => {
                let error = bounded::error_chain(&error);
                warn!(
                    error,
                    "cannot record the heartbeat; keeping the shards held now"
                );
                None
            }
        }
    }

    /// Subscribes to the shards newly owned and starts handing over those no longer owned.
    async fn reconcile(
        &self,
        connection: &Connection,
        mine: &[u16],
        owned: &mut Owned,
        session_stop: &CancellationToken,
    ) -> Result<(), Error> {
        owned.tokens.retain(|shard, token| {
            let keep = mine.contains(shard);
            if !keep {
                info!(shard, "shard now owned by another worker; draining it");
                token.cancel();
            }
            keep
        });
        for &shard in mine {
            if owned.tokens.contains_key(&shard) {
                continue;
            }
            let token = session_stop.child_token();
            let (channel, consumer) = self.subscribe(connection, shard).await?;
            debug!(shard, consumer = %consumer.tag(), "shard subscribed");
            let lanes = Lanes::new(
                shard,
                Arc::clone(self.pipeline),
                Arc::clone(&self.limit),
                self.config,
                token.clone(),
            );
            let close_limit = self.config.amqp.connect_timeout;
            owned.consumers.insert(shard, consumer.clone());
            owned.tasks.spawn(async move {
                let ended = lanes.run(consumer).await;
                if ended.is_some() {
                    return (shard, ended);
                }
                // Drained: closing the channel returns the deliveries never started, in order,
                // and lets the next consumer of the shard become active. A channel that does not
                // close ends the session: the connection's close returns them instead.
                let close = channel.close(200, "shard handed over".into());
                let closed =
                    amqp::bounded("close a handed-over shard's channel", close_limit, close);
                (shard, closed.await.err().map(Error::from))
            });
            owned.tokens.insert(shard, token);
        }
        let count = i64::try_from(owned.tokens.len()).unwrap_or(i64::MAX);
        let metrics = self.pipeline.metrics();
        metrics.owned_shards.set(count);
        metrics.shards.set(i64::from(self.topology.shards().get()));
        Ok(())
    }

    async fn subscribe(
        &self,
        connection: &Connection,
        shard: u16,
    ) -> Result<(Channel, Consumer), Error> {
        let limit = self.config.amqp.connect_timeout;
        let channel =
            amqp::bounded("open a shard channel", limit, connection.create_channel()).await?;
        let qos = channel.basic_qos(
            self.config.worker.prefetch.get(),
            BasicQosOptions::default(),
        );
        amqp::bounded("set the prefetch", limit, qos).await?;
        let queue = self.topology.shard_queue(shard);
        let consume = channel.basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let consumer = amqp::bounded("subscribe to a shard", limit, consume).await?;
        Ok((channel, consumer))
    }
}

/// The host name from the system (gethostname; `HOSTNAME` is a shell variable, seldom exported),
/// for `ipnctl workers`; bounded, as anything shown is.
pub fn host() -> String {
    let name = hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    crate::bounded::shown(&name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_is_the_systems_name_whether_or_not_hostname_is_exported() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("Linux");
        assert_eq!(super::host(), kernel.trim());
    }
}
