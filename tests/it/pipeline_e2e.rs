//! End to end: PayPal-shaped POSTs → ingress → shard queues → worker → a downstream queue, with
//! the real broker, real PostgreSQL and the fake PayPal.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use ipn_bridge::config::{Config, Downstream};
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::form::Form;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{
    PATIENCE, Services, TestBroker, TestDb, post_form, ready_ingress, sample, samples,
};

/// What the fault tests' worker logs keep: info and up, with each delivery admitted and each
/// shard subscribed.
pub(crate) const LOGGED: &str =
    "ipn_bridge=info,ipn_bridge::worker::lanes=debug,ipn_bridge::worker::session=debug";

/// A worker running in-process exactly as the binary runs it.
pub(crate) struct RunningWorker {
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub(crate) address: std::net::SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ipn_bridge::worker::Error>>,
}

impl RunningWorker {
    pub(crate) async fn spawn(config: Config) -> RunningWorker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(ipn_bridge::worker::run(config, listener, async {
            let _ = signal.await;
        }));
        RunningWorker {
            address,
            shutdown,
            task,
        }
    }

    /// The status `/readyz` answers now (0 when it does not answer).
    pub(crate) async fn readiness(&self) -> u16 {
        let url = format!("http://{}/readyz", self.address);
        crate::support::http_get(url)
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// A worker on a thread and runtime of its own, its `ipn_bridge` lines at info and above
    /// (with each delivery admitted and each shard subscribed, at debug) written to `log` (a
    /// test with several in-process workers can then tell whose line is whose).
    /// [`RunningWorker::kill`] does not end it; `stop` does.
    pub(crate) async fn spawn_logged(config: Config, log: std::path::PathBuf) -> RunningWorker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("non-blocking");
        let (shutdown, signal) = oneshot::channel::<()>();
        let (ended, result) = oneshot::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::create(&log).expect("worker log");
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_env_filter(tracing_subscriber::EnvFilter::new(LOGGED))
                .with_writer(std::sync::Mutex::new(file))
                .finish();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let outcome = tracing::subscriber::with_default(subscriber, || {
                runtime.block_on(async {
                    let listener = TcpListener::from_std(listener).expect("listener");
                    ipn_bridge::worker::run(config, listener, async {
                        let _ = signal.await;
                    })
                    .await
                })
            });
            if let Err(error) = &outcome {
                eprintln!("worker ended: {}", ipn_bridge::bounded::error_chain(error));
            }
            let _ = ended.send(outcome);
        });
        let task = tokio::spawn(async move { result.await.expect("worker thread ended") });
        RunningWorker {
            address,
            shutdown,
            task,
        }
    }

    /// Waits until `/readyz` answers 200 (consuming its shards, its topology declared); panics
    /// after `limit`.
    pub(crate) async fn wait_ready(&self, limit: std::time::Duration) {
        let ready = async {
            while self.readiness().await != 200 {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(limit, ready)
            .await
            .expect("the worker became ready in time");
    }

    /// One metric's value from `/metrics` (the first line starting with `name`).
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        crate::support::metric(&format!("http://{}/metrics", self.address), name).await
    }

    /// Waits until the metric `name` reads `value`; panics after [`PATIENCE`].
    pub(crate) async fn wait_metric(&self, name: &str, value: f64) {
        let reached = async {
            while self.metric(name).await != Some(value) {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(PATIENCE, reached)
            .await
            .unwrap_or_else(|_| panic!("{name} reached {value} in time"));
    }

    /// Ends the worker abruptly, as a killed process: nothing drains, nothing is acked after
    /// this. (Its broker connections go when the test cuts the proxy they run through.)
    pub(crate) fn kill(self) {
        self.task.abort();
    }

    pub(crate) async fn stop(self) {
        let _ = self.shutdown.send(());
        let result = tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("worker stopped in time");
        result
            .expect("worker task did not panic")
            .expect("worker ended cleanly");
    }
}

pub(crate) struct Stack {
    pub(crate) broker: TestBroker,
    _db: TestDb,
    pub(crate) paypal: FakePaypal,
    pub(crate) config: Config,
}

impl Stack {
    pub(crate) async fn new() -> Stack {
        let Services {
            broker,
            db,
            paypal,
            mut config,
        } = Services::start().await;
        config.downstream = vec![Downstream::new("downstream", &["#"])];
        Stack {
            broker,
            _db: db,
            paypal,
            config,
        }
    }

    /// The `IPN_*` variables of a `ipn-worker` process on this stack (4 shards).
    pub(crate) fn worker_env(&self) -> Vec<(String, String)> {
        [
            (
                "IPN_AMQP__URL",
                self.broker.url_via(crate::support::broker::BROKER),
            ),
            ("IPN_DATABASE__URL", self.config.database.url.to_string()),
            ("IPN_TOPOLOGY__SHARDS", "4".to_owned()),
            ("IPN_PAYPAL__VERIFY_URL", self.paypal.url().to_string()),
        ]
        .map(|(name, value)| (name.to_owned(), value))
        .to_vec()
    }

    /// The topology this stack's config describes.
    pub(crate) fn topology(&self) -> ipn_bridge::topology::Topology {
        ipn_bridge::topology::Topology::of(&self.config)
    }

    /// Waits until `queue` holds at least `n` messages.
    pub(crate) async fn wait_for(&self, queue: &str, n: u32) {
        self.broker.wait_for(queue, n).await;
    }

    /// Waits until the downstream queue holds `n` events, then takes them in queue order.
    pub(crate) async fn events(&self, n: u32) -> Vec<serde_json::Value> {
        self.wait_for("downstream", n).await;
        let channel = self.broker.channel().await;
        let deliveries = self.broker.drain(&channel, "downstream").await;
        deliveries
            .iter()
            .map(|d| serde_json::from_slice(&d.data).expect("event JSON"))
            .collect()
    }
}

pub(crate) fn raw(event: &serde_json::Value) -> Vec<u8> {
    let text = event["raw_body_base64"].as_str().expect("raw body");
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

pub(crate) fn live_samples() -> Vec<Vec<u8>> {
    samples()
        .into_iter()
        .map(|(_, body)| body)
        .filter(|body| Form::parse(body).text("test_ipn").as_deref() != Some("1"))
        .collect()
}

#[tokio::test]
async fn every_live_sample_posted_to_the_ingress_reaches_the_downstream_queue_once_in_order() {
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let live = live_samples();
    for body in &live {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    // PayPal's identical resend of one of them changes nothing downstream.
    assert_eq!(post_form(&ingress.url, live[0].clone()).await.0, 200);

    let events = stack
        .events(u32::try_from(live.len()).expect("small"))
        .await;
    assert_eq!(events.len(), live.len());
    let mut by_key: HashMap<String, Vec<(i64, Vec<u8>)>> = HashMap::new();
    for event in &events {
        let key = event["order_key"].as_str().expect("key").to_owned();
        by_key
            .entry(key)
            .or_default()
            .push((event["sequence"].as_i64().expect("sequence"), raw(event)));
    }
    for (key, received) in by_key {
        let numbers: Vec<i64> = received.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            (1..=numbers.len() as i64).collect::<Vec<_>>(),
            "{key}"
        );
        let posted: Vec<&Vec<u8>> = live
            .iter()
            .filter(|b| received.iter().any(|(_, r)| r == *b))
            .collect();
        let arrived: Vec<&Vec<u8>> = received.iter().map(|(_, r)| r).collect();
        assert_eq!(arrived, posted, "{key}: posting order");
    }
    // The resend was verified too; once the worker has finished (stop drains it), it must have
    // been recognised as a duplicate: no further event.
    let resend_verified = async {
        while stack.paypal.postbacks().len() < live.len() + 1 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, resend_verified)
        .await
        .expect("resend verified");
    let duplicate_counted = async {
        while worker.metric("ipn_worker_duplicates_total").await != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, duplicate_counted)
        .await
        .expect("duplicate counted");
    let published = worker.metric("ipn_worker_events_published_total").await;
    assert_eq!(published, Some(live.len() as f64));
    let verified = worker
        .metric("ipn_worker_verifications_total{outcome=\"verified\"}")
        .await;
    // At least one postback per IPN and the resend; a transient failure would add retries.
    assert!(verified >= Some(live.len() as f64 + 1.0), "{verified:?}");
    let ready = crate::support::http_get(format!("http://{}/readyz", worker.address))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    worker.stop().await;
    ingress.stop().await;
    let channel = stack.broker.channel().await;
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "no event for the resend"
    );
}

#[tokio::test]
async fn a_slow_verification_holds_back_its_own_key_only() {
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let signup = sample("012_subscr_signup.txt");
    let first_payment = sample("013_subscr_payment.txt");
    let second_payment = sample("014_subscr_payment.txt");
    let other_key = sample("001_web_accept.txt");
    stack
        .paypal
        .script(&signup, [Answer::Slow(Duration::from_millis(1500))]);
    for body in [&signup, &first_payment, &second_payment, &other_key] {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let events = stack.events(4).await;
    let arrived: Vec<Vec<u8>> = events.iter().map(raw).collect();
    assert_eq!(
        arrived[0], other_key,
        "another key is not serialized behind the slow one"
    );
    assert_eq!(
        arrived[1..],
        [signup, first_payment, second_payment],
        "the key's own order holds"
    );
    let sequences: Vec<i64> = events[1..]
        .iter()
        .map(|e| e["sequence"].as_i64().expect("n"))
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_transient_paypal_failure_holds_the_key_and_is_retried_until_it_succeeds() {
    let mut stack = Stack::new().await;
    stack.config.worker.verify_attempts = std::num::NonZeroU32::new(1).expect("1");
    stack.config.paypal.verify_timeout = Duration::from_millis(300);
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let pending = sample("010_web_accept_echeck_pending.txt");
    let completed = sample("011_web_accept_echeck_completed.txt");
    stack.paypal.script(
        &pending,
        [Answer::ServerError, Answer::Silent, Answer::ServerError],
    );
    for body in [&pending, &completed] {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let events = stack.events(2).await;
    assert_eq!(raw(&events[0]), pending);
    assert_eq!(raw(&events[1]), completed);
    assert!(
        stack.paypal.postbacks().len() >= 5,
        "three failures, then two successes"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn stopping_the_worker_mid_stream_and_starting_it_again_loses_and_repeats_nothing() {
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    // Unique IPNs over a few keys; PayPal is slow enough that the stop lands mid-stream.
    stack
        .paypal
        .set_default(Answer::Slow(Duration::from_millis(30)));
    let mut bodies = Vec::new();
    for i in 0..40 {
        let body = format!(
            "txn_type=web_accept&payment_status=Completed&txn_id=T{}&ipn_track_id=track{i}&n={i}",
            i % 5
        );
        assert_eq!(
            post_form(&ingress.url, body.clone().into_bytes()).await.0,
            200
        );
        bodies.push(body.into_bytes());
    }
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let some_done = async {
        while stack.paypal.postbacks().len() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, some_done)
        .await
        .expect("worker started processing");
    worker.stop().await;
    let channel = stack.broker.channel().await;
    let before_restart = stack.broker.count(&channel, "downstream").await;
    assert!(
        before_restart < 40,
        "stopped mid-stream ({before_restart} events so far)"
    );
    let restarted = RunningWorker::spawn(stack.config.clone()).await;
    let events = stack.events(40).await;
    restarted.stop().await;
    ingress.stop().await;

    assert_eq!(events.len(), 40, "one event per IPN");
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "and no second one"
    );
    let mut by_key: HashMap<String, Vec<(i64, Vec<u8>)>> = HashMap::new();
    for event in &events {
        let key = event["order_key"].as_str().expect("key").to_owned();
        by_key
            .entry(key)
            .or_default()
            .push((event["sequence"].as_i64().expect("n"), raw(event)));
    }
    assert_eq!(by_key.len(), 5);
    for (key, received) in by_key {
        let numbers: Vec<i64> = received.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, (1..=8).collect::<Vec<i64>>(), "{key}");
        let posted: Vec<&Vec<u8>> = bodies
            .iter()
            .filter(|b| received.iter().any(|(_, r)| r == *b))
            .collect();
        let arrived: Vec<&Vec<u8>> = received.iter().map(|(_, r)| r).collect();
        assert_eq!(arrived, posted, "{key}: posting order across the restart");
    }
}

#[tokio::test]
async fn the_worker_reconnects_after_losing_the_broker_and_goes_on() {
    let stack = Stack::new().await;
    let proxy = crate::support::Proxy::start().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let mut worker_config = stack.config.clone();
    worker_config.amqp.url = stack.broker.url_via(proxy.address()).parse().expect("url");
    let worker = RunningWorker::spawn(worker_config).await;
    let readyz = format!("http://{}/readyz", worker.address);
    let ready_is = |expected: u16| {
        let readyz = readyz.clone();
        async move {
            while crate::support::http_get(&readyz)
                .await
                .map(|r| r.status().as_u16())
                .ok()
                != Some(expected)
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    tokio::time::timeout(PATIENCE, ready_is(200))
        .await
        .expect("worker ready");
    let before = sample("001_web_accept.txt");
    assert_eq!(post_form(&ingress.url, before.clone()).await.0, 200);
    assert_eq!(raw(&stack.events(1).await[0]), before);

    // One IPN is being verified (slowly) when the connection is cut.
    let in_flight = sample("012_subscr_signup.txt");
    stack
        .paypal
        .script(&in_flight, [Answer::Slow(Duration::from_millis(800))]);
    let postbacks = stack.paypal.postbacks().len();
    assert_eq!(post_form(&ingress.url, in_flight.clone()).await.0, 200);
    let verifying = async {
        while stack.paypal.postbacks().len() == postbacks {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, verifying)
        .await
        .expect("postback started");
    proxy.cut();
    tokio::time::timeout(PATIENCE, ready_is(503))
        .await
        .expect("worker reports the loss");
    let during = sample("042_send_money.txt");
    assert_eq!(
        post_form(&ingress.url, during.clone()).await.0,
        200,
        "the ingress is not behind the proxy"
    );
    proxy.restore();
    tokio::time::timeout(PATIENCE, ready_is(200))
        .await
        .expect("worker reconnected");
    let mut after: Vec<Vec<u8>> = stack.events(2).await.iter().map(raw).collect();
    after.sort();
    let mut expected = vec![in_flight, during];
    expected.sort();
    assert_eq!(after, expected, "both published after the reconnect");
    worker.stop().await;
    ingress.stop().await;
    let channel = stack.broker.channel().await;
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "and only once"
    );
}

/// The `bindings` docs/events.md and config/example.toml show for a billing service.
const DOCUMENTED_BILLING: [&str; 3] = ["paypal.subscription.#", "*.refund.#", "*.dispute.#"];

#[tokio::test]
async fn the_documented_bindings_receive_the_events_the_docs_say() {
    let mut stack = Stack::new().await;
    stack
        .config
        .downstream
        .push(Downstream::new("billing", &DOCUMENTED_BILLING));
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let live = live_samples();
    for body in &live {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let all = stack
        .events(u32::try_from(live.len()).expect("small"))
        .await;
    // What the docs say, read off PayPal's own fields: every subscription event, every refund,
    // and every dispute (reversals, their cancellations, cases, adjustments).
    let promised: std::collections::BTreeSet<String> = all
        .iter()
        .filter(|event| {
            let txn_type = event["txn_type"].as_str().unwrap_or_default();
            let status = event["payment_status"].as_str().unwrap_or_default();
            txn_type.starts_with("subscr_")
                || ["new_case", "adjustment"].contains(&txn_type)
                || ["Refunded", "Reversed", "Canceled_Reversal"].contains(&status)
        })
        .map(|event| event["event_id"].as_str().expect("id").to_owned())
        .collect();
    assert!(
        !promised.is_empty() && promised.len() < all.len(),
        "the live samples hold subscription events and others: {} of {}",
        promised.len(),
        all.len()
    );
    stack
        .wait_for("billing", u32::try_from(promised.len()).expect("small"))
        .await;
    let channel = stack.broker.channel().await;
    let billed: std::collections::BTreeSet<String> = stack
        .broker
        .drain(&channel, "billing")
        .await
        .iter()
        .map(|d| {
            let event: serde_json::Value = serde_json::from_slice(&d.data).expect("JSON");
            event["event_id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(billed, promised);
    worker.stop().await;
    ingress.stop().await;
}
