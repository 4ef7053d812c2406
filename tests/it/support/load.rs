//! PayPal-like load for the fault tests that take a broker node or the database away: posters
//! that resend until 200, the ledger of what they saw, and the end check (every accepted IPN
//! has exactly one event id, each key's sequences are 1..n in posting order), with what the
//! database and the workers' logs say about a gap when there is one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ipn_bridge::config::Config;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::task::JoinHandle;

use super::{post_form, sample, with_fields};
use crate::pipeline_e2e::RunningWorker;

/// Each phase of a fault test: `var` seconds, 5 by default (the CI size).
pub fn phase(var: &str) -> Duration {
    let seconds = std::env::var(var).ok().and_then(|s| s.parse().ok());
    Duration::from_secs(seconds.unwrap_or(5))
}

/// Runs `scripts/<script> ARGS` (it finds its servers by the inherited environment); panics
/// with its stderr when it fails; its stdout.
pub async fn script(script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let output = tokio::process::Command::new(path)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|error| panic!("scripts/{script} runs: {error}"));
    assert!(
        output.status.success(),
        "scripts/{script} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Workers in-process, each on a thread of its own logging to its own file
/// ([`RunningWorker::spawn_logged`]), so a failure can show whose line is whose.
pub struct Workers {
    pub running: Vec<RunningWorker>,
    /// Worker id and log file of each.
    pub logs: Vec<(&'static str, PathBuf)>,
    /// With `IPN_TEST_ONE_THREAD=1`: the test thread's log of all of them.
    _one_log: Option<tracing::subscriber::DefaultGuard>,
}

impl Workers {
    /// One worker per id, on `config`. With `IPN_TEST_ONE_THREAD=1` they run on the test's own
    /// thread instead, as the fault tests ran before 2026-12-03 13:00 (the timing under which
    /// the cluster test's sequence gap shows; docs/reliability.md), logging together to one file
    /// (their lines cannot be told apart then).
    pub async fn spawn(config: &Config, ids: &[&'static str]) -> Workers {
        let one_thread = std::env::var("IPN_TEST_ONE_THREAD").is_ok_and(|v| v == "1");
        let mut workers = Workers {
            running: Vec::new(),
            logs: Vec::new(),
            _one_log: None,
        };
        if one_thread {
            let unique = uuid::Uuid::now_v7().simple();
            let log = std::env::temp_dir().join(format!("ipn-it-{unique}-workers.log"));
            let file = std::fs::File::create(&log).expect("workers' log");
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    crate::pipeline_e2e::LOGGED,
                ))
                .with_writer(std::sync::Mutex::new(file))
                .finish();
            workers._one_log = Some(tracing::subscriber::set_default(subscriber));
            workers.logs.push(("workers", log));
        }
        for id in ids {
            let mut own = config.clone();
            own.worker.id = Some((*id).to_owned());
            if one_thread {
                workers.running.push(RunningWorker::spawn(own).await);
                continue;
            }
            let unique = uuid::Uuid::now_v7().simple();
            let log = std::env::temp_dir().join(format!("ipn-it-{unique}-{id}.log"));
            (workers.running).push(RunningWorker::spawn_logged(own, log.clone()).await);
            workers.logs.push((id, log));
        }
        workers
    }

    /// Stops them and removes their logs (kept when the test failed before this).
    pub async fn stop(self) {
        for worker in self.running {
            worker.stop().await;
        }
        for (_, log) in &self.logs {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// What the posters saw.
#[derive(Default)]
pub struct Ledger {
    pub posts: AtomicU64,
    pub ok: AtomicU64,
    pub unavailable: AtomicU64,
    pub other: AtomicU64,
    /// Per key, the IPN numbers that got 200, in order.
    accepted: std::sync::Mutex<HashMap<usize, Vec<usize>>>,
    /// The longest time with no 200 at all, and when the last 200 came.
    gap: std::sync::Mutex<(Duration, Option<Instant>)>,
}

impl Ledger {
    fn record_ok(&self, key: usize, n: usize) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut accepted) = self.accepted.lock() {
            accepted.entry(key).or_default().push(n);
        }
        if let Ok(mut gap) = self.gap.lock() {
            let now = Instant::now();
            if let Some(last) = gap.1 {
                gap.0 = gap.0.max(now - last);
            }
            gap.1 = Some(now);
        }
    }

    /// Per key, the IPN numbers that got 200, in order.
    pub fn accepted(&self) -> HashMap<usize, Vec<usize>> {
        self.accepted.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The longest time without any 200.
    pub fn longest_without_200(&self) -> Duration {
        self.gap.lock().map(|gap| gap.0).unwrap_or_default()
    }

    /// "posts P, 200 A, 503/failed U, other O".
    pub fn counts(&self) -> String {
        format!(
            "posts {}, 200 {}, 503/failed {}, other {}",
            self.posts.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

/// IPN `n` of subscription `key`: a real `subscr_payment` shape, txn_id `T<key>x<n>`.
pub fn ipn(prefix: &str, key: usize, n: usize) -> Vec<u8> {
    with_fields(
        &sample("013_subscr_payment.txt"),
        &[
            ("subscr_id", &format!("I-{prefix}-{key}")),
            ("txn_id", &format!("T{key}x{n}")),
            ("ipn_track_id", &format!("c{key}x{n}")),
        ],
    )
}

/// One poster per subscription, each posting its IPNs one after another as PayPal does: the
/// next only after the last got 200, a 503 resent after a short wait.
pub struct Posters {
    pub ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Posters {
    /// Starts `keys` posters against the ingress at `url`.
    pub fn start(url: &str, prefix: &str, keys: usize) -> Posters {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..keys)
            .map(|key| {
                let (url, prefix) = (url.to_owned(), prefix.to_owned());
                let (ledger, stop) = (Arc::clone(&ledger), Arc::clone(&stop));
                tokio::spawn(poster(url, prefix, key, ledger, stop))
            })
            .collect();
        Posters {
            ledger,
            stop,
            tasks,
        }
    }

    /// Stops every poster after its current IPN; returns the ledger.
    pub async fn stop(self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("poster");
        }
        self.ledger
    }
}

async fn poster(
    url: String,
    prefix: String,
    key: usize,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        ledger.posts.fetch_add(1, Ordering::Relaxed);
        match post_form(&url, ipn(&prefix, key, n)).await.0 {
            200 => {
                ledger.record_ok(key, n);
                n += 1;
            }
            503 => {
                ledger.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => {
                ledger.other.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The events of a business queue, by txn_id.
#[derive(Default)]
pub struct Events {
    /// Every event id each txn was published under (redeliveries repeat one: same id).
    pub ids: HashMap<String, HashSet<String>>,
    /// The order key and sequence of each txn's first event.
    pub first_seen: HashMap<String, (String, i64)>,
    /// Deliveries taken, duplicates included.
    pub deliveries: usize,
}

/// Consumes `queue` (acking) until it has given events of `total` distinct txns; panics after
/// two minutes saying how many came.
pub async fn collect_events(config: &Config, queue: &str, total: usize) -> Events {
    let (connection, channel) = open(config, "it-load-check").await;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "it-load-check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the business queue");
    let mut events = Events::default();
    let collect = async {
        while events.ids.len() < total {
            let delivery = (consumer.next().await)
                .expect("consumer open")
                .expect("delivery");
            events.deliveries += 1;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
            let txn = event["txn_id"].as_str().expect("txn_id").to_owned();
            let id = event["event_id"].as_str().expect("event_id").to_owned();
            let key = event["order_key"].as_str().expect("order_key").to_owned();
            let sequence = event["sequence"].as_i64().expect("sequence");
            events
                .first_seen
                .entry(txn.clone())
                .or_insert((key, sequence));
            events.ids.entry(txn).or_default().insert(id);
            (delivery.acker.ack(BasicAckOptions::default()))
                .await
                .expect("ack");
        }
    };
    let collected = tokio::time::timeout(Duration::from_secs(120), collect).await;
    let _ = connection.close(200, "checked".into()).await;
    if collected.is_err() {
        panic!(
            "{} of {total} accepted IPNs became events",
            events.ids.len()
        );
    }
    events
}

/// The end of a fault test: the posters got only 200 and 503, nothing is in `<p>.dead`, and
/// every accepted IPN has one event id, each key's sequences 1..n in posting order. On a gap,
/// panics with the database's rows of the key around it and the workers' lines (`logs`: worker
/// id and log file) about the IPNs involved.
pub async fn assert_nothing_lost(
    ledger: &Ledger,
    events: &Events,
    config: &Config,
    logs: &[(&str, PathBuf)],
) {
    assert_eq!(ledger.other.load(Ordering::Relaxed), 0, "only 200 and 503");
    assert_eq!(dead_letters(config).await, 0, "nothing dead-lettered");
    let accepted = &ledger.accepted();
    assert!(
        events.ids.values().all(|ids| ids.len() == 1),
        "one event id per IPN"
    );
    for (key, numbers) in accepted {
        let sequences: Vec<i64> = (numbers.iter())
            .map(|n| events.first_seen[&format!("T{key}x{n}")].1)
            .collect();
        let expected: Vec<i64> = (1..=numbers.len() as i64).collect();
        if sequences != expected {
            let gap = sequences.iter().zip(&expected).position(|(a, b)| a != b);
            let gap = gap.unwrap_or(0);
            let from = gap.saturating_sub(3);
            let order_key = &events.first_seen[&format!("T{key}x{}", numbers[0])].0;
            let rows = key_rows(config, order_key, from).await;
            // The IPNs around the gap and the one numbered in it.
            let mut txns: Vec<String> = (from..(gap + 3).min(numbers.len()))
                .map(|i| format!("T{key}x{}", numbers[i]))
                .collect();
            if let Some(i) = sequences.iter().position(|s| *s == expected[gap]) {
                txns.push(format!("T{key}x{}", numbers[i]));
            }
            let lines = worker_lines(logs, &txns);
            panic!(
                "key {key}: sequences of IPNs {from}.. in posting order: {:?} (expected {:?}); \
                 the database's rows of {order_key} from sequence {from}: {rows:#?}; \
                 the workers' lines about {txns:?} and their sessions:\n{lines}",
                &sequences[from..(from + 8).min(sequences.len())],
                &expected[from..(from + 8).min(expected.len())],
            );
        }
        assert_eq!(
            *numbers,
            (0..numbers.len()).collect::<Vec<_>>(),
            "key {key}"
        );
    }
}

/// A connection to whichever of `config`'s nodes answers, named `name`, and a channel on it.
async fn open(config: &Config, name: &str) -> (lapin::Connection, lapin::Channel) {
    let connected = ipn_bridge::amqp::connect(&config.amqp, name)
        .await
        .expect("a node answers");
    let channel = (connected.connection.create_channel())
        .await
        .expect("channel");
    (connected.connection, channel)
}

/// Messages in `<p>.dead` (the shard queues' dead letters).
async fn dead_letters(config: &Config) -> u32 {
    let (connection, channel) = open(config, "it-load-dead").await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let dead = format!("{}.dead", config.topology.prefix);
    let declared = channel
        .queue_declare(dead.as_str().into(), passive, FieldTable::default())
        .await
        .expect("dead-letter queue");
    let _ = connection.close(200, "checked".into()).await;
    declared.message_count()
}

/// What the database holds for `order_key` from sequence `from` on (the test's database is
/// dropped when the test ends, so a failure shows it here).
async fn key_rows(config: &Config, order_key: &str, from: usize) -> Vec<String> {
    use sqlx::{ConnectOptions, Row};
    let Ok(mut connection) = config.database.url.options().connect().await else {
        return vec!["(database unreachable)".to_owned()];
    };
    let rows = sqlx::query(
        "SELECT sequence, state, txn_id, event_id::text AS id, body_sha256,
                created_at::text AS created, done_at::text AS done
         FROM ipn_event WHERE order_key = $1 AND sequence > $2 ORDER BY sequence LIMIT 8",
    )
    .bind(order_key)
    .bind(i64::try_from(from).unwrap_or(0))
    .fetch_all(&mut connection)
    .await;
    let mut shown: Vec<String> = match rows {
        Ok(rows) => (rows.iter())
            .map(|row| {
                format!(
                    "seq {:?} {:?} txn {:?} id {:?} body {:?} created {:?} done {:?}",
                    row.try_get::<i64, _>("sequence").ok(),
                    row.try_get::<String, _>("state").ok(),
                    row.try_get::<Option<String>, _>("txn_id").ok().flatten(),
                    row.try_get::<String, _>("id").ok(),
                    row.try_get::<String, _>("body_sha256").ok(),
                    row.try_get::<String, _>("created").ok(),
                    row.try_get::<Option<String>, _>("done").ok().flatten(),
                )
            })
            .collect(),
        Err(error) => vec![format!("(query failed: {error})")],
    };
    let counter = sqlx::query("SELECT last_sequence FROM ipn_key_sequence WHERE order_key = $1")
        .bind(order_key)
        .fetch_optional(&mut connection)
        .await
        .map(|row| row.and_then(|row| row.try_get::<i64, _>("last_sequence").ok()));
    shown.push(format!("ipn_key_sequence.last_sequence: {counter:?}"));
    shown
}

/// The lines of the workers' logs about `txns` (and every line of an IPN span naming one of
/// their message ids), with their sessions' lines, each prefixed by its worker; the last 400.
fn worker_lines(logs: &[(&str, PathBuf)], txns: &[String]) -> String {
    let mut shown = Vec::new();
    for (id, log) in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let named =
            |line: &str| (txns.iter()).any(|txn| line.contains(&format!("txn_id=\"{txn}\"")));
        let message_ids: HashSet<&str> = (text.lines())
            .filter(|line| named(line))
            .filter_map(|line| line.split("message_id=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        for line in text.lines() {
            let about = named(line) || message_ids.iter().any(|id| line.contains(id));
            if about || line.contains("worker::session") {
                shown.push(format!("{id} {line}"));
            }
        }
    }
    shown.sort_by(|a, b| a.split(' ').nth(1).cmp(&b.split(' ').nth(1)));
    let skipped = shown.len().saturating_sub(400);
    let mut text = shown.split_off(skipped).join("\n");
    if skipped > 0 {
        text = format!("({skipped} earlier lines left out)\n{text}");
    }
    text
}
