//! Ingress throughput and latency beside its ceiling, measured in one run.
//!
//! ```sh
//! cargo bench --bench ingress -- --concurrency 256 --seconds 10
//! ```
//! 1. raw: a plain lapin publisher with confirms (one connection, the same number of channels
//!    as the ingress) publishes the same bodies to the same queues at the same concurrency;
//! 2. ingress: the real `ipn-ingress` binary (a child process) gets HTTP POSTs at that
//!    concurrency;
//! 3. paced: the ingress again at half the rate it reached, for its latency under that load;
//! 4. check: every message of every `200` is read back from the shard queues.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Uses a unique topology prefix in vhost `/`
//! and deletes its queues and exchange at the end.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use ipn_bridge::config::Config;
use ipn_bridge::ipn::PayPal;
use ipn_bridge::provider::Provider;
use ipn_bridge::topology::Topology;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

#[path = "../tests/samples.rs"]
mod samples_dir;

#[derive(Parser, Debug, Clone)]
struct Args {
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
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    ok: u64,
    failed: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// CPU microseconds per confirmed message: broker, ingress, this process (load generator).
    cpu: [f64; 3],
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn row(&self) -> String {
        format!(
            "| {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} / {:.0} / {:.0} |",
            self.name,
            self.rate(),
            self.ok,
            self.failed,
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.cpu[0],
            self.cpu[1],
            self.cpu[2]
        )
    }
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

// One thread for the load generator: it shares the two cores with the broker and the ingress,
// and should take as little of them as it can.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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

    let result = run(&args, &config, &topology, &bodies, &connection).await;
    cleanup(&connection, &topology).await?;
    result
}

async fn run(
    args: &Args,
    config: &Config,
    topology: &Topology,
    bodies: &Arc<Bodies>,
    connection: &Connection,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let meter = CpuMeter::start(None);
    let mut raw = raw_publisher(args, config, topology, bodies, connection, duration).await?;
    raw.cpu = meter.per_message(raw.ok);
    read_back(connection, topology).await?;
    // Emptying the queues leaves the broker compacting its log for a few seconds; let that
    // finish so it does not land in the ingress's latency figures.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let mut ingress = IngressProcess::start(config, topology).await?;
    let rss_rest = ingress.rss_kib();
    let meter = CpuMeter::start(Some(ingress.child.id()));
    let mut full = http_phase(
        "ingress",
        args.concurrency,
        None,
        &ingress.url,
        bodies,
        &accepted,
        duration,
    )
    .await?;
    full.cpu = meter.per_message(full.ok);
    let rss_load = ingress.rss_kib();
    // Check this phase's messages now, so the next one starts with empty, settled queues.
    let mut missing = missing_from_queues(connection, topology, &accepted).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let half = full.rate() / 2.0;
    let meter = CpuMeter::start(Some(ingress.child.id()));
    let mut paced = http_phase(
        "ingress at half rate",
        args.concurrency,
        Some(half),
        &ingress.url,
        bodies,
        &accepted,
        duration,
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
    Ok(())
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
        tasks.push(tokio::spawn(raw_worker(
            channel, topology, bodies, stop, base,
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
) -> (u64, u64, Histogram<u64>) {
    let mut latency = histogram();
    let (mut ok, mut failed) = (0, 0);
    let exchange = topology.inbound_exchange();
    let mut seq = base;
    while !stop.load(Ordering::Relaxed) {
        let body = bodies.get(seq);
        seq += 1;
        let shard = PayPal.order_key(&body).shard(topology.shards());
        let started = Instant::now();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let properties = BasicProperties::default().with_delivery_mode(2);
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

async fn http_phase(
    name: &'static str,
    concurrency: usize,
    rate: Option<f64>,
    url: &str,
    bodies: &Arc<Bodies>,
    accepted: &Arc<Mutex<HashSet<u64>>>,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let (pacer, tickets) = pacer(rate.map(|r| r.max(1.0)));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sequence = Arc::new(std::sync::atomic::AtomicU64::new(if rate.is_some() {
        500_000_000
    } else {
        0
    }));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let worker = HttpWorker {
            address: address.clone(),
            bodies: Arc::clone(bodies),
            accepted: Arc::clone(accepted),
            stop: Arc::clone(&stop),
            sequence: Arc::clone(&sequence),
            tickets: tickets.clone(),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(pacer) = pacer {
        pacer.abort();
    }
    collect(name, tasks, started).await
}

/// With a rate, a pacer hands out one ticket per interval; without, tickets are not used.
fn pacer(rate: Option<f64>) -> (Option<tokio::task::JoinHandle<()>>, Option<Tickets>) {
    let Some(rate) = rate else {
        return (None, None);
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let pacer = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            interval.tick().await;
            if sender.send(()).await.is_err() {
                return;
            }
        }
    });
    (Some(pacer), Some(Arc::new(Mutex::new(receiver))))
}

/// Permission to send one request, shared by the workers of a paced phase.
type Tickets = Arc<Mutex<tokio::sync::mpsc::Receiver<()>>>;

struct HttpWorker {
    address: String,
    bodies: Arc<Bodies>,
    accepted: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    sequence: Arc<std::sync::atomic::AtomicU64>,
    tickets: Option<Tickets>,
}

impl HttpWorker {
    /// One keep-alive HTTP/1.1 connection (hyper's low-level client: a load generator as light
    /// as we can make it, since it shares the two cores with the ingress and the broker).
    async fn run(self) -> (u64, u64, Histogram<u64>) {
        let mut latency = histogram();
        let (mut ok, mut failed) = (0, 0);
        let mut mine = Vec::new();
        let mut sender = None;
        while !self.stop.load(Ordering::Relaxed) {
            if let Some(tickets) = &self.tickets {
                let ticket = tokio::time::timeout(Duration::from_millis(200), async {
                    tickets.lock().await.recv().await
                })
                .await;
                if !matches!(ticket, Ok(Some(()))) {
                    continue;
                }
            }
            if sender.is_none() {
                sender = self.connect().await;
            }
            let Some(connection) = sender.as_mut() else {
                failed += 1;
                continue;
            };
            let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
            let request = hyper::Request::post("/ipn")
                .header("host", self.address.as_str())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    self.bodies.get(seq),
                )));
            let started = Instant::now();
            let response = match request {
                Ok(request) => connection.send_request(request).await.ok(),
                Err(_) => None,
            };
            let status = match response {
                Some(response) => {
                    let status = response.status();
                    let drained = http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .is_ok();
                    drained.then_some(status)
                }
                None => None,
            };
            record(&mut latency, started);
            if status == Some(hyper::StatusCode::OK) {
                ok += 1;
                mine.push(seq);
            } else {
                failed += 1;
                sender = None;
            }
        }
        self.accepted.lock().await.extend(mine);
        (ok, failed, latency)
    }

    async fn connect(
        &self,
    ) -> Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&self.address).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await.ok()?;
        tokio::spawn(connection);
        Some(sender)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

fn record(histogram: &mut Histogram<u64>, started: Instant) {
    let micros = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
    histogram.saturating_record(micros);
}

async fn collect(
    name: &'static str,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, Histogram<u64>)>>,
    started: Instant,
) -> anyhow::Result<Phase> {
    let mut phase = Phase {
        name,
        ok: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latency: histogram(),
        cpu: [0.0; 3],
    };
    for task in tasks {
        let (ok, failed, latency) = task.await?;
        phase.ok += ok;
        phase.failed += failed;
        phase.latency.add(&latency)?;
    }
    phase.elapsed = started.elapsed();
    eprintln!("{name}: {:.0} msg/s", phase.rate());
    Ok(phase)
}

/// The real `ipn-ingress` binary as a child process.
struct IngressProcess {
    child: Child,
    url: String,
}

impl IngressProcess {
    async fn start(config: &Config, topology: &Topology) -> anyhow::Result<IngressProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_ipn-ingress"))
            .env("IPN_AMQP__URL", config.amqp.url.uri().to_string())
            .env("IPN_TOPOLOGY__PREFIX", &config.topology.prefix)
            .env("IPN_TOPOLOGY__SHARDS", topology.shards().to_string())
            .env("IPN_INGRESS__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .envs(
                std::env::vars()
                    .filter(|(k, _)| k.starts_with("BENCH_INGRESS_"))
                    .map(|(k, v)| (k.trim_start_matches("BENCH_INGRESS_").to_owned(), v)),
            )
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start ipn-ingress")?;
        let ingress = IngressProcess {
            child,
            url: format!("http://127.0.0.1:{port}/ipn"),
        };
        let ready = format!("http://127.0.0.1:{port}/readyz");
        for _ in 0..300 {
            if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                return Ok(ingress);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("ipn-ingress did not become ready in 30 s")
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("ipn-ingress exited with {status}");
        }
        Ok(())
    }
}

impl Drop for IngressProcess {
    fn drop(&mut self) {
        // Already reaped when stop() ran; otherwise make sure no process outlives the bench.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

async fn cleanup(connection: &Connection, topology: &Topology) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    for queue in topology.queues() {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(
            topology.inbound_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time used by the broker, the ingress and this process over one phase.
struct CpuMeter {
    pids: [Option<u32>; 3],
    start: [f64; 3],
}

impl CpuMeter {
    fn start(ingress: Option<u32>) -> CpuMeter {
        let pids = [broker_pid(), ingress, Some(std::process::id())];
        CpuMeter {
            pids,
            start: pids.map(cpu_seconds),
        }
    }

    fn per_message(&self, messages: u64) -> [f64; 3] {
        let end = self.pids.map(cpu_seconds);
        std::array::from_fn(|i| (end[i] - self.start[i]) * 1e6 / messages.max(1) as f64)
    }
}

/// The local RabbitMQ's Erlang VM, if it runs on this machine.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s, Linux's USER_HZ).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let read = || -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    };
    read().unwrap_or(0.0)
}
