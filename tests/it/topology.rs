//! The topology as declared on the real broker, and what its arguments promise.

use std::time::Duration;

use futures_util::StreamExt;
use ipn_bridge::ctl;
use ipn_bridge::topology::Topology;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;

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
    config.downstream = vec![
        ipn_bridge::config::Downstream {
            queue: "billing".to_owned(),
            bindings: vec!["subscr_*.#".to_owned(), "#.refunded".to_owned()],
        },
        ipn_bridge::config::Downstream {
            queue: "audit".to_owned(),
            bindings: vec!["#".to_owned()],
        },
    ];
    ctl::declare_topology(&config).await.expect("declared");
    ctl::declare_topology(&config)
        .await
        .expect("declared again");
    assert_eq!(broker.queue_info("billing").await["type"], "quorum");
    let mut billing = broker.binding_keys("billing", "ipn.events").await;
    billing.sort();
    assert_eq!(billing, ["#.refunded", "subscr_*.#"]);
    assert_eq!(broker.binding_keys("audit", "ipn.events").await, ["#"]);
}
