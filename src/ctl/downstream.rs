//! `ipnctl downstream`: the business services' queues (`[[downstream]]`) as the bridge sees
//! them, and their dead-letter queues (listed, replayed and purged by [`super::review`] with
//! [`super::review::Queue::Dead`]).

use anyhow::{Context, bail};

use super::table;
use crate::config::{self, Config};
use crate::downstream::{Seen, look};

/// One downstream queue as `downstream list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// The queue.
    pub queue: String,
    /// Its topic patterns on `<p>.events`.
    pub bindings: Vec<String>,
    /// Depth, consumers and dead-lettered events now; none when the queue does not exist yet.
    #[serde(flatten)]
    pub seen: Option<Seen>,
    /// Its dead-letter queue.
    pub dead_queue: String,
}

/// Every configured downstream queue with its depth, consumers and dead-lettered events.
pub async fn list(config: &Config) -> anyhow::Result<Vec<Listed>> {
    let connection = super::connect(config).await?;
    let mut listed = Vec::new();
    for downstream in &config.downstream {
        // A queue not declared yet closes the channel it was asked on, not the connection.
        let seen = look(&connection, &downstream.queue).await.ok();
        listed.push(Listed {
            queue: downstream.queue.clone(),
            bindings: downstream.bindings.clone(),
            seen,
            dead_queue: config::dead_letter_queue(&downstream.queue),
        });
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(listed)
}

/// Downstream queues as a readable table.
pub fn list_table(listed: &[Listed]) -> String {
    let rows = listed
        .iter()
        .map(|l| {
            let count = |f: fn(&Seen) -> u32| {
                l.seen
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |s| f(s).to_string())
            };
            vec![
                l.queue.clone(),
                count(|s| s.depth),
                count(|s| s.consumers),
                count(|s| s.dead),
                l.bindings.join(" "),
            ]
        })
        .collect();
    table(&["QUEUE", "DEPTH", "CONSUMERS", "DEAD", "BINDINGS"], rows)
}

/// `queue` as a configured downstream queue: its dead-letter queue is known and declared.
pub fn configured(config: &Config, queue: &str) -> anyhow::Result<()> {
    if config.downstream.iter().any(|d| d.queue == queue) {
        return Ok(());
    }
    let known: Vec<&str> = config.downstream.iter().map(|d| d.queue.as_str()).collect();
    if known.is_empty() {
        bail!("`{queue}` is not a [[downstream]] queue: the config declares none");
    }
    bail!(
        "`{queue}` is not a [[downstream]] queue of this config (it has: {})",
        known.join(", ")
    )
}

/// Fails with a clear message unless `queue` exists on the broker.
pub async fn require_queue(config: &Config, queue: &str) -> anyhow::Result<()> {
    let connection = super::connect(config).await?;
    let channel = connection.create_channel().await;
    let declared = match channel {
        Ok(channel) => {
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
                .await
                .map(|_| ())
        }
        Err(error) => Err(error),
    };
    let _ = connection.close(200, "done".into()).await;
    declared.with_context(|| format!("queue {queue} does not exist (declare it first)"))
}
