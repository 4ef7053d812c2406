//! Ingress throughput and latency beside its ceiling, measured in one run.
//!
//! ```sh
//! cargo bench --bench bridge -- ingress --concurrency 256 --seconds 30
//! ```
//! 1. rounds (`--rounds`, default 3) of two phases, in alternating order, each on freshly
//!    declared queues:
//!    - raw: a plain lapin publisher with confirms (one connection, the same number of channels
//!      as the ingress) publishes the same messages (bodies, and with `--raw-properties ingress`,
//!      the default, the properties the ingress sets) to the same queues at the same concurrency;
//!    - ingress: the real `ipn-ingress` binary (a child process) gets HTTP POSTs at that
//!      concurrency; every message of every `200` is then read back from the shard queues;
//! 2. paced, for the latency under a steady load: the raw publisher, then the ingress, each
//!    paced to half the ingress's median rate (`--paced-percent`) for `--paced-seconds` on fresh
//!    queues, and the same read-back. The raw side is the latency the broker gives at that rate
//!    with no HTTP in front of it: the floor the ingress's p99 is read against.
//!
//! The ratio is the median of the rounds' ratios. Needs RabbitMQ on 127.0.0.1:5672
//! (guest/guest). Uses a unique topology prefix in vhost `/` and deletes its queues and
//! exchange at the end.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use ipn_bridge::config::Config;
use ipn_bridge::ingress;
use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::Provider;
use ipn_bridge::topology::Topology;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::samples_dir;
use crate::support::{self, Summary};

/// The content type the load generator posts with, and the raw publisher sets.
const FORM: &str = "application/x-www-form-urlencoded";
use crate::support::{
    CpuMeter, Length, Phase, Tickets, broker_wal_size, collect, cores, histogram, http_phase,
    record,
};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Requests (or publishes) in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds each full-rate phase runs. At full rate the broker rolls its log over every
    /// 20-30 s, and each rollover slows confirms for several seconds; a 30 s phase takes in one
    /// or two, so each side pays its share (10 s phases took in none or part of one, and their
    /// ratios spread over 20 points).
    #[arg(long, default_value_t = 30)]
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
    /// Seconds the paced phase runs: long enough to take in the broker's log rollovers
    /// (one per 512 MiB written, about every 40 s at 10k msg/s), which stall confirms for a
    /// few seconds each; a shorter window either misses them or is dominated by one.
    #[arg(long, default_value_t = 60)]
    paced_seconds: u64,
    /// The paced phase's rate, in percent of the ingress's median full rate (the target is
    /// stated at 50; other shares show how the latency moves with the load).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    paced_percent: u8,
    /// Rounds of one raw and one ingress phase (alternating which goes first); the figures are
    /// their medians.
    #[arg(long, default_value = "3")]
    rounds: std::num::NonZeroU16,
    /// Pause after renewing the queues before each phase, for the broker to finish deleting
    /// the old ones.
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
    topology.declare(&connection).await?;

    let result = run(args, &config, &topology, &bodies, &connection).await;
    support::cleanup(&connection, &topology, &[]).await?;
    result
}

/// Which side a phase of a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Raw,
    Ingress,
}

async fn run(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &Arc<Bodies>,
    connection: &Connection,
) -> anyhow::Result<Summary> {
    let duration = Duration::from_secs(args.seconds);
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let (mut ingress, url) = support::start_ingress(config, &[]).await?;
    let source = {
        let bodies = Arc::clone(bodies);
        support::paypal_posts(&(Arc::new(move |seq| bodies.get(seq)) as support::BodySource))
    };
    let rss_rest = ingress.rss_kib();
    let mut rss_load = None;
    let mut missing = 0;
    // Rounds of one raw and one ingress phase, in alternating order, each phase on freshly
    // declared queues: neither side inherits the other's log, and a drift of the machine over
    // the run weighs on both sides alike.
    let mut rounds = Vec::new();
    for round in 0..args.rounds.get() {
        let order = if round % 2 == 0 {
            [Side::Raw, Side::Ingress]
        } else {
            [Side::Ingress, Side::Raw]
        };
        let (mut raw, mut full) = (None, None);
        for side in order {
            fresh_queues(connection, topology).await?;
            tokio::time::sleep(args.settle).await;
            match side {
                Side::Raw => {
                    let plan = RawPlan {
                        name: "raw lapin publisher",
                        duration,
                        rate: None,
                        series: round,
                    };
                    raw = Some(
                        raw_publisher(args, config, topology, bodies, connection, plan).await?,
                    );
                }
                Side::Ingress => {
                    let meter = CpuMeter::start(Some(ingress.child.id()));
                    let mut phase = http_phase(
                        "ingress",
                        args.concurrency,
                        None,
                        &url,
                        &source,
                        &accepted,
                        u64::from(round) * 100_000_000,
                        Length::Time(duration),
                    )
                    .await?;
                    phase.cpu = meter.per_event(phase.ok);
                    rss_load = rss_load.max(ingress.rss_kib());
                    missing += missing_from_queues(connection, topology, &accepted).await?;
                    full = Some(phase);
                }
            }
        }
        let (Some(raw), Some(full)) = (raw, full) else {
            unreachable!("each round runs both sides");
        };
        rounds.push(Round { raw, full });
    }
    // The paced pair: the raw publisher, then the ingress, at the same rate, each on fresh
    // queues. The raw side is the latency the broker gives at that rate without HTTP.
    let pace = median(rounds.iter().map(|r| r.full.rate())) * f64::from(args.paced_percent) / 100.0;
    let paced_duration = Duration::from_secs(args.paced_seconds);
    fresh_queues(connection, topology).await?;
    tokio::time::sleep(args.settle).await;
    let plan = RawPlan {
        name: "raw lapin publisher, paced",
        duration: paced_duration,
        rate: Some(pace),
        series: args.rounds.get(),
    };
    let raw = raw_publisher(args, config, topology, bodies, connection, plan).await?;
    fresh_queues(connection, topology).await?;
    tokio::time::sleep(args.settle).await;
    let meter = CpuMeter::start(Some(ingress.child.id()));
    let mut full = http_phase(
        "ingress, paced",
        args.concurrency,
        Some(pace),
        &url,
        &source,
        &accepted,
        50_000_000_000,
        Length::Time(paced_duration),
    )
    .await?;
    full.cpu = meter.per_event(full.ok);
    ingress.stop()?;
    missing += missing_from_queues(connection, topology, &accepted).await?;
    let paced = Round { raw, full };
    report(args, &rounds, &paced, missing, rss_rest, rss_load)
}

/// How the paced phase's rate is named: "half rate", or the share of the full rate.
fn paced_share(args: &Args) -> String {
    match args.paced_percent {
        50 => "half rate".to_owned(),
        percent => format!("{percent}% of its rate"),
    }
}

/// One raw phase and one ingress phase, run back to back (at full rate, or both paced to the
/// same rate).
struct Round {
    raw: Phase,
    full: Phase,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.full.rate() / self.raw.rate()
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Deletes the shard queues (and the rest of the topology's queues) and declares them again,
/// so a phase starts on queues with no log behind them. The ingress keeps its channels: only
/// queues go, and the declaration binds the new ones to the same exchange.
async fn fresh_queues(connection: &Connection, topology: &Topology) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    for queue in topology.queues() {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    channel.close(200, "queues deleted".into()).await?;
    topology.declare(connection).await?;
    Ok(())
}

/// Prints every phase, checks the read-back, and returns the headline figures.
fn report(
    args: &Args,
    rounds: &[Round],
    paced: &Round,
    missing: usize,
    rss_rest: Option<u64>,
    rss_load: Option<u64>,
) -> anyhow::Result<Summary> {
    println!(
        "\nmachine: {} cores; broker WAL {}; concurrency {}; {} s per phase, {} s at {}; {} shards; {} rounds",
        cores(),
        broker_wal_size(),
        args.concurrency,
        args.seconds,
        args.paced_seconds,
        paced_share(args),
        args.shards,
        rounds.len()
    );
    println!(
        "| round | phase | msg/s | ok | failed | p50 ms | p99 ms | p99.9 ms | CPU µs/msg broker / ingress / load |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (number, round) in rounds.iter().enumerate() {
        println!("| {} {}", number + 1, round.raw.row());
        println!("| {} {}", number + 1, round.full.row());
    }
    println!("| – {}", paced.raw.row());
    println!("| – {}", paced.full.row());
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.0}%", 100.0 * r.ratio()))
        .collect();
    let ratio = median(rounds.iter().map(Round::ratio));
    println!(
        "\ningress / raw by round: {}; median {:.0}%",
        ratios.join(", "),
        100.0 * ratio
    );
    println!(
        "ingress RSS: {} KiB at rest, {} KiB under load",
        rss_rest.unwrap_or(0),
        rss_load.unwrap_or(0)
    );
    let answered: u64 = rounds.iter().map(|r| r.full.ok).sum::<u64>() + paced.full.ok;
    println!("check: {answered} answers 200, {missing} of them missing from the queues");
    if missing > 0 {
        bail!("{missing} messages answered 200 are not in the queues");
    }
    let merged = |side: fn(&Round) -> &Phase| {
        let mut latency = histogram();
        for round in rounds {
            // Same bounds on both sides: adding cannot fail.
            let _ = latency.add(&side(round).latency);
        }
        latency
    };
    let ms = |latency: &Histogram<u64>| {
        let at = |q| latency.value_at_quantile(q) as f64 / 1000.0;
        format!("{:.1} / {:.1} / {:.1}", at(0.5), at(0.99), at(0.999))
    };
    let mut summary = Summary::default();
    summary.row(
        format!(
            "ingress at concurrency {}, msg/s (median of {} rounds)",
            args.concurrency,
            rounds.len()
        ),
        format!("{:.0}", median(rounds.iter().map(|r| r.full.rate()))),
        format!(
            "raw lapin publisher ({:?} properties) {:.0}",
            args.raw_properties,
            median(rounds.iter().map(|r| r.raw.rate()))
        ),
        Some(ratio),
    );
    summary.row(
        "ingress p50 / p99 / p99.9 ms (all rounds)".to_owned(),
        ms(&merged(|r| &r.full)),
        format!("raw publisher {}", ms(&merged(|r| &r.raw))),
        None,
    );
    summary.row(
        format!(
            "ingress at {} ({:.0} msg/s), p50 / p99 / p99.9 ms",
            paced_share(args),
            paced.full.rate()
        ),
        ms(&paced.full.latency),
        format!(
            "raw publisher at {:.0} msg/s {}",
            paced.raw.rate(),
            ms(&paced.raw.latency)
        ),
        None,
    );
    summary.memory("ipn-ingress", rss_rest, rss_load);
    Ok(summary)
}

/// One phase of the raw publisher.
struct RawPlan {
    name: &'static str,
    duration: Duration,
    /// Messages per second, shared by all publishers; `None`: each publishes as soon as its
    /// previous message is confirmed.
    rate: Option<f64>,
    /// Keeps this phase's sequence numbers apart from other phases' (the round's number).
    series: u16,
}

/// Publishes from `--concurrency` tasks over the ingress's number of confirm-mode channels for
/// the plan's duration; returns the phase with the CPU it cost.
async fn raw_publisher(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &Arc<Bodies>,
    connection: &Connection,
    plan: RawPlan,
) -> anyhow::Result<Phase> {
    let meter = CpuMeter::start(None);
    let mut channels = Vec::new();
    for _ in 0..config.amqp.publisher_channels.get() {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let (pacer, tickets) = support::pacer(plan.rate);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let (stop, bodies, topology) = (Arc::clone(&stop), Arc::clone(bodies), topology.clone());
        // Raw sequence numbers live above 1e12 so they never collide with the HTTP phases.
        let base = 1_000_000_000_000
            + worker as u64 * 1_000_000_000
            + u64::from(plan.series) * 100_000_000;
        tasks.push(tokio::spawn(raw_worker(
            channel,
            topology,
            bodies,
            stop,
            base,
            args.raw_properties,
            tickets.clone(),
        )));
    }
    tokio::time::sleep(plan.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase = collect(plan.name, tasks, started).await?;
    if let Some(pacer) = pacer {
        pacer.abort();
    }
    phase.cpu = meter.per_event(phase.ok);
    Ok(phase)
}

async fn raw_worker(
    channel: Channel,
    topology: Topology,
    bodies: Arc<Bodies>,
    stop: Arc<AtomicBool>,
    base: u64,
    raw_properties: RawProperties,
    tickets: Option<Tickets>,
) -> (u64, u64, Histogram<u64>) {
    let mut latency = histogram();
    let (mut ok, mut failed) = (0, 0);
    let exchange = topology.inbound_exchange();
    let mut seq = base;
    while !stop.load(Ordering::Relaxed) {
        if !support::ticket(tickets.as_ref()).await {
            continue;
        }
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
            RawProperties::Ingress => ingress::inbound_properties(
                PayPal.name(),
                FORM.into(),
                key.as_str(),
                &uuid::Uuid::now_v7().to_string(),
                std::time::SystemTime::now(),
            ),
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
