//! WeChat Pay's API v3 notifications end to end: a fake WeChat Pay that signs and encrypts as
//! WeChat Pay does (an RSA key and an APIv3 key made in the test; SHA256withRSA over
//! `timestamp\nnonce\nbody\n`; the resource AES-256-GCM), the real ingress, worker, RabbitMQ
//! and PostgreSQL.

use std::time::{Duration, SystemTime};

use ipn_bridge::fake_providers::{self, SigningKey, now, random_text};

use crate::pipeline_e2e::{RunningWorker, Stack, raw};
use crate::support::alerts::FakeWebhook;
use crate::support::{PATIENCE, ready_ingress};

const MCH_ID: &str = "1900000109";
const APP_ID: &str = "wxd678efh567hg6787";
const SERIAL: &str = "PUB_KEY_ID_0114232134912410000000000000";

/// WeChat Pay as the test plays it: its signing key (known to us by `SERIAL`) and the
/// merchant's APIv3 key it encrypts with ([`ipn_bridge::fake_providers`]).
struct FakeWechatPay {
    key: SigningKey,
    apiv3_key: String,
}

/// One notification as posted: its signature headers and body.
struct Posted {
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl FakeWechatPay {
    fn new() -> FakeWechatPay {
        FakeWechatPay {
            key: SigningKey::generate(),
            apiv3_key: random_text(32),
        }
    }

    /// The platform public key as the merchant platform offers it: PEM.
    fn public_key_pem(&self) -> String {
        self.key.public_pem()
    }

    /// The body of a notification: `resource` encrypted with `apiv3_key`.
    fn body(
        &self,
        apiv3_key: &str,
        id: &str,
        event_type: &str,
        original_type: &str,
        resource: &serde_json::Value,
    ) -> Vec<u8> {
        fake_providers::wechatpay_body(apiv3_key, id, event_type, original_type, resource)
            .expect("encrypted")
    }

    /// Signs `body` as sent at `timestamp`: the headers WeChat Pay sends.
    fn sign(&self, body: Vec<u8>, timestamp: u64) -> Posted {
        Posted {
            headers: fake_providers::wechatpay_headers(&self.key, SERIAL, &body, timestamp),
            body,
        }
    }

    /// A payment's `TRANSACTION.SUCCESS`, signed now.
    fn payment(&self, out_trade_no: &str, mch_id: &str) -> Posted {
        self.paid(&transaction(out_trade_no, mch_id))
    }

    /// A payment of `out_trade_no` with a transaction id of its own, signed now.
    fn payment_of(&self, out_trade_no: &str, transaction_id: &str) -> Posted {
        let resource =
            fake_providers::wechatpay_transaction(MCH_ID, APP_ID, out_trade_no, transaction_id);
        self.paid(&resource)
    }

    /// A `TRANSACTION.SUCCESS` of the transaction `resource`, signed now.
    fn paid(&self, resource: &serde_json::Value) -> Posted {
        let body = self.body(
            &self.apiv3_key,
            &uuid::Uuid::now_v7().to_string(),
            "TRANSACTION.SUCCESS",
            "transaction",
            resource,
        );
        self.sign(body, now())
    }

    /// A refund's `REFUND.SUCCESS` of the payment `out_trade_no`, signed now.
    fn refund(&self, out_trade_no: &str) -> Posted {
        self.refund_numbered(out_trade_no, "R-0001")
    }

    /// The refund `out_refund_no` of the payment `out_trade_no`, signed now.
    fn refund_numbered(&self, out_trade_no: &str, out_refund_no: &str) -> Posted {
        let resource = serde_json::json!({
            "mchid": MCH_ID,
            "out_trade_no": out_trade_no,
            "transaction_id": "4200000000202612010000000001",
            "out_refund_no": out_refund_no,
            "refund_id": "50000000382019052709732678859",
            "refund_status": "SUCCESS",
            "success_time": "2026-12-01T10:05:00+08:00",
            "user_received_account": "招商银行信用卡0403",
            "amount": { "total": 8800, "refund": 3000, "payer_total": 8800, "payer_refund": 3000 }
        });
        let body = self.body(
            &self.apiv3_key,
            &uuid::Uuid::now_v7().to_string(),
            "REFUND.SUCCESS",
            "refund",
            &resource,
        );
        self.sign(body, now())
    }
}

fn transaction(out_trade_no: &str, mch_id: &str) -> serde_json::Value {
    fake_providers::wechatpay_transaction(
        mch_id,
        APP_ID,
        out_trade_no,
        "4200000000202612010000000001",
    )
}

/// WeChat Pay on in `config`, for our merchant and app, with `fake`'s keys.
fn wechat_pay_on(config: &mut ipn_bridge::config::Config, fake: &FakeWechatPay) {
    let wechatpay = &mut config.wechatpay;
    wechatpay.enabled = true;
    wechatpay.mch_ids = vec![MCH_ID.to_owned()];
    wechatpay.app_ids = vec![APP_ID.to_owned()];
    wechatpay.apiv3_key = ipn_bridge::config::Secret::new(fake.apiv3_key.clone());
    wechatpay.platform_keys = [(SERIAL.to_owned(), fake.public_key_pem())].into();
}

/// A stack with WeChat Pay on at `/wechatpay/notify` with `fake`'s keys, alerts to `webhook`.
async fn stack(
    fake: &FakeWechatPay,
    webhook: Option<&FakeWebhook>,
) -> (
    Stack,
    crate::support::ingress::RunningIngress,
    RunningWorker,
) {
    let mut stack = Stack::new().await;
    wechat_pay_on(&mut stack.config, fake);
    if let Some(webhook) = webhook {
        stack.config.alert.webhook_url = Some(webhook.url.parse().expect("url"));
        stack.config.alert.min_interval = Duration::from_millis(1);
    }
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    (stack, ingress, worker)
}

/// POSTs a notification as WeChat Pay does; returns status, content type and body.
async fn post(
    ingress: &crate::support::ingress::RunningIngress,
    posted: &Posted,
) -> (u16, String, String) {
    let mut request = crate::support::http()
        .post(ingress.path("/wechatpay/notify"))
        .header("content-type", "application/json")
        .body(posted.body.clone());
    for (name, value) in &posted.headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("ingress answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

fn with_header(posted: &Posted, name: &str, value: &str) -> Posted {
    let headers = posted
        .headers
        .iter()
        .map(|(n, v)| {
            (
                *n,
                if *n == name {
                    value.to_owned()
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    Posted {
        headers,
        body: posted.body.clone(),
    }
}

fn failed(answer: &(u16, String, String)) -> bool {
    let json: serde_json::Value = serde_json::from_str(&answer.2).unwrap_or_default();
    (400..600).contains(&answer.0) && answer.1 == "application/json" && json["code"] == "FAIL"
}

#[tokio::test]
async fn a_signed_payment_becomes_one_event_under_its_own_key_and_the_resend_is_a_duplicate() {
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, None).await;
    let first = fake.payment("ORDER-20261201-0001", MCH_ID);
    assert_eq!(
        post(&ingress, &first).await,
        (200, String::new(), String::new()),
        "an empty 200 once the broker confirmed"
    );
    let events = stack.events(1).await;
    let event = &events[0];
    assert_eq!(event["provider"], "wechatpay");
    assert_eq!(event["order_key"], "wechatpay:ORDER-20261201-0001");
    assert_eq!(event["sequence"], 1);
    assert_eq!(event["txn_type"], "TRANSACTION.SUCCESS");
    assert_eq!(event["payment_status"], "SUCCESS");
    assert_eq!(event["txn_id"], "4200000000202612010000000001");
    assert_eq!(event["fields"]["amount.total"], "8800");
    assert_eq!(event["fields"]["amount.currency"], "CNY");
    assert_eq!(event["fields"]["trade_state_desc"], "支付成功");
    assert_eq!(
        event["fields"]["notification.event_type"],
        "TRANSACTION.SUCCESS"
    );
    assert_eq!(raw(event), first.body, "byte for byte, still encrypted");
    assert_eq!(
        worker.metric("ipn_worker_rerouted_total").await,
        Some(1.0),
        "from the intake key to its own"
    );

    // WeChat Pay's resend: the same body, signed again later (new timestamp, nonce, signature).
    let resend = fake.sign(first.body.clone(), now() + 1);
    assert_ne!(resend.headers[1], first.headers[1]);
    assert_eq!(post(&ingress, &resend).await.0, 200);
    // The resend is dropped as a duplicate.
    worker.wait_metric("ipn_worker_duplicates_total", 1.0).await;
    assert_eq!(stack.events(0).await.len(), 0, "no second event");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_probe_is_failed_without_an_alert_and_its_genuine_resend_becomes_the_one_event() {
    let webhook = FakeWebhook::start(0).await;
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, Some(&webhook)).await;
    let genuine = fake.payment("ORDER-20261201-0002", MCH_ID);
    let signature = &genuine.headers[2].1;
    let probe = with_header(
        &genuine,
        "Wechatpay-Signature",
        &format!("WECHATPAY/SIGNTEST/{signature}"),
    );
    let answer = post(&ingress, &probe).await;
    assert!(failed(&answer), "{answer:?}");
    let probes = ingress
        .metric("ipn_ingress_refused_total{provider=\"wechatpay\",reason=\"probe\"}")
        .await;
    assert_eq!(probes, Some(1.0));
    // The genuine copy, with the same body.
    assert_eq!(post(&ingress, &genuine).await.0, 200);
    let events = stack.events(1).await;
    assert_eq!(events[0]["order_key"], "wechatpay:ORDER-20261201-0002");
    assert_eq!(raw(&events[0]), genuine.body);
    // A refusal that does alert goes out after it: the probe raised none before it.
    let unknown = with_header(
        &genuine,
        "Wechatpay-Serial",
        "PUB_KEY_ID_0000000000000000000000000099",
    );
    assert!(failed(&post(&ingress, &unknown).await));
    let alerts = webhook.wait_for(1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["kind"], "refused");
    assert_eq!(alerts[0]["reason"], "unknown-serial");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_unknown_serials_are_failed_and_nothing_is_queued() {
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, None).await;
    let genuine = fake.payment("ORDER-20261201-0003", MCH_ID);
    // Signed by someone else's key under our serial.
    let forger = FakeWechatPay::new();
    let forged = forger.sign(genuine.body.clone(), now());
    // The body changed after signing.
    let mut altered = fake.sign(genuine.body.clone(), now());
    altered.body = String::from_utf8(altered.body)
        .expect("json")
        .replace("支付成功", "支付失败")
        .into_bytes();
    let stale = fake.sign(genuine.body.clone(), now() - 6 * 60);
    let unknown = with_header(
        &genuine,
        "Wechatpay-Serial",
        "PUB_KEY_ID_0000000000000000000000000099",
    );
    let mut unsigned = with_header(&genuine, "Wechatpay-Timestamp", "soon");
    unsigned
        .headers
        .retain(|(name, _)| *name != "Wechatpay-Nonce");
    for (posted, reason) in [
        (&forged, "bad-signature"),
        (&altered, "bad-signature"),
        (&stale, "stale"),
        (&unknown, "unknown-serial"),
        (&unsigned, "unsigned"),
    ] {
        let answer = post(&ingress, posted).await;
        assert!(failed(&answer), "{reason}: {answer:?}");
        assert!(answer.2.contains(reason), "{reason}: {answer:?}");
    }
    let refused = |reason: &'static str| {
        let ingress = &ingress;
        async move {
            let name =
                format!("ipn_ingress_refused_total{{provider=\"wechatpay\",reason=\"{reason}\"}}");
            ingress.metric(&name).await
        }
    };
    assert_eq!(refused("bad-signature").await, Some(2.0));
    assert_eq!(refused("stale").await, Some(1.0));
    assert_eq!(refused("unknown-serial").await, Some(1.0));
    assert_eq!(refused("unsigned").await, Some(1.0));
    // Only the genuine one is queued: it is the first and only event, nothing is quarantined.
    assert_eq!(post(&ingress, &genuine).await.0, 200);
    let events = stack.events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(raw(&events[0]), genuine.body);
    let channel = stack.broker.channel().await;
    let quarantine = stack.topology().quarantine_queue();
    assert_eq!(stack.broker.count(&channel, &quarantine).await, 0);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn another_merchant_and_a_wrong_apiv3_key_are_quarantined_with_their_reason() {
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, None).await;
    // Genuinely signed, for another merchant.
    let foreign = fake.payment("ORDER-20261201-0004", "1230000109");
    assert_eq!(post(&ingress, &foreign).await.0, 200);
    // Genuinely signed, encrypted with a key that is not our APIv3 key.
    let body = fake.body(
        &random_text(32),
        "EV-wrong-key",
        "TRANSACTION.SUCCESS",
        "transaction",
        &transaction("ORDER-20261201-0005", MCH_ID),
    );
    assert_eq!(post(&ingress, &fake.sign(body, now())).await.0, 200);
    let quarantine = stack.topology().quarantine_queue();
    stack.wait_for(&quarantine, 2).await;
    let channel = stack.broker.channel().await;
    let quarantined = stack.broker.drain(&channel, &quarantine).await;
    let mut reasons: Vec<String> = quarantined
        .iter()
        .filter_map(|d| ipn_bridge::contract::header_text(&d.properties, "x-ipn-reason"))
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["foreign-receiver", "undecryptable"]);
    let undecryptable = quarantined
        .iter()
        .find(|d| {
            ipn_bridge::contract::header_text(&d.properties, "x-ipn-reason").as_deref()
                == Some("undecryptable")
        })
        .expect("undecryptable");
    let cause = ipn_bridge::contract::header_text(&undecryptable.properties, "x-ipn-cause")
        .expect("a cause");
    assert!(cause.contains("apiv3_key"), "{cause}");
    // The signature headers travelled with it, so a replay once the key is fixed can verify.
    assert!(
        ipn_bridge::contract::request_header(&undecryptable.properties, "wechatpay-signature")
            .is_some()
    );
    assert_eq!(stack.broker.count(&channel, "downstream").await, 0);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_refund_posted_right_after_its_payment_follows_it_with_the_next_sequence_number() {
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, None).await;
    let payment = fake.payment("ORDER-20261201-0006", MCH_ID);
    let refund = fake.refund("ORDER-20261201-0006");
    assert_eq!(post(&ingress, &payment).await.0, 200);
    assert_eq!(post(&ingress, &refund).await.0, 200);
    let events = stack.events(2).await;
    assert_eq!(events[0]["txn_type"], "TRANSACTION.SUCCESS");
    assert_eq!(events[0]["sequence"], 1);
    assert_eq!(events[1]["txn_type"], "REFUND.SUCCESS");
    assert_eq!(events[1]["sequence"], 2);
    assert_eq!(events[1]["order_key"], "wechatpay:ORDER-20261201-0006");
    assert_eq!(events[1]["payment_status"], "SUCCESS");
    assert_eq!(events[1]["fields"]["amount.refund"], "3000");
    worker.stop().await;
    ingress.stop().await;
}

/// A notification as the ingress queues it: under the intake key, with the provider, the
/// receive time and the signature headers.
fn queued(posted: &Posted) -> ipn_bridge::worker::Inbound {
    use ipn_bridge::contract;
    let key = ipn_bridge::provider::wechatpay::intake_key();
    let mut headers = contract::ingress_headers("wechatpay", key.as_str(), SystemTime::now());
    let value = |name: &str| {
        posted
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
    };
    contract::carry_request_headers(
        &mut headers,
        &ipn_bridge::provider::wechatpay::HEADERS,
        value,
    );
    let properties = lapin::BasicProperties::default()
        .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    ipn_bridge::worker::Inbound::new(posted.body.clone(), properties)
}

/// `reroute_intake` with an ack that records the deliveries it is called for, in call order;
/// checks it was called exactly for the ones said to be confirmed.
async fn reroute_recording(
    pipeline: &ipn_bridge::worker::Pipeline,
    batch: &[ipn_bridge::worker::Inbound],
) -> (Vec<bool>, Vec<usize>) {
    let acked = std::sync::Mutex::new(Vec::new());
    let record = |i: usize| {
        acked.lock().expect("not poisoned").push(i);
        std::future::ready(())
    };
    let done = pipeline.reroute_intake(batch, record).await;
    let acked = acked.into_inner().expect("not poisoned");
    let mut each = acked.clone();
    each.sort_unstable();
    let confirmed: Vec<usize> = (0..done.len()).filter(|&i| done[i]).collect();
    assert_eq!(
        each, confirmed,
        "acked exactly the confirmed ones, once each"
    );
    (done, acked)
}

/// A worker's pipeline with WeChat Pay on, with `fake`'s keys, on a broker and database of its own.
async fn rig(fake: &FakeWechatPay) -> crate::worker::Rig {
    crate::worker::Rig::start(|config| wechat_pay_on(config, fake)).await
}

/// Takes every message in the shard queues, waiting until there are `n`.
async fn shard_copies(rig: &crate::worker::Rig, n: usize) -> Vec<ipn_bridge::worker::Inbound> {
    let mut copies = Vec::new();
    let collect = async {
        while copies.len() < n {
            for (_, delivery) in rig.broker.drain_shards(&rig.topology).await {
                copies.push(ipn_bridge::worker::Inbound::new(
                    delivery.data,
                    delivery.properties,
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, collect)
        .await
        .expect("copies in the shards in time");
    copies
}

#[tokio::test]
async fn a_notification_held_behind_a_stuck_one_on_the_intake_key_keeps_its_provider_and_signature()
{
    use ipn_bridge::worker::pipeline::{Error, Step};
    use ipn_bridge::worker::{Outcome, Settled};
    let fake = FakeWechatPay::new();
    let rig = rig(&fake).await;
    let payment = queued(&fake.payment("ORDER-20261201-0007", MCH_ID));
    let refund = queued(&fake.refund("ORDER-20261201-0007"));
    // The payment's re-route kept failing (as when the broker is unwell): sent to a tier, the
    // intake key blocked behind it; the refund arriving next is held in PostgreSQL.
    let stuck = rig
        .pipeline
        .defer_stuck(&payment, &Error::Injected(Step::Claimed))
        .await
        .expect("deferred");
    assert!(matches!(stuck, Some(Settled::Deferred { .. })), "{stuck:?}");
    let held = rig.pipeline.settle(&refund).await.expect("settled");
    assert_eq!(held, Settled::Held);
    // The payment back from its tier: re-routed, and the held refund after it.
    let back = shard_copies(&rig, 1).await;
    assert_eq!(back.len(), 1);
    let settled = rig.pipeline.settle(&back[0]).await.expect("settled");
    assert_eq!(
        settled,
        Settled::Rerouted {
            to: "wechatpay:ORDER-20261201-0007".to_owned()
        }
    );
    let copies = shard_copies(&rig, 2).await;
    let mut sequences = Vec::new();
    for copy in &copies {
        assert_eq!(copy.key().as_str(), "wechatpay:ORDER-20261201-0007");
        assert_eq!(copy.provider, "wechatpay", "the held one kept its provider");
        match rig.pipeline.settle(copy).await.expect("settled") {
            Settled::Finished {
                outcome: Outcome::Published { sequence, .. },
                ..
            } => sequences.push(sequence),
            other => panic!("not published (signature headers lost?): {other:?}"),
        }
    }
    assert_eq!(sequences, [1, 2]);
    let events = rig.events().await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["txn_type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["TRANSACTION.SUCCESS", "REFUND.SUCCESS"]);
}

#[tokio::test]
async fn with_the_broker_down_wechat_pay_gets_its_failure_answer_and_so_resends() {
    let fake = FakeWechatPay::new();
    let broker = crate::support::TestBroker::new().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let mut config = broker.config_via(&closed);
    wechat_pay_on(&mut config, &fake);
    let ingress = crate::support::ingress::spawn_ingress(config).await;
    let answer = post(&ingress, &fake.payment("ORDER-20261201-0009", MCH_ID)).await;
    assert!(failed(&answer), "{answer:?}");
    assert_eq!(answer.0, 503);
    assert!(answer.2.contains("broker unavailable"), "{answer:?}");
    ingress.stop().await;
}

#[tokio::test]
async fn a_notification_undecryptable_under_a_wrong_apiv3_key_is_delivered_by_a_replay_once_fixed()
{
    use ipn_bridge::ctl::review::{self, Queue, Selection};
    let fake = FakeWechatPay::new();
    let (stack, ingress, worker) = stack(&fake, None).await;
    worker.stop().await;
    // The operator configured the wrong APIv3 key: the notification is quarantined.
    let mut misconfigured = stack.config.clone();
    misconfigured.wechatpay.apiv3_key = ipn_bridge::config::Secret::new(random_text(32));
    let worker = RunningWorker::spawn(misconfigured).await;
    let payment = fake.payment("ORDER-20261201-0007", MCH_ID);
    assert_eq!(post(&ingress, &payment).await.0, 200);
    let quarantine = stack.topology().quarantine_queue();
    stack.wait_for(&quarantine, 1).await;
    worker.stop().await;
    // The key fixed and the worker restarted, the operator replays the quarantine: the carried
    // signature headers and the original receive time let it verify again.
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let pass = review::replay(&stack.config, &Queue::Quarantine, &Selection::All)
        .await
        .expect("replay");
    assert_eq!((pass.taken, pass.kept), (1, 0));
    let events = stack.events(1).await;
    assert_eq!(raw(&events[0]), payment.body);
    assert_eq!(events[0]["order_key"], "wechatpay:ORDER-20261201-0007");
    assert_eq!(events[0]["sequence"], 1);
    let channel = stack.broker.channel().await;
    assert_eq!(stack.broker.count(&channel, &quarantine).await, 0);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn the_intake_re_routes_a_backlog_together_and_every_order_keeps_its_posting_order() {
    const ORDERS: usize = 12;
    const REFUNDS: usize = 3;
    let fake = FakeWechatPay::new();
    let mut stack = Stack::new().await;
    wechat_pay_on(&mut stack.config, &fake);
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    // A backlog, as after an outage: each order's payment, then its refunds, the orders
    // interleaved, posted while no worker runs.
    let order = |o: usize| format!("ORDER-20261206-{o:04}");
    let mut posted = Vec::new();
    for o in 0..ORDERS {
        let transaction_id = format!("42000000002026120600000{o:05}");
        posted.push((order(o), fake.payment_of(&order(o), &transaction_id)));
    }
    for r in 0..REFUNDS {
        for o in 0..ORDERS {
            let refund = fake.refund_numbered(&order(o), &format!("R-{o:04}-{r}"));
            posted.push((order(o), refund));
        }
    }
    for (_, notification) in &posted {
        assert_eq!(post(&ingress, notification).await.0, 200);
    }
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let total = posted.len();
    let events = stack.events(u32::try_from(total).expect("small")).await;
    assert_eq!(events.len(), total);
    for o in 0..ORDERS {
        let key = format!("wechatpay:{}", order(o));
        let arrived: Vec<(i64, Vec<u8>)> = events
            .iter()
            .filter(|event| event["order_key"] == key.as_str())
            .map(|event| (event["sequence"].as_i64().expect("sequence"), raw(event)))
            .collect();
        let sent: Vec<&Vec<u8>> = posted
            .iter()
            .filter(|(o2, _)| *o2 == order(o))
            .map(|(_, n)| &n.body)
            .collect();
        let bodies: Vec<&Vec<u8>> = arrived.iter().map(|(_, body)| body).collect();
        assert_eq!(bodies, sent, "{key}: posting order");
        let numbers: Vec<i64> = arrived.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [1, 2, 3, 4], "{key}");
    }
    let rerouted = worker.metric("ipn_worker_rerouted_total").await;
    assert_eq!(
        rerouted,
        Some(total as f64),
        "every one from the intake key"
    );
    // The first delivery goes alone (nothing waits yet); the backlog behind it together.
    let batches = worker.metric("ipn_worker_intake_batch_size_count").await;
    let together = worker.metric("ipn_worker_intake_batch_size_sum").await;
    let (batches, together) = (batches.expect("batches"), together.expect("sum"));
    assert!(batches >= 1.0, "taken together at least once");
    assert!(
        together > batches,
        "a batch carried more than one: {together} in {batches}"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn when_one_copy_of_a_batch_fails_the_later_ones_of_its_key_are_not_sent() {
    use ipn_bridge::worker::pipeline::Step;
    use ipn_bridge::worker::{Outcome, Settled};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fake = FakeWechatPay::new();
    let rig = rig(&fake).await;
    // The first copy confirmed fails as if the worker crashed right after its confirm (before
    // the ack); the batch's two keys run concurrently, so either key's first copy may be it.
    let failed = Arc::new(AtomicBool::new(false));
    let once = Arc::clone(&failed);
    let crashing = rig
        .another_pipeline()
        .await
        .with_fault_injection(Box::new(move |at| {
            at == Step::Rerouted && !once.swap(true, Ordering::SeqCst)
        }));
    let a = "ORDER-20261206-A";
    let b = "ORDER-20261206-B";
    let batch = [
        queued(&fake.payment_of(a, "4200000000202612060000000101")),
        queued(&fake.payment_of(b, "4200000000202612060000000102")),
        queued(&fake.refund_numbered(a, "R-A-1")),
    ];
    let (done, acked) = reroute_recording(&crashing, &batch).await;
    assert!(failed.load(Ordering::SeqCst), "the fault was injected");
    // A's payment failed: A's refund must not overtake it. B's failed: A's chain went on, each
    // of its copies acked as it was confirmed, the payment's before the refund's.
    let copies = match done.as_slice() {
        [false, true, false] => 2,
        [true, false, true] => {
            let at = |i: usize| acked.iter().position(|&a| a == i).expect("acked");
            assert!(
                at(0) < at(2),
                "A's payment acked before its refund: {acked:?}"
            );
            3
        }
        other => panic!("a key's later copy went without its earlier one: {other:?}"),
    };
    // reroute_intake waited for every confirm: the copies sent are all in the shards now.
    let sent = shard_copies(&rig, copies).await;
    assert_eq!(
        sent.len(),
        copies,
        "only the confirmed ones and the failed one"
    );
    // The ones left unconfirmed, settled one at a time in order as the lane does.
    let mut rerouted = Vec::new();
    for (inbound, confirmed) in batch.iter().zip(&done) {
        if !confirmed {
            rerouted.push(rig.pipeline.settle(inbound).await.expect("settled"));
        }
    }
    assert!(
        rerouted
            .iter()
            .all(|settled| matches!(settled, Settled::Rerouted { .. })),
        "{rerouted:?}"
    );
    // Every copy through its own key's lane, in the shards' order: each key's events in the
    // order posted; the failed one's second copy is a duplicate.
    let mut all = sent;
    all.extend(shard_copies(&rig, rerouted.len()).await);
    let mut duplicates = 0;
    for copy in &all {
        match rig.pipeline.settle(copy).await.expect("settled") {
            Settled::Finished {
                outcome: Outcome::Published { .. },
                ..
            } => {}
            Settled::Finished {
                outcome: Outcome::Duplicate,
                ..
            } => duplicates += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(duplicates, 1, "the copy confirmed before the crash");
    let events = rig.events().await;
    let of = |out_trade_no: &str| -> Vec<(String, i64)> {
        events
            .iter()
            .filter(|e| e["order_key"] == format!("wechatpay:{out_trade_no}").as_str())
            .map(|e| {
                (
                    e["txn_type"].as_str().expect("type").to_owned(),
                    e["sequence"].as_i64().expect("sequence"),
                )
            })
            .collect()
    };
    assert_eq!(
        of(a),
        [
            ("TRANSACTION.SUCCESS".to_owned(), 1),
            ("REFUND.SUCCESS".to_owned(), 2)
        ]
    );
    assert_eq!(of(b), [("TRANSACTION.SUCCESS".to_owned(), 1)]);
}

#[tokio::test]
async fn a_batch_on_a_blocked_intake_key_or_led_by_one_that_does_not_open_is_left_to_go_one_at_a_time()
 {
    use ipn_bridge::policy::Reason;
    use ipn_bridge::worker::pipeline::{Error, Step};
    use ipn_bridge::worker::{Outcome, Settled};
    let fake = FakeWechatPay::new();
    let rig = rig(&fake).await;
    // Led by one encrypted under another APIv3 key: nothing of the batch is sent, not even the
    // good one behind it. One at a time, the first is quarantined; then the good one goes.
    let foreign = fake.body(
        &random_text(32),
        &uuid::Uuid::now_v7().to_string(),
        "TRANSACTION.SUCCESS",
        "transaction",
        &transaction("ORDER-20261206-C", MCH_ID),
    );
    let good = queued(&fake.payment_of("ORDER-20261206-D", "4200000000202612060000000104"));
    let led = [queued(&fake.sign(foreign, now())), good];
    let (done, _) = reroute_recording(&rig.pipeline, &led).await;
    assert_eq!(done, [false, false]);
    assert_eq!(
        rig.pipeline.settle(&led[0]).await.expect("settled"),
        Settled::Finished {
            outcome: Outcome::Quarantined(Reason::Undecryptable),
            released: 0
        }
    );
    let (done, acked) = reroute_recording(&rig.pipeline, &led[1..]).await;
    assert_eq!((done, acked), (vec![true], vec![0]));
    // The intake key blocked behind a stuck one: nothing is taken together; one at a time, each
    // is held behind it.
    let stuck = queued(&fake.payment_of("ORDER-20261206-E", "4200000000202612060000000105"));
    let deferred = rig
        .pipeline
        .defer_stuck(&stuck, &Error::Injected(Step::Rerouted))
        .await
        .expect("deferred");
    assert!(
        matches!(deferred, Some(Settled::Deferred { .. })),
        "{deferred:?}"
    );
    let behind = [
        queued(&fake.payment_of("ORDER-20261206-F", "4200000000202612060000000106")),
        queued(&fake.refund_numbered("ORDER-20261206-E", "R-E-1")),
    ];
    let (done, _) = reroute_recording(&rig.pipeline, &behind).await;
    assert_eq!(done, [false, false]);
    assert_eq!(
        rig.pipeline.settle(&behind[0]).await.expect("settled"),
        Settled::Held
    );
    // In the shards: the good one's copy and the stuck one back from its tier, nothing else.
    let copies = shard_copies(&rig, 2).await;
    let mut ids: Vec<&str> = copies.iter().map(|c| c.message_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = [led[1].message_id.as_str(), stuck.message_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
}
