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
