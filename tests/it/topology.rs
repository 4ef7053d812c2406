//! The topology as declared on the real broker, and what its arguments promise.

use std::time::Duration;

use futures_util::StreamExt;
use ipn_bridge::ctl;
use ipn_bridge::topology::Topology;
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::support::{PATIENCE, TestBroker};

#[tokio::test]
async fn ipnctl_declares_the_topology_idempotently_with_the_promised_arguments() {
    let broker = TestBroker::new().await;
    let config = broker.config();
    let topology = Topology::new(&config.topology);
    let first = ctl::declare_topology(&config).await.expect("declared");
    let second = ctl::declare_topology(&config)
        .await
        .expect("declared again");
    assert_eq!(first, second);
    assert!(
        first.contains("ipn.inbound.3") && first.contains("ipn.dead"),
        "{first}"
    );

    for shard in 0..topology.shards().get() {
        let queue = broker.queue_info(&topology.shard_queue(shard)).await;
        assert_eq!(queue["type"], "quorum");
        assert_eq!(queue["durable"], true);
        let arguments = &queue["arguments"];
        assert_eq!(arguments["x-single-active-consumer"], true);
        assert_eq!(arguments["x-delivery-limit"], 20);
        assert_eq!(arguments["x-dead-letter-strategy"], "at-least-once");
        assert_eq!(arguments["x-overflow"], "reject-publish");
        assert_eq!(arguments["x-dead-letter-routing-key"], "ipn.dead");
    }
    assert_eq!(broker.queue_info("ipn.dead").await["type"], "quorum");
    assert_eq!(broker.queue_info("ipn.quarantine").await["type"], "quorum");
}

#[tokio::test]
async fn a_message_past_its_delivery_limit_is_dead_lettered_not_dropped() {
    let broker = TestBroker::new().await;
    let mut config = broker.config();
    config.topology.delivery_limit = std::num::NonZeroU16::new(2).expect("non-zero");
    let topology = Topology::new(&config.topology);
    ctl::declare_topology(&config).await.expect("declared");
    let channel = broker.channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            topology.inbound_exchange().as_str().into(),
            "1".into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"txn_id=POISON",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("published");
    assert!(confirm.await.expect("confirmed").is_ack());

    let mut consumer = channel
        .basic_consume(
            topology.shard_queue(1).as_str().into(),
            "poison".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Delivered, then requeued, delivery_limit + 1 times: the broker then dead-letters it.
    for _ in 0..3 {
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("redelivered in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.data, b"txn_id=POISON");
        delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    let dead = async {
        loop {
            let found = broker
                .drain(&broker.channel().await, &topology.dead_queue())
                .await;
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let dead = tokio::time::timeout(PATIENCE, dead)
        .await
        .expect("dead-lettered in time");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"txn_id=POISON");
}

#[tokio::test]
async fn downstream_queues_from_the_config_are_declared_and_bound_to_the_events() {
    let broker = TestBroker::new().await;
    let mut config = broker.config();
    let mut billing =
        ipn_bridge::config::Downstream::new("billing", &["paypal.subscription.#", "*.refund.#"]);
    billing.message_ttl = Some(Duration::from_secs(7 * 24 * 3600));
    config.downstream = vec![
        billing,
        ipn_bridge::config::Downstream::new("audit", &["#"]),
    ];
    ctl::declare_topology(&config).await.expect("declared");
    ctl::declare_topology(&config)
        .await
        .expect("declared again");
    assert_eq!(broker.queue_info("billing").await["type"], "quorum");
    let mut billing = broker.binding_keys("billing", "ipn.events").await;
    billing.sort();
    assert_eq!(billing, ["*.refund.#", "paypal.subscription.#"]);
    assert_eq!(broker.binding_keys("audit", "ipn.events").await, ["#"]);
    // Nothing a service does can drop an event: a limit, and a dead-letter queue of its own.
    let arguments = &broker.queue_info("billing").await["arguments"];
    assert_eq!(arguments["x-delivery-limit"], 20);
    assert_eq!(arguments["x-dead-letter-exchange"], "");
    assert_eq!(arguments["x-dead-letter-routing-key"], "billing.dead");
    assert_eq!(arguments["x-dead-letter-strategy"], "at-least-once");
    assert_eq!(arguments["x-message-ttl"], 7 * 24 * 3600 * 1000);
    assert!(
        broker.queue_info("audit").await["arguments"]
            .get("x-message-ttl")
            .is_none()
    );
    for dead in ["billing.dead", "audit.dead"] {
        assert_eq!(broker.queue_info(dead).await["type"], "quorum", "{dead}");
    }
}

#[tokio::test]
async fn a_message_sent_to_a_tier_waits_in_that_tier_only_and_returns_to_its_own_shard() {
    let broker = TestBroker::new().await;
    let mut config = broker.config();
    config.retry.tiers = vec![Duration::from_millis(300), Duration::from_secs(600)];
    let topology = Topology::of(&config);
    ctl::declare_topology(&config).await.expect("declared");
    let wait = topology.wait_queue(Duration::from_secs(600));
    let arguments = &broker.queue_info(&wait).await["arguments"];
    assert_eq!(arguments["x-message-ttl"], 600_000);
    assert_eq!(arguments["x-dead-letter-exchange"], "ipn.inbound");
    assert_eq!(arguments["x-dead-letter-strategy"], "at-least-once");
    assert!(arguments.get("x-dead-letter-routing-key").is_none());

    let channel = broker.channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for (tier, body) in [("300ms", "txn_id=SHORT"), ("10m", "txn_id=LONG")] {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-ipn-tier".into(),
            lapin::types::AMQPValue::LongString(tier.into()),
        );
        let confirm = channel
            .basic_publish(
                topology.retry_exchange().as_str().into(),
                "2".into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body.as_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await
            .expect("published");
        let confirmation = confirm.await.expect("confirmed");
        assert!(
            confirmation.is_ack() && confirmation.take_message().is_none(),
            "routed"
        );
    }
    // The short one comes back to shard 2, by the routing key it was published with.
    let returned = async {
        while broker.count(&channel, &topology.shard_queue(2)).await == 0 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, returned)
        .await
        .expect("back in its shard in time");
    let back = broker.drain(&channel, &topology.shard_queue(2)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].data, b"txn_id=SHORT");
    // The long one is in its own tier, and was copied into no other queue.
    assert_eq!(broker.count(&channel, &wait).await, 1);
    for queue in topology.queues() {
        if queue != wait {
            assert_eq!(broker.count(&channel, &queue).await, 0, "{queue}");
        }
    }
}

/// Declares `queue` with `args` as a bridge from before the placement arguments did.
async fn declare_as_before(broker: &TestBroker, queue: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    table.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (key, value) in args {
        table.insert((*key).into(), value.clone());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let channel = broker.channel().await;
    channel
        .queue_declare(queue.into(), durable, table)
        .await
        .expect("declared as before");
}

fn shard_args_before(limit: i64) -> Vec<(&'static str, AMQPValue)> {
    let text = |v: &str| AMQPValue::LongString(v.into());
    vec![
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-delivery-limit", AMQPValue::LongLongInt(limit)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("ipn.dead")),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]
}

#[tokio::test]
async fn new_queues_are_placed_and_queues_from_before_placement_keep_theirs_but_not_other_differences()
 {
    let broker = TestBroker::new().await;
    let config = broker.config();
    declare_as_before(&broker, "ipn.dead", &[]).await;
    declare_as_before(&broker, "ipn.inbound.0", &shard_args_before(20)).await;
    ctl::declare_topology(&config)
        .await
        .expect("a topology from before placement is upgraded in place");
    ctl::declare_topology(&config).await.expect("and again");
    for queue in ["ipn.dead", "ipn.inbound.0"] {
        let arguments = &broker.queue_info(queue).await["arguments"];
        assert!(
            arguments.get("x-quorum-initial-group-size").is_none(),
            "{queue}: {arguments}"
        );
        assert!(
            arguments.get("x-queue-leader-locator").is_none(),
            "{queue}: {arguments}"
        );
    }
    for queue in ["ipn.parked", "ipn.inbound.1", "ipn.wait.10s"] {
        let info = broker.queue_info(queue).await;
        let arguments = &info["arguments"];
        assert_eq!(
            arguments["x-quorum-initial-group-size"], 3,
            "{queue}: {arguments}"
        );
        assert_eq!(arguments["x-queue-leader-locator"], "balanced", "{queue}");
        // One node: a group of 3 asked is the 1 there is.
        assert_eq!(
            info["members"].as_array().map(Vec::len),
            Some(1),
            "{queue}: {info}"
        );
    }

    let other = broker.another().await;
    declare_as_before(&other, "ipn.inbound.1", &shard_args_before(5)).await;
    let refused = ctl::declare_topology(&other.config()).await.unwrap_err();
    let shown = format!("{refused:#}");
    assert!(shown.contains("x-delivery-limit"), "{shown}");
}
