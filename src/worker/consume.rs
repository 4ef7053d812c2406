//! The consume loop: every shard queue, lanes per order key, ack only after the pipeline
//! finished an IPN.
//!
//! Keeps the fourth promise within a shard: messages of one order key are handled strictly one
//! after another in delivery order (a lane), different keys concurrently (bounded by
//! `worker.concurrency`). Each delivery goes through the gate (`gate.rs`): PayPal failures are
//! deferred to delay tiers or parked, with the key blocked and its later IPNs held in order. A
//! failure of our own database or broker keeps the IPN at the head of its lane and retries it
//! with backoff, unacked, so the key's later IPNs cannot overtake it; other keys go on. Single
//! active consumer on each shard queue makes this worker the only one processing a shard while
//! it lives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use std::convert::Infallible;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ownership;
use super::pipeline::{Inbound, Pipeline, header_text};
use crate::alert::Alerter;
use crate::amqp::{self, Publisher, State};
use crate::config::{self, Config};
use crate::store::{self, Store};
use crate::topology::Topology;
use crate::verify::{self, Verifier};

/// The worker cannot start or lost its broker connection; a supervisor should restart it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL.
    #[error("state store")]
    Store(#[from] store::Error),
    /// The HTTP client for PayPal.
    #[error("PayPal client")]
    Verify(#[from] verify::Error),
    /// The alert channels could not be set up.
    #[error("alerts")]
    Alert(#[from] crate::alert::Error),
    /// The consume connection.
    #[error("broker")]
    Broker(#[from] amqp::Error),
    /// A consumer ended: the connection or channel broke.
    #[error("consumer of shard {0} stopped: broker connection lost")]
    ConsumerLost(u16),
}

impl From<lapin::Error> for Error {
    fn from(error: lapin::Error) -> Self {
        Error::Broker(amqp::Error::Broker(error))
    }
}

/// Runs the worker until `shutdown` resolves, then drains within `worker.shutdown_grace`.
/// A lost broker connection is re-established with backoff (`amqp.reconnect_min`..`max`); what
/// was unacked then returns to the queues and is redelivered (a finished IPN as a duplicate).
/// `/healthz`, `/readyz` and `/metrics` are served on `health`.
pub async fn run(
    config: Config,
    health: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let store = Store::connect(&config.database).await?;
    let verifier = Verifier::new(&config.paypal)?;
    let topology = Topology::of(&config);
    let publisher = Publisher::start(&config.amqp, topology.clone(), "ipn-worker-publish");
    let pipeline = Pipeline::new(&config, verifier, store.clone(), publisher);
    let alerter = Alerter::start(&config.alert, pipeline.metrics().alerts.clone())?;
    let pipeline = Arc::new(pipeline.with_alerter(alerter));
    // Consuming before events can be published would only fail and retry every IPN.
    if !pipeline.wait_publisher(config.amqp.connect_timeout).await {
        warn!("publisher not connected yet; IPNs will be retried until it is");
    }
    let stop = CancellationToken::new();
    let consuming = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(serve_health(
        health,
        Arc::clone(&pipeline),
        Arc::clone(&consuming),
        stop.clone(),
    ));
    let purge = tokio::spawn(purge_periodically(
        store.clone(),
        config.database.dedup_retention,
        stop.clone(),
    ));
    let gauges = tokio::spawn(count_blocked(
        store.clone(),
        Arc::clone(&pipeline),
        stop.clone(),
    ));
    let id = config
        .worker
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", host(), uuid::Uuid::now_v7().simple()));
    info!(worker = %id, "ipn-worker starting");
    let session = Session {
        config: &config,
        store: &store,
        id,
        topology: &topology,
        pipeline: &pipeline,
        limit: Arc::new(Semaphore::new(config.worker.concurrency.get())),
        consuming: &consuming,
        stop: &stop,
    };
    // Shutdown only cancels `stop`; the session sees it, drains within the grace period and
    // closes its connection, then `keep_consuming` returns.
    let stopping = async {
        shutdown.await;
        stop.cancel();
    };
    tokio::join!(stopping, session.keep_consuming());
    // Both background tasks end at once: they watch `stop`.
    let _ = purge.await;
    let _ = gauges.await;
    let _ = probes.await;
    store.close().await;
    info!("ipn-worker stopped");
    Ok(())
}

/// What one consume connection needs.
struct Session<'a> {
    config: &'a Config,
    store: &'a Store,
    id: String,
    topology: &'a Topology,
    pipeline: &'a Arc<Pipeline>,
    limit: Arc<Semaphore>,
    consuming: &'a AtomicBool,
    stop: &'a CancellationToken,
}

impl Session<'_> {
    /// Connects and consumes; after a loss, waits and does it again; returns when stopped.
    async fn keep_consuming(&self) {
        let amqp = &self.config.amqp;
        let mut wait = amqp.reconnect_min;
        while !self.stop.is_cancelled() {
            match self.consume().await {
                Ok(()) => return,
                Err(error) => {
                    self.consuming.store(false, Ordering::Relaxed);
                    warn!(%error, retry_in = ?wait, "not consuming; reconnecting");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(amqp.reconnect_max);
        }
    }

    /// One connection's life: every `worker.heartbeat`, record this worker as alive and
    /// subscribe to the shards it owns among the live workers, handing over (drain, then close
    /// the shard's channel) those it no longer owns; until `stop` (drain within the grace
    /// period, `Ok`) or until a consumer ends (`Err`).
    async fn consume(&self) -> Result<(), Error> {
        let connection = amqp::connect(&self.config.amqp, "ipn-worker-consume").await?;
        self.topology
            .declare(&connection.create_channel().await?)
            .await?;
        let session_stop = self.stop.child_token();
        let mut owned = Owned {
            tokens: HashMap::new(),
            tasks: JoinSet::new(),
        };
        let mut tick = tokio::time::interval(self.config.worker.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.consuming.store(true, Ordering::Relaxed);
        let lost = loop {
            tokio::select! {
                () = self.stop.cancelled() => break None,
                _ = tick.tick() => {
                    let Some(mine) = self.my_shards().await else { continue };
                    if let Err(error) = self.reconcile(&connection, &mine, &mut owned, &session_stop).await {
                        break Some(error);
                    }
                }
                Some(ended) = owned.tasks.join_next() => match ended {
                    Ok((shard, None)) => info!(shard, "shard handed over"),
                    Ok((_, Some(error))) => break Some(error),
                    Err(_) => break Some(Error::ConsumerLost(u16::MAX)),
                },
            }
        };
        session_stop.cancel();
        self.consuming.store(false, Ordering::Relaxed);
        let grace = self.config.worker.shutdown_grace;
        let shards = &mut owned.tasks;
        let drained =
            tokio::time::timeout(grace, async { while shards.join_next().await.is_some() {} });
        if drained.await.is_err() {
            warn!(
                ?grace,
                "grace period over; unfinished IPNs stay unacked and will be redelivered"
            );
            shards.abort_all();
        }
        self.pipeline.metrics().owned_shards.set(0);
        // Closing returns whatever is still unacked to the queues, in order.
        let _ = connection.close(200, "worker stopping".into()).await;
        if lost.is_none() {
            // A clean stop: the others take the shards over now, not after `worker.takeover`.
            let _ = self.store.leave(&self.id).await;
        }
        lost.map_or(Ok(()), Err)
    }

    /// Records the heartbeat and computes the shards this worker owns; `None` when the database
    /// cannot tell (the worker then keeps what it has: single active consumer still guards).
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
                warn!(%error, "cannot record the heartbeat; keeping the shards held now");
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
            let (channel, consumer) =
                subscribe(connection, self.topology, shard, &self.config.worker).await?;
            let lanes = Lanes::new(
                shard,
                Arc::clone(self.pipeline),
                Arc::clone(&self.limit),
                &self.config.worker,
                token.clone(),
            );
            owned.tasks.spawn(async move {
                let ended = lanes.run(consumer).await;
                if ended.is_none() {
                    // Drained: closing the channel returns the deliveries never started, in
                    // order, and lets the next consumer of the shard become active.
                    let _ = channel.close(200, "shard handed over".into()).await;
                }
                (shard, ended)
            });
            owned.tokens.insert(shard, token);
        }
        let count = i64::try_from(owned.tokens.len()).unwrap_or(i64::MAX);
        self.pipeline.metrics().owned_shards.set(count);
        Ok(())
    }
}

/// The shards a session consumes: a stop token and a task each.
struct Owned {
    tokens: HashMap<u16, CancellationToken>,
    tasks: JoinSet<(u16, Option<Error>)>,
}

/// The host name, for `ipnctl workers`.
pub fn host() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".to_owned())
}

/// Serves the probes and metrics until `stop`.
async fn serve_health(
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    consuming: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (pipeline, consuming, stopping) =
            (Arc::clone(&pipeline), Arc::clone(&consuming), stop.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let response = probe(request.uri().path(), &pipeline, &consuming, &stopping);
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}

/// `/readyz` is ready when both connections are up, publishing is not blocked, the database
/// answered its last check, and the worker is not stopping.
fn probe(
    path: &str,
    pipeline: &Pipeline,
    consuming: &AtomicBool,
    stopping: &CancellationToken,
) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok".to_owned()),
        "/metrics" => (StatusCode::OK, pipeline.metrics().render()),
        "/readyz" if stopping.is_cancelled() => {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned())
        }
        "/readyz" if !consuming.load(Ordering::Relaxed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable".to_owned(),
        ),
        "/readyz" if !pipeline.database_up.load(Ordering::Relaxed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable".to_owned(),
        ),
        "/readyz" => match pipeline.publisher_state() {
            State::Ready => (StatusCode::OK, "ready".to_owned()),
            State::Blocked => (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker blocked publishing".to_owned(),
            ),
            State::Down => (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker unavailable".to_owned(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = status;
    response
}

/// Deletes dedup records past the retention once an hour (every worker does; the deletes are
/// idempotent), until `stop`.
async fn purge_periodically(store: Store, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.purge_older_than(retention).await {
            Ok(0) => {}
            Ok(purged) => info!(purged, "old dedup records purged"),
            Err(error) => warn!(%error, "cannot purge old dedup records; will try again"),
        }
    }
}

/// Refreshes the blocked-key and held-IPN gauges every five seconds, and with them whether the
/// database answers (for `/readyz`), until `stop`.
async fn count_blocked(store: Store, pipeline: Arc<Pipeline>, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let totals = tokio::time::timeout(Duration::from_secs(5), store.blocked_totals()).await;
        let up = matches!(totals, Ok(Ok(_)));
        if let Ok(Ok((keys, held))) = totals {
            pipeline.metrics().blocked_keys.set(keys);
            pipeline.metrics().held_now.set(held);
        }
        pipeline.database_up.store(up, Ordering::Relaxed);
    }
}

async fn subscribe(
    connection: &Connection,
    topology: &Topology,
    shard: u16,
    worker: &config::Worker,
) -> Result<(lapin::Channel, Consumer), Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(worker.prefetch.get(), BasicQosOptions::default())
        .await?;
    let queue = topology.shard_queue(shard);
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// One shard's lanes: a queue of waiting deliveries per order key.
struct Lanes {
    shard: u16,
    pipeline: Arc<Pipeline>,
    limit: Arc<Semaphore>,
    retry_min: Duration,
    retry_max: Duration,
    stop: CancellationToken,
    waiting: HashMap<String, VecDeque<Delivery>>,
    busy: HashSet<String>,
}

impl Lanes {
    fn new(
        shard: u16,
        pipeline: Arc<Pipeline>,
        limit: Arc<Semaphore>,
        worker: &config::Worker,
        stop: CancellationToken,
    ) -> Lanes {
        Lanes {
            shard,
            pipeline,
            limit,
            retry_min: worker.retry_min,
            retry_max: worker.retry_max,
            stop,
            waiting: HashMap::new(),
            busy: HashSet::new(),
        }
    }

    /// Feeds deliveries into lanes until stopped; then lets the running IPNs finish. Returns
    /// `None` when stopped, or what ended the consumer.
    async fn run(mut self, mut consumer: Consumer) -> Option<Error> {
        let mut running: JoinSet<String> = JoinSet::new();
        let ended = loop {
            tokio::select! {
                () = self.stop.cancelled() => break None,
                Some(done) = running.join_next() => {
                    if let Ok(key) = done {
                        self.next_in_lane(key, &mut running);
                    }
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => self.admit(delivery, &mut running),
                    Some(Err(error)) => break Some(Error::from(error)),
                    None => break Some(Error::ConsumerLost(self.shard)),
                },
            }
        };
        if ended.is_some() {
            // The session is over (its `stop` is this session's own token): IPNs retrying in
            // place must give up now, unacked, instead of waiting for a broker that is gone.
            self.stop.cancel();
        }
        // Finish what is running; deliveries still waiting stay unacked for redelivery.
        while running.join_next().await.is_some() {}
        ended
    }

    fn admit(&mut self, delivery: Delivery, running: &mut JoinSet<String>) {
        let key = lane_of(&delivery);
        if self.busy.contains(&key) {
            self.waiting.entry(key).or_default().push_back(delivery);
        } else {
            self.busy.insert(key.clone());
            running.spawn(self.process(key, delivery));
        }
    }

    fn next_in_lane(&mut self, key: String, running: &mut JoinSet<String>) {
        let next = self.waiting.get_mut(&key).and_then(VecDeque::pop_front);
        if self.waiting.get(&key).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(&key);
        }
        match next {
            Some(delivery) if !self.stop.is_cancelled() => {
                running.spawn(self.process(key, delivery));
            }
            _ => {
                self.busy.remove(&key);
            }
        }
    }

    /// Handles one delivery until it is finished and acked, retrying transient failures; gives
    /// up (unacked) only when the worker stops.
    fn process(&self, key: String, delivery: Delivery) -> impl Future<Output = String> + use<> {
        let (pipeline, limit, stop) = (
            Arc::clone(&self.pipeline),
            Arc::clone(&self.limit),
            self.stop.clone(),
        );
        let (mut wait, retry_max) = (self.retry_min, self.retry_max);
        async move {
            let inbound = Inbound::new(delivery.data.clone(), delivery.properties.clone());
            loop {
                let outcome = {
                    let Ok(_permit) = limit.acquire().await else {
                        return key;
                    };
                    pipeline.settle(&inbound).await
                };
                match outcome {
                    Ok(_) => {
                        if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                            // Finished but not acked: the redelivery will be a duplicate.
                            warn!(%error, ipn.order_key = %key, "cannot ack a finished ipn");
                        }
                        return key;
                    }
                    Err(error) => {
                        warn!(%error, ipn.order_key = %key, retry_in = ?wait, "ipn not finished; retrying");
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return key,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(retry_max);
            }
        }
    }
}

/// The lane of a delivery: its `x-ipn-order-key`, or (without one) the key the body gives.
fn lane_of(delivery: &Delivery) -> String {
    header_text(&delivery.properties, "x-ipn-order-key").unwrap_or_else(|| {
        let form = crate::ipn::Form::parse(&delivery.data);
        crate::ipn::PayPal::order_key_of(&form, &delivery.data).to_string()
    })
}
