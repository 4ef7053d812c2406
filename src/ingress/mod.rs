//! `ipn-ingress`: the HTTP server PayPal posts IPNs to.
//!
//! Keeps the first promise: an IPN gets `200` only when RabbitMQ has confirmed it to a shard
//! queue, byte for byte. Broker down, blocked, slow or refusing: `503`, so PayPal resends.
//! On shutdown it stops accepting, lets in-flight requests finish (each still answers 200 or
//! 503) within the grace period, then closes its broker connection.

mod handler;
mod metrics;

pub use handler::{Rejection, inbound_properties, status_of};
pub use metrics::Metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::amqp::{Outgoing, PublishError, Publisher, State};
use crate::config::{self, Config};
use crate::provider::Provider;
use crate::server::Connections;
use crate::topology::Topology;

/// Where the ingress puts an accepted IPN: the broker, through the [`Publisher`], in production;
/// anything that answers like it where the broker is not the point (the request fuzz target).
pub trait Sink: Send + Sync + 'static {
    /// Persists `message`. `Ok` only when it is safe: the ingress then answers 200.
    fn publish(
        &self,
        message: Outgoing<'_>,
        limit: Duration,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Whether a publish can succeed now (`/readyz`).
    fn state(&self) -> State;

    /// The broker node (`host:port`) publishes go to now, for the metrics.
    fn node(&self) -> Option<String> {
        None
    }
}

impl Sink for Publisher {
    fn publish(
        &self,
        message: Outgoing<'_>,
        limit: Duration,
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        Publisher::publish(self, message, limit)
    }

    fn state(&self) -> State {
        Publisher::state(self)
    }

    fn node(&self) -> Option<String> {
        Publisher::node(self)
    }
}

/// Refusal lines a second, at most: anyone can send bad requests, so their lines are bounded
/// (`ipn_ingress_requests_total` counts every one).
const REFUSALS_LOGGED_PER_SECOND: u32 = 20;

/// What every request handler shares.
struct App<S> {
    config: config::Ingress,
    /// Each provider's route: PayPal at `ingress.path`, the others at their own path when
    /// enabled.
    routes: Vec<(String, Box<dyn Provider>)>,
    publisher: S,
    topology: Topology,
    metrics: Metrics,
    draining: CancellationToken,
    /// Refused requests are logged at info, at most this many lines a second.
    refusals: crate::bounded::LogBudget,
    /// Refusals worth a human's attention (a provider's key changed, the clock is off).
    alerter: crate::alert::Alerter,
    /// Whether an admin listener serves `/metrics` (the public one then answers it 404).
    admin_door: bool,
}

/// Connections the admin listener serves at once: Prometheus, the probes and an operator.
const ADMIN_CONNECTIONS: usize = 32;

/// How long the admin listener's last answers get once the public listener has drained.
const ADMIN_GRACE: Duration = Duration::from_secs(1);

/// Serves IPNs on `listener` (and `/healthz`, `/readyz`, `/metrics` on `admin`, when given,
/// instead of `/metrics` on `listener`) until `shutdown` resolves, then drains and returns.
///
/// Connects to the broker in the background: until connected, IPNs get 503 and `/readyz` says
/// not ready.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    // The intake's side only: a business service's queue the broker refuses to redeclare (one
    // declared with other arguments) must never stop IPNs from being taken in.
    let topology = Topology::of(&config).without_downstream();
    let publisher = Publisher::start(&config.amqp, topology.clone(), "ipn-ingress");
    let mut app = App::new(&config, topology, publisher);
    app.admin_door = admin.is_some();
    let counters = app.metrics.alerts.clone();
    app.alerter = match crate::alert::Alerter::start(&config.alert, counters) {
        Ok(alerter) => alerter,
        Err(error) => {
            let error = crate::bounded::error_chain(&error);
            warn!(error, "alerts cannot be sent; refusals are only logged");
            crate::alert::Alerter::logging_only()
        }
    };
    let app = Arc::new(app);
    if let Ok(address) = listener.local_addr() {
        let paths: Vec<String> = app
            .routes
            .iter()
            .map(|(path, provider)| format!("{path} ({})", provider.name()))
            .collect();
        info!(%address, routes = paths.join(", "), "ipn-ingress listening");
        if admin.is_none() && !address.ip().is_loopback() {
            warn!(
                %address,
                "/metrics is served on the public listener (the notification volume, the \
                 refusals, the broker node's address); set ingress.admin_listen to serve it \
                 on an address of its own"
            );
        }
    }
    let admin_stop = CancellationToken::new();
    let admin = admin.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "ipn-ingress serving /healthz, /readyz and /metrics");
        }
        tokio::spawn(serve_admin(Arc::clone(&app), listener, admin_stop.clone()))
    });
    let connections = Connections::new(app.config.max_connections.get());
    serve_door(
        &app,
        &connections,
        &listener,
        handler::Door::Public,
        shutdown,
    )
    .await;
    drop(listener);
    app.draining.cancel();
    drain(&connections, app.config.shutdown_grace).await;
    // The admin listener answered `/readyz` 503 through the drain; it stops after it.
    admin_stop.cancel();
    if let Some(admin) = admin
        && let Err(error) = admin.await
    {
        warn!(%error, "the admin listener's task failed");
    }
    app.publisher.close().await;
    info!("ipn-ingress stopped");
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `stop` is cancelled.
async fn serve_admin<S: Sink>(app: Arc<App<S>>, listener: TcpListener, stop: CancellationToken) {
    let connections = Connections::new(ADMIN_CONNECTIONS);
    serve_door(
        &app,
        &connections,
        &listener,
        handler::Door::Admin,
        stop.cancelled(),
    )
    .await;
    drop(listener);
    connections.drain(ADMIN_GRACE).await;
}

/// Accepts connections on `listener` until `until` resolves, serving each as `door`.
async fn serve_door<S: Sink>(
    app: &Arc<App<S>>,
    connections: &Connections,
    listener: &TcpListener,
    door: handler::Door,
    until: impl Future<Output = ()>,
) {
    let http = app.http();
    connections
        .accept_until(listener, until, |accepted| {
            let app = Arc::clone(app);
            accepted.serve(
                &http,
                service_fn(move |request| handler::handle(Arc::clone(&app), door, request)),
            );
        })
        .await;
}

impl<S: Sink> App<S> {
    fn new(config: &Config, topology: Topology, publisher: S) -> App<S> {
        let routes = crate::provider::routes(config);
        let metrics = Metrics::new();
        let providers: Vec<&dyn Provider> = routes.iter().map(|(_, p)| p.as_ref()).collect();
        metrics.initialize(&providers);
        App {
            config: config.ingress.clone(),
            routes,
            publisher,
            topology,
            metrics,
            draining: CancellationToken::new(),
            refusals: crate::bounded::LogBudget::new(REFUSALS_LOGGED_PER_SECOND),
            alerter: crate::alert::Alerter::logging_only(),
            admin_door: false,
        }
    }

    /// The HTTP/1 server settings every connection gets.
    fn http(&self) -> http1::Builder {
        crate::server::http1_settings(self.config.header_read_timeout)
    }
}

/// Serves one connection exactly as [`run`] serves each of its connections (same HTTP settings,
/// same handler, same limits and answers), with `sink` in place of the broker. For fuzzing the
/// request handling: no broker, no listener, any byte stream as the client.
pub async fn serve_connection<S, Io>(config: &Config, sink: S, io: Io)
where
    S: Sink,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app = Arc::new(App::new(config, Topology::of(config), sink));
    let http = app.http();
    let service = service_fn(move |request| {
        handler::handle(Arc::clone(&app), handler::Door::Public, request)
    });
    if let Err(error) = http.serve_connection(TokioIo::new(io), service).await {
        debug!(%error, "connection ended with an error");
    }
}

async fn drain(connections: &Connections, grace: Duration) {
    info!(grace = ?grace, "draining in-flight requests");
    if connections.drain(grace).await {
        info!("all requests answered");
    } else {
        warn!("grace period over; cutting remaining connections");
    }
}
