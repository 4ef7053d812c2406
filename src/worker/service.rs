//! The worker assembled: its parts (database, PayPal client, publisher, alerts), the health
//! server and housekeeping loops beside the consume session, and shutdown.
//!
//! Keeps the shutdown rule: `stop` is honoured from the first moment (a database that does not
//! answer at start-up cannot hold a SIGTERM), and a stop drains within `worker.shutdown_grace`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pipeline::Pipeline;
use super::session::{Session, host};
use super::{health, housekeeping, watch};
use crate::alert::Alerter;
use crate::amqp::{self, Publisher};
use crate::config::Config;
use crate::provider::paypal::verify::{self, Verifier};
use crate::store::{self, Store};
use crate::topology::Topology;

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

/// This worker's id among the workers: `worker.id`, or `<host>-<uuid v7>` (fresh per start).
pub fn id(config: &Config) -> String {
    config
        .worker
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", host(), uuid::Uuid::now_v7().simple()))
}

/// Runs the worker until `shutdown` resolves, then drains within `worker.shutdown_grace`.
/// A lost broker connection is re-established with backoff (`amqp.reconnect_min`..`max`); what
/// was unacked then returns to the queues and is redelivered (a finished IPN as a duplicate).
/// `/healthz`, `/readyz` and `/metrics` are served on `health`. A shutdown during start-up
/// returns `Ok` at once.
pub async fn run(
    config: Config,
    health: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let stop = CancellationToken::new();
    let mut serving = std::pin::pin!(serve(config, health, stop.clone()));
    tokio::select! {
        result = &mut serving => return result,
        () = shutdown => stop.cancel(),
    }
    serving.await
}

async fn serve(config: Config, health: TcpListener, stop: CancellationToken) -> Result<(), Error> {
    let store = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        store = Store::connect(&config.database) => store?,
    };
    let verifier = Verifier::new(&config.paypal)?;
    let topology = Topology::of(&config);
    let publisher = Publisher::start(&config.amqp, topology.clone(), "ipn-worker-publish");
    let pipeline = Pipeline::new(&config, verifier, store.clone(), publisher);
    let alerter = Alerter::start(&config.alert, pipeline.metrics().alerts.clone())?;
    let pipeline = Arc::new(pipeline.with_alerter(alerter));
    // Consuming before events can be published would only fail and retry every IPN.
    let connected = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        connected = pipeline.wait_publisher(config.amqp.connect_timeout) => connected,
    };
    if !connected {
        warn!("publisher not connected yet; IPNs will be retried until it is");
    }
    let consuming = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(health::serve(
        health,
        Arc::clone(&pipeline),
        Arc::clone(&consuming),
        stop.clone(),
    ));
    let purge = tokio::spawn(housekeeping::purge_periodically(
        store.clone(),
        config.database.dedup_retention,
        stop.clone(),
    ));
    let id = id(&config);
    let gauges = tokio::spawn(housekeeping::count_blocked(
        store.clone(),
        Arc::clone(&pipeline),
        config.clone(),
        id.clone(),
        stop.clone(),
    ));
    info!(worker = %id, "ipn-worker starting");
    let watch = tokio::spawn(watch::watch_queues(
        config.clone(),
        store.clone(),
        Arc::clone(&pipeline),
        id.clone(),
        stop.clone(),
    ));
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
    // Returns once `stop` is cancelled and the session drained and closed its connection.
    session.keep_consuming().await;
    // The background tasks end at once: they watch `stop`.
    let _ = purge.await;
    let _ = gauges.await;
    let _ = watch.await;
    let _ = probes.await;
    store.close().await;
    info!("ipn-worker stopped");
    Ok(())
}
