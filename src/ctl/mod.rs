//! `ipnctl`, the operator's tool: each subcommand is a function here, the binary only parses.

pub mod demo;
pub mod downstream;
pub mod events;
pub mod review;
pub mod status;

use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::topology::Topology;

/// PayPal's own User-Agent on IPN posts. It proves nothing; `send` uses it to look the same.
pub const PAYPAL_USER_AGENT: &str = "PayPal IPN ( https://www.paypal.com/ipn )";

/// Declares the whole topology (idempotent) and describes what now exists.
pub async fn declare_topology(config: &Config) -> anyhow::Result<String> {
    let topology = Topology::of(config);
    let connection = connect(config).await?;
    topology
        .declare(&connection)
        .await
        .context("cannot declare the topology")?;
    // The declaration is done; a failing close changes nothing about it.
    let _ = connection.close(200, "done".into()).await;
    Ok(format!(
        "declared exchange {} and queues {}",
        topology.inbound_exchange(),
        topology.queues().join(", ")
    ))
}

/// The URL `send` posts to when none is given: the configured ingress address and path.
pub fn default_ingress_url(config: &Config) -> String {
    format!("http://{}{}", config.ingress.listen, config.ingress.path)
}

/// `http://<ingress.listen><path>`: another provider's route on the configured ingress.
pub fn ingress_url(config: &Config, path: &str) -> String {
    format!("http://{}{path}", config.ingress.listen)
}

/// POSTs `body` unchanged the way PayPal does; returns the status and the answer's body.
pub async fn send(url: &str, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .user_agent(PAYPAL_USER_AGENT)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let response = client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot POST to {url}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    Ok((status, text))
}

/// GETs `url` within `timeout`: its status and its body's first line (bounded), or why there
/// was no answer.
pub async fn probe(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|error| format!("cannot build an HTTP client: {error}"))?;
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            Ok((status, crate::bounded::shown(text.trim())))
        }
        Err(error) => Err(format!(
            "no answer: {}",
            crate::bounded::error_chain(&error.without_url())
        )),
    }
}

/// `ipnctl health URL`: [`probe`]s `url` (a binary's `/healthz` or `/readyz`); the line to print,
/// and whether it answered 200. A container healthcheck with nothing but our image (no curl in
/// it).
pub async fn health(url: &str, timeout: Duration) -> (String, bool) {
    match probe(url, timeout).await {
        Ok((status, text)) => (format!("{url}: {status} {text}"), status == 200),
        Err(why) => (format!("{url}: {why}"), false),
    }
}

/// A broker connection for one ipnctl command, its failure naming the broker.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<lapin::Connection> {
    let connected = crate::amqp::connect(&config.amqp, "ipnctl")
        .await
        .with_context(|| format!("cannot connect to {}", config.amqp.shown()))?;
    Ok(connected.connection)
}

/// Runs a fake PayPal postback endpoint on `listen` until SIGINT/SIGTERM.
pub async fn fake_paypal(
    listen: std::net::SocketAddr,
    answer: crate::fake_paypal::Answer,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let fake = crate::fake_paypal::FakePaypal::start(listener, answer)?;
    println!("fake PayPal answering {answer} at {}", fake.url());
    println!(
        "point the worker at it: IPN_PAYPAL__VERIFY_URL={}",
        fake.url()
    );
    crate::shutdown::signal().await;
    fake.stop().await;
    Ok(())
}

/// A live worker and the shards it owns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Worker {
    /// Its id.
    pub worker_id: String,
    /// Its host.
    pub host: String,
    /// Seconds since it started.
    pub up_seconds: u64,
    /// Milliseconds since its last heartbeat.
    pub silent_ms: u64,
    /// The shards it owns (rendezvous hashing over the live workers, as the workers compute it).
    pub shards: Vec<u16>,
}

/// The live workers (heartbeat within `worker.takeover`) and the shards each owns.
pub async fn workers(config: &Config) -> anyhow::Result<Vec<Worker>> {
    let store = crate::store::Store::connect_existing(&config.database)
        .await
        .context("cannot connect to the worker's database")?;
    let live = store.live_workers(config.worker.takeover).await;
    store.close().await;
    let live = live.context("cannot read the workers")?;
    let ids: Vec<String> = live.iter().map(|w| w.worker_id.clone()).collect();
    let shards = config.topology.shards.get();
    Ok(live
        .into_iter()
        .map(|w| Worker {
            shards: crate::worker::ownership::owned_by(&w.worker_id, &ids, shards),
            worker_id: w.worker_id,
            host: w.host,
            up_seconds: w.up_seconds,
            silent_ms: w.silent_ms,
        })
        .collect())
}

/// Workers as a readable table.
pub fn workers_table(workers: &[Worker]) -> String {
    let rows = workers
        .iter()
        .map(|w| {
            let shards: Vec<String> = w.shards.iter().map(u16::to_string).collect();
            vec![
                w.worker_id.clone(),
                w.host.clone(),
                age(w.up_seconds),
                format!("{} ms", w.silent_ms),
                w.shards.len().to_string(),
                shards.join(","),
            ]
        })
        .collect();
    table(
        &["WORKER", "HOST", "UP", "LAST HEARTBEAT", "OWNS", "SHARDS"],
        rows,
    )
}

/// `n` things since `started` as a rate for a progress line: `412/s`.
pub(crate) fn rate(n: usize, started: std::time::Instant) -> String {
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    format!("{:.0}/s", n as f64 / seconds)
}

pub(crate) fn age(seconds: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

/// The widest a table cell gets (an event's routing key fits): longer values (a masspay key is
/// `msg:` and 64 hex digits) keep
/// their start and end around an ellipsis; `--json` has them whole.
pub(crate) const MAX_CELL_CHARS: usize = 48;

/// `cell` within [`MAX_CELL_CHARS`]: its first and last characters around `…`.
fn fitted(cell: String) -> String {
    let count = cell.chars().count();
    if count <= MAX_CELL_CHARS {
        return cell;
    }
    let keep = MAX_CELL_CHARS - 1;
    let head: String = cell.chars().take(keep - keep / 2).collect();
    let tail: String = cell.chars().skip(count - keep / 2).collect();
    format!("{head}…{tail}")
}

/// A table: columns padded to their widest cell (each cut to [`MAX_CELL_CHARS`]), two spaces
/// apart.
pub(crate) fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.into_iter().map(fitted).collect())
        .collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(head.iter().map(|h| (*h).to_owned()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_every_column_to_its_widest_cell() {
        let rows = vec![
            vec!["profile:I-1".to_owned(), "2".to_owned()],
            vec!["txn:A".to_owned(), "10".to_owned()],
        ];
        assert_eq!(
            table(&["KEY", "HELD"], rows),
            "KEY          HELD\nprofile:I-1  2\ntxn:A        10"
        );
    }

    #[test]
    fn a_long_cell_keeps_its_start_and_end_around_an_ellipsis() {
        let key = format!("msg:{}", "0123456789abcdef".repeat(4));
        let rows = vec![vec![key.clone(), "1".to_owned()]];
        let shown = table(&["KEY", "HELD"], rows);
        let cell = shown
            .lines()
            .nth(1)
            .expect("a row")
            .split("  ")
            .next()
            .expect("a cell");
        assert_eq!(cell.chars().count(), MAX_CELL_CHARS);
        assert_eq!(cell, "msg:0123456789abcdef0123…9abcdef0123456789abcdef");
        assert!(key.starts_with(cell.split('…').next().expect("head")));
        assert!(key.ends_with(cell.split('…').nth(1).expect("tail")));
        // The widest line: the cut key, two spaces, the HELD column (its header).
        let widest = MAX_CELL_CHARS + 2 + "HELD".len();
        assert!(shown.lines().all(|line| line.chars().count() <= widest));
    }
}
