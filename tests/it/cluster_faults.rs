//! The bridge on a real three-node RabbitMQ cluster (`scripts/cluster`), with a node lost under
//! load twice: the one leading the most shard queues is stopped (`stop_app`) and brought back,
//! then the one leading the most of the others is killed (SIGKILL) and started again, while
//! PayPal-like posters keep sending (resending each IPN until it gets 200). At the end every
//! accepted IPN has exactly one event id, each key's sequences are 1..n in posting order, and
//! nothing is in `<p>.dead`. The ledger is printed (docs/reliability.md keeps the full run's).
//!
//! Needs the cluster, so `cargo test` skips it (ignored); `scripts/cluster-test` starts a
//! cluster, runs it with `IPN_TEST_CLUSTER_URLS` set and stops the cluster. CI runs it with
//! short phases; `IPN_TEST_CLUSTER_PHASE=30 scripts/cluster-test` is the full run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipn_bridge::config::{Config, Downstream};

use crate::support::ingress::spawn_ingress;
use crate::support::load::{self, Posters, Workers};
use crate::support::services::Services;

/// Subscriptions posted to at once, each by its own PayPal-like poster.
const KEYS: usize = 24;

/// The cluster `scripts/cluster-test` started.
struct Cluster {
    urls: String,
}

impl Cluster {
    fn from_env() -> Cluster {
        let urls = std::env::var("IPN_TEST_CLUSTER_URLS")
            .expect("IPN_TEST_CLUSTER_URLS: run this test through scripts/cluster-test");
        Cluster { urls }
    }

    /// Runs `scripts/cluster ARGS` (it finds the cluster by the inherited IPN_CLUSTER_* vars).
    async fn run(&self, args: &[&str]) -> String {
        load::script("cluster", args).await
    }

    /// Node number (1..3) leading each of `prefix`'s shard queues, counted per node.
    async fn shard_leaders(&self, prefix: &str) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        let shard = format!("{prefix}.inbound.");
        for line in self.run(&["leaders"]).await.lines() {
            let Some((queue, leader)) = line.split_once('\t') else {
                continue;
            };
            if queue.starts_with(&shard) {
                *counts.entry(node_number(leader)).or_default() += 1;
            }
        }
        counts
    }

    /// The node leading the most shard queues, among those not in `spared`.
    async fn busiest(&self, prefix: &str, spared: &[u32]) -> u32 {
        let leaders = self.shard_leaders(prefix).await;
        (leaders.iter())
            .filter(|(node, _)| !spared.contains(node))
            .max_by_key(|(_, count)| **count)
            .map(|(node, _)| *node)
            .unwrap_or_else(|| panic!("no shard leaders outside {spared:?}: {leaders:?}"))
    }
}

/// `ipn-<id>-<n>@localhost` → n.
fn node_number(node: &str) -> u32 {
    (node.split('@').next())
        .and_then(|name| name.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a cluster node name: {node}"))
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/cluster-test"]
async fn a_node_lost_under_load_twice_loses_duplicates_and_reorders_nothing() {
    let cluster = Cluster::from_env();
    let phase = load::phase("IPN_TEST_CLUSTER_PHASE");
    let services = Services::start().await;
    let prefix = format!("itc{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let mut config: Config = services.config.clone();
    config.amqp.urls = (cluster.urls.split(','))
        .map(|url| url.parse().expect("cluster url"))
        .collect();
    config.topology.prefix = prefix.clone();
    config.topology.shards = std::num::NonZeroU16::new(8).expect("non-zero");
    let events_queue = format!("{prefix}.downstream");
    config.downstream = vec![Downstream::new(&events_queue, &["#"])];
    config.worker.heartbeat = Duration::from_millis(200);
    config.worker.takeover = Duration::from_secs(2);

    let ingress = spawn_ingress(config.clone()).await;
    ingress.wait_ready().await;
    let workers = Workers::spawn(&config, &["cluster-w1", "cluster-w2"]).await;
    let posters = Posters::start(&ingress.url, &prefix, KEYS);

    tokio::time::sleep(phase).await;
    let first = cluster.busiest(&prefix, &[]).await;
    let before = cluster.shard_leaders(&prefix).await;
    cluster.run(&["stop-node", &first.to_string()]).await;
    let lost_at = Instant::now();
    tokio::time::sleep(phase).await;
    cluster.run(&["start-node", &first.to_string()]).await;
    tokio::time::sleep(phase).await;
    let second = cluster.busiest(&prefix, &[first]).await;
    cluster.run(&["kill-node", &second.to_string()]).await;
    tokio::time::sleep(phase).await;
    cluster.run(&["revive-node", &second.to_string()]).await;
    tokio::time::sleep(phase).await;
    let ledger = posters.stop().await;
    let faults_took = lost_at.elapsed();

    let accepted = ledger.accepted();
    let total: usize = accepted.values().map(Vec::len).sum();
    let events = load::collect_events(&config, &events_queue, total).await;
    eprintln!(
        "cluster ledger: phase {phase:?}; {}; IPNs accepted {total} over {KEYS} keys, events \
         delivered {} ({} redelivered duplicates); node losses 2 (stop_app of node {first}, \
         leading {} of 8 shards, {before:?}; SIGKILL of node {second}); longest time without \
         any 200: {:?}; faults and recoveries took {faults_took:?}",
        ledger.counts(),
        events.deliveries,
        events.deliveries - total,
        before.get(&first).copied().unwrap_or(0),
        ledger.longest_without_200(),
    );
    load::assert_nothing_lost(&ledger, &events, &config, &workers.logs).await;
    workers.stop().await;
    ingress.stop().await;
    let cleanup = ipn_bridge::amqp::connect(&config.amqp, "it-cluster-cleanup").await;
    if let Ok(cleanup) = cleanup {
        let channel = cleanup.connection.create_channel().await.expect("channel");
        let topology = ipn_bridge::topology::Topology::of(&config);
        for queue in topology
            .queues()
            .into_iter()
            .chain([events_queue.clone(), format!("{events_queue}.dead")])
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in topology.exchanges() {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
}
