//! One request: route it, and for an IPN read it within limits, publish it and answer.
//!
//! The invariant kept here: `200` is written only after the broker confirmed the message to a
//! queue. Every other outcome maps, in [`status_of`], to a status and a short reason.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use lapin::BasicProperties;
use lapin::types::ShortString;
use tracing::{Instrument, debug, field, info, info_span, warn};

use super::metrics::{RefusedLabel, StatusLabel};
use super::{App, Sink};
use crate::alert::{Alert, Kind};
use crate::amqp::{Outgoing, PublishError, State};
use crate::keys::OrderKey;
use crate::provider::{Provider, Received, Refused};
use crate::topology::Topology;

/// Why an IPN request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Not a POST.
    #[error("method not allowed")]
    Method,
    /// Not a form body.
    #[error("content type must be application/x-www-form-urlencoded")]
    MediaType,
    /// Nothing to publish.
    #[error("empty body")]
    Empty,
    /// Over `ingress.max_body_bytes`.
    #[error("body too large")]
    TooLarge,
    /// The client did not finish sending the body in time.
    #[error("body not received in time")]
    SlowBody,
    /// The connection broke or the framing was wrong while reading the body.
    #[error("unreadable body")]
    BadBody,
    /// The provider's own check at the door failed (e.g. a bad signature).
    #[error("refused: {}", .0.reason)]
    Refused(Refused),
    /// The broker did not confirm.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// The content type a provider that needs none (Alipay) is published with.
const FORM: &str = "application/x-www-form-urlencoded";

/// The one place that decides what each outcome answers.
pub fn status_of(rejection: &Rejection) -> StatusCode {
    match rejection {
        Rejection::Method => StatusCode::METHOD_NOT_ALLOWED,
        Rejection::MediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Rejection::Empty | Rejection::BadBody | Rejection::Refused(_) => StatusCode::BAD_REQUEST,
        Rejection::TooLarge | Rejection::Publish(PublishError::TooLarge { .. }) => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        Rejection::SlowBody => StatusCode::REQUEST_TIMEOUT,
        // Anything the broker did or failed to do: PayPal must resend later.
        Rejection::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Door {
    /// `ingress.listen`: the providers' paths, `/healthz`, `/readyz`, and `/metrics` when there
    /// is no admin listener.
    Public,
    /// `ingress.admin_listen`: `/healthz`, `/readyz` and `/metrics`, no notification.
    Admin,
}

/// Routes a request; never fails (every problem is an HTTP answer).
pub(super) async fn handle<S: Sink>(
    app: Arc<App<S>>,
    door: Door,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let route = match door {
        Door::Public => app.routes.iter().find(|(route, _)| route == path),
        Door::Admin => None,
    };
    let metrics_here = door == Door::Admin || !app.admin_door;
    let response = if let Some((_, provider)) = route {
        ipn(&app, provider.as_ref(), request).await
    } else {
        match path {
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" => readiness(&app),
            "/metrics" if metrics_here => {
                app.metrics.ready.set(i64::from(unready(&app).is_none()));
                let node = app.publisher.node();
                app.metrics.broker_node.set("publish", node.as_deref());
                crate::telemetry::metrics_response(
                    app.metrics.render(),
                    request.headers().get(hyper::header::ACCEPT),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    };
    Ok(response)
}

async fn ipn<S: Sink>(
    app: &App<S>,
    provider: &dyn Provider,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    // The request's lines carry these once known (recorded by `publish`), so they join with
    // the worker's lines for the same message id.
    let span = info_span!(
        "ipn",
        provider = provider.name(),
        message_id = field::Empty,
        ipn.order_key = field::Empty,
        shard = field::Empty,
    );
    async {
        // Counted by a guard: hyper drops this future when the client hangs up mid-request.
        let mut counted = Counted::start(&app.metrics);
        let response = match accept(app, provider, request).await {
            Ok(bytes) => {
                debug!(status = 200, bytes, "ipn accepted");
                Response::new(Full::new(Bytes::from_static(provider.acknowledgement())))
            }
            Err(rejection) => {
                if let Rejection::Refused(refused) = rejection {
                    refusal(app, provider, refused);
                }
                if let Some(skipped) = app.refusals.admit() {
                    let status = status_of(&rejection).as_u16();
                    info!(status, reason = %rejection, skipped, "ipn refused");
                }
                let mut response = reject(&rejection);
                if let Some(failure) = provider.failure(&rejection.to_string()) {
                    *response.body_mut() = Full::new(Bytes::from(failure.body));
                    let content_type = HeaderValue::from_static(failure.content_type);
                    response.headers_mut().insert(CONTENT_TYPE, content_type);
                }
                response
            }
        };
        counted.answered(response.status());
        response
    }
    .instrument(span)
    .await
}

/// Counts a refusal at the door, and alerts when the provider says it is worth it.
fn refusal<S: Sink>(app: &App<S>, provider: &dyn Provider, refused: Refused) {
    let label = RefusedLabel {
        provider: provider.name(),
        reason: refused.reason,
    };
    app.metrics.refused.get_or_create(&label).inc();
    if let Some(fix) = refused.alert {
        app.alerter.raise(Alert {
            kind: Kind::Refused,
            order_key: provider.name().to_owned(),
            txn_id: None,
            reason: refused.reason.to_owned(),
            fix: fix.to_owned(),
        });
    }
}

/// One IPN request in the in-flight gauge and, when it ends, in the request counter: under its
/// status, or under `dropped` when it ended without an answer (the client went away).
struct Counted<'a> {
    metrics: &'a super::Metrics,
    status: Option<StatusCode>,
}

impl<'a> Counted<'a> {
    fn start(metrics: &'a super::Metrics) -> Counted<'a> {
        metrics.in_flight.inc();
        Counted {
            metrics,
            status: None,
        }
    }

    fn answered(&mut self, status: StatusCode) {
        self.status = Some(status);
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        let status = self
            .status
            .map_or_else(|| "dropped".to_owned(), |s| s.as_u16().to_string());
        self.metrics
            .requests
            .get_or_create(&StatusLabel { status })
            .inc();
    }
}

/// Reads and publishes one IPN; returns its size once the broker confirmed it.
async fn accept<S: Sink>(
    app: &App<S>,
    provider: &dyn Provider,
    request: Request<Incoming>,
) -> Result<usize, Rejection> {
    let received_at = SystemTime::now();
    if request.method() != Method::POST {
        return Err(Rejection::Method);
    }
    // Kept verbatim for the message; an AMQP short string holds at most 255 bytes.
    let header = match request.headers().get(CONTENT_TYPE) {
        Some(value) => Some(value.to_str().map_err(|_| Rejection::MediaType)?),
        None => None,
    };
    if !provider.accepts_content_type(header) {
        return Err(Rejection::MediaType);
    }
    let content_type = header.unwrap_or(FORM);
    let content_type = ShortString::try_new(content_type).map_err(|_| Rejection::MediaType)?;
    let max = app.config.max_body_bytes.get();
    let declared = declared_length(&request);
    if declared.is_some_and(|length| length > max) {
        return Err(Rejection::TooLarge);
    }
    let (parts, body) = request.into_parts();
    let body = read_body(body, max, declared.unwrap_or(0), app).await?;
    if body.is_empty() {
        return Err(Rejection::Empty);
    }
    let received = Received {
        body: &body,
        headers: &parts.headers,
        received_at,
    };
    let key = provider.admit(&received).map_err(Rejection::Refused)?;
    publish(app, provider, content_type, &received, key).await?;
    Ok(body.len())
}

fn declared_length(request: &Request<Incoming>) -> Option<usize> {
    let value = request.headers().get(CONTENT_LENGTH)?;
    value.to_str().ok()?.parse().ok()
}

/// Reads at most `max` bytes within `ingress.body_read_timeout`; stops reading (and rejects) as
/// soon as the limit is passed.
async fn read_body<S: Sink>(
    body: Incoming,
    max: usize,
    expected: usize,
    app: &App<S>,
) -> Result<Bytes, Rejection> {
    let read = copy_body(body, max, expected);
    tokio::time::timeout(app.config.body_read_timeout, read)
        .await
        .unwrap_or(Err(Rejection::SlowBody))
}

/// Copies each frame into one buffer of at most `max` bytes and lets the frame go at once:
/// hyper hands a body dribbled a byte per TCP segment over as a frame per byte, and keeping
/// the frames (as `collect()` does) pins a read buffer for each (~7 KiB per byte sent).
async fn copy_body(mut body: Incoming, max: usize, expected: usize) -> Result<Bytes, Rejection> {
    let mut buffer = BytesMut::with_capacity(expected.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            debug!(%error, "cannot read request body");
            Rejection::BadBody
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing for us
        };
        if buffer.len() + data.len() > max {
            return Err(Rejection::TooLarge);
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer.freeze())
}

async fn publish<S: Sink>(
    app: &App<S>,
    provider: &dyn Provider,
    content_type: ShortString,
    received: &Received<'_>,
    key: OrderKey,
) -> Result<(), Rejection> {
    let body = received.body;
    let shard = key.shard(app.topology.shards());
    let message_id = uuid::Uuid::now_v7().to_string();
    let span = tracing::Span::current();
    span.record("message_id", message_id.as_str());
    span.record("ipn.order_key", key.as_str());
    span.record("shard", shard);
    let routing_key = Topology::shard_routing_key(shard);
    let exchange = app.topology.inbound_exchange();
    let mut properties = inbound_properties(
        provider.name(),
        content_type,
        key.as_str(),
        &message_id,
        received.received_at,
    );
    let carried = provider.carried_headers();
    if !carried.is_empty() {
        let mut headers = properties.headers().clone().unwrap_or_default();
        crate::contract::carry_request_headers(&mut headers, carried, |name| received.header(name));
        properties = properties.with_headers(headers);
    }
    let message = Outgoing {
        exchange: &exchange,
        routing_key: &routing_key,
        body,
        properties,
    };
    let started = Instant::now();
    let result = app
        .publisher
        .publish(message, app.config.confirm_timeout)
        .await;
    app.metrics
        .confirm_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        let error = crate::bounded::error_chain(error);
        warn!(error, "ipn not persisted");
    }
    Ok(result?)
}

/// The inbound message contract: content type as received, `message_id` (time-ordered, made by
/// the caller so its log lines can name it), and our headers, with the time the request was
/// received. The worker increments `x-ipn-attempt` each time it sends the message to a retry
/// tier. (Public for the benchmark's raw publisher, which publishes the very messages the
/// ingress does.)
pub fn inbound_properties(
    provider: &str,
    content_type: ShortString,
    order_key: &str,
    message_id: &str,
    received_at: SystemTime,
) -> BasicProperties {
    let headers = crate::contract::ingress_headers(provider, order_key, received_at);
    let seconds = received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type(content_type)
        .with_message_id(ShortString::from(message_id))
        .with_timestamp(seconds)
        .with_app_id(ShortString::from("ipn-ingress"))
        .with_headers(headers)
}

/// Why the ingress cannot take a notification now, or `None` when it is ready: what `/readyz`
/// answers and `ipn_ingress_ready` exports.
fn unready<S: Sink>(app: &App<S>) -> Option<&'static str> {
    if app.draining.is_cancelled() {
        return Some("shutting down");
    }
    match app.publisher.state() {
        State::Ready => None,
        State::Blocked => Some("broker blocked publishing"),
        State::Down => Some("broker unavailable"),
    }
}

fn readiness<S: Sink>(app: &App<S>) -> Response<Full<Bytes>> {
    match unready(app) {
        None => text(StatusCode::OK, "ready"),
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

fn reject(rejection: &Rejection) -> Response<Full<Bytes>> {
    let mut response = text(status_of(rejection), &rejection.to_string());
    if matches!(rejection, Rejection::Method) {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    let plain = HeaderValue::from_static("text/plain; charset=utf-8");
    response.headers_mut().insert(CONTENT_TYPE, plain);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_rejection_maps_to_its_status() {
        let cases = [
            (Rejection::Method, 405),
            (Rejection::MediaType, 415),
            (Rejection::Empty, 400),
            (Rejection::BadBody, 400),
            (Rejection::TooLarge, 413),
            (Rejection::SlowBody, 408),
            (PublishError::Unavailable.into(), 503),
            (PublishError::Blocked.into(), 503),
            (PublishError::Nacked.into(), 503),
            (PublishError::Unroutable.into(), 503),
            (PublishError::Timeout(Duration::from_secs(5)).into(), 503),
        ];
        for (rejection, status) in cases {
            assert_eq!(status_of(&rejection).as_u16(), status, "{rejection}");
        }
    }

    #[test]
    fn the_reason_is_a_short_line() {
        let response = reject(&Rejection::Publish(PublishError::Blocked));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = reject(&Rejection::Method);
        assert_eq!(
            response.headers().get(ALLOW).map(|v| v.as_bytes()),
            Some(&b"POST"[..])
        );
    }
}
