//! Each provider's notifications through the real ingress and worker, PayPal's beside Alipay's
//! and WeChat Pay's, measured in one run by one method.
//!
//! ```sh
//! cargo bench --bench bridge -- providers --ipns 10000 --keys 1000
//! ```
//! For PayPal, Alipay and WeChat Pay in turn:
//! 1. `--ipns` notifications are made in advance, as the provider sends them: PayPal's
//!    `subscr_payment` forms; Alipay's `trade_status_sync` forms signed (RSA2) with a key made
//!    for the run; WeChat Pay's `TRANSACTION.SUCCESS` envelopes with the resource encrypted
//!    (AES-256-GCM) under an APIv3 key of the run's and the `Wechatpay-*` headers signed.
//!    Signing costs more than sending, so none of it happens while a phase is timed;
//! 2. post: the real `ipn-ingress` gets them at `--concurrency` with no worker running:
//!    msg/s, and the ingress's and the broker's CPU per notification (Alipay's and WeChat Pay's
//!    signatures are checked here, PayPal's postback is not);
//! 3. drain: a real `ipn-worker` starts and empties the queues (PayPal verified by the in-process
//!    fake PayPal answering at once; WeChat Pay's resources decrypted, and each notification
//!    re-routed from the intake key to its order's key): events/s, the worker's CPU per event,
//!    and where the drain's wall time went by step ([`crate::support::steps`]; WeChat Pay's
//!    hop through the intake key adds acks, and gate look-ups where it went one at a time, to
//!    the means).
//!
//! Every notification answered 200 must yield exactly one event and each key's sequence numbers
//! must run 1..n, or the run fails. Needs RabbitMQ and PostgreSQL on 127.0.0.1; uses a prefix and
//! a database of its own and removes both.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::bail;
use ipn_bridge::config::Config;
use ipn_bridge::ctl::demo::demo_settings;
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::fake_providers::{self, DemoKeys};
use lapin::Connection;
use tokio::sync::Mutex;

use crate::e2e::body_source;
use crate::support::events::{Drained, Ledger, consume_downstream, take_events};
use crate::support::steps::Scrape;
use crate::support::{self, CpuMeter, Length, Phase, Post, Summary, cores, http_phase};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Notifications per provider.
    #[arg(long, default_value_t = 10_000)]
    ipns: u64,
    /// Order keys (PayPal profiles, Alipay and WeChat Pay orders) each provider's notifications
    /// are spread over.
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
    /// Requests in flight at once at the ingress.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The worker's `worker.concurrency`.
    #[arg(long, default_value_t = 512)]
    worker_concurrency: usize,
    /// Shard queues.
    #[arg(long, default_value_t = 32)]
    shards: u16,
    /// Broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// PostgreSQL server (the bench makes a database of its own on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
}

/// The providers, in the order they run.
const PROVIDERS: [&str; 3] = ["paypal", "alipay", "wechatpay"];

/// What one provider's post and drain measured.
struct Measured {
    provider: &'static str,
    posted: Phase,
    drained: Drained,
    /// CPU µs per event: broker, worker.
    drain_cpu: [f64; 2],
    /// Where the drain's wall time went, by step ([`Scrape::report_since`]).
    steps: String,
}

/// Runs the three providers with the checks; prints their table; returns the headline figures.
pub fn bench(args: &Args) -> anyhow::Result<Summary> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench_in_runtime(args))
}

async fn bench_in_runtime(args: &Args) -> anyhow::Result<Summary> {
    let setup =
        support::RunSetup::new("providers", &args.amqp, &args.postgres, args.shards).await?;
    let keys_dir = std::env::temp_dir().join(format!("bench-providers-{}", setup.id));
    let result = run(
        args,
        &setup.config,
        &setup.connection,
        &setup.database_url,
        &keys_dir,
        &setup.downstream,
    )
    .await;
    let _ = std::fs::remove_dir_all(&keys_dir);
    setup.clean_up(&args.postgres).await?;
    result
}

async fn run(
    args: &Args,
    config: &Config,
    connection: &Connection,
    database_url: &str,
    keys_dir: &std::path::Path,
    downstream: &str,
) -> anyhow::Result<Summary> {
    let keys = DemoKeys::at(keys_dir)?;
    // Both binaries get what `ipnctl fake-keys` gives the demo: both providers enabled with
    // the run's keys.
    let settings: Vec<(String, String)> = demo_settings(keys_dir)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let mut worker_settings = settings.clone();
    worker_settings.push((
        "IPN_WORKER__CONCURRENCY".to_owned(),
        args.worker_concurrency.to_string(),
    ));
    let mut arrivals = consume_downstream(connection, downstream).await?;
    let paypal = FakePaypal::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        Answer::Verified,
    )?;
    let (mut ingress, url) = support::start_ingress(config, &settings).await?;
    let rss_rest = ingress.rss_kib();
    let mut rss_load = None;
    let mut ledger = Ledger::default();
    let mut measured = Vec::new();
    for (index, provider) in PROVIDERS.into_iter().enumerate() {
        let first = index as u64 * 1_000_000_000;
        let made = std::time::Instant::now();
        let posts = prepare(provider, &keys, args, first)?;
        eprintln!(
            "{provider}: {} notifications made in {:?}",
            posts.len(),
            made.elapsed()
        );
        let posts = support::prepared_posts(posts, first);
        let accepted = Arc::new(Mutex::new(HashSet::new()));
        let meter = CpuMeter::start(Some(ingress.child.id()));
        let mut posted = http_phase(
            provider_name(provider),
            args.concurrency,
            None,
            &url,
            &posts,
            &accepted,
            first,
            Length::Count(args.ipns),
        )
        .await?;
        posted.cpu = meter.per_event(posted.ok);
        rss_load = rss_load.max(ingress.rss_kib());
        if posted.failed > 0 {
            bail!("{provider}: {} posts were not answered 200", posted.failed);
        }
        let mut worker = support::start_worker(
            config,
            database_url,
            paypal.url().as_ref(),
            &worker_settings,
        )
        .await?;
        let meter = CpuMeter::start(Some(worker.child.id()));
        let before = Scrape::of(std::slice::from_ref(&worker)).await?;
        let drained = take_events(&mut arrivals, &accepted, &mut ledger).await?;
        let cpu = meter.per_event(drained.events);
        let steps = Scrape::of(std::slice::from_ref(&worker))
            .await?
            .report_since(&before);
        worker.stop()?;
        measured.push(Measured {
            provider,
            posted,
            drained,
            drain_cpu: [cpu[0], cpu[1]],
            steps,
        });
    }
    ingress.stop()?;
    paypal.stop().await;
    report(args, &measured, &ledger, rss_rest, rss_load)
}

fn provider_name(provider: &str) -> &'static str {
    match provider {
        "paypal" => "PayPal",
        "alipay" => "Alipay",
        _ => "WeChat Pay",
    }
}

/// `--ipns` requests of `provider`, numbered from `first`; the signing spread over the cores.
fn prepare(
    provider: &'static str,
    keys: &DemoKeys,
    args: &Args,
    first: u64,
) -> anyhow::Result<Vec<Post>> {
    let threads = cores().max(1) as u64;
    let per_thread = args.ipns.div_ceil(threads);
    let paypal = body_source(args.keys);
    std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|part| {
                let paypal = Arc::clone(&paypal);
                scope.spawn(move || {
                    let from = first + part * per_thread;
                    let to = (from + per_thread).min(first + args.ipns);
                    (from..to)
                        .map(|seq| match provider {
                            "paypal" => Ok(Post {
                                path: "/ipn",
                                content_type: "application/x-www-form-urlencoded",
                                headers: Vec::new(),
                                body: paypal(seq),
                            }),
                            "alipay" => Ok(alipay(keys, seq, args.keys)),
                            _ => wechatpay(keys, seq, args.keys),
                        })
                        .collect::<anyhow::Result<Vec<Post>>>()
                })
            })
            .collect();
        let mut posts = Vec::new();
        for part in parts {
            let part = part
                .join()
                .map_err(|_| anyhow::anyhow!("a signing thread panicked"))?;
            posts.extend(part?);
        }
        Ok(posts)
    })
}

/// Alipay notification number `seq`: a payment (`trade_no` `B<seq>`) of order `seq % keys`,
/// signed as Alipay signs, with the demo app id.
fn alipay(keys: &DemoKeys, seq: u64, orders: u64) -> Post {
    let (notify_id, trade_no, order) = (
        format!("N{seq}"),
        format!("B{seq}"),
        format!("ALI-{}", seq % orders),
    );
    let fields = [
        ("notify_time", "2026-12-01 10:00:02"),
        ("notify_type", "trade_status_sync"),
        ("notify_id", notify_id.as_str()),
        ("app_id", "2021000000000000"),
        ("charset", "utf-8"),
        ("version", "1.0"),
        ("trade_no", trade_no.as_str()),
        ("out_trade_no", order.as_str()),
        ("buyer_logon_id", "xud***@126.com"),
        ("trade_status", "TRADE_SUCCESS"),
        ("total_amount", "88.00"),
        ("receipt_amount", "88.00"),
        ("subject", "语雀空间"),
        ("gmt_payment", "2026-12-01 10:00:01"),
    ];
    Post {
        path: "/alipay/notify",
        content_type: "application/x-www-form-urlencoded; charset=utf-8",
        headers: Vec::new(),
        body: fake_providers::alipay_notification(&keys.alipay, &fields, encoding_rs::UTF_8),
    }
}

/// WeChat Pay notification number `seq`: a transaction (`transaction_id` `B<seq>`) of order
/// `seq % keys`, encrypted and signed as WeChat Pay does, for the demo merchant.
fn wechatpay(keys: &DemoKeys, seq: u64, orders: u64) -> anyhow::Result<Post> {
    let resource = fake_providers::wechatpay_transaction(
        "1900000109",
        "wxd678efh567hg6787",
        &format!("WX-{}", seq % orders),
        &format!("B{seq}"),
    );
    let (body, headers) =
        keys.wechatpay_notification("TRANSACTION.SUCCESS", "transaction", &resource)?;
    Ok(Post {
        path: "/wechatpay/notify",
        content_type: "application/json",
        headers,
        body,
    })
}

/// Prints each provider's figures and the check; returns the headline figures.
fn report(
    args: &Args,
    measured: &[Measured],
    ledger: &Ledger,
    rss_rest: Option<u64>,
    rss_load: Option<u64>,
) -> anyhow::Result<Summary> {
    println!(
        "\nmachine: {} cores; {} notifications per provider over {} keys; ingress concurrency {}; worker concurrency {}; PayPal answers at once; {} shards",
        cores(),
        args.ipns,
        args.keys,
        args.concurrency,
        args.worker_concurrency,
        args.shards
    );
    println!(
        "| provider | ingress msg/s | ingress p50 / p99 ms | CPU µs/msg broker / ingress | worker drain events/s | CPU µs/event broker / worker |\n|---|---|---|---|---|---|"
    );
    for m in measured {
        println!(
            "| {} | {:.0} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} |",
            m.posted.name,
            m.posted.rate(),
            m.posted.ms(0.5),
            m.posted.ms(0.99),
            m.posted.cpu[0],
            m.posted.cpu[1],
            m.drained.rate(),
            m.drain_cpu[0],
            m.drain_cpu[1]
        );
    }
    for m in measured {
        println!("{}:\n{}", m.posted.name, m.steps);
    }
    let answered: u64 = measured.iter().map(|m| m.posted.ok).sum();
    println!(
        "check: {answered} notifications answered 200, {} events, {} duplicates, {} sequence errors",
        ledger.events, ledger.duplicates, ledger.sequence_errors
    );
    if ledger.duplicates > 0 || ledger.sequence_errors > 0 || ledger.events != answered {
        bail!("the events do not match the notifications answered 200");
    }
    let mut summary = Summary::default();
    let paypal = &measured[0];
    for m in measured {
        let beside = |figure: f64, of_paypal: f64| {
            (m.provider != "paypal").then(|| figure / of_paypal.max(1e-9))
        };
        summary.row(
            format!("ingress, {} notifications, msg/s", m.posted.name),
            format!("{:.0}", m.posted.rate()),
            format!("PayPal {:.0}", paypal.posted.rate()),
            beside(m.posted.rate(), paypal.posted.rate()),
        );
        summary.row(
            format!("worker draining {} {}, events/s", args.ipns, m.posted.name),
            format!("{:.0}", m.drained.rate()),
            format!("PayPal {:.0}", paypal.drained.rate()),
            beside(m.drained.rate(), paypal.drained.rate()),
        );
    }
    summary.memory("ipn-ingress (three providers)", rss_rest, rss_load);
    Ok(summary)
}
