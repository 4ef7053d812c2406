//! `ipn-ingress`: the HTTP server PayPal posts IPNs to.
//!
//! Keeps the first promise: an IPN gets `200` only when RabbitMQ has confirmed it to a shard
//! queue, byte for byte. Broker down, blocked, slow or refusing: `503`, so PayPal resends.
//! On shutdown it stops accepting, lets in-flight requests finish (each still answers 200 or
//! 503) within the grace period, then closes its broker connection.

mod handler;
mod metrics;

pub use handler::{Rejection, status_of};
pub use metrics::Metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::amqp::Publisher;
use crate::config::{self, Config};
use crate::ipn::PayPal;
use crate::provider::Provider;
use crate::topology::Topology;

/// What every request handler shares.
struct App {
    config: config::Ingress,
    provider: Box<dyn Provider>,
    publisher: Publisher,
    topology: Topology,
    metrics: Metrics,
    draining: CancellationToken,
}

/// Serves IPNs on `listener` until `shutdown` resolves, then drains and returns.
///
/// Connects to the broker in the background: until connected, IPNs get 503 and `/readyz` says
/// not ready.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let topology = Topology::of(&config);
    let publisher = Publisher::start(&config.amqp, topology.clone(), "ipn-ingress");
    let app = Arc::new(App {
        config: config.ingress,
        provider: Box::new(PayPal),
        publisher,
        topology,
        metrics: Metrics::new(),
        draining: CancellationToken::new(),
    });
    if let Ok(address) = listener.local_addr() {
        info!(%address, path = %app.config.path, "ipn-ingress listening");
    }
    let connections = GracefulShutdown::new();
    accept_until(&listener, &app, &connections, shutdown).await;
    drop(listener);
    app.draining.cancel();
    drain(connections, app.config.shutdown_grace).await;
    app.publisher.close().await;
    info!("ipn-ingress stopped");
}

async fn accept_until(
    listener: &TcpListener,
    app: &Arc<App>,
    connections: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors: wait a little instead of spinning.
                warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Answers are small single writes: don't let Nagle hold them behind a delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let app = Arc::clone(app);
        let service = service_fn(move |request| handler::handle(Arc::clone(&app), request));
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn drain(connections: GracefulShutdown, grace: Duration) {
    info!(grace = ?grace, "draining in-flight requests");
    tokio::select! {
        () = connections.shutdown() => info!("all requests answered"),
        () = tokio::time::sleep(grace) => warn!("grace period over; cutting remaining connections"),
    }
}
