//! The worker's per-IPN pipeline against the real broker, real PostgreSQL and the fake PayPal.

use std::collections::HashMap;

use base64::Engine;
use ipn_bridge::amqp::{Outgoing, PublishError, Publisher};
use ipn_bridge::config::Config;
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::form::Form;
use ipn_bridge::policy::Reason;
use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::paypal::verify::Verifier;
use ipn_bridge::store::{Claim, EventFilter, Store};
use ipn_bridge::topology::Topology;
use ipn_bridge::worker::pipeline::{Error, Step};
use ipn_bridge::worker::{Inbound, Outcome, Pipeline};
use lapin::BasicProperties;
use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::support::{PATIENCE, Services, TestBroker, TestDb, sample, samples};

/// A pipeline on a vhost and a database of its own, with a downstream queue `downstream`
/// bound to every event.
pub(crate) struct Rig {
    pub(crate) broker: TestBroker,
    _db: TestDb,
    pub(crate) topology: Topology,
    pub(crate) paypal: FakePaypal,
    pub(crate) store: Store,
    pub(crate) pipeline: Pipeline,
    pub(crate) config: Config,
}

impl Rig {
    /// Another pipeline on the same broker, database and PayPal, as a restarted worker's.
    pub(crate) async fn another_pipeline(&self) -> Pipeline {
        let publisher =
            Publisher::start(&self.config.amqp, self.topology.clone(), "ipn-worker-test");
        assert!(
            publisher.wait_connected(PATIENCE).await,
            "publisher connected"
        );
        let verifier = Verifier::new(&self.config.paypal).expect("verifier");
        Pipeline::new(&self.config, verifier, self.store.clone(), publisher)
    }

    /// Settles one delivery of `body` in the rig's pipeline, as the shard's lane would.
    pub(crate) async fn try_settle(&self, body: &[u8]) -> Result<Outcome, Error> {
        self.pipeline.handle(&inbound(body)).await
    }

    /// [`Rig::try_settle`] of a delivery that must finish (published, dropped or quarantined).
    pub(crate) async fn settle(&self, body: &[u8]) -> Outcome {
        self.try_settle(body).await.expect("finished")
    }

    pub(crate) async fn start(adjust: impl FnOnce(&mut Config)) -> Rig {
        let Services {
            broker,
            db,
            paypal,
            mut config,
        } = Services::start().await;
        adjust(&mut config);
        // The whole topology, delay tiers included.
        let topology = Topology::of(&config);
        let publisher = Publisher::start(&config.amqp, topology.clone(), "ipn-worker-test");
        assert!(
            publisher.wait_connected(PATIENCE).await,
            "publisher connected"
        );
        let store = Store::connect(&config.database).await.expect("store");
        let verifier = Verifier::new(&config.paypal).expect("verifier");
        let pipeline = Pipeline::new(&config, verifier, store.clone(), publisher);
        let rig = Rig {
            broker,
            _db: db,
            topology,
            paypal,
            store,
            pipeline,
            config,
        };
        rig.bind_downstream().await;
        rig
    }

    async fn bind_downstream(&self) {
        let channel = self.broker.channel().await;
        let durable = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare("downstream".into(), durable, FieldTable::default())
            .await
            .expect("queue");
        channel
            .queue_bind(
                "downstream".into(),
                self.topology.events_exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// Every event in the downstream queue, as JSON, in queue order.
    pub(crate) async fn events(&self) -> Vec<serde_json::Value> {
        let channel = self.broker.channel().await;
        let deliveries = self.broker.drain(&channel, "downstream").await;
        deliveries
            .iter()
            .map(|d| serde_json::from_slice(&d.data).expect("event JSON"))
            .collect()
    }
}

pub(crate) fn inbound(body: &[u8]) -> Inbound {
    let key = PayPal::order_key_of(&Form::parse(body), body);
    let mut headers = FieldTable::default();
    headers.insert(
        "x-ipn-order-key".into(),
        AMQPValue::LongString(key.as_str().into()),
    );
    Inbound::new(
        body.to_vec(),
        BasicProperties::default().with_headers(headers),
    )
}

fn is_test_ipn(body: &[u8]) -> bool {
    Form::parse(body).text("test_ipn").as_deref() == Some("1")
}

#[tokio::test]
async fn every_live_sample_becomes_one_event_numbered_in_order_per_key() {
    let rig = Rig::start(|_| {}).await;
    let samples = samples();
    for (name, body) in &samples {
        let outcome = rig.settle(body).await;
        if is_test_ipn(body) {
            assert_eq!(
                outcome,
                Outcome::Quarantined(Reason::WrongEnvironment),
                "{name}"
            );
        } else {
            assert!(
                matches!(outcome, Outcome::Published { .. }),
                "{name}: {outcome:?}"
            );
        }
    }
    let events = rig.events().await;
    let live: Vec<&Vec<u8>> = samples
        .iter()
        .map(|(_, b)| b)
        .filter(|b| !is_test_ipn(b))
        .collect();
    assert_eq!(events.len(), live.len());
    let mut next: HashMap<String, i64> = HashMap::new();
    for (event, body) in events.iter().zip(live) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(event["raw_body_base64"].as_str().expect("raw body"))
            .expect("base64");
        assert_eq!(
            &raw, body,
            "events arrive in handling order with the exact bytes"
        );
        let key = event["order_key"].as_str().expect("key").to_owned();
        let expected = next.entry(key).or_insert(0);
        *expected += 1;
        assert_eq!(event["sequence"], *expected, "sequence 1, 2, 3... per key");
    }
    let muller = events
        .iter()
        .find(|e| e["txn_id"] == "8FX91612UX4519215")
        .expect("001");
    assert_eq!(muller["fields"]["last_name"], "Müller");
    assert_eq!(muller["fields"]["item_name"], "Gartenbuch – Jahresabo");
    let channel = rig.broker.channel().await;
    let quarantined = rig
        .broker
        .drain(&channel, &rig.topology.quarantine_queue())
        .await;
    assert_eq!(quarantined.len(), samples.len() - events.len());
}

#[tokio::test]
async fn resends_are_published_once_and_pending_then_completed_twice() {
    let rig = Rig::start(|_| {}).await;
    let original = sample("001_web_accept.txt");
    let mut manual_resend = original.clone();
    manual_resend.extend_from_slice(b"&resend=true");
    let first = rig.settle(&original).await;
    assert_eq!(rig.settle(&original).await, Outcome::Duplicate);
    assert_eq!(rig.settle(&manual_resend).await, Outcome::Duplicate);
    let pending = rig
        .try_settle(&sample("010_web_accept_echeck_pending.txt"))
        .await;
    let completed = rig
        .try_settle(&sample("011_web_accept_echeck_completed.txt"))
        .await;
    assert!(
        matches!(pending, Ok(Outcome::Published { sequence: 1, .. })),
        "{pending:?}"
    );
    assert!(
        matches!(completed, Ok(Outcome::Published { sequence: 2, .. })),
        "{completed:?}"
    );
    let events = rig.events().await;
    assert_eq!(events.len(), 3);
    let Outcome::Published { event_id, .. } = first else {
        panic!("published: {first:?}")
    };
    assert_eq!(events[0]["event_id"], event_id.to_string());
}

#[tokio::test]
async fn an_invalid_or_foreign_ipn_is_quarantined_with_its_reason_and_never_published() {
    let rig = Rig::start(|config| {
        config.paypal.receiver_emails = vec!["billing@brightleaf.example".into()]
    })
    .await;
    let forged = sample("042_send_money.txt");
    rig.paypal.script(&forged, [Answer::Invalid]);
    assert_eq!(
        rig.settle(&forged).await,
        Outcome::Quarantined(Reason::Invalid)
    );
    // 043 is addressed to seller@paypalsandbox.com; in sandbox mode it would pass the
    // environment check, so make it live-shaped by dropping test_ipn.
    let foreign = String::from_utf8(sample("043_web_accept_simulator.txt"))
        .expect("ascii")
        .replace("&test_ipn=1", "");
    assert_eq!(
        rig.settle(foreign.as_bytes()).await,
        Outcome::Quarantined(Reason::ForeignReceiver)
    );
    assert_eq!(
        rig.settle(b"not a form").await,
        Outcome::Quarantined(Reason::Unreadable)
    );
    assert!(
        rig.events().await.is_empty(),
        "nothing reaches business services"
    );

    let channel = rig.broker.channel().await;
    let quarantined = rig
        .broker
        .drain(&channel, &rig.topology.quarantine_queue())
        .await;
    let reasons: Vec<(Vec<u8>, String)> = quarantined
        .iter()
        .map(|d| {
            let headers = d.properties.headers().as_ref().expect("headers");
            let Some(AMQPValue::LongString(reason)) = headers.inner().get("x-ipn-reason") else {
                panic!("reason header");
            };
            (
                d.data.clone(),
                String::from_utf8_lossy(reason.as_bytes()).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (forged, "invalid".to_owned()),
            (foreign.into_bytes(), "foreign-receiver".to_owned()),
            (b"not a form".to_vec(), "unreadable".to_owned()),
        ]
    );
    // Only the two readable ones were posted back.
    assert_eq!(rig.paypal.postbacks().len(), 2);
}

#[tokio::test]
async fn paypal_failing_every_attempt_is_transient_and_a_later_try_succeeds() {
    let rig = Rig::start(|config| {
        config.worker.verify_attempts = std::num::NonZeroU32::new(3).expect("3")
    })
    .await;
    let body = sample("013_subscr_payment.txt");
    rig.paypal.script(
        &body,
        [Answer::ServerError, Answer::Garbage, Answer::ServerError],
    );
    let failed = rig.try_settle(&body).await;
    assert!(matches!(failed, Err(Error::Verify(_))), "{failed:?}");
    assert_eq!(rig.paypal.postbacks().len(), 3, "three attempts in-process");
    assert!(rig.events().await.is_empty());
    let retried = rig.settle(&body).await;
    assert!(
        matches!(retried, Outcome::Published { sequence: 1, .. }),
        "{retried:?}"
    );
}

#[tokio::test]
async fn a_claimed_but_unconfirmed_ipn_is_republished_under_the_same_id_and_number() {
    let rig = Rig::start(|_| {}).await;
    let body = sample("014_subscr_payment.txt");
    let form = Form::parse(&body);
    let keys = PayPal::dedup_keys(&form, &body);
    let key = PayPal::order_key_of(&form, &body);
    // As if an earlier attempt claimed, then crashed before the confirm (or mark_done).
    let Claim::New(claimed) = rig.store.claim(&keys, key.as_str()).await.expect("claim") else {
        panic!("new claim");
    };
    let outcome = rig.settle(&body).await;
    assert_eq!(
        outcome,
        Outcome::Published {
            event_id: claimed.event_id,
            sequence: claimed.sequence
        }
    );
    assert_eq!(rig.settle(&body).await, Outcome::Duplicate);
    assert_eq!(rig.events().await.len(), 1);
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_is_not_acknowledged_until_it_can_be_routed() {
    let rig = Rig::start(|_| {}).await;
    let channel = rig.broker.channel().await;
    channel
        .queue_unbind(
            "downstream".into(),
            rig.topology.events_exchange().as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    let body = sample("001_web_accept.txt");
    let failed = rig.try_settle(&body).await;
    assert!(matches!(failed, Err(Error::Publish(_))), "{failed:?}");
    rig.bind_downstream().await;
    let outcome = rig.settle(&body).await;
    assert!(
        matches!(outcome, Outcome::Published { sequence: 1, .. }),
        "same number: {outcome:?}"
    );
    assert_eq!(rig.events().await.len(), 1);
}

#[tokio::test]
async fn a_crash_between_any_two_steps_yields_one_event_id_and_number_after_the_redelivery() {
    for step in [Step::Claimed, Step::Published, Step::MarkedDone] {
        let rig = Rig::start(|_| {}).await;
        let crashing = rig
            .another_pipeline()
            .await
            .with_fault_injection(Box::new(move |at| at == step));
        let first = sample("013_subscr_payment.txt");
        let next = sample("014_subscr_payment.txt");
        let crashed = crashing.handle(&inbound(&first)).await;
        assert!(
            matches!(crashed, Err(Error::Injected(at)) if at == step),
            "{step:?}: {crashed:?}"
        );

        // The redelivery, handled by the restarted worker.
        let redelivered = rig.settle(&first).await;
        match step {
            Step::MarkedDone => assert_eq!(redelivered, Outcome::Duplicate, "{step:?}"),
            _ => assert!(
                matches!(redelivered, Outcome::Published { sequence: 1, .. }),
                "{step:?}: {redelivered:?}"
            ),
        }
        assert_eq!(rig.settle(&first).await, Outcome::Duplicate);
        let following = rig.settle(&next).await;
        assert!(
            matches!(following, Outcome::Published { sequence: 2, .. }),
            "{step:?}: no gap: {following:?}"
        );

        let events = rig.events().await;
        let of_first: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["txn_id"] == "1GK360366M840293X")
            .collect();
        // A crash after the confirm but before mark_done republishes: a second copy downstream,
        // with the same id and number, which consumers deduplicate on.
        let copies = if step == Step::Published { 2 } else { 1 };
        assert_eq!(of_first.len(), copies, "{step:?}");
        for copy in &of_first {
            assert_eq!(
                copy["event_id"], of_first[0]["event_id"],
                "{step:?}: one id"
            );
            assert_eq!(copy["sequence"], 1, "{step:?}: one number");
        }
        // The history holds the event once, whatever copy the crash made downstream.
        let filter = EventFilter::Txn("1GK360366M840293X".to_owned());
        let stored = rig.store.find_events(&filter, 10).await.expect("history");
        assert_eq!(stored.len(), 1, "{step:?}: one stored event: {stored:?}");
        assert_eq!(
            stored[0].event_id.to_string(),
            of_first[0]["event_id"].as_str().expect("id"),
            "{step:?}"
        );
        assert_eq!(stored[0].sequence, 1);
        let json: serde_json::Value =
            serde_json::from_str(stored[0].json.as_deref().expect("json")).expect("stored JSON");
        assert_eq!(json["event_id"], of_first[0]["event_id"], "{step:?}");
        assert_eq!(
            stored[0].routing_key.as_deref(),
            Some("paypal.subscription.subscr_payment.completed")
        );
    }
}

#[tokio::test]
async fn a_verification_timing_out_once_is_retried_in_place_and_delivered() {
    let rig = Rig::start(|config| {
        config.paypal.verify_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let body = sample("013_subscr_payment.txt");
    rig.paypal.script(&body, [Answer::Silent]);
    let outcome = rig.settle(&body).await;
    assert!(
        matches!(outcome, Outcome::Published { sequence: 1, .. }),
        "{outcome:?}"
    );
    assert_eq!(rig.paypal.postbacks().len(), 2, "one timeout, one answer");
    let metrics = rig.pipeline.metrics().render();
    assert!(
        metrics.contains("ipn_worker_verifications_total{outcome=\"error\"} 1"),
        "{metrics}"
    );
    assert_eq!(rig.events().await.len(), 1);
}

#[tokio::test]
async fn a_verified_ipn_whose_type_and_status_outgrow_a_routing_key_gets_its_event_under_a_cut_key()
{
    let rig = Rig::start(|_| {}).await;
    // U+3000 (an ideographic space) around the words, in UTF-8: the id checks trim white space,
    // so the IPN passes them, but 100 of them are 300 bytes of routing key word.
    let pad = "%E3%80%80".repeat(100);
    let body = String::from_utf8(sample("001_web_accept.txt"))
        .expect("ASCII sample")
        .replace("charset=windows-1252", "charset=UTF-8")
        .replace("txn_type=web_accept", &format!("txn_type={pad}web_accept"))
        .replace(
            "payment_status=Completed",
            &format!("payment_status=Completed{pad}"),
        );
    assert!(body.contains("charset=UTF-8") && body.contains("web_accept"));
    let outcome = rig.settle(body.as_bytes()).await;
    assert!(
        matches!(outcome, Outcome::Published { sequence: 1, .. }),
        "{outcome:?}"
    );
    let channel = rig.broker.channel().await;
    let delivered = rig.broker.drain(&channel, "downstream").await;
    assert_eq!(delivered.len(), 1);
    let key = delivered[0].routing_key.as_str();
    assert!(key.len() <= 255, "{} bytes: {key}", key.len());
    assert!(key.starts_with("paypal.payment.\u{3000}"), "{key}");
    assert!(key.contains(".completed\u{3000}"), "{key}");
    let filter = EventFilter::Txn("8FX91612UX4519215".to_owned());
    let stored = rig.store.find_events(&filter, 10).await.expect("history");
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].routing_key.as_deref(),
        Some(key),
        "stored as routed"
    );
}

#[tokio::test]
async fn a_verified_ipn_with_white_space_around_its_txn_id_is_stored_and_found_by_the_id() {
    let rig = Rig::start(|_| {}).await;
    // 1 000 U+3000 on each side: 6 000 bytes that the id checks trim away, and that an indexed
    // column must not take (a btree row holds about 2 704 bytes).
    let pad = "%E3%80%80".repeat(1000);
    let body = String::from_utf8(sample("001_web_accept.txt"))
        .expect("ASCII sample")
        .replace("charset=windows-1252", "charset=UTF-8")
        .replace(
            "txn_id=8FX91612UX4519215",
            &format!("txn_id={pad}8FX91612UX4519215{pad}"),
        );
    assert!(body.contains(&pad) && body.contains("charset=UTF-8"));
    let outcome = rig.settle(body.as_bytes()).await;
    assert!(
        matches!(outcome, Outcome::Published { sequence: 1, .. }),
        "{outcome:?}"
    );
    let events = rig.events().await;
    assert_eq!(events.len(), 1);
    let published = events[0]["txn_id"].as_str().expect("txn_id");
    assert_eq!(
        published.len(),
        17 + 6000,
        "the event carries the field as sent"
    );
    let filter = EventFilter::Txn("8FX91612UX4519215".to_owned());
    let stored = rig.store.find_events(&filter, 10).await.expect("history");
    assert_eq!(stored.len(), 1, "found by the id itself");
    assert_eq!(stored[0].txn_id.as_deref(), Some("8FX91612UX4519215"));
}

#[tokio::test]
async fn a_routing_key_longer_than_amqp_allows_is_refused_unsent_and_the_publisher_goes_on() {
    let rig = Rig::start(|_| {}).await;
    let publisher = Publisher::start(&rig.config.amqp, rig.topology.clone(), "ipn-worker-test");
    assert!(
        publisher.wait_connected(PATIENCE).await,
        "publisher connected"
    );
    let exchange = rig.topology.events_exchange();
    let message = |routing_key| Outgoing {
        exchange: &exchange,
        routing_key,
        body: b"{}",
        properties: BasicProperties::default(),
    };
    let too_long = "k".repeat(256);
    let refused = publisher.publish(message(&too_long), PATIENCE).await;
    assert!(
        matches!(
            refused,
            Err(PublishError::NameTooLong {
                what: "routing key",
                bytes: 256
            })
        ),
        "{refused:?}"
    );
    assert!(refused.is_err_and(|error| error.is_permanent()));
    let longest = "k".repeat(255);
    for routing_key in [longest.as_str(), "paypal.payment.web_accept.completed"] {
        let sent = publisher.publish(message(routing_key), PATIENCE).await;
        assert!(sent.is_ok(), "{routing_key}: {sent:?}");
    }
    assert_eq!(rig.events().await.len(), 2, "only the two that fit");
    publisher.close().await;
}
