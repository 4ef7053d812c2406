//! The worker's `/healthz`, `/readyz` and `/metrics` on `worker.listen`.
//!
//! `/readyz` is 200 only while the worker consumes every shard it owns, both broker connections
//! are up, publishing is not blocked and the database answered its last check; the session
//! ([`super::session`]) says whether it is consuming.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::pipeline::Pipeline;
use crate::amqp::State;
use crate::server::Connections;

/// Probe connections served at once: probes and scrapes are few; a flood waits in the backlog.
const MAX_CONNECTIONS: usize = 64;

/// A probe must send its request within this time, so idle connections cannot hold the slots.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the probes and metrics until `stop`.
pub(super) async fn serve(
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    consuming: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let stopped = stop.clone().cancelled_owned();
    let http = crate::server::http1_settings(HEADER_READ_TIMEOUT);
    let connections = Connections::new(MAX_CONNECTIONS);
    connections
        .accept_until(&listener, stopped, |accepted| {
            let (pipeline, consuming, stopping) =
                (Arc::clone(&pipeline), Arc::clone(&consuming), stop.clone());
            let service = service_fn(move |request: Request<Incoming>| {
                let accept = request.headers().get(hyper::header::ACCEPT);
                let response = probe(
                    request.uri().path(),
                    accept,
                    &pipeline,
                    &consuming,
                    &stopping,
                );
                async move { Ok::<_, Infallible>(response) }
            });
            accepted.serve(&http, service);
        })
        .await;
}

/// The answer to one probe.
fn probe(
    path: &str,
    accept: Option<&hyper::header::HeaderValue>,
    pipeline: &Pipeline,
    consuming: &AtomicBool,
    stopping: &CancellationToken,
) -> Response<Full<Bytes>> {
    if path == "/metrics" {
        let metrics = pipeline.metrics();
        let up = |connection, up: bool| {
            let label = super::metrics::ConnectionLabel { connection };
            metrics.connected.get_or_create(&label).set(i64::from(up));
        };
        up("publish", pipeline.publisher_state() != State::Down);
        up("consume", consuming.load(Ordering::Relaxed));
        up("database", pipeline.database_up.load(Ordering::Relaxed));
        let node = pipeline.publisher.node();
        metrics.broker_node.set("publish", node.as_deref());
        return crate::telemetry::metrics_response(metrics.render(), accept);
    }
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok".to_owned()),
        "/readyz" => readiness(pipeline, consuming, stopping),
        _ => (StatusCode::NOT_FOUND, "not found".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = status;
    response
}

fn readiness(
    pipeline: &Pipeline,
    consuming: &AtomicBool,
    stopping: &CancellationToken,
) -> (StatusCode, String) {
    let unavailable = |why: &str| (StatusCode::SERVICE_UNAVAILABLE, why.to_owned());
    if stopping.is_cancelled() {
        return unavailable("shutting down");
    }
    if !consuming.load(Ordering::Relaxed) {
        return unavailable("not consuming its shards: broker connection down or being restored");
    }
    if !pipeline.database_up.load(Ordering::Relaxed) {
        return unavailable("database unavailable");
    }
    match pipeline.publisher_state() {
        State::Ready => (StatusCode::OK, "ready".to_owned()),
        State::Blocked => unavailable("broker blocked publishing"),
        State::Down => unavailable("broker unavailable for publishing"),
    }
}
