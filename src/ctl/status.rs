//! `ipnctl status`: the deployment at a glance, for an operator before anything else: is the
//! ingress ready, are the workers there and every shard consumed, what waits where (inbound,
//! parked, quarantine, dead, the business queues), and which keys are blocked. Reads only:
//! passive declarations, one `/readyz`, two queries.

use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::topology::Topology;

/// The overview.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The configured ingress's `/readyz` URL and what it answered (`None`: no answer).
    pub ingress_url: String,
    /// Its status code.
    pub ingress_status: Option<u16>,
    /// Live workers.
    pub workers: usize,
    /// Shards owned by a live worker, and shards in the topology.
    pub shards_owned: usize,
    /// Shard queues in the topology.
    pub shards: u16,
    /// Messages waiting in the shard queues together.
    pub inbound: u64,
    /// IPNs parked (their keys blocked).
    pub parked: u64,
    /// IPNs quarantined.
    pub quarantine: u64,
    /// Messages the broker dead-lettered to `<p>.dead`.
    pub dead: u64,
    /// Keys blocked now, IPNs held behind them, and the longest block.
    pub blocked_keys: i64,
    /// IPNs held behind blocked keys.
    pub held: i64,
    /// Seconds since the longest-blocked key was blocked.
    pub longest_blocked_seconds: u64,
    /// Each `[[downstream]]` queue: name, waiting, consumers, dead (`None`: not declared).
    pub downstream: Vec<super::downstream::Listed>,
}

impl Status {
    /// Whether everything is as it should be: the ingress ready, every shard consumed, nothing
    /// parked, dead or blocked, every business queue consumed and nothing dead-lettered there.
    pub fn healthy(&self) -> bool {
        self.ingress_status == Some(200)
            && self.shards_owned == usize::from(self.shards)
            && self.parked == 0
            && self.dead == 0
            && self.blocked_keys == 0
            && self.downstream.iter().all(|d| {
                d.seen
                    .as_ref()
                    .is_some_and(|s| s.consumers > 0 && s.dead == 0)
            })
    }
}

/// Reads the overview.
pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let ingress_url = readyz_url(config);
    let ingress_status = super::probe(&ingress_url, Duration::from_secs(3))
        .await
        .ok()
        .map(|(status, _)| status);
    let workers = super::workers(config).await?;
    let owned: std::collections::BTreeSet<u16> = workers
        .iter()
        .flat_map(|w| w.shards.iter().copied())
        .collect();
    let store = crate::store::Store::connect_existing(&config.database)
        .await
        .context("cannot connect to the worker's database")?;
    let totals = store.blocked_totals().await;
    store.close().await;
    let totals = totals.context("cannot read the blocked keys")?;
    let topology = Topology::of(config);
    let connection = super::connect(config).await?;
    let counted = crate::topology::count_messages(&connection, &topology.own_queues()).await;
    let _ = connection.close(200, "done".into()).await;
    let counted = counted.with_context(|| {
        format!(
            "cannot count the bridge's queues (run ipnctl topology declare if {} is new)",
            config.topology.prefix
        )
    })?;
    let depth = |role: &str| {
        counted
            .iter()
            .find(|(r, _)| *r == role)
            .map_or(0, |(_, n)| *n)
    };
    Ok(Status {
        ingress_url,
        ingress_status,
        workers: workers.len(),
        shards_owned: owned.len(),
        shards: config.topology.shards.get(),
        inbound: depth("inbound"),
        parked: depth("parked"),
        quarantine: depth("quarantine"),
        dead: depth("dead"),
        blocked_keys: totals.keys,
        held: totals.held,
        longest_blocked_seconds: totals.longest_blocked_seconds as u64,
        downstream: super::downstream::list(config).await?,
    })
}

/// The ingress's `/readyz` as this config names it (a wildcard listen address asked on
/// loopback).
fn readyz_url(config: &Config) -> String {
    let mut address = config.ingress.listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{address}/readyz")
}

/// The overview as lines an operator reads top to bottom.
pub fn status_text(statuses: &[Status]) -> String {
    let mut lines = Vec::new();
    for s in statuses {
        let ingress = match s.ingress_status {
            Some(200) => "ready".to_owned(),
            Some(code) => format!("NOT READY ({code})"),
            None => "NO ANSWER".to_owned(),
        };
        lines.push(format!("ingress     {ingress}  {}", s.ingress_url));
        let coverage = if s.shards_owned == usize::from(s.shards) {
            String::new()
        } else {
            "  SHARDS WITHOUT A WORKER".to_owned()
        };
        lines.push(format!(
            "workers     {} live, {} of {} shards owned{coverage}",
            s.workers, s.shards_owned, s.shards
        ));
        lines.push(format!("inbound     {} waiting in the shards", s.inbound));
        lines.push(format!("parked      {}", s.parked));
        lines.push(format!("quarantine  {}", s.quarantine));
        lines.push(format!("dead        {}", s.dead));
        lines.push(format!(
            "blocked     {} keys, {} held IPNs{}",
            s.blocked_keys,
            s.held,
            if s.blocked_keys > 0 {
                format!(", longest for {}", super::age(s.longest_blocked_seconds))
            } else {
                String::new()
            }
        ));
        for d in &s.downstream {
            let seen = match &d.seen {
                Some(seen) => format!(
                    "{} waiting, {} consumers, {} dead",
                    seen.depth, seen.consumers, seen.dead
                ),
                None => "not declared".to_owned(),
            };
            lines.push(format!("downstream  {}: {seen}", d.queue));
        }
        lines.push(if s.healthy() {
            "all well".to_owned()
        } else {
            "needs attention (exit 3)".to_owned()
        });
    }
    lines.join("\n")
}
