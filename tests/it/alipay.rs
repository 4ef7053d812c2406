//! Alipay's asynchronous notifications end to end: a fake Alipay that signs as Alipay does (an
//! RSA key made in the test, SHA256withRSA over the sorted fields in the message's charset;
//! checked against Alipay's own published notification in src/provider/alipay.rs),
//! the real ingress, worker, RabbitMQ and PostgreSQL.

use encoding_rs::{Encoding, GBK, UTF_8};
use ipn_bridge::fake_providers::{self, SigningKey};

use crate::pipeline_e2e::{RunningWorker, Stack, raw};
use crate::support::ready_ingress;

const APP_ID: &str = "2021004100000001";

/// Alipay as the test plays it: its key pair (made here), signing and encoding as Alipay does
/// ([`ipn_bridge::fake_providers`]).
struct FakeAlipay {
    key: SigningKey,
}

impl FakeAlipay {
    fn new() -> FakeAlipay {
        FakeAlipay {
            key: SigningKey::generate(),
        }
    }

    /// The public key as Alipay's console shows it: bare base64 of the SubjectPublicKeyInfo.
    fn public_key(&self) -> String {
        self.key.public_base64()
    }

    /// A signed notification body: the fields (sign and sign_type added), each value's bytes
    /// in `charset` percent-encoded, as Alipay posts them.
    fn notification(&self, fields: &[(&str, &str)], charset: &'static Encoding) -> Vec<u8> {
        fake_providers::alipay_notification(&self.key, fields, charset)
    }
}

/// A payment's `trade_status_sync` notification, as Alipay sends it.
fn payment<'a>(
    notify_id: &'a str,
    notify_time: &'a str,
    charset: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("notify_time", notify_time),
        ("notify_type", "trade_status_sync"),
        ("notify_id", notify_id),
        ("app_id", APP_ID),
        ("charset", charset),
        ("version", "1.0"),
        ("trade_no", "2026120122001468450512505578"),
        ("out_trade_no", "ORDER-20261201-0001"),
        ("buyer_logon_id", "xud***@126.com"),
        ("seller_id", "2088531891668739"),
        ("trade_status", "TRADE_SUCCESS"),
        ("total_amount", "88.00"),
        ("subject", "语雀空间 500人规模"),
        ("passback_params", "id%3D7"),
        ("gmt_payment", "2026-12-01 10:00:01"),
    ]
}

/// A stack with Alipay on at `/alipay/notify` with `fake`'s key, its ingress and worker.
async fn stack(
    fake: &FakeAlipay,
) -> (
    Stack,
    crate::support::ingress::RunningIngress,
    RunningWorker,
) {
    let mut stack = Stack::new().await;
    stack.config.alipay.enabled = true;
    stack.config.alipay.app_id = APP_ID.to_owned();
    stack.config.alipay.public_keys = vec![fake.public_key()];
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    (stack, ingress, worker)
}

async fn post(ingress: &crate::support::ingress::RunningIngress, body: Vec<u8>) -> (u16, String) {
    crate::support::post_form(&ingress.path("/alipay/notify"), body).await
}

#[tokio::test]
async fn a_signed_notification_becomes_one_event_and_alipays_resend_is_a_duplicate() {
    let fake = FakeAlipay::new();
    let (stack, ingress, worker) = stack(&fake).await;
    let first = fake.notification(
        &payment(
            "2026120100222155624068450559358070",
            "2026-12-01 10:00:02",
            "utf-8",
        ),
        UTF_8,
    );
    assert_eq!(
        post(&ingress, first.clone()).await,
        (200, "success".to_owned())
    );
    let events = stack.events(1).await;
    let event = &events[0];
    assert_eq!(event["provider"], "alipay");
    assert_eq!(event["order_key"], "alipay:ORDER-20261201-0001");
    assert_eq!(event["sequence"], 1);
    assert_eq!(event["txn_type"], "trade_status_sync");
    assert_eq!(event["payment_status"], "TRADE_SUCCESS");
    assert_eq!(event["txn_id"], "2026120122001468450512505578");
    assert_eq!(event["fields"]["subject"], "语雀空间 500人规模");
    assert_eq!(
        event["fields"]["passback_params"], "id%3D7",
        "decoded once, never twice"
    );
    assert_eq!(event["charset"], "UTF-8");
    assert_eq!(raw(event), first, "byte for byte");

    // Alipay's resend: new notify_time and sign, same notify_id. Acknowledged, not published.
    let resend = fake.notification(
        &payment(
            "2026120100222155624068450559358070",
            "2026-12-01 10:04:02",
            "utf-8",
        ),
        UTF_8,
    );
    assert_ne!(resend, first);
    assert_eq!(post(&ingress, resend).await, (200, "success".to_owned()));
    // The resend is dropped as a duplicate.
    worker.wait_metric("ipn_worker_duplicates_total", 1.0).await;
    assert_eq!(stack.events(0).await.len(), 0, "no second event");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_gbk_notification_is_verified_in_gbk_and_its_fields_decoded() {
    let fake = FakeAlipay::new();
    let (stack, ingress, worker) = stack(&fake).await;
    let body = fake.notification(
        &payment(
            "2026120100222155624068450559358071",
            "2026-12-01 10:00:02",
            "gbk",
        ),
        GBK,
    );
    assert!(
        body.windows(6).any(|w| w == b"%D3%EF"),
        "语 in GBK on the wire"
    );
    assert_eq!(post(&ingress, body).await, (200, "success".to_owned()));
    let events = stack.events(1).await;
    assert_eq!(events[0]["fields"]["subject"], "语雀空间 500人规模");
    assert_eq!(events[0]["charset"], "GBK");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_bad_signature_is_answered_fail_and_nothing_is_queued_and_a_foreign_app_is_quarantined() {
    let fake = FakeAlipay::new();
    let (stack, ingress, worker) = stack(&fake).await;
    // Signed by someone else's key.
    let forger = FakeAlipay::new();
    let forged = forger.notification(&payment("1", "2026-12-01 10:00:02", "utf-8"), UTF_8);
    assert_eq!(post(&ingress, forged).await, (400, "fail".to_owned()));
    // Signed by Alipay, then changed on the way.
    let genuine = fake.notification(&payment("2", "2026-12-01 10:00:02", "utf-8"), UTF_8);
    let altered = String::from_utf8(genuine)
        .expect("ascii")
        .replace("total_amount=88%2E00", "total_amount=99%2E00");
    assert!(altered.contains("total_amount=99%2E00"));
    assert_eq!(
        post(&ingress, altered.into_bytes()).await,
        (400, "fail".to_owned())
    );
    let refused = ingress
        .metric("ipn_ingress_refused_total{provider=\"alipay\",reason=\"bad-signature\"}")
        .await;
    assert_eq!(refused, Some(2.0));

    // Genuinely signed, but for another app: quarantined with the reason, no event.
    let mut other = payment("3", "2026-12-01 10:00:02", "utf-8");
    other[3] = ("app_id", "2021009999999999");
    assert_eq!(
        post(&ingress, fake.notification(&other, UTF_8)).await.0,
        200
    );
    stack
        .wait_for(&stack.topology().quarantine_queue(), 1)
        .await;
    let channel = stack.broker.channel().await;
    let quarantined = stack
        .broker
        .drain(&channel, &stack.topology().quarantine_queue())
        .await;
    // Only this one: the two refused at the door were never queued (the worker would have
    // quarantined them as invalid).
    assert_eq!(quarantined.len(), 1);
    let reason = ipn_bridge::contract::header_text(&quarantined[0].properties, "x-ipn-reason");
    assert_eq!(reason.as_deref(), Some("foreign-receiver"));
    assert_eq!(stack.broker.count(&channel, "downstream").await, 0);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_refund_posted_right_after_its_payment_follows_it_with_the_next_sequence_number() {
    let fake = FakeAlipay::new();
    let (stack, ingress, worker) = stack(&fake).await;
    let paid = payment(
        "2026120100222155624068450559358080",
        "2026-12-01 10:00:02",
        "utf-8",
    );
    let mut refunded = payment(
        "2026120200222155624068450559358081",
        "2026-12-02 09:00:02",
        "utf-8",
    );
    refunded.push(("refund_fee", "30.00"));
    refunded.push(("out_biz_no", "R-0001"));
    refunded.push(("gmt_refund", "2026-12-02 09:00:01.123"));
    assert_eq!(post(&ingress, fake.notification(&paid, UTF_8)).await.0, 200);
    assert_eq!(
        post(&ingress, fake.notification(&refunded, UTF_8)).await.0,
        200
    );
    let events = stack.events(2).await;
    let seen: Vec<(i64, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["sequence"].as_i64().expect("sequence"),
                e["kind"].as_str().expect("kind"),
                e["amount"].as_str().expect("amount"),
            )
        })
        .collect();
    assert_eq!(seen, [(1, "payment", "88.00"), (2, "refund", "30.00")]);
    assert_eq!(events[1]["order_key"], "alipay:ORDER-20261201-0001");
    assert_eq!(events[1]["currency"], "CNY");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn with_the_broker_down_alipay_gets_fail_and_so_resends() {
    let fake = FakeAlipay::new();
    let broker = crate::support::TestBroker::new().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let mut config = broker.config_via(&closed);
    config.alipay.enabled = true;
    config.alipay.app_id = APP_ID.to_owned();
    config.alipay.public_keys = vec![fake.public_key()];
    let ingress = crate::support::ingress::spawn_ingress(config).await;
    let body = fake.notification(&payment("9", "2026-12-01 10:00:02", "utf-8"), UTF_8);
    assert_eq!(post(&ingress, body).await, (503, "fail".to_owned()));
    ingress.stop().await;
}
