//! Log set-up: `RUST_LOG` filters (default `info`), the format comes from the config, and every
//! line names the process (`service`, and the worker's id as `worker` once it is known).
//!
//! One IPN's lines join on `message_id`: the ingress logs each request in a span carrying it
//! (with `ipn.order_key` and `shard`), the worker each delivery in a span carrying it with
//! `ipn.order_key`, `attempt`, `ipn.txn_id` once read and `event_id` once reserved. In JSON the
//! span's fields are under `span`.
//!
//! IPN bodies carry payer names and addresses: no code logs a body, or a field other than ids,
//! at any level.

pub mod process;

use std::sync::OnceLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The process's name and, for a worker, its id: on every line.
static SERVICE: OnceLock<&'static str> = OnceLock::new();
static INSTANCE: OnceLock<String> = OnceLock::new();

/// Installs the global subscriber for `service` (`ipn-ingress`, `ipn-worker`); a second call
/// (tests) leaves the first in place.
pub fn init(service: &'static str, format: LogFormat) {
    let _ = SERVICE.set(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // `try_init` only fails when a subscriber is already set, which is fine to keep.
    let _ = match format {
        LogFormat::Pretty => builder
            .with_ansi(false)
            .event_format(Named {
                inner: tracing_subscriber::fmt::format().with_ansi(false),
                json: false,
            })
            .try_init(),
        // Span fields must be recorded as JSON too (the JSON line embeds them as they are).
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Named {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
                json: true,
            })
            .try_init(),
    };
}

/// Names this process's instance on every later line (the worker's id).
pub fn set_instance(id: &str) {
    let _ = INSTANCE.set(crate::bounded::shown(id));
}

/// A line format that adds `service` and `worker` to what `inner` writes.
struct Named<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for Named<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let service = SERVICE.get().copied().unwrap_or("ipn-bridge");
        let instance = INSTANCE.get();
        if self.json {
            let Some(rest) = line.strip_prefix('{') else {
                return writer.write_str(&line);
            };
            write!(writer, "{{\"service\":\"{service}\",")?;
            if let Some(id) = instance {
                // Bounded and free of control characters; JSON-escaped by serde.
                let id = serde_json::Value::from(id.as_str());
                write!(writer, "\"worker\":{id},")?;
            }
            writer.write_str(rest)
        } else {
            let body = line.strip_suffix('\n').unwrap_or(&line);
            write!(writer, "{body} service={service}")?;
            if let Some(id) = instance {
                write!(writer, " worker={id}")?;
            }
            writeln!(writer)
        }
    }
}

/// The Prometheus text exposition of every metric in `registry`.
pub fn render_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// OpenMetrics' content type, served to a scraper that asks for it (Prometheus does).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type (0.0.4), served to everyone else (`curl`,
/// `promtool check metrics`).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type of `/metrics` for a request with this `Accept` header: the
/// OpenMetrics text as rendered when the client accepts it, otherwise the same metrics in the
/// Prometheus text format (a counter's `# HELP`/`# TYPE` name its `_total` series, no `# UNIT`,
/// no `# EOF`), so that neither parser takes a counter for an untyped metric.
pub fn exposition(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if accept.is_some_and(|accept| accept.contains("application/openmetrics-text")) {
        return (OPENMETRICS, openmetrics);
    }
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(renamed) => text.push_str(&renamed),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    (PROMETHEUS_TEXT, text)
}

/// The `/metrics` answer of either binary for a request with this `Accept` header
/// ([`exposition`]).
pub fn metrics_response(
    openmetrics: String,
    accept: Option<&hyper::header::HeaderValue>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let accept = accept.and_then(|value| value.to_str().ok());
    let (content_type, body) = exposition(openmetrics, accept);
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    fn rendered() -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ipn_test");
        let counter = Counter::<u64>::default();
        counter.inc();
        registry.register("requests", "Requests", counter);
        registry.register("in_flight", "In flight", Gauge::<i64>::default());
        render_metrics(&registry)
    }

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_typed_prometheus_text() {
        let openmetrics = rendered();
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        let (kind, body) = exposition(
            openmetrics.clone(),
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        );
        assert_eq!((kind, body.as_str()), (OPENMETRICS, openmetrics.as_str()));
        let (kind, body) = exposition(openmetrics, None);
        assert_eq!(kind, PROMETHEUS_TEXT);
        assert_eq!(
            body,
            "# HELP ipn_test_requests_total Requests.\n# TYPE ipn_test_requests_total counter\nipn_test_requests_total 1\n# HELP ipn_test_in_flight In flight.\n# TYPE ipn_test_in_flight gauge\nipn_test_in_flight 0\n"
        );
    }
}
