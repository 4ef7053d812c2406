//! End-to-end throughput and latency (ingress → worker → a downstream queue) beside the relay
//! ceiling, measured in one run.
//!
//! ```sh
//! cargo bench --bench bridge -- e2e --paypal-delay 0ms
//! cargo bench --bench bridge -- e2e --paypal-delay 200ms
//! ```
//! 1. relay: `--ipns` inbound messages are put in the shard queues, then a plain relay (one
//!    consumer per shard, no verification, no database) republishes each to `<p>.events` with a
//!    confirm and acks it: the ceiling of consume → republish → ack on this broker; twice, with
//!    a minimal event (the issue-18 ceiling) and with one of the worker's event size and
//!    properties ([`Relayed`]);
//! 2. drain: as many IPNs are posted through the real `ipn-ingress` with the worker stopped, then
//!    the real `ipn-worker` (child process) starts and empties the queues, verifying each with the
//!    in-process fake PayPal (answering after `--paypal-delay`): events/s, each party's CPU per
//!    event, and where an IPN's wall time went by step and the database batches' sizes, from
//!    the workers' own histograms ([`crate::support::steps`]);
//! 3. live: IPNs are posted through the ingress at `--live-rate` (default: half the drain rate)
//!    for `--seconds` while the worker runs: receive-to-publish latency, measured at the
//!    downstream consumer as its arrival time minus the event's `received_at`.
//!
//! Every phase reads every event back from a downstream queue bound to `#`, and the run fails
//! unless each IPN answered 200 yields exactly one event and each key's sequence numbers are
//! 1..n without a gap or a repeat. Needs RabbitMQ (guest/guest) and PostgreSQL (user postgres)
//! on 127.0.0.1. Uses a unique prefix in vhost `/` and a database of its own; removes both.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use ipn_bridge::amqp::{Outgoing, Publisher};
use ipn_bridge::config::Config;
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::Provider;
use ipn_bridge::topology::Topology;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Semaphore, mpsc};

use crate::samples_dir;
use crate::support::events::{
    Arrival, Drained, Ledger, RELAY_KEY_PREFIX, consume_downstream, take_events,
};
use crate::support::steps::Scrape;
use crate::support::{self, Summary};
use crate::support::{BodySource, ChildProcess, CpuMeter, Length, Party, cores, http_phase};
use ipn_bridge::store::Store;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// IPNs in the relay and drain phases.
    #[arg(long, default_value_t = 20_000)]
    ipns: u64,
    /// Order keys (subscription profiles) the IPNs are spread over.
    #[arg(long, default_value_t = 2_000)]
    keys: u64,
    /// How long the fake PayPal takes to answer VERIFIED.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    paypal_delay: Duration,
    /// The worker's `worker.concurrency` (IPNs in progress at once), and the relay's.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// The worker's `worker.prefetch` per shard queue, and the relay's.
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// The worker's `database.max_connections`.
    #[arg(long, default_value_t = 16)]
    db_connections: u32,
    /// IPNs posted per second in the live phase (default: half the drain rate).
    #[arg(long)]
    live_rate: Option<f64>,
    /// Seconds the live phase posts for.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Shard queues.
    #[arg(long, default_value_t = 32)]
    shards: u16,
    /// Workers draining together, sharing the shards as in production (each registered
    /// before it starts, so each consumes only its share from the first message).
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// PostgreSQL server (the bench makes a database of its own on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
}

/// Names this run made for itself.
struct Names<'a> {
    downstream: &'a str,
    database_url: &'a str,
}

/// IPN number `seq`: a real `subscr_payment` shape with its own txn_id and ipn_track_id, for the
/// profile `seq % keys` (so each key's IPNs are posted in increasing `seq` order).
pub fn body_source(keys: u64) -> BodySource {
    let template = samples_dir::sample("013_subscr_payment.txt");
    Arc::new(move |seq| {
        let mut body = Vec::with_capacity(template.len() + 32);
        for (i, field) in template.split(|b| *b == b'&').enumerate() {
            if i > 0 {
                body.push(b'&');
            }
            let name = field.split(|b| *b == b'=').next().unwrap_or_default();
            match name {
                b"subscr_id" => body.extend(format!("subscr_id=I-BENCH{}", seq % keys).bytes()),
                b"txn_id" => body.extend(format!("txn_id=B{seq}").bytes()),
                b"ipn_track_id" => body.extend(format!("ipn_track_id=t{seq}").bytes()),
                _ => body.extend_from_slice(field),
            }
        }
        body
    })
}

/// Runs the relay, drain and live phases with the checks; prints their table; returns the
/// headline figures.
pub fn bench(args: &Args) -> anyhow::Result<Summary> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench_in_runtime(args))
}

async fn bench_in_runtime(args: &Args) -> anyhow::Result<Summary> {
    let setup = support::RunSetup::new("e2e", &args.amqp, &args.postgres, args.shards).await?;
    let names = Names {
        downstream: &setup.downstream,
        database_url: &setup.database_url,
    };
    let result = run(
        args,
        &setup.config,
        &setup.topology,
        &setup.connection,
        &names,
    )
    .await;
    setup.clean_up(&args.postgres).await?;
    result
}

async fn run(
    args: &Args,
    config: &Config,
    topology: &Topology,
    connection: &Connection,
    names: &Names<'_>,
) -> anyhow::Result<Summary> {
    let bodies = body_source(args.keys);
    let mut arrivals = consume_downstream(connection, names.downstream).await?;

    let (relay, relay_cpu) = relay_phase(
        args,
        config,
        topology,
        &bodies,
        &mut arrivals,
        Relayed::Minimal,
    )
    .await?;
    let (sized, sized_cpu) = relay_phase(
        args,
        config,
        topology,
        &bodies,
        &mut arrivals,
        Relayed::event_sized(&bodies(0)),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let answer = match args.paypal_delay {
        Duration::ZERO => Answer::Verified,
        delay => Answer::Slow(delay),
    };
    let paypal = FakePaypal::start(listener, answer)?;

    let (mut ingress, url) = support::start_ingress(config, &[]).await?;
    let posts = support::paypal_posts(&bodies);
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let posted = http_phase(
        "post (worker stopped)",
        64,
        None,
        &url,
        &posts,
        &accepted,
        0,
        Length::Count(args.ipns),
    )
    .await?;
    let mut ledger = Ledger::default();
    let mut workers = start_workers(args, config, names.database_url, &paypal).await?;
    let rss_rest = total_rss(&workers);
    let meter = process_meter(&workers);
    let steps_before = Scrape::of(&workers).await?;
    let drained = take_events(&mut arrivals, &accepted, &mut ledger).await?;
    let cpu = meter.per_event(drained.events);
    let steps = Scrape::of(&workers).await?.report_since(&steps_before);
    let rss_drain = total_rss(&workers);
    let drain_rate = drained.rate();

    let live_rate = args.live_rate.unwrap_or(drain_rate / 2.0);
    let posted_live = http_phase(
        "post (live)",
        256,
        Some(live_rate),
        &url,
        &posts,
        &accepted,
        args.ipns,
        Length::Time(Duration::from_secs(args.seconds)),
    )
    .await?;
    let live = take_events(&mut arrivals, &accepted, &mut ledger).await?;
    for worker in &mut workers {
        worker.stop()?;
    }
    ingress.stop()?;
    paypal.stop().await;

    println!(
        "\nmachine: {} cores; {} IPNs over {} keys; PayPal answers after {:?}; {} worker(s), each: concurrency {}, prefetch {}, {} database connections; {} shards",
        cores(),
        args.ipns,
        args.keys,
        args.paypal_delay,
        args.workers,
        args.concurrency,
        args.prefetch,
        args.db_connections,
        args.shards
    );
    println!(
        "| phase | events/s | events | receive→publish p50 ms | p99 ms |\n|---|---|---|---|---|"
    );
    println!(
        "| relay ceiling (consume → republish → ack) | {:.0} | {} | – | – |",
        relay.rate(),
        relay.events
    );
    println!(
        "| relay ceiling, event-sized (the worker's event bytes and headers) | {:.0} | {} | – | – |",
        sized.rate(),
        sized.events
    );
    println!(
        "| worker, draining a backlog | {drain_rate:.0} | {} | – | – |",
        drained.events
    );
    println!(
        "| worker, live at {live_rate:.0} IPN/s posted | {:.0} | {} | {:.1} | {:.1} |",
        live.rate(),
        live.events,
        live.ms(0.5),
        live.ms(0.99)
    );
    println!(
        "\nworker / relay: {:.0}%; worker / event-sized relay: {:.0}%",
        100.0 * drain_rate / relay.rate(),
        100.0 * drain_rate / sized.rate()
    );
    let bytes = |drained: &Drained| {
        let (body, header) = drained.mean_bytes();
        format!("{body} + {header}")
    };
    println!(
        "event bytes (body + content header, mean): relay {}, event-sized relay {}, worker {}",
        bytes(&relay),
        bytes(&sized),
        bytes(&drained)
    );
    println!(
        "worker RSS (all workers): {} KiB at rest, {} KiB while draining",
        rss_rest.unwrap_or(0),
        rss_drain.unwrap_or(0)
    );
    println!(
        "CPU µs per event while draining: worker(s) {:.0}, PostgreSQL {:.0}, broker {:.0}, bench (fake PayPal, downstream) {:.0}",
        cpu[0], cpu[1], cpu[2], cpu[3]
    );
    println!("{steps}");
    // The minimal relay's events are ~60 bytes of JSON without headers where the worker's carry
    // the whole event: the broker's cost per event differs between the phases for that too.
    println!(
        "CPU µs per event while relaying: broker {:.0}, bench (relay, downstream) {:.0}; event-sized: broker {:.0}, bench {:.0}",
        relay_cpu[2], relay_cpu[3], sized_cpu[2], sized_cpu[3]
    );
    println!(
        "check: {} IPNs answered 200 ({} failed posts), {} events, {} duplicates, {} missing, {} sequence errors ({} late relay events skipped)",
        posted.ok + posted_live.ok,
        posted.failed + posted_live.failed,
        ledger.events,
        ledger.duplicates,
        accepted.lock().await.len(),
        ledger.sequence_errors,
        ledger.strays
    );
    if ledger.duplicates > 0 || ledger.sequence_errors > 0 || !accepted.lock().await.is_empty() {
        bail!("the events do not match the IPNs answered 200");
    }
    let mut summary = Summary::default();
    let delay = humantime::format_duration(args.paypal_delay);
    summary.row(
        format!(
            "{} worker(s) draining {} IPNs over {} keys, PayPal {delay}, events/s",
            args.workers, args.ipns, args.keys
        ),
        format!("{drain_rate:.0}"),
        format!("relay (consume → republish → ack) {:.0}", relay.rate()),
        Some(drain_rate / relay.rate()),
    );
    summary.row(
        "the same drain against the event-sized relay (the worker's event bytes and headers), events/s"
            .to_owned(),
        format!("{drain_rate:.0}"),
        format!("event-sized relay {:.0}", sized.rate()),
        Some(drain_rate / sized.rate()),
    );
    summary.row(
        format!(
            "worker live at {live_rate:.0} IPN/s, PayPal {delay}, receive → publish p50 / p99 ms"
        ),
        format!("{:.1} / {:.1}", live.ms(0.5), live.ms(0.99)),
        "–".to_owned(),
        None,
    );
    let who = match args.workers {
        1 => "ipn-worker".to_owned(),
        k => format!("{k} ipn-workers together"),
    };
    summary.memory(&format!("{who} (PayPal {delay})"), rss_rest, rss_drain);
    Ok(summary)
}

/// Fills the shard queues with `--ipns` messages shaped as the ingress makes them, then relays
/// them to `<p>.events` (consume, republish with confirm, ack) and times the events downstream.
async fn relay_phase(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &BodySource,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    relayed: Relayed,
) -> anyhow::Result<(Drained, [f64; 4])> {
    let publisher = Publisher::start(&config.amqp, topology.clone(), "bench-relay-publish");
    if !publisher.wait_connected(Duration::from_secs(10)).await {
        bail!("the relay's publisher did not connect");
    }
    fill(args, topology, bodies, &publisher).await?;
    let meter = process_meter(&[]);
    let consume = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let publisher = Arc::new(publisher);
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let unacked = Arc::new(AtomicU64::new(0));
    for shard in 0..topology.shards().get() {
        let channel = consume.create_channel().await?;
        channel
            .basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                topology.shard_queue(shard).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let exchange = topology.events_exchange();
        tokio::spawn(relay(
            consumer,
            Arc::clone(&publisher),
            Arc::clone(&limit),
            Arc::clone(&unacked),
            exchange,
            relayed.clone(),
        ));
    }
    let accepted = Mutex::new((0..args.ipns).collect::<HashSet<u64>>());
    let mut ledger = Ledger {
        relayed: true,
        ..Ledger::default()
    };
    let drained = take_events(arrivals, &accepted, &mut ledger).await?;
    let cpu = meter.per_event(drained.events);
    // Every message was relayed once; let the relays in flight ack before the connection closes
    // (an unacked one goes back to its queue, and the next phase would relay it again).
    let permits = u32::try_from(args.concurrency).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(30), limit.acquire_many(permits))
        .await
        .is_err()
    {
        bail!("the relay's publishes did not finish in 30 s");
    }
    // A delivery not acked goes back to its queue at the close and the next phase relays it
    // again (its event may have reached downstream all the same): a late relay event.
    let unacked = unacked.load(Ordering::Relaxed);
    if unacked > 0 {
        eprintln!(
            "relay: {unacked} deliveries not acked (publish not confirmed, or the ack failed)"
        );
    }
    consume.close(200, "relay done".into()).await?;
    publisher.close().await;
    Ok((drained, cpu))
}

/// Republishes every delivery with a confirm, then acks it; up to `limit` at once. A delivery
/// whose publish was not confirmed (left unacked) or whose ack failed is counted in `unacked`.
async fn relay(
    mut consumer: lapin::Consumer,
    publisher: Arc<Publisher>,
    limit: Arc<Semaphore>,
    unacked: Arc<AtomicU64>,
    exchange: String,
    relayed: Relayed,
) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (publisher, exchange) = (Arc::clone(&publisher), exchange.clone());
        let (relayed, unacked) = (relayed.clone(), Arc::clone(&unacked));
        tokio::spawn(async move {
            let (event, properties) = relayed.event(&delivery.data);
            let message = Outgoing {
                exchange: &exchange,
                routing_key: "subscr_payment.completed",
                body: &event,
                properties,
            };
            let acked = match publisher.publish(message, Duration::from_secs(30)).await {
                Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await.is_ok(),
                Err(_) => false,
            };
            if !acked {
                unacked.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
}

/// What the relay republishes for each body.
#[derive(Debug, Clone)]
enum Relayed {
    /// The issue's ceiling: ~60 bytes of JSON (what the downstream check reads), no headers.
    Minimal,
    /// As much for the broker to carry as the worker's event: the worker's event properties
    /// (`contract::event_properties`) and a body of the same members and size (the form's
    /// fields and its base64), made from the first body once ([`Relayed::event_sized`]) so the
    /// relay spends no more CPU per message than for the minimal one: this stays a ceiling of
    /// the transport, not of building events.
    EventSized {
        /// Everything after the members that vary per message (`txn_id`, `order_key`, ...).
        rest: Arc<Vec<u8>>,
    },
}

impl Relayed {
    /// [`Relayed::EventSized`], its members after the varying ones taken from `body`.
    fn event_sized(body: &[u8]) -> Relayed {
        use base64::Engine;
        let form = ipn_bridge::form::Form::parse(body);
        let fields: serde_json::Map<String, serde_json::Value> = form
            .decoded()
            .into_iter()
            .map(|(name, value)| (name, value.into()))
            .collect();
        let rest = serde_json::json!({
            "schema_version": 2,
            "provider": "paypal",
            "kind": "subscription",
            "status": "completed",
            "amount": form.text("mc_gross"),
            "currency": form.text("mc_currency"),
            "transaction_id": form.text("txn_id"),
            "merchant_order_id": null,
            "txn_type": form.text("txn_type"),
            "payment_status": form.text("payment_status"),
            "test": false,
            "received_at": null,
            "verified_at": null,
            "charset": form.text("charset"),
            "charset_assumed": false,
            "fields": fields,
            "raw_body_base64": base64::engine::general_purpose::STANDARD.encode(body),
        })
        .to_string();
        // `{"schema_version":...}` without its opening brace, to follow the varying members.
        let rest = rest.strip_prefix('{').unwrap_or(&rest).as_bytes().to_vec();
        Relayed::EventSized {
            rest: Arc::new(rest),
        }
    }

    fn event(&self, body: &[u8]) -> (Vec<u8>, BasicProperties) {
        let form = ipn_bridge::form::Form::parse(body);
        let txn_id = form
            .raw("txn_id")
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let seq = txn_id
            .as_deref()
            .and_then(|t| t.strip_prefix('B')?.parse::<u64>().ok())
            .unwrap_or(0);
        let order_key = format!("{RELAY_KEY_PREFIX}{seq}");
        let minimal = serde_json::json!({
            "txn_id": txn_id,
            "order_key": order_key,
            "sequence": 1,
        })
        .to_string();
        match self {
            Relayed::Minimal => (minimal.into_bytes(), BasicProperties::default()),
            Relayed::EventSized { rest } => {
                let event_id =
                    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &seq.to_be_bytes()).to_string();
                let mut event = minimal.into_bytes();
                // `{"txn_id":...,"sequence":1}` + `,"event_id":"..."` + `,` + rest
                event.pop();
                event.extend_from_slice(format!(",\"event_id\":\"{event_id}\",").as_bytes());
                event.extend_from_slice(rest);
                let properties = ipn_bridge::contract::event_properties(&event_id, &order_key, 1);
                (event, properties)
            }
        }
    }
}

/// Publishes `--ipns` messages to `<p>.inbound` as the ingress does, 256 confirms in flight.
async fn fill(
    args: &Args,
    topology: &Topology,
    bodies: &BodySource,
    publisher: &Publisher,
) -> anyhow::Result<()> {
    let exchange = topology.inbound_exchange();
    let started = Instant::now();
    let results = futures_util::stream::iter(0..args.ipns)
        .map(|seq| {
            let body = bodies(seq);
            let key = PayPal.order_key(&body);
            let routing_key = Topology::shard_routing_key(key.shard(topology.shards()));
            let mut headers = FieldTable::default();
            let key = AMQPValue::LongString(LongString::from(key.as_str()));
            headers.insert("x-ipn-order-key".into(), key);
            let properties = BasicProperties::default().with_headers(headers);
            let exchange = exchange.clone();
            async move {
                let message = Outgoing {
                    exchange: &exchange,
                    routing_key: &routing_key,
                    body: &body,
                    properties,
                };
                publisher.publish(message, Duration::from_secs(30)).await
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of the relay's inbound messages were not confirmed");
    }
    eprintln!("filled {} messages in {:?}", args.ipns, started.elapsed());
    Ok(())
}

/// `--workers` real `ipn-worker` binaries for this run's broker, database and fake PayPal, with
/// the run's concurrency, prefetch and database connections. With more than one, each is
/// registered as alive first (as its own first heartbeat would), so each owns its share of the
/// shards from the start instead of all of them until the next heartbeat.
async fn start_workers(
    args: &Args,
    config: &Config,
    database_url: &str,
    paypal: &FakePaypal,
) -> anyhow::Result<Vec<ChildProcess>> {
    let ids: Vec<String> = (0..args.workers)
        .map(|i| format!("bench-worker-{i}"))
        .collect();
    if ids.len() > 1 {
        let store = Store::connect(&config.database).await?;
        for id in &ids {
            store.heartbeat(id, "bench").await?;
        }
        store.close().await;
    }
    let starts = ids.iter().map(|id| {
        let settings = [
            (
                "IPN_DATABASE__MAX_CONNECTIONS",
                args.db_connections.to_string(),
            ),
            ("IPN_WORKER__CONCURRENCY", args.concurrency.to_string()),
            ("IPN_WORKER__PREFETCH", args.prefetch.to_string()),
            ("IPN_WORKER__ID", id.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        async move {
            support::start_worker(config, database_url, paypal.url().as_ref(), &settings).await
        }
    });
    futures_util::future::try_join_all(starts).await
}

/// The workers' resident memory together.
fn total_rss(workers: &[ChildProcess]) -> Option<u64> {
    workers.iter().map(ChildProcess::rss_kib).sum()
}

/// CPU time of the workers (none for the relay), PostgreSQL, the broker and this process over
/// one phase; [`CpuMeter::per_event`] gives them in that order.
fn process_meter(workers: &[ChildProcess]) -> CpuMeter<4> {
    CpuMeter::of([
        Party::Processes(workers.iter().map(|w| w.child.id()).collect()),
        Party::Postgres,
        Party::process(support::broker_pid()),
        Party::process(Some(std::process::id())),
    ])
}
