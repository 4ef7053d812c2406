//! After `<p>.events`: a business service's queue cannot drop an event (dead-lettering to
//! `<queue>.dead`), a service in trouble is noticed (the worker's watch alerts), and dead or past
//! events can be delivered again (`ipnctl downstream dead replay`, `ipnctl events redeliver`).
//! Real RabbitMQ, PostgreSQL and the fake PayPal; events come from the real pipeline.

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::time::Duration;

use futures_util::StreamExt;
use ipn_bridge::config::{Config, Downstream};
use ipn_bridge::ctl;
use ipn_bridge::ctl::review::{self, Queue, Selection};
use ipn_bridge::store::EventFilter;
use ipn_bridge::worker::Outcome;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::pipeline_e2e::RunningWorker;
use crate::support::{FakeWebhook, PATIENCE, sample};
use crate::worker::Rig;

/// One subscription's events, in the order PayPal sent them.
const SUBSCRIPTION: [&str; 4] = [
    "012_subscr_signup.txt",
    "013_subscr_payment.txt",
    "014_subscr_payment.txt",
    "016_subscr_cancel.txt",
];

/// A rig whose config has the downstream queue `billing` (every event) with `adjust` applied.
async fn rig(adjust: impl FnOnce(&mut Downstream, &mut Config)) -> Rig {
    Rig::start(|config| {
        let mut billing = Downstream::new("billing", &["#"]);
        adjust(&mut billing, config);
        config.downstream = vec![billing];
    })
    .await
}

/// Publishes the subscription's events through the pipeline; returns their event ids in order.
async fn publish_subscription(rig: &Rig) -> Vec<String> {
    let mut ids = Vec::new();
    for name in SUBSCRIPTION {
        match rig.try_settle(&sample(name)).await {
            Ok(Outcome::Published { event_id, .. }) => ids.push(event_id.to_string()),
            other => panic!("{name}: {other:?}"),
        }
    }
    ids
}

/// Waits until `queue` holds `n` messages.
async fn wait_for(rig: &Rig, queue: &str, n: u32) {
    rig.broker.wait_for(queue, n).await;
}

fn header<'a>(delivery: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn sequence(delivery: &lapin::message::Delivery) -> i64 {
    match header(delivery, "x-ipn-sequence") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("x-ipn-sequence: {other:?}"),
    }
}

fn event_id(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .expect("message id")
        .to_string()
}

#[tokio::test]
async fn a_rejected_event_is_dead_lettered_alerted_and_replayed_in_order_and_applied_once() {
    let webhook = FakeWebhook::start(0).await;
    let rig = rig(|billing, config| {
        billing.no_consumer_after = Duration::from_millis(300);
        config.alert.webhook_url = Some(webhook.url.parse().expect("url"));
        config.alert.min_interval = Duration::from_secs(3600);
        config.worker.downstream_check = Duration::from_millis(100);
    })
    .await;
    let watcher = RunningWorker::spawn(rig.config.clone()).await;
    let ids = publish_subscription(&rig).await;
    wait_for(&rig, "billing", 4).await;

    // The service takes every event of the subscription and rejects each (say, a bug).
    let channel = rig.broker.channel().await;
    for _ in &ids {
        let got = channel
            .basic_get("billing".into(), BasicGetOptions { no_ack: false })
            .await
            .expect("get")
            .expect("an event");
        got.delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
    }
    // Nothing lost: all four wait in billing.dead, with the reason.
    wait_for(&rig, "billing.dead", 4).await;
    let dead = review::list(&rig.config, &Queue::Dead("billing".to_owned()))
        .await
        .expect("dead list");
    assert_eq!(
        dead.iter()
            .map(|d| d.message_id.clone().expect("id"))
            .collect::<Vec<_>>(),
        ids
    );
    assert!(
        dead.iter().all(|d| d.reason.as_deref() == Some("rejected")),
        "{dead:?}"
    );
    assert_eq!(
        dead.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3), Some(4)]
    );
    let table = review::dead_table(&dead);
    assert!(
        table.contains("profile:I-7PX4WQ2N9KD3") && table.contains("rejected"),
        "{table}"
    );

    // The watch told a human: the dead-lettered events, and the queue without consumer.
    let alerts = webhook.wait_for(2).await;
    let of_kind = |kind: &str| -> Vec<serde_json::Value> {
        webhook
            .received()
            .into_iter()
            .filter(|a| a["kind"] == kind)
            .collect()
    };
    let dead_alert = alerts
        .iter()
        .find(|a| a["kind"] == "downstream-dead-lettered")
        .unwrap_or_else(|| panic!("dead-letter alert: {alerts:?}"));
    assert_eq!(dead_alert["order_key"], "billing");
    let fix = dead_alert["fix"].as_str().expect("fix");
    assert!(
        fix.contains("in billing.dead") && fix.contains("ipnctl downstream dead replay billing"),
        "{fix}"
    );
    assert!(
        dead_alert["text"]
            .as_str()
            .expect("text")
            .contains("queue: billing")
    );
    // Rate-limited: one no-consumer alert, however many looks found it without consumer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        of_kind("downstream-no-consumer").len(),
        1,
        "{:?}",
        webhook.received()
    );
    let metric = watcher
        .metric("ipn_worker_downstream_dead{queue=\"billing\"}")
        .await;
    assert_eq!(metric, Some(4.0));

    // The fix is deployed; the operator replays. The service dedups by event id, as
    // docs/events.md says, so applying is idempotent; it sees each once, in order.
    let replayed = review::replay(
        &rig.config,
        &Queue::Dead("billing".to_owned()),
        &Selection::All,
    )
    .await
    .expect("replay");
    assert_eq!((replayed.taken, replayed.kept), (4, 0));
    let back = rig.broker.drain(&channel, "billing").await;
    assert_eq!(
        back.iter().map(event_id).collect::<Vec<_>>(),
        ids,
        "same ids, same order"
    );
    assert_eq!(back.iter().map(sequence).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(
        back.iter().all(|d| header(d, "x-death").is_none()),
        "replayed as first published"
    );
    assert!(
        back.iter()
            .all(|d| header(d, "x-ipn-replayed-at").is_some())
    );
    let applied: HashSet<String> = back.iter().map(event_id).collect();
    assert_eq!(applied.len(), ids.len(), "each applied once");
    assert_eq!(rig.broker.count(&channel, "billing.dead").await, 0);
    watcher.stop().await;
}

#[tokio::test]
async fn an_event_requeued_forever_is_dead_lettered_at_the_limit_and_the_events_behind_it_flow() {
    let rig = rig(|billing, _| {
        billing.delivery_limit = NonZeroU16::new(3).expect("non-zero");
    })
    .await;
    let ids = publish_subscription(&rig).await;
    wait_for(&rig, "billing", 4).await;

    // A service that cannot handle the first event and requeues it every time.
    let channel = rig.broker.channel().await;
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "billing".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut poison_deliveries = 0;
    let mut applied = Vec::new();
    while applied.len() < ids.len() - 1 {
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("an event in time: the poison one must not block the rest")
            .expect("consumer open")
            .expect("delivery");
        if event_id(&delivery) == ids[0] {
            poison_deliveries += 1;
            // RabbitMQ counts returns: the limit is 3 requeues, so 4 deliveries.
            assert!(poison_deliveries <= 4, "delivered past the limit");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            delivery.acker.nack(requeue).await.expect("nack");
        } else {
            applied.push(event_id(&delivery));
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
    }
    assert_eq!(poison_deliveries, 4);
    assert_eq!(applied, ids[1..], "the rest in order");
    wait_for(&rig, "billing.dead", 1).await;
    let dead = review::list(&rig.config, &Queue::Dead("billing".to_owned()))
        .await
        .expect("dead list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(dead[0].reason.as_deref(), Some("delivery_limit"));
    // Purged on purpose: gone from billing.dead (the history still has it).
    let purged = review::purge(
        &rig.config,
        &Queue::Dead("billing".to_owned()),
        &Selection::MessageId(ids[0].clone()),
    )
    .await
    .expect("purge");
    assert_eq!(purged.taken, 1);
    let listed = ctl::downstream::list(&rig.config).await.expect("list");
    assert_eq!(listed.len(), 1);
    let seen = listed[0].seen.expect("billing exists");
    assert_eq!((seen.depth, seen.consumers, seen.dead), (0, 1, 0));
    let table = ctl::downstream::list_table(&listed);
    assert!(
        table.starts_with("QUEUE") && table.contains("billing"),
        "{table}"
    );
}

#[tokio::test]
async fn stored_events_are_found_by_txn_and_key_and_redelivered_in_key_order_with_their_ids() {
    let rig = rig(|_, _| {}).await;
    let ids = publish_subscription(&rig).await;
    // Another key in between, so the redelivery has two keys to order.
    match rig.try_settle(&sample("001_web_accept.txt")).await {
        Ok(Outcome::Published { .. }) => {}
        other => panic!("{other:?}"),
    }
    let by_txn = EventFilter::Txn("1GK360366M840293X".to_owned());
    let (found, total) = ctl::events::find(&rig.config, &by_txn, 10)
        .await
        .expect("find");
    assert_eq!(total, 1);
    assert_eq!(found[0].event_id, ids[1]);
    assert_eq!(
        found[0].event.as_ref().expect("event")["event_id"],
        ids[1].as_str()
    );
    let by_key = EventFilter::Key("profile:I-7PX4WQ2N9KD3".to_owned());
    let (found, _) = ctl::events::find(&rig.config, &by_key, 10)
        .await
        .expect("find");
    assert_eq!(
        found.iter().map(|f| f.event_id.clone()).collect::<Vec<_>>(),
        ids
    );
    let table = ctl::events::found_table(&found);
    assert!(
        table.starts_with("PUBLISHED") && table.contains("subscr_cancel"),
        "{table}"
    );

    // A service that lost its database asks for everything since an hour ago.
    let channel = rig.broker.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare("rebuilt".into(), durable, FieldTable::default())
        .await
        .expect("queue");
    let since = EventFilter::Between {
        since: std::time::SystemTime::now() - Duration::from_secs(3600),
        until: None,
    };
    let done = ctl::events::redeliver(&rig.config, &since, "rebuilt")
        .await
        .expect("redeliver");
    assert_eq!(done.published, 5);
    let again = rig.broker.drain(&channel, "rebuilt").await;
    let original: Vec<serde_json::Value> = rig.events().await;
    assert_eq!(again.len(), original.len());
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for delivery in &again {
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
        let first = original
            .iter()
            .find(|o| o["event_id"] == event["event_id"])
            .expect("an original event");
        assert_eq!(&event, first, "the same event");
        assert_eq!(event_id(delivery), event["event_id"].as_str().expect("id"));
        assert!(header(delivery, "x-ipn-redelivered-at").is_some());
        let key = event["order_key"].as_str().expect("key").to_owned();
        per_key.entry(key).or_default().push(sequence(delivery));
    }
    assert_eq!(per_key["profile:I-7PX4WQ2N9KD3"], [1, 2, 3, 4]);
    assert_eq!(per_key.len(), 2);
    // A queue that does not exist is a clear error, not a silent drop.
    let error = ctl::events::redeliver(&rig.config, &since, "no-such-queue")
        .await
        .expect_err("no queue");
    assert!(
        format!("{error:#}").contains("no-such-queue does not exist"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_service_queue_declared_by_an_older_bridge_stops_the_worker_loudly_but_never_the_intake()
{
    let stack = crate::pipeline_e2e::Stack::new().await;
    // `billing` as an older bridge declared it: quorum, no limit, no dead-letter queue.
    let channel = stack.broker.channel().await;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare("billing".into(), durable, quorum)
        .await
        .expect("old queue");
    let mut config = stack.config.clone();
    config.downstream.push(Downstream::new("billing", &["#"]));
    let (topology, ingress) = crate::support::ready_ingress(config.clone()).await;
    let body = sample("001_web_accept.txt");
    assert_eq!(
        crate::support::post_form(&ingress.url, body.clone())
            .await
            .0,
        200
    );
    assert_eq!(stack.broker.queued_bodies(&topology).await, [body]);
    // What the worker (and `ipnctl topology declare`) say: the broker's reason, naming the queue.
    let error = ctl::declare_topology(&config)
        .await
        .expect_err("inequivalent arguments");
    let text = format!("{error:#}");
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("billing"),
        "{text}"
    );
    ingress.stop().await;
}
