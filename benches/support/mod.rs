//! What the benchmarks share: HTTP load phases, latency histograms, child processes of our
//! binaries, and CPU accounting from /proc.

#![allow(dead_code)] // each bench uses part of it

pub mod events;
pub mod steps;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use ipn_bridge::config::Config;
use ipn_bridge::topology::Topology;
use lapin::Connection;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use tokio::sync::Mutex;

/// The body of request number `seq`.
pub type BodySource = Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

/// One request of a load phase: where it goes, as what, with which headers.
#[derive(Clone)]
pub struct Post {
    pub path: &'static str,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// Request number `seq`.
pub type PostSource = Arc<dyn Fn(u64) -> Post + Send + Sync>;

/// PayPal's requests: each body of `bodies` as a form POST to `/ipn`.
pub fn paypal_posts(bodies: &BodySource) -> PostSource {
    let bodies = Arc::clone(bodies);
    Arc::new(move |seq| Post {
        path: "/ipn",
        content_type: "application/x-www-form-urlencoded",
        headers: Vec::new(),
        body: bodies(seq),
    })
}

/// Requests made in advance (signing one takes longer than sending it): request `seq` is
/// `posts[seq - first]`; a phase must not ask beyond them.
pub fn prepared_posts(posts: Vec<Post>, first: u64) -> PostSource {
    let posts = Arc::new(posts);
    Arc::new(move |seq| posts[(seq - first) as usize].clone())
}

/// What one phase measured.
pub struct Phase {
    pub name: &'static str,
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// CPU microseconds per confirmed message: broker, ingress, this process (load generator).
    pub cpu: [f64; 3],
}

impl Phase {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn row(&self) -> String {
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

/// How many requests a phase sends: for a time, or a fixed number.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    /// Until this much time has passed.
    Time(Duration),
    /// Exactly this many requests (sequence numbers `first..first + n`).
    Count(u64),
}

/// POSTs requests to `url`'s host from `concurrency` keep-alive connections, paced to `rate`
/// when given, numbering them from `first`; the numbers of the requests answered 200 go into
/// `accepted`.
#[allow(clippy::too_many_arguments)]
pub async fn http_phase(
    name: &'static str,
    concurrency: usize,
    rate: Option<f64>,
    url: &str,
    posts: &PostSource,
    accepted: &Arc<Mutex<HashSet<u64>>>,
    first: u64,
    length: Length,
) -> anyhow::Result<Phase> {
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let (pacer, tickets) = pacer(rate);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sequence = Arc::new(AtomicU64::new(first));
    let last = match length {
        Length::Count(n) => first + n,
        Length::Time(_) => u64::MAX,
    };
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let worker = HttpWorker {
            address: address.clone(),
            posts: Arc::clone(posts),
            accepted: Arc::clone(accepted),
            stop: Arc::clone(&stop),
            sequence: Arc::clone(&sequence),
            last,
            tickets: tickets.clone(),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    if let Length::Time(duration) = length {
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
    }
    let phase = collect(name, tasks, started).await;
    if let Some(pacer) = pacer {
        pacer.abort();
    }
    phase
}

/// With a rate, a pacer hands out one ticket per interval; without, tickets are not used.
pub fn pacer(rate: Option<f64>) -> (Option<tokio::task::JoinHandle<()>>, Option<Tickets>) {
    let Some(rate) = rate else {
        return (None, None);
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let pacer = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
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
pub type Tickets = Arc<Mutex<tokio::sync::mpsc::Receiver<()>>>;

/// Waits for the pacer's next ticket, if the phase is paced. False when none came within 200 ms
/// (the caller checks whether its phase is over and asks again).
pub async fn ticket(tickets: Option<&Tickets>) -> bool {
    let Some(tickets) = tickets else {
        return true;
    };
    let ticket = tokio::time::timeout(Duration::from_millis(200), async {
        tickets.lock().await.recv().await
    })
    .await;
    matches!(ticket, Ok(Some(())))
}

struct HttpWorker {
    address: String,
    posts: PostSource,
    accepted: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    sequence: Arc<AtomicU64>,
    last: u64,
    tickets: Option<Tickets>,
}

impl HttpWorker {
    /// One keep-alive HTTP/1.1 connection, one request at a time, as PayPal sends them.
    async fn run(self) -> (u64, u64, Histogram<u64>) {
        let mut latency = histogram();
        let (mut ok, mut failed) = (0, 0);
        let mut mine = Vec::new();
        let mut connection = None;
        while !self.stop.load(Ordering::Relaxed) {
            if !ticket(self.tickets.as_ref()).await {
                continue;
            }
            if connection.is_none() {
                connection = PostClient::connect(&self.address).await;
            }
            let Some(client) = connection.as_mut() else {
                failed += 1;
                continue;
            };
            let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
            if seq >= self.last {
                break;
            }
            let post = (self.posts)(seq);
            let started = Instant::now();
            let answer = client.post(&post).await;
            record(&mut latency, started);
            if answer.is_some_and(|(status, _)| status == 200) {
                ok += 1;
                mine.push(seq);
            } else {
                failed += 1;
            }
            if !answer.is_some_and(|(_, open)| open) {
                connection = None;
            }
        }
        self.accepted.lock().await.extend(mine);
        (ok, failed, latency)
    }
}

/// The load generator's HTTP/1.1 client: a POST written in one system call, the answer read
/// into a reused buffer and parsed with `httparse`. It shares the two cores with the ingress and
/// the broker, so it does no more than that: no second task per connection, no header map.
pub struct PostClient {
    stream: tokio::net::TcpStream,
    host: String,
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl PostClient {
    pub async fn connect(address: &str) -> Option<PostClient> {
        let stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream.set_nodelay(true).ok()?;
        Some(PostClient {
            stream,
            host: address.to_owned(),
            request: Vec::with_capacity(2048),
            answer: Vec::with_capacity(512),
        })
    }

    /// Sends `post` and reads the whole answer: its status and whether the connection stays
    /// open; `None` when the connection failed or the answer was not HTTP.
    pub async fn post(&mut self, post: &Post) -> Option<(u16, bool)> {
        use std::io::Write;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.request.clear();
        write!(
            self.request,
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
            post.path,
            self.host,
            post.content_type,
            post.body.len()
        )
        .ok()?;
        for (name, value) in &post.headers {
            write!(self.request, "{name}: {value}\r\n").ok()?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(&post.body);
        self.stream.write_all(&self.request).await.ok()?;
        self.answer.clear();
        loop {
            if self.stream.read_buf(&mut self.answer).await.ok()? == 0 {
                return None;
            }
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head) = response.parse(&self.answer).ok()? else {
                continue;
            };
            let mut length = 0;
            let mut close = false;
            for header in response.headers.iter() {
                if header.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(header.value)
                        .ok()?
                        .trim()
                        .parse()
                        .ok()?;
                } else if header.name.eq_ignore_ascii_case("connection") {
                    close = header.value.eq_ignore_ascii_case(b"close");
                }
            }
            let status = response.code?;
            while self.answer.len() < head + length {
                if self.stream.read_buf(&mut self.answer).await.ok()? == 0 {
                    return None;
                }
            }
            return Some((status, !close));
        }
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

pub fn record(histogram: &mut Histogram<u64>, started: Instant) {
    let micros = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
    histogram.saturating_record(micros);
}

pub async fn collect(
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

/// One of our binaries as a child process, killed if still running when dropped.
pub struct ChildProcess {
    /// The process.
    pub child: Child,
    name: &'static str,
    /// `http://127.0.0.1:<port>` of its `/readyz` and `/metrics`.
    base: String,
}

impl ChildProcess {
    /// Starts `binary` with `envs` and waits (30 s at most) until `<base>/readyz` answers 200.
    pub async fn start(
        name: &'static str,
        binary: &str,
        envs: Vec<(String, String)>,
        base: String,
    ) -> anyhow::Result<ChildProcess> {
        let child = Command::new(binary)
            .envs(envs)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let ready = format!("{base}/readyz");
        let process = ChildProcess { child, name, base };
        for _ in 0..300 {
            if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
                return Ok(process);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{name} did not become ready in 30 s")
    }

    /// Its `/metrics` text now.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.base);
        let text = reqwest::get(&url).await?.error_for_status()?.text().await?;
        Ok(text)
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGTERM, then waits; an exit status other than success is an error.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("{} exited with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Already reaped when stop() ran; otherwise make sure no process outlives the bench.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (free when asked; the child binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// This process's variables named `<prefix><VAR>`, as `(<VAR>, value)`: settings for one child.
fn passed_on(prefix: &str) -> Vec<(String, String)> {
    std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_owned(), v)))
        .collect()
}

/// The real `ipn-ingress` binary for `config`'s broker and topology, with `settings` (more
/// `IPN_*` variables); returns it and its IPN URL. `BENCH_INGRESS_<VAR>` variables are passed on
/// as `<VAR>` (e.g. `BENCH_INGRESS_IPN_AMQP__PUBLISHER_CHANNELS`).
pub async fn start_ingress(
    config: &Config,
    settings: &[(String, String)],
) -> anyhow::Result<(ChildProcess, String)> {
    let port = free_port()?;
    let mut envs = vec![
        (
            "IPN_AMQP__URL".to_owned(),
            config.amqp.url.uri().to_string(),
        ),
        (
            "IPN_TOPOLOGY__PREFIX".to_owned(),
            config.topology.prefix.clone(),
        ),
        (
            "IPN_TOPOLOGY__SHARDS".to_owned(),
            config.topology.shards.to_string(),
        ),
        (
            "IPN_INGRESS__LISTEN".to_owned(),
            format!("127.0.0.1:{port}"),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    envs.extend(settings.iter().cloned());
    envs.extend(passed_on("BENCH_INGRESS_"));
    let process = ChildProcess::start(
        "ipn-ingress",
        env!("CARGO_BIN_EXE_ipn-ingress"),
        envs,
        format!("http://127.0.0.1:{port}"),
    )
    .await?;
    Ok((process, format!("http://127.0.0.1:{port}/ipn")))
}

/// The real `ipn-worker` binary for `config`'s broker and topology, the database at
/// `database_url` and the (fake) PayPal at `paypal_url`, with `settings` (more `IPN_*`
/// variables). `BENCH_WORKER_<VAR>` variables are passed on as `<VAR>` (e.g.
/// `BENCH_WORKER_TOKIO_WORKER_THREADS=1`), as [`start_ingress`] does with `BENCH_INGRESS_`.
pub async fn start_worker(
    config: &Config,
    database_url: &str,
    paypal_url: &str,
    settings: &[(String, String)],
) -> anyhow::Result<ChildProcess> {
    let port = free_port()?;
    let envs = [
        ("IPN_AMQP__URL", config.amqp.url.uri().to_string()),
        ("IPN_TOPOLOGY__PREFIX", config.topology.prefix.clone()),
        ("IPN_TOPOLOGY__SHARDS", config.topology.shards.to_string()),
        ("IPN_DATABASE__URL", database_url.to_owned()),
        ("IPN_PAYPAL__VERIFY_URL", paypal_url.to_owned()),
        ("IPN_WORKER__LISTEN", format!("127.0.0.1:{port}")),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let envs = envs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(settings.iter().cloned())
        .chain(passed_on("BENCH_WORKER_"))
        .collect();
    let base = format!("http://127.0.0.1:{port}");
    ChildProcess::start("ipn-worker", env!("CARGO_BIN_EXE_ipn-worker"), envs, base).await
}

/// What a run of the end-to-end benches makes for itself: a topology prefix
/// (`bench-<kind>-<id>`) declared on the broker, a downstream queue bound to `#`, and the name
/// of a database of its own; [`RunSetup::clean_up`] removes them.
pub struct RunSetup {
    pub config: Config,
    pub topology: Topology,
    pub connection: Connection,
    pub downstream: String,
    pub database: String,
    pub database_url: String,
    pub id: String,
}

impl RunSetup {
    /// Declares a run's topology of `shards` shards on `amqp` and names its database on
    /// `postgres`.
    pub async fn new(
        kind: &str,
        amqp: &str,
        postgres: &str,
        shards: u16,
    ) -> anyhow::Result<RunSetup> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let mut config = Config::default();
        config.amqp.url = amqp.parse().map_err(anyhow::Error::msg)?;
        config.topology.prefix = format!("bench-{kind}-{id}");
        config.topology.shards = std::num::NonZeroU16::new(shards).context("shards > 0")?;
        let downstream = format!("{}.downstream", config.topology.prefix);
        config.downstream = vec![ipn_bridge::config::Downstream::new(&downstream, &["#"])];
        let database = format!("bench_{kind}_{id}");
        let database_url = format!("{postgres}/{database}");
        config.database.url = database_url.parse().map_err(anyhow::Error::msg)?;
        let topology = Topology::of(&config);
        let connection = Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
        topology.declare(&connection).await?;
        Ok(RunSetup {
            config,
            topology,
            connection,
            downstream,
            database,
            database_url,
            id,
        })
    }

    /// Removes the run's queues, exchanges and database from `postgres`.
    pub async fn clean_up(&self, postgres: &str) -> anyhow::Result<()> {
        let dead = ipn_bridge::config::dead_letter_queue(&self.downstream);
        cleanup(&self.connection, &self.topology, &[&self.downstream, &dead]).await?;
        drop_database(postgres, &self.database).await
    }
}

/// Drops the database `name` on `server` (a run's own).
pub async fn drop_database(server: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::{Connection as _, Executor as _};
    let mut connection = sqlx::PgConnection::connect(&format!("{server}/postgres")).await?;
    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    connection.execute(sqlx::AssertSqlSafe(statement)).await?;
    Ok(())
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The local broker's quorum-queue WAL size (`raft.wal_max_size_bytes`), which sets how often
/// and how much the broker copies into segment files (docs/PERFORMANCE.md, "Runs O–T: the
/// disk"), as "N MiB", or "unknown" when `rabbitmqctl` cannot tell (not installed, no rights,
/// remote broker).
pub fn broker_wal_size() -> String {
    let asked = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "eval",
            "maps:get(wal_max_size_bytes, ra_system:fetch(quorum_queues)).",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    let bytes = asked
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        });
    bytes.map_or_else(
        || "unknown".to_owned(),
        |bytes| format!("{} MiB", bytes as f64 / 1_048_576.0),
    )
}

/// Whose CPU time a [`CpuMeter`] reads.
#[derive(Debug, Clone)]
pub enum Party {
    /// These processes together (none: 0 s).
    Processes(Vec<u32>),
    /// Every PostgreSQL process on this machine ([`postgres_cpu_seconds`]).
    Postgres,
}

impl Party {
    /// One process, or none when it is not known.
    pub fn process(pid: Option<u32>) -> Party {
        Party::Processes(pid.into_iter().collect())
    }

    fn seconds(&self) -> f64 {
        match self {
            Party::Processes(pids) => pids.iter().map(|pid| cpu_seconds(Some(*pid))).sum(),
            Party::Postgres => postgres_cpu_seconds(),
        }
    }
}

/// CPU time used by each of `N` parties over one phase.
pub struct CpuMeter<const N: usize> {
    parties: [Party; N],
    start: [f64; N],
}

impl<const N: usize> CpuMeter<N> {
    pub fn of(parties: [Party; N]) -> CpuMeter<N> {
        let start = parties.each_ref().map(Party::seconds);
        CpuMeter { parties, start }
    }

    /// µs of CPU per event (or message) of each party since the start.
    pub fn per_event(&self, events: u64) -> [f64; N] {
        let end = self.parties.each_ref().map(Party::seconds);
        std::array::from_fn(|i| (end[i] - self.start[i]) * 1e6 / events.max(1) as f64)
    }
}

impl CpuMeter<3> {
    /// The broker, `process` (the ingress, or a worker) and this process.
    pub fn start(process: Option<u32>) -> CpuMeter<3> {
        CpuMeter::of([
            Party::process(broker_pid()),
            Party::process(process),
            Party::process(Some(std::process::id())),
        ])
    }
}

/// The local RabbitMQ's Erlang VM, if it runs on this machine: of the `beam.smp` processes, the
/// one that has used the most CPU (a `rabbitmqctl` runs in a short-lived `beam.smp` of its own).
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
        .max_by(|a, b| cpu_seconds(Some(*a)).total_cmp(&cpu_seconds(Some(*b))))
}

/// CPU time of every PostgreSQL process on this machine, in seconds: each one's utime + stime,
/// plus what the ones that exited left in their parent's (the postmaster's) cutime + cstime.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            if comm.trim() != "postgres" {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: f64 = (11..=14)
                .filter_map(|i| fields.get(i)?.parse::<f64>().ok())
                .sum();
            Some(ticks / 100.0)
        })
        .sum()
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
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

/// Deletes the run's queues (the topology's and `extra`) and exchanges.
pub async fn cleanup(
    connection: &Connection,
    topology: &Topology,
    extra: &[&str],
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let queues = topology.queues();
    for queue in queues
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in topology.exchanges() {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// A bench's headline figures, each beside the ceiling measured in the same run, and the
/// resident memory of the binary it ran.
#[derive(Default)]
pub struct Summary {
    /// Figure, value, ceiling, value / ceiling.
    pub rows: Vec<(String, String, String, Option<f64>)>,
    /// Binary, RSS KiB at rest, RSS KiB under load.
    pub memory: Vec<(String, Option<u64>, Option<u64>)>,
}

impl Summary {
    pub fn row(&mut self, figure: String, value: String, ceiling: String, ratio: Option<f64>) {
        self.rows.push((figure, value, ceiling, ratio));
    }

    pub fn memory(&mut self, binary: &str, rest: Option<u64>, load: Option<u64>) {
        self.memory.push((binary.to_owned(), rest, load));
    }

    pub fn extend(&mut self, other: Summary) {
        self.rows.extend(other.rows);
        self.memory.extend(other.memory);
    }

    /// The figures and the memory as two Markdown tables.
    pub fn print(&self) {
        println!("\n| figure | value | ceiling, same run | value / ceiling |\n|---|---|---|---|");
        for (figure, value, ceiling, ratio) in &self.rows {
            let ratio = ratio.map_or("–".to_owned(), |r| format!("{:.0}%", 100.0 * r));
            println!("| {figure} | {value} | {ceiling} | {ratio} |");
        }
        let mib =
            |kib: &Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        println!("\n| binary | RSS at rest, MiB | RSS under load, MiB |\n|---|---|---|");
        for (binary, rest, load) in &self.memory {
            println!("| {binary} | {} | {} |", mib(rest), mib(load));
        }
    }
}
