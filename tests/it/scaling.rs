//! Several workers sharing the shards: balanced ownership, a worker killed under load, a worker
//! added; per-key order holds and nothing is lost or published under two ids.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU16;
use std::time::Duration;

use ipn_bridge::config::Config;
use ipn_bridge::ctl;
use ipn_bridge::fake_paypal::Answer;
use ipn_bridge::worker::ownership;

use crate::pipeline_e2e::{RunningWorker, Stack};
use crate::support::db::POSTGRES;
use crate::support::ingress::RunningIngress;
use crate::support::{PATIENCE, Proxy, post_form, ready_ingress, sample, with_fields};

const SHARDS: u16 = 16;

/// IPN number `n` of subscription `n % keys`: a real `subscr_payment` shape with its own txn_id.
fn ipn(n: usize, keys: usize) -> Vec<u8> {
    with_fields(
        &sample("013_subscr_payment.txt"),
        &[
            ("subscr_id", &format!("I-SCALE{}", n % keys)),
            ("txn_id", &format!("T{n}")),
            ("ipn_track_id", &format!("s{n}")),
        ],
    )
}

fn worker_config(stack: &Stack, id: &str) -> Config {
    let mut config = stack.config.clone();
    config.worker.id = Some(id.to_owned());
    config
}

/// Waits until the workers' owned-shard gauges equal what rendezvous hashing gives `ids` of
/// `shards`.
async fn wait_balanced(workers: &[(&str, &RunningWorker)], shards: u16) {
    let ids: Vec<String> = workers.iter().map(|(id, _)| (*id).to_owned()).collect();
    let balanced = async {
        loop {
            let mut all = true;
            for (id, worker) in workers {
                let expected = ownership::owned_by(id, &ids, shards).len() as f64;
                all &= worker.metric("ipn_worker_owned_shards").await == Some(expected);
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, balanced).await.is_err() {
        let mut seen = Vec::new();
        for (id, worker) in workers {
            seen.push((*id, worker.metric("ipn_worker_owned_shards").await));
        }
        panic!("shards not balanced in time: {seen:?}");
    }
}

/// `events` (redeliveries may repeat one, same id) hold IPNs `0..total` of `keys` subscriptions
/// ([`ipn`]) once each: one event id per IPN, each key's arriving in posting order, numbered
/// 1..n.
fn assert_in_posting_order(events: &[serde_json::Value], total: usize, keys: usize) {
    let mut ids_by_txn: HashMap<String, HashSet<String>> = HashMap::new();
    let mut first_seen: Vec<&serde_json::Value> = Vec::new();
    let mut seen_ids = HashSet::new();
    for event in events {
        let txn = event["txn_id"].as_str().expect("txn_id").to_owned();
        let id = event["event_id"].as_str().expect("event_id").to_owned();
        ids_by_txn.entry(txn).or_default().insert(id.clone());
        if seen_ids.insert(id) {
            first_seen.push(event);
        }
    }
    assert_eq!(ids_by_txn.len(), total, "every IPN published");
    assert!(
        ids_by_txn.values().all(|ids| ids.len() == 1),
        "one event id per IPN"
    );
    let mut per_key: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
    for event in first_seen {
        let n: usize = event["txn_id"].as_str().expect("txn")[1..]
            .parse()
            .expect("n");
        let sequence = event["sequence"].as_i64().expect("sequence");
        per_key
            .entry(event["order_key"].as_str().expect("key"))
            .or_default()
            .push((n, sequence));
    }
    assert_eq!(per_key.len(), keys);
    for (key, numbered) in per_key {
        let posted: Vec<usize> = (0..total)
            .filter(|n| n % keys == numbered[0].0 % keys)
            .collect();
        let numbers: Vec<usize> = numbered.iter().map(|(n, _)| *n).collect();
        let sequences: Vec<i64> = numbered.iter().map(|(_, s)| *s).collect();
        assert_eq!(numbers, posted, "{key}: events in posting order");
        assert_eq!(
            sequences,
            (1..=posted.len() as i64).collect::<Vec<_>>(),
            "{key}"
        );
    }
}

#[tokio::test]
async fn workers_share_the_shards_and_one_killed_under_load_loses_and_reorders_nothing() {
    let mut stack = Stack::new().await;
    stack.config.topology.shards = NonZeroU16::new(SHARDS).expect("non-zero");
    stack.config.worker.heartbeat = Duration::from_millis(100);
    stack.config.worker.takeover = Duration::from_millis(600);
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let three: Vec<String> = ["worker-a", "worker-b", "worker-c"]
        .map(String::from)
        .to_vec();
    for id in &three {
        let share = ownership::owned_by(id, &three, SHARDS).len();
        assert!((3..=8).contains(&share), "{id} owns {share} of {SHARDS}");
    }
    let a = RunningWorker::spawn(worker_config(&stack, "worker-a")).await;
    let b = RunningWorker::spawn(worker_config(&stack, "worker-b")).await;
    let proxy = Proxy::start().await;
    let mut doomed = worker_config(&stack, "worker-c");
    doomed.amqp.url = stack.broker.url_via(proxy.address()).parse().expect("url");
    let c = RunningWorker::spawn(doomed).await;
    wait_balanced(
        &[("worker-a", &a), ("worker-b", &b), ("worker-c", &c)],
        SHARDS,
    )
    .await;
    let listed = ctl::workers(&stack.config).await.expect("workers");
    let owned: Vec<(String, usize)> = listed
        .iter()
        .map(|w| (w.worker_id.clone(), w.shards.len()))
        .collect();
    let expected: Vec<(String, usize)> = three
        .iter()
        .map(|id| (id.clone(), ownership::owned_by(id, &three, SHARDS).len()))
        .collect();
    assert_eq!(owned, expected, "ipnctl workers shows who owns what");

    // 150 IPNs over 30 subscriptions, posted one after another: a third with all three
    // workers, a third after worker-c is killed, a third after worker-d joins.
    let (total, keys) = (150, 30);
    let post = |range: std::ops::Range<usize>| {
        let url = ingress.url.clone();
        async move {
            for n in range {
                assert_eq!(post_form(&url, ipn(n, keys)).await.0, 200, "IPN {n}");
            }
        }
    };
    post(0..50).await;
    // Every worker processes its share (which keys land where is fixed by the two hashes).
    for (name, worker) in [("worker-a", &a), ("worker-b", &b), ("worker-c", &c)] {
        let busy = async {
            while worker
                .metric("ipn_worker_events_published_total")
                .await
                .unwrap_or(0.0)
                == 0.0
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(PATIENCE, busy)
            .await
            .unwrap_or_else(|_| panic!("{name} published events of its shards"));
    }
    proxy.cut();
    c.kill();
    post(50..100).await;
    let d = RunningWorker::spawn(worker_config(&stack, "worker-d")).await;
    wait_balanced(
        &[("worker-a", &a), ("worker-b", &b), ("worker-d", &d)],
        SHARDS,
    )
    .await;
    post(100..total).await;

    assert_in_posting_order(&stack.events(total as u32).await, total, keys);
    let published = d.metric("ipn_worker_events_published_total").await;
    assert!(
        published.unwrap_or(0.0) > 0.0,
        "the added worker took its share"
    );
    a.stop().await;
    b.stop().await;
    d.stop().await;
    ingress.stop().await;
}

/// A stack of 4 shards, quick heartbeats, a prefetch of 4 and PayPal answering after `verify`,
/// with `total` IPNs of `keys` subscriptions queued before any worker runs; and its ingress.
async fn backlog(verify: Duration, total: usize, keys: usize) -> (Stack, RunningIngress) {
    let mut stack = Stack::new().await;
    stack.config.topology.shards = NonZeroU16::new(4).expect("non-zero");
    stack.config.worker.heartbeat = Duration::from_millis(100);
    stack.config.worker.takeover = Duration::from_millis(600);
    stack.config.worker.prefetch = NonZeroU16::new(4).expect("non-zero");
    stack.paypal.set_default(Answer::Slow(verify));
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    for n in 0..total {
        assert_eq!(
            post_form(&ingress.url, ipn(n, keys)).await.0,
            200,
            "IPN {n}"
        );
    }
    (stack, ingress)
}

/// A shard handed over while its worker holds a backlog of it: the new owner's consumer must
/// not start before the old one gave back its unacked deliveries, or it would take later IPNs
/// of a key first and number them before the earlier ones. A small prefetch and a slow PayPal
/// keep the backlog beyond what the old owner holds. On a multi-threaded runtime, as the
/// binaries run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_handed_over_with_a_backlog_keeps_each_keys_order() {
    let (total, keys) = (240, 12);
    let (stack, ingress) = backlog(Duration::from_millis(150), total, keys).await;
    // A second worker's id that rendezvous hashing gives some of the 4 shards (fixed by the
    // hash, so the same id every run).
    let second = (0..)
        .map(|n| format!("handover-b{n}"))
        .find(|id| {
            let ids = ["handover-a".to_owned(), id.clone()];
            (1..=3).contains(&ownership::owned_by(id, &ids, 4).len())
        })
        .expect("an id");
    let a = RunningWorker::spawn(worker_config(&stack, "handover-a")).await;
    let started = async {
        while a
            .metric("ipn_worker_events_published_total")
            .await
            .unwrap_or(0.0)
            < 12.0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, started)
        .await
        .expect("the first worker is under way");
    let b = RunningWorker::spawn(worker_config(&stack, &second)).await;
    wait_balanced(&[("handover-a", &a), (&second, &b)], 4).await;
    let left = total as f64
        - a.metric("ipn_worker_events_published_total")
            .await
            .unwrap_or(0.0);
    assert!(left > 0.0, "shards were handed over with a backlog left");

    assert_in_posting_order(&stack.events(total as u32).await, total, keys);
    let taken = b.metric("ipn_worker_events_published_total").await;
    assert!(
        taken.unwrap_or(0.0) > 0.0,
        "the second worker published its shards' share"
    );
    a.stop().await;
    b.stop().await;
    ingress.stop().await;
}

/// A worker stopped while its IPNs are mid-way (PayPal slow, the grace period short) and
/// another worker's consumers wait behind its own for the same shards (it stopped recording
/// heartbeats when its database went away, so the other took it for gone): the IPNs it held
/// unacked go to the other worker before any later IPN of their keys, whatever the order in
/// which its consumers, channels and connection go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_ipn_while_another_waits_for_its_shards_keeps_each_keys_order() {
    let (total, keys) = (120, 12);
    let (stack, ingress) = backlog(Duration::from_secs(5), total, keys).await;
    let database = Proxy::to(POSTGRES).await;
    let mut first = worker_config(&stack, "stopping-a");
    let url = stack.config.database.url.to_string();
    first.database.url = (url.replace(POSTGRES, database.address()).parse()).expect("url");
    first.worker.shutdown_grace = Duration::from_millis(300);
    let a = RunningWorker::spawn(first).await;
    let verifying = async {
        while a.metric("ipn_worker_in_flight").await.unwrap_or(0.0) < 4.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, verifying)
        .await
        .expect("the first worker verifies an IPN of every shard");
    database.cut();
    let b = RunningWorker::spawn(worker_config(&stack, "stopping-b")).await;
    // The second worker subscribes to every shard; its consumers wait behind the first's.
    b.wait_metric("ipn_worker_owned_shards", 4.0).await;
    stack.paypal.set_default(Answer::Verified);
    a.stop().await;

    assert_in_posting_order(&stack.events(total as u32).await, total, keys);
    b.stop().await;
    ingress.stop().await;
}
