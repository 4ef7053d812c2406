//! Shared test fixtures: a vhost per test, a cuttable TCP proxy, an in-process ingress.

pub mod alerts;
pub mod broker;
pub mod db;
pub mod ingress;
pub mod load;
pub mod proxy;
pub mod services;
pub mod worker_process;

pub use alerts::{FakeSmtp, FakeWebhook};
pub use broker::{DiskAlarm, TestBroker};
pub use db::TestDb;
pub use ingress::{post_form, ready_ingress, spawn_ingress};
pub use proxy::Proxy;
pub use services::Services;
pub use worker_process::{WorkerProcess, log_tail};

#[path = "../../samples.rs"]
mod samples_dir;

pub use samples_dir::{sample, samples};

use std::time::Duration;

/// The generous bound every wait in these tests uses.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// An HTTP client whose every request gives up after [`PATIENCE`]: a server that accepts and
/// never answers fails the wait that asked instead of hanging the test (and CI) for good.
pub fn http() -> reqwest::Client {
    http_within(PATIENCE)
}

/// [`http`] with a bound of the caller's (a load generator that waits as long as PayPal does).
pub fn http_within(limit: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(limit)
        .build()
        .expect("HTTP client")
}

/// `reqwest::get` with [`http`]'s bound: a GET that fails after `PATIENCE` instead of waiting
/// on a server that accepted the connection and never answers.
pub async fn http_get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    http().get(url).send().await
}

/// Sends SIGTERM to `child`, as an orchestrator stops a binary, and waits up to `limit` for it to
/// end; its exit status. Panics when the signal cannot be sent or the wait runs out.
pub async fn terminate(
    child: &mut tokio::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let pid = child.id().expect("running").to_string();
    let signalled = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(signalled.success(), "SIGTERM {pid}");
    tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{pid} ended within {limit:?} of SIGTERM"))
        .expect("wait")
}

/// One metric's value from the Prometheus text at `url` (the first line starting with `name`);
/// `None` when the server does not answer or has no such line.
pub async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = http().get(url).send().await.ok()?.text().await.ok()?;
    let line = text.lines().find(|line| line.starts_with(name))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// `body` with the named fields' values replaced (raw, as they go on the wire); other fields and
/// their order stay as they are.
pub fn with_fields(body: &[u8], replaced: &[(&str, &str)]) -> Vec<u8> {
    let fields: Vec<Vec<u8>> = body
        .split(|b| *b == b'&')
        .map(|field| {
            let name = field.split(|b| *b == b'=').next().unwrap_or_default();
            match replaced.iter().find(|(n, _)| n.as_bytes() == name) {
                Some((n, value)) => format!("{n}={value}").into_bytes(),
                None => field.to_vec(),
            }
        })
        .collect();
    fields.join(&b'&')
}
