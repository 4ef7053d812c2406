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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ipn_bridge::config::{Config, Downstream};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::pipeline_e2e::RunningWorker;
use crate::support::ingress::spawn_ingress;
use crate::support::services::Services;
use crate::support::{post_form, sample, with_fields};

/// Subscriptions posted to at once, each by its own PayPal-like poster.
const KEYS: usize = 24;

/// The cluster `scripts/cluster-test` started.
struct Cluster {
    urls: String,
    script: PathBuf,
}

impl Cluster {
    fn from_env() -> Cluster {
        let urls = std::env::var("IPN_TEST_CLUSTER_URLS")
            .expect("IPN_TEST_CLUSTER_URLS: run this test through scripts/cluster-test");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster");
        Cluster { urls, script }
    }

    /// Runs `scripts/cluster ARGS` (it finds the cluster by the inherited IPN_CLUSTER_* vars).
    async fn run(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new(&self.script)
            .args(args)
            .output()
            .await
            .expect("scripts/cluster runs");
        assert!(
            output.status.success(),
            "scripts/cluster {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
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

/// What the posters saw.
#[derive(Default)]
struct Ledger {
    posts: AtomicU64,
    ok: AtomicU64,
    unavailable: AtomicU64,
    other: AtomicU64,
    /// Per key, the IPN numbers that got 200, in order.
    accepted: std::sync::Mutex<HashMap<usize, Vec<usize>>>,
    /// The longest time with no 200 at all, and when the last 200 came.
    gap: std::sync::Mutex<(Duration, Option<Instant>)>,
}

impl Ledger {
    fn record_ok(&self, key: usize, n: usize) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut accepted) = self.accepted.lock() {
            accepted.entry(key).or_default().push(n);
        }
        if let Ok(mut gap) = self.gap.lock() {
            let now = Instant::now();
            if let Some(last) = gap.1 {
                gap.0 = gap.0.max(now - last);
            }
            gap.1 = Some(now);
        }
    }
}

fn ipn(prefix: &str, key: usize, n: usize) -> Vec<u8> {
    with_fields(
        &sample("013_subscr_payment.txt"),
        &[
            ("subscr_id", &format!("I-{prefix}-{key}")),
            ("txn_id", &format!("T{key}x{n}")),
            ("ipn_track_id", &format!("c{key}x{n}")),
        ],
    )
}

/// One subscription's IPNs, posted one after another as PayPal does: the next only after the
/// last got 200, a 503 resent after a short wait.
async fn poster(
    url: String,
    prefix: String,
    key: usize,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        ledger.posts.fetch_add(1, Ordering::Relaxed);
        match post_form(&url, ipn(&prefix, key, n)).await.0 {
            200 => {
                ledger.record_ok(key, n);
                n += 1;
            }
            503 => {
                ledger.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => {
                ledger.other.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the database holds for `order_key` from sequence `from` on (the test's database is
/// dropped when the test ends, so a failure shows it here).
async fn key_rows(config: &Config, order_key: &str, from: usize) -> Vec<String> {
    use sqlx::{ConnectOptions, Row};
    let Ok(mut connection) = config.database.url.options().connect().await else {
        return vec!["(database unreachable)".to_owned()];
    };
    let rows = sqlx::query(
        "SELECT sequence, state, txn_id, event_id::text AS id, body_sha256,
                created_at::text AS created, done_at::text AS done
         FROM ipn_event WHERE order_key = $1 AND sequence > $2 ORDER BY sequence LIMIT 8",
    )
    .bind(order_key)
    .bind(i64::try_from(from).unwrap_or(0))
    .fetch_all(&mut connection)
    .await;
    let mut shown: Vec<String> = match rows {
        Ok(rows) => (rows.iter())
            .map(|row| {
                format!(
                    "seq {:?} {:?} txn {:?} id {:?} body {:?} created {:?} done {:?}",
                    row.try_get::<i64, _>("sequence").ok(),
                    row.try_get::<String, _>("state").ok(),
                    row.try_get::<Option<String>, _>("txn_id").ok().flatten(),
                    row.try_get::<String, _>("id").ok(),
                    row.try_get::<String, _>("body_sha256").ok(),
                    row.try_get::<String, _>("created").ok(),
                    row.try_get::<Option<String>, _>("done").ok().flatten(),
                )
            })
            .collect(),
        Err(error) => vec![format!("(query failed: {error})")],
    };
    let counter = sqlx::query("SELECT last_sequence FROM ipn_key_sequence WHERE order_key = $1")
        .bind(order_key)
        .fetch_optional(&mut connection)
        .await
        .map(|row| row.and_then(|row| row.try_get::<i64, _>("last_sequence").ok()));
    shown.push(format!("ipn_key_sequence.last_sequence: {counter:?}"));
    shown
}

/// The lines of the workers' logs about `txns` (and every line of an IPN span naming one of
/// their message ids), with their sessions' and shards' lines, each prefixed by its worker.
fn worker_lines(logs: &[(&str, PathBuf)], txns: &[String]) -> String {
    let mut shown = Vec::new();
    for (id, log) in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let named =
            |line: &str| (txns.iter()).any(|txn| line.contains(&format!("txn_id=\"{txn}\"")));
        let message_ids: HashSet<&str> = (text.lines())
            .filter(|line| named(line))
            .filter_map(|line| line.split("message_id=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        for line in text.lines() {
            let about = named(line) || message_ids.iter().any(|id| line.contains(id));
            let session = line.contains("worker::session");
            if about || session {
                shown.push(format!("{id} {line}"));
            }
        }
    }
    shown.sort_by(|a, b| a.split(' ').nth(1).cmp(&b.split(' ').nth(1)));
    let skipped = shown.len().saturating_sub(400);
    let mut text = shown.split_off(skipped).join("\n");
    if skipped > 0 {
        text = format!("({skipped} earlier lines left out)\n{text}");
    }
    text
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/cluster-test"]
async fn a_node_lost_under_load_twice_loses_duplicates_and_reorders_nothing() {
    let cluster = Cluster::from_env();
    let phase = Duration::from_secs(
        std::env::var("IPN_TEST_CLUSTER_PHASE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
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
    let mut workers = Vec::new();
    let mut logs = Vec::new();
    for id in ["cluster-w1", "cluster-w2"] {
        let mut own = config.clone();
        own.worker.id = Some(id.to_owned());
        let log = std::env::temp_dir().join(format!("ipn-{prefix}-{id}.log"));
        workers.push(RunningWorker::spawn_logged(own, log.clone()).await);
        logs.push((id, log));
    }
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..KEYS)
        .map(|key| {
            let (url, prefix) = (ingress.url.clone(), prefix.clone());
            tokio::spawn(poster(
                url,
                prefix,
                key,
                Arc::clone(&ledger),
                Arc::clone(&stop),
            ))
        })
        .collect();

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
    stop.store(true, Ordering::Relaxed);
    for poster in posters {
        poster.await.expect("poster");
    }
    let faults_took = lost_at.elapsed();

    // Every accepted IPN's event, from the business queue (redeliveries may repeat one: same id).
    let accepted: HashMap<usize, Vec<usize>> = ledger.accepted.lock().expect("ledger").clone();
    let total: usize = accepted.values().map(Vec::len).sum();
    let connected = ipn_bridge::amqp::connect(&config.amqp, "it-cluster-check")
        .await
        .expect("a node answers");
    let channel = connected
        .connection
        .create_channel()
        .await
        .expect("channel");
    let mut consumer = channel
        .basic_consume(
            events_queue.as_str().into(),
            "it-cluster-check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the business queue");
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    let mut first_seen: HashMap<String, (String, i64)> = HashMap::new();
    let mut deliveries = 0;
    let collect = async {
        while ids.len() < total {
            let delivery = consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            deliveries += 1;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
            let txn = event["txn_id"].as_str().expect("txn_id").to_owned();
            let id = event["event_id"].as_str().expect("event_id").to_owned();
            let key = event["order_key"].as_str().expect("order_key").to_owned();
            let sequence = event["sequence"].as_i64().expect("sequence");
            first_seen.entry(txn.clone()).or_insert((key, sequence));
            ids.entry(txn).or_default().insert(id);
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .is_err()
    {
        panic!("{} of {total} accepted IPNs became events", ids.len());
    }

    let gap = ledger.gap.lock().expect("ledger").0;
    eprintln!(
        "cluster ledger: phase {phase:?}; posts {}, 200 {}, 503/failed {}, other {}; \
         IPNs accepted {total} over {KEYS} keys, events delivered {deliveries} \
         ({} redelivered duplicates); \
         node losses 2 (stop_app of node {first}, leading {} of 8 shards, {before:?}; \
         SIGKILL of node {second}); longest time without any 200: {gap:?}; faults and \
         recoveries took {faults_took:?}",
        ledger.posts.load(Ordering::Relaxed),
        ledger.ok.load(Ordering::Relaxed),
        ledger.unavailable.load(Ordering::Relaxed),
        ledger.other.load(Ordering::Relaxed),
        deliveries - total,
        before.get(&first).copied().unwrap_or(0),
    );
    assert!(
        ids.values().all(|ids| ids.len() == 1),
        "one event id per IPN"
    );
    for (key, numbers) in &accepted {
        let sequences: Vec<i64> = (numbers.iter())
            .map(|n| first_seen[&format!("T{key}x{n}")].1)
            .collect();
        let expected: Vec<i64> = (1..=numbers.len() as i64).collect();
        if sequences != expected {
            let first = sequences.iter().zip(&expected).position(|(a, b)| a != b);
            let from = first.unwrap_or(0).saturating_sub(3);
            let order_key = &first_seen[&format!("T{key}x{}", numbers[0])].0;
            let rows = key_rows(&config, order_key, from).await;
            // The workers' lines about the IPNs around the gap and the one numbered in it.
            let gap = first.unwrap_or(0);
            let skipped = expected.get(gap).copied().unwrap_or(0);
            let mut txns: Vec<String> = (from..(gap + 3).min(numbers.len()))
                .map(|i| format!("T{key}x{}", numbers[i]))
                .collect();
            if let Some(i) = sequences.iter().position(|s| *s == skipped) {
                txns.push(format!("T{key}x{}", numbers[i]));
            }
            let lines = worker_lines(&logs, &txns);
            panic!(
                "key {key}: sequences of IPNs {from}.. in posting order: {:?} (expected {:?}); \
                 the database's rows of {order_key} from sequence {from}: {rows:#?}; \
                 the workers' lines about {txns:?} and their sessions:\n{lines}",
                &sequences[from..(from + 8).min(sequences.len())],
                &expected[from..(from + 8).min(expected.len())],
            );
        }
        assert_eq!(
            *numbers,
            (0..numbers.len()).collect::<Vec<_>>(),
            "key {key}"
        );
    }
    let dead = channel
        .queue_declare(
            format!("{prefix}.dead").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("dead-letter queue");
    assert_eq!(dead.message_count(), 0, "nothing dead-lettered");

    assert_eq!(ledger.other.load(Ordering::Relaxed), 0, "only 200 and 503");
    let _ = connected.connection.close(200, "checked".into()).await;
    for worker in workers {
        worker.stop().await;
    }
    for (_, log) in &logs {
        let _ = std::fs::remove_file(log);
    }
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
