//! When PayPal fails: delay tiers, parking, blocked keys, held IPNs, replay and release, through
//! the ingress and the real worker, with the real broker, PostgreSQL and the fake PayPal.

use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use ipn_bridge::ctl::review::{self, Queue, Selection};
use ipn_bridge::fake_paypal::Answer;
use ipn_bridge::form::Form;
use ipn_bridge::provider::PayPal;
use ipn_bridge::store::Store;
use lapin::types::AMQPValue;

use crate::pipeline_e2e::{RunningWorker, Stack, raw};
use crate::support::{FakeWebhook, PATIENCE, post_form, ready_ingress, sample, with_fields};
use crate::worker::{Rig, inbound};
use ipn_bridge::worker::pipeline::{Error, Step};
use ipn_bridge::worker::{Inbound, Outcome, Settled};

/// A stack whose PayPal failures are final at once (one postback per attempt), with one shard,
/// so that every key shares it.
async fn stack() -> Stack {
    let mut stack = Stack::new().await;
    stack.config.worker.verify_attempts = NonZeroU32::MIN;
    stack.config.topology.shards = NonZeroU16::MIN;
    stack
}

/// Enough failures for `body` to walk every tier (1 + 3 attempts) and be parked.
const TO_PARKING: [Answer; 4] = [Answer::ServerError; 4];

fn key_of(body: &[u8]) -> String {
    PayPal::order_key_of(&Form::parse(body), body).to_string()
}

fn header_text(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    ipn_bridge::contract::header_text(&delivery.properties, name)
}

#[tokio::test]
async fn paypal_timing_out_every_time_walks_the_tiers_then_parks_the_ipn_and_blocks_its_key() {
    let mut stack = stack().await;
    stack.config.paypal.verify_timeout = Duration::from_millis(200);
    let webhook = FakeWebhook::start(0).await;
    stack.config.alert.webhook_url = Some(webhook.url.parse().expect("url"));
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let payment = sample("013_subscr_payment.txt");
    stack.paypal.script(&payment, [Answer::Silent; 4]);
    assert_eq!(post_form(&ingress.url, payment.clone()).await.0, 200);
    stack.wait_for("ipn.parked", 1).await;
    let channel = stack.broker.channel().await;
    let parked = stack.broker.drain(&channel, "ipn.parked").await;
    assert_eq!(parked[0].data, payment, "parked byte for byte");
    assert_eq!(
        header_text(&parked[0], "x-ipn-reason").as_deref(),
        Some("retries exhausted")
    );
    let attempts = parked[0]
        .properties
        .headers()
        .as_ref()
        .expect("headers")
        .inner()["x-ipn-attempt"]
        .clone();
    assert_eq!(
        attempts,
        AMQPValue::LongLongInt(4),
        "one first try and three tiers"
    );
    let error = header_text(&parked[0], "x-ipn-last-error").expect("last error");
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{error}"
    );
    assert_eq!(stack.paypal.postbacks().len(), 4);
    for tier in ["50ms", "100ms", "200ms"] {
        let name = format!("ipn_worker_retries_total{{tier=\"{tier}\"}}");
        assert_eq!(worker.metric(&name).await, Some(1.0), "{name}");
    }
    assert_eq!(worker.metric("ipn_worker_parked_total").await, Some(1.0));

    let key = key_of(&payment);
    let alert = &webhook.wait_for(1).await[0];
    assert_eq!(alert["kind"], "parked");
    assert_eq!(alert["order_key"], key.as_str());
    let fix = alert["fix"].as_str().expect("fix");
    assert!(
        fix.contains(&format!("ipnctl parked replay --key {key}")),
        "{fix}"
    );
    let listed = review::blocked_keys(&stack.config).await.expect("listed");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].order_key.as_str(), listed[0].state.as_str()),
        (key.as_str(), "parked")
    );
    assert_eq!(listed[0].held, 0);
    // The deployment's count, exported by the owner of shard 0 (here the only worker), with
    // how long the key has been blocked and its blocker parked.
    worker.wait_metric("ipn_worker_blocked_keys", 1.0).await;
    for age in [
        "ipn_worker_longest_blocked_seconds",
        "ipn_worker_oldest_parked_seconds",
    ] {
        let seconds = worker.metric(age).await.expect(age);
        assert!(seconds > 0.0 && seconds < 600.0, "{age} {seconds}");
    }

    let store = Store::connect(&stack.config.database).await.expect("store");
    let blocked = store
        .blocked(&key_of(&payment))
        .await
        .expect("query")
        .expect("blocked");
    assert!(blocked.parked);
    assert_eq!(blocked.attempts, 4);
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "never published"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_key_waiting_in_a_tier_holds_back_its_later_ipns_and_no_other_key() {
    let stack = stack().await;
    let signup = sample("012_subscr_signup.txt");
    let first_payment = sample("013_subscr_payment.txt");
    let second_payment = sample("014_subscr_payment.txt");
    let other_key = sample("001_web_accept.txt");
    stack.paypal.script(&signup, [Answer::ServerError]);
    // All four wait in the one shard queue before the worker starts, in this order.
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    for body in [&signup, &first_payment, &second_payment, &other_key] {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let worker = RunningWorker::spawn(stack.config.clone()).await;

    let events = stack.events(4).await;
    let arrived: Vec<Vec<u8>> = events.iter().map(raw).collect();
    assert_eq!(
        arrived[0], other_key,
        "another key of the shard does not wait"
    );
    assert_eq!(arrived[1..], [signup, first_payment, second_payment]);
    let sequences: Vec<i64> = events[1..]
        .iter()
        .map(|e| e["sequence"].as_i64().expect("n"))
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
    assert_eq!(worker.metric("ipn_worker_held_total").await, Some(2.0));
    assert_eq!(worker.metric("ipn_worker_released_total").await, Some(2.0));
    let store = Store::connect(&stack.config.database).await.expect("store");
    assert_eq!(
        store
            .blocked(&key_of(&raw(&events[1])))
            .await
            .expect("query"),
        None,
        "unblocked"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn an_ipn_behind_a_parked_one_is_verified_and_held_and_a_replay_delivers_both_in_order() {
    let mut stack = stack().await;
    let webhook = FakeWebhook::start(0).await;
    stack.config.alert.webhook_url = Some(webhook.url.parse().expect("url"));
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let first = sample("013_subscr_payment.txt");
    let second = sample("014_subscr_payment.txt");
    let mut forged = second.clone();
    forged.extend_from_slice(b"&custom2=forged");
    stack.paypal.script(&first, TO_PARKING);
    stack.paypal.script(&forged, [Answer::Invalid]);
    assert_eq!(post_form(&ingress.url, first.clone()).await.0, 200);
    stack.wait_for("ipn.parked", 1).await;

    assert_eq!(post_form(&ingress.url, second.clone()).await.0, 200);
    assert_eq!(post_form(&ingress.url, forged.clone()).await.0, 200);
    stack.wait_for("ipn.quarantine", 1).await;
    worker.wait_metric("ipn_worker_held_total", 1.0).await;
    let postbacks = stack.paypal.postbacks();
    assert!(
        postbacks.iter().any(|p| p.ipn == second),
        "held, but verified first"
    );
    let channel = stack.broker.channel().await;
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "nothing delivered yet"
    );

    let alerts = webhook.wait_for(3).await;
    let waiting = alerts
        .iter()
        .find(|a| a["kind"] == "held-behind-parked")
        .expect("an alert says it waits behind the parked one");
    assert_eq!(waiting["order_key"], key_of(&first).as_str());
    assert!(alerts.iter().any(|a| a["kind"] == "quarantined"));
    let listed = review::blocked_keys(&stack.config).await.expect("listed");
    assert_eq!(listed[0].held, 1);

    // PayPal is healthy again (the script is used up); the operator replays the parked one.
    let pass = review::replay(
        &stack.config,
        &Queue::Parked,
        &Selection::Key(key_of(&first)),
    )
    .await
    .expect("replay");
    assert_eq!((pass.taken, pass.kept), (1, 0));
    let events = stack.events(2).await;
    assert_eq!(raw(&events[0]), first);
    assert_eq!(raw(&events[1]), second);
    assert_eq!(events[0]["sequence"], 1);
    assert_eq!(events[1]["sequence"], 2);
    let quarantined = stack.broker.drain(&channel, "ipn.quarantine").await;
    assert_eq!(quarantined[0].data, forged);
    assert_eq!(
        header_text(&quarantined[0], "x-ipn-reason").as_deref(),
        Some("invalid")
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn releasing_a_blocked_key_skips_its_blocker_and_delivers_the_held_ipns_in_order() {
    let stack = stack().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let blocker = sample("012_subscr_signup.txt");
    let later = [
        sample("013_subscr_payment.txt"),
        sample("014_subscr_payment.txt"),
    ];
    let other_parked = sample("001_web_accept.txt");
    stack.paypal.script(&blocker, TO_PARKING);
    stack.paypal.script(&other_parked, TO_PARKING);
    assert_eq!(post_form(&ingress.url, other_parked.clone()).await.0, 200);
    assert_eq!(post_form(&ingress.url, blocker.clone()).await.0, 200);
    stack.wait_for("ipn.parked", 2).await;
    for body in &later {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    worker.wait_metric("ipn_worker_held_total", 2.0).await;

    let key = key_of(&blocker);
    assert!(
        review::release(&stack.config, &key, true)
            .await
            .expect("release")
    );
    let events = stack.events(2).await;
    assert_eq!(raw(&events[0]), later[0]);
    assert_eq!(raw(&events[1]), later[1]);
    let channel = stack.broker.channel().await;
    let left = stack.broker.drain(&channel, "ipn.parked").await;
    assert_eq!(
        left.len(),
        1,
        "the blocker is purged, the other key's parked IPN kept"
    );
    assert_eq!(left[0].data, other_parked);
    let store = Store::connect(&stack.config.database).await.expect("store");
    assert_eq!(store.blocked(&key).await.expect("query"), None);
    assert!(
        !review::release(&stack.config, &key, false)
            .await
            .expect("release"),
        "no longer blocked"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn listing_parked_and_quarantined_ipns_shows_them_in_order_and_leaves_them_as_they_were() {
    let stack = stack().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let parked_first = sample("001_web_accept.txt");
    let parked_second = sample("012_subscr_signup.txt");
    let forged = sample("003_cart.txt");
    stack.paypal.script(&parked_first, TO_PARKING);
    stack.paypal.script(&parked_second, TO_PARKING);
    stack.paypal.script(&forged, [Answer::Invalid]);
    assert_eq!(post_form(&ingress.url, parked_first.clone()).await.0, 200);
    stack.wait_for("ipn.parked", 1).await;
    assert_eq!(post_form(&ingress.url, parked_second.clone()).await.0, 200);
    assert_eq!(post_form(&ingress.url, forged.clone()).await.0, 200);
    stack.wait_for("ipn.parked", 2).await;
    stack.wait_for("ipn.quarantine", 1).await;

    let first_listing = review::list(&stack.config, &Queue::Parked)
        .await
        .expect("list");
    let keys: Vec<&str> = first_listing.iter().map(|m| m.order_key.as_str()).collect();
    assert_eq!(keys, [key_of(&parked_first), key_of(&parked_second)]);
    assert!(first_listing.iter().all(|m| m.attempts == 4));
    // Absolute times beside the ages: received by the ingress, then parked.
    for m in &first_listing {
        let received = m.received_at.as_deref().expect("received_at");
        let parked = m.parked_at.as_deref().expect("parked_at");
        let at = |t: &str| humantime::parse_rfc3339_weak(t).expect("RFC 3339");
        assert!(at(received) <= at(parked), "{received} then {parked}");
    }
    assert!(
        first_listing
            .iter()
            .all(|m| m.reason.as_deref() == Some("retries exhausted"))
    );
    let txn_id = Form::parse(&parked_first).text("txn_id");
    assert_eq!(first_listing[0].txn_id, txn_id);
    let second_listing = review::list(&stack.config, &Queue::Parked)
        .await
        .expect("list");
    // Ages move on between listings; everything else stays.
    let without_age = |listing: Vec<review::Listed>| {
        let cleared = |m: review::Listed| review::Listed {
            age_seconds: None,
            ..m
        };
        listing.into_iter().map(cleared).collect::<Vec<_>>()
    };
    assert_eq!(
        without_age(second_listing),
        without_age(first_listing.clone()),
        "listing changes nothing"
    );
    let quarantined = review::list(&stack.config, &Queue::Quarantine)
        .await
        .expect("list");
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].reason.as_deref(), Some("invalid"));

    let channel = stack.broker.channel().await;
    let left = stack.broker.drain(&channel, "ipn.parked").await;
    let bodies: Vec<&[u8]> = left.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(bodies, [parked_first.as_slice(), parked_second.as_slice()]);
    worker.stop().await;
    ingress.stop().await;
}

/// A pipeline whose PayPal failures are final at once, for driving the gate step by step.
async fn rig() -> Rig {
    Rig::start(|config| config.worker.verify_attempts = NonZeroU32::MIN).await
}

/// Waits for the copies a tier returns to the shard queues, and takes them.
async fn returned_copies(rig: &Rig, n: usize) -> Vec<Inbound> {
    let mut copies = Vec::new();
    let collect = async {
        while copies.len() < n {
            for (_, delivery) in rig.broker.drain_shards(&rig.topology).await {
                copies.push(Inbound::new(delivery.data, delivery.properties));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, collect)
        .await
        .expect("tier copies back in time");
    copies
}

/// The sequence number an IPN was published under, when the gate finished it that way.
fn published(settled: &Settled) -> Option<i64> {
    match settled {
        Settled::Finished {
            outcome: Outcome::Published { sequence, .. },
            ..
        } => Some(*sequence),
        _ => None,
    }
}

fn sequences_by_txn(events: &[serde_json::Value]) -> Vec<(String, i64)> {
    events
        .iter()
        .map(|e| {
            let txn = e["txn_id"].as_str().expect("txn_id").to_owned();
            (txn, e["sequence"].as_i64().expect("sequence"))
        })
        .collect()
}

fn txn(body: &[u8]) -> String {
    Form::parse(body).text("txn_id").expect("txn_id")
}

#[tokio::test]
async fn a_crash_between_publishing_to_a_tier_and_acking_loses_duplicates_and_reorders_nothing() {
    for step in [Step::Deferred, Step::Blocked] {
        let rig = rig().await;
        let first = sample("013_subscr_payment.txt");
        let second = sample("014_subscr_payment.txt");
        rig.paypal.script(&first, [Answer::ServerError]);
        let crashing = rig
            .another_pipeline()
            .await
            .with_fault_injection(Box::new(move |at| at == step));
        let crashed = crashing.settle(&inbound(&first)).await;
        assert!(
            matches!(crashed, Err(Error::Injected(at)) if at == step),
            "{step:?}: {crashed:?}"
        );

        // The restarted worker gets the unacked original again, then the key's next IPN, then
        // the copy the tier sends back.
        for (body, sequence) in [(&first, 1), (&second, 2)] {
            let settled = rig.pipeline.settle(&inbound(body)).await.expect("settled");
            assert_eq!(published(&settled), Some(sequence), "{step:?}: {settled:?}");
        }
        for copy in returned_copies(&rig, 1).await {
            let late = rig.pipeline.settle(&copy).await.expect("settled");
            assert!(
                matches!(
                    late,
                    Settled::Finished {
                        outcome: Outcome::Duplicate,
                        ..
                    }
                ),
                "{step:?}: the tier's copy is a duplicate: {late:?}"
            );
        }
        assert_eq!(
            sequences_by_txn(&rig.events().await),
            [(txn(&first), 1), (txn(&second), 2)],
            "{step:?}"
        );
        let key = key_of(&first);
        assert_eq!(
            rig.store.blocked(&key).await.expect("query"),
            None,
            "{step:?}"
        );
    }
}

#[tokio::test]
async fn a_crash_while_a_key_is_blocked_keeps_its_held_ipns_for_the_restarted_worker() {
    let rig = rig().await;
    let [first, second, third] = [
        "013_subscr_payment.txt",
        "014_subscr_payment.txt",
        "015_refunded.txt",
    ]
    .map(sample);
    assert_eq!(key_of(&first), key_of(&third), "one subscription");
    rig.paypal.script(&first, [Answer::ServerError]);
    let crashing = rig.another_pipeline().await;
    for (body, expected) in [(&first, "deferred"), (&second, "held"), (&third, "held")] {
        let settled = crashing.settle(&inbound(body)).await.expect("settled");
        let name = match settled {
            Settled::Deferred { .. } => "deferred",
            Settled::Held => "held",
            _ => "other",
        };
        assert_eq!(name, expected);
    }
    drop(crashing); // the worker is gone; its state is in PostgreSQL and in the tier

    for copy in returned_copies(&rig, 1).await {
        let settled = rig.pipeline.settle(&copy).await.expect("settled");
        assert!(
            matches!(settled, Settled::Finished { released: 2, .. }),
            "the blocker releases both held IPNs: {settled:?}"
        );
    }
    assert_eq!(
        sequences_by_txn(&rig.events().await),
        [(txn(&first), 1), (txn(&second), 2), (txn(&third), 3)]
    );
}

#[tokio::test]
async fn a_crash_while_held_ipns_are_being_released_publishes_each_once_in_order() {
    let rig = rig().await;
    let [first, second, third] = [
        "013_subscr_payment.txt",
        "014_subscr_payment.txt",
        "015_refunded.txt",
    ]
    .map(sample);
    rig.paypal.script(&first, [Answer::ServerError]);
    for body in [&first, &second, &third] {
        rig.pipeline.settle(&inbound(body)).await.expect("settled");
    }
    let copy = returned_copies(&rig, 1).await.remove(0);
    let crashing = rig
        .another_pipeline()
        .await
        .with_fault_injection(Box::new(|at| at == Step::Released));
    let crashed = crashing.settle(&copy).await;
    assert!(
        matches!(crashed, Err(Error::Injected(Step::Released))),
        "crashed after releasing the first held IPN: {crashed:?}"
    );

    // The copy was not acked: the restarted worker gets it again.
    let settled = rig.pipeline.settle(&copy).await.expect("settled");
    assert!(matches!(settled, Settled::Finished { .. }), "{settled:?}");
    assert_eq!(
        sequences_by_txn(&rig.events().await),
        [(txn(&first), 1), (txn(&second), 2), (txn(&third), 3)],
        "each once, in order"
    );
    assert_eq!(
        rig.store.blocked(&key_of(&first)).await.expect("query"),
        None
    );
}

#[tokio::test]
async fn a_held_ipn_that_fails_when_released_becomes_the_blocker_and_order_holds() {
    let stack = stack().await;
    let first = sample("013_subscr_payment.txt");
    let second = sample("014_subscr_payment.txt");
    let third = sample("015_refunded.txt");
    stack.paypal.script(&first, [Answer::ServerError]);
    stack.paypal.script(&second, [Answer::ServerError]);
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    for body in [&first, &second, &third] {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let worker = RunningWorker::spawn(stack.config.clone()).await;

    let events = stack.events(3).await;
    let arrived: Vec<Vec<u8>> = events.iter().map(raw).collect();
    assert_eq!(arrived, [first, second, third]);
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().expect("n"))
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
    // The first was deferred once; the second, failing on its release, once after it.
    let retries = worker
        .metric("ipn_worker_retries_total{tier=\"50ms\"}")
        .await;
    assert_eq!(retries, Some(2.0));
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_chargeback_naming_only_a_subscription_payment_waits_behind_that_subscriptions_payments()
{
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let first = sample("013_subscr_payment.txt");
    let second = sample("014_subscr_payment.txt");
    let paid = Form::parse(&first).text("txn_id").expect("txn_id");
    // A live refund (the chargeback samples are sandbox IPNs, which a live bridge quarantines).
    let reversal = sample("002_refunded.txt");
    let chargeback = with_fields(
        &reversal,
        &[("parent_txn_id", &paid), ("ipn_track_id", "cb1")],
    );
    let unrelated = with_fields(
        &reversal,
        &[
            ("parent_txn_id", "UNKNOWN1"),
            ("txn_id", "X2"),
            ("ipn_track_id", "cb2"),
        ],
    );
    assert_eq!(
        key_of(&chargeback),
        format!("txn:{paid}"),
        "no subscription named"
    );
    assert_eq!(post_form(&ingress.url, first.clone()).await.0, 200);
    assert_eq!(raw(&stack.events(1).await[0]), first);
    // The second payment is slow to verify; without re-routing the chargeback would pass it.
    stack
        .paypal
        .script(&second, [Answer::Slow(Duration::from_millis(1500))]);
    for body in [&second, &chargeback, &unrelated] {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }

    let events = stack.events(3).await;
    let profile = key_of(&first);
    let of_profile: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["order_key"] == profile.as_str())
        .collect();
    assert_eq!(of_profile.len(), 2, "{events:?}");
    assert_eq!(raw(of_profile[0]), second);
    assert_eq!(
        raw(of_profile[1]),
        chargeback,
        "the chargeback waited for the payment before it"
    );
    assert_eq!(
        of_profile[1]["sequence"], 3,
        "numbered within the subscription"
    );
    let other = events
        .iter()
        .find(|e| raw(e) == unrelated)
        .expect("unrelated event");
    assert_eq!(
        other["order_key"], "txn:UNKNOWN1",
        "an unknown payment keeps its own key"
    );
    assert_eq!(worker.metric("ipn_worker_rerouted_total").await, Some(1.0));
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn an_ipn_the_broker_dead_lettered_is_listed_and_replayed_to_its_shard_by_ipnctl_dead() {
    use futures_util::StreamExt;
    use ipn_bridge::provider::Provider;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};
    let mut stack = Stack::new().await;
    stack.config.topology.delivery_limit = NonZeroU16::new(1).expect("non-zero");
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let body = sample("013_subscr_payment.txt");
    assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    // A consumer that dies on it, as a crashing worker would: returned, then returned again
    // past the limit, the broker dead-letters it to <p>.dead.
    let topology = stack.topology();
    let shard = PayPal.order_key(&body).shard(topology.shards());
    let channel = stack.broker.channel().await;
    let mut consumer = channel
        .basic_consume(
            topology.shard_queue(shard).as_str().into(),
            "dies-on-it".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let dead = topology.dead_queue();
    while stack.broker.count(&channel, &dead).await == 0 {
        let next = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        if let Ok(Some(Ok(delivery))) = next {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            delivery.acker.nack(requeue).await.expect("nack");
        }
    }
    channel
        .basic_cancel(consumer.tag(), Default::default())
        .await
        .expect("cancelled");
    let listed = review::list(&stack.config, &Queue::BridgeDead)
        .await
        .expect("listed");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].order_key, key_of(&body));
    assert_eq!(listed[0].reason.as_deref(), Some("delivery_limit"));
    assert!(listed[0].received_at.is_some());
    // The cause fixed (here: a worker that does not die), the operator replays it.
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let pass = review::replay(&stack.config, &Queue::BridgeDead, &Selection::All)
        .await
        .expect("replayed");
    assert_eq!((pass.taken, pass.kept), (1, 0));
    let events = stack.events(1).await;
    assert_eq!(raw(&events[0]), body);
    assert_eq!(stack.broker.count(&channel, &dead).await, 0);
    worker.stop().await;
    ingress.stop().await;
}
