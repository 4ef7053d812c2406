//! Fault injection under load. A load generator posts IPNs of many subscriptions (real sample
//! shapes, unique ids, each subscription's IPNs one after another as PayPal sends them, resending
//! on 503 as PayPal does), some resent after their 200 and some forged, while the faults take
//! turns: the broker's connections cut, PayPal flapping between slow, 500, silent and garbage, a
//! worker process SIGKILLed and restarted, PostgreSQL's connections cut, the broker application
//! restarted. The operator replays what PayPal's outages parked, and at the end a checker reads every event and
//! every quarantined IPN and proves: each genuine IPN that got a 200 has exactly one event id,
//! numbered 1..n per subscription in posting order; each forged one is quarantined with a
//! reason and has no event. It prints the ledger.
//!
//! CI runs the bounded size. `FAULT_SCALE=<n>` makes each subscription post n times as many
//! IPNs (a soak run of about n × 25 s): see docs/reliability.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ipn_bridge::config::{Config, Downstream};
use ipn_bridge::contract::header_text;
use ipn_bridge::ctl;
use ipn_bridge::ctl::review::{self, Queue, Selection};
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::form::Form;
use ipn_bridge::topology::Topology;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::broker::BROKER;
use crate::support::db::POSTGRES;
use crate::support::{
    PATIENCE, Proxy, TestBroker, TestDb, WorkerProcess, http_within, log_tail, sample,
    spawn_ingress, with_fields,
};

const SHARDS: u16 = 8;
const SUBSCRIPTIONS: usize = 24;
const PER_SUBSCRIPTION: usize = 15;
/// Pause between two IPNs of one subscription: the load spans all the faults.
const PACE: Duration = Duration::from_millis(1500);
/// How long the load generator waits for an answer, as PayPal does (about 20 s, 30 s on
/// retries): the ingress answers 503 within its confirm timeout, so a request that outlasts this
/// is a fault of the ingress, counted (and resent) rather than waited for without end.
const ANSWER: Duration = Duration::from_secs(30);

/// The faults [`Rig::inject_faults`] takes turns with, in order: the ledger's and the progress
/// report's names for them.
const FAULTS: [&str; 5] = [
    "broker connections cut",
    "paypal flapping",
    "worker SIGKILLed and restarted",
    "postgres connections cut",
    "broker restarted",
];

/// The sample shapes a subscription's IPNs cycle through.
const SHAPES: [&str; 4] = [
    "012_subscr_signup.txt",
    "013_subscr_payment.txt",
    "014_subscr_payment.txt",
    "016_subscr_cancel.txt",
];

/// IPN `n` of subscription `key`, genuine (`g`) or forged (`f`): the sample's shape with ids of
/// its own. Its ipn_track_id names it.
fn ipn(kind: char, key: usize, n: usize) -> (String, Vec<u8>) {
    let track = format!("{kind}{key}x{n}");
    let body = with_fields(
        &sample(SHAPES[n % SHAPES.len()]),
        &[
            ("subscr_id", &format!("I-FAULT{key}")),
            (
                "txn_id",
                &format!("{}T{key}X{n}", kind.to_ascii_uppercase()),
            ),
            ("ipn_track_id", &track),
        ],
    );
    (track, body)
}

/// What the load generator, the faults and the checker counted.
#[derive(Debug, Default)]
struct Ledger {
    genuine: usize,
    forged: usize,
    requests: usize,
    ok: usize,
    unavailable: usize,
    connection_errors: usize,
    no_answer: usize,
    resends: usize,
    events: usize,
    event_copies: usize,
    duplicates_suppressed: usize,
    quarantined: BTreeMap<String, usize>,
    parked: usize,
    lost: usize,
    reordered: usize,
    forged_events: usize,
    genuine_quarantined: usize,
    faults: BTreeMap<&'static str, usize>,
}

impl fmt::Display for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: [(&str, String); 19] = [
            (
                "posted (distinct IPNs)",
                (self.genuine + self.forged).to_string(),
            ),
            ("  genuine", self.genuine.to_string()),
            ("  forged", self.forged.to_string()),
            ("requests", self.requests.to_string()),
            ("  200", self.ok.to_string()),
            ("  503 (resent until 200)", self.unavailable.to_string()),
            (
                "  connection errors (resent)",
                self.connection_errors.to_string(),
            ),
            (
                "  no answer in 30 s (must be 0)",
                self.no_answer.to_string(),
            ),
            ("  resends after a 200", self.resends.to_string()),
            ("events (distinct ids)", self.events.to_string()),
            ("  redelivered copies", self.event_copies.to_string()),
            (
                "duplicates suppressed (at least)",
                self.duplicates_suppressed.to_string(),
            ),
            ("quarantined", format!("{:?}", self.quarantined)),
            ("parked, then replayed", self.parked.to_string()),
            ("lost (must be 0)", self.lost.to_string()),
            ("reordered (must be 0)", self.reordered.to_string()),
            (
                "events of forged IPNs (must be 0)",
                self.forged_events.to_string(),
            ),
            ("faults injected", format!("{:?}", self.faults)),
            (
                "genuine IPNs quarantined (must be 0)",
                self.genuine_quarantined.to_string(),
            ),
        ];
        rows.iter()
            .try_for_each(|(name, value)| writeln!(f, "{name:<36} {value}"))
    }
}

/// What the test's processes share.
struct Rig {
    broker: TestBroker,
    db: TestDb,
    paypal: FakePaypal,
    amqp_proxy: Proxy,
    pg_proxy: Proxy,
    /// Direct config (no proxy), as the operator's ipnctl has it.
    config: Config,
    ledger: Mutex<Ledger>,
    /// What the faults are doing now, for the report of a run that does not finish.
    doing: Mutex<&'static str>,
}

impl Rig {
    fn count(&self, update: impl FnOnce(&mut Ledger)) {
        update(&mut self.ledger.lock().expect("ledger"));
    }

    fn doing(&self, what: &'static str) {
        *self.doing.lock().expect("doing") = what;
    }

    /// `phase` bounded by `limit`: a phase that does not end fails the test with what the faults
    /// were doing, the ledger so far and the end of each worker's log, instead of hanging it.
    async fn within<T>(
        &self,
        phase: &str,
        limit: Duration,
        logs: &[PathBuf],
        run: impl Future<Output = T>,
    ) -> T {
        match tokio::time::timeout(limit, run).await {
            Ok(done) => done,
            Err(_) => {
                let doing = *self.doing.lock().expect("doing");
                let ledger = self.ledger.lock().expect("ledger");
                let logs: Vec<String> = logs.iter().map(|log| log_tail(log, 40)).collect();
                panic!(
                    "{phase} did not end in {limit:?} (faults: {doing})\n{ledger}\nworker logs:\n{}",
                    logs.join("\n---\n")
                )
            }
        }
    }

    /// The workers' environment: through both proxies, short timeouts and tiers, so that
    /// PayPal's failures walk the tiers and park within the test.
    fn worker_env(&self) -> Vec<(String, String)> {
        let vars = [
            (
                "IPN_AMQP__URL",
                self.broker.url_via(self.amqp_proxy.address()),
            ),
            ("IPN_AMQP__RECONNECT_MIN", "50ms".into()),
            ("IPN_AMQP__RECONNECT_MAX", "500ms".into()),
            ("IPN_AMQP__CONNECT_TIMEOUT", "2s".into()),
            ("IPN_TOPOLOGY__SHARDS", SHARDS.to_string()),
            (
                "IPN_DATABASE__URL",
                self.db.url_via(self.pg_proxy.address()),
            ),
            ("IPN_DATABASE__MAX_CONNECTIONS", "4".into()),
            ("IPN_DATABASE__ACQUIRE_TIMEOUT", "1s".into()),
            ("IPN_PAYPAL__VERIFY_URL", self.paypal.url().to_string()),
            ("IPN_PAYPAL__VERIFY_TIMEOUT", "1s".into()),
            ("IPN_WORKER__VERIFY_ATTEMPTS", "2".into()),
            ("IPN_WORKER__VERIFY_BACKOFF", "50ms".into()),
            ("IPN_WORKER__RETRY_MIN", "50ms".into()),
            ("IPN_WORKER__RETRY_MAX", "500ms".into()),
            ("IPN_WORKER__CONFIRM_TIMEOUT", "2s".into()),
            ("IPN_WORKER__HEARTBEAT", "200ms".into()),
            ("IPN_WORKER__TAKEOVER", "1s".into()),
            ("IPN_WORKER__SHUTDOWN_GRACE", "5s".into()),
            ("IPN_RETRY__TIERS", "200ms,400ms,800ms".into()),
            ("IPN_RETRY__MAX_AGE", "1m".into()),
        ];
        vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// POSTs `body` until it gets a 200, resending on 503 or a failed connection as PayPal does.
    async fn post_until_accepted(&self, client: &reqwest::Client, url: &str, body: &[u8]) {
        let mut wait = Duration::from_millis(50);
        loop {
            let sent = client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.to_vec())
                .send()
                .await;
            self.count(|l| l.requests += 1);
            match sent.map(|r| r.status().as_u16()) {
                Ok(200) => {
                    self.count(|l| l.ok += 1);
                    return;
                }
                Ok(503) => self.count(|l| l.unavailable += 1),
                Ok(other) => panic!("the ingress answered {other} to a valid IPN"),
                Err(error) if error.is_timeout() => self.count(|l| l.no_answer += 1),
                Err(_) => self.count(|l| l.connection_errors += 1),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// One subscription's IPNs, in order; returns the genuine ones' track ids in posting order
    /// and the forged ones' track ids.
    async fn subscription(
        &self,
        url: &str,
        key: usize,
        per_key: usize,
    ) -> (Vec<String>, Vec<String>) {
        let client = http_within(ANSWER);
        let (mut genuine, mut forged) = (Vec::new(), Vec::new());
        // Subscriptions start spread over the first pace.
        tokio::time::sleep(PACE * key as u32 / SUBSCRIPTIONS as u32).await;
        for n in 0..per_key {
            let (track, body) = ipn('g', key, n);
            self.post_until_accepted(&client, url, &body).await;
            genuine.push(track);
            if (key + n) % 6 == 3 {
                self.post_until_accepted(&client, url, &body).await;
                self.count(|l| l.resends += 1);
            }
            if (key * 7 + n) % 5 == 2 {
                let (track, body) = ipn('f', key, n);
                self.paypal.script(&body, [Answer::Invalid; 64]);
                self.post_until_accepted(&client, url, &body).await;
                forged.push(track);
            }
            tokio::time::sleep(PACE).await;
        }
        (genuine, forged)
    }

    /// Adds what `worker` counted as duplicates so far (read before it is killed or stopped; what
    /// it counted after the last read before a SIGKILL is not included).
    async fn count_duplicates(&self, worker: &WorkerProcess) {
        let duplicates = worker
            .metric("ipn_worker_duplicates_total")
            .await
            .unwrap_or(0.0);
        self.count(|l| l.duplicates_suppressed += duplicates as usize);
    }

    /// `ipnctl parked replay`, as the operator runs it (straight to the broker and database);
    /// a failure (the broker is restarting) is left for the next call.
    async fn replay_parked(&self) {
        let parked = review::list(&self.config, &Queue::Parked).await;
        if parked.is_ok_and(|parked| !parked.is_empty())
            && let Ok(pass) = review::replay(&self.config, &Queue::Parked, &Selection::All).await
        {
            self.count(|l| l.parked += pass.taken);
        }
    }

    /// The faults, in turns, until `load` is cancelled (each at least once); everything is
    /// healthy again when this returns.
    async fn inject_faults(&self, workers: &mut [WorkerProcess], load: &CancellationToken) {
        let calm = Duration::from_secs(1);
        let mut turn = 0usize;
        while turn < FAULTS.len() || !load.is_cancelled() {
            let name = FAULTS[turn % FAULTS.len()];
            self.doing(name);
            match turn % FAULTS.len() {
                0 => {
                    self.amqp_proxy.cut();
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    self.amqp_proxy.restore();
                }
                1 => {
                    for (answer, time) in [
                        (Answer::Slow(Duration::from_millis(700)), 1000),
                        (Answer::ServerError, 2500),
                        (Answer::Silent, 1500),
                        (Answer::Garbage, 500),
                    ] {
                        self.paypal.set_default(answer);
                        tokio::time::sleep(Duration::from_millis(time)).await;
                    }
                    self.paypal.set_default(Answer::Verified);
                }
                2 => {
                    let worker = &mut workers[(turn / FAULTS.len()) % workers.len()];
                    self.count_duplicates(worker).await;
                    worker.kill().await;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    worker.restart().await;
                }
                3 => {
                    self.pg_proxy.cut();
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    self.pg_proxy.restore();
                }
                _ => self.broker.restart_node(Duration::from_millis(500)).await,
            }
            self.count(|l| *l.faults.entry(name).or_default() += 1);
            self.doing("calm");
            tokio::time::sleep(calm).await;
            // The operator, alerted, replays what PayPal's outage parked, so its keys flow again.
            self.doing("replaying the parked IPNs");
            self.replay_parked().await;
            self.doing("calm");
            turn += 1;
        }
        self.doing("none (the load ended)");
    }
}

/// One message taken from `downstream` or the quarantine queue.
struct Seen {
    quarantine: bool,
    body: Vec<u8>,
    reason: Option<String>,
}

/// Consumes `downstream` and `quarantine` straight from the broker (not through the proxy),
/// acking each after recording it, reconnecting when the broker restarts; until `stop`.
async fn collect(
    url: String,
    quarantine: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        if let Err(error) = collect_once(&url, &quarantine, &seen, &stop).await {
            eprintln!("collector reconnects: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn collect_once(
    url: &str,
    quarantine: &str,
    seen: &Mutex<Vec<Seen>>,
    stop: &CancellationToken,
) -> Result<(), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(200, BasicQosOptions::default()).await?;
    let consume = |queue: &str| {
        channel.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
    };
    let events = consume("downstream").await?.map(|d| (false, d));
    let quarantined = consume(quarantine).await?.map(|d| (true, d));
    let mut both = futures_util::stream::select(events, quarantined);
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = both.next() => next,
        };
        let Some((quarantine, delivery)) = next else {
            return Ok(());
        };
        let delivery = delivery?;
        let reason = header_text(&delivery.properties, "x-ipn-reason");
        seen.lock().expect("seen").push(Seen {
            quarantine,
            body: delivery.data.clone(),
            reason,
        });
        delivery.ack(BasicAckOptions::default()).await?;
    }
}

impl Seen {
    /// The ipn_track_id of the IPN this message carries (an event carries it in `fields`).
    fn track_id(&self) -> String {
        if self.quarantine {
            return Form::parse(&self.body)
                .text("ipn_track_id")
                .unwrap_or_default()
                .to_string();
        }
        let event: serde_json::Value = serde_json::from_slice(&self.body).expect("event JSON");
        event["fields"]["ipn_track_id"]
            .as_str()
            .expect("track id")
            .to_owned()
    }
}

fn scale() -> usize {
    std::env::var("FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_and_faults_nothing_is_lost_reordered_or_forged() {
    // The broker restart concerns everyone: no other test uses the broker meanwhile.
    let broker = TestBroker::exclusive().await;
    let db = TestDb::new();
    let paypal = FakePaypal::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Answer::Verified,
    )
    .expect("fake paypal");
    let mut config = broker.config();
    config.topology.shards = NonZeroU16::new(SHARDS).expect("non-zero");
    config.database = db.config();
    config.downstream = vec![Downstream::new("downstream", &["#"])];
    let rig = Rig {
        amqp_proxy: Proxy::to(BROKER).await,
        pg_proxy: Proxy::to(POSTGRES).await,
        broker,
        db,
        paypal,
        config,
        ledger: Mutex::new(Ledger::default()),
        doing: Mutex::new("none yet"),
    };
    let topology = Topology::of(&rig.config);
    // As the operator does before the first start (the workers' config file binds the same).
    ctl::declare_topology(&rig.config)
        .await
        .expect("declare topology");
    let mut ingress_config = rig.broker.config_via(rig.amqp_proxy.address());
    ingress_config.topology.shards = rig.config.topology.shards;
    let ingress = spawn_ingress(ingress_config).await;
    ingress.wait_ready().await;
    let env = rig.worker_env();
    let mut workers = vec![
        WorkerProcess::start("fault-a", &env).await,
        WorkerProcess::start("fault-b", &env).await,
    ];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop_collecting = CancellationToken::new();
    let collector = tokio::spawn(collect(
        rig.broker.url_via(BROKER),
        topology.quarantine_queue(),
        Arc::clone(&seen),
        stop_collecting.clone(),
    ));

    // Load and faults together.
    let per_key = PER_SUBSCRIPTION * scale();
    let load_done = CancellationToken::new();
    let load = async {
        let subscriptions =
            (0..SUBSCRIPTIONS).map(|key| rig.subscription(&ingress.url, key, per_key));
        let posted = futures_util::future::join_all(subscriptions).await;
        load_done.cancel();
        posted
    };
    let logs: Vec<PathBuf> = workers.iter().map(WorkerProcess::log_path).collect();
    // Every phase is bounded: CI once waited 90 minutes on this test without a word.
    let limit = PATIENCE * 30 * scale() as u32;
    let started = Instant::now();
    let faults = rig.inject_faults(&mut workers, &load_done);
    let (posted, ()) = rig
        .within("the load under faults", limit, &logs, async {
            tokio::join!(load, faults)
        })
        .await;
    let load_time = started.elapsed();

    // The operator replays what was parked (PayPal is healthy again) until everything settled.
    let expected: HashSet<String> = posted
        .iter()
        .flat_map(|(g, f)| g.iter().chain(f))
        .cloned()
        .collect();
    let settle = async {
        loop {
            rig.replay_parked().await;
            let settled: HashSet<String> = seen
                .lock()
                .expect("seen")
                .iter()
                .map(Seen::track_id)
                .collect();
            if expected.is_subset(&settled) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let patience = PATIENCE * 6 * scale() as u32;
    let settled = tokio::time::timeout(patience, settle).await.is_ok();
    // Late copies (an event republished after a lost confirm) arrive within the retry bounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_collecting.cancel();
    rig.within("the collector's stop", PATIENCE, &logs, collector)
        .await
        .expect("collector did not panic");

    // The checker.
    for worker in &workers {
        rig.count_duplicates(worker).await;
    }
    rig.doing("none (checking)");
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    let mut ledger = std::mem::take(&mut *rig.ledger.lock().expect("ledger"));
    let mut events: HashMap<String, serde_json::Value> = HashMap::new();
    let mut quarantined: HashMap<String, String> = HashMap::new();
    for message in &seen {
        let track = message.track_id();
        if message.quarantine {
            let reason = message.reason.clone().unwrap_or_default();
            *ledger.quarantined.entry(reason.clone()).or_default() += 1;
            quarantined.insert(track, reason);
            continue;
        }
        let event: serde_json::Value = serde_json::from_slice(&message.body).expect("event JSON");
        match events.get(&track) {
            Some(first) => {
                assert_eq!(
                    first["event_id"], event["event_id"],
                    "{track}: one event id"
                );
                ledger.event_copies += 1;
            }
            None => {
                events.insert(track, event);
            }
        }
    }
    ledger.events = events.len();
    for (genuine, forged) in &posted {
        ledger.genuine += genuine.len();
        ledger.forged += forged.len();
        for (n, track) in genuine.iter().enumerate() {
            match events.get(track) {
                None => ledger.lost += 1,
                Some(event) if event["sequence"].as_i64() != Some(n as i64 + 1) => {
                    ledger.reordered += 1;
                }
                Some(_) => {}
            }
            ledger.genuine_quarantined += usize::from(quarantined.contains_key(track));
        }
        for track in forged {
            ledger.forged_events += usize::from(events.contains_key(track));
            match quarantined.get(track) {
                Some(reason) => assert!(!reason.is_empty(), "{track} quarantined with a reason"),
                None => ledger.lost += 1,
            }
        }
    }
    println!(
        "fault injection, {per_key} IPNs × {SUBSCRIPTIONS} subscriptions, load {load_time:.1?}:\n{ledger}"
    );

    let mut logs = Vec::new();
    for worker in &mut workers {
        if !settled || ledger.lost + ledger.reordered > 0 {
            logs.push(worker.keep_log());
        }
        worker.stop().await;
    }
    assert!(
        settled,
        "everything settled in {patience:?}; worker logs: {logs:?}\n{ledger}"
    );
    assert_eq!(ledger.lost, 0, "lost; worker logs: {logs:?}");
    assert_eq!(ledger.reordered, 0, "reordered; worker logs: {logs:?}");
    assert_eq!(ledger.forged_events, 0, "forged IPNs published");
    assert_eq!(ledger.genuine_quarantined, 0, "genuine IPNs quarantined");
    assert_eq!(ledger.no_answer, 0, "requests the ingress left unanswered");
    assert_eq!(ledger.events, ledger.genuine, "one event per genuine IPN");
    assert!(
        ledger.faults.len() == 5,
        "every kind of fault happened: {:?}",
        ledger.faults
    );
    assert!(
        ledger.unavailable > 0,
        "the faults reached the posting side"
    );
    ingress.stop().await;
}
