//! Several broker nodes: connections walk `amqp.urls` past nodes that refuse or stay silent,
//! and the ingress and the worker move to another node when theirs is lost. The nodes here are
//! proxies in front of the one local broker (what a client sees of a node going away is its
//! socket closing); `scripts/cluster` runs the real three-node cluster (tests/it/cluster_faults.rs).

use std::time::Duration;

use ipn_bridge::amqp;

use crate::pipeline_e2e::{RunningWorker, Stack};
use crate::support::{PATIENCE, Proxy, TestBroker, post_form, ready_ingress, sample, with_fields};

/// The node (`host:port`) the `connection` of the process answering `metrics` goes to, from its
/// `<prefix>_broker_node` gauge.
pub(crate) async fn connected_node(
    metrics: &str,
    prefix: &str,
    connection: &str,
) -> Option<String> {
    let text = crate::support::http_get(metrics)
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let start = format!("{prefix}_broker_node{{connection=\"{connection}\",node=\"");
    text.lines()
        .filter(|line| line.ends_with(" 1"))
        .find_map(|line| line.strip_prefix(&start))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
}

/// Waits until `connection` goes to a node other than `not` (and returns it).
async fn moved_off(metrics: &str, prefix: &str, connection: &str, not: &str) -> String {
    let moved = async {
        loop {
            match connected_node(metrics, prefix, connection).await {
                Some(node) if node != not => return node,
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    };
    tokio::time::timeout(PATIENCE, moved)
        .await
        .unwrap_or_else(|_| panic!("{prefix} {connection} did not leave {not}"))
}

#[tokio::test]
async fn a_connection_walks_the_nodes_past_one_that_refuses_and_one_that_stays_silent() {
    let broker = TestBroker::new().await;
    // Accepts TCP, never speaks AMQP: only the connect timeout gets past it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent = silent.local_addr().expect("address").to_string();
    let refusing = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").to_string()
    }; // dropped: nothing listens there now
    let mut config = broker.config();
    config.amqp.connect_timeout = Duration::from_millis(300);
    config.amqp.urls = [silent.as_str(), refusing.as_str(), "127.0.0.1:5672"]
        .map(|node| broker.url_via(node).parse().expect("url"))
        .to_vec();
    for _ in 0..3 {
        let connected = amqp::connect(&config.amqp, "it-walk")
            .await
            .expect("a node answered");
        assert_eq!(connected.node.name, "127.0.0.1:5672");
        assert!(connected.connection.status().connected());
        let _ = connected.connection.close(200, "done".into()).await;
    }

    config.amqp.urls.pop();
    let error = amqp::connect(&config.amqp, "it-walk").await.unwrap_err();
    let shown = ipn_bridge::bounded::error_chain(&error);
    assert!(
        shown.starts_with("no broker node answered (2 tried)"),
        "{shown}"
    );
    assert!(
        shown.contains(&silent) || shown.contains(&refusing),
        "names the node: {shown}"
    );
    assert!(!shown.contains("guest:guest"), "{shown}");
}

/// IPN `n`, of subscription `n % keys`.
fn ipn(n: usize, keys: usize) -> Vec<u8> {
    with_fields(
        &sample("013_subscr_payment.txt"),
        &[
            ("subscr_id", &format!("I-NODES{}", n % keys)),
            ("txn_id", &format!("T{n}")),
            ("ipn_track_id", &format!("n{n}")),
        ],
    )
}

/// Posts IPNs `numbers` one after another as PayPal does, resending each that got 503 until it
/// gets 200; returns how many got 200.
async fn post_resending(url: &str, numbers: std::ops::Range<usize>, keys: usize) -> u32 {
    let mut accepted = 0;
    for n in numbers {
        loop {
            match post_form(url, ipn(n, keys)).await.0 {
                200 => break,
                503 => tokio::time::sleep(Duration::from_millis(20)).await,
                other => panic!("IPN {n}: {other}"),
            }
        }
        accepted += 1;
    }
    accepted
}

#[tokio::test]
async fn the_ingress_and_the_worker_move_to_another_node_when_theirs_is_lost() {
    let mut stack = Stack::new().await;
    // An IPN whose event cannot be published for a while (its publisher between nodes) goes
    // through the delay tiers: short ones here, so it is back within the test's patience.
    stack.config.retry.tiers = vec![Duration::from_millis(300), Duration::from_secs(1)];
    let nodes = [Proxy::start().await, Proxy::start().await];
    stack.config.amqp.urls = (nodes.iter())
        .map(|node| stack.broker.url_via(node.address()).parse().expect("url"))
        .collect();
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let ingress_metrics = ingress.path("/metrics");
    let worker_metrics = format!("http://{}/metrics", worker.address);
    let node_address = |name: &str| (nodes.iter()).position(|n| n.address() == name);

    let keys = 5;
    let mut accepted = 0;
    let post = |n: usize| post_form(&ingress.url, ipn(n, keys));
    for n in 0..20 {
        assert_eq!(post(n).await.0, 200, "IPN {n}");
        accepted += 1;
    }
    stack.wait_for("downstream", 20).await;
    let publishing = connected_node(&ingress_metrics, "ipn_ingress", "publish")
        .await
        .expect("the ingress names its node");
    let consuming = connected_node(&worker_metrics, "ipn_worker", "consume")
        .await
        .expect("the worker names its consuming node");
    assert!(node_address(&publishing).is_some(), "{publishing}");

    // The ingress's node goes away: it answers 503 at most for a moment, then 200 through the
    // other node; PayPal would resend each 503.
    let lost = node_address(&publishing).expect("one of ours");
    nodes[lost].cut();
    accepted += post_resending(&ingress.url, 20..40, keys).await;
    let now = moved_off(&ingress_metrics, "ipn_ingress", "publish", &publishing).await;
    assert_eq!(node_address(&now), Some(1 - lost));
    if consuming == publishing {
        moved_off(&worker_metrics, "ipn_worker", "consume", &consuming).await;
    }
    nodes[lost].restore();
    // The other node goes away too; the first is back.
    nodes[1 - lost].cut();
    accepted += post_resending(&ingress.url, 40..60, keys).await;
    moved_off(&ingress_metrics, "ipn_ingress", "publish", &now).await;
    moved_off(
        &worker_metrics,
        "ipn_worker",
        "consume",
        nodes[1 - lost].address(),
    )
    .await;

    assert_eq!(accepted, 60);
    // Redelivery after a lost consumer may publish an event twice (same id): count txns.
    let channel = stack.broker.channel().await;
    let mut txns = std::collections::BTreeSet::new();
    let all_there = async {
        while txns.len() < 60 {
            for delivery in stack.broker.drain(&channel, "downstream").await {
                let event: serde_json::Value =
                    serde_json::from_slice(&delivery.data).expect("JSON");
                txns.insert(event["txn_id"].as_str().expect("txn").to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, all_there).await.is_err() {
        let metrics = crate::support::http_get(&worker_metrics)
            .await
            .expect("metrics");
        let metrics = metrics.text().await.expect("metrics text");
        let counters: Vec<&str> = (metrics.lines())
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
            .collect();
        panic!(
            "{} of 60 IPNs became events: {txns:?}; worker: {counters:#?}",
            txns.len()
        );
    }
    worker.stop().await;
    ingress.stop().await;
}
