//! Ingress throughput and latency beside its ceiling, measured in one run.
//!
//! ```sh
//! cargo bench --bench bridge -- ingress --concurrency 256 --seconds 10
//! ```
//! 1. raw: a plain lapin publisher with confirms (one connection, the same number of channels
//!    as the ingress) publishes the same messages (bodies, and with `--raw-properties ingress`,
//!    the default, the properties the ingress sets) to the same queues at the same concurrency;
//! 2. ingress: the real `ipn-ingress` binary (a child process) gets HTTP POSTs at that
//!    concurrency;
//! 3. paced: the ingress again at half the rate it reached, for its latency under that load;
//! 4. check: every message of every `200` is read back from the shard queues.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Uses a unique topology prefix in vhost `/`
//! and deletes its queues and exchange at the end.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use ipn_bridge::config::Config;
use ipn_bridge::ingress;
use ipn_bridge::ipn::PayPal;
use ipn_bridge::provider::Provider;
use ipn_bridge::topology::Topology;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::samples_dir;
use crate::support::{self, Summary};

/// The content type the load generator posts with, and the raw publisher sets.
const FORM: &str = "application/x-www-form-urlencoded";
use crate::support::{CpuMeter, Length, Phase, collect, cores, histogram, http_phase, record};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Requests (or publishes) in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Shard queues.
    #[arg(long, default_value_t = 32)]
    shards: u16,
    /// Broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The raw publisher's message properties: `ingress` (the same message the ingress publishes:
    /// content type, message id, timestamp, app id and the x-ipn-* headers) or `minimal`
    /// (persistent only, the ceiling of the bare body; the figures before 2026-11-24 used it).
    #[arg(long, value_enum, default_value_t = RawProperties::Ingress)]
    raw_properties: RawProperties,
    /// Pause after emptying the queues between phases, for the broker to finish compacting its
    /// log.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

/// What the raw publisher puts in each message's properties.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawProperties {
    /// The same properties the ingress sets.
    Ingress,
    /// Delivery mode only.
    Minimal,
}

/// Sample bodies, each made unique by a trailing `bench_seq` field the order key ignores.
struct Bodies {
    samples: Vec<Vec<u8>>,
}

impl Bodies {
    fn load() -> Bodies {
        let samples = samples_dir::samples()
            .into_iter()
            .map(|(_, body)| body)
            .collect();
        Bodies { samples }
    }

    fn get(&self, seq: u64) -> Vec<u8> {
        let mut body = self.samples[(seq as usize) % self.samples.len()].clone();
        body.extend_from_slice(format!("&bench_seq={seq}").as_bytes());
        body
    }
}

fn seq_of(body: &[u8]) -> Option<u64> {
    let at = body.windows(11).rposition(|w| w == b"&bench_seq=")?;
    std::str::from_utf8(&body[at + 11..]).ok()?.parse().ok()
}

/// Runs the three phases and the check; prints their table; returns the headline figures.
pub fn bench(args: &Args) -> anyhow::Result<Summary> {
    // One thread for the load generator: it shares the two cores with the broker and the
    // ingress, and should take as little of them as it can.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(bench_in_runtime(args))
}

async fn bench_in_runtime(args: &Args) -> anyhow::Result<Summary> {
    let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let mut config = Config::default();
    config.amqp.url = args.amqp.parse().map_err(anyhow::Error::msg)?;
    config.topology.prefix = prefix.clone();
    config.topology.shards = std::num::NonZeroU16::new(args.shards).context("shards > 0")?;
    let topology = Topology::new(&config.topology);
    let bodies = Arc::new(Bodies::load());
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    topology
        .declare(&connection.create_channel().await?)
        .await?;

    let result = run(args, &config, &topology, &bodies, &connection).await;
    support::cleanup(&connection, &topology, &[]).await?;
    result
}

async fn run(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &Arc<Bodies>,
    connection: &Connection,
) -> anyhow::Result<Summary> {
    let duration = Duration::from_secs(args.seconds);
    let meter = CpuMeter::start(None);
    let mut raw = raw_publisher(args, config, topology, bodies, connection, duration).await?;
    raw.cpu = meter.per_message(raw.ok);
    read_back(connection, topology).await?;
    // Emptying the queues leaves the broker compacting its log for a few seconds; let that
    // finish so it does not land in the ingress's latency figures.
    tokio::time::sleep(args.settle).await;
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let (mut ingress, url) = support::start_ingress(config).await?;
    let source: support::BodySource = {
        let bodies = Arc::clone(bodies);
        Arc::new(move |seq| bodies.get(seq))
    };
    let rss_rest = ingress.rss_kib();
    let meter = CpuMeter::start(Some(ingress.child.id()));
    let mut full = http_phase(
        "ingress",
        args.concurrency,
        None,
        &url,
        &source,
        &accepted,
        0,
        Length::Time(duration),
    )
    .await?;
    full.cpu = meter.per_message(full.ok);
    let rss_load = ingress.rss_kib();
    // Check this phase's messages now, so the next one starts with empty, settled queues.
    let mut missing = missing_from_queues(connection, topology, &accepted).await?;
    tokio::time::sleep(args.settle).await;
    let half = full.rate() / 2.0;
    let meter = CpuMeter::start(Some(ingress.child.id()));
    let mut paced = http_phase(
        "ingress at half rate",
        args.concurrency,
        Some(half),
        &url,
        &source,
        &accepted,
        500_000_000,
        Length::Time(duration),
    )
    .await?;
    paced.cpu = meter.per_message(paced.ok);
    ingress.stop()?;
    missing += missing_from_queues(connection, topology, &accepted).await?;

    println!(
        "\nmachine: {} cores; concurrency {}; {} s per phase; {} shards",
        cores(),
        args.concurrency,
        args.seconds,
        args.shards
    );
    println!(
        "| phase | msg/s | ok | failed | p50 ms | p99 ms | p99.9 ms | CPU µs/msg broker / ingress / load |\n|---|---|---|---|---|---|---|---|"
    );
    for phase in [&raw, &full, &paced] {
        println!("{}", phase.row());
    }
    println!("\ningress / raw: {:.0}%", 100.0 * full.rate() / raw.rate());
    println!(
        "ingress RSS: {} KiB at rest, {} KiB under load",
        rss_rest.unwrap_or(0),
        rss_load.unwrap_or(0)
    );
    println!(
        "check: {} answers 200, {missing} of them missing from the queues",
        full.ok + paced.ok
    );
    if missing > 0 {
        bail!("{missing} messages answered 200 are not in the queues");
    }
    let mut summary = Summary::default();
    let ms = |phase: &Phase| {
        format!(
            "{:.1} / {:.1} / {:.1}",
            phase.ms(0.5),
            phase.ms(0.99),
            phase.ms(0.999)
        )
    };
    summary.row(
        format!("ingress at concurrency {}, msg/s", args.concurrency),
        format!("{:.0}", full.rate()),
        format!(
            "raw lapin publisher ({:?} properties) {:.0}",
            args.raw_properties,
            raw.rate()
        ),
        Some(full.rate() / raw.rate()),
    );
    summary.row(
        "ingress p50 / p99 / p99.9 ms".to_owned(),
        ms(&full),
        format!("raw publisher {}", ms(&raw)),
        None,
    );
    summary.row(
        format!(
            "ingress at half rate ({:.0} msg/s), p50 / p99 / p99.9 ms",
            paced.rate()
        ),
        ms(&paced),
        "–".to_owned(),
        None,
    );
    summary.memory("ipn-ingress", rss_rest, rss_load);
    Ok(summary)
}

async fn raw_publisher(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &Arc<Bodies>,
    connection: &Connection,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let mut channels = Vec::new();
    for _ in 0..config.amqp.publisher_channels.get() {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let (stop, bodies, topology) = (Arc::clone(&stop), Arc::clone(bodies), topology.clone());
        // Raw sequence numbers live above 1e12 so they never collide with the HTTP phases.
        let base = 1_000_000_000_000 + worker as u64 * 1_000_000_000;
        let raw_properties = args.raw_properties;
        tasks.push(tokio::spawn(raw_worker(
            channel,
            topology,
            bodies,
            stop,
            base,
            raw_properties,
        )));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    collect("raw lapin publisher", tasks, started).await
}

async fn raw_worker(
    channel: Channel,
    topology: Topology,
    bodies: Arc<Bodies>,
    stop: Arc<AtomicBool>,
    base: u64,
    raw_properties: RawProperties,
) -> (u64, u64, Histogram<u64>) {
    let mut latency = histogram();
    let (mut ok, mut failed) = (0, 0);
    let exchange = topology.inbound_exchange();
    let mut seq = base;
    while !stop.load(Ordering::Relaxed) {
        let body = bodies.get(seq);
        seq += 1;
        let started = Instant::now();
        let key = PayPal.order_key(&body);
        let shard = key.shard(topology.shards());
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let properties = match raw_properties {
            RawProperties::Ingress => {
                ingress::inbound_properties(PayPal.name(), FORM.into(), key.as_str())
            }
            RawProperties::Minimal => BasicProperties::default(),
        }
        .with_delivery_mode(2);
        let routing_key = Topology::shard_routing_key(shard);
        let sent = channel
            .basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                options,
                &body,
                properties,
            )
            .await;
        let confirmed = match sent {
            Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(None))),
            Err(_) => false,
        };
        record(&mut latency, started);
        if confirmed { ok += 1 } else { failed += 1 }
    }
    (ok, failed, latency)
}

/// Reads the queues back and counts the accepted messages that are not there; forgets them.
async fn missing_from_queues(
    connection: &Connection,
    topology: &Topology,
    accepted: &Mutex<HashSet<u64>>,
) -> anyhow::Result<usize> {
    let queued = read_back(connection, topology).await?;
    let mut accepted = accepted.lock().await;
    let missing = accepted.iter().filter(|seq| !queued.contains(seq)).count();
    accepted.clear();
    Ok(missing)
}

/// Reads every message of every shard queue and returns their `bench_seq` numbers.
async fn read_back(connection: &Connection, topology: &Topology) -> anyhow::Result<HashSet<u64>> {
    let channel = connection.create_channel().await?;
    let mut seen = HashSet::new();
    for shard in 0..topology.shards().get() {
        let name = topology.shard_queue(shard);
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let count = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        if count == 0 {
            continue;
        }
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut consumer = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await?;
        for _ in 0..count {
            let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .context("queue read-back stalled")?
                .context("consumer closed")??;
            seen.extend(seq_of(&delivery.data));
        }
        channel
            .basic_cancel(consumer.tag(), Default::default())
            .await?;
    }
    Ok(seen)
}
