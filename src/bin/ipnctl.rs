//! `ipnctl`: the operator's tool for ipn-bridge.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipn_bridge::config::Config;
use ipn_bridge::ctl;
use ipn_bridge::ctl::review::{self, Queue, Selection};
use ipn_bridge::store::EventFilter;

/// Whose notification `ipnctl send` posts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SendAs {
    Paypal,
    Alipay,
    Wechatpay,
}

/// Operate ipn-bridge: declare its topology, replay parked IPNs, release blocked keys, send a
/// sample IPN.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file (see config/example.toml); IPN_* variables override it.
    #[arg(long, env = "IPN_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exchanges and queues.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// IPNs parked after exhausting their retries (<prefix>.parked); their keys are blocked.
    Parked {
        #[command(subcommand)]
        action: Review,
    },
    /// IPNs quarantined: INVALID, wrong environment, foreign receiver, unreadable, unprocessable.
    Quarantine {
        #[command(subcommand)]
        action: Review,
    },
    /// IPNs the broker dead-lettered to <prefix>.dead after topology.delivery_limit deliveries
    /// (a worker died on each): list them, and replay them to their shards only once the cause
    /// is fixed, or purge them.
    Dead {
        #[command(subcommand)]
        action: Review,
    },
    /// Order keys blocked behind a deferred or parked IPN.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Business services' queues ([[downstream]]) and their dead-letter queues (<queue>.dead).
    Downstream {
        #[command(subcommand)]
        action: DownstreamAction,
    },
    /// The event history in PostgreSQL: find past events, deliver them again.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// The deployment at a glance: ingress ready, workers and shards, what waits where
    /// (inbound, parked, quarantine, dead, business queues), blocked keys. Exit 0 when all is
    /// well, 3 when something needs attention.
    Status {
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// The live workers and the shards each owns.
    Workers {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// POST a notification from FILE the way its provider does, and print the answer. PayPal:
    /// FILE is the raw form body, sent byte for byte. Alipay: FILE is the form's fields, signed
    /// here with the demo key (`fake-keys`). WeChat Pay: FILE is `{"event_type": …,
    /// "resource": {…}}`, encrypted and signed here with the demo keys.
    Send {
        /// The notification (tests/samples/ has some of each provider).
        file: PathBuf,
        /// Ingress URL; default http://<ingress.listen><the provider's path> from the config.
        #[arg(long)]
        url: Option<String>,
        /// paypal, alipay or wechatpay.
        #[arg(long, default_value = "paypal")]
        provider: SendAs,
        /// The demo keys' directory (made there when missing) for alipay and wechatpay.
        #[arg(long, default_value = "target/demo-keys")]
        keys: PathBuf,
    },
    /// Make (once) the demo Alipay and WeChat Pay keys in DIR, and print the variables that
    /// enable both providers in ipn-ingress and ipn-worker with them. For local demos only.
    FakeKeys {
        /// Where the keys go.
        #[arg(default_value = "target/demo-keys")]
        dir: PathBuf,
    },
    /// GET a binary's /healthz or /readyz and exit 0 on 200, 1 otherwise (a container
    /// healthcheck: `ipnctl health http://127.0.0.1:8080/readyz`).
    Health {
        /// The URL to ask.
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run a fake PayPal postback endpoint (for local demos and tests) until Ctrl-C.
    FakePaypal {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
        /// verified, invalid, 500, garbage, silent or slow:<duration>.
        #[arg(long, default_value = "verified")]
        answer: ipn_bridge::fake_paypal::Answer,
    },
}

/// What `parked` and `quarantine` do with their queue.
#[derive(Subcommand)]
enum Review {
    /// List them in order (key, txn_type, txn_id, reason, attempts, age, message id), leaving
    /// them as they are. Long values are cut in the table; --json has them whole.
    List {
        /// JSON instead of a table (docs/operations.md, "ipnctl's JSON").
        #[arg(long)]
        json: bool,
    },
    /// Send them back to their shards in their order, attempts reset, to be checked again: a
    /// parked IPN releases the IPNs held behind it once it succeeds; replay a quarantined one
    /// after fixing what quarantined it (a receiver id, a key), or it is quarantined again.
    Replay(Which),
    /// Delete them for good (a parked IPN's key stays blocked: see `key release`). More than
    /// one message (--all, --key) needs --yes; --dry-run lists what would go.
    Purge(Purging),
}

/// A purge's selection and its safety catch.
#[derive(clap::Args)]
struct Purging {
    #[command(flatten)]
    which: Which,
    /// Really delete what --all or --key selects.
    #[arg(long)]
    yes: bool,
    /// List what would be deleted, and delete nothing.
    #[arg(long, conflicts_with = "yes")]
    dry_run: bool,
}

/// Which messages: exactly one of these.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// Every one in the queue.
    #[arg(long)]
    all: bool,
    /// Those of one order key, e.g. profile:I-7PX4WQ2N9KD3.
    #[arg(long)]
    key: Option<String>,
    /// The one with this message id.
    #[arg(long)]
    id: Option<String>,
}

impl Which {
    fn selection(self) -> Selection {
        match (self.key, self.id) {
            (Some(key), _) => Selection::Key(key),
            (None, Some(id)) => Selection::MessageId(id),
            (None, None) => Selection::All,
        }
    }
}

#[derive(Subcommand)]
enum DownstreamAction {
    /// Each configured queue: depth, consumers, dead-lettered events, bindings.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Events a service rejected, requeued too often, or left past its message_ttl.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
}

#[derive(Subcommand)]
enum DeadAction {
    /// List the events in QUEUE.dead in order (key, sequence, txn, why, event id), leaving them.
    List {
        /// The [[downstream]] queue, e.g. billing.
        queue: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give them back to QUEUE as first published (same event ids and sequence numbers), each
    /// key's in sequence order.
    Replay {
        /// The [[downstream]] queue, e.g. billing.
        queue: String,
        #[command(flatten)]
        which: Which,
    },
    /// Delete them from QUEUE.dead for good (`events redeliver` can still send them again
    /// while the history keeps them). More than one (--all, --key) needs --yes; --dry-run
    /// lists what would go.
    Purge {
        /// The [[downstream]] queue, e.g. billing.
        queue: String,
        #[command(flatten)]
        purging: Purging,
    },
}

/// Which stored events: exactly one of these (`--until` goes with `--since`).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Stored {
    /// The events of one txn_id.
    #[arg(long)]
    txn: Option<String>,
    /// The events of one order key, e.g. profile:I-7PX4WQ2N9KD3.
    #[arg(long)]
    key: Option<String>,
    /// One event, by event id.
    #[arg(long)]
    id: Option<uuid::Uuid>,
    /// Published at or after this time: RFC 3339 (2026-12-01T10:00:00Z) or a duration ago (2h).
    #[arg(long, value_parser = ctl::events::parse_time)]
    since: Option<std::time::SystemTime>,
}

impl Stored {
    fn filter(self, until: Option<std::time::SystemTime>) -> EventFilter {
        match (self.txn, self.key, self.id, self.since) {
            (Some(txn), ..) => EventFilter::Txn(txn),
            (_, Some(key), ..) => EventFilter::Key(key),
            (_, _, Some(id), _) => EventFilter::Id(id),
            (.., since) => EventFilter::Between {
                since: since.unwrap_or(std::time::UNIX_EPOCH),
                until,
            },
        }
    }
}

#[derive(Subcommand)]
enum EventsAction {
    /// Show stored events, oldest first.
    Find {
        #[command(flatten)]
        stored: Stored,
        /// Before this time (with --since): RFC 3339 or a duration ago.
        #[arg(long, requires = "since", value_parser = ctl::events::parse_time)]
        until: Option<std::time::SystemTime>,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON (each with its event) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish stored events again to one queue, with confirms, in per-key sequence order,
    /// with their original event ids and sequence numbers.
    Redeliver {
        #[command(flatten)]
        stored: Stored,
        /// Before this time (with --since): RFC 3339 or a duration ago.
        #[arg(long, requires = "since", value_parser = ctl::events::parse_time)]
        until: Option<std::time::SystemTime>,
        /// The queue to publish them to (it must exist).
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// List blocked keys with how many IPNs each holds back.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Unblock KEY by skipping its blocker: the IPNs held behind it are delivered in order.
    Release {
        /// The order key, e.g. profile:I-7PX4WQ2N9KD3.
        key: String,
        /// Also delete the blocker from <prefix>.parked (default: keep it there).
        #[arg(long)]
        purge_blocker: bool,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare every exchange and queue (safe to repeat).
    Declare,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::for_binary("ipnctl", args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match run(args.command, &config).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ipnctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Topology {
            action: TopologyAction::Declare,
        } => {
            println!("{}", ctl::declare_topology(config).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Parked { action } => review(config, &Queue::Parked, action).await,
        Command::Quarantine { action } => review(config, &Queue::Quarantine, action).await,
        Command::Dead { action } => review(config, &Queue::BridgeDead, action).await,
        Command::Downstream { action } => downstream(config, action).await,
        Command::Events { action } => events(config, action).await,
        Command::Key {
            action: KeyAction::List { json },
        } => show(
            &review::blocked_keys(config).await?,
            json,
            review::blocked_table,
        ),
        Command::Key {
            action: KeyAction::Release { key, purge_blocker },
        } => {
            if review::release(config, &key, purge_blocker).await? {
                println!("release of {key} sent: its held IPNs are delivered in order");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{key} is not blocked");
                Ok(ExitCode::from(2))
            }
        }
        Command::Status { json } => {
            let status = ctl::status::status(config).await?;
            let healthy = status.healthy();
            show(&[status], json, ctl::status::status_text)?;
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Workers { json } => show(&ctl::workers(config).await?, json, ctl::workers_table),
        Command::Health { url, timeout } => {
            let (line, healthy) = ctl::health(&url, timeout).await;
            println!("{line}");
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::FakePaypal { listen, answer } => {
            ctl::fake_paypal(listen, answer).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::FakeKeys { dir } => {
            ipn_bridge::fake_providers::DemoKeys::at(&dir)?;
            // Absolute: the config reads a key from a value starting with `/` as a file.
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            println!("{}", ctl::demo::demo_settings(&dir));
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            file,
            url,
            provider,
            keys,
        } => {
            let (status, answer) = match provider {
                SendAs::Paypal => {
                    let body = std::fs::read(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let url = url.unwrap_or_else(|| ctl::default_ingress_url(config));
                    ctl::send(&url, body).await?
                }
                SendAs::Alipay => {
                    let url = url.unwrap_or_else(|| ctl::ingress_url(config, &config.alipay.path));
                    ctl::demo::send_alipay(&url, &keys, &file).await?
                }
                SendAs::Wechatpay => {
                    let url =
                        url.unwrap_or_else(|| ctl::ingress_url(config, &config.wechatpay.path));
                    ctl::demo::send_wechatpay(&url, &keys, &file).await?
                }
            };
            println!("{}", format!("{status} {}", answer.trim()).trim_end());
            Ok(if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

async fn review(config: &Config, queue: &Queue, action: Review) -> anyhow::Result<ExitCode> {
    let pass = match action {
        Review::List { json } => {
            return show(
                &review::list(config, queue).await?,
                json,
                review::listed_table,
            );
        }
        Review::Replay(which) => review::replay(config, queue, &which.selection()).await?,
        Review::Purge(purging) => {
            return purge(config, queue, purging, review::listed_table).await;
        }
    };
    taken(&pass)
}

/// A purge behind its safety catch: with --dry-run the messages that would go, listed; without
/// --yes, a refusal when more than one could go; else the purge.
async fn purge(
    config: &Config,
    queue: &Queue,
    purging: Purging,
    table: fn(&[review::Listed]) -> String,
) -> anyhow::Result<ExitCode> {
    let selection = purging.which.selection();
    if purging.dry_run {
        let listed = review::list(config, queue).await?;
        let chosen: Vec<review::Listed> =
            listed.into_iter().filter(|m| selection.takes(m)).collect();
        println!("{}", table(&chosen));
        println!("dry run: {} would be purged; nothing was", chosen.len());
        return Ok(if chosen.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        });
    }
    if selection.may_take_many() && !purging.yes {
        eprintln!(
            "ipnctl: a purge of --all or --key deletes for good and may take many: add --yes, or --dry-run to see which first"
        );
        return Ok(ExitCode::from(64));
    }
    taken(&review::purge(config, queue, &selection).await?)
}

async fn downstream(config: &Config, action: DownstreamAction) -> anyhow::Result<ExitCode> {
    let action = match action {
        DownstreamAction::List { json } => {
            return show(
                &ctl::downstream::list(config).await?,
                json,
                ctl::downstream::list_table,
            );
        }
        DownstreamAction::Dead { action } => action,
    };
    let pass = match action {
        DeadAction::List { queue, json } => {
            ctl::downstream::configured(config, &queue)?;
            let listed = review::list(config, &Queue::Dead(queue)).await?;
            return show(&listed, json, review::dead_table);
        }
        DeadAction::Replay { queue, which } => {
            ctl::downstream::configured(config, &queue)?;
            review::replay(config, &Queue::Dead(queue), &which.selection()).await?
        }
        DeadAction::Purge { queue, purging } => {
            ctl::downstream::configured(config, &queue)?;
            return purge(config, &Queue::Dead(queue), purging, review::dead_table).await;
        }
    };
    taken(&pass)
}

async fn events(config: &Config, action: EventsAction) -> anyhow::Result<ExitCode> {
    match action {
        EventsAction::Find {
            stored,
            until,
            limit,
            json,
        } => {
            let filter = stored.filter(until);
            let (found, total) = ctl::events::find(config, &filter, limit).await?;
            if u64::try_from(found.len()).unwrap_or(u64::MAX) < total {
                eprintln!(
                    "ipnctl: showing the first {} of {total}; narrow the search or raise --limit",
                    found.len()
                );
            }
            if found.is_empty() {
                eprintln!("ipnctl: no stored event matches");
                return Ok(ExitCode::from(2));
            }
            show(&found, json, ctl::events::found_table)
        }
        EventsAction::Redeliver { stored, until, to } => {
            let filter = stored.filter(until);
            let done = ctl::events::redeliver(config, &filter, &to).await?;
            println!("{} events redelivered to {to}", done.published);
            if done.skipped > 0 {
                println!(
                    "{} events stored before the history existed were skipped",
                    done.skipped
                );
            }
            Ok(if done.published == 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// What a replay or purge did, and its exit code.
fn taken(pass: &review::Pass) -> anyhow::Result<ExitCode> {
    println!("{} taken, {} left", pass.taken, pass.kept);
    // Nothing matched: most likely a mistyped key or id, which a script should notice.
    Ok(if pass.taken == 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints rows as pretty JSON or as the readable table `table` makes.
/// The version of every `--json` document's shape; raised when a field changes meaning or goes.
const JSON_VERSION: u32 = 1;

fn show<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    table: fn(&[T]) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        // Versioned: a script can tell a shape it knows (docs/operations.md, "ipnctl's JSON").
        let document = serde_json::json!({ "version": JSON_VERSION, "items": rows });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!("{}", table(rows));
    }
    Ok(ExitCode::SUCCESS)
}
